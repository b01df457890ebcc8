//! Prometheus scrape jobs: the `prometheus_jobs` of the context.
//!
//! One job per distinct `prometheus-job` label value, whose targets are the live task
//! addresses of every service carrying it, on `prometheus-port`, else `routing-port`, else
//! [`DEFAULT_PORT`]; plus a `nodes` job (every node with an address, on node-exporter's
//! port) unless a service already names its job `nodes`. Invariants: jobs are sorted by
//! name; targets keep service order, then task order.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::labels;
use super::views::{ServiceView, address};
use crate::state::Node;

/// The port Prometheus scrapes when neither `prometheus-port` nor `routing-port` is set.
pub const DEFAULT_PORT: u16 = 80;
/// Port the `nodes` Prometheus job scrapes (node-exporter).
pub const NODE_EXPORTER_PORT: u16 = 9100;

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct JobView {
    pub name: String,
    pub targets: Vec<String>,
}

// Moved into a Tera value by hand, as the nginx views are: `serde_json::to_value` would
// copy every string once more.
impl From<JobView> for Value {
    fn from(j: JobView) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), Value::String(j.name));
        m.insert(
            "targets".into(),
            Value::Array(j.targets.into_iter().map(Value::String).collect()),
        );
        Value::Object(m)
    }
}

/// One job per distinct `prometheus-job`, targets from live tasks; plus `nodes`.
pub fn jobs(services: &[ServiceView<'_>], nodes: &[Node]) -> Vec<JobView> {
    let mut jobs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for service in services {
        let Some(job) = service.label(labels::PROMETHEUS_JOB) else {
            continue;
        };
        // Exporters like prometheus_flask_exporter serve /metrics on the app's own port.
        let port = service
            .port(labels::PROMETHEUS_PORT)
            .or_else(|| service.port(labels::PORT))
            .unwrap_or(DEFAULT_PORT);
        jobs.entry(job)
            .or_default()
            .extend(service.ips.iter().map(|ip| address(ip, port)));
    }
    let mut out: Vec<JobView> = jobs
        .into_iter()
        .map(|(name, targets)| JobView {
            name: name.to_owned(),
            targets,
        })
        .collect();
    if !out.iter().any(|j| j.name == "nodes") {
        out.push(JobView {
            name: "nodes".to_owned(),
            targets: nodes
                .iter()
                .filter(|n| !n.address.is_empty())
                .map(|n| address(&n.address, NODE_EXPORTER_PORT))
                .collect(),
        });
        out.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::render::views::{Networks, service_view};
    use crate::state::{Service, Task};

    fn service(name: &str, labels: &[(&str, &str)], ip: &str) -> Service {
        Service {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            networks: vec!["web".to_owned()],
            tasks: vec![Task::running(
                &format!("{name}.1"),
                name,
                [("web".to_owned(), ip.to_owned())].into(),
            )],
            ..Service::default()
        }
    }

    fn node(address: &str) -> Node {
        Node {
            address: address.to_owned(),
            ..Node::default()
        }
    }

    fn scrape(services: &[Service], nodes: &[Node]) -> Vec<JobView> {
        let ingress = BTreeSet::new();
        let networks = Networks {
            target: None,
            proxy: &[],
            ingress: &ingress,
        };
        let views: Vec<ServiceView<'_>> = services
            .iter()
            .map(|s| service_view(s, &networks))
            .collect();
        jobs(&views, nodes)
    }

    #[test]
    fn a_job_scrapes_prometheus_port_else_routing_port_else_port_80() {
        let job = (labels::PROMETHEUS_JOB, "app");
        let out = scrape(
            &[
                service("a", &[job, (labels::PROMETHEUS_PORT, "9000")], "10.0.0.1"),
                service("b", &[job, (labels::PORT, "8080")], "10.0.0.2"),
                service("c", &[job], "fd00::3"),
                service("d", &[(labels::PORT, "8080")], "10.0.0.4"),
            ],
            &[],
        );
        assert_eq!(
            out,
            [
                JobView {
                    name: "app".to_owned(),
                    targets: vec![
                        "10.0.0.1:9000".to_owned(),
                        "10.0.0.2:8080".to_owned(),
                        "[fd00::3]:80".to_owned(),
                    ],
                },
                JobView {
                    name: "nodes".to_owned(),
                    targets: Vec::new(),
                },
            ]
        );
    }

    #[test]
    fn the_nodes_job_lists_node_exporters_unless_a_service_names_its_job_nodes() {
        let nodes = [node("192.168.1.2"), node(""), node("192.168.1.1")];
        let out = scrape(
            &[service(
                "z",
                &[(labels::PROMETHEUS_JOB, "apps")],
                "10.0.0.1",
            )],
            &nodes,
        );
        let names: Vec<&str> = out.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["apps", "nodes"]);
        assert_eq!(out[1].targets, ["192.168.1.2:9100", "192.168.1.1:9100"]);

        let own = service("n", &[(labels::PROMETHEUS_JOB, "nodes")], "10.0.0.9");
        let out = scrape(&[own], &nodes);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].targets, ["10.0.0.9:80"]);
    }
}
