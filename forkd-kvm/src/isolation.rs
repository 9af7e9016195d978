//! The launcher's side of isolation: each sandbox's network (forkd-net), cgroup
//! (forkd-cgroup) and the VMM's jail configuration (forkd-jail).
//!
//! Defaults when the spec leaves a limit out: memory = guest RAM + [`MEMORY_OVERHEAD_MIB`]
//! (the VMM's own needs on top of the guest's RAM: a guest can never reach it by itself,
//! so the limit only bounds VMM leaks); CPU, I/O and pids unlimited.

use forkd_cgroup::{CgroupConfig, IoLimits, Limits, SandboxCgroup};
use forkd_core::{Dirs, Error, NetworkMode, ResourceLimits, ResourceUsage, Result, SandboxSpec};
use forkd_net::{AllowRule, NetConfig, NetMode, NetworkSpec, SandboxNetwork};
use std::path::{Path, PathBuf};

/// Memory the VMM may use on top of guest RAM before the default limit stops it, MiB.
pub const MEMORY_OVERHEAD_MIB: u64 = 256;
/// The fd number the VMM inherits its tap at.
pub const TAP_FD: i32 = 3;

/// Turns the spec's network policy into forkd-net's, checking every allow rule.
pub fn network_spec(spec: &SandboxSpec) -> Result<NetworkSpec> {
    let mode = match spec.network.mode {
        NetworkMode::None => NetMode::None,
        NetworkMode::Nat => NetMode::Nat,
    };
    let allow = spec
        .network
        .allow
        .iter()
        .map(|a| a.parse::<AllowRule>().map_err(|e| Error::invalid("network.allow", e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    if mode == NetMode::None && !allow.is_empty() {
        return Err(Error::invalid("network.allow", "an allow-list needs network mode `nat`"));
    }
    Ok(NetworkSpec { mode, allow, dns: None })
}

/// The cgroup limits for `spec`, with the documented defaults.
pub fn cgroup_limits(spec: &SandboxSpec, disk_dir: &Path) -> Limits {
    let defaults = Limits { memory_bytes: Some((spec.memory_mib + MEMORY_OVERHEAD_MIB) << 20), ..Limits::default() };
    limits_over(&defaults, &spec.limits, disk_dir)
}

/// `base` with every limit `over` gives replacing base's; the I/O limits apply to the device
/// backing `disk_dir` (a BRANCH child's own layers live next to its source's, on one device).
pub fn limits_over(base: &Limits, over: &ResourceLimits, disk_dir: &Path) -> Limits {
    let io = match (&base.io, over.io_bps.is_some() || over.io_iops.is_some()) {
        (base_io, true) => {
            let base_io = base_io.clone().unwrap_or_default();
            Some(IoLimits {
                path: disk_dir.to_path_buf(),
                read_bps: over.io_bps.or(base_io.read_bps),
                write_bps: over.io_bps.or(base_io.write_bps),
                read_iops: over.io_iops.or(base_io.read_iops),
                write_iops: over.io_iops.or(base_io.write_iops),
            })
        }
        (Some(base_io), false) => Some(IoLimits { path: disk_dir.to_path_buf(), ..base_io.clone() }),
        (None, false) => None,
    };
    let (cpu_quota_us, cpu_period_us) = match over.cpus {
        Some(cpus) => (Some(((cpus * CPU_PERIOD_US as f64).round() as u64).max(1_000)), Some(CPU_PERIOD_US)),
        None => (base.cpu_quota_us, base.cpu_period_us),
    };
    Limits {
        memory_bytes: over.memory_mib.map(|m| m << 20).or(base.memory_bytes),
        cpu_quota_us,
        cpu_period_us,
        io,
        pids_max: over.pids.or(base.pids_max),
    }
}

/// The CFS period limits are expressed in: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;

/// Address leases are host-wide (link names and the address pool are shared by every state
/// directory on the host) and live in /run, which is emptied at boot like the links themselves.
pub fn net_config(_state_dir: &Path) -> NetConfig {
    NetConfig::new(HOST_NET_DIR)
}

const HOST_NET_DIR: &str = "/run/forkd";

pub fn cgroup_config() -> CgroupConfig {
    CgroupConfig::default()
}

pub fn net_error(e: forkd_net::NetError) -> Error {
    match e {
        forkd_net::NetError::Io { .. } | forkd_net::NetError::Netlink { .. } | forkd_net::NetError::Nft { .. } => {
            Error::FailedPrecondition(format!(
                "setting up the sandbox network (needs root, iproute2 and nftables; see `forkd doctor`): {e}"
            ))
        }
        other => Error::internal(format!("sandbox network: {other}")),
    }
}

pub fn cgroup_error(e: forkd_cgroup::CgroupError) -> Error {
    match e {
        forkd_cgroup::CgroupError::InvalidLimits(why) => Error::invalid("limits", why),
        forkd_cgroup::CgroupError::Unsupported(_) | forkd_cgroup::CgroupError::NoBlockDevice { .. } => {
            Error::FailedPrecondition(e.to_string())
        }
        other => Error::internal(format!("sandbox cgroup: {other}")),
    }
}

/// Creates the network and the cgroup of sandbox `name`; on failure nothing is left.
pub fn create(
    name: &str,
    net_spec: &NetworkSpec,
    limits: &Limits,
    state_dir: &Path,
) -> Result<(SandboxNetwork, SandboxCgroup)> {
    let net = SandboxNetwork::create(name, net_spec, &net_config(state_dir)).map_err(net_error)?;
    match SandboxCgroup::create(name, limits, &cgroup_config()) {
        Ok(cg) => Ok((net, cg)),
        Err(e) => {
            let _ = net.destroy();
            Err(cgroup_error(e))
        }
    }
}

/// Removes a sandbox's network and cgroup (after its VMM is gone). Best effort, idempotent.
pub fn teardown(net: Option<&SandboxNetwork>, cgroup: Option<&SandboxCgroup>) -> Result<()> {
    let mut first_error = None;
    if let Some(cg) = cgroup {
        let _ = cg.kill_all(std::time::Duration::from_secs(3));
        if let Err(e) = cg.destroy() {
            first_error.get_or_insert(cgroup_error(e));
        }
    }
    if let Some(net) = net {
        if let Err(e) = net.destroy() {
            first_error.get_or_insert(net_error(e));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Opens the files behind `cgroup.procs` of every directory of `cgroup`, so a freshly forked
/// launcher child can move itself in before exec with a plain `write(fd, "0")`.
pub fn procs_files(cgroup: &SandboxCgroup) -> Result<Vec<std::fs::File>> {
    cgroup
        .dirs()
        .iter()
        .map(|d| {
            let path = d.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| Error::internal(format!("opening {}: {e}", path.display())))
        })
        .collect()
}

/// The jail of a VMM: what its mount namespace must still show.
pub fn jail(sandboxes: &Path, files: &[Option<&Path>]) -> forkd_jail::JailConfig {
    let mut paths: Vec<PathBuf> = vec![sandboxes.to_path_buf()];
    paths.extend(files.iter().flatten().map(|p| p.to_path_buf()));
    forkd_jail::JailConfig::full(paths)
}

/// Whether VMMs are jailed: on unless `FORKD_JAIL=0`.
pub fn jail_enabled() -> bool {
    std::env::var("FORKD_JAIL").map(|v| v != "0").unwrap_or(true)
}

/// Usage and limits of the sandbox's cgroup (and its network policy), for `forkd inspect`.
pub fn resource_usage(rt: &crate::VmmRuntime) -> Option<ResourceUsage> {
    let cg = rt.cgroup.as_ref()?;
    let usage = cg.usage().ok()?;
    let network = rt.net.as_ref().map(|n| {
        let allow: Vec<String> = n.spec.allow.iter().map(|a| a.to_string()).collect();
        if allow.is_empty() {
            n.spec.mode.to_string()
        } else {
            format!("{} allow {}", n.spec.mode, allow.join(","))
        }
    });
    Some(ResourceUsage {
        cgroup: cg.name.clone(),
        memory_bytes: usage.memory_current,
        memory_peak_bytes: usage.memory_peak,
        memory_limit_bytes: cg.limits.memory_bytes,
        memory_limit_hits: usage.memory_limit_hits,
        oom_kills: usage.oom_kills,
        cpu_usage_us: usage.cpu_usage_us,
        cpu_limit: cg.limits.cpu().map(|(q, p)| q as f64 / p as f64),
        pids: usage.pids_current,
        pids_limit: cg.limits.pids_max,
        io_read_bytes: usage.io_read_bytes,
        io_write_bytes: usage.io_write_bytes,
        network: network.or_else(|| Some("none".into())),
    })
}

/// Removes the networks and cgroups of this state directory's sandboxes whose VMM is gone
/// (their directory is still there, their name is not in `alive`). Namespaces and cgroups of
/// other state directories' sandboxes are kept.
pub fn cleanup_stale(dirs: &Dirs, alive: &[String]) -> Result<()> {
    let ours: Vec<String> = std::fs::read_dir(dirs.sandboxes())
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let stale: Vec<&String> = ours.iter().filter(|id| !alive.contains(*id)).collect();
    let names: Vec<String> = forkd_net::netns::list(forkd_net::NS_PREFIX)
        .into_iter()
        .map(|ns| ns[forkd_net::NS_PREFIX.len()..].to_string())
        .chain(alive.iter().cloned())
        .filter(|id| !stale.contains(&id))
        .collect();
    let keep: Vec<&str> = names.iter().map(String::as_str).collect();
    let net = forkd_net::cleanup_stale(&net_config(&dirs.state), &keep);
    let cg = forkd_cgroup::cleanup_stale(&cgroup_config(), &keep);
    if let Ok(r) = &net {
        if !r.namespaces.is_empty() || !r.links.is_empty() {
            tracing::info!(namespaces = ?r.namespaces, links = ?r.links, "removed stale sandbox networks");
        }
    }
    net.map_err(net_error)?;
    cg.map_err(cgroup_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_limits_fill_in_the_defaults() {
        let spec = SandboxSpec {
            memory_mib: 512,
            limits: ResourceLimits { cpus: Some(0.5), io_iops: Some(100), ..Default::default() },
            ..Default::default()
        };
        let l = cgroup_limits(&spec, Path::new("/state/sb-1/disk"));
        assert_eq!(l.memory_bytes, Some((512 + MEMORY_OVERHEAD_MIB) << 20));
        assert_eq!(l.cpu(), Some((50_000, 100_000)));
        let io = l.io.expect("io limits");
        assert_eq!((io.read_iops, io.write_iops, io.read_bps), (Some(100), Some(100), None));
        assert_eq!(l.pids_max, None);
    }

    #[test]
    fn a_branch_override_replaces_only_what_it_names_and_moves_io_to_the_child_disk() {
        let source = cgroup_limits(
            &SandboxSpec {
                limits: ResourceLimits { pids: Some(64), io_bps: Some(1 << 20), ..Default::default() },
                ..Default::default()
            },
            Path::new("/state/source/disk"),
        );
        let child_disk = Path::new("/state/child/disk");
        let same = limits_over(&source, &ResourceLimits::default(), child_disk);
        assert_eq!(Limits { io: None, ..same.clone() }, Limits { io: None, ..source.clone() });
        assert_eq!(same.io.as_ref().map(|io| io.path.as_path()), Some(child_disk));

        let over = ResourceLimits { cpus: Some(0.25), io_iops: Some(50), ..Default::default() };
        let child = limits_over(&source, &over, child_disk);
        assert_eq!(child.cpu(), Some((25_000, 100_000)));
        assert_eq!((child.pids_max, child.memory_bytes), (Some(64), source.memory_bytes));
        let io = child.io.expect("io limits");
        assert_eq!((io.write_bps, io.write_iops), (Some(1 << 20), Some(50)));
    }
}
