//! The VMM process's main loop: one thread multiplexing the control socket, guest-exit
//! notifications and device backends with epoll (event-manager), while vCPU threads run.
//!
//! Requests are parsed by the control subscriber but executed on this thread (one handler per
//! request, in `handlers`), with full access to the machine: that keeps every state change on
//! one thread, which BRANCH relies on (the forking thread is the only thread that is not parked). A BRANCH child leaves the loop with its new
//! machine and config and enters it again, with its own control socket and event loop.

use crate::branch::Background;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::handlers::{self, Branched, ServedVm};
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
                Err(e) => control::write_response(&stream, &ControlResponse::error(e.to_string())),
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

/// Boots `config` and serves it (and, in BRANCH children, their own VMs) until it ends.
pub fn run(config: &VmConfig) -> Result<Outcome, VmmError> {
    // Sockets exist before the guest boots, so launchers can connect as soon as it is up.
    let listener = bind_control(config)?;
    if let Some(dir) = config.control_socket.parent() {
        crate::identity::name_process(dir);
    }
    if let Some(jail) = &config.jail {
        // Before the VM exists: every thread the VMM starts later inherits the jail.
        let done = forkd_jail::apply(jail)?;
        tracing::info!("jailed: {}", done.join(", "));
    }
    let started = Instant::now();
    let machine = match &config.restore {
        Some(restore) => {
            let machine = Machine::restore(config, restore)?;
            tracing::info!("restored from {} in {:?}", restore.snapshot.display(), started.elapsed());
            machine
        }
        None => {
            let machine = Machine::boot(config)?;
            tracing::info!("booted in {:?}", started.elapsed());
            machine
        }
    };
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
    machine: Machine,
    config: VmConfig,
    listener: UnixListener,
    background: Option<Background>,
) -> Result<Served, VmmError> {
    let started = Instant::now();
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

    let mut vm = ServedVm::new(machine, config);
    loop {
        let timeout = background_until
            .map_or(1000, |until| until.saturating_duration_since(Instant::now()).as_millis().clamp(1, 1000) as i32);
        if let Err(e) = manager.run_with_timeout(timeout) {
            tracing::warn!("event loop: {e:?}");
        }
        if let Some(until) = background_until {
            if siblings_done.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() >= until {
                if let Err(e) = vm.machine.vcpus.leave_background() {
                    tracing::error!("cannot bring the guest back to normal priority: {e}");
                }
                tracing::info!("guest at normal priority after {:?}", started.elapsed());
                // Setting up is over: give back the heap pages it used and freed.
                // SAFETY: malloc_trim only returns free heap pages to the kernel.
                unsafe { libc::malloc_trim(0) };
                background_until = None;
            }
        }
        if let Some(exit) = vm.machine.control.take_exit() {
            let outcome = match exit {
                GuestExit::Shutdown(why) => Outcome::Stopped(why),
                GuestExit::Fatal(why) => Outcome::Crashed(why),
            };
            vm.finish();
            return Ok(Served::Done(outcome));
        }
        vm.reap_writers();
        let requests: Vec<_> = crate::bus::lock(&pending).drain(..).collect();
        for (stream, req, fds) in requests {
            let resp = match req {
                ControlRequest::Status => vm.status(),
                ControlRequest::Pause => vm.pause(),
                ControlRequest::Resume => vm.resume(),
                ControlRequest::Shutdown => {
                    control::write_response(&stream, &ControlResponse::ok());
                    vm.finish();
                    return Ok(Served::Done(Outcome::Stopped("shutdown requested".into())));
                }
                ControlRequest::ProbeSeccomp => handlers::probe_seccomp(),
                ControlRequest::DumpMemory { path } => vm.dump_memory(&path, fds),
                ControlRequest::ReleaseZeroPages => vm.release_zero_pages(),
                ControlRequest::Snapshot { manifest, diff } => vm.snapshot(*manifest, diff, fds),
                ControlRequest::Branch { children, gate } => match vm.branch(&children, gate, fds) {
                    Branched::Source(source, resp) => {
                        vm = *source;
                        *resp
                    }
                    Branched::Child(machine, config, background) => {
                        // The source answers the request; this copy of the stream just closes.
                        drop(stream);
                        return Ok(Served::BecameChild(machine, config, background));
                    }
                },
            };
            control::write_response(&stream, &resp);
        }
    }
}
