//! Reloading drover's own config file on `SIGHUP`.
//!
//! The file is read and validated exactly as at start (path, line and reason on error),
//! and every hook's secret files are read again. Only then is anything swapped in, all
//! or nothing: targets (their templates compiled again) and `resync` go to the render
//! loop and to the agent API (a target added or changed is delivered and applied as
//! the new config says), hooks to the webhook intake. Settings bound to something opened at start — the
//! listeners and HTTP limits, `jobs`, `registries`, `cluster`, `notifications`, `stacks`, `poll` — keep their running values;
//! a changed one is named in a log line that says it needs a restart. A refused reload
//! changes nothing and is counted. A reload never touches the job queue (queued and
//! running jobs go on as they were) nor the engine's event stream.

use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::ConfigArgs;
use crate::config::Config;
use crate::reconcile::Retarget;

/// Outcomes of `drover_config_reloads_total`.
const APPLIED: &str = "applied";
const REFUSED: &str = "refused";

/// Starts catching `SIGHUP` (whose default action ends the process). Call it first thing,
/// so a reload asked for while drover still waits for the engine is not fatal.
pub fn catch_hangups() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot catch SIGHUP: config reloads are off");
            None
        }
    }
}

/// The channel from the reloader to the render loop, holding the running targets.
pub fn channel(running: &Config) -> (watch::Sender<Retarget>, watch::Receiver<Retarget>) {
    watch::channel(Retarget {
        targets: running.targets.clone(),
        resync: running.resync,
    })
}

pub struct Reloader {
    args: ConfigArgs,
    running: Config,
    hooks: Arc<crate::hooks::Service>,
    targets: watch::Sender<Retarget>,
}

impl Reloader {
    /// A reloader for the config `running` was loaded from (`args`, with the same
    /// command-line overrides); `targets` is the sending end of [`channel`].
    pub fn new(
        args: ConfigArgs,
        running: Config,
        hooks: Arc<crate::hooks::Service>,
        targets: watch::Sender<Retarget>,
    ) -> Reloader {
        Reloader {
            args,
            running,
            hooks,
            targets,
        }
    }

    pub async fn run(mut self, hangups: Option<Signal>, shutdown: CancellationToken) {
        let Some(mut hangups) = hangups else {
            return;
        };
        let m = &crate::metrics::get().config_reloads;
        for outcome in [APPLIED, REFUSED] {
            m.with_label_values(&[outcome]);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            self.reload();
        }
    }

    fn reload(&mut self) {
        let path = self
            .args
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(built-in default)".into());
        let outcome = match self.try_reload() {
            Ok(restart) => {
                info!(
                    config = %path,
                    targets = self.running.targets.len(),
                    hooks = self.running.hooks.len(),
                    "config reloaded"
                );
                if !restart.is_empty() {
                    warn!(
                        settings = %restart.join(", "),
                        "config reload: these settings changed but need a restart; running with the old values"
                    );
                }
                APPLIED
            }
            Err(reason) => {
                warn!(config = %path, error = %reason, "config reload refused; the running config stays");
                REFUSED
            }
        };
        crate::metrics::get()
            .config_reloads
            .with_label_values(&[outcome])
            .inc();
    }

    /// The settings that need a restart, or why the new config was refused.
    fn try_reload(&mut self) -> Result<Vec<&'static str>, String> {
        let new = self.args.load().map_err(|e| e.to_string())?;
        self.hooks
            .replace_hooks(&new.hooks)
            .map_err(|e| e.to_string())?;
        let restart = needs_restart(&self.running, &new);
        self.targets.send_replace(Retarget {
            targets: new.targets.clone(),
            resync: new.resync,
        });
        self.running.targets = new.targets;
        self.running.hooks = new.hooks;
        self.running.resync = new.resync;
        Ok(restart)
    }
}

/// The sections of `new` that differ from the running config and are only read at start.
pub fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    // The config types hold regexes and have no `PartialEq`; their `Debug` forms hold
    // every field (regexes by their source), so equal forms mean equal settings.
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let mut changed = Vec::new();
    if differs(&running.http, &new.http) {
        changed.push("http");
    }
    if differs(&running.jobs, &new.jobs) {
        changed.push("jobs");
    }
    if differs(&running.registries, &new.registries) {
        changed.push("registries");
    }
    if differs(&running.cluster, &new.cluster) {
        changed.push("cluster");
    }
    if differs(&running.notifications, &new.notifications) {
        changed.push("notifications");
    }
    // The stacks runner and its poll loops are built once at start.
    if differs(&running.stacks, &new.stacks) {
        changed.push("stacks");
    }
    // So is the registry poller (its schedule and its registry client).
    if differs(&running.poll, &new.poll) {
        changed.push("poll");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Config {
        match Config::parse(Path::new("drover.yml"), text) {
            Ok(c) => c,
            Err(e) => panic!("test config: {e}"),
        }
    }

    const BASE: &str = "resync: 30s\nhttp: { listen: 127.0.0.1:9000 }\n\
                        targets:\n  - name: a\n    template: builtin:nginx\n    output: /tmp/a.conf\n";

    #[test]
    fn targets_and_resync_change_without_a_restart() {
        let new = parse(
            "resync: 10s\nhttp: { listen: 127.0.0.1:9000 }\n\
             targets:\n  - name: b\n    template: builtin:nginx\n    output: /tmp/b.conf\n",
        );
        assert!(needs_restart(&parse(BASE), &new).is_empty());
    }

    #[test]
    fn a_changed_stack_or_poll_section_needs_a_restart() {
        let new = parse(&format!(
            "{BASE}stacks:\n  - name: web\n    repository: https://git.example.com/lab/web.git\n"
        ));
        assert_eq!(needs_restart(&parse(BASE), &new), vec!["stacks"]);
        let new = parse(&format!("{BASE}poll:\n  all: true\n"));
        assert_eq!(needs_restart(&parse(BASE), &new), vec!["poll"]);
    }

    #[test]
    fn a_new_listen_address_or_job_setting_needs_a_restart() {
        let new = parse(&format!(
            "{}jobs: {{ queue: 7 }}\n",
            BASE.replace("9000", "9001")
        ));
        assert_eq!(needs_restart(&parse(BASE), &new), vec!["http", "jobs"]);
    }
}
