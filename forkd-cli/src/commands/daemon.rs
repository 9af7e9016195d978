//! `forkd daemon`: serve the forkd.v1 gRPC API and its REST mirror over this host's state
//! directory. Sandboxes outlive the daemon and are re-adopted when it starts again.

use crate::context::Context;
use anyhow::{bail, Context as _};
use clap::Args;
use forkd_core::ControllerOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args)]
#[command(after_help = "Examples:
  forkd daemon                                   serve /var/lib/forkd on /run/forkd/forkd.sock
  forkd daemon --state-dir /tmp/s --socket /tmp/s/forkd.sock
  openssl rand -hex 32 > /etc/forkd/token && chmod 600 /etc/forkd/token
  forkd daemon --tcp 127.0.0.1:7070 --token-file /etc/forkd/token
  FORKD_SOCKET=/tmp/s/forkd.sock forkd ls        other commands then go through the daemon

The REST mirror answers on the same listeners:
  curl --unix-socket /run/forkd/forkd.sock http://forkd/v1/sandboxes")]
pub struct DaemonArgs {
    /// Also listen on TCP at ADDR (e.g. 127.0.0.1:7070); every call there must carry
    /// `authorization: Bearer <token>` with the token in --token-file.
    #[arg(long, value_name = "ADDR", requires = "token_file")]
    pub tcp: Option<SocketAddr>,
    /// File holding the TCP bearer token (one line, at least 16 characters; chmod 600).
    #[arg(long, value_name = "FILE", requires = "tcp")]
    pub token_file: Option<PathBuf>,
    /// Permission bits of the Unix socket, octal.
    #[arg(long, default_value = "660", value_name = "MODE")]
    pub socket_mode: String,
    /// Most sandbox boots in flight at once; more get RESOURCE_EXHAUSTED with a retry hint.
    #[arg(long, value_name = "N")]
    pub max_concurrent_creates: Option<usize>,
    /// Most BRANCH operations in flight at once.
    #[arg(long, value_name = "N")]
    pub max_concurrent_branches: Option<usize>,
    /// Most running sandboxes at once (a BRANCH of N counts N).
    #[arg(long, value_name = "N")]
    pub max_sandboxes: Option<usize>,
}

pub fn run(ctx: &Context, args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let (dirs, socket) = (&ctx.dirs, ctx.socket());
    if let Some(pid) = dirs.daemon_pid() {
        bail!("another forkd daemon (pid {pid}) serves {}; stop it first", dirs.state.display());
    }
    let mode = u32::from_str_radix(&args.socket_mode, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .with_context(|| format!("invalid --socket-mode `{}`: give octal bits like 660", args.socket_mode))?;
    let mut config = forkd_daemon::Config::new(&socket);
    config.socket_mode = mode;
    if let (Some(addr), Some(file)) = (args.tcp, &args.token_file) {
        config.tcp = Some(forkd_daemon::TcpConfig { addr, token: forkd_core::token::BearerToken::from_file(file)? });
    }
    let options = ControllerOptions {
        max_concurrent_creates: args.max_concurrent_creates,
        max_concurrent_branches: args.max_concurrent_branches,
        max_sandboxes: args.max_sandboxes,
    };
    let controller = forkd_client::open_controller(dirs, ctx.kvm_options(), "daemon", options)?;
    // Namespaces, links and cgroups of sandboxes that died with the host or a crash.
    if let Err(e) = controller.cleanup_stale() {
        tracing::warn!("cleaning up after dead sandboxes: {e}");
    }
    forkd_daemon::run(Arc::new(controller), dirs.clone(), config)?;
    Ok(ExitCode::SUCCESS)
}
