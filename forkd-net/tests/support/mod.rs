//! Test fixtures, all on this machine: an "outside" host in its own namespace with small TCP
//! servers, and a fake guest (a namespace with a tap whose frames are pumped to and from the
//! sandbox's tap, exactly where the VMM would sit).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use forkd_net::{netns, tap, NetConfig, SandboxNetwork};

/// The tests share the host table and ip_forward: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fails loudly (never skips) without root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "forkd-net tests create namespaces, links and nft rules: run them as root");
    for tool in ["ip", "nft"] {
        let ok = Command::new(tool).arg("-V").output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "`{tool}` is missing: apt-get install iproute2 nftables");
    }
    static LEFTOVERS: std::sync::Once = std::sync::Once::new();
    LEFTOVERS.call_once(remove_fixtures_of_dead_runs);
}

/// Fixture namespaces and links (`fkt-<tag><pid>x<n>`) of test processes that are gone: an
/// interrupted run must not break the next one (the outside network's address is fixed).
fn remove_fixtures_of_dead_runs() {
    let owner_alive = |name: &str| {
        let Some(rest) = name.strip_prefix("fkt-") else { return true };
        let pid: String = rest
            .trim_start_matches(|c: char| c.is_ascii_alphabetic())
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        pid.is_empty() || std::path::Path::new("/proc").join(&pid).exists()
    };
    let first_word = |line: &str| line.split_whitespace().next().unwrap_or_default().to_owned();
    for ns in ip_output(&["netns", "list"]).lines().map(first_word).filter(|n| !owner_alive(n)) {
        ip_best_effort(&["netns", "del", &ns]);
    }
    let links = ip_output(&["-o", "link", "show"]);
    let names = links.lines().filter_map(|l| Some(l.split(": ").nth(1)?.split('@').next()?.to_owned()));
    for link in names.filter(|n| !owner_alive(n)) {
        ip_best_effort(&["link", "del", &link]);
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique name part for this test process: `<tag><pid>x<n>` (at most 15 bytes with the
/// `fkt-o` tag, within IFNAMSIZ).
pub fn unique(tag: &str) -> String {
    format!("{tag}{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `ip` and ignores the outcome: removals of what may already be gone (safe in `Drop`).
pub fn ip_best_effort(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

pub fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn config(dir: &tempfile::TempDir) -> NetConfig {
    NetConfig::new(dir.path())
}

/// TCP servers that answer every connection with `hello <local addr>\n`.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Binds `addrs` inside the namespace at `ns` (or the host's when `None`).
    pub fn start(ns: Option<&std::path::Path>, addrs: &[SocketAddr]) -> Servers {
        let bind = || addrs.iter().map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"))).collect();
        let listeners: Vec<TcpListener> = match ns {
            Some(path) => netns::run_in(path, bind).expect("enter namespace"),
            None => bind(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let threads = listeners
            .into_iter()
            .map(|listener| {
                listener.set_nonblocking(true).unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut s, _)) => {
                                let _ = s.set_nonblocking(false);
                                let _ = writeln!(s, "hello {}", listener.local_addr().unwrap());
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                })
            })
            .collect();
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The "outside world": a namespace behind a veth pair, host `10.201.0.1/29`, outside
/// `10.201.0.2/29` and `10.201.0.3/29`.
pub struct Outside {
    pub ns: String,
    pub host_if: String,
}

pub const OUT_HOST: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
pub const OUT_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
pub const OUT_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 3);

impl Outside {
    pub fn create() -> Outside {
        let ns = unique("fkt-out");
        let host_if = unique("fkt-o");
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip(&["addr", "add", "10.201.0.1/29", "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &ns, "addr", "add", "10.201.0.2/29", "dev", "eth0"]);
        ip(&["-n", &ns, "addr", "add", "10.201.0.3/29", "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Outside { ns, host_if }
    }

    pub fn path(&self) -> PathBuf {
        netns::netns_path(&self.ns)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        ip_best_effort(&["link", "del", &self.host_if]);
        ip_best_effort(&["netns", "del", &self.ns]);
    }
}

/// Stands in for the guest: namespace `fkt-g*` with a tap `eth0` (guest MAC, 172.16.0.2/30,
/// default route via 172.16.0.1), its frames pumped to and from the sandbox's tap fd.
pub struct FakeGuest {
    pub ns: String,
    stop: Arc<AtomicBool>,
    pump: Option<JoinHandle<()>>,
}

impl FakeGuest {
    pub fn attach(net: &SandboxNetwork) -> FakeGuest {
        let nic = net.nic.as_ref().expect("a NAT sandbox");
        let sandbox_tap = net.open_tap().expect("open the sandbox tap");
        let ns = unique("fkt-g");
        ip(&["netns", "add", &ns]);
        let path = netns::netns_path(&ns);
        let guest_tap = tap::open_in(&path, "eth0", tap::DEFAULT_FLAGS).expect("guest tap");
        let mac = nic.guest_mac.to_string();
        let addr = format!("{}/{}", nic.guest_ip, nic.prefix_len);
        ip(&["-n", &ns, "link", "set", "eth0", "address", &mac]);
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", &nic.gateway.to_string()]);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let pump = std::thread::spawn(move || pump(guest_tap, sandbox_tap, &stop2));
        FakeGuest { ns, stop, pump: Some(pump) }
    }

    pub fn path(&self) -> PathBuf {
        netns::netns_path(&self.ns)
    }

    /// Connects from inside the guest and reads the server's greeting.
    pub fn fetch(&self, addr: SocketAddrV4) -> Result<String, String> {
        fetch_from(&self.path(), addr)
    }
}

pub fn fetch_from(ns: &std::path::Path, addr: SocketAddrV4) -> Result<String, String> {
    netns::run_in(ns, || -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(1500))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
        let mut line = String::new();
        s.read_to_string(&mut line).map_err(|e| format!("read from {addr}: {e}"))?;
        Ok(line.trim().to_owned())
    })
    .map_err(|e| e.to_string())?
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        ip_best_effort(&["netns", "del", &self.ns]);
    }
}

/// Copies Ethernet frames between two non-blocking tap fds until `stop`.
fn pump(a: OwnedFd, b: OwnedFd, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd { fd: a.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: b.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: polling two valid fds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) } <= 0 {
            continue;
        }
        for (from, to) in [(&a, &b), (&b, &a)] {
            loop {
                // SAFETY: reading into our buffer from an fd we own.
                let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                // SAFETY: writing the frame just read.
                unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n as usize) };
            }
        }
    }
}

/// The host's own IPv4 addresses outside loopback and our test links.
pub fn host_addresses() -> Vec<Ipv4Addr> {
    ip_output(&["-4", "-o", "addr", "show"])
        .lines()
        .filter(|l| !l.contains(" lo ") && !l.contains("fkd-") && !l.contains("fkt-"))
        .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .collect()
}

pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Asserts nothing of ours is left on the host.
pub fn assert_clean(ids: &[&str]) {
    let netns = ip_output(&["netns", "list"]);
    let links = ip_output(&["-o", "link", "show"]);
    for id in ids {
        assert!(!netns.contains(&format!("fkd-{id}")), "namespace of {id} left: {netns}");
    }
    assert!(!links.contains("fkd-h"), "host veth left: {links}");
    let table = Command::new("nft").args(["list", "table", "inet", "forkd"]).output().unwrap();
    assert!(!table.status.success(), "host nft table left");
}

/// Destroys the network when dropped, so a failing assertion leaves nothing behind.
pub struct Guard(pub SandboxNetwork);

impl std::ops::Deref for Guard {
    type Target = SandboxNetwork;
    fn deref(&self) -> &SandboxNetwork {
        &self.0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.0.destroy() {
            eprintln!("destroying {}: {e}", self.0.id);
        }
    }
}

pub fn create(id: &str, spec: &forkd_net::NetworkSpec, cfg: &NetConfig) -> Guard {
    Guard(SandboxNetwork::create(id, spec, cfg).unwrap_or_else(|e| panic!("creating {id}: {e}")))
}
