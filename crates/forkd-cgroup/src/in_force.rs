//! Reading back the limits the kernel enforces on a sandbox's cgroup (v1 and v2 formats),
//! so callers can show and check what is in force rather than what was asked for.

use std::path::Path;

use crate::cgroup::SandboxCgroup;
use crate::hierarchy::{Controller, Version};
use crate::limits::{IoLimits, Limits};
use crate::CgroupError;

/// v1 reports "no memory limit" as a huge page-aligned number; anything at or above this is none.
const V1_UNLIMITED_MEMORY: u64 = 1 << 62;

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map_err(|source| CgroupError::Io { what: format!("reading {}", path.display()), source })
}

/// A single value where `max` (v2, pids) or `-1` (v1 quota) means unlimited.
fn limit_value(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// v2 `cpu.max`: `QUOTA PERIOD`, QUOTA `max` when unlimited.
fn v2_cpu(text: &str) -> (Option<u64>, Option<u64>) {
    let mut parts = text.split_whitespace();
    match (parts.next().and_then(limit_value), parts.next().and_then(limit_value)) {
        (Some(quota), period) => (Some(quota), period),
        (None, _) => (None, None),
    }
}

/// v1 `blkio.throttle.*_device`: `MAJ:MIN VALUE` lines; the sandbox limits one device.
fn v1_device_value(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.split_whitespace().nth(1)).and_then(limit_value)
}

/// v2 `io.max`: `MAJ:MIN rbps=N wbps=max riops=N wiops=max` (one line per limited device).
fn v2_io(text: &str) -> Option<[Option<u64>; 4]> {
    let line = text.lines().next()?;
    let mut values = [None; 4];
    for field in line.split_whitespace().skip(1) {
        let Some((key, value)) = field.split_once('=') else { continue };
        let slot = ["rbps", "wbps", "riops", "wiops"].iter().position(|k| *k == key);
        if let Some(i) = slot {
            values[i] = limit_value(value);
        }
    }
    Some(values)
}

pub(crate) fn read_limits(cg: &SandboxCgroup) -> Result<Limits, CgroupError> {
    let mut limits = Limits::default();
    if let Some(d) = cg.dir(Controller::Memory) {
        limits.memory_bytes = match d.version {
            Version::V1 => {
                limit_value(&read(&d.path.join("memory.limit_in_bytes"))?).filter(|b| *b < V1_UNLIMITED_MEMORY)
            }
            Version::V2 => limit_value(&read(&d.path.join("memory.max"))?),
        };
    }
    if let Some(d) = cg.dir(Controller::Cpu) {
        (limits.cpu_quota_us, limits.cpu_period_us) = match d.version {
            Version::V1 => match limit_value(&read(&d.path.join("cpu.cfs_quota_us"))?) {
                Some(quota) => (Some(quota), limit_value(&read(&d.path.join("cpu.cfs_period_us"))?)),
                None => (None, None),
            },
            Version::V2 => v2_cpu(&read(&d.path.join("cpu.max"))?),
        };
    }
    if let Some(d) = cg.dir(Controller::Pids) {
        limits.pids_max = limit_value(&read(&d.path.join("pids.max"))?);
    }
    if let Some(d) = cg.dir(Controller::Io) {
        let values = match d.version {
            Version::V1 => {
                let mut values = [None; 4];
                for (slot, file) in ["read_bps", "write_bps", "read_iops", "write_iops"].iter().enumerate() {
                    values[slot] = v1_device_value(&read(&d.path.join(format!("blkio.throttle.{file}_device")))?);
                }
                values
            }
            Version::V2 => v2_io(&read(&d.path.join("io.max"))?).unwrap_or_default(),
        };
        if values.iter().any(Option::is_some) {
            let [read_bps, write_bps, read_iops, write_iops] = values;
            let path = cg.limits.io.as_ref().map(|io| io.path.clone()).unwrap_or_default();
            limits.io = Some(IoLimits { path, read_bps, write_bps, read_iops, write_iops });
        }
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_and_v2_limit_files() {
        assert_eq!(limit_value("max\n"), None);
        assert_eq!(limit_value("-1\n"), None);
        assert_eq!(limit_value("64\n"), Some(64));
        assert_eq!(v2_cpu("max 100000\n"), (None, None));
        assert_eq!(v2_cpu("25000 100000\n"), (Some(25_000), Some(100_000)));
        assert_eq!(v1_device_value(""), None);
        assert_eq!(v1_device_value("254:0 262144\n"), Some(262_144));
        assert_eq!(
            v2_io("254:0 rbps=max wbps=1048576 riops=max wiops=50\n"),
            Some([None, Some(1 << 20), None, Some(50)])
        );
        assert_eq!(v2_io(""), None);
    }
}
