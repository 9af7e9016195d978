//! tap devices through `/dev/net/tun`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::{netns, NetError};

/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 203, int)`
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
pub const IFF_TAP: libc::c_short = 0x0002;
pub const IFF_NO_PI: libc::c_short = 0x1000;
pub const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Flags the VMM's virtio-net device expects: raw Ethernet frames, no packet info header.
pub const DEFAULT_FLAGS: libc::c_short = IFF_TAP | IFF_NO_PI;

/// Opens (creating it if absent) the tap `name` in the calling thread's network namespace,
/// non-blocking and close-on-exec.
pub fn open(name: &str, flags: libc::c_short) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    // SAFETY: NUL-terminated path; the flags are plain open(2) flags.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads an ifreq, which `ifr` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Marks the tap behind `fd` persistent, so it outlives the fd (the VMM attaches later).
pub fn set_persist(fd: &OwnedFd, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, libc::c_ulong::from(persist)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the tap `name` that lives in the network namespace at `netns_path`. The returned fd
/// works from any namespace: the calling thread is not moved (a helper thread `setns`es).
/// Needs CAP_SYS_ADMIN (setns) and CAP_NET_ADMIN (attach to a tap we do not own).
pub fn open_in(netns_path: &Path, name: &str, flags: libc::c_short) -> Result<OwnedFd, NetError> {
    netns::run_in(netns_path, || open(name, flags))?
        .map_err(|source| NetError::Io { what: format!("opening tap {name} in {}", netns_path.display()), source })
}
