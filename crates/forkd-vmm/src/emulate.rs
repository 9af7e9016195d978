//! Completing guest instructions the host's KVM could not emulate.
//!
//! On hosts where KVM emulates guest kernel code (see docs/host-compat.md), a few instructions
//! make `KVM_RUN` return `KVM_EXIT_INTERNAL_ERROR`. CPUID shaping and kernel config avoid most
//! of them; for the rest, the VMM fetches the instruction at RIP (walking the guest's page
//! tables), decodes it with iced-x86 and, if it is one of the few simple instructions below,
//! performs it on the register file and advances RIP. Anything else becomes a clear error
//! naming the instruction, its bytes, and the kernel symbol it sits in.

use crate::memory::GuestMemory;
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress};

/// Why an instruction could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum EmulationFailure {
    #[error("the host cannot execute `{disasm}` (bytes {bytes}) at guest RIP {rip:#x}; hide the feature through CPUID or avoid it in the guest kernel (see docs/host-compat.md)")]
    Unsupported { rip: u64, bytes: String, disasm: String },
    #[error("emulation failed at guest RIP {rip:#x} and the instruction bytes are unreadable: {reason}")]
    Unreadable { rip: u64, reason: String },
    #[error("emulation failed: reading vCPU state: {0}")]
    Kvm(String),
}

impl EmulationFailure {
    pub fn rip(&self) -> u64 {
        match self {
            EmulationFailure::Unsupported { rip, .. } | EmulationFailure::Unreadable { rip, .. } => *rip,
            EmulationFailure::Kvm(_) => 0,
        }
    }
}

/// An instruction the VMM completed.
#[derive(Debug, Clone, Copy)]
pub struct Completed {
    pub rip: u64,
    pub mnemonic: &'static str,
    /// An exception vector to inject after updating the registers (trap semantics: the pushed
    /// RIP is the next instruction).
    pub inject: Option<u8>,
}

/// #BP, raised by INT3.
const VECTOR_BP: u8 = 3;

/// Reads guest-virtual memory for the emulator.
pub trait GuestVirtualMemory {
    fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// Guest-virtual access through the guest's own page tables (long mode or paging off).
pub struct PagedMemory<'a> {
    pub memory: &'a GuestMemory,
    pub sregs: kvm_sregs,
}

const PTE_PRESENT: u64 = 1;
const PTE_HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

impl PagedMemory<'_> {
    /// Translates a guest-virtual address to guest-physical.
    pub fn translate(&self, gva: u64) -> Result<u64, String> {
        if self.sregs.cr0 & CR0_PG == 0 {
            return Ok(gva);
        }
        if self.sregs.efer & EFER_LMA == 0 {
            return Err("guest uses 32-bit paging, which the fallback does not walk".into());
        }
        let entry = |table: u64, index: u64| -> Result<u64, String> {
            let addr = (table & ADDR_MASK) + index * 8;
            let e: u64 =
                self.memory.read_obj(GuestAddress(addr)).map_err(|e| format!("page table at {addr:#x}: {e}"))?;
            if e & PTE_PRESENT == 0 {
                return Err(format!("{gva:#x} is not mapped"));
            }
            Ok(e)
        };
        let pml4e = entry(self.sregs.cr3, (gva >> 39) & 0x1ff)?;
        let pdpte = entry(pml4e, (gva >> 30) & 0x1ff)?;
        if pdpte & PTE_HUGE != 0 {
            return Ok((pdpte & 0x000f_ffff_c000_0000) | (gva & 0x3fff_ffff));
        }
        let pde = entry(pdpte, (gva >> 21) & 0x1ff)?;
        if pde & PTE_HUGE != 0 {
            return Ok((pde & 0x000f_ffff_ffe0_0000) | (gva & 0x1f_ffff));
        }
        let pte = entry(pde, (gva >> 12) & 0x1ff)?;
        Ok((pte & ADDR_MASK) | (gva & 0xfff))
    }
}

impl GuestVirtualMemory for PagedMemory<'_> {
    fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut done = 0;
        while done < buf.len() {
            let va = gva.wrapping_add(done as u64);
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let n = in_page.min(buf.len() - done);
            let pa = self.translate(va)?;
            self.memory
                .read_slice(&mut buf[done..done + n], GuestAddress(pa))
                .map_err(|e| format!("guest memory at {pa:#x}: {e}"))?;
            done += n;
        }
        Ok(())
    }
}

/// Fetches, decodes and, if supported, completes the instruction at the vCPU's RIP.
pub fn complete_instruction(fd: &VcpuFd, memory: &GuestMemory) -> Result<Completed, EmulationFailure> {
    let mut regs = fd.get_regs().map_err(|e| EmulationFailure::Kvm(e.to_string()))?;
    let sregs = fd.get_sregs().map_err(|e| EmulationFailure::Kvm(e.to_string()))?;
    let mem = PagedMemory { memory, sregs };
    let done = complete(&mut regs, &sregs, &mem)?;
    fd.set_regs(&regs).map_err(|e| EmulationFailure::Kvm(e.to_string()))?;
    if let Some(vector) = done.inject {
        let mut events = fd.get_vcpu_events().map_err(|e| EmulationFailure::Kvm(e.to_string()))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        fd.set_vcpu_events(&events).map_err(|e| EmulationFailure::Kvm(e.to_string()))?;
    }
    Ok(done)
}

/// The pure part of `complete_instruction`: decode at `regs.rip` and update `regs`.
pub fn complete(
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &dyn GuestVirtualMemory,
) -> Result<Completed, EmulationFailure> {
    let rip = regs.rip;
    let linear = sregs.cs.base.wrapping_add(rip);
    let mut bytes = [0u8; 15];
    // Read as much of the maximal instruction length as is mapped.
    let mut len = bytes.len();
    while len > 0 && mem.read(linear, &mut bytes[..len]).is_err() {
        len -= 1;
    }
    if len == 0 {
        let reason = mem.read(linear, &mut bytes[..1]).err().unwrap_or_default();
        return Err(EmulationFailure::Unreadable { rip, reason });
    }
    let bitness = if sregs.cs.l == 1 {
        64
    } else if sregs.cs.db == 1 {
        32
    } else {
        16
    };
    let mut decoder = Decoder::with_ip(bitness, &bytes[..len], rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    let unsupported = || {
        let mut disasm = String::new();
        IntelFormatter::new().format(&insn, &mut disasm);
        if insn.is_invalid() {
            disasm = "(invalid instruction)".into();
        }
        let shown = &bytes[..insn.len().max(1).min(len)];
        EmulationFailure::Unsupported { rip, bytes: hex_bytes(shown), disasm }
    };
    if insn.is_invalid() {
        return Err(unsupported());
    }
    let mut inject = None;
    let mnemonic = match insn.mnemonic() {
        Mnemonic::Wait => "fwait",
        Mnemonic::Int3 => {
            inject = Some(VECTOR_BP);
            "int3"
        }
        Mnemonic::Popcnt => {
            let src = read_source(&insn, regs, sregs, mem).ok_or_else(unsupported)?;
            let count = src.count_ones() as u64;
            write_dest(&insn, regs, count).ok_or_else(unsupported)?;
            regs.rflags = (regs.rflags & !ARITH_FLAGS) | if src == 0 { FLAG_ZF } else { 0 };
            "popcnt"
        }
        Mnemonic::Lzcnt => {
            let width = insn.op0_register().size() as u32 * 8;
            let src = read_source(&insn, regs, sregs, mem).ok_or_else(unsupported)?;
            let count = if src == 0 { width } else { src.leading_zeros() - (64 - width) } as u64;
            write_dest(&insn, regs, count).ok_or_else(unsupported)?;
            let cf = if src == 0 { FLAG_CF } else { 0 };
            let zf = if count == 0 { FLAG_ZF } else { 0 };
            regs.rflags = (regs.rflags & !ARITH_FLAGS) | cf | zf;
            "lzcnt"
        }
        _ => return Err(unsupported()),
    };
    regs.rip = insn.next_ip();
    Ok(Completed { rip, mnemonic, inject })
}

const FLAG_CF: u64 = 1 << 0;
const FLAG_ZF: u64 = 1 << 6;
/// CF, PF, AF, ZF, SF, OF.
const ARITH_FLAGS: u64 = 0x8d5;

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn gpr(regs: &mut kvm_regs, reg: Register) -> Option<&mut u64> {
    Some(match reg.full_register() {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

fn width_mask(bytes: usize) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

/// Reads operand 1 (register or memory) zero-extended to 64 bits.
fn read_source(
    insn: &Instruction,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &dyn GuestVirtualMemory,
) -> Option<u64> {
    let size = insn.op0_register().size();
    match insn.op1_kind() {
        OpKind::Register => {
            let reg = insn.op1_register();
            let value = *gpr(regs, reg)?;
            // Only low 8-bit registers (AL..) reach here for 8-bit forms; those do not exist
            // for POPCNT/LZCNT, so treat every source as its natural width.
            Some(value & width_mask(reg.size()))
        }
        OpKind::Memory => {
            let mut addr = insn.memory_displacement64();
            if !insn.is_ip_rel_memory_operand() {
                if insn.memory_base() != Register::None {
                    addr = addr.wrapping_add(*gpr(regs, insn.memory_base())?);
                }
                if insn.memory_index() != Register::None {
                    let index = *gpr(regs, insn.memory_index())?;
                    addr = addr.wrapping_add(index.wrapping_mul(insn.memory_index_scale() as u64));
                }
            }
            addr = addr.wrapping_add(match insn.memory_segment() {
                Register::FS => sregs.fs.base,
                Register::GS => sregs.gs.base,
                _ => 0,
            });
            let mut buf = [0u8; 8];
            mem.read(addr, &mut buf[..size]).ok()?;
            Some(u64::from_le_bytes(buf) & width_mask(size))
        }
        _ => None,
    }
}

/// Writes operand 0 with x86 width semantics (32-bit writes zero the upper half).
fn write_dest(insn: &Instruction, regs: &mut kvm_regs, value: u64) -> Option<()> {
    let reg = insn.op0_register();
    let size = reg.size();
    let slot = gpr(regs, reg)?;
    *slot = match size {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        _ => return None,
    };
    Some(())
}

static COUNTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts a completed instruction (reported in the VMM's status).
pub fn record(mnemonic: &'static str) {
    *crate::bus::lock(&COUNTS).entry(mnemonic).or_insert(0) += 1;
}

/// How many instructions of each kind the VMM completed so far.
pub fn counts() -> BTreeMap<&'static str, u64> {
    crate::bus::lock(&COUNTS).clone()
}

/// Kernel symbols from a `System.map`, for naming guest addresses.
pub struct Symbols {
    sorted: Vec<(u64, String)>,
}

impl Symbols {
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut sorted: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                matches!(kind, "T" | "t" | "W" | "w").then(|| (addr, name.to_string()))
            })
            .collect();
        sorted.sort();
        Self { sorted }
    }

    /// `function+0xoffset` for a code address, if it falls inside the kernel text.
    pub fn describe(&self, addr: u64) -> Option<String> {
        let idx = self.sorted.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (base, name) = &self.sorted[idx];
        (addr - base < 0x10_0000).then(|| format!("{name}+{:#x}", addr - base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_segment;

    /// Flat guest-virtual memory: address == offset into a byte vector.
    struct Flat(Vec<u8>);
    impl GuestVirtualMemory for Flat {
        fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), String> {
            let start = gva as usize;
            let src = self.0.get(start..start + buf.len()).ok_or("unmapped")?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn long_mode() -> kvm_sregs {
        kvm_sregs { cs: kvm_segment { l: 1, ..Default::default() }, ..Default::default() }
    }

    fn run(code: &[u8], regs: &mut kvm_regs) -> Result<Completed, EmulationFailure> {
        let mut mem = vec![0u8; 0x2000];
        mem[0x100..0x100 + code.len()].copy_from_slice(code);
        mem[0x1000..0x1008].copy_from_slice(&0xf0f0u64.to_le_bytes());
        regs.rip = 0x100;
        complete(regs, &long_mode(), &Flat(mem))
    }

    #[test]
    fn fwait_is_skipped() {
        let mut regs = kvm_regs::default();
        let done = run(&[0x9b], &mut regs).unwrap();
        assert_eq!(done.mnemonic, "fwait");
        assert_eq!(regs.rip, 0x101);
        assert_eq!(done.inject, None);
    }

    #[test]
    fn int3_advances_and_injects_a_breakpoint() {
        let mut regs = kvm_regs::default();
        let done = run(&[0xcc], &mut regs).unwrap();
        assert_eq!((done.mnemonic, done.inject, regs.rip), ("int3", Some(3), 0x101));
    }

    #[test]
    fn popcnt_register_and_memory_forms() {
        // popcnt rax, rcx
        let mut regs = kvm_regs { rcx: 0xff00_0000_0000_0001, rflags: 0x2 | FLAG_ZF, ..Default::default() };
        run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1], &mut regs).unwrap();
        assert_eq!(regs.rax, 9);
        assert_eq!(regs.rflags & FLAG_ZF, 0);
        assert_eq!(regs.rip, 0x105);
        // popcnt eax, ecx zero-extends and sets ZF for a zero source
        let mut regs = kvm_regs { rax: u64::MAX, rcx: 0xffff_ffff_0000_0000, ..Default::default() };
        run(&[0xf3, 0x0f, 0xb8, 0xc1], &mut regs).unwrap();
        assert_eq!(regs.rax, 0);
        assert_ne!(regs.rflags & FLAG_ZF, 0);
        // popcnt rdx, [rbx+8]
        let mut regs = kvm_regs { rbx: 0x1000 - 8, ..Default::default() };
        run(&[0xf3, 0x48, 0x0f, 0xb8, 0x53, 0x08], &mut regs).unwrap();
        assert_eq!(regs.rdx, 8);
    }

    #[test]
    fn lzcnt_counts_at_operand_width() {
        let mut regs = kvm_regs { rcx: 1, ..Default::default() };
        run(&[0xf3, 0x0f, 0xbd, 0xc1], &mut regs).unwrap(); // lzcnt eax, ecx
        assert_eq!(regs.rax, 31);
        let mut regs = kvm_regs { rcx: 0, ..Default::default() };
        run(&[0xf3, 0x48, 0x0f, 0xbd, 0xc1], &mut regs).unwrap(); // lzcnt rax, rcx
        assert_eq!(regs.rax, 64);
        assert_ne!(regs.rflags & FLAG_CF, 0);
    }

    #[test]
    fn unsupported_instructions_are_named() {
        let mut regs = kvm_regs::default();
        // xrstor [rdi]
        let err = run(&[0x0f, 0xae, 0x2f], &mut regs).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("xrstor"), "{msg}");
        assert!(msg.contains("0f ae 2f"), "{msg}");
        assert_eq!(regs.rip, 0x100, "rip untouched on failure");
    }

    #[test]
    fn page_walk_follows_4k_2m_and_1g_mappings() {
        let memory = crate::memory::create_guest_memory(64).unwrap();
        let w = |addr: u64, val: u64| memory.write_obj(val, GuestAddress(addr)).unwrap();
        // PML4 at 0x1000 -> PDPT at 0x2000; PDPT[0] -> PD at 0x3000; PDPT[1] = 1G page at 0.
        w(0x1000, 0x2000 | 3);
        w(0x2000, 0x3000 | 3);
        w(0x2008, 0x83);
        // PD[0] -> PT at 0x4000; PD[1] = 2M page at 0x40_0000.
        w(0x3000, 0x4000 | 3);
        w(0x3008, 0x40_0000 | 0x83);
        w(0x4000 + 5 * 8, 0x9000 | 3);
        let sregs = kvm_sregs { cr0: CR0_PG, efer: EFER_LMA, cr3: 0x1000, ..Default::default() };
        let pm = PagedMemory { memory: &memory, sregs };
        assert_eq!(pm.translate(0x5123).unwrap(), 0x9123);
        assert_eq!(pm.translate(0x20_0456).unwrap(), 0x40_0456);
        assert_eq!(pm.translate((1 << 30) + 0x789).unwrap(), 0x789);
        assert!(pm.translate(0x6000).is_err());
    }

    #[test]
    fn symbols_name_addresses() {
        let s = Symbols::parse("ffffffff81000000 T _text\nffffffff81000100 t foo\nffffffff81000200 D data\n");
        assert_eq!(s.describe(0xffffffff81000104).as_deref(), Some("foo+0x4"));
        assert_eq!(s.describe(0x1000), None);
    }
}
