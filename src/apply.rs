//! Carries a rendered config into place: diff → stage → check → commit or discard → notify.
//!
//! Invariants: unchanged content is never written and never notified; a file that failed
//! its check never replaces the live file, and nothing is notified for it; writes are
//! atomic (temp file in the same directory, fsync, rename) except on a single-file bind
//! mount, where rename fails and the content is rewritten in place. This module and
//! `update` are the only code that changes anything outside the process.
//!
//! A candidate is staged beside the live file (`.NAME.drover-candidate`) and checked
//! there, so the live file holds the last good content from start to end of a check: a
//! drover killed mid-check leaves it as it was. A check can look at a staged candidate
//! when it is `nginx -t` (run against a staged copy of nginx's main config that includes
//! the candidate in place of the live file, see [`NGINX_STAGED_CHECK`]) or names the
//! candidate with [`FILE_PLACEHOLDER`]. Any other check (a command that reads the live
//! path, a signal) sees the candidate at the live path, as before; for those the record
//! of the last good content (see [`Applier`]) makes a restart check again what a crash
//! left unchecked.

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

/// In a check's argv, the path of the candidate under check (as drover sees it; the same
/// path must reach it in the check's container).
pub const FILE_PLACEHOLDER: &str = "{file}";

/// How [`NGINX_STAGED_CHECK`] says the container cannot see the candidate.
pub const CANDIDATE_UNSEEN: i64 = 3;

/// The `sh` script an `nginx -t` check runs as, in the check's container (or locally for
/// a `command`): it finds the candidate (in the directory drover writes to, else under a
/// mount point of the container: a host directory may be mounted elsewhere in nginx's
/// container), builds a private staged tree in a fresh temp directory — every file of the
/// main config's directory and of the output's directory linked, the candidate copied in
/// under the live file's name, the main config copied with those two directories pointed
/// at the staged ones — and runs nginx's own test on the staged main config. Nothing
/// outside the temp directory is written; the live file is never touched. nginx's
/// messages name the staged file by the live file's name, so blame by line still works.
/// Arguments: live name, candidate name, main config (empty: nginx's compiled-in one),
/// drover's output directory, then nginx's argv without `-c`. Exits with
/// [`CANDIDATE_UNSEEN`] when the container cannot see the candidate (a single file
/// bind-mounted into it, rather than its directory).
pub const NGINX_STAGED_CHECK: &str = r#"live="$1"; cand="$2"; main="$3"; hint="$4"; shift 4
dir=""
for d in "$hint" $(cut -d' ' -f5 /proc/self/mountinfo 2>/dev/null); do
  if [ -n "$d" ] && [ -f "$d/$cand" ]; then dir="$d"; break; fi
done
if [ -z "$dir" ]; then
  echo "drover: the candidate $cand is not in $hint nor under a mount point of this container" >&2
  exit 3
fi
[ -n "$main" ] || main=$("$1" -V 2>&1 | sed -n 's/.*--conf-path=\([^ ]*\).*/\1/p')
[ -n "$main" ] || main=/etc/nginx/nginx.conf
top=$(dirname "$main")
stage=$(mktemp -d) || exit 2
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/top" "$stage/files" || exit 2
for f in "$top"/*; do [ -e "$f" ] && ln -s "$f" "$stage/top/"; done
for f in "$dir"/* "$dir"/.[!.]*; do [ -e "$f" ] && ln -s "$f" "$stage/files/"; done
rm -f "$stage/files/$live"
cp "$dir/$cand" "$stage/files/$live" || exit 2
if [ "$(dirname "$dir")" = "$top" ]; then
  rm -f "$stage/top/$(basename "$dir")"
  ln -s "$stage/files" "$stage/top/$(basename "$dir")"
fi
staged="$stage/top/$(basename "$main")"
rm -f "$staged"
sed -e "s#$dir/#$stage/files/#g" -e "s#$top/#$stage/top/#g" "$main" > "$staged" || exit 2
"$@" -c "$staged""#;

/// One target's output file and what it holds.
///
/// The content that last passed its check is persisted next to the output
/// (`.NAME.drover-good`), so a restart knows it: if the file on disk differs from the
/// record (drover died while a check that reads the live path ran, or someone edited the
/// file), it counts as unverified and is checked again (and the record restored if it
/// fails) instead of being taken for current.
pub struct Applier {
    output: PathBuf,
    record: PathBuf,
    candidate: PathBuf,
    /// The check reads the live path: the candidate is staged there (see the module docs).
    in_place: bool,
    /// The last content that passed its check (restored when a candidate fails).
    good: Option<Vec<u8>>,
    /// Hash of the output file's content when it equals `good`; `None` while the file
    /// holds something unverified (or nothing).
    current_hash: Option<String>,
}

impl Applier {
    pub fn new(target: &Target) -> Applier {
        let output = target.output.clone();
        let record = hidden_beside(&output, "good");
        let candidate = hidden_beside(&output, "candidate");
        // A candidate left by a crash was never checked: it goes (it is rendered again).
        let _ = std::fs::remove_file(&candidate);
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
            candidate,
            in_place: target.check.as_ref().is_some_and(|c| !checks_candidate(c)),
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
        [&self.output, &self.candidate]
            .into_iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    /// Puts `content` where its check reads it: beside the live file, or for a check that
    /// reads the live path, there.
    pub fn stage(&mut self, content: &[u8]) -> Result<(), Error> {
        if self.in_place {
            // From here until commit or restore the file is unverified.
            self.current_hash = None;
            write_file(&self.output, content)
        } else {
            write_file(&self.candidate, content)
        }
    }

    /// Runs `check` on the staged candidate (see [`Applier::stage`]). When the check's
    /// container cannot see the candidate (only the live file is mounted into it), the
    /// candidate moves to the live path and this target is checked in place from then on,
    /// as before staged checks existed.
    pub async fn check(
        &mut self,
        check: &Action,
        engine: Option<&Engine>,
        snapshot: &Snapshot,
    ) -> Result<(), Error> {
        if self.in_place {
            return run_action(check, engine, snapshot).await;
        }
        let argv = |argv: &[String]| staged_argv(argv, &self.output, &self.candidate);
        let staged = match check {
            Action::Exec(e) => Action::Exec(crate::config::ExecSpec {
                command: argv(&e.command),
                ..e.clone()
            }),
            Action::Command(c) => Action::Command(argv(c)),
            other => other.clone(),
        };
        match run_action(&staged, engine, snapshot).await {
            Err(Error::Failed { code, output })
                if code == CANDIDATE_UNSEEN && output.contains("drover: the candidate") =>
            {
                tracing::warn!(path = %self.output.display(), reason = %output,
                    "the check cannot see the staged candidate; it is checked at the live path from now on");
                let content = std::fs::read(&self.candidate).map_err(|source| Error::Write {
                    path: self.candidate.clone(),
                    source,
                })?;
                self.in_place = true;
                self.stage(&content)?;
                let _ = std::fs::remove_file(&self.candidate);
                run_action(check, engine, snapshot).await
            }
            other => other,
        }
    }

    /// The staged content passed its check: it goes live and is the new last good content.
    pub fn commit(&mut self, content: &[u8]) -> Result<(), Error> {
        if !self.in_place {
            // Written again rather than renamed: on a single-file bind mount only the
            // write in place reaches the file (see fsutil).
            write_file(&self.output, content)?;
            let _ = std::fs::remove_file(&self.candidate);
        }
        // Recorded after the file: a crash in between leaves a file that differs from
        // the record, which the next start checks again.
        if let Err(e) = write_file(&self.record, content) {
            // The file is right; only a restart would check it once more.
            tracing::warn!(error = %e, "cannot record the last good content");
        }
        self.current_hash = Some(sha256_hex(content));
        self.good = Some(content.to_vec());
        Ok(())
    }

    /// The staged content failed: it goes. A candidate staged beside the live file never
    /// reached it; one staged in place is replaced by the last good content (or the file
    /// goes, if there was none). A live file that was not verified either (a crash left
    /// it unchecked) is replaced by the last good content too.
    pub fn restore(&mut self) -> Result<(), Error> {
        if !self.in_place {
            match std::fs::remove_file(&self.candidate) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Write {
                        path: self.candidate.clone(),
                        source,
                    });
                }
            }
            if self.current_hash.is_some() {
                return Ok(());
            }
        }
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

/// Whether `check` can look at a candidate staged beside the live file.
pub fn checks_candidate(check: &Action) -> bool {
    let argv = match check {
        Action::Exec(e) => &e.command,
        Action::Command(c) => c,
        Action::Signal(_) | Action::Restart(_) => return false,
    };
    argv.iter().any(|a| a.contains(FILE_PLACEHOLDER)) || nginx_test(argv).is_some()
}

/// `argv` made to check `candidate` instead of `output`: [`FILE_PLACEHOLDER`] replaced by
/// the candidate's path, or an `nginx -t` wrapped in [`NGINX_STAGED_CHECK`].
pub fn staged_argv(argv: &[String], output: &Path, candidate: &Path) -> Vec<String> {
    if argv.iter().any(|a| a.contains(FILE_PLACEHOLDER)) {
        let path = candidate.display().to_string();
        return argv
            .iter()
            .map(|a| a.replace(FILE_PLACEHOLDER, &path))
            .collect();
    }
    let Some((main, nginx)) = nginx_test(argv) else {
        return argv.to_vec();
    };
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let dir = output
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut out: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        NGINX_STAGED_CHECK.into(),
        "sh".into(),
        name(output),
        name(candidate),
        main,
        dir,
    ];
    out.extend(nginx);
    out
}

/// For an nginx config test (`nginx -t`, `-T`, `-tq`, ...): the main config it names with
/// `-c` (empty: nginx's own) and its argv without `-c`.
fn nginx_test(argv: &[String]) -> Option<(String, Vec<String>)> {
    let (program, args) = argv.split_first()?;
    if program != "nginx" && !program.ends_with("/nginx") {
        return None;
    }
    let mut main = String::new();
    let mut rest = vec![program.clone()];
    let mut test = false;
    let mut args = args.iter();
    while let Some(a) = args.next() {
        if let Some(path) = a.strip_prefix("-c").filter(|p| !p.is_empty()) {
            main = path.to_owned();
            continue;
        }
        match a.as_str() {
            "-c" => main = args.next()?.clone(),
            // Options that take a value: the value is no flag.
            "-g" | "-p" | "-e" | "-s" => {
                rest.push(a.clone());
                rest.push(args.next()?.clone());
            }
            f if f.starts_with('-') && !f.starts_with("--") => {
                test |= f.contains(['t', 'T']);
                rest.push(a.clone());
            }
            _ => rest.push(a.clone()),
        }
    }
    test.then_some((main, rest))
}

/// A file drover keeps beside `output` (the last good content, the candidate): hidden, and
/// with a suffix no consumer includes (nginx reads `*.conf`).
fn hidden_beside(output: &Path, what: &str) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}.drover-{what}"))
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

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn nginx_config_tests_are_recognised_with_the_main_config_they_name() {
        /// (argv, expected (main config, argv without `-c`))
        type Case<'a> = (&'a [&'a str], Option<(&'a str, &'a [&'a str])>);
        let cases: [Case; 8] = [
            (&["nginx", "-t"], Some(("", &["nginx", "-t"]))),
            (
                &["/usr/sbin/nginx", "-tq"],
                Some(("", &["/usr/sbin/nginx", "-tq"])),
            ),
            (
                &["nginx", "-t", "-c", "/etc/n.conf"],
                Some(("/etc/n.conf", &["nginx", "-t"])),
            ),
            (
                &["nginx", "-c/etc/n.conf", "-T"],
                Some(("/etc/n.conf", &["nginx", "-T"])),
            ),
            (
                &["nginx", "-g", "pid /t;", "-t"],
                Some(("", &["nginx", "-g", "pid /t;", "-t"])),
            ),
            (&["nginx", "-s", "reload"], None),
            (&["nginx", "-g", "-t"], None),
            (&["sh", "-c", "nginx -t"], None),
        ];
        for (argv, expected) in cases {
            let got = nginx_test(&strings(argv));
            let expected = expected.map(|(m, a)| (m.to_owned(), strings(a)));
            assert_eq!(got, expected, "{argv:?}");
        }
    }

    #[test]
    fn checks_that_can_read_a_candidate_beside_the_live_file_are_told_where_it_is() {
        let out = Path::new("/etc/nginx/conf.d/drover.conf");
        let cand = Path::new("/etc/nginx/conf.d/.drover.conf.drover-candidate");
        let grep = strings(&["grep", "-q", "x", "{file}"]);
        assert!(checks_candidate(&Action::Command(grep.clone())));
        assert_eq!(
            staged_argv(&grep, out, cand),
            strings(&[
                "grep",
                "-q",
                "x",
                "/etc/nginx/conf.d/.drover.conf.drover-candidate"
            ])
        );
        let wrapped = staged_argv(&strings(&["nginx", "-t"]), out, cand);
        assert_eq!(wrapped[..2], strings(&["sh", "-c"]));
        assert_eq!(
            wrapped[3..],
            strings(&[
                "sh",
                "drover.conf",
                ".drover.conf.drover-candidate",
                "",
                "/etc/nginx/conf.d",
                "nginx",
                "-t"
            ])
        );
        let live = strings(&["test", "-s", "/etc/nginx/conf.d/drover.conf"]);
        assert!(!checks_candidate(&Action::Command(live.clone())));
        assert_eq!(staged_argv(&live, out, cand), live);
    }

    fn local_target(dir: &Path, check: Vec<String>) -> Target {
        Target {
            name: "t".into(),
            template: "builtin:nginx".into(),
            output: dir.join("out.conf"),
            network: None,
            debounce: Default::default(),
            check: Some(Action::Command(check)),
            notify: vec![],
            delivery: Default::default(),
            private_networks: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_staged_candidate_is_checked_beside_the_live_file_and_a_failed_one_never_reaches_it()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        // Passes only for content saying "good", and fails if the live file ever holds
        // the bad candidate.
        let script = format!("grep -q good \"$0\" && ! grep -q bad {}", out.display());
        let t = local_target(dir.path(), strings(&["sh", "-c", &script, "{file}"]));
        let mut a = Applier::new(&t);
        let snapshot = Snapshot::default();
        let check = t.check.clone().expect("check");
        for (content, passes) in [(&b"good 1"[..], true), (b"bad", false), (b"good 2", true)] {
            let before = std::fs::read(&out).ok();
            a.stage(content).expect("stage");
            assert_eq!(
                std::fs::read(&out).ok(),
                before,
                "the live file is untouched"
            );
            let checked = a.check(&check, None, &snapshot).await;
            assert_eq!(checked.is_ok(), passes, "{checked:?}");
            if passes {
                a.commit(content).expect("commit");
                assert_eq!(std::fs::read(&out).expect("read"), content);
            } else {
                a.restore().expect("restore");
                assert_eq!(std::fs::read(&out).ok(), before);
            }
            assert!(!dir.path().join(".out.conf.drover-candidate").exists());
        }
        assert_eq!(a.current_hash(), Some(sha256_hex(b"good 2").as_str()));
    }

    #[tokio::test]
    async fn a_crash_during_a_staged_check_leaves_the_last_good_file_live_and_nothing_current_to_skip()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        let t = local_target(dir.path(), strings(&["test", "-s", "{file}"]));
        let mut a = Applier::new(&t);
        a.stage(b"good").expect("stage");
        a.commit(b"good").expect("commit");
        a.stage(b"next").expect("stage");
        // Killed here: the candidate is staged, its check never finished.
        drop(a);
        assert_eq!(std::fs::read(&out).expect("read"), b"good");
        let restarted = Applier::new(&t);
        assert!(!dir.path().join(".out.conf.drover-candidate").exists());
        assert_eq!(restarted.current_hash(), Some(sha256_hex(b"good").as_str()));
    }

    #[tokio::test]
    async fn a_live_file_left_unchecked_is_replaced_by_the_last_good_when_the_next_candidate_fails()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        let passes = local_target(dir.path(), strings(&["test", "-s", "{file}"]));
        let mut a = Applier::new(&passes);
        a.stage(b"good").expect("stage");
        a.commit(b"good").expect("commit");
        // What a crash under a check that reads the live path leaves behind.
        std::fs::write(&out, b"unchecked").expect("write");
        let fails = local_target(dir.path(), strings(&["sh", "-c", "false", "{file}"]));
        let mut a = Applier::new(&fails);
        assert_eq!(a.current_hash(), None);
        a.stage(b"unchecked").expect("stage");
        assert!(
            a.check(
                fails.check.as_ref().expect("check"),
                None,
                &Snapshot::default()
            )
            .await
            .is_err()
        );
        a.restore().expect("restore");
        assert_eq!(std::fs::read(&out).expect("read"), b"good");
        assert_eq!(a.current_hash(), Some(sha256_hex(b"good").as_str()));
    }

    #[tokio::test]
    async fn a_check_that_cannot_see_the_candidate_falls_back_to_checking_the_live_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        // Says what the staged nginx check says when only the live file is mounted into
        // its container, and otherwise checks the live path.
        let script = format!(
            "case \"$0\" in *candidate) echo 'drover: the candidate is not here' >&2; exit 3;; esac; grep -q good {}",
            out.display()
        );
        let t = local_target(dir.path(), strings(&["sh", "-c", &script, "{file}"]));
        let check = t.check.clone().expect("check");
        let mut a = Applier::new(&t);
        a.stage(b"good 1").expect("stage");
        a.check(&check, None, &Snapshot::default())
            .await
            .expect("checked at the live path");
        a.commit(b"good 1").expect("commit");
        assert_eq!(std::fs::read(&out).expect("read"), b"good 1");
        assert!(!dir.path().join(".out.conf.drover-candidate").exists());
        a.stage(b"bad").expect("stage");
        assert!(a.check(&check, None, &Snapshot::default()).await.is_err());
        a.restore().expect("restore");
        assert_eq!(std::fs::read(&out).expect("read"), b"good 1");
    }

    /// Runs [`NGINX_STAGED_CHECK`] with a stand-in for nginx that prints every file the
    /// staged main config includes (relative includes from the main config's directory,
    /// as nginx resolves them).
    async fn staged_includes(main_text: &str, conf_d_under_main: bool, name_main: bool) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let top = root.join("etc");
        let conf_d = if conf_d_under_main {
            top.join("conf.d")
        } else {
            root.join("srv")
        };
        std::fs::create_dir_all(&conf_d).expect("mkdir");
        std::fs::create_dir_all(&top).expect("mkdir");
        let fake = root.join("nginx");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\n[ \"$1\" = -V ] && {{ echo \"configure arguments: --prefix=/x --conf-path={} --with-y\"; exit 0; }}\n\
             while [ $# -gt 0 ]; do case \"$1\" in -c) conf=\"$2\"; shift 2;; *) shift;; esac; done\n\
             cd \"$(dirname \"$conf\")\" || exit 9\n\
             for pat in $(sed -n 's/^ *include \\(.*\\);/\\1/p' \"$conf\"); do for f in $pat; do echo \"$f: $(cat \"$f\")\"; done; done\n",
             top.join("nginx.conf").display()),
        )
        .expect("write");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let main_text = main_text
            .replace("TOP", &top.display().to_string())
            .replace("CONFD", &conf_d.display().to_string());
        std::fs::write(top.join("nginx.conf"), main_text).expect("write");
        std::fs::write(top.join("mime.types"), "types").expect("write");
        std::fs::write(conf_d.join("other.conf"), "other").expect("write");
        std::fs::write(conf_d.join("drover.conf"), "live").expect("write");
        let output = conf_d.join("drover.conf");
        let candidate = conf_d.join(".drover.conf.drover-candidate");
        std::fs::write(&candidate, "candidate").expect("write");
        let main = top.join("nginx.conf").display().to_string();
        let fake = fake.display().to_string();
        let nginx = if name_main {
            strings(&[&fake, "-t", "-c", &main])
        } else {
            strings(&[&fake, "-t"])
        };
        let argv = staged_argv(&nginx, &output, &candidate);
        let out = crate::process::run(&argv, &[], std::time::Duration::from_secs(30), 10_000)
            .await
            .expect("run");
        assert!(out.success(), "{}", out.summary());
        assert_eq!(std::fs::read(&output).expect("read"), b"live");
        out.stdout
    }

    #[tokio::test]
    async fn the_staged_nginx_check_includes_the_candidate_in_place_of_the_live_file() {
        for (main, under, named) in [
            (
                "include TOP/mime.types;\ninclude CONFD/*.conf;\n",
                false,
                true,
            ),
            (
                "include TOP/mime.types;\ninclude TOP/conf.d/*.conf;\n",
                true,
                true,
            ),
            ("include mime.types;\ninclude conf.d/*.conf;\n", true, true),
            // No `-c`: the main config nginx was built with (`nginx -V`).
            ("include mime.types;\ninclude conf.d/*.conf;\n", true, false),
        ] {
            let seen = staged_includes(main, under, named).await;
            assert!(seen.contains("/drover.conf: candidate"), "{main}: {seen}");
            assert!(seen.contains("/other.conf: other"), "{main}: {seen}");
            assert!(seen.contains("mime.types: types"), "{main}: {seen}");
            assert!(!seen.contains("live"), "{main}: {seen}");
        }
    }
}
