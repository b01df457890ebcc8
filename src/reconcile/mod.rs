//! The render loop: change hints in, checked configs out.
//!
//! One snapshot is fetched per wake-up and shared by every target that is due, so the
//! number of Engine calls is constant per batch. A target is due when its debounce window
//! closes, on a resync (start, stream reconnect, periodic), or on a convergence re-check:
//! Swarm emits no task events, so while any task is on its way to `running` the loop
//! polls with a short backoff until the cluster is steady. A template or apply error of
//! one target is logged, counted and shown on the status page; it never affects other
//! targets and never stops the loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

use crate::certs::Exchange;
use crate::cluster::contacts::Contacts;
use crate::cluster::wire::Key;
use crate::config::Target;
use crate::debounce::Batch;
use crate::docker::Engine;
use crate::role::Role;
use crate::state::Snapshot;
use crate::status::Board;
use crate::watch::Hint;

mod policy;
mod report;
mod target;

pub use policy::{Failure, Policy};
pub use target::{Action, Ctx, Error};
use target::{TargetState, error_policy, reconcile, target_state};

/// First and largest delay of the convergence re-check.
const CONVERGE_FIRST: Duration = Duration::from_millis(100);
const CONVERGE_MAX: Duration = Duration::from_millis(250);
/// A task stuck in `pending` (no node fits) should not keep us polling fast forever.
const CONVERGE_SLOW_AFTER: Duration = Duration::from_secs(60);
const CONVERGE_SLOW: Duration = Duration::from_secs(5);

pub struct Reconciler {
    engine: Engine,
    targets: Vec<TargetState>,
    board: Arc<Board>,
    resync: Duration,
    agents: Option<(Key, u16)>,
    contacts: Arc<Contacts>,
    retargets: Option<watch::Receiver<Retarget>>,
    /// In cluster mode only the controller renders; a change of role is a full pass.
    role: watch::Receiver<Role>,
    /// Where each snapshot's addresses of the steps' containers go (the intake's default
    /// trusted proxies).
    steps: Option<crate::state::StepAddresses>,
    /// drover's ACME client's side of the ACME target, and where nodes write certificates.
    certs: Option<(Arc<Exchange>, PathBuf)>,
}

/// What a config reload may change in the render loop without a restart.
#[derive(Debug, Clone)]
pub struct Retarget {
    pub targets: Vec<Target>,
    pub resync: Duration,
}

/// Whether what the certificate manager publishes changed; never when there is nothing
/// to follow (or the manager is gone).
async fn next_publish(published: &mut Option<watch::Receiver<crate::certs::Published>>) -> bool {
    if let Some(rx) = published {
        if rx.changed().await.is_ok() {
            return true;
        }
    }
    *published = None;
    std::future::pending().await
}

/// The next reloaded config, or never when there is no reload channel (or it closed).
async fn next_retarget(retargets: &mut Option<watch::Receiver<Retarget>>) -> Retarget {
    if let Some(rx) = retargets {
        if rx.changed().await.is_ok() {
            return rx.borrow_and_update().clone();
        }
    }
    *retargets = None;
    std::future::pending().await
}

fn unix_now() -> u64 {
    u64::try_from(crate::clock::unix_secs()).unwrap_or(0)
}

impl Reconciler {
    /// Compiles every target's template. A template that does not compile disables only
    /// its own target (reported on the status page); the others run.
    pub fn new(
        engine: Engine,
        targets: &[Target],
        board: Arc<Board>,
        resync: Duration,
        agents: Option<(Key, u16)>,
        contacts: Arc<Contacts>,
        role: watch::Receiver<Role>,
    ) -> Reconciler {
        let targets = targets
            .iter()
            .map(|t| target_state(t, &board, agents.as_ref(), None))
            .collect();
        Reconciler {
            engine,
            targets,
            board,
            resync,
            agents,
            contacts,
            retargets: None,
            role,
            steps: None,
            certs: None,
        }
    }

    /// Serves the challenges and delivers the certificates of drover's ACME client with
    /// the target `exchange` names, written under `dir` on each node.
    pub fn with_certificates(mut self, exchange: Arc<Exchange>, dir: PathBuf) -> Reconciler {
        self.certs = Some((exchange, dir));
        let certs = self.certs.as_ref();
        for t in &mut self.targets {
            *t = target_state(&t.config, &self.board, self.agents.as_ref(), certs);
        }
        self
    }

    /// Keeps `steps` current with the addresses the targets' steps reach.
    pub fn with_step_addresses(mut self, steps: crate::state::StepAddresses) -> Reconciler {
        self.steps = Some(steps);
        self
    }

    fn note_step_addresses(&self, snapshot: &Snapshot) {
        let Some(steps) = &self.steps else {
            return;
        };
        let selectors: Vec<_> = self
            .targets
            .iter()
            .flat_map(|t| t.config.selectors())
            .collect();
        let now = crate::state::query::step_addresses(&selectors, snapshot);
        let mut held = steps.write().unwrap_or_else(|e| e.into_inner());
        if *held != now {
            debug!(addresses = ?now, "trusted proxies (the steps' containers)");
            *held = now;
        }
    }

    /// Takes reloaded targets from `retargets` while running (see [`Retarget`]).
    pub fn with_retargets(mut self, retargets: watch::Receiver<Retarget>) -> Reconciler {
        self.retargets = Some(retargets);
        self
    }

    /// Swaps in a reloaded config's targets: every template is compiled again (an edited
    /// template file counts too) and the next pass covers every target, so nothing that
    /// was waiting in a debounce window is lost. Targets no longer configured leave the
    /// status page; their files stay as they are.
    fn retarget(&mut self, new: &Retarget) {
        let names: Vec<&str> = new.targets.iter().map(|t| t.name.as_str()).collect();
        for gone in self
            .targets
            .iter()
            .filter(|t| !names.contains(&t.config.name.as_str()))
        {
            self.board.remove_target(&gone.config.name);
        }
        self.targets = new
            .targets
            .iter()
            .map(|t| target_state(t, &self.board, self.agents.as_ref(), self.certs.as_ref()))
            .collect();
        self.resync = new.resync;
    }

    pub async fn run(mut self, mut hints: mpsc::Receiver<Hint>, shutdown: CancellationToken) {
        let mut full_pass = true;
        // Only the very first pass skips waiting; a failed fetch waits for its retry time.
        let mut immediate = true;
        let mut next_resync = Instant::now() + self.resync;
        let mut converge: Option<(Instant, Duration)> = None;
        let mut converging_since: Option<Instant> = None;
        let mut last_seen: Option<Arc<Snapshot>> = None;
        // After a failed snapshot nothing is due before this instant, whatever arrives.
        let mut retry_at: Option<Instant> = None;
        let mut engine = Policy::default();
        let mut role_open = true;
        let mut published = self.certs.as_ref().map(|(x, _)| x.published.subscribe());
        loop {
            if !std::mem::take(&mut immediate) {
                let wake = match retry_at {
                    Some(at) => at,
                    None => self
                        .targets
                        .iter()
                        .filter_map(|t| t.debounce.deadline())
                        .chain(self.targets.iter().filter_map(|t| t.next_look))
                        .chain(converge.map(|c| c.0))
                        .chain(std::iter::once(next_resync))
                        .min()
                        .unwrap_or(next_resync),
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    hint = hints.recv() => match hint {
                        Some(Hint::Changed(at)) => {
                            for t in &mut self.targets {
                                t.debounce.hint(at);
                            }
                        }
                        Some(Hint::Resync) => full_pass = true,
                        // The watcher only stops at shutdown.
                        None => return,
                    },
                    changed = self.role.changed(), if role_open => match changed {
                        Ok(()) => {
                            // A new controller renders everything, even an unchanged cluster.
                            full_pass = true;
                            for t in &mut self.targets {
                                t.settled = None;
                            }
                        }
                        // The role check is gone: the last role stays.
                        Err(_) => role_open = false,
                    },
                    _ = sleep_until(wake) => {}
                    // New tokens or certificates: the ACME target is rendered at once.
                    changed = next_publish(&mut published) => {
                        if changed {
                            for t in self.targets.iter_mut().filter(|t| t.acme.is_some()) {
                                t.next_look = Some(Instant::now());
                            }
                        }
                    }
                    new = next_retarget(&mut self.retargets) => {
                        self.retarget(&new);
                        full_pass = true;
                        next_resync = Instant::now() + self.resync;
                    }
                }
            }
            let now = Instant::now();
            if retry_at.is_some_and(|at| now < at) {
                continue;
            }
            let retrying = retry_at.take().is_some();
            if now >= next_resync {
                full_pass = true;
            }
            let converge_due = converge.is_some_and(|c| c.0 <= now);
            let batches: Vec<Option<Batch>> = self
                .targets
                .iter_mut()
                .map(|t| t.debounce.take_due(now))
                .collect();
            let check_due: Vec<bool> = self
                .targets
                .iter()
                .map(|t| t.next_look.is_some_and(|at| at <= now))
                .collect();
            let any_batch = batches.iter().any(Option::is_some) || check_due.contains(&true);
            if !(full_pass || converge_due || any_batch || retrying) {
                continue;
            }
            if full_pass {
                crate::metrics::get().resyncs.inc();
                next_resync = now + self.resync;
            }
            let fetched = tokio::select! {
                _ = shutdown.cancelled() => return,
                fetched = crate::state::fetch(&self.engine) => fetched,
            };
            let snapshot = match fetched {
                Ok(s) => {
                    engine.succeeded();
                    self.note_step_addresses(&s);
                    Arc::new(s)
                }
                Err(e) => {
                    // Keep the work (the batches, and every target after a failed
                    // resync or re-check), but nothing is due before the backoff ends.
                    for (t, b) in self.targets.iter_mut().zip(&batches) {
                        if let Some(b) = b {
                            t.debounce.hint(b.first);
                        }
                    }
                    if converge_due || retrying {
                        full_pass = true;
                    }
                    converge = None;
                    retry_at = Some(Instant::now() + engine.failed(&e));
                    continue;
                }
            };
            let everyone = full_pass || converge_due;
            let role = *self.role.borrow_and_update();
            for ((t, batch), check_due) in self.targets.iter_mut().zip(batches).zip(check_due) {
                if everyone || batch.is_some() || check_due {
                    let span = info_span!("reconcile", target = %t.config.name);
                    let ctx = Ctx {
                        engine: Some(&self.engine),
                        board: &self.board,
                        contacts: &self.contacts,
                        role,
                        resync: full_pass,
                        batch,
                    };
                    // A check or notify step can take up to its timeout: shutdown does not wait.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = step(t, &snapshot, &ctx).instrument(span) => {}
                    }
                }
            }
            full_pass = false;
            self.publish(&snapshot);
            // Slow polling is for a Swarm stuck without progress (a task pending for want
            // of a node), not for one kept busy by scaling: any change restarts the clock.
            if last_seen.as_deref() != Some(&*snapshot) {
                converging_since = None;
            }
            last_seen = Some(snapshot.clone());
            converge = if snapshot.is_converging() {
                let since = *converging_since.get_or_insert(now);
                let step = match converge {
                    _ if since.elapsed() >= CONVERGE_SLOW_AFTER => CONVERGE_SLOW,
                    Some((_, step)) if converge_due => (step * 2).min(CONVERGE_MAX),
                    Some((_, step)) => step,
                    None => CONVERGE_FIRST,
                };
                Some((Instant::now() + step, step))
            } else {
                converging_since = None;
                None
            };
        }
    }

    fn publish(&self, snapshot: &Snapshot) {
        let peers = peers(snapshot);
        let node = snapshot
            .nodes
            .iter()
            .find(|n| n.id == snapshot.node_id)
            .map(|n| n.hostname.clone())
            .unwrap_or_default();
        let engine = self.engine.host().to_owned();
        if let Some((_, port)) = &self.agents {
            // Who the controller sends heartbeats to, and from which address.
            self.contacts.set_peers(
                &snapshot.node_id,
                crate::cluster::peers::peers(snapshot, *port),
            );
        }
        self.board.update(|s| {
            s.peers = peers;
            s.node = node;
            s.engine = engine;
            s.ready = true;
        });
    }
}

/// Hostnames of the nodes running drover's own service (when it runs as one).
fn peers(snapshot: &Snapshot) -> Vec<String> {
    let Some(service) = snapshot.own.as_ref().and_then(|o| o.service.as_deref()) else {
        return Vec::new();
    };
    let mut peers: Vec<String> = snapshot
        .service(service)
        .map(|s| {
            s.tasks
                .iter()
                .filter(|t| t.is_live())
                .filter_map(|t| snapshot.nodes.iter().find(|n| n.id == t.node_id))
                .map(|n| n.hostname.clone())
                .collect()
        })
        .unwrap_or_default();
    peers.sort();
    peers.dedup();
    peers
}

/// One reconcile of `t` and what the loop keeps of it: the target's one next look, and
/// the snapshot it settled on (the same cluster again is not rendered again).
async fn step(t: &mut TargetState, snapshot: &Arc<Snapshot>, ctx: &Ctx<'_>) {
    let action = match reconcile(t, snapshot, ctx).await {
        Ok(action) => action,
        Err(e) => error_policy(t, &e, ctx),
    };
    t.settle(snapshot, action);
}
