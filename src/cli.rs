//! Command-line interface: what `drover` accepts, the built-in default config, and the
//! one-shot commands (`render`, `check`, `healthcheck`). `drover run` lives in `daemon`.
//! One-shot commands print to stdout/stderr and map failure to a non-zero exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Action, Config, ExecSpec, SignalSpec, Target};
use crate::docker::Engine;
use crate::render::Template;

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "Keeps a Docker Swarm cluster configured by itself"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "DROVER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The YAML config file. Without it, a built-in nginx target is used.
    #[arg(long, short, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub default: DefaultTarget,
}

/// Settings of the built-in nginx target used when no config file is given.
#[derive(Debug, Clone, clap::Args)]
pub struct DefaultTarget {
    /// Where the built-in nginx target writes.
    #[arg(
        long,
        env = "DROVER_NGINX_OUTPUT",
        default_value = "/etc/nginx/conf.d/drover.conf"
    )]
    pub nginx_output: PathBuf,
    /// The Swarm service (or container name) of nginx: checked with `nginx -t`, reloaded with HUP.
    #[arg(long, env = "DROVER_NGINX_SERVICE", default_value = "nginx")]
    pub nginx_service: String,
    /// The network whose task IPs the built-in nginx target routes to.
    #[arg(long, env = "DROVER_NETWORK")]
    pub network: Option<String>,
    /// Address of the public HTTP server (webhooks, health).
    #[arg(long, env = "DROVER_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Address of the operator endpoints (status page, jobs, metrics).
    #[arg(long, env = "DROVER_OPS_LISTEN")]
    pub ops_listen: Option<std::net::SocketAddr>,
    /// Name of the Swarm job journal (`jobs.journal`).
    #[arg(long, env = "DROVER_JOURNAL")]
    pub journal: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run(ConfigArgs),
    /// Render once to stdout (like docker-pygen's --one-shot).
    Render {
        #[command(flatten)]
        args: ConfigArgs,
        /// Which target to render (default: the first).
        #[arg(long)]
        target: Option<String>,
    },
    /// Validate the config and every template; exit non-zero with file, line and reason.
    Check {
        #[command(flatten)]
        args: ConfigArgs,
        /// Also fail when a secret file (token_file, secret_file, password_file) cannot be
        /// read. Without it that is a warning: the files usually exist only where drover
        /// runs (Swarm secrets under /run/secrets), not on the workstation checking.
        #[arg(long)]
        strict: bool,
    },
    /// Deploy one stack from git (run by drover inside the deploy image, not by hand):
    /// reads the request and credentials drover uploaded to DIR.
    #[command(hide = true)]
    StackDeploy {
        #[arg(long, default_value = crate::stacks::deployer::REQUEST_DIR)]
        dir: PathBuf,
    },
    /// Exit 0 when the local daemon answers /healthz (for the image's HEALTHCHECK).
    Healthcheck {
        #[arg(
            long,
            env = "DROVER_HEALTH_URL",
            default_value = "http://127.0.0.1:9090/healthz"
        )]
        url: String,
    },
}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config, crate::config::Error> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => self.default.config(),
        };
        if let Some(listen) = self.default.listen {
            config.http.listen = listen;
        }
        if let Some(listen) = self.default.ops_listen {
            config.http.ops.listen = listen;
        }
        if let Some(journal) = &self.default.journal {
            crate::config::check_journal(journal).map_err(|reason| {
                crate::config::Error::Invalid {
                    path: "--journal (DROVER_JOURNAL)".into(),
                    reason,
                }
            })?;
            config.jobs.journal.clone_from(journal);
        }
        Ok(config)
    }
}

impl DefaultTarget {
    /// The zero-config setup: the home lab's nginx, checked and reloaded in its container.
    pub fn config(&self) -> Config {
        let on = Some(self.nginx_service.clone());
        let mut config: Config = serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!());
        config.targets.push(Target {
            network: self.network.clone(),
            check: Some(Action::Exec(ExecSpec {
                service: on.clone(),
                container: None,
                label: None,
                command: vec!["nginx".into(), "-t".into()],
            })),
            notify: vec![Action::Signal(SignalSpec {
                service: on,
                container: None,
                label: None,
                signal: "HUP".into(),
            })],
            ..Target::new("nginx", "builtin:nginx", &self.nginx_output)
        });
        config
    }
}

/// `drover render`: one snapshot, one render, to stdout.
pub async fn render_once(args: ConfigArgs, target: Option<String>) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let target = match &target {
        Some(name) => config
            .targets
            .iter()
            .find(|t| &t.name == name)
            .with_context(|| format!("no target named {name:?}"))?,
        None => config
            .targets
            .first()
            .context("the config has no targets")?,
    };
    let template = Template::load(target)?;
    let engine = Engine::connect().await?;
    let snapshot = crate::state::fetch(&engine).await?;
    let rendered = template.render(&snapshot)?;
    for s in &rendered.skipped {
        tracing::warn!(service = %s.service, label = %s.label, value = %s.value, reason = %s.reason,
            "service skipped: invalid label value");
    }
    print!("{}", rendered.text);
    Ok(ExitCode::SUCCESS)
}

/// `drover check`: every template compiles; every secret file is readable, else a
/// warning (an error with `strict`), as they usually exist only where drover runs.
pub fn check(args: ConfigArgs, strict: bool) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let mut ok = true;
    for t in &config.targets {
        if let Err(e) = Template::load(t) {
            eprintln!("drover: target {}: {e}", t.name);
            ok = false;
        }
    }
    let hook_files = config.hooks.iter().flat_map(|h| {
        let owner = format!("hook {}", h.name);
        h.token_file
            .iter()
            .chain(&h.secret_file)
            .map(move |p| (owner.clone(), p))
    });
    let registry_files = config
        .registries
        .iter()
        .map(|r| (format!("registry {}", r.address), &r.password_file));
    let stack_files = config.stacks.iter().flat_map(|s| {
        let owner = format!("stack {}", s.name);
        s.token_file
            .iter()
            .chain(&s.ssh_key_file)
            .chain(&s.known_hosts_file)
            .chain(&s.git_crypt_key_file)
            .map(move |p| (owner.clone(), p))
    });
    for (owner, path) in hook_files.chain(registry_files).chain(stack_files) {
        if let Err(e) = crate::config::read_secret(path) {
            if strict {
                eprintln!("drover: {owner}: cannot read {}: {e}", path.display());
                ok = false;
            } else {
                eprintln!(
                    "drover: warning: {owner}: cannot read {}: {e} (needed where drover runs; --strict makes this an error)",
                    path.display()
                );
            }
        }
    }
    for c in local_commands(&config) {
        match c.verdict {
            Verdict::Image => {}
            Verdict::HereOnly => eprintln!(
                "drover: warning: {}: {:?} is not in drover's image (FROM scratch: it holds only /drover); it runs only where drover runs outside that image (use a container action there)",
                c.owner, c.program
            ),
            Verdict::Nowhere => {
                eprintln!(
                    "drover: {}: {:?} cannot run: drover's image (FROM scratch) holds only /drover and this machine has no such program either (use a container action, or stacks: to deploy from git)",
                    c.owner, c.program
                );
                ok = false;
            }
        }
    }
    if ok {
        println!(
            "config ok: {} targets, {} hooks, {} stacks",
            config.targets.len(),
            config.hooks.len(),
            config.stacks.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

/// Where a local command's program can exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// drover itself: in its image and wherever it runs.
    Image,
    /// On this machine, never in drover's image.
    HereOnly,
    /// Neither in drover's image nor on this machine.
    Nowhere,
}

/// A `command:` (a target's check or notify step, or a hook's action): local commands run
/// inside drover's own container, whose release image holds nothing but `/drover`.
struct LocalCommand {
    owner: String,
    program: String,
    verdict: Verdict,
}

fn local_commands(config: &Config) -> Vec<LocalCommand> {
    let mut out = Vec::new();
    let mut push = |owner: String, argv: &[String]| {
        let Some(program) = argv.first() else { return };
        out.push(LocalCommand {
            owner,
            program: program.clone(),
            verdict: verdict(program),
        });
    };
    for t in &config.targets {
        for a in t.check.iter().chain(&t.notify) {
            if let Action::Command(argv) = a {
                push(format!("target {}", t.name), argv);
            }
        }
    }
    for h in &config.hooks {
        if let crate::config::HookAction::Command(argv) = &h.action {
            push(format!("hook {}", h.name), argv);
        }
    }
    out
}

fn verdict(program: &str) -> Verdict {
    if program == "/drover" {
        return Verdict::Image;
    }
    let here = if program.contains('/') {
        std::path::Path::new(program).is_file()
    } else {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(program).is_file())
        })
    };
    if here {
        Verdict::HereOnly
    } else {
        Verdict::Nowhere
    }
}

/// `drover stack-deploy`: the deploy container's one job. Failure prints the step's own
/// message and exits non-zero, which fails the job.
pub async fn stack_deploy(dir: PathBuf) -> anyhow::Result<ExitCode> {
    match crate::stacks::deployer::run(&dir).await {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            println!("deploy failed: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A plain HTTP/1.0 GET over TCP: the runtime image has no curl.
pub fn healthcheck(url: &str) -> ExitCode {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let timeout = std::time::Duration::from_secs(3);
    let result = (|| -> std::io::Result<String> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })();
    match result {
        Ok(answer) if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") => {
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!("drover: unhealthy: {}", answer.lines().next().unwrap_or(""));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("drover: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_absent_from_drovers_image_and_this_machine_cannot_run() {
        assert_eq!(verdict("/drover"), Verdict::Image);
        assert_eq!(verdict("/usr/local/bin/deploy-stack.sh"), Verdict::Nowhere);
        assert_eq!(verdict("no-such-program-anywhere"), Verdict::Nowhere);
        assert_eq!(verdict("sh"), Verdict::HereOnly);
    }
}
