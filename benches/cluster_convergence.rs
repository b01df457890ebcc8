//! Cross-node convergence: how long after Swarm reports a new task `running` the nginx on a
//! *worker* node has it in its file, delivered by the controller on the manager through the
//! worker's agent. The shipped `stack.yml` runs unchanged on a Swarm of one manager and two
//! workers built from network-namespace nodes (tests/support/cluster.rs), and its app is
//! scaled up one task at a time, in cycles of 2 → 6 (each scale-down back to 2 is not
//! measured).
//!
//!   scripts/test setup >/dev/null && eval "$(scripts/test env)"
//!   cargo bench --profile ci --bench cluster_convergence          # BENCH_STEPS=100 default
//!
//! Prints p50, p99 and max of the lag in milliseconds. `cargo test --all-targets` builds
//! this and runs it without `--bench`: then it measures nothing and returns at once.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use support::cluster::{Cluster, ShippedStack};
use support::{Context, Result, ensure, upstream_ips};

const HTTP_PORT: u16 = 8086;
const NETWORK: &str = "conv-web";
/// The file is read from the worker's volume this often.
const POLL: Duration = Duration::from_millis(5);
/// Beyond this a step is a failure, not a slow measurement.
const STEP_LIMIT: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let steps: usize = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let stack = ShippedStack::deploy(Cluster::new(1, 2)?, NETWORK, "conv.test", HTTP_PORT)?;
    let app = stack.service("app");
    let worker = stack.cluster.node("w1");
    let file = worker.data_root().join(format!(
        "volumes/{}_nginx-conf/_data/drover.conf",
        stack.name
    ));
    let listed = || -> BTreeSet<String> {
        std::fs::read_to_string(&file)
            .map(|t| upstream_ips(&t).into_iter().collect())
            .unwrap_or_default()
    };
    // Every step starts from a steady cluster: the tasks before it all running and listed.
    let steady = |n: usize| {
        wait(|| listed().len() == n && running_tasks(&stack, &app).is_ok_and(|t| t.len() == n))
    };
    steady(2).context("the first 2 tasks never ran and reached the worker's file")?;

    let mut lags = Vec::with_capacity(steps);
    let mut replicas = 2;
    while lags.len() < steps {
        if replicas == 6 {
            scale(&stack, &app, 2)?;
            replicas = 2;
            steady(2).context("scale down to 2 never reached the worker")?;
        }
        steady(replicas).context("the cluster never settled")?;
        let before = running_tasks(&stack, &app)?;
        replicas += 1;
        scale(&stack, &app, replicas)?;
        wait(|| listed().len() == replicas)
            .with_context(|| format!("the worker's file never listed {replicas} tasks"))?;
        let seen = SystemTime::now();
        let new: Vec<String> = running_tasks(&stack, &app)?
            .difference(&before)
            .cloned()
            .collect();
        ensure!(new.len() == 1, "one new task per step, got {new:?}");
        let at = stack.cluster.docker(&[
            "inspect",
            "--type",
            "task",
            "--format",
            "{{json .Status.Timestamp}}",
            &new[0],
        ])?;
        let running = humantime::parse_rfc3339(at.trim().trim_matches('"'))
            .with_context(|| format!("task timestamp {at:?}"))?;
        let lag = seen.duration_since(running).unwrap_or_default();
        lags.push(lag);
        eprintln!("step {:>3}: {} ms", lags.len(), lag.as_millis());
    }
    lags.sort();
    let pick = |q: f64| lags[((lags.len() as f64 - 1.0) * q).round() as usize].as_millis();
    println!(
        "cross-node convergence over {} scale-ups (task running on any node -> worker's nginx file): \
         p50 {} ms, p99 {} ms, max {} ms",
        lags.len(),
        pick(0.5),
        pick(0.99),
        pick(1.0)
    );
    Ok(())
}

fn scale(stack: &ShippedStack, service: &str, replicas: usize) -> Result<()> {
    stack.cluster.docker(&[
        "service",
        "scale",
        "--detach",
        &format!("{service}={replicas}"),
    ])?;
    Ok(())
}

/// Ids of the tasks of `service` that run now.
fn running_tasks(stack: &ShippedStack, service: &str) -> Result<BTreeSet<String>> {
    Ok(stack
        .cluster
        .running_tasks(service)?
        .into_iter()
        .map(|(task, _)| task)
        .collect())
}

fn wait(mut done: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !done() {
        ensure!(start.elapsed() < STEP_LIMIT, "gave up after {STEP_LIMIT:?}");
        std::thread::sleep(POLL);
    }
    Ok(())
}
