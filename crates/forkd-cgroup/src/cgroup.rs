//! [`SandboxCgroup`]: one sandbox's cgroup, in every hierarchy that serves a controller we use.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::hierarchy::{own_path, Controller, Layout, Version};
use crate::limits::{block_device_of, Limits};
use crate::usage::{self, Usage};
use crate::CgroupError;

/// Where sandbox cgroups go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupConfig {
    /// Directory (relative, one or more components) holding every sandbox cgroup.
    pub parent: PathBuf,
    /// Under the hierarchy root (default: VMMs outlive the launcher and its service's cgroup)
    /// or under the calling process's own cgroup in each hierarchy.
    pub nest_under_self: bool,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig { parent: PathBuf::from("forkd"), nest_under_self: false }
    }
}

/// One directory of a sandbox's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDir {
    pub version: Version,
    pub path: PathBuf,
    pub controllers: Vec<Controller>,
}

/// A sandbox's cgroup: one directory per hierarchy (one in total on pure v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxCgroup {
    pub name: String,
    pub limits: Limits,
    pub dirs: Vec<CgroupDir>,
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> CgroupError {
    move |source| CgroupError::Io { what, source }
}

pub(crate) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err(format!("writing {value:?} to {}", path.display())))
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_owned()))
    }
}

/// The parent directory of sandbox cgroups in each hierarchy that serves one of ours, with
/// the controllers it serves.
pub(crate) fn parents(cfg: &CgroupConfig) -> Result<Vec<CgroupDir>, CgroupError> {
    let layout = Layout::detect().map_err(io_err("reading /proc/self/mountinfo".into()))?;
    let own = if cfg.nest_under_self {
        std::fs::read_to_string("/proc/self/cgroup").map_err(io_err("reading /proc/self/cgroup".into()))?
    } else {
        String::new()
    };
    let mut dirs: Vec<CgroupDir> = Vec::new();
    for controller in Controller::ALL {
        let Some(h) = layout.for_controller(controller) else {
            continue;
        };
        if h.version == Version::V2 && controller == Controller::Cpuacct {
            continue;
        }
        let base = if cfg.nest_under_self {
            let rel = own_path(h, &own).unwrap_or_else(|| PathBuf::from("/"));
            h.mount.join(rel.strip_prefix("/").unwrap_or(&rel))
        } else {
            h.mount.clone()
        };
        let path = base.join(&cfg.parent);
        match dirs.iter_mut().find(|d| d.path == path) {
            Some(d) => d.controllers.push(controller),
            None => dirs.push(CgroupDir { version: h.version, path, controllers: vec![controller] }),
        }
    }
    Ok(dirs)
}

/// On v2, `parent` and every directory above it (from the mount down) must delegate our
/// controllers to their children. Creates the missing directories on the way.
fn enable_v2_controllers(mount: &Path, parent: &Path, controllers: &[Controller]) -> Result<(), CgroupError> {
    let wanted: Vec<&str> = controllers.iter().filter_map(|c| c.v2_name()).collect();
    let mut chain = vec![mount.to_path_buf()];
    let mut current = mount.to_path_buf();
    for component in parent.strip_prefix(mount).unwrap_or(Path::new("")).components() {
        current.push(component);
        chain.push(current.clone());
    }
    for dir in chain {
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let control = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control).unwrap_or_default();
        let missing: Vec<String> =
            wanted.iter().filter(|w| !enabled.split_whitespace().any(|e| e == **w)).map(|w| format!("+{w}")).collect();
        if !missing.is_empty() {
            write_file(&control, &missing.join(" "))?;
        }
    }
    Ok(())
}

impl SandboxCgroup {
    /// Creates cgroup `name` with `limits`. Fails if a resource is limited but its controller
    /// is not available on this host.
    pub fn create(name: &str, limits: &Limits, cfg: &CgroupConfig) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        limits.validate()?;
        let parents = parents(cfg)?;
        let layout = Layout::detect().map_err(io_err("reading /proc/self/mountinfo".into()))?;
        let needed = [
            (limits.memory_bytes.is_some(), Controller::Memory),
            (limits.cpu_quota_us.is_some(), Controller::Cpu),
            (limits.io.is_some(), Controller::Io),
            (limits.pids_max.is_some(), Controller::Pids),
        ];
        for (wanted, controller) in needed {
            if wanted && !parents.iter().any(|d| d.controllers.contains(&controller)) {
                return Err(CgroupError::Unsupported(controller));
            }
        }
        let mut cgroup = SandboxCgroup { name: name.to_owned(), limits: limits.clone(), dirs: Vec::new() };
        for parent in parents {
            let path = parent.path.join(name);
            if parent.version == Version::V2 {
                let mount = layout.v2().map(|h| h.mount.clone()).unwrap_or_default();
                enable_v2_controllers(&mount, &parent.path, &parent.controllers)?;
            }
            std::fs::create_dir_all(&parent.path).map_err(io_err(format!("creating {}", parent.path.display())))?;
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let _ = cgroup.destroy();
                    return Err(CgroupError::Exists(path));
                }
                Err(e) => {
                    let _ = cgroup.destroy();
                    return Err(io_err(format!("creating {}", path.display()))(e));
                }
            }
            cgroup.dirs.push(CgroupDir { version: parent.version, path, controllers: parent.controllers });
        }
        if let Err(e) = cgroup.apply_limits() {
            let _ = cgroup.destroy();
            return Err(e);
        }
        Ok(cgroup)
    }

    /// Re-finds an existing cgroup `name` (e.g. after the launcher restarted).
    pub fn open(name: &str, limits: Limits, cfg: &CgroupConfig) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        let dirs: Vec<CgroupDir> = parents(cfg)?
            .into_iter()
            .map(|p| CgroupDir { path: p.path.join(name), ..p })
            .filter(|d| d.path.is_dir())
            .collect();
        if dirs.is_empty() {
            return Err(CgroupError::NotFound(name.to_owned()));
        }
        Ok(SandboxCgroup { name: name.to_owned(), limits, dirs })
    }

    /// The directory serving `controller`.
    pub fn dir(&self, controller: Controller) -> Option<&CgroupDir> {
        self.dirs.iter().find(|d| d.controllers.contains(&controller))
    }

    fn apply_limits(&self) -> Result<(), CgroupError> {
        let limits = &self.limits;
        if let (Some(bytes), Some(d)) = (limits.memory_bytes, self.dir(Controller::Memory)) {
            match d.version {
                Version::V1 => {
                    write_file(&d.path.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    // With swap accounting, swap must not extend the limit (memsw >= mem).
                    let memsw = d.path.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write_file(&memsw, &bytes.to_string())?;
                    }
                }
                Version::V2 => {
                    write_file(&d.path.join("memory.max"), &bytes.to_string())?;
                    let swap = d.path.join("memory.swap.max");
                    if swap.exists() {
                        write_file(&swap, "0")?;
                    }
                }
            }
        }
        if let (Some((quota, period)), Some(d)) = (limits.cpu(), self.dir(Controller::Cpu)) {
            match d.version {
                Version::V1 => {
                    write_file(&d.path.join("cpu.cfs_period_us"), &period.to_string())?;
                    write_file(&d.path.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                Version::V2 => write_file(&d.path.join("cpu.max"), &format!("{quota} {period}"))?,
            }
        }
        if let (Some(max), Some(d)) = (limits.pids_max, self.dir(Controller::Pids)) {
            write_file(&d.path.join("pids.max"), &max.to_string())?;
        }
        if let (Some(io), Some(d)) = (&limits.io, self.dir(Controller::Io)) {
            let dev = block_device_of(&io.path)?;
            let values = [
                ("read_bps_device", "rbps", io.read_bps),
                ("write_bps_device", "wbps", io.write_bps),
                ("read_iops_device", "riops", io.read_iops),
                ("write_iops_device", "wiops", io.write_iops),
            ];
            match d.version {
                Version::V1 => {
                    for (file, _, value) in values {
                        if let Some(v) = value {
                            write_file(&d.path.join(format!("blkio.throttle.{file}")), &format!("{dev} {v}"))?;
                        }
                    }
                }
                Version::V2 => {
                    let mut line = dev.to_string();
                    for (_, key, value) in values {
                        if let Some(v) = value {
                            line.push_str(&format!(" {key}={v}"));
                        }
                    }
                    write_file(&d.path.join("io.max"), &line)?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write_file(&d.path.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let Some(d) = self.dirs.first() else {
            return Ok(Vec::new());
        };
        let path = d.path.join("cgroup.procs");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }

    /// SIGKILLs every process in the cgroup and waits (up to `timeout`) until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill(2) with a pid read from our cgroup; no memory involved.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy(self.name.clone()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Usage figures (those the host's controllers report).
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        usage::read_usage(self)
    }

    /// The limits the kernel enforces now, read back from the cgroup's files (unlimited
    /// resources are `None`; the I/O path is the one the limits were made for).
    pub fn limits_in_force(&self) -> Result<Limits, CgroupError> {
        crate::in_force::read_limits(self)
    }

    /// Number of processes the kernel OOM-killed because of this cgroup's memory limit.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        usage::oom_kills(self)
    }

    /// True once a process was killed by the memory limit.
    pub fn oom_killed(&self) -> Result<bool, CgroupError> {
        Ok(self.oom_kills()? > 0)
    }

    /// Removes the cgroup. Idempotent. Processes must be gone (see [`Self::kill_all`]);
    /// exiting ones are waited for briefly.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        for d in &self.dirs {
            remove_dir(&d.path, Duration::from_secs(2))?;
        }
        Ok(())
    }
}

/// rmdir with a short retry: a cgroup stays busy until its last task is reaped.
pub(crate) fn remove_dir(path: &Path, patience: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + patience;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(CgroupError::Busy(path.display().to_string()));
            }
            Err(e) => return Err(io_err(format!("removing {}", path.display()))(e)),
        }
    }
}
