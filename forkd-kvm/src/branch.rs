//! BRANCH from the launcher's side, in named steps: check the source, make each child's
//! directory, network and cgroup (before the source pauses, so the pause does not grow with
//! them), prepare an idle source, have its VMM fork the children, move them into their
//! cgroups and open their start gate, and wait until every child's agent answers.
//!
//! Everything made for the children is held by one [`Rollback`]: if any step fails, dropping
//! it stops the children's VMMs and removes their networks, cgroups and directories, so a
//! failed BRANCH leaves nothing behind.

use crate::runtime::VmmRuntime;
use crate::{agent, isolation, process, ready, KvmBackend};
use forkd_agent::client::AgentClient;
use forkd_cgroup::SandboxCgroup;
use forkd_core::backend::{BranchOptions, BranchedChildren};
use forkd_core::{Error, Result, SandboxId};
use forkd_net::SandboxNetwork;
use forkd_vmm::control::{self, BranchReport, ControlRequest};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long the source's VMM may take to fork every child and report their pids.
const FORK_TIMEOUT: Duration = Duration::from_secs(120);

/// One child's own network and cgroup, made before the fork, plus the tap its VMM inherits.
struct Isolation {
    net: Option<SandboxNetwork>,
    cgroup: Option<SandboxCgroup>,
    tap: Option<OwnedFd>,
}

/// What a BRANCH has made for its children so far. Dropped before [`Rollback::keep`], it
/// undoes all of it.
struct Rollback {
    dirs: Vec<PathBuf>,
    /// Children not forked yet (or whose fork failed): their isolation alone.
    isolated: Vec<Isolation>,
    /// Forked children: their VMMs, with their isolation.
    forked: Vec<VmmRuntime>,
    kept: bool,
}

impl Rollback {
    fn new() -> Self {
        Self { dirs: Vec::new(), isolated: Vec::new(), forked: Vec::new(), kept: false }
    }

    /// The children are complete: nothing will be undone.
    fn keep(mut self) -> Vec<VmmRuntime> {
        self.kept = true;
        std::mem::take(&mut self.forked)
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for rt in &self.forked {
            let _ = crate::stop_and_remove(rt);
        }
        for iso in &self.isolated {
            let _ = isolation::teardown(iso.net.as_ref(), iso.cgroup.as_ref());
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl KvmBackend {
    pub(crate) fn branch_children(
        &self,
        source: &VmmRuntime,
        children: &[SandboxId],
        opts: &BranchOptions,
    ) -> Result<BranchedChildren> {
        check_source(source, opts)?;
        let begun = Instant::now();
        let mut made = Rollback::new();
        self.make_child_dirs(children, &mut made)?;
        self.isolate_children(source, children, opts, &mut made)?;
        tracing::debug!(children = children.len(), "branch: isolation ready after {:?}", begun.elapsed());
        let held = prepare_source_for_fork(source);
        tracing::debug!("branch: source prepared after {:?}", begun.elapsed());
        // Children moved into their cgroups while others start threads stall each other (see
        // `ControlRequest::Branch`): with cgroups they wait at this gate until all are moved.
        let gate = match source.cgroup.is_some() {
            true => Some(std::io::pipe().map_err(|e| Error::internal(format!("branch start gate: {e}")))?),
            false => None,
        };
        let report = fork_children(source, &mut made, gate.as_ref().map(|(read, _)| read.as_fd()));
        drop(held);
        let report = report?;
        tracing::debug!("branch: the VMM reported its children after {:?}", begun.elapsed());
        adopt_children(&report, &mut made);
        // Every child is in its cgroup: let them start their vCPUs.
        drop(gate);
        tracing::debug!("branch: children forked and in their cgroups after {:?}", begun.elapsed());
        ready::all_children_ready(&made.forked, self.options.boot_timeout)?;
        tracing::debug!("branch: children ready after {:?}", begun.elapsed());
        Ok(BranchedChildren {
            children: made.keep().iter().map(VmmRuntime::to_handle).collect(),
            pause: Duration::from_micros(report.pause_us),
        })
    }

    fn make_child_dirs(&self, children: &[SandboxId], made: &mut Rollback) -> Result<()> {
        for id in children {
            let dir = self.dirs.sandboxes().join(id.as_str());
            std::fs::create_dir_all(dir.join("disk"))
                .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
            made.dirs.push(dir);
        }
        Ok(())
    }

    /// Gives every child its own network (the source's policy) and cgroup (the source's
    /// limits with `opts.limits` over them).
    fn isolate_children(
        &self,
        source: &VmmRuntime,
        children: &[SandboxId],
        opts: &BranchOptions,
        made: &mut Rollback,
    ) -> Result<()> {
        for id in children {
            let mut iso = Isolation { net: None, cgroup: None, tap: None };
            let result = (|| -> Result<()> {
                if let Some(src) = &source.net {
                    let net =
                        SandboxNetwork::create(id.as_str(), &src.spec, &src.config).map_err(isolation::net_error)?;
                    let net = iso.net.insert(net);
                    if net.nic.is_some() {
                        iso.tap = Some(net.open_tap().map_err(isolation::net_error)?);
                    }
                }
                if let Some(src) = &source.cgroup {
                    let disk_dir = self.dirs.sandboxes().join(id.as_str()).join("disk");
                    let limits = isolation::limits_over(&src.limits, &opts.limits, &disk_dir);
                    let cgroup = SandboxCgroup::create(id.as_str(), &limits, &isolation::cgroup_config())
                        .map_err(isolation::cgroup_error)?;
                    iso.cgroup = Some(cgroup);
                }
                Ok(())
            })();
            // Held by the rollback even when half made, so a failure undoes this child too.
            made.isolated.push(iso);
            result?;
        }
        Ok(())
    }
}

fn check_source(source: &VmmRuntime, opts: &BranchOptions) -> Result<()> {
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
    Ok(())
}

/// Has the source's VMM fork the children: their taps and the start gate's read end go with
/// the request. The taps are closed here once the VMM has its copies.
fn fork_children(
    source: &VmmRuntime,
    made: &mut Rollback,
    gate: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<BranchReport> {
    let taps: Vec<OwnedFd> = made.isolated.iter_mut().filter_map(|iso| iso.tap.take()).collect();
    let fds: Vec<_> = taps.iter().map(|t| t.as_fd()).chain(gate).collect();
    let request = ControlRequest::Branch { children: made.dirs.clone(), gate: gate.is_some() };
    match control::request_with_fds(&source.control_socket, &request, &fds, FORK_TIMEOUT) {
        Ok(resp) => resp.branch.ok_or_else(|| Error::internal("the VMM answered a branch without a report")),
        Err(e) => Err(Error::Unavailable(format!("branching: {e}"))),
    }
}

/// Moves each forked child out of the source's cgroup into its own (all its threads) and
/// records its runtime; from here on the rollback stops the children's VMMs too.
fn adopt_children(report: &BranchReport, made: &mut Rollback) {
    let isolated = std::mem::take(&mut made.isolated);
    for (child, iso) in report.children.iter().zip(isolated) {
        if let Some(cg) = &iso.cgroup {
            if let Err(e) = cg.add_pid(child.pid) {
                tracing::warn!(pid = child.pid, "moving a branch child into its cgroup: {e}");
            }
        }
        made.forked.push(VmmRuntime::in_dir(&child.dir, child.pid, child.start_time, iso.net, iso.cgroup));
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
fn prepare_source_for_fork(source: &VmmRuntime) -> Option<AgentClient<UnixStream>> {
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
