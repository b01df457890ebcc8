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
            let wanted = s
                .tasks
                .iter()
                .filter(|t| t.desired_state == "running")
                .count();
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

fn list_err(what: &'static str) -> impl FnOnce(crate::docker::Error) -> Error {
    move |source| Error::List { what, source }
}

fn text<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn labels(m: Option<std::collections::HashMap<String, String>>) -> BTreeMap<String, String> {
    m.unwrap_or_default().into_iter().collect()
}

fn strip_prefix_len(addr: &str) -> String {
    addr.split('/').next().unwrap_or(addr).to_owned()
}

/// The parts of a task bollard's model drops (`NetworksAttachments`), read as raw JSON.
#[derive(Debug, Deserialize)]
struct RawTask {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "ServiceID", default)]
    service_id: String,
    #[serde(rename = "Slot")]
    slot: Option<i64>,
    #[serde(rename = "NodeID", default)]
    node_id: String,
    #[serde(rename = "Status")]
    status: Option<RawTaskStatus>,
    #[serde(rename = "DesiredState", default)]
    desired_state: String,
    #[serde(rename = "NetworksAttachments", default)]
    networks_attachments: Vec<RawAttachment>,
}

#[derive(Debug, Deserialize)]
struct RawTaskStatus {
    #[serde(rename = "State", default)]
    state: String,
    #[serde(rename = "Message", default)]
    message: String,
    #[serde(rename = "Err")]
    err: Option<String>,
    #[serde(rename = "ContainerStatus")]
    container_status: Option<RawContainerStatus>,
}

#[derive(Debug, Deserialize)]
struct RawContainerStatus {
    #[serde(rename = "ContainerID")]
    container_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawAttachment {
    #[serde(rename = "Network")]
    network: Option<RawNetwork>,
    #[serde(rename = "Addresses", default)]
    addresses: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RawNetwork {
    #[serde(rename = "Spec")]
    spec: Option<RawNetworkSpec>,
}

#[derive(Debug, Deserialize)]
struct RawNetworkSpec {
    #[serde(rename = "Name", default)]
    name: String,
}

impl From<RawTask> for Task {
    fn from(t: RawTask) -> Task {
        let status = t.status;
        let ips = t
            .networks_attachments
            .into_iter()
            .filter_map(|a| {
                let name = a.network?.spec?.name;
                let ip = a.addresses.first().map(|a| strip_prefix_len(a))?;
                Some((name, ip))
            })
            .collect();
        Task {
            id: t.id,
            service_id: t.service_id,
            slot: t.slot,
            node_id: t.node_id,
            desired_state: t.desired_state,
            state: status.as_ref().map(|s| s.state.clone()).unwrap_or_default(),
            message: status
                .as_ref()
                .map(|s| s.message.clone())
                .unwrap_or_default(),
            error: status.as_ref().and_then(|s| s.err.clone()),
            container_id: status
                .and_then(|s| s.container_status)
                .and_then(|c| c.container_id)
                .filter(|c| !c.is_empty()),
            ips,
        }
    }
}

/// Fetches a whole snapshot: `info`, then (on a manager) services, tasks, nodes and
/// networks, and local containers — six calls however large the cluster is.
pub async fn fetch(engine: &crate::docker::Engine) -> Result<Snapshot, Error> {
    let m = crate::metrics::get();
    let count = |call: &str| m.engine_calls.with_label_values(&[call]).inc();

    count("info");
    let info = engine.info().await.map_err(list_err("info"))?;
    let swarm_info = info.swarm.unwrap_or_default();
    let manager = swarm_info.control_available.unwrap_or(false)
        && swarm_info
            .local_node_state
            .as_ref()
            .is_some_and(|s| s.to_string() == "active");
    let mut snap = Snapshot {
        swarm: manager,
        node_id: text(swarm_info.node_id),
        ..Snapshot::default()
    };

    count("networks");
    let networks = engine.list_networks().await.map_err(list_err("networks"))?;
    snap.networks = networks
        .into_iter()
        .map(|n| Network {
            id: text(n.id),
            name: text(n.name),
            driver: text(n.driver),
            scope: text(n.scope),
            ingress: n.ingress.unwrap_or(false),
        })
        .collect();

    if manager {
        count("services");
        let services = engine.list_services().await.map_err(list_err("services"))?;
        count("tasks");
        let filters = r#"{"desired-state":["running"]}"#;
        let tasks: Vec<RawTask> = engine
            .list_tasks(filters)
            .await
            .map_err(list_err("tasks"))?;
        count("nodes");
        let nodes = engine.list_nodes().await.map_err(list_err("nodes"))?;

        let net_name = |id: &str| {
            snap.networks
                .iter()
                .find(|n| n.id == id || n.name == id)
                .map(|n| n.name.clone())
                .unwrap_or_else(|| id.to_owned())
        };
        let mut by_service: std::collections::HashMap<String, Vec<Task>> =
            std::collections::HashMap::new();
        for t in tasks {
            let t = Task::from(t);
            by_service.entry(t.service_id.clone()).or_default().push(t);
        }
        snap.services = services
            .into_iter()
            .map(|s| {
                let id = text(s.id);
                let spec = s.spec.unwrap_or_default();
                let mode = spec.mode.unwrap_or_default();
                let (mode, replicas) = if let Some(r) = mode.replicated {
                    ("replicated", r.replicas.map(|n| n.max(0) as u64))
                } else if mode.global.is_some() {
                    ("global", None)
                } else if mode.replicated_job.is_some() {
                    ("replicated-job", None)
                } else {
                    ("global-job", None)
                };
                let template = spec.task_template.unwrap_or_default();
                let networks = template
                    .networks
                    .or(spec.networks)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|n| n.target)
                    .map(|t| net_name(&t))
                    .collect();
                let ports = s
                    .endpoint
                    .and_then(|e| e.ports)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| Port {
                        protocol: text(p.protocol),
                        target: p.target_port.unwrap_or(0).clamp(0, 65535) as u16,
                        published: p.published_port.map(|n| n.clamp(0, 65535) as u16),
                        mode: text(p.publish_mode),
                    })
                    .collect();
                Service {
                    tasks: by_service.remove(&id).unwrap_or_default(),
                    id,
                    name: text(spec.name),
                    image: text(template.container_spec.and_then(|c| c.image)),
                    labels: labels(spec.labels),
                    mode: mode.into(),
                    replicas,
                    networks,
                    ports,
                    update_state: s
                        .update_status
                        .and_then(|u| u.state)
                        .map(|st| st.to_string())
                        .filter(|st| !st.is_empty()),
                }
            })
            .collect();
        snap.nodes = nodes
            .into_iter()
            .map(|n| {
                let spec = n.spec.unwrap_or_default();
                let desc = n.description.unwrap_or_default();
                let status = n.status.unwrap_or_default();
                let platform = desc.platform.unwrap_or_default();
                Node {
                    id: text(n.id),
                    hostname: text(desc.hostname),
                    role: text(spec.role),
                    leader: n.manager_status.and_then(|m| m.leader).unwrap_or(false),
                    address: text(status.addr),
                    availability: text(spec.availability),
                    state: text(status.state),
                    labels: labels(spec.labels),
                    platform: format!("{}/{}", text(platform.os), text(platform.architecture)),
                }
            })
            .collect();
    }

    count("containers");
    let containers = engine
        .list_containers()
        .await
        .map_err(list_err("containers"))?;
    snap.containers = containers
        .into_iter()
        .map(|c| {
            let labels = labels(c.labels);
            Container {
                id: text(c.id),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                image: text(c.image),
                state: text(c.state),
                health: c
                    .health
                    .and_then(|h| h.status)
                    .map(|s| s.to_string())
                    .filter(|s| s != "none")
                    .unwrap_or_default(),
                ips: c
                    .network_settings
                    .and_then(|n| n.networks)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(name, e)| {
                        e.ip_address
                            .filter(|ip| !ip.is_empty())
                            .map(|ip| (name, ip))
                    })
                    .collect(),
                service: labels.get("com.docker.swarm.service.name").cloned(),
                labels,
            }
        })
        .collect();
    if !manager {
        snap.services = services_from_containers(&snap.containers);
    }
    snap.own = own_container(&snap.containers);
    snap.sort();
    m.snapshots.inc();
    Ok(snap)
}

/// Outside Swarm (plain Docker, Compose, or a worker without the Swarm API) the local
/// running containers stand in for services, like docker-gen: grouped by Swarm service or
/// Compose service label, else one per container, each container a running task. The
/// built-in templates then route by container labels.
fn services_from_containers(containers: &[Container]) -> Vec<Service> {
    let mut by_name: BTreeMap<String, Service> = BTreeMap::new();
    for c in containers.iter().filter(|c| c.state == "running") {
        let name = c
            .service
            .clone()
            .or_else(|| {
                let project = c.labels.get("com.docker.compose.project")?;
                let service = c.labels.get("com.docker.compose.service")?;
                Some(format!("{project}_{service}"))
            })
            .unwrap_or_else(|| c.name.clone());
        let service = by_name.entry(name.clone()).or_insert_with(|| Service {
            id: c.id.clone(),
            name,
            image: c.image.clone(),
            labels: c.labels.clone(),
            mode: "container".into(),
            ..Service::default()
        });
        for net in c.ips.keys() {
            if !service.networks.contains(net) {
                service.networks.push(net.clone());
            }
        }
        service.tasks.push(Task {
            id: c.id.clone(),
            service_id: service.id.clone(),
            state: "running".into(),
            desired_state: "running".into(),
            container_id: Some(c.id.clone()),
            ips: c.ips.clone(),
            ..Task::default()
        });
    }
    by_name.into_values().collect()
}

/// drover's own container: Docker sets the hostname to the short container id unless the
/// operator overrides it, so match on that.
fn own_container(containers: &[Container]) -> Option<Own> {
    // The hostname cannot change under a running container: read it once, not per snapshot.
    static HOSTNAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let host = HOSTNAME.get_or_init(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    });
    if host.len() < 12 {
        return None;
    }
    containers
        .iter()
        .find(|c| c.id.starts_with(host))
        .map(|c| Own {
            container_id: c.id.clone(),
            service: c.service.clone(),
        })
}

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
            mode: "replicated".into(),
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
    fn raw_task_json_yields_ips_per_network_name() {
        let raw: RawTask = serde_json::from_str(
            r#"{"ID":"t1","ServiceID":"s1","Slot":1,"NodeID":"n1","DesiredState":"running",
                "Status":{"State":"running","Message":"started","ContainerStatus":{"ContainerID":"c1"}},
                "NetworksAttachments":[{"Network":{"ID":"x","Spec":{"Name":"web"}},"Addresses":["10.0.1.5/24"]}]}"#,
        )
        .expect("task json");
        let t = Task::from(raw);
        assert_eq!(t.ips.get("web").map(String::as_str), Some("10.0.1.5"));
        assert_eq!(t.container_id.as_deref(), Some("c1"));
        assert!(t.is_live());
    }

    #[test]
    fn outside_swarm_containers_become_services_grouped_by_compose_service() {
        let c = |id: &str, name: &str, service: &str, ip: &str| Container {
            id: id.into(),
            name: name.into(),
            state: "running".into(),
            labels: [
                ("com.docker.compose.project".to_owned(), "lab".to_owned()),
                ("com.docker.compose.service".to_owned(), service.to_owned()),
                ("routing-host".to_owned(), "a.example.com".to_owned()),
            ]
            .into(),
            ips: [("lab_default".to_owned(), ip.to_owned())].into(),
            ..Container::default()
        };
        let services = services_from_containers(&[
            c("1", "lab-web-1", "web", "172.18.0.2"),
            c("2", "lab-web-2", "web", "172.18.0.3"),
            c("3", "lab-db-1", "db", "172.18.0.4"),
        ]);
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["lab_db", "lab_web"]);
        let web = &services[1];
        assert_eq!(web.tasks.len(), 2);
        assert!(web.tasks.iter().all(Task::is_live));
        assert_eq!(web.networks, ["lab_default"]);
        assert_eq!(
            web.labels.get("routing-host").map(String::as_str),
            Some("a.example.com")
        );
    }

    #[test]
    fn raw_task_with_missing_fields_does_not_panic() {
        let raw: RawTask = serde_json::from_str("{}").expect("empty task json");
        let t = Task::from(raw);
        assert!(t.ips.is_empty());
        assert!(!t.is_live());
    }
}
