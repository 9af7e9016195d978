//! Booting a new sandbox: resolve kernel and image, make its network and cgroup, write its
//! `vm.json`, start `forkd-vmm` inside the cgroup with its tap, and wait for the guest agent.

use crate::runtime::VmmRuntime;
use crate::{agent, isolation, process, KvmBackend};
use forkd_cgroup::SandboxCgroup;
use forkd_core::{Error, Result, SandboxId, SandboxSpec};
use forkd_net::SandboxNetwork;
use forkd_vmm::config::{DiskConfig, NetDeviceConfig, RestoreConfig, VmConfig, VsockConfig};
use forkd_vmm::control::{self, ControlRequest};
use forkd_vmm::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::internal(format!("{what}: {e}"))
}

impl KvmBackend {
    /// Boots sandbox `id`; on failure nothing of it is left on the host.
    pub(crate) fn boot(&self, id: &SandboxId, spec: &SandboxSpec) -> Result<VmmRuntime> {
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
        self.launch(&dir, &config, &net, &cgroup, Start::Boot).inspect_err(|_| {
            let _ = isolation::teardown(Some(&net), Some(&cgroup));
            let _ = std::fs::remove_dir_all(&dir);
        })
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
            restore: None,
        }
    }

    /// Restores sandbox `id` from snapshot `tag_or_id`: its own directory, disk layer over the
    /// snapshot's layers, network and cgroup (per the snapshot's spec), and a VMM that maps the
    /// snapshot's memory; returns once the guest agent answered with the wall clock set.
    pub(crate) fn restore_sandbox(&self, id: &SandboxId, tag_or_id: &str) -> Result<(VmmRuntime, SandboxSpec)> {
        use crate::snapshots::{snapshot_error, spec_of};
        let store = self.store();
        let snap = store.get(tag_or_id).map_err(snapshot_error)?;
        store.check_for_restore(&snap).map_err(snapshot_error)?;
        let plan = store.restore_plan(&snap).map_err(snapshot_error)?;
        let chain = store.chain(&snap).map_err(snapshot_error)?;
        let m = &snap.manifest;
        let spec = spec_of(m)?;
        let mut config: VmConfig = serde_json::from_value(m.guest.clone()).map_err(|e| {
            Error::FailedPrecondition(format!("snapshot {}: its VM configuration does not load: {e}", m.id))
        })?;
        let rootfs = self.restore_image(m)?;
        let net_spec = isolation::network_spec(&spec)?;
        let dir = self.dirs.sandboxes().join(id.as_str());
        let disk_dir = dir.join("disk");
        std::fs::create_dir_all(&disk_dir).map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
        let made = (|| -> Result<(VmmRuntime, SandboxSpec)> {
            let mut layers = Vec::new();
            for name in &m.disk {
                let link = disk_dir.join(name);
                std::fs::hard_link(snap.dir.join("disk").join(name), &link)
                    .map_err(|e| Error::internal(format!("linking disk layer {name} of snapshot {}: {e}", m.id)))?;
                layers.push(link);
            }
            layers.push(disk_dir.join(forkd_vmm::disk::layer_name(m.disk.len())));
            let limits = isolation::cgroup_limits(&spec, &disk_dir);
            let (net, cgroup) = isolation::create(id.as_str(), &net_spec, &limits, &self.dirs.state)?;
            let system_map = config.system_map.take().filter(|p| p.is_file());
            let mut visible: Vec<Option<&Path>> = chain.iter().map(|s| Some(s.dir.as_path())).collect();
            visible.push(Some(&rootfs));
            visible.push(system_map.as_deref());
            config.jail = isolation::jail_enabled().then(|| isolation::jail(&self.dirs.sandboxes(), &visible));
            config.system_map = system_map.clone();
            config.console_log = Some(dir.join("console.log"));
            config.console_echo = self.options.console_echo;
            config.control_socket = dir.join("control.sock");
            config.vsock = config.vsock.take().map(|v| VsockConfig { uds_path: dir.join("vsock.sock"), ..v });
            config.root_disk = Some(DiskConfig { base: rootfs.clone(), layers });
            config.net = net.nic.as_ref().map(|nic| NetDeviceConfig { tap_fd: isolation::TAP_FD, mac: nic.guest_mac });
            config.restore = Some(RestoreConfig { snapshot: snap.dir.clone(), memory: plan.clone() });
            let mut rt = self.launch(&dir, &config, &net, &cgroup, Start::Restore).inspect_err(|_| {
                let _ = isolation::teardown(Some(&net), Some(&cgroup));
            })?;
            rt.restored_from = Some(m.id.clone());
            Ok((rt, spec.clone()))
        })();
        made.inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })
    }

    /// The image a snapshot's disk sits on, as long as it is the same image.
    fn restore_image(&self, m: &forkd_snapshot::Manifest) -> Result<PathBuf> {
        let name = m.image.name.clone().unwrap_or_default();
        let missing = |why: String| {
            Error::FailedPrecondition(format!(
                "snapshot {} needs image `{name}` (sha256 {}): {why}; rebuild or import that image (`forkd image ls`)",
                m.id, m.image.sha256
            ))
        };
        let image = forkd_guest::image::get(&self.dirs, &name).map_err(|e| missing(e.to_string()))?;
        if image.manifest.sha256 != m.image.sha256 {
            return Err(missing(format!("the image now has sha256 {}", image.manifest.sha256)));
        }
        if !image.rootfs.is_file() {
            return Err(missing(format!("{} is missing", image.rootfs.display())));
        }
        Ok(image.rootfs)
    }

    /// Starts `forkd-vmm` for the config in `dir` and waits for the guest agent.
    fn launch(
        &self,
        dir: &Path,
        config: &VmConfig,
        net: &SandboxNetwork,
        cgroup: &SandboxCgroup,
        start: Start,
    ) -> Result<VmmRuntime> {
        let config_path = dir.join("vm.json");
        let json = serde_json::to_vec_pretty(config).map_err(|e| Error::internal(e.to_string()))?;
        std::fs::write(&config_path, json).map_err(io("writing vm.json"))?;
        let log = std::fs::File::create(dir.join("vmm.log")).map_err(io("creating vmm.log"))?;
        let tap: Option<OwnedFd> = match &net.nic {
            Some(_) => Some(net.open_tap().map_err(isolation::net_error)?),
            None => None,
        };
        let procs = isolation::procs_files(cgroup)?;
        let mut command = Command::new(&self.vmm_binary);
        command
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl-C at the CLI must not kill sandboxes the daemon owns.
            .process_group(0);
        enter_cgroup_with_tap(&mut command, &procs, tap.as_ref());
        let mut child = command.spawn().map_err(io(&format!("starting {}", self.vmm_binary.display())))?;
        drop(tap);
        drop(procs);
        let runtime = VmmRuntime::in_dir(
            dir,
            child.id(),
            process::start_time(child.id()).unwrap_or(0),
            Some(net.clone()),
            Some(cgroup.clone()),
        );
        let started = Instant::now();
        if start == Start::Restore {
            if let Err(e) = crate::ready::child_ready(&runtime, self.options.boot_timeout, true) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            tracing::info!(pid = runtime.pid, "restored sandbox ready in {:?}", started.elapsed());
            spawn_reaper(child)?;
            return Ok(runtime);
        }
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
        spawn_reaper(child)?;
        Ok(runtime)
    }
}

/// How a launched VMM comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Boots its kernel: ready when the agent answers a ping.
    Boot,
    /// Maps a snapshot: ready when the agent answered a reseed that set its clock.
    Restore,
}

/// Reaps the VMM whenever it exits; if this process dies first, init adopts it.
fn spawn_reaper(mut child: std::process::Child) -> Result<()> {
    std::thread::Builder::new()
        .name("vmm-reaper".into())
        .spawn(move || child.wait())
        .map(|_| ())
        .map_err(io("reaper thread"))
}

/// Has the started VMM move itself into its cgroup (before it allocates anything) and find
/// its tap at [`isolation::TAP_FD`], without close-on-exec.
fn enter_cgroup_with_tap(command: &mut Command, procs: &[std::fs::File], tap: Option<&OwnedFd>) {
    let tap_raw = tap.map(|t| t.as_raw_fd());
    let procs_raw: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure only calls write(2) and dup2(2), which are async-signal-safe, on fds
    // the caller keeps open until spawn returns.
    unsafe {
        command.pre_exec(move || {
            for fd in &procs_raw {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = tap_raw {
                if libc::dup2(fd, isolation::TAP_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Hands the zero pages a fresh boot leaves in guest RAM back to the host (a few ms of pause):
/// the sandbox's RSS shrinks and BRANCH children later share only pages that hold data. Best
/// effort: a VMM that cannot do it still runs correctly. (The VMM logs what it released.)
fn release_boot_zero_pages(runtime: &VmmRuntime) {
    if let Err(e) =
        control::request(&runtime.control_socket, &ControlRequest::ReleaseZeroPages, Duration::from_secs(10))
    {
        tracing::warn!("could not release the guest's zero pages: {e}");
    }
}
