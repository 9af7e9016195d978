//! Talking to the guest agent through the VMM's vsock socket, and turning its errors into the
//! API's typed errors.

use crate::AGENT_PORT;
use forkd_agent::client::{AgentAddr, AgentClient, ClientError, ExitStatus as AgentExit, Stream};
use forkd_agent::proto::{self, ErrorKind, FileType};
use forkd_core::backend::DirEntry;
use forkd_core::{
    CancelToken, ContextInfo, Error, EvalError, EvalRequest, EvalResult, ExecOutcome, ExecRequest, ExecSink,
    ExitStatus, OutputStream, Result,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Bounds connecting and the vsock handshake; commands themselves may run much longer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn connect(vsock: &Path) -> Result<AgentClient<UnixStream>> {
    AgentAddr::vsock(vsock, AGENT_PORT).connect(CONNECT_TIMEOUT).map_err(map_error)
}

/// One ping with a deadline (readiness checks).
pub fn ping(vsock: &Path, timeout: Duration) -> Result<()> {
    let client = AgentAddr::vsock(vsock, AGENT_PORT).connect(timeout).map_err(map_error)?;
    client.get_ref().set_read_timeout(Some(timeout)).map_err(|e| Error::Unavailable(e.to_string()))?;
    client.ping().map(|_| ()).map_err(map_error)
}

/// Tells the agent its VM is about to be forked: the guest kernel finishes its deferred
/// housekeeping, then the agent answers. Returns the open connection: drop it once the fork is
/// done (closing it earlier would have the guest tear it down while being forked). An agent
/// older than `PrepareBranch` answers with a protocol error, which is still an answer: the
/// guest is awake.
pub fn prepare_branch(vsock: &Path, timeout: Duration) -> Result<AgentClient<UnixStream>> {
    let mut client = AgentAddr::vsock(vsock, AGENT_PORT).connect(timeout).map_err(map_error)?;
    client.get_ref().set_read_timeout(Some(timeout)).map_err(|e| Error::Unavailable(e.to_string()))?;
    match client.prepare_branch() {
        Ok(()) | Err(ClientError::Agent { kind: ErrorKind::Protocol, .. }) => Ok(client),
        Err(e) => Err(map_error(e)),
    }
}

/// Gives the guest fresh entropy and forces its CRNG to reseed (after BRANCH, so children
/// never share random streams), and with `set_clock` sets its wall clock to the host's (after
/// a restore). Also proves the agent answers.
///
/// `reply_timeout` applies once connected: the agent is then known to be alive, and on hosts that
/// emulate guest kernel code many children reseeding at once each need seconds of wall time;
/// giving up and reconnecting would only add work for the guest.
pub fn reseed(vsock: &Path, connect_timeout: Duration, reply_timeout: Duration, set_clock: bool) -> Result<()> {
    let client = AgentAddr::vsock(vsock, AGENT_PORT).connect(connect_timeout).map_err(map_error)?;
    client.get_ref().set_read_timeout(Some(reply_timeout)).map_err(|e| Error::Unavailable(e.to_string()))?;
    let mut entropy = [0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut entropy);
    let clock = set_clock.then(forkd_core::time::now_unix_ns);
    client.reseed(&entropy, clock).map_err(map_error)
}

fn map_error(e: ClientError) -> Error {
    match e {
        ClientError::Agent { kind, message } => match kind {
            ErrorKind::NotFound => Error::NotFound { kind: "guest path".into(), id: message, hint: String::new() },
            ErrorKind::InvalidArgument | ErrorKind::AlreadyExists => Error::invalid("request", message),
            ErrorKind::Unsupported => Error::FailedPrecondition(message),
            ErrorKind::Permission => Error::FailedPrecondition(format!("permission denied in the guest: {message}")),
            _ => Error::Internal(format!("guest agent: {message}")),
        },
        ClientError::Timeout { .. } => Error::DeadlineExceeded(e.to_string()),
        ClientError::SocketMissing { .. }
        | ClientError::Refused { .. }
        | ClientError::HandshakeClosed { .. }
        | ClientError::Connect { .. } => Error::Unavailable(e.to_string()),
        ClientError::Closed { .. } => Error::Unavailable(e.to_string()),
        other => Error::Internal(other.to_string()),
    }
}

/// Runs a command; a cancel shuts the connection down, which makes the agent kill the
/// command's process group.
pub fn exec(
    vsock: &Path,
    req: &ExecRequest,
    stdin: Option<Box<dyn Read + Send>>,
    sink: &mut dyn ExecSink,
    cancel: &CancelToken,
) -> Result<ExecOutcome> {
    let client = connect(vsock)?;
    if let Ok(stream) = client.get_ref().try_clone() {
        cancel.on_cancel(move || {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
    }
    let mut wire = proto::ExecRequest::new(req.argv.clone());
    wire.env = req.env.clone();
    wire.cwd = req.cwd.clone().unwrap_or_default();
    wire.timeout_ms = req.timeout.map(|t| t.as_millis().max(1) as u64).unwrap_or(0);
    let result = client.exec(wire, stdin, |stream, data| {
        let stream = match stream {
            Stream::Stdout => OutputStream::Stdout,
            Stream::Stderr => OutputStream::Stderr,
        };
        sink.output(stream, data)
    });
    match result {
        Ok(outcome) => Ok(ExecOutcome {
            status: match outcome.status {
                AgentExit::Exited(c) => ExitStatus::Code(c),
                AgentExit::Signaled(s) => ExitStatus::Signal(s),
                AgentExit::TimedOut => ExitStatus::TimedOut,
            },
            duration: outcome.duration,
        }),
        Err(_) if cancel.is_cancelled() => {
            Err(Error::Cancelled("the sandbox was removed while the command ran".into()))
        }
        Err(ClientError::Agent { kind: ErrorKind::NotFound, message }) => Err(Error::invalid("argv", message)),
        Err(e) => Err(map_error(e)),
    }
}

/// Runs a snippet in a code context; a cancel shuts the connection down, which makes the
/// agent interrupt the snippet (the context lives on).
pub fn eval(vsock: &Path, req: &EvalRequest, sink: &mut dyn ExecSink, cancel: &CancelToken) -> Result<EvalResult> {
    let client = connect(vsock)?;
    if let Ok(stream) = client.get_ref().try_clone() {
        cancel.on_cancel(move || {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
    }
    let wire = proto::EvalRequest {
        context: req.context_name().to_string(),
        lang: req.lang.clone().unwrap_or_default(),
        code: req.code.clone(),
        timeout_ms: req.timeout.map(|t| t.as_millis().max(1) as u64).unwrap_or(0),
    };
    let done = client.eval(wire, |stream, data| {
        let stream = match stream {
            Stream::Stdout => OutputStream::Stdout,
            Stream::Stderr => OutputStream::Stderr,
        };
        sink.output(stream, data)
    });
    let done = match done {
        Ok(done) => done,
        Err(_) if cancel.is_cancelled() => return Err(Error::Cancelled("the snippet was interrupted".into())),
        // The agent's "not found" here is the interpreter itself (an image without Python).
        Err(ClientError::Agent { kind: ErrorKind::NotFound, message }) => {
            return Err(Error::FailedPrecondition(message))
        }
        Err(e) => return Err(map_error(e)),
    };
    Ok(EvalResult {
        context: req.context_name().to_string(),
        value: done.value,
        json: done.json.and_then(|j| serde_json::from_str(&j).ok()),
        error: done.error.map(|e| EvalError { name: e.name, message: e.message, traceback: e.traceback }),
        duration: Duration::try_from_secs_f64(done.duration_ms / 1000.0).unwrap_or_default(),
        created: done.created,
        restarted: done.restarted,
        timed_out: done.timed_out,
    })
}

pub fn contexts(vsock: &Path) -> Result<Vec<ContextInfo>> {
    let list = connect(vsock)?.list_contexts().map_err(map_error)?;
    Ok(list
        .into_iter()
        .map(|c| ContextInfo { name: c.name, lang: c.lang, pid: c.pid, evals: c.evals, version: c.version })
        .collect())
}

pub fn close_context(vsock: &Path, name: &str) -> Result<()> {
    match connect(vsock)?.close_context(name) {
        Err(ClientError::Agent { kind: ErrorKind::NotFound, .. }) => Err(Error::NotFound {
            kind: "context".into(),
            id: name.into(),
            hint: "; `forkd contexts ID` lists them".into(),
        }),
        other => other.map_err(map_error),
    }
}

pub fn write_file(vsock: &Path, path: &str, mode: u32, data: &mut (dyn Read + Send)) -> Result<u64> {
    connect(vsock)?.write_file(path, mode, true, data).map_err(map_error)
}

pub fn read_file(vsock: &Path, path: &str, out: &mut (dyn Write + Send)) -> Result<u64> {
    let mut out = out;
    connect(vsock)?.read_file_to(path, &mut out).map_err(map_error)
}

pub fn list_dir(vsock: &Path, path: &str) -> Result<Vec<DirEntry>> {
    let entries = connect(vsock)?.list_dir(path).map_err(map_error)?;
    Ok(entries
        .into_iter()
        .map(|e| DirEntry {
            kind: match e.kind() {
                FileType::Dir => "dir",
                FileType::File => "file",
                FileType::Symlink => "symlink",
                _ => "other",
            }
            .into(),
            name: e.name,
            size: e.size,
            mode: e.mode,
            mtime_unix: e.mtime,
        })
        .collect())
}
