//! x86_64: guest physical layout, 64-bit Linux boot, CPUID, MSRs, MP table.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod state;
