//! The `container` action: a one-off container run through the Engine API for a job.
//!
//! Invariants: the container is created, started, waited for within the spec's timeout,
//! its output tail read, and then removed — also when the wait times out (it is killed
//! first) and when the job is dropped half-way (a guard removes it in the background).
//! Request data reaches the container only as `DROVER_*` environment variables, after the
//! spec's fixed `env`, which a fact never overrides. Runs of one hook are serialised unless
//! the spec says `concurrent: true`; queued runs wait, none is dropped (two pushes to
//! different repositories through one hook must both deploy). A non-zero exit is `failed`.
//!
//! The Engine calls themselves live in `docker/containers.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bollard::models::{ContainerCreateBody, HostConfig};
use tracing::{info, warn};

use super::{JobState, Outcome, RunContext};
use crate::config::ContainerSpec;
use crate::docker::{Credentials, Engine};

/// Bytes of output kept on the job, whatever `log_lines` says.
const MAX_LOG_BYTES: usize = 16 * 1024;
/// Label on every container drover runs for a hook.
pub const HOOK_LABEL: &str = "drover.hook";
/// Label naming the job a container runs for.
pub const JOB_LABEL: &str = "drover.job.id";

/// Per-hook locks that serialise non-concurrent runs.
#[derive(Default)]
pub struct Runs {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Removes the container when dropped before [`Removal::done`] (a job cut off by
/// shutdown must not leave its container behind).
struct Removal {
    engine: Engine,
    id: Option<String>,
}

impl Removal {
    async fn done(mut self) {
        if let Some(id) = self.id.take() {
            remove(&self.engine, &id).await;
        }
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let engine = self.engine.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { remove(&engine, &id).await });
            }
        }
    }
}

async fn remove(engine: &Engine, id: &str) {
    if let Err(e) = engine.remove_container(id).await {
        warn!(container = %id, error = %e, "cannot remove the action's container");
    }
}

fn outcome(
    state: JobState,
    message: String,
    exit_code: Option<i64>,
    log: Option<String>,
) -> Outcome {
    Outcome {
        state,
        message: Some(message),
        services: Vec::new(),
        exit_code,
        log_tail: log,
    }
}

/// The container's environment: the spec's fixed variables and those of `env_files`, then
/// every fact not named there. An unreadable file fails the run with its path.
pub fn environment(spec: &ContainerSpec, job: &RunContext) -> Result<Vec<String>, String> {
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for (k, path) in &spec.env_files {
        let value = crate::config::read_secret(path)
            .map_err(|e| format!("env_files {k}: cannot read {}: {e}", path.display()))?;
        let value = String::from_utf8(value)
            .map_err(|_| format!("env_files {k}: {} is not UTF-8", path.display()))?;
        env.push(format!("{k}={value}"));
    }
    for (k, v) in job.facts.env() {
        if !spec.env.contains_key(k) && !spec.env_files.contains_key(k) {
            env.push(format!("{k}={v}"));
        }
    }
    Ok(env)
}

/// The last `lines` lines of `text`, at most [`MAX_LOG_BYTES`] bytes of them.
pub fn tail(text: &str, lines: usize) -> String {
    let trimmed = text.trim_end_matches('\n');
    let start = if lines == 0 {
        trimmed.len()
    } else {
        trimmed
            .rmatch_indices('\n')
            .nth(lines - 1)
            .map_or(0, |(i, _)| i + 1)
    };
    let mut from = start.max(trimmed.len().saturating_sub(MAX_LOG_BYTES));
    while !trimmed.is_char_boundary(from) {
        from += 1;
    }
    trimmed[from..].to_owned()
}

impl Runs {
    fn lock(&self, hook: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(hook.to_owned()).or_default().clone()
    }

    /// Runs the job's container to its end and reports exit code and output tail.
    pub async fn run(
        &self,
        engine: &Engine,
        job: &RunContext,
        spec: &ContainerSpec,
        credentials: Option<Credentials>,
    ) -> Outcome {
        let lock = self.lock(&job.hook);
        let _guard = if spec.concurrent {
            None
        } else {
            Some(lock.lock().await)
        };
        let name = format!("drover-{}-{}", job.hook, job.id);
        let env = match environment(spec, job) {
            Ok(env) => env,
            Err(message) => return Outcome::failed(message),
        };
        let id = match create(engine, &name, job, env, spec, credentials).await {
            Ok(id) => id,
            Err(e) => return Outcome::failed(e.to_string()),
        };
        let removal = Removal {
            engine: engine.clone(),
            id: Some(id.clone()),
        };
        for net in spec.networks.iter().skip(1) {
            if let Err(e) = engine.connect_container(net, &id).await {
                removal.done().await;
                return Outcome::failed(e.to_string());
            }
        }
        if let Err(e) = engine.start_container(&id).await {
            removal.done().await;
            return Outcome::failed(e.to_string());
        }
        info!(container = %name, image = %spec.image, "action container started");
        let result = match tokio::time::timeout(spec.timeout, engine.wait_container(&id)).await {
            Ok(Ok(code)) => Ok(code),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => {
                if let Err(e) = engine.kill_container(&id, "KILL").await {
                    warn!(container = %name, error = %e, "cannot kill the action's container");
                }
                Err(format!(
                    "container did not finish within {}",
                    humantime::format_duration(spec.timeout)
                ))
            }
        };
        let log = match engine.container_logs(&id, spec.log_lines).await {
            Ok(text) => Some(tail(&text, spec.log_lines)),
            Err(e) => {
                warn!(container = %name, error = %e, "cannot read the action's output");
                None
            }
        };
        removal.done().await;
        match result {
            Ok(0) => outcome(JobState::Completed, "exit code 0".into(), Some(0), log),
            Ok(code) => outcome(
                JobState::Failed,
                format!("exit code {code}"),
                Some(code),
                log,
            ),
            Err(message) => outcome(JobState::Failed, message, None, log),
        }
    }
}

async fn create(
    engine: &Engine,
    name: &str,
    job: &RunContext,
    env: Vec<String>,
    spec: &ContainerSpec,
    credentials: Option<Credentials>,
) -> Result<String, crate::docker::Error> {
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(env),
        user: spec.user.clone(),
        working_dir: spec.working_dir.clone(),
        labels: Some(HashMap::from([
            (HOOK_LABEL.to_owned(), job.hook.clone()),
            (JOB_LABEL.to_owned(), job.id.to_string()),
        ])),
        host_config: Some(HostConfig {
            binds: (!spec.mounts.is_empty()).then(|| spec.mounts.clone()),
            network_mode: spec.networks.first().cloned(),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    };
    match engine.create_container(name, body.clone()).await {
        Err(e) if e.is_not_found() => {}
        other => return other,
    }
    // The engine does not have the image: pull it once (within the run's limit), then
    // create again.
    info!(image = %spec.image, "pulling the action's image");
    engine
        .pull_image(&spec.image, credentials, spec.timeout)
        .await?;
    engine.create_container(name, body).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{Facts, JobId, Work};

    fn spec(yaml: &str) -> ContainerSpec {
        serde_yaml_ng::from_str(yaml).expect("spec")
    }

    #[test]
    fn facts_come_after_fixed_variables_and_never_override_them() {
        let s = spec("{ image: x, env: { DROVER_REF: fixed, STACK: web } }");
        let job = RunContext {
            id: JobId("1-1".into()),
            hook: "gh".into(),
            seq: 1,
            work: Work::Container { spec: s.clone() },
            facts: Facts {
                hook: "gh".into(),
                r#ref: Some("refs/heads/main; rm -rf /".into()),
                sender: Some("rycus86".into()),
                ..Facts::default()
            },
        };
        let env = environment(&s, &job).expect("env");
        assert!(env.contains(&"DROVER_REF=fixed".to_owned()), "{env:?}");
        assert!(!env.iter().any(|e| e.contains("rm -rf")), "{env:?}");
        assert!(env.contains(&"STACK=web".to_owned()));
        assert!(env.contains(&"DROVER_SENDER=rycus86".to_owned()));
        assert!(env.contains(&"DROVER_HOOK=gh".to_owned()));
    }

    #[test]
    fn env_files_are_read_at_each_run_and_views_show_names_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-value\n").expect("write");
        let s = spec(&format!(
            "{{ image: x, env: {{ PLAIN: also-hidden }}, env_files: {{ TOKEN: {} }} }}",
            token.display()
        ));
        let job = RunContext {
            id: JobId("1-1".into()),
            hook: "gh".into(),
            seq: 1,
            work: Work::Container { spec: s.clone() },
            facts: Facts::default(),
        };
        let env = environment(&s, &job).expect("env");
        assert!(env.contains(&"TOKEN=s3cret-value".to_owned()), "{env:?}");
        let view = serde_json::to_string(&job.work).expect("json");
        assert!(view.contains("PLAIN") && view.contains("TOKEN"), "{view}");
        assert!(
            !view.contains("also-hidden") && !view.contains("s3cret"),
            "{view}"
        );
        std::fs::remove_file(&token).expect("rm");
        let err = environment(&s, &job).expect_err("missing file");
        assert!(
            err.contains("env_files TOKEN") && err.contains("token"),
            "{err}"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines_within_the_byte_bound() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a\nb\nc", 5), "a\nb\nc");
        assert_eq!(tail("a\nb\n", 0), "");
        let long = "é".repeat(MAX_LOG_BYTES);
        let t = tail(&long, 1);
        assert!(t.len() <= MAX_LOG_BYTES && !t.is_empty());
    }
}
