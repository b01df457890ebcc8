//! Render: a pure function from a [`Snapshot`] and one compiled Tera template to bytes.
//!
//! Invariants: the same snapshot renders the same bytes (every collection arrives sorted and
//! everything computed here is ordered); a service with an invalid label value is left out
//! and reported in [`Rendered::skipped`], never rendered; a template error is an [`Error`],
//! never a panic; nothing here logs or touches files after [`Template::load`].
//!
//! The parts, bottom to top: `labels` (the label vocabulary and its validation), `views`
//! (services and tasks as templates see them), `owners` (who may route a host), `nginx`
//! (hosts, locations, upstreams) and
//! `prometheus` (scrape jobs) computed from those views, `context` (the Tera context built
//! from all of them), `filters` (the Tera filters below), and this file (templates).
//!
//! # Template context
//!
//! | name | content |
//! |---|---|
//! | `target` | `{name, network}` of the target being rendered (`network` may be null) |
//! | `private_networks` | the target's `private_networks` setting as `ADDR/PREFIX` strings (a single address without `/32`); the built-in nginx template allows these and loopback into private locations |
//! | `vars` | the target's `vars` setting (a map; empty when not set) |
//! | `swarm`, `node_id` | whether the engine is a Swarm manager; the local node id |
//! | `services` | services that passed label validation, sorted by name: `id, name, image, labels, mode, replicas, networks, ports, update_state, created_at, tasks`, plus `network` (the routing network chosen for the service) and `ips` (addresses of live tasks on that network, task order) |
//! | `services[].tasks[]` | `id, service_id, slot, node_id, state, desired_state, container_id, ips` (map network → address)`, message, error`, plus `live` (state and desired state are `running`) and `ip` (address on the service's `network`, or null) |
//! | `containers`, `nodes`, `networks`, `own` | as in the snapshot (`own` may be null) |
//! | `hosts` | routing built from the `routing-*` labels: `[{name, tls, cert, aliases, hsts, locations: [{path, upstream, uri, private, https, auth, auth_realm, max_body, services}]}]`, sorted by host then path; `proxy_pass` is `upstream` + `uri`; `aliases` are the host's extra names (`routing-extra-hosts`), `hsts` a max-age or null |
//! | `extra_hosts` | `routing-extra-hosts` names of services that route nothing, sorted |
//! | `server_names_hash_bucket_size` | the bucket size the longest host name needs, null when nginx's default fits |
//! | `upstreams` | `[{name, servers: ["IP:PORT", ...]}]`, one per (host, context); `servers` is empty when no task is live |
//! | `prometheus_jobs` | `[{name, targets: ["IP:PORT", ...]}]`, one per `prometheus-job` value of services with a `prometheus-port`, plus `docker` (every node address on :9323, the engine's metrics), sorted by name |
//!
//! A service's routing network is the target's `network` when set, else its
//! `routing-network` label, else its first network that the proxy service (the one the
//! target's check or notify steps name, `NAME` or `STACK_NAME`) is on too, as in the home
//! lab's template, else its first network that is not the ingress network.
//!
//! # Filters
//!
//! | filter | arguments | meaning |
//! |---|---|---|
//! | `running` | | tasks whose `state` and `desired_state` are both `running` (the ones that should get traffic) |
//! | `with_state` | `state` | tasks whose current `state` equals `state` |
//! | `task_ip` | `network` | a task's address on that network (`""` if none); on a list of tasks, the list of addresses of those that have one |
//! | `with_label` | `name`, `value`? | services/containers/nodes carrying label `name` (with exactly `value` when given) |
//! | `label` | `name`, `default`? | an item's label value, else `default` (else `""`); handy because label names contain `-` |
//! | `group_by_label` | `name` | `[{name: value, items: [...]}]` sorted by label value; items without the label are left out |
//!
//! Example: `{{ service.tasks | running | task_ip(network="web") | join(sep=",") }}`.
//! Tera's own filters are there too, except those behind its optional features (`date`,
//! `filesizeformat`, `urlencode`, `slugify`, ...). Auto-escaping is off: output is config,
//! not HTML. A user template is a single file (no `include`/`extends`).
//!
//! # Labels
//!
//! The home lab's meanings (its docker-pygen template, `config/nginx.pygen.template.config`
//! of rycus86/home-stack-web), then drover's extensions under names it never used.
//!
//! | label | rule | default | used by |
//! |---|---|---|---|
//! | `routing-host` | comma-separated DNS names (letters, digits, inner `-`, dot-separated; spaces next to commas ignored) | not routed | nginx, certbot, ddclient |
//! | `routing-port` | 1–65535 | not routed | nginx upstream port (and prometheus fallback) |
//! | `routing-context` | `[A-Za-z0-9._~/-]+`, no `..` segment | `/` | nginx `location CONTEXT/`, stripped: `proxy_pass .../` |
//! | `routing-internal-context` | same as `routing-context` | none | the backend's path: `proxy_pass http://UPSTREAM/INTERNAL/` |
//! | `routing-max-body` | digits with optional `k`/`m`/`g` | nginx's | nginx `client_max_body_size` |
//! | `routing-auth` | absolute path, or relative to `/etc/nginx/auth`, of `[A-Za-z0-9._/-]`, no `.`, `..` or empty segment | none | nginx `auth_basic_user_file` |
//! | `routing-auth-realm` | 1–128 printable ASCII, no `"` `'` `\` `$` `;` `{` `}` | the service's name | nginx `auth_basic` |
//! | `routing-on-https` | anything (never inserted) | off | any non-empty value, as Jinja read it: `proxy_pass https://` |
//! | `routing-private-context` | same as `routing-context` (extension) | none | nginx: extra location, private networks only, path passed through |
//! | `routing-tls` | `true/false/yes/no/1/0` (extension) | true | nginx: `false` serves the host on port 80 only; certbot leaves it out |
//! | `routing-extra-hosts` | like `routing-host` | none | more names for the service's first host: nginx `server_name`, certbot (the home lab's label); on a service that routes nothing, names listed in `extra_hosts` |
//! | `routing-hsts` | `true/false/yes/no` or seconds (extension) | off | nginx: `Strict-Transport-Security` on the TLS server (`true`: one year) |
//! | `routing-network` | `[A-Za-z0-9][A-Za-z0-9_.-]*` (extension) | see above | routing network |
//! | `prometheus-job` | `[a-zA-Z_][a-zA-Z0-9_-]*` | not scraped | prometheus |
//! | `prometheus-port` | 1–65535 | `routing-port`, else 80 | prometheus |
//!
//! Services sharing a host and context share one location and upstream when their location
//! settings (`routing-on-https`, `routing-auth`, realm, max body, internal context) agree;
//! otherwise the later one (by name) is skipped, as is a service whose private context
//! collides with another location. Before that, a host belongs to the stack (or stack-less
//! service) that claimed it first by `CreatedAt`, then name, unless the target's `owners`
//! gives it to others; any other stack's service naming it is skipped (`owners`). A host gets TLS unless every service on it sets
//! `routing-tls=false`. `server_names_hash_bucket_size` is set, sized from the longest
//! host name, only when nginx's default is too small.

mod context;
mod filters;
mod labels;
mod nginx;
mod owners;
mod prometheus;
mod views;

pub use labels::INTERPRETED as INTERPRETED_LABELS;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::config::{Action, Target};
use crate::state::Snapshot;
use crate::status::SkippedService;

pub use labels::validate_service;

/// (name, source) of every built-in template.
pub const BUILTIN: &[(&str, &str)] = &[
    ("nginx", include_str!("../../templates/nginx.conf.tera")),
    (
        "prometheus",
        include_str!("../../templates/prometheus.yml.tera"),
    ),
    ("certbot", include_str!("../../templates/certbot.tera")),
    (
        "ddclient",
        include_str!("../../templates/ddclient.conf.tera"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown built-in template {0:?}")]
    UnknownBuiltin(String),
    #[error("cannot read template {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The template does not compile; `line` is 0 when Tera did not say.
    #[error("{path}:{line}: invalid template: {reason}")]
    Syntax {
        path: String,
        line: usize,
        reason: String,
        #[source]
        source: Box<tera::Error>,
    },
    #[error("cannot build the template context: {0}")]
    Context(#[source] Box<tera::Error>),
    #[error("template {path} failed to render: {reason}")]
    Render {
        path: String,
        reason: String,
        #[source]
        source: Box<tera::Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One compiled template (its own Tera instance) for one target.
pub struct Template {
    tera: tera::Tera,
    /// `builtin:NAME` or the file path: the Tera template name and what errors call it.
    name: String,
    target: String,
    network: Option<String>,
    /// The service the target's check or notify steps name: its networks are the routing
    /// networks, as in the home lab's template.
    proxy: Option<String>,
    uses: context::Uses,
    /// `private_networks` of the context, as nginx writes them.
    private_networks: Vec<String>,
    /// The target's `vars`, as the context's `vars`.
    vars: std::collections::BTreeMap<String, serde_json::Value>,
    /// The target's `owners`: which stacks may route which hosts.
    owners: crate::config::Owners,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

/// The output of one render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Services left out because of an invalid or clashing label value, sorted by name.
    pub skipped: Vec<SkippedService>,
    /// The hosts that want TLS (sorted; empty when the template does not use `hosts`):
    /// whose certificate files decide how they are served.
    pub tls_hosts: Vec<String>,
    /// The certificate each TLS host wants (its name and extra names), for drover's ACME
    /// client.
    pub wanted: Vec<crate::certs::Wanted>,
}

fn private_networks(networks: &crate::config::PrivateNetworks) -> Vec<String> {
    networks.0.iter().map(ToString::to_string).collect()
}

/// Where the built-in nginx template expects a TLS host's certificate (`HOST/fullchain.pem`
/// and `HOST/privkey.pem` under it), as certbot writes them.
pub use crate::apply::CERT_DIR;

/// What a render knows beyond the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// The TLS hosts whose certificate files exist; `None` when nobody looked (every TLS
    /// host is then rendered with its certificate, as before drover could look).
    pub certificates: Option<BTreeSet<String>>,
    /// ACME HTTP-01 tokens to answer (`token → key authorization`), on every host.
    pub challenges: BTreeMap<String, String>,
    /// The certificates drover delivers with the file, `host → fingerprint`: written into
    /// it, so a renewed pair is a changed file (delivered, checked and reloaded).
    pub fingerprints: BTreeMap<String, String>,
}

impl Template {
    /// Compiles `target.template` (`builtin:NAME` or a file path).
    pub fn load(target: &Target) -> Result<Template> {
        let (name, source) = match target.builtin() {
            Some(builtin) => {
                let (_, source) = BUILTIN
                    .iter()
                    .find(|(n, _)| *n == builtin)
                    .ok_or_else(|| Error::UnknownBuiltin(builtin.to_owned()))?;
                (target.template.clone(), (*source).to_owned())
            }
            None => {
                let source =
                    std::fs::read_to_string(Path::new(&target.template)).map_err(|source| {
                        Error::Read {
                            path: target.template.clone(),
                            source,
                        }
                    })?;
                (target.template.clone(), source)
            }
        };
        let mut template =
            Template::compile(&name, &source, &target.name, target.network.as_deref())?;
        template.proxy = proxy_service(target);
        template.private_networks = private_networks(&target.private_networks);
        template.vars = target.vars.clone();
        template.owners = target.owners.clone();
        Ok(template)
    }

    /// Compiles template text directly; `name` is what errors call it.
    pub fn compile(
        name: &str,
        source: &str,
        target: &str,
        network: Option<&str>,
    ) -> Result<Template> {
        let mut tera = tera::Tera::default();
        tera.autoescape_on(Vec::new());
        filters::register(&mut tera);
        tera.add_raw_template(name, source)
            .map_err(|source| syntax_error(name, source))?;
        Ok(Template {
            tera,
            name: name.to_owned(),
            target: target.to_owned(),
            network: network.map(str::to_owned),
            proxy: None,
            uses: context::Uses::scan(source),
            private_networks: private_networks(&Default::default()),
            vars: Default::default(),
            owners: Default::default(),
        })
    }

    /// Pure: same snapshot → same bytes. Services with invalid label values are left out
    /// and reported.
    pub fn render(&self, snapshot: &Snapshot) -> Result<Rendered> {
        self.render_with(snapshot, &Options::default())
    }

    /// [`Template::render`] with what drover knows about certificates.
    pub fn render_with(&self, snapshot: &Snapshot, options: &Options) -> Result<Rendered> {
        let (root, mut skipped) = context::build(
            snapshot,
            &self.target,
            self.network.as_deref(),
            self.proxy.as_deref(),
            self.uses,
            options.certificates.as_ref(),
            &self.owners,
        );
        let tls_hosts = root
            .hosts
            .iter()
            .flatten()
            .filter(|h| h.tls)
            .map(|h| h.name.clone())
            .collect();
        let wanted = root
            .hosts
            .iter()
            .flatten()
            .filter(|h| h.tls)
            .map(|h| crate::certs::Wanted {
                host: h.name.clone(),
                names: std::iter::once(h.name.clone())
                    .chain(h.aliases.iter().cloned())
                    .collect(),
                opted_in: h.acme,
            })
            .collect();
        let mut context = root
            .into_context()
            .map_err(|e| Error::Context(Box::new(e.into())))?;
        context.insert("private_networks", &self.private_networks);
        context.insert("vars", &self.vars);
        // Only what cannot break out of nginx's quoting reaches the file (the manager
        // checks too).
        let challenges: Vec<[&String; 2]> = options
            .challenges
            .iter()
            .filter(|(t, k)| {
                crate::certs::exchange::safe_token(t) && crate::certs::exchange::safe_token(k)
            })
            .map(|(t, k)| [t, k])
            .collect();
        context.insert("acme_challenges", &challenges);
        let fingerprints: Vec<[&String; 2]> =
            options.fingerprints.iter().map(|(h, f)| [h, f]).collect();
        context.insert("acme_certificates", &fingerprints);
        let text = self
            .tera
            .render(&self.name, &context)
            .map_err(|source| Error::Render {
                path: self.name.clone(),
                reason: chain(&source),
                source: Box::new(source),
            })?;
        skipped.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(Rendered {
            text,
            skipped,
            tls_hosts,
            wanted,
        })
    }

    /// `builtin:NAME` or the template's file path.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The first service named by the target's check, then notify steps.
fn proxy_service(target: &Target) -> Option<String> {
    target
        .check
        .iter()
        .chain(&target.notify)
        .find_map(|a| match a {
            Action::Exec(e) => e.service.clone(),
            Action::Signal(s) => s.service.clone(),
            Action::Restart(on) => on.service.clone(),
            Action::Command(_) => None,
        })
}

/// Every message of an error and its causes, joined: Tera puts the useful part in causes.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        parts.push(e.to_string());
        cur = e.source();
    }
    parts.join(": ")
}

/// Pulls the line and the "expected ..." part out of Tera's (pest's) parse error text.
fn syntax_error(path: &str, source: tera::Error) -> Error {
    let text = chain(&source);
    let line = text
        .split("--> ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let reason = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("= "))
        .map(str::to_owned)
        .unwrap_or_else(|| text.lines().next().unwrap_or_default().to_owned());
    Error::Syntax {
        path: path.to_owned(),
        line,
        reason,
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_template_compiles() {
        for (name, source) in BUILTIN {
            Template::compile(name, source, "t", None).expect(name);
        }
    }

    #[test]
    fn config_accepts_exactly_the_builtin_templates_render_has() {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, crate::config::BUILTIN_TEMPLATES);
    }

    #[test]
    fn a_syntax_error_names_the_file_and_line() {
        let err = Template::compile("my.tera", "line one\n{% for x in %}\n", "t", None)
            .expect_err("broken");
        let msg = err.to_string();
        assert!(msg.starts_with("my.tera:2: invalid template"), "{msg}");
    }

    #[test]
    fn an_undefined_variable_is_an_error_not_a_panic() {
        let t = Template::compile("u.tera", "{{ nope.missing }}", "t", None).expect("compiles");
        let err = t.render(&Snapshot::default()).expect_err("undefined");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
