//! Persistent controller state: `state.json` (schema-versioned, written atomically under an
//! advisory lock, so several `forkd` processes can share a state directory) and the
//! append-only audit log `audit.jsonl`.

use crate::backend::RuntimeHandle;
use crate::error::{Error, Result};
use crate::sandbox::SandboxInfo;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Version of the `state.json` layout. Bump on incompatible changes and migrate in `load`.
pub const SCHEMA_VERSION: u32 = 1;

/// One sandbox as persisted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub info: SandboxInfo,
    pub runtime: RuntimeHandle,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateFile {
    pub schema_version: u32,
    pub sandboxes: Vec<Record>,
}

impl Default for StateFile {
    fn default() -> Self {
        Self { schema_version: SCHEMA_VERSION, sandboxes: Vec::new() }
    }
}

/// The state directory's `state.json`, `state.lock` and `audit.jsonl`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// An exclusive advisory lock on `state.lock`, released on drop.
pub struct StoreLock {
    _file: File,
}

fn io(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Takes the state lock (blocking). Hold it across read-modify-write.
    pub fn lock(&self) -> Result<StoreLock> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io(format!("creating {}", self.dir.display()), e))?;
        let path = self.dir.join("state.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(path.display(), e))?;
        // SAFETY: flock on a valid fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io("locking state.lock", std::io::Error::last_os_error()));
        }
        Ok(StoreLock { _file: file })
    }

    /// Reads `state.json`; a missing file is an empty state.
    pub fn load(&self) -> Result<StateFile> {
        let path = self.state_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateFile::default()),
            Err(e) => return Err(io(path.display(), e)),
        };
        let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| {
            Error::FailedPrecondition(format!(
                "{} is corrupt ({e}); move it aside to start with an empty state",
                path.display()
            ))
        })?;
        if state.schema_version > SCHEMA_VERSION {
            return Err(Error::FailedPrecondition(format!(
                "{} has schema version {}, newer than this forkd understands ({SCHEMA_VERSION}); upgrade forkd",
                path.display(),
                state.schema_version
            )));
        }
        Ok(state)
    }

    /// Writes `state.json` atomically: temp file, fsync, rename, fsync the directory.
    pub fn save(&self, state: &StateFile) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io(self.dir.display(), e))?;
        let tmp = self.dir.join(format!(".state.json.{}", std::process::id()));
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::internal(e.to_string()))?;
        let mut file = File::create(&tmp).map_err(|e| io(tmp.display(), e))?;
        file.write_all(&json).and_then(|_| file.sync_all()).map_err(|e| io(tmp.display(), e))?;
        std::fs::rename(&tmp, self.state_path()).map_err(|e| io("renaming state.json into place", e))?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Read-modify-write under the lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut StateFile) -> T) -> Result<T> {
        let _lock = self.lock()?;
        let mut state = self.load()?;
        let out = f(&mut state);
        self.save(&state)?;
        Ok(out)
    }

    /// Appends one audit record: who, what, when, result.
    pub fn audit(&self, who: &str, what: &str, target: Option<&str>, result: &Result<(), String>) {
        let line = serde_json::json!({
            "time_unix_ms": crate::time::now_unix_ms(),
            "who": who,
            "what": what,
            "target": target,
            "ok": result.is_ok(),
            "error": result.as_ref().err(),
        });
        let path = self.dir.join("audit.jsonl");
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&path) {
            // One write(2) per record keeps concurrent appends from interleaving.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxState;
    use crate::{SandboxId, SandboxSpec};

    fn record(id: &str) -> Record {
        Record {
            info: SandboxInfo {
                id: SandboxId::parse(id).unwrap(),
                spec: SandboxSpec::default(),
                state: SandboxState::Running,
                created_unix_ms: 1,
                parent: None,
                template: None,
                restored_from: None,
            },
            runtime: serde_json::json!({"pid": 1}),
        }
    }

    #[test]
    fn round_trips_and_updates_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert_eq!(store.load().unwrap(), StateFile::default());
        store.update(|s| s.sandboxes.push(record("sb-a"))).unwrap();
        store.update(|s| s.sandboxes.push(record("sb-b"))).unwrap();
        let state = store.load().unwrap();
        assert_eq!(state.sandboxes.len(), 2);
        assert_eq!(state.schema_version, SCHEMA_VERSION);
        assert!(!dir.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".state")));
    }

    #[test]
    fn corrupt_or_future_state_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        assert!(store.load().unwrap_err().to_string().contains("corrupt"));
        std::fs::write(dir.path().join("state.json"), br#"{"schema_version": 99, "sandboxes": []}"#).unwrap();
        assert!(store.load().unwrap_err().to_string().contains("upgrade forkd"));
    }

    #[test]
    fn audit_appends_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.audit("cli", "create", Some("sb-1"), &Ok(()));
        store.audit("cli", "destroy", Some("sb-1"), &Err("boom".into()));
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["ok"], false);
        assert_eq!(lines[1]["error"], "boom");
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let store = Store::new(dir.path());
                std::thread::spawn(move || store.update(|s| s.sandboxes.push(record(&format!("sb-{i}")))).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(Store::new(dir.path()).load().unwrap().sandboxes.len(), 8);
    }
}
