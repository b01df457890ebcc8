//! End-to-end tests of drover's core loop against a real Swarm, a real nginx and the
//! `drover` binary: Swarm state → rendered nginx config → `nginx -t` → HUP → traffic.
//!
//! Run by `scripts/test` (which sets `DROVER_E2E=1` and builds the images); skipped
//! otherwise. Each test owns its network, services, nginx and drover process, all with
//! unique names, so tests run in parallel on one engine.
//!
//! The bound: after Swarm reports a change converged (every task of the service `running`),
//! the rendered file must list exactly the running task IPs, and nginx must route to them,
//! within [`BOUND`] (15 s: debounce max 1 s + reload, with a wide margin for 2 shared
//! cores; the 500 ms p99 target of DESIGN.md is measured by benchmarks, not here).

mod support;

use std::time::Duration;

use support::*;

/// How long drover may take to make the file and nginx match a converged Swarm.
const BOUND: Duration = Duration::from_secs(15);
/// How long Swarm itself may take to converge a scale (not drover's time).
const SWARM: Duration = Duration::from_secs(90);

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn harness_test_images_route_through_nginx_to_every_task_without_drover() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("core-h-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let be = ServiceBuilder::backend(&unique("core-h-be"))
        .replicas(3)
        .network(net.name())
        .create()?;
    wait_running(be.name(), 3, SWARM)?;
    let ips = running_task_ips(be.name(), net.name())?;
    assert_eq!(ips.len(), 3, "three task IPs on {net}");
    let servers: String = ips.iter().map(|ip| format!("server {ip}:80;")).collect();
    std::fs::write(
        nginx.conf("static.conf"),
        format!(
            "upstream be {{ {servers} }}\nserver {{ listen 80; server_name be.test; location / {{ proxy_pass http://be; }} }}\n"
        ),
    )?;
    let container = service_container(nginx.name())?;
    docker(&["exec", &container, "nginx", "-t"])?;
    docker(&["kill", "--signal", "HUP", &container])?;
    wait_all_tasks_answer(&nginx, "be.test", be.name(), BOUND)?;
    assert_eq!(
        nginx.get("unknown.test", "/")?.status,
        404,
        "unknown hosts get the fallback server"
    );
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn every_running_task_answers_through_nginx_while_scaling_2_5_1_0_3() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("core-a-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let be_name = unique("core-a-be");
    let host = format!("{be_name}.test");
    let be = routed_backend(&be_name, &host, net.name(), 2)?;
    wait_running(be.name(), 2, SWARM)?;

    let mut drover = DroverProcess::start_with_targets(&[routing_target(&nginx, net.name())])?;
    drover.wait_ready(BOUND)?;

    let output = nginx.conf("drover.conf");
    let prober = Prober::start(&nginx.addr, &host, Duration::from_millis(50));
    for n in [2u32, 5, 1, 0, 3] {
        scale(be.name(), n)?;
        wait_running(be.name(), n as usize, SWARM)?;
        wait_file_matches(&output, be.name(), net.name(), n as usize, BOUND)
            .with_context(|| format!("at {n} replicas"))?;
        if n > 0 {
            wait_all_tasks_answer(&nginx, &host, be.name(), BOUND)
                .with_context(|| format!("at {n} replicas"))?;
        } else {
            let mut last = None;
            let answered = wait_until(BOUND, Duration::from_millis(200), || {
                last = Some(nginx.get(&host, "/").map(|r| r.status));
                matches!(last, Some(Ok(502 | 503)))
            });
            ensure!(
                answered,
                "at 0 replicas nginx must answer 502/503 for {host}, got {last:?}"
            );
        }
        assert!(drover.is_running(), "drover exited at {n} replicas");
    }
    let (requests, failures) = prober.finish();
    assert!(
        failures.is_empty(),
        "nginx refused connections {} times in {requests} requests (a failed reload?): {:?}\nnginx log:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        nginx.logs()
    );
    let metrics = drover.metrics();
    let applied = metric_value(
        &metrics,
        "drover_renders_total",
        &[("target", "nginx"), ("outcome", "applied")],
    );
    assert!(
        applied.unwrap_or(0.0) >= 5.0,
        "at least one applied render per step, metrics:\n{metrics}"
    );
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_broken_template_on_another_target_does_not_stop_the_nginx_target() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("core-b-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let be_name = unique("core-b-be");
    let host = format!("{be_name}.test");
    let be = routed_backend(&be_name, &host, net.name(), 1)?;
    wait_running(be.name(), 1, SWARM)?;

    let dir = temp_dir("broken")?;
    let template = dir.path().join("broken.tera");
    std::fs::write(&template, "{% for s in services %}{{ s.name \n")?; // unclosed tags
    let broken_out = dir.path().join("broken.out");
    let broken = format!(
        r#"
  - name: broken
    template: {}
    output: {}
    debounce: {{ min: 100ms, max: 1s }}
"#,
        template.display(),
        broken_out.display()
    );
    let mut drover =
        DroverProcess::start_with_targets(&[broken, routing_target(&nginx, net.name())])?;

    wait_all_tasks_answer(&nginx, &host, be.name(), BOUND)
        .context("the nginx target renders despite the broken one")?;
    // And keeps following changes.
    scale(be.name(), 2)?;
    wait_running(be.name(), 2, SWARM)?;
    wait_file_matches(&nginx.conf("drover.conf"), be.name(), net.name(), 2, BOUND)?;
    wait_all_tasks_answer(&nginx, &host, be.name(), BOUND)?;

    assert!(
        drover.is_running(),
        "a template error must never stop the daemon"
    );
    assert_eq!(drover.get("/healthz")?.status, 200);
    assert!(
        !broken_out.exists(),
        "the broken target must not write its output"
    );
    let metrics = drover.metrics();
    let errors: f64 = metric_samples(&metrics, "drover_renders_total")
        .iter()
        .filter(|(l, _)| l.iter().any(|(k, v)| k == "target" && v == "broken"))
        .filter(|(l, _)| {
            !l.iter()
                .any(|(k, v)| k == "outcome" && (v == "applied" || v == "unchanged"))
        })
        .map(|(_, v)| v)
        .sum();
    assert!(
        errors >= 1.0,
        "the template error is counted for target broken, metrics:\n{metrics}"
    );
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_failing_check_keeps_the_previous_file_and_nginx_serving() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("core-c-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    // A second nginx whose target renders invalid config: `nginx -t` must refuse it.
    let previous = "server { listen 80; server_name previous.test; return 200 \"previous\\n\"; }\n";
    let guarded = nginx_service(net.name(), &[("drover.conf", previous)])?;
    let be_name = unique("core-c-be");
    let host = format!("{be_name}.test");
    let be = routed_backend(&be_name, &host, net.name(), 1)?;
    wait_running(be.name(), 1, SWARM)?;

    let dir = temp_dir("checks")?;
    let invalid = dir.path().join("invalid.tera");
    // Both templates list the backend's live tasks, so its scale changes what they render
    // and drover must check again (a static text would render the same and never be
    // checked twice). Only this test's backend: other tests' services change all the
    // time, and each change would be one more check under way when the files are listed.
    let tasks = format!(
        "# {{% for s in services %}}{{% if s.name == \"{be_name}\" %}}{{% for t in s.tasks %}}{{% if t.live %}}{{{{ t.id }}}} {{% endif %}}{{% endfor %}}{{% endif %}}{{% endfor %}}\n"
    );
    std::fs::write(
        &invalid,
        format!("{tasks}this_is_not_an_nginx_directive on;\n"),
    )?;
    let valid = dir.path().join("valid.tera");
    std::fs::write(&valid, format!("{tasks}new content\n"))?;
    let refused_out = dir.path().join("refused.out");
    std::fs::write(&refused_out, "previous content\n")?;
    let targets = [
        nginx_target(&nginx.conf("drover.conf"), net.name(), nginx.name()),
        format!(
            r#"
  - name: invalid-nginx
    template: {invalid}
    output: {out}
    debounce: {{ min: 100ms, max: 1s }}
    check:
      exec: {{ service: {svc}, command: ["nginx", "-t"] }}
    notify:
      - signal: {{ service: {svc}, signal: HUP }}
"#,
            invalid = invalid.display(),
            out = guarded.conf("drover.conf").display(),
            svc = guarded.name()
        ),
        format!(
            r#"
  - name: refused
    template: {valid}
    output: {out}
    debounce: {{ min: 100ms, max: 1s }}
    check: {{ command: ["false"] }}
"#,
            valid = valid.display(),
            out = refused_out.display()
        ),
    ];
    let prober = Prober::start(&guarded.addr, "previous.test", Duration::from_millis(50));
    let mut drover = DroverProcess::start_with_targets(&targets)?;
    wait_all_tasks_answer(&nginx, &host, be.name(), BOUND)
        .context("the nginx target is unaffected")?;

    // Both failing targets have had their check run and refused.
    let mut metrics = String::new();
    let refused = wait_until(BOUND, Duration::from_millis(200), || {
        metrics = drover.metrics();
        ["invalid-nginx", "refused"].iter().all(|t| {
            metric_samples(&metrics, "drover_checks_total")
                .iter()
                .any(|(l, v)| {
                    *v >= 1.0
                        && l.iter().any(|(k, val)| k == "target" && val == t)
                        && l.iter().any(|(k, val)| k == "outcome" && val == "failed")
                })
        })
    });
    assert!(
        refused,
        "failed checks are counted per target, metrics:\n{metrics}"
    );

    // A change makes drover try again; still refused, still the previous files.
    let failed_checks = |metrics: &str, target: &str| -> f64 {
        metric_samples(metrics, "drover_checks_total")
            .iter()
            .filter(|(l, _)| {
                l.iter().any(|(k, v)| k == "target" && v == target)
                    && l.iter().any(|(k, v)| k == "outcome" && v == "failed")
            })
            .map(|(_, v)| v)
            .sum()
    };
    let before: Vec<f64> = ["invalid-nginx", "refused"]
        .iter()
        .map(|t| failed_checks(&metrics, t))
        .collect();
    scale(be.name(), 2)?;
    wait_running(be.name(), 2, SWARM)?;
    wait_file_matches(&nginx.conf("drover.conf"), be.name(), net.name(), 2, BOUND)?;
    let retried = wait_until(BOUND, Duration::from_millis(200), || {
        metrics = drover.metrics();
        ["invalid-nginx", "refused"]
            .iter()
            .zip(&before)
            .all(|(t, b)| failed_checks(&metrics, t) > *b)
    });
    assert!(
        retried,
        "the scale made both failing targets check again (before {before:?}), metrics:\n{metrics}"
    );

    assert_eq!(
        std::fs::read_to_string(guarded.conf("drover.conf"))?,
        previous,
        "last-known-good restored"
    );
    assert_eq!(
        std::fs::read_to_string(&refused_out)?,
        "previous content\n",
        "last-known-good restored"
    );
    let r = guarded.get("previous.test", "/")?;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "previous\n"),
        "the guarded nginx still serves its old config"
    );
    let staged: Vec<_> = std::fs::read_dir(&guarded.conf_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // Everything but the output and its last-good record: the candidate
        // (`.drover.conf.drover-candidate`) and temp files are hidden names, not `*.conf`.
        .filter(|n| n != "drover.conf" && n != ".drover.conf.drover-good")
        .collect();
    assert!(
        staged.is_empty(),
        "no staged or temporary file left in conf.d: {staged:?}"
    );
    assert!(drover.is_running());
    let (requests, failures) = prober.finish();
    assert!(
        failures.is_empty(),
        "guarded nginx refused {} of {requests} connections: {failures:?}",
        failures.len()
    );
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn drover_run_without_a_config_routes_through_the_nginx_service_its_flags_name_and_takes_no_webhook()
-> Result<()> {
    require_e2e!();
    // The README's zero-config default: one nginx target with the lab's labels, checked
    // with `nginx -t` and reloaded with HUP in the named nginx service, no webhooks; the
    // output file, nginx service, network and listener given by flags.
    let net = create_overlay_network(&unique("core-z-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let host = format!("{}.test", unique("core-z"));
    let be = routed_backend(&unique("core-z-be"), &host, net.name(), 2)?;
    wait_running(be.name(), 2, SWARM)?;
    let output = nginx.conf("zero.conf");
    let listen = format!("127.0.0.1:{}", free_port());
    let output_arg = output.display().to_string();
    let mut drover = DroverProcess::start_without_config(&[
        "--nginx-output",
        &output_arg,
        "--nginx-service",
        nginx.name(),
        "--network",
        net.name(),
        "--listen",
        &listen,
    ])?;
    drover.wait_ready(SWARM)?;
    wait_all_tasks_answer(&nginx, &host, be.name(), BOUND)?;
    ensure!(
        upstream_ips(&std::fs::read_to_string(&output)?)
            == running_task_ips(be.name(), net.name())?,
        "the file at --nginx-output lists the running tasks"
    );
    // --listen is the public listener: health answers there, and no hook exists.
    let health = http_get_host(&listen, &listen, "/healthz")?;
    assert_eq!(health.status, 200, "{}", health.body);
    let hook = http_post(
        &listen,
        "/hooks/ci",
        &[("Content-Type", "application/json")],
        br#"{"image":"127.0.0.1:5000/x:latest"}"#,
    )?;
    assert_eq!(hook.status, 404, "no webhooks: {}", hook.body);
    // And it follows the Swarm: a scale reaches nginx through the same check and HUP.
    scale(be.name(), 3)?;
    wait_running(be.name(), 3, SWARM)?;
    wait_all_tasks_answer(&nginx, &host, be.name(), BOUND)?;
    assert!(drover.is_running(), "drover still runs");
    Ok(())
}
