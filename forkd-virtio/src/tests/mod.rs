//! Integration-style unit tests: a mock guest driver against the real
//! transport, devices and event loop, without a VM.

mod block;
mod mock_driver;
mod rng;
mod robustness;
mod transport;
mod vsock;
