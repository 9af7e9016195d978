//! Between forkd-core types and the wire (protobuf and REST JSON), and errors to statuses.

use forkd_core::{
    BranchOptions, Error, ErrorCode, Event, EventKind, ExecOutcome, ExecRequest, ExitStatus, MemoryUsage, NetworkMode,
    NetworkPolicy, ResourceLimits, ResourceUsage, SandboxId, SandboxInfo, SandboxSpec, SandboxState,
};
use forkd_proto::v1 as pb;
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
    Template { name: String, spec: SandboxSpec },
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
    match (non_empty(req.from_template), non_empty(req.template_name)) {
        (Some(_), Some(_)) => Err(Error::invalid("template_name", "cannot be combined with from_template")),
        (Some(from), None) => Ok(CreatePlan::FromTemplate(from)),
        (None, Some(name)) => Ok(CreatePlan::Template { name, spec }),
        (None, None) => Ok(CreatePlan::Boot(spec)),
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
    let (ty, subject, children, pause_ms) = match &e.kind {
        EventKind::Created { sandbox: s } => (pb::EventType::Created, sandbox(s, None), Vec::new(), 0.0),
        EventKind::Branched { source, children, pause } => (
            pb::EventType::Branched,
            sandbox(source, None),
            children.iter().map(|c| sandbox(c, None)).collect(),
            pause.as_secs_f64() * 1000.0,
        ),
        EventKind::Exited { sandbox: s } => (pb::EventType::Exited, sandbox(s, None), Vec::new(), 0.0),
        EventKind::Destroyed { id } => {
            (pb::EventType::Destroyed, pb::Sandbox { id: id.to_string(), ..Default::default() }, Vec::new(), 0.0)
        }
    };
    pb::Event { r#type: ty as i32, time_unix_ms: e.time_unix_ms, sandbox: Some(subject), children, pause_ms }
}

pub fn image(i: &forkd_guest::image::Image) -> pb::Image {
    let m = &i.manifest;
    pb::Image {
        name: m.name.clone(),
        kind: serde_json::to_value(m.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{:?}", m.kind).to_lowercase()),
        size_bytes: m.size_bytes,
        sha256: m.sha256.clone(),
        created_unix: m.created_unix,
    }
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
    fn resource_exhausted_carries_the_retry_hint() {
        let s = status(&Error::ResourceExhausted { message: "busy".into(), retry_after_ms: 250 });
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.metadata().get(RETRY_AFTER_MS).unwrap().to_str().unwrap(), "250");
        assert!(s.message().contains("retry in 250 ms"));
    }
}
