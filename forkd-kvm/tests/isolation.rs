//! Isolation on real KVM microVMs (as root): per-sandbox network namespaces with NAT and a
//! default-deny egress policy, per-sandbox cgroups with limits, and the jailed VMM.
//!
//! All traffic stays on this machine: the test builds its own "outside" host in another
//! network namespace with small TCP servers. One `nat` source is booted for the whole binary;
//! every other sandbox is a BRANCH child of it (milliseconds), except one `none` sandbox.

mod common;

use common::*;
use forkd_core::{
    BranchOptions, NetworkMode, NetworkPolicy, ResourceLimits, SandboxId, SandboxInfo, SandboxSpec, SandboxState,
};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const OUT_A: &str = "10.201.0.2";
const OUT_B: &str = "10.201.0.3";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn ip_output(args: &[&str]) -> String {
    String::from_utf8_lossy(&Command::new("ip").args(args).output().expect("run ip").stdout).into_owned()
}

/// TCP servers answering `hello <addr>`, bound inside the namespace at `ns` (or the host's).
fn serve(ns: Option<&Path>, addrs: &[&str]) -> Arc<AtomicBool> {
    let addrs: Vec<SocketAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
    let bind = || addrs.iter().map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"))).collect();
    let listeners: Vec<TcpListener> = match ns {
        Some(path) => forkd_net::netns::run_in(path, bind).expect("enter namespace"),
        None => bind(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for l in listeners {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut s) = conn {
                    let _ = writeln!(s, "hello {}", l.local_addr().unwrap());
                }
            }
        });
    }
    stop
}

/// The "outside world": namespace `fkt-out<pid>` behind a veth, 10.201.0.2 and .3, servers
/// on .2:8080, .2:8081, .3:8080; plus host servers on loopback and every host address.
struct World {
    ns: String,
    host_if: String,
}

static WORLD: OnceLock<World> = OnceLock::new();
static NAT_SOURCE: OnceLock<SandboxInfo> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

extern "C" fn remove_world() {
    if let Some(w) = WORLD.get() {
        let _ = Command::new("ip").args(["link", "del", &w.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &w.ns]).output();
    }
}

fn world() -> &'static World {
    WORLD.get_or_init(|| {
        env();
        let pid = std::process::id() % 100_000;
        let w = World { ns: format!("fkt-out{pid}"), host_if: format!("fkt-o{pid}") };
        // A test run killed before its atexit handler leaves its world behind (same names when
        // the pid repeats, the same addresses in any case): remove every leftover first.
        for ns in ip_output(&["netns", "list"]).lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with("fkt-out") {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
        for link in ip_output(&["-o", "link", "show"]).lines().filter_map(|l| l.split(": ").nth(1)) {
            let name = link.split('@').next().unwrap_or(link);
            if name.starts_with("fkt-o") {
                let _ = Command::new("ip").args(["link", "del", name]).output();
            }
        }
        ip(&["netns", "add", &w.ns]);
        ip(&["link", "add", &w.host_if, "type", "veth", "peer", "name", "eth0", "netns", &w.ns]);
        ip(&["addr", "add", "10.201.0.1/29", "dev", &w.host_if]);
        ip(&["link", "set", &w.host_if, "up"]);
        ip(&["-n", &w.ns, "addr", "add", "10.201.0.2/29", "dev", "eth0"]);
        ip(&["-n", &w.ns, "addr", "add", "10.201.0.3/29", "dev", "eth0"]);
        ip(&["-n", &w.ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &w.ns, "link", "set", "lo", "up"]);
        let path = forkd_net::netns::netns_path(&w.ns);
        serve(Some(&path), &["10.201.0.2:8080", "10.201.0.2:8081", "10.201.0.3:8080"]);
        serve(None, &["127.0.0.1:18080", "0.0.0.0:18081"]);
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { libc::atexit(remove_world) };
        w
    })
}

/// The `nat` source booted once: only 10.201.0.2:8080 is allowed.
fn nat_source() -> &'static SandboxInfo {
    world();
    NAT_SOURCE.get_or_init(|| {
        let spec = SandboxSpec {
            network: NetworkPolicy { mode: NetworkMode::Nat, allow: vec![format!("{OUT_A}/32:8080")] },
            ..SandboxSpec::default()
        };
        controller().create(spec).expect("boot the nat source")
    })
}

fn nat_child() -> SandboxId {
    child_with(&nat_source().id, ResourceLimits::default())
}

/// `nc` from inside the guest: the server's greeting, or an error.
fn fetch(id: &SandboxId, addr: &str, port: u16) -> Result<String, String> {
    let (outcome, out, err) = sh(id, &format!("echo | nc -w 3 {addr} {port}"));
    if outcome.status == forkd_core::ExitStatus::Code(0) && out.contains("hello") {
        Ok(out.trim().to_string())
    } else {
        Err(format!("{outcome:?} {out} {err}"))
    }
}

fn guest_ip(id: &SandboxId) -> String {
    sh_ok(id, "ip -4 -o addr show dev eth0 | awk '{print $4}'")
}

fn runtime_dir(id: &SandboxId) -> PathBuf {
    env().dirs.sandboxes().join(id.as_str())
}

/// The sandbox's cgroup (every hierarchy, v1 or v2), found the way the daemon re-finds it.
fn cgroup(id: &SandboxId) -> Result<forkd_cgroup::SandboxCgroup, forkd_cgroup::CgroupError> {
    forkd_cgroup::SandboxCgroup::open(id.as_str(), Default::default(), &Default::default())
}

/// The sandbox's VMM: the one process in its cgroup.
fn vmm_pid(id: &SandboxId) -> u32 {
    let procs = cgroup(id).and_then(|cg| cg.pids()).expect("the sandbox's cgroup");
    assert_eq!(procs.len(), 1, "one process (the VMM) in {id}'s cgroup: {procs:?}");
    procs[0]
}

fn wait_exited(id: &SandboxId, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        controller().refresh();
        if let SandboxState::Exited(why) = controller().get(id).expect("sandbox record").state {
            return why;
        }
        assert!(Instant::now() < deadline, "{id} still running after {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn egress_follows_the_allow_list_and_never_reaches_the_host_or_other_sandboxes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let a = nat_child();
    let b = nat_child();
    assert_eq!(guest_ip(&a), "172.16.0.2/30");
    assert_eq!(fetch(&a, OUT_A, 8080).expect("allowed destination"), format!("hello {OUT_A}:8080"));
    fetch(&a, OUT_A, 8081).expect_err("port not on the allow-list reached");
    fetch(&a, OUT_B, 8080).expect_err("address not on the allow-list reached");
    // The host: loopback (from the guest, 127.0.0.1 is its own), the namespace gateway, the
    // host's veth end and every other host address.
    fetch(&a, "127.0.0.1", 18080).expect_err("loopback reached");
    fetch(&a, "172.16.0.1", 18081).expect_err("the namespace itself reached");
    let host_addrs: Vec<String> = ip_output(&["-4", "-o", "addr", "show"])
        .lines()
        .filter(|l| !l.contains(" lo ") && !l.contains("fkt-"))
        .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next().map(str::to_string))
        .collect();
    assert!(host_addrs.iter().any(|a| a.starts_with("10.200.")), "sandbox veths missing: {host_addrs:?}");
    for addr in &host_addrs {
        fetch(&a, addr, 18081).expect_err("a host address reached");
    }
    // The other sandbox: its namespace end.
    let b_ns = ip_output(&["-n", &format!("fkd-{b}"), "-4", "-o", "addr", "show", "dev", "veth0"]);
    let b_ns_ip = b_ns.split_whitespace().nth(3).and_then(|a| a.split('/').next()).expect("b's veth0 address");
    fetch(&a, b_ns_ip, 18081).expect_err("another sandbox reached");
    for id in [&a, &b] {
        controller().destroy(id).unwrap();
    }
}

#[test]
fn two_children_of_one_branch_reach_the_server_at_once_with_the_same_ip() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let src = nat_child();
    let kids = controller().branch(&src, &BranchOptions::count(2)).expect("branch x2");
    let ids: Vec<SandboxId> = kids.children.iter().map(|c| c.id.clone()).collect();
    let results: Vec<(String, Result<String, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids.iter().map(|id| s.spawn(move || (guest_ip(id), fetch(id, OUT_A, 8080)))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (ip, r) in results {
        assert_eq!(ip, "172.16.0.2/30");
        assert_eq!(r.expect("a child reaches the allowed server"), format!("hello {OUT_A}:8080"));
    }
    // Same policy in every child: still default deny.
    fetch(&ids[0], OUT_B, 8080).expect_err("child's policy lost");
    for id in ids.iter().chain([&src]) {
        controller().destroy(id).unwrap();
    }
}

#[test]
fn mode_none_has_no_nic() {
    let id = fresh(); // the shared default (mode none) source's child
    let links = sh_ok(&id, "ls /sys/class/net");
    assert_eq!(links, "lo");
    controller().destroy(&id).unwrap();
}

#[test]
fn destroy_leaves_no_namespace_link_or_cgroup() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let id = nat_child();
    let ns = format!("fkd-{id}");
    assert!(ip_output(&["netns", "list"]).contains(&ns));
    let dirs: Vec<PathBuf> = cgroup(&id).expect("the sandbox's cgroup").dirs();
    let veths = || ip_output(&["-o", "link", "show"]).lines().filter(|l| l.contains("fkd-h")).count();
    let before = veths();
    controller().destroy(&id).unwrap();
    assert_eq!(veths(), before - 1, "the host veth is left");
    assert!(!ip_output(&["netns", "list"]).contains(&ns), "namespace left");
    assert!(!dirs.is_empty());
    for dir in dirs {
        assert!(!dir.exists(), "{} left", dir.display());
    }
}

#[test]
fn a_guest_touching_more_than_the_memory_limit_is_killed_and_reported() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A child's cgroup is charged only for the memory it copies or adds after the fork, so
    // 48 MiB lets it run commands but not have the guest touch 100 MiB of fresh RAM (tmpfs).
    let victim = child_with(&nat_source().id, ResourceLimits { memory_mib: Some(48), ..Default::default() });
    let bystander = nat_child();
    assert_eq!(limits_in_force(&victim).memory_bytes, Some(48 << 20));
    let mut out = forkd_core::CapturedOutput::default();
    let req = forkd_core::ExecRequest::new(["sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=100; sleep 5"]);
    // The VMM dies under the command: the exec fails, which is the point.
    let _ = controller().exec(&victim, &req, None, &mut out);
    let why = wait_exited(&victim, Duration::from_secs(30));
    assert!(why.contains("killed by memory limit"), "reason: {why}");
    // Others unharmed.
    assert_eq!(fetch(&bystander, OUT_A, 8080).unwrap(), format!("hello {OUT_A}:8080"));
    assert_eq!(sh_ok(&nat_source().id, "echo alive"), "alive");
    for id in [&victim, &bystander] {
        controller().destroy(id).unwrap();
    }
}

#[test]
fn a_seccomp_violation_kills_only_that_sandbox_and_says_so() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let victim = nat_child();
    let bystander = nat_child();
    let socket = runtime_dir(&victim).join("control.sock");
    let r =
        forkd_vmm::control::request(&socket, &forkd_vmm::control::ControlRequest::ProbeSeccomp, Duration::from_secs(5));
    assert!(r.is_err(), "the VMM survived a forbidden syscall: {r:?}");
    let why = wait_exited(&victim, Duration::from_secs(10));
    assert!(why.contains("killed by seccomp: syscall 103"), "reason: {why}");
    assert_eq!(sh_ok(&bystander, "echo alive"), "alive");
    // The jail is in force: no capabilities beyond CAP_SYS_RESOURCE and CAP_SYS_NICE, own mount
    // and net ns.
    let pid = vmm_pid(&bystander);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cap_eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim().to_string();
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let own_prm = own.lines().find_map(|l| l.strip_prefix("CapPrm:")).unwrap().trim().to_string();
    let expected = ((1u64 << 24) | (1u64 << 23)) & u64::from_str_radix(&own_prm, 16).unwrap();
    assert_eq!(u64::from_str_radix(&cap_eff, 16).unwrap(), expected, "CapEff {cap_eff}");
    assert!(status.lines().any(|l| l.starts_with("Seccomp:") && l.contains('2')), "no seccomp filter");
    let ns = |p: &str| std::fs::read_link(p).unwrap();
    assert_ne!(ns(&format!("/proc/{pid}/ns/mnt")), ns("/proc/self/ns/mnt"));
    assert_ne!(ns(&format!("/proc/{pid}/ns/net")), ns("/proc/self/ns/net"));
    for id in [&victim, &bystander] {
        controller().destroy(id).unwrap();
    }
}

#[test]
fn cgroup_usage_is_reported_and_the_vmm_is_in_its_own_cgroup() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let id = nat_child();
    let pid = vmm_pid(&id);
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(cmdline.contains("forkd-vmm"), "{pid} in {id}'s cgroup is not its VMM: {cmdline}");
    // Default memory limit: guest RAM + 256 MiB, in force and reported.
    let limit = (nat_source().spec.memory_mib + 256) << 20;
    assert_eq!(limits_in_force(&id).memory_bytes, Some(limit));
    let used = usage(&id);
    assert_eq!(used.memory_limit_bytes, Some(limit));
    assert!(used.memory_bytes.is_some_and(|b| b > 0) && used.pids.is_some_and(|p| p >= 2), "{used:?}");
    controller().destroy(&id).unwrap();
}

/// The limits the kernel enforces on a sandbox's cgroup, read back from its files (v1 or v2).
fn limits_in_force(id: &SandboxId) -> forkd_cgroup::Limits {
    cgroup(id).and_then(|cg| cg.limits_in_force()).unwrap_or_else(|e| panic!("reading {id}'s cgroup limits: {e}"))
}

fn usage(id: &SandboxId) -> forkd_core::ResourceUsage {
    controller().resource_usage(id).expect("resource usage").expect("the sandbox has a cgroup")
}

/// A child of `source` whose cgroup has `limits` instead of the source's (none: the source's).
fn child_with(source: &SandboxId, limits: ResourceLimits) -> SandboxId {
    let r = controller().branch(source, &BranchOptions { count: 1, limits }).expect("branch");
    r.children[0].id.clone()
}

/// Limits given on BRANCH are in force in the children's cgroups (the others stay the
/// source's), are kept by a branch of such a child, and leave the source's alone.
#[test]
fn branch_limit_overrides_are_in_force_in_the_children_only() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let source = nat_source();
    let over = ResourceLimits { cpus: Some(0.5), pids: Some(200), io_bps: Some(8 << 20), ..Default::default() };
    let child = child_with(&source.id, over.clone());
    let in_child = limits_in_force(&child);
    assert_eq!(in_child.cpu(), Some((50_000, 100_000)));
    assert_eq!(in_child.pids_max, Some(200));
    assert_eq!(in_child.memory_bytes, Some((source.spec.memory_mib + 256) << 20), "memory limit not inherited");
    let io = in_child.io.clone().expect("io limits in force");
    assert_eq!((io.read_bps, io.write_bps, io.write_iops), (Some(8 << 20), Some(8 << 20), None));
    assert_eq!(controller().get(&child).unwrap().spec.limits, source.spec.limits.overlay(&over));

    let in_source = limits_in_force(&source.id);
    assert_eq!((in_source.cpu_quota_us, in_source.pids_max, in_source.io), (None, None, None));

    let grandchild = child_with(&child, ResourceLimits::default());
    let in_grandchild = limits_in_force(&grandchild);
    assert_eq!(
        forkd_cgroup::Limits { io: None, ..in_grandchild.clone() },
        forkd_cgroup::Limits { io: None, ..in_child }
    );
    assert_eq!(in_grandchild.io.map(|io| io.write_bps), Some(Some(8 << 20)));
    assert_eq!(sh_ok(&grandchild, "echo alive"), "alive");
    for id in [&grandchild, &child] {
        controller().destroy(id).unwrap();
    }
}

/// The pids limit bounds the VMM's tasks: a child whose `limits.pids` is the number of tasks
/// its VMM runs cannot be branched (that needs one more: the zygote) and survives the refusal.
#[test]
fn pids_limit_bounds_the_vmm_tasks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let source = nat_source().id.clone();
    let tasks = usage(&source).pids.expect("pids.current");
    let id = child_with(&source, ResourceLimits { pids: Some(tasks), ..Default::default() });
    assert_eq!(usage(&id).pids_limit, Some(tasks));
    let err = controller().branch(&id, &BranchOptions::count(1)).expect_err("a branch needs one more task");
    eprintln!("branch at pids.max={tasks}: {err}");
    assert_eq!(sh_ok(&id, "echo alive"), "alive", "the sandbox must survive a refused branch");
    controller().destroy(&id).unwrap();
}

/// The CPU quota bounds the VMM's CPU time (guest code runs on its vCPU threads): the same
/// busy guest uses ~3 s of CPU in 3 s unlimited and ~0.6 s with `limits.cpus = 0.2`.
#[test]
fn cpu_quota_bounds_the_vmm_cpu_time() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let source = nat_source().id.clone();
    let interval = Duration::from_secs(3);
    let busy_cpu_time = |id: &SandboxId| {
        // A busy loop in guest user mode, which runs natively on the vCPU thread.
        sh_ok(id, "setsid sh -c 'while :; do :; done' >/dev/null 2>&1 </dev/null & echo started");
        std::thread::sleep(Duration::from_millis(300));
        let before = usage(id).cpu_usage_us.expect("cpu usage");
        std::thread::sleep(interval);
        let used = Duration::from_micros(usage(id).cpu_usage_us.expect("cpu usage") - before);
        controller().destroy(id).unwrap();
        used
    };
    let free = busy_cpu_time(&nat_child());
    let limited_child = child_with(&source, ResourceLimits { cpus: Some(0.2), ..Default::default() });
    assert_eq!(usage(&limited_child).cpu_limit, Some(0.2));
    let limited = busy_cpu_time(&limited_child);
    eprintln!("VMM CPU time over {interval:?}: {free:?} unlimited, {limited:?} with limits.cpus = 0.2");
    assert!(limited <= interval.mul_f64(0.2 * 1.5), "quota not enforced: {limited:?} in {interval:?}");
    assert!(free > limited, "the busy guest should use more CPU without the quota ({free:?} vs {limited:?})");
}

/// The io limit bounds the VMM's writes to the disk backing the sandbox's layers: with
/// `limits.io_bps` = 256 KiB/s, a guest writing 4 MiB and flushing (the VMM then writes back
/// in its own context, where even the v1 throttle applies) takes ~16 s longer than without.
#[test]
fn io_limit_bounds_the_vmm_disk_writes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let source = nat_source().id.clone();
    let write_4_mib = |id: &SandboxId| {
        let started = Instant::now();
        sh_ok(id, "dd if=/dev/zero of=/root/io.bin bs=1M count=4 conv=fsync 2>/dev/null; echo done");
        let elapsed = started.elapsed();
        assert_eq!(sh_ok(id, "ls -l /root/io.bin | awk '{print $5}'"), (4u64 << 20).to_string());
        elapsed
    };
    let free_child = nat_child();
    let unlimited = write_4_mib(&free_child);
    controller().destroy(&free_child).unwrap();
    let id = child_with(&source, ResourceLimits { io_bps: Some(256 << 10), ..Default::default() });
    let written_before = usage(&id).io_write_bytes.unwrap_or(0);
    let elapsed = write_4_mib(&id);
    let written = usage(&id).io_write_bytes.unwrap_or(0) - written_before;
    eprintln!("4 MiB + fsync: {unlimited:?} unlimited, {elapsed:?} at 256 KiB/s; the cgroup wrote {written} bytes");
    assert!(written >= 4 << 20, "the VMM's writes were not accounted to its cgroup ({written} bytes)");
    // 4 MiB at 256 KiB/s is ~16 s of throttling; allow for burst and noise in the guest part.
    assert!(
        elapsed >= unlimited + Duration::from_secs(8),
        "256 KiB/s not enforced: 4 MiB in {elapsed:?} (unlimited: {unlimited:?})"
    );
    controller().destroy(&id).unwrap();
}
