//! Sandbox lifecycle commands: create, exec, branch, ls, inspect, logs, cp, rm.

use crate::context::Context;
use crate::progress::Bar;
use anyhow::{bail, Context as _};
use clap::Args;
use forkd_client::Client;
use forkd_core::{size, BranchOptions, ExecRequest, OutputStream, SandboxId, SandboxInfo, SandboxSpec, SandboxState};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn parse_id(text: &str) -> anyhow::Result<SandboxId> {
    Ok(SandboxId::parse(text)?)
}

/// Options describing a new sandbox, shared by `create`, `run` and `template create`.
#[derive(Args, Clone)]
pub struct SpecArgs {
    /// Root filesystem image (`forkd image ls`).
    #[arg(long, default_value = "tiny")]
    pub image: String,
    /// Guest kernel (vmlinux) instead of the one `forkd kernel build` made.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest network: `none` (no NIC) or `nat` (own namespace, NAT, egress denied unless --allow).
    #[arg(long, default_value = "none", value_name = "none|nat")]
    pub network: String,
    /// Allow egress to CIDR[:PORT] (repeatable; `allow-all` allows everything but the host
    /// and other sandboxes). Needs --network nat.
    #[arg(long = "allow", value_name = "CIDR[:PORT]")]
    pub allow: Vec<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl SpecArgs {
    pub fn spec(&self) -> anyhow::Result<SandboxSpec> {
        let spec = SandboxSpec {
            image: self.image.clone(),
            kernel: self.kernel.clone(),
            memory_mib: size::parse_mib("memory", &self.memory)?,
            vcpus: self.vcpus,
            network: forkd_core::NetworkPolicy { mode: self.network.parse()?, allow: self.allow.clone() },
            limits: self.limits.limits()?,
            ..Default::default()
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Cgroup limits of a sandbox's VMM, shared by `create`, `run`, `template create` (unset:
/// the defaults) and `branch` (unset: the source's).
#[derive(Args, Clone)]
pub struct LimitArgs {
    /// Memory limit of the sandbox's VMM (guest RAM it touched plus its own), e.g. 512M;
    /// default for a new sandbox: guest memory + 256M.
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// CPU time limit in CPUs, e.g. 0.5 (default for a new sandbox: unlimited).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Disk throughput limit, bytes per second, read and write each (e.g. 10M).
    #[arg(long, value_name = "BYTES")]
    pub io_bps: Option<String>,
    /// Disk operations per second, read and write each.
    #[arg(long, value_name = "N")]
    pub io_iops: Option<u64>,
    /// Most threads/processes of the sandbox's VMM (its cgroup's pids.max).
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,
}

impl LimitArgs {
    pub fn limits(&self) -> anyhow::Result<forkd_core::ResourceLimits> {
        let limits = forkd_core::ResourceLimits {
            memory_mib: self.memory_limit.as_deref().map(|m| size::parse_mib("memory-limit", m)).transpose()?,
            cpus: self.cpus,
            io_bps: self.io_bps.as_deref().map(|b| size::parse_bytes("io-bps", b)).transpose()?,
            io_iops: self.io_iops,
            pids: self.pids_limit,
        };
        limits.validate()?;
        Ok(limits)
    }
}

/// Options of a command to run, shared by `exec` and `run`.
#[derive(Args, Clone)]
pub struct CommandArgs {
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Extra environment for the command (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// Forward this process's stdin to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl CommandArgs {
    pub fn request(&self) -> anyhow::Result<ExecRequest> {
        let mut req = ExecRequest::new(self.command.clone());
        req.env = self.env.clone();
        req.cwd = self.workdir.clone();
        if let Some(t) = self.timeout {
            if !(t.is_finite() && t > 0.0) {
                bail!("invalid --timeout {t}: give a positive number of seconds");
            }
            req.timeout = Some(Duration::from_secs_f64(t));
        }
        req.validate()?;
        Ok(req)
    }
}

/// Runs `args` in sandbox `id`, passing output through; returns the shell-style status
/// (128 + the signal when Ctrl-C or another signal interrupted it).
pub fn exec_passthrough(
    client: &Client,
    id: &SandboxId,
    args: &CommandArgs,
    cancel: &forkd_core::CancelToken,
) -> anyhow::Result<i32> {
    let req = args.request()?;
    let stdin: Option<Box<dyn std::io::Read + Send>> =
        if args.interactive { Some(Box::new(std::io::stdin())) } else { None };
    let mut sink = |stream: OutputStream, data: &[u8]| {
        // A closed stdout (e.g. `| head`) must not abort the command's teardown.
        let _ = match stream {
            OutputStream::Stdout => std::io::stdout().write_all(data).and_then(|_| std::io::stdout().flush()),
            OutputStream::Stderr => std::io::stderr().write_all(data),
        };
    };
    match client.exec(id, &req, stdin, &mut sink, cancel) {
        Ok(outcome) => Ok(outcome.status.shell_code()),
        Err(_) if cancel.is_cancelled() && crate::signals::received().is_some() => {
            Ok(128 + crate::signals::received().unwrap_or(libc::SIGINT))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Fork the named template instead of booting (milliseconds instead of a boot).
    #[arg(long, value_name = "TEMPLATE", conflicts_with = "snapshot")]
    pub from: Option<String>,
    /// Start from this snapshot (tag or id) instead of booting: the sandbox continues where
    /// the snapshot stopped it (image, memory and network are the snapshot's).
    #[arg(long, value_name = "TAG")]
    pub snapshot: Option<String>,
    /// With --snapshot: start N sandboxes (one restored, the others branched from it).
    #[arg(short = 'n', long = "count", default_value_t = 1, requires = "snapshot")]
    pub count: u32,
    /// Print `{"id": ...}` (`{"id": ..., "ids": [...]}` for several) instead of bare ids.
    #[arg(long)]
    pub json: bool,
}

pub fn create(ctx: &Context, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let created = match (&args.from, &args.snapshot) {
        (Some(template), _) => vec![client.create_from_template(template)?],
        (None, Some(tag)) => {
            let spinner = Bar::spinner(&format!("restoring {} sandbox(es) from {tag}", args.count));
            let restored = client.create_from_snapshot(tag, args.count);
            spinner.finish_and_clear();
            restored?
        }
        (None, None) => {
            let spec = args.spec.spec()?;
            let spinner = Bar::spinner(&format!("booting a sandbox ({}, {} MiB)", spec.image, spec.memory_mib));
            let created = client.create(spec);
            spinner.finish_and_clear();
            vec![created?]
        }
    };
    let ids: Vec<&SandboxId> = created.iter().map(|i| &i.id).collect();
    if args.json {
        let mut value = serde_json::json!({ "id": ids.first() });
        if ids.len() > 1 {
            value["ids"] = serde_json::json!(ids);
        }
        println!("{value}");
    } else {
        for id in ids {
            println!("{id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ExecArgs {
    /// Sandbox id.
    pub id: String,
    #[command(flatten)]
    pub command: CommandArgs,
}

pub fn exec(ctx: &Context, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let cancel = forkd_core::CancelToken::new();
    crate::signals::install(cancel.clone());
    let client = ctx.client()?;
    let code = exec_passthrough(&client, &parse_id(&args.id)?, &args.command, &cancel)?;
    if let Some(sig) = crate::signals::received() {
        return Ok(ExitCode::from((128 + sig) as u8));
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

#[derive(Args)]
pub struct BranchArgs {
    /// Sandbox to fork (it keeps running).
    pub id: String,
    /// Number of children.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    pub count: u32,
    /// Print `{"children": [{"id": ...}], "pause_ms": ...}`.
    #[arg(long)]
    pub json: bool,
    /// Limits given here apply to the children instead of the source's; the others are the
    /// source's.
    #[command(flatten, next_help_heading = "Children's limits (default: the source's)")]
    pub limits: LimitArgs,
}

pub fn branch(ctx: &Context, args: BranchArgs) -> anyhow::Result<ExitCode> {
    let opts = BranchOptions { count: args.count, limits: args.limits.limits()? };
    let client = ctx.client()?;
    let result = client.branch(&parse_id(&args.id)?, &opts)?;
    // Microsecond resolution is what the VMM measures; do not print float noise beyond it.
    let pause_ms = (result.pause.as_secs_f64() * 1e6).round() / 1e3;
    if args.json {
        let children: Vec<_> = result.children.iter().map(|c| serde_json::json!({ "id": c.id })).collect();
        println!("{}", serde_json::json!({ "children": children, "pause_ms": pause_ms }));
    } else {
        for child in &result.children {
            println!("{}", child.id);
        }
        eprintln!("branched {} into {} children; source paused {pause_ms:.2} ms", args.id, result.children.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn state_text(info: &SandboxInfo) -> String {
    match &info.state {
        SandboxState::Running => "running".into(),
        SandboxState::Exited(why) => format!("exited ({why})"),
    }
}

pub fn ls(ctx: &Context, json: bool) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let rows = client.list_with_memory()?;
    if json {
        let value: Vec<_> = rows
            .iter()
            .map(|(i, m)| {
                serde_json::json!({
                    "id": i.id, "state": i.state, "image": i.spec.image, "memory_mib": i.spec.memory_mib,
                    "parent": i.parent, "template": i.template, "created_unix_ms": i.created_unix_ms,
                    "memory": m,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<16} {:<10} {:<8} {:>7} {:>9} {:>9}  PARENT/TEMPLATE", "ID", "STATE", "IMAGE", "MEMORY", "RSS", "PSS");
    for (i, m) in rows {
        let (rss, pss) = m
            .map(|m| (format!("{}Mi", m.rss_kib / 1024), format!("{:.1}Mi", m.pss_kib as f64 / 1024.0)))
            .unwrap_or(("-".into(), "-".into()));
        let relation = match (&i.template, &i.parent) {
            (Some(t), _) => format!("template {t}"),
            (None, Some(p)) => p.to_string(),
            _ => String::new(),
        };
        let state = state_text(&i);
        println!(
            "{:<16} {:<10} {:<8} {:>5}Mi {:>9} {:>9}  {}",
            i.id, state, i.spec.image, i.spec.memory_mib, rss, pss, relation
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(ctx: &Context, id: &str) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let id = parse_id(id)?;
    let info = client.get(&id)?;
    let memory = client.memory_usage(&id).ok();
    let resources = client.resource_usage(&id).ok().flatten();
    let report = serde_json::json!({ "sandbox": info, "memory": memory, "resources": resources });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

pub fn logs(ctx: &Context, id: &str, tail: u64) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let bytes = client.console(&parse_id(id)?, tail)?;
    std::io::stdout().write_all(&bytes)?;
    Ok(ExitCode::SUCCESS)
}

/// `ID:/path` or a host path.
enum Location {
    Guest(SandboxId, String),
    Host(PathBuf),
}

fn location(text: &str) -> anyhow::Result<Location> {
    match text.split_once(':') {
        Some((id, path)) if path.starts_with('/') && SandboxId::parse(id).is_ok() => {
            Ok(Location::Guest(parse_id(id)?, path.to_string()))
        }
        _ => Ok(Location::Host(PathBuf::from(text))),
    }
}

pub fn cp(ctx: &Context, src: &str, dst: &str) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match (location(src)?, location(dst)?) {
        (Location::Host(from), Location::Guest(id, to)) => {
            let mut file = std::fs::File::open(&from).with_context(|| format!("opening {}", from.display()))?;
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata()?.permissions().mode() & 0o7777;
            let n = client.write_file(&id, &to, mode, &mut file)?;
            eprintln!("copied {n} bytes to {id}:{to}");
        }
        (Location::Guest(id, from), Location::Host(to)) => {
            let tmp = to.with_extension("forkd-partial");
            let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let copied = client.read_file(&id, &from, &mut file);
            match copied {
                Ok(n) => {
                    std::fs::rename(&tmp, &to)?;
                    eprintln!("copied {n} bytes from {id}:{from}");
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            }
        }
        _ => bail!("give one host path and one sandbox path (ID:/absolute/path)"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rm(ctx: &Context, ids: &[String], all: bool) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let targets: Vec<SandboxId> = if all {
        client.list()?.into_iter().map(|i| i.id).collect()
    } else {
        ids.iter().map(|s| parse_id(s)).collect::<Result<_, _>>()?
    };
    if targets.is_empty() && !all {
        bail!("name at least one sandbox id (or --all)");
    }
    let mut failed = false;
    for id in targets {
        match client.destroy(&id) {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("forkd: error: removing {id}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::from(crate::EXIT_FORKD_ERROR) } else { ExitCode::SUCCESS })
}
