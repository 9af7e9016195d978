//! forkd-agent: the guest agent. Runs as PID 1 in a forkd microVM (`init=/sbin/forkd-agent`)
//! and serves the protocol in `forkd_agent::proto` on vsock port 1024; with
//! `--listen unix:PATH` it also runs as an ordinary process on the host (tests).
//!
//! `no_main`: std's runtime init costs ~15 guest syscalls (it reads /proc/self/maps to
//! find the main thread's guard page, installs sigaltstacks and SIGSEGV/SIGBUS handlers
//! on every thread). We do the two parts that matter ourselves: ignore SIGPIPE and make sure
//! fds 0-2 are open. Arguments still work (glibc hands them to std at load time).
#![cfg_attr(not(test), no_main)]
// The unit-test harness brings its own main, leaving the real entry path unused.
#![cfg_attr(test, allow(dead_code))]

mod agent;

use std::sync::Arc;
use std::time::Duration;

use agent::{log_error, Ctx, ListenAddr, Listener};

const USAGE: &str = "usage: forkd-agent [--listen vsock:PORT | --listen unix:PATH]
Serves the forkd agent protocol (default --listen vsock:1024). As PID 1 it first mounts
/proc, /sys, /dev, /dev/pts, /dev/shm, /tmp, /run and sets the hostname.";

/// Parses arguments; `Err` carries the message to print.
fn parse_args() -> Result<ListenAddr, String> {
    let mut listen = ListenAddr::Vsock(forkd_agent::proto::DEFAULT_PORT);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                let v = args.next().ok_or("--listen needs a value")?;
                listen = ListenAddr::parse(&v)?;
            }
            s if s.starts_with("--listen=") => listen = ListenAddr::parse(&s[9..])?,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            "-V" | "--version" => {
                return Err(format!("forkd-agent {}", env!("CARGO_PKG_VERSION")));
            }
            // The kernel passes unknown cmdline words to init as arguments: ignore them.
            _ => {}
        }
    }
    Ok(listen)
}

/// PID 1 must never exit (the kernel would panic): report and sleep forever.
fn halt(msg: &str) -> ! {
    log_error(msg);
    loop {
        // SAFETY: pause(2) just sleeps until a signal arrives.
        unsafe { libc::pause() };
    }
}

/// Keeps glibc malloc from returning memory to the kernel and taking it back on every
/// large buffer (mmap/munmap/brk churn and fresh page faults, all guest kernel work).
/// Costs no syscall.
fn tune_malloc() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 4 << 20);
        // One arena: per-thread arenas each reserve 64 MiB with mmap on first use.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Ignores SIGPIPE (a peer closing its socket must give EPIPE, not kill PID 1).
fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Makes sure fds 0-2 are open, so no socket or pipe of ours ever lands on them (a child's
/// `dup2(fd, 1)` would then be a no-op that keeps O_CLOEXEC). One poll when all is well.
fn sanitize_std_fds() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd { fd, events: 0, revents: 0 });
    // SAFETY: valid array of 3 pollfds.
    if unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) } < 0 {
        return;
    }
    for p in fds {
        if p.revents & libc::POLLNVAL != 0 {
            // Lowest free fd: fills exactly this hole. Console first, so errors are seen.
            // SAFETY: NUL-terminated static paths.
            unsafe {
                if libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) < 0 {
                    libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                }
            }
        }
    }
}

/// C entry point (see the crate docs for why not `fn main`).
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    tune_malloc();
    ignore_sigpipe();
    let pid1 = std::process::id() == 1;
    if !pid1 {
        sanitize_std_fds();
    }
    run(pid1)
}

fn run(pid1: bool) -> ! {
    let listen = match parse_args() {
        Ok(l) => l,
        Err(msg) if !pid1 => {
            if msg.starts_with("usage") || msg.starts_with("forkd-agent ") {
                println!("{msg}");
                std::process::exit(0);
            }
            log_error(&msg);
            std::process::exit(2);
        }
        Err(msg) => {
            log_error(&format!("{msg}; using vsock:1024"));
            ListenAddr::Vsock(forkd_agent::proto::DEFAULT_PORT)
        }
    };

    if pid1 {
        // Before any thread exists, so no one reads the environment concurrently.
        std::env::set_var("PATH", agent::exec::DEFAULT_ENV[0].1);
        std::env::set_var("HOME", "/root");
        agent::init::setup();
        // After mounting /dev, so /dev/console and /dev/null exist.
        sanitize_std_fds();
    }

    let reaper = match agent::reaper::Reaper::start() {
        Ok(r) => r,
        Err(e) if pid1 => halt(&format!("cannot start the reaper thread: {e}")),
        Err(e) => {
            log_error(&format!("cannot start the reaper thread: {e}"));
            std::process::exit(1);
        }
    };
    let ctx = Arc::new(Ctx::new(reaper));

    let mut reported = false;
    loop {
        let listener = match Listener::bind(&listen) {
            Ok(l) => l,
            Err(e) if !pid1 => {
                log_error(&format!("cannot listen on {listen:?}: {e}"));
                std::process::exit(1);
            }
            Err(e) => {
                // As PID 1 keep trying: the vsock transport may still be coming up.
                if !reported {
                    log_error(&format!("cannot listen on {listen:?}: {e}; retrying every second"));
                    reported = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let ctx2 = Arc::clone(&ctx);
        // `serve` only returns by panicking; as PID 1 we must survive that too.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || agent::serve(listener, ctx2)));
        if res.is_err() && !pid1 {
            std::process::exit(101);
        }
        log_error("accept loop panicked; restarting it");
    }
}
