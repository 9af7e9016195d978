//! Per-sandbox network isolation for forkd.
//!
//! Each `nat` sandbox gets a named network namespace `fkd-<id>` (bind-mounted under
//! `/run/netns` like `ip netns add`) holding:
//!
//! * `tap0`, the guest's link: `172.16.0.1/30` with a fixed MAC, a permanent neighbour
//!   entry for the guest `172.16.0.2` (fixed MAC too). The same in every sandbox, so a BRANCH
//!   child's guest, which keeps its source's IP and ARP state, works in the child's own
//!   namespace from its first packet.
//! * `veth0`, one end of a veth pair whose host end `fkd-h<N>` gets a unique address from the
//!   pool (slot N: host `10.200.x.(4N+1)/30`, namespace `.(4N+2)`), allocated in a lease file
//!   under the state directory.
//! * an nftables table with the egress policy (default deny; `CIDR[:PORT]` allow rules or
//!   `allow-all`; loopback, link-local/metadata, multicast and the pool are never allowed),
//!   anti-spoofing, and masquerade of the guest onto `veth0`'s address.
//!
//! On the host, one table `inet forkd` drops everything a sandbox sends to the host itself
//! (INPUT), between sandboxes and into sandboxes (FORWARD), and masquerades the pool on its
//! way out. It exists while any sandbox network exists; so does `net.ipv4.ip_forward=1`
//! (restored after the last one when forkd turned it on).
//!
//! # Use
//!
//! ```no_run
//! use forkd_net::{NetConfig, NetworkSpec, SandboxNetwork};
//! let cfg = NetConfig::new("/var/lib/forkd");
//! let spec: NetworkSpec = serde_json::from_str(r#"{"mode":"nat","allow":["192.0.2.0/24:443"]}"#)?;
//! let net = SandboxNetwork::create("sb-1234", &spec, &cfg)?;
//! let tap = net.open_tap()?;           // hand to the VMM (inherit it or SCM_RIGHTS)
//! let cmdline = net.guest_cmdline();   // "forkd.net=172.16.0.2/30,172.16.0.1"
//! // ... VMM runs, exits ...
//! net.destroy()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Everything needs root (CAP_SYS_ADMIN for namespaces, CAP_NET_ADMIN for links and rules).

mod cleanup;
mod config;
pub mod doctor;
pub mod fdpass;
mod lease;
pub mod netns;
pub mod nft;
mod rtnl;
mod sandbox;
mod spec;
mod sysctl;
pub mod tap;

pub use cleanup::{cleanup_stale, CleanupReport};
pub use config::{GuestNet, NetConfig};
pub use doctor::{doctor, Support};
pub use sandbox::{netns_name, Nic, SandboxNetwork};
pub use spec::{AllowRule, Ipv4Cidr, MacAddr, NetMode, NetworkSpec, ParseError};

use std::path::PathBuf;

/// Prefix of every namespace forkd creates (`fkd-<sandbox id>`).
pub const NS_PREFIX: &str = "fkd-";
/// Prefix of every host interface forkd creates; rules match it as `fkd-*`.
pub const IF_PREFIX: &str = "fkd-";
/// Host veth ends: `fkd-h<slot>` (at most 10 characters, within IFNAMSIZ).
pub const HOST_IF_PREFIX: &str = "fkd-h";
/// The tap inside every sandbox namespace.
pub const NS_TAP: &str = "tap0";
/// The namespace end of the veth pair.
pub const NS_VETH: &str = "veth0";
/// Upper bound on slots, keeping `fkd-h<slot>` within IFNAMSIZ.
pub const MAX_SLOTS: u32 = 1 << 20;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {message}")]
    Netlink { what: String, errno: Option<i32>, message: String },
    #[error("nft rejected the rules: {stderr}")]
    Nft { stderr: String, script: String },
    #[error("invalid network configuration: {0}")]
    Config(String),
    #[error("invalid sandbox id {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    InvalidId(String),
    #[error("sandbox {0} already has a network (run cleanup_stale if it is left over)")]
    Exists(String),
    #[error("sandbox {0} has no network interface (mode none)")]
    NoNic(String),
    #[error("the address pool is exhausted; enlarge it or remove sandboxes")]
    PoolExhausted,
    #[error("{path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;
