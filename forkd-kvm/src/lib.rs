//! forkd-kvm: the KVM [`SandboxBackend`]. Each sandbox is a `forkd-vmm` process started from a
//! `vm.json`, in its own network namespace and cgroup, reached through its control socket and,
//! for commands and files, through the guest agent over vsock.
//!
//! A sandbox directory (`<state>/sandboxes/<id>/`) holds everything of one sandbox:
//! `vm.json`, `control.sock`, `vsock.sock`, `console.log`, `vmm.log` and `disk/` (its
//! copy-on-write layers). Destroying the sandbox removes the directory.
//!
//! ```no_run
//! use forkd_core::{Controller, Dirs, SandboxSpec};
//! use forkd_kvm::{KvmBackend, KvmOptions};
//! # fn main() -> forkd_core::Result<()> {
//! let backend = KvmBackend::new(Dirs::from_env(), KvmOptions::default())?;
//! let forkd = Controller::new(std::sync::Arc::new(backend));
//! let sandbox = forkd.create(SandboxSpec::default())?;
//! # Ok(()) }
//! ```

mod agent;
mod branch;
pub mod doctor;
pub mod isolation;
mod launch;
pub mod process;
mod ready;
pub mod runtime;
mod snapshots;

pub use runtime::VmmRuntime;

use forkd_core::backend::{
    BranchOptions, BranchedChildren, DirEntry, Liveness, MemoryUsage, ResourceUsage, RuntimeHandle, SandboxBackend,
};
use forkd_core::snapshot::{SnapshotRequest, SnapshotStarted};
use forkd_core::{CancelToken, Dirs, Error, ExecOutcome, ExecRequest, ExecSink, Result, SandboxId, SandboxSpec};
use forkd_core::{ContextInfo, EvalRequest, EvalResult, SnapshotInfo, VerifyReport};
use forkd_vmm::control::{self, ControlRequest};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The guest port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Environment variable naming the `forkd-vmm` binary.
pub const VMM_BINARY_ENV: &str = "FORKD_VMM";

/// Tunables of the KVM backend.
#[derive(Debug, Clone)]
pub struct KvmOptions {
    /// How long a fresh boot may take to reach a ready agent.
    pub boot_timeout: Duration,
    /// Copy the guest console to the VMM's log (debugging).
    pub console_echo: bool,
}

impl Default for KvmOptions {
    fn default() -> Self {
        let secs = std::env::var("FORKD_BOOT_TIMEOUT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
        Self { boot_timeout: Duration::from_secs(secs), console_echo: false }
    }
}

/// Runs sandboxes as KVM microVMs.
pub struct KvmBackend {
    dirs: Dirs,
    vmm_binary: PathBuf,
    options: KvmOptions,
    /// sha256 of kernels snapshots name, by (path, mtime, size).
    hashes: std::sync::Mutex<std::collections::HashMap<(PathBuf, std::time::SystemTime, u64), String>>,
}

/// Finds `forkd-vmm`: `$FORKD_VMM`, next to the current executable, or one directory up
/// (test binaries live in `target/<profile>/deps`).
pub fn locate_vmm_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(VMM_BINARY_ENV) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| Error::internal(format!("current executable: {e}")))?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("forkd-vmm"));
        if let Some(up) = dir.parent() {
            candidates.push(up.join("forkd-vmm"));
        }
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "cannot find the forkd-vmm binary next to {}; build it (`cargo build --release`) or set {VMM_BINARY_ENV}",
            exe.display()
        ))
    })
}

impl KvmBackend {
    pub fn new(dirs: Dirs, options: KvmOptions) -> Result<Self> {
        Ok(Self { dirs, vmm_binary: locate_vmm_binary()?, options, hashes: Default::default() })
    }

    pub fn dirs(&self) -> &Dirs {
        &self.dirs
    }
}

/// How long removing a sandbox waits for snapshots of it still being written.
const SNAPSHOT_WRITER_GRACE: Duration = Duration::from_secs(300);

/// Stops a sandbox's VMM (politely, then SIGKILL) and removes its network, cgroup and
/// directory. Idempotent.
fn stop_and_remove(rt: &VmmRuntime) -> Result<()> {
    if rt.alive() {
        let _ = control::request(&rt.control_socket, &ControlRequest::Shutdown, Duration::from_secs(2));
        if !process::wait_exit(rt.pid, Duration::from_secs(3)) {
            process::signal(rt.pid, rt.start_time, libc::SIGKILL);
            process::wait_exit(rt.pid, Duration::from_secs(3));
        }
    }
    wait_for_snapshot_writers(rt);
    isolation::teardown(rt.net.as_ref(), rt.cgroup.as_ref())?;
    match std::fs::remove_dir_all(&rt.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::internal(format!("removing {}: {e}", rt.dir.display()))),
    }
}

/// A snapshot taken without waiting is written by a frozen copy of the VMM that lives in the
/// sandbox's cgroup; tearing the cgroup down would kill it and lose the snapshot the caller
/// was told is on its way. So removal lets running writers finish first (bounded).
fn wait_for_snapshot_writers(rt: &VmmRuntime) {
    let Some(cgroup) = rt.cgroup.as_ref() else {
        return; // not confined: nothing will kill the writers
    };
    let deadline = Instant::now() + SNAPSHOT_WRITER_GRACE;
    let mut announced = false;
    loop {
        let writers: Vec<u32> =
            cgroup.pids().unwrap_or_default().into_iter().filter(|&pid| process::is_snapshot_writer(pid)).collect();
        if writers.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(dir = %rt.dir.display(), ?writers, "snapshot writers still running; removing the sandbox anyway");
            return;
        }
        if !announced {
            tracing::info!(dir = %rt.dir.display(), ?writers, "waiting for snapshot writers before removing the sandbox");
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl SandboxBackend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create(&self, id: &SandboxId, spec: &SandboxSpec) -> Result<RuntimeHandle> {
        Ok(self.boot(id, spec)?.to_handle())
    }

    fn exec(
        &self,
        runtime: &RuntimeHandle,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<ExecOutcome> {
        let rt = VmmRuntime::from_handle(runtime)?;
        agent::exec(&rt.vsock_socket, req, stdin, sink, cancel)
    }

    fn eval(
        &self,
        runtime: &RuntimeHandle,
        req: &EvalRequest,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<EvalResult> {
        agent::eval(&VmmRuntime::from_handle(runtime)?.vsock_socket, req, sink, cancel)
    }

    fn contexts(&self, runtime: &RuntimeHandle) -> Result<Vec<ContextInfo>> {
        agent::contexts(&VmmRuntime::from_handle(runtime)?.vsock_socket)
    }

    fn close_context(&self, runtime: &RuntimeHandle, name: &str) -> Result<()> {
        agent::close_context(&VmmRuntime::from_handle(runtime)?.vsock_socket, name)
    }

    fn write_file(&self, runtime: &RuntimeHandle, path: &str, mode: u32, data: &mut (dyn Read + Send)) -> Result<u64> {
        let rt = VmmRuntime::from_handle(runtime)?;
        agent::write_file(&rt.vsock_socket, path, mode, data)
    }

    fn read_file(&self, runtime: &RuntimeHandle, path: &str, out: &mut (dyn Write + Send)) -> Result<u64> {
        let rt = VmmRuntime::from_handle(runtime)?;
        agent::read_file(&rt.vsock_socket, path, out)
    }

    fn list_dir(&self, runtime: &RuntimeHandle, path: &str) -> Result<Vec<DirEntry>> {
        let rt = VmmRuntime::from_handle(runtime)?;
        agent::list_dir(&rt.vsock_socket, path)
    }

    fn branch(
        &self,
        runtime: &RuntimeHandle,
        children: &[SandboxId],
        opts: &BranchOptions,
    ) -> Result<BranchedChildren> {
        self.branch_children(&VmmRuntime::from_handle(runtime)?, children, opts)
    }

    fn snapshot(&self, runtime: &RuntimeHandle, req: &SnapshotRequest) -> Result<SnapshotStarted> {
        self.start_snapshot(&VmmRuntime::from_handle(runtime)?, req)
    }

    fn wait_snapshot(&self, started: &SnapshotStarted) -> Result<()> {
        self.wait_for_writer(started)
    }

    fn restore(&self, id: &SandboxId, tag_or_id: &str) -> Result<(RuntimeHandle, SandboxSpec)> {
        let (rt, spec) = self.restore_sandbox(id, tag_or_id)?;
        Ok((rt.to_handle(), spec))
    }

    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.list_snapshots()
    }

    fn snapshot_info(&self, tag_or_id: &str) -> Result<SnapshotInfo> {
        self.one_snapshot(tag_or_id)
    }

    fn remove_snapshot(&self, tag_or_id: &str, cascade: bool) -> Result<Vec<String>> {
        self.store().remove(tag_or_id, cascade).map_err(snapshots::snapshot_error)
    }

    fn compact_snapshot(&self, tag_or_id: &str) -> Result<SnapshotInfo> {
        self.compact(tag_or_id)
    }

    fn verify_snapshot(&self, tag_or_id: &str) -> Result<VerifyReport> {
        self.verify(tag_or_id)
    }

    fn destroy(&self, runtime: &RuntimeHandle) -> Result<()> {
        stop_and_remove(&VmmRuntime::from_handle(runtime)?)
    }

    fn probe(&self, runtime: &RuntimeHandle) -> Liveness {
        match VmmRuntime::from_handle(runtime) {
            Ok(rt) if rt.alive() => Liveness::Running,
            Ok(rt) => Liveness::Exited(rt.exit_reason()),
            Err(e) => Liveness::Exited(e.to_string()),
        }
    }

    fn memory_usage(&self, runtime: &RuntimeHandle) -> Result<MemoryUsage> {
        let rt = VmmRuntime::from_handle(runtime)?;
        let (rss_kib, pss_kib, private_dirty_kib) = process::smaps_rollup(rt.pid)
            .map_err(|e| Error::Unavailable(format!("sandbox VMM (pid {}) memory: {e}", rt.pid)))?;
        Ok(MemoryUsage { rss_kib, pss_kib, private_dirty_kib })
    }

    fn resource_usage(&self, runtime: &RuntimeHandle) -> Option<ResourceUsage> {
        isolation::resource_usage(&VmmRuntime::from_handle(runtime).ok()?)
    }

    fn cleanup_stale(&self, known: &[RuntimeHandle]) -> Result<()> {
        let alive: Vec<String> = known
            .iter()
            .filter_map(|h| VmmRuntime::from_handle(h).ok())
            .filter(|rt| rt.alive())
            .filter_map(|rt| rt.dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        match self.store().cleanup_leftovers() {
            Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "removed unfinished snapshots"),
            Ok(_) => {}
            Err(e) => tracing::warn!("cleaning up unfinished snapshots: {e}"),
        }
        isolation::cleanup_stale(&self.dirs, &alive)
    }

    fn console(&self, runtime: &RuntimeHandle, max_bytes: u64) -> Result<Vec<u8>> {
        let rt = VmmRuntime::from_handle(runtime)?;
        Ok(process::tail(&rt.console_log, max_bytes))
    }
}
