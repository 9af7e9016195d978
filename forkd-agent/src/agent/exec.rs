//! `Exec`: spawn a process group and pump its I/O in one poll loop (no helper threads:
//! thread creation is a costly syscall sequence in the guest).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use forkd_agent::proto::{
    request, response, Data, Empty, ErrorKind, ExecRequest, Exited, Request, Signaled, Started, OUTPUT_CHUNK,
};

use super::spawn::{self, SpawnSpec};
use super::{frame_error_message, Conn, Ctx, READ_CHUNK};

/// The environment every exec starts from; request entries are added on top.
pub const DEFAULT_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("USER", "root"),
    ("LOGNAME", "root"),
    ("SHELL", "/bin/sh"),
];

/// Stop reading the socket while this much stdin waits for the child (backpressure).
const STDIN_HIGH_WATER: usize = 1 << 20;

/// After the child exits, keep draining output that is immediately available for at most
/// this long (a background grandchild may hold the pipes open and keep writing).
const DRAIN_LIMIT: Duration = Duration::from_millis(500);

/// Keeps glibc off AVX/AVX-512 (see `vector_state_unsafe`).
const NO_AVX_TUNABLES: &str =
    "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-FMA,-F16C,-AVX_Fast_Unaligned_Load";

/// True when the guest kernel saves only x87/SSE state between processes (`noxsave`) while
/// user mode can still use AVX: on hosts that emulate guest kernel mode user code sees the
/// host's CPUID and XCR0 (docs/host-compat.md). Two processes using vector registers at once
/// can then corrupt each other's upper halves, so commands start with glibc kept off AVX.
fn vector_state_unsafe() -> bool {
    static UNSAFE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UNSAFE.get_or_init(|| {
        std::fs::read_to_string("/proc/cmdline").map(|c| c.split_whitespace().any(|w| w == "noxsave")).unwrap_or(false)
    })
}

/// Builds the child's environment: defaults, then the request's `KEY=VALUE` entries.
pub(super) fn build_env(extra: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = DEFAULT_ENV.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    if vector_state_unsafe() {
        env.push(("GLIBC_TUNABLES".into(), NO_AVX_TUNABLES.into()));
    }
    for kv in extra {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(format!("bad environment entry {kv:?}: expected KEY=VALUE"));
        };
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return Err(format!(
                "bad environment entry {kv:?}: the key must be non-empty and neither part may contain NUL"
            ));
        }
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.to_owned(),
            None => env.push((k.to_owned(), v.to_owned())),
        }
    }
    Ok(env)
}

/// Resolves a program name through `PATH` like execvp does (the child only calls execve).
pub(super) fn resolve_program(name: &str, env: &[(String, String)]) -> Result<String, (ErrorKind, String)> {
    if name.contains('/') {
        return Ok(name.to_owned());
    }
    let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("");
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = format!("{dir}/{name}");
        if let Ok(m) = std::fs::metadata(&cand) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    Err((
        ErrorKind::NotFound,
        format!("command not found: {name} (searched PATH={path}); install it in the image or give an absolute path"),
    ))
}

fn spawn_error(e: &io::Error, prog: &str, cwd: &str) -> (ErrorKind, String) {
    match e.raw_os_error() {
        Some(libc::ENOENT) => {
            if !cwd.is_empty() && !std::path::Path::new(cwd).is_dir() {
                (
                    ErrorKind::NotFound,
                    format!("working directory does not exist: {cwd}"),
                )
            } else {
                (
                    ErrorKind::NotFound,
                    format!("no such file or directory: {prog} (check the path; is the program (or its #! interpreter) installed in the image?)"),
                )
            }
        }
        Some(libc::EACCES) => (
            ErrorKind::Permission,
            format!("permission denied executing {prog} (is it executable? try chmod +x; is {cwd:?} accessible?)"),
        ),
        Some(libc::ENOEXEC) => (
            ErrorKind::InvalidArgument,
            format!("exec format error: {prog} is not a valid executable for this guest (wrong architecture, or a script without a #! line)"),
        ),
        Some(libc::ENOTDIR) => (
            ErrorKind::InvalidArgument,
            format!("not a directory: a component of {prog} or of the working directory {cwd:?} is a file"),
        ),
        Some(libc::E2BIG) => (
            ErrorKind::InvalidArgument,
            format!("argument list too long for {prog}: pass large data through stdin or a file"),
        ),
        _ => (ErrorKind::Io, format!("cannot start {prog}: {e}")),
    }
}

pub(super) fn killpg(pid: u32) {
    // SAFETY: plain kill(2) on the process group we created (pgid == child pid).
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
}

pub(super) fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

pub(super) fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Output pipe state.
struct Out<T> {
    pipe: Option<T>,
    stream: fn(Data) -> response::Body,
}

impl<T: Read + AsRawFd> Out<T> {
    /// Reads one chunk and forwards it. `Err` means the client is gone.
    fn pump(&mut self, conn: &mut Conn, buf: &mut [u8]) -> io::Result<()> {
        let Some(p) = self.pipe.as_mut() else {
            return Ok(());
        };
        match read_some(p, buf) {
            Ok(0) | Err(_) => {
                self.pipe = None;
                Ok(())
            }
            Ok(n) => conn.send_body((self.stream)(Data { data: buf[..n].to_vec() })),
        }
    }
}

struct StdinState {
    pipe: Option<File>,
    pending: Vec<u8>,
    /// The client sent StdinEof: close once `pending` is written.
    eof: bool,
}

impl StdinState {
    /// Writes as much pending data as the pipe takes without blocking.
    fn flush(&mut self) {
        while let Some(p) = self.pipe.as_mut() {
            if self.pending.is_empty() {
                if self.eof {
                    self.pipe = None; // close: the child sees EOF
                }
                return;
            }
            match p.write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // EPIPE: the child closed its stdin; drop whatever else arrives.
                    self.pipe = None;
                    self.pending = Vec::new();
                }
            }
        }
    }
}

pub(super) fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on an fd we own; failure just leaves it blocking.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

enum ClientEvent {
    /// Keep going.
    Ok,
    /// Closed the connection or broke the protocol: kill and stop.
    Gone,
    /// Broke the protocol: kill, send this error, stop.
    Protocol(String),
}

/// Handles socket readability during an exec.
fn on_client(conn: &mut Conn, stdin: &mut StdinState, stdin_wanted: bool) -> ClientEvent {
    match conn.dec.fill_from(&mut conn.sock, READ_CHUNK) {
        Ok(0) | Err(_) => ClientEvent::Gone,
        Ok(_) => take_frames(conn, stdin, stdin_wanted),
    }
}

/// Consumes the complete frames buffered in `conn`.
fn take_frames(conn: &mut Conn, stdin: &mut StdinState, stdin_wanted: bool) -> ClientEvent {
    loop {
        match conn.dec.next_msg::<Request>() {
            Ok(None) => return ClientEvent::Ok,
            Ok(Some(Request { body: Some(request::Body::StdinData(d)) })) => {
                if stdin_wanted && stdin.pipe.is_some() && !stdin.eof {
                    if stdin.pending.is_empty() {
                        stdin.pending = d.data;
                    } else {
                        stdin.pending.extend_from_slice(&d.data);
                    }
                }
            }
            Ok(Some(Request { body: Some(request::Body::StdinEof(_)) })) => stdin.eof = true,
            Ok(Some(_)) => {
                return ClientEvent::Protocol(
                    "unexpected frame during exec: only StdinData and StdinEof may follow Exec".into(),
                )
            }
            Err(e) => return ClientEvent::Protocol(frame_error_message(&e)),
        }
    }
}

/// Runs one exec request to completion.
pub fn run(conn: &mut Conn, req: ExecRequest, ctx: &Ctx) -> io::Result<()> {
    let Some(prog_name) = req.argv.first() else {
        return conn.send_error(
            ErrorKind::InvalidArgument,
            "empty argv: give at least the program to run, e.g. [\"sh\", \"-c\", \"echo hi\"]",
        );
    };
    if req.argv.iter().any(|a| a.contains('\0')) || req.cwd.contains('\0') {
        return conn.send_error(ErrorKind::InvalidArgument, "argv and cwd must not contain NUL bytes");
    }
    let env = match build_env(&req.env) {
        Ok(e) => e,
        Err(m) => return conn.send_error(ErrorKind::InvalidArgument, m),
    };
    let prog = match resolve_program(prog_name, &env) {
        Ok(p) => p,
        Err((k, m)) => return conn.send_error(k, m),
    };

    // NULs were rejected above, so these conversions cannot fail.
    let cstr = |s: &str| CString::new(s).unwrap_or_default();
    let argv_c: Vec<CString> = req.argv.iter().map(|a| cstr(a)).collect();
    let env_c: Vec<CString> = env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect();
    let prog_c = cstr(&prog);
    let cwd_c = (!req.cwd.is_empty()).then(|| cstr(&req.cwd));
    let spec = SpawnSpec { prog: &prog_c, argv: &argv_c, env: &env_c, cwd: cwd_c.as_deref() };
    let stdin_spec = if req.stdin {
        spawn::Stdin::Pipe
    } else {
        match ctx.dev_null() {
            Ok(fd) => spawn::Stdin::Fd(fd),
            Err(e) => {
                return conn.send_error(ErrorKind::Io, format!("cannot open /dev/null for the child's stdin: {e}"))
            }
        }
    };
    let start = Instant::now();
    let spawned = ctx.reaper.spawn(|| {
        let sp = spawn::spawn(&spec, stdin_spec)?;
        Ok((sp.pid, sp))
    });
    let (pid, sp, mut exit) = match spawned {
        Ok(c) => c,
        Err(e) => {
            let (k, m) = spawn_error(&e, &prog, &req.cwd);
            return conn.send_error(k, m);
        }
    };
    let mut stdout = Out { pipe: Some(sp.stdout), stream: response::Body::Stdout };
    let mut stderr = Out { pipe: Some(sp.stderr), stream: response::Body::Stderr };
    let mut stdin = StdinState { pipe: sp.stdin, pending: Vec::new(), eof: false };
    if let Some(p) = &stdin.pipe {
        set_nonblocking(p.as_raw_fd());
    }

    let deadline = (req.timeout_ms > 0).then(|| start + Duration::from_millis(req.timeout_ms));
    if req.timeout_ms > 0 {
        // A client that stops reading must not stall us past the deadline in a blocking write.
        let _ = conn.sock.set_write_timeout(Some(Duration::from_millis(req.timeout_ms)));
    }

    let abandon = |exit: &mut super::reaper::ExitWatch| {
        killpg(pid);
        exit.wait();
    };

    if conn.send_body(response::Body::Started(Started { pid })).is_err() {
        abandon(&mut exit);
        return Ok(());
    }
    // Stdin frames may have arrived together with the request.
    let mut event = take_frames(conn, &mut stdin, req.stdin);
    stdin.flush();

    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut timed_out = false;
    let sock_fd = conn.sock.as_raw_fd();
    let exit_fd = exit.file.as_raw_fd();
    let status = loop {
        match std::mem::replace(&mut event, ClientEvent::Ok) {
            ClientEvent::Ok => {}
            ClientEvent::Gone => {
                abandon(&mut exit);
                return Ok(());
            }
            ClientEvent::Protocol(m) => {
                abandon(&mut exit);
                return conn.send_error(ErrorKind::Protocol, m);
            }
        }
        let mut fds: [libc::pollfd; 5] = [pollfd(-1, 0); 5];
        // Slot order is fixed; fd -1 entries are ignored by poll.
        if stdin.pending.len() < STDIN_HIGH_WATER {
            fds[0] = pollfd(sock_fd, libc::POLLIN);
        }
        if let Some(p) = &stdout.pipe {
            fds[1] = pollfd(p.as_raw_fd(), libc::POLLIN);
        }
        if let Some(p) = &stderr.pipe {
            fds[2] = pollfd(p.as_raw_fd(), libc::POLLIN);
        }
        fds[3] = pollfd(exit_fd, libc::POLLIN);
        if let (Some(p), false) = (&stdin.pipe, stdin.pending.is_empty()) {
            fds[4] = pollfd(p.as_raw_fd(), libc::POLLOUT);
        }
        let timeout_ms = match (deadline, timed_out) {
            (Some(d), false) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so we never wake just before the deadline and spin.
                i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
            }
            _ => -1,
        };
        // SAFETY: `fds` is a valid array of 5 pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            abandon(&mut exit);
            return Err(err);
        }
        if n == 0 {
            // Deadline passed.
            killpg(pid);
            timed_out = true;
            continue;
        }
        let ready = |i: usize| fds[i].revents != 0;
        if ready(1) && stdout.pump(conn, &mut buf).is_err() {
            abandon(&mut exit);
            return Ok(());
        }
        if ready(2) && stderr.pump(conn, &mut buf).is_err() {
            abandon(&mut exit);
            return Ok(());
        }
        if ready(0) {
            event = on_client(conn, &mut stdin, req.stdin);
        }
        if ready(0) || ready(4) {
            stdin.flush();
        }
        if ready(3) {
            break exit.wait();
        }
    };

    // The child is gone; forward output it left in the pipes.
    let drain_until = Instant::now() + DRAIN_LIMIT;
    while (stdout.pipe.is_some() || stderr.pipe.is_some()) && Instant::now() < drain_until {
        let mut fds = [pollfd(-1, 0), pollfd(-1, 0)];
        if let Some(p) = &stdout.pipe {
            fds[0] = pollfd(p.as_raw_fd(), libc::POLLIN);
        }
        if let Some(p) = &stderr.pipe {
            fds[1] = pollfd(p.as_raw_fd(), libc::POLLIN);
        }
        // SAFETY: `fds` is a valid array of 2 pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
        if n <= 0 {
            break; // nothing more right now (a grandchild may hold the pipes open)
        }
        if fds[0].revents != 0 && stdout.pump(conn, &mut buf).is_err() {
            return Ok(());
        }
        if fds[1].revents != 0 && stderr.pump(conn, &mut buf).is_err() {
            return Ok(());
        }
    }

    let body = match status {
        _ if timed_out => response::Body::TimedOut(Empty {}),
        Some(st) if libc::WIFEXITED(st) => response::Body::Exited(Exited { code: libc::WEXITSTATUS(st) }),
        Some(st) if libc::WIFSIGNALED(st) => response::Body::Signaled(Signaled { signal: libc::WTERMSIG(st) }),
        _ => {
            return conn.send_error(
                ErrorKind::Internal,
                format!("lost the exit status of pid {pid} (agent bug; please report)"),
            )
        }
    };
    conn.send_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_and_validation() {
        let env = build_env(&["PATH=/x".into(), "FOO=a=b".into()]).unwrap();
        assert!(env.contains(&("PATH".into(), "/x".into())));
        assert!(env.contains(&("FOO".into(), "a=b".into())));
        assert!(env.contains(&("HOME".into(), "/root".into())));
        assert!(build_env(&["NOEQUALS".into()]).is_err());
        assert!(build_env(&["=x".into()]).is_err());
    }

    #[test]
    fn program_resolution() {
        let env = build_env(&[]).unwrap();
        assert!(resolve_program("sh", &env).unwrap().ends_with("/sh"));
        assert_eq!(resolve_program("/x/y", &env).unwrap(), "/x/y");
        let (k, m) = resolve_program("no-such-program-xyz", &env).unwrap_err();
        assert_eq!(k, ErrorKind::NotFound);
        assert!(m.contains("command not found: no-such-program-xyz"), "{m}");
    }
}
