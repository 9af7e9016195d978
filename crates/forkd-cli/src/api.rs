//! Where sandbox commands go: the running daemon (when one answers on the socket) or an
//! embedded controller over the state directory. Both give the same results, so the commands
//! print the same text and JSON either way.

use anyhow::{bail, Context};
use forkd_core::{
    BranchOptions, BranchResult, CancelToken, Controller, ExecOutcome, ExecRequest, ExecSink, ExitStatus, MemoryUsage,
    OutputStream, SandboxId, SandboxInfo, SandboxSpec,
};
use forkd_daemon::client::{pb, Client, ClientError, Target};
use forkd_daemon::convert;
use forkd_guest::dirs::Dirs;
use forkd_vmm::backend::{KvmBackend, KvmOptions};
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

/// How this process looks for a daemon (set once by `main`).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `--socket` / `FORKD_SOCKET`; the default socket otherwise.
    pub socket: Option<PathBuf>,
    /// Whether `--state-dir` / `FORKD_STATE_DIR` was given (then a daemon serving another
    /// state directory is not used).
    pub state_dir_explicit: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

pub fn socket_path() -> PathBuf {
    SETTINGS.get().and_then(|s| s.socket.clone()).unwrap_or_else(|| PathBuf::from(forkd_daemon::DEFAULT_SOCKET))
}

/// Chunk size for file uploads.
const UPLOAD_CHUNK: usize = 64 << 10;
/// Largest stdin `exec -i` forwards through the daemon (its message limit, less headroom).
const MAX_STDIN: usize = convert::MAX_MESSAGE_BYTES - (64 << 10);

/// The sandbox API of one CLI invocation.
pub enum Api {
    Local(Controller),
    Daemon(Remote),
}

/// A connection to the daemon with the runtime that drives it.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    client: Client,
}

/// The embedded controller over `dirs.state` (no daemon involved).
pub fn open_local(dirs: &Dirs, verbose: bool) -> anyhow::Result<Controller> {
    if let Some(pid) = forkd_daemon::daemon_pid(&dirs.state) {
        bail!(
            "a forkd daemon (pid {pid}) serves {} but does not answer on {}; point --socket or FORKD_SOCKET at its socket",
            dirs.state.display(),
            socket_path().display()
        );
    }
    let backend = KvmBackend::new(dirs.clone(), KvmOptions { console_echo: verbose, ..Default::default() })?;
    Ok(Controller::open(Arc::new(backend), &dirs.state, "cli")?)
}

impl Api {
    /// The daemon if one answers and serves our state directory, else an embedded controller.
    pub fn open(dirs: &Dirs, verbose: bool) -> anyhow::Result<Api> {
        match discover(dirs)? {
            Some(remote) => Ok(Api::Daemon(remote)),
            None => Ok(Api::Local(open_local(dirs, verbose)?)),
        }
    }

    pub fn create(&self, spec: SandboxSpec) -> anyhow::Result<SandboxInfo> {
        match self {
            Api::Local(c) => Ok(c.create(spec)?),
            Api::Daemon(r) => r.create(create_request(spec)?),
        }
    }

    pub fn create_template(&self, name: &str, spec: SandboxSpec) -> anyhow::Result<SandboxInfo> {
        match self {
            Api::Local(c) => Ok(c.create_template(name, spec)?),
            Api::Daemon(r) => r.create(pb::CreateRequest { template_name: name.into(), ..create_request(spec)? }),
        }
    }

    pub fn create_from_template(&self, name: &str) -> anyhow::Result<SandboxInfo> {
        match self {
            Api::Local(c) => Ok(c.create_from_template(name)?),
            Api::Daemon(r) => r.create(pb::CreateRequest { from_template: name.into(), ..Default::default() }),
        }
    }

    /// The running template called `name`.
    pub fn template(&self, name: &str) -> anyhow::Result<Option<SandboxInfo>> {
        match self {
            Api::Local(c) => Ok(c.template(name)),
            Api::Daemon(_) => Ok(self
                .list()?
                .into_iter()
                .find(|i| i.template.as_deref() == Some(name) && i.state == forkd_core::SandboxState::Running)),
        }
    }

    pub fn get(&self, id: &SandboxId) -> anyhow::Result<SandboxInfo> {
        match self {
            Api::Local(c) => Ok(c.get(id)?),
            Api::Daemon(r) => Ok(r.get(id, false)?.0),
        }
    }

    pub fn list(&self) -> anyhow::Result<Vec<SandboxInfo>> {
        match self {
            Api::Local(c) => Ok(c.list()),
            Api::Daemon(r) => {
                let list =
                    r.call(async { Ok(r.client.sandboxes().list(pb::ListRequest::default()).await?.into_inner()) })?;
                list.sandboxes.iter().map(|s| Ok(convert::sandbox_info(s)?.0)).collect()
            }
        }
    }

    pub fn memory_usage(&self, id: &SandboxId) -> anyhow::Result<MemoryUsage> {
        match self {
            Api::Local(c) => Ok(c.memory_usage(id)?),
            Api::Daemon(r) => r.get(id, true)?.1.context("the daemon reported no memory figures"),
        }
    }

    /// The sandbox's cgroup usage and limits, when its backend confines it in one.
    pub fn resource_usage(&self, id: &SandboxId) -> anyhow::Result<Option<forkd_core::ResourceUsage>> {
        match self {
            Api::Local(c) => Ok(c.resource_usage(id)?),
            Api::Daemon(r) => Ok(r.resources(id)?),
        }
    }

    pub fn console(&self, id: &SandboxId, max_bytes: u64) -> anyhow::Result<Vec<u8>> {
        match self {
            Api::Local(c) => Ok(c.console(id, max_bytes)?),
            Api::Daemon(r) => {
                let req = pb::GetConsoleRequest { id: id.to_string(), max_bytes };
                r.call(async { Ok(r.client.sandboxes().get_console(req).await?.into_inner().data) })
            }
        }
    }

    pub fn branch(&self, id: &SandboxId, opts: &BranchOptions) -> anyhow::Result<BranchResult> {
        match self {
            Api::Local(c) => Ok(c.branch(id, opts)?),
            Api::Daemon(r) => {
                let req = pb::BranchRequest {
                    id: id.to_string(),
                    count: Some(opts.count.into()),
                    limits: (!opts.limits.is_empty()).then(|| convert::limits_to_pb(&opts.limits)),
                };
                let resp = r.call(async { Ok(r.client.sandboxes().branch(req).await?.into_inner()) })?;
                let children = resp
                    .children
                    .iter()
                    .map(|c| Ok(convert::sandbox_info(c)?.0))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok(BranchResult {
                    source: SandboxId::parse(&resp.source)?,
                    children,
                    pause: Duration::try_from_secs_f64(resp.pause_ms / 1000.0).unwrap_or_default(),
                })
            }
        }
    }

    pub fn destroy(&self, id: &SandboxId) -> anyhow::Result<()> {
        match self {
            Api::Local(c) => Ok(c.destroy(id)?),
            Api::Daemon(r) => {
                let req = pb::DeleteRequest { id: id.to_string() };
                r.call(async { Ok(r.client.sandboxes().delete(req).await.map(|_| ())?) })
            }
        }
    }

    /// Runs a command; `cancel` (Ctrl-C) stops it. With the daemon, stdin is read whole first.
    pub fn exec_with_cancel(
        &self,
        id: &SandboxId,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> anyhow::Result<ExecOutcome> {
        match self {
            Api::Local(c) => Ok(c.exec_with_cancel(id, req, stdin, sink, cancel)?),
            Api::Daemon(r) => r.exec(id, req, stdin, sink, cancel),
        }
    }

    pub fn write_file(
        &self,
        id: &SandboxId,
        path: &str,
        mode: u32,
        data: &mut (dyn Read + Send),
    ) -> anyhow::Result<u64> {
        match self {
            Api::Local(c) => Ok(c.write_file(id, path, mode, data)?),
            Api::Daemon(r) => r.write_file(id, path, mode, data),
        }
    }

    pub fn read_file(&self, id: &SandboxId, path: &str, out: &mut (dyn Write + Send)) -> anyhow::Result<u64> {
        match self {
            Api::Local(c) => Ok(c.read_file(id, path, out)?),
            Api::Daemon(r) => {
                let req = pb::ReadFileRequest { id: id.to_string(), path: path.to_string() };
                r.call(async {
                    let mut stream = r.client.sandboxes().read_file(req).await?.into_inner();
                    let mut n = 0u64;
                    while let Some(chunk) = stream.message().await? {
                        out.write_all(&chunk.data).map_err(io_failed)?;
                        n += chunk.data.len() as u64;
                    }
                    Ok(n)
                })
            }
        }
    }

    /// Root filesystem images, as the API describes them.
    pub fn images(&self, dirs: &Dirs) -> anyhow::Result<Vec<pb::Image>> {
        match self {
            Api::Local(_) => Ok(forkd_guest::image::list(dirs)?.iter().map(convert::image).collect()),
            Api::Daemon(r) => {
                r.call(async { Ok(r.client.images().list(pb::ListImagesRequest {}).await?.into_inner().images) })
            }
        }
    }
}

fn io_failed(e: std::io::Error) -> ClientError {
    ClientError::Api { code: tonic::Code::Internal, message: format!("writing the output: {e}"), retry_after_ms: None }
}

fn create_request(spec: SandboxSpec) -> anyhow::Result<pb::CreateRequest> {
    // The daemon resolves paths in its own working directory: send an absolute one.
    let kernel = match &spec.kernel {
        Some(k) => std::path::absolute(k).with_context(|| format!("resolving {}", k.display()))?.display().to_string(),
        None => String::new(),
    };
    Ok(pb::CreateRequest {
        image: spec.image,
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus.into(),
        labels: spec.labels.into_iter().collect(),
        kernel,
        network: Some(convert::network_to_pb(&spec.network)),
        limits: Some(convert::limits_to_pb(&spec.limits)),
        ..Default::default()
    })
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Connects to the daemon if one answers on the socket and serves the state directory we mean.
fn discover(dirs: &Dirs) -> anyhow::Result<Option<Remote>> {
    let socket = socket_path();
    if !socket.exists() {
        return Ok(None);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    let target = Target::Unix(socket.clone());
    let probe = async {
        let client = Client::connect(&target).await?;
        let info = tokio::time::timeout(Duration::from_secs(10), client.daemon().info(pb::InfoRequest {}))
            .await
            .map_err(|_| ClientError::Connect { target: target.to_string(), reason: "no answer in 10 s".into() })??
            .into_inner();
        Ok::<_, ClientError>((client, info))
    };
    let (client, info) = match rt.block_on(probe) {
        Ok(found) => found,
        Err(e) => {
            tracing::info!("not using the daemon: {e}");
            return Ok(None);
        }
    };
    let explicit = SETTINGS.get().is_some_and(|s| s.state_dir_explicit);
    if explicit && Path::new(&info.state_dir) != canonical(&dirs.state) {
        eprintln!(
            "forkd: note: the daemon on {} serves {}, not {}; working on {} directly",
            socket.display(),
            info.state_dir,
            dirs.state.display(),
            dirs.state.display()
        );
        return Ok(None);
    }
    Ok(Some(Remote { rt, client }))
}

impl Remote {
    fn call<T>(&self, f: impl Future<Output = Result<T, ClientError>>) -> anyhow::Result<T> {
        Ok(self.rt.block_on(f)?)
    }

    fn create(&self, req: pb::CreateRequest) -> anyhow::Result<SandboxInfo> {
        let s = self.call(async { Ok(self.client.sandboxes().create(req).await?.into_inner()) })?;
        Ok(convert::sandbox_info(&s)?.0)
    }

    fn resources(&self, id: &SandboxId) -> anyhow::Result<Option<forkd_core::ResourceUsage>> {
        let req = pb::GetRequest { id: id.to_string(), include_memory: true };
        let s = self.call(async { Ok(self.client.sandboxes().get(req).await?.into_inner()) })?;
        Ok(s.resources.as_ref().map(convert::resources_from_pb))
    }

    fn get(&self, id: &SandboxId, include_memory: bool) -> anyhow::Result<(SandboxInfo, Option<MemoryUsage>)> {
        let req = pb::GetRequest { id: id.to_string(), include_memory };
        let s = self.call(async { Ok(self.client.sandboxes().get(req).await?.into_inner()) })?;
        Ok(convert::sandbox_info(&s)?)
    }

    fn exec(
        &self,
        id: &SandboxId,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> anyhow::Result<ExecOutcome> {
        let stdin = match stdin {
            Some(reader) => {
                let mut buf = Vec::new();
                reader.take(MAX_STDIN as u64 + 1).read_to_end(&mut buf).context("reading stdin")?;
                if buf.len() > MAX_STDIN {
                    bail!("stdin is larger than {} MiB; copy the data in with `forkd cp` instead", MAX_STDIN >> 20);
                }
                Some(buf)
            }
            None => None,
        };
        let request = pb::ExecRequest {
            id: id.to_string(),
            args: req.argv.clone(),
            env: req.env.clone(),
            cwd: req.cwd.clone().unwrap_or_default(),
            timeout_secs: req.timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0),
            stdin,
        };
        let (tx, mut cancelled) = tokio::sync::oneshot::channel::<()>();
        let tx = Mutex::new(Some(tx));
        cancel.on_cancel(move || {
            if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(());
            }
        });
        let started = std::time::Instant::now();
        self.call(async {
            let mut stream = self.client.sandboxes().exec(request).await?.into_inner();
            loop {
                tokio::select! {
                    // Dropping the stream makes the daemon kill the command.
                    _ = &mut cancelled => {
                        return Ok(ExecOutcome { status: ExitStatus::Signal(libc::SIGINT), duration: started.elapsed() });
                    }
                    event = stream.message() => match event?.and_then(|e| e.event) {
                        Some(pb::exec_event::Event::Stdout(d)) => sink.output(OutputStream::Stdout, &d),
                        Some(pb::exec_event::Event::Stderr(d)) => sink.output(OutputStream::Stderr, &d),
                        Some(pb::exec_event::Event::Exit(exit)) => return Ok(outcome(&exit)),
                        None => {
                            return Err(ClientError::Api {
                                code: tonic::Code::Internal,
                                message: "the exec stream ended without an exit status".into(),
                                retry_after_ms: None,
                            })
                        }
                    },
                }
            }
        })
    }

    fn write_file(&self, id: &SandboxId, path: &str, mode: u32, data: &mut (dyn Read + Send)) -> anyhow::Result<u64> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let first = pb::WriteFileRequest { id: id.to_string(), path: path.to_string(), mode, data: Vec::new() };
        tx.try_send(first).map_err(|_| anyhow::anyhow!("upload channel closed"))?;
        // A scoped thread reads the (borrowed) source while the runtime streams it out.
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || -> std::io::Result<()> {
                let mut buf = vec![0u8; UPLOAD_CHUNK];
                loop {
                    let n = data.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    let msg = pb::WriteFileRequest { data: buf[..n].to_vec(), ..Default::default() };
                    if tx.blocking_send(msg).is_err() {
                        return Ok(()); // the call failed; its error is reported below
                    }
                }
            });
            let sent = self.call(async {
                Ok(self.client.sandboxes().write_file(ReceiverStream::new(rx)).await?.into_inner().bytes_written)
            });
            let read = reader.join().map_err(|_| anyhow::anyhow!("the file reader panicked"))?;
            let n = sent?;
            read.context("reading the source file (the guest copy is incomplete)")?;
            Ok(n)
        })
    }
}

fn outcome(exit: &pb::ExecExit) -> ExecOutcome {
    let status = if exit.timed_out {
        ExitStatus::TimedOut
    } else if let Some(sig) = exit.signal {
        ExitStatus::Signal(sig)
    } else {
        ExitStatus::Code(exit.exit_code)
    };
    ExecOutcome { status, duration: Duration::try_from_secs_f64(exit.duration_ms / 1000.0).unwrap_or_default() }
}
