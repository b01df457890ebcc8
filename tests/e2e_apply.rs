//! End-to-end: crash-safe apply (issue 12 item 5), through a real nginx on the test Swarm.
//!
//! A candidate is checked before it replaces the live file: one that fails `nginx -t`
//! never appears at the live path (a watcher reads it every millisecond), and a drover
//! killed (SIGKILL) while a check runs leaves the last good file live; started again, it
//! checks the candidate afresh and converges. A check that reads the live path (the old
//! way, still accepted) is covered by the record of the last good content: a file a crash
//! left unchecked is checked again after the restart and replaced by the last good one
//! when it fails.
//!
//! Run by `scripts/test` (`DROVER_E2E=1`, images built); skipped otherwise. Unique names
//! per test; everything is removed on drop.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::*;

/// How long drover and nginx may take to follow a change.
const BOUND: Duration = Duration::from_secs(40);

/// A server block answering `body` for `host`; `extra` goes inside it.
fn server(host: &str, body: &str, extra: &str) -> String {
    format!("server {{ listen 80; server_name {host}; {extra} return 200 \"{body}\\n\"; }}\n")
}

/// A user-template target writing `output`, checked by `check` (YAML) and reloading nginx.
fn config(http: &str, template: &Path, output: &Path, check: &str, nginx: &str) -> String {
    format!(
        r#"http: {{ listen: {http} }}
resync: 2s
targets:
  - name: staged
    template: {template}
    output: {output}
    debounce: {{ min: 100ms, max: 1s }}
    check: {check}
    notify:
      - signal: {{ service: {nginx}, signal: HUP }}
"#,
        template = template.display(),
        output = output.display(),
    )
}

fn nginx_check(nginx: &str) -> String {
    format!(r#"{{ exec: {{ service: {nginx}, command: ["nginx", "-t"] }} }}"#)
}

/// Reads every `*.conf` in `dir` as fast as it can until stopped, and keeps whatever it
/// saw holding `forbidden` (the file name and its content).
struct Watcher {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Watcher {
    fn start(dir: PathBuf, forbidden: &'static str) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut reads, mut seen) = (0u64, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !name.ends_with(".conf") {
                        continue;
                    }
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    reads += 1;
                    if text.contains(forbidden) && seen.len() < 5 {
                        seen.push(format!("{name}: {text}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (reads, seen)
        });
        Watcher {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits until nginx answers `GET /` for `host` with `body`.
fn wait_body(nginx: &NginxService, host: &str, body: &str) -> Result<()> {
    let mut last = None;
    let ok = wait_until(BOUND, Duration::from_millis(100), || {
        let r = nginx.get(host, "/");
        let done = matches!(&r, Ok(r) if r.status == 200 && r.body.trim() == body);
        last = Some(r);
        done
    });
    ensure!(
        ok,
        "{host} answers {body:?} within {BOUND:?}; last: {last:?}"
    );
    Ok(())
}

fn checks(drover: &DroverProcess, outcome: &str) -> f64 {
    metric_value(
        &drover.metrics(),
        "drover_checks_total",
        &[("target", "staged"), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_candidate_that_fails_nginx_t_never_appears_at_the_live_path() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("apply-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let host = format!("{}.test", unique("apply"));
    let dir = temp_dir("apply-tpl")?;
    let template = dir.path().join("t.tera");
    std::fs::write(&template, server(&host, "v1", ""))?;
    let live = nginx.conf("drover.conf");
    let http = format!("127.0.0.1:{}", free_port());
    let mut drover = DroverProcess::start(
        &config(
            &http,
            &template,
            &live,
            &nginx_check(nginx.name()),
            nginx.name(),
        ),
        Some(&http),
    )?;
    drover.wait_http_ok("/healthz", BOUND)?;
    wait_body(&nginx, &host, "v1")?;

    let watcher = Watcher::start(nginx.conf_dir.clone(), "not_a_directive");
    std::fs::write(&template, server(&host, "bad", "not_a_directive on;"))?;
    drover.signal("HUP")?;
    let refused = wait_until(BOUND, Duration::from_millis(100), || {
        checks(&drover, "failed") >= 1.0
    });
    assert!(
        refused,
        "the bad candidate was checked: {}",
        drover.metrics()
    );
    let r = nginx.get(&host, "/")?;
    assert_eq!(
        (r.status, r.body.trim()),
        (200, "v1"),
        "nginx still serves v1"
    );
    assert!(std::fs::read_to_string(&live)?.contains("\"v1\\n\""));

    std::fs::write(&template, server(&host, "v2", ""))?;
    drover.signal("HUP")?;
    wait_body(&nginx, &host, "v2")?;
    let (reads, seen) = watcher.finish();
    assert!(reads > 100, "the watcher read the directory {reads} times");
    assert!(
        seen.is_empty(),
        "the failing candidate showed up where nginx reads: {seen:?}"
    );
    let left: Vec<String> = std::fs::read_dir(&nginx.conf_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("candidate"))
        .collect();
    assert!(left.is_empty(), "no candidate left behind: {left:?}");
    assert!(
        !nginx.logs().contains("not_a_directive"),
        "nginx never loaded it"
    );
    assert!(drover.is_running());
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_drover_killed_mid_check_leaves_the_last_good_file_live_and_a_restart_converges() -> Result<()>
{
    require_e2e!();
    let net = create_overlay_network(&unique("apply-k-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let host = format!("{}.test", unique("apply-k"));
    let dir = temp_dir("apply-k-tpl")?;
    let template = dir.path().join("t.tera");
    let live = nginx.conf("drover.conf");
    let candidate = nginx.conf(".drover.conf.drover-candidate");
    let record = nginx.conf(".drover.conf.drover-good");
    let http = format!("127.0.0.1:{}", free_port());
    let checked = config(
        &http,
        &template,
        &live,
        &nginx_check(nginx.name()),
        nginx.name(),
    );

    std::fs::write(&template, server(&host, "v1", ""))?;
    let mut drover = DroverProcess::start(&checked, Some(&http))?;
    drover.wait_http_ok("/healthz", BOUND)?;
    wait_body(&nginx, &host, "v1")?;
    drop(drover);
    let v1 = std::fs::read_to_string(&live)?;
    assert_eq!(
        std::fs::read_to_string(&record)?,
        v1,
        "the last good is recorded"
    );

    // A check that looks at the staged candidate and takes its time: drover is killed
    // while it runs.
    std::fs::write(&template, server(&host, "v2", ""))?;
    let slow = r#"{ command: ["sh", "-c", "sleep 20; test -s \"$0\"", "{file}"] }"#;
    let mut drover = DroverProcess::start(
        &config(&http, &template, &live, slow, nginx.name()),
        Some(&http),
    )?;
    let staged = wait_until(BOUND, Duration::from_millis(50), || candidate.exists());
    assert!(staged, "the candidate is staged: {}", drover.logs());
    std::thread::sleep(Duration::from_millis(500));
    drover.signal("KILL")?;
    drover.wait_exit(Duration::from_secs(10))?;
    drop(drover);
    assert_eq!(
        std::fs::read_to_string(&live)?,
        v1,
        "the live file is the last good one"
    );
    wait_body(&nginx, &host, "v1")?;

    // Started again with nginx's check: the candidate is checked afresh and goes live.
    let mut drover = DroverProcess::start(&checked, Some(&http))?;
    drover.wait_http_ok("/healthz", BOUND)?;
    wait_body(&nginx, &host, "v2")?;
    assert!(!candidate.exists(), "the stale candidate is gone");
    assert_eq!(
        std::fs::read_to_string(&record)?,
        std::fs::read_to_string(&live)?
    );
    drop(drover);

    // The old way: a check that reads the live path sees the candidate there. Killed
    // mid-check, the unchecked (here: broken) file stays live...
    std::fs::write(&template, server(&host, "v3", "not_a_directive on;"))?;
    let in_place = r#"{ command: ["sleep", "20"] }"#;
    let mut drover = DroverProcess::start(
        &config(&http, &template, &live, in_place, nginx.name()),
        Some(&http),
    )?;
    let written = wait_until(BOUND, Duration::from_millis(50), || {
        std::fs::read_to_string(&live).is_ok_and(|t| t.contains("not_a_directive"))
    });
    assert!(written, "staged in place: {}", drover.logs());
    drover.signal("KILL")?;
    drover.wait_exit(Duration::from_secs(10))?;
    drop(drover);
    // ...and a restarted drover checks it again instead of taking it for current: it
    // fails, and the last good file comes back.
    let mut drover = DroverProcess::start(&checked, Some(&http))?;
    drover.wait_http_ok("/healthz", BOUND)?;
    let restored = wait_until(BOUND, Duration::from_millis(100), || {
        std::fs::read_to_string(&live).is_ok_and(|t| t.contains("\"v2\\n\""))
    });
    assert!(
        restored,
        "the last good file is back: {}",
        std::fs::read_to_string(&live)?
    );
    assert!(
        drover
            .logs()
            .contains("the file differs from its last checked content"),
        "{}",
        drover.logs()
    );
    assert!(checks(&drover, "failed") >= 1.0, "{}", drover.metrics());
    wait_body(&nginx, &host, "v2")?;
    Ok(())
}
