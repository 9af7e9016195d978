//! Attaching `forkd-virtio` transports to the MMIO bus (filled in once the crate lands).
