//! End-to-end: the home lab's label meanings through drover's built-in nginx template and a
//! real nginx. A migrated stack keeps its labels: `routing-context` is stripped before the
//! backend, `routing-internal-context` is the backend's path, an absolute `routing-auth`
//! file is used as is with the service's name as the default realm.
//!
//! Run by `scripts/test` (`DROVER_E2E=1`, images built); skipped otherwise. Unique names
//! per test; everything is removed on drop.

mod support;

use std::time::Duration;

use support::*;

/// How long drover and nginx may take to route a converged service.
const BOUND: Duration = Duration::from_secs(30);
/// How long Swarm itself may take to start tasks (not drover's time).
const SWARM: Duration = Duration::from_secs(90);

/// A busybox backend serving `/x` as `at-x` and `/api/x` as `at-api-x` (and `/` as its
/// hostname), so the body says which path the backend saw.
fn path_backend(name: &str, network: &str) -> ServiceBuilder {
    ServiceBuilder::backend(name)
        .network(network)
        .label("routing-port", "80")
        .label("routing-tls", "false")
        .args([
            "sh",
            "-c",
            "mkdir -p /www/api && echo at-x > /www/x && echo at-api-x > /www/api/x \
             && exec httpd -f -p 80 -h /www",
        ])
}

/// Waits until `GET path` with `Host: host` answers `status` (and `body`, trimmed, if
/// given); returns the last response.
fn wait_answer(
    nginx: &NginxService,
    host: &str,
    path: &str,
    status: u16,
    body: Option<&str>,
) -> Result<Response> {
    let mut last = None;
    let ok = wait_until(BOUND, Duration::from_millis(250), || {
        let r = nginx.get(host, path);
        let done =
            matches!(&r, Ok(r) if r.status == status && body.is_none_or(|b| r.body.trim() == b));
        last = Some(r);
        done
    });
    ensure!(
        ok,
        "GET {host}{path}: wanted {status} {body:?} within {BOUND:?}, last answer {last:?}"
    );
    Ok(last.context("no answer")??)
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn home_lab_labels_route_through_nginx_with_their_home_lab_meaning() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("labels-a-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    // nginx's workers (www-data) read the auth file at request time.
    std::fs::create_dir_all(nginx.conf("auth"))?;
    std::fs::write(nginx.conf("auth/kibana.htpasswd"), "drover:{PLAIN}secret\n")?;
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (nginx.conf_dir.clone(), 0o755),
        (nginx.conf("auth"), 0o755),
        (nginx.conf("auth/kibana.htpasswd"), 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }

    let api = format!("{}.test", unique("labels-api"));
    let logs = format!("{}.test", unique("labels-logs"));
    // Two services on one host: one stack's, as a host belongs to one stack (the home lab
    // shared this host between stacks through the target's `owners` setting).
    let lab = unique("labels-lab");
    let receiver = path_backend(&unique("labels-receiver"), net.name())
        .label("com.docker.stack.namespace", &lab)
        .label("routing-host", &api)
        .label("routing-context", "/webhook")
        .create()?;
    let backend = path_backend(&unique("labels-backend"), net.name())
        .label("com.docker.stack.namespace", &lab)
        .label("routing-host", &api)
        .label("routing-context", "/backend")
        .label("routing-internal-context", "/api")
        .create()?;
    let kibana = path_backend(&unique("labels-kibana"), net.name())
        .label("routing-host", &logs)
        .label("routing-auth", "/etc/nginx/conf.d/auth/kibana.htpasswd")
        .create()?;
    for s in [&receiver, &backend, &kibana] {
        wait_running(s.name(), 1, SWARM)?;
    }

    let mut drover = DroverProcess::start_with_targets(&[routing_target(&nginx, net.name())])?;

    wait_answer(&nginx, &api, "/webhook/x", 200, Some("at-x"))
        .context("routing-context /webhook: GET /webhook/x reaches the backend as /x")?;
    wait_answer(&nginx, &api, "/backend/x", 200, Some("at-api-x"))
        .context("routing-internal-context /api: GET /backend/x reaches the backend as /api/x")?;

    let challenge = wait_answer(&nginx, &logs, "/", 401, None)
        .context("an absolute routing-auth file asks for credentials")?;
    let realm = format!("Basic realm=\"{}\"", kibana.name());
    assert_eq!(
        challenge.header("WWW-Authenticate"),
        Some(realm.as_str()),
        "the realm defaults to the service's name: {challenge:?}"
    );
    // drover:secret. Asked until it holds: right after a reload, a worker still running
    // the previous config may take the connection.
    let mut authorized = None;
    let ok = wait_until(BOUND, Duration::from_millis(250), || {
        let r = http_request(
            "GET",
            &nginx.addr,
            &logs,
            "/x",
            Some((&[("Authorization", "Basic ZHJvdmVyOnNlY3JldA==")], b"")),
        );
        let done = matches!(&r, Ok(r) if (r.status, r.body.trim()) == (200, "at-x"));
        authorized = Some(r);
        done
    });
    assert!(
        ok,
        "the file nginx reads is the one the label names: last answer {authorized:?}"
    );
    assert!(drover.is_running());
    Ok(())
}

/// The built-in template's failover (`proxy_next_upstream error timeout`) asks the next task
/// when one fails, but never sends a request that is not idempotent twice: nginx repeats a
/// POST only when told `non_idempotent`, and the template never tells it. Two services of
/// two tasks each; every task records the request line it reads, then closes without an
/// answer, so every attempt fails and nginx would try each task once if it were allowed.
#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_failed_get_is_retried_on_the_next_task_but_a_failed_post_is_never_sent_twice() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("labels-f-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let dropper = |name: &str, host: &str| {
        ServiceBuilder::backend(name)
            .replicas(2)
            .network(net.name())
            .label("routing-host", host)
            .label("routing-port", "80")
            .label("routing-tls", "false")
            .args([
                "sh",
                "-c",
                // The image has no /tmp; the entrypoint makes /www.
                "printf '#!/bin/sh\\nread -r line\\necho \"$line\" >>/www/seen\\n' >/www/drop \
                 && chmod +x /www/drop && : >/www/seen && exec nc -ll -p 80 -e /www/drop",
            ])
            .create()
    };
    let (get_name, post_name) = (unique("labels-f-get"), unique("labels-f-post"));
    let (get_host, post_host) = (format!("{get_name}.test"), format!("{post_name}.test"));
    let get_be = dropper(&get_name, &get_host)?;
    let post_be = dropper(&post_name, &post_host)?;
    wait_running(get_be.name(), 2, SWARM)?;
    wait_running(post_be.name(), 2, SWARM)?;
    let _drover = DroverProcess::start_with_targets(&[routing_target(&nginx, net.name())])?;

    // What every task of `service` has read so far, one request line each.
    let seen = |service: &str| -> Result<Vec<String>> {
        let ids = docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.swarm.service.name={service}"),
        ])?;
        let mut lines = Vec::new();
        for id in ids.lines() {
            let out = docker(&["exec", id, "cat", "/www/seen"])?;
            lines.extend(out.lines().map(str::to_owned));
        }
        Ok(lines)
    };
    // Until nginx runs the new config a request gets the fallback server and reaches no
    // task; the first answer from the upstream (502: every attempt failed) is the one
    // request measured, made while both tasks are fresh.
    let first_502 = |method: &str, host: &str| -> Result<()> {
        let ok = wait_until(BOUND, Duration::from_millis(250), || {
            let body: Option<(Headers, &[u8])> = (method == "POST").then_some((&[], b"x=1"));
            http_request(method, &nginx.addr, host, "/", body).is_ok_and(|r| r.status == 502)
        });
        ensure!(
            ok,
            "{method} {host}: no 502 from the upstream within {BOUND:?}"
        );
        Ok(())
    };

    first_502("GET", &get_host)?;
    let gets = seen(get_be.name())?;
    assert_eq!(
        gets.len(),
        2,
        "a failed GET is asked of the next task (each once): {gets:?}"
    );
    first_502("POST", &post_host)?;
    let posts = seen(post_be.name())?;
    assert_eq!(
        posts.len(),
        1,
        "a failed POST reached exactly one task: {posts:?}"
    );
    assert!(posts[0].starts_with("POST / "), "{posts:?}");
    Ok(())
}
