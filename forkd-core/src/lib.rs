//! forkd-core: sandboxes for AI agents that BRANCH.
//!
//! This crate holds everything a frontend needs and nothing about how sandboxes are run:
//! the sandbox types ([`SandboxSpec`], [`ExecRequest`]...), the typed [`Error`], the
//! [`SandboxBackend`] trait the KVM backend implements, and the [`Controller`] that frontends
//! (CLI, daemon, MCP) and embedding Rust services drive.

pub mod backend;
pub mod controller;
pub mod dirs;
pub mod doctor;
pub mod error;
pub mod eval;
pub mod events;
pub mod exec;
pub mod id;
pub mod image;
pub mod sandbox;
pub mod size;
pub mod snapshot;
pub mod spec;
pub mod store;
pub mod time;
pub mod token;

pub use backend::{BranchOptions, DirEntry, Liveness, MemoryUsage, ResourceUsage, RuntimeHandle, SandboxBackend};
pub use controller::{Controller, ControllerOptions};
pub use dirs::Dirs;
pub use error::{Error, ErrorCode, Result};
pub use eval::{ContextInfo, EvalError, EvalRequest, EvalResult, Warm};
pub use events::{Event, EventKind, Events, Subscription};
pub use exec::{CancelToken, CapturedOutput, ExecOutcome, ExecRequest, ExecSink, ExitStatus, OutputStream};
pub use id::SandboxId;
pub use image::ImageInfo;
pub use sandbox::{BranchResult, SandboxInfo, SandboxState};
pub use snapshot::{SnapshotInfo, SnapshotKind, SnapshotOptions, SnapshotResult, VerifyReport};
pub use spec::{NetworkMode, NetworkPolicy, ResourceLimits, SandboxSpec};
