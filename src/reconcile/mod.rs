//! The render loop: change hints in, checked configs out.
//!
//! One snapshot is fetched per wake-up and shared by every target that is due, so the
//! number of Engine calls is constant per batch. A target is due when its debounce window
//! closes, on a resync (start, stream reconnect, periodic), or on a convergence re-check:
//! Swarm emits no task events, so while any task is on its way to `running` the loop
//! polls with a short backoff until the cluster is steady. A template or apply error of
//! one target is logged, counted and shown on the status page; it never affects other
//! targets and never stops the loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::apply::{Candidate, Local, Outcome, Report};
use crate::backoff::Backoff;
use crate::cluster::contacts::Contacts;
use crate::cluster::delivery::{self, Deliverer, Rendition};
use crate::cluster::wire::Key;
use crate::config::Target;
use crate::debounce::{Batch, Debouncer};
use crate::docker::Engine;
use crate::render::{Rendered, Template};
use crate::role::Role;
use crate::state::Snapshot;
use crate::status::{Board, SkippedService};
use crate::watch::Hint;

mod policy;
mod report;

pub use policy::{Failure, Policy};

/// The longest wait before a node the last delivery did not reach is tried again. A node
/// that comes back (its engine restarted) looks the same to the controller as one still
/// away until its agent answers, so the backoff alone would grow to its 30 s ceiling while
/// it was down and keep the returning node's file stale that long; a try costs one
/// connection attempt of at most 3 s per owed node.
const REDELIVER_MAX: Duration = Duration::from_secs(5);

/// First and largest delay of the convergence re-check.
const CONVERGE_FIRST: Duration = Duration::from_millis(100);
const CONVERGE_MAX: Duration = Duration::from_millis(250);
/// A task stuck in `pending` (no node fits) should not keep us polling fast forever.
const CONVERGE_SLOW_AFTER: Duration = Duration::from_secs(60);
const CONVERGE_SLOW: Duration = Duration::from_secs(5);

struct TargetState {
    config: Target,
    template: Result<Template, String>,
    /// This node's file of the target: the one executor, also every agent's.
    local: Local,
    /// Present when this instance has the cluster key: the agents' side of delivery.
    deliverer: Option<Deliverer>,
    debounce: Debouncer,
    last_skipped: Vec<SkippedService>,
    /// The snapshot of the last pass that needs no retry: the same cluster again (a
    /// convergence poll or resync that found nothing new) is not rendered again.
    settled: Option<Arc<Snapshot>>,
    /// Paces the retries of nodes an agents delivery did not bring up to date.
    redeliver_backoff: Backoff,
    /// When the nodes an agents delivery did not reach are due again. A node whose agent
    /// comes up (its engine back, its drover task just started) sends no event of its own,
    /// so without this it would wait for the next change or resync with a stale file.
    redeliver_at: Option<Instant>,
    /// (node id, outcome) of the nodes last owed the content: when that changes (a node's
    /// agent appeared, one went away) the retry starts again from the shortest delay.
    owed: BTreeSet<(String, &'static str)>,
    /// The reason of the last unavailable check, so a lasting outage is logged once.
    unavailable_reason: Option<String>,
    /// Hosts left out as last reported, so each change is logged once.
    left_out: BTreeMap<String, String>,
    /// TLS hosts last reported as served on port 80 (on some node); `None`: not yet.
    without_certificate: Option<BTreeSet<String>>,
}

impl TargetState {
    /// When a check that could not run, or a delivery that did not reach every node, is
    /// due again: the target's one next look besides its debounce window.
    fn retry_at(&self) -> Option<Instant> {
        self.local
            .retry_at()
            .into_iter()
            .chain(self.redeliver_at)
            .min()
    }

    /// Whether a resync has something to look at again that the cluster does not tell.
    fn looks_outside(&self) -> bool {
        self.local.looks_outside()
            || self
                .deliverer
                .as_ref()
                .is_some_and(Deliverer::looks_outside)
    }
}

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
}

/// What a config reload may change in the render loop without a restart.
#[derive(Debug, Clone)]
pub struct Retarget {
    pub targets: Vec<Target>,
    pub resync: Duration,
}

/// A target's state as at start: template compiled, last applied hash read back.
fn target_state(t: &Target, board: &Board, agents: Option<&(Key, u16)>) -> TargetState {
    let template = Template::load(t).map_err(|e| e.to_string());
    if let Err(e) = &template {
        warn!(target = %t.name, error = %e, "template does not compile; target disabled");
    }
    let local = Local::new(t);
    board.update_target(&t.name, |s| {
        s.output = t.output.display().to_string();
        s.hash = local.current_hash().map(str::to_owned);
        s.error = template.as_ref().err().cloned();
    });
    TargetState {
        config: t.clone(),
        template,
        local,
        deliverer: agents.map(|(key, port)| Deliverer::new(key.clone(), *port)),
        debounce: Debouncer::new(t.debounce),
        last_skipped: Vec::new(),
        settled: None,
        redeliver_backoff: Backoff::new(),
        redeliver_at: None,
        owed: BTreeSet::new(),
        unavailable_reason: None,
        left_out: BTreeMap::new(),
        without_certificate: None,
    }
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
            .map(|t| target_state(t, &board, agents.as_ref()))
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
            .map(|t| target_state(t, &self.board, self.agents.as_ref()))
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
        loop {
            if !std::mem::take(&mut immediate) {
                let wake = match retry_at {
                    Some(at) => at,
                    None => self
                        .targets
                        .iter()
                        .filter_map(|t| t.debounce.deadline())
                        .chain(self.targets.iter().filter_map(TargetState::retry_at))
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
                .map(|t| t.retry_at().is_some_and(|at| at <= now))
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
                    let retry = full_pass;
                    // A check or notify step can take up to its timeout: shutdown does not wait.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = pass(t, &snapshot, &self.engine, &self.board, &self.contacts, batch, role, retry).instrument(span) => {}
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

#[allow(clippy::too_many_arguments)]
async fn pass(
    t: &mut TargetState,
    snapshot: &Arc<Snapshot>,
    engine: &Engine,
    board: &Board,
    contacts: &Contacts,
    batch: Option<Batch>,
    role: Role,
    resync: bool,
) {
    let m = crate::metrics::get();
    // Due now (or moot: this instance no longer delivers); set again below if still owed.
    t.redeliver_at = None;
    // A resync looks again at what the cluster does not tell: certificate files that may
    // have appeared, hosts left out that may pass now.
    let outside = resync && t.looks_outside();
    if t.settled.as_deref() == Some(&**snapshot) && !outside {
        return;
    }
    // In cluster mode only the controller (the instance on the Raft leader) renders; the
    // others serve the agent API. Without the key every instance renders for its own node.
    if t.deliverer.is_some() && !role.is_controller() {
        return;
    }
    let name = t.config.name.clone();
    let template = match &t.template {
        Ok(template) => template,
        Err(_) => {
            report::count(&name, "template_error");
            return;
        }
    };
    let probes = t.local.probes_certificates();
    let render = |with: &BTreeSet<String>| {
        template.render_with(
            snapshot,
            &crate::render::Options {
                certificates: probes.then(|| with.clone()),
            },
        )
    };
    let started = Instant::now();
    let with = t.local.certificates();
    let rendered = render(&with);
    m.render_duration
        .with_label_values(&[name.as_str()])
        .observe(started.elapsed().as_secs_f64());
    let rendered = match rendered {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "render failed; keeping the current file");
            report::count(&name, "render_error");
            t.settled = Some(snapshot.clone());
            board.update_target(&name, |s| {
                s.last_render = Some(unix_now());
                s.error = Some(e.to_string());
            });
            return;
        }
    };
    if rendered.skipped != t.last_skipped {
        for s in &rendered.skipped {
            warn!(service = %s.service, label = %s.label, value = %s.value, reason = %s.reason,
                "service skipped: invalid label value");
        }
        t.last_skipped = rendered.skipped.clone();
    }
    m.skipped_services
        .with_label_values(&[name.as_str()])
        .set(rendered.skipped.len() as i64);

    if let Some(d) = t
        .deliverer
        .as_mut()
        .filter(|_| delivery::uses_agents(&t.config, snapshot, true))
    {
        // Through agents: each consumer node runs the one executor on its own file, with
        // a content rendered for the certificate files its proxy has.
        let consumers = delivery::consumer_nodes(&t.config, snapshot);
        let peers = crate::cluster::peers::peers(snapshot, d.port());
        let for_node = |with: &BTreeSet<String>| {
            render(with).ok().map(|r| Rendition {
                content: r.text.into_bytes(),
                tls: r.tls_hosts,
            })
        };
        let nodes = d
            .deliver(&name, &consumers, &peers, contacts, resync, &for_node)
            .await;
        let outcome = Ok(delivery::overall(&nodes));
        let retry = matches!(outcome, Ok(Outcome::CheckUnavailable(_)));
        t.settled = (!retry).then(|| snapshot.clone());
        // No consumer at all is not retried: one appearing is a Swarm change, with events.
        let owed: BTreeSet<(String, &'static str)> = nodes
            .iter()
            .filter(|n| n.owed())
            .map(|n| (n.node_id.clone(), n.label()))
            .collect();
        if owed != t.owed {
            t.redeliver_backoff.reset();
        }
        let delay = t.redeliver_backoff.delay().min(REDELIVER_MAX);
        t.redeliver_at = (!owed.is_empty()).then(|| Instant::now() + delay);
        t.owed = owed;
        let without = d.without_certificates(&rendered.tls_hosts);
        report::without_certificate(t, board, without);
        let left_out = nodes
            .iter()
            .filter_map(|n| match &n.state {
                crate::status::NodeState::Reported(r) => Some(&r.left_out),
                _ => None,
            })
            .flatten()
            .map(|l| (l.host.clone(), l.reason.clone()))
            .collect();
        report::left_out(t, board, left_out);
        let hash = matches!(&outcome, Ok(o) if o.settled())
            .then(|| crate::hash::sha256_hex(rendered.text.as_bytes()));
        report::outcome(t, board, &outcome, hash.clone(), batch, rendered.skipped);
        board.update_target(&name, |s| s.nodes = nodes);
        return;
    }
    let now = Instant::now();
    let mut applied = apply_here(
        &mut t.local,
        &rendered,
        &with,
        engine,
        snapshot,
        resync,
        now,
    )
    .await;
    if let Ok(r) = &applied {
        if r.outcome == Outcome::Rerender {
            // This node's certificate files differ from what was known: render for them.
            let with = r.certificates.clone().unwrap_or_default();
            match render(&with) {
                Ok(again) => {
                    applied =
                        apply_here(&mut t.local, &again, &with, engine, snapshot, resync, now)
                            .await;
                }
                Err(e) => warn!(error = %e, "render for the certificate files failed"),
            }
        }
    }
    if probes {
        let present = t.local.certificates();
        let without = rendered
            .tls_hosts
            .iter()
            .filter(|h| !present.contains(*h))
            .cloned()
            .collect();
        report::without_certificate(t, board, without);
    }
    if let Some(r) = applied.as_ref().ok().filter(|r| r.outcome.settled()) {
        let left_out = r
            .left_out
            .iter()
            .map(|l| (l.host.clone(), l.reason.clone()))
            .collect();
        report::left_out(t, board, left_out);
    }
    let outcome = applied.map(|r| r.outcome);
    let retry = matches!(
        outcome,
        Ok(Outcome::CheckUnavailable(_) | Outcome::Waiting | Outcome::Rerender) | Err(_)
    );
    t.settled = (!retry).then(|| snapshot.clone());
    let hash = t.local.current_hash().map(str::to_owned);
    report::outcome(t, board, &outcome, hash, batch, rendered.skipped);
}

/// `rendered` (made for the certificate files `with`) through this node's executor.
async fn apply_here(
    local: &mut Local,
    rendered: &Rendered,
    with: &BTreeSet<String>,
    engine: &Engine,
    snapshot: &Snapshot,
    resync: bool,
    now: Instant,
) -> Result<Report, crate::apply::Error> {
    let candidate = Candidate {
        content: rendered.text.as_bytes(),
        tls: &rendered.tls_hosts,
        with_certificates: with,
        resync,
    };
    local.apply(candidate, Some(engine), snapshot, now).await
}
