//! Operands of a decoded instruction: general-purpose registers and memory-operand addresses.

use super::paging::GuestVirtualMemory;
use iced_x86::{Instruction, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

pub(super) fn gpr(regs: &mut kvm_regs, reg: Register) -> Option<&mut u64> {
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

/// The linear address of the instruction's memory operand: base + index * scale + displacement
/// (RIP-relative targets are already resolved by the decoder), wrapped to the address size, plus
/// the FS/GS base (the other segment bases are zero in 64-bit mode). `None` for registers the
/// emulator does not model.
pub(super) fn memory_address(insn: &Instruction, regs: &mut kvm_regs, sregs: &kvm_sregs) -> Option<u64> {
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
    let address_size =
        [insn.memory_base(), insn.memory_index()].into_iter().find(|r| *r != Register::None).map_or(8, |r| r.size());
    addr &= width_mask(address_size);
    Some(addr.wrapping_add(match insn.memory_segment() {
        Register::FS => sregs.fs.base,
        Register::GS => sregs.gs.base,
        _ => 0,
    }))
}

/// Reads operand 1 (register or memory) zero-extended to 64 bits.
pub(super) fn read_source(
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
            let addr = memory_address(insn, regs, sregs)?;
            let mut buf = [0u8; 8];
            mem.read(addr, buf.get_mut(..size)?).ok()?;
            Some(u64::from_le_bytes(buf) & width_mask(size))
        }
        _ => None,
    }
}

/// Writes operand 0 with x86 width semantics (32-bit writes zero the upper half).
pub(super) fn write_dest(insn: &Instruction, regs: &mut kvm_regs, value: u64) -> Option<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};
    use kvm_bindings::kvm_segment;

    fn address(code: &[u8], regs: &mut kvm_regs, sregs: &kvm_sregs) -> Option<u64> {
        let insn = Decoder::with_ip(64, code, 0x1000, DecoderOptions::NONE).decode();
        assert!(!insn.is_invalid());
        memory_address(&insn, regs, sregs)
    }

    #[test]
    fn memory_operand_addresses() {
        let sregs = kvm_sregs { gs: kvm_segment { base: 0x10_0000, ..Default::default() }, ..Default::default() };
        let mut regs = kvm_regs { rdi: 0x4000, rbx: 0x100, rcx: 3, r12: 0x7000, ..Default::default() };
        // xsave64 [rdi]
        assert_eq!(address(&[0x48, 0x0f, 0xae, 0x27], &mut regs, &sregs), Some(0x4000));
        // xrstor64 [rbx+rcx*8+0x40]
        assert_eq!(address(&[0x48, 0x0f, 0xae, 0x6c, 0xcb, 0x40], &mut regs, &sregs), Some(0x100 + 24 + 0x40));
        // xsaveopt [r12-0x10]
        assert_eq!(address(&[0x41, 0x0f, 0xae, 0x74, 0x24, 0xf0], &mut regs, &sregs), Some(0x7000 - 0x10));
        // xsave gs:[rdi]
        assert_eq!(address(&[0x65, 0x0f, 0xae, 0x27], &mut regs, &sregs), Some(0x10_4000));
        // xsave [rip+0x10] at 0x1000 (7 bytes long)
        assert_eq!(address(&[0x0f, 0xae, 0x25, 0x10, 0, 0, 0], &mut regs, &sregs), Some(0x1000 + 7 + 0x10));
        // 32-bit address size wraps: xsave [edi-1] with edi = 0
        let mut regs = kvm_regs { rdi: 0xffff_ffff_0000_0000, ..Default::default() };
        assert_eq!(address(&[0x67, 0x0f, 0xae, 0x67, 0xff], &mut regs, &sregs), Some(0xffff_ffff));
    }
}
