//! Rolling updates under load: how many requests through a worker's nginx fail while Swarm
//! replaces an app's tasks, and their p99 latency. The shipped `stack.yml` runs unchanged on
//! a Swarm of three managers and two workers built from network-namespace nodes
//! (tests/support/cluster.rs), nginx on every node; the app's tasks run off the worker whose
//! nginx (w1's) is asked, so every request crosses the overlay. Three kinds of app, each
//! rolled start-first one task at a time: `plain` (busybox httpd, no health check, exits at
//! SIGTERM), `graceful` (answers 3 s past SIGTERM, then exits) and `health-checked` (Swarm
//! stops an old task once its successor answers). Then one rollout of the health-checked
//! app while the Raft leader's engine stops, and one (the app on the managers) while the
//! other worker's engine stops.
//!
//!   scripts/test setup >/dev/null && eval "$(scripts/test env)"
//!   cargo bench --profile ci --bench rollouts     # BENCH_ROLLOUTS=20, BENCH_RATE=100
//!
//! Prints, per run: rollouts, requests, failures (each with its reason) and the p50/p99/max
//! latency during the rollouts. `cargo test --all-targets` builds this and runs it without
//! `--bench`: then it measures nothing and returns at once.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::cluster::{AppKind, Cluster, ShippedStack};
use support::{Context, Result, build_push, http_get_host, unique, wait_for};

const HTTP_PORT: u16 = 8088;
const NETWORK: &str = "roll-web";
const SWARM: Duration = Duration::from_secs(180);

/// What happens to the cluster while an app is rolled.
#[derive(Clone, Copy, PartialEq)]
enum Loss {
    None,
    Leader,
    Worker,
}

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let env = |name: &str, default: u32| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rollouts, rate) = (env("BENCH_ROLLOUTS", 20), env("BENCH_RATE", 100));
    let mut stack = ShippedStack::deploy(Cluster::new(3, 2)?, NETWORK, "roll.test", HTTP_PORT)?;
    let runs = [
        ("plain", AppKind::Plain, Loss::None, rollouts),
        (
            "graceful",
            AppKind::Graceful { drain: 3 },
            Loss::None,
            rollouts,
        ),
        (
            "health-checked",
            AppKind::HealthChecked { delay: 0 },
            Loss::None,
            rollouts,
        ),
        (
            "leader loss",
            AppKind::HealthChecked { delay: 0 },
            Loss::Leader,
            1,
        ),
        (
            "worker loss",
            AppKind::HealthChecked { delay: 0 },
            Loss::Worker,
            1,
        ),
    ];
    for (label, kind, loss, n) in runs {
        roll(&mut stack, label, kind, loss, n, rate)?;
    }
    Ok(())
}

/// Creates an app of `kind`, rolls it `n` times under `rate` requests/s through w1's nginx
/// (stopping a node's engine at the first rollout when `loss` says so, and starting it again
/// after the last), prints the figures and removes the app.
fn roll(
    stack: &mut ShippedStack,
    label: &str,
    kind: AppKind,
    loss: Loss,
    n: u32,
    rate: u32,
) -> Result<()> {
    let w1 = stack.cluster.node("w1");
    let nginx = format!("{}:{HTTP_PORT}", w1.addr);
    // The app's tasks stay off w1 (every request crosses the overlay). For the worker loss
    // they stay on the managers: Swarm does not finish a rollout while a task it must
    // replace sits on a node that is down, so what is measured is the other cause of loss,
    // a dead node's agent delaying the delivery to the live ones.
    let placement = match loss {
        Loss::Worker => "node.role==manager".to_owned(),
        _ => format!("node.hostname!={}", w1.hostname),
    };
    let name = unique("roll");
    let host = format!("{name}.test");
    let image = format!("127.0.0.1:5000/drover-bench/{name}:latest");
    build_push(&image, "v0", "")?;
    stack
        .cluster
        .create_app(NETWORK, &name, &host, &image, 3, &placement, kind)?;
    wait_for("the app through w1's nginx", SWARM, || {
        http_get_host(&nginx, &host, "/version").is_ok_and(|r| r.body.trim() == "v0")
    })?;
    let lost = match loss {
        Loss::None => None,
        Loss::Leader => Some(stack.cluster.leader()?.short.clone()),
        Loss::Worker => Some("w2".to_owned()),
    };
    let load = Load::start(&nginx, &host, rate);
    for i in 1..=n {
        let pushed = build_push(&image, &format!("v{i}"), "")?;
        let digest = pushed.rsplit('@').next().unwrap_or_default().to_owned();
        let pinned = format!("{image}@{digest}");
        stack
            .cluster
            .docker(&["service", "update", "--detach", "--image", &pinned, &name])?;
        if let (Some(short), 1) = (&lost, i) {
            let index = stack
                .cluster
                .nodes
                .iter()
                .position(|n| &n.short == short)
                .context("lost node")?;
            stack.cluster.nodes[index].stop_engine();
            eprintln!("{label}: {short}'s engine stopped during rollout 1");
        }
        wait_for(&format!("{label} rollout {i}"), SWARM, || {
            stack
                .cluster
                .docker(&[
                    "service",
                    "inspect",
                    "--format",
                    "{{.Spec.TaskTemplate.ContainerSpec.Image}} {{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
                    &name,
                ])
                .is_ok_and(|s| s.contains(&digest) && s.ends_with("completed"))
        })?;
        eprintln!("{label}: rollout {i} completed");
    }
    // Past the last old task's stop (a graceful one drains 3 s) and drover's debounce.
    std::thread::sleep(Duration::from_secs(6));
    let (mut took, failures, elapsed) = load.finish();
    took.sort();
    let pick = |q: f64| {
        took.get(((took.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0, |d| d.as_millis())
    };
    println!(
        "{label}: {n} rollouts, {} requests in {elapsed:?} ({:.0}/s), {} failed; latency p50 {} ms, p99 {} ms, max {} ms",
        took.len() + failures.len(),
        (took.len() + failures.len()) as f64 / elapsed.as_secs_f64(),
        failures.len(),
        pick(0.5),
        pick(0.99),
        pick(1.0)
    );
    for f in failures.iter().take(20) {
        println!("  {f}");
    }
    stack.cluster.docker(&["service", "rm", &name])?;
    if let Some(short) = lost {
        let node = stack
            .cluster
            .nodes
            .iter_mut()
            .find(|n| n.short == short)
            .context("lost node")?;
        node.start_engine()?;
        node.wait_engine(SWARM)?;
        let every = stack.cluster.nodes.len();
        wait_for("every node ready again", SWARM, || {
            stack
                .cluster
                .docker(&["node", "ls", "--format", "{{.Status}}"])
                .is_ok_and(|out| out.lines().filter(|l| *l == "Ready").count() == every)
        })?;
    }
    Ok(())
}

/// GET /version at a steady rate from threads of 50 requests/s each, one connection per
/// request; the time of each answered request, and each failure with its reason.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    took: Arc<Mutex<Vec<Duration>>>,
    failures: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

impl Load {
    fn start(addr: &str, host: &str, rate: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let took = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let n = rate.div_ceil(50).max(1);
        let period = Duration::from_secs(1) * n / rate.max(1);
        let started = Instant::now();
        let threads = (0..n)
            .map(|_| {
                let (addr, host) = (addr.to_owned(), host.to_owned());
                let (stop, took, failures) = (stop.clone(), took.clone(), failures.clone());
                std::thread::spawn(move || {
                    let mut due = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        match http_get_host(&addr, &host, "/version") {
                            Ok(r) if r.status == 200 => {
                                took.lock().map(|mut t| t.push(at.elapsed())).ok();
                            }
                            Ok(r) => {
                                let why = format!("{} {}", r.status, r.body.trim());
                                failures.lock().map(|mut f| f.push(why)).ok();
                            }
                            Err(e) => {
                                failures.lock().map(|mut f| f.push(e.to_string())).ok();
                            }
                        }
                        due += period;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            took,
            failures,
            started,
        }
    }

    fn finish(self) -> (Vec<Duration>, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let took = std::mem::take(&mut *self.took.lock().unwrap_or_else(|e| e.into_inner()));
        let failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()));
        (took, failures, self.started.elapsed())
    }
}
