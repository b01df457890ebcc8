//! Turns the Engine's event stream into "something changed" hints.
//!
//! Events are hints, not truth: the render loop always refetches a whole snapshot. The
//! stream is reopened with backoff (800 ms doubling to 30 s, with jitter, reset after two
//! quiet minutes) whenever it ends or fails, resumes with `since` the last event seen, and
//! every reconnect sends a resync hint. It never gives up and never exits the process.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::docker::Engine;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// An event that may change a render, received at this instant.
    Changed(Instant),
    /// The stream was (re)opened: events may have been missed.
    Resync,
}

/// Container actions that cannot change what a template sees. Our own `nginx -t` execs
/// and reload signals would otherwise wake the loop after every apply.
const IGNORED_CONTAINER_ACTIONS: &[&str] = &[
    "exec_create",
    "exec_start",
    "exec_die",
    "exec_detach",
    "kill",
    "attach",
    "detach",
    "resize",
    "top",
    "archive-path",
    "extract-to-dir",
    "export",
    "commit",
    "copy",
];

pub fn is_relevant(typ: &str, action: &str) -> bool {
    match typ {
        "container" => {
            let action = action.split(':').next().unwrap_or(action).trim();
            !IGNORED_CONTAINER_ACTIONS.contains(&action)
        }
        "service" | "node" | "network" | "config" => true,
        _ => false,
    }
}

struct Backoff {
    next: Duration,
    healthy_since: Option<Instant>,
}

impl Backoff {
    const START: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(30);
    const RESET_AFTER: Duration = Duration::from_secs(120);

    fn new() -> Backoff {
        Backoff {
            next: Self::START,
            healthy_since: None,
        }
    }

    fn connected(&mut self) {
        self.healthy_since = Some(Instant::now());
    }

    fn delay(&mut self) -> Duration {
        if self
            .healthy_since
            .is_some_and(|t| t.elapsed() >= Self::RESET_AFTER)
        {
            self.next = Self::START;
        }
        self.healthy_since = None;
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Jitter from the clock's low bits: several drovers restarted together spread out.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }
}

pub async fn run(engine: Engine, hints: mpsc::Sender<Hint>, shutdown: CancellationToken) {
    let metrics = crate::metrics::get();
    let mut since: Option<i64> = None;
    let mut backoff = Backoff::new();
    let filters: HashMap<String, Vec<String>> = HashMap::from([(
        "type".to_owned(),
        ["service", "node", "network", "container", "config"]
            .map(String::from)
            .to_vec(),
    )]);
    loop {
        let options = EventsOptions {
            since: since.map(|s| s.to_string()),
            until: None,
            filters: Some(filters.clone()),
        };
        let mut stream = engine.api.events(Some(options));
        let _ = hints.try_send(Hint::Resync);
        backoff.connected();
        info!(since = ?since, "watching engine events");
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(event)) => {
                    let typ = event.typ.map(|t| t.to_string()).unwrap_or_default();
                    let action = event.action.unwrap_or_default();
                    if let Some(t) = event.time {
                        since = Some(since.map_or(t, |s| s.max(t)));
                    }
                    metrics.events.with_label_values(&[typ.as_str()]).inc();
                    if is_relevant(&typ, &action) {
                        debug!(%typ, %action, "engine event");
                        // A full channel already holds a pending hint; dropping is fine.
                        let _ = hints.try_send(Hint::Changed(Instant::now()));
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "event stream failed");
                    break;
                }
                None => {
                    warn!("event stream ended");
                    break;
                }
            }
        }
        metrics.stream_reconnects.inc();
        let delay = backoff.delay();
        info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting to the event stream"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_execs_and_signals_are_not_changes() {
        assert!(!is_relevant("container", "exec_start: nginx -t"));
        assert!(!is_relevant("container", "exec_die"));
        assert!(!is_relevant("container", "kill"));
        assert!(is_relevant("container", "start"));
        assert!(is_relevant("container", "health_status: healthy"));
        assert!(is_relevant("service", "update"));
        assert!(!is_relevant("image", "pull"));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_a_cap_and_resets_after_quiet() {
        let mut b = Backoff::new();
        let first = b.delay();
        assert!(first >= Backoff::START && first < Backoff::START * 2);
        for _ in 0..10 {
            b.delay();
        }
        let capped = b.delay();
        assert!(capped >= Backoff::MAX && capped <= Backoff::MAX.mul_f64(1.25));
        b.connected();
        tokio::time::advance(Backoff::RESET_AFTER).await;
        assert!(b.delay() < Backoff::START * 2);
    }
}
