//! The controller: the registry of sandboxes and their lifecycle, over a backend.
//!
//! Concurrency: commands and file operations on a sandbox run concurrently (shared lock);
//! lifecycle changes (destroy, branch) take the sandbox's exclusive lock after cancelling the
//! commands in flight, so a delete never waits for a long-running command.

use crate::backend::{DirEntry, MemoryUsage, RuntimeHandle, SandboxBackend};
use crate::error::{Error, Result};
use crate::exec::{CancelToken, ExecOutcome, ExecRequest, ExecSink};
use crate::id::SandboxId;
use crate::spec::SandboxSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum SandboxState {
    Running,
    /// The VMM went away on its own (crash, guest power-off); kept for inspection until removed.
    Exited(String),
}

/// What the controller knows about one sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: SandboxId,
    pub spec: SandboxSpec,
    pub state: SandboxState,
    pub created_unix_ms: u64,
    /// The sandbox this one was branched from.
    pub parent: Option<SandboxId>,
}

struct Entry {
    info: Mutex<SandboxInfo>,
    runtime: RuntimeHandle,
    /// Shared for commands, exclusive for lifecycle changes.
    lifecycle: RwLock<()>,
    in_flight: Mutex<Vec<CancelToken>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Registry and lifecycle of sandboxes over one backend.
pub struct Controller {
    backend: Arc<dyn SandboxBackend>,
    sandboxes: Mutex<BTreeMap<SandboxId, Arc<Entry>>>,
}

impl Controller {
    pub fn new(backend: Arc<dyn SandboxBackend>) -> Self {
        Self { backend, sandboxes: Mutex::new(BTreeMap::new()) }
    }

    pub fn backend(&self) -> &Arc<dyn SandboxBackend> {
        &self.backend
    }

    fn entry(&self, id: &SandboxId) -> Result<Arc<Entry>> {
        lock(&self.sandboxes).get(id).cloned().ok_or_else(|| Error::sandbox_not_found(id.as_str()))
    }

    /// Boots a new sandbox.
    pub fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo> {
        spec.validate()?;
        let id = SandboxId::generate();
        let runtime = self.backend.create(&id, &spec)?;
        let info = SandboxInfo {
            id: id.clone(),
            spec,
            state: SandboxState::Running,
            created_unix_ms: now_unix_ms(),
            parent: None,
        };
        let entry = Arc::new(Entry {
            info: Mutex::new(info.clone()),
            runtime,
            lifecycle: RwLock::new(()),
            in_flight: Mutex::new(Vec::new()),
        });
        lock(&self.sandboxes).insert(id, entry);
        Ok(info)
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

    pub fn console(&self, id: &SandboxId, max_bytes: u64) -> Result<Vec<u8>> {
        let entry = self.entry(id)?;
        self.backend.console(&entry.runtime, max_bytes)
    }

    /// Stops a sandbox, cancelling its commands in flight, and forgets it.
    pub fn destroy(&self, id: &SandboxId) -> Result<()> {
        let entry = self.entry(id)?;
        for token in lock(&entry.in_flight).drain(..) {
            token.cancel();
        }
        let _exclusive = entry.lifecycle.write().unwrap_or_else(|e| e.into_inner());
        self.backend.destroy(&entry.runtime)?;
        lock(&self.sandboxes).remove(id);
        Ok(())
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
