//! The 64-bit Linux boot protocol: kernel ELF loading, command line, and the zero page
//! (`boot_params`) with its e820 memory map.
//!
//! We enter the kernel's 64-bit entry point directly in long mode (see `regs.rs`), so no
//! real-mode setup code or firmware runs: the zero page is the only contract.

use super::layout::*;
use crate::memory::{ram_size, GuestMemory};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::fs::File;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest kernel {path} does not exist; run `forkd kernel build` or pass --kernel PATH")]
    KernelMissing { path: String },
    #[error("cannot open guest kernel {path}: {source}")]
    KernelOpen { path: String, source: std::io::Error },
    #[error("{path} is not a loadable x86_64 vmlinux ELF ({reason}); pass the uncompressed `vmlinux`, not bzImage")]
    KernelLoad { path: String, reason: String },
    #[error("kernel command line is {len} bytes, over the {max}-byte limit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot data to guest memory failed: {0}")]
    GuestWrite(String),
}

/// Where the loaded kernel sits and where to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: u64,
    pub end: u64,
}

/// Loads an ELF `vmlinux` at its physical load address.
pub fn load_kernel(memory: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(BootError::KernelMissing { path: shown });
    }
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen { path: shown.clone(), source })?;
    let result = Elf::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BootError::KernelLoad { path: shown, reason: e.to_string() })?;
    Ok(LoadedKernel { entry: result.kernel_load.0, end: result.kernel_end })
}

/// Writes the NUL-terminated command line at `CMDLINE_START`.
pub fn write_cmdline(memory: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX - 1 });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory.write_slice(&bytes, GuestAddress(CMDLINE_START)).map_err(|e| BootError::GuestWrite(e.to_string()))
}

/// The e820 map the guest sees: low RAM, the MP table page, RAM above 1 MiB, RAM above 4 GiB.
pub fn e820_map(ram: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, kind| boot_e820_entry { addr, size, r#type: kind };
    let mut map = vec![entry(0, EBDA_START, E820_RAM), entry(EBDA_START, LOW_RAM_END - EBDA_START, E820_RESERVED)];
    for (start, len) in ram_ranges(ram) {
        let (start, len) = if start == 0 { (HIMEM_START, len - HIMEM_START) } else { (start, len) };
        map.push(entry(start, len, E820_RAM));
    }
    map
}

/// Fills and writes the zero page.
pub fn write_boot_params(memory: &GuestMemory, cmdline_len: usize) -> Result<(), BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    let map = e820_map(ram_size(memory));
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    memory.write_obj(params, GuestAddress(BOOT_PARAMS_START)).map_err(|e| BootError::GuestWrite(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn e820_covers_ram_and_skips_holes() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!((map[2].addr, map[2].size), (HIMEM_START, (256 << 20) - HIMEM_START));
        let big = e820_map(8 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!((big[3].addr, big[3].size), (HIGH_RAM_START, (8 << 30) - MMIO_GAP_START));
        let ram: u64 = big.iter().filter(|e| e.r#type == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (8 << 30) - (LOW_RAM_END - EBDA_START) - (HIMEM_START - LOW_RAM_END));
    }

    #[test]
    fn zero_page_and_cmdline_land_in_memory() {
        let mem = create_guest_memory(128).unwrap();
        write_cmdline(&mem, "console=ttyS0 quiet").unwrap();
        write_boot_params(&mem, 19).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(BOOT_PARAMS_START)).unwrap();
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!(params.e820_entries, 3);
        let mut buf = [0u8; 20];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn bad_cmdlines_and_kernels_are_clear_errors() {
        let mem = create_guest_memory(64).unwrap();
        assert!(matches!(write_cmdline(&mem, &"x".repeat(4096)), Err(BootError::CmdlineTooLong { .. })));
        assert!(matches!(write_cmdline(&mem, "a\0b"), Err(BootError::CmdlineNul)));
        let missing = load_kernel(&mem, Path::new("/no/such/vmlinux")).unwrap_err();
        assert!(missing.to_string().contains("forkd kernel build"));
        let garbage = tempfile_with(b"not an elf at all, just bytes");
        let err = load_kernel(&mem, garbage.path()).unwrap_err();
        assert!(matches!(err, BootError::KernelLoad { .. }), "{err}");
    }

    fn tempfile_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }
}
