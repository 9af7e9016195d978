//! The VMM's seccomp allow-list and the SIGSYS reporter.
//!
//! The list covers what the VMM does after setup: the event loop (epoll, eventfds, Unix
//! sockets for control and vsock), vCPU threads (KVM ioctls, signals for kicks), virtio
//! devices (file I/O on disk layers, tap reads and writes), and BRANCH: `fork` (clone), the
//! child re-opening `/dev/kvm` and creating a new VM (openat + ioctl), hard-linking disk
//! layers, renaming its command line (prctl), binding its own sockets, running its guest at idle
//! priority while its siblings are still being built (sched_setscheduler). `socket(2)` is limited
//! to `AF_UNIX`. Not on the list, among others: execve/execveat, ptrace, process_vm_*, mount,
//! pivot_root, unshare, setns, bpf, perf_event_open, module loading, kexec, keyctl, reboot.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::JailError;

/// Exit status of a VMM killed for a seccomp violation (128 + SIGSYS).
pub const SECCOMP_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// System calls the VMM may make (x86_64).
pub fn allowed_syscalls() -> Vec<(i64, &'static str)> {
    macro_rules! list {
        ($($name:ident),* $(,)?) => { vec![$((libc::$name, &stringify!($name)[4..])),*] };
    }
    list![
        // memory
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_msync,
        SYS_mincore,
        SYS_membarrier,
        // files and fds
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_lseek,
        SYS_open,
        SYS_openat,
        SYS_close,
        SYS_close_range,
        SYS_fstat,
        SYS_stat,
        SYS_lstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_statfs,
        SYS_fstatfs,
        SYS_access,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_readlink,
        SYS_readlinkat,
        SYS_getdents64,
        SYS_getcwd,
        SYS_fcntl,
        SYS_flock,
        SYS_dup,
        SYS_dup2,
        SYS_dup3,
        SYS_pipe,
        SYS_pipe2,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_copy_file_range,
        SYS_sendfile,
        SYS_unlink,
        SYS_unlinkat,
        SYS_link,
        SYS_linkat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_mkdir,
        SYS_mkdirat,
        SYS_fchmod,
        SYS_umask,
        SYS_ioctl,
        // the snapshot writer's O_DIRECT writes (it falls back to pwrite without io_uring)
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        // event loop
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_eventfd2,
        SYS_poll,
        SYS_ppoll,
        SYS_select,
        SYS_pselect6,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        // sockets (socket itself is AF_UNIX-only, below)
        SYS_socketpair,
        SYS_bind,
        SYS_listen,
        SYS_accept,
        SYS_accept4,
        SYS_connect,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_shutdown,
        SYS_getsockopt,
        SYS_setsockopt,
        SYS_getsockname,
        SYS_getpeername,
        // threads, processes, signals (fork for BRANCH is clone)
        SYS_clone,
        SYS_clone3,
        SYS_fork,
        SYS_vfork,
        SYS_exit,
        SYS_exit_group,
        SYS_wait4,
        SYS_waitid,
        SYS_kill,
        SYS_tgkill,
        SYS_tkill,
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_rt_sigtimedwait,
        SYS_sigaltstack,
        SYS_futex,
        SYS_set_robust_list,
        SYS_get_robust_list,
        SYS_set_tid_address,
        SYS_rseq,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_sched_setaffinity,
        SYS_getpid,
        SYS_getppid,
        SYS_gettid,
        SYS_setsid,
        SYS_getpgid,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_getresuid,
        SYS_getresgid,
        SYS_capget,
        SYS_prctl,
        SYS_arch_prctl,
        SYS_prlimit64,
        SYS_getrlimit,
        SYS_getrusage,
        SYS_getpriority,
        SYS_sched_getscheduler,
        SYS_sched_getparam,
        SYS_pidfd_open,
        SYS_restart_syscall,
        // time and randomness
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_gettimeofday,
        SYS_time,
        SYS_times,
        SYS_getrandom,
        SYS_uname,
        SYS_sysinfo,
    ]
}

fn filter() -> Result<BpfProgram, JailError> {
    let err = |e: seccompiler::BackendError| JailError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed_syscalls().into_iter().map(|(nr, _)| (nr, vec![])).collect();
    let unix_only =
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64).map_err(err)?;
    rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![unix_only]).map_err(err)?]);
    // The VMM keeps CAP_SYS_NICE to bring BRANCH children's guests back from SCHED_IDLE: allow
    // normal and idle scheduling and nice 0..19 only, so it can never raise a priority above
    // normal. (A negative nice is a large unsigned 32-bit value, so `<= 19` refuses it.)
    let policy_is = |policy: i32| -> Result<SeccompRule, JailError> {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, policy as u64).map_err(err)?;
        SeccompRule::new(vec![cond]).map_err(err)
    };
    rules.insert(libc::SYS_sched_setscheduler, vec![policy_is(libc::SCHED_OTHER)?, policy_is(libc::SCHED_IDLE)?]);
    let nice_not_negative = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Le, 19).map_err(err)?;
    rules.insert(libc::SYS_setpriority, vec![SeccompRule::new(vec![nice_not_negative]).map_err(err)?]);
    let arch = seccompiler::TargetArch::x86_64;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch).map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// Installs the filter on every thread of the process (TSYNC).
pub(crate) fn install() -> Result<(), JailError> {
    let program = filter()?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| JailError::Seccomp(e.to_string()))
}

/// Formats `n` in decimal into `out`; returns the used tail. Async-signal-safe.
fn decimal(mut n: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &out[i..]
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo for SIGSYS (SYS_SECCOMP): si_call_addr (ptr), si_syscall (int), si_arch (uint)
    // follow the three leading ints and padding, at byte offset 16.
    let nr = if info.is_null() {
        -1i64
    } else {
        // SAFETY: the kernel passes a valid siginfo_t; for SIGSYS the union holds
        // `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }` at offset 16.
        unsafe { i64::from(*(info.cast::<u8>().add(16 + std::mem::size_of::<usize>()).cast::<libc::c_int>())) }
    };
    let mut digits = [0u8; 20];
    let prefix = b"forkd-vmm: error: killed by seccomp: syscall ";
    let suffix = b" is not allowed\n";
    let number: &[u8] = if nr < 0 { b"?" } else { decimal(nr as u64, &mut digits) };
    for part in [&prefix[..], number, &suffix[..]] {
        // SAFETY: write(2) to stderr from a buffer we own; async-signal-safe.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: exit_group is async-signal-safe and ends every thread of this process.
    unsafe { libc::syscall(libc::SYS_exit_group, SECCOMP_EXIT_CODE) };
}

/// Installs the SIGSYS handler that reports a seccomp violation and ends the process.
pub fn install_sigsys_reporter() -> Result<(), JailError> {
    // SAFETY: sigaction is plain old data; all-zero is valid before we fill it in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installing a handler that only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(crate::last("sigaction(SIGSYS)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_excludes_dangerous_calls() {
        let program = filter().unwrap();
        assert!(!program.is_empty());
        let allowed: Vec<i64> = allowed_syscalls().into_iter().map(|(nr, _)| nr).collect();
        for nr in
            [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_mount, libc::SYS_setns, libc::SYS_unshare, libc::SYS_bpf]
        {
            assert!(!allowed.contains(&nr), "{nr} must not be allowed");
        }
        assert!(allowed.contains(&libc::SYS_clone) && allowed.contains(&libc::SYS_ioctl));
    }

    #[test]
    fn decimal_formats() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(103, &mut buf), b"103");
    }
}
