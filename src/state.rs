//! The one cached view of the cluster that everything renders from.
//!
//! A [`Snapshot`] is fetched with a constant number of Engine API list calls (info,
//! services, tasks, nodes, networks, containers) however many services there are — never
//! one call per service. Every collection is sorted so renders are deterministic and an
//! unchanged cluster renders byte-identical output. Converting from the Engine's models
//! never panics on a missing field: absent values become empty strings or `None`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Task states that end a task's life; such a task is history, not transition.
pub const TERMINAL_STATES: &[&str] = &[
    "complete", "shutdown", "failed", "rejected", "remove", "orphaned",
];

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// True when the local engine is a Swarm manager and services/tasks/nodes are known.
    pub swarm: bool,
    /// The local node's Swarm id (empty outside Swarm).
    pub node_id: String,
    pub services: Vec<Service>,
    pub nodes: Vec<Node>,
    pub networks: Vec<Network>,
    pub containers: Vec<Container>,
    /// drover's own container and service, when it runs inside one.
    pub own: Option<Own>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Service {
    pub id: String,
    pub name: String,
    /// The image as the spec names it, possibly pinned (`repo:tag@sha256:...`).
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// `replicated`, `global`, `replicated-job` or `global-job`.
    pub mode: String,
    /// Desired replicas for replicated services.
    pub replicas: Option<u64>,
    /// Names of the networks the service is attached to.
    pub networks: Vec<String>,
    pub ports: Vec<Port>,
    /// `UpdateStatus.State` when an update has run (`updating`, `completed`, ...).
    pub update_state: Option<String>,
    /// Tasks that Swarm wants running or that still run, sorted by slot then node.
    pub tasks: Vec<Task>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Port {
    pub protocol: String,
    pub target: u16,
    pub published: Option<u16>,
    /// `ingress` or `host`.
    pub mode: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    pub slot: Option<i64>,
    pub node_id: String,
    pub state: String,
    pub desired_state: String,
    pub container_id: Option<String>,
    /// Address (without prefix length) per network name.
    pub ips: BTreeMap<String, String>,
    pub message: String,
    pub error: Option<String>,
}

impl Task {
    /// Running now and meant to keep running: the only tasks that should receive traffic.
    pub fn is_live(&self) -> bool {
        self.state == "running" && self.desired_state == "running"
    }

    /// On its way to running: the snapshot will change without any event telling us.
    pub fn is_transitional(&self) -> bool {
        self.desired_state == "running"
            && self.state != "running"
            && !TERMINAL_STATES.contains(&self.state.as_str())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    /// `manager` or `worker`.
    pub role: String,
    pub leader: bool,
    pub address: String,
    pub availability: String,
    pub state: String,
    pub labels: BTreeMap<String, String>,
    pub platform: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub scope: String,
    pub ingress: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub state: String,
    /// `healthy`, `unhealthy`, `starting` or empty when the image has no health check.
    pub health: String,
    pub ips: BTreeMap<String, String>,
    /// The Swarm service the container is a task of, from its labels.
    pub service: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Own {
    pub container_id: String,
    pub service: Option<String>,
}

impl Snapshot {
    /// True while Swarm is still moving toward what it was asked: a task starting, or a
    /// replicated service with fewer desired-running tasks than replicas. Swarm emits no
    /// task events, so this is what keeps the render loop polling until steady.
    pub fn is_converging(&self) -> bool {
        self.services.iter().any(|s| {
            let wanted = s.tasks.iter().filter(|t| t.desired_state == "running").count();
            s.tasks.iter().any(Task::is_transitional)
                || (s.mode == "replicated" && s.replicas.is_some_and(|r| (wanted as u64) < r))
        })
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Puts every collection in a stable order so equal clusters render equal bytes.
    pub fn sort(&mut self) {
        self.services.sort_by(|a, b| a.name.cmp(&b.name));
        for s in &mut self.services {
            s.tasks.sort_by(|a, b| {
                (a.slot, &a.node_id, &a.id).cmp(&(b.slot, &b.node_id, &b.id))
            });
            s.networks.sort();
            s.ports.sort_by(|a, b| (a.target, &a.protocol).cmp(&(b.target, &b.protocol)));
        }
        self.nodes.sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
        self.networks.sort_by(|a, b| a.name.cmp(&b.name));
        self.containers.sort_by(|a, b| a.name.cmp(&b.name));
    }
}
