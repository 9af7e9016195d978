//! A snapshot being written: the staging directory `<root>/.tmp-<id>` and its commit.
//!
//! The launcher creates the staging directory ([`Staging::create`]), hard-links the frozen
//! disk layers into it and hands the root and staging directory descriptors to the writer,
//! a frozen fork of the VMM that may be jailed and see no paths ([`Staging::from_fds`]). The
//! writer writes memory and state files and commits: every file and directory is fsynced,
//! `snapshot.json` is written last, and `renameat(.tmp-<id>, <id>)` on the root descriptor is
//! the commit point, followed by an fsync of the root.
//!
//! The staging directory carries an exclusive `flock` for as long as a `Staging` (in any
//! process sharing the open file description) is alive, so
//! [`crate::SnapshotStore::cleanup_leftovers`] only removes staging directories whose writer
//! died. Dropping a `Staging` without committing removes the directory. Commits, removals,
//! compaction swaps and cleanups serialize on an exclusive `flock` of the root directory;
//! readers take it shared.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::manifest::{FileEntry, Kind, Manifest};
use crate::pages::ENTRY_SIZE;
use crate::root::{committed_entries, lock_root, make_parents, read_manifest_at, staging_name, write_file_at};
use crate::verified::Verified;
use crate::writer::{self, GuestRegion, MemoryWriteReport, Residency, WriteOptions};
use crate::{names, sys, validate_file_name, validate_id, validate_tag, PageHashes, Result, SnapshotError};
use crate::{PAGE_SIZE, SCHEMA_VERSION};

/// Names that belong to the format and cannot be written with [`Staging::write_file`].
fn is_reserved(name: &str) -> bool {
    [names::MANIFEST, names::MEMORY, names::PAGES, names::VERIFIED].contains(&name)
}

/// How a commit publishes the staging directory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum CommitMode {
    /// A new snapshot: `<id>` must not exist.
    New,
    /// Compaction: replaces the existing `<id>` (rename it to `.old-<id>`, the staging
    /// directory to `<id>`, remove `.old-<id>`).
    Replace,
}

/// A snapshot being written. See the module documentation.
pub struct Staging {
    root: OwnedFd,
    dir: OwnedFd,
    id: String,
    /// The root's path, for messages (unknown in a jail without /proc).
    root_path: Option<PathBuf>,
    /// Committed or aborted: nothing left to do on drop.
    finished: bool,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging").field("id", &self.id).field("dir", &self.display_dir()).finish()
    }
}

impl Staging {
    /// Launcher side: creates `<root>/.tmp-<id>` (and `root` if missing) and locks it.
    pub fn create(root: &Path, id: &str) -> Result<Staging> {
        Self::create_inner(root, id, CommitMode::New)
    }

    pub(crate) fn create_inner(root: &Path, id: &str, mode: CommitMode) -> Result<Staging> {
        validate_id(id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| SnapshotError::io(format!("create snapshot root {}", root.display()), e))?;
        let root_fd = sys::open_dir(root).map_err(|e| SnapshotError::io(format!("open {}", root.display()), e))?;
        let tmp = staging_name(id);
        let tmp_path = root.join(&tmp);
        let tmp_c = sys::c(&tmp).map_err(|e| SnapshotError::io("staging name", e))?;
        let dir = {
            let _lock = lock_root(root_fd.as_fd(), true)
                .map_err(|e| SnapshotError::io(format!("lock {}", root.display()), e))?;
            let id_c = sys::c(id).map_err(|e| SnapshotError::io("snapshot id", e))?;
            let exists = sys::fstatat(root_fd.as_fd(), &id_c)
                .map_err(|e| SnapshotError::io(format!("stat {}", root.join(id).display()), e))?
                .is_some();
            if exists && mode == CommitMode::New {
                return Err(SnapshotError::IdExists { id: id.to_string() });
            }
            match sys::mkdirat(root_fd.as_fd(), &tmp_c, 0o700, false) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Err(SnapshotError::Busy { path: tmp_path }),
                Err(e) => return Err(SnapshotError::io(format!("create {}", tmp_path.display()), e)),
            }
            let locked = sys::open_dir_at(root_fd.as_fd(), &tmp_c)
                .and_then(|dir| sys::try_lock_exclusive(dir.as_fd()).map(|ok| (dir, ok)));
            match locked {
                Ok((dir, true)) => dir,
                Ok((_, false)) => return Err(SnapshotError::Busy { path: tmp_path }),
                Err(e) => {
                    let _ = sys::unlinkat(root_fd.as_fd(), &tmp_c, libc::AT_REMOVEDIR);
                    return Err(SnapshotError::io(format!("open {}", tmp_path.display()), e));
                }
            }
        };
        tracing::debug!(dir = %tmp_path.display(), "staging snapshot");
        Ok(Staging { root: root_fd, dir, id: id.to_string(), root_path: Some(root.to_path_buf()), finished: false })
    }

    /// Writer side (a jailed process that cannot see any path): from the root and staging
    /// directory descriptors the launcher passed. Takes the staging lock; that succeeds when
    /// `dir` shares the launcher's open file description (descriptors passed over a socket
    /// do) and fails with [`SnapshotError::Busy`] if another writer holds it.
    pub fn from_fds(root: OwnedFd, dir: OwnedFd, id: &str) -> Result<Staging> {
        validate_id(id)?;
        let tmp = staging_name(id);
        let tmp_c = sys::c(&tmp).map_err(|e| SnapshotError::io("staging name", e))?;
        let entry = sys::fstatat(root.as_fd(), &tmp_c).map_err(|e| SnapshotError::io(format!("stat {tmp}"), e))?;
        let own = sys::fstat(dir.as_fd()).map_err(|e| SnapshotError::io("fstat the staging directory", e))?;
        if !entry.is_some_and(|st| st.st_dev == own.st_dev && st.st_ino == own.st_ino) {
            return Err(SnapshotError::io(
                "check the staging descriptors",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the directory descriptor is not {tmp} under the root descriptor (wrong id or fds)"),
                ),
            ));
        }
        let root_path = sys::fd_path(root.as_fd());
        let display = root_path.clone().unwrap_or_else(|| PathBuf::from("<snapshot root>")).join(&tmp);
        match sys::try_lock_exclusive(dir.as_fd()) {
            Ok(true) => Ok(Staging { root, dir, id: id.to_string(), root_path, finished: false }),
            // Not ours to remove: dropping the descriptors leaves the directory alone.
            Ok(false) => Err(SnapshotError::Busy { path: display }),
            Err(e) => Err(SnapshotError::io(format!("lock {}", display.display()), e)),
        }
    }

    /// Gives up this handle without removing the directory and returns (duplicates of) the
    /// root and staging descriptors, e.g. to send to the writer process. The staging lock
    /// belongs to the open file description, so it stays held while any process keeps the
    /// staging descriptor open; if the writer dies without committing, the directory is left
    /// for [`crate::SnapshotStore::cleanup_leftovers`]. (Keeping the launcher's `Staging`
    /// alive until the writer reports instead makes its drop remove a failed attempt.)
    pub fn into_fds(mut self) -> Result<(OwnedFd, OwnedFd)> {
        let root = self.root.try_clone().map_err(|e| SnapshotError::io("duplicate the root descriptor", e))?;
        let dir = self.dir.try_clone().map_err(|e| SnapshotError::io("duplicate the staging descriptor", e))?;
        self.finished = true;
        Ok((root, dir))
    }

    /// The snapshot root directory.
    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The staging directory.
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The snapshot id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The staging directory's path for messages (`<snapshot root>/.tmp-<id>` when the root's
    /// path is unknown).
    fn display_dir(&self) -> PathBuf {
        self.root_path.clone().unwrap_or_else(|| PathBuf::from("<snapshot root>")).join(staging_name(&self.id))
    }

    /// Writes a small file (fsynced) and returns its entry for [`Manifest::files`]. `name` may
    /// contain `/` (subdirectories are created); the format's own file names are refused.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<FileEntry> {
        validate_file_name(name)?;
        if is_reserved(name) {
            return Err(SnapshotError::InvalidName {
                name: name.to_string(),
                reason: "the name is reserved by the format",
            });
        }
        write_file_at(self.dir.as_fd(), &self.display_dir(), name, bytes)
    }

    /// Hard-links `from` as `name` (e.g. `disk/layer-002`; creates subdirectories) and fsyncs
    /// the file. Launcher side (needs paths). `from` must be on the root's filesystem.
    pub fn link_file(&self, from: &Path, name: &str) -> Result<()> {
        validate_file_name(name)?;
        if is_reserved(name) {
            return Err(SnapshotError::InvalidName {
                name: name.to_string(),
                reason: "the name is reserved by the format",
            });
        }
        let target = self.display_dir().join(name);
        make_parents(self.dir.as_fd(), &self.display_dir(), name)?;
        let name_c = sys::c(name).map_err(|e| SnapshotError::io("file name", e))?;
        sys::link_into(from, self.dir.as_fd(), &name_c).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EXDEV) {
                " (it must be on the same filesystem as the snapshot root)"
            } else {
                ""
            };
            SnapshotError::io(format!("hard-link {} as {}{hint}", from.display(), target.display()), e)
        })?;
        // A frozen layer may still have dirty pages from the guest's last writes.
        let file = std::fs::File::open(from).map_err(|e| SnapshotError::io(format!("open {}", from.display()), e))?;
        file.sync_all().map_err(|e| SnapshotError::io(format!("fsync {}", from.display()), e))
    }

    /// The [`FileEntry`] of a file already in the staging directory (e.g. a linked disk
    /// layer the caller wants verified too: add it to [`Manifest::files`]).
    pub fn file_entry(&self, name: &str) -> Result<FileEntry> {
        validate_file_name(name)?;
        let path = self.display_dir().join(name);
        let name_c = sys::c(name).map_err(|e| SnapshotError::io("file name", e))?;
        let fd = sys::openat(self.dir.as_fd(), &name_c, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
            .map_err(|e| SnapshotError::io(format!("open {}", path.display()), e))?;
        FileEntry::of_fd(fd.as_fd()).map_err(|e| SnapshotError::io(format!("read {}", path.display()), e))
    }

    /// Writes `memory.bin` (`O_DIRECT` where the filesystem supports it, zero pages as holes,
    /// with a parent only the pages whose hash differs from the parent's) and `memory.pages`,
    /// both fsynced.
    ///
    /// # Safety
    /// Every region must be mapped and readable for the whole call, and nothing may write it
    /// during the call (the writer is a frozen copy-on-write fork).
    pub unsafe fn write_memory(
        &self,
        regions: &[GuestRegion],
        parent: Option<&PageHashes>,
        opts: &WriteOptions,
    ) -> Result<MemoryWriteReport> {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            writer::write_memory(self.dir.as_fd(), &self.display_dir(), regions, parent, opts, Residency::Auto, true)
        }
    }

    /// Writes memory from file mappings (compaction): every page is read.
    ///
    /// # Safety
    /// As [`Staging::write_memory`].
    pub(crate) unsafe fn write_memory_from_files(&self, regions: &[GuestRegion]) -> Result<MemoryWriteReport> {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            writer::write_memory(
                self.dir.as_fd(),
                &self.display_dir(),
                regions,
                None,
                &WriteOptions::default(),
                Residency::ReadAll,
                true,
            )
        }
    }

    /// Adds the `memory.pages` entry to `manifest.files`, writes `verified.json` and
    /// `snapshot.json`, fsyncs the directory tree, renames `.tmp-<id>` to `<id>` on the root
    /// descriptor and fsyncs the root. Refuses a tag another committed snapshot has
    /// ([`SnapshotError::TagExists`]) and a diff whose parent is missing. On any error the
    /// staging directory is removed. Returns the snapshot directory (relative to the root if
    /// the root's path is unknown).
    pub fn commit(self, manifest: Manifest) -> Result<PathBuf> {
        self.commit_inner(manifest, CommitMode::New)
    }

    pub(crate) fn commit_inner(mut self, mut manifest: Manifest, mode: CommitMode) -> Result<PathBuf> {
        let display = self.display_dir();
        self.check_manifest(&display, &mut manifest)?;
        let dir = self.dir.as_fd();

        // verified.json: the memory.bin we just wrote matches memory.pages by construction.
        let mem_c = sys::c(names::MEMORY).map_err(|e| SnapshotError::io("name", e))?;
        let mem_st = sys::fstatat(dir, &mem_c)
            .map_err(|e| SnapshotError::io(format!("stat {}", display.join(names::MEMORY).display()), e))?
            .ok_or_else(|| SnapshotError::InvalidManifest {
                path: display.clone(),
                detail: "memory.bin is missing: call write_memory before commit".into(),
            })?;
        let pages_xxh3 = manifest.files.get(names::PAGES).map(|e| e.xxh3.clone()).unwrap_or_default();
        let verified = Verified::new(&mem_st, pages_xxh3);
        write_file_at(dir, &display, names::VERIFIED, &verified.to_json())?;
        write_file_at(dir, &display, names::MANIFEST, &manifest.to_json())?;
        sys::fsync_dirs(dir).map_err(|e| SnapshotError::io(format!("fsync {}", display.display()), e))?;

        let root = self.root.as_fd();
        let root_display = self.root_path.clone().unwrap_or_else(|| PathBuf::from("<snapshot root>"));
        let _lock =
            lock_root(root, true).map_err(|e| SnapshotError::io(format!("lock {}", root_display.display()), e))?;
        check_tag_free(root, &root_display, manifest.tag.as_deref(), &self.id)?;
        if let Some(parent) = manifest.parent.as_deref() {
            check_parent(root, &root_display, parent, &manifest)?;
        }
        let id_c = sys::c(&self.id).map_err(|e| SnapshotError::io("snapshot id", e))?;
        let tmp_c = sys::c(staging_name(&self.id)).map_err(|e| SnapshotError::io("staging name", e))?;
        let fsync_root = |root: BorrowedFd<'_>| {
            sys::fsync(root).map_err(|e| SnapshotError::io(format!("fsync {}", root_display.display()), e))
        };
        match mode {
            CommitMode::New => {
                sys::rename_noreplace(root, &tmp_c, &id_c).map_err(|e| match e.raw_os_error() {
                    Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => SnapshotError::IdExists { id: self.id.clone() },
                    _ => SnapshotError::io(format!("rename {} to {}", display.display(), self.id), e),
                })?;
                self.finished = true;
                fsync_root(root)?;
            }
            CommitMode::Replace => {
                let old = format!("{}{}", names::OLD_PREFIX, self.id);
                let old_c = sys::c(&old).map_err(|e| SnapshotError::io("name", e))?;
                // A leftover from an earlier interrupted swap (with <id> present) is stale.
                sys::remove_tree_at(root, &old_c)
                    .map_err(|e| SnapshotError::io(format!("remove {}", root_display.join(&old).display()), e))?;
                sys::renameat(root, &id_c, &old_c)
                    .map_err(|e| SnapshotError::io(format!("rename {} to {old}", self.id), e))?;
                fsync_root(root)?;
                if let Err(e) = sys::renameat(root, &tmp_c, &id_c) {
                    // Put the old one back; cleanup_leftovers would do the same.
                    let _ = sys::renameat(root, &old_c, &id_c);
                    return Err(SnapshotError::io(format!("rename {} to {}", display.display(), self.id), e));
                }
                self.finished = true;
                fsync_root(root)?;
                if let Err(e) = sys::remove_tree_at(root, &old_c) {
                    tracing::warn!(error = %e, dir = %root_display.join(&old).display(),
                        "could not remove the pre-compaction copy; cleanup_leftovers will");
                }
                fsync_root(root)?;
            }
        }
        tracing::info!(id = %self.id, tag = ?manifest.tag, kind = ?manifest.kind, "committed snapshot");
        Ok(match &self.root_path {
            Some(root) => root.join(&self.id),
            None => PathBuf::from(&self.id),
        })
    }

    /// Validates the manifest against the staged files and records `memory.pages`.
    fn check_manifest(&self, display: &Path, manifest: &mut Manifest) -> Result<()> {
        let bad = |detail: String| Err(SnapshotError::InvalidManifest { path: display.to_path_buf(), detail });
        if manifest.schema_version != SCHEMA_VERSION {
            return bad(format!(
                "schema_version is {}; set it to forkd_snapshot::SCHEMA_VERSION ({SCHEMA_VERSION})",
                manifest.schema_version
            ));
        }
        if manifest.id != self.id {
            return bad(format!("manifest id {:?} is not the staging id {:?}", manifest.id, self.id));
        }
        if let Some(tag) = &manifest.tag {
            validate_tag(tag)?;
        }
        match (manifest.kind, &manifest.parent) {
            (Kind::Full, Some(_)) => return bad("a full snapshot has no parent".into()),
            (Kind::Diff, None) => return bad("a diff snapshot needs its parent id".into()),
            (Kind::Diff, Some(p)) if p == &self.id => return bad("a snapshot cannot be its own parent".into()),
            _ => {}
        }
        manifest.memory.check_layout(display)?;
        let dir = self.dir.as_fd();
        let stat = |name: &str| -> Result<Option<libc::stat>> {
            let c = sys::c(name).map_err(|e| SnapshotError::io("file name", e))?;
            sys::fstatat(dir, &c).map_err(|e| SnapshotError::io(format!("stat {}", display.join(name).display()), e))
        };
        match stat(names::MEMORY)? {
            Some(st) if sys::is_file(&st) && st.st_size as u64 == manifest.memory.image_size() => {}
            Some(st) => {
                return bad(format!(
                    "memory.bin is {} bytes but manifest.memory describes {}",
                    st.st_size,
                    manifest.memory.image_size()
                ))
            }
            None => return bad("memory.bin is missing: call write_memory before commit".into()),
        }
        let pages_entry = self.file_entry(names::PAGES)?;
        if pages_entry.size != manifest.memory.pages * ENTRY_SIZE as u64 {
            return bad(format!(
                "memory.pages is {} bytes but manifest.memory has {} pages of {PAGE_SIZE} bytes",
                pages_entry.size, manifest.memory.pages
            ));
        }
        manifest.files.insert(names::PAGES.to_string(), pages_entry);
        for (name, entry) in &manifest.files {
            validate_file_name(name)?;
            if name != names::PAGES && is_reserved(name) {
                return bad(format!("{name} must not be listed in files"));
            }
            match stat(name)? {
                Some(st) if sys::is_file(&st) && st.st_size as u64 == entry.size => {}
                Some(st) => return bad(format!("{name} is {} bytes, files says {}", st.st_size, entry.size)),
                None => return bad(format!("{name} is listed in files but was not written")),
            }
        }
        for layer in &manifest.disk {
            validate_file_name(layer)?;
            let name = format!("{}/{layer}", names::DISK_DIR);
            if !stat(&name)?.is_some_and(|st| sys::is_file(&st)) {
                return bad(format!("disk layer {name} is missing: link it with Staging::link_file"));
            }
        }
        Ok(())
    }

    /// Removes the staging directory.
    pub fn abort(mut self) {
        self.abort_inner();
    }

    fn abort_inner(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let tmp = staging_name(&self.id);
        let result = (|| -> io::Result<()> {
            let tmp_c = sys::c(&tmp)?;
            let own = sys::fstat(self.dir.as_fd())?;
            // Only remove the entry if it still is our directory (not after a commit renamed it).
            match sys::fstatat(self.root.as_fd(), &tmp_c)? {
                Some(st) if st.st_dev == own.st_dev && st.st_ino == own.st_ino => {
                    sys::remove_tree_at(self.root.as_fd(), &tmp_c)?;
                    sys::fsync(self.root.as_fd())
                }
                _ => Ok(()),
            }
        })();
        match result {
            Ok(()) => tracing::debug!(dir = %self.display_dir().display(), "removed staging directory"),
            Err(e) => tracing::warn!(error = %e, dir = %self.display_dir().display(),
                "could not remove staging directory; cleanup_leftovers will"),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.abort_inner();
    }
}

/// Refuses `tag` if a committed snapshot other than `own_id` has it.
fn check_tag_free(root: BorrowedFd<'_>, root_display: &Path, tag: Option<&str>, own_id: &str) -> Result<()> {
    let Some(tag) = tag else { return Ok(()) };
    let entries =
        committed_entries(root).map_err(|e| SnapshotError::io(format!("list {}", root_display.display()), e))?;
    for entry in entries.iter().filter(|e| e.as_str() != own_id) {
        let Ok(Some(bytes)) = read_manifest_at(root, entry) else { continue };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        if value.get("tag").and_then(|t| t.as_str()) == Some(tag) {
            return Err(SnapshotError::TagExists { tag: tag.to_string() });
        }
    }
    Ok(())
}

/// A diff's parent must be committed and describe the same memory layout.
fn check_parent(root: BorrowedFd<'_>, root_display: &Path, parent: &str, manifest: &Manifest) -> Result<()> {
    let path = root_display.join(parent).join(names::MANIFEST);
    let not_found = || SnapshotError::NotFound { tag_or_id: parent.to_string() };
    validate_id(parent).map_err(|_| not_found())?;
    let bytes = read_manifest_at(root, parent)
        .map_err(|e| SnapshotError::io(format!("read {}", path.display()), e))?
        .ok_or_else(not_found)?;
    let parent_manifest = Manifest::parse(&path, &bytes)?;
    if parent_manifest.memory.regions != manifest.memory.regions {
        return Err(SnapshotError::InvalidManifest {
            path,
            detail: format!(
                "the parent's memory layout differs from diff {}'s; take a full snapshot instead",
                manifest.id
            ),
        });
    }
    Ok(())
}

/// Snapshot files by name, for the compactor: everything listed in `files` except the page
/// table (rewritten) and the disk layers.
pub(crate) fn linkable_files(manifest: &Manifest) -> BTreeMap<String, FileEntry> {
    manifest
        .files
        .iter()
        .filter(|(name, _)| name.as_str() != names::PAGES)
        .map(|(n, e)| (n.clone(), e.clone()))
        .collect()
}
