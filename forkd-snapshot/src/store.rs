//! The snapshot store: the committed snapshots under one root directory, found by tag or id,
//! their diff chains and dependents, removal, and cleanup of what crashed writers, removals
//! and compactions left behind.
//!
//! Only directories named by a valid id and holding `snapshot.json` are snapshots; names
//! starting with a dot are bookkeeping: `.tmp-<id>` (staging, locked by its live writer),
//! `.old-<id>` (the pre-compaction copy during a swap), `.del-<id>` (being removed). Readers
//! take the root's `flock` shared for the directory lookups only; writers take it exclusive.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::manifest::Manifest;
use crate::root::{committed_entries, lock_root, read_manifest_at};
use crate::{names, sys, validate_id, PageHashes, Result, SnapshotError};

/// A committed snapshot: its directory and manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Snapshot {
    /// The snapshot id.
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// Its page table (`memory.pages`): the parent argument of the next diff's
    /// [`crate::Staging::write_memory`].
    pub fn page_hashes(&self) -> Result<PageHashes> {
        let hashes = PageHashes::read(&self.dir.join(names::PAGES))?;
        if hashes.len() as u64 != self.manifest.memory.pages {
            return Err(SnapshotError::Checksum {
                file: self.dir.join(names::PAGES),
                detail: format!(
                    "holds {} pages, the manifest says {}: the snapshot is damaged; remove it or restore it from a copy",
                    hashes.len(),
                    self.manifest.memory.pages
                ),
            });
        }
        Ok(hashes)
    }
}

/// The snapshots under one root directory.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    root: PathBuf,
}

impl SnapshotStore {
    /// A store over `root` (created by the first [`crate::Staging::create`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SnapshotStore { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the root; `None` if it does not exist yet.
    pub(crate) fn open_root(&self) -> Result<Option<OwnedFd>> {
        match sys::open_dir(&self.root) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(SnapshotError::io(format!("open snapshot root {}", self.root.display()), e)),
        }
    }

    /// Runs `f` on the root with its lock held (shared or exclusive); `Ok(None)` if the root
    /// does not exist.
    pub(crate) fn locked<T>(&self, exclusive: bool, f: impl FnOnce(BorrowedFd<'_>) -> Result<T>) -> Result<Option<T>> {
        let Some(root) = self.open_root()? else { return Ok(None) };
        let _lock = lock_root(root.as_fd(), exclusive)
            .map_err(|e| SnapshotError::io(format!("lock {}", self.root.display()), e))?;
        f(root.as_fd()).map(Some)
    }

    /// Committed snapshots, oldest first.
    pub fn list(&self) -> Result<Vec<Snapshot>> {
        Ok(self.locked(false, |root| self.list_unlocked(root))?.unwrap_or_default())
    }

    pub(crate) fn list_unlocked(&self, root: BorrowedFd<'_>) -> Result<Vec<Snapshot>> {
        let entries =
            committed_entries(root).map_err(|e| SnapshotError::io(format!("list {}", self.root.display()), e))?;
        let mut out = Vec::with_capacity(entries.len());
        for id in entries {
            match self.load(root, &id) {
                Ok(Some(snap)) => out.push(snap),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping unreadable snapshot {id}"),
            }
        }
        out.sort_by(|a, b| {
            (a.manifest.created_unix_ms, &a.manifest.id).cmp(&(b.manifest.created_unix_ms, &b.manifest.id))
        });
        Ok(out)
    }

    /// Loads the snapshot in directory `id`; `None` if there is none.
    pub(crate) fn load(&self, root: BorrowedFd<'_>, id: &str) -> Result<Option<Snapshot>> {
        if validate_id(id).is_err() {
            return Ok(None);
        }
        let dir = self.root.join(id);
        let path = dir.join(names::MANIFEST);
        let Some(bytes) =
            read_manifest_at(root, id).map_err(|e| SnapshotError::io(format!("read {}", path.display()), e))?
        else {
            return Ok(None);
        };
        let manifest = Manifest::parse(&path, &bytes)?;
        if manifest.id != id {
            return Err(SnapshotError::Checksum {
                file: path,
                detail: format!(
                    "the manifest's id {:?} is not its directory name {id:?}; rename the directory back",
                    manifest.id
                ),
            });
        }
        Ok(Some(Snapshot { dir, manifest }))
    }

    /// The snapshot with this tag, else with this id. A manifest of a newer format is
    /// [`SnapshotError::UnknownSchema`].
    pub fn get(&self, tag_or_id: &str) -> Result<Snapshot> {
        self.locked(false, |root| self.get_unlocked(root, tag_or_id))?
            .ok_or_else(|| SnapshotError::NotFound { tag_or_id: tag_or_id.to_string() })
    }

    pub(crate) fn get_unlocked(&self, root: BorrowedFd<'_>, tag_or_id: &str) -> Result<Snapshot> {
        let entries =
            committed_entries(root).map_err(|e| SnapshotError::io(format!("list {}", self.root.display()), e))?;
        for id in &entries {
            let Ok(Some(bytes)) = read_manifest_at(root, id) else { continue };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            if value.get("tag").and_then(|t| t.as_str()) == Some(tag_or_id) {
                if let Some(snap) = self.load(root, id)? {
                    return Ok(snap);
                }
            }
        }
        self.load(root, tag_or_id)?.ok_or_else(|| SnapshotError::NotFound { tag_or_id: tag_or_id.to_string() })
    }

    /// The ids of the diffs built on `id` (a tag works too), directly or indirectly, parents
    /// before their children.
    pub fn dependents(&self, id: &str) -> Result<Vec<String>> {
        self.locked(false, |root| {
            let snap = self.get_unlocked(root, id)?;
            self.dependents_unlocked(root, &snap.manifest.id)
        })?
        .ok_or_else(|| SnapshotError::NotFound { tag_or_id: id.to_string() })
    }

    pub(crate) fn dependents_unlocked(&self, root: BorrowedFd<'_>, id: &str) -> Result<Vec<String>> {
        // From the raw JSON, so a diff this forkd cannot fully read (a newer schema) still
        // counts as a dependent and protects its parent.
        let mut children: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        let entries =
            committed_entries(root).map_err(|e| SnapshotError::io(format!("list {}", self.root.display()), e))?;
        for entry in entries {
            let Ok(Some(bytes)) = read_manifest_at(root, &entry) else { continue };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            if let Some(parent) = value.get("parent").and_then(|p| p.as_str()) {
                let created = value.get("created_unix_ms").and_then(|c| c.as_u64()).unwrap_or(0);
                children.entry(parent.to_string()).or_default().push((created, entry));
            }
        }
        for list in children.values_mut() {
            list.sort();
        }
        let mut out = Vec::new();
        let mut seen = HashSet::from([id.to_string()]);
        let mut queue = VecDeque::from([id.to_string()]);
        while let Some(next) = queue.pop_front() {
            for (_, child) in children.get(&next).into_iter().flatten() {
                if seen.insert(child.clone()) {
                    out.push(child.clone());
                    queue.push_back(child.clone());
                }
            }
        }
        Ok(out)
    }

    /// Removes a snapshot. Refused with [`SnapshotError::HasDependents`] if diffs are built on
    /// it, unless `cascade`, which removes them too (children before parents). Returns the
    /// removed ids. Each removal is a rename to `.del-<id>` (atomic) and then a recursive
    /// delete.
    pub fn remove(&self, tag_or_id: &str, cascade: bool) -> Result<Vec<String>> {
        self.locked(true, |root| {
            let snap = self.get_unlocked(root, tag_or_id)?;
            let id = snap.manifest.id;
            let dependents = self.dependents_unlocked(root, &id)?;
            if !dependents.is_empty() && !cascade {
                return Err(SnapshotError::HasDependents { id, dependents });
            }
            let mut order: Vec<String> = dependents.into_iter().rev().collect();
            order.push(id);
            for id in &order {
                self.remove_one(root, id)?;
            }
            tracing::info!(removed = ?order, "removed snapshots");
            Ok(order)
        })?
        .ok_or_else(|| SnapshotError::NotFound { tag_or_id: tag_or_id.to_string() })
    }

    fn remove_one(&self, root: BorrowedFd<'_>, id: &str) -> Result<()> {
        let del = format!("{}{id}", names::REMOVING_PREFIX);
        let io = |what: String| move |e| SnapshotError::io(what, e);
        let del_c = sys::c(&del).map_err(io("name".into()))?;
        let id_c = sys::c(id).map_err(io("name".into()))?;
        let del_path = self.root.join(&del);
        sys::remove_tree_at(root, &del_c).map_err(io(format!("remove {}", del_path.display())))?;
        sys::renameat(root, &id_c, &del_c).map_err(io(format!("rename {} to {del}", self.root.join(id).display())))?;
        sys::fsync(root).map_err(io(format!("fsync {}", self.root.display())))?;
        sys::remove_tree_at(root, &del_c).map_err(io(format!("remove {}", del_path.display())))?;
        sys::fsync(root).map_err(io(format!("fsync {}", self.root.display())))
    }

    /// Removes what crashed processes left: staging directories whose lock nobody holds (the
    /// writer is dead; live writers' are kept), half-removed snapshots, and repairs an
    /// interrupted compaction swap (`.old-<id>` is removed if `<id>` exists, else renamed back
    /// to `<id>`). Returns the leftover paths it handled.
    pub fn cleanup_leftovers(&self) -> Result<Vec<PathBuf>> {
        Ok(self.locked(true, |root| self.cleanup_unlocked(root))?.unwrap_or_default())
    }

    fn cleanup_unlocked(&self, root: BorrowedFd<'_>) -> Result<Vec<PathBuf>> {
        let io = |what: String| move |e| SnapshotError::io(what, e);
        let mut names: Vec<String> = sys::read_dir(root)
            .map_err(io(format!("list {}", self.root.display())))?
            .iter()
            .filter_map(|e| e.name_str().map(str::to_string))
            .collect();
        names.sort();
        let mut handled = Vec::new();
        // Compaction swaps first, so their decision does not depend on the staging copy.
        for name in names.iter().filter(|n| n.starts_with(crate::names::OLD_PREFIX)) {
            let id = &name[crate::names::OLD_PREFIX.len()..];
            let path = self.root.join(name);
            let name_c = sys::c(name).map_err(io("name".into()))?;
            let swapped_in = validate_id(id).is_ok()
                && read_manifest_at(root, id).map_err(io(format!("read {}", self.root.join(id).display())))?.is_some();
            if swapped_in || validate_id(id).is_err() {
                sys::remove_tree_at(root, &name_c).map_err(io(format!("remove {}", path.display())))?;
                tracing::info!(dir = %path.display(), "removed the pre-compaction copy of a finished swap");
            } else {
                let id_c = sys::c(id).map_err(io("name".into()))?;
                sys::remove_tree_at(root, &id_c).map_err(io(format!("remove {}", self.root.join(id).display())))?;
                sys::renameat(root, &name_c, &id_c).map_err(io(format!("rename {} to {id}", path.display())))?;
                tracing::info!(dir = %path.display(), "rolled back an interrupted compaction swap");
            }
            handled.push(path);
        }
        for name in names.iter().filter(|n| n.starts_with(crate::names::REMOVING_PREFIX)) {
            let path = self.root.join(name);
            let name_c = sys::c(name).map_err(io("name".into()))?;
            sys::remove_tree_at(root, &name_c).map_err(io(format!("remove {}", path.display())))?;
            tracing::info!(dir = %path.display(), "finished an interrupted snapshot removal");
            handled.push(path);
        }
        for name in names.iter().filter(|n| n.starts_with(crate::names::STAGING_PREFIX)) {
            let path = self.root.join(name);
            let name_c = sys::c(name).map_err(io("name".into()))?;
            let dir = match sys::open_dir_at(root, &name_c) {
                Ok(dir) => dir,
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    sys::unlinkat(root, &name_c, 0).map_err(io(format!("remove {}", path.display())))?;
                    handled.push(path);
                    continue;
                }
                Err(e) => return Err(SnapshotError::io(format!("open {}", path.display()), e)),
            };
            if !sys::try_lock_exclusive(dir.as_fd()).map_err(io(format!("lock {}", path.display())))? {
                tracing::debug!(dir = %path.display(), "staging directory in use by a live writer; kept");
                continue;
            }
            // Keep `dir` (and so the lock) open while removing.
            sys::remove_tree_at(root, &name_c).map_err(io(format!("remove {}", path.display())))?;
            drop(dir);
            tracing::info!(dir = %path.display(), "removed the staging directory of a dead writer");
            handled.push(path);
        }
        if !handled.is_empty() {
            sys::fsync(root).map_err(io(format!("fsync {}", self.root.display())))?;
        }
        Ok(handled)
    }
}
