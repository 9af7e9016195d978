use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::mock_driver::{Buf, MockDriver};
use crate::vsock::packet::*;
use crate::vsock::CONN_BUF_ALLOC;
use crate::{DeviceRewire, VsockDevice};

const GUEST_CID: u64 = 3;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const RX_BUFFERS: usize = 32;
const RX_BUF_SIZE: u32 = (HEADER_SIZE + 4096) as u32;
const GUEST_BUF_ALLOC: u32 = 64 * 1024;

/// The test plays the guest's vsock driver.
struct Guest {
    driver: MockDriver,
    _dir: tempfile::TempDir,
    path: PathBuf,
    rx_buffers: HashMap<u16, u64>,
}

fn guest() -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock");
    let device = VsockDevice::new(GUEST_CID, &path).unwrap();
    let mut driver = MockDriver::new(Box::new(device));
    driver.init(128);
    let mut guest = Guest { driver, _dir: dir, path, rx_buffers: HashMap::new() };
    for _ in 0..RX_BUFFERS {
        guest.post_rx_buffer();
    }
    guest.driver.notify(RX);
    guest.driver.run();
    guest
}

fn packet(op: u16, guest_port: u32, host_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

fn client(path: &std::path::Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

fn read_line(stream: &UnixStream) -> String {
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    reader.read_line(&mut line).unwrap();
    line
}

impl Guest {
    fn post_rx_buffer(&mut self) {
        let addr = self.driver.alloc(RX_BUF_SIZE);
        let head = self.driver.add_chain(RX, &[Buf::writable(addr, RX_BUF_SIZE)]);
        self.rx_buffers.insert(head, addr);
    }

    fn send(&mut self, mut header: PacketHeader, payload: &[u8]) {
        header.len = payload.len() as u32;
        let header_addr = self.driver.alloc_with(&header.to_bytes());
        if payload.is_empty() {
            self.driver.add_chain(TX, &[Buf::readable(header_addr, HEADER_SIZE as u32)]);
        } else {
            let payload_addr = self.driver.alloc_with(payload);
            self.driver.add_chain(
                TX,
                &[Buf::readable(header_addr, HEADER_SIZE as u32), Buf::readable(payload_addr, payload.len() as u32)],
            );
        }
        self.driver.notify(TX);
        self.driver.run();
        let used = self.driver.used(TX);
        assert_eq!(used.len(), 1, "tx buffer not returned");
    }

    /// Everything the device put on the rx queue, refilling buffers like the guest does.
    fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut packets = Vec::new();
        loop {
            self.driver.run();
            let used = self.driver.used(RX);
            if used.is_empty() {
                return packets;
            }
            for (head, len) in used {
                let addr = self.rx_buffers.remove(&(head as u16)).expect("unknown rx buffer");
                let raw = self.driver.read_mem(addr, HEADER_SIZE);
                let header = PacketHeader::from_bytes(&raw.try_into().unwrap());
                assert_eq!(len as usize, HEADER_SIZE + header.len as usize);
                let payload = self.driver.read_mem(addr + HEADER_SIZE as u64, header.len as usize);
                assert_eq!(header.src_cid, HOST_CID);
                assert_eq!(header.dst_cid, GUEST_CID);
                assert_eq!(header.type_, TYPE_STREAM);
                packets.push((header, payload));
                self.post_rx_buffer();
            }
            self.driver.notify(RX);
        }
    }

    fn recv_one(&mut self) -> (PacketHeader, Vec<u8>) {
        let mut packets = self.recv();
        assert_eq!(packets.len(), 1, "expected one packet, got {packets:?}");
        packets.remove(0)
    }

    fn connection_count(&self) -> usize {
        self.driver.transport.lock().unwrap().device::<VsockDevice>().unwrap().connection_count()
    }

    /// Host client connects to guest port `guest_port`; the guest accepts.
    /// Returns the client and the host-side port.
    fn establish(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut stream = client(&self.path);
        stream.write_all(format!("CONNECT {guest_port}\n").as_bytes()).unwrap();
        let (request, _) = self.recv_one();
        assert_eq!(request.op, OP_REQUEST);
        assert_eq!(request.dst_port, guest_port);
        let host_port = request.src_port;
        self.send(packet(OP_RESPONSE, guest_port, host_port), &[]);
        assert_eq!(read_line(&stream), format!("OK {host_port}\n"));
        (stream, host_port)
    }
}

#[test]
fn config_space_holds_the_guest_cid() {
    let g = guest();
    assert_eq!(g.driver.read_reg(0x100), GUEST_CID as u32);
    assert_eq!(g.driver.read_reg(0x104), 0);
    assert_eq!(g.driver.read_reg(0x008), 19);
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut g = guest();
    let (mut stream, host_port) = g.establish(1234);

    stream.write_all(b"hello").unwrap();
    let (rw, payload) = g.recv_one();
    assert_eq!((rw.op, rw.src_port, rw.dst_port), (OP_RW, host_port, 1234));
    assert_eq!(payload, b"hello");
    assert_eq!(rw.buf_alloc, CONN_BUF_ALLOC);

    g.send(packet(OP_RW, 1234, host_port), b"world");
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"world");

    // Only guest data counts as forwarded, not our "OK" line.
    g.send(packet(OP_CREDIT_REQUEST, 1234, host_port), &[]);
    let (update, _) = g.recv_one();
    assert_eq!(update.op, OP_CREDIT_UPDATE);
    assert_eq!(update.fwd_cnt, 5);
    assert_eq!(update.buf_alloc, CONN_BUF_ALLOC);
    assert!(g.driver.take_interrupt());
}

#[test]
fn guest_rst_closes_the_client_before_ok() {
    let mut g = guest();
    let mut stream = client(&g.path);
    stream.write_all(b"CONNECT 77\n").unwrap();
    let (request, _) = g.recv_one();
    assert_eq!(request.op, OP_REQUEST);
    g.send(packet(OP_RST, 77, request.src_port), &[]);
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "client got {rest:?} instead of EOF");
    assert_eq!(g.connection_count(), 0);
}

#[test]
fn invalid_connect_line_closes_the_client() {
    let mut g = guest();
    let mut stream = client(&g.path);
    stream.write_all(b"HELLO there\n").unwrap();
    g.driver.run();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(g.recv().is_empty());
    assert_eq!(g.connection_count(), 0);
}

#[test]
fn data_sent_right_after_connect_is_kept() {
    let mut g = guest();
    let mut stream = client(&g.path);
    stream.write_all(b"CONNECT 9\nearly").unwrap();
    let (request, _) = g.recv_one();
    g.send(packet(OP_RESPONSE, 9, request.src_port), &[]);
    assert_eq!(read_line(&stream), format!("OK {}\n", request.src_port));
    let (rw, payload) = g.recv_one();
    assert_eq!(rw.op, OP_RW);
    assert_eq!(payload, b"early");
}

#[test]
fn client_close_shuts_the_guest_side_down() {
    let mut g = guest();
    let (stream, host_port) = g.establish(1234);
    drop(stream);
    let (shutdown, _) = g.recv_one();
    assert_eq!(shutdown.op, OP_SHUTDOWN);
    assert_eq!(shutdown.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    assert_eq!(g.connection_count(), 1);
    // The guest answers with RST, which ends the connection.
    g.send(packet(OP_RST, 1234, host_port), &[]);
    assert_eq!(g.connection_count(), 0);
    assert!(g.recv().is_empty());
}

#[test]
fn client_half_close_only_stops_host_to_guest() {
    let mut g = guest();
    let (stream, host_port) = g.establish(1234);
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (shutdown, _) = g.recv_one();
    assert_eq!((shutdown.op, shutdown.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    g.send(packet(OP_RW, 1234, host_port), b"still flowing");
    let mut reply = vec![0u8; 13];
    (&stream).read_exact(&mut reply).unwrap();
    assert_eq!(reply, b"still flowing");
}

#[test]
fn guest_shutdown_reaches_the_client_and_close_is_answered_with_rst() {
    let mut g = guest();
    let (mut stream, host_port) = g.establish(1234);
    let mut shutdown = packet(OP_SHUTDOWN, 1234, host_port);
    shutdown.flags = SHUTDOWN_SEND;
    g.send(packet(OP_RW, 1234, host_port), b"bye");
    g.send(shutdown, &[]);
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye", "data, then EOF");

    shutdown.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(shutdown, &[]);
    let (rst, _) = g.recv_one();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 1234));
    assert_eq!(g.connection_count(), 0);
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut g = guest();
    let listener = UnixListener::bind(format!("{}_5000", g.path.display())).unwrap();
    g.send(packet(OP_REQUEST, 40000, 5000), &[]);
    let (response, _) = g.recv_one();
    assert_eq!((response.op, response.src_port, response.dst_port), (OP_RESPONSE, 5000, 40000));
    let (mut accepted, _) = listener.accept().unwrap();
    accepted.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    g.send(packet(OP_RW, 40000, 5000), b"ping");
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    accepted.write_all(b"pong").unwrap();
    let (rw, payload) = g.recv_one();
    assert_eq!((rw.op, payload.as_slice()), (OP_RW, &b"pong"[..]));

    // Nobody listens on port 5001.
    g.send(packet(OP_REQUEST, 40001, 5001), &[]);
    let (rst, _) = g.recv_one();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 40001));
}

#[test]
fn host_to_guest_data_respects_guest_credit() {
    let mut g = guest();
    let mut stream = client(&g.path);
    stream.write_all(b"CONNECT 7\n").unwrap();
    let (request, _) = g.recv_one();
    let host_port = request.src_port;
    let mut response = packet(OP_RESPONSE, 7, host_port);
    response.buf_alloc = 8;
    g.send(response, &[]);
    read_line(&stream);

    stream.write_all(&[1u8; 20]).unwrap();
    let packets = g.recv();
    let received: usize = packets.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(received, 8, "must not overrun the guest's buffer");

    let mut update = packet(OP_CREDIT_UPDATE, 7, host_port);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    g.send(update, &[]);
    let received: usize = g.recv().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(received, 8);

    update.fwd_cnt = 16;
    g.send(update, &[]);
    let received: usize = g.recv().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(received, 4);
}

#[test]
fn slow_host_client_is_buffered_and_credit_is_returned() {
    let mut g = guest();
    let (mut stream, host_port) = g.establish(1234);
    // Send more than the socket buffer holds while the client reads nothing.
    let chunk = vec![0x42u8; MAX_PAYLOAD];
    let payload_addr = g.driver.alloc_with(&chunk);
    let mut sent = 0usize;
    while sent + chunk.len() <= CONN_BUF_ALLOC as usize {
        let mut header = packet(OP_RW, 1234, host_port);
        header.len = chunk.len() as u32;
        let header_addr = g.driver.alloc_with(&header.to_bytes());
        g.driver.add_chain(
            TX,
            &[Buf::readable(header_addr, HEADER_SIZE as u32), Buf::readable(payload_addr, chunk.len() as u32)],
        );
        g.driver.notify(TX);
        g.driver.run();
        sent += chunk.len();
    }
    assert_eq!(g.driver.used(TX).len(), sent / chunk.len());
    assert!(g.recv().iter().all(|(h, _)| h.op != OP_RST));

    // Drain the client while the event loop flushes the device's buffer.
    stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut received = Vec::new();
    let mut updates = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..500 {
        if received.len() == sent {
            break;
        }
        match stream.read(&mut buf) {
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("{err}"),
        }
        updates.extend(g.recv());
    }
    assert_eq!(received.len(), sent);
    assert!(received.iter().all(|&b| b == 0x42));
    updates.extend(g.recv());
    let last_fwd = updates
        .iter()
        .filter(|(h, _)| h.op == OP_CREDIT_UPDATE)
        .map(|(h, _)| h.fwd_cnt)
        .max()
        .expect("credit update after draining");
    assert_eq!(last_fwd as usize, sent);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut g = guest();
    let (_stream, host_port) = g.establish(1234);
    let chunk = vec![0u8; MAX_PAYLOAD];
    let payload_addr = g.driver.alloc_with(&chunk);
    let mut reset = false;
    for _ in 0..32 {
        let mut header = packet(OP_RW, 1234, host_port);
        header.len = chunk.len() as u32;
        let header_addr = g.driver.alloc_with(&header.to_bytes());
        g.driver.add_chain(
            TX,
            &[Buf::readable(header_addr, HEADER_SIZE as u32), Buf::readable(payload_addr, chunk.len() as u32)],
        );
        g.driver.notify(TX);
        if g.recv().iter().any(|(h, _)| h.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "overrun was not detected");
    assert_eq!(g.connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut g = guest();
    g.send(packet(OP_RW, 1, 2), b"x");
    let (rst, _) = g.recv_one();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 2, 1));
    // An RST is never answered, and foreign CIDs are ignored.
    g.send(packet(OP_RST, 1, 2), &[]);
    let mut spoofed = packet(OP_REQUEST, 1, 2);
    spoofed.src_cid = 42;
    g.send(spoofed, &[]);
    assert!(g.recv().is_empty());
    // Malformed: header claims more payload than the chain holds.
    let mut header = packet(OP_RW, 1, 2);
    header.len = 100;
    let addr = g.driver.alloc_with(&header.to_bytes());
    g.driver.add_chain(TX, &[Buf::readable(addr, HEADER_SIZE as u32)]);
    g.driver.notify(TX);
    assert!(g.recv().is_empty());
}

#[test]
fn many_concurrent_connections() {
    let mut g = guest();
    let mut clients = Vec::new();
    for port in 0..64u32 {
        let mut stream = client(&g.path);
        stream.write_all(format!("CONNECT {}\n", 2000 + port).as_bytes()).unwrap();
        clients.push(stream);
    }
    let requests = g.recv();
    assert_eq!(requests.len(), 64);
    let mut host_ports = HashMap::new();
    for (request, _) in &requests {
        assert_eq!(request.op, OP_REQUEST);
        host_ports.insert(request.dst_port, request.src_port);
        g.send(packet(OP_RESPONSE, request.dst_port, request.src_port), &[]);
    }
    for (port, stream) in clients.iter_mut().enumerate() {
        let host_port = host_ports[&(2000 + port as u32)];
        assert_eq!(read_line(stream), format!("OK {host_port}\n"));
        stream.write_all(format!("from {port}").as_bytes()).unwrap();
    }
    let data = g.recv();
    assert_eq!(data.len(), 64);
    for (header, payload) in &data {
        assert_eq!(header.op, OP_RW);
        assert_eq!(payload, format!("from {}", header.dst_port - 2000).as_bytes());
    }
    assert_eq!(g.connection_count(), 64);
    drop(clients);
    let shutdowns = g.recv();
    assert_eq!(shutdowns.len(), 64);
    for (header, _) in shutdowns {
        assert_eq!(header.op, OP_SHUTDOWN);
        g.send(packet(OP_RST, header.dst_port, header.src_port), &[]);
    }
    assert_eq!(g.connection_count(), 0);
}

fn post_event_buffer(g: &mut Guest) -> u64 {
    let addr = g.driver.alloc(8);
    g.driver.write_mem(addr, &[0xff; 8]);
    g.driver.add_chain(EVENT, &[Buf::writable(addr, 8)]);
    g.driver.notify(EVENT);
    g.driver.run();
    addr
}

#[test]
fn transport_reset_drops_connections_and_notifies_the_guest() {
    let mut g = guest();
    let event = post_event_buffer(&mut g);
    let (mut stream, _) = g.establish(1234);
    g.driver.transport.lock().unwrap().with_device(|vsock: &mut VsockDevice| vsock.transport_reset()).unwrap();
    g.driver.run();
    assert_eq!(g.driver.used(EVENT), vec![(0, 4)]);
    assert_eq!(g.driver.read_mem(event, 4), EVENT_TRANSPORT_RESET.to_le_bytes());
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(g.connection_count(), 0);
    // The listener keeps working once the guest has handled the event (it posts a new buffer).
    post_event_buffer(&mut g);
    g.establish(1235);
}

#[test]
fn new_connections_wait_until_the_guest_has_handled_the_reset() {
    let mut g = guest();
    post_event_buffer(&mut g);
    g.driver.transport.lock().unwrap().with_device(|vsock: &mut VsockDevice| vsock.transport_reset()).unwrap();
    g.driver.run();
    assert_eq!(g.driver.used(EVENT), vec![(0, 4)]);
    // A client connecting now must not reach the guest: the guest may handle rx before the
    // event and would then reset this new connection together with the stale ones.
    let mut stream = client(&g.path);
    stream.write_all(b"CONNECT 1234\n").unwrap();
    assert!(g.recv().is_empty(), "connection request delivered before the guest handled the reset");
    // The guest hands an event buffer back after resetting its sockets; the request follows.
    post_event_buffer(&mut g);
    let (request, _) = g.recv_one();
    assert_eq!((request.op, request.dst_port), (OP_REQUEST, 1234));
    g.send(packet(OP_RESPONSE, 1234, request.src_port), &[]);
    assert_eq!(read_line(&stream), format!("OK {}\n", request.src_port));
}

#[test]
fn device_reset_closes_connections() {
    let mut g = guest();
    let (mut stream, _) = g.establish(1234);
    g.driver.write_reg(0x70, 0);
    g.driver.run();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(g.connection_count(), 0);
}

#[test]
fn rewire_after_fork_listens_on_the_new_path_and_resets_the_guest() {
    let mut g = guest();
    let event = post_event_buffer(&mut g);
    let (_old_client, _) = g.establish(1234);
    let new_path = g._dir.path().join("child.sock");
    let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    {
        let mut transport = g.driver.transport.lock().unwrap();
        transport.prepare_fork();
        transport
            .rewire_after_fork(irq.try_clone().unwrap(), DeviceRewire::Vsock { uds_path: new_path.clone() })
            .unwrap();
    }
    let Guest { driver, _dir, rx_buffers, .. } = g;
    let mut g = Guest { driver: driver.into_child(irq), _dir, path: new_path, rx_buffers };
    assert_eq!(g.driver.used(EVENT), vec![(0, 4)]);
    assert_eq!(g.driver.read_mem(event, 4), EVENT_TRANSPORT_RESET.to_le_bytes());
    assert!(g.driver.take_interrupt());
    assert_eq!(g.connection_count(), 0);
    post_event_buffer(&mut g);
    let (mut stream, host_port) = g.establish(1234);
    stream.write_all(b"child").unwrap();
    let (rw, payload) = g.recv_one();
    assert_eq!((rw.src_port, payload.as_slice()), (host_port, &b"child"[..]));
}

#[test]
fn header_only_rx_buffers_do_not_spin() {
    let mut g = guest();
    let (mut stream, host_port) = g.establish(1234);
    // Use up every posted rx buffer with data (two credit windows' worth).
    stream.write_all(&vec![7u8; 4096 * RX_BUFFERS]).unwrap();
    g.driver.run();
    assert_eq!(g.driver.used(RX).len(), RX_BUFFERS / 2);
    let mut update = packet(OP_CREDIT_UPDATE, 1234, host_port);
    update.fwd_cnt = GUEST_BUF_ALLOC;
    g.send(update, &[]);
    assert_eq!(g.driver.used(RX).len(), RX_BUFFERS / 2);

    // Now only a buffer that fits a header but no data is available.
    let tiny = g.driver.alloc(HEADER_SIZE as u32);
    g.driver.add_chain(RX, &[Buf::writable(tiny, HEADER_SIZE as u32)]);
    g.driver.notify(RX);
    stream.write_all(b"more").unwrap();
    // run() returns once the loop is idle: it does not spin on the readable socket.
    g.driver.run();
    assert!(g.driver.used(RX).is_empty());
    // A control packet still fits the small buffer.
    g.send(packet(OP_CREDIT_REQUEST, 1234, host_port), &[]);
    assert_eq!(g.driver.used(RX).len(), 1);
}
