//! One MCP session's sandboxes: the ones it created are its resources, and those marked for
//! it are removed when the session ends (explicitly, or when its handler is dropped).

use forkd_client::Client;
use forkd_core::SandboxId;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What happens to a session's sandboxes when it ends, unless a call said otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    KeepUnlessAsked,
    OnSessionEnd,
}

pub struct Session {
    client: Arc<Client>,
    default: Cleanup,
    /// Sandboxes this session created, and whether each goes when the session does.
    owned: Mutex<BTreeMap<SandboxId, bool>>,
    ended: AtomicBool,
}

impl Session {
    pub fn new(client: Arc<Client>, default: Cleanup) -> Arc<Self> {
        Arc::new(Self { client, default, owned: Mutex::default(), ended: AtomicBool::new(false) })
    }

    fn owned(&self) -> MutexGuard<'_, BTreeMap<SandboxId, bool>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records sandboxes this session made; `remove_on_end` overrides the server default.
    pub fn adopt<'a>(&self, ids: impl IntoIterator<Item = &'a SandboxId>, remove_on_end: Option<bool>) {
        let remove = remove_on_end.unwrap_or(self.default == Cleanup::OnSessionEnd);
        let mut owned = self.owned();
        for id in ids {
            owned.insert(id.clone(), remove);
        }
    }

    pub fn forget(&self, id: &SandboxId) {
        self.owned().remove(id);
    }

    pub fn ids(&self) -> Vec<SandboxId> {
        self.owned().keys().cloned().collect()
    }

    pub fn owns(&self, id: &SandboxId) -> bool {
        self.owned().contains_key(id)
    }

    /// Removes the sandboxes marked for removal; runs once.
    pub async fn end(self: &Arc<Self>) {
        let (client, doomed) = (self.client.clone(), self.take_marked());
        let _ = tokio::task::spawn_blocking(move || remove(&client, doomed)).await;
    }

    /// The sandboxes to remove now that the session ends (none the second time).
    fn take_marked(&self) -> Vec<SandboxId> {
        if self.ended.swap(true, Ordering::SeqCst) {
            return Vec::new();
        }
        let mut owned = self.owned();
        let doomed: Vec<SandboxId> = owned.iter().filter(|(_, remove)| **remove).map(|(id, _)| id.clone()).collect();
        owned.retain(|_, remove| !*remove);
        doomed
    }
}

fn remove(client: &Client, ids: Vec<SandboxId>) {
    for id in ids {
        match client.destroy(&id) {
            Ok(()) => tracing::info!("session ended: removed {id}"),
            Err(e) => tracing::warn!("session ended: removing {id}: {e}"),
        }
    }
}

/// Removals started by dropped sessions, which the process waits for before it exits.
static PENDING: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits for the removals dropped sessions started.
pub fn wait_for_cleanups() {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
    for handle in pending {
        let _ = handle.join();
    }
}

impl Drop for Session {
    /// An HTTP session's handler goes away when the client deletes the session or it expires.
    /// Removal blocks, and this may run on an async worker: it gets a thread of its own.
    fn drop(&mut self) {
        let doomed = self.take_marked();
        if doomed.is_empty() {
            return;
        }
        let client = self.client.clone();
        let handle = std::thread::spawn(move || remove(&client, doomed));
        PENDING.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    }
}
