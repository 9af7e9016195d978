//! Code contexts: long-lived interpreters in the guest that run snippets without starting a
//! process each, keeping their state (variables, imports, open files, loaded data) between
//! snippets. A context is guest process state, so BRANCH children inherit it as it was.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The context a snippet runs in when none is named.
pub const DEFAULT_CONTEXT: &str = "main";
/// The only interpreter so far.
pub const PYTHON: &str = "python";
/// Largest snippet accepted.
pub const MAX_CODE_BYTES: usize = 1 << 20;

/// A snippet to run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalRequest {
    pub code: String,
    /// The context (`[A-Za-z0-9._-]{1,64}`), created on first use; default `main`.
    pub context: Option<String>,
    /// The interpreter; default `python`.
    pub lang: Option<String>,
    /// Interrupt the snippet (`KeyboardInterrupt`) after this long; the context lives on.
    #[serde(with = "crate::time::opt_millis")]
    pub timeout: Option<Duration>,
}

impl EvalRequest {
    pub fn new(code: impl Into<String>) -> Self {
        Self { code: code.into(), ..Self::default() }
    }

    /// The context this snippet runs in.
    pub fn context_name(&self) -> &str {
        self.context.as_deref().unwrap_or(DEFAULT_CONTEXT)
    }

    pub fn validate(&self) -> Result<()> {
        validate_context(self.context_name())?;
        if let Some(lang) = &self.lang {
            if lang != PYTHON {
                return Err(Error::invalid("lang", format!("`{lang}` is not supported; contexts run `{PYTHON}`")));
            }
        }
        if self.code.len() > MAX_CODE_BYTES {
            return Err(Error::invalid(
                "code",
                format!(
                    "{} bytes is more than {} KiB: write the code to a file in the sandbox and run that",
                    self.code.len(),
                    MAX_CODE_BYTES >> 10
                ),
            ));
        }
        Ok(())
    }
}

/// Context names: 1-64 of `A-Z a-z 0-9 . _ -`.
pub fn validate_context(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "context",
            format!("`{name}` is not a context name: use 1-64 of A-Z, a-z, 0-9, '.', '_', '-'"),
        ))
    }
}

/// An exception a snippet raised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalError {
    /// The exception's class (`ZeroDivisionError`, `KeyboardInterrupt` after a timeout,
    /// `ContextLost` when the interpreter died).
    pub name: String,
    pub message: String,
    /// The formatted traceback, the snippet's frames only.
    pub traceback: String,
}

/// How a snippet ended (its output went to the sink as it came).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub context: String,
    /// `repr()` of the final expression's value, when there is one and it is not `None`.
    pub value: Option<String>,
    /// The value as JSON, when it is JSON-serializable.
    pub json: Option<serde_json::Value>,
    pub error: Option<EvalError>,
    #[serde(rename = "duration_ms", with = "crate::time::duration_ms")]
    pub duration: Duration,
    /// This snippet started the context's interpreter.
    pub created: bool,
    /// The context's interpreter had died; this snippet started a new one.
    pub restarted: bool,
    pub timed_out: bool,
}

/// One live context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextInfo {
    pub name: String,
    pub lang: String,
    /// The interpreter's pid in the guest (0 while a snippet runs in it).
    pub pid: u32,
    /// Snippets run so far.
    pub evals: u64,
    /// The interpreter's version, e.g. `3.11.2`.
    pub version: String,
}

/// Interpreters a template starts (and modules it imports) before it is frozen, so every
/// sandbox forked from it evaluates at once: `python` or `python:numpy,pandas`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Warm {
    pub modules: Vec<String>,
}

impl std::str::FromStr for Warm {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        let (lang, modules) = text.split_once(':').unwrap_or((text, ""));
        if lang != PYTHON {
            return Err(Error::invalid(
                "warm",
                format!("`{lang}` is not supported; give `python` or `python:module,...`"),
            ));
        }
        let modules: Vec<String> =
            modules.split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect();
        let valid =
            |m: &str| m.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        if let Some(bad) = modules.iter().find(|m| !valid(m)) {
            return Err(Error::invalid("warm", format!("`{bad}` is not a Python module name")));
        }
        Ok(Warm { modules })
    }
}

impl Warm {
    /// The snippet that warms a context.
    pub fn code(&self) -> String {
        if self.modules.is_empty() {
            "pass".into()
        } else {
            format!("import {}", self.modules.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        EvalRequest::new("1 + 1").validate().unwrap();
        let named = |c: &str| EvalRequest { context: Some(c.into()), ..EvalRequest::new("1") };
        assert!(named("a b").validate().unwrap_err().to_string().starts_with("invalid context"));
        let cobol = EvalRequest { lang: Some("cobol".into()), ..EvalRequest::new("1") };
        assert!(cobol.validate().unwrap_err().to_string().starts_with("invalid lang"));
        assert!(EvalRequest::new("x".repeat(MAX_CODE_BYTES + 1)).validate().is_err());
    }

    #[test]
    fn warm_specs() {
        assert_eq!("python".parse::<Warm>().unwrap().code(), "pass");
        assert_eq!("python:numpy, os.path".parse::<Warm>().unwrap().code(), "import numpy, os.path");
        assert!("ruby".parse::<Warm>().is_err());
        assert!("python:os;rm".parse::<Warm>().is_err());
    }
}
