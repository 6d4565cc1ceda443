//! One file per subcommand, thin: resolve, call, print. Each returns the
//! process exit code; errors bubble up as `anyhow::Error` and exit 1.

pub mod schema;
pub mod validate;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Exit codes of SPEC.md section 6.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const PENDING: u8 = 2;
    pub const HELD: u8 = 3;
    pub const FAILED: u8 = 4;
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let code = match cli.command {
        Command::Validate => validate::run(&cli.global)?,
        Command::Schema => schema::run()?,
        _ => anyhow::bail!("this command is not available yet"),
    };
    Ok(ExitCode::from(code))
}
