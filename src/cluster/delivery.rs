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

use serde::Serialize;

use super::agent::{self, ApplyRequest, Key};
use super::peers::Peer;
use crate::apply::sha256_hex;
use crate::config::{Action, Delivery, Target};
use crate::reconcile::Outcome;
use crate::state::Snapshot;

/// The outcome on one node, for the status page and the target's overall outcome.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeResult {
    pub node_id: String,
    pub hostname: String,
    /// An [`Outcome::label`], or `no_agent` / `unreachable`.
    pub outcome: String,
    /// Hash of the file in place on the node, as its agent last reported it.
    pub hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl NodeResult {
    /// The node still lacks the content for want of an answer (no agent, unreachable, its
    /// consumer not running yet, an error): worth sending again.
    pub fn owed(&self) -> bool {
        retried(&self.outcome)
    }
}

/// Outcomes of a node that was not brought up to date and is tried again.
fn retried(outcome: &str) -> bool {
    matches!(
        outcome,
        "no_agent" | "unreachable" | "check_unavailable" | "error"
    )
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
    let services = consumer_services(target);
    let stack = crate::apply::own_stack(snapshot);
    snapshot
        .services
        .iter()
        .filter(|s| {
            services
                .iter()
                .any(|r| crate::apply::names_service(r, &s.name, stack))
        })
        .flat_map(|s| s.tasks.iter().filter(|t| t.is_live()))
        .map(|t| t.node_id.clone())
        .collect()
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
    /// Node id → hash its agent reported in place after a good apply.
    delivered: BTreeMap<String, String>,
}

impl Deliverer {
    pub fn new(key: Key, port: u16) -> Deliverer {
        Deliverer {
            key,
            port,
            delivered: BTreeMap::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends `content` to each of `nodes` whose file differs, through `peers`.
    pub async fn deliver(
        &mut self,
        target: &str,
        content: &[u8],
        nodes: &BTreeSet<String>,
        peers: &BTreeMap<String, Peer>,
    ) -> Vec<NodeResult> {
        self.delivered.retain(|n, _| nodes.contains(n));
        let hash = sha256_hex(content);
        let request = ApplyRequest::new(target, content);
        let mut results = Vec::new();
        let mut sends = Vec::new();
        for node in nodes {
            let hostname = peers
                .get(node)
                .map(|p| p.hostname.clone())
                .unwrap_or_default();
            if self.delivered.get(node) == Some(&hash) {
                results.push(NodeResult {
                    node_id: node.clone(),
                    hostname,
                    outcome: Outcome::Unchanged.label().to_owned(),
                    hash: Some(hash.clone()),
                    message: None,
                });
                continue;
            }
            let Some(peer) = peers.get(node) else {
                results.push(NodeResult {
                    node_id: node.clone(),
                    hostname,
                    outcome: "no_agent".to_owned(),
                    hash: None,
                    message: Some("no running drover task on this node".to_owned()),
                });
                continue;
            };
            let (key, request, peer) = (self.key.clone(), request.clone(), peer.clone());
            sends.push(async move {
                let answer = agent::send(peer.addr, &key, &request).await;
                (peer, answer)
            });
        }
        for (peer, answer) in futures_util::future::join_all(sends).await {
            let result = match answer {
                Ok(a) => {
                    super::contacts::global().touch(&peer.node_id);
                    if matches!(
                        a.outcome.as_str(),
                        "applied" | "unchanged" | "notify_failed"
                    ) && a.hash.as_deref() == Some(hash.as_str())
                    {
                        self.delivered.insert(peer.node_id.clone(), hash.clone());
                    }
                    NodeResult {
                        node_id: peer.node_id,
                        hostname: peer.hostname,
                        outcome: a.outcome,
                        hash: a.hash,
                        message: a.message,
                    }
                }
                Err(e) => NodeResult {
                    node_id: peer.node_id,
                    hostname: peer.hostname,
                    outcome: "unreachable".to_owned(),
                    hash: None,
                    message: Some(e.to_string()),
                },
            };
            results.push(result);
        }
        results.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.node_id.cmp(&b.node_id)));
        results
    }
}

/// The target's overall outcome from its nodes' outcomes: a check failure anywhere wins
/// (the file is bad), then anything to retry (a node not reached), then a notify failure;
/// applied when any node took the file, unchanged when none needed it. No consumer node
/// at all is a check that cannot run (retried, like a local consumer that is down).
pub fn overall(results: &[NodeResult]) -> Outcome {
    let messages = |pick: &dyn Fn(&str) -> bool| {
        results
            .iter()
            .filter(|r| pick(&r.outcome))
            .map(|r| {
                format!(
                    "{}: {}",
                    if r.hostname.is_empty() {
                        &r.node_id
                    } else {
                        &r.hostname
                    },
                    r.message.as_deref().unwrap_or(&r.outcome)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let any = |o: &str| results.iter().any(|r| r.outcome == o);
    if results.is_empty() {
        return Outcome::CheckUnavailable("no node runs the target's consumer".to_owned());
    }
    if any("check_failed") || any("known_bad") {
        return Outcome::CheckFailed(messages(&|o| o == "check_failed" || o == "known_bad"));
    }
    if results.iter().any(NodeResult::owed) {
        return Outcome::CheckUnavailable(messages(&retried));
    }
    if any("notify_failed") {
        return Outcome::NotifyFailed(messages(&|o| o == "notify_failed"));
    }
    if any("applied") {
        Outcome::Applied
    } else {
        Outcome::Unchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::STACK_LABEL;
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

    fn result(outcome: &str) -> NodeResult {
        NodeResult {
            node_id: "n".into(),
            hostname: "h".into(),
            outcome: outcome.into(),
            hash: None,
            message: None,
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
            overall(&[result("applied"), result("unchanged")]),
            Outcome::Applied
        );
        assert_eq!(overall(&[result("unchanged")]), Outcome::Unchanged);
        assert!(matches!(
            overall(&[
                result("applied"),
                result("check_failed"),
                result("unreachable")
            ]),
            Outcome::CheckFailed(_)
        ));
        assert!(matches!(
            overall(&[result("applied"), result("no_agent")]),
            Outcome::CheckUnavailable(_)
        ));
        assert!(matches!(
            overall(&[result("applied"), result("notify_failed")]),
            Outcome::NotifyFailed(_)
        ));
        assert!(matches!(overall(&[]), Outcome::CheckUnavailable(_)));
    }

    #[tokio::test]
    async fn a_node_without_an_agent_is_reported_and_nothing_is_sent() {
        let mut d = Deliverer::new(Key::from_bytes(b"k"), 9091);
        let nodes = BTreeSet::from(["w1".to_owned()]);
        let r = d.deliver("web", b"x", &nodes, &BTreeMap::new()).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].outcome, "no_agent");
    }
}
