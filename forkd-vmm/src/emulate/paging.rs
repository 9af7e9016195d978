//! Guest-virtual memory as the emulator sees it: reads and writes through the guest's own page
//! tables, with the permission checks, page faults and accessed/dirty updates of a real walk.

use crate::arch::regs::{EFER_LMA, X86_CR0_PG as CR0_PG};
use crate::memory::GuestMemory;
use kvm_bindings::kvm_sregs;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

/// Why a guest-virtual access failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The guest's page tables refuse the access; the guest should get a #PF.
    #[error("page fault at {addr:#x} (error code {error_code:#x})")]
    PageFault { addr: u64, error_code: u32 },
    /// Something no #PF describes: page tables or data outside guest RAM, or a paging mode the
    /// walker does not implement.
    #[error("{0}")]
    Unusable(String),
}

/// Guest-virtual memory for the emulator.
pub trait GuestVirtualMemory {
    fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Writes all of `data` or nothing (every page is checked before the first byte is written).
    fn write(&self, gva: u64, data: &[u8]) -> Result<(), AccessError>;
}

/// Guest-virtual access through the guest's own page tables (4-level long mode or paging off).
pub struct PagedMemory<'a> {
    pub memory: &'a GuestMemory,
    pub sregs: kvm_sregs,
}

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_WP: u64 = 1 << 16;

/// #PF error code bits.
const PF_PRESENT: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;

impl PagedMemory<'_> {
    /// Translates a guest-virtual address for a read; see `translate_for`.
    pub fn translate(&self, gva: u64) -> Result<u64, AccessError> {
        self.translate_for(gva, false)
    }

    /// Translates a guest-virtual address to guest-physical for a read or write at the vCPU's
    /// current privilege level, as the CPU would: a missing entry or a denied permission (R/W
    /// honoured in supervisor mode when CR0.WP is set, U/S in user mode) is a page fault.
    /// Sets the accessed bits along the walk and, for writes, the dirty bit of the final entry.
    pub fn translate_for(&self, gva: u64, write: bool) -> Result<u64, AccessError> {
        if self.sregs.cr0 & CR0_PG == 0 {
            return Ok(gva);
        }
        if self.sregs.efer & EFER_LMA == 0 {
            return Err(AccessError::Unusable("guest uses 32-bit paging, which the emulator does not walk".into()));
        }
        let user = self.sregs.cs.dpl == 3;
        let fault = |present: bool| AccessError::PageFault {
            addr: gva,
            error_code: (if present { PF_PRESENT } else { 0 })
                | (if write { PF_WRITE } else { 0 })
                | (if user { PF_USER } else { 0 }),
        };
        let mut entries = [(0u64, 0u64); 4];
        let mut levels = 0;
        let mut table = self.sregs.cr3;
        // (index shift, mask of the physical address bits a huge mapping at this level keeps)
        let (pa, size_mask) = loop {
            let shift = 39 - 9 * levels as u32;
            let addr = (table & ADDR_MASK) + ((gva >> shift) & 0x1ff) * 8;
            let entry: u64 = self
                .memory
                .read_obj(GuestAddress(addr))
                .map_err(|e| AccessError::Unusable(format!("page table entry at {addr:#x}: {e}")))?;
            if entry & PTE_PRESENT == 0 {
                return Err(fault(false));
            }
            entries[levels] = (addr, entry);
            levels += 1;
            let page_mask = (1u64 << shift) - 1;
            if levels == 4 || (levels > 1 && entry & PTE_HUGE != 0) {
                break (entry & ADDR_MASK & !page_mask, page_mask);
            }
            table = entry;
        };
        let walked = &entries[..levels];
        let writable = walked.iter().all(|(_, e)| e & PTE_WRITABLE != 0);
        let user_ok = walked.iter().all(|(_, e)| e & PTE_USER != 0);
        if (user && !user_ok) || (write && !writable && (user || self.sregs.cr0 & CR0_WP != 0)) {
            return Err(fault(true));
        }
        for (i, (addr, entry)) in walked.iter().enumerate() {
            let mut bits = PTE_ACCESSED;
            if write && i + 1 == walked.len() {
                bits |= PTE_DIRTY;
            }
            if entry & bits != bits {
                self.set_bits(*addr, bits)?;
            }
        }
        Ok(pa | (gva & size_mask))
    }

    /// Atomically ORs `bits` into the page table entry at `addr`, as the CPU does, so a
    /// concurrent change by another vCPU is not lost.
    fn set_bits(&self, addr: u64, bits: u64) -> Result<(), AccessError> {
        let slice = self
            .memory
            .get_slice(GuestAddress(addr), 8)
            .map_err(|e| AccessError::Unusable(format!("page table entry at {addr:#x}: {e}")))?;
        let entry = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|e| AccessError::Unusable(format!("page table entry at {addr:#x}: {e}")))?;
        entry.fetch_or(bits, Ordering::SeqCst);
        Ok(())
    }

    /// Guest-physical chunks (address, length) covering `len` bytes at `gva`, split at 4 KiB
    /// boundaries.
    fn chunks(&self, gva: u64, len: usize, write: bool) -> Result<Vec<(u64, usize)>, AccessError> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            let n = ((0x1000 - (va & 0xfff)) as usize).min(len - done);
            out.push((self.translate_for(va, write)?, n));
            done += n;
        }
        Ok(out)
    }
}

impl GuestVirtualMemory for PagedMemory<'_> {
    fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let mut done = 0;
        for (pa, n) in self.chunks(gva, buf.len(), false)? {
            self.memory
                .read_slice(&mut buf[done..done + n], GuestAddress(pa))
                .map_err(|e| AccessError::Unusable(format!("guest memory at {pa:#x}: {e}")))?;
            done += n;
        }
        Ok(())
    }

    fn write(&self, gva: u64, data: &[u8]) -> Result<(), AccessError> {
        let mut done = 0;
        for (pa, n) in self.chunks(gva, data.len(), true)? {
            self.memory
                .write_slice(&data[done..done + n], GuestAddress(pa))
                .map_err(|e| AccessError::Unusable(format!("guest memory at {pa:#x}: {e}")))?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PML4: u64 = 0x1000;

    /// Guest memory with PML4 at 0x1000 -> PDPT at 0x2000; PDPT[0] -> PD at 0x3000, PDPT[1] =
    /// 1 GiB page at 0; PD[0] -> PT at 0x4000, PD[1] = 2 MiB page at 0x40_0000; PT[5] -> 0x9000
    /// (writable), PT[6] -> 0xa000 (read-only), PT[7] -> 0xb000 (writable).
    fn tables() -> GuestMemory {
        let memory = crate::memory::create_guest_memory(64).unwrap();
        let w = |addr: u64, val: u64| memory.write_obj(val, GuestAddress(addr)).unwrap();
        w(PML4, 0x2000 | 7);
        w(0x2000, 0x3000 | 7);
        w(0x2008, 0x83);
        w(0x3000, 0x4000 | 7);
        w(0x3008, 0x40_0000 | 0x83);
        w(0x4000 + 5 * 8, 0x9000 | 3);
        w(0x4000 + 6 * 8, 0xa000 | 1);
        w(0x4000 + 7 * 8, 0xb000 | 3);
        memory
    }

    fn paged(memory: &GuestMemory, cr0: u64) -> PagedMemory<'_> {
        PagedMemory { memory, sregs: kvm_sregs { cr0, efer: EFER_LMA, cr3: PML4, ..Default::default() } }
    }

    #[test]
    fn page_walk_follows_4k_2m_and_1g_mappings() {
        let memory = tables();
        let pm = paged(&memory, CR0_PG);
        assert_eq!(pm.translate(0x5123).unwrap(), 0x9123);
        assert_eq!(pm.translate(0x20_0456).unwrap(), 0x40_0456);
        assert_eq!(pm.translate((1 << 30) + 0x789).unwrap(), 0x789);
        assert_eq!(pm.translate(0x8000), Err(AccessError::PageFault { addr: 0x8000, error_code: 0 }));
    }

    #[test]
    fn writes_honour_read_only_pages_and_set_dirty() {
        let memory = tables();
        let pm = paged(&memory, CR0_PG | CR0_WP);
        assert_eq!(
            pm.write(0x6ff0, &[1; 4]),
            Err(AccessError::PageFault { addr: 0x6ff0, error_code: PF_PRESENT | PF_WRITE })
        );
        // Without CR0.WP the supervisor may write read-only pages.
        paged(&memory, CR0_PG).write(0x6ff0, &[1; 4]).unwrap();
        assert_eq!(memory.read_obj::<u32>(GuestAddress(0xaff0)).unwrap(), 0x0101_0101);
        pm.write(0x5000, &[2; 8]).unwrap();
        let pte: u64 = memory.read_obj(GuestAddress(0x4000 + 5 * 8)).unwrap();
        assert_eq!(pte & (PTE_ACCESSED | PTE_DIRTY), PTE_ACCESSED | PTE_DIRTY);
        let pde: u64 = memory.read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!(pde & (PTE_ACCESSED | PTE_DIRTY), PTE_ACCESSED, "only the final entry gets dirty");
    }

    #[test]
    fn accesses_crossing_pages_are_split_and_checked_up_front() {
        let memory = tables();
        let pm = paged(&memory, CR0_PG | CR0_WP);
        // 0x7ffc..0x8004 crosses from a mapped page into an unmapped one: nothing is written.
        assert_eq!(pm.write(0x7ffc, &[3; 8]), Err(AccessError::PageFault { addr: 0x8000, error_code: PF_WRITE }));
        assert_eq!(memory.read_obj::<u32>(GuestAddress(0xbffc)).unwrap(), 0);
        // 0x5ffc..0x6004 crosses from 0x9000 to 0xa000 (not contiguous physically).
        paged(&memory, CR0_PG).write(0x5ffc, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        let mut back = [0u8; 8];
        pm.read(0x5ffc, &mut back).unwrap();
        assert_eq!(back, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(memory.read_obj::<u32>(GuestAddress(0xa000)).unwrap(), 0x0706_0504);
    }

    #[test]
    fn user_mode_needs_user_pages() {
        let memory = tables();
        let mut pm = paged(&memory, CR0_PG);
        pm.sregs.cs.dpl = 3;
        // The 1 GiB page has U/S clear.
        assert_eq!(
            pm.translate(1 << 30),
            Err(AccessError::PageFault { addr: 1 << 30, error_code: PF_PRESENT | PF_USER })
        );
        assert!(pm.translate(0x5000).is_err(), "PT[5] is supervisor-only too");
    }
}
