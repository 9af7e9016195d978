//! Waiting for text to show up in a sandbox: in the guest console, or in the output of a
//! command (e.g. `tail -F /var/log/app.log`) that is stopped as soon as the text appears.

use crate::Client;
use forkd_core::{CancelToken, Error, ExecRequest, ExecSink, ExitStatus, OutputStream, Result, SandboxId};
use std::time::{Duration, Instant};

/// How often the console is read while waiting on it.
const CONSOLE_POLL: Duration = Duration::from_millis(100);
/// How much of the console tail is searched.
const CONSOLE_TAIL: u64 = 256 * 1024;
/// Output kept to find the matching line in; older output is dropped.
const WINDOW: usize = 64 * 1024;

/// Where to look for the text.
#[derive(Debug, Clone)]
pub enum WaitSource {
    /// The guest's serial console (kernel and init messages, anything written to /dev/console).
    Console,
    /// The stdout and stderr of this command, which is ended once the text appears.
    Command(ExecRequest),
}

/// What [`Client::wait_for_text`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitOutcome {
    /// The line the text was found on, or `None` if the time ran out (or a command ended)
    /// first.
    pub line: Option<String>,
    pub waited: Duration,
    /// Set when a command ended on its own before the text appeared.
    pub command_exit: Option<ExitStatus>,
}

impl Client {
    /// Waits up to `timeout` for `text` in `source`. Not finding it is an outcome, not an
    /// error; `cancel` ends the wait early with `Error::Cancelled`.
    pub fn wait_for_text(
        &self,
        id: &SandboxId,
        text: &str,
        source: &WaitSource,
        timeout: Duration,
        cancel: &CancelToken,
    ) -> Result<WaitOutcome> {
        if text.is_empty() {
            return Err(Error::invalid("text", "must not be empty"));
        }
        let started = Instant::now();
        match source {
            WaitSource::Console => self.wait_on_console(id, text, started, timeout, cancel),
            WaitSource::Command(req) => self.wait_on_command(id, text, req, started, timeout, cancel),
        }
    }

    fn wait_on_console(
        &self,
        id: &SandboxId,
        text: &str,
        started: Instant,
        timeout: Duration,
        cancel: &CancelToken,
    ) -> Result<WaitOutcome> {
        loop {
            let console = self.console(id, CONSOLE_TAIL)?;
            if let Some(line) = line_containing(&console, text) {
                return Ok(WaitOutcome { line: Some(line), waited: started.elapsed(), command_exit: None });
            }
            if cancel.is_cancelled() {
                return Err(Error::Cancelled("the wait was cancelled".into()));
            }
            if started.elapsed() >= timeout {
                return Ok(WaitOutcome { line: None, waited: started.elapsed(), command_exit: None });
            }
            std::thread::sleep(CONSOLE_POLL.min(timeout.saturating_sub(started.elapsed())));
        }
    }

    fn wait_on_command(
        &self,
        id: &SandboxId,
        text: &str,
        req: &ExecRequest,
        started: Instant,
        timeout: Duration,
        cancel: &CancelToken,
    ) -> Result<WaitOutcome> {
        let mut req = req.clone();
        req.timeout = Some(req.timeout.map_or(timeout, |t| t.min(timeout)));
        // The command is stopped by cancelling it: on a match (ours) or by the caller (theirs).
        let stop = CancelToken::new();
        let forward = stop.clone();
        cancel.on_cancel(move || forward.cancel());
        let mut watcher = Watcher { text, window: Vec::new(), found: None, stop: stop.clone() };
        let result = self.exec(id, &req, None, &mut watcher, &stop);
        let waited = started.elapsed();
        match (watcher.found, result) {
            (Some(line), _) => Ok(WaitOutcome { line: Some(line), waited, command_exit: None }),
            (None, Ok(outcome)) if outcome.status == ExitStatus::TimedOut => {
                Ok(WaitOutcome { line: None, waited, command_exit: None })
            }
            (None, Ok(outcome)) => Ok(WaitOutcome { line: None, waited, command_exit: Some(outcome.status) }),
            (None, Err(e)) => Err(e),
        }
    }
}

/// Searches output as it streams in, across chunk boundaries, and stops the command on a match.
struct Watcher<'a> {
    text: &'a str,
    window: Vec<u8>,
    found: Option<String>,
    stop: CancelToken,
}

impl ExecSink for Watcher<'_> {
    fn output(&mut self, _stream: OutputStream, data: &[u8]) {
        if self.found.is_some() {
            return;
        }
        self.window.extend_from_slice(data);
        if let Some(line) = line_containing(&self.window, self.text) {
            self.found = Some(line);
            self.stop.cancel();
            return;
        }
        if self.window.len() > WINDOW {
            // Older output can no longer hold a match's line (unless lines are huge: then the
            // line reported is its kept part).
            let cut = self.window.len() - WINDOW / 2;
            self.window.drain(..cut);
        }
    }
}

/// The (lossily decoded) line of `haystack` that holds `needle`.
fn line_containing(haystack: &[u8], needle: &str) -> Option<String> {
    let needle = needle.as_bytes();
    let at = haystack.windows(needle.len()).position(|w| w == needle)?;
    let start = haystack[..at].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let end = haystack[at..].iter().position(|&b| b == b'\n').map_or(haystack.len(), |i| at + i);
    Some(String::from_utf8_lossy(&haystack[start..end]).trim_end_matches('\r').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_whole_line() {
        assert_eq!(
            line_containing(b"boot\nserver ready on :80\r\nmore", "ready").as_deref(),
            Some("server ready on :80")
        );
        assert_eq!(line_containing(b"ready", "ready").as_deref(), Some("ready"));
        assert_eq!(line_containing(b"nothing here", "ready"), None);
    }

    #[test]
    fn matches_across_chunks_and_stops_the_command() {
        let stop = CancelToken::new();
        let mut w = Watcher { text: "listening", window: Vec::new(), found: None, stop: stop.clone() };
        w.output(OutputStream::Stdout, b"starting\nnow liste");
        assert!(!stop.is_cancelled());
        w.output(OutputStream::Stderr, b"ning on 8080\nrest");
        assert!(stop.is_cancelled());
        assert_eq!(w.found.as_deref(), Some("now listening on 8080"));
    }
}
