//! What every command gets: the host directories, how to find the daemon, verbosity, and the
//! forkd client they all go through.

use forkd_client::{Client, ConnectOptions};
use forkd_core::Dirs;
use forkd_kvm::KvmOptions;
use std::path::PathBuf;

pub struct Context {
    pub dirs: Dirs,
    pub verbose: bool,
    connect: ConnectOptions,
}

impl Context {
    /// `socket`: the one the user named (`--socket`, `FORKD_SOCKET`), if any.
    pub fn new(dirs: Dirs, socket: Option<PathBuf>, state_dir_explicit: bool, verbose: bool) -> Self {
        let connect = ConnectOptions {
            dirs: dirs.clone(),
            socket,
            state_dir_explicit,
            kvm: KvmOptions { console_echo: verbose, ..KvmOptions::default() },
        };
        Self { dirs, verbose, connect }
    }

    /// The daemon when one answers on the socket (a named socket must answer), else an
    /// embedded controller over this host's state directory (shared with other `forkd`
    /// processes).
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.connect)?)
    }

    /// The socket the daemon listens on (or is looked for on).
    pub fn socket(&self) -> PathBuf {
        self.connect.socket_path()
    }

    pub fn kvm_options(&self) -> KvmOptions {
        self.connect.kvm.clone()
    }
}
