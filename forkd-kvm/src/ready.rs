//! Bringing BRANCH children to a ready guest agent with fresh entropy, a few at a time.

use crate::agent;
use crate::runtime::VmmRuntime;
use forkd_core::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Waits for a fresh BRANCH child's (or a restored sandbox's) agent and reseeds the guest's
/// RNG; `set_clock` also sets its wall clock (a restored guest's resumes where it stopped).
pub fn child_ready(rt: &VmmRuntime, timeout: Duration, set_clock: bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    // Back off between attempts: every failed connection costs the guest (emulated, on some
    // hosts) kernel work, and a hundred children polling every few ms starve each other.
    let mut pause = Duration::from_millis(5);
    loop {
        if !rt.alive() {
            return Err(Error::Unavailable(format!(
                "sandbox {} failed to start: {}",
                rt.dir.display(),
                rt.failure_report()
            )));
        }
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match agent::reseed(&rt.vsock_socket, remaining.min(Duration::from_secs(10)), remaining, set_clock) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::DeadlineExceeded(format!("branch child {} did not answer: {e}", rt.dir.display())))
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Brings every child to a ready, reseeded agent, a few at a time; the first error if any
/// failed. The children's guests only work while being made ready; where guest kernel code is
/// emulated, a hundred of them working at once each get host time slices so short that timer
/// interrupts eat most of every slice, and the whole batch takes far longer than working
/// through it a few at a time.
pub fn all_children_ready(runtimes: &[VmmRuntime], timeout: Duration) -> Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get() * 2).min(runtimes.len().max(1));
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(rt) = runtimes.get(i) else { break };
                if let Err(e) = child_ready(rt, timeout, false) {
                    first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
