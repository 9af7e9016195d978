//! Durable snapshots on real KVM microVMs: a snapshot restores the guest's memory, disk and
//! processes after its VMM is gone and the page cache dropped; diff chains hold exactly the
//! memory a full snapshot does; damaged, unknown or unusable snapshots are refused clearly;
//! a killed writer leaves nothing half-written; templates come back from their snapshot.

mod common;

use common::*;
use forkd_core::{BranchOptions, Error, ResourceLimits, SandboxId, SnapshotKind, SnapshotOptions};
use forkd_snapshot::SnapshotStore;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn store() -> SnapshotStore {
    SnapshotStore::new(env().dirs.state.join("snapshots"))
}

fn tag(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn snapshot(id: &SandboxId, tag: Option<String>, diff: bool) -> forkd_core::SnapshotResult {
    controller()
        .snapshot(id, &SnapshotOptions { tag, diff, wait: true })
        .unwrap_or_else(|e| panic!("snapshot of {id}: {e}"))
}

fn restore(tag: &str) -> SandboxId {
    let mut restored = controller().create_from_snapshot(tag, 1).unwrap_or_else(|e| panic!("restore {tag}: {e}"));
    restored.remove(0).id
}

fn vmm_pid(id: &SandboxId) -> u32 {
    let text = std::fs::read_to_string(env().dirs.state.join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let record =
        state["sandboxes"].as_array().unwrap().iter().find(|r| r["info"]["id"] == id.as_str()).expect("record");
    record["runtime"]["pid"].as_u64().unwrap() as u32
}

fn kill(pid: u32) {
    // SAFETY: SIGKILL to a VMM (or writer) process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid as i32, 0) } == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drop_page_cache() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop the page cache (as root)");
}

fn materialize(tag_or_id: &str) -> Vec<u8> {
    let store = store();
    let snap = store.get(tag_or_id).unwrap();
    let mut image = Vec::new();
    store.materialize(&snap, &mut image).unwrap();
    image
}

#[test]
fn a_snapshot_restores_memory_disk_and_processes_after_its_vmm_and_the_page_cache_are_gone() {
    let id = fresh();
    sh_ok(
        &id,
        "echo 'written before the snapshot' > /root/note; \
         setsid sh -c 'n=0; while true; do n=$((n+1)); echo $n > /tmp/count; sleep 1; done' >/dev/null 2>&1 </dev/null &",
    );
    std::thread::sleep(Duration::from_secs(3));
    let before: u64 = sh_ok(&id, "cat /tmp/count").parse().unwrap();
    let name = tag("survivor");
    let result = snapshot(&id, Some(name.clone()), false);
    assert!(result.durable && result.kind == SnapshotKind::Full, "{result:?}");
    assert!(result.pause < Duration::from_millis(200), "pause {:?}", result.pause);
    kill(vmm_pid(&id));
    drop_page_cache();

    let restored = restore(&name);
    assert_eq!(sh_ok(&restored, "cat /root/note"), "written before the snapshot");
    let first: u64 = sh_ok(&restored, "cat /tmp/count").parse().unwrap();
    assert!(first >= before, "the counter went back: {first} < {before}");
    std::thread::sleep(Duration::from_secs(2));
    let second: u64 = sh_ok(&restored, "cat /tmp/count").parse().unwrap();
    assert!(second > first, "the counting process does not run after the restore ({first} then {second})");
    let guest: i64 = sh_ok(&restored, "date +%s").parse().unwrap();
    let host = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((host - guest).abs() <= 5, "guest wall clock {guest}, host {host}");
    let info = controller().get(&restored).unwrap();
    assert_eq!(info.restored_from.as_deref(), Some(result.id.as_str()));
    controller().destroy(&restored).unwrap();
    controller().destroy(&id).unwrap();
    controller().remove_snapshot(&name, true).unwrap();
}

#[test]
fn a_diff_chain_holds_exactly_what_a_full_snapshot_at_the_same_point_holds() {
    use forkd_vmm::control::{self, ControlRequest};
    let id = fresh();
    let base = snapshot(&id, None, false);
    let mut chain = Vec::new();
    for round in 0..3 {
        // Little data, made in user space: guest kernel work is slow where it is emulated.
        let write = format!("yes round-{round} | head -c 100000 > /root/r{round}");
        let previous = if round > 0 { format!("rm /root/r{}; ", round - 1) } else { String::new() };
        sh_ok(&id, &format!("{write}; {previous}sync"));
        if round == 2 {
            // Stop the guest so the last diff and the full snapshot see the same memory.
            let socket = env().dirs.sandboxes().join(id.as_str()).join("control.sock");
            control::request(&socket, &ControlRequest::Pause, Duration::from_secs(5)).unwrap();
        }
        let diff = snapshot(&id, None, true);
        assert_eq!(diff.kind, SnapshotKind::Diff);
        assert_eq!(diff.parent.as_deref(), Some(chain.last().unwrap_or(&base.id).as_str()));
        chain.push(diff.id);
    }
    let full = snapshot(&id, None, false);
    let last = chain.last().unwrap().clone();
    let written = controller().snapshot_info(&last).unwrap().memory_bytes;
    let whole = controller().snapshot_info(&full.id).unwrap().memory_bytes;
    assert!(written < whole / 2, "the diff wrote {written} bytes, a full snapshot {whole}");
    let expected = materialize(&full.id);
    assert!(materialize(&last) == expected, "the diff chain differs from the full snapshot");
    controller().compact_snapshot(&last).unwrap();
    assert_eq!(controller().snapshot_info(&last).unwrap().kind, SnapshotKind::Full);
    assert!(materialize(&last) == expected, "the compacted snapshot differs from the full one");
    controller().verify_snapshot(&last).unwrap();
    let restored = restore(&last);
    assert_eq!(sh_ok(&restored, "ls /root/r*"), "/root/r2");
    controller().destroy(&restored).unwrap();
    controller().destroy(&id).unwrap();
    for snap in [base.id, full.id] {
        controller().remove_snapshot(&snap, true).unwrap();
    }
    controller().remove_snapshot(&last, true).unwrap();
}

#[test]
fn damaged_unknown_or_unusable_snapshots_are_refused_by_name() {
    let id = fresh();
    let name = tag("damaged");
    let result = snapshot(&id, Some(name.clone()), false);
    let dir = env().dirs.state.join("snapshots").join(&result.id);
    // Other tests create and remove sandboxes meanwhile: look only for ones from this snapshot.
    let restored_from_it =
        || controller().list().iter().filter(|s| s.restored_from.as_deref() == Some(result.id.as_str())).count();
    let refused = |why: &str| {
        let err = controller().create_from_snapshot(&name, 1).expect_err(why);
        assert_eq!(restored_from_it(), 0, "a refused restore left a sandbox ({why})");
        err.to_string()
    };

    // A diff needs something to diff against.
    let lone = fresh();
    let err = controller().snapshot(&lone, &SnapshotOptions { diff: true, wait: true, ..Default::default() });
    assert!(err.unwrap_err().to_string().contains("take a full snapshot first"));
    controller().destroy(&lone).unwrap();

    // Its state file.
    let state = dir.join("vm-state.json");
    let good = std::fs::read(&state).unwrap();
    let mut bad = good.clone();
    bad[10] ^= 0x20;
    std::fs::write(&state, &bad).unwrap();
    assert!(refused("corrupt state").contains("vm-state.json"));
    std::fs::write(&state, &good).unwrap();

    // Its memory (a page that holds data).
    let memory = dir.join("memory.bin");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&memory).unwrap();
    let page = first_data_page(&file);
    use std::os::unix::fs::FileExt;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, page).unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], page).unwrap();
    assert!(refused("corrupt memory").contains("memory.bin"));
    assert!(controller().verify_snapshot(&name).unwrap_err().to_string().contains("memory.bin"));
    file.write_all_at(&byte, page).unwrap();

    // A format from the future.
    let manifest_path = dir.join("snapshot.json");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::write(&manifest_path, manifest.replacen("\"schema_version\": 1", "\"schema_version\": 99", 1)).unwrap();
    assert!(refused("unknown schema").contains("upgrade forkd"));
    // Its image changed since.
    let mut value: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    value["image"]["sha256"] = "0".repeat(64).into();
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    let err = refused("another image");
    assert!(err.contains("needs image `tiny`"), "{err}");
    std::fs::write(&manifest_path, &manifest).unwrap();

    // Diffs depend on it: removing it takes --cascade.
    let diff = snapshot(&id, None, true);
    let err = controller().remove_snapshot(&name, false).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains(&diff.id), "{err}");
    assert!(controller().snapshot_info(&diff.id).is_ok());
    let removed = controller().remove_snapshot(&name, true).unwrap();
    assert!(removed.contains(&diff.id) && removed.contains(&result.id), "{removed:?}");
    assert!(matches!(controller().snapshot_info(&name), Err(Error::NotFound { .. })));
    assert!(matches!(controller().create_from_snapshot(&name, 1), Err(Error::NotFound { .. })));
    controller().destroy(&id).unwrap();
}

/// The offset of the first byte of data in a sparse file.
fn first_data_page(file: &std::fs::File) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a valid fd we own.
    let at = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert!(at >= 0, "the memory file holds no data");
    at as u64 + 64
}

#[test]
fn a_writer_killed_mid_write_leaves_no_snapshot_and_earlier_ones_intact() {
    let source = fresh();
    let kept = tag("kept");
    snapshot(&source, Some(kept.clone()), false);
    // A child whose disk writes crawl, so its snapshot is still being written when killed.
    let slow = ResourceLimits { io_bps: Some(1 << 20), ..Default::default() };
    let child = controller().branch(&source, &BranchOptions { count: 1, limits: slow }).unwrap().children[0].id.clone();
    let started = controller().snapshot(&child, &SnapshotOptions::default()).unwrap();
    assert!(!started.durable);
    std::thread::sleep(Duration::from_millis(500));
    let writer = writer_pid(&started.id).expect("the writer runs");
    kill(writer);
    std::thread::sleep(Duration::from_millis(200));
    assert!(controller().snapshot_info(&started.id).is_err(), "a killed writer's snapshot is listed");
    controller().cleanup_stale().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(env().dirs.state.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&started.id))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    controller().verify_snapshot(&kept).unwrap();
    assert_eq!(sh_ok(&child, "echo still running"), "still running");
    for id in [&child, &source] {
        controller().destroy(id).unwrap();
    }
    controller().remove_snapshot(&kept, true).unwrap();
}

/// The pid of the process writing snapshot `id` (its command line names it).
fn writer_pid(id: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let text = String::from_utf8_lossy(&cmdline);
        (text.contains("snapshot-writer") && text.contains(id)).then_some(pid)
    })
}

#[test]
fn a_template_comes_back_from_its_snapshot_when_its_sandbox_is_gone() {
    let name = tag("tpl");
    let template = controller().create_template(&name, forkd_core::SandboxSpec::default()).unwrap();
    sh_ok(&template.id, "echo from-the-template > /root/t");
    // The snapshot was taken at create, before this file: a revived template starts from there.
    kill(vmm_pid(&template.id));
    controller().refresh();
    let forked = controller().create_from_template(&name).unwrap();
    assert_eq!(sh_ok(&forked.id, "cat /root/t 2>/dev/null || echo absent"), "absent");
    let revived = controller().template(&name).expect("a running template again");
    assert_ne!(revived.id, template.id);
    assert!(revived.restored_from.is_some());
    for id in [&forked.id, &revived.id, &template.id] {
        controller().destroy(id).unwrap();
    }
    controller().remove_snapshot(&forkd_core::controller::template_snapshot_tag(&name), true).unwrap();
}

/// A small ext4 filesystem on a loop device, unmounted on drop.
struct SmallDisk {
    mount: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(mib: u64) -> Self {
        let dir = tempfile::Builder::new().prefix("forkd-small-disk-").tempdir().unwrap();
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        // No blocks reserved for root: the test fills the filesystem as root.
        run(std::process::Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image));
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run(std::process::Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount));
        Self { mount, _dir: dir }
    }

    fn free_bytes(&self) -> u64 {
        // SAFETY: statvfs is plain old data, for which all zeroes is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let path = std::ffi::CString::new(self.mount.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs fills one struct we own, for a NUL-terminated path.
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

#[test]
fn a_full_disk_fails_the_snapshot_clearly_and_harms_nothing() {
    let disk = SmallDisk::new(320);
    std::os::unix::fs::symlink(images_dir(), disk.mount.join("images")).unwrap();
    let dirs = forkd_core::Dirs { state: disk.mount.clone(), cache: env().dirs.cache.clone() };
    let backend = forkd_kvm::KvmBackend::new(dirs, Default::default()).unwrap();
    let controller = forkd_core::Controller::open(std::sync::Arc::new(backend), &disk.mount, "test").unwrap();
    let sandbox = controller.create(forkd_core::SandboxSpec::default()).unwrap();
    let opts = |tag: &str| SnapshotOptions { tag: Some(tag.into()), wait: true, ..Default::default() };
    controller.snapshot(&sandbox.id, &opts("before")).unwrap();
    // Leave less room than a snapshot of this guest needs.
    let filler = disk.mount.join("filler");
    let room = disk.free_bytes().saturating_sub(4 << 20);
    std::fs::File::create(&filler).unwrap().set_len(0).unwrap();
    let status = std::process::Command::new("fallocate").args(["-l", &room.to_string()]).arg(&filler).status().unwrap();
    assert!(status.success());

    let err = controller.snapshot(&sandbox.id, &opts("too-big")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(
        text.contains("not enough space") && text.contains("memory.bin") && text.contains("bytes needed"),
        "{text}"
    );
    assert!(controller.snapshot_info("too-big").is_err());
    let names: Vec<String> = std::fs::read_dir(disk.mount.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "a partial snapshot was left: {names:?}");
    controller.verify_snapshot("before").unwrap();
    let mut out = forkd_core::CapturedOutput::default();
    let req = forkd_core::ExecRequest::new(["echo", "still running"]);
    controller.exec(&sandbox.id, &req, None, &mut out).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "still running");
    std::fs::remove_file(&filler).unwrap();
    controller.destroy_all().unwrap();
}

#[test]
fn removing_a_sandbox_lets_its_snapshot_finish_writing() {
    let source = fresh();
    // Slow disk writes keep the snapshot in flight when the sandbox is removed.
    let slow = ResourceLimits { io_bps: Some(4 << 20), ..Default::default() };
    let child = controller().branch(&source, &BranchOptions { count: 1, limits: slow }).unwrap().children[0].id.clone();
    controller().destroy(&source).unwrap();
    let started = controller().snapshot(&child, &SnapshotOptions { tag: Some(tag("orphan")), ..Default::default() });
    let started = started.unwrap();
    assert!(!started.durable);
    controller().destroy(&child).unwrap();
    assert!(writer_pid(&started.id).is_none(), "the writer outlived the removal");
    let info = controller().snapshot_info(&started.id).expect("the snapshot survived its sandbox's removal");
    let restored = restore(&info.id);
    assert_eq!(sh_ok(&restored, "echo back"), "back");
    controller().destroy(&restored).unwrap();
    controller().remove_snapshot(&started.id, true).unwrap();
}
