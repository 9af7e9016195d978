//! `forkd image ...`

use crate::context::Context;
use crate::progress::Bar;
use clap::Subcommand;
use forkd_guest::image;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build a built-in image: `tiny` (busybox + agent, seconds) or `default` (Debian bookworm
    /// minbase + python3, minutes; needs network access to the Debian mirror).
    Build {
        #[arg(value_parser = ["tiny", "default"])]
        kind: String,
        /// Static forkd-agent binary to put in the image (found automatically otherwise).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Import a root filesystem tarball as an image (the agent is added).
    Import {
        name: String,
        tarball: PathBuf,
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// List images.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image.
    Rm { name: String },
}

pub fn run(ctx: &Context, cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let (dirs, verbose) = (&ctx.dirs, ctx.verbose);
    let agent = |given: Option<PathBuf>| -> anyhow::Result<PathBuf> {
        match given {
            Some(p) => Ok(p),
            None => Ok(image::locate_agent()?),
        }
    };
    match cmd {
        ImageCommand::Build { kind, agent: a } => {
            let agent = agent(a)?;
            let bar = Bar::new(verbose);
            let built = if kind == "tiny" {
                image::build_tiny(dirs, &agent, &bar)
            } else {
                image::build_default(dirs, &agent, &bar)
            };
            bar.finish();
            let img = built?;
            println!("built image {} ({} MiB) at {}", img.name, img.manifest.size_bytes >> 20, img.rootfs.display());
        }
        ImageCommand::Import { name, tarball, agent: a } => {
            let agent = agent(a)?;
            let bar = Bar::new(verbose);
            let imported = image::import_tar_with(dirs, &name, &tarball, &image::ImportOptions::new(agent), &bar);
            bar.finish();
            let img = imported?;
            println!("imported image {} ({} MiB)", img.name, img.manifest.size_bytes >> 20);
        }
        ImageCommand::Ls { json } => {
            let images = image::list(dirs)?;
            if json {
                let manifests: Vec<_> = images.iter().map(|i| &i.manifest).collect();
                println!("{}", serde_json::to_string_pretty(&manifests)?);
            } else {
                println!("{:<20} {:<10} {:>10}  SHA256", "NAME", "KIND", "SIZE");
                for i in &images {
                    let m = &i.manifest;
                    println!(
                        "{:<20} {:<10} {:>8}Mi  {}",
                        m.name,
                        format!("{:?}", m.kind).to_lowercase(),
                        m.size_bytes >> 20,
                        &m.sha256[..m.sha256.len().min(16)]
                    );
                }
            }
        }
        ImageCommand::Rm { name } => {
            image::remove(dirs, &name)?;
            println!("removed image {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `forkd images`: the images new sandboxes can use, as the daemon (or this host) sees them.
pub fn images(ctx: &Context, json: bool) -> anyhow::Result<ExitCode> {
    let images = ctx.client()?.images(&ctx.dirs)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&images)?);
    } else {
        println!("{:<20} {:<10} {:>10}  SHA256", "NAME", "KIND", "SIZE");
        for i in &images {
            println!(
                "{:<20} {:<10} {:>8}Mi  {}",
                i.name,
                i.kind,
                i.size_bytes >> 20,
                &i.sha256[..i.sha256.len().min(16)]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
