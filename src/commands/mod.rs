//! One file per subcommand, thin: resolve, call, print. Each returns the
//! process exit code; errors bubble up as `anyhow::Error` and exit 1.

pub mod apply;
pub mod confirm;
pub mod drift;
pub mod plan;
pub mod probe;
pub mod resume;
pub mod retry;
pub mod run;
pub mod runs;
pub mod schema;
pub mod status;
pub mod suspend;
pub mod validate;

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use crate::cli::{Cli, Command, DispatchArg, Global};
use crate::core::model::{self, DesiredState};
use crate::reconcile;
use crate::settings::Settings;
use crate::store::StateDir;

/// Exit codes of SPEC.md section 6.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const PENDING: u8 = 2;
    pub const HELD: u8 = 3;
    pub const FAILED: u8 = 4;
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    let code = match &cli.command {
        Command::Validate => validate::run(g)?,
        Command::Schema => schema::run()?,
        Command::Probe { hosts, select } => with_desired(g, None, |l| {
            let hosts = reconcile::resolve_targets(&l.state, hosts, select)?;
            runtime()?.block_on(probe::run(l, &hosts))
        })?,
        Command::Plan {
            hosts,
            select,
            allow_older,
            no_diff,
        } => with_desired(g, None, |mut l| {
            l.settings.allow_older = *allow_older;
            let hosts = reconcile::resolve_targets(&l.state, hosts, select)?;
            runtime()?.block_on(plan::run(l, &hosts, !*no_diff))
        })?,
        Command::Drift { hosts, select } => with_desired(g, None, |mut l| {
            l.settings.allow_older = true;
            let hosts = reconcile::resolve_targets(&l.state, hosts, select)?;
            runtime()?.block_on(drift::run(l, &hosts))
        })?,
        Command::Apply {
            hosts,
            select,
            dispatch,
            allow_older,
            progress,
        } => with_desired(g, *dispatch, |mut l| {
            l.settings.allow_older = *allow_older;
            let hosts = reconcile::resolve_targets(&l.state, hosts, select)?;
            let stream = !g.json
                && !g.quiet
                && (*progress || std::io::IsTerminal::is_terminal(&std::io::stdout()));
            runtime()?.block_on(apply::run(l, &hosts, stream))
        })?,
        Command::Status {
            host,
            select,
            watch,
        } => status::run(g, host.as_deref(), select, *watch)?,
        Command::Runs { limit } => runs::list(g, *limit)?,
        Command::Show { run_id } => runs::show(g, run_id)?,
        Command::Run {
            listen,
            listen_public,
        } => run::run(g, *listen, *listen_public)?,
        Command::Retry { host, reason } => retry::run(g, host, reason)?,
        Command::Resume { reason } => resume::run(g, reason)?,
        Command::Suspend { hosts, reason } => suspend::suspend(g, hosts, reason)?,
        Command::Unsuspend { hosts } => suspend::unsuspend(g, hosts)?,
        Command::Man => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut buf = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
            // One page: each subcommand's options follow the main page.
            for sub in Cli::command().get_subcommands() {
                writeln!(buf, ".SH \"TEND {}\"", sub.get_name().to_uppercase())?;
                if let Some(about) = sub.get_long_about().or(sub.get_about()) {
                    writeln!(buf, "{}", about.to_string().replace('\\', "\\\\"))?;
                }
                let page =
                    clap_mangen::Man::new(sub.clone().bin_name(format!("tend {}", sub.get_name())));
                let mut synopsis = Vec::new();
                page.render_synopsis_section(&mut synopsis)?;
                buf.extend(
                    String::from_utf8_lossy(&synopsis)
                        .replace(".SH SYNOPSIS", ".PP")
                        .bytes(),
                );
                let mut options = Vec::new();
                page.render_options_section(&mut options)?;
                buf.extend(
                    String::from_utf8_lossy(&options)
                        .replace(".SH OPTIONS", ".PP")
                        .bytes(),
                );
            }
            crate::output::stdout().write_all(&buf)?;
            exit::OK
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let shell = match shell {
                crate::cli::CompletionShell::Bash => clap_complete::Shell::Bash,
                crate::cli::CompletionShell::Zsh => clap_complete::Shell::Zsh,
                crate::cli::CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tend", &mut buf);
            let mut out = crate::output::stdout();
            std::io::Write::write_all(&mut out, &buf)?;
            exit::OK
        }
        Command::Version => {
            if g.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "version": env!("CARGO_PKG_VERSION"),
                        "commit": env!("TEND_GIT_COMMIT"),
                        "build_date": env!("TEND_BUILD_DATE"),
                    })
                );
            } else {
                println!("tend {}", crate::cli::LONG_VERSION);
            }
            exit::OK
        }
        Command::Confirm {
            operation,
            pending,
            hosts,
            tags,
            exclude,
            reason,
            ttl,
        } => match operation {
            Some(op) if !*pending => confirm::run(g, op, reason, ttl.as_deref())?,
            _ => {
                let select = crate::cli::Select {
                    tags: tags.clone(),
                    exclude: exclude.clone(),
                };
                confirm::pending(g, hosts, &select, reason, ttl.as_deref())?
            }
        },
    };
    Ok(ExitCode::from(code))
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// A valid desired state with everything resolved from it.
pub struct Loaded {
    pub settings: Settings,
    pub state: DesiredState,
    pub revision: String,
    pub state_dir: StateDir,
}

/// Load and validate the desired state; on any problem print every one and
/// exit 1 without touching a host (invalid desired state never dispatches).
fn with_desired(
    g: &Global,
    flag: Option<DispatchArg>,
    f: impl FnOnce(Loaded) -> Result<u8>,
) -> Result<u8> {
    let tree = crate::source::read_tree(&g.dir)?;
    let validated = model::validate(&tree);
    if !validated.is_valid() {
        validate::print_problems(g, &validated.problems);
        eprintln!("error: the desired state is invalid; nothing was probed or dispatched");
        return Ok(exit::ERROR);
    }
    let settings = Settings::resolve(g, validated.state.config.clone(), flag)?;
    let revision = crate::source::revision(&settings.dir, &settings.state_dir, &tree);
    let state_dir = settings.state_dir()?;
    f(Loaded {
        settings,
        state: validated.state,
        revision,
        state_dir,
    })
}

/// Settings for commands that only read the state dir (no validation needed,
/// but tend.yaml may move it).
fn state_dir_of(g: &Global) -> StateDir {
    if let Some(s) = &g.state_dir {
        return StateDir::new(s.clone());
    }
    let config = crate::source::read_tree(&g.dir)
        .map(|t| model::validate(&t).state.config)
        .unwrap_or_default();
    StateDir::new(crate::settings::resolve_relative(&g.dir, &config.state_dir))
}

/// Hold the state dir's lock for as long as the returned file lives: one
/// writer (controller or apply) per state dir. The holder's PID is written in
/// the file so that a refusal can name it.
pub fn lock_state_dir(sd: &StateDir) -> Result<File> {
    let path = sd.lock_path();
    let mut f = sd.open_lock()?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            bail!(
                "another tend process (pid {}) holds the state dir lock {}; wait for it or stop it",
                pid.trim(),
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    f.set_len(0)?;
    f.rewind()?;
    write!(f, "{}", std::process::id())?;
    f.flush()?;
    Ok(f)
}

/// The pid of the tend process that holds the state dir (a running
/// controller, or an apply), if one does: a shared lock cannot be had while
/// it holds its exclusive one. Takes nothing when the lock file is missing.
pub fn state_dir_holder(sd: &StateDir) -> Option<String> {
    if !sd.lock_path().exists() {
        return None;
    }
    let mut f = sd.open_lock().ok()?;
    match f.try_lock_shared() {
        Ok(()) => None,
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            Some(pid.trim().to_string())
        }
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// The `tend confirm` command line an operator runs, with the flags needed to
/// reach the same state dir.
pub fn confirm_command(s: &Settings) -> String {
    let mut cmd = String::from("tend");
    if s.dir.as_os_str() != "./desired-state" {
        cmd.push_str(&format!(
            " --dir {}",
            crate::shell::quote(&s.dir.to_string_lossy())
        ));
    }
    if s.state_dir_given {
        cmd.push_str(&format!(
            " --state-dir {}",
            crate::shell::quote(&s.state_dir.to_string_lossy())
        ));
    }
    cmd.push_str(" confirm");
    cmd
}
