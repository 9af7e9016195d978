use std::io::{Read, Seek, SeekFrom, Write};

use virtio_bindings::virtio_blk::*;

use super::mock_driver::{Buf, MockDriver};
use crate::{BlockDevice, DeviceRewire, DiskBackend, RawFileDisk};

const DISK_SIZE: u64 = 64 * 1024;

struct Disk {
    driver: MockDriver,
    file: tempfile::NamedTempFile,
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn disk(read_only: bool) -> Disk {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&pattern(DISK_SIZE as usize)).unwrap();
    let backend = RawFileDisk::open(file.path(), read_only).unwrap();
    let device = BlockDevice::new(Box::new(backend)).with_disk_id("forkd-disk-1");
    let mut driver = MockDriver::new(Box::new(device));
    driver.init(64);
    Disk { driver, file }
}

impl Disk {
    fn header(&mut self, request_type: u32, sector: u64) -> u64 {
        let mut header = Vec::new();
        header.extend_from_slice(&request_type.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&sector.to_le_bytes());
        self.driver.alloc_with(&header)
    }

    /// Submits a chain and returns (used length, status byte).
    fn submit(&mut self, bufs: &[Buf], status_addr: u64) -> (u32, u8) {
        let head = self.driver.add_chain(0, bufs);
        self.driver.notify(0);
        self.driver.run();
        let used = self.driver.used(0);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        assert!(self.driver.take_interrupt());
        (used[0].1, self.driver.read_mem(status_addr, 1)[0])
    }

    fn file_bytes(&mut self) -> Vec<u8> {
        let mut data = Vec::new();
        let file = self.file.as_file_mut();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut data).unwrap();
        data
    }
}

#[test]
fn config_space_and_features() {
    let d = disk(false);
    let mut capacity = [0u8; 8];
    d.driver.transport.lock().unwrap().read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SIZE / 512);
    assert_eq!(d.driver.read_reg(0x100 + 20), 512, "blk_size");
    assert_eq!(d.driver.read_reg(0x100 + 12), 254, "seg_max");
    let features = d.driver.device_features();
    for bit in [VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE] {
        assert_ne!(features & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn read_sectors() {
    let mut d = disk(false);
    let header = d.header(VIRTIO_BLK_T_IN, 2);
    let data = d.driver.alloc(1024);
    let status = d.driver.alloc(1);
    let (used, status_byte) = d.submit(
        &[
            Buf::readable(header, 16),
            Buf::writable(data, 512),
            Buf::writable(data + 512, 512),
            Buf::writable(status, 1),
        ],
        status,
    );
    assert_eq!(status_byte, VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 1025);
    assert_eq!(d.driver.read_mem(data, 1024), pattern(DISK_SIZE as usize)[1024..2048]);
}

#[test]
fn write_sectors_then_flush() {
    let mut d = disk(false);
    let header = d.header(VIRTIO_BLK_T_OUT, 4);
    let payload = vec![0xabu8; 1024];
    let data = d.driver.alloc_with(&payload);
    let status = d.driver.alloc(1);
    let (used, status_byte) =
        d.submit(&[Buf::readable(header, 16), Buf::readable(data, 1024), Buf::writable(status, 1)], status);
    assert_eq!((used, status_byte), (1, VIRTIO_BLK_S_OK as u8));
    let contents = d.file_bytes();
    assert_eq!(&contents[2048..3072], &payload[..]);
    assert_eq!(&contents[..2048], &pattern(DISK_SIZE as usize)[..2048]);

    let header = d.header(VIRTIO_BLK_T_FLUSH, 0);
    let status = d.driver.alloc(1);
    let (used, status_byte) = d.submit(&[Buf::readable(header, 16), Buf::writable(status, 1)], status);
    assert_eq!((used, status_byte), (1, VIRTIO_BLK_S_OK as u8));
}

#[test]
fn header_and_data_may_share_descriptors() {
    let mut d = disk(false);
    // One readable descriptor with header + data, status in its own buffer.
    let mut request = Vec::new();
    request.extend_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    request.extend_from_slice(&0u32.to_le_bytes());
    request.extend_from_slice(&1u64.to_le_bytes());
    request.extend_from_slice(&[0x5a; 512]);
    let addr = d.driver.alloc_with(&request);
    let status = d.driver.alloc(1);
    let (_, status_byte) = d.submit(&[Buf::readable(addr, request.len() as u32), Buf::writable(status, 1)], status);
    assert_eq!(status_byte, VIRTIO_BLK_S_OK as u8);
    assert_eq!(&d.file_bytes()[512..1024], &[0x5a; 512][..]);
}

#[test]
fn get_id_returns_the_serial() {
    let mut d = disk(false);
    let header = d.header(VIRTIO_BLK_T_GET_ID, 0);
    let data = d.driver.alloc(20);
    let status = d.driver.alloc(1);
    let (used, status_byte) =
        d.submit(&[Buf::readable(header, 16), Buf::writable(data, 20), Buf::writable(status, 1)], status);
    assert_eq!((used, status_byte), (21, VIRTIO_BLK_S_OK as u8));
    let mut expected = b"forkd-disk-1".to_vec();
    expected.resize(20, 0);
    assert_eq!(d.driver.read_mem(data, 20), expected);
}

#[test]
fn out_of_range_requests_fail_with_ioerr() {
    let mut d = disk(false);
    for (sector, len) in [(DISK_SIZE / 512, 512), (DISK_SIZE / 512 - 1, 1024), (u64::MAX / 256, 512)] {
        let header = d.header(VIRTIO_BLK_T_IN, sector);
        let data = d.driver.alloc(len);
        let status = d.driver.alloc(1);
        let (used, status_byte) =
            d.submit(&[Buf::readable(header, 16), Buf::writable(data, len), Buf::writable(status, 1)], status);
        assert_eq!((used, status_byte), (1, VIRTIO_BLK_S_IOERR as u8), "sector {sector}");
    }
    // A length that is not a whole number of sectors is refused too.
    let header = d.header(VIRTIO_BLK_T_IN, 0);
    let data = d.driver.alloc(100);
    let status = d.driver.alloc(1);
    let (_, status_byte) =
        d.submit(&[Buf::readable(header, 16), Buf::writable(data, 100), Buf::writable(status, 1)], status);
    assert_eq!(status_byte, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut d = disk(true);
    assert_ne!(d.driver.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    let header = d.header(VIRTIO_BLK_T_OUT, 0);
    let data = d.driver.alloc_with(&[1u8; 512]);
    let status = d.driver.alloc(1);
    let (_, status_byte) =
        d.submit(&[Buf::readable(header, 16), Buf::readable(data, 512), Buf::writable(status, 1)], status);
    assert_eq!(status_byte, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(d.file_bytes(), pattern(DISK_SIZE as usize));
}

#[test]
fn unknown_requests_are_unsupported() {
    let mut d = disk(false);
    let header = d.header(0x1234, 0);
    let status = d.driver.alloc(1);
    let (_, status_byte) = d.submit(&[Buf::readable(header, 16), Buf::writable(status, 1)], status);
    assert_eq!(status_byte, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn malformed_chains_do_not_panic() {
    let mut d = disk(false);
    // No writable status byte at all.
    let header = d.header(VIRTIO_BLK_T_IN, 0);
    let head = d.driver.add_chain(0, &[Buf::readable(header, 16)]);
    d.driver.notify(0);
    d.driver.run();
    assert_eq!(d.driver.used(0), vec![(u32::from(head), 0)]);

    // Header too short.
    let status = d.driver.alloc(1);
    let (_, status_byte) = d.submit(&[Buf::readable(header, 8), Buf::writable(status, 1)], status);
    assert_eq!(status_byte, VIRTIO_BLK_S_IOERR as u8);

    // Data buffer outside guest memory.
    let header = d.header(VIRTIO_BLK_T_IN, 0);
    let status = d.driver.alloc(1);
    let (_, status_byte) =
        d.submit(&[Buf::readable(header, 16), Buf::writable(0xffff_0000_0000, 512), Buf::writable(status, 1)], status);
    assert_eq!(status_byte, VIRTIO_BLK_S_IOERR as u8);

    // A descriptor claiming 4 GiB must not make us allocate it.
    let header = d.header(VIRTIO_BLK_T_IN, 0);
    let status = d.driver.alloc(1);
    let (_, status_byte) = d.submit(
        &[Buf::readable(header, 16), Buf::writable(0x10_0000, u32::MAX - 511), Buf::writable(status, 1)],
        status,
    );
    assert_eq!(status_byte, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn rewire_switches_the_backend() {
    let d = disk(false);
    let mut other = tempfile::NamedTempFile::new().unwrap();
    other.write_all(&vec![0x77u8; DISK_SIZE as usize]).unwrap();
    let backend = RawFileDisk::open(other.path(), false).unwrap();
    let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    d.driver
        .transport
        .lock()
        .unwrap()
        .rewire_after_fork(irq.try_clone().unwrap(), DeviceRewire::Block { backend: Box::new(backend) })
        .unwrap();
    let Disk { driver, file } = d;
    let mut d = Disk { driver: driver.into_child(irq), file };

    // Reads now come from the new backend; the old file is left alone.
    let header = d.header(VIRTIO_BLK_T_IN, 0);
    let data = d.driver.alloc(512);
    let status = d.driver.alloc(1);
    let (_, status_byte) =
        d.submit(&[Buf::readable(header, 16), Buf::writable(data, 512), Buf::writable(status, 1)], status);
    assert_eq!(status_byte, VIRTIO_BLK_S_OK as u8);
    assert_eq!(d.driver.read_mem(data, 512), vec![0x77u8; 512]);
    assert_eq!(d.file_bytes(), pattern(DISK_SIZE as usize));

    // Different size: refused.
    let small = tempfile::NamedTempFile::new().unwrap();
    let backend = RawFileDisk::open(small.path(), false).unwrap();
    assert_eq!(backend.size(), 0);
    let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    assert!(d
        .driver
        .transport
        .lock()
        .unwrap()
        .rewire_after_fork(irq, DeviceRewire::Block { backend: Box::new(backend) })
        .is_err());

    let block = d.driver.transport.lock().unwrap().device::<BlockDevice>().map(|b| b.capacity_sectors());
    assert_eq!(block, Some(DISK_SIZE / 512));
}
