//! The controller: the registry of sandboxes and their lifecycle, over a backend.
//!
//! Concurrency: commands, file operations and BRANCH on a sandbox run concurrently (shared
//! lock; branches of one source are serialized among themselves); destroy takes the sandbox's
//! exclusive lock after cancelling the commands in flight, so a delete never waits for a
//! long-running command. Different sandboxes never wait for each other. Creates and branches
//! in flight can be capped ([`ControllerOptions`]); past the cap they fail at once with
//! `ResourceExhausted { retry_after_ms }`.
//!
//! Events: [`Controller::subscribe`] / [`Controller::events`] report sandboxes created,
//! branched, exited and destroyed. [`Controller::refresh`] finds sandboxes whose VMM died
//! (a daemon calls it periodically) and marks them exited.
//!
//! Persistence: with a state directory, every lifecycle change is written to `state.json`
//! (see `store`), and opening the controller re-adopts the sandboxes whose VMMs still run
//! (VMMs are separate processes and outlive the process that started them).

use crate::backend::{BranchOptions, DirEntry, Liveness, MemoryUsage, ResourceUsage, RuntimeHandle, SandboxBackend};
use crate::error::{Error, Result};
use crate::eval::{ContextInfo, EvalRequest, EvalResult, Warm};
use crate::events::{Event, EventKind, Events, Subscribers, Subscription};
use crate::exec::{CancelToken, ExecOutcome, ExecRequest, ExecSink};
use crate::id::SandboxId;
use crate::sandbox::{BranchResult, SandboxInfo, SandboxState};
use crate::snapshot::{SnapshotInfo, SnapshotOptions, SnapshotRequest, SnapshotResult, VerifyReport};
use crate::spec::SandboxSpec;
use crate::store::{Record, Store};
use crate::time::now_unix_ms;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Limits a controller enforces. The defaults limit nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControllerOptions {
    /// Most creates (boots) in flight at once; more fail with `ResourceExhausted`.
    pub max_concurrent_creates: Option<usize>,
    /// Most branches (including creates from a template) in flight at once.
    pub max_concurrent_branches: Option<usize>,
    /// Most running sandboxes at once (a BRANCH of N counts N).
    pub max_sandboxes: Option<usize>,
}

struct Entry {
    info: Mutex<SandboxInfo>,
    runtime: RuntimeHandle,
    /// Shared for commands and branches, exclusive for destroy.
    lifecycle: RwLock<()>,
    /// Serializes branches of this sandbox.
    branching: Mutex<()>,
    /// Set when destroy starts: nothing new may start on the sandbox.
    gone: AtomicBool,
    in_flight: Mutex<Vec<CancelToken>>,
}

impl Entry {
    fn new(info: SandboxInfo, runtime: RuntimeHandle) -> Arc<Self> {
        Arc::new(Entry {
            info: Mutex::new(info),
            runtime,
            lifecycle: RwLock::new(()),
            branching: Mutex::new(()),
            gone: AtomicBool::new(false),
            in_flight: Mutex::new(Vec::new()),
        })
    }
}

/// Counts operations of one kind in flight against an optional cap, and remembers how long
/// they take (for the retry hint).
struct Gate {
    what: &'static str,
    in_flight: AtomicUsize,
    /// Exponentially weighted mean duration, ms.
    mean_ms: AtomicU64,
}

struct Permit<'a> {
    gate: &'a Gate,
    started: std::time::Instant,
}

impl Gate {
    fn new(what: &'static str, initial_ms: u64) -> Self {
        Self { what, in_flight: AtomicUsize::new(0), mean_ms: AtomicU64::new(initial_ms) }
    }

    fn retry_after_ms(&self) -> u64 {
        (self.mean_ms.load(Ordering::Relaxed) / 2).clamp(50, 30_000)
    }

    fn enter(&self, max: Option<usize>) -> Result<Permit<'_>> {
        let admitted = self.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match max {
            Some(max) if n >= max => None,
            _ => Some(n + 1),
        });
        match admitted {
            Ok(_) => Ok(Permit { gate: self, started: std::time::Instant::now() }),
            Err(n) => Err(Error::ResourceExhausted {
                message: format!("{n} {} already in flight (the limit)", self.what),
                retry_after_ms: self.retry_after_ms(),
            }),
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let took = self.started.elapsed().as_millis() as u64;
        let mean = self.gate.mean_ms.load(Ordering::Relaxed);
        self.gate.mean_ms.store((mean * 3 + took) / 4, Ordering::Relaxed);
        self.gate.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reserved room under `max_sandboxes`, released on drop.
struct Reservation<'a> {
    pending: &'a AtomicUsize,
    count: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.pending.fetch_sub(self.count, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registry and lifecycle of sandboxes over one backend.
pub struct Controller {
    backend: Arc<dyn SandboxBackend>,
    store: Option<Store>,
    /// Who acts, for the audit log (`cli`, `daemon`, ...).
    who: String,
    sandboxes: Mutex<BTreeMap<SandboxId, Arc<Entry>>>,
    options: ControllerOptions,
    subscribers: Arc<Subscribers>,
    creates: Gate,
    branches: Gate,
    /// Sandboxes being created or branched, counted against `max_sandboxes`.
    pending: AtomicUsize,
}

impl Controller {
    /// A controller that keeps nothing on disk (embedding, tests, one-shot runs).
    pub fn new(backend: Arc<dyn SandboxBackend>) -> Self {
        Self::build(backend, None, "embedded", BTreeMap::new())
    }

    fn build(
        backend: Arc<dyn SandboxBackend>,
        store: Option<Store>,
        who: &str,
        sandboxes: BTreeMap<SandboxId, Arc<Entry>>,
    ) -> Self {
        Self {
            backend,
            store,
            who: who.into(),
            sandboxes: Mutex::new(sandboxes),
            options: ControllerOptions::default(),
            subscribers: Arc::default(),
            creates: Gate::new("sandbox boots", 20_000),
            branches: Gate::new("branches", 1_000),
            pending: AtomicUsize::new(0),
        }
    }

    /// The same controller with `options` enforced.
    pub fn with_options(mut self, options: ControllerOptions) -> Self {
        self.options = options;
        self
    }

    pub fn options(&self) -> &ControllerOptions {
        &self.options
    }

    /// The state directory, for a persistent controller.
    pub fn state_dir(&self) -> Option<&Path> {
        self.store.as_ref().map(Store::dir)
    }

    /// Calls `callback` with every lifecycle event until the returned guard is dropped. The
    /// callback runs on the thread that made the change: keep it short and non-blocking.
    pub fn subscribe(&self, callback: impl Fn(&Event) + Send + Sync + 'static) -> Subscription {
        self.subscribers.add(Arc::new(callback))
    }

    /// Lifecycle events as a blocking iterator (see [`Events`]).
    pub fn events(&self) -> Events {
        Events::new(&self.subscribers)
    }

    fn emit(&self, kind: EventKind) {
        self.subscribers.emit(Event::now(kind));
    }

    /// Reserves room for `count` new sandboxes under `max_sandboxes`.
    fn reserve(&self, count: usize) -> Result<Reservation<'_>> {
        let map = lock(&self.sandboxes);
        if let Some(max) = self.options.max_sandboxes {
            let running = map.values().filter(|e| lock(&e.info).state == SandboxState::Running).count();
            let pending = self.pending.load(Ordering::SeqCst);
            if running + pending + count > max {
                return Err(Error::ResourceExhausted {
                    message: format!(
                        "{count} more sandbox(es) would exceed the limit of {max} ({running} running, {pending} starting); remove some first"
                    ),
                    retry_after_ms: 1_000,
                });
            }
        }
        self.pending.fetch_add(count, Ordering::SeqCst);
        Ok(Reservation { pending: &self.pending, count })
    }

    /// A controller persisting to `state_dir`: loads `state.json` and re-adopts every
    /// sandbox whose VMM still runs; the others are marked exited.
    pub fn open(backend: Arc<dyn SandboxBackend>, state_dir: &Path, who: &str) -> Result<Self> {
        let store = Store::new(state_dir);
        let mut exited = Vec::new();
        let records = {
            let _lock = store.lock()?;
            let mut state = store.load()?;
            for record in &mut state.sandboxes {
                if record.info.state == SandboxState::Running {
                    if let Liveness::Exited(why) = backend.probe(&record.runtime) {
                        exited.push(record.info.id.clone());
                        record.info.state = SandboxState::Exited(why);
                    }
                }
            }
            if !exited.is_empty() {
                store.save(&state)?;
            }
            state.sandboxes
        };
        for id in &exited {
            store.audit(who, "mark_exited", Some(id.as_str()), &Ok(()));
        }
        let sandboxes = records.into_iter().map(|r| (r.info.id.clone(), Entry::new(r.info, r.runtime))).collect();
        Ok(Self::build(backend, Some(store), who, sandboxes))
    }

    pub fn backend(&self) -> &Arc<dyn SandboxBackend> {
        &self.backend
    }

    fn entry(&self, id: &SandboxId) -> Result<Arc<Entry>> {
        lock(&self.sandboxes).get(id).cloned().ok_or_else(|| Error::sandbox_not_found(id.as_str()))
    }

    fn audit<T>(&self, what: &str, target: Option<&str>, result: &Result<T>) {
        if let Some(store) = &self.store {
            store.audit(&self.who, what, target, &result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
    }

    fn persist(&self, f: impl FnOnce(&mut Vec<Record>)) -> Result<()> {
        match &self.store {
            Some(store) => store.update(|state| f(&mut state.sandboxes)),
            None => Ok(()),
        }
    }

    /// Registers and persists a sandbox the backend just started, and announces it; if it
    /// cannot be persisted, the sandbox is stopped again.
    fn adopt(&self, info: SandboxInfo, runtime: RuntimeHandle) -> Result<SandboxInfo> {
        let record = Record { info: info.clone(), runtime: runtime.clone() };
        lock(&self.sandboxes).insert(info.id.clone(), Entry::new(info.clone(), runtime.clone()));
        if let Err(e) = self.persist(|records| records.push(record)) {
            lock(&self.sandboxes).remove(&info.id);
            let _ = self.backend.destroy(&runtime);
            return Err(e);
        }
        self.emit(EventKind::Created { sandbox: info.clone() });
        Ok(info)
    }

    /// Boots a new sandbox.
    pub fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo> {
        let result = self.create_inner(spec, None);
        self.audit("create", result.as_ref().ok().map(|i| i.id.as_str()), &result);
        result
    }

    fn create_inner(&self, spec: SandboxSpec, template: Option<String>) -> Result<SandboxInfo> {
        spec.validate()?;
        let _permit = self.creates.enter(self.options.max_concurrent_creates)?;
        let _reservation = self.reserve(1)?;
        let id = SandboxId::generate();
        let runtime = self.backend.create(&id, &spec)?;
        let info = SandboxInfo {
            id,
            spec,
            state: SandboxState::Running,
            created_unix_ms: now_unix_ms(),
            parent: None,
            template,
            restored_from: None,
        };
        self.adopt(info, runtime)
    }

    /// Boots a sandbox and keeps it as template `name`; `create_from_template` forks it.
    pub fn create_template(&self, name: &str, spec: SandboxSpec) -> Result<SandboxInfo> {
        self.create_warm_template(name, spec, None)
    }

    /// Like [`Controller::create_template`], with `warm`'s interpreter started (and modules
    /// imported) in the `main` code context before the template is kept, so every sandbox
    /// forked from it evaluates at once.
    pub fn create_warm_template(&self, name: &str, spec: SandboxSpec, warm: Option<&Warm>) -> Result<SandboxInfo> {
        validate_template_name(name)?;
        if self.template(name).is_some() {
            return Err(Error::FailedPrecondition(format!(
                "template `{name}` already exists; remove it with `forkd template rm {name}` first"
            )));
        }
        let result = self.create_inner(spec, Some(name.to_string()));
        self.audit("create_template", Some(name), &result);
        let info = result?;
        if let Some(warm) = warm {
            if let Err(e) = self.warm(&info.id, warm) {
                let _ = self.destroy(&info.id);
                return Err(e);
            }
        }
        // Kept on disk too, so the template outlives its VMM (a host restart).
        let opts = SnapshotOptions { tag: Some(template_snapshot_tag(name)), diff: false, wait: true };
        if let Err(e) = self.snapshot(&info.id, &opts) {
            tracing::warn!(
                template = name,
                "the template runs but could not be snapshotted (it will not survive a restart): {e}"
            );
        }
        Ok(info)
    }

    /// Starts the warm interpreter of a new template.
    fn warm(&self, id: &SandboxId, warm: &Warm) -> Result<()> {
        let mut ignored = crate::exec::CapturedOutput::default();
        let result = self.eval(id, &EvalRequest::new(warm.code()), &mut ignored, &CancelToken::new())?;
        match result.error {
            None => Ok(()),
            Some(e) => Err(Error::FailedPrecondition(format!(
                "warming the template failed: {}: {} (is the module installed in the image?)",
                e.name, e.message
            ))),
        }
    }

    /// The running template called `name`.
    pub fn template(&self, name: &str) -> Option<SandboxInfo> {
        self.list().into_iter().find(|i| i.template.as_deref() == Some(name) && i.state == SandboxState::Running)
    }

    /// A new sandbox forked from template `name`: costs a BRANCH, not a boot. A template whose
    /// sandbox is gone (a host restart) is first restored from its snapshot.
    pub fn create_from_template(&self, name: &str) -> Result<SandboxInfo> {
        let template = match self.template(name) {
            Some(live) => live,
            None => self.revive_template(name)?,
        };
        let mut result = self.branch(&template.id, &BranchOptions::count(1))?;
        result.children.pop().ok_or_else(|| Error::internal("branch returned no child"))
    }

    /// Restores template `name` from its snapshot as its running sandbox.
    fn revive_template(&self, name: &str) -> Result<SandboxInfo> {
        let tag = template_snapshot_tag(name);
        if self.backend.snapshot_info(&tag).is_err() {
            return Err(template_not_found(name));
        }
        let _permit = self.creates.enter(self.options.max_concurrent_creates)?;
        let _reservation = self.reserve(1)?;
        self.restore_one(&tag, Some(name.to_string()))
    }

    pub fn get(&self, id: &SandboxId) -> Result<SandboxInfo> {
        Ok(lock(&self.entry(id)?.info).clone())
    }

    pub fn list(&self) -> Vec<SandboxInfo> {
        lock(&self.sandboxes).values().map(|e| lock(&e.info).clone()).collect()
    }

    /// Runs `f` with the sandbox's shared lock held and a cancel token registered, so that
    /// `destroy` can interrupt it.
    fn with_command<T>(
        &self,
        id: &SandboxId,
        external: Option<&CancelToken>,
        f: impl FnOnce(&RuntimeHandle, &CancelToken) -> Result<T>,
    ) -> Result<T> {
        let entry = self.entry(id)?;
        let _shared = entry.lifecycle.read().unwrap_or_else(|e| e.into_inner());
        if let SandboxState::Exited(why) = &lock(&entry.info).state {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {id} has exited ({why}); remove it with `forkd rm {id}`"
            )));
        }
        let token = CancelToken::new();
        if let Some(external) = external {
            let linked = token.clone();
            external.on_cancel(move || linked.cancel());
        }
        lock(&entry.in_flight).push(token.clone());
        // After registering the token: a destroy that starts later cancels it.
        if entry.gone.load(Ordering::SeqCst) {
            lock(&entry.in_flight).retain(|t| !t.same_as(&token));
            return Err(Error::sandbox_not_found(id.as_str()));
        }
        let result = f(&entry.runtime, &token);
        lock(&entry.in_flight).retain(|t| !t.same_as(&token));
        result
    }

    pub fn exec(
        &self,
        id: &SandboxId,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
    ) -> Result<ExecOutcome> {
        self.exec_with_cancel(id, req, stdin, sink, &CancelToken::new())
    }

    /// Like `exec`, but `cancel` (e.g. a client disconnect or Ctrl-C) also stops the command.
    pub fn exec_with_cancel(
        &self,
        id: &SandboxId,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<ExecOutcome> {
        req.validate()?;
        self.with_command(id, Some(cancel), |rt, token| self.backend.exec(rt, req, stdin, sink, token))
    }

    /// Runs a snippet in one of the sandbox's code contexts (created on first use); `cancel`
    /// (or a destroy) interrupts it.
    pub fn eval(
        &self,
        id: &SandboxId,
        req: &EvalRequest,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<EvalResult> {
        req.validate()?;
        self.with_command(id, Some(cancel), |rt, token| self.backend.eval(rt, req, sink, token))
    }

    /// The sandbox's live code contexts.
    pub fn contexts(&self, id: &SandboxId) -> Result<Vec<ContextInfo>> {
        self.with_command(id, None, |rt, _| self.backend.contexts(rt))
    }

    /// Ends one of the sandbox's code contexts.
    pub fn close_context(&self, id: &SandboxId, name: &str) -> Result<()> {
        crate::eval::validate_context(name)?;
        self.with_command(id, None, |rt, _| self.backend.close_context(rt, name))
    }

    pub fn write_file(&self, id: &SandboxId, path: &str, mode: u32, data: &mut (dyn Read + Send)) -> Result<u64> {
        validate_guest_path(path)?;
        self.with_command(id, None, |rt, _| self.backend.write_file(rt, path, mode, data))
    }

    pub fn read_file(&self, id: &SandboxId, path: &str, out: &mut (dyn Write + Send)) -> Result<u64> {
        validate_guest_path(path)?;
        self.with_command(id, None, |rt, _| self.backend.read_file(rt, path, out))
    }

    pub fn list_dir(&self, id: &SandboxId, path: &str) -> Result<Vec<DirEntry>> {
        validate_guest_path(path)?;
        self.with_command(id, None, |rt, _| self.backend.list_dir(rt, path))
    }

    pub fn memory_usage(&self, id: &SandboxId) -> Result<MemoryUsage> {
        let entry = self.entry(id)?;
        self.backend.memory_usage(&entry.runtime)
    }

    /// Usage and limits of the sandbox's cgroup (`None` if the backend does not use cgroups).
    pub fn resource_usage(&self, id: &SandboxId) -> Result<Option<ResourceUsage>> {
        let entry = self.entry(id)?;
        Ok(self.backend.resource_usage(&entry.runtime))
    }

    /// Releases host resources (network namespaces, links, cgroups) that sandboxes of this
    /// state directory left behind when their VMMs died, e.g. in a host crash. Run on daemon
    /// start; resources of sandboxes still running are left alone.
    pub fn cleanup_stale(&self) -> Result<()> {
        let known: Vec<RuntimeHandle> = lock(&self.sandboxes).values().map(|e| e.runtime.clone()).collect();
        self.backend.cleanup_stale(&known)
    }

    pub fn console(&self, id: &SandboxId, max_bytes: u64) -> Result<Vec<u8>> {
        let entry = self.entry(id)?;
        self.backend.console(&entry.runtime, max_bytes)
    }

    /// Forks a running sandbox into `opts.count` children that continue from its exact
    /// memory, disk and process state; the source keeps running.
    pub fn branch(&self, id: &SandboxId, opts: &BranchOptions) -> Result<BranchResult> {
        let result = self.branch_inner(id, opts);
        self.audit("branch", Some(id.as_str()), &result);
        result
    }

    fn branch_inner(&self, id: &SandboxId, opts: &BranchOptions) -> Result<BranchResult> {
        opts.validate()?;
        let entry = self.entry(id)?;
        let _permit = self.branches.enter(self.options.max_concurrent_branches)?;
        let _reservation = self.reserve(opts.count as usize)?;
        let _one_at_a_time = lock(&entry.branching);
        // Commands keep running in the source during a BRANCH; only destroy excludes it.
        let _shared = entry.lifecycle.read().unwrap_or_else(|e| e.into_inner());
        if entry.gone.load(Ordering::SeqCst) {
            return Err(Error::sandbox_not_found(id.as_str()));
        }
        let source = lock(&entry.info).clone();
        if let SandboxState::Exited(why) = &source.state {
            return Err(Error::FailedPrecondition(format!("sandbox {id} has exited ({why}); it cannot be branched")));
        }
        let ids: Vec<SandboxId> = (0..opts.count).map(|_| SandboxId::generate()).collect();
        let branched = self.backend.branch(&entry.runtime, &ids, opts)?;
        let now = now_unix_ms();
        let child_spec = SandboxSpec { limits: source.spec.limits.overlay(&opts.limits), ..source.spec.clone() };
        let mut children = Vec::new();
        for (child_id, runtime) in ids.into_iter().zip(branched.children) {
            let info = SandboxInfo {
                id: child_id,
                spec: child_spec.clone(),
                state: SandboxState::Running,
                created_unix_ms: now,
                parent: Some(id.clone()),
                template: None,
                restored_from: None,
            };
            lock(&self.sandboxes).insert(info.id.clone(), Entry::new(info.clone(), runtime.clone()));
            children.push(Record { info, runtime });
        }
        self.persist(|records| records.extend(children.iter().cloned()))?;
        let children: Vec<SandboxInfo> = children.into_iter().map(|r| r.info).collect();
        for child in &children {
            self.emit(EventKind::Created { sandbox: child.clone() });
        }
        self.emit(EventKind::Branched { source, children: children.clone(), pause: branched.pause });
        Ok(BranchResult { source: id.clone(), children, pause: branched.pause })
    }

    /// Starts a durable snapshot of a running sandbox. The source pauses about as long as for
    /// a BRANCH; a frozen copy writes the snapshot in the background (`opts.wait`: this call
    /// returns once it is durable). Events: `SnapshotStarted`, then `SnapshotDurable` or
    /// `SnapshotFailed`.
    pub fn snapshot(&self, id: &SandboxId, opts: &SnapshotOptions) -> Result<SnapshotResult> {
        let result = self.snapshot_inner(id, opts);
        self.audit("snapshot", Some(id.as_str()), &result);
        result
    }

    fn snapshot_inner(&self, id: &SandboxId, opts: &SnapshotOptions) -> Result<SnapshotResult> {
        opts.validate()?;
        let entry = self.entry(id)?;
        let (started, source) = {
            // A snapshot freezes the disk's top layer as a BRANCH does: one at a time.
            let _one_at_a_time = lock(&entry.branching);
            let _shared = entry.lifecycle.read().unwrap_or_else(|e| e.into_inner());
            if entry.gone.load(Ordering::SeqCst) {
                return Err(Error::sandbox_not_found(id.as_str()));
            }
            let source = lock(&entry.info).clone();
            if let SandboxState::Exited(why) = &source.state {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} has exited ({why}); it cannot be snapshotted"
                )));
            }
            let req = SnapshotRequest {
                source: id.clone(),
                spec: source.spec.clone(),
                tag: opts.tag.clone(),
                diff: opts.diff,
            };
            (self.backend.snapshot(&entry.runtime, &req)?, source)
        };
        let mut result = SnapshotResult {
            id: started.id.clone(),
            tag: opts.tag.clone(),
            source: source.id,
            kind: started.kind,
            parent: started.parent.clone(),
            pause: started.pause,
            durable: false,
        };
        self.emit(EventKind::SnapshotStarted { snapshot: result.clone() });
        if opts.wait {
            let outcome = self.backend.wait_snapshot(&started);
            report_snapshot(&self.subscribers, &result, &outcome);
            outcome?;
            result.durable = true;
        } else {
            // Somebody has to report the outcome: a thread waits for the writer.
            let (backend, subscribers, reported) = (self.backend.clone(), self.subscribers.clone(), result.clone());
            std::thread::Builder::new()
                .name("snapshot-wait".into())
                .spawn(move || report_snapshot(&subscribers, &reported, &backend.wait_snapshot(&started)))
                .map_err(|e| Error::internal(format!("starting the snapshot waiter: {e}")))?;
        }
        Ok(result)
    }

    /// Starts `count` sandboxes from snapshot `tag_or_id`: one restored, the others BRANCHed
    /// from it (milliseconds each), all continuing from the snapshot's state. All or nothing.
    pub fn create_from_snapshot(&self, tag_or_id: &str, count: u32) -> Result<Vec<SandboxInfo>> {
        let result = self.create_from_snapshot_inner(tag_or_id, count);
        self.audit("restore", Some(tag_or_id), &result);
        result
    }

    fn create_from_snapshot_inner(&self, tag_or_id: &str, count: u32) -> Result<Vec<SandboxInfo>> {
        BranchOptions::count(count).validate()?;
        let first = {
            let _permit = self.creates.enter(self.options.max_concurrent_creates)?;
            let _reservation = self.reserve(1)?;
            self.restore_one(tag_or_id, None)?
        };
        if count == 1 {
            return Ok(vec![first]);
        }
        match self.branch(&first.id, &BranchOptions::count(count - 1)) {
            Ok(branched) => Ok(std::iter::once(first).chain(branched.children).collect()),
            Err(e) => {
                let _ = self.destroy(&first.id);
                Err(e)
            }
        }
    }

    /// Restores one sandbox (the caller holds the create permit and reservation).
    fn restore_one(&self, tag_or_id: &str, template: Option<String>) -> Result<SandboxInfo> {
        let snapshot = self.backend.snapshot_info(tag_or_id)?;
        let id = SandboxId::generate();
        let (runtime, spec) = self.backend.restore(&id, &snapshot.id)?;
        let info = SandboxInfo {
            id,
            spec,
            state: SandboxState::Running,
            created_unix_ms: now_unix_ms(),
            parent: None,
            template,
            restored_from: Some(snapshot.id),
        };
        self.adopt(info, runtime)
    }

    /// Durable snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.backend.snapshots()
    }

    pub fn snapshot_info(&self, tag_or_id: &str) -> Result<SnapshotInfo> {
        self.backend.snapshot_info(tag_or_id)
    }

    /// Removes a snapshot; one that diffs build on only with `cascade` (which removes them
    /// too). Returns the ids removed.
    pub fn remove_snapshot(&self, tag_or_id: &str, cascade: bool) -> Result<Vec<String>> {
        let result = self.backend.remove_snapshot(tag_or_id, cascade);
        self.audit("remove_snapshot", Some(tag_or_id), &result);
        result
    }

    /// Folds a diff chain into one full snapshot with the same id and tag.
    pub fn compact_snapshot(&self, tag_or_id: &str) -> Result<SnapshotInfo> {
        let result = self.backend.compact_snapshot(tag_or_id);
        self.audit("compact_snapshot", Some(tag_or_id), &result);
        result
    }

    /// Reads every byte of a snapshot and its chain against their checksums.
    pub fn verify_snapshot(&self, tag_or_id: &str) -> Result<VerifyReport> {
        self.backend.verify_snapshot(tag_or_id)
    }

    /// Stops a sandbox, cancelling its commands in flight, and forgets it.
    pub fn destroy(&self, id: &SandboxId) -> Result<()> {
        let result = self.destroy_inner(id);
        self.audit("destroy", Some(id.as_str()), &result);
        result
    }

    fn destroy_inner(&self, id: &SandboxId) -> Result<()> {
        let entry = self.entry(id)?;
        entry.gone.store(true, Ordering::SeqCst);
        for token in lock(&entry.in_flight).drain(..) {
            token.cancel();
        }
        let _exclusive = entry.lifecycle.write().unwrap_or_else(|e| e.into_inner());
        if !lock(&self.sandboxes).get(id).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
            // A concurrent destroy got here first.
            return Err(Error::sandbox_not_found(id.as_str()));
        }
        if let Err(e) = self.backend.destroy(&entry.runtime) {
            entry.gone.store(false, Ordering::SeqCst);
            return Err(e);
        }
        lock(&self.sandboxes).remove(id);
        let persisted = self.persist(|records| records.retain(|r| &r.info.id != id));
        self.emit(EventKind::Destroyed { id: id.clone() });
        persisted
    }

    /// Checks every running sandbox's VMM and marks the ones that went away as exited
    /// (persisted, audited, and reported as `Exited` events). Cheap (no guest round trip);
    /// a daemon calls it every second or so. Sandboxes in the middle of a destroy are
    /// skipped. Returns the ids newly marked exited.
    pub fn refresh(&self) -> Vec<SandboxId> {
        let entries: Vec<(SandboxId, Arc<Entry>)> =
            lock(&self.sandboxes).iter().map(|(id, e)| (id.clone(), e.clone())).collect();
        let mut exited = Vec::new();
        for (id, entry) in entries {
            if entry.gone.load(Ordering::SeqCst) || lock(&entry.info).state != SandboxState::Running {
                continue;
            }
            let Ok(_shared) = entry.lifecycle.try_read() else {
                continue; // a destroy holds or waits for it
            };
            let Liveness::Exited(why) = self.backend.probe(&entry.runtime) else {
                continue;
            };
            let info = {
                let mut info = lock(&entry.info);
                if info.state != SandboxState::Running {
                    continue;
                }
                info.state = SandboxState::Exited(why.clone());
                info.clone()
            };
            let result = self.persist(|records| {
                for r in records.iter_mut().filter(|r| r.info.id == id) {
                    r.info.state = SandboxState::Exited(why.clone());
                }
            });
            if let Err(e) = &result {
                tracing::warn!(sandbox = %id, "persisting exited state: {e}");
            }
            self.audit("mark_exited", Some(id.as_str()), &result);
            tracing::info!(sandbox = %id, "sandbox exited: {why}");
            self.emit(EventKind::Exited { sandbox: info });
            exited.push(id);
        }
        exited
    }

    /// Destroys every sandbox; returns the first error after trying all.
    pub fn destroy_all(&self) -> Result<()> {
        let ids: Vec<_> = lock(&self.sandboxes).keys().cloned().collect();
        let mut first = None;
        for id in ids {
            if let Err(e) = self.destroy(&id) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Guest paths must be absolute and free of NUL bytes.
fn validate_guest_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Error::invalid("path", format!("`{path}` must be an absolute guest path")));
    }
    Ok(())
}

/// The tag of the snapshot that keeps template `name` on disk.
pub fn template_snapshot_tag(name: &str) -> String {
    format!("template-{name}")
}

fn template_not_found(name: &str) -> Error {
    Error::NotFound {
        kind: "template".into(),
        id: name.to_string(),
        hint: format!("; `forkd template ls` lists templates, `forkd template create {name}` makes it"),
    }
}

/// Emits the outcome of a snapshot's write.
fn report_snapshot(subscribers: &Subscribers, snapshot: &SnapshotResult, outcome: &Result<()>) {
    let kind = match outcome {
        Ok(()) => EventKind::SnapshotDurable { snapshot: SnapshotResult { durable: true, ..snapshot.clone() } },
        Err(e) => {
            tracing::warn!(snapshot = %snapshot.id, "snapshot failed: {e}");
            EventKind::SnapshotFailed { snapshot: snapshot.clone(), error: e.to_string() }
        }
    };
    subscribers.emit(Event::now(kind));
}

fn validate_template_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("name", format!("`{name}` is not a template name (lowercase letters, digits, '-', '_')")))
    }
}

#[cfg(test)]
mod tests;
