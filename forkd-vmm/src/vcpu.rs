//! vCPU threads: setup, the `KVM_RUN` loop, exit dispatch, and parking.
//!
//! Parking is how the rest of the VMM gets a quiescent guest (for pause, shutdown and BRANCH):
//! the controller sets the desired state and kicks every vCPU with a signal whose handler sets
//! `kvm_run.immediate_exit`, so a kick can never be lost between the state check and `KVM_RUN`.

use crate::arch::state::{self, StateError, VcpuState};
use crate::arch::{cpuid, regs};
use crate::bus::Bus;
use crate::emulate::{self, EmulationFailure};
use crate::memory::GuestMemory;
use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {id}: {source}")]
    Create { id: u8, source: kvm_ioctls::Error },
    #[error("configuring vCPU {id} ({what}): {source}")]
    Configure { id: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("spawning vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
    #[error("restoring vCPU {id}: {source}")]
    Restore { id: u8, source: StateError },
    #[error("saving vCPU {id}: {source}")]
    Save { id: u8, source: StateError },
    #[error("vCPU {id} exited before saving its state")]
    ExitedBeforeSave { id: u8 },
}

/// Why the guest stopped running, as reported to the VMM's main loop.
#[derive(Debug, Clone)]
pub enum GuestExit {
    /// The guest asked to power off or reboot (keyboard-controller reset, KVM system event).
    Shutdown(String),
    /// The guest crashed or hit something the VMM cannot handle.
    Fatal(String),
}

/// What the controller wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    Run,
    Park,
    Exit,
}

struct ControlState {
    desired: Desired,
    /// Bumped on every request, so a request can be told apart from the previous one even
    /// when a vCPU has not yet woken from it (back-to-back BRANCHes).
    generation: u64,
    /// Per vCPU: the generation of the last park request it acknowledged.
    acked: Vec<u64>,
    /// Per vCPU: its thread has ended.
    exited: Vec<bool>,
    /// When set, each vCPU captures its state into `saved` before acknowledging a park.
    save_requested: bool,
    saved: Vec<Option<Result<VcpuState, StateError>>>,
    /// vCPUs that start now go to `SCHED_IDLE` first (see `RunControl::start_in_background`);
    /// cleared by `leave_background`. Read and written under the lock, so a vCPU thread that
    /// starts late cannot demote itself after the VMM brought every thread back.
    background: bool,
}

/// Shared between the VMM's control thread and all vCPU threads.
pub struct RunControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Set once by the first vCPU that stops the guest; the main loop reads it.
    exit: Mutex<Option<GuestExit>>,
    exit_event: EventFd,
}

impl RunControl {
    /// Whether vCPU threads started from now on move to `SCHED_IDLE` before their first guest
    /// instruction (see `branch::Background`), until `VcpuSet::leave_background`.
    pub fn start_in_background(&self, on: bool) {
        self.lock().background = on;
    }

    pub fn new(vcpus: usize) -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::new(ControlState {
                desired: Desired::Run,
                generation: 0,
                acked: vec![0; vcpus],
                exited: vec![false; vcpus],
                save_requested: false,
                saved: Vec::new(),
                background: false,
            }),
            changed: Condvar::new(),
            exit: Mutex::new(None),
            exit_event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Readable when the guest has stopped on its own (see `take_exit`).
    pub fn exit_event(&self) -> &EventFd {
        &self.exit_event
    }

    pub fn take_exit(&self) -> Option<GuestExit> {
        crate::bus::lock(&self.exit).take()
    }

    fn report_exit(&self, exit: GuestExit) {
        let mut slot = crate::bus::lock(&self.exit);
        if slot.is_none() {
            *slot = Some(exit);
            let _ = self.exit_event.write(1);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        crate::bus::lock(&self.state)
    }
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own live kvm_run mapping (set before the
            // first KVM_RUN, cleared before the VcpuFd is dropped); a byte store is signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// True when vCPU threads sent to the background can be brought back: leaving `SCHED_IDLE`
/// needs `CAP_SYS_NICE` (the jail keeps it) or an `RLIMIT_NICE` of 20. Without either, they
/// must never be sent there.
pub fn can_leave_background() -> bool {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid rlimit struct.
    let rlimit_allows = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) == 0 } && limit.rlim_cur >= 20;
    let (effective, _) = forkd_jail::current_caps();
    rlimit_allows || effective & (1 << forkd_jail::libc_caps::CAP_SYS_NICE) != 0
}

fn set_own_policy(policy: libc::c_int) -> std::io::Result<()> {
    // SAFETY: pthread_self is always a live thread.
    unsafe { set_policy(libc::pthread_self(), policy) }
}

/// # Safety
/// `thread` must be a live thread.
unsafe fn set_policy(thread: libc::pthread_t, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the caller guarantees `thread` is alive; `param` is a valid sched_param.
    match unsafe { libc::pthread_setschedparam(thread, policy, &param) } {
        0 => Ok(()),
        rc => Err(std::io::Error::from_raw_os_error(rc)),
    }
}

/// The real-time signal used to kick vCPUs out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the kick handler (process-wide; idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    // SAFETY: a zeroed sigaction with a plain handler and no flags is a valid argument.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = kick_handler as *const () as usize;
    // SAFETY: installing a handler that only does an async-signal-safe volatile store.
    let rc = unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VcpuError::Signal(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Everything a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub memory: GuestMemory,
    pub control: Arc<RunControl>,
    /// Optional `System.map` for naming guest code addresses in errors.
    pub symbols: Option<Arc<emulate::Symbols>>,
    /// MSRs captured in vCPU state.
    pub msr_indices: Arc<Vec<u32>>,
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    /// The CPUID programmed into this vCPU (saved with its state).
    cpuid: CpuId,
}

impl Vcpu {
    pub fn create(vm: &VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(id as u64).map_err(|source| VcpuError::Create { id, source })?;
        let cpuid = CpuId::new(0)
            .map_err(|e| VcpuError::Restore { id, source: StateError::TooMany { what: "CPUID", source: e } })?;
        Ok(Self { id, fd, cpuid })
    }

    /// Recreates a vCPU from captured state (in a BRANCH child, on a fresh VM).
    pub fn restore(vm: &VmFd, state: &VcpuState) -> Result<Self, VcpuError> {
        let id = state.id;
        let mut vcpu = Self::create(vm, id)?;
        state::restore_vcpu(&vcpu.fd, state).map_err(|source| VcpuError::Restore { id, source })?;
        vcpu.cpuid = CpuId::from_entries(&state.cpuid)
            .map_err(|e| VcpuError::Restore { id, source: StateError::TooMany { what: "CPUID", source: e } })?;
        Ok(vcpu)
    }

    /// Programs CPUID, MSRs and the boot register state for a fresh boot.
    pub fn configure_boot(
        &mut self,
        supported: &CpuId,
        count: u8,
        profile: cpuid::CpuProfile,
        entry: u64,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let err = |what| move |source| VcpuError::Configure { id, what, source };
        let cpuid = cpuid::guest_cpuid(supported, id, count, profile);
        self.fd.set_cpuid2(&cpuid).map_err(err("cpuid"))?;
        self.cpuid = cpuid;
        let msrs = regs::boot_msrs();
        let written = self.fd.set_msrs(&msrs).map_err(err("msrs"))?;
        if written != msrs.as_slice().len() {
            let failed = msrs.as_slice().get(written).map(|e| e.index).unwrap_or(0);
            tracing::warn!("vCPU {id}: KVM refused boot MSR {failed:#x}; continuing without it");
        }
        let sregs = self.fd.get_sregs().map_err(err("get sregs"))?;
        self.fd.set_sregs(&regs::boot_sregs(sregs)).map_err(err("sregs"))?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(err("fpu"))?;
        // Only the boot processor starts at the kernel entry; the others wait for INIT/SIPI.
        if id == 0 {
            self.fd.set_regs(&regs::boot_regs(entry)).map_err(err("regs"))?;
        }
        let lapic = self.fd.get_lapic().map_err(err("get lapic"))?;
        self.fd.set_lapic(&regs::boot_lapic(lapic)).map_err(err("lapic"))?;
        Ok(())
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Starts the run loop on a new thread.
    pub fn spawn(mut self, ctx: VcpuContext, run_size: usize) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let kvm_fds = KvmVcpuFds {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            run: self.fd.get_kvm_run() as *mut kvm_run as usize,
            run_size,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run_loop(ctx))
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { id, thread, kvm_fds })
    }

    fn park<'a>(
        &self,
        ctx: &'a VcpuContext,
        mut st: std::sync::MutexGuard<'a, ControlState>,
    ) -> std::sync::MutexGuard<'a, ControlState> {
        let id = self.id as usize;
        while st.desired == Desired::Park {
            // Acknowledge each park request once, even if a new one arrived before this
            // thread woke from the last.
            if st.acked.get(id) != Some(&st.generation) {
                if st.save_requested {
                    let saved = state::save_vcpu(&self.fd, self.id, &self.cpuid, &ctx.msr_indices);
                    if let Some(slot) = st.saved.get_mut(id) {
                        *slot = Some(saved);
                    }
                }
                let generation = st.generation;
                if let Some(a) = st.acked.get_mut(id) {
                    *a = generation;
                }
                ctx.control.changed.notify_all();
            }
            st = ctx.control.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    fn mark_exited(&self, ctx: &VcpuContext) {
        let mut st = ctx.control.lock();
        if let Some(e) = st.exited.get_mut(self.id as usize) {
            *e = true;
        }
        ctx.control.changed.notify_all();
    }

    fn run_loop(mut self, ctx: VcpuContext) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        {
            let st = ctx.control.lock();
            if st.background {
                if let Err(e) = set_own_policy(libc::SCHED_IDLE) {
                    tracing::warn!("vCPU {}: cannot run the guest at idle priority: {e}", self.id);
                }
            }
        }
        let mut seen_generation = 0;
        loop {
            // Honour park/exit requests before (re-)entering the guest.
            {
                let mut st = ctx.control.lock();
                if st.desired != Desired::Run || st.generation != seen_generation {
                    seen_generation = st.generation;
                    if st.desired == Desired::Park {
                        st = self.park(&ctx, st);
                        seen_generation = st.generation;
                    }
                    if st.desired == Desired::Exit {
                        drop(st);
                        self.mark_exited(&ctx);
                        break;
                    }
                }
            }
            if let Some(exit) = self.run_once(&ctx) {
                ctx.control.report_exit(exit);
                self.mark_exited(&ctx);
                break;
            }
        }
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    }

    /// Runs the guest until one exit is handled. `Some` means the guest cannot continue.
    fn run_once(&mut self, ctx: &VcpuContext) -> Option<GuestExit> {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.io_bus.read(port as u64, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == KEYBOARD_CONTROLLER && data.first() == Some(&KBD_RESET) {
                    return Some(GuestExit::Shutdown("guest requested a reset".into()));
                }
                ctx.io_bus.write(port as u64, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio_bus.read(addr, data) {
                    data.fill(0);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio_bus.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => Some(GuestExit::Shutdown("guest halted".into())),
            Ok(VcpuExit::Shutdown) => {
                Some(GuestExit::Fatal(format!("vCPU {id}: guest triple-faulted (KVM_EXIT_SHUTDOWN)")))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(GuestExit::Shutdown(format!("guest system event {kind}"))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Some(GuestExit::Fatal(format!("vCPU {id}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})")))
            }
            Ok(VcpuExit::InternalError) => self.handle_internal_error(ctx),
            Ok(VcpuExit::Intr) => None,
            Ok(other) => {
                tracing::warn!("vCPU {id}: ignoring unexpected exit {other:?}");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(GuestExit::Fatal(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    }

    fn handle_internal_error(&mut self, ctx: &VcpuContext) -> Option<GuestExit> {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let suberror = internal.suberror;
        match emulate::complete_instruction(&self.fd, &ctx.memory) {
            Ok(done) => {
                tracing::debug!("vCPU {}: emulated {} at {:#x}", self.id, done.mnemonic, done.rip);
                emulate::record(done.mnemonic);
                None
            }
            Err(failure) => {
                Some(GuestExit::Fatal(describe_failure(self.id, suberror, &failure, ctx.symbols.as_deref())))
            }
        }
    }
}

fn describe_failure(id: u8, suberror: u32, failure: &EmulationFailure, symbols: Option<&emulate::Symbols>) -> String {
    let place = symbols.and_then(|s| s.describe(failure.rip())).map(|s| format!(" ({s})")).unwrap_or_default();
    format!("vCPU {id}: KVM internal error (suberror {suberror}){place}: {failure}")
}

/// Port of the i8042 keyboard controller command register, and its CPU-reset command.
const KEYBOARD_CONTROLLER: u16 = 0x64;
const KBD_RESET: u8 = 0xfe;

/// Raw KVM resources of a vCPU, so a forked child (where the vCPU thread does not exist) can
/// close the fd and unmap the `kvm_run` page it inherited.
#[derive(Debug, Clone, Copy)]
pub struct KvmVcpuFds {
    pub fd: std::os::fd::RawFd,
    pub run: usize,
    pub run_size: usize,
}

impl KvmVcpuFds {
    /// Releases the inherited copies. Only for use in a forked child.
    pub fn release_in_child(&self) {
        // SAFETY: in the child no thread uses this vCPU: its thread was not forked. The fd
        // and mapping are the child's own copies; the parent's are unaffected.
        unsafe {
            libc::munmap(self.run as *mut libc::c_void, self.run_size);
            libc::close(self.fd);
        }
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    thread: JoinHandle<()>,
    kvm_fds: KvmVcpuFds,
}

impl VcpuHandle {
    fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the pthread is alive until joined; signalling it runs only kick_handler.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
    }
}

/// All vCPUs of a VM and the control block they share.
pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
    control: Arc<RunControl>,
}

impl VcpuSet {
    pub fn new(handles: Vec<VcpuHandle>, control: Arc<RunControl>) -> Self {
        Self { handles, control }
    }

    /// Publishes a new desired state and kicks every vCPU; returns the request's generation.
    fn request(&self, desired: Desired) -> u64 {
        let mut st = self.control.lock();
        st.desired = desired;
        st.generation += 1;
        let generation = st.generation;
        self.control.changed.notify_all();
        drop(st);
        for h in &self.handles {
            h.kick();
        }
        generation
    }

    /// Parks every vCPU and has each capture its state; returns the states by vCPU id.
    pub fn park_and_save(&self) -> Result<Vec<VcpuState>, VcpuError> {
        {
            let mut st = self.control.lock();
            st.save_requested = true;
            st.saved = (0..self.handles.len()).map(|_| None).collect();
        }
        self.park();
        let mut st = self.control.lock();
        st.save_requested = false;
        let saved = std::mem::take(&mut st.saved);
        saved
            .into_iter()
            .enumerate()
            .map(|(id, s)| match s {
                Some(Ok(state)) => Ok(state),
                Some(Err(source)) => Err(VcpuError::Save { id: id as u8, source }),
                None => Err(VcpuError::ExitedBeforeSave { id: id as u8 }),
            })
            .collect()
    }

    /// The raw KVM resources of every vCPU (see `KvmVcpuFds`).
    pub fn kvm_fds(&self) -> Vec<KvmVcpuFds> {
        self.handles.iter().map(|h| h.kvm_fds).collect()
    }

    /// Parks every vCPU outside `KVM_RUN` and outside the device buses; returns when every
    /// vCPU has acknowledged this request (or has exited).
    pub fn park(&self) {
        let generation = self.request(Desired::Park);
        let mut st = self.control.lock();
        let done = |st: &ControlState| st.acked.iter().zip(&st.exited).all(|(a, e)| *a == generation || *e);
        while !done(&st) {
            // Re-kick periodically: a vCPU may have been between its check and KVM_RUN.
            let (guard, timeout) = self
                .control
                .changed
                .wait_timeout(st, std::time::Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            if timeout.timed_out() {
                drop(st);
                for h in &self.handles {
                    h.kick();
                }
                st = self.control.lock();
            }
        }
    }

    pub fn resume(&self) {
        let mut st = self.control.lock();
        st.desired = Desired::Run;
        st.generation += 1;
        self.control.changed.notify_all();
    }

    /// Brings vCPU threads that started at `SCHED_IDLE` (`RunControl::start_in_background`)
    /// back to normal priority. Needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20; check
    /// [`can_leave_background`] before starting them there.
    pub fn leave_background(&self) -> std::io::Result<()> {
        use std::os::unix::thread::JoinHandleExt;
        // Under the lock: a thread that has not demoted itself yet now will not.
        let mut st = self.control.lock();
        st.background = false;
        for h in &self.handles {
            // SAFETY: the pthread is alive until joined.
            unsafe { set_policy(h.thread.as_pthread_t(), libc::SCHED_OTHER) }?;
        }
        Ok(())
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(self) {
        self.request(Desired::Exit);
        for h in self.handles {
            let _ = h.thread.join();
        }
    }
}
