//! The host ⇄ guest-agent wire protocol (version [`PROTOCOL_VERSION`]).
//!
//! Messages are protobuf, written by hand with `prost` derives (no protoc, no build script).
//! Each frame on the stream is one message preceded by its length as a protobuf varint
//! (prost's "length-delimited" encoding). A connection carries exactly one operation: the host
//! sends one [`Request`] whose body says what to do, possibly followed by more request frames
//! belonging to the same operation (stdin data, file chunks), and the agent answers with
//! [`Response`] frames; the agent closes the connection when the operation is over.
//! `docs/agent-protocol.md` describes every exchange.

use std::io::{self, Read, Write};

use prost::Message;

/// Bumped on incompatible changes; reported by [`Pong::protocol_version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on by default.
pub const DEFAULT_PORT: u32 = 1024;

/// Largest frame either side accepts (the length prefix excluded).
pub const MAX_FRAME: usize = 4 << 20;

/// Largest data payload the agent puts into one `Stdout`/`Stderr` frame.
pub const OUTPUT_CHUNK: usize = 64 << 10;

/// Chunk size used for file transfers in both directions.
pub const FILE_CHUNK: usize = 256 << 10;

// ---------------------------------------------------------------------------------------------
// Host → agent
// ---------------------------------------------------------------------------------------------

/// A frame sent by the host. The first frame of a connection starts an operation (`Ping`,
/// `Exec`, `WriteFile`, `ReadFile`, `ListDir`, `Reseed`, `PrepareBranch`); later frames (`StdinData`,
/// `StdinEof`, `FileChunk`, `FileEnd`) continue it.
#[derive(Clone, PartialEq, Message)]
pub struct Request {
    #[prost(oneof = "request::Body", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14")]
    pub body: Option<request::Body>,
}

/// The body of a [`Request`].
pub mod request {
    /// What the host asks for.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "1")]
        Ping(super::Ping),
        #[prost(message, tag = "2")]
        Exec(super::ExecRequest),
        #[prost(message, tag = "3")]
        StdinData(super::Data),
        #[prost(message, tag = "4")]
        StdinEof(super::Empty),
        #[prost(message, tag = "5")]
        WriteFile(super::WriteFileRequest),
        #[prost(message, tag = "6")]
        FileChunk(super::Data),
        #[prost(message, tag = "7")]
        FileEnd(super::Empty),
        #[prost(message, tag = "8")]
        ReadFile(super::ReadFileRequest),
        #[prost(message, tag = "9")]
        ListDir(super::ListDirRequest),
        #[prost(message, tag = "10")]
        Reseed(super::ReseedRequest),
        /// The VM is about to be forked: the agent has the kernel finish deferred
        /// housekeeping (return freed slab objects) now, so the children do not each do it,
        /// then answers `BranchReady` and waits for the host to close the connection.
        #[prost(message, tag = "11")]
        PrepareBranch(super::Empty),
        /// Run a snippet in a code context (created on first use); answered with output
        /// frames, then `EvalDone`.
        #[prost(message, tag = "12")]
        Eval(super::EvalRequest),
        /// List the code contexts; answered with `Contexts`.
        #[prost(message, tag = "13")]
        ListContexts(super::Empty),
        /// End a code context; answered with `ContextClosed`.
        #[prost(message, tag = "14")]
        CloseContext(super::ContextRef),
    }
}

/// Liveness check; answered with [`Pong`].
#[derive(Clone, PartialEq, Message)]
pub struct Ping {}

/// A message without fields (end markers).
#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

/// A chunk of bytes (stdin data, file contents, process output).
#[derive(Clone, PartialEq, Message)]
pub struct Data {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
}

/// Run a program.
#[derive(Clone, PartialEq, Message)]
pub struct ExecRequest {
    /// Program and arguments. A program without `/` is looked up in the `PATH` of the
    /// resulting environment.
    #[prost(string, repeated, tag = "1")]
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to (or replacing entries of) the default environment
    /// (`PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`, `HOME=/root`, ...).
    #[prost(string, repeated, tag = "2")]
    pub env: Vec<String>,
    /// Working directory; empty means the agent's (`/` in a guest).
    #[prost(string, tag = "3")]
    pub cwd: String,
    /// When true the host streams `StdinData`/`StdinEof` frames; otherwise stdin is /dev/null.
    #[prost(bool, tag = "4")]
    pub stdin: bool,
    /// Kill the process group with SIGKILL after this long; 0 means no limit.
    #[prost(uint64, tag = "5")]
    pub timeout_ms: u64,
}

impl ExecRequest {
    /// A request running `argv` with the default environment, no stdin and no timeout.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self { argv: argv.into_iter().map(Into::into).collect(), ..Self::default() }
    }

    /// Adds `KEY=VALUE` to the environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = cwd.into();
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }
}

/// Create or replace a file; followed by `FileChunk` frames and one `FileEnd`.
#[derive(Clone, PartialEq, Message)]
pub struct WriteFileRequest {
    /// Absolute path in the guest.
    #[prost(string, tag = "1")]
    pub path: String,
    /// Permission bits; 0 means 0644.
    #[prost(uint32, tag = "2")]
    pub mode: u32,
    /// Create missing parent directories (mode 0755).
    #[prost(bool, tag = "3")]
    pub create_parents: bool,
}

/// Read a whole file; answered with `FileChunk` frames and one `FileEnd`.
#[derive(Clone, PartialEq, Message)]
pub struct ReadFileRequest {
    /// Absolute path in the guest.
    #[prost(string, tag = "1")]
    pub path: String,
}

/// List a directory; answered with `DirEntries` frames and one `DirEnd`.
#[derive(Clone, PartialEq, Message)]
pub struct ListDirRequest {
    /// Absolute path in the guest.
    #[prost(string, tag = "1")]
    pub path: String,
}

/// Mix host-provided entropy into the guest kernel RNG and force a CRNG reseed.
#[derive(Clone, PartialEq, Message)]
pub struct ReseedRequest {
    /// Fresh random bytes from the host (at least 32, at most 4096).
    #[prost(bytes = "vec", tag = "1")]
    pub entropy: Vec<u8>,
    /// When nonzero, the host's wall clock (ns since the Unix epoch): the agent sets the
    /// guest's `CLOCK_REALTIME` to it first. Sent after a restore, whose guest clock resumes
    /// where the snapshot stopped it.
    #[prost(uint64, tag = "2")]
    pub clock_unix_ns: u64,
}

/// A snippet for a code context.
#[derive(Clone, PartialEq, Message)]
pub struct EvalRequest {
    /// The context (`[A-Za-z0-9._-]{1,64}`); empty means `main`. Created on first use.
    #[prost(string, tag = "1")]
    pub context: String,
    /// The interpreter: `python` (the default when empty).
    #[prost(string, tag = "2")]
    pub lang: String,
    /// The code (at most 1 MiB). A final expression's value is reported.
    #[prost(string, tag = "3")]
    pub code: String,
    /// Interrupt the snippet (`KeyboardInterrupt`) after this long; 0 means no limit.
    #[prost(uint64, tag = "4")]
    pub timeout_ms: u64,
}

/// Names a code context.
#[derive(Clone, PartialEq, Message)]
pub struct ContextRef {
    #[prost(string, tag = "1")]
    pub name: String,
}

// ---------------------------------------------------------------------------------------------
// Agent → host
// ---------------------------------------------------------------------------------------------

/// A frame sent by the agent.
#[derive(Clone, PartialEq, Message)]
pub struct Response {
    #[prost(oneof = "response::Body", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18")]
    pub body: Option<response::Body>,
}

/// The body of a [`Response`].
pub mod response {
    /// What the agent reports.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "1")]
        Pong(super::Pong),
        #[prost(message, tag = "2")]
        Started(super::Started),
        #[prost(message, tag = "3")]
        Stdout(super::Data),
        #[prost(message, tag = "4")]
        Stderr(super::Data),
        #[prost(message, tag = "5")]
        Exited(super::Exited),
        #[prost(message, tag = "6")]
        Signaled(super::Signaled),
        #[prost(message, tag = "7")]
        TimedOut(super::Empty),
        #[prost(message, tag = "8")]
        Error(super::Error),
        #[prost(message, tag = "9")]
        FileChunk(super::Data),
        #[prost(message, tag = "10")]
        FileEnd(super::FileEnd),
        #[prost(message, tag = "11")]
        WriteDone(super::WriteDone),
        #[prost(message, tag = "12")]
        DirEntries(super::DirEntries),
        #[prost(message, tag = "13")]
        DirEnd(super::Empty),
        #[prost(message, tag = "14")]
        ReseedDone(super::Empty),
        #[prost(message, tag = "15")]
        BranchReady(super::Empty),
        #[prost(message, tag = "16")]
        EvalDone(super::EvalDone),
        #[prost(message, tag = "17")]
        Contexts(super::ContextList),
        #[prost(message, tag = "18")]
        ContextClosed(super::Empty),
    }
}

/// Answer to [`Ping`].
#[derive(Clone, PartialEq, Message)]
pub struct Pong {
    /// The agent's crate version.
    #[prost(string, tag = "1")]
    pub version: String,
    /// [`PROTOCOL_VERSION`] of the agent.
    #[prost(uint32, tag = "2")]
    pub protocol_version: u32,
    /// Time since the guest kernel booted (CLOCK_BOOTTIME), in milliseconds.
    #[prost(uint64, tag = "3")]
    pub uptime_ms: u64,
    /// The guest kernel's boot id (`/proc/sys/kernel/random/boot_id`), empty if unavailable.
    #[prost(string, tag = "4")]
    pub boot_id: String,
    /// The agent's pid (1 in a guest).
    #[prost(uint32, tag = "5")]
    pub pid: u32,
    /// How many `Reseed` requests this agent has carried out.
    #[prost(uint64, tag = "6")]
    pub reseeds: u64,
}

/// The process was spawned.
#[derive(Clone, PartialEq, Message)]
pub struct Started {
    /// Guest pid, also the process group id.
    #[prost(uint32, tag = "1")]
    pub pid: u32,
}

/// The process exited normally.
#[derive(Clone, PartialEq, Message)]
pub struct Exited {
    #[prost(int32, tag = "1")]
    pub code: i32,
}

/// The process was killed by a signal.
#[derive(Clone, PartialEq, Message)]
pub struct Signaled {
    #[prost(int32, tag = "1")]
    pub signal: i32,
}

/// A snippet finished (its output was sent before, as `Stdout`/`Stderr` frames).
#[derive(Clone, PartialEq, Message)]
pub struct EvalDone {
    /// `repr()` of the final expression's value, when there is one and it is not `None`.
    #[prost(string, optional, tag = "1")]
    pub value: Option<String>,
    /// The value as JSON, when it is JSON-serializable.
    #[prost(string, optional, tag = "2")]
    pub json: Option<String>,
    /// The exception the snippet raised (or why its interpreter was lost).
    #[prost(message, optional, tag = "3")]
    pub error: Option<EvalError>,
    /// Time the snippet ran, in the guest.
    #[prost(double, tag = "4")]
    pub duration_ms: f64,
    /// This snippet started the context's interpreter.
    #[prost(bool, tag = "5")]
    pub created: bool,
    /// The context's earlier interpreter had died; this snippet started a new one.
    #[prost(bool, tag = "6")]
    pub restarted: bool,
    /// The snippet hit its timeout and was interrupted.
    #[prost(bool, tag = "7")]
    pub timed_out: bool,
}

/// An exception raised by a snippet.
#[derive(Clone, PartialEq, Message)]
pub struct EvalError {
    /// The exception's class, e.g. `ZeroDivisionError`; `ContextLost` when the interpreter died.
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub message: String,
    /// The formatted traceback (the snippet's frames only).
    #[prost(string, tag = "3")]
    pub traceback: String,
}

/// The live code contexts.
#[derive(Clone, PartialEq, Message)]
pub struct ContextList {
    #[prost(message, repeated, tag = "1")]
    pub contexts: Vec<ContextInfo>,
}

/// One code context.
#[derive(Clone, PartialEq, Message)]
pub struct ContextInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub lang: String,
    /// The interpreter's pid in the guest (0 while a snippet holds the context).
    #[prost(uint32, tag = "3")]
    pub pid: u32,
    /// Snippets run so far.
    #[prost(uint64, tag = "4")]
    pub evals: u64,
    /// The interpreter's version, e.g. `3.11.2`.
    #[prost(string, tag = "5")]
    pub version: String,
}

/// End of a file read.
#[derive(Clone, PartialEq, Message)]
pub struct FileEnd {
    /// Total bytes sent.
    #[prost(uint64, tag = "1")]
    pub size: u64,
    /// Permission bits of the file.
    #[prost(uint32, tag = "2")]
    pub mode: u32,
}

/// A file write finished.
#[derive(Clone, PartialEq, Message)]
pub struct WriteDone {
    /// Bytes written.
    #[prost(uint64, tag = "1")]
    pub size: u64,
}

/// A batch of directory entries.
#[derive(Clone, PartialEq, Message)]
pub struct DirEntries {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<DirEntry>,
}

/// One directory entry (not following symlinks).
#[derive(Clone, PartialEq, Message)]
pub struct DirEntry {
    /// File name (lossily converted to UTF-8).
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "FileType", tag = "2")]
    pub file_type: i32,
    /// Size in bytes.
    #[prost(uint64, tag = "3")]
    pub size: u64,
    /// `st_mode` permission bits (`& 0o7777`).
    #[prost(uint32, tag = "4")]
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    #[prost(int64, tag = "5")]
    pub mtime: i64,
}

impl DirEntry {
    /// The entry's type as an enum (unknown values map to `Other`).
    pub fn kind(&self) -> FileType {
        FileType::try_from(self.file_type).unwrap_or(FileType::Other)
    }
}

/// Type of a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum FileType {
    Unknown = 0,
    File = 1,
    Dir = 2,
    Symlink = 3,
    Other = 4,
}

/// A failed operation. Ends the operation.
#[derive(Clone, PartialEq, Message)]
pub struct Error {
    #[prost(enumeration = "ErrorKind", tag = "1")]
    pub kind: i32,
    /// What went wrong and what to do about it.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Broad class of an [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorKind {
    Unspecified = 0,
    NotFound = 1,
    Permission = 2,
    InvalidArgument = 3,
    Io = 4,
    AlreadyExists = 5,
    /// The peer broke the protocol (malformed or unexpected frame).
    Protocol = 6,
    Unsupported = 7,
    Internal = 8,
}

impl ErrorKind {
    /// Snake-case name used in messages and docs (`not_found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unspecified => "unspecified",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Permission => "permission",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Io => "io",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// An error frame body.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind: kind as i32, message: message.into() }
    }

    /// The kind as an enum (unknown values map to `Unspecified`).
    pub fn error_kind(&self) -> ErrorKind {
        ErrorKind::try_from(self.kind).unwrap_or(ErrorKind::Unspecified)
    }
}

impl Request {
    /// Wraps a body.
    pub fn new(body: request::Body) -> Self {
        Self { body: Some(body) }
    }
}

impl Response {
    /// Wraps a body.
    pub fn new(body: response::Body) -> Self {
        Self { body: Some(body) }
    }

    /// An error response.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::new(response::Body::Error(Error::new(kind, message)))
    }
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error on the agent connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the {max}-byte limit (corrupt stream or peer speaking another protocol)")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a frame ({got} of {want} bytes received)")]
    Truncated { got: usize, want: usize },
    #[error("malformed frame length prefix (peer is not speaking the forkd agent protocol)")]
    BadLength,
    #[error("malformed frame: {0} (peer is not speaking forkd agent protocol v{PROTOCOL_VERSION}?)")]
    Decode(#[from] prost::DecodeError),
}

/// Appends `msg` as one length-delimited frame to `buf`.
pub fn encode_frame<M: Message>(msg: &M, buf: &mut Vec<u8>) {
    let len = msg.encoded_len();
    buf.reserve(len + prost::length_delimiter_len(len));
    // Encoding into a Vec cannot run out of space: `reserve` above grew it as needed.
    let _ = msg.encode_length_delimited(buf);
}

/// Writes `msg` as one frame with a single `write_all`.
pub fn write_msg<W: Write + ?Sized, M: Message>(w: &mut W, msg: &M) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME });
    }
    let mut buf = Vec::with_capacity(len + 10);
    encode_frame(msg, &mut buf);
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream before the first byte of a
/// frame. Reads the length prefix a byte at a time: wrap unbuffered streams in a
/// `BufReader`, or use [`FrameReader`].
pub fn read_msg<R: Read + ?Sized, M: Message + Default>(r: &mut R, max: usize) -> Result<Option<M>, FrameError> {
    let mut len: u64 = 0;
    let mut shift = 0u32;
    let mut first = true;
    loop {
        let mut b = [0u8; 1];
        match r.read(&mut b) {
            Ok(0) if first => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated { got: 0, want: 1 }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        first = false;
        len |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift >= 64 {
            return Err(FrameError::BadLength);
        }
    }
    let len = usize::try_from(len).map_err(|_| FrameError::BadLength)?;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(FrameError::Truncated { got, want: len }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(M::decode(buf.as_slice())?))
}

/// Incremental frame decoder: feed it bytes as they arrive, take complete frames out.
/// Never blocks, so it fits poll loops. The buffer is zeroed only when it grows, so
/// reading into it repeatedly costs no memset and no allocation.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Fully initialized; `start..end` holds unconsumed bytes.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
    /// How much `fill_from` asks for next: starts small and doubles while reads come back
    /// full, up to the caller's chunk. A connection carrying one small request then zeroes
    /// one page instead of the whole chunk (in a BRANCH child every page the guest writes
    /// stops being shared with its siblings).
    window: usize,
}

/// The first read of a connection asks for this much.
const FIRST_READ: usize = 4 << 10;

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME)
    }
}

/// Result of parsing a length prefix from a byte slice.
enum Prefix {
    /// Need more bytes.
    Incomplete,
    /// (prefix length, frame length)
    Done(usize, usize),
}

fn parse_prefix(b: &[u8]) -> Result<Prefix, FrameError> {
    let mut len: u64 = 0;
    for (i, byte) in b.iter().enumerate() {
        if i >= 10 {
            return Err(FrameError::BadLength);
        }
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let len = usize::try_from(len).map_err(|_| FrameError::BadLength)?;
            return Ok(Prefix::Done(i + 1, len));
        }
    }
    if b.len() >= 10 {
        return Err(FrameError::BadLength);
    }
    Ok(Prefix::Incomplete)
}

impl FrameDecoder {
    /// A decoder rejecting frames longer than `max`.
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), start: 0, end: 0, max, window: FIRST_READ }
    }

    /// Makes room for `n` more bytes after `end`.
    fn reserve(&mut self, n: usize) {
        if self.buf.len() - self.end >= n {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < n {
            self.buf.resize(self.end + n, 0);
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.reserve(data.len());
        self.buf[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// Reads once from `r` (at most `chunk` bytes) into the buffer; returns the byte count
    /// (0 at end of stream).
    pub fn fill_from<R: Read + ?Sized>(&mut self, r: &mut R, chunk: usize) -> io::Result<usize> {
        let want = self.window.min(chunk).max(1);
        self.reserve(want);
        loop {
            match r.read(&mut self.buf[self.end..self.end + want]) {
                Ok(n) => {
                    self.end += n;
                    if n == want {
                        self.window = want.saturating_mul(2);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Takes the next complete frame, if one is buffered.
    pub fn next_msg<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let avail = &self.buf[self.start..self.end];
        let (plen, flen) = match parse_prefix(avail)? {
            Prefix::Incomplete => return Ok(None),
            Prefix::Done(p, f) => (p, f),
        };
        if flen > self.max {
            return Err(FrameError::TooLarge { len: flen, max: self.max });
        }
        if avail.len() < plen + flen {
            return Ok(None);
        }
        let msg = M::decode(&avail[plen..plen + flen])?;
        self.start += plen + flen;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(msg))
    }

    /// At end of stream: `Ok(())` if no partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        let avail = &self.buf[self.start..self.end];
        if avail.is_empty() {
            return Ok(());
        }
        let want = match parse_prefix(avail) {
            Ok(Prefix::Done(p, f)) => p + f,
            _ => avail.len() + 1,
        };
        Err(FrameError::Truncated { got: avail.len(), want })
    }
}

/// Blocking frame reader over a stream, reading in large chunks (few syscalls).
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    dec: FrameDecoder,
    chunk: usize,
}

impl<R: Read> FrameReader<R> {
    /// A reader with the default frame limit.
    pub fn new(inner: R) -> Self {
        Self { inner, dec: FrameDecoder::default(), chunk: 256 << 10 }
    }

    /// Reads the next frame; `Ok(None)` at a clean end of stream.
    pub fn read_msg<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        loop {
            if let Some(m) = self.dec.next_msg()? {
                return Ok(Some(m));
            }
            if self.dec.fill_from(&mut self.inner, self.chunk)? == 0 {
                self.dec.finish()?;
                return Ok(None);
            }
        }
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Splits into the stream and the decoder holding any bytes read ahead.
    pub fn into_parts(self) -> (R, FrameDecoder) {
        (self.inner, self.dec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping() -> Request {
        Request::new(request::Body::Ping(Ping {}))
    }

    #[test]
    fn roundtrip_through_read_msg_and_decoder() {
        let mut buf = Vec::new();
        let exec = Request::new(request::Body::Exec(ExecRequest::new(["echo", "hi"]).env("A", "b")));
        write_msg(&mut buf, &ping()).unwrap();
        write_msg(&mut buf, &exec).unwrap();

        let mut r = buf.as_slice();
        assert_eq!(read_msg::<_, Request>(&mut r, MAX_FRAME).unwrap(), Some(ping()));
        assert_eq!(read_msg::<_, Request>(&mut r, MAX_FRAME).unwrap(), Some(exec.clone()));
        assert_eq!(read_msg::<_, Request>(&mut r, MAX_FRAME).unwrap(), None);

        // Byte-at-a-time feeding yields the same frames.
        let mut dec = FrameDecoder::default();
        let mut out = Vec::new();
        for b in &buf {
            dec.push(std::slice::from_ref(b));
            while let Some(m) = dec.next_msg::<Request>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, vec![ping(), exec]);
        dec.finish().unwrap();
    }

    #[test]
    fn small_requests_touch_one_page_and_bulk_reads_grow_to_the_chunk() {
        let mut wire = Vec::new();
        write_msg(&mut wire, &ping()).unwrap();
        let mut dec = FrameDecoder::default();
        dec.fill_from(&mut wire.as_slice(), 256 << 10).unwrap();
        assert_eq!(dec.next_msg::<Request>().unwrap(), Some(ping()));
        assert_eq!(dec.buf.len(), FIRST_READ, "a ping must not zero a whole read chunk");

        let bulk = vec![7u8; 1 << 20];
        let mut r = bulk.as_slice();
        let mut sizes = Vec::new();
        while !r.is_empty() {
            sizes.push(dec.fill_from(&mut r, 64 << 10).unwrap());
            dec.start = dec.end; // consume
        }
        assert_eq!(sizes.iter().sum::<usize>(), bulk.len());
        assert_eq!(&sizes[..6], &[4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 64 << 10], "doubles up to the chunk");
    }

    #[test]
    fn oversize_frame_is_rejected_without_allocating() {
        let mut buf = Vec::new();
        prost::encode_length_delimiter(MAX_FRAME + 1, &mut buf).unwrap();
        let err = read_msg::<_, Request>(&mut buf.as_slice(), MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == MAX_FRAME + 1));

        let mut dec = FrameDecoder::default();
        dec.push(&buf);
        assert!(matches!(dec.next_msg::<Request>(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn oversize_message_is_not_written() {
        let big = Request::new(request::Body::FileChunk(Data { data: vec![0; MAX_FRAME + 1] }));
        let mut out = Vec::new();
        assert!(matches!(write_msg(&mut out, &big), Err(FrameError::TooLarge { .. })));
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut buf = Vec::new();
        write_msg(&mut buf, &Request::new(request::Body::StdinData(Data { data: b"hello".to_vec() }))).unwrap();
        buf.truncate(buf.len() - 2);
        let err = read_msg::<_, Request>(&mut buf.as_slice(), MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");

        let mut fr = FrameReader::new(buf.as_slice());
        assert!(matches!(fr.read_msg::<Request>(), Err(FrameError::Truncated { .. })));
    }

    #[test]
    fn endless_length_prefix_is_rejected() {
        let buf = [0xffu8; 16];
        assert!(matches!(read_msg::<_, Request>(&mut buf.as_slice(), MAX_FRAME), Err(FrameError::BadLength)));
        let mut dec = FrameDecoder::default();
        dec.push(&buf);
        assert!(matches!(dec.next_msg::<Request>(), Err(FrameError::BadLength)));
    }

    #[test]
    fn garbage_payload_is_a_decode_error() {
        // Length 4, then bytes that are not a valid protobuf message (field 0 is invalid).
        let buf = [4u8, 0, 0, 0, 0];
        assert!(matches!(read_msg::<_, Request>(&mut buf.as_slice(), MAX_FRAME), Err(FrameError::Decode(_))));
    }

    #[test]
    fn error_kind_names() {
        let e = Error::new(ErrorKind::NotFound, "x");
        assert_eq!(e.error_kind(), ErrorKind::NotFound);
        assert_eq!(e.error_kind().to_string(), "not_found");
        let unknown = Error { kind: 999, message: String::new() };
        assert_eq!(unknown.error_kind(), ErrorKind::Unspecified);
    }
}
