//! `forkd-bench exec`: what running code costs, side by side in one run: `eval` of `1+1` in a
//! warm code context, `exec /bin/true`, `exec python3 -c pass`, and the first `eval` in a fresh
//! child of a warm template (its interpreter already running, inherited).

use crate::stats::{ms, summarize, table};
use crate::{host_description, write_results, Bench};
use anyhow::{Context, Result};
use forkd_core::{CancelToken, CapturedOutput, EvalRequest, SandboxSpec, Warm};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn eval_once(bench: &Bench, id: &forkd_core::SandboxId, code: &str) -> Result<Duration> {
    let started = Instant::now();
    let result = bench.client.eval(id, &EvalRequest::new(code), &mut CapturedOutput::default(), &CancelToken::new())?;
    anyhow::ensure!(result.error.is_none(), "{code:?} raised {:?}", result.error);
    Ok(started.elapsed())
}

pub fn bench_exec(out: &Path, runs: usize, children: usize, image: &str) -> Result<()> {
    let bench = Bench::new()?;
    let name = format!("bench-py-{}", std::process::id());
    eprintln!("booting a warm `{image}` template (the interpreter starts before it is kept)...");
    let spec = SandboxSpec { image: image.into(), ..Default::default() };
    bench.client.create_template(&name, spec, Some(&Warm::default())).context("warm template")?;

    let mut first_evals = Vec::new();
    let mut kids = Vec::new();
    for i in 0..children {
        let child = bench.client.create_from_template(&name)?;
        first_evals.push(eval_once(&bench, &child.id, "1+1")?);
        eprintln!("child {}: first eval {:?}", i + 1, first_evals.last().unwrap_or(&Duration::ZERO));
        kids.push(child.id);
    }
    let id = kids.first().context("no child")?.clone();
    let (mut evals, mut trues, mut pythons) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        evals.push(eval_once(&bench, &id, "1+1")?);
    }
    for _ in 0..runs {
        trues.push(bench.exec(&id, &["/bin/true"])?);
    }
    for i in 0..runs {
        pythons.push(bench.exec(&id, &["python3", "-c", "pass"])?);
        eprintln!("python3 -c pass {}/{runs}: {:?}", i + 1, pythons.last().unwrap_or(&Duration::ZERO));
    }
    for kid in &kids {
        bench.client.destroy(kid)?;
    }
    bench.client.remove_template(&name)?;

    let (e, t, p, f) = (summarize(&evals), summarize(&trues), summarize(&pythons), summarize(&first_evals));
    let rows = vec![
        vec!["eval `1+1`, warm context".into(), e.n.to_string(), ms(e.p50_ms), ms(e.p90_ms), ms(e.min_ms)],
        vec!["exec `/bin/true`".into(), t.n.to_string(), ms(t.p50_ms), ms(t.p90_ms), ms(t.min_ms)],
        vec!["exec `python3 -c pass`".into(), p.n.to_string(), ms(p.p50_ms), ms(p.p90_ms), ms(p.min_ms)],
        vec![
            "first eval in a child of a warm template".into(),
            f.n.to_string(),
            ms(f.p50_ms),
            ms(f.p90_ms),
            ms(f.min_ms),
        ],
    ];
    let md = format!(
        "## Running code\n\nhost: {}\nimage: {image}\n\n{}",
        host_description(),
        table(&["what", "n", "p50 ms", "p90 ms", "min ms"], &rows)
    );
    println!("{md}");
    let json = json!({"host": host_description(), "image": image, "eval": e, "exec_true": t, "exec_python": p, "first_eval_in_child": f});
    let stem = write_results(out, "exec", &json, &md)?;
    eprintln!("results: {}.{{json,md}}", stem.display());
    Ok(())
}
