//! Memory round trips: full snapshots, holes, both writers, diff chains, compaction, file
//! mappings.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use forkd_snapshot::*;

const GIB4: u64 = 1 << 32;

/// Memory with every kind of page: never touched, touched but zero, patterned, and one whose
/// only nonzero byte is the last.
fn sample_mem() -> Mem {
    let mut mem = Mem::new(&[(0, 48), (GIB4, 16)]);
    for p in [0, 1, 2, 3, 10, 11, 12, 20, 47, 48, 50, 63] {
        mem.fill(p, p as u64 + 1);
    }
    mem.zero(5); // resident, all zero
    mem.zero(49);
    mem.page_mut(30)[PAGE_SIZE - 1] = 0x5a; // only the last byte
    mem
}

#[test]
fn full_snapshot_round_trips() {
    let (_tmp, store) = store();
    let mem = sample_mem();
    let (snap, report) = take(&store, &mem, Take { tag: Some("base"), ..Default::default() }).expect("take");
    let nonzero = mem.nonzero_pages() as u64;
    assert_eq!(nonzero, 13);
    let info = &snap.manifest.memory;
    assert_eq!((info.pages, info.nonzero_pages, info.written_pages), (64, nonzero, nonzero));
    assert_eq!(info.bytes_written, nonzero * PAGE_SIZE as u64);
    assert_eq!(info.regions[1], MemoryRegion { guest_addr: GIB4, size: 16 * 4096, file_offset: 48 * 4096 });
    assert_eq!(report.hashes.nonzero() as u64, nonzero);
    assert_eq!(report.hashes.get(30), hash_page(mem.page(30)));
    assert_eq!(report.hashes.get(5), 0);
    assert_eq!(snap.manifest.kind, Kind::Full);
    assert_eq!(snap.manifest.tag.as_deref(), Some("base"));
    assert!(snap.manifest.files.contains_key("memory.pages") && snap.manifest.files.contains_key("vm-state.json"));
    assert_eq!(PageHashes::read(&snap.dir.join("memory.pages")).expect("pages"), report.hashes);

    let image = mem.image();
    assert_eq!(materialize(&store, &snap), image, "materialize");
    assert_eq!(restore_by_plan(&store, &snap), image, "restore plan");
    let plan = store.restore_plan(&snap).expect("plan");
    assert_eq!(plan.files, vec![snap.dir.join("memory.bin")]);
    assert_eq!(plan.mappings.len(), 2, "one base mapping per region: {:?}", plan.mappings);

    // RestorePlan::map_into over per-region reservations.
    let a = Anon::new(48 * PAGE_SIZE);
    let b = Anon::new(16 * PAGE_SIZE);
    // SAFETY: both bases are our own mappings of the right sizes.
    unsafe { plan.map_into(&[a.ptr, b.ptr], libc::PROT_READ | libc::PROT_WRITE) }.expect("map_into");
    assert_eq!([a.slice(), b.slice()].concat(), image);

    store.check_for_restore(&snap).expect("check");
    let v = store.verify("base").expect("verify");
    assert_eq!(v.pages_checked, 64);
    assert_eq!(v.bytes_read, nonzero * PAGE_SIZE as u64, "holes are not read");
    assert_eq!(v.files_checked, 3, "vm-state.json, devices.json, memory.bin");
    assert_eq!(store.get(snap.id()).expect("by id"), snap);
    assert_eq!(store.list().expect("list"), vec![snap]);
}

#[test]
fn zero_pages_are_holes() {
    let (_tmp, store) = store();
    let mem = sample_mem();
    let (snap, _) = take(&store, &mem, Take::default()).expect("take");
    let path = snap.dir.join("memory.bin");
    let expected: Vec<usize> = (0..mem.pages()).filter(|&p| mem.page(p).iter().any(|&b| b != 0)).collect();
    assert_eq!(data_pages(&path), expected);
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(meta.len(), 64 * PAGE_SIZE as u64);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 <= (expected.len() as u64 + 4) * PAGE_SIZE as u64, "blocks {}", meta.blocks());
}

#[test]
fn io_uring_and_pwrite_write_identical_files() {
    let (_tmp, store) = store();
    let mut mem = Mem::new(&[(0, 300), (GIB4, 40)]);
    for p in (0..340).filter(|p| p % 7 != 3 && p % 50 != 0) {
        mem.fill(p, p as u64 * 31);
    }
    let mut snaps = Vec::new();
    for (method, max_write, qd) in
        [(WriteMethod::IoUring, 8192, 3), (WriteMethod::Pwrite, 8192, 1), (WriteMethod::IoUring, 1 << 20, 8)]
    {
        let t = Take { method: Some(method), max_write: Some(max_write), queue_depth: Some(qd), ..Default::default() };
        let (snap, _) = take(&store, &mem, t).expect("take");
        assert_eq!(snap.manifest.memory.method, method);
        assert_eq!(snap.manifest.memory.fallback_reason, None);
        snaps.push(snap);
    }
    let read = |s: &Snapshot, f: &str| std::fs::read(s.dir.join(f)).expect("read");
    for s in &snaps[1..] {
        assert!(read(s, "memory.bin") == read(&snaps[0], "memory.bin"), "memory.bin differs");
        assert_eq!(read(s, "memory.pages"), read(&snaps[0], "memory.pages"));
        assert_eq!(data_pages(&s.dir.join("memory.bin")), data_pages(&snaps[0].dir.join("memory.bin")));
    }
    assert_eq!(materialize(&store, &snaps[1]), mem.image());
}

#[test]
fn diff_chain_matches_full_and_compacts() {
    let (_tmp, store) = store();
    let mut mem = sample_mem();
    let (s0, _) = take(&store, &mem, Take { tag: Some("base"), ..Default::default() }).expect("s0");
    let image0 = mem.image();

    // 1: two pages change, one is zeroed in place, one discarded (becomes non-resident zero),
    // one new page.
    mem.fill(1, 1001);
    mem.fill(2, 1002);
    mem.zero(3);
    mem.discard(10);
    mem.fill(40, 1040);
    let (s1, r1) = take(&store, &mem, Take { parent: Some(&s0), ..Default::default() }).expect("s1");
    let image1 = mem.image();
    assert_eq!(s1.manifest.kind, Kind::Diff);
    assert_eq!(s1.manifest.parent.as_deref(), Some(s0.id()));
    assert_eq!(r1.info.written_pages, 3, "only the changed nonzero pages are written");
    assert_eq!(s1.manifest.memory.nonzero_pages, mem.nonzero_pages() as u64);
    assert_eq!(data_pages(&s1.dir.join("memory.bin")), vec![1, 2, 40]);

    // 2: a page changes again, a zeroed page comes back, a page in the second region changes.
    mem.fill(1, 2001);
    mem.fill(3, 2003);
    mem.fill(50, 2050);
    let (s2, r2) = take(&store, &mem, Take { parent: Some(&s1), ..Default::default() }).expect("s2");
    let image2 = mem.image();
    assert_eq!(r2.info.written_pages, 3);

    // 3: a page becomes zero, a new one in the second region, the first page changes.
    mem.zero(11);
    mem.fill(60, 3060);
    mem.fill(0, 3000);
    let (s3, _) = take(&store, &mem, Take { parent: Some(&s2), tag: Some("top"), ..Default::default() }).expect("s3");
    let image3 = mem.image();
    let (full, _) = take(&store, &mem, Take::default()).expect("full");

    let chain: Vec<String> = store.chain(&s3).expect("chain").iter().map(|s| s.id().to_string()).collect();
    assert_eq!(chain, vec![s0.id(), s1.id(), s2.id(), s3.id()]);
    assert_eq!(materialize(&store, &full), image3);
    assert_eq!(materialize(&store, &s3), image3);
    assert_eq!(restore_by_plan(&store, &s3), image3);
    assert_eq!(materialize(&store, &s2), image2);
    assert_eq!(restore_by_plan(&store, &s1), image1);
    assert_eq!(materialize(&store, &s0), image0);
    assert_eq!(s3.page_hashes().expect("pages"), full.page_hashes().expect("pages"));
    store.check_for_restore(&s3).expect("check");
    let v = store.verify("top").expect("verify");
    assert_eq!(v.files_checked, 4 * 3);
    assert_eq!(v.pages_checked, 64 + 5 + 3 + 3, "the base's pages, then each diff's changed pages");
    assert_eq!(store.dependents("base").expect("deps"), vec![s1.id(), s2.id(), s3.id()]);

    // Compaction: same id, tag, bytes; the intermediate snapshots are untouched.
    let compacted = store.compact("top").expect("compact");
    assert_eq!(compacted.id(), s3.id());
    assert_eq!(compacted.manifest.tag.as_deref(), Some("top"));
    assert_eq!((compacted.manifest.kind, compacted.manifest.parent.as_deref()), (Kind::Full, None));
    assert_eq!(compacted.manifest.created_unix_ms, s3.manifest.created_unix_ms);
    assert_eq!(compacted.manifest.memory.written_pages, mem.nonzero_pages() as u64);
    assert_eq!(compacted.manifest.files["vm-state.json"], s3.manifest.files["vm-state.json"]);
    assert_eq!(store.chain(&compacted).expect("chain").len(), 1);
    assert_eq!(materialize(&store, &compacted), image3);
    assert_eq!(restore_by_plan(&store, &compacted), image3);
    assert_eq!(std::fs::read(compacted.dir.join("memory.bin")).expect("read"), image3);
    store.verify("top").expect("verify compacted");
    assert_eq!(materialize(&store, &s2), image2);
    assert!(entries_with_prefix(store.root(), ".").is_empty(), "no leftovers after compaction");
    assert!(store.dependents("top").expect("deps").is_empty());
    // Compacting a full snapshot is a no-op.
    assert_eq!(store.compact("top").expect("again"), compacted);

    // A diff on the compacted snapshot restores.
    mem.fill(7, 4007);
    mem.discard(0);
    let (s4, r4) = take(&store, &mem, Take { parent: Some(&compacted), ..Default::default() }).expect("s4");
    assert_eq!(r4.info.written_pages, 1);
    assert_eq!(materialize(&store, &s4), mem.image());
    assert_eq!(restore_by_plan(&store, &s4), mem.image());
    store.check_for_restore(&s4).expect("check s4");
}

/// Regions mapped from a file (a VM restored with MAP_PRIVATE): pages that are not in the page
/// cache hold data, so they must be read, not taken as zero.
#[test]
fn file_backed_regions_are_read_not_assumed_zero() {
    let (tmp, store) = store();
    let path = tmp.path().join("backing.bin");
    let pages = 32;
    let mut content = vec![0u8; pages * PAGE_SIZE];
    for (i, b) in content.iter_mut().enumerate().filter(|(i, _)| !(i / PAGE_SIZE).is_multiple_of(3)) {
        *b = (i % 253) as u8 + 1;
    }
    std::fs::write(&path, &content).expect("write");
    let file = std::fs::File::open(&path).expect("open");
    file.sync_all().expect("fsync");
    // Evict the file's pages so mincore reports them not resident.
    // SAFETY: plain syscall on our descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    // SAFETY: a fresh private mapping of our file.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), content.len(), libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0)
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    let mut resident = vec![0u8; pages];
    // SAFETY: our mapping; `resident` has one byte per page.
    assert_eq!(unsafe { libc::mincore(ptr, content.len(), resident.as_mut_ptr()) }, 0);
    assert!(resident.iter().any(|r| r & 1 == 0), "the test needs pages that are not in the page cache");
    let region = GuestRegion { host_addr: ptr.cast(), len: content.len(), guest_addr: 0 };
    let staging = Staging::create(store.root(), "snap-filebacked").expect("staging");
    // SAFETY: our read-only mapping; nothing writes it.
    let report = unsafe { staging.write_memory(&[region], None, &WriteOptions::default()) }.expect("write");
    assert_eq!(report.info.nonzero_pages as usize, (0..pages).filter(|p| !p.is_multiple_of(3)).count());
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        id: "snap-filebacked".into(),
        tag: None,
        created_unix_ms: 1,
        kind: Kind::Full,
        parent: None,
        source: None,
        guest: serde_json::Value::Null,
        kernel: artifact("/k"),
        image: artifact("/i"),
        memory: report.info,
        disk: vec![],
        files: Default::default(),
        extra: serde_json::Value::Null,
    };
    staging.commit(manifest).expect("commit");
    // SAFETY: unmapping our mapping.
    unsafe { libc::munmap(ptr, content.len()) };
    let snap = store.get("snap-filebacked").expect("get");
    assert_eq!(materialize(&store, &snap), content);
}

#[test]
fn progress_is_reported_and_parent_must_match() {
    let (_tmp, store) = store();
    let mut mem = Mem::new(&[(0, 4096)]); // 16 MiB
    for p in 0..4096 {
        mem.fill(p, p as u64);
    }
    let calls = AtomicU64::new(0);
    let last = AtomicU64::new(0);
    let progress = |done: u64, total: u64| {
        assert_eq!(total, 16 << 20);
        assert!(done <= total);
        calls.fetch_add(1, Ordering::Relaxed);
        last.store(done, Ordering::Relaxed);
    };
    let staging = Staging::create(store.root(), "snap-progress").expect("staging");
    let opts = WriteOptions { progress: Some(&progress), ..Default::default() };
    // SAFETY: our mappings; nothing writes them.
    let report = unsafe { staging.write_memory(&mem.guest_regions(), None, &opts) }.expect("write");
    assert!(calls.load(Ordering::Relaxed) >= 4, "{} calls", calls.load(Ordering::Relaxed));
    assert_eq!(last.load(Ordering::Relaxed), 16 << 20);
    assert!(report.info.write_ms > 0.0);

    let wrong_parent = PageHashes::new(10);
    // SAFETY: as above.
    let r = unsafe { staging.write_memory(&mem.guest_regions(), Some(&wrong_parent), &opts) };
    assert!(matches!(r, Err(SnapshotError::ParentMismatch { parent_pages: 10, pages: 4096 })));
    drop(staging);
    assert!(entries_with_prefix(store.root(), ".tmp-").is_empty(), "dropping a staging removes it");
}

/// Pages that were never touched are zero without being read (mincore), so the writer does
/// not fault them in. Only checkable without swap (with swap every page is read).
#[test]
fn untouched_pages_are_not_faulted_in() {
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    if swaps.lines().count() > 1 {
        println!("swap is enabled: the writer reads every page; nothing to check");
        return;
    }
    let (_tmp, store) = store();
    let mut mem = Mem::new(&[(0, 64)]);
    mem.fill(1, 1);
    take(&store, &mem, Take::default()).expect("take");
    let mut resident = vec![0u8; 64];
    let a = &mem.regions[0].1;
    // SAFETY: our mapping; `resident` has one byte per page.
    assert_eq!(unsafe { libc::mincore(a.ptr.cast(), a.len, resident.as_mut_ptr()) }, 0);
    assert_eq!(resident[1] & 1, 1);
    assert_eq!(resident.iter().filter(|&&r| r & 1 == 1).count(), 1, "{resident:?}");
}
