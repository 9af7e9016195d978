//! Chains and restore: [`SnapshotStore::chain`] follows `parent` links down to the base full
//! snapshot; the [`RestorePlan`] rebuilds the chain's memory from `MAP_PRIVATE` file mappings,
//! and [`SnapshotStore::materialize`] applies it to write the image out.
//!
//! Every `memory.bin` of a chain has the same layout, so a page lives at the same offset in
//! each. A page belongs to the newest chain member whose page table differs from its
//! predecessor's there (a page that became zero belongs to the diff too: its hole reads as
//! zero), else to the base. The plan maps the base over each region, then the coalesced runs
//! of pages owned by each diff over it with `MAP_FIXED`. Mappings never cross a region.

use std::collections::HashSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use crate::manifest::{Kind, MemoryRegion};
use crate::store::{Snapshot, SnapshotStore};
use crate::writer::GuestRegion;
use crate::{names, PageHashes, Result, SnapshotError, PAGE_SIZE};

/// One file mapping of a restore.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    /// Index into [`RestorePlan::files`].
    pub file: usize,
    /// Offset in that file.
    pub file_offset: u64,
    /// Offset in the `memory.bin` layout (see [`RestorePlan::regions`]).
    pub image_offset: u64,
    pub len: u64,
}

/// How to rebuild guest memory from a chain: map each [`Mapping`] in order, `MAP_PRIVATE |
/// MAP_FIXED`, the later ones over the earlier ones. Serializable, so a launcher can resolve the
/// plan and hand it to a VMM that cannot see the snapshot store.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RestorePlan {
    /// `memory.bin` of each chain member, base first.
    pub files: Vec<PathBuf>,
    /// First the base over every region, then each diff's pages, coalesced.
    pub mappings: Vec<Mapping>,
    /// The image layout (guest address of each image range).
    pub regions: Vec<MemoryRegion>,
}

impl RestorePlan {
    /// The size of the memory image.
    pub fn image_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Applies the plan: maps every mapping `MAP_PRIVATE | MAP_FIXED` with protection `prot`
    /// (`libc::PROT_READ | libc::PROT_WRITE` for guest RAM) at `region_bases[r]` plus its
    /// offset in region `r`.
    ///
    /// # Safety
    /// `region_bases[r]` must be the start of a mapping of at least `regions[r].size` bytes
    /// owned by the caller, page-aligned; whatever was mapped there is replaced.
    pub unsafe fn map_into(&self, region_bases: &[*mut u8], prot: libc::c_int) -> Result<()> {
        if region_bases.len() != self.regions.len() {
            return Err(SnapshotError::InvalidRegion {
                index: region_bases.len().min(self.regions.len()),
                reason: format!("the plan has {} regions, {} bases were given", self.regions.len(), region_bases.len()),
            });
        }
        let mut files = Vec::with_capacity(self.files.len());
        for path in &self.files {
            files
                .push(std::fs::File::open(path).map_err(|e| SnapshotError::io(format!("open {}", path.display()), e))?);
        }
        // Mapping past the end of a file would turn into SIGBUS on access: refuse short files.
        for (i, (file, path)) in files.iter().zip(&self.files).enumerate() {
            let needed = self.mappings.iter().filter(|m| m.file == i).map(|m| m.file_offset + m.len).max().unwrap_or(0);
            let size = file.metadata().map_err(|e| SnapshotError::io(format!("stat {}", path.display()), e))?.len();
            if size < needed {
                return Err(SnapshotError::Checksum {
                    file: path.clone(),
                    detail: format!("is {size} bytes, the snapshot needs {needed}: the file was truncated"),
                });
            }
        }
        for m in &self.mappings {
            let Some((r, region)) = self
                .regions
                .iter()
                .enumerate()
                .find(|(_, r)| m.image_offset >= r.file_offset && m.image_offset + m.len <= r.file_offset + r.size)
            else {
                return Err(SnapshotError::InvalidRegion {
                    index: 0,
                    reason: format!("mapping at image offset {} crosses a region boundary", m.image_offset),
                });
            };
            let Some(file) = files.get(m.file) else {
                return Err(SnapshotError::InvalidRegion {
                    index: r,
                    reason: format!("mapping names file {}", m.file),
                });
            };
            // SAFETY: the offset is inside region r (checked above), whose base the caller vouches for.
            let addr = unsafe { region_bases[r].add((m.image_offset - region.file_offset) as usize) };
            // SAFETY: MAP_FIXED over memory the caller owns (contract); the file descriptor is
            // valid for the call and the mapping keeps its own reference to the file.
            let got = unsafe {
                libc::mmap(
                    addr.cast(),
                    m.len as usize,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    m.file_offset as libc::off_t,
                )
            };
            if got == libc::MAP_FAILED {
                return Err(SnapshotError::io(
                    format!("map {} at offset {}", self.files[m.file].display(), m.file_offset),
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(())
    }

    /// The chain member whose file provides the byte at `image_offset` (the last mapping that
    /// covers it).
    pub(crate) fn owner_of(&self, image_offset: u64) -> Option<usize> {
        self.mappings
            .iter()
            .rev()
            .find(|m| image_offset >= m.image_offset && image_offset < m.image_offset + m.len)
            .map(|m| m.file)
    }
}

/// The plan for a chain (base first), and the top's page table.
pub(crate) fn plan_for_chain(chain: &[Snapshot]) -> Result<(RestorePlan, PageHashes)> {
    let Some(base) = chain.first() else {
        return Err(SnapshotError::NotFound { tag_or_id: String::new() });
    };
    let regions = base.manifest.memory.regions.clone();
    let pages = base.manifest.memory.pages as usize;
    for snap in chain {
        let path = snap.dir.join(names::MANIFEST);
        snap.manifest.memory.check_layout(&path)?;
        if snap.manifest.memory.regions != regions {
            return Err(SnapshotError::InvalidManifest {
                path,
                detail: format!("memory layout differs from the chain's base {}; the chain is unusable", base.id()),
            });
        }
    }
    let mut owner: Vec<u32> = if chain.len() > 1 { vec![0; pages] } else { Vec::new() };
    let mut prev = base.page_hashes()?;
    for (i, snap) in chain.iter().enumerate().skip(1) {
        let hashes = snap.page_hashes()?;
        for (p, (a, b)) in prev.as_slice().iter().zip(hashes.as_slice()).enumerate() {
            if a != b {
                owner[p] = i as u32;
            }
        }
        prev = hashes;
    }

    let mut mappings: Vec<Mapping> = regions
        .iter()
        .map(|r| Mapping { file: 0, file_offset: r.file_offset, image_offset: r.file_offset, len: r.size })
        .collect();
    if !owner.is_empty() {
        for r in &regions {
            let first = (r.file_offset / PAGE_SIZE as u64) as usize;
            let end = first + (r.size / PAGE_SIZE as u64) as usize;
            let mut p = first;
            while p < end {
                let o = owner[p];
                let start = p;
                while p < end && owner[p] == o {
                    p += 1;
                }
                if o != 0 {
                    let offset = (start * PAGE_SIZE) as u64;
                    mappings.push(Mapping {
                        file: o as usize,
                        file_offset: offset,
                        image_offset: offset,
                        len: ((p - start) * PAGE_SIZE) as u64,
                    });
                }
            }
        }
    }
    let files = chain.iter().map(|s| s.dir.join(names::MEMORY)).collect();
    Ok((RestorePlan { files, mappings, regions }, prev))
}

/// A restore plan applied to a fresh read-only reservation in this process.
pub(crate) struct MappedImage {
    base: *mut u8,
    len: usize,
    regions: Vec<MemoryRegion>,
}

impl MappedImage {
    /// Reserves the image's size and maps the plan into it, read-only.
    pub(crate) fn map(plan: &RestorePlan) -> Result<MappedImage> {
        let len = plan.image_size() as usize;
        if len == 0 {
            return Ok(MappedImage { base: std::ptr::null_mut(), len: 0, regions: Vec::new() });
        }
        // SAFETY: a fresh anonymous reservation; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(SnapshotError::io(
                format!("reserve {len} bytes of address space for the memory image"),
                std::io::Error::last_os_error(),
            ));
        }
        let image = MappedImage { base: base.cast(), len, regions: plan.regions.clone() };
        let bases: Vec<*mut u8> =
            plan.regions.iter().map(|r| image.base.wrapping_add(r.file_offset as usize)).collect();
        // SAFETY: each base lies in our reservation with its whole region after it (regions
        // are concatenated and the reservation is the image size).
        unsafe { plan.map_into(&bases, libc::PROT_READ) }?;
        Ok(image)
    }

    /// The whole image.
    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the reservation is mapped readable over its whole length (map_into covered
        // every region) and lives until drop; nothing writes it (MAP_PRIVATE, PROT_READ).
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }

    /// The image as guest regions (for the memory writer).
    pub(crate) fn guest_regions(&self) -> Vec<GuestRegion> {
        self.regions
            .iter()
            .map(|r| GuestRegion {
                host_addr: self.base.wrapping_add(r.file_offset as usize),
                len: r.size as usize,
                guest_addr: r.guest_addr,
            })
            .collect()
    }
}

impl Drop for MappedImage {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly our reservation, which nothing refers to any more.
            unsafe { libc::munmap(self.base.cast(), self.len) };
        }
    }
}

impl SnapshotStore {
    /// The chain of `snap`: its base full snapshot first, then each diff, `snap` last. A
    /// missing parent is [`SnapshotError::NotFound`] naming the parent.
    pub fn chain(&self, snap: &Snapshot) -> Result<Vec<Snapshot>> {
        self.locked(false, |root| self.chain_unlocked(root, snap))?
            .ok_or_else(|| SnapshotError::NotFound { tag_or_id: snap.manifest.id.clone() })
    }

    fn chain_unlocked(&self, root: BorrowedFd<'_>, snap: &Snapshot) -> Result<Vec<Snapshot>> {
        let mut chain = vec![snap.clone()];
        let mut seen = HashSet::from([snap.manifest.id.clone()]);
        while let Some(last) = chain.last() {
            if last.manifest.kind == Kind::Full {
                break;
            }
            let manifest_path = last.dir.join(names::MANIFEST);
            let Some(parent) = last.manifest.parent.clone() else {
                return Err(SnapshotError::InvalidManifest {
                    path: manifest_path,
                    detail: "a diff snapshot without a parent; remove it".into(),
                });
            };
            if !seen.insert(parent.clone()) {
                return Err(SnapshotError::InvalidManifest {
                    path: manifest_path,
                    detail: format!("the parent chain loops back to {parent}; remove these snapshots"),
                });
            }
            let p = self.load(root, &parent)?.ok_or(SnapshotError::NotFound { tag_or_id: parent })?;
            chain.push(p);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The plan to rebuild `snap`'s memory from its chain's `memory.bin` files. Run
    /// [`SnapshotStore::check_for_restore`] first.
    pub fn restore_plan(&self, snap: &Snapshot) -> Result<RestorePlan> {
        let chain = self.chain(snap)?;
        Ok(plan_for_chain(&chain)?.0)
    }

    /// Writes the full memory image of `snap` (its chain applied) to `out`; returns its size.
    pub fn materialize(&self, snap: &Snapshot, out: &mut dyn Write) -> Result<u64> {
        let plan = self.restore_plan(snap)?;
        let image = MappedImage::map(&plan)?;
        for chunk in image.as_slice().chunks(8 << 20) {
            out.write_all(chunk).map_err(|e| SnapshotError::io("write the materialized memory image", e))?;
        }
        out.flush().map_err(|e| SnapshotError::io("write the materialized memory image", e))?;
        Ok(image.len as u64)
    }
}
