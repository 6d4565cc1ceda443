//! `tend status [HOST]`: read the status files. Exit 0.

use anyhow::{Result, bail};

use super::{exit, state_dir_of};
use crate::cli::{Global, Select};
use crate::core::report::{FleetHost, FleetStatus, HostStatus, fleet_row};
use crate::core::token::parse_rfc3339;
use crate::output::word;

pub fn run(g: &Global, host: Option<&str>, select: &Select, watch: bool) -> Result<u8> {
    let sd = state_dir_of(g);
    if host.is_some() && !(select.tags.is_empty() && select.exclude.is_empty()) {
        bail!("--tag and --exclude select hosts for the fleet view; not with a HOST");
    }
    if watch {
        if g.json {
            bail!("--watch draws the view for people; it does not go with --json");
        }
        return watch_loop(g, &sd, host, select);
    }
    match host {
        Some(h) => {
            let known = crate::source::read_tree(&g.dir)
                .map(|t| crate::core::model::validate(&t).state)
                .is_ok_and(|st| st.hosts.contains_key(h));
            let Some(s) = sd.read_status(h)? else {
                if !known {
                    bail!(
                        "no host `{h}` in the inventory of {} and no status for it in {}",
                        g.dir.display(),
                        sd.root().display()
                    );
                }
                if g.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&HostStatus::new(h.to_string(), ""))?
                    );
                } else {
                    println!(
                        "Host:    {h}\nPhase:   Unknown\nMessage: never probed: no pass has run for this host yet (`tend apply {h}`, or start `tend run`)"
                    );
                }
                return Ok(exit::OK);
            };
            if g.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(exit::OK);
            }
            print!("{}", describe(&sd, &s));
        }
        None => fleet(g, &sd, select)?,
    }
    Ok(exit::OK)
}

/// "12s", "5m", "3h", "2d": how long ago `at` was.
fn age(at: &str, now: i64) -> String {
    parse_rfc3339(at).map_or_else(
        || "-".into(),
        |t| crate::core::report::short_age(now.saturating_sub(t)),
    )
}

/// One host in the manner of `kubectl describe`: revisions, conditions with
/// reason, age and message, pending changes, owed restarts, what awaits
/// confirmation with its command, the last runs.
fn describe(sd: &crate::store::StateDir, s: &HostStatus) -> String {
    use std::fmt::Write as _;
    let now = parse_rfc3339(&crate::clock::now_rfc3339()).unwrap_or(0);
    let mut out = String::new();
    let ready = crate::core::report::fleet_row(&s.host, Some(s), None, now).ready;
    let _ = writeln!(out, "Host:                {}", s.host);
    let _ = writeln!(
        out,
        "Phase:               {}{}",
        word(&s.phase),
        if ready { " (ready)" } else { "" }
    );
    let _ = writeln!(
        out,
        "Desired revision:    {}",
        s.desired_revision.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "Converged revision:  {}",
        s.converged_revision.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "Last probe:          {}",
        s.last_probe_at
            .as_deref()
            .map_or_else(|| "-".into(), |t| format!("{t} ({} ago)", age(t, now)))
    );
    // The last run's changes, intentional and corrective (SPEC 8.7).
    let counts = s.last_run_id.as_deref().and_then(|id| {
        let bytes = std::fs::read(sd.run_dir(id).join("result.json")).ok()?;
        let r: crate::core::report::RunResult = serde_json::from_slice(&bytes).ok()?;
        let o = r.host_outcomes.into_iter().find(|o| o.host == s.host)?;
        Some(format!(
            " ({} intentional, {} corrective change(s))",
            o.intentional, o.corrective
        ))
    });
    let _ = writeln!(
        out,
        "Last run:            {}{}",
        s.last_run_id.as_deref().unwrap_or("-"),
        counts.unwrap_or_default()
    );
    let _ = writeln!(out, "Conditions:");
    let _ = writeln!(
        out,
        "  {:<21} {:<7} {:<20} {:<5} MESSAGE",
        "TYPE", "STATUS", "REASON", "AGE"
    );
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "  {:<21} {:<7} {:<20} {:<5} {}",
            word(&c.kind),
            word(&c.status),
            c.reason,
            age(&c.last_transition_time, now),
            c.message
        );
    }
    let p = &s.pending;
    let _ = writeln!(
        out,
        "Pending:             {} create, {} update, {} delete ({} destructive)",
        p.create, p.update, p.delete, p.destructive
    );
    let d = &s.drift;
    let _ = writeln!(
        out,
        "Drift:               {} reported{}, {} contested{}, {} corrected in all",
        d.reported.len(),
        if d.reported.is_empty() {
            String::new()
        } else {
            format!(" ({})", d.reported.join(", "))
        },
        d.contested.len(),
        if d.contested.is_empty() {
            String::new()
        } else {
            format!(" ({})", d.contested.join(", "))
        },
        d.corrected_total
    );
    let _ = writeln!(
        out,
        "Owed restarts:       {}",
        if p.restarts.is_empty() {
            "none".to_string()
        } else {
            p.restarts.join(", ")
        }
    );
    match &s.awaiting_confirmation {
        None => {
            let _ = writeln!(out, "Awaiting confirmation: nothing");
        }
        Some(a) => {
            let _ = writeln!(out, "Awaiting confirmation: operation {}", a.operation);
            let _ = writeln!(out, "  steps:      {}", a.steps.join(", "));
            let _ = writeln!(out, "  hosts:      {}", a.hosts.join(", "));
            let _ = writeln!(
                out,
                "  token file: {}",
                sd.root().join(&a.token_file).display()
            );
            let _ = writeln!(out, "  to approve: {}", a.command);
        }
    }
    let runs = crate::store::db::Db::open_read_only(&sd.db_path())
        .ok()
        .flatten()
        .and_then(|db| db.host_runs(&s.host, 5).ok())
        .unwrap_or_default();
    let _ = writeln!(out, "Recent runs:");
    if runs.is_empty() {
        let _ = writeln!(out, "  none recorded");
    }
    for (id, started, outcome, reason) in runs {
        let _ = writeln!(
            out,
            "  {id}  {:<5} {:<20} {}",
            age(&started, now),
            outcome,
            reason.unwrap_or_default()
        );
    }
    out
}

/// `--watch`: draw the view again whenever a status file changes (checked
/// every second), until interrupted.
fn watch_loop(
    g: &Global,
    sd: &crate::store::StateDir,
    host: Option<&str>,
    select: &Select,
) -> Result<u8> {
    let stamp = || -> Vec<(String, std::time::SystemTime)> {
        let mut v: Vec<_> = std::fs::read_dir(sd.root().join("status"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let m = e.metadata().ok()?.modified().ok()?;
                        Some((e.file_name().to_string_lossy().into_owned(), m))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut last = None;
    loop {
        let now = stamp();
        if last.as_ref() != Some(&now) {
            // Clear the screen and home the cursor, then draw.
            print!("\x1b[2J\x1b[H");
            println!(
                "Every 1s: tend status{}  ({})\n",
                host.map(|h| format!(" {h}")).unwrap_or_default(),
                crate::clock::now_rfc3339()
            );
            run(g, host, select, false)?;
            crate::output::flush();
            last = Some(now);
        }
        if crate::output::stdout_closed() {
            return Ok(exit::OK);
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
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
            word(&r.phase),
            if r.ready { "True" } else { "False" },
            r.revision,
            r.age,
            r.message
        );
    }
    // What holds every host, said once under the table.
    if sd.kill_switch_engaged() {
        println!(
            "\nKill switch engaged ({}): nothing is dispatched to any host until it is removed.",
            sd.kill_path().display()
        );
    } else if crate::settings::Settings::resolve(g, state.config.clone(), None)
        .is_ok_and(|s| s.dispatch == crate::core::spec::DispatchMode::Off)
    {
        println!(
            "\nDispatch is off (tend.yaml or TEND_DISPATCH): tend plans and reports, and changes nothing; set `dispatch: enforced` (or `canary`) in tend.yaml, or run `tend apply --dispatch enforced`."
        );
    }
    Ok(())
}
