//! One handler per control request, run on the VMM's main thread (see `runtime`).
//!
//! [`ServedVm`] is the VM being served and what control requests changed about it (paused or
//! not, since when it serves). Work that needs guest memory still (zero-page release, the
//! file-snapshot baseline) goes through [`ServedVm::with_vcpus_parked`], which leaves a VM the
//! user paused paused.

use crate::branch::{self, Background, BranchSide};
use crate::control::{self, ControlResponse, VmStatus};
use crate::machine::Machine;
use crate::VmConfig;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The VM one serve loop runs.
pub struct ServedVm {
    pub machine: Machine,
    pub config: VmConfig,
    /// Parked on request (`pause`), until `resume`.
    paused: bool,
    /// CLOCK_MONOTONIC when this process began serving this VM (see `VmStatus`).
    serving_since_ns: u64,
}

/// What a BRANCH request left this process as.
pub enum Branched {
    /// Still the source: keep serving it, and send this answer.
    Source(Box<ServedVm>, Box<ControlResponse>),
    /// A new child: serve its machine from now on.
    Child(Box<Machine>, Box<VmConfig>, Option<Background>),
}

impl ServedVm {
    pub fn new(machine: Machine, config: VmConfig) -> Self {
        Self { machine, config, paused: false, serving_since_ns: control::monotonic_ns() }
    }

    pub fn status(&self) -> ControlResponse {
        let status = VmStatus {
            pid: std::process::id(),
            state: if self.paused { "paused" } else { "running" }.into(),
            uptime_ms: control::monotonic_ns().saturating_sub(self.serving_since_ns) / 1_000_000,
            serving_since_ns: self.serving_since_ns,
            vcpus: self.machine.vcpu_count(),
            memory_mib: self.config.memory_mib,
            cpu_profile: format!("{:?}", self.machine.profile).to_lowercase(),
            emulated: crate::emulate::counts().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        ControlResponse { status: Some(status), ..ControlResponse::ok() }
    }

    pub fn pause(&mut self) -> ControlResponse {
        self.machine.vcpus.park();
        self.paused = true;
        ControlResponse::ok()
    }

    pub fn resume(&mut self) -> ControlResponse {
        self.machine.vcpus.resume();
        self.paused = false;
        ControlResponse::ok()
    }

    /// Runs `work` with every vCPU parked (devices run on this thread, so nothing else writes
    /// guest memory meanwhile), then lets them run again unless the VM was paused before.
    /// Returns `work`'s result and how long the vCPUs were stopped.
    fn with_vcpus_parked<T>(&self, work: impl FnOnce(&Machine) -> T) -> (T, Duration) {
        let started = Instant::now();
        self.machine.vcpus.park();
        let result = work(&self.machine);
        if !self.paused {
            self.machine.vcpus.resume();
        }
        (result, started.elapsed())
    }

    pub fn release_zero_pages(&self) -> ControlResponse {
        let (result, pause) = self.with_vcpus_parked(|m| crate::memory::release_zero_pages(&m.memory));
        let pause_us = pause.as_micros() as u64;
        match result {
            Ok(pages) => {
                tracing::info!(
                    "released {} KiB of zero pages ({} KiB were backed) in {pause_us} µs",
                    pages.released_bytes >> 10,
                    pages.resident_bytes >> 10
                );
                ControlResponse { release: Some(control::ReleaseReport { pause_us, pages }), ..ControlResponse::ok() }
            }
            Err(e) => ControlResponse::error(format!("releasing zero pages: {e}")),
        }
    }

    /// The file-snapshot baseline: all of guest RAM written out with the guest stopped, to the
    /// file passed with the request (the jailed VMM cannot open host paths) or else `path`.
    pub fn dump_memory(&self, path: &Path, fds: Vec<OwnedFd>) -> ControlResponse {
        let passed = fds.into_iter().next().map(std::fs::File::from);
        let (result, pause) = self.with_vcpus_parked(|m| write_memory(m, path, passed));
        match result {
            Ok(bytes) => ControlResponse {
                dump: Some(control::DumpReport { pause_us: pause.as_micros() as u64, bytes }),
                ..ControlResponse::ok()
            },
            Err(e) => ControlResponse::error(format!("dumping memory to {}: {e}", path.display())),
        }
    }

    /// Forks this VM into one child per directory (see `branch`). In the source the VM keeps
    /// its paused state and its config follows the disk's new top layer.
    pub fn branch(self, children: &[PathBuf], gate: bool, fds: Vec<OwnedFd>) -> Branched {
        if let Some(bad) = children.iter().find(|d| !d.is_dir()) {
            let resp = ControlResponse::error(format!("child directory {} does not exist", bad.display()));
            return Branched::Source(Box::new(self), Box::new(resp));
        }
        let asked = Instant::now();
        let mut taps = fds;
        let gate = if gate { taps.pop() } else { None };
        let ServedVm { machine, mut config, paused, serving_since_ns } = self;
        match branch::branch(machine, &config, children, taps, gate, paused) {
            BranchSide::Child(machine, config, background) => Branched::Child(machine, config, background),
            BranchSide::Parent(machine, report) => {
                record_disk_chain(&machine, &mut config);
                let resp = match report {
                    Ok(report) => {
                        tracing::info!(
                            "branched into {} children: paused {} µs, all forked after {:?}",
                            report.children.len(),
                            report.pause_us,
                            asked.elapsed()
                        );
                        ControlResponse { branch: Some(report), ..ControlResponse::ok() }
                    }
                    Err(e) => ControlResponse::error(e.to_string()),
                };
                let machine = *machine;
                Branched::Source(Box::new(ServedVm { machine, config, paused, serving_since_ns }), Box::new(resp))
            }
        }
    }

    /// Starts a durable snapshot: the writer is forked and runs on its own (see `snapshot`).
    pub fn snapshot(&mut self, manifest: forkd_snapshot::Manifest, diff: bool, fds: Vec<OwnedFd>) -> ControlResponse {
        let mut fds = fds.into_iter();
        let (Some(root), Some(staging)) = (fds.next(), fds.next()) else {
            return ControlResponse::error("a snapshot needs the store's root and the staging directory passed as fds");
        };
        let parent_pages = match (diff, fds.next()) {
            (false, _) => None,
            (true, Some(fd)) => Some(fd),
            (true, None) => return ControlResponse::error("a diff snapshot needs the parent's memory.pages as an fd"),
        };
        let job = crate::snapshot::SnapshotJob { root, staging, manifest, parent_pages };
        let result = crate::snapshot::snapshot(&mut self.machine, job, self.paused);
        match result {
            Ok(report) => {
                record_disk_chain(&self.machine, &mut self.config);
                tracing::info!("snapshot writer {} started: paused {} µs", report.writer_pid, report.pause_us);
                ControlResponse { snapshot: Some(report), ..ControlResponse::ok() }
            }
            Err(e) => ControlResponse::error(format!("snapshot: {e}")),
        }
    }

    /// Reaps snapshot writers that have exited (they are this process's children).
    pub fn reap_writers(&self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on any child, without blocking; `status` is a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            tracing::debug!(pid, status, "snapshot writer exited");
        }
    }

    /// Stops the vCPUs and removes this VM's sockets; the process exits after.
    pub fn finish(self) {
        crate::bus::lock(&self.machine.serial).flush();
        self.machine.vcpus.stop();
        let _ = std::fs::remove_file(&self.config.control_socket);
        if let Some(vsock) = &self.config.vsock {
            let _ = std::fs::remove_file(&vsock.uds_path);
        }
    }
}

/// Makes one system call outside the seccomp allow-list: a jailed VMM dies here (and is
/// reported as killed by seccomp); an unjailed one answers with an error.
pub fn probe_seccomp() -> ControlResponse {
    // SAFETY: SYSLOG_ACTION_SIZE_BUFFER (10) only reads the log buffer size.
    let rc = unsafe { libc::syscall(libc::SYS_syslog, 10, std::ptr::null_mut::<libc::c_char>(), 0) };
    ControlResponse::error(format!("the seccomp filter is not active (syslog returned {rc})"))
}

/// Writes every guest RAM region to `passed` (or a new file at `path`) and syncs it.
fn write_memory(machine: &Machine, path: &Path, passed: Option<std::fs::File>) -> std::io::Result<u64> {
    use std::io::Write;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut file = match passed {
        Some(file) => file,
        None => std::fs::File::create(path)?,
    };
    let mut bytes = 0u64;
    for region in machine.memory.iter() {
        // SAFETY: the region maps `len()` bytes for the VM's lifetime; the caller keeps the
        // vCPUs parked and devices run on this thread, so nothing writes it during the copy.
        let slice = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        file.write_all(slice)?;
        bytes += slice.len() as u64;
    }
    file.sync_all()?;
    Ok(bytes)
}

/// After a BRANCH the source writes to a new top layer; keep its config (and vm.json, which
/// `forkd inspect` shows) in step.
fn record_disk_chain(machine: &Machine, config: &mut VmConfig) {
    if let (Some(disk), Some(root)) = (&machine.disk, &mut config.root_disk) {
        root.layers = crate::bus::lock(disk).layer_paths();
        if let Some(path) =
            root.layers.last().and_then(|top| top.parent()).and_then(|d| d.parent()).map(|d| d.join("vm.json"))
        {
            if path.exists() {
                if let Ok(json) = serde_json::to_vec_pretty(&config) {
                    let _ = std::fs::write(path, json);
                }
            }
        }
    }
}
