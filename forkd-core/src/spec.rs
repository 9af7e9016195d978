//! What a user asks for when creating a sandbox.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Most vCPUs a sandbox may have.
pub const MAX_VCPUS: u8 = 32;

/// A sandbox to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSpec {
    /// Root filesystem image name (`forkd image ls`).
    pub image: String,
    /// Guest kernel (`vmlinux`) to boot instead of the one `forkd kernel build` made.
    pub kernel: Option<PathBuf>,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// Free-form labels, returned in listings.
    pub labels: BTreeMap<String, String>,
    /// Guest networking; no NIC unless asked for.
    pub network: NetworkPolicy,
    /// Host-side limits on the sandbox's VMM process (its cgroup).
    pub limits: ResourceLimits,
}

/// How a sandbox reaches the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// No network device at all.
    #[default]
    None,
    /// Own network namespace, NAT to the outside, egress denied except `allow`.
    Nat,
}

impl std::str::FromStr for NetworkMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(NetworkMode::None),
            "nat" => Ok(NetworkMode::Nat),
            other => Err(Error::invalid("network", format!("unknown mode `{other}`; use `none` or `nat`"))),
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkMode::None => "none",
            NetworkMode::Nat => "nat",
        })
    }
}

/// Network mode plus the egress allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkPolicy {
    pub mode: NetworkMode,
    /// Egress destinations allowed in `nat` mode: `CIDR` or `CIDR:PORT` (e.g. `192.0.2.0/24:443`),
    /// or `allow-all`. Empty means deny all egress. The backend parses and checks each entry.
    pub allow: Vec<String>,
}

/// Limits applied to the sandbox's cgroup. `None` means the backend's default (see its docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceLimits {
    /// Memory limit of the VMM process (guest RAM it touched plus its own), MiB.
    pub memory_mib: Option<u64>,
    /// CPU time as a number of CPUs (0.5 = half of one CPU per period).
    pub cpus: Option<f64>,
    /// Disk throughput limit on the device backing the sandbox's disk, bytes per second
    /// (read and write each).
    pub io_bps: Option<u64>,
    /// Disk operations per second (read and write each).
    pub io_iops: Option<u64>,
    /// Most tasks (threads) in the VMM's cgroup.
    pub pids: Option<u64>,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        Self {
            image: "tiny".into(),
            kernel: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            labels: BTreeMap::new(),
            network: NetworkPolicy::default(),
            limits: ResourceLimits::default(),
        }
    }
}

impl SandboxSpec {
    /// Checks fields that do not need the host (images and kernels are checked by the backend).
    pub fn validate(&self) -> Result<()> {
        if self.image.is_empty() {
            return Err(Error::invalid("image", "must not be empty; `forkd image ls` lists images"));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::invalid("vcpus", format!("{} is out of range; use 1 to {MAX_VCPUS}", self.vcpus)));
        }
        if self.memory_mib == 0 {
            return Err(Error::invalid("memory", "must be positive, e.g. 256M"));
        }
        for key in self.labels.keys() {
            if key.is_empty() || key.len() > 63 {
                return Err(Error::invalid("labels", format!("label key `{key}` must be 1 to 63 bytes")));
            }
        }
        if self.network.mode == NetworkMode::None && !self.network.allow.is_empty() {
            return Err(Error::invalid("network.allow", "an allow-list needs `--network nat`"));
        }
        if self.network.allow.iter().any(|a| a.trim().is_empty()) {
            return Err(Error::invalid("network.allow", "entries must be CIDR[:PORT] or allow-all"));
        }
        self.limits.validate()
    }
}

impl ResourceLimits {
    /// True when no limit is given.
    pub fn is_empty(&self) -> bool {
        *self == ResourceLimits::default()
    }

    /// These limits with every limit `over` gives replacing ours (the others kept).
    pub fn overlay(&self, over: &ResourceLimits) -> ResourceLimits {
        ResourceLimits {
            memory_mib: over.memory_mib.or(self.memory_mib),
            cpus: over.cpus.or(self.cpus),
            io_bps: over.io_bps.or(self.io_bps),
            io_iops: over.io_iops.or(self.io_iops),
            pids: over.pids.or(self.pids),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.memory_mib == Some(0) || self.io_bps == Some(0) || self.io_iops == Some(0) || self.pids == Some(0) {
            return Err(Error::invalid("limits", "limits must be positive; leave a limit out to use the default"));
        }
        if let Some(cpus) = self.cpus {
            if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
                return Err(Error::invalid("limits.cpus", format!("{cpus} is out of range; use e.g. 0.5 or 2")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        SandboxSpec::default().validate().unwrap();
        let bad = SandboxSpec { vcpus: 0, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("vcpus"));
        let bad = SandboxSpec { image: String::new(), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("image"));
    }

    #[test]
    fn overlay_replaces_only_the_limits_given() {
        let source = ResourceLimits { memory_mib: Some(512), cpus: Some(1.0), pids: Some(64), ..Default::default() };
        let over = ResourceLimits { cpus: Some(0.25), io_bps: Some(1 << 20), ..Default::default() };
        let merged = source.overlay(&over);
        assert_eq!(
            merged,
            ResourceLimits {
                memory_mib: Some(512),
                cpus: Some(0.25),
                io_bps: Some(1 << 20),
                io_iops: None,
                pids: Some(64)
            }
        );
        assert_eq!(source.overlay(&ResourceLimits::default()), source);
        assert!(ResourceLimits::default().is_empty() && !over.is_empty());
    }

    #[test]
    fn json_rejects_unknown_fields() {
        assert!(serde_json::from_str::<SandboxSpec>(r#"{"image":"tiny","memry":5}"#).is_err());
        let s: SandboxSpec = serde_json::from_str(r#"{"memory_mib":512}"#).unwrap();
        assert_eq!((s.memory_mib, s.image.as_str()), (512, "tiny"));
    }
}
