//! The VMM control protocol: one JSON request line, one JSON response line, per connection on
//! the sandbox's control socket. Used by the launcher (status, shutdown) and by BRANCH.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Report state and counters.
    Status,
    /// Park every vCPU.
    Pause,
    /// Let parked vCPUs run again.
    Resume,
    /// Stop the VM and exit the VMM process.
    Shutdown,
    /// Fork the running VM into one child per directory (which must exist). A VM with a
    /// network device needs one tap fd per child, passed with the request (SCM_RIGHTS).
    Branch {
        children: Vec<std::path::PathBuf>,
        /// The last fd passed (after the taps) is the read end of a pipe, the *start gate*:
        /// each child rebuilds its VM but starts its vCPU threads only at end of file on it.
        /// A launcher that moves the children into their own cgroups sets it and closes the
        /// write end once they are all moved: moving a process takes a host-wide lock that
        /// every thread creation also takes, and children starting threads while siblings are
        /// being moved stall each other (seconds for 100 children on two CPUs).
        #[serde(default)]
        gate: bool,
    },
    /// Make one system call outside the seccomp allow-list (a harmless `syslog` size query):
    /// the self-test showing that a jailed VMM dies and is reported as killed by seccomp. An
    /// unjailed VMM answers with an error.
    ProbeSeccomp,
    /// Pause, write all guest RAM to the file passed with the request (or `path`, which a
    /// jailed VMM cannot open; `path` names the file in messages), resume: the classic
    /// file-snapshot method, kept as the baseline BRANCH is measured against.
    DumpMemory { path: std::path::PathBuf },
    /// Pause, hand every all-zero guest page back to the host, resume
    /// (`memory::release_zero_pages`). Launchers send it once the guest has booted.
    ReleaseZeroPages,
    /// Write a durable snapshot in the background (`snapshot`): pause as for a BRANCH, fork a
    /// writer, resume. Fds passed with the request: the snapshot store's root directory, the
    /// staging directory (the disk layers already linked into it), and with `diff` the
    /// parent's `memory.pages`.
    Snapshot { manifest: Box<forkd_snapshot::Manifest>, diff: bool },
}

/// What the source reports once its snapshot writer runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotReport {
    /// How long the source's vCPUs were stopped.
    pub pause_us: u64,
    /// The writer process; the snapshot is durable once it exits and the snapshot is listed.
    pub writer_pid: u32,
    pub writer_start_time: u64,
    /// The disk layers the snapshot holds, bottom to top (now immutable).
    pub layers: Vec<String>,
}

/// What `release_zero_pages` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseReport {
    /// How long the vCPUs were stopped.
    pub pause_us: u64,
    #[serde(flatten)]
    pub pages: crate::memory::ZeroPageRelease,
}

/// What `dump_memory` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DumpReport {
    pub pause_us: u64,
    pub bytes: u64,
}

/// One child of a BRANCH.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BranchChild {
    pub pid: u32,
    /// Process start time (clock ticks since boot), to tell the child from a reused pid.
    pub start_time: u64,
    pub dir: std::path::PathBuf,
}

/// What the source reports after a BRANCH.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BranchReport {
    /// How long the source's vCPUs were stopped.
    pub pause_us: u64,
    pub children: Vec<BranchChild>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<BranchReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump: Option<DumpReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReport>,
}

impl ControlResponse {
    pub fn ok() -> Self {
        Self { ok: true, error: None, status: None, branch: None, dump: None, release: None, snapshot: None }
    }
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            status: None,
            branch: None,
            dump: None,
            release: None,
            snapshot: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmStatus {
    pub pid: u32,
    pub state: String,
    pub uptime_ms: u64,
    /// CLOCK_MONOTONIC (ns) when this VMM began serving its VM: after boot, or for a BRANCH
    /// child once its VM was rebuilt and its vCPUs started. Lets a caller time a fan-out from
    /// the children's own clocks instead of from when it got around to asking them.
    #[serde(default)]
    pub serving_since_ns: u64,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cpu_profile: String,
    /// Instructions the VMM completed for the host's KVM, by mnemonic.
    pub emulated: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach VMM control socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("VMM control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("VMM sent an invalid response: {0}")]
    InvalidResponse(#[source] serde_json::Error),
    #[error("the VMM closed the connection without a response (it may have exited; see its vmm.log)")]
    NoResponse,
    #[error("invalid request: {0}")]
    InvalidRequest(#[source] serde_json::Error),
    #[error("request longer than {0} bytes")]
    RequestTooLong(usize),
    #[error("VMM refused the request: {0}")]
    Refused(String),
}

/// The host's CLOCK_MONOTONIC in nanoseconds: comparable across processes, unlike `Instant`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sends one request and waits for its response.
pub fn request(socket: &Path, req: &ControlRequest, timeout: Duration) -> Result<ControlResponse, ControlError> {
    request_with_fds(socket, req, &[], timeout)
}

/// Sends one request with `fds` attached (SCM_RIGHTS) and waits for its response.
pub fn request_with_fds(
    socket: &Path,
    req: &ControlRequest,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|source| ControlError::Connect { path: socket.display().to_string(), source })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req).map_err(ControlError::InvalidRequest)?;
    line.push('\n');
    if fds.is_empty() {
        stream.write_all(line.as_bytes())?;
    } else {
        // The fds ride on the first chunk; the rest of the line follows as plain bytes.
        let sent = forkd_net::fdpass::send_with_fds(stream.as_fd(), line.as_bytes(), fds)?;
        stream.write_all(&line.as_bytes()[sent..])?;
    }
    let mut reader = BufReader::new(stream);
    let mut resp = String::new();
    reader.read_line(&mut resp)?;
    if resp.is_empty() {
        return Err(ControlError::NoResponse);
    }
    let resp: ControlResponse = serde_json::from_str(&resp).map_err(ControlError::InvalidResponse)?;
    match (&resp.ok, &resp.error) {
        (false, Some(e)) => Err(ControlError::Refused(e.clone())),
        (false, None) => Err(ControlError::Refused("unspecified error".into())),
        _ => Ok(resp),
    }
}

/// Reads one request from a freshly accepted connection (bounded in size and time, so a stuck
/// or hostile client cannot stall the VMM's event loop for long).
pub fn read_request(stream: &UnixStream) -> Result<ControlRequest, ControlError> {
    read_request_with_fds(stream).map(|(req, _)| req)
}

/// Like [`read_request`], also returning the fds that came with the request.
pub fn read_request_with_fds(stream: &UnixStream) -> Result<(ControlRequest, Vec<OwnedFd>), ControlError> {
    const MAX: usize = 64 * 1024;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.contains(&b'\n') {
        let (n, got) = forkd_net::fdpass::recv_with_fds(stream.as_fd(), &mut buf)?;
        fds.extend(got);
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX {
            return Err(ControlError::RequestTooLong(MAX));
        }
    }
    let text = String::from_utf8_lossy(&line);
    let req = serde_json::from_str(text.trim()).map_err(ControlError::InvalidRequest)?;
    Ok((req, fds))
}

/// Writes one response line.
pub fn write_response(mut stream: &UnixStream, resp: &ControlResponse) {
    if let Ok(mut line) = serde_json::to_string(resp) {
        line.push('\n');
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = stream.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let json = serde_json::to_string(&ControlRequest::Status).unwrap();
        assert_eq!(json, r#"{"cmd":"status"}"#);
        let back: ControlRequest = serde_json::from_str(r#"{"cmd":"shutdown"}"#).unwrap();
        assert_eq!(back, ControlRequest::Shutdown);
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"explode"}"#).is_err());
    }

    #[test]
    fn client_and_server_halves_talk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let req = read_request(&s).unwrap();
            assert_eq!(req, ControlRequest::Pause);
            write_response(&s, &ControlResponse::error("not now"));
        });
        let err = request(&path, &ControlRequest::Pause, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, ControlError::Refused(ref m) if m == "not now"));
        server.join().unwrap();
    }
}
