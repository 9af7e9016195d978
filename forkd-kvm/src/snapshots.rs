//! Durable snapshots from the launcher's side: the store under `<state>/snapshots`, starting a
//! snapshot (stage it, link the disk layers the freeze will make immutable, hand the VMM the
//! store's fds, let its writer finish on its own), waiting for the writer, and the store's
//! list / inspect / remove / compact / verify mapped onto the API's types and errors.

use crate::runtime::VmmRuntime;
use crate::{process, KvmBackend};
use forkd_core::snapshot::{SnapshotRequest, SnapshotStarted};
use forkd_core::{Error, Result, SandboxSpec, SnapshotInfo, SnapshotKind, VerifyReport};
use forkd_snapshot::{
    Artifact, Kind, Manifest, MemoryInfo, Snapshot, SnapshotError, SnapshotStore, Staging, WriteMethod,
};
use forkd_vmm::config::VmConfig;
use forkd_vmm::control::{self, ControlRequest};
use serde::{Deserialize, Serialize};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the source's VMM may take to freeze and fork its writer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The launcher's handle on a running writer (`SnapshotStarted::writer`).
#[derive(Debug, Serialize, Deserialize)]
struct Writer {
    pid: u32,
    start_time: u64,
    /// The source's log, where a failing writer says why.
    vmm_log: PathBuf,
}

/// The API error for a store error: what the user can act on keeps its message and gets the
/// right code.
pub(crate) fn snapshot_error(e: SnapshotError) -> Error {
    match e {
        SnapshotError::NotFound { tag_or_id } => Error::NotFound {
            kind: "snapshot".into(),
            id: tag_or_id,
            hint: "; `forkd snapshot ls` lists snapshots".into(),
        },
        SnapshotError::InvalidName { .. } => Error::invalid("tag", e.to_string()),
        SnapshotError::TagExists { .. }
        | SnapshotError::HasDependents { .. }
        | SnapshotError::UnknownSchema { .. }
        | SnapshotError::Checksum { .. }
        | SnapshotError::NoSpace { .. }
        | SnapshotError::ParentMismatch { .. }
        | SnapshotError::Busy { .. } => Error::FailedPrecondition(e.to_string()),
        other => Error::Internal(other.to_string()),
    }
}

fn kind(k: Kind) -> SnapshotKind {
    match k {
        Kind::Full => SnapshotKind::Full,
        Kind::Diff => SnapshotKind::Diff,
    }
}

/// The spec a snapshot restores as (kept in the manifest's `extra`).
pub(crate) fn spec_of(m: &Manifest) -> Result<SandboxSpec> {
    serde_json::from_value(m.extra["spec"].clone()).map_err(|e| {
        Error::FailedPrecondition(format!(
            "snapshot {} records no usable sandbox spec ({e}); it cannot be restored",
            m.id
        ))
    })
}

impl KvmBackend {
    pub(crate) fn store(&self) -> SnapshotStore {
        SnapshotStore::new(self.dirs.state.join("snapshots"))
    }

    pub(crate) fn snapshot_info_of(&self, store: &SnapshotStore, snap: &Snapshot) -> Result<SnapshotInfo> {
        let m = &snap.manifest;
        Ok(SnapshotInfo {
            id: m.id.clone(),
            tag: m.tag.clone(),
            kind: kind(m.kind),
            parent: m.parent.clone(),
            source: m.source.clone(),
            created_unix_ms: m.created_unix_ms,
            spec: spec_of(m)?,
            memory_bytes: m.memory.bytes_written,
            pages: m.memory.pages,
            nonzero_pages: m.memory.nonzero_pages,
            write_method: serde_json::to_value(m.memory.method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            write_ms: m.memory.write_ms,
            disk_layers: m.disk.len(),
            dependents: store.dependents(&m.id).map_err(snapshot_error)?,
        })
    }

    /// Starts a snapshot of the sandbox `rt` runs: see the module docs.
    pub(crate) fn start_snapshot(&self, rt: &VmmRuntime, req: &SnapshotRequest) -> Result<SnapshotStarted> {
        if !rt.alive() {
            return Err(Error::FailedPrecondition("the sandbox's VMM is not running".into()));
        }
        let store = self.store();
        if let Some(tag) = &req.tag {
            if store.get(tag).is_ok() {
                return Err(Error::FailedPrecondition(format!(
                    "a snapshot tagged `{tag}` exists; remove it (`forkd snapshot rm {tag}`) or pick another tag"
                )));
            }
        }
        let config: VmConfig = read_json(&rt.config)?;
        let parent = match req.diff {
            true => Some(self.diff_parent(&store, rt, &req.source)?),
            false => None,
        };
        let layers: Vec<PathBuf> = config.root_disk.as_ref().map(|d| d.layers.clone()).unwrap_or_default();
        let names: Vec<String> = layers
            .iter()
            .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .collect();
        let id = forkd_snapshot::new_id();
        let staging = Staging::create(store.root(), &id).map_err(snapshot_error)?;
        for (path, name) in layers.iter().zip(&names) {
            // The top layer is linked while the guest still writes it: the freeze makes it
            // immutable, and a hard link is the same file.
            staging.link_file(path, &format!("disk/{name}")).map_err(snapshot_error)?;
        }
        let manifest = Manifest {
            schema_version: forkd_snapshot::SCHEMA_VERSION,
            id: id.clone(),
            tag: req.tag.clone(),
            created_unix_ms: forkd_core::time::now_unix_ms(),
            kind: if parent.is_some() { Kind::Diff } else { Kind::Full },
            parent: parent.as_ref().map(|p| p.manifest.id.clone()),
            source: Some(req.source.to_string()),
            guest: serde_json::to_value(&config).map_err(Error::internal)?,
            kernel: self.kernel_artifact(&config.kernel),
            image: self.image_artifact(&req.spec.image, config.root_disk.as_ref().map(|d| d.base.clone()))?,
            memory: placeholder_memory(),
            disk: names,
            files: Default::default(),
            extra: serde_json::json!({ "spec": req.spec, "restored_from": rt.restored_from }),
        };
        let parent_pages =
            match &parent {
                Some(p) => Some(std::fs::File::open(p.dir.join(forkd_snapshot::names::PAGES)).map_err(|e| {
                    Error::FailedPrecondition(format!("reading parent snapshot {}: {e}", p.manifest.id))
                })?),
                None => None,
            };
        let mut fds = vec![staging.root_fd(), staging.dir_fd()];
        fds.extend(parent_pages.as_ref().map(|f| f.as_fd()));
        let request = ControlRequest::Snapshot { manifest: Box::new(manifest), diff: parent.is_some() };
        let response = control::request_with_fds(&rt.control_socket, &request, &fds, START_TIMEOUT);
        drop(fds);
        let report = match response {
            Ok(resp) => resp.snapshot.ok_or_else(|| Error::internal("the VMM answered a snapshot without a report")),
            Err(control::ControlError::Refused(why)) => Err(Error::FailedPrecondition(why)),
            Err(e) => Err(Error::Unavailable(format!("snapshot: {e}"))),
        };
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                staging.abort();
                return Err(e);
            }
        };
        // The writer holds the staging directory (and its lock) from here on.
        let _ = staging.into_fds();
        let writer =
            Writer { pid: report.writer_pid, start_time: report.writer_start_time, vmm_log: rt.vmm_log.clone() };
        Ok(SnapshotStarted {
            id,
            kind: if parent.is_some() { SnapshotKind::Diff } else { SnapshotKind::Full },
            parent: parent.map(|p| p.manifest.id),
            pause: Duration::from_micros(report.pause_us),
            writer: serde_json::to_value(writer).map_err(Error::internal)?,
        })
    }

    /// Waits for the writer to exit; the snapshot is durable when the store lists it.
    pub(crate) fn wait_for_writer(&self, started: &SnapshotStarted) -> Result<()> {
        let writer: Writer = serde_json::from_value(started.writer.clone()).map_err(Error::internal)?;
        let begun = Instant::now();
        while process::is_alive(writer.pid, writer.start_time) {
            process::wait_exit(writer.pid, Duration::from_secs(1));
        }
        tracing::debug!(snapshot = %started.id, "writer exited after {:?}", begun.elapsed());
        match self.store().get(&started.id) {
            Ok(_) => Ok(()),
            Err(_) => {
                let reason = writer_failure(&writer.vmm_log, &started.id)
                    .unwrap_or_else(|| "the writer exited without writing it (killed?)".into());
                let message = format!("snapshot {} was not written: {reason}", started.id);
                Err(if reason.contains("not enough space") {
                    Error::FailedPrecondition(message)
                } else {
                    Error::Internal(message)
                })
            }
        }
    }

    /// The snapshot a diff of the sandbox builds on: its latest snapshot, else the snapshot
    /// it was restored from.
    fn diff_parent(&self, store: &SnapshotStore, rt: &VmmRuntime, source: &forkd_core::SandboxId) -> Result<Snapshot> {
        let all = store.list().map_err(snapshot_error)?;
        let latest = all.into_iter().rfind(|s| s.manifest.source.as_deref() == Some(source.as_str()));
        if let Some(latest) = latest {
            return Ok(latest);
        }
        match &rt.restored_from {
            Some(id) => store.get(id).map_err(snapshot_error),
            None => Err(Error::FailedPrecondition(format!(
                "sandbox {source} has no earlier snapshot to diff against; take a full snapshot first (without --diff)"
            ))),
        }
    }

    /// The kernel by sha256 (computed once per kernel file and cached by path and mtime).
    fn kernel_artifact(&self, kernel: &Path) -> Artifact {
        let sha256 = self.file_sha256(kernel).unwrap_or_default();
        Artifact { path: kernel.to_path_buf(), sha256, name: None }
    }

    fn image_artifact(&self, name: &str, base: Option<PathBuf>) -> Result<Artifact> {
        let image = forkd_guest::image::get(&self.dirs, name).map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        Ok(Artifact { path: base.unwrap_or(image.rootfs), sha256: image.manifest.sha256, name: Some(name.to_string()) })
    }

    fn file_sha256(&self, path: &Path) -> Option<String> {
        use sha2::Digest;
        let meta = std::fs::metadata(path).ok()?;
        let key = (path.to_path_buf(), meta.modified().ok()?, meta.len());
        let mut cache = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hash) = cache.get(&key) {
            return Some(hash.clone());
        }
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut std::fs::File::open(path).ok()?, &mut hasher).ok()?;
        let hash = hex::encode(hasher.finalize());
        cache.insert(key, hash.clone());
        Some(hash)
    }

    pub(crate) fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let store = self.store();
        let all = store.list().map_err(snapshot_error)?;
        all.iter().map(|s| self.snapshot_info_of(&store, s)).collect()
    }

    pub(crate) fn one_snapshot(&self, tag_or_id: &str) -> Result<SnapshotInfo> {
        let store = self.store();
        let snap = store.get(tag_or_id).map_err(snapshot_error)?;
        self.snapshot_info_of(&store, &snap)
    }

    pub(crate) fn compact(&self, tag_or_id: &str) -> Result<SnapshotInfo> {
        let store = self.store();
        let snap = store.compact(tag_or_id).map_err(snapshot_error)?;
        self.snapshot_info_of(&store, &snap)
    }

    pub(crate) fn verify(&self, tag_or_id: &str) -> Result<VerifyReport> {
        let r = self.store().verify(tag_or_id).map_err(snapshot_error)?;
        Ok(VerifyReport {
            files_checked: r.files_checked as u64,
            pages_checked: r.pages_checked,
            bytes_read: r.bytes_read,
        })
    }
}

/// What a writer that failed said in the source's log.
fn writer_failure(vmm_log: &Path, id: &str) -> Option<String> {
    let needle = format!("snapshot {id} failed: ");
    let text = String::from_utf8_lossy(&process::tail(vmm_log, 64 * 1024)).into_owned();
    text.lines().rev().find_map(|l| l.split_once(&needle).map(|(_, why)| why.to_string()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::internal(format!("reading {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::internal(format!("{}: {e}", path.display())))
}

/// Filled in by the writer.
fn placeholder_memory() -> MemoryInfo {
    MemoryInfo {
        page_size: forkd_snapshot::PAGE_SIZE as u64,
        regions: Vec::new(),
        pages: 0,
        nonzero_pages: 0,
        written_pages: 0,
        bytes_written: 0,
        method: WriteMethod::Pwrite,
        fallback_reason: None,
        write_ms: 0.0,
    }
}
