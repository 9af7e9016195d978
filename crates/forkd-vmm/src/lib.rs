//! forkd-vmm: the forkd microVM.
//!
//! One VMM process runs one sandbox: guest RAM as anonymous THP memory, vCPU threads driving
//! `KVM_RUN`, an 8250 console and virtio-mmio devices, and a control socket. See
//! `docs/vmm.md` for the design and `docs/host-compat.md` for running on emulating hosts.

pub mod arch;
pub mod backend;
pub mod branch;
pub mod bus;
pub mod config;
pub mod control;
pub mod devices;
pub mod disk;
pub mod emulate;
pub mod irq;
pub mod machine;
pub mod memory;
pub mod runtime;
pub mod vcpu;

pub use config::VmConfig;

/// Everything that can go wrong building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0}; is KVM available and are you root? (`forkd doctor` checks)")]
    KvmOpen(String),
    #[error("KVM: {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] arch::boot::BootError),
    #[error(transparent)]
    Regs(#[from] arch::regs::RegsError),
    #[error(transparent)]
    MpTable(#[from] arch::mptable::MpTableError),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("vCPU/VM state: {0}")]
    State(String),
    #[error("device: {0}")]
    Device(String),
    #[error("jail: {0}")]
    Jail(String),
    #[error("root disk: {0}")]
    Disk(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}
