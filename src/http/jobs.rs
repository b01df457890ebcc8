//! `GET /jobs` and `GET /jobs/{id}`: what webhooks asked for and how it ended.
//!
//! Operator endpoints: served on the private listener only. Job views carry bounded,
//! secret-free messages (see `jobs`), never request text. In cluster mode an instance
//! that is not the controller shows the controller's jobs (read over the agent API,
//! `cluster::forward`), so a job id answered by a forwarded webhook is found where the
//! webhook landed; no controller reachable is 503 with `Retry-After`.

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use tracing::warn;

use super::Error;
use super::state::OpsState;
use crate::cluster::forward::{Forwarder, JobsQuery};
use crate::jobs::JobId;

pub fn router() -> Router<OpsState> {
    Router::new()
        .route("/jobs", get(list))
        .route("/jobs/{id}", get(one))
        .route("/stacks/{name}/sync", post(sync_stack))
}

/// `POST /stacks/{name}/sync`: deploy one stack at its branch head now (202 and the job;
/// a stack already at its head ends `skipped`). Only the controller runs jobs.
async fn sync_stack(State(state): State<OpsState>, Path(name): Path<String>) -> Response {
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Error::NoSuchJob.into_response();
    }
    let Some(jobs) = &state.jobs else {
        return Error::NotReady.into_response();
    };
    let request = crate::jobs::Request {
        hook: crate::stacks::SYNC_HOOK.to_owned(),
        work: crate::jobs::Work::SyncStack { stack: name },
        facts: crate::jobs::Facts {
            hook: crate::stacks::SYNC_HOOK.to_owned(),
            ..Default::default()
        },
        quiet: std::time::Duration::ZERO,
    };
    match jobs.submit(request).await {
        Ok(s) => (
            axum::http::StatusCode::ACCEPTED,
            axum::Json(json!({ "job": s.id })),
        )
            .into_response(),
        Err(e) => {
            warn!(error = %e, "cannot queue a stack sync");
            Error::NotReady.into_response()
        }
    }
}

async fn list(State(state): State<OpsState>) -> Response {
    match state.forward.as_ref().filter(|f| f.active()) {
        Some(f) => from_controller(f, JobsQuery { id: None }).await,
        None => list_here(&state),
    }
}

async fn one(State(state): State<OpsState>, Path(id): Path<String>) -> Response {
    match state.forward.as_ref().filter(|f| f.active()) {
        // The id's shape is checked before anything is sent.
        Some(f) if JobId::is_valid(&id) => from_controller(f, JobsQuery { id: Some(id) }).await,
        Some(_) => Error::NoSuchJob.into_response(),
        None => one_here(&state, &id).into_response(),
    }
}

async fn from_controller(forward: &Forwarder, query: JobsQuery) -> Response {
    match forward.send(crate::cluster::wire::JOBS_PATH, &query).await {
        Ok(relay) => relay.into_response(),
        Err(e) => {
            warn!(error = %e, "cannot read the controller's jobs");
            Error::NoController.into_response()
        }
    }
}

/// This instance's own job list.
pub fn list_here(state: &OpsState) -> Response {
    let jobs = state.jobs.as_ref().map(|j| j.list()).unwrap_or_default();
    axum::Json(json!({ "jobs": jobs })).into_response()
}

/// One of this instance's own jobs.
pub fn one_here(state: &OpsState, id: &str) -> Result<Response, Error> {
    let jobs = state.jobs.as_ref().ok_or(Error::NotReady)?;
    let job = JobId::is_valid(id)
        .then(|| jobs.get(id))
        .flatten()
        .ok_or(Error::NoSuchJob)?;
    Ok(axum::Json(job).into_response())
}
