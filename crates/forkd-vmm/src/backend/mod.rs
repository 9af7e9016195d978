//! The KVM backend: each sandbox is a `forkd-vmm` process started from a `vm.json`, reached
//! through its control socket and, for commands and files, through the guest agent over vsock.
//!
//! A sandbox directory (`<state>/sandboxes/<id>/`) holds everything of one sandbox:
//! `vm.json`, `control.sock`, `vsock.sock`, `console.log`, `vmm.log` and `disk/` (its
//! copy-on-write layers). Destroying the sandbox removes the directory.

mod agent;
pub mod isolation;
pub mod process;

use crate::config::{DiskConfig, NetDeviceConfig, VmConfig, VsockConfig};
use crate::control::{self, ControlRequest};
use crate::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use forkd_cgroup::SandboxCgroup;
use forkd_core::backend::{
    BranchOptions, BranchedChildren, DirEntry, Liveness, MemoryUsage, ResourceUsage, RuntimeHandle, SandboxBackend,
};
use forkd_core::{CancelToken, Error, ExecOutcome, ExecRequest, ExecSink, Result, SandboxId, SandboxSpec};
use forkd_guest::dirs::Dirs;
use forkd_net::SandboxNetwork;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The guest port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Environment variable naming the `forkd-vmm` binary.
pub const VMM_BINARY_ENV: &str = "FORKD_VMM";

/// How to reach one sandbox's VMM. Persisted by the controller as the runtime handle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmmRuntime {
    pub dir: PathBuf,
    pub pid: u32,
    /// With `pid`, identifies the process even if the pid is reused.
    pub start_time: u64,
    pub config: PathBuf,
    pub control_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub console_log: PathBuf,
    pub vmm_log: PathBuf,
    /// The sandbox's network namespace, tap and veth (mode `nat`), or nothing (mode `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<SandboxNetwork>,
    /// The cgroup holding the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<SandboxCgroup>,
}

impl VmmRuntime {
    fn from_handle(handle: &RuntimeHandle) -> Result<Self> {
        serde_json::from_value(handle.clone())
            .map_err(|e| Error::internal(format!("corrupt sandbox runtime record: {e}")))
    }

    fn to_handle(&self) -> RuntimeHandle {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn alive(&self) -> bool {
        process::is_alive(self.pid, self.start_time)
    }
}

/// Tunables of the KVM backend.
#[derive(Debug, Clone)]
pub struct KvmOptions {
    /// How long a fresh boot may take to reach a ready agent.
    pub boot_timeout: Duration,
    /// Copy the guest console to the VMM's log (debugging).
    pub console_echo: bool,
}

impl Default for KvmOptions {
    fn default() -> Self {
        let secs = std::env::var("FORKD_BOOT_TIMEOUT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
        Self { boot_timeout: Duration::from_secs(secs), console_echo: false }
    }
}

/// Runs sandboxes as KVM microVMs.
pub struct KvmBackend {
    dirs: Dirs,
    vmm_binary: PathBuf,
    options: KvmOptions,
}

/// Finds `forkd-vmm`: `$FORKD_VMM`, next to the current executable, or one directory up
/// (test binaries live in `target/<profile>/deps`).
pub fn locate_vmm_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(VMM_BINARY_ENV) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| Error::internal(format!("current executable: {e}")))?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("forkd-vmm"));
        if let Some(up) = dir.parent() {
            candidates.push(up.join("forkd-vmm"));
        }
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "cannot find the forkd-vmm binary next to {}; build it (`cargo build --release`) or set {VMM_BINARY_ENV}",
            exe.display()
        ))
    })
}

impl KvmBackend {
    pub fn new(dirs: Dirs, options: KvmOptions) -> Result<Self> {
        Ok(Self { dirs, vmm_binary: locate_vmm_binary()?, options })
    }

    pub fn dirs(&self) -> &Dirs {
        &self.dirs
    }

    /// The kernel and its `System.map` for `spec`.
    fn kernel(&self, spec: &SandboxSpec) -> Result<(PathBuf, Option<PathBuf>)> {
        if let Some(path) = &spec.kernel {
            if !path.is_file() {
                return Err(Error::invalid("kernel", format!("{} does not exist or is not a file", path.display())));
            }
            let map = path.with_file_name("System.map");
            return Ok((path.clone(), map.is_file().then_some(map)));
        }
        let built =
            forkd_guest::kernel::find_built(&self.dirs).map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        let map = built.system_map.is_file().then_some(built.system_map.clone());
        Ok((built.vmlinux, map))
    }

    fn image(&self, spec: &SandboxSpec) -> Result<PathBuf> {
        use forkd_guest::image::{self, ImageError};
        let img = image::get(&self.dirs, &spec.image).map_err(|e| match e {
            ImageError::NotFound { .. } | ImageError::InvalidName { .. } => Error::invalid("image", e.to_string()),
            other => Error::FailedPrecondition(other.to_string()),
        })?;
        image::verify(&img).map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        Ok(img.rootfs)
    }

    fn vm_config(
        &self,
        dir: &Path,
        spec: &SandboxSpec,
        kernel: PathBuf,
        system_map: Option<PathBuf>,
        rootfs: PathBuf,
        net: &SandboxNetwork,
    ) -> VmConfig {
        let jail = isolation::jail_enabled()
            .then(|| isolation::jail(&self.dirs.sandboxes(), &[Some(&kernel), system_map.as_deref(), Some(&rootfs)]));
        let mut cmdline =
            format!("{} root=/dev/vda rw init=/sbin/forkd-agent", forkd_guest::kernel::cmdline_for_host());
        let words = net.guest_cmdline();
        if !words.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&words);
        }
        VmConfig {
            kernel,
            cmdline,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            cpu_profile: None,
            console_log: Some(dir.join("console.log")),
            console_echo: self.options.console_echo,
            root_disk: Some(DiskConfig { base: rootfs, layers: vec![dir.join("disk").join("layer-0")] }),
            vsock: Some(VsockConfig { uds_path: dir.join("vsock.sock"), guest_cid: 3 }),
            rng: true,
            control_socket: dir.join("control.sock"),
            system_map,
            net: net.nic.as_ref().map(|nic| NetDeviceConfig { tap_fd: isolation::TAP_FD, mac: nic.guest_mac }),
            jail,
        }
    }

    /// Starts `forkd-vmm` for the config in `dir` and waits for the guest agent.
    fn launch(
        &self,
        dir: &Path,
        config: &VmConfig,
        net: &SandboxNetwork,
        cgroup: &SandboxCgroup,
    ) -> Result<VmmRuntime> {
        let io = |what: &str, e: std::io::Error| Error::internal(format!("{what}: {e}"));
        let config_path = dir.join("vm.json");
        let json = serde_json::to_vec_pretty(config).map_err(|e| Error::internal(e.to_string()))?;
        std::fs::write(&config_path, json).map_err(|e| io("writing vm.json", e))?;
        let vmm_log = dir.join("vmm.log");
        let log = std::fs::File::create(&vmm_log).map_err(|e| io("creating vmm.log", e))?;
        use std::os::unix::process::CommandExt;
        let tap: Option<OwnedFd> = match &net.nic {
            Some(_) => Some(net.open_tap().map_err(isolation::net_error)?),
            None => None,
        };
        let procs = isolation::procs_files(cgroup)?;
        let tap_raw = tap.as_ref().map(|t| t.as_raw_fd());
        let procs_raw: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let mut command = Command::new(&self.vmm_binary);
        command
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl-C at the CLI must not kill sandboxes the daemon owns.
            .process_group(0);
        // SAFETY: the closure only calls write(2) and dup2(2), which are async-signal-safe,
        // on fds that stay open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || {
                // Into the sandbox's cgroup before the VMM allocates anything.
                for fd in &procs_raw {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // The tap at a fixed number, without close-on-exec.
                if let Some(fd) = tap_raw {
                    if libc::dup2(fd, isolation::TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| io(&format!("starting {}", self.vmm_binary.display()), e))?;
        drop(tap);
        drop(procs);
        let runtime = VmmRuntime {
            dir: dir.to_path_buf(),
            pid: child.id(),
            start_time: process::start_time(child.id()).unwrap_or(0),
            config: config_path,
            control_socket: config.control_socket.clone(),
            vsock_socket: dir.join("vsock.sock"),
            console_log: dir.join("console.log"),
            vmm_log,
            net: Some(net.clone()),
            cgroup: Some(cgroup.clone()),
        };
        let started = Instant::now();
        let deadline = started + self.options.boot_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let why = process::last_error(&runtime.vmm_log).unwrap_or_else(|| format!("exited with {status}"));
                let console = String::from_utf8_lossy(&process::tail(&runtime.console_log, 2000)).to_string();
                return Err(Error::Unavailable(format!(
                    "the sandbox VM failed to start: {why}\nlast console output:\n{console}"
                )));
            }
            if agent::ping(&runtime.vsock_socket, Duration::from_secs(2)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::DeadlineExceeded(format!(
                    "the guest agent did not answer within {:?}; see {}",
                    self.options.boot_timeout,
                    runtime.console_log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::info!(pid = runtime.pid, "sandbox ready in {:?}", started.elapsed());
        release_boot_zero_pages(&runtime);
        // Reap the VMM whenever it exits; if this process dies first, init adopts it.
        std::thread::Builder::new()
            .name("vmm-reaper".into())
            .spawn(move || child.wait())
            .map_err(|e| io("reaper thread", e))?;
        Ok(runtime)
    }
}

/// Has the source's guest run its deferred housekeeping before the fork instead of in every
/// child. An idle guest kernel postpones its deferrable timers (SLAB cache reaping, vmstat
/// folding, ...) until something wakes it, and SLAB hands objects freed into its per-cpu arrays
/// back to their slabs only gradually, over ~30 s after the guest last did something; a child
/// doing either writes its own copies of the same pages, in every child (docs/PERFORMANCE.md).
/// So when the source's guest is idle, its agent gets `PrepareBranch`: the request wakes the
/// guest (the due timers run), the agent has the kernel drain every slab cache and answers, and
/// the fork waits until the guest is idle again. The work is done once and the children inherit
/// the result. Returns the agent connection, to be closed after the fork. A guest that is
/// running anyway is forked as it is. Best effort throughout.
fn prepare_source_for_fork(
    source: &VmmRuntime,
) -> Option<forkd_agent::client::AgentClient<std::os::unix::net::UnixStream>> {
    if process::vcpus_idle(source.pid) != Some(true) {
        return None;
    }
    let begun = Instant::now();
    let held = match agent::prepare_branch(&source.vsock_socket, Duration::from_secs(1)) {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!("branch: the source's agent did not answer PrepareBranch: {e}");
            return None;
        }
    };
    tracing::debug!("branch: PrepareBranch answered after {:?}", begun.elapsed());
    // The answer's own completion (the guest freeing the sent packet) is all that is left.
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut idle_since: Option<Instant> = None;
    while Instant::now() < deadline {
        match process::vcpus_idle(source.pid) {
            Some(true) => {
                let since = *idle_since.get_or_insert_with(Instant::now);
                // Still asleep a few ms later: not just between two timer interrupts.
                if since.elapsed() >= Duration::from_millis(5) {
                    break;
                }
            }
            Some(false) => idle_since = None,
            None => break,
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Some(held)
}

/// Hands the zero pages a fresh boot leaves in guest RAM back to the host (a few ms of pause):
/// the sandbox's RSS shrinks and BRANCH children later share only pages that hold data. Best
/// effort: a VMM that cannot do it still runs correctly.
fn release_boot_zero_pages(runtime: &VmmRuntime) {
    match control::request(&runtime.control_socket, &ControlRequest::ReleaseZeroPages, Duration::from_secs(10)) {
        Ok(resp) => {
            if let Some(r) = resp.release {
                tracing::debug!(
                    "released {} of {} KiB backed guest RAM (zero pages) in {} µs",
                    r.pages.released_bytes >> 10,
                    r.pages.resident_bytes >> 10,
                    r.pause_us
                );
            }
        }
        Err(e) => tracing::warn!("could not release the guest's zero pages: {e}"),
    }
}

/// Why a VMM is gone: its cgroup's OOM kill ("killed by memory limit"), its own last error
/// line (including "killed by seccomp: syscall N"), or just gone.
fn exit_reason(rt: &VmmRuntime) -> String {
    if let Some(cg) = &rt.cgroup {
        if cg.oom_kills().unwrap_or(0) > 0 {
            let limit = cg.limits.memory_bytes.map(|b| format!(" of {} MiB", b >> 20)).unwrap_or_default();
            return format!("killed by memory limit{limit}: the VMM (guest RAM it touched plus its own) exceeded it");
        }
    }
    match process::last_error(&rt.vmm_log) {
        Some(line) => line,
        None => "VMM process is gone".into(),
    }
}

/// Waits for a fresh BRANCH child's agent and reseeds the guest's RNG.
fn child_ready(rt: &VmmRuntime, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    // Back off between attempts: every failed connection costs the guest (emulated, on some
    // hosts) kernel work, and a hundred children polling every few ms starve each other.
    let mut pause = Duration::from_millis(5);
    loop {
        if !rt.alive() {
            let why = process::last_error(&rt.vmm_log).unwrap_or_else(|| {
                let tail = String::from_utf8_lossy(&process::tail(&rt.vmm_log, 1500)).to_string();
                format!("its VMM exited; log tail:\n{tail}")
            });
            return Err(Error::Unavailable(format!("branch child {} failed: {why}", rt.dir.display())));
        }
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match agent::reseed(&rt.vsock_socket, remaining.min(Duration::from_secs(10)), remaining) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::DeadlineExceeded(format!("branch child {} did not answer: {e}", rt.dir.display())))
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Brings every child to a ready, reseeded agent, a few at a time. The children's guests only
/// work while being made ready; where guest kernel code is emulated, a hundred of them working
/// at once each get host time slices so short that timer interrupts eat most of every slice,
/// and the whole batch takes far longer than working through it a few at a time.
fn all_children_ready(runtimes: &[VmmRuntime], timeout: Duration) -> Vec<Result<()>> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get() * 2).min(runtimes.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<()>>>> = runtimes.iter().map(|_| Default::default()).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(rt) = runtimes.get(i) else { break };
                let result = child_ready(rt, timeout);
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(result);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner().ok().flatten().unwrap_or_else(|| Err(Error::internal("child readiness thread panicked")))
        })
        .collect()
}

impl SandboxBackend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create(&self, id: &SandboxId, spec: &SandboxSpec) -> Result<RuntimeHandle> {
        if spec.memory_mib < MIN_MEMORY_MIB || spec.memory_mib > MAX_MEMORY_MIB {
            return Err(Error::invalid(
                "memory",
                format!("{} MiB is out of range; use {MIN_MEMORY_MIB}M to {}G", spec.memory_mib, MAX_MEMORY_MIB / 1024),
            ));
        }
        let net_spec = isolation::network_spec(spec)?;
        let (kernel, system_map) = self.kernel(spec)?;
        let rootfs = self.image(spec)?;
        let dir = self.dirs.sandboxes().join(id.as_str());
        std::fs::create_dir_all(dir.join("disk"))
            .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
        let limits = isolation::cgroup_limits(spec, &dir.join("disk"));
        let (net, cgroup) = match isolation::create(id.as_str(), &net_spec, &limits, &self.dirs.state) {
            Ok(made) => made,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let config = self.vm_config(&dir, spec, kernel, system_map, rootfs, &net);
        match self.launch(&dir, &config, &net, &cgroup) {
            Ok(rt) => Ok(rt.to_handle()),
            Err(e) => {
                let _ = isolation::teardown(Some(&net), Some(&cgroup));
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn exec(
        &self,
        runtime: &RuntimeHandle,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<ExecOutcome> {
        let rt = VmmRuntime::from_handle(runtime)?;
        agent::exec(&rt.vsock_socket, req, stdin, sink, cancel)
    }

    fn write_file(&self, runtime: &RuntimeHandle, path: &str, mode: u32, data: &mut (dyn Read + Send)) -> Result<u64> {
        let rt = VmmRuntime::from_handle(runtime)?;
        agent::write_file(&rt.vsock_socket, path, mode, data)
    }

    fn read_file(&self, runtime: &RuntimeHandle, path: &str, out: &mut (dyn Write + Send)) -> Result<u64> {
        let rt = VmmRuntime::from_handle(runtime)?;
        agent::read_file(&rt.vsock_socket, path, out)
    }

    fn list_dir(&self, runtime: &RuntimeHandle, path: &str) -> Result<Vec<DirEntry>> {
        let rt = VmmRuntime::from_handle(runtime)?;
        agent::list_dir(&rt.vsock_socket, path)
    }

    fn branch(
        &self,
        runtime: &RuntimeHandle,
        children: &[SandboxId],
        opts: &BranchOptions,
    ) -> Result<BranchedChildren> {
        let source = VmmRuntime::from_handle(runtime)?;
        if !source.alive() {
            return Err(Error::FailedPrecondition("the source sandbox's VMM is not running".into()));
        }
        if source.cgroup.is_none() && !opts.limits.is_empty() {
            return Err(Error::FailedPrecondition(
                "the source sandbox runs without a cgroup (made by an older forkd), so its children's limits \
                 cannot be set; branch without limits, or create a new sandbox"
                    .into(),
            ));
        }
        let begun = Instant::now();
        let dirs: Vec<PathBuf> = children.iter().map(|id| self.dirs.sandboxes().join(id.as_str())).collect();
        for dir in &dirs {
            std::fs::create_dir_all(dir.join("disk"))
                .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
        }
        let cleanup = |dirs: &[PathBuf]| {
            for d in dirs {
                let _ = std::fs::remove_dir_all(d);
            }
        };
        // Every child gets its own network (same policy) and cgroup (same limits), made
        // before the source pauses, so BRANCH's pause does not grow with them.
        let mut isolated: Vec<(Option<SandboxNetwork>, Option<SandboxCgroup>)> = Vec::new();
        let mut taps: Vec<OwnedFd> = Vec::new();
        let undo = |isolated: &[(Option<SandboxNetwork>, Option<SandboxCgroup>)]| {
            for (net, cg) in isolated {
                let _ = isolation::teardown(net.as_ref(), cg.as_ref());
            }
        };
        for id in children {
            let made = (|| -> Result<(Option<SandboxNetwork>, Option<SandboxCgroup>, Option<OwnedFd>)> {
                let net = match &source.net {
                    Some(src) => {
                        let net = SandboxNetwork::create(id.as_str(), &src.spec, &src.config)
                            .map_err(isolation::net_error)?;
                        let tap = match &net.nic {
                            Some(_) => match net.open_tap() {
                                Ok(t) => Some(t),
                                Err(e) => {
                                    let _ = net.destroy();
                                    return Err(isolation::net_error(e));
                                }
                            },
                            None => None,
                        };
                        (Some(net), tap)
                    }
                    None => (None, None),
                };
                let cgroup = match &source.cgroup {
                    Some(src) => {
                        let disk_dir = self.dirs.sandboxes().join(id.as_str()).join("disk");
                        let limits = isolation::limits_over(&src.limits, &opts.limits, &disk_dir);
                        match SandboxCgroup::create(id.as_str(), &limits, &isolation::cgroup_config()) {
                            Ok(cg) => Some(cg),
                            Err(e) => {
                                let _ = isolation::teardown(net.0.as_ref(), None);
                                return Err(isolation::cgroup_error(e));
                            }
                        }
                    }
                    None => None,
                };
                Ok((net.0, cgroup, net.1))
            })();
            match made {
                Ok((net, cg, tap)) => {
                    isolated.push((net, cg));
                    taps.extend(tap);
                }
                Err(e) => {
                    undo(&isolated);
                    cleanup(&dirs);
                    return Err(e);
                }
            }
        }
        tracing::debug!(children = children.len(), "branch: isolation ready after {:?}", begun.elapsed());
        let held = prepare_source_for_fork(&source);
        tracing::debug!("branch: source prepared after {:?}", begun.elapsed());
        // Children moved into their cgroups while others start threads stall each other (see
        // `ControlRequest::Branch`): they wait at this gate until all are moved.
        let gate = match source.cgroup.is_some().then(crate::branch::pipe).transpose() {
            Ok(gate) => gate,
            Err(e) => {
                undo(&isolated);
                cleanup(&dirs);
                return Err(Error::internal(format!("branch start gate: {e}")));
            }
        };
        let request = ControlRequest::Branch { children: dirs.clone(), gate: gate.is_some() };
        let tap_refs: Vec<_> =
            taps.iter().map(|t| t.as_fd()).chain(gate.as_ref().map(|(read, _)| read.as_fd())).collect();
        let report =
            match control::request_with_fds(&source.control_socket, &request, &tap_refs, Duration::from_secs(120)) {
                Ok(resp) => resp.branch.ok_or_else(|| Error::internal("the VMM answered a branch without a report")),
                Err(e) => Err(Error::Unavailable(format!("branching: {e}"))),
            };
        drop(tap_refs);
        drop(taps);
        drop(held);
        // The children hold the read end now; the write end closes once they are moved.
        let gate = gate.map(|(_, write)| write);
        let report = report.inspect_err(|_| {
            undo(&isolated);
            cleanup(&dirs);
        })?;
        tracing::debug!("branch: the VMM reported its children after {:?}", begun.elapsed());
        let runtimes: Vec<VmmRuntime> = report
            .children
            .iter()
            .zip(isolated)
            .map(|(c, (net, cgroup))| {
                if let Some(cg) = &cgroup {
                    // Out of the source's cgroup into its own (all its threads).
                    if let Err(e) = cg.add_pid(c.pid) {
                        tracing::warn!(pid = c.pid, "moving a branch child into its cgroup: {e}");
                    }
                }
                VmmRuntime {
                    dir: c.dir.clone(),
                    pid: c.pid,
                    start_time: c.start_time,
                    config: c.dir.join("vm.json"),
                    control_socket: c.dir.join("control.sock"),
                    vsock_socket: c.dir.join("vsock.sock"),
                    console_log: c.dir.join("console.log"),
                    vmm_log: c.dir.join("vmm.log"),
                    net,
                    cgroup,
                }
            })
            .collect();
        drop(gate);
        tracing::debug!("branch: children forked and in their cgroups after {:?}", begun.elapsed());
        let results = all_children_ready(&runtimes, self.options.boot_timeout);
        tracing::debug!("branch: children ready after {:?}", begun.elapsed());
        if let Some(err) = results.iter().find_map(|r| r.as_ref().err()) {
            let err = err.clone();
            for rt in &runtimes {
                let _ = self.destroy(&rt.to_handle());
            }
            cleanup(&dirs);
            return Err(err);
        }
        Ok(BranchedChildren {
            children: runtimes.iter().map(VmmRuntime::to_handle).collect(),
            pause: Duration::from_micros(report.pause_us),
        })
    }

    fn destroy(&self, runtime: &RuntimeHandle) -> Result<()> {
        let rt = VmmRuntime::from_handle(runtime)?;
        if rt.alive() {
            let _ = control::request(&rt.control_socket, &ControlRequest::Shutdown, Duration::from_secs(2));
            if !process::wait_exit(rt.pid, Duration::from_secs(3)) {
                process::signal(rt.pid, rt.start_time, libc::SIGKILL);
                process::wait_exit(rt.pid, Duration::from_secs(3));
            }
        }
        isolation::teardown(rt.net.as_ref(), rt.cgroup.as_ref())?;
        match std::fs::remove_dir_all(&rt.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(format!("removing {}: {e}", rt.dir.display()))),
        }
    }

    fn probe(&self, runtime: &RuntimeHandle) -> Liveness {
        match VmmRuntime::from_handle(runtime) {
            Ok(rt) if rt.alive() => Liveness::Running,
            Ok(rt) => Liveness::Exited(exit_reason(&rt)),
            Err(e) => Liveness::Exited(e.to_string()),
        }
    }

    fn memory_usage(&self, runtime: &RuntimeHandle) -> Result<MemoryUsage> {
        let rt = VmmRuntime::from_handle(runtime)?;
        let (rss_kib, pss_kib, private_dirty_kib) = process::smaps_rollup(rt.pid)
            .map_err(|e| Error::Unavailable(format!("sandbox VMM (pid {}) memory: {e}", rt.pid)))?;
        Ok(MemoryUsage { rss_kib, pss_kib, private_dirty_kib })
    }

    fn resource_usage(&self, runtime: &RuntimeHandle) -> Option<ResourceUsage> {
        let rt = VmmRuntime::from_handle(runtime).ok()?;
        let cg = rt.cgroup.as_ref()?;
        let usage = cg.usage().ok()?;
        let network = rt.net.as_ref().map(|n| {
            let allow: Vec<String> = n.spec.allow.iter().map(|a| a.to_string()).collect();
            if allow.is_empty() {
                n.spec.mode.to_string()
            } else {
                format!("{} allow {}", n.spec.mode, allow.join(","))
            }
        });
        Some(ResourceUsage {
            cgroup: cg.name.clone(),
            memory_bytes: usage.memory_current,
            memory_peak_bytes: usage.memory_peak,
            memory_limit_bytes: cg.limits.memory_bytes,
            memory_limit_hits: usage.memory_limit_hits,
            oom_kills: usage.oom_kills,
            cpu_usage_us: usage.cpu_usage_us,
            cpu_limit: cg.limits.cpu().map(|(q, p)| q as f64 / p as f64),
            pids: usage.pids_current,
            pids_limit: cg.limits.pids_max,
            io_read_bytes: usage.io_read_bytes,
            io_write_bytes: usage.io_write_bytes,
            network: network.or_else(|| Some("none".into())),
        })
    }

    fn cleanup_stale(&self, known: &[RuntimeHandle]) -> Result<()> {
        let alive: std::collections::HashSet<String> = known
            .iter()
            .filter_map(|h| VmmRuntime::from_handle(h).ok())
            .filter(|rt| rt.alive())
            .filter_map(|rt| rt.dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        // Stale means: a sandbox of *this* state directory (its directory is still there) whose
        // VMM is gone. Namespaces and cgroups of other state directories' sandboxes are kept.
        let ours: Vec<String> = std::fs::read_dir(self.dirs.sandboxes())
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let stale: Vec<&String> = ours.iter().filter(|id| !alive.contains(*id)).collect();
        let names: Vec<String> = forkd_net::netns::list(forkd_net::NS_PREFIX)
            .into_iter()
            .map(|ns| ns[forkd_net::NS_PREFIX.len()..].to_string())
            .chain(alive.iter().cloned())
            .filter(|id| !stale.contains(&id))
            .collect();
        let keep: Vec<&str> = names.iter().map(String::as_str).collect();
        let net = forkd_net::cleanup_stale(&isolation::net_config(&self.dirs.state), &keep);
        let cg = forkd_cgroup::cleanup_stale(&isolation::cgroup_config(), &keep);
        if let Ok(r) = &net {
            if !r.namespaces.is_empty() || !r.links.is_empty() {
                tracing::info!(namespaces = ?r.namespaces, links = ?r.links, "removed stale sandbox networks");
            }
        }
        net.map_err(isolation::net_error)?;
        cg.map_err(isolation::cgroup_error)?;
        Ok(())
    }

    fn console(&self, runtime: &RuntimeHandle, max_bytes: u64) -> Result<Vec<u8>> {
        let rt = VmmRuntime::from_handle(runtime)?;
        Ok(process::tail(&rt.console_log, max_bytes))
    }
}
