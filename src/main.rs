//! The one exit path: parse arguments, set up logging, run the command, map
//! its result to an exit code.

use std::process::ExitCode;

use clap::Parser;
use tend::cli::{Cli, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    match tend::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(tend::commands::exit::ERROR)
        }
    }
}

fn init_tracing(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let level = if cli.global.quiet {
        "error"
    } else {
        match cli.global.verbose {
            // The controller is a daemon: its passes are its log.
            0 if matches!(cli.command, tend::cli::Command::Run) => "info",
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_env("TEND_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.global.log_format {
        LogFormat::Human => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}
