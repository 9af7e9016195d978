//! Lifecycle events: what the daemon's `Watch` streams, and what embedders can subscribe to.
//!
//! Every sandbox that appears gets a [`EventKind::Created`] (BRANCH children too, with
//! `parent` set, followed by one [`EventKind::Branched`] for the source); one whose VMM goes
//! away on its own gets [`EventKind::Exited`] (found by [`Controller::refresh`]); one that is
//! removed gets [`EventKind::Destroyed`]. Events are delivered synchronously, in order, on the
//! thread that caused them, after the change is persisted.
//!
//! [`Controller::refresh`]: crate::Controller::refresh

use crate::id::SandboxId;
use crate::sandbox::SandboxInfo;
use crate::snapshot::SnapshotResult;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time_unix_ms: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A sandbox appeared (booted, forked from a template, or a BRANCH child).
    Created { sandbox: SandboxInfo },
    /// `source` was forked into `children` (each already announced with `Created`).
    Branched {
        source: SandboxInfo,
        children: Vec<SandboxInfo>,
        #[serde(with = "crate::time::duration_ms")]
        pause: Duration,
    },
    /// The sandbox's VMM went away on its own; `sandbox.state` holds the reason.
    Exited { sandbox: SandboxInfo },
    /// The sandbox was removed.
    Destroyed { id: SandboxId },
    /// A snapshot of `snapshot.source` was started: the source runs again, a frozen copy
    /// writes it.
    SnapshotStarted { snapshot: SnapshotResult },
    /// The snapshot is on disk, fsynced and listed.
    SnapshotDurable { snapshot: SnapshotResult },
    /// The snapshot could not be written (nothing of it is left on disk).
    SnapshotFailed { snapshot: SnapshotResult, error: String },
}

impl Event {
    pub(crate) fn now(kind: EventKind) -> Self {
        Self { time_unix_ms: crate::time::now_unix_ms(), kind }
    }

    /// The sandbox the event is about (the source, for `Branched`).
    pub fn subject(&self) -> &SandboxId {
        match &self.kind {
            EventKind::Created { sandbox } | EventKind::Exited { sandbox } => &sandbox.id,
            EventKind::Branched { source, .. } => &source.id,
            EventKind::Destroyed { id } => id,
            EventKind::SnapshotStarted { snapshot }
            | EventKind::SnapshotDurable { snapshot }
            | EventKind::SnapshotFailed { snapshot, .. } => &snapshot.source,
        }
    }

    /// Whether the event concerns `id` as its subject or as a BRANCH child.
    pub fn concerns(&self, id: &SandboxId) -> bool {
        self.subject() == id
            || matches!(&self.kind, EventKind::Branched { children, .. } if children.iter().any(|c| &c.id == id))
    }

    /// Short name: `created`, `branched`, `exited`, `destroyed`, `snapshot_started`,
    /// `snapshot_durable` or `snapshot_failed`.
    pub fn name(&self) -> &'static str {
        match self.kind {
            EventKind::Created { .. } => "created",
            EventKind::Branched { .. } => "branched",
            EventKind::Exited { .. } => "exited",
            EventKind::Destroyed { .. } => "destroyed",
            EventKind::SnapshotStarted { .. } => "snapshot_started",
            EventKind::SnapshotDurable { .. } => "snapshot_durable",
            EventKind::SnapshotFailed { .. } => "snapshot_failed",
        }
    }
}

type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

/// The subscriber list of one controller.
#[derive(Default)]
pub(crate) struct Subscribers {
    next: AtomicU64,
    list: Mutex<Vec<(u64, Callback)>>,
}

impl Subscribers {
    pub(crate) fn add(self: &Arc<Self>, callback: Callback) -> Subscription {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push((id, callback));
        Subscription { id, subscribers: Arc::downgrade(self) }
    }

    pub(crate) fn emit(&self, event: Event) {
        // Call outside the lock, so a callback may subscribe or drop a subscription.
        let callbacks: Vec<Callback> =
            self.list.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(_, c)| c.clone()).collect();
        for callback in callbacks {
            callback(&event);
        }
    }
}

/// Keeps a subscription alive; dropping it unsubscribes.
#[must_use = "dropping a Subscription unsubscribes"]
pub struct Subscription {
    id: u64,
    subscribers: Weak<Subscribers>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(subs) = self.subscribers.upgrade() {
            subs.list.lock().unwrap_or_else(|e| e.into_inner()).retain(|(id, _)| *id != self.id);
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("id", &self.id).finish()
    }
}

/// A blocking stream of events (from [`Controller::events`](crate::Controller::events)); the
/// subscription ends when it is dropped. Unbounded: drain it.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    _subscription: Subscription,
}

impl Events {
    pub(crate) fn new(subscribers: &Arc<Subscribers>) -> Self {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let subscription = subscribers.add(Arc::new(move |e: &Event| {
            let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(e.clone());
        }));
        Self { rx, _subscription: subscription }
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl Iterator for Events {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.rx.recv().ok()
    }
}
