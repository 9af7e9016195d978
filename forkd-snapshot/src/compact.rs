//! Compaction: folding a diff's chain into one full snapshot with the same id and tag.
//!
//! The chain is checked, its restore plan mapped read-only into this process, and written
//! through the ordinary memory writer into the staging directory `.tmp-<id>` (every page is
//! read and hashed; the resulting page table must equal the diff's, which re-verifies every
//! page of the chain). State files and disk layers are hard-linked from the old directory.
//! The memory state is the same, so `memory.pages` is identical and diffs built on this
//! snapshot stay valid.
//!
//! The swap, under the root's exclusive lock: rename `<id>` to `.old-<id>`, rename
//! `.tmp-<id>` to `<id>`, remove `.old-<id>`, fsyncing the root after each step.
//! [`SnapshotStore::cleanup_leftovers`] repairs a crash at any point: before the first rename
//! only an unlocked `.tmp-<id>` is left (removed); between the renames `<id>` is missing, so
//! `.old-<id>` is renamed back (and `.tmp-<id>` removed); after the second, `.old-<id>` is
//! removed.

use crate::manifest::Kind;
use crate::restore::{plan_for_chain, MappedImage};
use crate::staging::{linkable_files, CommitMode, Staging};
use crate::store::{Snapshot, SnapshotStore};
use crate::{names, Result, SnapshotError, PAGE_SIZE};

impl SnapshotStore {
    /// Folds the chain of `tag_or_id` into one full snapshot with the same id, tag and
    /// creation time. A full snapshot is returned unchanged. Crash-safe (see the module
    /// documentation).
    pub fn compact(&self, tag_or_id: &str) -> Result<Snapshot> {
        let snap = self.get(tag_or_id)?;
        if snap.manifest.kind == Kind::Full {
            tracing::debug!(id = snap.id(), "already a full snapshot; nothing to compact");
            return Ok(snap);
        }
        self.check_for_restore(&snap)?;
        let chain = self.chain(&snap)?;
        let (plan, top) = plan_for_chain(&chain)?;
        let image = MappedImage::map(&plan)?;
        let id = snap.manifest.id.clone();
        let staging = Staging::create_inner(self.root(), &id, CommitMode::Replace)?;
        let files = linkable_files(&snap.manifest);
        for name in files.keys() {
            staging.link_file(&snap.dir.join(name), name)?;
        }
        for layer in &snap.manifest.disk {
            let name = format!("{}/{layer}", names::DISK_DIR);
            staging.link_file(&snap.dir.join(&name), &name)?;
        }
        // SAFETY: the regions are our private read-only mapping of the chain, alive until
        // `image` drops at the end of this function; nothing writes it.
        let report = unsafe { staging.write_memory_from_files(&image.guest_regions()) }?;
        drop(image);
        if let Some(p) = (0..top.len()).find(|&p| report.hashes.get(p) != top.get(p)) {
            let offset = (p * PAGE_SIZE) as u64;
            let file = plan.owner_of(offset).and_then(|f| plan.files.get(f)).cloned().unwrap_or_default();
            let guest = snap.manifest.memory.guest_addr_of(offset).map_or("?".into(), |a| format!("{a:#x}"));
            return Err(SnapshotError::Checksum {
                file,
                detail: format!(
                    "page {p} (guest address {guest}) does not match the chain's memory.pages; the snapshot is \
                     damaged: remove it (with its dependents) or restore it from a copy"
                ),
            });
        }
        let mut manifest = snap.manifest.clone();
        manifest.kind = Kind::Full;
        manifest.parent = None;
        manifest.memory = report.info;
        manifest.files = files;
        let dir = staging.commit_inner(manifest, CommitMode::Replace)?;
        tracing::info!(id = %id, dir = %dir.display(), chain = chain.len(), "compacted snapshot");
        self.locked(false, |root| self.load(root, &id))?.flatten().ok_or(SnapshotError::NotFound { tag_or_id: id })
    }
}
