//! Connection guards over the network (SPEC 8.7): arm a guard before a
//! guarded write, confirm the host over a NEW connection and disarm it, or
//! learn that the host reverted; and settle guards a crash left armed.
//!
//! The commands are built by `apply::guard`; what happened is recorded in
//! SQLite (`guards`, migration 10): the row (state `armed`) is committed
//! before the command that arms the guard is sent, and settled to
//! `disarmed`, `reverted` or `not_armed` once tend knows. A guard whose
//! outcome tend could not learn stays `armed`; the next pass of its host
//! waits until its time is up and settles it (`settle_left`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::apply::guard::{self as cmd, Reply};
use crate::core::model::Host;
use crate::dispatch::Recorder;
use crate::reconcile::{self, ProbeOpts};
use crate::store::db::{Db, GuardRow};
use crate::transport::Transport;

/// The failure message of a guarded step the host reverted (SPEC 8.7).
pub const REVERTED: &str = crate::core::outcome::GUARD_REVERTED_MESSAGE;

/// How long after a guard's time is up tend looks at the host again (the
/// timer's accuracy, the restore, the restarts).
const GRACE: Duration = Duration::from_secs(10);

/// How long a settle waits on the host for a revert under way.
const SETTLE_WAIT_SECS: u64 = 30;

/// Where the guard code records: a run's [`Recorder`] during dispatch, or
/// [`PreRun`] before a pass begins its run.
pub trait GuardLog: Send + Sync {
    fn event(&self, host: &str, kind: &str, detail: serde_json::Value);
    /// Record a guard about to be armed; `Err` when it could not be.
    fn armed(&self, row: &GuardRow) -> Result<(), String>;
    /// Record what became of a guard.
    fn settled(&self, id: &str, state: &str, detail: &str);
}

impl GuardLog for Recorder {
    fn event(&self, host: &str, kind: &str, detail: serde_json::Value) {
        Recorder::event(self, Some(host), kind, detail);
    }
    fn armed(&self, row: &GuardRow) -> Result<(), String> {
        crate::store::blocking(|| self.db().guard_armed(row)).map_err(|e| format!("{e:#}"))
    }
    fn settled(&self, id: &str, state: &str, detail: &str) {
        let at = crate::clock::now_rfc3339();
        if let Err(e) = crate::store::blocking(|| self.db().guard_settled(id, state, &at, detail)) {
            tracing::error!(guard = id, error = %e, "could not record what became of a connection guard");
        }
    }
}

/// Records of guards settled before a pass begins its run: rows to the
/// database at once, events kept for the run's timeline.
pub struct PreRun {
    db: std::sync::Mutex<Db>,
    pub events: std::sync::Mutex<Vec<(String, String, serde_json::Value)>>,
}

impl PreRun {
    pub fn new(db: Db) -> Self {
        PreRun {
            db: std::sync::Mutex::new(db),
            events: Default::default(),
        }
    }
}

impl GuardLog for PreRun {
    fn event(&self, host: &str, kind: &str, detail: serde_json::Value) {
        tracing::info!(host, kind, %detail, "connection guard");
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push((
            host.to_string(),
            kind.to_string(),
            detail,
        ));
    }
    fn armed(&self, _: &GuardRow) -> Result<(), String> {
        Err("no guard is armed before a run begins".into())
    }
    fn settled(&self, id: &str, state: &str, detail: &str) {
        let at = crate::clock::now_rfc3339();
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = crate::store::blocking(|| db.guard_settled(id, state, &at, detail)) {
            tracing::error!(guard = id, error = %e, "could not record what became of a connection guard");
        }
    }
}

/// What became of a guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    Disarmed,
    Reverted,
    /// tend could not learn it: the row stays `armed`, settled later.
    Unknown(String),
}

fn secs_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// When a guard armed at `armed_at` (RFC 3339) reverts, as seconds since
/// the epoch.
pub fn due_at(g: &GuardRow) -> i64 {
    crate::core::token::parse_rfc3339(&g.armed_at).unwrap_or(0) + g.revert_after_secs as i64
}

async fn exec(
    t: &Arc<dyn Transport>,
    script: String,
    stdin: Vec<u8>,
    timeout: Duration,
) -> Result<Reply, String> {
    let t = t.clone();
    let out = tokio::task::spawn_blocking(move || t.exec(&script, &stdin, timeout))
        .await
        .map_err(|e| format!("the guard command's task failed: {e}"))?;
    match out {
        Ok(o) if o.status == 0 => Ok(cmd::parse(&o.stdout)),
        Ok(o) => Err(format!(
            "the guard command exited with status {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(e.message),
    }
}

/// Record, then arm, the guard of step `step` (the file at `path`, with
/// the restarts of `units`) over the host's session. `Err` says why the
/// write must not be sent.
#[allow(clippy::too_many_arguments)] // one call site
pub async fn arm(
    host: &str,
    step: usize,
    resource_id: &str,
    definition: &str,
    path: &str,
    revert_after: u64,
    units: &[String],
    transport: &Arc<dyn Transport>,
    timeout: Duration,
    (run_id, rec): (&str, &dyn GuardLog),
) -> Result<GuardRow, String> {
    let row = GuardRow {
        guard_id: cmd::guard_id(run_id, host, step),
        host: host.to_string(),
        resource_id: resource_id.to_string(),
        run_id: run_id.to_string(),
        step_index: step as u32,
        definition_sha256: definition.to_string(),
        revert_after_secs: revert_after,
        armed_at: crate::clock::now_rfc3339(),
        state: "armed".into(),
        settled_at: None,
        detail: None,
    };
    // Records first: the row is committed before the guard is armed.
    rec.armed(&row)
        .map_err(|e| format!("not sent: the guard could not be recorded ({e})"))?;
    rec.event(host,
        "guard_arming",
        json!({"step": step, "id": resource_id, "guard": row.guard_id, "revert_after_secs": revert_after}),
    );
    let c = cmd::arm(&row.guard_id, path, revert_after, units);
    // An error answer comes before the marker exists: not armed. A lost
    // answer may have armed it: the row stays `armed`, and the next pass
    // settles it (the file did not change, so a revert restores nothing
    // new).
    let (why, armed) = match exec(transport, c.script, c.stdin, timeout).await {
        Ok(Reply::Armed(how)) => {
            rec.event(
                host,
                "guard_armed",
                json!({"step": step, "id": resource_id, "guard": row.guard_id, "timer": how}),
            );
            return Ok(row);
        }
        Ok(Reply::Error(why)) => (why, false),
        Ok(other) => (format!("unexpected answer {other:?}"), true),
        Err(why) => (why, true),
    };
    if !armed {
        settle_row(rec, &row.guard_id, "not_armed", &why);
    }
    rec.event(
        host,
        "guard_arm_failed",
        json!({"step": step, "id": resource_id, "guard": row.guard_id, "reason": why}),
    );
    Err(format!("cannot arm the connection guard: {why}"))
}

fn settle_row(rec: &dyn GuardLog, id: &str, state: &str, detail: &str) {
    rec.settled(id, state, detail);
}

/// After the guarded batch: reach the host over a NEW connection (never
/// the session the change went over), probe it, and disarm every guard.
/// Tried until shortly before the earliest guard's time is up; when the
/// host cannot be reached by then, the guards' fates are learnt after
/// their time (`await_revert`), and `None` says so.
pub async fn confirm(
    h: &Host,
    guards: &[GuardRow],
    opts: &ProbeOpts,
    rec: &dyn GuardLog,
) -> Option<Vec<Fate>> {
    let host = h.name();
    let due = guards.iter().map(due_at).min().unwrap_or(0);
    // One probe must fit before the earliest revert.
    let last_start = due - opts.timeout.as_secs() as i64 - 2;
    let mut once = opts.clone();
    once.retries = 0;
    let mut fates: Vec<Option<Fate>> = vec![None; guards.len()];
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let why = match reconcile::connect(h, &once) {
            Err(e) => e.message,
            Ok(fresh) => {
                let probe = reconcile::probe_host(h, fresh.clone(), &once).await;
                let why = match probe.result {
                    Ok(_) => {
                        rec.event(
                            host,
                            "guard_host_reached",
                            json!({"attempt": attempt, "connection": "new"}),
                        );
                        // A disarm whose answer is lost is sent again (it
                        // is idempotent: a tombstone says it happened).
                        let mut lost = None;
                        for (g, fate) in guards.iter().zip(fates.iter_mut()) {
                            if fate.is_none() {
                                match disarm(g, &fresh, opts.timeout).await {
                                    Ok(f) => {
                                        record_fate(host, g, &f, rec);
                                        *fate = Some(f);
                                    }
                                    Err(why) => lost = Some(why),
                                }
                            }
                        }
                        lost
                    }
                    Err((_, why)) => Some(why),
                };
                // Closing a session may wait on a dead connection.
                let _ = tokio::task::spawn_blocking(move || drop(fresh)).await;
                match why {
                    None => return Some(fates.into_iter().flatten().collect()),
                    Some(why) => why,
                }
            }
        };
        rec.event(
            host,
            "guard_host_unreachable",
            json!({"attempt": attempt, "reason": why}),
        );
        let now = secs_since_epoch(SystemTime::now());
        if now + 1 > last_start {
            // Disarms already known are learnt again after the guards'
            // time (a tombstone keeps them), with the rest.
            return None;
        }
        let pause = crate::core::retry::backoff(Duration::from_secs(1), attempt)
            .min(Duration::from_secs((last_start - now).max(1) as u64));
        tokio::time::sleep(pause).await;
    }
}

/// Send the disarm: `Err` when its answer was lost.
async fn disarm(g: &GuardRow, t: &Arc<dyn Transport>, timeout: Duration) -> Result<Fate, String> {
    match exec(t, cmd::disarm(&g.guard_id), vec![], timeout).await {
        Ok(Reply::Disarmed) => Ok(Fate::Disarmed),
        Ok(Reply::Reverted) | Ok(Reply::Reverting) => Ok(Fate::Reverted),
        Ok(other) => Ok(Fate::Unknown(format!("the disarm answered {other:?}"))),
        Err(why) => Err(why),
    }
}

fn record_fate(host: &str, g: &GuardRow, fate: &Fate, rec: &dyn GuardLog) {
    let (state, detail) = match fate {
        Fate::Disarmed => ("disarmed", "tend reached the host over a new connection"),
        Fate::Reverted => ("reverted", REVERTED),
        Fate::Unknown(why) => {
            rec.event(
                host,
                "guard_unknown",
                json!({"id": g.resource_id, "guard": g.guard_id, "reason": why}),
            );
            return;
        }
    };
    settle_row(rec, &g.guard_id, state, detail);
    rec.event(
        host,
        if state == "disarmed" {
            "guard_disarmed"
        } else {
            "guard_reverted"
        },
        json!({"id": g.resource_id, "guard": g.guard_id}),
    );
}

/// The host could not be reached in time: wait until every guard's time
/// is up (and a little more), then learn over a new connection what the
/// host did. A guard still armed then is reverted by the settle command
/// itself (its timer was lost).
pub async fn await_revert(
    h: &Host,
    guards: &[GuardRow],
    opts: &ProbeOpts,
    rec: &dyn GuardLog,
) -> Vec<Fate> {
    let due = guards.iter().map(due_at).max().unwrap_or(0);
    let now = secs_since_epoch(SystemTime::now());
    let wait = Duration::from_secs((due - now).max(0) as u64) + GRACE;
    rec.event(
        h.name(),
        "guard_waiting",
        json!({"seconds": wait.as_secs(), "reason": "the host could not be reached after the change; its guard reverts it"}),
    );
    tokio::time::sleep(wait).await;
    settle_with(h, guards, opts, rec).await
}

async fn settle_with(
    h: &Host,
    guards: &[GuardRow],
    opts: &ProbeOpts,
    rec: &dyn GuardLog,
) -> Vec<Fate> {
    let mut fresh = None;
    let mut why = String::new();
    for attempt in 1..=3u32 {
        match reconcile::connect(h, opts) {
            Ok(t) => {
                // Anything that runs tells whether the host answers.
                match exec(&t, "echo TEND-GUARD-GONE".into(), vec![], opts.timeout).await {
                    Ok(_) => {
                        fresh = Some(t);
                        break;
                    }
                    Err(e) => why = e,
                }
            }
            Err(e) => why = e.message,
        }
        tokio::time::sleep(crate::core::retry::backoff(Duration::from_secs(2), attempt)).await;
    }
    let Some(t) = fresh else {
        let fate = Fate::Unknown(format!(
            "the host is still unreachable after its guard's time ({why})"
        ));
        for g in guards {
            record_fate(h.name(), g, &fate, rec);
        }
        return vec![fate; guards.len()];
    };
    let timeout = opts.timeout + Duration::from_secs(SETTLE_WAIT_SECS);
    let mut out = Vec::new();
    for g in guards {
        let fate = match exec(
            &t,
            cmd::settle(&g.guard_id, SETTLE_WAIT_SECS),
            vec![],
            timeout,
        )
        .await
        {
            Ok(Reply::Reverted) => Fate::Reverted,
            Ok(Reply::Disarmed) => Fate::Disarmed,
            Ok(Reply::Gone) => {
                settle_row(
                    rec,
                    &g.guard_id,
                    "not_armed",
                    "no trace of the guard on the host",
                );
                rec.event(
                    h.name(),
                    "guard_not_armed",
                    json!({"id": g.resource_id, "guard": g.guard_id}),
                );
                out.push(Fate::Unknown("the guard was never armed".into()));
                continue;
            }
            Ok(other) => Fate::Unknown(format!("the settle answered {other:?}")),
            Err(why) => Fate::Unknown(why),
        };
        record_fate(h.name(), g, &fate, rec);
        out.push(fate);
    }
    out
}

/// Guards a crash (or an unreachable host) left armed on `host`, from the
/// database.
pub fn left_armed(db: &Db, host: &str) -> Vec<GuardRow> {
    if db.schema_version().unwrap_or(0) < 10 {
        return vec![];
    }
    db.guards(host, "armed").unwrap_or_else(|e| {
        tracing::warn!(host, error = %e, "cannot read the host's connection guards");
        vec![]
    })
}

/// Before a pass probes `h`: if a guard was left armed on it, wait until
/// its time is up (SPEC 8.7: tend does not probe such a host before), then
/// learn what the host did and record it. `false` when a stop (shutdown,
/// SIGINT) came first: the host must not be probed in this pass.
pub async fn settle_left(
    h: &Host,
    guards: Vec<GuardRow>,
    opts: &ProbeOpts,
    rec: &dyn GuardLog,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> bool {
    if guards.is_empty() {
        return true;
    }
    let due = guards.iter().map(due_at).max().unwrap_or(0) + GRACE.as_secs() as i64;
    let now = secs_since_epoch(SystemTime::now());
    let wait = (due - now).max(0) as u64;
    if wait > 0 {
        rec.event(
            h.name(),
            "guard_waiting",
            json!({"seconds": wait, "reason": "a connection guard was left armed (a crash?); the host is not probed before its time is up"}),
        );
        // Stopped early on shutdown: the pass is then not run.
        let until = tokio::time::Instant::now() + Duration::from_secs(wait);
        while tokio::time::Instant::now() < until {
            if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200).min(until - tokio::time::Instant::now()))
                .await;
        }
    }
    settle_with(h, &guards, opts, rec).await;
    true
}
