//! Layered copy-on-write disks.
//!
//! A disk is a read-only base image plus a chain of layers, bottom to top. Every layer is a
//! sparse file of the disk's full size; a 4 KiB block belongs to a layer exactly when that
//! layer's file has data allocated there. Only the top layer is written. Presence is
//! recovered on open with `SEEK_DATA`/`SEEK_HOLE`, so there is no separate metadata that could
//! disagree with the data after a crash (see docs/formats.md).
//!
//! BRANCH freezes the top layer and gives parent and children each a new empty top layer over
//! the same frozen chain: O(1), nothing copied. Frozen layers are shared through hard links in
//! each sandbox's directory, so the filesystem's link count is the reference count.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Granularity of copy-on-write.
pub const BLOCK_SIZE: u64 = 4096;

/// Owner of a block: 0 is the base image, `n` is layer `n - 1`.
type Owner = u16;
const BASE: Owner = 0;
/// Deepest chain we accept (the owner map stores layer numbers in 16 bits).
pub const MAX_LAYERS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk layer {path} is {actual} bytes, expected {expected} (the base image size)")]
    LayerSize { path: PathBuf, actual: u64, expected: u64 },
    #[error("disk image {path} is empty or not a multiple of 512 bytes ({size} bytes)")]
    BaseSize { path: PathBuf, size: u64 },
    #[error("disk layer chain is deeper than {MAX_LAYERS}; compact the sandbox's disk")]
    TooDeep,
    #[error("the disk has no writable layer (a read-only disk cannot be branched)")]
    NoWritableLayer,
    #[error("scanning disk layer {path}: {source}")]
    Scan { path: PathBuf, source: io::Error },
}

struct Layer {
    file: File,
    path: PathBuf,
}

/// A base image plus copy-on-write layers.
pub struct LayeredDisk {
    base: File,
    base_path: PathBuf,
    size: u64,
    /// Layers bottom to top; the last one is writable.
    layers: Vec<Layer>,
    /// For each block, which layer (or the base) holds its current contents.
    owner: Vec<Owner>,
}

fn open(path: &Path, write: bool) -> Result<File, DiskError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| DiskError::Open { path: path.into(), source })
}

impl LayeredDisk {
    /// Opens `base` read-only and `layers` (bottom to top); the top layer is opened for writing
    /// and created if missing.
    pub fn open(base: &Path, layers: &[PathBuf]) -> Result<Self, DiskError> {
        if layers.len() >= MAX_LAYERS {
            return Err(DiskError::TooDeep);
        }
        let base_file = open(base, false)?;
        let size = base_file.metadata().map_err(|source| DiskError::Open { path: base.into(), source })?.len();
        if size == 0 || size % 512 != 0 {
            return Err(DiskError::BaseSize { path: base.into(), size });
        }
        let blocks = size.div_ceil(BLOCK_SIZE) as usize;
        let mut disk = LayeredDisk {
            base: base_file,
            base_path: base.into(),
            size,
            layers: Vec::new(),
            owner: vec![BASE; blocks],
        };
        for (i, path) in layers.iter().enumerate() {
            let top = i + 1 == layers.len();
            if top && !path.exists() {
                create_layer(path, size)?;
            }
            disk.push_layer(path, top)?;
        }
        Ok(disk)
    }

    fn push_layer(&mut self, path: &Path, writable: bool) -> Result<(), DiskError> {
        let file = open(path, writable)?;
        let actual = file.metadata().map_err(|source| DiskError::Open { path: path.into(), source })?.len();
        if actual != self.size {
            return Err(DiskError::LayerSize { path: path.into(), actual, expected: self.size });
        }
        let number = (self.layers.len() + 1) as Owner;
        for (start, end) in
            data_extents(&file, self.size).map_err(|source| DiskError::Scan { path: path.into(), source })?
        {
            let first = (start / BLOCK_SIZE) as usize;
            let last = (end.div_ceil(BLOCK_SIZE) as usize).min(self.owner.len());
            for owner in &mut self.owner[first.min(last)..last] {
                *owner = number;
            }
        }
        self.layers.push(Layer { file, path: path.into() });
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are possible (a disk with no layers is the bare read-only base).
    pub fn read_only(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn base_path(&self) -> &Path {
        &self.base_path
    }

    /// Layer paths bottom to top.
    pub fn layer_paths(&self) -> Vec<PathBuf> {
        self.layers.iter().map(|l| l.path.clone()).collect()
    }

    fn source(&self, owner: Owner) -> &File {
        match owner {
            BASE => &self.base,
            n => &self.layers[n as usize - 1].file,
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "access beyond the end of the disk")),
        }
    }

    /// Reads `buf.len()` bytes at `offset`, from whichever layer owns each block.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = (pos / BLOCK_SIZE) as usize;
            let owner = self.owner[block];
            // Extend the run over following blocks with the same owner: one pread per run.
            let mut run_end = (block as u64 + 1) * BLOCK_SIZE;
            let mut next = block + 1;
            while run_end < offset + buf.len() as u64 && self.owner.get(next) == Some(&owner) {
                run_end += BLOCK_SIZE;
                next += 1;
            }
            let n = ((run_end.min(offset + buf.len() as u64)) - pos) as usize;
            self.source(owner).read_exact_at(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the top layer, copying up partially written blocks.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.layers.is_empty() {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "disk is read-only"));
        }
        self.check_range(offset, buf.len())?;
        let top = self.layers.len() as Owner;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = (pos / BLOCK_SIZE) as usize;
            let block_start = block as u64 * BLOCK_SIZE;
            let block_end = (block_start + BLOCK_SIZE).min(self.size);
            let n = ((block_end - pos) as usize).min(buf.len() - done);
            let whole = pos == block_start && n as u64 == block_end - block_start;
            if self.owner[block] == top || whole {
                self.layers[top as usize - 1].file.write_all_at(&buf[done..done + n], pos)?;
            } else {
                // Copy up: the block lives below; write it whole so presence stays exact.
                let mut tmp = vec![0u8; (block_end - block_start) as usize];
                self.source(self.owner[block]).read_exact_at(&mut tmp, block_start)?;
                let at = (pos - block_start) as usize;
                tmp[at..at + n].copy_from_slice(&buf[done..done + n]);
                self.layers[top as usize - 1].file.write_all_at(&tmp, block_start)?;
            }
            self.owner[block] = top;
            done += n;
        }
        Ok(())
    }

    /// Makes written data durable.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.layers.last() {
            Some(top) => top.file.sync_data(),
            None => Ok(()),
        }
    }

    /// BRANCH in the source: freezes the top layer and continues on a new empty layer next to
    /// it (`layer-NNN`, NNN = depth). The frozen layer is never written again, so children can
    /// share it.
    pub fn branch_point(&mut self) -> Result<(), DiskError> {
        if self.layers.len() + 1 >= MAX_LAYERS {
            return Err(DiskError::TooDeep);
        }
        let top = self.layers.last_mut().ok_or(DiskError::NoWritableLayer)?;
        let dir = top.path.parent().map(Path::to_path_buf).unwrap_or_default();
        // Reopen read-only: the frozen layer must never be written again.
        top.file = open(&top.path, false)?;
        let next = dir.join(layer_name(self.layers.len()));
        create_layer(&next, self.size)?;
        let file = open(&next, true)?;
        self.layers.push(Layer { file, path: next });
        Ok(())
    }

    /// BRANCH in a child: hard-links every frozen layer into `dir` (the filesystem's link
    /// count then keeps them alive as long as any sandbox uses them) and replaces the top,
    /// which is the source's new layer, with a new empty layer of the child's own. Returns
    /// the child's chain, bottom to top.
    pub fn adopt_in_child(&mut self, dir: &Path) -> Result<Vec<PathBuf>, DiskError> {
        std::fs::create_dir_all(dir).map_err(|source| DiskError::Open { path: dir.into(), source })?;
        let depth = self.layers.len();
        for layer in self.layers.iter_mut().take(depth.saturating_sub(1)) {
            let name = layer.path.file_name().map(PathBuf::from).unwrap_or_default();
            let link = dir.join(name);
            if link != layer.path {
                match std::fs::hard_link(&layer.path, &link) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(DiskError::Open { path: link, source }),
                }
                layer.path = link;
            }
        }
        let top = dir.join(layer_name(depth.saturating_sub(1)));
        create_layer(&top, self.size)?;
        let file = open(&top, true)?;
        match self.layers.last_mut() {
            Some(last) => *last = Layer { file, path: top },
            None => return Err(DiskError::NoWritableLayer),
        }
        Ok(self.layer_paths())
    }
}

/// Name of the `n`-th layer (from the bottom) of a disk chain.
pub fn layer_name(n: usize) -> String {
    format!("layer-{n:03}")
}

/// A disk shared between its virtio-blk device and the VMM (which freezes and re-tops it on
/// BRANCH). Only the event-loop thread touches it, so the lock is uncontended.
pub struct SharedDisk(pub std::sync::Arc<std::sync::Mutex<LayeredDisk>>);

impl forkd_virtio::DiskBackend for SharedDisk {
    fn size(&self) -> u64 {
        crate::bus::lock(&self.0).size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::bus::lock(&self.0).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        crate::bus::lock(&self.0).write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        crate::bus::lock(&self.0).flush()
    }
    fn read_only(&self) -> bool {
        crate::bus::lock(&self.0).read_only()
    }
}

impl forkd_virtio::DiskBackend for LayeredDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        LayeredDisk::read_at(self, buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        LayeredDisk::write_at(self, buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        LayeredDisk::flush(self)
    }
    fn read_only(&self) -> bool {
        LayeredDisk::read_only(self)
    }
}

/// Creates an empty sparse layer of `size` bytes (fails if it exists).
pub fn create_layer(path: &Path, size: u64) -> Result<(), DiskError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| DiskError::Open { path: path.into(), source })?;
    file.set_len(size).map_err(|source| DiskError::Open { path: path.into(), source })
}

/// Allocated byte ranges of a file, via `SEEK_DATA`/`SEEK_HOLE`.
fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a valid fd owned by `file`; no memory is touched.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            return Err(err);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        extents.push((start as u64, end as u64));
        pos = end;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path, size: usize) -> PathBuf {
        let path = dir.join("base.img");
        let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    fn read(disk: &LayeredDisk, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        disk.read_at(&mut buf, off).unwrap();
        buf
    }

    #[test]
    fn writes_go_to_the_top_and_reads_fall_through() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 16 * 4096);
        let mut disk = LayeredDisk::open(&b, &[dir.path().join("l0")]).unwrap();
        assert_eq!(read(&disk, 4096 * 3, 4), vec![3; 4]);
        // A partial write copies the rest of the block up from the base.
        disk.write_at(&[0xaa; 10], 4096 * 3 + 100).unwrap();
        let blk = read(&disk, 4096 * 3, 4096);
        assert_eq!(&blk[..100], &[3; 100][..]);
        assert_eq!(&blk[100..110], &[0xaa; 10][..]);
        assert_eq!(&blk[110..], &[3; 3986][..]);
        // A write spanning blocks, read back across owners.
        disk.write_at(&[0xbb; 5000], 4096 * 5 + 4000).unwrap();
        let span = read(&disk, 4096 * 5, 3 * 4096);
        assert_eq!(&span[..4000], &[5; 4000][..]);
        assert_eq!(&span[4000..9000], &[0xbb; 5000][..]);
        assert_eq!(&span[9000..], &[7; 3288][..]);
        // The base is untouched.
        assert_eq!(std::fs::read(&b).unwrap()[4096 * 3 + 100], 3);
    }

    #[test]
    fn presence_survives_reopen_without_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 8 * 4096);
        let l0 = dir.path().join("l0");
        {
            let mut disk = LayeredDisk::open(&b, std::slice::from_ref(&l0)).unwrap();
            disk.write_at(&[0; 4096], 4096 * 2).unwrap(); // zeros are data too
            disk.write_at(&[9; 1], 4096 * 6).unwrap();
            disk.flush().unwrap();
        }
        let disk = LayeredDisk::open(&b, &[l0]).unwrap();
        assert_eq!(read(&disk, 4096 * 2, 4096), vec![0; 4096]);
        assert_eq!(read(&disk, 4096 * 6, 2), vec![9, 6]);
        assert_eq!(read(&disk, 4096, 1), vec![1]);
    }

    #[test]
    fn freeze_gives_independent_tops_over_a_shared_chain() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 8 * 4096);
        let pdir = dir.path().join("parent");
        std::fs::create_dir(&pdir).unwrap();
        let l0 = pdir.join(layer_name(0));
        let mut parent = LayeredDisk::open(&b, std::slice::from_ref(&l0)).unwrap();
        parent.write_at(&[1; 4096], 0).unwrap();
        parent.branch_point().unwrap();
        assert_eq!(parent.layer_paths(), vec![l0.clone(), pdir.join("layer-001")]);
        // What a forked child does with its copy of the disk.
        let mut child = LayeredDisk::open(&b, &parent.layer_paths()).unwrap();
        let chain = child.adopt_in_child(&dir.path().join("child")).unwrap();
        assert_eq!(chain, vec![dir.path().join("child/layer-000"), dir.path().join("child/layer-001")]);
        // The frozen layer is shared by hard link, not copied.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&l0).unwrap().ino(), std::fs::metadata(&chain[0]).unwrap().ino());
        parent.write_at(&[2; 4096], 0).unwrap();
        child.write_at(&[3; 4096], 4096).unwrap();
        assert_eq!(read(&parent, 0, 1), vec![2]);
        assert_eq!(read(&parent, 4096, 1), vec![1]);
        assert_eq!(read(&child, 0, 1), vec![1]);
        assert_eq!(read(&child, 4096, 1), vec![3]);
        // The frozen layer stayed as it was at the freeze, and outlives the parent's files.
        std::fs::remove_dir_all(&pdir).unwrap();
        let frozen = LayeredDisk::open(&b, &[chain[0].clone(), dir.path().join("probe-top")]).unwrap();
        assert_eq!(read(&frozen, 0, 1), vec![1]);
        assert_eq!(read(&frozen, 4096, 1), vec![1]);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 4 * 4096);
        let mut disk = LayeredDisk::open(&b, &[dir.path().join("l0")]).unwrap();
        assert!(disk.write_at(&[0; 10], 4 * 4096 - 5).is_err());
        let mut buf = [0u8; 8];
        assert!(disk.read_at(&mut buf, u64::MAX - 2).is_err());
        let ro = LayeredDisk::open(&b, &[]).unwrap();
        assert!(ro.read_only());
        std::fs::write(dir.path().join("short"), b"x").unwrap();
        assert!(matches!(LayeredDisk::open(&b, &[dir.path().join("short")]), Err(DiskError::LayerSize { .. })));
        assert!(matches!(LayeredDisk::open(Path::new("/no/such"), &[]), Err(DiskError::Open { .. })));
    }
}
