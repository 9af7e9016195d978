//! The CPUID the guest sees: what KVM supports, with per-vCPU topology filled in and, on hosts
//! whose KVM emulates guest kernel code (PVM), every feature hidden that makes the guest kernel
//! run an instruction the host's emulator cannot execute (see docs/host-compat.md).
//!
//! On the PVM hosts measured so far, leaves 1, 7 and 0xd reach the guest kernel from the host
//! whatever KVM_SET_CPUID2 says, so the same features are also cleared on the kernel command
//! line (`forkd-guest`'s `kernel::cmdline_for_host`); the table here is what a VT-x/AMD-V host
//! would honour.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use std::path::Path;

/// Which feature set to present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuProfile {
    /// Everything KVM supports (ordinary VT-x / AMD-V hosts).
    Host,
    /// Hide features whose instructions the emulating host cannot run in guest kernel mode.
    Compat,
}

impl CpuProfile {
    /// `Compat` when `/dev/kvm` is provided by `kvm_pvm`, else `Host`.
    pub fn detect() -> Self {
        if Path::new("/sys/module/kvm_pvm").exists() {
            CpuProfile::Compat
        } else {
            CpuProfile::Host
        }
    }
}

/// A (leaf, register) and the bits to clear in it.
struct Hide {
    leaf: u32,
    subleaf: Option<u32>,
    reg: Reg,
    bits: &'static [u32],
    why: &'static str,
}

#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const fn hide(leaf: u32, subleaf: Option<u32>, reg: Reg, bits: &'static [u32], why: &'static str) -> Hide {
    Hide { leaf, subleaf, reg, bits, why }
}

/// Features hidden under `CpuProfile::Compat`, with the reason for each group.
const COMPAT_HIDDEN: &[Hide] = &[
    hide(
        1,
        None,
        Reg::Ecx,
        &[26, 27, 28, 12, 29],
        "XSAVE/OSXSAVE and what depends on it (AVX, FMA, F16C): XSAVE/XRSTOR are not emulated",
    ),
    hide(1, None, Reg::Ecx, &[23], "POPCNT is not emulated"),
    hide(1, None, Reg::Ecx, &[13], "CMPXCHG16B is not emulated"),
    hide(1, None, Reg::Ecx, &[30], "RDRAND in kernel mode; virtio-rng feeds entropy instead"),
    hide(1, None, Reg::Ecx, &[17], "PCID: INVPCID/PCID flushes in kernel mode"),
    hide(1, None, Reg::Ecx, &[3, 5], "MONITOR/MWAIT idle and VMX are not for this guest"),
    hide(7, Some(0), Reg::Ebx, &[0], "FSGSBASE: RDFSBASE/WRGSBASE in the context switch"),
    hide(7, Some(0), Reg::Ebx, &[3, 8, 19], "BMI1/BMI2/ADX instructions"),
    hide(7, Some(0), Reg::Ebx, &[5, 16, 17, 21, 26, 27, 28, 30, 31], "AVX2/AVX-512 need XSAVE"),
    hide(7, Some(0), Reg::Ebx, &[10], "INVPCID is not emulated"),
    hide(7, Some(0), Reg::Ebx, &[18], "RDSEED in kernel mode"),
    hide(7, Some(0), Reg::Ebx, &[20], "SMAP: CLAC/STAC are not emulated"),
    hide(7, Some(0), Reg::Ebx, &[23, 24], "CLFLUSHOPT/CLWB in kernel cache flushes"),
    hide(7, Some(0), Reg::Ebx, &[2, 4, 11, 14, 29], "SGX, TSX, MPX, SHA"),
    hide(7, Some(0), Reg::Ecx, &[1, 6, 8, 9, 10, 11, 12, 14], "AVX-512/VAES/GFNI need XSAVE"),
    hide(7, Some(0), Reg::Ecx, &[2], "UMIP"),
    hide(7, Some(0), Reg::Ecx, &[3, 4], "PKU/OSPKE need XSAVE"),
    hide(7, Some(0), Reg::Ecx, &[16], "LA57"),
    hide(7, Some(0), Reg::Ecx, &[22], "RDPID in kernel entry paths"),
    hide(7, Some(0), Reg::Edx, &[2, 3, 8, 22, 23, 24, 29], "AVX-512 extras, AMX, ARCH_CAPABILITIES MSR"),
    hide(0x8000_0001, None, Reg::Ecx, &[5], "LZCNT (ABM) is not emulated"),
    hide(0x8000_0001, None, Reg::Ecx, &[11, 16, 21], "XOP/FMA4/TBM"),
];

/// Leaves cleared entirely under `Compat`: XSAVE state enumeration, Intel PT, AVX-512 subleaf 1.
const COMPAT_ZEROED_LEAVES: &[u32] = &[0xd, 0x14];

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Builds the CPUID for vCPU `cpu` of `count` from what KVM supports.
pub fn guest_cpuid(supported: &CpuId, cpu: u8, count: u8, profile: CpuProfile) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_00ff) | ((cpu as u32) << 24) | ((count as u32) << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0xb | 0x1f => {
                // One thread per core, `count` cores per package.
                e.edx = cpu as u32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = 32 - (count as u32).saturating_sub(1).leading_zeros();
                        e.ebx = count as u32;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => e.ecx = (e.ecx & !0xff) | (count as u32 - 1),
            0x8000_001e => {
                e.eax = cpu as u32;
                e.ebx = cpu as u32;
                e.ecx = 0;
            }
            _ => {}
        }
        if profile == CpuProfile::Compat {
            if COMPAT_ZEROED_LEAVES.contains(&e.function) || (e.function == 7 && e.index == 1) {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            for h in COMPAT_HIDDEN {
                if h.leaf == e.function && h.subleaf.is_none_or(|s| s == e.index) {
                    let r = reg_mut(e, h.reg);
                    for bit in h.bits {
                        *r &= !(1 << bit);
                    }
                }
            }
        }
    }
    cpuid
}

/// Human-readable list of what `Compat` hides, for `forkd doctor` and the docs.
pub fn compat_hidden_summary() -> Vec<String> {
    COMPAT_HIDDEN.iter().map(|h| format!("leaf {:#x}: {}", h.leaf, h.why)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax: 0, ebx: 0xffff_ffff, ecx, edx: 0xffff_ffff, ..Default::default() }
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0, 0xffff_ffff),
            entry(7, 0, 0xffff_ffff),
            entry(7, 1, 0),
            entry(0xb, 0, 0),
            entry(0xb, 1, 0),
            entry(0xd, 0, 7),
            entry(0x8000_0001, 0, 0xffff_ffff),
        ])
        .unwrap()
    }

    #[test]
    fn topology_is_per_vcpu() {
        let c = guest_cpuid(&sample(), 3, 4, CpuProfile::Host);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(find(&c, 0xb, 0).edx, 3);
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).eax, 2);
        // Host profile leaves features alone.
        assert_ne!(find(&c, 1, 0).ecx & (1 << 26), 0);
    }

    #[test]
    fn compat_hides_what_the_emulator_cannot_run() {
        let c = guest_cpuid(&sample(), 0, 1, CpuProfile::Compat);
        let l1 = find(&c, 1, 0);
        for bit in [13, 23, 26, 27, 28] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        let l7 = find(&c, 7, 0);
        assert_eq!(l7.ebx & (1 << 20), 0, "SMAP");
        assert_eq!(l7.ebx & 1, 0, "FSGSBASE");
        assert_eq!(find(&c, 0xd, 0).ecx, 0);
        assert_eq!(find(&c, 0x8000_0001, 0).ecx & (1 << 5), 0);
        assert_ne!(l1.ecx & 1, 0, "SSE3 stays");
    }
}
