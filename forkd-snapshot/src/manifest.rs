//! `snapshot.json`: the manifest of one snapshot, and the small serialized types it is made of.
//!
//! The manifest is written last, inside the staging directory, and becomes visible with the
//! directory's rename, so a manifest on disk always describes complete files. Readers check
//! `schema_version` before anything else and refuse newer versions with
//! [`SnapshotError::UnknownSchema`].

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Result, SnapshotError, PAGE_SIZE, SCHEMA_VERSION};

/// One guest RAM region in `memory.bin`: it holds `size` bytes of guest-physical memory from
/// `guest_addr`, at `file_offset` in the file (regions are concatenated in order).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// How `memory.bin` was written.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WriteMethod {
    /// io_uring, `O_DIRECT` where the filesystem supports it.
    IoUring,
    /// Plain `pwrite(2)`, `O_DIRECT` where the filesystem supports it.
    Pwrite,
}

/// A full snapshot holds all of memory; a diff only the pages changed since its parent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Full,
    Diff,
}

/// What the memory writer did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MemoryInfo {
    /// Always [`PAGE_SIZE`].
    pub page_size: u64,
    /// The layout of `memory.bin`.
    pub regions: Vec<MemoryRegion>,
    /// Pages of the whole memory (the length of `memory.pages`).
    pub pages: u64,
    /// Pages that are not all zero.
    pub nonzero_pages: u64,
    /// Pages written to `memory.bin` (a diff: the nonzero pages that changed).
    pub written_pages: u64,
    /// Bytes written to `memory.bin`.
    pub bytes_written: u64,
    /// The write method used.
    pub method: WriteMethod,
    /// Why io_uring was not used, when it was wanted but not available.
    #[serde(default)]
    pub fallback_reason: Option<String>,
    /// Wall time of the whole memory write (scan, hash, write, sync), in milliseconds.
    pub write_ms: f64,
}

impl MemoryInfo {
    /// The size of `memory.bin`: the sum of the region sizes.
    pub fn image_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The guest-physical address of byte `offset` of the image, if it is inside a region.
    pub fn guest_addr_of(&self, offset: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| offset >= r.file_offset && offset - r.file_offset < r.size)
            .map(|r| r.guest_addr + (offset - r.file_offset))
    }

    /// Checks that the regions are page-aligned and concatenated and that `pages` matches.
    pub(crate) fn check_layout(&self, path: &Path) -> Result<()> {
        let bad = |detail: String| Err(SnapshotError::InvalidManifest { path: path.to_path_buf(), detail });
        if self.page_size != PAGE_SIZE as u64 {
            return bad(format!("memory.page_size is {}, only {PAGE_SIZE} is supported", self.page_size));
        }
        let mut offset = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.file_offset != offset || !r.size.is_multiple_of(PAGE_SIZE as u64) {
                return bad(format!(
                    "memory region {i} (file offset {}, size {}) is not page-aligned right after the previous one",
                    r.file_offset, r.size
                ));
            }
            offset += r.size;
        }
        if offset / PAGE_SIZE as u64 != self.pages {
            return bad(format!(
                "memory.pages is {} but the regions hold {} pages",
                self.pages,
                offset / PAGE_SIZE as u64
            ));
        }
        Ok(())
    }
}

/// A file the snapshot was made with (kernel, root image), by path and content hash.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Artifact {
    pub path: PathBuf,
    pub sha256: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// Size and content hash of a file inside the snapshot directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FileEntry {
    pub size: u64,
    /// Lowercase hex (32 digits) of the file's xxh3-128.
    pub xxh3: String,
}

impl FileEntry {
    /// The entry describing `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        FileEntry { size: bytes.len() as u64, xxh3: hex128(xxhash_rust::xxh3::xxh3_128(bytes)) }
    }
}

impl FileEntry {
    /// The entry of an open file (read whole, streaming).
    pub(crate) fn of_fd(fd: BorrowedFd<'_>) -> io::Result<FileEntry> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n as usize]);
            size += n as u64;
        }
        Ok(FileEntry { size, xxh3: hex128(hasher.digest128()) })
    }
}

/// 32 lowercase hex digits.
pub(crate) fn hex128(h: u128) -> String {
    format!("{h:032x}")
}

/// The manifest, `snapshot.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// [`SCHEMA_VERSION`] when written by this crate.
    pub schema_version: u32,
    /// The snapshot id, also its directory name.
    pub id: String,
    /// Optional unique, human-chosen name ([`crate::validate_tag`]).
    pub tag: Option<String>,
    pub created_unix_ms: u64,
    pub kind: Kind,
    /// The parent snapshot id (diffs only).
    pub parent: Option<String>,
    /// The sandbox the snapshot was taken from.
    pub source: Option<String>,
    /// The VMM's configuration, opaque to this crate.
    pub guest: serde_json::Value,
    pub kernel: Artifact,
    pub image: Artifact,
    pub memory: MemoryInfo,
    /// Disk layer file names under `disk/`, bottom to top.
    pub disk: Vec<String>,
    /// Every file in the directory except `snapshot.json`, `memory.bin`, `verified.json` and
    /// the disk layers (unless the caller adds them): name relative to the snapshot directory.
    pub files: BTreeMap<String, FileEntry>,
    /// Anything else the caller wants to keep, opaque to this crate.
    #[serde(default)]
    pub extra: serde_json::Value,
}

impl Manifest {
    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these types cannot fail: all map keys are strings.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses a manifest read from `path`, refusing schema versions this crate does not know.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|source| SnapshotError::Json { path: path.to_path_buf(), source })?;
        check_schema(path, &value)?;
        serde_json::from_value(value).map_err(|source| SnapshotError::Json { path: path.to_path_buf(), source })
    }
}

/// Refuses a JSON document whose `schema_version` is missing, zero or newer than ours.
pub(crate) fn check_schema(path: &Path, value: &serde_json::Value) -> Result<()> {
    let version = value.get("schema_version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version == 0 || version > u64::from(SCHEMA_VERSION) {
        return Err(SnapshotError::UnknownSchema { path: path.to_path_buf(), version });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            schema_version: SCHEMA_VERSION,
            id: "snap-000000000001".into(),
            tag: Some("base".into()),
            created_unix_ms: 1,
            kind: Kind::Full,
            parent: None,
            source: Some("sb-1".into()),
            guest: serde_json::json!({"vcpus": 1}),
            kernel: Artifact { path: "/k".into(), sha256: "00".into(), name: None },
            image: Artifact { path: "/i".into(), sha256: "11".into(), name: Some("tiny".into()) },
            memory: MemoryInfo {
                page_size: 4096,
                regions: vec![MemoryRegion { guest_addr: 0, size: 8192, file_offset: 0 }],
                pages: 2,
                nonzero_pages: 1,
                written_pages: 1,
                bytes_written: 4096,
                method: WriteMethod::IoUring,
                fallback_reason: None,
                write_ms: 0.5,
            },
            disk: vec!["layer-000".into()],
            files: BTreeMap::from([("vm-state.json".to_string(), FileEntry::of_bytes(b"{}"))]),
            extra: serde_json::Value::Null,
        }
    }

    #[test]
    fn round_trip_and_schema() {
        let m = sample();
        let json = m.to_json();
        let text = String::from_utf8_lossy(&json);
        assert!(text.contains("\"kind\": \"full\"") && text.contains("\"method\": \"io_uring\""), "{text}");
        assert_eq!(Manifest::parse(Path::new("x"), &json).ok(), Some(m.clone()));
        assert!(m.memory.check_layout(Path::new("x")).is_ok());

        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap_or_default();
        v["schema_version"] = serde_json::json!(2);
        let newer = serde_json::to_vec(&v).unwrap_or_default();
        assert!(matches!(
            Manifest::parse(Path::new("x"), &newer),
            Err(SnapshotError::UnknownSchema { version: 2, .. })
        ));
        assert!(matches!(Manifest::parse(Path::new("x"), b"{"), Err(SnapshotError::Json { .. })));
    }

    #[test]
    fn guest_addresses() {
        let mut info = sample().memory;
        info.regions.push(MemoryRegion { guest_addr: 1 << 32, size: 4096, file_offset: 8192 });
        assert_eq!(info.guest_addr_of(4096), Some(4096));
        assert_eq!(info.guest_addr_of(8192 + 5), Some((1 << 32) + 5));
        assert_eq!(info.guest_addr_of(3 * 4096), None);
        assert_eq!(info.image_size(), 3 * 4096);
    }
}
