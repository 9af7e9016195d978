//! forkd-cgroup on this host's real cgroups (as root): a cgroup with every limit, read back
//! from the kernel, a process in it, usage, kill, removal and stale cleanup.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use forkd_cgroup::{cleanup_stale, CgroupConfig, CgroupError, IoLimits, Limits, SandboxCgroup};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "forkd-cgroup tests create cgroups: run them as root");
}

/// Each test its own parent, so parallel tests and real sandboxes never meet; whatever a
/// failing test leaves in it is killed and removed.
struct TestParent(CgroupConfig);

fn config(tag: &str) -> TestParent {
    TestParent(CgroupConfig { parent: PathBuf::from(format!("forkd-test-{tag}-{}", std::process::id())) })
}

impl std::ops::Deref for TestParent {
    type Target = CgroupConfig;
    fn deref(&self) -> &CgroupConfig {
        &self.0
    }
}

impl Drop for TestParent {
    fn drop(&mut self) {
        for name in ["sb-limits", "sb-bad", "sb-kept", "sb-lost", "sb-busy"] {
            if let Ok(cg) = SandboxCgroup::open(name, Limits::default(), &self.0) {
                let _ = cg.kill_all(Duration::from_secs(2));
                let _ = cg.destroy();
            }
        }
        for root in ["memory", "cpu", "cpuacct", "pids", "blkio", ""] {
            let _ = std::fs::remove_dir(PathBuf::from("/sys/fs/cgroup").join(root).join(&self.0.parent));
        }
    }
}

/// A directory on a block device (the build tree; /tmp may be tmpfs).
fn disk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

#[test]
fn limits_are_in_force_and_the_cgroup_goes_away() {
    require_root();
    let cfg = config("limits");
    let limits = Limits {
        memory_bytes: Some(64 << 20),
        cpu_quota_us: Some(25_000),
        cpu_period_us: Some(50_000),
        io: Some(IoLimits { path: disk_dir(), write_bps: Some(1 << 20), read_iops: Some(500), ..IoLimits::default() }),
        pids_max: Some(16),
    };
    let cg = SandboxCgroup::create("sb-limits", &limits, &cfg).expect("create");
    assert!(matches!(SandboxCgroup::create("sb-limits", &limits, &cfg), Err(CgroupError::Exists(_))));
    assert_eq!(cg.limits_in_force().expect("read back"), limits);

    let mut sleeper = Command::new("sleep").arg("30").spawn().expect("spawn sleep");
    cg.add_pid(sleeper.id()).expect("add pid");
    assert_eq!(cg.pids().unwrap(), vec![sleeper.id()]);
    let usage = cg.usage().expect("usage");
    assert_eq!(usage.pids_current, Some(1));
    // v1 does not move a process's earlier charges with it: only presence is certain.
    assert!(usage.memory_current.is_some() && usage.cpu_usage_us.is_some(), "{usage:?}");
    assert_eq!(cg.oom_kills().unwrap(), 0);

    // Reopened by name, as a restarted launcher would.
    let again = SandboxCgroup::open("sb-limits", limits.clone(), &cfg).expect("open");
    assert!(matches!(again.destroy(), Err(CgroupError::Busy(_))), "a cgroup with a process is busy");
    again.kill_all(Duration::from_secs(2)).expect("kill");
    let _ = sleeper.wait();
    again.destroy().expect("destroy");
    again.destroy().expect("destroy is idempotent");
    assert!(cg.dirs().iter().all(|d| !d.exists()));
    assert!(matches!(SandboxCgroup::open("sb-limits", limits, &cfg), Err(CgroupError::NotFound(_))));
    assert!(cleanup_stale(&cfg, &[]).unwrap().removed.is_empty());
}

#[test]
fn bad_names_and_limits_are_refused() {
    require_root();
    let cfg = config("bad");
    for name in ["", "../escape", ".hidden", "a/b"] {
        assert!(matches!(SandboxCgroup::create(name, &Limits::default(), &cfg), Err(CgroupError::InvalidName(_))));
    }
    let zero_pids = Limits { pids_max: Some(0), ..Limits::default() };
    assert!(matches!(SandboxCgroup::create("sb-bad", &zero_pids, &cfg), Err(CgroupError::InvalidLimits(_))));
    let tmpfs_io = Limits {
        io: Some(IoLimits { path: "/dev/shm".into(), read_bps: Some(1), ..IoLimits::default() }),
        ..Limits::default()
    };
    assert!(matches!(SandboxCgroup::create("sb-bad", &tmpfs_io, &cfg), Err(CgroupError::NoBlockDevice { .. })));
    assert!(
        matches!(SandboxCgroup::open("sb-bad", Limits::default(), &cfg), Err(CgroupError::NotFound(_))),
        "nothing left"
    );
}

#[test]
fn cleanup_stale_removes_empty_cgroups_and_keeps_busy_ones() {
    require_root();
    let cfg = config("stale");
    let limits = Limits { pids_max: Some(8), ..Limits::default() };
    let kept = SandboxCgroup::create("sb-kept", &limits, &cfg).unwrap();
    let lost = SandboxCgroup::create("sb-lost", &limits, &cfg).unwrap();
    let busy = SandboxCgroup::create("sb-busy", &limits, &cfg).unwrap();
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    busy.add_pid(sleeper.id()).unwrap();

    let report = cleanup_stale(&cfg, &["sb-kept"]).unwrap();
    assert_eq!(report.removed, vec![lost.relative_path()]);
    assert_eq!(report.busy, vec![busy.relative_path()]);
    assert!(kept.dirs().iter().all(|d| d.is_dir()));

    busy.kill_all(Duration::from_secs(2)).unwrap();
    let _ = sleeper.wait();
    let report = cleanup_stale(&cfg, &[]).unwrap();
    assert_eq!(report.removed.len(), 2, "{report:?}");
}
