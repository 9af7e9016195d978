//! Disk backends: where a virtio-blk device's sectors live on the host.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Storage behind a virtio-blk device. Calls are synchronous: a request is
/// complete when the call returns, so nothing is ever in flight at fork time.
pub trait DiskBackend: Send {
    /// Size in bytes (the device exposes `size / 512` sectors).
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; the range is within `size()`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`; the range is within `size()`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes previous writes durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Read-only backends are advertised with VIRTIO_BLK_F_RO.
    fn read_only(&self) -> bool;
}

/// A raw disk image in a host file, accessed with pread/pwrite.
#[derive(Debug)]
pub struct RawFileDisk {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawFileDisk {
    /// Opens the image at `path` (read-write unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file, read_only)
    }

    /// Wraps an already opened image; its current length is the disk size.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(RawFileDisk { file, size, read_only })
    }
}

impl DiskBackend for RawFileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}
