//! The operator endpoints: status page, metrics, cluster view, health — on the private
//! listener; the jobs are in `jobs`, and `mod.rs` merges both into each listener's router.
//!
//! Invariants: served on `http.ops.listen` (loopback unless the operator says otherwise),
//! and on the public listener only behind the token; when `http.ops.token_file` is set
//! every request (health aside) must carry
//! `Authorization: Bearer <token>`, compared in constant time through its SHA-256. The
//! same router serves while drover waits for the engine (no jobs yet, `/readyz` 503).

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::state::OpsState;
use super::{Error, status_page};
use crate::metrics;

/// The status page, metrics and the cluster view. `mod.rs` adds the jobs and puts them
/// all [`behind_token`].
pub fn routes() -> Router<OpsState> {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_text))
        .route("/cluster", get(cluster))
}

/// `routes` behind the bearer token when one is set; with none, every request passes.
pub fn behind_token(routes: Router<OpsState>, state: &OpsState) -> Router<OpsState> {
    routes.layer(middleware::from_fn_with_state(state.clone(), bearer))
}

/// `/healthz` and `/readyz` as the public listener serves them to anyone: alive and in
/// which role (what Swarm's own node list says to anyone on the cluster), never the
/// cluster's addresses.
pub fn health() -> Router<OpsState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// `/healthz` with the cluster view, and `/readyz`: health as the operator listener serves
/// it, open (the container's health check has no token).
pub fn health_with_cluster() -> Router<OpsState> {
    Router::new()
        .route("/healthz", get(healthz_with_cluster))
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
/// heard of). Only on the operator listener: it names every node's address; when a token
/// is set, a request without it gets [`healthz`] (the container's health check has none).
async fn healthz_with_cluster(State(state): State<OpsState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return healthz(State(state)).await;
    }
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
async fn cluster(state: State<OpsState>, headers: HeaderMap) -> Response {
    healthz_with_cluster(state, headers).await
}

/// Whether the request carries the operator token, or none is set.
fn authorized(state: &OpsState, headers: &HeaderMap) -> bool {
    let Some(want) = &state.token else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
        })
        .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
    presented.is_some_and(|got| bool::from(got.ct_eq(want)))
}

async fn bearer(State(state): State<OpsState>, req: Request, next: Next) -> Response {
    if authorized(&state, req.headers()) {
        next.run(req).await
    } else {
        Error::Unauthorized.into_response()
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
