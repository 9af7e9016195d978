//! The agent server: listeners, per-connection dispatch and shared helpers.

pub mod branch;
pub mod eval;
pub mod exec;
pub mod fsops;
pub mod init;
pub mod reaper;
pub mod rng;
pub mod spawn;

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use forkd_agent::proto::{
    self, request, response, ErrorKind, FrameDecoder, FrameError, Pong, Request, Response, PROTOCOL_VERSION,
};

use self::reaper::Reaper;

/// Writes one line to stderr (the console when PID 1) with a single syscall. Only for
/// errors: every console byte costs guest kernel time.
pub fn log_error(msg: &str) {
    let line = format!("forkd-agent: {msg}\n");
    let _ = io::stderr().write_all(line.as_bytes());
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock(u32),
    Unix(String),
}

impl ListenAddr {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(port) = s.strip_prefix("vsock:") {
            port.parse::<u32>()
                .map(ListenAddr::Vsock)
                .map_err(|_| format!("bad vsock port in {s:?}: expected vsock:PORT, e.g. vsock:1024"))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("empty path in unix: listen address".into());
            }
            Ok(ListenAddr::Unix(path.to_owned()))
        } else {
            Err(format!("unknown listen address {s:?}: use vsock:PORT or unix:PATH"))
        }
    }
}

/// A bound listener; vsock connections are wrapped as `UnixStream`s (see `accept`).
pub enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Unix(path) => {
                // A stale socket file from a previous run would make bind fail.
                let _ = std::fs::remove_file(path);
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
            ListenAddr::Vsock(port) => bind_vsock(*port).map(Listener::Vsock),
        }
    }

    pub fn accept(&self) -> io::Result<UnixStream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| s),
            Listener::Vsock(fd) => {
                use std::os::fd::AsRawFd;
                // SAFETY: accept4 on a listening socket we own; null address pointers are allowed.
                let c = unsafe {
                    libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
                };
                if c < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `c` is a fresh connected socket fd that nobody else owns. A vsock
                // stream socket supports everything `UnixStream` uses on it (read, write,
                // SO_SNDTIMEO, shutdown), and we never ask for its address.
                Ok(unsafe { UnixStream::from_raw_fd(c) })
            }
        }
    }
}

fn bind_vsock(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Process-wide state shared by connection handlers.
pub struct Ctx {
    pub reaper: Arc<Reaper>,
    pub reseeds: AtomicU64,
    boot_id: OnceLock<String>,
    dev_null: OnceLock<OwnedFd>,
    /// /dev/urandom, opened at start: a BRANCH child reseeds through it at once, without a
    /// path walk and a new open file (fewer guest pages written in every child).
    pub urandom: Option<std::fs::File>,
    /// Code contexts (long-lived interpreters) by name.
    pub contexts: eval::Contexts,
}

impl Ctx {
    pub fn new(reaper: Arc<Reaper>) -> Self {
        let urandom = std::fs::OpenOptions::new().write(true).open("/dev/urandom").ok();
        Self {
            reaper,
            reseeds: AtomicU64::new(0),
            boot_id: OnceLock::new(),
            dev_null: OnceLock::new(),
            urandom,
            contexts: eval::Contexts::default(),
        }
    }

    /// /dev/null, opened once on first use and shared as every stdin-less child's stdin.
    pub fn dev_null(&self) -> io::Result<&OwnedFd> {
        if let Some(fd) = self.dev_null.get() {
            return Ok(fd);
        }
        let f = std::fs::File::open("/dev/null")?;
        // A racing thread may have won; its fd is as good as ours.
        Ok(self.dev_null.get_or_init(|| OwnedFd::from(f)))
    }
}

/// One accepted connection: the socket, read-ahead buffer and a reusable frame buffer.
pub struct Conn {
    pub sock: UnixStream,
    pub dec: FrameDecoder,
    out: Vec<u8>,
}

/// Socket read size: large, so a burst of frames costs one syscall.
pub const READ_CHUNK: usize = 256 << 10;

impl Conn {
    pub fn new(sock: UnixStream) -> Self {
        Self { sock, dec: FrameDecoder::default(), out: Vec::new() }
    }

    /// Sends one frame with one write.
    pub fn send(&mut self, msg: &Response) -> io::Result<()> {
        self.out.clear();
        proto::encode_frame(msg, &mut self.out);
        let r = self.sock.write_all(&self.out);
        if self.out.capacity() > 1 << 20 {
            self.out = Vec::new();
        }
        r
    }

    pub fn send_body(&mut self, body: response::Body) -> io::Result<()> {
        self.send(&Response::new(body))
    }

    pub fn send_error(&mut self, kind: ErrorKind, message: impl Into<String>) -> io::Result<()> {
        self.send(&Response::error(kind, message))
    }

    /// Blocks for the next request frame; `Ok(None)` when the peer closed cleanly.
    pub fn recv(&mut self) -> Result<Option<Request>, FrameError> {
        loop {
            if let Some(m) = self.dec.next_msg::<Request>()? {
                return Ok(Some(m));
            }
            if self.dec.fill_from(&mut self.sock, READ_CHUNK)? == 0 {
                self.dec.finish()?;
                return Ok(None);
            }
        }
    }
}

/// Message for a frame that could not be decoded.
pub fn frame_error_message(e: &FrameError) -> String {
    format!("bad request frame: {e}; each frame must be a varint length followed by a forkd agent protocol v{PROTOCOL_VERSION} Request message")
}

/// Hands accepted connections to worker threads. Finished workers wait for the next
/// connection instead of exiting (up to `MAX_IDLE` of them), because creating a thread costs
/// about twenty syscalls here.
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    wake: Condvar,
}

#[derive(Default)]
struct PoolState {
    queue: VecDeque<UnixStream>,
    /// Workers waiting for a connection.
    idle: usize,
}

const MAX_IDLE: usize = 8;

fn worker(first: UnixStream, pool: &Pool, ctx: &Ctx) {
    let mut sock = first;
    loop {
        handle(sock, ctx);
        let mut st = pool.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.idle >= MAX_IDLE {
            return;
        }
        st.idle += 1;
        let mut st = pool.wake.wait_while(st, |s| s.queue.is_empty()).unwrap_or_else(PoisonError::into_inner);
        st.idle -= 1;
        match st.queue.pop_front() {
            Some(s) => sock = s,
            None => return,
        }
    }
}

/// Accepts forever.
pub fn serve(listener: Listener, ctx: Arc<Ctx>) -> ! {
    let pool = Arc::new(Pool::default());
    loop {
        match listener.accept() {
            Ok(sock) => {
                let mut st = pool.state.lock().unwrap_or_else(PoisonError::into_inner);
                if st.idle > st.queue.len() {
                    st.queue.push_back(sock);
                    drop(st);
                    pool.wake.notify_one();
                    continue;
                }
                drop(st);
                let (ctx, pool) = (Arc::clone(&ctx), Arc::clone(&pool));
                let spawned =
                    std::thread::Builder::new().stack_size(256 << 10).spawn(move || worker(sock, &pool, &ctx));
                if let Err(e) = spawned {
                    log_error(&format!("cannot start connection thread: {e}"));
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => {}
                _ => {
                    // Out of fds or memory: back off instead of spinning.
                    log_error(&format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            },
        }
    }
}

fn handle(sock: UnixStream, ctx: &Ctx) {
    let mut conn = Conn::new(sock);
    let req = match conn.recv() {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(FrameError::Io(_)) => return,
        Err(e) => {
            let _ = conn.send_error(ErrorKind::Protocol, frame_error_message(&e));
            return;
        }
    };
    let Some(body) = req.body else {
        let _ = conn.send_error(
            ErrorKind::Protocol,
            "empty request: the first frame must carry Ping, Exec, WriteFile, ReadFile, ListDir, Reseed, PrepareBranch, Eval, ListContexts or CloseContext",
        );
        return;
    };
    // Errors here mean the client went away; nothing left to tell it.
    let _ = match body {
        request::Body::Ping(_) => ping(&mut conn, ctx),
        request::Body::Exec(r) => exec::run(&mut conn, r, ctx),
        request::Body::WriteFile(r) => fsops::write_file(&mut conn, r),
        request::Body::ReadFile(r) => fsops::read_file(&mut conn, &r.path),
        request::Body::ListDir(r) => fsops::list_dir(&mut conn, &r.path),
        request::Body::Reseed(r) => rng::reseed(&mut conn, &r.entropy, r.clock_unix_ns, ctx),
        request::Body::PrepareBranch(_) => branch::prepare(&mut conn),
        request::Body::Eval(r) => eval::eval(&mut conn, r, ctx),
        request::Body::ListContexts(_) => eval::list(&mut conn, ctx),
        request::Body::CloseContext(r) => eval::close(&mut conn, &r.name, ctx),
        request::Body::StdinData(_)
        | request::Body::StdinEof(_)
        | request::Body::FileChunk(_)
        | request::Body::FileEnd(_) => conn.send_error(
            ErrorKind::Protocol,
            "a connection must start with Ping, Exec, WriteFile, ReadFile, ListDir, Reseed, PrepareBranch, Eval, ListContexts or CloseContext; stdin and file chunks only follow their Exec/WriteFile",
        ),
    };
}

fn ping(conn: &mut Conn, ctx: &Ctx) -> io::Result<()> {
    let boot_id = ctx.boot_id.get_or_init(|| {
        // A 36-character UUID: one read, no stat.
        let mut b = [0u8; 64];
        std::fs::File::open("/proc/sys/kernel/random/boot_id")
            .and_then(|mut f| std::io::Read::read(&mut f, &mut b))
            .map(|n| String::from_utf8_lossy(&b[..n]).trim().to_owned())
            .unwrap_or_default()
    });
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let uptime_ms = (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000;
    conn.send_body(response::Body::Pong(Pong {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: PROTOCOL_VERSION,
        uptime_ms,
        boot_id: boot_id.clone(),
        pid: std::process::id(),
        reseeds: ctx.reseeds.load(Ordering::Relaxed),
    }))
}

/// Maps an I/O error on `path` to a protocol error with a helpful message.
pub fn io_error(e: &io::Error, doing: &str, path: &str) -> (ErrorKind, String) {
    match e.raw_os_error() {
        Some(libc::ENOENT) => (ErrorKind::NotFound, format!("no such file or directory: {path}")),
        Some(libc::EACCES | libc::EPERM) => (ErrorKind::Permission, format!("permission denied: {path} ({doing})")),
        Some(libc::EROFS) => (
            ErrorKind::Permission,
            format!("read-only file system: {path} ({doing}); write under /tmp or a writable mount"),
        ),
        Some(libc::EEXIST) => (ErrorKind::AlreadyExists, format!("already exists: {path}")),
        Some(libc::ENOTDIR) => {
            (ErrorKind::InvalidArgument, format!("not a directory: a component of {path} is a file ({doing})"))
        }
        Some(libc::EISDIR) => (ErrorKind::InvalidArgument, format!("is a directory: {path} ({doing})")),
        Some(libc::ENOSPC) => (
            ErrorKind::Io,
            format!("no space left on device while {doing} {path}: free space in the sandbox or use a larger image"),
        ),
        Some(libc::ENAMETOOLONG) => (ErrorKind::InvalidArgument, format!("file name too long: {path}")),
        _ => (ErrorKind::Io, format!("{doing} {path}: {e}")),
    }
}
