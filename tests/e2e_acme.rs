//! drover's own ACME client end to end (issue 22): the shipped stack on a Swarm of one
//! manager and two workers (namespace nodes), nginx on every node, Let's Encrypt's Pebble
//! as the CA.
//!
//! The CA validates through a worker's nginx (the test's DNS points the names there), so
//! the token must have reached a node that is not the controller; the certificate must
//! then be served by every node's nginx, chained to Pebble's root, over h2. A restart of
//! every drover orders nothing: the same certificate is served after it, and so does the
//! loss of the Raft leader's node (three managers). A second Pebble that wants external
//! account binding issues only to drover configured with `certificates.eab`.
//!
//! Pebble listens on the host's loopback; the controller's container reaches it through a
//! TLS relay on the host's side of the manager's veth (socat, with a certificate for that
//! address), which the test's config names as the directory and trusts through
//! `certificates.ca_file`, mounted the way docs/certificates.md says: a Swarm config added
//! by a second compose file. The helpers are in tests/support/acme.rs (benches/acme.rs
//! uses them too).

mod support;

use std::time::Duration;

use support::acme::*;
use support::cluster::{Cluster, Node};
use support::*;

const SWARM: Duration = Duration::from_secs(120);
/// A new TLS host's certificate on every node (the design's target is 60 s; shared cores).
const ISSUED: Duration = Duration::from_secs(120);
const NET: &str = "acme-web";
const APP_HOST: &str = "app.acme.test";

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_new_tls_host_gets_a_certificate_from_pebble_through_a_workers_nginx_served_by_every_node_and_a_restart_orders_nothing()
-> Result<()> {
    require_e2e!();
    let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
    let w = World::deploy(NET, APP_HOST, 2, "  hosts: label\n")?;
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

    let root = pebble_root(&pebble_ca, dir.path(), &PEBBLE)?;

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
    let w = World::deploy(
        NET,
        APP_HOST,
        1,
        "  hosts: all\n  renew_when_left: 0.9999999\n",
    )?;
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
    let root = pebble_root(&pebble_ca, dir.path(), &PEBBLE)?;

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

/// A CA that wants external account binding: drover's client without a binding, or with
/// another key, gets no account there; drover with `certificates.eab` (its key mounted as a
/// Swarm secret, the way docs/certificates.md shows) gets a certificate that the node's
/// nginx serves, chained to that CA's root, and its key is in no log.
#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_ca_that_wants_external_account_binding_refuses_an_account_without_it_and_issues_with_it()
-> Result<()> {
    require_e2e!();
    let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
    let kid = unique("drover-kid");
    let key = random_key()?;
    let pebble = EabPebble::start(&kid, &key)?;

    // The client, straight at the CA: refused without a binding and with a wrong key.
    let runtime = tokio::runtime::Runtime::new()?;
    let ca_path = std::path::PathBuf::from(&pebble_ca);
    let connect = |binding: Option<drover::certs::acme::BindingKey>| {
        runtime.block_on(drover::certs::acme::Client::connect(
            &pebble.directory(),
            Some(&ca_path),
            None,
            binding.as_ref(),
        ))
    };
    let keys = temp_dir("acme-eab-keys")?;
    let key_file = |name: &str, value: &str| -> Result<std::path::PathBuf> {
        let path = keys.path().join(name);
        std::fs::write(&path, format!("{value}\n"))?;
        Ok(path)
    };
    let binding = |kid: &str, file: &std::path::Path| {
        drover::certs::acme::BindingKey::load(kid, file).map_err(anyhow::Error::msg)
    };
    let without = connect(None).err().context("an account without binding")?;
    ensure!(
        without.to_string().contains("externalAccountRequired"),
        "without a binding: {without}"
    );
    let wrong = connect(Some(binding(&kid, &key_file("wrong", &random_key()?)?)?))
        .err()
        .context("an account bound with another key")?;
    ensure!(
        !wrong.to_string().contains(&key),
        "the CA's answer shows no key: {wrong}"
    );

    // drover, as shipped, with the binding: a certificate, served.
    let right = key_file("acme-eab", &key)?;
    let w = World::deploy_to(
        Cluster::new(1, 0)?,
        NET,
        APP_HOST,
        &pebble.ca,
        &format!(
            "  hosts: label\n  eab:\n    kid: {kid}\n    hmac_key_file: /run/secrets/acme-eab\n"
        ),
        &[("acme-eab", right.as_path())],
    )?;
    let s = &w.stack;
    let m1 = s.cluster.node("m1");
    let tls_port = w.http_port + 1;
    let host = "eab.acme.test";
    dns(&[host], &m1.addr, true)?;
    s.cluster.create_routed(
        "acme-eab",
        NET,
        &[
            ("routing-host", host),
            ("routing-port", "80"),
            ("routing-acme", "true"),
        ],
    )?;
    let root = pebble_root(&pebble_ca, w.dir.path(), &pebble.ca)?;
    let mut last = String::new();
    let served_ok = wait_until(SWARM + ISSUED, Duration::from_secs(1), || {
        match served(m1, tls_port, host, &root) {
            Ok((v, leaf)) if v == "2" && !leaf.is_empty() => true,
            Ok((v, _)) => {
                last = format!("HTTP/{v}");
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    let drover = s.service("drover");
    let logs = m1.container_logs(&drover).unwrap_or_default();
    ensure!(
        served_ok,
        "a certificate from the CA that wants a binding, chained to its root: {last}\n{}",
        logs.lines()
            .filter(|l| l.contains("certificates"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        logs.contains("certificates: ACME account created"),
        "the account was created by this drover:\n{logs}"
    );
    ensure!(!logs.contains(&key), "the HMAC key is in drover's log");
    dns(&[host], "", false)?;
    Ok(())
}

/// The controller's node goes away (its engine stops, as in e2e_failover): the drover on
/// the new Raft leader reads the account and the certificate back from the sealed Swarm
/// configs, the surviving nodes serve the same certificate, and nothing is ordered again.
#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn after_a_leader_loss_the_new_controller_serves_the_kept_certificate_and_orders_nothing()
-> Result<()> {
    require_e2e!();
    let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
    let mut w = World::deploy_to(
        Cluster::new(3, 0)?,
        NET,
        APP_HOST,
        &PEBBLE,
        "  hosts: label\n",
        &[],
    )?;
    let token = w.stack.ops_token()?;
    let tls_port = w.http_port + 1;
    let drover = w.stack.service("drover");
    let host = "kept.acme.test";
    // The CA validates through m2, which stays.
    dns(&[host], &w.stack.cluster.node("m2").addr, true)?;
    w.stack.cluster.create_routed(
        "acme-kept",
        NET,
        &[
            ("routing-host", host),
            ("routing-port", "80"),
            ("routing-acme", "true"),
        ],
    )?;
    let root = pebble_root(&pebble_ca, w.dir.path(), &PEBBLE)?;
    let old = w.stack.cluster.leader()?.short.clone();
    let same_leaf_on = |nodes: &[&Node], last: &mut String| -> Option<String> {
        let mut leaves = Vec::new();
        for node in nodes {
            match served(node, tls_port, host, &root) {
                Ok((v, leaf)) if v == "2" && !leaf.is_empty() => leaves.push(leaf),
                Ok((v, _)) => {
                    *last = format!("{} HTTP/{v}", node.short);
                    return None;
                }
                Err(e) => {
                    *last = e.to_string();
                    return None;
                }
            }
        }
        leaves.dedup();
        (leaves.len() == 1).then(|| leaves.remove(0))
    };
    let mut last = String::new();
    let mut first = None;
    {
        let all: Vec<&Node> = w.stack.cluster.nodes.iter().collect();
        wait_until(SWARM + ISSUED, Duration::from_secs(1), || {
            first = same_leaf_on(&all, &mut last);
            first.is_some()
        });
    }
    let first = first.with_context(|| format!("one certificate on every node: {last}"))?;
    let metrics =
        w.stack
            .cluster
            .node(&old)
            .get_inside_as(&drover, 9091, "/metrics", Some(&token))?;
    ensure!(
        metrics
            .lines()
            .any(|l| l == "drover_acme_orders_total{outcome=\"issued\"} 1"),
        "one order on the first controller ({old}):\n{metrics}"
    );

    // The controller's node goes away.
    let index = w
        .stack
        .cluster
        .nodes
        .iter()
        .position(|n| n.short == old)
        .context("the leader's node")?;
    w.stack.cluster.nodes[index].stop_engine();
    let mut new = String::new();
    wait_for("a new Raft leader", Duration::from_secs(90), || {
        match w.stack.cluster.leader() {
            Ok(n) if n.short != old => {
                new = n.short.clone();
                true
            }
            _ => false,
        }
    })?;
    let s = &w.stack;
    let leader = s.cluster.node(&new);
    // The new controller's one line after its first look says what it held and ordered.
    let mut took_over = String::new();
    wait_for("the new controller's first look", SWARM, || {
        match leader.container_logs(&drover) {
            Ok(logs) => match logs.lines().find(|l| l.contains("certificates: took over")) {
                Some(l) => {
                    took_over = format!("{l}\n{logs}");
                    true
                }
                None => {
                    took_over = logs;
                    false
                }
            },
            Err(_) => false,
        }
    })
    .with_context(|| took_over.clone())?;
    let line = took_over.lines().next().unwrap_or_default();
    eprintln!("leader {old} lost; {new}'s drover: {line}");
    ensure!(
        (line.contains("certificates=1") || line.contains(r#""certificates":1"#))
            && (line.contains("ordered=0") || line.contains(r#""ordered":0"#)),
        "the new controller ({new}) holds the certificate and ordered nothing: {took_over}"
    );
    ensure!(
        !took_over.contains("certificates: ordering"),
        "the new controller ordered: {took_over}"
    );
    let metrics = leader.get_inside_as(&drover, 9091, "/metrics", Some(&token))?;
    ensure!(
        !metrics.contains("drover_acme_orders_total{"),
        "no order, failed or refused, on the new controller:\n{metrics}"
    );
    ensure!(
        metrics.contains(&format!(
            "drover_certificate_expiry_timestamp_seconds{{host=\"{host}\"}}"
        )),
        "the new controller shows the kept certificate:\n{metrics}"
    );
    let left: Vec<&Node> = s.cluster.nodes.iter().filter(|n| n.short != old).collect();
    let mut last = String::new();
    let kept = wait_until(SWARM, Duration::from_secs(1), || {
        same_leaf_on(&left, &mut last).is_some_and(|l| l == first)
    });
    ensure!(
        kept,
        "the surviving nodes serve the first certificate: {last}"
    );
    dns(&[host], "", false)?;
    Ok(())
}
