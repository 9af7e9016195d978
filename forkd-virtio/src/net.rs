//! virtio-net (network device, type 1) over a tap file descriptor.
//!
//! Deliberately small: no offloads (the guest checksums and segments), no mergeable receive
//! buffers, no control queue. Queue 0 receives (host → guest), queue 1 transmits. The tap is
//! opened by the launcher (`IFF_TAP | IFF_NO_PI`, non-blocking, no vnet header) and handed to
//! the VMM, which needs no network privileges for it; every frame carries the 12-byte
//! `virtio_net_hdr_v1` on the guest side only.
//!
//! BRANCH: the child gets its own tap (in its own network namespace) through
//! [`DeviceRewire::Net`]; the guest's MAC, IP and ARP state stay valid because every sandbox
//! namespace has identical guest-side addresses.

use std::any::Any;
use std::os::fd::{AsRawFd, OwnedFd};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

use crate::chain::ChainBuffers;
use crate::device::{copy_config, DeviceContext, DeviceError, DeviceRewire, Interest, VirtioDevice};
use crate::transport::registers::VIRTIO_F_VERSION_1;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// `VIRTIO_NET_F_MAC`: the device config holds the MAC.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `sizeof(struct virtio_net_hdr_v1)`.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame we move: Ethernet MTU 1500 + header + VLAN tag, with room to spare.
const MAX_FRAME: usize = 65550;
/// Frames moved per event before yielding the loop to other devices.
const MAX_FRAMES_PER_RUN: usize = 256;
/// Event token of the tap fd.
const TAP_TOKEN: u32 = 0;

/// Serializable state of a [`NetDevice`] (the tap itself is a host resource, not state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub driver_features: u64,
}

/// Counters, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames dropped: tap full on transmit, oversized or malformed.
    pub dropped: u64,
}

/// virtio-net device backed by a tap fd.
#[derive(Debug)]
pub struct NetDevice {
    mac: [u8; 6],
    tap: Option<OwnedFd>,
    driver_features: u64,
    active: bool,
    /// A frame read from the tap that found no guest buffer yet.
    pending_rx: Option<Vec<u8>>,
    /// The guest has no receive buffers: stop watching the tap until it posts some.
    rx_starved: bool,
    retired: Vec<OwnedFd>,
    buffer: Vec<u8>,
    stats: NetStats,
}

impl NetDevice {
    /// A device with `mac` over `tap` (non-blocking, `IFF_TAP | IFF_NO_PI`).
    pub fn new(tap: OwnedFd, mac: [u8; 6]) -> Self {
        NetDevice {
            mac,
            tap: Some(tap),
            driver_features: 0,
            active: false,
            pending_rx: None,
            rx_starved: false,
            retired: Vec::new(),
            buffer: vec![0; MAX_FRAME + NET_HDR_LEN],
            stats: NetStats::default(),
        }
    }

    pub fn state(&self) -> NetState {
        NetState { mac: self.mac, driver_features: self.driver_features }
    }

    /// Restores a device from `state` over a new `tap`.
    pub fn from_state(state: &NetState, tap: OwnedFd) -> Self {
        let mut dev = NetDevice::new(tap, state.mac);
        dev.driver_features = state.driver_features;
        dev
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn tap_fd(&self) -> Option<i32> {
        self.tap.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Reads one frame from the tap into `self.pending_rx`; false when none is waiting.
    fn read_frame(&mut self) -> bool {
        let Some(fd) = self.tap_fd() else {
            return false;
        };
        loop {
            // SAFETY: reading into our own buffer of `len()` bytes from a tap fd we own.
            let n = unsafe { libc::read(fd, self.buffer.as_mut_ptr().cast(), self.buffer.len()) };
            if n > 0 {
                self.pending_rx = Some(self.buffer[..n as usize].to_vec());
                return true;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
    }

    /// Moves frames from the tap into guest receive buffers.
    fn process_rx(&mut self, ctx: &mut DeviceContext) {
        let mem = ctx.mem();
        let mut delivered = 0usize;
        let mut more = false;
        {
            let Some(queue) = ctx.queue(RX_QUEUE) else {
                return;
            };
            loop {
                if delivered == MAX_FRAMES_PER_RUN {
                    more = true;
                    break;
                }
                if self.pending_rx.is_none() && !self.read_frame() {
                    break;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    // Keep the frame; wait for the guest to post buffers (queue notify).
                    self.rx_starved = true;
                    break;
                };
                let frame = self.pending_rx.take().unwrap_or_default();
                let buffers = ChainBuffers::new(chain);
                let mut header = [0u8; NET_HDR_LEN];
                // num_buffers = 1 (always present with VIRTIO_F_VERSION_1).
                header[10] = 1;
                let len = NET_HDR_LEN + frame.len();
                let written = if (len as u64) <= buffers.writable_len() {
                    match buffers
                        .write_at(mem, 0, &header)
                        .and_then(|()| buffers.write_at(mem, NET_HDR_LEN as u64, &frame))
                    {
                        Ok(()) => {
                            self.stats.rx_frames += 1;
                            len as u32
                        }
                        Err(err) => {
                            tracing::warn!(%err, "virtio-net: cannot write a received frame");
                            self.stats.dropped += 1;
                            0
                        }
                    }
                } else {
                    self.stats.dropped += 1;
                    0
                };
                if let Err(err) = queue.add_used(mem, buffers.head_index(), written) {
                    tracing::warn!(?err, "virtio-net: cannot return an rx descriptor");
                }
                delivered += 1;
            }
        }
        if delivered > 0 {
            ctx.signal_used_queue();
        }
        if more {
            ctx.reschedule_queue(RX_QUEUE);
        }
    }

    /// Sends the guest's frames to the tap.
    fn process_tx(&mut self, ctx: &mut DeviceContext) {
        let mem = ctx.mem();
        let fd = self.tap_fd();
        let mut completed = 0usize;
        {
            let Some(queue) = ctx.queue(TX_QUEUE) else {
                return;
            };
            while completed < MAX_FRAMES_PER_RUN {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let buffers = ChainBuffers::new(chain);
                let total = buffers.readable_len() as usize;
                if (NET_HDR_LEN..=MAX_FRAME + NET_HDR_LEN).contains(&total) {
                    let frame = &mut self.buffer[..total - NET_HDR_LEN];
                    match buffers.read_at(mem, NET_HDR_LEN as u64, frame) {
                        Ok(()) => {
                            if let Some(fd) = fd {
                                // SAFETY: writing a frame from our buffer to a tap fd we own.
                                let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
                                // A full tap queue drops the frame, as a real link would.
                                if n < 0 {
                                    self.stats.dropped += 1;
                                } else {
                                    self.stats.tx_frames += 1;
                                }
                            } else {
                                self.stats.dropped += 1;
                            }
                        }
                        Err(err) => {
                            tracing::warn!(%err, "virtio-net: cannot read a transmitted frame");
                            self.stats.dropped += 1;
                        }
                    }
                } else {
                    self.stats.dropped += 1;
                }
                if let Err(err) = queue.add_used(mem, buffers.head_index(), 0) {
                    tracing::warn!(?err, "virtio-net: cannot return a tx descriptor");
                }
                completed += 1;
            }
        }
        if completed > 0 {
            ctx.signal_used_queue();
        }
        if completed == MAX_FRAMES_PER_RUN {
            ctx.reschedule_queue(TX_QUEUE);
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn set_driver_features(&mut self, features: u64) {
        self.driver_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.mac, offset, data);
    }

    fn activate(&mut self, _ctx: &mut DeviceContext) -> Result<(), DeviceError> {
        self.active = true;
        self.rx_starved = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = false;
        self.driver_features = 0;
        self.pending_rx = None;
        self.rx_starved = false;
    }

    fn process_queue(&mut self, queue_index: usize, ctx: &mut DeviceContext) {
        match queue_index {
            RX_QUEUE => {
                self.rx_starved = false;
                self.process_rx(ctx);
            }
            TX_QUEUE => self.process_tx(ctx),
            _ => {}
        }
    }

    fn interest_list(&self, out: &mut Vec<Interest>) {
        if let Some(fd) = self.tap_fd() {
            let events = if self.active && !self.rx_starved { EventSet::IN } else { EventSet::empty() };
            out.push(Interest { fd, token: TAP_TOKEN, events });
        }
    }

    fn process_backend(&mut self, token: u32, events: EventSet, ctx: &mut DeviceContext) {
        if token == TAP_TOKEN && events.contains(EventSet::IN) {
            self.process_rx(ctx);
        }
    }

    fn process_pending(&mut self, ctx: &mut DeviceContext) {
        if ctx.is_active() {
            self.process_rx(ctx);
        }
    }

    fn take_retired_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.retired)
    }

    fn rewire_after_fork(&mut self, rewire: DeviceRewire) -> Result<(), DeviceError> {
        match rewire {
            DeviceRewire::Net { tap } => {
                // The inherited fd is the source's tap: the child's copy closes without
                // affecting the source (the registration lived in the parent's epoll).
                drop(self.tap.replace(tap));
                // Whatever was read from the source's tap belongs to the source.
                self.pending_rx = None;
                self.rx_starved = false;
                Ok(())
            }
            other => Err(DeviceError::RewireMismatch { device: "net", given: other.kind() }),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_the_mac_and_rewire_takes_a_tap() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut dev = NetDevice::new(OwnedFd::from(a), [2, 0x66, 0x6b, 0, 0, 2]);
        let mut mac = [0u8; 6];
        dev.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0x66, 0x6b, 0, 0, 2]);
        assert_eq!(dev.device_features() & VIRTIO_NET_F_MAC, VIRTIO_NET_F_MAC);
        assert_eq!(dev.queue_max_sizes().len(), 2);
        assert!(dev.rewire_after_fork(DeviceRewire::Keep).is_err());
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        dev.rewire_after_fork(DeviceRewire::Net { tap: OwnedFd::from(c) }).unwrap();
        let restored = NetDevice::from_state(&dev.state(), dev.tap.take().unwrap());
        assert_eq!(restored.mac(), dev.mac());
    }
}
