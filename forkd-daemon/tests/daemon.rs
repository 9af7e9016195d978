//! Integration tests against a real `forkd daemon` process with real KVM microVMs, no mocks.
//!
//! One daemon per test binary (temp state dir, temp socket, a TCP listener with a token) and
//! ONE booted sandbox (a template named `base`); every other sandbox is a BRANCH child of it
//! (milliseconds). Tests share the daemon under a read lock; the kill -9 test takes the write
//! lock, kills and restarts it. Everything is removed at exit. Needs root and /dev/kvm and
//! fails loudly without them.

use forkd_client::grpc::{pb, Connection as Client, Target};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

const TOKEN: &str = "test-token-0123456789abcdef";
const TEMPLATE: &str = "base";

struct Env {
    state: PathBuf,
    socket: PathBuf,
    tcp: String,
    source: String,
}

static ENV: OnceLock<Env> = OnceLock::new();
static DAEMON: Mutex<Option<Child>> = Mutex::new(None);
/// Read: a test using the daemon. Write: the test that kills and restarts it.
static GATE: RwLock<()> = RwLock::new(());

fn forkd_bin() -> PathBuf {
    let bin = std::env::var_os("FORKD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/forkd"));
    assert!(
        bin.is_file(),
        "no forkd binary at {}; run `cargo build --release -p forkd-cli` (or set FORKD_BIN)",
        bin.display()
    );
    bin
}

fn images_dir() -> PathBuf {
    std::env::var_os("FORKD_TEST_IMAGES").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/forkd/images"))
}

fn require_host() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "daemon integration tests boot KVM microVMs and must run as root");
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("daemon integration tests need a usable /dev/kvm: {e}");
    }
    assert!(
        images_dir().join("tiny").join("manifest.json").is_file(),
        "no tiny image under {}; run scripts/setup.sh --no-demo (or set FORKD_TEST_IMAGES)",
        images_dir().display()
    );
}

fn spawn_daemon(state: &Path, socket: &Path, tcp: &str) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(state.join("daemon.log")).expect("daemon log");
    Command::new(forkd_bin())
        .args(["daemon", "--socket"])
        .arg(socket)
        .args(["--tcp", tcp, "--token-file"])
        .arg(state.join("token"))
        .env("FORKD_STATE_DIR", state)
        .env_remove("FORKD_SOCKET")
        .stdin(Stdio::null())
        // Not a pipe: VMM processes inherit it and outlive the daemon.
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn forkd daemon")
}

fn daemon_log(state: &Path) -> String {
    let text = std::fs::read_to_string(state.join("daemon.log")).unwrap_or_default();
    text[text.len().saturating_sub(4000)..].to_string()
}

/// Waits until the daemon answers `GET /healthz` on its socket.
fn wait_ready(state: &Path, socket: &Path) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nhost: forkd\r\nconnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the daemon did not become ready in 60 s; its log:\n{}", daemon_log(state));
}

extern "C" fn cleanup() {
    if let Some(env) = ENV.get() {
        let _ = Command::new(forkd_bin())
            .args(["rm", "--all"])
            .env("FORKD_STATE_DIR", &env.state)
            .env("FORKD_SOCKET", &env.socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if let Ok(mut guard) = DAEMON.lock() {
        if let Some(mut child) = guard.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    if let Some(env) = ENV.get() {
        let _ = std::fs::remove_dir_all(&env.state);
    }
}

fn block<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime").block_on(f)
}

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        require_host();
        let state = tempfile::Builder::new().prefix("forkd-daemon-test-").tempdir().expect("temp dir").keep();
        std::os::unix::fs::symlink(images_dir(), state.join("images")).expect("link images");
        std::fs::write(state.join("token"), format!("{TOKEN}\n")).expect("token file");
        let socket = state.join("forkd.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let tcp = format!("127.0.0.1:{port}");
        *DAEMON.lock().unwrap_or_else(|e| e.into_inner()) = Some(spawn_daemon(&state, &socket, &tcp));
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { libc::atexit(cleanup) };
        wait_ready(&state, &socket);
        // The one boot of this binary, through the gRPC API, kept as a template.
        let source = block(async {
            let c = Client::connect(&Target::Unix(socket.clone())).await.expect("connect");
            let req = pb::CreateRequest { template_name: TEMPLATE.into(), ..Default::default() };
            c.sandboxes().create(req).await.map(|r| r.into_inner().id)
        })
        .unwrap_or_else(|e| panic!("booting the source sandbox failed: {e}\ndaemon log:\n{}", daemon_log(&state)));
        Env { state, socket, tcp, source }
    })
}

async fn client() -> Client {
    Client::connect(&Target::Unix(env().socket.clone())).await.expect("connect to the daemon")
}

async fn branch(c: &Client, id: &str, count: i64) -> Vec<String> {
    let req = pb::BranchRequest { id: id.into(), count: Some(count), limits: None };
    let resp = c.sandboxes().branch(req).await.expect("branch").into_inner();
    assert_eq!(resp.source, id);
    assert!(resp.pause_ms > 0.0 && resp.pause_ms < 1000.0, "pause {} ms", resp.pause_ms);
    resp.children.into_iter().map(|c| c.id).collect()
}

async fn sh(c: &Client, id: &str, script: &str) -> (i32, String, String) {
    let (exit, out, err) = c.exec(id, ["sh", "-c", script]).await.unwrap_or_else(|e| panic!("exec in {id}: {e}"));
    (exit.exit_code, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned())
}

async fn delete(c: &Client, id: &str) {
    c.sandboxes().delete(pb::DeleteRequest { id: id.into() }).await.expect("delete");
}

fn status_of(r: Result<impl Sized, tonic::Status>) -> (tonic::Code, String) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

/// One HTTP/1.1 request over `io`: (status, body).
async fn http_on<IO>(io: IO, method: &str, path: &str, body: Vec<u8>, token: Option<&str>) -> (u16, Vec<u8>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.expect("http handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "forkd")
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = send.send_request(req.body(Full::new(bytes::Bytes::from(body))).expect("request")).await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes().to_vec();
    (status, body)
}

async fn rest(method: &str, path: &str, body: impl Into<Vec<u8>>) -> (u16, Value) {
    let io = tokio::net::UnixStream::connect(&env().socket).await.expect("connect");
    let (status, body) = http_on(io, method, path, body.into(), None).await;
    let value = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    (status, value)
}

/// Checks the daemon still serves: health (gRPC and REST) and a command in the source.
async fn assert_healthy(c: &Client) {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut health = HealthClient::new(c.channel());
    let resp = health.check(HealthCheckRequest { service: String::new() }).await.expect("health check");
    assert_eq!(resp.into_inner().status, 1, "SERVING");
    assert_eq!(rest("GET", "/healthz", "").await.0, 200);
    let (code, out, _) = sh(c, &env().source, "echo alive").await;
    assert_eq!((code, out.trim()), (0, "alive"));
}

#[test]
fn grpc_create_exec_branch_delete() {
    let env = env();
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    block(async {
        let c = client().await;
        let info = c.sandboxes().get(pb::GetRequest { id: env.source.clone(), include_memory: true }).await;
        let info = info.expect("get").into_inner();
        assert_eq!((info.state, info.template.as_str(), info.image.as_str()), (1, TEMPLATE, "tiny"));
        assert!(info.memory.is_some_and(|m| m.rss_kib > 0));
        assert_eq!(info.network.expect("network").mode, pb::NetworkMode::None as i32);

        // A child with state of its own, then branched again: grandchildren see that state.
        let child = branch(&c, &env.source, 1).await.remove(0);
        let (code, out, err) = sh(&c, &child, "echo out; echo err >&2; echo v1 > /root/f; exit 3").await;
        assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
        let req = pb::ExecRequest {
            id: child.clone(),
            args: vec!["sh".into(), "-c".into(), "cat; echo \" $FOO $PWD\"".into()],
            env: vec!["FOO=bar".into()],
            cwd: "/root".into(),
            stdin: Some(b"from-stdin".to_vec()),
            ..Default::default()
        };
        let (exit, out, _) = c.exec_request(req).await.expect("exec with stdin");
        assert_eq!((exit.exit_code, String::from_utf8_lossy(&out).trim()), (0, "from-stdin bar /root"));

        let grandchildren = branch(&c, &child, 2).await;
        assert_eq!(grandchildren.len(), 2);
        for g in &grandchildren {
            let got = c.sandboxes().get(pb::GetRequest { id: g.clone(), include_memory: false }).await;
            assert_eq!(got.expect("get child").into_inner().parent, child);
            assert_eq!(sh(&c, g, "cat /root/f").await.1.trim(), "v1");
        }
        let listed: Vec<String> = c
            .sandboxes()
            .list(pb::ListRequest::default())
            .await
            .expect("list")
            .into_inner()
            .sandboxes
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert!(grandchildren.iter().chain([&child]).all(|id| listed.contains(id)), "{listed:?}");

        for id in grandchildren.iter().chain([&child]) {
            delete(&c, id).await;
        }
        let (code, _) = status_of(c.sandboxes().get(pb::GetRequest { id: child.clone(), include_memory: false }).await);
        assert_eq!(code, tonic::Code::NotFound);

        // Files: chunked upload and download.
        let child = branch(&c, &env.source, 1).await.remove(0);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<pb::WriteFileRequest> = std::iter::once(pb::WriteFileRequest {
            id: child.clone(),
            path: "/root/blob".into(),
            mode: 0o600,
            data: Vec::new(),
        })
        .chain(data.chunks(70_000).map(|d| pb::WriteFileRequest { data: d.to_vec(), ..Default::default() }))
        .collect();
        let written = c.sandboxes().write_file(tokio_stream::iter(chunks)).await.expect("write file").into_inner();
        assert_eq!(written.bytes_written, data.len() as u64);
        let mut stream = c
            .sandboxes()
            .read_file(pb::ReadFileRequest { id: child.clone(), path: "/root/blob".into() })
            .await
            .expect("read file")
            .into_inner();
        let mut back = Vec::new();
        while let Some(chunk) = stream.message().await.expect("chunk") {
            back.extend_from_slice(&chunk.data);
        }
        assert!(back == data, "read back {} bytes, not the {} written", back.len(), data.len());
        let images = c.images().list(pb::ListImagesRequest {}).await.expect("images").into_inner().images;
        assert!(images.iter().any(|i| i.name == "tiny"), "{images:?}");
        delete(&c, &child).await;
    });
}

#[test]
fn rest_mirror_create_exec_branch_delete() {
    env();
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    block(async {
        // Create through REST forks the template (a create that costs a BRANCH, not a boot).
        let (status, created) = rest("POST", "/v1/sandboxes", json!({ "from_template": TEMPLATE }).to_string()).await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().expect("id").to_string();
        assert_eq!(created["state"], "running");
        assert_eq!(created["network"]["mode"], "none");

        let (status, got) = rest("GET", &format!("/v1/sandboxes/{id}"), "").await;
        assert_eq!((status, got["id"].as_str()), (200, Some(id.as_str())));
        assert!(got["memory"]["pss_kib"].as_u64().is_some(), "{got}");

        let body = json!({ "args": ["sh", "-c", "echo hi; echo oops >&2; exit 4"], "env": {"A": "1"} });
        let (status, out) = rest("POST", &format!("/v1/sandboxes/{id}/exec"), body.to_string()).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            (out["exit_code"].as_i64(), out["stdout"].as_str(), out["stderr"].as_str()),
            (Some(4), Some("hi\n"), Some("oops\n"))
        );

        // The children get their own limits where the request names some; the rest stay the source's.
        let body = r#"{"count": 2, "limits": {"cpus": 0.5, "pids": 256}}"#;
        let (status, branched) = rest("POST", &format!("/v1/sandboxes/{id}/branch"), body).await;
        assert_eq!(status, 200, "{branched}");
        for child in branched["children"].as_array().expect("children") {
            assert_eq!((child["limits"]["cpus"].as_f64(), child["limits"]["pids"].as_u64()), (Some(0.5), Some(256)));
        }
        let (status, got) =
            rest("GET", &format!("/v1/sandboxes/{}", branched["children"][0]["id"].as_str().unwrap_or_default()), "")
                .await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["resources"]["cpu_limit"].as_f64(), Some(0.5), "the child's cgroup quota: {got}");
        let (status, bad) = rest("POST", &format!("/v1/sandboxes/{id}/branch"), r#"{"limits": {"cpu": 1}}"#).await;
        assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_argument")), "{bad}");
        let children: Vec<String> = branched["children"]
            .as_array()
            .expect("children")
            .iter()
            .map(|c| c["id"].as_str().expect("id").to_string())
            .collect();
        assert_eq!(children.len(), 2);
        assert!(branched["pause_ms"].as_f64().is_some_and(|p| p > 0.0));
        let (status, list) = rest("GET", "/v1/sandboxes", "").await;
        assert_eq!(status, 200);
        let listed: Vec<&str> =
            list["sandboxes"].as_array().expect("list").iter().filter_map(|s| s["id"].as_str()).collect();
        assert!(children.iter().all(|c| listed.contains(&c.as_str())));

        let (_, out) =
            rest("POST", &format!("/v1/sandboxes/{}/exec", children[0]), r#"{"args": ["echo", "child"]}"#).await;
        assert_eq!(out["stdout"], "child\n");

        let (status, metrics) = rest("GET", "/metrics", "").await;
        let metrics = metrics.as_str().unwrap_or_default().to_string();
        assert_eq!(status, 200);
        for series in [
            "forkd_sandboxes{state=\"running\"}",
            "forkd_branches_total",
            "forkd_branch_pause_seconds_bucket",
            "forkd_errors_total",
        ] {
            assert!(metrics.contains(series), "no {series} in /metrics");
        }

        for s in children.iter().chain([&id]) {
            let (status, body) = rest("DELETE", &format!("/v1/sandboxes/{s}"), "").await;
            assert_eq!((status, body["deleted"].as_bool()), (200, Some(true)), "{body}");
        }
        let (status, body) = rest("GET", &format!("/v1/sandboxes/{id}"), "").await;
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    });
}

#[test]
fn watch_sees_created_branched_destroyed() {
    let env = env();
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    block(async {
        let c = client().await;
        let mut events = c.sandboxes().watch(pb::WatchRequest::default()).await.expect("watch").into_inner();
        let mut filtered = c
            .sandboxes()
            .watch(pb::WatchRequest { id: env.source.clone() })
            .await
            .expect("filtered watch")
            .into_inner();
        let child = branch(&c, &env.source, 1).await.remove(0);
        delete(&c, &child).await;

        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen.contains(&"destroyed") {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = tokio::time::timeout(left, events.message())
                .await
                .expect("events in 30 s")
                .expect("stream")
                .expect("open");
            let subject = event.sandbox.as_ref().map(|s| s.id.clone()).unwrap_or_default();
            match pb::EventType::try_from(event.r#type) {
                Ok(pb::EventType::Created) if subject == child => {
                    assert_eq!(event.sandbox.as_ref().map(|s| s.parent.as_str()), Some(env.source.as_str()));
                    seen.push("created");
                }
                Ok(pb::EventType::Branched) if event.children.iter().any(|c| c.id == child) => {
                    assert_eq!(subject, env.source);
                    assert!(event.pause_ms > 0.0);
                    seen.push("branched");
                }
                Ok(pb::EventType::Destroyed) if subject == child => seen.push("destroyed"),
                _ => {} // other tests' sandboxes
            }
        }
        assert_eq!(seen, ["created", "branched", "destroyed"]);
        // The filtered watcher sees the BRANCH of its sandbox.
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), filtered.message())
                .await
                .expect("filtered event")
                .expect("stream")
                .expect("open");
            if e.children.iter().any(|c| c.id == child) {
                assert_eq!(e.r#type, pb::EventType::Branched as i32);
                break;
            }
        }
    });
}

#[test]
fn tcp_listener_requires_the_token() {
    let env = env();
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    block(async {
        for token in [None, Some("wrong-token-0123456789".to_string())] {
            let c = Client::connect(&Target::Tcp { addr: env.tcp.clone(), token: token.clone() })
                .await
                .expect("tcp connect");
            let (code, message) = status_of(c.sandboxes().list(pb::ListRequest::default()).await);
            assert_eq!(code, tonic::Code::Unauthenticated, "{token:?}: {message}");
            let err = c.exec(&env.source, ["true"]).await.expect_err("exec without a valid token");
            assert!(matches!(err, forkd_core::Error::Unauthenticated(_)), "{err}");
        }
        let c = Client::connect(&Target::Tcp { addr: env.tcp.clone(), token: Some(TOKEN.into()) }).await.expect("tcp");
        let list = c.sandboxes().list(pb::ListRequest::default()).await.expect("list with the token").into_inner();
        assert!(list.sandboxes.iter().any(|s| s.id == env.source));

        let tcp = || async { tokio::net::TcpStream::connect(&env.tcp).await.expect("tcp") };
        for token in [None, Some("nope-nope-nope-nope")] {
            let (status, body) = http_on(tcp().await, "GET", "/v1/sandboxes", Vec::new(), token).await;
            let body: Value = serde_json::from_slice(&body).expect("json error body");
            assert_eq!((status, body["code"].as_str()), (401, Some("unauthenticated")), "{body}");
        }
        let (status, _) = http_on(tcp().await, "GET", "/v1/sandboxes", Vec::new(), Some(TOKEN)).await;
        assert_eq!(status, 200);
        let (status, _) = http_on(tcp().await, "GET", "/healthz", Vec::new(), None).await;
        assert_eq!(status, 200, "health probes need no token");
        assert_healthy(&client().await).await;
    });
}

/// `ExecRequest` with `args` as raw bytes, to send what a `string` field must not hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawExecRequest {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(bytes = "vec", repeated, tag = "2")]
    args: Vec<Vec<u8>>,
}

#[test]
fn bad_requests_get_clean_errors_and_the_daemon_stays_healthy() {
    let env = env();
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    block(async {
        let c = client().await;
        let s = || c.sandboxes();
        let missing = "sb-000000000000".to_string();
        // Unknown and malformed ids.
        let (code, _) = status_of(s().get(pb::GetRequest { id: missing.clone(), include_memory: false }).await);
        assert_eq!(code, tonic::Code::NotFound);
        let (code, msg) = status_of(s().get(pb::GetRequest { id: "Not An Id".into(), include_memory: false }).await);
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(msg.starts_with("invalid id"), "{msg}");
        assert_eq!(status_of(s().delete(pb::DeleteRequest { id: missing.clone() }).await).0, tonic::Code::NotFound);
        let exec =
            s().exec(pb::ExecRequest { id: missing.clone(), args: vec!["true".into()], ..Default::default() }).await;
        assert_eq!(status_of(exec).0, tonic::Code::NotFound);
        // Negative, zero and huge counts name the field.
        for count in [-1, 0, 1001, i64::MAX, i64::MIN] {
            let (code, msg) = status_of(
                s().branch(pb::BranchRequest { id: env.source.clone(), count: Some(count), limits: None }).await,
            );
            assert_eq!(code, tonic::Code::InvalidArgument, "count {count}");
            assert!(msg.starts_with("invalid count"), "{msg}");
        }
        let zero_pids = pb::ResourceLimits { pids: Some(0), ..Default::default() };
        let req = pb::BranchRequest { id: env.source.clone(), count: None, limits: Some(zero_pids) };
        let (code, msg) = status_of(s().branch(req).await);
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(msg.starts_with("invalid limits"), "{msg}");
        // Empty argv, bad env, bad timeout, unknown network mode.
        let bad_execs = [
            pb::ExecRequest { id: env.source.clone(), ..Default::default() },
            pb::ExecRequest {
                id: env.source.clone(),
                args: vec!["true".into()],
                env: vec!["NOEQUALS".into()],
                ..Default::default()
            },
            pb::ExecRequest {
                id: env.source.clone(),
                args: vec!["true".into()],
                timeout_secs: -1.0,
                ..Default::default()
            },
        ];
        for req in bad_execs {
            assert_eq!(status_of(s().exec(req).await).0, tonic::Code::InvalidArgument);
        }
        let create =
            pb::CreateRequest { network: Some(pb::NetworkPolicy { mode: 9, allow: vec![] }), ..Default::default() };
        let (code, msg) = status_of(s().create(create).await);
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(msg.starts_with("invalid network.mode"), "{msg}");
        let create = pb::CreateRequest { from_template: "no-such-template".into(), ..Default::default() };
        assert_eq!(status_of(s().create(create).await).0, tonic::Code::NotFound);

        // Invalid UTF-8 in argv, sent as raw protobuf.
        let mut grpc = tonic::client::Grpc::new(c.channel());
        grpc.ready().await.expect("ready");
        let raw = RawExecRequest { id: env.source.clone(), args: vec![b"echo".to_vec(), vec![0xff, 0xfe, b'x']] };
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/forkd.v1.Sandboxes/Exec");
        let codec = tonic_prost::ProstCodec::<RawExecRequest, pb::ExecEvent>::default();
        let result = grpc.server_streaming(tonic::Request::new(raw), path, codec).await;
        let (code, msg) = status_of(result.map(|_| ()));
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(msg.starts_with("invalid args"), "{msg}");

        // The same through REST: JSON error bodies with HTTP codes.
        let src = &env.source;
        let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
            ("POST", "/v1/sandboxes".into(), b"{not json".to_vec(), 400, "body"),
            ("POST", "/v1/sandboxes".into(), br#"{"imagee": "tiny"}"#.to_vec(), 400, "imagee"),
            ("POST", "/v1/sandboxes".into(), br#"{"network": {"mode": "wifi"}}"#.to_vec(), 400, "network.mode"),
            ("POST", "/v1/sandboxes".into(), br#"{"vcpus": -2}"#.to_vec(), 400, "vcpus"),
            ("GET", format!("/v1/sandboxes/{missing}"), Vec::new(), 404, ""),
            ("DELETE", format!("/v1/sandboxes/{missing}"), Vec::new(), 404, ""),
            ("POST", format!("/v1/sandboxes/{missing}/exec"), br#"{"args": ["true"]}"#.to_vec(), 404, ""),
            ("POST", format!("/v1/sandboxes/{src}/branch"), br#"{"count": -5}"#.to_vec(), 400, "count"),
            ("POST", format!("/v1/sandboxes/{src}/branch"), br#"{"count": 100000000000}"#.to_vec(), 400, "count"),
            ("POST", format!("/v1/sandboxes/{src}/branch"), br#"{"count": 1e30}"#.to_vec(), 400, "count"),
            ("POST", format!("/v1/sandboxes/{src}/branch"), br#"{"count": "2"}"#.to_vec(), 400, "count"),
            (
                "POST",
                format!("/v1/sandboxes/{src}/exec"),
                b"{\"args\": [\"echo\", \"\xff\xfe\"]}".to_vec(),
                400,
                "args",
            ),
            ("POST", format!("/v1/sandboxes/{src}/exec"), br#"{"args": []}"#.to_vec(), 400, "argv"),
            ("POST", format!("/v1/sandboxes/{src}/exec"), br#""just a string""#.to_vec(), 400, "body"),
            ("GET", "/v1/nothing-here".into(), Vec::new(), 404, ""),
            ("PUT", "/v1/sandboxes".into(), Vec::new(), 405, ""),
        ];
        for (method, path, body, want, field) in cases {
            let (status, value) = rest(method, &path, body).await;
            assert_eq!(status, want, "{method} {path}: {value}");
            let error = value["error"].as_str().unwrap_or_else(|| panic!("{method} {path}: no error in {value}"));
            assert!(value["code"].is_string(), "{value}");
            assert!(error.contains(field), "{method} {path}: `{error}` does not name `{field}`");
        }
        assert_healthy(&c).await;
    });
}

#[test]
fn clients_leaving_mid_stream_and_deletes_mid_exec_are_clean() {
    let env = env();
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    block(async {
        let c = client().await;
        let child = branch(&c, &env.source, 1).await.remove(0);
        let running = "ps | grep -c '[s]leep 3[0-9]' || true";

        // gRPC: read the first chunk, then drop the stream; the command is killed.
        let req = pb::ExecRequest {
            id: child.clone(),
            args: vec!["sh".into(), "-c".into(), "echo started; sleep 38".into()],
            ..Default::default()
        };
        let mut stream = c.sandboxes().exec(req).await.expect("exec").into_inner();
        let first = tokio::time::timeout(Duration::from_secs(20), stream.message()).await.expect("first chunk");
        assert!(
            matches!(first, Ok(Some(pb::ExecEvent { event: Some(pb::exec_event::Event::Stdout(_)) }))),
            "{first:?}"
        );
        drop(stream);
        // REST: a client that sends an exec and hangs up.
        let mut io = tokio::net::UnixStream::connect(&env.socket).await.expect("connect");
        let body = r#"{"args": ["sh", "-c", "sleep 39"]}"#;
        let head = format!(
            "POST /v1/sandboxes/{child}/exec HTTP/1.1\r\nhost: forkd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        io.write_all(head.as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(io);
        // Watch and upload streams that go away.
        drop(c.sandboxes().watch(pb::WatchRequest::default()).await.expect("watch"));
        let partial =
            vec![pb::WriteFileRequest { id: child.clone(), path: "/root/p".into(), mode: 0, data: vec![1; 10] }];
        let _ = c.sandboxes().write_file(tokio_stream::iter(partial)).await;

        // Well before the sleeps would end on their own.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, out, _) = sh(&c, &child, running).await;
            if out.trim() == "0" {
                break;
            }
            assert!(Instant::now() < deadline, "commands of departed clients still run: {out}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // Deleting a sandbox mid-exec ends the exec promptly.
        let req = pb::ExecRequest { id: child.clone(), args: vec!["sleep".into(), "60".into()], ..Default::default() };
        let mut stream = c.sandboxes().exec(req).await.expect("exec").into_inner();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        delete(&c, &child).await;
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => return other.map(|_| ()),
                }
            }
        })
        .await
        .expect("the exec stream ended after the delete");
        assert!(end.is_err(), "an exec in a deleted sandbox must not end as a normal exit");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_healthy(&c).await;
    });
}

#[test]
fn cli_goes_through_the_daemon_with_the_same_output() {
    let env = env();
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    let forkd = |args: &[&str]| {
        let out = Command::new(forkd_bin())
            .args(args)
            .env("FORKD_STATE_DIR", &env.state)
            .env("FORKD_SOCKET", &env.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run forkd");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = forkd(&["branch", &env.source, "-n", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("branch --json");
    assert!(v["pause_ms"].is_f64(), "{v}");
    let child = v["children"][0]["id"].as_str().expect("child id").to_string();
    assert_eq!(v.as_object().map(|o| o.len()), Some(2), "only children and pause_ms: {v}");

    let (code, out, err) = forkd(&["exec", &child, "--", "sh", "-c", "echo o; echo e >&2; exit 7"]);
    assert_eq!((code, out.as_str(), err.as_str()), (7, "o\n", "e\n"));
    let (code, out, _) = forkd(&["ls", "--json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).expect("ls --json");
    assert!(list
        .as_array()
        .expect("array")
        .iter()
        .any(|s| s["id"] == child.as_str() && s["state"]["state"] == "running"));
    let (code, out, _) = forkd(&["images", "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"tiny\""));
    let (code, _, err) = forkd(&["exec", "sb-000000000000", "--", "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("not found"), "{err}");
    let (code, out, _) = forkd(&["rm", &child]);
    assert_eq!((code, out.trim()), (0, child.as_str()));
    // Through the daemon, not behind its back: the daemon wrote the audit lines.
    let audit = std::fs::read_to_string(env.state.join("audit.jsonl")).expect("audit log");
    let line = audit.lines().rev().find(|l| l.contains(&child) && l.contains("\"destroy\"")).expect("audited destroy");
    assert!(line.contains("\"who\":\"daemon\""), "{line}");
}

#[test]
fn sandboxes_survive_kill_9_of_the_daemon_and_are_readopted() {
    let env = env();
    let _exclusive = GATE.write().unwrap_or_else(|e| e.into_inner());
    let children = block(async {
        let c = client().await;
        let children = branch(&c, &env.source, 2).await;
        for (i, child) in children.iter().enumerate() {
            assert_eq!(sh(&c, child, &format!("echo {i} > /root/mark; echo ok")).await.1.trim(), "ok");
        }
        children
    });
    {
        let mut daemon = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
        let child = daemon.as_mut().expect("daemon running");
        // SAFETY: sending SIGKILL to our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
        let _ = child.wait();
        *daemon = Some(spawn_daemon(&env.state, &env.socket, &env.tcp));
    }
    wait_ready(&env.state, &env.socket);
    block(async {
        let c = client().await;
        let list = c.sandboxes().list(pb::ListRequest::default()).await.expect("list").into_inner().sandboxes;
        let mut ids: Vec<String> = Vec::new();
        for s in &list {
            assert_eq!(
                s.state,
                pb::SandboxState::Running as i32,
                "{} not running after restart: {}",
                s.id,
                s.exit_reason
            );
            ids.push(s.id.clone());
        }
        for id in children.iter().chain([&env.source]) {
            assert!(ids.contains(id), "{id} not re-adopted: {ids:?}");
        }
        // Every sandbox answers, in parallel (exec is ~1 s here).
        let tasks: Vec<_> = ids
            .iter()
            .map(|id| {
                let (c, id) = (c.clone(), id.clone());
                tokio::spawn(async move {
                    (id.clone(), c.exec(&id, ["sh", "-c", "cat /root/mark 2>/dev/null; echo up"]).await)
                })
            })
            .collect();
        for t in tasks {
            let (id, result) = t.await.expect("task");
            let (exit, out, _) = result.unwrap_or_else(|e| panic!("{id} does not answer after the restart: {e}"));
            assert_eq!(exit.exit_code, 0);
            assert!(String::from_utf8_lossy(&out).ends_with("up\n"));
        }
        for (i, child) in children.iter().enumerate() {
            assert_eq!(sh(&c, child, "cat /root/mark").await.1.trim(), i.to_string());
            delete(&c, child).await;
        }
        assert_healthy(&c).await;
    });
}

/// The pid of a sandbox's VMM, from the daemon's `state.json`.
fn vmm_pid(state: &Path, id: &str) -> u32 {
    let text = std::fs::read_to_string(state.join("state.json")).expect("state.json");
    let value: Value = serde_json::from_str(&text).expect("state.json is JSON");
    let record =
        value["sandboxes"].as_array().expect("sandboxes").iter().find(|r| r["info"]["id"] == id).expect("record");
    record["runtime"]["pid"].as_u64().expect("pid") as u32
}

#[test]
fn a_snapshot_outlives_its_vmm_the_daemon_and_the_page_cache() {
    let env = env();
    let _exclusive = GATE.write().unwrap_or_else(|e| e.into_inner());
    let tag = format!("outlives-{}", std::process::id());
    let (child, before, snapshot) = block(async {
        let c = client().await;
        let child = branch(&c, &env.source, 1).await.remove(0);
        let script = "echo 'kept on disk' > /root/note; \
             setsid sh -c 'n=0; while true; do n=$((n+1)); echo $n > /tmp/count; sleep 1; done' >/dev/null 2>&1 </dev/null & \
             sleep 2; cat /tmp/count";
        let (code, out, err) = sh(&c, &child, script).await;
        assert_eq!(code, 0, "{err}");
        let before: u64 = out.trim().parse().expect("a count");
        let req = pb::CreateSnapshotRequest { id: child.clone(), tag: tag.clone(), diff: false, wait: true };
        let snapshot = c.snapshots().create(req).await.expect("snapshot").into_inner();
        assert!(snapshot.durable && snapshot.pause_ms > 0.0 && snapshot.pause_ms < 200.0, "{snapshot:?}");
        (child, before, snapshot)
    });
    // Everything that held the sandbox goes: its VMM, the daemon, the page cache.
    let vmm = vmm_pid(&env.state, &child);
    {
        let mut daemon = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
        let process = daemon.as_mut().expect("daemon running");
        // SAFETY: SIGKILL to our own child process and to the sandbox's VMM.
        unsafe {
            libc::kill(process.id() as i32, libc::SIGKILL);
            libc::kill(vmm as i32, libc::SIGKILL);
        }
        let _ = process.wait();
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop the page cache");
        *daemon = Some(spawn_daemon(&env.state, &env.socket, &env.tcp));
    }
    wait_ready(&env.state, &env.socket);
    block(async {
        let c = client().await;
        let listed = c.snapshots().list(pb::ListSnapshotsRequest {}).await.expect("list").into_inner().snapshots;
        assert!(listed.iter().any(|s| s.id == snapshot.id && s.tag == tag), "{listed:?}");
        let req = pb::RestoreRequest { snapshot_tag: tag.clone(), count: 2 };
        let restored = c.snapshots().restore(req).await.expect("restore").into_inner().sandboxes;
        assert_eq!(restored.len(), 2);
        assert_eq!(restored[0].restored_from, snapshot.id);
        assert_eq!(restored[1].parent, restored[0].id);
        for r in &restored {
            let (code, out, err) =
                sh(&c, &r.id, "cat /root/note; cat /tmp/count; sleep 2; cat /tmp/count; date +%s").await;
            assert_eq!(code, 0, "{err}");
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines[0], "kept on disk");
            let (first, second): (u64, u64) = (lines[1].parse().unwrap(), lines[2].parse().unwrap());
            assert!(first >= before && second > first, "the counter: {before} before, then {first}, {second}");
            let guest: i64 = lines[3].parse().unwrap();
            let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            assert!((host - guest).abs() <= 5, "guest clock {guest}, host {host}");
        }
        // The REST mirror lists it by the original forkd's paths and removes it.
        let (status, info) = rest("GET", &format!("/v1/snapshots/{tag}/info"), "").await;
        assert_eq!((status, info["id"].as_str()), (200, Some(snapshot.id.as_str())), "{info}");
        for r in restored.iter().rev() {
            delete(&c, &r.id).await;
        }
        delete(&c, &child).await;
        let (status, body) = rest("DELETE", &format!("/v1/snapshots/{tag}"), "").await;
        assert_eq!(status, 200, "{body}");
        assert_healthy(&c).await;
    });
}

#[test]
fn snapshots_through_rest_start_sandboxes_and_report_bad_input() {
    let env = env();
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    block(async {
        let c = client().await;
        let child = branch(&c, &env.source, 1).await.remove(0);
        let tag = format!("rest-{}", std::process::id());
        let (status, body) =
            rest("POST", "/v1/snapshots", serde_json::to_vec(&json!({"id": child, "tag": tag, "wait": true})).unwrap())
                .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["tag"], tag.as_str());
        let (status, body) =
            rest("POST", "/v1/sandboxes", serde_json::to_vec(&json!({"snapshot_tag": tag, "n": 2})).unwrap()).await;
        assert_eq!(status, 201, "{body}");
        let ids: Vec<String> = body["sandboxes"]
            .as_array()
            .expect("sandboxes")
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 2);
        for (path, body, code) in [
            ("/v1/snapshots", json!({"tag": "x"}), 400),
            ("/v1/snapshots", json!({"id": child, "tag": "Not A Tag"}), 400),
            ("/v1/sandboxes", json!({"snapshot_tag": "no-such-snapshot"}), 404),
            ("/v1/sandboxes", json!({"snapshot_tag": tag, "n": 0}), 400),
        ] {
            let (status, reply) = rest("POST", path, serde_json::to_vec(&body).unwrap()).await;
            assert_eq!(status, code, "{path} {body}: {reply}");
        }
        let (status, _) = rest("DELETE", &format!("/v1/snapshots/{tag}"), "").await;
        assert_eq!(status, 200);
        for id in ids.iter().chain([&child]) {
            delete(&c, id).await;
        }
        assert_healthy(&c).await;
    });
}
