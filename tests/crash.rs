//! The crash campaign (RELIABILITY.md): `kill -9` of `tend run`, then of
//! `tend apply`, at seeded points of rounds of applies on four hosts of the
//! second fleet, with destructive steps (deletes, prunes, a destructive
//! command) and tokens, a rollout whose wave-1 host fails now and then
//! (a halt), and a guarded file on h4 (`guard: connection`).
//!
//! Each round commits a new desired state, then kills the controller at a
//! seeded point: after a random delay, as soon as a destructive step was
//! sent, or as soon as a guard is armed. The test then checks tend.db
//! (`integrity_check`), restarts, confirms what the round confirms (again
//! when a crash consumed the token before its step ran), waits until every
//! host settled, and checks:
//!
//! - every run open at the kill is closed (`Interrupted`);
//! - each run's record matches its timeline (a step the timeline shows
//!   started is recorded as run, with the status of its last finish);
//! - what the hosts did is recorded: every `work-N` and `destroy-N` marker
//!   on a host has a recorded attempt of that step;
//! - no destructive command ran twice (the host's journal) or without a
//!   token the test gave for that host and round; every destructive attempt
//!   in the records belongs to a run that used a token covering that host;
//!   no token was used twice;
//! - the first pass after the restart that dispatches to a host does not
//!   fail (the host converges within one pass), the planned failures aside;
//! - a halted rollout stays halted across a kill and a restart;
//! - every guard is settled once: disarmed (the new content kept) or
//!   reverted, one tombstone on the host matching the record, never both.
//!
//! `TEND_CRASH_ROUNDS` (default 4 for `tend run` and 2 for `tend apply`,
//! which CI runs; the full campaign is 60) and `TEND_CRASH_SEED` (printed)
//! replay a run.

#[path = "support/rng.rs"]
mod rng;
#[path = "support/fleet.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rng::Rng;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use support::{Daemon, Desired, Fleet, code, minutes_from_now, scale_fleet, text};

const HOSTS: [&str; 4] = ["h1", "h2", "h3", "h4"];
/// The host with the guarded file.
const GUARDED: &str = "h4";
/// The wave-1 host, failed on purpose in halting rounds.
const FIRST: &str = "h1";
const SETTLE: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq)]
enum KillAt {
    /// This many milliseconds after the commit (or the start of `tend apply`).
    Delay(u64),
    /// As soon as a destructive step's attempt is recorded as sent.
    Destructive,
    /// As soon as a guard is armed.
    GuardArmed,
}

#[derive(Debug)]
struct Round {
    n: u32,
    halt: bool,
    confirm: BTreeSet<&'static str>,
    kill: KillAt,
}

/// Round `n`'s plan. Every campaign, however short, has a halt (round 2)
/// and kills at a destructive step (1) and at an armed guard (3); the
/// rest is drawn.
impl Round {
    /// Round 0: the starting point, applied without a kill.
    fn first() -> Round {
        Round {
            n: 0,
            halt: false,
            confirm: BTreeSet::new(),
            kill: KillAt::Delay(0),
        }
    }
}

fn plan_round(rng: &mut Rng, n: u32) -> Round {
    let halt = rng.below(6) == 0 || n == 2;
    let confirm = HOSTS
        .iter()
        .copied()
        .filter(|_| rng.below(4) != 0)
        .collect();
    let drawn = match rng.below(20) {
        0..=11 => KillAt::Delay(rng.below(3000) as u64),
        12..=16 => KillAt::Destructive,
        _ => KillAt::GuardArmed,
    };
    let kill = match n {
        1 => KillAt::Destructive,
        3 => KillAt::GuardArmed,
        // A halt keeps h4, and its guard, from being dispatched.
        _ if halt && drawn == KillAt::GuardArmed => KillAt::Destructive,
        _ => drawn,
    };
    Round {
        n,
        halt,
        confirm,
        kill,
    }
}

const TEND_YAML: &str = "dispatch: enforced\nprobe_timeout: 10s\nretries: 1\nretry_backoff: 100ms\nresync: 1h\nquiet_window: 100ms\nmax_defer: 500ms\nrollout:\n  waves: [1, 100%]\n  max_failures: 0\n";

/// A host's desired state in round `n` under `root`.
fn body(root: &str, host: &str, n: u32, halt: bool) -> String {
    let mut s = format!("resources:\n  - kind: directory\n    path: {root}\n");
    for i in 0..12 {
        let _ = write!(
            s,
            "  - kind: file\n    path: {root}/f{i}\n    content: \"{host} round {n} file {i}\\n\"\n"
        );
    }
    let _ = write!(
        s,
        "  - kind: command\n    name: work-{n}\n    run: \"sleep 0.2; echo {n} >> {root}/work; touch {root}/work-{n}\"\n    creates: {root}/work-{n}\n  - kind: file\n    path: {root}/victim-{n}\n    content: \"victim {n}\\n\"\n"
    );
    if n > 0 {
        let _ = write!(
            s,
            "  - kind: file\n    path: {root}/victim-{}\n    state: absent\n  - kind: command\n    name: destroy-{n}\n    destructive: true\n    run: \"echo {n} >> {root}/destroyed; touch {root}/destroyed-{n}\"\n    creates: {root}/destroyed-{n}\n",
            n - 1
        );
    }
    if halt && host == FIRST {
        let _ = write!(
            s,
            "  - kind: command\n    name: fail-{n}\n    run: \"echo planned failure >&2; exit 7\"\n    creates: {root}/never\n"
        );
    }
    if host == GUARDED {
        let _ = write!(
            s,
            "  - kind: file\n    path: {root}/guarded.conf\n    content: \"round {n}\\n\"\n    guard: connection\n    revert_after: 30s\n"
        );
    }
    s
}

fn write_round(d: &Desired, root: &str, r: &Round) {
    for h in HOSTS {
        fs::write(
            d.dir().join("hosts").join(format!("{h}.yaml")),
            body(root, h, r.n, r.halt),
        )
        .unwrap();
    }
}

fn db(d: &Desired) -> Connection {
    let c = Connection::open_with_flags(
        d.state().join("tend.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open tend.db");
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

fn count(d: &Desired, sql: &str) -> i64 {
    if !d.state().join("tend.db").exists() {
        return 0;
    }
    db(d).query_row(sql, [], |r| r.get(0)).unwrap_or(0)
}

fn strings(d: &Desired, sql: &str) -> Vec<String> {
    let c = db(d);
    let mut st = c.prepare(sql).unwrap();
    st.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn status(d: &Desired, host: &str) -> Value {
    fs::read(d.state().join("status").join(format!("{host}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn fleet_rollout(d: &Desired) -> Value {
    fs::read(d.state().join("status/fleet.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map(|v| v["rollout"].clone())
        .unwrap_or(Value::Null)
}

fn condition(s: &Value, kind: &str) -> (String, String) {
    s["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_default()
}

/// What the campaign did and found.
#[derive(Default)]
struct Tally {
    rounds: u32,
    kills: u32,
    kills_mid_run: u32,
    interrupted_closed: u32,
    tokens_given: u32,
    tokens_again: u32,
    destructive_ran: u32,
    guards_disarmed: u32,
    guards_reverted: u32,
    halts_kept: u32,
    records_lost: u32,
    unfinished: u32,
    unauthorized: u32,
    duplicated: u32,
    tokens_reused: u32,
    panics: u32,
    failures: Vec<String>,
}

impl Tally {
    /// A panic in tend's output or log.
    fn panics_in(&mut self, what: &str, out: &str) {
        if out.contains("panicked at") {
            self.panics += 1;
            self.fail(format!("{what} panicked:\n{out}"));
        }
    }

    fn fail(&mut self, m: String) {
        eprintln!("FAIL: {m}");
        self.failures.push(m);
    }
}

/// Tokens the test wrote: operation -> (file, hosts), and per host the
/// rounds it confirmed.
#[derive(Default)]
struct Ledger {
    by_op: BTreeMap<String, String>,
    rounds: BTreeMap<&'static str, BTreeSet<u32>>,
    seq: u32,
}

impl Ledger {
    /// Write a token for `op` over `hosts` unless one is waiting unused.
    /// `last_run`: the run the host's status was written by.
    fn confirm(
        &mut self,
        d: &Desired,
        op: &str,
        hosts: &[String],
        round: u32,
        last_run: &str,
        t: &mut Tally,
    ) {
        if let Some(file) = self.by_op.get(op) {
            if d.state().join("confirm").join(file).exists() {
                return;
            }
            // Used, and a later pass still asks (the run that used it was
            // cut short by a kill before its step): another token. A status
            // not yet written by a later pass is not asking again.
            let later: i64 = db(d)
                .query_row(
                    "SELECT count(*) FROM tokens t JOIN runs u ON u.run_id = t.used_by_run
                     JOIN runs l ON l.run_id = ?2
                     WHERE t.file LIKE ?1 AND l.started_at > u.started_at",
                    [format!("%{file}"), last_run.to_string()],
                    |r| r.get(0),
                )
                .unwrap_or(0);
            if later == 0 {
                return;
            }
            t.tokens_again += 1;
        }
        self.seq += 1;
        let file = format!("t{}-r{round}.yaml", self.seq);
        let dir = d.state().join("confirm");
        fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!(".{file}.tmp"));
        fs::write(
            &tmp,
            format!(
                "operation: {op}\nhosts: [{}]\nexpires: {}\nreason: crash campaign round {round}, token {}\n",
                hosts.join(", "),
                minutes_from_now(30),
                self.seq
            ),
        )
        .unwrap();
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        fs::rename(&tmp, dir.join(&file)).unwrap();
        self.by_op.insert(op.to_string(), file);
        for h in hosts {
            if let Some(h) = HOSTS.iter().find(|x| **x == h.as_str()) {
                self.rounds.entry(h).or_default().insert(round);
            }
        }
        t.tokens_given += 1;
    }
}

/// Wait for the kill point; true when it was reached (false: the deadline
/// passed, the kill lands after the round's work).
fn reach(d: &Desired, kill: KillAt, start: Instant, sent_before: i64, armed_before: i64) -> bool {
    let deadline = start + Duration::from_secs(20);
    loop {
        let hit = match kill {
            KillAt::Delay(ms) => start.elapsed() >= Duration::from_millis(ms),
            KillAt::Destructive => {
                count(
                    d,
                    "SELECT count(*) FROM step_attempts WHERE destructive = 1",
                ) > sent_before
            }
            KillAt::GuardArmed => count(d, "SELECT count(*) FROM guards") > armed_before,
        };
        if hit {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After a kill: the database is whole, and the runs it left open.
fn after_kill(d: &Desired, t: &mut Tally) -> Vec<String> {
    t.kills += 1;
    if !d.state().join("tend.db").exists() {
        return vec![];
    }
    // Opened for writing, as tend opens it: a kill's journal is rolled
    // back or its WAL replayed before the check.
    let ok: String = Connection::open(d.state().join("tend.db"))
        .and_then(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get(0)))
        .unwrap_or_else(|e| format!("open: {e}"));
    if ok != "ok" {
        t.fail(format!("integrity_check after a kill: {ok}"));
    }
    let open = strings(d, "SELECT run_id FROM runs WHERE execution_outcome IS NULL");
    if !open.is_empty() {
        t.kills_mid_run += 1;
    }
    open
}

/// The runs open at a kill are closed, as `Interrupted`.
fn check_closed(d: &Desired, open: &[String], t: &mut Tally) {
    for id in open {
        let rec = db(d)
            .query_row(
                "SELECT execution_outcome FROM runs WHERE run_id = ?1",
                [id],
                |r| r.get::<_, Option<String>>(0),
            )
            .ok()
            .flatten();
        match rec.as_deref() {
            Some("Interrupted") => t.interrupted_closed += 1,
            Some(other) => t.fail(format!("run {id} open at the kill closed as {other}")),
            None => {
                t.unfinished += 1;
                t.fail(format!("run {id} open at the kill is still unfinished"));
            }
        }
    }
}

/// Every host settled for round `r`: at the revision, or waiting for a
/// token the round withholds, or held by the round's halt or a revert.
/// Confirms what the round confirms on the way.
fn settle(
    d: &Desired,
    rev: &str,
    r: &Round,
    ledger: &mut Ledger,
    t: &mut Tally,
    log: &dyn Fn() -> String,
) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut waiting = Vec::new();
        let rollout = fleet_rollout(d);
        let halted = rollout["state"] == "Halted" && rollout["revision"] == rev;
        for h in HOSTS {
            let s = status(d, h);
            if s["desired_revision"] != rev {
                waiting.push(format!("{h}: not at the revision yet"));
                continue;
            }
            if let Some(op) = s["awaiting_confirmation"]["operation"].as_str() {
                if r.confirm.contains(h) && !halted {
                    let hosts: Vec<String> =
                        serde_json::from_value(s["awaiting_confirmation"]["hosts"].clone())
                            .unwrap_or_default();
                    let last = s["last_run_id"].as_str().unwrap_or("");
                    ledger.confirm(d, op, &hosts, r.n, last, t);
                    waiting.push(format!("{h}: confirmed {op}"));
                }
                continue;
            }
            if s["converged_revision"] == rev {
                continue;
            }
            if halted && condition(&s, "Converged").1 == "RolloutHalted" {
                continue;
            }
            if halted && h == FIRST {
                continue;
            }
            if h == GUARDED && condition(&s, "Converged").1 == "GuardReverted" {
                continue;
            }
            waiting.push(format!("{h}: {}", s["phase"]));
        }
        if r.halt && !halted && waiting.is_empty() {
            waiting.push(format!("the rollout to halt: {rollout}"));
        }
        if waiting.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let tail: Vec<String> = log().lines().rev().take(40).map(String::from).collect();
            t.fail(format!(
                "round {} did not settle: {waiting:?}\nlog tail:\n{}",
                r.n,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn timeline(d: &Desired, run: &str) -> Vec<Value> {
    fs::read_to_string(d.state().join("runs").join(run).join("timeline.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Each finished run's record against its timeline; the first pass after
/// a restart (runs in `fresh`) against "converges within one pass".
fn check_records(d: &Desired, fresh: &BTreeSet<String>, t: &mut Tally) {
    let mut first_seen: BTreeSet<String> = BTreeSet::new();
    let mut runs: Vec<(String, Value)> = d
        .run_ids()
        .into_iter()
        .filter_map(|id| {
            let p = d.state().join("runs").join(&id).join("result.json");
            let v: Value = serde_json::from_slice(&fs::read(p).ok()?).ok()?;
            Some((id, v))
        })
        .collect();
    runs.sort_by(|a, b| {
        let k = |v: &Value| v["execution_started_at"].as_str().unwrap_or("").to_string();
        k(&a.1).cmp(&k(&b.1))
    });
    for (id, r) in &runs {
        let events = timeline(d, id);
        for o in r["host_outcomes"].as_array().into_iter().flatten() {
            let host = o["host"].as_str().unwrap_or("");
            for s in o["steps"].as_array().into_iter().flatten() {
                let sid = s["id"].as_str().unwrap_or("");
                let mine = |kind: &str| {
                    events
                        .iter()
                        .filter(|e| e["kind"] == kind && e["host"] == host && e["id"] == sid)
                        .collect::<Vec<_>>()
                };
                let started = mine("step_started");
                let finished = mine("step_finished");
                let status = s["status"].as_str().unwrap_or("");
                if !started.is_empty() && !["succeeded", "failed"].contains(&status) {
                    t.records_lost += 1;
                    t.fail(format!(
                        "run {id} {host} {sid}: the timeline shows it started, the record says {status}"
                    ));
                }
                if let Some(last) = finished.last()
                    && last["status"] != status
                {
                    t.fail(format!(
                        "run {id} {host} {sid}: finished {} in the timeline, {status} in the record",
                        last["status"]
                    ));
                }
                if (s["attempts"].as_u64().unwrap_or(0) as usize) < started.len() {
                    t.fail(format!(
                        "run {id} {host} {sid}: {} attempts recorded, {} started",
                        s["attempts"],
                        started.len()
                    ));
                }
            }
            // The first pass after a restart that dispatched to the host.
            if fresh.contains(id)
                && o["dispatch_status"] == "dispatched"
                && first_seen.insert(host.to_string())
            {
                let out = o["outcome"].as_str().unwrap_or("");
                let planned_failure = host == FIRST
                    && o["last_failure_message"]
                        .as_str()
                        .is_some_and(|m| m.contains("planned failure"));
                let reverted = o["last_failure_message"]
                    .as_str()
                    .is_some_and(|m| m.contains("reverted"));
                if !["Completed", "NoChange", "EscalationRequired", "Planned"].contains(&out)
                    && !planned_failure
                    && !reverted
                {
                    t.fail(format!(
                        "{host}: the first pass after a restart (run {id}) ended {out}: {}",
                        o["last_failure_message"]
                    ));
                }
            }
        }
    }
}

/// What the hosts did against the records and the tokens given.
fn check_hosts(f: &Fleet, d: &Desired, root: &str, ledger: &Ledger, t: &mut Tally) {
    let c = db(d);
    let attempted = |host: &str, id: &str| -> bool {
        c.query_row(
            "SELECT count(*) FROM step_attempts WHERE host = ?1 AND resource_id = ?2",
            [host, id],
            |r| r.get::<_, i64>(0),
        )
        .unwrap_or(0)
            > 0
    };
    for h in HOSTS {
        let out = f.sh(
            h,
            &format!("cd {root} 2>/dev/null || exit 0; echo W $(cat work 2>/dev/null); echo D $(cat destroyed 2>/dev/null)"),
        );
        let nums = |tag: &str| -> Vec<u32> {
            out.lines()
                .find_map(|l| l.strip_prefix(tag))
                .map(|l| {
                    l.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        for n in nums("W") {
            if !attempted(h, &format!("command:work-{n}")) {
                t.records_lost += 1;
                t.fail(format!(
                    "{h}: work-{n} ran on the host, no attempt recorded"
                ));
            }
        }
        let destroyed = nums("D");
        let mut seen = BTreeSet::new();
        for n in &destroyed {
            if !seen.insert(*n) {
                t.duplicated += 1;
                t.fail(format!("{h}: destroy-{n} ran twice"));
            }
            if !ledger.rounds.get(h).is_some_and(|r| r.contains(n)) {
                t.unauthorized += 1;
                t.fail(format!(
                    "{h}: destroy-{n} ran without a token for round {n}"
                ));
            }
            if !attempted(h, &format!("command:destroy-{n}")) {
                t.records_lost += 1;
                t.fail(format!(
                    "{h}: destroy-{n} ran on the host, no attempt recorded"
                ));
            }
        }
    }
    // Every destructive attempt that may have run belongs to a run that
    // used a token covering its host.
    let mut st = c
        .prepare(
            "SELECT a.run_id, a.host, a.resource_id FROM step_attempts a
             WHERE a.destructive = 1 AND (a.phase = 'started' OR (a.phase = 'finished' AND a.status IN ('succeeded', 'failed')))",
        )
        .unwrap();
    let rows: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    t.destructive_ran = rows.len() as u32;
    for (run, host, id) in rows {
        let covered: i64 = c
            .query_row(
                "SELECT (SELECT count(*) FROM tokens WHERE used_by_run = ?1 AND hosts_json LIKE ?2)
                      + (SELECT count(*) FROM token_operations WHERE used_by_run = ?1 AND hosts_json LIKE ?2)",
                [&run, &format!("%\"{host}\"%")],
                |r| r.get(0),
            )
            .unwrap_or(0);
        if covered == 0 {
            t.unauthorized += 1;
            t.fail(format!(
                "run {run}: destructive {id} on {host} without a token used by the run"
            ));
        }
    }
    // No token used twice: each used token file once in confirm/used, each
    // operation of a token used by one run.
    let reused: i64 = c
        .query_row(
            "SELECT count(*) FROM (SELECT sha256, operation FROM token_operations GROUP BY sha256, operation HAVING count(DISTINCT used_by_run) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    t.tokens_reused = reused as u32;
    if reused > 0 {
        t.fail(format!(
            "{reused} token operations used by more than one run"
        ));
    }
    // Guards: settled once, the host's tombstone matching the record.
    let mut st = c
        .prepare("SELECT guard_id, host, state FROM guards")
        .unwrap();
    let guards: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let (mut disarmed, mut reverted) = (0, 0);
    for (id, host, state) in guards {
        let on_host = f.sh(
            &host,
            &format!(
                "cd /var/lib/tend/guard 2>/dev/null || exit 0; for s in disarmed reverted; do test -e {id}.$s && echo $s; done; test -e {id} && echo open; true"
            ),
        );
        let on_host: Vec<&str> = on_host.lines().collect();
        match state.as_str() {
            "disarmed" | "reverted" if on_host == [state.as_str()] => {
                if state == "disarmed" {
                    disarmed += 1
                } else {
                    reverted += 1
                }
            }
            "not_armed" if on_host.is_empty() => {}
            _ => t.fail(format!(
                "guard {id} on {host}: recorded {state}, on the host {on_host:?}"
            )),
        }
    }
    t.guards_disarmed = disarmed;
    t.guards_reverted = reverted;
}

fn restart_and_settle(
    d: &Desired,
    rev: &str,
    r: &Round,
    open: &[String],
    ledger: &mut Ledger,
    t: &mut Tally,
) -> (Daemon, BTreeSet<String>) {
    let before = d.run_ids();
    let daemon = Daemon::start(d);
    settle(d, rev, r, ledger, t, &|| daemon.log());
    check_closed(d, open, t);
    let fresh = d
        .run_ids()
        .difference(&before)
        .filter(|id| !open.contains(id))
        .cloned()
        .collect();
    (daemon, fresh)
}

/// A halted rollout stays halted: kill the controller once the halt is
/// recorded, restart it, wait for its start-up pass, check again.
fn check_halt_kept(d: &Desired, rev: &str, daemon: Daemon, t: &mut Tally) -> Daemon {
    let mut daemon = daemon;
    daemon.signal("-KILL");
    daemon.wait(Duration::from_secs(10));
    t.panics_in("tend run", &daemon.log());
    let open = after_kill(d, t);
    // The start-up pass of every host ends (the debug log says so: a
    // pass the halt holds records nothing).
    let daemon = Daemon::start_with_env(d, &[("TEND_LOG", std::ffi::OsStr::new("debug"))]);
    let deadline = Instant::now() + SETTLE;
    let ended = |log: &str, h: &str| {
        log.lines()
            .any(|l| l.contains("pass ends") && l.contains(&format!("host={h} ")))
    };
    while !HOSTS.iter().all(|h| ended(&daemon.log(), h)) {
        if Instant::now() >= deadline {
            t.fail(format!(
                "no pass ended after the restart of a halted rollout:\n{}",
                daemon.log()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check_closed(d, &open, t);
    let rollout = fleet_rollout(d);
    if rollout["state"] != "Halted" || rollout["revision"] != rev {
        t.fail(format!(
            "the halted rollout did not stay halted after a restart: {rollout}"
        ));
    } else {
        t.halts_kept += 1;
    }
    for h in &HOSTS[1..] {
        if status(d, h)["converged_revision"] == rev {
            t.fail(format!("{h} got the halted revision after a restart"));
        }
    }
    daemon
}

fn seed() -> u64 {
    std::env::var("TEND_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

fn rounds(default: u32) -> u32 {
    std::env::var("TEND_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `kill -9` of `tend run`.
fn run_phase(f: &Fleet, rng: &mut Rng, t: &mut Tally) {
    let root = "/srv/crash";
    for h in HOSTS {
        f.sh(h, &format!("rm -rf {root} /var/lib/tend/guard"));
    }
    let d = Desired::new(TEND_YAML, &f.inventory(&HOSTS), &[]);
    let r0 = Round::first();
    write_round(&d, root, &r0);
    d.init_git();
    let mut ledger = Ledger::default();
    let rev = support::git(d.dir(), &["rev-parse", "HEAD"]);
    let mut daemon = Daemon::start(&d);
    settle(&d, &rev, &r0, &mut ledger, t, &|| daemon.log());
    let mut fresh = BTreeSet::new();
    for n in 1..=rounds(4) {
        let r = plan_round(rng, n);
        println!("crash: tend run round {n}: {r:?}");
        let sent = count(
            &d,
            "SELECT count(*) FROM step_attempts WHERE destructive = 1",
        );
        let armed = count(&d, "SELECT count(*) FROM guards");
        write_round(&d, root, &r);
        let start = Instant::now();
        let rev = d.commit(&format!("round {n}"));
        // Tokens for the round, as soon as the hosts ask (before the kill
        // for the kill points that wait for a destructive step).
        if r.kill == KillAt::Destructive {
            settle_confirm_only(&d, &rev, &r, &mut ledger, t);
        }
        reach(&d, r.kill, start, sent, armed);
        daemon.signal("-KILL");
        daemon.wait(Duration::from_secs(10));
        t.panics_in("tend run", &daemon.log());
        let open = after_kill(&d, t);
        // A pass of the round before that this kill cut short has no
        // verdict: not "the first pass after a restart".
        for id in &open {
            fresh.remove(id);
        }
        let (dm, new) = restart_and_settle(&d, &rev, &r, &open, &mut ledger, t);
        daemon = dm;
        fresh.extend(new);
        if r.halt && fleet_rollout(&d)["state"] == "Halted" {
            daemon = check_halt_kept(&d, &rev, daemon, t);
        }
        t.rounds += 1;
    }
    daemon.signal("-TERM");
    daemon.wait(Duration::from_secs(60));
    t.panics_in("tend run", &daemon.log());
    let open = count(
        &d,
        "SELECT count(*) FROM runs WHERE execution_outcome IS NULL",
    );
    if open > 0 {
        t.unfinished += open as u32;
        t.fail(format!(
            "{open} runs unfinished after the controller stopped"
        ));
    }
    check_records(&d, &fresh, t);
    check_hosts(f, &d, root, &ledger, t);
    keep_on_failure(d, t);
}

/// A failing campaign keeps its desired-state and state dirs to look at.
fn keep_on_failure(d: Desired, t: &Tally) {
    if !t.failures.is_empty() {
        println!("crash: kept {}", d.tmp.keep().display());
    }
}

/// Confirm what the round confirms as soon as the hosts ask, for a while.
fn settle_confirm_only(d: &Desired, rev: &str, r: &Round, ledger: &mut Ledger, t: &mut Tally) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut asked = BTreeSet::new();
    while Instant::now() < deadline && asked.len() < r.confirm.len() {
        for h in &r.confirm {
            let s = status(d, h);
            if s["desired_revision"] != rev {
                continue;
            }
            if let Some(op) = s["awaiting_confirmation"]["operation"].as_str() {
                let hosts: Vec<String> =
                    serde_json::from_value(s["awaiting_confirmation"]["hosts"].clone())
                        .unwrap_or_default();
                let last = s["last_run_id"].as_str().unwrap_or("");
                ledger.confirm(d, op, &hosts, r.n, last, t);
                asked.insert(*h);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tend apply` as a child, killed at the round's point; then applied to
/// the end, confirming as the round says.
fn apply_phase(f: &Fleet, rng: &mut Rng, t: &mut Tally) {
    let root = "/srv/crash-apply";
    for h in HOSTS {
        f.sh(h, &format!("rm -rf {root} /var/lib/tend/guard"));
    }
    let d = Desired::new(TEND_YAML, &f.inventory(&HOSTS), &[]);
    let mut ledger = Ledger::default();
    let r0 = Round::first();
    write_round(&d, root, &r0);
    let first = d.tend(&["apply", "--dispatch", "enforced"]);
    if code(&first) != 0 {
        t.fail(format!("apply of round 0: {}", text(&first)));
    }
    for n in 1..=rounds(2) {
        let mut r = plan_round(rng, n);
        // One operation covers every host of `tend apply`: all or none.
        if r.confirm.len() < HOSTS.len() / 2 {
            r.confirm.clear();
        } else {
            r.confirm = HOSTS.iter().copied().collect();
        }
        println!("crash: tend apply round {n}: {r:?}");
        write_round(&d, root, &r);
        let give = |ledger: &mut Ledger, t: &mut Tally| {
            if r.confirm.is_empty() {
                return;
            }
            let plan = d.tend(&["plan", "--json"]);
            let Ok(plan) = serde_json::from_slice::<Value>(&plan.stdout) else {
                return t.fail(format!("plan --json: {}", text(&plan)));
            };
            if let Some(op) = plan["operation"].as_str() {
                let hosts: Vec<String> =
                    serde_json::from_value(plan["operation_hosts"].clone()).unwrap_or_default();
                let last = d.last_result()["run_id"].as_str().unwrap_or("").to_string();
                ledger.confirm(&d, op, &hosts, r.n, &last, t);
            }
        };
        give(&mut ledger, t);
        let sent = count(
            &d,
            "SELECT count(*) FROM step_attempts WHERE destructive = 1",
        );
        let armed = count(&d, "SELECT count(*) FROM guards");
        let mut child = d.spawn(
            &["apply", "--dispatch", "enforced"],
            Stdio::null(),
            Stdio::null(),
        );
        let start = Instant::now();
        reach(&d, r.kill, start, sent, armed);
        let _ = child.kill();
        let _ = child.wait();
        let open = after_kill(&d, t);
        // Apply to the end: a guard armed at the kill makes the next apply
        // wait for its time; a token the killed run consumed is given again.
        let before = d.run_ids();
        let mut last = -1;
        for _ in 0..4 {
            let out = d.tend(&["apply", "--dispatch", "enforced"]);
            t.panics_in("tend apply", &text(&out));
            last = code(&out);
            if ![0, 2, 3, 4].contains(&last) {
                t.fail(format!("apply after the kill in round {n}: {}", text(&out)));
                break;
            }
            if last == 3 && !r.confirm.is_empty() {
                give(&mut ledger, t);
                continue;
            }
            if last == 2 && !r.halt {
                continue;
            }
            break;
        }
        check_closed(&d, &open, t);
        let want = if r.halt {
            4
        } else if r.confirm.is_empty() {
            3
        } else {
            0
        };
        let reverted = condition(&status(&d, GUARDED), "Converged").1 == "GuardReverted";
        // A reverted guard holds h4 (`GuardReverted`, policy): exit 3, or 4
        // with the revert's failed step in the same run.
        if last != want && !(reverted && [3, 4].contains(&last)) && !(r.halt && last == 2) {
            t.fail(format!(
                "round {n}: tend apply ended {last}, expected {want}"
            ));
        }
        if r.halt && fleet_rollout(&d)["state"] == "Halted" {
            let again = d.tend(&["apply", "--dispatch", "enforced"]);
            if code(&again) != 2 {
                t.fail(format!("a halted rollout applied again: {}", text(&again)));
            } else {
                t.halts_kept += 1;
            }
        }
        let fresh: BTreeSet<String> = d
            .run_ids()
            .difference(&before)
            .filter(|id| !open.contains(id))
            .cloned()
            .collect();
        check_records(&d, &fresh, t);
        t.rounds += 1;
    }
    check_hosts(f, &d, root, &ledger, t);
    keep_on_failure(d, t);
}

#[test]
fn crash_campaign_kill_9_of_run_and_apply() {
    let seed = seed();
    println!("crash: TEND_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let f = scale_fleet(HOSTS.len());
    let mut t = Tally::default();
    let started = Instant::now();
    run_phase(&f, &mut rng, &mut t);
    let run_t = std::mem::take(&mut t);
    apply_phase(&f, &mut rng, &mut t);
    f.down();
    let apply_t = t;
    for (name, t) in [("tend run", &run_t), ("tend apply", &apply_t)] {
        println!(
            "crash campaign ({name}): {} rounds, {} kills ({} mid-run), seed {seed}\n  runs left unfinished:                 {}\n  interrupted runs closed:              {}\n  records lost:                         {}\n  unauthorized destructive operations:  {}\n  duplicated destructive operations:    {}\n  tokens used twice:                    {}\n  destructive attempts recorded:        {}\n  tokens given / again after a crash:   {} / {}\n  guards disarmed / reverted:           {} / {}\n  halts kept across a restart:          {}\n  panics:                               {}",
            t.rounds,
            t.kills,
            t.kills_mid_run,
            t.unfinished,
            t.interrupted_closed,
            t.records_lost,
            t.unauthorized,
            t.duplicated,
            t.tokens_reused,
            t.destructive_ran,
            t.tokens_given,
            t.tokens_again,
            t.guards_disarmed,
            t.guards_reverted,
            t.halts_kept,
            t.panics,
        );
    }
    println!("crash campaign took {} s", started.elapsed().as_secs());
    let failures: Vec<&String> = run_t.failures.iter().chain(&apply_t.failures).collect();
    assert!(failures.is_empty(), "{failures:#?}");
}
