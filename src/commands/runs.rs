//! `tend runs` (history from SQLite) and `tend show RUN_ID` (one run's
//! artifacts). Both read only. Exit 0.

use anyhow::{Result, bail};

use super::{exit, state_dir_of};
use crate::cli::Global;
use crate::store::db::Db;

pub fn list(g: &Global, limit: usize) -> Result<u8> {
    let sd = state_dir_of(g);
    let Some(db) = Db::open_read_only(&sd.db_path())? else {
        if g.json {
            println!("[]");
        } else {
            println!("no runs yet in {}", sd.root().display());
        }
        return Ok(exit::OK);
    };
    let runs = db.runs(limit)?;
    if g.json {
        let rows: Vec<_> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "run_id": r.run.run_id,
                    "started_at": r.run.started_at,
                    "completed_at": r.completed_at,
                    "action": r.run.action,
                    "trigger": r.run.trigger,
                    "dispatch_mode": r.run.dispatch_mode,
                    "policy_outcome": r.run.policy_outcome,
                    "execution_outcome": r.execution_outcome,
                    "desired_revision": r.run.desired_revision,
                    "target_hosts": r.run.target_hosts,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(exit::OK);
    }
    for r in runs {
        println!(
            "{}  {:<9} {:<8} {:<18} {:<16} {}",
            r.run.run_id,
            r.run.dispatch_mode.as_str(),
            word(&r.run.trigger),
            word(&r.run.policy_outcome),
            r.execution_outcome
                .map(|e| word(&e))
                .unwrap_or_else(|| "unfinished".into()),
            r.run.started_at
        );
    }
    Ok(exit::OK)
}

pub fn show(g: &Global, run_id: &str) -> Result<u8> {
    let sd = state_dir_of(g);
    let Some(result) = sd.read_run_result(run_id)? else {
        bail!(
            "no run `{run_id}` in {} (see `tend runs`)",
            sd.root().display()
        );
    };
    if g.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(exit::OK);
    }
    println!(
        "run {} ({}, trigger {})",
        result.run_id,
        word(&result.operation_intent.action),
        word(&result.operation_intent.trigger)
    );
    println!("  desired revision: {}", result.desired_revision);
    println!(
        "  dispatch mode:    {} (effective {})",
        result.dispatch_mode.as_str(),
        word(&result.effective_mode)
    );
    println!(
        "  policy:           {}: {}",
        word(&result.policy_outcome),
        result.policy_reason
    );
    println!(
        "  execution:        {} ({} -> {})",
        word(&result.execution_outcome),
        result.execution_started_at,
        result.execution_completed_at
    );
    for o in &result.host_outcomes {
        println!(
            "  host {}: {}, {}, {} attempt(s)",
            o.host,
            word(&o.outcome),
            word(&o.dispatch_status),
            o.attempt_count
        );
        if let Some(r) = &o.reason {
            println!("    reason: {r}");
        }
        if let (Some(c), Some(m)) = (&o.last_failure_class, &o.last_failure_message) {
            println!("    failure: {}: {m}", c.as_str());
        }
        for s in &o.steps {
            println!(
                "    {} {} {}{}{}",
                word(&s.action),
                s.id,
                word(&s.status),
                if s.destructive { " (destructive)" } else { "" },
                s.log
                    .as_deref()
                    .map(|l| format!(" log: {}", sd.root().join(l).display()))
                    .unwrap_or_default()
            );
        }
    }
    println!("  artifacts: {}", sd.run_dir(run_id).display());
    Ok(exit::OK)
}

/// An enumerated value as the documents spell it (`converge`, `cli`,
/// `not_dispatched`), never a Rust name.
fn word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}
