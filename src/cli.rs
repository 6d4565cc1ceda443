//! What the user typed, and nothing else: clap types for SPEC.md section 6.
//! Resolution against the environment and tend.yaml happens in `settings`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `--version` and `tend version`: the version, the git commit and the
/// build date.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TEND_GIT_COMMIT"),
    ", built ",
    env!("TEND_BUILD_DATE"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "tend",
    version = LONG_VERSION,
    about = "GitOps reconciling controller for Linux hosts",
    long_about = "tend converges Linux hosts to the desired state committed in a directory: \
                  it probes each host, diffs, plans, holds destructive changes for a \
                  confirmation token, dispatches, and records every decision."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted before or after the subcommand.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Desired-state directory.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "./desired-state"
    )]
    pub dir: PathBuf,
    /// State directory (default: `state_dir` of tend.yaml, relative to --dir).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print documents as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Colour in output for people: `auto` colours a terminal unless
    /// NO_COLOR is set.
    #[arg(long, global = true, value_enum, default_value_t = ColorArg::Auto)]
    pub color: ColorArg,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ColorArg {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DispatchArg {
    Off,
    Canary,
    Enforced,
}

/// Host selection besides the positional names (SPEC 8.6): hosts with any
/// of the tags join the named ones; excluded hosts leave.
#[derive(Debug, Default, Args)]
pub struct Select {
    /// Hosts carrying this tag (repeatable: any of them).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Leave this host out (repeatable).
    #[arg(long = "exclude")]
    pub exclude: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and check the desired state; print `file:line:col: message` per problem.
    Validate,
    /// Print the JSON Schema of tend.yaml, inventory.yaml and host/group files.
    Schema,
    /// Probe hosts and show their actual state (changes nothing).
    Probe {
        /// Hosts to probe (default: all).
        hosts: Vec<String>,
        #[command(flatten)]
        select: Select,
    },
    /// Probe, diff, decide and plan; print the plan (changes nothing).
    Plan {
        /// Hosts to plan (default: all).
        hosts: Vec<String>,
        #[command(flatten)]
        select: Select,
        /// Plan as `apply --allow-older` would.
        #[arg(long)]
        allow_older: bool,
        /// No content diffs: no remote command beyond the probe.
        #[arg(long)]
        no_diff: bool,
    },
    /// Probe and list every corrective difference (drift) with its diff;
    /// changes nothing (exit 0 none, 2 drift found, 1 error).
    Drift {
        /// Hosts to check (default: all).
        hosts: Vec<String>,
        #[command(flatten)]
        select: Select,
    },
    /// One reconcile now, recorded as a run.
    Apply {
        /// Hosts to converge (default: all).
        hosts: Vec<String>,
        #[command(flatten)]
        select: Select,
        /// Override the dispatch mode (beats TEND_DISPATCH and tend.yaml).
        #[arg(long, value_enum)]
        dispatch: Option<DispatchArg>,
        /// Apply also to hosts that last applied a git revision this one does
        /// not descend from (revision fencing, SPEC 8.1).
        #[arg(long)]
        allow_older: bool,
        /// Stream one line per finished step even when stdout is not a
        /// terminal (on a terminal it is the default; `-q` and `--json` never).
        #[arg(long)]
        progress: bool,
    },
    /// The controller: watch, reconcile, resync, until SIGINT/SIGTERM.
    Run {
        /// Serve the read-only HTTP endpoints (/metrics, /healthz, /readyz,
        /// /api/..., /) on this address, e.g. 127.0.0.1:9100. They are
        /// unauthenticated: loopback only, unless --listen-public.
        #[arg(long, value_name = "ADDR:PORT", value_parser = crate::serve::parse_listen)]
        listen: Option<std::net::SocketAddr>,
        /// Allow --listen on a non-loopback address (put a reverse proxy with
        /// authentication in front: the endpoints have none).
        #[arg(long, requires = "listen")]
        listen_public: bool,
    },
    /// Ask the controller to reconcile a host now, clearing its backoff and
    /// crash loop (`Degraded`).
    Retry {
        /// The host.
        host: String,
        /// Why: an override of the backoff and crash loop, recorded like a
        /// confirmation (the request is kept in `retry/used/`).
        #[arg(long)]
        reason: String,
    },
    /// Print the version, git commit and build date (`--json` for a document).
    Version,
    /// Print a shell completion script: `tend completions bash > /etc/bash_completion.d/tend`.
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the manual page (roff), generated from these definitions:
    /// `tend man > /usr/local/share/man/man1/tend.1`.
    Man,
    /// Hold hosts the way the kill switch holds all: probed and reported,
    /// never dispatched, until `tend unsuspend`.
    Suspend {
        /// The hosts.
        #[arg(required = true)]
        hosts: Vec<String>,
        /// Why: shown in every status and outcome of the held hosts.
        #[arg(long)]
        reason: String,
    },
    /// Let suspended hosts be dispatched again.
    Unsuspend {
        /// The hosts.
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// Ask that a halted rollout continue from its halted wave with a
    /// fresh failure budget (taken by the next `tend apply` or `tend run` pass).
    Resume {
        /// Why: recorded with the resume.
        #[arg(long)]
        reason: String,
    },
    /// Show host status from the status files.
    Status {
        /// One host (default: the fleet).
        host: Option<String>,
        #[command(flatten)]
        select: Select,
        /// Draw the view again whenever a status file changes, until Ctrl-C.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Write a confirmation token for an operation.
    Confirm {
        /// The operation hash (full hex); or `--pending`.
        #[arg(required_unless_present = "pending", conflicts_with = "pending")]
        operation: Option<String>,
        /// One token for every pending operation that matches `--host` and
        /// `--tag` (all of them without either): each is listed, then
        /// authorized once.
        #[arg(long)]
        pending: bool,
        /// With --pending: only operations all of whose hosts are these
        /// (repeatable) or carry a `--tag`.
        #[arg(long = "host", requires = "pending")]
        hosts: Vec<String>,
        /// With --pending: hosts with any of these tags (repeatable).
        #[arg(long = "tag", requires = "pending")]
        tags: Vec<String>,
        /// With --pending: leave this host's operations out (repeatable).
        #[arg(long = "exclude", requires = "pending")]
        exclude: Vec<String>,
        /// Why this destructive change is wanted (recorded).
        #[arg(long)]
        reason: String,
        /// Token lifetime (at most token_max_ttl).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Run history from the database.
    Runs {
        /// How many runs to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One run's artifacts.
    Show { run_id: String },
}

/// The shells `tend completions` writes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks, for the whole tree and for each
    /// subcommand on its own (as `tend man` builds them).
    #[test]
    fn the_command_definitions_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
        for sub in super::Cli::command().get_subcommands() {
            sub.clone().debug_assert();
        }
    }
}
