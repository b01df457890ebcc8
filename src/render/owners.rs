//! Who a routed host belongs to, and which services' claims on hosts are refused.
//!
//! A host (a `routing-host` or `routing-extra-hosts` name of a routed service) belongs to
//! the owner of the service that claimed it first: its stack (the
//! `com.docker.stack.namespace` label; outside Swarm, the Compose project), or the service
//! itself when it is in none. "First" is Swarm's `CreatedAt`, then the name, so the order
//! does not change when services are renamed in between or listed differently, and a
//! service created later cannot take a host by a name that sorts first. A target's
//! `owners` setting gives a host to the stacks it lists instead. Invariants: a service
//! whose owner may not route one of its hosts is refused as a whole (never half a
//! service); a refused service claims nothing; services of one owner share its hosts;
//! the result depends only on the services and the setting, never on their order.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::labels;
use super::views::ServiceView;
use crate::config::{Owner, Owners};
use crate::state::STACK_LABEL;
use crate::status::SkippedService;

/// The label Compose puts on a project's containers: the stack of a service outside Swarm.
const COMPOSE_PROJECT: &str = "com.docker.compose.project";

/// The owner a service claims hosts for.
pub fn owner_of(service: &ServiceView<'_>) -> Owner {
    let stack = service.label(STACK_LABEL).filter(|s| !s.is_empty());
    let project = || {
        (service.mode == crate::state::ServiceMode::Container.as_str())
            .then(|| service.label(COMPOSE_PROJECT))
            .flatten()
            .filter(|s| !s.is_empty())
    };
    match stack.or_else(project) {
        Some(stack) => Owner::Stack(stack.to_owned()),
        None => Owner::Service(service.name.to_owned()),
    }
}

/// When a service was created, for ordering: an unknown or unreadable time sorts last.
fn created(service: &ServiceView<'_>) -> Option<SystemTime> {
    humantime::parse_rfc3339(service.created_at).ok()
}

/// The routed services (`routing-host` and `routing-port`) whose claims are refused, by
/// name, each with the reason as the status page and the log show it.
pub fn refusals(services: &[ServiceView<'_>], owners: &Owners) -> BTreeMap<String, SkippedService> {
    let mut routed: Vec<(Option<SystemTime>, &ServiceView<'_>, &str)> = services
        .iter()
        .filter(|s| s.port(labels::PORT).is_some())
        .filter_map(|s| Some((created(s), s, s.label(labels::HOST)?)))
        .collect();
    // `None` (unknown) after every known time, then by name.
    routed.sort_by(|a, b| (a.0.is_none(), a.0, a.1.name).cmp(&(b.0.is_none(), b.0, b.1.name)));

    let mut first: BTreeMap<String, Owner> = BTreeMap::new();
    let mut refused = BTreeMap::new();
    for (_, service, value) in routed {
        let owner = owner_of(service);
        // The names it serves: its hosts, and its extra names (server names and certificate
        // names too, so another stack's alias could take a host as well).
        let extra = service.label(labels::EXTRA_HOSTS);
        let mut hosts: Vec<(String, &'static str, &str)> = labels::hosts(value)
            .map(|h| (h, labels::HOST, value))
            .chain(
                extra
                    .into_iter()
                    .flat_map(|v| labels::hosts(v).map(move |h| (h, labels::EXTRA_HOSTS, v))),
            )
            .collect();
        hosts.sort();
        hosts.dedup_by(|a, b| a.0 == b.0);
        let refusal = hosts.iter().find_map(|(host, label, value)| {
            let reason = match owners.of(host) {
                Some(allowed) if !allowed.contains(&owner) => Some(format!(
                    "host {host} belongs to {} (the target's owners setting)",
                    list(allowed)
                )),
                Some(_) => None,
                None => first
                    .get(host)
                    .filter(|o| **o != owner)
                    .map(|o| format!("host {host} belongs to {o}, which claimed it first")),
            };
            reason.map(|reason| SkippedService {
                service: service.name.to_owned(),
                label: (*label).to_owned(),
                value: (*value).to_owned(),
                reason,
            })
        });
        match refusal {
            Some(refusal) => {
                refused.insert(service.name.to_owned(), refusal);
            }
            None => {
                for (host, _, _) in hosts {
                    first.entry(host).or_insert_with(|| owner.clone());
                }
            }
        }
    }
    refused
}

fn list(owners: &[Owner]) -> String {
    owners
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::render::views::{Networks, service_view};
    use crate::state::{Service, ServiceMode};

    /// A routed service on `hosts`, created at `created` (RFC 3339), in `stack` if any.
    fn service(name: &str, hosts: &str, stack: Option<&str>, created: &str) -> Service {
        let mut labels: BTreeMap<String, String> = [
            (labels::HOST.to_owned(), hosts.to_owned()),
            (labels::PORT.to_owned(), "80".to_owned()),
        ]
        .into();
        if let Some(stack) = stack {
            labels.insert(STACK_LABEL.to_owned(), stack.to_owned());
        }
        Service {
            id: format!("{name}-id"),
            name: name.to_owned(),
            labels,
            created_at: created.to_owned(),
            ..Service::default()
        }
    }

    fn refused(services: &[Service], owners: &Owners) -> BTreeMap<String, String> {
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
        refusals(&views, owners)
            .into_iter()
            .map(|(name, s)| (name, s.reason))
            .collect()
    }

    fn owners(yaml: &str) -> Owners {
        serde_yaml_ng::from_str(yaml).expect("owners")
    }

    // In time order. As text "…00.1Z" sorts after "…00.12Z" ('Z' > '2'): the engine drops
    // trailing zeros of the fraction, so only a parsed time orders them right.
    const T1: &str = "2026-01-01T10:00:00.1Z";
    const T2: &str = "2026-01-01T10:00:00.12Z";
    const T3: &str = "2026-01-02T00:00:00Z";

    #[test]
    fn a_later_service_of_another_stack_is_refused_even_with_a_name_that_sorts_first() {
        let r = refused(
            &[
                service("aaa", "x.com", Some("tenant"), T3),
                service("victim_app", "x.com", Some("victim"), T1),
            ],
            &Owners::default(),
        );
        assert_eq!(
            r,
            [(
                "aaa".to_owned(),
                "host x.com belongs to stack victim, which claimed it first".to_owned()
            )]
            .into()
        );
    }

    #[test]
    fn creation_times_compare_as_times_not_as_text() {
        let r = refused(
            &[
                service("a", "x.com", Some("one"), T2),
                service("b", "x.com", Some("two"), T1),
            ],
            &Owners::default(),
        );
        assert_eq!(r.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn services_of_one_stack_share_a_host() {
        let r = refused(
            &[
                service("web_a", "x.com", Some("web"), T1),
                service("web_b", "x.com, y.com", Some("web"), T2),
                service("z", "y.com", None, T3),
            ],
            &Owners::default(),
        );
        assert_eq!(
            r,
            [(
                "z".to_owned(),
                "host y.com belongs to stack web, which claimed it first".to_owned()
            )]
            .into()
        );
    }

    #[test]
    fn of_two_claims_created_at_the_same_time_the_name_that_sorts_first_wins() {
        let r = refused(
            &[
                service("b", "x.com", Some("two"), T1),
                service("a", "x.com", Some("one"), T1),
            ],
            &Owners::default(),
        );
        assert_eq!(r.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_stackless_service_owns_its_hosts_alone_and_an_unknown_time_comes_last() {
        let r = refused(
            &[
                service("a", "x.com", None, ""),
                service("b", "x.com", None, T3),
            ],
            &Owners::default(),
        );
        assert_eq!(
            r.get("a").map(String::as_str),
            Some("host x.com belongs to service b, which claimed it first")
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_refused_service_is_refused_on_every_host_and_claims_none_of_them() {
        let r = refused(
            &[
                service("victim", "x.com", Some("v"), T1),
                service("thief", "x.com, y.com", Some("t"), T2),
                service("late", "y.com", Some("l"), T3),
            ],
            &Owners::default(),
        );
        assert_eq!(r.keys().collect::<Vec<_>>(), ["thief"]);
    }

    #[test]
    fn an_extra_name_is_claimed_like_a_host_and_cannot_take_another_stacks_host() {
        let mut owner = service("a", "a.com", Some("one"), T1);
        owner
            .labels
            .insert(labels::EXTRA_HOSTS.to_owned(), "www.a.com".to_owned());
        let mut alias_thief = service("b", "b.com", Some("two"), T2);
        alias_thief
            .labels
            .insert(labels::EXTRA_HOSTS.to_owned(), "www.a.com".to_owned());
        let mut host_thief = service("c", "c.com", Some("three"), T3);
        host_thief
            .labels
            .insert(labels::EXTRA_HOSTS.to_owned(), "a.com".to_owned());
        let r = refused(&[owner, alias_thief, host_thief], &Owners::default());
        assert_eq!(
            r,
            [
                (
                    "b".to_owned(),
                    "host www.a.com belongs to stack one, which claimed it first".to_owned()
                ),
                (
                    "c".to_owned(),
                    "host a.com belongs to stack one, which claimed it first".to_owned()
                ),
            ]
            .into()
        );
    }

    #[test]
    fn the_owners_setting_overrides_the_first_claim() {
        let setting = owners("{'*.example.com': [web], 'old.example.com': ['service:legacy']}");
        let r = refused(
            &[
                service("early", "a.example.com", Some("other"), T1),
                service("web_app", "a.example.com", Some("web"), T3),
                service("legacy", "old.example.com", None, T3),
                service("web_old", "old.example.com", Some("web"), T1),
                service("free", "free.org", Some("other"), T1),
            ],
            &setting,
        );
        assert_eq!(
            r,
            [
                (
                    "early".to_owned(),
                    "host a.example.com belongs to stack web (the target's owners setting)"
                        .to_owned()
                ),
                (
                    "web_old".to_owned(),
                    "host old.example.com belongs to service legacy (the target's owners setting)"
                        .to_owned()
                ),
            ]
            .into()
        );
    }

    #[test]
    fn the_result_does_not_depend_on_the_order_services_come_in() {
        let mut services = vec![
            service("a", "x.com", Some("s1"), T3),
            service("b", "x.com", Some("s2"), T1),
            service("c", "x.com, y.com", Some("s3"), T2),
        ];
        let forward = refused(&services, &Owners::default());
        services.reverse();
        assert_eq!(refused(&services, &Owners::default()), forward);
        assert_eq!(forward.keys().collect::<Vec<_>>(), ["a", "c"]);
    }

    #[test]
    fn outside_swarm_the_compose_project_is_the_stack() {
        let mut a = service("lab_web", "x.com", None, T1);
        let mut b = service("lab_api", "x.com", None, T2);
        for s in [&mut a, &mut b] {
            s.mode = ServiceMode::Container;
            s.labels
                .insert(COMPOSE_PROJECT.to_owned(), "lab".to_owned());
        }
        let other = service("other", "x.com", None, T3);
        let r = refused(&[a, b, other], &Owners::default());
        assert_eq!(r.keys().collect::<Vec<_>>(), ["other"]);
    }
}
