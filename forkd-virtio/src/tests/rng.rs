use super::mock_driver::{Buf, MockDriver};
use crate::RngDevice;

#[test]
fn rng_fills_guest_buffers() {
    let mut driver = MockDriver::new(Box::new(RngDevice::new()));
    driver.init(16);
    let first = driver.alloc(64);
    let second = driver.alloc(32);
    let head = driver.add_chain(0, &[Buf::writable(first, 64), Buf::writable(second, 32)]);
    driver.notify(0);
    driver.run();

    assert_eq!(driver.used(0), vec![(u32::from(head), 96)]);
    assert!(driver.take_interrupt());
    let bytes = [driver.read_mem(first, 64), driver.read_mem(second, 32)].concat();
    assert!(bytes.iter().any(|&b| b != 0), "buffer still all zeros");
}

#[test]
fn rng_returns_read_only_buffers_unfilled() {
    let mut driver = MockDriver::new(Box::new(RngDevice::new()));
    driver.init(16);
    let buf = driver.alloc(16);
    let head = driver.add_chain(0, &[Buf::readable(buf, 16)]);
    driver.notify_via_eventfd(0);
    driver.run();
    assert_eq!(driver.used(0), vec![(u32::from(head), 0)]);
}
