//! The REST/JSON mirror of the API (routes in `router`; documented in the README). Every error is a JSON body
//! `{"error": "...", "code": "..."}` with an HTTP status mapped from the error code.

use crate::api::Shared;
use crate::bridge::{blocking, BoundedBuffer, BoundedCapture, CancelOnDrop};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use forkd_core::{
    CancelToken, Error, ErrorCode, MemoryUsage, NetworkPolicy, ResourceLimits, SandboxInfo, SandboxState,
};
use forkd_proto::convert::{self, MAX_MESSAGE_BYTES};
use forkd_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most output per stream a REST exec returns (the rest is cut; `truncated` says so).
pub const REST_OUTPUT_LIMIT: usize = 16 << 20;

/// A REST error response.
#[derive(Debug)]
pub struct RestError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

/// HTTP status for an error code.
pub fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorCode::FailedPrecondition => StatusCode::CONFLICT,
        ErrorCode::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        // nginx's "client closed request", as in Google's HTTP mapping of CANCELLED.
        ErrorCode::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::CONFLICT),
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for RestError {
    fn from(e: Error) -> Self {
        let retry_after_ms = match &e {
            Error::ResourceExhausted { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        };
        RestError { status: http_status(e.code()), code: e.code().as_str(), message: e.to_string(), retry_after_ms }
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message, "code": self.code }))).into_response();
        if let Some(ms) = self.retry_after_ms {
            if let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            if let Ok(v) = HeaderValue::from_str(&ms.to_string()) {
                resp.headers_mut().insert(convert::RETRY_AFTER_MS, v);
            }
        }
        resp
    }
}

type Api = State<Arc<Shared>>;
type Reply = Result<Response, RestError>;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/info", get(info))
        .route("/v1/images", get(images))
        .route("/v1/sandboxes", get(list).post(create))
        .route("/v1/sandboxes/{id}", get(get_one).delete(delete))
        .route("/v1/sandboxes/{id}/exec", axum::routing::post(exec))
        .route("/v1/sandboxes/{id}/branch", axum::routing::post(branch))
        .route("/v1/sandboxes/{id}/eval", axum::routing::post(eval))
        .route("/v1/sandboxes/{id}/contexts", get(list_contexts))
        .route("/v1/sandboxes/{id}/contexts/{name}", axum::routing::delete(close_context))
        .route("/v1/sandboxes/{id}/console", get(console))
        .route("/v1/sandboxes/{id}/files", get(read_file).put(write_file))
        .route("/v1/sandboxes/{id}/dir", get(list_dir))
        .route("/v1/sandboxes/{id}/snapshot", axum::routing::post(snapshot_sandbox))
        .route("/v1/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/v1/snapshots/{tag}", axum::routing::delete(delete_snapshot))
        .route("/v1/snapshots/{tag}/info", get(snapshot_info))
        .route("/v1/snapshots/{tag}/compact", axum::routing::post(compact_snapshot))
        .route("/v1/snapshots/{tag}/verify", axum::routing::post(verify_snapshot))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
        .with_state(shared)
}

fn invalid(s: &Shared, field: &str, reason: impl Into<String>) -> RestError {
    s.failed(Error::invalid(field, reason)).into()
}

/// The request body as JSON of type `T` (an empty body is `{}`), errors naming the field.
fn body<T: serde::de::DeserializeOwned>(s: &Shared, bytes: Result<Bytes, BytesRejection>) -> Result<T, RestError> {
    let bytes = bytes.map_err(|e| {
        s.metrics.error(ErrorCode::InvalidArgument);
        RestError { status: e.status(), code: "invalid_argument", message: e.body_text(), retry_after_ms: None }
    })?;
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
    let de = &mut serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // Syntax errors have no path (`?`), whole-body type errors the root (`.`).
        let field = if path == "." || path == "?" { "body".to_string() } else { path };
        invalid(s, &field, e.into_inner().to_string())
    })
}

fn query<T>(s: &Shared, q: Result<Query<T>, QueryRejection>) -> Result<T, RestError> {
    q.map(|Query(q)| q).map_err(|e| invalid(s, "query", e.body_text()))
}

pub fn sandbox_json(info: &SandboxInfo, memory: Option<MemoryUsage>) -> Value {
    let (state, reason) = match &info.state {
        SandboxState::Running => ("running", None),
        SandboxState::Exited(why) => ("exited", Some(why)),
    };
    let mut v = json!({
        "id": info.id,
        "state": state,
        "image": info.spec.image,
        "memory_mib": info.spec.memory_mib,
        "vcpus": info.spec.vcpus,
        "labels": info.spec.labels,
        "created_unix_ms": info.created_unix_ms,
        "parent": info.parent,
        "template": info.template,
        "restored_from": info.restored_from,
        "network": info.spec.network,
        "limits": info.spec.limits,
    });
    if let Some(reason) = reason {
        v["exit_reason"] = json!(reason);
    }
    if let Some(kernel) = &info.spec.kernel {
        v["kernel"] = json!(kernel);
    }
    if let Some(m) = memory {
        v["memory"] = json!(m);
    }
    v
}

/// Unknown paths: UNIMPLEMENTED for gRPC clients, a JSON 404 for everyone else.
async fn not_found(State(s): Api, headers: axum::http::HeaderMap, uri: axum::http::Uri) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!("no method {}", uri.path())).into_http::<axum::body::Body>();
    }
    s.metrics.error(ErrorCode::NotFound);
    RestError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!("no route {}; the API is under /v1/sandboxes", uri.path()),
        retry_after_ms: None,
    }
    .into_response()
}

async fn method_not_allowed(State(s): Api, method: axum::http::Method, uri: axum::http::Uri) -> RestError {
    s.metrics.error(ErrorCode::InvalidArgument);
    RestError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "invalid_argument",
        message: format!("{method} is not allowed on {}", uri.path()),
        retry_after_ms: None,
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(s): Api) -> Response {
    let text = s.metrics.render(&s.controller);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn info(State(s): Api) -> Json<Value> {
    let i = s.info();
    Json(json!({
        "version": i.version, "state_dir": i.state_dir, "backend": i.backend, "pid": i.pid,
        "started_unix_ms": i.started_unix_ms, "max_concurrent_creates": i.max_concurrent_creates,
        "max_concurrent_branches": i.max_concurrent_branches, "max_sandboxes": i.max_sandboxes,
    }))
}

async fn images(State(s): Api) -> Reply {
    let images = s.images().await?;
    Ok(Json(json!({ "images": images })).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct MemoryQuery {
    memory: bool,
}

async fn list(State(s): Api, q: Result<Query<MemoryQuery>, QueryRejection>) -> Reply {
    let q = query(&s, q)?;
    let list: Vec<Value> = s.list(q.memory).await.iter().map(|(i, m)| sandbox_json(i, *m)).collect();
    Ok(Json(json!({ "sandboxes": list })).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct CreateBody {
    image: String,
    memory_mib: u64,
    vcpus: u32,
    labels: BTreeMap<String, String>,
    from_template: String,
    #[serde(alias = "template_name")]
    template: String,
    kernel: String,
    /// Start `n` sandboxes from this snapshot (tag or id) instead of booting.
    snapshot_tag: String,
    /// With `template`: "python" or "python:module,..." started in its `main` code context.
    warm: String,
    #[serde(alias = "count")]
    n: Option<u32>,
    /// `{"mode": "none"|"nat", "allow": ["CIDR[:PORT]"|"allow-all", ...]}`
    network: NetworkPolicy,
    /// `{"memory_mib", "cpus", "io_bps", "io_iops", "pids"}`, each optional.
    limits: ResourceLimits,
}

async fn create(State(s): Api, bytes: Result<Bytes, BytesRejection>) -> Reply {
    let b: CreateBody = body(&s, bytes)?;
    if !b.snapshot_tag.is_empty() {
        if b.n == Some(0) {
            return Err(invalid(&s, "n", "0 is out of range; start at least 1 sandbox"));
        }
        let count = convert::restore_count(b.n.unwrap_or(1)).map_err(|e| RestError::from(s.failed(e)))?;
        let sandboxes = s.restore(b.snapshot_tag, count).await?;
        let list: Vec<Value> = sandboxes.iter().map(|i| sandbox_json(i, None)).collect();
        return Ok((StatusCode::CREATED, Json(json!({ "sandboxes": list }))).into_response());
    }
    if b.n.is_some_and(|n| n != 1) {
        return Err(invalid(&s, "n", "several sandboxes at once come from a snapshot (`snapshot_tag`) or a branch"));
    }
    let req = pb::CreateRequest {
        image: b.image,
        memory_mib: b.memory_mib,
        vcpus: b.vcpus,
        labels: b.labels.into_iter().collect(),
        from_template: b.from_template,
        template_name: b.template,
        kernel: b.kernel,
        network: Some(convert::network_to_pb(&b.network)),
        limits: Some(convert::limits_to_pb(&b.limits)),
        warm: b.warm,
    };
    let plan = convert::create_plan(req).map_err(|e| RestError::from(s.failed(e)))?;
    let info = s.create(plan).await?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&info, None))).into_response())
}

async fn get_one(State(s): Api, Path(id): Path<String>) -> Reply {
    let id = s.id(&id)?;
    let (info, memory) = s.get(id.clone(), true).await?;
    let mut body = sandbox_json(&info, memory);
    if let Some(resources) = s.resources(id).await {
        body["resources"] = json!(resources);
    }
    Ok(Json(body).into_response())
}

async fn delete(State(s): Api, Path(id): Path<String>) -> Reply {
    let id = s.id(&id)?;
    s.delete(id.clone()).await?;
    Ok(Json(json!({ "id": id, "deleted": true })).into_response())
}

/// `env` as `["K=V", ...]` or `{"K": "V", ...}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum EnvBody {
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    #[serde(alias = "argv")]
    args: Vec<String>,
    #[serde(default)]
    timeout_secs: Option<f64>,
    #[serde(default)]
    env: Option<EnvBody>,
    #[serde(default)]
    cwd: Option<String>,
    /// Text fed to the command's stdin.
    #[serde(default)]
    stdin: Option<String>,
}

async fn exec(State(s): Api, Path(id): Path<String>, bytes: Result<Bytes, BytesRejection>) -> Reply {
    let id = s.id(&id)?;
    let b: ExecBody = body(&s, bytes)?;
    let env = match b.env {
        None => Vec::new(),
        Some(EnvBody::List(l)) => l,
        Some(EnvBody::Map(m)) => m.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
    };
    let req = convert::exec_request(b.args, env, b.cwd.unwrap_or_default(), b.timeout_secs.unwrap_or(0.0))
        .map_err(|e| RestError::from(s.failed(e)))?;
    s.exists(&id)?;
    let cancel = CancelToken::new();
    // Dropped with this handler when the client disconnects: the command is killed.
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let stdin = b.stdin.map(|t| Box::new(std::io::Cursor::new(t.into_bytes())) as Box<dyn std::io::Read + Send>);
    let c = s.controller.clone();
    let _counted = s.metrics.exec_started();
    let (outcome, out) = blocking(move || {
        let mut out = BoundedCapture::new(REST_OUTPUT_LIMIT);
        let outcome = c.exec_with_cancel(&id, &req, stdin, &mut out, &cancel)?;
        Ok((outcome, out))
    })
    .await
    .map_err(|e| s.failed(e))?;
    let exit = convert::exec_exit(&outcome);
    Ok(Json(json!({
        "exit_code": exit.exit_code,
        "signal": exit.signal,
        "timed_out": exit.timed_out,
        "stdout": String::from_utf8_lossy(&out.stdout),
        "stderr": String::from_utf8_lossy(&out.stderr),
        "truncated": out.truncated,
        "duration_ms": exit.duration_ms,
    }))
    .into_response())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct EvalBody {
    code: String,
    context: String,
    lang: String,
    timeout_secs: f64,
}

/// `POST /v1/sandboxes/:id/eval {"code", "context", "lang", "timeout_secs"}`: the snippet's
/// output, value, JSON value and exception at once (the original forkd's path).
async fn eval(State(s): Api, Path(id): Path<String>, bytes: Result<Bytes, BytesRejection>) -> Reply {
    let id = s.id(&id)?;
    let b: EvalBody = body(&s, bytes)?;
    let wire = pb::EvalRequest {
        id: id.to_string(),
        code: b.code,
        context: b.context,
        lang: b.lang,
        timeout_secs: b.timeout_secs,
    };
    let req = convert::eval_request(wire).map_err(|e| RestError::from(s.failed(e)))?;
    s.exists(&id)?;
    let cancel = CancelToken::new();
    // Dropped with this handler when the client disconnects: the snippet is interrupted.
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let c = s.controller.clone();
    let (result, out) = blocking(move || {
        let mut out = BoundedCapture::new(REST_OUTPUT_LIMIT);
        let result = c.eval(&id, &req, &mut out, &cancel)?;
        Ok((result, out))
    })
    .await
    .map_err(|e| s.failed(e))?;
    let mut body = json!(result);
    body["stdout"] = json!(String::from_utf8_lossy(&out.stdout));
    body["stderr"] = json!(String::from_utf8_lossy(&out.stderr));
    body["truncated"] = json!(out.truncated);
    Ok(Json(body).into_response())
}

async fn list_contexts(State(s): Api, Path(id): Path<String>) -> Reply {
    let id = s.id(&id)?;
    Ok(Json(json!({ "contexts": s.contexts(id).await? })).into_response())
}

async fn close_context(State(s): Api, Path((id, name)): Path<(String, String)>) -> Reply {
    let id = s.id(&id)?;
    s.close_context(id, name).await?;
    Ok(Json(json!({})).into_response())
}

async fn branch(State(s): Api, Path(id): Path<String>, bytes: Result<Bytes, BytesRejection>) -> Reply {
    let id = s.id(&id)?;
    let b: Value = body(&s, bytes)?;
    let Value::Object(fields) = b else {
        return Err(invalid(&s, "body", "must be a JSON object like {\"count\": 2}"));
    };
    if let Some(unknown) = fields.keys().find(|k| !matches!(k.as_str(), "count" | "n" | "limits")) {
        return Err(invalid(&s, unknown, "unknown field; expected `count` (or `n`) and `limits`"));
    }
    let limits = match fields.get("limits") {
        None | Some(Value::Null) => ResourceLimits::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            invalid(
                &s,
                "limits",
                format!("{e}; give {{\"memory_mib\", \"cpus\", \"io_bps\", \"io_iops\", \"pids\"}}, each optional"),
            )
        })?,
    };
    let count = match fields.get("count").or_else(|| fields.get("n")) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
            (Some(v), _) => Some(v),
            (None, Some(_)) => Some(i64::MAX),
            _ => return Err(invalid(&s, "count", format!("{n} is not a whole number"))),
        },
        Some(other) => return Err(invalid(&s, "count", format!("{other} is not a number"))),
    };
    let opts = convert::branch_options(count, limits).map_err(|e| RestError::from(s.failed(e)))?;
    let result = s.branch(id, opts).await?;
    let children: Vec<Value> = result.children.iter().map(|c| sandbox_json(c, None)).collect();
    Ok(Json(json!({
        "source": result.source,
        "children": children,
        "pause_ms": result.pause.as_secs_f64() * 1000.0,
    }))
    .into_response())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct SnapshotBody {
    /// The sandbox (POST /v1/snapshots only; the path names it otherwise).
    #[serde(alias = "sandbox_id", alias = "sandbox")]
    id: String,
    tag: Option<String>,
    diff: bool,
    wait: bool,
}

async fn take_snapshot(s: &Shared, id: &str, b: SnapshotBody) -> Reply {
    let id = s.id(id)?;
    let opts = forkd_core::SnapshotOptions { tag: b.tag, diff: b.diff, wait: b.wait };
    let result = s.snapshot(id, opts).await?;
    let status = if result.durable { StatusCode::CREATED } else { StatusCode::ACCEPTED };
    Ok((status, Json(json!(result))).into_response())
}

async fn snapshot_sandbox(State(s): Api, Path(id): Path<String>, bytes: Result<Bytes, BytesRejection>) -> Reply {
    let b: SnapshotBody = body(&s, bytes)?;
    if !b.id.is_empty() && b.id != id {
        return Err(invalid(&s, "id", "the path names the sandbox; leave `id` out"));
    }
    take_snapshot(&s, &id, b).await
}

async fn create_snapshot(State(s): Api, bytes: Result<Bytes, BytesRejection>) -> Reply {
    let b: SnapshotBody = body(&s, bytes)?;
    if b.id.is_empty() {
        return Err(invalid(&s, "id", "name the sandbox to snapshot: {\"id\": \"sb-...\", \"tag\": \"...\"}"));
    }
    let id = b.id.clone();
    take_snapshot(&s, &id, b).await
}

async fn list_snapshots(State(s): Api) -> Reply {
    Ok(Json(json!({ "snapshots": s.snapshots().await? })).into_response())
}

async fn snapshot_info(State(s): Api, Path(tag): Path<String>) -> Reply {
    Ok(Json(json!(s.snapshot_info(tag).await?)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct CascadeQuery {
    cascade: bool,
}

async fn delete_snapshot(
    State(s): Api,
    Path(tag): Path<String>,
    q: Result<Query<CascadeQuery>, QueryRejection>,
) -> Reply {
    let q = query(&s, q)?;
    let removed = s.remove_snapshot(tag, q.cascade).await?;
    Ok(Json(json!({ "removed": removed })).into_response())
}

async fn compact_snapshot(State(s): Api, Path(tag): Path<String>) -> Reply {
    Ok(Json(json!(s.compact_snapshot(tag).await?)).into_response())
}

async fn verify_snapshot(State(s): Api, Path(tag): Path<String>) -> Reply {
    Ok(Json(json!(s.verify_snapshot(tag).await?)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ConsoleQuery {
    max_bytes: u64,
}

async fn console(State(s): Api, Path(id): Path<String>, q: Result<Query<ConsoleQuery>, QueryRejection>) -> Reply {
    let id = s.id(&id)?;
    let q = query(&s, q)?;
    let data = s.console(id, q.max_bytes).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], data).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    path: String,
    /// Octal permission bits for a new file, e.g. `755`. Default 644.
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirQuery {
    path: String,
}

async fn list_dir(State(s): Api, Path(id): Path<String>, q: Result<Query<DirQuery>, QueryRejection>) -> Reply {
    let id = s.id(&id)?;
    let q = query(&s, q)?;
    let entries = s.list_dir(id, q.path).await?;
    Ok(Json(json!({ "entries": entries })).into_response())
}

async fn read_file(State(s): Api, Path(id): Path<String>, q: Result<Query<FileQuery>, QueryRejection>) -> Reply {
    let id = s.id(&id)?;
    let q = query(&s, q)?;
    let c = s.controller.clone();
    let data = blocking(move || {
        let mut buf = BoundedBuffer { data: Vec::new(), limit: REST_OUTPUT_LIMIT };
        c.read_file(&id, &q.path, &mut buf)?;
        Ok(buf.data)
    })
    .await
    .map_err(|e| s.failed(e))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

async fn write_file(
    State(s): Api,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Reply {
    let id = s.id(&id)?;
    let q = query(&s, q)?;
    let mode = match q.mode.as_deref() {
        None => 0o644,
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| invalid(&s, "mode", format!("`{m}` is not octal permission bits like 644")))?,
    };
    let bytes = bytes.map_err(|e| invalid(&s, "body", e.body_text()))?;
    let c = s.controller.clone();
    let n = blocking(move || c.write_file(&id, &q.path, mode, &mut std::io::Cursor::new(bytes)))
        .await
        .map_err(|e| s.failed(e))?;
    Ok(Json(json!({ "bytes_written": n })).into_response())
}
