//! `hooks:`: the webhooks drover answers, how each request is verified, which payloads
//! it acts on ([`FullMatch`] rules on facts) and what it then does ([`HookAction`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize};

use super::check::{Problem, bounds, valid_name};
use super::values::{Cidr, FullMatch};

/// How long a token hook remembers an accepted body when `replay_window` is not set.
pub const DEFAULT_REPLAY_WINDOW: Duration = Duration::from_secs(3600);

/// One webhook, served at `POST /hooks/NAME`.
///
/// `name`, `kind` and `action` are required, so serde cannot fill the rest from a
/// struct-level `Default`; the fields whose default is not their type's take it from the
/// `Hook::default_*` functions below.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// `[A-Za-z0-9_-]+`, unique: the last part of the hook's URL.
    pub name: String,
    /// Whose payloads and signatures the hook takes.
    pub kind: HookKind,
    /// Docker Hub and generic hooks: the shared token (`?token=` or `X-Drover-Token`);
    /// GitLab hooks: the secret token (`X-Gitlab-Token`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// GitHub, Gitea, Bitbucket and generic hooks: the HMAC-SHA256 key.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// GitHub, Gitea and Bitbucket hooks: one secret per repository, a map from `owner/name` (or a full-match
    /// pattern) to a secret file. A delivery is checked against the secret of the
    /// repository its payload names (an exact key first, then the first matching pattern
    /// in file order, then `secret_file`), never against the others.
    #[serde(default)]
    pub secrets: RepoSecrets,
    /// GitHub hooks: accept the legacy `X-Hub-Signature` (HMAC-SHA1) when a delivery has
    /// no `X-Hub-Signature-256` (default true).
    #[serde(default = "Hook::default_accept_sha1")]
    pub accept_sha1: bool,
    /// Event names to act on (default `[push]`; a push of every forge is `push`, other
    /// events as the forge names them; GitHub's ping is always answered, never acted
    /// on). GitHub does not sign the event header, so the list must name what to act on:
    /// an empty list is refused.
    #[serde(default = "Hook::default_events")]
    pub events: Vec<String>,
    /// Full-match rules on payload facts; the names a kind knows are listed in
    /// `hooks::facts` (Docker Hub: repository, tag, image, owner, namespace, pusher;
    /// GitHub, Gitea, GitLab: event, repository, ref, after, sender, clone_url, commits,
    /// commit_ids, head_commit_message; Bitbucket: event, repository, ref, after, sender,
    /// head_commit_message; generic: repository, tag, image). Others are refused at load.
    #[serde(default)]
    pub allow: BTreeMap<String, FullMatch>,
    /// Source networks allowed to call this hook; empty means any.
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    /// Coalescing window per repo:tag (default 10s).
    #[serde(default = "Hook::default_quiet", with = "humantime_serde")]
    pub quiet: Duration,
    /// Requests per second allowed on this hook (token bucket, burst of the same size;
    /// default 50).
    #[serde(default = "Hook::default_rate")]
    pub rate: u32,
    /// Docker Hub hooks and token requests of generic hooks: how long the SHA-256 of an
    /// accepted body is remembered, so the same body again gets no second job (`0s`: not
    /// remembered). GitHub deliveries are remembered by id, signed generic requests by
    /// their timestamp, so it is refused on a GitHub hook. Default [`DEFAULT_REPLAY_WINDOW`].
    #[serde(default, with = "humantime_serde")]
    pub replay_window: Option<Duration>,
    /// What an accepted request does.
    pub action: HookAction,
}

impl Hook {
    /// `replay_window`, or its default.
    pub fn replay_window(&self) -> Duration {
        self.replay_window.unwrap_or(DEFAULT_REPLAY_WINDOW)
    }

    fn default_accept_sha1() -> bool {
        true
    }
    fn default_events() -> Vec<String> {
        vec!["push".to_owned()]
    }
    fn default_quiet() -> Duration {
        Duration::from_secs(10)
    }
    fn default_rate() -> u32 {
        50
    }
}

/// One entry of a hook's `secrets` map.
#[derive(Debug, Clone)]
pub struct RepoSecret {
    /// The key as written: a repository's full name or a pattern.
    pub repository: String,
    /// The key compiled as a full-match pattern.
    pub pattern: FullMatch,
    /// The secret file of the repositories the key names.
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

/// Whose payloads and signatures a hook takes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// Docker Hub's push notifications, checked by a shared token.
    Dockerhub,
    /// GitHub deliveries, checked by their HMAC signature.
    Github,
    /// Gitea and Forgejo deliveries (`X-Gitea-Signature`/`X-Forgejo-Signature`: the hex
    /// HMAC-SHA256 of the body); their push payload is GitHub's shape.
    #[serde(alias = "forgejo")]
    Gitea,
    /// GitLab deliveries, checked by the shared `X-Gitlab-Token`.
    Gitlab,
    /// Bitbucket Cloud deliveries (`X-Hub-Signature: sha256=HEX` of the body).
    Bitbucket,
    /// Any sender, with a token or an HMAC signature over timestamp and body.
    Generic,
}

impl HookKind {
    /// The fact names a hook of this kind produces, the only names `allow` may use
    /// (`hooks::facts` produces them; its tests keep the two in step).
    pub fn facts(self) -> &'static [&'static str] {
        match self {
            HookKind::Dockerhub => &["repository", "tag", "image", "owner", "namespace", "pusher"],
            // Gitea and Forgejo send GitHub's payload shape; GitLab's parser gives the same.
            HookKind::Github | HookKind::Gitea | HookKind::Gitlab => &[
                "event",
                "repository",
                "ref",
                "after",
                "sender",
                "clone_url",
                "commits",
                "commit_ids",
                "head_commit_message",
            ],
            HookKind::Bitbucket => &[
                "event",
                "repository",
                "ref",
                "after",
                "sender",
                "head_commit_message",
            ],
            HookKind::Generic => &["repository", "tag", "image"],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::Dockerhub => "dockerhub",
            HookKind::Github => "github",
            HookKind::Gitea => "gitea",
            HookKind::Gitlab => "gitlab",
            HookKind::Bitbucket => "bitbucket",
            HookKind::Generic => "generic",
        }
    }

    /// Hooks of git forges: their pushes name a repository and a branch (so they can sync
    /// stacks), each delivery is unique and remembered for 24 hours.
    pub fn is_forge(self) -> bool {
        matches!(
            self,
            HookKind::Github | HookKind::Gitea | HookKind::Gitlab | HookKind::Bitbucket
        )
    }

    /// Forges whose payload names `repository.full_name`, so a delivery can be checked
    /// against a per-repository secret (`secrets:`).
    pub fn has_repository_secrets(self) -> bool {
        matches!(
            self,
            HookKind::Github | HookKind::Gitea | HookKind::Bitbucket
        )
    }
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
    /// Forge hooks (GitHub, Gitea, GitLab, Bitbucket): hint every stack that names this hook, and whose repository and
    /// branch the push names, that its branch moved (`stacks:`).
    SyncStacks,
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
            HookActionRepr::Name(n) if n == "sync-stacks" => {
                return Ok(HookAction::SyncStacks);
            }
            HookActionRepr::Name(n) => {
                return Err(format!(
                    "unknown action {n:?}: use update-services, sync-stacks, {{restart-service: NAME}}, {{command: [argv]}} or {{container: {{image: ...}}}}"
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

/// A one-off container a hook runs (the `container` action). Request data reaches it only
/// as `DROVER_*` environment variables, never in argv.
///
/// `image` is required, so `timeout` and `log_lines` take their defaults from the
/// `ContainerSpec::default_*` functions rather than a struct-level `Default`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// Pulled when the engine does not have it (with the `registries` credentials).
    pub image: String,
    /// argv; empty runs the image's default command.
    #[serde(default)]
    pub command: Vec<String>,
    /// Fixed variables, set before the facts (a fact never overrides one of these). Job
    /// views and logs show their names only (`/jobs` serialises this as a list of names).
    #[serde(default, serialize_with = "names_only")]
    pub env: BTreeMap<String, String>,
    /// Variables read from files at each run (a trailing newline dropped): secrets, such as
    /// `/run/secrets/deploy-token`. Their values are redacted from job output.
    #[serde(default)]
    pub env_files: BTreeMap<String, std::path::PathBuf>,
    /// `SOURCE:TARGET[:ro]`: a host path or a volume name, as `docker run -v` takes them.
    #[serde(default)]
    pub mounts: Vec<String>,
    /// Networks to attach (overlay networks must be attachable).
    #[serde(default)]
    pub networks: Vec<String>,
    /// `USER[:GROUP]` to run as; the image's user when not set.
    #[serde(default)]
    pub user: Option<String>,
    /// The working directory; the image's when not set.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The container is killed and the job failed after this long (default 10m).
    #[serde(default = "ContainerSpec::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Lines of output kept on the job (default 50).
    #[serde(default = "ContainerSpec::default_log_lines")]
    pub log_lines: usize,
    /// Let runs of this hook overlap (by default one runs at a time, the others wait).
    #[serde(default)]
    pub concurrent: bool,
}

/// A map's keys: what a job view may show of a container's environment.
fn names_only<S: serde::Serializer>(
    env: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(env.keys())
}

impl ContainerSpec {
    fn default_timeout() -> Duration {
        Duration::from_secs(600)
    }
    fn default_log_lines() -> usize {
        50
    }

    fn validate(&self) -> Result<(), String> {
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
        let names = self.env.keys().chain(self.env_files.keys());
        if let Some(k) = names.clone().find(|k| k.is_empty() || k.contains('=')) {
            return Err(format!("invalid variable name {k:?}"));
        }
        if let Some(k) = self.env_files.keys().find(|k| self.env.contains_key(*k)) {
            return Err(format!("{k} is in both env and env_files"));
        }
        Ok(())
    }
}

/// Where the first problem of a hook is reported: its `name:` line.
fn problem(h: &Hook, reason: impl std::fmt::Display) -> Problem {
    Problem::new(
        format!("hook {}: {reason}", h.name),
        format!("name: {}", h.name),
    )
}

/// Every hook's durations and rates within their bounds (checked for all areas before any
/// rule), and no `replay_window` where it means nothing.
pub(super) fn check_bounds(hooks: &[Hook]) -> Result<(), Problem> {
    use bounds::*;
    for hook in hooks {
        let at = |r: String| problem(hook, r);
        duration("quiet", hook.quiet, Duration::ZERO, QUIET).map_err(at)?;
        if let Some(window) = hook.replay_window {
            if hook.kind.is_forge() {
                return Err(at(format!(
                    "replay_window does not apply to {} hooks (their deliveries are \
                     remembered by delivery id and body for 24h)",
                    hook.kind.as_str()
                )));
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

/// Names valid and unique, the secret each kind needs, and an action that can run.
/// The names jobs drover queues itself are recorded under (registry polls, stack polls and
/// manual syncs): a hook of the same name would take over their journalled jobs.
pub const RESERVED_HOOK_NAMES: [&str; 3] = ["registry-poll", "stack-poll", "stack-sync"];

pub(super) fn validate(hooks: &[Hook]) -> Result<(), Problem> {
    let mut names = std::collections::HashSet::new();
    for h in hooks {
        let at = format!("name: {}", h.name);
        if !valid_name(&h.name) {
            return Err(Problem::new(
                format!("hook name {:?} must be [A-Za-z0-9_-]+", h.name),
                at,
            ));
        }
        if !names.insert(h.name.clone()) {
            return Err(Problem::new(
                format!("hook {:?} is defined twice", h.name),
                at,
            ));
        }
        if RESERVED_HOOK_NAMES.contains(&h.name.as_str()) {
            return Err(Problem::new(
                format!(
                    "hook name {:?} is drover's own (jobs of polls and syncs are recorded under it)",
                    h.name
                ),
                at,
            ));
        }
        let need = match h.kind {
            HookKind::Dockerhub if h.token_file.is_none() => Some("token_file"),
            HookKind::Github | HookKind::Gitea | HookKind::Bitbucket
                if h.secret_file.is_none() && h.secrets.0.is_empty() =>
            {
                Some("secret_file or secrets")
            }
            HookKind::Gitlab if h.token_file.is_none() => Some("token_file"),
            HookKind::Generic if h.secret_file.is_none() && h.token_file.is_none() => {
                Some("secret_file or token_file")
            }
            _ => None,
        };
        if let Some(field) = need {
            return Err(problem(h, format!("{field} is required")));
        }
        if h.events.is_empty() {
            return Err(problem(h, "events must name at least one event"));
        }
        if h.rate == 0 {
            return Err(problem(h, "rate must be at least 1"));
        }
        if !h.kind.has_repository_secrets() && !h.secrets.0.is_empty() {
            return Err(problem(
                h,
                "per-repository secrets are for github, gitea and bitbucket hooks",
            ));
        }
        let unused = match h.kind {
            HookKind::Gitea | HookKind::Bitbucket if h.token_file.is_some() => {
                Some("token_file (this kind is checked by its signature: secret_file)")
            }
            HookKind::Gitlab if h.secret_file.is_some() || !h.secrets.0.is_empty() => {
                Some("secret_file (GitLab sends its secret token as X-Gitlab-Token: token_file)")
            }
            _ => None,
        };
        if let Some(what) = unused {
            return Err(problem(
                h,
                format!("{} hooks take no {what}", h.kind.as_str()),
            ));
        }
        if let HookAction::Command(argv) = &h.action {
            if argv.is_empty() {
                return Err(problem(h, "command is empty"));
            }
        }
        if let HookAction::Container(c) = &h.action {
            c.validate()
                .map_err(|r| problem(h, format!("container: {r}")))?;
        }
        if h.action == HookAction::SyncStacks && !h.kind.is_forge() {
            return Err(problem(
                h,
                "sync-stacks is an action of github, gitea, gitlab and bitbucket hooks",
            ));
        }
    }
    Ok(())
}

/// An `allow` key a hook's kind never produces, with the line and column (1-based) it is
/// written at when it can be found.
pub(super) struct UnknownFact {
    pub reason: String,
    pub at: Option<(usize, usize)>,
}

/// Refuses an `allow` key the hook's kind never produces, pointing at the key itself:
/// such a rule could never hold, and every request would be refused.
pub(super) fn check_allow_keys(hooks: &[Hook], text: &str) -> Result<(), UnknownFact> {
    for h in hooks {
        let known = h.kind.facts();
        let Some(key) = h.allow.keys().find(|k| !known.contains(&k.as_str())) else {
            continue;
        };
        let known = known.join(", ");
        return Err(UnknownFact {
            reason: format!(
                "hook {}: {:?} is not a fact of a {} hook (known: {known})",
                h.name,
                key,
                h.kind.as_str()
            ),
            at: locate_allow_key(text, &h.name, key),
        });
    }
    Ok(())
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
