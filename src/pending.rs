//! `pending/<host>.txt`: what a pass left pending on each host, rendered the
//! way `tend plan` prints it (no colour), content diffs included, for the
//! dashboard's host page.
//!
//! Invariant: written after the run's records and status files, from the
//! pass's own plan minus the steps that succeeded; a host left with nothing
//! pending has no file. Old contents are fetched (one remote command) only
//! for a host with content changes still pending, never for a `sensitive`
//! resource (`content_diff` skips them).

use std::collections::BTreeSet;

use crate::commands::plan::{View, render};
use crate::core::model::DesiredState;
use crate::core::plan::{Counts, HostPlan, Plan};
use crate::core::report::{RunResult, StepStatus};
use crate::reconcile::Prepared;
use crate::store::StateDir;

/// The part of `plan` that `result` did not carry out: per host, the steps
/// that did not succeed (all of them for a host not dispatched), with the
/// barrier and the counts recomputed. Hosts with nothing left are dropped;
/// hosts that could not be planned stay.
pub fn remaining(plan: &Plan, result: &RunResult) -> Plan {
    let mut out = plan.clone();
    out.hosts.retain_mut(|hp| {
        let Some(o) = result.host_outcomes.iter().find(|o| o.host == hp.host) else {
            return false;
        };
        if hp.error.is_some() {
            return true;
        }
        let done: BTreeSet<usize> = hp
            .steps
            .iter()
            .zip(&o.steps)
            .filter(|(_, so)| so.status == StepStatus::Succeeded)
            .map(|(s, _)| s.index)
            .collect();
        keep_steps(hp, |i| !done.contains(&i));
        hp.has_changes()
    });
    out
}

/// Keep the steps whose index `keep` accepts; the barrier moves to the
/// first kept step at or after it, and the counts are those of the kept.
fn keep_steps(hp: &mut HostPlan, keep: impl Fn(usize) -> bool) {
    let barrier = hp.barrier;
    hp.steps.retain(|s| keep(s.index));
    // Indices stay the plan's own (they name the steps in logs and runs);
    // the barrier is a position among the kept steps.
    hp.barrier = hp.steps.iter().filter(|s| s.index < barrier).count();
    let mut c = Counts::default();
    for s in &hp.steps {
        match s.action {
            crate::core::diff::Action::Create => c.create += 1,
            crate::core::diff::Action::Delete => c.delete += 1,
            _ => c.update += 1,
        }
    }
    hp.changes = c;
    hp.destructive = hp.steps.iter().filter(|s| s.destructive).count();
    hp.waves.clear();
}

/// Write each target host's pending plan, or remove it when nothing is
/// pending. Failures are logged: the file is a view, not a record.
pub async fn write(
    sd: &StateDir,
    prep: &Prepared,
    state: &DesiredState,
    result: &RunResult,
    confirm_cmd: &str,
) {
    let left = remaining(&prep.plan, result);
    let kept: BTreeSet<(String, String)> = left
        .hosts
        .iter()
        .flat_map(|hp| hp.steps.iter().map(|s| (hp.host.clone(), s.id.clone())))
        .collect();
    let diffs = if kept.is_empty() {
        Default::default()
    } else {
        crate::content_diff::for_steps(prep, state, |h, id| {
            kept.contains(&(h.to_string(), id.to_string()))
        })
        .await
    };
    let covered = prep
        .token
        .as_ref()
        .is_some_and(|(v, _)| v.refusal.is_none());
    for o in &result.host_outcomes {
        let text = left.hosts.iter().find(|hp| hp.host == o.host).map(|hp| {
            let one = Plan {
                hosts: vec![hp.clone()],
                ..left.clone()
            };
            render(
                &one,
                &prep.decision,
                (!covered).then_some(confirm_cmd),
                &View {
                    diffs: &diffs,
                    paint: crate::output::Paint::default(),
                },
            )
        });
        if let Err(e) = crate::store::blocking(|| sd.write_pending(&o.host, text.as_deref())) {
            tracing::warn!(host = %o.host, error = %e, "could not write the pending plan");
        }
    }
}
