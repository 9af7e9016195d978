//! Network isolation, tested at the network layer on this machine (as root): a fake guest
//! behind each sandbox's tap, an "outside" host in another namespace. No traffic leaves the
//! machine.

mod support;

use std::net::SocketAddr;
use std::sync::Barrier;

use forkd_net::{cleanup_stale, netns, AllowRule, NetMode, NetworkSpec, SandboxNetwork};
use support::*;

fn allow(rules: &[&str]) -> NetworkSpec {
    NetworkSpec::nat(rules.iter().map(|r| r.parse::<AllowRule>().unwrap()))
}

#[test]
fn egress_is_deny_by_default_and_follows_the_allow_list() {
    require_root();
    let _serial = serial();
    let ip_forward_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&state);
    let outside = Outside::create();
    let _servers = Servers::start(
        Some(&outside.path()),
        &[sock(OUT_A, 8080).into(), sock(OUT_A, 8081).into(), sock(OUT_B, 8080).into()],
    );
    // Host services: on every host address, including loopback and the sandbox veths.
    let _host_server = Servers::start(None, &["0.0.0.0:18080".parse::<SocketAddr>().unwrap()]);

    let id_a = unique("ta");
    let id_b = unique("tb");
    let a = create(&id_a, &allow(&["10.201.0.2/32:8080"]), &cfg);
    let b = create(&id_b, &allow(&["allow-all"]), &cfg);
    let (nic_a, nic_b) = (a.nic.clone().unwrap(), b.nic.clone().unwrap());
    assert_ne!(nic_a.host_ip, nic_b.host_ip, "host-side addresses must be unique");
    assert_eq!(nic_a.guest_ip, nic_b.guest_ip, "guest addresses are the same in every sandbox");
    assert_eq!(a.guest_cmdline(), "forkd.net=172.16.0.2/30,172.16.0.1");
    assert!(nic_a.host_if.len() < 16 && nic_a.tap.len() < 16);

    let guest_a = FakeGuest::attach(&a);
    let guest_b = FakeGuest::attach(&b);
    // A server inside sandbox B's guest and one in B's namespace.
    let _b_guest_server = Servers::start(Some(&guest_b.path()), &["172.16.0.2:19000".parse().unwrap()]);
    let _b_ns_server = Servers::start(Some(&nic_b.netns_path), &[sock(nic_b.ns_ip, 19000).into()]);

    // Allowed: the one address:port on the list.
    let hello = guest_a.fetch(sock(OUT_A, 8080)).expect("allowed destination must be reachable");
    assert_eq!(hello, "hello 10.201.0.2:8080");
    // Denied: another port, another address.
    guest_a.fetch(sock(OUT_A, 8081)).expect_err("port not on the allow-list");
    guest_a.fetch(sock(OUT_B, 8080)).expect_err("address not on the allow-list");

    for (name, guest) in [("deny-by-default", &guest_a), ("allow-all", &guest_b)] {
        // The host itself: its veth address, its other addresses, its loopback.
        let own = if name == "allow-all" { &nic_b } else { &nic_a };
        guest.fetch(sock(own.host_ip, 18080)).expect_err("host veth address reached");
        for addr in host_addresses() {
            guest.fetch(sock(addr, 18080)).expect_err("host address reached");
        }
        guest.fetch(sock("127.0.0.1".parse().unwrap(), 18080)).expect_err("host loopback reached");
        guest.fetch(sock(own.gateway, 18080)).expect_err("the namespace itself reached");
    }
    // Other sandboxes: neither their namespace nor their host veth.
    guest_a.fetch(sock(nic_b.ns_ip, 19000)).expect_err("another sandbox's namespace reached");
    guest_a.fetch(sock(nic_b.host_ip, 18080)).expect_err("another sandbox's host veth reached");
    guest_b.fetch(sock(nic_a.ns_ip, 19000)).expect_err("allow-all reached another sandbox");
    // allow-all reaches the outside on any address and port.
    assert_eq!(guest_b.fetch(sock(OUT_B, 8080)).unwrap(), "hello 10.201.0.3:8080");
    assert_eq!(guest_b.fetch(sock(OUT_A, 8081)).unwrap(), "hello 10.201.0.2:8081");
    // The namespace cannot be entered from outside either (nothing new goes in).
    fetch_from(&outside.path(), sock(nic_b.ns_ip, 19000)).expect_err("outside reached into a sandbox");

    drop((guest_a, guest_b));
    a.destroy().unwrap();
    b.destroy().unwrap();
    a.destroy().expect("destroy is idempotent");
    assert_clean(&[&id_a, &id_b]);
    let ip_forward_after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(ip_forward_after, ip_forward_before, "ip_forward restored after the last sandbox");
}

#[test]
fn mode_none_has_no_nic() {
    require_root();
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let id = unique("tn");
    let net = SandboxNetwork::create(&id, &NetworkSpec::default(), &config(&state)).unwrap();
    assert_eq!(net.mode(), NetMode::None);
    assert!(net.nic.is_none());
    assert!(net.open_tap().is_err());
    assert_eq!(net.guest_cmdline(), "");
    assert!(!netns::netns_path(&forkd_net::netns_name(&id)).exists());
    assert!(!state.path().join("net/leases.json").exists(), "mode none takes no lease");
    net.destroy().unwrap();
}

#[test]
fn branch_children_reach_the_server_at_once_with_the_same_guest_ip() {
    require_root();
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&state);
    let outside = Outside::create();
    let _servers = Servers::start(Some(&outside.path()), &[sock(OUT_A, 8080).into()]);
    let spec = allow(&["10.201.0.0/29:8080"]);
    let ids = [unique("tc"), unique("tc")];
    let nets: Vec<Guard> = ids.iter().map(|id| create(id, &spec, &cfg)).collect();
    let guests: Vec<FakeGuest> = nets.iter().map(|n| FakeGuest::attach(n)).collect();
    assert_eq!(nets[0].nic.as_ref().unwrap().guest_ip, nets[1].nic.as_ref().unwrap().guest_ip);
    let barrier = Barrier::new(guests.len());
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = guests
            .iter()
            .map(|g| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    g.fetch(sock(OUT_A, 8080))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        assert_eq!(r.unwrap(), "hello 10.201.0.2:8080");
    }
    drop(guests);
    for n in &nets {
        n.destroy().unwrap();
    }
    assert_clean(&[&ids[0], &ids[1]]);
}

#[test]
fn cleanup_stale_removes_what_a_crashed_run_left() {
    require_root();
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&state);
    let spec = allow(&[]);
    let (keep_id, lost_id) = (unique("tk"), unique("tl"));
    let kept = create(&keep_id, &spec, &cfg);
    let lost = SandboxNetwork::create(&lost_id, &spec, &cfg).unwrap();
    let lost_nic = lost.nic.clone().unwrap();
    drop(lost); // "crash": nothing destroyed it
    assert!(SandboxNetwork::create(&lost_id, &spec, &cfg).is_err(), "a live id cannot be created twice");

    let report = cleanup_stale(&cfg, &[keep_id.as_str()]).unwrap();
    assert!(report.namespaces.contains(&lost_nic.netns), "{report:?}");
    assert!(report.links.contains(&lost_nic.host_if), "{report:?}");
    assert_eq!(report.leases, vec![lost_id.clone()]);
    assert!(!lost_nic.netns_path.exists());
    assert!(kept.nic.as_ref().unwrap().netns_path.exists(), "the kept sandbox survives");
    assert!(ip_output(&["link", "show", &kept.nic.as_ref().unwrap().host_if]).contains("UP"));

    // The freed slot is handed out again; the kept one is not.
    let again = SandboxNetwork::create(&lost_id, &spec, &cfg).unwrap();
    assert_eq!(again.nic.as_ref().unwrap().slot, lost_nic.slot);
    drop(again);
    let report = cleanup_stale(&cfg, &[]).unwrap();
    assert!(report.host_table_removed);
    assert_eq!(report.namespaces.len(), 2, "{report:?}");
    assert_clean(&[&keep_id, &lost_id]);
}

#[test]
fn a_host_link_without_a_lease_keeps_its_slot() {
    require_root();
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&state);
    // Left by a crashed run whose state directory is gone, or owned by another forkd.
    let foreign = format!("{}0", forkd_net::HOST_IF_PREFIX);
    ip_best_effort(&["link", "del", &foreign]);
    ip(&["link", "add", &foreign, "type", "veth", "peer", "name", &unique("fkt-p")]);
    let id = unique("tf");
    let net = SandboxNetwork::create(&id, &allow(&[]), &cfg);
    ip_best_effort(&["link", "del", &foreign]);
    let net = Guard(net.expect("a sandbox network must not need the foreign link's slot"));
    assert_eq!(net.nic.as_ref().unwrap().slot, 1, "slot 0's host link is taken");
    net.destroy().unwrap();
    assert_clean(&[&id]);
}
