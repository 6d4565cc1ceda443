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
use crate::output::word;
use crate::pass::{self, Overlay, PassInput};

pub async fn run(loaded: Loaded, hosts: &[String], stream: bool) -> Result<u8> {
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
    let live = stream.then(Live::default);
    let ticker = live.as_ref().map(Live::tick_every_5s);
    let report = pass::run(PassInput {
        progress: live.as_ref().map(Live::watcher),
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
    if let Some(t) = ticker {
        t.abort();
    }
    pass::write_fleet(
        sd,
        loaded.state.hosts.keys(),
        Some(&loaded.state),
        &now_rfc3339(),
    )?;
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

/// Steps running now: (host, step index) -> (resource id, since).
type Running = std::collections::HashMap<(String, u64), (String, std::time::Instant)>;

/// `tend apply`'s live output: one line per finished step, and every 5 s a
/// line for each step running for longer than that (a slow `command` shows
/// it is alive).
#[derive(Clone, Default)]
struct Live {
    running: Arc<std::sync::Mutex<Running>>,
}

/// How long a step runs before a "still running" line says so.
const SLOW_STEP: std::time::Duration = std::time::Duration::from_secs(5);

impl Live {
    fn watcher(&self) -> crate::dispatch::Progress {
        let running = self.running.clone();
        Box::new(move |line: &serde_json::Value| {
            let host = line["host"].as_str().unwrap_or_default().to_string();
            let Some(step) = line["step"].as_u64() else {
                return;
            };
            let id = line["id"].as_str().unwrap_or_default().to_string();
            let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
            match line["kind"].as_str() {
                Some("step_started") => {
                    running.insert((host, step), (id, std::time::Instant::now()));
                }
                Some("step_finished") => {
                    let took = running
                        .remove(&(host.clone(), step))
                        .map(|(_, t)| format!(" ({:.1}s)", t.elapsed().as_secs_f64()))
                        .unwrap_or_default();
                    let status = line["status"].as_str().unwrap_or("ended");
                    let error = line["error"]
                        .as_str()
                        .map(|e| format!("\n  {:<20} ! {e}", ""))
                        .unwrap_or_default();
                    println!("  {host:<20} {status:<10} {id}{took}{error}");
                }
                _ => {}
            }
        })
    }

    fn tick_every_5s(&self) -> tokio::task::JoinHandle<()> {
        let running = self.running.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SLOW_STEP);
            every.tick().await;
            loop {
                every.tick().await;
                let running = running.lock().unwrap_or_else(|p| p.into_inner());
                let mut slow: Vec<_> = running
                    .iter()
                    .filter(|(_, (_, t))| t.elapsed() >= SLOW_STEP)
                    .collect();
                slow.sort_by(|a, b| a.0.cmp(b.0));
                for ((host, _), (id, t)) in slow {
                    println!(
                        "  {host:<20} {:<10} {id} ({}s so far)",
                        "running",
                        t.elapsed().as_secs()
                    );
                }
            }
        })
    }
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
        "run {} ({} mode): policy {}, execution {}",
        result.run_id,
        result.dispatch_mode.as_str(),
        word(&result.policy_outcome),
        word(&result.execution_outcome)
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
            word(&o.outcome),
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
        let changed: Vec<&str> = o
            .steps
            .iter()
            .filter(|s| s.status == report::StepStatus::Succeeded)
            .map(|s| s.id.as_str())
            .collect();
        if !changed.is_empty() {
            const SHOWN: usize = 10;
            let more = changed.len().saturating_sub(SHOWN);
            let _ = writeln!(
                out,
                "  {:<20} changed: {}{}",
                "",
                changed[..changed.len().min(SHOWN)].join(", "),
                if more > 0 {
                    format!(" and {more} more (tend show {})", result.run_id)
                } else {
                    String::new()
                }
            );
        }
    }
    let _ = writeln!(out, "artifacts: {run_dir}");
    out
}
