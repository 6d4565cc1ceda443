//! `tend drift [HOST…]` (SPEC 8.6): probe, and list every corrective
//! difference: a resource tend applied whose definition has not changed
//! since, but which the host no longer matches. Changes a new desired
//! definition brings (a commit) are not drift, nor are resources tend never
//! applied, nor owed restarts. Writes nothing. Exit 0 no drift, 2 drift
//! found, 1 an error or a host that could not be probed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use serde_json::json;

use super::{Loaded, exit};
use crate::core::plan::Step;

/// One drifted resource: what would correct it (or, for a reported one,
/// what differs).
struct Entry {
    id: String,
    kind: &'static str,
    action: &'static str,
    destructive: bool,
    fields: Vec<crate::core::diff::FieldChange>,
    /// Left on the host by drift policy (`drift: report`, contested).
    reported: bool,
}

impl Entry {
    fn of(s: &Step) -> Entry {
        Entry {
            id: s.id.clone(),
            kind: s.kind,
            action: s.action.as_str(),
            destructive: s.destructive,
            fields: s.fields.clone(),
            reported: false,
        }
    }
}

/// One host's drift.
struct HostDrift {
    host: String,
    error: Option<String>,
    steps: Vec<Entry>,
}

pub async fn run(mut loaded: Loaded, hosts: &[String]) -> Result<u8> {
    let (prep, db) = super::plan::front(&mut loaded, hosts).await?;
    // Per host: resource id -> the definition digest it was applied with
    // (None: applied before digests were recorded; then the recorded spec
    // decides).
    let mut applied: BTreeMap<String, BTreeMap<String, (Option<String>, String)>> = BTreeMap::new();
    if let Some(db) = &db {
        for h in &prep.targets {
            let rows = db.managed(h)?;
            applied.insert(
                h.clone(),
                rows.into_iter()
                    .map(|r| (r.resource_id, (r.definition_sha256, r.spec_json)))
                    .collect(),
            );
        }
    }
    let mut report = Vec::new();
    for hp in &prep.plan.hosts {
        let host = loaded.state.hosts.get(&hp.host);
        let mut d = HostDrift {
            host: hp.host.clone(),
            error: hp.error.clone(),
            steps: Vec::new(),
        };
        if let (Some(host), Some(recorded)) = (host, applied.get(&hp.host)) {
            for s in hp.steps.iter().filter(|s| !s.is_restart()) {
                let Some(r) = host.resource(&s.id) else {
                    continue;
                };
                if r.pruned {
                    continue;
                }
                let Some((digest, spec_json)) = recorded.get(&s.id) else {
                    continue;
                };
                let same = match digest {
                    Some(d) => *d == r.definition_digest(),
                    None => {
                        serde_json::to_string(&r.stored_spec()).ok().as_ref() == Some(spec_json)
                    }
                };
                if same {
                    d.steps.push(Entry::of(s));
                }
            }
        }
        // Differences drift policy left on the host are drift too.
        for c in prep
            .changes
            .get(&hp.host)
            .into_iter()
            .flatten()
            .filter(|c| c.reported)
        {
            d.steps.push(Entry {
                id: c.id.clone(),
                kind: c.kind,
                action: "report",
                destructive: false,
                fields: c.fields.clone(),
                reported: true,
            });
        }
        report.push(d);
    }
    let drifted: Vec<(String, String)> = report
        .iter()
        .flat_map(|d| d.steps.iter().map(|s| (d.host.clone(), s.id.clone())))
        .collect();
    if loaded.settings.json {
        let hosts: Vec<_> = report
            .iter()
            .map(|d| {
                json!({
                    "host": d.host,
                    "probed": d.error.is_none(),
                    "error": d.error,
                    "drift": d.steps.iter().map(|s| json!({
                        "id": s.id,
                        "kind": s.kind,
                        "action": s.action,
                        "destructive": s.destructive,
                        "fields": s.fields,
                        "reported": s.reported,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = json!({"schema_version": 1, "desired_revision": prep.plan.desired_revision, "hosts": hosts});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let diffs = crate::content_diff::for_plan(&prep, &loaded.state).await;
        let p = loaded.settings.paint;
        let mut out = String::new();
        for d in &report {
            if let Some(e) = &d.error {
                let _ = writeln!(
                    out,
                    "{}: not probed: {e}",
                    p.bold(&format!("host {}", d.host))
                );
                continue;
            }
            if d.steps.is_empty() {
                let _ = writeln!(out, "{}: no drift", p.bold(&format!("host {}", d.host)));
                continue;
            }
            let _ = writeln!(
                out,
                "{}: {} resource(s) drifted from what tend applied",
                p.bold(&format!("host {}", d.host)),
                d.steps.len()
            );
            for s in &d.steps {
                if s.reported {
                    let _ = writeln!(
                        out,
                        "  {} {} (reported, left as it is by drift policy)",
                        p.yellow("~"),
                        s.id
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "  {} {} ({} to correct)",
                        p.yellow("~"),
                        s.id,
                        s.action
                    );
                }
                for f in &s.fields {
                    let _ = writeln!(
                        out,
                        "        {}: {} -> {}",
                        f.field,
                        f.from.as_deref().unwrap_or("-"),
                        f.to.as_deref().unwrap_or("-")
                    );
                }
                if let Some(lines) = diffs.get(&(d.host.clone(), s.id.clone())) {
                    for l in lines {
                        let _ = writeln!(out, "        {}", crate::content_diff::paint_line(p, l));
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "\nDrift: {} resource(s) on {} host(s); `tend apply` (or the controller's next resync) corrects it.",
            drifted.len(),
            report.iter().filter(|d| !d.steps.is_empty()).count()
        );
        print!("{out}");
    }
    Ok(if report.iter().any(|d| d.error.is_some()) {
        exit::ERROR
    } else if !drifted.is_empty() {
        exit::PENDING
    } else {
        exit::OK
    })
}
