//! Turning SIGINT/SIGTERM/SIGHUP into a cancellation, so `forkd run` always tears its sandbox
//! down. The signals are blocked in every thread and received by one watcher with sigwait.

use forkd_core::CancelToken;
use std::sync::atomic::{AtomicI32, Ordering};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in this thread (call first thing in `main`, before any
/// thread exists, so every thread inherits the mask) and starts the watcher.
pub fn install(token: CancelToken) {
    let set = termination_set();
    // SAFETY: changing this thread's signal mask with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: waiting on a valid, blocked set; `sig` receives the signal number.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
                // Second signal: the user insists; leave now.
                std::process::exit(128 + sig);
            }
            token.cancel();
        }
    });
}

/// The signal that cancelled us, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
