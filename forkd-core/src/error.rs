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
    /// The caller did not prove who it is (a TCP listener's bearer token).
    Unauthenticated,
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
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("{kind} `{id}` not found{hint}")]
    NotFound { kind: String, id: String, hint: String },
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
    Unauthenticated(String),
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
            Error::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    pub fn sandbox_not_found(id: impl Into<String>) -> Self {
        Error::NotFound { kind: "sandbox".into(), id: id.into(), hint: "; `forkd ls` lists sandboxes".into() }
    }

    pub fn internal(what: impl std::fmt::Display) -> Self {
        Error::Internal(what.to_string())
    }

    /// The error a remote forkd reported as `code` with `message` (this error's `Display`),
    /// rebuilt as the same variant: a client of the daemon sees exactly the errors an embedded
    /// controller returns. Structured fields are recovered from the message's fixed forms.
    pub fn from_remote(code: ErrorCode, message: &str, retry_after_ms: Option<u64>) -> Self {
        let message = message.to_string();
        match code {
            ErrorCode::NotFound => not_found_from(&message),
            ErrorCode::InvalidArgument => match message.strip_prefix("invalid ").and_then(|m| m.split_once(": ")) {
                Some((field, reason)) => Error::invalid(field, reason),
                None => Error::invalid("request", message),
            },
            ErrorCode::FailedPrecondition => Error::FailedPrecondition(message),
            ErrorCode::ResourceExhausted => {
                let (text, parsed) = match message.rsplit_once(" (retry in ") {
                    Some((text, rest)) => (text.to_string(), rest.trim_end_matches(" ms)").parse().ok()),
                    None => (message.clone(), None),
                };
                Error::ResourceExhausted { message: text, retry_after_ms: retry_after_ms.or(parsed).unwrap_or(1000) }
            }
            ErrorCode::Unavailable => Error::Unavailable(message),
            ErrorCode::DeadlineExceeded => Error::DeadlineExceeded(message),
            ErrorCode::Cancelled => {
                Error::Cancelled(message.strip_prefix("operation cancelled: ").unwrap_or(&message).to_string())
            }
            ErrorCode::Unauthenticated => Error::Unauthenticated(message),
            ErrorCode::Internal => Error::Internal(message),
        }
    }
}

/// `{kind} `{id}` not found{hint}` back into its parts.
fn not_found_from(message: &str) -> Error {
    let parsed = message.split_once(" `").and_then(|(kind, rest)| {
        let (id, hint) = rest.rsplit_once("` not found")?;
        Some(Error::NotFound { kind: kind.into(), id: id.into(), hint: hint.into() })
    });
    parsed.unwrap_or_else(|| Error::NotFound { kind: "object".into(), id: message.into(), hint: String::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_survives_the_trip_through_code_and_message() {
        let errors = [
            Error::sandbox_not_found("sb-1"),
            Error::NotFound { kind: "guest path".into(), id: "/no/such: file".into(), hint: String::new() },
            Error::invalid("limits.cpus", "0 is out of range: use e.g. 0.5"),
            Error::FailedPrecondition("sandbox exited; remove it".into()),
            Error::ResourceExhausted {
                message: "2 branches already in flight (the limit)".into(),
                retry_after_ms: 250,
            },
            Error::Unavailable("the agent did not answer".into()),
            Error::DeadlineExceeded("boot took too long".into()),
            Error::Cancelled("the sandbox was removed".into()),
            Error::Unauthenticated("missing bearer token".into()),
            Error::Internal("disk full".into()),
        ];
        for e in errors {
            let retry = match &e {
                Error::ResourceExhausted { retry_after_ms, .. } => Some(*retry_after_ms),
                _ => None,
            };
            assert_eq!(Error::from_remote(e.code(), &e.to_string(), retry), e);
            assert_eq!(Error::from_remote(e.code(), &e.to_string(), None), e, "without the trailer");
        }
    }

    #[test]
    fn unexpected_messages_keep_their_text() {
        let e = Error::from_remote(ErrorCode::InvalidArgument, "bad json", None);
        assert_eq!(e.to_string(), "invalid request: bad json");
        let e = Error::from_remote(ErrorCode::NotFound, "no such thing", None);
        assert!(e.to_string().contains("no such thing"), "{e}");
    }
}
