//! Host-side client for the guest agent: blocking std I/O, no async runtime.
//!
//! The protocol carries one operation per connection, so an [`AgentClient`] wraps one
//! connected stream and each operation consumes it. [`AgentAddr`] opens fresh connections
//! (through the VMM's vsock Unix socket, or straight to an agent listening on a Unix socket).
//!
//! ```no_run
//! use std::time::Duration;
//! use forkd_agent::client::AgentAddr;
//! use forkd_agent::proto::ExecRequest;
//!
//! let agent = AgentAddr::vsock("/run/forkd/sb1/vsock.sock", 1024);
//! let out = agent
//!     .connect(Duration::from_secs(5))?
//!     .exec_capture(ExecRequest::new(["uname", "-a"]), None)?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! # Ok::<(), forkd_agent::client::ClientError>(())
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proto::{
    self, request, response, ContextInfo, ContextRef, Data, DirEntry, Empty, ErrorKind, EvalDone, EvalRequest,
    ExecRequest, FrameDecoder, FrameError, ListDirRequest, Ping, Pong, ReadFileRequest, Request, ReseedRequest,
    Response, WriteFileRequest, FILE_CHUNK,
};

/// Errors from talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("vsock socket {path} does not exist: is the sandbox running? (the VMM creates it at start)")]
    SocketMissing { path: PathBuf },
    #[error(
        "connection to {path} refused: the socket file exists but no VMM is serving it (stale sandbox? restart it)"
    )]
    Refused { path: PathBuf },
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VMM at {path} closed the connection during the vsock handshake: nothing listens on guest port {port} (agent not started yet or crashed; check the sandbox console log)")]
    HandshakeClosed { path: PathBuf, port: u32 },
    #[error("unexpected vsock handshake reply from {path} for port {port}: {reply:?} (expected \"OK <port>\"; is this a Firecracker-style vsock socket?)")]
    Handshake { path: PathBuf, port: u32, reply: String },
    #[error("timed out after {after:?} {what}")]
    Timeout { what: String, after: Duration },
    #[error("i/o error talking to the agent: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("agent error ({kind}): {message}")]
    Agent { kind: ErrorKind, message: String },
    #[error("the agent closed the connection before finishing the {during} (agent crashed or the sandbox stopped?)")]
    Closed { during: &'static str },
    #[error(
        "protocol violation during {during}: unexpected {got} frame from the agent (host and agent versions differ?)"
    )]
    Unexpected { during: &'static str, got: String },
    #[error("reading the stdin source failed: {0}")]
    Stdin(#[source] io::Error),
}

impl ClientError {
    /// The agent-reported error kind, if this is an agent error.
    pub fn agent_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Agent { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
    /// Ran past its timeout; its process group was killed with SIGKILL.
    TimedOut,
}

/// Result of a finished exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub status: ExitStatus,
    /// Guest pid of the process (0 if it never started).
    pub pid: u32,
    /// Wall time from sending the request to receiving the exit status.
    pub duration: Duration,
}

impl ExecOutcome {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.status == ExitStatus::Exited(0)
    }

    /// The exit code, if the process exited normally.
    pub fn code(&self) -> Option<i32> {
        match self.status {
            ExitStatus::Exited(c) => Some(c),
            _ => None,
        }
    }
}

/// Result of [`AgentClient::exec_capture`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub outcome: ExecOutcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A bidirectional byte stream the client can run over. `duplicate` gives a second handle
/// to the same connection so stdin can be sent while output is read.
pub trait Transport: Read + Write + Send + Sized + 'static {
    /// Another handle to the same connection.
    fn duplicate(&self) -> io::Result<Self>;
}

impl Transport for UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Transport for std::net::TcpStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// One connection to the agent, good for one operation.
#[derive(Debug)]
pub struct AgentClient<S> {
    stream: S,
    dec: FrameDecoder,
}

const READ_CHUNK: usize = 256 << 10;

impl<S: Read + Write> AgentClient<S> {
    /// Wraps a connected stream (after any vsock handshake).
    pub fn new(stream: S) -> Self {
        Self { stream, dec: FrameDecoder::default() }
    }

    /// The underlying stream (e.g. to set timeouts).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    fn send(&mut self, body: request::Body) -> Result<(), ClientError> {
        proto::write_msg(&mut self.stream, &Request::new(body))?;
        Ok(())
    }

    /// Next response body; `Closed` at end of stream.
    fn recv(&mut self, during: &'static str) -> Result<response::Body, ClientError> {
        loop {
            if let Some(resp) = self.dec.next_msg::<Response>()? {
                return match resp.body {
                    Some(response::Body::Error(e)) => {
                        Err(ClientError::Agent { kind: e.error_kind(), message: e.message })
                    }
                    Some(b) => Ok(b),
                    None => Err(ClientError::Unexpected { during, got: "empty".into() }),
                };
            }
            if self.dec.fill_from(&mut self.stream, READ_CHUNK)? == 0 {
                self.dec.finish()?;
                return Err(ClientError::Closed { during });
            }
        }
    }

    /// Checks the agent is alive; returns its version and uptime.
    pub fn ping(mut self) -> Result<Pong, ClientError> {
        self.send(request::Body::Ping(Ping {}))?;
        match self.recv("ping")? {
            response::Body::Pong(p) => Ok(p),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Creates or replaces the guest file `path` with everything read from `data`.
    /// `mode` 0 means 0644. Returns the number of bytes written.
    pub fn write_file(
        mut self,
        path: &str,
        mode: u32,
        create_parents: bool,
        mut data: impl Read,
    ) -> Result<u64, ClientError> {
        self.send(request::Body::WriteFile(WriteFileRequest { path: path.to_owned(), mode, create_parents }))?;
        let mut buf = vec![0u8; FILE_CHUNK];
        let sent: Result<(), ClientError> = (|| {
            loop {
                let n = match data.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ClientError::Stdin(e)),
                };
                self.send(request::Body::FileChunk(Data { data: buf[..n].to_vec() }))?;
            }
            self.send(request::Body::FileEnd(Empty {}))
        })();
        match sent {
            Ok(()) => {}
            // The agent may have failed early and closed; its error frame explains why.
            Err(ClientError::Frame(FrameError::Io(e))) => {
                return match self.recv("write_file") {
                    Err(agent @ ClientError::Agent { .. }) => Err(agent),
                    _ => Err(ClientError::Io(e)),
                }
            }
            Err(e) => return Err(e),
        }
        match self.recv("write_file")? {
            response::Body::WriteDone(d) => Ok(d.size),
            other => Err(unexpected("write_file", &other)),
        }
    }

    /// Reads a whole guest file into memory.
    pub fn read_file(self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_file_to(path, &mut out)?;
        Ok(out)
    }

    /// Streams a guest file into `out`; returns its size.
    pub fn read_file_to(mut self, path: &str, out: &mut impl Write) -> Result<u64, ClientError> {
        self.send(request::Body::ReadFile(ReadFileRequest { path: path.to_owned() }))?;
        let mut total = 0u64;
        loop {
            match self.recv("read_file")? {
                response::Body::FileChunk(d) => {
                    out.write_all(&d.data)?;
                    total += d.data.len() as u64;
                }
                response::Body::FileEnd(end) => {
                    if end.size != total {
                        return Err(ClientError::Unexpected {
                            during: "read_file",
                            got: format!("FileEnd(size {} but {} bytes received)", end.size, total),
                        });
                    }
                    return Ok(total);
                }
                other => return Err(unexpected("read_file", &other)),
            }
        }
    }

    /// Lists a guest directory (sorted by name, symlinks not followed).
    pub fn list_dir(mut self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        self.send(request::Body::ListDir(ListDirRequest { path: path.to_owned() }))?;
        let mut entries = Vec::new();
        loop {
            match self.recv("list_dir")? {
                response::Body::DirEntries(batch) => entries.extend(batch.entries),
                response::Body::DirEnd(_) => return Ok(entries),
                other => return Err(unexpected("list_dir", &other)),
            }
        }
    }

    /// Tells the agent its VM is about to be forked. Returns once the guest kernel has finished
    /// its deferred housekeeping and the agent has answered; keep the connection open until the
    /// fork is done (the agent holds it until the host closes it).
    pub fn prepare_branch(&mut self) -> Result<(), ClientError> {
        self.send(request::Body::PrepareBranch(Empty {}))?;
        match self.recv("prepare_branch")? {
            response::Body::BranchReady(_) => Ok(()),
            other => Err(unexpected("prepare_branch", &other)),
        }
    }

    /// Mixes `entropy` into the guest kernel RNG and forces a reseed (call after forking a
    /// sandbox so siblings do not share random streams); with `clock_unix_ns`, first sets the
    /// guest's wall clock to it (after a restore).
    pub fn reseed(mut self, entropy: &[u8], clock_unix_ns: Option<u64>) -> Result<(), ClientError> {
        let req = ReseedRequest { entropy: entropy.to_vec(), clock_unix_ns: clock_unix_ns.unwrap_or(0) };
        self.send(request::Body::Reseed(req))?;
        match self.recv("reseed")? {
            response::Body::ReseedDone(_) => Ok(()),
            other => Err(unexpected("reseed", &other)),
        }
    }
}

impl<S: Transport> AgentClient<S> {
    /// Runs a program, calling `on_output` for every chunk of stdout/stderr as it arrives.
    /// With `stdin` given, a helper thread copies it to the process (then closes its stdin);
    /// the source must be `'static` because the thread is left behind if the process exits
    /// before the source reaches its end. Pass `None::<std::io::Empty>` for no stdin.
    ///
    /// An agent `Error` (e.g. the program does not exist) comes back as
    /// [`ClientError::Agent`].
    pub fn exec<R: Read + Send + 'static>(
        mut self,
        mut req: ExecRequest,
        stdin: Option<R>,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, ClientError> {
        let start = Instant::now();
        req.stdin = stdin.is_some();
        self.send(request::Body::Exec(req))?;
        let mut feeder = match stdin {
            Some(src) => {
                let w = self.stream.duplicate()?;
                Some(std::thread::Builder::new().name("forkd-stdin".into()).spawn(move || feed_stdin(w, src))?)
            }
            None => None,
        };
        let mut pid = 0;
        let status = loop {
            match self.recv("exec")? {
                response::Body::Started(s) => pid = s.pid,
                response::Body::Stdout(d) => on_output(Stream::Stdout, &d.data),
                response::Body::Stderr(d) => on_output(Stream::Stderr, &d.data),
                response::Body::Exited(e) => break ExitStatus::Exited(e.code),
                response::Body::Signaled(s) => break ExitStatus::Signaled(s.signal),
                response::Body::TimedOut(_) => break ExitStatus::TimedOut,
                other => return Err(unexpected("exec", &other)),
            }
        };
        // A finished feeder may have hit a read error on its source; an unfinished one is
        // blocked on its source and is left to end on its own.
        if let Some(h) = feeder.take() {
            if h.is_finished() {
                if let Ok(Err(e)) = h.join() {
                    return Err(ClientError::Stdin(e));
                }
            }
        }
        Ok(ExecOutcome { status, pid, duration: start.elapsed() })
    }

    /// Runs a snippet in a code context, streaming its output to `on_output`.
    pub fn eval(mut self, req: EvalRequest, mut on_output: impl FnMut(Stream, &[u8])) -> Result<EvalDone, ClientError> {
        self.send(request::Body::Eval(req))?;
        loop {
            match self.recv("eval")? {
                response::Body::Stdout(d) => on_output(Stream::Stdout, &d.data),
                response::Body::Stderr(d) => on_output(Stream::Stderr, &d.data),
                response::Body::EvalDone(done) => return Ok(done),
                other => return Err(unexpected("eval", &other)),
            }
        }
    }

    /// The code contexts with a live interpreter.
    pub fn list_contexts(mut self) -> Result<Vec<ContextInfo>, ClientError> {
        self.send(request::Body::ListContexts(Empty {}))?;
        match self.recv("list contexts")? {
            response::Body::Contexts(list) => Ok(list.contexts),
            other => Err(unexpected("list contexts", &other)),
        }
    }

    /// Ends a code context.
    pub fn close_context(mut self, name: &str) -> Result<(), ClientError> {
        self.send(request::Body::CloseContext(ContextRef { name: name.into() }))?;
        match self.recv("close context")? {
            response::Body::ContextClosed(_) => Ok(()),
            other => Err(unexpected("close context", &other)),
        }
    }

    /// Runs a program and collects its output in memory.
    pub fn exec_capture(self, req: ExecRequest, stdin: Option<Vec<u8>>) -> Result<ExecOutput, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let outcome = self.exec(req, stdin.map(io::Cursor::new), |s, d| match s {
            Stream::Stdout => stdout.extend_from_slice(d),
            Stream::Stderr => stderr.extend_from_slice(d),
        })?;
        Ok(ExecOutput { outcome, stdout, stderr })
    }
}

/// Copies `src` into `StdinData` frames, then sends `StdinEof`. Write errors (the agent
/// finished and closed) end it quietly; read errors on the source are returned.
fn feed_stdin<W: Write, R: Read>(mut w: W, mut src: R) -> io::Result<()> {
    let mut buf = vec![0u8; FILE_CHUNK];
    let mut frame = Vec::with_capacity(FILE_CHUNK + 16);
    let mut result = Ok(());
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        frame.clear();
        proto::encode_frame(&Request::new(request::Body::StdinData(Data { data: buf[..n].to_vec() })), &mut frame);
        if w.write_all(&frame).is_err() {
            return Ok(());
        }
    }
    let _ = proto::write_msg(&mut w, &Request::new(request::Body::StdinEof(Empty {})));
    result
}

fn unexpected(during: &'static str, got: &response::Body) -> ClientError {
    let name = match got {
        response::Body::Pong(_) => "Pong",
        response::Body::Started(_) => "Started",
        response::Body::Stdout(_) => "Stdout",
        response::Body::Stderr(_) => "Stderr",
        response::Body::Exited(_) => "Exited",
        response::Body::Signaled(_) => "Signaled",
        response::Body::TimedOut(_) => "TimedOut",
        response::Body::Error(_) => "Error",
        response::Body::FileChunk(_) => "FileChunk",
        response::Body::FileEnd(_) => "FileEnd",
        response::Body::WriteDone(_) => "WriteDone",
        response::Body::DirEntries(_) => "DirEntries",
        response::Body::DirEnd(_) => "DirEnd",
        response::Body::ReseedDone(_) => "ReseedDone",
        response::Body::BranchReady(_) => "BranchReady",
        response::Body::EvalDone(_) => "EvalDone",
        response::Body::Contexts(_) => "Contexts",
        response::Body::ContextClosed(_) => "ContextClosed",
    };
    ClientError::Unexpected { during, got: name.into() }
}

/// Connects to a Firecracker-style vsock Unix socket and performs the
/// `CONNECT <port>\n` → `OK <hostport>\n` handshake. After it the stream is a byte pipe to
/// the guest port. `timeout` bounds the handshake; the returned stream has no timeouts.
pub fn connect_vsock_uds(path: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    let mut s = connect_unix(path)?;
    let timeout = timeout.max(Duration::from_millis(1));
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let timed_out = || ClientError::Timeout {
        what: format!("waiting for the vsock handshake on {} (port {port}); is the VMM stuck?", path.display()),
        after: timeout,
    };
    let is_timeout = |e: &io::Error| matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);

    if let Err(e) = s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        return Err(if is_timeout(&e) {
            timed_out()
        } else if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) {
            ClientError::HandshakeClosed { path: path.to_owned(), port }
        } else {
            ClientError::Io(e)
        });
    }
    // Byte at a time: anything after the newline belongs to the guest.
    let mut line = Vec::with_capacity(32);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => return Err(ClientError::HandshakeClosed { path: path.to_owned(), port }),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => {
                line.push(b[0]);
                if line.len() > 64 {
                    return Err(ClientError::Handshake {
                        path: path.to_owned(),
                        port,
                        reply: String::from_utf8_lossy(&line).into_owned(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(timed_out()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ClientError::HandshakeClosed { path: path.to_owned(), port })
            }
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
    let reply = String::from_utf8_lossy(&line);
    let ok = reply.strip_prefix("OK ").is_some_and(|p| p.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(ClientError::Handshake { path: path.to_owned(), port, reply: reply.into_owned() });
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

fn connect_unix(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ClientError::SocketMissing { path: path.to_owned() },
        io::ErrorKind::ConnectionRefused => ClientError::Refused { path: path.to_owned() },
        _ => ClientError::Connect { path: path.to_owned(), source: e },
    })
}

/// Where an agent can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// Through a VMM's vsock Unix socket (Firecracker-style handshake) to a guest port.
    Vsock { uds: PathBuf, port: u32 },
    /// An agent listening directly on a Unix socket (`--listen unix:PATH`, tests).
    Unix(PathBuf),
}

impl AgentAddr {
    /// The agent on the default port behind the VMM socket `uds`.
    pub fn vsock(uds: impl Into<PathBuf>, port: u32) -> Self {
        AgentAddr::Vsock { uds: uds.into(), port }
    }

    /// Opens a new connection, ready for one operation. `timeout` bounds the handshake.
    pub fn connect(&self, timeout: Duration) -> Result<AgentClient<UnixStream>, ClientError> {
        let s = match self {
            AgentAddr::Vsock { uds, port } => connect_vsock_uds(uds, *port, timeout)?,
            AgentAddr::Unix(p) => connect_unix(p)?,
        };
        Ok(AgentClient::new(s))
    }

    /// Pings until the agent answers or `timeout` passes (e.g. while the guest boots).
    pub fn wait_ready(&self, timeout: Duration) -> Result<Pong, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = self.connect(left.max(Duration::from_millis(1))).and_then(|c| {
                c.get_ref().set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                c.ping()
            });
            match attempt {
                Ok(p) => return Ok(p),
                Err(e) if Instant::now() + delay >= deadline => {
                    return Err(ClientError::Timeout {
                        what: format!("waiting for the agent to answer a ping (last error: {e})"),
                        after: timeout,
                    })
                }
                Err(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
            }
        }
    }
}
