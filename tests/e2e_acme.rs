//! drover's own ACME client end to end (issue 22): the shipped stack on a Swarm of one
//! manager and two workers (namespace nodes), nginx on every node, Let's Encrypt's Pebble
//! as the CA.
//!
//! The CA validates through a worker's nginx (the test's DNS points the names there), so
//! the token must have reached a node that is not the controller; the certificate must
//! then be served by every node's nginx, chained to Pebble's root, over h2. A restart of
//! every drover orders nothing: the same certificate is served after it.
//!
//! Pebble listens on the host's loopback; the controller's container reaches it through a
//! TLS relay on the host's side of the manager's veth (socat, with a certificate for that
//! address), which the test's config names as the directory and trusts through
//! `certificates.ca_file`, mounted the way docs/certificates.md says: a Swarm config added
//! by a second compose file.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::cluster::{Cluster, Node, ShippedStack};
use support::*;

const SWARM: Duration = Duration::from_secs(120);
/// A new TLS host's certificate on every node (the design's target is 60 s; shared cores).
const ISSUED: Duration = Duration::from_secs(120);
const NET: &str = "acme-web";
const APP_HOST: &str = "app.acme.test";
/// Pebble dials this port for HTTP-01: nginx's published port 80 (scripts/test sets it).
const RELAY_PORT: u16 = 14400;

fn var(k: &str) -> Result<String> {
    std::env::var(k).with_context(|| {
        format!("{k} unset: run `scripts/test pebble` and `eval \"$(scripts/test env)\"`")
    })
}

/// socat terminating TLS on `ip:RELAY_PORT` and speaking TLS to Pebble on loopback.
struct Relay(Child);

impl Relay {
    fn start(dir: &std::path::Path, ip: &str, pebble_ca: &str) -> Result<Relay> {
        let p = |f: &str| dir.join(f).display().to_string();
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{RELAY_PORT},bind={ip},reuseaddr,fork,cert={},key={},verify=0",
                p("relay.pem"),
                p("relay.key")
            ))
            .arg(format!(
                "OPENSSL:127.0.0.1:14000,cafile={pebble_ca},commonname=localhost"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let relay = Relay(child);
        // Ours, and through to Pebble: a relay left bound to the address by another run
        // shows another certificate, and a failed bind leaves nothing listening.
        let ca = dir.join("ca.pem");
        let through = wait_until(Duration::from_secs(15), Duration::from_millis(250), || {
            Command::new("curl")
                .args(["-fsS", "-o", "/dev/null", "--max-time", "3", "--cacert"])
                .arg(&ca)
                .arg(format!("https://{ip}:{RELAY_PORT}/dir"))
                .status()
                .is_ok_and(|s| s.success())
        });
        ensure!(
            through,
            "the TLS relay to Pebble on {ip}:{RELAY_PORT} does not answer with its certificate (is another relay bound there?)"
        );
        Ok(relay)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Points `names` at `addr` in Pebble's DNS (pebble-challtestsrv's management API).
fn dns(names: &[&str], addr: &str, add: bool) -> Result<()> {
    if add {
        // A run that failed before its cleanup leaves its records, and add-a appends:
        // the CA would dial a dead cluster's address.
        dns(names, "", false)?;
    }
    for name in names {
        let (path, body) = if add {
            (
                "add-a",
                format!(r#"{{"host":"{name}","addresses":["{addr}"]}}"#),
            )
        } else {
            ("clear-a", format!(r#"{{"host":"{name}"}}"#))
        };
        let out = Command::new("curl")
            .args(["-fsS", "-X", "POST", "-d", &body])
            .arg(format!("http://127.0.0.1:8055/{path}"))
            .output()?;
        ensure!(
            out.status.success(),
            "challtestsrv {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What `node`'s nginx serves for `name` over TLS: (HTTP version, SHA-256 of the leaf).
fn served(
    node: &Node,
    tls_port: u16,
    name: &str,
    root: &std::path::Path,
) -> Result<(String, String)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(root)
        .args(["--resolve", &format!("{name}:{tls_port}:{}", node.addr)])
        .arg(format!("https://{name}:{tls_port}/"))
        .output()?;
    ensure!(
        out.status.success(),
        "{}: {}",
        node.short,
        String::from_utf8_lossy(&out.stderr)
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let leaf = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo | openssl s_client -connect {}:{tls_port} -servername {name} 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
            node.addr
        ))
        .output()?;
    Ok((
        version,
        String::from_utf8_lossy(&leaf.stdout).trim().to_owned(),
    ))
}

/// The shipped stack on one manager and `workers` workers, with `certificates:` naming
/// Pebble through the relay (and `settings` below it).
struct World {
    stack: ShippedStack,
    dir: tempfile::TempDir,
    http_port: u16,
    m1_host: String,
    _relay: Relay,
}

impl World {
    fn deploy(workers: usize, settings: &str) -> Result<World> {
        let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
        let http_port: u16 = var("DROVER_TEST_PEBBLE_HTTP_PORT")?.parse()?;
        let cluster = Cluster::new(1, workers)?;
        let m1_host = cluster.node("m1").host_addr.clone();
        let dir = temp_dir("acme-e2e")?;
        tls_ca_and_leaf(dir.path(), &m1_host)?;
        let relay = Relay::start(dir.path(), &m1_host, &pebble_ca)?;
        let extra = ca_compose_file(dir.path())?;
        let directory = format!("https://{m1_host}:{RELAY_PORT}/dir");
        let stack = ShippedStack::deploy_files(
            &["stack.yml", &extra],
            cluster,
            NET,
            APP_HOST,
            http_port,
            &[],
            |c| {
                format!(
                    "{c}\ncertificates:\n  directory: {directory}\n  ca_file: /etc/drover/ca.pem\n{settings}"
                )
            },
        )?;
        Ok(World {
            stack,
            dir,
            http_port,
            m1_host,
            _relay: relay,
        })
    }
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_new_tls_host_gets_a_certificate_from_pebble_through_a_workers_nginx_served_by_every_node_and_a_restart_orders_nothing()
-> Result<()> {
    require_e2e!();
    let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
    let w = World::deploy(2, "  hosts: label\n")?;
    let (s, dir, http_port) = (&w.stack, &w.dir, w.http_port);
    // The shipped operator listener wants the ops token.
    let token = s.ops_token()?;
    let tls_port = http_port + 1;
    let (m1, w1, w2) = (
        s.cluster.node("m1"),
        s.cluster.node("w1"),
        s.cluster.node("w2"),
    );

    let host = "shop.acme.test";
    let alias = "www.shop.acme.test";
    dns(&[host, alias], &w2.addr, true)?;
    s.cluster.create_routed(
        "acme-shop",
        NET,
        &[
            ("routing-host", host),
            ("routing-port", "80"),
            ("routing-extra-hosts", alias),
            ("routing-acme", "true"),
        ],
    )?;

    let root = pebble_root(&pebble_ca, dir.path())?;

    let mut last = String::new();
    let mut leaves = Vec::new();
    let everywhere = wait_until(SWARM + ISSUED, Duration::from_secs(1), || {
        leaves.clear();
        for node in [m1, w1, w2] {
            for name in [host, alias] {
                match served(node, tls_port, name, &root) {
                    Ok((v, leaf)) if v == "2" && !leaf.is_empty() => leaves.push(leaf),
                    Ok((v, _)) => {
                        last = format!("{} {name}: HTTP/{v}", node.short);
                        return false;
                    }
                    Err(e) => {
                        last = e.to_string();
                        return false;
                    }
                }
            }
        }
        true
    });
    let metrics = m1
        .get_inside_as(&s.service("drover"), 9091, "/metrics", Some(&token))
        .unwrap_or_default();
    ensure!(
        everywhere,
        "the certificate on every node's nginx, h2, chained to Pebble's root: {last}\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("acme") || l.contains("certificate"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    leaves.dedup();
    ensure!(
        leaves.len() == 1,
        "one certificate on every node: {leaves:?}"
    );
    let first = leaves[0].clone();

    // Visible where an operator looks: the expiry gauge and one issued order.
    ensure!(
        metrics.lines().any(|l| l.starts_with(&format!(
            "drover_certificate_expiry_timestamp_seconds{{host=\"{host}\"}}"
        ))) && metrics
            .lines()
            .any(|l| l == "drover_acme_orders_total{outcome=\"issued\"} 1"),
        "{metrics}"
    );
    // Port 80 sends the host to https, except the challenge path.
    let plain = http_get_host(&format!("{}:{http_port}", w1.addr), host, "/")?;
    ensure!(plain.status == 301, "port 80 on w1: {}", plain.status);
    let challenge = http_get_host(
        &format!("{}:{http_port}", w1.addr),
        host,
        "/.well-known/acme-challenge/nothing",
    )?;
    ensure!(
        challenge.status == 404,
        "the challenge path is not redirected: {}",
        challenge.status
    );

    // Every drover restarts: what was kept in Swarm is served again, and nothing is ordered.
    let drover = s.service("drover");
    let before = m1.containers(&drover)?;
    s.cluster
        .docker(&["service", "update", "--detach", "--force", &drover])?;
    let gauge = format!("drover_certificate_expiry_timestamp_seconds{{host=\"{host}\"}}");
    let again = wait_until(SWARM + ISSUED, Duration::from_secs(1), || {
        m1.containers(&drover)
            .is_ok_and(|now| !now.is_empty() && now.iter().all(|c| !before.contains(c)))
            && m1
                .get_inside_as(&drover, 9091, "/metrics", Some(&token))
                .is_ok_and(|m| m.contains(&gauge))
    });
    ensure!(again, "the restarted controller shows the kept certificate");
    let metrics = m1.get_inside_as(&s.service("drover"), 9091, "/metrics", Some(&token))?;
    ensure!(
        !metrics.contains("drover_acme_orders_total{outcome=\"issued\"}"),
        "the restarted controller ordered again:\n{metrics}"
    );
    for node in [m1, w1, w2] {
        let (_, leaf) = served(node, tls_port, host, &root)?;
        ensure!(
            leaf == first,
            "{} serves another certificate after the restart",
            node.short
        );
    }
    dns(&[host, alias], "", false)?;
    Ok(())
}

/// Renewal set to come almost at once (`renew_when_left` close to 1): every renewed
/// certificate reaches every node's nginx with no step by anyone, until the ledger refuses
/// the sixth certificate for the same names within the week, on the status page. A name
/// the CA cannot validate (its DNS points where no nginx listens) fails with the CA's
/// words and backs off, and the other host is served all along.
#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn renewals_reach_every_node_until_the_ledger_refuses_a_sixth_and_a_name_that_cannot_validate_backs_off_alone()
-> Result<()> {
    require_e2e!();
    let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
    let w = World::deploy(1, "  hosts: all\n  renew_when_left: 0.9999999\n")?;
    let (s, dir, http_port, m1_host) = (&w.stack, &w.dir, w.http_port, w.m1_host.clone());
    // The shipped operator listener wants the ops token.
    let token = s.ops_token()?;
    let tls_port = http_port + 1;
    let (m1, w1) = (s.cluster.node("m1"), s.cluster.node("w1"));
    let (good, bad) = ("renew.acme.test", "bad.acme.test");
    dns(&[good], &w1.addr, true)?;
    // Nothing listens on the host's side of the veth on nginx's port.
    dns(&[bad], &m1_host, true)?;
    for (name, host) in [("acme-renew", good), ("acme-bad", bad)] {
        s.cluster
            .create_routed(name, NET, &[("routing-host", host), ("routing-port", "80")])?;
    }
    let root = pebble_root(&pebble_ca, dir.path())?;

    // Certificates as served: each new one on both nodes, until the ledger stops them.
    let mut seen: Vec<String> = Vec::new();
    let mut last = String::new();
    let drover = s.service("drover");
    let refused = wait_until(SWARM + 4 * ISSUED, Duration::from_secs(1), || {
        let leaves: Vec<String> = [m1, w1]
            .iter()
            .map(|n| {
                served(n, tls_port, good, &root)
                    .map(|(_, l)| l)
                    .unwrap_or_default()
            })
            .collect();
        if !leaves[0].is_empty() && leaves[0] == leaves[1] && !seen.contains(&leaves[0]) {
            seen.push(leaves[0].clone());
        }
        last = m1
            .get_inside_as(&drover, 9091, "/", Some(&token))
            .unwrap_or_default();
        last.contains("5 certificates for exactly [renew.acme.test]")
    });
    ensure!(
        refused,
        "the ledger's refusal on the status page; {} certificates seen on both nodes:\n{}",
        seen.len(),
        last
    );
    ensure!(
        seen.len() >= 2,
        "a renewed certificate served on every node: {seen:?}"
    );
    // The name that cannot validate: the CA's words on the status page, and a retry time.
    ensure!(
        last.contains(r#"data-host="bad.acme.test""#) && last.contains("ended invalid"),
        "{last}"
    );
    let metrics = m1.get_inside_as(&drover, 9091, "/metrics", Some(&token))?;
    let count = |outcome: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "drover_acme_orders_total{{outcome=\"{outcome}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    ensure!(count("issued") == 5 && count("refused") >= 1, "{metrics}");
    ensure!(
        count("failed") <= 2,
        "the bad name backs off (1 min, then 2): {metrics}"
    );
    dns(&[good, bad], "", false)?;
    Ok(())
}

/// Pebble's issuing root (new at every Pebble start), as a PEM file in `dir`.
fn pebble_root(pebble_ca: &str, dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let root = dir.join("pebble-root.pem");
    let got = wait_until(SWARM, Duration::from_secs(1), || {
        Command::new("curl")
            .args(["-fsS", "--cacert", pebble_ca, "-o"])
            .arg(&root)
            .arg("https://127.0.0.1:15000/roots/0")
            .status()
            .is_ok_and(|s| s.success())
    });
    ensure!(got, "Pebble's root");
    Ok(root)
}

/// The second compose file docs/certificates.md shows for a private CA's root (the
/// relay's CA in `dir`); its path.
fn ca_compose_file(dir: &std::path::Path) -> Result<String> {
    let ca_copy = dir.join("acme-ca.pem");
    std::fs::copy(dir.join("ca.pem"), &ca_copy)?;
    let extra = dir.join("stack.acme-ca.yml");
    std::fs::write(
        &extra,
        format!(
            "version: \"3.7\"\nservices:\n  drover:\n    configs:\n      - source: drover-config\n        target: /etc/drover/drover.yml\n        mode: 0444\n      - source: acme-ca\n        target: /etc/drover/ca.pem\n        mode: 0444\nconfigs:\n  acme-ca:\n    file: {}\n",
            ca_copy.display()
        ),
    )?;
    Ok(extra.display().to_string())
}
