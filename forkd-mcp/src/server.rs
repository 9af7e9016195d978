//! The MCP tools: each turns its arguments into one `forkd-client` call (run on a blocking
//! thread), and returns the result as structured JSON, or forkd's error as a tool error with
//! the message the CLI prints.

use crate::output::BoundedOutput;
use crate::params::*;
use crate::session::{Cleanup, Session};
use forkd_client::{Client, WaitSource};
use forkd_core::{
    size, BranchOptions, CancelToken, Dirs, Error, EvalRequest, ExecRequest, ExitStatus, NetworkPolicy, SandboxId,
    SandboxInfo, SandboxSpec, SnapshotOptions,
};
use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ListResourcesResult, PaginatedRequestParams, ProtocolVersion,
    ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource, ResourceContents,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most sandboxes one call may create.
const MAX_COUNT: u32 = 64;
/// A command or snippet's time limit when the call names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_READ_LIMIT: u64 = 1 << 20;
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(600);
const RESOURCE_PREFIX: &str = "forkd://sandbox/";

const INSTRUCTIONS: &str = "forkd runs code in microVM sandboxes (each a real Linux VM) that can BRANCH: \
fork a running sandbox into N copies in about a millisecond, each continuing from the same memory, files \
and processes. Typical use: create_sandbox (image \"default\" has python3), set it up with exec_command / \
write_file / eval_code, then branch_sandbox to try several alternatives in parallel children, compare their \
results, and kill_sandbox the ones you do not keep. create_snapshot saves a sandbox to disk; \
restore_snapshot starts copies of it later. Sandboxes have no network unless created with network \"nat\" \
and an allow list.";

/// What every session's handler shares.
#[derive(Clone)]
pub struct Config {
    pub client: Arc<Client>,
    pub dirs: Dirs,
    pub cleanup: Cleanup,
    pub max_output: usize,
}

#[derive(Clone)]
pub struct ForkdMcp {
    config: Config,
    session: Arc<Session>,
    tool_router: ToolRouter<ForkdMcp>,
}

type ToolResult = Result<CallToolResult, McpError>;

/// A forkd error as a tool error: the CLI's message for the model, the stable code for code.
fn tool_error(e: &Error) -> CallToolResult {
    let mut result = CallToolResult::error(vec![ContentBlock::text(e.to_string())]);
    result.structured_content = Some(json!({ "error": { "code": e.code().as_str(), "message": e.to_string() } }));
    result
}

fn reply(result: forkd_core::Result<Value>) -> ToolResult {
    Ok(match result {
        Ok(value) => CallToolResult::structured(value),
        Err(e) => tool_error(&e),
    })
}

fn parse_id(id: &str) -> forkd_core::Result<SandboxId> {
    SandboxId::parse(id)
}

fn seconds(field: &str, secs: Option<f64>, default: Duration, max: Option<Duration>) -> forkd_core::Result<Duration> {
    let Some(secs) = secs else { return Ok(default) };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(Error::invalid(field, format!("{secs} is not a positive number of seconds")));
    }
    let duration = Duration::from_secs_f64(secs.min(1e9));
    Ok(max.map_or(duration, |m| duration.min(m)))
}

/// The sandbox id and a request `build` made and validated, or the error to report.
fn prepare<R>(id: &str, build: impl FnOnce() -> forkd_core::Result<R>) -> forkd_core::Result<(SandboxId, R)> {
    let request = build()?;
    Ok((parse_id(id)?, request))
}

fn count(field: &str, n: Option<u32>) -> forkd_core::Result<u32> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_COUNT => Ok(n),
        n => Err(Error::invalid(field, format!("{n} is not between 1 and {MAX_COUNT}"))),
    }
}

fn sandbox_json(info: &SandboxInfo, session: &Session) -> Value {
    let mut value = serde_json::to_value(info).unwrap_or(Value::Null);
    value["created_by_this_session"] = json!(session.owns(&info.id));
    value
}

fn ids_of(infos: &[SandboxInfo]) -> Vec<String> {
    infos.iter().map(|i| i.id.to_string()).collect()
}

/// Collects a file up to a limit, and fails the transfer past it.
struct Capped {
    data: Vec<u8>,
    limit: u64,
    over: bool,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.data.len() + buf.len()) as u64 > self.limit {
            self.over = true;
            return Err(std::io::Error::other("file larger than max_bytes"));
        }
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ForkdMcp {
    pub fn new(config: Config, session: Arc<Session>) -> Self {
        Self { config, session, tool_router: Self::tool_router() }
    }

    /// The output cap of one call: what it asked for, never more than the server's.
    fn output_limit(&self, asked: Option<usize>) -> usize {
        asked.unwrap_or(self.config.max_output).min(self.config.max_output)
    }

    /// Runs a blocking client call off the async workers.
    async fn call<T, F>(&self, f: F) -> forkd_core::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Client) -> forkd_core::Result<T> + Send + 'static,
    {
        let client = self.config.client.clone();
        tokio::task::spawn_blocking(move || f(&client))
            .await
            .unwrap_or_else(|e| Err(Error::internal(format!("tool call failed: {e}"))))
    }

    /// Like [`Self::call`], for calls the client can cancel (`notifications/cancelled`, or the
    /// session going away) while they run in the guest.
    async fn call_cancellable<T, F>(&self, ct: CancellationToken, f: F) -> forkd_core::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Client, &CancelToken) -> forkd_core::Result<T> + Send + 'static,
    {
        let cancel = CancelToken::new();
        let inner = cancel.clone();
        let call = self.call(move |client| f(client, &inner));
        tokio::pin!(call);
        tokio::select! {
            result = &mut call => result,
            _ = ct.cancelled() => {
                cancel.cancel();
                call.await
            }
        }
    }

    fn spec(&self, p: &CreateSandbox) -> forkd_core::Result<SandboxSpec> {
        let mut spec = SandboxSpec { image: p.image.clone().unwrap_or_else(|| "default".into()), ..Default::default() };
        if let Some(memory) = &p.memory {
            spec.memory_mib = size::parse_mib("memory", memory)?;
        }
        if let Some(vcpus) = p.vcpus {
            spec.vcpus = vcpus;
        }
        spec.network = NetworkPolicy { mode: p.network.as_deref().unwrap_or("none").parse()?, allow: p.allow.clone() };
        spec.validate()?;
        Ok(spec)
    }

    async fn create(&self, p: CreateSandbox) -> forkd_core::Result<Vec<SandboxInfo>> {
        let n = count("count", p.count)?;
        let created = match (p.template.clone(), p.snapshot.clone()) {
            (Some(_), Some(_)) => return Err(Error::invalid("template", "give `template` or `snapshot`, not both")),
            (Some(template), None) => {
                self.call(move |c| (0..n).map(|_| c.create_from_template(&template)).collect()).await?
            }
            (None, Some(snapshot)) => self.call(move |c| c.create_from_snapshot(&snapshot, n)).await?,
            (None, None) => {
                let spec = self.spec(&p)?;
                self.call(move |c| {
                    let first = c.create(spec)?;
                    let mut all = vec![first.clone()];
                    if n > 1 {
                        all.extend(c.branch(&first.id, &BranchOptions::count(n - 1))?.children);
                    }
                    Ok(all)
                })
                .await?
            }
        };
        self.session.adopt(created.iter().map(|i| &i.id), p.remove_on_session_end);
        Ok(created)
    }
}

#[tool_router]
impl ForkdMcp {
    #[tool(
        description = "Create one or more sandboxes (microVMs). Boots the image (a few seconds), or forks a \
        template / starts from a snapshot (milliseconds). Returns their ids. With count > 1 and no \
        snapshot or template, one is booted and the rest are branched from it.",
        annotations(destructive_hint = false, idempotent_hint = false, open_world_hint = false)
    )]
    async fn create_sandbox(&self, Parameters(p): Parameters<CreateSandbox>) -> ToolResult {
        let result = self.create(p).await.map(|created| {
            let sandboxes: Vec<Value> = created.iter().map(|i| sandbox_json(i, &self.session)).collect();
            json!({ "ids": ids_of(&created), "sandboxes": sandboxes })
        });
        reply(result)
    }

    #[tool(
        description = "List all sandboxes on this forkd host (id, state, image, parent, whether this session \
        created it).",
        annotations(read_only_hint = true)
    )]
    async fn list_sandboxes(&self) -> ToolResult {
        let session = self.session.clone();
        reply(self.call(|c| c.list()).await.map(|all| {
            let sandboxes: Vec<Value> = all.iter().map(|i| sandbox_json(i, &session)).collect();
            json!({ "sandboxes": sandboxes })
        }))
    }

    #[tool(
        description = "Details of one sandbox: spec, state, parent, and host memory use.",
        annotations(read_only_hint = true)
    )]
    async fn get_sandbox(&self, Parameters(p): Parameters<SandboxRef>) -> ToolResult {
        let session = self.session.clone();
        reply(
            self.call(move |c| {
                let id = parse_id(&p.id)?;
                let info = c.get(&id)?;
                let memory = c.memory_usage(&id).ok();
                Ok((info, memory))
            })
            .await
            .map(|(info, memory)| {
                let mut value = sandbox_json(&info, &session);
                value["memory_kib"] = serde_json::to_value(memory).unwrap_or(Value::Null);
                value
            }),
        )
    }

    #[tool(
        description = "Remove a sandbox (or several with `ids`): its VM stops and its files are deleted. \
        Children branched from it are not affected.",
        annotations(destructive_hint = true, idempotent_hint = true)
    )]
    async fn kill_sandbox(&self, Parameters(p): Parameters<KillSandbox>) -> ToolResult {
        let ids: Vec<String> = p.id.into_iter().chain(p.ids).collect();
        if ids.is_empty() {
            return reply(Err(Error::invalid("id", "name a sandbox id (or several in `ids`)")));
        }
        let session = self.session.clone();
        reply(
            self.call(move |c| {
                for id in &ids {
                    let id = parse_id(id)?;
                    c.destroy(&id)?;
                    session.forget(&id);
                }
                Ok(json!({ "removed": ids }))
            })
            .await,
        )
    }

    #[tool(
        description = "Run a command in a sandbox and return its exit code, stdout and stderr (each cut in \
        the middle past max_output_bytes). `command` is an argv list; use [\"sh\", \"-c\", \"...\"] for shell \
        syntax.",
        annotations(destructive_hint = true, open_world_hint = false)
    )]
    async fn exec_command(&self, Parameters(p): Parameters<ExecCommand>, ct: CancellationToken) -> ToolResult {
        let limit = self.output_limit(p.max_output_bytes);
        let request = prepare(&p.id, || {
            let mut req = ExecRequest::new(p.command.clone());
            req.env = p.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req.cwd = p.cwd.clone();
            req.timeout = Some(seconds("timeout_secs", p.timeout_secs, DEFAULT_TIMEOUT, None)?);
            req.validate()?;
            Ok(req)
        });
        let (id, req) = match request {
            Ok(r) => r,
            Err(e) => return reply(Err(e)),
        };
        let stdin = p.stdin.map(|s| Box::new(std::io::Cursor::new(s.into_bytes())) as Box<dyn std::io::Read + Send>);
        reply(
            self.call_cancellable(ct, move |c, cancel| {
                let mut out = BoundedOutput::new(limit);
                let outcome = c.exec(&id, &req, stdin, &mut out, cancel)?;
                let (status, code) = match outcome.status {
                    ExitStatus::Code(code) => ("exited", code),
                    ExitStatus::Signal(_) => ("killed_by_signal", outcome.status.shell_code()),
                    ExitStatus::TimedOut => ("timed_out", outcome.status.shell_code()),
                };
                Ok(json!({
                    "exit_code": code,
                    "status": status,
                    "stdout": out.stdout(),
                    "stderr": out.stderr(),
                    "truncated": out.truncated(),
                    "duration_ms": outcome.duration.as_millis() as u64,
                }))
            })
            .await,
        )
    }

    #[tool(
        description = "Run Python code in a persistent interpreter inside the sandbox (like a notebook \
        cell): variables and imports survive between calls in the same context, and in children after a \
        branch. Returns the final expression's value, printed output, and any exception with its \
        traceback.",
        annotations(destructive_hint = true, open_world_hint = false)
    )]
    async fn eval_code(&self, Parameters(p): Parameters<EvalCode>, ct: CancellationToken) -> ToolResult {
        let limit = self.output_limit(p.max_output_bytes);
        let request = prepare(&p.id, || {
            let mut req = EvalRequest::new(p.code.clone());
            req.context = p.context.clone();
            req.timeout = Some(seconds("timeout_secs", p.timeout_secs, DEFAULT_TIMEOUT, None)?);
            req.validate()?;
            Ok(req)
        });
        let (id, req) = match request {
            Ok(r) => r,
            Err(e) => return reply(Err(e)),
        };
        reply(
            self.call_cancellable(ct, move |c, cancel| {
                let mut out = BoundedOutput::new(limit);
                let result = c.eval(&id, &req, &mut out, cancel)?;
                let mut value = serde_json::to_value(&result).unwrap_or(Value::Null);
                value["stdout"] = json!(out.stdout());
                value["stderr"] = json!(out.stderr());
                value["truncated"] = json!(out.truncated());
                Ok(value)
            })
            .await,
        )
    }

    #[tool(
        description = "Read a file from a sandbox as text (at most max_bytes, default 1 MiB).",
        annotations(read_only_hint = true)
    )]
    async fn read_file(&self, Parameters(p): Parameters<ReadFile>) -> ToolResult {
        let limit = p.max_bytes.unwrap_or(DEFAULT_READ_LIMIT);
        reply(
            self.call(move |c| {
                let id = parse_id(&p.id)?;
                let mut file = Capped { data: Vec::new(), limit, over: false };
                match c.read_file(&id, &p.path, &mut file) {
                    Err(_) if file.over => Err(Error::FailedPrecondition(format!(
                        "{} is larger than max_bytes ({limit}); raise max_bytes or read part of it with \
                         exec_command (head -c, tail -c, sed -n)",
                        p.path
                    ))),
                    Err(e) => Err(e),
                    Ok(bytes) => {
                        let utf8 = std::str::from_utf8(&file.data).is_ok();
                        Ok(json!({
                            "path": p.path,
                            "bytes": bytes,
                            "content": String::from_utf8_lossy(&file.data),
                            "utf8": utf8,
                        }))
                    }
                }
            })
            .await,
        )
    }

    #[tool(
        description = "Write a text file in a sandbox (replacing it; parent directories are created).",
        annotations(destructive_hint = true, idempotent_hint = true)
    )]
    async fn write_file(&self, Parameters(p): Parameters<WriteFile>) -> ToolResult {
        reply(
            self.call(move |c| {
                let id = parse_id(&p.id)?;
                let mode = match p.mode.as_deref() {
                    None => 0o644,
                    Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| Error::invalid("mode", format!("`{m}` is not an octal mode like 644")))?,
                };
                let bytes = c.write_file(&id, &p.path, mode, &mut std::io::Cursor::new(p.content.into_bytes()))?;
                Ok(json!({ "path": p.path, "bytes": bytes }))
            })
            .await,
        )
    }

    #[tool(
        description = "List a directory in a sandbox: name, kind (file/dir/symlink/other), size, mode, \
        modification time.",
        annotations(read_only_hint = true)
    )]
    async fn list_dir(&self, Parameters(p): Parameters<ListDir>) -> ToolResult {
        reply(
            self.call(move |c| {
                let path = p.path.unwrap_or_else(|| "/root".into());
                let entries = c.list_dir(&parse_id(&p.id)?, &path)?;
                Ok(json!({ "path": path, "entries": entries }))
            })
            .await,
        )
    }

    #[tool(
        description = "BRANCH: fork a running sandbox into `count` children that continue from its exact \
        state (memory, files, running processes, Python contexts) and then diverge independently. The \
        source keeps running (paused about a millisecond). Returns the child ids and the pause.",
        annotations(destructive_hint = false, idempotent_hint = false)
    )]
    async fn branch_sandbox(&self, Parameters(p): Parameters<BranchSandbox>) -> ToolResult {
        let n = match count("count", p.count) {
            Ok(n) => n,
            Err(e) => return reply(Err(e)),
        };
        let result = self.call(move |c| c.branch(&parse_id(&p.id)?, &BranchOptions::count(n))).await.map(|result| {
            self.session.adopt(result.children.iter().map(|i| &i.id), p.remove_on_session_end);
            json!({
                "source": result.source,
                "children": ids_of(&result.children),
                "pause_ms": (result.pause.as_secs_f64() * 1e6).round() / 1e3,
            })
        });
        reply(result)
    }

    #[tool(
        description = "Save a running sandbox to disk (it keeps running; paused about a millisecond). Restore \
        it later, any number of times, with restore_snapshot or create_sandbox(snapshot=...).",
        annotations(destructive_hint = false)
    )]
    async fn create_snapshot(&self, Parameters(p): Parameters<CreateSnapshot>) -> ToolResult {
        let opts = SnapshotOptions { tag: p.tag, diff: p.diff, wait: p.wait.unwrap_or(true) };
        reply(
            self.call(move |c| {
                opts.validate()?;
                let result = c.snapshot(&parse_id(&p.id)?, &opts)?;
                Ok(serde_json::to_value(result).unwrap_or(Value::Null))
            })
            .await,
        )
    }

    #[tool(description = "List snapshots on disk (id, tag, kind, size, source).", annotations(read_only_hint = true))]
    async fn list_snapshots(&self) -> ToolResult {
        reply(self.call(|c| c.snapshots()).await.map(|s| json!({ "snapshots": s })))
    }

    #[tool(
        description = "Start `count` sandboxes from a snapshot; they continue exactly where it was taken.",
        annotations(destructive_hint = false, idempotent_hint = false)
    )]
    async fn restore_snapshot(&self, Parameters(p): Parameters<RestoreSnapshot>) -> ToolResult {
        let create = CreateSandbox {
            snapshot: Some(p.snapshot),
            count: p.count,
            remove_on_session_end: p.remove_on_session_end,
            ..CreateSandbox::default()
        };
        reply(self.create(create).await.map(|created| json!({ "ids": ids_of(&created) })))
    }

    #[tool(
        description = "Wait until a text appears in a sandbox's console, or in the output of a command \
        (e.g. [\"tail\", \"-F\", \"/tmp/server.log\"]). Returns the matching line, or found=false after \
        the timeout.",
        annotations(read_only_hint = true)
    )]
    async fn wait_for_text(&self, Parameters(p): Parameters<WaitForText>, ct: CancellationToken) -> ToolResult {
        let timeout = match seconds("timeout_secs", p.timeout_secs, DEFAULT_WAIT, Some(MAX_WAIT)) {
            Ok(t) => t,
            Err(e) => return reply(Err(e)),
        };
        reply(
            self.call_cancellable(ct, move |c, cancel| {
                let source = match p.command {
                    Some(argv) => WaitSource::Command(ExecRequest::new(argv)),
                    None => WaitSource::Console,
                };
                let outcome = c.wait_for_text(&parse_id(&p.id)?, &p.text, &source, timeout, cancel)?;
                Ok(json!({
                    "found": outcome.line.is_some(),
                    "line": outcome.line,
                    "waited_ms": outcome.waited.as_millis() as u64,
                    "command_exit_code": outcome.command_exit.map(|s| s.shell_code()),
                }))
            })
            .await,
        )
    }

    #[tool(
        description = "Check that a sandbox is up and its guest agent answers; returns the round trip.",
        annotations(read_only_hint = true)
    )]
    async fn ping_sandbox(&self, Parameters(p): Parameters<SandboxRef>) -> ToolResult {
        reply(
            self.call(move |c| {
                let id = parse_id(&p.id)?;
                let info = c.get(&id)?;
                let started = std::time::Instant::now();
                let mut req = ExecRequest::new(["true"]);
                req.timeout = Some(Duration::from_secs(10));
                c.exec(&id, &req, None, &mut forkd_core::CapturedOutput::default(), &CancelToken::new())?;
                Ok(json!({
                    "id": id,
                    "state": info.state,
                    "round_trip_ms": (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
                }))
            })
            .await,
        )
    }

    #[tool(description = "List the root filesystem images sandboxes can boot.", annotations(read_only_hint = true))]
    async fn list_images(&self) -> ToolResult {
        let dirs = self.config.dirs.clone();
        reply(self.call(move |c| c.images(&dirs)).await.map(|images| json!({ "images": images })))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for ForkdMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_resources().build())
            .with_server_info(Implementation::new("forkd-mcp", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    /// Sessions, not stateless requests: a session's sandboxes are its resources and may be
    /// removed when it ends, which needs the handler to live as long as the session.
    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::V_2025_11_25))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let ids = self.session.ids();
        let infos = self.call(move |c| Ok(ids.iter().filter_map(|id| c.get(id).ok()).collect::<Vec<_>>())).await;
        let resources = infos
            .unwrap_or_default()
            .iter()
            .map(|info| {
                Resource::new(format!("{RESOURCE_PREFIX}{}", info.id), info.id.to_string())
                    .with_description(format!(
                        "sandbox ({}, {:?}) created by this session",
                        info.spec.image, info.state
                    ))
                    .with_mime_type("application/json")
            })
            .collect();
        Ok(ListResourcesResult::with_all_items(resources))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let uri = request.uri.clone();
        let Some(id) = uri.strip_prefix(RESOURCE_PREFIX).and_then(|id| SandboxId::parse(id).ok()) else {
            return Err(McpError::resource_not_found(
                format!("`{uri}` is not a forkd sandbox; resources look like {RESOURCE_PREFIX}<id>"),
                None,
            ));
        };
        let session = self.session.clone();
        match self.call(move |c| c.get(&id)).await {
            Ok(info) => {
                let body = sandbox_json(&info, &session).to_string();
                Ok(ReadResourceResult::new(vec![ResourceContents::text(body, uri).with_mime_type("application/json")])
                    .into())
            }
            Err(e) => Err(McpError::resource_not_found(e.to_string(), None)),
        }
    }
}
