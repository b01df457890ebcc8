//! The Tera context of one render: the snapshot's views, plus the routing and scrape jobs
//! computed in Rust, handed over as only the top-level variables the template mentions.
//!
//! Grouping services by host and context, picking each service's network and listing the
//! live task addresses is done once per render, in plain Rust, so the built-in templates
//! are straight loops (fast, and nothing clever to get wrong in Tera). Invariants: every
//! service is validated once, and one with an invalid label or a clashing route is left
//! out of `services`, `hosts`, `upstreams` and `prometheus_jobs` alike and returned as
//! skipped; everything is built from already-sorted snapshot collections or `BTreeMap`s,
//! so the same snapshot gives the same context. This file is the top of render's
//! computation: it uses `views`, `nginx` and `prometheus`, and none of them uses it.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Map, Value};

use super::labels::validate_service;
use super::nginx::{HostView, UpstreamView, bucket_size, routes, unrouted_extra_hosts};
use super::prometheus::{JobView, jobs};
use super::views::{Networks, ServiceView, service_view};
use crate::config::Owners;
use crate::state::{Container, Network, Node, Own, Service, Snapshot};
use crate::status::SkippedService;

/// The top-level variables a template mentions. Serializing the whole snapshot into Tera
/// values costs far more than rendering, so only what the source names is handed over (a
/// mention in a comment merely costs time; `__tera_context` asks for everything).
#[derive(Debug, Clone, Copy)]
pub struct Uses {
    services: bool,
    containers: bool,
    nodes: bool,
    networks: bool,
    hosts: bool,
    upstreams: bool,
    prometheus_jobs: bool,
}

impl Uses {
    pub fn scan(source: &str) -> Uses {
        let all = source.contains("__tera_context");
        let has = |name: &str| all || source.contains(name);
        Uses {
            services: has("services"),
            containers: has("containers"),
            nodes: has("nodes"),
            networks: has("networks"),
            hosts: has("hosts"),
            upstreams: has("upstreams"),
            prometheus_jobs: has("prometheus_jobs"),
        }
    }
}

pub struct Root<'a> {
    pub swarm: bool,
    pub node_id: &'a str,
    pub target: TargetView<'a>,
    pub services: Option<Vec<ServiceView<'a>>>,
    pub containers: Option<&'a [Container]>,
    pub nodes: Option<&'a [Node]>,
    pub networks: Option<&'a [Network]>,
    pub own: Option<&'a Own>,
    pub hosts: Option<Vec<HostView>>,
    /// `routing-extra-hosts` names of services that route nothing (with `hosts`).
    pub extra_hosts: Vec<String>,
    pub upstreams: Option<Vec<UpstreamView>>,
    pub prometheus_jobs: Option<Vec<JobView>>,
}

#[derive(Serialize)]
pub struct TargetView<'a> {
    pub name: &'a str,
    pub network: Option<&'a str>,
}

fn list<T: Into<Value>>(items: Vec<T>) -> Value {
    Value::Array(items.into_iter().map(Into::into).collect())
}

impl Root<'_> {
    /// The Tera context: routing views moved in, snapshot parts serialized.
    pub fn into_context(self) -> Result<tera::Context, serde_json::Error> {
        let mut m = Map::new();
        m.insert("swarm".into(), Value::Bool(self.swarm));
        m.insert("node_id".into(), Value::String(self.node_id.to_owned()));
        m.insert("target".into(), serde_json::to_value(&self.target)?);
        m.insert("own".into(), serde_json::to_value(self.own)?);
        if let Some(v) = &self.services {
            m.insert("services".into(), serde_json::to_value(v)?);
        }
        if let Some(v) = self.containers {
            m.insert("containers".into(), serde_json::to_value(v)?);
        }
        if let Some(v) = self.nodes {
            m.insert("nodes".into(), serde_json::to_value(v)?);
        }
        if let Some(v) = self.networks {
            m.insert("networks".into(), serde_json::to_value(v)?);
        }
        if let Some(v) = self.hosts {
            let bucket = bucket_size(&v).map_or(Value::Null, |n| Value::from(n as u64));
            m.insert("server_names_hash_bucket_size".into(), bucket);
            m.insert("hosts".into(), list(v));
            m.insert("extra_hosts".into(), list(self.extra_hosts));
        }
        if let Some(v) = self.upstreams {
            m.insert("upstreams".into(), list(v));
        }
        if let Some(v) = self.prometheus_jobs {
            m.insert("prometheus_jobs".into(), list(v));
        }
        tera::Context::from_value(Value::Object(m)).map_err(|e| {
            // Only fails for a non-object, which the map above never is.
            serde_json::Error::io(std::io::Error::other(e.to_string()))
        })
    }
}

/// Builds the context for one render; services failing validation are left out and returned.
pub fn build<'a>(
    snapshot: &'a Snapshot,
    target_name: &'a str,
    target_network: Option<&'a str>,
    proxy: Option<&str>,
    uses: Uses,
    certificates: Option<&BTreeSet<String>>,
    owners: &Owners,
) -> (Root<'a>, Vec<SkippedService>) {
    let mut skipped = Vec::new();
    let ingress: BTreeSet<&str> = snapshot
        .networks
        .iter()
        .filter(|n| n.ingress)
        .map(|n| n.name.as_str())
        .chain(std::iter::once("ingress"))
        .collect();
    let proxy_networks: Vec<&str> = proxy
        .and_then(|name| find_proxy(snapshot, name))
        .map(|p| {
            p.networks
                .iter()
                .map(String::as_str)
                .filter(|n| !ingress.contains(n))
                .collect()
        })
        .unwrap_or_default();
    let networks = Networks {
        target: target_network,
        proxy: &proxy_networks,
        ingress: &ingress,
    };

    let mut services = Vec::with_capacity(snapshot.services.len());
    for service in &snapshot.services {
        match validate_service(service) {
            Ok(()) => services.push(service_view(service, &networks)),
            Err(s) => skipped.push(s),
        }
    }

    let (mut hosts, upstreams) = routes(&services, owners, &mut skipped);
    if let Some(present) = certificates {
        for h in hosts.iter_mut().filter(|h| h.tls) {
            h.cert = present.contains(&h.name);
        }
    }
    let routed: BTreeSet<&str> = skipped.iter().map(|s| s.service.as_str()).collect();
    services.retain(|s| !routed.contains(s.name));
    let extra_hosts = if uses.hosts {
        unrouted_extra_hosts(&services, &hosts)
    } else {
        Vec::new()
    };
    let prometheus_jobs = uses
        .prometheus_jobs
        .then(|| jobs(&services, &snapshot.nodes));

    let root = Root {
        swarm: snapshot.swarm,
        node_id: &snapshot.node_id,
        target: TargetView {
            name: target_name,
            network: target_network,
        },
        services: uses.services.then_some(services),
        containers: uses.containers.then_some(&snapshot.containers[..]),
        nodes: uses.nodes.then_some(&snapshot.nodes[..]),
        networks: uses.networks.then_some(&snapshot.networks[..]),
        own: snapshot.own.as_ref(),
        hosts: uses.hosts.then_some(hosts),
        extra_hosts,
        upstreams: uses.upstreams.then_some(upstreams),
        prometheus_jobs,
    };
    (root, skipped)
}

/// The proxy's service: named exactly, or `STACK_NAME` as `docker stack deploy` names it.
fn find_proxy<'s>(snapshot: &'s Snapshot, name: &str) -> Option<&'s Service> {
    let suffix = format!("_{name}");
    snapshot
        .services
        .iter()
        .find(|s| s.name == name)
        .or_else(|| snapshot.services.iter().find(|s| s.name.ends_with(&suffix)))
}
