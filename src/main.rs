use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use drover::cli::{Cli, Command, ConfigArgs, LogFormat};
use drover::config::Config;
use drover::docker::Engine;
use drover::reconcile::Reconciler;
use drover::render::Template;
use drover::status::Board;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        // Small boards: two workers are plenty for an I/O-bound daemon.
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drover: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => run(args).await,
        Command::Render { args, target } => render_once(args, target).await,
        Command::Check(args) => check(args),
        Command::Healthcheck { url } => Ok(healthcheck(&url)),
    }
}

async fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let shutdown = CancellationToken::new();
    let board = Arc::new(Board::new());
    let engine = {
        // Until the engine answers, only liveness and metrics are served: /readyz says 503.
        let listener = bind(&config).await?;
        let waiting = CancellationToken::new();
        let server = tokio::spawn(drover::http::serve_waiting(listener, waiting.clone()));
        let engine = tokio::select! {
            engine = Engine::connect_waiting(&shutdown) => engine?,
            _ = wait_for_signal() => None,
        };
        waiting.cancel();
        let _ = server.await;
        match engine {
            Some(engine) => engine,
            None => return Ok(ExitCode::SUCCESS),
        }
    };
    info!(engine = %engine.host(), targets = config.targets.len(), hooks = config.hooks.len(), "drover starting");
    let (hint_tx, hint_rx) = tokio::sync::mpsc::channel(1024);

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(drover::watch::run(
        engine.clone(),
        hint_tx,
        shutdown.clone(),
    ));
    let reconciler = Reconciler::new(
        engine.clone(),
        &config.targets,
        board.clone(),
        config.resync,
    );
    tasks.spawn(reconciler.run(hint_rx, shutdown.clone()));
    serve_http(&config, engine, board, shutdown.clone(), &mut tasks).await?;

    wait_for_signal().await;
    info!("shutting down");
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(ExitCode::SUCCESS)
}

async fn serve_http(
    config: &Config,
    engine: Engine,
    board: Arc<Board>,
    shutdown: CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let state = drover::hooks::Service::start(config, engine, board, shutdown.clone())
        .await
        .context("starting the webhook intake")?;
    let listener = bind(config).await?;
    tasks.spawn(async move {
        if let Err(e) = drover::http::serve_listener(listener, state, shutdown).await {
            error!(error = %e, "http server stopped");
        }
    });
    Ok(())
}

/// A port clash is a start-up error, not a log line.
async fn bind(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http.listen))
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

async fn render_once(args: ConfigArgs, target: Option<String>) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let target = match &target {
        Some(name) => config
            .targets
            .iter()
            .find(|t| &t.name == name)
            .with_context(|| format!("no target named {name:?}"))?,
        None => config
            .targets
            .first()
            .context("the config has no targets")?,
    };
    let template = Template::load(target)?;
    let engine = Engine::connect().await?;
    let snapshot = drover::state::fetch(&engine).await?;
    let rendered = template.render(&snapshot)?;
    for s in &rendered.skipped {
        tracing::warn!(service = %s.service, label = %s.label, value = %s.value, reason = %s.reason,
            "service skipped: invalid label value");
    }
    print!("{}", rendered.text);
    Ok(ExitCode::SUCCESS)
}

fn check(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let mut ok = true;
    for t in &config.targets {
        if let Err(e) = Template::load(t) {
            eprintln!("drover: target {}: {e}", t.name);
            ok = false;
        }
    }
    for h in &config.hooks {
        for path in h.token_file.iter().chain(&h.secret_file) {
            if let Err(e) = drover::config::read_secret(path) {
                eprintln!(
                    "drover: hook {}: cannot read {}: {e}",
                    h.name,
                    path.display()
                );
                ok = false;
            }
        }
    }
    if ok {
        println!(
            "config ok: {} targets, {} hooks",
            config.targets.len(),
            config.hooks.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

/// A plain HTTP/1.0 GET over TCP: the runtime image has no curl.
fn healthcheck(url: &str) -> ExitCode {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let timeout = std::time::Duration::from_secs(3);
    let result = (|| -> std::io::Result<String> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })();
    match result {
        Ok(answer) if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") => {
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!("drover: unhealthy: {}", answer.lines().next().unwrap_or(""));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("drover: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}
