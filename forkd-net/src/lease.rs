//! Persistent allocation of /30 slots from the pool: `<state_dir>/net/leases.json`, guarded
//! by an exclusive `flock` on `leases.lock`, so concurrent launchers and restarts never hand
//! one address to two sandboxes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::NetConfig;
use crate::NetError;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Leases {
    /// Slot number -> sandbox id.
    #[serde(default)]
    pub slots: BTreeMap<u32, String>,
    /// `net.ipv4.ip_forward` before our first sandbox turned it on; restored after the last.
    #[serde(default)]
    pub ip_forward_before: Option<String>,
}

/// The lease table, held under an exclusive lock until dropped.
pub struct LeaseLock {
    _lock: File,
    path: PathBuf,
    pub leases: Leases,
}

impl LeaseLock {
    pub fn acquire(cfg: &NetConfig) -> Result<Self, NetError> {
        let path = cfg.leases_path();
        let io_err =
            |what: &str, source: io::Error| NetError::Io { what: format!("{what} {}", path.display()), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err("creating the directory of", e))?;
        }
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err("opening the lock of", e))?;
        loop {
            // SAFETY: flock on a file we own.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("locking", err));
            }
        }
        let leases = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| NetError::Corrupt {
                path: path.clone(),
                why: format!("{e}; move it away and run cleanup_stale"),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Leases::default(),
            Err(e) => return Err(io_err("reading", e)),
        };
        Ok(LeaseLock { _lock: lock, path, leases })
    }

    pub fn save(&self) -> Result<(), NetError> {
        let io_err = |source: io::Error| NetError::Io { what: format!("writing {}", self.path.display()), source };
        let json = serde_json::to_vec_pretty(&self.leases).map_err(|e| io_err(io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(io_err)?;
        std::fs::rename(&tmp, &self.path).map_err(io_err)
    }

    pub fn slot_of(&self, id: &str) -> Option<u32> {
        self.leases.slots.iter().find(|(_, owner)| owner.as_str() == id).map(|(slot, _)| *slot)
    }

    /// The lowest slot neither leased nor `taken` elsewhere, recorded for `id` (not saved yet).
    pub fn allocate(&mut self, id: &str, slots: u32, taken: impl Fn(u32) -> bool) -> Result<u32, NetError> {
        let free =
            (0..slots).find(|s| !self.leases.slots.contains_key(s) && !taken(*s)).ok_or(NetError::PoolExhausted)?;
        self.leases.slots.insert(free, id.to_owned());
        Ok(free)
    }

    /// Forgets `id`'s slot (not saved yet).
    pub fn release(&mut self, id: &str) -> Option<u32> {
        let slot = self.slot_of(id)?;
        self.leases.slots.remove(&slot);
        Some(slot)
    }
}
