//! The device-to-driver interrupt line of one virtio-mmio device.

use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: the device used buffers in at least one queue.
pub const INTERRUPT_VRING: u32 = 1;
/// InterruptStatus bit: the device configuration space changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// Pending interrupt reasons plus the irqfd that raises the guest IRQ.
///
/// The VMM binds the EventFd to a GSI with KVM_IRQFD; each write raises an edge.
/// The guest reads InterruptStatus to learn why and acknowledges via InterruptACK.
#[derive(Debug)]
pub struct Interrupt {
    status: u32,
    eventfd: EventFd,
}

impl Interrupt {
    pub(crate) fn new(eventfd: EventFd) -> Self {
        Interrupt { status: 0, eventfd }
    }

    pub(crate) fn status(&self) -> u32 {
        self.status
    }

    pub(crate) fn set_status(&mut self, status: u32) {
        self.status = status;
    }

    pub(crate) fn acknowledge(&mut self, bits: u32) {
        self.status &= !bits;
    }

    /// Records `reason` and raises the IRQ.
    pub(crate) fn signal(&mut self, reason: u32) {
        self.status |= reason;
        self.raise();
    }

    /// Raises the IRQ without changing the status (used to re-deliver after a fork).
    pub(crate) fn raise(&self) {
        if let Err(err) = self.eventfd.write(1) {
            tracing::warn!(%err, "failed to raise virtio interrupt");
        }
    }

    pub(crate) fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    pub(crate) fn replace_eventfd(&mut self, eventfd: EventFd) {
        self.eventfd = eventfd;
    }
}
