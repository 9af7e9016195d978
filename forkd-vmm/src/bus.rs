//! Address-space dispatch for MMIO and port I/O exits.
//!
//! Devices are shared between vCPU threads (which call into them on exits) and the event loop
//! (which services their backends), hence `Arc<Mutex<..>>`. Locks are never held across a
//! `fork()`: BRANCH parks every vCPU outside the bus before forking.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through guest MMIO or port I/O.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device as stored on a bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors while building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// A sorted map of non-overlapping address ranges to devices.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedBusDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::InvalidRange { base, len })?;
        if let Some((&prev_base, prev)) = self.ranges.range(..end).next_back() {
            if prev_base + prev.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, &entry.device))
    }

    /// Dispatches a read; returns false (and leaves `data` untouched) if nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if nothing is mapped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panic in one device access must not
/// wedge the whole VM, and device state stays internally consistent per access.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, u8)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_offset_and_rejects_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        bus.insert(0x1000, 0x10, dev.clone()).unwrap();
        assert_eq!(bus.insert(0x100f, 0x10, dev.clone()), Err(BusError::Overlap { base: 0x100f, len: 0x10 }));
        assert_eq!(bus.insert(0xff8, 0x10, dev.clone()), Err(BusError::Overlap { base: 0xff8, len: 0x10 }));
        bus.insert(0x1010, 0x10, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x1005, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x2000, &mut b));
        assert!(bus.write(0x1012, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(2, 7)]);
        assert_eq!(bus.insert(1, 0, dev), Err(BusError::InvalidRange { base: 1, len: 0 }));
    }
}
