//! Carries a rendered config into place on one node: the one executor. The single-node
//! render loop and every agent call the same [`Local::apply`], so staging, the check,
//! leaving out hosts that fail it, the certificate probe, commit or restore and the
//! notify steps behave the same on every node.
//!
//! Invariants: unchanged content is never written and never notified; a file that failed
//! its check never replaces the live file, and nothing is notified for it; content whose
//! check failed is not checked again until it changes; a notify step that fails does not
//! undo a file that passed its check; one host whose server blocks fail the check is left
//! out and the others are applied ([`isolate`]); a TLS host is rendered with its
//! certificate only when this node's proxy has the files (else [`Outcome::Rerender`] asks
//! for the content this node can load). Writes are atomic (temp file in the same
//! directory, fsync, rename) except on a single-file bind mount, where rename fails and
//! the content is rewritten in place. This module and `update` are the only code that
//! changes anything outside the process.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::{Action, Selector, Target};
use crate::docker::{self, Engine};
use crate::hash::sha256_hex;
use crate::state::Snapshot;

pub mod isolate;
pub mod plan;
mod stage;
mod steps;

pub use plan::{Plan, Reach, TargetMemory, Unavailable};
pub use stage::{
    Applier, CANDIDATE_UNSEEN, FILE_PLACEHOLDER, NGINX_STAGED_CHECK, checks_candidate, staged_argv,
    write_file,
};
pub use steps::{existing_certificates, run_action};

/// Where the built-in nginx template and the certificate probe expect a host's
/// `fullchain.pem` and `privkey.pem` (`DIR/HOST/`), as certbot writes them.
pub const CERT_DIR: &str = "/etc/letsencrypt/live";

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

/// What one apply did on one node. Crosses the agent API as it is (a typed enum).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "message", rename_all = "snake_case")]
pub enum Outcome {
    /// Same bytes as the file in place: nothing written, nothing notified.
    Unchanged,
    /// Written, checked and every notify step succeeded.
    Applied,
    /// Written and checked, but a notify step failed (the file stays: it passed its check).
    NotifyFailed(String),
    /// The check rejected the file; the previous content is back in place.
    CheckFailed(String),
    /// The check could not run (e.g. the proxy container is not up); previous content restored.
    CheckUnavailable(String),
    /// This exact content already failed its check; not tried again until it changes.
    KnownBad,
    /// A check that could not run waits for its backoff.
    Waiting,
    /// The certificate files on this node differ from those the content was rendered for:
    /// nothing written; render again for [`Report::certificates`].
    Rerender,
}

impl Outcome {
    /// The metric label of this outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Applied => "applied",
            Outcome::NotifyFailed(_) => "notify_failed",
            Outcome::CheckFailed(_) => "check_failed",
            Outcome::CheckUnavailable(_) => "check_unavailable",
            Outcome::KnownBad => "known_bad",
            Outcome::Waiting => "waiting",
            Outcome::Rerender => "rerender",
        }
    }

    /// The checker's or step's words, when there are any.
    pub fn message(&self) -> Option<&str> {
        match self {
            Outcome::NotifyFailed(m) | Outcome::CheckFailed(m) | Outcome::CheckUnavailable(m) => {
                Some(m)
            }
            _ => None,
        }
    }

    /// The file in place holds this content (with its hosts left out): nothing to retry.
    pub fn settled(&self) -> bool {
        matches!(
            self,
            Outcome::Applied | Outcome::NotifyFailed(_) | Outcome::Unchanged
        )
    }

    /// Not brought up to date for want of something that may come (a container, a
    /// render for this node's certificates): worth trying again soon.
    pub fn owed(&self) -> bool {
        matches!(
            self,
            Outcome::CheckUnavailable(_) | Outcome::Waiting | Outcome::Rerender
        )
    }
}

/// A host left out of the file in place, and the checker's words that made it so.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftOutHost {
    pub host: String,
    pub reason: String,
}

/// What a node says after an apply: the outcome and the state of its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Hash of the checked file in place after the apply (none: no file, or unverified).
    pub hash: Option<String>,
    /// Hosts left out of the file in place.
    #[serde(default)]
    pub left_out: Vec<LeftOutHost>,
    /// The TLS hosts of the content whose certificate files this node has; `None` when
    /// the target's check runs nowhere files can be looked up.
    #[serde(default)]
    pub certificates: Option<BTreeSet<String>>,
}

/// The content to apply and what it was rendered for.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub content: &'a [u8],
    /// The TLS hosts of the content (the built-in nginx template's).
    pub tls: &'a [String],
    /// Those of `tls` rendered with their certificate (the others on port 80).
    pub with_certificates: &'a BTreeSet<String>,
    /// Look again at what the cluster does not tell: certificate files that may have
    /// appeared, hosts left out that may pass now.
    pub resync: bool,
    /// Certificates drover obtained, written under `pair_dir` (`HOST/fullchain.pem`,
    /// `HOST/privkey.pem` 0600) before the probe, so the check and reload load them.
    pub pairs: &'a [std::sync::Arc<crate::tls::Pair>],
    /// Where this node writes `pairs` (`certificates.dir`); `None`: not written.
    pub pair_dir: Option<&'a std::path::Path>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LeftOut {
    /// Hash of the host's block that failed: left out again without a check while the
    /// block stays the same.
    hash: String,
    reason: String,
}

#[derive(Debug, Default)]
struct Certs {
    /// Hosts whose certificate files were there when last looked at, with the
    /// fingerprint of their content then.
    present: BTreeMap<String, String>,
    /// Hosts looked at since they became TLS hosts.
    probed: BTreeSet<String>,
    /// Hosts whose files changed on disk since nginx last loaded them (renewed in place,
    /// by drover or any other tool): the next apply checks and reloads even for unchanged
    /// content.
    changed: BTreeSet<String>,
}

/// One target as one node keeps it: its file, and what earlier applies taught.
pub struct Local {
    config: Target,
    applier: Applier,
    /// Hash of the last content whose check failed.
    known_bad: Option<String>,
    /// The last check that could not run, and when to try it again.
    unavailable: Option<Unavailable>,
    check_backoff: Backoff,
    left_out: BTreeMap<String, LeftOut>,
    /// `None` when drover cannot look up this target's certificate files.
    certs: Option<Certs>,
}

impl Local {
    pub fn new(target: &Target) -> Local {
        Local {
            config: target.clone(),
            applier: Applier::new(target),
            known_bad: None,
            unavailable: None,
            check_backoff: Backoff::new(),
            left_out: BTreeMap::new(),
            certs: probes_certificates(target).then(Certs::default),
        }
    }

    pub fn config(&self) -> &Target {
        &self.config
    }

    /// Hash of the checked file in place.
    pub fn current_hash(&self) -> Option<&str> {
        self.applier.current_hash()
    }

    /// Whether this node looks up the target's certificate files.
    pub fn probes_certificates(&self) -> bool {
        self.certs.is_some()
    }

    /// The TLS hosts whose certificate files were here when last looked at.
    pub fn certificates(&self) -> BTreeSet<String> {
        self.certs
            .as_ref()
            .map(|c| c.present.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether a resync has something to look at again: hosts left out, or TLS hosts
    /// (their certificate files may appear, or change on disk).
    pub fn looks_outside(&self) -> bool {
        !self.left_out.is_empty() || self.certs.as_ref().is_some_and(|c| !c.probed.is_empty())
    }

    /// When a check that could not run is due again.
    pub fn retry_at(&self) -> Option<Instant> {
        self.unavailable.as_ref().map(|u| u.retry_at)
    }

    /// Plans and carries out `candidate` on this node at `now`.
    pub async fn apply(
        &mut self,
        candidate: Candidate<'_>,
        engine: Option<&Engine>,
        snapshot: &Snapshot,
        now: Instant,
    ) -> Result<Report, Error> {
        let wrote = match candidate.pair_dir {
            Some(dir) => write_pairs(dir, candidate.pairs)?,
            None => false,
        };
        // New files are looked at at once: the probe sees their fingerprint change, and
        // the same content is checked and reloaded for them.
        let certificates = self
            .probe(candidate.tls, candidate.resync || wrote, engine, snapshot)
            .await;
        if let Some(present) = &certificates {
            let rendered_for: BTreeSet<String> = candidate
                .tls
                .iter()
                .filter(|h| candidate.with_certificates.contains(*h))
                .cloned()
                .collect();
            if *present != rendered_for {
                return Ok(self.report(Outcome::Rerender, certificates));
            }
        }
        // Certificate files changed in place: nginx serves the old ones until it loads the
        // file again, so the same content is checked (the new pair must load) and notified.
        let renewed: BTreeSet<String> = self
            .certs
            .as_mut()
            .map(|c| std::mem::take(&mut c.changed))
            .unwrap_or_default();
        let full = std::str::from_utf8(candidate.content).ok();
        let blocks = full.map(isolate::blocks).unwrap_or_default();
        // Hosts that failed before with the same block stay out without another check; a
        // resync tries them all again (a certificate fixed in place changes no block).
        let mut left: BTreeMap<String, LeftOut> = if candidate.resync {
            BTreeMap::new()
        } else {
            blocks
                .iter()
                .filter_map(|b| {
                    let l = self.left_out.get(&b.host).filter(|l| l.hash == b.hash)?;
                    Some((b.host.clone(), l.clone()))
                })
                .collect()
        };
        let content: Cow<[u8]> = match full {
            Some(text) if !left.is_empty() => {
                Cow::Owned(isolate::without(text, &left.keys().cloned().collect()).into_bytes())
            }
            _ => Cow::Borrowed(candidate.content),
        };
        let memory = TargetMemory {
            current: self
                .applier
                .current_hash()
                .filter(|_| renewed.is_empty())
                .map(str::to_owned),
            // Content that failed with the old files may pass with the new ones.
            known_bad: self.known_bad.clone().filter(|_| renewed.is_empty()),
            unavailable: self.unavailable.clone(),
        };
        let planned = plan::plan(&self.config, snapshot, &content, &memory, now);
        let mut outcome = match &planned {
            Plan::Unchanged => Outcome::Unchanged,
            Plan::KnownBad => Outcome::KnownBad,
            Plan::Wait(_) => Outcome::Waiting,
            Plan::CheckUnavailable(on) => {
                Outcome::CheckUnavailable(format!("no running container matches {on}"))
            }
            Plan::Write(w) => self.execute(w, &content, engine, snapshot).await?,
        };
        if let (Plan::Write(w), Outcome::CheckFailed(output), Some(full)) =
            (&planned, &outcome, full)
        {
            let output = output.clone();
            let checked = String::from_utf8_lossy(&content).into_owned();
            outcome = self
                .leave_out_failing(
                    w,
                    full,
                    &checked,
                    output,
                    &blocks,
                    &mut left,
                    !renewed.is_empty(),
                    engine,
                    snapshot,
                )
                .await?;
        }
        // The hosts left out stay as they were while the file in place did not change.
        if outcome.settled() {
            self.left_out = left;
        }
        if !renewed.is_empty() {
            if matches!(outcome, Outcome::Applied | Outcome::NotifyFailed(_)) {
                tracing::info!(target = %self.config.name, hosts = ?renewed, outcome = outcome.label(),
                    "certificate files changed on disk: checked and reloaded");
            } else if let Some(c) = self.certs.as_mut() {
                // Not loaded yet (the check could not run, or failed): tried again.
                c.changed.extend(renewed);
            }
        }
        self.remember(&planned, &outcome, now);
        Ok(self.report(outcome, certificates))
    }

    fn report(&self, outcome: Outcome, certificates: Option<BTreeSet<String>>) -> Report {
        Report {
            outcome,
            hash: self.applier.current_hash().map(str::to_owned),
            left_out: self
                .left_out
                .iter()
                .map(|(host, l)| LeftOutHost {
                    host: host.clone(),
                    reason: l.reason.clone(),
                })
                .collect(),
            certificates,
        }
    }

    /// What a plan and its outcome teach for next time.
    fn remember(&mut self, planned: &Plan, outcome: &Outcome, now: Instant) {
        match (planned, outcome) {
            (Plan::Write(w), Outcome::CheckFailed(_)) => self.known_bad = Some(w.hash.clone()),
            (_, Outcome::Applied | Outcome::NotifyFailed(_)) => {
                self.known_bad = None;
                self.unavailable = None;
                self.check_backoff.reset();
            }
            (Plan::Write(w), Outcome::CheckUnavailable(_)) => {
                if let Some(check) = &w.check {
                    self.unavailable = Some(Unavailable {
                        reach: check.reach.clone(),
                        retry_at: now + self.check_backoff.delay(),
                    });
                }
            }
            (Plan::CheckUnavailable(on), _) => {
                self.unavailable = Some(Unavailable {
                    reach: Reach::Nobody(on.clone()),
                    retry_at: now + self.check_backoff.delay(),
                });
            }
            _ => {}
        }
    }

    /// Stage → check → commit or restore → notify, for `content` (the bytes `write` hashed).
    async fn execute(
        &mut self,
        write: &plan::Write,
        content: &[u8],
        engine: Option<&Engine>,
        snapshot: &Snapshot,
    ) -> Result<Outcome, Error> {
        self.applier.stage(content)?;
        if let Some(check) = &write.check {
            let checked = match &check.reach {
                Reach::Nobody(on) => Err(Error::NoContainer(on.clone())),
                _ => self.applier.check(&check.action, engine, snapshot).await,
            };
            if let Err(e) = checked {
                self.applier.restore()?;
                return Ok(match e {
                    Error::Failed { .. } => Outcome::CheckFailed(e.to_string()),
                    other => Outcome::CheckUnavailable(other.to_string()),
                });
            }
        }
        self.applier.commit(content)?;
        let mut failures = Vec::new();
        for step in &write.notify {
            let done = match &step.reach {
                Reach::Nobody(on) => Err(Error::NoContainer(on.clone())),
                _ => run_action(&step.action, engine, snapshot).await,
            };
            if let Err(e) = done {
                failures.push(e.to_string());
            }
        }
        Ok(if failures.is_empty() {
            Outcome::Applied
        } else {
            Outcome::NotifyFailed(failures.join("; "))
        })
    }

    /// The check of `checked` failed with `output`: leaves out the hosts nginx blames (see
    /// [`isolate`]) and checks again, at most [`isolate::MAX_EXTRA_CHECKS`] times. Returns
    /// the last outcome; `left` ends as the hosts left out of the file in place. With
    /// `reload`, content equal to the file in place is checked and notified all the same
    /// (certificate files changed under it).
    #[allow(clippy::too_many_arguments)]
    async fn leave_out_failing(
        &mut self,
        write: &plan::Write,
        full: &str,
        checked: &str,
        mut output: String,
        full_blocks: &[isolate::Block],
        left: &mut BTreeMap<String, LeftOut>,
        reload: bool,
        engine: Option<&Engine>,
        snapshot: &Snapshot,
    ) -> Result<Outcome, Error> {
        let failed = Outcome::CheckFailed(output.clone());
        if full_blocks.is_empty() {
            return Ok(failed);
        }
        let good = self
            .applier
            .good()
            .map(|g| isolate::blocks(&String::from_utf8_lossy(g)))
            .unwrap_or_default();
        let names = self.applier.file_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let hash_of = |host: &str| {
            full_blocks
                .iter()
                .find(|b| b.host == host)
                .map(|b| b.hash.clone())
                .unwrap_or_default()
        };
        let mut checked_blocks = isolate::blocks(checked);
        for _ in 0..isolate::MAX_EXTRA_CHECKS {
            let Some(more) = isolate::next(&checked_blocks, &good, &output, &names) else {
                break;
            };
            for (host, reason) in more {
                let hash = hash_of(&host);
                left.insert(host, LeftOut { hash, reason });
            }
            let text = isolate::without(full, &left.keys().cloned().collect());
            let hash = sha256_hex(text.as_bytes());
            if !reload && self.applier.current_hash() == Some(hash.as_str()) {
                return Ok(Outcome::Unchanged);
            }
            let attempt = plan::Write {
                hash,
                ..write.clone()
            };
            match self
                .execute(&attempt, text.as_bytes(), engine, snapshot)
                .await?
            {
                Outcome::CheckFailed(o) => {
                    output = o;
                    checked_blocks = isolate::blocks(&text);
                }
                other => return Ok(other),
            }
        }
        Ok(failed)
    }

    /// Looks up the certificate files of TLS hosts not looked at yet (on a resync: of
    /// every TLS host without them) where the check runs. Returns those of `tls` present
    /// here, or `None` when this target's files cannot be looked up.
    async fn probe(
        &mut self,
        tls: &[String],
        resync: bool,
        engine: Option<&Engine>,
        snapshot: &Snapshot,
    ) -> Option<BTreeSet<String>> {
        let check = self.config.check.clone()?;
        let c = self.certs.as_mut()?;
        // Hosts no longer TLS are forgotten, so they are looked at again if they come back.
        let tls_set: BTreeSet<&String> = tls.iter().collect();
        c.probed.retain(|h| tls_set.contains(h));
        c.present.retain(|h, _| tls_set.contains(h));
        c.changed.retain(|h| tls_set.contains(h));
        // A resync looks at every TLS host: files may appear, or change in place.
        let ask: Vec<String> = tls
            .iter()
            .filter(|h| resync || !c.probed.contains(*h))
            .cloned()
            .collect();
        if !ask.is_empty() {
            match existing_certificates(&check, engine, snapshot, CERT_DIR, &ask).await {
                Some(Ok(mut found)) => {
                    for h in ask {
                        match found.remove(&h) {
                            Some(print) => {
                                let before = c.present.insert(h.clone(), print.clone());
                                if before.is_some_and(|b| b != print) {
                                    c.changed.insert(h.clone());
                                }
                            }
                            None => {
                                c.present.remove(&h);
                                c.changed.remove(&h);
                            }
                        }
                        c.probed.insert(h);
                    }
                }
                // Asked again next time; until then the hosts are served as before.
                Some(Err(e)) => tracing::debug!(error = %e, "cannot look up certificate files"),
                None => {}
            }
        }
        Some(c.present.keys().cloned().collect())
    }
}

/// Writes each pair whose files differ from it under `dir/HOST/`; whether any was written.
fn write_pairs(
    dir: &std::path::Path,
    pairs: &[std::sync::Arc<crate::tls::Pair>],
) -> Result<bool, Error> {
    let mut wrote = false;
    for pair in pairs {
        // The host is a validated routing-host (no `/`, no `..`): one directory level.
        if pair.host.is_empty() || pair.host.contains('/') || pair.host.starts_with('.') {
            continue;
        }
        let host_dir = dir.join(&pair.host);
        let err = |source| Error::Write {
            path: host_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&host_dir).map_err(err)?;
        let files = [
            ("fullchain.pem", pair.chain_pem.as_bytes(), false),
            ("privkey.pem", pair.key_pem().as_bytes(), true),
        ];
        for (name, content, private) in files {
            let path = host_dir.join(name);
            if crate::fsutil::read_own(&path).is_ok_and(|old| old == content) {
                continue;
            }
            let written = if private {
                crate::fsutil::write_private(&path, content)
            } else {
                crate::fsutil::write_atomic(&path, content)
            };
            written.map_err(|e| match e {
                crate::fsutil::Error::Write { path, source } => Error::Write { path, source },
            })?;
            wrote = true;
        }
    }
    Ok(wrote)
}

/// Whether drover can look up `target`'s certificate files: the built-in nginx template
/// (it knows where they are) with a check that runs a command somewhere.
fn probes_certificates(target: &Target) -> bool {
    target.builtin() == Some("nginx")
        && matches!(target.check, Some(Action::Exec(_) | Action::Command(_)))
}

#[cfg(test)]
mod tests;
