//! virtio-vsock (device type 19) with a userspace host side over Unix sockets.
//!
//! Host → guest: a client connects to the device's Unix socket, writes
//! `CONNECT <port>\n`, and gets `OK <host_port>\n` once the guest accepted
//! (or EOF if nothing listens on that guest port); then it is a byte stream.
//! Guest → host: a guest connection to CID 2 port P is bridged to the Unix
//! socket `<uds_path>_<P>`, and reset if nothing listens there.

mod connection;
mod muxer;
pub(crate) mod packet;
mod unix;

use std::any::Any;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

use crate::chain::ChainBuffers;
use crate::device::{DeviceContext, DeviceError, DeviceRewire, Interest, VirtioDevice};
use crate::transport::registers::VIRTIO_F_VERSION_1;
use crate::GuestMemoryMmap;
use muxer::Muxer;
use packet::{PacketHeader, EVENT_TRANSPORT_RESET, HEADER_SIZE, MAX_PAYLOAD};

pub use connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
pub use muxer::MAX_CONNECTIONS;
pub use packet::HOST_CID;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
const QUEUE_SIZE: u16 = 256;
/// Tx packets handled per event before yielding the loop to other devices.
const MAX_TX_PER_RUN: usize = QUEUE_SIZE as usize;

/// Serializable state of a [`VsockDevice`]. Connections are not part of it:
/// a restored device starts empty and tells the guest to reset its sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub driver_features: u64,
}

/// Telling the guest to drop its connections (after a fork or a host-side reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetState {
    Idle,
    /// A TRANSPORT_RESET event waits for an event-queue buffer.
    EventPending,
    /// The event was delivered and the guest has not handled it yet: the event queue's
    /// available index at delivery. The guest hands the buffer back (a new available entry) only
    /// after resetting its sockets, and handles rx and event queues in separate work items, so
    /// a connection delivered before that would be reset along with the stale ones and hang.
    AwaitingAck(std::num::Wrapping<u16>),
}

/// virtio-vsock device.
#[derive(Debug)]
pub struct VsockDevice {
    guest_cid: u64,
    driver_features: u64,
    active: bool,
    muxer: Muxer,
    /// Where telling the guest to reset its connections stands.
    reset: ResetState,
    /// The tx queue was left unread because too many control packets were queued.
    tx_blocked: bool,
    payload: Vec<u8>,
}

impl VsockDevice {
    /// A device for guest CID `guest_cid`, listening for host clients at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Result<Self, DeviceError> {
        let uds_path = uds_path.into();
        let muxer =
            Muxer::new(guest_cid, uds_path.clone()).map_err(|source| DeviceError::Bind { path: uds_path, source })?;
        Ok(VsockDevice {
            guest_cid,
            driver_features: 0,
            active: false,
            muxer,
            reset: ResetState::Idle,
            tx_blocked: false,
            payload: Vec::new(),
        })
    }

    pub fn state(&self) -> VsockState {
        VsockState { guest_cid: self.guest_cid, driver_features: self.driver_features }
    }

    /// Restores a device from `state`; the guest is told to drop its
    /// connections as soon as the device is active again.
    pub fn from_state(state: &VsockState, uds_path: impl Into<PathBuf>) -> Result<Self, DeviceError> {
        let mut device = VsockDevice::new(state.guest_cid, uds_path)?;
        device.driver_features = state.driver_features;
        device.reset = ResetState::EventPending;
        Ok(device)
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Path of the host-side Unix listener.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Open connections, including clients that have not sent CONNECT yet.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Drops every host connection and queues a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    /// so the guest drops its side too. Call through
    /// [`crate::MmioTransport::with_device`] so the event loop delivers it.
    pub fn transport_reset(&mut self) {
        self.muxer.close_all();
        self.tx_blocked = false;
        self.reset = ResetState::EventPending;
    }

    /// True once the guest has handed back an event buffer after our reset event.
    fn check_reset_ack(&mut self, ctx: &mut DeviceContext) {
        let ResetState::AwaitingAck(at_delivery) = self.reset else {
            return;
        };
        let mem = ctx.mem();
        let Some(queue) = ctx.queue(EVENT_QUEUE) else {
            return;
        };
        if queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire).is_ok_and(|now| now != at_delivery) {
            self.reset = ResetState::Idle;
        }
    }

    /// Moves packets both ways until no more progress is possible.
    fn pump(&mut self, ctx: &mut DeviceContext) {
        if !ctx.is_active() {
            return;
        }
        let mut used_any = self.deliver_event(ctx);
        self.check_reset_ack(ctx);
        loop {
            let tx_used = self.process_tx(ctx);
            let rx_used = self.deliver_rx(ctx);
            used_any |= tx_used > 0 || rx_used > 0;
            // Delivering rx may have made room for the control packets tx was waiting on.
            if !(self.tx_blocked && rx_used > 0) {
                break;
            }
        }
        if used_any {
            ctx.signal_used_queue();
        }
    }

    fn process_tx(&mut self, ctx: &mut DeviceContext) -> usize {
        let mem = ctx.mem();
        let Some(queue) = ctx.queue(TX_QUEUE) else {
            return 0;
        };
        let mut used = 0;
        self.tx_blocked = false;
        loop {
            if self.muxer.control_full() {
                self.tx_blocked = true;
                break;
            }
            if used == MAX_TX_PER_RUN {
                ctx.reschedule_queue(TX_QUEUE);
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let buffers = ChainBuffers::new(chain);
            match read_tx_packet(&buffers, mem, &mut self.payload) {
                Some(header) => self.muxer.handle_guest_packet(&header, &self.payload),
                None => tracing::warn!("malformed vsock tx packet dropped"),
            }
            if let Err(err) = queue.add_used(mem, buffers.head_index(), 0) {
                tracing::warn!(?err, "vsock cannot return a tx descriptor");
            }
            used += 1;
        }
        used
    }

    fn deliver_rx(&mut self, ctx: &mut DeviceContext) -> usize {
        if self.reset != ResetState::Idle {
            // New connections must not reach the guest before it has reset the old ones.
            return 0;
        }
        let mem = ctx.mem();
        let Some(queue) = ctx.queue(RX_QUEUE) else {
            return 0;
        };
        self.muxer.deliver_rx(queue, mem)
    }

    fn deliver_event(&mut self, ctx: &mut DeviceContext) -> bool {
        if self.reset != ResetState::EventPending {
            return false;
        }
        let mem = ctx.mem();
        let Some(queue) = ctx.queue(EVENT_QUEUE) else {
            return false;
        };
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        let buffers = ChainBuffers::new(chain);
        let used_len = match buffers.write_at(mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes()) {
            Ok(()) => 4,
            Err(err) => {
                tracing::warn!(%err, "cannot write vsock event");
                0
            }
        };
        if let Err(err) = queue.add_used(mem, buffers.head_index(), used_len) {
            tracing::warn!(?err, "vsock cannot return an event descriptor");
        }
        self.reset = match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
            Ok(at_delivery) => ResetState::AwaitingAck(at_delivery),
            Err(_) => ResetState::Idle,
        };
        true
    }
}

/// Reads header and payload of a tx packet; `None` if it is malformed.
fn read_tx_packet(buffers: &ChainBuffers, mem: &GuestMemoryMmap, payload: &mut Vec<u8>) -> Option<PacketHeader> {
    let mut raw = [0u8; HEADER_SIZE];
    buffers.read_at(mem, 0, &mut raw).ok()?;
    let header = PacketHeader::from_bytes(&raw);
    let len = header.len as usize;
    if len > MAX_PAYLOAD || (buffers.readable_len() as usize) < HEADER_SIZE + len {
        return None;
    }
    payload.resize(len, 0);
    buffers.read_at(mem, HEADER_SIZE as u64, payload).ok()?;
    Some(header)
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_driver_features(&mut self, features: u64) {
        self.driver_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::copy_config(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _ctx: &mut DeviceContext) -> Result<(), DeviceError> {
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.muxer.close_all();
        self.active = false;
        self.driver_features = 0;
        // A fresh driver has no connections to reset.
        self.reset = ResetState::Idle;
        self.tx_blocked = false;
    }

    fn process_queue(&mut self, queue_index: usize, ctx: &mut DeviceContext) {
        if queue_index == RX_QUEUE {
            self.muxer.set_rx_starved(false);
        }
        self.pump(ctx);
    }

    fn interest_list(&self, out: &mut Vec<Interest>) {
        self.muxer.interest_list(out);
    }

    fn process_backend(&mut self, token: u32, events: EventSet, ctx: &mut DeviceContext) {
        self.muxer.handle_host_event(token, events);
        self.pump(ctx);
    }

    fn process_pending(&mut self, ctx: &mut DeviceContext) {
        self.pump(ctx);
    }

    fn take_retired_fds(&mut self) -> Vec<OwnedFd> {
        self.muxer.take_retired()
    }

    fn prepare_fork(&mut self) {
        // Nothing to quiesce: partially written guest data lives in our memory
        // (the child drops its copy with its connections), and host data is
        // only read straight into guest buffers.
    }

    fn rewire_after_fork(&mut self, rewire: DeviceRewire) -> Result<(), DeviceError> {
        match rewire {
            DeviceRewire::Vsock { uds_path } => {
                self.muxer
                    .rebind_after_fork(uds_path.clone())
                    .map_err(|source| DeviceError::Bind { path: uds_path, source })?;
                self.tx_blocked = false;
                // The guest's connections now point at host sockets we do not own.
                self.reset = if self.active { ResetState::EventPending } else { ResetState::Idle };
                Ok(())
            }
            other => Err(DeviceError::RewireMismatch { device: "vsock", given: other.kind() }),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
