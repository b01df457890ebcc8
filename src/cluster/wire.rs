//! The agent API's wire protocol: what the controller and the agents say to each other
//! and how it is signed. Both sides use these types; neither owns them.
//!
//! Invariants: a request changes nothing unless it carries an HMAC-SHA256, under the key
//! from the cluster's Swarm secret, over its timestamp, nonce, method, path, the Swarm node
//! it is meant for ([`To`]) and body, so a request signed for one route or node is refused
//! on any other; the timestamp lies
//! within [`Guard`]'s skew of the receiver's clock; and its nonce was not seen before. The
//! signature is checked first (constant time), so unauthenticated requests cannot fill the
//! nonce cache; a nonce is remembered for twice the skew, after which its timestamp alone
//! refuses it, which keeps the cache bounded by the request rate. No byte of a body is read
//! unless the signature headers parse and the timestamp is fresh ([`Guard::precheck`]);
//! bodies are then bounded per route and by a byte budget shared by every request
//! ([`read_body`]), requests by [`REQUEST_TIMEOUT`]. Every 200 is signed for its request. Refusals say why in fixed words; nothing
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
/// A heartbeat or a jobs query is a few hundred bytes.
pub const SMALL_BODY: usize = 4096;
/// Bytes per second an agent request's body must keep up after the grace: far below what
/// any peer on the overlay sends, far above a body held open to keep its budget.
pub const MIN_RATE: usize = 16 * 1024;
/// Bytes of agent request bodies held at once, over all requests (one source: half).
pub const BODY_BUDGET: usize = 2 * MAX_BODY;
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

    /// The key itself, for what is sealed with it (certificates on the wire and in Swarm).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, timestamp: &str, nonce: &str, to: To<'_>, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("hmac takes keys of any length");
        // Newline-separated: none of the fields before the body can hold one (headers,
        // paths and Swarm node ids cannot).
        for part in [timestamp, nonce, "POST", to.path, to.node] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac.update(body);
        mac
    }

    /// `sha256=HEX` over timestamp, nonce, route, node and body, as the agent expects it.
    pub fn sign(&self, timestamp: &str, nonce: &str, to: To<'_>, body: &[u8]) -> String {
        let tag = self.mac(timestamp, nonce, to, body).finalize().into_bytes();
        format!("sha256={}", hex::encode(tag))
    }

    /// The signature of an answer to the request signed with `timestamp` and `nonce`: bound
    /// to that request, and apart from any request's signature (a request cannot be
    /// reflected as an answer).
    pub fn sign_answer(&self, timestamp: &str, nonce: &str, to: To<'_>, body: &[u8]) -> String {
        self.sign(timestamp, &format!("answer:{nonce}"), to, body)
    }

    /// Whether `signature` is [`Key::sign_answer`]'s for this request and answer body.
    pub fn verify_answer(
        &self,
        timestamp: &str,
        nonce: &str,
        to: To<'_>,
        body: &[u8],
        signature: &str,
    ) -> bool {
        self.verify(timestamp, &format!("answer:{nonce}"), to, body, signature)
    }

    fn verify(
        &self,
        timestamp: &str,
        nonce: &str,
        to: To<'_>,
        body: &[u8],
        signature: &str,
    ) -> bool {
        let Some(tag) = signature
            .strip_prefix("sha256=")
            .and_then(|h| hex::decode(h).ok())
        else {
            return false;
        };
        let expected = self.mac(timestamp, nonce, to, body).finalize().into_bytes();
        expected.as_slice().ct_eq(&tag).into()
    }
}

/// Where a request is meant to go: its path and the Swarm node id of the instance that
/// must carry it out (empty outside Swarm). Both are under the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct To<'a> {
    pub path: &'a str,
    pub node: &'a str,
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
    #[error("body too large")]
    TooLarge,
    #[error("body too slow")]
    TooSlow,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Unauthorized | Refusal::Stale | Refusal::Replayed => StatusCode::UNAUTHORIZED,
            Refusal::Busy | Refusal::NotController => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BadRequest | Refusal::HashMismatch => StatusCode::BAD_REQUEST,
            Refusal::UnknownTarget => StatusCode::NOT_FOUND,
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::TooSlow => StatusCode::REQUEST_TIMEOUT,
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
    pub fn check(&self, headers: &HeaderMap, to: To<'_>, body: &[u8]) -> Result<(), Refusal> {
        self.verify(headers, to, body, unix_now())
            .inspect_err(|r| count_refusal(*r))
    }

    /// What can be told before a byte of the body is read: the three headers are there and
    /// well formed (a nonce of at most 128 bytes, `sha256=` and 64 hex digits) and the
    /// timestamp is within the skew of `now`.
    pub fn precheck(&self, headers: &HeaderMap, now: i64) -> Result<(), Refusal> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(ts), Some(nonce), Some(sig)) = (
            header(TIMESTAMP_HEADER),
            header(NONCE_HEADER),
            header(SIGNATURE_HEADER),
        ) else {
            return Err(Refusal::Unauthorized);
        };
        let hex = sig.strip_prefix("sha256=").unwrap_or("");
        if nonce.is_empty()
            || nonce.len() > 128
            || hex.len() != 64
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Refusal::Unauthorized);
        }
        let ts: i64 = ts.parse().map_err(|_| Refusal::Stale)?;
        if (now - ts).abs() > self.max_skew.as_secs() as i64 {
            return Err(Refusal::Stale);
        }
        Ok(())
    }

    /// The answer to a verified request, signed for it ([`Key::sign_answer`]).
    pub fn answer(
        &self,
        request: &HeaderMap,
        to: To<'_>,
        status: StatusCode,
        body: Vec<u8>,
    ) -> Response {
        let header = |name: &str| {
            request
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let signature =
            self.key
                .sign_answer(header(TIMESTAMP_HEADER), header(NONCE_HEADER), to, &body);
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
    pub fn verify(
        &self,
        headers: &HeaderMap,
        to: To<'_>,
        body: &[u8],
        now: i64,
    ) -> Result<(), Refusal> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(ts), Some(nonce), Some(sig)) = (
            header(TIMESTAMP_HEADER),
            header(NONCE_HEADER),
            header(SIGNATURE_HEADER),
        ) else {
            return Err(Refusal::Unauthorized);
        };
        if nonce.is_empty() || nonce.len() > 128 || !self.key.verify(ts, nonce, to, body, sig) {
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
    /// Certificates drover obtained, each sealed with the cluster key
    /// ([`crate::certs::exchange::seal_pair`]): written before the apply.
    #[serde(default)]
    pub pairs: Vec<String>,
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
            pairs: Vec::new(),
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
        Refusal::TooLarge => "too_large",
        Refusal::TooSlow => "too_slow",
    }
}

/// The controller's side: posts `req` to the agent of `node` at `addr`, signed with `key`
/// for that node; its answer must be signed for the request.
pub async fn send(
    addr: SocketAddr,
    node: &str,
    key: &Key,
    req: &ApplyRequest,
) -> Result<ApplyAnswer> {
    let transport = |reason: String| Error::Transport { addr, reason };
    let body = serde_json::to_vec(req).map_err(|e| transport(e.to_string()))?;
    let to = To {
        path: APPLY_PATH,
        node,
    };
    let bytes = exchange(addr, key, to, body, REQUEST_TIMEOUT, MAX_BODY).await?;
    serde_json::from_slice(&bytes).map_err(|e| transport(format!("bad answer: {e}")))
}

/// A signed request to the agent API at `addr` and its answer (status, body), bounded by
/// `timeout` in all and `max_answer` bytes. A 200 answer must be signed for this request
/// ([`Key::sign_answer`]): what another instance relays as the controller's word (a job
/// id) cannot be forged on the way. Other statuses are refusals, returned as errors.
pub async fn call(
    addr: SocketAddr,
    key: &Key,
    to: To<'_>,
    body: Vec<u8>,
    timeout: Duration,
    max_answer: usize,
) -> Result<Bytes> {
    exchange(addr, key, to, body, timeout, max_answer).await
}

/// One signed POST and its answer; a 200 must be signed for this request.
async fn exchange(
    addr: SocketAddr,
    key: &Key,
    to: To<'_>,
    body: Vec<u8>,
    timeout: Duration,
    max_answer: usize,
) -> Result<Bytes> {
    let timestamp = unix_now().to_string();
    let nonce = new_nonce();
    let signature = key.sign(&timestamp, &nonce, to, &body);
    let path = to.path;
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
        if !answer_signature
            .is_some_and(|sig| key.verify_answer(&timestamp, &nonce, to, &bytes, &sig))
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

/// A request's body, read only once [`Guard::precheck`] passed, by the one body reader
/// ([`crate::budget::read`]): at most `limit` bytes (a declared `Content-Length` over it is
/// refused before reading), every byte taken from the agent's byte budget as it arrives
/// (beyond it: 503), at least [`MIN_RATE`] after the grace (a peer on the overlay sends
/// far faster; a held-open body is cut off). Refusals are counted.
pub async fn read_body(
    guard: &Guard,
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
    held: crate::budget::Held,
) -> Result<(Vec<u8>, crate::budget::Held), Refusal> {
    use crate::budget::Short;
    let result = async {
        guard.precheck(headers, unix_now())?;
        crate::budget::read(headers, body, limit, held, MIN_RATE)
            .await
            .map_err(|short| match short {
                Short::TooLarge => Refusal::TooLarge,
                Short::TooSlow => Refusal::TooSlow,
                Short::Read => Refusal::BadRequest,
                Short::Full(_) => Refusal::Busy,
            })
    }
    .await;
    match result {
        Ok(read) => Ok(read),
        Err(r) => {
            count_refusal(r);
            Err(r)
        }
    }
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
pub(crate) fn signed(key: &Key, ts: i64, nonce: &str, to: To<'_>, body: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    let ts = ts.to_string();
    h.insert(TIMESTAMP_HEADER, ts.parse().unwrap());
    h.insert(NONCE_HEADER, nonce.parse().unwrap());
    h.insert(
        SIGNATURE_HEADER,
        key.sign(&ts, nonce, to, body).parse().unwrap(),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: To<'static> = To {
        path: APPLY_PATH,
        node: "node-a",
    };

    #[test]
    fn a_request_signed_for_one_route_or_node_is_refused_on_another() {
        let g = guard();
        let key = Key::from_bytes(b"cluster key");
        let beat = To {
            path: HEARTBEAT_PATH,
            node: "node-a",
        };
        let h = signed(&key, 1000, "n1", beat, b"{}");
        let jobs = To {
            path: JOBS_PATH,
            node: "node-a",
        };
        assert_eq!(g.verify(&h, jobs, b"{}", 1000), Err(Refusal::Unauthorized));
        let apply_a = signed(&key, 1000, "n2", TO, b"{}");
        let node_b = To {
            path: APPLY_PATH,
            node: "node-b",
        };
        assert_eq!(
            g.verify(&apply_a, node_b, b"{}", 1000),
            Err(Refusal::Unauthorized),
            "an apply for node A replayed to node B"
        );
        assert_eq!(g.verify(&h, beat, b"{}", 1000), Ok(()));
        assert_eq!(g.verify(&apply_a, TO, b"{}", 1000), Ok(()));
    }

    #[test]
    fn the_precheck_refuses_missing_malformed_or_stale_headers_before_any_body() {
        let g = guard();
        let key = Key::from_bytes(b"cluster key");
        assert_eq!(
            g.precheck(&HeaderMap::new(), 1000),
            Err(Refusal::Unauthorized)
        );
        let good = signed(&key, 1000, "n1", TO, b"whatever");
        assert_eq!(g.precheck(&good, 1000), Ok(()));
        assert_eq!(g.precheck(&good, 1031), Err(Refusal::Stale));
        let mut short = good.clone();
        short.insert(SIGNATURE_HEADER, "sha256=abcd".parse().unwrap());
        assert_eq!(g.precheck(&short, 1000), Err(Refusal::Unauthorized));
    }

    #[tokio::test]
    async fn bodies_over_the_route_limit_or_the_budget_are_refused() {
        let g = guard();
        let key = Key::from_bytes(b"cluster key");
        let now = unix_now();
        let budget = crate::budget::Budget::new(64, 32);
        let source: std::net::IpAddr = [10, 0, 9, 9].into();
        let mut h = signed(&key, now, "n1", TO, b"");
        h.insert(
            axum::http::header::CONTENT_LENGTH,
            (8 << 20).to_string().parse().unwrap(),
        );
        // A body that fails when polled proves it was never read.
        let unread = || {
            axum::body::Body::from_stream(futures_util::stream::once(async {
                Err::<Bytes, _>(std::io::Error::other("read"))
            }))
        };
        let r = read_body(&g, &h, unread(), SMALL_BODY, budget.hold(source)).await;
        assert_eq!(r.map(|b| b.0), Err(Refusal::TooLarge));
        let r = read_body(
            &g,
            &HeaderMap::new(),
            unread(),
            SMALL_BODY,
            budget.hold(source),
        )
        .await;
        assert_eq!(
            r.map(|b| b.0),
            Err(Refusal::Unauthorized),
            "no signature headers"
        );
        let h = signed(&key, now, "n2", TO, b"");
        let big = || axum::body::Body::from(vec![b'x'; 40]);
        let r = read_body(&g, &h, big(), 1000, budget.hold(source)).await;
        assert_eq!(
            r.map(|b| b.0),
            Err(Refusal::Busy),
            "over one source's share"
        );
        let r = read_body(
            &g,
            &h,
            axum::body::Body::from("{}"),
            1000,
            budget.hold(source),
        )
        .await;
        assert_eq!(r.map(|b| b.0), Ok(b"{}".to_vec()));
        assert_eq!(budget.held(source), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_signed_body_held_open_is_cut_off_and_gives_its_bytes_back() {
        let g = guard();
        let key = Key::from_bytes(b"cluster key");
        let budget = crate::budget::Budget::new(1 << 20, 1 << 20);
        let source: std::net::IpAddr = [10, 0, 9, 8].into();
        let h = signed(&key, unix_now(), "n3", TO, b"");
        // One chunk, then nothing: the sender keeps the connection and its budget.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        tx.send(Ok(Bytes::from(vec![b'x'; 100])))
            .await
            .expect("send");
        let held_open = axum::body::Body::from_stream(futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        }));
        let r = read_body(&g, &h, held_open, MAX_BODY, budget.hold(source)).await;
        assert_eq!(r.map(|b| b.0), Err(Refusal::TooSlow));
        assert_eq!(budget.held(source), (0, 0));
        drop(tx);
    }

    fn guard() -> Guard {
        Guard::new(Key::from_bytes(b"cluster key"), Duration::from_secs(30))
    }

    #[test]
    fn a_signed_fresh_request_passes_once() {
        let g = guard();
        let h = signed(&Key::from_bytes(b"cluster key"), 1000, "n1", TO, b"body");
        assert_eq!(g.verify(&h, TO, b"body", 1005), Ok(()));
        assert_eq!(g.verify(&h, TO, b"body", 1006), Err(Refusal::Replayed));
    }

    #[test]
    fn a_wrong_key_a_changed_body_or_missing_headers_are_unauthorized() {
        let g = guard();
        let wrong = signed(&Key::from_bytes(b"other key"), 1000, "n1", TO, b"body");
        assert_eq!(
            g.verify(&wrong, TO, b"body", 1000),
            Err(Refusal::Unauthorized)
        );
        let right = signed(&Key::from_bytes(b"cluster key"), 1000, "n2", TO, b"body");
        assert_eq!(
            g.verify(&right, TO, b"bodY", 1000),
            Err(Refusal::Unauthorized)
        );
        let mut partial = right.clone();
        partial.remove(NONCE_HEADER);
        assert_eq!(
            g.verify(&partial, TO, b"body", 1000),
            Err(Refusal::Unauthorized)
        );
        let mut bad_hex = right.clone();
        bad_hex.insert(SIGNATURE_HEADER, "sha256=zz".parse().unwrap());
        assert_eq!(
            g.verify(&bad_hex, TO, b"body", 1000),
            Err(Refusal::Unauthorized)
        );
        // Refused requests leave no nonce behind: the genuine one still passes.
        assert_eq!(g.verify(&right, TO, b"body", 1000), Ok(()));
    }

    #[test]
    fn timestamps_beyond_the_skew_either_way_are_stale() {
        let g = guard();
        let key = Key::from_bytes(b"cluster key");
        assert_eq!(
            g.verify(&signed(&key, 1000, "a", TO, b""), TO, b"", 1031),
            Err(Refusal::Stale)
        );
        assert_eq!(
            g.verify(&signed(&key, 1031, "b", TO, b""), TO, b"", 1000),
            Err(Refusal::Stale)
        );
        assert_eq!(
            g.verify(&signed(&key, 1030, "c", TO, b""), TO, b"", 1000),
            Ok(())
        );
    }

    #[test]
    fn nonces_are_forgotten_only_once_their_timestamp_is_stale_anyway() {
        let g = guard();
        let key = Key::from_bytes(b"cluster key");
        let h = signed(&key, 1000, "n", TO, b"");
        assert_eq!(g.verify(&h, TO, b"", 1000), Ok(()));
        assert_eq!(g.verify(&h, TO, b"", 1030), Err(Refusal::Replayed));
        assert_eq!(g.verify(&h, TO, b"", 1031), Err(Refusal::Stale));
        // Other requests prune it; the cache does not grow with time.
        assert_eq!(
            g.verify(&signed(&key, 1100, "m", TO, b""), TO, b"", 1100),
            Ok(())
        );
        assert_eq!(g.nonces.lock().unwrap().seen.len(), 1);
    }

    #[test]
    fn the_key_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "secret\n").unwrap();
        let key = Key::load(&path).unwrap();
        assert_eq!(
            key.sign("1", "n", TO, b"x"),
            Key::from_bytes(b"secret").sign("1", "n", TO, b"x")
        );
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(Key::load(&path), Err(Error::EmptyKey(_))));
    }

    #[test]
    fn an_answer_is_signed_for_its_request_only_and_is_no_request_signature() {
        let key = Key::from_bytes(b"cluster key");
        let sig = key.sign_answer("1000", "n1", TO, b"{}");
        assert!(key.verify_answer("1000", "n1", TO, b"{}", &sig));
        assert!(!key.verify_answer("1000", "n2", TO, b"{}", &sig));
        assert!(!key.verify_answer("1000", "n1", TO, b"{ }", &sig));
        assert!(!Key::from_bytes(b"other").verify_answer("1000", "n1", TO, b"{}", &sig));
        // A request's own signature does not pass as its answer's (no reflection).
        assert!(!key.verify_answer("1000", "n1", TO, b"{}", &key.sign("1000", "n1", TO, b"{}")));
        let g = guard();
        assert_eq!(
            g.verify(&signed(&key, 1000, "n1", TO, b"{}"), TO, b"{}", 1000),
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
