//! The Tera context: the snapshot reshaped for templates, plus routing data computed in Rust.
//!
//! Grouping services by host and context, picking each service's network and listing the
//! live task addresses is done here once per render, in plain Rust, so the built-in
//! templates are straight loops (fast, and nothing clever to get wrong in Tera). Everything
//! is built from already-sorted snapshot collections or `BTreeMap`s, so it is deterministic.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};

use super::labels::{self, validate_service};
use crate::state::{Container, Network, Node, Own, Port, Service, Snapshot, Task};
use crate::status::SkippedService;

/// The port Prometheus scrapes when neither `prometheus-port` nor `routing-port` is set.
pub const DEFAULT_PORT: u16 = 80;
/// The realm when the service's name cannot be one (never for a name Docker accepts).
pub const DEFAULT_REALM: &str = "Restricted";
/// nginx's `server_names_hash_bucket_size` on 64-byte cache lines: drover only writes the
/// directive when a host name needs more, so a main config setting it is not disturbed.
pub const NGINX_DEFAULT_BUCKET: usize = 64;
/// Port the `nodes` Prometheus job scrapes (node-exporter).
pub const NODE_EXPORTER_PORT: u16 = 9100;

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
    pub upstreams: Option<Vec<UpstreamView>>,
    pub prometheus_jobs: Option<Vec<JobView>>,
}

#[derive(Serialize)]
pub struct TargetView<'a> {
    pub name: &'a str,
    pub network: Option<&'a str>,
}

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

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    /// False only when every service on the host sets `routing-tls=false`.
    pub tls: bool,
    /// Whether the certificate files of a TLS host are there (true when drover does not
    /// know: nothing probed them). A TLS host without them is served on port 80.
    pub cert: bool,
    pub locations: Vec<LocationView>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct LocationView {
    /// The nginx location: the context with a trailing `/` (`/webhook/`, or `/`).
    pub path: String,
    pub upstream: String,
    /// What follows the upstream in `proxy_pass`: `/` strips the context, `/api/` maps it
    /// onto the backend's `routing-internal-context`, `""` passes the URI through (private
    /// locations).
    pub uri: String,
    /// A `routing-private-context` location: private networks only.
    pub private: bool,
    pub https: bool,
    /// The `auth_basic_user_file`, absolute.
    pub auth: Option<String>,
    pub auth_realm: String,
    pub max_body: Option<String>,
    /// Services routed here, by name.
    pub services: Vec<String>,
}

/// Per-location settings; services sharing a (host, context) must agree on them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    https: bool,
    auth: Option<String>,
    /// The `routing-auth-realm` label; unset means the first service's name.
    realm: Option<String>,
    max_body: Option<String>,
    /// The backend path (`routing-internal-context` as a prefix).
    backend: String,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct UpstreamView {
    pub name: String,
    /// `IP:PORT` of each live task; empty means nothing is up (templates emit a `down` server).
    pub servers: Vec<String>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct JobView {
    pub name: String,
    pub targets: Vec<String>,
}

fn string(s: String) -> Value {
    Value::String(s)
}

fn strings(list: Vec<String>) -> Value {
    Value::Array(list.into_iter().map(Value::String).collect())
}

fn opt(s: Option<String>) -> Value {
    s.map_or(Value::Null, Value::String)
}

// The routing views are moved into Tera values by hand rather than through
// `serde_json::to_value`, which would copy every string once more: at 1,000 services that
// copy is most of the render time.
impl From<HostView> for Value {
    fn from(h: HostView) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), string(h.name));
        m.insert("tls".into(), Value::Bool(h.tls));
        m.insert("cert".into(), Value::Bool(h.cert));
        m.insert(
            "locations".into(),
            Value::Array(h.locations.into_iter().map(Value::from).collect()),
        );
        Value::Object(m)
    }
}

impl From<LocationView> for Value {
    fn from(l: LocationView) -> Value {
        let mut m = Map::new();
        m.insert("path".into(), string(l.path));
        m.insert("upstream".into(), string(l.upstream));
        m.insert("uri".into(), string(l.uri));
        m.insert("private".into(), Value::Bool(l.private));
        m.insert("https".into(), Value::Bool(l.https));
        m.insert("auth".into(), opt(l.auth));
        m.insert("auth_realm".into(), string(l.auth_realm));
        m.insert("max_body".into(), opt(l.max_body));
        m.insert("services".into(), strings(l.services));
        Value::Object(m)
    }
}

impl From<UpstreamView> for Value {
    fn from(u: UpstreamView) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), string(u.name));
        m.insert("servers".into(), strings(u.servers));
        Value::Object(m)
    }
}

impl From<JobView> for Value {
    fn from(j: JobView) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), string(j.name));
        m.insert("targets".into(), strings(j.targets));
        Value::Object(m)
    }
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

    let (mut hosts, upstreams) = routes(&services, &mut skipped);
    if let Some(present) = certificates {
        for h in hosts.iter_mut().filter(|h| h.tls) {
            h.cert = present.contains(&h.name);
        }
    }
    let routed: BTreeSet<&str> = skipped.iter().map(|s| s.service.as_str()).collect();
    services.retain(|s| !routed.contains(s.name));
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

/// What decides a service's routing network.
struct Networks<'n, 'a> {
    target: Option<&'a str>,
    /// The proxy service's networks (ingress left out), in its order.
    proxy: &'n [&'a str],
    ingress: &'n BTreeSet<&'a str>,
}

fn service_view<'a>(service: &'a Service, networks: &Networks<'_, 'a>) -> ServiceView<'a> {
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

fn address(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn label<'a>(service: &'a ServiceView<'_>, name: &str) -> Option<&'a str> {
    service.labels.get(name).map(String::as_str)
}

fn port_label(service: &ServiceView<'_>, name: &str) -> Option<u16> {
    label(service, name).and_then(|p| p.parse().ok())
}

#[derive(Default)]
struct HostAcc {
    tls: bool,
    locations: BTreeMap<String, LocationView>,
}

/// A routed service's locations, as the labels ask for them.
struct Wanted {
    /// `routing-context` as a location (`/webhook/`, `/`).
    location: String,
    /// `routing-private-context` as a location.
    private: Option<String>,
    options: Options,
}

impl Wanted {
    fn of(service: &ServiceView<'_>) -> Wanted {
        let path = |p: String| format!("{p}/");
        Wanted {
            location: path(labels::prefix(
                label(service, labels::CONTEXT).unwrap_or("/"),
            )),
            private: label(service, labels::PRIVATE_CONTEXT).map(|p| path(labels::prefix(p))),
            options: Options {
                https: label(service, labels::ON_HTTPS).is_some_and(labels::jinja_truthy),
                auth: label(service, labels::AUTH).map(labels::auth_file),
                realm: label(service, labels::AUTH_REALM).map(str::to_owned),
                max_body: label(service, labels::MAX_BODY).map(str::to_owned),
                backend: labels::prefix(label(service, labels::INTERNAL_CONTEXT).unwrap_or("/")),
            },
        }
    }
}

/// Groups routed services into hosts, locations and upstreams, with the home lab's
/// meaning: a service needs `routing-host` and `routing-port`; `location CONTEXT/` proxies
/// to `UPSTREAM` + `routing-internal-context` + `/`, so the context is stripped.
///
/// Services are taken in name order. Services sharing a (host, context) share the location
/// and its upstream when their location settings agree; a service whose location would clash
/// (different settings, or a private context colliding with another location) is skipped
/// as a whole, so a host never gets half of a service.
fn routes(
    services: &[ServiceView<'_>],
    skipped: &mut Vec<SkippedService>,
) -> (Vec<HostView>, Vec<UpstreamView>) {
    let mut hosts: BTreeMap<String, HostAcc> = BTreeMap::new();
    let mut servers: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();

    for service in services {
        let (Some(host_label), Some(port)) = (
            label(service, labels::HOST),
            port_label(service, labels::PORT),
        ) else {
            continue;
        };
        let wanted = Wanted::of(service);
        let tls = label(service, labels::TLS).is_none_or(labels::truthy);
        let names: BTreeSet<String> = labels::hosts(host_label).collect();

        if let Some(clash) = find_clash(&hosts, &names, &wanted) {
            skipped.push(SkippedService {
                service: service.name.to_owned(),
                label: clash.0.to_owned(),
                value: label(service, clash.0).unwrap_or_default().to_owned(),
                reason: clash.1,
            });
            continue;
        }

        let options = &wanted.options;
        let realm = options
            .realm
            .clone()
            .or_else(|| {
                labels::check_realm(service.name)
                    .ok()
                    .map(|()| service.name.to_owned())
            })
            .unwrap_or_else(|| DEFAULT_REALM.to_owned());
        for host in names {
            let acc = hosts.entry(host.clone()).or_default();
            acc.tls |= tls;
            let mut paths = vec![(wanted.location.clone(), false)];
            if let Some(private) = &wanted.private {
                paths.push((private.clone(), true));
            }
            for (path, private) in paths {
                let loc = acc
                    .locations
                    .entry(path.clone())
                    .or_insert_with(|| LocationView {
                        path,
                        // Until names are given out below: the location whose upstream
                        // this one proxies to (private ones use their main location).
                        upstream: wanted.location.clone(),
                        uri: if private {
                            String::new()
                        } else {
                            format!("{}/", options.backend)
                        },
                        private,
                        https: options.https,
                        auth: options.auth.clone(),
                        auth_realm: realm.clone(),
                        max_body: options.max_body.clone(),
                        services: Vec::new(),
                    });
                loc.services.push(service.name.to_owned());
            }
            servers
                .entry((host, wanted.location.clone()))
                .or_default()
                .extend(service.ips.iter().map(|ip| address(ip, port)));
        }
    }

    // Upstream names: host + context squeezed to [a-z0-9_], made unique in sorted order.
    let mut names: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut taken = BTreeSet::new();
    let mut upstreams = Vec::with_capacity(servers.len());
    for ((host, location), list) in servers {
        let base = sanitize(&format!("{host}{location}"));
        let mut name = base.clone();
        let mut n = 1;
        while !taken.insert(name.clone()) {
            n += 1;
            name = format!("{base}_{n}");
        }
        names
            .entry(host)
            .or_default()
            .insert(location, name.clone());
        upstreams.push(UpstreamView {
            name,
            servers: list,
        });
    }

    let hosts = hosts
        .into_iter()
        .map(|(name, acc)| {
            let host_names = names.get(&name);
            let locations = acc
                .locations
                .into_values()
                .map(|mut loc| {
                    let upstream = host_names.and_then(|n| n.get(&loc.upstream));
                    loc.upstream = upstream.cloned().unwrap_or_default();
                    loc
                })
                .collect();
            HostView {
                name,
                tls: acc.tls,
                cert: true,
                locations,
            }
        })
        .collect();
    (hosts, upstreams)
}

/// The label and reason that keep a service out, if its locations clash with those routed.
fn find_clash(
    hosts: &BTreeMap<String, HostAcc>,
    names: &BTreeSet<String>,
    wanted: &Wanted,
) -> Option<(&'static str, String)> {
    let context = wanted.location.as_str();
    if wanted.private.as_deref() == Some(context) {
        return Some((
            labels::PRIVATE_CONTEXT,
            "private context equals routing-context".into(),
        ));
    }
    for host in names {
        let Some(acc) = hosts.get(host) else { continue };
        if let Some(loc) = acc.locations.get(context) {
            let owner = &loc.services[0];
            if loc.private {
                return Some((
                    labels::CONTEXT,
                    format!("{host}{context} is a private location of service {owner}"),
                ));
            }
            let same = loc.https == wanted.options.https
                && loc.auth == wanted.options.auth
                && wanted
                    .options
                    .realm
                    .as_ref()
                    .is_none_or(|r| *r == loc.auth_realm)
                && loc.max_body == wanted.options.max_body
                && loc.uri == format!("{}/", wanted.options.backend);
            if !same {
                return Some((
                    labels::CONTEXT,
                    format!(
                        "{host}{context} is routed by service {owner} with different settings (https, auth, realm, max body or internal context)"
                    ),
                ));
            }
        }
        if let Some(private) = &wanted.private {
            if let Some(loc) = acc.locations.get(private) {
                return Some((
                    labels::PRIVATE_CONTEXT,
                    format!(
                        "{host}{private} is already routed by service {}",
                        loc.services[0]
                    ),
                ));
            }
        }
    }
    None
}

/// The `server_names_hash_bucket_size` the longest host name needs, when nginx's default
/// is too small. nginx wants room for a pointer, the name plus 2 bytes aligned to a
/// pointer, and a closing pointer per bucket (`NGX_HASH_ELT_SIZE` in `ngx_hash.c`).
pub fn bucket_size(hosts: &[HostView]) -> Option<usize> {
    let longest = hosts.iter().map(|h| h.name.len()).max()?;
    let need = 8 + (longest + 2).div_ceil(8) * 8 + 8;
    (need > NGINX_DEFAULT_BUCKET).then(|| need.next_power_of_two())
}

fn sanitize(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        out.push(if c.is_ascii_alphanumeric() { c } else { '_' });
    }
    let trimmed = out.trim_end_matches('_');
    if trimmed.is_empty() {
        "upstream".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// One job per distinct `prometheus-job`, targets from live tasks; plus `nodes`.
fn jobs(services: &[ServiceView<'_>], nodes: &[Node]) -> Vec<JobView> {
    let mut jobs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for service in services {
        let Some(job) = label(service, labels::PROMETHEUS_JOB) else {
            continue;
        };
        // Exporters like prometheus_flask_exporter serve /metrics on the app's own port.
        let port = port_label(service, labels::PROMETHEUS_PORT)
            .or_else(|| port_label(service, labels::PORT))
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
    use super::*;

    #[test]
    fn upstream_names_are_squeezed_to_safe_characters() {
        assert_eq!(sanitize("Example.com/"), "example_com");
        assert_eq!(sanitize("example.com/api/v1"), "example_com_api_v1");
        assert_eq!(sanitize("/"), "upstream");
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert_eq!(address("fd00::1", 80), "[fd00::1]:80");
        assert_eq!(address("10.0.0.1", 80), "10.0.0.1:80");
    }
}
