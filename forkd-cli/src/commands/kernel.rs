//! `forkd kernel ...`

use crate::context::Context;
use crate::progress::Bar;
use clap::Subcommand;
use forkd_guest::kernel::{self, BuildOptions};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum KernelCommand {
    /// Build the guest kernel from Debian's linux-source with forkd's microVM config and
    /// patches (about 4 minutes on 2 cores; cached by a hash of source, config and patches).
    Build {
        /// Rebuild even if a build for this hash exists.
        #[arg(long)]
        force: bool,
        /// Parallel make jobs (default: number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Print the path of the built kernel (vmlinux) for this forkd version.
    Path,
}

pub fn run(ctx: &Context, cmd: KernelCommand) -> anyhow::Result<ExitCode> {
    let (dirs, verbose) = (&ctx.dirs, ctx.verbose);
    match cmd {
        KernelCommand::Build { force, jobs } => {
            let bar = Bar::new(verbose);
            let built = kernel::build(dirs, &BuildOptions { jobs, force }, &bar);
            bar.finish();
            let k = built?;
            println!("guest kernel ready: {}", k.vmlinux.display());
        }
        KernelCommand::Path => println!("{}", kernel::find_built(dirs)?.vmlinux.display()),
    }
    Ok(ExitCode::SUCCESS)
}
