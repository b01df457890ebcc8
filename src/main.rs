//! The `drover` binary: parse the command line, set up tracing, run, map the exit code.
//! Everything else is in the library; start reading at `daemon.rs`.

use std::process::ExitCode;

use clap::Parser;

use drover::cli::{self, Cli, Command, LogFormat};

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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => drover::daemon::run(args).await,
            Command::Render { args, target } => cli::render_once(args, target).await,
            Command::Check { args, strict } => cli::check(args, strict),
            Command::StackDeploy { dir } => cli::stack_deploy(dir).await,
            Command::Healthcheck { url } => Ok(cli::healthcheck(&url)),
        }
    });
    match result {
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
