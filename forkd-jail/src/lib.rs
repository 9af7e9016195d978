//! What the forkd VMM applies to itself once its VM is set up: a private, empty network
//! namespace, a minimal mount namespace, a bounded set of capabilities, `no_new_privs`, and a
//! seccomp allow-list. See `docs/security.md` for the threat model.
//!
//! Order matters: namespaces first (they need CAP_SYS_ADMIN), then capabilities are dropped,
//! then `no_new_privs`, then the seccomp filter (which also blocks the syscalls used above).
//!
//! A system call outside the allow-list raises SIGSYS (`SECCOMP_RET_TRAP`): the handler
//! installed by [`install_sigsys_reporter`] writes `forkd-vmm: error: killed by seccomp:
//! syscall N` to stderr (the sandbox's `vmm.log`) and ends the process with exit status
//! [`SECCOMP_EXIT_CODE`]. The syscall itself never runs. Only that VMM process dies: every
//! sandbox is its own process.

mod mounts;
mod seccomp;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use seccomp::{allowed_syscalls, install_sigsys_reporter, SECCOMP_EXIT_CODE};

/// What to confine. Every field defaults to off, so an old `vm.json` still loads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailConfig {
    /// Move into a new, empty network namespace (the tap fd keeps working; nothing else can
    /// reach a network).
    pub private_netns: bool,
    /// A new mount namespace whose root holds only these paths (bind mounts at the same
    /// absolute paths), plus `/dev/kvm` and `/proc`. Empty: no mount namespace.
    pub mount_paths: Vec<PathBuf>,
    /// Drop every capability except those BRANCH still needs (see [`KEPT_CAPS`]).
    pub drop_caps: bool,
    /// Install the seccomp allow-list (implies `no_new_privs`).
    pub seccomp: bool,
}

impl JailConfig {
    /// Everything on.
    pub fn full(mount_paths: Vec<PathBuf>) -> Self {
        JailConfig { private_netns: true, mount_paths, drop_caps: true, seccomp: true }
    }
}

/// Capabilities the VMM keeps after the jail: `CAP_SYS_RESOURCE` (BRANCH children rename their
/// command line with `PR_SET_MM`) and `CAP_SYS_NICE` (BRANCH children bring their guests back
/// from `SCHED_IDLE`, which the kernel allows without it only under an `RLIMIT_NICE` that root
/// in a container may not be able to raise). The seccomp filter lets `CAP_SYS_NICE` lower
/// priorities only: no real-time policies, no negative nice values. Everything else goes from
/// every set and from the bounding set.
pub const KEPT_CAPS: &[u32] = &[libc_caps::CAP_SYS_RESOURCE, libc_caps::CAP_SYS_NICE];

/// Capability numbers (linux/capability.h).
pub mod libc_caps {
    pub const CAP_SYS_NICE: u32 = 23;
    pub const CAP_SYS_RESOURCE: u32 = 24;
    pub const CAP_LAST_CAP_GUESS: u32 = 63;
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("building the seccomp filter: {0}")]
    Seccomp(String),
}

fn last(what: impl Into<String>) -> JailError {
    JailError::Io { what: what.into(), source: std::io::Error::last_os_error() }
}

/// Applies `config` to the calling process. Call it on the main thread before any other
/// thread exists or, as the VMM does, once: seccomp uses TSYNC so every thread gets the filter,
/// and namespaces are unshared for the calling thread only (threads started later inherit
/// them). Returns what was done, for the log.
pub fn apply(config: &JailConfig) -> Result<Vec<&'static str>, JailError> {
    let mut done = Vec::new();
    if config.private_netns {
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(last("unshare(CLONE_NEWNET)"));
        }
        done.push("netns");
    }
    if !config.mount_paths.is_empty() {
        mounts::enter(&config.mount_paths)?;
        done.push("mountns");
    }
    if config.drop_caps {
        drop_capabilities()?;
        done.push("caps");
    }
    if config.seccomp {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(last("PR_SET_NO_NEW_PRIVS"));
        }
        install_sigsys_reporter()?;
        seccomp::install()?;
        done.push("seccomp");
    }
    Ok(done)
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(libc_caps::CAP_LAST_CAP_GUESS)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability but [`KEPT_CAPS`] from the bounding, ambient, effective, permitted
/// and inheritable sets.
pub fn drop_capabilities() -> Result<(), JailError> {
    for cap in 0..=last_cap() {
        if KEPT_CAPS.contains(&cap) {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(JailError::Io {
                    what: format!("dropping capability {cap} from the bounding set"),
                    source: err,
                });
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integer arguments only.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) };
    let permitted = proc_status_hex("CapPrm:");
    let mut data = [CapData::default(); 2];
    // Keep only what we have: a container may not grant every capability even to root.
    for cap in KEPT_CAPS.iter().filter(|c| permitted & (1u64 << **c) != 0) {
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].effective |= bit;
        data[word].permitted |= bit;
    }
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    // SAFETY: capset reads a v3 header and two data structs, which we pass.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) } != 0 {
        return Err(last("capset"));
    }
    Ok(())
}

/// Capability sets of this process as `/proc/self/status` shows them (CapEff, CapBnd), for
/// tests and `forkd doctor`.
pub fn current_caps() -> (u64, u64) {
    (proc_status_hex("CapEff:"), proc_status_hex("CapBnd:"))
}

fn proc_status_hex(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0)
}
