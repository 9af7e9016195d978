//! The VMM process's main loop: one thread multiplexing the control socket, guest-exit
//! notifications and device backends with epoll (event-manager), while vCPU threads run.
//!
//! Requests are parsed by the control subscriber but executed here, with full access to the
//! machine: that keeps every state change on one thread, which BRANCH relies on (the forking
//! thread is the only thread that is not parked). A BRANCH child leaves the loop with its new
//! machine and config and enters it again, with its own control socket and event loop.

use crate::branch::{self, Background, BranchSide};
use crate::control::{self, ControlRequest, ControlResponse, VmStatus};
use crate::machine::Machine;
use crate::vcpu::GuestExit;
use crate::{VmConfig, VmmError};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_sys_util::epoll::EventSet;

/// A subscriber as the event loop stores it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

type Pending = Arc<Mutex<VecDeque<(UnixStream, ControlRequest, Vec<std::os::fd::OwnedFd>)>>>;

/// Accepts control connections and queues their requests for the main loop.
struct ControlListener {
    listener: UnixListener,
    pending: Pending,
}

impl MutEventSubscriber for ControlListener {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            // Accepted sockets inherit non-blocking mode; requests are read with a timeout.
            let _ = stream.set_nonblocking(false);
            match control::read_request_with_fds(&stream) {
                Ok((req, fds)) => crate::bus::lock(&self.pending).push_back((stream, req, fds)),
                Err(e) => control::write_response(&stream, &ControlResponse::error(e)),
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("cannot watch the control socket: {e:?}");
        }
    }
}

/// Wakes the loop when a vCPU reports that the guest stopped.
struct ExitWatcher {
    control: Arc<crate::vcpu::RunControl>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.control.exit_event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.control.exit_event().as_raw_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
            tracing::error!("cannot watch the guest exit event: {e:?}");
        }
    }
}

/// How the VM ended.
#[derive(Debug)]
pub enum Outcome {
    /// Stopped on request (control `shutdown`) or the guest powered off / reset.
    Stopped(String),
    /// The guest died in a way the VMM reports as an error.
    Crashed(String),
}

/// What one pass of the serve loop ended with.
enum Served {
    Done(Outcome),
    /// This process became a BRANCH child: serve the new machine.
    BecameChild(Box<Machine>, Box<VmConfig>, Option<Background>),
}

fn bind_control(config: &VmConfig) -> Result<UnixListener, VmmError> {
    let path = &config.control_socket;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|source| VmmError::Io { what: format!("binding control socket {}", path.display()), source })?;
    listener.set_nonblocking(true).map_err(|source| VmmError::Io { what: "control socket".into(), source })?;
    Ok(listener)
}

/// Names the calling thread (the VMM's main thread, which `ps` shows) after the sandbox
/// directory, e.g. `sb-22cd42715815`, so operators can tell VMM processes apart.
pub fn name_process(sandbox_dir: &std::path::Path) {
    let name = sandbox_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut bytes: Vec<u8> = name.bytes().filter(|b| *b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `bytes`.
    unsafe {
        libc::prctl(
            libc::PR_SET_NAME,
            bytes.as_ptr() as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
}

/// Boots `config` and serves it (and, in BRANCH children, their own VMs) until it ends.
pub fn run(config: &VmConfig) -> Result<Outcome, VmmError> {
    // Sockets exist before the guest boots, so launchers can connect as soon as it is up.
    let listener = bind_control(config)?;
    if let Some(dir) = config.control_socket.parent() {
        name_process(dir);
    }
    if let Some(jail) = &config.jail {
        // Before the VM exists: every thread the VMM starts later inherits the jail.
        let done = forkd_jail::apply(jail).map_err(|e| VmmError::Jail(e.to_string()))?;
        tracing::info!("jailed: {}", done.join(", "));
    }
    let started = Instant::now();
    let machine = Machine::boot(config)?;
    tracing::info!("booted in {:?}", started.elapsed());
    let mut current = (machine, config.clone(), listener, None);
    loop {
        let (machine, config, listener, background) = current;
        match serve(machine, config, listener, background)? {
            Served::Done(outcome) => return Ok(outcome),
            Served::BecameChild(machine, config, background) => {
                let listener = bind_control(&config)?;
                tracing::info!("branch child serving {}", config.control_socket.display());
                current = (*machine, *config, listener, background);
            }
        }
    }
}

/// Wakes the loop when every sibling of a BRANCH child has been rebuilt (end of file on their
/// shared pipe, see `branch::Background`).
struct SiblingsWatcher {
    background: Background,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl MutEventSubscriber for SiblingsWatcher {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = ops.remove(Events::new(&self.background.siblings, EventSet::IN));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if ops.add(Events::new(&self.background.siblings, EventSet::IN)).is_err() {
            // Cannot watch: fall back to the time limit alone.
            tracing::debug!("cannot watch the siblings' pipe");
        }
    }
}

fn serve(
    mut machine: Machine,
    mut config: VmConfig,
    listener: UnixListener,
    background: Option<Background>,
) -> Result<Served, VmmError> {
    let started = Instant::now();
    let serving_since_ns = control::monotonic_ns();
    let mut manager: EventManager<Subscriber> = EventManager::new()
        .map_err(|e| VmmError::Io { what: format!("event loop: {e:?}"), source: std::io::Error::other("epoll") })?;
    let pending: Pending = Arc::default();
    manager.add_subscriber(Arc::new(Mutex::new(ControlListener { listener, pending: pending.clone() })));
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher { control: machine.control.clone() })));
    for (_, slot) in &machine.virtio {
        manager.add_subscriber(slot.transport.clone());
    }
    let siblings_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut background_until = background.as_ref().map(|b| b.until);
    if let Some(background) = background {
        manager.add_subscriber(Arc::new(Mutex::new(SiblingsWatcher { background, done: siblings_done.clone() })));
    }

    let mut paused = false;
    loop {
        let timeout = background_until
            .map_or(1000, |until| until.saturating_duration_since(Instant::now()).as_millis().clamp(1, 1000) as i32);
        if let Err(e) = manager.run_with_timeout(timeout) {
            tracing::warn!("event loop: {e:?}");
        }
        if let Some(until) = background_until {
            if siblings_done.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() >= until {
                if let Err(e) = machine.vcpus.leave_background() {
                    tracing::error!("cannot bring the guest back to normal priority: {e}");
                }
                tracing::info!("guest at normal priority after {:?}", started.elapsed());
                // Setting up is over: give back the heap pages it used and freed.
                // SAFETY: malloc_trim only returns free heap pages to the kernel.
                unsafe { libc::malloc_trim(0) };
                background_until = None;
            }
        }
        if let Some(exit) = machine.control.take_exit() {
            let outcome = match exit {
                GuestExit::Shutdown(why) => Outcome::Stopped(why),
                GuestExit::Fatal(why) => Outcome::Crashed(why),
            };
            finish(machine, &config);
            return Ok(Served::Done(outcome));
        }
        let requests: Vec<_> = crate::bus::lock(&pending).drain(..).collect();
        for (stream, req, fds) in requests {
            let resp = match req {
                ControlRequest::Status => ControlResponse {
                    status: Some(status(&config, &machine, serving_since_ns, paused)),
                    ..ControlResponse::ok()
                },
                ControlRequest::Pause => {
                    machine.vcpus.park();
                    paused = true;
                    ControlResponse::ok()
                }
                ControlRequest::Resume => {
                    machine.vcpus.resume();
                    paused = false;
                    ControlResponse::ok()
                }
                ControlRequest::Shutdown => {
                    control::write_response(&stream, &ControlResponse::ok());
                    finish(machine, &config);
                    return Ok(Served::Done(Outcome::Stopped("shutdown requested".into())));
                }
                ControlRequest::ProbeSeccomp => {
                    // SAFETY: SYSLOG_ACTION_SIZE_BUFFER (10) only reads the log buffer size.
                    let rc = unsafe { libc::syscall(libc::SYS_syslog, 10, std::ptr::null_mut::<libc::c_char>(), 0) };
                    ControlResponse::error(format!("the seccomp filter is not active (syslog returned {rc})"))
                }
                ControlRequest::DumpMemory { path } => match dump_memory(&machine, &path, fds) {
                    Ok(dump) => ControlResponse { dump: Some(dump), ..ControlResponse::ok() },
                    Err(e) => ControlResponse::error(format!("dumping memory to {}: {e}", path.display())),
                },
                ControlRequest::ReleaseZeroPages => {
                    let started = Instant::now();
                    machine.vcpus.park();
                    // Devices run on this thread: with the vCPUs parked nothing writes guest RAM.
                    let result = crate::memory::release_zero_pages(&machine.memory);
                    if !paused {
                        machine.vcpus.resume();
                    }
                    let pause_us = started.elapsed().as_micros() as u64;
                    match result {
                        Ok(pages) => {
                            tracing::info!(
                                "released {} KiB of zero pages ({} KiB were backed) in {pause_us} µs",
                                pages.released_bytes >> 10,
                                pages.resident_bytes >> 10
                            );
                            ControlResponse {
                                release: Some(control::ReleaseReport { pause_us, pages }),
                                ..ControlResponse::ok()
                            }
                        }
                        Err(e) => ControlResponse::error(format!("releasing zero pages: {e}")),
                    }
                }
                ControlRequest::Branch { children, gate } => {
                    if let Some(bad) = children.iter().find(|d| !d.is_dir()) {
                        control::write_response(
                            &stream,
                            &ControlResponse::error(format!("child directory {} does not exist", bad.display())),
                        );
                        continue;
                    }
                    let asked = Instant::now();
                    let mut taps = fds;
                    let gate = if gate { taps.pop() } else { None };
                    match branch::branch(machine, &config, &children, taps, gate) {
                        BranchSide::Child(machine, config, background) => {
                            // The parent answers the request; this copy of the stream just closes.
                            drop(stream);
                            return Ok(Served::BecameChild(machine, config, background));
                        }
                        BranchSide::Parent(m, report) => {
                            machine = m;
                            if paused {
                                machine.vcpus.park();
                            }
                            record_disk_chain(&machine, &mut config);
                            match report {
                                Ok(report) => {
                                    tracing::info!(
                                        "branched into {} children: paused {} µs, all forked after {:?}",
                                        report.children.len(),
                                        report.pause_us,
                                        asked.elapsed()
                                    );
                                    ControlResponse { branch: Some(report), ..ControlResponse::ok() }
                                }
                                Err(e) => ControlResponse::error(e),
                            }
                        }
                    }
                }
            };
            control::write_response(&stream, &resp);
        }
    }
}

/// The file-snapshot baseline: the guest stays paused while all of its RAM is written out, to
/// the file passed with the request (the jailed VMM cannot open host paths) or else `path`.
fn dump_memory(
    machine: &Machine,
    path: &std::path::Path,
    fds: Vec<std::os::fd::OwnedFd>,
) -> std::io::Result<control::DumpReport> {
    use std::io::Write;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let passed = fds.into_iter().next().map(std::fs::File::from);
    let started = Instant::now();
    machine.vcpus.park();
    let result = (|| -> std::io::Result<u64> {
        let mut file = match passed {
            Some(file) => file,
            None => std::fs::File::create(path)?,
        };
        let mut bytes = 0u64;
        for region in machine.memory.iter() {
            // SAFETY: the region maps `len()` bytes for the VM's lifetime; vCPUs are parked
            // and devices run on this thread, so nothing writes it during the copy.
            let slice = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
            file.write_all(slice)?;
            bytes += slice.len() as u64;
        }
        file.sync_all()?;
        Ok(bytes)
    })();
    machine.vcpus.resume();
    Ok(control::DumpReport { pause_us: started.elapsed().as_micros() as u64, bytes: result? })
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

fn finish(machine: Machine, config: &VmConfig) {
    crate::bus::lock(&machine.serial).flush();
    machine.vcpus.stop();
    let _ = std::fs::remove_file(&config.control_socket);
    if let Some(vsock) = &config.vsock {
        let _ = std::fs::remove_file(&vsock.uds_path);
    }
}

fn status(config: &VmConfig, machine: &Machine, serving_since_ns: u64, paused: bool) -> VmStatus {
    VmStatus {
        pid: std::process::id(),
        state: if paused { "paused" } else { "running" }.into(),
        uptime_ms: control::monotonic_ns().saturating_sub(serving_since_ns) / 1_000_000,
        serving_since_ns,
        vcpus: machine.vcpu_count(),
        memory_mib: config.memory_mib,
        cpu_profile: format!("{:?}", machine.profile).to_lowercase(),
        emulated: crate::emulate::counts().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}
