//! Polling: for every stack with `poll`, look at its branch head every period and queue a
//! sync job when it moved. An http(s) repository is looked up here (one request, no
//! container when nothing changed); others get a sync job each period, whose deploy
//! container fetches the head. Only the instance that runs jobs (the Swarm leader's, or a
//! standalone one) polls.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::runner::StackRunner;
use crate::config::Stack;
use crate::jobs::{Facts, Jobs, Request, Work};
use crate::role::Role;

/// The hook name jobs of polls and manual syncs are recorded under.
pub const POLL_HOOK: &str = "stack-poll";
pub const SYNC_HOOK: &str = "stack-sync";

/// Polls every stack with `poll` until shutdown.
pub async fn run(
    stacks: Vec<Stack>,
    runner: Arc<StackRunner>,
    jobs: Arc<Jobs>,
    role: watch::Receiver<Role>,
    shutdown: CancellationToken,
) {
    let loops = stacks.into_iter().filter_map(|s| {
        let period = s.poll?;
        let (runner, jobs, role, shutdown) =
            (runner.clone(), jobs.clone(), role.clone(), shutdown.clone());
        Some(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(period) => {}
                }
                if !matches!(*role.borrow(), Role::Leader | Role::Standalone) {
                    continue;
                }
                if !runner.moved(&s).await {
                    debug!(stack = %s.name, "branch head unchanged");
                    continue;
                }
                let request = Request {
                    hook: POLL_HOOK.into(),
                    work: Work::SyncStack {
                        stack: s.name.clone(),
                    },
                    facts: Facts {
                        hook: POLL_HOOK.into(),
                        ..Facts::default()
                    },
                    quiet: std::time::Duration::ZERO,
                };
                if let Err(e) = jobs.submit(request).await {
                    warn!(stack = %s.name, error = %e, "cannot queue a stack sync");
                }
            }
        })
    });
    futures_util::future::join_all(loops).await;
}
