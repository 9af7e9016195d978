//! What a VMM process is asked to run: handed over as JSON by whoever launches `forkd-vmm`.

use crate::arch::cpuid::CpuProfile;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Full description of one microVM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Kernel command line; the VMM appends `virtio_mmio.device=` entries for its devices.
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// `None` picks `Compat` on emulating (PVM) hosts and `Host` elsewhere.
    #[serde(default)]
    pub cpu_profile: Option<CpuProfile>,
    /// Guest console log file (created/truncated).
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Also copy the console to the VMM's stderr (debugging).
    #[serde(default)]
    pub console_echo: bool,
    /// Root disk, exposed as the first virtio-blk device (`/dev/vda`).
    #[serde(default)]
    pub root_disk: Option<DiskConfig>,
    /// Host side of virtio-vsock.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device over a tap the launcher opened (mode `nat`); absent means no NIC.
    #[serde(default)]
    pub net: Option<NetDeviceConfig>,
    /// Add a virtio-rng device.
    #[serde(default = "yes")]
    pub rng: bool,
    /// Unix socket the VMM serves its control protocol on.
    pub control_socket: PathBuf,
    /// Kernel `System.map`, used to name guest addresses in errors.
    #[serde(default)]
    pub system_map: Option<PathBuf>,
    /// Confine the VMM after setup (mount namespace, capabilities, seccomp); see forkd-jail.
    #[serde(default)]
    pub jail: Option<forkd_jail::JailConfig>,
    /// Start from a durable snapshot instead of booting `kernel` (see `restore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreConfig>,
}

/// Where a restored VM's state and memory come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// The snapshot's directory (its `vm-state.json`).
    pub snapshot: PathBuf,
    /// Guest memory: the snapshot chain's `memory.bin` files, mapped `MAP_PRIVATE`.
    pub memory: forkd_snapshot::RestorePlan,
}

/// The guest's NIC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetDeviceConfig {
    /// The tap, already open and inherited at this fd number (`IFF_TAP | IFF_NO_PI`,
    /// non-blocking). The VMM needs no network privileges to use it.
    pub tap_fd: i32,
    /// The guest's MAC.
    pub mac: forkd_net::MacAddr,
}

fn yes() -> bool {
    true
}

/// A layered copy-on-write disk (see `disk.rs` and docs/formats.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Base image, always opened read-only and shareable between sandboxes.
    pub base: PathBuf,
    /// Copy-on-write layers, bottom to top; the top one is written (created if missing). No
    /// layers means a read-only disk.
    #[serde(default)]
    pub layers: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Host Unix socket; clients connect and send `CONNECT <port>\n`.
    pub uds_path: PathBuf,
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
}

fn default_cid() -> u64 {
    3
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {max}, got {got}")]
    Vcpus { got: u8, max: u8 },
    #[error("vsock guest CID must be >= 3, got {0}")]
    Cid(u64),
}

impl VmConfig {
    /// Checks what serde cannot (memory limits are checked when memory is created).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let max = crate::arch::mptable::MAX_CPUS;
        if self.vcpus == 0 || self.vcpus > max {
            return Err(ConfigError::Vcpus { got: self.vcpus, max });
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 {
                return Err(ConfigError::Cid(v.guest_cid));
            }
        }
        Ok(())
    }
}
