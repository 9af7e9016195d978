//! `forkd run`: a sandbox for one command. Forks a template when one is given (or the
//! `default` template exists), boots otherwise; always tears down.

use super::sandbox::{exec_passthrough, CommandArgs, SpecArgs};
use crate::context::Context;
use crate::progress::Bar;
use anyhow::Context as _;
use clap::Args;
use std::process::ExitCode;

/// Template `forkd run` forks when it exists and no `--from` is given.
const DEFAULT_TEMPLATE: &str = "default";

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Fork this template instead of booting.
    #[arg(long, value_name = "TEMPLATE")]
    pub from: Option<String>,
    /// Always boot a fresh sandbox, even when a `default` template exists.
    #[arg(long, conflicts_with = "from")]
    pub no_template: bool,
    #[command(flatten)]
    pub command: CommandArgs,
}

pub fn run(ctx: &Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    let cancel = forkd_core::CancelToken::new();
    crate::signals::install(cancel.clone());
    // Check everything cheap before paying for a boot.
    let spec = args.spec.spec()?;
    args.command.request()?;
    let client = ctx.client()?;
    let template = match (&args.from, args.no_template) {
        (Some(name), _) => Some(name.clone()),
        (None, false) => client.template(DEFAULT_TEMPLATE)?.map(|_| DEFAULT_TEMPLATE.to_string()),
        _ => None,
    };
    let created = match &template {
        Some(name) => client.create_from_template(name),
        None => {
            let spinner = Bar::spinner(&format!("booting a sandbox ({}, {} MiB)", spec.image, spec.memory_mib));
            let created = client.create(spec);
            spinner.finish_and_clear();
            created
        }
    };
    let sandbox = created.context("creating the sandbox")?;
    if let Some(sig) = crate::signals::received() {
        client.destroy(&sandbox.id)?;
        return Ok(ExitCode::from((128 + sig) as u8));
    }
    let outcome = exec_passthrough(&client, &sandbox.id, &args.command, &cancel);
    let teardown = client.destroy(&sandbox.id);
    let code = outcome?;
    teardown.context("tearing the sandbox down")?;
    if let Some(sig) = crate::signals::received() {
        return Ok(ExitCode::from((128 + sig) as u8));
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
