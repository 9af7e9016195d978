//! One stream connection between a guest vsock socket and a host Unix socket,
//! with virtio-vsock credit-based flow control in both directions.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::PacketHeader;
use super::unix::send_nosignal;

/// Receive buffer we advertise to the guest per connection (guest → host bytes
/// we are willing to hold while the host socket is slow).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send an unsolicited CREDIT_UPDATE once this much was forwarded since the last
/// value the guest saw, so a guest blocked on credit is always woken up.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// (host port, guest port): the host side's view of a connection's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The guest shut down both directions: drain to the host, then RST.
    Closing,
}

/// The guest sent more than the credit we granted.
#[derive(Debug)]
pub struct CreditViolation;

#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    pub token: u32,
    pub state: ConnState,

    // Host → guest direction.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    /// Read EOF from the host socket and told the guest (SHUTDOWN SEND).
    pub host_eof: bool,
    /// The host peer closed both directions (EPOLLHUP).
    pub host_hung_up: bool,
    /// SHUTDOWN flags already sent to the guest.
    pub shutdown_sent: u32,
    /// The guest will not receive any more (SHUTDOWN RCV).
    pub guest_recv_shut: bool,
    /// Queued in the muxer's rx scheduling list.
    pub in_rx_ready: bool,

    // Guest → host direction.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are ours (the "OK" line), not guest data.
    uncredited: usize,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    pub credit_update_queued: bool,
    /// The guest will send no more (SHUTDOWN SEND): shut the host write side once drained.
    pub guest_send_shut: bool,
    host_write_shut: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, token: u32, state: ConnState) -> Self {
        Connection {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            host_eof: false,
            host_hung_up: false,
            shutdown_sent: 0,
            guest_recv_shut: false,
            in_rx_ready: false,
            to_host: VecDeque::new(),
            uncredited: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            credit_update_queued: false,
            guest_send_shut: false,
            host_write_shut: false,
        }
    }

    /// Every guest packet carries its current receive buffer state.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes we may still send before overrunning the guest's receive buffer.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records `bytes` of payload sent to the guest.
    pub fn record_sent(&mut self, bytes: u32) {
        self.rx_cnt += Wrapping(bytes);
    }

    /// Fills in our credit fields on a header about to go to the guest.
    pub fn stamp(&mut self, header: &mut PacketHeader) {
        header.buf_alloc = CONN_BUF_ALLOC;
        header.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Host data may be read and sent to the guest now.
    pub fn wants_to_read(&self) -> bool {
        self.state == ConnState::Established && !self.host_eof && !self.guest_recv_shut && self.peer_credit() > 0
    }

    pub fn has_pending_to_host(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// A CREDIT_UPDATE is due so the guest does not stall on stale credit.
    pub fn needs_credit_update(&self) -> bool {
        !self.credit_update_queued && (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Epoll events wanted; `None` to leave epoll altogether (a hung-up socket
    /// would otherwise report EPOLLHUP forever while we cannot act on it).
    pub fn interest(&self, rx_starved: bool) -> Option<EventSet> {
        let mut events = EventSet::empty();
        if !rx_starved && self.wants_to_read() {
            events |= EventSet::IN;
        }
        if self.has_pending_to_host() {
            events |= EventSet::OUT;
        }
        if events.is_empty() && self.host_hung_up {
            None
        } else {
            Some(events)
        }
    }

    /// Queues bytes of our own (not guest data) for the host, ahead of guest data.
    /// Only called before any guest data can arrive (the guest may send RW only
    /// after its RESPONSE), so the line ends up first.
    pub fn push_host_line(&mut self, line: &[u8]) {
        self.to_host.extend(line);
        self.uncredited += line.len();
    }

    /// Accepts guest payload for the host socket, buffering what cannot be written now.
    pub fn accept_guest_data(&mut self, data: &[u8]) -> Result<(), CreditViolation> {
        let buffered_guest_bytes = self.to_host.len() - self.uncredited;
        if buffered_guest_bytes + data.len() > CONN_BUF_ALLOC as usize {
            return Err(CreditViolation);
        }
        self.to_host.extend(data);
        Ok(())
    }

    /// Writes buffered bytes to the host socket until it would block.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            let written = match send_nosignal(&self.stream, front) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(err),
            };
            self.to_host.drain(..written);
            let ours = written.min(self.uncredited);
            self.uncredited -= ours;
            // `written - ours` <= CONN_BUF_ALLOC, so it fits in u32.
            self.fwd_cnt += Wrapping((written - ours) as u32);
        }
        if self.to_host.is_empty() {
            self.to_host.shrink_to(4096);
            if self.guest_send_shut && !self.host_write_shut {
                self.host_write_shut = true;
                // The peer may already be gone; EOF delivery is best effort.
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        Ok(())
    }
}
