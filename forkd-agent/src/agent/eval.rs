//! Code contexts: long-lived interpreters that run snippets without starting a process each.
//!
//! A context is a Python process started on first use (`eval.py`), keeping its namespace
//! (variables, imports, open files, loaded data) between snippets. Each snippet goes to the
//! interpreter's stdin as a frame; the snippet's own output arrives on the interpreter's stdout
//! and stderr, which the agent streams to the host as it comes; the result (the value of a
//! final expression, or the exception and its traceback) arrives as a frame on its fd 3.
//!
//! A context is guest state like any process: BRANCH children get it as it was, already
//! started, with the agent's table of contexts (this module's state) inherited alongside.
//!
//! A timeout interrupts the snippet (SIGINT: `KeyboardInterrupt`), keeping the context; an
//! interpreter that does not stop within [`INTERRUPT_GRACE`] is killed, and one that died is
//! reported and replaced by a new one on the next snippet.

use super::exec::{build_env, killpg, pollfd, read_some, set_nonblocking};
use super::{Conn, Ctx};
use forkd_agent::proto::{
    response, ContextInfo, ContextList, Data, Empty, ErrorKind, EvalDone, EvalError, EvalRequest, OUTPUT_CHUNK,
};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The interpreter every context runs (the only language so far).
pub const PYTHON: &str = "python";
/// The context a snippet runs in when the host names none.
pub const DEFAULT_CONTEXT: &str = "main";
/// Largest snippet accepted.
pub const MAX_CODE: usize = 1 << 20;
/// How long an interrupted snippet may take to stop before its interpreter is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// How long a new interpreter may take to say it is ready (where guest kernel code is
/// emulated, Python's start-up alone takes many seconds).
const START_TIMEOUT: Duration = Duration::from_secs(300);

const BOOTSTRAP: &str = include_str!("eval.py");

/// One running interpreter.
struct Interpreter {
    lang: String,
    pid: u32,
    version: String,
    requests: File,
    replies: File,
    stdout: File,
    stderr: File,
    exit: super::reaper::ExitWatch,
    evals: u64,
}

/// The agent's contexts by name. Each slot is locked for the whole of a snippet, so snippets
/// of one context run one at a time and different contexts run side by side.
#[derive(Default)]
pub struct Contexts {
    slots: Mutex<HashMap<String, Arc<Mutex<Option<Interpreter>>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A frame of records: `(key, bytes)`, each a 1-byte key, a 4-byte big-endian length and the
/// bytes, the whole preceded by its 4-byte big-endian length.
fn encode(records: &[(u8, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, value) in records {
        body.push(*key);
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Parses a frame body's records (malformed trailing bytes are ignored).
fn decode(body: &[u8]) -> HashMap<u8, String> {
    let mut out = HashMap::new();
    let mut i = 0;
    while i + 5 <= body.len() {
        let len = u32::from_be_bytes([body[i + 1], body[i + 2], body[i + 3], body[i + 4]]) as usize;
        let end = (i + 5).saturating_add(len).min(body.len());
        out.insert(body[i], String::from_utf8_lossy(&body[i + 5..end]).into_owned());
        i = end;
    }
    out
}

/// Reads frames from the interpreter's reply pipe as they complete.
#[derive(Default)]
struct Replies {
    buf: Vec<u8>,
}

impl Replies {
    /// Reads what is available; `Ok(None)` until a whole frame is in, `Err` at end of file.
    fn poll(&mut self, pipe: &mut File) -> io::Result<Option<HashMap<u8, String>>> {
        let mut chunk = [0u8; 4096];
        match read_some(pipe, &mut chunk) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame: Vec<u8> = self.buf.drain(..4 + len).collect();
        Ok(Some(decode(&frame[4..])))
    }
}

impl Interpreter {
    /// Starts `python3` with the context bootstrap and waits until it says it is ready.
    fn start(ctx: &Ctx) -> Result<Self, (ErrorKind, String)> {
        let env = build_env(&["PYTHONUNBUFFERED=1".into(), "PYTHONDONTWRITEBYTECODE=1".into()])
            .map_err(|m| (ErrorKind::Internal, m))?;
        let prog = super::exec::resolve_program("python3", &env).map_err(|_| {
            (
                ErrorKind::NotFound,
                "this sandbox's image has no python3: code contexts need an image with Python (`--image default`)"
                    .to_string(),
            )
        })?;
        let cstr = |s: &str| CString::new(s).unwrap_or_default();
        let argv = [cstr("python3"), cstr("-u"), cstr("-X"), cstr("utf8"), cstr("-c"), cstr(BOOTSTRAP)];
        let env_c: Vec<CString> = env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect();
        let prog_c = cstr(&prog);
        let spec = super::spawn::SpawnSpec { prog: &prog_c, argv: &argv, env: &env_c, cwd: None };
        let io_err = |e: io::Error| (ErrorKind::Io, format!("cannot start python3: {e}"));
        let (replies_r, replies_w) = super::spawn::pipe().map_err(io_err)?;
        let (pid, spawned, exit) = ctx
            .reaper
            .spawn(|| {
                let sp = super::spawn::spawn_with_extra(&spec, super::spawn::Stdin::Pipe, Some(&replies_w))?;
                Ok((sp.pid, sp))
            })
            .map_err(io_err)?;
        drop(replies_w);
        let requests = spawned.stdin.ok_or_else(|| (ErrorKind::Internal, "no stdin pipe for python3".into()))?;
        for f in [&replies_r, &spawned.stdout, &spawned.stderr] {
            set_nonblocking(f.as_raw_fd());
        }
        let mut interp = Interpreter {
            lang: PYTHON.into(),
            pid,
            version: String::new(),
            requests,
            replies: replies_r,
            stdout: spawned.stdout,
            stderr: spawned.stderr,
            exit,
            evals: 0,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut replies = Replies::default();
        let mut drain = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                killpg(pid);
                return Err((ErrorKind::Internal, format!("python3 did not start within {START_TIMEOUT:?}")));
            }
            let mut fds = [
                pollfd(interp.replies.as_raw_fd(), libc::POLLIN),
                pollfd(interp.exit.file.as_raw_fd(), libc::POLLIN),
                pollfd(interp.stdout.as_raw_fd(), libc::POLLIN),
                pollfd(interp.stderr.as_raw_fd(), libc::POLLIN),
            ];
            // SAFETY: `fds` is a valid array of 4 pollfds.
            unsafe { libc::poll(fds.as_mut_ptr(), 4, left.as_millis().min(1000) as i32) };
            // Start-up chatter (warnings) is not a snippet's output: drop it.
            for (i, pipe) in [(2, &mut interp.stdout), (3, &mut interp.stderr)] {
                if fds[i].revents != 0 {
                    let _ = read_some(pipe, &mut drain);
                }
            }
            if fds[0].revents != 0 {
                match replies.poll(&mut interp.replies) {
                    Ok(Some(frame)) => {
                        interp.version = frame.get(&b'V').cloned().unwrap_or_default();
                        return Ok(interp);
                    }
                    Ok(None) => {}
                    Err(_) => return Err(interp.died_at_start()),
                }
            }
            if fds[1].revents != 0 {
                return Err(interp.died_at_start());
            }
        }
    }

    fn died_at_start(&mut self) -> (ErrorKind, String) {
        let mut err = Vec::new();
        let _ = self.stderr.read_to_end(&mut err);
        let status = self.exit.wait().map(|s| format!(" (wait status {s})")).unwrap_or_default();
        (
            ErrorKind::Internal,
            format!("python3 exited while starting{status}: {}", String::from_utf8_lossy(&err).trim()),
        )
    }

    fn alive(&self) -> bool {
        let mut fd = [pollfd(self.exit.file.as_raw_fd(), libc::POLLIN)];
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(fd.as_mut_ptr(), 1, 0) == 0 }
    }

    fn info(&self, name: &str) -> ContextInfo {
        ContextInfo {
            name: name.into(),
            lang: self.lang.clone(),
            pid: self.pid,
            evals: self.evals,
            version: self.version.clone(),
        }
    }
}

/// What a snippet ended with, before it becomes an `EvalDone`.
enum Outcome {
    Reply(HashMap<u8, String>),
    /// The interpreter died (or was killed); the context is gone.
    Died(String),
    /// The host went away.
    ClientGone,
}

/// Streams whatever the interpreter's output pipes hold to the host.
fn forward(conn: &mut Conn, pipe: &mut File, stream: fn(Data) -> response::Body, buf: &mut [u8]) -> io::Result<()> {
    loop {
        match read_some(pipe, buf) {
            Ok(0) => return Ok(()),
            Ok(n) => conn.send_body(stream(Data { data: buf[..n].to_vec() }))?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(_) => return Ok(()),
        }
    }
}

/// Runs one snippet in `interp`, streaming its output; interrupts it at `deadline`.
fn run_snippet(conn: &mut Conn, interp: &mut Interpreter, code: &str, deadline: Option<Instant>) -> (Outcome, bool) {
    let frame = encode(&[(b'c', code.as_bytes())]);
    if let Err(e) = interp.requests.write_all(&frame) {
        return (Outcome::Died(format!("the interpreter does not take snippets: {e}")), false);
    }
    interp.evals += 1;
    let mut replies = Replies::default();
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let sock = conn.sock.as_raw_fd();
    let (mut interrupted_at, mut timed_out) = (None::<Instant>, false);
    loop {
        let wake = match (interrupted_at, deadline) {
            (Some(at), _) => Some(at + INTERRUPT_GRACE),
            (None, Some(d)) => Some(d),
            (None, None) => None,
        };
        let timeout = wake.map_or(-1, |w| {
            i32::try_from(w.saturating_duration_since(Instant::now()).as_millis().max(1)).unwrap_or(i32::MAX)
        });
        let mut fds = [
            pollfd(interp.replies.as_raw_fd(), libc::POLLIN),
            pollfd(interp.stdout.as_raw_fd(), libc::POLLIN),
            pollfd(interp.stderr.as_raw_fd(), libc::POLLIN),
            pollfd(interp.exit.file.as_raw_fd(), libc::POLLIN),
            pollfd(sock, libc::POLLIN),
        ];
        // SAFETY: `fds` is a valid array of 5 pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n == 0 {
            match interrupted_at {
                None => {
                    // The deadline: interrupt the snippet, keep the context.
                    // SAFETY: SIGINT to the interpreter this context started.
                    unsafe { libc::kill(interp.pid as i32, libc::SIGINT) };
                    interrupted_at = Some(Instant::now());
                    timed_out = true;
                }
                Some(_) => {
                    killpg(interp.pid);
                    let _ = interp.exit.wait();
                    let why = format!("the snippet did not stop within {INTERRUPT_GRACE:?} of its interrupt and its interpreter was killed");
                    return (Outcome::Died(why), timed_out);
                }
            }
            continue;
        }
        if fds[1].revents != 0 && forward(conn, &mut interp.stdout, response::Body::Stdout, &mut buf).is_err() {
            return (interrupt(interp), timed_out);
        }
        if fds[2].revents != 0 && forward(conn, &mut interp.stderr, response::Body::Stderr, &mut buf).is_err() {
            return (interrupt(interp), timed_out);
        }
        if fds[0].revents != 0 {
            match replies.poll(&mut interp.replies) {
                Ok(Some(reply)) => {
                    // Output written before the reply is in the pipes now: send it first.
                    let sent = forward(conn, &mut interp.stdout, response::Body::Stdout, &mut buf)
                        .and_then(|_| forward(conn, &mut interp.stderr, response::Body::Stderr, &mut buf));
                    return (if sent.is_err() { Outcome::ClientGone } else { Outcome::Reply(reply) }, timed_out);
                }
                Ok(None) => {}
                Err(_) => {
                    let _ = forward(conn, &mut interp.stderr, response::Body::Stderr, &mut buf);
                    let status = interp.exit.wait();
                    return (Outcome::Died(exit_text(status)), timed_out);
                }
            }
        }
        if fds[3].revents != 0 {
            let _ = forward(conn, &mut interp.stdout, response::Body::Stdout, &mut buf);
            let _ = forward(conn, &mut interp.stderr, response::Body::Stderr, &mut buf);
            let status = interp.exit.wait();
            return (Outcome::Died(exit_text(status)), timed_out);
        }
        if fds[4].revents != 0 {
            // The host sends nothing during a snippet: readable means it closed or broke off.
            let mut probe = [0u8; 1];
            // SAFETY: a non-blocking peek at the socket we own.
            let got = unsafe { libc::recv(sock, probe.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if got <= 0 {
                return (interrupt(interp), timed_out);
            }
        }
    }
}

/// The host left mid-snippet: stop the snippet (SIGINT), keep the context.
fn interrupt(interp: &Interpreter) -> Outcome {
    // SAFETY: SIGINT to the interpreter this context started.
    unsafe { libc::kill(interp.pid as i32, libc::SIGINT) };
    Outcome::ClientGone
}

fn exit_text(status: Option<i32>) -> String {
    match status {
        Some(st) if libc::WIFEXITED(st) => format!("the interpreter exited with status {}", libc::WEXITSTATUS(st)),
        Some(st) if libc::WIFSIGNALED(st) => format!("the interpreter was killed by signal {}", libc::WTERMSIG(st)),
        _ => "the interpreter exited".into(),
    }
}

/// Handles one `Eval` request.
pub fn eval(conn: &mut Conn, req: EvalRequest, ctx: &Ctx) -> io::Result<()> {
    let name = if req.context.is_empty() { DEFAULT_CONTEXT.to_string() } else { req.context.clone() };
    if !valid_name(&name) {
        return conn.send_error(
            ErrorKind::InvalidArgument,
            format!("context name `{name}` is not valid: use 1-64 of A-Z, a-z, 0-9, '-', '_', '.'"),
        );
    }
    let lang = if req.lang.is_empty() { PYTHON } else { req.lang.as_str() };
    if lang != PYTHON {
        return conn.send_error(
            ErrorKind::Unsupported,
            format!("language `{lang}` is not supported; contexts run `{PYTHON}`"),
        );
    }
    if req.code.len() > MAX_CODE {
        return conn.send_error(
            ErrorKind::InvalidArgument,
            format!(
                "the code is {} bytes, more than {} KiB: write it to a file and run that",
                req.code.len(),
                MAX_CODE >> 10
            ),
        );
    }
    let slot = Arc::clone(lock(&ctx.contexts.slots).entry(name.clone()).or_default());
    let mut held = lock(&slot);
    let restarted = held.as_ref().is_some_and(|i| !i.alive());
    let created = held.is_none() || restarted;
    if created {
        *held = None;
        match Interpreter::start(ctx) {
            Ok(interp) => *held = Some(interp),
            Err((kind, message)) => {
                drop(held);
                lock(&ctx.contexts.slots).remove(&name);
                return conn.send_error(kind, message);
            }
        }
    }
    let Some(interp) = held.as_mut() else {
        return conn.send_error(ErrorKind::Internal, "context vanished");
    };
    let started = Instant::now();
    let deadline = (req.timeout_ms > 0).then(|| started + Duration::from_millis(req.timeout_ms));
    let (outcome, timed_out) = run_snippet(conn, interp, &req.code, deadline);
    let mut done = EvalDone { created, restarted, timed_out, ..Default::default() };
    match outcome {
        Outcome::ClientGone => return Ok(()),
        Outcome::Reply(mut reply) => {
            done.value = reply.remove(&b'v');
            done.json = reply.remove(&b'j');
            done.duration_ms = reply.get(&b'd').and_then(|d| d.parse().ok()).unwrap_or_default();
            if let Some(name) = reply.remove(&b'n') {
                done.error = Some(EvalError {
                    name,
                    message: reply.remove(&b'm').unwrap_or_default(),
                    traceback: reply.remove(&b'b').unwrap_or_default(),
                });
            }
        }
        Outcome::Died(why) => {
            *held = None;
            done.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            done.error = Some(EvalError {
                name: "ContextLost".into(),
                message: format!("{why}; the context's state is gone, and the next snippet starts a new interpreter"),
                traceback: String::new(),
            });
        }
    }
    conn.send_body(response::Body::EvalDone(done))
}

/// Lists the contexts with a live interpreter.
pub fn list(conn: &mut Conn, ctx: &Ctx) -> io::Result<()> {
    let slots: Vec<(String, Arc<Mutex<Option<Interpreter>>>)> =
        lock(&ctx.contexts.slots).iter().map(|(n, s)| (n.clone(), Arc::clone(s))).collect();
    let mut contexts = Vec::new();
    for (name, slot) in slots {
        // A context busy with a snippet is listed from what its lock protects once free;
        // try_lock keeps a listing from waiting on a long snippet.
        match slot.try_lock() {
            Ok(held) => contexts.extend(held.as_ref().filter(|i| i.alive()).map(|i| i.info(&name))),
            Err(_) => contexts.push(ContextInfo { name, lang: PYTHON.into(), ..Default::default() }),
        }
    }
    contexts.sort_by(|a, b| a.name.cmp(&b.name));
    conn.send_body(response::Body::Contexts(ContextList { contexts }))
}

/// Ends a context's interpreter and forgets it.
pub fn close(conn: &mut Conn, name: &str, ctx: &Ctx) -> io::Result<()> {
    let Some(slot) = lock(&ctx.contexts.slots).remove(name) else {
        return conn
            .send_error(ErrorKind::NotFound, format!("no context named `{name}` (list them with `forkd contexts`)"));
    };
    if let Some(mut interp) = lock(&slot).take() {
        killpg(interp.pid);
        let _ = interp.exit.wait();
    }
    conn.send_body(response::Body::ContextClosed(Empty {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_tolerate_garbage() {
        let frame = encode(&[(b'c', b"print(1)"), (b'x', "é".as_bytes())]);
        let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let fields = decode(&frame[4..4 + len]);
        assert_eq!(fields[&b'c'], "print(1)");
        assert_eq!(fields[&b'x'], "é");
        // A truncated record keeps what there is.
        assert_eq!(decode(&[b'v', 0, 0, 0, 9, b'a'])[&b'v'], "a");
        assert!(decode(&[1, 2]).is_empty());
    }

    #[test]
    fn context_names() {
        for ok in ["main", "a-b_c.1", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "a b", "../x", "a/b", &"x".repeat(65), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
