//! `tend apply [HOST…] [--dispatch MODE]`: one reconcile now, recorded as a
//! run. Exit 0 converged, 2 changes planned but not dispatched, 3 awaiting
//! confirmation or blocked by policy, 4 partial or failed, 1 error.

use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde_json::json;

use super::Loaded;
use crate::clock::{new_run_id, now_rfc3339};
use crate::core::outcome::{self, StatusInput};
use crate::core::policy::PolicyOutcome;
use crate::core::report::{
    self, EffectiveMode, FleetStatus, HostOutcome, HostStatus, OperationIntent, RunResult, Trigger,
};
use crate::core::spec::Lifecycle;
use crate::dispatch::{self, DispatchOpts, Recorder};
use crate::reconcile;
use crate::store::db::{Db, RunRow};

pub async fn run(mut loaded: Loaded, hosts: &[String]) -> Result<u8> {
    let targets = reconcile::resolve_targets(&loaded.state, hosts)?;
    let sd = &loaded.state_dir;
    sd.ensure()?;
    let _lock = super::lock_state_dir(sd)?;

    let started = SystemTime::now();
    let run_id = new_run_id(started);
    let started_at = humantime::format_rfc3339_millis(started).to_string();
    let mut db = Db::open(&sd.db_path())?;
    let managed = reconcile::load_managed(Some(&db), &targets)?;
    loaded.state = reconcile::with_prunes(&loaded.state, &managed);
    let tokens = reconcile::TokenInput::load(sd, Some(&db), loaded.state.config.token_max_ttl.0)?;
    let teardown = targets
        .iter()
        .any(|h| loaded.state.hosts[h].lifecycle == Lifecycle::Absent);
    let action = if teardown {
        report::Action::Teardown
    } else {
        report::Action::Converge
    };
    let mode = loaded.settings.dispatch;
    db.begin_run(&RunRow {
        run_id: run_id.clone(),
        started_at: started_at.clone(),
        action,
        trigger: Trigger::Cli,
        dispatch_mode: mode,
        effective_mode: EffectiveMode::Quick,
        policy_outcome: PolicyOutcome::Approved,
        policy_reason: "planning".into(),
        desired_revision: loaded.revision.clone(),
    })?;
    let rec = Arc::new(Recorder::new(run_id.clone(), db));
    rec.event(
        None,
        "run_started",
        json!({"targets": targets, "dispatch_mode": mode.as_str(), "desired_revision": loaded.revision}),
    );

    let kill = sd.kill_switch_engaged();
    let prep = reconcile::prepare(
        &loaded.state,
        &reconcile::ProbeOpts::new(&loaded.state.config, &loaded.settings.dir),
        &loaded.revision,
        targets.clone(),
        mode,
        kill,
        &tokens,
    )
    .await;
    let mut prep = prep;
    for v in &prep.token_verdicts {
        rec.event(
            None,
            "token_checked",
            json!({"file": v.file, "scope_match": v.scope_match, "refusal": v.refusal}),
        );
    }
    // A valid token is claimed (recorded as used, then moved to
    // confirm/used/) BEFORE any destructive step it authorizes runs, and only
    // when one will actually be dispatched.
    let will_destroy = prep.decision.hosts.iter().any(|d| {
        d.dispatch
            && d.allow_destructive
            && prep.plan.host(&d.host).is_some_and(|h| h.destructive > 0)
    });
    if let (Some((v, file)), Some(op)) = (&prep.token, &prep.plan.operation)
        && v.is_valid()
        && will_destroy
    {
        let claimed = crate::tokens::consume(
            sd,
            &mut rec.db(),
            file,
            op,
            &prep.plan.operation_hosts,
            &run_id,
            &now_rfc3339(),
        );
        if let Err(e) = claimed {
            // Fail closed: decide again without the token.
            rec.event(
                None,
                "token_refused",
                json!({"file": v.file, "refusal": format!("{e:#}")}),
            );
            let mut refused = v.clone();
            refused.refusal = Some(format!("{e:#}"));
            prep.token = Some((refused, file.clone()));
            prep.decision = reconcile::decide(
                &loaded.state,
                &prep.plan,
                &prep.preflight_errors,
                mode,
                kill,
                false,
            );
        } else {
            rec.event(None, "token_used", json!({"file": v.file, "operation": op}));
        }
    }
    for (host, p) in &prep.probes {
        match &p.result {
            Ok(_) => rec.event(Some(host), "probed", json!({"attempts": p.attempts})),
            Err((class, msg)) => rec.event(
                Some(host),
                "probe_failed",
                json!({"attempts": p.attempts, "class": class.as_str(), "message": msg}),
            ),
        }
    }
    for d in &prep.decision.hosts {
        rec.event(
            Some(&d.host),
            "policy",
            json!({
                "outcome": d.outcome,
                "reason": d.reason,
                "dispatch": d.dispatch,
                "not_dispatched_reason": d.not_dispatched_reason,
            }),
        );
    }

    let opts = DispatchOpts {
        step_timeout: loaded.state.config.step_timeout.0,
        concurrency: loaded.state.config.concurrency as usize,
        state: sd.clone(),
        probe: reconcile::ProbeOpts::new(&loaded.state.config, &loaded.settings.dir),
    };
    let runs = dispatch::execute(&prep, &loaded.state, &opts, rec.clone()).await;

    // One outcome per resolved host.
    let run_blocked = prep.decision.outcome == PolicyOutcome::PolicyBlocked
        && prep.decision.hosts.iter().all(|d| !d.dispatch)
        && mode == crate::core::spec::DispatchMode::Canary;
    let mut outcomes: Vec<HostOutcome> = Vec::new();
    for d in &prep.decision.hosts {
        let hp = prep.plan.host(&d.host).expect("every target is planned");
        let attempts = prep.probes.get(&d.host).map(|p| p.attempts).unwrap_or(0);
        outcomes.push(outcome::host_outcome(
            hp,
            d,
            run_blocked,
            attempts,
            runs.get(&d.host),
        ));
    }
    let completed_at = now_rfc3339();
    let destroyed = outcomes.iter().flat_map(|o| &o.steps).any(|s| {
        s.destructive
            && matches!(
                s.status,
                report::StepStatus::Succeeded | report::StepStatus::Failed
            )
    });
    let confirmation = match (&prep.token, &prep.plan.operation) {
        (Some((v, _)), Some(op)) => Some(report::Confirmation {
            operation: op.clone(),
            hosts: prep.plan.operation_hosts.clone(),
            token_file: v.file.clone(),
            scope_match: v.scope_match,
            reason: v.doc.as_ref().map(|d| d.reason.clone()),
            refusal: v.refusal.clone(),
        }),
        _ => None,
    };
    let result = RunResult {
        schema_version: report::SCHEMA_VERSION,
        run_id: run_id.clone(),
        operation_intent: OperationIntent {
            action,
            trigger: Trigger::Cli,
            target_hosts: targets.clone(),
            requested_by: loaded.settings.requested_by.clone(),
        },
        desired_revision: loaded.revision.clone(),
        effective_mode: if destroyed {
            EffectiveMode::Full
        } else {
            EffectiveMode::Quick
        },
        dispatch_mode: mode,
        policy_outcome: prep.decision.outcome,
        policy_reason: prep.decision.reason.clone(),
        blast_radius: targets.clone(),
        execution_outcome: outcome::execution_outcome(&outcomes),
        execution_started_at: started_at,
        execution_completed_at: completed_at.clone(),
        confirmation,
        host_outcomes: outcomes,
    };
    rec.event(
        None,
        "run_finished",
        json!({"execution_outcome": result.execution_outcome, "policy_outcome": result.policy_outcome}),
    );

    // Managed resources: what is converged on a dispatched host is tend's.
    record_managed(&loaded, &prep, &result, &rec, &completed_at)?;

    let result_json = serde_json::to_string_pretty(&result)?;
    rec.db().finish_run(&result, &result_json)?;
    sd.write_run_artifacts(&run_id, &result, &prep.plan.to_json(), &rec.take_timeline())?;

    // Status files.
    let confirm_cmd = super::confirm_command(&loaded.settings);
    for o in &result.host_outcomes {
        let prev = sd.read_status(&o.host).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "previous status unreadable; starting afresh");
            None
        });
        let probe = prep.probes.get(&o.host);
        let status = outcome::next_status(StatusInput {
            prev,
            host: &o.host,
            lifecycle: loaded.state.hosts[&o.host].lifecycle,
            plan: &prep.plan,
            outcome: o,
            reached: probe.is_some_and(|p| p.result.is_ok()),
            probe_at: probe.map(|p| p.at.as_str()).unwrap_or(&completed_at),
            revision: &loaded.revision,
            run_id: &run_id,
            now: &completed_at,
            confirm_cmd: &confirm_cmd,
            token_refusal: prep
                .token
                .as_ref()
                .and_then(|(v, _)| v.refusal.as_ref().map(|r| format!("{}: {r}", v.file))),
        });
        sd.write_status(&status)?;
    }
    write_fleet(&loaded, &completed_at)?;

    let code = outcome::apply_exit_code(&prep.decision, &result.host_outcomes);
    if loaded.settings.json {
        let mut out = std::io::stdout().lock();
        out.write_all(result_json.as_bytes())?;
        writeln!(out)?;
    } else {
        print!(
            "{}",
            summary(&result, sd.run_dir(&run_id).display().to_string())
        );
    }
    Ok(code)
}

fn record_managed(
    loaded: &Loaded,
    prep: &reconcile::Prepared,
    result: &RunResult,
    rec: &Recorder,
    at: &str,
) -> Result<()> {
    let mut db = rec.db();
    for o in &result.host_outcomes {
        if o.dispatch_status != report::DispatchStatus::Dispatched
            && o.outcome != report::HostOutcomeKind::NoChange
        {
            continue;
        }
        let host = &loaded.state.hosts[&o.host];
        let Some(hp) = prep.plan.host(&o.host) else {
            continue;
        };
        for r in &host.resources {
            let step = hp.steps.iter().zip(&o.steps).find(|(s, _)| s.id == r.id);
            let converged = match step {
                None => true,
                Some((_, so)) => so.status == report::StepStatus::Succeeded,
            };
            let gone = r.state().is_absent() || host.lifecycle == Lifecycle::Absent || r.pruned;
            if converged && gone {
                db.remove_managed(&o.host, &r.id)?;
            } else if converged {
                let spec = serde_json::to_string(&r.spec)?;
                db.upsert_managed(
                    &o.host,
                    &r.id,
                    r.kind(),
                    r.key().1,
                    &spec,
                    &result.run_id,
                    at,
                )?;
            }
        }
    }
    Ok(())
}

/// `status/fleet.json` from every inventory host's status file.
pub fn write_fleet(loaded: &Loaded, now: &str) -> Result<()> {
    let sd = &loaded.state_dir;
    let mut statuses = Vec::new();
    for name in loaded.state.hosts.keys() {
        let s = sd
            .read_status(name)
            .with_context(|| format!("reading status of host `{name}`"))?
            .unwrap_or_else(|| HostStatus::new(name.clone(), now));
        statuses.push(s);
    }
    sd.write_fleet(&FleetStatus::from_statuses(now, statuses.iter()))?;
    Ok(())
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
