//! Prometheus scrape jobs: the `prometheus_jobs` of the context.
//!
//! As the home lab's template had them: one job per distinct `prometheus-job` label value,
//! whose targets are the live task addresses of every service carrying it on its
//! `prometheus-port` (a service without one is not scraped), plus a `docker` job, the
//! engine's own metrics on every node ([`ENGINE_METRICS_PORT`]), unless a service already
//! names its job `docker`. Invariants: jobs are sorted by name; targets keep service order,
//! then task order.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::labels;
use super::views::{ServiceView, address};
use crate::state::Node;

/// The port of the engine's metrics (`"metrics-addr": "0.0.0.0:9323"` in daemon.json).
pub const ENGINE_METRICS_PORT: u16 = 9323;
/// The job that scrapes every node's engine.
pub const ENGINE_JOB: &str = "docker";

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

/// One job per distinct `prometheus-job` of services with a `prometheus-port`, targets
/// from live tasks; plus `docker`.
pub fn jobs(services: &[ServiceView<'_>], nodes: &[Node]) -> Vec<JobView> {
    let mut jobs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for service in services {
        // The lab's rule: a job without a port is not scraped (a guess at a port would
        // scrape the wrong thing, or the app's own page, every 15 s).
        let (Some(job), Some(port)) = (
            service.label(labels::PROMETHEUS_JOB),
            service.port(labels::PROMETHEUS_PORT),
        ) else {
            continue;
        };
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
    if !out.iter().any(|j| j.name == ENGINE_JOB) {
        out.push(JobView {
            name: ENGINE_JOB.to_owned(),
            targets: nodes
                .iter()
                .filter(|n| !n.address.is_empty())
                .map(|n| address(&n.address, ENGINE_METRICS_PORT))
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
    fn a_job_scrapes_prometheus_port_and_a_service_without_one_is_not_scraped() {
        let job = (labels::PROMETHEUS_JOB, "app");
        let out = scrape(
            &[
                service("a", &[job, (labels::PROMETHEUS_PORT, "9000")], "10.0.0.1"),
                service("b", &[job, (labels::PORT, "8080")], "10.0.0.2"),
                service("c", &[job, (labels::PROMETHEUS_PORT, "80")], "fd00::3"),
                service("d", &[(labels::PROMETHEUS_PORT, "8080")], "10.0.0.4"),
            ],
            &[],
        );
        assert_eq!(
            out,
            [
                JobView {
                    name: "app".to_owned(),
                    targets: vec!["10.0.0.1:9000".to_owned(), "[fd00::3]:80".to_owned()],
                },
                JobView {
                    name: "docker".to_owned(),
                    targets: Vec::new(),
                },
            ]
        );
    }

    #[test]
    fn the_docker_job_scrapes_every_engine_unless_a_service_names_its_job_docker() {
        let nodes = [node("192.168.1.2"), node(""), node("192.168.1.1")];
        let out = scrape(
            &[service(
                "z",
                &[
                    (labels::PROMETHEUS_JOB, "apps"),
                    (labels::PROMETHEUS_PORT, "80"),
                ],
                "10.0.0.1",
            )],
            &nodes,
        );
        let names: Vec<&str> = out.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["apps", "docker"]);
        assert_eq!(out[1].targets, ["192.168.1.2:9323", "192.168.1.1:9323"]);

        let own = service(
            "n",
            &[
                (labels::PROMETHEUS_JOB, "docker"),
                (labels::PROMETHEUS_PORT, "9323"),
            ],
            "10.0.0.9",
        );
        let out = scrape(&[own], &nodes);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].targets, ["10.0.0.9:9323"]);
    }
}
