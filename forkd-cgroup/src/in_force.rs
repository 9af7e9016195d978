//! Reading back the limits the kernel enforces on a sandbox's cgroup, so callers can show and
//! check what is in force rather than what was asked for.

use std::path::Path;

use cgroups_rs::blkio::BlkIoController;
use cgroups_rs::cpu::CpuController;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{Cgroup, Controller as _, MaxValue};

use crate::cgroups_err;
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

pub(crate) fn read_limits(cg: &Cgroup, asked: &Limits) -> Result<Limits, CgroupError> {
    let mut limits = Limits::default();
    if let Some(mem) = cg.controller_of::<MemController>() {
        limits.memory_bytes = if cg.v2() {
            match mem.get_mem().map_err(cgroups_err("reading the memory limit"))?.max {
                Some(MaxValue::Value(bytes)) => u64::try_from(bytes).ok(),
                _ => None,
            }
        } else {
            u64::try_from(mem.memory_stat().limit_in_bytes).ok().filter(|b| *b < V1_UNLIMITED_MEMORY)
        };
    }
    if let Some(cpu) = cg.controller_of::<CpuController>() {
        // Unlimited is -1 on v1 and `max` on v2, which cgroups-rs also reads as -1.
        let quota = cpu.cfs_quota().map_err(cgroups_err("reading the cpu quota"))?;
        if let Ok(quota) = u64::try_from(quota) {
            limits.cpu_quota_us = Some(quota);
            limits.cpu_period_us = Some(cpu.cfs_period().map_err(cgroups_err("reading the cpu period"))?);
        }
    }
    if let Some(pids) = cg.controller_of::<PidController>() {
        limits.pids_max = match pids.get_pid_max().map_err(cgroups_err("reading the pids limit"))? {
            MaxValue::Value(max) => u64::try_from(max).ok(),
            MaxValue::Max => None,
        };
    }
    if let Some(blkio) = cg.controller_of::<BlkIoController>() {
        // Read here: cgroups-rs 0.3 does not read io.max, and its v1 parser assumes minors
        // fit in an i16.
        let dir = blkio.path();
        let values = if cg.v2() {
            v2_io(&read(&dir.join("io.max"))?).unwrap_or_default()
        } else {
            let mut values = [None; 4];
            for (slot, file) in ["read_bps", "write_bps", "read_iops", "write_iops"].iter().enumerate() {
                values[slot] = v1_device_value(&read(&dir.join(format!("blkio.throttle.{file}_device")))?);
            }
            values
        };
        if values.iter().any(Option::is_some) {
            let [read_bps, write_bps, read_iops, write_iops] = values;
            let path = asked.io.as_ref().map(|io| io.path.clone()).unwrap_or_default();
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
        assert_eq!(v1_device_value(""), None);
        assert_eq!(v1_device_value("254:0 262144\n"), Some(262_144));
        assert_eq!(
            v2_io("254:0 rbps=max wbps=1048576 riops=max wiops=50\n"),
            Some([None, Some(1 << 20), None, Some(50)])
        );
        assert_eq!(v2_io(""), None);
    }
}
