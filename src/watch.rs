//! Turns the Engine's event stream into "something changed" hints.
//!
//! Events are hints, not truth: the render loop always refetches a whole snapshot. The
//! stream is reopened with backoff (800 ms doubling to 30 s, with jitter, reset after two
//! quiet minutes) whenever it ends or fails, resumes with `since` the last event seen, and
//! every reconnect sends a resync hint. Node events and reconnects also nudge the role
//! check (`cluster::role`), which asks Swarm who leads. It never gives up and never exits
//! the process.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
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

/// A stream open this long was a real connection, not a failed attempt.
const STABLE: Duration = Duration::from_secs(5);

pub async fn run(
    engine: Engine,
    hints: mpsc::Sender<Hint>,
    roles: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let metrics = crate::metrics::get();
    let mut since: Option<i64> = None;
    let mut backoff = Backoff::new();
    // Whether the last stream failed; a stream that lived `STABLE` ends a failure streak.
    let mut failing = false;
    loop {
        let mut stream = std::pin::pin!(engine.events(
            since,
            &["service", "node", "network", "container", "config"],
        ));
        let _ = hints.try_send(Hint::Resync);
        roles.notify_one();
        backoff.connected();
        let opened = Instant::now();
        if failing {
            debug!(since = ?since, "watching engine events");
        } else {
            info!(since = ?since, "watching engine events");
        }
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(event)) => {
                    failing = false;
                    let typ = event.typ.map(|t| t.to_string()).unwrap_or_default();
                    let action = event.action.unwrap_or_default();
                    if let Some(t) = event.time {
                        since = Some(since.map_or(t, |s| s.max(t)));
                    }
                    metrics.events.with_label_values(&[typ.as_str()]).inc();
                    if typ == "node" {
                        roles.notify_one();
                    }
                    if is_relevant(&typ, &action) {
                        debug!(%typ, %action, "engine event");
                        // A full channel already holds a pending hint; dropping is fine.
                        let _ = hints.try_send(Hint::Changed(Instant::now()));
                    }
                }
                Some(Err(e)) => {
                    // One line per outage, not one per attempt: the engine may be gone
                    // for minutes (reconcile logs when it is back and for how long).
                    if failing && opened.elapsed() < STABLE {
                        debug!(error = %e, "event stream failed");
                    } else {
                        warn!(error = %e, "event stream failed");
                    }
                    break;
                }
                None => {
                    if failing && opened.elapsed() < STABLE {
                        debug!("event stream ended");
                    } else {
                        warn!("event stream ended");
                    }
                    break;
                }
            }
        }
        failing = true;
        metrics.stream_reconnects.inc();
        let delay = backoff.delay();
        debug!(
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
}
