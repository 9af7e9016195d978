use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mock_driver::{Buf, MockDriver};
use crate::transport::registers::*;
use crate::{DeviceRewire, MmioTransport, RngDevice, TransportState};

fn rng_driver() -> MockDriver {
    MockDriver::new(Box::new(RngDevice::new()))
}

#[test]
fn identification_registers() {
    let driver = rng_driver();
    assert_eq!(driver.read_reg(MAGIC_VALUE), 0x7472_6976);
    assert_eq!(driver.read_reg(VERSION), 2);
    assert_eq!(driver.read_reg(DEVICE_ID), 4);
    assert_eq!(driver.read_reg(VENDOR_ID), 0);
    assert_ne!(driver.device_features() & VIRTIO_F_VERSION_1, 0);
    driver.write_reg(QUEUE_SEL, 0);
    assert_eq!(driver.read_reg(QUEUE_NUM_MAX), 256);
    driver.write_reg(QUEUE_SEL, 1);
    assert_eq!(driver.read_reg(QUEUE_NUM_MAX), 0, "absent queue");
    assert_eq!(driver.read_reg(CONFIG_GENERATION), 0);
    // Non-32-bit register accesses are ignored and read as zero.
    let mut narrow = [0xffu8; 2];
    driver.transport.lock().unwrap().read(MAGIC_VALUE, &mut narrow);
    assert_eq!(narrow, [0, 0]);
}

#[test]
fn features_without_version_1_are_rejected() {
    let driver = rng_driver();
    assert!(!driver.negotiate(0));
    assert!(driver.negotiate(VIRTIO_F_VERSION_1));
    // Bits the device did not offer are refused as well.
    assert!(!driver.negotiate(VIRTIO_F_VERSION_1 | 1 << 40));
}

#[test]
fn queue_setup_is_refused_before_features_ok() {
    let driver = rng_driver();
    driver.write_reg(STATUS, status::ACKNOWLEDGE | status::DRIVER);
    driver.write_reg(QUEUE_SEL, 0);
    driver.write_reg(QUEUE_READY, 1);
    assert_eq!(driver.read_reg(QUEUE_READY), 0);
}

#[test]
fn status_zero_resets_the_device() {
    let mut driver = rng_driver();
    driver.init(16);
    let buf = driver.alloc(8);
    driver.add_chain(0, &[Buf::writable(buf, 8)]);
    driver.notify(0);
    driver.run();
    assert!(driver.read_reg(INTERRUPT_STATUS) & 1 != 0);

    driver.write_reg(STATUS, 0);
    assert_eq!(driver.read_reg(STATUS), 0);
    assert_eq!(driver.read_reg(INTERRUPT_STATUS), 0);
    driver.write_reg(QUEUE_SEL, 0);
    assert_eq!(driver.read_reg(QUEUE_READY), 0);
    assert!(!driver.transport.lock().unwrap().is_activated());

    // Notifications after reset are ignored, and the device can be brought up again.
    driver.notify(0);
    driver.run();
    driver.init(16);
    let buf = driver.alloc(8);
    let head = driver.add_chain(0, &[Buf::writable(buf, 8)]);
    driver.notify(0);
    driver.run();
    assert_eq!(driver.used(0), vec![(u32::from(head), 8)]);
}

#[test]
fn interrupt_ack_clears_status_bits() {
    let mut driver = rng_driver();
    driver.init(16);
    let buf = driver.alloc(8);
    driver.add_chain(0, &[Buf::writable(buf, 8)]);
    driver.notify(0);
    driver.run();
    assert_eq!(driver.read_reg(INTERRUPT_STATUS), 1);
    driver.write_reg(INTERRUPT_ACK, 1);
    assert_eq!(driver.read_reg(INTERRUPT_STATUS), 0);
}

#[test]
fn buffers_queued_before_driver_ok_are_processed_on_activation() {
    let mut driver = rng_driver();
    driver.init(16);
    driver.write_reg(STATUS, 0);
    // Re-probe, but post a buffer between queue setup and DRIVER_OK.
    let features = driver.device_features();
    assert!(driver.negotiate(features));
    driver.write_reg(QUEUE_SEL, 0);
    let q = &driver.queues[0];
    let (desc, avail, used) = (q.desc_addr(), q.avail_addr(), q.used_addr());
    driver.write_reg(QUEUE_NUM, 16);
    driver.write_reg(QUEUE_DESC_LOW, desc as u32);
    driver.write_reg(QUEUE_DRIVER_LOW, avail as u32);
    driver.write_reg(QUEUE_DEVICE_LOW, used as u32);
    driver.write_reg(QUEUE_READY, 1);
    driver.queues[0].restart();
    let buf = driver.alloc(8);
    let head = driver.add_chain(0, &[Buf::writable(buf, 8)]);
    driver.write_reg(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    driver.run();
    assert_eq!(driver.used(0), vec![(u32::from(head), 8)]);
}

#[test]
fn invalid_queue_addresses_make_activation_fail() {
    let driver = rng_driver();
    assert!(driver.negotiate(VIRTIO_F_VERSION_1));
    driver.write_reg(QUEUE_SEL, 0);
    driver.write_reg(QUEUE_NUM, 16);
    driver.write_reg(QUEUE_DESC_LOW, 0);
    driver.write_reg(QUEUE_DESC_HIGH, 0x10);
    driver.write_reg(QUEUE_DRIVER_LOW, 0x2000);
    driver.write_reg(QUEUE_DEVICE_LOW, 0x3000);
    driver.write_reg(QUEUE_READY, 1);
    driver.write_reg(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert_ne!(driver.read_reg(STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(!driver.transport.lock().unwrap().is_activated());
}

#[test]
fn state_round_trips_through_serde() {
    let mut driver = rng_driver();
    driver.init(16);
    let buf = driver.alloc(8);
    driver.add_chain(0, &[Buf::writable(buf, 8)]);
    driver.notify(0);
    driver.run();
    assert_eq!(driver.used(0).len(), 1);
    let state = driver.transport.lock().unwrap().state();
    assert!(state.activated);
    assert_eq!(state.queues[0].next_avail, 1);
    assert_eq!(state.queues[0].next_used, 1);
    let json = serde_json::to_string(&state).unwrap();
    let restored_state: TransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(restored_state, state);

    // A restored transport continues where the old one stopped.
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let restored = MmioTransport::from_state(
        driver.mem.clone(),
        Box::new(RngDevice::new()),
        irq.try_clone().unwrap(),
        &restored_state,
    )
    .unwrap();
    assert_eq!(restored.state(), state);
    let mut restored_driver = MockDriver::with_transport(driver.mem.clone(), Arc::new(Mutex::new(restored)), irq);
    restored_driver.queues = std::mem::take(&mut driver.queues);
    restored_driver.run();
    let buf = restored_driver.alloc(8);
    let head = restored_driver.add_chain(0, &[Buf::writable(buf, 8)]);
    restored_driver.notify(0);
    restored_driver.run();
    assert_eq!(restored_driver.used(0), vec![(u32::from(head), 8)]);
}

#[test]
fn rewire_after_fork_replaces_every_fd() {
    let mut driver = rng_driver();
    driver.init(16);
    let old_fds = driver.transport.lock().unwrap().own_fds();
    let old_irq = driver.irq.try_clone().unwrap();

    let new_irq = EventFd::new(EFD_NONBLOCK).unwrap();
    {
        let mut transport = driver.transport.lock().unwrap();
        transport.prepare_fork();
        transport.rewire_after_fork(new_irq.try_clone().unwrap(), DeviceRewire::Keep).unwrap();
        let new_fds = transport.own_fds();
        assert_eq!(new_fds.len(), old_fds.len());
        assert!(new_fds.iter().all(|fd| !old_fds.contains(fd)), "old {old_fds:?} new {new_fds:?}");
        assert_eq!(transport.interrupt_eventfd().as_raw_fd(), *new_fds.last().unwrap());
    }

    // The child registers the transport with a brand-new event manager.
    let mut child = driver.into_child(new_irq);
    let buf = child.alloc(8);
    let head = child.add_chain(0, &[Buf::writable(buf, 8)]);
    child.notify_via_eventfd(0);
    child.run();
    assert_eq!(child.used(0), vec![(u32::from(head), 8)]);
    assert!(child.take_interrupt());
    assert!(old_irq.read().is_err(), "the parent's irqfd must stay silent");
}

#[test]
fn rewire_with_the_wrong_device_kind_fails() {
    let driver = rng_driver();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let result = driver
        .transport
        .lock()
        .unwrap()
        .rewire_after_fork(irq, DeviceRewire::Vsock { uds_path: "/nonexistent".into() });
    assert!(result.is_err());
}

#[test]
fn transport_fits_the_vmm_event_manager() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let transport = MmioTransport::new(super::mock_driver::guest_memory(), Box::new(RngDevice::new()), irq).unwrap();
    let shared: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(transport));
    let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    event_manager.add_subscriber(shared);
    event_manager.run_with_timeout(0).unwrap();
}
