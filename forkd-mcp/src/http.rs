//! MCP over streamable HTTP at `/mcp`, behind a bearer token. Each MCP session gets its own
//! handler (and so its own sandboxes); it ends when the client deletes it or it idles out.

use crate::server::{Config, ForkdMcp};
use crate::session::Session;
use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use forkd_core::token::BearerToken;
use rmcp::transport::streamable_http_server::{
    session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A session nobody has used for this long is closed (and its sandboxes cleaned up if asked).
const IDLE_SESSION: Duration = Duration::from_secs(30 * 60);

async fn require_token(State(token): State<Arc<BearerToken>>, req: Request, next: Next) -> Response {
    if token.authorizes(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes())) {
        return next.run(req).await;
    }
    let body = serde_json::json!({
        "error": "missing or wrong bearer token: send `Authorization: Bearer <token>` (the content of --token-file)",
        "code": "unauthenticated",
    });
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], axum::Json(body)).into_response()
}

pub async fn serve(addr: SocketAddr, token: BearerToken, config: Config) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(IDLE_SESSION);
    let mut http = StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token());
    if !addr.ip().is_loopback() {
        // The Host check guards browsers against DNS rebinding on localhost; a server bound
        // to a public address is reached under names we cannot know, and has the token.
        http = http.disable_allowed_hosts();
    }
    let factory = move || {
        let session = Session::new(config.client.clone(), config.cleanup);
        Ok(ForkdMcp::new(config.clone(), session))
    };
    let mcp = StreamableHttpService::new(factory, Arc::new(sessions), http);
    let app = axum::Router::new()
        .nest_service("/mcp", mcp)
        .layer(axum::middleware::from_fn_with_state(Arc::new(token), require_token));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    // Scripts wait for this line (and read the port when ADDR had port 0).
    eprintln!("forkd-mcp: serving MCP at http://{}/mcp", listener.local_addr()?);
    let stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending::<()>().await,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stop.cancel();
        })
        .await?;
    Ok(())
}
