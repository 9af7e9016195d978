//! `forkd snapshot ...`: durable snapshots, written in the background from a frozen fork of a
//! running sandbox; restored with `forkd create --snapshot TAG`.

use crate::context::Context;
use crate::progress::Bar;
use clap::Subcommand;
use forkd_core::{SandboxId, SnapshotInfo, SnapshotKind, SnapshotOptions};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a running sandbox. It pauses about as long as for a BRANCH and runs on while
    /// a frozen copy writes the snapshot; prints the snapshot's id (and `--json`: the pause).
    Create {
        /// The sandbox to snapshot.
        id: String,
        /// A name to restore it by (unique; a-z, 0-9, '.', '_', '-').
        #[arg(long)]
        tag: Option<String>,
        /// Write only the pages changed since the sandbox's latest snapshot (or the one it was
        /// restored from), which becomes the parent.
        #[arg(long)]
        diff: bool,
        /// Return once the snapshot is durable (on disk, fsynced, listed).
        #[arg(long)]
        wait: bool,
        /// Print `{"id": ..., "tag": ..., "pause_ms": ..., "durable": ...}`.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Everything about one snapshot, as JSON.
    Inspect { tag: String },
    /// Remove a snapshot (one that diffs build on only with --cascade, which removes them too).
    Rm {
        tag: String,
        #[arg(long)]
        cascade: bool,
    },
    /// Fold a diff chain into one full snapshot (same id and tag).
    Compact { tag: String },
    /// Read every byte of a snapshot and its chain against their checksums.
    Verify { tag: String },
}

pub fn run(ctx: &Context, cmd: SnapshotCommand) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match cmd {
        SnapshotCommand::Create { id, tag, diff, wait, json } => {
            let id = SandboxId::parse(&id)?;
            let spinner = wait.then(|| Bar::spinner(&format!("writing a snapshot of {id}")));
            let result = client.snapshot(&id, &SnapshotOptions { tag, diff, wait });
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            let result = result?;
            let pause_ms = (result.pause.as_secs_f64() * 1e6).round() / 1e3;
            if json {
                let mut value = serde_json::to_value(&result)?;
                value["pause_ms"] = serde_json::json!(pause_ms);
                println!("{value}");
            } else {
                println!("{}", result.tag.as_deref().unwrap_or(&result.id));
                let state = if result.durable { "durable" } else { "being written in the background" };
                eprintln!("snapshot {} of {id}: source paused {pause_ms:.2} ms; {state}", result.id);
            }
        }
        SnapshotCommand::Ls { json } => {
            let list = client.snapshots()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
        }
        SnapshotCommand::Inspect { tag } => println!("{}", serde_json::to_string_pretty(&client.snapshot_info(&tag)?)?),
        SnapshotCommand::Rm { tag, cascade } => {
            for id in client.remove_snapshot(&tag, cascade)? {
                println!("{id}");
            }
        }
        SnapshotCommand::Compact { tag } => {
            let spinner = Bar::spinner(&format!("compacting {tag}"));
            let info = client.compact_snapshot(&tag);
            spinner.finish_and_clear();
            let info = info?;
            println!(
                "{} is now a full snapshot ({} MiB of memory)",
                info.tag.as_deref().unwrap_or(&info.id),
                info.memory_bytes >> 20
            );
        }
        SnapshotCommand::Verify { tag } => {
            let spinner = Bar::spinner(&format!("verifying {tag}"));
            let report = client.verify_snapshot(&tag);
            spinner.finish_and_clear();
            let r = report?;
            println!(
                "{tag}: ok ({} files, {} memory pages, {} MiB read)",
                r.files_checked,
                r.pages_checked,
                r.bytes_read >> 20
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(list: &[SnapshotInfo]) {
    println!(
        "{:<18} {:<20} {:<5} {:<18} {:<16} {:<8} {:>7} {:>9}",
        "ID", "TAG", "KIND", "PARENT", "SOURCE", "IMAGE", "MEMORY", "WRITTEN"
    );
    for s in list {
        let kind = match s.kind {
            SnapshotKind::Full => "full",
            SnapshotKind::Diff => "diff",
        };
        println!(
            "{:<18} {:<20} {:<5} {:<18} {:<16} {:<8} {:>5}Mi {:>7}Mi",
            s.id,
            s.tag.as_deref().unwrap_or("-"),
            kind,
            s.parent.as_deref().unwrap_or("-"),
            s.source.as_deref().unwrap_or("-"),
            s.spec.image,
            s.spec.memory_mib,
            s.memory_bytes >> 20
        );
    }
}
