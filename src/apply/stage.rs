//! One target's file on one node: stage a candidate beside it, check it, commit it or
//! restore the last good content.
//!
//! A candidate is staged beside the live file (`.NAME.drover-candidate`) and checked
//! there, so the live file holds the last good content from start to end of a check: a
//! drover killed mid-check leaves it as it was. A check can look at a staged candidate
//! when it is `nginx -t` (run against a staged copy of nginx's main config that includes
//! the candidate in place of the live file, see [`NGINX_STAGED_CHECK`]) or names the
//! candidate with [`FILE_PLACEHOLDER`]. Any other check (a command that reads the live
//! path, a signal) sees the candidate at the live path; for those the record of the last
//! good content (see [`Applier`]) makes a restart check again what a crash left unchecked.

use std::path::{Path, PathBuf};

use crate::config::{Action, Target};
use crate::docker::Engine;
use crate::hash::sha256_hex;
use crate::state::Snapshot;

use super::Error;
use super::steps::run_action;

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
        // Never through a symlink: whoever can write to a shared conf.d could point the
        // record at a file drover can read (the cluster key) and have it copied into place.
        let on_disk = crate::fsutil::read_own(&output).ok();
        let good = match crate::fsutil::read_own(&record) {
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
                let content =
                    crate::fsutil::read_own(&self.candidate).map_err(|source| Error::Write {
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
pub(super) fn nginx_test(argv: &[String]) -> Option<(String, Vec<String>)> {
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
pub(super) fn hidden_beside(output: &Path, what: &str) -> PathBuf {
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
