//! The HTTP surface, one router per area: webhooks in (`hooks`), jobs and the status
//! page out (`jobs`, `status_page`), metrics and health (`ops`), the controller's half of
//! the agent API (`agent`), one [`Error`] → answer. The state the handlers share
//! ([`AppState`]) lives here, and this file is the one place where the areas' routers
//! merge into what each listener serves:
//!
//! - public (`http.listen`, [`public_router`]): `POST /hooks/{name}`, `/healthz` and
//!   `/readyz`; with `http.ops.token_file` set, also the operator endpoints behind
//!   `Authorization: Bearer` (so Prometheus can scrape through the one published port).
//!   While drover waits for the engine: health, and 503 for anything else.
//! - operator (`http.ops.listen`, loopback by default): the status page `/`, `/metrics`,
//!   `/cluster`, `/jobs` and `/jobs/{id}` (behind the token when one is set), and
//!   `/healthz` (with the cluster view) and `/readyz` open. While drover waits for the
//!   engine: the same, without jobs.
//! - agent (`cluster.listen`, cluster mode only, [`agent_routes`]): the agent's own routes
//!   (`cluster::agent`: files, heartbeats) and, while this instance is the controller,
//!   webhooks and job reads forwarded by the others (`agent`); every request signed.
//!
//! Invariants: every connection is admitted through a cap in all and per source, has a
//! header-read and an idle timeout, and every request on the public and operator listeners
//! through a cap on requests in flight in all and per source (beyond: 503) and a time limit
//! (`http.request_timeout` → 408), all in `conn`; answers carry fixed messages and job data
//! only, never request text; on shutdown the listeners close, requests in flight finish,
//! and after [`drain_limit`] the rest is dropped.

mod agent;
mod conn;
mod error;
mod hooks;
mod jobs;
mod ops;
mod state;
pub mod status_page;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use agent::serve_agent;
pub use conn::{Gate, drain_limit};
pub use error::{Error, Result};
pub use hooks::Intake;
pub use state::OpsState;

use crate::cluster::agent::Agent;
use crate::cluster::contacts::Contacts;
use crate::cluster::forward::Forwarder;
use crate::config;
use crate::role::Role;
use crate::status::Board;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub hooks: Arc<crate::hooks::Service>,
    pub board: Arc<Board>,
    pub http: config::Http,
    /// One intake for every listener (the public one and forwarded requests), so rate
    /// buckets and failure budgets are shared.
    intake: Arc<Intake>,
    forward: Option<Arc<Forwarder>>,
    contacts: Arc<Contacts>,
    /// The default trusted proxies of the intake, kept current by the render loop.
    steps: crate::state::StepAddresses,
}

impl AppState {
    pub fn new(
        hooks: Arc<crate::hooks::Service>,
        board: Arc<Board>,
        contacts: Arc<Contacts>,
        http: config::Http,
    ) -> AppState {
        AppState {
            intake: Arc::new(Intake::new(hooks.clone(), &http, Default::default())),
            hooks,
            board,
            http,
            forward: None,
            contacts,
            steps: Default::default(),
        }
    }

    /// Cluster mode: webhooks and job reads go to the controller while this instance is not it.
    pub fn with_forward(mut self, forward: Option<Arc<Forwarder>>) -> AppState {
        self.intake = Arc::new(
            Intake::new(self.hooks.clone(), &self.http, self.steps.clone())
                .with_forward(forward.clone()),
        );
        self.forward = forward;
        self
    }

    /// Where the render loop keeps the addresses of nginx (and every other step's
    /// containers): the trusted proxies when `http.trusted_proxies` is unset.
    pub fn with_step_addresses(mut self, steps: crate::state::StepAddresses) -> AppState {
        self.steps = steps;
        self.intake = Arc::new(
            Intake::new(self.hooks.clone(), &self.http, self.steps.clone())
                .with_forward(self.forward.clone()),
        );
        self
    }

    fn ops(&self) -> Result<OpsState> {
        Ok(OpsState::new(
            self.board.clone(),
            Some(self.hooks.jobs().clone()),
            self.contacts.clone(),
            &self.http.ops,
        )?
        .with_forward(self.forward.clone()))
    }
}

// The routers: every merge of the areas' routes happens below, nowhere else.

/// The public listener's router: webhooks and health; with `http.ops.token_file` set, also
/// the operator endpoints behind the bearer token (so Prometheus can scrape through the one
/// published port).
pub fn public_router(state: &AppState) -> Result<Router> {
    let ops = state.ops()?;
    let rest = if ops.token.is_some() {
        operator(&ops).merge(ops::health()).with_state(ops)
    } else {
        ops::health().with_state(ops)
    };
    Ok(hooks::router(state.intake.clone()).merge(rest))
}

/// The public router while drover waits for the engine: health, and 503 (try again) for
/// anything else, so a webhook sent now is not told that its hook does not exist.
fn waiting_public(state: OpsState) -> Router {
    ops::health()
        .fallback(|| async { Error::NotReady })
        .with_state(state)
}

/// The operator listener's router: the operator endpoints (behind the token when one is
/// set), and health open, `/healthz` with the cluster view.
fn operator_router(state: OpsState) -> Router {
    operator(&state)
        // Health stays open: the container's health check has no token.
        .merge(ops::health_with_cluster())
        .with_state(state)
}

/// Status page, metrics, the cluster view and jobs, behind the bearer token when set.
fn operator(state: &OpsState) -> Router<OpsState> {
    ops::behind_token(ops::routes().merge(jobs::router()), state)
}

/// Public and operator routes on one router: for tests (`app().oneshot(..)`) and for
/// [`serve_listener`]. Requests in flight and their time are bounded by the listener
/// (`conn`), not by the router.
pub fn router(state: AppState) -> Result<Router> {
    Ok(hooks::router(state.intake.clone()).merge(operator_router(state.ops()?)))
}

/// The agent API's router, served by [`serve_agent`]: the agent's own routes (files,
/// heartbeats) and the ones through which other instances reach this one's intake and jobs
/// while it is the controller (`cluster::forward`).
pub fn agent_routes(
    state: &AppState,
    agent: Arc<Agent>,
    role: tokio::sync::watch::Receiver<Role>,
) -> Result<Router> {
    let side = agent::AgentSide {
        max_envelope: state
            .http
            .max_body
            .saturating_mul(2)
            .saturating_add(64 * 1024),
        intake: state.intake.clone(),
        // Reads here are the controller's own, never forwarded again.
        ops: state.ops()?.with_forward(None),
        agent: agent.clone(),
        role,
    };
    Ok(crate::cluster::agent::router(agent).merge(agent::routes(side, &state.http)))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Both listeners, serving from the moment drover starts: the waiting routes first, the
/// full ones once [`Switch::install`] has put them in place, on the same sockets.
pub struct Server {
    http: config::Http,
    public: (TcpListener, conn::Routes),
    ops: (TcpListener, conn::Routes),
}

/// Puts the running daemon's routes in place of the waiting ones.
pub struct Switch {
    public: tokio::sync::watch::Sender<Router>,
    ops: tokio::sync::watch::Sender<Router>,
}

impl Switch {
    /// From the next request on, every connection (open or new) is answered by the full
    /// routes of `state`.
    pub fn install(self, state: &AppState) -> Result<()> {
        let public = public_router(state)?;
        let ops = operator_router(state.ops()?);
        // The waiting routers go; a request they are serving keeps its own clone.
        drop(self.public.send_replace(public));
        drop(self.ops.send_replace(ops));
        Ok(())
    }
}

impl Server {
    /// Binds both listeners (a port clash is a start-up error) with the routes of the
    /// time drover waits for the engine and starts: health on the public listener
    /// (`/readyz` 503, hooks 503: try again), the operator router without jobs on the
    /// private one.
    pub async fn waiting(
        http: &config::Http,
        board: Arc<Board>,
        contacts: Arc<Contacts>,
    ) -> Result<(Server, Switch)> {
        let state = OpsState::new(board, None, contacts, &http.ops)?;
        let (public_tx, public) = tokio::sync::watch::channel(waiting_public(state.clone()));
        let (ops_tx, ops) = tokio::sync::watch::channel(operator_router(state));
        let server = Server {
            http: http.clone(),
            public: (bind(http.listen).await?, public),
            ops: (bind(http.ops.listen).await?, ops),
        };
        let (public, ops) = server.local_addrs();
        for addr in [public, ops].into_iter().flatten() {
            tracing::info!(%addr, "http listening");
        }
        let switch = Switch {
            public: public_tx,
            ops: ops_tx,
        };
        Ok((server, switch))
    }

    /// The addresses bound (public, operator): tests bind port 0.
    pub fn local_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (
            self.public.0.local_addr().ok(),
            self.ops.0.local_addr().ok(),
        )
    }

    /// Serves until `shutdown`, then drains; returns when both listeners are closed.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server { http, public, ops } = self;
        let limits = || conn::Limits::of(&http, "connections");
        tokio::join!(
            conn::serve(public.0, public.1, limits(), shutdown.clone()),
            conn::serve(ops.0, ops.1, limits(), shutdown),
        );
    }
}

/// Serves public and operator routes on one bound listener (embedding and tests).
pub async fn serve_listener(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<()> {
    let l = conn::Limits::of(&state.http, "connections");
    conn::serve(listener, conn::fixed(router(state)?), l, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests;
