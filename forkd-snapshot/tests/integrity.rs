//! Integrity and store management: damage detection, schema versions, dependents, tags,
//! leftovers and interrupted compaction swaps.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use forkd_snapshot::*;

fn small_mem(seed: u64) -> Mem {
    let mut mem = Mem::new(&[(0, 16), (1 << 32, 8)]);
    for p in [0, 2, 3, 9, 15, 16, 20] {
        mem.fill(p, seed + p as u64);
    }
    mem
}

fn checksum_file(e: &SnapshotError) -> String {
    match e {
        SnapshotError::Checksum { file, .. } => file.to_string_lossy().into_owned(),
        other => panic!("expected Checksum, got {other}"),
    }
}

#[test]
fn corrupted_memory_page_is_named() {
    let (_tmp, store) = store();
    let mem = small_mem(1);
    let (snap, _) = take(&store, &mem, Take::default()).expect("take");
    use std::os::unix::fs::MetadataExt;
    let verified_ino = || std::fs::metadata(snap.dir.join("verified.json")).expect("verified.json").ino();
    let committed = verified_ino();
    store.check_for_restore(&snap).expect("intact");
    assert_eq!(verified_ino(), committed, "the commit's verified.json vouched: no page check, no rewrite");
    store.verify(snap.id()).expect("intact");
    assert_ne!(verified_ino(), committed, "a full check rewrites verified.json");
    let verified = std::fs::read_to_string(snap.dir.join("verified.json")).expect("verified.json");
    assert!(verified.contains("\"ino\"") && verified.contains("memory_pages_xxh3"), "{verified}");

    // Let the clock move so the write gets a new mtime even on coarse-timestamp filesystems.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = std::fs::OpenOptions::new().write(true).open(snap.dir.join("memory.bin")).expect("open");
    // Page 20 is the fifth page of the second region (guest 4 GiB + 16 KiB).
    f.write_all_at(&[0xff], 20 * PAGE_SIZE as u64 + 100).expect("corrupt");
    drop(f);
    for err in [store.check_for_restore(&snap).expect_err("damage"), store.verify(snap.id()).expect_err("damage")] {
        assert!(checksum_file(&err).ends_with("memory.bin"), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("page 20") && msg.contains("0x100004000"), "{msg}");
    }

    // Data written into a hole is found too.
    let (snap2, _) = take(&store, &mem, Take::default()).expect("take");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = std::fs::OpenOptions::new().write(true).open(snap2.dir.join("memory.bin")).expect("open");
    f.write_all_at(&[1], 5 * PAGE_SIZE as u64).expect("corrupt");
    drop(f);
    let err = store.check_for_restore(&snap2).expect_err("damage");
    assert!(err.to_string().contains("page 5 (guest address 0x5000)"), "{err}");
}

#[test]
fn corrupted_state_file_is_named() {
    let (_tmp, store) = store();
    let (snap, _) =
        take(&store, &small_mem(2), Take { state: Some(b"{\"regs\":[1,2,3]}"), ..Default::default() }).expect("take");
    std::fs::write(snap.dir.join("vm-state.json"), b"{\"regs\":[1,2,4]}").expect("corrupt");
    let err = store.check_for_restore(&snap).expect_err("damage");
    assert!(checksum_file(&err).ends_with("vm-state.json"), "{err}");
    std::fs::write(snap.dir.join("vm-state.json"), b"{}").expect("truncate");
    let err = store.verify(snap.id()).expect_err("damage");
    assert!(checksum_file(&err).ends_with("vm-state.json") && err.to_string().contains("bytes"), "{err}");
    std::fs::remove_file(snap.dir.join("vm-state.json")).expect("rm");
    assert!(err_is_missing(&store.check_for_restore(&snap).expect_err("missing")));
    // A damaged page table is named too.
    let (snap2, _) = take(&store, &small_mem(3), Take::default()).expect("take");
    let f = std::fs::OpenOptions::new().write(true).open(snap2.dir.join("memory.pages")).expect("open");
    f.write_all_at(&[0xee], 3).expect("corrupt");
    let err = store.check_for_restore(&snap2).expect_err("damage");
    assert!(checksum_file(&err).ends_with("memory.pages"), "{err}");
}

fn err_is_missing(e: &SnapshotError) -> bool {
    matches!(e, SnapshotError::Checksum { file, detail } if file.ends_with("vm-state.json") && detail.contains("missing"))
}

#[test]
fn newer_schema_is_refused() {
    let (_tmp, store) = store();
    let (snap, _) = take(&store, &small_mem(4), Take { tag: Some("future"), ..Default::default() }).expect("take");
    let path = snap.dir.join("snapshot.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    v["schema_version"] = serde_json::json!(2);
    std::fs::write(&path, serde_json::to_vec(&v).expect("json")).expect("write");
    for key in [snap.id(), "future"] {
        match store.get(key) {
            Err(SnapshotError::UnknownSchema { path: p, version: 2 }) => assert_eq!(p, path),
            Err(e) => panic!("expected UnknownSchema, got {e}"),
            Ok(_) => panic!("a newer schema was accepted"),
        }
    }
    assert!(store.list().expect("list").is_empty(), "list skips what it cannot read");
}

#[test]
fn dependents_block_removal_unless_cascade() {
    let (_tmp, store) = store();
    let mut mem = small_mem(5);
    let (s0, _) = take(&store, &mem, Take { tag: Some("base"), ..Default::default() }).expect("s0");
    mem.fill(1, 99);
    let (s1, _) = take(&store, &mem, Take { parent: Some(&s0), ..Default::default() }).expect("s1");
    mem.fill(4, 98);
    let (s2, _) = take(&store, &mem, Take { parent: Some(&s1), ..Default::default() }).expect("s2");
    let (other, _) = take(&store, &mem, Take::default()).expect("other");

    assert_eq!(store.dependents(s0.id()).expect("deps"), vec![s1.id(), s2.id()]);
    assert_eq!(store.dependents(s1.id()).expect("deps"), vec![s2.id()]);
    match store.remove("base", false) {
        Err(SnapshotError::HasDependents { id, dependents }) => {
            assert_eq!(id, s0.id());
            assert_eq!(dependents, vec![s1.id(), s2.id()]);
        }
        other => panic!("expected HasDependents, got {:?}", other.map_err(|e| e.to_string())),
    }
    assert_eq!(store.list().expect("list").len(), 4, "nothing removed");
    assert_eq!(store.remove(s2.id(), false).expect("leaf"), vec![s2.id()]);
    assert_eq!(store.remove("base", true).expect("cascade"), vec![s1.id(), s0.id()]);
    let left: Vec<String> = store.list().expect("list").iter().map(|s| s.id().to_string()).collect();
    assert_eq!(left, vec![other.id().to_string()]);
    assert!(matches!(store.get("base"), Err(SnapshotError::NotFound { .. })));
    assert!(entries_with_prefix(store.root(), ".").is_empty());
}

#[test]
fn missing_parent_is_named() {
    let (_tmp, store) = store();
    let mut mem = small_mem(6);
    let (s0, _) = take(&store, &mem, Take::default()).expect("s0");
    mem.fill(1, 7);
    let (s1, _) = take(&store, &mem, Take { parent: Some(&s0), ..Default::default() }).expect("s1");
    let s0_hashes = s0.page_hashes().expect("hashes");
    std::fs::remove_dir_all(&s0.dir).expect("rm parent");
    match store.chain(&s1) {
        Err(SnapshotError::NotFound { tag_or_id }) => assert_eq!(tag_or_id, s0.id()),
        other => panic!("expected NotFound, got {:?}", other.map(|c| c.len()).map_err(|e| e.to_string())),
    }
    assert!(matches!(store.check_for_restore(&s1), Err(SnapshotError::NotFound { .. })));
    // A diff on a parent that is gone is refused at commit.
    let staging = Staging::create(store.root(), "snap-orphan").expect("staging");
    // SAFETY: our mappings; nothing writes them.
    let report = unsafe { staging.write_memory(&mem.guest_regions(), Some(&s0_hashes), &WriteOptions::default()) }
        .expect("write");
    let mut m = s1.manifest.clone();
    m.id = "snap-orphan".into();
    m.memory = report.info;
    m.files.clear();
    m.disk.clear();
    match staging.commit(m) {
        Err(SnapshotError::NotFound { tag_or_id }) => assert_eq!(tag_or_id, s0.id()),
        other => panic!("expected NotFound, got {:?}", other.map_err(|e| e.to_string())),
    }
    assert!(entries_with_prefix(store.root(), ".tmp-").is_empty());
}

#[test]
fn tags_are_unique() {
    let (_tmp, store) = store();
    let mem = small_mem(7);
    let (s0, _) = take(&store, &mem, Take { tag: Some("py3"), ..Default::default() }).expect("s0");
    match take(&store, &mem, Take { tag: Some("py3"), ..Default::default() }) {
        Err(SnapshotError::TagExists { tag }) => assert_eq!(tag, "py3"),
        other => panic!("expected TagExists, got {:?}", other.map(|_| ()).map_err(|e| e.to_string())),
    }
    assert!(entries_with_prefix(store.root(), ".tmp-").is_empty(), "the refused staging is removed");
    assert_eq!(store.list().expect("list").len(), 1);
    assert!(matches!(
        take(&store, &mem, Take { tag: Some("Bad Tag"), ..Default::default() }),
        Err(SnapshotError::InvalidName { .. })
    ));
    assert!(matches!(Staging::create(store.root(), s0.id()), Err(SnapshotError::IdExists { .. })));
    assert!(matches!(Staging::create(store.root(), "../escape"), Err(SnapshotError::InvalidName { .. })));
    let staging = Staging::create(store.root(), "snap-names").expect("staging");
    for bad in ["memory.bin", "snapshot.json", "../x", ".hidden"] {
        assert!(matches!(staging.write_file(bad, b"x"), Err(SnapshotError::InvalidName { .. })), "{bad}");
    }
    staging.write_file("state/nested.json", b"{}").expect("nested names are fine");
    // Committing without memory is refused (and removes the staging directory).
    let mut m = s0.manifest.clone();
    m.id = "snap-names".into();
    m.tag = None;
    assert!(matches!(staging.commit(m), Err(SnapshotError::InvalidManifest { .. })));
    assert!(entries_with_prefix(store.root(), ".tmp-").is_empty());
}

#[test]
fn cleanup_removes_dead_leftovers_only() {
    let (_tmp, store) = store();
    let (snap, _) = take(&store, &small_mem(8), Take::default()).expect("take");
    let live = Staging::create(store.root(), "snap-live").expect("live staging");
    live.write_file("vm-state.json", b"{}").expect("write");
    let dead = store.root().join(".tmp-snap-dead");
    std::fs::create_dir_all(dead.join("disk")).expect("mkdir");
    std::fs::write(dead.join("memory.bin"), b"partial").expect("write");
    let removing = store.root().join(".del-snap-gone");
    std::fs::create_dir(&removing).expect("mkdir");

    let list: Vec<String> = store.list().expect("list").iter().map(|s| s.id().to_string()).collect();
    assert_eq!(list, vec![snap.id().to_string()], "staging directories are never listed");
    let mut cleaned = store.cleanup_leftovers().expect("cleanup");
    cleaned.sort();
    assert_eq!(cleaned, vec![removing.clone(), dead.clone()]);
    assert!(!dead.exists() && !removing.exists());
    assert!(store.root().join(".tmp-snap-live").exists(), "a live writer's staging is kept");
    live.abort();
    assert!(!store.root().join(".tmp-snap-live").exists());
    assert!(store.cleanup_leftovers().expect("cleanup").is_empty());
    store.verify(snap.id()).expect("untouched");
}

#[test]
fn interrupted_compaction_swap_is_repaired() {
    let (_tmp, store) = store();
    let mut mem = small_mem(9);
    let (s0, _) = take(&store, &mem, Take::default()).expect("s0");
    mem.fill(1, 11);
    let (s1, _) = take(&store, &mem, Take { parent: Some(&s0), tag: Some("t"), ..Default::default() }).expect("s1");
    let image = mem.image();
    let root = store.root().to_path_buf();
    let id = s1.id().to_string();
    let (old, tmp) = (root.join(format!(".old-{id}")), root.join(format!(".tmp-{id}")));

    // Crash between the two renames: <id> is missing, .old-<id> and a complete .tmp-<id> exist.
    std::fs::rename(&s1.dir, &old).expect("rename");
    copy_tree(&old, &tmp);
    assert!(matches!(store.get("t"), Err(SnapshotError::NotFound { .. })));
    let handled = store.cleanup_leftovers().expect("cleanup");
    assert_eq!(handled, vec![old.clone(), tmp.clone()]);
    assert!(!old.exists() && !tmp.exists());
    let back = store.get("t").expect("rolled back");
    assert_eq!(back, s1);
    store.verify("t").expect("verify");
    assert_eq!(materialize(&store, &back), image);

    // Crash after the second rename: the old copy is left behind.
    let compacted = store.compact("t").expect("compact");
    copy_tree(&s1.dir, &old);
    assert_eq!(store.cleanup_leftovers().expect("cleanup"), vec![old.clone()]);
    assert!(!old.exists());
    assert_eq!(store.get("t").expect("get"), compacted);
    assert_eq!(materialize(&store, &compacted), image);

    // Crash before the first rename: only an unlocked staging copy.
    copy_tree(&compacted.dir, &tmp);
    assert_eq!(store.cleanup_leftovers().expect("cleanup"), vec![tmp.clone()]);
    store.verify("t").expect("verify");
}

/// The launcher stages and links, the (jailed) writer works from the two descriptors only.
#[test]
fn launcher_hands_descriptors_to_writer() {
    let (tmp, store) = store();
    let mut mem = small_mem(10);
    mem.fill(7, 70);
    let launcher = Staging::create(store.root(), "snap-handoff").expect("launcher");
    let layer = tmp.path().join("frozen-layer");
    std::fs::write(&layer, b"layer").expect("layer");
    launcher.link_file(&layer, "disk/layer-000").expect("link");

    // Another open of the directory does not get the lock while the launcher holds it.
    let other = std::fs::File::open(store.root().join(".tmp-snap-handoff")).expect("open");
    let root2 = launcher.root_fd().try_clone_to_owned().expect("dup");
    assert!(matches!(Staging::from_fds(root2, other.into(), "snap-handoff"), Err(SnapshotError::Busy { .. })));
    // Descriptors that do not belong to the id are refused.
    let (root3, dir3) =
        (launcher.root_fd().try_clone_to_owned().expect("dup"), launcher.dir_fd().try_clone_to_owned().expect("dup"));
    assert!(matches!(Staging::from_fds(root3, dir3, "snap-other"), Err(SnapshotError::Io { .. })));
    assert!(store.root().join(".tmp-snap-handoff").exists(), "refused writers do not remove the directory");

    let (root_fd, dir_fd) =
        (launcher.root_fd().try_clone_to_owned().expect("dup"), launcher.dir_fd().try_clone_to_owned().expect("dup"));
    let writer = Staging::from_fds(root_fd, dir_fd, "snap-handoff").expect("writer");
    assert_eq!(writer.id(), "snap-handoff");
    let state = writer.write_file("vm-state.json", b"{}").expect("state");
    // SAFETY: our mappings; nothing writes them.
    let report = unsafe { writer.write_memory(&mem.guest_regions(), None, &WriteOptions::default()) }.expect("memory");
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        id: "snap-handoff".into(),
        tag: Some("handed".into()),
        created_unix_ms: 5,
        kind: Kind::Full,
        parent: None,
        source: None,
        guest: serde_json::json!({}),
        kernel: artifact("/k"),
        image: artifact("/i"),
        memory: report.info,
        disk: vec!["layer-000".into()],
        files: [("vm-state.json".to_string(), state)].into_iter().collect(),
        extra: serde_json::json!({"note": "x"}),
    };
    assert_eq!(writer.commit(manifest).expect("commit"), store.root().join("snap-handoff"));
    drop(launcher); // after the commit: nothing to remove
    let snap = store.get("handed").expect("get");
    assert_eq!(snap.manifest.extra["note"], "x");
    store.verify("handed").expect("verify");
    assert_eq!(materialize(&store, &snap), mem.image());
    assert!(entries_with_prefix(store.root(), ".").is_empty());

    // into_fds: the launcher lets go; a dead writer leaves the directory to cleanup.
    let launcher = Staging::create(store.root(), "snap-abandoned").expect("launcher");
    let (root_fd, dir_fd) = launcher.into_fds().expect("fds");
    assert!(store.cleanup_leftovers().expect("cleanup").is_empty(), "still locked by the open descriptor");
    drop((root_fd, dir_fd));
    assert_eq!(store.cleanup_leftovers().expect("cleanup"), vec![store.root().join(".tmp-snap-abandoned")]);
}
