//! One reconcile pass over some target hosts, recorded as a run: the body of
//! `tend apply` and of every controller pass. Probe, diff, plan, decide,
//! claim a token, dispatch, then record (SQLite, run artifacts, status
//! files). Printing is left to the caller.
//!
//! Invariant: a pass never dispatches when the desired state is invalid
//! (`Overlay::invalid` forces mode `off`), and every run it begins it also
//! finishes with exactly one host outcome per target host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use serde_json::json;

use crate::clock::{new_run_id, now_rfc3339};
use crate::core::model::DesiredState;
use crate::core::outcome::{self, StatusInput};
use crate::core::policy::PolicyOutcome;
use crate::core::report::{
    self, EffectiveMode, FleetStatus, HostOutcome, HostStatus, OperationIntent, Phase, RunResult,
    Trigger,
};
use crate::core::spec::{DispatchMode, Lifecycle};
use crate::dispatch::{self, DispatchOpts, Recorder};
use crate::reconcile::{self, Transports};
use crate::settings::Settings;
use crate::store::StateDir;
use crate::store::db::{Db, RunRow};

/// Open transports kept across passes (the controller's), keyed by host,
/// each with the inventory entry it was built from: a changed entry gets a
/// new transport.
#[derive(Default)]
pub struct TransportCache {
    inner: Mutex<BTreeMap<String, Cached>>,
}

/// A transport and the inventory entry (its Debug form) it was built from.
type Cached = (String, Arc<dyn crate::transport::Transport>);

impl TransportCache {
    fn fingerprint(state: &DesiredState, host: &str) -> String {
        format!("{:?}", state.hosts[host].inv)
    }

    /// The cached transports of `targets` that still match the inventory.
    fn take(&self, state: &DesiredState, targets: &[String]) -> Transports {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        targets
            .iter()
            .filter_map(|h| {
                let (fp, t) = inner.get(h)?;
                (*fp == Self::fingerprint(state, h)).then(|| (h.clone(), t.clone()))
            })
            .collect()
    }

    fn put(&self, state: &DesiredState, transports: &Transports) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (h, t) in transports {
            inner.insert(h.clone(), (Self::fingerprint(state, h), t.clone()));
        }
    }

    /// Drop the transports of hosts that left the inventory.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.inner
            .lock()
            .expect("transport cache lock")
            .retain(|h, _| keep(h));
    }
}

/// What the controller adds to a host's status beyond the pass itself.
#[derive(Clone, Debug, Default)]
pub struct Overlay {
    /// Hosts in a crash loop: `(reason, message)` for their Degraded condition.
    pub degraded: BTreeMap<String, (String, String)>,
    /// The desired state as it stands is invalid: `(its revision, the
    /// problems)`. The pass runs on the last valid state with dispatch off.
    pub invalid: Option<(String, String)>,
}

/// Everything one pass needs.
pub struct PassInput<'a> {
    pub settings: &'a Settings,
    /// The (last valid) desired state, without prunes.
    pub state: &'a DesiredState,
    /// Its revision.
    pub revision: &'a str,
    pub state_dir: &'a StateDir,
    pub targets: Vec<String>,
    pub trigger: Trigger,
    pub mode: DispatchMode,
    pub cache: Option<&'a TransportCache>,
    /// Controller shutdown: dispatch stops before its next step.
    pub stop: Option<Arc<AtomicBool>>,
    /// Record no run for a pass that finds every target host already
    /// `Running` at this revision with nothing to do (the controller's
    /// resyncs); its status still gets the new probe time.
    pub quiet_noop: bool,
    /// The pass is one of the controller's: its scope is the whole
    /// inventory, so in canary mode a pass without the canary holds its
    /// hosts back rather than being `PolicyBlocked`.
    pub fleet_scope: bool,
    pub overlay: &'a Overlay,
    /// A controller pass that starts a rollout: the fleet-wide front half
    /// that decides its hosts (SPEC 8.2: the targets with changes or not
    /// probed); None: this pass's own.
    pub rollout_prep: Option<&'a reconcile::Prepared>,
    /// Sees the run's timeline as it is recorded (`tend apply` on a terminal).
    pub progress: Option<crate::dispatch::Progress>,
}

/// What a pass did.
pub struct PassReport {
    /// The run's result, or `None` for a quiet no-op pass.
    pub result: Option<RunResult>,
    pub run_dir: Option<PathBuf>,
    /// The `tend apply` exit code for this pass.
    pub code: u8,
    /// How long each probe of the pass took (hosts whose probe ran).
    pub probed: BTreeMap<String, Duration>,
    /// The hosts the pass dispatched steps to, each with the time dispatch
    /// took (all of the pass's dispatch: one host per controller pass).
    pub applied: BTreeMap<String, Duration>,
    /// Token files judged by the pass (see `TokenResult`).
    pub tokens: Vec<(String, TokenResult)>,
}

/// What a pass made of a token file (`tend_tokens_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenResult {
    /// Claimed for the run: its destructive steps were dispatched.
    Accepted,
    /// Meant for the run's operation (or unreadable) and not valid:
    /// expired, used before, its scope or lifetime wrong, or its claim
    /// failed. A token for another operation is not judged by this pass.
    Refused,
}

impl TokenResult {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenResult::Accepted => "accepted",
            TokenResult::Refused => "refused",
        }
    }
}

/// The token files a pass refused: those meant for its operation (or
/// unreadable) that are not valid.
fn refused_tokens(prep: &reconcile::Prepared) -> Vec<(String, TokenResult)> {
    let Some(op) = &prep.plan.operation else {
        return Vec::new();
    };
    prep.token_verdicts
        .iter()
        .filter(|v| v.refusal.is_some() && v.doc.as_ref().is_none_or(|d| d.scope_of(op).is_some()))
        .map(|v| (v.file.clone(), TokenResult::Refused))
        .collect()
}

/// Wait for, and settle, the guards left armed on the target hosts (all
/// hosts at once); the events, for the run's timeline.
async fn settle_left_guards(
    sd: &StateDir,
    state: &DesiredState,
    desired_dir: &std::path::Path,
    stop: Option<Arc<AtomicBool>>,
    targets: &[String],
) -> Result<Vec<(String, String, serde_json::Value)>> {
    if !sd.db_path().exists() {
        return Ok(vec![]);
    }
    let left = crate::store::blocking(|| -> Result<Vec<_>> {
        let db = Db::open(&sd.db_path())?;
        Ok(targets
            .iter()
            .map(|h| (h.clone(), crate::guard::left_armed(&db, h)))
            .filter(|(_, g)| !g.is_empty())
            .collect())
    })?;
    if left.is_empty() {
        return Ok(vec![]);
    }
    let log = Arc::new(crate::guard::PreRun::new(crate::store::blocking(|| {
        Db::open(&sd.db_path())
    })?));
    let mut opts = reconcile::ProbeOpts::new(&state.config, desired_dir);
    // A guard's verdict rests on what is on the host now.
    opts.hash_cache = crate::probe::HashCache::Off;
    let mut set = tokio::task::JoinSet::new();
    for (host, guards) in left {
        let Some(h) = state.hosts.get(&host).cloned() else {
            continue;
        };
        let (log, opts, stop) = (log.clone(), opts.clone(), stop.clone());
        set.spawn(async move {
            let done =
                crate::guard::settle_left(&h, guards, &opts, log.as_ref(), stop.as_deref()).await;
            (host, done)
        });
    }
    let mut stopped = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((_, true)) => {}
            Ok((host, false)) => stopped.push(host),
            Err(e) => anyhow::bail!("settling a connection guard failed: {e}"),
        }
    }
    if !stopped.is_empty() {
        anyhow::bail!(
            "stopped while waiting for the connection guard of {} to come due; the host is not probed before",
            stopped.join(", ")
        );
    }
    let events = std::mem::take(&mut *log.events.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(events)
}

fn probe_times(prep: &reconcile::Prepared) -> BTreeMap<String, Duration> {
    prep.probes
        .iter()
        .filter_map(|(h, p)| Some((h.clone(), p.elapsed?)))
        .collect()
}

pub async fn run(mut input: PassInput<'_>) -> Result<PassReport> {
    let mut progress = input.progress.take();
    let sd = input.state_dir;
    // Blocking work (files, SQLite) runs where it cannot stall the
    // runtime's other tasks: timers, signals, other hosts' passes.
    let started = SystemTime::now();
    let started_at = humantime::format_rfc3339_millis(started).to_string();
    let targets = input.targets.clone();
    // Connection guards a crash or an unreachable host left armed (SPEC
    // 8.7): their hosts are not probed before the guards' time is up, and
    // what the hosts did is recorded before the pass reads its records.
    let guard_events = settle_left_guards(
        sd,
        input.state,
        &input.settings.dir,
        input.stop.clone(),
        &targets,
    )
    .await?;
    let (db, state, tokens) = crate::store::blocking(|| -> Result<_> {
        sd.ensure()?;
        let db = Db::open(&sd.db_path())?;
        let managed = reconcile::load_managed(Some(&db), &targets)?;
        let mut state = reconcile::with_prunes_for(input.state, &managed, &targets);
        // Restarts owed by earlier passes are planned again (SPEC 8.3).
        reconcile::add_owed_restarts(&mut state, Some(&db), &targets)?;
        let state = state;
        let config = &state.config;
        let tokens = reconcile::TokenInput::load(sd, Some(&db), config.token_max_ttl.0)?;
        Ok((db, state, tokens))
    })?;
    let mut db = db;
    let config = &state.config;
    let teardown = targets
        .iter()
        .any(|h| state.hosts[h].lifecycle == Lifecycle::Absent);
    let action = if teardown {
        report::Action::Teardown
    } else {
        report::Action::Converge
    };
    // Invalid desired state never dispatches.
    let mode = if input.overlay.invalid.is_some() {
        DispatchMode::Off
    } else {
        input.mode
    };
    let mut probe_opts = reconcile::ProbeOpts::new(config, &input.settings.dir);
    probe_opts.allow_older = input.settings.allow_older;
    if mode != DispatchMode::Off {
        probe_opts.hash_cache = crate::probe::HashCache::ReadWrite;
    }
    let kill = sd.kill_switch_engaged();
    let cached = input
        .cache
        .map(|c| c.take(&state, &targets))
        .unwrap_or_default();
    let mut prep = reconcile::prepare(
        &state,
        &probe_opts,
        input.revision,
        targets.clone(),
        mode,
        kill,
        &tokens,
        cached,
    )
    .await;
    if let Some(c) = input.cache {
        c.put(&state, &prep.transports);
    }
    // Suspended hosts (`tend suspend`): probed, never dispatched.
    let suspended: BTreeMap<String, String> = targets
        .iter()
        .filter_map(|h| sd.suspended(h).map(|why| (h.clone(), why)))
        .collect();
    crate::core::policy::hold_suspended(&mut prep.decision, &suspended);
    // The controller's scope is the whole inventory, one host per pass.
    let decide_fn = if input.fleet_scope {
        reconcile::decide_in_fleet
    } else {
        reconcile::decide
    };
    let decide = |prep: &reconcile::Prepared, authorized: bool| {
        let mut run = decide_fn(
            &state,
            &prep.plan,
            (&prep.preflight_errors, &prep.fences),
            mode,
            kill,
            authorized,
        );
        crate::core::policy::hold_suspended(&mut run, &suspended);
        run
    };
    if input.fleet_scope {
        let authorized = prep.token.as_ref().is_some_and(|(v, _)| v.is_valid());
        prep.decision = decide(&prep, authorized);
    }

    if input.quiet_noop
        && let Some(report) = crate::store::blocking(|| -> Result<Option<PassReport>> {
            let Some(prevs) = quiet(&input, &prep, sd) else {
                return Ok(None);
            };
            for mut s in prevs {
                if let Some(p) = prep.probes.get(&s.host) {
                    s.last_probe_at = Some(p.at.clone());
                }
                sd.write_status(&s)?;
            }
            Ok(Some(PassReport {
                result: None,
                run_dir: None,
                code: crate::commands::exit::OK,
                probed: probe_times(&prep),
                applied: BTreeMap::new(),
                tokens: Vec::new(),
            }))
        })?
    {
        return Ok(report);
    }

    let mut tokens = refused_tokens(&prep);
    let (run_id, rec, gate) = crate::store::blocking(|| -> Result<_> {
        // Begin the run. A run id is random in its last four characters; two
        // passes in one second may draw the same one, so draw again on conflict.
        let mut run_id = new_run_id(started);
        let mut tries = 0;
        loop {
            let begun = db.begin_run(&RunRow {
                run_id: run_id.clone(),
                started_at: started_at.clone(),
                action,
                trigger: input.trigger,
                dispatch_mode: mode,
                effective_mode: EffectiveMode::Quick,
                policy_outcome: PolicyOutcome::Approved,
                policy_reason: "planning".into(),
                desired_revision: input.revision.to_string(),
                target_hosts: targets.clone(),
            });
            match begun {
                Ok(()) => break,
                Err(_) if tries < 8 && db.run(&run_id)?.is_some() => {
                    tries += 1;
                    run_id = new_run_id(SystemTime::now());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let rec = Arc::new(Recorder::new(run_id.clone(), db));
        if let Some(p) = progress.take() {
            rec.set_progress(p);
        }
        rec.event(
            None,
            "run_started",
            json!({
                "targets": targets,
                "trigger": input.trigger,
                "dispatch_mode": mode.as_str(),
                "desired_revision": input.revision,
            }),
        );
        for (host, kind, detail) in &guard_events {
            rec.event(Some(host), kind, detail.clone());
        }
        if let Some((rev, problems)) = &input.overlay.invalid {
            rec.event(
                None,
                "desired_state_invalid",
                json!({"revision": rev, "problems": problems, "planned_against": input.revision}),
            );
        }
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
                tokens.push((v.file.clone(), TokenResult::Refused));
                let mut refused = v.clone();
                refused.refusal = Some(format!("{e:#}"));
                prep.token = Some((refused, file.clone()));
                prep.decision = decide(&prep, false);
            } else {
                tokens.push((v.file.clone(), TokenResult::Accepted));
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

        // The rollout (SPEC 8.2): in mode enforced, on a valid desired
        // state, when tend.yaml has one.
        let gate = match (&config.rollout, mode) {
            (Some(spec), DispatchMode::Enforced) if input.overlay.invalid.is_none() => {
                let begun = crate::rollout::begin(
                    &mut rec.db(),
                    sd,
                    spec,
                    input.state,
                    match input.rollout_prep {
                        Some(p) => (p, true),
                        None => (&prep, !input.fleet_scope),
                    },
                    input.revision,
                    &run_id,
                    &now_rfc3339(),
                );
                match begun {
                    Ok(gate) => {
                        for (kind, detail) in &gate.events {
                            rec.event(None, kind, detail.clone());
                        }
                        Some(gate)
                    }
                    Err(e) => {
                        // Fail closed: without its rollout nothing of this
                        // pass is dispatched (the run still ends).
                        let why = format!("the rollout could not be decided: {e:#}");
                        rec.event(None, "rollout_failed", json!({"reason": why}));
                        for d in &mut prep.decision.hosts {
                            if d.dispatch {
                                d.dispatch = false;
                                d.not_dispatched_reason = Some(why.clone());
                            }
                        }
                        None
                    }
                }
            }
            _ => None,
        };

        Ok((run_id, rec, gate))
    })?;

    let opts = DispatchOpts {
        step_timeout: config.step_timeout.0,
        concurrency: config.concurrency as usize,
        state: sd.clone(),
        probe: probe_opts,
        stop: input.stop.clone(),
        output_limit: config.step_output_limit,
        retries: config.retries,
        backoff: config.retry_backoff.0,
        holder: format!(
            "pid {} ({}, run {run_id}) with state dir {} on {}, since {}",
            std::process::id(),
            if input.fleet_scope {
                "tend run"
            } else {
                "tend apply"
            },
            sd.root().display(),
            controller_hostname(),
            now_rfc3339(),
        ),
        revision: input.revision.to_string(),
    };
    let halted_before = gate.as_ref().is_some_and(|g| g.snapshot().rollout.halted);
    let dispatch_began = Instant::now();
    let (runs, holds) = match (&gate, &config.rollout) {
        (Some(g), Some(spec)) => {
            let pause = spec.pause.0;
            let save = |done: &[crate::rollout::Finished]| {
                let merged = rec.db().update_rollout(g.id, &now_rfc3339(), |r| {
                    let wave = r.rollout.current_wave();
                    for (h, kind, failed) in done {
                        crate::rollout::apply(r, h, *kind, *failed);
                    }
                    // The wave moved on: the pause starts now.
                    if r.rollout.current_wave() != wave && !pause.is_zero() && !r.rollout.halted {
                        let at = SystemTime::now() + pause;
                        r.next_wave_at = Some(humantime::format_rfc3339_millis(at).to_string());
                    }
                });
                match merged {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record the rollout");
                        rec.event(
                            None,
                            "rollout_record_failed",
                            json!({"error": e.to_string()}),
                        );
                        None
                    }
                }
            };
            crate::rollout::dispatch_waves(
                &prep,
                &state,
                &opts,
                rec.clone(),
                g,
                spec,
                input.fleet_scope,
                &save,
            )
            .await
        }
        _ => (
            dispatch::execute(&prep, &state, &opts, rec.clone()).await,
            BTreeMap::new(),
        ),
    };
    let halted_now = gate.as_ref().is_some_and(|g| g.snapshot().rollout.halted) && !halted_before;
    let dispatch_took = dispatch_began.elapsed();
    let applied: BTreeMap<String, Duration> = runs
        .iter()
        .filter(|(_, r)| r.dispatched)
        .map(|(h, _)| (h.clone(), dispatch_took))
        .collect();

    let report = crate::store::blocking(|| -> Result<PassReport> {
        // One outcome per resolved host.
        let run_blocked = prep.decision.outcome == PolicyOutcome::PolicyBlocked
            && prep.decision.hosts.iter().all(|d| !d.dispatch)
            && mode == DispatchMode::Canary;
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
        // How long the probe and the dispatch of each host took.
        let probed = probe_times(&prep);
        for o in &mut outcomes {
            o.probe_ms = probed.get(&o.host).map(|d| d.as_millis() as u64);
            o.apply_ms = applied.get(&o.host).map(|d| d.as_millis() as u64);
        }
        // Corrective or intentional (SPEC 8.7), per change made.
        for o in &mut outcomes {
            let (Some(host), Some(hp)) = (state.hosts.get(&o.host), prep.plan.host(&o.host)) else {
                continue;
            };
            for (step, so) in hp.steps.iter().zip(&o.steps) {
                if so.status != report::StepStatus::Succeeded || step.is_restart() {
                    continue;
                }
                match host.resource(&step.id) {
                    Some(r) if r.applied_as_now() => o.corrective += 1,
                    _ => o.intentional += 1,
                }
            }
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
                trigger: input.trigger,
                target_hosts: targets.clone(),
                requested_by: input.settings.requested_by.clone(),
            },
            desired_revision: input.revision.to_string(),
            effective_mode: if destroyed {
                EffectiveMode::Full
            } else {
                EffectiveMode::Quick
            },
            dispatch_mode: mode,
            policy_outcome: prep.decision.outcome,
            policy_reason: prep.decision.reason.clone(),
            blast_radius: targets.clone(),
            execution_outcome: if halted_now {
                report::ExecutionOutcome::Halted
            } else {
                outcome::execution_outcome(&outcomes)
            },
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
        record_managed(&state, &prep, &result, &rec, &completed_at)?;
        let owed = settle_owed_restarts(&state, &prep, &result, &rec)?;

        let result_json = serde_json::to_string_pretty(&result)?;
        rec.db().finish_run(&result, &result_json)?;
        sd.write_run_artifacts(&run_id, &result, &prep.plan.to_json(), &rec.take_timeline())?;

        // Status files.
        let confirm_cmd = crate::commands::confirm_command(input.settings);
        for o in &result.host_outcomes {
            let prev = sd.read_status(&o.host).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "previous status unreadable; starting afresh");
                None
            });
            let probe = prep.probes.get(&o.host);
            let status = outcome::next_status(StatusInput {
                prev,
                host: &o.host,
                lifecycle: state.hosts[&o.host].lifecycle,
                plan: &prep.plan,
                outcome: o,
                reached: probe.is_some_and(|p| p.result.is_ok()),
                probe_at: probe.map(|p| p.at.as_str()).unwrap_or(&completed_at),
                revision: input.revision,
                run_id: &run_id,
                now: &completed_at,
                confirm_cmd: &confirm_cmd,
                token_refusal: prep
                    .token
                    .as_ref()
                    .and_then(|(v, _)| v.refusal.as_ref().map(|r| format!("{}: {r}", v.file))),
                degraded: input.overlay.degraded.get(&o.host).cloned(),
                owed_restarts: owed.get(&o.host).cloned().unwrap_or_default(),
                invalid: input.overlay.invalid.clone(),
                rollout_hold: holds.get(&o.host).cloned(),
                suspended: suspended.get(&o.host).cloned(),
                dispatch_off: mode == DispatchMode::Off,
                drift: drift_status(&state, &prep, o, &rec),
            });
            sd.write_status(&status)?;
        }

        let code = if halted_now {
            crate::commands::exit::FAILED
        } else {
            outcome::apply_exit_code(&prep.decision, &result.host_outcomes)
        };
        Ok(PassReport {
            run_dir: Some(sd.run_dir(&run_id)),
            result: Some(result),
            code,
            probed: probe_times(&prep),
            applied,
            tokens,
        })
    })?;
    // What is left pending on each host, for the dashboard (a view, written
    // after the records it is drawn from).
    if let Some(result) = &report.result {
        let confirm_cmd = crate::commands::confirm_command(input.settings);
        crate::pending::write(sd, &prep, &state, result, &confirm_cmd).await;
    }
    Ok(report)
}

/// The host's drift is only what drift policy reports, and the same
/// differences as the status already says (SPEC 8.7): nothing new to tell.
fn same_reported_drift(prev: &HostStatus, prep: &reconcile::Prepared) -> bool {
    let reported: Vec<&str> = prep
        .changes
        .get(&prev.host)
        .map(|cs| {
            cs.iter()
                .filter(|c| c.reported)
                .map(|c| c.id.as_str())
                .collect()
        })
        .unwrap_or_default();
    prev.condition(report::ConditionType::Drifted)
        .is_some_and(|c| c.reason == "DriftReported")
        && prev.drift.contested.is_empty()
        && !reported.is_empty()
        && prev
            .drift
            .reported
            .iter()
            .map(String::as_str)
            .eq(reported.iter().copied())
}

/// A pass with nothing to tell: every target probed fine, nothing to do, no
/// token in play, and its status already says `Running` at this revision
/// with no condition that this pass would change. Returns those statuses.
fn quiet(
    input: &PassInput<'_>,
    prep: &reconcile::Prepared,
    sd: &StateDir,
) -> Option<Vec<HostStatus>> {
    use report::{ConditionStatus as S, ConditionType as C};
    if input.overlay.invalid.is_some() || !prep.token_verdicts.is_empty() {
        return None;
    }
    // A host the rollout still counts on gets its pass recorded: its end
    // (and its health command) moves the rollout on.
    if input.state.config.rollout.is_some()
        && let Ok(Some(r)) = current_rollout(sd)
        && input
            .targets
            .iter()
            .any(|h| r.is_pending(h) || r.hold(h, "").is_some())
    {
        return None;
    }
    let mut prevs = Vec::new();
    for host in &input.targets {
        let probed = prep.probes.get(host).is_some_and(|p| p.result.is_ok());
        let idle = prep
            .plan
            .host(host)
            .is_some_and(|hp| hp.error.is_none() && hp.steps.is_empty());
        let Ok(Some(prev)) = sd.read_status(host) else {
            return None;
        };
        let cond = |kind: C, want: S| prev.condition(kind).is_some_and(|c| c.status == want);
        let settled = probed
            && idle
            && !input.overlay.degraded.contains_key(host)
            && prev.phase == Phase::Running
            && prev.desired_revision.as_deref() == Some(input.revision)
            && prev.converged_revision.as_deref() == Some(input.revision)
            && cond(C::Reachable, S::True)
            && cond(C::Converged, S::True)
            && (cond(C::Drifted, S::False) || same_reported_drift(&prev, prep))
            && cond(C::Degraded, S::False)
            && cond(C::ValidDesiredState, S::True)
            && cond(C::AwaitingConfirmation, S::False);
        if !settled {
            return None;
        }
        prevs.push(prev);
    }
    Some(prevs)
}

/// After dispatch, the owed restarts of each target host (SPEC 8.3): a
/// restart that succeeded is no longer owed; one whose trigger succeeded
/// and that did not is owed (dispatch recorded it before the trigger went
/// out); one recorded before a trigger that then did not succeed was never
/// owed; and an owed restart the plan no longer has (its service left the
/// desired state, stopped, or is started by its own step) is dropped, on a
/// host that was probed and planned. Returns what is owed now, by host.
fn settle_owed_restarts(
    state: &DesiredState,
    prep: &reconcile::Prepared,
    result: &RunResult,
    rec: &Recorder,
) -> Result<BTreeMap<String, Vec<String>>> {
    let mut db = rec.db();
    let mut owed = BTreeMap::new();
    for o in &result.host_outcomes {
        let Some(hp) = prep.plan.host(&o.host) else {
            continue;
        };
        let planned =
            hp.error.is_none() && prep.probes.get(&o.host).is_some_and(|p| p.result.is_ok());
        let before = &state.hosts[&o.host].owed_restarts;
        let mut keep = std::collections::BTreeSet::new();
        for (step, so) in hp.steps.iter().zip(&o.steps) {
            if !step.is_restart() {
                continue;
            }
            let triggered = step.triggers.iter().any(|&t| {
                o.steps
                    .get(t)
                    .is_some_and(|s| s.status == report::StepStatus::Succeeded)
            });
            if so.status != report::StepStatus::Succeeded && (step.owed || triggered) {
                keep.insert(step.id.clone());
            }
        }
        for id in db.owed_restarts(&o.host)? {
            let in_plan = hp.steps.iter().any(|s| s.is_restart() && s.id == id);
            let stays = keep.contains(&id) || (!in_plan && !planned && before.contains(&id));
            if !stays {
                db.clear_owed_restart(&o.host, &id)?;
            }
        }
        owed.insert(o.host.clone(), db.owed_restarts(&o.host)?);
    }
    Ok(owed)
}

/// A host's drift triage after the pass (SPEC 8.7): what was reported and
/// left, the corrective applies in all, and the contested resources (3 or
/// more corrective applies in the trailing hour, this pass's included).
fn drift_status(
    state: &DesiredState,
    prep: &reconcile::Prepared,
    o: &HostOutcome,
    rec: &Recorder,
) -> report::DriftStatus {
    let reported = prep
        .changes
        .get(&o.host)
        .map(|cs| {
            cs.iter()
                .filter(|c| c.reported)
                .map(|c| c.id.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut contested = Vec::new();
    if let (Some(host), Some(hp)) = (state.hosts.get(&o.host), prep.plan.host(&o.host)) {
        for r in &host.resources {
            let Some(a) = &r.applied else { continue };
            let now = hp.steps.iter().zip(&o.steps).any(|(s, so)| {
                s.id == r.id && so.status == report::StepStatus::Succeeded && r.applied_as_now()
            });
            if a.corrections_last_hour + u32::from(now) >= crate::core::model::CONTESTED_AT {
                contested.push(r.id.clone());
            }
        }
    }
    report::DriftStatus {
        reported,
        corrected_total: rec.db().corrected_total(&o.host).unwrap_or(0),
        contested,
    }
}

fn record_managed(
    state: &DesiredState,
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
        let host = &state.hosts[&o.host];
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
                let spec = serde_json::to_string(&r.stored_spec())?;
                db.upsert_managed(
                    &o.host,
                    &r.id,
                    r.kind(),
                    r.key().1,
                    &spec,
                    Some(&r.definition_digest()),
                    &result.run_id,
                    at,
                )?;
            }
        }
        // Corrective applies, for contested resources (SPEC 8.7).
        let corrected: Vec<String> = hp
            .steps
            .iter()
            .zip(&o.steps)
            .filter(|(s, so)| so.status == report::StepStatus::Succeeded && !s.is_restart())
            .filter(|(s, _)| host.resource(&s.id).is_some_and(|r| r.applied_as_now()))
            .map(|(s, _)| s.id.clone())
            .collect();
        if !corrected.is_empty() {
            let hour_ago = crate::core::token::format_rfc3339(
                crate::core::token::parse_rfc3339(at).unwrap_or(0) - 3600,
            );
            db.record_corrections(&o.host, &corrected, at, &hour_ago)?;
        }
    }
    Ok(())
}

/// `status/fleet.json` from the status file of every host in `hosts`.
pub fn write_fleet<'a>(
    sd: &StateDir,
    hosts: impl IntoIterator<Item = &'a String>,
    state: Option<&DesiredState>,
    now: &str,
) -> Result<()> {
    let mut statuses = Vec::new();
    for name in hosts {
        let s = sd
            .read_status(name)
            .with_context(|| format!("reading status of host `{name}`"))?
            .unwrap_or_else(|| HostStatus::new(name.clone(), now));
        statuses.push(s);
    }
    let mut fleet = FleetStatus::from_statuses(now, statuses.iter());
    if let Some(state) = state {
        for h in &mut fleet.hosts {
            if let Some(host) = state.hosts.get(&h.host) {
                h.tags = host.inv.tags.clone();
                h.tags.sort();
                h.tags.dedup();
            }
        }
    }
    fleet.rollout = current_rollout(sd)?.map(|r| crate::rollout::fleet_doc(&r));
    sd.write_fleet(&fleet)?;
    Ok(())
}

/// The current rollout's record, if the state dir has one (an older
/// database, without the table, has none).
pub fn current_rollout(sd: &StateDir) -> Result<Option<crate::core::rollout::Record>> {
    let Some(db) = Db::open_read_only(&sd.db_path())? else {
        return Ok(None);
    };
    Ok(db.latest_rollout().ok().flatten().map(|(_, r)| r))
}

/// This machine's host name, for the holder of a host lock.
fn controller_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: a buffer of the given length, written by the call.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "an unknown host".into();
    }
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The front half of a pass over `targets`, recording nothing: the
/// controller's fleet-wide look that decides a new rollout's hosts (SPEC
/// 8.2: the targets with changes or that could not be probed).
pub async fn plan_only(
    settings: &Settings,
    state: &DesiredState,
    revision: &str,
    sd: &StateDir,
    targets: Vec<String>,
    cache: Option<&TransportCache>,
) -> Result<reconcile::Prepared> {
    let t = targets.clone();
    let state = crate::store::blocking(|| -> Result<DesiredState> {
        let db = Db::open(&sd.db_path())?;
        let managed = reconcile::load_managed(Some(&db), &t)?;
        let mut state = reconcile::with_prunes_for(state, &managed, &t);
        reconcile::add_owed_restarts(&mut state, Some(&db), &t)?;
        Ok(state)
    })?;
    let mut probe_opts = reconcile::ProbeOpts::new(&state.config, &settings.dir);
    probe_opts.allow_older = settings.allow_older;
    let cached = cache.map(|c| c.take(&state, &targets)).unwrap_or_default();
    let prep = reconcile::prepare(
        &state,
        &probe_opts,
        revision,
        targets,
        DispatchMode::Off,
        false,
        &reconcile::TokenInput::default(),
        cached,
    )
    .await;
    if let Some(c) = cache {
        c.put(&state, &prep.transports);
    }
    Ok(prep)
}
