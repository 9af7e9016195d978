//! Attaching `forkd-virtio` transports to the VM: MMIO window on the bus, irqfd, ioeventfds,
//! and the kernel command-line entry that tells the guest where the device is.

use crate::arch::layout;
use crate::bus::BusDevice;
use crate::memory::GuestMemory;
use crate::VmmError;
use forkd_virtio::{MmioTransport, TransportState, VirtioDevice};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Routes MMIO exits to a transport.
pub struct MmioWindow(pub Arc<Mutex<MmioTransport>>);

impl BusDevice for MmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        crate::bus::lock(&self.0).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        crate::bus::lock(&self.0).write(offset, data);
    }
}

/// A virtio device attached to the VM.
pub struct VirtioSlot {
    pub base: u64,
    pub gsi: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl VirtioSlot {
    /// `virtio_mmio.device=4K@0xd0000000:5`
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.gsi)
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// Binds a transport's interrupt and queue notifications to `vm`.
pub fn register_with_vm(vm: &VmFd, slot: &VirtioSlot, irq: &EventFd) -> Result<(), VmmError> {
    vm.register_irqfd(irq, slot.gsi).map_err(kvm("register virtio irqfd"))?;
    let transport = crate::bus::lock(&slot.transport);
    for (queue, event) in transport.queue_notify_events() {
        let addr = IoEventAddress::Mmio(slot.base + forkd_virtio::QUEUE_NOTIFY_OFFSET);
        vm.register_ioevent(event, &addr, queue).map_err(kvm("register virtio ioeventfd"))?;
    }
    Ok(())
}

/// Creates the `index`-th virtio-mmio device around `device`, with fresh registers or, when
/// restoring a snapshot, with `restored`'s.
pub fn attach(
    vm: &VmFd,
    memory: &GuestMemory,
    index: u32,
    device: Box<dyn VirtioDevice>,
    restored: Option<&TransportState>,
) -> Result<VirtioSlot, VmmError> {
    let gsi = layout::VIRTIO_IRQ_BASE + index;
    if gsi >= layout::IOAPIC_PINS {
        return Err(VmmError::Io {
            what: "too many virtio devices for the IOAPIC".into(),
            source: std::io::Error::other("out of interrupt pins"),
        });
    }
    let base = layout::VIRTIO_MMIO_START + index as u64 * layout::VIRTIO_MMIO_SIZE;
    let irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|source| VmmError::Io { what: "virtio irq eventfd".into(), source })?;
    let irq_for_vm = irq.try_clone().map_err(|source| VmmError::Io { what: "virtio irq eventfd".into(), source })?;
    let transport = match restored {
        Some(state) => MmioTransport::from_state(memory.clone(), device, irq, state),
        None => MmioTransport::new(memory.clone(), device, irq),
    }
    .map_err(|source| VmmError::Transport { slot: index, source })?;
    let slot = VirtioSlot { base, gsi, transport: Arc::new(Mutex::new(transport)) };
    register_with_vm(vm, &slot, &irq_for_vm)?;
    Ok(slot)
}
