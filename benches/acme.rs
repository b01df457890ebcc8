//! A new TLS host → its certificate served on every node: how long after
//! `docker service create` of a service labelled `routing-acme: "true"` every node's nginx
//! serves a certificate for its host that chains to Pebble's root (over h2). The shipped
//! `stack.yml` in cluster mode on one manager and two workers (namespace nodes,
//! tests/support/cluster.rs), `certificates:` naming Pebble through the relay the e2e tests
//! use (tests/support/acme.rs); the CA validates through w2's nginx. Hosts are added one at
//! a time, each after the previous one was served everywhere.
//!
//!   scripts/test setup >/dev/null && eval "$(scripts/test env)"
//!   cargo bench --profile ci --bench acme                 # BENCH_HOSTS=5 default
//!
//! Prints, per host and as median and max: from the create to every node serving it, and
//! from Swarm's `running` of its task to every node serving it (drover's share: the order,
//! the token on every node, Pebble's validation, the delivery). `cargo test --all-targets`
//! builds this and runs it without `--bench`: then it measures nothing and returns at once.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant, SystemTime};

use support::acme::{PEBBLE, World, dns, pebble_root, served, var};
use support::{Context, Result, ensure};

const NETWORK: &str = "acmebench-web";
/// Beyond this a host is a failure, not a slow measurement.
const HOST_LIMIT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(100);

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let hosts: usize = std::env::var("BENCH_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
    let w = World::deploy(NETWORK, "app.acmebench.test", 2, "  hosts: label\n")?;
    let tls_port = w.http_port + 1;
    let cluster = &w.stack.cluster;
    let nodes = [cluster.node("m1"), cluster.node("w1"), cluster.node("w2")];
    let root = pebble_root(&pebble_ca, w.dir.path(), &PEBBLE)?;
    let run = std::process::id();
    let mut from_create = Vec::new();
    let mut from_running = Vec::new();
    let mut names = Vec::new();
    for i in 0..hosts {
        let host = format!("b{i}-{run}.acmebench.test");
        names.push(host.clone());
        dns(&[&host], &nodes[2].addr, true)?;
        let service = format!("acmebench-{i}");
        let created = Instant::now();
        let created_at = SystemTime::now();
        cluster.create_routed(
            &service,
            NETWORK,
            &[
                ("routing-host", &host),
                ("routing-port", "80"),
                ("routing-acme", "true"),
            ],
        )?;
        loop {
            let everywhere = nodes.iter().all(|n| {
                served(n, tls_port, &host, &root)
                    .is_ok_and(|(v, leaf)| v == "2" && !leaf.is_empty())
            });
            if everywhere {
                break;
            }
            ensure!(
                created.elapsed() < HOST_LIMIT,
                "{host} not served everywhere after {HOST_LIMIT:?}"
            );
            std::thread::sleep(POLL);
        }
        let took = created.elapsed();
        let served_at = created_at + took;
        let task = cluster
            .running_tasks(&service)?
            .into_iter()
            .next()
            .context("the host's task")?
            .0;
        let at = cluster.docker(&[
            "inspect",
            "--type",
            "task",
            "--format",
            "{{json .Status.Timestamp}}",
            &task,
        ])?;
        let running = humantime::parse_rfc3339(at.trim().trim_matches('"'))
            .with_context(|| format!("task timestamp {at:?}"))?;
        let drover = served_at.duration_since(running).unwrap_or_default();
        eprintln!(
            "host {:>2}: served on 3 nodes {:.1} s after the create, {:.1} s after its task ran",
            i + 1,
            took.as_secs_f64(),
            drover.as_secs_f64()
        );
        from_create.push(took);
        from_running.push(drover);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    dns(&refs, "", false)?;
    let summary = |v: &mut Vec<Duration>| {
        v.sort();
        format!(
            "median {:.1} s, max {:.1} s",
            v[v.len() / 2].as_secs_f64(),
            v[v.len() - 1].as_secs_f64()
        )
    };
    println!(
        "new TLS host -> certificate served on every node (1 manager + 2 workers, Pebble), {} hosts: \
         from the create {}; from its task running {}",
        hosts,
        summary(&mut from_create),
        summary(&mut from_running)
    );
    Ok(())
}
