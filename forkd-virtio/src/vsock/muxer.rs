//! The host side of the vsock device: the Unix listener, the connection table,
//! guest packet handling and the scheduling of packets towards the guest.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnKey, ConnState, Connection};
use super::packet::*;
use super::unix::{bind_listener, connect_nonblocking};
use crate::chain::ChainBuffers;
use crate::device::{Interest, MAX_DEVICE_TOKEN};
use crate::GuestMemoryMmap;

/// Connections (including clients that have not sent CONNECT yet) we keep at most.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for rx buffers; beyond this the tx queue is not read,
/// so a guest that never posts rx buffers cannot make us queue without bound.
const CONTROL_QUEUE_LIMIT: usize = 512;
/// Longest "CONNECT <port>\n" line we accept.
const MAX_CONNECT_LINE: usize = 32;
/// First port handed out for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const LISTENER_TOKEN: u32 = 0;

/// A host client that has not finished its "CONNECT <port>\n" line.
#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum TokenOwner {
    Pending,
    Connection(ConnKey),
}

#[derive(Debug, Clone, Copy)]
struct ControlPacket {
    key: ConnKey,
    op: u16,
    flags: u32,
}

#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    /// accept(2) failed (e.g. out of fds): stop polling the listener until a
    /// connection closes, instead of spinning on a level-triggered event.
    listener_paused: bool,
    pending_clients: HashMap<u32, PendingClient>,
    connections: HashMap<ConnKey, Connection>,
    tokens: HashMap<u32, TokenOwner>,
    next_token: u32,
    next_local_port: u32,
    control: VecDeque<ControlPacket>,
    rx_ready: VecDeque<ConnKey>,
    /// The guest has no rx buffers: stop polling host sockets for input.
    rx_starved: bool,
    retired: Vec<OwnedFd>,
    read_buf: Vec<u8>,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> io::Result<Self> {
        let listener = bind_listener(&uds_path)?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener: Some(listener),
            listener_paused: false,
            pending_clients: HashMap::new(),
            connections: HashMap::new(),
            tokens: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
            rx_starved: false,
            retired: Vec::new(),
            read_buf: vec![0; MAX_PAYLOAD],
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len() + self.pending_clients.len()
    }

    pub fn control_full(&self) -> bool {
        self.control.len() >= CONTROL_QUEUE_LIMIT
    }

    pub fn set_rx_starved(&mut self, starved: bool) {
        self.rx_starved = starved;
    }

    pub fn take_retired(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.retired)
    }

    /// Drops every connection (sockets are closed once the event loop unregistered them).
    pub fn close_all(&mut self) {
        for (_, client) in self.pending_clients.drain() {
            self.retired.push(OwnedFd::from(client.stream));
        }
        for (_, conn) in self.connections.drain() {
            self.retired.push(OwnedFd::from(conn.stream));
        }
        self.tokens.clear();
        self.listener_paused = false;
        self.control.clear();
        self.rx_ready.clear();
        self.rx_starved = false;
    }

    /// In a forked child: closes our copies of all host sockets (the parent's
    /// stay intact: no shutdown(2) is issued) and listens at `uds_path` instead.
    pub fn rebind_after_fork(&mut self, uds_path: PathBuf) -> io::Result<()> {
        self.close_all();
        // These fds were only registered in the parent's epoll; just close our copies.
        self.retired.clear();
        self.listener = None;
        self.listener = Some(bind_listener(&uds_path)?);
        self.uds_path = uds_path;
        Ok(())
    }

    pub fn interest_list(&self, out: &mut Vec<Interest>) {
        if let Some(listener) = &self.listener {
            if !self.listener_paused && self.connection_count() < MAX_CONNECTIONS {
                out.push(Interest { fd: listener.as_raw_fd(), token: LISTENER_TOKEN, events: EventSet::IN });
            }
        }
        for (&token, client) in &self.pending_clients {
            out.push(Interest { fd: client.stream.as_raw_fd(), token, events: EventSet::IN });
        }
        for conn in self.connections.values() {
            if let Some(events) = conn.interest(self.rx_starved) {
                out.push(Interest { fd: conn.stream.as_raw_fd(), token: conn.token, events });
            }
        }
    }

    // ----- host side -------------------------------------------------------

    /// A host fd became ready.
    pub fn handle_host_event(&mut self, token: u32, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_clients();
            return;
        }
        match self.tokens.get(&token).copied() {
            Some(TokenOwner::Pending) => self.read_connect_line(token),
            Some(TokenOwner::Connection(key)) => self.handle_connection_event(key, events),
            // Stale event for a socket closed earlier in this loop iteration.
            None => {}
        }
    }

    fn accept_clients(&mut self) {
        while self.connection_count() < MAX_CONNECTIONS {
            let Some(listener) = &self.listener else {
                return;
            };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::warn!(%err, "vsock listener accept failed; pausing it");
                    self.listener_paused = true;
                    return;
                }
            };
            if let Err(err) = stream.set_nonblocking(true) {
                tracing::warn!(%err, "cannot make vsock client non-blocking");
                continue;
            }
            let token = self.alloc_token();
            self.tokens.insert(token, TokenOwner::Pending);
            self.pending_clients.insert(token, PendingClient { stream, line: Vec::new() });
        }
    }

    /// Reads the "CONNECT <port>\n" line one byte at a time, so that no byte of
    /// the data that may follow it is consumed here.
    fn read_connect_line(&mut self, token: u32) {
        let Some(client) = self.pending_clients.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match client.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&client.line),
                Ok(_) if client.line.len() >= MAX_CONNECT_LINE => break None,
                Ok(_) => client.line.push(byte[0]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(client) = self.pending_clients.remove(&token) else {
            return;
        };
        let Some(peer_port) = port else {
            tracing::debug!("vsock client sent no valid CONNECT line");
            self.tokens.remove(&token);
            self.retired.push(OwnedFd::from(client.stream));
            self.listener_paused = false;
            return;
        };
        let key = ConnKey { local_port: self.alloc_local_port(peer_port), peer_port };
        self.tokens.insert(token, TokenOwner::Connection(key));
        self.connections.insert(key, Connection::new(client.stream, token, ConnState::Connecting));
        self.queue_control(key, OP_REQUEST, 0);
    }

    fn handle_connection_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            self.reset(key);
            return;
        }
        if events.contains(EventSet::HANG_UP) && !conn.host_hung_up {
            conn.host_hung_up = true;
            if conn.state == ConnState::Connecting {
                // The client left before the guest answered.
                self.reset(key);
                return;
            }
            if conn.host_eof {
                // We already sent SHUTDOWN(SEND); now the client cannot receive either.
                self.queue_shutdown(key);
            }
        }
        if events.contains(EventSet::OUT) {
            self.flush_to_host(key);
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP) {
            self.schedule_rx(key);
        }
    }

    fn flush_to_host(&mut self, key: ConnKey) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if let Err(err) = conn.flush_to_host() {
            tracing::debug!(%err, "vsock host socket write failed");
            self.reset(key);
            return;
        }
        if conn.state == ConnState::Closing && !conn.has_pending_to_host() {
            self.reset(key);
            return;
        }
        if conn.needs_credit_update() {
            conn.credit_update_queued = true;
            self.queue_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    fn schedule_rx(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.get_mut(&key) {
            if !conn.in_rx_ready {
                conn.in_rx_ready = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    // ----- guest side ------------------------------------------------------

    /// Handles one packet the guest sent on the tx queue.
    pub fn handle_guest_packet(&mut self, header: &PacketHeader, payload: &[u8]) {
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            tracing::debug!(src = header.src_cid, dst = header.dst_cid, "vsock packet with bad CIDs");
            return;
        }
        let key = ConnKey { local_port: header.dst_port, peer_port: header.src_port };
        if header.type_ != TYPE_STREAM {
            if header.op != OP_RST {
                self.queue_control(key, OP_RST, 0);
            }
            return;
        }
        if header.op == OP_REQUEST {
            if self.connections.contains_key(&key) {
                self.reset(key);
            } else {
                self.connect_to_host(key, header);
            }
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            if header.op != OP_RST {
                self.queue_control(key, OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        match header.op {
            OP_RESPONSE if conn.state == ConnState::Connecting => {
                conn.state = ConnState::Established;
                conn.push_host_line(format!("OK {}\n", key.local_port).as_bytes());
                self.flush_to_host(key);
            }
            OP_RST => self.remove(key),
            OP_SHUTDOWN => self.handle_guest_shutdown(key, header.flags),
            OP_RW if conn.state == ConnState::Established && !conn.guest_send_shut => {
                if conn.accept_guest_data(payload).is_err() {
                    tracing::warn!(?key, "guest overran vsock credit");
                    self.reset(key);
                } else {
                    self.flush_to_host(key);
                }
            }
            OP_CREDIT_UPDATE => {
                // New credit is picked up through the updated epoll interest.
            }
            OP_CREDIT_REQUEST => {
                if !conn.credit_update_queued {
                    conn.credit_update_queued = true;
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            op => {
                tracing::debug!(op, ?key, "unexpected vsock packet");
                self.reset(key);
            }
        }
    }

    /// Guest-initiated connection to host port P: the Unix socket `<path>_<P>`.
    fn connect_to_host(&mut self, key: ConnKey, header: &PacketHeader) {
        if self.connection_count() >= MAX_CONNECTIONS {
            self.queue_control(key, OP_RST, 0);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(%err, port = key.local_port, "no host listener for vsock port");
                self.queue_control(key, OP_RST, 0);
                return;
            }
        };
        let token = self.alloc_token();
        let mut conn = Connection::new(stream, token, ConnState::Established);
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        self.tokens.insert(token, TokenOwner::Connection(key));
        self.connections.insert(key, conn);
        self.queue_control(key, OP_RESPONSE, 0);
    }

    fn handle_guest_shutdown(&mut self, key: ConnKey, flags: u32) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if flags & SHUTDOWN_RCV != 0 {
            conn.guest_recv_shut = true;
        }
        if flags & SHUTDOWN_SEND != 0 {
            conn.guest_send_shut = true;
        }
        if conn.guest_recv_shut && conn.guest_send_shut {
            // The guest closed; it waits for our RST once its data reached the host.
            conn.state = ConnState::Closing;
        }
        self.flush_to_host(key);
    }

    // ----- towards the guest -----------------------------------------------

    /// Fills the guest's rx buffers: control packets first (so a RESPONSE always
    /// precedes data), then data from readable host sockets, round robin.
    /// Returns the number of buffers used.
    pub fn deliver_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> usize {
        let mut used = 0;
        loop {
            let has_work = !self.control.is_empty() || !self.rx_ready.is_empty();
            if !has_work {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.rx_starved = true;
                break;
            };
            self.rx_starved = false;
            let buffers = ChainBuffers::new(chain);
            if (buffers.writable_len() as usize) < HEADER_SIZE {
                tracing::warn!("vsock rx buffer too small for a header");
                add_used(queue, mem, &buffers, 0);
                used += 1;
                continue;
            }
            let written = if let Some(packet) = self.control.pop_front() {
                self.write_control(packet, &buffers, mem)
            } else if buffers.writable_len() as usize == HEADER_SIZE {
                // No room for data at the head of the ring: wait for the guest's
                // next kick rather than spin on readable sockets.
                queue.go_to_previous_position();
                self.rx_starved = true;
                break;
            } else {
                match self.write_data(&buffers, mem) {
                    Some(written) => written,
                    None => {
                        // Nothing was read after all: give the buffer back.
                        queue.go_to_previous_position();
                        continue;
                    }
                }
            };
            add_used(queue, mem, &buffers, written);
            used += 1;
        }
        used
    }

    fn write_control(&mut self, packet: ControlPacket, buffers: &ChainBuffers, mem: &GuestMemoryMmap) -> u32 {
        let mut header = self.header_for(packet.key, packet.op);
        header.flags = packet.flags;
        if let Some(conn) = self.connections.get_mut(&packet.key) {
            conn.stamp(&mut header);
            if packet.op == OP_CREDIT_UPDATE {
                conn.credit_update_queued = false;
            }
        }
        match buffers.write_at(mem, 0, &header.to_bytes()) {
            Ok(()) => HEADER_SIZE as u32,
            Err(err) => {
                tracing::warn!(%err, "cannot write vsock rx header");
                0
            }
        }
    }

    /// Reads host data for the next ready connection into `buffers`.
    /// Returns the used length, or `None` if the buffer was not consumed.
    fn write_data(&mut self, buffers: &ChainBuffers, mem: &GuestMemoryMmap) -> Option<u32> {
        let key = self.rx_ready.pop_front()?;
        let guest_cid = self.guest_cid;
        let conn = self.connections.get_mut(&key)?;
        conn.in_rx_ready = false;
        if !conn.wants_to_read() {
            return None;
        }
        let room = buffers.writable_len() as usize - HEADER_SIZE;
        let len = room.min(MAX_PAYLOAD).min(conn.peer_credit() as usize);
        if len == 0 {
            return None;
        }
        let read = loop {
            match conn.stream.read(&mut self.read_buf[..len]) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match read {
            Ok(0) => {
                conn.host_eof = true;
                self.queue_shutdown(key);
                None
            }
            Ok(n) => {
                let mut header = header_to_guest(guest_cid, key, OP_RW);
                header.len = n as u32;
                conn.stamp(&mut header);
                let result = buffers
                    .write_at(mem, 0, &header.to_bytes())
                    .and_then(|()| buffers.write_at(mem, HEADER_SIZE as u64, &self.read_buf[..n]));
                if let Err(err) = result {
                    tracing::warn!(%err, "cannot write vsock rx data");
                    self.reset(key);
                    return Some(0);
                }
                conn.record_sent(n as u32);
                // There may be more; other connections get their turn first.
                conn.in_rx_ready = true;
                self.rx_ready.push_back(key);
                Some((HEADER_SIZE + n) as u32)
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => None,
            Err(err) => {
                tracing::debug!(%err, "vsock host socket read failed");
                self.reset(key);
                None
            }
        }
    }

    // ----- helpers -----------------------------------------------------------

    fn header_for(&self, key: ConnKey, op: u16) -> PacketHeader {
        header_to_guest(self.guest_cid, key, op)
    }

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        self.control.push_back(ControlPacket { key, op, flags });
    }

    /// Tells the guest what the host side can no longer do.
    fn queue_shutdown(&mut self, key: ConnKey) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let mut flags = 0;
        if conn.host_eof {
            flags |= SHUTDOWN_SEND;
        }
        if conn.host_hung_up {
            flags |= SHUTDOWN_SEND | SHUTDOWN_RCV;
        }
        if flags & !conn.shutdown_sent != 0 {
            conn.shutdown_sent |= flags;
            self.queue_control(key, OP_SHUTDOWN, flags);
        }
    }

    /// Sends RST to the guest and forgets the connection.
    fn reset(&mut self, key: ConnKey) {
        self.queue_control(key, OP_RST, 0);
        self.remove(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.remove(&key) {
            self.tokens.remove(&conn.token);
            self.retired.push(OwnedFd::from(conn.stream));
            self.listener_paused = false;
        }
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let token = self.next_token;
            self.next_token = if token >= MAX_DEVICE_TOKEN { LISTENER_TOKEN + 1 } else { token + 1 };
            if !self.tokens.contains_key(&token) {
                return token;
            }
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey { local_port: port, peer_port };
            if !self.connections.contains_key(&key) {
                return port;
            }
        }
    }
}

fn header_to_guest(guest_cid: u64, key: ConnKey, op: u16) -> PacketHeader {
    PacketHeader {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, buffers: &ChainBuffers, len: u32) {
    if let Err(err) = queue.add_used(mem, buffers.head_index(), len) {
        tracing::warn!(?err, "vsock cannot return a descriptor");
    }
}

/// Parses "CONNECT <port>" (a trailing '\r' is tolerated).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_connect_line;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT x"), None);
        assert_eq!(parse_connect_line(b"connect 52"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
    }
}
