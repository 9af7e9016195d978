//! Per-sandbox cgroups for forkd on cgroup v1 (hybrid hosts included) and v2, built on
//! cgroups-rs.
//!
//! One cgroup per sandbox (`<hierarchy>/forkd/<name>` in each hierarchy that serves one of
//! our controllers; a single directory on v2) holds the sandbox's VMM process. Limits:
//! memory, CPU quota, block I/O on the disk backing a file, tasks. Usage counters and
//! OOM-kill detection let the controller report "killed by the memory limit" clearly.
//!
//! ```no_run
//! use forkd_cgroup::{CgroupConfig, Limits, SandboxCgroup};
//! let cfg = CgroupConfig::default();
//! let limits = Limits { memory_bytes: Some(512 << 20), pids_max: Some(64), ..Limits::default() };
//! let cg = SandboxCgroup::create("sb-1234", &limits, &cfg)?;
//! cg.add_pid(4242)?;                       // the VMM
//! // BRANCH: each child gets its own cgroup, here with the source's limits
//! let child = SandboxCgroup::create("sb-5678", &cg.limits, &cfg)?;
//! child.add_pid(4243)?;
//! if cg.oom_killed()? { /* report: killed by the memory limit */ }
//! cg.kill_all(std::time::Duration::from_secs(2))?;
//! cg.destroy()?;
//! # Ok::<(), forkd_cgroup::CgroupError>(())
//! ```

mod cgroup;
mod cleanup;
pub mod host;
mod in_force;
mod limits;
mod usage;

pub use cgroup::{CgroupConfig, SandboxCgroup};
pub use cleanup::{cleanup_stale, doctor, CleanupReport, Support};
pub use host::{Controller, Version};
pub use limits::{block_device_of, DevNum, IoLimits, Limits};
pub use usage::Usage;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Cgroup { what: String, source: cgroups_rs::error::Error },
    #[error("the {0:?} controller is not available on this host (see `forkd doctor`)")]
    Unsupported(Controller),
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
    #[error("invalid cgroup name {0:?}: use 1-128 characters from [A-Za-z0-9._-]")]
    InvalidName(String),
    #[error("cgroup {} already exists (run cleanup_stale, or `forkd cleanup`, if it is left over)", .0.display())]
    Exists(std::path::PathBuf),
    #[error("no cgroup named {0}")]
    NotFound(String),
    #[error("cgroup {0} still has processes")]
    Busy(String),
    #[error("cannot throttle I/O for {}: {why}", path.display())]
    NoBlockDevice { path: std::path::PathBuf, why: String },
}

/// Wraps a cgroups-rs error with what was being done.
pub(crate) fn cgroups_err(what: impl Into<String>) -> impl FnOnce(cgroups_rs::error::Error) -> CgroupError {
    let what = what.into();
    move |source| CgroupError::Cgroup { what, source }
}
