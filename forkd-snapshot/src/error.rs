//! The crate's error type: one variant per thing that can go wrong, each message saying what
//! happened, where, and what to do about it.

use std::io;
use std::path::PathBuf;

/// Everything that can fail in this crate.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No snapshot has this tag or id (also: a diff's parent is gone).
    #[error("snapshot {tag_or_id:?} not found (list the existing ones with `forkd snapshot ls`)")]
    NotFound { tag_or_id: String },

    /// The file was written by a newer forkd with a format this one cannot read.
    #[error(
        "{}: schema_version {version} is not supported (this forkd reads up to {}); upgrade forkd to use it",
        path.display(),
        crate::SCHEMA_VERSION
    )]
    UnknownSchema { path: PathBuf, version: u64 },

    /// A file's content does not match what the manifest recorded: the snapshot is damaged.
    #[error("{}: {detail}", file.display())]
    Checksum { file: PathBuf, detail: String },

    /// The filesystem is full (ENOSPC or EDQUOT).
    #[error(
        "not enough space to write {}: {needed_bytes} more bytes needed, {available_bytes} available; \
         free space there or put snapshots on another filesystem",
        path.display()
    )]
    NoSpace { path: PathBuf, needed_bytes: u64, available_bytes: u64 },

    /// Diff snapshots are built on this one.
    #[error(
        "snapshot {id} has {} dependent diff snapshot(s) ({}); remove them first, or remove it with --cascade",
        dependents.len(),
        dependents.join(", ")
    )]
    HasDependents { id: String, dependents: Vec<String> },

    /// Another committed snapshot already has this tag.
    #[error("tag {tag:?} is already used by another snapshot; pick another tag or remove that snapshot first")]
    TagExists { tag: String },

    /// A tag, id or file name is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// A committed snapshot with this id already exists.
    #[error("snapshot id {id:?} already exists; use a new id (forkd_snapshot::new_id)")]
    IdExists { id: String },

    /// The staging directory exists and another process holds its lock (or a crashed writer
    /// left it and nobody cleaned up yet).
    #[error(
        "staging directory {} is in use by another writer (if no writer is running, \
         SnapshotStore::cleanup_leftovers removes it)",
        path.display()
    )]
    Busy { path: PathBuf },

    /// The guest memory regions handed to the writer are unusable.
    #[error("guest memory region {index}: {reason}")]
    InvalidRegion { index: usize, reason: String },

    /// The parent's page table does not describe the same memory as the regions being written.
    #[error(
        "the parent snapshot has {parent_pages} pages but the memory being written has {pages}; \
         a diff needs a parent of the same memory layout (take a full snapshot instead)"
    )]
    ParentMismatch { parent_pages: u64, pages: u64 },

    /// The manifest handed to commit, or a chain on disk, is inconsistent.
    #[error("{}: {detail}", path.display())]
    InvalidManifest { path: PathBuf, detail: String },

    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    /// A JSON file could not be parsed or written.
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, SnapshotError>;

impl SnapshotError {
    /// An [`SnapshotError::Io`] saying what was being done.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        SnapshotError::Io { what: what.into(), source }
    }
}

/// Whether an error means the filesystem is out of space (or the user out of quota).
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}
