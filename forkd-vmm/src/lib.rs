//! forkd-vmm: the forkd microVM.
//!
//! One VMM process runs one sandbox: guest RAM as anonymous THP memory, vCPU threads driving
//! `KVM_RUN`, an 8250 console and virtio-mmio devices, and a control socket. See
//! `docs/vmm.md` for the design and `docs/host-compat.md` for running on emulating hosts.

pub mod arch;
pub mod branch;
pub mod bus;
pub mod config;
pub mod control;
pub mod devices;
pub mod disk;
pub mod emulate;
pub mod handlers;
pub mod identity;
pub mod irq;
pub mod machine;
pub mod memory;
pub mod persist;
pub mod restore;
pub mod runtime;
pub mod snapshot;
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
    State(#[from] arch::state::StateError),
    #[error("virtio device: {0}")]
    Device(#[from] forkd_virtio::DeviceError),
    #[error("rewiring the {device} device after the fork: {source}")]
    Rewire { device: &'static str, source: forkd_virtio::TransportError },
    #[error("tap fd {0} is not an inherited descriptor (the launcher passes the tap at fd 3 or above)")]
    TapFd(i32),
    #[error("the VM has a network device but no tap was passed for it")]
    MissingTap,
    #[error("jail: {0}")]
    Jail(#[from] forkd_jail::JailError),
    #[error("root disk: {0}")]
    Disk(#[from] disk::DiskError),
    #[error("the VM has a root disk device but no disk behind it")]
    MissingDisk,
    #[error("writing {what}: {source}")]
    Json { what: &'static str, source: serde_json::Error },
    #[error("the snapshot's serial input FIFO holds {bytes} bytes, more than the UART's 64")]
    SerialFifo { bytes: usize },
    #[error("virtio device {slot}: {source}")]
    Transport { slot: u32, source: forkd_virtio::TransportError },
    #[error("snapshot: {0}")]
    Snapshot(#[from] forkd_snapshot::SnapshotError),
    #[error("the snapshot holds no vCPU")]
    NoVcpus,
    #[error("reading the snapshot's machine state {path}: {reason}")]
    SnapshotState { path: std::path::PathBuf, reason: restore::StateFileError },
    #[error("the snapshot has a {snapshot} device where this VM's configuration has {config}; restore with the snapshot's own network mode")]
    DeviceMismatch { snapshot: &'static str, config: &'static str },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}
