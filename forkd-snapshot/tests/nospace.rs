//! A full filesystem: NoSpace names the file and the space needed; nothing is left behind and
//! earlier snapshots are untouched. Mounts a 1 MiB tmpfs, so it needs root.

mod common;

use std::path::Path;

use common::*;
use forkd_snapshot::*;

struct Mount<'a>(&'a Path);

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn full_filesystem_is_no_space() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and must run as root");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "forkd-test"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(status.success(), "mount tmpfs");
    let _mount = Mount(&mnt);
    let store = SnapshotStore::new(mnt.join("snapshots"));

    // A small snapshot fits (tmpfs: no O_DIRECT, written through the page cache).
    let mut small = Mem::new(&[(0, 8)]);
    small.fill(2, 2);
    let (before, _) = take(&store, &small, Take { tag: Some("before"), ..Default::default() }).expect("small");

    let mut big = Mem::new(&[(0, 512)]); // 2 MiB, all nonzero
    for p in 0..512 {
        big.fill(p, p as u64);
    }
    let staging = Staging::create(store.root(), "snap-big").expect("staging");
    // SAFETY: our mapping; nothing writes it.
    match unsafe { staging.write_memory(&big.guest_regions(), None, &WriteOptions::default()) } {
        Err(SnapshotError::NoSpace { path, needed_bytes, available_bytes }) => {
            assert!(path.ends_with(".tmp-snap-big/memory.bin"), "{}", path.display());
            assert!(needed_bytes >= 2 << 20, "{needed_bytes}");
            assert!(available_bytes < 1 << 20, "{available_bytes}");
        }
        Err(e) => panic!("expected NoSpace, got {e}"),
        Ok(_) => panic!("2 MiB fit on a 1 MiB tmpfs"),
    }
    let err = staging.write_file("big-state.bin", &vec![1u8; 2 << 20]).expect_err("too big");
    assert!(matches!(&err, SnapshotError::NoSpace { path, .. } if path.ends_with("big-state.bin")), "{err}");
    assert!(err.to_string().contains("more bytes needed"), "{err}");
    drop(staging);
    assert!(entries_with_prefix(store.root(), ".tmp-").is_empty(), "staging removed");
    assert_eq!(store.list().expect("list").len(), 1);
    store.verify("before").expect("untouched");
    assert_eq!(materialize(&store, &before), small.image());
}
