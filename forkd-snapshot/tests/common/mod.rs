//! Shared helpers for the integration tests: synthetic guest memory in anonymous mappings,
//! taking snapshots through the public API, and restoring them independently.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use forkd_snapshot::*;

/// An anonymous private mapping (like guest RAM).
pub struct Anon {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Anon {
    pub fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Anon { ptr: ptr.cast(), len }
    }

    pub fn slice(&self) -> &[u8] {
        // SAFETY: our mapping, alive while self is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: our mapping, alive while self is; &mut self gives exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Drops a page (MADV_DONTNEED): it reads as zero again and is no longer resident.
    pub fn discard(&mut self, page: usize) {
        // SAFETY: the page lies in our mapping.
        let rc = unsafe { libc::madvise(self.ptr.add(page * PAGE_SIZE).cast(), PAGE_SIZE, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0);
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Synthetic guest memory: regions (guest address, pages).
pub struct Mem {
    pub regions: Vec<(u64, Anon)>,
}

impl Mem {
    pub fn new(layout: &[(u64, usize)]) -> Self {
        Mem { regions: layout.iter().map(|&(guest, pages)| (guest, Anon::new(pages * PAGE_SIZE))).collect() }
    }

    pub fn guest_regions(&self) -> Vec<GuestRegion> {
        self.regions.iter().map(|(g, a)| GuestRegion { host_addr: a.ptr, len: a.len, guest_addr: *g }).collect()
    }

    pub fn pages(&self) -> usize {
        self.regions.iter().map(|(_, a)| a.len / PAGE_SIZE).sum()
    }

    /// (region, page in region) of a global page index.
    fn locate(&self, mut page: usize) -> (usize, usize) {
        for (i, (_, a)) in self.regions.iter().enumerate() {
            let n = a.len / PAGE_SIZE;
            if page < n {
                return (i, page);
            }
            page -= n;
        }
        panic!("page out of range");
    }

    pub fn page_mut(&mut self, page: usize) -> &mut [u8] {
        let (r, p) = self.locate(page);
        &mut self.regions[r].1.slice_mut()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
    }

    pub fn page(&self, page: usize) -> &[u8] {
        let (r, p) = self.locate(page);
        &self.regions[r].1.slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
    }

    /// Fills a page with a nonzero pattern derived from `seed`.
    pub fn fill(&mut self, page: usize, seed: u64) {
        for (i, chunk) in self.page_mut(page).chunks_exact_mut(8).enumerate() {
            let v = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0xff51_afd7_ed55_8ccd)) | 1;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Writes zeros over a page (it stays resident).
    pub fn zero(&mut self, page: usize) {
        self.page_mut(page).fill(0);
    }

    pub fn discard(&mut self, page: usize) {
        let (r, p) = self.locate(page);
        self.regions[r].1.discard(p);
    }

    /// The memory.bin image: regions concatenated.
    pub fn image(&self) -> Vec<u8> {
        self.regions.iter().flat_map(|(_, a)| a.slice().iter().copied()).collect()
    }

    pub fn nonzero_pages(&self) -> usize {
        (0..self.pages()).filter(|&p| self.page(p).iter().any(|&b| b != 0)).count()
    }
}

pub fn artifact(path: &str) -> Artifact {
    Artifact { path: path.into(), sha256: "00".repeat(32), name: None }
}

/// Options for [`take`].
#[derive(Default)]
pub struct Take<'a> {
    pub tag: Option<&'a str>,
    pub parent: Option<&'a Snapshot>,
    pub method: Option<WriteMethod>,
    pub max_write: Option<usize>,
    pub queue_depth: Option<u32>,
    pub state: Option<&'a [u8]>,
}

/// Takes a snapshot of `mem` into the store, through the public staging API, with a state
/// file, a device file and a hard-linked disk layer.
pub fn take(store: &SnapshotStore, mem: &Mem, t: Take<'_>) -> Result<(Snapshot, MemoryWriteReport)> {
    let id = new_id();
    let staging = Staging::create(store.root(), &id)?;
    let layer = store.root().parent().unwrap_or(Path::new("/")).join(format!("layer-{id}"));
    std::fs::write(&layer, b"disk layer").expect("write layer");
    staging.link_file(&layer, "disk/layer-000")?;
    let mut files = BTreeMap::new();
    files.insert(
        "vm-state.json".to_string(),
        staging.write_file("vm-state.json", t.state.unwrap_or(b"{\"vcpus\":[1]}"))?,
    );
    files.insert("devices.json".to_string(), staging.write_file("devices.json", b"{\"blk\":{}}")?);
    let parent_hashes = match t.parent {
        Some(p) => Some(p.page_hashes()?),
        None => None,
    };
    let defaults = WriteOptions::default();
    let opts = WriteOptions {
        method: t.method,
        queue_depth: t.queue_depth.unwrap_or(defaults.queue_depth),
        max_write: t.max_write.unwrap_or(defaults.max_write),
        progress: None,
    };
    // SAFETY: the regions are our mappings; nothing writes them during the call.
    let report = unsafe { staging.write_memory(&mem.guest_regions(), parent_hashes.as_ref(), &opts) }?;
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        id: id.clone(),
        tag: t.tag.map(str::to_string),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        kind: if t.parent.is_some() { Kind::Diff } else { Kind::Full },
        parent: t.parent.map(|p| p.manifest.id.clone()),
        source: Some("sb-test".into()),
        guest: serde_json::json!({"memory_mib": 1}),
        kernel: artifact("/kernel"),
        image: artifact("/rootfs.ext4"),
        memory: report.info.clone(),
        disk: vec!["layer-000".into()],
        files,
        extra: serde_json::Value::Null,
    };
    let dir = staging.commit(manifest)?;
    assert_eq!(dir, store.root().join(&id));
    let snap = store.get(&id)?;
    Ok((snap, report))
}

pub fn materialize(store: &SnapshotStore, snap: &Snapshot) -> Vec<u8> {
    let mut out = Vec::new();
    let n = store.materialize(snap, &mut out).expect("materialize");
    assert_eq!(n as usize, out.len());
    out
}

/// Applies a restore plan independently of the crate: an anonymous reservation, then each
/// mapping MAP_PRIVATE | MAP_FIXED in order. Returns the image.
pub fn restore_by_plan(store: &SnapshotStore, snap: &Snapshot) -> Vec<u8> {
    let plan = store.restore_plan(snap).expect("restore plan");
    let len = plan.regions.iter().map(|r| r.size as usize).sum::<usize>();
    let reservation = Anon::new(len);
    let files: Vec<std::fs::File> = plan.files.iter().map(|p| std::fs::File::open(p).expect("open")).collect();
    for m in &plan.mappings {
        // SAFETY: MAP_FIXED inside our own reservation.
        let got = unsafe {
            libc::mmap(
                reservation.ptr.add(m.image_offset as usize).cast(),
                m.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                files[m.file].as_raw_fd(),
                m.file_offset as libc::off_t,
            )
        };
        assert_ne!(got, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    }
    reservation.slice().to_vec()
}

/// The data extents of a file, as sets of page indices.
pub fn data_pages(path: &Path) -> Vec<usize> {
    let f = std::fs::File::open(path).expect("open");
    let size = f.metadata().expect("stat").len() as i64;
    let fd = f.as_raw_fd();
    let mut pages = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        // SAFETY: plain syscalls on our descriptor.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        for p in (data as usize / PAGE_SIZE)..(hole as usize).div_ceil(PAGE_SIZE) {
            pages.push(p);
        }
        pos = hole;
    }
    pages
}

/// Entries of the root whose name starts with `prefix`.
pub fn entries_with_prefix(root: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A tempdir with a `snapshots` root below it.
pub fn store() -> (tempfile::TempDir, SnapshotStore) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = SnapshotStore::new(tmp.path().join("snapshots"));
    (tmp, store)
}

/// Copies a directory tree (files and subdirectories), for simulating crash states.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}
