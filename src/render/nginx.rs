//! nginx routing: the `hosts` and `upstreams` of the context, and the
//! `server_names_hash_bucket_size` its longest host name needs.
//!
//! A routed service has `routing-host` and `routing-port`. On each of its hosts it gets a
//! location at `routing-context/` (plus one at `routing-private-context/` when set, which
//! reaches the same upstream), and each (host, context) gets one upstream of the live task
//! addresses of the services routed there. Invariants: services are taken in the order
//! given (name order, from the snapshot) and the first to claim a (host, path) sets that
//! location's settings; a later service that would change them, whose context is another
//! service's private location, or whose private path meets any location already there, is
//! skipped as a whole, on every host, and reported, so a host never gets half of a
//! service. Hosts come sorted by name, locations by path and upstreams by (host, context);
//! upstream names are unique and made of `[a-z0-9_]`, so the same services always give the
//! same routing.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};

use super::labels;
use super::owners::refusals;
use super::views::{ServiceView, address};
use crate::config::Owners;
use crate::status::SkippedService;

/// The realm when the service's name cannot be one (never for a name Docker accepts).
pub const DEFAULT_REALM: &str = "Restricted";
/// nginx's `server_names_hash_bucket_size` on 64-byte cache lines: drover only writes the
/// directive when a host name needs more, so a main config setting it is not disturbed.
pub const NGINX_DEFAULT_BUCKET: usize = 64;

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    /// False only when every service on the host sets `routing-tls=false`.
    pub tls: bool,
    /// Whether the certificate files of a TLS host are there (true when drover does not
    /// know: nothing probed them). A TLS host without them is served on port 80.
    pub cert: bool,
    /// More server names, and more names on the host's certificate: the
    /// `routing-extra-hosts` of the services whose first `routing-host` this is, sorted,
    /// without names that are routed hosts themselves or another host's extra names.
    pub aliases: Vec<String>,
    /// `Strict-Transport-Security` max-age for the TLS server: the largest any service on
    /// the host asks for with `routing-hsts`.
    pub hsts: Option<u64>,
    /// A service on the host says `routing-acme: "true"`: drover obtains its certificate.
    pub acme: bool,
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
    /// `routing-connect-timeout`; unset: the template's default.
    pub connect_timeout: Option<String>,
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
    connect_timeout: Option<String>,
    /// The backend path (`routing-internal-context` as a prefix).
    backend: String,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct UpstreamView {
    pub name: String,
    /// `IP:PORT` of each live task; empty means nothing is up (templates emit a `down` server).
    pub servers: Vec<String>,
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
        m.insert("aliases".into(), strings(h.aliases));
        m.insert("hsts".into(), h.hsts.map_or(Value::Null, Value::from));
        m.insert("acme".into(), Value::Bool(h.acme));
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
        m.insert("connect_timeout".into(), opt(l.connect_timeout));
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

#[derive(Default)]
struct HostAcc {
    tls: bool,
    acme: bool,
    aliases: BTreeSet<String>,
    hsts: Option<u64>,
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
                service.label(labels::CONTEXT).unwrap_or("/"),
            )),
            private: service
                .label(labels::PRIVATE_CONTEXT)
                .map(|p| path(labels::prefix(p))),
            options: Options {
                https: service
                    .label(labels::ON_HTTPS)
                    .is_some_and(labels::jinja_truthy),
                auth: service.label(labels::AUTH).map(labels::auth_file),
                realm: service.label(labels::AUTH_REALM).map(str::to_owned),
                max_body: service.label(labels::MAX_BODY).map(str::to_owned),
                connect_timeout: service.label(labels::CONNECT_TIMEOUT).map(str::to_owned),
                backend: labels::prefix(service.label(labels::INTERNAL_CONTEXT).unwrap_or("/")),
            },
        }
    }
}

/// Groups routed services into hosts, locations and upstreams, with the home lab's
/// meaning: a service needs `routing-host` and `routing-port`; `location CONTEXT/` proxies
/// to `UPSTREAM` + `routing-internal-context` + `/`, so the context is stripped.
///
/// First, claims on hosts another stack owns are refused (`owners`), and those services
/// skipped. Then services are taken in the order given (name order, from the snapshot). Services sharing a (host, context) share the location
/// and its upstream when their location settings agree; a service whose location would clash
/// (different settings, a context that is another service's private location, or a private
/// context colliding with any location) is skipped as a whole and pushed onto `skipped`, so
/// a host never gets half of a service. Every host comes with `cert: true`: the caller
/// knows which certificates exist.
pub fn routes(
    services: &[ServiceView<'_>],
    owners: &Owners,
    skipped: &mut Vec<SkippedService>,
) -> (Vec<HostView>, Vec<UpstreamView>) {
    let mut hosts: BTreeMap<String, HostAcc> = BTreeMap::new();
    let mut servers: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let refused = refusals(services, owners);

    for service in services {
        let (Some(host_label), Some(port)) =
            (service.label(labels::HOST), service.port(labels::PORT))
        else {
            continue;
        };
        if let Some(refusal) = refused.get(service.name) {
            skipped.push(refusal.clone());
            continue;
        }
        let wanted = Wanted::of(service);
        let tls = service.label(labels::TLS).is_none_or(labels::truthy);
        let names: BTreeSet<String> = labels::hosts(host_label).collect();
        // The lab's extra names go with the first host the service names.
        let first = labels::hosts(host_label).next().unwrap_or_default();
        let extra: Vec<String> = service
            .label(labels::EXTRA_HOSTS)
            .map(|v| labels::hosts(v).collect())
            .unwrap_or_default();
        let hsts = service.label(labels::HSTS).and_then(labels::hsts_max_age);
        let acme = service.label(labels::ACME).is_some_and(labels::truthy);

        if let Some(clash) = find_clash(&hosts, &names, &wanted) {
            skipped.push(SkippedService {
                service: service.name.to_owned(),
                label: clash.0.to_owned(),
                value: service.label(clash.0).unwrap_or_default().to_owned(),
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
            acc.acme |= acme;
            acc.hsts = acc.hsts.max(hsts);
            if host == first {
                acc.aliases.extend(extra.iter().cloned());
            }
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
                        connect_timeout: options.connect_timeout.clone(),
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

    // An extra name belongs to the first host (in name order) that claims it, and to none
    // when it is routed itself: nginx would warn of a conflicting server name, and two
    // certificates would carry it.
    let routed: BTreeSet<String> = hosts.keys().cloned().collect();
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    let hosts = hosts
        .into_iter()
        .map(|(name, acc)| {
            let aliases: Vec<String> = acc
                .aliases
                .into_iter()
                .filter(|a| !routed.contains(a) && claimed.insert(a.clone()))
                .collect();
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
                aliases,
                hsts: acc.hsts,
                acme: acc.acme,
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
                && loc.connect_timeout == wanted.options.connect_timeout
                && loc.uri == format!("{}/", wanted.options.backend);
            if !same {
                return Some((
                    labels::CONTEXT,
                    format!(
                        "{host}{context} is routed by service {owner} with different settings (https, auth, realm, max body, connect timeout or internal context)"
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
    let longest = hosts
        .iter()
        .flat_map(|h| std::iter::once(&h.name).chain(&h.aliases))
        .map(String::len)
        .max()?;
    let need = 8 + (longest + 2).div_ceil(8) * 8 + 8;
    (need > NGINX_DEFAULT_BUCKET).then(|| need.next_power_of_two())
}

/// The `routing-extra-hosts` names of services that route nothing (the home lab put its
/// apex domain on the nginx service this way): names a certificate tool needs, with no
/// server block of drover's. Sorted, without names `hosts` already serve.
pub fn unrouted_extra_hosts(services: &[ServiceView<'_>], hosts: &[HostView]) -> Vec<String> {
    let served: BTreeSet<&str> = hosts
        .iter()
        .flat_map(|h| std::iter::once(&h.name).chain(&h.aliases))
        .map(String::as_str)
        .collect();
    let names: BTreeSet<String> = services
        .iter()
        .filter(|s| s.label(labels::HOST).is_none() || s.port(labels::PORT).is_none())
        .filter_map(|s| s.label(labels::EXTRA_HOSTS))
        .flat_map(labels::hosts)
        .filter(|n| !served.contains(n.as_str()))
        .collect();
    names.into_iter().collect()
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::render::views::{Networks, service_view};
    use crate::state::{Service, Task, TaskState};

    const HOST: &str = labels::HOST;
    const PORT: &str = labels::PORT;
    const CONTEXT: &str = labels::CONTEXT;
    const PRIVATE: &str = labels::PRIVATE_CONTEXT;

    /// A service of stack `s` on the `web` network with these labels and one running task
    /// per address (one stack: these tests are about locations, `owners` about stacks).
    fn service(name: &str, labels: &[(&str, &str)], ips: &[&str]) -> Service {
        let id = format!("{name}-id");
        Service {
            id: id.clone(),
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .chain([(crate::state::STACK_LABEL.to_owned(), "s".to_owned())])
                .collect(),
            networks: vec!["web".to_owned()],
            tasks: ips
                .iter()
                .enumerate()
                .map(|(i, ip)| {
                    let ips = [("web".to_owned(), (*ip).to_owned())].into();
                    Task::running(&format!("{name}.{i}"), &id, ips)
                })
                .collect(),
            ..Service::default()
        }
    }

    struct Routed {
        hosts: Vec<HostView>,
        upstreams: Vec<UpstreamView>,
        skipped: Vec<SkippedService>,
    }

    impl Routed {
        fn host(&self, name: &str) -> &HostView {
            self.hosts
                .iter()
                .find(|h| h.name == name)
                .unwrap_or_else(|| panic!("no host {name} in {:?}", self.hosts))
        }

        fn host_names(&self) -> Vec<&str> {
            self.hosts.iter().map(|h| h.name.as_str()).collect()
        }

        fn servers(&self, upstream: &str) -> Vec<&str> {
            self.upstreams
                .iter()
                .find(|u| u.name == upstream)
                .unwrap_or_else(|| panic!("no upstream {upstream} in {:?}", self.upstreams))
                .servers
                .iter()
                .map(String::as_str)
                .collect()
        }

        fn skipped_names(&self) -> Vec<&str> {
            self.skipped.iter().map(|s| s.service.as_str()).collect()
        }
    }

    fn paths(host: &HostView) -> Vec<&str> {
        host.locations.iter().map(|l| l.path.as_str()).collect()
    }

    /// `routes` over these services, in the order given, routed on their `web` network.
    fn route(services: &[Service]) -> Routed {
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
        let mut skipped = Vec::new();
        let (hosts, upstreams) = routes(&views, &Owners::default(), &mut skipped);
        Routed {
            hosts,
            upstreams,
            skipped,
        }
    }

    fn wanted(labels: &[(&str, &str)]) -> Wanted {
        let service = service("new", labels, &[]);
        let ingress = BTreeSet::new();
        let networks = Networks {
            target: None,
            proxy: &[],
            ingress: &ingress,
        };
        Wanted::of(&service_view(&service, &networks))
    }

    fn location(path: &str, owner: &str) -> LocationView {
        LocationView {
            path: path.to_owned(),
            upstream: "/".to_owned(),
            uri: "/".to_owned(),
            private: false,
            https: false,
            auth: None,
            auth_realm: owner.to_owned(),
            max_body: None,
            connect_timeout: None,
            services: vec![owner.to_owned()],
        }
    }

    fn routed_hosts(entries: &[(&str, LocationView)]) -> BTreeMap<String, HostAcc> {
        let mut hosts: BTreeMap<String, HostAcc> = BTreeMap::new();
        for (host, loc) in entries {
            let acc = hosts.entry((*host).to_owned()).or_default();
            acc.locations.insert(loc.path.clone(), loc.clone());
        }
        hosts
    }

    fn names(hosts: &[&str]) -> BTreeSet<String> {
        hosts.iter().map(|h| (*h).to_owned()).collect()
    }

    #[test]
    fn a_service_without_routing_host_or_routing_port_is_neither_routed_nor_skipped() {
        let r = route(&[
            service("a", &[(HOST, "a.example.com")], &["10.0.0.1"]),
            service("b", &[(PORT, "80")], &["10.0.0.2"]),
            service("c", &[(labels::PROMETHEUS_JOB, "c")], &["10.0.0.3"]),
        ]);
        assert!(r.hosts.is_empty(), "{:?}", r.hosts);
        assert!(r.upstreams.is_empty(), "{:?}", r.upstreams);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    }

    #[test]
    fn a_service_with_several_hosts_gets_a_location_and_an_upstream_on_each_host() {
        let r = route(&[service(
            "app",
            &[(HOST, "B.example.com, a.example.com"), (PORT, "8080")],
            &["10.0.0.1", "10.0.0.2"],
        )]);
        assert_eq!(r.host_names(), ["a.example.com", "b.example.com"]);
        for (host, upstream) in [
            ("a.example.com", "a_example_com"),
            ("b.example.com", "b_example_com"),
        ] {
            let h = r.host(host);
            assert_eq!(paths(h), ["/"]);
            assert_eq!(h.locations[0].upstream, upstream);
            assert_eq!(h.locations[0].services, ["app"]);
            assert_eq!(r.servers(upstream), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        }
        assert_eq!(r.upstreams.len(), 2);
    }

    #[test]
    fn services_agreeing_on_a_host_and_context_share_its_location_and_upstream() {
        let r = route(&[
            service(
                "a",
                &[(HOST, "x.com"), (PORT, "80"), (CONTEXT, "/app")],
                &["10.0.0.1"],
            ),
            service(
                "b",
                &[(HOST, "x.com"), (PORT, "81"), (CONTEXT, "app/")],
                &["10.0.0.2"],
            ),
        ]);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        let h = r.host("x.com");
        assert_eq!(paths(h), ["/app/"]);
        assert_eq!(h.locations[0].services, ["a", "b"]);
        assert_eq!(h.locations[0].upstream, "x_com_app");
        assert_eq!(r.upstreams.len(), 1);
        assert_eq!(r.servers("x_com_app"), ["10.0.0.1:80", "10.0.0.2:81"]);
    }

    #[test]
    fn the_later_of_two_services_claiming_a_host_and_context_with_other_settings_is_skipped_and_the_first_keeps_it()
     {
        let r = route(&[
            service(
                "a",
                &[(HOST, "x.com"), (PORT, "80"), (CONTEXT, "/app")],
                &["10.0.0.1"],
            ),
            service(
                "b",
                &[
                    (HOST, "x.com"),
                    (PORT, "80"),
                    (CONTEXT, "app/"),
                    (labels::ON_HTTPS, "yes"),
                ],
                &["10.0.0.2"],
            ),
        ]);
        assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
        let s = &r.skipped[0];
        assert_eq!(
            (s.service.as_str(), s.label.as_str(), s.value.as_str()),
            ("b", CONTEXT, "app/")
        );
        assert!(
            s.reason
                .starts_with("x.com/app/ is routed by service a with different settings"),
            "{}",
            s.reason
        );
        let loc = &r.host("x.com").locations[0];
        assert_eq!(loc.services, ["a"]);
        assert!(!loc.https);
        assert_eq!(r.servers("x_com_app"), ["10.0.0.1:80"]);
    }

    #[test]
    fn each_location_setting_that_differs_makes_the_later_service_clash() {
        let first = [(HOST, "x.com"), (PORT, "80"), (labels::AUTH, "users")];
        for (label, value) in [
            (labels::ON_HTTPS, "1"),
            (labels::AUTH, "others"),
            (labels::AUTH_REALM, "Elsewhere"),
            (labels::MAX_BODY, "10m"),
            (labels::CONNECT_TIMEOUT, "3s"),
            (labels::INTERNAL_CONTEXT, "/api"),
        ] {
            let mut second = first.to_vec();
            second.retain(|(l, _)| *l != label);
            second.push((label, value));
            let r = route(&[service("a", &first, &[]), service("b", &second, &[])]);
            assert_eq!(r.skipped_names(), ["b"], "{label}={value}");
            assert_eq!(r.host("x.com").locations[0].services, ["a"], "{label}");
        }
    }

    #[test]
    fn a_later_service_without_a_realm_takes_the_realm_the_first_service_set() {
        let r = route(&[
            service(
                "a",
                &[(HOST, "x.com"), (PORT, "80"), (labels::AUTH, "users")],
                &[],
            ),
            service(
                "b",
                &[(HOST, "x.com"), (PORT, "80"), (labels::AUTH, "users")],
                &[],
            ),
            service(
                "c",
                &[
                    (HOST, "x.com"),
                    (PORT, "80"),
                    (labels::AUTH, "users"),
                    (labels::AUTH_REALM, "a"),
                ],
                &[],
            ),
        ]);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        let loc = &r.host("x.com").locations[0];
        assert_eq!(loc.services, ["a", "b", "c"]);
        assert_eq!(loc.auth_realm, "a");
        assert_eq!(loc.auth.as_deref(), Some("/etc/nginx/auth/users"));
    }

    #[test]
    fn a_service_name_that_cannot_be_a_realm_gets_the_default_realm() {
        let r = route(&[service("a$b", &[(HOST, "x.com"), (PORT, "80")], &[])]);
        assert_eq!(r.host("x.com").locations[0].auth_realm, DEFAULT_REALM);
    }

    #[test]
    fn a_clashing_service_is_skipped_on_every_host_not_only_where_it_clashes() {
        let r = route(&[
            service("a", &[(HOST, "a.com"), (PORT, "80")], &["10.0.0.1"]),
            service(
                "b",
                &[
                    (HOST, "a.com,b.com"),
                    (PORT, "80"),
                    (labels::MAX_BODY, "10m"),
                ],
                &["10.0.0.2"],
            ),
        ]);
        assert_eq!(r.skipped_names(), ["b"]);
        assert_eq!(r.host_names(), ["a.com"]);
        let upstreams: Vec<&str> = r.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(upstreams, ["a_com"]);
    }

    #[test]
    fn a_private_context_gets_its_own_location_that_passes_the_uri_to_the_main_upstream() {
        let r = route(&[service(
            "app",
            &[
                (HOST, "x.com"),
                (PORT, "80"),
                (labels::INTERNAL_CONTEXT, "api"),
                (PRIVATE, "/admin"),
            ],
            &["10.0.0.1"],
        )]);
        let h = r.host("x.com");
        assert_eq!(paths(h), ["/", "/admin/"]);
        let (main, private) = (&h.locations[0], &h.locations[1]);
        assert_eq!((main.uri.as_str(), main.private), ("/api/", false));
        assert_eq!((private.uri.as_str(), private.private), ("", true));
        assert_eq!(main.upstream, "x_com");
        assert_eq!(private.upstream, "x_com");
        assert_eq!(r.upstreams.len(), 1);
    }

    #[test]
    fn a_private_context_equal_to_the_routing_context_skips_the_service() {
        let r = route(&[service(
            "app",
            &[
                (HOST, "x.com"),
                (PORT, "80"),
                (CONTEXT, "/x"),
                (PRIVATE, "x/"),
            ],
            &[],
        )]);
        assert!(r.hosts.is_empty());
        assert_eq!(r.skipped.len(), 1);
        let s = &r.skipped[0];
        assert_eq!((s.label.as_str(), s.value.as_str()), (PRIVATE, "x/"));
        assert_eq!(s.reason, "private context equals routing-context");
    }

    #[test]
    fn a_service_whose_context_is_another_services_private_location_is_skipped() {
        let r = route(&[
            service(
                "a",
                &[(HOST, "x.com"), (PORT, "80"), (PRIVATE, "/admin")],
                &[],
            ),
            service(
                "b",
                &[(HOST, "x.com"), (PORT, "80"), (CONTEXT, "/admin")],
                &[],
            ),
        ]);
        assert_eq!(r.skipped_names(), ["b"]);
        assert_eq!(r.skipped[0].label, CONTEXT);
        assert_eq!(
            r.skipped[0].reason,
            "x.com/admin/ is a private location of service a"
        );
        assert_eq!(paths(r.host("x.com")), ["/", "/admin/"]);
    }

    #[test]
    fn a_second_service_with_the_same_private_context_is_skipped_even_when_its_settings_agree() {
        let labels = [(HOST, "x.com"), (PORT, "80"), (PRIVATE, "/admin")];
        let r = route(&[service("a", &labels, &[]), service("b", &labels, &[])]);
        assert_eq!(r.skipped_names(), ["b"]);
        assert_eq!(r.skipped[0].label, PRIVATE);
        assert_eq!(
            r.skipped[0].reason,
            "x.com/admin/ is already routed by service a"
        );
        for loc in &r.host("x.com").locations {
            assert_eq!(loc.services, ["a"], "{}", loc.path);
        }
    }

    #[test]
    fn locations_and_upstreams_come_sorted_whatever_the_order_of_the_services() {
        let services = [
            service(
                "a",
                &[(HOST, "y.com"), (PORT, "80"), (CONTEXT, "/zeta")],
                &["10.0.0.1"],
            ),
            service("m", &[(HOST, "x.com,y.com"), (PORT, "80")], &["10.0.0.2"]),
            service(
                "z",
                &[(HOST, "y.com"), (PORT, "80"), (CONTEXT, "/api")],
                &["10.0.0.3"],
            ),
        ];
        let forward = route(&services);
        assert_eq!(forward.host_names(), ["x.com", "y.com"]);
        assert_eq!(paths(forward.host("y.com")), ["/", "/api/", "/zeta/"]);
        let upstreams: Vec<&str> = forward.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(upstreams, ["x_com", "y_com", "y_com_api", "y_com_zeta"]);

        let mut reversed = services.clone();
        reversed.reverse();
        let backward = route(&reversed);
        assert_eq!(backward.hosts, forward.hosts);
        assert_eq!(backward.upstreams, forward.upstreams);
    }

    #[test]
    fn upstream_names_that_squeeze_to_the_same_string_are_numbered_in_sorted_order() {
        let r = route(&[
            service(
                "a",
                &[(HOST, "a.b"), (PORT, "80"), (CONTEXT, "/c")],
                &["10.0.0.1"],
            ),
            service("b", &[(HOST, "a.b.c"), (PORT, "80")], &["10.0.0.2"]),
        ]);
        assert_eq!(r.host("a.b").locations[0].upstream, "a_b_c");
        assert_eq!(r.host("a.b.c").locations[0].upstream, "a_b_c_2");
        assert_eq!(r.servers("a_b_c"), ["10.0.0.1:80"]);
        assert_eq!(r.servers("a_b_c_2"), ["10.0.0.2:80"]);
    }

    #[test]
    fn a_host_is_served_without_tls_only_when_every_service_on_it_says_so() {
        let off = (labels::TLS, "false");
        let r = route(&[
            service("a", &[(HOST, "y.com"), (PORT, "80")], &[]),
            service(
                "b",
                &[(HOST, "x.com,y.com"), (PORT, "80"), (CONTEXT, "/b"), off],
                &[],
            ),
            service(
                "c",
                &[(HOST, "x.com"), (PORT, "80"), (CONTEXT, "/c"), off],
                &[],
            ),
        ]);
        assert!(!r.host("x.com").tls);
        assert!(r.host("y.com").tls);
        assert!(r.hosts.iter().all(|h| h.cert));
    }

    #[test]
    fn only_live_tasks_on_the_routing_network_become_servers_and_ipv6_is_bracketed() {
        let mut app = service(
            "app",
            &[(HOST, "x.com"), (PORT, "80")],
            &["10.0.0.1", "fd00::1", "10.0.0.3"],
        );
        app.tasks[2].state = TaskState::Starting;
        app.tasks.push(Task::running(
            "app.9",
            "app-id",
            [("other".to_owned(), "10.9.0.9".to_owned())].into(),
        ));
        let idle = service("idle", &[(HOST, "idle.com"), (PORT, "80")], &[]);
        let r = route(&[app, idle]);
        assert_eq!(r.servers("x_com"), ["10.0.0.1:80", "[fd00::1]:80"]);
        assert!(r.servers("idle_com").is_empty());
    }

    #[test]
    fn find_clash_looks_only_at_the_hosts_the_service_asks_for() {
        let mut https = location("/", "a");
        https.https = true;
        let hosts = routed_hosts(&[("a.com", https)]);
        let plain = wanted(&[]);
        assert_eq!(find_clash(&hosts, &names(&["b.com"]), &plain), None);
        let (label, reason) =
            find_clash(&hosts, &names(&["b.com", "a.com"]), &plain).expect("clash on a.com");
        assert_eq!(label, CONTEXT);
        assert!(
            reason.starts_with("a.com/ is routed by service a"),
            "{reason}"
        );
    }

    #[test]
    fn find_clash_accepts_a_location_whose_settings_match() {
        let hosts = routed_hosts(&[("a.com", location("/", "a"))]);
        assert_eq!(find_clash(&hosts, &names(&["a.com"]), &wanted(&[])), None);
        let same_realm = wanted(&[(labels::AUTH_REALM, "a")]);
        assert_eq!(find_clash(&hosts, &names(&["a.com"]), &same_realm), None);
        let other_realm = wanted(&[(labels::AUTH_REALM, "b")]);
        assert!(find_clash(&hosts, &names(&["a.com"]), &other_realm).is_some());
    }

    #[test]
    fn find_clash_refuses_a_private_context_equal_to_the_routing_context_before_any_host() {
        let hosts = BTreeMap::new();
        let both = wanted(&[(CONTEXT, "/x"), (PRIVATE, "/x/")]);
        assert_eq!(
            find_clash(&hosts, &names(&[]), &both),
            Some((PRIVATE, "private context equals routing-context".to_owned()))
        );
    }

    #[test]
    fn find_clash_refuses_a_private_context_on_any_existing_location() {
        let hosts = routed_hosts(&[("a.com", location("/admin/", "a"))]);
        let private = wanted(&[(PRIVATE, "admin")]);
        assert_eq!(
            find_clash(&hosts, &names(&["a.com"]), &private),
            Some((
                PRIVATE,
                "a.com/admin/ is already routed by service a".to_owned()
            ))
        );
    }

    #[test]
    fn the_bucket_size_is_left_alone_until_a_host_name_outgrows_nginx_s_default() {
        let host = |len: usize| HostView {
            name: "h".repeat(len),
            tls: true,
            cert: true,
            aliases: Vec::new(),
            hsts: None,
            acme: false,
            locations: Vec::new(),
        };
        assert_eq!(bucket_size(&[]), None);
        assert_eq!(bucket_size(&[host(46)]), None);
        assert_eq!(bucket_size(&[host(10), host(47)]), Some(128));
        assert_eq!(bucket_size(&[host(200)]), Some(256));
    }

    #[test]
    fn extra_hosts_go_with_the_first_host_once_and_never_shadow_a_routed_host() {
        let r = route(&[
            service(
                "a",
                &[
                    (HOST, "b.com, a.com"),
                    (PORT, "80"),
                    (labels::EXTRA_HOSTS, "www.b.com, c.com, a.com"),
                    (labels::HSTS, "600"),
                ],
                &["10.0.0.1"],
            ),
            service(
                "b",
                &[
                    (HOST, "a.com"),
                    (PORT, "80"),
                    (labels::EXTRA_HOSTS, "www.b.com, z.com"),
                ],
                &["10.0.0.2"],
            ),
            service(
                "c",
                &[(HOST, "c.com"), (PORT, "80"), (labels::HSTS, "true")],
                &["10.0.0.3"],
            ),
        ]);
        // a.com comes first by name and claims www.b.com; c.com is routed itself.
        assert_eq!(r.host("a.com").aliases, ["www.b.com", "z.com"]);
        assert!(r.host("b.com").aliases.is_empty());
        assert!(r.host("c.com").aliases.is_empty());
        assert_eq!(r.host("b.com").hsts, Some(600));
        assert_eq!(r.host("a.com").hsts, Some(600));
        assert_eq!(r.host("c.com").hsts, Some(labels::HSTS_DEFAULT));
    }

    #[test]
    fn extra_hosts_of_a_service_that_routes_nothing_are_listed_apart() {
        let services = [
            service("nginx", &[(labels::EXTRA_HOSTS, "lab.com, a.com")], &[]),
            service("a", &[(HOST, "a.com"), (PORT, "80")], &["10.0.0.1"]),
        ];
        let ingress = BTreeSet::new();
        let networks = Networks {
            target: None,
            proxy: &[],
            ingress: &ingress,
        };
        let views: Vec<_> = services
            .iter()
            .map(|s| service_view(s, &networks))
            .collect();
        let (hosts, _) = routes(&views, &Owners::default(), &mut Vec::new());
        assert_eq!(unrouted_extra_hosts(&views, &hosts), ["lab.com"]);
    }

    #[test]
    fn upstream_names_are_squeezed_to_safe_characters() {
        assert_eq!(sanitize("Example.com/"), "example_com");
        assert_eq!(sanitize("example.com/api/v1"), "example_com_api_v1");
        assert_eq!(sanitize("/"), "upstream");
    }
}
