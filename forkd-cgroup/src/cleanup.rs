//! Removing sandbox cgroups a crashed run left behind, and `forkd doctor` input.

use std::path::Path;
use std::time::Duration;

use crate::cgroup::{dirs_of, handle_at, procs_of, remove, validate_name, CgroupConfig, SandboxCgroup};
use crate::host::{self, Controller, Version};
use crate::{CgroupError, Limits};

/// What [`cleanup_stale`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Cgroups removed (`<parent>/<name>`, in every hierarchy).
    pub removed: Vec<std::path::PathBuf>,
    /// Cgroups left because processes still run in them (not killed: they may be VMMs).
    pub busy: Vec<std::path::PathBuf>,
}

/// Removes every sandbox cgroup under the configured parent whose name is not in `keep`
/// and that holds no process.
pub fn cleanup_stale(cfg: &CgroupConfig, keep: &[&str]) -> Result<CleanupReport, CgroupError> {
    let mut names: Vec<String> = Vec::new();
    for parent in dirs_of(&handle_at(&cfg.parent)) {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && !keep.contains(&name.as_str()) && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let mut report = CleanupReport::default();
    for name in names {
        if validate_name(&name).is_err() {
            continue;
        }
        let cgroup = SandboxCgroup { name, limits: Limits::default(), parent: cfg.parent.clone() };
        let (handle, path) = (cgroup.handle(), cgroup.relative_path());
        if !procs_of(&handle).is_empty() {
            report.busy.push(path);
            continue;
        }
        match remove(&handle, &cgroup.name, Duration::from_millis(200)) {
            Ok(()) => report.removed.push(path),
            Err(_) => report.busy.push(path),
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

/// Which cgroup version the sandbox cgroups use, where each controller is, and whether
/// cgroups can be made.
pub fn doctor(cfg: &CgroupConfig) -> Vec<Support> {
    let version = match host::version() {
        Version::V1 if Path::new("/sys/fs/cgroup/unified").is_dir() => "v1 (hybrid: controllers on v1)",
        Version::V1 => "v1",
        Version::V2 => "v2",
    };
    let mut out = vec![Support { feature: "cgroup", ok: true, detail: format!("cgroup {version}") }];
    for controller in [Controller::Memory, Controller::Cpu, Controller::Io, Controller::Pids] {
        let (ok, detail) = match host::mount_of(controller) {
            Some(mount) => (true, format!("at {}", mount.display())),
            None => (false, "not available: that limit cannot be enforced".to_owned()),
        };
        out.push(Support { feature: controller.v1_name(), ok, detail });
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let parent = dirs_of(&handle_at(&cfg.parent)).into_iter().next();
    out.push(Support {
        feature: "cgroup-write",
        ok: root,
        detail: match parent {
            Some(p) if root => format!("sandbox cgroups go under {}", p.display()),
            _ => "creating cgroups needs root".to_owned(),
        },
    });
    out
}
