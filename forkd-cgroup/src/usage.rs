//! Usage counters, through cgroups-rs's controllers (and the v2 files it does not read).

use std::path::Path;

use cgroups_rs::blkio::BlkIoController;
use cgroups_rs::cpu::CpuController;
use cgroups_rs::cpuacct::CpuAcctController;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{Cgroup, Controller as _};
use serde::{Deserialize, Serialize};

use crate::host::Controller;
use crate::CgroupError;

/// What a sandbox used. `None`: the host does not offer that controller or figure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub memory_current: Option<u64>,
    /// High-water mark (v1 `max_usage_in_bytes`, v2 `memory.peak` on 5.19+).
    pub memory_peak: Option<u64>,
    /// Times the memory limit was hit (v1 `failcnt`, v2 `memory.events` `max`).
    pub memory_limit_hits: Option<u64>,
    pub oom_kills: Option<u64>,
    pub cpu_usage_us: Option<u64>,
    pub pids_current: Option<u64>,
    /// Forks/clones refused by `pids_max`.
    pub pids_limit_hits: Option<u64>,
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    read(dir, file)?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`key value` per line).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

pub(crate) fn read_usage(cg: &Cgroup) -> Result<Usage, CgroupError> {
    let mut u = Usage::default();
    if let Some(mem) = cg.controller_of::<MemController>() {
        if cg.v2() {
            // cgroups-rs 0.3's v2 memory stats carry no limit-hit or OOM counts: memory.events.
            let p = mem.path();
            u.memory_current = read_u64(p, "memory.current");
            u.memory_peak = read_u64(p, "memory.peak");
            u.memory_limit_hits = read(p, "memory.events").and_then(|t| keyed(&t, "max"));
        } else {
            let stat = mem.memory_stat();
            u.memory_current = Some(stat.usage_in_bytes);
            u.memory_peak = Some(stat.max_usage_in_bytes);
            u.memory_limit_hits = Some(stat.fail_cnt);
        }
        u.oom_kills = Some(oom_kills(cg)?);
    }
    if let Some(acct) = cg.controller_of::<CpuAcctController>() {
        u.cpu_usage_us = Some(acct.cpuacct().usage / 1000);
    } else if let Some(cpu) = cg.controller_of::<CpuController>().filter(|_| cg.v2()) {
        u.cpu_usage_us = keyed(&cpu.cpu().stat, "usage_usec");
    }
    if let Some(pids) = cg.controller_of::<PidController>() {
        u.pids_current = pids.get_pid_current().ok();
        u.pids_limit_hits = pids.get_pid_events().ok();
    }
    if let Some(blkio) = cg.controller_of::<BlkIoController>() {
        let stats = blkio.blkio();
        let (r, w) = if cg.v2() {
            stats.io_stat.iter().fold((0, 0), |(r, w), d| (r + d.rbytes, w + d.wbytes))
        } else {
            stats.throttle.io_service_bytes.iter().fold((0, 0), |(r, w), d| (r + d.read, w + d.write))
        };
        u.io_read_bytes = Some(r);
        u.io_write_bytes = Some(w);
    }
    Ok(u)
}

/// OOM kills charged to the cgroup: v1 `memory.oom_control` `oom_kill` (4.13+; older kernels
/// only say `under_oom`), v2 `memory.events` `oom_kill`.
pub(crate) fn oom_kills(cg: &Cgroup) -> Result<u64, CgroupError> {
    let mem: &MemController = cg.controller_of().ok_or(CgroupError::Unsupported(Controller::Memory))?;
    let file = if cg.v2() { "memory.events" } else { "memory.oom_control" };
    let path = mem.path().join(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|source| CgroupError::Io { what: format!("reading {}", path.display()), source })?;
    Ok(keyed(&text, "oom_kill").or_else(|| keyed(&text, "under_oom")).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counter_files() {
        assert_eq!(keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(keyed("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n", "max"), Some(7));
        assert_eq!(keyed("usage_usec 1500\nuser_usec 1000\n", "usage_usec"), Some(1500));
    }
}
