//! Durable snapshots as the API sees them: what to ask for, what a snapshot request returns,
//! and what a snapshot on disk is. The backend owns the on-disk format (`forkd-snapshot` for
//! KVM); the controller adds the lifecycle (events, waiting, restoring N sandboxes).

use crate::error::{Error, Result};
use crate::id::SandboxId;
use crate::spec::SandboxSpec;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What `snapshot create` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotOptions {
    /// A name to restore it by (`[a-z0-9][a-z0-9._-]{0,62}`, unique); without one the
    /// snapshot is known by its id.
    pub tag: Option<String>,
    /// Write only the pages that differ from the sandbox's latest snapshot (or the one it was
    /// restored from); that snapshot is the new one's parent.
    pub diff: bool,
    /// Return once the snapshot is durable (else as soon as the source runs again).
    pub wait: bool,
}

impl SnapshotOptions {
    pub fn validate(&self) -> Result<()> {
        if let Some(tag) = &self.tag {
            validate_tag(tag)?;
        }
        Ok(())
    }
}

/// Snapshot tags: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_tag(tag: &str) -> Result<()> {
    let ok = tag.len() <= 63
        && tag.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "tag",
            format!("`{tag}` is not a tag: use 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"),
        ))
    }
}

/// Full snapshot or diff against a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// What a snapshot request returns (at once, or once durable with `wait`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotResult {
    pub id: String,
    pub tag: Option<String>,
    pub source: SandboxId,
    pub kind: SnapshotKind,
    pub parent: Option<String>,
    /// How long the source's vCPUs were stopped.
    #[serde(rename = "pause_ms", with = "crate::time::duration_ms")]
    pub pause: Duration,
    /// The snapshot is on disk, fsynced and listed (always true with `wait`).
    pub durable: bool,
}

/// A snapshot on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub tag: Option<String>,
    pub kind: SnapshotKind,
    /// The snapshot a diff builds on.
    pub parent: Option<String>,
    /// The sandbox it was taken from.
    pub source: Option<String>,
    pub created_unix_ms: u64,
    /// The sandbox it restores as (image, memory, vcpus, network, limits).
    pub spec: SandboxSpec,
    /// Bytes of guest memory in this snapshot's file (non-zero pages; for a diff, the pages
    /// that changed since the parent).
    pub memory_bytes: u64,
    /// Pages of guest memory, and those holding data.
    pub pages: u64,
    pub nonzero_pages: u64,
    /// How the memory was written (`io_uring` or `pwrite`) and how long it took.
    pub write_method: String,
    pub write_ms: f64,
    /// Disk layers it holds (hard links, shared with the sandboxes that use them).
    pub disk_layers: usize,
    /// Snapshots (diffs) that build on this one.
    pub dependents: Vec<String>,
}

/// What `snapshot verify` checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub files_checked: u64,
    pub pages_checked: u64,
    pub bytes_read: u64,
}

/// A backend's answer to a snapshot request: the source runs again; the writer goes on.
#[derive(Debug, Clone)]
pub struct SnapshotStarted {
    pub id: String,
    pub kind: SnapshotKind,
    pub parent: Option<String>,
    pub pause: Duration,
    /// Backend-defined: how to wait for the writer.
    pub writer: serde_json::Value,
}

/// What the controller asks a backend to snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub source: SandboxId,
    /// The source's spec, kept with the snapshot so a restore recreates the same sandbox.
    pub spec: SandboxSpec,
    pub tag: Option<String>,
    pub diff: bool,
}
