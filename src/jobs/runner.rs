//! Carries out jobs against the engine: roll services to a new digest, force-restart a
//! service, run a local command, or run a one-off container (`container`).
//!
//! Invariants: a tag is resolved to its digest once per job, through the engine
//! (`GET /distribution/{name}/json`, the index digest of a multi-arch image), unless the
//! job names the digest (a poll read it from the registry: resolving again would be a
//! second, counted registry request, and could pin a newer digest than was checked); a service
//! already pinned to that digest is left alone (no forced restart); at most one job per
//! service runs at a time and a newer job supersedes an older one still waiting for that
//! service. Command actions get payload facts as `DROVER_*` environment variables, never
//! interpolated into argv or a shell.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tracing::info;

use super::{Facts, JobState, Outcome, RunContext, Runner, ServiceResult, Work};
use crate::config;
use crate::docker::{self, Credentials, Engine};
use crate::metrics;
use crate::update::{
    Change, End, Error, ImageRef, OPT_OUT_LABEL, normalise_registry, opted_out, roll,
};

/// Bytes of a command's stdout/stderr kept in the job message.
const OUTPUT_TAIL: usize = 1000;

/// One async lock per key (a service id, or a hook's command), where a newer job
/// supersedes an older one still waiting.
#[derive(Default)]
pub struct Slots {
    inner: Mutex<HashMap<String, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    newest: AtomicU64,
}

impl Slots {
    /// Waits for the key; `None` when a job with a higher sequence number asked for it
    /// meanwhile (the newest request wins).
    pub async fn acquire(&self, key: &str, seq: u64) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let slot = {
            let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_owned()).or_default().clone()
        };
        slot.newest.fetch_max(seq, Ordering::SeqCst);
        let guard = slot.lock.clone().lock_owned().await;
        (slot.newest.load(Ordering::SeqCst) <= seq).then_some(guard)
    }
}

/// Runs jobs against one engine.
pub struct Executor {
    engine: Engine,
    registries: Vec<(String, Credentials)>,
    timeout: Duration,
    slots: Slots,
    containers: super::container::Runs,
}

impl Executor {
    /// Reads the registry passwords once.
    pub fn new(engine: Engine, config: &config::Config) -> Result<Executor, Error> {
        let mut registries = Vec::new();
        for r in &config.registries {
            let password =
                config::read_secret(&r.password_file).map_err(|source| Error::Secret {
                    address: r.address.clone(),
                    source,
                })?;
            registries.push((
                normalise_registry(&r.address),
                Credentials {
                    username: Some(r.username.clone()),
                    password: Some(String::from_utf8_lossy(&password).into_owned()),
                    serveraddress: Some(r.address.clone()),
                    ..Credentials::default()
                },
            ));
        }
        Ok(Executor {
            engine,
            registries,
            timeout: config.jobs.update_timeout,
            slots: Slots::default(),
            containers: super::container::Runs::default(),
        })
    }

    fn credentials(&self, registry: &str) -> Option<&Credentials> {
        self.registries
            .iter()
            .find(|(a, _)| a == registry)
            .map(|(_, c)| c)
    }

    /// Rolls the services running `image` (only those named in `only`, when not empty) to
    /// `digest`, or to the digest the engine resolves the tag to when none is given.
    async fn update_services(
        &self,
        image: &str,
        digest: Option<&str>,
        only: &[String],
        seq: u64,
    ) -> Outcome {
        let target = match ImageRef::parse(image) {
            Ok(t) => t,
            Err(e) => return Outcome::failed(e.to_string()),
        };
        let services = match self.engine.list_services().await {
            Ok(s) => s,
            Err(e) => return Outcome::failed(e.to_string()),
        };
        let mut results = Vec::new();
        let mut matching = Vec::new();
        for s in services {
            let (Some(id), Some(spec)) = (s.id, s.spec) else {
                continue;
            };
            let name = spec.name.clone().unwrap_or_else(|| id.clone());
            let Some(current) = spec
                .task_template
                .as_ref()
                .and_then(|t| t.container_spec.as_ref())
                .and_then(|c| c.image.clone())
            else {
                continue;
            };
            if !ImageRef::parse(&current).is_ok_and(|r| r.same_repo_tag(&target)) {
                continue;
            }
            if !only.is_empty() && !only.contains(&name) {
                continue;
            }
            let opted_out = spec
                .labels
                .as_ref()
                .and_then(|l| l.get(OPT_OUT_LABEL))
                .is_some_and(|v| opted_out(v));
            if opted_out {
                results.push(ServiceResult {
                    service: name,
                    from_image: Some(current.clone()),
                    to_image: None,
                    outcome: JobState::Skipped,
                    message: format!("opted out by label {OPT_OUT_LABEL}"),
                });
            } else {
                matching.push((id, name));
            }
        }
        if matching.is_empty() {
            return Outcome {
                state: JobState::Skipped,
                message: Some(format!("no service to update runs {}", target.key())),
                services: results,
                exit_code: None,
                log_tail: None,
            };
        }
        let credentials = self.credentials(&target.registry);
        let digest = match digest {
            // A journalled job is read back from outside the process: a digest becomes part
            // of every service's image reference, so it is checked again.
            Some(d) if !crate::registry::valid_digest(d) => {
                return Outcome::failed(format!("invalid digest {d:?}"));
            }
            Some(d) => d.to_owned(),
            None => match self
                .engine
                .image_digest(&target.key(), credentials.cloned())
                .await
            {
                Ok(d) => d,
                Err(e) => return Outcome::failed(e.to_string()),
            },
        };
        info!(image = %target.key(), %digest, services = matching.len(), "resolved digest");
        let runs = matching
            .iter()
            .map(|(id, name)| self.update_one(id, name, Change::Pin(&digest), credentials, seq));
        results.extend(futures_util::future::join_all(runs).await);
        Outcome::combine(results)
    }

    async fn restart_service(&self, service: &str, seq: u64) -> Outcome {
        let result = self
            .update_one(service, service, Change::Force, None, seq)
            .await;
        Outcome::combine(vec![result])
    }

    /// Changes one service and follows the update to its end. `key` (id or name) is what
    /// newer jobs for the same service supersede.
    async fn update_one(
        &self,
        key: &str,
        name: &str,
        change: Change<'_>,
        credentials: Option<&Credentials>,
        seq: u64,
    ) -> ServiceResult {
        let Some(_guard) = self.slots.acquire(key, seq).await else {
            return ServiceResult {
                service: name.to_owned(),
                from_image: None,
                to_image: None,
                outcome: JobState::Skipped,
                message: "superseded by a newer job".into(),
            };
        };
        let started = Instant::now();
        let rolled = match roll(&self.engine, key, change, credentials, self.timeout).await {
            Ok(r) => r,
            Err(e) => {
                return ServiceResult {
                    service: name.to_owned(),
                    from_image: None,
                    to_image: None,
                    outcome: JobState::Failed,
                    message: match e.kind() {
                        docker::Kind::NotFound => format!("no service named {name}"),
                        _ => e.to_string(),
                    },
                };
            }
        };
        let (outcome, message) = job_state(&rolled.end);
        if rolled.end != End::Unchanged {
            let m = metrics::get();
            m.update_duration
                .with_label_values(&[outcome.as_str()])
                .observe(started.elapsed().as_secs_f64());
            if outcome == JobState::RolledBack {
                m.rollbacks.inc();
            }
            info!(service = %rolled.service, outcome = outcome.as_str(), "service update finished");
        }
        ServiceResult {
            service: rolled.service,
            from_image: rolled.from_image,
            to_image: rolled.to_image,
            outcome,
            message,
        }
    }
}

/// A rollout's end as a job reports it.
fn job_state(end: &End) -> (JobState, String) {
    match end {
        End::Unchanged => (JobState::Skipped, "already runs this digest".into()),
        End::Completed(m) => (JobState::Completed, m.clone()),
        End::Paused(m) => (JobState::Failed, format!("update paused: {m}")),
        End::RolledBack(m) => (JobState::RolledBack, m.clone()),
        End::TimedOut(limit) => (
            JobState::Failed,
            format!(
                "update did not finish within {}",
                humantime::format_duration(*limit)
            ),
        ),
        End::Removed => (
            JobState::Failed,
            "service was removed during the update".into(),
        ),
    }
}

impl Runner for Executor {
    fn run(&self, job: RunContext) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            match &job.work {
                Work::UpdateServices {
                    image,
                    digest,
                    only,
                } => count_updates(
                    self.update_services(image, digest.as_deref(), only, job.seq)
                        .await,
                ),
                Work::RestartService { service } => {
                    count_updates(self.restart_service(service, job.seq).await)
                }
                Work::Container { spec } => {
                    let credentials = ImageRef::parse(&spec.image)
                        .ok()
                        .and_then(|r| self.credentials(&r.registry).cloned());
                    self.containers
                        .run(&self.engine, &job, spec, credentials)
                        .await
                }
                Work::SyncStacks { .. } | Work::SyncStack { .. } => {
                    Outcome::failed("stacks are deployed by the stacks runner".into())
                }
                Work::Command { argv } => {
                    let Some(_guard) = self
                        .slots
                        .acquire(&command_slot(&job.hook, &job.facts), job.seq)
                        .await
                    else {
                        return Outcome {
                            state: JobState::Skipped,
                            message: Some("superseded by a newer job".into()),
                            services: Vec::new(),
                            exit_code: None,
                            log_tail: None,
                        };
                    };
                    run_command(argv, &job.facts, self.timeout).await
                }
            }
        })
    }
}

/// The slot a hook's command runs in: one per repository and ref the push names, so a
/// newer push supersedes a waiting one of the same branch, never another repository's.
fn command_slot(hook: &str, facts: &Facts) -> String {
    format!(
        "command:{hook}\n{}\n{}",
        facts.repository.as_deref().unwrap_or_default(),
        facts.r#ref.as_deref().unwrap_or_default()
    )
}

/// Counts each service's result in `drover_updates_total{service,outcome}` (service
/// names are bounded by the cluster, not by request data).
fn count_updates(outcome: Outcome) -> Outcome {
    let m = metrics::get();
    for s in &outcome.services {
        m.updates
            .with_label_values(&[s.service.as_str(), s.outcome.as_str()])
            .inc();
    }
    outcome
}

/// Runs `argv` (no shell) with the payload facts as `DROVER_*` variables and nothing of
/// drover's own environment but the process module's allow-list; the exit code decides
/// the outcome, the output tails go into the message.
pub async fn run_command(argv: &[String], facts: &Facts, timeout: Duration) -> Outcome {
    let env: Vec<(String, String)> = facts
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match crate::process::run(argv, &env, timeout, OUTPUT_TAIL).await {
        Ok(out) => Outcome {
            state: if out.success() {
                JobState::Completed
            } else {
                JobState::Failed
            },
            message: Some(out.summary()),
            services: Vec::new(),
            exit_code: out.code.map(i64::from),
            log_tail: None,
        },
        Err(e) => Outcome::failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_supersedes_a_waiting_command_of_its_own_branch_only() {
        let push = |repository: &str, r#ref: &str| Facts {
            hook: "github".into(),
            repository: Some(repository.into()),
            r#ref: Some(r#ref.into()),
            ..Facts::default()
        };
        let slot = |f: &Facts| command_slot("github", f);
        assert_eq!(
            slot(&push("lab/web", "refs/heads/main")),
            slot(&push("lab/web", "refs/heads/main"))
        );
        assert_ne!(
            slot(&push("lab/web", "refs/heads/main")),
            slot(&push("lab/monitoring", "refs/heads/main"))
        );
        assert_ne!(
            slot(&push("lab/web", "refs/heads/main")),
            slot(&push("lab/web", "refs/heads/next"))
        );
        assert_ne!(
            command_slot("a", &Facts::default()),
            command_slot("b", &Facts::default())
        );
    }

    #[tokio::test]
    async fn newer_job_supersedes_an_older_one_waiting_for_the_same_service() {
        let slots = Arc::new(Slots::default());
        let first = slots.acquire("svc", 1).await.expect("free");
        let s2 = slots.clone();
        let older = tokio::spawn(async move { s2.acquire("svc", 2).await.is_some() });
        tokio::task::yield_now().await;
        let s3 = slots.clone();
        let newer = tokio::spawn(async move { s3.acquire("svc", 3).await.is_some() });
        tokio::task::yield_now().await;
        drop(first);
        assert!(
            !older.await.expect("join"),
            "older waiting job must be superseded"
        );
        assert!(newer.await.expect("join"), "newest job runs");
    }

    #[tokio::test]
    async fn command_gets_facts_as_environment_and_exit_code_decides() {
        let facts = Facts {
            hook: "gh".into(),
            repository: Some("owner/repo".into()),
            r#ref: Some("refs/heads/main".into()),
            ..Facts::default()
        };
        let argv = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            "echo \"$DROVER_HOOK $DROVER_REPOSITORY $DROVER_REF\"; exit 3".to_owned(),
        ];
        let out = run_command(&argv, &facts, Duration::from_secs(10)).await;
        assert_eq!(out.state, JobState::Failed);
        let msg = out.message.expect("message");
        assert!(msg.contains("exit code 3"), "{msg}");
        assert!(msg.contains("gh owner/repo refs/heads/main"), "{msg}");
        let ok = run_command(&["true".to_owned()], &facts, Duration::from_secs(10)).await;
        assert_eq!(ok.state, JobState::Completed);
    }

    #[tokio::test]
    async fn command_past_its_timeout_fails() {
        let argv = vec!["sleep".to_owned(), "5".to_owned()];
        let out = run_command(&argv, &Facts::default(), Duration::from_millis(100)).await;
        assert_eq!(out.state, JobState::Failed);
        assert!(out.message.expect("message").contains("did not finish"));
    }
}
