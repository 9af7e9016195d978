//! forkd's durable snapshots on disk, format v1.
//!
//! A snapshot directory `<root>/<id>/` holds `snapshot.json` (the [`Manifest`], written last),
//! `memory.bin` (guest RAM, sparse: zero pages are holes), `memory.pages` (one xxh3-128 per
//! 4 KiB page of the whole memory), opaque state files the caller writes, hard links to frozen
//! disk layers under `disk/`, and `verified.json` (a cache of the last full memory check).
//! `docs/formats.md` ("Snapshots (format v1)") is the normative description.
//!
//! Writing goes through a [`Staging`] directory `<root>/.tmp-<id>` that a rename turns into
//! `<root>/<id>` only once everything in it is durable; a crash leaves at most a staging
//! directory that [`SnapshotStore::cleanup_leftovers`] removes. Guest memory is written by
//! [`Staging::write_memory`] (io_uring with `O_DIRECT`, or `pwrite`), either whole (full
//! snapshot) or only the pages whose hash differs from a parent's (diff snapshot).
//! [`SnapshotStore`] lists, resolves, checks, verifies, restores (as a [`RestorePlan`] of
//! `MAP_PRIVATE` mappings), compacts and removes snapshots.
//!
//! This crate knows nothing about VMMs or KVM: guest RAM is a list of [`GuestRegion`]s and
//! the VMM's own state is opaque bytes and JSON.

mod compact;
mod error;
mod manifest;
mod pages;
mod restore;
mod root;
mod staging;
mod store;
mod sys;
mod verified;
mod verify;
mod writer;

pub use error::{Result, SnapshotError};
pub use manifest::{Artifact, FileEntry, Kind, Manifest, MemoryInfo, MemoryRegion, WriteMethod};
pub use pages::{hash_page, PageHashes};
pub use restore::{Mapping, RestorePlan};
pub use staging::Staging;
pub use store::{Snapshot, SnapshotStore};
pub use verify::VerifyReport;
pub use writer::{GuestRegion, MemoryWriteReport, WriteOptions};

/// The page size of `memory.bin` and `memory.pages`: one hash per 4 KiB page.
pub const PAGE_SIZE: usize = 4096;

/// The `schema_version` this crate writes and the newest one it reads.
pub const SCHEMA_VERSION: u32 = 1;

/// File names inside a snapshot directory.
pub mod names {
    /// The manifest, written last.
    pub const MANIFEST: &str = "snapshot.json";
    /// Guest RAM, sparse.
    pub const MEMORY: &str = "memory.bin";
    /// One little-endian u128 hash per page of the whole memory.
    pub const PAGES: &str = "memory.pages";
    /// The cache of the last full memory check.
    pub const VERIFIED: &str = "verified.json";
    /// Directory of hard-linked disk layers.
    pub const DISK_DIR: &str = "disk";
    /// Prefix of a staging directory (`.tmp-<id>`).
    pub const STAGING_PREFIX: &str = ".tmp-";
    /// Prefix of the old copy during a compaction swap (`.old-<id>`).
    pub const OLD_PREFIX: &str = ".old-";
    /// Prefix of a snapshot being removed (`.del-<id>`).
    pub const REMOVING_PREFIX: &str = ".del-";
}

/// Checks a tag: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_tag(tag: &str) -> Result<()> {
    let bytes = tag.as_bytes();
    let reason = match bytes.first() {
        None => Some("a tag must not be empty"),
        Some(_) if bytes.len() > 63 => Some("a tag has at most 63 characters"),
        Some(first) if !(first.is_ascii_lowercase() || first.is_ascii_digit()) => {
            Some("a tag starts with a lowercase letter or a digit")
        }
        Some(_) => {
            if bytes.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
                None
            } else {
                Some("a tag may only contain a-z, 0-9, '.', '_' and '-'")
            }
        }
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(SnapshotError::InvalidName { name: tag.to_string(), reason }),
    }
}

/// Checks a snapshot id: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, so it is one path component that
/// never starts with a dot (dot names are staging and bookkeeping directories).
pub(crate) fn validate_id(id: &str) -> Result<()> {
    let bytes = id.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::InvalidName {
            name: id.to_string(),
            reason:
                "a snapshot id is 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-' and starts with a letter or digit",
        })
    }
}

/// Checks a file name inside a snapshot: a relative path of components made of
/// `[A-Za-z0-9._-]`, none of them `.` or `..` or starting with a dot.
pub(crate) fn validate_file_name(name: &str) -> Result<()> {
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.len() <= 255
            && !c.starts_with('.')
            && c.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if name.len() <= 1024 && name.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(SnapshotError::InvalidName {
            name: name.to_string(),
            reason: "a snapshot file name is a relative path of components made of A-Z, a-z, 0-9, '.', '_', '-' \
                     that do not start with a dot",
        })
    }
}

/// A new random snapshot id: `snap-` and 12 hex digits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 6];
    if let Err(e) = sys::random_bytes(&mut bytes) {
        // getrandom(2) and /dev/urandom both failed: fall back to time and pid, still unique
        // enough for a directory name (creation refuses an existing id anyway).
        tracing::warn!(error = %e, "no random source; deriving the snapshot id from the clock");
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let mixed =
            xxhash_rust::xxh3::xxh3_64(&[nanos.to_le_bytes().as_slice(), &std::process::id().to_le_bytes()].concat());
        bytes.copy_from_slice(&mixed.to_le_bytes()[..6]);
    }
    let mut id = String::from("snap-");
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        for good in ["a", "0", "base", "py3.12-ready", "x_y", &"a".repeat(63)] {
            assert!(validate_tag(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", ".a", "A", "a/b", "a b", &"a".repeat(64), "é"] {
            assert!(matches!(validate_tag(bad), Err(SnapshotError::InvalidName { .. })), "{bad}");
        }
    }

    #[test]
    fn ids_and_file_names() {
        let id = new_id();
        assert!(id.starts_with("snap-") && id.len() == 17, "{id}");
        assert!(id[5..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(new_id(), id);
        assert!(validate_id(&id).is_ok());
        for bad in ["", ".tmp-x", "a/b", "..", "a b"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
        for good in ["vm-state.json", "disk/layer-002", "a/b/c"] {
            assert!(validate_file_name(good).is_ok(), "{good}");
        }
        for bad in ["", "/abs", "a//b", "../x", "a/../b", ".hidden", "a/.b", "sp ace"] {
            assert!(validate_file_name(bad).is_err(), "{bad}");
        }
    }
}
