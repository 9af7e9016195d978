//! Host-wide settings: where leases live, the address pool, and the guest-side addresses
//! every sandbox shares.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::{Ipv4Cidr, MacAddr};
use crate::NetError;

/// The guest side of every sandbox's NIC. Identical in all sandboxes, so a BRANCH child's
/// guest (which keeps its source's IP configuration in memory) stays valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet {
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// MAC the VMM gives the virtio-net device.
    pub mac: MacAddr,
    /// MAC of the tap (the gateway as the guest sees it). Fixed too: a forked guest's ARP
    /// cache already holds it, so the child's network works from its first packet.
    pub gateway_mac: MacAddr,
}

impl Default for GuestNet {
    fn default() -> Self {
        GuestNet {
            ip: Ipv4Addr::new(172, 16, 0, 2),
            gateway: Ipv4Addr::new(172, 16, 0, 1),
            prefix_len: 30,
            mac: MacAddr([0x02, 0x66, 0x6b, 0x00, 0x00, 0x02]),
            gateway_mac: MacAddr([0x02, 0x66, 0x6b, 0x00, 0x00, 0x01]),
        }
    }
}

impl GuestNet {
    pub fn network(&self) -> Option<Ipv4Cidr> {
        Ipv4Cidr::new(self.ip, self.prefix_len)
    }
}

/// Settings shared by every sandbox network on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// forkd's state directory; leases go to `<state_dir>/net/leases.json`.
    pub state_dir: PathBuf,
    /// Host-side addresses are allocated from here, one /30 per sandbox (host `.1`,
    /// namespace `.2`). Must not be used by anything else on the host.
    pub pool: Ipv4Cidr,
    pub guest: GuestNet,
    /// Turn on `net.ipv4.ip_forward` while any sandbox network exists (and restore the old
    /// value when the last one goes). Without forwarding, NAT mode cannot reach anything.
    pub manage_ip_forward: bool,
    /// The `nft` binary (Debian's nftables package).
    pub nft: PathBuf,
}

impl NetConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        NetConfig {
            state_dir: state_dir.into(),
            pool: Ipv4Cidr::new(Ipv4Addr::new(10, 200, 0, 0), 16).unwrap_or_else(|| unreachable!()),
            guest: GuestNet::default(),
            manage_ip_forward: true,
            nft: PathBuf::from("nft"),
        }
    }

    pub(crate) fn leases_path(&self) -> PathBuf {
        self.state_dir.join("net").join("leases.json")
    }

    /// Number of /30 slots in the pool.
    pub(crate) fn slots(&self) -> u32 {
        (self.pool.size() / 4).min(u64::from(crate::MAX_SLOTS)) as u32
    }

    pub(crate) fn validate(&self) -> Result<(), NetError> {
        let bad = |why: String| Err(NetError::Config(why));
        if self.pool.prefix() > 30 {
            return bad(format!("pool {} is too small: it needs at least one /30", self.pool));
        }
        let Some(guest_net) = self.guest.network() else {
            return bad(format!("guest prefix length {} is not 0-32", self.guest.prefix_len));
        };
        if self.guest.prefix_len > 30 || !guest_net.contains(self.guest.gateway) || self.guest.ip == self.guest.gateway
        {
            return bad(format!(
                "guest address {}/{} and gateway {} must be two different hosts of one subnet",
                self.guest.ip, self.guest.prefix_len, self.guest.gateway
            ));
        }
        if guest_net.overlaps(&self.pool) {
            return bad(format!("guest network {guest_net} overlaps the pool {}", self.pool));
        }
        Ok(())
    }
}
