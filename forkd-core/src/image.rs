//! What the API says about a root filesystem image (`forkd-guest` builds and stores them).

use serde::{Deserialize, Serialize};

/// One image new sandboxes can boot from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The name to pass as `SandboxSpec::image`.
    pub name: String,
    /// `tiny` (busybox + agent), `default` (Debian + python3) or `imported`.
    pub kind: String,
    /// Apparent size of the root filesystem in bytes.
    pub size_bytes: u64,
    /// sha256 of the root filesystem, lowercase hex.
    pub sha256: String,
    /// Build time, seconds since the Unix epoch.
    pub created_unix: u64,
}
