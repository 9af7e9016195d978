//! Reading usage counters, v1 and v2 formats.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cgroup::SandboxCgroup;
use crate::hierarchy::{Controller, Version};
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

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`key value` per line).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Sums v1 `blkio.throttle.io_service_bytes` lines `MAJ:MIN Read|Write N`.
pub(crate) fn v1_io_bytes(text: &str) -> (u64, u64) {
    let (mut read, mut write) = (0u64, 0u64);
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [_, op, n] = parts[..] {
            let n: u64 = n.parse().unwrap_or(0);
            match op {
                "Read" => read += n,
                "Write" => write += n,
                _ => {}
            }
        }
    }
    (read, write)
}

/// Sums v2 `io.stat` lines `MAJ:MIN rbytes=N wbytes=N ...`.
pub(crate) fn v2_io_bytes(text: &str) -> (u64, u64) {
    let (mut read, mut write) = (0u64, 0u64);
    for field in text.split_whitespace() {
        if let Some((k, v)) = field.split_once('=') {
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "rbytes" => read += v,
                "wbytes" => write += v,
                _ => {}
            }
        }
    }
    (read, write)
}

pub(crate) fn read_usage(cg: &SandboxCgroup) -> Result<Usage, CgroupError> {
    let mut u = Usage::default();
    if let Some(d) = cg.dir(Controller::Memory) {
        let p = &d.path;
        match d.version {
            Version::V1 => {
                u.memory_current = read_u64(&p.join("memory.usage_in_bytes"));
                u.memory_peak = read_u64(&p.join("memory.max_usage_in_bytes"));
                u.memory_limit_hits = read_u64(&p.join("memory.failcnt"));
            }
            Version::V2 => {
                u.memory_current = read_u64(&p.join("memory.current"));
                u.memory_peak = read_u64(&p.join("memory.peak"));
                u.memory_limit_hits = read(&p.join("memory.events")).and_then(|t| keyed(&t, "max"));
            }
        }
        u.oom_kills = Some(oom_kills(cg)?);
    }
    match (cg.dir(Controller::Cpuacct), cg.dir(Controller::Cpu)) {
        (Some(d), _) if d.version == Version::V1 => {
            u.cpu_usage_us = read_u64(&d.path.join("cpuacct.usage")).map(|ns| ns / 1000);
        }
        (_, Some(d)) if d.version == Version::V2 => {
            u.cpu_usage_us = read(&d.path.join("cpu.stat")).and_then(|t| keyed(&t, "usage_usec"));
        }
        _ => {}
    }
    if let Some(d) = cg.dir(Controller::Pids) {
        u.pids_current = read_u64(&d.path.join("pids.current"));
        u.pids_limit_hits = read(&d.path.join("pids.events")).and_then(|t| keyed(&t, "max"));
    }
    if let Some(d) = cg.dir(Controller::Io) {
        let (r, w) = match d.version {
            Version::V1 => read(&d.path.join("blkio.throttle.io_service_bytes")).map(|t| v1_io_bytes(&t)),
            Version::V2 => read(&d.path.join("io.stat")).map(|t| v2_io_bytes(&t)),
        }
        .unwrap_or((0, 0));
        u.io_read_bytes = Some(r);
        u.io_write_bytes = Some(w);
    }
    Ok(u)
}

/// OOM kills charged to the cgroup: v1 `memory.oom_control` `oom_kill` (4.13+; older kernels
/// only say `under_oom`), v2 `memory.events` `oom_kill`.
pub(crate) fn oom_kills(cg: &SandboxCgroup) -> Result<u64, CgroupError> {
    let Some(d) = cg.dir(Controller::Memory) else {
        return Err(CgroupError::Unsupported(Controller::Memory));
    };
    let file = match d.version {
        Version::V1 => d.path.join("memory.oom_control"),
        Version::V2 => d.path.join("memory.events"),
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|source| CgroupError::Io { what: format!("reading {}", file.display()), source })?;
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
        let v1 = "253:0 Read 4096\n253:0 Write 8192\n253:0 Sync 0\n253:0 Total 12288\n8:0 Read 1\nTotal 12289\n";
        assert_eq!(v1_io_bytes(v1), (4097, 8192));
        let v2 = "253:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n8:0 rbytes=1 wbytes=0\n";
        assert_eq!(v2_io_bytes(v2), (4097, 8192));
    }
}
