//! nftables rules, applied with Debian's `nft` command (`nft -f -`, one atomic transaction).
//!
//! * Host, table `inet forkd` (one for all sandboxes, present while any sandbox network
//!   exists): nothing from a sandbox veth reaches the host itself (INPUT), sandboxes cannot
//!   reach each other, nothing new enters a sandbox from outside, and the pool is
//!   masqueraded on its way out.
//! * Sandbox namespace, table `inet forkd`: the egress policy (default deny, the allow-list,
//!   never loopback/link-local/multicast/the pool), anti-spoofing, and masquerade of the
//!   guest address onto the namespace's veth address.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::config::NetConfig;
use crate::spec::{AllowRule, NetworkSpec};
use crate::{NetError, IF_PREFIX, NS_TAP, NS_VETH};

/// Name of our table, on the host and in every sandbox namespace.
pub const TABLE: &str = "forkd";

/// Destinations a sandbox never reaches, whatever its allow-list says.
const ALWAYS_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    // Link-local, including cloud metadata services (169.254.169.254).
    "169.254.0.0/16",
    "224.0.0.0/3",
];

/// The host table. Static: it names interfaces by prefix, so it does not change per sandbox.
pub fn host_rules(cfg: &NetConfig) -> String {
    let pool = cfg.pool;
    let p = IF_PREFIX;
    format!(
        r#"table inet {TABLE}
flush table inet {TABLE}
table inet {TABLE} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "{p}*" counter drop comment "a sandbox never reaches the host itself"
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "{p}*" oifname "{p}*" counter drop comment "sandboxes never reach each other"
    oifname "{p}*" ct state established,related accept
    oifname "{p}*" counter drop comment "nothing new enters a sandbox"
    iifname "{p}*" ip saddr != {pool} counter drop comment "anti-spoofing"
    iifname "{p}*" meta nfproto ipv6 counter drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {pool} oifname != "{p}*" masquerade
  }}
}}
"#
    )
}

/// The rules inside one sandbox's namespace.
pub fn netns_rules(cfg: &NetConfig, spec: &NetworkSpec) -> String {
    let guest = &cfg.guest;
    let mut denied: Vec<String> = ALWAYS_DENIED.iter().map(|s| (*s).to_owned()).collect();
    denied.push(cfg.pool.to_string());
    let denied = denied.join(", ");
    let mut allow = String::new();
    if let Some(dns) = spec.dns {
        let _ = writeln!(allow, "    ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept");
    }
    for rule in &spec.allow {
        let _ = match rule {
            AllowRule::All => writeln!(allow, "    accept"),
            AllowRule::Net { cidr, port: None } => writeln!(allow, "    ip daddr {cidr} accept"),
            AllowRule::Net { cidr, port: Some(port) } => {
                writeln!(allow, "    ip daddr {cidr} meta l4proto {{ tcp, udp }} th dport {port} accept")
            }
        };
    }
    format!(
        r#"table inet {TABLE} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    ct state established,related accept
    iifname "{NS_TAP}" ip daddr {gw} icmp type echo-request accept
    iifname "{NS_TAP}" counter drop
    iifname "{NS_VETH}" counter drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy drop;
    ct state established,related accept
    ct state invalid counter drop
    iifname != "{NS_TAP}" counter drop comment "nothing new enters the guest"
    oifname != "{NS_VETH}" counter drop
    meta nfproto ipv6 counter drop
    ip saddr != {guest_ip} counter drop comment "anti-spoofing"
    ip daddr {{ {denied} }} counter reject with icmp type admin-prohibited
{allow}    meta l4proto tcp counter reject with tcp reset comment "egress not allowed"
    counter reject with icmp type admin-prohibited comment "egress not allowed"
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "{NS_VETH}" masquerade
  }}
}}
"#,
        gw = guest.gateway,
        guest_ip = guest.ip,
    )
}

/// Removes the host table; `Ok(false)` if it was not there.
pub fn delete_host_table(cfg: &NetConfig) -> Result<bool, NetError> {
    if !table_exists(cfg)? {
        return Ok(false);
    }
    apply(cfg, None, &format!("delete table inet {TABLE}\n"))?;
    Ok(true)
}

/// Whether the host table exists.
pub fn table_exists(cfg: &NetConfig) -> Result<bool, NetError> {
    let out = Command::new(&cfg.nft)
        .args(["list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetError::Io { what: format!("running {}", cfg.nft.display()), source })?;
    Ok(out.status.success())
}

/// Runs `nft -f -` with `script`, in the host namespace or the one at `netns`.
pub fn apply(cfg: &NetConfig, netns: Option<&Path>, script: &str) -> Result<(), NetError> {
    let mut cmd = Command::new(&cfg.nft);
    cmd.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let ns_file = match netns {
        Some(path) => Some(
            std::fs::File::open(path)
                .map_err(|source| NetError::Io { what: format!("opening {}", path.display()), source })?,
        ),
        None => None,
    };
    if let Some(file) = &ns_file {
        let fd = file.as_raw_fd();
        // SAFETY: the closure only calls setns(2), which is async-signal-safe; `fd` stays
        // open in the parent until the child has been spawned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child =
        cmd.spawn().map_err(|source| NetError::Io { what: format!("running {}", cfg.nft.display()), source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| NetError::Io { what: "writing nft rules".into(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| NetError::Io { what: "waiting for nft".into(), source })?;
    drop(ns_file);
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Nft { stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(), script: script.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_rules_list_every_allow_rule_before_the_final_reject() {
        let cfg = NetConfig::new("/tmp/x");
        let mut spec = NetworkSpec::nat(["10.0.0.0/8:443".parse().unwrap(), "192.0.2.1".parse().unwrap()]);
        spec.dns = Some("192.0.2.53".parse().unwrap());
        let rules = netns_rules(&cfg, &spec);
        let tls = rules.find("ip daddr 10.0.0.0/8 meta l4proto { tcp, udp } th dport 443 accept").unwrap();
        let host = rules.find("ip daddr 192.0.2.1/32 accept").unwrap();
        let dns = rules.find("ip daddr 192.0.2.53 meta l4proto { tcp, udp } th dport 53 accept").unwrap();
        let denied = rules.find("10.200.0.0/16 } counter reject").unwrap();
        let last = rules.find("egress not allowed").unwrap();
        assert!(denied < dns && dns < tls && tls < host && host < last, "{rules}");
        assert!(!rules.contains("    accept\n"));
        let all = netns_rules(&cfg, &NetworkSpec::nat([AllowRule::All]));
        assert!(all.contains("    accept\n"));
    }

    #[test]
    fn host_rules_use_the_pool() {
        let mut cfg = NetConfig::new("/tmp/x");
        cfg.pool = "10.99.0.0/20".parse().unwrap();
        let rules = host_rules(&cfg);
        assert!(rules.contains("ip saddr 10.99.0.0/20 oifname != \"fkd-*\" masquerade"));
        assert!(rules.contains("iifname \"fkd-*\" counter drop"));
    }
}
