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
use super::views::{ServiceView, address};
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
                backend: labels::prefix(service.label(labels::INTERNAL_CONTEXT).unwrap_or("/")),
            },
        }
    }
}

/// Groups routed services into hosts, locations and upstreams, with the home lab's
/// meaning: a service needs `routing-host` and `routing-port`; `location CONTEXT/` proxies
/// to `UPSTREAM` + `routing-internal-context` + `/`, so the context is stripped.
///
/// Services are taken in the order given (name order, from the snapshot). Services sharing a (host, context) share the location
/// and its upstream when their location settings agree; a service whose location would clash
/// (different settings, a context that is another service's private location, or a private
/// context colliding with any location) is skipped as a whole and pushed onto `skipped`, so
/// a host never gets half of a service. Every host comes with `cert: true`: the caller
/// knows which certificates exist.
pub fn routes(
    services: &[ServiceView<'_>],
    skipped: &mut Vec<SkippedService>,
) -> (Vec<HostView>, Vec<UpstreamView>) {
    let mut hosts: BTreeMap<String, HostAcc> = BTreeMap::new();
    let mut servers: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();

    for service in services {
        let (Some(host_label), Some(port)) =
            (service.label(labels::HOST), service.port(labels::PORT))
        else {
            continue;
        };
        let wanted = Wanted::of(service);
        let tls = service.label(labels::TLS).is_none_or(labels::truthy);
        let names: BTreeSet<String> = labels::hosts(host_label).collect();

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names_are_squeezed_to_safe_characters() {
        assert_eq!(sanitize("Example.com/"), "example_com");
        assert_eq!(sanitize("example.com/api/v1"), "example_com_api_v1");
        assert_eq!(sanitize("/"), "upstream");
    }
}
