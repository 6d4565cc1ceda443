//! `tend apply [HOST…] [--dispatch MODE]`: one reconcile now, recorded as a
//! run. Exit 0 converged, 2 changes planned but not dispatched, 3 awaiting
//! confirmation or blocked by policy, 4 partial or failed, 1 error.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

use super::Loaded;
use crate::clock::now_rfc3339;
use crate::core::report::{self, RunResult, Trigger};
use crate::pass::{self, Overlay, PassInput};

pub async fn run(loaded: Loaded, hosts: &[String]) -> Result<u8> {
    let targets = hosts.to_vec();
    let sd = &loaded.state_dir;
    sd.ensure()?;
    let _lock = super::lock_state_dir(sd)?;
    // A run a crash left open on this state dir is closed first (SPEC 8.3).
    let interrupted = crate::controller::recover::interrupted_runs(sd)?;
    if !interrupted.is_empty() {
        tracing::warn!(hosts = ?interrupted, "runs left unfinished were closed as Interrupted");
    }
    let stop = stop_on_signals()?;
    let report = pass::run(PassInput {
        settings: &loaded.settings,
        state: &loaded.state,
        revision: &loaded.revision,
        state_dir: sd,
        targets,
        trigger: Trigger::Cli,
        mode: loaded.settings.dispatch,
        cache: None,
        stop: Some(stop),
        quiet_noop: false,
        fleet_scope: false,
        overlay: &Overlay::default(),
        rollout_prep: None,
    })
    .await?;
    pass::write_fleet(sd, loaded.state.hosts.keys(), &now_rfc3339())?;
    crate::store::retention::sweep_now(sd, &loaded.state.config.history);
    let result = report.result.expect("apply always records a run");
    if loaded.settings.json {
        let mut out = crate::output::stdout();
        out.write_all(serde_json::to_string_pretty(&result)?.as_bytes())?;
        writeln!(out)?;
    } else {
        let dir = report.run_dir.expect("a recorded run has a directory");
        print!("{}", summary(&result, dir.display().to_string()));
        print!("{}", awaiting(sd, &result));
    }
    Ok(report.code)
}

/// SIGINT or SIGTERM: dispatch sends nothing more, the running batch
/// finishes, and the run is closed and recorded as usual (exit 4 when
/// steps were left). A second signal exits at once; the run left open is
/// closed as `Interrupted` by the next `tend apply` or `tend run`.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = Arc::new(AtomicBool::new(false));
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::warn!(
                    "stop signal: no new steps are sent; the running ones finish and the run is recorded (a second signal exits at once)"
                );
                flag.store(true, Ordering::SeqCst);
            } else {
                tracing::error!(
                    "second stop signal: exiting now; the next tend apply or tend run closes this run as Interrupted"
                );
                std::process::exit(130);
            }
        }
    });
    Ok(stop)
}

/// The operations that wait for a token after this run, as the hosts'
/// status files say, each with the exact `tend confirm` command: what the
/// operator does next.
fn awaiting(sd: &crate::store::StateDir, result: &RunResult) -> String {
    use std::fmt::Write as _;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    for o in &result.host_outcomes {
        let Ok(Some(status)) = sd.read_status(&o.host) else {
            continue;
        };
        let Some(a) = status.awaiting_confirmation else {
            continue;
        };
        if seen.insert(a.operation.clone()) {
            let _ = writeln!(
                out,
                "awaiting confirmation: operation {} on {} ({} destructive step(s) held)\n  to approve: {}",
                a.operation,
                a.hosts.join(", "),
                a.steps.len(),
                a.command
            );
        }
    }
    out
}

fn summary(result: &RunResult, run_dir: String) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {} ({} mode): policy {:?}, execution {:?}",
        result.run_id,
        result.dispatch_mode.as_str(),
        result.policy_outcome,
        result.execution_outcome
    );
    for o in &result.host_outcomes {
        let ran = o
            .steps
            .iter()
            .filter(|s| s.status == report::StepStatus::Succeeded)
            .count();
        let _ = writeln!(
            out,
            "  {:<20} {:<22} {} step(s) run of {}{}",
            o.host,
            format!("{:?}", o.outcome),
            ran,
            o.steps.len(),
            o.reason
                .as_deref()
                .map(|r| format!(" - {r}"))
                .unwrap_or_default()
        );
        if let Some(m) = &o.last_failure_message {
            let _ = writeln!(out, "  {:<20} ! {m}", "");
        }
    }
    let _ = writeln!(out, "artifacts: {run_dir}");
    out
}
