//! Embedding forkd in a Rust service, no daemon: boot a sandbox, run a command, BRANCH it into
//! three children and show that each starts from the source's state and then diverges.
//!
//! ```sh
//! cargo run --release -p forkd-kvm --example embed     # as root, after scripts/setup.sh
//! ```
//!
//! Uses the host's prepared kernel and images (`FORKD_STATE_DIR`, default `/var/lib/forkd`).
//! The controller here keeps nothing on disk (`Controller::new`); use `Controller::open` with a
//! state directory to persist sandboxes and re-adopt them after a restart.

use forkd_core::Dirs;
use forkd_core::{BranchOptions, CapturedOutput, Controller, ExecRequest, SandboxId, SandboxSpec};
use forkd_kvm::{KvmBackend, KvmOptions};
use std::sync::Arc;

fn run(forkd: &Controller, id: &SandboxId, script: &str) -> anyhow::Result<String> {
    let mut out = CapturedOutput::default();
    let outcome = forkd.exec(id, &ExecRequest::new(["sh", "-c", script]), None, &mut out)?;
    anyhow::ensure!(
        outcome.status.shell_code() == 0,
        "`{script}` failed ({:?}): {}",
        outcome.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

fn main() -> anyhow::Result<()> {
    let backend = KvmBackend::new(Dirs::from_env(), KvmOptions::default())?;
    let forkd = Controller::new(Arc::new(backend));

    eprintln!("booting a sandbox...");
    let source = forkd.create(SandboxSpec::default())?;
    let result = (|| -> anyhow::Result<()> {
        println!("source {}: {}", source.id, run(&forkd, &source.id, "uname -sr")?);
        run(&forkd, &source.id, "echo 'written before the branch' > /root/note")?;

        let branch = forkd.branch(&source.id, &BranchOptions::count(3))?;
        println!(
            "branched into {} children; source paused {:.2} ms",
            branch.children.len(),
            branch.pause.as_secs_f64() * 1e3
        );
        for (i, child) in branch.children.iter().enumerate() {
            let out = run(&forkd, &child.id, &format!("cat /root/note; echo child {i} > /root/me; cat /root/me"))?;
            println!("child {} ({}):\n  {}", i, child.id, out.replace('\n', "\n  "));
        }
        Ok(())
    })();
    // Sandboxes are separate processes: remove them, whatever happened above.
    forkd.destroy_all()?;
    result
}
