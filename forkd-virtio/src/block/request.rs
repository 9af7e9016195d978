//! Execution of one virtio-blk request (virtio 1.1, section 5.2.6).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

use super::DiskBackend;
use crate::chain::ChainBuffers;
use crate::GuestMemoryMmap;

pub const SECTOR_SIZE: u64 = 512;
/// type (le32), reserved (le32), sector (le64).
const HEADER_SIZE: u64 = 16;
/// Data moves through a bounded bounce buffer, whatever length the guest claims.
pub const CHUNK_SIZE: usize = 128 * 1024;

pub type DiskId = [u8; VIRTIO_BLK_ID_BYTES as usize];

/// The disk a request runs against.
pub struct Disk<'a> {
    pub backend: &'a mut dyn DiskBackend,
    pub id: &'a DiskId,
    pub bounce: &'a mut Vec<u8>,
}

/// Runs the request in `chain` and writes its status byte.
///
/// Returns the number of bytes written into the chain's writable buffers
/// (the used length), 0 if not even a status byte could be written.
pub fn execute(chain: &ChainBuffers, mem: &GuestMemoryMmap, disk: Disk) -> u32 {
    if chain.writable_len() == 0 {
        tracing::warn!("virtio-blk request without a status byte");
        return 0;
    }
    let status_offset = chain.writable_len() - 1;
    let (status, data_written) = match run(chain, mem, disk, status_offset) {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(status) => (status, 0),
    };
    if let Err(err) = chain.write_at(mem, status_offset, &[status as u8]) {
        tracing::warn!(%err, "cannot write virtio-blk status");
        return 0;
    }
    // Chains of many descriptors can exceed 4 GiB in total; saturate.
    u32::try_from(data_written + 1).unwrap_or(u32::MAX)
}

/// Returns the number of data bytes written to the guest, or a failure status.
fn run(chain: &ChainBuffers, mem: &GuestMemoryMmap, disk: Disk, data_in_len: u64) -> Result<u64, u32> {
    if !chain.is_well_ordered() || chain.readable_len() < HEADER_SIZE {
        tracing::warn!("malformed virtio-blk request");
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    chain.read_at(mem, 0, &mut header).map_err(|_| VIRTIO_BLK_S_IOERR)?;
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    match request_type {
        VIRTIO_BLK_T_IN => {
            let offset = checked_range(disk.backend.size(), sector, data_in_len)?;
            read_disk(chain, mem, disk, offset, data_in_len)?;
            Ok(data_in_len)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.backend.read_only() {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            let len = chain.readable_len() - HEADER_SIZE;
            let offset = checked_range(disk.backend.size(), sector, len)?;
            write_disk(chain, mem, disk, offset, len)?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.backend.flush().map_err(|err| {
                tracing::warn!(%err, "virtio-blk flush failed");
                VIRTIO_BLK_S_IOERR
            })?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let len = data_in_len.min(disk.id.len() as u64) as usize;
            chain.write_at(mem, 0, &disk.id[..len]).map_err(|_| VIRTIO_BLK_S_IOERR)?;
            Ok(len as u64)
        }
        other => {
            tracing::debug!(request_type = other, "unsupported virtio-blk request");
            Err(VIRTIO_BLK_S_UNSUPP)
        }
    }
}

/// Byte offset of `sector` if `len` bytes from there fit on the disk.
fn checked_range(disk_size: u64, sector: u64, len: u64) -> Result<u64, u32> {
    let capacity = disk_size - disk_size % SECTOR_SIZE;
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(VIRTIO_BLK_S_IOERR)?;
    let end = offset.checked_add(len).ok_or(VIRTIO_BLK_S_IOERR)?;
    if end > capacity {
        tracing::debug!(sector, len, capacity, "virtio-blk request beyond the disk");
        return Err(VIRTIO_BLK_S_IOERR);
    }
    Ok(offset)
}

fn read_disk(chain: &ChainBuffers, mem: &GuestMemoryMmap, disk: Disk, offset: u64, len: u64) -> Result<(), u32> {
    let mut done = 0u64;
    while done < len {
        let step = (len - done).min(CHUNK_SIZE as u64) as usize;
        disk.bounce.resize(step, 0);
        disk.backend.read_at(&mut disk.bounce[..step], offset + done).map_err(|err| {
            tracing::warn!(%err, "virtio-blk read failed");
            VIRTIO_BLK_S_IOERR
        })?;
        chain.write_at(mem, done, &disk.bounce[..step]).map_err(|_| VIRTIO_BLK_S_IOERR)?;
        done += step as u64;
    }
    Ok(())
}

fn write_disk(chain: &ChainBuffers, mem: &GuestMemoryMmap, disk: Disk, offset: u64, len: u64) -> Result<(), u32> {
    let mut done = 0u64;
    while done < len {
        let step = (len - done).min(CHUNK_SIZE as u64) as usize;
        disk.bounce.resize(step, 0);
        chain.read_at(mem, HEADER_SIZE + done, &mut disk.bounce[..step]).map_err(|_| VIRTIO_BLK_S_IOERR)?;
        disk.backend.write_at(&disk.bounce[..step], offset + done).map_err(|err| {
            tracing::warn!(%err, "virtio-blk write failed");
            VIRTIO_BLK_S_IOERR
        })?;
        done += step as u64;
    }
    Ok(())
}
