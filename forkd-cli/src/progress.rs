//! Renders library progress with indicatif on stderr (plain lines when stderr is not a TTY).

use forkd_guest::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

pub struct Bar {
    bar: ProgressBar,
    verbose: bool,
    tty: bool,
}

impl Bar {
    pub fn new(verbose: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(
            None,
            if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
        );
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg} {wide_bar} {pos}/{len}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar, verbose, tty }
    }

    /// A spinner with a message, for waits without a known length.
    pub fn spinner(message: &str) -> ProgressBar {
        let tty = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(
            None,
            if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
        );
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(message.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        if !tty {
            eprintln!("{message}");
        }
        bar
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn stage(&self, message: &str) {
        self.bar.set_message(message.to_string());
        self.bar.set_length(0);
        self.bar.set_position(0);
        if !self.tty {
            eprintln!("{message}");
        }
    }

    fn advance(&self, done: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
    }

    fn log_line(&self, line: &str) {
        if self.verbose {
            self.bar.suspend(|| eprintln!("{line}"));
        }
    }
}
