//! What this instance is doing right now, for `/readyz` and the status page.
//!
//! Written by the render loop and the cluster role check, read by HTTP handlers; it holds
//! only small summaries, never a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{OnceLock, RwLock};

use serde::Serialize;

use crate::apply::Report;
use crate::config::EventKind;
use crate::notifications::{Event, Notifier};

#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetStatus {
    pub name: String,
    pub output: String,
    /// Unix seconds of the last render attempt.
    pub last_render: Option<u64>,
    /// Unix seconds of the last successful apply (written, checked, notified).
    pub last_apply: Option<u64>,
    /// SHA-256 (hex) of the config currently in place.
    pub hash: Option<String>,
    pub check: CheckResult,
    pub error: Option<String>,
    pub skipped: Vec<SkippedService>,
    /// Hosts whose server blocks failed the check, left out of the file in place.
    pub left_out: Vec<LeftOutHost>,
    /// TLS hosts served on port 80 until their certificate files appear.
    pub without_certificate: Vec<String>,
    /// Per node, when the target is delivered through agents: outcome and hash there.
    pub nodes: Vec<NodeResult>,
}

/// The last check of a target's file. Shown (status page, JSON) as `none`, `passed`,
/// `failed: OUTPUT` or `unavailable: WHY`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CheckResult {
    /// No check configured, or none run yet.
    #[default]
    None,
    Passed,
    /// The checker rejected the file; its output.
    Failed(String),
    /// The check could not run (container missing, exec failed); why.
    Unavailable(String),
}

impl CheckResult {
    /// One word, for badges and metric labels.
    pub fn word(&self) -> &'static str {
        match self {
            CheckResult::None => "none",
            CheckResult::Passed => "passed",
            CheckResult::Failed(_) => "failed",
            CheckResult::Unavailable(_) => "unavailable",
        }
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckResult::None | CheckResult::Passed => f.write_str(self.word()),
            CheckResult::Failed(why) | CheckResult::Unavailable(why) => {
                write!(f, "{}: {why}", self.word())
            }
        }
    }
}

impl Serialize for CheckResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SkippedService {
    pub service: String,
    pub label: String,
    pub value: String,
    pub reason: String,
}

pub use crate::apply::LeftOutHost;

/// A target's state on one node it is delivered to through agents.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeResult {
    pub node_id: String,
    pub hostname: String,
    pub state: NodeState,
}

/// What the controller knows of one node's file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Its agent answered: what the one executor did there.
    Reported(Report),
    /// Its agent could not write the file.
    Error(String),
    /// No drover task runs on the node.
    NoAgent,
    /// A request to its agent is still under way.
    Sending,
    /// Its agent did not answer.
    Unreachable(String),
}

impl NodeResult {
    /// The node still lacks the content for want of an answer or of something that may
    /// come (its proxy not running yet, a render for its certificates): worth sending again.
    pub fn owed(&self) -> bool {
        match &self.state {
            NodeState::Reported(r) => r.outcome.owed(),
            NodeState::Error(_)
            | NodeState::NoAgent
            | NodeState::Sending
            | NodeState::Unreachable(_) => true,
        }
    }

    /// One word for logs, metrics and retry bookkeeping.
    pub fn label(&self) -> &'static str {
        match &self.state {
            NodeState::Reported(r) => r.outcome.label(),
            NodeState::Error(_) => "error",
            NodeState::NoAgent => "no_agent",
            NodeState::Sending => "sending",
            NodeState::Unreachable(_) => "unreachable",
        }
    }

    /// What went wrong there, in words.
    pub fn message(&self) -> Option<&str> {
        match &self.state {
            NodeState::Reported(r) => r.outcome.message(),
            NodeState::Error(m) | NodeState::Unreachable(m) => Some(m),
            NodeState::NoAgent => Some("no running drover task on this node"),
            NodeState::Sending => Some("its agent has not answered yet"),
        }
    }

    /// The node's name for people: its hostname, else its id.
    pub fn name(&self) -> &str {
        if self.hostname.is_empty() {
            &self.node_id
        } else {
            &self.hostname
        }
    }
}

/// One stack deployed from git, as the status page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StackStatus {
    pub name: String,
    pub branch: String,
    /// The commit drover last deployed (since it started).
    pub deployed: Option<String>,
    /// The branch head last looked up, when a lookup was made.
    pub head: Option<String>,
    /// What last asked for a sync: a hook's name, `stack-poll` or `stack-sync`.
    pub last_trigger: Option<String>,
    /// Unix seconds of the last sync's end.
    pub last_at: Option<u64>,
    /// The last sync's outcome (`completed`, `failed`, `skipped`).
    pub outcome: Option<String>,
    pub message: Option<String>,
}

impl StackStatus {
    /// The branch has a head that is not what runs.
    pub fn ahead(&self) -> bool {
        matches!((&self.head, &self.deployed), (Some(h), Some(d)) if h != d)
            || (self.head.is_some() && self.deployed.is_none())
    }
}

/// A certificate drover obtains, as the status page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CertificateStatus {
    pub host: String,
    pub names: Vec<String>,
    /// Unix seconds.
    pub not_after: Option<i64>,
    pub renew_at: Option<i64>,
    /// The last order's failure or refusal, until one succeeds.
    pub error: Option<String>,
    /// When a failed or refused order is tried again.
    pub retry_at: Option<i64>,
}

/// One image reference registry polling follows, as the status page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PollStatus {
    /// `registry/repo:tag`.
    pub image: String,
    /// The polled services that run it.
    pub services: Vec<String>,
    /// Seconds between checks (the shortest period of its services).
    pub every: u64,
    /// The digest the tag pointed at in the last answer.
    pub digest: Option<String>,
    /// Unix seconds of the last check.
    pub last_at: Option<u64>,
    /// Unix seconds of the next check (its period, or later when the registry's budget or
    /// its rate limit spreads the checks).
    pub next_at: Option<u64>,
    /// `unchanged`, `changed` (a job was queued), `held` (that digest was asked for
    /// already) or the error's kind.
    pub outcome: Option<String>,
    pub message: Option<String>,
    /// The job the last change queued.
    pub job: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub version: &'static str,
    /// `None` until the engine has been asked.
    pub role: Option<crate::role::Role>,
    pub node: String,
    pub engine: String,
    pub ready: bool,
    pub peers: Vec<String>,
    pub targets: Vec<TargetStatus>,
    pub stacks: Vec<StackStatus>,
    pub certificates: Vec<CertificateStatus>,
    /// Images registry polling follows (the controller's; empty elsewhere).
    pub polls: Vec<PollStatus>,
}

#[derive(Debug, Default)]
pub struct Board {
    inner: RwLock<Summary>,
    targets: RwLock<BTreeMap<String, TargetStatus>>,
    /// Told when a host is newly left out or a node newly stops answering.
    notifier: OnceLock<Notifier>,
    stacks: RwLock<BTreeMap<String, StackStatus>>,
    certificates: RwLock<BTreeMap<String, CertificateStatus>>,
}

impl Board {
    pub fn new() -> Board {
        Board {
            inner: RwLock::new(Summary {
                version: env!("CARGO_PKG_VERSION"),
                ..Summary::default()
            }),
            targets: RwLock::default(),
            notifier: OnceLock::new(),
            stacks: RwLock::default(),
            certificates: RwLock::default(),
        }
    }

    /// Where changes that need a person go from now on (set once, by the daemon).
    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    pub fn summary(&self) -> Summary {
        let mut s = self.inner.read().map(|s| s.clone()).unwrap_or_default();
        s.targets = self
            .targets
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        s.stacks = self
            .stacks
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        s.certificates = self
            .certificates
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        s
    }

    pub fn update_certificate(&self, host: &str, f: impl FnOnce(&mut CertificateStatus)) {
        if let Ok(mut t) = self.certificates.write() {
            let entry = t
                .entry(host.to_owned())
                .or_insert_with(|| CertificateStatus {
                    host: host.to_owned(),
                    ..CertificateStatus::default()
                });
            f(entry);
        }
    }

    pub fn update_stack(&self, name: &str, f: impl FnOnce(&mut StackStatus)) {
        if let Ok(mut t) = self.stacks.write() {
            let entry = t.entry(name.to_owned()).or_insert_with(|| StackStatus {
                name: name.to_owned(),
                ..StackStatus::default()
            });
            f(entry);
        }
    }

    pub fn role(&self) -> Option<crate::role::Role> {
        self.inner.read().ok().and_then(|s| s.role)
    }

    pub fn is_ready(&self) -> bool {
        self.inner.read().map(|s| s.ready).unwrap_or(false)
    }

    pub fn update(&self, f: impl FnOnce(&mut Summary)) {
        if let Ok(mut s) = self.inner.write() {
            f(&mut s);
        }
    }

    /// Tells the sinks (none set: nothing happens).
    pub fn notify(&self, event: crate::notifications::Event) {
        if let Some(notifier) = self.notifier.get() {
            notifier.notify(event);
        }
    }

    /// A target that a config reload removed.
    pub fn remove_target(&self, name: &str) {
        if let Ok(mut t) = self.targets.write() {
            t.remove(name);
        }
    }

    pub fn update_target(&self, name: &str, f: impl FnOnce(&mut TargetStatus)) {
        if let Ok(mut t) = self.targets.write() {
            let entry = t.entry(name.to_owned()).or_insert_with(|| TargetStatus {
                name: name.to_owned(),
                check: CheckResult::None,
                ..TargetStatus::default()
            });
            let before = Troubles::of(entry);
            f(entry);
            if let Some(notifier) = self.notifier.get() {
                for event in before.new_in(&Troubles::of(entry), name) {
                    notifier.notify(event);
                }
            }
        }
    }
}

/// What of a target's state needs a person: hosts left out (by node; "" for this node)
/// and nodes whose agent does not answer.
#[derive(Debug, Default, PartialEq)]
struct Troubles {
    left_out: BTreeMap<(String, String), String>,
    unreachable: BTreeMap<String, String>,
}

impl Troubles {
    fn of(t: &TargetStatus) -> Troubles {
        let mut out = Troubles::default();
        for h in &t.left_out {
            out.left_out
                .insert((String::new(), h.host.clone()), h.reason.clone());
        }
        for n in &t.nodes {
            match &n.state {
                NodeState::Reported(r) => {
                    for h in &r.left_out {
                        out.left_out
                            .insert((n.name().to_owned(), h.host.clone()), h.reason.clone());
                    }
                }
                NodeState::Unreachable(why) => {
                    out.unreachable.insert(n.name().to_owned(), why.clone());
                }
                _ => {}
            }
        }
        out
    }

    /// Events for what is in `after` and was not in `self`: each is told once, when it
    /// starts (the sinks' `repeat_after` covers one that comes and goes).
    fn new_in(&self, after: &Troubles, target: &str) -> Vec<Event> {
        let mut events = Vec::new();
        for ((node, host), reason) in &after.left_out {
            if self.left_out.contains_key(&(node.clone(), host.clone())) {
                continue;
            }
            let on = if node.is_empty() {
                String::new()
            } else {
                format!(" on {node}")
            };
            events.push(Event {
                kind: EventKind::HostLeftOut,
                subject: format!("{target}/{node}/{host}"),
                summary: format!("{host} left out of {target}{on}: {reason}"),
                details: serde_json::json!({"target": target, "node": node, "host": host, "reason": reason}),
            });
        }
        let before: BTreeSet<&String> = self.unreachable.keys().collect();
        for (node, why) in &after.unreachable {
            if before.contains(node) {
                continue;
            }
            events.push(Event {
                kind: EventKind::NodeUnreachable,
                subject: node.clone(),
                summary: format!("node {node} does not answer ({target}): {why}"),
                details: serde_json::json!({"target": target, "node": node, "reason": why}),
            });
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Outcome;

    fn node(name: &str, state: NodeState) -> NodeResult {
        NodeResult {
            node_id: format!("{name}-id"),
            hostname: name.into(),
            state,
        }
    }

    fn reported(left_out: &[&str]) -> NodeState {
        NodeState::Reported(Report {
            outcome: Outcome::Applied,
            hash: None,
            left_out: left_out
                .iter()
                .map(|h| LeftOutHost {
                    host: (*h).into(),
                    reason: "nginx -t refused it".into(),
                })
                .collect(),
            certificates: None,
        })
    }

    #[test]
    fn a_host_newly_left_out_and_a_node_newly_unreachable_are_told_once() {
        let mut t = TargetStatus {
            nodes: vec![node("w1", reported(&[])), node("w2", reported(&[]))],
            ..TargetStatus::default()
        };
        let before = Troubles::of(&t);
        t.nodes[0].state = reported(&["bad.test"]);
        t.nodes[1].state = NodeState::Unreachable("no connection within 3s".into());
        let after = Troubles::of(&t);
        let events = before.new_in(&after, "nginx");
        let kinds: Vec<_> = events
            .iter()
            .map(|e| (e.kind, e.subject.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (EventKind::HostLeftOut, "nginx/w1/bad.test"),
                (EventKind::NodeUnreachable, "w2")
            ]
        );
        assert_eq!(
            events[0].summary,
            "bad.test left out of nginx on w1: nginx -t refused it"
        );
        // The same state again: nothing new.
        assert!(after.new_in(&Troubles::of(&t), "nginx").is_empty());
    }
}
