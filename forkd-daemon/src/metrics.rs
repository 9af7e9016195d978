//! Prometheus metrics (text exposition format 0.0.4), kept by hand: a few counters, gauges and
//! one histogram do not need a metrics library.

use forkd_core::{Controller, ErrorCode, Event, EventKind, SandboxState};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the branch-pause histogram buckets.
const PAUSE_BUCKETS: [f64; 12] = [0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Every error code a client can see, so each series exists from the start.
const ERROR_CODES: [&str; 9] = [
    "not_found",
    "invalid_argument",
    "failed_precondition",
    "resource_exhausted",
    "unavailable",
    "deadline_exceeded",
    "cancelled",
    "internal",
    "unauthenticated",
];

#[derive(Default)]
pub struct Metrics {
    branches: AtomicU64,
    branch_children: AtomicU64,
    pause_buckets: [AtomicU64; PAUSE_BUCKETS.len()],
    pause_count: AtomicU64,
    /// Sum of pauses in nanoseconds.
    pause_sum_ns: AtomicU64,
    execs: AtomicU64,
    execs_in_flight: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// Counts an exec while it runs.
pub struct ExecGuard<'a>(&'a Metrics);

impl Drop for ExecGuard<'_> {
    fn drop(&mut self) {
        self.0.execs_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn on_event(&self, event: &Event) {
        if let EventKind::Branched { children, pause, .. } = &event.kind {
            self.branches.fetch_add(1, Ordering::Relaxed);
            self.branch_children.fetch_add(children.len() as u64, Ordering::Relaxed);
            let secs = pause.as_secs_f64();
            for (bound, count) in PAUSE_BUCKETS.iter().zip(&self.pause_buckets) {
                if secs <= *bound {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.pause_count.fetch_add(1, Ordering::Relaxed);
            self.pause_sum_ns.fetch_add(pause.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    pub fn error(&self, code: ErrorCode) {
        self.error_named(code.as_str());
    }

    pub fn error_named(&self, code: &'static str) {
        *self.errors.lock().unwrap_or_else(|e| e.into_inner()).entry(code).or_default() += 1;
    }

    pub fn exec_started(&self) -> ExecGuard<'_> {
        self.execs.fetch_add(1, Ordering::Relaxed);
        self.execs_in_flight.fetch_add(1, Ordering::Relaxed);
        ExecGuard(self)
    }

    /// The exposition text, with sandbox counts read from `controller` now.
    pub fn render(&self, controller: &Controller) -> String {
        let (mut running, mut exited) = (0u64, 0u64);
        for s in controller.list() {
            match s.state {
                SandboxState::Running => running += 1,
                SandboxState::Exited(_) => exited += 1,
            }
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(out, "# HELP forkd_sandboxes Sandboxes known to the daemon, by state.");
        let _ = writeln!(out, "# TYPE forkd_sandboxes gauge");
        let _ = writeln!(out, "forkd_sandboxes{{state=\"running\"}} {running}");
        let _ = writeln!(out, "forkd_sandboxes{{state=\"exited\"}} {exited}");
        let _ = writeln!(
            out,
            "# HELP forkd_branches_total BRANCH operations completed (creates from a template included)."
        );
        let _ = writeln!(out, "# TYPE forkd_branches_total counter");
        let _ = writeln!(out, "forkd_branches_total {}", load(&self.branches));
        let _ = writeln!(out, "# HELP forkd_branch_children_total Sandboxes created by BRANCH.");
        let _ = writeln!(out, "# TYPE forkd_branch_children_total counter");
        let _ = writeln!(out, "forkd_branch_children_total {}", load(&self.branch_children));
        let _ = writeln!(out, "# HELP forkd_branch_pause_seconds How long the source's vCPUs were stopped per BRANCH.");
        let _ = writeln!(out, "# TYPE forkd_branch_pause_seconds histogram");
        for (bound, count) in PAUSE_BUCKETS.iter().zip(&self.pause_buckets) {
            let _ = writeln!(out, "forkd_branch_pause_seconds_bucket{{le=\"{bound}\"}} {}", load(count));
        }
        let _ = writeln!(out, "forkd_branch_pause_seconds_bucket{{le=\"+Inf\"}} {}", load(&self.pause_count));
        let _ = writeln!(out, "forkd_branch_pause_seconds_sum {}", load(&self.pause_sum_ns) as f64 / 1e9);
        let _ = writeln!(out, "forkd_branch_pause_seconds_count {}", load(&self.pause_count));
        let _ = writeln!(out, "# HELP forkd_execs_total Commands started through the API.");
        let _ = writeln!(out, "# TYPE forkd_execs_total counter");
        let _ = writeln!(out, "forkd_execs_total {}", load(&self.execs));
        let _ = writeln!(out, "# HELP forkd_execs_in_flight Commands running now.");
        let _ = writeln!(out, "# TYPE forkd_execs_in_flight gauge");
        let _ = writeln!(out, "forkd_execs_in_flight {}", load(&self.execs_in_flight));
        let _ = writeln!(out, "# HELP forkd_errors_total Failed API calls, by error code.");
        let _ = writeln!(out, "# TYPE forkd_errors_total counter");
        let errors = self.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for code in ERROR_CODES {
            let _ = writeln!(out, "forkd_errors_total{{code=\"{code}\"}} {}", errors.get(code).copied().unwrap_or(0));
        }
        out
    }
}
