//! Guest RAM: anonymous private mappings with transparent huge pages.
//!
//! Anonymous private memory is what makes BRANCH cheap: `fork()` turns it into a copy-on-write
//! view for the child in time proportional to page-table size, not RAM size, and THP keeps the
//! page tables small (measured here: 4 GiB forks in ~1.5 ms with THP, ~70 ms with 4 KiB pages).

use crate::arch::layout;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

/// The guest physical memory type used throughout the VMM.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is below the minimum of {min} MiB; ask for at least {min}M")]
    TooSmall { mib: u64, min: u64 },
    #[error("guest memory of {mib} MiB is above the maximum of {max} MiB")]
    TooLarge { mib: u64, max: u64 },
    #[error("could not reserve {mib} MiB of guest memory: {reason}")]
    Mmap { mib: u64, reason: String },
}

/// Smallest guest we accept: the kernel plus a working userspace need this much.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest we accept.
pub const MAX_MEMORY_MIB: u64 = 256 * 1024;

/// Maps `mib` MiB of guest RAM laid out around the 32-bit MMIO gap, advising THP.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemory, MemoryError> {
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall { mib, min: MIN_MEMORY_MIB });
    }
    if mib > MAX_MEMORY_MIB {
        return Err(MemoryError::TooLarge { mib, max: MAX_MEMORY_MIB });
    }
    let mut regions = Vec::new();
    for (guest, len) in layout::ram_ranges(mib << 20) {
        let mapping = MmapRegion::<()>::build(
            None,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|e| MemoryError::Mmap { mib, reason: e.to_string() })?;
        // SAFETY: advising a mapping we own; failure only costs performance, not correctness.
        if unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE) } != 0 {
            tracing::warn!("MADV_HUGEPAGE failed: {}", std::io::Error::last_os_error());
        }
        let region = GuestRegionMmap::new(mapping, GuestAddress(guest))
            .ok_or_else(|| MemoryError::Mmap { mib, reason: format!("region at {guest:#x} overflows") })?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::Mmap { mib, reason: e.to_string() })
}

/// What [`release_zero_pages`] found and gave back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ZeroPageRelease {
    /// Guest RAM mapped to pages before the call (a page the guest only read counts too: it
    /// maps the host's shared zero page).
    pub resident_bytes: u64,
    /// Of those, pages holding only zeros that were handed back to the host.
    pub released_bytes: u64,
}

/// Size of a transparent huge page on x86-64: the unit the kernel backs and forks guest RAM in.
const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;

/// Gives back to the host every backed guest page that holds only zeros.
///
/// A booted guest leaves megabytes of zeros in backed memory: THP backs a whole 2 MiB block
/// when the guest first touches one page of it, and boot frees what it no longer needs (init
/// sections, early allocations). Unbacked, those pages read as zeros exactly as before and get
/// a fresh page on the next write, so the guest cannot tell; the sandbox's RSS drops, and every
/// later BRANCH child maps (and is charged a share of) only the pages that hold data.
///
/// Blocks left partly backed are marked `MADV_NOHUGEPAGE`, or khugepaged would collapse them
/// into huge pages again, zeros included. The kernel frees the unmapped part of a split huge
/// page lazily (its deferred-split shrinker runs under memory pressure), so RSS and PSS drop at
/// once and the host gets the memory back when it needs it.
///
/// The caller must keep every writer of guest memory still (vCPUs parked, devices idle): a
/// write between the check and the release would be lost.
pub fn release_zero_pages(memory: &GuestMemory) -> std::io::Result<ZeroPageRelease> {
    let mut report = ZeroPageRelease::default();
    let mut resident = vec![0u8; HUGE_PAGE / PAGE];
    for region in memory.iter() {
        let (start, len) = (region.as_ptr() as usize, region.len() as usize);
        let mut block = start;
        while block < start + len {
            // Blocks follow the host's huge-page boundaries, which is where THP splits happen.
            let end = ((block / HUGE_PAGE + 1) * HUGE_PAGE).min(start + len);
            let pages = (end - block) / PAGE;
            // SAFETY: [block, end) lies inside this region's mapping; `resident` has one byte
            // per page of it.
            if unsafe { libc::mincore(block as *mut libc::c_void, end - block, resident.as_mut_ptr()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut kept = 0usize;
            let mut released = 0usize;
            let mut run: Option<usize> = None;
            for (i, backed) in resident[..pages].iter().enumerate() {
                let page = block + i * PAGE;
                let zero = backed & 1 == 1 && {
                    // SAFETY: a backed page of this mapping; nothing writes it meanwhile (see
                    // the contract above), and reading it faults nothing in.
                    let words = unsafe { std::slice::from_raw_parts(page as *const u64, PAGE / 8) };
                    words.chunks_exact(8).all(|c| c.iter().fold(0, |acc, w| acc | w) == 0)
                };
                if backed & 1 == 1 && !zero {
                    kept += 1;
                }
                match (zero, run) {
                    (true, None) => run = Some(page),
                    (false, Some(first)) => {
                        released += unback(first, page)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(first) = run {
                released += unback(first, end)?;
            }
            if released > 0 && kept > 0 {
                // SAFETY: advising part of our own mapping; it changes no contents.
                if unsafe { libc::madvise(block as *mut libc::c_void, end - block, libc::MADV_NOHUGEPAGE) } != 0 {
                    tracing::debug!("MADV_NOHUGEPAGE failed: {}", std::io::Error::last_os_error());
                }
            }
            report.resident_bytes += ((kept + released) * PAGE) as u64;
            report.released_bytes += (released * PAGE) as u64;
            block = end;
        }
    }
    Ok(report)
}

/// Drops the backing of [first, end) (whole pages of guest RAM); returns the page count.
fn unback(first: usize, end: usize) -> std::io::Result<usize> {
    // SAFETY: the range lies in guest RAM, whose pages hold only zeros; an anonymous private
    // page reads as zeros after MADV_DONTNEED, so the guest sees the same contents.
    if unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((end - first) / PAGE)
}

/// Total RAM in bytes.
pub fn ram_size(memory: &GuestMemory) -> u64 {
    memory.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn rejects_out_of_range_sizes() {
        assert!(matches!(create_guest_memory(16), Err(MemoryError::TooSmall { .. })));
        assert!(matches!(create_guest_memory(MAX_MEMORY_MIB + 1), Err(MemoryError::TooLarge { .. })));
    }

    #[test]
    fn small_guest_is_one_region_large_guest_skips_the_mmio_gap() {
        let small = create_guest_memory(128).unwrap();
        assert_eq!(small.num_regions(), 1);
        assert_eq!(ram_size(&small), 128 << 20);
        let large = create_guest_memory(4096).unwrap();
        assert_eq!(large.num_regions(), 2);
        assert_eq!(ram_size(&large), 4096 << 20);
        assert!(large.write_obj(0xabu8, GuestAddress(layout::MMIO_GAP_START)).is_err());
        large.write_obj(0xabu8, GuestAddress(layout::HIGH_RAM_START)).unwrap();
    }

    fn backed_pages(memory: &GuestMemory) -> usize {
        let region = memory.iter().next().unwrap();
        let mut v = vec![0u8; region.len() as usize / PAGE];
        // SAFETY: the whole mapping of the region, one byte per page.
        assert_eq!(unsafe { libc::mincore(region.as_ptr().cast(), region.len() as usize, v.as_mut_ptr()) }, 0);
        v.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn zero_pages_are_released_and_data_stays() {
        let memory = create_guest_memory(64).unwrap();
        // Eight pages of data spread over two huge-page blocks, and 24 touched pages of zeros.
        for i in 0..32u64 {
            let addr = GuestAddress(i * 0x20000);
            let value: u64 = if i % 4 == 0 { 0x1234_5678_0000 + i } else { 0 };
            memory.write_obj(value, addr).unwrap();
        }
        // A page whose only non-zero byte is its last one is data too.
        memory.write_obj(1u8, GuestAddress(0x31_0000 + PAGE as u64 - 1)).unwrap();
        let before = backed_pages(&memory);
        let report = release_zero_pages(&memory).unwrap();
        assert_eq!(report.resident_bytes, (before * PAGE) as u64);
        assert_eq!(backed_pages(&memory), 9);
        assert_eq!(report.released_bytes, ((before - 9) * PAGE) as u64);
        for i in 0..32u64 {
            let expected: u64 = if i % 4 == 0 { 0x1234_5678_0000 + i } else { 0 };
            assert_eq!(memory.read_obj::<u64>(GuestAddress(i * 0x20000)).unwrap(), expected);
        }
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x31_0000 + PAGE as u64 - 1)).unwrap(), 1);
        // Released pages take writes again.
        memory.write_obj(7u64, GuestAddress(0x20000)).unwrap();
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x20000)).unwrap(), 7);
        // A second pass keeps the ten data pages (the reads above mapped the shared zero page
        // at the others, which it unmaps again).
        let again = release_zero_pages(&memory).unwrap();
        assert_eq!(again.resident_bytes - again.released_bytes, (10 * PAGE) as u64);
        assert_eq!(backed_pages(&memory), 10);
    }
}
