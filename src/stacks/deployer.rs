//! `drover stack-deploy`: the deploy itself, run inside a one-off container of the deploy
//! image (git, git-crypt, ssh, the docker CLI and this binary) with the Docker socket.
//!
//! It fetches exactly the requested commit (or the branch head when none is given),
//! unlocks it with git-crypt when a key came with the request, lets the docker CLI merge
//! and interpolate the compose file (`docker stack config`), renames every `file:` config
//! and secret by content ([`compose::prepare`]), creates missing external networks and
//! runs `docker stack deploy --with-registry-auth`. The CLI is the reference conversion of
//! a compose file into Swarm specs: nothing here converts one.
//!
//! Invariants: credentials arrive as files in the request directory (uploaded by the
//! controller before the container starts), never in argv or the container's environment;
//! nothing read from the repository or a credential file is printed — output is git's and
//! the CLI's own messages plus one final [`RESULT_PREFIX`] line the controller parses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::compose::{self, Rotated};
use crate::process;

/// Where the controller uploads the request and its credential files.
pub const REQUEST_DIR: &str = "/run/drover-stack";
/// The request file in [`REQUEST_DIR`].
pub const REQUEST_FILE: &str = "request.json";
/// Credential files in [`REQUEST_DIR`], each present only when configured.
pub const TOKEN_FILE: &str = "token";
pub const SSH_KEY_FILE: &str = "ssh_key";
pub const KNOWN_HOSTS_FILE: &str = "known_hosts";
pub const GIT_CRYPT_KEY_FILE: &str = "git_crypt_key";
/// The docker CLI's config directory (`config.json` with the registries' auths).
pub const DOCKER_CONFIG_DIR: &str = "docker";
/// The line the controller reads the result from.
pub const RESULT_PREFIX: &str = "drover-stack-result ";

/// Where the checkout goes inside the container.
const CHECKOUT: &str = "/tmp/drover-stack/checkout";
/// Each step's time limit (the container as a whole is bounded by the stack's timeout).
const STEP: Duration = Duration::from_secs(300);
/// Bytes of a step's output kept: `docker stack config` prints the whole file.
const OUTPUT: usize = 4 * 1024 * 1024;

/// What to deploy, written by the controller as [`REQUEST_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub stack: String,
    pub repository: String,
    pub branch: String,
    /// The commit to deploy; the branch head when not set.
    #[serde(default)]
    pub commit: Option<String>,
    pub compose: String,
    #[serde(default)]
    pub prune: bool,
    /// Interpolation variables for the compose file.
    #[serde(default)]
    pub environment: std::collections::BTreeMap<String, String>,
}

/// What was deployed, printed after [`RESULT_PREFIX`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    pub commit: String,
    pub rotated: Vec<Rotated>,
    pub networks_created: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the request: {0}")]
    Request(String),
    #[error("{step}: {source}")]
    Run {
        step: &'static str,
        #[source]
        source: process::Error,
    },
    #[error("{step} failed: {message}")]
    Failed { step: &'static str, message: String },
    #[error(transparent)]
    Compose(#[from] compose::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The `Authorization` value of a `token_file`: `USER:TOKEN`, or a bare token under the
/// user GitHub documents for tokens, as HTTP basic auth (the deploy container's git and the
/// controller's head lookup, `refs`, send the same).
pub fn basic_auth(token: &[u8]) -> String {
    let text = String::from_utf8_lossy(token);
    let userpass = if text.contains(':') {
        text.into_owned()
    } else {
        format!("x-access-token:{text}")
    };
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(userpass)
    )
}

/// A commit id as git prints it: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits.
pub fn is_commit(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Runs the request in `dir` and prints the result line; the error is what the job shows.
pub async fn run(dir: &Path) -> Result<Deployed, Error> {
    let text = std::fs::read_to_string(dir.join(REQUEST_FILE))
        .map_err(|e| Error::Request(e.to_string()))?;
    let request: Request =
        serde_json::from_str(&text).map_err(|e| Error::Request(e.to_string()))?;
    if let Some(c) = &request.commit {
        if !is_commit(c) {
            return Err(Error::Request(format!("{c:?} is not a commit id")));
        }
    }
    let git_env = git_environment(dir)?;
    let commit = fetch(&request, &git_env).await?;
    println!("fetched {} at {commit}", request.repository);
    let key = dir.join(GIT_CRYPT_KEY_FILE);
    if key.exists() {
        step(
            "git-crypt unlock",
            &["git-crypt".into(), "unlock".into(), path_arg(&key)],
            &[],
        )
        .await?;
        println!("unlocked with git-crypt");
    }
    let mut cli_env: Vec<(String, String)> = request
        .environment
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    cli_env.push((
        "DOCKER_CONFIG".into(),
        path_arg(&dir.join(DOCKER_CONFIG_DIR)),
    ));
    let compose_path = Path::new(CHECKOUT).join(&request.compose);
    let merged = step(
        "docker stack config",
        &[
            "docker".into(),
            "stack".into(),
            "config".into(),
            "--compose-file".into(),
            path_arg(&compose_path),
        ],
        &cli_env,
    )
    .await?;
    let prepared = compose::prepare(&request.stack, &merged, |p| std::fs::read(p))?;
    for r in &prepared.rotated {
        println!("{} {} deployed as {}", r.kind, r.key, r.name);
    }
    let mut networks_created = Vec::new();
    for net in &prepared.networks {
        if ensure_network(net, &cli_env).await? {
            println!("created overlay network {net}");
            networks_created.push(net.clone());
        }
    }
    let deployed_file = Path::new(CHECKOUT)
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join("deployed.yml");
    std::fs::write(&deployed_file, &prepared.text).map_err(|source| Error::Write {
        path: deployed_file.clone(),
        source,
    })?;
    let mut deploy: Vec<String> = [
        "docker",
        "stack",
        "deploy",
        "--with-registry-auth",
        "--resolve-image",
        "changed",
        "--detach=true",
        "--compose-file",
    ]
    .map(String::from)
    .to_vec();
    deploy.push(path_arg(&deployed_file));
    if request.prune {
        deploy.push("--prune".into());
    }
    deploy.push(request.stack.clone());
    let out = step("docker stack deploy", &deploy, &cli_env).await?;
    print!("{out}");
    let result = Deployed {
        commit,
        rotated: prepared.rotated,
        networks_created,
    };
    if let Ok(line) = serde_json::to_string(&result) {
        println!("{RESULT_PREFIX}{line}");
    }
    Ok(result)
}

/// The result line in a deploy container's output.
pub fn parse_result(output: &str) -> Option<Deployed> {
    output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(RESULT_PREFIX))
        .and_then(|j| serde_json::from_str(j).ok())
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// git's credentials as environment variables of git alone (never argv): the token as an
/// HTTP basic-auth header, or ssh with the deploy key and a fixed known_hosts file.
fn git_environment(dir: &Path) -> Result<Vec<(String, String)>, Error> {
    let mut env = vec![("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned())];
    let token = dir.join(TOKEN_FILE);
    if token.exists() {
        let bytes =
            crate::config::read_secret(&token).map_err(|e| Error::Request(e.to_string()))?;
        // `USER:TOKEN`, or a bare token under the user GitHub documents for tokens (other
        // forges take any user name with a token).
        let basic = basic_auth(&bytes);
        env.extend([
            ("GIT_CONFIG_COUNT".to_owned(), "1".to_owned()),
            ("GIT_CONFIG_KEY_0".to_owned(), "http.extraHeader".to_owned()),
            (
                "GIT_CONFIG_VALUE_0".to_owned(),
                format!("Authorization: {basic}"),
            ),
        ]);
    }
    let key = dir.join(SSH_KEY_FILE);
    if key.exists() {
        env.push((
            "GIT_SSH_COMMAND".to_owned(),
            format!(
                "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
                path_arg(&key),
                path_arg(&dir.join(KNOWN_HOSTS_FILE))
            ),
        ));
    }
    Ok(env)
}

/// Fetches the commit (or the branch head) into a fresh checkout and checks it out;
/// returns the commit id. Servers that refuse a fetch by id (git's protocol v0 without
/// `uploadpack.allowReachableSHA1InWant`) get a fetch of the branch instead.
async fn fetch(request: &Request, env: &[(String, String)]) -> Result<String, Error> {
    let _ = std::fs::remove_dir_all(CHECKOUT);
    std::fs::create_dir_all(CHECKOUT).map_err(|source| Error::Write {
        path: CHECKOUT.into(),
        source,
    })?;
    std::env::set_current_dir(CHECKOUT).map_err(|source| Error::Write {
        path: CHECKOUT.into(),
        source,
    })?;
    let git = |args: &[&str]| -> Vec<String> {
        std::iter::once("git")
            .chain(args.iter().copied())
            .map(String::from)
            .collect()
    };
    step("git init", &git(&["init", "-q", "."]), env).await?;
    let branch_ref = format!("refs/heads/{}", request.branch);
    let fetch = |what: &str, depth: &str| {
        git(&[
            "fetch",
            "-q",
            "--no-tags",
            depth,
            "--end-of-options",
            &request.repository,
            what,
        ])
    };
    match &request.commit {
        Some(commit) => {
            if step("git fetch", &fetch(commit, "--depth=1"), env)
                .await
                .is_err()
            {
                step("git fetch", &fetch(&branch_ref, "--depth=50"), env).await?;
            }
            step(
                "git checkout",
                &git(&["checkout", "-q", "--detach", commit]),
                env,
            )
            .await?;
        }
        None => {
            step("git fetch", &fetch(&branch_ref, "--depth=1"), env).await?;
            step(
                "git checkout",
                &git(&["checkout", "-q", "--detach", "FETCH_HEAD"]),
                env,
            )
            .await?;
        }
    }
    let head = step("git rev-parse", &git(&["rev-parse", "HEAD"]), env).await?;
    Ok(head.trim().to_owned())
}

/// Creates the network as an attachable overlay unless it exists; true when created.
async fn ensure_network(name: &str, env: &[(String, String)]) -> Result<bool, Error> {
    let inspect: Vec<String> = [
        "docker",
        "network",
        "inspect",
        "--format",
        "{{.Name}}",
        name,
    ]
    .map(String::from)
    .to_vec();
    if step("docker network inspect", &inspect, env).await.is_ok() {
        return Ok(false);
    }
    let create: Vec<String> = [
        "docker",
        "network",
        "create",
        "--driver",
        "overlay",
        "--attachable",
        name,
    ]
    .map(String::from)
    .to_vec();
    match step("docker network create", &create, env).await {
        Ok(_) => Ok(true),
        // Another deploy created it meanwhile.
        Err(_) if step("docker network inspect", &inspect, env).await.is_ok() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs one step; its stdout when it succeeds, its own message (exit code and output
/// tails) when it fails.
async fn step(
    step: &'static str,
    argv: &[String],
    env: &[(String, String)],
) -> Result<String, Error> {
    let out = process::run(argv, env, STEP, OUTPUT)
        .await
        .map_err(|source| Error::Run { step, source })?;
    if out.success() {
        Ok(out.stdout)
    } else {
        // stderr only: stdout of `docker stack config` is the interpolated file.
        let code = out.code.map_or("killed by a signal".to_owned(), |c| {
            format!("exit code {c}")
        });
        let stderr = out.stderr.trim_end();
        let mut from = stderr.len().saturating_sub(2000);
        while !stderr.is_char_boundary(from) {
            from += 1;
        }
        let tail = &stderr[from..];
        Err(Error::Failed {
            step,
            message: format!("{code}: {}", tail.trim_start()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_line_is_found_after_the_clis_output() {
        let out = "fetched x\nCreating service web_app\ndrover-stack-result {\"commit\":\"abc\",\"rotated\":[],\"networks_created\":[\"web\"]}\n";
        let r = parse_result(out).expect("result");
        assert_eq!(r.commit, "abc");
        assert_eq!(r.networks_created, vec!["web".to_owned()]);
        assert_eq!(parse_result("no result\n"), None);
    }

    #[test]
    fn only_full_commit_ids_are_taken() {
        assert!(is_commit(&"a".repeat(40)));
        assert!(!is_commit("HEAD"));
        assert!(!is_commit(&format!("-{}", "a".repeat(39))));
        assert!(!is_commit(&"A".repeat(40)));
    }
}
