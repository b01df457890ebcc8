//! Command-line interface: what `drover` accepts and the built-in default config.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Action, Config, Debounce, ExecSpec, SignalSpec, Target};

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

#[derive(Debug, clap::Args)]
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
    /// Address of the HTTP server (metrics, status, webhooks).
    #[arg(long, env = "DROVER_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
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
    Check(ConfigArgs),
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
        Ok(config)
    }
}

impl DefaultTarget {
    /// The zero-config setup: the home lab's nginx, checked and reloaded in its container.
    pub fn config(&self) -> Config {
        let on = Some(self.nginx_service.clone());
        let mut config: Config = serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!());
        config.targets.push(Target {
            name: "nginx".into(),
            template: "builtin:nginx".into(),
            output: self.nginx_output.clone(),
            network: self.network.clone(),
            debounce: Debounce::default(),
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
        });
        config
    }
}
