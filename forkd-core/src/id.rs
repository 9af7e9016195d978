//! Sandbox identifiers.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A sandbox id: `sb-` followed by 12 lowercase hex digits for generated ids; any
/// `[a-z0-9][a-z0-9-]{0,62}` is accepted when parsing (ids are used in paths and interface
/// names, so the alphabet is deliberately small).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

impl SandboxId {
    /// A fresh random id.
    pub fn generate() -> Self {
        SandboxId(format!("sb-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let ok = !text.is_empty()
            && text.len() <= 63
            && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !text.starts_with('-');
        if ok {
            Ok(SandboxId(text.to_string()))
        } else {
            Err(Error::invalid(
                "id",
                format!("`{text}` is not a sandbox id (lowercase letters, digits and '-', at most 63)"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SandboxId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        SandboxId::parse(&s)
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_differ() {
        let a = SandboxId::generate();
        assert_eq!(SandboxId::parse(a.as_str()).unwrap(), a);
        assert_ne!(a, SandboxId::generate());
    }

    #[test]
    fn hostile_ids_are_rejected() {
        for bad in ["", "../etc", "A", "a/b", "-x", &"a".repeat(64), "sb 1"] {
            assert!(SandboxId::parse(bad).is_err(), "{bad}");
        }
    }
}
