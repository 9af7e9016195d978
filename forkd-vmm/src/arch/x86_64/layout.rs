//! Guest physical address layout.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  initial stack top       0x0000_9000  PML4, PDPT, PDs (identity map)
//! 0x0002_0000  kernel command line     0x0009_fc00  MP table (just below 640 KiB)
//! 0x0100_0000  kernel (ELF paddr)      ...          RAM up to 3 GiB
//! 0xc000_0000  MMIO gap: virtio-mmio devices from 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

pub const GDT_START: u64 = 0x500;
pub const BOOT_PARAMS_START: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
/// Page directories: one per GiB identity-mapped at boot.
pub const PD_START: u64 = 0xb000;
/// GiB identity-mapped by the boot page tables (the kernel builds its own very early).
pub const BOOT_IDENTITY_GIB: u64 = 4;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX: usize = 2048;
/// End of conventional memory; the MP table sits in the last KiB below it.
pub const EBDA_START: u64 = 0x9fc00;
pub const LOW_RAM_END: u64 = 0xa0000;
/// Start of "high memory" for the boot protocol (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap: no RAM between these addresses.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// RAM that does not fit below the gap continues here.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;

/// virtio-mmio device windows: one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel; keep them inside the gap, below the IOAPIC.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Legacy IRQs: serial on 4; virtio-mmio devices from 5 up to the IOAPIC's 24 pins.
pub const SERIAL_IRQ: u32 = 4;
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;
/// First COM port.
pub const SERIAL_PORT: u16 = 0x3f8;

/// RAM ranges as (guest address, length) for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (HIGH_RAM_START, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_at_the_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, MMIO_GAP_START), (HIGH_RAM_START, (4 << 30) - MMIO_GAP_START)]);
    }
}
