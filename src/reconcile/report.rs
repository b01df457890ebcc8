//! What one reconcile tells operators: log lines, metrics and the status board.
//!
//! Constant messages with data in fields; a check that stays unavailable is logged once
//! per reason, not once per retry.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use crate::debounce::Batch;
use crate::status::{Board, CheckResult, LeftOutHost, SkippedService};

use super::{TargetState, unix_now};
use crate::apply::Outcome;

pub(super) fn count(target: &str, outcome: &str) {
    crate::metrics::get()
        .renders
        .with_label_values(&[target, outcome])
        .inc();
}

pub(super) fn outcome(
    t: &mut TargetState,
    board: &Board,
    o: &Outcome,
    hash: Option<String>,
    batch: Option<Batch>,
    skipped: Vec<SkippedService>,
) {
    let m = crate::metrics::get();
    let name = t.config.name.clone();
    let name = name.as_str();
    let has_check = t.config.check.is_some();
    let has_notify = !t.config.notify.is_empty();
    let mut error = None;
    let mut check = None;
    if !matches!(o, Outcome::Waiting | Outcome::Rerender) {
        count(name, o.label());
    }
    match o {
        Outcome::Unchanged | Outcome::KnownBad | Outcome::Waiting | Outcome::Rerender => {}
        Outcome::Applied | Outcome::NotifyFailed(_) => {
            t.unavailable_reason = None;
            if has_check {
                check = Some(CheckResult::Passed);
            }
            let hash = hash.as_deref().unwrap_or_default();
            m.last_apply
                .with_label_values(&[name])
                .set(unix_now() as i64);
            m.content_hash
                .with_label_values(&[name])
                .set(i64::from_str_radix(hash.get(..12).unwrap_or("0"), 16).unwrap_or(0));
            if let Some(b) = batch {
                m.event_apply_lag.observe(b.first.elapsed().as_secs_f64());
            }
            if has_notify {
                let ok = matches!(o, Outcome::Applied);
                m.reloads
                    .with_label_values(&[name, if ok { "ok" } else { "failed" }])
                    .inc();
            }
            if let Outcome::NotifyFailed(why) = o {
                warn!(reason = %why, "config applied but a notify step failed");
                error = Some(format!("notify failed: {why}"));
            } else {
                info!(hash = %hash.get(..12).unwrap_or(""), "config applied");
            }
        }
        Outcome::CheckFailed(output) => {
            warn!(output = %output, "check failed; previous config restored, not notified");
            check = Some(CheckResult::Failed(output.clone()));
        }
        Outcome::CheckUnavailable(why) => {
            if t.unavailable_reason.as_deref() != Some(why.as_str()) {
                warn!(reason = %why, "check could not run; the file stays as it was");
                t.unavailable_reason = Some(why.clone());
            }
            check = Some(CheckResult::Unavailable(why.clone()));
        }
    }
    if let Some(c) = &check {
        m.checks.with_label_values(&[name, c.word()]).inc();
    }
    let applied = matches!(o, Outcome::Applied | Outcome::NotifyFailed(_));
    board.update_target(name, |s| {
        s.last_render = Some(unix_now());
        if applied {
            s.last_apply = Some(unix_now());
        }
        if hash.is_some() {
            s.hash = hash;
        }
        if let Some(c) = check {
            s.check = c;
        }
        s.error = error;
        s.skipped = skipped;
    });
}

/// The hosts left out of the file now in place (host → the checker's words): one log line
/// per host when it starts or stops being left out, the gauge, the status page.
pub(super) fn left_out(t: &mut TargetState, board: &Board, now: BTreeMap<String, String>) {
    if now == t.left_out {
        return;
    }
    let name = t.config.name.as_str();
    for (host, reason) in &now {
        if !t.left_out.contains_key(host) {
            warn!(host = %host, reason = %reason,
                "host left out: its server blocks fail the check; the other hosts are applied");
        }
    }
    for host in t.left_out.keys().filter(|h| !now.contains_key(*h)) {
        info!(host = %host, "host back in the file");
    }
    crate::metrics::get()
        .hosts_left_out
        .with_label_values(&[name])
        .set(now.len() as i64);
    let shown = now
        .iter()
        .map(|(host, reason)| LeftOutHost {
            host: host.clone(),
            reason: reason.clone(),
        })
        .collect();
    board.update_target(name, |s| s.left_out = shown);
    t.left_out = now;
}

/// The TLS hosts served on port 80 for want of certificate files: logged when the set
/// changes, the gauge, the status page.
pub(super) fn without_certificate(t: &mut TargetState, board: &Board, now: BTreeSet<String>) {
    let target = t.config.name.as_str();
    if t.without_certificate.as_ref() == Some(&now) {
        return;
    }
    let before = t.without_certificate.take().unwrap_or_default();
    for host in now.difference(&before) {
        warn!(host = %host, "no certificate files yet: host served on port 80 until they appear");
    }
    for host in before.difference(&now) {
        info!(host = %host, "certificate files found: host served with TLS");
    }
    crate::metrics::get()
        .hosts_without_certificate
        .with_label_values(&[target])
        .set(now.len() as i64);
    let shown: Vec<String> = now.iter().cloned().collect();
    board.update_target(target, |s| s.without_certificate = shown);
    t.without_certificate = Some(now);
}
