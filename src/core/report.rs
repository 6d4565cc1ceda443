//! The documents tend writes for people and scripts (SPEC.md section 5):
//! `runs/<run-id>/result.json`, `status/<host>.json` and `status/fleet.json`.
//!
//! Invariant: plain serde data, no I/O and no clock; the caller passes every
//! timestamp in as an RFC 3339 UTC string. Key names and enumerated values are
//! the external contract: a rename here is a breaking change and fails the key
//! tests below. Optional values serialize as `null`, never as a missing key, so
//! every key of the contract is always present.

use serde::{Deserialize, Serialize};

pub use crate::core::retry::FailureClass;
pub use crate::core::spec::DispatchMode;

/// The `schema_version` of every document in this module.
pub const SCHEMA_VERSION: u32 = 1;

// ---------------------------------------------------------------------------
// Enumerated values
// ---------------------------------------------------------------------------

/// What a run was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Converge,
    Teardown,
}

/// What started a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Cli,
    Watch,
    Resync,
    Token,
    Retry,
}

/// `quick` when no valid token covers the destructive steps (so none runs),
/// `full` when one does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EffectiveMode {
    Quick,
    Full,
}

/// The verdict of the policy function for a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyOutcome {
    Approved,
    EscalationRequired,
    PolicyBlocked,
    PreflightFailed,
}

/// How the dispatch of a run as a whole went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ExecutionOutcome {
    Completed,
    PartialSuccess,
    ExecutionFailed,
    NotExecuted,
    /// Additive: the run was cut short (the process died mid-run); the
    /// controller closes such runs at its next start-up.
    Interrupted,
    /// The rollout halted in this run: its failure budget was spent
    /// (SPEC 8.2).
    Halted,
}

/// How one host fared in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HostOutcomeKind {
    Completed,
    NoChange,
    /// Changes planned but not dispatched: mode `off`, canary elsewhere, or
    /// the kill switch.
    Planned,
    PartialSuccess,
    EscalationRequired,
    PolicyBlocked,
    PreflightFailed,
    TransportUnreachable,
    CapabilityMismatch,
    ExecutionFailed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchStatus {
    Dispatched,
    NotDispatched,
}

/// What a step does to its resource; the same three words as `changes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepAction {
    Create,
    Update,
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Succeeded,
    Failed,
    /// Not run because a step it depends on failed.
    Skipped,
    /// Not run at all: not dispatched, held for a token, or stopped (fail
    /// fast, kill switch).
    NotRun,
}

/// Lifecycle phase of a host (SPEC.md section 5).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Phase {
    /// Never probed.
    #[default]
    Unknown,
    /// Probed, not yet planned.
    Probed,
    /// Planned, with changes pending.
    Ready,
    /// Converged to the desired revision, nothing pending.
    Running,
    /// A teardown awaits its token or is under way.
    TeardownPending,
    /// Every managed resource is gone.
    TeardownComplete,
}

/// The condition types of a host status, in the order they are written.
/// The derived `Ord` is that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ConditionType {
    Reachable,
    Converged,
    Drifted,
    AwaitingConfirmation,
    Degraded,
    ValidDesiredState,
}

impl ConditionType {
    /// Every condition type, in document order.
    pub const ALL: [ConditionType; 6] = [
        ConditionType::Reachable,
        ConditionType::Converged,
        ConditionType::Drifted,
        ConditionType::AwaitingConfirmation,
        ConditionType::Degraded,
        ConditionType::ValidDesiredState,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

// ---------------------------------------------------------------------------
// runs/<run-id>/result.json
// ---------------------------------------------------------------------------

/// The run contract, `runs/<run-id>/result.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub schema_version: u32,
    pub run_id: String,
    pub operation_intent: OperationIntent,
    pub desired_revision: String,
    pub effective_mode: EffectiveMode,
    pub dispatch_mode: DispatchMode,
    pub policy_outcome: PolicyOutcome,
    pub policy_reason: String,
    /// The authoritative list of resolved host names; `host_outcomes` has
    /// exactly one entry for each.
    pub blast_radius: Vec<String>,
    pub execution_outcome: ExecutionOutcome,
    /// When the run began and ended, also when nothing was executed, so that
    /// every run has a duration.
    pub execution_started_at: String,
    pub execution_completed_at: String,
    pub confirmation: Option<Confirmation>,
    pub host_outcomes: Vec<HostOutcome>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationIntent {
    pub action: Action,
    pub trigger: Trigger,
    /// The resolved hosts (all of them when none were named).
    pub target_hosts: Vec<String>,
    pub requested_by: String,
}

/// The token a run looked at, by scope, never by content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The operation hash, full hex.
    pub operation: String,
    pub hosts: Vec<String>,
    /// Path of the token file relative to the state dir.
    pub token_file: String,
    pub scope_match: bool,
    /// The token's own `reason`; null when the token is too malformed to have one.
    pub reason: Option<String>,
    /// Why the token was refused; null when it was accepted.
    pub refusal: Option<String>,
}

/// One host of a run. Exactly one per host of `blast_radius`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostOutcome {
    pub host: String,
    pub outcome: HostOutcomeKind,
    /// Extension: why the host got this outcome, in words (e.g. "2
    /// destructive steps await confirmation").
    pub reason: Option<String>,
    pub dispatch_status: DispatchStatus,
    pub attempt_count: u32,
    pub last_failure_class: Option<FailureClass>,
    pub last_failure_message: Option<String>,
    /// What the plan held for the host, executed or not.
    pub changes: Changes,
    pub steps: Vec<StepOutcome>,
    /// Changes made because the host drifted from a definition already
    /// applied (SPEC 8.7).
    #[serde(default)]
    pub corrective: u32,
    /// Changes made because the desired definition changed (or was new).
    #[serde(default)]
    pub intentional: u32,
    /// Additive: how long this run's probe of the host took, in
    /// milliseconds (null when it was not probed).
    #[serde(default)]
    pub probe_ms: Option<u64>,
    /// Additive: how long this run's dispatch to the host took, in
    /// milliseconds (null when nothing was dispatched).
    #[serde(default)]
    pub apply_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    pub create: u32,
    pub update: u32,
    pub delete: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutcome {
    /// The resource id.
    pub id: String,
    pub action: StepAction,
    pub destructive: bool,
    pub status: StepStatus,
    pub attempts: u32,
    /// Extension: the step log, relative to the state dir; null when the step
    /// never ran.
    pub log: Option<String>,
    /// Extension: why the step failed, was skipped or held; null when it
    /// succeeded or simply did not run.
    #[serde(default)]
    pub message: Option<String>,
}

// ---------------------------------------------------------------------------
// status/<host>.json
// ---------------------------------------------------------------------------

/// Per-host status, `status/<host>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub schema_version: u32,
    pub host: String,
    pub phase: Phase,
    /// Git commit, or content hash when the desired state is not a git work
    /// tree; null before the desired state was ever read.
    pub desired_revision: Option<String>,
    pub converged_revision: Option<String>,
    pub last_probe_at: Option<String>,
    pub last_run_id: Option<String>,
    /// Always all six types, in `ConditionType::ALL` order.
    pub conditions: Vec<Condition>,
    pub pending: Pending,
    pub awaiting_confirmation: Option<AwaitingConfirmation>,
    /// Drift triage (SPEC 8.7).
    #[serde(default)]
    pub drift: DriftStatus,
}

/// What the host's drift looks like (SPEC 8.7): differences reported and
/// left (`drift: report`, or contested and already corrected this
/// resync), corrective applies in all, and contested resources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftStatus {
    pub reported: Vec<String>,
    pub corrected_total: u64,
    pub contested: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: ConditionType,
    pub status: ConditionStatus,
    /// One CamelCase word a script can branch on.
    pub reason: String,
    /// A sentence for people.
    pub message: String,
    /// When `status` last changed, not when the condition was last written.
    pub last_transition_time: String,
}

/// Changes pending on a host; `destructive` counts the steps among them that
/// need a token. `restarts`: services whose `restart_on` restart is owed
/// (SPEC 8.3), run by the next pass until one succeeds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub create: u32,
    pub update: u32,
    pub delete: u32,
    pub destructive: u32,
    #[serde(default)]
    pub restarts: Vec<String>,
}

/// What the operator must do to let held destructive steps run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwaitingConfirmation {
    /// The operation hash, full hex.
    pub operation: String,
    /// The token's required host set.
    pub hosts: Vec<String>,
    /// Resource ids of the held destructive steps of this host.
    pub steps: Vec<String>,
    /// Where the token is expected, relative to the state dir.
    pub token_file: String,
    /// The full `tend confirm …` line.
    pub command: String,
}

/// Why a fresh condition is `Unknown`.
pub const REASON_NOT_OBSERVED: &str = "NotObserved";

impl HostStatus {
    /// A host never probed: phase `Unknown`, all six conditions `Unknown`
    /// since `now`.
    pub fn new(host: impl Into<String>, now: &str) -> HostStatus {
        HostStatus {
            schema_version: SCHEMA_VERSION,
            host: host.into(),
            phase: Phase::Unknown,
            desired_revision: None,
            converged_revision: None,
            last_probe_at: None,
            last_run_id: None,
            drift: DriftStatus::default(),
            conditions: ConditionType::ALL
                .iter()
                .map(|&kind| Condition {
                    kind,
                    status: ConditionStatus::Unknown,
                    reason: REASON_NOT_OBSERVED.to_owned(),
                    message: "not observed yet".to_owned(),
                    last_transition_time: now.to_owned(),
                })
                .collect(),
            pending: Pending::default(),
            awaiting_confirmation: None,
        }
    }

    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }

    /// Set one condition. `last_transition_time` moves to `now` only when
    /// `status` changes, so it tells how long the host has been in that state;
    /// reason and message always take the new values. A condition missing
    /// from a status read from disk is added in its place.
    pub fn set_condition(
        &mut self,
        kind: ConditionType,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
        now: &str,
    ) {
        let reason = reason.into();
        let message = message.into();
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(c) => {
                if c.status != status {
                    c.status = status;
                    c.last_transition_time = now.to_owned();
                }
                c.reason = reason;
                c.message = message;
            }
            None => {
                self.conditions.push(Condition {
                    kind,
                    status,
                    reason,
                    message,
                    last_transition_time: now.to_owned(),
                });
                self.conditions.sort_by_key(|c| c.kind);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// status/fleet.json
// ---------------------------------------------------------------------------

/// Summary of every host, `status/fleet.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub schema_version: u32,
    pub generated_at: String,
    /// Sorted by host name.
    pub hosts: Vec<FleetHost>,
    /// The current rollout (SPEC 8.2), or null.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
}

/// `fleet.json`'s `rollout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub revision: String,
    /// `InProgress`, `Halted` or `Complete`.
    pub state: String,
    /// The current wave, 1-based (the last one once complete).
    pub wave: u64,
    pub waves: u64,
    pub failed_hosts: Vec<String>,
    pub budget: u64,
    pub halted_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetHost {
    pub host: String,
    pub phase: Phase,
    /// The host's `Converged` condition is `True`.
    pub converged: bool,
    pub pending: Pending,
    /// Additive: the host's inventory tags, sorted (empty when unknown).
    #[serde(default)]
    pub tags: Vec<String>,
}

impl FleetHost {
    pub fn of(status: &HostStatus) -> FleetHost {
        FleetHost {
            tags: Vec::new(),
            host: status.host.clone(),
            phase: status.phase,
            converged: status
                .condition(ConditionType::Converged)
                .is_some_and(|c| c.status == ConditionStatus::True),
            pending: status.pending.clone(),
        }
    }
}

impl FleetStatus {
    /// The fleet summary of `statuses`, sorted by host so that the file is
    /// stable from one write to the next.
    pub fn from_statuses<'a>(
        generated_at: impl Into<String>,
        statuses: impl IntoIterator<Item = &'a HostStatus>,
    ) -> FleetStatus {
        let mut hosts: Vec<FleetHost> = statuses.into_iter().map(FleetHost::of).collect();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        FleetStatus {
            schema_version: SCHEMA_VERSION,
            generated_at: generated_at.into(),
            hosts,
            rollout: None,
        }
    }
}

/// Sample documents for the tests of this module and of the store.
/// One line of `tend status` for the fleet (SPEC 8.6): HOST, PHASE, READY,
/// REVISION (the converged revision, 12 characters), AGE (since the last
/// probe) and MESSAGE (the most severe bad condition's message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetRow {
    pub host: String,
    pub phase: Phase,
    pub ready: bool,
    pub revision: String,
    pub age: String,
    pub message: String,
    /// 0 for the worst trouble, up to [`BAD_CONDITIONS`]`.len()` when
    /// nothing is bad: rows sort by it, trouble first.
    pub severity: usize,
}

/// The bad state of each condition, worst first (SPEC 8.6).
pub const BAD_CONDITIONS: [(ConditionType, ConditionStatus); 6] = [
    (ConditionType::ValidDesiredState, ConditionStatus::False),
    (ConditionType::Degraded, ConditionStatus::True),
    (ConditionType::Reachable, ConditionStatus::False),
    (ConditionType::AwaitingConfirmation, ConditionStatus::True),
    (ConditionType::Drifted, ConditionStatus::True),
    (ConditionType::Converged, ConditionStatus::False),
];

/// The fleet row of `host`, from its status (None: never probed). `now` and
/// `last_probe_at` in seconds since the epoch (`probed_at` parsed by the
/// caller; None when absent or unreadable).
pub fn fleet_row(
    host: &str,
    status: Option<&HostStatus>,
    probed_at: Option<i64>,
    now: i64,
) -> FleetRow {
    let Some(st) = status else {
        return FleetRow {
            host: host.to_string(),
            phase: Phase::Unknown,
            ready: false,
            revision: "-".into(),
            age: "-".into(),
            message: "never probed: no pass has run for this host yet".into(),
            severity: BAD_CONDITIONS.len(),
        };
    };
    let worst = BAD_CONDITIONS
        .iter()
        .enumerate()
        .find_map(|(i, (kind, bad))| {
            st.condition(*kind)
                .filter(|c| c.status == *bad)
                .map(|c| (i, c.message.clone()))
        });
    let (severity, message) = worst.unwrap_or((BAD_CONDITIONS.len(), String::new()));
    FleetRow {
        host: host.to_string(),
        phase: st.phase,
        ready: st.phase == Phase::Running && severity == BAD_CONDITIONS.len(),
        revision: st
            .converged_revision
            .as_deref()
            // A content hash is `sha256:<hex>`: its 12 characters are hex.
            .map(|r| {
                r.strip_prefix("sha256:")
                    .unwrap_or(r)
                    .chars()
                    .take(12)
                    .collect()
            })
            .unwrap_or_else(|| "-".into()),
        age: probed_at
            .map(|t| short_age(now.saturating_sub(t)))
            .unwrap_or_else(|| "-".into()),
        message,
        severity,
    }
}

/// `42s`, `7m`, `3h`, `2d`: the largest whole unit.
pub fn short_age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub const STARTED: &str = "2026-11-23T12:00:00Z";
    pub const COMPLETED: &str = "2026-11-23T12:05:00Z";

    /// A host whose one destructive step waits for a token.
    pub fn host_outcome(host: &str) -> HostOutcome {
        HostOutcome {
            host: host.into(),
            outcome: HostOutcomeKind::EscalationRequired,
            reason: Some("1 destructive step awaits confirmation".into()),
            dispatch_status: DispatchStatus::NotDispatched,
            attempt_count: 0,
            last_failure_class: None,
            last_failure_message: None,
            changes: Changes {
                create: 1,
                update: 0,
                delete: 1,
            },
            steps: vec![StepOutcome {
                id: "file:/etc/app.conf".into(),
                action: StepAction::Delete,
                destructive: true,
                status: StepStatus::NotRun,
                attempts: 0,
                log: None,
                message: None,
            }],
            corrective: 0,
            intentional: 0,
            probe_ms: None,
            apply_ms: None,
        }
    }

    /// A run of `hosts` in mode `off`, one `host_outcome` per host.
    pub fn run_result(run_id: &str, hosts: &[&str]) -> RunResult {
        let hosts: Vec<String> = hosts.iter().map(|&h| h.to_owned()).collect();
        RunResult {
            schema_version: SCHEMA_VERSION,
            run_id: run_id.into(),
            operation_intent: OperationIntent {
                action: Action::Converge,
                trigger: Trigger::Cli,
                target_hosts: hosts.clone(),
                requested_by: "alice".into(),
            },
            desired_revision: "abc123".into(),
            effective_mode: EffectiveMode::Quick,
            dispatch_mode: DispatchMode::Off,
            policy_outcome: PolicyOutcome::EscalationRequired,
            policy_reason: "destructive steps need a token".into(),
            execution_outcome: ExecutionOutcome::NotExecuted,
            execution_started_at: STARTED.into(),
            execution_completed_at: COMPLETED.into(),
            confirmation: None,
            host_outcomes: hosts.iter().map(|h| host_outcome(h)).collect(),
            blast_radius: hosts,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::*;

    const T0: &str = "2026-11-23T12:00:00Z";
    const T1: &str = "2026-11-23T12:05:00Z";

    #[test]
    fn the_fleet_row_leads_with_the_worst_condition() {
        use ConditionStatus::{False, True};
        use ConditionType::*;
        let never = fleet_row("h", None, None, 0);
        assert_eq!(
            (never.phase, never.ready, never.revision.as_str()),
            (Phase::Unknown, false, "-")
        );
        let mut st = HostStatus::new("h", T0);
        st.phase = Phase::Running;
        st.converged_revision = Some("0123456789abcdef".into());
        for k in ConditionType::ALL {
            let good = if matches!(k, Reachable | Converged | ValidDesiredState) {
                True
            } else {
                False
            };
            st.set_condition(k, good, "Fine", "fine", T0);
        }
        let ok = fleet_row("h", Some(&st), Some(100), 100 + 150);
        assert!(ok.ready, "{ok:?}");
        assert_eq!(
            (ok.revision.as_str(), ok.age.as_str(), ok.message.as_str()),
            ("0123456789ab", "2m", "")
        );
        // Converged=False and Degraded=True: Degraded's message leads.
        st.set_condition(Converged, False, "Pending", "1 create pending", T1);
        st.set_condition(Degraded, True, "CrashLoop", "5 passes failed", T1);
        let bad = fleet_row("h", Some(&st), Some(100), 100);
        assert!(!bad.ready);
        assert_eq!(bad.message, "5 passes failed");
        assert!(bad.severity < fleet_row("h", None, None, 0).severity);
        // Invalid desired state beats everything.
        st.set_condition(
            ValidDesiredState,
            False,
            "Invalid",
            "hosts/h.yaml:3:5: bad",
            T1,
        );
        assert_eq!(fleet_row("h", Some(&st), None, 0).severity, 0);
        assert_eq!(short_age(59), "59s");
        assert_eq!(short_age(3 * 3600), "3h");
        assert_eq!(short_age(3 * 86_400), "3d");
    }

    fn keys(v: &Value) -> BTreeSet<&str> {
        v.as_object()
            .expect("a JSON object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    #[track_caller]
    fn assert_keys(v: &Value, expected: &[&str]) {
        let want: BTreeSet<&str> = expected.iter().copied().collect();
        assert_eq!(keys(v), want, "keys of {v:#}");
    }

    #[track_caller]
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(doc: &T) {
        let text = serde_json::to_string_pretty(doc).unwrap();
        let back: T = serde_json::from_str(&text).unwrap();
        assert_eq!(&back, doc);
    }

    fn run_result(confirmation: Option<Confirmation>) -> RunResult {
        RunResult {
            confirmation,
            ..fixtures::run_result("r-20261123T120000Z-ab12", &["web-1"])
        }
    }

    fn confirmation() -> Confirmation {
        Confirmation {
            operation: "9c1f".into(),
            hosts: vec!["web-1".into()],
            token_file: "confirm/retire.yaml".into(),
            scope_match: false,
            reason: Some("retire the old vhost".into()),
            refusal: Some("hosts differ from the operation's hosts".into()),
        }
    }

    #[test]
    fn result_keys_are_the_contract() {
        let v = serde_json::to_value(run_result(Some(confirmation()))).unwrap();
        assert_keys(
            &v,
            &[
                "schema_version",
                "run_id",
                "operation_intent",
                "desired_revision",
                "effective_mode",
                "dispatch_mode",
                "policy_outcome",
                "policy_reason",
                "blast_radius",
                "execution_outcome",
                "execution_started_at",
                "execution_completed_at",
                "confirmation",
                "host_outcomes",
            ],
        );
        assert_keys(
            &v["operation_intent"],
            &["action", "trigger", "target_hosts", "requested_by"],
        );
        assert_keys(
            &v["confirmation"],
            &[
                "operation",
                "hosts",
                "token_file",
                "scope_match",
                "reason",
                "refusal",
            ],
        );
        let ho = &v["host_outcomes"][0];
        assert_keys(
            ho,
            &[
                "host",
                "outcome",
                "reason",
                "dispatch_status",
                "attempt_count",
                "last_failure_class",
                "last_failure_message",
                "changes",
                "steps",
                "corrective",
                "intentional",
                "probe_ms",
                "apply_ms",
            ],
        );
        assert_keys(&ho["changes"], &["create", "update", "delete"]);
        assert_keys(
            &ho["steps"][0],
            &[
                "id",
                "action",
                "destructive",
                "status",
                "attempts",
                "log",
                "message",
            ],
        );
    }

    #[test]
    fn result_values_are_the_contract() {
        let v = serde_json::to_value(run_result(None)).unwrap();
        assert_eq!(v["schema_version"], json!(1));
        assert_eq!(v["operation_intent"]["action"], "converge");
        assert_eq!(v["operation_intent"]["trigger"], "cli");
        assert_eq!(v["effective_mode"], "quick");
        assert_eq!(v["dispatch_mode"], "off");
        assert_eq!(v["policy_outcome"], "EscalationRequired");
        assert_eq!(v["execution_outcome"], "NotExecuted");
        // Null, not absent.
        assert_eq!(v.get("confirmation"), Some(&Value::Null));
        let ho = &v["host_outcomes"][0];
        assert_eq!(ho["outcome"], "EscalationRequired");
        assert_eq!(ho["dispatch_status"], "not_dispatched");
        assert_eq!(ho.get("last_failure_class"), Some(&Value::Null));
        assert_eq!(ho.get("last_failure_message"), Some(&Value::Null));
        assert_eq!(ho["steps"][0]["action"], "delete");
        assert_eq!(ho["steps"][0]["status"], "not_run");
        assert_eq!(ho["steps"][0].get("log"), Some(&Value::Null));
    }

    #[test]
    fn enumerated_values_are_spelled_as_the_spec() {
        fn s<T: Serialize>(v: T) -> String {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        }
        assert_eq!(s(Trigger::Watch), "watch");
        assert_eq!(s(Trigger::Resync), "resync");
        assert_eq!(s(Trigger::Token), "token");
        assert_eq!(s(Trigger::Retry), "retry");
        assert_eq!(s(Action::Teardown), "teardown");
        assert_eq!(s(EffectiveMode::Full), "full");
        assert_eq!(s(DispatchMode::Canary), "canary");
        assert_eq!(s(DispatchMode::Enforced), "enforced");
        assert_eq!(s(DispatchStatus::Dispatched), "dispatched");
        assert_eq!(s(StepStatus::Succeeded), "succeeded");
        assert_eq!(s(StepStatus::Failed), "failed");
        assert_eq!(s(StepStatus::Skipped), "skipped");
        assert_eq!(s(HostOutcomeKind::NoChange), "NoChange");
        assert_eq!(
            s(HostOutcomeKind::TransportUnreachable),
            "TransportUnreachable"
        );
        assert_eq!(s(HostOutcomeKind::CapabilityMismatch), "CapabilityMismatch");
        assert_eq!(s(FailureClass::HostKey), "HostKey");
        assert_eq!(s(Phase::TeardownComplete), "TeardownComplete");
        assert_eq!(s(ConditionType::ValidDesiredState), "ValidDesiredState");
        assert_eq!(s(ConditionStatus::True), "True");
    }

    #[test]
    fn result_round_trips() {
        round_trip(&run_result(None));
        let mut r = run_result(Some(confirmation()));
        r.host_outcomes[0].last_failure_class = Some(FailureClass::Transient);
        r.host_outcomes[0].last_failure_message = Some("connection refused".into());
        r.host_outcomes[0].steps[0].log = Some("runs/r/hosts/web-1/0-x.log".into());
        round_trip(&r);
    }

    fn awaiting() -> AwaitingConfirmation {
        AwaitingConfirmation {
            operation: "9c1f".into(),
            hosts: vec!["web-1".into()],
            steps: vec!["file:/etc/old.conf".into()],
            token_file: "confirm/9c1f.yaml".into(),
            command: "tend confirm 9c1f --reason '…'".into(),
        }
    }

    #[test]
    fn status_keys_are_the_contract() {
        let mut st = HostStatus::new("web-1", T0);
        st.awaiting_confirmation = Some(awaiting());
        let v = serde_json::to_value(&st).unwrap();
        assert_keys(
            &v,
            &[
                "schema_version",
                "host",
                "phase",
                "desired_revision",
                "converged_revision",
                "last_probe_at",
                "last_run_id",
                "conditions",
                "pending",
                "awaiting_confirmation",
                "drift",
            ],
        );
        assert_keys(&v["drift"], &["reported", "corrected_total", "contested"]);
        assert_eq!(v["schema_version"], json!(1));
        assert_eq!(v["phase"], "Unknown");
        for c in v["conditions"].as_array().unwrap() {
            assert_keys(
                c,
                &[
                    "type",
                    "status",
                    "reason",
                    "message",
                    "last_transition_time",
                ],
            );
        }
        assert_keys(
            &v["pending"],
            &["create", "update", "delete", "destructive", "restarts"],
        );
        assert_keys(
            &v["awaiting_confirmation"],
            &["operation", "hosts", "steps", "token_file", "command"],
        );

        let fresh = serde_json::to_value(HostStatus::new("web-1", T0)).unwrap();
        for k in [
            "desired_revision",
            "converged_revision",
            "last_probe_at",
            "last_run_id",
            "awaiting_confirmation",
        ] {
            assert_eq!(fresh.get(k), Some(&Value::Null), "{k}");
        }
    }

    #[test]
    fn new_status_has_all_six_conditions_in_order() {
        let v = serde_json::to_value(HostStatus::new("web-1", T0)).unwrap();
        let types: Vec<&str> = v["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "Reachable",
                "Converged",
                "Drifted",
                "AwaitingConfirmation",
                "Degraded",
                "ValidDesiredState"
            ]
        );
        assert!(
            v["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["status"] == "Unknown" && c["last_transition_time"] == T0)
        );
    }

    #[test]
    fn status_round_trips() {
        let mut st = HostStatus::new("web-1", T0);
        round_trip(&st);
        st.phase = Phase::Ready;
        st.desired_revision = Some("abc".into());
        st.last_probe_at = Some(T1.into());
        st.pending = Pending {
            create: 1,
            update: 2,
            delete: 3,
            destructive: 3,
            restarts: vec!["service:app".into()],
        };
        st.awaiting_confirmation = Some(awaiting());
        round_trip(&st);
    }

    #[test]
    fn set_condition_moves_transition_time_only_on_status_change() {
        use ConditionStatus::*;
        use ConditionType::*;
        let mut st = HostStatus::new("web-1", T0);

        // Unknown -> True: a transition.
        st.set_condition(Reachable, True, "ProbeSucceeded", "probed", T1);
        let c = st.condition(Reachable).unwrap();
        assert_eq!((c.status, c.last_transition_time.as_str()), (True, T1));

        // True -> True with new words: the words change, the time does not.
        let t2 = "2026-11-23T12:10:00Z";
        st.set_condition(Reachable, True, "ProbeSucceeded", "probed again", t2);
        let c = st.condition(Reachable).unwrap();
        assert_eq!(c.last_transition_time, T1);
        assert_eq!(c.message, "probed again");

        // True -> False: a transition again.
        let t3 = "2026-11-23T12:15:00Z";
        st.set_condition(Reachable, False, "ConnectionRefused", "refused", t3);
        let c = st.condition(Reachable).unwrap();
        assert_eq!((c.status, c.last_transition_time.as_str()), (False, t3));
        assert_eq!(c.reason, "ConnectionRefused");

        // Other conditions are untouched.
        let d = st.condition(Degraded).unwrap();
        assert_eq!((d.status, d.last_transition_time.as_str()), (Unknown, T0));
        assert_eq!(st.conditions.len(), 6);
    }

    #[test]
    fn set_condition_restores_a_missing_condition_in_its_place() {
        let mut st = HostStatus::new("web-1", T0);
        st.conditions.retain(|c| c.kind != ConditionType::Drifted);
        st.set_condition(
            ConditionType::Drifted,
            ConditionStatus::False,
            "NoDrift",
            "matches",
            T1,
        );
        let kinds: Vec<ConditionType> = st.conditions.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, ConditionType::ALL);
        assert_eq!(
            st.condition(ConditionType::Drifted)
                .unwrap()
                .last_transition_time,
            T1
        );
    }

    #[test]
    fn fleet_keys_are_the_contract_and_hosts_are_sorted() {
        let mut b = HostStatus::new("web-2", T0);
        b.phase = Phase::Running;
        b.set_condition(
            ConditionType::Converged,
            ConditionStatus::True,
            "Converged",
            "at abc",
            T1,
        );
        let a = HostStatus::new("web-1", T0);
        let fleet = FleetStatus::from_statuses(T1, [&b, &a]);
        let v = serde_json::to_value(&fleet).unwrap();
        assert_keys(&v, &["schema_version", "generated_at", "hosts", "rollout"]);
        assert_eq!(v["rollout"], json!(null), "null without a rollout");
        assert_eq!(v["schema_version"], json!(1));
        let hosts = v["hosts"].as_array().unwrap();
        for h in hosts {
            assert_keys(h, &["host", "phase", "converged", "pending", "tags"]);
            assert_keys(
                &h["pending"],
                &["create", "update", "delete", "destructive", "restarts"],
            );
        }
        assert_eq!(hosts[0]["host"], "web-1");
        assert_eq!(hosts[0]["converged"], false);
        assert_eq!(hosts[1]["host"], "web-2");
        assert_eq!(hosts[1]["converged"], true);
        assert_eq!(hosts[1]["phase"], "Running");
        round_trip(&fleet);
    }
}
