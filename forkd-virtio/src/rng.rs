//! virtio-rng (entropy device, type 4): fills guest buffers from getrandom(2).

use std::any::Any;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::QueueT;

use crate::chain::ChainBuffers;
use crate::device::{DeviceContext, DeviceError, DeviceRewire, VirtioDevice};
use crate::transport::registers::VIRTIO_F_VERSION_1;

const QUEUE_SIZE: u16 = 256;
/// Requests handled per event before yielding the loop to other devices.
const MAX_CHAINS_PER_RUN: usize = QUEUE_SIZE as usize;
/// Cap per request so a huge guest buffer cannot stall the event loop.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Serializable state of an [`RngDevice`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub driver_features: u64,
}

/// virtio-rng device.
#[derive(Debug, Default)]
pub struct RngDevice {
    driver_features: u64,
    buffer: Vec<u8>,
}

impl RngDevice {
    pub fn new() -> Self {
        RngDevice::default()
    }

    pub fn state(&self) -> RngState {
        RngState { driver_features: self.driver_features }
    }

    pub fn from_state(state: &RngState) -> Self {
        RngDevice { driver_features: state.driver_features, buffer: Vec::new() }
    }
}

/// Fills `buf` completely with random bytes.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe the writable slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

impl VirtioDevice for RngDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_driver_features(&mut self, features: u64) {
        self.driver_features = features;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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
            let len = buffers.writable_len().min(MAX_BYTES_PER_REQUEST as u64) as usize;
            self.buffer.resize(len, 0);
            let written = match fill_random(&mut self.buffer)
                .map_err(|err| err.to_string())
                .and_then(|()| buffers.write_at(mem, 0, &self.buffer).map_err(|e| e.to_string()))
            {
                Ok(()) => len as u32,
                Err(err) => {
                    tracing::warn!(%err, "virtio-rng request failed");
                    0
                }
            };
            if let Err(err) = queue.add_used(mem, buffers.head_index(), written) {
                tracing::warn!(?err, "virtio-rng cannot return a descriptor");
            }
            completed += 1;
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
            DeviceRewire::Keep => Ok(()),
            other => Err(DeviceError::RewireMismatch { device: "rng", given: other.kind() }),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
