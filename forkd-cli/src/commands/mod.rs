//! One module per command group; each parses nothing and prints what the library returns.

pub mod daemon;
pub mod eval;
pub mod image;
pub mod kernel;
pub mod run;
pub mod sandbox;
pub mod snapshot;
pub mod template;

use crate::context::Context;
use std::process::ExitCode;

/// `forkd doctor`: what this host supports and what to fix (exit 1 if a check fails).
pub fn doctor(ctx: &Context, json: bool) -> anyhow::Result<ExitCode> {
    let checks = forkd_kvm::doctor::checks(&ctx.dirs);
    let all_ok = forkd_core::doctor::all_ok(&checks);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{} {:<24} {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("     {:<24} fix: {fix}", "");
            }
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
