//! The KVM backend: each sandbox is a `forkd-vmm` process started from a `vm.json`, reached
//! through its control socket and, for commands and files, through the guest agent over vsock.
//!
//! A sandbox directory (`<state>/sandboxes/<id>/`) holds everything of one sandbox:
//! `vm.json`, `control.sock`, `vsock.sock`, `console.log`, `vmm.log` and `disk/` (its
//! copy-on-write layers). Destroying the sandbox removes the directory.

mod agent;
pub mod process;

use crate::config::{DiskConfig, VmConfig, VsockConfig};
use crate::control::{self, ControlRequest};
use crate::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use forkd_core::backend::{
    BranchOptions, BranchedChildren, DirEntry, Liveness, MemoryUsage, RuntimeHandle, SandboxBackend,
};
use forkd_core::{CancelToken, Error, ExecOutcome, ExecRequest, ExecSink, Result, SandboxId, SandboxSpec};
use forkd_guest::dirs::Dirs;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
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
    ) -> VmConfig {
        VmConfig {
            kernel,
            cmdline: format!("{} root=/dev/vda rw init=/sbin/forkd-agent", forkd_guest::kernel::cmdline_for_host()),
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
        }
    }

    /// Starts `forkd-vmm` for the config in `dir` and waits for the guest agent.
    fn launch(&self, dir: &Path, config: &VmConfig) -> Result<VmmRuntime> {
        let io = |what: &str, e: std::io::Error| Error::internal(format!("{what}: {e}"));
        let config_path = dir.join("vm.json");
        let json = serde_json::to_vec_pretty(config).map_err(|e| Error::internal(e.to_string()))?;
        std::fs::write(&config_path, json).map_err(|e| io("writing vm.json", e))?;
        let vmm_log = dir.join("vmm.log");
        let log = std::fs::File::create(&vmm_log).map_err(|e| io("creating vmm.log", e))?;
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(&self.vmm_binary)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl-C at the CLI must not kill sandboxes the daemon owns.
            .process_group(0)
            .spawn()
            .map_err(|e| io(&format!("starting {}", self.vmm_binary.display()), e))?;
        let runtime = VmmRuntime {
            dir: dir.to_path_buf(),
            pid: child.id(),
            start_time: process::start_time(child.id()).unwrap_or(0),
            config: config_path,
            control_socket: config.control_socket.clone(),
            vsock_socket: dir.join("vsock.sock"),
            console_log: dir.join("console.log"),
            vmm_log,
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
        // Reap the VMM whenever it exits; if this process dies first, init adopts it.
        std::thread::Builder::new()
            .name("vmm-reaper".into())
            .spawn(move || child.wait())
            .map_err(|e| io("reaper thread", e))?;
        Ok(runtime)
    }
}

/// Waits for a fresh BRANCH child's agent and reseeds the guest's RNG.
fn child_ready(rt: &VmmRuntime, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if !rt.alive() {
            let why = process::last_error(&rt.vmm_log).unwrap_or_else(|| {
                let tail = String::from_utf8_lossy(&process::tail(&rt.vmm_log, 1500)).to_string();
                format!("its VMM exited; log tail:\n{tail}")
            });
            return Err(Error::Unavailable(format!("branch child {} failed: {why}", rt.dir.display())));
        }
        match agent::reseed(&rt.vsock_socket, Duration::from_secs(5)) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::DeadlineExceeded(format!("branch child {} did not answer: {e}", rt.dir.display())))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
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
        let (kernel, system_map) = self.kernel(spec)?;
        let rootfs = self.image(spec)?;
        let dir = self.dirs.sandboxes().join(id.as_str());
        std::fs::create_dir_all(dir.join("disk"))
            .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
        let config = self.vm_config(&dir, spec, kernel, system_map, rootfs);
        match self.launch(&dir, &config) {
            Ok(rt) => Ok(rt.to_handle()),
            Err(e) => {
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
        _opts: &BranchOptions,
    ) -> Result<BranchedChildren> {
        let source = VmmRuntime::from_handle(runtime)?;
        if !source.alive() {
            return Err(Error::FailedPrecondition("the source sandbox's VMM is not running".into()));
        }
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
        let request = ControlRequest::Branch { children: dirs.clone() };
        let report = match control::request(&source.control_socket, &request, Duration::from_secs(120)) {
            Ok(resp) => resp.branch.ok_or_else(|| Error::internal("the VMM answered a branch without a report")),
            Err(e) => Err(Error::Unavailable(format!("branching: {e}"))),
        };
        let report = report.inspect_err(|_| cleanup(&dirs))?;
        let runtimes: Vec<VmmRuntime> = report
            .children
            .iter()
            .map(|c| VmmRuntime {
                dir: c.dir.clone(),
                pid: c.pid,
                start_time: c.start_time,
                config: c.dir.join("vm.json"),
                control_socket: c.dir.join("control.sock"),
                vsock_socket: c.dir.join("vsock.sock"),
                console_log: c.dir.join("console.log"),
                vmm_log: c.dir.join("vmm.log"),
            })
            .collect();
        // Bring every child to a ready, reseeded agent, in parallel.
        let timeout = self.options.boot_timeout;
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = runtimes.iter().map(|rt| scope.spawn(move || child_ready(rt, timeout))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::internal("child readiness thread panicked"))))
                .collect()
        });
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
        match std::fs::remove_dir_all(&rt.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(format!("removing {}: {e}", rt.dir.display()))),
        }
    }

    fn probe(&self, runtime: &RuntimeHandle) -> Liveness {
        match VmmRuntime::from_handle(runtime) {
            Ok(rt) if rt.alive() => Liveness::Running,
            Ok(rt) => {
                Liveness::Exited(process::last_error(&rt.vmm_log).unwrap_or_else(|| "VMM process is gone".into()))
            }
            Err(e) => Liveness::Exited(e.to_string()),
        }
    }

    fn memory_usage(&self, runtime: &RuntimeHandle) -> Result<MemoryUsage> {
        let rt = VmmRuntime::from_handle(runtime)?;
        let (rss_kib, pss_kib, private_dirty_kib) = process::smaps_rollup(rt.pid)
            .map_err(|e| Error::Unavailable(format!("sandbox VMM (pid {}) memory: {e}", rt.pid)))?;
        Ok(MemoryUsage { rss_kib, pss_kib, private_dirty_kib })
    }

    fn console(&self, runtime: &RuntimeHandle, max_bytes: u64) -> Result<Vec<u8>> {
        let rt = VmmRuntime::from_handle(runtime)?;
        Ok(process::tail(&rt.console_log, max_bytes))
    }
}
