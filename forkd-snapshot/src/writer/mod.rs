//! Writing guest memory to `memory.bin` and `memory.pages`.
//!
//! Two passes. The scan asks `mincore(2)` which pages of each region are resident (a page that
//! never was is zero, and reading it would fault it in), hashes every resident page with
//! [`hash_page`], fills the page table and collects the pages to write: nonzero ones, and for
//! a diff only those whose hash differs from the parent's. Contiguous pages coalesce into runs
//! of at most `max_write` bytes. The write pass sends the runs straight from guest memory (no
//! copy) to a file opened `O_DIRECT` where the filesystem allows it, by io_uring with
//! `queue_depth` writes in flight ([`uring`]) or by `pwrite(2)` ([`pwrite`]). Zero and
//! unchanged pages are never written, so they are holes; a final `ftruncate` gives the file
//! its full size and `fsync` makes it durable.
//!
//! `mincore` is only trusted where "not resident" really means "zero": anonymous or shmem
//! memory on a host without swap. Regions backed by a regular file (a VM restored with
//! `MAP_PRIVATE` from an earlier `memory.bin`, whose untouched pages live in the file) and
//! hosts with swap enabled get every page read and hashed instead.

mod pwrite;
mod uring;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Instant;

use crate::error::is_no_space;
use crate::manifest::{MemoryInfo, MemoryRegion, WriteMethod};
use crate::pages::{hash_page, PageHashes, ENTRY_SIZE};
use crate::{sys, Result, SnapshotError, PAGE_SIZE};

/// Guest RAM as the writer sees it: a host pointer range and where it sits in guest-physical
/// space. `host_addr` and `len` must be page-aligned.
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion {
    pub host_addr: *const u8,
    pub len: usize,
    pub guest_addr: u64,
}

// SAFETY: a GuestRegion is only an address range; it is dereferenced solely inside
// `Staging::write_memory`, whose caller guarantees (it is an `unsafe fn`) that the range is
// mapped, readable and not written during the call, from whichever thread makes it.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; shared references to a GuestRegion only ever read the range.
unsafe impl Sync for GuestRegion {}

/// How to write memory.
pub struct WriteOptions<'a> {
    /// `None`: io_uring if it can be set up, else `pwrite` (the reason is recorded in
    /// [`MemoryInfo::fallback_reason`]). `Some(IoUring)` fails if io_uring is unavailable.
    pub method: Option<WriteMethod>,
    /// io_uring writes in flight (default 8).
    pub queue_depth: u32,
    /// Largest single write in bytes, rounded down to whole pages (default 1 MiB).
    pub max_write: usize,
    /// Called with (bytes written, bytes to write) every few MiB and at the end.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

impl std::fmt::Debug for WriteOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteOptions")
            .field("method", &self.method)
            .field("queue_depth", &self.queue_depth)
            .field("max_write", &self.max_write)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl Default for WriteOptions<'_> {
    fn default() -> Self {
        WriteOptions { method: None, queue_depth: 8, max_write: 1 << 20, progress: None }
    }
}

/// The result of [`crate::Staging::write_memory`]: what to put in [`crate::Manifest::memory`],
/// and the page table (the parent of the next diff).
#[derive(Clone, Debug)]
pub struct MemoryWriteReport {
    pub info: MemoryInfo,
    pub hashes: PageHashes,
}

/// Whether non-resident pages may be assumed zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Residency {
    /// Decide per region (mincore where it is exact).
    Auto,
    /// Read and hash every page (the regions are file mappings).
    ReadAll,
}

/// One write: `len` bytes from `ptr` to `file_offset`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub file_offset: u64,
    pub ptr: *const u8,
    pub len: usize,
}

/// Bytes asked for on top of what the write needs (filesystem metadata, the small files and
/// the manifest still to come): 64 KiB plus 1/256 of the data.
fn space_margin(bytes: u64) -> u64 {
    (64 << 10) + bytes / 256
}
/// Report progress at least every this many bytes.
const PROGRESS_STEP: u64 = 4 << 20;
/// The largest single write (the io_uring length field is 32 bits).
const MAX_WRITE_CAP: usize = 1 << 30;
/// Pages per mincore call.
const MINCORE_WINDOW_PAGES: usize = 1 << 16;

/// Progress reporting: counts completed bytes, calls back every [`PROGRESS_STEP`].
pub(crate) struct Progress<'a> {
    callback: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    total: u64,
    done: u64,
    reported: u64,
}

impl<'a> Progress<'a> {
    fn new(callback: Option<&'a (dyn Fn(u64, u64) + Sync)>, total: u64) -> Self {
        Progress { callback, total, done: 0, reported: 0 }
    }

    /// Counts `n` more bytes written.
    pub(crate) fn add(&mut self, n: u64) {
        self.done += n;
        if self.done - self.reported >= PROGRESS_STEP {
            self.report();
        }
    }

    /// Bytes written so far.
    pub(crate) fn done(&self) -> u64 {
        self.done
    }

    fn report(&mut self) {
        self.reported = self.done;
        if let Some(cb) = self.callback {
            cb(self.done, self.total);
        }
    }
}

/// What the scan found.
pub(crate) struct Scan {
    pub hashes: PageHashes,
    pub runs: Vec<Run>,
    pub bytes: u64,
    pub written_pages: u64,
    pub nonzero_pages: u64,
}

/// The `memory.bin` layout of `regions`, checking alignment.
pub(crate) fn layout(regions: &[GuestRegion]) -> Result<Vec<MemoryRegion>> {
    let mut out = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    for (index, r) in regions.iter().enumerate() {
        let bad = |reason: &str| Err(SnapshotError::InvalidRegion { index, reason: reason.to_string() });
        if r.len == 0 {
            return bad("the region is empty");
        }
        if !r.len.is_multiple_of(PAGE_SIZE)
            || !(r.host_addr as usize).is_multiple_of(PAGE_SIZE)
            || !r.guest_addr.is_multiple_of(PAGE_SIZE as u64)
        {
            return bad("host address, guest address and length must be multiples of 4096");
        }
        out.push(MemoryRegion { guest_addr: r.guest_addr, size: r.len as u64, file_offset: offset });
        offset += r.len as u64;
    }
    Ok(out)
}

/// Which address ranges may be trusted to read as zero when `mincore` says "not resident".
struct ResidencyOracle {
    swap_on: bool,
    /// `[start, end)` of mappings backed by a regular file, from /proc/self/maps (None if it
    /// cannot be read, e.g. in a jail without /proc: regions are then assumed anonymous).
    file_backed: Option<Vec<(usize, usize)>>,
}

impl ResidencyOracle {
    fn probe() -> Self {
        let mut info = std::mem::MaybeUninit::<libc::sysinfo>::uninit();
        // SAFETY: `info` is writable memory of the right type.
        let swap_on = if unsafe { libc::sysinfo(info.as_mut_ptr()) } == 0 {
            // SAFETY: sysinfo succeeded, so it filled `info`.
            unsafe { info.assume_init() }.totalswap > 0
        } else {
            true
        };
        let file_backed = std::fs::read_to_string("/proc/self/maps").ok().map(|maps| parse_file_backed(&maps));
        if file_backed.is_none() {
            tracing::debug!("/proc/self/maps unreadable; treating guest memory as anonymous for mincore");
        }
        ResidencyOracle { swap_on, file_backed }
    }

    /// Whether a non-resident page in `[start, start+len)` is certainly zero.
    fn trust_mincore(&self, start: usize, len: usize) -> bool {
        let end = start.saturating_add(len);
        !self.swap_on
            && self.file_backed.as_ref().is_none_or(|ranges| ranges.iter().all(|&(s, e)| e <= start || s >= end))
    }
}

/// The ranges of /proc/self/maps backed by a regular file (not anonymous, shmem or memfd,
/// whose missing pages are zero).
fn parse_file_backed(maps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(_perms), Some(_offset), Some(_dev), Some(inode)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = fields.next().unwrap_or("");
        let anonymous_like = inode == "0"
            || ["/memfd:", "/dev/zero", "/SYSV", "/anon_hugepage", "["].iter().any(|p| path.starts_with(p));
        if anonymous_like {
            continue;
        }
        if let Some((s, e)) = range.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                out.push((s, e));
            }
        }
    }
    out
}

/// Scans the regions: residency, hashes, and the runs to write.
///
/// # Safety
/// Every region must be mapped and readable, and nothing may write it during the call.
pub(crate) unsafe fn scan(
    regions: &[GuestRegion],
    layout: &[MemoryRegion],
    parent: Option<&PageHashes>,
    max_write: usize,
    residency: Residency,
) -> Result<Scan> {
    let pages = layout.iter().map(|r| r.size).sum::<u64>() / PAGE_SIZE as u64;
    let mut hashes = PageHashes::new(pages as usize);
    let oracle = (residency == Residency::Auto).then(ResidencyOracle::probe);
    let mut runs: Vec<Run> = Vec::new();
    let (mut bytes, mut written_pages, mut nonzero_pages) = (0u64, 0u64, 0u64);
    let mut resident = vec![0u8; MINCORE_WINDOW_PAGES];
    for (index, (region, lay)) in regions.iter().zip(layout).enumerate() {
        let trust = oracle.as_ref().is_some_and(|o| o.trust_mincore(region.host_addr as usize, region.len));
        if !trust {
            tracing::debug!(index, "reading every page of guest memory region (non-resident pages may hold data)");
        }
        let first_page = (lay.file_offset / PAGE_SIZE as u64) as usize;
        let region_pages = region.len / PAGE_SIZE;
        let mut window_start = 0;
        while window_start < region_pages {
            let n = (region_pages - window_start).min(MINCORE_WINDOW_PAGES);
            // SAFETY: in bounds of the region (window_start + n <= region_pages).
            let window_ptr = unsafe { region.host_addr.add(window_start * PAGE_SIZE) };
            if trust {
                // SAFETY: the pointer is page-aligned, the range lies in the region and
                // `resident` has one byte per page of it.
                let rc =
                    unsafe { libc::mincore(window_ptr as *mut libc::c_void, n * PAGE_SIZE, resident.as_mut_ptr()) };
                if rc != 0 {
                    return Err(SnapshotError::InvalidRegion {
                        index,
                        reason: format!(
                            "mincore failed ({}): the range is not mapped in this process",
                            io::Error::last_os_error()
                        ),
                    });
                }
            }
            for (j, &res) in resident.iter().enumerate().take(n) {
                let page = first_page + window_start + j;
                // SAFETY: page j of the window lies inside the region.
                let ptr = unsafe { window_ptr.add(j * PAGE_SIZE) };
                let h = if trust && res & 1 == 0 {
                    0
                } else {
                    // SAFETY: the caller guarantees the region is readable and unchanging.
                    hash_page(unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE) })
                };
                if h == 0 {
                    continue;
                }
                hashes.set(page, h);
                nonzero_pages += 1;
                if parent.is_some_and(|p| p.get(page) == h) {
                    continue;
                }
                written_pages += 1;
                bytes += PAGE_SIZE as u64;
                let file_offset = (page * PAGE_SIZE) as u64;
                match runs.last_mut() {
                    // Contiguous in the file and in memory (same region), and room left.
                    Some(run)
                        if run.file_offset + run.len as u64 == file_offset
                            && run.ptr.wrapping_add(run.len) == ptr
                            && run.len + PAGE_SIZE <= max_write =>
                    {
                        run.len += PAGE_SIZE
                    }
                    _ => runs.push(Run { file_offset, ptr, len: PAGE_SIZE }),
                }
            }
            window_start += n;
        }
    }
    Ok(Scan { hashes, runs, bytes, written_pages, nonzero_pages })
}

/// A write failure, before it is turned into a [`SnapshotError`].
pub(crate) struct WriteFailure {
    pub source: io::Error,
    pub offset: u64,
}

/// Opens `memory.bin` for writing, `O_DIRECT` unless the filesystem refuses it (tmpfs).
fn open_memory_file(dir: BorrowedFd<'_>) -> io::Result<(OwnedFd, bool)> {
    let name = sys::c(crate::names::MEMORY)?;
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_NOFOLLOW;
    match sys::openat(dir, &name, flags | libc::O_DIRECT, 0o600) {
        Ok(fd) => Ok((fd, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!("O_DIRECT refused by the filesystem; writing memory.bin through the page cache");
            Ok((sys::openat(dir, &name, flags, 0o600)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Writes `memory.bin` and `memory.pages` into the staging directory `dir` (shown as
/// `display_dir` in messages). Preflight refuses up front when the free space cannot hold the
/// pages to write.
///
/// # Safety
/// Every region must be mapped and readable, and nothing may write it during the call.
pub(crate) unsafe fn write_memory(
    dir: BorrowedFd<'_>,
    display_dir: &Path,
    regions: &[GuestRegion],
    parent: Option<&PageHashes>,
    opts: &WriteOptions<'_>,
    residency: Residency,
    preflight: bool,
) -> Result<MemoryWriteReport> {
    let start = Instant::now();
    let layout = layout(regions)?;
    let image_size: u64 = layout.iter().map(|r| r.size).sum();
    let pages = image_size / PAGE_SIZE as u64;
    if let Some(p) = parent {
        if p.len() as u64 != pages {
            return Err(SnapshotError::ParentMismatch { parent_pages: p.len() as u64, pages });
        }
    }
    let max_write = (opts.max_write.clamp(PAGE_SIZE, MAX_WRITE_CAP) / PAGE_SIZE) * PAGE_SIZE;
    // SAFETY: forwarded from this function's contract.
    let scan = unsafe { scan(regions, &layout, parent, max_write, residency) }?;
    let mem_path = display_dir.join(crate::names::MEMORY);
    let pages_bytes = pages * ENTRY_SIZE as u64;
    let no_space = |remaining: u64| SnapshotError::NoSpace {
        path: mem_path.clone(),
        needed_bytes: remaining + pages_bytes + space_margin(remaining),
        available_bytes: sys::available_bytes(dir).unwrap_or(0),
    };
    if preflight {
        let available = sys::available_bytes(dir).map_err(|e| SnapshotError::io("statvfs of the snapshot root", e))?;
        if scan.bytes + pages_bytes + space_margin(scan.bytes) > available {
            return Err(no_space(scan.bytes));
        }
    }

    let (file, direct) =
        open_memory_file(dir).map_err(|e| SnapshotError::io(format!("create {}", mem_path.display()), e))?;
    let (method, fallback_reason, ring) = match opts.method {
        Some(WriteMethod::Pwrite) => (WriteMethod::Pwrite, None, None),
        Some(WriteMethod::IoUring) => {
            let ring = uring::new_ring(opts.queue_depth).map_err(|e| {
                SnapshotError::io(
                    "io_uring_setup (io_uring was requested; use WriteMethod::Pwrite or let it choose)",
                    e,
                )
            })?;
            (WriteMethod::IoUring, None, Some(ring))
        }
        None => match uring::new_ring(opts.queue_depth) {
            Ok(ring) => (WriteMethod::IoUring, None, Some(ring)),
            Err(e) => {
                tracing::info!(error = %e, "io_uring unavailable; writing memory with pwrite");
                (WriteMethod::Pwrite, Some(format!("io_uring_setup failed: {e}")), None)
            }
        },
    };
    let mut progress = Progress::new(opts.progress, scan.bytes);
    let fd = file.as_raw_fd();
    let result = match ring {
        Some(mut ring) => uring::write_runs(&mut ring, fd, &scan.runs, opts.queue_depth, &mut progress),
        None => pwrite::write_runs(fd, &scan.runs, &mut progress),
    };
    if let Err(f) = result {
        if is_no_space(&f.source) {
            return Err(no_space(scan.bytes.saturating_sub(progress.done())));
        }
        return Err(SnapshotError::io(format!("write {} at offset {}", mem_path.display(), f.offset), f.source));
    }
    progress.report();
    sys::ftruncate(file.as_fd(), image_size)
        .map_err(|e| SnapshotError::io(format!("set the size of {}", mem_path.display()), e))?;
    sys::fsync(file.as_fd()).map_err(|e| {
        if is_no_space(&e) {
            no_space(0)
        } else {
            SnapshotError::io(format!("fsync {}", mem_path.display()), e)
        }
    })?;
    drop(file);
    crate::root::write_file_at(dir, display_dir, crate::names::PAGES, &scan.hashes.to_bytes())?;

    let write_ms = start.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        pages,
        nonzero = scan.nonzero_pages,
        written = scan.written_pages,
        bytes = scan.bytes,
        ?method,
        direct,
        write_ms,
        "wrote {}",
        mem_path.display()
    );
    Ok(MemoryWriteReport {
        info: MemoryInfo {
            page_size: PAGE_SIZE as u64,
            regions: layout,
            pages,
            nonzero_pages: scan.nonzero_pages,
            written_pages: scan.written_pages,
            bytes_written: scan.bytes,
            method,
            fallback_reason,
            write_ms,
        },
        hashes: scan.hashes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parsing() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1234 /usr/bin/x
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 rw-s 00000000 00:01 77 /memfd:guest (deleted)
7f0000200000-7f0000300000 rw-p 00000000 fd:01 99 /var/lib/forkd/snap/memory.bin
7f0000300000-7f0000400000 rw-s 00000000 00:01 5 /dev/zero (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
";
        let ranges = parse_file_backed(maps);
        assert_eq!(ranges, vec![(0x55d0c0000000, 0x55d0c0001000), (0x7f0000200000, 0x7f0000300000)]);
        let oracle = ResidencyOracle { swap_on: false, file_backed: Some(ranges) };
        assert!(oracle.trust_mincore(0x7f0000000000, 0x200000));
        assert!(!oracle.trust_mincore(0x7f0000100000, 0x101000));
        assert!(!ResidencyOracle { swap_on: true, file_backed: None }.trust_mincore(0x7f0000000000, 4096));
    }

    #[test]
    fn layout_checks() {
        let ok = GuestRegion { host_addr: 0x10000 as *const u8, len: 8192, guest_addr: 0 };
        let l = layout(&[ok, GuestRegion { guest_addr: 1 << 32, ..ok }]).ok();
        assert_eq!(l.map(|l| l[1].file_offset), Some(8192));
        for bad in [
            GuestRegion { len: 0, ..ok },
            GuestRegion { len: 100, ..ok },
            GuestRegion { host_addr: 0x10001 as *const u8, ..ok },
        ] {
            assert!(matches!(layout(&[ok, bad]), Err(SnapshotError::InvalidRegion { index: 1, .. })));
        }
    }

    /// ENOSPC in the middle of writing (preflight off), on a 1 MiB tmpfs.
    #[test]
    fn enospc_during_write_is_no_space() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and must run as root");
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mnt = tmp.path().join("small");
        std::fs::create_dir(&mnt).unwrap_or_else(|e| panic!("mkdir: {e}"));
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "forkd-test", &mnt.to_string_lossy()])
            .status()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(status.success(), "mount tmpfs failed");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(&mnt);

        let len = 2 << 20;
        let mut mem = vec![0u8; len + PAGE_SIZE];
        let off = mem.as_ptr().align_offset(PAGE_SIZE);
        for (i, b) in mem[off..off + len].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let region = GuestRegion { host_addr: mem[off..].as_ptr(), len, guest_addr: 0 };
        let dir = sys::open_dir(&mnt).unwrap_or_else(|e| panic!("open: {e}"));
        for method in [WriteMethod::Pwrite, WriteMethod::IoUring] {
            let opts = WriteOptions { method: Some(method), ..Default::default() };
            // SAFETY: `mem` is ours, mapped and unchanged during the call.
            let r = unsafe { write_memory(dir.as_fd(), &mnt, &[region], None, &opts, Residency::ReadAll, false) };
            match r {
                Err(SnapshotError::NoSpace { path, needed_bytes, available_bytes }) => {
                    assert_eq!(path, mnt.join("memory.bin"));
                    assert!(needed_bytes > 0 && available_bytes < (1 << 20), "{needed_bytes} {available_bytes}");
                }
                Err(e) => panic!("{method:?}: expected NoSpace, got {e}"),
                Ok(_) => panic!("{method:?}: 2 MiB fit on a 1 MiB tmpfs"),
            }
        }
    }
}
