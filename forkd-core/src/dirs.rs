//! Where forkd keeps things on the host: the state directory (images, sandboxes, `state.json`),
//! the cache directory (kernel builds), and the daemon's socket. Every frontend and backend
//! finds its paths here.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Environment variable overriding the state directory (images, sandboxes, `state.json`).
pub const STATE_DIR_ENV: &str = "FORKD_STATE_DIR";
/// Environment variable overriding the cache directory (kernel builds, downloaded packages).
pub const CACHE_DIR_ENV: &str = "FORKD_CACHE_DIR";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/forkd";
/// Default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/forkd";
/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/forkd/forkd.sock";
/// Environment variable clients (and the daemon) read the socket path from.
pub const SOCKET_ENV: &str = "FORKD_SOCKET";

/// The host directories forkd uses. Cheap to clone; nothing is created until asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    /// Durable state: images, sandboxes, daemon state. Default `/var/lib/forkd`.
    pub state: PathBuf,
    /// Rebuildable artifacts: kernel builds keyed by hash. Default `/var/cache/forkd`.
    pub cache: PathBuf,
}

impl Dirs {
    /// Directories from `FORKD_STATE_DIR` / `FORKD_CACHE_DIR`, falling back to the defaults.
    pub fn from_env() -> Self {
        let state = std::env::var_os(STATE_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let cache = std::env::var_os(CACHE_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| DEFAULT_CACHE_DIR.into());
        Self { state, cache }
    }

    /// Root filesystem images, one directory per image name.
    pub fn images(&self) -> PathBuf {
        self.state.join("images")
    }

    /// Kernel builds, one directory per build hash.
    pub fn kernels(&self) -> PathBuf {
        self.cache.join("kernels")
    }

    /// Per-sandbox runtime directories (sockets, console log, disk layers).
    pub fn sandboxes(&self) -> PathBuf {
        self.state.join("sandboxes")
    }

    /// The lock a daemon holds on the state directory while it serves it.
    pub fn daemon_lock(&self) -> PathBuf {
        self.state.join("daemon.lock")
    }

    /// The pid of the daemon serving this state directory, if one runs (it holds
    /// [`Dirs::daemon_lock`]). Lets a client refuse to open the state directory behind a
    /// running daemon's back.
    pub fn daemon_pid(&self) -> Option<u32> {
        daemon_pid(&self.daemon_lock())
    }
}

fn daemon_pid(lock: &Path) -> Option<u32> {
    let file = File::open(lock).ok()?;
    // SAFETY: flock on a valid fd we own; a shared lock conflicts only with the daemon's.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        // SAFETY: as above; releases the probe's lock at once.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        return None;
    }
    Some(std::fs::read_to_string(lock).ok()?.trim().parse().unwrap_or(0))
}

/// The daemon socket named by `FORKD_SOCKET`, if set.
pub fn socket_from_env() -> Option<PathBuf> {
    std::env::var_os(SOCKET_ENV).map(PathBuf::from)
}

/// `FORKD_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn default_socket() -> PathBuf {
    socket_from_env().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_daemon_without_a_held_lock() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = Dirs { state: dir.path().to_path_buf(), cache: dir.path().join("cache") };
        assert_eq!(dirs.daemon_pid(), None);
        std::fs::write(dirs.daemon_lock(), "42\n").unwrap();
        assert_eq!(dirs.daemon_pid(), None, "an unlocked file is a daemon that died");
        let held = File::open(dirs.daemon_lock()).unwrap();
        // SAFETY: flock on a valid fd we own.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        assert_eq!(dirs.daemon_pid(), Some(42));
    }
}
