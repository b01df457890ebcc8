//! The check and notify steps: run an action against the containers, Swarm service or
//! local command it reaches, each bounded by a timeout, with the output kept short.

use std::path::Path;
use std::time::Duration;

use crate::config::Action;
use crate::docker::Engine;
use crate::state::{Snapshot, resolve_services, select_containers};

use super::Error;

/// How long a check or notify command may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `restart` of a Swarm service may take to roll out before it counts as failed.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Checker output kept for logs and the status page.
const OUTPUT_LIMIT: usize = 2000;

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
