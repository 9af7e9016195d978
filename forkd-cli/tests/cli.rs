//! The `forkd` command on real KVM microVMs: exit codes, output streams, JSON shapes, errors.
//!
//! One `default` template is booted per run (in a temporary state directory); `forkd run`
//! forks it automatically, so each case costs a BRANCH, not a boot.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{OnceLock, RwLock, RwLockReadGuard};

struct Env {
    state: tempfile::TempDir,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn images_dir() -> PathBuf {
    std::env::var_os("FORKD_TEST_IMAGES").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/forkd/images"))
}

fn forkd(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .env("FORKD_STATE_DIR", state)
        .env_remove("FORKD_LOG")
        .output()
        .expect("run forkd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

extern "C" fn cleanup() {
    if let Some(env) = ENV.get() {
        let _ = forkd(env.state.path(), &["rm", "--all"]);
        // The TempDir lives in a static and is never dropped.
        let _ = std::fs::remove_dir_all(env.state.path());
    }
}

/// A state directory with the prepared images and a booted `default` template.
fn env() -> &'static Env {
    ENV.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "CLI tests boot KVM microVMs and must run as root");
        assert!(
            images_dir().join("tiny").is_dir(),
            "no tiny image in {}; run scripts/setup.sh --no-demo",
            images_dir().display()
        );
        let state = tempfile::Builder::new().prefix("forkd-cli-test-").tempdir().unwrap();
        std::os::unix::fs::symlink(images_dir(), state.path().join("images")).unwrap();
        let out = forkd(state.path(), &["template", "create", "default"]);
        assert!(out.status.success(), "template create failed: {}", text(&out.stderr));
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { libc::atexit(cleanup) };
        Env { state }
    })
}

fn run(args: &[&str]) -> Output {
    forkd(env().state.path(), args)
}

/// Tests run concurrently and make sandboxes in the shared state directory; the one that counts
/// them takes this exclusively.
static SANDBOX_LIST: RwLock<()> = RwLock::new(());

fn shared_sandbox_list() -> RwLockReadGuard<'static, ()> {
    SANDBOX_LIST.read().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn run_passes_stdout_stderr_and_exit_status_through() {
    let _shared = shared_sandbox_list();
    let out = run(&["run", "--", "sh", "-c", "echo hello; echo oops >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    assert!(text(&out.stderr).contains("oops\n"), "{}", text(&out.stderr));
}

#[test]
fn run_of_a_missing_binary_is_a_clear_error() {
    let _shared = shared_sandbox_list();
    let out = run(&["run", "--", "/no/such/binary"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("/no/such/binary") && err.contains("forkd: error"), "{err}");
}

#[test]
fn run_leaves_no_sandbox_behind() {
    let _alone = SANDBOX_LIST.write().unwrap_or_else(|e| e.into_inner());
    let before = run(&["ls", "--json"]);
    let count = |o: &Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap().as_array().unwrap().len();
    let n = count(&before);
    let out = run(&["run", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = run(&["ls", "--json"]);
    assert_eq!(count(&after), n, "`forkd run` left its sandbox: {}", text(&after.stdout));
}

#[test]
fn create_exec_branch_ls_rm_with_json() {
    let _shared = shared_sandbox_list();
    let out = run(&["create", "--from", "default", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_str().unwrap().to_string();
    let out = run(&["exec", &id, "--", "sh", "-c", "echo state > /root/s; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = run(&["branch", &id, "-n", "2", "--json", "--cpus", "0.5"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let branch: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let children: Vec<String> =
        branch["children"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(children.len(), 2);
    assert!(branch["pause_ms"].as_f64().unwrap() > 0.0);
    for child in &children {
        let out = run(&["exec", child, "--", "cat", "/root/s"]);
        assert_eq!(text(&out.stdout), "state\n");
        let inspect: serde_json::Value = serde_json::from_slice(&run(&["inspect", child]).stdout).unwrap();
        assert_eq!(inspect["sandbox"]["spec"]["limits"]["cpus"].as_f64(), Some(0.5), "{inspect}");
        assert_eq!(inspect["resources"]["cpu_limit"].as_f64(), Some(0.5), "{inspect}");
    }
    let ls: serde_json::Value = serde_json::from_slice(&run(&["ls", "--json"]).stdout).unwrap();
    let listed: Vec<&str> = ls.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    for id in children.iter().chain([&id]) {
        assert!(listed.contains(&id.as_str()), "{id} not listed");
    }
    let mut rm = vec!["rm", id.as_str()];
    rm.extend(children.iter().map(String::as_str));
    assert!(run(&rm).status.success());
    let out = run(&["exec", &id, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("not found"), "{}", text(&out.stderr));
}

#[test]
fn bad_input_fails_clearly_without_booting() {
    let _shared = shared_sandbox_list();
    let state = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(images_dir(), state.path().join("images")).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--kernel", "/no/such/vmlinux", "--", "true"], "kernel"),
        (&["run", "--memory", "16M", "--", "true"], "memory"),
        (&["run", "--memory", "lots", "--", "true"], "memory"),
        (&["run", "--image", "no-such-image", "--", "true"], "no-such-image"),
        (&["run", "--vcpus", "0", "--", "true"], "vcpus"),
        (&["exec", "NOT/AN/ID", "--", "true"], "id"),
        (&["branch", "sb-000000000000", "-n", "0"], "count"),
        (&["branch", "sb-000000000000", "--cpus=-1"], "cpus"),
        (&["branch", "sb-000000000000", "--io-bps", "fast"], "io-bps"),
    ];
    for (args, needle) in cases {
        let out = forkd(state.path(), args);
        let err = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: stderr does not mention {needle}: {err}");
    }
}

#[test]
fn a_corrupt_image_is_named_in_the_error() {
    let _shared = shared_sandbox_list();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("images").join("broken");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(images_dir().join("tiny/manifest.json")).unwrap()).unwrap();
    manifest["name"] = "broken".into();
    manifest["size_bytes"] = (1u64 << 20).into();
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(dir.join("rootfs.ext4"), vec![0u8; 1 << 20]).unwrap();
    let out = forkd(state.path(), &["run", "--image", "broken", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("rootfs.ext4"), "{}", text(&out.stderr));
}

#[test]
fn a_named_socket_that_does_not_answer_is_an_error() {
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("nobody.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["ls"])
        .env("FORKD_STATE_DIR", state.path())
        .env("FORKD_SOCKET", &socket)
        .output()
        .expect("run forkd");
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("no forkd daemon answers at") && err.contains("nobody.sock"), "{err}");
}
