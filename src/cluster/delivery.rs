//! Delivery of a rendered file to the nodes that run its consumer.
//!
//! A target is delivered `local`ly (the controller writes the file itself: same node or a
//! shared volume) or through `agents`: to every node running a live task of a service the
//! target's check or notify steps name, via that node's agent. `auto` (the default)
//! chooses agents when they can work — the agent API is on, drover runs as a Swarm
//! service seen from a manager, and the target's steps name a service — so the shipped
//! stack works wherever Swarm places nginx; otherwise local, as on a single node.
//!
//! Invariants: a node is sent a content only when its last known good hash differs, so an
//! unchanged render costs no request; a node that leaves the consumer set is forgotten
//! (it gets the full file again if it comes back); a node without a reachable agent, or
//! whose agent failed, is reported and retried on the next pass. Requests to the nodes
//! run concurrently; one slow node does not hold up the others beyond the request timeout.

use std::collections::{BTreeMap, BTreeSet};

use super::contacts::Contacts;
use super::peers::Peer;
use super::wire::{self, Applied, ApplyRequest, Key};
use crate::apply::{Outcome, Report};
use crate::config::{Action, Delivery, Target};
use crate::hash::sha256_hex;
use crate::state::Snapshot;
use crate::status::{NodeResult, NodeState};

/// A target's content as rendered for one set of certificate files.
#[derive(Debug, Clone)]
pub struct Rendition {
    pub content: Vec<u8>,
    /// The TLS hosts of the content.
    pub tls: Vec<String>,
    /// Certificates to write with it, sealed for the wire.
    pub pairs: Vec<String>,
}

/// Services whose containers the target's check and notify steps reach.
pub fn consumer_services(target: &Target) -> BTreeSet<&str> {
    target
        .check
        .iter()
        .chain(&target.notify)
        .filter_map(|a| match a {
            Action::Exec(e) => e.service.as_deref(),
            Action::Signal(s) => s.service.as_deref(),
            _ => None,
        })
        .collect()
}

/// Node ids running a live task of a consumer service. A step's `service: nginx` names
/// `nginx` or `STACK_nginx` of drover's own stack, as it does for local steps.
pub fn consumer_nodes(target: &Target, snapshot: &Snapshot) -> BTreeSet<String> {
    consumers(target, snapshot)
        .flat_map(|s| s.tasks.iter().filter(|t| t.is_live()))
        .map(|t| t.node_id.clone())
        .collect()
}

/// The Swarm services a step of `target` names.
fn consumers<'s>(
    target: &Target,
    snapshot: &'s Snapshot,
) -> impl Iterator<Item = &'s crate::state::Service> {
    let services = consumer_services(target);
    let stack = crate::state::own_stack(snapshot);
    snapshot.services.iter().filter(move |s| {
        services
            .iter()
            .any(|r| crate::state::names_service(r, &s.name, stack))
    })
}

/// Whether a task of a consumer service is on its way to running: its node gets the file
/// once it runs, and does not serve it before.
pub fn consumers_starting(target: &Target, snapshot: &Snapshot) -> bool {
    consumers(target, snapshot).any(|s| s.tasks.iter().any(|t| t.is_transitional()))
}

/// Whether `target` goes through agents on this snapshot (`agents_on`: this instance has
/// the cluster key).
pub fn uses_agents(target: &Target, snapshot: &Snapshot, agents_on: bool) -> bool {
    match target.delivery {
        Delivery::Local => false,
        Delivery::Agents => agents_on,
        Delivery::Auto => {
            agents_on
                && snapshot.swarm
                && snapshot.own.as_ref().is_some_and(|o| o.service.is_some())
                && !consumer_services(target).is_empty()
        }
    }
}

/// One target's delivery state on the controller.
pub struct Deliverer {
    key: Key,
    port: u16,
    /// Node id → hash of the content its agent last settled on (applied, unchanged), and
    /// what it reported then.
    delivered: BTreeMap<String, (String, Report)>,
    /// Node id → the TLS hosts whose certificate files its proxy has, as it last said.
    certificates: BTreeMap<String, BTreeSet<String>>,
    /// The TLS hosts of the last content delivered.
    tls: Vec<String>,
    /// Requests still under way, per node: a node that answers late (down, its overlay
    /// path not up) is not waited for beyond [`PASS_WAIT`].
    in_flight: BTreeMap<String, tokio::task::JoinHandle<Sent>>,
}

/// A request sent: the hash of its content and the agent's answer.
type Sent = (String, wire::Result<wire::ApplyAnswer>);

/// How long one pass waits for the agents' answers. A node slower than this is answered
/// for on a later pass, so a node that is down (3 s to find out) never delays the file of
/// the others, such as a task's removal during a rolling update.
const PASS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Rounds one pass may spend: the first, and one for the nodes that asked for a content
/// rendered for their certificate files.
const ROUNDS: usize = 2;

impl Deliverer {
    pub fn new(key: Key, port: u16) -> Deliverer {
        Deliverer {
            key,
            port,
            delivered: BTreeMap::new(),
            certificates: BTreeMap::new(),
            tls: Vec::new(),
            in_flight: BTreeMap::new(),
        }
    }

    /// The cluster key the deliveries are signed with.
    pub fn key(&self) -> &Key {
        &self.key
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether a resync has something to look at again on some node: hosts left out, or
    /// TLS hosts (certificate files may appear, or change on disk).
    pub fn looks_outside(&self) -> bool {
        self.delivered
            .values()
            .any(|(_, last)| looks_outside(last, &self.tls))
    }

    /// The TLS hosts some delivered node has no certificate files for.
    pub fn without_certificates(&self, tls: &[String]) -> BTreeSet<String> {
        self.delivered
            .keys()
            .flat_map(|node| {
                let has = self.certificates.get(node);
                tls.iter()
                    .filter(move |h| !has.is_some_and(|c| c.contains(*h)))
                    .cloned()
            })
            .collect()
    }

    /// Brings each of `nodes` to the content `render` makes for that node's certificate
    /// files, through `peers`. A node whose file already holds its content is not asked
    /// (on a `resync` it is, when it has hosts left out or TLS hosts whose certificate
    /// files it looks up: they may have appeared or changed).
    pub async fn deliver(
        &mut self,
        target: &str,
        nodes: &BTreeSet<String>,
        peers: &BTreeMap<String, Peer>,
        contacts: &Contacts,
        resync: bool,
        render: &(dyn Fn(&BTreeSet<String>) -> Option<Rendition> + Sync),
    ) -> Vec<NodeResult> {
        self.delivered.retain(|n, _| nodes.contains(n));
        self.certificates.retain(|n, _| nodes.contains(n));
        self.in_flight.retain(|n, h| {
            let keep = nodes.contains(n);
            if !keep {
                h.abort();
            }
            keep
        });
        let mut results: BTreeMap<String, NodeResult> = BTreeMap::new();
        let mut todo: Vec<String> = nodes.iter().cloned().collect();
        // Answers that came in since the last pass: what those nodes hold now.
        let finished: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for node in finished {
            if let Some(handle) = self.in_flight.remove(&node) {
                let (state, _) = self.take(&node, handle.await, contacts);
                results.insert(node.clone(), NodeResult::new(&node, peers, state));
            }
        }
        let mut renditions: BTreeMap<BTreeSet<String>, Option<Rendition>> = BTreeMap::new();
        for round in 0..ROUNDS {
            let mut sent = Vec::new();
            for node in std::mem::take(&mut todo) {
                if self.in_flight.contains_key(&node) {
                    // Its last request is still under way (the node is slow or gone): it
                    // does not hold up the others, and gets the newest file once it answers.
                    results.insert(
                        node.clone(),
                        NodeResult::new(&node, peers, NodeState::Sending),
                    );
                    continue;
                }
                let with = self.certificates.get(&node).cloned().unwrap_or_default();
                let rendition = renditions
                    .entry(with.clone())
                    .or_insert_with(|| render(&with))
                    .clone();
                let Some(rendition) = rendition else {
                    let failed = NodeState::Error("render failed".to_owned());
                    results.insert(node.clone(), NodeResult::new(&node, peers, failed));
                    continue;
                };
                let hash = sha256_hex(&rendition.content);
                self.tls.clone_from(&rendition.tls);
                if let Some((_, last)) = self.delivered.get(&node).filter(|(h, last)| {
                    *h == hash && !(resync && looks_outside(last, &rendition.tls))
                }) {
                    let unchanged = Report {
                        outcome: Outcome::Unchanged,
                        ..last.clone()
                    };
                    let state = NodeState::Reported(unchanged);
                    results.insert(node.clone(), NodeResult::new(&node, peers, state));
                    continue;
                }
                let Some(peer) = peers.get(&node) else {
                    results.insert(
                        node.clone(),
                        NodeResult::new(&node, peers, NodeState::NoAgent),
                    );
                    continue;
                };
                let request = ApplyRequest {
                    tls: rendition.tls.clone(),
                    with_certificates: with,
                    resync: resync && round == 0,
                    pairs: rendition.pairs.clone(),
                    ..ApplyRequest::new(target, &rendition.content)
                };
                let (key, addr, to) = (self.key.clone(), peer.addr, node.clone());
                let handle =
                    tokio::spawn(
                        async move { (hash, wire::send(addr, &to, &key, &request).await) },
                    );
                self.in_flight.insert(node.clone(), handle);
                sent.push(node);
            }
            let deadline = tokio::time::Instant::now() + PASS_WAIT;
            for node in sent {
                let Some(mut handle) = self.in_flight.remove(&node) else {
                    continue;
                };
                match tokio::time::timeout_at(deadline, &mut handle).await {
                    Ok(answer) => {
                        let (state, rerender) = self.take(&node, answer, contacts);
                        if rerender {
                            todo.push(node.clone());
                        }
                        results.insert(node.clone(), NodeResult::new(&node, peers, state));
                    }
                    Err(_) => {
                        self.in_flight.insert(node.clone(), handle);
                        results.insert(
                            node.clone(),
                            NodeResult::new(&node, peers, NodeState::Sending),
                        );
                    }
                }
            }
            if todo.is_empty() {
                break;
            }
        }
        let mut results: Vec<NodeResult> = results.into_values().collect();
        results.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.node_id.cmp(&b.node_id)));
        results
    }

    /// What an answer from `node`'s agent (to a content of the hash it carries) says, kept
    /// for the next passes; and whether the node asks for a content rendered for its
    /// certificate files.
    fn take(
        &mut self,
        node: &str,
        answer: Result<Sent, tokio::task::JoinError>,
        contacts: &Contacts,
    ) -> (NodeState, bool) {
        let (hash, answer) = match answer {
            Ok(sent) => sent,
            Err(e) => return (NodeState::Error(format!("delivery task: {e}")), false),
        };
        match answer {
            Ok(a) => {
                contacts.touch(node);
                match a.result {
                    Applied::Report(r) => {
                        if let Some(c) = &r.certificates {
                            self.certificates.insert(node.to_owned(), c.clone());
                        }
                        if r.outcome.settled() {
                            self.delivered.insert(node.to_owned(), (hash, r.clone()));
                        } else {
                            self.delivered.remove(node);
                        }
                        let rerender = r.outcome == Outcome::Rerender;
                        (NodeState::Reported(r), rerender)
                    }
                    Applied::Error(e) => (NodeState::Error(e), false),
                }
            }
            Err(e) => (NodeState::Unreachable(e.to_string()), false),
        }
    }
}

impl NodeResult {
    fn new(node: &str, peers: &BTreeMap<String, Peer>, state: NodeState) -> NodeResult {
        NodeResult {
            node_id: node.to_owned(),
            hostname: peers
                .get(node)
                .map(|p| p.hostname.clone())
                .unwrap_or_default(),
            state,
        }
    }
}

/// Whether a node's last report leaves something a resync looks at again there: hosts
/// left out, or TLS hosts whose certificate files the node looks up (they may appear, or
/// change on disk and need a reload).
fn looks_outside(last: &Report, tls: &[String]) -> bool {
    !last.left_out.is_empty() || (last.certificates.is_some() && !tls.is_empty())
}

/// The target's overall outcome from its nodes' outcomes: a check failure anywhere wins
/// (the file is bad), then anything to retry (a node not reached), then a notify failure;
/// applied when any node took the file, unchanged when none needed it. No consumer node
/// at all is a check that cannot run (retried, like a local consumer that is down).
pub fn overall(results: &[NodeResult]) -> Outcome {
    let messages = |pick: &dyn Fn(&NodeResult) -> bool| {
        results
            .iter()
            .filter(|r| pick(r))
            .map(|r| format!("{}: {}", r.name(), r.message().unwrap_or(r.label())))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let reported = |r: &NodeResult, pick: fn(&Outcome) -> bool| matches!(&r.state, NodeState::Reported(report) if pick(&report.outcome));
    let bad = |r: &NodeResult| {
        reported(r, |o| {
            matches!(o, Outcome::CheckFailed(_) | Outcome::KnownBad)
        })
    };
    let notify = |r: &NodeResult| reported(r, |o| matches!(o, Outcome::NotifyFailed(_)));
    if results.is_empty() {
        return Outcome::CheckUnavailable("no node runs the target's consumer".to_owned());
    }
    if results.iter().any(bad) {
        return Outcome::CheckFailed(messages(&bad));
    }
    if results.iter().any(NodeResult::owed) {
        return Outcome::CheckUnavailable(messages(&NodeResult::owed));
    }
    if results.iter().any(notify) {
        return Outcome::NotifyFailed(messages(&notify));
    }
    if results
        .iter()
        .any(|r| reported(r, |o| matches!(o, Outcome::Applied)))
    {
        Outcome::Applied
    } else {
        Outcome::Unchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::STACK_LABEL;
    use crate::state::{Own, Service, Task};

    fn target(delivery: &str) -> Target {
        serde_yaml_ng::from_str(&format!(
            "name: web\ntemplate: builtin:nginx\noutput: /tmp/x.conf\ndelivery: {delivery}\n\
             check: {{ exec: {{ service: proxy, command: [nginx, -t] }} }}\n\
             notify: [ {{ signal: {{ service: proxy, signal: HUP }} }}, {{ command: [\"true\"] }} ]\n"
        ))
        .unwrap()
    }

    fn snapshot() -> Snapshot {
        let task = |node: &str, state: &str| Task {
            node_id: node.into(),
            state: state.into(),
            desired_state: "running".into(),
            ..Task::default()
        };
        Snapshot {
            swarm: true,
            own: Some(Own {
                container_id: "c".into(),
                service: Some("drover".into()),
            }),
            services: vec![
                Service {
                    name: "proxy".into(),
                    tasks: vec![task("w1", "running"), task("w2", "starting")],
                    ..Service::default()
                },
                Service {
                    name: "other".into(),
                    tasks: vec![task("m1", "running")],
                    ..Service::default()
                },
            ],
            ..Snapshot::default()
        }
    }

    fn result(outcome: Outcome) -> NodeResult {
        state(NodeState::Reported(Report {
            outcome,
            hash: None,
            left_out: Vec::new(),
            certificates: None,
        }))
    }

    fn state(state: NodeState) -> NodeResult {
        NodeResult {
            node_id: "n".into(),
            hostname: "h".into(),
            state,
        }
    }

    #[test]
    fn consumers_are_the_nodes_running_the_services_the_steps_name() {
        let t = target("auto");
        assert_eq!(consumer_services(&t), BTreeSet::from(["proxy"]));
        assert_eq!(
            consumer_nodes(&t, &snapshot()),
            BTreeSet::from(["w1".to_owned()])
        );
    }

    #[test]
    fn a_proxy_task_on_its_way_is_seen_and_another_services_is_not() {
        let t = target("auto");
        let mut s = snapshot();
        assert!(consumers_starting(&t, &s), "w2's proxy is starting");
        s.services[0].tasks[1].state = "running".into();
        s.services[1].tasks[0].state = "starting".into();
        assert!(!consumers_starting(&t, &s), "only the proxy's tasks count");
    }

    #[test]
    fn a_step_naming_nginx_reaches_the_nodes_of_nginx_in_drovers_own_stack() {
        let mut s = snapshot();
        s.own = Some(Own {
            container_id: "c".into(),
            service: Some("home_drover".into()),
        });
        let stack = || BTreeMap::from([(STACK_LABEL.to_owned(), "home".to_owned())]);
        s.services[0].name = "home_proxy".into();
        s.services[0].labels = stack();
        s.services.push(Service {
            name: "home_drover".into(),
            labels: stack(),
            ..Service::default()
        });
        assert_eq!(
            consumer_nodes(&target("auto"), &s),
            BTreeSet::from(["w1".to_owned()])
        );
        // Another stack's proxy is not ours.
        s.services[2].labels = BTreeMap::new();
        s.services[0].name = "other_proxy".into();
        assert!(consumer_nodes(&target("auto"), &s).is_empty());
    }

    #[test]
    fn auto_uses_agents_only_in_swarm_as_a_service_with_the_key() {
        let s = snapshot();
        assert!(uses_agents(&target("auto"), &s, true));
        assert!(!uses_agents(&target("auto"), &s, false));
        assert!(!uses_agents(&target("local"), &s, true));
        let mut standalone = s.clone();
        standalone.swarm = false;
        assert!(!uses_agents(&target("auto"), &standalone, true));
        assert!(uses_agents(&target("agents"), &standalone, true));
        let mut no_service = s;
        no_service.own = None;
        assert!(!uses_agents(&target("auto"), &no_service, true));
    }

    #[test]
    fn the_overall_outcome_puts_bad_files_first_then_retries() {
        assert_eq!(
            overall(&[result(Outcome::Applied), result(Outcome::Unchanged)]),
            Outcome::Applied
        );
        assert_eq!(overall(&[result(Outcome::Unchanged)]), Outcome::Unchanged);
        assert!(matches!(
            overall(&[
                result(Outcome::Applied),
                result(Outcome::CheckFailed("bad".into())),
                state(NodeState::Unreachable("gone".into()))
            ]),
            Outcome::CheckFailed(_)
        ));
        assert!(matches!(
            overall(&[result(Outcome::Applied), state(NodeState::NoAgent)]),
            Outcome::CheckUnavailable(_)
        ));
        assert!(matches!(
            overall(&[
                result(Outcome::Applied),
                result(Outcome::NotifyFailed("hup".into()))
            ]),
            Outcome::NotifyFailed(_)
        ));
        assert!(matches!(overall(&[]), Outcome::CheckUnavailable(_)));
    }

    #[tokio::test]
    async fn a_node_without_an_agent_is_reported_and_nothing_is_sent() {
        let mut d = Deliverer::new(Key::from_bytes(b"k"), 9091);
        let nodes = BTreeSet::from(["w1".to_owned()]);
        let render = |_: &BTreeSet<String>| {
            Some(Rendition {
                content: b"x".to_vec(),
                tls: Vec::new(),
                pairs: Vec::new(),
            })
        };
        let contacts = Contacts::default();
        let r = d
            .deliver("web", &nodes, &BTreeMap::new(), &contacts, false, &render)
            .await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].state, NodeState::NoAgent);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_whose_agent_does_not_answer_is_left_sending_and_holds_up_no_other_node() {
        // Accepts and never answers, like a node whose engine froze.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let mut d = Deliverer::new(Key::from_bytes(b"k"), addr.port());
        let peers = BTreeMap::from([(
            "w1".to_owned(),
            Peer {
                node_id: "w1".into(),
                hostname: "w1".into(),
                addr,
                private: false,
            },
        )]);
        let nodes = BTreeSet::from(["w1".to_owned(), "w2".to_owned()]);
        let render = |_: &BTreeSet<String>| {
            Some(Rendition {
                content: b"x".to_vec(),
                tls: Vec::new(),
                pairs: Vec::new(),
            })
        };
        let contacts = Contacts::default();
        let started = tokio::time::Instant::now();
        let r = d
            .deliver("web", &nodes, &peers, &contacts, false, &render)
            .await;
        assert_eq!(
            started.elapsed(),
            PASS_WAIT,
            "the pass waits no longer for w1"
        );
        let state = |r: &[NodeResult], node: &str| {
            r.iter()
                .find(|n| n.node_id == node)
                .map(|n| n.state.clone())
        };
        assert_eq!(state(&r, "w1"), Some(NodeState::Sending));
        assert_eq!(state(&r, "w2"), Some(NodeState::NoAgent));
        assert!(r.iter().all(NodeResult::owed));
        // The next pass does not wait for w1 at all, nor send it a second request.
        let again = tokio::time::Instant::now();
        let r = d
            .deliver("web", &nodes, &peers, &contacts, false, &render)
            .await;
        assert_eq!(again.elapsed(), std::time::Duration::ZERO);
        assert_eq!(state(&r, "w1"), Some(NodeState::Sending));
    }
}
