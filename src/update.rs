//! Carries out jobs against the engine: roll services to a new digest, force-restart a
//! service, or run a local command.
//!
//! Invariants: a tag is resolved to its digest once per job, through the engine
//! (`GET /distribution/{name}/json`, the index digest of a multi-arch image); a service
//! already pinned to that digest is left alone (no forced restart); a spec change keeps
//! everything but the image (or `ForceUpdate`), uses the version index just read and is
//! retried on "update out of sequence"; at most one update per service runs at a time and
//! a newer job supersedes an older one still waiting for that service; the outcome is what
//! Swarm reports in `UpdateStatus` for *our* update (told apart by `StartedAt`), and drover
//! never asks for a rollback itself. Command actions get payload facts as `DROVER_*`
//! environment variables, never interpolated into argv or a shell.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::models::{BollardDate, ServiceUpdateStatusStateEnum as UpdateState};
use bollard::query_parameters::UpdateServiceOptions;
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config;
use crate::docker::{self, Engine};
use crate::jobs::{Facts, JobState, Outcome, RunContext, Runner, ServiceResult, Work};
use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference")]
    InvalidImage,
    #[error("cannot read the password of registry {address}: {source}")]
    Secret {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Label that opts a service out of webhook updates.
pub const OPT_OUT_LABEL: &str = "drover.update";
/// How often a running update is inspected.
const POLL: Duration = Duration::from_millis(500);
/// A service with no replicas may never get an `UpdateStatus`; after this long it is done.
const ZERO_REPLICA_GRACE: Duration = Duration::from_secs(3);
/// Attempts at a spec change that the engine refuses as out of sequence.
const SEQUENCE_RETRIES: usize = 5;
/// Bytes of a command's stdout/stderr kept in the job message.
const OUTPUT_TAIL: usize = 1000;

/// A parsed image reference, normalised the way the engine does: `owner/repo`,
/// `docker.io/owner/repo` and `index.docker.io/owner/repo` are one image, single names
/// live under `library/`, and a missing tag is `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `docker.io`, `127.0.0.1:5000`, `ghcr.io`, ...
    pub registry: String,
    /// The path inside the registry, e.g. `library/nginx`.
    pub repo: String,
    pub tag: String,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(raw: &str) -> Result<ImageRef, Error> {
        if raw.is_empty()
            || raw.len() > 512
            || !raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/:@+".contains(&b))
        {
            return Err(Error::InvalidImage);
        }
        let (name, digest) = match raw.split_once('@') {
            Some((n, d)) => {
                if !d.contains(':') || d.contains('@') {
                    return Err(Error::InvalidImage);
                }
                (n, Some(d.to_owned()))
            }
            None => (raw, None),
        };
        // The tag is after the last ':' that follows the last '/' (a registry port is not a tag).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
            None => (name, "latest"),
        };
        if path.is_empty() || tag.is_empty() || tag.contains('/') {
            return Err(Error::InvalidImage);
        }
        let (registry, repo) = match path.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), path.to_owned()),
        };
        let registry = normalise_registry(&registry);
        let repo = if registry == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        if repo.is_empty() || repo.split('/').any(str::is_empty) {
            return Err(Error::InvalidImage);
        }
        Ok(ImageRef {
            registry,
            repo,
            tag: tag.to_owned(),
            digest,
        })
    }

    /// `registry/repo:tag`, the key that coalesces requests and matches services.
    pub fn key(&self) -> String {
        format!("{}/{}:{}", self.registry, self.repo, self.tag)
    }

    pub fn same_repo_tag(&self, other: &ImageRef) -> bool {
        self.registry == other.registry && self.repo == other.repo && self.tag == other.tag
    }
}

/// Docker Hub answers to several host names.
pub fn normalise_registry(host: &str) -> String {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        h => h.to_owned(),
    }
}

/// The image with any `@digest` removed, as the user spelled it.
fn without_digest(image: &str) -> &str {
    image.split_once('@').map_or(image, |(n, _)| n)
}

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
    registries: Vec<(String, DockerCredentials)>,
    timeout: Duration,
    slots: Slots,
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
                DockerCredentials {
                    username: Some(r.username.clone()),
                    password: Some(String::from_utf8_lossy(&password).into_owned()),
                    serveraddress: Some(r.address.clone()),
                    ..DockerCredentials::default()
                },
            ));
        }
        Ok(Executor {
            engine,
            registries,
            timeout: config.jobs.update_timeout,
            slots: Slots::default(),
        })
    }

    fn credentials(&self, registry: &str) -> Option<DockerCredentials> {
        self.registries
            .iter()
            .find(|(a, _)| a == registry)
            .map(|(_, c)| c.clone())
    }

    async fn update_services(&self, image: &str, seq: u64) -> Outcome {
        let target = match ImageRef::parse(image) {
            Ok(t) => t,
            Err(e) => return Outcome::failed(e.to_string()),
        };
        let services = match self.engine.api.list_services(None).await {
            Ok(s) => s,
            Err(e) => return Outcome::failed(format!("cannot list services: {e}")),
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
            let opted_out = spec
                .labels
                .as_ref()
                .and_then(|l| l.get(OPT_OUT_LABEL))
                .is_some_and(|v| v == "false");
            if opted_out {
                results.push(ServiceResult {
                    service: name,
                    from_image: Some(current.clone()),
                    to_image: None,
                    outcome: JobState::Skipped,
                    message: format!("opted out by label {OPT_OUT_LABEL}=false"),
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
            };
        }
        let credentials = self.credentials(&target.registry);
        let digest = match self
            .engine
            .api
            .inspect_registry_image(&target.key(), credentials.clone())
            .await
        {
            Ok(d) => match d.descriptor.digest {
                Some(d) => d,
                None => return Outcome::failed("the registry returned no digest".into()),
            },
            Err(e) => return Outcome::failed(format!("cannot resolve {}: {e}", target.key())),
        };
        info!(image = %target.key(), %digest, services = matching.len(), "resolved digest");
        let runs = matching.iter().map(|(id, name)| {
            self.update_one(id, name, Change::Pin(&digest), credentials.clone(), seq)
        });
        results.extend(futures_util::future::join_all(runs).await);
        Outcome::combine(results)
    }

    async fn restart_service(&self, service: &str, seq: u64) -> Outcome {
        let svc = match self.engine.api.inspect_service(service, None).await {
            Ok(s) => s,
            Err(e) if docker::is_not_found(&e) => {
                return Outcome::failed(format!("no service named {service}"));
            }
            Err(e) => return Outcome::failed(format!("cannot inspect service {service}: {e}")),
        };
        let Some(id) = svc.id else {
            return Outcome::failed(format!("service {service} has no id"));
        };
        let result = self
            .update_one(&id, service, Change::Force, None, seq)
            .await;
        Outcome::combine(vec![result])
    }

    /// Changes one service and follows the update to its end.
    async fn update_one(
        &self,
        id: &str,
        name: &str,
        change: Change<'_>,
        credentials: Option<DockerCredentials>,
        seq: u64,
    ) -> ServiceResult {
        let mut result = ServiceResult {
            service: name.to_owned(),
            from_image: None,
            to_image: None,
            outcome: JobState::Failed,
            message: String::new(),
        };
        let Some(_guard) = self.slots.acquire(id, seq).await else {
            result.outcome = JobState::Skipped;
            result.message = "superseded by a newer job".into();
            return result;
        };
        let started = Instant::now();
        let mut attempt = 0;
        let (before, replicas) = loop {
            attempt += 1;
            let svc = match self.engine.api.inspect_service(id, None).await {
                Ok(s) => s,
                Err(e) => {
                    result.message = format!("cannot inspect service: {e}");
                    return result;
                }
            };
            let version = svc
                .version
                .and_then(|v| v.index)
                .and_then(|v| i32::try_from(v).ok());
            let (Some(version), Some(mut spec)) = (version, svc.spec) else {
                result.message = "service has no spec or version".into();
                return result;
            };
            let replicas = spec
                .mode
                .as_ref()
                .and_then(|m| m.replicated.as_ref())
                .and_then(|r| r.replicas);
            let task = spec.task_template.get_or_insert_with(Default::default);
            let container = task.container_spec.get_or_insert_with(Default::default);
            let current = container.image.clone().unwrap_or_default();
            result.from_image = Some(current.clone());
            match change {
                Change::Pin(digest) => {
                    if ImageRef::parse(&current).is_ok_and(|r| r.digest.as_deref() == Some(digest))
                    {
                        result.to_image = Some(current);
                        result.outcome = JobState::Skipped;
                        result.message = "already runs this digest".into();
                        return result;
                    }
                    let image = format!("{}@{digest}", without_digest(&current));
                    container.image = Some(image.clone());
                    result.to_image = Some(image);
                }
                Change::Force => {
                    task.force_update = Some(task.force_update.unwrap_or(0).wrapping_add(1));
                    result.to_image = Some(current);
                }
            }
            let options = UpdateServiceOptions {
                version,
                ..UpdateServiceOptions::default()
            };
            match self
                .engine
                .api
                .update_service(id, spec, options, credentials.clone())
                .await
            {
                Ok(_) => break (svc.update_status.and_then(|s| s.started_at), replicas),
                Err(e) if docker::is_out_of_sequence(&e) && attempt < SEQUENCE_RETRIES => {
                    warn!(service = %name, attempt, "update out of sequence, retrying");
                    continue;
                }
                Err(e) => {
                    result.message = format!("cannot update service: {e}");
                    return result;
                }
            }
        };
        info!(service = %name, image = ?result.to_image, "service update started");
        let (outcome, message) = self.follow(id, before, replicas, started).await;
        let m = metrics::get();
        m.update_duration
            .with_label_values(&[outcome.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if outcome == JobState::RolledBack {
            m.rollbacks.inc();
        }
        info!(service = %name, outcome = outcome.as_str(), "service update finished");
        result.outcome = outcome;
        result.message = message;
        result
    }

    /// Polls the service until Swarm reports the end of the update that started after
    /// `before` (the `UpdateStatus.StartedAt` seen before our spec change).
    async fn follow(
        &self,
        id: &str,
        before: Option<BollardDate>,
        replicas: Option<i64>,
        started: Instant,
    ) -> (JobState, String) {
        let deadline = started + self.timeout;
        loop {
            if Instant::now() >= deadline {
                return (
                    JobState::Failed,
                    format!(
                        "update did not finish within {}",
                        humantime::format_duration(self.timeout)
                    ),
                );
            }
            tokio::time::sleep(POLL).await;
            let svc = match self.engine.api.inspect_service(id, None).await {
                Ok(s) => s,
                Err(e) if docker::is_not_found(&e) => {
                    return (
                        JobState::Failed,
                        "service was removed during the update".into(),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "cannot inspect service, retrying");
                    continue;
                }
            };
            let status = svc
                .update_status
                .filter(|s| s.started_at.is_some() && s.started_at != before);
            let Some(status) = status else {
                if replicas == Some(0) && started.elapsed() >= ZERO_REPLICA_GRACE {
                    return (JobState::Completed, "no tasks to update".into());
                }
                continue;
            };
            let message = status.message.clone().unwrap_or_default();
            match status.state {
                Some(UpdateState::COMPLETED) => return (JobState::Completed, message),
                Some(UpdateState::PAUSED) => {
                    return (JobState::Failed, format!("update paused: {message}"));
                }
                Some(UpdateState::ROLLBACK_COMPLETED) => return (JobState::RolledBack, message),
                Some(UpdateState::ROLLBACK_PAUSED) => {
                    return (JobState::RolledBack, format!("rollback paused: {message}"));
                }
                _ => {}
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Change<'a> {
    Pin(&'a str),
    Force,
}

impl Runner for Executor {
    fn run(&self, job: RunContext) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            match &job.work {
                Work::UpdateServices { image } => self.update_services(image, job.seq).await,
                Work::RestartService { service } => self.restart_service(service, job.seq).await,
                Work::Command { argv } => {
                    let Some(_guard) = self
                        .slots
                        .acquire(&format!("command:{}", job.hook), job.seq)
                        .await
                    else {
                        return Outcome {
                            state: JobState::Skipped,
                            message: Some("superseded by a newer job".into()),
                            services: Vec::new(),
                        };
                    };
                    run_command(argv, &job.facts, self.timeout).await
                }
            }
        })
    }
}

/// Runs `argv` (no shell) with the payload facts as `DROVER_*` variables; the exit code
/// decides the outcome, the output tails go into the message.
pub async fn run_command(argv: &[String], facts: &Facts, timeout: Duration) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::failed("command is empty".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in facts.env() {
        cmd.env(key, value);
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::failed(format!("cannot start {program}: {e}")),
    };
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Outcome::failed(format!("cannot wait for {program}: {e}")),
        Err(_) => {
            return Outcome::failed(format!(
                "{program} did not finish within {}",
                humantime::format_duration(timeout)
            ));
        }
    };
    let mut message = match output.status.code() {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_owned(),
    };
    for (name, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        if !bytes.is_empty() {
            let tail = &bytes[bytes.len().saturating_sub(OUTPUT_TAIL)..];
            message.push_str(&format!(
                "; {name}: {}",
                String::from_utf8_lossy(tail).trim_end()
            ));
        }
    }
    Outcome {
        state: if output.status.success() {
            JobState::Completed
        } else {
            JobState::Failed
        },
        message: Some(message),
        services: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> String {
        ImageRef::parse(s).expect("valid").key()
    }

    #[test]
    fn hub_spellings_normalise_to_one_image() {
        let want = "docker.io/owner/repo:latest";
        assert_eq!(key("owner/repo"), want);
        assert_eq!(key("owner/repo:latest"), want);
        assert_eq!(key("docker.io/owner/repo:latest"), want);
        assert_eq!(key("index.docker.io/owner/repo"), want);
        assert_eq!(key("owner/repo:latest@sha256:abcd"), want);
    }

    #[test]
    fn single_names_live_under_library() {
        assert_eq!(key("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(key("nginx:1.27"), "docker.io/library/nginx:1.27");
        assert_eq!(key("docker.io/nginx"), "docker.io/library/nginx:latest");
    }

    #[test]
    fn registry_with_port_stays_as_is() {
        let r = ImageRef::parse("127.0.0.1:5000/x/y:latest@sha256:ff").expect("valid");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repo, "x/y");
        assert_eq!(r.tag, "latest");
        assert_eq!(r.digest.as_deref(), Some("sha256:ff"));
        assert_eq!(key("127.0.0.1:5000/x"), "127.0.0.1:5000/x:latest");
        assert_eq!(key("localhost/x:v2"), "localhost/x:v2");
        assert_ne!(key("127.0.0.1:5000/x/y"), key("x/y"));
    }

    #[test]
    fn hostile_or_broken_references_are_refused() {
        for bad in [
            "",
            "a b",
            "x:{{7*7}}",
            "/x",
            "x/",
            "x:",
            "x@",
            "x@sha256:1@2",
            "x//y",
            "$(id)",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn digest_is_stripped_as_spelled() {
        assert_eq!(
            without_digest("127.0.0.1:5000/x:latest@sha256:1"),
            "127.0.0.1:5000/x:latest"
        );
        assert_eq!(without_digest("x"), "x");
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
