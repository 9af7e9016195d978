//! The virtio-mmio (version 2) transport: guest register accesses, queue
//! configuration, device status handling and the device's interrupt line.

mod events;
pub mod registers;
mod state;

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{DeviceContext, DeviceError, DeviceRewire, VirtioDevice};
use crate::interrupt::{Interrupt, INTERRUPT_CONFIG};
use crate::GuestMemoryMmap;
use registers::*;

pub use state::{QueueConfigState, TransportState};

/// Errors creating, restoring or rewiring a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("queue {index} has max size {size}, which is not a non-zero power of two")]
    InvalidQueueSize { index: usize, size: u16 },
    #[error("failed to create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("the state has {given} queues, the device has {expected}")]
    QueueCountMismatch { given: usize, expected: usize },
    #[error("invalid queue state: {0:?}")]
    InvalidQueueState(virtio_queue::Error),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// One virtio-mmio device window: the registers the guest driver sees and the
/// device model behind them.
///
/// See the crate documentation for how the VMM wires it up.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    /// One per queue; the VMM attaches them to QueueNotify with KVM_IOEVENTFD.
    queue_events: Vec<EventFd>,
    /// Wakes the event loop for work started outside it (vCPU thread, VMM calls).
    wake: EventFd,
    device_status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    config_generation: u32,
    activated: bool,
    /// Every queue must be scanned on the next wake (after activation or fork).
    scan_queues_on_wake: bool,
    registry: events::FdRegistry,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("device_status", &self.device_status)
            .field("activated", &self.activated)
            .finish()
    }
}

fn new_eventfd() -> Result<EventFd, TransportError> {
    EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is the irqfd the VMM binds to the device's GSI.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        interrupt: EventFd,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| TransportError::InvalidQueueSize { index, size })?);
        }
        let queue_events = queues.iter().map(|_| new_eventfd()).collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            mem,
            device,
            interrupt: Interrupt::new(interrupt),
            queues,
            queue_events,
            wake: new_eventfd()?,
            device_status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
            scan_queues_on_wake: false,
            registry: events::FdRegistry::default(),
        })
    }

    /// Rebuilds a transport from a snapshot; `device` must already hold its own restored state.
    ///
    /// If the snapshot was taken after DRIVER_OK the device is re-activated.
    pub fn from_state(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        interrupt: EventFd,
        state: &TransportState,
    ) -> Result<Self, TransportError> {
        let mut transport = Self::new(mem, device, interrupt)?;
        if state.queues.len() != transport.queues.len() {
            return Err(TransportError::QueueCountMismatch {
                given: state.queues.len(),
                expected: transport.queues.len(),
            });
        }
        for (queue, saved) in transport.queues.iter_mut().zip(&state.queues) {
            if saved.max_size != queue.max_size() {
                return Err(TransportError::InvalidQueueState(virtio_queue::Error::InvalidMaxSize));
            }
            *queue = saved.to_queue().map_err(TransportError::InvalidQueueState)?;
        }
        transport.device_status = state.device_status;
        transport.device_features_select = state.device_features_select;
        transport.driver_features_select = state.driver_features_select;
        transport.driver_features = state.driver_features;
        transport.queue_select = state.queue_select;
        transport.config_generation = state.config_generation;
        transport.interrupt.set_status(state.interrupt_status);
        if state.device_status & status::FEATURES_OK != 0 {
            transport.device.set_driver_features(state.driver_features);
        }
        if state.activated {
            transport.activate_device()?;
            transport.scan_queues_on_wake = true;
            transport.kick();
        }
        Ok(transport)
    }

    /// The register-level state, for snapshots.
    pub fn state(&self) -> TransportState {
        TransportState {
            device_status: self.device_status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(QueueConfigState::of).collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated,
        }
    }

    /// The queue-notify EventFds, as (queue index, fd). Register each with
    /// KVM_IOEVENTFD at window base + 0x50 with datamatch = queue index (4 bytes).
    pub fn queue_notify_events(&self) -> Vec<(u32, &EventFd)> {
        self.queue_events.iter().enumerate().map(|(index, fd)| (index as u32, fd)).collect()
    }

    /// The irqfd currently used to interrupt the guest.
    pub fn interrupt_eventfd(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// Virtio device ID of the wrapped device.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// True once the driver set DRIVER_OK and the device accepted it.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The wrapped device, if it is a `T`.
    pub fn device<T: VirtioDevice>(&self) -> Option<&T> {
        self.device.as_any().downcast_ref::<T>()
    }

    /// Runs `f` on the wrapped device (if it is a `T`) and wakes the event loop,
    /// so that any work `f` queued (e.g. a vsock transport reset) is carried out.
    pub fn with_device<T: VirtioDevice, R>(&mut self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let result = self.device.as_any_mut().downcast_mut::<T>().map(f);
        self.kick();
        result
    }

    /// Quiesces the device before the VMM forks (vCPUs must be paused and the
    /// event loop idle).
    pub fn prepare_fork(&mut self) {
        self.device.prepare_fork();
    }

    /// In the forked child: replaces every fd this transport and its device hold.
    ///
    /// New queue-notify EventFds and a new wake fd are created (read them again
    /// with [`MmioTransport::queue_notify_events`] and register them on the
    /// child's VM); `interrupt` replaces the irqfd. The inherited copies are
    /// closed, which leaves the parent's fds untouched. The child must add this
    /// transport to a *new* `EventManager`; its `init()` registers the new fds.
    pub fn rewire_after_fork(&mut self, interrupt: EventFd, rewire: DeviceRewire) -> Result<(), TransportError> {
        let config_before = self.config_snapshot();
        let queue_events = self.queue_events.iter().map(|_| new_eventfd()).collect::<Result<Vec<_>, _>>()?;
        let wake = new_eventfd()?;
        self.device.rewire_after_fork(rewire)?;
        self.queue_events = queue_events;
        self.wake = wake;
        self.interrupt.replace_eventfd(interrupt);
        // Registrations belonged to the parent's epoll, which the child must not touch.
        self.registry = events::FdRegistry::default();
        if self.config_snapshot() != config_before {
            self.config_generation = self.config_generation.wrapping_add(1);
            if self.activated {
                self.interrupt.signal(INTERRUPT_CONFIG);
            }
        }
        if self.activated {
            // Notifications may have been pending in the parent's eventfds.
            self.scan_queues_on_wake = true;
        }
        if self.interrupt.status() != 0 {
            // The child's VM has a fresh irqchip: re-raise a pending interrupt.
            self.interrupt.raise();
        }
        self.kick();
        Ok(())
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the MMIO window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(offset, len = data.len(), "invalid virtio-mmio register read");
            data.fill(0);
            return;
        }
        let value = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => {
                let features = self.device_features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.device_status,
            // No shared memory regions: a length of all ones means "absent".
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX,
            SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "read of write-only or unknown virtio-mmio register");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handles a guest write of `data` at `offset` in the MMIO window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(offset, len = data.len(), "invalid virtio-mmio register write");
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::warn!(offset, "unaligned virtio-mmio register write");
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_select = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_select = value,
            QUEUE_SEL => self.queue_select = value,
            QUEUE_NUM => self.configure_queue(|q| {
                if let Ok(size) = u16::try_from(value) {
                    q.set_size(size)
                }
            }),
            QUEUE_READY => self.write_queue_ready(value),
            QUEUE_NOTIFY => self.notify_queue(value),
            INTERRUPT_ACK => self.interrupt.acknowledge(value),
            STATUS => self.write_status(value),
            QUEUE_DESC_LOW => self.configure_queue(|q| q.set_desc_table_address(Some(value), None)),
            QUEUE_DESC_HIGH => self.configure_queue(|q| q.set_desc_table_address(None, Some(value))),
            QUEUE_DRIVER_LOW => self.configure_queue(|q| q.set_avail_ring_address(Some(value), None)),
            QUEUE_DRIVER_HIGH => self.configure_queue(|q| q.set_avail_ring_address(None, Some(value))),
            QUEUE_DEVICE_LOW => self.configure_queue(|q| q.set_used_ring_address(Some(value), None)),
            QUEUE_DEVICE_HIGH => self.configure_queue(|q| q.set_used_ring_address(None, Some(value))),
            SHM_SEL => {}
            _ => tracing::debug!(offset, value, "write to read-only or unknown virtio-mmio register"),
        }
    }

    fn device_features(&self) -> u64 {
        self.device.device_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// Queue layout may only change while the driver sets the device up.
    fn configure_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        let configuring = self.device_status & status::FEATURES_OK != 0 && self.device_status & status::DRIVER_OK == 0;
        if !configuring {
            tracing::warn!(status = self.device_status, "queue configured outside setup");
            return;
        }
        match self.queues.get_mut(self.queue_select as usize) {
            Some(queue) if !queue.ready() => f(queue),
            Some(_) => tracing::warn!(queue = self.queue_select, "queue changed while ready"),
            None => tracing::warn!(queue = self.queue_select, "no such queue"),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let Some(queue) = self.queues.get_mut(self.queue_select as usize) else {
            return;
        };
        if value == 0 {
            // Allowed at any time: the driver is tearing the queue down.
            queue.set_ready(false);
            return;
        }
        let configuring = self.device_status & status::FEATURES_OK != 0 && self.device_status & status::DRIVER_OK == 0;
        if configuring {
            queue.set_ready(true);
        }
    }

    fn notify_queue(&mut self, value: u32) {
        // Without an ioeventfd the write traps here; hand it to the event loop.
        match self.queue_events.get(value as usize) {
            Some(event) => {
                if let Err(err) = event.write(1) {
                    tracing::warn!(%err, "failed to signal queue event");
                }
            }
            None => tracing::warn!(queue = value, "notify for a queue that does not exist"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.device_status & status::DRIVER != 0 && self.device_status & status::FEATURES_OK == 0;
        if !negotiating {
            tracing::warn!(status = self.device_status, "driver features written outside negotiation");
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        if value & old != old {
            tracing::warn!(old, value, "driver tried to clear device status bits");
            return;
        }
        let mut value = value;
        let newly_set = value & !old;
        if newly_set & status::FEATURES_OK != 0 {
            let offered = self.device_features();
            let acceptable = self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if acceptable {
                self.device.set_driver_features(self.driver_features);
            } else {
                tracing::warn!(driver = self.driver_features, offered, "rejecting driver features");
                value &= !status::FEATURES_OK;
            }
        }
        self.device_status = value;
        let ready_to_activate = newly_set & status::DRIVER_OK != 0
            && value & status::FEATURES_OK != 0
            && value & status::FAILED == 0
            && !self.activated;
        if ready_to_activate {
            if let Err(err) = self.activate_device() {
                tracing::error!(%err, "virtio device activation failed");
                self.device_status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal(INTERRUPT_CONFIG);
            }
        }
    }

    fn activate_device(&mut self) -> Result<(), DeviceError> {
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(DeviceError::Activation(format!(
                    "queue {index} lies outside guest memory or is misaligned"
                )));
            }
        }
        let mut ctx = DeviceContext::new(&self.mem, &mut self.queues, &mut self.interrupt, true);
        self.device.activate(&mut ctx)?;
        self.activated = true;
        // The driver may have queued buffers before DRIVER_OK; look at every queue.
        self.scan_queues_on_wake = true;
        self.kick();
        Ok(())
    }

    /// Device reset (Status written with 0).
    fn reset(&mut self) {
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device_status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.set_status(0);
        self.activated = false;
        self.scan_queues_on_wake = false;
        // The device may have retired fds the event loop must unregister.
        self.kick();
    }

    fn config_snapshot(&self) -> Vec<u8> {
        let mut config = vec![0u8; 256];
        self.device.read_config(0, &mut config);
        config
    }

    /// Wakes the event loop so it runs deferred work and refreshes registrations.
    fn kick(&self) {
        if let Err(err) = self.wake.write(1) {
            tracing::warn!(%err, "failed to wake the virtio event loop");
        }
    }

    fn device_context(&mut self) -> (&mut dyn VirtioDevice, DeviceContext<'_>) {
        (self.device.as_mut(), DeviceContext::new(&self.mem, &mut self.queues, &mut self.interrupt, self.activated))
    }

    /// Raw fds of the transport's own event sources (for tests and diagnostics).
    pub fn own_fds(&self) -> Vec<RawFd> {
        use std::os::fd::AsRawFd;
        let mut fds: Vec<RawFd> = self.queue_events.iter().map(|e| e.as_raw_fd()).collect();
        fds.push(self.wake.as_raw_fd());
        fds.push(self.interrupt.eventfd().as_raw_fd());
        fds
    }
}
