//! BRANCH on real KVM microVMs: children continue from the source's exact memory, disk and
//! process state, then diverge; repeated, wide, nested branches; lifecycle independence.

mod common;

use common::*;
use forkd_core::{BranchOptions, SandboxId};
use std::time::Duration;

/// A source of its own (forked from the shared one) running a counter process in memory and
/// holding a file on disk, so children have state to inherit.
fn busy_source() -> SandboxId {
    let id = fresh();
    sh_ok(&id, "echo 'before the branch' > /root/note.txt; sync");
    sh_ok(&id, "setsid sh -c 'n=0; while true; do n=$((n+1)); echo $n > /tmp/count; sleep 1; done' >/dev/null 2>&1 </dev/null &");
    wait_for_count(&id, 2);
    id
}

fn count(id: &SandboxId) -> u64 {
    sh_ok(id, "cat /tmp/count 2>/dev/null || echo 0").parse().unwrap_or(0)
}

fn wait_for_count(id: &SandboxId, at_least: u64) -> u64 {
    for _ in 0..120 {
        let n = count(id);
        if n >= at_least {
            return n;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("counter in {id} never reached {at_least}");
}

fn branch(id: &SandboxId, count: u32) -> forkd_core::BranchResult {
    controller().branch(id, &BranchOptions::count(count)).unwrap_or_else(|e| panic!("branch {id} x{count}: {e}"))
}

#[test]
fn children_inherit_memory_disk_and_processes_then_diverge() {
    let source = busy_source();
    let at_branch = count(&source);
    let result = branch(&source, 2);
    assert_eq!(result.children.len(), 2);
    let kids: Vec<SandboxId> = result.children.iter().map(|c| c.id.clone()).collect();
    for kid in &kids {
        // Disk as it was at the fork, and the counting process still alive and counting.
        assert_eq!(sh_ok(kid, "cat /root/note.txt"), "before the branch");
        let first = count(kid);
        assert!(first >= at_branch, "child counter {first} went back from {at_branch}");
        wait_for_count(kid, first + 1);
    }
    // After the branch: writes anywhere are private (disk in /root, memory in /tmp tmpfs).
    sh_ok(&source, "echo source > /root/note.txt; echo source > /tmp/mem");
    sh_ok(&kids[0], "echo kid0 > /root/note.txt; echo kid0 > /tmp/mem");
    assert_eq!(sh_ok(&kids[1], "cat /root/note.txt; cat /tmp/mem 2>/dev/null || echo none"), "before the branch\nnone");
    assert_eq!(sh_ok(&kids[0], "cat /root/note.txt /tmp/mem"), "kid0\nkid0");
    assert_eq!(sh_ok(&source, "cat /root/note.txt /tmp/mem"), "source\nsource");
    for id in kids.iter().chain([&source]) {
        controller().destroy(id).unwrap();
    }
}

#[test]
fn children_share_boot_id_but_not_random_streams() {
    let source = fresh();
    let kids: Vec<SandboxId> = branch(&source, 2).children.into_iter().map(|c| c.id).collect();
    let boot = |id: &SandboxId| sh_ok(id, "cat /proc/sys/kernel/random/boot_id");
    assert_eq!(boot(&kids[0]), boot(&source));
    assert_eq!(boot(&kids[1]), boot(&source));
    let random = |id: &SandboxId| sh_ok(id, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'");
    let (a, b, s) = (random(&kids[0]), random(&kids[1]), random(&source));
    assert_eq!(a.len(), 64);
    assert!(a != b && a != s && b != s, "random streams repeat across forks: {a} {b} {s}");
    for id in kids.iter().chain([&source]) {
        controller().destroy(id).unwrap();
    }
}

#[test]
fn ten_consecutive_branches_stay_fast_and_correct() {
    let source = fresh();
    let mut pauses = Vec::new();
    for round in 0..10 {
        sh_ok(&source, &format!("echo {round} > /root/round"));
        let result = branch(&source, 1);
        pauses.push(result.pause);
        let kid = &result.children[0].id;
        assert_eq!(sh_ok(kid, "cat /root/round"), round.to_string());
        controller().destroy(kid).unwrap();
    }
    eprintln!("pauses over 10 consecutive branches: {pauses:?}");
    // Not a timing assertion (see bench/): just that every branch reported a pause.
    assert!(pauses.iter().all(|p| !p.is_zero()));
    controller().destroy(&source).unwrap();
}

#[test]
fn sixteen_way_fan_out() {
    let source = fresh();
    sh_ok(&source, "echo fanout > /root/tag");
    let result = branch(&source, 16);
    assert_eq!(result.children.len(), 16);
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = result.children.iter().map(|c| s.spawn(|| sh_ok(&c.id, "cat /root/tag"))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|a| a == "fanout"), "{answers:?}");
    // Children run their guests at SCHED_IDLE only until every sibling is rebuilt: once they
    // answer, every vCPU thread of every child is back at normal priority. (KVM's own
    // `kvm-nx-lpage-recovery` thread keeps the policy of the vCPU that started it; it only
    // does background page-table work.)
    for c in &result.children {
        let pid = vmm_pid(&c.id);
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            if !stat.contains("(vcpu") {
                continue;
            }
            // Fields after the command name's closing parenthesis; policy is field 41 overall.
            let after_comm: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("").split(' ').collect();
            assert_eq!(
                after_comm.get(41 - 3),
                Some(&"0"),
                "child {} thread {:?} not SCHED_OTHER: {stat}",
                c.id,
                task.path()
            );
        }
    }
    for c in &result.children {
        controller().destroy(&c.id).unwrap();
    }
    controller().destroy(&source).unwrap();
}

#[test]
fn branch_of_a_branch_and_parent_destruction() {
    let source = fresh();
    sh_ok(&source, "echo gen0 > /root/gen");
    let child = branch(&source, 1).children.remove(0).id;
    sh_ok(&child, "echo gen1 > /root/gen");
    let grandchild = branch(&child, 1).children.remove(0).id;
    assert_eq!(sh_ok(&grandchild, "cat /root/gen"), "gen1");
    // Destroying the parents leaves descendants running, disks intact.
    controller().destroy(&source).unwrap();
    controller().destroy(&child).unwrap();
    assert_eq!(sh_ok(&grandchild, "cat /root/gen; echo gen2 > /root/gen; cat /root/gen"), "gen1\ngen2");
    controller().destroy(&grandchild).unwrap();
}

#[test]
fn killing_a_child_mid_branch_leaves_the_source_healthy() {
    let source = fresh();
    let source_pid = vmm_pid(&source);
    // The branch's processes: the zygote (a child of the source VMM) and the children it forks.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut killed = 0;
    let result = std::thread::scope(|s| {
        let killer = s.spawn(|| {
            let mut zygotes = vec![source_pid];
            let mut killed = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for (pid, ppid) in processes() {
                    if zygotes.contains(&ppid) && !zygotes.contains(&pid) {
                        if ppid == source_pid && !zygotes.contains(&pid) {
                            zygotes.push(pid); // let the zygote fork, then kill what it forks
                            continue;
                        }
                        // SAFETY: kill(2) on a process this test's branch just forked.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        killed += 1;
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            killed
        });
        let result = controller().branch(&source, &BranchOptions::count(2));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        killed = killer.join().unwrap();
        result
    });
    eprintln!("killed {killed} processes mid-branch; branch result: {:?}", result.as_ref().map(|r| r.children.len()));
    match &result {
        Ok(r) => {
            for c in &r.children {
                let _ = controller().destroy(&c.id);
            }
        }
        Err(e) => eprintln!("branch failed as expected: {e}"),
    }
    // Whatever happened to the children, the source runs and branches again.
    assert_eq!(sh_ok(&source, "echo alive"), "alive");
    let again = branch(&source, 1);
    assert_eq!(sh_ok(&again.children[0].id, "echo ok"), "ok");
    controller().destroy(&again.children[0].id).unwrap();
    controller().destroy(&source).unwrap();
}

/// (pid, parent pid) of every live process.
fn processes() -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(") ") else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        if let Some(ppid) = fields.get(1).and_then(|p| p.parse().ok()) {
            out.push((pid, ppid));
        }
    }
    out
}

/// The VMM pid recorded for `id` in state.json.
fn vmm_pid(id: &SandboxId) -> u32 {
    let text = std::fs::read_to_string(env().dirs.state.join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let record =
        state["sandboxes"].as_array().unwrap().iter().find(|r| r["info"]["id"] == id.as_str()).expect("record");
    record["runtime"]["pid"].as_u64().unwrap() as u32
}

#[test]
fn children_start_their_vcpus_only_when_the_start_gate_opens() {
    use forkd_vmm::control::{self, ControlRequest};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    let source = fresh();
    let sandboxes = env().dirs.sandboxes();
    // A child outside the controller's books: this test drives the VMM's control socket itself.
    let dir = sandboxes.join(format!("gate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success, which we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let request = ControlRequest::Branch { children: vec![dir.clone()], gate: true };
    let source_socket = sandboxes.join(source.as_str()).join("control.sock");
    let response = control::request_with_fds(&source_socket, &request, &[read.as_fd()], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("branch with a start gate: {e}"));
    drop(read);
    let child_pid = response.branch.expect("a branch report").children[0].pid;

    // The child is forked and rebuilt but holds its vCPUs, so it serves nothing yet.
    let child_socket = dir.join("control.sock");
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill with signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(child_pid as i32, 0) }, 0, "the gated child died");
    assert!(
        control::request(&child_socket, &ControlRequest::Status, Duration::from_millis(200)).is_err(),
        "the child runs before its start gate opened"
    );

    drop(write);
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let status = loop {
        match control::request(&child_socket, &ControlRequest::Status, Duration::from_secs(1)) {
            Ok(resp) => break resp.status.expect("a status"),
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("the child never started after the gate opened: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!(status.state, "running");
    assert_eq!(sh_ok(&source, "echo alive"), "alive");

    let _ = control::request(&child_socket, &ControlRequest::Shutdown, Duration::from_secs(5));
    for _ in 0..100 {
        // SAFETY: as above.
        if unsafe { libc::kill(child_pid as i32, 0) } != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
    controller().destroy(&source).unwrap();
}
