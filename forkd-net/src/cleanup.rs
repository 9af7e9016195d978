//! Removing what a crashed run left behind.

use crate::config::NetConfig;
use crate::lease::LeaseLock;
use crate::sandbox::host_release_if_idle;
use crate::{netns, nft, rtnl, NetError, HOST_IF_PREFIX, NS_PREFIX};

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    /// Sandbox ids whose leases were dropped.
    pub leases: Vec<String>,
    pub host_table_removed: bool,
}

/// Removes every forkd namespace (`fkd-*`), host veth (`fkd-h*`) and lease that does not
/// belong to a sandbox in `keep` (the ids of sandboxes still alive, e.g. VMMs a restarted
/// controller re-adopted). With nothing kept, the host table goes too and IPv4 forwarding
/// is restored; otherwise the host table is re-installed.
pub fn cleanup_stale(cfg: &NetConfig, keep: &[&str]) -> Result<CleanupReport, NetError> {
    let mut report = CleanupReport::default();
    let mut leases = LeaseLock::acquire(cfg)?;
    for name in netns::list(NS_PREFIX) {
        let id = &name[NS_PREFIX.len()..];
        if !keep.contains(&id) && netns::delete(&name)? {
            report.namespaces.push(name);
        }
    }
    let kept_links: Vec<String> = leases
        .leases
        .slots
        .iter()
        .filter(|(_, id)| keep.contains(&id.as_str()))
        .map(|(slot, _)| format!("{HOST_IF_PREFIX}{slot}"))
        .collect();
    let removed = rtnl::run(None, "removing stale veths", |h| async move {
        let mut removed = Vec::new();
        for name in rtnl::link_names(&h).await? {
            if name.starts_with(HOST_IF_PREFIX) && !kept_links.contains(&name) && rtnl::delete_link(&h, &name).await? {
                removed.push(name);
            }
        }
        Ok(removed)
    })?;
    report.links = removed;
    let stale: Vec<String> = leases.leases.slots.values().filter(|id| !keep.contains(&id.as_str())).cloned().collect();
    for id in &stale {
        leases.release(id);
    }
    report.leases = stale;
    if leases.leases.slots.is_empty() {
        report.host_table_removed = nft::table_exists(cfg)?;
        host_release_if_idle(cfg, &mut leases)?;
    } else {
        nft::apply(cfg, None, &nft::host_rules(cfg))?;
    }
    leases.save()?;
    Ok(report)
}
