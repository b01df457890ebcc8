//! Carries a rendered config into place: diff → stage → check → commit or restore → notify.
//!
//! Invariants: unchanged content is never written and never notified; a file that failed
//! its check is never left in place (the last good content is restored, or the file is
//! removed if there was none) and nothing is notified; writes are atomic (temp file in
//! the same directory, fsync, rename) except on a single-file bind mount, where rename
//! fails and the content is rewritten in place. This module and `update` are the only
//! code that changes anything outside the process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::{Action, Selector, Target};
use crate::docker::{self, Engine};
use crate::state::Snapshot;

/// How long a check or notify command may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `restart` of a Swarm service may take to roll out before it counts as failed.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Checker output kept for logs and the status page.
const OUTPUT_LIMIT: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no running container matches {0}")]
    NoContainer(Selector),
    #[error(transparent)]
    Engine(#[from] docker::Error),
    #[error("restart of service {service}: {reason}")]
    Restart { service: String, reason: String },
    #[error("command {argv:?}: {reason}")]
    Command { argv: Vec<String>, reason: String },
    #[error("exited with {code}: {output}")]
    Failed { code: i64, output: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One target's output file and what it holds.
///
/// The content that last passed its check is persisted next to the output
/// (`.NAME.drover-good`), so a restart knows it: if drover died between staging a
/// candidate and its check, the file on disk differs from the record, counts as
/// unverified, and is checked again (and the record restored if it fails) instead of
/// being taken for current.
pub struct Applier {
    output: PathBuf,
    record: PathBuf,
    /// The last content that passed its check (restored when a candidate fails).
    good: Option<Vec<u8>>,
    /// Hash of the output file's content when it equals `good`; `None` while the file
    /// holds something unverified (or nothing).
    current_hash: Option<String>,
}

impl Applier {
    pub fn new(target: &Target) -> Applier {
        let output = target.output.clone();
        let record = record_path(&output);
        let on_disk = std::fs::read(&output).ok();
        let good = match std::fs::read(&record) {
            Ok(good) => Some(good),
            // No record yet (first start, or a file written before records existed):
            // the file in place is taken as good, as before.
            Err(_) => on_disk.clone(),
        };
        let current_hash = match (&on_disk, &good) {
            (Some(d), Some(g)) if d == g => Some(sha256_hex(d)),
            (Some(_), _) => {
                tracing::warn!(path = %output.display(),
                    "the file differs from its last checked content; it is checked again");
                None
            }
            _ => None,
        };
        Applier {
            output,
            record,
            good,
            current_hash,
        }
    }

    /// Hash of the checked content in place, if the file holds checked content.
    pub fn current_hash(&self) -> Option<&str> {
        self.current_hash.as_deref()
    }

    /// The last content that passed its check.
    pub fn good(&self) -> Option<&[u8]> {
        self.good.as_deref()
    }

    /// The names a checker may call the file by in its messages.
    pub fn file_names(&self) -> Vec<String> {
        self.output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .into_iter()
            .collect()
    }

    /// Puts `content` where the consumer reads it, before its check.
    pub fn stage(&mut self, content: &[u8]) -> Result<(), Error> {
        // From here until commit or restore the file is unverified.
        self.current_hash = None;
        write_file(&self.output, content)
    }

    /// The staged content passed its check: it is the new last good content.
    pub fn commit(&mut self, content: &[u8]) {
        if let Err(e) = write_file(&self.record, content) {
            // The file is right; only a restart would check it once more.
            tracing::warn!(error = %e, "cannot record the last good content");
        }
        self.current_hash = Some(sha256_hex(content));
        self.good = Some(content.to_vec());
    }

    /// The staged content failed: the last good content goes back (or the file goes, if
    /// there was none).
    pub fn restore(&mut self) -> Result<(), Error> {
        match &self.good {
            Some(previous) => {
                write_file(&self.output, previous)?;
                self.current_hash = Some(sha256_hex(previous));
                Ok(())
            }
            None => match std::fs::remove_file(&self.output) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(Error::Write {
                    path: self.output.clone(),
                    source,
                }),
            },
        }
    }
}

/// Where the last good content of `output` is recorded: beside it, hidden, and with a
/// suffix no consumer includes (nginx reads `*.conf`).
fn record_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}.drover-good"))
}

/// Replaces `path` atomically (see [`crate::fsutil::write_atomic`]).
pub fn write_file(path: &Path, content: &[u8]) -> Result<(), Error> {
    crate::fsutil::write_atomic(path, content).map_err(|e| match e {
        crate::fsutil::Error::Write { path, source } => Error::Write { path, source },
    })
}

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

/// Ids of the local containers an action reaches.
pub fn select_containers(on: &Selector, snapshot: &Snapshot) -> Vec<String> {
    let stack = own_stack(snapshot);
    snapshot
        .containers
        .iter()
        .filter(|c| c.state == "running")
        .filter(|c| match (&on.service, &on.container, &on.label) {
            (Some(s), _, _) => {
                c.service
                    .as_deref()
                    .is_some_and(|name| names_service(s, name, stack))
                    || c.labels.get("com.docker.compose.service") == Some(s)
            }
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

/// Runs one check or notify step against the containers it selects in `snapshot`.
pub async fn run_action(
    action: &Action,
    engine: Option<&Engine>,
    snapshot: &Snapshot,
) -> Result<(), Error> {
    match action {
        Action::Command(argv) => run_local(argv).await,
        Action::Exec(e) => {
            let engine = engine.ok_or_else(|| Error::NoContainer(e.on()))?;
            let ids = select_containers(&e.on(), snapshot);
            if ids.is_empty() {
                return Err(Error::NoContainer(e.on()));
            }
            for id in ids {
                exec(engine, &id, &e.command).await?;
            }
            Ok(())
        }
        Action::Signal(s) => {
            let engine = engine.ok_or_else(|| Error::NoContainer(s.on()))?;
            let ids = select_containers(&s.on(), snapshot);
            if ids.is_empty() {
                return Err(Error::NoContainer(s.on()));
            }
            let signal = format!("SIG{}", s.signal.trim_start_matches("SIG"));
            for id in ids {
                engine.kill_container(&id, &signal).await?;
            }
            Ok(())
        }
        Action::Restart(on) => {
            let engine = engine.ok_or_else(|| Error::NoContainer(on.clone()))?;
            if let (Some(name), true) = (&on.service, snapshot.swarm) {
                for service in resolve_services(name, snapshot) {
                    restart_service(engine, &service).await?;
                }
                return Ok(());
            }
            let ids = select_containers(on, snapshot);
            if ids.is_empty() {
                return Err(Error::NoContainer(on.clone()));
            }
            for id in ids {
                engine.restart_container(&id).await?;
            }
            Ok(())
        }
    }
}

/// Which of `hosts` have both certificate files (`fullchain.pem`, `privkey.pem`, not
/// empty) under `dir/HOST/`, looked up where `check` runs: in the check's container (one
/// `sh` loop for every host, names passed as arguments, never spliced into the script), or
/// on drover's own host for a local command. `None` when the check runs nowhere a file
/// can be looked up (no check, a signal or restart step).
pub async fn existing_certificates(
    check: &Action,
    engine: Option<&Engine>,
    snapshot: &Snapshot,
    dir: &str,
    hosts: &[String],
) -> Option<Result<std::collections::BTreeSet<String>, Error>> {
    const SCRIPT: &str = r#"d="$1"; shift; for h in "$@"; do [ -s "$d/$h/fullchain.pem" ] && [ -s "$d/$h/privkey.pem" ] && echo "$h"; done; exit 0"#;
    match check {
        Action::Command(_) => Some(Ok(hosts
            .iter()
            .filter(|h| {
                let has = |f: &str| {
                    std::fs::metadata(Path::new(dir).join(h.as_str()).join(f))
                        .is_ok_and(|m| m.len() > 0)
                };
                has("fullchain.pem") && has("privkey.pem")
            })
            .cloned()
            .collect())),
        Action::Exec(e) => {
            let run = async {
                let engine = engine.ok_or_else(|| Error::NoContainer(e.on()))?;
                let id = select_containers(&e.on(), snapshot)
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::NoContainer(e.on()))?;
                let mut argv: Vec<String> =
                    ["sh", "-c", SCRIPT, "sh", dir].map(str::to_owned).into();
                argv.extend(hosts.iter().cloned());
                let done = engine.exec(&id, &argv, STEP_TIMEOUT).await?;
                if done.exit_code != 0 {
                    return Err(Error::Failed {
                        code: done.exit_code,
                        output: tail(&done.output),
                    });
                }
                Ok(done
                    .output
                    .lines()
                    .map(str::trim)
                    .filter(|l| hosts.iter().any(|h| h == l))
                    .map(str::to_owned)
                    .collect())
            };
            Some(run.await)
        }
        Action::Signal(_) | Action::Restart(_) => None,
    }
}

/// Restarts every task of a Swarm service the way `docker service update --force` does,
/// and waits for Swarm to report the rollout done. Shares the service's edit lock with
/// webhook rollouts, so the two never interleave.
async fn restart_service(engine: &Engine, service: &str) -> Result<(), Error> {
    use crate::update::{Change, End};
    let rolled = crate::update::roll(engine, service, Change::Force, None, RESTART_TIMEOUT).await?;
    let reason = match rolled.end {
        End::Completed(_) | End::Unchanged => return Ok(()),
        End::Paused(m) => format!("update paused: {m}"),
        End::RolledBack(m) => format!("rolled back: {m}"),
        End::TimedOut(t) => format!("not done within {}", humantime::format_duration(t)),
        End::Removed => "the service was removed".into(),
    };
    Err(Error::Restart {
        service: service.to_owned(),
        reason,
    })
}

async fn exec(engine: &Engine, container: &str, argv: &[String]) -> Result<(), Error> {
    let done = engine.exec(container, argv, STEP_TIMEOUT).await?;
    if done.exit_code == 0 {
        Ok(())
    } else {
        Err(Error::Failed {
            code: done.exit_code,
            output: tail(&done.output),
        })
    }
}

/// A local command (argv, no shell, the process module's environment allow-list).
async fn run_local(argv: &[String]) -> Result<(), Error> {
    let out = crate::process::run(argv, &[], STEP_TIMEOUT, OUTPUT_LIMIT)
        .await
        .map_err(|e| match e {
            crate::process::Error::Timeout { after, .. } => Error::Timeout(after),
            other => Error::Command {
                argv: argv.to_vec(),
                reason: other.to_string(),
            },
        })?;
    if out.success() {
        Ok(())
    } else {
        let mut text = out.stdout;
        text.push_str(&out.stderr);
        Err(Error::Failed {
            code: i64::from(out.code.unwrap_or(-1)),
            output: tail(&text),
        })
    }
}

fn tail(s: &str) -> String {
    let s = s.trim();
    if s.len() <= OUTPUT_LIMIT {
        return s.to_owned();
    }
    let mut start = s.len() - OUTPUT_LIMIT;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_file_replaces_atomically_and_keeps_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("a.conf");
        write_file(&out, b"1").expect("write");
        write_file(&out, b"2").expect("write");
        assert_eq!(std::fs::read(&out).expect("read"), b"2");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    }

    #[test]
    fn selectors_pick_running_containers_by_service_name_and_label() {
        use crate::state::Container;
        let c = |id: &str, name: &str, svc: Option<&str>, label: Option<(&str, &str)>| Container {
            id: id.into(),
            name: name.into(),
            state: "running".into(),
            service: svc.map(str::to_owned),
            labels: label
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Container::default()
        };
        let snap = Snapshot {
            containers: vec![
                c("a1", "nginx.1.x", Some("nginx"), None),
                c("b2", "other", None, Some(("pygen.target", "proxy"))),
            ],
            ..Snapshot::default()
        };
        let sel = |s: Option<&str>, n: Option<&str>, l: Option<&str>| Selector {
            service: s.map(str::to_owned),
            container: n.map(str::to_owned),
            label: l.map(str::to_owned),
        };
        assert_eq!(
            select_containers(&sel(Some("nginx"), None, None), &snap),
            vec!["a1"]
        );
        assert_eq!(
            select_containers(&sel(None, Some("other"), None), &snap),
            vec!["b2"]
        );
        assert_eq!(
            select_containers(&sel(None, None, Some("pygen.target=proxy")), &snap),
            vec!["b2"]
        );
        assert_eq!(
            select_containers(&sel(None, None, Some("pygen.target")), &snap),
            vec!["b2"]
        );
        assert!(select_containers(&sel(None, None, Some("pygen.target=x")), &snap).is_empty());
    }

    #[test]
    fn a_service_reference_names_the_service_itself_or_the_same_name_in_the_own_stack() {
        let cases = [
            ("nginx", "nginx", None, true),
            ("nginx", "nginx", Some("home"), true),
            ("nginx", "home_nginx", Some("home"), true),
            ("home_nginx", "home_nginx", Some("home"), true),
            ("nginx", "home_nginx", None, false),
            ("nginx", "other_nginx", Some("home"), false),
            ("nginx", "homenginx", Some("home"), false),
            ("nginx", "home_nginx2", Some("home"), false),
            ("nginx", "home_web_nginx", Some("home"), false),
            ("ngin", "home_nginx", Some("home"), false),
        ];
        for (reference, service, stack, expected) in cases {
            assert_eq!(
                names_service(reference, service, stack),
                expected,
                "{reference:?} names {service:?} in stack {stack:?}"
            );
        }
    }

    fn stack_snapshot() -> Snapshot {
        use crate::state::{Container, Own, Service};
        let c = |id: &str, service: &str, stack: &str| Container {
            id: id.into(),
            name: format!("{service}.1.x"),
            state: "running".into(),
            service: Some(service.into()),
            labels: [(STACK_LABEL.to_owned(), stack.to_owned())].into(),
            ..Container::default()
        };
        let svc = |name: &str| Service {
            name: name.into(),
            ..Service::default()
        };
        Snapshot {
            swarm: true,
            containers: vec![
                c("d1", "home_drover", "home"),
                c("n1", "home_nginx", "home"),
                c("n2", "other_nginx", "other"),
            ],
            services: vec![svc("home_drover"), svc("home_nginx"), svc("other_nginx")],
            own: Some(Own {
                container_id: "d1".into(),
                service: Some("home_drover".into()),
            }),
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_shipped_service_name_reaches_nginx_of_drovers_own_stack_only() {
        let snap = stack_snapshot();
        assert_eq!(own_stack(&snap), Some("home"));
        let on = Selector {
            service: Some("nginx".into()),
            container: None,
            label: None,
        };
        assert_eq!(select_containers(&on, &snap), vec!["n1"]);
        assert_eq!(resolve_services("nginx", &snap), vec!["home_nginx"]);
        assert_eq!(resolve_services("other_nginx", &snap), vec!["other_nginx"]);
        assert_eq!(resolve_services("missing", &snap), vec!["missing"]);
    }

    #[test]
    fn the_own_stack_comes_from_the_own_service_when_the_container_has_no_stack_label() {
        let mut snap = stack_snapshot();
        snap.containers[0].labels.clear();
        assert_eq!(own_stack(&snap), None);
        snap.services[0]
            .labels
            .insert(STACK_LABEL.into(), "home".into());
        assert_eq!(own_stack(&snap), Some("home"));
    }

    #[test]
    fn outside_a_container_a_bare_name_matches_only_itself() {
        let mut snap = stack_snapshot();
        snap.own = None;
        let on = Selector {
            service: Some("nginx".into()),
            container: None,
            label: None,
        };
        assert!(select_containers(&on, &snap).is_empty());
    }
}
