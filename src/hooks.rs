//! Webhook intake: turns a hostile HTTP request into a verified job request, or refuses it.
//!
//! Invariants: the order of checks is fixed — known hook, source network, rate, body size,
//! then the signature or token, and only then the payload is parsed; nothing of a refused
//! request reaches the job queue or the Docker API. Secrets are read once at start and
//! compared in constant time (tokens through their SHA-256, so length does not leak).
//! Rules are full-match regexes on payload facts; request data is only ever compared,
//! stored as plain strings or passed as environment variables, never rendered as a
//! template and never echoed in an answer. A GitHub delivery id is remembered for
//! [`REPLAY_TTL`]; a repeat is answered 200 `{"duplicate": true}` without a job, so
//! GitHub's redelivery of an already accepted event is harmless. Every request is counted
//! in `webhook_requests{hook,outcome}` with a fixed outcome vocabulary.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{self, HookAction, HookKind};
use crate::jobs::{self, Facts, Jobs, Journal, Request, Runner, Submitted, Work};
use crate::metrics;
use crate::update::{self, ImageRef};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hook {hook}: cannot read {path}: {source}")]
    Secret {
        hook: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hook {hook}: the secret file {path} is empty")]
    EmptySecret {
        hook: String,
        path: std::path::PathBuf,
    },
    #[error(transparent)]
    Update(#[from] update::Error),
    #[error(transparent)]
    Jobs(#[from] jobs::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long a GitHub delivery id is remembered.
pub const REPLAY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Delivery ids remembered per hook; the oldest is forgotten first beyond this.
const REPLAY_CAP: usize = 10_000;

pub const TOKEN_HEADER: &str = "x-drover-token";
pub const SIGNATURE_HEADER: &str = "x-drover-signature";
pub const GITHUB_SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const GITHUB_EVENT_HEADER: &str = "x-github-event";
pub const GITHUB_DELIVERY_HEADER: &str = "x-github-delivery";

/// Why a request was refused. Messages are fixed strings: nothing from the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("unknown hook")]
    UnknownHook,
    #[error("source address not allowed")]
    Forbidden,
    #[error("rate limit exceeded")]
    RateLimited,
    #[error("body too large")]
    TooLarge,
    #[error("cannot read body")]
    BodyRead,
    #[error("missing or wrong signature or token")]
    Unauthorized,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("payload does not match the rule on {0}")]
    RuleMismatch(String),
    #[error("payload names no image")]
    NoImage,
    #[error("job queue is full")]
    QueueFull,
    #[error("cannot record job")]
    Journal,
}

impl Reject {
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::UnknownHook => StatusCode::NOT_FOUND,
            Reject::Forbidden => StatusCode::FORBIDDEN,
            Reject::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reject::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::BodyRead | Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            Reject::Unauthorized => StatusCode::UNAUTHORIZED,
            Reject::RuleMismatch(_) | Reject::NoImage => StatusCode::UNPROCESSABLE_ENTITY,
            Reject::QueueFull | Reject::Journal => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `outcome` label of `webhook_requests`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Reject::UnknownHook => "unknown_hook",
            Reject::Forbidden => "forbidden",
            Reject::RateLimited => "rate_limited",
            Reject::TooLarge => "too_large",
            Reject::BodyRead | Reject::BadRequest(_) => "bad_request",
            Reject::Unauthorized => "unauthorized",
            Reject::RuleMismatch(_) | Reject::NoImage => "rejected",
            Reject::QueueFull => "queue_full",
            Reject::Journal => "error",
        }
    }
}

/// What an accepted request led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// 202: a job, new or one it joined.
    Job(Submitted),
    /// 200: GitHub's ping, answered and not acted on.
    Ping,
    /// 200: an event the hook does not act on.
    Ignored,
    /// 200: a GitHub delivery seen before.
    Duplicate,
}

impl Accepted {
    pub fn outcome(&self) -> &'static str {
        match self {
            Accepted::Job(s) if s.coalesced => "coalesced",
            Accepted::Job(_) => "accepted",
            Accepted::Ping => "ping",
            Accepted::Ignored => "ignored",
            Accepted::Duplicate => "duplicate",
        }
    }
}

/// A token bucket holding up to `rate` tokens, refilled at `rate` per second.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Delivery ids seen within the TTL.
#[derive(Default)]
struct Replay {
    seen: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Replay {
    /// Remembers `id`; false if it was already there.
    fn insert(&mut self, id: &str, now: Instant) -> bool {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < REPLAY_TTL && self.order.len() < REPLAY_CAP {
                break;
            }
            if let Some((at, old)) = self.order.pop_front() {
                if self.seen.get(&old) == Some(&at) {
                    self.seen.remove(&old);
                }
            }
        }
        if self.seen.contains_key(id) {
            return false;
        }
        self.seen.insert(id.to_owned(), now);
        self.order.push_back((now, id.to_owned()));
        true
    }

    fn forget(&mut self, id: &str) {
        self.seen.remove(id);
    }
}

/// One configured hook with its secrets loaded.
struct Hook {
    cfg: config::Hook,
    /// SHA-256 of the shared token.
    token: Option<[u8; 32]>,
    secret: Option<Vec<u8>>,
    bucket: Mutex<Bucket>,
    replay: Mutex<Replay>,
}

impl Hook {
    fn load(cfg: &config::Hook) -> Result<Hook> {
        let read = |path: &std::path::Path| -> Result<Vec<u8>> {
            let bytes = config::read_secret(path).map_err(|source| Error::Secret {
                hook: cfg.name.clone(),
                path: path.to_owned(),
                source,
            })?;
            if bytes.is_empty() {
                return Err(Error::EmptySecret {
                    hook: cfg.name.clone(),
                    path: path.to_owned(),
                });
            }
            Ok(bytes)
        };
        let token = match &cfg.token_file {
            Some(p) => Some(Sha256::digest(read(p)?).into()),
            None => None,
        };
        let secret = match &cfg.secret_file {
            Some(p) => Some(read(p)?),
            None => None,
        };
        Ok(Hook {
            token,
            secret,
            bucket: Mutex::new(Bucket::new(cfg.rate)),
            replay: Mutex::default(),
            cfg: cfg.clone(),
        })
    }

    fn token_matches(&self, presented: &[u8]) -> bool {
        let Some(want) = &self.token else {
            return false;
        };
        let got: [u8; 32] = Sha256::digest(presented).into();
        bool::from(got.ct_eq(want))
    }

    fn signature_matches(&self, header: Option<&str>, body: &[u8]) -> bool {
        let Some(secret) = &self.secret else {
            return false;
        };
        verify_signature(secret, header, body)
    }

    /// Token, signature or both, by kind. Runs before the body is parsed.
    fn verify(&self, headers: &HeaderMap, query: Option<&str>, body: &[u8]) -> bool {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let query_token = || query_token(query);
        match self.cfg.kind {
            HookKind::Github => self.signature_matches(header(GITHUB_SIGNATURE_HEADER), body),
            HookKind::Dockerhub => header(TOKEN_HEADER)
                .map(str::to_owned)
                .or_else(query_token)
                .is_some_and(|t| self.token_matches(t.as_bytes())),
            HookKind::Generic => {
                if let Some(sig) = header(SIGNATURE_HEADER) {
                    return self.signature_matches(Some(sig), body);
                }
                let bearer = header("authorization")
                    .and_then(|a| {
                        a.strip_prefix("Bearer ")
                            .or_else(|| a.strip_prefix("bearer "))
                    })
                    .map(|t| t.trim().to_owned());
                bearer
                    .or_else(|| header(TOKEN_HEADER).map(str::to_owned))
                    .or_else(query_token)
                    .is_some_and(|t| self.token_matches(t.as_bytes()))
            }
        }
    }
}

/// `sha256=<hex>` over the raw body, compared in constant time.
pub fn verify_signature(secret: &[u8], header: Option<&str>, body: &[u8]) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// `sha256=<hex>` of the body, as a sender computes it.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn query_token(query: Option<&str>) -> Option<String> {
    let q = query?;
    let uri: axum::http::Uri = format!("/?{q}").parse().ok()?;
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri).ok()?;
    pairs
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
}

#[derive(Deserialize)]
struct HubPayload {
    repository: HubRepository,
    push_data: HubPushData,
}
#[derive(Deserialize)]
struct HubRepository {
    repo_name: String,
}
#[derive(Deserialize)]
struct HubPushData {
    tag: String,
}

#[derive(Deserialize)]
struct GithubPayload {
    #[serde(default, rename = "ref")]
    r#ref: Option<String>,
    #[serde(default)]
    repository: Option<GithubRepository>,
}
#[derive(Deserialize)]
struct GithubRepository {
    #[serde(default)]
    full_name: Option<String>,
}

#[derive(Deserialize)]
struct GenericPayload {
    image: String,
}

/// Payload facts of a verified body.
fn facts(kind: HookKind, hook: &str, event: Option<&str>, body: &[u8]) -> Result<Facts, Reject> {
    let mut f = Facts {
        hook: hook.to_owned(),
        event: event.map(str::to_owned),
        ..Facts::default()
    };
    match kind {
        HookKind::Dockerhub => {
            let p: HubPayload = serde_json::from_slice(body)
                .map_err(|_| Reject::BadRequest("invalid docker hub payload"))?;
            f.image = Some(format!("{}:{}", p.repository.repo_name, p.push_data.tag));
            f.repository = Some(p.repository.repo_name);
            f.tag = Some(p.push_data.tag);
        }
        HookKind::Github => {
            let p: GithubPayload = serde_json::from_slice(body)
                .map_err(|_| Reject::BadRequest("invalid github payload"))?;
            f.r#ref = p.r#ref;
            f.repository = p.repository.and_then(|r| r.full_name);
        }
        HookKind::Generic => {
            let p: GenericPayload = serde_json::from_slice(body)
                .map_err(|_| Reject::BadRequest("invalid json payload"))?;
            let parsed = ImageRef::parse(&p.image)
                .map_err(|_| Reject::BadRequest("invalid image reference"))?;
            let name = p.image.split_once('@').map_or(p.image.as_str(), |(n, _)| n);
            let last_slash = name.rfind('/').map_or(0, |i| i + 1);
            let repo = match name[last_slash..].rfind(':') {
                Some(i) => &name[..last_slash + i],
                None => name,
            };
            f.repository = Some(repo.to_owned());
            f.tag = Some(parsed.tag);
            f.image = Some(p.image);
        }
    }
    Ok(f)
}

/// The webhook intake: configured hooks and the job table behind them.
pub struct Service {
    hooks: HashMap<String, Hook>,
    jobs: Arc<Jobs>,
    max_body: usize,
}

impl Service {
    /// The intake with any runner and journal (tests, or a daemon without an engine).
    pub async fn new(
        config: &config::Config,
        runner: Arc<dyn Runner>,
        journal: Journal,
        shutdown: CancellationToken,
    ) -> Result<Arc<Service>> {
        let mut hooks = HashMap::new();
        for h in &config.hooks {
            hooks.insert(h.name.clone(), Hook::load(h)?);
        }
        let jobs = Jobs::start(config.jobs.clone(), runner, journal, shutdown).await?;
        Ok(Arc::new(Service {
            hooks,
            jobs,
            max_body: config.http.max_body,
        }))
    }

    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// Handles `POST /hooks/{name}` and counts it.
    pub async fn handle(
        &self,
        name: &str,
        peer: Option<IpAddr>,
        headers: &HeaderMap,
        query: Option<&str>,
        body: Body,
    ) -> Result<Accepted, Reject> {
        let hook = self.hooks.get(name);
        let result = match hook {
            Some(hook) => self.intake(hook, peer, headers, query, body).await,
            None => Err(Reject::UnknownHook),
        };
        let label = if hook.is_some() { name } else { "-" };
        let outcome = match &result {
            Ok(a) => a.outcome(),
            Err(r) => r.outcome(),
        };
        metrics::get()
            .webhook_requests
            .with_label_values(&[label, outcome])
            .inc();
        match &result {
            Ok(Accepted::Job(s)) => info!(job = %s.id, outcome, "webhook accepted"),
            Ok(_) => debug!(outcome, "webhook answered"),
            Err(Reject::Unauthorized | Reject::Forbidden) => warn!(outcome, "webhook refused"),
            Err(_) => debug!(outcome, "webhook refused"),
        }
        result
    }

    async fn intake(
        &self,
        hook: &Hook,
        peer: Option<IpAddr>,
        headers: &HeaderMap,
        query: Option<&str>,
        body: Body,
    ) -> Result<Accepted, Reject> {
        let cfg = &hook.cfg;
        if !cfg.cidrs.is_empty() && !peer.is_some_and(|ip| cfg.cidrs.iter().any(|c| c.contains(ip)))
        {
            return Err(Reject::Forbidden);
        }
        if !hook.bucket.lock().map(|mut b| b.take()).unwrap_or(false) {
            return Err(Reject::RateLimited);
        }
        let body = read_body(body, self.max_body).await?;
        if !hook.verify(headers, query, &body) {
            metrics::get()
                .signature_failures
                .with_label_values(&[cfg.name.as_str()])
                .inc();
            return Err(Reject::Unauthorized);
        }
        // Verified from here on.
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let mut event = None;
        let mut delivery = None;
        if cfg.kind == HookKind::Github {
            let ev =
                header(GITHUB_EVENT_HEADER).ok_or(Reject::BadRequest("missing X-GitHub-Event"))?;
            if ev == "ping" {
                return Ok(Accepted::Ping);
            }
            let id = header(GITHUB_DELIVERY_HEADER)
                .ok_or(Reject::BadRequest("missing X-GitHub-Delivery"))?;
            if id.is_empty() || id.len() > 100 {
                return Err(Reject::BadRequest("invalid X-GitHub-Delivery"));
            }
            let fresh = hook
                .replay
                .lock()
                .map(|mut r| r.insert(id, Instant::now()))
                .unwrap_or(true);
            if !fresh {
                return Ok(Accepted::Duplicate);
            }
            delivery = Some(id);
            event = Some(ev);
        }
        let result = self.decide(hook, event, &body).await;
        // A delivery we could not take (5xx) may be redelivered and must then be accepted.
        if let (Some(id), Err(Reject::QueueFull | Reject::Journal)) = (delivery, &result) {
            if let Ok(mut r) = hook.replay.lock() {
                r.forget(id);
            }
        }
        result
    }

    async fn decide(
        &self,
        hook: &Hook,
        event: Option<&str>,
        body: &Bytes,
    ) -> Result<Accepted, Reject> {
        let cfg = &hook.cfg;
        if let Some(ev) = event {
            if !cfg.events.is_empty() && !cfg.events.iter().any(|e| e == ev) {
                return Ok(Accepted::Ignored);
            }
        }
        let facts = facts(cfg.kind, &cfg.name, event, body)?;
        for (name, rule) in &cfg.allow {
            if !facts.get(name).is_some_and(|v| rule.is_match(v)) {
                return Err(Reject::RuleMismatch(name.clone()));
            }
        }
        let work = match &cfg.action {
            HookAction::UpdateServices => {
                let image = facts.image.as_deref().ok_or(Reject::NoImage)?;
                let image = ImageRef::parse(image)
                    .map_err(|_| Reject::BadRequest("invalid image reference"))?;
                Work::UpdateServices { image: image.key() }
            }
            HookAction::RestartService(service) => Work::RestartService {
                service: service.clone(),
            },
            HookAction::Command(argv) => Work::Command { argv: argv.clone() },
        };
        let request = Request {
            hook: cfg.name.clone(),
            work,
            facts,
            quiet: cfg.quiet,
        };
        match self.jobs.submit(request).await {
            Ok(s) => Ok(Accepted::Job(s)),
            Err(jobs::Error::QueueFull) => Err(Reject::QueueFull),
            Err(jobs::Error::Journal(_)) => Err(Reject::Journal),
        }
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Reject> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Reject::TooLarge),
        Err(_) => Err(Reject::BodyRead),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GITHUB_SECRET: &[u8] = b"It's a Secret to Everybody";
    const GITHUB_BODY: &[u8] = b"Hello, World!";
    const GITHUB_SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_published_vector_verifies() {
        assert!(verify_signature(
            GITHUB_SECRET,
            Some(GITHUB_SIGNATURE),
            GITHUB_BODY
        ));
        assert_eq!(sign(GITHUB_SECRET, GITHUB_BODY), GITHUB_SIGNATURE);
    }

    #[test]
    fn wrong_missing_or_malformed_signatures_fail() {
        let flipped = GITHUB_SIGNATURE.replace("757107", "757108");
        let cases: [Option<&str>; 8] = [
            None,
            Some(""),
            Some("sha256="),
            Some(&flipped),
            Some("sha1=757107ea0eb2509fc211221cce984b8a37570b6d"),
            Some("sha256=zz7107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"),
            Some("sha256=757107ea0eb2509fc211221cce984b8a"),
            Some("757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"),
        ];
        for c in cases {
            assert!(
                !verify_signature(GITHUB_SECRET, c, GITHUB_BODY),
                "{c:?} accepted"
            );
        }
        assert!(!verify_signature(
            b"other",
            Some(GITHUB_SIGNATURE),
            GITHUB_BODY
        ));
        assert!(!verify_signature(
            GITHUB_SECRET,
            Some(GITHUB_SIGNATURE),
            b"Hello, World?"
        ));
    }

    #[test]
    fn query_token_is_found_and_decoded() {
        assert_eq!(query_token(Some("a=1&token=s%2Fx")), Some("s/x".into()));
        assert_eq!(query_token(Some("a=1")), None);
        assert_eq!(query_token(None), None);
    }

    #[test]
    fn hub_payload_gives_repository_tag_and_image() {
        let body = br#"{"push_data":{"tag":"latest"},"repository":{"repo_name":"owner/app","name":"app"}}"#;
        let f = facts(HookKind::Dockerhub, "hub", None, body).expect("facts");
        assert_eq!(f.repository.as_deref(), Some("owner/app"));
        assert_eq!(f.tag.as_deref(), Some("latest"));
        assert_eq!(f.image.as_deref(), Some("owner/app:latest"));
        assert!(facts(HookKind::Dockerhub, "hub", None, b"{\"repository\":{}}").is_err());
    }

    #[test]
    fn generic_payload_splits_the_image() {
        let f = facts(
            HookKind::Generic,
            "ci",
            None,
            br#"{"image":"127.0.0.1:5000/x/y:v2"}"#,
        )
        .expect("facts");
        assert_eq!(f.repository.as_deref(), Some("127.0.0.1:5000/x/y"));
        assert_eq!(f.tag.as_deref(), Some("v2"));
        let f = facts(
            HookKind::Generic,
            "ci",
            None,
            br#"{"image":"127.0.0.1:5000/x"}"#,
        )
        .expect("facts");
        assert_eq!(f.repository.as_deref(), Some("127.0.0.1:5000/x"));
        assert_eq!(f.tag.as_deref(), Some("latest"));
        assert!(facts(HookKind::Generic, "ci", None, br#"{"image":"{{7*7}}"}"#).is_err());
        assert!(facts(HookKind::Generic, "ci", None, br#"{"image":7}"#).is_err());
    }

    #[test]
    fn full_match_rules_do_not_accept_prefixes() {
        let rule: config::FullMatch = serde_yaml_ng::from_str("\"latest\"").expect("rule");
        let facts = Facts {
            tag: Some("latest-foo".into()),
            ..Facts::default()
        };
        assert!(!facts.get("tag").is_some_and(|v| rule.is_match(v)));
        assert!(rule.is_match("latest"));
    }

    #[test]
    fn replay_cache_refuses_repeats_and_forgets_after_the_ttl() {
        let mut r = Replay::default();
        let t0 = Instant::now();
        assert!(r.insert("a", t0));
        assert!(!r.insert("a", t0 + Duration::from_secs(60)));
        assert!(r.insert("a", t0 + REPLAY_TTL + Duration::from_secs(1)));
        r.forget("a");
        assert!(r.insert("a", t0 + REPLAY_TTL + Duration::from_secs(2)));
    }

    #[test]
    fn replay_cache_stays_bounded() {
        let mut r = Replay::default();
        let t0 = Instant::now();
        for i in 0..REPLAY_CAP + 50 {
            assert!(r.insert(&i.to_string(), t0));
        }
        assert!(r.seen.len() <= REPLAY_CAP);
        assert!(r.order.len() <= REPLAY_CAP);
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_a_burst_of_rate_then_refills() {
        let mut b = Bucket::new(3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(b.take());
        assert!(!b.take());
    }
}
