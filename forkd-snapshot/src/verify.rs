//! Integrity checks: the fast pre-restore check and the full verification.
//!
//! Every file in `manifest.files` is checked against its size and xxh3-128 (they are small,
//! except `memory.pages`, and xxh3 runs at memory speed). `memory.bin` is checked page by page
//! against `memory.pages`: a full snapshot's every page, a diff's pages whose hash differs from
//! its parent's. Holes (found with `SEEK_DATA`/`SEEK_HOLE`) are zero without being read.
//!
//! The page check reads the whole file, so [`SnapshotStore::check_for_restore`] skips it when
//! `verified.json` records the current identity of `memory.bin` (device, inode, size, mtime
//! and ctime in nanoseconds) together with the `memory.pages` hash it was checked against:
//! the commit writes it, a successful full check rewrites it, and any write to `memory.bin`
//! (or replacing it) changes the identity and so forces a new full check.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use crate::manifest::FileEntry;
use crate::store::{Snapshot, SnapshotStore};
use crate::verified::{read_verified, write_verified, Verified};
use crate::{hash_page, names, sys, PageHashes, Result, SnapshotError, PAGE_SIZE};

/// What a verification looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Files checked: the manifest's files and `memory.bin`, over the whole chain.
    pub files_checked: usize,
    /// Memory pages compared with their recorded hash.
    pub pages_checked: u64,
    /// Bytes of `memory.bin` read for that (holes are not read).
    pub bytes_read: u64,
}

/// Pages per read of the page check.
const BATCH_PAGES: usize = 256;

/// The "damaged" hint of every checksum error.
const DAMAGED: &str = "the snapshot is damaged: remove it (with its dependents) or restore its directory from a copy";

impl SnapshotStore {
    /// Fast pre-restore check of every snapshot of `snap`'s chain: each file in
    /// `manifest.files` matches its size and xxh3, `memory.bin` has the right size, and its
    /// pages are checked in full unless `verified.json` vouches for the file as it is now.
    /// Damage is [`SnapshotError::Checksum`] naming the file (for memory, the first bad
    /// page's guest address).
    pub fn check_for_restore(&self, snap: &Snapshot) -> Result<()> {
        let chain = self.chain(snap)?;
        check_chain(&chain, false).map(drop)
    }

    /// Full verification of the whole chain of `tag_or_id`: every file, and every memory page
    /// against `memory.pages` (a diff: the pages whose hash differs from its parent's).
    pub fn verify(&self, tag_or_id: &str) -> Result<VerifyReport> {
        let snap = self.get(tag_or_id)?;
        let chain = self.chain(&snap)?;
        check_chain(&chain, true)
    }
}

/// Checks a chain (base first); `full` forces the page check.
fn check_chain(chain: &[Snapshot], full: bool) -> Result<VerifyReport> {
    if let Some(base) = chain.first() {
        for snap in chain {
            let path = snap.dir.join(names::MANIFEST);
            snap.manifest.memory.check_layout(&path)?;
            if snap.manifest.memory.regions != base.manifest.memory.regions {
                return Err(SnapshotError::InvalidManifest {
                    path,
                    detail: format!("memory layout differs from the chain's base {}; the chain is unusable", base.id()),
                });
            }
        }
    }
    let mut report = VerifyReport::default();
    let mut parent: Option<PageHashes> = None;
    for snap in chain {
        check_files(snap, &mut report)?;
        let hashes = read_pages(snap)?;
        check_disk(snap)?;
        let mem_path = snap.dir.join(names::MEMORY);
        let file = std::fs::File::open(&mem_path).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => {
                SnapshotError::Checksum { file: mem_path.clone(), detail: format!("is missing; {DAMAGED}") }
            }
            _ => SnapshotError::io(format!("open {}", mem_path.display()), e),
        })?;
        let st = sys::fstat(file.as_fd()).map_err(|e| SnapshotError::io(format!("stat {}", mem_path.display()), e))?;
        let size = snap.manifest.memory.image_size();
        if st.st_size as u64 != size {
            return Err(SnapshotError::Checksum {
                file: mem_path,
                detail: format!("is {} bytes, the manifest says {size}; {DAMAGED}", st.st_size),
            });
        }
        report.files_checked += 1;
        let pages_xxh3 = snap.manifest.files.get(names::PAGES).map(|e| e.xxh3.clone()).unwrap_or_default();
        let vouched = !full && read_verified(&snap.dir).is_some_and(|v| v.vouches_for(&st, &pages_xxh3));
        if vouched {
            tracing::debug!(id = snap.id(), "memory.bin unchanged since its last check");
        } else {
            let (pages, bytes) = check_memory(snap, file.as_fd(), &hashes, parent.as_ref())?;
            report.pages_checked += pages;
            report.bytes_read += bytes;
            write_verified(&snap.dir, &Verified::new(&st, pages_xxh3));
        }
        parent = Some(hashes);
    }
    Ok(report)
}

/// Every file in `manifest.files` but `memory.pages` (checked by [`read_pages`]).
fn check_files(snap: &Snapshot, report: &mut VerifyReport) -> Result<()> {
    for (name, expected) in snap.manifest.files.iter().filter(|(n, _)| n.as_str() != names::PAGES) {
        let path = snap.dir.join(name);
        let actual = match std::fs::File::open(&path) {
            Ok(f) => {
                FileEntry::of_fd(f.as_fd()).map_err(|e| SnapshotError::io(format!("read {}", path.display()), e))?
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(SnapshotError::Checksum { file: path, detail: format!("is missing; {DAMAGED}") })
            }
            Err(e) => return Err(SnapshotError::io(format!("open {}", path.display()), e)),
        };
        compare_entry(&path, &actual, expected)?;
        report.files_checked += 1;
    }
    Ok(())
}

fn compare_entry(path: &Path, actual: &FileEntry, expected: &FileEntry) -> Result<()> {
    if actual.size != expected.size {
        return Err(SnapshotError::Checksum {
            file: path.to_path_buf(),
            detail: format!("is {} bytes, the manifest says {}; {DAMAGED}", actual.size, expected.size),
        });
    }
    if actual.xxh3 != expected.xxh3 {
        return Err(SnapshotError::Checksum {
            file: path.to_path_buf(),
            detail: format!("content hash {} does not match the manifest's {}; {DAMAGED}", actual.xxh3, expected.xxh3),
        });
    }
    Ok(())
}

/// Reads `memory.pages`, checking it against its manifest entry.
fn read_pages(snap: &Snapshot) -> Result<PageHashes> {
    let path = snap.dir.join(names::PAGES);
    let Some(expected) = snap.manifest.files.get(names::PAGES) else {
        return Err(SnapshotError::InvalidManifest {
            path: snap.dir.join(names::MANIFEST),
            detail: "files has no memory.pages entry; the snapshot was not committed by forkd".into(),
        });
    };
    let bytes = std::fs::read(&path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => SnapshotError::Checksum { file: path.clone(), detail: format!("is missing; {DAMAGED}") },
        _ => SnapshotError::io(format!("read {}", path.display()), e),
    })?;
    compare_entry(&path, &FileEntry::of_bytes(&bytes), expected)?;
    let hashes = PageHashes::from_bytes(&bytes).map_err(|_| SnapshotError::Checksum {
        file: path.clone(),
        detail: format!("is not a page table; {DAMAGED}"),
    })?;
    if hashes.len() as u64 != snap.manifest.memory.pages {
        return Err(SnapshotError::Checksum {
            file: path,
            detail: format!(
                "holds {} pages, the manifest says {}; {DAMAGED}",
                hashes.len(),
                snap.manifest.memory.pages
            ),
        });
    }
    Ok(hashes)
}

/// The disk layers exist as regular files (their content is not hashed unless the caller
/// listed them in `files`).
fn check_disk(snap: &Snapshot) -> Result<()> {
    for layer in &snap.manifest.disk {
        let path = snap.dir.join(names::DISK_DIR).join(layer);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(SnapshotError::Checksum { file: path, detail: format!("is not a regular file; {DAMAGED}") })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(SnapshotError::Checksum { file: path, detail: format!("is missing; {DAMAGED}") })
            }
            Err(e) => return Err(SnapshotError::io(format!("stat {}", path.display()), e)),
        }
    }
    Ok(())
}

/// Compares the pages of `memory.bin` that this snapshot holds with their recorded hashes.
/// Returns (pages checked, bytes read).
fn check_memory(
    snap: &Snapshot,
    file: BorrowedFd<'_>,
    hashes: &PageHashes,
    parent: Option<&PageHashes>,
) -> Result<(u64, u64)> {
    let mem_path = snap.dir.join(names::MEMORY);
    let size = snap.manifest.memory.image_size();
    let extents = sys::data_extents(file.as_raw_fd(), size)
        .map_err(|e| SnapshotError::io(format!("find the data in {}", mem_path.display()), e))?;
    let pages = hashes.len();
    let selected = |p: usize| parent.is_none_or(|ph| ph.get(p) != hashes.get(p));
    let bad = |p: usize, actual: u128| {
        let offset = (p * PAGE_SIZE) as u64;
        let guest = snap.manifest.memory.guest_addr_of(offset).map_or("?".to_string(), |a| format!("{a:#x}"));
        SnapshotError::Checksum {
            file: mem_path.clone(),
            detail: format!(
                "page {p} (guest address {guest}) does not match memory.pages (content hash {actual:032x}, \
                 expected {:032x}); {DAMAGED}",
                hashes.get(p)
            ),
        }
    };
    let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
    let (mut checked, mut bytes_read) = (0u64, 0u64);
    let mut ext = 0usize;
    let mut p = 0usize;
    while p < pages {
        if !selected(p) {
            p += 1;
            continue;
        }
        let offset = (p * PAGE_SIZE) as u64;
        while ext < extents.len() && extents[ext].1 <= offset {
            ext += 1;
        }
        let in_data = ext < extents.len() && extents[ext].0 < offset + PAGE_SIZE as u64;
        if !in_data {
            // A hole: the page reads as zero.
            if hashes.get(p) != 0 {
                return Err(bad(p, 0));
            }
            checked += 1;
            p += 1;
            continue;
        }
        let extent_end = extents[ext].1;
        let mut n = 1;
        while n < BATCH_PAGES && p + n < pages && selected(p + n) && (((p + n) * PAGE_SIZE) as u64) < extent_end {
            n += 1;
        }
        let chunk = &mut buf[..n * PAGE_SIZE];
        sys::pread_exact(file.as_raw_fd(), chunk, offset)
            .map_err(|e| SnapshotError::io(format!("read {} at offset {offset}", mem_path.display()), e))?;
        bytes_read += chunk.len() as u64;
        for (i, page) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
            let actual = hash_page(page);
            if actual != hashes.get(p + i) {
                return Err(bad(p + i, actual));
            }
        }
        checked += n as u64;
        p += n;
    }
    Ok((checked, bytes_read))
}
