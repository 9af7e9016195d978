//! Supervising VMM processes from the launcher side: spawn, identify (safe against pid reuse),
//! wait with a deadline, kill.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// Fields of `/proc/<pid>/stat` after the command name (state is the first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The process start time in clock ticks since boot: with the pid, a unique identity.
pub use forkd_vmm::identity::start_time;

/// True if `pid` is alive (not a zombie) and is the process that started at `start`.
pub fn is_alive(pid: u32, start: u64) -> bool {
    match stat_fields(pid) {
        Some(f) => f.first().map(String::as_str) != Some("Z") && f.get(19).and_then(|s| s.parse().ok()) == Some(start),
        None => false,
    }
}

/// True if `pid` is a VMM's snapshot writer, which names itself so in its command line
/// (`forkd-vmm snapshot-writer <snapshot id>`). Zombies have no command line.
pub fn is_snapshot_writer(pid: u32) -> bool {
    let marker: &[u8] = b"snapshot-writer";
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(marker.len()).any(|w| w == marker))
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).map(|f| f.first().map(String::as_str) == Some("Z")).unwrap_or(true)
}

/// A pidfd: waiting on it cannot be confused by pid reuse.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    // SAFETY: a non-negative return is a fresh fd that we now own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process exits or `timeout` passes; true if it exited.
pub fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let Some(fd) = pidfd_open(pid) else {
        return true; // already gone
    };
    let deadline = Instant::now() + timeout;
    loop {
        if is_zombie(pid) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // Short slices: a zombie child of ours stays "alive" to the pidfd until reaped by its
        // waiter thread, so re-check the state between polls.
        let slice = left.min(Duration::from_millis(20)).as_millis() as i32;
        // SAFETY: polling one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, slice.max(1)) };
        if rc > 0 {
            return true;
        }
    }
}

/// Sends `signal` if `pid` is still the process that started at `start`.
pub fn signal(pid: u32, start: u64, signal: libc::c_int) {
    if is_alive(pid, start) {
        // SAFETY: kill(2) on a pid we just verified is our VMM.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}

/// The last `max` bytes of a file, lossily decoded (for error messages and `forkd logs`).
pub fn tail(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    buf
}

/// The VMM's last error line (`forkd-vmm: error: ...` or `forkd-vmm: guest crashed: ...`).
pub fn last_error(vmm_log: &Path) -> Option<String> {
    let text = String::from_utf8_lossy(&tail(vmm_log, 16 * 1024)).to_string();
    text.lines().rev().find(|l| l.starts_with("forkd-vmm:")).map(|l| l.trim_start_matches("forkd-vmm: ").to_string())
}

/// Whether every vCPU thread of VMM `pid` is asleep (its guest is halted, waiting for an
/// interrupt); `None` if the VMM or its vCPU threads cannot be read.
pub fn vcpus_idle(pid: u32) -> Option<bool> {
    let mut seen = false;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        // The VMM names its vCPU threads `vcpu<N>` (vcpu.rs).
        if !head.contains("(vcpu") {
            continue;
        }
        seen = true;
        if !rest.starts_with('S') {
            return Some(false);
        }
    }
    seen.then_some(true)
}

/// Memory figures from `/proc/<pid>/smaps_rollup`, in KiB: (rss, pss, private dirty).
pub fn smaps_rollup(pid: u32) -> std::io::Result<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("Rss:"), field("Pss:"), field("Private_Dirty:")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_processes_by_pid_and_start_time() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let child_start = start_time(child.id()).unwrap();
        signal(child.id(), child_start + 1, libc::SIGKILL); // wrong identity: no effect
        assert!(is_alive(child.id(), child_start));
        signal(child.id(), child_start, libc::SIGKILL);
        let _ = child.wait();
        assert!(wait_exit(child.id(), Duration::from_secs(1)));
        assert!(!is_alive(child.id(), child_start));
    }

    #[test]
    fn last_error_finds_the_vmm_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(&log, "INFO booting\nforkd-vmm: error: guest memory too small\n").unwrap();
        assert_eq!(last_error(&log).as_deref(), Some("error: guest memory too small"));
        assert_eq!(tail(&log, 6), b"small\n");
    }

    #[test]
    fn a_process_without_vcpu_threads_has_no_vcpu_state() {
        assert_eq!(vcpus_idle(std::process::id()), None);
        assert_eq!(vcpus_idle(u32::MAX), None);
    }

    #[test]
    fn reads_own_memory_figures() {
        let (rss, pss, _) = smaps_rollup(std::process::id()).unwrap();
        assert!(rss > 0 && pss > 0);
    }
}
