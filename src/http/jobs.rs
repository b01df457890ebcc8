//! `GET /jobs` and `GET /jobs/{id}`: what webhooks asked for and how it ended.
//!
//! Operator endpoints: served on the private listener only. Job views carry bounded,
//! secret-free messages (see `jobs`), never request text.

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::Error;
use super::ops::OpsState;
use crate::jobs::JobId;

pub fn router() -> Router<OpsState> {
    Router::new()
        .route("/jobs", get(list))
        .route("/jobs/{id}", get(one))
}

async fn list(State(state): State<OpsState>) -> Response {
    let jobs = state.jobs.as_ref().map(|j| j.list()).unwrap_or_default();
    axum::Json(json!({ "jobs": jobs })).into_response()
}

async fn one(State(state): State<OpsState>, Path(id): Path<String>) -> Result<Response, Error> {
    let jobs = state.jobs.as_ref().ok_or(Error::NotReady)?;
    let job = JobId::is_valid(&id)
        .then(|| jobs.get(&id))
        .flatten()
        .ok_or(Error::NoSuchJob)?;
    Ok(axum::Json(job).into_response())
}
