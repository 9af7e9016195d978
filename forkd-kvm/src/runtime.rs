//! How to reach one sandbox's VMM: the runtime handle the controller persists, and what a
//! VMM that went away left behind to say why.

use crate::process;
use forkd_cgroup::SandboxCgroup;
use forkd_core::{Error, Result, RuntimeHandle};
use forkd_net::SandboxNetwork;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How to reach one sandbox's VMM. Persisted by the controller as the runtime handle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmmRuntime {
    pub dir: PathBuf,
    pub pid: u32,
    /// With `pid`, identifies the process even if the pid is reused.
    pub start_time: u64,
    pub config: PathBuf,
    pub control_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub console_log: PathBuf,
    pub vmm_log: PathBuf,
    /// The sandbox's network namespace, tap and veth (mode `nat`), or nothing (mode `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<SandboxNetwork>,
    /// The cgroup holding the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<SandboxCgroup>,
    /// The snapshot the sandbox was restored from (what a diff of it builds on, lacking a
    /// later snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
}

impl VmmRuntime {
    /// The VMM `pid` serving the sandbox directory `dir` (whose files have their fixed names).
    pub fn in_dir(
        dir: &Path,
        pid: u32,
        start_time: u64,
        net: Option<SandboxNetwork>,
        cgroup: Option<SandboxCgroup>,
    ) -> Self {
        VmmRuntime {
            dir: dir.to_path_buf(),
            pid,
            start_time,
            config: dir.join("vm.json"),
            control_socket: dir.join("control.sock"),
            vsock_socket: dir.join("vsock.sock"),
            console_log: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            net,
            cgroup,
            restored_from: None,
        }
    }

    pub fn from_handle(handle: &RuntimeHandle) -> Result<Self> {
        serde_json::from_value(handle.clone())
            .map_err(|e| Error::internal(format!("corrupt sandbox runtime record: {e}")))
    }

    pub fn to_handle(&self) -> RuntimeHandle {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn alive(&self) -> bool {
        process::is_alive(self.pid, self.start_time)
    }

    /// Why the VMM is gone: its cgroup's OOM kill ("killed by memory limit"), its own last
    /// error line (including "killed by seccomp: syscall N"), or just gone.
    pub fn exit_reason(&self) -> String {
        if let Some(cg) = &self.cgroup {
            if cg.oom_kills().unwrap_or(0) > 0 {
                let limit = cg.limits.memory_bytes.map(|b| format!(" of {} MiB", b >> 20)).unwrap_or_default();
                return format!(
                    "killed by memory limit{limit}: the VMM (guest RAM it touched plus its own) exceeded it"
                );
            }
        }
        match process::last_error(&self.vmm_log) {
            Some(line) => line,
            None => "VMM process is gone".into(),
        }
    }

    /// The VMM's last error line, or else the tail of its log (for reports of a failed start).
    pub fn failure_report(&self) -> String {
        process::last_error(&self.vmm_log).unwrap_or_else(|| {
            let tail = String::from_utf8_lossy(&process::tail(&self.vmm_log, 1500)).trim().to_string();
            if tail.is_empty() {
                format!("its VMM exited without a word in {}", self.vmm_log.display())
            } else {
                format!("its VMM exited; log tail:\n{tail}")
            }
        })
    }
}
