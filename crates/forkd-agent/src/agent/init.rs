//! PID 1 duties at boot: mounts, hostname, loopback. Each step is one or two syscalls and
//! failures are tolerated (logged once), because a half-set-up guest that still answers
//! the host is far more useful than a kernel panic.

use std::ffi::CStr;
use std::io;

use super::log_error;

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: Option<&'static CStr>,
    /// Directory mode if the target has to be created.
    dir_mode: libc::mode_t,
}

const MOUNTS: &[Mount] = &[
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: NOSUID | NODEV | NOEXEC,
        data: None,
        dir_mode: 0o555,
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: NOSUID | NODEV | NOEXEC,
        data: None,
        dir_mode: 0o555,
    },
    Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: NOSUID,
        data: Some(c"mode=0755"),
        dir_mode: 0o755,
    },
    Mount {
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: NOSUID | NOEXEC,
        data: Some(c"gid=5,mode=620,ptmxmode=666"),
        dir_mode: 0o755,
    },
    // POSIX shared memory and semaphores (Python multiprocessing) live here.
    Mount {
        source: c"tmpfs",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: Some(c"mode=1777"),
        dir_mode: 0o1777,
    },
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: Some(c"mode=1777"),
        dir_mode: 0o1777,
    },
    Mount {
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: Some(c"mode=0755"),
        dir_mode: 0o755,
    },
];

/// Symlinks udev would normally create; bash process substitution needs /dev/fd.
const DEV_LINKS: &[(&CStr, &CStr)] = &[
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
];

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn mount(m: &Mount) -> Result<(), i32> {
    let data = m.data.map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are NUL-terminated static strings (or null for data).
    let rc = unsafe { libc::mount(m.source.as_ptr(), m.target.as_ptr(), m.fstype.as_ptr(), m.flags, data) };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Mounts the API filesystems. Missing mount points are created only on demand (ENOENT),
/// so a proper image costs exactly one syscall per mount.
pub fn mount_all() {
    for m in MOUNTS {
        let mut res = mount(m);
        if res == Err(libc::ENOENT) {
            // SAFETY: NUL-terminated static path.
            unsafe { libc::mkdir(m.target.as_ptr(), m.dir_mode) };
            res = mount(m);
        }
        match res {
            // EBUSY: already mounted (e.g. the kernel's devtmpfs automount).
            Ok(()) | Err(libc::EBUSY) => {}
            Err(e) => log_error(&format!(
                "mounting {} on {} failed: {}",
                m.fstype.to_string_lossy(),
                m.target.to_string_lossy(),
                io::Error::from_raw_os_error(e)
            )),
        }
    }
    for (target, link) in DEV_LINKS {
        // SAFETY: NUL-terminated static paths. EEXIST is fine.
        unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
    }
}

pub fn set_hostname(name: &str) {
    // SAFETY: pointer and length describe `name`.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        log_error(&format!("sethostname failed: {}", io::Error::last_os_error()));
    }
}

/// Brings up `lo` so programs can talk to localhost. Silent if networking is compiled out.
pub fn loopback_up() {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: ifreq is plain old data; zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
    // SAFETY: SIOCSIFFLAGS with a valid ifreq; then close the fd we opened.
    unsafe {
        libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr);
        libc::close(fd);
    }
}

/// Everything PID 1 does before serving.
pub fn setup() {
    mount_all();
    set_hostname("forkd");
    loopback_up();
}
