//! The `SandboxBackend` trait: the mechanism under the controller. The real backend boots KVM
//! microVMs (`forkd_vmm::backend`); a test double may stand in for frontend plumbing tests.

use crate::error::{Error, Result};
use crate::eval::{ContextInfo, EvalRequest, EvalResult};
use crate::exec::{CancelToken, ExecOutcome, ExecRequest, ExecSink};
use crate::id::SandboxId;
use crate::snapshot::{SnapshotInfo, SnapshotRequest, SnapshotStarted, VerifyReport};
use crate::spec::{ResourceLimits, SandboxSpec};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::time::Duration;

/// Backend-defined description of how to reach a live sandbox (process id, socket paths...).
/// The controller persists it verbatim so a restarted controller can re-adopt the sandbox.
pub type RuntimeHandle = serde_json::Value;

/// A directory entry in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub mtime_unix: i64,
}

/// Host-side memory figures for one sandbox's VMM process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUsage {
    pub rss_kib: u64,
    /// Proportional share: shared copy-on-write pages are split between the processes sharing them.
    pub pss_kib: u64,
    /// Pages only this sandbox has written.
    pub private_dirty_kib: u64,
}

/// What the sandbox's cgroup reports (figures the host does not provide are `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// The cgroup (its name) holding the VMM.
    pub cgroup: String,
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// Times the VMM hit its memory limit, and processes the kernel killed for it.
    pub memory_limit_hits: Option<u64>,
    pub oom_kills: Option<u64>,
    /// CPU time used, µs, and the quota (CPUs).
    pub cpu_usage_us: Option<u64>,
    pub cpu_limit: Option<f64>,
    pub pids: Option<u64>,
    pub pids_limit: Option<u64>,
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
    /// Network mode and egress allow-list in force.
    pub network: Option<String>,
}

/// Whether a sandbox's VMM is still there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum Liveness {
    Running,
    Exited(String),
}

/// Options for BRANCH.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BranchOptions {
    /// Number of children.
    pub count: u32,
    /// Limits for the children's cgroups: each one given replaces the source's, the others
    /// are the source's. Empty (the default): exactly the source's limits.
    pub limits: ResourceLimits,
}

impl Default for BranchOptions {
    fn default() -> Self {
        Self { count: 1, limits: ResourceLimits::default() }
    }
}

/// Most children one BRANCH may create.
pub const MAX_BRANCH_COUNT: u32 = 1000;

impl BranchOptions {
    /// `count` children with the source's limits.
    pub fn count(count: u32) -> Self {
        Self { count, ..Self::default() }
    }

    pub fn validate(&self) -> Result<()> {
        if self.count == 0 || self.count > MAX_BRANCH_COUNT {
            return Err(Error::invalid(
                "count",
                format!("{} is out of range; use 1 to {MAX_BRANCH_COUNT}", self.count),
            ));
        }
        self.limits.validate()
    }
}

/// What a backend reports for one BRANCH.
#[derive(Debug, Clone)]
pub struct BranchedChildren {
    /// Runtime handles of the children, in the order of the ids asked for.
    pub children: Vec<RuntimeHandle>,
    /// How long the source's vCPUs were stopped.
    pub pause: Duration,
}

/// The mechanism that runs sandboxes. Every method is blocking; async frontends call it from
/// a blocking thread pool.
pub trait SandboxBackend: Send + Sync {
    /// Short name for logs and `forkd doctor` (e.g. `kvm`).
    fn name(&self) -> &'static str;

    /// Boots a new sandbox and returns once its guest agent answers.
    fn create(&self, id: &SandboxId, spec: &SandboxSpec) -> Result<RuntimeHandle>;

    /// Runs a command, streaming its output to `sink`; `stdin` (if any) is copied to the
    /// command and then closed.
    fn exec(
        &self,
        runtime: &RuntimeHandle,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<ExecOutcome>;

    /// Runs a snippet in a code context (created on first use), streaming its output to
    /// `sink`; `cancel` interrupts it.
    fn eval(
        &self,
        _runtime: &RuntimeHandle,
        _req: &EvalRequest,
        _sink: &mut dyn ExecSink,
        _cancel: &CancelToken,
    ) -> Result<EvalResult> {
        Err(Error::FailedPrecondition(format!("the {} backend has no code contexts", self.name())))
    }

    /// The sandbox's live code contexts.
    fn contexts(&self, _runtime: &RuntimeHandle) -> Result<Vec<ContextInfo>> {
        Ok(Vec::new())
    }

    /// Ends a code context.
    fn close_context(&self, _runtime: &RuntimeHandle, name: &str) -> Result<()> {
        Err(Error::NotFound { kind: "context".into(), id: name.into(), hint: String::new() })
    }

    /// Writes a file in the guest from `data`; returns the bytes written.
    fn write_file(&self, runtime: &RuntimeHandle, path: &str, mode: u32, data: &mut (dyn Read + Send)) -> Result<u64>;

    /// Reads a file from the guest into `out`; returns the bytes read.
    fn read_file(&self, runtime: &RuntimeHandle, path: &str, out: &mut (dyn Write + Send)) -> Result<u64>;

    fn list_dir(&self, runtime: &RuntimeHandle, path: &str) -> Result<Vec<DirEntry>>;

    /// Forks a running sandbox into `children.len()` children (see the BRANCH design).
    fn branch(
        &self,
        _runtime: &RuntimeHandle,
        _children: &[SandboxId],
        _opts: &BranchOptions,
    ) -> Result<BranchedChildren> {
        Err(Error::FailedPrecondition(format!("the {} backend cannot branch sandboxes", self.name())))
    }

    /// Starts a durable snapshot of a running sandbox: the source pauses about as long as for
    /// a BRANCH and runs on while a frozen copy writes the snapshot.
    fn snapshot(&self, _runtime: &RuntimeHandle, _req: &SnapshotRequest) -> Result<SnapshotStarted> {
        Err(self.no_snapshots())
    }

    /// Blocks until the snapshot `started` is durable, or says why it failed.
    fn wait_snapshot(&self, _started: &SnapshotStarted) -> Result<()> {
        Err(self.no_snapshots())
    }

    /// Starts sandbox `id` from snapshot `tag_or_id` (its vCPUs continue where they stopped);
    /// returns its runtime and the spec the snapshot was taken with.
    fn restore(&self, _id: &SandboxId, _tag_or_id: &str) -> Result<(RuntimeHandle, SandboxSpec)> {
        Err(self.no_snapshots())
    }

    /// Durable snapshots, oldest first.
    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Err(self.no_snapshots())
    }

    fn snapshot_info(&self, _tag_or_id: &str) -> Result<SnapshotInfo> {
        Err(self.no_snapshots())
    }

    /// Removes a snapshot (and with `cascade` the diffs built on it); returns the ids removed.
    fn remove_snapshot(&self, _tag_or_id: &str, _cascade: bool) -> Result<Vec<String>> {
        Err(self.no_snapshots())
    }

    /// Folds a diff chain into one full snapshot with the same id and tag.
    fn compact_snapshot(&self, _tag_or_id: &str) -> Result<SnapshotInfo> {
        Err(self.no_snapshots())
    }

    /// Reads every byte of a snapshot (and its chain) against its checksums.
    fn verify_snapshot(&self, _tag_or_id: &str) -> Result<VerifyReport> {
        Err(self.no_snapshots())
    }

    #[doc(hidden)]
    fn no_snapshots(&self) -> Error {
        Error::FailedPrecondition(format!("the {} backend keeps no snapshots", self.name()))
    }

    /// Stops the sandbox and removes everything it left on the host. Idempotent.
    fn destroy(&self, runtime: &RuntimeHandle) -> Result<()>;

    /// Cheap liveness check, used when re-adopting sandboxes after a restart.
    fn probe(&self, runtime: &RuntimeHandle) -> Liveness;

    fn memory_usage(&self, runtime: &RuntimeHandle) -> Result<MemoryUsage>;

    /// Usage and limits of the sandbox's cgroup, for `forkd inspect`; `None` when the backend
    /// does not confine sandboxes in cgroups.
    fn resource_usage(&self, _runtime: &RuntimeHandle) -> Option<ResourceUsage> {
        None
    }

    /// Removes host resources (network namespaces, links, cgroups) left by sandboxes whose VMM
    /// is gone; `known` are the runtimes of every sandbox the caller has a record of, dead or
    /// alive (the backend decides which still run). Called on start.
    fn cleanup_stale(&self, _known: &[RuntimeHandle]) -> Result<()> {
        Ok(())
    }

    /// The guest console log so far (the last `max_bytes` of it).
    fn console(&self, runtime: &RuntimeHandle, max_bytes: u64) -> Result<Vec<u8>>;
}
