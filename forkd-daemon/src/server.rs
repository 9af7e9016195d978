//! Listeners, lifecycle and wiring of the daemon.

use crate::api::{Shared, EVENT_BACKLOG};
use crate::auth::{self, Token};
use crate::grpc::Grpc;
use crate::metrics::Metrics;
use crate::rest;
use crate::uds_authority::UnixGrpcListener;
use forkd_core::Controller;
use forkd_core::Dirs;
use forkd_proto::convert::MAX_MESSAGE_BYTES;
use forkd_proto::v1::{
    daemon_server::DaemonServer, images_server::ImagesServer, sandboxes_server::SandboxesServer,
    snapshots_server::SnapshotsServer,
};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// The TCP listener: every call must carry `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct TcpConfig {
    pub addr: SocketAddr,
    pub token: forkd_core::token::BearerToken,
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig").field("addr", &self.addr).field("token", &"<redacted>").finish()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The Unix socket (created with `socket_mode`; its directory is created if missing).
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub tcp: Option<TcpConfig>,
    /// How often sandboxes are checked for a VMM that died.
    pub refresh_interval: Duration,
    /// How long in-flight calls may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

impl Config {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            socket_mode: 0o660,
            tcp: None,
            refresh_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// One daemon per state directory: an exclusive lock on `daemon.lock`, released when the
/// process dies (so a `kill -9` never leaves a stale lock).
fn lock_state_dir(dir: &Path) -> Result<File, DaemonError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let path = dir.join("daemon.lock");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(path.display().to_string()))?;
    // SAFETY: flock on a valid fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(DaemonError::Setup(format!(
            "another forkd daemon (pid {}) serves {}; stop it first",
            holder.trim(),
            dir.display()
        )));
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

/// Binds the Unix socket, replacing a stale socket file but never a live daemon's.
fn bind_unix(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Setup(format!("a daemon already listens on {}", path.display())));
        }
        std::fs::remove_file(path).map_err(io_err(format!("removing stale socket {}", path.display())))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io_err(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    Ok(listener)
}

async fn refresh_loop(controller: Arc<Controller>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let c = controller.clone();
                let _ = tokio::task::spawn_blocking(move || c.refresh()).await;
            }
            _ = stop.changed() => return,
        }
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Serves the API until `shutdown` completes, then drains for `config.shutdown_grace`.
/// Sandboxes keep running after the daemon stops.
pub async fn serve(
    controller: Arc<Controller>,
    dirs: Dirs,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let _state_lock = match controller.state_dir() {
        Some(dir) => Some(lock_state_dir(dir)?),
        None => None,
    };
    let unix = bind_unix(&config.socket, config.socket_mode)?;
    let tcp = match &config.tcp {
        Some(t) => {
            Some(tokio::net::TcpListener::bind(t.addr).await.map_err(io_err(format!("binding TCP {}", t.addr)))?)
        }
        None => None,
    };

    let metrics = Arc::new(Metrics::default());
    let (events, _) = broadcast::channel(EVENT_BACKLOG);
    let _subscription = {
        let (events, metrics) = (events.clone(), metrics.clone());
        controller.subscribe(move |e| {
            metrics.on_event(e);
            let _ = events.send(e.clone());
        })
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let state_dir = controller
        .state_dir()
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()).display().to_string())
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        controller: controller.clone(),
        dirs,
        metrics: metrics.clone(),
        events,
        shutdown: stop_rx.clone(),
        started_unix_ms: now_unix_ms(),
        state_dir,
    });
    let refresher = tokio::spawn(refresh_loop(controller.clone(), config.refresh_interval, stop_rx.clone()));

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<SandboxesServer<Grpc>>().await;
    health_reporter.set_serving::<ImagesServer<Grpc>>().await;
    health_reporter.set_serving::<SnapshotsServer<Grpc>>().await;
    health_reporter.set_serving::<DaemonServer<Grpc>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(forkd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| DaemonError::Setup(format!("reflection: {e}")))?;
    let reflection_v1alpha =
        reflection().build_v1alpha().map_err(|e| DaemonError::Setup(format!("reflection: {e}")))?;
    let grpc = Grpc(shared.clone());
    let limit = MAX_MESSAGE_BYTES + (64 << 10);
    let app = tonic::service::Routes::from(rest::router(shared.clone()))
        .add_service(
            SandboxesServer::new(grpc.clone()).max_decoding_message_size(limit).max_encoding_message_size(limit),
        )
        .add_service(ImagesServer::new(grpc.clone()))
        .add_service(SnapshotsServer::new(grpc.clone()))
        .add_service(DaemonServer::new(grpc))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare()
        .into_axum_router();

    tracing::info!(
        socket = %config.socket.display(),
        tcp = ?config.tcp.as_ref().map(|t| t.addr),
        sandboxes = controller.list().len(),
        "forkd daemon listening"
    );

    // Shutdown: stop accepting, end Watch streams, give calls in flight a grace period.
    let (quit_tx, _) = broadcast::channel::<()>(1);
    let signal = {
        let (quit_tx, stop_tx) = (quit_tx.clone(), stop_tx);
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            let _ = quit_tx.send(());
        }
    };
    let graceful = |mut rx: broadcast::Receiver<()>| async move {
        let _ = rx.recv().await;
    };
    let unix_server = axum::serve(UnixGrpcListener(unix), app.clone().into_make_service())
        .with_graceful_shutdown(graceful(quit_tx.subscribe()));
    let tcp_server = tcp.map(|listener| {
        let token = Token { expected: config.tcp.as_ref().map(|t| t.token.clone()), metrics: metrics.clone() };
        let app = app.clone().layer(axum::middleware::from_fn_with_state(token, auth::require_token));
        axum::serve(listener, app.into_make_service()).with_graceful_shutdown(graceful(quit_tx.subscribe()))
    });
    let servers = async move {
        let unix = tokio::spawn(async move { unix_server.await });
        let tcp = tcp_server.map(|s| tokio::spawn(async move { s.await }));
        let _ = unix.await;
        if let Some(tcp) = tcp {
            let _ = tcp.await;
        }
    };
    let mut quit_rx = quit_tx.subscribe();
    tokio::spawn(signal);
    tokio::select! {
        _ = servers => {}
        _ = async {
            let _ = quit_rx.recv().await;
            tokio::time::sleep(config.shutdown_grace).await;
        } => tracing::info!("calls still in flight after {:?}; leaving anyway", config.shutdown_grace),
    }
    refresher.abort();
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// Serves on a new multi-threaded runtime until SIGINT or SIGTERM.
pub fn run(controller: Arc<Controller>, dirs: Dirs, config: Config) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("forkd-daemon")
        .max_blocking_threads(1024)
        .build()
        .map_err(io_err("starting the async runtime"))?;
    let result = runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(io_err("SIGTERM handler"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(io_err("SIGINT handler"))?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        serve(controller, dirs, config, shutdown).await
    });
    // Commands still running on the blocking pool are abandoned, not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
