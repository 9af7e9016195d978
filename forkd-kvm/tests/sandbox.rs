//! Sandboxes on real KVM microVMs: commands, stdin, timeouts, files, concurrency, teardown,
//! and clear errors for bad input.

mod common;

use common::*;
use forkd_core::{Error, ExecRequest, ExitStatus, SandboxSpec};
use std::time::{Duration, Instant};

#[test]
fn exec_passes_output_and_exit_codes_through() {
    let id = fresh();
    let (outcome, stdout, stderr) = sh(&id, "echo hello; echo oops >&2; exit 3");
    assert_eq!(outcome.status, ExitStatus::Code(3));
    assert_eq!(stdout, "hello\n");
    assert_eq!(stderr, "oops\n");
    let (outcome, _, _) = sh(&id, "kill -9 $$");
    assert_eq!(outcome.status, ExitStatus::Signal(9));
    assert!(sh_ok(&id, "uname -s; seq 1 10 | grep -c 1").starts_with("Linux\n2"));
    controller().destroy(&id).unwrap();
}

#[test]
fn missing_programs_are_clear_errors() {
    let id = fresh();
    let err = controller()
        .exec(&id, &ExecRequest::new(["/no/such/binary"]), None, &mut forkd_core::CapturedOutput::default())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    assert!(err.to_string().contains("/no/such/binary"), "{err}");
    controller().destroy(&id).unwrap();
}

#[test]
fn stdin_reaches_the_command() {
    let id = fresh();
    let mut out = forkd_core::CapturedOutput::default();
    let stdin: Box<dyn std::io::Read + Send> = Box::new(std::io::Cursor::new(b"line one\nline two\n".to_vec()));
    let outcome =
        controller().exec(&id, &ExecRequest::new(["sh", "-c", "wc -l; echo done"]), Some(stdin), &mut out).unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(), ["2", "done"]);
    controller().destroy(&id).unwrap();
}

#[test]
fn timeout_kills_the_guest_process() {
    let id = fresh();
    let mut req = ExecRequest::new(["sh", "-c", "echo started; sleep 300"]);
    // Generous: starting sh alone takes seconds when guest kernels are emulated.
    req.timeout = Some(Duration::from_secs(15));
    let started = Instant::now();
    let (outcome, stdout, _) = exec(&id, req);
    assert_eq!(outcome.status, ExitStatus::TimedOut);
    assert_eq!(stdout, "started\n");
    assert!(started.elapsed() < Duration::from_secs(90), "timed out only after {:?}", started.elapsed());
    // The whole process group is gone (allowing the agent a moment to reap it).
    let mut survivors = String::new();
    for _ in 0..10 {
        survivors = sh_ok(&id, "for p in /proc/[0-9]*; do grep -qs '^sleep' $p/comm && ! grep -qs '^State:.Z' $p/status && echo $p; done; true");
        if survivors.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(survivors, "", "sleep survived the timeout");
    controller().destroy(&id).unwrap();
}

#[test]
fn files_round_trip() {
    let id = fresh();
    let data: Vec<u8> = (0..(1 << 20) + 12345).map(|i| (i * 7 + i / 4096) as u8).collect();
    let written =
        controller().write_file(&id, "/root/dir/blob.bin", 0o640, &mut std::io::Cursor::new(data.clone())).unwrap();
    assert_eq!(written, data.len() as u64);
    let mut back = Vec::new();
    controller().read_file(&id, "/root/dir/blob.bin", &mut back).unwrap();
    assert!(back == data, "read back {} bytes, differs from what was written", back.len());
    let entries = controller().list_dir(&id, "/root/dir").unwrap();
    let blob = entries.iter().find(|e| e.name == "blob.bin").expect("listed");
    assert_eq!((blob.size, blob.mode & 0o777, blob.kind.as_str()), (data.len() as u64, 0o640, "file"));
    assert_eq!(sh_ok(&id, "md5sum /root/dir/blob.bin | cut -c1-32").len(), 32);
    let missing = controller().read_file(&id, "/root/nope", &mut Vec::new()).unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing:?}");
    controller().destroy(&id).unwrap();
}

#[test]
fn two_sandboxes_run_at_once_independently() {
    let a = fresh();
    let b = fresh();
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| sh_ok(&a, "echo a > /root/who; sleep 1; cat /root/who"));
        let hb = s.spawn(|| sh_ok(&b, "echo b > /root/who; sleep 1; cat /root/who"));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!((ra.as_str(), rb.as_str()), ("a", "b"));
    controller().destroy(&a).unwrap();
    controller().destroy(&b).unwrap();
}

#[test]
fn teardown_leaves_nothing_behind() {
    let id = fresh();
    let dir = env().dirs.sandboxes().join(id.as_str());
    assert!(dir.join("control.sock").exists() && dir.join("vsock.sock").exists());
    let pid = vmm_pid(&id);
    assert!(alive(pid), "VMM {pid} of {id} is not running");
    controller().destroy(&id).unwrap();
    assert!(!dir.exists(), "sandbox directory {} left behind", dir.display());
    assert!(!alive(pid), "VMM process {pid} left behind");
    assert!(controller().get(&id).is_err(), "destroyed sandbox still listed");
    let state = std::fs::read_to_string(env().dirs.state.join("state.json")).unwrap();
    assert!(!state.contains(id.as_str()), "destroyed sandbox still in state.json");
}

/// The VMM pid recorded for `id` in state.json.
fn vmm_pid(id: &forkd_core::SandboxId) -> u32 {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env().dirs.state.join("state.json")).unwrap()).unwrap();
    let record =
        state["sandboxes"].as_array().unwrap().iter().find(|r| r["info"]["id"] == id.as_str()).expect("record");
    record["runtime"]["pid"].as_u64().unwrap() as u32
}

/// Running and not a zombie (an exited VMM may wait briefly for init to reap it).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')).unwrap_or(true),
        Err(_) => false,
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let c = controller();
    let err = c.create(SandboxSpec { kernel: Some("/no/such/vmlinux".into()), ..Default::default() }).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument { field, .. } if field == "kernel"), "{err:?}");
    let err = c.create(SandboxSpec { memory_mib: 16, ..Default::default() }).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument { field, .. } if field == "memory"), "{err:?}");
    assert!(err.to_string().contains("64"), "{err}");
    let err = c.create(SandboxSpec { image: "no-such-image".into(), ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("no-such-image") && err.to_string().contains("tiny"), "{err}");
    let err = c
        .exec(
            &forkd_core::SandboxId::parse("sb-000000000000").unwrap(),
            &ExecRequest::new(["true"]),
            None,
            &mut forkd_core::CapturedOutput::default(),
        )
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

#[test]
fn corrupt_images_are_refused_with_the_file_named() {
    let state = tempfile::tempdir().unwrap();
    let image_dir = state.path().join("images").join("broken");
    std::fs::create_dir_all(&image_dir).unwrap();
    let manifest = std::fs::read_to_string(images_dir().join("tiny").join("manifest.json")).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    manifest["name"] = "broken".into();
    manifest["size_bytes"] = (64u64 << 20).into();
    std::fs::write(image_dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(image_dir.join("rootfs.ext4"), vec![0x5a; 64 << 20]).unwrap();
    let dirs = forkd_core::Dirs { state: state.path().to_path_buf(), cache: env().dirs.cache.clone() };
    let backend = forkd_kvm::KvmBackend::new(dirs, Default::default()).unwrap();
    let controller = forkd_core::Controller::new(std::sync::Arc::new(backend));
    let err = controller.create(SandboxSpec { image: "broken".into(), ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("rootfs.ext4"), "{err}");
    assert!(controller.list().is_empty());
}

/// Guest processes must never see each other's AVX registers. Guest user mode runs with the
/// host's XCR0 on emulating hosts, so this only holds if the kernel's XSAVE/XRSTOR (completed
/// by the VMM there) save and restore the full extended state.
#[test]
fn guest_processes_keep_their_own_vector_registers() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo.split_whitespace().any(|flag| flag == "avx2") {
        eprintln!("host CPU has no AVX2; the vector-state check does not apply");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("vector_state");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vector_state.c");
    let gcc = std::process::Command::new("gcc")
        .args(["-O2", "-mavx2", "-static", "-o"])
        .arg(&binary)
        .arg(source)
        .status()
        .expect("gcc (installed by scripts/setup.sh) builds the test guest program");
    assert!(gcc.success(), "gcc failed to build {source}");

    let id = fresh();
    let program = std::fs::read(&binary).unwrap();
    controller().write_file(&id, "/bin/vector_state", 0o755, &mut std::io::Cursor::new(program)).unwrap();
    let (outcome, stdout, stderr) = sh(&id, "for i in 1 2 3 4; do /bin/vector_state 500 & done; wait");
    assert_eq!(outcome.status, ExitStatus::Code(0), "{stderr}");
    assert_eq!(stdout.matches("corrupted 0").count(), 4, "vector registers leaked between processes:\n{stdout}");
    controller().destroy(&id).unwrap();
}

/// A booted sandbox hands the zero pages of its boot back to the host (the launcher asks once
/// the agent answers); asking again while the guest holds zero-filled and random data gives
/// back the zeros and leaves every byte as it was.
#[test]
fn zero_pages_go_back_to_the_host_and_data_stays() {
    use forkd_vmm::control::{self, ControlRequest};
    let booted = env().dirs.sandboxes().join(source().id.as_str()).join("vmm.log");
    let log = std::fs::read_to_string(&booted).unwrap();
    assert!(log.contains("KiB of zero pages"), "no zero-page release after boot in {}:\n{log}", booted.display());

    let id = fresh();
    let sum = sh_ok(
        &id,
        "head -c 4194304 /dev/zero > /tmp/z; head -c 65536 /dev/urandom > /tmp/r; \
         cat /tmp/z /tmp/r /tmp/z > /tmp/mixed; md5sum /tmp/mixed | cut -d' ' -f1",
    );
    let socket = env().dirs.sandboxes().join(id.as_str()).join("control.sock");
    let resp = control::request(&socket, &ControlRequest::ReleaseZeroPages, Duration::from_secs(30)).unwrap();
    let report = resp.release.expect("a release report");
    // /tmp/z and the two zero runs of /tmp/mixed sit in the guest's page cache: 12 MiB of zeros.
    assert!(report.pages.released_bytes >= 8 << 20, "{report:?}");
    assert!(report.pages.released_bytes <= report.pages.resident_bytes, "{report:?}");
    assert_eq!(sh_ok(&id, "md5sum /tmp/mixed | cut -d' ' -f1"), sum);
    assert_eq!(sh_ok(&id, "cat /tmp/z /tmp/r /tmp/z | cmp - /tmp/mixed && echo same"), "same");
    controller().destroy(&id).unwrap();
}

#[test]
fn the_guest_kernel_has_forkds_branch_housekeeping() {
    // Kernel patch 0004: the slab drain the agent runs for PrepareBranch before every fork.
    // Patch 0005: no "hrtimer: interrupt took" message, which nearly every child used to print.
    let id = fresh();
    assert_eq!(sh_ok(&id, "echo 1 > /proc/sys/vm/forkd_slab_quiesce && echo drained"), "drained");
    assert_eq!(sh_ok(&id, "dmesg | grep -c 'hrtimer: interrupt took' || true"), "0");
    controller().destroy(&id).unwrap();
}

/// Work that needs the guest still (zero-page release, the file-snapshot baseline) parks the
/// vCPUs and lets them go again after, but leaves a VM the user paused paused.
#[test]
fn a_paused_vm_stays_paused_through_memory_work() {
    use forkd_vmm::control::{self, ControlRequest};
    let id = fresh();
    let socket = env().dirs.sandboxes().join(id.as_str()).join("control.sock");
    let state =
        || control::request(&socket, &ControlRequest::Status, Duration::from_secs(5)).unwrap().status.unwrap().state;
    control::request(&socket, &ControlRequest::Pause, Duration::from_secs(5)).unwrap();
    let dump = tempfile::NamedTempFile::new().unwrap();
    let file = dump.reopen().unwrap();
    let request = ControlRequest::DumpMemory { path: dump.path().to_path_buf() };
    use std::os::fd::AsFd;
    let resp = control::request_with_fds(&socket, &request, &[file.as_fd()], Duration::from_secs(60)).unwrap();
    assert_eq!(resp.dump.expect("a dump report").bytes, 256 << 20);
    assert_eq!(state(), "paused", "dumping memory resumed a paused VM");
    control::request(&socket, &ControlRequest::ReleaseZeroPages, Duration::from_secs(30)).unwrap();
    assert_eq!(state(), "paused", "releasing zero pages resumed a paused VM");
    control::request(&socket, &ControlRequest::Resume, Duration::from_secs(5)).unwrap();
    assert_eq!(state(), "running");
    assert_eq!(sh_ok(&id, "echo alive"), "alive");
    controller().destroy(&id).unwrap();
}
