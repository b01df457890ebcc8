//! `stacks:`: Swarm stacks deployed from git repositories (DESIGN.md, "Stacks from git").
//!
//! A stack is a desired state: a repository, a branch and a compose file in it. Pushes
//! (through the hook a stack names), a poll of the branch head and a manual sync are all
//! hints that the branch moved; what runs is decided elsewhere (`stacks`). This file holds
//! the schema and the checks that make every value safe to hand to git and the docker CLI
//! as an argument (no value can start with `-`, carry credentials or leave the checkout).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::{Problem, bounds};

/// The image the deploy runs in when a stack names none: git, git-crypt, the docker CLI
/// and drover (the `deploy` target of the Dockerfile).
pub const DEFAULT_DEPLOY_IMAGE: &str = "ghcr.io/drover-swarm/drover-deploy:latest";

/// Shortest and longest poll period: a poll is one ref lookup, but a period of zero would
/// make the loop a busy one.
pub const POLL: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(24 * 3600));

/// One stack deployed from a git repository.
///
/// `name` and `repository` are required, so the fields whose default is not their type's
/// take it from the `Stack::default_*` functions below.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    /// The Swarm stack name (`docker stack deploy ... NAME`): `[a-z0-9][a-z0-9_-]*`, at
    /// most 32 characters, unique.
    pub name: String,
    /// `https://host/owner/repo.git`, `ssh://git@host/owner/repo.git` or
    /// `git@host:owner/repo.git`. No credentials in the URL: use `token_file` or
    /// `ssh_key_file`.
    pub repository: String,
    /// The branch deployed (default `main`).
    #[serde(default = "Stack::default_branch")]
    pub branch: String,
    /// The compose file, relative to the repository's root (default `docker-compose.yml`).
    #[serde(default = "Stack::default_compose")]
    pub compose: String,
    /// https repositories: a file holding an access token, sent as HTTP basic auth.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// ssh repositories: a file holding the deploy key (private key).
    #[serde(default)]
    pub ssh_key_file: Option<PathBuf>,
    /// ssh repositories: the `known_hosts` file the server's key is checked against
    /// (required with `ssh_key_file`: a deploy never trusts a host key on first use).
    #[serde(default)]
    pub known_hosts_file: Option<PathBuf>,
    /// The repository is encrypted with git-crypt: a file holding the exported key
    /// (`git-crypt export-key`).
    #[serde(default)]
    pub git_crypt_key_file: Option<PathBuf>,
    /// Variables the compose file is interpolated with (`${NAME}`), besides none of
    /// drover's own environment.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Remove services of the stack that the compose file no longer names
    /// (`docker stack deploy --prune`; default false).
    #[serde(default)]
    pub prune: bool,
    /// Look up the branch head this often (one ref lookup; nothing is deployed when it
    /// did not move). Not set: only pushes and manual syncs deploy.
    #[serde(default, with = "humantime_serde")]
    pub poll: Option<Duration>,
    /// The forge hook (github, gitea, gitlab or bitbucket, with `action: sync-stacks`)
    /// whose verified pushes of this repository and branch deploy it.
    #[serde(default)]
    pub hook: Option<String>,
    /// Old versions of each rotated config kept after a rollout (default 2; 0 keeps none,
    /// and a later `docker service rollback` then has nothing to go back to). Old secret
    /// versions are never kept.
    #[serde(default = "Stack::default_keep_configs")]
    pub keep_configs: usize,
    /// The image the deploy runs in (default [`DEFAULT_DEPLOY_IMAGE`]).
    #[serde(default = "Stack::default_image")]
    pub image: String,
    /// The deploy container is killed and the deploy failed after this long (default 10m).
    #[serde(default = "Stack::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// How a repository is reached, from its URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `https://` (or `http://`, for a server on a private network).
    Http,
    /// `ssh://` or the scp-like `user@host:path`.
    Ssh,
}

impl Stack {
    fn default_branch() -> String {
        "main".into()
    }
    fn default_compose() -> String {
        "docker-compose.yml".into()
    }
    fn default_keep_configs() -> usize {
        2
    }
    fn default_image() -> String {
        DEFAULT_DEPLOY_IMAGE.into()
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(600)
    }

    /// How the repository is reached; `None` for a URL drover does not fetch from.
    pub fn transport(&self) -> Option<Transport> {
        transport(&self.repository)
    }

    /// The repository as GitHub names it in a push payload (`owner/name`), from its URL:
    /// the last two path segments without `.git`.
    pub fn full_name(&self) -> Option<String> {
        full_name(&self.repository)
    }

    /// Whether a push payload's repository (`owner/name`; GitLab's `group/sub/name`)
    /// is this stack's: the URL's path without `.git` is that name, or ends in `/` and
    /// that name (a forge served under a path prefix), compared case-insensitively.
    pub fn is_repository(&self, name: &str) -> bool {
        let Some(path) = repository_path(&self.repository) else {
            return false;
        };
        let (path, name) = (path.to_ascii_lowercase(), name.to_ascii_lowercase());
        !name.is_empty()
            && name.contains('/')
            && (path == name || path.ends_with(&format!("/{name}")))
    }
}

/// The path of a repository URL without its leading `/`, a trailing `/` or `.git`.
fn repository_path(url: &str) -> Option<&str> {
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?.1,
        None => url.split_once(':')?.1,
    };
    let path = path.trim_start_matches('/').trim_end_matches('/');
    Some(path.strip_suffix(".git").unwrap_or(path))
}

fn transport(url: &str) -> Option<Transport> {
    if url.starts_with("https://") || url.starts_with("http://") {
        return Some(Transport::Http);
    }
    if url.starts_with("ssh://") {
        return Some(Transport::Ssh);
    }
    // scp-like: `user@host:path`, where the part before the colon has no slash.
    let (host, path) = url.split_once(':')?;
    (host.contains('@') && !host.contains('/') && !path.is_empty()).then_some(Transport::Ssh)
}

/// `owner/name` of a repository URL.
pub fn full_name(url: &str) -> Option<String> {
    let path = repository_path(url)?;
    let mut parts = path.rsplit('/');
    let name = parts.next().filter(|s| !s.is_empty())?;
    let owner = parts.next().filter(|s| !s.is_empty())?;
    Some(format!("{owner}/{name}"))
}

/// Userinfo with a password in an http(s) URL (`https://user:token@host/...`).
fn has_credentials(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    authority.contains('@')
}

/// A branch name git accepts and that cannot be taken for an option or a range.
fn valid_branch(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 200
        && !b.starts_with(['-', '/', '.'])
        && !b.ends_with(['/', '.'])
        && !b.ends_with(".lock")
        && !b.contains("..")
        && !b.contains("//")
        && !b.contains("@{")
        && b.bytes().all(|c| {
            c.is_ascii_graphic() && !matches!(c, b'~' | b'^' | b':' | b'?' | b'*' | b'[' | b'\\')
        })
}

/// A relative path inside the checkout: no absolute path, no `..`, nothing option-like.
fn valid_compose(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with(['/', '-'])
        && !p.contains('\\')
        && p.split('/').all(|s| !s.is_empty() && s != ".." && s != ".")
        && !p.chars().any(char::is_control)
}

/// Stack names become Swarm object prefixes (`NAME_service`), log fields and URLs.
fn valid_stack_name(n: &str) -> bool {
    (1..=32).contains(&n.len())
        && n.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_variable(k: &str) -> bool {
    k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Where a stack's problem is reported: its `name:` line.
fn problem(s: &Stack, reason: impl std::fmt::Display) -> Problem {
    Problem::new(
        format!("stack {}: {reason}", s.name),
        format!("name: {}", s.name),
    )
}

/// Durations within their bounds (checked for all areas before any rule).
pub(super) fn check_bounds(stacks: &[Stack]) -> Result<(), Problem> {
    for s in stacks {
        if let Some(poll) = s.poll {
            bounds::duration("poll", poll, POLL.0, POLL.1).map_err(|r| problem(s, r))?;
        }
        bounds::size("keep_configs", s.keep_configs, 0, 100).map_err(|r| problem(s, r))?;
        bounds::duration(
            "timeout",
            s.timeout,
            Duration::from_secs(1),
            bounds::UPDATE_TIMEOUT.1,
        )
        .map_err(|r| problem(s, r))?;
    }
    Ok(())
}

/// Names valid and unique, a URL drover can fetch with the credentials that fit it, and
/// values safe as arguments. `push_hooks` are the names of the forge hooks (GitHub, Gitea,
/// GitLab, Bitbucket) whose action is `sync-stacks`, the only hooks a stack may name.
pub(super) fn validate(stacks: &[Stack], push_hooks: &[&str]) -> Result<(), Problem> {
    let mut names = std::collections::HashSet::new();
    for s in stacks {
        if !valid_stack_name(&s.name) {
            return Err(Problem::new(
                format!(
                    "stack name {:?} must be 1-32 characters of [a-z0-9_-], starting with a letter or digit",
                    s.name
                ),
                format!("name: {}", s.name),
            ));
        }
        if !names.insert(s.name.as_str()) {
            return Err(problem(s, "is defined twice"));
        }
        let Some(transport) = s.transport() else {
            return Err(problem(
                s,
                format!(
                    "repository {:?} is not an https://, ssh:// or user@host:path URL",
                    s.repository
                ),
            ));
        };
        if s.repository
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(problem(s, "repository contains white space"));
        }
        if has_credentials(&s.repository) {
            return Err(problem(
                s,
                "repository must not carry credentials: put the token in token_file",
            ));
        }
        match transport {
            Transport::Http if s.ssh_key_file.is_some() || s.known_hosts_file.is_some() => {
                return Err(problem(
                    s,
                    "ssh_key_file and known_hosts_file are for ssh repositories; an https repository takes token_file",
                ));
            }
            Transport::Ssh if s.token_file.is_some() => {
                return Err(problem(
                    s,
                    "token_file is for https repositories; an ssh repository takes ssh_key_file",
                ));
            }
            Transport::Ssh if s.ssh_key_file.is_some() != s.known_hosts_file.is_some() => {
                return Err(problem(
                    s,
                    "ssh_key_file and known_hosts_file go together (the server's key is never trusted on first use)",
                ));
            }
            _ => {}
        }
        if !valid_branch(&s.branch) {
            return Err(problem(
                s,
                format!("branch {:?} is not a valid branch name", s.branch),
            ));
        }
        if !valid_compose(&s.compose) {
            return Err(problem(
                s,
                format!(
                    "compose {:?} must be a relative path inside the repository",
                    s.compose
                ),
            ));
        }
        if let Some(k) = s.environment.keys().find(|k| !valid_variable(k)) {
            return Err(problem(
                s,
                format!("environment: invalid variable name {k:?}"),
            ));
        }
        if s.image.trim().is_empty() || s.image.starts_with('-') {
            return Err(problem(s, "image is empty"));
        }
        if let Some(hook) = &s.hook {
            if !push_hooks.contains(&hook.as_str()) {
                return Err(problem(
                    s,
                    format!(
                        "hook {hook:?} is not a github, gitea, gitlab or bitbucket hook with action sync-stacks"
                    ),
                ));
            }
            if s.full_name().is_none() {
                return Err(problem(
                    s,
                    "a hook needs a repository URL ending in OWNER/NAME (what a push names)",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls_name_their_transport_and_owner() {
        let t = |u: &str| (transport(u), full_name(u));
        assert_eq!(
            t("https://github.com/rycus86/home-stack-web.git"),
            (Some(Transport::Http), Some("rycus86/home-stack-web".into()))
        );
        assert_eq!(
            t("git@github.com:rycus86/home-stack-web.git"),
            (Some(Transport::Ssh), Some("rycus86/home-stack-web".into()))
        );
        assert_eq!(
            t("ssh://git@10.0.0.2:2222/srv/git/lab/web"),
            (Some(Transport::Ssh), Some("lab/web".into()))
        );
        assert_eq!(t("/srv/git/web.git").0, None);
        assert_eq!(t("file:///srv/git/web.git").0, None);
        assert_eq!(t("ext::sh -c evil").0, None);
    }

    #[test]
    fn branch_and_compose_values_cannot_become_options_or_leave_the_checkout() {
        assert!(valid_branch("main") && valid_branch("release/2.x"));
        for b in ["-u", "a..b", "a b", "x:y", "@{1}", "a.lock", ""] {
            assert!(!valid_branch(b), "{b}");
        }
        assert!(valid_compose("stack.yml") && valid_compose("deploy/stack.yml"));
        for p in ["/etc/passwd", "../x.yml", "a/../../x", "-c", "", "./x"] {
            assert!(!valid_compose(p), "{p}");
        }
    }

    #[test]
    fn credentials_in_an_https_url_are_found() {
        assert!(has_credentials("https://x:tok@github.com/a/b.git"));
        assert!(!has_credentials("https://github.com/a/b@c.git"));
        assert!(!has_credentials("git@github.com:a/b.git"));
    }
}
