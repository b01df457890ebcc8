//! The operator endpoints: status page, jobs, metrics, health — on the private listener.
//!
//! Invariants: served only on `http.ops.listen` (loopback unless the operator says
//! otherwise), and when `http.ops.token_file` is set every request must carry
//! `Authorization: Bearer <token>`, compared in constant time through its SHA-256. The
//! same router serves while drover waits for the engine (no jobs yet, `/readyz` 503).

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::state::OpsState;
use super::{Error, status_page};
use crate::metrics;

/// The operator listener's router: the operator endpoints (behind the token when one is
/// set), and health open, `/healthz` with the cluster view.
pub fn router(state: OpsState) -> Router {
    operator(&state)
        // Health stays open: the container's health check has no token.
        .route("/healthz", get(healthz_with_cluster))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The public listener's share of the operator endpoints when a token is set, so
/// Prometheus can scrape through the one published port; health there is [`health`].
pub fn behind_token(state: OpsState) -> Router {
    operator(&state).merge(health()).with_state(state)
}

/// Status page, metrics, jobs and the cluster view, behind the bearer token when set.
fn operator(state: &OpsState) -> Router<OpsState> {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_text))
        .route("/cluster", get(cluster))
        .merge(super::jobs::router())
        .layer(middleware::from_fn_with_state(state.clone(), bearer))
}

/// `/healthz` and `/readyz` as the public listener serves them to anyone: alive and in
/// which role (what Swarm's own node list says to anyone on the cluster), never the
/// cluster's addresses.
pub fn health() -> Router<OpsState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// `{"status":"ok","role":"worker"}`; role `starting` until the engine has been asked.
async fn healthz(State(state): State<OpsState>) -> Response {
    let role = state.board.role();
    axum::Json(serde_json::json!({
        "status": "ok",
        "role": role.map_or("starting", |r| r.as_str()),
    }))
    .into_response()
}

/// [`healthz`] plus the cluster as this instance sees it: the controller and, on the
/// controller, every peer with its last contact (`"controller":{"node":..,"hostname":..,
/// "address":..,"last_contact_ms_ago":..},"peers":[..]`; controller `null` until one was
/// heard of). Only on the operator listener: it names every node's address.
async fn healthz_with_cluster(State(state): State<OpsState>) -> Response {
    let role = state.board.role();
    let cluster = state.contacts.view(role);
    axum::Json(serde_json::json!({
        "status": "ok",
        "role": role.map_or("starting", |r| r.as_str()),
        "controller": cluster.controller,
        "peers": cluster.peers,
    }))
    .into_response()
}

/// The cluster view of [`healthz_with_cluster`], for the public listener behind the token.
async fn cluster(state: State<OpsState>) -> Response {
    healthz_with_cluster(state).await
}

async fn bearer(State(state): State<OpsState>, req: Request, next: Next) -> Response {
    let Some(want) = &state.token else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
        })
        .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
    match presented {
        Some(got) if bool::from(got.ct_eq(want)) => next.run(req).await,
        _ => Error::Unauthorized.into_response(),
    }
}

async fn metrics_text() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::get().encode(),
    )
        .into_response()
}

async fn readyz(State(state): State<OpsState>) -> Response {
    if state.board.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn index(State(state): State<OpsState>) -> Html<String> {
    let jobs = state
        .jobs
        .as_ref()
        .and_then(|j| serde_json::to_value(j.list()).ok())
        .unwrap_or_default();
    let mut summary = state.board.summary();
    let cluster = state.contacts.view(summary.role);
    if cluster.controller.is_some() || !cluster.peers.is_empty() {
        summary.peers = status_page::contact_lines(&cluster);
    }
    Html(status_page::render(&summary, &jobs))
}
