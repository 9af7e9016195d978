//! PID 1 duties at boot: mounts, hostname, loopback. Each step is one or two syscalls and
//! failures are tolerated (logged once), because a half-set-up guest that still answers
//! the host is far more useful than a kernel panic.

use std::ffi::CStr;
use std::io;

use super::log_error;

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: Option<&'static CStr>,
    /// Directory mode if the target has to be created.
    dir_mode: libc::mode_t,
}

const MOUNTS: &[Mount] = &[
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: NOSUID | NODEV | NOEXEC,
        data: None,
        dir_mode: 0o555,
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: NOSUID | NODEV | NOEXEC,
        data: None,
        dir_mode: 0o555,
    },
    Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: NOSUID,
        data: Some(c"mode=0755"),
        dir_mode: 0o755,
    },
    Mount {
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: NOSUID | NOEXEC,
        data: Some(c"gid=5,mode=620,ptmxmode=666"),
        dir_mode: 0o755,
    },
    // POSIX shared memory and semaphores (Python multiprocessing) live here.
    Mount {
        source: c"tmpfs",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: Some(c"mode=1777"),
        dir_mode: 0o1777,
    },
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: Some(c"mode=1777"),
        dir_mode: 0o1777,
    },
    Mount {
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: Some(c"mode=0755"),
        dir_mode: 0o755,
    },
];

/// Symlinks udev would normally create; bash process substitution needs /dev/fd.
const DEV_LINKS: &[(&CStr, &CStr)] = &[
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
];

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn mount(m: &Mount) -> Result<(), i32> {
    let data = m.data.map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are NUL-terminated static strings (or null for data).
    let rc = unsafe { libc::mount(m.source.as_ptr(), m.target.as_ptr(), m.fstype.as_ptr(), m.flags, data) };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Mounts the API filesystems. Missing mount points are created only on demand (ENOENT),
/// so a proper image costs exactly one syscall per mount.
pub fn mount_all() {
    for m in MOUNTS {
        let mut res = mount(m);
        if res == Err(libc::ENOENT) {
            // SAFETY: NUL-terminated static path.
            unsafe { libc::mkdir(m.target.as_ptr(), m.dir_mode) };
            res = mount(m);
        }
        match res {
            // EBUSY: already mounted (e.g. the kernel's devtmpfs automount).
            Ok(()) | Err(libc::EBUSY) => {}
            Err(e) => log_error(&format!(
                "mounting {} on {} failed: {}",
                m.fstype.to_string_lossy(),
                m.target.to_string_lossy(),
                io::Error::from_raw_os_error(e)
            )),
        }
    }
    for (target, link) in DEV_LINKS {
        // SAFETY: NUL-terminated static paths. EEXIST is fine.
        unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
    }
}

pub fn set_hostname(name: &str) {
    // SAFETY: pointer and length describe `name`.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        log_error(&format!("sethostname failed: {}", io::Error::last_os_error()));
    }
}

/// Brings up `lo` so programs can talk to localhost. Silent if networking is compiled out.
pub fn loopback_up() {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: ifreq is plain old data; zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
    // SAFETY: SIOCSIFFLAGS with a valid ifreq; then close the fd we opened.
    unsafe {
        libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr);
        libc::close(fd);
    }
}

/// The guest network from the kernel command line: `forkd.net=IP/PREFIX,GATEWAY` and an
/// optional `forkd.dns=IP`. Absent when the sandbox has no NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetParams {
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub dns: Option<std::net::Ipv4Addr>,
}

/// Parses `forkd.net=` / `forkd.dns=` out of a kernel command line.
pub fn parse_net_cmdline(cmdline: &str) -> Option<NetParams> {
    let mut net = None;
    let mut dns = None;
    for word in cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix("forkd.net=") {
            let (addr, gw) = v.split_once(',')?;
            let (ip, prefix) = addr.split_once('/')?;
            let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
            net = Some((ip.parse().ok()?, prefix, gw.parse().ok()?));
        } else if let Some(v) = word.strip_prefix("forkd.dns=") {
            dns = v.parse().ok();
        }
    }
    net.map(|(ip, prefix, gateway)| NetParams { ip, prefix, gateway, dns })
}

fn sockaddr_in(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the ioctl ABI wants it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Configures `eth0` (address, netmask, up) and the default route with ioctls: no `ip`
/// binary needed, and nothing to fork (every guest syscall is costly on emulating hosts).
pub fn configure_eth0(net: &NetParams) -> Result<(), String> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    let ifreq = || {
        // SAFETY: ifreq is plain old data; zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"eth0\0") {
            *dst = *src as libc::c_char;
        }
        ifr
    };
    let mask = if net.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(net.prefix)) };
    let steps: [(libc::c_ulong, &str, libc::ifreq); 3] = [
        (libc::SIOCSIFADDR, "address", {
            let mut r = ifreq();
            r.ifr_ifru.ifru_addr = sockaddr_in(net.ip);
            r
        }),
        (libc::SIOCSIFNETMASK, "netmask", {
            let mut r = ifreq();
            r.ifr_ifru.ifru_netmask = sockaddr_in(std::net::Ipv4Addr::from(mask));
            r
        }),
        (libc::SIOCSIFFLAGS, "flags", {
            let mut r = ifreq();
            r.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
            r
        }),
    ];
    let mut result = Ok(());
    for (req, what, ifr) in steps {
        // SAFETY: an interface ioctl with a valid ifreq.
        if unsafe { libc::ioctl(fd, req as _, &ifr) } != 0 {
            result = Err(format!("eth0 {what}: {}", io::Error::last_os_error()));
            break;
        }
    }
    if result.is_ok() {
        // SAFETY: rtentry is plain old data; zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_in(net.gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        // SAFETY: SIOCADDRT with a valid rtentry.
        if unsafe { libc::ioctl(fd, libc::SIOCADDRT as _, &rt) } != 0 {
            result = Err(format!("default route: {}", io::Error::last_os_error()));
        }
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    if let (Ok(()), Some(dns)) = (&result, net.dns) {
        let _ = std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n"));
    }
    result
}

/// Brings up eth0 when the command line asks for it.
pub fn network_up() {
    let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") else {
        return;
    };
    if let Some(net) = parse_net_cmdline(&cmdline) {
        if let Err(e) = configure_eth0(&net) {
            log_error(&format!("configuring the network: {e}"));
        }
        warm_tcp_connect();
    }
}

/// Makes one TCP connection over loopback, so the guest kernel pays its one-time cost of the
/// first outgoing connection now, at boot, rather than in the first program that connects.
///
/// That first `connect` fills the kernel's 256 KiB port-selection table (`table_perturb` in
/// `inet_hash_connect`) with random bytes. Where guest kernel mode is emulated this takes
/// seconds (measured 6-9 s), long enough for `nc -w 3` or `wget -T` to give up on a perfectly
/// working network. Done once per boot: BRANCH children and template forks inherit the filled
/// table with the rest of guest memory.
pub fn warm_tcp_connect() {
    let Ok(listener) = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)) else {
        return;
    };
    if let Ok(addr) = listener.local_addr() {
        let _ = std::net::TcpStream::connect(addr);
    }
}

/// Everything PID 1 does before serving.
pub fn setup() {
    mount_all();
    set_hostname("forkd");
    loopback_up();
    network_up();
}

#[cfg(test)]
mod net_tests {
    use super::*;

    #[test]
    fn parses_the_network_words() {
        let p = parse_net_cmdline("console=ttyS0 forkd.net=172.16.0.2/30,172.16.0.1 forkd.dns=192.0.2.53 rw").unwrap();
        assert_eq!(p.ip, std::net::Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(p.prefix, 30);
        assert_eq!(p.gateway, std::net::Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(p.dns, Some(std::net::Ipv4Addr::new(192, 0, 2, 53)));
        assert_eq!(parse_net_cmdline("console=ttyS0"), None);
        assert_eq!(parse_net_cmdline("forkd.net=garbage"), None);
        assert_eq!(parse_net_cmdline("forkd.net=1.2.3.4/40,1.2.3.1"), None);
    }
}
