//! `forkd template ...`: booted, idle sandboxes kept to fork new sandboxes from.

use super::sandbox::SpecArgs;
use crate::context::Context;
use crate::progress::Bar;
use clap::Subcommand;
use std::process::ExitCode;

// Parsed once per process: the size of the `Create` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Boot a sandbox and keep it as a template; `forkd create --from NAME` and
    /// `forkd run --from NAME` then fork it instead of booting. `forkd run` uses the template
    /// named `default` when it exists.
    Create {
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
        /// Start an interpreter in the template's `main` code context (and import modules)
        /// before it is kept, so sandboxes forked from it evaluate at once: `python` or
        /// `python:numpy,pandas` (needs an image with Python, e.g. `--image default`).
        #[arg(long, value_name = "python[:MODULE,...]")]
        warm: Option<String>,
    },
    /// List templates.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (sandboxes forked from it keep running).
    Rm { name: String },
}

pub fn run(ctx: &Context, cmd: TemplateCommand) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match cmd {
        TemplateCommand::Create { name, spec, warm } => {
            let spec = spec.spec()?;
            let warm = warm.as_deref().map(str::parse::<forkd_core::Warm>).transpose()?;
            let spinner = Bar::spinner(&format!("booting template {name} ({}, {} MiB)", spec.image, spec.memory_mib));
            let created = client.create_template(&name, spec, warm.as_ref());
            spinner.finish_and_clear();
            let info = created?;
            println!("template {name} ready ({})", info.id);
        }
        TemplateCommand::Ls { json } => {
            let templates: Vec<_> = client.list()?.into_iter().filter(|i| i.template.is_some()).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&templates)?);
            } else {
                println!("NAME                 SANDBOX          IMAGE     MEMORY");
                for t in templates {
                    println!(
                        "{:<20} {:<16} {:<8} {:>5}Mi",
                        t.template.unwrap_or_default(),
                        t.id,
                        t.spec.image,
                        t.spec.memory_mib
                    );
                }
            }
        }
        TemplateCommand::Rm { name } => {
            client.remove_template(&name)?;
            println!("removed template {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
