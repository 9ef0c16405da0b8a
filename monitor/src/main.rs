//! The `cgsentry` binary: parses the command line and hands over to the library.
use cgsentry::cli::{Cli, Command};
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // Logs (ours, and aya-log's records through the `log` bridge) go to stderr: plain
    // lines without a time stamp into systemd's journal (it stamps them), colours only
    // on a terminal.
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if cgsentry::preflight::stderr_is_journal() {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .without_time()
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init();
    }
    let cli = Cli::parse();
    match &cli.command {
        Command::Check(args) => return cgsentry::policy::check(args),
        Command::Explain(args) => return cgsentry::explain::explain(args),
        Command::Status(args) => return cgsentry::control::status_command(args),
        Command::Release(args) => return cgsentry::control::release_command(args),
        Command::Top(args) => {
            return match cgsentry::top::run(&args.socket, args.every) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cgsentry: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Run(_) => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cgsentry: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => cgsentry::agent::run(args).await,
            _ => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cgsentry: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
