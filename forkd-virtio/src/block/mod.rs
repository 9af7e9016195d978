//! virtio-blk: a single-queue block device over a [`DiskBackend`].
//!
//! Requests are executed synchronously on the event-loop thread, so no I/O is
//! ever in flight when the VMM forks.

mod request;

use std::any::Any;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueT;

pub use crate::disk::{DiskBackend, RawFileDisk};
use request::{Disk, DiskId, SECTOR_SIZE};

use crate::chain::ChainBuffers;
use crate::device::{DeviceContext, DeviceError, DeviceRewire, VirtioDevice};
use crate::transport::registers::VIRTIO_F_VERSION_1;

const QUEUE_SIZE: u16 = 256;
/// Requests handled per event before yielding the loop to other devices.
const MAX_CHAINS_PER_RUN: usize = QUEUE_SIZE as usize;
/// Header and status take one descriptor each.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Serializable state of a [`BlockDevice`] (the backend itself is not included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub disk_id: Vec<u8>,
    pub driver_features: u64,
    pub capacity_sectors: u64,
    pub read_only: bool,
}

/// virtio-blk device (type 2).
pub struct BlockDevice {
    backend: Box<dyn DiskBackend>,
    disk_id: DiskId,
    read_only: bool,
    driver_features: u64,
    bounce: Vec<u8>,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice").field("size", &self.backend.size()).field("read_only", &self.read_only).finish()
    }
}

impl BlockDevice {
    /// A block device exposing `backend`; read-only if the backend is.
    pub fn new(backend: Box<dyn DiskBackend>) -> Self {
        let read_only = backend.read_only();
        BlockDevice { backend, disk_id: [0; 20], read_only, driver_features: 0, bounce: Vec::new() }
    }

    /// Sets the serial the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes
    /// are kept; shorter ids are NUL-padded, e.g. /sys/block/vda/serial).
    pub fn with_disk_id(mut self, id: &str) -> Self {
        self.set_disk_id(id.as_bytes());
        self
    }

    pub fn set_disk_id(&mut self, id: &[u8]) {
        self.disk_id = [0; 20];
        let len = id.len().min(self.disk_id.len());
        self.disk_id[..len].copy_from_slice(&id[..len]);
    }

    /// The backend, e.g. for the VMM to flush or inspect it before a fork.
    pub fn backend(&self) -> &dyn DiskBackend {
        self.backend.as_ref()
    }

    pub fn backend_mut(&mut self) -> &mut dyn DiskBackend {
        self.backend.as_mut()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.backend.size() / SECTOR_SIZE
    }

    pub fn state(&self) -> BlockState {
        BlockState {
            disk_id: self.disk_id.to_vec(),
            driver_features: self.driver_features,
            capacity_sectors: self.capacity_sectors(),
            read_only: self.read_only,
        }
    }

    /// Restores a device from `state` over `backend`, which must be the same size.
    pub fn from_state(backend: Box<dyn DiskBackend>, state: &BlockState) -> Result<Self, DeviceError> {
        let mut device = BlockDevice::new(backend);
        if device.capacity_sectors() != state.capacity_sectors {
            return Err(DeviceError::BackendSizeChanged {
                old: state.capacity_sectors * SECTOR_SIZE,
                new: device.backend.size(),
            });
        }
        device.set_disk_id(&state.disk_id);
        device.driver_features = state.driver_features;
        device.read_only = state.read_only || device.backend.read_only();
        Ok(device)
    }

    fn config_space(&self) -> [u8; 64] {
        let mut config = [0u8; 64];
        config[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        // size_max (8..12) is not offered.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16..20) is not offered.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn set_driver_features(&mut self, features: u64) {
        self.driver_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::copy_config(&self.config_space(), offset, data);
    }

    fn activate(&mut self, _ctx: &mut DeviceContext) -> Result<(), DeviceError> {
        Ok(())
    }

    fn reset(&mut self) {
        self.driver_features = 0;
    }

    fn process_queue(&mut self, queue_index: usize, ctx: &mut DeviceContext) {
        if queue_index != 0 {
            return;
        }
        let mem = ctx.mem();
        let Some(queue) = ctx.queue(0) else {
            return;
        };
        let mut completed = 0usize;
        while completed < MAX_CHAINS_PER_RUN {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let buffers = ChainBuffers::new(chain);
            let disk = Disk { backend: self.backend.as_mut(), id: &self.disk_id, bounce: &mut self.bounce };
            let used_len = request::execute(&buffers, mem, disk);
            if let Err(err) = queue.add_used(mem, buffers.head_index(), used_len) {
                tracing::warn!(?err, "virtio-blk cannot return a descriptor");
            }
            completed += 1;
        }
        // Keep peak bounce memory from lingering between bursts.
        if self.bounce.capacity() > request::CHUNK_SIZE {
            self.bounce = Vec::new();
        }
        if completed > 0 {
            ctx.signal_used_queue();
        }
        if completed == MAX_CHAINS_PER_RUN {
            ctx.reschedule_queue(0);
        }
    }

    fn rewire_after_fork(&mut self, rewire: DeviceRewire) -> Result<(), DeviceError> {
        match rewire {
            DeviceRewire::Block { backend } => {
                if backend.size() / SECTOR_SIZE != self.capacity_sectors() {
                    return Err(DeviceError::BackendSizeChanged { old: self.backend.size(), new: backend.size() });
                }
                if backend.read_only() && !self.read_only {
                    tracing::warn!("read-write disk rewired to a read-only backend; writes will fail");
                }
                self.backend = backend;
                Ok(())
            }
            other => Err(DeviceError::RewireMismatch { device: "block", given: other.kind() }),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
