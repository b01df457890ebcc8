//! Stacks from git end to end: a real git server (smart HTTP through nginx and
//! `git http-backend`, basic auth, started by `scripts/test`), real `git push`es whose
//! `post-receive` hook sends the signed GitHub push payload to drover, drover running
//! `drover stack-deploy` in the deploy image (built from local binaries by `scripts/test`)
//! against the real Swarm.
//!
//! Environment from `scripts/test env`: `DROVER_TEST_DEPLOY_IMAGE`, `DROVER_TEST_GIT_URL`,
//! `DROVER_TEST_GIT_ROOT`, `DROVER_TEST_GIT_TOKEN_FILE`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::stacks::*;
use support::*;

/// The stack file: one service reading its config (a file in the repository).
fn compose(image: &str, network: &str) -> String {
    format!(
        r#"version: "3.8"
services:
  app:
    image: {image}
    command: ["sleep", "3600"]
    networks: [net]
    configs:
      - source: app_conf
        target: /conf/app.txt
    deploy:
      update_config: {{ order: start-first, monitor: 1s }}
configs:
  app_conf:
    file: ./conf/app.txt
networks:
  net:
    external: true
    name: {network}
"#
    )
}

/// Removes the stack and every rotated object of it on drop.
struct StackGuard(String);

impl Drop for StackGuard {
    fn drop(&mut self) {
        let _ = docker(&["stack", "rm", &self.0]);
        std::thread::sleep(Duration::from_secs(2));
        if let Ok(names) = docker(&[
            "config",
            "ls",
            "-q",
            "--filter",
            &format!("label=drover.stack={}", self.0),
        ]) {
            for id in names.split_whitespace() {
                let _ = docker(&["config", "rm", id]);
            }
        }
        // The deployed-commit records (`stacks::record`).
        if let Ok(names) = docker(&[
            "config",
            "ls",
            "-q",
            "--filter",
            &format!("label=drover.stack.deployed={}", self.0),
        ]) {
            for id in names.split_whitespace() {
                let _ = docker(&["config", "rm", id]);
            }
        }
    }
}

fn jobs(drover: &DroverProcess) -> Vec<serde_json::Value> {
    drover
        .get("/jobs")
        .ok()
        .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
        .and_then(|v| v["jobs"].as_array().cloned())
        .unwrap_or_default()
}

/// Waits for a finished stack job whose message names `commit`, or a failed one.
fn wait_deployed(
    drover: &DroverProcess,
    commit: &str,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let mut found = serde_json::Value::Null;
    let done = wait_until(timeout, Duration::from_millis(300), || {
        found = jobs(drover)
            .into_iter()
            .find(|j| {
                let msg = j["message"].as_str().unwrap_or_default();
                msg.contains(commit) && j["state"] != "queued" && j["state"] != "running"
            })
            .unwrap_or(serde_json::Value::Null);
        !found.is_null()
    });
    ensure!(
        done,
        "no finished job deployed {commit}; jobs: {:?}\nlog:\n{}",
        jobs(drover),
        drover.logs()
    );
    Ok(found)
}

/// What the stack's running task reads from its config.
fn served(service: &str) -> Result<String> {
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.swarm.service.name={service}"),
    ])?;
    let mut out = Vec::new();
    for id in ids.split_whitespace() {
        if let Ok(text) = docker(&["exec", id, "cat", "/conf/app.txt"]) {
            out.push(text.trim().to_owned());
        }
    }
    out.sort();
    out.dedup();
    Ok(out.join(","))
}

fn service_config(service: &str) -> Result<String> {
    docker(&[
        "service",
        "inspect",
        "--format",
        "{{range .Spec.TaskTemplate.ContainerSpec.Configs}}{{.ConfigName}}{{end}}",
        service,
    ])
    .map(|s| s.trim().to_owned())
}

fn config_exists(name: &str) -> bool {
    docker(&["config", "inspect", name]).is_ok()
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_signed_push_deploys_its_commit_rotates_configs_ends_at_the_newest_push_and_survives_a_broken_file()
-> Result<()> {
    require_e2e!();
    let stack = unique("stk");
    let network = unique("stknet");
    // Dropped in reverse order: the stack first, then its network.
    let _net = Resource::adopt(Kind::Network, network.clone());
    let _guard = StackGuard(stack.clone());
    let http = format!("127.0.0.1:{}", free_port());
    let hook_url = format!("http://{http}/hooks/gh");
    let repo = Repo::create(&stack, &hook_url)?;
    let dir = temp_dir("drover-e2e-stack")?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET)?;
    // The git server's user and token, in the `USER:TOKEN` form of token_file.
    let token = dir.path().join("token");
    let raw = std::fs::read_to_string(env("DROVER_TEST_GIT_TOKEN_FILE")?)?;
    std::fs::write(&token, format!("drover:{}", raw.trim()))?;
    let config = format!(
        r#"http: {{ listen: {http} }}
jobs: {{ update_timeout: 120s }}
hooks:
  - name: gh
    kind: github
    secret_file: {secret}
    quiet: 0s
    action: sync-stacks
stacks:
  - name: {stack}
    repository: {url}
    compose: stack.yml
    token_file: {token}
    keep_configs: 0
    hook: gh
    image: {image}
    timeout: 3m
"#,
        secret = secret.display(),
        url = repo.url,
        token = token.display(),
        image = env("DROVER_TEST_DEPLOY_IMAGE")?,
    );
    let mut drover = DroverProcess::start(&config, Some(&http))?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let service = format!("{stack}_app");
    let file = compose(&busybox_image(), &network);

    // v1: the network is created, the stack deployed at that commit.
    let c1 = repo.push(&[("stack.yml", &file), ("conf/app.txt", "v1\n")], "v1")?;
    let job = wait_deployed(&drover, &c1, Duration::from_secs(180))?;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["facts"]["repository"], repo.full_name.as_str(), "{job}");
    let v1 = service_config(&service)?;
    assert!(v1.starts_with(&format!("{stack}_app_conf-")), "{v1}");
    wait_for("v1 served", Duration::from_secs(60), || {
        served(&service).is_ok_and(|s| s == "v1")
    })?;

    // v2: a new content name, followed to the end, and v1 pruned after the rollout.
    let c2 = repo.push(&[("conf/app.txt", "v2\n")], "v2")?;
    let job = wait_deployed(&drover, &c2, Duration::from_secs(180))?;
    assert_eq!(job["state"], "completed", "{job}");
    let v2 = service_config(&service)?;
    assert_ne!(v1, v2);
    assert!(
        job["message"].as_str().unwrap_or_default().contains(&v2),
        "{job}"
    );
    wait_for("v2 served", Duration::from_secs(30), || {
        served(&service).is_ok_and(|s| s == "v2")
    })?;
    assert!(
        !config_exists(&v1),
        "{v1} is pruned after the rollout: {job}"
    );
    assert!(
        job["services"].as_array().is_some_and(|s| s
            .iter()
            .any(|r| r["service"] == service.as_str() && r["outcome"] == "completed")),
        "{job}"
    );

    // Two pushes within 2 s: the stack ends at the last one, and no job deploys the
    // earlier one after it.
    let c3 = repo.push(&[("conf/app.txt", "v3\n")], "v3")?;
    let c4 = repo.push(&[("conf/app.txt", "v4\n")], "v4")?;
    let job = wait_deployed(&drover, &c4, Duration::from_secs(240))?;
    assert_eq!(job["state"], "completed", "{job}");
    wait_for("v4 served", Duration::from_secs(30), || {
        served(&service).is_ok_and(|s| s == "v4")
    })?;
    let finished: Vec<serde_json::Value> = jobs(&drover);
    let at = |c: &str| {
        finished
            .iter()
            .filter(|j| j["message"].as_str().unwrap_or_default().contains(c))
            .filter_map(|j| j["finished_at"].as_u64())
            .max()
    };
    if let (Some(t3), Some(t4)) = (at(&c3), at(&c4)) {
        assert!(t3 <= t4, "v3 deployed after v4: {finished:?}");
    }

    // A broken compose file: the job fails with the CLI's own message, v4 keeps running.
    let c5 = repo.push(
        &[("stack.yml", "services:\n  app: [not, a, mapping]\n")],
        "broken",
    )?;
    let failed = wait_until(Duration::from_secs(180), Duration::from_millis(300), || {
        jobs(&drover).iter().any(|j| {
            j["state"] == "failed" && j["log_tail"].as_str().unwrap_or_default().contains(&c5)
        })
    });
    let list = jobs(&drover);
    ensure!(failed, "no failed job for the broken file: {list:?}");
    let job = list
        .iter()
        .find(|j| j["state"] == "failed")
        .context("failed job")?;
    let message = job["message"].as_str().unwrap_or_default();
    assert!(message.contains("docker stack config"), "{job}");
    assert_eq!(served(&service)?, "v4");
    assert_eq!(service_config(&service)?.len(), v2.len());

    for j in &list {
        eprintln!("job {} {}: {}", j["id"], j["state"], j["message"]);
    }
    // Nothing of the token reached the jobs.
    let all = serde_json::to_string(&list)?;
    assert!(!all.contains(raw.trim()), "the git token leaked into /jobs");
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_polled_stack_deploys_a_push_without_a_webhook_and_an_unchanged_branch_starts_nothing()
-> Result<()> {
    require_e2e!();
    let stack = unique("stkpoll");
    let network = unique("stkpollnet");
    let _net = Resource::adopt(Kind::Network, network.clone());
    let _guard = StackGuard(stack.clone());
    // No hook: the post-receive hook's delivery goes nowhere (and fails quietly).
    let repo = Repo::create(&stack, "http://127.0.0.1:9/none")?;
    let dir = temp_dir("drover-e2e-stack-poll")?;
    let token = dir.path().join("token");
    let raw = std::fs::read_to_string(env("DROVER_TEST_GIT_TOKEN_FILE")?)?;
    std::fs::write(&token, format!("drover:{}", raw.trim()))?;
    let c1 = repo.push(
        &[
            ("stack.yml", &compose(&busybox_image(), &network)),
            ("conf/app.txt", "p1\n"),
        ],
        "p1",
    )?;
    let config = format!(
        r#"http: {{ listen: 127.0.0.1:{port} }}
jobs: {{ update_timeout: 120s }}
stacks:
  - name: {stack}
    repository: {url}
    compose: stack.yml
    token_file: {token}
    poll: 10s
    image: {image}
"#,
        url = repo.url,
        token = token.display(),
        image = env("DROVER_TEST_DEPLOY_IMAGE")?,
        port = free_port(),
    );
    let mut drover = DroverProcess::start(&config, None)?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let service = format!("{stack}_app");
    let job = wait_deployed(&drover, &c1, Duration::from_secs(120))?;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["hook"], "stack-poll", "{job}");
    wait_for("p1 served", Duration::from_secs(60), || {
        served(&service).is_ok_and(|s| s == "p1")
    })?;

    // Two more polls of an unchanged branch (counted in drover's log, however long they
    // take): no job, so no deploy container.
    let before = jobs(&drover).len();
    let unchanged = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains("branch head unchanged") && l.contains(stack.as_str()))
            .count()
    };
    let polls = unchanged(&drover.logs());
    wait_for(
        "two more polls of the unchanged branch",
        Duration::from_secs(60),
        || unchanged(&drover.logs()) >= polls + 2,
    )?;
    assert_eq!(jobs(&drover).len(), before, "{:?}", jobs(&drover));
    let page = drover.get("/")?.body;
    assert!(
        page.contains(&format!(r#"data-name="{stack}" data-ahead="false""#)),
        "{page}"
    );

    // A manual sync of an unchanged stack is a job that deploys nothing.
    let answer = http_post(&drover.ops, &format!("/stacks/{stack}/sync"), &[], b"")?;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = serde_json::from_str::<serde_json::Value>(&answer.body)?["job"]
        .as_str()
        .context("job id")?
        .to_owned();
    wait_for("the manual sync", Duration::from_secs(30), || {
        jobs(&drover)
            .iter()
            .any(|j| j["id"] == id.as_str() && j["state"] == "skipped")
    })?;

    // A push is deployed by the next poll.
    let c2 = repo.push(&[("conf/app.txt", "p2\n")], "p2")?;
    let job = wait_deployed(&drover, &c2, Duration::from_secs(120))?;
    assert_eq!(job["state"], "completed", "{job}");
    wait_for("p2 served", Duration::from_secs(60), || {
        served(&service).is_ok_and(|s| s == "p2")
    })?;
    let metrics = drover.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "drover_stack_deploys_total",
            &[("stack", stack.as_str()), ("outcome", "completed")]
        ),
        Some(2.0),
        "{metrics}"
    );
    Ok(())
}

/// A stack file whose service checks its health with `health` (`true` or `false`).
fn compose_with_health(image: &str, network: &str, health: &str) -> String {
    format!(
        r#"version: "3.8"
services:
  app:
    image: {image}
    command: ["sleep", "3600"]
    networks: [net]
    healthcheck:
      test: ["CMD", "{health}"]
      interval: 1s
      timeout: 1s
      retries: 1
    deploy:
      update_config: {{ order: start-first, monitor: 5s, failure_action: rollback }}
      rollback_config: {{ order: start-first }}
networks:
  net:
    external: true
    name: {network}
"#
    )
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_push_whose_service_never_becomes_healthy_is_rolled_back_and_fails_the_job() -> Result<()> {
    require_e2e!();
    let stack = unique("stkrb");
    let network = unique("stkrbnet");
    let _net = Resource::adopt(Kind::Network, network.clone());
    let _guard = StackGuard(stack.clone());
    let http = format!("127.0.0.1:{}", free_port());
    let repo = Repo::create(&stack, &format!("http://{http}/hooks/gh"))?;
    let dir = temp_dir("drover-e2e-stack-rb")?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET)?;
    let token = dir.path().join("token");
    let raw = std::fs::read_to_string(env("DROVER_TEST_GIT_TOKEN_FILE")?)?;
    std::fs::write(&token, format!("drover:{}", raw.trim()))?;
    let config = format!(
        r#"http: {{ listen: {http} }}
jobs: {{ update_timeout: 120s }}
hooks:
  - name: gh
    kind: github
    secret_file: {secret}
    quiet: 0s
    action: sync-stacks
stacks:
  - name: {stack}
    repository: {url}
    compose: stack.yml
    token_file: {token}
    hook: gh
    image: {image}
"#,
        secret = secret.display(),
        url = repo.url,
        token = token.display(),
        image = env("DROVER_TEST_DEPLOY_IMAGE")?,
    );
    let mut drover = DroverProcess::start(&config, Some(&http))?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let service = format!("{stack}_app");
    let image = busybox_image();
    let c1 = repo.push(
        &[("stack.yml", &compose_with_health(&image, &network, "true"))],
        "healthy",
    )?;
    let job = wait_deployed(&drover, &c1, Duration::from_secs(120))?;
    assert_eq!(job["state"], "completed", "{job}");
    let c2 = repo.push(
        &[("stack.yml", &compose_with_health(&image, &network, "false"))],
        "never healthy",
    )?;
    let job = wait_deployed(&drover, &c2, Duration::from_secs(180))?;
    assert_eq!(job["state"], "failed", "{job}");
    let rolled_back = job["services"].as_array().is_some_and(|s| {
        s.iter()
            .any(|r| r["service"] == service.as_str() && r["outcome"] == "rolled_back")
    });
    assert!(rolled_back, "{job}");
    let health = docker(&[
        "service",
        "inspect",
        "--format",
        "{{json .Spec.TaskTemplate.ContainerSpec.Healthcheck.Test}}",
        &service,
    ])?;
    assert!(health.contains("true"), "Swarm rolled back to v1: {health}");
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_git_crypt_secret_reaches_the_service_decrypted_and_never_the_job_or_the_log() -> Result<()> {
    require_e2e!();
    let stack = unique("stkcrypt");
    let network = unique("stkcryptnet");
    let _net = Resource::adopt(Kind::Network, network.clone());
    let _guard = StackGuard(stack.clone());
    let repo = Repo::create(&stack, "http://127.0.0.1:9/none")?;
    let dir = temp_dir("drover-e2e-stack-crypt")?;
    let token = dir.path().join("token");
    let raw = std::fs::read_to_string(env("DROVER_TEST_GIT_TOKEN_FILE")?)?;
    std::fs::write(&token, format!("drover:{}", raw.trim()))?;
    let key = dir.path().join("git-crypt-key");
    let plaintext = format!("decrypted-{}", unique("s"));
    let work = repo.work.path();
    let crypt = |args: &[&str]| -> Result<()> {
        let ok = Command::new("git-crypt")
            .args(args)
            .current_dir(work)
            .status()
            .context("run git-crypt")?
            .success();
        ensure!(ok, "git-crypt {args:?}");
        Ok(())
    };
    crypt(&["init"])?;
    crypt(&["export-key", &key.display().to_string()])?;
    let file = format!(
        r#"version: "3.8"
services:
  app:
    image: {image}
    command: ["sleep", "3600"]
    networks: [net]
    secrets: [{{ source: token, target: token }}]
secrets:
  token:
    file: ./secret.txt
networks:
  net:
    external: true
    name: {network}
"#,
        image = busybox_image()
    );
    let commit = repo.push(
        &[
            (
                ".gitattributes",
                "secret.txt filter=git-crypt diff=git-crypt\n",
            ),
            ("secret.txt", &plaintext),
            ("stack.yml", &file),
        ],
        "encrypted secret",
    )?;
    let stored = git(&repo.bare, &["show", &format!("{commit}:secret.txt")]).unwrap_or_default();
    ensure!(
        !stored.contains(&plaintext),
        "the repository holds the secret encrypted"
    );
    let config = format!(
        r#"http: {{ listen: 127.0.0.1:{port} }}
jobs: {{ update_timeout: 120s }}
stacks:
  - name: {stack}
    repository: {url}
    compose: stack.yml
    token_file: {token}
    git_crypt_key_file: {key}
    image: {image}
"#,
        url = repo.url,
        token = token.display(),
        key = key.display(),
        image = env("DROVER_TEST_DEPLOY_IMAGE")?,
        port = free_port(),
    );
    let mut drover = DroverProcess::start(&config, None)?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let answer = http_post(&drover.ops, &format!("/stacks/{stack}/sync"), &[], b"")?;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let job = wait_deployed(&drover, &commit, Duration::from_secs(120))?;
    assert_eq!(job["state"], "completed", "{job}");
    let service = format!("{stack}_app");
    wait_for(
        "the decrypted secret in the task",
        Duration::from_secs(60),
        || {
            let ids = docker(&[
                "ps",
                "-q",
                "--filter",
                &format!("label=com.docker.swarm.service.name={service}"),
            ])
            .unwrap_or_default();
            ids.split_whitespace().any(|id| {
                docker(&["exec", id, "cat", "/run/secrets/token"])
                    .is_ok_and(|s| s.trim() == plaintext)
            })
        },
    )?;
    let everything = format!(
        "{}\n{}\n{}",
        serde_json::to_string(&jobs(&drover))?,
        drover.get("/")?.body,
        drover.logs()
    );
    assert!(
        !everything.contains(&plaintext),
        "a decrypted byte reached /jobs, the status page or the log"
    );
    assert!(!everything.contains(raw.trim()), "the git token leaked");
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_signed_gitea_push_deploys_its_commit_and_after_a_restart_an_unchanged_branch_starts_nothing()
-> Result<()> {
    require_e2e!();
    let stack = unique("stktea");
    let network = unique("stkteanet");
    let _net = Resource::adopt(Kind::Network, network.clone());
    let _guard = StackGuard(stack.clone());
    let http = format!("127.0.0.1:{}", free_port());
    let repo = Repo::create_for(
        Forge::Gitea,
        "lab",
        &stack,
        SECRET,
        &format!("http://{http}/hooks/tea"),
    )?;
    let dir = temp_dir("drover-e2e-stack-tea")?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET)?;
    let token = dir.path().join("token");
    let raw = std::fs::read_to_string(env("DROVER_TEST_GIT_TOKEN_FILE")?)?;
    std::fs::write(&token, format!("drover:{}", raw.trim()))?;
    let config = format!(
        r#"http: {{ listen: {http} }}
jobs: {{ update_timeout: 120s }}
hooks:
  - name: tea
    kind: gitea
    secret_file: {secret}
    quiet: 0s
    allow: {{ repository: "lab/stktea.*" }}
    action: sync-stacks
stacks:
  - name: {stack}
    repository: {url}
    compose: stack.yml
    token_file: {token}
    hook: tea
    poll: 10s
    image: {image}
"#,
        secret = secret.display(),
        url = repo.url,
        token = token.display(),
        image = env("DROVER_TEST_DEPLOY_IMAGE")?,
    );
    let mut drover = DroverProcess::start(&config, Some(&http))?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let service = format!("{stack}_app");

    // A push: Gitea's signed delivery deploys that commit, and the job names the push.
    let c1 = repo.push(
        &[
            ("stack.yml", &compose(&busybox_image(), &network)),
            ("conf/app.txt", "t1\n"),
        ],
        "t1",
    )?;
    let job = wait_deployed(&drover, &c1, Duration::from_secs(180))?;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["hook"], "tea", "{job}");
    assert_eq!(job["facts"]["after"], c1.as_str(), "{job}");
    assert_eq!(job["facts"]["repository"], repo.full_name.as_str(), "{job}");
    wait_for("t1 served", Duration::from_secs(60), || {
        served(&service).is_ok_and(|s| s == "t1")
    })?;

    // A delivery with a wrong signature: 401, and no job.
    let before = jobs(&drover).len();
    let body = format!(
        r#"{{"ref":"refs/heads/main","after":"{}","repository":{{"full_name":"{}"}}}}"#,
        "f".repeat(40),
        repo.full_name
    );
    let zeros = "0".repeat(64);
    let forged = http_post(
        &http,
        "/hooks/tea",
        &[("X-Gitea-Event", "push"), ("X-Gitea-Signature", &zeros)],
        body.as_bytes(),
    )?;
    assert_eq!(forged.status, 401, "{}", forged.body);
    assert_eq!(jobs(&drover).len(), before);

    // drover restarts: the deployed commit is read back from Swarm, so the polls of the
    // unchanged branch queue no job (and so start no deploy container).
    drover.signal("TERM")?;
    drover.wait_exit(Duration::from_secs(30))?;
    let mut drover = DroverProcess::start(&config, Some(&http))?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let unchanged = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains("branch head unchanged") && l.contains(stack.as_str()))
            .count()
    };
    wait_for(
        "two polls of the unchanged branch after the restart",
        Duration::from_secs(60),
        || unchanged(&drover.logs()) >= 2,
    )?;
    assert!(jobs(&drover).is_empty(), "{:?}", jobs(&drover));
    let page = drover.get("/")?.body;
    assert!(
        page.contains(&format!(r#"data-name="{stack}" data-ahead="false""#)),
        "{page}"
    );
    assert!(
        page.contains(&c1[..12]),
        "the status page shows the deployed commit: {page}"
    );

    // A push after the restart is deployed.
    let c2 = repo.push(&[("conf/app.txt", "t2\n")], "t2")?;
    let job = wait_deployed(&drover, &c2, Duration::from_secs(180))?;
    assert_eq!(job["state"], "completed", "{job}");
    wait_for("t2 served", Duration::from_secs(60), || {
        served(&service).is_ok_and(|s| s == "t2")
    })?;
    Ok(())
}

/// socat terminating TLS (the test CA's certificate for 127.0.0.1) in front of the test
/// git server; killed on drop.
struct TlsGit(std::process::Child);

impl TlsGit {
    fn start(dir: &Path, port: u16) -> Result<TlsGit> {
        tls_ca_and_leaf(dir, "127.0.0.1")?;
        let git = env("DROVER_TEST_GIT_URL")?;
        let upstream = git.trim_start_matches("http://").trim_end_matches('/');
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                dir.join("relay.pem").display(),
                dir.join("relay.key").display()
            ))
            .arg(format!("TCP:{upstream}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("socat")?;
        let relay = TlsGit(child);
        let ca = dir.join("ca.pem");
        wait_for("the TLS git relay", Duration::from_secs(15), || {
            Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "--max-time", "3", "--cacert"])
                .arg(&ca)
                .arg(format!("https://127.0.0.1:{port}/healthz"))
                .status()
                .is_ok_and(|s| s.success())
        })?;
        Ok(relay)
    }
}

impl Drop for TlsGit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn an_https_poll_of_an_unchanged_branch_starts_nothing_and_sees_a_push() -> Result<()> {
    require_e2e!();
    let stack = unique("stktls");
    let network = unique("stktlsnet");
    let _net = Resource::adopt(Kind::Network, network.clone());
    let _guard = StackGuard(stack.clone());
    let repo = Repo::create(&stack, "http://127.0.0.1:9/none")?;
    let dir = temp_dir("drover-e2e-stack-tls")?;
    let token = dir.path().join("token");
    let raw = std::fs::read_to_string(env("DROVER_TEST_GIT_TOKEN_FILE")?)?;
    std::fs::write(&token, format!("drover:{}", raw.trim()))?;
    let c1 = repo.push(
        &[
            ("stack.yml", &compose(&busybox_image(), &network)),
            ("conf/app.txt", "s1\n"),
        ],
        "s1",
    )?;
    let stack_config = |url: &str, poll: &str| {
        format!(
            r#"http: {{ listen: 127.0.0.1:{port} }}
jobs: {{ update_timeout: 120s }}
stacks:
  - name: {stack}
    repository: {url}
    compose: stack.yml
    token_file: {token}
{poll}    image: {image}
"#,
            port = free_port(),
            token = token.display(),
            image = env("DROVER_TEST_DEPLOY_IMAGE").unwrap_or_default(),
        )
    };
    // Deployed once over plain http (the deploy container trusts only public CAs).
    let mut drover = DroverProcess::start(&stack_config(&repo.url, ""), None)?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let answer = http_post(&drover.ops, &format!("/stacks/{stack}/sync"), &[], b"")?;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let job = wait_deployed(&drover, &c1, Duration::from_secs(120))?;
    assert_eq!(job["state"], "completed", "{job}");
    drover.signal("TERM")?;
    drover.wait_exit(Duration::from_secs(30))?;

    // The same stack polled over https (drover trusting the test CA through
    // SSL_CERT_FILE): one info/refs lookup per poll finds the deployed commit, so no job.
    let port = free_port();
    let _tls = TlsGit::start(dir.path(), port)?;
    let https = repo.url.replacen(
        &env("DROVER_TEST_GIT_URL")?,
        &format!("https://127.0.0.1:{port}"),
        1,
    );
    assert!(https.starts_with("https://"), "{https}");
    let ca = dir.path().join("ca.pem").display().to_string();
    let mut drover = DroverProcess::start_with_env(
        &stack_config(&https, "    poll: 10s\n"),
        None,
        &[],
        &[("SSL_CERT_FILE", &ca)],
    )?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let unchanged = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains("branch head unchanged") && l.contains(stack.as_str()))
            .count()
    };
    wait_for(
        "two https polls of the unchanged branch",
        Duration::from_secs(60),
        || unchanged(&drover.logs()) >= 2,
    )?;
    assert!(jobs(&drover).is_empty(), "{:?}", jobs(&drover));

    // A push: the next https lookup sees the new head and queues a sync.
    let c2 = repo.push(&[("conf/app.txt", "s2\n")], "s2")?;
    wait_for(
        "a sync queued by the https poll",
        Duration::from_secs(60),
        || jobs(&drover).iter().any(|j| j["hook"] == "stack-poll"),
    )?;
    let page = drover.get("/")?.body;
    assert!(
        page.contains(&c2[..12]),
        "the status page shows the branch head the https lookup read: {page}"
    );
    let all = serde_json::to_string(&jobs(&drover))?;
    assert!(!all.contains(raw.trim()), "the git token leaked into /jobs");
    Ok(())
}

/// Debian's sshd on `127.0.0.1:port` (its own host key, config and pid file in `dir`),
/// letting in the holder of `deploy_key` as the test's user; killed on drop.
struct Sshd(std::process::Child);

impl Sshd {
    /// Starts sshd and returns it with the `known_hosts` line of its host key.
    fn start(dir: &Path, port: u16, deploy_key: &Path) -> Result<(Sshd, String)> {
        let keygen = |file: &Path| -> Result<()> {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(file)
                .status()
                .context("ssh-keygen")?
                .success();
            ensure!(ok, "ssh-keygen {}", file.display());
            Ok(())
        };
        let host_key = dir.join("host_key");
        keygen(&host_key)?;
        keygen(deploy_key)?;
        std::fs::copy(
            deploy_key.with_extension("pub"),
            dir.join("authorized_keys"),
        )?;
        std::fs::create_dir_all("/run/sshd")?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {pid}\n\
                 AuthorizedKeysFile {keys}\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 StrictModes no\nUsePAM no\n",
                host = host_key.display(),
                pid = dir.join("sshd.pid").display(),
                keys = dir.join("authorized_keys").display(),
            ),
        )?;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log"))?)
            .spawn()
            .context("sshd (scripts/test installs openssh-server)")?;
        let sshd = Sshd(child);
        wait_for("sshd", Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        let public = std::fs::read_to_string(host_key.with_extension("pub"))?;
        let mut fields = public.split_whitespace();
        let (kind, key) = (
            fields.next().context("host key type")?,
            fields.next().context("host key")?,
        );
        Ok((sshd, format!("[127.0.0.1]:{port} {kind} {key}\n")))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_signed_push_deploys_a_stack_from_an_ssh_repository_with_a_deploy_key() -> Result<()> {
    require_e2e!();
    let stack = unique("stkssh");
    let network = unique("stksshnet");
    let _net = Resource::adopt(Kind::Network, network.clone());
    let _guard = StackGuard(stack.clone());
    let http = format!("127.0.0.1:{}", free_port());
    let repo = Repo::create(&stack, &format!("http://{http}/hooks/gh"))?;
    let dir = temp_dir("drover-e2e-stack-ssh")?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET)?;
    let key = dir.path().join("deploy_key");
    let port = free_port();
    let (_sshd, known) = Sshd::start(dir.path(), port, &key)?;
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, known)?;
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let url = format!("ssh://{user}@127.0.0.1:{port}{}", repo.bare.display());
    let config = format!(
        r#"http: {{ listen: {http} }}
jobs: {{ update_timeout: 120s }}
hooks:
  - name: gh
    kind: github
    secret_file: {secret}
    quiet: 0s
    action: sync-stacks
stacks:
  - name: {stack}
    repository: {url}
    compose: stack.yml
    ssh_key_file: {key}
    known_hosts_file: {known_hosts}
    hook: gh
    image: {image}
"#,
        secret = secret.display(),
        key = key.display(),
        known_hosts = known_hosts.display(),
        image = env("DROVER_TEST_DEPLOY_IMAGE")?,
    );
    let mut drover = DroverProcess::start(&config, Some(&http))?;
    drover.wait_http_ok("/healthz", Duration::from_secs(20))?;
    let service = format!("{stack}_app");
    let c1 = repo.push(
        &[
            ("stack.yml", &compose(&busybox_image(), &network)),
            ("conf/app.txt", "h1\n"),
        ],
        "h1",
    )?;
    let job = wait_deployed(&drover, &c1, Duration::from_secs(180))?;
    assert_eq!(job["state"], "completed", "{job}");
    assert!(
        job["log_tail"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("fetched {url} at {c1}")),
        "{job}"
    );
    wait_for("h1 served", Duration::from_secs(60), || {
        served(&service).is_ok_and(|s| s == "h1")
    })?;
    let c2 = repo.push(&[("conf/app.txt", "h2\n")], "h2")?;
    let job = wait_deployed(&drover, &c2, Duration::from_secs(180))?;
    assert_eq!(job["state"], "completed", "{job}");
    wait_for("h2 served", Duration::from_secs(60), || {
        served(&service).is_ok_and(|s| s == "h2")
    })?;
    let private = std::fs::read_to_string(&key)?;
    let body = private
        .lines()
        .find(|l| !l.starts_with("-----"))
        .unwrap_or_default();
    let everything = format!(
        "{}\n{}",
        serde_json::to_string(&jobs(&drover))?,
        drover.logs()
    );
    assert!(!everything.contains(body), "the deploy key leaked");
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn the_shipped_stack_deploys_a_pushed_stack_repository_and_a_push_of_its_own_config_redeploys_drover_which_reports_the_job_once()
-> Result<()> {
    require_e2e!();
    let w = ShippedStacks::deploy("su", 8480)?;
    let (s, hooks, token, nginx, hello_host) = (&w.s, &w.hooks, &w.token, &w.nginx, &w.hello_host);
    let repo_dir = Path::new(env!("CARGO_MANIFEST_DIR"));

    // The example stack repository, pushed: deployed at that commit, served by nginx.
    let c1 = w.push_example("hello, v1\n")?;
    let jobs = wait_push_finished(s, hooks, token, &c1, Duration::from_secs(180))?;
    ensure!(jobs.len() == 1, "one job for the push: {jobs:?}");
    ensure!(
        jobs[0]["state"] == "completed"
            && jobs[0]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("stack web deployed at {c1}")),
        "{:?}",
        jobs[0]
    );
    let mut body = String::new();
    let served = wait_until(Duration::from_secs(60), Duration::from_millis(300), || {
        body = http_get_host(nginx, hello_host, "/")
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.body)
            .unwrap_or_default();
        body.trim() == "hello, v1"
    });
    ensure!(served, "nginx answers {body:?} for {hello_host}");

    // An edited page, pushed while a client sends 25 requests a second through nginx:
    // the service runs the page's new content-named config, nginx serves v2, and no
    // request fails during the rollout.
    let web_config = || -> Result<String> {
        s.cluster
            .docker(&[
                "service",
                "inspect",
                "--format",
                "{{range .Spec.TaskTemplate.ContainerSpec.Configs}}{{.ConfigName}}{{end}}",
                "web_hello",
            ])
            .map(|c| c.trim().to_owned())
    };
    let v1_config = web_config()?;
    let load = LoadClient::start(nginx, hello_host, "/", 25);
    load.wait_requests(50, Duration::from_secs(30))?;
    let c2 = w.push_example("hello, v2\n")?;
    let jobs = wait_push_finished(s, hooks, token, &c2, Duration::from_secs(180))?;
    ensure!(
        jobs.len() == 1 && jobs[0]["state"] == "completed",
        "the page's push: {jobs:?}"
    );
    let v2 = wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        (0..6).all(|_| {
            http_get_host(nginx, hello_host, "/")
                .is_ok_and(|r| r.status == 200 && r.body.trim() == "hello, v2")
        })
    });
    let (requests, failed, took) = load.finish();
    ensure!(v2, "nginx serves v2 only after the rollout");
    ensure!(
        failed.is_empty(),
        "{} of {requests} requests failed during the rollout: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let rate = requests as f64 / took.as_secs_f64();
    ensure!(rate >= 20.0, "the client sent {rate:.1} requests a second");
    let v2_config = web_config()?;
    ensure!(
        v2_config != v1_config && v2_config.starts_with("web_index-"),
        "the service runs the new version: {v1_config} -> {v2_config}"
    );

    // drover's own stack in its repository: stack.yml, deploy/drover.yml, the secrets.
    let mut own: Vec<(String, String)> = vec![
        (
            "stack.yml".into(),
            std::fs::read_to_string(repo_dir.join("stack.yml"))?,
        ),
        ("deploy/drover.yml".into(), w.config.clone()),
    ];
    for name in [
        "dockerhub-token",
        "github-secret",
        "ci-secret",
        "drover-cluster-key",
        "ops-token",
        "git-token",
    ] {
        own.push((
            format!("deploy/secrets/{name}"),
            std::fs::read_to_string(s.secrets_dir().join(name))?,
        ));
    }
    let push_own = |files: &[(String, String)], message: &str| -> Result<String> {
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        w.home.push(&refs, message)
    };
    let drover_config = || -> Result<String> {
        s.cluster
            .docker(&[
                "service",
                "inspect",
                "--format",
                "{{range .Spec.TaskTemplate.ContainerSpec.Configs}}{{.ConfigName}}{{end}}",
                &s.service("drover"),
            ])
            .map(|c| c.trim().to_owned())
    };
    // Each push changes drover's own service (the first renames its configs and secrets
    // by their content, the second edits its config): drover is restarted by its own
    // deploy, and the instance that comes back reports the job, once.
    let probe = |status: u16| -> bool {
        let ci = s.secret("ci-secret").unwrap_or_default();
        http_post(
            hooks,
            "/hooks/selfcheck",
            &[
                ("X-Drover-Token", ci.as_str()),
                ("Content-Type", "application/json"),
            ],
            br#"{"image": "127.0.0.1:5000/drover-test/none:latest"}"#,
        )
        .is_ok_and(|r| r.status == status)
    };
    ensure!(probe(404), "the hook the push adds does not exist yet");
    let edited = w.config.replace(
        "hooks:\n",
        "hooks:\n  - name: selfcheck\n    kind: generic\n    token_file: /run/secrets/ci-secret\n    action: update-services\n",
    );
    for (round, drover_yml) in [("import", w.config.clone()), ("edit", edited)] {
        own[1].1 = drover_yml;
        let before = drover_config()?;
        let commit = push_own(&own, &format!("drover's own stack: {round}"))?;
        let jobs = wait_push_finished(s, hooks, token, &commit, Duration::from_secs(300))?;
        ensure!(
            jobs.len() == 1,
            "{round}: one job for the push, reported once: {jobs:?}"
        );
        let job = &jobs[0];
        ensure!(
            job["state"] == "completed"
                && job["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(&format!("stack home deployed at {commit}")),
            "{round}: {job}"
        );
        let followed = job["services"].as_array().is_some_and(|svcs| {
            svcs.iter().any(|v| {
                v["service"] == s.service("drover").as_str() && v["outcome"] == "completed"
            })
        });
        ensure!(
            followed,
            "{round}: drover's own rollout followed to its end: {job}"
        );
        let after = drover_config()?;
        ensure!(
            after != before && after.starts_with(&format!("{}_drover-config-", s.name)),
            "{round}: drover runs a content-named config: {before} -> {after}"
        );
    }
    wait_for(
        "the hook the edited config adds to answer",
        Duration::from_secs(30),
        || probe(202),
    )?;
    drop(w);
    Ok(())
}
