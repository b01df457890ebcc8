//! Shared harness for end-to-end tests against the real Docker Engine in Swarm mode.
//!
//! Use it from a test file with `mod support;` and `use support::*;`. Everything talks to
//! the real engine through the `docker` CLI (setup and teardown only; the code under test
//! uses the Engine API itself), to a real nginx and a real registry that `scripts/test`
//! starts on 127.0.0.1:5000 and fills with test images built from local files.
//!
//! Invariants every test relies on:
//! - e2e tests are `#[ignore]`d and fail (saying why) unless `DROVER_E2E=1` (see
//!   [`e2e_enabled`] and [`require_e2e!`]); `scripts/test` sets it with the image names
//!   below and runs them with `--include-ignored`;
//! - every engine object a test creates has a [`unique`] name and is owned by a [`Resource`]
//!   guard that removes it on drop, panicking or not; declare networks *before* the
//!   services that use them so they are dropped after them (locals drop in reverse order);
//! - nothing here uses the routing mesh: ports are published with `mode=host`, and traffic
//!   goes to task IPs on overlay networks (ip_vs is missing on these machines).
//!
//! Environment (all optional, defaults match `scripts/test`): `DROVER_BIN`,
//! `DROVER_TEST_BUSYBOX_IMAGE`, `DROVER_TEST_NGINX_IMAGE`, `DROVER_TEST_IMAGE`.
//! Logs of drover and nginx are printed on drop and captured by the test harness, so they
//! show up exactly for failing tests.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use anyhow::{Context, Result, anyhow, bail, ensure};

pub mod acme;
pub mod cluster;
pub mod stacks;

// ---------------------------------------------------------------------------------------
// Gate and names
// ---------------------------------------------------------------------------------------

/// Whether the environment the end-to-end tests need was set up (`DROVER_E2E=1`).
pub fn e2e_enabled() -> bool {
    std::env::var("DROVER_E2E").as_deref() == Ok("1")
}

/// `require_e2e!();` as the first line of an e2e test. The tests are `#[ignore]`d, so a
/// plain `cargo test` reports them ignored; one that runs anyway (`--include-ignored`)
/// without the environment fails with the reason rather than passing untested.
#[macro_export]
macro_rules! require_e2e {
    () => {
        assert!(
            $crate::support::e2e_enabled(),
            "an end-to-end test needs DROVER_E2E=1 and what scripts/test sets up: \
             run `scripts/test`, or `scripts/test setup` then `eval \"$(scripts/test env)\"`"
        );
    };
}

/// How the drover a test starts gets its files to nginx (and the other consumers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// drover writes them itself: `drover run` on the host, or its image without the
    /// cluster key.
    Local,
    /// The shipped way: drover as a Swarm service with the cluster key, the agent on each
    /// node writing that node's files.
    Agents,
}

/// Records that the running test starts drover delivering `how`: an empty file
/// `$DROVER_TEST_CENSUS/{agents,local}/BINARY::TEST` (nothing when the variable is unset).
/// `scripts/test` sets it and prints the counts after the run: how many end-to-end tests
/// went through the agents, how many ran drover locally only.
pub fn census(how: Delivery) {
    let Some(root) = std::env::var_os("DROVER_TEST_CENSUS") else {
        return;
    };
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // Test binaries are named NAME-HASH.
    let binary = binary.rsplit_once('-').map_or(binary.as_str(), |(n, _)| n);
    let test = std::thread::current()
        .name()
        .unwrap_or("main")
        .replace("::", "-");
    let dir = Path::new(&root).join(match how {
        Delivery::Local => "local",
        Delivery::Agents => "agents",
    });
    if let Err(e) = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(format!("{binary}::{test}")), b""))
    {
        eprintln!("census in {}: {e}", dir.display());
    }
}

/// A name no other test (in this or a concurrent test process) uses:
/// `PREFIX-<pid><time>-<counter>`, lowercase, valid for services, networks and configs.
/// Keep prefixes short (≤ 30 chars); Swarm limits names to 63.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        & 0xfff;
    format!(
        "{}-{:x}{:03x}-{n}",
        prefix.to_lowercase(),
        std::process::id(),
        t
    )
}

/// The busybox test image (backend: `httpd` on :80 answering the task's hostname).
pub fn busybox_image() -> String {
    env_or(
        "DROVER_TEST_BUSYBOX_IMAGE",
        "127.0.0.1:5000/drover-test/busybox:latest",
    )
}

/// The nginx test image (`/etc/nginx/conf.d/*.conf` included; :8080 answers health).
pub fn nginx_image() -> String {
    env_or(
        "DROVER_TEST_NGINX_IMAGE",
        "127.0.0.1:5000/drover-test/nginx:latest",
    )
}

/// drover's own image, built from the host's release binary (docker/runtime-local.Dockerfile).
pub fn drover_image() -> String {
    env_or("DROVER_TEST_IMAGE", "127.0.0.1:5000/drover/drover:test")
}

/// The drover binary: `$DROVER_BIN`, else `target/release/drover`, else `target/debug/drover`.
pub fn drover_bin() -> PathBuf {
    if let Ok(p) = std::env::var("DROVER_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let release = root.join("target/release/drover");
    if release.exists() {
        release
    } else {
        root.join("target/debug/drover")
    }
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

// ---------------------------------------------------------------------------------------
// The docker CLI
// ---------------------------------------------------------------------------------------

/// Runs `docker ARGS...` and returns its trimmed stdout; a non-zero exit is an error
/// carrying the arguments and stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    docker_with_stdin(args, None)
}

/// Like [`docker`], writing `input` to the command's stdin (e.g. `docker config create N -`).
pub fn docker_with_stdin(args: &[&str], input: Option<&[u8]>) -> Result<String> {
    let mut cmd = Command::new("docker");
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().context("cannot run the docker CLI")?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().context("docker stdin")?;
        stdin.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// ---------------------------------------------------------------------------------------
// Cleanup guards
// ---------------------------------------------------------------------------------------

/// What a [`Resource`] removes on drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Service,
    Network,
    Config,
    Secret,
    Container,
}

/// An engine object owned by a test, removed when dropped (also on panic). Removal errors
/// are printed, never panicked on. Networks are retried for up to 30 s because Swarm
/// detaches the tasks of a just-removed service asynchronously.
#[derive(Debug)]
pub struct Resource {
    kind: Kind,
    name: String,
    keep: bool,
}

impl Resource {
    /// Takes ownership of an existing object: it is removed on drop.
    pub fn adopt(kind: Kind, name: impl Into<String>) -> Resource {
        Resource {
            kind,
            name: name.into(),
            keep: false,
        }
    }

    /// The object's name (as given to `docker ... create`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Leaves the object in place after the test (for debugging by hand).
    pub fn keep(mut self) -> Self {
        self.keep = true;
        self
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl AsRef<str> for Resource {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl Drop for Resource {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let name = self.name.as_str();
        let result = match self.kind {
            Kind::Service => docker(&["service", "rm", name]).map(drop),
            Kind::Config => docker(&["config", "rm", name]).map(drop),
            Kind::Secret => docker(&["secret", "rm", name]).map(drop),
            Kind::Container => docker(&["rm", "-f", "-v", name]).map(drop),
            Kind::Network => {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match docker(&["network", "rm", name]) {
                        Ok(_) => break Ok(()),
                        Err(e) if e.to_string().contains("not found") => break Ok(()),
                        Err(e) if Instant::now() > deadline => break Err(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(500)),
                    }
                }
            }
        };
        if let Err(e) = result {
            if !e.to_string().contains("not found") {
                eprintln!("cleanup of {:?} {name} failed: {e:#}", self.kind);
            }
        }
    }
}

/// A temporary directory removed on drop. World-readable (0755) so containers running as
/// another user can read it when bind-mounted.
pub fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("drover-{prefix}-"))
        .tempdir()?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Creates an attachable overlay network. Create it before the services using it.
pub fn create_overlay_network(name: &str) -> Result<Resource> {
    docker(&[
        "network",
        "create",
        "--driver",
        "overlay",
        "--attachable",
        name,
    ])?;
    Ok(Resource::adopt(Kind::Network, name))
}

/// Creates a Swarm config object holding `data`.
pub fn create_config(name: &str, data: &[u8]) -> Result<Resource> {
    docker_with_stdin(&["config", "create", name, "-"], Some(data))?;
    Ok(Resource::adopt(Kind::Config, name))
}

/// Creates a Swarm secret holding `data`.
pub fn create_secret(name: &str, data: &[u8]) -> Result<Resource> {
    docker_with_stdin(&["secret", "create", name, "-"], Some(data))?;
    Ok(Resource::adopt(Kind::Secret, name))
}

// ---------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------

/// Builder for `docker service create --detach`. Defaults: 1 replica, stop grace period
/// 2 s (busybox httpd as PID 1 ignores SIGTERM), the image's own command.
///
/// ```ignore
/// let svc = ServiceBuilder::new(&unique("be"), &busybox_image())
///     .replicas(2).network(net.name()).label("routing-host", "a.test").create()?;
/// ```
#[derive(Debug, Clone)]
pub struct ServiceBuilder {
    name: String,
    image: String,
    flags: Vec<String>,
    args: Vec<String>,
}

impl ServiceBuilder {
    pub fn new(name: &str, image: &str) -> Self {
        ServiceBuilder {
            name: name.into(),
            image: image.into(),
            flags: vec!["--stop-grace-period".into(), "2s".into()],
            args: vec![],
        }
    }

    /// A busybox backend answering its task's hostname on port 80.
    pub fn backend(name: &str) -> Self {
        Self::new(name, &busybox_image())
    }

    fn flag(mut self, flag: &str, value: impl Into<String>) -> Self {
        self.flags.push(flag.into());
        self.flags.push(value.into());
        self
    }

    /// Number of replicas (replicated mode).
    pub fn replicas(self, n: u32) -> Self {
        self.flag("--replicas", n.to_string())
    }

    /// Global mode instead of replicated.
    pub fn global(self) -> Self {
        self.flag("--mode", "global")
    }

    /// A service label (`--label k=v`), what drover routes by.
    pub fn label(self, key: &str, value: &str) -> Self {
        self.flag("--label", format!("{key}={value}"))
    }

    /// A container label (`--container-label k=v`).
    pub fn container_label(self, key: &str, value: &str) -> Self {
        self.flag("--container-label", format!("{key}={value}"))
    }

    /// Attaches the service to a network.
    pub fn network(self, network: &str) -> Self {
        self.flag("--network", network)
    }

    /// Publishes `target` on the host's `published` port in host mode (no routing mesh).
    pub fn publish_host(self, target: u16, published: u16) -> Self {
        self.flag(
            "--publish",
            format!("mode=host,target={target},published={published}"),
        )
    }

    /// Bind-mounts a host path (must exist on the node) into the containers.
    pub fn mount_bind(self, src: &Path, dst: &str) -> Self {
        self.flag(
            "--mount",
            format!("type=bind,src={},dst={dst}", src.display()),
        )
    }

    /// Read-only bind mount.
    pub fn mount_bind_ro(self, src: &Path, dst: &str) -> Self {
        self.flag(
            "--mount",
            format!("type=bind,src={},dst={dst},readonly", src.display()),
        )
    }

    /// An environment variable.
    pub fn env(self, key: &str, value: &str) -> Self {
        self.flag("--env", format!("{key}={value}"))
    }

    /// A Swarm config mounted at `target` (`--config source=..,target=..`).
    pub fn config(self, source: &str, target: &str) -> Self {
        self.flag("--config", format!("source={source},target={target}"))
    }

    /// A Swarm secret mounted at `/run/secrets/NAME`.
    pub fn secret(self, source: &str) -> Self {
        self.flag("--secret", source)
    }

    /// Replaces the image's command: `args(["sleep", "3600"])`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Update config: `--update-parallelism`, `--update-delay`, `--update-failure-action`
    /// (`pause`, `continue`, `rollback`), `--update-monitor`, `--update-order`.
    pub fn update_config(
        self,
        parallelism: u32,
        delay: &str,
        failure_action: &str,
        monitor: &str,
    ) -> Self {
        self.flag("--update-parallelism", parallelism.to_string())
            .flag("--update-delay", delay)
            .flag("--update-failure-action", failure_action)
            .flag("--update-monitor", monitor)
    }

    /// Rollback config: `--rollback-parallelism`, `--rollback-delay`, `--rollback-monitor`.
    pub fn rollback_config(self, parallelism: u32, delay: &str, monitor: &str) -> Self {
        self.flag("--rollback-parallelism", parallelism.to_string())
            .flag("--rollback-delay", delay)
            .flag("--rollback-monitor", monitor)
    }

    /// Any other `docker service create` flag with its value (`raw("--update-order", "start-first")`).
    pub fn raw(self, flag: &str, value: &str) -> Self {
        self.flag(flag, value)
    }

    /// A boolean `docker service create` flag without a value (`switch("--init")`).
    pub fn switch(mut self, flag: &str) -> Self {
        self.flags.push(flag.into());
        self
    }

    /// A health check command run by the engine (`--health-cmd`), every second.
    pub fn health_cmd(self, cmd: &str) -> Self {
        self.flag("--health-cmd", cmd)
            .flag("--health-interval", "1s")
            .flag("--health-retries", "2")
    }

    /// The full argument list `docker service create` will get.
    pub fn to_args(&self) -> Vec<String> {
        let mut v: Vec<String> = vec!["service".into(), "create".into(), "--detach".into()];
        v.extend(["--name".to_string(), self.name.clone()]);
        v.extend(self.flags.iter().cloned());
        v.push(self.image.clone());
        v.extend(self.args.iter().cloned());
        v
    }

    /// Creates the service (detached: returns before tasks run; see [`wait_running`]).
    pub fn create(self) -> Result<Resource> {
        let args = self.to_args();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs)?;
        Ok(Resource::adopt(Kind::Service, self.name))
    }
}

/// Scales a replicated service (detached; pair with [`wait_running`]).
pub fn scale(service: &str, replicas: u32) -> Result<()> {
    docker(&[
        "service",
        "scale",
        "--detach",
        &format!("{service}={replicas}"),
    ])?;
    Ok(())
}

/// Polls `check` every `poll` until it returns true (→ true) or `timeout` passes (→ false).
/// `check` runs at least once, and once more at the deadline.
pub fn wait_until(timeout: Duration, poll: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(poll.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// [`wait_until`] as an error naming `what` and the timeout, for use with `?`.
pub fn wait_for(what: &str, timeout: Duration, check: impl FnMut() -> bool) -> Result<()> {
    if wait_until(timeout, Duration::from_millis(200), check) {
        Ok(())
    } else {
        bail!("timed out after {timeout:?} waiting for {what}")
    }
}

/// [`wait_for`] until `check` holds 20 times in a row, 50 ms apart. Before a load client
/// starts: right after nginx reloads, one answer from a new worker says nothing of an old
/// worker still on the previous config, which takes new connections until it has handled
/// its QUIT and answers them with its fallback 404 (CI saw that at a load's first
/// requests, seconds after the first good answer).
pub fn wait_steadily(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let mut streak = 0;
    if wait_until(timeout, Duration::from_millis(50), || {
        streak = if check() { streak + 1 } else { 0 };
        streak >= 20
    }) {
        Ok(())
    } else {
        bail!("timed out after {timeout:?} waiting for {what} 20 times in a row")
    }
}

/// One task of a service as Swarm reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub id: String,
    /// `Status.State`: new, pending, ..., starting, running, complete, failed, shutdown...
    pub state: String,
    pub desired_state: String,
    /// Container id, when the task has one.
    pub container: Option<String>,
    /// (network name, IP without prefix length) for each attached network.
    pub addresses: Vec<(String, String)>,
}

/// The tasks of `service` whose desired state is running (`docker service ps` +
/// `docker inspect`), in any state.
pub fn tasks(service: &str) -> Result<Vec<TaskInfo>> {
    // A task can disappear between the two calls; try again then.
    let mut last = None;
    for _ in 0..3 {
        match tasks_once(service) {
            Ok(t) => return Ok(t),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last.unwrap_or_else(|| anyhow!("no attempt")))
}

fn tasks_once(service: &str) -> Result<Vec<TaskInfo>> {
    let ids = docker(&[
        "service",
        "ps",
        "--no-trunc",
        "-q",
        "--filter",
        "desired-state=running",
        service,
    ])?;
    let mut args = vec!["inspect", "--type", "task"];
    args.extend(ids.lines().map(str::trim).filter(|l| !l.is_empty()));
    if args.len() == 3 {
        return Ok(vec![]);
    }
    let json: serde_json::Value = serde_json::from_str(&docker(&args)?)?;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let mut out = vec![];
    for t in json.as_array().into_iter().flatten() {
        let mut addresses = vec![];
        for att in t["NetworksAttachments"].as_array().into_iter().flatten() {
            let net = s(&att["Network"]["Spec"]["Name"]);
            for a in att["Addresses"].as_array().into_iter().flatten() {
                let ip = a
                    .as_str()
                    .unwrap_or_default()
                    .split('/')
                    .next()
                    .unwrap_or_default();
                addresses.push((net.clone(), ip.to_string()));
            }
        }
        let container = t["Status"]["ContainerStatus"]["ContainerID"]
            .as_str()
            .map(str::to_string);
        out.push(TaskInfo {
            id: s(&t["ID"]),
            state: s(&t["Status"]["State"]),
            desired_state: s(&t["DesiredState"]),
            container: container.filter(|c| !c.is_empty()),
            addresses,
        });
    }
    Ok(out)
}

/// Sorted IPs on `network` (name) of the tasks of `service` whose state is `running`:
/// exactly what drover must render for that service.
pub fn running_task_ips(service: &str, network: &str) -> Result<Vec<String>> {
    let mut ips: Vec<String> = tasks(service)?
        .into_iter()
        .filter(|t| t.state == "running")
        .flat_map(|t| {
            t.addresses
                .into_iter()
                .filter(|(n, _)| n == network)
                .map(|(_, ip)| ip)
        })
        .collect();
    ips.sort();
    Ok(ips)
}

/// Waits until `service` has exactly `n` tasks in state `running` and no other task that is
/// meant to run (so a scale or update has converged).
pub fn wait_running(service: &str, n: usize, timeout: Duration) -> Result<()> {
    wait_for(
        &format!("{service} to have {n} running tasks"),
        timeout,
        || {
            tasks(service)
                .map(|ts| ts.len() == n && ts.iter().all(|t| t.state == "running"))
                .unwrap_or(false)
        },
    )
}

/// The engine's events about one service, streamed by `docker events` from the moment
/// [`ServiceEvents::start`] was called (`--since` that moment: nothing between the call
/// and the stream's start is missed) until dropped. An event stream, unlike polling
/// `docker service inspect`, sees every state an update passes through, however briefly.
pub struct ServiceEvents {
    child: Child,
    events: std::sync::Arc<Mutex<Vec<serde_json::Value>>>,
}

impl ServiceEvents {
    pub fn start(service: &str) -> Result<ServiceEvents> {
        let since = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let mut child = Command::new("docker")
            .args([
                "events",
                "--format",
                "{{json .}}",
                "--filter",
                "type=service",
            ])
            .args(["--filter", &format!("service={service}")])
            .args([
                "--since",
                &format!("{}.{:09}", since.as_secs(), since.subsec_nanos()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run docker events")?;
        let stdout = child.stdout.take().context("docker events stdout")?;
        let events = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(event) = serde_json::from_str(&line) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(event);
                }
            }
        });
        Ok(ServiceEvents { child, events })
    }

    /// The update states the service went through so far, in order: the
    /// `updatestate.new` attribute of each event that has one (`updating`, `completed`,
    /// `paused`, `rollback_started`, ...).
    pub fn update_states(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|e| e["Actor"]["Attributes"]["updatestate.new"].as_str())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for ServiceEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ids of the tasks of `service` that are running now.
pub fn running_task_ids(service: &str) -> Result<BTreeSet<String>> {
    Ok(tasks(service)?
        .into_iter()
        .filter(|t| t.state == "running")
        .map(|t| t.id)
        .collect())
}

/// Waits until none of the tasks `ids` is running any more (its container has stopped:
/// state `shutdown`, `complete`, `failed`...; or the task is gone), e.g. the tasks a
/// rollout replaces, at most `timeout`.
pub fn wait_tasks_stopped(ids: &BTreeSet<String>, timeout: Duration) -> Result<()> {
    wait_tasks_stopped_on(docker, ids, timeout)
}

/// [`wait_tasks_stopped`] asking another Swarm's manager: `docker` runs the CLI against
/// it (e.g. `|a| cluster.docker(a)`).
pub fn wait_tasks_stopped_on(
    docker: impl Fn(&[&str]) -> Result<String>,
    ids: &BTreeSet<String>,
    timeout: Duration,
) -> Result<()> {
    let mut running = ids.clone();
    let stopped = wait_until(timeout, Duration::from_millis(200), || {
        running.retain(|id| {
            docker(&[
                "inspect",
                "--type",
                "task",
                "--format",
                "{{.Status.State}}",
                id,
            ])
            .is_ok_and(|state| state == "running")
        });
        running.is_empty()
    });
    ensure!(
        stopped,
        "tasks still running after {timeout:?}: {running:?}"
    );
    Ok(())
}

/// The id of one running container of `service` on this node.
pub fn service_container(service: &str) -> Result<String> {
    let out = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.swarm.service.name={service}"),
    ])?;
    out.lines()
        .next()
        .map(str::to_string)
        .with_context(|| format!("no running container of {service}"))
}

/// The logs of every task of `service` (`docker service logs --raw`), for diagnostics.
pub fn service_logs(service: &str) -> String {
    docker(&["service", "logs", "--raw", service]).unwrap_or_else(|e| format!("{e:#}"))
}

// ---------------------------------------------------------------------------------------
// Network helpers
// ---------------------------------------------------------------------------------------

/// Where the tests draw ports from: below the kernel's ephemeral range (32768–60999 here,
/// `net.ipv4.ip_local_port_range`), so none of the thousands of outgoing connections a
/// load client or an engine opens can take a port a test has picked and not yet bound.
const TEST_PORTS: std::ops::RangeInclusive<u16> = 20000..=29999;
/// One lock file per port handed out (see [`free_port`]).
const PORT_LOCKS: &str = "/tmp/drover-test-ports";

/// A TCP port for a test to bind (or publish) later, unique among every test process on
/// the machine: from [`TEST_PORTS`], outside the ephemeral range (checked against
/// `/proc/sys/net/ipv4/ip_local_port_range`), claimed with an exclusive `flock` on
/// `/tmp/drover-test-ports/PORT` that this process holds until it exits (the kernel drops
/// the lock of a process that died, so a crashed run leaves nothing claimed), and free on
/// 127.0.0.1 and 0.0.0.0 when claimed. A port is never handed out twice by one process,
/// and never to two processes at once.
pub fn free_port() -> u16 {
    use std::os::fd::AsRawFd;
    static HELD: OnceLock<Mutex<(u16, Vec<std::fs::File>)>> = OnceLock::new();
    let (low, high) = ephemeral_range();
    let span = TEST_PORTS.end() - TEST_PORTS.start() + 1;
    let held = HELD.get_or_init(|| {
        // Processes started together begin at different places and rarely contend.
        Mutex::new(((std::process::id() % u32::from(span)) as u16, Vec::new()))
    });
    let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(PORT_LOCKS).expect("create the port lock directory");
    for _ in 0..span {
        let port = TEST_PORTS.start() + held.0 % span;
        held.0 = (held.0 + 1) % span;
        assert!(
            !(low..=high).contains(&port),
            "test port {port} is in the ephemeral range {low}-{high}: move TEST_PORTS"
        );
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(PORT_LOCKS).join(port.to_string()))
        else {
            continue;
        };
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue; // another test process holds it
        }
        let free = ["127.0.0.1", "0.0.0.0"]
            .iter()
            .all(|ip| TcpListener::bind((*ip, port)).is_ok());
        if free {
            held.1.push(file);
            return port;
        }
    }
    panic!("no free port left in {TEST_PORTS:?}");
}

/// The kernel's ephemeral port range (`low`, `high`); Linux's default when unreadable.
fn ephemeral_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().filter_map(|p| p.parse().ok());
    match (it.next(), it.next()) {
        (Some(low), Some(high)) => (low, high),
        _ => (32768, 60999),
    }
}

/// An HTTP response: status, header lines and body (lossy UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// `(name, value)` in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET url` (http only) with a 5 s timeout. Errors are `io::Error`s so callers can tell
/// `ConnectionRefused` (nothing listening: e.g. nginx down) from a slow or bad answer.
pub fn http_get(url: &str) -> std::io::Result<Response> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "only http:// URLs")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    http_request("GET", authority, authority, path, None)
}

/// `GET path` sent to `addr` (`host:port`) with `Host: host`: how tests reach a virtual
/// host behind nginx without DNS.
pub fn http_get_host(addr: &str, host: &str, path: &str) -> std::io::Result<Response> {
    http_request("GET", addr, host, path, None)
}

/// `POST path` to `addr` with a body and extra headers (`("Content-Type", "...")`).
pub fn http_post(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    http_request("POST", addr, addr, path, Some((headers, body)))
}

/// Extra request headers: `&[("Content-Type", "application/json")]`.
pub type Headers<'a> = &'a [(&'a str, &'a str)];

/// A minimal HTTP/1.0 client (one request per connection, body read to EOF).
pub fn http_request(
    method: &str,
    addr: &str,
    host: &str,
    path: &str,
    body: Option<(Headers, &[u8])>,
) -> std::io::Result<Response> {
    let timeout = Duration::from_secs(5);
    let sock = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"))?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some((headers, data)) = body {
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n", data.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some((_, data)) = body {
        bytes.extend_from_slice(data);
    }
    stream.write_all(&bytes)?;
    let mut raw = vec![];
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad response: {head:?}"),
            )
        })?;
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// GETs `path` from `addr` with `Host: host` at about `rate` requests a second, spread
/// over one thread per 50 requests a second (each request is a new connection), until
/// [`LoadClient::finish`]; then returns the number of requests, every answer that was not
/// a 200 (or no answer at all), and how long it ran.
pub struct LoadClient {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
    started: Instant,
    answered: std::sync::Arc<AtomicU64>,
}

impl LoadClient {
    pub fn start(addr: &str, host: &str, path: &str, rate: u32) -> LoadClient {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n_threads = rate.div_ceil(50).max(1);
        let period = Duration::from_secs(1) * n_threads / rate.max(1);
        let started = Instant::now();
        let answered = std::sync::Arc::new(AtomicU64::new(0));
        let threads = (0..n_threads)
            .map(|t| {
                let (addr, host, path, flag, answered) = (
                    addr.to_owned(),
                    host.to_owned(),
                    path.to_owned(),
                    stop.clone(),
                    answered.clone(),
                );
                std::thread::spawn(move || {
                    let (mut n, mut failures) = (0u64, Vec::new());
                    while !flag.load(Ordering::Relaxed) {
                        let due = started + period * (n as u32 + 1);
                        n += 1;
                        match http_get_host(&addr, &host, &path) {
                            Ok(r) if r.status == 200 => {}
                            Ok(r) => failures.push(format!(
                                "thread {t} request {n}: {} {}",
                                r.status,
                                r.body.trim()
                            )),
                            Err(e) => failures.push(format!("thread {t} request {n}: {e}")),
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    (n, failures)
                })
            })
            .collect();
        LoadClient {
            stop,
            threads,
            started,
            answered,
        }
    }

    /// Waits until the client has had `n` answers (or errors), at most `timeout`: it is
    /// under way before what it is meant to watch starts.
    pub fn wait_requests(&self, n: u64, timeout: Duration) -> Result<()> {
        wait_for(&format!("{n} requests of the load client"), timeout, || {
            self.answered.load(Ordering::Relaxed) >= n
        })
    }

    pub fn finish(self) -> (u64, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut total, mut failures) = (0, Vec::new());
        for t in self.threads {
            let (n, f) = t.join().unwrap_or_default();
            total += n;
            failures.extend(f);
        }
        (total, failures, self.started.elapsed())
    }
}

/// The sum of the Prometheus samples of `name` whose labels include every `labels` pair
/// (in any order), or `None` when no sample matches. E.g.
/// `metric_value(&text, "drover_renders_total", &[("target", "nginx"), ("outcome", "applied")])`.
pub fn metric_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((set, value)) => (set, value),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let pairs = metric_labels(set);
        if labels
            .iter()
            .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v))
        {
            if let Ok(v) = value.trim().parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// The label pairs of a sample: `a="x",b="y"` → [("a","x"),("b","y")] (no escapes handled).
pub fn metric_labels(set: &str) -> Vec<(String, String)> {
    set.split("\",")
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((
                k.trim_matches(',').trim().to_string(),
                v.trim_matches('"').to_string(),
            ))
        })
        .collect()
}

/// Every sample of `name`: (labels, value).
pub fn metric_samples(metrics: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|r| {
            let (set, value) = r.split_once('}')?;
            Some((metric_labels(set), value.trim().parse().ok()?))
        })
        .collect()
}

/// One sample of the Prometheus text format: name, full label set, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus text exposition (`/metrics`), for exact lookups by metric name and
/// label set. Unlike [`metric_value`] it handles escaped label values (`\"`, `\\`,
/// `\n`), `+Inf`/`NaN` values and timestamps, and refuses malformed lines.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text; `# HELP` / `# TYPE` lines and blank lines are skipped.
    pub fn parse(text: &str) -> Result<Metrics> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).with_context(|| format!("bad metrics line {l:?}")))
            .collect::<Result<_>>()?;
        Ok(Metrics { samples })
    }

    /// The value of the one sample named `name` whose label set is exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The sum of the samples named `name` whose labels include every pair of `labels`
    /// (`None` when none does): `sum("drover_events_total", &[])` counts every type.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    /// [`Metrics::sum`], 0 when no sample matches (a counter not yet incremented).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or(0.0)
    }
}

/// `GET /metrics` on `addr` (`host:port`), parsed.
pub fn scrape_metrics(addr: &str) -> Result<Metrics> {
    let r = http_get_host(addr, addr, "/metrics").with_context(|| format!("GET {addr}/metrics"))?;
    ensure!(r.status == 200, "GET {addr}/metrics answered {}", r.status);
    Metrics::parse(&r.body)
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    ensure!(!name.is_empty(), "no metric name");
    let mut rest = &line[name_end..];
    let mut labels = std::collections::BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end = loop {
            while chars
                .next_if(|(_, c)| *c == ',' || c.is_whitespace())
                .is_some()
            {}
            let Some(&(start, c)) = chars.peek() else {
                bail!("unterminated label set");
            };
            if c == '}' {
                break start + 1;
            }
            let mut key = String::new();
            while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=') {
                key.push(c);
            }
            ensure!(chars.next().is_some(), "label {key} has no value");
            ensure!(
                matches!(chars.next(), Some((_, '"'))),
                "label {key}: value not quoted"
            );
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("label {key}: unterminated escape"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("label {key}: unterminated value"),
                }
            }
            labels.insert(key.trim().to_string(), value);
        };
        rest = &after[end..];
    }
    let value = rest.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().with_context(|| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------

/// A one-replica nginx Swarm service from the test image, with a host temp dir
/// bind-mounted onto `/etc/nginx/conf.d` and ports published in host mode.
pub struct NginxService {
    /// `http://127.0.0.1:PORT`: nginx's port 80.
    pub url: String,
    /// `127.0.0.1:PORT`: nginx's port 80 as an address (for [`http_get_host`]).
    pub addr: String,
    /// `127.0.0.1:PORT`: nginx's own health server (port 8080 in the container).
    pub health_addr: String,
    /// The host port nginx's port 443 is published on.
    pub tls_port: u16,
    /// The conf.d directory on the host; drover's nginx target writes here.
    pub conf_dir: PathBuf,
    // Drop order: the service before the directory it mounts.
    pub service: Resource,
    _dir: tempfile::TempDir,
}

impl NginxService {
    /// The service name (for `check`/`notify` selectors in drover's config).
    pub fn name(&self) -> &str {
        self.service.name()
    }

    /// `GET path` with `Host: host` through nginx.
    pub fn get(&self, host: &str, path: &str) -> std::io::Result<Response> {
        http_get_host(&self.addr, host, path)
    }

    /// The path of a file in conf.d.
    pub fn conf(&self, file: &str) -> PathBuf {
        self.conf_dir.join(file)
    }

    /// nginx's log (stderr: error log at notice level, reloads included).
    pub fn logs(&self) -> String {
        service_logs(self.name())
    }
}

impl Drop for NginxService {
    /// Prints nginx's log (captured by the test harness: shown for failing tests only).
    fn drop(&mut self) {
        eprintln!(
            "----- nginx log ({}) -----\n{}\n----- end of nginx log -----",
            self.name(),
            self.logs()
        );
    }
}

/// Starts an nginx service attached to `network` (and `extra_networks`) and waits (≤ 60 s)
/// until its health port answers. `seed` files are written into conf.d before start.
pub fn nginx_service(network: &str, seed: &[(&str, &str)]) -> Result<NginxService> {
    nginx_service_mounting(network, seed, &[])
}

/// [`nginx_service`] with more host directories bind-mounted (`(host dir, container path)`),
/// e.g. a certificate directory onto `/etc/letsencrypt`.
pub fn nginx_service_mounting(
    network: &str,
    seed: &[(&str, &str)],
    mounts: &[(&Path, &str)],
) -> Result<NginxService> {
    nginx_service_on(network, seed, mounts, free_port())
}

/// [`nginx_service_mounting`] with nginx's port 80 published on the host's `port` (a CA's
/// validation dials a fixed port: Pebble's `httpPort`).
pub fn nginx_service_on(
    network: &str,
    seed: &[(&str, &str)],
    mounts: &[(&Path, &str)],
    port: u16,
) -> Result<NginxService> {
    let dir = temp_dir("nginx-conf")?;
    for (file, content) in seed {
        std::fs::write(dir.path().join(file), content)?;
    }
    let (health, tls_port) = (free_port(), free_port());
    let mut builder = ServiceBuilder::new(&unique("nginx"), &nginx_image())
        .network(network)
        .publish_host(80, port)
        .publish_host(8080, health)
        .publish_host(443, tls_port)
        .mount_bind(dir.path(), "/etc/nginx/conf.d");
    for (src, dst) in mounts {
        builder = builder.mount_bind(src, dst);
    }
    let service = builder.create()?;
    let health_addr = format!("127.0.0.1:{health}");
    let up = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        http_get_host(&health_addr, "health", "/")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    if !up {
        bail!(
            "nginx service {} did not come up: {}",
            service.name(),
            service_logs(service.name())
        );
    }
    Ok(NginxService {
        url: format!("http://127.0.0.1:{port}"),
        addr: format!("127.0.0.1:{port}"),
        health_addr,
        tls_port,
        conf_dir: dir.path().to_path_buf(),
        service,
        _dir: dir,
    })
}

/// The upstream server IPs in nginx config text: every `server IP:PORT ...;` line that is
/// not marked `down` (the placeholder of an upstream without running tasks). Sorted.
pub fn upstream_ips(conf: &str) -> Vec<String> {
    let mut ips: Vec<String> = conf
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("server "))
        .filter(|rest| {
            !rest
                .split(|c: char| c.is_whitespace() || c == ';')
                .any(|w| w == "down")
        })
        .filter_map(|rest| {
            let hostport = rest.split(|c: char| c.is_whitespace() || c == ';').next()?;
            let (ip, port) = hostport.rsplit_once(':')?;
            (ip.parse::<std::net::Ipv4Addr>().is_ok() && port.parse::<u16>().is_ok())
                .then(|| ip.to_string())
        })
        .collect();
    ips.sort();
    ips
}

// ---------------------------------------------------------------------------------------
// drover itself
// ---------------------------------------------------------------------------------------

/// A `drover run --config FILE` process on the host. Its stdout and stderr go to a log
/// file; on drop the process is killed and the log is printed with `eprintln!`, which the
/// test harness captures and shows only for a failing test (whether it panicked or
/// returned `Err`), or always with `--nocapture`.
pub struct DroverProcess {
    child: Child,
    /// Directory holding `drover.yml` and `drover.log` (removed on drop).
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT` of drover's HTTP server, when the caller told [`DroverProcess::start`].
    pub http: Option<String>,
    /// `127.0.0.1:PORT` of drover's operator listener (`--ops-listen`, a free port):
    /// status page, jobs, metrics, health.
    pub ops: String,
}

impl DroverProcess {
    /// Writes `config` (YAML) to a temp dir and starts `drover run --config` on it.
    /// `http` is drover's listen address from that config (used by the helpers below).
    pub fn start(config: &str, http: Option<&str>) -> Result<DroverProcess> {
        Self::start_with_args(config, http, &[])
    }

    /// drover with `targets` (YAML list items, e.g. [`routing_target`]) and a 10 s resync,
    /// its HTTP on a free loopback port; returns once `/healthz` answers.
    pub fn start_with_targets(targets: &[String]) -> Result<DroverProcess> {
        let http = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "http: {{ listen: {http} }}\nresync: 10s\ntargets:{}",
            targets.concat()
        );
        let mut drover = Self::start(&config, Some(&http))?;
        drover.wait_http_ok("/healthz", Duration::from_secs(15))?;
        Ok(drover)
    }

    /// Like [`DroverProcess::start`], with extra CLI arguments after `run --config FILE`.
    pub fn start_with_args(
        config: &str,
        http: Option<&str>,
        extra: &[&str],
    ) -> Result<DroverProcess> {
        Self::start_with_env(config, http, extra, &[])
    }

    /// Like [`DroverProcess::start_with_args`], with extra environment variables for the
    /// process (e.g. `("DOCKER_HOST", "unix:///tmp/x.sock")`, `("DROVER_LOG", "debug")`).
    pub fn start_with_env(
        config: &str,
        http: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<DroverProcess> {
        census(Delivery::Local);
        let dir = temp_dir("drover")?;
        let config_path = dir.path().join("drover.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("drover.log"))?;
        let bin = drover_bin();
        let ops = format!("127.0.0.1:{}", free_port());
        let child = Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--ops-listen")
            .arg(&ops)
            .args(extra)
            .env(
                "DROVER_LOG",
                std::env::var("DROVER_LOG").unwrap_or_else(|_| "info,drover=debug".into()),
            )
            .env("RUST_BACKTRACE", "1")
            // Tests run side by side on one Swarm: each drover its own job journal.
            .env("DROVER_JOURNAL", unique("t"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(DroverProcess {
            child,
            dir,
            http: http.map(str::to_string),
            ops,
        })
    }

    /// `drover run` with no config file (the README's zero-config default): `args` are
    /// its flags after `run --ops-listen OPS` (`--nginx-output`, `--listen`, ...);
    /// `DROVER_CONFIG` and the flags' environment fallbacks are cleared, so only `args`
    /// count.
    pub fn start_without_config(args: &[&str]) -> Result<DroverProcess> {
        census(Delivery::Local);
        let dir = temp_dir("drover")?;
        let log = std::fs::File::create(dir.path().join("drover.log"))?;
        let bin = drover_bin();
        let ops = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(&bin);
        cmd.arg("run").arg("--ops-listen").arg(&ops).args(args);
        for key in [
            "DROVER_CONFIG",
            "DROVER_NGINX_OUTPUT",
            "DROVER_NGINX_SERVICE",
            "DROVER_NETWORK",
            "DROVER_LISTEN",
            "DROVER_OPS_LISTEN",
        ] {
            cmd.env_remove(key);
        }
        let child = cmd
            .env(
                "DROVER_LOG",
                std::env::var("DROVER_LOG").unwrap_or_else(|_| "info,drover=debug".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .env("DROVER_JOURNAL", unique("t"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(DroverProcess {
            child,
            dir,
            http: None,
            ops,
        })
    }

    /// Everything drover logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("drover.log")).unwrap_or_default()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id (for `/proc` and signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) with `kill(1)`.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?
            .success();
        ensure!(ok, "kill -{signal} {}", self.child.id());
        Ok(())
    }

    /// Waits for the process to exit on its own (after a signal), at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "drover did not exit within {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where `drover.yml` is; rewrite it and send `HUP` to reload.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("drover.yml")
    }

    /// `GET path` on drover's operator listener (health answers there too).
    pub fn get(&self, path: &str) -> std::io::Result<Response> {
        http_get_host(&self.ops, &self.ops, path)
    }

    /// The `/metrics` text (empty on error).
    pub fn metrics(&self) -> String {
        self.get("/metrics").map(|r| r.body).unwrap_or_default()
    }

    /// Waits until `GET path` answers 200, failing early (with the log) if drover exits.
    pub fn wait_http_ok(&mut self, path: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "drover exited ({status}) before {path} answered 200; log:\n{}",
                    self.logs()
                );
            }
            if self.get(path).map(|r| r.status == 200).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{path} did not answer 200 within {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The parsed `/metrics` of this process (see [`Metrics`]).
    pub fn scrape(&self) -> Result<Metrics> {
        let r = self.get("/metrics").context("GET /metrics")?;
        ensure!(r.status == 200, "GET /metrics answered {}", r.status);
        Metrics::parse(&r.body)
    }

    /// Waits until `/readyz` answers 200 (drover has synced and applied once).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_http_ok("/readyz", timeout)
    }
}

impl Drop for DroverProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var("DROVER_TEST_SHOW_LOGS").as_deref() == Ok("1")
        {
            eprintln!(
                "----- drover log ({}) -----\n{}----- end of drover log -----",
                self.dir.path().display(),
                self.logs()
            );
        }
    }
}

/// A background loop that GETs `host` through nginx every `every` and records failures to
/// connect (refused, reset or aborted = nginx was down or a reload failed; timeouts and
/// 5xx answers do not count). Stop it with
/// [`Prober::finish`], which returns (requests made, connection failures with detail).
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Prober {
    pub fn start(addr: &str, host: &str, every: Duration) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (addr, host, flag) = (addr.to_string(), host.to_string(), stop.clone());
        let handle = std::thread::spawn(move || {
            let (mut n, mut failures) = (0u64, vec![]);
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                // Only failures to connect count: a slow or 5xx answer is nginx working.
                if let Err(e) = http_get_host(&addr, &host, "/") {
                    use std::io::ErrorKind::*;
                    if matches!(
                        e.kind(),
                        ConnectionRefused | ConnectionReset | ConnectionAborted
                    ) {
                        failures.push(format!("request {n}: {e}"));
                    }
                }
                std::thread::sleep(every);
            }
            (n, failures)
        });
        Prober {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- Routing scenarios shared by the e2e tests ----

/// A builtin nginx target writing `output`, checked and reloaded in the `nginx` service.
/// The routing target of `nginx`: its `drover.conf`, the backends on `network`.
pub fn routing_target(nginx: &NginxService, network: &str) -> String {
    nginx_target(&nginx.conf("drover.conf"), network, nginx.name())
}

pub fn nginx_target(output: &std::path::Path, network: &str, nginx: &str) -> String {
    format!(
        r#"
  - name: nginx
    template: builtin:nginx
    output: {output}
    network: {network}
    debounce: {{ min: 100ms, max: 1s }}
    check:
      exec: {{ service: {nginx}, command: ["nginx", "-t"] }}
    notify:
      - signal: {{ service: {nginx}, signal: HUP }}
"#,
        output = output.display(),
    )
}

/// A backend routed by the builtin nginx template on plain http (no certificates here).
pub fn routed_backend(name: &str, host: &str, network: &str, replicas: u32) -> Result<Resource> {
    ServiceBuilder::backend(name)
        .replicas(replicas)
        .network(network)
        .label("routing-host", host)
        .label("routing-port", "80")
        .label("routing-tls", "false")
        .create()
}

/// The hostnames (short container ids) of the running tasks of `service`.
pub fn running_hostnames(service: &str) -> Result<BTreeSet<String>> {
    Ok(tasks(service)?
        .into_iter()
        .filter(|t| t.state == "running")
        .filter_map(|t| t.container.map(|c| c[..12.min(c.len())].to_string()))
        .collect())
}

/// Waits until `rounds × n` requests through nginx are answered by exactly the set of
/// running tasks of `service` (every task answers, no stale one does).
pub fn wait_all_tasks_answer(
    nginx: &NginxService,
    host: &str,
    service: &str,
    timeout: Duration,
) -> Result<()> {
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let ok = wait_until(timeout, Duration::from_millis(250), || {
        let Ok(want) = running_hostnames(service) else {
            return false;
        };
        let mut seen = BTreeSet::new();
        for _ in 0..(3 * want.len().max(1)) {
            if let Ok(r) = nginx.get(host, "/") {
                if r.status == 200 {
                    seen.insert(r.body.trim().to_string());
                }
            }
        }
        let done = seen == want;
        last = (want, seen);
        done
    });
    ensure!(
        ok,
        "within {timeout:?}, nginx answered from {:?}, running tasks are {:?}",
        last.1,
        last.0
    );
    Ok(())
}

/// Waits until the rendered file lists exactly the running task IPs of `service`.
pub fn wait_file_matches(
    path: &std::path::Path,
    service: &str,
    network: &str,
    n: usize,
    timeout: Duration,
) -> Result<()> {
    let mut last = (vec![], vec![]);
    let ok = wait_until(timeout, Duration::from_millis(100), || {
        let Ok(want) = running_task_ips(service, network) else {
            return false;
        };
        let got = upstream_ips(&std::fs::read_to_string(path).unwrap_or_default());
        let done = want.len() == n && got == want;
        last = (want, got);
        done
    });
    ensure!(
        ok,
        "{} did not list the running task IPs within {timeout:?}: running {:?}, rendered {:?}\n{}",
        path.display(),
        last.0,
        last.1,
        std::fs::read_to_string(path).unwrap_or_default()
    );
    Ok(())
}

// ---- Images for update scenarios ----

/// Builds `FROM busybox` + a version file (+ Dockerfile lines), pushes it, returns
/// `repo@digest` as the registry stores it.
pub fn build_push(image: &str, version: &str, extra: &str) -> Result<String> {
    let dir = temp_dir("drover-e2e-image")?;
    std::fs::write(dir.path().join("version"), version)?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {}\nCOPY version /version\n{extra}\n", busybox_image()),
    )?;
    let ctx = dir.path().display().to_string();
    let out = std::process::Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", image, &ctx])
        .output()?;
    ensure!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker(&["push", image])?;
    // The tag now names the image just built; its one repo digest is what was pushed.
    let digests = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        image,
    ])?;
    let digests: Vec<String> = serde_json::from_str(&digests)?;
    digests
        .into_iter()
        .next()
        .context("no repo digest after push")
}

/// A self-signed certificate for `host` where certbot would put it (`live/HOST/`), readable
/// by nginx's workers; with `mismatched`, its key belongs to another certificate (nginx -t
/// refuses the pair).
pub fn make_certificate(live: &Path, host: &str, mismatched: bool) -> Result<()> {
    let dir = live.join(host);
    std::fs::create_dir_all(&dir)?;
    let make = |cert: &str| -> Result<()> {
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", &format!("/CN={host}")])
            .arg("-keyout")
            .arg(dir.join("privkey.pem"))
            .arg("-out")
            .arg(dir.join(cert))
            .output()
            .context("openssl")?;
        ensure!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    make("fullchain.pem")?;
    if mismatched {
        make("other.pem")?;
    }
    for f in ["privkey.pem", "fullchain.pem"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// The server blocks of `host` in a file of the built-in nginx template (its marker up to
/// the next one).
pub fn host_block<'c>(conf: &'c str, host: &str) -> Option<&'c str> {
    let start = conf.find(&format!("# host {host}\n"))?;
    let rest = &conf[start + 1..];
    let end = rest
        .find("\n# host ")
        .or_else(|| rest.find("# end of hosts"))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

fn openssl_run(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).output()?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A test CA (`ca.pem`, `ca.key`) and a server certificate signed by it for `ip`
/// (`relay.pem`, `relay.key`) in `dir`: rustls refuses a self-signed CA certificate as a
/// server's, so TLS relays (socat) present the leaf and clients trust `ca.pem`.
pub fn tls_ca_and_leaf(dir: &std::path::Path, ip: &str) -> Result<()> {
    let p = |f: &str| dir.join(f).display().to_string();
    openssl_run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=drover-test-relay-ca",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ])?;
    openssl_run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=relay",
        "-keyout",
        &p("relay.key"),
        "-out",
        &p("relay.csr"),
    ])?;
    std::fs::write(
        dir.join("relay.ext"),
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )?;
    openssl_run(&[
        "x509",
        "-req",
        "-in",
        &p("relay.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p("relay.ext"),
        "-out",
        &p("relay.pem"),
    ])
}
