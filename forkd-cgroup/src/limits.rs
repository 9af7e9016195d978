//! Resource limits and the block device an I/O limit applies to.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CgroupError;

/// Limits of one sandbox. `None` leaves a resource unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory (RSS + page cache charged to the sandbox), bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// CPU time per period, µs (e.g. 50_000 of 100_000 = half a CPU, 200_000 = two CPUs).
    #[serde(default)]
    pub cpu_quota_us: Option<u64>,
    /// Defaults to 100_000 µs when only a quota is given.
    #[serde(default)]
    pub cpu_period_us: Option<u64>,
    #[serde(default)]
    pub io: Option<IoLimits>,
    /// Tasks (processes + threads).
    #[serde(default)]
    pub pids_max: Option<u64>,
}

/// Throttling on the block device that backs `path` (e.g. the sandbox's disk layers).
///
/// On cgroup v1 only direct and synchronous I/O is throttled (buffered writes are written
/// back by the kernel, outside the cgroup); the VMM's disk I/O is synchronous reads and
/// writes, which v1 does see for reads and for writes that reach the device in the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoLimits {
    pub path: PathBuf,
    #[serde(default)]
    pub read_bps: Option<u64>,
    #[serde(default)]
    pub write_bps: Option<u64>,
    #[serde(default)]
    pub read_iops: Option<u64>,
    #[serde(default)]
    pub write_iops: Option<u64>,
}

impl Limits {
    /// Quota and period to write, if a CPU limit is set.
    pub fn cpu(&self) -> Option<(u64, u64)> {
        self.cpu_quota_us.map(|q| (q, self.cpu_period_us.unwrap_or(100_000)))
    }

    pub fn validate(&self) -> Result<(), CgroupError> {
        let bad = |why: &str| Err(CgroupError::InvalidLimits(why.to_owned()));
        if let Some((quota, period)) = self.cpu() {
            if !(1_000..=1_000_000).contains(&period) {
                return bad("cpu_period_us must be 1000-1000000");
            }
            if quota < 1_000 {
                return bad("cpu_quota_us must be at least 1000");
            }
        }
        if self.cpu_period_us.is_some() && self.cpu_quota_us.is_none() {
            return bad("cpu_period_us needs cpu_quota_us");
        }
        if self.memory_bytes.is_some_and(|m| m < 1 << 20) {
            return bad("memory_bytes must be at least 1 MiB");
        }
        if self.pids_max == Some(0) {
            return bad("pids_max must be at least 1");
        }
        Ok(())
    }
}

/// A block device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The whole disk backing the filesystem that holds `path` (throttling applies to disks,
/// not partitions: a partition is mapped to its parent).
pub fn block_device_of(path: &Path) -> Result<DevNum, CgroupError> {
    let meta = std::fs::metadata(path)
        .map_err(|source| CgroupError::Io { what: format!("stat {}", path.display()), source })?;
    let dev = meta.dev();
    let num = DevNum { major: libc::major(dev), minor: libc::minor(dev) };
    if num.major == 0 {
        return Err(CgroupError::NoBlockDevice {
            path: path.to_owned(),
            why: "its filesystem has no block device (tmpfs, overlay, NFS, ...)".into(),
        });
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{num}"));
    if !sys.exists() {
        return Err(CgroupError::NoBlockDevice { path: path.to_owned(), why: format!("{} is missing", sys.display()) });
    }
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("../dev"))
            .map_err(|source| CgroupError::Io { what: format!("reading the parent of {}", sys.display()), source })?;
        return parse_devnum(parent.trim()).ok_or_else(|| CgroupError::NoBlockDevice {
            path: path.to_owned(),
            why: format!("cannot parse parent device {parent:?}"),
        });
    }
    Ok(num)
}

fn parse_devnum(s: &str) -> Option<DevNum> {
    let (major, minor) = s.split_once(':')?;
    Some(DevNum { major: major.parse().ok()?, minor: minor.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_validate() {
        assert!(Limits::default().validate().is_ok());
        let cpu = Limits { cpu_quota_us: Some(50_000), ..Limits::default() };
        assert_eq!(cpu.cpu(), Some((50_000, 100_000)));
        assert!(cpu.validate().is_ok());
        assert!(Limits { cpu_quota_us: Some(10), ..Limits::default() }.validate().is_err());
        assert!(Limits { cpu_period_us: Some(100_000), ..Limits::default() }.validate().is_err());
        assert!(Limits { memory_bytes: Some(4096), ..Limits::default() }.validate().is_err());
        assert!(Limits { pids_max: Some(0), ..Limits::default() }.validate().is_err());
    }

    #[test]
    fn limits_serde() {
        let json = r#"{"memory_bytes":268435456,"pids_max":64,"io":{"path":"/var/lib/forkd","read_bps":1048576}}"#;
        let limits: Limits = serde_json::from_str(json).unwrap();
        assert_eq!(limits.memory_bytes, Some(256 << 20));
        assert_eq!(limits.io.as_ref().unwrap().read_bps, Some(1 << 20));
        assert!(serde_json::from_str::<Limits>(r#"{"memory":1}"#).is_err());
    }

    #[test]
    fn tmpfs_has_no_block_device() {
        if Path::new("/dev/shm").exists() {
            assert!(matches!(block_device_of(Path::new("/dev/shm")), Err(CgroupError::NoBlockDevice { .. })));
        }
        assert_eq!(parse_devnum("8:0"), Some(DevNum { major: 8, minor: 0 }));
    }
}
