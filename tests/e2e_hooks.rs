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
use drover::jobs::runner::Executor;
use drover::role::Role;
use drover::status::Board;
use support::*;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "e2e-token";

/// drover's webhook server in a thread of its own, stopped on drop.
struct Drover {
    addr: String,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
    /// This instance's Swarm job journal (tests run side by side on one Swarm).
    journal: String,
    _dir: tempfile::TempDir,
}

impl Drover {
    /// `hooks` is the YAML list under `hooks:`; `{token}` is replaced by the token file.
    fn start(hooks: &str, swarm_journal: bool) -> Result<Drover> {
        let dir = temp_dir("drover-e2e-hooks")?;
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n"))?;
        let state = dir.path().join("jobs.json");
        let journal = unique("hooks");
        let yaml = format!(
            "jobs: {{ update_timeout: 120s, state_file: {}, journal: {journal} }}\nhooks:\n{}",
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
                        Journal::Swarm {
                            engine: engine.clone(),
                            scope: config.jobs.journal.clone(),
                        }
                    } else {
                        Journal::file(state)
                    };
                    let runner = Arc::new(Executor::new(engine, &config)?);
                    // A journal scoped to this test: nothing of others' to resume.
                    let (_, role) = tokio::sync::watch::channel(Role::Standalone);
                    let service =
                        drover::hooks::intake(&config, runner, journal, role, token.clone())
                            .await?;
                    let app = drover::http::AppState::new(
                        service,
                        Arc::new(Board::new()),
                        Arc::default(),
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
            journal,
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
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
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
    // Docker Hub's bodies differ per delivery by `pushed_at`.
    let pushed = |at: u32| {
        format!(
            r#"{{"push_data":{{"pushed_at":{at},"tag":"latest"}},"repository":{{"repo_name":"{repo}"}}}}"#
        )
    };
    let payload = pushed(1);

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
    for at in 1..=5 {
        let (status, body) =
            drover.post(&path, &[("Content-Type", "application/json")], &pushed(at))?;
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

    // A delivery replayed: answered, no job.
    let (status, body) = drover.post(&path, &[], &pushed(3))?;
    assert_eq!(
        (status, &body["status"]),
        (200, &"duplicate".into()),
        "{body}"
    );

    // The same image pushed again: nothing to do, no restart.
    let version = inspect(&name, "{{.Version.Index}}")?;
    let (status, body) = drover.post(&path, &[], &pushed(6))?;
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
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
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
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
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

/// Replays over a real socket: an accepted request sent again gets 200 and no job, for a
/// token body and for a signed request; a signed request with a stale or missing timestamp
/// is refused 401.
#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn replayed_requests_get_no_job_and_stale_signatures_are_refused() -> Result<()> {
    require_e2e!();
    let drover = Drover::start(
        r#"
  - name: signed
    kind: generic
    secret_file: {token}
    quiet: 1s
    action: update-services
  - name: bearer
    kind: generic
    token_file: {token}
    quiet: 1s
    action: update-services
"#,
        false,
    )?;
    // An image no service runs: every job ends `skipped` without touching anything.
    let image = format!("127.0.0.1:5000/drover-e2e/{}:latest", unique("replay"));
    let body = format!(r#"{{"image":"{image}"}}"#);
    let secret = TOKEN.as_bytes();
    let signed = |ts: i64, body: &str| {
        let ts = ts.to_string();
        let sig = hooks::sign_timestamped(secret, &ts, body.as_bytes());
        drover.post(
            "/hooks/signed",
            &[
                ("X-Drover-Timestamp", ts.as_str()),
                ("X-Drover-Signature", sig.as_str()),
            ],
            body,
        )
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;

    let (status, first) = signed(now, &body)?;
    assert_eq!(status, 202, "{first}");
    let (status, again) = signed(now, &body)?;
    assert_eq!(
        (status, &again["status"]),
        (200, &"duplicate".into()),
        "{again}"
    );
    for ts in [now - 3600, now + 3600] {
        let (status, answer) = signed(ts, &body)?;
        assert_eq!(status, 401, "{answer}");
        assert!(
            answer.to_string().contains("X-Drover-Timestamp"),
            "{answer}"
        );
    }
    let unstamped = hooks::sign(secret, body.as_bytes());
    let (status, _) = drover.post(
        "/hooks/signed",
        &[("X-Drover-Signature", unstamped.as_str())],
        &body,
    )?;
    assert_eq!(status, 401, "a signature without a timestamp is refused");

    let bearer = format!("Bearer {TOKEN}");
    let by_token =
        |body: &str| drover.post("/hooks/bearer", &[("Authorization", bearer.as_str())], body);
    let (status, answer) = by_token(&body)?;
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = by_token(&body)?;
    assert_eq!(
        (status, &answer["status"]),
        (200, &"duplicate".into()),
        "{answer}"
    );
    let (status, answer) = by_token(&format!(r#"{{"image":"{image}","build":"2"}}"#))?;
    assert_eq!(status, 202, "a body naming a new build is new: {answer}");

    let metrics = drover.metrics();
    for (hook, outcome, n) in [
        ("signed", "duplicate", 1.0),
        ("signed", "stale", 3.0),
        ("bearer", "duplicate", 1.0),
    ] {
        assert_eq!(
            metric_value(
                &metrics,
                "drover_webhook_requests_total",
                &[("hook", hook), ("outcome", outcome)]
            ),
            Some(n),
            "{hook} {outcome}: {metrics}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
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
        &format!("label=drover.job={}", drover.journal),
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

/// A GitHub push delivery for `repo` with two commits.
fn github_push(repo: &str) -> String {
    serde_json::json!({
        "ref": "refs/heads/master",
        "repository": {
            "name": repo.rsplit('/').next().unwrap_or(repo),
            "full_name": repo,
            "clone_url": format!("https://github.com/{repo}.git"),
        },
        "sender": { "login": "rycus86" },
        "commits": [
            { "id": "b3d4f1e0c5a1f2e3d4c5b6a7980123456789abcd", "message": "Route it" },
            { "id": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c", "message": "Bump nginx" }
        ],
        "head_commit": { "id": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c", "message": "Bump nginx" }
    })
    .to_string()
}

fn write_secret(dir: &Path, name: &str, secret: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n"))?;
    Ok(path.display().to_string())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn github_delivery_is_checked_against_its_own_repositorys_secret_and_sha1_can_be_switched_off()
-> Result<()> {
    require_e2e!();
    let dir = temp_dir("drover-e2e-gh")?;
    let web = write_secret(dir.path(), "web", "web-secret")?;
    let stacks = write_secret(dir.path(), "stacks", "stacks-secret")?;
    let hooks = format!(
        r#"
  - name: gh
    kind: github
    secrets:
      e2e/home-stack-web: {web}
      "e2e/home-stack-.+": {stacks}
    events: [push]
    allow: {{ sender: rycus86, ref: refs/heads/master }}
    action: {{ command: ["true"] }}
  - name: gh-strict
    kind: github
    secrets:
      e2e/home-stack-web: {web}
    accept_sha1: false
    action: {{ command: ["true"] }}
"#
    );
    let drover = Drover::start(&hooks, false)?;
    let delivery = |n: u32| format!("e2e-delivery-{}-{n}", std::process::id());
    let send = |hook: &str, body: &str, header: &str, sig: &str, n: u32| {
        let id = delivery(n);
        drover.post(
            &format!("/hooks/{hook}"),
            &[
                ("X-GitHub-Event", "push"),
                ("X-GitHub-Delivery", id.as_str()),
                (header, sig),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let web_push = github_push("e2e/home-stack-web");
    let media_push = github_push("e2e/home-stack-media");

    // Each repository's own secret is accepted.
    let sig = hooks::sign(b"web-secret", web_push.as_bytes());
    let (status, body) = send("gh", &web_push, "X-Hub-Signature-256", &sig, 1)?;
    assert_eq!(status, 202, "{body}");
    let job = drover.wait_job(
        body["job"].as_str().context("job id")?,
        Duration::from_secs(60),
    )?;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["facts"]["sender"], "rycus86", "{job}");
    assert_eq!(job["facts"]["commits"], 2, "{job}");
    assert_eq!(
        job["facts"]["clone_url"], "https://github.com/e2e/home-stack-web.git",
        "{job}"
    );
    let sig = hooks::sign(b"stacks-secret", media_push.as_bytes());
    let (status, body) = send("gh", &media_push, "X-Hub-Signature-256", &sig, 2)?;
    assert_eq!(status, 202, "{body}");

    // Another repository's secret is not: 401, whichever way round.
    let sig = hooks::sign(b"stacks-secret", web_push.as_bytes());
    let (status, _) = send("gh", &web_push, "X-Hub-Signature-256", &sig, 3)?;
    assert_eq!(status, 401, "web signed with the stacks secret");
    let sig = hooks::sign(b"web-secret", media_push.as_bytes());
    let (status, _) = send("gh", &media_push, "X-Hub-Signature-256", &sig, 4)?;
    assert_eq!(status, 401, "media signed with the web secret");
    let unknown = github_push("someone/else");
    let sig = hooks::sign(b"web-secret", unknown.as_bytes());
    let (status, _) = send("gh", &unknown, "X-Hub-Signature-256", &sig, 5)?;
    assert_eq!(status, 401, "a repository without a secret");

    // Legacy sha1 alone: accepted, unless the hook switched it off. A new push (the same
    // body under a new delivery id is a replay).
    let web_push = web_push.replace("Bump nginx", "Bump nginx again");
    let sha1 = hooks::sign_sha1(b"web-secret", web_push.as_bytes());
    let (status, body) = send("gh", &web_push, "X-Hub-Signature", &sha1, 6)?;
    assert_eq!(status, 202, "{body}");
    let (status, _) = send("gh-strict", &web_push, "X-Hub-Signature", &sha1, 7)?;
    assert_eq!(status, 401, "sha1 refused where accept_sha1 is false");
    let sig = hooks::sign(b"web-secret", web_push.as_bytes());
    let (status, body) = send("gh-strict", &web_push, "X-Hub-Signature-256", &sig, 8)?;
    assert_eq!(status, 202, "{body}");

    let metrics = drover.metrics();
    assert!(
        metric_value(
            &metrics,
            "drover_webhook_signature_failures_total",
            &[("hook", "gh")]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{metrics}"
    );
    Ok(())
}

/// Builds `FROM` the busybox test image plus Debian's docker CLI (`/usr/bin/docker` of the
/// docker.io package) and the libraries `ldd` lists; the image is only local.
fn build_deploy_image(tag: &str) -> Result<()> {
    let dir = temp_dir("drover-e2e-deploy-image")?;
    let rootfs = dir.path().join("rootfs");
    let cli = Path::new("/usr/bin/docker");
    ensure!(
        cli.exists(),
        "/usr/bin/docker missing: this test copies Debian's docker CLI into its deploy image; \
         it comes with Debian's docker.io (the Docker Engine package preinstalled on CI \
         machines), so install docker.io (`apt-get install docker.io`)"
    );
    let mut files = vec![cli.to_path_buf()];
    let ldd = std::process::Command::new("ldd").arg(cli).output()?;
    for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
        if word.starts_with('/') && Path::new(word).exists() {
            files.push(Path::new(word).to_path_buf());
        }
    }
    for f in files {
        let to = rootfs.join(f.strip_prefix("/")?);
        std::fs::create_dir_all(to.parent().context("parent")?)?;
        std::fs::copy(std::fs::canonicalize(&f)?, &to)?;
    }
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM {}\nCOPY rootfs/ /\nENV PATH=/usr/bin:/bin\n",
            busybox_image()
        ),
    )?;
    let out = std::process::Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", tag, &dir.path().display().to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn container_action_deploys_a_stack_and_a_failing_script_fails_the_job() -> Result<()> {
    require_e2e!();
    let stack = unique("stk");
    let image = format!("127.0.0.1:5000/drover-e2e/{}:local", unique("deploy"));
    build_deploy_image(&image)?;
    // Declared before the service so they are dropped after it.
    let _network = Resource::adopt(Kind::Network, format!("{stack}_default"));
    let _service = Resource::adopt(Kind::Service, format!("{stack}_app"));

    let dir = temp_dir("drover-e2e-stack")?;
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work)?;
    std::fs::write(
        work.join("stack.yml"),
        format!(
            "version: '3.7'\nservices:\n  app:\n    image: {}\n    deploy: {{ replicas: 1 }}\n",
            busybox_image()
        ),
    )?;
    std::fs::write(
        work.join("deploy.sh"),
        "set -e\necho \"deploying $DROVER_REPOSITORY ($DROVER_COMMITS commits) from $DROVER_CLONE_URL\"\ndocker stack deploy -c /work/stack.yml \"$STACK\"\necho deployed\n",
    )?;
    std::fs::write(
        work.join("fail.sh"),
        "echo about to fail\necho on stderr >&2\nexit 3\n",
    )?;
    let secret = write_secret(dir.path(), "secret", "deploy-secret")?;
    let container = |name: &str, script: &str| {
        format!(
            r#"
  - name: {name}
    kind: github
    secret_file: {secret}
    allow: {{ repository: "e2e/home-stack-.+" }}
    action:
      container:
        image: {image}
        command: ["/bin/sh", "/work/{script}"]
        env: {{ STACK: {stack} }}
        mounts: ["/var/run/docker.sock:/var/run/docker.sock", "{work}:/work:ro"]
        working_dir: /work
        timeout: 120s
"#,
            work = work.display()
        )
    };
    let drover = Drover::start(
        &format!(
            "{}{}",
            container("deploy", "deploy.sh"),
            container("broken", "fail.sh")
        ),
        false,
    )?;
    let push = github_push("e2e/home-stack-web");
    let sig = hooks::sign(b"deploy-secret", push.as_bytes());
    let send = |hook: &str, n: u32| {
        drover.post(
            &format!("/hooks/{hook}"),
            &[
                ("X-GitHub-Event", "push"),
                ("X-GitHub-Delivery", &format!("{stack}-{n}")),
                ("X-Hub-Signature-256", &sig),
            ],
            &push,
        )
    };

    let (status, body) = send("deploy", 1)?;
    assert_eq!(status, 202, "{body}");
    let id = body["job"].as_str().context("job id")?.to_owned();
    let job = drover.wait_job(&id, Duration::from_secs(180))?;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["exit_code"], 0, "{job}");
    let tail = job["log_tail"].as_str().unwrap_or_default();
    assert!(
        tail.contains("deploying e2e/home-stack-web (2 commits) from https://github.com/e2e/home-stack-web.git"),
        "{job}"
    );
    assert!(
        tail.contains(&format!("Creating service {stack}_app")),
        "{job}"
    );
    assert!(tail.ends_with("deployed"), "{job}");
    wait_running(&format!("{stack}_app"), 1, Duration::from_secs(90))?;
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=drover.job.id={id}"),
    ])?;
    assert!(
        left.is_empty(),
        "the action's container was not removed: {left}"
    );

    let (status, body) = send("broken", 2)?;
    assert_eq!(status, 202, "{body}");
    let id = body["job"].as_str().context("job id")?.to_owned();
    let job = drover.wait_job(&id, Duration::from_secs(120))?;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["exit_code"], 3, "{job}");
    assert_eq!(job["message"], "exit code 3", "{job}");
    let tail = job["log_tail"].as_str().unwrap_or_default();
    assert!(
        tail.contains("about to fail") && tail.contains("on stderr"),
        "{job}"
    );
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=drover.job.id={id}"),
    ])?;
    assert!(
        left.is_empty(),
        "the action's container was not removed: {left}"
    );

    let _ = docker(&["stack", "rm", &stack]);
    let _ = docker(&["image", "rm", "-f", &image]);
    Ok(())
}
