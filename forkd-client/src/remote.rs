//! The blocking client's daemon half: every call of [`crate::Client`] over gRPC, driven by a
//! runtime of its own, with forkd-core's types and errors on both sides.

use crate::grpc::{error, pb, Connection, Target};
use forkd_core::{
    BranchOptions, BranchResult, CancelToken, ContextInfo, DirEntry, Error, EvalRequest, EvalResult, ExecOutcome,
    ExecRequest, ExecSink, ExitStatus, ImageInfo, MemoryUsage, OutputStream, ResourceUsage, Result, SandboxId,
    SandboxInfo, SandboxSpec, SnapshotInfo, SnapshotOptions, SnapshotResult, VerifyReport,
};
use forkd_proto::convert;
use std::future::Future;
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

/// Chunk size of file uploads.
const UPLOAD_CHUNK: usize = 64 << 10;
/// Largest stdin an exec forwards through the daemon (its message limit, less headroom).
pub const MAX_STDIN: usize = convert::MAX_MESSAGE_BYTES - (64 << 10);

/// A connection to the daemon with the runtime that drives it.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    target: Target,
}

/// The daemon's own description (its `Info`), as the client needs it.
pub struct DaemonInfo {
    pub state_dir: String,
    pub pid: u32,
}

impl Remote {
    /// Connects and asks the daemon who it is (within 10 s).
    pub fn connect(target: &Target) -> Result<(Self, DaemonInfo)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("starting a runtime: {e}")))?;
        let (conn, info) = rt.block_on(async {
            let conn = Connection::connect(target).await?;
            let info = tokio::time::timeout(Duration::from_secs(10), conn.daemon().info(pb::InfoRequest {}))
                .await
                .map_err(|_| Error::Unavailable(format!("the forkd daemon at {target} did not answer in 10 s")))?
                .map_err(error)?
                .into_inner();
            Ok::<_, Error>((conn, info))
        })?;
        let info = DaemonInfo { state_dir: info.state_dir, pid: info.pid };
        Ok((Self { rt, conn, target: target.clone() }, info))
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn call<T>(&self, f: impl Future<Output = std::result::Result<T, tonic::Status>>) -> Result<T> {
        self.rt.block_on(f).map_err(error)
    }

    fn sandbox(&self, s: &pb::Sandbox) -> Result<SandboxInfo> {
        Ok(convert::sandbox_info(s)?.0)
    }

    pub fn create(&self, req: pb::CreateRequest) -> Result<SandboxInfo> {
        let s = self.call(async { Ok(self.conn.sandboxes().create(req).await?.into_inner()) })?;
        self.sandbox(&s)
    }

    pub fn get(&self, id: &SandboxId, include_memory: bool) -> Result<pb::Sandbox> {
        let req = pb::GetRequest { id: id.to_string(), include_memory };
        self.call(async { Ok(self.conn.sandboxes().get(req).await?.into_inner()) })
    }

    pub fn list(&self, include_memory: bool) -> Result<Vec<(SandboxInfo, Option<MemoryUsage>)>> {
        let req = pb::ListRequest { include_memory };
        let list = self.call(async { Ok(self.conn.sandboxes().list(req).await?.into_inner()) })?;
        list.sandboxes.iter().map(convert::sandbox_info).collect()
    }

    pub fn memory_usage(&self, id: &SandboxId) -> Result<MemoryUsage> {
        convert::sandbox_info(&self.get(id, true)?)?
            .1
            .ok_or_else(|| Error::Unavailable(format!("the daemon reported no memory figures for {id}")))
    }

    pub fn resource_usage(&self, id: &SandboxId) -> Result<Option<ResourceUsage>> {
        Ok(self.get(id, true)?.resources.as_ref().map(convert::resources_from_pb))
    }

    pub fn console(&self, id: &SandboxId, max_bytes: u64) -> Result<Vec<u8>> {
        let req = pb::GetConsoleRequest { id: id.to_string(), max_bytes };
        self.call(async { Ok(self.conn.sandboxes().get_console(req).await?.into_inner().data) })
    }

    pub fn branch(&self, id: &SandboxId, opts: &BranchOptions) -> Result<BranchResult> {
        let req = pb::BranchRequest {
            id: id.to_string(),
            count: Some(opts.count.into()),
            limits: (!opts.limits.is_empty()).then(|| convert::limits_to_pb(&opts.limits)),
        };
        let resp = self.call(async { Ok(self.conn.sandboxes().branch(req).await?.into_inner()) })?;
        Ok(BranchResult {
            source: SandboxId::parse(&resp.source)?,
            children: resp.children.iter().map(|c| self.sandbox(c)).collect::<Result<_>>()?,
            pause: Duration::try_from_secs_f64(resp.pause_ms / 1000.0).unwrap_or_default(),
        })
    }

    pub fn destroy(&self, id: &SandboxId) -> Result<()> {
        let req = pb::DeleteRequest { id: id.to_string() };
        self.call(async { self.conn.sandboxes().delete(req).await.map(|_| ()) })
    }

    /// Runs a command; stdin is read whole first (at most [`MAX_STDIN`]). A cancel drops the
    /// stream, which makes the daemon kill the command.
    pub fn exec(
        &self,
        id: &SandboxId,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<ExecOutcome> {
        let stdin = match stdin {
            Some(reader) => {
                let mut buf = Vec::new();
                reader
                    .take(MAX_STDIN as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| Error::internal(format!("reading stdin: {e}")))?;
                if buf.len() > MAX_STDIN {
                    return Err(Error::invalid(
                        "stdin",
                        format!("larger than {} MiB; copy the data in with `forkd cp` instead", MAX_STDIN >> 20),
                    ));
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
        let mut cancelled = cancelled_signal(cancel);
        self.rt.block_on(async {
            let mut stream = self.conn.sandboxes().exec(request).await.map_err(error)?.into_inner();
            loop {
                tokio::select! {
                    _ = &mut cancelled => {
                        return Err(Error::Cancelled("the command was interrupted".into()));
                    }
                    event = stream.message() => match event.map_err(error)?.and_then(|e| e.event) {
                        Some(pb::exec_event::Event::Stdout(d)) => sink.output(OutputStream::Stdout, &d),
                        Some(pb::exec_event::Event::Stderr(d)) => sink.output(OutputStream::Stderr, &d),
                        Some(pb::exec_event::Event::Exit(exit)) => return Ok(outcome(&exit)),
                        None => return Err(Error::internal("the exec stream ended without an exit status")),
                    },
                }
            }
        })
    }

    /// Runs a snippet; a cancel drops the stream, which makes the daemon interrupt it.
    pub fn eval(
        &self,
        id: &SandboxId,
        req: &EvalRequest,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<EvalResult> {
        let request = convert::eval_request_to_pb(id, req);
        let mut cancelled = cancelled_signal(cancel);
        self.rt.block_on(async {
            let mut stream = self.conn.sandboxes().eval(request).await.map_err(error)?.into_inner();
            loop {
                tokio::select! {
                    _ = &mut cancelled => return Err(Error::Cancelled("the snippet was interrupted".into())),
                    event = stream.message() => match event.map_err(error)?.and_then(|e| e.event) {
                        Some(pb::eval_event::Event::Stdout(d)) => sink.output(OutputStream::Stdout, &d),
                        Some(pb::eval_event::Event::Stderr(d)) => sink.output(OutputStream::Stderr, &d),
                        Some(pb::eval_event::Event::Result(r)) => return Ok(convert::eval_result_from_pb(r)),
                        None => return Err(Error::internal("the eval stream ended without a result")),
                    },
                }
            }
        })
    }

    pub fn contexts(&self, id: &SandboxId) -> Result<Vec<ContextInfo>> {
        let req = pb::ListContextsRequest { id: id.to_string() };
        let r = self.call(async { Ok(self.conn.sandboxes().list_contexts(req).await?.into_inner()) })?;
        Ok(r.contexts.into_iter().map(convert::context_info_from_pb).collect())
    }

    pub fn close_context(&self, id: &SandboxId, name: &str) -> Result<()> {
        let req = pb::CloseContextRequest { id: id.to_string(), name: name.into() };
        self.call(async { self.conn.sandboxes().close_context(req).await.map(|_| ()) })
    }

    pub fn write_file(&self, id: &SandboxId, path: &str, mode: u32, data: &mut (dyn Read + Send)) -> Result<u64> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let first = pb::WriteFileRequest { id: id.to_string(), path: path.to_string(), mode, data: Vec::new() };
        tx.try_send(first).map_err(|_| Error::internal("upload channel closed"))?;
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
                Ok(self.conn.sandboxes().write_file(ReceiverStream::new(rx)).await?.into_inner().bytes_written)
            });
            let read = reader.join().map_err(|_| Error::internal("the file reader panicked"))?;
            let n = sent?;
            read.map_err(|e| Error::internal(format!("reading the source file (the guest copy is incomplete): {e}")))?;
            Ok(n)
        })
    }

    pub fn read_file(&self, id: &SandboxId, path: &str, out: &mut (dyn Write + Send)) -> Result<u64> {
        let req = pb::ReadFileRequest { id: id.to_string(), path: path.to_string() };
        self.rt.block_on(async {
            let mut stream = self.conn.sandboxes().read_file(req).await.map_err(error)?.into_inner();
            let mut n = 0u64;
            while let Some(chunk) = stream.message().await.map_err(error)? {
                out.write_all(&chunk.data).map_err(|e| Error::internal(format!("writing the output: {e}")))?;
                n += chunk.data.len() as u64;
            }
            Ok(n)
        })
    }

    pub fn list_dir(&self, id: &SandboxId, path: &str) -> Result<Vec<DirEntry>> {
        let req = pb::ListDirRequest { id: id.to_string(), path: path.to_string() };
        let resp = self.call(async { Ok(self.conn.sandboxes().list_dir(req).await?.into_inner()) })?;
        Ok(resp.entries.into_iter().map(convert::dir_entry_from_pb).collect())
    }

    pub fn snapshot(&self, id: &SandboxId, opts: &SnapshotOptions) -> Result<SnapshotResult> {
        let req = pb::CreateSnapshotRequest {
            id: id.to_string(),
            tag: opts.tag.clone().unwrap_or_default(),
            diff: opts.diff,
            wait: opts.wait,
        };
        let r = self.call(async { Ok(self.conn.snapshots().create(req).await?.into_inner()) })?;
        convert::snapshot_result_from_pb(r)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let r = self.call(async { Ok(self.conn.snapshots().list(pb::ListSnapshotsRequest {}).await?.into_inner()) })?;
        r.snapshots.into_iter().map(convert::snapshot_info_from_pb).collect()
    }

    pub fn snapshot_info(&self, tag: &str) -> Result<SnapshotInfo> {
        let req = pb::GetSnapshotRequest { tag: tag.into() };
        convert::snapshot_info_from_pb(self.call(async { Ok(self.conn.snapshots().get(req).await?.into_inner()) })?)
    }

    pub fn remove_snapshot(&self, tag: &str, cascade: bool) -> Result<Vec<String>> {
        let req = pb::DeleteSnapshotRequest { tag: tag.into(), cascade };
        Ok(self.call(async { Ok(self.conn.snapshots().delete(req).await?.into_inner()) })?.removed)
    }

    pub fn compact_snapshot(&self, tag: &str) -> Result<SnapshotInfo> {
        let req = pb::CompactSnapshotRequest { tag: tag.into() };
        convert::snapshot_info_from_pb(self.call(async { Ok(self.conn.snapshots().compact(req).await?.into_inner()) })?)
    }

    pub fn verify_snapshot(&self, tag: &str) -> Result<VerifyReport> {
        let req = pb::VerifySnapshotRequest { tag: tag.into() };
        let r = self.call(async { Ok(self.conn.snapshots().verify(req).await?.into_inner()) })?;
        Ok(VerifyReport { files_checked: r.files_checked, pages_checked: r.pages_checked, bytes_read: r.bytes_read })
    }

    pub fn restore(&self, tag: &str, count: u32) -> Result<Vec<SandboxInfo>> {
        let req = pb::RestoreRequest { snapshot_tag: tag.into(), count };
        let r = self.call(async { Ok(self.conn.snapshots().restore(req).await?.into_inner()) })?;
        r.sandboxes.iter().map(|s| self.sandbox(s)).collect()
    }

    pub fn images(&self) -> Result<Vec<ImageInfo>> {
        let resp = self.call(async { Ok(self.conn.images().list(pb::ListImagesRequest {}).await?.into_inner()) })?;
        Ok(resp.images.into_iter().map(convert::image_info).collect())
    }
}

/// The create request for `spec`; a kernel path is sent absolute (the daemon resolves paths in
/// its own working directory).
pub fn create_request(spec: SandboxSpec) -> Result<pb::CreateRequest> {
    let kernel = match &spec.kernel {
        Some(k) => std::path::absolute(k)
            .map_err(|e| Error::invalid("kernel", format!("resolving {}: {e}", k.display())))?
            .display()
            .to_string(),
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

/// Resolves when `cancel` is cancelled (dropping a call's stream then stops it in the daemon).
fn cancelled_signal(cancel: &CancelToken) -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = Mutex::new(Some(tx));
    cancel.on_cancel(move || {
        if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    });
    rx
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
