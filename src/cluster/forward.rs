//! Webhooks and job reads on any instance, carried out by the controller.
//!
//! A webhook that lands on an instance that is not the controller is verified there (a
//! forged one goes no further), then handed to the controller over the agent API as an
//! [`Envelope`]: the hook, the original body, the headers verification and intake read,
//! and the source address. The controller runs its normal intake on it and answers with a
//! [`Relay`] — status, the headers that matter and the body — which the landing instance
//! answers with unchanged, so a sender sees the same answer and job id wherever it sent.
//! `/jobs` reads go the same way ([`JobsQuery`]).
//!
//! Invariants: everything the controller acts on is inside the signed body (the agent
//! signature covers the body only, so no header or path is trusted on its own); the
//! answer is signed for its request ([`super::wire::call`]); bodies are bounded (the
//! hook's `max_body` in, [`MAX_ANSWER`] out) and so is time (the caller's request timeout).
//! No controller known, or none reachable, is an error the caller turns into 503.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::wire::{self, Key};

/// The headers a hook's verification and intake read; nothing else is forwarded.
pub const FORWARDED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    crate::hooks::TOKEN_HEADER,
    crate::hooks::SIGNATURE_HEADER,
    crate::hooks::TIMESTAMP_HEADER,
    crate::hooks::GITHUB_SIGNATURE_HEADER,
    crate::hooks::GITHUB_SHA1_HEADER,
    crate::hooks::GITHUB_EVENT_HEADER,
    crate::hooks::GITHUB_DELIVERY_HEADER,
];
/// The answer headers a sender may read; relayed as they are.
const RELAYED_HEADERS: &[&str] = &["location", "retry-after", "content-type"];
/// An intake answer or a job list (bounded by `jobs.history`) fits in this.
pub const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// A verified webhook, as the landing instance hands it to the controller.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    pub hook: String,
    /// Where the request came from (the controller's per-source limits and networks).
    pub source: IpAddr,
    /// Lower-case names from [`FORWARDED_HEADERS`], as the sender sent them.
    pub headers: Vec<(String, String)>,
    /// The `token` query parameter (Docker Hub cannot send headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_token: Option<String>,
    /// The body, base64 (any bytes).
    pub body: String,
}

impl Envelope {
    pub fn new(
        hook: &str,
        source: IpAddr,
        headers: &HeaderMap,
        query_token: Option<String>,
        body: &[u8],
    ) -> Envelope {
        Envelope {
            hook: hook.to_owned(),
            source,
            headers: FORWARDED_HEADERS
                .iter()
                .filter_map(|n| {
                    let v = headers.get(*n)?.to_str().ok()?;
                    Some(((*n).to_owned(), v.to_owned()))
                })
                .collect(),
            query_token,
            body: base64::engine::general_purpose::STANDARD.encode(body),
        }
    }

    /// The headers as a map again (unknown names and bad values are dropped).
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            if !FORWARDED_HEADERS.contains(&name.as_str()) {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                map.insert(n, v);
            }
        }
        map
    }

    pub fn body(&self) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.body)
            .ok()
    }
}

/// What the controller answered, to be answered unchanged by the landing instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Relay {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The answer's body (JSON, so text).
    pub body: String,
}

impl Relay {
    /// Reads an answer of drover's own HTTP surface, its body bounded by [`MAX_ANSWER`].
    pub async fn of(response: Response) -> Relay {
        let (parts, body) = response.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_ANSWER).await else {
            // Never a silent empty 200: the caller learns the answer was too large.
            return Relay {
                status: StatusCode::BAD_GATEWAY.as_u16(),
                headers: Vec::new(),
                body: format!(
                    r#"{{"error":"the controller's answer is larger than {MAX_ANSWER} bytes"}}"#
                ),
            };
        };
        Relay {
            status: parts.status.as_u16(),
            headers: RELAYED_HEADERS
                .iter()
                .filter_map(|n| {
                    let v = parts.headers.get(*n)?.to_str().ok()?;
                    Some(((*n).to_owned(), v.to_owned()))
                })
                .collect(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

impl IntoResponse for Relay {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut res = (status, self.body).into_response();
        for (name, value) in &self.headers {
            if !RELAYED_HEADERS.contains(&name.as_str()) {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                res.headers_mut().insert(n, v);
            }
        }
        res
    }
}

/// A read of the controller's jobs: one job, or the list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Why nothing could be forwarded (the caller answers 503 with `Retry-After`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no controller known yet")]
    NoController,
    #[error(transparent)]
    Agent(#[from] wire::Error),
    #[error("the controller's answer cannot be read: {0}")]
    Answer(String),
}

/// What an instance needs to hand requests to the controller.
pub struct Forwarder {
    key: Key,
    role: tokio::sync::watch::Receiver<crate::role::Role>,
    contacts: std::sync::Arc<super::contacts::Contacts>,
    timeout: Duration,
}

impl Forwarder {
    /// `timeout` bounds one forwarded request in all (the caller's own request timeout
    /// less a margin, so the caller answers 503 rather than being cut off with 408).
    pub fn new(
        key: Key,
        role: tokio::sync::watch::Receiver<crate::role::Role>,
        contacts: std::sync::Arc<super::contacts::Contacts>,
        timeout: Duration,
    ) -> Forwarder {
        Forwarder {
            key,
            role,
            contacts,
            timeout,
        }
    }

    /// Whether requests go to the controller now: this instance is not it.
    pub fn active(&self) -> bool {
        !self.role.borrow().is_controller()
    }

    pub fn role(&self) -> crate::role::Role {
        *self.role.borrow()
    }

    pub async fn send<T: Serialize>(&self, path: &str, message: &T) -> Result<Relay, Error> {
        to_controller(
            self.contacts.controller_at(),
            &self.key,
            path,
            message,
            self.timeout,
        )
        .await
    }
}

/// Posts `message` to the controller's agent API at `path` and returns its relayed answer.
pub async fn to_controller<T: Serialize>(
    controller: Option<(SocketAddr, String)>,
    key: &Key,
    path: &str,
    message: &T,
    timeout: Duration,
) -> Result<Relay, Error> {
    let (addr, node) = controller.ok_or(Error::NoController)?;
    let body = serde_json::to_vec(message).map_err(|e| Error::Answer(e.to_string()))?;
    let to = wire::To { path, node: &node };
    let answer = wire::call(addr, key, to, body, timeout, MAX_ANSWER).await?;
    serde_json::from_slice(&answer).map_err(|e| Error::Answer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_carries_only_what_verification_reads_and_the_body_intact() {
        let mut h = HeaderMap::new();
        h.insert("x-drover-signature", "sha256=ab".parse().unwrap());
        h.insert("x-drover-timestamp", "1000".parse().unwrap());
        h.insert("cookie", "secret=1".parse().unwrap());
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        let body = b"\x00{\"image\":\"a\"}\xff";
        let e = Envelope::new(
            "ci",
            "10.0.0.9".parse().unwrap(),
            &h,
            Some("t".into()),
            body,
        );
        let wire: Envelope = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(wire, e);
        assert_eq!(wire.body().unwrap(), body);
        let back = wire.header_map();
        assert_eq!(back.len(), 2);
        assert_eq!(back["x-drover-signature"], "sha256=ab");
        assert!(back.get("cookie").is_none());
        // A name outside the list does not come back, even when the sender put it there.
        let mut odd = wire;
        odd.headers.push(("host".into(), "evil".into()));
        assert!(odd.header_map().get("host").is_none());
    }

    #[tokio::test]
    async fn a_relayed_answer_is_the_controllers_status_headers_and_body() {
        let original = (
            StatusCode::ACCEPTED,
            [
                ("location", "/jobs/j-1"),
                ("content-type", "application/json"),
                ("set-cookie", "x=1"),
            ],
            r#"{"job":"j-1","coalesced":false}"#,
        )
            .into_response();
        let relay = Relay::of(original).await;
        let wire: Relay = serde_json::from_slice(&serde_json::to_vec(&relay).unwrap()).unwrap();
        let res = wire.into_response();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(res.headers()["location"], "/jobs/j-1");
        assert_eq!(res.headers()["content-type"], "application/json");
        assert!(res.headers().get("set-cookie").is_none());
        let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], br#"{"job":"j-1","coalesced":false}"#);
    }

    #[tokio::test]
    async fn without_a_controller_nothing_is_sent() {
        let r = to_controller(
            None,
            &Key::from_bytes(b"k"),
            wire::HOOKS_PATH,
            &JobsQuery { id: None },
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(r, Err(Error::NoController)));
    }
}
