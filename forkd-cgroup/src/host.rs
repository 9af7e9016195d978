//! What this host offers, as cgroups-rs sees it: either the v2 unified hierarchy at
//! /sys/fs/cgroup, or v1 hierarchies (hybrid hosts included: their controllers all sit on v1,
//! the v2 mount beside them carries none of ours).

use std::path::PathBuf;

use cgroups_rs::hierarchies::{self, V1};
use cgroups_rs::{Controllers, Hierarchy};
use serde::{Deserialize, Serialize};

/// The controllers forkd uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Controller {
    Memory,
    Cpu,
    /// v1 only: CPU usage accounting (v2 reports it in `cpu.stat`).
    Cpuacct,
    Pids,
    /// `blkio` on v1, `io` on v2.
    Io,
}

impl Controller {
    pub const ALL: [Controller; 5] =
        [Controller::Memory, Controller::Cpu, Controller::Cpuacct, Controller::Pids, Controller::Io];

    /// The name cgroups-rs and the kernel give it on v1.
    pub fn v1_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Pids => "pids",
            Controller::Io => "blkio",
        }
    }

    /// `None` for controllers v2 folds into others.
    pub fn v2_name(self) -> Option<&'static str> {
        match self {
            Controller::Memory => Some("memory"),
            Controller::Cpu => Some("cpu"),
            Controller::Cpuacct => None,
            Controller::Pids => Some("pids"),
            Controller::Io => Some("io"),
        }
    }

    fn id(self) -> Controllers {
        match self {
            Controller::Memory => Controllers::Mem,
            Controller::Cpu => Controllers::Cpu,
            Controller::Cpuacct => Controllers::CpuAcct,
            Controller::Pids => Controllers::Pids,
            Controller::Io => Controllers::BlkIo,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// The cgroup version sandbox cgroups are made on.
pub fn version() -> Version {
    if hierarchies::is_cgroup2_unified_mode() {
        Version::V2
    } else {
        Version::V1
    }
}

pub(crate) fn hierarchy() -> Box<dyn Hierarchy> {
    hierarchies::auto()
}

/// Where `controller` is mounted; `None` when this host does not offer it.
pub fn mount_of(controller: Controller) -> Option<PathBuf> {
    match version() {
        Version::V1 => V1::new().get_mount_point(controller.id()),
        Version::V2 => {
            let name = controller.v2_name()?;
            let root = PathBuf::from(hierarchies::UNIFIED_MOUNTPOINT);
            let offered = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            offered.split_whitespace().any(|c| c == name).then_some(root)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_names() {
        let v1: Vec<&str> = Controller::ALL.iter().map(|c| c.v1_name()).collect();
        assert_eq!(v1, ["memory", "cpu", "cpuacct", "pids", "blkio"]);
        for c in Controller::ALL {
            assert_eq!(c.id().to_string(), c.v1_name(), "cgroups-rs names {c:?} the same");
        }
        assert_eq!(Controller::Io.v2_name(), Some("io"));
        assert_eq!(Controller::Cpuacct.v2_name(), None);
    }
}
