//! forkd-client: one Rust API for forkd sandboxes, whether a daemon serves them or this
//! process does.
//!
//! [`Client::connect`] uses the daemon when one answers on the socket and serves the state
//! directory meant, and otherwise opens an embedded [`Controller`] (with the KVM backend) on
//! that state directory. Either way every call takes and returns forkd-core's types and fails
//! with the same [`forkd_core::Error`], and commands stream their output through the same
//! [`ExecSink`]. The CLI, the MCP server and the bench are thin shells over this crate.
//!
//! ```no_run
//! use forkd_client::{Client, ConnectOptions};
//! use forkd_core::{BranchOptions, CapturedOutput, ExecRequest, SandboxSpec};
//! # fn main() -> forkd_core::Result<()> {
//! let forkd = Client::connect(&ConnectOptions::from_env())?;
//! let sandbox = forkd.create(SandboxSpec::default())?;
//! let mut out = CapturedOutput::default();
//! forkd.exec(&sandbox.id, &ExecRequest::new(["uname", "-a"]), None, &mut out, &Default::default())?;
//! let children = forkd.branch(&sandbox.id, &BranchOptions::count(4))?;
//! # Ok(()) }
//! ```
//!
//! [`grpc`] is the daemon's API for async Rust.

pub mod grpc;
mod remote;
mod wait;

use forkd_core::{
    BranchOptions, BranchResult, CancelToken, ContextInfo, Controller, ControllerOptions, DirEntry, Dirs, Error,
    EvalRequest, EvalResult, ExecOutcome, ExecRequest, ExecSink, ImageInfo, MemoryUsage, ResourceUsage, Result,
    SandboxId, SandboxInfo, SandboxSpec, SandboxState, SnapshotInfo, SnapshotOptions, SnapshotResult, VerifyReport,
    Warm,
};
use forkd_kvm::{KvmBackend, KvmOptions};
use grpc::{pb, Target};
use remote::Remote;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use remote::MAX_STDIN;
pub use wait::{WaitOutcome, WaitSource};

/// How [`Client::connect`] finds forkd.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub dirs: Dirs,
    /// The daemon socket the user named (`--socket`, `FORKD_SOCKET`): it must answer. `None`:
    /// the default socket, used when a daemon answers there.
    pub socket: Option<PathBuf>,
    /// The state directory was named explicitly: a daemon serving another one is not used.
    pub state_dir_explicit: bool,
    /// Embedded only: how the KVM backend runs sandboxes.
    pub kvm: KvmOptions,
}

impl ConnectOptions {
    /// Directories and socket from the environment (`FORKD_STATE_DIR`, `FORKD_CACHE_DIR`,
    /// `FORKD_SOCKET`).
    pub fn from_env() -> Self {
        Self {
            dirs: Dirs::from_env(),
            socket: forkd_core::dirs::socket_from_env(),
            state_dir_explicit: std::env::var_os(forkd_core::dirs::STATE_DIR_ENV).is_some(),
            kvm: KvmOptions::default(),
        }
    }

    /// The socket to look for a daemon on.
    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| PathBuf::from(forkd_core::dirs::DEFAULT_SOCKET))
    }
}

/// Where a client's calls go.
enum Backend {
    Embedded(Controller),
    Daemon(Remote),
}

/// forkd's sandbox API over an embedded controller or a daemon. Blocking; call it from a
/// blocking thread in async code.
pub struct Client {
    backend: Backend,
}

/// Opens the KVM backend's controller on `dirs.state`, persisting to it (what a daemon or an
/// embedded client runs).
pub fn open_controller(dirs: &Dirs, kvm: KvmOptions, who: &str, options: ControllerOptions) -> Result<Controller> {
    let backend = KvmBackend::new(dirs.clone(), kvm)?;
    Ok(Controller::open(Arc::new(backend), &dirs.state, who)?.with_options(options))
}

impl Client {
    /// The daemon if one answers and serves the state directory meant, else an embedded
    /// controller over it. A socket the user named must answer.
    pub fn connect(opts: &ConnectOptions) -> Result<Client> {
        match discover(opts)? {
            Some(remote) => Ok(Client { backend: Backend::Daemon(remote) }),
            None => Self::embedded(opts),
        }
    }

    /// An embedded controller over `opts.dirs.state` (shared with other forkd processes, but
    /// not with a running daemon, which owns it).
    pub fn embedded(opts: &ConnectOptions) -> Result<Client> {
        if let Some(pid) = opts.dirs.daemon_pid() {
            return Err(Error::FailedPrecondition(format!(
                "a forkd daemon (pid {pid}) serves {} but does not answer on {}; point --socket or FORKD_SOCKET at its socket",
                opts.dirs.state.display(),
                opts.socket_path().display()
            )));
        }
        let controller = open_controller(&opts.dirs, opts.kvm.clone(), "cli", ControllerOptions::default())?;
        Ok(Client { backend: Backend::Embedded(controller) })
    }

    /// The daemon at `target`, which must answer.
    pub fn daemon(target: &Target) -> Result<Client> {
        Ok(Client { backend: Backend::Daemon(Remote::connect(target)?.0) })
    }

    /// Wraps a controller this process already has.
    pub fn from_controller(controller: Controller) -> Client {
        Client { backend: Backend::Embedded(controller) }
    }

    /// The daemon this client talks to, if any.
    pub fn daemon_target(&self) -> Option<&Target> {
        match &self.backend {
            Backend::Daemon(r) => Some(r.target()),
            Backend::Embedded(_) => None,
        }
    }

    /// Boots a new sandbox.
    pub fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo> {
        match &self.backend {
            Backend::Embedded(c) => c.create(spec),
            Backend::Daemon(r) => r.create(remote::create_request(spec)?),
        }
    }

    /// Boots a sandbox and keeps it as template `name` (on disk too), with `warm`'s
    /// interpreter already started in its `main` code context.
    pub fn create_template(&self, name: &str, spec: SandboxSpec, warm: Option<&Warm>) -> Result<SandboxInfo> {
        match &self.backend {
            Backend::Embedded(c) => c.create_warm_template(name, spec, warm),
            Backend::Daemon(r) => r.create(pb::CreateRequest {
                template_name: name.into(),
                warm: warm.map(|w| format!("python:{}", w.modules.join(","))).unwrap_or_default(),
                ..remote::create_request(spec)?
            }),
        }
    }

    /// A new sandbox forked from template `name` (a BRANCH, not a boot).
    pub fn create_from_template(&self, name: &str) -> Result<SandboxInfo> {
        match &self.backend {
            Backend::Embedded(c) => c.create_from_template(name),
            Backend::Daemon(r) => r.create(pb::CreateRequest { from_template: name.into(), ..Default::default() }),
        }
    }

    /// The running template called `name`.
    pub fn template(&self, name: &str) -> Result<Option<SandboxInfo>> {
        Ok(self.list()?.into_iter().find(|i| i.template.as_deref() == Some(name) && i.state == SandboxState::Running))
    }

    pub fn get(&self, id: &SandboxId) -> Result<SandboxInfo> {
        match &self.backend {
            Backend::Embedded(c) => c.get(id),
            Backend::Daemon(r) => Ok(forkd_proto::convert::sandbox_info(&r.get(id, false)?)?.0),
        }
    }

    pub fn list(&self) -> Result<Vec<SandboxInfo>> {
        match &self.backend {
            Backend::Embedded(c) => Ok(c.list()),
            Backend::Daemon(r) => Ok(r.list(false)?.into_iter().map(|(i, _)| i).collect()),
        }
    }

    /// Every sandbox with its host memory use (when it can be read).
    pub fn list_with_memory(&self) -> Result<Vec<(SandboxInfo, Option<MemoryUsage>)>> {
        match &self.backend {
            Backend::Embedded(c) => Ok(c.list().into_iter().map(|i| (i.clone(), c.memory_usage(&i.id).ok())).collect()),
            Backend::Daemon(r) => r.list(true),
        }
    }

    pub fn memory_usage(&self, id: &SandboxId) -> Result<MemoryUsage> {
        match &self.backend {
            Backend::Embedded(c) => c.memory_usage(id),
            Backend::Daemon(r) => r.memory_usage(id),
        }
    }

    /// The sandbox's cgroup usage and limits, when its backend confines it in one.
    pub fn resource_usage(&self, id: &SandboxId) -> Result<Option<ResourceUsage>> {
        match &self.backend {
            Backend::Embedded(c) => c.resource_usage(id),
            Backend::Daemon(r) => r.resource_usage(id),
        }
    }

    /// The last `max_bytes` of the guest console.
    pub fn console(&self, id: &SandboxId, max_bytes: u64) -> Result<Vec<u8>> {
        match &self.backend {
            Backend::Embedded(c) => c.console(id, max_bytes),
            Backend::Daemon(r) => r.console(id, max_bytes),
        }
    }

    /// Forks a running sandbox into `opts.count` children; the source keeps running.
    pub fn branch(&self, id: &SandboxId, opts: &BranchOptions) -> Result<BranchResult> {
        match &self.backend {
            Backend::Embedded(c) => c.branch(id, opts),
            Backend::Daemon(r) => r.branch(id, opts),
        }
    }

    pub fn destroy(&self, id: &SandboxId) -> Result<()> {
        match &self.backend {
            Backend::Embedded(c) => c.destroy(id),
            Backend::Daemon(r) => r.destroy(id),
        }
    }

    /// Runs a command, streaming its output to `sink`; `cancel` (e.g. Ctrl-C) stops it with
    /// `Error::Cancelled`. Through a daemon, stdin is read whole first (at most [`MAX_STDIN`]).
    pub fn exec(
        &self,
        id: &SandboxId,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<ExecOutcome> {
        match &self.backend {
            Backend::Embedded(c) => c.exec_with_cancel(id, req, stdin, sink, cancel),
            Backend::Daemon(r) => {
                req.validate()?;
                r.exec(id, req, stdin, sink, cancel)
            }
        }
    }

    /// Runs a snippet in one of the sandbox's code contexts (created on first use), streaming
    /// its output to `sink`; `cancel` interrupts it (the context lives on).
    pub fn eval(
        &self,
        id: &SandboxId,
        req: &EvalRequest,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<EvalResult> {
        match &self.backend {
            Backend::Embedded(c) => c.eval(id, req, sink, cancel),
            Backend::Daemon(r) => {
                req.validate()?;
                r.eval(id, req, sink, cancel)
            }
        }
    }

    /// The sandbox's live code contexts.
    pub fn contexts(&self, id: &SandboxId) -> Result<Vec<ContextInfo>> {
        match &self.backend {
            Backend::Embedded(c) => c.contexts(id),
            Backend::Daemon(r) => r.contexts(id),
        }
    }

    /// Ends one of the sandbox's code contexts.
    pub fn close_context(&self, id: &SandboxId, name: &str) -> Result<()> {
        match &self.backend {
            Backend::Embedded(c) => c.close_context(id, name),
            Backend::Daemon(r) => r.close_context(id, name),
        }
    }

    pub fn write_file(&self, id: &SandboxId, path: &str, mode: u32, data: &mut (dyn Read + Send)) -> Result<u64> {
        match &self.backend {
            Backend::Embedded(c) => c.write_file(id, path, mode, data),
            Backend::Daemon(r) => r.write_file(id, path, mode, data),
        }
    }

    pub fn read_file(&self, id: &SandboxId, path: &str, out: &mut (dyn Write + Send)) -> Result<u64> {
        match &self.backend {
            Backend::Embedded(c) => c.read_file(id, path, out),
            Backend::Daemon(r) => r.read_file(id, path, out),
        }
    }

    pub fn list_dir(&self, id: &SandboxId, path: &str) -> Result<Vec<DirEntry>> {
        match &self.backend {
            Backend::Embedded(c) => c.list_dir(id, path),
            Backend::Daemon(r) => r.list_dir(id, path),
        }
    }

    /// Starts a durable snapshot (`opts.wait`: returns once it is durable).
    pub fn snapshot(&self, id: &SandboxId, opts: &SnapshotOptions) -> Result<SnapshotResult> {
        match &self.backend {
            Backend::Embedded(c) => c.snapshot(id, opts),
            Backend::Daemon(r) => r.snapshot(id, opts),
        }
    }

    /// Durable snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        match &self.backend {
            Backend::Embedded(c) => c.snapshots(),
            Backend::Daemon(r) => r.snapshots(),
        }
    }

    pub fn snapshot_info(&self, tag_or_id: &str) -> Result<SnapshotInfo> {
        match &self.backend {
            Backend::Embedded(c) => c.snapshot_info(tag_or_id),
            Backend::Daemon(r) => r.snapshot_info(tag_or_id),
        }
    }

    /// Removes a snapshot (`cascade`: and the diffs built on it); returns the ids removed.
    pub fn remove_snapshot(&self, tag_or_id: &str, cascade: bool) -> Result<Vec<String>> {
        match &self.backend {
            Backend::Embedded(c) => c.remove_snapshot(tag_or_id, cascade),
            Backend::Daemon(r) => r.remove_snapshot(tag_or_id, cascade),
        }
    }

    pub fn compact_snapshot(&self, tag_or_id: &str) -> Result<SnapshotInfo> {
        match &self.backend {
            Backend::Embedded(c) => c.compact_snapshot(tag_or_id),
            Backend::Daemon(r) => r.compact_snapshot(tag_or_id),
        }
    }

    pub fn verify_snapshot(&self, tag_or_id: &str) -> Result<VerifyReport> {
        match &self.backend {
            Backend::Embedded(c) => c.verify_snapshot(tag_or_id),
            Backend::Daemon(r) => r.verify_snapshot(tag_or_id),
        }
    }

    /// Starts `count` sandboxes from a snapshot: one restored, the rest branched from it.
    pub fn create_from_snapshot(&self, tag_or_id: &str, count: u32) -> Result<Vec<SandboxInfo>> {
        match &self.backend {
            Backend::Embedded(c) => c.create_from_snapshot(tag_or_id, count),
            Backend::Daemon(r) => r.restore(tag_or_id, count),
        }
    }

    /// Removes template `name`: its running sandbox and the snapshot that keeps it on disk.
    pub fn remove_template(&self, name: &str) -> Result<()> {
        let tag = forkd_core::controller::template_snapshot_tag(name);
        let live = self.template(name)?;
        let snapshot = self.snapshot_info(&tag).ok();
        if live.is_none() && snapshot.is_none() {
            return Err(Error::NotFound {
                kind: "template".into(),
                id: name.into(),
                hint: format!("; `forkd template ls` lists templates, `forkd template create {name}` makes it"),
            });
        }
        if let Some(info) = live {
            self.destroy(&info.id)?;
        }
        if snapshot.is_some() {
            self.remove_snapshot(&tag, true)?;
        }
        Ok(())
    }

    /// Root filesystem images new sandboxes can use.
    pub fn images(&self, dirs: &Dirs) -> Result<Vec<ImageInfo>> {
        match &self.backend {
            Backend::Embedded(_) => local_images(dirs),
            Backend::Daemon(r) => r.images(),
        }
    }
}

/// The images in `dirs` (what a daemon's Images.List returns too).
pub fn local_images(dirs: &Dirs) -> Result<Vec<ImageInfo>> {
    let images = forkd_guest::image::list(dirs).map_err(|e| Error::FailedPrecondition(e.to_string()))?;
    Ok(images.iter().map(forkd_guest::image::Image::info).collect())
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The daemon to use, if one answers on the socket and serves the state directory meant.
fn discover(opts: &ConnectOptions) -> Result<Option<Remote>> {
    let socket = opts.socket_path();
    let named = opts.socket.is_some();
    if !named && !socket.exists() {
        return Ok(None);
    }
    let (remote, info) = match Remote::connect(&Target::Unix(socket.clone())) {
        Ok(found) => found,
        Err(e) if named => {
            return Err(Error::Unavailable(format!(
                "no forkd daemon answers at {} ({e}); start one with `forkd daemon --socket {}`, or unset FORKD_SOCKET / --socket to work on {} directly",
                socket.display(),
                socket.display(),
                opts.dirs.state.display()
            )))
        }
        Err(e) => {
            tracing::info!("not using the daemon: {e}");
            return Ok(None);
        }
    };
    if opts.state_dir_explicit && Path::new(&info.state_dir) != canonical(&opts.dirs.state) {
        tracing::warn!(
            "the daemon on {} (pid {}) serves {}, not {}; working on {} directly",
            socket.display(),
            info.pid,
            info.state_dir,
            opts.dirs.state.display(),
            opts.dirs.state.display()
        );
        return Ok(None);
    }
    Ok(Some(remote))
}
