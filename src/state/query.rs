//! Questions about a snapshot that several layers ask: which stack drover runs in, which
//! services a step's reference names, which local containers a selector reaches. Pure.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::config::Selector;

use super::Snapshot;

/// The label `docker stack deploy` puts on every service and container of a stack.
pub const STACK_LABEL: &str = "com.docker.stack.namespace";

/// The stack drover itself was deployed in, from the labels of its own container, else of
/// its own service; `None` outside a stack or when drover does not run in a container.
pub fn own_stack(snapshot: &Snapshot) -> Option<&str> {
    let own = snapshot.own.as_ref()?;
    let from_container = snapshot
        .containers
        .iter()
        .find(|c| c.id == own.container_id)
        .and_then(|c| c.labels.get(STACK_LABEL));
    let from_service = || {
        let name = own.service.as_deref()?;
        snapshot
            .services
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.labels.get(STACK_LABEL))
    };
    from_container
        .or_else(from_service)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// Whether a service reference of a check or notify step names `service`: the name as
/// written, or the same name in drover's own stack (`nginx` names `home_nginx` when
/// drover runs in stack `home`). `docker stack deploy` prefixes every service name with
/// the stack's, so the shipped config can say `nginx` whatever the stack is called,
/// which is how docker-pygen's `--signal nginx` kept working in the home lab.
pub fn names_service(reference: &str, service: &str, stack: Option<&str>) -> bool {
    service == reference
        || stack.is_some_and(|stack| {
            service
                .strip_prefix(stack)
                .and_then(|rest| rest.strip_prefix('_'))
                == Some(reference)
        })
}

/// The Swarm services a service reference names (see [`names_service`]); the reference
/// itself when the snapshot knows none, so the engine reports what is missing.
pub fn resolve_services(reference: &str, snapshot: &Snapshot) -> Vec<String> {
    let stack = own_stack(snapshot);
    let names: Vec<String> = snapshot
        .services
        .iter()
        .filter(|s| names_service(reference, &s.name, stack))
        .map(|s| s.name.clone())
        .collect();
    if names.is_empty() {
        vec![reference.to_owned()]
    } else {
        names
    }
}

/// Ids of the local containers an action reaches. A `service:` selector reaches only the
/// tasks of that Swarm service (by `com.docker.swarm.service.name`, which a container
/// cannot choose for itself): when drover runs in a stack and that stack has the service,
/// its tasks alone, so another stack's service or a bare service of the same name cannot
/// answer for it. A Compose service label counts only outside Swarm.
pub fn select_containers(on: &Selector, snapshot: &Snapshot) -> Vec<String> {
    let stack = own_stack(snapshot);
    let own_named = |s: &str| stack.map(|st| format!("{st}_{s}"));
    let in_own_stack = |s: &str| {
        own_named(s).is_some_and(|full| {
            snapshot
                .containers
                .iter()
                .any(|c| c.service.as_deref() == Some(full.as_str()))
        })
    };
    snapshot
        .containers
        .iter()
        .filter(|c| c.state == "running")
        .filter(|c| match (&on.service, &on.container, &on.label) {
            (Some(s), _, _) => match c.service.as_deref() {
                Some(name) if in_own_stack(s) => own_named(s).as_deref() == Some(name),
                Some(name) => names_service(s, name, stack),
                None => !snapshot.swarm && c.labels.get("com.docker.compose.service") == Some(s),
            },
            (_, Some(name), _) => c.name == *name || c.id.starts_with(name.as_str()),
            (_, _, Some(label)) => match label.split_once('=') {
                Some((k, v)) => c.labels.get(k).is_some_and(|x| x == v),
                None => c.labels.contains_key(label.as_str()),
            },
            _ => false,
        })
        .map(|c| c.id.clone())
        .collect()
}

/// Every address the consumers of the rendered files send from: the live tasks of the
/// services the steps' `service:` selectors name (anywhere in the Swarm: nginx on one node
/// proxies to drover on another), and the local containers any selector reaches. This is
/// the default set of trusted proxies of the webhook intake (DESIGN.md, "Sources behind
/// proxies"): nginx, which drover configures, is the one proxy it knows.
pub fn step_addresses(selectors: &[Selector], snapshot: &Snapshot) -> BTreeSet<IpAddr> {
    let stack = own_stack(snapshot);
    let parse = |ip: &String| ip.split('/').next().and_then(|a| a.parse::<IpAddr>().ok());
    let mut out = BTreeSet::new();
    for on in selectors {
        if let Some(reference) = &on.service {
            for s in snapshot
                .services
                .iter()
                .filter(|s| names_service(reference, &s.name, stack))
            {
                for t in s.tasks.iter().filter(|t| t.is_live()) {
                    out.extend(t.ips.values().filter_map(parse));
                }
            }
        }
        let ids = select_containers(on, snapshot);
        for c in snapshot.containers.iter().filter(|c| ids.contains(&c.id)) {
            out.extend(c.ips.values().filter_map(parse));
        }
    }
    out
}
