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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::apply::Applier;
use crate::backoff::Backoff;
use crate::cluster::agent::Key;
use crate::cluster::delivery::{self, Deliverer};
use crate::cluster::role::Role;
use crate::config::Target;
use crate::debounce::{Batch, Debouncer};
use crate::docker::Engine;
use crate::render::Template;
use crate::state::Snapshot;
use crate::status::{Board, SkippedService};
use crate::watch::Hint;

mod executor;
pub mod isolate;
pub mod plan;
mod policy;
mod report;

pub use executor::Outcome;
pub use plan::{Plan, Reach, TargetMemory, Unavailable};
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
    applier: Applier,
    /// Present when this instance has the cluster key: the agents' side of delivery.
    deliverer: Option<Deliverer>,
    debounce: Debouncer,
    last_skipped: Vec<SkippedService>,
    /// The snapshot of the last pass that needs no retry: the same cluster again (a
    /// convergence poll or resync that found nothing new) is not rendered again.
    settled: Option<Arc<Snapshot>>,
    /// Hash of the last content whose check failed.
    known_bad: Option<String>,
    /// The last check that could not run, and when to try it again.
    unavailable: Option<Unavailable>,
    check_backoff: Backoff,
    /// When the nodes an agents delivery did not reach are due again. A node whose agent
    /// comes up (its engine back, its drover task just started) sends no event of its own,
    /// so without this it would wait for the next change or resync with a stale file.
    redeliver_at: Option<Instant>,
    /// (node id, outcome) of the nodes last owed the content: when that changes (a node's
    /// agent appeared, one went away) the retry starts again from the shortest delay.
    owed: BTreeSet<(String, String)>,
    /// The reason of the last unavailable check, so a lasting outage is logged once.
    unavailable_reason: Option<String>,
    /// Hosts left out of the file in place, with the hash of the block that failed (left
    /// out again without a check while it stays the same, tried again on a resync) and
    /// nginx's message.
    left_out: BTreeMap<String, LeftOut>,
    /// What drover knows of the TLS hosts' certificate files; `None` when it cannot look
    /// (not the built-in nginx template, or a check that runs no command).
    certs: Option<Certs>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LeftOut {
    hash: String,
    reason: String,
}

#[derive(Debug, Default)]
struct Certs {
    /// Hosts whose certificate files were there when last looked at.
    present: BTreeSet<String>,
    /// TLS hosts last reported as served on port 80.
    missing: BTreeSet<String>,
    /// Hosts looked at since they became TLS hosts.
    probed: BTreeSet<String>,
}

impl TargetState {
    /// The error policy of one target: what its plan and outcome teach for next time.
    fn remember(
        &mut self,
        planned: &Plan,
        outcome: &Result<Outcome, crate::apply::Error>,
        now: Instant,
    ) {
        match (planned, outcome) {
            (Plan::Write(w), Ok(Outcome::CheckFailed(_))) => self.known_bad = Some(w.hash.clone()),
            (_, Ok(Outcome::Applied | Outcome::NotifyFailed(_))) => {
                self.known_bad = None;
                self.unavailable = None;
                self.unavailable_reason = None;
                self.check_backoff.reset();
            }
            (Plan::Write(w), Ok(Outcome::CheckUnavailable(_))) => {
                if let Some(check) = &w.check {
                    self.unavailable = Some(Unavailable {
                        reach: check.reach.clone(),
                        retry_at: now + self.check_backoff.delay(),
                    });
                }
            }
            (Plan::CheckUnavailable(on), _) => {
                self.unavailable = Some(Unavailable {
                    reach: Reach::Nobody(on.clone()),
                    retry_at: now + self.check_backoff.delay(),
                });
            }
            _ => {}
        }
    }

    /// When a check that could not run, or a delivery that did not reach every node, is
    /// due again.
    fn retry_at(&self) -> Option<Instant> {
        let check = self.unavailable.as_ref().map(|u| u.retry_at);
        check.into_iter().chain(self.redeliver_at).min()
    }
}

pub struct Reconciler {
    engine: Engine,
    targets: Vec<TargetState>,
    board: Arc<Board>,
    resync: Duration,
    agents: Option<(Key, u16)>,
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
    let applier = Applier::new(t);
    board.update_target(&t.name, |s| {
        s.output = t.output.display().to_string();
        s.hash = applier.current_hash().map(str::to_owned);
        s.error = template.as_ref().err().cloned();
    });
    TargetState {
        config: t.clone(),
        template,
        applier,
        deliverer: agents.map(|(key, port)| Deliverer::new(key.clone(), *port)),
        debounce: Debouncer::new(t.debounce),
        last_skipped: Vec::new(),
        settled: None,
        known_bad: None,
        unavailable: None,
        check_backoff: Backoff::new(),
        redeliver_at: None,
        owed: BTreeSet::new(),
        unavailable_reason: None,
        left_out: BTreeMap::new(),
        certs: probes_certificates(t).then(Certs::default),
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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
                        _ = pass(t, &snapshot, &self.engine, &self.board, batch, role, retry).instrument(span) => {}
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
            crate::cluster::contacts::global().set_peers(
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

async fn pass(
    t: &mut TargetState,
    snapshot: &Arc<Snapshot>,
    engine: &Engine,
    board: &Board,
    batch: Option<Batch>,
    role: Role,
    resync: bool,
) {
    let m = crate::metrics::get();
    // Due now (or moot: this instance no longer delivers); set again below if still owed.
    t.redeliver_at = None;
    // A resync looks again at what the cluster does not tell: certificate files that may
    // have appeared, hosts left out that may pass now.
    let outside = resync
        && (!t.left_out.is_empty()
            || t.certs
                .as_ref()
                .is_some_and(|c| c.probed.len() > c.present.len()));
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
    let started = Instant::now();
    let options = |certs: &Option<Certs>| crate::render::Options {
        certificates: certs.as_ref().map(|c| c.present.clone()),
    };
    let mut rendered = template.render_with(snapshot, &options(&t.certs));
    m.render_duration
        .with_label_values(&[name.as_str()])
        .observe(started.elapsed().as_secs_f64());
    if let (Ok(r), Some(check)) = (&rendered, &t.config.check) {
        if probe(&mut t.certs, check, engine, snapshot, &r.tls_hosts, resync).await {
            rendered = template.render_with(snapshot, &options(&t.certs));
        }
    }
    if let (Ok(r), Some(c)) = (&rendered, t.certs.as_mut()) {
        let missing: BTreeSet<String> = r
            .tls_hosts
            .iter()
            .filter(|h| !c.present.contains(*h))
            .cloned()
            .collect();
        if missing != c.missing || t.settled.is_none() {
            report::without_certificate(&name, board, &c.missing, &missing);
            c.missing = missing;
        }
    }
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

    let content = rendered.text.as_bytes();
    if let Some(d) = t
        .deliverer
        .as_mut()
        .filter(|_| delivery::uses_agents(&t.config, snapshot, true))
    {
        // Through agents: each consumer node checks its own file; the controller keeps no
        // local copy, so the local plan (and its memory) does not apply.
        let consumers = delivery::consumer_nodes(&t.config, snapshot);
        let peers = crate::cluster::peers::peers(snapshot, d.port());
        let nodes = d.deliver(&name, content, &consumers, &peers).await;
        let outcome = Ok(delivery::overall(&nodes));
        let retry = matches!(outcome, Ok(Outcome::CheckUnavailable(_)));
        t.settled = (!retry).then(|| snapshot.clone());
        // No consumer at all is not retried: one appearing is a Swarm change, with events.
        let owed: BTreeSet<(String, String)> = nodes
            .iter()
            .filter(|n| n.owed())
            .map(|n| (n.node_id.clone(), n.outcome.clone()))
            .collect();
        if owed != t.owed {
            t.check_backoff.reset();
        }
        let delay = t.check_backoff.delay().min(REDELIVER_MAX);
        t.redeliver_at = (!owed.is_empty()).then(|| Instant::now() + delay);
        t.owed = owed;
        report::outcome(t, board, &outcome, batch, rendered.skipped);
        let hash = matches!(
            outcome,
            Ok(Outcome::Applied | Outcome::NotifyFailed(_) | Outcome::Unchanged)
        )
        .then(|| crate::apply::sha256_hex(content));
        board.update_target(&name, |s| {
            s.nodes = nodes;
            if hash.is_some() {
                s.hash = hash;
            }
        });
        return;
    }
    // Hosts that failed before with the same block stay out without another check; a
    // resync tries them all again (a certificate fixed in place changes no block).
    let blocks = isolate::blocks(&rendered.text);
    let mut left: BTreeMap<String, LeftOut> = if resync {
        BTreeMap::new()
    } else {
        blocks
            .iter()
            .filter_map(|b| {
                let l = t.left_out.get(&b.host).filter(|l| l.hash == b.hash)?;
                Some((b.host.clone(), l.clone()))
            })
            .collect()
    };
    let text = if left.is_empty() {
        rendered.text.clone()
    } else {
        isolate::without(&rendered.text, &left.keys().cloned().collect())
    };
    let content = text.as_bytes();
    let memory = TargetMemory {
        current: t.applier.current_hash().map(str::to_owned),
        known_bad: t.known_bad.clone(),
        unavailable: t.unavailable.clone(),
    };
    let now = Instant::now();
    let planned = plan::plan(&t.config, snapshot, content, &memory, now);
    let mut outcome = match &planned {
        Plan::Unchanged => Ok(Outcome::Unchanged),
        Plan::KnownBad => Ok(Outcome::KnownBad),
        Plan::Wait(_) => Ok(Outcome::Waiting),
        Plan::CheckUnavailable(on) => Ok(Outcome::CheckUnavailable(format!(
            "no running container matches {on}"
        ))),
        Plan::Write(w) => {
            executor::execute(&mut t.applier, w, content, Some(engine), snapshot).await
        }
    };
    if let (Plan::Write(w), Ok(Outcome::CheckFailed(output))) = (&planned, &outcome) {
        let output = output.clone();
        outcome = leave_out_failing(
            t,
            w,
            &rendered.text,
            &text,
            output,
            &blocks,
            &mut left,
            engine,
            snapshot,
        )
        .await;
    }
    // The hosts left out stay as they were while the file in place did not change.
    let settled_file = matches!(
        outcome,
        Ok(Outcome::Applied | Outcome::NotifyFailed(_) | Outcome::Unchanged)
    );
    if settled_file {
        report::left_out(t, board, left);
    }
    t.remember(&planned, &outcome, now);
    let retry = matches!(
        outcome,
        Ok(Outcome::CheckUnavailable(_) | Outcome::Waiting) | Err(_)
    );
    t.settled = (!retry).then(|| snapshot.clone());
    report::outcome(t, board, &outcome, batch, rendered.skipped);
}

/// The check of `checked` failed with `output`: leaves out the hosts nginx blames (see
/// [`isolate`]) and checks again, at most [`isolate::MAX_EXTRA_CHECKS`] times. Returns the
/// last outcome; `left` ends as the hosts left out of the file in place.
#[allow(clippy::too_many_arguments)]
async fn leave_out_failing(
    t: &mut TargetState,
    write: &plan::Write,
    full: &str,
    checked: &str,
    mut output: String,
    full_blocks: &[isolate::Block],
    left: &mut BTreeMap<String, LeftOut>,
    engine: &Engine,
    snapshot: &Snapshot,
) -> Result<Outcome, crate::apply::Error> {
    let failed = Ok(Outcome::CheckFailed(output.clone()));
    if full_blocks.is_empty() {
        return failed;
    }
    let good = t
        .applier
        .good()
        .map(|g| isolate::blocks(&String::from_utf8_lossy(g)))
        .unwrap_or_default();
    let names = t.applier.file_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let hash_of = |host: &str| {
        full_blocks
            .iter()
            .find(|b| b.host == host)
            .map(|b| b.hash.clone())
            .unwrap_or_default()
    };
    let mut checked_blocks = isolate::blocks(checked);
    for _ in 0..isolate::MAX_EXTRA_CHECKS {
        let Some(more) = isolate::next(&checked_blocks, &good, &output, &names) else {
            break;
        };
        for (host, reason) in more {
            let hash = hash_of(&host);
            left.insert(host, LeftOut { hash, reason });
        }
        let text = isolate::without(full, &left.keys().cloned().collect());
        let hash = crate::apply::sha256_hex(text.as_bytes());
        if t.applier.current_hash() == Some(hash.as_str()) {
            return Ok(Outcome::Unchanged);
        }
        let attempt = plan::Write {
            hash,
            ..write.clone()
        };
        match executor::execute(
            &mut t.applier,
            &attempt,
            text.as_bytes(),
            Some(engine),
            snapshot,
        )
        .await
        {
            Ok(Outcome::CheckFailed(o)) => {
                output = o;
                checked_blocks = isolate::blocks(&text);
            }
            other => return other,
        }
    }
    failed
}

/// Whether drover can look up `target`'s certificate files: the built-in nginx template
/// (it knows where they are) with a check that runs a command somewhere.
fn probes_certificates(target: &Target) -> bool {
    target.builtin() == Some("nginx")
        && matches!(
            target.check,
            Some(crate::config::Action::Exec(_) | crate::config::Action::Command(_))
        )
}

/// Looks up the certificate files of TLS hosts not looked at yet (on a resync: of every
/// TLS host without them). Returns whether what is known changed for a host in `tls`.
async fn probe(
    certs: &mut Option<Certs>,
    check: &crate::config::Action,
    engine: &Engine,
    snapshot: &Snapshot,
    tls: &[String],
    resync: bool,
) -> bool {
    let Some(c) = certs.as_mut() else {
        return false;
    };
    let ask: Vec<String> = tls
        .iter()
        .filter(|h| !c.probed.contains(*h) || (resync && !c.present.contains(*h)))
        .cloned()
        .collect();
    // Hosts no longer TLS are forgotten, so they are looked at again if they come back.
    let tls_set: BTreeSet<&String> = tls.iter().collect();
    c.probed.retain(|h| tls_set.contains(h));
    c.present.retain(|h| tls_set.contains(h));
    if ask.is_empty() {
        return false;
    }
    let found = crate::apply::existing_certificates(
        check,
        Some(engine),
        snapshot,
        crate::render::CERT_DIR,
        &ask,
    )
    .await;
    match found {
        Some(Ok(found)) => {
            let mut changed = false;
            for h in ask {
                let now = found.contains(&h);
                changed |= now != c.present.contains(&h);
                if now {
                    c.present.insert(h.clone());
                } else {
                    c.present.remove(&h);
                }
                c.probed.insert(h);
            }
            changed
        }
        Some(Err(e)) => {
            // Asked again next pass; until then the hosts are served as before.
            tracing::debug!(error = %e, "cannot look up certificate files");
            false
        }
        None => false,
    }
}
