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
//! template and never echoed in an answer. Every request is counted in
//! `webhook_requests{hook,outcome}` with a fixed outcome vocabulary.
//!
//! Replays: every kind remembers what it accepted, each by what its sender makes unique. A
//! GitHub delivery id and the SHA-256 of its body for [`REPLAY_TTL`] (the id is not signed); a Docker Hub or token-authenticated generic body
//! by its SHA-256 for the hook's `replay_window`; a signed generic request carries a signed
//! `X-Drover-Timestamp` that must be within [`MAX_SKEW`] of drover's clock, and the
//! timestamp with the body is remembered until it is stale anyway. A repeat of an accepted
//! request is answered 200 `{"status": "duplicate"}` without a job: a sender that retries
//! because it lost the first answer must not see a failure, and nothing new is done. A
//! stale timestamp is a refusal (401): the request cannot be shown to be fresh. Memory is
//! bounded: at most [`REPLAY_CAP`] entries per hook and kind of proof, oldest forgotten first.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{self, HookKind};
use crate::jobs::{self, Jobs, Request, Submitted};
use crate::metrics;
use crate::role::Role;
use crate::update;

pub mod facts;
pub mod rules;
pub mod verify;

pub use facts::Facts;
pub use verify::{Presented, sign, sign_sha1, sign_timestamped, verify_signature};

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
/// Accepted requests remembered per hook and kind of proof; the oldest is forgotten first
/// beyond this (an entry is a 32-byte digest and an instant: about 1 MB at the cap).
pub const REPLAY_CAP: usize = 10_000;
/// How far a signed generic request's `X-Drover-Timestamp` may be from drover's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

pub const TOKEN_HEADER: &str = "x-drover-token";
pub const SIGNATURE_HEADER: &str = "x-drover-signature";
/// Unix seconds, covered by `X-Drover-Signature` on generic hooks (see [`sign_timestamped`]).
pub const TIMESTAMP_HEADER: &str = "x-drover-timestamp";
pub const GITHUB_SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const GITHUB_SHA1_HEADER: &str = "x-hub-signature";
pub const GITHUB_EVENT_HEADER: &str = "x-github-event";
pub const GITHUB_DELIVERY_HEADER: &str = "x-github-delivery";
/// Gitea's and Forgejo's hex HMAC-SHA256 of the body, event and delivery id (Forgejo
/// sends both its own names and Gitea's).
pub const GITEA_SIGNATURE_HEADERS: [&str; 2] = ["x-gitea-signature", "x-forgejo-signature"];
pub const GITEA_EVENT_HEADERS: [&str; 2] = ["x-gitea-event", "x-forgejo-event"];
pub const GITEA_DELIVERY_HEADERS: [&str; 2] = ["x-gitea-delivery", "x-forgejo-delivery"];
/// GitLab's secret token, event name and (since GitLab 16) per-event id.
pub const GITLAB_TOKEN_HEADER: &str = "x-gitlab-token";
pub const GITLAB_EVENT_HEADER: &str = "x-gitlab-event";
pub const GITLAB_DELIVERY_HEADER: &str = "x-gitlab-event-uuid";
/// Bitbucket Cloud's `sha256=<hex>` signature (set when the webhook has a secret), event
/// key and per-request id.
pub const BITBUCKET_SIGNATURE_HEADER: &str = "x-hub-signature";
pub const BITBUCKET_EVENT_HEADER: &str = "x-event-key";
pub const BITBUCKET_DELIVERY_HEADER: &str = "x-request-uuid";

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
    #[error("body arrives too slowly")]
    TooSlow,
    #[error("missing or wrong signature or token")]
    Unauthorized,
    #[error("missing, invalid or stale X-Drover-Timestamp (unix seconds, within 300 s of now)")]
    Stale,
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
    #[error("no controller reachable from this node: try again shortly")]
    NoController,
    /// The request reached the controller but its answer did not come back in time: it
    /// may have been accepted, so the sender must look at `/jobs` before sending again
    /// (a re-signed repeat is a new request to the replay memory).
    #[error(
        "the controller did not answer in time: the request may have been accepted; see /jobs before sending it again"
    )]
    OutcomeUnknown,
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
            Reject::TooSlow => "too_slow",
            Reject::Unauthorized => "unauthorized",
            Reject::Stale => "stale",
            Reject::RuleMismatch(_) | Reject::NoImage => "rejected",
            Reject::QueueFull => "queue_full",
            Reject::Busy => "busy",
            Reject::Journal => "error",
            Reject::Worker => "worker",
            Reject::NoController => "no_controller",
            Reject::OutcomeUnknown => "outcome_unknown",
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
    /// 200: a request accepted before (same delivery id, body or signed timestamp and body).
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

/// Digests of accepted requests, each remembered for `ttl`.
struct Replay {
    ttl: Duration,
    seen: HashMap<[u8; 32], Instant>,
    order: VecDeque<(Instant, [u8; 32])>,
}

impl Replay {
    fn new(ttl: Duration) -> Replay {
        Replay {
            ttl,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers `key`; false if it was already there.
    fn insert(&mut self, key: [u8; 32], now: Instant) -> bool {
        if self.ttl.is_zero() {
            return true;
        }
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.ttl && self.order.len() < REPLAY_CAP {
                break;
            }
            if let Some((at, old)) = self.order.pop_front() {
                if self.seen.get(&old) == Some(&at) {
                    self.seen.remove(&old);
                }
            }
        }
        if self.contains(&key, now) {
            return false;
        }
        self.seen.insert(key, now);
        self.order.push_back((now, key));
        true
    }

    /// Whether `key` was remembered within the TTL.
    fn contains(&self, key: &[u8; 32], now: Instant) -> bool {
        self.seen
            .get(key)
            .is_some_and(|at| now.duration_since(*at) < self.ttl)
    }
}

/// Which memory of a hook a request is looked up in.
#[derive(Clone, Copy)]
enum Memory {
    /// GitHub delivery ids, Docker Hub and token bodies.
    Accepted,
    /// Signed generic requests: timestamp and body.
    Signed,
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

use crate::clock::unix_secs as unix_now;

/// Whether `X-Drover-Timestamp` is plain unix seconds within [`MAX_SKEW`] of `now`.
fn fresh(timestamp: &str, now: i64) -> bool {
    if timestamp.is_empty()
        || timestamp.len() > 12
        || !timestamp.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    timestamp
        .parse::<i64>()
        .is_ok_and(|ts| ts.abs_diff(now) <= MAX_SKEW.as_secs())
}

/// One configured hook with its secrets loaded.
pub struct Hook {
    cfg: config::Hook,
    keys: verify::Keys,
    /// Delivery ids (GitHub) or body digests (Docker Hub, generic tokens).
    /// Both memories are shared with the hook of the same name after a config reload
    /// (while its replay window stays): a request accepted before the reload is still a
    /// duplicate after it.
    accepted: Arc<Mutex<Replay>>,
    /// Signed generic requests: kept until their timestamp is stale on either side.
    signed: Arc<Mutex<Replay>>,
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
        let accepted = if cfg.kind.is_forge() {
            REPLAY_TTL
        } else {
            cfg.replay_window()
        };
        Ok(Hook {
            keys: verify::Keys::load(cfg)?,
            accepted: Arc::new(Mutex::new(Replay::new(accepted))),
            signed: Arc::new(Mutex::new(Replay::new(
                2 * MAX_SKEW + Duration::from_secs(1),
            ))),
            cfg: cfg.clone(),
        })
    }

    /// The credentials the request presents, in the places this kind of hook reads them.
    fn presented<'a>(&self, headers: &'a dyn Headers) -> Presented<'a> {
        let header = |name: &str| headers.header(name);
        let query_token = || headers.query_token().map(str::to_owned);
        match self.cfg.kind {
            HookKind::Github => {
                let sha256 = header(GITHUB_SIGNATURE_HEADER);
                Presented {
                    token: None,
                    sha256,
                    // Only asked for when there is no SHA-256 signature, which wins.
                    sha1: if sha256.is_none() {
                        header(GITHUB_SHA1_HEADER)
                    } else {
                        None
                    },
                    ..Presented::default()
                }
            }
            HookKind::Gitea => Presented {
                hex256: GITEA_SIGNATURE_HEADERS.iter().find_map(|h| header(h)),
                ..Presented::default()
            },
            HookKind::Gitlab => Presented {
                token: header(GITLAB_TOKEN_HEADER).map(str::to_owned),
                ..Presented::default()
            },
            HookKind::Bitbucket => Presented {
                sha256: header(BITBUCKET_SIGNATURE_HEADER),
                ..Presented::default()
            },
            HookKind::Dockerhub => Presented {
                token: header(TOKEN_HEADER).map(str::to_owned).or_else(query_token),
                ..Presented::default()
            },
            HookKind::Generic => {
                if let Some(sig) = header(SIGNATURE_HEADER) {
                    return Presented {
                        sha256: Some(sig),
                        timestamp: header(TIMESTAMP_HEADER),
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

    /// A generic request proven by `X-Drover-Signature` (rather than a token).
    fn signed(&self, headers: &dyn Headers) -> bool {
        self.cfg.kind == HookKind::Generic && headers.header(SIGNATURE_HEADER).is_some()
    }

    /// Where a verified request is remembered, and by what. GitHub's delivery id has been
    /// checked for shape by the caller.
    fn replay_key(
        &self,
        headers: &dyn Headers,
        delivery: Option<&str>,
        body: &[u8],
    ) -> (Memory, [u8; 32]) {
        if let Some(id) = delivery {
            return (Memory::Accepted, digest(&[id.as_bytes()]));
        }
        if self.signed(headers) {
            // Verified, so the header is there and covered by the signature.
            let ts = headers.header(TIMESTAMP_HEADER).unwrap_or_default();
            return (Memory::Signed, digest(&[ts.as_bytes(), b".", body]));
        }
        (Memory::Accepted, digest(&[body]))
    }

    fn memory(&self, which: Memory) -> std::sync::MutexGuard<'_, Replay> {
        let m = match which {
            Memory::Accepted => &self.accepted,
            Memory::Signed => &self.signed,
        };
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a journalled job's work is derived again when it is resumed: from the hook as it
/// is configured now. A hook that is gone, or whose rules no longer allow the journalled
/// facts, runs nothing.
pub fn resolver(config: &config::Config) -> jobs::Resolve {
    let current: HashMap<String, config::Hook> = config
        .hooks
        .iter()
        .map(|h| (h.name.clone(), h.clone()))
        .collect();
    Arc::new(move |name: &str, facts: &Facts| {
        let cfg = current
            .get(name)
            .ok_or_else(|| "the hook is no longer configured".to_owned())?;
        rules::check(&cfg.allow, facts)
            .map_err(|rule| format!("the hook's rule on {rule} no longer allows it"))?;
        rules::work(&cfg.action, facts).map_err(|e| e.to_string())
    })
}

/// The hooks of a config with their secrets read, and the redactor that keeps those
/// secrets (and the registries' passwords) out of every job's output.
pub struct Loaded {
    hooks: HashMap<String, Arc<Hook>>,
    pub redactor: crate::redact::Redactor,
}

impl Loaded {
    pub fn from_config(config: &config::Config) -> Result<Loaded> {
        let hooks = load_hooks(&config.hooks, &HashMap::new())?;
        let redactor = crate::redact::Redactor::default();
        for hook in hooks.values() {
            hook.keys.redact_into(&redactor);
        }
        for h in &config.hooks {
            if let config::HookAction::Container(c) = &h.action {
                // Read for redaction only; an unreadable file fails the job with its path.
                for path in c.env_files.values() {
                    if let Ok(value) = config::read_secret(path) {
                        redactor.add(&value);
                    }
                }
            }
        }
        // drover's own secrets: the cluster key (which signs agent requests), the
        // operator token and the ACME binding key, should a command or container print them.
        let own = [
            Some(&config.cluster.key_file),
            config.http.ops.token_file.as_ref(),
            config
                .certificates
                .as_ref()
                .and_then(|c| c.eab.as_ref())
                .map(|e| &e.hmac_key_file),
        ];
        for path in own.into_iter().flatten() {
            if let Ok(value) = config::read_secret(path) {
                redactor.add(value.trim_ascii());
            }
        }
        for s in &config.stacks {
            // A deploy's output never prints these; cut them out should git or the CLI
            // ever echo one.
            for f in s.token_file.iter().chain(&s.git_crypt_key_file) {
                if let Ok(secret) = config::read_secret(f) {
                    redactor.add(&secret);
                }
            }
        }
        for r in &config.registries {
            // Read for redaction only; an unreadable file fails where it is used, with its
            // path (jobs::runner::Executor), not here.
            if let Ok(password) = config::read_secret(&r.password_file) {
                redactor.add(&password);
            }
        }
        Ok(Loaded { hooks, redactor })
    }
}

/// The webhook intake: configured hooks and the job table behind them.
pub struct Service {
    /// Swapped whole by [`Service::replace_hooks`]; a request holds the `Arc<Hook>` it was
    /// admitted with until it is answered.
    hooks: RwLock<Arc<HashMap<String, Arc<Hook>>>>,
    jobs: Arc<Jobs>,
    /// On a Swarm worker every job would fail for want of the Swarm API: verified
    /// requests are answered 503 with the reason instead of 202 and a failed job. Live:
    /// a node promoted or demoted changes the answer.
    role: watch::Receiver<Role>,
    /// Shared with the job table: the secrets of hooks a reload brings in are added here,
    /// so their jobs' output is cleaned like that of the hooks loaded at start.
    redactor: crate::redact::Redactor,
}

impl Service {
    /// The intake for the hooks `loaded` from the config, in front of `jobs` (which the
    /// composition root builds with the same redactor).
    pub fn new(loaded: Loaded, jobs: Arc<Jobs>, role: watch::Receiver<Role>) -> Arc<Service> {
        Arc::new(Service {
            hooks: RwLock::new(Arc::new(loaded.hooks)),
            jobs,
            role,
            redactor: loaded.redactor,
        })
    }

    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// The hooks configured now.
    pub fn hooks(&self) -> Vec<Arc<Hook>> {
        self.current().values().cloned().collect()
    }

    fn current(&self) -> Arc<HashMap<String, Arc<Hook>>> {
        self.hooks
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Swaps in the hooks of a reloaded config, all or nothing: when a secret file cannot
    /// be read the old hooks stay. Requests already admitted finish with the hook they
    /// were admitted with; queued jobs are not touched.
    pub fn replace_hooks(&self, configs: &[config::Hook]) -> Result<()> {
        let old = self.current();
        let new = load_hooks(configs, &old)?;
        // Before the swap: a request admitted with a new hook may already produce output.
        for hook in new.values() {
            hook.keys.redact_into(&self.redactor);
        }
        *self
            .hooks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(new);
        Ok(())
    }

    /// The hook named `name`, if it exists and `peer` is in its source networks.
    pub fn admit(&self, name: &str, peer: Option<IpAddr>) -> Result<Arc<Hook>, Reject> {
        let hook = self
            .current()
            .get(name)
            .cloned()
            .ok_or(Reject::UnknownHook)?;
        let cidrs = &hook.cfg.cidrs;
        if !cidrs.is_empty() && !peer.is_some_and(|ip| cidrs.iter().any(|c| c.contains(ip))) {
            return Err(Reject::Forbidden);
        }
        Ok(hook)
    }

    /// The signature or token over the raw body, before anything of it is parsed; a signed
    /// generic request's timestamp must also be fresh.
    pub fn verify(&self, hook: &Hook, headers: &dyn Headers, body: &[u8]) -> Result<(), Reject> {
        let signed = hook.signed(headers);
        let timestamp = signed.then(|| headers.header(TIMESTAMP_HEADER)).flatten();
        if signed && timestamp.is_none() {
            // Said apart from a wrong signature: a sender from before timestamps were
            // required learns what to add.
            return Err(Reject::Stale);
        }
        if hook.verify(headers, body) {
            if signed && !timestamp.is_some_and(|ts| fresh(ts, unix_now())) {
                return Err(Reject::Stale);
            }
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
    /// becomes a job. A request is remembered only once it got its job, so one refused for
    /// a full queue can be sent again.
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
            delivery = Some(id);
            event = Some(ev);
        } else if let Some(names) = forge_headers(cfg.kind) {
            let ev = names
                .event
                .iter()
                .find_map(|h| headers.header(h))
                .ok_or(Reject::BadRequest(names.missing_event))?;
            event = Some(forge_event(cfg.kind, ev));
            // Optional: the body digest is the replay key without it.
            delivery = names
                .delivery
                .iter()
                .find_map(|h| headers.header(h))
                .filter(|id| !id.is_empty() && id.len() <= 100);
        }
        let (memory, key) = hook.replay_key(headers, delivery, body);
        // The forges sign (or authenticate) the body but not the delivery id: the same
        // body under a new id is the same push sent again.
        let by_body = cfg
            .kind
            .is_forge()
            .then(|| digest(&[b"github-body:", body]));
        {
            let m = hook.memory(memory);
            let now = Instant::now();
            if m.contains(&key, now) || by_body.is_some_and(|b| m.contains(&b, now)) {
                return Ok(Accepted::Duplicate);
            }
        }
        let result = self.decide(hook, event, body).await;
        if let Ok(Accepted::Job(_)) = &result {
            let mut m = hook.memory(memory);
            m.insert(key, Instant::now());
            if let Some(b) = by_body {
                m.insert(b, Instant::now());
            }
        }
        result
    }
}

/// Where a forge other than GitHub names its event and delivery.
struct ForgeHeaders {
    event: &'static [&'static str],
    delivery: &'static [&'static str],
    missing_event: &'static str,
}

fn forge_headers(kind: HookKind) -> Option<ForgeHeaders> {
    Some(match kind {
        HookKind::Gitea => ForgeHeaders {
            event: &GITEA_EVENT_HEADERS,
            delivery: &GITEA_DELIVERY_HEADERS,
            missing_event: "missing X-Gitea-Event",
        },
        HookKind::Gitlab => ForgeHeaders {
            event: &[GITLAB_EVENT_HEADER],
            delivery: &[GITLAB_DELIVERY_HEADER],
            missing_event: "missing X-Gitlab-Event",
        },
        HookKind::Bitbucket => ForgeHeaders {
            event: &[BITBUCKET_EVENT_HEADER],
            delivery: &[BITBUCKET_DELIVERY_HEADER],
            missing_event: "missing X-Event-Key",
        },
        HookKind::Github | HookKind::Dockerhub | HookKind::Generic => return None,
    })
}

/// A forge's event name as `events` lists it: a branch push is `push` on every forge
/// (GitLab's `Push Hook`, Bitbucket's `repo:push`), others as the forge names them.
fn forge_event(kind: HookKind, event: &str) -> &str {
    match (kind, event) {
        (HookKind::Gitlab, "Push Hook") | (HookKind::Bitbucket, "repo:push") => "push",
        _ => event,
    }
}

impl Service {
    async fn decide(
        &self,
        hook: &Hook,
        event: Option<&str>,
        body: &[u8],
    ) -> Result<Accepted, Reject> {
        let cfg = &hook.cfg;
        if *self.role.borrow() == Role::Worker {
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
            rules::Error::NoBranch => Reject::BadRequest("push names no repository or branch"),
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

/// Loads every hook's secrets; a hook named as one in `previous` keeps its replay memory.
fn load_hooks(
    configs: &[config::Hook],
    previous: &HashMap<String, Arc<Hook>>,
) -> Result<HashMap<String, Arc<Hook>>> {
    let mut hooks = HashMap::new();
    for h in configs {
        let mut hook = Hook::load(h)?;
        if let Some(old) = previous.get(&h.name) {
            hook.signed = old.signed.clone();
            let same_window = |a: &Mutex<Replay>, b: &Mutex<Replay>| {
                let ttl = |m: &Mutex<Replay>| m.lock().map(|r| r.ttl).ok();
                ttl(a) == ttl(b)
            };
            if same_window(&old.accepted, &hook.accepted) {
                hook.accepted = old.accepted.clone();
            }
        }
        hooks.insert(h.name.clone(), Arc::new(hook));
    }
    Ok(hooks)
}

/// The webhook intake and the job table behind it, sharing one redactor (the hooks' and
/// registries' secrets), with any runner and journal: the daemon's, or a test's.
pub async fn intake(
    config: &crate::config::Config,
    runner: Arc<dyn crate::jobs::Runner>,
    journal: crate::jobs::Journal,
    role: tokio::sync::watch::Receiver<crate::role::Role>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Arc<crate::hooks::Service>> {
    let loaded = Loaded::from_config(config)?;
    let jobs = crate::jobs::Jobs::start_redacting(
        config.jobs.clone(),
        runner,
        resolver(config),
        journal,
        shutdown,
        loaded.redactor.clone(),
    )
    .await?;
    Ok(Service::new(loaded, jobs, role))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Journal;
    use tokio_util::sync::CancellationToken;

    /// Submits an update of `docker.io/o/r:latest` on `hook` and waits for its end.
    async fn run_update(service: &Service, hook: &str) -> crate::jobs::JobView {
        let submitted = service
            .jobs()
            .submit(Request {
                hook: hook.into(),
                work: crate::jobs::Work::UpdateServices {
                    image: "docker.io/o/r:latest".into(),
                    digest: None,
                    only: Vec::new(),
                },
                facts: Facts::default(),
                quiet: Duration::ZERO,
            })
            .await
            .expect("submit");
        for _ in 0..200 {
            if let Some(view) = service.jobs().get(&submitted.id.to_string()) {
                if view.state.is_final() {
                    return view;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {} never finished", submitted.id);
    }

    fn key(s: &str) -> [u8; 32] {
        digest(&[s.as_bytes()])
    }

    #[test]
    fn replay_cache_refuses_repeats_and_forgets_after_the_ttl() {
        let mut r = Replay::new(REPLAY_TTL);
        let t0 = Instant::now();
        assert!(r.insert(key("a"), t0));
        assert!(!r.insert(key("a"), t0 + Duration::from_secs(60)));
        assert!(r.contains(&key("a"), t0 + Duration::from_secs(60)));
        assert!(!r.contains(&key("a"), t0 + REPLAY_TTL));
        assert!(r.insert(key("a"), t0 + REPLAY_TTL + Duration::from_secs(1)));
    }

    #[test]
    fn resumed_work_comes_from_the_current_hook_config() {
        let yaml = r#"
hooks:
  - name: deploy
    kind: generic
    token_file: /dev/null
    allow: { tag: "latest" }
    action: { command: ["deploy", "--now"] }
"#;
        let config = config::Config::parse(std::path::Path::new("t.yml"), yaml).expect("config");
        let resolve = resolver(&config);
        let facts = Facts {
            hook: "deploy".into(),
            tag: Some("latest".into()),
            ..Facts::default()
        };
        assert_eq!(
            resolve("deploy", &facts),
            Ok(jobs::Work::Command {
                argv: vec!["deploy".into(), "--now".into()]
            })
        );
        let err = resolve("gone", &facts).expect_err("unknown hook");
        assert!(err.contains("no longer configured"), "{err}");
        let stale = Facts {
            tag: Some("old".into()),
            ..facts
        };
        let err = resolve("deploy", &stale).expect_err("refused by the rule");
        assert!(err.contains("tag"), "{err}");
    }

    #[test]
    fn replay_cache_stays_bounded() {
        let mut r = Replay::new(REPLAY_TTL);
        let t0 = Instant::now();
        for i in 0..REPLAY_CAP + 50 {
            assert!(r.insert(key(&i.to_string()), t0));
        }
        assert!(r.seen.len() <= REPLAY_CAP);
        assert!(r.order.len() <= REPLAY_CAP);
        // The oldest went first; the newest are still refused.
        assert!(!r.contains(&key("0"), t0));
        assert!(r.contains(&key(&(REPLAY_CAP + 49).to_string()), t0));
    }

    #[test]
    fn a_zero_replay_window_remembers_nothing() {
        let mut r = Replay::new(Duration::ZERO);
        let t0 = Instant::now();
        assert!(r.insert(key("a"), t0));
        assert!(r.insert(key("a"), t0));
        assert!(!r.contains(&key("a"), t0));
        assert!(r.seen.is_empty());
    }

    #[test]
    fn a_timestamp_is_fresh_only_as_plain_seconds_within_the_skew() {
        let now = 1_700_000_000;
        let skew = MAX_SKEW.as_secs() as i64;
        assert!(fresh(&now.to_string(), now));
        assert!(fresh(&(now - skew).to_string(), now));
        assert!(fresh(&(now + skew).to_string(), now));
        assert!(!fresh(&(now - skew - 1).to_string(), now));
        assert!(!fresh(&(now + skew + 1).to_string(), now));
        for bad in [
            "",
            "+1700000000",
            "-1",
            "1700000000.5",
            " 1700000000",
            "1e9",
            "9999999999999",
        ] {
            assert!(!fresh(bad, now), "{bad:?}");
        }
    }

    struct Map(Vec<(&'static str, String)>);

    impl Headers for Map {
        fn header(&self, name: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str())
        }
        fn query_token(&self) -> Option<&str> {
            None
        }
    }

    fn generic_hook(dir: &std::path::Path) -> Hook {
        let secret = dir.join("secret");
        let token = dir.join("token");
        std::fs::write(&secret, "s3cret").expect("write");
        std::fs::write(&token, "t0ken").expect("write");
        let yaml = format!(
            "hooks:\n  - name: ci\n    kind: generic\n    secret_file: {}\n    token_file: {}\n    action: update-services\n",
            secret.display(),
            token.display()
        );
        let config = config::Config::parse(std::path::Path::new("t.yml"), &yaml).expect("config");
        Hook::load(&config.hooks[0]).expect("hook")
    }

    #[test]
    fn the_signature_of_a_generic_hook_covers_its_timestamp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hook = generic_hook(dir.path());
        let body = br#"{"image":"x/y"}"#;
        let ts = unix_now().to_string();
        let signed = |ts: &str, sig: String| {
            Map(vec![
                (TIMESTAMP_HEADER, ts.to_owned()),
                (SIGNATURE_HEADER, sig),
            ])
        };
        assert!(hook.verify(&signed(&ts, sign_timestamped(b"s3cret", &ts, body)), body));
        let other = (unix_now() - 1).to_string();
        assert!(
            !hook.verify(
                &signed(&other, sign_timestamped(b"s3cret", &ts, body)),
                body
            ),
            "a timestamp changed after signing"
        );
        assert!(
            !hook.verify(&signed(&ts, sign(b"s3cret", body)), body),
            "a signature over the body alone"
        );
        let no_ts = Map(vec![(
            SIGNATURE_HEADER,
            sign_timestamped(b"s3cret", &ts, body),
        )]);
        assert!(!hook.verify(&no_ts, body));
    }

    #[test]
    fn replays_are_keyed_by_what_each_proof_makes_unique() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hook = generic_hook(dir.path());
        let body = br#"{"image":"x/y"}"#;
        let token = Map(vec![(TOKEN_HEADER, "t0ken".to_owned())]);
        let signed_at = |ts: &str| {
            Map(vec![
                (TIMESTAMP_HEADER, ts.to_owned()),
                (SIGNATURE_HEADER, sign_timestamped(b"s3cret", ts, body)),
            ])
        };
        let (m, by_token) = hook.replay_key(&token, None, body);
        assert!(matches!(m, Memory::Accepted));
        assert_eq!(by_token, hook.replay_key(&token, None, body).1);
        assert_ne!(by_token, hook.replay_key(&token, None, b"{}").1);
        let (m, first) = hook.replay_key(&signed_at("1700000000"), None, body);
        assert!(matches!(m, Memory::Signed));
        assert_ne!(
            first,
            hook.replay_key(&signed_at("1700000001"), None, body).1,
            "the same body signed again later is a new request"
        );
        assert_ne!(
            hook.replay_key(&token, Some("d1"), body).1,
            hook.replay_key(&token, Some("d2"), body).1
        );
    }

    #[tokio::test]
    async fn gitea_gitlab_and_bitbucket_pushes_are_verified_before_they_become_a_sync() {
        use crate::jobs::tests::FakeRunner;
        use crate::jobs::{JobState, Work};
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("{text}\n")).expect("write");
            p.display().to_string()
        };
        let yaml = format!(
            "hooks:\n\
             \x20 - {{ name: tea, kind: forgejo, secret_file: {}, quiet: 0s, action: sync-stacks }}\n\
             \x20 - {{ name: lab, kind: gitlab, token_file: {}, quiet: 0s, action: sync-stacks }}\n\
             \x20 - {{ name: bb, kind: bitbucket, secret_file: {}, quiet: 0s, action: sync-stacks }}\n",
            write("tea", "tea-secret"),
            write("lab", "lab-token"),
            write("bb", "bb-secret"),
        );
        let config = config::Config::parse(std::path::Path::new("t.yml"), &yaml).expect("config");
        let (_, role) = watch::channel(Role::Standalone);
        let service = super::intake(
            &config,
            FakeRunner::new(JobState::Completed),
            Journal::Memory,
            role,
            CancellationToken::new(),
        )
        .await
        .expect("service");
        let commit = "a".repeat(40);
        let send = |hook: &'static str, headers: Vec<(&'static str, String)>, body: String| {
            let service = service.clone();
            async move {
                let hook = service.admit(hook, None).expect("hook");
                let headers = Map(headers);
                service.verify(&hook, &headers, body.as_bytes())?;
                service.accept(&hook, &headers, body.as_bytes()).await
            }
        };
        let work_of = |accepted: &Accepted| match accepted {
            Accepted::Job(s) => service
                .jobs()
                .get(&s.id.to_string())
                .map(|v| (v.work, v.facts)),
            _ => None,
        };
        let sync = |repository: &str, branch: &str| Work::SyncStacks {
            repository: repository.into(),
            branch: branch.into(),
        };

        // Forgejo: its own header names, the bare hex HMAC of the body.
        let body = format!(
            r#"{{"ref":"refs/heads/main","after":"{commit}","repository":{{"full_name":"lab/web"}}}}"#
        );
        let hex = sign(b"tea-secret", body.as_bytes()).replace("sha256=", "");
        let tea = |sig: &str, delivery: &str| {
            vec![
                ("x-forgejo-event", "push".to_owned()),
                ("x-forgejo-delivery", delivery.to_owned()),
                ("x-forgejo-signature", sig.to_owned()),
            ]
        };
        let got = send("tea", tea(&hex, "d1"), body.clone())
            .await
            .expect("accepted");
        let (work, facts) = work_of(&got).expect("job");
        assert_eq!(work, sync("lab/web", "main"));
        assert_eq!(facts.after.as_deref(), Some(commit.as_str()));
        assert_eq!(
            send("tea", tea(&hex, "d2"), body.clone()).await,
            Ok(Accepted::Duplicate),
            "the same push under a new delivery id"
        );
        let wrong = sign(b"other", body.as_bytes()).replace("sha256=", "");
        assert_eq!(
            send("tea", tea(&wrong, "d3"), body.clone()).await,
            Err(Reject::Unauthorized)
        );
        assert_eq!(
            send("tea", tea(&format!("sha256={hex}"), "d4"), body.clone()).await,
            Err(Reject::Unauthorized),
            "Gitea's signature is bare hex"
        );
        let other = body.replace("main", "next");
        let other_hex = sign(b"tea-secret", other.as_bytes()).replace("sha256=", "");
        let mut no_event_other = tea(&other_hex, "d5");
        no_event_other.remove(0);
        assert_eq!(
            send("tea", no_event_other, other).await,
            Err(Reject::BadRequest("missing X-Gitea-Event"))
        );

        // GitLab: the shared token; `Push Hook` is a push, a tag push is not acted on.
        let body = format!(
            r#"{{"ref":"refs/heads/main","after":"{commit}","checkout_sha":"{commit}","project":{{"path_with_namespace":"group/sub/web"}}}}"#
        );
        let lab = |token: &str, event: &str| {
            vec![
                ("x-gitlab-token", token.to_owned()),
                ("x-gitlab-event", event.to_owned()),
            ]
        };
        assert_eq!(
            send("lab", lab("wrong", "Push Hook"), body.clone()).await,
            Err(Reject::Unauthorized)
        );
        assert_eq!(
            send(
                "lab",
                vec![("x-gitlab-event", "Push Hook".into())],
                body.clone()
            )
            .await,
            Err(Reject::Unauthorized)
        );
        assert_eq!(
            send("lab", lab("lab-token", "Tag Push Hook"), body.clone()).await,
            Ok(Accepted::Ignored)
        );
        let got = send("lab", lab("lab-token", "Push Hook"), body.clone())
            .await
            .expect("accepted");
        assert_eq!(work_of(&got).expect("job").0, sync("group/sub/web", "main"));
        assert_eq!(
            send("lab", lab("lab-token", "Push Hook"), body).await,
            Ok(Accepted::Duplicate)
        );

        // Bitbucket Cloud: `X-Hub-Signature: sha256=HEX`, required here.
        let body = format!(
            r#"{{"repository":{{"full_name":"team/web"}},"push":{{"changes":[{{"new":{{"type":"branch","name":"prod","target":{{"hash":"{commit}"}}}}}}]}}}}"#
        );
        let bb = |sig: Option<String>| {
            let mut h = vec![
                ("x-event-key", "repo:push".to_owned()),
                ("x-request-uuid", "r1".to_owned()),
            ];
            if let Some(sig) = sig {
                h.push(("x-hub-signature", sig));
            }
            h
        };
        assert_eq!(
            send("bb", bb(None), body.clone()).await,
            Err(Reject::Unauthorized)
        );
        assert_eq!(
            send(
                "bb",
                bb(Some(sign(b"tea-secret", body.as_bytes()))),
                body.clone()
            )
            .await,
            Err(Reject::Unauthorized)
        );
        let got = send(
            "bb",
            bb(Some(sign(b"bb-secret", body.as_bytes()))),
            body.clone(),
        )
        .await
        .expect("accepted");
        assert_eq!(work_of(&got).expect("job").0, sync("team/web", "prod"));
    }

    #[test]
    fn the_cluster_key_and_the_operator_token_are_redacted_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key");
        let token = dir.path().join("ops");
        std::fs::write(&key, "the-cluster-key\n").expect("write");
        std::fs::write(&token, "the-ops-token\n").expect("write");
        let yaml = format!(
            "cluster: {{ key_file: {} }}\nhttp: {{ ops: {{ token_file: {} }} }}\n",
            key.display(),
            token.display()
        );
        let config = config::Config::parse(std::path::Path::new("t.yml"), &yaml).expect("config");
        let loaded = Loaded::from_config(&config).expect("loaded");
        assert_eq!(
            loaded
                .redactor
                .clean("k=the-cluster-key t=the-ops-token", 100),
            "k=[redacted] t=[redacted]"
        );
    }

    #[test]
    fn the_acme_binding_key_is_redacted_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let eab = dir.path().join("eab");
        std::fs::write(&eab, "the-acme-hmac-key\n").expect("write");
        let yaml = format!(
            "targets:\n  - name: nginx\n    template: builtin:nginx\n    output: /tmp/x.conf\ncertificates:\n  eab: {{ kid: k1, hmac_key_file: {} }}\n",
            eab.display()
        );
        let config = config::Config::parse(std::path::Path::new("t.yml"), &yaml).expect("config");
        let loaded = Loaded::from_config(&config).expect("loaded");
        assert_eq!(
            loaded.redactor.clean("key=the-acme-hmac-key", 100),
            "key=[redacted]"
        );
    }

    #[tokio::test]
    async fn finished_jobs_show_a_bounded_tail_without_loaded_secrets() {
        use crate::jobs::tests::FakeRunner;
        use crate::jobs::{JobState, Outcome, ServiceResult};
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("{text}\n")).expect("write");
            p.display().to_string()
        };
        let yaml = format!(
            "hooks:\n  - name: ci\n    kind: generic\n    secret_file: {}\n    token_file: {}\n    action: update-services\n\
             registries:\n  - {{ address: r.example.com, username: me, password_file: {} }}\n",
            write("secret", "hmac-secret-value"),
            write("token", "the-hook-token"),
            write("password", "registry-password"),
        );
        let config = config::Config::parse(std::path::Path::new("t.yml"), &yaml).expect("config");
        let leak = "env: KEY=hmac-secret-value TOKEN=the-hook-token; login registry-password";
        let runner = Arc::new(FakeRunner {
            runs: Mutex::default(),
            outcome: Outcome {
                state: JobState::Failed,
                message: Some(format!("{}{leak}", "x".repeat(10_000))),
                services: vec![ServiceResult {
                    service: "web".into(),
                    from_image: None,
                    to_image: None,
                    outcome: JobState::Failed,
                    message: leak.into(),
                }],
                exit_code: Some(1),
                log_tail: Some(leak.repeat(1000)),
            },
            delay: Duration::ZERO,
        });
        let (_, role) = watch::channel(Role::Standalone);
        let service = super::intake(
            &config,
            runner,
            Journal::Memory,
            role,
            CancellationToken::new(),
        )
        .await
        .expect("service");
        let view = run_update(&service, "ci").await;
        assert_eq!(view.state, JobState::Failed);
        let text = serde_json::to_string(&view).expect("json");
        for secret in ["hmac-secret-value", "the-hook-token", "registry-password"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        let message = view.message.expect("message");
        assert!(
            message.len() <= crate::redact::MESSAGE_MAX,
            "{}",
            message.len()
        );
        assert!(message.ends_with("login [redacted]"), "{message}");
        assert!(view.log_tail.expect("tail").len() <= crate::redact::LOG_TAIL_MAX);
        assert_eq!(
            view.services[0].message,
            "env: KEY=[redacted] TOKEN=[redacted]; login [redacted]"
        );
    }

    #[tokio::test]
    async fn secrets_of_hooks_added_by_a_reload_are_cut_out_of_job_output() {
        use crate::jobs::tests::FakeRunner;
        use crate::jobs::{JobState, Outcome};
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("{text}\n")).expect("write");
            p.display().to_string()
        };
        let hook = |name: &str, secret: &str, token: &str| {
            format!(
                "  - name: {name}\n    kind: generic\n    secret_file: {}\n    token_file: {}\n    action: update-services\n",
                write(&format!("{name}-secret"), secret),
                write(&format!("{name}-token"), token),
            )
        };
        let parse = |yaml: &str| {
            config::Config::parse(std::path::Path::new("t.yml"), yaml).expect("config")
        };
        let at_start = parse(&format!(
            "hooks:\n{}",
            hook("ci", "first-secret", "first-token")
        ));
        let reloaded = parse(&format!(
            "hooks:\n{}{}",
            hook("ci", "first-secret", "first-token"),
            hook("cd", "reloaded-secret", "reloaded-token")
        ));
        let leak = "KEY=reloaded-secret TOKEN=reloaded-token OLD=first-secret";
        let runner = Arc::new(FakeRunner {
            runs: Mutex::default(),
            outcome: Outcome {
                state: JobState::Failed,
                message: Some(leak.into()),
                services: vec![],
                exit_code: Some(1),
                log_tail: Some(leak.into()),
            },
            delay: Duration::ZERO,
        });
        let (_, role) = watch::channel(Role::Standalone);
        let service = super::intake(
            &at_start,
            runner,
            Journal::Memory,
            role,
            CancellationToken::new(),
        )
        .await
        .expect("service");
        service.replace_hooks(&reloaded.hooks).expect("reload");
        let view = run_update(&service, "cd").await;
        assert_eq!(view.state, JobState::Failed);
        assert_eq!(
            view.message.as_deref(),
            Some("KEY=[redacted] TOKEN=[redacted] OLD=[redacted]")
        );
        let text = serde_json::to_string(&view).expect("json");
        for secret in ["reloaded-secret", "reloaded-token", "first-secret"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
    }
}
