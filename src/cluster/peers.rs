//! Peers from Swarm itself: no other discovery.
//!
//! drover's own service is the one its own container is a task of (the container's Swarm
//! labels, in [`Snapshot::own`]); the live tasks of that service are the agents, one per
//! node for a global service (a task still `starting`, its health check not yet passed,
//! counts too). An agent's address is its task's IP on a network the
//! service is attached to (so every peer shares it), never ingress. Pure: computed from a
//! snapshot, so the controller and the tests see the same answer.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::state::{Snapshot, TaskState};

/// One agent: the node it runs on and where its API answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node_id: String,
    pub hostname: String,
    pub addr: SocketAddr,
    /// `addr` is on the agents network (labelled `drover.agents`), which only drover
    /// joins: the agent answers there and nowhere else.
    pub private: bool,
}

/// The agents of drover's own service, keyed by node id (empty when drover does not run as
/// a Swarm service or the snapshot has no tasks: on a worker).
pub fn peers(snapshot: &Snapshot, port: u16) -> BTreeMap<String, Peer> {
    let Some(own) = snapshot.own.as_ref().and_then(|o| o.service.as_deref()) else {
        return BTreeMap::new();
    };
    let Some(service) = snapshot.service(own) else {
        return BTreeMap::new();
    };
    let ingress: Vec<&str> = snapshot
        .networks
        .iter()
        .filter(|n| n.ingress)
        .map(|n| n.name.as_str())
        .collect();
    let agents: Vec<&str> = snapshot
        .networks
        .iter()
        .filter(|n| n.agents)
        .map(|n| n.name.as_str())
        .collect();
    // The service's own networks, the agents network first, then in spec order; the first
    // one every task has an IP on.
    let mut shared: Vec<&str> = service
        .networks
        .iter()
        .map(String::as_str)
        .filter(|n| !ingress.contains(n) && *n != "ingress")
        .collect();
    shared.sort_by_key(|n| !agents.contains(n));
    let mut out = BTreeMap::new();
    // A task Swarm holds in `starting` while the image's health check has not passed yet
    // runs drover all the same, and its agent answers long before the check does (every
    // 10 s in the shipped image): a restarted drover is a peer from its first moment, and
    // one that does not answer yet is retried like any other. A running task wins over a
    // starting one on the same node.
    let starting = |t: &&crate::state::Task| {
        t.state == TaskState::Starting && t.desired_state == TaskState::Running
    };
    let live = service.tasks.iter().filter(|t| t.is_live());
    for task in live.chain(service.tasks.iter().filter(starting)) {
        if out.contains_key(&task.node_id) {
            continue;
        }
        let found = shared
            .iter()
            .find_map(|n| task.ips.get_key_value(*n))
            .or_else(|| {
                task.ips
                    .iter()
                    .find(|(n, _)| !ingress.contains(&n.as_str()) && *n != "ingress")
            });
        let Some((network, ip)) = found else { continue };
        let Ok(ip) = ip.parse::<IpAddr>() else {
            continue;
        };
        let private = agents.contains(&network.as_str());
        let hostname = snapshot
            .nodes
            .iter()
            .find(|n| n.id == task.node_id)
            .map(|n| n.hostname.clone())
            .unwrap_or_default();
        out.insert(
            task.node_id.clone(),
            Peer {
                node_id: task.node_id.clone(),
                hostname,
                addr: SocketAddr::new(ip, port),
                private,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Network, Node, Own, Service, Task};

    fn task(node: &str, state: &str, ips: &[(&str, &str)]) -> Task {
        Task {
            node_id: node.into(),
            state: state.into(),
            desired_state: "running".into(),
            ips: ips
                .iter()
                .map(|(n, ip)| (n.to_string(), ip.to_string()))
                .collect(),
            ..Task::default()
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            swarm: true,
            node_id: "n1".into(),
            own: Some(Own {
                container_id: "c".into(),
                service: Some("drover_drover".into()),
            }),
            networks: vec![Network {
                name: "ingress".into(),
                ingress: true,
                ..Network::default()
            }],
            nodes: ["n1", "n2", "n3"]
                .iter()
                .map(|id| Node {
                    id: id.to_string(),
                    hostname: format!("host-{id}"),
                    ..Node::default()
                })
                .collect(),
            services: vec![
                Service {
                    name: "drover_drover".into(),
                    networks: vec!["ingress".into(), "drover_cluster".into()],
                    tasks: vec![
                        task(
                            "n1",
                            "running",
                            &[("ingress", "10.0.0.5"), ("drover_cluster", "10.1.0.2")],
                        ),
                        task("n2", "running", &[("drover_cluster", "10.1.0.3")]),
                        task("n3", "starting", &[("drover_cluster", "10.1.0.4")]),
                    ],
                    ..Service::default()
                },
                Service {
                    name: "other".into(),
                    tasks: vec![task("n3", "running", &[("drover_cluster", "10.1.0.9")])],
                    ..Service::default()
                },
            ],
            ..Snapshot::default()
        }
    }

    #[test]
    fn running_and_starting_tasks_of_the_own_service_are_the_peers_on_the_shared_network() {
        let p = peers(&snapshot(), 9091);
        assert_eq!(p.len(), 3);
        assert_eq!(p["n1"].addr, "10.1.0.2:9091".parse().unwrap());
        assert_eq!(p["n1"].hostname, "host-n1");
        assert_eq!(p["n2"].addr, "10.1.0.3:9091".parse().unwrap());
        // Held in `starting` by its health check, its agent already answers.
        assert_eq!(p["n3"].addr, "10.1.0.4:9091".parse().unwrap());
    }

    #[test]
    fn a_running_task_wins_over_a_starting_one_and_a_preparing_one_is_no_peer() {
        let mut s = snapshot();
        let tasks = &mut s.services[0].tasks;
        tasks.push(task("n2", "starting", &[("drover_cluster", "10.1.0.7")]));
        tasks[2].state = "preparing".into();
        let p = peers(&s, 9091);
        assert_eq!(p["n2"].addr, "10.1.0.3:9091".parse().unwrap());
        assert!(!p.contains_key("n3"));
    }

    #[test]
    fn without_an_own_service_there_are_no_peers() {
        let mut s = snapshot();
        s.own = None;
        assert!(peers(&s, 9091).is_empty());
        s.own = Some(Own {
            container_id: "c".into(),
            service: None,
        });
        assert!(peers(&s, 9091).is_empty());
    }

    #[test]
    fn the_agents_network_is_taken_first_whatever_the_spec_order() {
        let mut s = snapshot();
        s.networks.push(Network {
            name: "home_agents".into(),
            agents: true,
            ..Network::default()
        });
        let svc = &mut s.services[0];
        svc.networks.push("home_agents".into());
        for (t, ip) in svc
            .tasks
            .iter_mut()
            .zip(["10.2.0.2", "10.2.0.3", "10.2.0.4"])
        {
            t.ips.insert("home_agents".into(), ip.into());
        }
        // n3's task has no address there yet: it is reached on the shared network.
        svc.tasks[2].ips.remove("home_agents");
        let p = peers(&s, 9092);
        assert_eq!(p["n1"].addr, "10.2.0.2:9092".parse().unwrap());
        assert!(p["n1"].private);
        assert_eq!(p["n2"].addr, "10.2.0.3:9092".parse().unwrap());
        assert_eq!(p["n3"].addr, "10.1.0.4:9092".parse().unwrap());
        assert!(!p["n3"].private);
        assert!(
            !peers(&snapshot(), 9092)["n1"].private,
            "no agents network, nothing private"
        );
    }
}
