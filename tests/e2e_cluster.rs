//! Cluster mode end to end: Swarms of network-namespace nodes on this machine
//! (tests/support/cluster.rs), drover's agent API and delivery to other nodes.
//!
//! Every test builds its own Swarm from namespace nodes, never touching the host's Swarm,
//! and tears it down on drop.

mod support;

use std::time::Duration;

use support::cluster::{Cluster, Node};
use support::*;

/// Ids of the running containers of `service` on `node`.
fn containers_on(node: &Node, service: &str) -> Result<Vec<String>> {
    let out = node.docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.swarm.service.name={service}"),
    ])?;
    Ok(out.lines().map(str::to_string).collect())
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
fn a_swarm_of_one_manager_and_two_workers_runs_tasks_on_every_node_that_reach_each_other()
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
fn three_namespace_managers_elect_a_new_leader_when_the_leaders_engine_stops() -> Result<()> {
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
