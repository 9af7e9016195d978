//! Completing guest instructions the host's KVM could not emulate.
//!
//! On hosts where KVM emulates guest kernel code (see docs/host-compat.md), a few instructions
//! make `KVM_RUN` return `KVM_EXIT_INTERNAL_ERROR`. CPUID shaping and kernel config avoid most
//! of them; for the rest, the VMM fetches the instruction at RIP (walking the guest's page
//! tables), decodes it with iced-x86 and, if it is one it knows, performs it on the vCPU's state
//! and advances RIP, or delivers the exception the instruction raises. Anything else becomes a
//! clear error naming the instruction, its bytes, and the kernel symbol it sits in.
//!
//! Modules: `paging` (guest-virtual memory), `operand` (registers and memory operands),
//! `xsave` (the XSAVE family against KVM_GET/SET_XSAVE), `symbols` (System.map).

mod operand;
pub mod paging;
mod symbols;
pub mod xsave;

pub use paging::{AccessError, GuestVirtualMemory, PagedMemory};
pub use symbols::Symbols;

use crate::memory::GuestMemory;
use iced_x86::{Code, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic};
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};
use kvm_ioctls::VcpuFd;
use operand::{read_source, write_dest};
use std::collections::BTreeMap;
use std::sync::Mutex;
use xsave::{ExtendedState, Layout};

/// Why an instruction could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum EmulationFailure {
    #[error("the host cannot execute `{disasm}` (bytes {bytes}) at guest RIP {rip:#x}; hide the feature through CPUID or avoid it in the guest kernel (see docs/host-compat.md)")]
    Unsupported { rip: u64, bytes: String, disasm: String },
    #[error("emulation failed at guest RIP {rip:#x} and the instruction bytes are unreadable: {reason}")]
    Unreadable { rip: u64, reason: String },
    #[error("completing `{disasm}` at guest RIP {rip:#x} failed: {reason}")]
    Failed { rip: u64, disasm: String, reason: String },
    #[error("emulation failed: vCPU state: {0}")]
    Kvm(String),
}

impl EmulationFailure {
    pub fn rip(&self) -> u64 {
        match self {
            EmulationFailure::Unsupported { rip, .. }
            | EmulationFailure::Unreadable { rip, .. }
            | EmulationFailure::Failed { rip, .. } => *rip,
            EmulationFailure::Kvm(_) => 0,
        }
    }
}

/// An exception the emulated instruction raises in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    /// #BP from INT3: a trap, so RIP is already past the instruction.
    Breakpoint,
    /// #UD.
    InvalidOpcode,
    /// #GP(0).
    GeneralProtection,
    /// #PF at `addr` (CR2) with `error_code`.
    PageFault { addr: u64, error_code: u32 },
}

impl Exception {
    pub fn vector(&self) -> u8 {
        match self {
            Exception::Breakpoint => 3,
            Exception::InvalidOpcode => 6,
            Exception::GeneralProtection => 13,
            Exception::PageFault { .. } => 14,
        }
    }

    pub fn error_code(&self) -> Option<u32> {
        match self {
            Exception::Breakpoint | Exception::InvalidOpcode => None,
            Exception::GeneralProtection => Some(0),
            Exception::PageFault { error_code, .. } => Some(*error_code),
        }
    }
}

/// An instruction the VMM completed.
#[derive(Debug, Clone, Copy)]
pub struct Completed {
    pub rip: u64,
    /// What was done, for the counters: the mnemonic, with " (fault)" when the instruction
    /// raised an exception instead of completing.
    pub mnemonic: &'static str,
    /// An exception to inject after updating the registers. For faults RIP stays on the
    /// instruction; for the INT3 trap it points past it.
    pub inject: Option<Exception>,
}

/// The vCPU's extended state through KVM_GET_XSAVE / KVM_SET_XSAVE / KVM_GET_XCRS.
struct KvmExtendedState<'a>(&'a VcpuFd);

/// XCR0's index in `kvm_xcrs`.
const XCR_XFEATURE_ENABLED_MASK: u32 = 0;

impl ExtendedState for KvmExtendedState<'_> {
    fn xcr0(&mut self) -> Result<u64, String> {
        let xcrs = self.0.get_xcrs().map_err(|e| format!("KVM_GET_XCRS: {e}"))?;
        let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        Ok(xcrs.xcrs[..n].iter().find(|x| x.xcr == XCR_XFEATURE_ENABLED_MASK).map_or(1, |x| x.value))
    }

    fn get(&mut self) -> Result<Box<xsave::Region>, String> {
        let state = self.0.get_xsave().map_err(|e| format!("KVM_GET_XSAVE: {e}"))?;
        let mut region = Box::new([0u8; xsave::REGION_SIZE]);
        for (dst, word) in region.chunks_exact_mut(4).zip(state.region.iter()) {
            dst.copy_from_slice(&word.to_le_bytes());
        }
        Ok(region)
    }

    fn set(&mut self, region: &xsave::Region) -> Result<(), String> {
        if Layout::host().max_size() > xsave::REGION_SIZE {
            return Err("the host's XSAVE area is larger than KVM_SET_XSAVE's 4 KiB region".into());
        }
        let mut state = kvm_xsave::default();
        for (word, src) in state.region.iter_mut().zip(region.chunks_exact(4)) {
            *word = u32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        }
        // SAFETY: KVM reads its uabi XSAVE size from the pointer; that is the 4 KiB region here,
        // because no state component the host supports lies beyond it (checked above).
        unsafe { self.0.set_xsave(&state) }.map_err(|e| format!("KVM_SET_XSAVE: {e}"))
    }
}

/// Fetches, decodes and, if supported, completes the instruction at the vCPU's RIP.
pub fn complete_instruction(fd: &VcpuFd, memory: &GuestMemory) -> Result<Completed, EmulationFailure> {
    let kvm = |e: kvm_ioctls::Error| EmulationFailure::Kvm(e.to_string());
    let mut regs = fd.get_regs().map_err(kvm)?;
    let mut sregs = fd.get_sregs().map_err(kvm)?;
    let mem = PagedMemory { memory, sregs };
    let done = complete(&mut regs, &sregs, &mem, &mut KvmExtendedState(fd), Layout::host())?;
    fd.set_regs(&regs).map_err(kvm)?;
    if let Some(exception) = done.inject {
        if let Exception::PageFault { addr, .. } = exception {
            sregs.cr2 = addr;
            fd.set_sregs(&sregs).map_err(kvm)?;
        }
        let mut events = fd.get_vcpu_events().map_err(kvm)?;
        events.exception.injected = 1;
        events.exception.nr = exception.vector();
        events.exception.has_error_code = exception.error_code().is_some() as u8;
        events.exception.error_code = exception.error_code().unwrap_or(0);
        fd.set_vcpu_events(&events).map_err(kvm)?;
    }
    Ok(done)
}

/// The KVM-independent part of `complete_instruction`: decode at `regs.rip`, then update
/// `regs` and the extended state `xstate` (laid out as `layout`).
pub fn complete(
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &dyn GuestVirtualMemory,
    xstate: &mut dyn ExtendedState,
    layout: &Layout,
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
        let reason = mem.read(linear, &mut bytes[..1]).err().map(|e| e.to_string()).unwrap_or_default();
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
    let disasm = || {
        if insn.is_invalid() {
            return "(invalid instruction)".to_string();
        }
        let mut text = String::new();
        IntelFormatter::new().format(&insn, &mut text);
        text
    };
    let unsupported = || {
        let shown = &bytes[..insn.len().max(1).min(len)];
        EmulationFailure::Unsupported { rip, bytes: hex_bytes(shown), disasm: disasm() }
    };
    if insn.is_invalid() {
        return Err(unsupported());
    }
    let mut inject = None;
    let mnemonic = match insn.mnemonic() {
        Mnemonic::Wait => "fwait",
        Mnemonic::Int3 => {
            inject = Some(Exception::Breakpoint);
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
        _ => match xsave_request(&insn, regs, sregs) {
            Some(Ok(req)) => {
                let fault = xsave::execute(&req, xstate, layout, mem).map_err(|e| EmulationFailure::Failed {
                    rip,
                    disasm: disasm(),
                    reason: e.to_string(),
                })?;
                return Ok(finish(regs, &insn, xsave_name(req.op, fault.is_some()), fault));
            }
            Some(Err(fault)) => return Ok(finish(regs, &insn, "xsave family (fault)", Some(fault))),
            None => return Err(unsupported()),
        },
    };
    regs.rip = insn.next_ip();
    Ok(Completed { rip, mnemonic, inject })
}

/// Result of an instruction that either completed (RIP advances) or faulted (RIP stays).
fn finish(regs: &mut kvm_regs, insn: &Instruction, mnemonic: &'static str, fault: Option<Exception>) -> Completed {
    let rip = regs.rip;
    if fault.is_none() {
        regs.rip = insn.next_ip();
    }
    Completed { rip, mnemonic, inject: fault }
}

const CR4_OSXSAVE: u64 = 1 << 18;

/// The XSAVE-family request `insn` makes; `None` if it is not one the VMM completes, an
/// exception if it faults before touching state (#UD with a LOCK prefix or CR4.OSXSAVE clear).
fn xsave_request(
    insn: &Instruction,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
) -> Option<Result<xsave::Request, Exception>> {
    use xsave::Op;
    let (op, rex_w) = match insn.code() {
        Code::Xsave_mem => (Op::Xsave, false),
        Code::Xsave64_mem => (Op::Xsave, true),
        Code::Xsaveopt_mem => (Op::Xsaveopt, false),
        Code::Xsaveopt64_mem => (Op::Xsaveopt, true),
        Code::Xrstor_mem => (Op::Xrstor, false),
        Code::Xrstor64_mem => (Op::Xrstor, true),
        _ => return None,
    };
    if insn.has_lock_prefix() || sregs.cr4 & CR4_OSXSAVE == 0 {
        return Some(Err(Exception::InvalidOpcode));
    }
    let addr = operand::memory_address(insn, regs, sregs)?;
    let mask = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
    Some(Ok(xsave::Request { op, addr, mask, rex_w }))
}

fn xsave_name(op: xsave::Op, faulted: bool) -> &'static str {
    use xsave::Op;
    match (op, faulted) {
        (Op::Xsave, false) => "xsave",
        (Op::Xsave, true) => "xsave (fault)",
        (Op::Xsaveopt, false) => "xsaveopt",
        (Op::Xsaveopt, true) => "xsaveopt (fault)",
        (Op::Xrstor, false) => "xrstor",
        (Op::Xrstor, true) => "xrstor (fault)",
    }
}

const FLAG_CF: u64 = 1 << 0;
const FLAG_ZF: u64 = 1 << 6;
/// CF, PF, AF, ZF, SF, OF.
const ARITH_FLAGS: u64 = 0x8d5;

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
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

#[cfg(test)]
pub(crate) mod tests;
