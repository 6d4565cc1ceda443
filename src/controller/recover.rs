//! Start-up recovery: runs that began and never finished (the process was
//! killed mid-run) are closed as `Interrupted`, each with one host outcome per
//! target host built from the step attempts it recorded, and their timeline
//! from the events it recorded.
//!
//! Invariant: recovery only writes history. It resumes nothing: the hosts of
//! an interrupted run get a fresh pass (fresh probe, fresh plan, and a valid
//! token for anything destructive) like any other.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::json;

use crate::clock::now_rfc3339;
use crate::core::report::{
    self, Changes, DispatchStatus, ExecutionOutcome, HostOutcome, HostOutcomeKind, OperationIntent,
    RunResult, StepAction, StepOutcome,
};
use crate::store::StateDir;
use crate::store::db::{Db, StepAttemptRow};

/// Close every unfinished run; returns the hosts they targeted.
pub fn interrupted_runs(sd: &StateDir) -> Result<Vec<String>> {
    let mut db = Db::open(&sd.db_path())?;
    let mut hosts = Vec::new();
    for run in db.unfinished_runs()? {
        let now = now_rfc3339();
        let attempts = db.step_attempts(&run.run.run_id)?;
        let result = interrupted_result(&run.run, &attempts, &now);
        tracing::warn!(run_id = %run.run.run_id, hosts = ?run.run.target_hosts, "closing a run left unfinished: Interrupted");
        db.record_event(
            Some(&run.run.run_id),
            &now,
            None,
            "run_interrupted",
            &json!({"detected_at": now, "hosts": run.run.target_hosts}),
        )?;
        let json = serde_json::to_string_pretty(&result)?;
        db.finish_run(&result, &json)?;
        let timeline = timeline(&db, &run.run.run_id)?;
        sd.write_interrupted_run(&result, &timeline)?;
        hosts.extend(run.run.target_hosts.iter().cloned());
    }
    hosts.sort();
    hosts.dedup();
    Ok(hosts)
}

/// A run's timeline (`timeline.jsonl` lines) from the events it recorded.
pub fn timeline(db: &Db, run_id: &str) -> Result<Vec<serde_json::Value>> {
    Ok(db
        .events(run_id)?
        .into_iter()
        .map(|e| {
            let mut line = json!({"at": e.at, "kind": e.kind, "host": e.host});
            if let (serde_json::Value::Object(l), serde_json::Value::Object(d)) =
                (&mut line, e.detail)
            {
                l.extend(d);
            }
            line
        })
        .collect())
}

/// The result of a run cut short: what its step attempts show, and for
/// every target host the outcome `ExecutionFailed` with the reason.
pub fn interrupted_result(
    run: &crate::store::db::RunRow,
    attempts: &[StepAttemptRow],
    now: &str,
) -> RunResult {
    let mut by_host: BTreeMap<&str, BTreeMap<u32, Vec<&StepAttemptRow>>> = BTreeMap::new();
    for a in attempts {
        by_host
            .entry(&a.host)
            .or_default()
            .entry(a.step_index)
            .or_default()
            .push(a);
    }
    let host_outcomes = run
        .target_hosts
        .iter()
        .map(|h| {
            let steps: Vec<StepOutcome> = by_host
                .get(h.as_str())
                .map(|steps| {
                    steps
                        .values()
                        .filter_map(|tries| {
                            let last = tries.last()?;
                            Some(StepOutcome {
                                id: last.resource_id.clone(),
                                action: last.action,
                                destructive: last.destructive,
                                status: last.status,
                                attempts: tries.len() as u32,
                                log: last.log_path.clone(),
                                message: None,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut changes = Changes::default();
            for s in &steps {
                match s.action {
                    StepAction::Create => changes.create += 1,
                    StepAction::Update => changes.update += 1,
                    StepAction::Delete => changes.delete += 1,
                }
            }
            HostOutcome {
                host: h.clone(),
                outcome: HostOutcomeKind::ExecutionFailed,
                reason: Some(
                    "interrupted: tend stopped before the run finished; the next pass probes and plans afresh"
                        .into(),
                ),
                dispatch_status: if steps.is_empty() {
                    DispatchStatus::NotDispatched
                } else {
                    DispatchStatus::Dispatched
                },
                attempt_count: 0,
                last_failure_class: None,
                last_failure_message: Some("the run was interrupted".into()),
                changes,
                steps,
                corrective: 0,
                intentional: 0,
                probe_ms: None,
                apply_ms: None,
            }
        })
        .collect();
    RunResult {
        schema_version: report::SCHEMA_VERSION,
        run_id: run.run_id.clone(),
        operation_intent: OperationIntent {
            action: run.action,
            trigger: run.trigger,
            target_hosts: run.target_hosts.clone(),
            requested_by: "tend".into(),
        },
        desired_revision: run.desired_revision.clone(),
        effective_mode: run.effective_mode,
        dispatch_mode: run.dispatch_mode,
        policy_outcome: run.policy_outcome,
        policy_reason: run.policy_reason.clone(),
        blast_radius: run.target_hosts.clone(),
        execution_outcome: ExecutionOutcome::Interrupted,
        execution_started_at: run.started_at.clone(),
        execution_completed_at: now.to_string(),
        confirmation: None,
        host_outcomes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::PolicyOutcome;
    use crate::core::report::{Action, DispatchMode, EffectiveMode, StepStatus, Trigger};
    use crate::store::db::RunRow;

    fn row() -> RunRow {
        RunRow {
            run_id: "r-20261123T100000Z-abcd".into(),
            started_at: "2026-11-23T10:00:00.000Z".into(),
            action: Action::Converge,
            trigger: Trigger::Watch,
            dispatch_mode: DispatchMode::Enforced,
            effective_mode: EffectiveMode::Quick,
            policy_outcome: PolicyOutcome::Approved,
            policy_reason: "planning".into(),
            desired_revision: "rev".into(),
            target_hosts: vec!["a".into(), "b".into()],
        }
    }

    fn attempt(host: &str, idx: u32, n: u32, status: StepStatus) -> StepAttemptRow {
        StepAttemptRow {
            run_id: row().run_id,
            host: host.into(),
            step_index: idx,
            resource_id: format!("file:/x{idx}"),
            action: StepAction::Create,
            destructive: false,
            attempt: n,
            status,
            started_at: "t".into(),
            finished_at: "t".into(),
            exit_code: Some(0),
            log_path: None,
        }
    }

    #[test]
    fn one_outcome_per_target_from_the_attempts() {
        let attempts = [
            attempt("a", 0, 1, StepStatus::Failed),
            attempt("a", 0, 2, StepStatus::Succeeded),
            attempt("a", 1, 1, StepStatus::Succeeded),
        ];
        let r = interrupted_result(&row(), &attempts, "2026-11-23T10:01:00.000Z");
        assert_eq!(r.execution_outcome, ExecutionOutcome::Interrupted);
        assert_eq!(r.blast_radius, vec!["a", "b"]);
        assert_eq!(r.host_outcomes.len(), 2);
        let a = &r.host_outcomes[0];
        assert_eq!(a.dispatch_status, DispatchStatus::Dispatched);
        assert_eq!(a.steps.len(), 2);
        assert_eq!(a.steps[0].attempts, 2);
        assert_eq!(a.steps[0].status, StepStatus::Succeeded);
        assert_eq!(a.changes.create, 2);
        let b = &r.host_outcomes[1];
        assert_eq!(b.dispatch_status, DispatchStatus::NotDispatched);
        assert!(b.steps.is_empty());
        assert_eq!(b.outcome, HostOutcomeKind::ExecutionFailed);
    }

    #[test]
    fn closes_unfinished_runs_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path());
        sd.ensure().unwrap();
        let mut db = Db::open(&sd.db_path()).unwrap();
        db.begin_run(&row()).unwrap();
        db.record_step_attempt(&attempt("a", 0, 1, StepStatus::Succeeded))
            .unwrap();
        drop(db);
        let hosts = interrupted_runs(&sd).unwrap();
        assert_eq!(hosts, vec!["a", "b"]);
        let db = Db::open(&sd.db_path()).unwrap();
        assert!(db.unfinished_runs().unwrap().is_empty());
        let s = db.run(&row().run_id).unwrap().unwrap();
        assert_eq!(s.execution_outcome, Some(ExecutionOutcome::Interrupted));
        let result = sd.read_run_result(&row().run_id).unwrap().unwrap();
        assert_eq!(result.host_outcomes.len(), 2);
        // Nothing left to close the second time.
        assert!(interrupted_runs(&sd).unwrap().is_empty());
    }
}
