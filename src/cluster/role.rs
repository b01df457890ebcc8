//! This instance's role, taken from Swarm itself and kept live.
//!
//! The role is one [`tokio::sync::watch`] value that everything else follows: the render
//! loop (only a controller renders in cluster mode), the job runner (an instance that
//! becomes leader runs the jobs its predecessor journalled) and the webhook intake (a
//! worker answers 503). It is re-evaluated when the event stream reports a node change or
//! reconnects, and on every resync; after a node change it is asked again every second for
//! a while, because Swarm elects a new leader a few seconds after the node event and the
//! election itself sends no event. A probe that fails keeps the last role: an engine that
//! is gone for a moment does not make this instance give up its role.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::docker::Engine;
pub use crate::role::Role;
use crate::status::Board;

/// Asks the engine: `info` (Swarm state and node id), and on a manager `inspect_node` for
/// leadership. Two calls, whatever the cluster's size.
pub async fn probe(engine: &Engine) -> Result<Role, crate::docker::Error> {
    let info = engine.info().await?;
    let swarm = info.swarm.unwrap_or_default();
    let manager = swarm.control_available.unwrap_or(false)
        && swarm.local_node_state == Some(bollard::models::LocalNodeState::ACTIVE);
    let node_id = swarm.node_id.unwrap_or_default();
    let leader = if manager && !node_id.is_empty() {
        engine
            .inspect_node(&node_id)
            .await?
            .manager_status
            .and_then(|m| m.leader)
            .unwrap_or(false)
    } else {
        false
    };
    Ok(Role::of(manager, &node_id, leader))
}

/// The sending side: every change is logged once, counted in `drover_role{role}` and
/// shown on the status board.
#[derive(Clone)]
pub struct Publisher {
    tx: Arc<watch::Sender<Role>>,
    board: Arc<Board>,
}

/// A role channel starting at `initial`, already published.
pub fn channel(initial: Role, board: Arc<Board>) -> (Publisher, watch::Receiver<Role>) {
    let (tx, rx) = watch::channel(initial);
    let publisher = Publisher {
        tx: Arc::new(tx),
        board,
    };
    publisher.show(initial);
    info!(role = %initial, "role");
    (publisher, rx)
}

impl Publisher {
    /// Sets the role; true when it changed.
    pub fn set(&self, role: Role) -> bool {
        let mut from = role;
        let changed = self.tx.send_if_modified(|r| {
            from = *r;
            let changed = *r != role;
            *r = role;
            changed
        });
        if changed {
            info!(from = %from, to = %role, "role changed");
            self.show(role);
        }
        changed
    }

    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.tx.subscribe()
    }

    fn show(&self, role: Role) {
        let m = crate::metrics::get();
        for r in Role::ALL {
            m.role
                .with_label_values(&[r.as_str()])
                .set(i64::from(r == role));
        }
        self.board.update(|s| s.role = Some(role));
    }
}

/// How long after a node change the role is asked every [`BURST_STEP`].
const BURST: Duration = Duration::from_secs(20);
const BURST_STEP: Duration = Duration::from_secs(1);

/// Keeps the role current until shutdown: asks on every `nudge` (node events and stream
/// reconnects, from `watch`), every `resync`, and every second for [`BURST`] after a nudge.
pub async fn run(
    engine: Engine,
    publisher: Publisher,
    nudge: Arc<Notify>,
    resync: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut failing = false;
    let mut burst_until: Option<Instant> = None;
    let mut next = Instant::now() + resync;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = nudge.notified() => {
                burst_until = Some(Instant::now() + BURST);
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        let now = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = probe(&engine) => r,
        };
        next = match result {
            Ok(role) => {
                backoff.reset();
                failing = false;
                publisher.set(role);
                match burst_until {
                    Some(until) if now < until => now + BURST_STEP,
                    _ => {
                        burst_until = None;
                        now + resync
                    }
                }
            }
            Err(e) => {
                // The engine's outage is reported by the render loop; one line here is
                // enough to say the role is now stale.
                if std::mem::replace(&mut failing, true) {
                    debug!(error = %e, "cannot read the role");
                } else {
                    let role = *publisher.tx.borrow();
                    warn!(error = %e, %role, "cannot read the role; keeping the last one");
                }
                now + backoff.delay().min(resync)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Node;
    use crate::state::Snapshot;

    #[test]
    fn the_role_follows_swarm_state_and_leadership() {
        assert_eq!(Role::of(true, "n1", true), Role::Leader);
        assert_eq!(Role::of(true, "n1", false), Role::Manager);
        assert_eq!(Role::of(false, "n1", false), Role::Worker);
        assert_eq!(Role::of(false, "", false), Role::Standalone);
        assert!(Role::Leader.is_controller() && Role::Standalone.is_controller());
        assert!(!Role::Manager.is_controller() && !Role::Worker.is_controller());
    }

    #[test]
    fn a_snapshot_shows_the_same_role() {
        let mut s = Snapshot {
            swarm: true,
            node_id: "n1".into(),
            nodes: vec![
                Node {
                    id: "n1".into(),
                    ..Node::default()
                },
                Node {
                    id: "n2".into(),
                    leader: true,
                    ..Node::default()
                },
            ],
            ..Snapshot::default()
        };
        assert_eq!(Role::of_snapshot(&s), Role::Manager);
        s.nodes[0].leader = true;
        s.nodes[1].leader = false;
        assert_eq!(Role::of_snapshot(&s), Role::Leader);
        s.swarm = false;
        assert_eq!(Role::of_snapshot(&s), Role::Worker);
        s.node_id.clear();
        assert_eq!(Role::of_snapshot(&s), Role::Standalone);
    }

    #[tokio::test]
    async fn a_change_reaches_subscribers_and_the_board_once() {
        let board = Arc::new(Board::new());
        let (publisher, mut rx) = channel(Role::Manager, board.clone());
        assert_eq!(board.summary().role, Some(Role::Manager));
        assert!(!publisher.set(Role::Manager), "the same role is no change");
        assert!(publisher.set(Role::Leader));
        rx.changed().await.expect("changed");
        assert_eq!(*rx.borrow_and_update(), Role::Leader);
        assert_eq!(board.summary().role, Some(Role::Leader));
    }
}
