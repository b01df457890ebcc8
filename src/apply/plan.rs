//! The pure decision of one reconcile: given the cluster, the rendered bytes and what
//! the target remembers, what should happen to its file.
//!
//! No I/O and no clock reads: the caller passes `now`, so every branch is a table test.
//! Check and notify steps come out already resolved against the snapshot (which
//! containers, or a Swarm service, or the local host), so the executor only carries them
//! out. Invariants: identical bytes are never written; bytes whose check failed are not
//! checked again until they change; a check that could not run is not retried before its
//! backoff ends unless it now reaches other containers.

use tokio::time::Instant;

use crate::config::{Action, Selector, Target};
use crate::hash::sha256_hex;
use crate::state::Snapshot;
use crate::state::select_containers;

/// What one target remembers between reconciles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetMemory {
    /// Hash of the bytes the output file holds and that passed their check, if any.
    pub current: Option<String>,
    /// Hash of the last content whose check failed.
    pub known_bad: Option<String>,
    /// The last check that could not run, and when it may be tried again.
    pub unavailable: Option<Unavailable>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// What the check reached when it could not run.
    pub reach: Reach,
    pub retry_at: Instant,
}

/// Where a check or notify step runs, resolved from its selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// These running local containers (ids).
    Containers(Vec<String>),
    /// A Swarm service, restarted through the engine.
    Service(String),
    /// A command on drover's own host.
    Local,
    /// Nothing that runs matches the selector.
    Nobody(Selector),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub reach: Reach,
}

/// The content to stage, and the steps around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub hash: String,
    pub check: Option<Step>,
    pub notify: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The file already holds these bytes.
    Unchanged,
    /// These bytes failed their check before.
    KnownBad,
    /// The check could not run a moment ago and reaches the same place: wait.
    Wait(Instant),
    /// The check reaches no running container: nothing is staged, the file stays.
    CheckUnavailable(Selector),
    Write(Write),
}

/// Decides what to do with `rendered` for `target`.
pub fn plan(
    target: &Target,
    snapshot: &Snapshot,
    rendered: &[u8],
    memory: &TargetMemory,
    now: Instant,
) -> Plan {
    let hash = sha256_hex(rendered);
    if memory.current.as_deref() == Some(hash.as_str()) {
        return Plan::Unchanged;
    }
    if memory.known_bad.as_deref() == Some(hash.as_str()) {
        return Plan::KnownBad;
    }
    let check = target.check.as_ref().map(|a| step(a, snapshot));
    if let Some(check) = &check {
        if let Some(u) = &memory.unavailable {
            if u.reach == check.reach && now < u.retry_at {
                return Plan::Wait(u.retry_at);
            }
        }
        if let Reach::Nobody(on) = &check.reach {
            return Plan::CheckUnavailable(on.clone());
        }
    }
    Plan::Write(Write {
        hash,
        check,
        notify: target.notify.iter().map(|a| step(a, snapshot)).collect(),
    })
}

/// Resolves where `action` runs in `snapshot`.
pub fn step(action: &Action, snapshot: &Snapshot) -> Step {
    let reach = match action {
        Action::Command(_) => Reach::Local,
        Action::Restart(on) if on.service.is_some() && snapshot.swarm => {
            Reach::Service(on.service.clone().unwrap_or_default())
        }
        Action::Exec(e) => containers(&e.on(), snapshot),
        Action::Signal(s) => containers(&s.on(), snapshot),
        Action::Restart(on) => containers(on, snapshot),
    };
    Step {
        action: action.clone(),
        reach,
    }
}

fn containers(on: &Selector, snapshot: &Snapshot) -> Reach {
    let ids = select_containers(on, snapshot);
    if ids.is_empty() {
        Reach::Nobody(on.clone())
    } else {
        Reach::Containers(ids)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{ExecSpec, SignalSpec};
    use crate::state::Container;

    fn on_service(name: &str) -> (Option<String>, Option<String>, Option<String>) {
        (Some(name.to_owned()), None, None)
    }

    fn nginx_target() -> Target {
        let (service, container, label) = on_service("nginx");
        Target {
            check: Some(Action::Exec(ExecSpec {
                service: service.clone(),
                container: container.clone(),
                label: label.clone(),
                command: vec!["nginx".into(), "-t".into()],
            })),
            notify: vec![
                Action::Signal(SignalSpec {
                    service,
                    container,
                    label,
                    signal: "HUP".into(),
                }),
                Action::Signal(SignalSpec {
                    service: Some("certbot".into()),
                    container: None,
                    label: None,
                    signal: "HUP".into(),
                }),
            ],
            ..Target::new("nginx", "builtin:nginx", "/tmp/never-written.conf")
        }
    }

    fn with_nginx(ids: &[&str]) -> Snapshot {
        Snapshot {
            containers: ids
                .iter()
                .map(|id| Container {
                    id: (*id).into(),
                    name: format!("nginx.1.{id}"),
                    state: "running".into(),
                    service: Some("nginx".into()),
                    ..Container::default()
                })
                .collect(),
            ..Snapshot::default()
        }
    }

    fn nginx() -> Selector {
        Selector {
            service: Some("nginx".into()),
            container: None,
            label: None,
        }
    }

    /// (what it shows, cluster, memory, now, expected plan)
    type Case<'a> = (
        &'a str,
        &'a Snapshot,
        TargetMemory,
        Instant,
        fn(&Plan) -> bool,
    );

    #[test]
    fn plans_follow_the_table() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let new = b"server { listen 80; }".as_slice();
        let new_hash = sha256_hex(new);
        let up = with_nginx(&["a1"]);
        let down = with_nginx(&[]);
        let moved = with_nginx(&["b2"]);
        let unavailable_on_a1 = TargetMemory {
            unavailable: Some(Unavailable {
                reach: Reach::Containers(vec!["a1".into()]),
                retry_at: later,
            }),
            ..TargetMemory::default()
        };
        let cases: Vec<Case> = vec![
            (
                "unchanged bytes do nothing",
                &up,
                TargetMemory {
                    current: Some(new_hash.clone()),
                    ..TargetMemory::default()
                },
                now,
                |p| *p == Plan::Unchanged,
            ),
            (
                "bytes that failed their check are not checked again",
                &up,
                TargetMemory {
                    known_bad: Some(new_hash.clone()),
                    ..TargetMemory::default()
                },
                now,
                |p| *p == Plan::KnownBad,
            ),
            (
                "a check whose container is down stages nothing",
                &down,
                TargetMemory::default(),
                now,
                |p| *p == Plan::CheckUnavailable(nginx()),
            ),
            (
                "a check whose container is still down waits for its backoff",
                &down,
                TargetMemory {
                    unavailable: Some(Unavailable {
                        reach: Reach::Nobody(nginx()),
                        retry_at: later,
                    }),
                    ..TargetMemory::default()
                },
                now,
                |p| matches!(p, Plan::Wait(_)),
            ),
            (
                "a check that could not run waits for its backoff",
                &up,
                unavailable_on_a1.clone(),
                now,
                |p| matches!(p, Plan::Wait(_)),
            ),
            (
                "a check that could not run is tried again after its backoff",
                &up,
                unavailable_on_a1.clone(),
                later,
                |p| matches!(p, Plan::Write(_)),
            ),
            (
                "a check that now reaches another container is tried at once",
                &moved,
                unavailable_on_a1.clone(),
                now,
                |p| matches!(p, Plan::Write(w) if w.check.as_ref().is_some_and(|c| c.reach == Reach::Containers(vec!["b2".into()]))),
            ),
            (
                "a notify step that reaches nobody is planned as such, the write goes ahead",
                &up,
                TargetMemory::default(),
                now,
                |p| {
                    matches!(p, Plan::Write(w) if w.notify.len() == 2
                    && w.notify[0].reach == Reach::Containers(vec!["a1".into()])
                    && matches!(&w.notify[1].reach, Reach::Nobody(s) if s.service.as_deref() == Some("certbot")))
                },
            ),
        ];
        let target = nginx_target();
        for (name, snapshot, memory, at, expect) in cases {
            let p = plan(&target, snapshot, new, &memory, at);
            assert!(expect(&p), "{name}: got {p:?}");
        }
    }

    #[test]
    fn a_restart_of_a_swarm_service_reaches_the_service_not_its_containers() {
        let restart = Action::Restart(nginx());
        let mut swarm = with_nginx(&[]);
        swarm.swarm = true;
        assert_eq!(step(&restart, &swarm).reach, Reach::Service("nginx".into()));
        assert_eq!(
            step(&restart, &with_nginx(&["a1"])).reach,
            Reach::Containers(vec!["a1".into()])
        );
        assert_eq!(
            step(&Action::Command(vec!["true".into()]), &swarm).reach,
            Reach::Local
        );
    }
}
