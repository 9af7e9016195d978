//! `memory.pages`: the page hash table, one little-endian u128 per 4 KiB page of the whole
//! memory, and [`hash_page`].
//!
//! Hash 0 means "the page is all zero" (so it is a hole in `memory.bin`); any other page has
//! its xxh3-128, with 0 remapped to 1. The table always describes the full memory state at
//! the snapshot, also for a diff: a diff's pages are exactly those whose hash differs from the
//! parent's table.

use std::path::Path;

use crate::{Result, SnapshotError};

/// Bytes per entry in `memory.pages`.
pub(crate) const ENTRY_SIZE: usize = 16;

/// The page hash table of one memory state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageHashes {
    hashes: Vec<u128>,
}

impl PageHashes {
    /// A table of `pages` all-zero pages.
    pub fn new(pages: usize) -> Self {
        PageHashes { hashes: vec![0; pages] }
    }

    /// The number of pages.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether the table has no pages.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The hash of `page`. Panics if `page >= len()`.
    pub fn get(&self, page: usize) -> u128 {
        self.hashes[page]
    }

    /// Sets the hash of `page`. Panics if `page >= len()`.
    pub fn set(&mut self, page: usize, h: u128) {
        self.hashes[page] = h;
    }

    /// All hashes, in page order.
    pub fn as_slice(&self) -> &[u128] {
        &self.hashes
    }

    /// Reads a `memory.pages` file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| SnapshotError::io(format!("read {}", path.display()), e))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            SnapshotError::Checksum { detail, .. } => SnapshotError::Checksum { file: path.to_path_buf(), detail },
            other => other,
        })
    }

    /// The `memory.pages` encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.hashes.len() * ENTRY_SIZE);
        for h in &self.hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out
    }

    /// Decodes `memory.pages`.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if !b.len().is_multiple_of(ENTRY_SIZE) {
            return Err(SnapshotError::Checksum {
                file: crate::names::PAGES.into(),
                detail: format!(
                    "length {} is not a multiple of {ENTRY_SIZE}: the page table is truncated or damaged",
                    b.len()
                ),
            });
        }
        let hashes = b
            .chunks_exact(ENTRY_SIZE)
            .map(|c| {
                let mut a = [0u8; ENTRY_SIZE];
                a.copy_from_slice(c);
                u128::from_le_bytes(a)
            })
            .collect();
        Ok(PageHashes { hashes })
    }

    /// The number of pages that are not all zero.
    pub fn nonzero(&self) -> usize {
        self.hashes.iter().filter(|&&h| h != 0).count()
    }
}

/// The hash of one page: 0 if and only if every byte is zero, else its xxh3-128 (1 where
/// xxh3 gives 0).
pub fn hash_page(page: &[u8]) -> u128 {
    if is_zero(page) {
        return 0;
    }
    match xxhash_rust::xxh3::xxh3_128(page) {
        0 => 1,
        h => h,
    }
}

/// Whether every byte is zero: 64 bytes at a time, so the compiler vectorizes it, and early
/// exit at the first nonzero block (most nonzero pages are rejected in the first block).
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for chunk in &mut chunks {
        let mut acc = 0u8;
        for &x in chunk {
            acc |= x;
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_nonzero_pages() {
        let mut page = vec![0u8; 4096];
        assert_eq!(hash_page(&page), 0);
        page[4095] = 1;
        let last = hash_page(&page);
        assert_ne!(last, 0);
        page[4095] = 0;
        page[0] = 1;
        assert_ne!(hash_page(&page), 0);
        assert_ne!(hash_page(&page), last);
        assert_eq!(hash_page(&[0u8; 100]), 0);
        assert_ne!(hash_page(&[0, 0, 7]), 0);
    }

    #[test]
    fn table_encoding() {
        let mut t = PageHashes::new(3);
        assert_eq!((t.len(), t.nonzero(), t.is_empty()), (3, 0, false));
        t.set(1, u128::MAX - 5);
        t.set(2, 1);
        let bytes = t.to_bytes();
        assert_eq!(bytes.len(), 48);
        assert_eq!(&bytes[16..32], &(u128::MAX - 5).to_le_bytes());
        let back = PageHashes::from_bytes(&bytes).ok();
        assert_eq!(back.as_ref(), Some(&t));
        assert_eq!(back.map(|b| b.nonzero()), Some(2));
        assert!(matches!(PageHashes::from_bytes(&bytes[..47]), Err(SnapshotError::Checksum { .. })));
        assert!(PageHashes::new(0).is_empty());
    }
}
