//! `forkd`: microVM sandboxes for AI agents, with live BRANCH.

mod commands;
mod context;
mod progress;
mod signals;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status for forkd's own failures (the command's status is passed through otherwise).
pub const EXIT_FORKD_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "forkd",
    version,
    about = "MicroVM sandboxes for AI agents: boot, run code, and BRANCH a running sandbox into many.",
    after_help = "Examples:\n  forkd run -- uname -a                     boot a sandbox, run a command, tear down\n  ID=$(forkd create)                        boot a sandbox and keep it\n  forkd exec $ID -- sh -c 'echo hi > /root/a'\n  forkd branch $ID -n 4                     fork it into 4 children (it keeps running)\n  forkd eval $ID 'x = 41; x + 1'            run code in a long-lived interpreter (state persists)\n  forkd snapshot create $ID --tag ready      durable snapshot, written in the background\n  forkd create --snapshot ready -n 4        4 sandboxes from it\n  forkd template create default             later `forkd run` forks this instead of booting\n  forkd run --memory 512M -- sh -c 'echo hi'\n  forkd kernel build                        build the guest kernel (once, ~4 min)\n  forkd image build tiny                    build the small busybox image\n  forkd doctor                              check this host\n  forkd daemon                              serve the gRPC/REST API on /run/forkd/forkd.sock\n\nWith a daemon answering on --socket (FORKD_SOCKET, default /run/forkd/forkd.sock), create,\nexec, branch, ls, inspect, rm, cp, logs, images, snapshot, template and run go through it; otherwise\nthey work on the state directory directly.\n\nExit status: the command's own status for `run` and `exec`; 125 when forkd itself fails."
)]
struct Cli {
    /// State directory (images, sandboxes).
    #[arg(long, global = true, env = "FORKD_STATE_DIR", default_value = "/var/lib/forkd")]
    state_dir: PathBuf,
    /// Cache directory (kernel builds).
    #[arg(long, global = true, env = "FORKD_CACHE_DIR", default_value = "/var/cache/forkd")]
    cache_dir: PathBuf,
    /// The daemon's Unix socket. Commands use the daemon when it answers there.
    #[arg(long, global = true, env = "FORKD_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Show more detail (tool output during builds, debug logs).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one command in a new sandbox (forked from a template or booted), stream its output,
    /// tear down, exit with the command's status.
    Run(commands::run::RunArgs),
    /// Create a sandbox (boot, or fork a template with --from) and print its id.
    Create(commands::sandbox::CreateArgs),
    /// Run a command in a sandbox; output and exit status pass through.
    Exec(commands::sandbox::ExecArgs),
    /// Run code in a sandbox's long-lived interpreter (a code context): state persists between
    /// snippets, and BRANCH children inherit it.
    Eval(commands::eval::EvalArgs),
    /// List (or --close) a sandbox's code contexts.
    Contexts(commands::eval::ContextsArgs),
    /// Fork a running sandbox into N children that continue from its exact state.
    Branch(commands::sandbox::BranchArgs),
    /// List sandboxes with their memory use (PSS shows what BRANCH children share).
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show everything about one sandbox as JSON.
    Inspect { id: String },
    /// Print a sandbox's console log.
    Logs {
        id: String,
        /// Show at most this many bytes from the end.
        #[arg(long, default_value_t = 64 * 1024)]
        tail: u64,
    },
    /// Copy a file between the host and a sandbox: `forkd cp ./a ID:/root/a` or the reverse.
    Cp { src: String, dst: String },
    /// Stop and remove sandboxes.
    #[command(alias = "destroy")]
    Rm {
        ids: Vec<String>,
        /// Remove every sandbox.
        #[arg(long)]
        all: bool,
    },
    /// Durable snapshots: create (in the background, millisecond pause), ls, inspect, rm,
    /// compact, verify; restore with `forkd create --snapshot TAG`.
    #[command(subcommand)]
    Snapshot(commands::snapshot::SnapshotCommand),
    /// Manage templates: idle sandboxes that new sandboxes are forked from.
    #[command(subcommand)]
    Template(commands::template::TemplateCommand),
    /// Build or locate the guest kernel.
    #[command(subcommand)]
    Kernel(commands::kernel::KernelCommand),
    /// Build, import, list and remove root filesystem images.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// List root filesystem images (like `forkd image ls`, through the daemon when it runs).
    Images {
        #[arg(long)]
        json: bool,
    },
    /// Serve the forkd.v1 gRPC API and a REST/JSON mirror on a Unix socket (and optionally
    /// TCP with a bearer token). Sandboxes keep running when it stops and are re-adopted on start.
    Daemon(commands::daemon::DaemonArgs),
    /// Check that this host can run sandboxes, and say what to fix.
    Doctor {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let ctx = context::Context::new(
        forkd_core::Dirs { state: cli.state_dir.clone(), cache: cli.cache_dir.clone() },
        cli.socket.clone(),
        matches.value_source("state_dir").is_some_and(|s| s != ValueSource::DefaultValue),
        cli.verbose,
    );
    let daemon = matches!(cli.command, Command::Daemon(_));
    let filter = if cli.verbose || daemon { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FORKD_LOG").unwrap_or_else(|_| filter.into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => commands::run::run(&ctx, args),
        Command::Create(args) => commands::sandbox::create(&ctx, args),
        Command::Exec(args) => commands::sandbox::exec(&ctx, args),
        Command::Branch(args) => commands::sandbox::branch(&ctx, args),
        Command::Eval(args) => commands::eval::eval(&ctx, args),
        Command::Contexts(args) => commands::eval::contexts(&ctx, args),
        Command::Ls { json } => commands::sandbox::ls(&ctx, json),
        Command::Inspect { id } => commands::sandbox::inspect(&ctx, &id),
        Command::Logs { id, tail } => commands::sandbox::logs(&ctx, &id, tail),
        Command::Cp { src, dst } => commands::sandbox::cp(&ctx, &src, &dst),
        Command::Rm { ids, all } => commands::sandbox::rm(&ctx, &ids, all),
        Command::Snapshot(cmd) => commands::snapshot::run(&ctx, cmd),
        Command::Template(cmd) => commands::template::run(&ctx, cmd),
        Command::Kernel(cmd) => commands::kernel::run(&ctx, cmd),
        Command::Image(cmd) => commands::image::run(&ctx, cmd),
        Command::Images { json } => commands::image::images(&ctx, json),
        Command::Daemon(args) => commands::daemon::run(&ctx, args),
        Command::Doctor { json } => commands::doctor(&ctx, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forkd: error: {e:#}");
            ExitCode::from(EXIT_FORKD_ERROR)
        }
    }
}
