//! The forkd guest agent's wire protocol ([`proto`]) and host-side client ([`client`]).
//!
//! The agent itself is the `forkd-agent` binary of this crate: a static executable that runs
//! as PID 1 in every sandbox and serves [`proto`] on vsock port [`proto::DEFAULT_PORT`].

pub mod client;
pub mod proto;
