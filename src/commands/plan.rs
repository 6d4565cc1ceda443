//! `tend plan [HOST…]`: probe, diff, decide and plan; print the plan for
//! people, or the plan document with `--json`. Writes nothing: no run, no
//! status file, no database row. Exit 0 no changes, 2 changes pending, 1 error.

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

use super::{Loaded, exit};
use crate::core::diff::Action;
use crate::core::fingerprint::Approval;
use crate::core::plan::{HostPlan, Plan};
use crate::core::policy::{PolicyOutcome, RunDecision};
use crate::output::{Paint, word};
use crate::reconcile;

pub async fn run(mut loaded: Loaded, hosts: &[String], diffs: bool) -> Result<u8> {
    let (prep, _) = front(&mut loaded, hosts).await?;
    if loaded.settings.json {
        use std::io::Write;
        crate::output::stdout().write_all(&prep.plan.to_json())?;
    } else {
        let covered = prep
            .token
            .as_ref()
            .is_some_and(|(v, _)| v.refusal.is_none());
        let confirm = super::confirm_command(&loaded.settings);
        let diffs = if diffs {
            crate::content_diff::for_plan(&prep, &loaded.state).await
        } else {
            Default::default()
        };
        print!(
            "{}",
            render(
                &prep.plan,
                &prep.decision,
                (!covered).then_some(confirm.as_str()),
                &View {
                    diffs: &diffs,
                    paint: loaded.settings.paint,
                }
            )
        );
        if let Some((v, _)) = &prep.token {
            match &v.refusal {
                None => println!(
                    "Confirmation: {} covers the operation; the next pass that dispatches to these hosts (dispatch `canary` or `enforced`: `tend apply`, or the controller) runs its destructive steps, once.",
                    v.file
                ),
                Some(why) => println!("Confirmation: {} refused: {why}", v.file),
            }
        }
    }
    let failed = prep.plan.hosts.iter().any(|h| h.error.is_some());
    let changes = prep.plan.hosts.iter().any(HostPlan::has_changes);
    Ok(if failed {
        exit::ERROR
    } else if changes {
        exit::PENDING
    } else {
        exit::OK
    })
}

/// The read-only front half shared by `plan` and `drift`: managed
/// resources and owed restarts from the database (never created or
/// migrated), tokens, probe, diff, plan, decision.
pub async fn front(
    loaded: &mut Loaded,
    hosts: &[String],
) -> Result<(reconcile::Prepared, Option<crate::store::db::Db>)> {
    let targets = hosts.to_vec();
    // Read-only: `plan` never creates or migrates the database.
    let db = crate::store::db::Db::open_read_only(&loaded.state_dir.db_path())?;
    let managed = reconcile::load_managed(db.as_ref(), &targets)?;
    loaded.state = reconcile::with_prunes(&loaded.state, &managed);
    // A database from before owed restarts has none to show.
    if let Err(e) = reconcile::add_owed_restarts(&mut loaded.state, db.as_ref(), &targets) {
        tracing::warn!(error = %e, "owed restarts unreadable; planning without them");
    }
    let kill = loaded.state_dir.kill_switch_engaged();
    let tokens = reconcile::TokenInput::load(
        &loaded.state_dir,
        db.as_ref(),
        loaded.state.config.token_max_ttl.0,
    )?;
    let prep = reconcile::prepare(
        &loaded.state,
        &reconcile::ProbeOpts {
            allow_older: loaded.settings.allow_older,
            ..reconcile::ProbeOpts::new(&loaded.state.config, &loaded.settings.dir)
        },
        &loaded.revision,
        targets,
        loaded.settings.dispatch,
        kill,
        &tokens,
        Default::default(),
    )
    .await;
    Ok((prep, db))
}

fn sign(a: Action, destructive: bool) -> &'static str {
    match (a, destructive) {
        (Action::Create, _) => "+",
        (Action::Delete, _) => "-",
        (Action::Update, true) => "-/+",
        (Action::Update, false) => "~",
        (Action::Noop, _) => " ",
    }
}

/// One line for people of what an approval covers: the change and the
/// object as probed (`delete of file: size 2, mode 0644, ...`); digests are
/// shortened to 12 characters, the whole is in `--json`.
pub fn approval_line(a: &Approval) -> String {
    let mut parts = Vec::new();
    let mut kind = String::from("object");
    if let Some(o) = a.observed.as_object() {
        for (k, v) in o {
            match (k.as_str(), v) {
                ("type", Value::String(t)) => kind = t.clone(),
                (_, Value::Object(inner)) => {
                    for (ik, iv) in inner {
                        parts.push(format!("{k} {ik} {}", short_value(iv)));
                    }
                }
                (_, Value::Null) => parts.push(format!("{k} unknown")),
                _ => parts.push(format!("{k} {}", short_value(v))),
            }
        }
    }
    if parts.is_empty() {
        format!("{} of {kind}", a.change)
    } else {
        format!("{} of {kind}: {}", a.change, parts.join(", "))
    }
}

fn short_value(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            format!("{}…", &s[..12])
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// How a plan is shown: content diffs per (host, step id), and colour.
pub struct View<'a> {
    pub diffs: &'a crate::content_diff::Diffs,
    pub paint: Paint,
}

/// The plan for people: one block per host, one line per step with what
/// changes, the barrier, and what policy decided. `confirm`: the `tend
/// confirm` command prefix to print for an operation no valid token covers
/// yet (None when one does).
pub fn render(plan: &Plan, decision: &RunDecision, confirm: Option<&str>, view: &View) -> String {
    let p = view.paint;
    let mut out = String::new();
    let mut totals = (0, 0, 0, 0);
    for hp in &plan.hosts {
        let d = decision.hosts.iter().find(|d| d.host == hp.host);
        if let Some(err) = &hp.error {
            let _ = writeln!(
                out,
                "{}: cannot plan\n  {} {err}\n",
                p.bold(&format!("host {}", hp.host)),
                p.red("!")
            );
            continue;
        }
        if !hp.has_changes() {
            let _ = writeln!(
                out,
                "{}: no changes\n",
                p.bold(&format!("host {}", hp.host))
            );
            continue;
        }
        let _ = writeln!(
            out,
            "{}: {} to create, {} to update, {} to delete",
            p.bold(&format!("host {}", hp.host)),
            hp.changes.create,
            hp.changes.update,
            hp.changes.delete
        );
        // By position: a pending plan (`crate::pending`) keeps only some
        // steps, with the barrier counted among those kept.
        for (pos, s) in hp.steps.iter().enumerate() {
            if pos == hp.barrier && hp.barrier < hp.steps.len() {
                let _ = writeln!(
                    out,
                    "  {}",
                    p.yellow(
                        "---- barrier: destructive steps below need a confirmation token ----"
                    )
                );
            }
            let mark = format!("{:>3}", sign(s.action, s.destructive));
            let mark = match s.action {
                Action::Create => p.green(&mark),
                Action::Delete => p.red(&mark),
                _ if s.destructive => p.red(&mark),
                _ => p.yellow(&mark),
            };
            let _ = writeln!(
                out,
                "  {mark} {} {}{}",
                s.id,
                s.action.as_str(),
                if s.destructive {
                    p.red(" (destructive)")
                } else {
                    String::new()
                }
            );
            for f in &s.fields {
                let from = f.from.as_deref().unwrap_or("-");
                let to = f.to.as_deref().unwrap_or("-");
                let _ = writeln!(out, "        {}: {} -> {}", f.field, from, to);
            }
            if let Some(lines) = view.diffs.get(&(hp.host.clone(), s.id.clone())) {
                for l in lines {
                    let _ = writeln!(out, "        {}", crate::content_diff::paint_line(p, l));
                }
            }
            if let Some(n) = &s.note {
                let _ = writeln!(out, "        note: {n}");
            }
            if let Some(a) = &s.approval {
                let _ = writeln!(out, "        approves: {}", approval_line(a));
                if let Some(why) = &a.blocked {
                    let _ = writeln!(out, "        blocked: {why}");
                }
            }
        }
        if let Some(d) = d
            && d.outcome != PolicyOutcome::Approved
        {
            let _ = writeln!(out, "  policy: {}: {}", word(&d.outcome), d.reason);
        }
        if let Some(d) = d
            && let Some(why) = &d.not_dispatched_reason
        {
            let hint = if why.starts_with("dispatch mode is off") {
                "; `tend apply --dispatch enforced` applies it, or set `dispatch: enforced` in tend.yaml for the controller"
            } else {
                ""
            };
            let _ = writeln!(out, "  dispatch: not dispatched: {why}{hint}");
        }
        out.push('\n');
        totals.0 += hp.changes.create;
        totals.1 += hp.changes.update;
        totals.2 += hp.changes.delete;
        totals.3 += hp.destructive;
    }
    let _ = writeln!(
        out,
        "Plan: {} to create, {} to update, {} to delete ({} destructive).",
        totals.0, totals.1, totals.2, totals.3
    );
    if let Some(op) = &plan.operation {
        let _ = writeln!(
            out,
            "Destructive operation {op} on {} {}.",
            plan.operation_hosts.join(", "),
            if confirm.is_some() {
                "needs a confirmation token"
            } else {
                "is covered by a valid confirmation token"
            }
        );
        if let Some(cmd) = confirm {
            let _ = writeln!(
                out,
                "To approve exactly these steps on these objects: {cmd} {op} --reason \"<why>\""
            );
        }
    }
    // The run's reason names the outcome per host already.
    let outcome = word(&decision.outcome);
    if decision.reason.starts_with(&format!("{outcome}:")) {
        let _ = writeln!(out, "Policy: {}", decision.reason);
    } else {
        let _ = writeln!(out, "Policy: {outcome}: {}", decision.reason);
    }
    let _ = writeln!(out, "Desired revision: {}", plan.desired_revision);
    out
}
