//! `forkd-bench snapshot`: durable snapshots against BRANCH, the classic file snapshot and the
//! disk itself, per guest memory size with the guest dirtying memory: the source's pause, bytes
//! written (full and diff), the frozen copy's write bandwidth next to `dd oflag=direct` on the
//! same disk, restore time (host side to vCPUs running, and to a ready agent, from a warm and
//! a dropped page cache), and 100 sandboxes from one snapshot.

use crate::stats::{ms, summarize, table, Summary};
use crate::{dump_pause, host_description, start_dirtier, vmm_running_ms, write_results, Bench};
use anyhow::{Context, Result};
use forkd_core::{BranchOptions, SandboxId, SandboxSpec, SnapshotOptions};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

struct Row {
    memory: String,
    branch: Summary,
    snapshot: Summary,
    full_mib: f64,
    full_write_ms: f64,
    diff_mib: Summary,
    writer_mib_s: f64,
    dd_mib_s: f64,
    file_snapshot_ms: f64,
    restore_host: Summary,
    restore_ready: Summary,
    restore_cold_host_ms: f64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// `dd if=/dev/zero oflag=direct` of `mib` MiB into `dir`: MiB/s.
fn dd_direct(dir: &Path, mib: u64) -> Result<f64> {
    let target = dir.join("forkd-bench-dd");
    let started = Instant::now();
    let status = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", &format!("count={mib}"), "oflag=direct", "conv=fsync", "status=none"])
        .arg(format!("of={}", target.display()))
        .status()
        .context("running dd")?;
    let took = started.elapsed();
    let _ = std::fs::remove_file(&target);
    anyhow::ensure!(status.success(), "dd failed: {status}");
    Ok(mib as f64 / took.as_secs_f64())
}

fn drop_page_cache() -> Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache (run as root)")
}

/// Restores one sandbox from `tag`: (host side to vCPUs running, to a ready agent).
fn restore_once(bench: &Bench, tag: &str) -> Result<(Duration, Duration, SandboxId)> {
    let started_ns = forkd_vmm::control::monotonic_ns();
    let started = Instant::now();
    let sandbox = bench.client.create_from_snapshot(tag, 1)?.remove(0);
    let ready = started.elapsed();
    let running = vmm_running_ms(&bench.state.path().join("sandboxes"), std::slice::from_ref(&sandbox), started_ns);
    let host = running.first().map(|ms| Duration::from_secs_f64(ms / 1000.0)).context("the restored VMM's status")?;
    Ok((host, ready, sandbox.id))
}

pub fn bench_snapshot(out: &Path, memories: &[String], rounds: usize, fanout: u32) -> Result<()> {
    let bench = Bench::new()?;
    let disk = bench.state.path().to_path_buf();
    let mut rows = Vec::new();
    for memory in memories {
        let mib_size = forkd_core::size::parse_mib("memory", memory)?;
        eprintln!("booting a {memory} source...");
        let source = bench.client.create(SandboxSpec { memory_mib: mib_size, ..Default::default() })?;
        start_dirtier(&bench, &source.id, mib_size)?;
        let mut branch = Vec::new();
        for _ in 0..rounds {
            let result = bench.client.branch(&source.id, &BranchOptions::count(1))?;
            branch.push(result.pause);
            bench.client.destroy(&result.children[0].id)?;
        }
        let (mut pauses, mut diffs) = (Vec::new(), Vec::new());
        let mut last_full = None;
        for round in 0..rounds {
            let full = bench.client.snapshot(&source.id, &SnapshotOptions { wait: true, ..Default::default() })?;
            pauses.push(full.pause);
            let diff =
                bench.client.snapshot(&source.id, &SnapshotOptions { diff: true, wait: true, ..Default::default() })?;
            pauses.push(diff.pause);
            let diff_info = bench.client.snapshot_info(&diff.id)?;
            diffs.push(Duration::from_secs_f64(mib(diff_info.memory_bytes) / 1000.0));
            if let Some(previous) = last_full.replace(full.id.clone()) {
                bench.client.remove_snapshot(&previous, true)?;
            }
            eprintln!(
                "{memory} round {}: snapshot pause {:?}, diff {:.1} MiB",
                round + 1,
                full.pause,
                mib(diff_info.memory_bytes)
            );
        }
        let tag = last_full.context("no snapshot taken")?;
        let info = bench.client.snapshot_info(&tag)?;
        let writer_mib_s = mib(info.memory_bytes) / (info.write_ms / 1000.0);
        let dd_mib_s = dd_direct(&disk, (mib(info.memory_bytes).ceil() as u64).max(64))?;
        let file_snapshot = dump_pause(&bench, &source.id, &disk.join("forkd-bench-memory"))?;
        bench.client.destroy(&source.id)?;

        let (mut host, mut ready) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (h, r, id) = restore_once(&bench, &tag)?;
            host.push(h);
            ready.push(r);
            bench.client.destroy(&id)?;
        }
        drop_page_cache()?;
        let (cold_host, _, id) = restore_once(&bench, &tag)?;
        bench.client.destroy(&id)?;
        bench.client.remove_snapshot(&tag, true)?;
        rows.push(Row {
            memory: memory.clone(),
            branch: summarize(&branch),
            snapshot: summarize(&pauses),
            full_mib: mib(info.memory_bytes),
            full_write_ms: info.write_ms,
            // Stored as "ms" only to reuse the percentile code: the values are MiB.
            diff_mib: summarize(&diffs),
            writer_mib_s,
            dd_mib_s,
            file_snapshot_ms: file_snapshot.as_secs_f64() * 1000.0,
            restore_host: summarize(&host),
            restore_ready: summarize(&ready),
            restore_cold_host_ms: cold_host.as_secs_f64() * 1000.0,
        });
    }

    eprintln!("fan-out: {fanout} sandboxes from one snapshot...");
    let source = bench.client.create(SandboxSpec::default())?;
    let snap = bench.client.snapshot(&source.id, &SnapshotOptions { wait: true, ..Default::default() })?;
    bench.client.destroy(&source.id)?;
    let started_ns = forkd_vmm::control::monotonic_ns();
    let started = Instant::now();
    let sandboxes = bench.client.create_from_snapshot(&snap.id, fanout)?;
    let all_ready = started.elapsed();
    let running = vmm_running_ms(&bench.state.path().join("sandboxes"), &sandboxes, started_ns);
    let all_running = (running.len() == sandboxes.len()).then(|| running.last().copied()).flatten();
    std::thread::sleep(Duration::from_secs(1));
    let pss: Vec<u64> =
        sandboxes.iter().filter_map(|s| bench.client.memory_usage(&s.id).ok()).map(|m| m.pss_kib).collect();
    let pss_avg = pss.iter().sum::<u64>() as f64 / pss.len().max(1) as f64 / 1024.0;
    for s in &sandboxes {
        bench.client.destroy(&s.id)?;
    }
    bench.client.remove_snapshot(&snap.id, true)?;

    let main = table(
        &[
            "guest memory",
            "BRANCH pause p50 ms",
            "snapshot pause p50 ms",
            "p90 ms",
            "full snapshot MiB written",
            "diff MiB written p50",
            "writer MiB/s",
            "dd oflag=direct MiB/s",
            "file snapshot pause ms",
        ],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.memory.clone(),
                    ms(r.branch.p50_ms),
                    ms(r.snapshot.p50_ms),
                    ms(r.snapshot.p90_ms),
                    format!("{:.1}", r.full_mib),
                    format!("{:.1}", r.diff_mib.p50_ms),
                    format!("{:.0} ({:.0} ms)", r.writer_mib_s, r.full_write_ms),
                    format!("{:.0}", r.dd_mib_s),
                    ms(r.file_snapshot_ms),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let restore = table(
        &["guest memory", "restore to vCPUs running p50 ms", "p90 ms", "cold page cache ms", "to agent-ready p50 ms"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.memory.clone(),
                    ms(r.restore_host.p50_ms),
                    ms(r.restore_host.p90_ms),
                    ms(r.restore_cold_host_ms),
                    ms(r.restore_ready.p50_ms),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let fan = table(
        &["sandboxes from one snapshot", "all VMMs running ms", "all agent-ready ms", "PSS per idle sandbox MiB"],
        &[vec![
            fanout.to_string(),
            all_running.map(ms).unwrap_or_else(|| "-".into()),
            ms(all_ready.as_secs_f64() * 1000.0),
            format!("{pss_avg:.2}"),
        ]],
    );
    let md = format!(
        "## Durable snapshots\n\nhost: {}\n\n{rounds} rounds per size (a full and a diff snapshot each), guest dirtying memory:\n\n{main}\nrestore ({rounds} rounds, then one after dropping the page cache):\n\n{restore}\n{fan}",
        host_description()
    );
    println!("{md}");
    let json = json!({
        "host": host_description(),
        "rounds": rounds,
        "by_memory": rows.iter().map(|r| json!({
            "memory": r.memory, "branch_pause": r.branch, "snapshot_pause": r.snapshot,
            "full_mib_written": r.full_mib, "full_write_ms": r.full_write_ms, "diff_mib_written": r.diff_mib,
            "writer_mib_s": r.writer_mib_s, "dd_direct_mib_s": r.dd_mib_s, "file_snapshot_ms": r.file_snapshot_ms,
            "restore_host": r.restore_host, "restore_agent_ready": r.restore_ready, "restore_cold_host_ms": r.restore_cold_host_ms,
        })).collect::<Vec<_>>(),
        "fanout": {"n": fanout, "all_vmms_running_ms": all_running, "all_ready_ms": all_ready.as_secs_f64() * 1000.0, "pss_per_sandbox_mib": pss_avg},
    });
    let stem = write_results(out, "snapshot", &json, &md)?;
    plot(&stem.with_extension("svg"), &rows)?;
    eprintln!("results: {}.{{json,md,svg}}", stem.display());
    Ok(())
}

/// Source pause vs guest memory: BRANCH, durable snapshot, file snapshot (log scale).
fn plot(path: &Path, rows: &[Row]) -> Result<()> {
    use plotters::style::{BLUE, GREEN, MAGENTA};
    let points = |f: &dyn Fn(&Row) -> f64| rows.iter().map(|r| (r.memory.clone(), f(r))).collect::<Vec<_>>();
    crate::plot_pauses(
        path,
        &[
            ("BRANCH (p50)", BLUE, points(&|r| r.branch.p50_ms)),
            ("durable snapshot (p50)", GREEN, points(&|r| r.snapshot.p50_ms)),
            ("file snapshot, disk", MAGENTA, points(&|r| r.file_snapshot_ms)),
        ],
    )
}
