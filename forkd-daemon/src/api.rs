//! What the gRPC services and the REST mirror share: the controller, the event fan-out,
//! metrics, and the operations both front ends call (run on the blocking pool).

use crate::bridge::blocking;
use crate::metrics::Metrics;
use forkd_core::Dirs;
use forkd_core::{
    BranchOptions, BranchResult, Controller, Error, Event, MemoryUsage, SandboxId, SandboxInfo, SnapshotInfo,
    SnapshotOptions, SnapshotResult, VerifyReport,
};
use forkd_proto::convert::{self, CreatePlan};
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// Events a Watch client may fall behind by before it is disconnected.
pub const EVENT_BACKLOG: usize = 1024;

pub struct Shared {
    pub controller: Arc<Controller>,
    pub dirs: Dirs,
    pub metrics: Arc<Metrics>,
    pub events: broadcast::Sender<Event>,
    /// Becomes `true` when the daemon shuts down (ends Watch streams).
    pub shutdown: watch::Receiver<bool>,
    pub started_unix_ms: u64,
    /// The state directory as clients should compare it (canonical).
    pub state_dir: String,
}

impl Shared {
    /// Records a failed call and passes the error on.
    pub fn failed(&self, e: Error) -> Error {
        self.metrics.error(e.code());
        e
    }

    pub fn status(&self, e: Error) -> tonic::Status {
        convert::status(&self.failed(e))
    }

    pub fn id(&self, text: &str) -> Result<SandboxId, Error> {
        convert::parse_id(text).map_err(|e| self.failed(e))
    }

    /// Fails fast with NOT_FOUND before a stream is opened.
    pub fn exists(&self, id: &SandboxId) -> Result<(), Error> {
        self.controller.get(id).map(|_| ()).map_err(|e| self.failed(e))
    }

    pub async fn create(&self, plan: CreatePlan) -> Result<SandboxInfo, Error> {
        let c = self.controller.clone();
        blocking(move || match plan {
            CreatePlan::Boot(spec) => c.create(spec),
            CreatePlan::Template { name, spec, warm } => c.create_warm_template(&name, spec, warm.as_ref()),
            CreatePlan::FromTemplate(name) => c.create_from_template(&name),
        })
        .await
        .map_err(|e| self.failed(e))
    }

    pub async fn get(&self, id: SandboxId, memory: bool) -> Result<(SandboxInfo, Option<MemoryUsage>), Error> {
        let info = self.controller.get(&id).map_err(|e| self.failed(e))?;
        let usage = if memory { self.memory(vec![info.clone()]).await.pop().flatten() } else { None };
        Ok((info, usage))
    }

    /// The sandbox's cgroup usage, if its backend confines it in one.
    pub async fn resources(&self, id: SandboxId) -> Option<forkd_core::ResourceUsage> {
        let c = self.controller.clone();
        blocking(move || c.resource_usage(&id)).await.ok().flatten()
    }

    pub async fn list(&self, memory: bool) -> Vec<(SandboxInfo, Option<MemoryUsage>)> {
        let list = self.controller.list();
        if !memory {
            return list.into_iter().map(|i| (i, None)).collect();
        }
        let usage = self.memory(list.clone()).await;
        list.into_iter().zip(usage).collect()
    }

    async fn memory(&self, list: Vec<SandboxInfo>) -> Vec<Option<MemoryUsage>> {
        let c = self.controller.clone();
        let n = list.len();
        blocking(move || Ok(list.iter().map(|i| c.memory_usage(&i.id).ok()).collect()))
            .await
            .unwrap_or_else(|_| vec![None; n])
    }

    pub async fn delete(&self, id: SandboxId) -> Result<(), Error> {
        let c = self.controller.clone();
        blocking(move || c.destroy(&id)).await.map_err(|e| self.failed(e))
    }

    pub async fn branch(&self, id: SandboxId, opts: BranchOptions) -> Result<BranchResult, Error> {
        let c = self.controller.clone();
        blocking(move || c.branch(&id, &opts)).await.map_err(|e| self.failed(e))
    }

    pub async fn contexts(&self, id: SandboxId) -> Result<Vec<forkd_core::ContextInfo>, Error> {
        let c = self.controller.clone();
        blocking(move || c.contexts(&id)).await.map_err(|e| self.failed(e))
    }

    pub async fn close_context(&self, id: SandboxId, name: String) -> Result<(), Error> {
        let c = self.controller.clone();
        blocking(move || c.close_context(&id, &name)).await.map_err(|e| self.failed(e))
    }

    pub async fn snapshot(&self, id: SandboxId, opts: SnapshotOptions) -> Result<SnapshotResult, Error> {
        let c = self.controller.clone();
        blocking(move || c.snapshot(&id, &opts)).await.map_err(|e| self.failed(e))
    }

    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, Error> {
        let c = self.controller.clone();
        blocking(move || c.snapshots()).await.map_err(|e| self.failed(e))
    }

    pub async fn snapshot_info(&self, tag: String) -> Result<SnapshotInfo, Error> {
        let c = self.controller.clone();
        blocking(move || c.snapshot_info(&tag)).await.map_err(|e| self.failed(e))
    }

    pub async fn remove_snapshot(&self, tag: String, cascade: bool) -> Result<Vec<String>, Error> {
        let c = self.controller.clone();
        blocking(move || c.remove_snapshot(&tag, cascade)).await.map_err(|e| self.failed(e))
    }

    pub async fn compact_snapshot(&self, tag: String) -> Result<SnapshotInfo, Error> {
        let c = self.controller.clone();
        blocking(move || c.compact_snapshot(&tag)).await.map_err(|e| self.failed(e))
    }

    pub async fn verify_snapshot(&self, tag: String) -> Result<VerifyReport, Error> {
        let c = self.controller.clone();
        blocking(move || c.verify_snapshot(&tag)).await.map_err(|e| self.failed(e))
    }

    pub async fn restore(&self, tag: String, count: u32) -> Result<Vec<SandboxInfo>, Error> {
        let c = self.controller.clone();
        blocking(move || c.create_from_snapshot(&tag, count)).await.map_err(|e| self.failed(e))
    }

    pub async fn console(&self, id: SandboxId, max_bytes: u64) -> Result<Vec<u8>, Error> {
        let max = match max_bytes {
            0 => convert::DEFAULT_CONSOLE_BYTES,
            n => n.min(convert::MAX_MESSAGE_BYTES as u64 - 1024),
        };
        let c = self.controller.clone();
        blocking(move || c.console(&id, max)).await.map_err(|e| self.failed(e))
    }

    pub async fn images(&self) -> Result<Vec<forkd_core::ImageInfo>, Error> {
        let dirs = self.dirs.clone();
        blocking(move || {
            let images = forkd_guest::image::list(&dirs).map_err(|e| Error::FailedPrecondition(e.to_string()))?;
            Ok(images.iter().map(forkd_guest::image::Image::info).collect())
        })
        .await
        .map_err(|e| self.failed(e))
    }

    pub async fn list_dir(&self, id: SandboxId, path: String) -> Result<Vec<forkd_core::DirEntry>, Error> {
        let c = self.controller.clone();
        blocking(move || c.list_dir(&id, &path)).await.map_err(|e| self.failed(e))
    }

    pub fn info(&self) -> forkd_proto::v1::InfoResponse {
        let o = self.controller.options();
        let n = |v: Option<usize>| v.map(|v| v.min(u32::MAX as usize) as u32).unwrap_or(0);
        forkd_proto::v1::InfoResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            state_dir: self.state_dir.clone(),
            backend: self.controller.backend().name().to_string(),
            pid: std::process::id(),
            started_unix_ms: self.started_unix_ms,
            max_concurrent_creates: n(o.max_concurrent_creates),
            max_concurrent_branches: n(o.max_concurrent_branches),
            max_sandboxes: n(o.max_sandboxes),
        }
    }
}
