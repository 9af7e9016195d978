//! [`SandboxNetwork`]: one sandbox's namespace, tap, veth pair, addresses, routes and rules.
//!
//! ```text
//!  guest eth0 172.16.0.2/30 ──virtio-net── VMM ──fd── tap0 172.16.0.1/30 (MAC fixed)
//!                                                    │  netns fkd-<id>: nft egress policy,
//!                                                    │  masquerade to veth0's address
//!                                                 veth0 10.200.N.2/30 ── default via .1
//!                                                    │
//!  host ─────────────────────────────────── fkd-h<N> 10.200.N.1/30 ── routed, masqueraded
//! ```

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::NetConfig;
use crate::lease::LeaseLock;
use crate::spec::{MacAddr, NetMode, NetworkSpec};
use crate::{netns, nft, rtnl, sysctl, tap, NetError, HOST_IF_PREFIX, NS_PREFIX, NS_TAP, NS_VETH};

/// The NIC side of a `nat` sandbox: everything the VMM and the guest need to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Namespace name (`ip netns` name) and its bind-mount path.
    pub netns: String,
    pub netns_path: PathBuf,
    /// The tap inside the namespace the VMM attaches to.
    pub tap: String,
    pub guest_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// MAC to give the guest's virtio-net device.
    pub guest_mac: MacAddr,
    pub gateway_mac: MacAddr,
    /// Optional nameserver for the guest's resolv.conf.
    pub dns: Option<Ipv4Addr>,
    /// Host end of the veth pair and its address; the namespace end is `veth0` at `ns_ip`.
    pub host_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    /// /30 slot in the pool.
    pub slot: u32,
}

/// One sandbox's network. Serializable, so a launcher can store it with the sandbox and
/// destroy it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNetwork {
    pub id: String,
    pub spec: NetworkSpec,
    /// `None` in mode `none`: no namespace, no tap, the guest has only `lo`.
    pub nic: Option<Nic>,
    pub config: NetConfig,
}

/// Sandbox ids become namespace names: keep them to safe characters.
fn validate_id(id: &str) -> Result<(), NetError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NetError::InvalidId(id.to_owned()))
    }
}

/// The namespace name of sandbox `id`.
pub fn netns_name(id: &str) -> String {
    format!("{NS_PREFIX}{id}")
}

fn host_if_name(slot: u32) -> String {
    format!("{HOST_IF_PREFIX}{slot}")
}

impl SandboxNetwork {
    /// Creates the network of sandbox `id`. In mode `none` nothing is created.
    pub fn create(id: &str, spec: &NetworkSpec, cfg: &NetConfig) -> Result<SandboxNetwork, NetError> {
        validate_id(id)?;
        cfg.validate()?;
        let mut network = SandboxNetwork { id: id.to_owned(), spec: spec.clone(), nic: None, config: cfg.clone() };
        if spec.mode == NetMode::None {
            return Ok(network);
        }
        let mut leases = LeaseLock::acquire(cfg)?;
        if leases.slot_of(id).is_some() || netns::netns_path(&netns_name(id)).exists() {
            return Err(NetError::Exists(id.to_owned()));
        }
        // A host link can exist without a lease here: another forkd with its own state
        // directory, or a crashed run whose state is gone. Its slot is not ours to reuse.
        // (sysfs shows the host namespace's links, at the cost of a stat.)
        let slot = leases.allocate(id, cfg.slots(), |slot| {
            let link = host_if_name(slot);
            let busy = Path::new("/sys/class/net").join(&link).exists();
            if busy {
                tracing::warn!(%link, "host link exists without a lease here; skipping its slot (run `forkd cleanup` if it is left from a crash)");
            }
            busy
        })?;
        // Recorded before anything exists, so a crash mid-way leaves a lease cleanup_stale sees.
        leases.save()?;
        let nic = Nic {
            netns: netns_name(id),
            netns_path: netns::netns_path(&netns_name(id)),
            tap: NS_TAP.to_owned(),
            guest_ip: cfg.guest.ip,
            gateway: cfg.guest.gateway,
            prefix_len: cfg.guest.prefix_len,
            guest_mac: cfg.guest.mac,
            gateway_mac: cfg.guest.gateway_mac,
            dns: spec.dns,
            host_if: host_if_name(slot),
            host_ip: cfg.pool.nth(u64::from(slot) * 4 + 1).ok_or(NetError::PoolExhausted)?,
            ns_ip: cfg.pool.nth(u64::from(slot) * 4 + 2).ok_or(NetError::PoolExhausted)?,
            slot,
        };
        let built = host_prerequisites(cfg, &mut leases).and_then(|()| build(&nic, spec, cfg));
        if let Err(e) = built {
            tracing::warn!(id, error = %e, "sandbox network setup failed; rolling back");
            let _ = teardown(&nic);
            leases.release(id);
            let _ = host_release_if_idle(cfg, &mut leases);
            let _ = leases.save();
            return Err(e);
        }
        leases.save()?;
        network.nic = Some(nic);
        Ok(network)
    }

    pub fn mode(&self) -> NetMode {
        self.spec.mode
    }

    /// Opens the sandbox's tap (inside its namespace; the calling thread does not move).
    /// Needs CAP_SYS_ADMIN and CAP_NET_ADMIN: call it in the launcher and hand the fd to the
    /// VMM, which then needs neither.
    pub fn open_tap(&self) -> Result<OwnedFd, NetError> {
        let nic = self.nic.as_ref().ok_or_else(|| NetError::NoNic(self.id.clone()))?;
        tap::open_in(&nic.netns_path, &nic.tap, tap::DEFAULT_FLAGS)
    }

    /// The guest kernel command-line words for this network (`forkd.net=IP/PREFIX,GATEWAY`
    /// and `forkd.dns=` when a nameserver is set); empty in mode `none`.
    pub fn guest_cmdline(&self) -> String {
        let Some(nic) = &self.nic else {
            return String::new();
        };
        let mut words = format!("forkd.net={}/{},{}", nic.guest_ip, nic.prefix_len, nic.gateway);
        if let Some(dns) = nic.dns {
            words.push_str(&format!(" forkd.dns={dns}"));
        }
        words
    }

    /// Removes everything [`SandboxNetwork::create`] made. Idempotent. Call it after the VMM
    /// holding the tap has exited (the namespace lives on while a tap fd is open).
    pub fn destroy(&self) -> Result<(), NetError> {
        let Some(nic) = &self.nic else {
            return Ok(());
        };
        let mut leases = LeaseLock::acquire(&self.config)?;
        teardown(nic)?;
        if leases.slot_of(&self.id) == Some(nic.slot) {
            leases.release(&self.id);
        }
        host_release_if_idle(&self.config, &mut leases)?;
        leases.save()
    }
}

/// Host-wide pieces every NAT sandbox needs: the host nft table and IPv4 forwarding.
fn host_prerequisites(cfg: &NetConfig, leases: &mut LeaseLock) -> Result<(), NetError> {
    nft::apply(cfg, None, &nft::host_rules(cfg))?;
    if cfg.manage_ip_forward {
        let before = sysctl::read("net.ipv4.ip_forward")?;
        if before != "1" {
            leases.leases.ip_forward_before.get_or_insert(before);
            sysctl::write("net.ipv4.ip_forward", "1")?;
        }
    }
    Ok(())
}

/// When no sandbox network is left: drop the host table and restore forwarding.
pub(crate) fn host_release_if_idle(cfg: &NetConfig, leases: &mut LeaseLock) -> Result<(), NetError> {
    if !leases.leases.slots.is_empty() {
        return Ok(());
    }
    nft::delete_host_table(cfg)?;
    if let Some(before) = leases.leases.ip_forward_before.take() {
        sysctl::write("net.ipv4.ip_forward", &before)?;
    }
    Ok(())
}

fn build(nic: &Nic, spec: &NetworkSpec, cfg: &NetConfig) -> Result<(), NetError> {
    let ns = netns::create(&nic.netns)?;
    // Before any link exists in there: no IPv6 (no link-local addresses, no ND chatter), and
    // the namespace routes between tap and veth.
    netns::run_in(&ns, || -> Result<(), NetError> {
        sysctl::write("net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl::write("net.ipv6.conf.default.disable_ipv6", "1")?;
        sysctl::write("net.ipv4.ip_forward", "1")?;
        let fd = tap::open(NS_TAP, tap::DEFAULT_FLAGS)
            .map_err(|source| NetError::Io { what: format!("creating tap {NS_TAP}"), source })?;
        tap::set_persist(&fd, true)
            .map_err(|source| NetError::Io { what: format!("making tap {NS_TAP} persistent"), source })
    })??;

    let ns_file = std::fs::File::open(&ns)
        .map_err(|source| NetError::Io { what: format!("opening {}", ns.display()), source })?;
    let ns_fd = ns_file.as_raw_fd();
    let host_if = nic.host_if.as_str();
    rtnl::run(None, "creating the veth pair", |h| async move { rtnl::add_veth(&h, host_if, NS_VETH, ns_fd).await })?;
    drop(ns_file);
    // The host end: IPv4 only, address, up.
    let _ = sysctl::write_path(&format!("net/ipv6/conf/{host_if}/disable_ipv6"), "1");
    let host_ip = nic.host_ip;
    rtnl::run(None, "configuring the host veth", |h| async move {
        rtnl::configure_link(&h, host_if, None, Some((host_ip, 30))).await.map(drop)
    })?;

    let (ns_ip, gateway, prefix) = (nic.ns_ip, nic.gateway, nic.prefix_len);
    let (gateway_mac, guest_ip, guest_mac) = (nic.gateway_mac.octets(), nic.guest_ip, nic.guest_mac.octets());
    rtnl::run(Some(&ns), "configuring the sandbox namespace", |h| async move {
        rtnl::configure_link(&h, "lo", None, None).await?;
        rtnl::configure_link(&h, NS_VETH, None, Some((ns_ip, 30))).await?;
        rtnl::add_default_route(&h, host_ip).await?;
        let tap = rtnl::configure_link(&h, NS_TAP, Some(gateway_mac), Some((gateway, prefix))).await?;
        // The guest never has to answer ARP for the namespace: one less thing for its kernel.
        rtnl::add_neighbour(&h, tap, guest_ip, guest_mac).await
    })?;
    nft::apply(cfg, Some(&ns), &nft::netns_rules(cfg, spec))
}

/// Deletes the host veth (its peer goes with it) and the namespace. Idempotent.
fn teardown(nic: &Nic) -> Result<(), NetError> {
    let host_if = nic.host_if.as_str();
    rtnl::run(None, "deleting the host veth", |h| async move { rtnl::delete_link(&h, host_if).await })?;
    netns::delete(&nic.netns)?;
    Ok(())
}
