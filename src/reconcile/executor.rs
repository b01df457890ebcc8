//! Carries out a [`Write`] plan: stage → check → commit or discard → notify, and says
//! what happened as an [`Outcome`].
//!
//! Invariants: content whose check fails (or cannot run) never becomes the live file
//! (checks that can look at a staged candidate never see it there at all, see `apply`),
//! and nothing is notified for it; a notify step that fails does not undo a file that passed
//! its check. The file work is `apply`'s, the steps run through `apply::run_action`.

use crate::apply::{self, Applier};
use crate::docker::Engine;
use crate::state::Snapshot;

use super::plan::{Reach, Step, Write};

#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
    }
}

/// Carries out `write` for `content` (the bytes the plan hashed).
pub async fn execute(
    applier: &mut Applier,
    write: &Write,
    content: &[u8],
    engine: Option<&Engine>,
    snapshot: &Snapshot,
) -> Result<Outcome, apply::Error> {
    applier.stage(content)?;
    if let Some(check) = &write.check {
        let checked = match &check.reach {
            Reach::Nobody(on) => Err(apply::Error::NoContainer(on.clone())),
            _ => applier.check(&check.action, engine, snapshot).await,
        };
        if let Err(e) = checked {
            applier.restore()?;
            return Ok(match e {
                apply::Error::Failed { .. } => Outcome::CheckFailed(e.to_string()),
                other => Outcome::CheckUnavailable(other.to_string()),
            });
        }
    }
    applier.commit(content)?;
    let mut failures = Vec::new();
    for step in &write.notify {
        if let Err(e) = run(step, engine, snapshot).await {
            failures.push(e.to_string());
        }
    }
    if failures.is_empty() {
        Ok(Outcome::Applied)
    } else {
        Ok(Outcome::NotifyFailed(failures.join("; ")))
    }
}

async fn run(
    step: &Step,
    engine: Option<&Engine>,
    snapshot: &Snapshot,
) -> Result<(), apply::Error> {
    match &step.reach {
        Reach::Nobody(on) => Err(apply::Error::NoContainer(on.clone())),
        _ => apply::run_action(&step.action, engine, snapshot).await,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tokio::time::Instant;

    use super::*;
    use crate::config::{Action, Target};
    use crate::reconcile::plan::{Plan, TargetMemory, plan};

    fn target(dir: &Path, check: Option<Action>) -> Target {
        Target {
            check,
            ..Target::new("t", "builtin:nginx", dir.join("out.conf"))
        }
    }

    /// Plans and executes like the loop does, remembering failed content.
    struct Harness {
        target: Target,
        applier: Applier,
        memory: TargetMemory,
    }

    impl Harness {
        fn new(target: Target) -> Harness {
            let applier = Applier::new(&target);
            Harness {
                target,
                applier,
                memory: TargetMemory::default(),
            }
        }

        async fn apply(&mut self, content: &[u8]) -> Outcome {
            self.memory.current = self.applier.current_hash().map(str::to_owned);
            let snapshot = Snapshot::default();
            match plan(
                &self.target,
                &snapshot,
                content,
                &self.memory,
                Instant::now(),
            ) {
                Plan::Unchanged => Outcome::Unchanged,
                Plan::KnownBad => Outcome::KnownBad,
                Plan::Wait(_) => Outcome::Waiting,
                Plan::CheckUnavailable(on) => Outcome::CheckUnavailable(on.to_string()),
                Plan::Write(w) => {
                    let o = execute(&mut self.applier, &w, content, None, &snapshot)
                        .await
                        .expect("execute");
                    if matches!(o, Outcome::CheckFailed(_)) {
                        self.memory.known_bad = Some(w.hash);
                    }
                    o
                }
            }
        }
    }

    #[tokio::test]
    async fn unchanged_content_is_not_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::new(target(dir.path(), None));
        assert_eq!(h.apply(b"one").await, Outcome::Applied);
        assert_eq!(h.apply(b"one").await, Outcome::Unchanged);
        assert_eq!(
            std::fs::read(dir.path().join("out.conf")).expect("read"),
            b"one"
        );
    }

    #[tokio::test]
    async fn failed_check_restores_the_last_good_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        // The check passes only while the file says "good".
        let check = Action::Command(vec![
            "grep".into(),
            "-q".into(),
            "good".into(),
            out.display().to_string(),
        ]);
        let mut h = Harness::new(target(dir.path(), Some(check)));
        assert_eq!(h.apply(b"good 1").await, Outcome::Applied);
        let outcome = h.apply(b"bad").await;
        assert!(matches!(outcome, Outcome::CheckFailed(_)), "{outcome:?}");
        assert_eq!(std::fs::read(&out).expect("read"), b"good 1");
        assert_eq!(h.apply(b"bad").await, Outcome::KnownBad);
        assert_eq!(h.apply(b"good 2").await, Outcome::Applied);
    }

    #[tokio::test]
    async fn failed_first_check_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::new(target(
            dir.path(),
            Some(Action::Command(vec!["false".into()])),
        ));
        let outcome = h.apply(b"x").await;
        assert!(matches!(outcome, Outcome::CheckFailed(_)), "{outcome:?}");
        assert!(!dir.path().join("out.conf").exists());
    }

    #[tokio::test]
    async fn a_restart_starts_from_the_checked_file_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = target(dir.path(), Some(Action::Command(vec!["true".into()])));
        assert_eq!(
            Harness::new(t.clone()).apply(b"same").await,
            Outcome::Applied
        );
        let mut fails = t;
        fails.check = Some(Action::Command(vec!["false".into()]));
        assert_eq!(Harness::new(fails).apply(b"same").await, Outcome::Unchanged);
    }

    #[tokio::test]
    async fn a_restart_checks_a_file_left_unchecked_by_a_crash_and_restores_the_last_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        let t = target(dir.path(), Some(Action::Command(vec!["true".into()])));
        assert_eq!(
            Harness::new(t.clone()).apply(b"good").await,
            Outcome::Applied
        );
        // A crash between staging a candidate and its check leaves the candidate live.
        std::fs::write(&out, b"unchecked").expect("write");
        let mut fails = t;
        fails.check = Some(Action::Command(vec!["false".into()]));
        let outcome = Harness::new(fails).apply(b"unchecked").await;
        assert!(matches!(outcome, Outcome::CheckFailed(_)), "{outcome:?}");
        assert_eq!(std::fs::read(&out).expect("read"), b"good");
    }

    #[tokio::test]
    async fn a_file_from_before_records_existed_counts_as_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("out.conf"), b"old").expect("write");
        let t = target(dir.path(), Some(Action::Command(vec!["false".into()])));
        assert_eq!(Harness::new(t).apply(b"old").await, Outcome::Unchanged);
    }

    #[tokio::test]
    async fn a_failed_notify_keeps_the_checked_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = target(dir.path(), Some(Action::Command(vec!["true".into()])));
        t.notify = vec![Action::Command(vec!["false".into()])];
        let mut h = Harness::new(t);
        let outcome = h.apply(b"kept").await;
        assert!(matches!(outcome, Outcome::NotifyFailed(_)), "{outcome:?}");
        assert_eq!(
            std::fs::read(dir.path().join("out.conf")).expect("read"),
            b"kept"
        );
        assert_eq!(h.apply(b"kept").await, Outcome::Unchanged);
    }
}
