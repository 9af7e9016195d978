//! `verified.json`: the record that `memory.bin`, as identified by its device, inode, size,
//! mtime and ctime, was checked page by page against `memory.pages` of a given hash.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{names, sys};

/// The identity of `memory.bin` when it was last checked.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl FileIdentity {
    fn of(st: &libc::stat) -> Self {
        let ns = |s: i64, n: i64| i64::try_from(sys::ts_ns(s, n)).unwrap_or(i64::MAX);
        FileIdentity {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// `verified.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Verified {
    schema_version: u32,
    memory_bin: FileIdentity,
    memory_pages_xxh3: String,
    verified_unix_ms: u64,
}

impl Verified {
    /// A record for `memory.bin` as `st` describes it, checked against `memory.pages` of hash
    /// `pages_xxh3`.
    pub(crate) fn new(st: &libc::stat, pages_xxh3: String) -> Self {
        Verified {
            schema_version: crate::SCHEMA_VERSION,
            memory_bin: FileIdentity::of(st),
            memory_pages_xxh3: pages_xxh3,
            verified_unix_ms: crate::now_unix_ms(),
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Whether the record vouches for `memory.bin` as it is now.
    pub(crate) fn vouches_for(&self, st: &libc::stat, pages_xxh3: &str) -> bool {
        self.schema_version == crate::SCHEMA_VERSION
            && self.memory_bin == FileIdentity::of(st)
            && self.memory_pages_xxh3 == pages_xxh3
    }
}

/// Reads `verified.json`; `None` if missing or unreadable (then nothing is vouched for).
pub(crate) fn read_verified(dir: &Path) -> Option<Verified> {
    let bytes = std::fs::read(dir.join(names::VERIFIED)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Rewrites `verified.json` atomically (temporary file, fsync, rename, fsync of the
/// directory). Failure only costs a future full check, so it is logged, not returned.
pub(crate) fn write_verified(dir: &Path, verified: &Verified) {
    let result = (|| -> std::io::Result<()> {
        let dir_fd = sys::open_dir(dir)?;
        let tmp = sys::c(format!(".verified.json.{}.tmp", std::process::id()))?;
        let fd = sys::openat(
            dir_fd.as_fd(),
            &tmp,
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_NOFOLLOW,
            0o600,
        )?;
        sys::pwrite_all(fd.as_raw_fd(), &verified.to_json(), 0)?;
        sys::fsync(fd.as_fd())?;
        sys::renameat(dir_fd.as_fd(), &tmp, &sys::c(names::VERIFIED)?)?;
        sys::fsync(dir_fd.as_fd())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, dir = %dir.display(), "could not record the memory check in verified.json");
    }
}
