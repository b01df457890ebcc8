//! Webhook intake: turns a hostile HTTP request into a verified job request, or refuses it.
//!
//! The pipeline reads as its submodules: [`verify`] (tokens and signatures, per-repository
//! secrets), [`facts`] (what a verified payload says), [`rules`] (`allow` and the work an
//! action asks for).
//!
//! Invariants: the order of checks is fixed — known hook and source network ([`Service::admit`]),
//! then the signature or token over the raw body ([`Service::verify`]), and only then the
//! payload is parsed ([`Service::accept`]); nothing of a refused request reaches the job
//! queue or the Docker API. Reading the body, its size cap and the rate limits belong to
//! the HTTP layer, which calls these steps in order; this module knows no HTTP types. Secrets are read once at start and
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

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, HookKind};
use crate::jobs::{self, Jobs, Journal, Request, Runner, Submitted};
use crate::metrics;
use crate::update;

pub mod facts;
pub mod rules;
pub mod verify;

pub use facts::Facts;
pub use verify::{Presented, sign, sign_sha1, verify_signature};

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
pub const GITHUB_SHA1_HEADER: &str = "x-hub-signature";
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
    #[error("too many bodies being read")]
    Busy,
    #[error("cannot record job")]
    Journal,
    #[error("this node is a swarm worker without the swarm api: send webhooks to a manager")]
    Worker,
}

impl Reject {
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
            Reject::Busy => "busy",
            Reject::Journal => "error",
            Reject::Worker => "worker",
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

    /// Whether `id` was remembered within the TTL.
    fn contains(&self, id: &str, now: Instant) -> bool {
        self.seen
            .get(id)
            .is_some_and(|at| now.duration_since(*at) < REPLAY_TTL)
    }
}

/// One configured hook with its secrets loaded.
pub struct Hook {
    cfg: config::Hook,
    keys: verify::Keys,
    replay: Mutex<Replay>,
}

/// What the intake reads of a request: headers by lower-case name, and the `token` query
/// parameter (Docker Hub cannot send headers).
pub trait Headers: Sync {
    fn header(&self, name: &str) -> Option<&str>;
    fn query_token(&self) -> Option<&str>;
}

impl Hook {
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Verified requests per second this hook takes.
    pub fn rate(&self) -> u32 {
        self.cfg.rate
    }

    fn load(cfg: &config::Hook) -> Result<Hook> {
        Ok(Hook {
            keys: verify::Keys::load(cfg)?,
            replay: Mutex::default(),
            cfg: cfg.clone(),
        })
    }

    /// The credentials the request presents, in the places this kind of hook reads them.
    fn presented<'a>(&self, headers: &'a dyn Headers) -> Presented<'a> {
        let header = |name: &str| headers.header(name);
        let query_token = || headers.query_token().map(str::to_owned);
        match self.cfg.kind {
            HookKind::Github => Presented {
                token: None,
                sha256: header(GITHUB_SIGNATURE_HEADER),
                sha1: header(GITHUB_SHA1_HEADER),
            },
            HookKind::Dockerhub => Presented {
                token: header(TOKEN_HEADER).map(str::to_owned).or_else(query_token),
                ..Presented::default()
            },
            HookKind::Generic => {
                if let Some(sig) = header(SIGNATURE_HEADER) {
                    return Presented {
                        sha256: Some(sig),
                        ..Presented::default()
                    };
                }
                let bearer = header("authorization")
                    .and_then(|a| {
                        a.strip_prefix("Bearer ")
                            .or_else(|| a.strip_prefix("bearer "))
                    })
                    .map(|t| t.trim().to_owned());
                Presented {
                    token: bearer
                        .or_else(|| header(TOKEN_HEADER).map(str::to_owned))
                        .or_else(query_token),
                    ..Presented::default()
                }
            }
        }
    }

    /// Token, signature or both, by kind. Runs before the body is parsed.
    fn verify(&self, headers: &dyn Headers, body: &[u8]) -> bool {
        self.keys.verify(&self.presented(headers), body)
    }
}

/// The webhook intake: configured hooks and the job table behind them.
pub struct Service {
    hooks: HashMap<String, Hook>,
    jobs: Arc<Jobs>,
    /// On a Swarm worker every job would fail for want of the Swarm API: verified
    /// requests are answered 503 with the reason instead of 202 and a failed job.
    worker: std::sync::atomic::AtomicBool,
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
            worker: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Marks this instance as running on a Swarm worker (or not any more).
    pub fn set_worker(&self, worker: bool) {
        self.worker
            .store(worker, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    pub fn hooks(&self) -> impl Iterator<Item = &Hook> {
        self.hooks.values()
    }

    /// The hook named `name`, if it exists and `peer` is in its source networks.
    pub fn admit(&self, name: &str, peer: Option<IpAddr>) -> Result<&Hook, Reject> {
        let hook = self.hooks.get(name).ok_or(Reject::UnknownHook)?;
        let cidrs = &hook.cfg.cidrs;
        if !cidrs.is_empty() && !peer.is_some_and(|ip| cidrs.iter().any(|c| c.contains(ip))) {
            return Err(Reject::Forbidden);
        }
        Ok(hook)
    }

    /// The signature or token over the raw body, before anything of it is parsed.
    pub fn verify(&self, hook: &Hook, headers: &dyn Headers, body: &[u8]) -> Result<(), Reject> {
        if hook.verify(headers, body) {
            return Ok(());
        }
        metrics::get()
            .signature_failures
            .with_label_values(&[hook.cfg.name.as_str()])
            .inc();
        Err(Reject::Unauthorized)
    }

    /// Acts on a verified request: GitHub's ping and replays are answered without a job,
    /// events the hook does not act on are ignored, the rest must pass the rules and
    /// becomes a job. A delivery id is remembered only once it got its job.
    pub async fn accept(
        &self,
        hook: &Hook,
        headers: &dyn Headers,
        body: &[u8],
    ) -> Result<Accepted, Reject> {
        let cfg = &hook.cfg;
        let mut event = None;
        let mut delivery = None;
        if cfg.kind == HookKind::Github {
            let ev = headers
                .header(GITHUB_EVENT_HEADER)
                .ok_or(Reject::BadRequest("missing X-GitHub-Event"))?;
            if ev == "ping" {
                return Ok(Accepted::Ping);
            }
            let id = headers
                .header(GITHUB_DELIVERY_HEADER)
                .ok_or(Reject::BadRequest("missing X-GitHub-Delivery"))?;
            if id.is_empty() || id.len() > 100 {
                return Err(Reject::BadRequest("invalid X-GitHub-Delivery"));
            }
            let seen = hook
                .replay
                .lock()
                .map(|r| r.contains(id, Instant::now()))
                .unwrap_or(false);
            if seen {
                return Ok(Accepted::Duplicate);
            }
            delivery = Some(id);
            event = Some(ev);
        }
        let result = self.decide(hook, event, body).await;
        if let (Some(id), Ok(Accepted::Job(_))) = (delivery, &result) {
            if let Ok(mut r) = hook.replay.lock() {
                r.insert(id, Instant::now());
            }
        }
        result
    }

    async fn decide(
        &self,
        hook: &Hook,
        event: Option<&str>,
        body: &[u8],
    ) -> Result<Accepted, Reject> {
        let cfg = &hook.cfg;
        if self.worker.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Reject::Worker);
        }
        if let Some(ev) = event {
            if !cfg.events.iter().any(|e| e == ev) {
                return Ok(Accepted::Ignored);
            }
        }
        let facts = facts::parse(cfg.kind, &cfg.name, event, body)
            .map_err(|e| Reject::BadRequest(e.as_str()))?;
        rules::check(&cfg.allow, &facts).map_err(|name| Reject::RuleMismatch(name.to_owned()))?;
        let work = rules::work(&cfg.action, &facts).map_err(|e| match e {
            rules::Error::NoImage => Reject::NoImage,
            rules::Error::InvalidImage => Reject::BadRequest("invalid image reference"),
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_cache_refuses_repeats_and_forgets_after_the_ttl() {
        let mut r = Replay::default();
        let t0 = Instant::now();
        assert!(r.insert("a", t0));
        assert!(!r.insert("a", t0 + Duration::from_secs(60)));
        assert!(r.contains("a", t0 + Duration::from_secs(60)));
        assert!(!r.contains("a", t0 + REPLAY_TTL));
        assert!(r.insert("a", t0 + REPLAY_TTL + Duration::from_secs(1)));
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
}
