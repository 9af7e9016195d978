//! Where forkd keeps things on the host.

use std::path::PathBuf;

/// Environment variable overriding the state directory (images, sandboxes, `state.json`).
pub const STATE_DIR_ENV: &str = "FORKD_STATE_DIR";
/// Environment variable overriding the cache directory (kernel builds, downloaded packages).
pub const CACHE_DIR_ENV: &str = "FORKD_CACHE_DIR";

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
        let state =
            std::env::var_os(STATE_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/forkd"));
        let cache =
            std::env::var_os(CACHE_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/forkd"));
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
}
