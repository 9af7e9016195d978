//! Tests of instruction dispatch: fetch, decode, register updates, RIP, exceptions.

use super::xsave::testing::{amd_layout, FakeState};
use super::*;
use kvm_bindings::kvm_segment;

/// Flat guest-virtual memory: address == offset into a byte vector.
pub(super) struct Flat(pub std::cell::RefCell<Vec<u8>>);

impl Flat {
    pub(super) fn new(size: usize) -> Self {
        Flat(std::cell::RefCell::new(vec![0u8; size]))
    }
}

impl GuestVirtualMemory for Flat {
    fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let start = gva as usize;
        let mem = self.0.borrow();
        let src = mem.get(start..start + buf.len()).ok_or(AccessError::PageFault { addr: gva, error_code: 0 })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&self, gva: u64, data: &[u8]) -> Result<(), AccessError> {
        let start = gva as usize;
        let mut mem = self.0.borrow_mut();
        let dst = mem.get_mut(start..start + data.len()).ok_or(AccessError::PageFault { addr: gva, error_code: 2 })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

fn long_mode() -> kvm_sregs {
    kvm_sregs { cs: kvm_segment { l: 1, ..Default::default() }, cr4: CR4_OSXSAVE, ..Default::default() }
}

fn run_with(
    code: &[u8],
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &Flat,
    state: &mut FakeState,
) -> Result<Completed, EmulationFailure> {
    mem.0.borrow_mut()[0x100..0x100 + code.len()].copy_from_slice(code);
    regs.rip = 0x100;
    complete(regs, sregs, mem, state, &amd_layout())
}

fn run(code: &[u8], regs: &mut kvm_regs) -> Result<Completed, EmulationFailure> {
    let mem = Flat::new(0x2000);
    mem.0.borrow_mut()[0x1000..0x1008].copy_from_slice(&0xf0f0u64.to_le_bytes());
    run_with(code, regs, &long_mode(), &mem, &mut FakeState::new(0x3))
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
    assert_eq!((done.mnemonic, done.inject, regs.rip), ("int3", Some(Exception::Breakpoint), 0x101));
    assert_eq!(Exception::Breakpoint.vector(), 3);
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
    // xsaves [rdi]: the compacted, supervisor form is not completed
    let err = run(&[0x0f, 0xc7, 0x2f], &mut regs).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("xsaves"), "{msg}");
    assert!(msg.contains("0f c7 2f"), "{msg}");
    assert_eq!(regs.rip, 0x100, "rip untouched on failure");
}

#[test]
fn xsave_uses_the_memory_operand_and_advances_rip() {
    let mem = Flat::new(0x4000);
    let mut state = FakeState::new(0xe7);
    // xsave64 [rdi+0x40] with EDX:EAX = all
    let mut regs = kvm_regs { rdi: 0x1000 - 0x40, rax: 0xffff_ffff, rdx: 0xffff_ffff, ..Default::default() };
    let done = run_with(&[0x48, 0x0f, 0xae, 0x67, 0x40], &mut regs, &long_mode(), &mem, &mut state).unwrap();
    assert_eq!((done.mnemonic, done.inject, regs.rip), ("xsave", None, 0x105));
    let saved = mem.0.borrow();
    assert_eq!(&saved[0x1000 + 160..0x1000 + 416], &state.region[160..416], "XMM registers at the operand");
    assert_eq!(saved[0x1000 + 512], 0xe7, "XSTATE_BV");
}

#[test]
fn xrstor_fault_leaves_rip_on_the_instruction() {
    let mem = Flat::new(0x4000);
    let mut state = FakeState::new(0xe7);
    // xrstor64 [rbx] at a misaligned address: #GP(0)
    let mut regs = kvm_regs { rbx: 0x1008, rax: 0xffff_ffff, rdx: 0xffff_ffff, ..Default::default() };
    let done = run_with(&[0x48, 0x0f, 0xae, 0x2b], &mut regs, &long_mode(), &mem, &mut state).unwrap();
    assert_eq!((done.mnemonic, done.inject, regs.rip), ("xrstor (fault)", Some(Exception::GeneralProtection), 0x100));
    assert_eq!(Exception::GeneralProtection.error_code(), Some(0));
    assert_eq!(state.sets, 0);
}

#[test]
fn xsave_raises_ud_without_osxsave() {
    let mem = Flat::new(0x4000);
    let mut state = FakeState::new(0xe7);
    let mut regs = kvm_regs { rdi: 0x1000, ..Default::default() };
    let sregs = kvm_sregs { cr4: 0, ..long_mode() };
    let done = run_with(&[0x0f, 0xae, 0x27], &mut regs, &sregs, &mem, &mut state).unwrap();
    assert_eq!((done.inject, regs.rip), (Some(Exception::InvalidOpcode), 0x100));
}
