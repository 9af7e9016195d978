//! `forkd-vmm`: runs one microVM. Started by forkd (CLI or daemon), one process per sandbox.
//!
//! Usage: `forkd-vmm --config vm.json`. Exit status: 0 when the VM stopped cleanly, 1 on a
//! setup error, 2 when the guest crashed; the last stderr line says why.

use anyhow::Context;
use forkd_vmm::runtime::{self, Outcome};
use forkd_vmm::VmConfig;
use std::process::ExitCode;

fn main() -> ExitCode {
    // One malloc arena: a vCPU thread's own arena would be one more set of heap pages that
    // every BRANCH child copies on its first allocation there.
    // SAFETY: mallopt only adjusts allocator parameters; no other thread exists yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FORKD_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(Outcome::Stopped(why)) => {
            tracing::info!("VM stopped: {why}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Crashed(why)) => {
            eprintln!("forkd-vmm: guest crashed: {why}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("forkd-vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main() -> anyhow::Result<Outcome> {
    let mut args = std::env::args().skip(1);
    let config_path = match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(path)) => path,
        _ => anyhow::bail!("usage: forkd-vmm --config VM.json"),
    };
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {config_path}"))?;
    let config: VmConfig = serde_json::from_str(&text).with_context(|| format!("parsing {config_path}"))?;
    Ok(runtime::run(&config)?)
}
