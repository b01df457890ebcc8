//! Stack repositories on the test git server (started by `scripts/test`): a bare
//! repository whose `post-receive` hook sends a signed push delivery, a relay that lets
//! namespace nodes reach the server, and the shipped deploy/drover.yml with its `stacks:`
//! block enabled. Used by tests/e2e_stacks.rs and benches/stack_push.rs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::cluster::ShippedStack;
use super::*;

/// What the hooks of [`Repo::create`] sign with.
pub const SECRET: &str = "e2e-stack-secret";

pub fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set (eval \"$(scripts/test env)\")"))
}

pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=e2e@drover", "-c", "user.name=e2e"])
        .args(args)
        .output()
        .context("run git")?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A bare repository on the test git server whose `post-receive` hook signs a GitHub push
/// payload and sends it to `hook_url`, and a work tree that pushes to it.
pub struct Repo {
    pub bare: PathBuf,
    pub work: tempfile::TempDir,
    pub url: String,
    pub full_name: String,
    pub push_url: String,
}

/// Whose push deliveries the repository's `post-receive` hook sends.
#[derive(Clone, Copy)]
pub enum Forge {
    /// GitHub's: `X-Hub-Signature-256: sha256=HEX`.
    Github,
    /// Gitea's (and Forgejo's): `X-Gitea-Signature: HEX`, `X-Gitea-Event`,
    /// `X-Gitea-Delivery`, the body in GitHub's shape with `clone_url` and `pusher`.
    Gitea,
}

impl Repo {
    pub fn create(name: &str, hook_url: &str) -> Result<Repo> {
        Self::create_for(Forge::Github, "lab", name, SECRET, hook_url)
    }

    /// The repository `owner/name`, whose hook signs with `secret`.
    pub fn create_at(owner: &str, name: &str, secret: &str, hook_url: &str) -> Result<Repo> {
        Self::create_for(Forge::Github, owner, name, secret, hook_url)
    }

    pub fn create_for(
        forge: Forge,
        owner: &str,
        name: &str,
        secret: &str,
        hook_url: &str,
    ) -> Result<Repo> {
        let root = PathBuf::from(env("DROVER_TEST_GIT_ROOT")?);
        let token = std::fs::read_to_string(env("DROVER_TEST_GIT_TOKEN_FILE")?)?;
        let bare = root.join(owner).join(format!("{name}.git"));
        std::fs::create_dir_all(&bare)?;
        git(&bare, &["init", "-q", "--bare", "-b", "main"])?;
        git(&bare, &["config", "http.receivepack", "true"])?;
        let full_name = format!("{owner}/{name}");
        let base = env("DROVER_TEST_GIT_URL")?;
        let url = format!("{base}/{full_name}.git");
        let hook = match forge {
            Forge::Github => format!(
                r#"#!/bin/sh
# GitHub's push payload for each updated branch, signed like GitHub signs it.
while read old new ref; do
  body='{{"ref":"'"$ref"'","before":"'"$old"'","after":"'"$new"'","repository":{{"full_name":"{full_name}","name":"{name}"}},"sender":{{"login":"e2e"}},"commits":[{{"id":"'"$new"'","message":"push"}}],"head_commit":{{"id":"'"$new"'","message":"push"}}}}'
  sig=$(printf '%s' "$body" | openssl dgst -sha256 -hmac '{secret}' | sed 's/^.*= //')
  curl -fsS -o /dev/null -H 'Content-Type: application/json' -H 'X-GitHub-Event: push' \
    -H "X-GitHub-Delivery: $new-$(date +%s%N)" -H "X-Hub-Signature-256: sha256=$sig" \
    --data-binary "$body" '{hook_url}' || echo "hook delivery failed" >&2
done
"#
            ),
            Forge::Gitea => format!(
                r#"#!/bin/sh
# Gitea's push payload for each updated branch, signed like Gitea signs it (bare hex).
while read old new ref; do
  body='{{"ref":"'"$ref"'","before":"'"$old"'","after":"'"$new"'","compare_url":"","commits":[{{"id":"'"$new"'","message":"push"}}],"head_commit":{{"id":"'"$new"'","message":"push"}},"repository":{{"id":1,"name":"{name}","full_name":"{full_name}","clone_url":"{url}"}},"pusher":{{"login":"e2e"}},"sender":{{"login":"e2e"}}}}'
  sig=$(printf '%s' "$body" | openssl dgst -sha256 -hmac '{secret}' | sed 's/^.*= //')
  curl -fsS -o /dev/null -H 'Content-Type: application/json' -H 'X-Gitea-Event: push' \
    -H "X-Gitea-Delivery: $(cat /proc/sys/kernel/random/uuid)" -H "X-Gitea-Signature: $sig" \
    --data-binary "$body" '{hook_url}' || echo "hook delivery failed" >&2
done
"#
            ),
        };
        let hook_path = bare.join("hooks/post-receive");
        std::fs::write(&hook_path, hook)?;
        Command::new("chmod").arg("+x").arg(&hook_path).status()?;
        let push_url = url.replacen("http://", &format!("http://drover:{}@", token.trim()), 1);
        let work = temp_dir("drover-e2e-stack-work")?;
        git(work.path(), &["init", "-q", "-b", "main"])?;
        Ok(Repo {
            bare,
            work,
            url,
            full_name,
            push_url,
        })
    }

    /// Writes `files`, commits and pushes; returns the new commit.
    pub fn push(&self, files: &[(&str, &str)], message: &str) -> Result<String> {
        for (path, content) in files {
            let p = self.work.path().join(path);
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(p, content)?;
        }
        git(self.work.path(), &["add", "-A"])?;
        git(self.work.path(), &["commit", "-q", "-m", message])?;
        git(self.work.path(), &["push", "-q", &self.push_url, "main"])?;
        git(self.work.path(), &["rev-parse", "HEAD"])
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bare);
    }
}

/// `socat` on the host from `bind:port` to the git server, so that the nodes of a
/// [`super::cluster::Cluster`] (and drover's containers on them) reach it at the host's side of
/// their veth. Killed on drop.
pub struct GitRelay {
    child: std::process::Child,
    pub url: String,
}

impl GitRelay {
    pub fn start(bind: &str) -> Result<GitRelay> {
        let port = free_port();
        let to = env("DROVER_TEST_GIT_URL")?;
        let to = to.trim_start_matches("http://");
        let child = Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind={bind},fork,reuseaddr"))
            .arg(format!("TCP:{to}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot run socat")?;
        let url = format!("http://{bind}:{port}");
        wait_for("the git relay", Duration::from_secs(10), || {
            std::net::TcpStream::connect((bind, port)).is_ok()
        })?;
        Ok(GitRelay { child, url })
    }
}

impl Drop for GitRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped deploy/drover.yml with its `stacks:` block uncommented as its comment
/// says, each `repository` and `environment` set, and the deploy image of the tests.
pub fn enable_shipped_stacks(
    shipped: &str,
    home_url: &str,
    home_env: &str,
    web_url: &str,
    web_env: &str,
) -> String {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in shipped.lines() {
        if line == "stacks: []" {
            continue;
        }
        if line == "# stacks:" {
            in_block = true;
            out.push("stacks:".to_owned());
            continue;
        }
        if in_block && !line.starts_with('#') {
            in_block = false;
        }
        let mut line = if in_block {
            line.strip_prefix("# ").unwrap_or(line).to_owned()
        } else {
            line.to_owned()
        };
        if in_block {
            line = line
                .replace("https://github.com/rycus86/home-stack.git", home_url)
                .replace("https://github.com/rycus86/home-stack-web.git", web_url);
            let indent = &line[..line.len() - line.trim_start().len()];
            if line
                .trim_start()
                .starts_with("environment: {}             # the variables")
            {
                line = format!("{indent}environment: {home_env}");
            } else if line
                .trim_start()
                .starts_with("environment: {}             # ${NAME}")
            {
                line = format!("{indent}environment: {web_env}");
            } else if line.trim_start().starts_with("# image: ") {
                line = format!("{indent}image: {}", deploy_image());
            }
        }
        out.push(line);
    }
    out.join("\n") + "\n"
}

pub fn deploy_image() -> String {
    std::env::var("DROVER_TEST_DEPLOY_IMAGE").unwrap_or_default()
}

/// GET `path` on drover's public port with the operator token.
pub fn ops_get(addr: &str, token: &str, path: &str) -> Option<serde_json::Value> {
    let auth = format!("Bearer {token}");
    let r = http_request(
        "GET",
        addr,
        addr,
        path,
        Some((&[("Authorization", auth.as_str())], &b""[..])),
    )
    .ok()?;
    (r.status == 200).then(|| serde_json::from_str(&r.body).ok())?
}

/// The jobs drover answers with, for a push of `commit`.
pub fn jobs_of(addr: &str, token: &str, commit: &str) -> Option<Vec<serde_json::Value>> {
    let all = ops_get(addr, token, "/jobs")?;
    Some(
        all["jobs"]
            .as_array()?
            .iter()
            .filter(|j| {
                j["facts"]["commit_ids"]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|i| i == commit))
            })
            .cloned()
            .collect(),
    )
}

/// Waits for the job of the push of `commit` to finish; returns every job of that push.
pub fn wait_push_finished(
    s: &ShippedStack,
    addr: &str,
    token: &str,
    commit: &str,
    timeout: Duration,
) -> Result<Vec<serde_json::Value>> {
    let mut last = None;
    let done = wait_until(timeout, Duration::from_millis(500), || {
        last = jobs_of(addr, token, commit);
        last.as_ref().is_some_and(|jobs| {
            !jobs.is_empty()
                && jobs
                    .iter()
                    .all(|j| j["state"] != "queued" && j["state"] != "running")
        })
    });
    ensure!(
        done,
        "the push of {commit} did not finish; its jobs: {last:?}\ndrover's tasks: {:?}",
        s.cluster
            .docker(&["service", "ps", "--no-trunc", &s.service("drover")])
    );
    Ok(last.unwrap_or_default())
}

/// The shipped stack.yml on a one-manager Swarm of namespace nodes, its deploy/drover.yml
/// with the `stacks:` block enabled as its comment says: drover's own stack `home` and the
/// `web` stack, each a repository on the test git server (reached through a [`GitRelay`])
/// whose hook signs with the shipped GitHub hook's secret. Fields drop in order: the
/// cluster (and every stack in it), the relay, then the repositories.
pub struct ShippedStacks {
    pub s: ShippedStack,
    relay: GitRelay,
    /// drover's own stack repository (`stack.yml`, `deploy/drover.yml`, secrets).
    pub home: Repo,
    /// The repository deploy/example-stack is pushed to.
    pub web: Repo,
    /// The deploy/drover.yml drover runs.
    pub config: String,
    /// drover's public port on the node (`host:9090`).
    pub hooks: String,
    /// The operator token.
    pub token: String,
    /// nginx's HTTP port on the node (`host:port`).
    pub nginx: String,
    /// The host the example stack's page is routed at.
    pub hello_host: String,
}

impl ShippedStacks {
    /// Deploys it with nginx on `http_port` (and `http_port + 1`), names made unique from
    /// `prefix`, and waits for drover to answer.
    pub fn deploy(prefix: &str, http_port: u16) -> Result<ShippedStacks> {
        let cluster = super::cluster::Cluster::new(1, 0)?;
        let (node, host) = {
            let m1 = cluster.node("m1");
            (m1.addr.clone(), m1.host_addr.clone())
        };
        let relay = GitRelay::start(&host)?;
        let hooks = format!("{node}:9090");
        let hook_url = format!("http://{hooks}/hooks/github");
        let id = unique(prefix).replace('-', "");
        let net = format!("{prefix}web{id}");
        let (app_host, hello_host) = (format!("app-{id}.test"), format!("hello-{id}.test"));
        // GitHub signs with the shipped hook's secret, which the caller's hooks choose
        // (gen-secrets.sh keeps a file that exists); the git server's token is the stacks'
        // `token_file`.
        let github_secret = format!("gh-{id}");
        let git_token = format!(
            "drover:{}",
            std::fs::read_to_string(env("DROVER_TEST_GIT_TOKEN_FILE")?)?.trim()
        );
        // Repositories the shipped hook's `allow` (rycus86/home-stack...) accepts as they are.
        let home = Repo::create_at(
            "rycus86",
            &format!("home-stack-{id}"),
            &github_secret,
            &hook_url,
        )?;
        let web = Repo::create_at(
            "rycus86",
            &format!("home-stack-web-{id}"),
            &github_secret,
            &hook_url,
        )?;
        let vars: Vec<(&str, String)> = vec![
            ("DROVER_IMAGE", drover_image()),
            ("NGINX_IMAGE", nginx_image()),
            ("APP_IMAGE", busybox_image()),
            ("APP_HOST", app_host.clone()),
            ("WEB_NETWORK", net.clone()),
            ("HTTP_PORT", http_port.to_string()),
            ("HTTPS_PORT", (http_port + 1).to_string()),
        ];
        let home_env = format!(
            "{{ {} }}",
            vars.iter()
                .map(|(k, v)| format!("{k}: \"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let web_env = format!(
            "{{ EXAMPLE_IMAGE: \"{}\", EXAMPLE_HOST: \"{hello_host}\", WEB_NETWORK: \"{net}\" }}",
            busybox_image()
        );
        let repo_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let shipped = std::fs::read_to_string(repo_dir.join("deploy/drover.yml"))?;
        let config = enable_shipped_stacks(
            &shipped,
            &format!("{}/{}.git", relay.url, home.full_name),
            &home_env,
            &format!("{}/{}.git", relay.url, web.full_name),
            &web_env,
        );
        let s = ShippedStack::deploy_with_secrets(
            &["stack.yml"],
            cluster,
            &net,
            &app_host,
            http_port,
            &[],
            &[
                ("github-secret", github_secret.clone()),
                ("git-token", git_token),
            ],
            |_| config.clone(),
        )?;
        let token = s.ops_token()?;
        wait_for(
            "drover to answer on the nodes' port 9090",
            Duration::from_secs(120),
            || ops_get(&hooks, &token, "/jobs").is_some(),
        )?;
        Ok(ShippedStacks {
            s,
            relay,
            home,
            web,
            config,
            hooks,
            token,
            nginx: format!("{node}:{http_port}"),
            hello_host,
        })
    }

    /// Pushes deploy/example-stack as it is with `page` as its www/index.html to the `web`
    /// repository; returns the commit.
    pub fn push_example(&self, page: &str) -> Result<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/example-stack");
        let stack = std::fs::read_to_string(dir.join("stack.yml"))?;
        self.web.push(
            &[("stack.yml", stack.as_str()), ("www/index.html", page)],
            "the example stack",
        )
    }
}
