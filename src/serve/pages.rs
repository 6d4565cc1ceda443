//! The dashboard's pages (`tend run --listen`, SPEC 8.6): the fleet, one
//! host, one run. Server-rendered HTML from the documents tend already
//! writes; `assets/dash.js` only re-fetches a page's `<main>` to keep it
//! live, filters the fleet table, and copies commands.
//!
//! Invariant: every value from a document passes `esc` (or is a number)
//! before it reaches the page; links are built only from names that passed
//! their checks (host names, run ids, log file names); nothing here does
//! I/O, so each page is a pure function of its inputs and `now`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::core::model::is_host_name;
use crate::core::report::{
    ConditionStatus, FleetHost, FleetStatus, HostStatus, Phase, RunResult, fleet_row, short_age,
};
use crate::output::word;

/// Text for HTML: `&`, `<`, `>`, `"` and `'` escaped.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the epoch of an RFC 3339 time, if it parses.
pub fn epoch(t: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(t))
        .ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs()
        .try_into()
        .ok()
}

/// Milliseconds since the epoch of an RFC 3339 time, if it parses.
fn epoch_ms(t: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(t))
        .ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis()
        .try_into()
        .ok()
}

fn age(t: Option<&str>, now: i64) -> String {
    match t.and_then(epoch) {
        Some(at) => short_age(now.saturating_sub(at)),
        None => "-".into(),
    }
}

fn short_rev(r: Option<&str>) -> String {
    match r {
        Some(r) => r
            .strip_prefix("sha256:")
            .unwrap_or(r)
            .chars()
            .take(12)
            .collect(),
        None => "-".into(),
    }
}

/// The whole page around `main` (whose inner HTML `live` re-fetches).
pub fn layout(title: &str, crumbs: &str, live: Option<&str>, main: &str) -> String {
    let live_attr = match live {
        Some(src) => format!(" data-live=\"{}\"", esc(src)),
        None => String::new(),
    };
    format!(
        "<!doctype html>
<html lang=\"en\">
<head>
<meta charset=\"utf-8\">
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">
<title>{title} · tend</title>
<link rel=\"stylesheet\" href=\"/assets/dash.css\">
<script src=\"/assets/dash.js\" defer></script>
</head>
<body>
<header><a class=\"brand\" href=\"/\">tend</a>{crumbs}<span id=\"live\" class=\"live\" aria-live=\"polite\"></span></header>
<main{live_attr}>
{main}</main>
<footer>Read-only. JSON: <a href=\"/api/fleet\">/api/fleet</a> · <a href=\"/api/runs\">/api/runs</a> · <a href=\"/metrics\">/metrics</a> · <a href=\"/healthz\">/healthz</a> · <a href=\"/readyz\">/readyz</a></footer>
</body>
</html>
",
        title = esc(title),
    )
}

/// How a host's row is coloured: its worst bad condition, or `ready`.
fn state_class(severity: usize, ready: bool, phase: Phase) -> &'static str {
    match severity {
        0..=2 => "bad",
        3 => "awaiting",
        4 => "drift",
        5 => "pending",
        _ if ready => "ready",
        _ if phase == Phase::Unknown => "unknown",
        _ => "pending",
    }
}

/// The fleet page's `<main>`: counts, the rollout, hosts awaiting
/// confirmation (with their `tend confirm` line), and one row per host,
/// trouble first.
pub fn fleet_main(
    fleet: &FleetStatus,
    statuses: &BTreeMap<String, HostStatus>,
    now: i64,
) -> String {
    let tags: BTreeMap<&str, &[String]> = fleet
        .hosts
        .iter()
        .map(|h: &FleetHost| (h.host.as_str(), h.tags.as_slice()))
        .collect();
    let mut names: Vec<&str> = statuses.keys().map(String::as_str).collect();
    for h in &fleet.hosts {
        if !statuses.contains_key(&h.host) {
            names.push(&h.host);
        }
    }
    names.sort();
    names.dedup();
    let mut rows: Vec<_> = names
        .iter()
        .map(|h| {
            let st = statuses.get(*h);
            let probed = st.and_then(|s| s.last_probe_at.as_deref()).and_then(epoch);
            (
                fleet_row(h, st, probed, now),
                st,
                tags.get(h).copied().unwrap_or(&[]),
            )
        })
        .collect();
    rows.sort_by(|a, b| {
        a.0.severity
            .cmp(&b.0.severity)
            .then(a.0.host.cmp(&b.0.host))
    });

    let mut m = String::new();
    // Counts by phase, and ready.
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut ready = 0;
    for (r, _, _) in &rows {
        *phases.entry(word(&r.phase)).or_default() += 1;
        ready += usize::from(r.ready);
    }
    let _ = write!(
        m,
        "<section class=\"summary\"><h1>Fleet</h1><p><b id=\"host-count\">{}</b> host(s), <b id=\"ready-count\">{ready}</b> ready · as of {}</p><ul class=\"chips\">",
        rows.len(),
        esc(&fleet.generated_at)
    );
    for (p, n) in &phases {
        let _ = write!(
            m,
            "<li class=\"chip\" data-phase=\"{0}\">{0} <b>{n}</b></li>",
            esc(p)
        );
    }
    m.push_str("</ul></section>\n");

    if let Some(r) = &fleet.rollout {
        let cls = match r.state.as_str() {
            "Halted" => "bad",
            "Complete" => "ready",
            _ => "pending",
        };
        let _ = write!(
            m,
            "<section id=\"rollout\" class=\"panel st-{cls}\"><h2>Rollout</h2><p>Revision <code>{}</code>: <b class=\"rollout-state\">{}</b>, wave {} of {}; failure budget {}, failed so far {}{}.</p>",
            esc(&short_rev(Some(&r.revision))),
            esc(&r.state),
            r.wave,
            r.waves,
            r.budget,
            r.failed_hosts.len(),
            if r.failed_hosts.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    r.failed_hosts
                        .iter()
                        .map(|h| esc(h))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        if let Some(why) = &r.halted_reason {
            let _ = write!(
                m,
                "<p class=\"why\">Halted: {}. <code>tend resume --reason TEXT</code> continues it.</p>",
                esc(why)
            );
        }
        m.push_str("</section>\n");
    }

    // Awaiting confirmation, one entry per operation.
    let mut ops: BTreeMap<&str, (&str, Vec<&str>, Vec<&str>)> = BTreeMap::new();
    for (_, st, _) in &rows {
        if let Some(a) = st.and_then(|s| s.awaiting_confirmation.as_ref()) {
            let e = ops.entry(a.operation.as_str()).or_insert((
                a.command.as_str(),
                Vec::new(),
                Vec::new(),
            ));
            e.1.push(st.map(|s| s.host.as_str()).unwrap_or(""));
            e.2.extend(a.steps.iter().map(String::as_str));
        }
    }
    if !ops.is_empty() {
        m.push_str(
            "<section id=\"awaiting\" class=\"panel st-awaiting\"><h2>Awaiting confirmation</h2>\n",
        );
        for (op, (cmd, hosts, steps)) in &ops {
            let _ = writeln!(
                m,
                "<div class=\"await\" data-operation=\"{}\"><p>Operation <code>{}</code> on {}: {}</p><div class=\"cmdline\"><code class=\"cmd\">{}</code><button type=\"button\" class=\"copy\" data-copy=\"{}\">copy</button></div></div>",
                esc(op),
                esc(&op.chars().take(16).collect::<String>()),
                hosts
                    .iter()
                    .map(|h| format!("<a href=\"/hosts/{0}\">{0}</a>", esc(h)))
                    .collect::<Vec<_>>()
                    .join(", "),
                steps.iter().map(|s| esc(s)).collect::<Vec<_>>().join(", "),
                esc(cmd),
                esc(cmd),
            );
        }
        m.push_str("</section>\n");
    }

    m.push_str(
        "<section><table id=\"hosts\" class=\"hosts\"><thead><tr><th>host</th><th>phase</th><th>ready</th><th>revision</th><th>age</th><th>tags</th><th>message</th></tr></thead><tbody>\n",
    );
    for (r, _, tags) in &rows {
        let cls = state_class(r.severity, r.ready, r.phase);
        let _ = writeln!(
            m,
            "<tr class=\"host st-{cls}\" data-host=\"{h}\" data-state=\"{cls}\" data-tags=\"{t}\"><td><a href=\"/hosts/{h}\">{h}</a></td><td class=\"phase\">{p}</td><td class=\"ready\">{rd}</td><td><code>{rev}</code></td><td>{age}</td><td class=\"tags\">{t}</td><td class=\"msg\">{msg}</td></tr>",
            h = esc(&r.host),
            p = esc(&word(&r.phase)),
            rd = if r.ready { "True" } else { "False" },
            rev = esc(&r.revision),
            age = esc(&r.age),
            t = esc(&tags.join(" ")),
            msg = esc(&r.message),
        );
    }
    m.push_str("</tbody></table><p id=\"none-shown\" class=\"muted\" hidden>No host matches the filter.</p></section>\n");
    m
}

/// The fleet page: a filter bar (outside `<main>`, so that it keeps its
/// state as `<main>` is refreshed) and `fleet_main`.
pub fn fleet_page(main: &str) -> String {
    let filter = "<nav class=\"filter\"><label>tag <select id=\"f-tag\"><option value=\"\">any</option></select></label> <label>state <select id=\"f-state\"><option value=\"\">any</option><option value=\"bad\">failing</option><option value=\"awaiting\">awaiting confirmation</option><option value=\"drift\">drifted</option><option value=\"pending\">pending</option><option value=\"ready\">ready</option><option value=\"unknown\">unknown</option></select></label></nav>";
    layout("fleet", filter, Some("/parts/fleet"), main)
}

/// One run of a host as the host page lists it.
pub struct HostRunView {
    pub run_id: String,
    pub started_at: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub probe_ms: Option<u64>,
    pub apply_ms: Option<u64>,
}

/// Lines of a plan as `tend plan` prints them, each in a span classed by
/// what it is (so that the stylesheet colours them like the terminal).
pub fn plan_html(text: &str) -> String {
    let mut out = String::from("<pre class=\"plan\">");
    for line in text.lines() {
        let t = line.trim_start();
        let cls = if t.starts_with("---- barrier") {
            "barrier"
        } else if t.starts_with("+++") || t.starts_with("---") {
            "dh"
        } else if t.starts_with("@@") {
            "hunk"
        } else if t.starts_with('+') {
            "add"
        } else if t.starts_with('-') {
            "del"
        } else if t.starts_with('~') {
            "chg"
        } else if t.starts_with("host ") {
            "hh"
        } else {
            ""
        };
        if cls.is_empty() {
            let _ = writeln!(out, "{}", esc(line));
        } else {
            let _ = writeln!(out, "<span class=\"{cls}\">{}</span>", esc(line));
        }
    }
    out.push_str("</pre>");
    out
}

/// A small SVG chart of probe and apply durations, oldest run first.
pub fn durations_chart(runs: &[HostRunView]) -> String {
    let pts: Vec<(&HostRunView, u64, u64)> = runs
        .iter()
        .rev()
        .map(|r| (r, r.probe_ms.unwrap_or(0), r.apply_ms.unwrap_or(0)))
        .filter(|(r, _, _)| r.probe_ms.is_some() || r.apply_ms.is_some())
        .collect();
    if pts.is_empty() {
        return "<p class=\"muted\">No durations recorded yet.</p>".into();
    }
    let max = pts
        .iter()
        .map(|(_, p, a)| (*p).max(*a))
        .max()
        .unwrap_or(1)
        .max(1);
    let (w, h, pad) = (600u64, 120u64, 4u64);
    let slot = (w / pts.len() as u64).clamp(6, 40);
    let bw = (slot.saturating_sub(pad) / 2).max(2);
    let mut s = format!(
        "<figure class=\"chart\"><svg id=\"durations\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"probe and apply durations of the last runs\">",
        h + 14
    );
    for (i, (r, p, a)) in pts.iter().enumerate() {
        let x = i as u64 * slot;
        let ph = (p * h / max).max(u64::from(*p > 0));
        let ah = (a * h / max).max(u64::from(*a > 0));
        let _ = write!(
            s,
            "<g><title>{}: probe {} ms, apply {}</title><rect class=\"probe\" x=\"{x}\" y=\"{}\" width=\"{bw}\" height=\"{ph}\"/><rect class=\"apply\" x=\"{}\" y=\"{}\" width=\"{bw}\" height=\"{ah}\"/></g>",
            esc(&r.run_id),
            p,
            r.apply_ms
                .map(|a| format!("{a} ms"))
                .unwrap_or_else(|| "none".into()),
            h - ph,
            x + bw,
            h - ah,
        );
    }
    let _ = write!(
        s,
        "<text x=\"0\" y=\"{}\" class=\"axis\">max {max} ms over {} run(s), oldest left</text></svg><figcaption><span class=\"key probe\"></span> probe <span class=\"key apply\"></span> apply</figcaption></figure>",
        h + 12,
        pts.len()
    );
    s
}

/// The host page's `<main>`.
pub fn host_main(st: &HostStatus, pending: Option<&str>, runs: &[HostRunView], now: i64) -> String {
    let probed = st.last_probe_at.as_deref().and_then(epoch);
    let row = fleet_row(&st.host, Some(st), probed, now);
    let cls = state_class(row.severity, row.ready, row.phase);
    let h = esc(&st.host);
    let mut m = String::new();
    let _ = writeln!(
        m,
        "<section class=\"summary st-{cls}\"><h1>{h}</h1><p><span class=\"phase\">{}</span> · ready <b class=\"ready\">{}</b> · converged <code>{}</code> · desired <code>{}</code> · probed {} ago{}</p>{}</section>",
        esc(&word(&st.phase)),
        if row.ready { "True" } else { "False" },
        esc(&short_rev(st.converged_revision.as_deref())),
        esc(&short_rev(st.desired_revision.as_deref())),
        esc(&age(st.last_probe_at.as_deref(), now)),
        match &st.last_run_id {
            Some(r) if crate::clock::is_run_id(r) => {
                format!(" · last run <a href=\"/runs/{0}\">{0}</a>", esc(r))
            }
            _ => String::new(),
        },
        if row.message.is_empty() {
            String::new()
        } else {
            format!("<p class=\"msg\">{}</p>", esc(&row.message))
        }
    );

    m.push_str("<section><h2>Conditions</h2><table id=\"conditions\"><thead><tr><th>type</th><th>status</th><th>reason</th><th>message</th><th>since</th></tr></thead><tbody>\n");
    for c in &st.conditions {
        let bad = crate::core::report::BAD_CONDITIONS
            .iter()
            .any(|(k, s)| *k == c.kind && *s == c.status);
        let cls = if bad {
            "bad"
        } else if c.status == ConditionStatus::Unknown {
            "unknown"
        } else {
            "ok"
        };
        let _ = writeln!(
            m,
            "<tr class=\"cond c-{cls}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&word(&c.kind)),
            esc(&word(&c.status)),
            esc(&c.reason),
            esc(&c.message),
            esc(&age(Some(&c.last_transition_time), now)),
        );
    }
    m.push_str("</tbody></table></section>\n");

    if let Some(a) = &st.awaiting_confirmation {
        let _ = writeln!(
            m,
            "<section id=\"awaiting\" class=\"panel st-awaiting\"><h2>Awaiting confirmation</h2><p>{}</p><div class=\"cmdline\"><code class=\"cmd\">{}</code><button type=\"button\" class=\"copy\" data-copy=\"{}\">copy</button></div></section>",
            a.steps
                .iter()
                .map(|s| esc(s))
                .collect::<Vec<_>>()
                .join(", "),
            esc(&a.command),
            esc(&a.command),
        );
    }

    m.push_str("<section id=\"pending\"><h2>Pending plan</h2>");
    match pending {
        Some(text) => m.push_str(&plan_html(text)),
        None => m.push_str("<p class=\"muted\">Nothing pending.</p>"),
    }
    m.push_str("</section>\n");

    let p = &st.pending;
    let d = &st.drift;
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(|x| format!("<code>{}</code>", esc(x)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let _ = writeln!(
        m,
        "<section id=\"drift\"><h2>Restarts and drift</h2><dl><dt>owed restarts</dt><dd id=\"owed\">{}</dd><dt>reported drift</dt><dd id=\"reported\">{}</dd><dt>contested</dt><dd id=\"contested\">{}</dd><dt>corrected in all</dt><dd>{}</dd><dt>pending</dt><dd>{} to create, {} to update, {} to delete ({} destructive)</dd></dl></section>",
        list(&p.restarts),
        list(&d.reported),
        list(&d.contested),
        d.corrected_total,
        p.create,
        p.update,
        p.delete,
        p.destructive,
    );

    m.push_str("<section id=\"runs\"><h2>Last runs</h2>");
    m.push_str(&durations_chart(runs));
    m.push_str("<table><thead><tr><th>run</th><th>started</th><th>outcome</th><th>reason</th><th>probe</th><th>apply</th></tr></thead><tbody>\n");
    for r in runs {
        let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
        let link = if crate::clock::is_run_id(&r.run_id) {
            format!("<a href=\"/runs/{0}\">{0}</a>", esc(&r.run_id))
        } else {
            esc(&r.run_id)
        };
        let _ = writeln!(
            m,
            "<tr class=\"o-{}\"><td>{link}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.outcome),
            esc(&r.started_at),
            esc(&r.outcome),
            esc(r.reason.as_deref().unwrap_or("")),
            ms(r.probe_ms),
            ms(r.apply_ms),
        );
    }
    if runs.is_empty() {
        m.push_str("<tr><td colspan=\"6\" class=\"muted\">No runs yet.</td></tr>");
    }
    m.push_str("</tbody></table></section>\n");
    m
}

/// One bar of the waterfall: an attempt of a step.
struct Attempt {
    start: i64,
    end: Option<i64>,
    status: String,
}

/// The run page's `<main>`: the run's contract and its waterfall.
pub fn run_main(r: &RunResult, timeline: &[Value]) -> String {
    let mut m = String::new();
    let i = &r.operation_intent;
    let targets = i.target_hosts.len();
    let outcomes = r.host_outcomes.len();
    let _ = writeln!(
        m,
        "<section class=\"summary\"><h1>Run <code>{}</code></h1><p><b class=\"exec\">{}</b> · {} → {}</p></section>",
        esc(&r.run_id),
        esc(&word(&r.execution_outcome)),
        esc(&r.execution_started_at),
        esc(&r.execution_completed_at),
    );
    let _ = writeln!(
        m,
        "<section id=\"contract\"><h2>Contract</h2><dl>\
<dt>intent</dt><dd>{} by {}, triggered by {}, on {} host(s): {}</dd>\
<dt>desired revision</dt><dd><code>{}</code></dd>\
<dt>dispatch mode</dt><dd>{}</dd><dt>effective mode</dt><dd>{}</dd>\
<dt>policy</dt><dd><b>{}</b>: {}</dd>\
<dt>confirmation</dt><dd id=\"confirmation\">{}</dd>\
<dt>outcomes</dt><dd id=\"one-outcome\">{outcomes} outcome(s) for {targets} target host(s){}</dd></dl></section>",
        esc(&word(&i.action)),
        esc(&i.requested_by),
        esc(&word(&i.trigger)),
        targets,
        i.target_hosts
            .iter()
            .map(|h| esc(h))
            .collect::<Vec<_>>()
            .join(", "),
        esc(&r.desired_revision),
        esc(&word(&r.dispatch_mode)),
        esc(&word(&r.effective_mode)),
        esc(&word(&r.policy_outcome)),
        esc(&r.policy_reason),
        match &r.confirmation {
            None if r.policy_outcome == crate::core::report::PolicyOutcome::EscalationRequired => {
                "no token: the destructive steps were held".to_string()
            }
            None => "none needed".to_string(),
            Some(c) => format!(
                "operation <code>{}</code> for {}; token <code>{}</code>; scope match <b>{}</b>{}{}",
                esc(&c.operation),
                c.hosts
                    .iter()
                    .map(|h| esc(h))
                    .collect::<Vec<_>>()
                    .join(", "),
                esc(&c.token_file),
                if c.scope_match { "yes" } else { "no" },
                c.reason
                    .as_deref()
                    .map(|x| format!("; reason: {}", esc(x)))
                    .unwrap_or_default(),
                c.refusal
                    .as_deref()
                    .map(|x| format!("; refused: {}", esc(x)))
                    .unwrap_or_default(),
            ),
        },
        if outcomes == targets {
            " ✓ one per host"
        } else {
            " ✗ not one per host"
        },
    );

    m.push_str("<section><h2>Hosts</h2><table id=\"outcomes\"><thead><tr><th>host</th><th>outcome</th><th>reason</th><th>dispatch</th><th>attempts</th><th>changes</th><th>failure</th></tr></thead><tbody>\n");
    for o in &r.host_outcomes {
        let host = if is_host_name(&o.host) {
            format!("<a href=\"/hosts/{0}\">{0}</a>", esc(&o.host))
        } else {
            esc(&o.host)
        };
        let _ = writeln!(
            m,
            "<tr class=\"o-{oc}\"><td>{host}</td><td>{oc}</td><td>{}</td><td>{}</td><td>{}</td><td>+{} ~{} -{} ({} corrective, {} intentional)</td><td>{}</td></tr>",
            esc(o.reason.as_deref().unwrap_or("")),
            esc(&word(&o.dispatch_status)),
            o.attempt_count,
            o.changes.create,
            o.changes.update,
            o.changes.delete,
            o.corrective,
            o.intentional,
            match (&o.last_failure_class, &o.last_failure_message) {
                (Some(c), Some(msg)) => format!("{}: {}", esc(&word(c)), esc(msg)),
                (Some(c), None) => esc(&word(c)),
                _ => String::new(),
            },
            oc = esc(&word(&o.outcome)),
        );
    }
    m.push_str("</tbody></table></section>\n");
    m.push_str(&waterfall(r, timeline));
    m
}

/// One row per executed step (a step with at least one attempt), bars per
/// attempt on one time axis from the run's first event to its last.
fn waterfall(r: &RunResult, timeline: &[Value]) -> String {
    let mut attempts: BTreeMap<(String, u64), Vec<Attempt>> = BTreeMap::new();
    let mut first_start: BTreeMap<(String, u64), i64> = BTreeMap::new();
    let (mut t0, mut t1) = (i64::MAX, i64::MIN);
    for e in timeline {
        let Some(at) = e.get("at").and_then(Value::as_str).and_then(epoch_ms) else {
            continue;
        };
        t0 = t0.min(at);
        t1 = t1.max(at);
        let kind = e.get("kind").and_then(Value::as_str).unwrap_or("");
        let (Some(host), Some(step)) = (
            e.get("host").and_then(Value::as_str),
            e.get("step").and_then(Value::as_u64),
        ) else {
            continue;
        };
        let key = (host.to_string(), step);
        match kind {
            "step_started" => {
                first_start.entry(key.clone()).or_insert(at);
                attempts.entry(key).or_default().push(Attempt {
                    start: at,
                    end: None,
                    status: "running".into(),
                });
            }
            "step_finished" => {
                let status = e
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("finished")
                    .to_string();
                match attempts
                    .get_mut(&key)
                    .and_then(|v| v.iter_mut().rev().find(|a| a.end.is_none()))
                {
                    Some(a) => {
                        a.end = Some(at);
                        a.status = status;
                    }
                    None => attempts.entry(key).or_default().push(Attempt {
                        start: at,
                        end: Some(at),
                        status,
                    }),
                }
            }
            _ => {}
        }
    }
    let mut s = String::from("<section id=\"waterfall\"><h2>Timeline</h2>");
    if attempts.is_empty() {
        s.push_str("<p class=\"muted\">No step ran in this run.</p></section>\n");
        return s;
    }
    let span = (t1 - t0).max(1) as f64;
    let _ = writeln!(
        s,
        "<p class=\"muted\">{} step(s) over {:.3} s; each bar is an attempt, from its start to its end.</p><table class=\"wf\"><thead><tr><th>host</th><th>step</th><th>status</th><th>start</th><th>took</th><th class=\"wf-axis\">timeline</th><th>log</th></tr></thead><tbody>",
        attempts.len(),
        span / 1000.0
    );
    // Rows in the order the steps first started.
    let mut keys: Vec<&(String, u64)> = attempts.keys().collect();
    keys.sort_by_key(|k| {
        (
            first_start.get(*k).copied().unwrap_or(i64::MAX),
            (*k).clone(),
        )
    });
    for key in keys {
        let (host, step) = key;
        let list = &attempts[key];
        let outcome = r.host_outcomes.iter().find(|o| &o.host == host);
        let so = outcome.and_then(|o| o.steps.get(*step as usize));
        let id = so.map(|x| x.id.as_str()).unwrap_or("");
        let status = so
            .map(|x| word(&x.status))
            .unwrap_or_else(|| list.last().map(|a| a.status.clone()).unwrap_or_default());
        let start = list.iter().map(|a| a.start).min().unwrap_or(t0);
        let end = list.iter().map(|a| a.end.unwrap_or(t1)).max().unwrap_or(t1);
        let mut bars = String::new();
        for a in list {
            let x = (a.start - t0) as f64 / span * 1000.0;
            let w = ((a.end.unwrap_or(t1) - a.start) as f64 / span * 1000.0).max(2.0);
            let _ = write!(
                bars,
                "<rect class=\"s-{}\" x=\"{x:.1}\" y=\"1\" width=\"{w:.1}\" height=\"10\"/>",
                esc(&a.status)
            );
        }
        let log = so
            .and_then(|x| x.log.as_deref())
            .and_then(|rel| log_href(&r.run_id, rel))
            .map(|href| format!("<a class=\"log\" href=\"{}\">log</a>", esc(&href)))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "<tr class=\"wf-row\" data-host=\"{h}\" data-step=\"{step}\"><td>{h}</td><td>#{step} <code>{}</code></td><td class=\"s-{st}\">{st}{}</td><td>+{:.3} s</td><td>{:.3} s</td><td class=\"wf-axis\"><svg viewBox=\"0 0 1000 12\" preserveAspectRatio=\"none\">{bars}</svg></td><td>{log}</td></tr>",
            esc(id),
            if list.len() > 1 {
                format!(" ({} attempts)", list.len())
            } else {
                String::new()
            },
            (start - t0) as f64 / 1000.0,
            (end - start) as f64 / 1000.0,
            h = esc(host),
            st = esc(&status),
        );
    }
    s.push_str("</tbody></table></section>\n");
    s
}

/// The dashboard's link to a step log, from `StepOutcome.log`
/// (`runs/<run-id>/hosts/<host>/<file>`), when every part is of its shape.
pub fn log_href(run_id: &str, rel: &str) -> Option<String> {
    let rest = rel.strip_prefix("runs/")?;
    let mut parts = rest.split('/');
    let (Some(id), Some("hosts"), Some(host), Some(file), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    (id == run_id && is_host_name(host) && is_log_name(file))
        .then(|| format!("/runs/{id}/logs/{host}/{file}"))
}

/// A step log's file name: `<index>-<safe id>.log`, as `StateDir` writes it.
pub fn is_log_name(f: &str) -> bool {
    let Some(stem) = f.strip_suffix(".log") else {
        return false;
    };
    let Some((n, rest)) = stem.split_once('-') else {
        return false;
    };
    !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
        && !rest.is_empty()
        && f.len() <= 255
        && f != ".."
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::report::{AwaitingConfirmation, ConditionType, fixtures};

    const NOW: i64 = 1_796_000_000;

    #[test]
    fn text_is_escaped_everywhere() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        let mut s = HostStatus::new("web-1", "2026-12-01T00:00:00Z");
        s.set_condition(
            ConditionType::Reachable,
            ConditionStatus::False,
            "ProbeFailed",
            "<script>alert(1)</script>",
            "2026-12-01T00:00:00Z",
        );
        let page = host_main(&s, Some("host web-1: <img src=x>"), &[], NOW);
        assert!(
            !page.contains("<script") && !page.contains("<img"),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;"));
        let f = FleetStatus::from_statuses("<b>", [&s]);
        let mut st = BTreeMap::new();
        st.insert("web-1".to_string(), s);
        let main = fleet_main(&f, &st, NOW);
        assert!(
            !main.contains("<script") && main.contains("&lt;b&gt;"),
            "{main}"
        );
    }

    #[test]
    fn the_fleet_lists_hosts_trouble_first_and_the_confirm_line() {
        let ok = {
            let mut s = HostStatus::new("a-ok", "2026-12-01T00:00:00Z");
            s.phase = Phase::Running;
            for k in ConditionType::ALL {
                let good = match k {
                    ConditionType::Reachable
                    | ConditionType::Converged
                    | ConditionType::ValidDesiredState => ConditionStatus::True,
                    _ => ConditionStatus::False,
                };
                s.set_condition(k, good, "Fine", "", "2026-12-01T00:00:00Z");
            }
            s
        };
        let mut held = ok.clone();
        held.host = "b-held".into();
        held.phase = Phase::Ready;
        held.set_condition(
            ConditionType::AwaitingConfirmation,
            ConditionStatus::True,
            "TokenRequired",
            "1 destructive step awaits a token",
            "2026-12-01T00:00:00Z",
        );
        held.awaiting_confirmation = Some(AwaitingConfirmation {
            operation: "abcdef0123456789abcdef".into(),
            hosts: vec!["b-held".into()],
            steps: vec!["file:/srv/old".into()],
            token_file: "confirm/x.yaml".into(),
            command: "tend confirm abcdef0123456789abcdef --hosts b-held --reason TEXT".into(),
        });
        let mut f = FleetStatus::from_statuses("now", [&ok, &held]);
        f.hosts[0].tags = vec!["web".into()];
        let st: BTreeMap<String, HostStatus> = [ok, held]
            .into_iter()
            .map(|s| (s.host.clone(), s))
            .collect();
        let m = fleet_main(&f, &st, NOW);
        let held_at = m.find("data-host=\"b-held\"").unwrap();
        let ok_at = m.find("data-host=\"a-ok\"").unwrap();
        assert!(held_at < ok_at, "trouble first");
        assert!(m.contains("data-state=\"awaiting\""));
        assert!(m.contains("data-state=\"ready\" data-tags=\"web\""), "{m}");
        assert!(m.contains("<code class=\"cmd\">tend confirm abcdef0123456789abcdef --hosts b-held --reason TEXT</code>"));
        assert!(m.contains("<b id=\"ready-count\">1</b>"));
    }

    #[test]
    fn a_halted_rollout_shows_its_wave_budget_and_why() {
        let mut f = FleetStatus::from_statuses("now", []);
        f.rollout = Some(crate::core::report::RolloutStatus {
            revision: "sha256:0123456789abcdef".into(),
            state: "Halted".into(),
            wave: 2,
            waves: 3,
            failed_hosts: vec!["web-2".into(), "web-3".into()],
            budget: 1,
            halted_reason: Some("2 hosts failed in wave 2, more than the budget of 1".into()),
        });
        let m = fleet_main(&f, &BTreeMap::new(), NOW);
        assert!(m.contains("id=\"rollout\" class=\"panel st-bad\""), "{m}");
        assert!(m.contains("<code>0123456789ab</code>"), "{m}");
        assert!(m.contains("<b class=\"rollout-state\">Halted</b>, wave 2 of 3; failure budget 1, failed so far 2 (web-2, web-3)"), "{m}");
        assert!(
            m.contains("Halted: 2 hosts failed in wave 2, more than the budget of 1."),
            "{m}"
        );
        assert!(m.contains("tend resume --reason TEXT"));
        f.rollout = None;
        assert!(!fleet_main(&f, &BTreeMap::new(), NOW).contains("id=\"rollout\""));
    }

    #[test]
    fn plans_are_classed_by_line() {
        let h = plan_html(
            "host a: 1 to create\n    + file:/x create\n        +new\n        -old\n        @@ -1 +1 @@\n  ---- barrier: x ----\n",
        );
        for cls in ["hh", "add", "del", "hunk", "barrier"] {
            assert!(h.contains(&format!("<span class=\"{cls}\">")), "{cls}: {h}");
        }
    }

    #[test]
    fn log_links_only_for_log_paths_of_the_run() {
        let id = "r-20261207T070111Z-z1he";
        assert_eq!(
            log_href(id, &format!("runs/{id}/hosts/h1/0-file__x.log")).as_deref(),
            Some(format!("/runs/{id}/logs/h1/0-file__x.log").as_str())
        );
        for bad in [
            format!("runs/{id}/hosts/h1/../x.log"),
            format!("runs/{id}/hosts/../0-x.log"),
            "runs/other/hosts/h1/0-x.log".to_string(),
            format!("runs/{id}/hosts/h1/0-x.txt"),
            format!("runs/{id}/hosts/h1/a/0-x.log"),
            "/etc/passwd".to_string(),
        ] {
            assert_eq!(log_href(id, &bad), None, "{bad}");
        }
        assert!(is_log_name("12-file__srv_a.conf.log"));
        for bad in [
            "x.log",
            "-a.log",
            "1-.log",
            "1-a/b.log",
            "1-a b.log",
            "1-a.txt",
            "..",
            "",
        ] {
            assert!(!is_log_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_waterfall_has_a_row_per_executed_step() {
        let r = fixtures::run_result("r-20261207T070111Z-z1he", &["h1"]);
        let tl: Vec<Value> = [
            r#"{"at":"2026-12-07T07:01:11.500Z","kind":"run_started","host":null}"#,
            r#"{"at":"2026-12-07T07:01:11.566Z","kind":"step_started","host":"h1","step":0,"attempt":1}"#,
            r#"{"at":"2026-12-07T07:01:11.572Z","kind":"step_finished","host":"h1","step":0,"attempt":1,"status":"failed"}"#,
            r#"{"at":"2026-12-07T07:01:11.580Z","kind":"step_started","host":"h1","step":0,"attempt":2}"#,
            r#"{"at":"2026-12-07T07:01:11.590Z","kind":"step_finished","host":"h1","step":0,"attempt":2,"status":"succeeded"}"#,
            r#"{"at":"2026-12-07T07:01:11.591Z","kind":"step_started","host":"h1","step":1,"attempt":1}"#,
            r#"{"at":"2026-12-07T07:01:11.600Z","kind":"run_finished","host":null}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        let m = run_main(&r, &tl);
        assert_eq!(m.matches("class=\"wf-row\"").count(), 2, "{m}");
        assert!(m.contains("(2 attempts)"));
        assert_eq!(m.matches("<rect ").count(), 3);
        assert!(m.contains("id=\"one-outcome\""));
    }
}
