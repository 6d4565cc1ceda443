//! What happened, as documents: host outcomes, the run's execution outcome,
//! the apply exit code, and the next host status. Pure: every input (policy
//! decision, plan, step results, previous status, `now`) is passed in.
//!
//! Invariant: exactly one host outcome per resolved host, and every refusal or
//! hold carries its reason and failure class.

use super::diff::Action;
use super::plan::{HostPlan, Plan};
use super::policy::{HostDecision, PolicyOutcome, RunDecision};
use super::report::{
    AwaitingConfirmation, Changes, ConditionStatus, ConditionType, DispatchStatus,
    ExecutionOutcome, HostOutcome, HostOutcomeKind, HostStatus, Pending, Phase, StepAction,
    StepOutcome, StepStatus,
};
use super::retry::FailureClass;
use super::spec::Lifecycle;

/// What dispatch did with one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepResult {
    pub status: StepStatus,
    pub attempts: u32,
    /// Step log, relative to the state dir.
    pub log: Option<String>,
    /// Why it failed, was skipped or was not run.
    pub failure: Option<(FailureClass, String)>,
    /// Not run because it waits for a token (or policy blocks it).
    pub held: bool,
}

impl StepResult {
    pub fn not_run(held: bool) -> Self {
        StepResult {
            status: StepStatus::NotRun,
            attempts: 0,
            log: None,
            failure: None,
            held,
        }
    }
}

/// The failure message of a guarded write the host reverted (SPEC 8.7).
pub const GUARD_REVERTED_MESSAGE: &str = "reverted: the host was unreachable after the change";

/// What dispatch did on one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRun {
    /// At least one step was executed.
    pub dispatched: bool,
    /// One per plan step, in plan order.
    pub steps: Vec<StepResult>,
    /// The kill switch stopped this host before a step.
    pub killed: bool,
    /// Not dispatched: someone else held the host lock, another apply
    /// moved the host's revision since the probe (SPEC 8.7), or the
    /// rollout's failure budget was spent before its turn (SPEC 8.2). Why.
    pub held_back: Option<String>,
    /// The rollout's health command, run after the host converged: `Err`
    /// with why it failed.
    pub health: Option<Result<(), String>>,
}

pub fn step_action(a: Action) -> StepAction {
    match a {
        Action::Create => StepAction::Create,
        Action::Delete => StepAction::Delete,
        Action::Update | Action::Noop => StepAction::Update,
    }
}

/// The outcome of one host. `run` is None when the host was not dispatched.
/// A host that failed the rollout's health command is `ExecutionFailed`
/// whatever its steps did (SPEC 8.2).
pub fn host_outcome(
    plan: &HostPlan,
    decision: &HostDecision,
    run_blocked: bool,
    probe_attempts: u32,
    run: Option<&HostRun>,
) -> HostOutcome {
    let mut o = steps_outcome(plan, decision, run_blocked, probe_attempts, run);
    if let Some(Err(why)) = run.and_then(|r| r.health.as_ref()) {
        let msg = format!("health: {why}");
        o.outcome = HostOutcomeKind::ExecutionFailed;
        o.last_failure_class = Some(FailureClass::Execution);
        o.last_failure_message = Some(msg.clone());
        o.reason = Some(msg);
    }
    o
}

fn steps_outcome(
    plan: &HostPlan,
    decision: &HostDecision,
    run_blocked: bool,
    probe_attempts: u32,
    run: Option<&HostRun>,
) -> HostOutcome {
    let steps: Vec<StepOutcome> = plan
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let r = run.and_then(|r| r.steps.get(i));
            StepOutcome {
                id: s.id.clone(),
                action: step_action(s.action),
                destructive: s.destructive,
                status: r.map(|r| r.status).unwrap_or(StepStatus::NotRun),
                attempts: r.map(|r| r.attempts).unwrap_or(0),
                log: r.and_then(|r| r.log.clone()),
                message: r.and_then(|r| r.failure.as_ref().map(|(_, m)| m.clone())),
            }
        })
        .collect();
    let mut o = HostOutcome {
        host: plan.host.clone(),
        outcome: HostOutcomeKind::NoChange,
        reason: Some(decision.reason.clone()),
        dispatch_status: DispatchStatus::NotDispatched,
        attempt_count: probe_attempts,
        last_failure_class: None,
        last_failure_message: None,
        changes: Changes {
            create: plan.changes.create as u32,
            update: plan.changes.update as u32,
            delete: plan.changes.delete as u32,
        },
        steps,
        corrective: 0,
        intentional: 0,
        probe_ms: None,
        apply_ms: None,
    };

    if decision.outcome == PolicyOutcome::PreflightFailed {
        let class = decision.failure.unwrap_or(FailureClass::Execution);
        o.outcome = match class {
            FailureClass::Transient | FailureClass::Timeout => {
                HostOutcomeKind::TransportUnreachable
            }
            FailureClass::Capability => HostOutcomeKind::CapabilityMismatch,
            FailureClass::Policy => HostOutcomeKind::PolicyBlocked,
            FailureClass::Auth | FailureClass::HostKey | FailureClass::Execution => {
                HostOutcomeKind::PreflightFailed
            }
        };
        o.last_failure_class = Some(class);
        o.last_failure_message = Some(decision.reason.clone());
        return o;
    }
    if !plan.has_changes() {
        return o;
    }
    let only_destructive = plan.steps.iter().all(|s| s.destructive);
    let held_kind = if decision.outcome == PolicyOutcome::PolicyBlocked {
        HostOutcomeKind::PolicyBlocked
    } else {
        HostOutcomeKind::EscalationRequired
    };
    let held_failure = |o: &mut HostOutcome| {
        if held_kind == HostOutcomeKind::PolicyBlocked {
            o.last_failure_class = Some(FailureClass::Policy);
            o.last_failure_message = Some(decision.reason.clone());
        }
    };

    // A host stopped during dispatch (kill switch, signal) counts as
    // executed even when nothing ran yet: it is not `Planned`, it was cut
    // short.
    // So does one stopped before its first step by the run itself: a stale
    // plan at the barrier, a host lock that could not be taken.
    let executed = run.is_some_and(|r| {
        r.dispatched
            || r.killed
            || r.steps
                .iter()
                .any(|s| s.status == StepStatus::NotRun && !s.held && s.failure.is_some())
    });
    if let Some(why) = run.and_then(|r| r.held_back.as_ref())
        && !run.is_some_and(|r| r.dispatched)
    {
        // Held off by another holder of the host lock: planned, not failed.
        o.outcome = HostOutcomeKind::Planned;
        o.reason = Some(why.clone());
        return o;
    }
    if !executed {
        if decision.outcome == PolicyOutcome::PolicyBlocked && !decision.allow_nondestructive {
            // Nothing of this host may run (revision fencing).
            o.outcome = HostOutcomeKind::PolicyBlocked;
            o.last_failure_class = Some(FailureClass::Policy);
            o.last_failure_message = Some(decision.reason.clone());
            return o;
        }
        if run_blocked {
            o.outcome = HostOutcomeKind::PolicyBlocked;
            o.last_failure_class = Some(FailureClass::Policy);
            o.last_failure_message = decision.not_dispatched_reason.clone();
            o.reason = decision.not_dispatched_reason.clone();
        } else if only_destructive && decision.outcome != PolicyOutcome::Approved {
            // Nothing would run even if dispatched: it waits for a token.
            o.outcome = held_kind;
            held_failure(&mut o);
        } else {
            o.outcome = HostOutcomeKind::Planned;
            o.reason = decision
                .not_dispatched_reason
                .clone()
                .or_else(|| Some(decision.reason.clone()));
        }
        return o;
    }

    let r = run.expect("executed");
    if r.dispatched {
        o.dispatch_status = DispatchStatus::Dispatched;
    }
    let count = |st: StepStatus| r.steps.iter().filter(|s| s.status == st).count();
    let failed = count(StepStatus::Failed);
    let succeeded = count(StepStatus::Succeeded);
    let held = r.steps.iter().any(|s| s.held);
    if failed > 0 {
        o.outcome = if succeeded > 0 {
            HostOutcomeKind::PartialSuccess
        } else {
            HostOutcomeKind::ExecutionFailed
        };
        if let Some((class, msg)) = r.steps.iter().find_map(|s| {
            (s.status == StepStatus::Failed)
                .then(|| s.failure.clone())
                .flatten()
        }) {
            o.last_failure_class = Some(class);
            o.last_failure_message = Some(msg);
        }
        o.reason = Some(format!("{failed} step(s) failed, {succeeded} succeeded"));
    } else if let Some((class, msg)) = r.steps.iter().find_map(|s| {
        (s.status == StepStatus::NotRun && !s.held)
            .then(|| s.failure.clone())
            .flatten()
    }) {
        // Stopped by the run, not by policy for this host: a stale plan at
        // the barrier (Policy) or a destructive failure elsewhere (fail fast).
        o.outcome = match (class, succeeded) {
            (FailureClass::Policy, _) => HostOutcomeKind::PolicyBlocked,
            // The connection failed before anything ran (the host lock).
            (FailureClass::Transient | FailureClass::Timeout, 0) if !r.dispatched => {
                HostOutcomeKind::TransportUnreachable
            }
            (_, 0) => HostOutcomeKind::ExecutionFailed,
            _ => HostOutcomeKind::PartialSuccess,
        };
        o.last_failure_class = Some(class);
        o.last_failure_message = Some(msg.clone());
        o.reason = Some(msg);
    } else if r.killed
        && r.steps
            .iter()
            .any(|s| s.status == StepStatus::NotRun && !s.held)
    {
        o.outcome = HostOutcomeKind::PartialSuccess;
        o.reason = Some(format!(
            "the kill switch stopped dispatch after {succeeded} step(s)"
        ));
    } else if held {
        o.outcome = held_kind;
        held_failure(&mut o);
    } else {
        o.outcome = HostOutcomeKind::Completed;
        o.reason = Some(format!("{succeeded} step(s) succeeded"));
    }
    o
}

/// The run's execution outcome from every step of every host: a run in
/// which a host was cut short (`PartialSuccess`: a step failed, or the kill
/// switch or a signal stopped it with steps left) is never `Completed`.
pub fn execution_outcome(outcomes: &[HostOutcome]) -> ExecutionOutcome {
    let all = outcomes.iter().flat_map(|o| &o.steps);
    let (mut ok, mut bad) = (0, 0);
    for s in all {
        match s.status {
            StepStatus::Succeeded => ok += 1,
            StepStatus::Failed => bad += 1,
            _ => {}
        }
    }
    let cut_short = outcomes
        .iter()
        .any(|o| o.outcome == HostOutcomeKind::PartialSuccess);
    match (ok, bad) {
        (0, 0) => ExecutionOutcome::NotExecuted,
        (_, 0) if !cut_short => ExecutionOutcome::Completed,
        (0, _) => ExecutionOutcome::ExecutionFailed,
        _ => ExecutionOutcome::PartialSuccess,
    }
}

/// Exit code of `tend apply` (SPEC.md section 6): 4 when anything failed, else
/// 3 when something waits for a token or is blocked by policy, else 2 when
/// changes are pending but were not dispatched, else 0.
pub fn apply_exit_code(run: &RunDecision, outcomes: &[HostOutcome]) -> u8 {
    use HostOutcomeKind::*;
    let any = |kinds: &[HostOutcomeKind]| outcomes.iter().any(|o| kinds.contains(&o.outcome));
    if any(&[
        PartialSuccess,
        ExecutionFailed,
        TransportUnreachable,
        PreflightFailed,
        CapabilityMismatch,
    ]) {
        4
    } else if run.outcome == PolicyOutcome::PolicyBlocked
        || any(&[EscalationRequired, PolicyBlocked])
    {
        3
    } else if any(&[Planned]) {
        2
    } else {
        0
    }
}

/// Inputs for the next status of a host.
pub struct StatusInput<'a> {
    pub prev: Option<HostStatus>,
    pub host: &'a str,
    pub lifecycle: Lifecycle,
    pub plan: &'a Plan,
    pub outcome: &'a HostOutcome,
    /// The probe reached the host and parsed (the plan may still have refused it).
    pub reached: bool,
    pub probe_at: &'a str,
    pub revision: &'a str,
    pub run_id: &'a str,
    pub now: &'a str,
    /// The `tend confirm` command prefix, e.g. `tend confirm` or `tend --dir x confirm`.
    pub confirm_cmd: &'a str,
    /// Why the token offered for the operation was refused (`file: reason`).
    pub token_refusal: Option<String>,
    /// The controller's crash-loop verdict: `(reason, message)` while the
    /// host is Degraded.
    pub degraded: Option<(String, String)>,
    /// Services whose restart is owed after this pass (SPEC 8.3), sorted.
    pub owed_restarts: Vec<String>,
    /// The desired state as committed is invalid: `(its revision, the first
    /// problems as file:line:col: message)`. The pass ran against the last
    /// valid state (`revision`) with dispatch off, so the host is at most
    /// `Probed`: it was not planned against what is committed.
    pub invalid: Option<(String, String)>,
    /// The rollout held this host (SPEC 8.2): (`RolloutWaiting` or
    /// `RolloutHalted`, message).
    pub rollout_hold: Option<(&'static str, String)>,
    /// `tend suspend` holds the host: the reason given.
    pub suspended: Option<String>,
    /// The pass ran in dispatch mode `off`.
    pub dispatch_off: bool,
    /// Drift triage after the pass (SPEC 8.7).
    pub drift: crate::core::report::DriftStatus,
}

/// The next status of a host after a run.
pub fn next_status(i: StatusInput) -> HostStatus {
    let mut s = i.prev.unwrap_or_else(|| HostStatus::new(i.host, i.now));
    s.host = i.host.to_string();
    s.desired_revision = Some(match &i.invalid {
        Some((current, _)) => current.clone(),
        None => i.revision.to_string(),
    });
    s.last_run_id = Some(i.run_id.to_string());
    let hp = i.plan.host(i.host);
    let (t, f) = (ConditionStatus::True, ConditionStatus::False);
    match &i.invalid {
        None => s.set_condition(
            ConditionType::ValidDesiredState,
            t,
            "Valid",
            "the desired state is valid",
            i.now,
        ),
        Some((_, msg)) => s.set_condition(
            ConditionType::ValidDesiredState,
            f,
            "InvalidDesiredState",
            msg.clone(),
            i.now,
        ),
    }
    match &i.degraded {
        None => s.set_condition(
            ConditionType::Degraded,
            f,
            "NotDegraded",
            "no repeated failures",
            i.now,
        ),
        Some((reason, msg)) => s.set_condition(
            ConditionType::Degraded,
            t,
            reason.clone(),
            msg.clone(),
            i.now,
        ),
    }

    if !i.reached {
        let msg = i
            .outcome
            .last_failure_message
            .clone()
            .unwrap_or_else(|| "probe failed".into());
        let reason = i
            .outcome
            .last_failure_class
            .map(|c| c.as_str().to_string())
            .unwrap_or_else(|| "ProbeFailed".into());
        s.set_condition(ConditionType::Reachable, f, reason, msg.clone(), i.now);
        s.set_condition(
            ConditionType::Converged,
            ConditionStatus::Unknown,
            "NotPlanned",
            msg,
            i.now,
        );
        return s;
    }
    s.last_probe_at = Some(i.probe_at.to_string());
    s.set_condition(
        ConditionType::Reachable,
        t,
        "ProbeSucceeded",
        "the host answered the probe",
        i.now,
    );
    if let Some(err) = hp.and_then(|h| h.error.clone()) {
        // Reached, but refused before planning (fail closed).
        s.set_condition(
            ConditionType::Converged,
            ConditionStatus::Unknown,
            "NotPlanned",
            err,
            i.now,
        );
        return s;
    }

    // What is still pending: every planned step that did not succeed.
    let mut pending = Pending {
        restarts: i.owed_restarts.clone(),
        ..Pending::default()
    };
    let mut held_ids = Vec::new();
    // Whether every step left pending is a restart (then the reason is
    // `RestartOwed`, when one is owed).
    let mut only_restarts = true;
    // Guarded writes the host reverted, or held because it did (SPEC 8.7).
    let mut reverted: Vec<String> = Vec::new();
    if let Some(hp) = hp {
        for (step, out) in hp.steps.iter().zip(&i.outcome.steps) {
            if out.status == StepStatus::Succeeded {
                continue;
            }
            if let Some(g) = step.guard
                && (g.reverted
                    || out
                        .message
                        .as_deref()
                        .is_some_and(|m| m.starts_with(GUARD_REVERTED_MESSAGE)))
            {
                reverted.push(step.id.clone());
            }
            only_restarts &= step.is_restart();
            match step.action {
                Action::Create => pending.create += 1,
                Action::Update => pending.update += 1,
                Action::Delete => pending.delete += 1,
                Action::Noop => {}
            }
            if step.destructive {
                pending.destructive += 1;
                held_ids.push(step.id.clone());
            }
        }
    }
    let pending_total = pending.create + pending.update + pending.delete;
    let owed = pending.restarts.len();
    let destructive_pending = pending.destructive;
    s.pending = pending;
    // `Drifted` describes the host after the pass (SPEC 8.8): the
    // differences this pass did not correct, not the probe before it.
    let seen = hp.map(|h| h.steps.len()).unwrap_or(0);
    let left = pending_total as usize;
    s.drift = i.drift.clone();
    if !s.drift.contested.is_empty() {
        s.set_condition(
            ConditionType::Drifted,
            t,
            "Contested",
            format!(
                "contested: {} corrected 3 or more times in the last hour (another manager changes it); tend corrects it at most once per resync",
                s.drift.contested.join(", ")
            ),
            i.now,
        );
    } else if left > 0 {
        s.set_condition(
            ConditionType::Drifted,
            t,
            "DriftDetected",
            format!("{left} resource(s) differ from the desired state after the last pass"),
            i.now,
        );
    } else if !s.drift.reported.is_empty() {
        s.set_condition(
            ConditionType::Drifted,
            t,
            "DriftReported",
            format!(
                "drift reported, not corrected (`drift: report`): {}",
                s.drift.reported.join(", ")
            ),
            i.now,
        );
    } else if seen > 0 {
        s.set_condition(
            ConditionType::Drifted,
            f,
            "NoDrift",
            format!(
                "the host matches the desired state: the last pass corrected {seen} difference(s)"
            ),
            i.now,
        );
    } else {
        s.set_condition(
            ConditionType::Drifted,
            f,
            "NoDrift",
            "the host matched the desired state",
            i.now,
        );
    }
    if !reverted.is_empty() {
        s.set_condition(
            ConditionType::Converged,
            f,
            "GuardReverted",
            format!(
                "{} reverted on the host by its connection guard (tend could not reach the host after the change); held until its definition changes",
                reverted.join(", ")
            ),
            i.now,
        );
    } else if owed > 0 && only_restarts {
        s.set_condition(
            ConditionType::Converged,
            f,
            "RestartOwed",
            format!(
                "{owed} restart(s) owed: a change they restart on was applied, the restart did not succeed; the next pass runs it"
            ),
            i.now,
        );
    } else if pending_total == 0 {
        s.converged_revision = Some(i.revision.to_string());
        s.set_condition(
            ConditionType::Converged,
            t,
            "Converged",
            format!("converged to {}", i.revision),
            i.now,
        );
    } else if let Some((reason, msg)) = &i.rollout_hold {
        s.set_condition(
            ConditionType::Converged,
            f,
            *reason,
            format!("{pending_total} change(s) pending: {msg}"),
            i.now,
        );
    } else if let Some(why) = &i.suspended {
        s.set_condition(
            ConditionType::Converged,
            f,
            "Suspended",
            format!(
                "{pending_total} change(s) pending, not dispatched: the host is suspended ({why}); `tend unsuspend {}` lets it be dispatched again",
                i.host
            ),
            i.now,
        );
    } else if i.dispatch_off && i.outcome.outcome == HostOutcomeKind::Planned {
        s.set_condition(
            ConditionType::Converged,
            f,
            "DispatchOff",
            format!(
                "{pending_total} change(s) pending, not dispatched: dispatch mode is off (plan only); set `dispatch: enforced` in tend.yaml, TEND_DISPATCH or `--dispatch` to apply them"
            ),
            i.now,
        );
    } else {
        s.set_condition(
            ConditionType::Converged,
            f,
            "ChangesPending",
            match (&i.outcome.outcome, &i.outcome.reason) {
                // Why they were not dispatched: the mode, a host lock held
                // by someone else (naming the holder), the kill switch.
                (HostOutcomeKind::Planned, Some(why)) => {
                    format!("{pending_total} change(s) pending, not dispatched: {why}")
                }
                _ => format!("{pending_total} change(s) pending"),
            },
            i.now,
        );
    }
    let awaiting = match (&i.plan.operation, destructive_pending > 0) {
        (Some(op), true)
            if matches!(
                i.outcome.outcome,
                HostOutcomeKind::EscalationRequired | HostOutcomeKind::Planned
            ) =>
        {
            Some(AwaitingConfirmation {
                operation: op.clone(),
                hosts: i.plan.operation_hosts.clone(),
                steps: held_ids,
                token_file: format!("confirm/{op}.yaml"),
                command: format!("{} {op} --reason \"<why>\"", i.confirm_cmd),
            })
        }
        _ => None,
    };
    match &awaiting {
        Some(a) => s.set_condition(
            ConditionType::AwaitingConfirmation,
            t,
            if i.token_refusal.is_some() {
                "TokenRefused"
            } else {
                "TokenRequired"
            },
            match &i.token_refusal {
                None => format!(
                    "{} destructive step(s) wait for a token: run `{}`",
                    a.steps.len(),
                    a.command
                ),
                Some(why) => format!(
                    "{} destructive step(s) wait for a token; the token offered was refused ({why}): run `{}`",
                    a.steps.len(),
                    a.command
                ),
            },
            i.now,
        ),
        None if i.outcome.outcome == HostOutcomeKind::PolicyBlocked => s.set_condition(
            ConditionType::AwaitingConfirmation,
            f,
            "PolicyBlocked",
            i.outcome.reason.clone().unwrap_or_default(),
            i.now,
        ),
        None => s.set_condition(
            ConditionType::AwaitingConfirmation,
            f,
            "NothingHeld",
            "no destructive step waits for confirmation",
            i.now,
        ),
    }
    s.awaiting_confirmation = awaiting;
    s.phase = match (i.lifecycle, pending_total + owed as u32) {
        (Lifecycle::Absent, 0) => Phase::TeardownComplete,
        (Lifecycle::Absent, _) => Phase::TeardownPending,
        (Lifecycle::Running, 0) => Phase::Running,
        (Lifecycle::Running, _) => Phase::Ready,
    };
    if i.invalid.is_some() {
        s.phase = Phase::Probed;
    }
    s
}
