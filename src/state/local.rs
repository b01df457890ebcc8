//! Outside Swarm: local containers standing in for services, and drover's own container.

use std::collections::BTreeMap;

use super::*;

/// Outside Swarm (plain Docker, Compose, or a worker without the Swarm API) the local
/// running containers stand in for services, like docker-gen: grouped by Swarm service or
/// Compose service label, else one per container, each container a running task. The
/// built-in templates then route by container labels.
pub(super) fn services_from_containers(containers: &[Container]) -> Vec<Service> {
    let mut by_name: BTreeMap<String, Service> = BTreeMap::new();
    for c in containers.iter().filter(|c| c.state == "running") {
        let name = c
            .service
            .clone()
            .or_else(|| {
                let project = c.labels.get("com.docker.compose.project")?;
                let service = c.labels.get("com.docker.compose.service")?;
                Some(format!("{project}_{service}"))
            })
            .unwrap_or_else(|| c.name.clone());
        let service = by_name.entry(name.clone()).or_insert_with(|| Service {
            id: c.id.clone(),
            name,
            image: c.image.clone(),
            labels: c.labels.clone(),
            mode: ServiceMode::Container,
            ..Service::default()
        });
        let created = created_at(c.created);
        if service.created_at.is_empty() || created < service.created_at {
            service.created_at = created;
        }
        for net in c.ips.keys() {
            if !service.networks.contains(net) {
                service.networks.push(net.clone());
            }
        }
        service.tasks.push(Task {
            container_id: Some(c.id.clone()),
            ..Task::running(&c.id, &service.id, c.ips.clone())
        });
    }
    by_name.into_values().collect()
}

/// A container's creation time as Swarm would write it (RFC 3339, UTC): empty when unknown.
fn created_at(seconds: i64) -> String {
    u64::try_from(seconds)
        .ok()
        .filter(|s| *s > 0)
        .map(|s| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
            humantime::format_rfc3339_seconds(at).to_string()
        })
        .unwrap_or_default()
}

/// drover's own container: Docker sets the hostname to the short container id unless the
/// operator overrides it, so match on that.
pub(super) fn own_container(containers: &[Container]) -> Option<Own> {
    // The hostname cannot change under a running container: read it once, not per snapshot.
    static HOSTNAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let host = HOSTNAME.get_or_init(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    });
    if host.len() < 12 {
        return None;
    }
    containers
        .iter()
        .find(|c| c.id.starts_with(host))
        .map(|c| Own {
            container_id: c.id.clone(),
            service: c.service.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_swarm_containers_become_services_grouped_by_compose_service() {
        let c = |id: &str, name: &str, service: &str, ip: &str| Container {
            id: id.into(),
            name: name.into(),
            state: "running".into(),
            labels: [
                ("com.docker.compose.project".to_owned(), "lab".to_owned()),
                ("com.docker.compose.service".to_owned(), service.to_owned()),
                ("routing-host".to_owned(), "a.example.com".to_owned()),
            ]
            .into(),
            ips: [("lab_default".to_owned(), ip.to_owned())].into(),
            ..Container::default()
        };
        let services = services_from_containers(&[
            c("1", "lab-web-1", "web", "172.18.0.2"),
            c("2", "lab-web-2", "web", "172.18.0.3"),
            c("3", "lab-db-1", "db", "172.18.0.4"),
        ]);
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["lab_db", "lab_web"]);
        let web = &services[1];
        assert_eq!(web.tasks.len(), 2);
        assert!(web.tasks.iter().all(Task::is_live));
        assert_eq!(web.networks, ["lab_default"]);
        assert_eq!(
            web.labels.get("routing-host").map(String::as_str),
            Some("a.example.com")
        );
    }
}
