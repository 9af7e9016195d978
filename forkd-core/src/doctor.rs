//! `forkd doctor`'s model: each crate that depends on the host contributes checks of this one
//! shape, and frontends print them.

use serde::Serialize;

/// One host check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name, e.g. `kvm` or `transparent huge pages`.
    #[serde(rename = "check")]
    pub name: String,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about it (only when not ok).
    pub fix: Option<String>,
}

impl Check {
    /// A check whose `fix` is kept only when it failed (and the fix is not empty).
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        let fix = fix.into();
        Self { name: name.into(), ok, detail: detail.into(), fix: (!ok && !fix.is_empty()).then_some(fix) }
    }

    /// A line that informs and never fails.
    pub fn info(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, true, detail, "")
    }
}

/// Whether every check passed.
pub fn all_ok(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok)
}
