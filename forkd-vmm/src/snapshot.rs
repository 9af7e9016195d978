//! Durable snapshots, the fork side (Redis BGSAVE for microVMs). The source pauses only as
//! long as for a BRANCH: park the vCPUs and capture their state, freeze the disk's top layer,
//! `fork()` once. The forked copy, the *writer*, holds guest RAM copy-on-write exactly as it
//! was; it writes the machine state and memory through `forkd-snapshot`, commits the snapshot
//! and exits, while the source runs on and never waits on the disk.
//!
//! The writer lives in the source's jail, which shows no snapshot store: the launcher passes
//! the store's root and the staging directory as fds (and, for a diff, the parent's page
//! hashes), and has already hard-linked the disk layers that this freeze makes immutable.

use crate::control::SnapshotReport;
use crate::machine::{FrozenState, Machine};
use crate::persist::{MachineState, PersistError, STATE_FILE};
use crate::VmmError;
use forkd_snapshot::{GuestRegion, Manifest, PageHashes, Staging, WriteOptions};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// What the launcher handed over for one snapshot.
pub struct SnapshotJob {
    /// The snapshot store's root directory.
    pub root: OwnedFd,
    /// The staging directory (`.tmp-<id>`) inside it, with the disk layers already linked.
    pub staging: OwnedFd,
    /// The manifest to commit, all but `memory` and the state file's entry filled in.
    pub manifest: Manifest,
    /// For a diff: the parent's `memory.pages`.
    pub parent_pages: Option<OwnedFd>,
}

/// Why the source could not start a snapshot (it keeps running either way).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("capturing VM state: {0}")]
    Capture(#[source] VmmError),
    #[error("freezing the disk: {0}")]
    FreezeDisk(#[source] crate::disk::DiskError),
    #[error("fork: {0}")]
    Fork(#[source] std::io::Error),
    #[error("the snapshot's disk chain {wanted:?} is not the one this freeze made immutable {frozen:?}")]
    DiskChain { wanted: Vec<String>, frozen: Vec<String> },
}

/// What can fail in the writer (reported on its stderr, the source's `vmm.log`).
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Store(#[from] forkd_snapshot::SnapshotError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("serializing the machine state: {0}")]
    Json(#[from] serde_json::Error),
    #[error("reading the parent's page hashes: {0}")]
    Parent(#[source] std::io::Error),
}

/// Freezes `machine`, forks the writer and lets the source run again (unless it was paused:
/// then it stays parked, so two snapshots of a paused VM hold the same memory). Returns in the
/// source only: the writer never returns from this call.
pub fn snapshot(machine: &mut Machine, job: SnapshotJob, paused: bool) -> Result<SnapshotReport, SnapshotError> {
    let thaw = |machine: &Machine| {
        if !paused {
            machine.thaw();
        }
    };
    let started = Instant::now();
    let frozen = match machine.freeze() {
        Ok(f) => f,
        Err(e) => {
            thaw(machine);
            return Err(SnapshotError::Capture(e));
        }
    };
    let frozen_layers = match freeze_disk(machine) {
        Ok(layers) => layers,
        Err(e) => {
            thaw(machine);
            return Err(e);
        }
    };
    if frozen_layers != job.manifest.disk {
        // The launcher linked another chain (a BRANCH raced in): nothing valid can be written.
        thaw(machine);
        return Err(SnapshotError::DiskChain { wanted: job.manifest.disk.clone(), frozen: frozen_layers });
    }
    // SAFETY: as for BRANCH, the process is quiescent: every vCPU thread is parked on a
    // condvar outside any lock the writer needs, and this is the event loop's thread.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => {
            thaw(machine);
            Err(SnapshotError::Fork(std::io::Error::last_os_error()))
        }
        0 => become_writer(machine, &frozen, job),
        pid => {
            thaw(machine);
            let pause = started.elapsed();
            Ok(SnapshotReport {
                pause_us: pause.as_micros() as u64,
                writer_pid: pid as u32,
                writer_start_time: crate::identity::start_time(pid as u32).unwrap_or(0),
                layers: frozen_layers,
            })
        }
    }
}

/// Freezes the disk's top layer (the source continues on a new one) and returns the names of
/// the layers that are now immutable, bottom to top. No disk: no layers.
fn freeze_disk(machine: &Machine) -> Result<Vec<String>, SnapshotError> {
    let Some(disk) = &machine.disk else { return Ok(Vec::new()) };
    let mut disk = crate::bus::lock(disk);
    disk.branch_point().map_err(SnapshotError::FreezeDisk)?;
    let layers: Vec<PathBuf> = disk.layer_paths();
    let frozen = &layers[..layers.len().saturating_sub(1)];
    Ok(frozen.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect())
}

/// In the forked copy: write everything, commit, exit. Never returns.
fn become_writer(machine: &Machine, frozen: &FrozenState, job: SnapshotJob) -> ! {
    // Out of the source's session (a signal to its group must not end the write) and out of
    // the guests' way.
    // SAFETY: setsid and setpriority have no memory-safety preconditions.
    unsafe {
        libc::setsid();
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
    let id = job.manifest.id.clone();
    crate::identity::set_cmdline(&["forkd-vmm", "snapshot-writer", &id]);
    let started = Instant::now();
    match write(machine, frozen, job) {
        Ok(()) => {
            tracing::info!("snapshot {id} durable after {:?}", started.elapsed());
            // SAFETY: ending the writer without running destructors that act on the source's
            // resources (sockets, VM fds) it shares.
            unsafe { libc::_exit(0) }
        }
        Err(e) => {
            eprintln!("forkd-vmm: snapshot {id} failed: {e}");
            // SAFETY: as above.
            unsafe { libc::_exit(1) }
        }
    }
}

fn write(machine: &Machine, frozen: &FrozenState, job: SnapshotJob) -> Result<(), WriteError> {
    let SnapshotJob { root, staging, mut manifest, parent_pages } = job;
    let staging = Staging::from_fds(root, staging, &manifest.id)?;
    let state = MachineState::capture(machine, frozen)?;
    let entry = staging.write_file(STATE_FILE, &serde_json::to_vec(&state)?)?;
    manifest.files.insert(STATE_FILE.into(), entry);
    let parent = match parent_pages {
        Some(fd) => {
            let mut bytes = Vec::new();
            std::fs::File::from(fd).read_to_end(&mut bytes).map_err(WriteError::Parent)?;
            Some(PageHashes::from_bytes(&bytes)?)
        }
        None => None,
    };
    let regions: Vec<GuestRegion> = machine
        .memory
        .iter()
        .map(|r| GuestRegion { host_addr: r.as_ptr(), len: r.len() as usize, guest_addr: r.start_addr().0 })
        .collect();
    // SAFETY: this process is the frozen copy: its vCPU threads were not forked and its event
    // loop does not run, so nothing writes guest memory while it is written out.
    let report = unsafe { staging.write_memory(&regions, parent.as_ref(), &WriteOptions::default()) }?;
    manifest.memory = report.info;
    staging.commit(manifest)?;
    Ok(())
}
