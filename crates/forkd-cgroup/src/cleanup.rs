//! Removing sandbox cgroups a crashed run left behind, and `forkd doctor` input.

use crate::cgroup::{parents, remove_dir, CgroupConfig};
use crate::hierarchy::{Controller, Layout, Version};
use crate::CgroupError;

/// What [`cleanup_stale`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Cgroup directories removed.
    pub removed: Vec<std::path::PathBuf>,
    /// Directories left because processes still run in them (not killed: they may be VMMs).
    pub busy: Vec<std::path::PathBuf>,
}

/// Removes every sandbox cgroup under the configured parent whose name is not in `keep`
/// and that holds no process.
pub fn cleanup_stale(cfg: &CgroupConfig, keep: &[&str]) -> Result<CleanupReport, CgroupError> {
    let mut report = CleanupReport::default();
    for parent in parents(cfg)? {
        let Ok(entries) = std::fs::read_dir(&parent.path) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !path.is_dir() || keep.contains(&name.as_str()) {
                continue;
            }
            let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
            if !procs.trim().is_empty() {
                report.busy.push(path);
                continue;
            }
            match remove_dir(&path, std::time::Duration::from_millis(200)) {
                Ok(()) => report.removed.push(path),
                Err(_) => report.busy.push(path),
            }
        }
    }
    Ok(report)
}

/// One line of the doctor's report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Support {
    pub feature: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Which cgroup version serves each controller, and whether the parent is writable.
pub fn doctor(cfg: &CgroupConfig) -> Vec<Support> {
    let mut out = Vec::new();
    let layout = match Layout::detect() {
        Ok(l) => l,
        Err(e) => {
            return vec![Support { feature: "cgroup", ok: false, detail: format!("/proc/self/mountinfo: {e}") }];
        }
    };
    let versions: Vec<Version> = layout.hierarchies.iter().map(|h| h.version).collect();
    let kind = match (versions.contains(&Version::V1), versions.contains(&Version::V2)) {
        (true, true) => "hybrid (v1 + v2)",
        (true, false) => "v1",
        (false, true) => "v2",
        (false, false) => "none mounted",
    };
    out.push(Support { feature: "cgroup", ok: !versions.is_empty(), detail: format!("cgroup {kind}") });
    for controller in [Controller::Memory, Controller::Cpu, Controller::Io, Controller::Pids] {
        let (ok, detail) = match layout.for_controller(controller) {
            Some(h) => (true, format!("{:?} at {}", h.version, h.mount.display()).to_lowercase()),
            None => (false, "not available: that limit cannot be enforced".to_owned()),
        };
        out.push(Support { feature: controller.v1_name(), ok, detail });
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let writable = parents(cfg).ok().and_then(|p| p.first().map(|d| d.path.clone()));
    out.push(Support {
        feature: "cgroup-write",
        ok: root,
        detail: match writable {
            Some(p) if root => format!("sandbox cgroups go under {}", p.display()),
            _ => "creating cgroups needs root".to_owned(),
        },
    });
    out
}
