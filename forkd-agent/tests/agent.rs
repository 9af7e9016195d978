//! Runs the real agent binary on the host (`--listen unix:...`) and drives it with the client.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use forkd_agent::client::{AgentAddr, AgentClient, ClientError, ExitStatus, Stream};
use forkd_agent::proto::{self, request, response, ErrorKind, ExecRequest, FileType, Request, Response};

struct Agent {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_forkd-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .spawn()
            .expect("spawn forkd-agent");
        let agent = Agent { child, sock, dir };
        agent.addr().wait_ready(Duration::from_secs(10)).expect("agent did not come up");
        agent
    }

    fn addr(&self) -> AgentAddr {
        AgentAddr::Unix(self.sock.clone())
    }

    fn client(&self) -> AgentClient<UnixStream> {
        self.addr().connect(Duration::from_secs(5)).expect("connect")
    }

    fn exec(&self, req: ExecRequest) -> forkd_agent::client::ExecOutput {
        self.client().exec_capture(req, None).expect("exec")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The agent process is still running and answering.
    fn assert_healthy(&mut self) {
        assert!(self.child.try_wait().expect("try_wait").is_none(), "agent exited");
        self.client().ping().expect("ping after the previous test step");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// Deterministic pseudo-random bytes (xorshift), so data is incompressible and checkable.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn group_alive(pgid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-(pgid as i32), 0) == 0 }
}

fn wait_group_gone(pgid: u32, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if !group_alive(pgid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !group_alive(pgid)
}

#[test]
fn ping_reports_version_and_pid() {
    let agent = Agent::start();
    let pong = agent.client().ping().unwrap();
    assert_eq!(pong.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(pong.protocol_version, proto::PROTOCOL_VERSION);
    assert_eq!(pong.pid, agent.child.id());
    assert!(pong.uptime_ms > 0);
}

#[test]
fn exec_streams_stdout_stderr_and_exit_code() {
    let agent = Agent::start();
    let out = agent.exec(sh("echo out; echo err >&2; exit 3"));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.outcome.status, ExitStatus::Exited(3));
    assert_eq!(out.outcome.code(), Some(3));
    assert!(!out.outcome.success());
    assert!(out.outcome.pid > 0);

    let ok = agent.exec(ExecRequest::new(["true"]));
    assert!(ok.outcome.success());
}

#[test]
fn exec_reports_signal() {
    let agent = Agent::start();
    let out = agent.exec(sh("kill -TERM $$"));
    assert_eq!(out.outcome.status, ExitStatus::Signaled(libc::SIGTERM));
}

#[test]
fn exec_env_and_cwd() {
    let agent = Agent::start();
    let out = agent
        .exec(sh("echo \"$FOO|$HOME|$PATH\"; pwd").env("FOO", "bar baz").cwd(agent.dir.path().display().to_string()));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "bar baz|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let pwd = lines.next().unwrap();
    assert_eq!(std::fs::canonicalize(pwd).unwrap(), std::fs::canonicalize(agent.dir.path()).unwrap());

    let err = agent.client().exec_capture(ExecRequest::new(["true"]).cwd("/no/such/dir"), None).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::NotFound));
    assert!(err.to_string().contains("working directory does not exist: /no/such/dir"), "{err}");
}

#[test]
fn stdin_round_trip_through_cat() {
    let agent = Agent::start();
    let data = noise(3 << 20, 7);
    let out = agent.client().exec_capture(ExecRequest::new(["cat"]), Some(data.clone())).unwrap();
    assert!(out.outcome.success());
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat output differs from its input");

    // Small stdin, and a program that never reads its stdin.
    let out = agent.client().exec_capture(ExecRequest::new(["wc", "-c"]), Some(b"hello".to_vec())).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
    let out = agent.client().exec_capture(ExecRequest::new(["true"]), Some(noise(8 << 20, 3))).unwrap();
    assert!(out.outcome.success());
}

#[test]
fn timeout_kills_the_process_group() {
    let mut agent = Agent::start();
    let start = Instant::now();
    let out = agent.exec(sh("sleep 30 & sleep 30").timeout(Duration::from_millis(300)));
    assert_eq!(out.outcome.status, ExitStatus::TimedOut);
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(
        wait_group_gone(out.outcome.pid, Duration::from_secs(2)),
        "process group {} still alive after the timeout",
        out.outcome.pid
    );
    agent.assert_healthy();
}

#[test]
fn background_child_holding_pipes_does_not_block_exit() {
    let agent = Agent::start();
    let start = Instant::now();
    let out = agent.exec(sh("sleep 3 & echo done"));
    assert_eq!(out.stdout, b"done\n");
    assert!(out.outcome.success());
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
}

#[test]
fn missing_binary_is_a_clear_error() {
    let mut agent = Agent::start();
    let err = agent.client().exec_capture(ExecRequest::new(["/no/such/binary"]), None).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::NotFound));
    assert!(err.to_string().contains("no such file or directory: /no/such/binary"), "{err}");

    let err = agent.client().exec_capture(ExecRequest::new(["no-such-command-xyz"]), None).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::NotFound));
    assert!(err.to_string().contains("command not found: no-such-command-xyz"), "{err}");

    let err = agent.client().exec_capture(ExecRequest::new(Vec::<String>::new()), None).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::InvalidArgument));
    agent.assert_healthy();
}

#[test]
fn large_output_is_intact() {
    let agent = Agent::start();
    let out = agent.exec(sh("seq 1 1000000; seq 1 300000 >&2"));
    let expect = |n: u32| -> Vec<u8> { (1..=n).flat_map(|i| format!("{i}\n").into_bytes()).collect() };
    assert!(out.outcome.success());
    assert_eq!(out.stdout.len(), expect(1_000_000).len());
    assert!(out.stdout == expect(1_000_000), "stdout corrupted");
    assert!(out.stderr == expect(300_000), "stderr corrupted");

    // Chunks are bounded by the protocol's output chunk size.
    let mut max_chunk = 0;
    let mut total = 0;
    let outcome = agent
        .client()
        .exec(ExecRequest::new(["head", "-c", "5000000", "/dev/zero"]), None::<std::io::Empty>, |s, d| {
            assert_eq!(s, Stream::Stdout);
            max_chunk = max_chunk.max(d.len());
            total += d.len();
        })
        .unwrap();
    assert!(outcome.success());
    assert_eq!(total, 5_000_000);
    assert!(max_chunk <= proto::OUTPUT_CHUNK);
}

#[test]
fn write_and_read_file_round_trip() {
    let agent = Agent::start();
    let data = noise(5 << 20, 42);
    let path = agent.path("a/b/c/data.bin");
    let n = agent.client().write_file(&path, 0o600, true, data.as_slice()).unwrap();
    assert_eq!(n, data.len() as u64);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert!(std::fs::read(&path).unwrap() == data);

    let back = agent.client().read_file(&path).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "read_file returned different bytes");

    // Overwrite with something shorter: truncates.
    agent.client().write_file(&path, 0, false, &b"short"[..]).unwrap();
    assert_eq!(agent.client().read_file(&path).unwrap(), b"short");

    // Empty file.
    let empty = agent.path("empty");
    agent.client().write_file(&empty, 0, false, std::io::empty()).unwrap();
    assert_eq!(agent.client().read_file(&empty).unwrap(), b"");
}

#[test]
fn file_errors_are_typed() {
    let mut agent = Agent::start();
    let err = agent.client().read_file(&agent.path("missing")).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::NotFound), "{err}");
    assert!(err.to_string().contains("no such file or directory"), "{err}");

    let err = agent.client().read_file(&agent.dir.path().display().to_string()).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::InvalidArgument), "{err}");
    assert!(err.to_string().contains("use list_dir"), "{err}");

    let err = agent.client().write_file("relative/path", 0, false, &b"x"[..]).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::InvalidArgument), "{err}");

    // Missing parent without create_parents, with a multi-chunk body the agent must drain.
    let err = agent.client().write_file(&agent.path("nodir/file"), 0, false, noise(1 << 20, 1).as_slice()).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::NotFound), "{err}");
    assert!(err.to_string().contains("create_parents"), "{err}");

    std::fs::write(agent.path("plain"), b"x").unwrap();
    let err = agent.client().list_dir(&agent.path("plain")).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::InvalidArgument), "{err}");
    agent.assert_healthy();
}

#[test]
fn list_dir_reports_entries() {
    let agent = Agent::start();
    let d = agent.dir.path().join("listing");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("file.txt"), b"12345").unwrap();
    std::fs::set_permissions(d.join("file.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink("file.txt", d.join("link")).unwrap();
    for i in 0..2500 {
        std::fs::write(d.join(format!("many-{i:05}")), b"").unwrap();
    }

    let entries = agent.client().list_dir(&d.display().to_string()).unwrap();
    assert_eq!(entries.len(), 2503);
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
    let f = get("file.txt");
    assert_eq!(f.kind(), FileType::File);
    assert_eq!(f.size, 5);
    assert_eq!(f.mode, 0o640);
    assert!(f.mtime > 1_600_000_000);
    assert_eq!(get("sub").kind(), FileType::Dir);
    assert_eq!(get("link").kind(), FileType::Symlink);
}

#[test]
fn concurrent_execs() {
    let agent = Agent::start();
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let agent = &agent;
                s.spawn(move || {
                    let out = agent.exec(sh(&format!("sleep 0.5; echo {i}")));
                    assert!(out.outcome.success());
                    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{i}\n"));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "8 x 0.5 s took {:?}: execs were not concurrent",
        start.elapsed()
    );
}

#[test]
fn disconnect_mid_exec_kills_process_and_agent_survives() {
    let mut agent = Agent::start();
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    proto::write_msg(&mut s, &Request::new(request::Body::Exec(sh("sleep 30 & sleep 30")))).unwrap();
    let mut r = proto::FrameReader::new(s.try_clone().unwrap());
    let pid = match r.read_msg::<Response>().unwrap().and_then(|m| m.body) {
        Some(response::Body::Started(st)) => st.pid,
        other => panic!("expected Started, got {other:?}"),
    };
    assert!(group_alive(pid));
    drop(r);
    drop(s);
    assert!(wait_group_gone(pid, Duration::from_secs(3)), "process group survived the client disconnect");
    agent.assert_healthy();
}

/// Sends raw bytes, returns the agent's (single) reply.
fn raw_exchange(sock: &Path, bytes: &[u8]) -> Option<Response> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut r = proto::FrameReader::new(s);
    r.read_msg::<Response>().unwrap()
}

fn expect_protocol_error(resp: Option<Response>) -> String {
    match resp.and_then(|r| r.body) {
        Some(response::Body::Error(e)) => {
            assert_eq!(e.error_kind(), ErrorKind::Protocol, "{}", e.message);
            e.message
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn garbage_frames_get_an_error_and_do_not_crash_the_agent() {
    let mut agent = Agent::start();
    let msg = expect_protocol_error(raw_exchange(&agent.sock, b"\x04\x00\x00\x00\x00"));
    assert!(msg.contains("bad request frame"), "{msg}");
    // Huge length prefix.
    let mut big = Vec::new();
    prost::encode_length_delimiter(1 << 30, &mut big).unwrap();
    let msg = expect_protocol_error(raw_exchange(&agent.sock, &big));
    assert!(msg.contains("exceeds"), "{msg}");
    // Endless varint.
    expect_protocol_error(raw_exchange(&agent.sock, &[0xff; 32]));
    // Truncated frame.
    expect_protocol_error(raw_exchange(&agent.sock, &[50, 1, 2, 3]));
    // Valid frame, but stdin data without an exec.
    let mut buf = Vec::new();
    proto::write_msg(&mut buf, &Request::new(request::Body::StdinData(proto::Data { data: vec![1] }))).unwrap();
    expect_protocol_error(raw_exchange(&agent.sock, &buf));
    // Text.
    expect_protocol_error(raw_exchange(&agent.sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    // Connect and close without a byte.
    drop(UnixStream::connect(&agent.sock).unwrap());
    // Exec followed by a bogus frame.
    let mut buf = Vec::new();
    proto::write_msg(&mut buf, &Request::new(request::Body::Exec(ExecRequest::new(["sleep", "30"])))).unwrap();
    proto::write_msg(&mut buf, &Request::new(request::Body::Ping(proto::Ping {}))).unwrap();
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&buf).unwrap();
    let mut r = proto::FrameReader::new(s);
    let mut got_error = false;
    while let Ok(Some(m)) = r.read_msg::<Response>() {
        if let Some(response::Body::Error(e)) = m.body {
            assert_eq!(e.error_kind(), ErrorKind::Protocol);
            got_error = true;
        }
    }
    assert!(got_error);
    agent.assert_healthy();
}

#[test]
fn reseed_validates_and_counts() {
    let agent = Agent::start();
    let err = agent.client().reseed(&[1, 2, 3], None).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::InvalidArgument), "{err}");
    let before = agent.client().ping().unwrap().reseeds;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match agent.client().reseed(&noise(64, 99), None) {
        Ok(()) => {
            assert_eq!(agent.client().ping().unwrap().reseeds, before + 1);
        }
        Err(e) if !root => assert_eq!(e.agent_kind(), Some(ErrorKind::Permission), "{e}"),
        Err(e) => panic!("reseed failed as root: {e}"),
    }
}

#[test]
fn prepare_branch_is_answered_and_the_agent_keeps_serving() {
    // On the host there is no /proc/sys/vm/forkd_slab_quiesce (a forkd guest kernel has it):
    // the agent answers, skips the drain quietly and keeps serving.
    let mut agent = Agent::start();
    for _ in 0..3 {
        agent.client().prepare_branch().unwrap();
    }
    agent.assert_healthy();
}

/// A stand-in for the VMM's vsock Unix socket: answers the handshake with `reply` and then
/// (if it is OK) proxies to the agent.
fn fake_vmm(dir: &Path, agent_sock: PathBuf, reply: Option<&'static str>) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("vmm-{n}.sock"));
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut host) = conn else { return };
            let agent_sock = agent_sock.clone();
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while host.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert_eq!(line, b"CONNECT 1024");
                let Some(reply) = reply else {
                    std::thread::sleep(Duration::from_secs(3));
                    return;
                };
                host.write_all(reply.as_bytes()).unwrap();
                if !reply.starts_with("OK") {
                    return;
                }
                let guest = UnixStream::connect(&agent_sock).unwrap();
                let (mut g2, mut h2) = (guest.try_clone().unwrap(), host.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut h2, &mut g2);
                    let _ = g2.shutdown(std::net::Shutdown::Write);
                });
                let (mut g, mut h) = (guest, host);
                let _ = std::io::copy(&mut g, &mut h);
                let _ = h.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    path
}

#[test]
fn vsock_handshake_and_its_errors() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();

    let ok = fake_vmm(dir.path(), agent.sock.clone(), Some("OK 1073741824\n"));
    let addr = AgentAddr::vsock(&ok, 1024);
    addr.wait_ready(Duration::from_secs(5)).unwrap();
    let out = addr
        .connect(Duration::from_secs(5))
        .unwrap()
        .exec_capture(sh("echo via-vsock"), Some(b"ignored".to_vec()))
        .unwrap();
    assert_eq!(out.stdout, b"via-vsock\n");

    let missing = dir.path().join("nope.sock");
    let err = forkd_agent::client::connect_vsock_uds(&missing, 1024, Duration::from_secs(1)).unwrap_err();
    assert!(matches!(err, ClientError::SocketMissing { .. }), "{err}");
    assert!(err.to_string().contains("is the sandbox running"), "{err}");

    let garbage = fake_vmm(dir.path(), agent.sock.clone(), Some("HTTP/1.1 400 Bad\n"));
    let err = forkd_agent::client::connect_vsock_uds(&garbage, 1024, Duration::from_secs(2)).unwrap_err();
    assert!(matches!(err, ClientError::Handshake { .. }), "{err}");

    let closed = fake_vmm(dir.path(), agent.sock.clone(), Some(""));
    let err = forkd_agent::client::connect_vsock_uds(&closed, 1024, Duration::from_secs(2)).unwrap_err();
    assert!(matches!(err, ClientError::HandshakeClosed { .. }), "{err}");

    let silent = fake_vmm(dir.path(), agent.sock.clone(), None);
    let start = Instant::now();
    let err = forkd_agent::client::connect_vsock_uds(&silent, 1024, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));

    // A stale socket file with no server behind it.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let err = forkd_agent::client::connect_vsock_uds(&stale, 1024, Duration::from_secs(1)).unwrap_err();
    assert!(matches!(err, ClientError::Refused { .. }), "{err}");
}

#[test]
fn children_start_with_default_signals_in_their_own_group() {
    let agent = Agent::start();
    let out = agent.exec(ExecRequest::new(["cat", "/proc/self/status"]));
    let status = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(field("SigBlk:"), 0, "signal mask leaked into the child");
    let sigpipe_bit = 1u64 << (libc::SIGPIPE - 1);
    assert_eq!(field("SigIgn:") & sigpipe_bit, 0, "SIGPIPE still ignored");

    let out = agent.exec(ExecRequest::new(["cat", "/proc/self/stat"]));
    let stat = String::from_utf8(out.stdout).unwrap();
    // pid (comm) state ppid pgrp ...
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let pid: u32 = stat.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(fields[2].parse::<u32>().unwrap(), pid, "not a process group leader");
    assert_eq!(pid, out.outcome.pid);

    // Only stdio is passed on: no agent socket or pipe leaks into children. (Fds the agent
    // itself inherited without O_CLOEXEC, e.g. from a test harness, pass through as usual.)
    let agent_pid = agent.child.id();
    let inherited: Vec<u32> = std::fs::read_dir(format!("/proc/{agent_pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(e.path()).ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            let flags = u32::from_str_radix(flags.trim(), 8).ok()?;
            (fd > 2 && flags & libc::O_CLOEXEC as u32 == 0).then_some(fd)
        })
        .collect();
    let out = agent.exec(ExecRequest::new(["ls", "/proc/self/fd"]));
    let extra: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .filter(|fd| *fd > 2 && !inherited.contains(fd))
        .collect();
    // What remains is the directory fd `ls` itself opened.
    assert_eq!(extra.len(), 1, "leaked fds: {extra:?} (agent-inherited: {inherited:?})");
}

#[test]
fn exec_permission_and_format_errors() {
    let mut agent = Agent::start();
    let not_exec = agent.path("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = agent.client().exec_capture(ExecRequest::new([not_exec.as_str()]), None).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::Permission), "{err}");
    assert!(err.to_string().contains("chmod +x"), "{err}");

    let garbage = agent.path("garbage-exe");
    std::fs::write(&garbage, [0u8, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = agent.client().exec_capture(ExecRequest::new([garbage.as_str()]), None).unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::InvalidArgument), "{err}");
    assert!(err.to_string().contains("exec format error"), "{err}");

    // A script with a working #! line runs.
    let script = agent.path("script");
    std::fs::write(&script, "#!/bin/sh\necho \"args: $*\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = agent.exec(ExecRequest::new([script.as_str(), "a", "b c"]));
    assert_eq!(out.stdout, b"args: a b c\n");
    agent.assert_healthy();
}

/// A snippet's result and output, for the context tests.
struct Evaluated {
    done: proto::EvalDone,
    stdout: String,
    stderr: String,
}

fn eval(agent: &Agent, context: &str, code: &str, timeout_ms: u64) -> Evaluated {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let req = proto::EvalRequest { context: context.into(), code: code.into(), timeout_ms, ..Default::default() };
    let done = agent
        .client()
        .eval(req, |stream, data| match stream {
            Stream::Stdout => stdout.extend_from_slice(data),
            Stream::Stderr => stderr.extend_from_slice(data),
        })
        .unwrap_or_else(|e| panic!("eval {code:?}: {e}"));
    Evaluated { done, stdout: String::from_utf8_lossy(&stdout).into(), stderr: String::from_utf8_lossy(&stderr).into() }
}

#[test]
fn code_contexts_keep_state_report_values_errors_and_timeouts() {
    let mut agent = Agent::start();
    let first = eval(&agent, "", "import math\nx = 40\nprint('hello')\nx + 2", 0);
    assert!(first.done.created && first.done.error.is_none(), "{:?}", first.done);
    assert_eq!(
        (first.stdout.as_str(), first.done.value.as_deref(), first.done.json.as_deref()),
        ("hello\n", Some("42"), Some("42"))
    );
    // State persists; a value that is not JSON still has its repr.
    let second = eval(&agent, "main", "x += 1; {'x': x, 'pi': round(math.pi, 2)}", 0);
    assert!(!second.done.created);
    assert_eq!(second.done.json.as_deref(), Some("{\"x\": 41, \"pi\": 3.14}"));
    let set = eval(&agent, "main", "{1, 2}", 0);
    assert_eq!((set.done.value.as_deref(), set.done.json), (Some("{1, 2}"), None));
    // An exception: its traceback names the snippet's line, and the context lives on.
    let failed = eval(&agent, "main", "y = 1\nraise ValueError('no good')", 0);
    let error = failed.done.error.expect("an error");
    assert_eq!((error.name.as_str(), error.message.as_str()), ("ValueError", "no good"));
    assert!(error.traceback.contains("line 2") && !error.traceback.contains("_forkd_context"), "{}", error.traceback);
    assert_eq!(eval(&agent, "main", "x", 0).done.value.as_deref(), Some("41"));
    // stderr and a syntax error.
    let warned = eval(&agent, "main", "import sys; sys.stderr.write('careful\\n')", 0);
    assert_eq!(warned.stderr, "careful\n");
    let syntax = eval(&agent, "main", "def (", 0);
    assert_eq!(syntax.done.error.map(|e| e.name).as_deref(), Some("SyntaxError"));
    // A timeout interrupts an endless loop; the context still has its state.
    let started = Instant::now();
    let looped = eval(&agent, "main", "while True: pass", 500);
    assert!(looped.done.timed_out, "{:?}", looped.done);
    assert_eq!(looped.done.error.map(|e| e.name).as_deref(), Some("KeyboardInterrupt"));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(eval(&agent, "main", "x", 0).done.value.as_deref(), Some("41"));
    // Two contexts are independent.
    let other = eval(&agent, "other", "x = 'other'; x", 0);
    assert!(other.done.created);
    assert_eq!(eval(&agent, "main", "x", 0).done.value.as_deref(), Some("41"));
    // A crashed interpreter is reported, and the next snippet starts a new one.
    let crashed = eval(&agent, "other", "import os; os._exit(3)", 0);
    let lost = crashed.done.error.expect("an error");
    assert!(lost.name == "ContextLost" && lost.message.contains("status 3"), "{lost:?}");
    let fresh = eval(&agent, "other", "'x' in dir()", 0);
    assert!(fresh.done.restarted || fresh.done.created, "{:?}", fresh.done);
    assert_eq!(fresh.done.value.as_deref(), Some("False"));
    // Listing and closing.
    let names: Vec<String> = agent.client().list_contexts().unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["main", "other"]);
    agent.client().close_context("other").unwrap();
    match agent.client().close_context("other") {
        Err(ClientError::Agent { kind: ErrorKind::NotFound, .. }) => {}
        other => panic!("closing an unknown context: {other:?}"),
    }
    agent.assert_healthy();
}

#[test]
fn bad_snippets_get_clear_errors() {
    let mut agent = Agent::start();
    let bad = |req: proto::EvalRequest| agent.client().eval(req, |_, _| {}).expect_err("refused");
    let err = bad(proto::EvalRequest { context: "no spaces".into(), code: "1".into(), ..Default::default() });
    assert!(matches!(err, ClientError::Agent { kind: ErrorKind::InvalidArgument, .. }), "{err}");
    let err = bad(proto::EvalRequest { lang: "cobol".into(), code: "1".into(), ..Default::default() });
    assert!(matches!(err, ClientError::Agent { kind: ErrorKind::Unsupported, .. }), "{err}");
    let err = bad(proto::EvalRequest { code: "x".repeat(2 << 20), ..Default::default() });
    assert!(matches!(err, ClientError::Agent { kind: ErrorKind::InvalidArgument, .. }), "{err}");
    // NUL bytes reach Python, which refuses them as the snippet's own error.
    let nul = eval(&agent, "main", "1\u{0}2", 0);
    assert!(nul.done.error.is_some(), "{:?}", nul.done);
    agent.assert_healthy();
}
