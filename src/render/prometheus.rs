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
