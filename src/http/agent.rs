//! The controller's half of the agent API: webhooks and job reads that other instances
//! forward here while this one is the controller (`cluster::forward`), and the listener
//! the whole agent API is served on. The agent's own routes (files, heartbeats) are in
//! `cluster::agent`; `mod.rs` merges the two.
//!
//! Invariants: a forwarded request's body is read only once its signature headers parse
//! and its timestamp is fresh, within the route's limit and the agent's byte budget; it is
//! answered only after its signature, for its own path and this node, checks out
//! (`cluster::wire::Guard`) and only while this instance is the controller (an instance
//! that no longer is refuses, so the sender looks again); it goes through the same
//! [`Intake`] as the public listener (shared rate buckets and failure budgets) and reads
//! the controller's own jobs, never forwarded again; the answer is relayed signed.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

use super::conn;
use super::hooks::{self, Intake};
use super::jobs;
use super::state::OpsState;
use crate::cluster::agent::Agent;
use crate::cluster::forward::{Envelope, JobsQuery, Relay};
use crate::cluster::wire::{Refusal, SMALL_BODY, To, refused};
use crate::config;
use crate::role::Role;

/// What the agent API adds for the controller: forwarded webhooks and job reads.
#[derive(Clone)]
pub struct AgentSide {
    /// The largest forwarded webhook envelope: the hook's body, base64, and a few headers.
    pub max_envelope: usize,
    /// The public listener's intake.
    pub intake: Arc<Intake>,
    /// Job reads of this instance, without a forwarder.
    pub ops: OpsState,
    pub agent: Arc<Agent>,
    pub role: tokio::sync::watch::Receiver<Role>,
}

/// The routes through which other instances reach this one's intake and jobs while it is
/// the controller, with the body limit and request time of `http`.
pub fn routes(side: AgentSide, http: &config::Http) -> Router {
    Router::new()
        .route(
            crate::cluster::wire::HOOKS_PATH,
            axum::routing::post(forwarded_hook),
        )
        .route(
            crate::cluster::wire::JOBS_PATH,
            axum::routing::post(forwarded_jobs),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            http.request_timeout,
        ))
        .with_state(side)
}

/// Authenticates a forwarded request, checks that this instance is the controller (a
/// request to an instance that no longer is must not be accepted here), then parses it.
async fn admitted<T: serde::de::DeserializeOwned>(
    side: &AgentSide,
    path: &str,
    req: Request,
    limit: usize,
) -> std::result::Result<(HeaderMap, T), Refusal> {
    let (headers, body, _held) = side.agent.body(req, limit).await?;
    let own = side.agent.own_node();
    side.agent
        .guard()
        .check(&headers, To { path, node: &own }, &body)?;
    if !side.role.borrow().is_controller() {
        return Err(Refusal::NotController);
    }
    let parsed = serde_json::from_slice(&body).map_err(|_| Refusal::BadRequest)?;
    Ok((headers, parsed))
}

async fn signed_relay(
    side: &AgentSide,
    path: &str,
    headers: &HeaderMap,
    response: Response,
) -> Response {
    let relay = Relay::of(response).await;
    let own = side.agent.own_node();
    match serde_json::to_vec(&relay) {
        Ok(body) => {
            side.agent
                .guard()
                .answer(headers, To { path, node: &own }, StatusCode::OK, body)
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn forwarded_hook(State(side): State<AgentSide>, req: Request) -> Response {
    let path = crate::cluster::wire::HOOKS_PATH;
    let (headers, envelope): (HeaderMap, Envelope) =
        match admitted(&side, path, req, side.max_envelope).await {
            Ok(envelope) => envelope,
            Err(refusal) => return refused(refusal),
        };
    let response = hooks::forwarded(&side.intake, envelope).await;
    signed_relay(&side, path, &headers, response).await
}

async fn forwarded_jobs(State(side): State<AgentSide>, req: Request) -> Response {
    let path = crate::cluster::wire::JOBS_PATH;
    let (headers, query): (HeaderMap, JobsQuery) =
        match admitted(&side, path, req, SMALL_BODY).await {
            Ok(query) => query,
            Err(refusal) => return refused(refusal),
        };
    let response = match query.id {
        Some(id) => jobs::one_here(&side.ops, &id).into_response(),
        None => jobs::list_here(&side.ops),
    };
    signed_relay(&side, path, &headers, response).await
}

/// Serves the agent API (`app`: the router of `http::agent_routes`) until `shutdown`, with
/// the public listener's header timeout and connection caps. A peer's apply may take the
/// agent's whole request time before any byte of its answer, so a connection is never
/// closed as idle before that.
pub async fn serve_agent(
    listener: TcpListener,
    app: Router,
    http: &config::Http,
    contacts: Arc<crate::cluster::contacts::Contacts>,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "agent API listening");
    }
    let agent_time = crate::cluster::wire::REQUEST_TIMEOUT + Duration::from_secs(1);
    let mut limits = conn::Limits::of(http, "agent_connections");
    // The agent's router bounds its own requests' time; forwarded requests were counted
    // where they arrived.
    limits.requests = None;
    limits.idle_timeout = limits.idle_timeout.max(agent_time);
    limits.drain = limits.drain.max(agent_time);
    limits.local = Some(Arc::new(move |ip| contacts.admits_local(ip)));
    conn::serve(listener, conn::fixed(app), limits, shutdown).await;
}
