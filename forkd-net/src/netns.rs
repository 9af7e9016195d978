//! Named network namespaces, laid out like `ip netns`: `/run/netns/NAME` is a bind mount of
//! the namespace, so `ip netns exec NAME ...` and `ip -n NAME ...` work on ours too.
//!
//! Work inside a namespace runs on a short-lived thread that `setns`es into it: namespaces
//! are per thread, so the calling thread (and the rest of the process) never moves.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::NetError;

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so namespace mounts
/// propagate to every mount namespace that can see it.
fn prepare_dir() -> io::Result<()> {
    std::fs::create_dir_all(NETNS_DIR)?;
    let dir = cstring(Path::new(NETNS_DIR))?;
    let none = c"none";
    // SAFETY: NUL-terminated strings; null data is allowed.
    let shared = || unsafe {
        libc::mount(none.as_ptr(), dir.as_ptr(), std::ptr::null(), libc::MS_SHARED | libc::MS_REC, std::ptr::null())
    };
    if shared() == 0 {
        return Ok(());
    }
    if io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(io::Error::last_os_error());
    }
    // Not a mount point yet: bind it onto itself, then retry.
    // SAFETY: NUL-terminated strings; null fstype/data are allowed for a bind mount.
    check(unsafe {
        libc::mount(dir.as_ptr(), dir.as_ptr(), none.as_ptr(), libc::MS_BIND | libc::MS_REC, std::ptr::null())
    })?;
    check(shared())
}

/// Creates the named namespace `name`. Fails with `AlreadyExists` if it exists.
pub fn create(name: &str) -> Result<PathBuf, NetError> {
    let path = netns_path(name);
    let io_err = |what: &str, source: io::Error| NetError::Io { what: format!("{what} {}", path.display()), source };
    prepare_dir().map_err(|e| io_err("preparing", e))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)
        .map_err(|e| io_err("creating", e))?;
    let target = cstring(&path).map_err(|e| io_err("naming", e))?;
    let made = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<()> {
            // SAFETY: unshare only affects this (short-lived) thread's network namespace.
            check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
            let source = c"/proc/thread-self/ns/net";
            // SAFETY: NUL-terminated strings; a bind mount takes no fstype or data.
            check(unsafe {
                libc::mount(source.as_ptr(), target.as_ptr(), c"none".as_ptr(), libc::MS_BIND, std::ptr::null())
            })
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    });
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(io_err("creating network namespace", e));
    }
    Ok(path)
}

/// Removes the named namespace; `Ok(false)` if it did not exist. The namespace itself lives
/// on while any process or fd (e.g. a VMM's tap) still holds it.
pub fn delete(name: &str) -> Result<bool, NetError> {
    let path = netns_path(name);
    let c = cstring(&path).map_err(|source| NetError::Io { what: format!("naming {}", path.display()), source })?;
    // SAFETY: NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOENT) => return Ok(false),
            // Not mounted (a half-created entry): just remove the file.
            Some(libc::EINVAL) => {}
            _ => return Err(NetError::Io { what: format!("unmounting {}", path.display()), source: err }),
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(NetError::Io { what: format!("removing {}", path.display()), source }),
    }
}

/// Names under `/run/netns` that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|name| name.starts_with(prefix)).collect()
}

/// Runs `f` on a thread that has joined the network namespace at `path`.
pub fn run_in<R: Send>(path: &Path, f: impl FnOnce() -> R + Send) -> Result<R, NetError> {
    let ns = File::open(path).map_err(|source| NetError::Io { what: format!("opening {}", path.display()), source })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a namespace fd we own; it only moves this thread.
            check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })
                .map_err(|source| NetError::Io { what: format!("entering {}", path.display()), source })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::Io { what: "namespace thread".into(), source: io::Error::other("panicked") }))
    })
}
