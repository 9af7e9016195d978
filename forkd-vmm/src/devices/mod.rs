//! Devices built into the VMM itself. virtio devices live in the `forkd-virtio` crate and are
//! attached to the MMIO bus through `virtio_mmio`.

pub mod serial;
pub mod virtio_mmio;
