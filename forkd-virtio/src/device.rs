//! The contract between the virtio-mmio transport and a device model.

use std::any::Any;
use std::fmt;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;

use crate::disk::DiskBackend;
use crate::interrupt::{Interrupt, INTERRUPT_CONFIG, INTERRUPT_VRING};
use crate::GuestMemoryMmap;

/// Highest event token a device may use; tokens above are the transport's own.
pub const MAX_DEVICE_TOKEN: u32 = 0xFFFE_FFFF;

/// A file descriptor a device wants watched by the event loop.
///
/// The transport registers it with `token` as the epoll data and hands the
/// token back to [`VirtioDevice::process_backend`]. An empty `events` set keeps
/// the fd registered for hang-up/error reporting only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    pub fd: RawFd,
    pub token: u32,
    pub events: EventSet,
}

/// What a device may touch while it processes work: guest memory, its
/// queues (only once the driver set DRIVER_OK), and its interrupt line.
pub struct DeviceContext<'a> {
    mem: &'a GuestMemoryMmap,
    queues: &'a mut [Queue],
    interrupt: &'a mut Interrupt,
    active: bool,
    /// Bit i set: queue i has more work; the transport re-signals its eventfd.
    requeue: u64,
}

impl<'a> DeviceContext<'a> {
    pub(crate) fn new(
        mem: &'a GuestMemoryMmap,
        queues: &'a mut [Queue],
        interrupt: &'a mut Interrupt,
        active: bool,
    ) -> Self {
        DeviceContext { mem, queues, interrupt, active, requeue: 0 }
    }

    /// Asks for `process_queue(index)` to run again on a later loop iteration,
    /// so one busy queue cannot starve the other devices on the event loop.
    pub fn reschedule_queue(&mut self, index: usize) {
        if index < 64 {
            self.requeue |= 1 << index;
        }
    }

    pub(crate) fn take_requeue(&mut self) -> u64 {
        std::mem::take(&mut self.requeue)
    }

    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// True once the driver set DRIVER_OK and the device accepted activation.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The queue at `index`, if the device is active and the driver enabled it.
    pub fn queue(&mut self, index: usize) -> Option<&mut Queue> {
        use virtio_queue::QueueT;
        if !self.active {
            return None;
        }
        self.queues.get_mut(index).filter(|q| q.ready())
    }

    /// Tells the driver that buffers were returned on some queue.
    pub fn signal_used_queue(&mut self) {
        self.interrupt.signal(INTERRUPT_VRING);
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_change(&mut self) {
        self.interrupt.signal(INTERRUPT_CONFIG);
    }
}

impl fmt::Debug for DeviceContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceContext").field("queues", &self.queues.len()).field("active", &self.active).finish()
    }
}

/// Device-specific replacements applied in a forked child.
pub enum DeviceRewire {
    /// The device holds no host resources that need replacing (e.g. rng).
    Keep,
    /// Switch a block device to a new backend (e.g. the child's copy-on-write layer).
    Block { backend: Box<dyn DiskBackend> },
    /// Bind the vsock host listener at a new Unix socket path.
    Vsock { uds_path: PathBuf },
    /// Switch a net device to a new tap (the child's, in its own network namespace).
    Net { tap: OwnedFd },
}

impl fmt::Debug for DeviceRewire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRewire::Keep => f.write_str("Keep"),
            DeviceRewire::Block { backend } => {
                f.debug_struct("Block").field("size", &backend.size()).field("read_only", &backend.read_only()).finish()
            }
            DeviceRewire::Vsock { uds_path } => f.debug_struct("Vsock").field("uds_path", uds_path).finish(),
            DeviceRewire::Net { tap } => f.debug_struct("Net").field("tap", tap).finish(),
        }
    }
}

/// Errors a device reports to the transport or the VMM.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the device cannot be activated: {0}")]
    Activation(String),
    #[error("rewire {given} does not fit a {device} device")]
    RewireMismatch { device: &'static str, given: &'static str },
    #[error("the new block backend is {new} bytes, the device was {old} bytes")]
    BackendSizeChanged { old: u64, new: u64 },
    #[error("failed to bind the vsock listener at {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("invalid device state: {0}")]
    InvalidState(String),
}

impl DeviceRewire {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            DeviceRewire::Keep => "keep",
            DeviceRewire::Block { .. } => "block",
            DeviceRewire::Vsock { .. } => "vsock",
            DeviceRewire::Net { .. } => "net",
        }
    }
}

/// A virtio device model driven by [`crate::MmioTransport`].
///
/// All methods run with the transport's lock held, either on a vCPU thread
/// (register accesses, activation, reset) or on the event-loop thread
/// (queue and backend processing). Devices must never close an fd they
/// reported in [`VirtioDevice::interest_list`] themselves: hand it to the
/// transport through [`VirtioDevice::take_retired_fds`] so it leaves epoll first.
pub trait VirtioDevice: Send + Any {
    /// Virtio device ID (2 = block, 4 = rng, 19 = vsock).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the number of entries is the number of queues.
    /// Every size must be a power of two.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits offered to the driver (the transport adds VIRTIO_F_VERSION_1).
    fn device_features(&self) -> u64;

    /// The features the driver accepted, reported when it sets FEATURES_OK.
    fn set_driver_features(&mut self, _features: u64) {}

    /// Reads the device configuration space (offsets relative to 0x100).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space; read-only by default.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver set DRIVER_OK; the queues in `ctx` are now usable.
    fn activate(&mut self, ctx: &mut DeviceContext) -> Result<(), DeviceError>;

    /// The driver wrote 0 to Status: drop all in-flight guest-visible state.
    fn reset(&mut self);

    /// The driver notified queue `queue_index`.
    fn process_queue(&mut self, queue_index: usize, ctx: &mut DeviceContext);

    /// The fds this device wants watched right now.
    fn interest_list(&self, _out: &mut Vec<Interest>) {}

    /// One of the fds from [`VirtioDevice::interest_list`] became ready.
    fn process_backend(&mut self, _token: u32, _events: EventSet, _ctx: &mut DeviceContext) {}

    /// Deferred work requested outside the event loop (reset, activation, VMM calls).
    fn process_pending(&mut self, _ctx: &mut DeviceContext) {}

    /// Fds the device stopped using; the transport unregisters, then closes them.
    fn take_retired_fds(&mut self) -> Vec<OwnedFd> {
        Vec::new()
    }

    /// Called in the parent before `fork()`, with vCPUs paused.
    fn prepare_fork(&mut self) {}

    /// Called in the forked child: replace every host resource the device holds.
    fn rewire_after_fork(&mut self, rewire: DeviceRewire) -> Result<(), DeviceError>;

    fn as_any(&self) -> &dyn Any;

    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Copies the part of `config` at `offset` into `data`; bytes beyond read as 0.
pub(crate) fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let len = data.len().min(config.len() - start);
    data[..len].copy_from_slice(&config[start..start + len]);
}
