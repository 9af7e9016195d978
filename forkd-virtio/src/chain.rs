//! Access to the guest buffers of one descriptor chain.
//!
//! Devices never assume a particular framing of requests over descriptors
//! (virtio 1.x drivers may split or merge buffers freely), so a chain is
//! flattened into a readable byte area followed by a writable byte area.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError};

use crate::GuestMemoryMmap;

/// Guest buffer access failed (descriptor points outside guest memory, or
/// the offset lies beyond the chain's buffers).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error("access of {len} bytes at offset {offset} exceeds the chain's {available} bytes")]
    OutOfBounds { offset: u64, len: usize, available: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// The flattened buffers of a popped descriptor chain.
#[derive(Debug)]
pub struct ChainBuffers {
    head_index: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    /// False when a readable descriptor follows a writable one (forbidden by the spec).
    well_ordered: bool,
}

impl ChainBuffers {
    /// Walks the chain (including indirect tables) and records its buffers.
    pub fn new<M>(chain: DescriptorChain<M>) -> Self
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let head_index = chain.head_index();
        let mut buffers = ChainBuffers {
            head_index,
            readable: Vec::new(),
            writable: Vec::new(),
            readable_len: 0,
            writable_len: 0,
            well_ordered: true,
        };
        for desc in chain {
            let segment = Segment { addr: desc.addr(), len: desc.len() };
            if desc.is_write_only() {
                buffers.writable_len += u64::from(segment.len);
                buffers.writable.push(segment);
            } else {
                if !buffers.writable.is_empty() {
                    buffers.well_ordered = false;
                }
                buffers.readable_len += u64::from(segment.len);
                buffers.readable.push(segment);
            }
        }
        buffers
    }

    pub fn head_index(&self) -> u16 {
        self.head_index
    }

    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    pub fn is_well_ordered(&self) -> bool {
        self.well_ordered
    }

    /// Fills `buf` from the readable area starting at `offset`.
    pub fn read_at(&self, mem: &GuestMemoryMmap, offset: u64, buf: &mut [u8]) -> Result<(), ChainError> {
        let mut done = 0usize;
        for (addr, len) in locate(&self.readable, self.readable_len, offset, buf.len())? {
            mem.read_slice(&mut buf[done..done + len], addr)?;
            done += len;
        }
        Ok(())
    }

    /// Copies `data` into the writable area starting at `offset`.
    pub fn write_at(&self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let mut done = 0usize;
        for (addr, len) in locate(&self.writable, self.writable_len, offset, data.len())? {
            mem.write_slice(&data[done..done + len], addr)?;
            done += len;
        }
        Ok(())
    }
}

/// Maps `[offset, offset + len)` of a flattened area onto guest address pieces.
fn locate(segments: &[Segment], total: u64, offset: u64, len: usize) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    let out_of_bounds = || ChainError::OutOfBounds { offset, len, available: total };
    let end = offset.checked_add(len as u64).ok_or_else(out_of_bounds)?;
    if end > total {
        return Err(out_of_bounds());
    }
    let mut pieces = Vec::new();
    let mut skip = offset;
    let mut remaining = len as u64;
    for segment in segments {
        if remaining == 0 {
            break;
        }
        let seg_len = u64::from(segment.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(remaining);
        let addr = segment.addr.checked_add(skip).ok_or_else(out_of_bounds)?;
        // `take` <= `len`, which is a usize.
        pieces.push((addr, take as usize));
        remaining -= take;
        skip = 0;
    }
    Ok(pieces)
}
