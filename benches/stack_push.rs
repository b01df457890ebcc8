//! A push → its new version served through nginx: how long after `git push` returns (its
//! `post-receive` hook has sent the signed GitHub delivery by then) nginx serves the
//! pushed content. The shipped `stack.yml` on a one-manager Swarm of namespace nodes with
//! deploy/drover.yml's `stacks:` block enabled (tests/support/stacks.rs, as the e2e test
//! `the_shipped_stack_deploys_a_pushed_stack_repository_...` runs it); each push edits
//! www/index.html of deploy/example-stack (a Swarm config named by its content, two
//! replicas, start-first). Pushes go one at a time, each after the previous one's job
//! finished.
//!
//!   scripts/test setup >/dev/null && eval "$(scripts/test env)"
//!   cargo bench --profile ci --bench stack_push           # BENCH_PUSHES=10 default
//!
//! Prints, per push and as p50, p95 and max: from the push to the first answer of nginx
//! with the new page, and to every answer being the new page (the rollout's end, as
//! clients see it); the push itself (commit, push, the hook's delivery) beside.
//! `cargo test --all-targets` builds this and runs it without `--bench`: then it measures
//! nothing and returns at once.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::stacks::{ShippedStacks, wait_push_finished};
use support::{Result, ensure, http_get_host};

/// nginx's port inside the namespace node.
const HTTP_PORT: u16 = 8490;
/// nginx is asked this often.
const POLL: Duration = Duration::from_millis(50);
/// Requests in one poll: enough for nginx's round robin to reach both replicas.
const PER_POLL: usize = 4;
/// Beyond this a push is a failure, not a slow measurement.
const PUSH_LIMIT: Duration = Duration::from_secs(180);

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let pushes: usize = std::env::var("BENCH_PUSHES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let w = ShippedStacks::deploy("pb", HTTP_PORT)?;
    // How many of PER_POLL answers through nginx are `page`.
    let answers = |page: &str| {
        (0..PER_POLL)
            .filter(|_| {
                http_get_host(&w.nginx, &w.hello_host, "/")
                    .is_ok_and(|r| r.status == 200 && r.body == page)
            })
            .count()
    };
    let push = |page: &str| -> Result<(Duration, Duration, Duration)> {
        let started = Instant::now();
        let commit = w.push_example(page)?;
        let pushed = Instant::now();
        let mut first = None;
        loop {
            let n = answers(page);
            if n > 0 && first.is_none() {
                first = Some(pushed.elapsed());
            }
            if n == PER_POLL {
                break;
            }
            ensure!(
                pushed.elapsed() < PUSH_LIMIT,
                "{page:?} not served after {PUSH_LIMIT:?}"
            );
            std::thread::sleep(POLL);
        }
        let every = pushed.elapsed();
        let jobs = wait_push_finished(&w.s, &w.hooks, &w.token, &commit, PUSH_LIMIT)?;
        ensure!(
            jobs.len() == 1 && jobs[0]["state"] == "completed",
            "the push of {commit}: {jobs:?}"
        );
        let first = first.unwrap_or(every);
        Ok((pushed - started, first, every))
    };
    // The first push creates the stack and pulls its image on the node: not measured.
    push("version 0\n")?;
    let (mut firsts, mut everys) = (Vec::new(), Vec::new());
    for i in 1..=pushes {
        let (git, first, every) = push(&format!("version {i}\n"))?;
        eprintln!(
            "push {i:>2}: served {:.2} s after the push, only the new page {:.2} s (git push {:.2} s)",
            first.as_secs_f64(),
            every.as_secs_f64(),
            git.as_secs_f64()
        );
        firsts.push(first);
        everys.push(every);
    }
    println!(
        "push -> new version served through nginx (shipped stack, example stack, 2 replicas), \
         {pushes} pushes: first new answer {}; every answer new {}",
        summary(&mut firsts),
        summary(&mut everys)
    );
    Ok(())
}

/// p50, p95 (nearest rank) and max.
fn summary(v: &mut [Duration]) -> String {
    v.sort();
    let rank = |p: usize| v[(v.len() * p).div_ceil(100).max(1) - 1].as_secs_f64();
    format!(
        "p50 {:.2} s, p95 {:.2} s, max {:.2} s",
        rank(50),
        rank(95),
        v[v.len() - 1].as_secs_f64()
    )
}
