//! `tend status [HOST]`: read the status files. Exit 0.

use anyhow::{Result, bail};

use super::{exit, state_dir_of};
use crate::cli::{Global, Select};
use crate::core::report::{ConditionStatus, FleetHost, FleetStatus, HostStatus, fleet_row};
use crate::core::token::parse_rfc3339;

pub fn run(g: &Global, host: Option<&str>, select: &Select) -> Result<u8> {
    let sd = state_dir_of(g);
    if host.is_some() && !(select.tags.is_empty() && select.exclude.is_empty()) {
        bail!("--tag and --exclude select hosts for the fleet view; not with a HOST");
    }
    match host {
        Some(h) => {
            let Some(s) = sd.read_status(h)? else {
                bail!(
                    "no status for host `{h}` in {} (has it been applied?)",
                    sd.root().display()
                );
            };
            if g.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(exit::OK);
            }
            println!("host {}: {:?}", s.host, s.phase);
            println!(
                "  desired revision:   {}",
                s.desired_revision.as_deref().unwrap_or("-")
            );
            println!(
                "  converged revision: {}",
                s.converged_revision.as_deref().unwrap_or("-")
            );
            println!(
                "  last probe:         {}",
                s.last_probe_at.as_deref().unwrap_or("-")
            );
            println!(
                "  last run:           {}",
                s.last_run_id.as_deref().unwrap_or("-")
            );
            println!(
                "  pending:            {} create, {} update, {} delete ({} destructive)",
                s.pending.create, s.pending.update, s.pending.delete, s.pending.destructive
            );
            for c in &s.conditions {
                let mark = match c.status {
                    ConditionStatus::True => "True ",
                    ConditionStatus::False => "False",
                    ConditionStatus::Unknown => "?    ",
                };
                println!(
                    "  {:<22} {mark} {:<18} {}",
                    format!("{:?}", c.kind),
                    c.reason,
                    c.message
                );
            }
            if let Some(a) = &s.awaiting_confirmation {
                println!("  awaiting confirmation of operation {}", a.operation);
                println!("    steps: {}", a.steps.join(", "));
                println!("    token file: {}/{}", sd.root().display(), a.token_file);
                println!("    run: {}", a.command);
            }
        }
        None => fleet(g, &sd, select)?,
    }
    Ok(exit::OK)
}

/// The fleet view (SPEC 8.6): one line per host of the inventory (and any
/// other host with a status file), trouble first, then by name. Works on a
/// state dir with no run yet: every host is `Unknown`.
fn fleet(g: &Global, sd: &crate::store::StateDir, select: &Select) -> Result<()> {
    let state = crate::source::read_tree(&g.dir)
        .map(|t| crate::core::model::validate(&t).state)
        .unwrap_or_default();
    let mut hosts: std::collections::BTreeSet<String> = state.hosts.keys().cloned().collect();
    if let Ok(entries) = std::fs::read_dir(sd.root().join("status")) {
        hosts.extend(
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_suffix(".json")
                        .map(str::to_string)
                })
                .filter(|n| n != "fleet"),
        );
    }
    if !(select.tags.is_empty() && select.exclude.is_empty()) {
        let chosen = crate::reconcile::resolve_targets(&state, &[], select)?;
        hosts.retain(|h| chosen.contains(h));
    }
    let now = crate::clock::now_rfc3339();
    if g.json {
        let doc = match sd.read_fleet()? {
            Some(mut f) => {
                f.hosts.retain(|h| hosts.contains(&h.host));
                f
            }
            None => FleetStatus {
                schema_version: crate::core::report::SCHEMA_VERSION,
                generated_at: now,
                hosts: hosts
                    .iter()
                    .map(|h| FleetHost::of(&HostStatus::new(h.clone(), "")))
                    .collect(),
                rollout: None,
            },
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let now = parse_rfc3339(&now).unwrap_or(0);
    let mut rows = Vec::new();
    for h in &hosts {
        let st = sd.read_status(h)?;
        let probed = st
            .as_ref()
            .and_then(|s| s.last_probe_at.as_deref())
            .and_then(parse_rfc3339);
        rows.push(fleet_row(h, st.as_ref(), probed, now));
    }
    rows.sort_by(|a, b| (a.severity, &a.host).cmp(&(b.severity, &b.host)));
    println!(
        "{:<20} {:<17} {:<5} {:<12} {:<5} MESSAGE",
        "HOST", "PHASE", "READY", "REVISION", "AGE"
    );
    for r in rows {
        println!(
            "{:<20} {:<17} {:<5} {:<12} {:<5} {}",
            r.host,
            format!("{:?}", r.phase),
            if r.ready { "True" } else { "False" },
            r.revision,
            r.age,
            r.message
        );
    }
    Ok(())
}
