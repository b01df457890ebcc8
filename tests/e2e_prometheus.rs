//! The `prometheus.yml` drover renders from `builtin:prometheus`, loaded by a real
//! Prometheus (Debian's `/usr/bin/prometheus`, which `scripts/test` installs): a service
//! labelled `prometheus-job` / `prometheus-port` on the real engine becomes a target that
//! Prometheus scrapes and reports `up` through its own API, and a change (a scale-up)
//! reaches Prometheus through drover's notify step (`kill -HUP`), which Prometheus takes
//! as a successful reload.
//!
//! Prometheus runs on the host, inside the network namespace of a container attached to
//! the test's overlay network (task IPs are reachable only from there), so drover signals
//! its host pid and the test reads its API with `nsenter ... curl`. In that namespace of
//! its own it listens on 127.0.0.1:9090, a port no other test can hold.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

/// How long drover, Swarm and Prometheus (one-second scrapes here) may take to carry a
/// change through, with a wide margin for shared cores.
const BOUND: Duration = Duration::from_secs(60);
/// Where the backends serve their metrics (`prometheus-port`).
const METRICS_PORT: u16 = 9100;
/// Prometheus' listener, inside its own network namespace.
const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";

/// `/usr/bin/prometheus` in the network namespace of a container on an overlay network;
/// killed on drop (its log printed when the test fails).
struct Prometheus {
    child: Child,
    /// `/proc/PID/ns/net` of the anchor container.
    netns: String,
    log: PathBuf,
    // Drop order: the process, then the container whose namespace it lives in.
    _anchor: Resource,
}

impl Prometheus {
    /// Starts Prometheus on `config` (which must exist) with its data under `dir`, in the
    /// namespace of a new container on `network`; returns once it says it is ready.
    fn start(network: &str, config: &Path, dir: &Path) -> Result<Prometheus> {
        let name = unique("prom-ns");
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            network,
            &busybox_image(),
            "sleep",
            "3600",
        ])?;
        let anchor = Resource::adopt(Kind::Container, name.clone());
        let pid = docker(&["inspect", "--format", "{{.State.Pid}}", &name])?;
        let netns = format!("/proc/{pid}/ns/net");
        let log = dir.join("prometheus.log");
        let child = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .arg("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("cannot start /usr/bin/prometheus (package prometheus)")?;
        let mut prometheus = Prometheus {
            child,
            netns,
            log,
            _anchor: anchor,
        };
        let ready = wait_until(BOUND, Duration::from_millis(200), || {
            prometheus.get("/-/ready").is_ok()
        });
        ensure!(
            ready && matches!(prometheus.child.try_wait(), Ok(None)),
            "Prometheus did not become ready:\n{}",
            prometheus.logs()
        );
        Ok(prometheus)
    }

    /// The body of a 2xx answer to `GET path`, asked from inside its namespace.
    fn get(&self, path: &str) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns))
            .args(["curl", "-sSf", "-m", "5"])
            .arg(format!("http://{PROMETHEUS_ADDR}{path}"))
            .stdin(Stdio::null())
            .output()
            .context("cannot run nsenter curl")?;
        ensure!(
            out.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `/api/v1/targets`: (instance, health, last error) of each active target of `job`.
    fn targets(&self, job: &str) -> Result<Vec<(String, String, String)>> {
        let answer: Value = serde_json::from_str(&self.get("/api/v1/targets?state=active")?)?;
        ensure!(answer["status"] == "success", "{answer}");
        let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        Ok(answer["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["labels"]["job"] == job)
            .map(|t| {
                (
                    s(&t["labels"]["instance"]),
                    s(&t["health"]),
                    s(&t["lastError"]),
                )
            })
            .collect())
    }

    /// A sample of Prometheus' own `/metrics`.
    fn own_metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.get("/metrics").ok()?, name, &[])
    }

    /// Configuration loads so far, as Prometheus logs them (the first one at start).
    fn loads(&self) -> usize {
        self.logs()
            .lines()
            .filter(|l| l.contains("Completed loading of configuration file"))
            .count()
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- prometheus log -----\n{}----- end of prometheus log -----",
                self.logs()
            );
        }
    }
}

/// Waits until Prometheus scrapes exactly the running tasks of `service` as job `job`,
/// every one `up`.
fn wait_scraped_up(
    prometheus: &Prometheus,
    job: &str,
    service: &str,
    network: &str,
    n: usize,
) -> Result<()> {
    let mut last = (BTreeSet::new(), Vec::new());
    let ok = wait_until(BOUND, Duration::from_millis(500), || {
        let Ok(ips) = running_task_ips(service, network) else {
            return false;
        };
        let want: BTreeSet<String> = ips
            .iter()
            .map(|ip| format!("{ip}:{METRICS_PORT}"))
            .collect();
        let targets = prometheus.targets(job).unwrap_or_default();
        let seen: BTreeSet<String> = targets.iter().map(|t| t.0.clone()).collect();
        let done = want.len() == n && seen == want && targets.iter().all(|t| t.1 == "up");
        last = (want, targets);
        done
    });
    ensure!(
        ok,
        "Prometheus' targets of job {job} (instance, health, last error): {:?}; running tasks: {:?}",
        last.1,
        last.0
    );
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn prometheus_loads_the_rendered_file_scrapes_a_labelled_service_and_reloads_on_a_change()
-> Result<()> {
    require_e2e!();
    let dir = temp_dir("prometheus")?;
    let config = dir.path().join("prometheus.yml");
    // What Prometheus starts on, before drover's first render replaces it.
    std::fs::write(&config, "scrape_configs: []\n")?;
    let net = create_overlay_network(&unique("prom-net"))?;
    let job = unique("e2e-job");
    // A backend serving a metrics page in the text format on its prometheus-port.
    let backend = ServiceBuilder::backend(&unique("prom-be"))
        .replicas(1)
        .network(net.name())
        .label("prometheus-job", &job)
        .label("prometheus-port", &METRICS_PORT.to_string())
        .args([
            "sh",
            "-c",
            &format!(
                "mkdir -p /metrics && echo 'drover_e2e_backend 1' > /metrics/metrics && \
                 exec httpd -f -p {METRICS_PORT} -h /metrics"
            ),
        ])
        .create()?;
    wait_running(backend.name(), 1, BOUND)?;

    let prometheus = Prometheus::start(net.name(), &config, dir.path())?;
    ensure!(prometheus.loads() == 1, "{}", prometheus.logs());
    // The shipped target (deploy/drover.yml: external labels, 1 s/10 s debounce, HUP after
    // a change), with the test's network, one-second scrapes (the first scrape comes
    // within one interval) and the HUP sent to this Prometheus' pid.
    let http = format!("127.0.0.1:{}", free_port());
    let yaml = format!(
        r#"http: {{ listen: {http} }}
targets:
  - name: prometheus
    template: builtin:prometheus
    output: {output}
    network: {network}
    vars:
      external_labels: {{ monitor: e2e }}
      scrape_interval: 1s
    debounce:
      min: 1s
      max: 10s
    notify:
      - command: ["kill", "-HUP", "{pid}"]
"#,
        output = config.display(),
        network = net.name(),
        pid = prometheus.child.id(),
    );
    let mut drover = DroverProcess::start(&yaml, Some(&http))?;
    drover.wait_ready(BOUND)?;

    wait_scraped_up(&prometheus, &job, backend.name(), net.name(), 1)?;
    let checked = Command::new("promtool")
        .args(["check", "config"])
        .arg(&config)
        .output()
        .context("cannot run promtool (package prometheus)")?;
    ensure!(
        checked.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    ensure!(
        prometheus.own_metric("prometheus_config_last_reload_successful") == Some(1.0),
        "the last reload failed:\n{}",
        prometheus.logs()
    );
    let external = prometheus.get("/api/v1/status/config")?;
    ensure!(
        external.contains("monitor: e2e"),
        "the loaded config has drover's external labels: {external}"
    );

    // A change: the second task is a new target, brought to Prometheus by drover's HUP.
    let loads = prometheus.loads();
    scale(backend.name(), 2)?;
    wait_running(backend.name(), 2, BOUND)?;
    wait_scraped_up(&prometheus, &job, backend.name(), net.name(), 2)?;
    ensure!(
        prometheus.loads() > loads,
        "Prometheus loaded no configuration after the change:\n{}",
        prometheus.logs()
    );
    ensure!(
        prometheus.own_metric("prometheus_config_last_reload_successful") == Some(1.0),
        "the reload after the change failed:\n{}",
        prometheus.logs()
    );
    ensure!(drover.is_running(), "drover still runs");
    drop(drover);
    drop(prometheus);
    drop(backend);
    Ok(())
}
