//! Command output sized for a model's context: each stream keeps its first and last bytes up
//! to a limit, and says how much it left out in between.

use forkd_core::{ExecSink, OutputStream};

/// Bytes per stream returned by default (16 KiB: a screenful of logs, not a context window).
pub const DEFAULT_LIMIT: usize = 16 * 1024;

/// One stream's kept head and tail.
#[derive(Debug, Default)]
struct Kept {
    head: Vec<u8>,
    tail: Vec<u8>,
    total: u64,
}

impl Kept {
    fn push(&mut self, data: &[u8], limit: usize) {
        self.total += data.len() as u64;
        let head_room = (limit / 2).saturating_sub(self.head.len());
        let (to_head, rest) = data.split_at(head_room.min(data.len()));
        self.head.extend_from_slice(to_head);
        self.tail.extend_from_slice(rest);
        let tail_limit = limit - limit / 2;
        if self.tail.len() > tail_limit {
            self.tail.drain(..self.tail.len() - tail_limit);
        }
    }

    fn render(&self) -> String {
        let kept = (self.head.len() + self.tail.len()) as u64;
        let mut text = String::from_utf8_lossy(&self.head).into_owned();
        if self.total > kept {
            text.push_str(&format!("\n[... {} bytes cut by forkd-mcp (max_output) ...]\n", self.total - kept));
        }
        text.push_str(&String::from_utf8_lossy(&self.tail));
        text
    }
}

/// An [`ExecSink`] that keeps at most `limit` bytes of each stream.
#[derive(Debug)]
pub struct BoundedOutput {
    limit: usize,
    stdout: Kept,
    stderr: Kept,
}

impl BoundedOutput {
    pub fn new(limit: usize) -> Self {
        Self { limit, stdout: Kept::default(), stderr: Kept::default() }
    }

    pub fn stdout(&self) -> String {
        self.stdout.render()
    }

    pub fn stderr(&self) -> String {
        self.stderr.render()
    }

    pub fn truncated(&self) -> bool {
        let cut = |k: &Kept| k.total > (k.head.len() + k.tail.len()) as u64;
        cut(&self.stdout) || cut(&self.stderr)
    }
}

impl ExecSink for BoundedOutput {
    fn output(&mut self, stream: OutputStream, data: &[u8]) {
        match stream {
            OutputStream::Stdout => self.stdout.push(data, self.limit),
            OutputStream::Stderr => self.stderr.push(data, self.limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_output_is_whole() {
        let mut out = BoundedOutput::new(100);
        out.output(OutputStream::Stdout, b"hello ");
        out.output(OutputStream::Stdout, b"world");
        assert_eq!(out.stdout(), "hello world");
        assert!(!out.truncated());
    }

    #[test]
    fn long_output_keeps_both_ends_and_says_what_was_cut() {
        let mut out = BoundedOutput::new(10);
        for chunk in [&b"0123"[..], b"456789abc", b"defghij"] {
            out.output(OutputStream::Stderr, chunk);
        }
        let text = out.stderr();
        assert!(text.starts_with("01234\n"), "{text}");
        assert!(text.ends_with("\nfghij"), "{text}");
        assert!(text.contains("[... 10 bytes cut"), "{text}");
        assert!(out.truncated());
    }
}
