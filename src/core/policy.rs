//! The gate between a plan and its dispatch. Pure: (plan, probe result,
//! inventory, dispatch mode, kill switch) -> a decision per host and for the run,
//! each with a reason an operator can act on.
//!
//! Fail closed: a host whose probe failed, or that uses a kind this build
//! cannot converge, gets nothing dispatched. Destructive steps never run
//! without a valid confirmation token covering the run's operation: without
//! one, every destructive step is held (`EscalationRequired`), and on a
//! `protected` host it is `PolicyBlocked`, token or not.
//!
//! Invariant: no I/O, no clock; every refusal carries a reason.

use super::plan::HostPlan;
use super::retry::FailureClass;
use super::spec::DispatchMode;

pub use super::report::PolicyOutcome;

/// Severity for summarising many hosts into one run outcome.
fn severity(o: PolicyOutcome) -> u8 {
    match o {
        PolicyOutcome::Approved => 0,
        PolicyOutcome::EscalationRequired => 1,
        PolicyOutcome::PolicyBlocked => 2,
        PolicyOutcome::PreflightFailed => 3,
    }
}

/// What policy needs to know about one host.
#[derive(Clone, Debug)]
pub struct HostFacts<'a> {
    pub plan: &'a HostPlan,
    pub protected: bool,
    /// Set when the host could not be probed or planned: (class, message).
    pub preflight_error: Option<(FailureClass, String)>,
    /// Set when revision fencing refuses the desired revision on this host
    /// (SPEC 8.1): why.
    pub fence: Option<String>,
}

/// The decision for one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostDecision {
    pub host: String,
    pub outcome: PolicyOutcome,
    pub reason: String,
    /// May the non-destructive steps be dispatched (mode permitting)?
    pub allow_nondestructive: bool,
    /// May the destructive steps be dispatched (mode permitting)?
    pub allow_destructive: bool,
    /// Will this host be dispatched to at all under the mode and kill switch?
    pub dispatch: bool,
    /// Why not, when `dispatch` is false.
    pub not_dispatched_reason: Option<String>,
    pub failure: Option<FailureClass>,
}

/// The decision for a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDecision {
    pub outcome: PolicyOutcome,
    pub reason: String,
    pub hosts: Vec<HostDecision>,
}

/// Decide every host, then apply the dispatch mode and the kill switch.
/// `authorized`: a valid confirmation token covers the run's operation (its
/// hash and exact host set); it lets the destructive steps of every host in
/// that operation run, except on protected hosts.
pub fn decide(
    hosts: &[HostFacts],
    mode: DispatchMode,
    canary: Option<&str>,
    kill_switch: bool,
    authorized: bool,
) -> RunDecision {
    let mut decisions: Vec<HostDecision> =
        hosts.iter().map(|h| decide_host(h, authorized)).collect();

    // The mode decides where approved work may go.
    let mut run_block: Option<String> = None;
    match mode {
        DispatchMode::Off => {
            for d in &mut decisions {
                d.dispatch = false;
                d.not_dispatched_reason = Some("dispatch mode is off (plan only)".into());
            }
        }
        DispatchMode::Canary => {
            let canary_decision = canary.and_then(|c| decisions.iter().find(|d| d.host == c));
            run_block = match (canary, canary_decision) {
                (None, _) => {
                    Some("dispatch mode is canary but tend.yaml names no `canary` host".into())
                }
                (Some(c), None) => Some(format!(
                    "canary host `{c}` is not a target of this run; nothing is dispatched"
                )),
                (Some(c), Some(d))
                    if matches!(
                        d.outcome,
                        PolicyOutcome::PolicyBlocked | PolicyOutcome::PreflightFailed
                    ) =>
                {
                    Some(format!(
                        "canary host `{c}` is not approved ({:?}: {}); nothing is dispatched",
                        d.outcome, d.reason
                    ))
                }
                _ => None,
            };
            for d in &mut decisions {
                if run_block.is_some() {
                    d.dispatch = false;
                    d.not_dispatched_reason = run_block.clone();
                } else if Some(d.host.as_str()) != canary {
                    d.dispatch = false;
                    d.not_dispatched_reason = Some(format!(
                        "dispatch mode is canary; only `{}` is dispatched",
                        canary.unwrap_or_default()
                    ));
                }
            }
        }
        DispatchMode::Enforced => {}
    }
    if kill_switch {
        for d in &mut decisions {
            d.dispatch = false;
            d.not_dispatched_reason =
                Some("the kill switch (KILL file in the state dir) is engaged".into());
        }
    }

    let (outcome, reason) = if let Some(why) = run_block {
        (PolicyOutcome::PolicyBlocked, why)
    } else {
        summarize(&decisions)
    };
    RunDecision {
        outcome,
        reason,
        hosts: decisions,
    }
}

/// Canary mode for a run that holds only hosts other than the canary while
/// the canary itself is reconciled in a run of its own (the controller works
/// host by host over the whole inventory). Such a run is not "the canary is
/// not a target" (`PolicyBlocked`): its hosts are simply not dispatched to,
/// and a host with changes is `Planned`.
pub fn decide_canary_elsewhere(
    hosts: &[HostFacts],
    canary: &str,
    kill_switch: bool,
    authorized: bool,
) -> RunDecision {
    let mut run = decide(hosts, DispatchMode::Enforced, None, kill_switch, authorized);
    for d in &mut run.hosts {
        if d.dispatch {
            d.dispatch = false;
            d.not_dispatched_reason = Some(format!(
                "dispatch mode is canary; only `{canary}` is dispatched"
            ));
        }
    }
    run
}

/// Hold suspended hosts (SPEC 8.6: `tend suspend`), as the kill switch
/// holds all: probed and planned, never dispatched. `suspended`: host ->
/// the reason given.
pub fn hold_suspended(
    run: &mut RunDecision,
    suspended: &std::collections::BTreeMap<String, String>,
) {
    for d in &mut run.hosts {
        if let Some(why) = suspended.get(&d.host) {
            d.dispatch = false;
            d.not_dispatched_reason = Some(format!(
                "host `{}` is suspended ({why}); `tend unsuspend {}` lets it be dispatched again",
                d.host, d.host
            ));
        }
    }
}

fn decide_host(f: &HostFacts, authorized: bool) -> HostDecision {
    let plan = f.plan;
    let mut d = HostDecision {
        host: plan.host.clone(),
        outcome: PolicyOutcome::Approved,
        reason: String::new(),
        allow_nondestructive: true,
        allow_destructive: false,
        dispatch: true,
        not_dispatched_reason: None,
        failure: None,
    };
    if let Some((class, msg)) = &f.preflight_error {
        d.outcome = PolicyOutcome::PreflightFailed;
        d.reason = msg.clone();
        d.allow_nondestructive = false;
        d.dispatch = false;
        d.not_dispatched_reason = Some("preflight failed".into());
        d.failure = Some(*class);
        return d;
    }
    let destructive = plan.destructive;
    if let Some(why) = f.fence.as_ref().filter(|_| plan.has_changes()) {
        // A stale checkout must not roll the host back: nothing runs.
        d.outcome = PolicyOutcome::PolicyBlocked;
        d.failure = Some(FailureClass::Policy);
        d.reason = why.clone();
        d.allow_nondestructive = false;
        d.dispatch = false;
        d.not_dispatched_reason = Some(why.clone());
        return d;
    }
    if !plan.has_changes() {
        d.reason = "no changes".into();
        d.dispatch = false;
        d.not_dispatched_reason = Some("nothing to do".into());
    } else if destructive == 0 {
        d.reason = format!("{} non-destructive step(s) approved", plan.steps.len());
    } else if let Some(why) = plan
        .destructive_steps()
        .find_map(|s| s.approval.as_ref().and_then(|a| a.blocked.as_ref()))
    {
        // An object that cannot be fingerprinted cannot be approved: no
        // token could say what it destroys (SPEC 8.1).
        d.outcome = PolicyOutcome::PolicyBlocked;
        d.failure = Some(FailureClass::Policy);
        d.reason = format!("{why} ({})", list_ids(plan));
    } else if f.protected {
        d.outcome = PolicyOutcome::PolicyBlocked;
        d.failure = Some(FailureClass::Policy);
        d.reason = format!(
            "host is protected: {destructive} destructive step(s) blocked, token or not ({})",
            list_ids(plan)
        );
    } else if authorized {
        d.allow_destructive = true;
        d.reason = format!(
            "{destructive} destructive step(s) confirmed by a valid token ({})",
            list_ids(plan)
        );
    } else {
        d.outcome = PolicyOutcome::EscalationRequired;
        d.reason = format!(
            "{destructive} destructive step(s) await confirmation ({})",
            list_ids(plan)
        );
    }
    d
}

fn list_ids(plan: &HostPlan) -> String {
    let ids: Vec<String> = plan
        .destructive_steps()
        .map(|s| format!("{} {}", s.action.as_str(), s.id))
        .collect();
    ids.join(", ")
}

fn summarize(decisions: &[HostDecision]) -> (PolicyOutcome, String) {
    let worst = decisions
        .iter()
        .map(|d| d.outcome)
        .max_by_key(|o| severity(*o))
        .unwrap_or(PolicyOutcome::Approved);
    let mut parts = Vec::new();
    for o in [
        PolicyOutcome::PreflightFailed,
        PolicyOutcome::PolicyBlocked,
        PolicyOutcome::EscalationRequired,
    ] {
        let hosts: Vec<&str> = decisions
            .iter()
            .filter(|d| d.outcome == o)
            .map(|d| d.host.as_str())
            .collect();
        if !hosts.is_empty() {
            parts.push(format!("{o:?}: {}", hosts.join(", ")));
        }
    }
    let reason = if parts.is_empty() {
        format!("all {} host(s) approved", decisions.len())
    } else {
        parts.join("; ")
    };
    (worst, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::diff::Action;
    use crate::core::plan::{Counts, Step};

    fn plan(host: &str, destructive: usize, plain: usize) -> HostPlan {
        let mut steps = vec![];
        for i in 0..plain + destructive {
            let d = i >= plain;
            steps.push(Step {
                index: i,
                id: format!("file:/{i}"),
                kind: "file",
                action: if d { Action::Delete } else { Action::Create },
                destructive: d,
                wave: 0,
                after: vec![],
                fields: vec![],
                note: None,
                replace: false,
                triggers: vec![],
                daemon_reload: false,
                owed: false,
                approval: None,
                sensitive: false,
                guard: None,
            });
        }
        HostPlan {
            host: host.into(),
            error: None,
            changes: Counts::default(),
            destructive,
            barrier: plain,
            waves: vec![],
            steps,
        }
    }

    fn facts(p: &HostPlan) -> HostFacts<'_> {
        HostFacts {
            plan: p,
            protected: false,
            preflight_error: None,
            fence: None,
        }
    }

    #[test]
    fn a_fenced_host_runs_nothing_and_says_why() {
        let p = plan("a", 1, 2);
        let mut f = facts(&p);
        f.fence = Some("revision fencing: r2 is not a descendant of r3".into());
        let run = decide(&[f], DispatchMode::Enforced, None, false, true);
        let d = &run.hosts[0];
        assert_eq!(d.outcome, PolicyOutcome::PolicyBlocked);
        assert!(!d.allow_nondestructive && !d.allow_destructive && !d.dispatch);
        assert!(d.reason.contains("not a descendant"), "{}", d.reason);
        // Nothing to do: nothing to fence.
        let idle = plan("a", 0, 0);
        let mut f = facts(&idle);
        f.fence = Some("x".into());
        let run = decide(&[f], DispatchMode::Enforced, None, false, false);
        assert_eq!(run.hosts[0].outcome, PolicyOutcome::Approved);
    }

    #[test]
    fn host_rules() {
        use PolicyOutcome::*;
        let cases: Vec<(
            HostPlan,
            bool,
            Option<FailureClass>,
            PolicyOutcome,
            bool,
            bool,
        )> = vec![
            // plan, protected, preflight error -> outcome, allow non-destructive, allow destructive
            (plan("a", 0, 0), false, None, Approved, true, false),
            (plan("a", 0, 2), false, None, Approved, true, false),
            (
                plan("a", 1, 2),
                false,
                None,
                EscalationRequired,
                true,
                false,
            ),
            (plan("a", 1, 0), true, None, PolicyBlocked, true, false),
            (
                plan("a", 0, 2),
                false,
                Some(FailureClass::Transient),
                PreflightFailed,
                false,
                false,
            ),
        ];
        for (p, protected, err, want, nd, d) in cases {
            let f = HostFacts {
                plan: &p,
                protected,
                preflight_error: err.map(|c| (c, "boom".into())),
                fence: None,
            };
            let dec = decide_host(&f, false);
            assert_eq!(
                (dec.outcome, dec.allow_nondestructive, dec.allow_destructive),
                (want, nd, d),
                "{dec:?}"
            );
            assert!(!dec.reason.is_empty());
        }
    }

    #[test]
    fn modes() {
        let a = plan("a", 0, 1);
        let b = plan("b", 0, 1);
        let hosts = [facts(&a), facts(&b)];
        let dispatched =
            |r: &RunDecision| -> Vec<bool> { r.hosts.iter().map(|d| d.dispatch).collect() };

        let off = decide(&hosts, DispatchMode::Off, None, false, false);
        assert_eq!(dispatched(&off), [false, false]);
        assert_eq!(off.outcome, PolicyOutcome::Approved);

        let enforced = decide(&hosts, DispatchMode::Enforced, None, false, false);
        assert_eq!(dispatched(&enforced), [true, true]);

        let canary = decide(&hosts, DispatchMode::Canary, Some("b"), false, false);
        assert_eq!(dispatched(&canary), [false, true]);
        assert_eq!(canary.outcome, PolicyOutcome::Approved);

        let killed = decide(&hosts, DispatchMode::Enforced, None, true, false);
        assert_eq!(dispatched(&killed), [false, false]);
        assert!(
            killed.hosts[0]
                .not_dispatched_reason
                .as_deref()
                .unwrap()
                .contains("kill switch")
        );
    }

    #[test]
    fn canary_elsewhere_holds_other_hosts_without_blocking() {
        let plans = [plan("a", 0, 1), plan("b", 0, 0)];
        let hosts: Vec<HostFacts> = plans.iter().map(facts).collect();
        let run = decide_canary_elsewhere(&hosts, "c", false, false);
        assert_eq!(run.outcome, PolicyOutcome::Approved);
        assert!(run.hosts.iter().all(|d| !d.dispatch));
        assert_eq!(
            run.hosts[0].not_dispatched_reason.as_deref(),
            Some("dispatch mode is canary; only `c` is dispatched")
        );
        // Nothing to do stays "nothing to do".
        assert_eq!(
            run.hosts[1].not_dispatched_reason.as_deref(),
            Some("nothing to do")
        );
        // The kill switch still says so.
        let killed = decide_canary_elsewhere(&hosts, "c", true, false);
        assert!(
            killed.hosts[0]
                .not_dispatched_reason
                .as_deref()
                .unwrap()
                .contains("kill switch")
        );
    }

    #[test]
    fn canary_must_be_target_and_approved() {
        let a = plan("a", 0, 1);
        let hosts = [facts(&a)];
        let r = decide(&hosts, DispatchMode::Canary, Some("zz"), false, false);
        assert_eq!(r.outcome, PolicyOutcome::PolicyBlocked);
        assert!(r.reason.contains("not a target"));
        assert!(r.hosts.iter().all(|d| !d.dispatch));

        let r = decide(&hosts, DispatchMode::Canary, None, false, false);
        assert_eq!(r.outcome, PolicyOutcome::PolicyBlocked);

        let failed = HostFacts {
            plan: &a,
            protected: false,
            preflight_error: Some((FailureClass::Auth, "denied".into())),
            fence: None,
        };
        let r = decide(&[failed], DispatchMode::Canary, Some("a"), false, false);
        assert_eq!(r.outcome, PolicyOutcome::PolicyBlocked);
        assert!(r.reason.contains("not approved"));
    }

    #[test]
    fn a_valid_token_approves_destructive_steps_except_on_protected_hosts() {
        let a = plan("a", 2, 1);
        let p = plan("p", 1, 0);
        let protected = HostFacts {
            plan: &p,
            protected: true,
            preflight_error: None,
            fence: None,
        };
        let r = decide(
            &[facts(&a), protected],
            DispatchMode::Enforced,
            None,
            false,
            true,
        );
        let (da, dp) = (&r.hosts[0], &r.hosts[1]);
        assert_eq!(
            (da.outcome, da.allow_destructive),
            (PolicyOutcome::Approved, true)
        );
        assert!(
            da.reason.contains("confirmed by a valid token"),
            "{}",
            da.reason
        );
        assert_eq!(
            (dp.outcome, dp.allow_destructive),
            (PolicyOutcome::PolicyBlocked, false)
        );
        assert_eq!(r.outcome, PolicyOutcome::PolicyBlocked);
    }

    #[test]
    fn run_outcome_is_the_most_severe() {
        let a = plan("a", 1, 0);
        let b = plan("b", 0, 1);
        let r = decide(
            &[facts(&a), facts(&b)],
            DispatchMode::Enforced,
            None,
            false,
            false,
        );
        assert_eq!(r.outcome, PolicyOutcome::EscalationRequired);
        assert!(r.reason.contains("EscalationRequired: a"), "{}", r.reason);
    }
}
