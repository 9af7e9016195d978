//! Ad-hoc throughput measurement (ignored by default):
//! `FORKD_SNAPSHOT_BENCH_DIR=/var/lib/forkd-bench cargo test --release -p forkd-snapshot --test throughput -- --ignored --nocapture`

mod common;

use common::*;
use forkd_snapshot::*;

#[test]
#[ignore = "writes 512 MiB several times; run by hand"]
fn write_throughput() {
    let dir = std::env::var("FORKD_SNAPSHOT_BENCH_DIR").unwrap_or_else(|_| "/var/lib/forkd-snapshot-bench".into());
    let root = std::path::PathBuf::from(dir).join(format!("run-{}", std::process::id()));
    let store = SnapshotStore::new(&root);
    let pages = 512 * 256; // 512 MiB
    let mut mem = Mem::new(&[(0, pages)]);
    for p in 0..pages {
        mem.fill(p, p as u64 + 1);
    }
    for round in 0..2 {
        for (method, qd) in [(WriteMethod::IoUring, 8), (WriteMethod::IoUring, 32), (WriteMethod::Pwrite, 1)] {
            let t = Take { method: Some(method), queue_depth: Some(qd), ..Default::default() };
            let (snap, report) = take(&store, &mem, t).expect("take");
            let mib = report.info.bytes_written as f64 / (1 << 20) as f64;
            println!(
                "round {round} {method:?} qd {qd}: {mib:.0} MiB in {:.0} ms = {:.0} MiB/s (scan+hash+write+fsync)",
                report.info.write_ms,
                mib / (report.info.write_ms / 1000.0)
            );
            store.remove(snap.id(), false).expect("remove");
        }
    }
    // The scan alone: a diff with nothing changed hashes every page and writes nothing.
    let (base, report) = take(&store, &mem, Take::default()).expect("base");
    let (_, diff) = take(&store, &mem, Take { parent: Some(&base), ..Default::default() }).expect("diff");
    assert_eq!(diff.info.written_pages, 0);
    println!(
        "scan+hash only (empty diff): {:.0} ms = {:.0} MiB/s; full write of the same: {:.0} ms",
        diff.info.write_ms,
        512.0 / (diff.info.write_ms / 1000.0),
        report.info.write_ms
    );
    let _ = std::fs::remove_dir_all(&root);
}
