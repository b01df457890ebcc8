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
    let receiver = path_backend(&unique("labels-receiver"), net.name())
        .label("routing-host", &api)
        .label("routing-context", "/webhook")
        .create()?;
    let backend = path_backend(&unique("labels-backend"), net.name())
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
