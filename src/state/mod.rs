//! The one cached view of the cluster that everything renders from.
//!
//! A [`Snapshot`] is fetched with a constant number of Engine API list calls (info,
//! services, tasks, nodes, networks, containers) however many services there are — never
//! one call per service. Every collection is sorted so renders are deterministic and an
//! unchanged cluster renders byte-identical output. Converting from the Engine's models
//! never panics on a missing field: absent values become empty strings or `None`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod fetch;
mod local;
pub mod query;

pub use fetch::fetch;
pub use query::{STACK_LABEL, names_service, own_stack, resolve_services, select_containers};

/// A Swarm task's state (`Status.State`, `DesiredState`), in the engine's words. Templates
/// see the same lowercase strings; a state a newer engine adds reads as `unknown` and is
/// treated as neither live nor transitional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "&'static str")]
pub enum TaskState {
    New,
    Allocated,
    Pending,
    Assigned,
    Accepted,
    Preparing,
    Ready,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Remove,
    Orphaned,
    #[default]
    Unknown,
}

impl TaskState {
    const ALL: [TaskState; 16] = [
        TaskState::New,
        TaskState::Allocated,
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Accepted,
        TaskState::Preparing,
        TaskState::Ready,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Shutdown,
        TaskState::Failed,
        TaskState::Rejected,
        TaskState::Remove,
        TaskState::Orphaned,
        TaskState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Allocated => "allocated",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Accepted => "accepted",
            TaskState::Preparing => "preparing",
            TaskState::Ready => "ready",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Shutdown => "shutdown",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Remove => "remove",
            TaskState::Orphaned => "orphaned",
            TaskState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> TaskState {
        TaskState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .unwrap_or(TaskState::Unknown)
    }

    /// Ends a task's life: such a task is history, not transition.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Complete
                | TaskState::Shutdown
                | TaskState::Failed
                | TaskState::Rejected
                | TaskState::Remove
                | TaskState::Orphaned
        )
    }
}

impl From<String> for TaskState {
    fn from(s: String) -> TaskState {
        TaskState::parse(&s)
    }
}

impl From<&str> for TaskState {
    fn from(s: &str) -> TaskState {
        TaskState::parse(s)
    }
}

impl From<TaskState> for &'static str {
    fn from(s: TaskState) -> &'static str {
        s.as_str()
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a service is scheduled. Outside Swarm, local containers stand in for services
/// (`container`). Templates see these strings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMode {
    #[default]
    Replicated,
    Global,
    ReplicatedJob,
    GlobalJob,
    Container,
}

impl ServiceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceMode::Replicated => "replicated",
            ServiceMode::Global => "global",
            ServiceMode::ReplicatedJob => "replicated-job",
            ServiceMode::GlobalJob => "global-job",
            ServiceMode::Container => "container",
        }
    }
}

impl std::fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    pub mode: ServiceMode,
    /// Desired replicas for replicated services.
    pub replicas: Option<u64>,
    /// Names of the networks the service is attached to.
    pub networks: Vec<String>,
    pub ports: Vec<Port>,
    /// `UpdateStatus.State` when an update has run (`updating`, `completed`, ...).
    pub update_state: Option<String>,
    /// When Swarm created the service (`CreatedAt`, RFC 3339 as the engine writes it; outside
    /// Swarm, the oldest of its containers), empty when unknown: who claimed a host first.
    pub created_at: String,
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
    pub state: TaskState,
    pub desired_state: TaskState,
    pub container_id: Option<String>,
    /// Address (without prefix length) per network name.
    pub ips: BTreeMap<String, String>,
    pub message: String,
    pub error: Option<String>,
}

impl Task {
    /// A task running as it should, with its address per network.
    pub fn running(id: &str, service_id: &str, ips: BTreeMap<String, String>) -> Task {
        Task {
            id: id.into(),
            service_id: service_id.into(),
            state: TaskState::Running,
            desired_state: TaskState::Running,
            ips,
            ..Task::default()
        }
    }

    /// Running now and meant to keep running: the only tasks that should receive traffic.
    pub fn is_live(&self) -> bool {
        self.state == TaskState::Running && self.desired_state == TaskState::Running
    }

    /// On its way to running: the snapshot will change without any event telling us.
    pub fn is_transitional(&self) -> bool {
        self.desired_state == TaskState::Running
            && self.state != TaskState::Running
            && !self.state.is_terminal()
    }

    /// Swarm wants the task gone (a rollout, a scale down) but it has not ended yet.
    pub fn is_stopping(&self) -> bool {
        self.desired_state != TaskState::Running && !self.state.is_terminal()
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
    /// Labelled [`AGENTS_NETWORK_LABEL`]: the network drover's agents talk on.
    #[serde(default)]
    pub agents: bool,
}

/// The label (value `true`) of the network drover's own service keeps its agent API on
/// (the shipped stack's `agents` network, which nothing else joins).
pub const AGENTS_NETWORK_LABEL: &str = "drover.agents";

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
    /// When the container was created, in seconds since the epoch (0 when unknown).
    pub created: i64,
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
            let wanted = s
                .tasks
                .iter()
                .filter(|t| t.desired_state == TaskState::Running)
                .count();
            s.tasks.iter().any(Task::is_transitional)
                // A task Swarm is stopping (desired `shutdown`, not yet ended) must leave
                // nginx before it dies, and no event tells: keep looking until it has.
                || s.tasks.iter().any(Task::is_stopping)
                // A rollout steps from task to task without an event in between.
                || matches!(
                    s.update_state.as_deref(),
                    Some("updating" | "rollback_started")
                )
                || (s.mode == ServiceMode::Replicated
                    && s.replicas.is_some_and(|r| (wanted as u64) < r))
        })
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Puts every collection in a stable order so equal clusters render equal bytes.
    pub fn sort(&mut self) {
        self.services.sort_by(|a, b| a.name.cmp(&b.name));
        for s in &mut self.services {
            s.tasks
                .sort_by(|a, b| (a.slot, &a.node_id, &a.id).cmp(&(b.slot, &b.node_id, &b.id)));
            s.networks.sort();
            s.ports
                .sort_by(|a, b| (a.target, &a.protocol).cmp(&(b.target, &b.protocol)));
        }
        self.nodes
            .sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
        self.networks.sort_by(|a, b| a.name.cmp(&b.name));
        self.containers.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing {what}: {source}")]
    List {
        what: &'static str,
        #[source]
        source: crate::docker::Error,
    },
}

impl Error {
    pub fn is_transient(&self) -> bool {
        match self {
            Error::List { source, .. } => source.is_transient(),
        }
    }
}

/// The addresses of the consumers of the rendered files ([`query::step_addresses`]) as of
/// the last snapshot: written by the render loop, read by the webhook intake.
pub type StepAddresses =
    std::sync::Arc<std::sync::RwLock<std::collections::BTreeSet<std::net::IpAddr>>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: &str, desired: &str) -> Task {
        Task {
            state: state.into(),
            desired_state: desired.into(),
            ..Task::default()
        }
    }

    fn service(replicas: u64, tasks: Vec<Task>) -> Service {
        Service {
            name: "web".into(),
            mode: ServiceMode::Replicated,
            replicas: Some(replicas),
            tasks,
            ..Service::default()
        }
    }

    #[test]
    fn a_starting_task_means_the_snapshot_is_converging() {
        let snap = Snapshot {
            services: vec![service(
                2,
                vec![task("running", "running"), task("starting", "running")],
            )],
            ..Snapshot::default()
        };
        assert!(snap.is_converging());
    }

    #[test]
    fn fewer_tasks_than_replicas_means_converging() {
        let snap = Snapshot {
            services: vec![service(3, vec![task("running", "running")])],
            ..Snapshot::default()
        };
        assert!(snap.is_converging());
    }

    #[test]
    fn a_task_being_stopped_means_converging() {
        let snap = Snapshot {
            services: vec![service(
                1,
                vec![task("running", "running"), task("running", "shutdown")],
            )],
            ..Snapshot::default()
        };
        assert!(snap.is_converging());
    }

    #[test]
    fn a_rollout_in_progress_means_converging() {
        let mut web = service(1, vec![task("running", "running")]);
        web.update_state = Some("updating".into());
        let mut snap = Snapshot {
            services: vec![web],
            ..Snapshot::default()
        };
        assert!(snap.is_converging());
        snap.services[0].update_state = Some("completed".into());
        assert!(!snap.is_converging());
    }

    #[test]
    fn all_running_is_steady() {
        let snap = Snapshot {
            services: vec![service(
                2,
                vec![task("running", "running"), task("running", "running")],
            )],
            ..Snapshot::default()
        };
        assert!(!snap.is_converging());
    }

    #[test]
    fn a_failed_task_is_not_transitional() {
        assert!(!task("failed", "running").is_transitional());
        assert!(!task("running", "shutdown").is_live());
    }

    #[test]
    fn states_and_modes_read_and_serialise_as_the_engine_words_templates_see() {
        for word in ["running", "starting", "shutdown", "orphaned", "new"] {
            let state = TaskState::parse(word);
            assert_eq!(state.as_str(), word);
            assert_eq!(serde_json::to_value(state).expect("json"), word);
        }
        assert_eq!(TaskState::parse("some-future-state"), TaskState::Unknown);
        let state: TaskState = serde_json::from_str("\"failed\"").expect("json");
        assert_eq!(state, TaskState::Failed);
        assert_eq!(
            serde_json::to_value(ServiceMode::ReplicatedJob).expect("json"),
            "replicated-job"
        );
        assert_eq!(
            serde_json::to_value(ServiceMode::Container).expect("json"),
            "container"
        );
    }
}
