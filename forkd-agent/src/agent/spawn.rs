//! Minimal process spawn: `clone(CLONE_VM | CLONE_VFORK)` + `execve`, the technique glibc's
//! `posix_spawn` uses, minus its per-signal loop. glibc's child calls `rt_sigaction` about
//! 120 times (query and reset every signal) and the parent calls `getrlimit` once per file
//! action; in a guest where each syscall costs tens to hundreds of µs that is several ms per
//! exec. Our child makes 7-8 syscalls: reset SIGPIPE, setpgid, 3×dup2, [chdir], unmask,
//! execve.
//!
//! The child shares our memory and runs until it execs or exits while the calling thread is
//! suspended (CLONE_VFORK), so it must only make raw syscalls on data prepared beforehand:
//! no allocation, no locks, no panics.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Everything the child needs, prepared by the parent.
pub struct SpawnSpec<'a> {
    pub prog: &'a CStr,
    pub argv: &'a [CString],
    pub env: &'a [CString],
    pub cwd: Option<&'a CStr>,
}

/// What the child's stdin is.
pub enum Stdin<'a> {
    /// A new pipe; the parent gets the write end.
    Pipe,
    /// An existing fd (e.g. a shared /dev/null), dup'ed onto 0.
    Fd(&'a OwnedFd),
}

pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
}

pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid 2-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(r), File::from(w)))
}

/// Arguments for `child_main`; lives on the parent's stack, which stays valid because the
/// parent thread is suspended until the child execs or exits.
#[repr(C)]
struct ChildArgs {
    prog: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Null for "stay in the agent's cwd".
    cwd: *const libc::c_char,
    /// Fds to install as 0, 1, 2 and 3 (-1: leave fd 3 alone).
    fds: [RawFd; 4],
    /// The child writes errno here if it fails before execve.
    err: i32,
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the parent's ChildArgs (see above). Only async-signal-safe
    // syscall wrappers are called, on pointers the parent prepared.
    unsafe {
        let a = arg.cast::<ChildArgs>();
        // An ignored SIGPIPE (Rust's default) would survive execve. Caught signals (std's
        // SIGSEGV/SIGBUS stack-overflow handlers) are reset by execve itself, and they only
        // fire on faults, which this code does not cause.
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGPIPE, &sa, std::ptr::null_mut());
        // Own process group, so timeouts and disconnects can kill the whole tree.
        if libc::setpgid(0, 0) != 0 {
            return fail(a);
        }
        for target in 0..4 {
            let fd = (*a).fds[target as usize];
            if fd >= 0 && libc::dup2(fd, target) < 0 {
                return fail(a);
            }
        }
        if !(*a).cwd.is_null() && libc::chdir((*a).cwd) != 0 {
            return fail(a);
        }
        // The parent blocked all signals around clone; the program must start unmasked.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve((*a).prog, (*a).argv, (*a).envp);
        fail(a)
    }
}

/// Records errno for the parent and exits.
///
/// # Safety
/// `a` must point at the live ChildArgs.
unsafe fn fail(a: *mut ChildArgs) -> libc::c_int {
    // SAFETY: per the contract; volatile so the store is not elided before _exit.
    unsafe {
        std::ptr::write_volatile(&mut (*a).err, *libc::__errno_location());
        libc::_exit(127)
    }
}

fn ptr_array(items: &[CString]) -> Vec<*const libc::c_char> {
    items.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

/// Child stack size: the child only runs a handful of libc wrappers.
const CHILD_STACK: usize = 32 << 10;

/// Starts `spec` with stdout/stderr on new pipes. Returns once the child has exec'ed.
/// The caller must arrange for the child's exit status to be reaped (the reaper thread).
pub fn spawn(spec: &SpawnSpec<'_>, stdin: Stdin<'_>) -> io::Result<Spawned> {
    spawn_with_extra(spec, stdin, None)
}

/// Like [`spawn`], with `extra` installed as the child's fd 3 (a code context's reply pipe).
pub fn spawn_with_extra(spec: &SpawnSpec<'_>, stdin: Stdin<'_>, extra: Option<&File>) -> io::Result<Spawned> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (in_parent, in_child_owned) = match stdin {
        Stdin::Pipe => {
            let (r, w) = pipe()?;
            (Some(w), Some(r))
        }
        Stdin::Fd(_) => (None, None),
    };
    let in_fd = match (&in_child_owned, &stdin) {
        (Some(r), _) => r.as_raw_fd(),
        (None, Stdin::Fd(fd)) => fd.as_raw_fd(),
        (None, Stdin::Pipe) => unreachable!("pipe stdin always has a child end"),
    };

    let argv = ptr_array(spec.argv);
    let envp = ptr_array(spec.env);
    let mut args = ChildArgs {
        prog: spec.prog.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: spec.cwd.map_or(std::ptr::null(), |c| c.as_ptr()),
        fds: [in_fd, out_w.as_raw_fd(), err_w.as_raw_fd(), extra.map_or(-1, |f| f.as_raw_fd())],
        err: 0,
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down; the top must be 16-byte aligned.
    let top = ((stack.as_mut_ptr() as usize + CHILD_STACK) & !15) as *mut libc::c_void;

    // SAFETY: sigset manipulation on local values; pthread_sigmask affects only this thread.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `child_main` only touches `args` and the prepared arrays, all of which outlive
    // the child's pre-exec phase because CLONE_VFORK suspends us until it execs or exits.
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast(),
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores this thread's previous mask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(clone_err);
    }
    // SAFETY: the child has exec'ed or exited, so nothing writes `args.err` concurrently.
    let err = unsafe { std::ptr::read_volatile(&args.err) };
    if err != 0 {
        // The child exited with 127; the reaper collects it.
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(Spawned { pid: pid as u32, stdin: in_parent, stdout: out_r, stderr: err_r })
}
