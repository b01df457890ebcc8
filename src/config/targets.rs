//! `targets:`: one rendered file each, with the steps that check and notify its consumer
//! ([`Action`]) and the containers those steps reach ([`Selector`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::{Problem, bounds, valid_name};
use super::owners::Owners;
use super::values::Cidr;

/// Names of the built-in templates (`builtin:NAME`). `render` holds their sources; its
/// tests check that the two lists agree, so config need not depend on render.
pub const BUILTIN_TEMPLATES: &[&str] = &["nginx", "prometheus", "certbot", "ddclient"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `[A-Za-z0-9_-]+`, unique: used in logs, metrics and the status page.
    pub name: String,
    /// `builtin:NAME` or a path to a Tera file.
    pub template: String,
    /// Where the rendered file goes, as drover sees it.
    pub output: PathBuf,
    /// The network whose task IPs the built-in templates route to.
    #[serde(default)]
    pub network: Option<String>,
    /// How long changes are gathered before one render.
    #[serde(default)]
    pub debounce: Debounce,
    /// Run on the new file before it replaces the live one; a failure keeps the live one.
    #[serde(default)]
    pub check: Option<Action>,
    /// Run in order after a new file is kept.
    #[serde(default)]
    pub notify: Vec<Action>,
    /// Who writes the file: see [`Delivery`].
    #[serde(default)]
    pub delivery: Delivery,
    /// The source networks, besides loopback, the built-in nginx template lets into a
    /// `routing-private-context` location.
    #[serde(default)]
    pub private_networks: PrivateNetworks,
    /// Values the template reads as `vars` (the built-in prometheus template: `external_labels`,
    /// `scrape_interval`, `evaluation_interval`).
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Which stacks may route which hosts; hosts not listed belong to the first stack that
    /// claims them (see `config::owners`).
    #[serde(default)]
    pub owners: Owners,
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
            vars: BTreeMap::new(),
            owners: Owners::default(),
        }
    }

    pub fn builtin(&self) -> Option<&str> {
        self.template.strip_prefix("builtin:")
    }
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
    fn validate(&self) -> Result<(), String> {
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

/// The batching window of a target: a render waits until `min` has passed without a change,
/// but never longer than `max` after the first change of the batch.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Debounce {
    /// How long it stays quiet before a render.
    #[serde(with = "humantime_serde")]
    pub min: Duration,
    /// The longest a change waits, however busy the cluster.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            min: Duration::from_millis(250),
            max: Duration::from_secs(2),
        }
    }
}

/// Which containers an action reaches: those of a Swarm service, one container by name,
/// or every container carrying a label (`key=value` or just `key`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// The tasks of this Swarm service.
    #[serde(default)]
    pub service: Option<String>,
    /// The container of this name.
    #[serde(default)]
    pub container: Option<String>,
    /// Every container with this label (`key=value` or `key`).
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

/// `exec:`: a command run inside the selected container(s).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// As in [`Selector`]: exactly one of `service`, `container`, `label`.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    /// argv, run without a shell; a non-zero exit fails the step.
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

/// `signal:`: a signal sent to the selected container(s).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SignalSpec {
    /// As in [`Selector`]: exactly one of `service`, `container`, `label`.
    pub service: Option<String>,
    pub container: Option<String>,
    pub label: Option<String>,
    /// `HUP` or `SIGHUP`; the names [`signal_number`] knows.
    pub signal: String,
}

impl Default for SignalSpec {
    /// Selects nothing (validation asks for a selector) and sends `HUP`.
    fn default() -> Self {
        SignalSpec {
            service: None,
            container: None,
            label: None,
            signal: "HUP".into(),
        }
    }
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

impl Target {
    /// The containers and services its check and notify steps reach.
    pub fn selectors(&self) -> Vec<Selector> {
        self.check
            .iter()
            .chain(&self.notify)
            .filter_map(Action::on)
            .collect()
    }
}

impl Action {
    /// The containers or service the step reaches; `None` for a local command.
    pub fn on(&self) -> Option<Selector> {
        match self {
            Action::Exec(e) => Some(e.on()),
            Action::Signal(s) => Some(s.on()),
            Action::Restart(on) => Some(on.clone()),
            Action::Command(_) => None,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let on = self.on();
        let argv = match self {
            Action::Exec(e) => Some(&e.command),
            Action::Command(argv) => Some(argv),
            _ => None,
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

/// Where the first problem of a target is reported: its `name:` line.
fn problem(t: &Target, reason: impl std::fmt::Display) -> Problem {
    Problem::new(
        format!("target {}: {reason}", t.name),
        format!("name: {}", t.name),
    )
}

/// Every target's durations within their bounds (checked for all areas before any rule).
pub(super) fn check_bounds(targets: &[Target]) -> Result<(), Problem> {
    for t in targets {
        bounds::duration(
            "debounce.max",
            t.debounce.max,
            Duration::ZERO,
            bounds::DEBOUNCE,
        )
        .map_err(|r| problem(t, r))?;
    }
    Ok(())
}

/// Names valid and unique, a known built-in template, steps that name what they reach.
pub(super) fn validate(targets: &[Target]) -> Result<(), Problem> {
    let mut names = std::collections::HashSet::new();
    for t in targets {
        let at = format!("name: {}", t.name);
        if !valid_name(&t.name) {
            return Err(Problem::new(
                format!("target name {:?} must be [A-Za-z0-9_-]+", t.name),
                at,
            ));
        }
        if !names.insert(t.name.clone()) {
            return Err(Problem::new(
                format!("target {:?} is defined twice", t.name),
                at,
            ));
        }
        if t.debounce.min > t.debounce.max {
            return Err(problem(t, "debounce min is larger than max"));
        }
        if let Some(name) = t.builtin() {
            if !BUILTIN_TEMPLATES.contains(&name) {
                return Err(Problem::new(
                    format!("target {}: unknown built-in template {name:?}", t.name),
                    format!("builtin:{name}"),
                ));
            }
        }
        for a in t.check.iter().chain(&t.notify) {
            a.validate().map_err(|r| problem(t, r))?;
        }
        t.private_networks.validate().map_err(|r| problem(t, r))?;
        if let Some(bad) = t.vars.keys().find(|k| !is_identifier(k)) {
            return Err(problem(
                t,
                format!("vars: {bad:?} is not a name a template can read ([A-Za-z_][A-Za-z0-9_]*)"),
            ));
        }
        if let Some(serde_json::Value::Object(labels)) = t.vars.get("external_labels") {
            if let Some(bad) = labels.keys().find(|k| !is_identifier(k)) {
                return Err(problem(
                    t,
                    format!("vars.external_labels: {bad:?} is not a Prometheus label name"),
                ));
            }
        }
    }
    Ok(())
}

/// `[A-Za-z_][A-Za-z0-9_]*`: a Tera attribute and a Prometheus label name alike.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
