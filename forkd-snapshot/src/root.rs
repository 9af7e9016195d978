//! The snapshot root directory, by descriptor: its lock, its entries, and the small-file
//! writes every part of the crate shares.
//!
//! Commits, removals, compaction swaps and cleanups take the root's `flock` exclusively;
//! lookups take it shared, so they never observe the middle of a swap.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::error::is_no_space;
use crate::manifest::FileEntry;
use crate::{names, sys, validate_id, Result, SnapshotError};

/// Bytes asked for on top of a small file's size in a [`SnapshotError::NoSpace`].
const SMALL_FILE_MARGIN: u64 = 64 << 10;

/// A held `flock` on the snapshot root (released on drop).
pub(crate) struct RootLock {
    _fd: OwnedFd,
}

/// Locks the root directory `root` (a fresh open file description, so it contends with every
/// other holder, in this process too: never take it twice on one thread).
pub(crate) fn lock_root(root: BorrowedFd<'_>, exclusive: bool) -> io::Result<RootLock> {
    let fd = sys::reopen_dir(root)?;
    sys::lock(fd.as_fd(), exclusive)?;
    Ok(RootLock { _fd: fd })
}

/// `.tmp-<id>`.
pub(crate) fn staging_name(id: &str) -> String {
    format!("{}{id}", names::STAGING_PREFIX)
}

/// Creates the parent directories of `name` below `dir`.
pub(crate) fn make_parents(dir: BorrowedFd<'_>, display_dir: &Path, name: &str) -> Result<()> {
    let mut prefix = String::new();
    let mut parts = name.split('/').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            break;
        }
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        let c = sys::c(&prefix).map_err(|e| SnapshotError::io("directory name", e))?;
        sys::mkdirat(dir, &c, 0o700, true)
            .map_err(|e| SnapshotError::io(format!("create {}", display_dir.join(&prefix).display()), e))?;
    }
    Ok(())
}

/// Writes `bytes` as `name` below `dir` and fsyncs it.
pub(crate) fn write_file_at(dir: BorrowedFd<'_>, display_dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    let path = display_dir.join(name);
    make_parents(dir, display_dir, name)?;
    let result = (|| -> io::Result<()> {
        let c = sys::c(name)?;
        let fd = sys::openat(dir, &c, libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_NOFOLLOW, 0o600)?;
        sys::pwrite_all(fd.as_raw_fd(), bytes, 0)?;
        sys::fsync(fd.as_fd())
    })();
    result.map_err(|e| {
        if is_no_space(&e) {
            SnapshotError::NoSpace {
                path: path.clone(),
                needed_bytes: bytes.len() as u64 + SMALL_FILE_MARGIN,
                available_bytes: sys::available_bytes(dir).unwrap_or(0),
            }
        } else {
            SnapshotError::io(format!("write {}", path.display()), e)
        }
    })?;
    Ok(FileEntry::of_bytes(bytes))
}

/// Reads `<entry>/snapshot.json` below the root, if the entry is a snapshot directory.
pub(crate) fn read_manifest_at(root: BorrowedFd<'_>, entry: &str) -> io::Result<Option<Vec<u8>>> {
    let c = sys::c(format!("{entry}/{}", names::MANIFEST))?;
    match sys::read_file_at(root, &c) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The ids (directory names) of committed snapshots under the root.
pub(crate) fn committed_entries(root: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    let mut out: Vec<String> = sys::read_dir(root)?
        .iter()
        .filter_map(|e| e.name_str().map(str::to_string))
        .filter(|name| !name.starts_with('.') && validate_id(name).is_ok())
        .collect();
    out.sort();
    Ok(out)
}
