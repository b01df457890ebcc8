//! One target's reconcile, shaped like kube-runtime's controller: [`reconcile`] looks at
//! one snapshot and says what to do next ([`Action`]); [`error_policy`] decides the same
//! for a failure, from the error's kind. The loop (`super`) owns the schedule and keeps
//! one next look per target.
//!
//! Invariants: the controller renders once per snapshot and certificate set; the file is
//! carried out by the one executor, here ([`Local::apply`]) or on each consumer node
//! through its agent; a target settled on a snapshot is not rendered again for the same
//! snapshot unless a resync has something to look at that the cluster does not tell
//! (hosts left out, certificate files missing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{report, unix_now};
use crate::apply::{Candidate, Local, Outcome, Report};
use crate::backoff::Backoff;
use crate::certs::{Exchange, Published};
use crate::cluster::contacts::Contacts;
use crate::cluster::delivery::{self, Deliverer, Rendition};
use crate::cluster::wire::Key;
use crate::config::Target;
use crate::debounce::{Batch, Debouncer};
use crate::docker::Engine;
use crate::render::{Rendered, Template};
use crate::role::Role;
use crate::state::Snapshot;
use crate::status::{Board, NodeState, SkippedService};
use crate::tls::Pair;

/// The longest wait before a node the last delivery did not reach is tried again. A node
/// that comes back (its engine restarted) looks the same to the controller as one still
/// away until its agent answers, so the backoff alone would grow to its 30 s ceiling while
/// it was down and keep the returning node's file stale that long; a try costs one
/// connection attempt of at most 3 s per owed node.
const REDELIVER_MAX: Duration = Duration::from_secs(5);

/// What the loop does next with a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Settled on this snapshot: look again on the next change or resync.
    AwaitChange,
    /// Look again at this instant, changed or not (a check that could not run, a node
    /// still owed the file, a write that failed).
    RequeueAt(Instant),
}

/// Why a reconcile produced no file to carry out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The template did not compile at start or reload: the target waits for a reload.
    #[error("template does not compile: {0}")]
    Template(String),
    /// The snapshot does not render (a template error at render time).
    #[error("render failed: {0}")]
    Render(String),
    /// The file could not be written on this node.
    #[error(transparent)]
    Apply(#[from] crate::apply::Error),
}

/// What a reconcile reads besides the target and the snapshot.
pub struct Ctx<'a> {
    /// `None` in unit tests: steps that need the engine report it unavailable.
    pub engine: Option<&'a Engine>,
    pub board: &'a Board,
    pub contacts: &'a Contacts,
    pub role: Role,
    /// A full pass: look again at what the cluster does not tell.
    pub resync: bool,
    /// The change batch that made the target due, if any (for the apply lag metric).
    pub batch: Option<Batch>,
}

pub(super) struct TargetState {
    pub(super) config: Target,
    template: Result<Template, String>,
    /// This node's file of the target: the one executor, also every agent's.
    local: Local,
    /// Present when this instance has the cluster key: the agents' side of delivery.
    deliverer: Option<Deliverer>,
    pub(super) debounce: Debouncer,
    last_skipped: Vec<SkippedService>,
    /// The snapshot of the last reconcile that asked for no look before the next change.
    pub(super) settled: Option<Arc<Snapshot>>,
    /// The one next look the last reconcile asked for ([`Action::RequeueAt`]).
    pub(super) next_look: Option<Instant>,
    /// Paces retries after write errors and of nodes still owed the file.
    backoff: Backoff,
    /// (node id, outcome) of the nodes last owed the content: when that changes (a node's
    /// agent appeared, one went away) the retry starts again from the shortest delay.
    owed: BTreeSet<(String, &'static str)>,
    /// The reason of the last unavailable check, so a lasting outage is logged once.
    pub(super) unavailable_reason: Option<String>,
    /// Hosts left out as last reported, so each change is logged once.
    pub(super) left_out: BTreeMap<String, String>,
    /// TLS hosts last reported as served on port 80 (on some node); `None`: not yet.
    pub(super) without_certificate: Option<BTreeSet<String>>,
    /// The target that serves drover's ACME challenges and delivers its certificates.
    pub(super) acme: Option<Acme>,
}

/// The ACME side of a target: what the certificate manager publishes, and what this
/// target last rendered of it.
pub(super) struct Acme {
    exchange: Arc<Exchange>,
    /// Where this node writes the certificates (`certificates.dir`).
    dir: PathBuf,
    /// The generation of the published tokens and certificates last rendered.
    rendered: u64,
}

impl TargetState {
    /// Whether a resync has something to look at again that the cluster does not tell.
    fn looks_outside(&self) -> bool {
        self.local.looks_outside()
            || self
                .deliverer
                .as_ref()
                .is_some_and(Deliverer::looks_outside)
    }

    /// Keeps what `action` asks of the loop.
    pub(super) fn settle(&mut self, snapshot: &Arc<Snapshot>, action: Action) {
        match action {
            Action::AwaitChange => {
                self.settled = Some(snapshot.clone());
                self.next_look = None;
            }
            Action::RequeueAt(at) => {
                self.settled = None;
                self.next_look = Some(at);
            }
        }
    }
}

/// A target's state as at start: template compiled, last applied hash read back.
pub(super) fn target_state(
    t: &Target,
    board: &Board,
    agents: Option<&(Key, u16)>,
    certs: Option<&(Arc<Exchange>, PathBuf)>,
) -> TargetState {
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
        next_look: None,
        backoff: Backoff::new(),
        owed: BTreeSet::new(),
        unavailable_reason: None,
        left_out: BTreeMap::new(),
        without_certificate: None,
        acme: certs
            .filter(|(x, _)| x.target == t.name)
            .map(|(exchange, dir)| Acme {
                exchange: exchange.clone(),
                dir: dir.clone(),
                rendered: 0,
            }),
    }
}

/// Renders `t` for `snapshot` and carries the file out, here or on every consumer node.
pub(super) async fn reconcile(
    t: &mut TargetState,
    snapshot: &Arc<Snapshot>,
    ctx: &Ctx<'_>,
) -> Result<Action, Error> {
    let outside = ctx.resync && t.looks_outside();
    let published: Option<Published> = t
        .acme
        .as_ref()
        .map(|a| a.exchange.published.borrow().clone());
    let generation = published.as_ref().map_or(0, |p| p.generation);
    let republish = t.acme.as_ref().is_some_and(|a| a.rendered != generation);
    if t.settled.as_deref() == Some(&**snapshot) && !outside && !republish {
        return Ok(Action::AwaitChange);
    }
    // In cluster mode only the controller (the instance on the Raft leader) renders; the
    // others serve the agent API. Without the key every instance renders for its own node.
    if t.deliverer.is_some() && !ctx.role.is_controller() {
        return Ok(Action::AwaitChange);
    }
    let template = t
        .template
        .as_ref()
        .map_err(|e| Error::Template(e.clone()))?;
    let name = t.config.name.clone();
    let m = crate::metrics::get();
    let probes = t.local.probes_certificates();
    let (challenges, fingerprints) = published
        .as_ref()
        .map(|p| (p.challenges(), p.fingerprints()))
        .unwrap_or_default();
    let pairs: Vec<Arc<Pair>> = published
        .as_ref()
        .map(|p| p.pairs.values().cloned().collect())
        .unwrap_or_default();
    let render = |with: &BTreeSet<String>| {
        template.render_with(
            snapshot,
            &crate::render::Options {
                certificates: probes.then(|| with.clone()),
                challenges: challenges.clone(),
                fingerprints: fingerprints.clone(),
            },
        )
    };
    let started = Instant::now();
    let with = t.local.certificates();
    let rendered = render(&with);
    m.render_duration
        .with_label_values(&[name.as_str()])
        .observe(started.elapsed().as_secs_f64());
    let rendered = rendered.map_err(|e| Error::Render(e.to_string()))?;
    if let Some(a) = &mut t.acme {
        a.exchange.wanted.send_if_modified(|w| {
            let changed = *w != rendered.wanted;
            if changed {
                w.clone_from(&rendered.wanted);
            }
            changed
        });
        a.rendered = generation;
    }
    if rendered.skipped != t.last_skipped {
        for s in &rendered.skipped {
            warn!(service = %s.service, label = %s.label, value = %s.value, reason = %s.reason,
                "service skipped");
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
        // The render above is already the one for nodes whose files match `with` (most of
        // them): only another set of certificate files costs a render.
        // Sealed once per pass for every node: the overlay may not be encrypted.
        let sealed: Vec<String> = pairs
            .iter()
            .filter_map(|p| crate::certs::exchange::seal_pair(d.key().bytes(), p).ok())
            .collect();
        let first = Rendition {
            content: rendered.text.clone().into_bytes(),
            tls: rendered.tls_hosts.clone(),
            pairs: sealed.clone(),
        };
        let for_node = |set: &BTreeSet<String>| {
            if *set == with {
                return Some(first.clone());
            }
            render(set).ok().map(|r| Rendition {
                content: r.text.into_bytes(),
                tls: r.tls_hosts,
                pairs: sealed.clone(),
            })
        };
        let nodes = d
            .deliver(
                &name,
                &consumers,
                &peers,
                ctx.contacts,
                ctx.resync,
                &for_node,
            )
            .await;
        let without = d.without_certificates(&rendered.tls_hosts);
        let outcome = delivery::overall(&nodes);
        // Every node that runs the proxy: none while they start (a node whose nginx is on
        // its way is not in `nodes` yet).
        if outcome.settled()
            && !nodes.is_empty()
            && !delivery::consumers_starting(&t.config, snapshot)
        {
            served(t, generation);
        }
        // No consumer at all is not retried: one appearing is a Swarm change, with events.
        let owed: BTreeSet<(String, &'static str)> = nodes
            .iter()
            .filter(|n| n.owed())
            .map(|n| (n.node_id.clone(), n.label()))
            .collect();
        if owed != t.owed {
            t.backoff.reset();
        }
        let action = if owed.is_empty() {
            Action::AwaitChange
        } else {
            Action::RequeueAt(Instant::now() + t.backoff.delay().min(REDELIVER_MAX))
        };
        t.owed = owed;
        report::without_certificate(t, ctx.board, without);
        let left_out = nodes
            .iter()
            .filter_map(|n| match &n.state {
                NodeState::Reported(r) => Some(&r.left_out),
                _ => None,
            })
            .flatten()
            .map(|l| (l.host.clone(), l.reason.clone()))
            .collect();
        report::left_out(t, ctx.board, left_out);
        let hash = outcome
            .settled()
            .then(|| crate::hash::sha256_hex(rendered.text.as_bytes()));
        report::outcome(t, ctx.board, &outcome, hash, ctx.batch, rendered.skipped);
        ctx.board.update_target(&name, |s| s.nodes = nodes);
        return Ok(action);
    }

    let now = Instant::now();
    let here = Here {
        pairs: &pairs,
        dir: t.acme.as_ref().map(|a| a.dir.clone()),
        now,
    };
    let mut applied = apply_here(&mut t.local, snapshot, &rendered, &with, ctx, &here).await;
    if let Ok(r) = &applied {
        if r.outcome == Outcome::Rerender {
            // This node's certificate files differ from what was known: render for them.
            let with = r.certificates.clone().unwrap_or_default();
            let again = render(&with).map_err(|e| Error::Render(e.to_string()))?;
            applied = apply_here(&mut t.local, snapshot, &again, &with, ctx, &here).await;
        }
    }
    if applied.as_ref().is_ok_and(|r| r.outcome.settled())
        && !delivery::consumers_starting(&t.config, snapshot)
    {
        served(t, generation);
    }
    if probes {
        let present = t.local.certificates();
        let without = rendered
            .tls_hosts
            .iter()
            .filter(|h| !present.contains(*h))
            .cloned()
            .collect();
        report::without_certificate(t, ctx.board, without);
    }
    let report = applied?;
    if report.outcome.settled() {
        let left_out = report
            .left_out
            .iter()
            .map(|l| (l.host.clone(), l.reason.clone()))
            .collect();
        report::left_out(t, ctx.board, left_out);
    }
    let action = match &report.outcome {
        o if o.owed() => Action::RequeueAt(
            t.local
                .retry_at()
                .unwrap_or_else(|| Instant::now() + Backoff::START),
        ),
        _ => Action::AwaitChange,
    };
    let hash = t.local.current_hash().map(str::to_owned);
    report::outcome(
        t,
        ctx.board,
        &report.outcome,
        hash,
        ctx.batch,
        rendered.skipped,
    );
    Ok(action)
}

/// What to do after a reconcile failed, from the error's kind: a template that does not
/// compile or a snapshot that does not render waits for the next change (the same
/// snapshot renders the same); a file that could not be written is tried again after a
/// backoff (a full disk, a volume not mounted yet).
pub(super) fn error_policy(t: &mut TargetState, error: &Error, ctx: &Ctx<'_>) -> Action {
    let name = t.config.name.clone();
    match error {
        Error::Template(_) => {
            report::count(&name, "template_error");
            Action::AwaitChange
        }
        Error::Render(e) => {
            warn!(error = %e, "render failed; keeping the current file");
            report::count(&name, "render_error");
            ctx.board.update_target(&name, |s| {
                s.last_render = Some(unix_now());
                s.error = Some(e.clone());
            });
            Action::AwaitChange
        }
        Error::Apply(e) => {
            report::count(&name, "write_error");
            warn!(error = %e, "cannot write config");
            ctx.board.update_target(&name, |s| {
                s.last_render = Some(unix_now());
                s.error = Some(e.to_string());
            });
            Action::RequeueAt(Instant::now() + t.backoff.delay())
        }
    }
}

/// Tells the certificate manager that every node serves `generation` of what it published.
fn served(t: &TargetState, generation: u64) {
    if let Some(a) = &t.acme {
        a.exchange.served.send_if_modified(|g| {
            let newer = generation > *g;
            if newer {
                *g = generation;
            }
            newer
        });
    }
}

/// What an apply on this node carries besides the file.
struct Here<'a> {
    pairs: &'a [Arc<Pair>],
    dir: Option<PathBuf>,
    now: Instant,
}

/// `rendered` (made for the certificate files `with`) through this node's executor.
async fn apply_here(
    local: &mut Local,
    snapshot: &Snapshot,
    rendered: &Rendered,
    with: &BTreeSet<String>,
    ctx: &Ctx<'_>,
    here: &Here<'_>,
) -> Result<Report, crate::apply::Error> {
    let candidate = Candidate {
        content: rendered.text.as_bytes(),
        tls: &rendered.tls_hosts,
        with_certificates: with,
        resync: ctx.resync,
        pairs: here.pairs,
        pair_dir: here.dir.as_deref(),
    };
    local.apply(candidate, ctx.engine, snapshot, here.now).await
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Action as Step, Delivery, ExecSpec};
    use crate::state::{Own, Service, Task};

    /// A user template with two hosts, each in the built-in template's host markers.
    const TWO_HOSTS: &str =
        "# host good.test\nserver good;\n# host bad.test\nserver bad;\n# end of hosts\n";

    fn target(dir: &Path, check: Option<Step>) -> Target {
        let template = dir.join("hosts.tera");
        std::fs::write(&template, TWO_HOSTS).expect("template");
        Target {
            check,
            ..Target::new("t", &template.display().to_string(), dir.join("out.conf"))
        }
    }

    /// A check that refuses `server bad;` the way nginx does: naming the file and line.
    fn nginx_like_check() -> Step {
        let script = r#"n=$(grep -n 'server bad' "$1" | cut -d: -f1); [ -z "$n" ] || { echo "nginx: [emerg] unknown directive \"bad\" in $1:$n"; exit 1; }"#;
        Step::Command(
            ["sh", "-c", script, "sh", "{file}"]
                .map(str::to_owned)
                .into(),
        )
    }

    struct World {
        board: Board,
        contacts: Contacts,
    }

    impl World {
        fn new() -> World {
            World {
                board: Board::new(),
                contacts: Contacts::default(),
            }
        }

        fn ctx(&self, role: Role) -> Ctx<'_> {
            Ctx {
                engine: None,
                board: &self.board,
                contacts: &self.contacts,
                role,
                resync: false,
                batch: None,
            }
        }

        async fn step(&self, t: &mut TargetState, snapshot: &Arc<Snapshot>, role: Role) -> Action {
            let ctx = self.ctx(role);
            let action = match reconcile(t, snapshot, &ctx).await {
                Ok(a) => a,
                Err(e) => error_policy(t, &e, &ctx),
            };
            t.settle(snapshot, action);
            action
        }
    }

    fn requeued_within(action: Action, most: Duration) -> bool {
        matches!(action, Action::RequeueAt(at) if at <= Instant::now() + most)
    }

    #[tokio::test]
    async fn an_unchanged_cluster_settles_and_writes_nothing_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = World::new();
        let mut t = target_state(&target(dir.path(), None), &w.board, None, None);
        let snapshot = Arc::new(Snapshot::default());
        assert_eq!(
            w.step(&mut t, &snapshot, Role::Standalone).await,
            Action::AwaitChange
        );
        let out = dir.path().join("out.conf");
        assert_eq!(std::fs::read_to_string(&out).expect("file"), TWO_HOSTS);
        std::fs::write(&out, "edited by hand").expect("write");
        // The same snapshot again: settled, nothing rendered or written.
        assert_eq!(
            w.step(&mut t, &snapshot, Role::Standalone).await,
            Action::AwaitChange
        );
        assert_eq!(
            std::fs::read_to_string(&out).expect("file"),
            "edited by hand"
        );
        assert_eq!(t.settled.as_deref(), Some(&*snapshot));
        assert_eq!(t.next_look, None);
    }

    #[tokio::test]
    async fn a_host_the_check_rejects_is_left_out_and_the_others_applied_without_a_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = World::new();
        let mut t = target_state(
            &target(dir.path(), Some(nginx_like_check())),
            &w.board,
            None,
            None,
        );
        let snapshot = Arc::new(Snapshot::default());
        assert_eq!(
            w.step(&mut t, &snapshot, Role::Standalone).await,
            Action::AwaitChange
        );
        let file = std::fs::read_to_string(dir.path().join("out.conf")).expect("file");
        assert!(file.contains("server good;"), "{file}");
        assert!(!file.contains("server bad;"), "{file}");
        assert_eq!(t.left_out.keys().collect::<Vec<_>>(), ["bad.test"]);
        let shown = &w.board.summary().targets[0];
        assert_eq!(shown.left_out.len(), 1);
        assert!(
            shown.left_out[0].reason.contains("unknown directive"),
            "{shown:?}"
        );
    }

    #[tokio::test]
    async fn a_check_that_cannot_run_asks_for_a_look_after_its_backoff_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = World::new();
        let exec = Step::Exec(ExecSpec {
            service: Some("nginx".into()),
            container: None,
            label: None,
            command: vec!["nginx".into(), "-t".into()],
        });
        let mut t = target_state(&target(dir.path(), Some(exec)), &w.board, None, None);
        let snapshot = Arc::new(Snapshot::default());
        let action = w.step(&mut t, &snapshot, Role::Standalone).await;
        assert!(requeued_within(action, Backoff::START * 2), "{action:?}");
        assert!(action != Action::AwaitChange);
        assert!(!dir.path().join("out.conf").exists());
        assert_eq!(t.settled, None);
        // Before its look is due the same snapshot waits; nothing is tried.
        let again = w.step(&mut t, &snapshot, Role::Standalone).await;
        assert_eq!(again, action, "the same look, not a new backoff");
    }

    /// drover's service on node n1 (its agent at 127.0.0.1:`port`), nginx on n1 and n2.
    fn cluster(port_owner_ip: &str) -> Snapshot {
        let running = |id: &str, node: &str, ip: Option<&str>| Task {
            node_id: node.into(),
            ..Task::running(
                id,
                "s",
                ip.map(|ip| [("net".to_owned(), ip.to_owned())].into())
                    .unwrap_or_default(),
            )
        };
        Snapshot {
            swarm: true,
            node_id: "n1".into(),
            own: Some(Own {
                container_id: "c".into(),
                service: Some("drover".into()),
            }),
            services: vec![
                Service {
                    name: "drover".into(),
                    networks: vec!["net".into()],
                    tasks: vec![running("d1", "n1", Some(port_owner_ip))],
                    ..Service::default()
                },
                Service {
                    name: "nginx".into(),
                    tasks: vec![running("x1", "n1", None), running("x2", "n2", None)],
                    ..Service::default()
                },
            ],
            ..Snapshot::default()
        }
    }

    fn agents_target(dir: &Path) -> Target {
        Target {
            delivery: Delivery::Agents,
            ..target(
                dir,
                Some(Step::Exec(ExecSpec {
                    service: Some("nginx".into()),
                    container: None,
                    label: None,
                    command: vec!["nginx".into(), "-t".into()],
                })),
            )
        }
    }

    #[tokio::test]
    async fn nodes_owed_the_file_unreachable_or_without_an_agent_are_looked_at_again_within_five_seconds()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = World::new();
        // A port nobody listens on: the agent on n1 is unreachable.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let agents = (Key::from_bytes(b"k"), port);
        let mut t = target_state(&agents_target(dir.path()), &w.board, Some(&agents), None);
        let snapshot = Arc::new(cluster("127.0.0.1"));
        let action = w.step(&mut t, &snapshot, Role::Leader).await;
        assert!(requeued_within(action, REDELIVER_MAX), "{action:?}");
        let nodes = &w.board.summary().targets[0].nodes;
        let states: Vec<&NodeState> = nodes.iter().map(|n| &n.state).collect();
        assert!(
            matches!(states[..], [NodeState::Unreachable(_), NodeState::NoAgent]),
            "{nodes:?}"
        );
        // The controller keeps no copy of its own: nothing is written here.
        assert!(!dir.path().join("out.conf").exists());
        // Still owed the same way: looked at again, never later than the cap.
        for _ in 0..4 {
            let action = w.step(&mut t, &snapshot, Role::Leader).await;
            assert!(requeued_within(action, REDELIVER_MAX), "{action:?}");
        }
    }

    #[tokio::test]
    async fn an_instance_that_is_not_the_controller_renders_nothing_in_cluster_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = World::new();
        let agents = (Key::from_bytes(b"k"), 1);
        let mut t = target_state(&agents_target(dir.path()), &w.board, Some(&agents), None);
        let snapshot = Arc::new(cluster("127.0.0.1"));
        assert_eq!(
            w.step(&mut t, &snapshot, Role::Manager).await,
            Action::AwaitChange
        );
        assert!(w.board.summary().targets[0].nodes.is_empty());
    }

    #[tokio::test]
    async fn a_template_that_does_not_compile_waits_for_a_reload_and_a_write_error_backs_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = World::new();
        let broken = dir.path().join("broken.tera");
        std::fs::write(&broken, "{% if %}").expect("template");
        let t = Target::new("t", &broken.display().to_string(), dir.path().join("o"));
        let mut t = target_state(&t, &w.board, None, None);
        let snapshot = Arc::new(Snapshot::default());
        assert_eq!(
            w.step(&mut t, &snapshot, Role::Standalone).await,
            Action::AwaitChange
        );

        // An output under a file cannot be written: looked at again after a backoff.
        std::fs::write(dir.path().join("file"), "").expect("file");
        let unwritable = target(dir.path(), None);
        let unwritable = Target {
            output: dir.path().join("file").join("out.conf"),
            ..unwritable
        };
        let mut t = target_state(&unwritable, &w.board, None, None);
        let action = w.step(&mut t, &snapshot, Role::Standalone).await;
        assert!(requeued_within(action, Backoff::START * 2), "{action:?}");
        assert!(action != Action::AwaitChange);
    }
}
