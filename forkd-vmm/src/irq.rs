//! Interrupt lines: an eventfd bound to a GSI of the in-kernel IOAPIC with `KVM_IRQFD`, so a
//! device raises an interrupt with one `write(2)` and no vCPU exit.

use std::io;
use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line into the guest.
#[derive(Debug)]
pub struct IrqLine {
    gsi: u32,
    event: EventFd,
}

impl IrqLine {
    /// Creates an unbound line for `gsi`; the VM binds `event()` with `KVM_IRQFD`.
    pub fn new(gsi: u32) -> io::Result<Self> {
        Ok(Self { gsi, event: EventFd::new(libc::EFD_NONBLOCK)? })
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        IrqLine::trigger(self)
    }
}
