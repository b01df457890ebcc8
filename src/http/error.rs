//! The one error type of the HTTP surface and how it becomes an answer.
//!
//! Invariant: an answer carries a fixed message (JSON `{"error": ...}`) chosen by kind,
//! never request text; for 5xx the details go to the log and the client gets the status
//! line's reason only.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tracing::error;

use crate::hooks::Reject;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the operator token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the operator token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error(transparent)]
    Rejected(#[from] Reject),
    #[error("no such job")]
    NoSuchJob,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("too many requests in flight")]
    Busy,
    #[error("not ready")]
    NotReady,
    #[error("no controller reachable from this node: try again shortly")]
    NoController,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A controller is elected and heard of within seconds (heartbeats are 3 s apart).
const RETRY_AFTER_SECS: &str = "5";

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Bind { .. } | Error::Token { .. } | Error::EmptyToken(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Error::Rejected(r) => match r {
                Reject::UnknownHook => StatusCode::NOT_FOUND,
                Reject::Forbidden => StatusCode::FORBIDDEN,
                Reject::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                Reject::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                Reject::BodyRead | Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
                Reject::TooSlow => StatusCode::REQUEST_TIMEOUT,
                Reject::Unauthorized | Reject::Stale => StatusCode::UNAUTHORIZED,
                Reject::RuleMismatch(_) | Reject::NoImage => StatusCode::UNPROCESSABLE_ENTITY,
                Reject::QueueFull
                | Reject::Journal
                | Reject::Busy
                | Reject::Worker
                | Reject::NoController => StatusCode::SERVICE_UNAVAILABLE,
                Reject::OutcomeUnknown => StatusCode::GATEWAY_TIMEOUT,
            },
            Error::NoSuchJob => StatusCode::NOT_FOUND,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Busy | Error::NotReady | Error::NoController => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error's answer body, serialised straight from the borrowed message (no
/// `serde_json::Value` built for it on every refused webhook).
#[derive(serde::Serialize)]
struct Message<'a> {
    error: &'a str,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        // A worker's 503 is an answer to the caller (where to send webhooks), not a
        // failure detail.
        // No controller right now is an answer too: when to try again. Its cause (which
        // address did not answer) is logged where the forward failed.
        let no_controller = matches!(
            self,
            Error::NoController | Error::Rejected(Reject::NoController)
        );
        let message = if status.is_server_error()
            && !no_controller
            && !matches!(self, Error::Rejected(Reject::OutcomeUnknown))
            && !matches!(self, Error::Rejected(Reject::Worker))
        {
            error!(error = %self, status = status.as_u16(), "request failed");
            status.canonical_reason().unwrap_or("error").to_lowercase()
        } else {
            self.to_string()
        };
        let mut res = (status, axum::Json(Message { error: &message })).into_response();
        if no_controller {
            res.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if matches!(self, Error::Unauthorized) {
            res.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_answer_the_reason_phrase_and_client_errors_the_message() {
        let res = Error::Rejected(Reject::Journal).into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let res = Error::Rejected(Reject::RuleMismatch("tag".into()));
        assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(res.to_string(), "payload does not match the rule on tag");
    }
}
