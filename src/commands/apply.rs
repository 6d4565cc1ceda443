//! `tend apply [HOST…] [--dispatch MODE]`: one reconcile now, recorded as a
//! run. Exit 0 converged, 2 changes planned but not dispatched, 3 awaiting
//! confirmation or blocked by policy, 4 partial or failed, 1 error.

use std::io::Write;

use anyhow::Result;

use super::Loaded;
use crate::clock::now_rfc3339;
use crate::core::report::{self, RunResult, Trigger};
use crate::pass::{self, Overlay, PassInput};
use crate::reconcile;

pub async fn run(loaded: Loaded, hosts: &[String]) -> Result<u8> {
    let targets = reconcile::resolve_targets(&loaded.state, hosts)?;
    let sd = &loaded.state_dir;
    sd.ensure()?;
    let _lock = super::lock_state_dir(sd)?;
    let report = pass::run(PassInput {
        settings: &loaded.settings,
        state: &loaded.state,
        revision: &loaded.revision,
        state_dir: sd,
        targets,
        trigger: Trigger::Cli,
        mode: loaded.settings.dispatch,
        cache: None,
        stop: None,
        quiet_noop: false,
        fleet_scope: false,
        overlay: &Overlay::default(),
    })
    .await?;
    pass::write_fleet(sd, loaded.state.hosts.keys(), &now_rfc3339())?;
    let result = report.result.expect("apply always records a run");
    if loaded.settings.json {
        let mut out = crate::output::stdout();
        out.write_all(serde_json::to_string_pretty(&result)?.as_bytes())?;
        writeln!(out)?;
    } else {
        let dir = report.run_dir.expect("a recorded run has a directory");
        print!("{}", summary(&result, dir.display().to_string()));
    }
    Ok(report.code)
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
