//! forkd benchmarks on real KVM microVMs. Results are printed as tables and written to
//! `bench/results/<name>-<unix time>.{json,md}` (and an SVG plot for `branch`).
//!
//!   forkd-bench boot   [--runs 5] [--execs 20]
//!   forkd-bench branch [--memory 256M,1G,4G] [--counts 1,4,16,100] [--rounds 10]
//!   forkd-bench load   [--clients 50] [--sandboxes 10] [--seconds 30]
//!   forkd-bench snapshot [--memory 256M,1G,4G] [--rounds 5] [--fanout 100]
//!   forkd-bench exec   [--runs 20] [--children 5] [--image default]
//!   forkd-bench files  [--sizes 1M,64M,256M]

mod exec;
mod files;
mod load;
mod snapshot;
mod stats;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use forkd_client::Client;
use forkd_core::{BranchOptions, CapturedOutput, ControllerOptions, Dirs, ExecRequest, SandboxId, SandboxSpec};
use forkd_kvm::KvmOptions;
use serde_json::json;
use stats::{ms, summarize, table};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
#[command(about = "forkd benchmarks (real KVM microVMs; run as root after scripts/setup.sh)")]
struct Cli {
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cold boot to agent-ready, and exec round-trip latency.
    Boot {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 20)]
        execs: usize,
        #[arg(long, default_value = "256M")]
        memory: String,
    },
    /// BRANCH: source pause vs guest memory (guest dirtying memory) and vs fan-out N, child
    /// readiness, PSS per idle child, and the file-snapshot baseline.
    Branch {
        #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
        memory: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,100")]
        counts: Vec<u32>,
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// Durable snapshots: source pause next to BRANCH and the file snapshot, bytes written
    /// (full, diff), writer bandwidth next to `dd oflag=direct`, restore time, and N sandboxes
    /// from one snapshot.
    Snapshot {
        #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
        memory: Vec<String>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 100)]
        fanout: u32,
    },
    /// Running code: eval in a warm context, exec /bin/true, exec python3 -c pass, and the first
    /// eval in a child of a warm template.
    Exec {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 5)]
        children: usize,
        #[arg(long, default_value = "default")]
        image: String,
    },
    /// File transfer into and out of a sandbox, MB/s each way.
    Files {
        #[arg(long, value_delimiter = ',', default_value = "1M,64M,256M")]
        sizes: Vec<String>,
    },
    /// The daemon under load: concurrent gRPC clients doing exec on BRANCHed sandboxes over a
    /// loopback Unix socket; exec latency percentiles and failures.
    Load {
        #[arg(long, default_value_t = 50)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        sandboxes: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

/// A throwaway state directory that uses the host's prepared images (the `images` link).
pub(crate) fn throwaway_state(prefix: &str) -> Result<(tempfile::TempDir, Dirs)> {
    let host = Dirs::from_env();
    let state = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::os::unix::fs::symlink(host.images(), state.path().join("images"))?;
    let dirs = Dirs { state: state.path().to_path_buf(), cache: host.cache };
    Ok((state, dirs))
}

/// An embedded forkd client over a throwaway state directory.
pub(crate) struct Bench {
    pub(crate) client: Client,
    pub(crate) state: tempfile::TempDir,
}

impl Bench {
    fn new() -> Result<Self> {
        let (state, dirs) = throwaway_state("forkd-bench-")?;
        let controller =
            forkd_client::open_controller(&dirs, KvmOptions::default(), "bench", ControllerOptions::default())?;
        Ok(Self { client: Client::from_controller(controller), state })
    }

    pub(crate) fn exec(&self, id: &SandboxId, argv: &[&str]) -> Result<Duration> {
        let started = Instant::now();
        let req = ExecRequest::new(argv.iter().copied());
        let outcome = self.client.exec(id, &req, None, &mut CapturedOutput::default(), &Default::default())?;
        anyhow::ensure!(outcome.status.shell_code() == 0, "{argv:?} failed: {:?}", outcome.status);
        Ok(started.elapsed())
    }

    /// The VMM control socket of a sandbox (benchmarks talk to the VMM directly for the
    /// file-snapshot baseline).
    fn control_socket(&self, id: &SandboxId) -> PathBuf {
        self.state.path().join("sandboxes").join(id.as_str()).join("control.sock")
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for sandbox in self.client.list().unwrap_or_default() {
            let _ = self.client.destroy(&sandbox.id);
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn host_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kvm =
        if Path::new("/sys/module/kvm_pvm").exists() { "kvm_pvm (guest kernel emulated)" } else { "hardware KVM" };
    format!("{} CPUs, {cpu}, {kvm}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

pub(crate) fn write_results(out: &Path, name: &str, json: &serde_json::Value, markdown: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let stem = out.join(format!("{name}-{}", now_unix()));
    std::fs::write(stem.with_extension("json"), serde_json::to_vec_pretty(json)?)?;
    std::fs::write(stem.with_extension("md"), markdown)?;
    Ok(stem)
}

fn bench_boot(out: &Path, runs: usize, execs: usize, memory: &str) -> Result<()> {
    let bench = Bench::new()?;
    let spec = SandboxSpec { memory_mib: forkd_core::size::parse_mib("memory", memory)?, ..Default::default() };
    let mut boots = Vec::new();
    for i in 0..runs {
        let started = Instant::now();
        let sb = bench.client.create(spec.clone()).context("boot")?;
        boots.push(started.elapsed());
        eprintln!("boot {}/{runs}: {:?}", i + 1, boots.last().unwrap_or(&Duration::ZERO));
        if i + 1 < runs {
            bench.client.destroy(&sb.id)?;
        }
    }
    let id = bench.client.list()?.first().map(|s| s.id.clone()).context("no sandbox")?;
    let mut trues = Vec::new();
    let mut shells = Vec::new();
    for _ in 0..execs {
        trues.push(bench.exec(&id, &["/bin/true"])?);
        shells.push(bench.exec(&id, &["sh", "-c", "echo hi | cat > /dev/null"])?);
    }
    let (boot, t, sh) = (summarize(&boots), summarize(&trues), summarize(&shells));
    let rows = vec![
        vec![
            format!("cold boot to agent-ready ({memory})"),
            boot.n.to_string(),
            ms(boot.p50_ms),
            ms(boot.p90_ms),
            ms(boot.min_ms),
        ],
        vec!["exec `/bin/true` round trip".into(), t.n.to_string(), ms(t.p50_ms), ms(t.p90_ms), ms(t.min_ms)],
        vec!["exec `sh -c 'echo hi | cat'`".into(), sh.n.to_string(), ms(sh.p50_ms), ms(sh.p90_ms), ms(sh.min_ms)],
    ];
    let md = format!(
        "## boot and exec\n\nhost: {}\n\n{}",
        host_description(),
        table(&["what", "n", "p50 ms", "p90 ms", "min ms"], &rows)
    );
    println!("{md}");
    let json = json!({"host": host_description(), "memory": memory, "boot": boot, "exec_true": t, "exec_pipeline": sh});
    let stem = write_results(out, "boot", &json, &md)?;
    eprintln!("results: {}.{{json,md}}", stem.display());
    Ok(())
}

/// Starts a user-space loop that keeps rewriting about a quarter of guest memory.
pub(crate) fn start_dirtier(bench: &Bench, id: &SandboxId, memory_mib: u64) -> Result<()> {
    let elements = memory_mib * 1024 * 2; // awk array cells; roughly 128 bytes each
    let script = format!(
        "setsid awk 'BEGIN {{ n = {elements}; while (1) for (i = 0; i < n; i++) a[i] = i }}' >/dev/null 2>&1 </dev/null &"
    );
    bench.exec(id, &["sh", "-c", &script])?;
    std::thread::sleep(Duration::from_secs(5));
    Ok(())
}

pub(crate) fn dump_pause(bench: &Bench, id: &SandboxId, path: &Path) -> Result<Duration> {
    use forkd_vmm::control::{request_with_fds, ControlRequest};
    use std::os::fd::AsFd;
    // The VMM is jailed in its own mount namespace: hand it the open file.
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let resp = request_with_fds(
        &bench.control_socket(id),
        &ControlRequest::DumpMemory { path: path.to_path_buf() },
        &[file.as_fd()],
        Duration::from_secs(600),
    );
    drop(file);
    let _ = std::fs::remove_file(path);
    let resp = resp?;
    let dump = resp.dump.context("no dump report")?;
    Ok(Duration::from_micros(dump.pause_us))
}

struct MemoryRow {
    memory: String,
    pauses: stats::Summary,
    ready: stats::Summary,
    first_exec: stats::Summary,
    dump_tmpfs: Duration,
    dump_disk: Duration,
}

fn bench_branch(out: &Path, memories: &[String], counts: &[u32], rounds: usize) -> Result<()> {
    let bench = Bench::new()?;
    let mut memory_rows = Vec::new();
    let mut raw_pauses = serde_json::Map::new();
    for memory in memories {
        let mib = forkd_core::size::parse_mib("memory", memory)?;
        eprintln!("booting a {memory} source...");
        let source = bench.client.create(SandboxSpec { memory_mib: mib, ..Default::default() })?;
        start_dirtier(&bench, &source.id, mib)?;
        let (mut pauses, mut ready, mut first_exec) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let started = Instant::now();
            let result = bench.client.branch(&source.id, &BranchOptions::count(1))?;
            ready.push(started.elapsed());
            pauses.push(result.pause);
            let child = &result.children[0].id;
            first_exec.push(bench.exec(child, &["/bin/true"])?);
            bench.client.destroy(child)?;
            eprintln!("{memory} round {}: pause {:?}", round + 1, result.pause);
        }
        raw_pauses.insert(memory.clone(), json!(pauses.iter().map(|p| p.as_secs_f64() * 1000.0).collect::<Vec<_>>()));
        let dump_tmpfs = dump_pause(&bench, &source.id, Path::new("/dev/shm/forkd-bench-memory"))?;
        let dump_disk = dump_pause(&bench, &source.id, &bench.state.path().join("forkd-bench-memory"))?;
        memory_rows.push(MemoryRow {
            memory: memory.clone(),
            pauses: summarize(&pauses),
            ready: summarize(&ready),
            first_exec: summarize(&first_exec),
            dump_tmpfs,
            dump_disk,
        });
        bench.client.destroy(&source.id)?;
    }

    // Fan-out on a small source.
    eprintln!("booting a 256M source for fan-out...");
    let source = bench.client.create(SandboxSpec::default())?;
    let mut fanout_rows = Vec::new();
    let mut fanout_json = Vec::new();
    for &n in counts {
        let started_ns = forkd_vmm::control::monotonic_ns();
        let started = Instant::now();
        let result = bench.client.branch(&source.id, &BranchOptions::count(n))?;
        let all_ready = started.elapsed();
        let running = vmm_running_ms(&bench.state.path().join("sandboxes"), &result.children, started_ns);
        // Every child must have answered, or the last one's time is unknown.
        let vmm_ready_ms = (running.len() == result.children.len()).then(|| running.last().copied()).flatten();
        if let (Some(first), Some(last)) = (running.first(), running.last()) {
            eprintln!(
                "N={n}: child VMMs running from {first:.0} ms, half by {:.0} ms, all by {last:.0} ms",
                running[running.len() / 2]
            );
        }
        let first = bench.exec(&result.children[0].id, &["/bin/true"])?;
        std::thread::sleep(Duration::from_secs(1));
        let pss: Vec<u64> =
            result.children.iter().filter_map(|c| bench.client.memory_usage(&c.id).ok()).map(|m| m.pss_kib).collect();
        let pss_avg = pss.iter().sum::<u64>() as f64 / pss.len().max(1) as f64 / 1024.0;
        let private: Vec<u64> = result
            .children
            .iter()
            .filter_map(|c| bench.client.memory_usage(&c.id).ok())
            .map(|m| m.private_dirty_kib)
            .collect();
        let private_avg = private.iter().sum::<u64>() as f64 / private.len().max(1) as f64 / 1024.0;
        eprintln!(
            "N={n}: pause {:?}, VMMs running in {vmm_ready_ms:?} ms, agents ready in {all_ready:?}, PSS/child {pss_avg:.2} MiB, private {private_avg:.2} MiB",
            result.pause
        );
        fanout_rows.push(vec![
            n.to_string(),
            ms(result.pause.as_secs_f64() * 1000.0),
            vmm_ready_ms.map(ms).unwrap_or_else(|| "-".into()),
            ms(all_ready.as_secs_f64() * 1000.0),
            ms(first.as_secs_f64() * 1000.0),
            format!("{pss_avg:.2}"),
            format!("{private_avg:.2}"),
        ]);
        fanout_json.push(json!({"n": n, "pause_ms": result.pause.as_secs_f64() * 1000.0, "vmm_ready_ms": vmm_ready_ms,
            "all_ready_ms": all_ready.as_secs_f64() * 1000.0, "first_exec_ms": first.as_secs_f64() * 1000.0,
            "pss_per_child_mib": pss_avg, "private_dirty_per_child_mib": private_avg}));
        for c in &result.children {
            bench.client.destroy(&c.id)?;
        }
    }

    let mem_table = table(
        &[
            "guest memory",
            "BRANCH pause p50 ms",
            "p90 ms",
            "child ready p50 ms",
            "first exec p50 ms",
            "file snapshot pause (tmpfs) ms",
            "file snapshot pause (disk) ms",
        ],
        &memory_rows
            .iter()
            .map(|r| {
                vec![
                    r.memory.clone(),
                    ms(r.pauses.p50_ms),
                    ms(r.pauses.p90_ms),
                    ms(r.ready.p50_ms),
                    ms(r.first_exec.p50_ms),
                    ms(r.dump_tmpfs.as_secs_f64() * 1000.0),
                    ms(r.dump_disk.as_secs_f64() * 1000.0),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let fan_table = table(
        &[
            "children N",
            "source pause ms",
            "all child VMMs running ms",
            "all children agent-ready ms",
            "first exec in child ms",
            "PSS per idle child MiB",
            "private dirty per idle child MiB",
        ],
        &fanout_rows,
    );
    let md = format!(
        "## BRANCH\n\nhost: {}\n\n{rounds} consecutive branches per size, guest dirtying memory:\n\n{mem_table}\nfan-out from one 256 MiB source:\n\n{fan_table}",
        host_description()
    );
    println!("{md}");
    let json = json!({
        "host": host_description(),
        "by_memory": memory_rows.iter().map(|r| json!({"memory": r.memory, "pause": r.pauses, "child_ready": r.ready, "first_exec": r.first_exec,
            "file_snapshot_tmpfs_ms": r.dump_tmpfs.as_secs_f64() * 1000.0, "file_snapshot_disk_ms": r.dump_disk.as_secs_f64() * 1000.0})).collect::<Vec<_>>(),
        "pauses_ms": raw_pauses,
        "fanout": fanout_json,
    });
    let stem = write_results(out, "branch", &json, &md)?;
    plot(&stem.with_extension("svg"), &memory_rows)?;
    eprintln!("results: {}.{{json,md,svg}}", stem.display());
    Ok(())
}

/// When each child VMM of a BRANCH began serving its rebuilt VM (vCPUs started), in ms after
/// `started_ns` (CLOCK_MONOTONIC), sorted: the host-side part of a branch (fork, new KVM VM over
/// the inherited memory, state restored, vCPUs running), before any guest work. Read from the
/// children's own clocks after the branch, so how fast this process gets to ask them (100
/// guests busy on two CPUs) does not count.
pub(crate) fn vmm_running_ms(sandboxes: &Path, children: &[forkd_core::SandboxInfo], started_ns: u64) -> Vec<f64> {
    let mut times: Vec<f64> = children
        .iter()
        .filter_map(|child| {
            let socket = sandboxes.join(child.id.as_str()).join("control.sock");
            let status = forkd_vmm::control::request(
                &socket,
                &forkd_vmm::control::ControlRequest::Status,
                Duration::from_secs(5),
            );
            status.ok()?.status.map(|s| s.serving_since_ns.saturating_sub(started_ns) as f64 / 1e6)
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// Pause vs guest memory: BRANCH against the file-snapshot method (log scale).
fn plot(path: &Path, rows: &[MemoryRow]) -> Result<()> {
    use plotters::style::{BLUE, MAGENTA, RED};
    let points = |f: &dyn Fn(&MemoryRow) -> f64| rows.iter().map(|r| (r.memory.clone(), f(r))).collect::<Vec<_>>();
    plot_pauses(
        path,
        &[
            ("BRANCH (p50)", BLUE, points(&|r| r.pauses.p50_ms)),
            ("file snapshot, tmpfs", RED, points(&|r| r.dump_tmpfs.as_secs_f64() * 1000.0)),
            ("file snapshot, disk", MAGENTA, points(&|r| r.dump_disk.as_secs_f64() * 1000.0)),
        ],
    )
}

/// One line of a pause plot: its name, color, and (guest memory, pause ms) points.
pub(crate) type PauseSeries<'a> = (&'a str, plotters::style::RGBColor, Vec<(String, f64)>);

/// "Source pause vs guest memory" on a log scale, one line per series, to an SVG file.
pub(crate) fn plot_pauses(path: &Path, series: &[PauseSeries<'_>]) -> Result<()> {
    use plotters::prelude::*;
    let gib = |m: &str| forkd_core::size::parse_mib("memory", m).map(|v| v as f64 / 1024.0).unwrap_or(0.0);
    let all = || series.iter().flat_map(|(_, _, points)| points.iter());
    let max_x = all().map(|(m, _)| gib(m)).fold(0.5, f64::max) * 1.1;
    let max_y = all().map(|(_, ms)| *ms).fold(10.0, f64::max) * 2.0;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Source pause vs guest memory", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x, (0.1f64..max_y).log_scale())?;
    chart.configure_mesh().x_desc("guest memory (GiB)").y_desc("pause (ms, log)").draw()?;
    for (name, color, points) in series {
        let color = *color;
        let points: Vec<(f64, f64)> = points.iter().map(|(m, ms)| (gib(m), ms.max(0.1))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Boot { runs, execs, memory } => bench_boot(&cli.out, runs, execs, &memory),
        Cmd::Branch { memory, counts, rounds } => bench_branch(&cli.out, &memory, &counts, rounds),
        Cmd::Snapshot { memory, rounds, fanout } => snapshot::bench_snapshot(&cli.out, &memory, rounds, fanout),
        Cmd::Exec { runs, children, image } => exec::bench_exec(&cli.out, runs, children, &image),
        Cmd::Files { sizes } => files::bench_files(&cli.out, &sizes),
        Cmd::Load { clients, sandboxes, seconds } => load::bench_load(
            &cli.out,
            &load::LoadOptions { clients, sandboxes, duration: std::time::Duration::from_secs(seconds) },
        ),
    }
}
