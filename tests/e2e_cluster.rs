//! Cluster mode end to end: Swarms of network-namespace nodes on this machine
//! (tests/support/cluster.rs), drover's agent API and delivery to other nodes.
//!
//! Every test builds its own Swarm from namespace nodes, never touching the host's Swarm,
//! and tears it down on drop.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover::cluster::wire::{self, ApplyRequest, Key};
use support::cluster::{self, Cluster, Node, ShippedStack};
use support::*;

/// How long Swarm may take to place and start tasks on namespace nodes (pulls included).
const SWARM: Duration = Duration::from_secs(120);
/// How long drover may take to carry a converged Swarm into nginx on another node (debounce
/// max 1 s, an agent round trip, a check and a reload), with a wide margin for shared cores.
const BOUND: Duration = Duration::from_secs(30);
const KEY: &str = "cluster-key-for-tests";
const NGINX_PORT: u16 = 8082;
const AGENT_PORT: u16 = 9092;
/// drover's operator listener (metrics), published so the test reads each node's.
const OPS_PORT: u16 = 9093;

/// Ids of the running containers of `service` on `node`.
fn containers_on(node: &Node, service: &str) -> Result<Vec<String>> {
    node.containers(service)
}

/// (hostname of the node, IP on `network`) of each running task of `service`.
fn task_placement(
    cluster: &Cluster,
    service: &str,
    network: &str,
) -> Result<Vec<(String, String)>> {
    let ids = cluster.docker(&[
        "service",
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        "desired-state=running",
        service,
    ])?;
    let mut out = vec![];
    for id in ids.lines() {
        let t: serde_json::Value =
            serde_json::from_str(&cluster.docker(&["inspect", "--type", "task", id])?)?;
        let t = &t[0];
        if t["Status"]["State"] != "running" {
            continue;
        }
        let node_id = t["NodeID"].as_str().unwrap_or_default();
        let host = cluster.docker(&[
            "node",
            "inspect",
            "--format",
            "{{.Description.Hostname}}",
            node_id,
        ])?;
        for att in t["NetworksAttachments"].as_array().into_iter().flatten() {
            if att["Network"]["Spec"]["Name"] != network {
                continue;
            }
            for a in att["Addresses"].as_array().into_iter().flatten() {
                let ip = a
                    .as_str()
                    .unwrap_or_default()
                    .split('/')
                    .next()
                    .unwrap_or_default();
                out.push((host.clone(), ip.to_string()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `GET /` from inside container `id` on `node` to `ip:80` (busybox `nc`: its `wget`
/// crashes in these images), returning the body.
fn get_from(node: &Node, id: &str, ip: &str) -> Result<String> {
    let out = node.docker(&[
        "exec",
        id,
        "sh",
        "-c",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 80"),
    ])?;
    Ok(out
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn harness_a_swarm_of_one_manager_and_two_workers_runs_tasks_on_every_node_that_reach_each_other()
-> Result<()> {
    require_e2e!();
    let cluster = Cluster::new(1, 2)?;
    let net = unique("cl-net");
    cluster.docker(&["network", "create", "-d", "overlay", "--attachable", &net])?;
    // By digest, as drover pins images: the forwarders must carry manifests too.
    let digest_ref = docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .RepoDigests 0}}",
        &busybox_image(),
    ])?;
    ensure!(
        digest_ref.contains("@sha256:"),
        "no repo digest for {}",
        busybox_image()
    );
    let be = unique("cl-be");
    cluster.docker(&[
        "service",
        "create",
        "--detach",
        "--name",
        &be,
        "--network",
        &net,
        "--replicas",
        "3",
        "--replicas-max-per-node",
        "1",
        "--stop-grace-period",
        "1s",
        &digest_ref,
    ])?;
    let hosts: Vec<String> = cluster.nodes.iter().map(|n| n.hostname.clone()).collect();
    wait_for(
        "one backend task running on each node",
        Duration::from_secs(120),
        || {
            task_placement(&cluster, &be, &net)
                .map(|p| {
                    let mut on: Vec<String> = p.into_iter().map(|(h, _)| h).collect();
                    on.sort();
                    let mut want = hosts.clone();
                    want.sort();
                    on == want
                })
                .unwrap_or(false)
        },
    )?;

    // Overlay (VXLAN) across nodes: a task on the second worker reaches every task.
    let w2 = cluster.node("w2");
    let from = containers_on(w2, &be)?
        .pop()
        .context("no backend container on w2")?;
    for (host, ip) in task_placement(&cluster, &be, &net)? {
        let body = get_from(w2, &from, &ip)?;
        ensure!(
            !body.is_empty(),
            "task on {host} at {ip} answered nothing to w2"
        );
    }

    // A host-mode published port on a worker is bound on that worker's address.
    let w1 = cluster.node("w1");
    let web = unique("cl-web");
    cluster.docker(&[
        "service",
        "create",
        "--detach",
        "--name",
        &web,
        "--stop-grace-period",
        "1s",
        "--constraint",
        &format!("node.hostname=={}", w1.hostname),
        "--publish",
        "mode=host,target=80,published=8081",
        &busybox_image(),
    ])?;
    let url = format!("http://{}:8081/", w1.addr);
    wait_for(
        "the worker's host port to answer",
        Duration::from_secs(120),
        || http_get(&url).map(|r| r.status == 200).unwrap_or(false),
    )?;
    let container = containers_on(w1, &web)?
        .pop()
        .context("no web container on w1")?;
    let hostname = w1.docker(&["inspect", "--format", "{{.Config.Hostname}}", &container])?;
    ensure!(
        http_get(&url)?.body.trim() == hostname,
        "the answer is not from the task on w1"
    );
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn harness_three_namespace_managers_elect_a_new_leader_when_the_leaders_engine_stops() -> Result<()>
{
    require_e2e!();
    let mut cluster = Cluster::new(3, 0)?;
    let old = cluster.leader()?.hostname.clone();
    let index = cluster
        .nodes
        .iter()
        .position(|n| n.hostname == old)
        .context("leader")?;
    cluster.nodes[index].stop_engine();
    let mut new = String::new();
    wait_for("a new leader", Duration::from_secs(60), || {
        match cluster.leader() {
            Ok(n) if n.hostname != old => {
                new = n.hostname.clone();
                true
            }
            _ => false,
        }
    })?;
    // The old leader comes back as a follower of the new one.
    cluster.nodes[index].start_engine()?;
    cluster.nodes[index].wait_engine(Duration::from_secs(60))?;
    wait_for(
        "the old leader to rejoin as a reachable manager",
        Duration::from_secs(60),
        || {
            cluster.nodes[index]
                .docker(&[
                    "node",
                    "ls",
                    "--filter",
                    "role=manager",
                    "--format",
                    "{{.Hostname}} {{.ManagerStatus}}",
                ])
                .map(|out| {
                    out.lines().any(|l| l == format!("{old} Reachable"))
                        && out.lines().any(|l| l == format!("{new} Leader"))
                })
                .unwrap_or(false)
        },
    )?;
    Ok(())
}

/// A Swarm of 1 manager + 2 workers running drover as a global service (its agent API
/// on the `app` network and published in host mode for the forged-request test), nginx
/// pinned to worker `w1` with conf.d on a volume local to that node (so only delivery
/// through w1's agent can reach it), and a routed backend `be` with 3 replicas.
struct Stack {
    cluster: Cluster,
    _dir: tempfile::TempDir,
}

const NET: &str = "app";
const HOST: &str = "app.test";

fn stack() -> Result<Stack> {
    let cluster = Cluster::new(1, 2)?;
    let w1 = cluster.node("w1").hostname.clone();
    let dir = temp_dir("cl-stack")?;
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n"))?;
    let conf_file = dir.path().join("drover.yml");
    std::fs::write(
        &conf_file,
        format!(
            "http: {{ ops: {{ listen: 0.0.0.0:{OPS_PORT} }} }}\ncluster: {{ listen: 0.0.0.0:{AGENT_PORT} }}\nresync: 10s\ntargets:{}",
            nginx_target(std::path::Path::new("/out/drover.conf"), NET, "nginx")
        ),
    )?;
    let c = &cluster;
    c.docker(&["network", "create", "-d", "overlay", "--attachable", NET])?;
    c.docker(&[
        "secret",
        "create",
        "drover-cluster-key",
        &key_file.display().to_string(),
    ])?;
    c.docker(&[
        "config",
        "create",
        "drover-yml",
        &conf_file.display().to_string(),
    ])?;
    c.docker(&[
        "service",
        "create",
        "--detach",
        "--name",
        "nginx",
        "--network",
        NET,
        "--stop-grace-period",
        "1s",
        "--constraint",
        &format!("node.hostname=={w1}"),
        "--mount",
        "type=volume,source=nginx-conf,target=/etc/nginx/conf.d",
        "--publish",
        &format!("mode=host,target=80,published={NGINX_PORT}"),
        &nginx_image(),
    ])?;
    c.docker(&[
        "service",
        "create",
        "--detach",
        "--name",
        "be",
        "--network",
        NET,
        "--replicas",
        "3",
        "--stop-grace-period",
        "1s",
        "--label",
        &format!("routing-host={HOST}"),
        "--label",
        "routing-port=80",
        "--label",
        "routing-tls=false",
        &busybox_image(),
    ])?;
    census(Delivery::Agents);
    c.docker(&[
        "service",
        "create",
        "--detach",
        "--name",
        "drover",
        "--mode",
        "global",
        "--network",
        NET,
        "--stop-grace-period",
        "2s",
        "--env",
        "DROVER_LOG=info,drover=debug",
        "--mount",
        "type=bind,source=/var/run/docker.sock,target=/var/run/docker.sock",
        "--mount",
        "type=volume,source=nginx-conf,target=/out",
        "--secret",
        "drover-cluster-key",
        "--config",
        "source=drover-yml,target=/etc/drover/drover.yml",
        "--publish",
        &format!("mode=host,target={AGENT_PORT},published={AGENT_PORT}"),
        "--publish",
        &format!("mode=host,target={OPS_PORT},published={OPS_PORT}"),
        &drover_image(),
        "run",
        "--config",
        "/etc/drover/drover.yml",
    ])?;
    Ok(Stack { cluster, _dir: dir })
}

impl Drop for Stack {
    /// drover's and nginx's logs (captured: shown for failing tests only).
    fn drop(&mut self) {
        for svc in ["drover", "nginx"] {
            let logs = self.cluster.service_logs(svc);
            eprintln!("----- {svc} logs -----\n{logs}\n----- end of {svc} logs -----");
        }
    }
}

impl Stack {
    fn w1(&self) -> &Node {
        self.cluster.node("w1")
    }

    /// Short container ids (the busybox backend's answer) of the running tasks of `be`.
    fn backend_hostnames(&self) -> Result<BTreeSet<String>> {
        running_container_ids(&self.cluster, "be")
    }

    /// Waits until requests through the nginx on w1 are answered by exactly the running
    /// backend tasks, on whichever node they run.
    fn wait_nginx_serves_every_task(&self, n: usize) -> Result<()> {
        let addr = format!("{}:{NGINX_PORT}", self.w1().addr);
        wait_nginx_answers_from("w1", &addr, HOST, n, || self.backend_hostnames())
    }

    /// The file as the nginx container on w1 sees it.
    fn nginx_file(&self) -> Result<String> {
        let w1 = self.w1();
        let id = containers_on(w1, "nginx")?
            .pop()
            .context("no nginx container on w1")?;
        // Byte for byte: Node::docker trims its output.
        let out = std::process::Command::new("docker")
            .args(["-H", &format!("unix://{}", w1.socket.display())])
            .args(["exec", &id, "cat", "/etc/nginx/conf.d/drover.conf"])
            .output()?;
        ensure!(out.status.success(), "cannot read the file on w1");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

const SHIPPED_HTTP_PORT: u16 = 8084;
const SHIPPED_HOST: &str = "app.cluster.test";

/// The shipped stack with its monitoring add-on, Prometheus placed on w2 (the test
/// busybox image stands in for it: it stays up and counts HUPs).
fn shipped_stack() -> Result<ShippedStack> {
    let cluster = Cluster::new(1, 2)?;
    let placement = format!("node.hostname == {}", cluster.node("w2").hostname);
    ShippedStack::deploy_with_monitoring(
        cluster,
        NET,
        SHIPPED_HOST,
        SHIPPED_HTTP_PORT,
        &[
            ("PROMETHEUS_IMAGE", busybox_image()),
            ("PROMETHEUS_PLACEMENT", placement),
        ],
    )
}

/// The addresses `job` scrapes in a file of the built-in prometheus template.
fn prometheus_targets(file: &str, job: &str) -> BTreeSet<String> {
    let header = format!("job_name: \"{job}\"");
    let Some(start) = file.find(&header) else {
        return BTreeSet::new();
    };
    let block = &file[start + header.len()..];
    let block = &block[..block.find("job_name:").unwrap_or(block.len())];
    block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- \"")?.strip_suffix('"'))
        .filter_map(|t| t.rsplit_once(':').map(|(ip, _)| ip.to_owned()))
        .collect()
}

/// Short container ids (the busybox app's answer) of the running tasks of the app.
fn app_hostnames(s: &ShippedStack) -> Result<BTreeSet<String>> {
    running_container_ids(&s.cluster, &s.service("app"))
}

/// Waits until the nginx on every node answers from exactly the running app tasks, on
/// whichever node they run.
fn wait_every_nginx_serves_every_task(s: &ShippedStack, n: usize) -> Result<()> {
    wait_every_nodes_nginx_serves(s, SHIPPED_HTTP_PORT, n)
}

fn wait_nginx_answers_from(
    node: &str,
    addr: &str,
    host: &str,
    n: usize,
    running: impl Fn() -> Result<BTreeSet<String>>,
) -> Result<()> {
    cluster::wait_nginx_answers_from(node, addr, host, n, SWARM + BOUND, running)
}

/// Short container ids of the running tasks of `service`.
fn running_container_ids(cluster: &Cluster, service: &str) -> Result<BTreeSet<String>> {
    cluster.running_container_ids(service)
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn the_shipped_stack_on_a_manager_and_two_workers_serves_every_app_task_through_every_nodes_nginx()
-> Result<()> {
    require_e2e!();
    let s = shipped_stack()?;
    wait_every_nginx_serves_every_task(&s, 2)?;

    s.cluster.docker(&[
        "service",
        "scale",
        "--detach",
        &format!("{}=6", s.service("app")),
    ])?;
    wait_every_nginx_serves_every_task(&s, 6)?;
    let ips: BTreeSet<String> = task_placement(&s.cluster, &s.service("app"), NET)?
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    let placed: BTreeSet<String> = task_placement(&s.cluster, &s.service("app"), NET)?
        .into_iter()
        .map(|(h, _)| h)
        .collect();
    eprintln!("app tasks on {placed:?}");

    // Every node's nginx reads the same file, which got there through that node's agent
    // (the workers have no Swarm API to render it themselves) and was checked and
    // reloaded there.
    for node in &s.cluster.nodes {
        let id = containers_on(node, &s.service("nginx"))?
            .pop()
            .with_context(|| format!("no nginx container on {}", node.short))?;
        let out = std::process::Command::new("docker")
            .args(["-H", &format!("unix://{}", node.socket.display())])
            .args(["exec", &id, "cat", "/etc/nginx/conf.d/drover.conf"])
            .output()?;
        ensure!(
            out.status.success(),
            "cannot read the file on {}",
            node.short
        );
        let file = String::from_utf8_lossy(&out.stdout);
        let listed: BTreeSet<String> = upstream_ips(&file).into_iter().collect();
        ensure!(
            listed == ips,
            "{}'s file lists {listed:?}, running tasks have {ips:?}",
            node.short
        );
        // nginx logs to stderr, which Node::docker does not return.
        let logs = std::process::Command::new("docker")
            .args(["-H", &format!("unix://{}", node.socket.display())])
            .args(["logs", &id])
            .output()?;
        let log = String::from_utf8_lossy(&logs.stderr);
        ensure!(
            log.contains("reconfiguring"),
            "nginx on {} never reloaded:\n{log}",
            node.short
        );
    }

    // Prometheus runs on w2 only: its file reaches w2 through w2's agent, follows the app
    // once the operator labels it for scraping, and Prometheus gets its HUP there.
    let w2 = s.cluster.node("w2");
    let prometheus = s.service("prometheus");
    s.cluster.docker(&[
        "service",
        "update",
        "--detach",
        "--label-add",
        "prometheus-job=app",
        "--label-add",
        "prometheus-port=80",
        &s.service("app"),
    ])?;
    let mut file = String::new();
    wait_for(
        "w2's prometheus file to scrape every app task",
        SWARM + BOUND,
        || {
            let Some(id) = containers_on(w2, &prometheus)
                .ok()
                .and_then(|mut c| c.pop())
            else {
                return false;
            };
            file = w2
                .docker(&["exec", &id, "cat", "/etc/prometheus/drover/prometheus.yml"])
                .unwrap_or_default();
            prometheus_targets(&file, "app") == ips
        },
    )
    .with_context(|| format!("w2's prometheus.yml, app tasks at {ips:?}:\n{file}"))?;
    let id = containers_on(w2, &prometheus)?
        .pop()
        .context("no prometheus container on w2")?;
    wait_for("Prometheus on w2 to get a HUP", BOUND, || {
        w2.docker(&["exec", &id, "cat", "/tmp/reloads"])
            .is_ok_and(|r| r.contains("reload"))
    })?;
    for node in [s.cluster.node("m1"), s.cluster.node("w1")] {
        ensure!(
            containers_on(node, &prometheus)?.is_empty(),
            "prometheus is placed on w2 only, found on {}",
            node.short
        );
    }
    Ok(())
}

/// `POST /agent/v1/apply` to `addr` with exactly these headers and body; (status, body).
fn post_agent(addr: &str, headers: &[(&str, String)], body: &[u8]) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        wire::APPLY_PATH,
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    Ok((
        status,
        answer
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    ))
}

/// Headers of an apply signed for `node`.
fn signed(key: &Key, ts: i64, nonce: &str, node: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    let to = wire::To {
        path: wire::APPLY_PATH,
        node,
    };
    vec![
        (wire::TIMESTAMP_HEADER, ts.to_string()),
        (wire::NONCE_HEADER, nonce.to_string()),
        (
            wire::SIGNATURE_HEADER,
            key.sign(&ts.to_string(), nonce, to, body),
        ),
    ]
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn forged_stale_or_replayed_agent_requests_are_refused_and_change_no_file() -> Result<()> {
    require_e2e!();
    let s = stack()?;
    s.wait_nginx_serves_every_task(3)?;
    let before = s.nginx_file()?;
    let agent_addr = format!("{}:{AGENT_PORT}", s.w1().addr);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let evil = serde_json::to_vec(&ApplyRequest::new("nginx", b"events {} # owned\n"))?;
    let right = Key::from_bytes(KEY.as_bytes());
    let w1 = s.w1().node_id()?;

    let refusals = [
        ("no signature", vec![]),
        (
            "wrong key",
            signed(&Key::from_bytes(b"guessed"), now, "n-wrong", &w1, &evil),
        ),
        (
            "stale timestamp",
            signed(&right, now - 600, "n-stale", &w1, &evil),
        ),
        (
            "future timestamp",
            signed(&right, now + 600, "n-future", &w1, &evil),
        ),
    ];
    for (what, headers) in refusals {
        let (status, body) = post_agent(&agent_addr, &headers, &evil)?;
        ensure!(status == 401, "{what}: answered {status} {body}");
    }
    // A genuine request, replayed: the first is carried out (the same file again: nothing
    // changes), the copy is refused.
    let same = serde_json::to_vec(&ApplyRequest::new("nginx", before.as_bytes()))?;
    let headers = signed(&right, now, "n-genuine", &w1, &same);
    let (status, body) = post_agent(&agent_addr, &headers, &same)?;
    ensure!(
        status == 200 && body.contains("\"unchanged\""),
        "genuine: {status} {body}"
    );
    let (status, body) = post_agent(&agent_addr, &headers, &same)?;
    ensure!(
        status == 401 && body.contains("nonce"),
        "replay: {status} {body}"
    );
    // A signed body that was altered on the way does not verify either.
    let (status, _) = post_agent(
        &agent_addr,
        &signed(&right, now, "n-altered", &w1, &same),
        &evil,
    )?;
    ensure!(status == 401, "altered body: {status}");
    // An apply signed for w1, replayed to w2 within the skew: refused there.
    let w2_addr = format!("{}:{AGENT_PORT}", s.cluster.node("w2").addr);
    let for_w1 = signed(&right, now, "n-for-w1", &w1, &evil);
    let (status, body) = post_agent(&w2_addr, &for_w1, &evil)?;
    ensure!(
        status == 401,
        "an apply for w1 replayed to w2: {status} {body}"
    );
    // 32 connections announcing 8 MiB to the heartbeat path: 413 each, before the body.
    for i in 0..32 {
        let mut c = std::net::TcpStream::connect(&agent_addr)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
            wire::HEARTBEAT_PATH,
            8 << 20,
            signed(&right, now, &format!("n-big-{i}"), &w1, b"")
                .iter()
                .map(|(k, v)| format!("{k}: {v}\r\n"))
                .collect::<String>()
        );
        c.write_all(head.as_bytes())?;
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        ensure!(
            answer.starts_with("HTTP/1.1 413"),
            "8 MiB heartbeat {i}: {answer}"
        );
    }

    ensure!(s.nginx_file()? == before, "the file on w1 changed");
    let metrics = http_get(&format!("http://{}:{OPS_PORT}/metrics", s.w1().addr))?.body;
    for reason in ["unauthorized", "stale", "replayed"] {
        let n = metric_value(
            &metrics,
            "drover_agent_refused_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0);
        ensure!(n >= 1.0, "no refusal counted as {reason}");
    }
    Ok(())
}

/// `GET path` of drover's operator listener on `node`, from inside that node's nginx
/// container (the operator port is on the overlay network only): (status, body).
fn ops_get_on(s: &ShippedStack, node: &Node, path: &str) -> Result<(u16, String)> {
    // The node's drover answers (and hears the controller) while Swarm still holds its
    // task in `starting` for the image's health check: wait for `running` here.
    let mut drover_ip = None;
    wait_for(
        &format!("a running drover task on {}", node.short),
        Duration::from_secs(60),
        || {
            drover_ip = task_placement(&s.cluster, &s.service("drover"), NET)
                .ok()
                .and_then(|p| p.into_iter().find(|(host, _)| *host == node.hostname))
                .map(|(_, ip)| ip);
            drover_ip.is_some()
        },
    )?;
    let drover_ip = drover_ip.with_context(|| format!("no drover task on {}", node.short))?;
    let nginx = containers_on(node, &s.service("nginx"))?
        .pop()
        .with_context(|| format!("no nginx container on {}", node.short))?;
    // stdin stays open until the answer is in: a half-closed request may be dropped by
    // the server before it answers.
    let token = s.ops_token()?;
    let command = format!(
        "(printf 'GET {path} HTTP/1.0\\r\\nAuthorization: Bearer {token}\\r\\n\\r\\n'; sleep 3) | nc -w 5 {drover_ip} 9091"
    );
    let mut out = String::new();
    for _ in 0..5 {
        out = node.docker(&["exec", &nginx, "sh", "-c", &command])?;
        if !out.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line from {}: {out}", node.short))?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_webhook_sent_to_a_worker_is_verified_there_and_rolls_the_service_through_the_controller()
-> Result<()> {
    require_e2e!();
    // The app runs an image of its own, so pushing a new build of it touches no other test.
    let image = format!(
        "127.0.0.1:5000/drover-test/{}:latest",
        unique("fwd-app").to_lowercase()
    );
    build_push(&image, "1", "")?;
    // The shipped config, deployed through the variable stack.yml documents for it; the
    // only change is the `ci` hook's image rule, which names the test registry's images.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/drover.yml"),
    )?;
    let rule = r#"image: "rycus86/.+:(latest|stable)""#;
    ensure!(
        shipped.contains(rule),
        "deploy/drover.yml has no ci rule {rule}"
    );
    let dir = temp_dir("cl-forward")?;
    let config = dir.path().join("drover.yml");
    std::fs::write(
        &config,
        shipped.replace(
            rule,
            r#"image: "127.0.0.1:5000/drover-test/.+:(latest|stable)""#,
        ),
    )?;
    let s = ShippedStack::deploy_with(
        Cluster::new(1, 2)?,
        NET,
        SHIPPED_HOST,
        SHIPPED_HTTP_PORT,
        &[
            ("APP_IMAGE", image.clone()),
            ("DROVER_CONFIG_FILE", config.display().to_string()),
        ],
        |c| c,
    )?;
    if let Err(e) = wait_every_nginx_serves_every_task(&s, 2) {
        let ps = s.cluster.docker(&[
            "service",
            "ps",
            "--no-trunc",
            "--format",
            "{{.Node}} {{.CurrentState}} {{.Error}}",
            &s.service("drover"),
        ]);
        return Err(e.context(format!("drover tasks: {ps:?}")));
    }
    let m1 = s.cluster.node("m1");
    let w1 = s.cluster.node("w1");
    let hooks_on_w1 = format!("{}:9090", w1.addr);

    // The worker has heard from the controller, recently (the cluster view is on the
    // operator port, which the stack does not publish; the public /healthz has the role).
    // The view names the nodes' addresses: only with the operator token.
    let drover_service = s.service("drover");
    let token = s.ops_token()?;
    let mut health = serde_json::Value::Null;
    wait_for("w1's drover to know the controller", BOUND, || {
        health = w1
            .get_inside_as(&drover_service, 9091, "/healthz", Some(&token))
            .ok()
            .and_then(|body| serde_json::from_str(&body).ok())
            .unwrap_or_default();
        health["controller"]["hostname"] == m1.hostname.as_str()
    })
    .with_context(|| format!("w1 /healthz: {health}"))?;
    ensure!(health["role"] == "worker", "{health}");
    ensure!(
        health["controller"]["last_contact_ms_ago"].is_u64(),
        "w1 has no last contact with the controller: {health}"
    );
    // Contact goes on: after this first look, w1 hears another heartbeat from the
    // controller, and the controller has another exchange with w1 (each side's
    // `drover_peer_last_contact_timestamp_seconds` for the other moves on). An ordering
    // of events, not an age: how fresh a contact is depends on the machine's load.
    let contact = |node: &Node, peer: &str| -> Option<f64> {
        let text = node
            .get_inside_as(&drover_service, 9091, "/metrics", Some(&token))
            .ok()?;
        metric_value(
            &text,
            "drover_peer_last_contact_timestamp_seconds",
            &[("peer", peer)],
        )
    };
    for (node, peer) in [(w1, &m1.hostname), (m1, &w1.hostname)] {
        let first = contact(node, peer)
            .with_context(|| format!("{} records no contact with {peer}", node.short))?;
        wait_for(
            &format!("{} to record a later contact with {peer}", node.short),
            BOUND,
            || contact(node, peer).is_some_and(|at| at > first),
        )?;
    }
    // And the controller lists the worker with its last contact.
    let controller: serde_json::Value = serde_json::from_str(&m1.get_inside_as(
        &drover_service,
        9091,
        "/healthz",
        Some(&token),
    )?)?;
    let public: serde_json::Value =
        serde_json::from_str(&http_get(&format!("http://{hooks_on_w1}/healthz"))?.body)?;
    ensure!(
        public["role"] == "worker" && public.get("peers").is_none(),
        "the public /healthz says only the role: {public}"
    );
    let w1_seen = controller["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["hostname"] == w1.hostname.as_str())
        .with_context(|| format!("the controller does not list w1: {controller}"))?;
    ensure!(
        w1_seen["last_contact_ms_ago"].is_u64(),
        "the controller lists no contact with w1: {controller}"
    );

    let secret = s.secret("ci-secret")?;
    let body = format!(r#"{{"image":"{image}"}}"#);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_secs()
        .to_string();
    let post = |signature: &str| {
        http_post(
            &hooks_on_w1,
            "/hooks/ci",
            &[
                ("Content-Type", "application/json"),
                ("X-Drover-Timestamp", now.as_str()),
                ("X-Drover-Signature", signature),
            ],
            body.as_bytes(),
        )
    };

    // A bad signature is refused on the worker itself, and nothing reaches a job.
    let forged = drover::hooks::sign_timestamped(b"not the secret", &now, body.as_bytes());
    let r = post(&forged)?;
    ensure!(r.status == 401, "forged: {} {}", r.status, r.body);
    let (status, jobs) = ops_get_on(&s, w1, "/jobs")?;
    ensure!(status == 200, "w1 /jobs: {status} {jobs}");
    let jobs: serde_json::Value = serde_json::from_str(&jobs)?;
    ensure!(
        jobs["jobs"].as_array().is_some_and(Vec::is_empty),
        "a forged webhook made a job: {jobs}"
    );

    // A new build of the image, announced to the worker with the right signature.
    let pushed = build_push(&image, "2", "")?;
    let digest = pushed
        .split_once('@')
        .map(|(_, d)| d.to_owned())
        .context("no digest")?;
    let r = post(&drover::hooks::sign_timestamped(
        secret.as_bytes(),
        &now,
        body.as_bytes(),
    ))?;
    ensure!(r.status == 202, "signed: {} {}", r.status, r.body);
    let answer: serde_json::Value = serde_json::from_str(&r.body)?;
    let id = answer["job"].as_str().context("no job id")?.to_owned();
    ensure!(
        r.header("location") == Some(format!("/jobs/{id}").as_str()),
        "{:?}",
        r.headers
    );

    // The job is the controller's, and the worker shows it under the same id.
    let mut last = String::new();
    wait_for(&format!("job {id} completed, read on w1"), SWARM, || {
        let Ok((_, job)) = ops_get_on(&s, w1, &format!("/jobs/{id}")) else {
            return false;
        };
        last = job;
        serde_json::from_str::<serde_json::Value>(&last)
            .is_ok_and(|j| j["id"] == id.as_str() && j["state"] == "completed")
    })
    .with_context(|| format!("last: {last}"))?;
    let spec = s.cluster.docker(&[
        "service",
        "inspect",
        "--format",
        "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
        &s.service("app"),
    ])?;
    ensure!(spec.ends_with(&digest), "app runs {spec}, pushed {digest}");
    // The rolled tasks are served again through the worker's nginx.
    wait_every_nginx_serves_every_task(&s, 2)?;

    let metrics = ops_get_on(&s, w1, "/metrics")?.1;
    ensure!(
        metric_value(
            &metrics,
            "drover_webhook_requests_total",
            &[("hook", "ci"), ("outcome", "forwarded")]
        ) == Some(1.0),
        "w1 counts one forwarded webhook"
    );
    Ok(())
}

const ISOLATE_HTTP_PORT: u16 = 8086;

/// The nginx file of `node` as its nginx container reads it.
fn nginx_file_on(node: &Node, nginx: &str) -> Result<String> {
    let id = containers_on(node, nginx)?
        .pop()
        .with_context(|| format!("no nginx container on {}", node.short))?;
    node.docker(&["exec", &id, "cat", "/etc/nginx/conf.d/drover.conf"])
}

/// The shipped stack in cluster mode as shipped, nginx on every node: certificate files
/// exist only in w1's nginx, one pair good and one whose key is not its certificate's.
/// Each node's agent runs the one executor on its own file: w1 serves the good host with
/// TLS and leaves the bad one out (its nginx rejects it), the other nodes serve both TLS
/// hosts on port 80 for want of files, and a host without files anywhere is on port 80
/// everywhere. Meanwhile a scale of the app reaches every node's nginx.
#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn each_nodes_nginx_leaves_out_the_host_it_rejects_and_serves_tls_only_where_its_files_are_while_a_scale_reaches_every_node()
-> Result<()> {
    require_e2e!();
    let cluster = Cluster::new(1, 2)?;
    let s = ShippedStack::deploy(cluster, NET, SHIPPED_HOST, ISOLATE_HTTP_PORT)?;
    wait_every_nodes_nginx_serves(&s, ISOLATE_HTTP_PORT, 2)?;
    let nginx = s.service("nginx");
    let (m1, w1, w2) = (
        s.cluster.node("m1"),
        s.cluster.node("w1"),
        s.cluster.node("w2"),
    );

    let (good, bad, none) = ("good.cluster.test", "bad.cluster.test", "none.cluster.test");
    let certs = temp_dir("cl-certs")?;
    let root = certs.path().join("letsencrypt");
    make_certificate(&root.join("live"), good, false)?;
    make_certificate(&root.join("live"), bad, true)?;
    let id = containers_on(w1, &nginx)?
        .pop()
        .context("no nginx container on w1")?;
    w1.docker(&["cp", &root.display().to_string(), &format!("{id}:/etc/")])?;

    for (name, host) in [("tls-good", good), ("tls-bad", bad), ("tls-none", none)] {
        s.cluster
            .create_routed(name, NET, &[("routing-host", host), ("routing-port", "80")])?;
    }
    s.cluster.docker(&[
        "service",
        "scale",
        "--detach",
        &format!("{}=3", s.service("app")),
    ])?;
    wait_every_nodes_nginx_serves(&s, ISOLATE_HTTP_PORT, 3)?;

    let mut files = Vec::new();
    let settled = wait_until(SWARM + BOUND, Duration::from_millis(500), || {
        files = [m1, w1, w2]
            .iter()
            .map(|n| nginx_file_on(n, &nginx).unwrap_or_default())
            .collect();
        let on_w1 = &files[1];
        host_block(on_w1, bad).is_none()
            && host_block(on_w1, good).is_some_and(|b| b.contains("listen 443 ssl"))
            && host_block(on_w1, none).is_some_and(|b| !b.contains("listen 443"))
            && [&files[0], &files[2]].iter().all(|f| {
                [good, bad, none]
                    .iter()
                    .all(|h| host_block(f, h).is_some_and(|b| !b.contains("listen 443")))
            })
    });
    ensure!(
        settled,
        "files on m1, w1, w2:\n{}\n-----\n{}\n-----\n{}",
        files[0],
        files[1],
        files[2]
    );

    // What each node's nginx does with them, asked as a client would.
    // Each answer is waited for: a task's overlay route can take a moment after Swarm
    // says it runs, and nginx then sits out a failed upstream for its fail_timeout.
    let on = |node: &Node, host: &str, want: u16, what: &str| -> Result<()> {
        let addr = format!("{}:{ISOLATE_HTTP_PORT}", node.addr);
        let mut status = 0;
        let ok = wait_until(BOUND, Duration::from_millis(250), || {
            status = http_get_host(&addr, host, "/").map_or(0, |r| r.status);
            status == want
        });
        ensure!(ok, "{}: {what}: {host} answers {status}", node.short);
        Ok(())
    };
    on(w1, good, 301, "redirects the good host to https")?;
    on(w1, bad, 503, "left the bad host out")?;
    for node in [m1, w2] {
        for host in [good, bad, none] {
            on(node, host, 200, "serves it on port 80")?;
        }
    }
    on(w1, none, 200, "serves the host without files on port 80")?;

    // The controller shows the host left out, and the TLS hosts some node lacks files for.
    let token = s.ops_token()?;
    let metrics = m1.get_inside_as(&s.service("drover"), 9091, "/metrics", Some(&token))?;
    let gauge = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("target=\"nginx\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    ensure!(
        gauge("drover_hosts_left_out") == Some(1.0),
        "left out: {:?}",
        gauge("drover_hosts_left_out")
    );
    ensure!(
        gauge("drover_hosts_without_certificate") == Some(3.0),
        "without certificate: {:?}",
        gauge("drover_hosts_without_certificate")
    );

    // w1's certificate is renewed in place, nothing else changes: w1's nginx serves the
    // new one after a resync (the shipped 60 s), its file unchanged.
    let tls = format!("{}:{}", w1.addr, ISOLATE_HTTP_PORT + 1);
    let served = || -> String {
        let script = format!(
            "openssl s_client -connect {tls} -servername {good} </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256"
        );
        Command::new("sh")
            .args(["-c", &script])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let before = served();
    ensure!(
        before.contains("Fingerprint="),
        "w1 serves {good} on 443: {before:?}"
    );
    let file_before = nginx_file_on(w1, &nginx)?;
    make_certificate(&root.join("live"), good, false)?;
    let renewed = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(root.join("live").join(good).join("fullchain.pem"))
        .output()?;
    let renewed = String::from_utf8_lossy(&renewed.stdout).trim().to_owned();
    ensure!(renewed != before);
    w1.docker(&["cp", &root.display().to_string(), &format!("{id}:/etc/")])?;
    let mut now = String::new();
    let ok = wait_until(
        Duration::from_secs(60) + BOUND,
        Duration::from_millis(500),
        || {
            now = served();
            now == renewed
        },
    );
    ensure!(ok, "w1 serves the renewed {renewed}; it shows {now}");
    ensure!(
        nginx_file_on(w1, &nginx)? == file_before,
        "w1's file did not change"
    );
    Ok(())
}

/// Waits until every node's nginx on `port` answers from exactly the running app tasks.
fn wait_every_nodes_nginx_serves(s: &ShippedStack, port: u16, n: usize) -> Result<()> {
    for node in &s.cluster.nodes {
        let addr = format!("{}:{port}", node.addr);
        wait_nginx_answers_from(&node.short, &addr, SHIPPED_HOST, n, || app_hostnames(s))?;
    }
    Ok(())
}
