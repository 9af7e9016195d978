//! MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs, its IOAPIC
//! and the routing of the 24 legacy interrupt pins.
//!
//! Layout at `EBDA_START`: the 16-byte floating pointer, then the configuration table header
//! and its entries. Linux scans the last KiB below 640 KiB, which is where this lives.

use super::layout::{EBDA_START, IOAPIC_PINS, IOAPIC_START, LAPIC_START, LOW_RAM_END};
use crate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// The table must fit the reserved KiB below 640 KiB.
pub const MAX_CPUS: u8 = 32;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4); // family 6, model 1
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9); // FPU, APIC
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; between 1 and {MAX_CPUS} are supported")]
    CpuCount(u8),
    #[error("MP table does not fit below 640 KiB ({0} bytes)")]
    TooLarge(usize),
    #[error("writing the MP table to guest memory failed: {0}")]
    GuestWrite(String),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer + configuration table, to be placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let config_addr = base + 16;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS as u8 {
        let kind = if pin == 0 { INT_TYPE_EXTINT } else { INT_TYPE_INT };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, ISA_BUS_ID, pin, ioapic_id, pin]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, patched below
    header.extend_from_slice(b"FORKD   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&[0; 4]); // OEM table pointer
    header.extend_from_slice(&[0; 2]); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length + checksum + reserved
    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(config_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units
    floating[10] = checksum(&floating);

    let mut table = floating;
    table.extend_from_slice(&config);
    if base + table.len() as u64 > LOW_RAM_END {
        return Err(MpTableError::TooLarge(table.len()));
    }
    Ok(table)
}

/// Writes the MP table for `num_cpus` vCPUs at `EBDA_START`.
pub fn write(memory: &GuestMemory, num_cpus: u8) -> Result<(), MpTableError> {
    let table = build(num_cpus, EBDA_START)?;
    memory.write_slice(&table, GuestAddress(EBDA_START)).map_err(|e| MpTableError::GuestWrite(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_valid() {
        for cpus in [1u8, 2, 8, MAX_CPUS] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let config = &t[16..];
            assert_eq!(&config[..4], b"PCMP");
            let len = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(len, config.len());
            assert_eq!(sum(config), 0, "config table checksum");
            let count = u16::from_le_bytes([config[34], config[35]]);
            assert_eq!(count as usize, cpus as usize + 1 + 1 + IOAPIC_PINS as usize + 2);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(matches!(build(0, EBDA_START), Err(MpTableError::CpuCount(0))));
        assert!(matches!(build(MAX_CPUS + 1, EBDA_START), Err(MpTableError::CpuCount(_))));
    }
}
