//! End-to-end: one bad host never freezes the others (issue 9 item 4), through a real
//! nginx on the test Swarm.
//!
//! A TLS host whose certificate files are not there yet is served on port 80 until they
//! appear, then switches to TLS by itself; a host whose certificate does not load (nginx
//! -t fails on it) is left out, with nginx's message on the status page and in
//! `drover_hosts_left_out`; a 60-character host name works. Meanwhile a scale of another
//! service still reaches nginx.
//!
//! Run by `scripts/test` (`DROVER_E2E=1`, images built); skipped otherwise. Unique names
//! per test; everything is removed on drop.

mod support;

use std::time::Duration;

use support::*;

/// How long drover and nginx may take to follow a change (resync is 2 s here).
const BOUND: Duration = Duration::from_secs(40);
/// How long Swarm itself may take to start tasks (not drover's time).
const SWARM: Duration = Duration::from_secs(90);

fn config(http: &str, target: &str) -> String {
    format!("http: {{ listen: {http} }}\nresync: 2s\ntargets:{target}")
}

/// A plain-http backend (busybox httpd answering its hostname) on `host`.
fn backend(name: &str, host: &str, network: &str, tls: bool) -> ServiceBuilder {
    let b = ServiceBuilder::backend(name)
        .network(network)
        .label("routing-host", host)
        .label("routing-port", "80");
    if tls {
        b
    } else {
        b.label("routing-tls", "false")
    }
}

/// The text of `upstream NAME { ... }` in `conf`.
fn upstream_block<'c>(conf: &'c str, name: &str) -> Option<&'c str> {
    let start = conf.find(&format!("upstream {name} {{"))?;
    let end = conf[start..].find('}')?;
    Some(&conf[start..start + end])
}

fn upstream_name(host: &str) -> String {
    host.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Waits until `GET /` with `Host: host` through nginx answers `status`.
fn wait_status(nginx: &NginxService, host: &str, status: u16) -> Result<()> {
    let mut last = None;
    let ok = wait_until(BOUND, Duration::from_millis(250), || {
        let r = nginx.get(host, "/");
        let done = matches!(&r, Ok(r) if r.status == status);
        last = Some(r);
        done
    });
    ensure!(
        ok,
        "GET {host}/: wanted {status} within {BOUND:?}, last answer {last:?}"
    );
    Ok(())
}

fn gauge(drover: &DroverProcess, name: &str) -> Option<f64> {
    metric_value(&drover.metrics(), name, &[("target", "nginx")])
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_bad_host_is_left_out_and_a_host_without_its_certificate_waits_on_port_80_while_the_others_update()
-> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("iso-net"))?;
    let certs = temp_dir("iso-certs")?;
    let live = certs.path().join("live");
    std::fs::create_dir_all(&live)?;
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [certs.path(), live.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let nginx = nginx_service_mounting(net.name(), &[], &[(certs.path(), "/etc/letsencrypt")])?;

    let plain_host = format!("{}.test", unique("iso-plain"));
    let waiting_host = format!("{}.test", unique("iso-nocert"));
    let broken_host = format!("{}.test", unique("iso-broken"));
    let long_prefix = unique("iso-long");
    let long_host = format!(
        "{long_prefix}-{}.test",
        "x".repeat(60 - long_prefix.len() - 6)
    );
    assert_eq!(long_host.len(), 60);
    // Present but not a certificate: nginx -t fails on this host's block only.
    std::fs::create_dir_all(live.join(&broken_host))?;
    std::fs::write(
        live.join(&broken_host).join("fullchain.pem"),
        "not a certificate\n",
    )?;
    std::fs::write(live.join(&broken_host).join("privkey.pem"), "not a key\n")?;

    let plain = backend(&unique("iso-plain"), &plain_host, net.name(), false).create()?;
    let long = backend(&unique("iso-long"), &long_host, net.name(), false).create()?;
    let waiting = backend(&unique("iso-nocert"), &waiting_host, net.name(), true).create()?;
    let broken = backend(&unique("iso-broken"), &broken_host, net.name(), true).create()?;
    for s in [&plain, &long, &waiting, &broken] {
        wait_running(s.name(), 1, SWARM)?;
    }

    let http = format!("127.0.0.1:{}", free_port());
    let conf = nginx.conf("drover.conf");
    let mut drover = DroverProcess::start(
        &config(&http, &nginx_target(&conf, net.name(), nginx.name())),
        Some(&http),
    )?;
    drover.wait_http_ok("/healthz", BOUND)?;

    wait_status(&nginx, &plain_host, 200).context("a plain host is routed")?;
    wait_status(&nginx, &long_host, 200).context("a 60-character host is routed")?;
    wait_status(&nginx, &waiting_host, 200)
        .context("a TLS host without its certificate is proxied on port 80")?;
    let mut text = String::new();
    let left_out = wait_until(BOUND, Duration::from_millis(100), || {
        text = std::fs::read_to_string(&conf).unwrap_or_default();
        host_block(&text, &broken_host).is_none()
            && !text.contains(&format!("server_name {broken_host};"))
    });
    assert!(
        left_out,
        "the host whose certificate does not load is left out: {text}"
    );
    assert!(
        text.contains(&format!("# left out: host {broken_host}")),
        "{text}"
    );
    let waiting_block = host_block(&text, &waiting_host).context("waiting host in the file")?;
    assert!(
        waiting_block.contains("/.well-known/acme-challenge/") && !waiting_block.contains("443"),
        "{waiting_block}"
    );

    let reported = wait_until(BOUND, Duration::from_millis(250), || {
        gauge(&drover, "drover_hosts_left_out") == Some(1.0)
            && gauge(&drover, "drover_hosts_without_certificate") == Some(1.0)
    });
    assert!(reported, "gauges: {}", drover.metrics());
    let page = drover.get("/")?.body;
    assert!(
        page.contains(&format!("data-host=\"{broken_host}\"")),
        "{page}"
    );
    assert!(
        page.contains("cannot load certificate"),
        "nginx's message is shown with the host: {page}"
    );
    assert!(
        page.contains(&format!("data-waiting=\"{waiting_host}\"")),
        "{page}"
    );
    let logs = drover.logs();
    assert_eq!(
        logs.matches("host left out").count(),
        1,
        "logged once, not every pass (resync every 2 s): {logs}"
    );

    // Another service scales: its upstream follows, through the left-out host.
    scale(plain.name(), 2)?;
    wait_running(plain.name(), 2, SWARM)?;
    let want = {
        let mut ips = running_task_ips(plain.name(), net.name())?;
        ips.sort();
        ips
    };
    let name = upstream_name(&plain_host);
    let followed = wait_until(BOUND, Duration::from_millis(250), || {
        let text = std::fs::read_to_string(&conf).unwrap_or_default();
        upstream_block(&text, &name).map(upstream_ips) == Some(want.clone())
    });
    assert!(
        followed,
        "upstream {name} has {want:?}: {}",
        std::fs::read_to_string(&conf)?
    );
    let mut seen = std::collections::BTreeSet::new();
    let both = wait_until(BOUND, Duration::from_millis(100), || {
        if let Ok(r) = nginx.get(&plain_host, "/") {
            if r.status == 200 {
                seen.insert(r.body.trim().to_owned());
            }
        }
        seen.len() >= 2
    });
    assert!(both, "requests reach both replicas through nginx: {seen:?}");

    // The certificate appears: the host switches to TLS on its own (found on a resync).
    make_certificate(&live, &waiting_host, false)?;
    let tls = wait_until(BOUND, Duration::from_millis(250), || {
        let text = std::fs::read_to_string(&conf).unwrap_or_default();
        host_block(&text, &waiting_host).is_some_and(|b| {
            b.contains("listen 443 ssl http2;")
                && b.contains(&format!(
                    "ssl_certificate /etc/letsencrypt/live/{waiting_host}/fullchain.pem;"
                ))
        })
    });
    assert!(tls, "{}", std::fs::read_to_string(&conf)?);
    wait_status(&nginx, &waiting_host, 301).context("port 80 now redirects to TLS")?;
    let container = service_container(nginx.name())?;
    docker(&["exec", &container, "nginx", "-t"]).context("the file in place passes nginx -t")?;
    let cleared = wait_until(BOUND, Duration::from_millis(250), || {
        gauge(&drover, "drover_hosts_without_certificate") == Some(0.0)
    });
    assert!(cleared, "{}", drover.metrics());

    // The broken certificate is replaced by a good one: the host comes back by itself.
    make_certificate(&live, &broken_host, false)?;
    let back = wait_until(BOUND, Duration::from_millis(250), || {
        let text = std::fs::read_to_string(&conf).unwrap_or_default();
        host_block(&text, &broken_host).is_some_and(|b| b.contains("listen 443 ssl http2;"))
            && gauge(&drover, "drover_hosts_left_out") == Some(0.0)
    });
    assert!(back, "{}", std::fs::read_to_string(&conf)?);
    wait_status(&nginx, &broken_host, 301)?;
    assert!(drover.logs().contains("host back in the file"));
    assert!(drover.is_running());
    Ok(())
}
