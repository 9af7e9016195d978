//! How VMM processes are told apart: the thread name and command line `ps` shows (a BRANCH
//! child names its own sandbox, not its source's), and the start time that makes a pid a
//! unique identity.

/// Names the calling thread (the VMM's main thread, which `ps` shows) after the sandbox
/// directory, e.g. `sb-22cd42715815`, so operators can tell VMM processes apart.
pub fn name_process(sandbox_dir: &std::path::Path) {
    let name = sandbox_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut bytes: Vec<u8> = name.bytes().filter(|b| *b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `bytes`.
    unsafe {
        libc::prctl(
            libc::PR_SET_NAME,
            bytes.as_ptr() as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
}

/// Points this process's command line (as `ps` and /proc/<pid>/cmdline show it) at `args`,
/// so a forked child names its own config instead of its source's. Rewrites the original
/// argument area when the new line fits (a child's paths are as long as its source's), else
/// points the kernel at a new buffer, which needs CAP_SYS_RESOURCE. Best effort.
pub fn set_cmdline(args: &[&str]) {
    let mut buf = Vec::new();
    for a in args {
        buf.extend_from_slice(a.as_bytes());
        buf.push(0);
    }
    if rewrite_in_place(&buf) {
        return;
    }
    // The kernel reads the arguments from this memory from now on: it must live forever.
    let buf: &'static mut [u8] = buf.leak();
    let start = buf.as_ptr() as libc::c_ulong;
    let end = start + buf.len() as libc::c_ulong;
    let set = |what: libc::c_int, value: libc::c_ulong| {
        // prctl is variadic: pass every argument at full register width, the kernel rejects
        // nonzero garbage in the unused ones.
        let (zero, what) = (0 as libc::c_ulong, what as libc::c_ulong);
        // SAFETY: PR_SET_MM with an address inside our own (leaked, permanent) allocation.
        unsafe { libc::prctl(libc::PR_SET_MM, what, value, zero, zero) == 0 }
    };
    // The kernel insists start < end after each call, so the order depends on where the new
    // buffer lies relative to the old one.
    let ok = (set(libc::PR_SET_MM_ARG_END, end) && set(libc::PR_SET_MM_ARG_START, start))
        || (set(libc::PR_SET_MM_ARG_START, start) && set(libc::PR_SET_MM_ARG_END, end));
    if !ok {
        tracing::debug!("could not rename the child's command line: {}", std::io::Error::last_os_error());
    }
}

extern "C" {
    /// glibc: `argv[0]` as the kernel laid it out, the start of the argument area.
    static program_invocation_name: *mut libc::c_char;
}

/// Overwrites the argument area the kernel set up at exec with `line` (NUL-separated), padding
/// with NULs; false if it does not fit.
fn rewrite_in_place(line: &[u8]) -> bool {
    // The area holds the arguments back to back, each NUL-terminated.
    let len: usize = std::env::args_os().map(|a| a.len() + 1).sum();
    if line.len() > len {
        return false;
    }
    // SAFETY: glibc sets program_invocation_name to argv[0] before main and never changes it.
    let start = unsafe { program_invocation_name }.cast::<u8>();
    if start.is_null() {
        return false;
    }
    // SAFETY: [start, start + len) is the argument area (argv[0] and the arguments that follow
    // it contiguously, as exec laid them out); std copied the arguments at startup, so nothing
    // reads this memory as Rust data.
    unsafe {
        std::ptr::copy_nonoverlapping(line.as_ptr(), start, line.len());
        std::ptr::write_bytes(start.add(line.len()), 0, len - line.len());
    }
    true
}

/// The start time of process `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`):
/// with the pid, a unique identity even after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ") ".
    let (_, rest) = text.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}
