//! BRANCH: fork a running VM into N children.
//!
//! The source pauses only for: parking its vCPUs and capturing their state, freezing the top
//! disk layer, and one `fork()` of a *zygote*, whose guest memory becomes copy-on-write in
//! time proportional to page tables (THP keeps that small). The source resumes at once. The
//! zygote, a frozen copy, forks the N children and exits, so the source's pause does not grow
//! with N. Each child builds a fresh KVM VM over its inherited memory (`Machine::
//! rebuild_in_child`) and serves its own control socket in its own sandbox directory.

use crate::config::{DiskConfig, VmConfig, VsockConfig};
use crate::control::{BranchChild, BranchReport};
use crate::identity;
use crate::machine::{ChildPaths, FrozenState, Machine};
use crate::VmmError;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the source waits for the zygote to report every child's pid.
const ZYGOTE_REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a child's guest runs in the background waiting for its siblings.
const BACKGROUND_LIMIT: Duration = Duration::from_secs(2);

/// The longest a child waits at the start gate (see `ControlRequest::Branch`) before starting
/// its vCPUs anyway: a launcher that is alive but stuck must not hold children forever.
const GATE_LIMIT: Duration = Duration::from_secs(10);

/// A new child's guest runs at idle priority until every sibling of its BRANCH has been
/// rebuilt: on a host with fewer CPUs than children, CPU time then goes to finishing the
/// fan-out (fork, new VM, state restored) before any child's guest work, instead of 100
/// resumed guests slowing down the last rebuilds. The siblings share a pipe whose write end
/// each holds until it is rebuilt; end of file on the read end means all are done (or dead).
pub struct Background {
    /// Read end of the siblings' pipe.
    pub siblings: OwnedFd,
    /// Back to normal priority at the latest here, however far the siblings are.
    pub until: Instant,
}

/// Why a BRANCH failed in the source (the source keeps running either way).
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error("this VM has a network device: pass one tap per child ({children} children, {taps} taps)")]
    TapCount { children: usize, taps: usize },
    #[error("capturing VM state: {0}")]
    Capture(#[source] VmmError),
    #[error("freezing the disk: {0}")]
    FreezeDisk(#[source] crate::disk::DiskError),
    #[error("making the zygote's report pipe: {0}")]
    Pipe(#[source] std::io::Error),
    #[error("fork: {0}")]
    Fork(#[source] std::io::Error),
    #[error("the zygote did not start children {0:?} (see their vmm.log)")]
    ChildrenMissing(Vec<usize>),
}

/// What `branch` returns in each process.
pub enum BranchSide {
    /// Still the source VM, which keeps running.
    Parent(Box<Machine>, Result<BranchReport, BranchError>),
    /// A new child sandbox: serve it with this machine and config; its guest starts in the
    /// background when this is set.
    Child(Box<Machine>, Box<VmConfig>, Option<Background>),
}

/// The files of a child sandbox living in `dir`.
pub fn child_paths(dir: &Path) -> ChildPaths {
    ChildPaths {
        dir: dir.to_path_buf(),
        control_socket: dir.join("control.sock"),
        vsock_socket: dir.join("vsock.sock"),
        console_log: dir.join("console.log"),
        vmm_log: dir.join("vmm.log"),
        config: dir.join("vm.json"),
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn fork() -> std::io::Result<libc::pid_t> {
    // SAFETY: the caller guarantees the process is quiescent: every other thread is parked
    // outside any lock the child needs (vCPUs wait on a condvar, which releases its mutex).
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        pid => Ok(pid),
    }
}

/// Forks `machine` into one child per directory in `children`.
///
/// `taps` holds one tap per child when the VM has a network device (each child's own, in its
/// own network namespace), or is empty. The source closes its copies once the zygote has them.
/// `gate`, the read end of the launcher's start gate, holds each child's vCPUs until end of file.
/// A source the user `paused` stays parked after the fork.
pub fn branch(
    mut machine: Machine,
    config: &VmConfig,
    children: &[PathBuf],
    taps: Vec<OwnedFd>,
    gate: Option<OwnedFd>,
    paused: bool,
) -> BranchSide {
    let thaw = |machine: &Machine| {
        if !paused {
            machine.thaw();
        }
    };
    if machine.has_net() && taps.len() != children.len() {
        let error = BranchError::TapCount { children: children.len(), taps: taps.len() };
        return BranchSide::Parent(Box::new(machine), Err(error));
    }
    let started = Instant::now();
    let frozen = match machine.freeze() {
        Ok(f) => f,
        Err(e) => {
            thaw(&machine);
            return BranchSide::Parent(Box::new(machine), Err(BranchError::Capture(e)));
        }
    };
    // Freeze the top disk layer: parent and every child continue on new empty layers.
    if let Some(disk) = &machine.disk {
        let frozen_ok = crate::bus::lock(disk).branch_point();
        if let Err(e) = frozen_ok {
            thaw(&machine);
            return BranchSide::Parent(Box::new(machine), Err(BranchError::FreezeDisk(e)));
        }
    }
    let (read_end, write_end) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            thaw(&machine);
            return BranchSide::Parent(Box::new(machine), Err(BranchError::Pipe(e)));
        }
    };
    let zygote = match fork() {
        Ok(pid) => pid,
        Err(e) => {
            thaw(&machine);
            return BranchSide::Parent(Box::new(machine), Err(BranchError::Fork(e)));
        }
    };
    if zygote == 0 {
        drop(read_end);
        return run_zygote(machine, config, &frozen, children, write_end, Inherited { taps, gate });
    }
    drop(write_end);
    drop(taps);
    drop(gate);
    thaw(&machine);
    let pause = started.elapsed();
    let report = collect_children(read_end, zygote, children, pause);
    BranchSide::Parent(Box::new(machine), report)
}

/// Fds the launcher passed for the children.
struct Inherited {
    /// One per child, or none.
    taps: Vec<OwnedFd>,
    /// The start gate's read end, shared by all children.
    gate: Option<OwnedFd>,
}

/// In the zygote: fork each child, report its pid, exit. Children return `Child`.
fn run_zygote(
    machine: Machine,
    config: &VmConfig,
    frozen: &FrozenState,
    children: &[PathBuf],
    report: OwnedFd,
    inherited: Inherited,
) -> BranchSide {
    let Inherited { taps, gate } = inherited;
    let mut taps: Vec<Option<OwnedFd>> = taps.into_iter().map(Some).collect();
    // Without the pipe (or without the right to come back from idle priority) children just
    // start at normal priority.
    let siblings = if children.len() > 1 && crate::vcpu::can_leave_background() { pipe().ok() } else { None };
    for (index, dir) in children.iter().enumerate() {
        match fork() {
            Ok(0) => {
                drop(report);
                let tap = taps.get_mut(index).and_then(Option::take);
                // The other children's taps are theirs: close this child's copies.
                drop(taps);
                return become_child(machine, config, frozen, dir, Own { tap, gate }, siblings);
            }
            Ok(pid) => {
                let record = [index as u32, pid as u32];
                let bytes: Vec<u8> = record.iter().flat_map(|v| v.to_le_bytes()).collect();
                // SAFETY: writing a local buffer to our pipe fd.
                unsafe { libc::write(report.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            }
            Err(e) => {
                eprintln!("forkd-vmm: zygote: fork of child {index} failed: {e}");
                break;
            }
        }
    }
    // Leave without running destructors: they would act on resources the source still uses.
    // SAFETY: _exit ends this process immediately.
    unsafe { libc::_exit(0) }
}

/// What one child takes from the launcher's fds.
struct Own {
    tap: Option<OwnedFd>,
    gate: Option<OwnedFd>,
}

/// In a child: detach, adopt the child's own paths, rebuild the VM, start its vCPUs once the
/// start gate opens. On failure the child process exits (the launcher sees it die and reports
/// the error from its log). `siblings` is the (read, write) pipe shared with the other
/// children (see [`Background`]).
fn become_child(
    machine: Machine,
    config: &VmConfig,
    frozen: &FrozenState,
    dir: &Path,
    own: Own,
    siblings: Option<(OwnedFd, OwnedFd)>,
) -> BranchSide {
    let Own { tap, gate } = own;
    let forked = Instant::now();
    let paths = child_paths(dir);
    // A session of its own: signals to the source's process group must not reach children.
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    redirect_stderr(&paths.vmm_log);
    identity::set_cmdline(&["forkd-vmm", "--config", &paths.config.to_string_lossy()]);
    identity::name_process(&paths.dir);
    // Guests of rebuilt children wait in the background (see `Background`) when they can be
    // brought back from it.
    let background = siblings.is_some();
    let result = (|| -> Result<(Machine, VmConfig), VmmError> {
        let mut child_config = config.clone();
        child_config.control_socket = paths.control_socket.clone();
        child_config.console_log = Some(paths.console_log.clone());
        child_config.console_echo = false;
        if let Some(v) = &mut child_config.vsock {
            *v = VsockConfig { uds_path: paths.vsock_socket.clone(), guest_cid: v.guest_cid };
        }
        if let Some(disk) = &machine.disk {
            let mut disk = crate::bus::lock(disk);
            let layers = disk.adopt_in_child(&dir.join("disk"))?;
            child_config.root_disk = Some(DiskConfig { base: disk.base_path().to_path_buf(), layers });
        }
        if let (Some(net), Some(tap)) = (&mut child_config.net, &tap) {
            net.tap_fd = tap.as_raw_fd();
        }
        let (mut machine, vcpus) = machine.rebuild_in_child(frozen, &paths, tap)?;
        let json = serde_json::to_vec_pretty(&child_config)
            .map_err(|source| VmmError::Json { what: "the child's vm.json", source })?;
        std::fs::write(&paths.config, json)
            .map_err(|source| VmmError::Io { what: "writing child vm.json".into(), source })?;
        let rebuilt = forked.elapsed();
        if let Some(gate) = &gate {
            wait_for_gate(gate);
        }
        machine.start_restored(vcpus, background)?;
        tracing::info!("branch child rebuilt in {rebuilt:?}, vCPUs running after {:?}", forked.elapsed());
        Ok((machine, child_config))
    })();
    match result {
        Ok((machine, config)) => {
            // Running: this child no longer holds its siblings back.
            let background = siblings.map(|(read, write)| {
                drop(write);
                Background { siblings: read, until: Instant::now() + BACKGROUND_LIMIT }
            });
            // Free heap pages inherited from the source would otherwise stay mapped (and
            // counted) here; the live ones are what this child's memory figures should show.
            // SAFETY: malloc_trim only returns free heap pages to the kernel.
            unsafe { libc::malloc_trim(0) };
            BranchSide::Child(Box::new(machine), Box::new(config), background)
        }
        Err(e) => {
            eprintln!("forkd-vmm: error: branch child failed to start: {e}");
            // SAFETY: ending this child process without touching shared resources.
            unsafe { libc::_exit(1) }
        }
    }
}

/// Blocks until the launcher closes the start gate's write end (end of file), it dies (the
/// same), or `GATE_LIMIT` passes.
fn wait_for_gate(gate: &OwnedFd) {
    let started = Instant::now();
    // Nobody writes: readable means end of file.
    if readable_before(gate, started + GATE_LIMIT) {
        tracing::debug!("start gate opened after {:?}", started.elapsed());
    } else {
        tracing::warn!("the start gate stayed shut for {GATE_LIMIT:?}: starting the vCPUs anyway");
    }
}

/// Waits until `fd` is readable (data, end of file or an error, which waiting longer would not
/// mend) and says so, or returns false at `deadline`. Interrupted waits resume.
fn readable_before(fd: &OwnedFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polling one valid fd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        match ready {
            0 => return false,
            r if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => continue,
            _ => return true,
        }
    }
}

fn redirect_stderr(path: &Path) {
    if let Ok(file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        // SAFETY: dup2 onto fd 2; `file` stays valid for the call.
        unsafe { libc::dup2(file.as_raw_fd(), 2) };
    }
}

/// In the source, after it resumed: read (index, pid) records from the zygote and reap it.
fn collect_children(
    read_end: OwnedFd,
    zygote: libc::pid_t,
    children: &[PathBuf],
    pause: Duration,
) -> Result<BranchReport, BranchError> {
    let mut pids: Vec<Option<u32>> = vec![None; children.len()];
    let deadline = Instant::now() + ZYGOTE_REPORT_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while readable_before(&read_end, deadline) {
        // SAFETY: reading into a local buffer from our pipe fd.
        let n = unsafe { libc::read(read_end.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        if n <= 0 {
            break; // zygote finished (EOF) or failed
        }
        buf.extend_from_slice(&chunk[..n as usize]);
    }
    for record in buf.chunks_exact(8) {
        let index = u32::from_le_bytes([record[0], record[1], record[2], record[3]]) as usize;
        let pid = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
        if let Some(slot) = pids.get_mut(index) {
            *slot = Some(pid);
        }
    }
    let mut status = 0;
    // SAFETY: reaping our own zygote child.
    unsafe { libc::waitpid(zygote, &mut status, 0) };
    let missing: Vec<_> = pids.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| i).collect();
    if !missing.is_empty() {
        return Err(BranchError::ChildrenMissing(missing));
    }
    Ok(BranchReport {
        pause_us: pause.as_micros() as u64,
        children: pids
            .into_iter()
            .zip(children)
            .map(|(pid, dir)| {
                let pid = pid.unwrap_or(0);
                BranchChild { pid, start_time: identity::start_time(pid).unwrap_or(0), dir: dir.clone() }
            })
            .collect(),
    })
}
