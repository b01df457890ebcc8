//! Webhooks end to end: real Swarm, real registry on 127.0.0.1:5000, drover's HTTP server
//! running in-process on a free port (the engine is never mocked).
//!
//! Each test builds its own image versions `FROM` the busybox test image (nothing is pulled
//! from the internet), pushes them to `127.0.0.1:5000/drover-e2e/<unique>:latest`, runs a
//! service from v1, pushes v2 and sends webhooks. Scenario tests journal jobs in a state
//! file so concurrently running drover instances never pick up each other's pending jobs;
//! one test checks the Swarm journal itself.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use drover::config::Config;
use drover::docker::Engine;
use drover::hooks;
use drover::jobs::Journal;
use drover::status::Board;
use drover::update::Executor;
use support::*;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "e2e-token";

/// drover's webhook server in a thread of its own, stopped on drop.
struct Drover {
    addr: String,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drover {
    /// `hooks` is the YAML list under `hooks:`; `{token}` is replaced by the token file.
    fn start(hooks: &str, swarm_journal: bool) -> Result<Drover> {
        let dir = temp_dir("drover-e2e-hooks")?;
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n"))?;
        let state = dir.path().join("jobs.json");
        let yaml = format!(
            "jobs: {{ update_timeout: 120s, state_file: {} }}\nhooks:\n{}",
            state.display(),
            hooks.replace("{token}", &token.display().to_string())
        );
        let config = Config::parse(Path::new("e2e.yml"), &yaml)?;
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel::<Result<String>>();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let started = async {
                    let engine = Engine::connect().await?;
                    let journal = if swarm_journal {
                        Journal::Swarm(engine.clone(), true)
                    } else {
                        Journal::file(state)
                    };
                    let runner = Arc::new(Executor::new(engine, &config)?);
                    let service =
                        hooks::Service::new(&config, runner, journal, token.clone()).await?;
                    let app = drover::http::AppState::new(
                        service,
                        Arc::new(Board::new()),
                        config.http.clone(),
                    );
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let addr = listener.local_addr()?.to_string();
                    anyhow::Ok((app, listener, addr))
                };
                match started.await {
                    Ok((app, listener, addr)) => {
                        let _ = tx.send(Ok(addr));
                        if let Err(e) = drover::http::serve_listener(listener, app, token).await {
                            eprintln!("drover http server: {e}");
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .context("drover did not start")??;
        Ok(Drover {
            addr,
            shutdown,
            thread: Some(thread),
            _dir: dir,
        })
    }

    fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, serde_json::Value)> {
        let r = http_post(&self.addr, path, headers, body.as_bytes())?;
        Ok((
            r.status,
            serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null),
        ))
    }

    fn job(&self, id: &str) -> Result<serde_json::Value> {
        let r = http_get(&format!("http://{}/jobs/{id}", self.addr))?;
        ensure!(r.status == 200, "GET /jobs/{id}: {} {}", r.status, r.body);
        Ok(serde_json::from_str(&r.body)?)
    }

    /// Polls the job until it leaves queued/running.
    fn wait_job(&self, id: &str, timeout: Duration) -> Result<serde_json::Value> {
        let mut last = serde_json::Value::Null;
        let done = wait_until(timeout, Duration::from_millis(250), || {
            if let Ok(j) = self.job(id) {
                last = j;
            }
            !matches!(
                last["state"].as_str(),
                None | Some("queued") | Some("running")
            )
        });
        ensure!(done, "job {id} did not finish: {last}");
        Ok(last)
    }

    fn metrics(&self) -> String {
        http_get(&format!("http://{}/metrics", self.addr))
            .map(|r| r.body)
            .unwrap_or_default()
    }
}

impl Drop for Drover {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn inspect(service: &str, format: &str) -> Result<String> {
    docker(&["service", "inspect", "--format", format, service])
}

fn all_tasks(service: &str) -> Result<usize> {
    Ok(docker(&["service", "ps", "-q", service])?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

fn remove_image_tags(image: &str) {
    let _ = docker(&["image", "rm", "-f", image]);
}

#[test]
fn hub_burst_updates_the_service_once_and_a_repeat_is_skipped() -> Result<()> {
    require_e2e!();
    let name = unique("hub");
    let image = format!("127.0.0.1:5000/drover-e2e/{name}:latest");
    let v1 = build_push(&image, "v1", "")?;
    let service = ServiceBuilder::new(&name, &image)
        .replicas(1)
        .update_config(1, "0s", "pause", "1s")
        .create()?;
    wait_running(service.name(), 1, Duration::from_secs(60))?;
    let spec_image = inspect(&name, "{{.Spec.TaskTemplate.ContainerSpec.Image}}")?;
    ensure!(
        spec_image.ends_with(v1.split('@').nth(1).unwrap_or("?")),
        "{spec_image} vs {v1}"
    );
    let v2 = build_push(&image, "v2", "")?;
    let v2_digest = v2
        .split_once('@')
        .map(|(_, d)| d.to_owned())
        .context("digest")?;

    let drover = Drover::start(
        r#"
  - name: hub
    kind: dockerhub
    token_file: {token}
    allow: { repository: "127\\.0\\.0\\.1:5000/drover-e2e/.+", tag: latest }
    quiet: 3s
    action: update-services
"#,
        false,
    )?;
    let repo = image.trim_end_matches(":latest");
    let payload =
        format!(r#"{{"push_data":{{"tag":"latest"}},"repository":{{"repo_name":"{repo}"}}}}"#);

    // A wrong token is refused and touches nothing.
    let version = inspect(&name, "{{.Version.Index}}")?;
    let (status, _) = drover.post("/hooks/hub?token=wrong", &[], &payload)?;
    assert_eq!(status, 401);
    let (status, _) = drover.post("/hooks/hub", &[], &payload)?;
    assert_eq!(status, 401);
    assert_eq!(
        inspect(&name, "{{.Version.Index}}")?,
        version,
        "a refused webhook changed the service"
    );

    // Docker Hub's multi-arch burst: five deliveries within two seconds, one job.
    let path = format!("/hooks/hub?token={TOKEN}");
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (status, body) =
            drover.post(&path, &[("Content-Type", "application/json")], &payload)?;
        assert_eq!(status, 202, "{body}");
        ids.push(body["job"].as_str().context("job id")?.to_owned());
        std::thread::sleep(Duration::from_millis(400));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "the burst was not coalesced: {ids:?}");
    let job = drover.wait_job(&ids[0], Duration::from_secs(120))?;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["requests"], 5, "{job}");
    assert_eq!(job["services"][0]["service"], name.as_str(), "{job}");
    assert_eq!(job["services"][0]["outcome"], "completed", "{job}");
    let now = inspect(&name, "{{.Spec.TaskTemplate.ContainerSpec.Image}}")?;
    assert_eq!(now, format!("{image}@{v2_digest}"));
    wait_running(&name, 1, Duration::from_secs(60))?;
    assert_eq!(
        all_tasks(&name)?,
        2,
        "exactly one rolling update: one old task, one new"
    );

    // The same push again: nothing to do, no restart.
    let version = inspect(&name, "{{.Version.Index}}")?;
    let (status, body) = drover.post(&path, &[], &payload)?;
    assert_eq!(status, 202, "{body}");
    let again = body["job"].as_str().context("job id")?.to_owned();
    assert_ne!(again, ids[0]);
    let job = drover.wait_job(&again, Duration::from_secs(60))?;
    assert_eq!(job["state"], "skipped", "{job}");
    assert_eq!(
        job["services"][0]["message"], "already runs this digest",
        "{job}"
    );
    assert_eq!(
        inspect(&name, "{{.Version.Index}}")?,
        version,
        "a no-op update changed the service"
    );
    assert_eq!(all_tasks(&name)?, 2);

    let metrics = drover.metrics();
    assert!(
        metric_value(
            &metrics,
            "drover_webhook_signature_failures_total",
            &[("hook", "hub")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
    drop(service);
    remove_image_tags(&image);
    Ok(())
}

#[test]
fn update_whose_tasks_die_is_rolled_back_by_swarm_and_reported() -> Result<()> {
    require_e2e!();
    let name = unique("rb");
    let image = format!("127.0.0.1:5000/drover-e2e/{name}:latest");
    let v1 = build_push(&image, "v1", "")?;
    let service = ServiceBuilder::new(&name, &image)
        .replicas(1)
        .update_config(1, "0s", "rollback", "5s")
        .rollback_config(1, "0s", "1s")
        .create()?;
    wait_running(service.name(), 1, Duration::from_secs(60))?;
    let before = inspect(&name, "{{.Spec.TaskTemplate.ContainerSpec.Image}}")?;
    // v2 exits at once: Swarm sees the new task fail within the monitor window.
    build_push(&image, "v2", r#"ENTRYPOINT ["/bin/busybox", "false"]"#)?;

    let drover = Drover::start(
        r#"
  - name: ci
    kind: generic
    token_file: {token}
    quiet: 1s
    action: update-services
"#,
        false,
    )?;
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = drover.post(
        "/hooks/ci",
        &[("Authorization", &auth)],
        &format!(r#"{{"image":"{image}"}}"#),
    )?;
    assert_eq!(status, 202, "{body}");
    let id = body["job"].as_str().context("job id")?.to_owned();
    let job = drover.wait_job(&id, Duration::from_secs(120))?;
    assert_eq!(job["state"], "rolled_back", "{job}");
    assert_eq!(job["services"][0]["outcome"], "rolled_back", "{job}");
    let after = inspect(&name, "{{.Spec.TaskTemplate.ContainerSpec.Image}}")?;
    assert_eq!(after, before, "Swarm's rollback restored v1 ({v1})");
    let metrics = drover.metrics();
    assert!(
        metric_value(&metrics, "drover_rollbacks_total", &[]).unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    drop(service);
    remove_image_tags(&image);
    Ok(())
}

#[test]
fn restart_service_action_forces_one_new_task() -> Result<()> {
    require_e2e!();
    let name = unique("rs");
    let service = ServiceBuilder::backend(&name)
        .replicas(1)
        .update_config(1, "0s", "pause", "1s")
        .create()?;
    wait_running(service.name(), 1, Duration::from_secs(60))?;
    let force = inspect(&name, "{{.Spec.TaskTemplate.ForceUpdate}}")?;
    let drover = Drover::start(
        &format!(
            r#"
  - name: kick
    kind: generic
    token_file: {{token}}
    quiet: 1s
    action: {{ restart-service: {name} }}
"#
        ),
        false,
    )?;
    let (status, body) = drover.post(
        "/hooks/kick",
        &[("X-Drover-Token", TOKEN)],
        r#"{"image":"x/y"}"#,
    )?;
    assert_eq!(status, 202, "{body}");
    let job = drover.wait_job(
        body["job"].as_str().context("job id")?,
        Duration::from_secs(120),
    )?;
    assert_eq!(job["state"], "completed", "{job}");
    let after = inspect(&name, "{{.Spec.TaskTemplate.ForceUpdate}}")?;
    assert_eq!(after.parse::<u64>()?, force.parse::<u64>()? + 1);
    wait_running(&name, 1, Duration::from_secs(60))?;
    assert_eq!(all_tasks(&name)?, 2);
    drop(service);
    Ok(())
}

#[test]
fn pending_job_lives_in_a_swarm_config_until_it_is_done() -> Result<()> {
    require_e2e!();
    let drover = Drover::start(
        r#"
  - name: ci
    kind: generic
    token_file: {token}
    quiet: 3s
    action: update-services
"#,
        true,
    )?;
    // An image no service runs: the job ends `skipped` without touching anything.
    let image = format!("127.0.0.1:5000/drover-e2e/{}:latest", unique("nobody"));
    let (status, body) = drover.post(
        "/hooks/ci",
        &[("X-Drover-Token", TOKEN)],
        &format!(r#"{{"image":"{image}"}}"#),
    )?;
    assert_eq!(status, 202, "{body}");
    let id = body["job"].as_str().context("job id")?.to_owned();
    let config = format!("drover-job-{id}");
    let listed = docker(&[
        "config",
        "ls",
        "--filter",
        "label=drover.job=1",
        "--format",
        "{{.Name}}",
    ])?;
    assert!(
        listed.lines().any(|l| l == config),
        "{config} not journalled: {listed}"
    );
    let job = drover.wait_job(&id, Duration::from_secs(60))?;
    assert_eq!(job["state"], "skipped", "{job}");
    let gone = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        docker(&["config", "inspect", &config]).is_err()
    });
    assert!(gone, "{config} left behind after the job finished");
    Ok(())
}
