//! `forkd template ...`: booted, idle sandboxes kept to fork new sandboxes from.

use super::sandbox::{open_controller, SpecArgs};
use crate::progress::Bar;
use clap::Subcommand;
use forkd_guest::dirs::Dirs;
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

pub fn run(dirs: &Dirs, cmd: TemplateCommand, verbose: bool) -> anyhow::Result<ExitCode> {
    let controller = open_controller(dirs, verbose)?;
    match cmd {
        TemplateCommand::Create { name, spec } => {
            let spec = spec.spec()?;
            let spinner = Bar::spinner(&format!("booting template {name} ({}, {} MiB)", spec.image, spec.memory_mib));
            let created = controller.create_template(&name, spec);
            spinner.finish_and_clear();
            let info = created?;
            println!("template {name} ready ({})", info.id);
        }
        TemplateCommand::Ls { json } => {
            let templates: Vec<_> = controller.list()?.into_iter().filter(|i| i.template.is_some()).collect();
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
            let info = controller
                .template(&name)?
                .ok_or_else(|| anyhow::anyhow!("no template named `{name}` (`forkd template ls`)"))?;
            controller.destroy(&info.id)?;
            println!("removed template {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
