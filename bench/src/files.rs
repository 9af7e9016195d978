//! `forkd-bench files`: file transfer into and out of a sandbox, MB/s each way per size
//! (incompressible data, checked byte for byte after the round trip).

use crate::stats::table;
use crate::{host_description, write_results, Bench};
use anyhow::Result;
use forkd_core::SandboxSpec;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// Deterministic incompressible bytes (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn bench_files(out: &Path, sizes: &[String]) -> Result<()> {
    let bench = Bench::new()?;
    eprintln!("booting a sandbox...");
    // Room in the guest's /tmp (tmpfs, half of RAM) for the largest file.
    let largest = sizes.iter().map(|s| forkd_core::size::parse_mib("size", s)).collect::<Result<Vec<_>, _>>()?;
    let memory_mib = (largest.iter().copied().max().unwrap_or(0) * 3).max(256);
    let sandbox = bench.client.create(SandboxSpec { memory_mib, ..Default::default() })?;
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for (size, mib) in sizes.iter().zip(largest) {
        let data = noise((mib << 20) as usize);
        let started = Instant::now();
        bench.client.write_file(&sandbox.id, "/tmp/bench", 0o644, &mut data.as_slice())?;
        let write = started.elapsed();
        let started = Instant::now();
        let mut back = Vec::with_capacity(data.len());
        bench.client.read_file(&sandbox.id, "/tmp/bench", &mut back)?;
        let read = started.elapsed();
        anyhow::ensure!(back == data, "{size}: the file read back differs from the one written");
        let rate = |d: std::time::Duration| data.len() as f64 / 1e6 / d.as_secs_f64();
        eprintln!("{size}: write {:.2} MB/s, read {:.2} MB/s", rate(write), rate(read));
        rows.push(vec![size.clone(), format!("{:.2}", rate(write)), format!("{:.2}", rate(read))]);
        results.push(json!({"size": size, "write_mb_s": rate(write), "read_mb_s": rate(read),
            "write_ms": write.as_secs_f64() * 1000.0, "read_ms": read.as_secs_f64() * 1000.0}));
    }
    bench.client.destroy(&sandbox.id)?;
    let md = format!(
        "## File transfer\n\nhost: {}\n\n{}",
        host_description(),
        table(&["size", "write MB/s", "read MB/s"], &rows)
    );
    println!("{md}");
    let stem = write_results(out, "files", &json!({"host": host_description(), "sizes": results}), &md)?;
    eprintln!("results: {}.{{json,md}}", stem.display());
    Ok(())
}
