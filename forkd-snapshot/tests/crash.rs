//! Crash safety: a writer SIGKILLed in the middle of writing memory leaves no snapshot, only a
//! staging directory that cleanup removes; earlier snapshots are intact.

mod common;

use std::time::{Duration, Instant};

use common::*;
use forkd_snapshot::*;

const CHILD_ENV: &str = "FORKD_SNAPSHOT_TEST_CRASH_ROOT";

/// The child side: stages a snapshot of 64 MiB and, once some of it is written, reports
/// readiness and hangs until killed. Does nothing when run as an ordinary test.
#[test]
fn crash_child() {
    let Ok(root) = std::env::var(CHILD_ENV) else { return };
    let root = std::path::PathBuf::from(root);
    let mut mem = Mem::new(&[(0, 16384)]);
    for p in 0..16384 {
        mem.fill(p, p as u64 + 7);
    }
    let staging = Staging::create(&root, "snap-crashing").expect("staging");
    staging.write_file("vm-state.json", b"{}").expect("state");
    let ready = root.parent().expect("parent").join("child-ready");
    let progress = |done: u64, _total: u64| {
        if done > 0 {
            std::fs::write(&ready, b"").expect("marker");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let opts = WriteOptions { progress: Some(&progress), ..Default::default() };
    // SAFETY: our mapping; nothing writes it.
    let _ = unsafe { staging.write_memory(&mem.guest_regions(), None, &opts) };
    panic!("the parent should have killed this process");
}

#[test]
fn killed_writer_leaves_no_snapshot() {
    let (tmp, store) = store();
    let mut mem = Mem::new(&[(0, 8)]);
    mem.fill(3, 3);
    let (before, _) = take(&store, &mem, Take { tag: Some("before"), ..Default::default() }).expect("take");

    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, store.root())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    let ready = tmp.path().join("child-ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("child exited early: {status}");
        }
        assert!(Instant::now() < deadline, "child never started writing");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(store.root().join(".tmp-snap-crashing/memory.bin").exists(), "killed mid-write");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    let ids: Vec<String> = store.list().expect("list").iter().map(|s| s.id().to_string()).collect();
    assert_eq!(ids, vec![before.id().to_string()]);
    assert!(matches!(store.get("snap-crashing"), Err(SnapshotError::NotFound { .. })));
    let staging = store.root().join(".tmp-snap-crashing");
    assert!(staging.exists());
    assert_eq!(store.cleanup_leftovers().expect("cleanup"), vec![staging.clone()]);
    assert!(!staging.exists());
    store.check_for_restore(&before).expect("intact");
    store.verify("before").expect("intact");
    assert_eq!(materialize(&store, &before), mem.image());
}
