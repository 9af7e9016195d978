//! virtio-mmio transport and the virtio devices of forkd: block, vsock, net, rng.
//!
//! # Pieces
//!
//! * [`MmioTransport`]: one virtio-mmio (version 2, virtio 1.1 §4.2) device
//!   window wrapping a `Box<dyn` [`VirtioDevice`]`>`. It handles the guest's
//!   register accesses, owns the virtqueues, the queue-notify EventFds and the
//!   interrupt EventFd, and is an `event_manager` subscriber that runs all
//!   device work on the VMM's event-loop thread.
//! * Devices: [`BlockDevice`] over a [`DiskBackend`] (e.g. [`RawFileDisk`]),
//!   [`VsockDevice`] (Unix-socket host side), [`NetDevice`] (over a tap fd), [`RngDevice`].
//!
//! # Wiring (VMM side)
//!
//! For device `i` with MMIO window `base = 0xd000_0000 + i * 0x1000` and GSI `gsi`:
//!
//! 1. Build the device, e.g. `BlockDevice::new(Box::new(RawFileDisk::open(path, ro)?))`,
//!    `VsockDevice::new(3, "/run/sbx/vsock.sock")?` or `RngDevice::new()`.
//! 2. `let irq = EventFd::new(EFD_NONBLOCK)?;` register it with
//!    `vm.register_irqfd(&irq, gsi)`, then
//!    `let t = MmioTransport::new(mem.clone(), Box::new(dev), irq)?` and wrap it:
//!    `let t = Arc::new(Mutex::new(t));`.
//! 3. For each `(queue, fd)` in `t.lock().queue_notify_events()`:
//!    `vm.register_ioevent(fd, &IoEventAddress::Mmio(base + 0x50), queue)`
//!    (4-byte datamatch = queue index). Without it, a QueueNotify write that
//!    traps into [`MmioTransport::write`] is forwarded to the same EventFd.
//! 4. Route MMIO exits in `[base, base + 0x1000)` to
//!    `t.lock().read(addr - base, data)` / `t.lock().write(addr - base, data)`.
//! 5. `event_manager.add_subscriber(t.clone())` (an
//!    `Arc<Mutex<MmioTransport>>` is an `Arc<Mutex<dyn MutEventSubscriber + Send>>`).
//!    `init()` registers the queue EventFds, an internal wake EventFd and the
//!    device's backend fds; fds that appear later (vsock connections, a device
//!    activated on DRIVER_OK) are registered by the transport itself.
//! 6. Announce `virtio_mmio.device=4K@<base>:<gsi>` on the kernel command line.
//!
//! To act on a device from the VMM, use [`MmioTransport::with_device`], e.g.
//! `t.lock().with_device(|v: &mut VsockDevice| v.transport_reset())`, which
//! also wakes the event loop to carry the work out.
//!
//! # BRANCH (fork)
//!
//! With vCPUs paused and the event loop idle:
//!
//! 1. Parent: `t.lock().prepare_fork()` for every transport, then `fork()`.
//! 2. Child: do not use the inherited `EventManager` (its epoll is shared with
//!    the parent); drop it or leak it. For every transport call
//!    [`MmioTransport::rewire_after_fork`] with a fresh irqfd and a
//!    [`DeviceRewire`]: `Block { backend }` (the child's disk),
//!    `Vsock { uds_path }` (a new listener path; the guest then receives
//!    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drops stale connections),
//!    `Net { tap }` (the child's own tap, in its own network namespace), or
//!    `Keep` (rng). This closes the child's copies of every inherited fd without
//!    touching the parent's (no `shutdown(2)` on shared sockets).
//! 3. Child: on the new VM, register the new irqfd and the new
//!    `queue_notify_events()` as in steps 2–3, then add every transport to a
//!    *new* `EventManager` (step 5).
//!
//! The vsock device never unlinks its socket path (that would break the
//! parent after a fork); the VMM removes it when the sandbox ends. A stale
//! socket file at the path is replaced when binding.
//!
//! # Snapshots
//!
//! [`MmioTransport::state`] / [`MmioTransport::from_state`], and
//! `state()` / `from_state()` on each device, give serde-serializable state
//! ([`TransportState`], [`BlockState`], [`VsockState`], [`RngState`]). vsock
//! connections are not saved; a restored vsock device resets the guest's.

pub mod block;
mod chain;
pub mod device;
pub mod disk;
mod interrupt;
pub mod net;
pub mod rng;
#[cfg(test)]
mod tests;
pub mod transport;
pub mod vsock;

pub use block::{BlockDevice, BlockState};
pub use device::{DeviceContext, DeviceError, DeviceRewire, Interest, VirtioDevice};
pub use disk::{DiskBackend, RawFileDisk};
pub use interrupt::{INTERRUPT_CONFIG, INTERRUPT_VRING};
pub use net::{NetDevice, NetState, NetStats};
pub use rng::{RngDevice, RngState};
pub use transport::{MmioTransport, QueueConfigState, TransportError, TransportState};
pub use vsock::{VsockDevice, VsockState};

/// Guest memory as the VMM creates it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Size of the MMIO window each device needs.
pub const MMIO_WINDOW_SIZE: u64 = transport::registers::WINDOW_SIZE;
/// Offset of QueueNotify within the window (for KVM_IOEVENTFD).
pub const QUEUE_NOTIFY_OFFSET: u64 = transport::registers::QUEUE_NOTIFY;
