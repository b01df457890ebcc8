//! The composition root of `drover run`: the only place that knows every module.
//!
//! It connects to the engine (serving liveness while it waits), then wires the data flow
//! of DESIGN.md: `watch` → hints → `reconcile` (state → render → apply), and the webhook
//! side `http` → `hooks` → `jobs` → `update`, with the job journal chosen here. One
//! `CancellationToken` stops everything; `run` returns only after every loop has ended and
//! the HTTP server has drained. Modules below never construct one another's services.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cli::ConfigArgs;
use crate::cluster::contacts::Contacts;
use crate::cluster::role::{self, Role};
use crate::config::Config;
use crate::docker::Engine;
use crate::jobs::Journal;
use crate::reconcile::Reconciler;
use crate::status::Board;

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let hangups = crate::reload::catch_hangups();
    let shutdown = CancellationToken::new();
    // Listening from the first moment: a signal that arrives while drover starts (reads
    // the engine, loads the journal, binds) is acted on once start-up is through, not lost.
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let board = Arc::new(Board::new());
    // Who the controller is and when each peer last answered: written by heartbeats and
    // deliveries, read by health and the status page.
    let contacts = Arc::new(Contacts::default());
    // Until the engine answers and the webhook side is up, the same sockets serve health,
    // metrics and the status page (`/readyz` 503) and tell hooks to try again (503).
    let (server, switch) =
        crate::http::Server::waiting(&config.http, board.clone(), contacts.clone()).await?;
    let serving = tokio::spawn(server.run(shutdown.clone()));
    let Some(engine) = Engine::connect_waiting(&shutdown).await? else {
        let _ = serving.await;
        return Ok(ExitCode::SUCCESS);
    };
    info!(engine = %engine.host(), targets = config.targets.len(), hooks = config.hooks.len(), "drover starting");
    let notifier = crate::notifications::start(&config.notifications)?;
    board.set_notifier(notifier.clone());
    if notifier.enabled() {
        tokio::spawn(tell_started(engine.clone(), notifier.clone()));
    }

    let mut tasks = JoinSet::new();
    let (roles, role) = start_role(&config, &engine, board.clone(), &shutdown, &mut tasks).await;
    let (hint_tx, hint_rx) = tokio::sync::mpsc::channel(1024);
    tasks.spawn(crate::watch::run(
        engine.clone(),
        hint_tx,
        roles,
        shutdown.clone(),
    ));
    let key = cluster_key(&config)?;
    let certs = start_certificates(
        &config,
        &engine,
        key.as_ref(),
        &board,
        role.clone(),
        &shutdown,
        &mut tasks,
    )?;
    let mut reconciler = Reconciler::new(
        engine.clone(),
        &config.targets,
        board.clone(),
        config.resync,
        key.clone().map(|k| (k, config.cluster.listen.port())),
        contacts.clone(),
        role.clone(),
    );
    if let Some((exchange, dir)) = certs {
        reconciler = reconciler.with_certificates(exchange, dir);
    }
    let (retarget, retargets) = crate::reload::channel(&config);
    let steps = crate::state::StepAddresses::default();
    tasks.spawn(
        reconciler
            .with_retargets(retargets)
            .with_step_addresses(steps.clone())
            .run(hint_rx, shutdown.clone()),
    );

    let forward = key.clone().map(|k| {
        Arc::new(crate::cluster::forward::Forwarder::new(
            k,
            role.clone(),
            contacts.clone(),
            forward_timeout(&config.http),
        ))
    });
    let state = webhook_side(
        &config,
        engine.clone(),
        board,
        contacts.clone(),
        role.clone(),
        forward.is_some(),
        shutdown.clone(),
    )
    .await
    .context("starting the webhook intake")?
    .with_step_addresses(steps)
    .with_forward(forward);
    state.hooks.jobs().set_notifier(notifier);
    if let Some(key) = key {
        let agent = Agent {
            config: &config,
            key,
            engine: &engine,
            state: &state,
            role: role.clone(),
            contacts: contacts.clone(),
            retargets: retarget.subscribe(),
        };
        start_agent(agent, shutdown.clone(), &mut tasks).await?;
    }
    let reloader = crate::reload::Reloader::new(args, config, state.hooks.clone(), retarget);
    tasks.spawn(reloader.run(hangups, shutdown.clone()));
    tasks.spawn(state.hooks.jobs().clone().follow_role(role));
    switch.install(&state)?;

    shutdown.cancelled().await;
    info!("shutting down");
    while tasks.join_next().await.is_some() {}
    let _ = serving.await;
    Ok(ExitCode::SUCCESS)
}

/// Names this node in notifications (the engine's name for it) and tells the sinks this
/// drover started; off the start's path, which must not wait for one more engine call.
async fn tell_started(engine: Engine, notifier: crate::notifications::Notifier) {
    let node = engine
        .info()
        .await
        .ok()
        .and_then(|i| i.name)
        .unwrap_or_default();
    notifier.set_node(node.clone());
    notifier.notify(crate::notifications::Event {
        kind: crate::config::EventKind::DroverStarted,
        subject: node.clone(),
        summary: format!("drover {} started", env!("CARGO_PKG_VERSION")),
        details: serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "node": node}),
    });
}

/// The live role (`cluster::role`): asked once now, then kept current by its own task,
/// nudged by the event watcher (the returned `Notify`).
async fn start_role(
    config: &Config,
    engine: &Engine,
    board: Arc<Board>,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> (Arc<Notify>, watch::Receiver<Role>) {
    let initial = match role::probe(engine).await {
        Ok(r) => r,
        Err(e) => {
            // Standing by claims nothing; the watcher's first nudge asks again at once.
            warn!(error = %e, "cannot read the role yet; standing by");
            Role::Manager
        }
    };
    let (publisher, rx) = role::channel(initial, board);
    let nudge = Arc::new(Notify::new());
    tasks.spawn(role::run(
        engine.clone(),
        publisher,
        nudge.clone(),
        config.resync,
        shutdown.clone(),
    ));
    (nudge, rx)
}

/// The webhook side: hook secrets, registry passwords, the job journal and the job table.
/// The journal is Swarm's store (config objects) when this engine is a Swarm manager,
/// else `jobs.state_file`, else memory.
async fn webhook_side(
    config: &Config,
    engine: Engine,
    board: Arc<Board>,
    contacts: Arc<Contacts>,
    role: watch::Receiver<Role>,
    forwarding: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<crate::http::AppState> {
    let journal = match engine.inspect_swarm().await {
        Ok(_) => Journal::Swarm {
            engine: engine.clone(),
            scope: config.jobs.journal.clone(),
        },
        Err(e) => {
            debug!(error = %e, "not a swarm manager");
            if *role.borrow() == Role::Worker && !forwarding {
                warn!(
                    "swarm worker without the cluster key: webhooks are answered 503, send them to a manager"
                );
            }
            match &config.jobs.state_file {
                Some(p) => Journal::file(p.clone()),
                None => {
                    warn!(
                        "no swarm and no jobs.state_file: accepted jobs do not survive a restart"
                    );
                    Journal::Memory
                }
            }
        }
    };
    let executor = Arc::new(crate::jobs::runner::Executor::new(engine.clone(), config)?);
    let engine_for_poll = engine.clone();
    let stacks = Arc::new(crate::stacks::StackRunner::new(
        executor,
        engine,
        config,
        board.clone(),
    ));
    let hooks = crate::hooks::intake(
        config,
        stacks.clone(),
        journal,
        role.clone(),
        shutdown.clone(),
    )
    .await?;
    if config.stacks.iter().any(|s| s.poll.is_some()) {
        tokio::spawn(crate::stacks::poll::run(
            config.stacks.clone(),
            stacks,
            hooks.jobs().clone(),
            role.clone(),
            shutdown.clone(),
        ));
    }
    // Always started: a `drover.poll` label on any service opts it in, without a config.
    let poller =
        crate::poll::Poller::new(engine_for_poll, config, hooks.jobs().clone(), board.clone())?;
    tokio::spawn(poller.run(role, shutdown));
    Ok(crate::http::AppState::new(
        hooks,
        board,
        contacts,
        config.http.clone(),
    ))
}

/// drover's ACME client, when `certificates:` is configured: the manager runs on every
/// instance and orders only while it is the controller; the render loop gets the other
/// end of its exchange and the directory nodes write certificates to.
fn start_certificates(
    config: &Config,
    engine: &Engine,
    key: Option<&crate::cluster::wire::Key>,
    board: &Arc<Board>,
    role: watch::Receiver<Role>,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Option<(Arc<crate::certs::Exchange>, std::path::PathBuf)>> {
    let Some(c) = &config.certificates else {
        return Ok(None);
    };
    let Some(key) = key else {
        anyhow::bail!(
            "certificates: the account and certificates are kept sealed with the cluster key, and {} is not there",
            config.cluster.key_file.display()
        );
    };
    let Some(target) = c.target(&config.targets) else {
        anyhow::bail!("certificates: no builtin:nginx target serves the challenges");
    };
    // Read once, here: a key file that is missing or is no HMAC key stops the start, with
    // its path, rather than an account creation the CA refuses later.
    let binding = match &c.eab {
        Some(eab) => Some(
            crate::certs::acme::BindingKey::load(&eab.kid, &eab.hmac_key_file)
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let exchange = crate::certs::Exchange::new(&target.name);
    let manager = crate::certs::manager::Manager {
        config: c.clone(),
        engine: engine.clone(),
        key: key.bytes().to_vec(),
        scope: config.jobs.journal.clone(),
        exchange: exchange.clone(),
        board: board.clone(),
        role,
        binding,
    };
    info!(directory = %c.directory, target = %target.name, "certificates: drover's ACME client is on");
    tasks.spawn(manager.run(shutdown.clone()));
    Ok(Some((exchange, c.dir.clone())))
}

/// The cluster key when its file is there (cluster mode); a key file that is there but
/// cannot be read is a start-up error.
fn cluster_key(config: &Config) -> anyhow::Result<Option<crate::cluster::wire::Key>> {
    let path = &config.cluster.key_file;
    if !path.exists() {
        info!(key_file = %path.display(), "no cluster key: agent API off, targets delivered locally");
        return Ok(None);
    }
    Ok(Some(crate::cluster::wire::Key::load(path)?))
}

/// A forwarded webhook must be answered before the caller's own request times out (408):
/// the forward gets the request timeout less a second.
fn forward_timeout(http: &crate::config::Http) -> std::time::Duration {
    let second = std::time::Duration::from_secs(1);
    http.request_timeout.saturating_sub(second).max(second)
}

/// What the agent API is built from.
struct Agent<'a> {
    config: &'a Config,
    key: crate::cluster::wire::Key,
    engine: &'a Engine,
    state: &'a crate::http::AppState,
    role: watch::Receiver<Role>,
    contacts: Arc<Contacts>,
    /// Reloaded targets (SIGHUP): the agent applies what the config says now.
    retargets: watch::Receiver<crate::reconcile::Retarget>,
}

/// Serves the agent API on the cluster network (files, heartbeats, and forwarded webhooks
/// and job reads while this instance is the controller), and sends the heartbeats while
/// it is; a port clash is a start-up error.
async fn start_agent(
    a: Agent<'_>,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    use crate::cluster::{agent, contacts};
    let cluster = &a.config.cluster;
    let listener = tokio::net::TcpListener::bind(cluster.listen)
        .await
        .with_context(|| format!("cannot listen on {} (agent API)", cluster.listen))?;
    let agent = Arc::new(
        agent::Agent::new(
            crate::cluster::wire::Guard::new(a.key.clone(), cluster.max_skew),
            Some(a.engine.clone()),
            &a.config.targets,
            a.contacts.clone(),
        )
        .with_pair_dir(a.config.certificates.as_ref().map(|c| c.dir.clone())),
    );
    let app = crate::http::agent_routes(a.state, agent.clone(), a.role.clone())?;
    let (http, stop) = (a.config.http.clone(), shutdown.clone());
    let contacts = a.contacts.clone();
    tasks
        .spawn(async move { crate::http::serve_agent(listener, app, &http, contacts, stop).await });
    tasks.spawn(follow_retargets(agent, a.retargets, shutdown.clone()));
    tasks.spawn(contacts::run(a.contacts.clone(), a.key, a.role, shutdown));
    Ok(())
}

/// Gives the agent each reloaded config's targets, as the render loop gets them.
async fn follow_retargets(
    agent: Arc<crate::cluster::agent::Agent>,
    mut retargets: watch::Receiver<crate::reconcile::Retarget>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = retargets.changed() => if changed.is_err() { return },
        }
        let targets = retargets.borrow_and_update().targets.clone();
        agent.retarget(&targets).await;
        info!(targets = targets.len(), "agent targets reloaded");
    }
}

/// Cancels `shutdown` at SIGTERM or SIGINT. Both handlers are installed before this
/// returns its future, so no signal falls between start-up steps.
fn cancel_on_signal(shutdown: CancellationToken) -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let next = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot listen for a signal");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = next(term) => {}
            () = next(int) => {}
        }
        shutdown.cancel();
    }
}
