//! Complete vCPU and VM state, captured from KVM and restored into a fresh VM.
//!
//! BRANCH captures this in the source while its vCPUs are parked (~0.1 ms) and the forked
//! child restores it into the VM it builds over the inherited memory. The structs are
//! serde-serializable so durable snapshots can store them too.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM: {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("KVM accepted only {written} of {total} MSRs (first refused: {first:#x})")]
    Msrs { written: usize, total: usize, first: u32 },
    #[error("{what} does not fit KVM's list size: {source}")]
    TooMany { what: &'static str, source: vmm_sys_util::fam::Error },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// x87/SSE state in serializable form (KVM's `kvm_fpu` has no serde support).
#[derive(Clone, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (dst, src) in f.fpr.iter_mut().zip(&self.fpr) {
            *dst = *src;
        }
        for (dst, src) in f.xmm.iter_mut().zip(&self.xmm) {
            *dst = *src;
        }
        f
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The 4 KiB KVM_GET_XSAVE region when the host supports it (includes what `fpu` holds).
    pub xsave: Option<Vec<u32>>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
}

/// VM-wide interrupt controller, timer and clock state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// MSRs never saved: reading them fails on some hosts (IA32_ARCH_CAPABILITIES aborts qemu
/// here) and they are read-only feature MSRs anyway.
const SKIPPED_MSRS: &[u32] = &[0x10a];
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs this host lets us read back for a vCPU: KVM's index list minus any that fail.
pub fn savable_msrs(system: &Kvm, probe: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = system.get_msr_index_list().map_err(kvm("get MSR index list"))?;
    let mut indices: Vec<u32> = list.as_slice().iter().copied().filter(|i| !SKIPPED_MSRS.contains(i)).collect();
    // The pending LAPIC timer lives here; without it a restored idle guest never wakes.
    if !indices.contains(&MSR_IA32_TSC_DEADLINE) {
        indices.push(MSR_IA32_TSC_DEADLINE);
    }
    // KVM_GET_MSRS stops at the first MSR it cannot read; drop it and retry.
    loop {
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        if entries.is_empty() {
            return Ok(indices);
        }
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|source| StateError::TooMany { what: "MSR list", source })?;
        let read = probe.get_msrs(&mut msrs).map_err(kvm("probe MSRs"))?;
        if read == indices.len() {
            return Ok(indices);
        }
        tracing::debug!("MSR {:#x} is not readable here; not saving it", indices[read]);
        indices.remove(read);
    }
}

/// Captures a vCPU's state. Call with the vCPU out of `KVM_RUN` (parked).
pub fn save_vcpu(fd: &VcpuFd, id: u8, cpuid: &CpuId, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    let entries: Vec<kvm_msr_entry> =
        msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|source| StateError::TooMany { what: "MSR list", source })?;
    let read = fd.get_msrs(&mut msrs).map_err(kvm("get MSRs"))?;
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        msrs: msrs.as_slice()[..read].to_vec(),
        // KVM_GET_MP_STATE and KVM_GET_VCPU_EVENTS first: they flush pending events into the
        // state the other getters report.
        mp_state: fd.get_mp_state().map_err(kvm("get MP state"))?,
        events: fd.get_vcpu_events().map_err(kvm("get vCPU events"))?,
        regs: fd.get_regs().map_err(kvm("get regs"))?,
        sregs: fd.get_sregs().map_err(kvm("get sregs"))?,
        fpu: FpuState::from(&fd.get_fpu().map_err(kvm("get FPU"))?),
        xsave: fd.get_xsave().ok().map(|x| x.region.to_vec()),
        xcrs: fd.get_xcrs().ok(),
        lapic: fd.get_lapic().map_err(kvm("get LAPIC"))?,
        debug_regs: fd.get_debug_regs().map_err(kvm("get debug registers"))?,
    })
}

/// Restores a vCPU created on a fresh VM.
///
/// Order matters: CPUID first (everything else is checked against it); sregs before the LAPIC
/// (they carry the APIC base, i.e. xAPIC/x2APIC mode); the LAPIC before the MSRs, because
/// restoring the LAPIC resets its timer and `IA32_TSC_DEADLINE` only arms a timer once the
/// LAPIC is in TSC-deadline mode (the other way round, an idle guest never wakes up again);
/// MP state and pending events last.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|source| StateError::TooMany { what: "CPUID", source })?;
    fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("set sregs"))?;
    fd.set_regs(&state.regs).map_err(kvm("set regs"))?;
    match &state.xsave {
        Some(region) => {
            let mut xsave = kvm_xsave::default();
            for (dst, src) in xsave.region.iter_mut().zip(region) {
                *dst = *src;
            }
            // SAFETY: a plain 4 KiB region as KVM_GET_XSAVE produced it for the same CPUID.
            unsafe { fd.set_xsave(&xsave) }.map_err(kvm("set XSAVE"))?
        }
        None => fd.set_fpu(&state.fpu.to_kvm()).map_err(kvm("set FPU"))?,
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(kvm("set XCRs"))?;
    }
    fd.set_debug_regs(&state.debug_regs).map_err(kvm("set debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("set LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|source| StateError::TooMany { what: "MSR list", source })?;
    let written = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
    if written != state.msrs.len() {
        return Err(StateError::Msrs { written, total: state.msrs.len(), first: state.msrs[written].index });
    }
    fd.set_mp_state(state.mp_state).map_err(kvm("set MP state"))?;
    fd.set_vcpu_events(&state.events).map_err(kvm("set vCPU events"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(kvm("get irqchip"))?;
    Ok(chip)
}

/// Captures the VM-wide state. Call with every vCPU parked.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("get PIT"))?,
        clock: vm.get_clock().map_err(kvm("get clock"))?,
    })
}

/// Restores VM-wide state into a fresh VM (irqchip and PIT already created).
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    vm.set_irqchip(&state.pic_master).map_err(kvm("set PIC master"))?;
    vm.set_irqchip(&state.pic_slave).map_err(kvm("set PIC slave"))?;
    vm.set_irqchip(&state.ioapic).map_err(kvm("set IOAPIC"))?;
    vm.set_pit2(&state.pit).map_err(kvm("set PIT"))?;
    // Only the clock value may be set; the flags KVM reports are output-only.
    let clock = kvm_clock_data { clock: state.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(kvm("set clock"))?;
    Ok(())
}
