//! Swarms of several nodes on this one machine, for the cluster e2e tests.
//!
//! Each node is a network namespace with a veth pair and its own /24 (10.213.SLOT.0/24:
//! the host side is .1, the node .2), running its own `dockerd` inside private UTS and
//! mount namespaces (its own host name and its own `/run`, so a container bind-mounting
//! `/var/run/docker.sock` reaches its node's engine). The recipe is the one in DESIGN.md
//! ("Several Swarm nodes on one machine"). A second socket, `DIR/docker.sock`, is for the
//! test on the host. Two `socat` forwarders per node make `127.0.0.1:5000` inside the
//! node reach the host's registry, digests included, so nodes pull the test images.
//!
//! Invariants: a cluster is only ever built from namespace nodes, never joined to the
//! host's Swarm (other tests' services must not land on these nodes, and a test may stop
//! any node's engine); every slot (namespace, veth, address range, state directory) is
//! claimed under one lock file by creating its directory, so concurrent tests and
//! processes never share one, and a slot whose owner died is reclaimed by exactly one;
//! [`Cluster`]'s drop stops every engine (SIGTERM, then SIGKILL to whatever is left in the
//! namespace), removes the namespaces, the forwarders and the state directories, panicking
//! or not.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Context, Result, bail, ensure, http_get_host, wait_for, wait_until};

/// Where slots live; a slot directory holds the node's engine state and logs.
const ROOT: &str = "/tmp/drover-cluster";
/// Nodes take 10.213.SLOT.0/24, SLOT in 1..=MAX_SLOT.
const MAX_SLOT: u32 = 250;
const REGISTRY_PORT: u16 = 5000;

/// A Swarm of namespace nodes: `managers` managers (the first one initialises the Swarm
/// and leads at the start) and `workers` workers.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

/// How an app made by [`Cluster::create_app`] starts and stops.
#[derive(Clone, Copy, Debug)]
pub enum AppKind {
    /// busybox httpd that exits at SIGTERM, with no health check.
    Plain,
    /// Goes on answering `drain` seconds after SIGTERM, then exits (the grace period is
    /// longer): an app that drains before it stops.
    Graceful { drain: u32 },
    /// Listens `delay` seconds after its container starts, and a health check says when it
    /// does, so Swarm stops an old task only once its successor answers.
    HealthChecked { delay: u32 },
}

impl Cluster {
    pub fn new(managers: usize, workers: usize) -> Result<Cluster> {
        if managers == 0 {
            bail!("a Swarm needs a manager");
        }
        allow_forwarding()?;
        let mut nodes = Vec::new();
        for i in 0..managers + workers {
            let role = if i < managers { "m" } else { "w" };
            let n = i - if i < managers { 0 } else { managers };
            nodes.push(Node::start(&format!("{role}{}", n + 1), i < managers)?);
        }
        let cluster = Cluster { nodes };
        for node in &cluster.nodes {
            node.wait_engine(Duration::from_secs(60))?;
        }
        let first = &cluster.nodes[0];
        first.docker(&["swarm", "init", "--advertise-addr", &first.addr])?;
        let manager_token = first.docker(&["swarm", "join-token", "-q", "manager"])?;
        let worker_token = first.docker(&["swarm", "join-token", "-q", "worker"])?;
        let join_addr = format!("{}:2377", first.addr);
        for node in &cluster.nodes[1..] {
            let token = if node.manager {
                &manager_token
            } else {
                &worker_token
            };
            node.docker(&[
                "swarm",
                "join",
                "--advertise-addr",
                &node.addr,
                "--token",
                token,
                &join_addr,
            ])?;
        }
        let expected = cluster.nodes.len();
        wait_for(
            "every node Ready in the Swarm",
            Duration::from_secs(60),
            || {
                first
                    .docker(&["node", "ls", "--format", "{{.Status}}"])
                    .map(|out| out.lines().filter(|l| *l == "Ready").count() == expected)
                    .unwrap_or(false)
            },
        )?;
        Ok(cluster)
    }

    /// An app on `network` routed at `host`, running `image` (from [`super::build_push`]:
    /// it serves its version at `/version`), rolled start-first one task at a time, started
    /// and stopped as `kind` says.
    #[allow(clippy::too_many_arguments)]
    pub fn create_app(
        &self,
        network: &str,
        name: &str,
        host: &str,
        image: &str,
        replicas: u32,
        constraint: &str,
        kind: AppKind,
    ) -> Result<()> {
        let (replicas, routing) = (replicas.to_string(), format!("routing-host={host}"));
        let mut args = vec![
            "service",
            "create",
            "--detach",
            "--name",
            name,
            "--network",
            network,
            "--replicas",
            &replicas,
            "--constraint",
            constraint,
            "--label",
            &routing,
            "--label",
            "routing-port=80",
            "--label",
            "routing-tls=false",
            "--update-order",
            "start-first",
            "--update-parallelism",
            "1",
            "--update-delay",
            "0s",
            "--update-failure-action",
            "pause",
            "--update-monitor",
            "2s",
        ];
        // The grace period outlasts a graceful app's drain, so Swarm never kills it early.
        let grace = match kind {
            AppKind::Graceful { drain } => format!("{}s", drain + 5),
            _ => "1s".to_owned(),
        };
        args.extend(["--stop-grace-period", &grace]);
        if matches!(kind, AppKind::HealthChecked { .. }) {
            args.extend([
                "--health-cmd",
                r"printf 'GET /version HTTP/1.0\r\n\r\n' | nc 127.0.0.1 80 | grep -q 200",
                "--health-interval",
                "1s",
                "--health-timeout",
                "2s",
                "--health-retries",
                "3",
                "--health-start-period",
                "10s",
            ]);
        }
        let run = match kind {
            AppKind::Plain => "cp /version /www/version; exec httpd -f -p 80 -h /www".to_owned(),
            // The shell (pid 1) traps SIGTERM: httpd goes on answering for `drain` seconds,
            // the time nginx has to learn that the task is going, then stops.
            AppKind::Graceful { drain } => format!(
                "cp /version /www/version; httpd -f -p 80 -h /www & \
                 trap 'sleep {drain}; kill $!; exit 0' TERM; wait"
            ),
            AppKind::HealthChecked { delay } => {
                format!("cp /version /www/version; sleep {delay}; exec httpd -f -p 80 -h /www")
            }
        };
        args.extend([image, "sh", "-c", &run]);
        self.docker(&args)?;
        Ok(())
    }

    pub fn node(&self, short: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.short == short)
            .unwrap_or_else(|| panic!("no node {short} in this cluster"))
    }

    /// A manager whose engine answers (the first one that does).
    pub fn manager(&self) -> Result<&Node> {
        self.nodes
            .iter()
            .filter(|n| n.manager && n.engine.is_some())
            .find(|n| n.docker(&["node", "ls", "-q"]).is_ok())
            .context("no manager answers")
    }

    /// The node that currently is the Raft leader (asked of a manager that answers).
    pub fn leader(&self) -> Result<&Node> {
        let host = self.manager()?.docker(&[
            "node",
            "ls",
            "--filter",
            "role=manager",
            "--format",
            "{{.Hostname}} {{.ManagerStatus}}",
        ])?;
        let name = host
            .lines()
            .find_map(|l| l.strip_suffix(" Leader"))
            .context("no leader")?
            .to_string();
        self.nodes
            .iter()
            .find(|n| n.hostname == name)
            .with_context(|| format!("leader {name} is not one of ours"))
    }

    /// `docker ARGS` against a manager that answers.
    /// Creates a busybox backend service `name` on `network` with these service labels
    /// (`routing-host`, ...), detached.
    pub fn create_routed(&self, name: &str, network: &str, labels: &[(&str, &str)]) -> Result<()> {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec![
            "service",
            "create",
            "--detach",
            "--name",
            name,
            "--network",
            network,
            "--stop-grace-period",
            "1s",
        ];
        for l in &labels {
            args.extend(["--label", l.as_str()]);
        }
        let image = super::busybox_image();
        args.push(&image);
        self.docker(&args).map(drop)
    }

    pub fn docker(&self, args: &[&str]) -> Result<String> {
        self.manager()?.docker(args)
    }

    /// (task id, container id) of each task of `service` that runs now.
    pub fn running_tasks(&self, service: &str) -> Result<Vec<(String, String)>> {
        let ids = self.docker(&[
            "service",
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            "desired-state=running",
            service,
        ])?;
        let mut out = Vec::new();
        for id in ids.lines() {
            let state = self.docker(&[
                "inspect",
                "--type",
                "task",
                "--format",
                "{{.Status.State}} {{.Status.ContainerStatus.ContainerID}}",
                id,
            ])?;
            if let Some(container) = state.strip_prefix("running ") {
                out.push((id.to_owned(), container.to_owned()));
            }
        }
        Ok(out)
    }

    /// Short container ids of the running tasks of `service`: what the busybox backend
    /// answers with.
    pub fn running_container_ids(&self, service: &str) -> Result<BTreeSet<String>> {
        Ok(self
            .running_tasks(service)?
            .into_iter()
            .map(|(_, container)| container.chars().take(12).collect())
            .collect())
    }

    /// A service's logs, stdout and stderr (drover and nginx log to stderr, which
    /// [`Cluster::docker`] does not return).
    pub fn service_logs(&self, service: &str) -> String {
        let Ok(manager) = self.manager() else {
            return "no manager answers".into();
        };
        match Command::new("docker")
            .args(["-H", &format!("unix://{}", manager.socket.display())])
            .args(["service", "logs", "--raw", "--timestamps", service])
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => e.to_string(),
        }
    }
}

/// The shipped `stack.yml` with the shipped `deploy/drover.yml`, deployed as stack `home`
/// on a cluster with only the variables stack.yml documents set: the test images, the
/// shared network's name, the app's host name, nginx's host ports and the directory
/// `deploy/gen-secrets.sh` wrote the secrets to. Goes away with the cluster.
pub struct ShippedStack {
    pub cluster: Cluster,
    pub name: String,
    /// The secrets deploy/gen-secrets.sh wrote (and the edited config, if any).
    dir: tempfile::TempDir,
}

impl ShippedStack {
    pub fn deploy(
        cluster: Cluster,
        network: &str,
        app_host: &str,
        http_port: u16,
    ) -> Result<ShippedStack> {
        ShippedStack::deploy_with(cluster, network, app_host, http_port, &[], |c| c)
    }

    /// [`ShippedStack::deploy`] with more of the variables stack.yml documents set
    /// (`APP_IMAGE`, ...; these win over the defaults below) and `deploy/drover.yml` passed
    /// through `edit` first and given as DROVER_CONFIG_FILE (the knob stack.yml documents):
    /// for the one line a test must change, such as a hook's `allow` rule naming the test
    /// registry's images.
    pub fn deploy_with(
        cluster: Cluster,
        network: &str,
        app_host: &str,
        http_port: u16,
        vars: &[(&str, String)],
        edit: impl FnOnce(String) -> String,
    ) -> Result<ShippedStack> {
        let files = ["stack.yml"];
        Self::deploy_files(&files, cluster, network, app_host, http_port, vars, edit)
    }

    /// [`ShippedStack::deploy`] together with the monitoring add-on
    /// (`deploy/stack.monitoring.yml`, as its header says to deploy it), with these of
    /// the variables both files document set (`PROMETHEUS_IMAGE`, `PROMETHEUS_PLACEMENT`).
    pub fn deploy_with_monitoring(
        cluster: Cluster,
        network: &str,
        app_host: &str,
        http_port: u16,
        vars: &[(&str, String)],
    ) -> Result<ShippedStack> {
        let files = ["stack.yml", "deploy/stack.monitoring.yml"];
        Self::deploy_files(&files, cluster, network, app_host, http_port, vars, |c| c)
    }

    pub fn deploy_files(
        files: &[&str],
        cluster: Cluster,
        network: &str,
        app_host: &str,
        http_port: u16,
        vars: &[(&str, String)],
        edit: impl FnOnce(String) -> String,
    ) -> Result<ShippedStack> {
        let secrets: &[(&str, String)] = &[];
        Self::deploy_with_secrets(
            files, cluster, network, app_host, http_port, vars, secrets, edit,
        )
    }

    /// [`ShippedStack::deploy_files`] with some secrets given instead of made: written
    /// where deploy/gen-secrets.sh keeps existing files (the git server's `git-token`, a
    /// `github-secret` a test's git hook already signs with).
    #[allow(clippy::too_many_arguments)]
    pub fn deploy_with_secrets(
        files: &[&str],
        cluster: Cluster,
        network: &str,
        app_host: &str,
        http_port: u16,
        vars: &[(&str, String)],
        given: &[(&str, String)],
        edit: impl FnOnce(String) -> String,
    ) -> Result<ShippedStack> {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let secrets = super::temp_dir("cl-shipped")?;
        for (name, value) in given {
            std::fs::write(secrets.path().join(name), value)?;
        }
        let shipped = std::fs::read_to_string(repo.join("deploy/drover.yml"))?;
        let config = secrets.path().join("drover.yml");
        std::fs::write(&config, edit(shipped))?;
        let out = Command::new(repo.join("deploy/gen-secrets.sh"))
            .arg(secrets.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "deploy/gen-secrets.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let name = "home".to_owned();
        let manager = cluster.manager()?;
        super::census(super::Delivery::Agents);
        let out = Command::new("docker")
            .args(["-H", &format!("unix://{}", manager.socket.display())])
            .args(["stack", "deploy"])
            .args(files.iter().flat_map(|f| ["-c", f]))
            .arg(&name)
            .current_dir(repo)
            .envs([
                ("DROVER_IMAGE", super::drover_image()),
                ("NGINX_IMAGE", super::nginx_image()),
                ("APP_IMAGE", super::busybox_image()),
                ("APP_HOST", app_host.to_owned()),
                ("WEB_NETWORK", network.to_owned()),
                ("DROVER_SECRETS_DIR", secrets.path().display().to_string()),
                ("DROVER_CONFIG_FILE", config.display().to_string()),
                ("HTTP_PORT", http_port.to_string()),
                ("HTTPS_PORT", (http_port + 1).to_string()),
            ])
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .output()?;
        if !out.status.success() {
            bail!(
                "docker stack deploy: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ShippedStack {
            cluster,
            name,
            dir: secrets,
        })
    }

    /// The Swarm name of the stack's service `short` (`app` → `home_app`).
    pub fn service(&self, short: &str) -> String {
        format!("{}_{short}", self.name)
    }

    /// The value of a secret deploy/gen-secrets.sh made (`ci-secret`, ...).
    pub fn secret(&self, name: &str) -> Result<String> {
        Ok(std::fs::read_to_string(self.dir.path().join(name))?
            .trim()
            .to_owned())
    }

    /// Where deploy/gen-secrets.sh wrote the secrets (DROVER_SECRETS_DIR).
    pub fn secrets_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The operator listener's bearer token (`ops-token`, `http.ops.token_file`).
    pub fn ops_token(&self) -> Result<String> {
        self.secret("ops-token")
    }
}

impl Drop for ShippedStack {
    /// drover's and nginx's logs (captured by the test harness: shown for failures only).
    fn drop(&mut self) {
        for svc in ["drover", "nginx"] {
            let name = self.service(svc);
            let logs = self.cluster.service_logs(&name);
            eprintln!("----- {name} logs -----\n{logs}\n----- end of {name} logs -----");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Signal every engine before the nodes' own drops wait for each: containers stop
        // in parallel.
        for node in &mut self.nodes {
            node.signal_engine();
        }
    }
}

/// Waits up to `timeout` until `n` tasks run (`running`: their short container ids, which
/// the busybox backend answers with) and requests for `host` through the nginx at `addr`
/// (on node `node`, for the message) are answered by exactly those tasks.
pub fn wait_nginx_answers_from(
    node: &str,
    addr: &str,
    host: &str,
    n: usize,
    timeout: Duration,
    running: impl Fn() -> Result<BTreeSet<String>>,
) -> Result<()> {
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let ok = wait_until(timeout, Duration::from_millis(300), || {
        let Ok(want) = running() else {
            return false;
        };
        if want.len() != n {
            return false;
        }
        let mut seen = BTreeSet::new();
        for _ in 0..4 * n {
            if let Ok(r) = http_get_host(addr, host, "/") {
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
        "nginx on {node} answered from {:?}; running tasks are {:?}",
        last.1,
        last.0
    );
    Ok(())
}

/// One namespace node of a [`Cluster`].
pub struct Node {
    /// `m1`, `w2`, ... (as created).
    pub short: String,
    /// Namespace name and host name (what `docker node ls` shows).
    pub hostname: String,
    pub manager: bool,
    /// The node's own address (10.213.SLOT.2): Swarm advertises it, published ports bind it.
    pub addr: String,
    /// The host's side of the veth (10.213.SLOT.1).
    pub host_addr: String,
    /// Engine socket for the test on the host.
    pub socket: PathBuf,
    dir: PathBuf,
    slot: u32,
    engine: Option<Child>,
    host_forwarder: Option<Child>,
    /// Runs inside the node: it dies with the node's processes and is restarted with the engine.
    node_forwarder: Option<Child>,
}

impl Node {
    fn start(short: &str, manager: bool) -> Result<Node> {
        let (slot, dir) = claim_slot()?;
        let hostname = format!("drvn{slot}");
        let mut node = Node {
            short: short.into(),
            hostname: hostname.clone(),
            manager,
            addr: format!("10.213.{slot}.2"),
            host_addr: format!("10.213.{slot}.1"),
            socket: dir.join("docker.sock"),
            dir,
            slot,
            engine: None,
            host_forwarder: None,
            node_forwarder: None,
        };
        // From here on, drop tears down whatever part was built.
        node.create_network()?;
        node.host_forwarder = Some(node.forwarder(None, &node.host_addr, "127.0.0.1")?);
        node.start_engine()?;
        Ok(node)
    }

    fn veth(&self) -> (String, String) {
        (format!("drvh{}", self.slot), format!("drvc{}", self.slot))
    }

    fn create_network(&self) -> Result<()> {
        let ns = &self.hostname;
        let (host_if, node_if) = self.veth();
        run("ip", &["netns", "add", ns])?;
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &node_if,
            ],
        )?;
        run("ip", &["link", "set", &node_if, "netns", ns])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.host_addr),
                "dev",
                &host_if,
            ],
        )?;
        run("ip", &["link", "set", &host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", ns.as_str(), "ip"];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        inside(&["addr", "add", &format!("{}/24", self.addr), "dev", &node_if])?;
        inside(&["link", "set", &node_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&["route", "add", "default", "via", &self.host_addr])?;
        Ok(())
    }

    /// `socat` from BIND:5000 to TO:5000, inside the node's network namespace or on the host.
    fn forwarder(&self, ns: Option<&str>, bind: &str, to: &str) -> Result<Child> {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg("socat");
                c
            }
            None => Command::new("socat"),
        };
        cmd.arg(format!(
            "TCP-LISTEN:{REGISTRY_PORT},bind={bind},fork,reuseaddr"
        ))
        .arg(format!("TCP:{to}:{REGISTRY_PORT}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run socat (scripts/test installs it)")
    }

    /// Starts the node's engine (again, after [`Node::stop_engine`]); its Swarm state
    /// survives in the data root.
    pub fn start_engine(&mut self) -> Result<()> {
        if self.engine.is_some() {
            return Ok(());
        }
        if let Some(mut old) = self.node_forwarder.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.node_forwarder =
            Some(self.forwarder(Some(&self.hostname), "127.0.0.1", &self.host_addr)?);
        // The host's daemon.json pins its own data root; keep its storage driver and MTU.
        let host_conf: serde_json::Value = std::fs::read("/etc/docker/daemon.json")
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut conf = serde_json::Map::new();
        for key in ["storage-driver", "mtu"] {
            if let Some(v) = host_conf.get(key) {
                conf.insert(key.into(), v.clone());
            }
        }
        let conf_path = self.dir.join("daemon.json");
        std::fs::write(&conf_path, serde_json::Value::Object(conf).to_string())?;
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        let script = format!(
            "mount -t tmpfs tmpfs /run && hostname {host} && exec dockerd \
             --config-file {conf} --data-root {dir}/data --exec-root /run/docker \
             --pidfile /run/docker.pid -H unix:///var/run/docker.sock -H unix://{sock}",
            host = self.hostname,
            conf = conf_path.display(),
            dir = self.dir.display(),
            sock = self.socket.display(),
        );
        // nsenter, unshare and sh all exec: the child's pid is dockerd's.
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.hostname))
            .args([
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start dockerd in the node")?;
        self.engine = Some(child);
        Ok(())
    }

    /// Stops the node's engine (SIGTERM, as `systemctl stop docker` does; SIGKILL to what
    /// is left in the node after 30 s), keeping its Swarm state for [`Node::start_engine`].
    pub fn stop_engine(&mut self) {
        self.signal_engine();
        self.reap_engine();
    }

    /// Waits until the node's own socket answers.
    pub fn wait_engine(&self, timeout: Duration) -> Result<()> {
        wait_for(&format!("the engine of {}", self.hostname), timeout, || {
            self.docker(&["info", "--format", "{{.ID}}"]).is_ok()
        })
    }

    /// `docker -H unix://SOCKET ARGS...`: trimmed stdout, or an error with stderr.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let host = format!("unix://{}", self.socket.display());
        let mut full = vec!["-H", host.as_str()];
        full.extend_from_slice(args);
        run("docker", &full)
    }

    /// The node engine's data root, on the host's file system: named volumes are under
    /// `volumes/NAME/_data`, readable without asking the engine.
    pub fn data_root(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Ids of the running containers of `service` on this node.
    pub fn containers(&self, service: &str) -> Result<Vec<String>> {
        let out = self.docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.swarm.service.name={service}"),
        ])?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// The logs (stdout and stderr: nginx and drover log to stderr) of this node's running
    /// containers of `service`, one after the other.
    pub fn container_logs(&self, service: &str) -> Result<String> {
        let mut logs = String::new();
        for id in self.containers(service)? {
            let out = Command::new("docker")
                .args(["-H", &format!("unix://{}", self.socket.display())])
                .args(["logs", &id])
                .stdin(Stdio::null())
                .output()
                .context("cannot run docker logs")?;
            ensure!(
                out.status.success(),
                "docker logs {id} on {}: {}",
                self.short,
                String::from_utf8_lossy(&out.stderr)
            );
            logs.push_str(&String::from_utf8_lossy(&out.stdout));
            logs.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        Ok(logs)
    }

    /// `GET http://127.0.0.1:PORT/PATH` inside the network namespace of a running
    /// container of `service` on this node (the nodes' engines share the host's pid
    /// namespace): for listeners that are not published, like drover's operator port.
    /// Returns the body of a 2xx answer.
    pub fn get_inside(&self, service: &str, port: u16, path: &str) -> Result<String> {
        self.get_inside_as(service, port, path, None)
    }

    /// [`Node::get_inside`] with `Authorization: Bearer TOKEN` (the shipped stack's
    /// operator listener wants the `ops-token` secret: [`ShippedStack::ops_token`]).
    pub fn get_inside_as(
        &self,
        service: &str,
        port: u16,
        path: &str,
        token: Option<&str>,
    ) -> Result<String> {
        let id = self
            .containers(service)?
            .pop()
            .with_context(|| format!("no {service} container on {}", self.short))?;
        let pid = self.docker(&["inspect", "--format", "{{.State.Pid}}", &id])?;
        let net = format!("--net=/proc/{pid}/ns/net");
        let url = format!("http://127.0.0.1:{port}{path}");
        let header = token.map(|t| format!("Authorization: Bearer {t}"));
        let mut args = vec![net.as_str(), "curl", "-sSf", "-m", "5"];
        if let Some(h) = &header {
            args.extend(["-H", h.as_str()]);
        }
        args.push(&url);
        run("nsenter", &args)
    }

    /// This node's Swarm node id.
    pub fn node_id(&self) -> Result<String> {
        self.docker(&["info", "--format", "{{.Swarm.NodeID}}"])
    }

    fn namespace_pids(&self) -> Vec<u32> {
        run("ip", &["netns", "pids", &self.hostname])
            .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    fn signal_engine(&mut self) {
        if let Some(child) = &self.engine {
            kill(child.id(), "TERM");
        }
    }

    /// Waits for a signalled engine to exit (30 s at most), then kills whatever is left in
    /// the node's namespace.
    fn reap_engine(&mut self) {
        if let Some(mut child) = self.engine.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in self.namespace_pids() {
            kill(pid, "KILL");
        }
        if let Some(mut f) = self.node_forwarder.take() {
            let _ = f.wait();
        }
    }

    fn teardown(&mut self) {
        self.reap_engine();
        if let Some(mut f) = self.host_forwarder.take() {
            let _ = f.kill();
            let _ = f.wait();
        }
        release_slot(self.slot, &self.dir);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal_engine();
        self.teardown();
    }
}

/// Lets traffic between the nodes' veths pass the host's FORWARD chain, whose policy the
/// host engine sets to DROP. Idempotent.
fn allow_forwarding() -> Result<()> {
    for dir in ["-s", "-d"] {
        let rule = ["DOCKER-USER", dir, "10.213.0.0/16", "-j", "ACCEPT"];
        let mut check = vec!["-C"];
        check.extend_from_slice(&rule);
        if run("iptables", &check).is_err() {
            let mut insert = vec!["-I"];
            insert.extend_from_slice(&rule);
            run("iptables", &insert).context("adding the DOCKER-USER rule for the nodes")?;
        }
    }
    Ok(())
}

/// Claims a free slot; a slot whose owner process is gone is cleaned up and taken over.
/// Claims are serialised by a lock file across threads and test binaries: without it two
/// claimants that find the same stale slot both clean it up, and the slower one tears
/// down the namespace the faster one has just set up.
fn claim_slot() -> Result<(u32, PathBuf)> {
    std::fs::create_dir_all(ROOT)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(format!("{ROOT}/.claim.lock"))?;
    // Released when `lock` closes at return.
    // SAFETY: flock on a descriptor this function owns for the call's duration.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the cluster slots");
    }
    for slot in 1..=MAX_SLOT {
        let dir = PathBuf::from(format!("{ROOT}/{slot}"));
        if std::fs::create_dir(&dir).is_ok() {
            // A namespace may outlive its directory (a run killed mid-release).
            clear_namespace(slot);
        } else {
            let owner = std::fs::read_to_string(dir.join("owner"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            // Under the lock, a directory without an owner was left by a claimant that
            // died between creating it and writing the owner.
            let alive = owner.is_some_and(|pid| PathBuf::from(format!("/proc/{pid}")).exists());
            if alive {
                continue;
            }
            release_slot(slot, &dir);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
        }
        std::fs::write(dir.join("owner"), std::process::id().to_string())?;
        return Ok((slot, dir));
    }
    bail!("no free cluster slot under {ROOT}")
}

/// Removes everything a slot may hold: processes in its namespace, the namespace (which
/// takes the veth pair with it), the state directory.
fn release_slot(slot: u32, dir: &PathBuf) {
    clear_namespace(slot);
    // Engine mounts live in the node's private mount namespace, gone with its processes;
    // retry briefly while the last of them exit.
    for _ in 0..20 {
        if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("cluster: could not remove {}", dir.display());
}

fn clear_namespace(slot: u32) {
    let ns = format!("drvn{slot}");
    if let Ok(out) = run("ip", &["netns", "pids", &ns]) {
        for pid in out.lines().filter_map(|l| l.trim().parse().ok()) {
            kill(pid, "KILL");
        }
    }
    let _ = run("ip", &["netns", "del", &ns]);
    let _ = run("ip", &["link", "del", &format!("drvh{slot}")]);
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
