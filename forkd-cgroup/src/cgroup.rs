//! [`SandboxCgroup`]: one sandbox's cgroup, made and driven through cgroups-rs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cgroups_rs::blkio::BlkIoController;
use cgroups_rs::cpu::CpuController;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{Cgroup, CgroupPid, Controller as _, MaxValue};
use serde::{Deserialize, Serialize};

use crate::host::{hierarchy, Controller};
use crate::limits::{block_device_of, Limits};
use crate::usage::{self, Usage};
use crate::{cgroups_err, CgroupError};

/// Where sandbox cgroups go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupConfig {
    /// Directory (relative to each hierarchy's root, one or more components) holding every
    /// sandbox cgroup. At the root rather than under the launcher's own cgroup: VMMs outlive
    /// the launcher and its service.
    pub parent: PathBuf,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig { parent: default_parent() }
    }
}

fn default_parent() -> PathBuf {
    PathBuf::from("forkd")
}

/// A sandbox's cgroup: `<parent>/<name>` in every hierarchy serving one of our controllers
/// (one directory in total on v2). Serializable, so a restarted launcher can find it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxCgroup {
    pub name: String,
    pub limits: Limits,
    #[serde(default = "default_parent")]
    pub parent: PathBuf,
}

pub(crate) fn validate_name(name: &str) -> Result<(), CgroupError> {
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

/// A cgroups-rs handle on `path` (relative) in the hierarchies of our controllers. Cheap: it
/// reads the mount table, touches nothing.
pub(crate) fn handle_at(path: &Path) -> Cgroup {
    let hier = hierarchy();
    if hier.v2() {
        // cgroups-rs 0.3 checks "specified controllers" against the v2 names but lists its io
        // subsystem as "blkio", so on v2 the handle takes every controller the host offers.
        Cgroup::load(hier, path)
    } else {
        let ours = Controller::ALL.iter().map(|c| c.v1_name().to_owned()).collect();
        Cgroup::load_with_specified_controllers(hier, path, ours)
    }
}

/// The directories of a handle, one per hierarchy.
pub(crate) fn dirs_of(handle: &Cgroup) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = handle.subsystems().iter().map(|s| s.to_controller().path().to_path_buf()).collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// One of cgroups-rs's per-device throttle setters: (controller, major, minor, value).
type Throttle = fn(&BlkIoController, u64, u64, u64) -> cgroups_rs::error::Result<()>;

fn to_i64(value: u64, what: &str) -> Result<i64, CgroupError> {
    i64::try_from(value).map_err(|_| CgroupError::InvalidLimits(format!("{what} is too large")))
}

impl SandboxCgroup {
    /// Creates cgroup `name` with `limits`. Fails if a resource is limited but its controller
    /// is not available on this host.
    pub fn create(name: &str, limits: &Limits, cfg: &CgroupConfig) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        limits.validate()?;
        let needed = [
            (limits.memory_bytes.is_some(), Controller::Memory),
            (limits.cpu_quota_us.is_some(), Controller::Cpu),
            (limits.io.is_some(), Controller::Io),
            (limits.pids_max.is_some(), Controller::Pids),
        ];
        let cgroup = SandboxCgroup { name: name.to_owned(), limits: limits.clone(), parent: cfg.parent.clone() };
        let handle = cgroup.handle();
        // The handle holds a subsystem for each controller this host offers.
        let offered = |c: Controller| handle.subsystems().iter().any(|s| s.controller_name() == c.v1_name());
        if let Some((_, missing)) = needed.iter().find(|(wanted, c)| *wanted && !offered(*c)) {
            return Err(CgroupError::Unsupported(*missing));
        }
        if handle.exists() {
            return Err(CgroupError::Exists(cgroup.relative_path()));
        }
        let made = handle
            .create()
            .map_err(cgroups_err(format!("creating cgroup {}", cgroup.relative_path().display())))
            .and_then(|()| cgroup.check_created(&handle))
            .and_then(|()| cgroup.apply_limits(&handle));
        if let Err(e) = made {
            let _ = cgroup.destroy();
            return Err(e);
        }
        Ok(cgroup)
    }

    /// cgroups-rs only logs a v1 directory it failed to make; a missing one is an error here.
    fn check_created(&self, handle: &Cgroup) -> Result<(), CgroupError> {
        match dirs_of(handle).into_iter().find(|d| !d.is_dir()) {
            None => Ok(()),
            Some(dir) => Err(CgroupError::Io {
                what: format!("creating {}", dir.display()),
                source: std::io::Error::other("the cgroup directory was not made (needs root; see `forkd doctor`)"),
            }),
        }
    }

    /// Re-finds an existing cgroup `name` (e.g. after the launcher restarted).
    pub fn open(name: &str, limits: Limits, cfg: &CgroupConfig) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        let cgroup = SandboxCgroup { name: name.to_owned(), limits, parent: cfg.parent.clone() };
        if !cgroup.handle().exists() {
            return Err(CgroupError::NotFound(name.to_owned()));
        }
        Ok(cgroup)
    }

    /// `<parent>/<name>`, relative to each hierarchy's root.
    pub fn relative_path(&self) -> PathBuf {
        self.parent.join(&self.name)
    }

    pub(crate) fn handle(&self) -> Cgroup {
        handle_at(&self.relative_path())
    }

    /// The cgroup's directories, one per hierarchy (one in total on v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        dirs_of(&self.handle())
    }

    fn apply_limits(&self, cg: &Cgroup) -> Result<(), CgroupError> {
        let limits = &self.limits;
        let controller = |c: Controller| CgroupError::Unsupported(c);
        if let Some(bytes) = limits.memory_bytes {
            let mem: &MemController = cg.controller_of().ok_or(controller(Controller::Memory))?;
            let bytes = to_i64(bytes, "memory_bytes")?;
            mem.set_limit(bytes).map_err(cgroups_err("setting the memory limit"))?;
            // Swap must not extend the limit: v1 memory+swap = memory, v2 no swap at all.
            let (swap_file, swap_limit) =
                if cg.v2() { ("memory.swap.max", 0) } else { ("memory.memsw.limit_in_bytes", bytes) };
            if mem.path().join(swap_file).exists() {
                mem.set_memswap_limit(swap_limit).map_err(cgroups_err("setting the swap limit"))?;
            }
        }
        if let Some((quota, period)) = limits.cpu() {
            let cpu: &CpuController = cg.controller_of().ok_or(controller(Controller::Cpu))?;
            cpu.set_cfs_period(period).map_err(cgroups_err("setting the cpu period"))?;
            cpu.set_cfs_quota(to_i64(quota, "cpu_quota_us")?).map_err(cgroups_err("setting the cpu quota"))?;
        }
        if let Some(max) = limits.pids_max {
            let pids: &PidController = cg.controller_of().ok_or(controller(Controller::Pids))?;
            let max = MaxValue::Value(to_i64(max, "pids_max")?);
            pids.set_pid_max(max).map_err(cgroups_err("setting the pids limit"))?;
        }
        if let Some(io) = &limits.io {
            let blkio: &BlkIoController = cg.controller_of().ok_or(controller(Controller::Io))?;
            let dev = block_device_of(&io.path)?;
            let (major, minor) = (u64::from(dev.major), u64::from(dev.minor));
            let throttles: [(Option<u64>, Throttle); 4] = [
                (io.read_bps, BlkIoController::throttle_read_bps_for_device),
                (io.write_bps, BlkIoController::throttle_write_bps_for_device),
                (io.read_iops, BlkIoController::throttle_read_iops_for_device),
                (io.write_iops, BlkIoController::throttle_write_iops_for_device),
            ];
            for (value, set) in throttles {
                if let Some(v) = value {
                    set(blkio, major, minor, v).map_err(cgroups_err(format!("throttling I/O on {dev}")))?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        self.handle()
            .add_task_by_tgid(CgroupPid::from(u64::from(pid)))
            .map_err(cgroups_err(format!("moving process {pid} into cgroup {}", self.name)))
    }

    /// Processes in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        Ok(procs_of(&self.handle()))
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
        usage::read_usage(&self.handle())
    }

    /// The limits the kernel enforces now, read back from the cgroup (unlimited resources are
    /// `None`; the I/O path is the one the limits were made for).
    pub fn limits_in_force(&self) -> Result<Limits, CgroupError> {
        crate::in_force::read_limits(&self.handle(), &self.limits)
    }

    /// Number of processes the kernel OOM-killed because of this cgroup's memory limit.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        usage::oom_kills(&self.handle())
    }

    /// True once a process was killed by the memory limit.
    pub fn oom_killed(&self) -> Result<bool, CgroupError> {
        Ok(self.oom_kills()? > 0)
    }

    /// Removes the cgroup. Idempotent. Processes must be gone (see [`Self::kill_all`]);
    /// exiting ones are waited for briefly.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        remove(&self.handle(), &self.name, Duration::from_secs(2))
    }
}

/// The processes of a handle's cgroup (cgroups-rs reads an unparsable line as pid 0).
pub(crate) fn procs_of(handle: &Cgroup) -> Vec<u32> {
    handle.procs().into_iter().filter_map(|p| u32::try_from(p.pid).ok()).filter(|p| *p != 0).collect()
}

/// Deletes a cgroup, retrying while its last tasks are being reaped.
pub(crate) fn remove(handle: &Cgroup, name: &str, patience: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + patience;
    loop {
        // cgroups-rs itself retries for ~0.3 s before giving up.
        match handle.delete() {
            Ok(()) => return Ok(()),
            Err(_) if !handle.exists() => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) if procs_of(handle).is_empty() => return Err(cgroups_err(format!("removing cgroup {name}"))(e)),
            Err(_) => return Err(CgroupError::Busy(name.to_owned())),
        }
    }
}
