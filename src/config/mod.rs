//! The YAML configuration file: what to watch, render and update.
//!
//! Everything is validated once, here, into typed values: durations, full-match regexes
//! and selectors. A bad file is refused with its path, line and the reason, so the daemon
//! never starts half-configured. Runtime knobs (log format, listen address overrides) are
//! CLI flags instead; secrets are always read from files named here, never inlined.
//!
//! One file per area of the file: [`http`](Http), [`targets`](Target), [`hooks`](Hook),
//! [`jobs`](Jobs) and `registries`, [`cluster`](Cluster), [`stacks`](Stack), [`poll`](Poll). Each holds its schema, the
//! defaults of what may be left out (a struct-level `#[serde(default)]` over an
//! `impl Default` wherever no field is required) and the checks of its own part; this file
//! holds the top [`Config`], loading, the error type, and the order the checks run in.
//! `check` (the validation vocabulary) and `values` (types several areas parse) are leaves
//! the areas share; no area imports another.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod certificates;
mod check;
mod cluster;
mod hooks;
mod http;
mod jobs;
mod notifications;
mod owners;
mod poll;
mod stacks;
mod targets;
mod values;

#[cfg(test)]
mod tests;

pub use certificates::{Certificates, HostChoice, LETS_ENCRYPT};
pub use cluster::Cluster;
pub use hooks::{
    ContainerSpec, DEFAULT_REPLAY_WINDOW, Hook, HookAction, HookKind, RESERVED_HOOK_NAMES,
    RepoSecret, RepoSecrets,
};
pub use http::{Http, Ops};
pub use jobs::{Jobs, Registry, check_journal};
pub use notifications::{EventKind, Notifications, Sink, SinkKind};
pub use owners::{HostPattern, Owner, OwnerList, Owners};
pub use poll::{Budget, POLL_EVERY, Poll, PollLabel};
pub use stacks::{DEFAULT_DEPLOY_IMAGE, Stack, Transport, full_name as repository_full_name};
pub use targets::{
    Action, BUILTIN_TEMPLATES, DEFAULT_PRIVATE_NETWORKS, Debounce, Delivery, ExecSpec,
    PrivateNetworks, Selector, SignalSpec, Target, signal_number,
};
pub use values::{Cidr, FullMatch};

use check::{Problem, at_field, bounds};

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

/// The whole file. Every key may be left out: `{}` is the zero-config default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The webhook listener, its limits, and the operator listener.
    pub http: Http,
    /// Full resync period: the safety net behind event-driven updates.
    #[serde(with = "humantime_serde")]
    pub resync: Duration,
    /// The files to render, one each.
    pub targets: Vec<Target>,
    /// The webhooks to answer.
    pub hooks: Vec<Hook>,
    /// Credentials for pulling images, by registry host.
    pub registries: Vec<Registry>,
    /// The queue and journal of webhook jobs.
    pub jobs: Jobs,
    /// The agent API of cluster mode.
    pub cluster: Cluster,
    /// Where drover tells a person what needs one.
    pub notifications: Notifications,
    /// Swarm stacks deployed from git repositories.
    pub stacks: Vec<Stack>,
    /// drover's own ACME client; `None`: certificates come from elsewhere.
    pub certificates: Option<Certificates>,
    /// Registry polling for image updates.
    pub poll: Poll,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: Http::default(),
            resync: Duration::from_secs(60),
            targets: Vec::new(),
            hooks: Vec::new(),
            registries: Vec::new(),
            jobs: Jobs::default(),
            cluster: Cluster::default(),
            notifications: Notifications::default(),
            stacks: Vec::new(),
            certificates: None,
            poll: Poll::default(),
        }
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
        config.validate().map_err(|problem| {
            // Semantic errors point at the line of the offending name when we can find it.
            match find_line(text, &problem.near, problem.section) {
                Some(line) => Error::Parse {
                    path: path.to_owned(),
                    line,
                    column: 1,
                    reason: problem.reason,
                },
                None => Error::Invalid {
                    path: path.to_owned(),
                    reason: problem.reason,
                },
            }
        })?;
        hooks::check_allow_keys(&config.hooks, text).map_err(|fact| match fact.at {
            Some((line, column)) => Error::Parse {
                path: path.to_owned(),
                line,
                column,
                reason: fact.reason,
            },
            None => Error::Invalid {
                path: path.to_owned(),
                reason: fact.reason,
            },
        })?;
        Ok(config)
    }

    /// The first problem found. Bounds come first, over every area, then each area's own
    /// rules: a file with several problems is always refused for the same one.
    fn validate(&self) -> std::result::Result<(), Problem> {
        bounds::duration("resync", self.resync, bounds::RESYNC.0, bounds::RESYNC.1)
            .map_err(at_field("resync"))?;
        self.http.check_bounds()?;
        self.jobs.check_bounds()?;
        targets::check_bounds(&self.targets)?;
        hooks::check_bounds(&self.hooks)?;
        stacks::check_bounds(&self.stacks)?;

        targets::validate(&self.targets)?;
        hooks::validate(&self.hooks)?;
        self.notifications.validate()?;
        self.poll.validate()?;
        let sync_hooks: Vec<&str> = self
            .hooks
            .iter()
            .filter(|h| h.kind.is_forge() && h.action == HookAction::SyncStacks)
            .map(|h| h.name.as_str())
            .collect();
        stacks::validate(&self.stacks, &sync_hooks)?;
        if let Some(c) = &self.certificates {
            c.validate(&self.targets)?;
        }
        self.http.validate()
    }
}

fn find_line(text: &str, needle: &str, section: Option<&str>) -> Option<usize> {
    let start = match section {
        Some(s) => text.lines().position(|l| l.starts_with(s))?,
        None => 0,
    };
    text.lines()
        .skip(start)
        .position(|l| l.contains(needle))
        .map(|i| i + start + 1)
}

/// Reads a secret file, trimming the trailing newline editors and `docker secret create` leave.
pub fn read_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}
