//! The shipped `stack.yml` deploys on the test Swarm with the shipped `deploy/drover.yml`
//! and serves its example app through nginx, configured by drover. Only the variables
//! stack.yml documents are set (local images, free host ports, a unique network name, the
//! app's host name, and the directory `deploy/gen-secrets.sh` wrote the secrets to); the
//! config is never replaced, so its `service: nginx` must find the stack's `STACK_nginx`.
//!
//! Run by `scripts/test` (`DROVER_E2E=1`); skipped otherwise, and failed with a reason
//! when the `docker stack` command is not available. The stack, its network (a unique
//! `WEB_NETWORK`) and its named volumes are removed on drop.
//!
//! stack.yml publishes host ports (nginx 80 and 443, drover 9090, all `mode: host`) through
//! `HTTP_PORT`, `HTTPS_PORT` and `DROVER_PORT`; the test picks free ones.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// How long the stack may take to come up (images from the local registry) or go away.
const STACK: Duration = Duration::from_secs(90);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `docker ARGS` in the repository root with extra environment; stdout on success.
fn docker_env(args: &[&str], env: &[(&str, String)]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .context("cannot run the docker CLI")?;
    ensure!(
        out.status.success(),
        "docker {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A deployed stack: `docker stack rm` on drop (or by [`Stack::remove`]), then waits
/// until its services, containers and network are gone and removes its named volumes
/// (which `docker stack rm` leaves behind).
struct Stack {
    name: String,
    removed: bool,
}

impl Stack {
    fn objects(&self, kind: &[&str]) -> String {
        let filter = format!("label=com.docker.stack.namespace={}", self.name);
        let mut args = kind.to_vec();
        args.extend(["-q", "--filter", &filter]);
        docker(&args).unwrap_or_else(|e| format!("error: {e}"))
    }

    fn remove(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        docker(&["stack", "rm", &self.name])?;
        let mut left = String::new();
        let gone = wait_until(STACK, Duration::from_millis(500), || {
            left = [
                self.objects(&["service", "ls"]),
                self.objects(&["ps", "-a"]),
                self.objects(&["network", "ls"]),
            ]
            .join(" ")
            .trim()
            .to_string();
            left.is_empty()
        });
        ensure!(
            gone,
            "stack {} left objects behind after {STACK:?}: {left}",
            self.name
        );
        for volume in ["nginx-conf", "prometheus-config"] {
            let name = format!("{}_{volume}", self.name);
            match docker(&["volume", "rm", &name]) {
                Ok(_) => {}
                Err(e) if e.to_string().contains("No such volume") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn logs(&self, service: &str) -> String {
        service_logs(&format!("{}_{service}", self.name))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.removed {
            eprintln!(
                "----- drover log -----\n{}\n----- nginx log -----\n{}\n-----",
                self.logs("drover"),
                self.logs("nginx")
            );
        }
        if let Err(e) = self.remove() {
            eprintln!("cleanup of stack {} failed: {e:#}", self.name);
        }
    }
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn stack_yml_deploys_and_serves_the_example_app_through_nginx_then_goes_away() -> Result<()> {
    require_e2e!();
    // require_e2e! has passed: the test command promised a full environment, so a missing
    // `docker stack` is a failure with a reason, never a silent pass.
    docker(&["stack", "ls"])
        .context("`docker stack` is not available here, and the shipped stack test needs it")?;
    let (http_port, https_port, drover_port) = (free_port(), free_port(), free_port());
    let nginx_addr = format!("127.0.0.1:{http_port}");
    let drover_addr = format!("127.0.0.1:{drover_port}");
    let started = Instant::now();
    let name = unique("shipstk");
    let network = unique("shipstk-web");
    let app_host = format!("{name}.test");
    let dir = temp_dir("stack")?;
    let secrets = dir.path().join("secrets");
    let out = Command::new(repo().join("deploy/gen-secrets.sh"))
        .arg(&secrets)
        .output()
        .context("run deploy/gen-secrets.sh")?;
    ensure!(
        out.status.success(),
        "deploy/gen-secrets.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(secrets.join("dockerhub-token"))?;
    ensure!(token.len() == 64, "a 32-byte hex token: {token:?}");

    let env = [
        ("DROVER_IMAGE", drover_image()),
        ("NGINX_IMAGE", nginx_image()),
        ("APP_IMAGE", busybox_image()),
        ("WEB_NETWORK", network.clone()),
        ("APP_HOST", app_host.clone()),
        ("DROVER_SECRETS_DIR", secrets.display().to_string()),
        ("HTTP_PORT", http_port.to_string()),
        ("HTTPS_PORT", https_port.to_string()),
        ("DROVER_PORT", drover_port.to_string()),
    ];
    let mut stack = Stack {
        name: name.clone(),
        removed: false,
    };
    census(Delivery::Agents);
    docker_env(&["stack", "deploy", "-c", "stack.yml", &name], &env)?;

    // The example app answers through nginx on the published HTTP port, by its Host. The
    // test image's nginx answers 404 for hosts it was not given, and drover keeps a file
    // only after `nginx -t` passed in the container of the config's `service: nginx` and
    // reloads it with a HUP there: a 200 means both found the stack's `STACK_nginx`.
    let mut last = None;
    let served = wait_until(STACK, Duration::from_millis(500), || {
        last = Some(http_get_host(&nginx_addr, &app_host, "/").map(|r| r.status));
        matches!(last, Some(Ok(200)))
    });
    ensure!(
        served,
        "the stack's app did not answer through nginx within {STACK:?}: last {last:?}\n\
         services:\n{}",
        docker(&["stack", "ps", "--no-trunc", &name]).unwrap_or_default()
    );
    // Both replicas of the app are routed.
    wait_running(&format!("{name}_app"), 2, STACK)?;
    let mut seen = std::collections::BTreeSet::new();
    let both = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        if let Ok(r) = http_get_host(&nginx_addr, &app_host, "/") {
            if r.status == 200 {
                seen.insert(r.body.trim().to_string());
            }
        }
        seen.len() == 2
    });
    ensure!(both, "both app replicas answer through nginx: saw {seen:?}");

    // drover on its published port: ready, and its hook reads the secret (the right token
    // passes verification and is then refused by the allow rule: 422). The shipped config
    // keeps the operator endpoints (metrics) on the unpublished port 9091.
    assert_eq!(http_get_host(&drover_addr, "d", "/readyz")?.status, 200);
    let body = br#"{"push_data":{"tag":"latest"},"repository":{"repo_name":"somebody/app"}}"#;
    let wrong = http_post(&drover_addr, "/hooks/dockerhub?token=nope", &[], body)?;
    assert_eq!(wrong.status, 401, "a wrong token: {}", wrong.body);
    let right = http_post(
        &drover_addr,
        &format!("/hooks/dockerhub?token={}", token.trim()),
        &[],
        body,
    )?;
    assert_eq!(
        right.status, 422,
        "the secret's token verifies: {}",
        right.body
    );
    eprintln!("stack up and serving after {:?}", started.elapsed());

    stack.remove()?;
    ensure!(
        docker(&["network", "inspect", &network]).is_err(),
        "the stack's network {network} is gone"
    );
    eprintln!(
        "stack deployed, checked and removed in {:?}",
        started.elapsed()
    );
    Ok(())
}
