//! Bearer-token authentication for the TCP listener. The Unix socket relies on its file mode.

use crate::metrics::Metrics;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use forkd_core::token::BearerToken;
use std::sync::Arc;

#[derive(Clone)]
pub struct Token {
    /// `None` only if the listener was set up without one: then nothing is authorized.
    pub expected: Option<BearerToken>,
    pub metrics: Arc<Metrics>,
}

/// Paths a load balancer may probe without a token.
fn is_public(path: &str) -> bool {
    path == "/healthz" || path.starts_with("/grpc.health.v1.Health/")
}

pub async fn require_token(State(token): State<Token>, req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    let (ok, message) = match given {
        None => (false, "missing bearer token: send `authorization: Bearer <token>`"),
        Some(t) => (token.expected.as_ref().is_some_and(|e| e.authorizes(Some(t))), "wrong bearer token"),
    };
    if ok {
        return next.run(req).await;
    }
    token.metrics.error_named("unauthenticated");
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        tonic::Status::unauthenticated(message).into_http::<axum::body::Body>()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(serde_json::json!({ "error": message, "code": "unauthenticated" })),
        )
            .into_response()
    }
}
