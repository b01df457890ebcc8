//! Which services are polled, and how often: pure, over the services' labels and images,
//! the `poll:` section and the names of the stacks drover deploys from git.
//!
//! The rules, in order: `drover.update=false` is never polled (drover updates it no way);
//! `drover.poll` says yes (`true` or a period) or no (`false`) for its service; without the
//! label, `poll.all` polls the service unless it belongs to a stack deployed from git (its
//! repository is its desired state: only its own label lets polling roll it). A service
//! pinned to a digest without a tag (`repo@sha256:…`) names no tag to follow, and an image
//! outside `poll.images` is never polled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::config::{Poll, PollLabel};
use crate::update::{ImageRef, OPT_OUT_LABEL, opted_out};

/// The label that opts a service in (or out) of polling.
pub const POLL_LABEL: &str = "drover.poll";
/// The label `docker stack deploy` puts on a stack's services.
pub const STACK_LABEL: &str = "com.docker.stack.namespace";

/// A service as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// `TaskTemplate.ContainerSpec.Image` as the spec has it.
    pub image: String,
    pub labels: HashMap<String, String>,
}

/// One polled service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Polled {
    pub name: String,
    /// The digest the spec pins, if any.
    pub digest: Option<String>,
    pub every: Duration,
}

/// One image reference to check, with the services that run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub image: ImageRef,
    /// The shortest period of its services.
    pub every: Duration,
    pub services: Vec<Polled>,
}

/// Services left out for a bad label: (service, reason).
pub type Problems = Vec<(String, String)>;

/// The images to check, by `registry/repo:tag`, and the services whose label is wrong.
pub fn polled(
    services: &[Service],
    config: &Poll,
    git_stacks: &BTreeSet<String>,
) -> (BTreeMap<String, Image>, Problems) {
    let (mut images, mut problems) = (BTreeMap::<String, Image>::new(), Problems::new());
    for s in services {
        let label = |k: &str| s.labels.get(k).map(String::as_str);
        if label(OPT_OUT_LABEL).is_some_and(opted_out) {
            continue;
        }
        let every = match label(POLL_LABEL).map(PollLabel::parse) {
            Some(Ok(PollLabel::Off)) => continue,
            Some(Ok(PollLabel::On)) => config.every,
            Some(Ok(PollLabel::Every(d))) => d,
            Some(Err(reason)) => {
                problems.push((s.name.clone(), reason));
                continue;
            }
            None if !config.all => continue,
            None if label(STACK_LABEL).is_some_and(|n| git_stacks.contains(n)) => continue,
            None => config.every,
        };
        let Ok(image) = ImageRef::parse(&s.image) else {
            problems.push((s.name.clone(), "image reference is not valid".into()));
            continue;
        };
        if image.digest.is_some() && !has_tag(&s.image) {
            continue;
        }
        if config
            .images
            .as_ref()
            .is_some_and(|m| !m.is_match(&image.key()))
        {
            continue;
        }
        let entry = images.entry(image.key()).or_insert_with(|| Image {
            image: ImageRef {
                digest: None,
                ..image.clone()
            },
            every,
            services: Vec::new(),
        });
        entry.every = entry.every.min(every);
        entry.services.push(Polled {
            name: s.name.clone(),
            digest: image.digest,
            every,
        });
    }
    (images, problems)
}

/// Whether a reference names a tag (`:tag` after the last `/`, before any `@digest`).
fn has_tag(image: &str) -> bool {
    let name = crate::update::without_digest(image);
    name[name.rfind('/').map_or(0, |i| i + 1)..].contains(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, image: &str, labels: &[(&str, &str)]) -> Service {
        Service {
            name: name.into(),
            image: image.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn names(images: &BTreeMap<String, Image>) -> Vec<String> {
        images
            .values()
            .flat_map(|i| i.services.iter().map(|s| s.name.clone()))
            .collect()
    }

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn only_labelled_services_are_polled_unless_all_is_set() {
        let services = [
            svc("a", "nginx:1.27", &[("drover.poll", "true")]),
            svc("b", "redis:7", &[]),
        ];
        let (images, problems) = polled(&services, &Poll::default(), &BTreeSet::new());
        assert_eq!(names(&images), ["a"]);
        assert!(problems.is_empty());
        let all = Poll {
            all: true,
            ..Poll::default()
        };
        let (images, _) = polled(&services, &all, &BTreeSet::new());
        assert_eq!(names(&images), ["a", "b"]);
    }

    #[test]
    fn git_stacks_are_polled_only_by_their_own_label_and_opt_outs_always_win() {
        let all = Poll {
            all: true,
            ..Poll::default()
        };
        let git = BTreeSet::from(["web".to_owned()]);
        let services = [
            svc("web_app", "me/app:main", &[(STACK_LABEL, "web")]),
            svc(
                "web_worker",
                "me/worker:main",
                &[(STACK_LABEL, "web"), (POLL_LABEL, "10m")],
            ),
            svc("other_app", "me/other:1", &[(STACK_LABEL, "other")]),
            svc("off", "me/off:1", &[(POLL_LABEL, "false")]),
            svc(
                "no_updates",
                "me/nu:1",
                &[(POLL_LABEL, "true"), (OPT_OUT_LABEL, "false")],
            ),
        ];
        let (images, _) = polled(&services, &all, &git);
        assert_eq!(names(&images), ["other_app", "web_worker"]);
        assert_eq!(
            images["docker.io/me/worker:main"].every,
            Duration::from_secs(600)
        );
    }

    #[test]
    fn services_of_one_image_share_one_check_at_the_shortest_period() {
        let services = [
            svc(
                "a",
                &format!("127.0.0.1:5000/x:1@{D}"),
                &[(POLL_LABEL, "10m")],
            ),
            svc("b", "127.0.0.1:5000/x:1", &[(POLL_LABEL, "1m")]),
        ];
        let (images, _) = polled(&services, &Poll::default(), &BTreeSet::new());
        assert_eq!(images.len(), 1);
        let image = &images["127.0.0.1:5000/x:1"];
        assert_eq!(image.every, Duration::from_secs(60));
        assert_eq!(image.image.digest, None);
        assert_eq!(image.services[0].digest.as_deref(), Some(D));
        assert_eq!(image.services[1].digest, None);
    }

    #[test]
    fn images_outside_the_configured_pattern_are_never_polled() {
        let config = Poll {
            all: true,
            images: Some(crate::config::FullMatch::new(r"ghcr\.io/me/.*").expect("regex")),
            ..Poll::default()
        };
        let services = [
            svc("mine", "ghcr.io/me/app:1", &[]),
            svc("upstream", "nginx:1.27", &[(POLL_LABEL, "true")]),
        ];
        let (images, _) = polled(&services, &config, &BTreeSet::new());
        assert_eq!(names(&images), ["mine"]);
    }

    #[test]
    fn a_bad_label_is_reported_and_a_digest_without_tag_is_not_followed() {
        let services = [
            svc("bad", "x:1", &[(POLL_LABEL, "sometimes")]),
            svc("pinned", &format!("x@{D}"), &[(POLL_LABEL, "true")]),
        ];
        let (images, problems) = polled(&services, &Poll::default(), &BTreeSet::new());
        assert!(images.is_empty());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "bad");
    }
}
