//! The forkd daemon: the `forkd.v1` gRPC API (see `forkd-proto`) and a REST/JSON mirror over
//! one [`forkd_core::Controller`], served on a Unix socket and optionally on TCP with a bearer
//! token, with `grpc.health.v1` health, server reflection and Prometheus metrics.
//!
//! Sandboxes are separate VMM processes: the daemon can crash or restart without taking them
//! down, and re-adopts them on start (`Controller::open`).
//!
//! ```no_run
//! # fn doc(controller: forkd_core::Controller) -> Result<(), forkd_daemon::DaemonError> {
//! let dirs = forkd_core::Dirs::from_env();
//! let config = forkd_daemon::Config::new("/run/forkd/forkd.sock");
//! forkd_daemon::run(std::sync::Arc::new(controller), dirs, config) // until SIGINT/SIGTERM
//! # }
//! ```
//!
//! `forkd-client` is the Rust client for the API.

mod api;
mod auth;
mod bridge;
mod grpc;
mod metrics;
pub mod rest;
mod server;
mod uds_authority;

pub use server::{run, serve, Config, DaemonError, TcpConfig};
