//! Progress reporting for long-running builds. Libraries report; frontends render.

/// Receives progress from a long-running operation (kernel build, image build).
pub trait Progress: Send + Sync {
    /// A new step began, e.g. "unpacking linux-source".
    fn stage(&self, message: &str);
    /// Determinate progress within the current step.
    fn advance(&self, done: u64, total: u64);
    /// A raw line of tool output; frontends may show it in verbose mode.
    fn log_line(&self, _line: &str) {}
}

/// Discards all progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _message: &str) {}
    fn advance(&self, _done: u64, _total: u64) {}
}
