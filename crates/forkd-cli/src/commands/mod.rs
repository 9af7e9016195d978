//! One module per command group; each parses nothing and prints what the library returns.

pub mod daemon;
pub mod image;
pub mod kernel;
pub mod run;
pub mod sandbox;
pub mod template;

use forkd_guest::dirs::Dirs;
use std::process::ExitCode;

pub fn doctor(dirs: &Dirs, json: bool) -> anyhow::Result<ExitCode> {
    let checks = crate::doctor::run_checks(dirs);
    let all_ok = checks.iter().all(|c| c.ok);
    if json {
        let value: Vec<_> = checks
            .iter()
            .map(|c| serde_json::json!({"check": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
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
