//! What the controller knows about a sandbox, and what a BRANCH returns.

use crate::id::SandboxId;
use crate::spec::SandboxSpec;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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
    /// Set when this sandbox is kept as a named template (`forkd template create`).
    #[serde(default)]
    pub template: Option<String>,
    /// The snapshot this sandbox was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
}

/// The outcome of a BRANCH.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BranchResult {
    pub source: SandboxId,
    pub children: Vec<SandboxInfo>,
    /// How long the source's vCPUs were stopped.
    #[serde(with = "crate::time::duration_ms")]
    pub pause: Duration,
}
