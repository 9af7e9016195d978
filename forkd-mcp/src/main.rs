//! forkd-mcp: forkd's sandboxes as MCP tools. A thin shell over `forkd-client`: stdio by
//! default (what Claude Desktop, Claude Code and Cursor start), or streamable HTTP with a
//! bearer token. It uses the daemon when one answers, else it runs sandboxes itself on the
//! state directory, like the `forkd` CLI.

mod http;
mod output;
mod params;
mod server;
mod session;

use anyhow::Context as _;
use clap::Parser;
use forkd_client::{Client, ConnectOptions};
use forkd_core::token::BearerToken;
use rmcp::ServiceExt;
use server::ForkdMcp;
use session::{Cleanup, Session};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// forkd's MCP server: boot, run code in, BRANCH, snapshot and remove microVM sandboxes from
/// an MCP client.
///
/// Register it with a client as a stdio server (`forkd-mcp` with no arguments); see the
/// README for Claude Desktop, Claude Code and Cursor snippets. It talks to the forkd daemon
/// when one answers on its socket, else it runs sandboxes itself (as root, with /dev/kvm).
#[derive(Parser)]
#[command(name = "forkd-mcp", version, max_term_width = 100)]
struct Args {
    /// Serve MCP over streamable HTTP at this address (endpoint `/mcp`) instead of stdio.
    /// Needs --token-file.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// With --http: file holding the bearer token clients must send (`Authorization: Bearer
    /// <token>`; make one with `openssl rand -hex 32 > FILE; chmod 600 FILE`).
    #[arg(long, value_name = "FILE", requires = "http")]
    token_file: Option<PathBuf>,
    /// Remove the sandboxes a session created when it ends (stdin closes, the HTTP session is
    /// deleted or expires). A tool call can still ask for this per sandbox.
    #[arg(long)]
    cleanup: bool,
    /// The daemon's socket (default: $FORKD_SOCKET, else /run/forkd/forkd.sock when a daemon
    /// answers there).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Largest output returned by one exec or eval call, per stream, in bytes; longer output
    /// is cut in the middle with a marker. Tool calls can ask for less.
    #[arg(long, default_value_t = output::DEFAULT_LIMIT, value_name = "BYTES")]
    max_output: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // stdout is the JSON-RPC channel in stdio mode: logs go to stderr only.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if args.http.is_some() && args.token_file.is_none() {
        anyhow::bail!("--http needs --token-file FILE (clients send `Authorization: Bearer <token>`)");
    }
    let token = args.token_file.as_deref().map(BearerToken::from_file).transpose()?;
    let mut connect = ConnectOptions::from_env();
    if args.socket.is_some() {
        connect.socket = args.socket.clone();
    }
    let client = Arc::new(Client::connect(&connect).context("connecting to forkd")?);
    match client.daemon_target() {
        Some(target) => tracing::info!("using the forkd daemon at {target:?}"),
        None => tracing::info!("no daemon: running sandboxes on {}", connect.dirs.state.display()),
    }
    let cleanup = if args.cleanup { Cleanup::OnSessionEnd } else { Cleanup::KeepUnlessAsked };
    let config = server::Config { client, dirs: connect.dirs.clone(), cleanup, max_output: args.max_output };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        match (args.http, token) {
            (Some(addr), Some(token)) => http::serve(addr, token, config).await,
            _ => serve_stdio(config).await,
        }
    });
    // Blocking calls still running (a long exec) must not keep the process alive after the
    // client went away.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    session::wait_for_cleanups();
    result
}

/// One session for the life of the process; it ends when the client closes stdin or sends
/// SIGTERM/SIGINT.
async fn serve_stdio(config: server::Config) -> anyhow::Result<()> {
    let session = Session::new(config.client.clone(), config.cleanup);
    let handler = ForkdMcp::new(config, session.clone());
    let running = handler.serve(rmcp::transport::stdio()).await.context("MCP handshake on stdio")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        quit = running.waiting() => tracing::info!("stdio session ended: {quit:?}"),
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
    session.end().await;
    Ok(())
}
