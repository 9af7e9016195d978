//! What a user asks for when creating a sandbox.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Most vCPUs a sandbox may have.
pub const MAX_VCPUS: u8 = 32;

/// A sandbox to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSpec {
    /// Root filesystem image name (`forkd image ls`).
    pub image: String,
    /// Guest kernel (`vmlinux`) to boot instead of the one `forkd kernel build` made.
    pub kernel: Option<PathBuf>,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// Free-form labels, returned in listings.
    pub labels: BTreeMap<String, String>,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        Self { image: "tiny".into(), kernel: None, memory_mib: DEFAULT_MEMORY_MIB, vcpus: 1, labels: BTreeMap::new() }
    }
}

impl SandboxSpec {
    /// Checks fields that do not need the host (images and kernels are checked by the backend).
    pub fn validate(&self) -> Result<()> {
        if self.image.is_empty() {
            return Err(Error::invalid("image", "must not be empty; `forkd image ls` lists images"));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::invalid("vcpus", format!("{} is out of range; use 1 to {MAX_VCPUS}", self.vcpus)));
        }
        if self.memory_mib == 0 {
            return Err(Error::invalid("memory", "must be positive, e.g. 256M"));
        }
        for key in self.labels.keys() {
            if key.is_empty() || key.len() > 63 {
                return Err(Error::invalid("labels", format!("label key `{key}` must be 1 to 63 bytes")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        SandboxSpec::default().validate().unwrap();
        let bad = SandboxSpec { vcpus: 0, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("vcpus"));
        let bad = SandboxSpec { image: String::new(), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("image"));
    }

    #[test]
    fn json_rejects_unknown_fields() {
        assert!(serde_json::from_str::<SandboxSpec>(r#"{"image":"tiny","memry":5}"#).is_err());
        let s: SandboxSpec = serde_json::from_str(r#"{"memory_mib":512}"#).unwrap();
        assert_eq!((s.memory_mib, s.image.as_str()), (512, "tiny"));
    }
}
