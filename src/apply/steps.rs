//! The check and notify steps: run an action against the containers, Swarm service or
//! local command it reaches, each bounded by a timeout, with the output kept short.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::config::Action;
use crate::docker::Engine;
use crate::hash::sha256_hex;
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
/// empty) under `dir/HOST/`, each with a fingerprint of the two files' content, looked up
/// where `check` runs: in the check's container (one `sh` loop for every host, names
/// passed as arguments, never spliced into the script; `md5sum` of both files, which every
/// nginx image has), or on drover's own host for a local command. `None` when the check
/// runs nowhere a file can be looked up (no check, a signal or restart step). The
/// fingerprint only tells a change: it is never compared across the two ways.
pub async fn existing_certificates(
    check: &Action,
    engine: Option<&Engine>,
    snapshot: &Snapshot,
    dir: &str,
    hosts: &[String],
) -> Option<Result<BTreeMap<String, String>, Error>> {
    const SCRIPT: &str = r#"d="$1"; shift; for h in "$@"; do c="$d/$h/fullchain.pem"; k="$d/$h/privkey.pem"; [ -s "$c" ] && [ -s "$k" ] && echo "$h $(cat "$c" "$k" | md5sum)"; done; exit 0"#;
    match check {
        Action::Command(_) => Some(Ok(hosts
            .iter()
            .filter_map(|h| {
                let read = |f: &str| std::fs::read(Path::new(dir).join(h.as_str()).join(f)).ok();
                let (cert, key) = (read("fullchain.pem")?, read("privkey.pem")?);
                if cert.is_empty() || key.is_empty() {
                    return None;
                }
                Some((h.clone(), sha256_hex(&[cert, key].concat())))
            })
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
                Ok(parse_fingerprints(&done.output, hosts))
            };
            Some(run.await)
        }
        Action::Signal(_) | Action::Restart(_) => None,
    }
}

/// The `HOST FINGERPRINT` lines of the probe script, for the hosts asked about only.
fn parse_fingerprints(output: &str, hosts: &[String]) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .filter(|(h, _)| hosts.iter().any(|x| x == h))
        .map(|(h, f)| (h.to_owned(), f.trim().to_owned()))
        .collect()
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
    fn fingerprints_are_read_for_the_hosts_asked_about_only() {
        let hosts = ["a.com".to_owned(), "b.com".to_owned()];
        let out = "a.com 123 456\nnoise\nc.com 1 2\nb.com 9 9\r\n";
        let got = parse_fingerprints(out, &hosts);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [
                ("a.com".to_owned(), "123 456".to_owned()),
                ("b.com".to_owned(), "9 9".to_owned())
            ]
        );
    }
}
