//! A test-only guest driver: lays out split virtqueues in guest memory and
//! drives a transport through its MMIO registers, like Linux's virtio_mmio.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::transport::registers::*;
use crate::{GuestMemoryMmap, MmioTransport, VirtioDevice};

pub const MEM_SIZE: usize = 0x100_0000;
const RING_AREA: u64 = 0x1000;
const DATA_AREA: u64 = 0x10_0000;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// A buffer of a descriptor chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    pub fn readable(addr: u64, len: u32) -> Self {
        Buf { addr, len, writable: false }
    }
    pub fn writable(addr: u64, len: u32) -> Self {
        Buf { addr, len, writable: true }
    }
}

#[derive(Debug)]
pub struct GuestQueue {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    pub fn desc_addr(&self) -> u64 {
        self.desc
    }
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }
    pub fn used_addr(&self) -> u64 {
        self.used
    }
    /// Forgets ring positions, as a driver does after a device reset.
    pub fn restart(&mut self) {
        self.next_desc = 0;
        self.avail_idx = 0;
        self.used_seen = 0;
    }
}

pub type SharedTransport = Arc<Mutex<MmioTransport>>;

pub struct MockDriver {
    pub mem: GuestMemoryMmap,
    pub transport: SharedTransport,
    pub event_manager: EventManager<SharedTransport>,
    pub irq: EventFd,
    pub queues: Vec<GuestQueue>,
    next_data: u64,
}

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

impl MockDriver {
    /// Wraps `device` in a transport registered with a fresh event manager.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = guest_memory();
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let transport = MmioTransport::new(mem.clone(), device, irq.try_clone().expect("clone")).expect("transport");
        Self::with_transport(mem, Arc::new(Mutex::new(transport)), irq)
    }

    pub fn with_transport(mem: GuestMemoryMmap, transport: SharedTransport, irq: EventFd) -> Self {
        let mut event_manager = EventManager::new().expect("event manager");
        event_manager.add_subscriber(transport.clone());
        MockDriver { mem, transport, event_manager, irq, queues: Vec::new(), next_data: DATA_AREA }
    }

    /// Continues as the forked child: same guest memory and rings, the
    /// transport registered with a brand-new event manager, `irq` as irqfd.
    pub fn into_child(self, irq: EventFd) -> MockDriver {
        let MockDriver { mem, transport, event_manager, queues, next_data, .. } = self;
        drop(event_manager);
        let mut child = MockDriver::with_transport(mem, transport, irq);
        child.queues = queues;
        child.next_data = next_data;
        child.run();
        child
    }

    pub fn read_reg(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.lock().unwrap().read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write_reg(&self, offset: u64, value: u32) {
        self.transport.lock().unwrap().write(offset, &value.to_le_bytes());
    }

    pub fn device_features(&self) -> u64 {
        self.write_reg(DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read_reg(DEVICE_FEATURES));
        self.write_reg(DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read_reg(DEVICE_FEATURES));
        high << 32 | low
    }

    /// Acknowledge, negotiate `features`, returns whether FEATURES_OK stuck.
    pub fn negotiate(&self, features: u64) -> bool {
        self.write_reg(STATUS, 0);
        self.write_reg(STATUS, status::ACKNOWLEDGE);
        self.write_reg(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write_reg(DRIVER_FEATURES_SEL, 0);
        self.write_reg(DRIVER_FEATURES, features as u32);
        self.write_reg(DRIVER_FEATURES_SEL, 1);
        self.write_reg(DRIVER_FEATURES, (features >> 32) as u32);
        self.write_reg(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.read_reg(STATUS) & status::FEATURES_OK != 0
    }

    /// The full Linux probe sequence: all features, every queue of `size`, DRIVER_OK.
    pub fn init(&mut self, size: u16) {
        assert_eq!(self.read_reg(MAGIC_VALUE), MAGIC);
        assert_eq!(self.read_reg(VERSION), 2);
        let features = self.device_features();
        assert!(self.negotiate(features));
        self.queues.clear();
        let mut next = RING_AREA;
        for index in 0.. {
            self.write_reg(QUEUE_SEL, index);
            let max = self.read_reg(QUEUE_NUM_MAX);
            if max == 0 {
                break;
            }
            assert_eq!(self.read_reg(QUEUE_READY), 0);
            let size = size.min(max as u16);
            let desc = next;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
            next = (used + 6 + 8 * u64::from(size) + 0xfff) & !0xfff;
            // Like a real driver, start from zeroed rings.
            self.mem.write_slice(&vec![0u8; (next - desc) as usize], GuestAddress(desc)).unwrap();
            self.write_reg(QUEUE_NUM, u32::from(size));
            for (low, value) in [(QUEUE_DESC_LOW, desc), (QUEUE_DRIVER_LOW, avail), (QUEUE_DEVICE_LOW, used)] {
                self.write_reg(low, value as u32);
                self.write_reg(low + 4, (value >> 32) as u32);
            }
            self.write_reg(QUEUE_READY, 1);
            assert_eq!(self.read_reg(QUEUE_READY), 1);
            self.queues.push(GuestQueue { size, desc, avail, used, next_desc: 0, avail_idx: 0, used_seen: 0 });
        }
        self.write_reg(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert_eq!(self.read_reg(STATUS) & status::DEVICE_NEEDS_RESET, 0);
        self.run();
    }

    /// Allocates a zeroed guest buffer.
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_data;
        self.next_data = (addr + u64::from(len) + 15) & !15;
        assert!(self.next_data < MEM_SIZE as u64, "mock guest out of memory");
        self.mem.write_slice(&vec![0u8; len as usize], GuestAddress(addr)).unwrap();
        addr
    }

    pub fn alloc_with(&mut self, data: &[u8]) -> u64 {
        let addr = self.alloc(data.len() as u32);
        self.write_mem(addr, data);
        addr
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }

    /// Publishes a descriptor chain on `queue`; returns its head index.
    pub fn add_chain(&mut self, queue: usize, bufs: &[Buf]) -> u16 {
        let q = &mut self.queues[queue];
        let head = q.next_desc;
        for (i, buf) in bufs.iter().enumerate() {
            let index = (head + i as u16) % q.size;
            let next = (index + 1) % q.size;
            let mut flags = 0;
            if buf.writable {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let at = q.desc + 16 * u64::from(index);
            self.mem.write_obj(buf.addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(buf.len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        q.next_desc = (head + bufs.len() as u16) % q.size;
        let slot = q.avail + 4 + 2 * u64::from(q.avail_idx % q.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem.write_obj(q.avail_idx, GuestAddress(q.avail + 2)).unwrap();
        head
    }

    /// Kicks `queue` through the QueueNotify register (the no-ioeventfd path).
    pub fn notify(&self, queue: usize) {
        self.write_reg(QUEUE_NOTIFY, queue as u32);
    }

    /// Kicks `queue` by writing its eventfd, as KVM does with an ioeventfd.
    pub fn notify_via_eventfd(&self, queue: usize) {
        let transport = self.transport.lock().unwrap();
        let events = transport.queue_notify_events();
        let (index, fd) = events[queue];
        assert_eq!(index as usize, queue);
        fd.write(1).unwrap();
    }

    /// Runs the event loop until it has been idle for a moment.
    pub fn run(&mut self) {
        let mut idle = 0;
        while idle < 3 {
            let handled = self.event_manager.run_with_timeout(10).expect("event loop");
            idle = if handled == 0 { idle + 1 } else { 0 };
        }
    }

    /// New used-ring entries (id, len) of `queue` since the last call.
    pub fn used(&mut self, queue: usize) -> Vec<(u32, u32)> {
        let q = &mut self.queues[queue];
        let idx: u16 = self.mem.read_obj(GuestAddress(q.used + 2)).unwrap();
        let mut entries = Vec::new();
        while q.used_seen != idx {
            let at = q.used + 4 + 8 * u64::from(q.used_seen % q.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            entries.push((id, len));
            q.used_seen = q.used_seen.wrapping_add(1);
        }
        entries
    }

    /// Whether the interrupt fired since the last call; acknowledges it like the guest.
    pub fn take_interrupt(&self) -> bool {
        let fired = self.irq.read().is_ok();
        let status = self.read_reg(INTERRUPT_STATUS);
        self.write_reg(INTERRUPT_ACK, status);
        fired
    }
}
