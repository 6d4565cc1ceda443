//! Rollouts (SPEC 8.2), the shell side: the record in SQLite, `tend resume`
//! requests, and what a pass does with them. The arithmetic is
//! `core::rollout`.
//!
//! A rollout starts when a revision changes the desired definition of a
//! host (by the sha256 of its resources, [`defs`]); its hosts are the
//! targets with changes or that could not be probed, in inventory order,
//! the canary first. A pass of `tend apply` runs its waves one after the
//! other ([`dispatch_waves`]); a controller pass (one host) runs its host
//! only when its wave has come ([`Record::hold`]). The record is saved
//! after every wave and at the end of every pass that touched it.
//!
//! Invariant: a halted rollout dispatches nothing to a host not yet done
//! until a resume request is taken or a revision changes one of those
//! hosts' definitions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::core::model::DesiredState;
use crate::core::outcome::{self, HostRun};
use crate::core::report::HostOutcomeKind;
use crate::core::rollout::{self, Record, Rollout};
use crate::core::spec::RolloutSpec;
use crate::dispatch::{DispatchOpts, Hooks, Recorder, RunFlags};
use crate::reconcile::Prepared;
use crate::store::StateDir;
use crate::store::db::Db;

/// Per host, the sha256 of its desired definition: lifecycle and every
/// resource's id and spec.
pub fn defs(state: &DesiredState) -> BTreeMap<String, String> {
    state
        .hosts
        .iter()
        .map(|(name, h)| {
            let specs: Vec<(&str, String)> = h
                .resources
                .iter()
                .map(|r| {
                    (
                        r.id.as_str(),
                        serde_json::to_string(&r.spec).unwrap_or_default(),
                    )
                })
                .collect();
            let doc = json!({"lifecycle": format!("{:?}", h.lifecycle), "resources": specs});
            (
                name.clone(),
                crate::core::sha256_hex(doc.to_string().as_bytes()),
            )
        })
        .collect()
}

/// A `tend resume` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeRequest {
    pub reason: String,
    pub requested_by: String,
    pub requested_at: String,
}

pub fn resume_dir(sd: &StateDir) -> PathBuf {
    sd.root().join("resume")
}

/// Record a resume request; the next pass takes it.
pub fn request_resume(sd: &StateDir, req: &ResumeRequest) -> Result<PathBuf> {
    let dir = resume_dir(sd);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!(
        "{}-{}.json",
        req.requested_at.replace(':', ""),
        std::process::id()
    );
    let path = dir.join(name);
    crate::store::write_atomic(&path, serde_json::to_string_pretty(req)?.as_bytes())?;
    Ok(path)
}

/// The resume requests waiting, oldest first (unreadable ones are skipped
/// and left for the operator to see).
fn pending_resumes(sd: &StateDir) -> Vec<(PathBuf, ResumeRequest)> {
    let Ok(dir) = std::fs::read_dir(resume_dir(sd)) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, ResumeRequest)> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let text = std::fs::read(&p).ok()?;
            let req = serde_json::from_slice(&text).ok()?;
            Some((p, req))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The rollout of one pass: the record (shared with the dispatch hooks) and
/// where it is kept.
pub struct Gate {
    pub id: i64,
    pub record: Arc<Mutex<Record>>,
    /// Timeline events to record for the run: (kind, detail).
    pub events: Vec<(&'static str, serde_json::Value)>,
}

impl Gate {
    pub fn snapshot(&self) -> Record {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Whether the desired state's definitions would start a new rollout over
/// the current record (the controller then decides its hosts over the whole
/// fleet before any pass of it runs).
pub fn needs_start(db: &Db, state: &DesiredState) -> Result<bool> {
    let now_defs = defs(state);
    Ok(match db.latest_rollout()? {
        None => true,
        Some((_, r)) => {
            let changed: Vec<&String> = now_defs
                .iter()
                .filter(|(h, d)| r.defs.get(*h) != Some(*d))
                .map(|(h, _)| h)
                .collect();
            !changed.is_empty() && (!r.rollout.halted || changed.iter().any(|h| r.is_pending(h)))
        }
    })
}

/// Whether a resume request waits while the current rollout is halted.
pub fn resume_waiting(db: &Db, sd: &StateDir) -> Result<bool> {
    Ok(!pending_resumes(sd).is_empty()
        && db.latest_rollout()?.is_some_and(|(_, r)| r.rollout.halted))
}

/// What begins a pass's rollout: the current record, a new one, or the
/// current one resumed. `state` is the desired state without prunes.
/// `may_start`: false for a controller pass of one host, whose front half
/// cannot say which hosts a new rollout has (the controller decides that
/// fleet-wide before the pass); a start needed then fails the pass.
#[allow(clippy::too_many_arguments)] // the facts of one pass
pub fn begin(
    db: &mut Db,
    sd: &StateDir,
    spec: &RolloutSpec,
    state: &DesiredState,
    (prep, may_start): (&Prepared, bool),
    revision: &str,
    run_id: &str,
    now: &str,
) -> Result<Gate> {
    let now_defs = defs(state);
    let mut events = Vec::new();
    let latest = db.latest_rollout()?;
    let changed = |r: &Record| -> Vec<String> {
        now_defs
            .iter()
            .filter(|(h, d)| r.defs.get(*h) != Some(*d))
            .map(|(h, _)| h.clone())
            .collect()
    };
    let (id, mut record) = match latest {
        Some((id, r)) => {
            let changed = changed(&r);
            let supersede = if changed.is_empty() {
                false
            } else if r.rollout.halted {
                // A halt holds until a revision changes one of its pending
                // hosts; a change elsewhere does not resume it.
                changed.iter().any(|h| r.is_pending(h))
            } else {
                true
            };
            if supersede {
                if !may_start {
                    anyhow::bail!(
                        "revision {revision} starts a new rollout, and this pass cannot decide its hosts; the controller decides them fleet-wide first (retried)"
                    );
                }
                (None, start(spec, state, prep, revision, &now_defs, now))
            } else {
                let mut r = r;
                r.revision = revision.to_string();
                for h in &changed {
                    r.defs.insert(h.clone(), now_defs[h].clone());
                }
                (Some(id), r)
            }
        }
        None if !may_start => anyhow::bail!(
            "revision {revision} starts a rollout, and this pass cannot decide its hosts; the controller decides them fleet-wide first (retried)"
        ),
        None => (None, start(spec, state, prep, revision, &now_defs, now)),
    };
    if id.is_none() {
        events.push((
            "rollout_started",
            json!({"revision": revision, "hosts": record.rollout.hosts, "waves": record.rollout.waves, "budget": record.rollout.budget}),
        ));
    }
    // Resume requests: taken by this pass when the rollout is halted.
    let requests = pending_resumes(sd);
    let mut taken = Vec::new();
    if !requests.is_empty() && record.rollout.halted {
        record.rollout.resume();
        record.halted_reason = None;
        record.next_wave_at = None;
        let r = &requests[0].1;
        events.push((
            "rollout_resumed",
            json!({"reason": r.reason, "requested_by": r.requested_by, "requested_at": r.requested_at}),
        ));
        taken = requests;
    } else if !requests.is_empty() {
        events.push((
            "rollout_resume_ignored",
            json!({"reason": "no rollout is halted", "requests": requests.len()}),
        ));
        taken = requests;
    }
    let id = db.save_rollout(id, &record, now)?;
    for (path, r) in &taken {
        if record.rollout.state() != rollout::State::Halted {
            db.record_resume(
                id,
                (&r.reason, &r.requested_by, &r.requested_at),
                run_id,
                now,
            )?;
        }
        let _ = std::fs::remove_file(path);
    }
    Ok(Gate {
        id,
        record: Arc::new(Mutex::new(record)),
        events,
    })
}

/// A new rollout over the targets with changes or that could not be probed.
fn start(
    spec: &RolloutSpec,
    state: &DesiredState,
    prep: &Prepared,
    revision: &str,
    defs: &BTreeMap<String, String>,
    now: &str,
) -> Record {
    let inventory: Vec<String> = state.inventory_order();
    let members: Vec<String> = rollout::order(&inventory, state.config.canary.as_deref())
        .into_iter()
        .filter(|h| prep.targets.iter().any(|t| t == h))
        .filter(|h| {
            prep.preflight_errors.contains_key(*h)
                || prep.plan.host(h).is_some_and(|p| p.has_changes())
        })
        .map(str::to_string)
        .collect();
    let waves: Vec<rollout::Amount> = spec.waves.iter().map(|w| w.0).collect();
    Record {
        revision: revision.to_string(),
        started_at: now.to_string(),
        defs: defs.clone(),
        rollout: Rollout::new(members, &waves, spec.max_failures.0),
        halted_reason: None,
        next_wave_at: None,
    }
}

/// A host's pass, for the record: (host, outcome, failed).
pub type Finished = (String, HostOutcomeKind, bool);

/// Mark a host's pass done in the record; halts once the budget is spent.
fn finish(record: &Mutex<Record>, host: &str, kind: HostOutcomeKind, failed: bool) {
    let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
    apply(&mut r, host, kind, failed);
}

/// [`finish`] on a record itself (the stored one, in its transaction).
pub fn apply(r: &mut Record, host: &str, kind: HostOutcomeKind, failed: bool) {
    let was = r.rollout.halted;
    r.rollout.finish(host, kind, failed);
    if r.rollout.halted && !was {
        let failed = r.failed_hosts();
        r.halted_reason = Some(format!(
            "{} host(s) failed ({}), more than max_failures allows ({})",
            r.rollout.failures(),
            failed.join(", "),
            r.rollout.budget
        ));
    }
}

/// Dispatch a pass under its rollout. `tend apply` (`one_host` false) runs
/// the waves one after the other in this pass, with the pause between
/// them; a controller pass runs its host only when its wave has come.
/// Hosts outside the rollout (no change when it started: drift correction)
/// go in the first call. Returns the runs of the hosts dispatched, and the
/// rollout's holds (condition reason, message) of the hosts that waited.
#[allow(clippy::too_many_arguments)] // the facts of one pass
pub async fn dispatch_waves(
    prep: &Prepared,
    state: &DesiredState,
    opts: &DispatchOpts,
    rec: Arc<Recorder>,
    gate: &Gate,
    spec: &RolloutSpec,
    one_host: bool,
    db_save: &(dyn Fn(&[Finished]) -> Option<Record> + Send + Sync),
) -> (
    BTreeMap<String, HostRun>,
    BTreeMap<String, (&'static str, String)>,
) {
    let mut runs: BTreeMap<String, HostRun> = BTreeMap::new();
    let mut judged: BTreeSet<String> = BTreeSet::new();
    let flags = RunFlags::default();
    let judges = Arc::new(JudgeInput::of(
        prep,
        &prep.targets.iter().cloned().collect(),
    ));
    let finished: Arc<Mutex<Vec<Finished>>> = Arc::default();
    let dispatchable: Vec<String> = prep
        .decision
        .hosts
        .iter()
        .filter(|d| d.dispatch)
        .filter(|d| prep.plan.host(&d.host).is_some_and(|p| p.has_changes()))
        .map(|d| d.host.clone())
        .collect();
    loop {
        let now = crate::clock::now_rfc3339();
        let snapshot = gate.snapshot();
        // Members that are in their wave but have nothing to dispatch:
        // not probed (failed), nothing left to do, or held by policy.
        for h in &prep.targets {
            if judged.contains(h) || !snapshot.is_pending(h) || snapshot.hold(h, &now).is_some() {
                continue;
            }
            if !dispatchable.contains(h) {
                // Converged already (a resumed host whose steps had run):
                // the health command still decides.
                let mut run = None;
                if let (Some(hc), Some(t), true) = (
                    &spec.health,
                    prep.transports.get(h),
                    prep.plan
                        .host(h)
                        .is_some_and(|p| p.error.is_none() && !p.has_changes())
                        && !prep.preflight_errors.contains_key(h),
                ) {
                    let health =
                        crate::dispatch::run_health(h, &hc.command, hc.timeout.0, t.clone(), &rec)
                            .await;
                    run = Some(HostRun {
                        health: Some(health),
                        ..HostRun::default()
                    });
                }
                if let Some((kind, failed)) = judges.judge(h, run.as_ref()) {
                    finish(&gate.record, h, kind, failed);
                    finished.lock().unwrap_or_else(|p| p.into_inner()).push((
                        h.clone(),
                        kind,
                        failed,
                    ));
                }
                if let Some(run) = run {
                    runs.insert(h.clone(), run);
                }
                judged.insert(h.clone());
            }
        }
        let snapshot = gate.snapshot();
        // In the rollout's order (inventory order, the canary first).
        let order = rollout::order(&state.inventory_order(), state.config.canary.as_deref())
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>();
        let only: Vec<String> = order
            .into_iter()
            .filter(|h| dispatchable.contains(h))
            .filter(|h| !runs.contains_key(h))
            .filter(|h| snapshot.hold(h, &now).is_none())
            .collect();
        if only.is_empty() {
            let waiting = snapshot
                .pending()
                .iter()
                .any(|h| dispatchable.iter().any(|d| d == h) && !runs.contains_key(*h));
            if one_host || snapshot.rollout.halted || !waiting || opts.halt().is_some() {
                break;
            }
            // The pause between waves.
            match &snapshot.next_wave_at {
                Some(at) if now < *at => {
                    let left = humantime::parse_rfc3339(at)
                        .ok()
                        .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
                        .unwrap_or_default();
                    rec.event(None, "rollout_pause", json!({"until": at}));
                    let until = tokio::time::Instant::now() + left;
                    while tokio::time::Instant::now() < until && opts.halt().is_none() {
                        tokio::time::sleep(Duration::from_millis(200).min(left)).await;
                    }
                    continue;
                }
                _ => break,
            }
        }
        let wave = snapshot.rollout.current_wave();
        rec.event(
            None,
            "rollout_wave",
            json!({"wave": wave.map(|w| w + 1), "hosts": only}),
        );
        let members: BTreeSet<String> = only
            .iter()
            .filter(|h| snapshot.is_pending(h))
            .cloned()
            .collect();
        let record = gate.record.clone();
        let record2 = gate.record.clone();
        let finished2 = finished.clone();
        let prep_judge = judges.clone();
        let members_after = members.clone();
        let hooks = Hooks {
            only: only.clone(),
            before: Box::new({
                let members = members.clone();
                move |h: &str| {
                    let r = record.lock().unwrap_or_else(|p| p.into_inner());
                    (members.contains(h) && r.rollout.halted).then(|| {
                        format!(
                            "rollout halted before this host's turn: {}",
                            r.halted_reason
                                .as_deref()
                                .unwrap_or("the failure budget is spent")
                        )
                    })
                }
            }),
            health: spec
                .health
                .as_ref()
                .map(|h| (h.command.clone(), h.timeout.0)),
            health_for: members.clone(),
            after: Box::new(move |h: &str, run: &HostRun| {
                if members_after.contains(h)
                    && let Some((kind, failed)) = prep_judge.judge(h, Some(run))
                {
                    finish(&record2, h, kind, failed);
                    finished2.lock().unwrap_or_else(|p| p.into_inner()).push((
                        h.to_string(),
                        kind,
                        failed,
                    ));
                }
            }),
            flags: flags.clone(),
        };
        let part =
            crate::dispatch::execute_with(prep, state, opts, rec.clone(), Some(Arc::new(hooks)))
                .await;
        runs.extend(part);
        // Into the stored record, merged with what other passes added (the
        // pause starts there when the wave moved on).
        let done: Vec<Finished> =
            std::mem::take(&mut *finished.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(merged) = db_save(&done) {
            *gate.record.lock().unwrap_or_else(|p| p.into_inner()) = merged;
        }
        if gate.snapshot().rollout.halted {
            break;
        }
        if one_host {
            break;
        }
    }
    // Hosts judged without a dispatch since the last save (a converged
    // host of its wave, one not probed).
    let done: Vec<Finished> =
        std::mem::take(&mut *finished.lock().unwrap_or_else(|p| p.into_inner()));
    if !done.is_empty()
        && let Some(merged) = db_save(&done)
    {
        *gate.record.lock().unwrap_or_else(|p| p.into_inner()) = merged;
    }
    // Every target the rollout holds, with why.
    let now = crate::clock::now_rfc3339();
    let snapshot = gate.snapshot();
    let mut holds = BTreeMap::new();
    for h in &dispatchable {
        if runs.contains_key(h) {
            continue;
        }
        if let Some((reason, msg)) = snapshot.hold(h, &now) {
            runs.insert(
                h.clone(),
                HostRun {
                    steps: vec![
                        outcome::StepResult::not_run(false);
                        prep.plan.host(h).map(|p| p.steps.len()).unwrap_or(0)
                    ],
                    held_back: Some(msg.clone()),
                    ..HostRun::default()
                },
            );
            holds.insert(h.clone(), (reason, msg));
        }
    }
    (runs, holds)
}

/// What judging a host needs, owned, for the dispatch hooks.
struct JudgeInput {
    hosts: BTreeMap<
        String,
        (
            crate::core::plan::HostPlan,
            crate::core::policy::HostDecision,
            u32,
        ),
    >,
}

impl JudgeInput {
    fn of(prep: &Prepared, members: &BTreeSet<String>) -> JudgeInput {
        let mut hosts = BTreeMap::new();
        for h in members {
            if let (Some(hp), Some(d)) = (
                prep.plan.host(h),
                prep.decision.hosts.iter().find(|d| &d.host == h),
            ) {
                let attempts = prep.probes.get(h).map(|p| p.attempts).unwrap_or(0);
                hosts.insert(h.clone(), (hp.clone(), d.clone(), attempts));
            }
        }
        JudgeInput { hosts }
    }

    fn judge(&self, host: &str, run: Option<&HostRun>) -> Option<(HostOutcomeKind, bool)> {
        let (hp, d, attempts) = self.hosts.get(host)?;
        // Stopped by the kill switch or a signal: not done, not failed; it
        // stays in its wave.
        if run.is_some_and(|r| r.killed) {
            return Some((HostOutcomeKind::Planned, false));
        }
        let o = outcome::host_outcome(hp, d, false, *attempts, run);
        let failed_step = o
            .steps
            .iter()
            .any(|s| s.status == crate::core::report::StepStatus::Failed);
        let health_failed = run.is_some_and(|r| matches!(r.health, Some(Err(_))));
        Some((
            o.outcome,
            rollout::is_failure(o.outcome, failed_step, health_failed),
        ))
    }
}

/// `status/fleet.json`'s `rollout` (SPEC 8.2).
pub fn fleet_doc(r: &Record) -> crate::core::report::RolloutStatus {
    let ro = &r.rollout;
    crate::core::report::RolloutStatus {
        revision: r.revision.clone(),
        state: match ro.state() {
            rollout::State::InProgress => "InProgress",
            rollout::State::Halted => "Halted",
            rollout::State::Complete => "Complete",
        }
        .into(),
        wave: if ro.waves.is_empty() {
            0
        } else {
            ro.shown_wave() as u64 + 1
        },
        waves: ro.waves.len() as u64,
        failed_hosts: r.failed_hosts(),
        budget: ro.budget,
        halted_reason: r.halted_reason.clone(),
    }
}
