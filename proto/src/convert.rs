//! Between forkd-core types and the wire (protobuf), and errors to gRPC statuses and back:
//! what the daemon and its clients share, so a type or an error means the same on both ends.

use crate::v1 as pb;
use forkd_core::{
    BranchOptions, ContextInfo, DirEntry, Error, ErrorCode, EvalError, EvalRequest, EvalResult, Event, EventKind,
    ExecOutcome, ExecRequest, ExitStatus, ImageInfo, MemoryUsage, NetworkMode, NetworkPolicy, ResourceLimits,
    ResourceUsage, SandboxId, SandboxInfo, SandboxSpec, SandboxState, SnapshotInfo, SnapshotKind, SnapshotResult,
    VerifyReport,
};
use std::path::PathBuf;
use std::time::Duration;

/// Largest stdin an Exec may carry, and the message size limit of the gRPC services.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Console bytes returned when the request does not say.
pub const DEFAULT_CONSOLE_BYTES: u64 = 64 << 10;

/// The gRPC code for a forkd error code.
pub fn grpc_code(code: ErrorCode) -> tonic::Code {
    match code {
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorCode::Unavailable => tonic::Code::Unavailable,
        ErrorCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorCode::Cancelled => tonic::Code::Cancelled,
        ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorCode::Internal => tonic::Code::Internal,
    }
}

/// The metadata key carrying the retry hint of RESOURCE_EXHAUSTED.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// A gRPC status with the error's message (and retry hint).
pub fn status(e: &Error) -> tonic::Status {
    let mut status = tonic::Status::new(grpc_code(e.code()), e.to_string());
    if let Error::ResourceExhausted { retry_after_ms, .. } = e {
        if let Ok(v) = retry_after_ms.to_string().parse() {
            status.metadata_mut().insert(RETRY_AFTER_MS, v);
        }
    }
    status
}

pub fn parse_id(text: &str) -> Result<SandboxId, Error> {
    SandboxId::parse(text)
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub fn sandbox(info: &SandboxInfo, memory: Option<MemoryUsage>) -> pb::Sandbox {
    let (state, exit_reason) = match &info.state {
        SandboxState::Running => (pb::SandboxState::Running, String::new()),
        SandboxState::Exited(why) => (pb::SandboxState::Exited, why.clone()),
    };
    pb::Sandbox {
        id: info.id.to_string(),
        state: state as i32,
        exit_reason,
        image: info.spec.image.clone(),
        memory_mib: info.spec.memory_mib,
        vcpus: info.spec.vcpus as u32,
        labels: info.spec.labels.clone().into_iter().collect(),
        created_unix_ms: info.created_unix_ms,
        parent: info.parent.as_ref().map(|p| p.to_string()).unwrap_or_default(),
        template: info.template.clone().unwrap_or_default(),
        memory: memory.map(|m| pb::MemoryUsage {
            rss_kib: m.rss_kib,
            pss_kib: m.pss_kib,
            private_dirty_kib: m.private_dirty_kib,
        }),
        kernel: info.spec.kernel.as_ref().map(|k| k.display().to_string()).unwrap_or_default(),
        network: Some(network_to_pb(&info.spec.network)),
        limits: Some(limits_to_pb(&info.spec.limits)),
        resources: None,
        restored_from: info.restored_from.clone().unwrap_or_default(),
    }
}

pub fn resources_to_pb(r: &ResourceUsage) -> pb::ResourceUsage {
    pb::ResourceUsage {
        cgroup: r.cgroup.clone(),
        memory_bytes: r.memory_bytes,
        memory_peak_bytes: r.memory_peak_bytes,
        memory_limit_bytes: r.memory_limit_bytes,
        memory_limit_hits: r.memory_limit_hits,
        oom_kills: r.oom_kills,
        cpu_usage_us: r.cpu_usage_us,
        cpu_limit: r.cpu_limit,
        pids: r.pids,
        pids_limit: r.pids_limit,
        io_read_bytes: r.io_read_bytes,
        io_write_bytes: r.io_write_bytes,
        network: r.network.clone(),
    }
}

pub fn resources_from_pb(r: &pb::ResourceUsage) -> ResourceUsage {
    ResourceUsage {
        cgroup: r.cgroup.clone(),
        memory_bytes: r.memory_bytes,
        memory_peak_bytes: r.memory_peak_bytes,
        memory_limit_bytes: r.memory_limit_bytes,
        memory_limit_hits: r.memory_limit_hits,
        oom_kills: r.oom_kills,
        cpu_usage_us: r.cpu_usage_us,
        cpu_limit: r.cpu_limit,
        pids: r.pids,
        pids_limit: r.pids_limit,
        io_read_bytes: r.io_read_bytes,
        io_write_bytes: r.io_write_bytes,
        network: r.network.clone(),
    }
}

pub fn network_to_pb(n: &NetworkPolicy) -> pb::NetworkPolicy {
    let mode = match n.mode {
        NetworkMode::None => pb::NetworkMode::None,
        NetworkMode::Nat => pb::NetworkMode::Nat,
    };
    pb::NetworkPolicy { mode: mode as i32, allow: n.allow.clone() }
}

/// Absent means no network; an enum value this daemon does not know is the client's mistake.
pub fn network_from_pb(n: Option<pb::NetworkPolicy>) -> Result<NetworkPolicy, Error> {
    let Some(n) = n else { return Ok(NetworkPolicy::default()) };
    let mode = match pb::NetworkMode::try_from(n.mode) {
        Ok(pb::NetworkMode::Unspecified | pb::NetworkMode::None) => NetworkMode::None,
        Ok(pb::NetworkMode::Nat) => NetworkMode::Nat,
        Err(_) => {
            return Err(Error::invalid("network.mode", format!("{} is not a known mode; use NONE or NAT", n.mode)))
        }
    };
    Ok(NetworkPolicy { mode, allow: n.allow })
}

pub fn limits_to_pb(l: &ResourceLimits) -> pb::ResourceLimits {
    pb::ResourceLimits { memory_mib: l.memory_mib, cpus: l.cpus, io_bps: l.io_bps, io_iops: l.io_iops, pids: l.pids }
}

pub fn limits_from_pb(l: Option<pb::ResourceLimits>) -> ResourceLimits {
    let l = l.unwrap_or_default();
    ResourceLimits { memory_mib: l.memory_mib, cpus: l.cpus, io_bps: l.io_bps, io_iops: l.io_iops, pids: l.pids }
}

/// The reverse of [`sandbox`], for clients.
pub fn sandbox_info(s: &pb::Sandbox) -> Result<(SandboxInfo, Option<MemoryUsage>), Error> {
    let state = match pb::SandboxState::try_from(s.state) {
        Ok(pb::SandboxState::Exited) => SandboxState::Exited(s.exit_reason.clone()),
        _ => SandboxState::Running,
    };
    let info = SandboxInfo {
        id: SandboxId::parse(&s.id)?,
        spec: SandboxSpec {
            image: s.image.clone(),
            kernel: non_empty(s.kernel.clone()).map(PathBuf::from),
            memory_mib: s.memory_mib,
            vcpus: s.vcpus.min(u8::MAX as u32) as u8,
            labels: s.labels.clone().into_iter().collect(),
            network: network_from_pb(s.network.clone())?,
            limits: limits_from_pb(s.limits),
        },
        state,
        created_unix_ms: s.created_unix_ms,
        parent: non_empty(s.parent.clone()).map(|p| SandboxId::parse(&p)).transpose()?,
        template: non_empty(s.template.clone()),
        restored_from: non_empty(s.restored_from.clone()),
    };
    let memory = s.memory.map(|m| MemoryUsage {
        rss_kib: m.rss_kib,
        pss_kib: m.pss_kib,
        private_dirty_kib: m.private_dirty_kib,
    });
    Ok((info, memory))
}

/// What a Create asks for.
pub enum CreatePlan {
    Boot(SandboxSpec),
    Template { name: String, spec: SandboxSpec, warm: Option<forkd_core::Warm> },
    FromTemplate(String),
}

pub fn create_plan(req: pb::CreateRequest) -> Result<CreatePlan, Error> {
    let defaults = SandboxSpec::default();
    let vcpus = match req.vcpus {
        0 => defaults.vcpus,
        n => u8::try_from(n).map_err(|_| {
            Error::invalid("vcpus", format!("{n} is out of range; use 1 to {}", forkd_core::spec::MAX_VCPUS))
        })?,
    };
    let spec = SandboxSpec {
        image: non_empty(req.image).unwrap_or(defaults.image),
        kernel: non_empty(req.kernel).map(PathBuf::from),
        memory_mib: if req.memory_mib == 0 { defaults.memory_mib } else { req.memory_mib },
        vcpus,
        labels: req.labels.into_iter().collect(),
        network: network_from_pb(req.network)?,
        limits: limits_from_pb(req.limits),
    };
    let warm = non_empty(req.warm).map(|w| w.parse::<forkd_core::Warm>()).transpose()?;
    match (non_empty(req.from_template), non_empty(req.template_name)) {
        (Some(_), Some(_)) => Err(Error::invalid("template_name", "cannot be combined with from_template")),
        (Some(from), None) if warm.is_none() => Ok(CreatePlan::FromTemplate(from)),
        (None, Some(name)) => Ok(CreatePlan::Template { name, spec, warm }),
        (None, None) if warm.is_none() => Ok(CreatePlan::Boot(spec)),
        _ => Err(Error::invalid("warm", "only a template (`template_name`) is warmed")),
    }
}

/// Branch count (absent means 1; anything outside 1..=MAX_BRANCH_COUNT names `count`) and
/// the children's limit overrides.
pub fn branch_options(count: Option<i64>, limits: ResourceLimits) -> Result<BranchOptions, Error> {
    let max = forkd_core::backend::MAX_BRANCH_COUNT;
    let count = count.unwrap_or(1);
    if count < 1 || count > max as i64 {
        return Err(Error::invalid("count", format!("{count} is out of range; use 1 to {max}")));
    }
    let opts = BranchOptions { count: count as u32, limits };
    opts.validate()?;
    Ok(opts)
}

/// Seconds (0 = none) to a timeout, naming `timeout_secs` when it is not a usable duration.
pub fn timeout(secs: f64) -> Result<Option<Duration>, Error> {
    if secs == 0.0 {
        return Ok(None);
    }
    if !secs.is_finite() || secs < 0.0 {
        return Err(Error::invalid("timeout_secs", format!("{secs} must be a positive number of seconds (0: none)")));
    }
    Duration::try_from_secs_f64(secs)
        .map(Some)
        .map_err(|_| Error::invalid("timeout_secs", format!("{secs} is too large")))
}

pub fn exec_request(args: Vec<String>, env: Vec<String>, cwd: String, timeout_secs: f64) -> Result<ExecRequest, Error> {
    let req = ExecRequest { argv: args, env, cwd: non_empty(cwd), timeout: timeout(timeout_secs)? };
    if let Some(cwd) = &req.cwd {
        if !cwd.starts_with('/') || cwd.contains('\0') {
            return Err(Error::invalid("cwd", format!("`{cwd}` must be an absolute guest path")));
        }
    }
    req.validate()?;
    Ok(req)
}

pub fn exec_exit(outcome: &ExecOutcome) -> pb::ExecExit {
    pb::ExecExit {
        exit_code: outcome.status.shell_code(),
        signal: match outcome.status {
            ExitStatus::Signal(s) => Some(s),
            _ => None,
        },
        timed_out: outcome.status == ExitStatus::TimedOut,
        duration_ms: outcome.duration.as_secs_f64() * 1000.0,
    }
}

pub fn event(e: &Event) -> pb::Event {
    let only_id = |id: &SandboxId| pb::Sandbox { id: id.to_string(), ..Default::default() };
    let mut out = pb::Event { time_unix_ms: e.time_unix_ms, ..Default::default() };
    let ty = match &e.kind {
        EventKind::Created { sandbox: s } => {
            out.sandbox = Some(sandbox(s, None));
            pb::EventType::Created
        }
        EventKind::Branched { source, children, pause } => {
            out.sandbox = Some(sandbox(source, None));
            out.children = children.iter().map(|c| sandbox(c, None)).collect();
            out.pause_ms = pause.as_secs_f64() * 1000.0;
            pb::EventType::Branched
        }
        EventKind::Exited { sandbox: s } => {
            out.sandbox = Some(sandbox(s, None));
            pb::EventType::Exited
        }
        EventKind::Destroyed { id } => {
            out.sandbox = Some(only_id(id));
            pb::EventType::Destroyed
        }
        EventKind::SnapshotStarted { snapshot } | EventKind::SnapshotDurable { snapshot } => {
            out.sandbox = Some(only_id(&snapshot.source));
            out.pause_ms = snapshot.pause.as_secs_f64() * 1000.0;
            out.snapshot = Some(snapshot_result(snapshot));
            match e.kind {
                EventKind::SnapshotStarted { .. } => pb::EventType::SnapshotStarted,
                _ => pb::EventType::SnapshotDurable,
            }
        }
        EventKind::SnapshotFailed { snapshot, error } => {
            out.sandbox = Some(only_id(&snapshot.source));
            out.pause_ms = snapshot.pause.as_secs_f64() * 1000.0;
            out.snapshot = Some(snapshot_result(snapshot));
            out.error = error.clone();
            pb::EventType::SnapshotFailed
        }
    };
    out.r#type = ty as i32;
    out
}

fn kind_name(kind: SnapshotKind) -> String {
    match kind {
        SnapshotKind::Full => "full",
        SnapshotKind::Diff => "diff",
    }
    .into()
}

fn kind_from(text: &str) -> SnapshotKind {
    if text == "diff" {
        SnapshotKind::Diff
    } else {
        SnapshotKind::Full
    }
}

pub fn snapshot_result(r: &SnapshotResult) -> pb::SnapshotResult {
    pb::SnapshotResult {
        id: r.id.clone(),
        tag: r.tag.clone().unwrap_or_default(),
        source: r.source.to_string(),
        kind: kind_name(r.kind),
        parent: r.parent.clone().unwrap_or_default(),
        pause_ms: r.pause.as_secs_f64() * 1000.0,
        durable: r.durable,
    }
}

pub fn snapshot_result_from_pb(r: pb::SnapshotResult) -> Result<SnapshotResult, Error> {
    Ok(SnapshotResult {
        id: r.id,
        tag: non_empty(r.tag),
        source: SandboxId::parse(&r.source)?,
        kind: kind_from(&r.kind),
        parent: non_empty(r.parent),
        pause: Duration::try_from_secs_f64(r.pause_ms.max(0.0) / 1000.0).unwrap_or_default(),
        durable: r.durable,
    })
}

pub fn snapshot_info(i: &SnapshotInfo) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        id: i.id.clone(),
        tag: i.tag.clone().unwrap_or_default(),
        kind: kind_name(i.kind),
        parent: i.parent.clone().unwrap_or_default(),
        source: i.source.clone().unwrap_or_default(),
        created_unix_ms: i.created_unix_ms,
        image: i.spec.image.clone(),
        memory_mib: i.spec.memory_mib,
        vcpus: i.spec.vcpus.into(),
        network: Some(network_to_pb(&i.spec.network)),
        limits: Some(limits_to_pb(&i.spec.limits)),
        labels: i.spec.labels.clone().into_iter().collect(),
        memory_bytes: i.memory_bytes,
        pages: i.pages,
        nonzero_pages: i.nonzero_pages,
        write_method: i.write_method.clone(),
        write_ms: i.write_ms,
        disk_layers: i.disk_layers.min(u32::MAX as usize) as u32,
        dependents: i.dependents.clone(),
    }
}

pub fn snapshot_info_from_pb(i: pb::SnapshotInfo) -> Result<SnapshotInfo, Error> {
    Ok(SnapshotInfo {
        id: i.id,
        tag: non_empty(i.tag),
        kind: kind_from(&i.kind),
        parent: non_empty(i.parent),
        source: non_empty(i.source),
        created_unix_ms: i.created_unix_ms,
        spec: SandboxSpec {
            image: i.image,
            kernel: None,
            memory_mib: i.memory_mib,
            vcpus: i.vcpus.min(u8::MAX as u32) as u8,
            labels: i.labels.into_iter().collect(),
            network: network_from_pb(i.network)?,
            limits: limits_from_pb(i.limits),
        },
        memory_bytes: i.memory_bytes,
        pages: i.pages,
        nonzero_pages: i.nonzero_pages,
        write_method: i.write_method,
        write_ms: i.write_ms,
        disk_layers: i.disk_layers as usize,
        dependents: i.dependents,
    })
}

pub fn verify_report(r: &VerifyReport) -> pb::VerifySnapshotResponse {
    pb::VerifySnapshotResponse {
        files_checked: r.files_checked,
        pages_checked: r.pages_checked,
        bytes_read: r.bytes_read,
    }
}

pub fn eval_request(r: pb::EvalRequest) -> Result<EvalRequest, Error> {
    let req = EvalRequest {
        code: r.code,
        context: non_empty(r.context),
        lang: non_empty(r.lang),
        timeout: timeout(r.timeout_secs)?,
    };
    req.validate()?;
    Ok(req)
}

pub fn eval_request_to_pb(id: &SandboxId, r: &EvalRequest) -> pb::EvalRequest {
    pb::EvalRequest {
        id: id.to_string(),
        code: r.code.clone(),
        context: r.context.clone().unwrap_or_default(),
        lang: r.lang.clone().unwrap_or_default(),
        timeout_secs: r.timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0),
    }
}

pub fn eval_result(r: &EvalResult) -> pb::EvalResult {
    pb::EvalResult {
        context: r.context.clone(),
        value: r.value.clone(),
        json: r.json.as_ref().map(|j| j.to_string()),
        error: r.error.as_ref().map(|e| pb::EvalError {
            name: e.name.clone(),
            message: e.message.clone(),
            traceback: e.traceback.clone(),
        }),
        duration_ms: r.duration.as_secs_f64() * 1000.0,
        created: r.created,
        restarted: r.restarted,
        timed_out: r.timed_out,
    }
}

pub fn eval_result_from_pb(r: pb::EvalResult) -> EvalResult {
    EvalResult {
        context: r.context,
        value: r.value,
        json: r.json.and_then(|j| serde_json::from_str(&j).ok()),
        error: r.error.map(|e| EvalError { name: e.name, message: e.message, traceback: e.traceback }),
        duration: Duration::try_from_secs_f64(r.duration_ms.max(0.0) / 1000.0).unwrap_or_default(),
        created: r.created,
        restarted: r.restarted,
        timed_out: r.timed_out,
    }
}

pub fn context_info(c: &ContextInfo) -> pb::Context {
    pb::Context { name: c.name.clone(), lang: c.lang.clone(), pid: c.pid, evals: c.evals, version: c.version.clone() }
}

pub fn context_info_from_pb(c: pb::Context) -> ContextInfo {
    ContextInfo { name: c.name, lang: c.lang, pid: c.pid, evals: c.evals, version: c.version }
}

/// A restore's count: 0 (absent) means 1, else 1 to the BRANCH limit.
pub fn restore_count(count: u32) -> Result<u32, Error> {
    let count = count.max(1);
    BranchOptions::count(count).validate()?;
    Ok(count)
}

pub fn image(i: &ImageInfo) -> pb::Image {
    pb::Image {
        name: i.name.clone(),
        kind: i.kind.clone(),
        size_bytes: i.size_bytes,
        sha256: i.sha256.clone(),
        created_unix: i.created_unix,
    }
}

pub fn image_info(i: pb::Image) -> ImageInfo {
    ImageInfo { name: i.name, kind: i.kind, size_bytes: i.size_bytes, sha256: i.sha256, created_unix: i.created_unix }
}

pub fn dir_entry(e: &DirEntry) -> pb::DirEntry {
    pb::DirEntry { name: e.name.clone(), kind: e.kind.clone(), size: e.size, mode: e.mode, mtime_unix: e.mtime_unix }
}

pub fn dir_entry_from_pb(e: pb::DirEntry) -> DirEntry {
    DirEntry { name: e.name, kind: e.kind, size: e.size, mode: e.mode, mtime_unix: e.mtime_unix }
}

/// The forkd error code for a gRPC code (codes forkd never sends count as internal).
pub fn error_code(code: tonic::Code) -> ErrorCode {
    match code {
        tonic::Code::NotFound => ErrorCode::NotFound,
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorCode::InvalidArgument,
        tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied => ErrorCode::FailedPrecondition,
        tonic::Code::Unauthenticated => ErrorCode::Unauthenticated,
        tonic::Code::ResourceExhausted => ErrorCode::ResourceExhausted,
        tonic::Code::Unavailable | tonic::Code::Aborted => ErrorCode::Unavailable,
        tonic::Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        tonic::Code::Cancelled => ErrorCode::Cancelled,
        _ => ErrorCode::Internal,
    }
}

/// The error a status carries, as the variant the daemon's controller returned (see
/// [`Error::from_remote`]).
pub fn error(status: &tonic::Status) -> Error {
    let retry_after_ms =
        status.metadata().get(RETRY_AFTER_MS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let message = if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().into() };
    Error::from_remote(error_code(status.code()), &message, retry_after_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_out_of_range_name_the_field() {
        for bad in [Some(0), Some(-1), Some(1001), Some(i64::MAX), Some(i64::MIN)] {
            let e = branch_options(bad, ResourceLimits::default()).unwrap_err();
            assert!(e.to_string().starts_with("invalid count"), "{e}");
        }
        assert_eq!(branch_options(None, ResourceLimits::default()).unwrap().count, 1);
        assert_eq!(branch_options(Some(1000), ResourceLimits::default()).unwrap().count, 1000);
        let pids = ResourceLimits { pids: Some(16), ..Default::default() };
        assert_eq!(branch_options(Some(2), pids.clone()).unwrap().limits, pids);
        let e = branch_options(None, ResourceLimits { pids: Some(0), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("limits"), "{e}");
    }

    #[test]
    fn timeouts() {
        assert_eq!(timeout(0.0).unwrap(), None);
        assert_eq!(timeout(1.5).unwrap(), Some(Duration::from_millis(1500)));
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e300] {
            assert!(timeout(bad).unwrap_err().to_string().starts_with("invalid timeout_secs"), "{bad}");
        }
    }

    #[test]
    fn sandboxes_round_trip() {
        let info = SandboxInfo {
            id: SandboxId::parse("sb-1").unwrap(),
            spec: SandboxSpec {
                kernel: Some("/k".into()),
                network: NetworkPolicy { mode: NetworkMode::Nat, allow: vec!["10.0.0.0/8:443".into()] },
                limits: ResourceLimits { memory_mib: Some(512), cpus: Some(0.5), pids: Some(64), ..Default::default() },
                ..Default::default()
            },
            state: SandboxState::Exited("gone".into()),
            created_unix_ms: 5,
            parent: Some(SandboxId::parse("sb-0").unwrap()),
            template: Some("t".into()),
            restored_from: Some("snap-0123456789ab".into()),
        };
        let mem = MemoryUsage { rss_kib: 1, pss_kib: 2, private_dirty_kib: 3 };
        assert_eq!(sandbox_info(&sandbox(&info, Some(mem))).unwrap(), (info, Some(mem)));
    }

    #[test]
    fn create_carries_network_and_limits_and_rejects_unknown_modes() {
        let req = pb::CreateRequest {
            network: Some(pb::NetworkPolicy { mode: pb::NetworkMode::Nat as i32, allow: vec!["allow-all".into()] }),
            limits: Some(pb::ResourceLimits { io_iops: Some(100), ..Default::default() }),
            ..Default::default()
        };
        let CreatePlan::Boot(spec) = create_plan(req).unwrap() else { panic!("not a boot") };
        assert_eq!(spec.network.mode, NetworkMode::Nat);
        assert_eq!(spec.limits.io_iops, Some(100));
        let bad =
            pb::CreateRequest { network: Some(pb::NetworkPolicy { mode: 7, allow: vec![] }), ..Default::default() };
        assert!(create_plan(bad).err().unwrap().to_string().starts_with("invalid network.mode"));
    }

    #[test]
    fn statuses_turn_back_into_the_same_errors() {
        for e in [
            Error::sandbox_not_found("sb-9"),
            Error::invalid("count", "0 is out of range; use 1 to 1000"),
            Error::ResourceExhausted { message: "busy".into(), retry_after_ms: 250 },
            Error::Cancelled("the client went away".into()),
        ] {
            assert_eq!(error(&status(&e)), e);
        }
    }

    #[test]
    fn resource_exhausted_carries_the_retry_hint() {
        let s = status(&Error::ResourceExhausted { message: "busy".into(), retry_after_ms: 250 });
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.metadata().get(RETRY_AFTER_MS).unwrap().to_str().unwrap(), "250");
        assert!(s.message().contains("retry in 250 ms"));
    }
}
