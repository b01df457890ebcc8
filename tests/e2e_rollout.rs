//! Rollouts against the real engine: a webhook job (the `update-services` work the job
//! runner executes) and a `notify: restart` (the apply step) change exactly one field of a
//! service's spec and nothing else, and the two never interleave on one service.
//!
//! Specs are compared as the raw JSON `docker service inspect` prints, so a field that a
//! typed model loses (bollard's `HealthCheck` vs the engine's `Healthcheck`) shows up.

mod support;

use std::path::Path;
use std::time::Duration;

use drover::apply;
use drover::config::{Action, Config, Selector};
use drover::docker::Engine;
use drover::jobs::runner::Executor;
use drover::jobs::{Facts, JobId, JobState, RunContext, Runner, Work};
use drover::state::Snapshot;
use serde_json::Value;
use support::*;

fn spec_json(service: &str) -> Result<Value> {
    let raw = docker(&["service", "inspect", "--format", "{{json .Spec}}", service])?;
    Ok(serde_json::from_str(&raw)?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn config() -> Result<Config> {
    Ok(Config::parse(
        Path::new("e2e.yml"),
        "jobs: { update_timeout: 120s }\n",
    )?)
}

/// The webhook job that updates every service running `image` (what an accepted
/// `update-services` hook runs).
async fn webhook_job(executor: &Executor, image: &str, seq: u64) -> drover::jobs::Outcome {
    executor
        .run(RunContext {
            id: JobId(format!("e2e-{seq}")),
            hook: "e2e".into(),
            seq,
            work: Work::UpdateServices {
                image: image.to_owned(),
                digest: None,
                only: Vec::new(),
            },
            facts: Facts::default(),
        })
        .await
}

/// The notify step `restart: { service: NAME }` of an apply target.
fn restart_step(service: &str) -> Action {
    Action::Restart(Selector {
        service: Some(service.to_owned()),
        container: None,
        label: None,
    })
}

fn swarm_snapshot() -> Snapshot {
    Snapshot {
        swarm: true,
        ..Snapshot::default()
    }
}

/// Removes `pointer` from a spec (the one field a change may touch).
fn without(mut spec: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    if let Some(Value::Object(m)) = spec.pointer_mut(parent) {
        m.remove(key);
    }
    spec
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn rich_spec_survives_a_webhook_rollout_and_a_notify_restart_but_for_the_changed_field()
-> Result<()> {
    require_e2e!();
    let name = unique("rich");
    let image = format!("127.0.0.1:5000/drover-e2e/{name}:latest");
    build_push(&image, "v1", "")?;
    let secret = create_secret(&unique("rich-secret"), b"s3cret")?;
    let conf = create_config(&unique("rich-conf"), b"conf")?;
    let service = ServiceBuilder::new(&name, &image)
        .replicas(1)
        .args(["sleep", "3600"])
        .raw("--health-cmd", "test -d /")
        .raw("--health-interval", "2s")
        .raw("--health-timeout", "2s")
        .raw("--health-retries", "3")
        .raw("--health-start-period", "1s")
        .raw("--limit-cpu", "0.5")
        .raw("--limit-memory", "64M")
        .raw("--reserve-cpu", "0.01")
        .raw("--reserve-memory", "4M")
        .raw("--constraint", "node.role==manager")
        .raw("--placement-pref", "spread=node.labels.zone")
        .env("RICH_ENV", "1")
        .container_label("rich.container", "yes")
        .label("rich.service", "yes")
        .raw("--mount", "type=tmpfs,dst=/scratch,tmpfs-size=1048576")
        .secret(secret.name())
        .config(conf.name(), "/conf.txt")
        .update_config(1, "1s", "pause", "1s")
        .raw("--update-order", "start-first")
        .raw("--update-max-failure-ratio", "0.5")
        .rollback_config(1, "0s", "1s")
        .raw("--rollback-order", "stop-first")
        .raw("--restart-condition", "on-failure")
        .raw("--restart-delay", "1s")
        .raw("--restart-max-attempts", "3")
        .raw("--restart-window", "10s")
        .raw("--log-driver", "json-file")
        .raw("--log-opt", "max-size=1m")
        .raw("--host", "db.test:10.1.2.3")
        .raw("--dns-option", "ndots:2")
        .switch("--init")
        .raw("--stop-signal", "SIGUSR1")
        .raw("--ulimit", "nofile=1024:2048")
        .raw("--cap-add", "NET_ADMIN")
        .raw("--cap-drop", "MKNOD")
        .raw("--sysctl", "net.core.somaxconn=512")
        .raw("--hostname", "{{.Service.Name}}-{{.Task.Slot}}")
        .raw("--user", "0:0")
        .raw("--workdir", "/tmp")
        .switch("--read-only")
        .create()?;
    wait_running(service.name(), 1, Duration::from_secs(90))?;
    let before = spec_json(&name)?;
    for field in [
        "/TaskTemplate/ContainerSpec/Healthcheck/StartPeriod",
        "/TaskTemplate/ContainerSpec/Ulimits",
        "/TaskTemplate/ContainerSpec/CapabilityAdd",
        "/TaskTemplate/ContainerSpec/Sysctls",
        "/TaskTemplate/ContainerSpec/Init",
        "/TaskTemplate/Placement/Preferences",
        "/TaskTemplate/Resources/Reservations",
        "/RollbackConfig",
    ] {
        ensure!(
            before.pointer(field).is_some(),
            "the engine did not store {field}: {before:#}"
        );
    }

    let v2 = build_push(&image, "v2", "")?;
    let rt = runtime()?;
    let engine = rt.block_on(Engine::connect())?;
    let executor = Executor::new(engine.clone(), &config()?)?;

    // The webhook rollout: only the image changes.
    let outcome = rt.block_on(webhook_job(&executor, &image, 1));
    assert_eq!(outcome.state, JobState::Completed, "{outcome:?}");
    let rolled = spec_json(&name)?;
    let image_field = "/TaskTemplate/ContainerSpec/Image";
    let digest = v2.split_once('@').map(|(_, d)| d).context("digest")?;
    assert_eq!(
        rolled.pointer(image_field).and_then(Value::as_str),
        Some(format!("{image}@{digest}").as_str()),
        "the image is pinned to the new digest"
    );
    assert_eq!(
        without(rolled.clone(), image_field),
        without(before.clone(), image_field),
        "a webhook rollout changed more than the image"
    );

    // The notify restart: only ForceUpdate changes.
    rt.block_on(apply::run_action(
        &restart_step(&name),
        Some(&engine),
        &swarm_snapshot(),
    ))?;
    let restarted = spec_json(&name)?;
    let force_field = "/TaskTemplate/ForceUpdate";
    assert_eq!(
        restarted.pointer(force_field).and_then(Value::as_u64),
        Some(
            rolled
                .pointer(force_field)
                .and_then(Value::as_u64)
                .unwrap_or(0)
                + 1
        )
    );
    assert_eq!(
        without(restarted, force_field),
        without(rolled, force_field),
        "a notify restart changed more than ForceUpdate"
    );
    drop(service);
    drop((secret, conf));
    let _ = docker(&["image", "rm", "-f", &image]);
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn notify_restart_and_webhook_rollout_of_one_service_are_serialised() -> Result<()> {
    require_e2e!();
    let name = unique("serial");
    let image = format!("127.0.0.1:5000/drover-e2e/{name}:latest");
    build_push(&image, "v1", "")?;
    // A 2 s monitor keeps each rollout in `updating` long enough to see an overlap.
    let service = ServiceBuilder::new(&name, &image)
        .replicas(1)
        .args(["sleep", "3600"])
        .update_config(1, "0s", "pause", "2s")
        .create()?;
    wait_running(service.name(), 1, Duration::from_secs(60))?;
    build_push(&image, "v2", "")?;
    let force_before = spec_json(&name)?
        .pointer("/TaskTemplate/ForceUpdate")
        .and_then(Value::as_u64)
        .unwrap_or(0);

    // Every update state the engine reports for the service, from here on.
    let events = ServiceEvents::start(&name)?;
    let rt = runtime()?;
    let (job, applied) = rt.block_on(async {
        let engine = Engine::connect().await?;
        let executor = Executor::new(engine.clone(), &config()?)?;
        let restart = restart_step(&name);
        let snapshot = swarm_snapshot();
        let (job, applied) = tokio::join!(
            webhook_job(&executor, &image, 1),
            apply::run_action(&restart, Some(&engine), &snapshot)
        );
        anyhow::Ok((job, applied))
    })?;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert_eq!(job.services[0].outcome, JobState::Completed, "{job:?}");
    applied?;
    let after = spec_json(&name)?;
    assert_eq!(
        after
            .pointer("/TaskTemplate/ForceUpdate")
            .and_then(Value::as_u64),
        Some(force_before + 1),
        "the restart was lost"
    );
    assert!(
        after
            .pointer("/TaskTemplate/ContainerSpec/Image")
            .and_then(Value::as_str)
            .is_some_and(|i| i.contains("@sha256:")),
        "the rollout was lost: {after}"
    );
    // Two rollouts, one after the other: the engine reports the first one completed
    // before the second one starts updating. Without the lock the second spec change
    // lands while the first rollout is updating, which cuts it short: the engine then
    // reports `updating` twice before the only `completed`.
    let serialised = ["updating", "completed", "updating", "completed"];
    let mut states = Vec::new();
    let reported = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        states = events.update_states();
        states.len() >= serialised.len()
    });
    assert!(
        reported && states == serialised,
        "the engine reported these update states, in order: {states:?}"
    );
    drop(service);
    let _ = docker(&["image", "rm", "-f", &image]);
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn start_first_webhook_rollout_with_a_health_check_drops_no_request_through_nginx() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("zd-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let name = unique("zd");
    let host = format!("{name}.test");
    let image = format!("127.0.0.1:5000/drover-e2e/{name}:latest");
    build_push(&image, "v1", "")?;
    // The app listens only 3 s after it starts; the health check says when it does.
    let service = ServiceBuilder::new(&name, &image)
        .replicas(1)
        .network(net.name())
        .label("routing-host", &host)
        .label("routing-port", "80")
        .label("routing-tls", "false")
        .args([
            "sh",
            "-c",
            "cp /version /www/version; sleep 3; exec httpd -f -p 80 -h /www",
        ])
        .raw(
            "--health-cmd",
            r"printf 'GET /version HTTP/1.0\r\n\r\n' | nc 127.0.0.1 80 | grep -q 200",
        )
        .raw("--health-interval", "1s")
        .raw("--health-timeout", "2s")
        .raw("--health-retries", "3")
        .raw("--health-start-period", "10s")
        .update_config(1, "0s", "pause", "2s")
        .raw("--update-order", "start-first")
        .create()?;
    wait_running(service.name(), 1, Duration::from_secs(90))?;

    let mut drover = DroverProcess::start_with_targets(&[routing_target(&nginx, net.name())])?;
    drover.wait_ready(Duration::from_secs(30))?;
    let serves = |version: &str| {
        nginx
            .get(&host, "/version")
            .is_ok_and(|r| r.status == 200 && r.body.trim() == version)
    };
    wait_steadily("nginx to serve v1", Duration::from_secs(30), || {
        serves("v1")
    })?;

    build_push(&image, "v2", "")?;
    let old_tasks = running_task_ids(service.name())?;
    let client = LoadClient::start(&nginx.addr, &host, "/version", 60);
    client.wait_requests(20, Duration::from_secs(30))?;
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let engine = Engine::connect().await?;
        let executor = Executor::new(engine, &config()?)?;
        anyhow::Ok(webhook_job(&executor, &image, 1).await)
    })?;
    // The load runs on until the old task has stopped and nginx answers from the new
    // one only: through the whole hand-over.
    wait_tasks_stopped(&old_tasks, Duration::from_secs(60))?;
    let serves_v2 = wait_steadily("nginx to serve v2", Duration::from_secs(30), || {
        serves("v2")
    });
    let (requests, failures, took) = client.finish();
    serves_v2?;
    eprintln!(
        "{requests} requests in {took:?} ({:.0}/s), {} failed",
        requests as f64 / took.as_secs_f64(),
        failures.len()
    );
    assert_eq!(outcome.state, JobState::Completed, "{outcome:?}");
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed during the rollout: {:?}\nnginx log:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        nginx.logs()
    );
    for _ in 0..20 {
        let r = nginx.get(&host, "/version")?;
        assert_eq!((r.status, r.body.trim()), (200, "v2"), "after the rollout");
    }
    assert!(drover.is_running());
    drop(service);
    let _ = docker(&["image", "rm", "-f", &image]);
    Ok(())
}
