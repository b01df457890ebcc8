//! Rules and actions: whether verified facts are allowed, and what work they ask for.
//!
//! Invariants: every `allow` rule is a full match and all of them must hold; a rule on a
//! fact the payload lacks fails (it never passes by absence). Rules only name facts the
//! hook's kind produces — the config loader refuses others ([`unknown_rule`]).

use std::collections::BTreeMap;

use super::facts::Facts;
use crate::config::{FullMatch, HookAction, HookKind};
use crate::jobs::Work;
use crate::update::ImageRef;

/// The first `allow` key the kind never produces.
pub fn unknown_rule(kind: HookKind, allow: &BTreeMap<String, FullMatch>) -> Option<&str> {
    let known = kind.facts();
    allow
        .keys()
        .map(String::as_str)
        .find(|k| !known.contains(k))
}

/// `Err(name)` of the first rule that does not hold.
pub fn check<'a>(allow: &'a BTreeMap<String, FullMatch>, facts: &Facts) -> Result<(), &'a str> {
    for (name, rule) in allow {
        if !facts.get(name).is_some_and(|v| rule.is_match(&v)) {
            return Err(name);
        }
    }
    Ok(())
}

/// Why no work could be made of allowed facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("payload names no image")]
    NoImage,
    #[error("invalid image reference")]
    InvalidImage,
    #[error("payload names no repository or branch")]
    NoBranch,
}

/// The job's work for this hook's action.
pub fn work(action: &HookAction, facts: &Facts) -> Result<Work, Error> {
    Ok(match action {
        HookAction::UpdateServices => {
            let image = facts.image.as_deref().ok_or(Error::NoImage)?;
            let image = ImageRef::parse(image).map_err(|_| Error::InvalidImage)?;
            Work::UpdateServices {
                image: image.key(),
                digest: None,
                only: Vec::new(),
            }
        }
        HookAction::RestartService(service) => Work::RestartService {
            service: service.clone(),
        },
        HookAction::Command(argv) => Work::Command { argv: argv.clone() },
        HookAction::Container(spec) => Work::Container { spec: spec.clone() },
        HookAction::SyncStacks => {
            let repository = facts.repository.clone().ok_or(Error::NoBranch)?;
            let branch = facts
                .r#ref
                .as_deref()
                .and_then(|r| r.strip_prefix("refs/heads/"))
                .ok_or(Error::NoBranch)?;
            Work::SyncStacks {
                repository,
                branch: branch.to_owned(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> BTreeMap<String, FullMatch> {
        serde_yaml_ng::from_str(yaml).expect("rules")
    }

    #[test]
    fn full_match_rules_do_not_accept_prefixes() {
        let allow = rules("{ tag: latest }");
        let facts = Facts {
            tag: Some("latest-foo".into()),
            ..Facts::default()
        };
        assert_eq!(check(&allow, &facts), Err("tag"));
        let facts = Facts {
            tag: Some("latest".into()),
            ..Facts::default()
        };
        assert_eq!(check(&allow, &facts), Ok(()));
    }

    #[test]
    fn a_rule_on_a_missing_fact_fails() {
        let allow = rules("{ pusher: \".*\" }");
        assert_eq!(check(&allow, &Facts::default()), Err("pusher"));
    }

    #[test]
    fn home_lab_rules_match_on_owner_namespace_pusher_and_sender() {
        let hub = rules(
            "{ owner: rycus86, namespace: rycus86, repository: 'rycus86/.+', pusher: rycus86, tag: '.+' }",
        );
        let mut f = Facts {
            owner: Some("rycus86".into()),
            namespace: Some("rycus86".into()),
            repository: Some("rycus86/app".into()),
            pusher: Some("rycus86".into()),
            tag: Some("latest".into()),
            ..Facts::default()
        };
        assert_eq!(unknown_rule(HookKind::Dockerhub, &hub), None);
        assert_eq!(check(&hub, &f), Ok(()));
        f.pusher = Some("mallory".into());
        assert_eq!(check(&hub, &f), Err("pusher"));
        let gh = rules("{ sender: rycus86, ref: refs/heads/master, commits: '[1-9][0-9]*' }");
        assert_eq!(unknown_rule(HookKind::Github, &gh), None);
        let f = Facts {
            sender: Some("rycus86".into()),
            r#ref: Some("refs/heads/master".into()),
            commits: Some(0),
            ..Facts::default()
        };
        assert_eq!(check(&gh, &f), Err("commits"));
    }

    #[test]
    fn keys_of_another_kind_are_unknown() {
        assert_eq!(
            unknown_rule(HookKind::Github, &rules("{ pusher: x }")),
            Some("pusher")
        );
        assert_eq!(
            unknown_rule(HookKind::Dockerhub, &rules("{ sender: x }")),
            Some("sender")
        );
        assert_eq!(
            unknown_rule(HookKind::Generic, &rules("{ image: x, colour: red }")),
            Some("colour")
        );
    }
}
