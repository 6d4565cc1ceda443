//! The one exit path: parse arguments, set up logging, run the command, map
//! its result to an exit code.

use std::process::ExitCode;

use clap::Parser;
use tend::cli::{Cli, LogFormat};

fn main() -> ExitCode {
    tend::alloc::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(e),
    };
    init_tracing(&cli);
    // Until the state dir's key is known, sensitive values are sealed with
    // a key of this process alone (never a guessable one).
    if let Some(key) = tend::store::random_key() {
        tend::core::set_seal_key(key);
    }
    let code = match tend::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            error(format_args!("{e:#}"));
            return ExitCode::from(tend::commands::exit::ERROR);
        }
    };
    // Output that could not be written (other than to a closed pipe, which
    // ends it quietly) is an error: the command's result was lost.
    match tend::output::finish() {
        None => code,
        Some(why) => {
            error(format_args!("writing to standard output: {why}"));
            ExitCode::from(tend::commands::exit::ERROR)
        }
    }
}

/// `--help` and `--version` print to stdout and exit 0; every usage error
/// (unknown flag, bad value, missing argument) exits 1 like every other
/// error (SPEC 8.6). clap's own code, 2, would read as "changes pending" for
/// `plan` and `apply`.
fn usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    // clap prints help and version to stdout, errors to stderr; a closed
    // pipe makes `print` fail, which leaves nothing more to say.
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(tend::commands::exit::ERROR),
    }
}

fn error(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(tend::output::Stderr, "error: {msg}");
}

fn init_tracing(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let level = if cli.global.quiet {
        "error"
    } else {
        match cli.global.verbose {
            // The controller is a daemon: its passes are its log.
            0 if matches!(cli.command, tend::cli::Command::Run { .. }) => "info",
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
        // Through `output`, like every other write: a closed stderr never panics.
        .with_writer(|| tend::output::Stderr);
    match cli.global.log_format {
        LogFormat::Human => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}
