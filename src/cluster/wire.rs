//! The agent API's wire protocol: what the controller and the agents say to each other
//! and how it is signed. Both sides use these types; neither owns them.
//!
//! Invariants: a request changes nothing unless it carries an HMAC-SHA256, under the key
//! from the cluster's Swarm secret, over its timestamp, nonce and body; the timestamp lies
//! within [`Guard`]'s skew of the receiver's clock; and its nonce was not seen before. The
//! signature is checked first (constant time), so unauthenticated requests cannot fill the
//! nonce cache; a nonce is remembered for twice the skew, after which its timestamp alone
//! refuses it, which keeps the cache bounded by the request rate. Bodies are bounded by
//! [`MAX_BODY`], requests by [`REQUEST_TIMEOUT`]. Refusals say why in fixed words; nothing
//! from the request is echoed. Outcomes travel as typed enums, never as strings.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tracing::warn;

use crate::apply::Report;
use crate::clock::unix_secs as unix_now;
use crate::hash::sha256_hex;

/// Where the controller posts a file.
pub const APPLY_PATH: &str = "/agent/v1/apply";
/// Where the controller says it is there (`contacts`).
pub const HEARTBEAT_PATH: &str = "/agent/v1/heartbeat";
/// Where another instance hands a verified webhook to the controller (`forward`).
pub const HOOKS_PATH: &str = "/agent/v1/hooks";
/// Where another instance reads the controller's jobs (`forward`).
pub const JOBS_PATH: &str = "/agent/v1/jobs";
/// A heartbeat's answer is a few bytes; anything longer is not one.
pub const HEARTBEAT_ANSWER_MAX: usize = 4096;
pub const TIMESTAMP_HEADER: &str = "x-drover-timestamp";
pub const NONCE_HEADER: &str = "x-drover-nonce";
pub const SIGNATURE_HEADER: &str = "x-drover-agent-signature";
/// Rendered configs are kilobytes; a few MiB leaves room for very large clusters.
pub const MAX_BODY: usize = 8 * 1024 * 1024;
/// A check and each notify step may take 30 s (`apply`); leave room for both.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// A peer whose overlay path is not up yet drops SYNs; the kernel would retry for minutes
/// while the controller's pass waits. Unreachable now means retried on the next pass.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Nonces remembered at most; beyond this (a flood of signed requests) the agent answers 503
/// rather than forget a nonce whose timestamp is still valid.
const NONCE_CAP: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the cluster key {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cluster key {0} is empty")]
    EmptyKey(PathBuf),
    #[error("agent {addr}: {reason}")]
    Transport { addr: SocketAddr, reason: String },
    #[error("agent {addr} answered {status}: {message}")]
    Status {
        addr: SocketAddr,
        status: u16,
        message: String,
    },
    #[error("agent {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The shared secret of the cluster (a Swarm secret mounted in every instance).
#[derive(Clone)]
pub struct Key(Arc<[u8]>);

impl Key {
    /// Reads the key file; surrounding whitespace is not part of the key (`echo` adds a newline).
    pub fn load(path: &Path) -> Result<Key> {
        let raw = std::fs::read(path).map_err(|source| Error::Key {
            path: path.to_owned(),
            source,
        })?;
        let key = raw.trim_ascii();
        if key.is_empty() {
            return Err(Error::EmptyKey(path.to_owned()));
        }
        Ok(Key(key.into()))
    }

    pub fn from_bytes(key: &[u8]) -> Key {
        Key(key.into())
    }

    fn mac(&self, timestamp: &str, nonce: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("hmac takes keys of any length");
        mac.update(timestamp.as_bytes());
        mac.update(b"\n");
        mac.update(nonce.as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    /// `sha256=HEX` over timestamp, nonce and body, as the agent expects it.
    pub fn sign(&self, timestamp: &str, nonce: &str, body: &[u8]) -> String {
        let tag = self.mac(timestamp, nonce, body).finalize().into_bytes();
        format!("sha256={}", hex::encode(tag))
    }

    /// The signature of an answer to the request signed with `timestamp` and `nonce`: bound
    /// to that request, and apart from any request's signature (a request cannot be
    /// reflected as an answer).
    pub fn sign_answer(&self, timestamp: &str, nonce: &str, body: &[u8]) -> String {
        self.sign(timestamp, &format!("answer:{nonce}"), body)
    }

    /// Whether `signature` is [`Key::sign_answer`]'s for this request and answer body.
    pub fn verify_answer(
        &self,
        timestamp: &str,
        nonce: &str,
        body: &[u8],
        signature: &str,
    ) -> bool {
        self.verify(timestamp, &format!("answer:{nonce}"), body, signature)
    }

    fn verify(&self, timestamp: &str, nonce: &str, body: &[u8], signature: &str) -> bool {
        let Some(tag) = signature
            .strip_prefix("sha256=")
            .and_then(|h| hex::decode(h).ok())
        else {
            return false;
        };
        let expected = self.mac(timestamp, nonce, body).finalize().into_bytes();
        expected.as_slice().ct_eq(&tag).into()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Why a request was refused (fixed words, counted and logged; never request data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing or wrong signature")]
    Unauthorized,
    #[error("timestamp outside the allowed clock skew")]
    Stale,
    #[error("nonce already used")]
    Replayed,
    #[error("too many requests in the replay window")]
    Busy,
    #[error("bad request")]
    BadRequest,
    #[error("content does not match its hash")]
    HashMismatch,
    #[error("unknown target")]
    UnknownTarget,
    #[error("this instance is not the controller")]
    NotController,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Unauthorized | Refusal::Stale | Refusal::Replayed => StatusCode::UNAUTHORIZED,
            Refusal::Busy | Refusal::NotController => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BadRequest | Refusal::HashMismatch => StatusCode::BAD_REQUEST,
            Refusal::UnknownTarget => StatusCode::NOT_FOUND,
        }
    }
}

/// Nonces seen within the replay window, oldest first.
#[derive(Default)]
struct Nonces {
    seen: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl Nonces {
    /// Records `nonce` (good until `expires`); false if it is already known.
    fn insert(&mut self, nonce: &str, now: i64, expires: i64) -> Result<(), Refusal> {
        while let Some((exp, _)) = self.order.front() {
            if *exp > now {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains_key(nonce) {
            return Err(Refusal::Replayed);
        }
        if self.seen.len() >= NONCE_CAP {
            return Err(Refusal::Busy);
        }
        self.seen.insert(nonce.to_owned(), expires);
        self.order.push_back((expires, nonce.to_owned()));
        Ok(())
    }
}

/// Authenticates agent requests: signature, clock skew, nonce.
pub struct Guard {
    key: Key,
    max_skew: Duration,
    nonces: Mutex<Nonces>,
}

impl Guard {
    pub fn new(key: Key, max_skew: Duration) -> Guard {
        Guard {
            key,
            max_skew,
            nonces: Mutex::default(),
        }
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    /// [`Guard::verify`] now, counting and logging a refusal.
    pub fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Refusal> {
        self.verify(headers, body, unix_now())
            .inspect_err(|r| count_refusal(*r))
    }

    /// The answer to a verified request, signed for it ([`Key::sign_answer`]).
    pub fn answer(&self, request: &HeaderMap, status: StatusCode, body: Vec<u8>) -> Response {
        let header = |name: &str| {
            request
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let signature = self
            .key
            .sign_answer(header(TIMESTAMP_HEADER), header(NONCE_HEADER), &body);
        (
            status,
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "application/json".to_owned(),
                ),
                (
                    axum::http::HeaderName::from_static(SIGNATURE_HEADER),
                    signature,
                ),
            ],
            body,
        )
            .into_response()
    }

    /// Checks a request's headers and body at `now` (unix seconds).
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), Refusal> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(ts), Some(nonce), Some(sig)) = (
            header(TIMESTAMP_HEADER),
            header(NONCE_HEADER),
            header(SIGNATURE_HEADER),
        ) else {
            return Err(Refusal::Unauthorized);
        };
        if nonce.is_empty() || nonce.len() > 128 || !self.key.verify(ts, nonce, body, sig) {
            return Err(Refusal::Unauthorized);
        }
        let ts: i64 = ts.parse().map_err(|_| Refusal::Stale)?;
        let skew = self.max_skew.as_secs() as i64;
        if (now - ts).abs() > skew {
            return Err(Refusal::Stale);
        }
        // Past ts + skew the timestamp alone refuses a replay: forget the nonce then.
        self.nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(nonce, now, ts + skew + 1)
    }
}

/// What the controller sends: one target's full file, rendered for the certificate files
/// it last heard the node has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyRequest {
    pub target: String,
    /// The file, base64 (configs may hold any bytes).
    pub content: String,
    /// SHA-256 hex of the decoded content.
    pub hash: String,
    /// The TLS hosts of the content.
    #[serde(default)]
    pub tls: Vec<String>,
    /// Those of `tls` rendered with their certificate.
    #[serde(default)]
    pub with_certificates: BTreeSet<String>,
    /// Look again at left-out hosts and missing certificate files (the controller's resync).
    #[serde(default)]
    pub resync: bool,
}

impl ApplyRequest {
    pub fn new(target: &str, content: &[u8]) -> ApplyRequest {
        ApplyRequest {
            target: target.to_owned(),
            content: base64::engine::general_purpose::STANDARD.encode(content),
            hash: sha256_hex(content),
            tls: Vec::new(),
            with_certificates: BTreeSet::new(),
            resync: false,
        }
    }
}

/// What the agent answers: its node and what the one executor did there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyAnswer {
    /// Swarm node id of the agent's engine (empty outside Swarm).
    pub node: String,
    pub target: String,
    pub result: Applied,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// The apply ran; what it did.
    Report(Report),
    /// The file could not be written.
    Error(String),
}

/// A refusal's answer: its status and fixed words.
pub fn refused(refusal: Refusal) -> Response {
    (
        refusal.status(),
        axum::Json(serde_json::json!({ "error": refusal.to_string() })),
    )
        .into_response()
}

pub fn count_refusal(refusal: Refusal) {
    warn!(reason = %refusal, "agent request refused");
    crate::metrics::get()
        .agent_refused
        .with_label_values(&[refusal_label(refusal)])
        .inc();
}

fn refusal_label(r: Refusal) -> &'static str {
    match r {
        Refusal::Unauthorized => "unauthorized",
        Refusal::Stale => "stale",
        Refusal::Replayed => "replayed",
        Refusal::Busy => "busy",
        Refusal::BadRequest => "bad_request",
        Refusal::HashMismatch => "hash_mismatch",
        Refusal::UnknownTarget => "unknown_target",
        Refusal::NotController => "not_controller",
    }
}

/// The controller's side: posts `req` to the agent at `addr`, signed with `key`.
pub async fn send(addr: SocketAddr, key: &Key, req: &ApplyRequest) -> Result<ApplyAnswer> {
    let transport = |reason: String| Error::Transport { addr, reason };
    let body = serde_json::to_vec(req).map_err(|e| transport(e.to_string()))?;
    let bytes = exchange(
        addr,
        key,
        APPLY_PATH,
        body,
        REQUEST_TIMEOUT,
        MAX_BODY,
        false,
    )
    .await?;
    serde_json::from_slice(&bytes).map_err(|e| transport(format!("bad answer: {e}")))
}

/// A signed request to the agent API at `addr` and its answer (status, body), bounded by
/// `timeout` in all and `max_answer` bytes. A 200 answer must be signed for this request
/// ([`Key::sign_answer`]): what another instance relays as the controller's word (a job
/// id) cannot be forged on the way. Other statuses are refusals, returned as errors.
pub async fn call(
    addr: SocketAddr,
    key: &Key,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
    max_answer: usize,
) -> Result<Bytes> {
    exchange(addr, key, path, body, timeout, max_answer, true).await
}

/// One signed POST and its answer; `signed_answer`: a 200 must be signed for this request.
async fn exchange(
    addr: SocketAddr,
    key: &Key,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
    max_answer: usize,
    signed_answer: bool,
) -> Result<Bytes> {
    let timestamp = unix_now().to_string();
    let nonce = new_nonce();
    let signature = key.sign(&timestamp, &nonce, &body);
    let transport = |reason: String| Error::Transport { addr, reason };
    let exchange = async {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| transport(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| transport(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = hyper::Request::post(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .header(TIMESTAMP_HEADER, &timestamp)
            .header(NONCE_HEADER, &nonce)
            .header(SIGNATURE_HEADER, &signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| transport(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = response.status();
        let answer_signature = response
            .headers()
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = http_body_util::Limited::new(response.into_body(), max_answer)
            .collect()
            .await
            .map_err(|e| transport(format!("answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
            return Err(Error::Status {
                addr,
                status: status.as_u16(),
                message,
            });
        }
        if signed_answer
            && !answer_signature
                .is_some_and(|sig| key.verify_answer(&timestamp, &nonce, &bytes, &sig))
        {
            return Err(transport(
                "the answer is not signed for this request".into(),
            ));
        }
        Ok(bytes)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::Timeout { addr, timeout })?
}

/// 128 random bits, hex: from the OS, through the standard library's hasher seeds, so no
/// extra dependency; uniqueness (not secrecy) is what matters for a nonce.
fn new_nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(32);
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(crate::clock::unix_nanos());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// Request headers signed with `key` at `ts`, as [`call`] sends them.
#[cfg(test)]
pub(crate) fn signed(key: &Key, ts: i64, nonce: &str, body: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    let ts = ts.to_string();
    h.insert(TIMESTAMP_HEADER, ts.parse().unwrap());
    h.insert(NONCE_HEADER, nonce.parse().unwrap());
    h.insert(
        SIGNATURE_HEADER,
        key.sign(&ts, nonce, body).parse().unwrap(),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(Key::from_bytes(b"cluster key"), Duration::from_secs(30))
    }

    #[test]
    fn a_signed_fresh_request_passes_once() {
        let g = guard();
        let h = signed(&Key::from_bytes(b"cluster key"), 1000, "n1", b"body");
        assert_eq!(g.verify(&h, b"body", 1005), Ok(()));
        assert_eq!(g.verify(&h, b"body", 1006), Err(Refusal::Replayed));
    }

    #[test]
    fn a_wrong_key_a_changed_body_or_missing_headers_are_unauthorized() {
        let g = guard();
        let wrong = signed(&Key::from_bytes(b"other key"), 1000, "n1", b"body");
        assert_eq!(g.verify(&wrong, b"body", 1000), Err(Refusal::Unauthorized));
        let right = signed(&Key::from_bytes(b"cluster key"), 1000, "n2", b"body");
        assert_eq!(g.verify(&right, b"bodY", 1000), Err(Refusal::Unauthorized));
        let mut partial = right.clone();
        partial.remove(NONCE_HEADER);
        assert_eq!(
            g.verify(&partial, b"body", 1000),
            Err(Refusal::Unauthorized)
        );
        let mut bad_hex = right.clone();
        bad_hex.insert(SIGNATURE_HEADER, "sha256=zz".parse().unwrap());
        assert_eq!(
            g.verify(&bad_hex, b"body", 1000),
            Err(Refusal::Unauthorized)
        );
        // Refused requests leave no nonce behind: the genuine one still passes.
        assert_eq!(g.verify(&right, b"body", 1000), Ok(()));
    }

    #[test]
    fn timestamps_beyond_the_skew_either_way_are_stale() {
        let g = guard();
        let key = Key::from_bytes(b"cluster key");
        assert_eq!(
            g.verify(&signed(&key, 1000, "a", b""), b"", 1031),
            Err(Refusal::Stale)
        );
        assert_eq!(
            g.verify(&signed(&key, 1031, "b", b""), b"", 1000),
            Err(Refusal::Stale)
        );
        assert_eq!(g.verify(&signed(&key, 1030, "c", b""), b"", 1000), Ok(()));
    }

    #[test]
    fn nonces_are_forgotten_only_once_their_timestamp_is_stale_anyway() {
        let g = guard();
        let key = Key::from_bytes(b"cluster key");
        let h = signed(&key, 1000, "n", b"");
        assert_eq!(g.verify(&h, b"", 1000), Ok(()));
        assert_eq!(g.verify(&h, b"", 1030), Err(Refusal::Replayed));
        assert_eq!(g.verify(&h, b"", 1031), Err(Refusal::Stale));
        // Other requests prune it; the cache does not grow with time.
        assert_eq!(g.verify(&signed(&key, 1100, "m", b""), b"", 1100), Ok(()));
        assert_eq!(g.nonces.lock().unwrap().seen.len(), 1);
    }

    #[test]
    fn the_key_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "secret\n").unwrap();
        let key = Key::load(&path).unwrap();
        assert_eq!(
            key.sign("1", "n", b"x"),
            Key::from_bytes(b"secret").sign("1", "n", b"x")
        );
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(Key::load(&path), Err(Error::EmptyKey(_))));
    }

    #[test]
    fn an_answer_is_signed_for_its_request_only_and_is_no_request_signature() {
        let key = Key::from_bytes(b"cluster key");
        let sig = key.sign_answer("1000", "n1", b"{}");
        assert!(key.verify_answer("1000", "n1", b"{}", &sig));
        assert!(!key.verify_answer("1000", "n2", b"{}", &sig));
        assert!(!key.verify_answer("1000", "n1", b"{ }", &sig));
        assert!(!Key::from_bytes(b"other").verify_answer("1000", "n1", b"{}", &sig));
        // A request's own signature does not pass as its answer's (no reflection).
        assert!(!key.verify_answer("1000", "n1", b"{}", &key.sign("1000", "n1", b"{}")));
        let g = guard();
        assert_eq!(
            g.verify(&signed(&key, 1000, "n1", b"{}"), b"{}", 1000),
            Ok(())
        );
    }

    #[test]
    fn nonces_differ_between_calls() {
        let a = new_nonce();
        let b = new_nonce();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
