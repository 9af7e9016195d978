//! `forkd doctor` input: which network isolation features this host supports.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::config::NetConfig;

/// One line of the doctor's report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Support {
    pub feature: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn support(feature: &'static str, ok: bool, detail: impl Into<String>) -> Support {
    Support { feature, ok, detail: detail.into() }
}

/// Probes without changing anything on the host.
pub fn doctor(cfg: &NetConfig) -> Vec<Support> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut out = Vec::new();
    let netns = Path::new("/proc/self/ns/net").exists();
    out.push(support(
        "netns",
        netns && root,
        match (netns, root) {
            (true, true) => "network namespaces available".to_owned(),
            (false, _) => "the kernel has no network namespaces (CONFIG_NET_NS)".to_owned(),
            (true, false) => "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)".to_owned(),
        },
    ));
    // SAFETY: NUL-terminated path; the fd is closed right away.
    let tun = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    let tun_err = std::io::Error::last_os_error();
    if tun >= 0 {
        // SAFETY: closing the fd we just opened.
        unsafe { libc::close(tun) };
    }
    out.push(support(
        "tap",
        tun >= 0,
        if tun >= 0 { "/dev/net/tun opens".to_owned() } else { format!("/dev/net/tun: {tun_err}") },
    ));
    let nft = Command::new(&cfg.nft).arg("--version").stdin(Stdio::null()).output();
    out.push(match nft {
        Ok(o) if o.status.success() => support("nft", true, String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        Ok(o) => support("nft", false, String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => support("nft", false, format!("{}: {e} (apt-get install nftables)", cfg.nft.display())),
    });
    let forward = crate::sysctl::read("net.ipv4.ip_forward").unwrap_or_else(|_| "?".into());
    out.push(support(
        "ip_forward",
        forward == "1" || cfg.manage_ip_forward,
        format!(
            "net.ipv4.ip_forward={forward}{}",
            if cfg.manage_ip_forward { " (forkd turns it on while NAT sandboxes exist)" } else { "" }
        ),
    ));
    out
}
