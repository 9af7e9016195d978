//! What a sandbox asks for: [`NetworkSpec`] (mode + egress allow-list) and the small address
//! types it is written in ([`Ipv4Cidr`], [`AllowRule`], [`MacAddr`]). All of them serialize as
//! the strings a user types (`"10.0.0.0/8:443"`, `"allow-all"`, `"02:66:6b:00:00:02"`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A bad address, CIDR, allow rule or MAC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {why}")]
pub struct ParseError {
    pub what: &'static str,
    pub input: String,
    pub why: &'static str,
}

fn parse_error(what: &'static str, input: &str, why: &'static str) -> ParseError {
    ParseError { what, input: input.to_owned(), why }
}

/// How a sandbox is connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// No NIC at all: the guest only has `lo`.
    #[default]
    None,
    /// A NIC behind NAT; egress limited by [`NetworkSpec::allow`] (default: nothing).
    Nat,
}

impl FromStr for NetMode {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "none" => Ok(NetMode::None),
            "nat" => Ok(NetMode::Nat),
            _ => Err(parse_error("network mode", s, "expected `none` or `nat`")),
        }
    }
}

impl fmt::Display for NetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetMode::None => "none",
            NetMode::Nat => "nat",
        })
    }
}

/// The network of one sandbox. `allow` is an allow-list on a default-deny egress policy;
/// the host itself and other sandboxes are never reachable, whatever it says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub mode: NetMode,
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// Nameserver written to the guest's /etc/resolv.conf (`forkd.dns=`); port 53 to it is
    /// allowed automatically.
    #[serde(default)]
    pub dns: Option<Ipv4Addr>,
}

impl NetworkSpec {
    /// `mode: nat` with the given allow-list.
    pub fn nat(allow: impl IntoIterator<Item = AllowRule>) -> Self {
        NetworkSpec { mode: NetMode::Nat, allow: allow.into_iter().collect(), dns: None }
    }

    /// True when `allow-all` is among the rules.
    pub fn allows_all(&self) -> bool {
        self.allow.iter().any(|r| matches!(r, AllowRule::All))
    }
}

/// One egress rule: `allow-all`, or `CIDR[:PORT]` (a bare address means /32; a port applies
/// to TCP and UDP, no port means every protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AllowRule {
    All,
    Net { cidr: Ipv4Cidr, port: Option<u16> },
}

impl FromStr for AllowRule {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let s = s.trim();
        if s == "allow-all" {
            return Ok(AllowRule::All);
        }
        let (net, port) = match s.rsplit_once(':') {
            Some((net, port)) => {
                let port: u16 = port.parse().map_err(|_| parse_error("allow rule", s, "port must be 1-65535"))?;
                if port == 0 {
                    return Err(parse_error("allow rule", s, "port must be 1-65535"));
                }
                (net, Some(port))
            }
            None => (s, None),
        };
        let cidr = net.parse::<Ipv4Cidr>().map_err(|e| parse_error("allow rule", s, e.why))?;
        Ok(AllowRule::Net { cidr, port })
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowRule::All => f.write_str("allow-all"),
            AllowRule::Net { cidr, port: Some(port) } => write!(f, "{cidr}:{port}"),
            AllowRule::Net { cidr, port: None } => write!(f, "{cidr}"),
        }
    }
}

/// An IPv4 network, always normalized (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `None` if `prefix > 32`. Host bits of `addr` are cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Ipv4Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)), prefix })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// True if the two networks share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        let prefix = self.prefix.min(other.prefix);
        u32::from(self.addr) & mask(prefix) == u32::from(other.addr) & mask(prefix)
    }

    /// Number of addresses, saturating at `u32::MAX` for /0.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The address at `offset` from the network address, if inside.
    pub fn nth(&self, offset: u64) -> Option<Ipv4Addr> {
        (offset < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr).wrapping_add(offset as u32)))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

impl FromStr for Ipv4Cidr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => {
                (addr, prefix.parse::<u8>().map_err(|_| parse_error("CIDR", s, "prefix length must be 0-32"))?)
            }
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| parse_error("CIDR", s, "not an IPv4 address"))?;
        Ipv4Cidr::new(addr, prefix).ok_or_else(|| parse_error("CIDR", s, "prefix length must be 0-32"))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| parse_error("MAC address", s, "expected 6 hex bytes"))?;
            if part.len() != 2 {
                return Err(parse_error("MAC address", s, "expected 6 hex bytes"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| parse_error("MAC address", s, "expected 6 hex bytes"))?;
        }
        if parts.next().is_some() {
            return Err(parse_error("MAC address", s, "expected 6 hex bytes"));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

macro_rules! serde_as_string {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_as_string!(AllowRule, Ipv4Cidr, MacAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rules_parse_and_print() {
        let cases = [
            ("allow-all", "allow-all"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8:443", "10.0.0.0/8:443"),
            ("192.0.2.7", "192.0.2.7/32"),
            ("192.0.2.7:53", "192.0.2.7/32:53"),
        ];
        for (input, printed) in cases {
            let rule: AllowRule = input.parse().unwrap();
            assert_eq!(rule.to_string(), printed, "{input}");
            assert_eq!(printed.parse::<AllowRule>().unwrap(), rule);
        }
        for bad in ["", "10.0.0.0/33", "10.0.0.0/8:0", "10.0.0.0/8:70000", "example.com:80", "::1", "1.2.3"] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn spec_serde_uses_strings() {
        let spec = NetworkSpec {
            mode: NetMode::Nat,
            allow: vec!["10.0.0.0/8:443".parse().unwrap(), AllowRule::All],
            dns: Some(Ipv4Addr::new(192, 0, 2, 53)),
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(json, r#"{"mode":"nat","allow":["10.0.0.0/8:443","allow-all"],"dns":"192.0.2.53"}"#);
        assert_eq!(serde_json::from_str::<NetworkSpec>(&json).unwrap(), spec);
        let minimal: NetworkSpec = serde_json::from_str(r#"{"mode":"none"}"#).unwrap();
        assert_eq!(minimal, NetworkSpec::default());
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"mode":"nat","allow":["nope"]}"#).is_err());
    }

    #[test]
    fn cidr_arithmetic() {
        let pool: Ipv4Cidr = "10.200.0.0/16".parse().unwrap();
        assert_eq!(pool.size(), 65536);
        assert_eq!(pool.nth(5), Some(Ipv4Addr::new(10, 200, 0, 5)));
        assert_eq!(pool.nth(65536), None);
        assert!(pool.contains(Ipv4Addr::new(10, 200, 255, 255)));
        assert!(!pool.contains(Ipv4Addr::new(10, 201, 0, 0)));
        assert!(pool.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(!pool.overlaps(&"172.16.0.0/30".parse().unwrap()));
        assert_eq!("0.0.0.0/0".parse::<Ipv4Cidr>().unwrap().size(), 1 << 32);
    }

    #[test]
    fn mac_round_trip() {
        let mac: MacAddr = "02:66:6B:00:00:02".parse().unwrap();
        assert_eq!(mac.to_string(), "02:66:6b:00:00:02");
        assert!("02:66:6b:00:00".parse::<MacAddr>().is_err());
        assert!("02:66:6b:00:00:02:03".parse::<MacAddr>().is_err());
    }
}
