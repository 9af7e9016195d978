//! `forkd-bench load`: the daemon under concurrent clients. Serves the API on a loopback Unix
//! socket (in this process, over a throwaway state directory), boots one sandbox and BRANCHes
//! it into the rest, then runs `clients` concurrent gRPC clients, each with its own connection,
//! doing exec round trips on the sandboxes for `duration`. Every exec must exit 0 with the
//! expected output; anything else counts as a failure.

use crate::stats::{ms, table};
use crate::{host_description, now_unix, write_results};
use anyhow::{Context, Result};
use forkd_client::grpc::{pb, Connection as Client, Target};
use forkd_core::ControllerOptions;
use forkd_kvm::KvmOptions;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct LoadOptions {
    pub clients: usize,
    pub sandboxes: usize,
    pub duration: Duration,
}

/// Nearest-rank percentile of sorted milliseconds.
fn pick(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

struct ClientReport {
    latencies_ms: Vec<f64>,
    failures: Vec<String>,
}

async fn client_loop(socket: std::path::PathBuf, ids: Arc<Vec<String>>, n: usize, until: Instant) -> ClientReport {
    let mut report = ClientReport { latencies_ms: Vec::new(), failures: Vec::new() };
    let client = match Client::connect(&Target::Unix(socket)).await {
        Ok(c) => c,
        Err(e) => {
            report.failures.push(format!("client {n}: connect: {e}"));
            return report;
        }
    };
    let mut round = 0usize;
    while Instant::now() < until {
        let id = &ids[(n + round) % ids.len()];
        let want = format!("c{n}-r{round}");
        let started = Instant::now();
        match client.exec(id, ["echo", want.as_str()]).await {
            Ok((exit, out, _)) if exit.exit_code == 0 && out == format!("{want}\n").as_bytes() => {
                report.latencies_ms.push(started.elapsed().as_secs_f64() * 1000.0)
            }
            Ok((exit, out, err)) => report.failures.push(format!(
                "client {n} on {id}: exit {} stdout {:?} stderr {:?}",
                exit.exit_code,
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            )),
            Err(e) => report.failures.push(format!("client {n} on {id}: {e}")),
        }
        round += 1;
    }
    report
}

pub fn bench_load(out: &Path, opts: &LoadOptions) -> Result<()> {
    anyhow::ensure!(opts.clients > 0 && opts.sandboxes > 0, "need at least one client and one sandbox");
    let (state, dirs) = crate::throwaway_state("forkd-bench-load-")?;
    let controller =
        Arc::new(forkd_client::open_controller(&dirs, KvmOptions::default(), "bench", ControllerOptions::default())?);
    let socket = state.path().join("forkd.sock");

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(1024).build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server =
        rt.spawn(forkd_daemon::serve(controller.clone(), dirs, forkd_daemon::Config::new(&socket), async move {
            let _ = stop_rx.await;
        }));
    let result = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = loop {
            match Client::connect(&Target::Unix(socket.clone())).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => return Err(anyhow::anyhow!("the daemon did not start: {e}")),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        eprintln!("booting 1 sandbox, branching it into {} more...", opts.sandboxes - 1);
        let source = client.sandboxes().create(pb::CreateRequest::default()).await.context("boot")?.into_inner();
        let mut ids = vec![source.id.clone()];
        if opts.sandboxes > 1 {
            let req = pb::BranchRequest { id: source.id.clone(), count: Some(opts.sandboxes as i64 - 1), limits: None };
            let resp = client.sandboxes().branch(req).await.context("branch")?.into_inner();
            ids.extend(resp.children.into_iter().map(|c| c.id));
        }
        // Every sandbox answers before the clock starts.
        for id in &ids {
            client.exec(id, ["true"]).await.with_context(|| format!("warm-up exec in {id}"))?;
        }
        eprintln!("{} clients x {} sandboxes for {:?}...", opts.clients, ids.len(), opts.duration);
        let ids = Arc::new(ids);
        let started = Instant::now();
        let until = started + opts.duration;
        let tasks: Vec<_> =
            (0..opts.clients).map(|n| tokio::spawn(client_loop(socket.clone(), ids.clone(), n, until))).collect();
        let mut latencies = Vec::new();
        let mut failures = Vec::new();
        for t in tasks {
            let r = t.await.context("client task")?;
            latencies.extend(r.latencies_ms);
            failures.extend(r.failures);
        }
        let elapsed = started.elapsed();
        for id in ids.iter() {
            let _ = client.sandboxes().delete(pb::DeleteRequest { id: id.clone() }).await;
        }
        Ok::<_, anyhow::Error>((latencies, failures, elapsed, ids.len()))
    });
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    let _ = controller.destroy_all();
    let (mut latencies, failures, elapsed, sandboxes) = result?;

    latencies.sort_by(|a, b| a.total_cmp(b));
    let execs = latencies.len();
    let throughput = execs as f64 / elapsed.as_secs_f64();
    let (p50, p90, p99) = (pick(&latencies, 0.5), pick(&latencies, 0.9), pick(&latencies, 0.99));
    let max = latencies.last().copied().unwrap_or(f64::NAN);
    let md = format!(
        "# forkd-bench load\n\n{}\n\nDaemon on a loopback Unix socket; {} gRPC clients (one connection each) running \
         `echo` round-robin on {} sandboxes (1 boot + BRANCH) for {:.0} s.\n\n{}\n{}",
        host_description(),
        opts.clients,
        sandboxes,
        elapsed.as_secs_f64(),
        table(
            &["execs ok", "failures", "execs/s", "p50 ms", "p90 ms", "p99 ms", "max ms"],
            &[vec![
                execs.to_string(),
                failures.len().to_string(),
                format!("{throughput:.1}"),
                ms(p50),
                ms(p90),
                ms(p99),
                ms(max)
            ]],
        ),
        if failures.is_empty() {
            String::new()
        } else {
            format!(
                "\nFirst failures:\n\n{}\n",
                failures.iter().take(10).map(|f| format!("- {f}\n")).collect::<String>()
            )
        }
    );
    let json = json!({
        "bench": "load",
        "time_unix": now_unix(),
        "host": host_description(),
        "clients": opts.clients,
        "sandboxes": sandboxes,
        "duration_s": elapsed.as_secs_f64(),
        "execs_ok": execs,
        "failures": failures.len(),
        "failure_samples": failures.iter().take(10).collect::<Vec<_>>(),
        "execs_per_s": throughput,
        "latency_ms": { "p50": p50, "p90": p90, "p99": p99, "max": max },
    });
    println!("{md}");
    let stem = write_results(out, "load", &json, &md)?;
    eprintln!("results: {}.{{json,md}}", stem.display());
    anyhow::ensure!(failures.is_empty(), "{} of {} execs failed", failures.len(), failures.len() + execs);
    Ok(())
}
