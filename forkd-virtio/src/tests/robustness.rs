//! A hostile guest must not be able to crash or hang the device model.

use vm_memory::{Bytes, GuestAddress};

use super::mock_driver::{Buf, MockDriver, MEM_SIZE};
use crate::{BlockDevice, RawFileDisk, RngDevice, VirtioDevice, VsockDevice};

/// Small deterministic generator, so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn addr(&mut self) -> u64 {
        match self.next() % 4 {
            0 => self.next(),
            1 => MEM_SIZE as u64 - (self.next() % 64),
            _ => 0x10_0000 + self.next() % 0x10_0000,
        }
    }

    fn len(&mut self) -> u32 {
        match self.next() % 4 {
            0 => self.next() as u32,
            1 => 0,
            _ => (self.next() % 5000) as u32,
        }
    }
}

fn hammer(device: Box<dyn VirtioDevice>, seed: u64) {
    let mut rng = XorShift(seed);
    let mut driver = MockDriver::new(device);
    driver.init(32);
    let queue_count = driver.queues.len();
    for round in 0..200 {
        let queue = (rng.next() as usize) % queue_count;
        let count = 1 + (rng.next() % 4) as usize;
        let bufs: Vec<Buf> = (0..count)
            .map(|_| Buf { addr: rng.addr(), len: rng.len(), writable: rng.next().is_multiple_of(2) })
            .collect();
        driver.add_chain(queue, &bufs);
        if round % 50 == 49 {
            // Garbage in the descriptor table itself (bad next indexes, loops).
            let desc = driver.queues[queue].desc_addr();
            let junk: Vec<u8> = (0..32 * 16).map(|_| rng.next() as u8).collect();
            driver.mem.write_slice(&junk, GuestAddress(desc)).unwrap();
        }
        driver.notify(queue);
        driver.run();
        driver.used(queue);
    }
    // Garbage register traffic, including Status resets and bogus config writes.
    for _ in 0..500 {
        let offset = rng.next() % 0x200;
        let value = rng.next() as u32;
        driver.write_reg(offset & !3, value);
        driver.read_reg(offset & !3);
        let mut odd = [0u8; 3];
        driver.transport.lock().unwrap().read(offset, &mut odd);
        driver.transport.lock().unwrap().write(offset, &odd);
    }
    driver.run();
}

#[test]
fn random_chains_against_rng() {
    hammer(Box::new(RngDevice::new()), 0x1234_5678);
}

#[test]
fn random_chains_against_block() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let backend = RawFileDisk::open(file.path(), false).unwrap();
    hammer(Box::new(BlockDevice::new(Box::new(backend))), 0x9abc_def0);
}

#[test]
fn random_chains_against_vsock() {
    let dir = tempfile::tempdir().unwrap();
    let device = VsockDevice::new(3, dir.path().join("v.sock")).unwrap();
    hammer(Box::new(device), 0x0bad_cafe);
}

#[test]
fn avail_index_far_ahead_is_rejected() {
    let mut driver = MockDriver::new(Box::new(RngDevice::new()));
    driver.init(16);
    let avail = driver.queues[0].avail_addr();
    driver.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    driver.notify(0);
    driver.run();
    assert!(driver.used(0).is_empty());
}
