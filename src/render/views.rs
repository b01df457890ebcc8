//! The snapshot's services and tasks as templates see them: each service with its routing
//! network chosen and the addresses of its live tasks on it.
//!
//! These views are the shared nouns of render: the `services` template variable, and the
//! input from which `nginx` and `prometheus` compute their parts of the context. So this
//! file sits below them and imports neither. Invariants: a view borrows from the snapshot
//! (no label, name or address is copied), keeps its order (services by name, tasks by slot
//! then node), and `ips` lists exactly the live tasks that have an address on `network`, in
//! task order.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::labels;
use crate::state::{Port, Service, Task};

#[derive(Serialize)]
pub struct ServiceView<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub image: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub mode: &'a str,
    pub replicas: Option<u64>,
    pub networks: &'a [String],
    pub ports: &'a [Port],
    pub update_state: Option<&'a str>,
    /// Swarm's `CreatedAt` (RFC 3339), empty when unknown.
    pub created_at: &'a str,
    /// The network this service is routed on (see the module docs of `render`).
    pub network: Option<&'a str>,
    /// Addresses of live tasks on `network`, in task order.
    pub ips: Vec<&'a str>,
    pub tasks: Vec<TaskView<'a>>,
}

#[derive(Serialize)]
pub struct TaskView<'a> {
    pub id: &'a str,
    pub service_id: &'a str,
    pub slot: Option<i64>,
    pub node_id: &'a str,
    pub state: &'a str,
    pub desired_state: &'a str,
    pub container_id: Option<&'a str>,
    pub ips: &'a BTreeMap<String, String>,
    pub message: &'a str,
    pub error: Option<&'a str>,
    /// Running and desired running.
    pub live: bool,
    /// The address on the service's routing network, if any.
    pub ip: Option<&'a str>,
}

impl<'a> ServiceView<'a> {
    /// The value of one of the service's labels.
    pub fn label(&self, name: &str) -> Option<&'a str> {
        self.labels.get(name).map(String::as_str)
    }

    /// A port label's value; `None` when unset (validation has refused anything else).
    pub fn port(&self, name: &str) -> Option<u16> {
        self.label(name).and_then(|p| p.parse().ok())
    }
}

/// What decides a service's routing network.
pub struct Networks<'n, 'a> {
    /// The target's `network`, when configured.
    pub target: Option<&'a str>,
    /// The proxy service's networks (ingress left out), in its order.
    pub proxy: &'n [&'a str],
    /// The ingress networks, never a routing network unless named.
    pub ingress: &'n BTreeSet<&'a str>,
}

pub fn service_view<'a>(service: &'a Service, networks: &Networks<'_, 'a>) -> ServiceView<'a> {
    // The home lab's template used the network the nginx service is on; a configured or
    // labelled network wins, and a service sharing none falls back to its first own one.
    let network = networks
        .target
        .or_else(|| service.labels.get(labels::NETWORK).map(String::as_str))
        .or_else(|| {
            service
                .networks
                .iter()
                .map(String::as_str)
                .find(|n| networks.proxy.contains(n))
        })
        .or_else(|| {
            service
                .networks
                .iter()
                .map(String::as_str)
                .find(|n| !networks.ingress.contains(n))
        });
    let tasks: Vec<TaskView<'a>> = service
        .tasks
        .iter()
        .map(|t| task_view(t, network))
        .collect();
    let ips = tasks
        .iter()
        .filter(|t| t.live)
        .filter_map(|t| t.ip)
        .collect();
    ServiceView {
        id: &service.id,
        name: &service.name,
        image: &service.image,
        labels: &service.labels,
        mode: service.mode.as_str(),
        replicas: service.replicas,
        networks: &service.networks,
        ports: &service.ports,
        update_state: service.update_state.as_deref(),
        created_at: &service.created_at,
        network,
        ips,
        tasks,
    }
}

fn task_view<'a>(task: &'a Task, network: Option<&str>) -> TaskView<'a> {
    TaskView {
        id: &task.id,
        service_id: &task.service_id,
        slot: task.slot,
        node_id: &task.node_id,
        state: task.state.as_str(),
        desired_state: task.desired_state.as_str(),
        container_id: task.container_id.as_deref(),
        ips: &task.ips,
        message: &task.message,
        error: task.error.as_deref(),
        live: task.is_live(),
        ip: network.and_then(|n| task.ips.get(n)).map(String::as_str),
    }
}

/// `IP:PORT` as nginx and Prometheus write it, an IPv6 address in brackets.
pub fn address(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert_eq!(address("fd00::1", 80), "[fd00::1]:80");
        assert_eq!(address("10.0.0.1", 80), "10.0.0.1:80");
    }
}
