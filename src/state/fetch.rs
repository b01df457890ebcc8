//! Fetching a [`Snapshot`] from the engine: a constant number of list calls, each engine
//! model converted field by field so a missing field never panics.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::*;

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
    snap.networks = networks.into_iter().map(network).collect();

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

        let mut by_service: HashMap<String, Vec<Task>> = HashMap::new();
        for t in tasks {
            let t = Task::from(t);
            by_service.entry(t.service_id.clone()).or_default().push(t);
        }
        snap.services = services
            .into_iter()
            .map(|s| service(s, &mut by_service, &snap.networks))
            .collect();
        snap.nodes = nodes.into_iter().map(node).collect();
    }

    count("containers");
    let containers = engine
        .list_containers()
        .await
        .map_err(list_err("containers"))?;
    snap.containers = containers.into_iter().map(container).collect();
    if !manager {
        snap.services = local::services_from_containers(&snap.containers);
    }
    snap.own = local::own_container(&snap.containers);
    snap.sort();
    m.snapshots.inc();
    Ok(snap)
}

fn network(n: bollard::models::Network) -> Network {
    Network {
        id: text(n.id),
        name: text(n.name),
        driver: text(n.driver),
        scope: text(n.scope),
        ingress: n.ingress.unwrap_or(false),
        agents: n
            .labels
            .as_ref()
            .and_then(|l| l.get(super::AGENTS_NETWORK_LABEL))
            .is_some_and(|v| v == "true"),
    }
}

/// A service with its tasks taken out of `by_service`, networks named rather than by id
/// (a spec may name either).
fn service(
    s: bollard::models::Service,
    by_service: &mut HashMap<String, Vec<Task>>,
    networks: &[Network],
) -> Service {
    let net_name = |id: &str| {
        networks
            .iter()
            .find(|n| n.id == id || n.name == id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| id.to_owned())
    };
    let id = text(s.id);
    let spec = s.spec.unwrap_or_default();
    let mode = spec.mode.unwrap_or_default();
    let (mode, replicas) = if let Some(r) = mode.replicated {
        (ServiceMode::Replicated, r.replicas.map(|n| n.max(0) as u64))
    } else if mode.global.is_some() {
        (ServiceMode::Global, None)
    } else if mode.replicated_job.is_some() {
        (ServiceMode::ReplicatedJob, None)
    } else {
        (ServiceMode::GlobalJob, None)
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
        mode,
        replicas,
        networks,
        ports,
        created_at: text(s.created_at),
        update_state: s
            .update_status
            .and_then(|u| u.state)
            .map(|st| st.to_string())
            .filter(|st| !st.is_empty()),
    }
}

fn node(n: bollard::models::Node) -> Node {
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
}

fn container(c: bollard::models::ContainerSummary) -> Container {
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
        created: c.created.unwrap_or(0),
        labels,
    }
}

fn list_err(what: &'static str) -> impl FnOnce(crate::docker::Error) -> Error {
    move |source| Error::List { what, source }
}

fn text<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn labels(m: Option<HashMap<String, String>>) -> BTreeMap<String, String> {
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
            desired_state: TaskState::parse(&t.desired_state),
            state: status
                .as_ref()
                .map(|s| TaskState::parse(&s.state))
                .unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn raw_task_with_missing_fields_does_not_panic() {
        let raw: RawTask = serde_json::from_str("{}").expect("empty task json");
        let t = Task::from(raw);
        assert!(t.ips.is_empty());
        assert!(!t.is_live());
    }
}
