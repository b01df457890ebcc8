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
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cli::ConfigArgs;
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
    let board = Arc::new(Board::new());
    let Some(engine) = wait_for_engine(&config, board.clone(), &shutdown).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    info!(engine = %engine.host(), targets = config.targets.len(), hooks = config.hooks.len(), "drover starting");

    let mut tasks = JoinSet::new();
    let (hint_tx, hint_rx) = tokio::sync::mpsc::channel(1024);
    tasks.spawn(crate::watch::run(engine.clone(), hint_tx, shutdown.clone()));
    let key = cluster_key(&config)?;
    let reconciler = Reconciler::new(
        engine.clone(),
        &config.targets,
        board.clone(),
        config.resync,
        key.clone().map(|k| (k, config.cluster.listen.port())),
    );
    let (retarget, retargets) = crate::reload::channel(&config);
    tasks.spawn(
        reconciler
            .with_retargets(retargets)
            .run(hint_rx, shutdown.clone()),
    );
    if let Some(key) = key {
        start_agent(&config, key, &engine, shutdown.clone(), &mut tasks).await?;
    }

    let state = webhook_side(&config, engine, board, shutdown.clone())
        .await
        .context("starting the webhook intake")?;
    let reloader = crate::reload::Reloader::new(args, config, state.hooks.clone(), retarget);
    tasks.spawn(reloader.run(hangups, shutdown.clone()));
    // A port clash is a start-up error, not a log line.
    let server = crate::http::Server::bind(state).await?;
    tasks.spawn(server.run(shutdown.clone()));

    wait_for_signal().await;
    info!("shutting down");
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(ExitCode::SUCCESS)
}

/// Until the engine answers, only health, metrics and the status page are served:
/// `/readyz` says 503. `None` when a signal arrived first.
async fn wait_for_engine(
    config: &Config,
    board: Arc<Board>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Engine>> {
    let server = crate::http::Server::waiting(&config.http, board).await?;
    let waiting = CancellationToken::new();
    let server = tokio::spawn(server.run(waiting.clone()));
    let engine = tokio::select! {
        engine = Engine::connect_waiting(shutdown) => engine?,
        _ = wait_for_signal() => None,
    };
    waiting.cancel();
    let _ = server.await;
    Ok(engine)
}

/// The webhook side: hook secrets, registry passwords, the job journal and the job table.
/// The journal is Swarm's store (config objects) when this engine is a Swarm manager,
/// else `jobs.state_file`, else memory.
async fn webhook_side(
    config: &Config,
    engine: Engine,
    board: Arc<Board>,
    shutdown: CancellationToken,
) -> anyhow::Result<crate::http::AppState> {
    let mut worker = false;
    let journal = match engine.inspect_swarm().await {
        Ok(_) => {
            let leader = is_swarm_leader(&engine).await;
            if !leader {
                info!("not the swarm leader: pending jobs are left to the leader's instance");
            }
            Journal::Swarm {
                engine: engine.clone(),
                scope: config.jobs.journal.clone(),
                resume: leader,
            }
        }
        Err(e) => {
            debug!(error = %e, "not a swarm manager");
            worker = is_swarm_worker(&engine).await;
            if worker {
                warn!("swarm worker: webhooks are answered 503, send them to a manager");
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
    let runner = Arc::new(crate::update::Executor::new(engine, config)?);
    let hooks = crate::hooks::Service::new(config, runner, journal, shutdown).await?;
    hooks.set_worker(worker);
    Ok(crate::http::AppState::new(
        hooks,
        board,
        config.http.clone(),
    ))
}

/// Whether the local node is the Swarm Raft leader (roles come from Swarm, not from us).
async fn is_swarm_leader(engine: &Engine) -> bool {
    let Ok(info) = engine.info().await else {
        return false;
    };
    let Some(node_id) = info.swarm.and_then(|s| s.node_id) else {
        return false;
    };
    engine
        .inspect_node(&node_id)
        .await
        .ok()
        .and_then(|n| n.manager_status)
        .and_then(|m| m.leader)
        .unwrap_or(false)
}

/// Whether the local node is a Swarm worker: in a Swarm but without its API, so neither a
/// service update nor a stack deploy can run here.
async fn is_swarm_worker(engine: &Engine) -> bool {
    let Ok(info) = engine.info().await else {
        return false;
    };
    info.swarm.is_some_and(|s| {
        s.local_node_state == Some(bollard::models::LocalNodeState::ACTIVE)
            && s.control_available != Some(true)
    })
}

/// The cluster key when its file is there (cluster mode); a key file that is there but
/// cannot be read is a start-up error.
fn cluster_key(config: &Config) -> anyhow::Result<Option<crate::cluster::agent::Key>> {
    let path = &config.cluster.key_file;
    if !path.exists() {
        info!(key_file = %path.display(), "no cluster key: agent API off, targets delivered locally");
        return Ok(None);
    }
    Ok(Some(crate::cluster::agent::Key::load(path)?))
}

/// Serves the agent API on the cluster network; a port clash is a start-up error.
async fn start_agent(
    config: &Config,
    key: crate::cluster::agent::Key,
    engine: &Engine,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    use crate::cluster::agent;
    let cluster = &config.cluster;
    let listener = tokio::net::TcpListener::bind(cluster.listen)
        .await
        .with_context(|| format!("cannot listen on {} (agent API)", cluster.listen))?;
    let agent = Arc::new(agent::Agent::new(
        agent::Guard::new(key, cluster.max_skew),
        Some(engine.clone()),
        &config.targets,
    ));
    tasks.spawn(async move {
        if let Err(e) = agent::serve(listener, agent, shutdown).await {
            tracing::error!(error = %e, "agent API stopped");
        }
    });
    Ok(())
}

async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
