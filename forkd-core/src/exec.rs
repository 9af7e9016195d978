//! Running commands in a sandbox.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Extra environment, `KEY=VALUE`, on top of the guest's default (PATH, HOME).
    pub env: Vec<String>,
    pub cwd: Option<String>,
    /// Kill the command's process group after this long.
    #[serde(with = "crate::time::opt_millis")]
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(argv: I) -> Self {
        Self { argv: argv.into_iter().map(Into::into).collect(), ..Default::default() }
    }

    pub fn validate(&self) -> crate::Result<()> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(crate::Error::invalid("argv", "must name a program to run"));
        }
        if let Some(bad) = self.env.iter().find(|e| !e.contains('=') || e.starts_with('=')) {
            return Err(crate::Error::invalid("env", format!("`{bad}` is not KEY=VALUE")));
        }
        if self.argv.iter().chain(&self.env).any(|s| s.contains('\0')) {
            return Err(crate::Error::invalid("argv", "arguments and environment must not contain NUL bytes"));
        }
        Ok(())
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    TimedOut,
}

impl ExitStatus {
    /// The shell convention: the code, 128 + signal, or 124 for a timeout (like `timeout(1)`).
    pub fn shell_code(&self) -> i32 {
        match self {
            ExitStatus::Code(c) => *c,
            ExitStatus::Signal(s) => 128 + s,
            ExitStatus::TimedOut => 124,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExecOutcome {
    pub status: ExitStatus,
    #[serde(with = "crate::time::duration_ms")]
    pub duration: Duration,
}

/// Receives a command's output as it is produced.
pub trait ExecSink: Send {
    fn output(&mut self, stream: OutputStream, data: &[u8]);
}

impl<F: FnMut(OutputStream, &[u8]) + Send> ExecSink for F {
    fn output(&mut self, stream: OutputStream, data: &[u8]) {
        self(stream, data)
    }
}

/// Collects output in memory.
#[derive(Debug, Default, Clone)]
pub struct CapturedOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecSink for CapturedOutput {
    fn output(&mut self, stream: OutputStream, data: &[u8]) {
        match stream {
            OutputStream::Stdout => self.stdout.extend_from_slice(data),
            OutputStream::Stderr => self.stderr.extend_from_slice(data),
        }
    }
}

/// Cancels an in-flight operation from another thread (used when a sandbox is deleted while
/// a command runs in it, or a client goes away).
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    hooks: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        if !self.inner.cancelled.swap(true, Ordering::SeqCst) {
            let hooks = std::mem::take(&mut *self.inner.hooks.lock().unwrap_or_else(|e| e.into_inner()));
            for hook in hooks {
                hook();
            }
        }
    }

    /// Whether two handles refer to the same token.
    pub fn same_as(&self, other: &CancelToken) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Runs `hook` on cancellation (immediately if already cancelled), e.g. to shut down a
    /// socket a blocked read is waiting on.
    pub fn on_cancel(&self, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = self.inner.hooks.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_cancelled() {
            drop(hooks);
            hook();
        } else {
            hooks.push(Box::new(hook));
        }
    }
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken").field("cancelled", &self.is_cancelled()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        assert!(ExecRequest::new(Vec::<String>::new()).validate().unwrap_err().to_string().contains("argv"));
        let mut r = ExecRequest::new(["env"]);
        r.env = vec!["NOEQUALS".into()];
        assert!(r.validate().unwrap_err().to_string().contains("env"));
        assert!(ExecRequest::new(["a\0b"]).validate().is_err());
        ExecRequest::new(["true"]).validate().unwrap();
    }

    #[test]
    fn shell_codes_follow_convention() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::TimedOut.shell_code(), 124);
    }

    #[test]
    fn cancel_runs_hooks_once_even_if_registered_late() {
        let t = CancelToken::new();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        t.on_cancel(move || {
            h.fetch_add(1, Ordering::SeqCst);
        });
        t.cancel();
        t.cancel();
        let h = hits.clone();
        t.on_cancel(move || {
            h.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn requests_round_trip_with_millisecond_timeouts() {
        let mut r = ExecRequest::new(["sleep", "1"]);
        r.timeout = Some(Duration::from_millis(1500));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"timeout\":1500"), "{json}");
        assert_eq!(serde_json::from_str::<ExecRequest>(&json).unwrap(), r);
    }
}
