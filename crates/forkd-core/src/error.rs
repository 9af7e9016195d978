//! The one error type of the public API. Every variant maps to a stable code (mirrored as
//! gRPC status and HTTP status by the daemon) and carries a message that says what to do.

use serde::{Deserialize, Serialize};

/// Stable, transport-independent error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    InvalidArgument,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    Internal,
}

impl ErrorCode {
    /// The snake_case name (`not_found`, ...), as in JSON error bodies and metrics labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("{kind} `{id}` not found{hint}")]
    NotFound { kind: &'static str, id: String, hint: String },
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{message} (retry in {retry_after_ms} ms)")]
    ResourceExhausted { message: String, retry_after_ms: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("operation cancelled: {0}")]
    Cancelled(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotFound { .. } => ErrorCode::NotFound,
            Error::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::ResourceExhausted { .. } => ErrorCode::ResourceExhausted,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::DeadlineExceeded(_) => ErrorCode::DeadlineExceeded,
            Error::Cancelled(_) => ErrorCode::Cancelled,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    pub fn sandbox_not_found(id: impl Into<String>) -> Self {
        Error::NotFound { kind: "sandbox", id: id.into(), hint: "; `forkd ls` lists sandboxes".into() }
    }

    pub fn internal(what: impl std::fmt::Display) -> Self {
        Error::Internal(what.to_string())
    }
}
