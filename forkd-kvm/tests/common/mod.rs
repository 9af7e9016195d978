//! Shared fixture for the integration tests: real KVM microVMs, no mocks.
//!
//! Booting is slow on emulating hosts, so each test binary boots ONE source sandbox and every
//! test forks its own child from it with BRANCH (milliseconds). State lives in a temporary
//! state directory whose `images` points at the prepared images (`FORKD_TEST_IMAGES`, default
//! `/var/lib/forkd/images`, made by `scripts/setup.sh`). Everything is destroyed at exit.

#![allow(dead_code)]

use forkd_core::Dirs;
use forkd_core::{
    BranchOptions, CapturedOutput, Controller, ExecOutcome, ExecRequest, SandboxId, SandboxInfo, SandboxSpec,
};
use forkd_kvm::{KvmBackend, KvmOptions};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub struct TestEnv {
    pub dirs: Dirs,
    pub controller: Controller,
    /// Kept alive for the whole run.
    _state: tempfile::TempDir,
}

static ENV: OnceLock<TestEnv> = OnceLock::new();
static SOURCE: OnceLock<SandboxInfo> = OnceLock::new();

/// Fails the test loudly (never skips) when the host cannot run sandboxes.
fn require_host() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "integration tests boot KVM microVMs and must run as root");
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("integration tests need a usable /dev/kvm: {e}");
    }
}

pub fn images_dir() -> PathBuf {
    std::env::var_os("FORKD_TEST_IMAGES").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/forkd/images"))
}

extern "C" fn destroy_everything() {
    if let Some(env) = ENV.get() {
        let _ = env.controller.destroy_all();
        // The TempDir lives in a static and is never dropped.
        let _ = std::fs::remove_dir_all(&env.dirs.state);
    }
}

pub fn env() -> &'static TestEnv {
    ENV.get_or_init(|| {
        require_host();
        let images = images_dir();
        assert!(
            images.join("tiny").join("manifest.json").is_file(),
            "no tiny image under {}; run scripts/setup.sh --no-demo (or set FORKD_TEST_IMAGES)",
            images.display()
        );
        let state = tempfile::Builder::new().prefix("forkd-test-").tempdir().expect("temp state dir");
        std::os::unix::fs::symlink(&images, state.path().join("images")).expect("link images");
        let dirs = Dirs { state: state.path().to_path_buf(), cache: Dirs::from_env().cache };
        let backend = KvmBackend::new(dirs.clone(), KvmOptions::default()).expect("KVM backend (is forkd-vmm built?)");
        let controller = Controller::open(Arc::new(backend), &dirs.state, "test").expect("controller");
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { libc::atexit(destroy_everything) };
        TestEnv { dirs, controller, _state: state }
    })
}

pub fn controller() -> &'static Controller {
    &env().controller
}

/// The sandbox booted once per test binary; tests fork from it and never modify it.
pub fn source() -> &'static SandboxInfo {
    SOURCE.get_or_init(|| controller().create(SandboxSpec::default()).expect("boot the source sandbox"))
}

/// A new sandbox of its own for one test: a BRANCH child of the shared source.
pub fn fresh() -> SandboxId {
    let result = controller().branch(&source().id, &BranchOptions::count(1)).expect("branch a fresh sandbox");
    result.children[0].id.clone()
}

/// Runs `sh -c script` and captures its output.
pub fn sh(id: &SandboxId, script: &str) -> (ExecOutcome, String, String) {
    exec(id, ExecRequest::new(["sh", "-c", script]))
}

pub fn exec(id: &SandboxId, req: ExecRequest) -> (ExecOutcome, String, String) {
    let mut out = CapturedOutput::default();
    let outcome = controller().exec(id, &req, None, &mut out).unwrap_or_else(|e| panic!("exec {:?}: {e}", req.argv));
    (outcome, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// stdout of `sh -c script`, trimmed; panics unless it exits 0.
pub fn sh_ok(id: &SandboxId, script: &str) -> String {
    let (outcome, stdout, stderr) = sh(id, script);
    assert_eq!(outcome.status, forkd_core::ExitStatus::Code(0), "`{script}` failed: {stderr}");
    stdout.trim().to_string()
}
