//! The YAML configuration file: what to watch, render and update.
//!
//! Everything is validated once, here, into typed values: durations, full-match regexes
//! and selectors. A bad file is refused with its path, line and the reason, so the daemon
//! never starts half-configured. Runtime knobs (log format, listen address overrides) are
//! CLI flags instead; secrets are always read from files named here, never inlined.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub http: Http,
    /// Full resync period: the safety net behind event-driven updates.
    #[serde(default = "default_resync", with = "humantime_serde")]
    pub resync: Duration,
    #[serde(default)]
    pub targets: Vec<Target>,
    #[serde(default)]
    pub hooks: Vec<Hook>,
    #[serde(default)]
    pub registries: Vec<Registry>,
    #[serde(default)]
    pub jobs: Jobs,
    #[serde(default)]
    pub cluster: Cluster,
}

fn default_resync() -> Duration {
    Duration::from_secs(60)
}

/// The public listener (webhooks, `/healthz`, `/readyz`) and its limits. Every limit is
/// there so one hostile client cannot take memory or sockets from the rest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest accepted webhook body; GitHub caps payloads at 25 MB, the ones we act on are small.
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// Bytes of webhook bodies held at once, over all requests (beyond: 503), so a crowd
    /// of stalled large bodies cannot take more memory than this. At least `max_body`.
    #[serde(default = "default_body_budget")]
    pub body_budget: usize,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A connection that has not sent a complete request head within this is closed.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection that moves no byte either way for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections, in all and from one source address.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Requests being handled at once, in all and from one source address (beyond: 503).
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    #[serde(default = "default_max_requests_per_source")]
    pub max_requests_per_source: usize,
    /// Failed signature or token checks allowed per source address and minute (beyond: 429
    /// before the body is read); a forged flood does not spend a hook's own `rate`.
    #[serde(default = "default_auth_failures_per_minute")]
    pub auth_failures_per_minute: u32,
    /// The operator endpoints: status page, `/jobs`, `/metrics`.
    #[serde(default)]
    pub ops: Ops,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: default_listen(),
            max_body: default_max_body(),
            body_budget: default_body_budget(),
            request_timeout: default_request_timeout(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_source: default_max_connections_per_source(),
            max_requests: default_max_requests(),
            max_requests_per_source: default_max_requests_per_source(),
            auth_failures_per_minute: default_auth_failures_per_minute(),
            ops: Ops::default(),
        }
    }
}

/// The private listener of the operator endpoints. Loopback by default: what jobs ran and
/// how they ended is nobody else's business. Bind it elsewhere (for Prometheus on an
/// overlay network) only with `token_file`, or behind a network you trust.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ops {
    #[serde(default = "default_ops_listen")]
    pub listen: SocketAddr,
    /// When set, every operator request needs `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for Ops {
    fn default() -> Self {
        Ops {
            listen: default_ops_listen(),
            token_file: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn default_ops_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9091))
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_body_budget() -> usize {
    8 * 1024 * 1024
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    256
}
fn default_max_connections_per_source() -> usize {
    32
}
fn default_max_requests() -> usize {
    64
}
fn default_max_requests_per_source() -> usize {
    16
}
fn default_auth_failures_per_minute() -> u32 {
    30
}

/// Cluster mode: the agent API every instance serves so the controller can put files in
/// place on other nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Where the agent API listens; peers reach it on a network they share.
    #[serde(default = "default_agent_listen")]
    pub listen: SocketAddr,
    /// The key shared by all instances (mount a Swarm secret here). Without this file the
    /// agent API is off and every target is delivered locally.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// How far an agent request's timestamp may be from the agent's clock.
    #[serde(default = "default_max_skew", with = "humantime_serde")]
    pub max_skew: Duration,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            listen: default_agent_listen(),
            key_file: default_key_file(),
            max_skew: default_max_skew(),
        }
    }
}

fn default_agent_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9092))
}
fn default_key_file() -> PathBuf {
    PathBuf::from("/run/secrets/drover-cluster-key")
}
fn default_max_skew() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    /// `builtin:NAME` or a path to a Tera file.
    pub template: String,
    pub output: PathBuf,
    /// The network whose task IPs the built-in templates route to.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub debounce: Debounce,
    #[serde(default)]
    pub check: Option<Action>,
    #[serde(default)]
    pub notify: Vec<Action>,
    /// Who writes the file: see [`Delivery`].
    #[serde(default)]
    pub delivery: Delivery,
    /// The source networks, besides loopback, the built-in nginx template lets into a
    /// `routing-private-context` location.
    #[serde(default)]
    pub private_networks: PrivateNetworks,
}

/// The networks that count as private (see [`Target::private_networks`]).
///
/// The default is a home LAN's ranges, and deliberately not 10.0.0.0/8:
/// that is Swarm's default address pool, so the ingress network (10.0.0.0/24) and every
/// overlay network live there, and a request through the routing mesh arrives from an
/// ingress address whoever sent it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct PrivateNetworks(pub Vec<Cidr>);

/// The default of [`PrivateNetworks`].
pub const DEFAULT_PRIVATE_NETWORKS: &[&str] = &["192.168.0.0/16", "172.16.0.0/12"];

impl Default for PrivateNetworks {
    fn default() -> Self {
        PrivateNetworks(
            DEFAULT_PRIVATE_NETWORKS
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
        )
    }
}

impl PrivateNetworks {
    /// Refuses a network with host bits set (`192.168.1.5/16`): nginx would silently widen
    /// it, and the operator most likely meant something narrower or a single address.
    fn validate(&self) -> std::result::Result<(), String> {
        for c in &self.0 {
            let network = c.network();
            if network != c.addr {
                return Err(format!(
                    "private_networks: {}/{} has host bits set (the network is {network}/{})",
                    c.addr, c.prefix, c.prefix
                ));
            }
        }
        Ok(())
    }
}

/// How a target's file reaches its consumer (see `cluster::delivery`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Agents when drover runs as a Swarm service with the cluster key, else local.
    #[default]
    Auto,
    /// The controller writes the file itself (same node, or a shared volume).
    Local,
    /// The agent on every node that runs a task of the service the steps name.
    Agents,
}

impl Target {
    /// A target with no check, no notify, default debounce and delivery; callers add the rest.
    pub fn new(name: &str, template: &str, output: impl Into<PathBuf>) -> Target {
        Target {
            name: name.into(),
            template: template.into(),
            output: output.into(),
            network: None,
            debounce: Debounce::default(),
            check: None,
            notify: Vec::new(),
            delivery: Delivery::default(),
            private_networks: PrivateNetworks::default(),
        }
    }

    pub fn builtin(&self) -> Option<&str> {
        self.template.strip_prefix("builtin:")
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Debounce {
    #[serde(default = "default_debounce_min", with = "humantime_serde")]
    pub min: Duration,
    #[serde(default = "default_debounce_max", with = "humantime_serde")]
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            min: default_debounce_min(),
            max: default_debounce_max(),
        }
    }
}

fn default_debounce_min() -> Duration {
    Duration::from_millis(250)
}
fn default_debounce_max() -> Duration {
    Duration::from_secs(2)
}

/// Which containers an action reaches: those of a Swarm service, one container by name,
/// or every container carrying a label (`key=value` or just `key`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
}

impl Selector {
    fn is_valid(&self) -> bool {
        [&self.service, &self.container, &self.label]
            .iter()
            .filter(|s| s.is_some())
            .count()
            == 1
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.service, &self.container, &self.label) {
            (Some(s), _, _) => write!(f, "service {s}"),
            (_, Some(c), _) => write!(f, "container {c}"),
            (_, _, Some(l)) => write!(f, "label {l}"),
            _ => write!(f, "nothing"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    pub command: Vec<String>,
}

impl ExecSpec {
    pub fn on(&self) -> Selector {
        Selector {
            service: self.service.clone(),
            container: self.container.clone(),
            label: self.label.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignalSpec {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default = "default_signal")]
    pub signal: String,
}

impl SignalSpec {
    pub fn on(&self) -> Selector {
        Selector {
            service: self.service.clone(),
            container: self.container.clone(),
            label: self.label.clone(),
        }
    }
}

fn default_signal() -> String {
    "HUP".into()
}

/// A check or notify step. Exactly one key per list entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "ActionRepr")]
pub enum Action {
    /// Run a command inside the selected container(s); non-zero exit fails the step.
    Exec(ExecSpec),
    /// Send a signal to the selected container(s).
    Signal(SignalSpec),
    /// Force-update a Swarm service, or restart the selected container(s).
    Restart(Selector),
    /// Run a local command (argv, no shell).
    Command(Vec<String>),
}

/// The YAML shape of [`Action`]: a one-key map (serde_yaml_ng only takes YAML tags for enums).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRepr {
    #[serde(default)]
    exec: Option<ExecSpec>,
    #[serde(default)]
    signal: Option<SignalSpec>,
    #[serde(default)]
    restart: Option<Selector>,
    #[serde(default)]
    command: Option<Vec<String>>,
}

impl TryFrom<ActionRepr> for Action {
    type Error = String;
    fn try_from(r: ActionRepr) -> Result<Action, String> {
        let mut found: Vec<Action> = Vec::new();
        found.extend(r.exec.map(Action::Exec));
        found.extend(r.signal.map(Action::Signal));
        found.extend(r.restart.map(Action::Restart));
        found.extend(r.command.map(Action::Command));
        match found.len() {
            1 => Ok(found.remove(0)),
            _ => Err("a step has exactly one of exec, signal, restart or command".into()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub name: String,
    pub kind: HookKind,
    /// Docker Hub and generic hooks: the shared token (`?token=` or `X-Drover-Token`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// GitHub and generic hooks: the HMAC-SHA256 key.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// GitHub hooks: one secret per repository, a map from `owner/name` (or a full-match
    /// pattern) to a secret file. A delivery is checked against the secret of the
    /// repository its payload names (an exact key first, then the first matching pattern
    /// in file order, then `secret_file`), never against the others.
    #[serde(default)]
    pub secrets: RepoSecrets,
    /// GitHub hooks: accept the legacy `X-Hub-Signature` (HMAC-SHA1) when a delivery has
    /// no `X-Hub-Signature-256`.
    #[serde(default = "default_true")]
    pub accept_sha1: bool,
    /// GitHub event names to act on (default `[push]`; ping is always answered, never acted
    /// on). GitHub does not sign the event header, so the list must name what to act on:
    /// an empty list is refused.
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Full-match rules on payload facts; the names a kind knows are listed in
    /// `hooks::facts` (Docker Hub: repository, tag, image, owner, namespace, pusher;
    /// GitHub: event, repository, ref, sender, clone_url, commits, commit_ids,
    /// head_commit_message; generic: repository, tag, image). Others are refused at load.
    #[serde(default)]
    pub allow: BTreeMap<String, FullMatch>,
    /// Source networks allowed to call this hook; empty means any.
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    /// Coalescing window per repo:tag.
    #[serde(default = "default_quiet", with = "humantime_serde")]
    pub quiet: Duration,
    /// Requests per second allowed on this hook (token bucket, burst of the same size).
    #[serde(default = "default_rate")]
    pub rate: u32,
    /// Docker Hub hooks and token requests of generic hooks: how long the SHA-256 of an
    /// accepted body is remembered, so the same body again gets no second job (`0s`: not
    /// remembered). GitHub deliveries are remembered by id, signed generic requests by
    /// their timestamp, so it is refused on a GitHub hook. Default [`DEFAULT_REPLAY_WINDOW`].
    #[serde(default, with = "humantime_serde")]
    pub replay_window: Option<Duration>,
    pub action: HookAction,
}

/// How long a token hook remembers an accepted body when `replay_window` is not set.
pub const DEFAULT_REPLAY_WINDOW: Duration = Duration::from_secs(3600);

impl Hook {
    /// `replay_window`, or its default.
    pub fn replay_window(&self) -> Duration {
        self.replay_window.unwrap_or(DEFAULT_REPLAY_WINDOW)
    }
}

fn default_events() -> Vec<String> {
    vec!["push".to_owned()]
}
fn default_quiet() -> Duration {
    Duration::from_secs(10)
}
fn default_true() -> bool {
    true
}

/// One entry of a hook's `secrets` map.
#[derive(Debug, Clone)]
pub struct RepoSecret {
    /// The key as written: a repository's full name or a pattern.
    pub repository: String,
    pub pattern: FullMatch,
    pub file: PathBuf,
}

/// `secrets:` in file order (order decides which pattern wins).
#[derive(Debug, Clone, Default)]
pub struct RepoSecrets(pub Vec<RepoSecret>);

impl<'de> Deserialize<'de> for RepoSecrets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RepoSecrets;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map from repository (owner/name or a pattern) to a secret file")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RepoSecrets, A::Error> {
                let mut out = Vec::new();
                while let Some((repository, file)) = map.next_entry::<String, PathBuf>()? {
                    let pattern = FullMatch::new(&repository).map_err(serde::de::Error::custom)?;
                    out.push(RepoSecret {
                        repository,
                        pattern,
                        file,
                    });
                }
                Ok(RepoSecrets(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A one-off container a hook runs (the `container` action). Request data reaches it only
/// as `DROVER_*` environment variables, never in argv.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// Pulled when the engine does not have it (with the `registries` credentials).
    pub image: String,
    /// argv; empty runs the image's default command.
    #[serde(default)]
    pub command: Vec<String>,
    /// Fixed variables, set before the facts (a fact never overrides one of these).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `SOURCE:TARGET[:ro]`: a host path or a volume name, as `docker run -v` takes them.
    #[serde(default)]
    pub mounts: Vec<String>,
    /// Networks to attach (overlay networks must be attachable).
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The container is killed and the job failed after this long.
    #[serde(default = "default_container_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Lines of output kept on the job.
    #[serde(default = "default_log_lines")]
    pub log_lines: usize,
    /// Let runs of this hook overlap (by default one runs at a time, the others wait).
    #[serde(default)]
    pub concurrent: bool,
}

fn default_container_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_log_lines() -> usize {
    50
}
fn default_rate() -> u32 {
    50
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    Dockerhub,
    Github,
    Generic,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "HookActionRepr")]
pub enum HookAction {
    /// Roll every service running the pushed repo:tag to its new digest.
    UpdateServices,
    /// Force-update one named service.
    RestartService(String),
    /// Run a local command with payload facts as `DROVER_*` environment variables.
    Command(Vec<String>),
    /// Run a one-off container with payload facts as `DROVER_*` environment variables.
    Container(ContainerSpec),
}

enum HookActionRepr {
    Name(String),
    Map(Box<HookActionMap>),
}

// Not `#[serde(untagged)]`: that hides why a map did not fit (an unknown key in a
// container spec) behind "did not match any variant".
impl<'de> Deserialize<'de> for HookActionRepr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_yaml_ng::Value::deserialize(d)?;
        match value {
            serde_yaml_ng::Value::String(name) => Ok(HookActionRepr::Name(name)),
            other => HookActionMap::deserialize(other)
                .map(|m| HookActionRepr::Map(Box::new(m)))
                .map_err(|e| serde::de::Error::custom(format!("action: {e}"))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HookActionMap {
    #[serde(default)]
    restart_service: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    container: Option<ContainerSpec>,
}

impl TryFrom<HookActionRepr> for HookAction {
    type Error = String;
    fn try_from(r: HookActionRepr) -> Result<HookAction, String> {
        let m = match r {
            HookActionRepr::Name(n) if n == "update-services" => {
                return Ok(HookAction::UpdateServices);
            }
            HookActionRepr::Name(n) => {
                return Err(format!(
                    "unknown action {n:?}: use update-services, {{restart-service: NAME}}, {{command: [argv]}} or {{container: {{image: ...}}}}"
                ));
            }
            HookActionRepr::Map(m) => *m,
        };
        match m {
            HookActionMap {
                restart_service: Some(s),
                command: None,
                container: None,
            } => Ok(HookAction::RestartService(s)),
            HookActionMap {
                restart_service: None,
                command: Some(c),
                container: None,
            } => Ok(HookAction::Command(c)),
            HookActionMap {
                restart_service: None,
                command: None,
                container: Some(c),
            } => Ok(HookAction::Container(c)),
            _ => Err("an action has exactly one of restart-service, command or container".into()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Registry host as it appears in image names (`127.0.0.1:5000`, `docker.io`).
    pub address: String,
    pub username: String,
    pub password_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jobs {
    /// Pending jobs beyond this answer 503.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Finished jobs kept for `GET /jobs`.
    #[serde(default = "default_history")]
    pub history: usize,
    /// Journal outside Swarm (inside Swarm, pending jobs live in Swarm config objects).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Give up following an update after this long.
    #[serde(default = "default_update_timeout", with = "humantime_serde")]
    pub update_timeout: Duration,
    /// Name of this deployment's job journal in Swarm (the `drover.job` label value):
    /// deployments sharing one Swarm need different names, or each resumes the other's
    /// pending jobs.
    #[serde(default = "default_journal")]
    pub journal: String,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs {
            queue: default_queue(),
            history: default_history(),
            state_file: None,
            update_timeout: default_update_timeout(),
            journal: default_journal(),
        }
    }
}

fn default_queue() -> usize {
    64
}
fn default_history() -> usize {
    100
}
fn default_update_timeout() -> Duration {
    Duration::from_secs(600)
}

fn default_journal() -> String {
    "drover".into()
}

/// A journal name becomes a label value and part of log lines: short and plain.
pub fn check_journal(name: &str) -> std::result::Result<(), String> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if (1..=32).contains(&name.len()) && plain {
        Ok(())
    } else {
        Err(format!(
            "jobs.journal {name:?} must be 1-32 characters of [a-z0-9-]"
        ))
    }
}

/// A regex that must match the whole value: `latest` does not accept `latest-foo`
/// (webhook-proxy's `re.match` did).
#[derive(Debug, Clone)]
pub struct FullMatch(pub Regex);

impl FullMatch {
    pub fn new(raw: &str) -> std::result::Result<FullMatch, String> {
        Regex::new(&format!("^(?:{raw})$"))
            .map(FullMatch)
            .map_err(|e| format!("invalid regex {raw:?}: {e}"))
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.0.is_match(value)
    }
}

impl<'de> Deserialize<'de> for FullMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        FullMatch::new(&raw).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl Cidr {
    /// The address with its host bits cleared.
    pub fn network(&self) -> std::net::IpAddr {
        use std::net::IpAddr::*;
        match self.addr {
            V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                V4((u32::from(a) & mask).into())
            }
            V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                V6((u128::from(a) & mask).into())
            }
        }
    }
}

/// `ADDR/PREFIX`, or the bare address for a single host: the form nginx's `allow` takes.
impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let bad = || format!("invalid CIDR {raw:?}");
        let (addr, prefix) = raw.split_once('/').unwrap_or((raw, ""));
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix.parse::<u8>().map_err(|_| bad())?
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            Error::Parse {
                path: path.to_owned(),
                line,
                column,
                reason: e.to_string(),
            }
        })?;
        config.validate().map_err(|reason| {
            // Semantic errors point at the line of the offending name when we can find it.
            match find_line(text, &reason.1) {
                Some(line) => Error::Parse {
                    path: path.to_owned(),
                    line,
                    column: 1,
                    reason: reason.0,
                },
                None => Error::Invalid {
                    path: path.to_owned(),
                    reason: reason.0,
                },
            }
        })?;
        config.check_rules(path, text)?;
        Ok(config)
    }

    /// Refuses an `allow` key the hook's kind never produces, pointing at the key itself:
    /// such a rule could never hold, and every request would be refused.
    fn check_rules(&self, path: &Path, text: &str) -> Result<()> {
        for h in &self.hooks {
            let known = h.kind.facts();
            let Some(key) = h.allow.keys().find(|k| !known.contains(&k.as_str())) else {
                continue;
            };
            let known = known.join(", ");
            let reason = format!(
                "hook {}: {:?} is not a fact of a {} hook (known: {known})",
                h.name,
                key,
                h.kind.as_str()
            );
            return Err(match locate_allow_key(text, &h.name, key) {
                Some((line, column)) => Error::Parse {
                    path: path.to_owned(),
                    line,
                    column,
                    reason,
                },
                None => Error::Invalid {
                    path: path.to_owned(),
                    reason,
                },
            });
        }
        Ok(())
    }

    /// Returns (reason, text to locate) for the first problem found.
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        self.check_bounds()?;
        let mut names = std::collections::HashSet::new();
        for t in &self.targets {
            let at = format!("name: {}", t.name);
            if !valid_name(&t.name) {
                return Err((
                    format!("target name {:?} must be [A-Za-z0-9_-]+", t.name),
                    at,
                ));
            }
            if !names.insert(t.name.clone()) {
                return Err((format!("target {:?} is defined twice", t.name), at));
            }
            if t.debounce.min > t.debounce.max {
                return Err((
                    format!("target {}: debounce min is larger than max", t.name),
                    at,
                ));
            }
            if let Some(name) = t.builtin() {
                if !BUILTIN_TEMPLATES.contains(&name) {
                    return Err((
                        format!("target {}: unknown built-in template {name:?}", t.name),
                        format!("builtin:{name}"),
                    ));
                }
            }
            for a in t.check.iter().chain(&t.notify) {
                a.validate()
                    .map_err(|r| (format!("target {}: {r}", t.name), at.clone()))?;
            }
            t.private_networks
                .validate()
                .map_err(|r| (format!("target {}: {r}", t.name), at.clone()))?;
        }
        let mut names = std::collections::HashSet::new();
        for h in &self.hooks {
            let at = format!("name: {}", h.name);
            if !valid_name(&h.name) {
                return Err((format!("hook name {:?} must be [A-Za-z0-9_-]+", h.name), at));
            }
            if !names.insert(h.name.clone()) {
                return Err((format!("hook {:?} is defined twice", h.name), at));
            }
            let need = match h.kind {
                HookKind::Dockerhub if h.token_file.is_none() => Some("token_file"),
                HookKind::Github if h.secret_file.is_none() && h.secrets.0.is_empty() => {
                    Some("secret_file or secrets")
                }
                HookKind::Generic if h.secret_file.is_none() && h.token_file.is_none() => {
                    Some("secret_file or token_file")
                }
                _ => None,
            };
            if let Some(field) = need {
                return Err((format!("hook {}: {field} is required", h.name), at));
            }
            if h.events.is_empty() {
                return Err((
                    format!("hook {}: events must name at least one event", h.name),
                    at,
                ));
            }
            if h.rate == 0 {
                return Err((format!("hook {}: rate must be at least 1", h.name), at));
            }
            if h.kind != HookKind::Github && !h.secrets.0.is_empty() {
                return Err((
                    format!(
                        "hook {}: per-repository secrets are for github hooks",
                        h.name
                    ),
                    at,
                ));
            }
            if let HookAction::Command(argv) = &h.action {
                if argv.is_empty() {
                    return Err((format!("hook {}: command is empty", h.name), at));
                }
            }
            if let HookAction::Container(c) = &h.action {
                c.validate()
                    .map_err(|r| (format!("hook {}: container: {r}", h.name), at.clone()))?;
            }
        }
        let h = &self.http;
        if h.ops.listen == h.listen && h.listen.port() != 0 {
            return Err((
                "http.ops.listen must differ from http.listen".into(),
                "listen:".into(),
            ));
        }
        if h.body_budget < h.max_body {
            return Err((
                "http.body_budget must be at least http.max_body".into(),
                "body_budget:".into(),
            ));
        }
        let zero = [
            ("max_body", h.max_body),
            ("max_connections", h.max_connections),
            ("max_connections_per_source", h.max_connections_per_source),
            ("max_requests", h.max_requests),
            ("max_requests_per_source", h.max_requests_per_source),
            (
                "auth_failures_per_minute",
                h.auth_failures_per_minute as usize,
            ),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err((
                format!("http.{name} must be at least 1"),
                format!("{name}:"),
            ));
        }
        for (name, d) in [
            ("request_timeout", h.request_timeout),
            ("header_timeout", h.header_timeout),
            ("idle_timeout", h.idle_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(3600) {
                return Err((
                    format!("http.{name} must be between 1ms and 1h"),
                    format!("{name}:"),
                ));
            }
        }
        if self.jobs.queue == 0 {
            return Err(("jobs.queue must be at least 1".into(), "queue:".into()));
        }
        Ok(())
    }
}

/// Bounds on every duration and size, so `check` refuses what `run` would choke on: a
/// duration added to an `Instant` must not overflow (that aborts the daemon), a period of
/// zero must not turn a loop into a busy one, and no size may let one request or one
/// queue take the memory of a small node.
mod bounds {
    use std::time::Duration;

    pub const RESYNC: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(24 * 3600));
    pub const DEBOUNCE: Duration = Duration::from_secs(3600);
    pub const QUIET: Duration = Duration::from_secs(24 * 3600);
    pub const REPLAY_WINDOW: Duration = Duration::from_secs(24 * 3600);
    pub const REQUEST_TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(3600));
    pub const UPDATE_TIMEOUT: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(7 * 24 * 3600));
    pub const MAX_BODY: usize = 64 * 1024 * 1024;
    pub const QUEUE: usize = 100_000;
    pub const HISTORY: usize = 100_000;
    pub const RATE: u32 = 1_000_000;

    /// `value` within `min..=max`, or why not, in the config's own duration syntax.
    pub fn duration(
        field: &str,
        value: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<(), String> {
        if value < min || value > max {
            return Err(format!(
                "{field} must be between {} and {} (got {})",
                humantime::format_duration(min),
                humantime::format_duration(max),
                humantime::format_duration(value)
            ));
        }
        Ok(())
    }

    pub fn size(field: &str, value: usize, min: usize, max: usize) -> Result<(), String> {
        if value < min || value > max {
            return Err(format!(
                "{field} must be between {min} and {max} (got {value})"
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Returns (reason, text to locate) for the first value out of its bounds.
    fn check_bounds(&self) -> std::result::Result<(), (String, String)> {
        use bounds::*;
        fn at(field: &'static str) -> impl Fn(String) -> (String, String) {
            move |r| (r, format!("{field}:"))
        }
        duration("resync", self.resync, RESYNC.0, RESYNC.1).map_err(at("resync"))?;
        let h = &self.http;
        size("http.max_body", h.max_body, 1, MAX_BODY).map_err(at("max_body"))?;
        duration(
            "http.request_timeout",
            h.request_timeout,
            REQUEST_TIMEOUT.0,
            REQUEST_TIMEOUT.1,
        )
        .map_err(at("request_timeout"))?;
        let j = &self.jobs;
        size("jobs.queue", j.queue, 1, QUEUE).map_err(at("queue"))?;
        size("jobs.history", j.history, 0, HISTORY).map_err(at("history"))?;
        check_journal(&j.journal).map_err(at("journal"))?;
        duration(
            "jobs.update_timeout",
            j.update_timeout,
            UPDATE_TIMEOUT.0,
            UPDATE_TIMEOUT.1,
        )
        .map_err(at("update_timeout"))?;
        for t in &self.targets {
            let at = |r: String| {
                (
                    format!("target {}: {r}", t.name),
                    format!("name: {}", t.name),
                )
            };
            duration("debounce.max", t.debounce.max, Duration::ZERO, DEBOUNCE).map_err(at)?;
        }
        for hook in &self.hooks {
            let at = |r: String| {
                (
                    format!("hook {}: {r}", hook.name),
                    format!("name: {}", hook.name),
                )
            };
            duration("quiet", hook.quiet, Duration::ZERO, QUIET).map_err(at)?;
            if let Some(window) = hook.replay_window {
                if hook.kind == HookKind::Github {
                    return Err(at("replay_window does not apply to GitHub hooks (their \
                                   deliveries are remembered by X-GitHub-Delivery for 24h)"
                        .into()));
                }
                duration("replay_window", window, Duration::ZERO, REPLAY_WINDOW).map_err(at)?;
            }
            if hook.rate > RATE {
                return Err(at(format!(
                    "rate must be at most {RATE} (got {})",
                    hook.rate
                )));
            }
            if let HookAction::RestartService(s) = &hook.action {
                if s.is_empty() {
                    return Err(at("restart-service names no service".into()));
                }
            }
        }
        Ok(())
    }
}

impl Action {
    fn validate(&self) -> std::result::Result<(), String> {
        let (on, argv) = match self {
            Action::Exec(e) => (Some(e.on()), Some(&e.command)),
            Action::Signal(s) => (Some(s.on()), None),
            Action::Restart(on) => (Some(on.clone()), None),
            Action::Command(argv) => (None, Some(argv)),
        };
        if let Some(on) = on {
            if !on.is_valid() {
                return Err("name exactly one of service, container or label".into());
            }
            // An empty name would match every container (a prefix or label filter of "").
            if [&on.service, &on.container, &on.label]
                .iter()
                .any(|s| s.as_deref().is_some_and(|v| v.trim().is_empty()))
            {
                return Err("service, container or label must not be empty".into());
            }
        }
        if argv.is_some_and(|a| a.is_empty()) {
            return Err("command is empty".into());
        }
        if let Action::Signal(s) = self {
            if signal_number(&s.signal).is_none() {
                return Err(format!("unknown signal {:?}", s.signal));
            }
        }
        Ok(())
    }
}

/// Names of the built-in templates (`builtin:NAME`). `render` holds their sources; its
/// tests check that the two lists agree, so config need not depend on render.
pub const BUILTIN_TEMPLATES: &[&str] = &["nginx", "prometheus", "certbot", "ddclient"];

/// The number of a signal name a notify step may send (`HUP` or `SIGHUP`).
pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim_start_matches("SIG");
    Some(match n {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "WINCH" => 28,
        _ => return None,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl HookKind {
    /// The fact names a hook of this kind produces, the only names `allow` may use
    /// (`hooks::facts` produces them; its tests keep the two in step).
    pub fn facts(self) -> &'static [&'static str] {
        match self {
            HookKind::Dockerhub => &["repository", "tag", "image", "owner", "namespace", "pusher"],
            HookKind::Github => &[
                "event",
                "repository",
                "ref",
                "sender",
                "clone_url",
                "commits",
                "commit_ids",
                "head_commit_message",
            ],
            HookKind::Generic => &["repository", "tag", "image"],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::Dockerhub => "dockerhub",
            HookKind::Github => "github",
            HookKind::Generic => "generic",
        }
    }
}

impl ContainerSpec {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.image.trim().is_empty() {
            return Err("image is empty".into());
        }
        if self.timeout.is_zero() {
            return Err("timeout must be more than zero".into());
        }
        for m in &self.mounts {
            let parts: Vec<&str> = m.split(':').collect();
            let ok = match parts.as_slice() {
                [src, dst] => !src.is_empty() && dst.starts_with('/'),
                [src, dst, mode] => {
                    !src.is_empty()
                        && dst.starts_with('/')
                        && mode
                            .split(',')
                            .all(|o| matches!(o, "ro" | "rw" | "z" | "Z"))
                }
                _ => false,
            };
            if !ok {
                return Err(format!("mount {m:?} is not SOURCE:/TARGET[:ro]"));
            }
        }
        if let Some(k) = self.env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return Err(format!("invalid variable name {k:?}"));
        }
        Ok(())
    }
}

/// Line and column (1-based) of `key` in the `allow` rules of the hook named `hook`:
/// the first `key:` after the first `allow` after the hook's `name:` line.
fn locate_allow_key(text: &str, hook: &str, key: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let is_name = |l: &str| {
        let l = l.trim_start().trim_start_matches("- ").trim_start();
        l.strip_prefix("name:")
            .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'') == hook)
            .unwrap_or(false)
    };
    let start = lines.iter().position(|l| is_name(l))?;
    let allow = (start..lines.len()).find(|&i| lines[i].contains("allow"))?;
    let key_re = Regex::new(&format!(
        r#"(?:^|[\s{{,])["']?({})["']?\s*:"#,
        regex::escape(key)
    ))
    .ok()?;
    for (i, line) in lines.iter().enumerate().skip(allow) {
        let from = if i == allow {
            line.find("allow").map_or(0, |p| p + "allow".len())
        } else {
            0
        };
        if let Some(c) = key_re.captures(&line[from..]).and_then(|c| c.get(1)) {
            return Some((i + 1, from + c.start() + 1));
        }
    }
    None
}

fn find_line(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Reads a secret file, trimming the trailing newline editors and `docker secret create` leave.
pub fn read_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("drover.yml"), text)
    }

    #[test]
    fn the_issue_example_parses() {
        let c = parse(
            r#"
http: { listen: 0.0.0.0:9090 }
targets:
  - name: nginx
    template: builtin:nginx
    output: /etc/nginx/conf.d/drover.conf
    network: web
    debounce: { min: 250ms, max: 2s }
    check:
      exec: { service: nginx, command: ["nginx", "-t"] }
    notify:
      - signal: { service: nginx, signal: HUP }
      - restart: { service: ddclient }
      - command: ["true"]
hooks:
  - name: dockerhub
    kind: dockerhub
    token_file: /run/secrets/hub-token
    allow: { repository: "^owner/.+$", tag: "^(latest|stable)$" }
    quiet: 10s
    action: update-services
  - name: github
    kind: github
    secret_file: /run/secrets/github
    events: [push]
    allow: { ref: "^refs/heads/main$" }
    action: { command: ["/usr/local/bin/deploy-stack.sh"] }
  - name: ci
    kind: generic
    secret_file: /run/secrets/ci
    action: update-services
  - name: dd
    kind: generic
    token_file: /x
    action: { restart-service: ddclient }
"#,
        )
        .expect("valid");
        let t = &c.targets[0];
        assert_eq!(t.debounce.min, Duration::from_millis(250));
        assert!(
            matches!(t.check, Some(Action::Exec(ref e)) if e.service.as_deref() == Some("nginx"))
        );
        assert_eq!(t.notify.len(), 3);
        assert_eq!(c.hooks[0].action, HookAction::UpdateServices);
        assert_eq!(
            c.hooks[1].action,
            HookAction::Command(vec!["/usr/local/bin/deploy-stack.sh".into()])
        );
        assert_eq!(
            c.hooks[3].action,
            HookAction::RestartService("ddclient".into())
        );
        assert!(c.hooks[0].allow["tag"].is_match("latest"));
        assert!(!c.hooks[0].allow["tag"].is_match("latest-foo"));
    }

    #[test]
    fn unknown_field_is_refused_with_its_line() {
        let err = parse(
            "targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    colour: red\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("drover.yml:5:"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn bad_regex_is_refused_with_its_line() {
        let err = parse("hooks:\n  - name: a\n    kind: generic\n    token_file: /t\n    allow: { tag: \"(\" }\n    action: update-services\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("drover.yml:5:"), "{err}");
    }

    #[test]
    fn duplicate_target_points_at_the_second_definition_line() {
        let err = parse("targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n  - name: b\n    template: builtin:nope\n    output: /y\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown built-in template"), "{err}");
        assert!(err.starts_with("drover.yml:6:"), "{err}");
    }

    #[test]
    fn selector_must_name_exactly_one_thing() {
        let err = parse("targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    notify:\n      - signal: { service: a, container: b }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one"), "{err}");
    }

    #[test]
    fn github_hook_without_secret_is_refused() {
        let err = parse("hooks:\n  - name: gh\n    kind: github\n    action: update-services\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret_file or secrets is required"), "{err}");
    }

    #[test]
    fn allow_key_the_kind_does_not_know_is_refused_at_its_line_and_column() {
        let err = parse(
            "hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    action: update-services\n  - name: gh\n    kind: github\n    secret_file: /s\n    allow:\n      ref: refs/heads/master\n      pusher: rycus86\n    action: update-services\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("drover.yml:11:7: "), "{err}");
        assert!(
            err.contains("\"pusher\" is not a fact of a github hook"),
            "{err}"
        );
        let err = parse(
            "hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    allow: { tag: latest, sender: rycus86 }\n    action: update-services\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("drover.yml:5:27: "), "{err}");
        assert!(err.contains("known: repository, tag"), "{err}");
    }

    #[test]
    fn home_lab_rules_of_each_kind_load() {
        let c = parse(
            "hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    allow: { owner: rycus86, namespace: rycus86, repository: 'rycus86/.+', pusher: rycus86, tag: '.+' }\n    action: update-services\n  - name: gh\n    kind: github\n    secrets:\n      rycus86/home-stack-web: /run/secrets/web\n      'rycus86/home-stack-.+': /run/secrets/stacks\n    accept_sha1: false\n    allow: { sender: rycus86, ref: refs/heads/master }\n    action:\n      container:\n        image: 127.0.0.1:5000/stack-deploy\n        command: [/bin/sh, /deploy/run.sh]\n        env: { STACKS: /srv/stacks }\n        mounts: ['/var/run/docker.sock:/var/run/docker.sock', '/srv/stacks:/srv/stacks:ro']\n        networks: [home-web]\n        user: '1000:1000'\n        working_dir: /srv/stacks\n        timeout: 5m\n",
        )
        .expect("valid");
        let gh = &c.hooks[1];
        assert!(!gh.accept_sha1);
        assert!(
            c.hooks[0].accept_sha1,
            "sha1 is accepted unless switched off"
        );
        let keys: Vec<&str> = gh.secrets.0.iter().map(|s| s.repository.as_str()).collect();
        assert_eq!(keys, ["rycus86/home-stack-web", "rycus86/home-stack-.+"]);
        assert!(gh.secrets.0[1].pattern.is_match("rycus86/home-stack-media"));
        let HookAction::Container(spec) = &gh.action else {
            panic!("not a container action: {:?}", gh.action);
        };
        assert_eq!(spec.timeout, Duration::from_secs(300));
        assert_eq!(spec.mounts.len(), 2);
        assert!(!spec.concurrent);
        assert_eq!(spec.log_lines, 50);
    }

    #[test]
    fn container_action_with_a_bad_mount_or_no_image_is_refused() {
        let hook = |action: &str| {
            parse(&format!(
                "hooks:\n  - name: c\n    kind: generic\n    token_file: /t\n    action: {action}\n"
            ))
            .unwrap_err()
            .to_string()
        };
        let err = hook("{ container: { image: x, mounts: [relative] } }");
        assert!(err.contains("is not SOURCE:/TARGET"), "{err}");
        let err = hook("{ container: { image: '' } }");
        assert!(err.contains("image is empty"), "{err}");
        let err = hook("{ container: { image: x, colour: red } }");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn per_repository_secrets_are_only_for_github_hooks() {
        let err = parse("hooks:\n  - name: c\n    kind: generic\n    token_file: /t\n    secrets: { a/b: /s }\n    action: update-services\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("per-repository secrets are for github hooks"),
            "{err}"
        );
    }

    #[test]
    fn replay_window_defaults_to_an_hour_is_bounded_and_refused_on_github() {
        let hub = |extra: &str| {
            parse(&format!(
                "hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n{extra}    action: update-services\n"
            ))
        };
        let config = hub("").expect("default");
        assert_eq!(config.hooks[0].replay_window(), DEFAULT_REPLAY_WINDOW);
        let config = hub("    replay_window: 0s\n").expect("off");
        assert_eq!(config.hooks[0].replay_window(), Duration::ZERO);
        let err = hub("    replay_window: 25h\n")
            .expect_err("too long")
            .to_string();
        assert!(
            err.contains("hook hub: replay_window must be between"),
            "{err}"
        );
        let err = parse("hooks:\n  - name: gh\n    kind: github\n    secret_file: /s\n    replay_window: 1h\n    action: update-services\n")
            .expect_err("github")
            .to_string();
        assert!(
            err.contains("replay_window does not apply to GitHub"),
            "{err}"
        );
    }

    #[test]
    fn a_quiet_window_of_billions_of_years_is_refused_with_its_line() {
        let err = parse("hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    quiet: 300000000000years\n    action: update-services\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("drover.yml:2:"), "{err}");
        assert!(err.contains("hook hub: quiet must be between"), "{err}");
    }

    #[test]
    fn a_zero_resync_period_is_refused() {
        let err = parse("resync: 0s\n").unwrap_err().to_string();
        assert!(err.starts_with("drover.yml:1:"), "{err}");
        assert!(err.contains("resync must be between 1s and 1day"), "{err}");
    }

    #[test]
    fn sizes_and_timeouts_out_of_bounds_are_refused() {
        for (text, needle) in [
            ("http: { max_body: 0 }\n", "http.max_body"),
            ("http: { max_body: 1000000000000 }\n", "http.max_body"),
            ("http: { request_timeout: 0s }\n", "http.request_timeout"),
            ("jobs: { queue: 100000000 }\n", "jobs.queue"),
            (
                "jobs: { update_timeout: 100years }\n",
                "jobs.update_timeout",
            ),
            (
                "targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    debounce: { min: 1s, max: 1000years }\n",
                "debounce.max",
            ),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn an_empty_container_name_is_refused_because_it_would_match_every_container() {
        for step in [
            "signal: { container: \"\" }",
            "restart: { service: \" \" }",
            "exec: { label: \"\", command: [nginx, -t] }",
        ] {
            let text = format!(
                "targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    notify:\n      - {step}\n"
            );
            let err = parse(&text).expect_err(step).to_string();
            assert!(err.contains("must not be empty"), "{step}: {err}");
        }
    }

    #[test]
    fn the_default_values_are_within_their_bounds() {
        parse("{}\n").expect("an empty config is valid");
    }

    #[test]
    fn private_networks_default_to_a_home_lan_without_the_swarm_pool_and_refuse_bad_cidrs() {
        let target = |extra: &str| {
            format!("targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n{extra}")
        };
        let c = parse(&target("")).expect("default");
        let shown: Vec<String> = c.targets[0]
            .private_networks
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["192.168.0.0/16", "172.16.0.0/12"]);
        let swarm: std::net::IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(
            !c.targets[0]
                .private_networks
                .0
                .iter()
                .any(|n| n.contains(swarm))
        );
        let c = parse(&target(
            "    private_networks: [192.168.1.0/24, 10.20.0.0/16, 192.168.5.9, \"fd00::/8\"]\n",
        ))
        .expect("custom");
        let shown: Vec<String> = c.targets[0]
            .private_networks
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            ["192.168.1.0/24", "10.20.0.0/16", "192.168.5.9", "fd00::/8"]
        );
        for (bad, says) in [
            (
                "[192.168.1.5/16]",
                "host bits set (the network is 192.168.0.0/16)",
            ),
            ("[192.168.0.0/33]", "invalid CIDR"),
            ("[\"192.168.0.0/16; allow all\"]", "invalid CIDR"),
            ("[lan]", "invalid CIDR"),
            ("192.168.0.0/16", "invalid type"),
        ] {
            let err = parse(&target(&format!("    private_networks: {bad}\n")))
                .expect_err(bad)
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn cidr_matching_respects_the_prefix() {
        let c: Cidr = serde_yaml_ng::from_str("10.1.0.0/16").expect("cidr");
        assert!(c.contains("10.1.200.3".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        let all: Cidr = serde_yaml_ng::from_str("0.0.0.0/0").expect("cidr");
        assert!(all.contains("192.168.1.1".parse().expect("ip")));
    }

    #[test]
    fn github_events_default_to_push_and_an_empty_list_is_refused() {
        let hook = "hooks:\n  - name: gh\n    kind: github\n    secret_file: /s\n    action: update-services\n";
        let c = parse(hook).expect("config");
        assert_eq!(c.hooks[0].events, ["push"]);
        let empty = hook.replace("kind: github", "kind: github\n    events: []");
        let e = parse(&empty).expect_err("empty events").to_string();
        assert!(e.contains("events must name at least one event"), "{e}");
    }

    #[test]
    fn http_limits_are_refused_when_zero_or_out_of_range() {
        for bad in [
            "http: { max_requests: 0 }",
            "http: { header_timeout: 0s }",
            "http: { max_body: 2048, body_budget: 1024 }",
            "http: { listen: 127.0.0.1:9000, ops: { listen: 127.0.0.1:9000 } }",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        let c = parse("{}").expect("defaults");
        assert!(
            c.http.ops.listen.ip().is_loopback(),
            "operator endpoints are private by default"
        );
    }
}
