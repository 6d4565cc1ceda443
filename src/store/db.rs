//! The SQLite history in `<state_dir>/tend.db`: runs, host outcomes, step
//! attempts, events, used tokens and the resources tend manages on each host
//! (which prune needs).
//!
//! Invariant: the only SQL in tend. Every write is one IMMEDIATE transaction,
//! so a write either lands whole or not at all, and a writer takes the lock
//! up front instead of failing halfway when another process holds it.
//! Enumerated values are stored as their JSON spelling from `core::report`,
//! so the database and the documents say the same words.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;
use crate::core::report::{
    Action, DispatchMode, EffectiveMode, ExecutionOutcome, FailureClass, PolicyOutcome, RunResult,
    StepAction, StepStatus, Trigger,
};

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, applied in order; after migration `i` (0-based) the
/// database has `user_version` `i + 1`. Append only: never edit one that has
/// shipped.
/// A rollout's state as the `rollouts` table keeps it.
fn rollout_state(r: &crate::core::rollout::Record) -> String {
    format!("{:?}", r.rollout.state())
}

/// Write a rollout's row: its revision, state and document.
fn update_rollout_row(
    tx: &Transaction<'_>,
    id: i64,
    r: &crate::core::rollout::Record,
    doc: &str,
    now: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE rollouts SET revision = ?2, state = ?3, updated_at = ?4, doc = ?5 WHERE id = ?1",
        rusqlite::params![id, r.revision, rollout_state(r), now, doc],
    )?;
    Ok(())
}

const MIGRATIONS: &[&str] = &[
    // 1: the initial schema. STRICT tables so that a value of the wrong type
    // is an error instead of being stored as whatever it happens to be.
    r#"
CREATE TABLE runs (
    run_id            TEXT PRIMARY KEY NOT NULL,
    started_at        TEXT NOT NULL,
    completed_at      TEXT,
    action            TEXT NOT NULL,
    "trigger"         TEXT NOT NULL,
    dispatch_mode     TEXT NOT NULL,
    effective_mode    TEXT NOT NULL,
    policy_outcome    TEXT NOT NULL,
    policy_reason     TEXT NOT NULL,
    -- NULL while the run is under way: a run left NULL by a crash is found here.
    execution_outcome TEXT,
    desired_revision  TEXT NOT NULL,
    result_json       TEXT
) STRICT;

CREATE TABLE host_outcomes (
    run_id               TEXT NOT NULL REFERENCES runs (run_id),
    host                 TEXT NOT NULL,
    outcome              TEXT NOT NULL,
    reason               TEXT,
    dispatch_status      TEXT NOT NULL,
    attempt_count        INTEGER NOT NULL,
    last_failure_class   TEXT,
    last_failure_message TEXT,
    changes_create       INTEGER NOT NULL,
    changes_update       INTEGER NOT NULL,
    changes_delete       INTEGER NOT NULL,
    PRIMARY KEY (run_id, host)
) STRICT;

CREATE TABLE step_attempts (
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    host        TEXT NOT NULL,
    step_index  INTEGER NOT NULL,
    resource_id TEXT NOT NULL,
    action      TEXT NOT NULL,
    destructive INTEGER NOT NULL CHECK (destructive IN (0, 1)),
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    exit_code   INTEGER,
    log_path    TEXT,
    PRIMARY KEY (run_id, host, step_index, attempt)
) STRICT;

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT REFERENCES runs (run_id),
    at          TEXT NOT NULL,
    host        TEXT,
    kind        TEXT NOT NULL,
    detail_json TEXT NOT NULL
) STRICT;
CREATE INDEX events_by_run ON events (run_id, id);

CREATE TABLE tokens (
    sha256         TEXT PRIMARY KEY NOT NULL,
    file           TEXT NOT NULL,
    operation      TEXT NOT NULL,
    hosts_json     TEXT NOT NULL,
    used_by_run    TEXT REFERENCES runs (run_id),
    used_at        TEXT,
    refused_reason TEXT
) STRICT;

CREATE TABLE managed_resources (
    host           TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    kind           TEXT NOT NULL,
    "key"          TEXT NOT NULL,
    spec_json      TEXT NOT NULL,
    applied_run_id TEXT NOT NULL REFERENCES runs (run_id),
    applied_at     TEXT NOT NULL,
    PRIMARY KEY (host, resource_id)
) STRICT;
"#,
    // 2: the hosts a run targets, so that a run cut short by a crash can
    // still be closed with one outcome per host. NULL for older runs.
    r#"
ALTER TABLE runs ADD COLUMN target_hosts_json TEXT;
"#,
    // 3: token trust and history retention (SPEC 8.4, 8.5).
    // `token_first_seen`: when tend first saw each token file with given
    // bytes; `expires` is bounded from the earlier of this and the file's
    // mtime, so a future mtime cannot stretch token_max_ttl.
    // `tokens` and `managed_resources` are kept for ever while the runs they
    // name may be removed by retention, so they are rebuilt without the
    // foreign key to `runs` (their run ids stay as plain history).
    r#"
CREATE TABLE token_first_seen (
    file       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (file, sha256)
) STRICT;

CREATE TABLE tokens_v3 (
    sha256         TEXT PRIMARY KEY NOT NULL,
    file           TEXT NOT NULL,
    operation      TEXT NOT NULL,
    hosts_json     TEXT NOT NULL,
    used_by_run    TEXT,
    used_at        TEXT,
    refused_reason TEXT
) STRICT;
INSERT INTO tokens_v3 SELECT sha256, file, operation, hosts_json, used_by_run, used_at, refused_reason FROM tokens;
DROP TABLE tokens;
ALTER TABLE tokens_v3 RENAME TO tokens;

CREATE TABLE managed_resources_v3 (
    host           TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    kind           TEXT NOT NULL,
    "key"          TEXT NOT NULL,
    spec_json      TEXT NOT NULL,
    applied_run_id TEXT NOT NULL,
    applied_at     TEXT NOT NULL,
    PRIMARY KEY (host, resource_id)
) STRICT;
INSERT INTO managed_resources_v3
    SELECT host, resource_id, kind, "key", spec_json, applied_run_id, applied_at FROM managed_resources;
DROP TABLE managed_resources;
ALTER TABLE managed_resources_v3 RENAME TO managed_resources;

CREATE INDEX runs_by_started ON runs (started_at);
"#,
    // 4: an attempt is recorded when its command is sent (`sent`), moved to
    // `started` when the host reports the step's start marker, and to
    // `finished` with its status; so a crash leaves a record of exactly
    // what the host reported. Older rows were written finished.
    r#"
ALTER TABLE step_attempts ADD COLUMN phase TEXT NOT NULL DEFAULT 'finished'
    CHECK (phase IN ('sent', 'started', 'finished'));
"#,
    // 5: `restart_on` restarts owed by a pass whose trigger succeeded and
    // whose restart did not (SPEC 8.3); cleared when one succeeds or the
    // service leaves the desired state.
    r#"
CREATE TABLE owed_restarts (
    host        TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    since       TEXT NOT NULL,
    PRIMARY KEY (host, resource_id)
) STRICT;
"#,
    // 6: a token that lists several operations (SPEC 8.1, fleet-scale
    // confirmation) is used once per operation: each use is a row here, by
    // the sha256 of the token's bytes and the operation. Kept for ever,
    // like `tokens`.
    r#"
CREATE TABLE token_operations (
    sha256      TEXT NOT NULL,
    operation   TEXT NOT NULL,
    file        TEXT NOT NULL,
    hosts_json  TEXT NOT NULL,
    used_by_run TEXT NOT NULL,
    used_at     TEXT NOT NULL,
    PRIMARY KEY (sha256, operation)
) STRICT;
"#,
    // 7: rollouts (SPEC 8.2), one row each, the newest the current one; the
    // document is `core::rollout::Record` as JSON. A halt lives here, so it
    // survives every restart. Resume requests taken are recorded too.
    r#"
CREATE TABLE rollouts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    revision    TEXT NOT NULL,
    state       TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    doc         TEXT NOT NULL
) STRICT;
CREATE TABLE rollout_resumes (
    rollout_id   INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    taken_by_run TEXT NOT NULL,
    taken_at     TEXT NOT NULL
) STRICT;
"#,
    // 8: the digest of the definition each managed resource was applied
    // with (`Resource::definition_digest`): a difference on the host under
    // an unchanged definition is drift (`tend drift`, SPEC 8.6/8.7). NULL
    // for resources applied before it.
    r#"
ALTER TABLE managed_resources ADD COLUMN definition_sha256 TEXT;
"#,
    // 9: corrective applies (SPEC 8.7): one row per resource corrected,
    // for the trailing hour that makes it contested (older rows are swept),
    // and each host's running total.
    r#"
CREATE TABLE corrections (
    host        TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    at          TEXT NOT NULL
) STRICT;
CREATE INDEX corrections_by_resource ON corrections (host, resource_id, at);
CREATE TABLE correction_totals (
    host  TEXT PRIMARY KEY,
    total INTEGER NOT NULL
) STRICT;
"#,
    // 10: connection guards (SPEC 8.7): one row per guarded write, written
    // (state `armed`) before the guard is armed on the host, and settled to
    // `disarmed`, `reverted` or `not_armed` once tend knows which happened.
    r#"
CREATE TABLE guards (
    guard_id          TEXT PRIMARY KEY,
    host              TEXT NOT NULL,
    resource_id       TEXT NOT NULL,
    run_id            TEXT NOT NULL,
    step_index        INTEGER NOT NULL,
    definition_sha256 TEXT NOT NULL,
    revert_after_secs INTEGER NOT NULL,
    armed_at          TEXT NOT NULL,
    state             TEXT NOT NULL,
    settled_at        TEXT,
    detail            TEXT
) STRICT;
CREATE INDEX guards_by_host ON guards (host, state);
"#,
];

/// One connection guard as recorded (SPEC 8.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardRow {
    /// The guard's name on the host (its directory and timer unit).
    pub guard_id: String,
    pub host: String,
    pub resource_id: String,
    pub run_id: String,
    pub step_index: u32,
    pub definition_sha256: String,
    pub revert_after_secs: u64,
    /// RFC 3339.
    pub armed_at: String,
    /// `armed` (not settled yet), `disarmed`, `reverted` or `not_armed`.
    pub state: String,
    pub settled_at: Option<String>,
    pub detail: Option<String>,
}

/// One record of a run, written with others in one transaction
/// ([`Db::write_records`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// An event of the run's timeline.
    Event {
        at: String,
        host: Option<String>,
        kind: String,
        detail: serde_json::Value,
    },
    /// An attempt whose command is about to be sent: the row, phase `sent`
    /// (its status and finish time are ignored).
    AttemptSent(StepAttemptRow),
    /// The host reported the step's start.
    AttemptStarted {
        host: String,
        step_index: u32,
        attempt: u32,
    },
    /// The attempt ended: the row as it ended.
    AttemptFinished(StepAttemptRow),
    /// An attempt sent in a batch that stopped at an earlier failed step:
    /// the host never reached it, so it was no attempt (the step is gated
    /// again and may go out later as attempt 1).
    AttemptWithdrawn {
        host: String,
        step_index: u32,
        attempt: u32,
    },
    /// A service's restart is owed (kept as first recorded if already so).
    OwedRestart {
        host: String,
        resource_id: String,
        at: String,
    },
}

/// What is known of a run when it begins (after policy, before dispatch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    pub run_id: String,
    pub started_at: String,
    pub action: Action,
    pub trigger: Trigger,
    pub dispatch_mode: DispatchMode,
    pub effective_mode: EffectiveMode,
    pub policy_outcome: PolicyOutcome,
    pub policy_reason: String,
    pub desired_revision: String,
    /// The resolved target hosts (empty for runs recorded before schema 2).
    pub target_hosts: Vec<String>,
}

/// One row of run history. `run` holds the values `finish_run` last wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    pub run: RunRow,
    /// `None` while the run is under way (or was cut short by a crash).
    pub completed_at: Option<String>,
    pub execution_outcome: Option<ExecutionOutcome>,
}

/// One host's outcome in a run: (run id, started at, outcome, reason).
pub type HostRun = (String, String, String, Option<String>);

/// One attempt of one step. Read back, an attempt cut short by a crash
/// shows `failed` if the host had reported its start (it may have done
/// anything) and `not_run` if it had not, with no finish time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepAttemptRow {
    pub run_id: String,
    pub host: String,
    pub step_index: u32,
    pub resource_id: String,
    pub action: StepAction,
    pub destructive: bool,
    /// 1-based.
    pub attempt: u32,
    pub status: StepStatus,
    pub started_at: String,
    pub finished_at: String,
    /// `None` when the step did not get as far as an exit status.
    pub exit_code: Option<i32>,
    /// Relative to the state dir.
    pub log_path: Option<String>,
}

/// A resource tend has applied on a host and so may prune later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedRow {
    pub host: String,
    pub resource_id: String,
    pub kind: String,
    /// The resource's path or name.
    pub key: String,
    pub spec_json: String,
    pub applied_run_id: String,
    pub applied_at: String,
    /// The digest of the definition it was applied with (None: applied
    /// before tend recorded it).
    pub definition_sha256: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    pub id: i64,
    pub run_id: Option<String>,
    pub at: String,
    pub host: Option<String>,
    pub kind: String,
    pub detail: serde_json::Value,
}

/// The record of a token, by the sha256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub sha256: String,
    /// Relative to the state dir.
    pub file: String,
    pub operation: String,
    pub hosts: Vec<String>,
    pub used_by_run: Option<String>,
    pub used_at: Option<String>,
    pub refused_reason: Option<String>,
}

/// One connection to the history database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl Db {
    /// Open (creating if needed) the database at `path` and migrate it to
    /// the current schema. Its directory must exist.
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Db {
            doing: "open".into(),
            path: path.to_owned(),
            source,
        })?;
        let mut db = Db {
            conn,
            path: path.to_owned(),
        };
        db.configure()?;
        db.migrate()?;
        Ok(db)
    }

    /// Open an existing database without writing anything, for commands that
    /// must change nothing (`plan`, `status`, `runs`). `None` when there is no
    /// database yet. A database of another schema version is an error, since
    /// migrating it would be a write.
    pub fn open_read_only(path: &Path) -> Result<Option<Db>, StoreError> {
        if !path.exists() {
            return Ok(None);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|source| StoreError::Db {
            doing: "open (read-only)".into(),
            path: path.to_owned(),
            source,
        })?;
        let db = Db {
            conn,
            path: path.to_owned(),
        };
        db.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| err(&db.path, "set the busy timeout", e))?;
        let found = db.schema_version()?;
        if found != current_version() {
            return Err(StoreError::SchemaVersion {
                path: db.path.clone(),
                found,
                supported: current_version(),
            });
        }
        Ok(Some(db))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version the database is at (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        user_version(&self.conn).map_err(|e| err(&self.path, "read the schema version", e))
    }

    /// Record the start of a run.
    pub fn begin_run(&mut self, run: &RunRow) -> Result<(), StoreError> {
        self.write(format!("begin run {}", run.run_id), |tx| {
            tx.execute(
                r#"INSERT INTO runs (run_id, started_at, action, "trigger", dispatch_mode,
                       effective_mode, policy_outcome, policy_reason, desired_revision,
                       target_hosts_json)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"#,
                rusqlite::params![
                    run.run_id,
                    run.started_at,
                    text(&run.action),
                    text(&run.trigger),
                    text(&run.dispatch_mode),
                    text(&run.effective_mode),
                    text(&run.policy_outcome),
                    run.policy_reason,
                    run.desired_revision,
                    serde_json::to_string(&run.target_hosts).expect("strings serialize"),
                ],
            )?;
            Ok(())
        })
    }

    /// Append an event; returns its id. Ids grow, so they give the order.
    pub fn record_event(
        &mut self,
        run_id: Option<&str>,
        at: &str,
        host: Option<&str>,
        kind: &str,
        detail: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        self.write(format!("record event {kind}"), |tx| {
            tx.execute(
                "INSERT INTO events (run_id, at, host, kind, detail_json)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![run_id, at, host, kind, detail.to_string()],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// The events of one run, oldest first.
    pub fn events(&self, run_id: &str) -> Result<Vec<EventRow>, StoreError> {
        self.read(format!("read the events of run {run_id}"), |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, run_id, at, host, kind, detail_json FROM events
                 WHERE run_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([run_id], |r| {
                Ok(EventRow {
                    id: r.get(0)?,
                    run_id: r.get(1)?,
                    at: r.get(2)?,
                    host: r.get(3)?,
                    kind: r.get(4)?,
                    detail: json_column(r, 5)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn record_step_attempt(&mut self, a: &StepAttemptRow) -> Result<(), StoreError> {
        let doing = format!(
            "record attempt {} of step {} ({}) on {} in run {}",
            a.attempt, a.step_index, a.resource_id, a.host, a.run_id
        );
        self.write(doing, |tx| {
            tx.execute(
                "INSERT INTO step_attempts (run_id, host, step_index, resource_id, action,
                     destructive, attempt, status, started_at, finished_at, exit_code, log_path)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                rusqlite::params![
                    a.run_id,
                    a.host,
                    a.step_index,
                    a.resource_id,
                    text(&a.action),
                    a.destructive,
                    a.attempt,
                    text(&a.status),
                    a.started_at,
                    a.finished_at,
                    a.exit_code,
                    a.log_path,
                ],
            )?;
            Ok(())
        })
    }

    /// Write `records` of run `run_id` in ONE transaction: all or none.
    pub fn write_records(&mut self, run_id: &str, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let destructive = records
            .iter()
            .any(|r| matches!(r, Record::AttemptSent(a) if a.destructive));
        let doing = format!("record {} event(s) of run {run_id}", records.len());
        let write = |tx: &Transaction<'_>| -> rusqlite::Result<()> {
            for r in records {
                match r {
                    Record::Event {
                        at,
                        host,
                        kind,
                        detail,
                    } => {
                        tx.execute(
                            "INSERT INTO events (run_id, at, host, kind, detail_json)
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                            rusqlite::params![run_id, at, host, kind, detail.to_string()],
                        )?;
                    }
                    Record::AttemptSent(a) => {
                        tx.execute(
                            "INSERT INTO step_attempts (run_id, host, step_index, resource_id,
                                 action, destructive, attempt, status, started_at, finished_at,
                                 exit_code, log_path, phase)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '', NULL, NULL, 'sent')",
                            rusqlite::params![
                                run_id,
                                a.host,
                                a.step_index,
                                a.resource_id,
                                text(&a.action),
                                a.destructive,
                                a.attempt,
                                text(&StepStatus::NotRun),
                                a.started_at,
                            ],
                        )?;
                    }
                    Record::AttemptStarted {
                        host,
                        step_index,
                        attempt,
                    } => {
                        tx.execute(
                            "UPDATE step_attempts SET phase = 'started'
                             WHERE run_id = ?1 AND host = ?2 AND step_index = ?3 AND attempt = ?4",
                            rusqlite::params![run_id, host, step_index, attempt],
                        )?;
                    }
                    Record::AttemptWithdrawn {
                        host,
                        step_index,
                        attempt,
                    } => {
                        tx.execute(
                            "DELETE FROM step_attempts WHERE run_id = ?1 AND host = ?2
                                 AND step_index = ?3 AND attempt = ?4 AND phase = 'sent'",
                            rusqlite::params![run_id, host, step_index, attempt],
                        )?;
                    }
                    Record::OwedRestart {
                        host,
                        resource_id,
                        at,
                    } => {
                        tx.execute(
                            "INSERT INTO owed_restarts (host, resource_id, run_id, since)
                             VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                            rusqlite::params![host, resource_id, run_id, at],
                        )?;
                    }
                    Record::AttemptFinished(a) => {
                        tx.execute(
                            "INSERT INTO step_attempts (run_id, host, step_index, resource_id,
                                 action, destructive, attempt, status, started_at, finished_at,
                                 exit_code, log_path, phase)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'finished')
                             ON CONFLICT (run_id, host, step_index, attempt) DO UPDATE SET
                                 status = excluded.status, finished_at = excluded.finished_at,
                                 exit_code = excluded.exit_code, log_path = excluded.log_path,
                                 phase = 'finished'",
                            rusqlite::params![
                                run_id,
                                a.host,
                                a.step_index,
                                a.resource_id,
                                text(&a.action),
                                a.destructive,
                                a.attempt,
                                text(&a.status),
                                a.started_at,
                                a.finished_at,
                                a.exit_code,
                                a.log_path,
                            ],
                        )?;
                    }
                }
            }
            Ok(())
        };
        if destructive {
            self.write_synced(doing, write)
        } else {
            self.write(doing, write)
        }
    }

    /// The services of `host` whose restart is owed, sorted.
    pub fn owed_restarts(&self, host: &str) -> Result<Vec<String>, StoreError> {
        self.read(format!("read the owed restarts of host {host}"), |conn| {
            let mut stmt = conn.prepare(
                "SELECT resource_id FROM owed_restarts WHERE host = ?1 ORDER BY resource_id",
            )?;
            let rows = stmt.query_map([host], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// The current rollout (the newest): its id and record.
    pub fn latest_rollout(
        &self,
    ) -> Result<Option<(i64, crate::core::rollout::Record)>, StoreError> {
        let row: Option<(i64, String)> = self.read("read the current rollout".into(), |conn| {
            conn.query_row(
                "SELECT id, doc FROM rollouts ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        match row {
            None => Ok(None),
            Some((id, doc)) => {
                serde_json::from_str(&doc)
                    .map(|r| Some((id, r)))
                    .map_err(|source| StoreError::Parse {
                        path: self.path().to_path_buf(),
                        source,
                    })
            }
        }
    }

    /// Keep a rollout: a new one (`id` None) or the new state of one.
    /// Returns its id.
    pub fn save_rollout(
        &mut self,
        id: Option<i64>,
        r: &crate::core::rollout::Record,
        now: &str,
    ) -> Result<i64, StoreError> {
        let doc = serde_json::to_string(r).map_err(|source| StoreError::Encode {
            path: self.path().to_path_buf(),
            source,
        })?;
        self.write(format!("record the rollout of {}", r.revision), |tx| {
            match id {
                Some(id) => {
                    update_rollout_row(tx, id, r, &doc, now)?;
                    Ok(id)
                }
                None => {
                    tx.execute(
                        "INSERT INTO rollouts (revision, state, started_at, updated_at, doc) VALUES (?1, ?2, ?3, ?3, ?4)",
                        rusqlite::params![r.revision, rollout_state(r), now, doc],
                    )?;
                    Ok(tx.last_insert_rowid())
                }
            }
        })
    }

    /// Change a rollout in one transaction (read, change, write), so that
    /// the passes of several hosts finishing at once each add their own.
    pub fn update_rollout(
        &mut self,
        id: i64,
        now: &str,
        f: impl FnOnce(&mut crate::core::rollout::Record),
    ) -> Result<Option<crate::core::rollout::Record>, StoreError> {
        let path = self.path().to_path_buf();
        let mut f = Some(f);
        let mut failure: Option<StoreError> = None;
        let out = self.write(format!("update rollout {id}"), |tx| {
            let doc: Option<String> = tx
                .query_row("SELECT doc FROM rollouts WHERE id = ?1", [id], |r| r.get(0))
                .optional()?;
            let Some(doc) = doc else { return Ok(None) };
            let mut r: crate::core::rollout::Record = match serde_json::from_str(&doc) {
                Ok(r) => r,
                Err(source) => {
                    failure = Some(StoreError::Parse {
                        path: path.clone(),
                        source,
                    });
                    return Ok(None);
                }
            };
            if let Some(f) = f.take() {
                f(&mut r);
            }
            let doc = serde_json::to_string(&r).unwrap_or(doc);
            update_rollout_row(tx, id, &r, &doc, now)?;
            Ok(Some(r))
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// A resume request taken by a run.
    pub fn record_resume(
        &mut self,
        rollout_id: i64,
        (reason, by, at): (&str, &str, &str),
        run_id: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        self.write(format!("record a resume of rollout {rollout_id}"), |tx| {
            tx.execute(
                "INSERT INTO rollout_resumes (rollout_id, reason, requested_by, requested_at, taken_by_run, taken_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![rollout_id, reason, by, at, run_id, now],
            )?;
            Ok(())
        })
    }

    /// A restart of `host` is no longer owed.
    pub fn clear_owed_restart(&mut self, host: &str, resource_id: &str) -> Result<(), StoreError> {
        self.write(
            format!("clear the owed restart of {resource_id} on {host}"),
            |tx| {
                tx.execute(
                    "DELETE FROM owed_restarts WHERE host = ?1 AND resource_id = ?2",
                    [host, resource_id],
                )?;
                Ok(())
            },
        )
    }

    /// Close a run begun with `begin_run`: update its row from `result` and
    /// insert every host outcome, all in one transaction, so the history
    /// never shows a finished run with some of its hosts missing.
    /// `result_json` is the `result.json` text, kept so that `tend show`
    /// works even when the artifact files are gone.
    pub fn finish_run(&mut self, result: &RunResult, result_json: &str) -> Result<(), StoreError> {
        let outcome = self.write(format!("finish run {}", result.run_id), |tx| {
            // `execution_outcome IS NULL` makes a second finish fail instead of
            // silently rewriting history.
            let updated = tx.execute(
                "UPDATE runs SET completed_at = ?2, execution_outcome = ?3, effective_mode = ?4,
                     dispatch_mode = ?5, policy_outcome = ?6, policy_reason = ?7,
                     desired_revision = ?8, result_json = ?9
                 WHERE run_id = ?1 AND execution_outcome IS NULL",
                rusqlite::params![
                    result.run_id,
                    result.execution_completed_at,
                    text(&result.execution_outcome),
                    text(&result.effective_mode),
                    text(&result.dispatch_mode),
                    text(&result.policy_outcome),
                    result.policy_reason,
                    result.desired_revision,
                    result_json,
                ],
            )?;
            if updated == 0 {
                return Ok(false);
            }
            let mut insert = tx.prepare(
                "INSERT INTO host_outcomes (run_id, host, outcome, reason, dispatch_status,
                     attempt_count, last_failure_class, last_failure_message,
                     changes_create, changes_update, changes_delete)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for h in &result.host_outcomes {
                insert.execute(rusqlite::params![
                    result.run_id,
                    h.host,
                    text(&h.outcome),
                    h.reason,
                    text(&h.dispatch_status),
                    h.attempt_count,
                    h.last_failure_class.map(FailureClass::as_str),
                    h.last_failure_message,
                    h.changes.create,
                    h.changes.update,
                    h.changes.delete,
                ])?;
            }
            Ok(true)
        });
        match outcome {
            Ok(true) => Ok(()),
            // `write` committed an empty transaction; nothing changed.
            Ok(false) => Err(StoreError::RunNotOpen {
                run_id: result.run_id.clone(),
                path: self.path.clone(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Record that `resource_id` is applied on `host` as `spec_json`.
    #[allow(clippy::too_many_arguments)] // one per column; a struct would only rename them
    pub fn upsert_managed(
        &mut self,
        host: &str,
        resource_id: &str,
        kind: &str,
        key: &str,
        spec_json: &str,
        definition: Option<&str>,
        run_id: &str,
        at: &str,
    ) -> Result<(), StoreError> {
        self.write(format!("record {resource_id} as managed on {host}"), |tx| {
            tx.execute(
                r#"INSERT INTO managed_resources
                       (host, resource_id, kind, "key", spec_json, applied_run_id, applied_at,
                        definition_sha256)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                   ON CONFLICT (host, resource_id) DO UPDATE SET
                       kind = excluded.kind, "key" = excluded."key",
                       spec_json = excluded.spec_json,
                       applied_run_id = excluded.applied_run_id,
                       applied_at = excluded.applied_at,
                       definition_sha256 = excluded.definition_sha256"#,
                rusqlite::params![
                    host,
                    resource_id,
                    kind,
                    key,
                    spec_json,
                    run_id,
                    at,
                    definition
                ],
            )?;
            Ok(())
        })
    }

    /// Forget a pruned resource; returns whether it was recorded.
    pub fn remove_managed(&mut self, host: &str, resource_id: &str) -> Result<bool, StoreError> {
        self.write(format!("forget managed {resource_id} on {host}"), |tx| {
            let n = tx.execute(
                "DELETE FROM managed_resources WHERE host = ?1 AND resource_id = ?2",
                [host, resource_id],
            )?;
            Ok(n > 0)
        })
    }

    /// The resources tend manages on `host`, sorted by resource id.
    pub fn managed(&self, host: &str) -> Result<Vec<ManagedRow>, StoreError> {
        self.read(format!("read the managed resources of {host}"), |conn| {
            let mut stmt = conn.prepare(
                r#"SELECT host, resource_id, kind, "key", spec_json, applied_run_id, applied_at,
                          definition_sha256
                   FROM managed_resources WHERE host = ?1 ORDER BY resource_id"#,
            )?;
            let rows = stmt.query_map([host], |r| {
                Ok(ManagedRow {
                    host: r.get(0)?,
                    resource_id: r.get(1)?,
                    kind: r.get(2)?,
                    key: r.get(3)?,
                    spec_json: r.get(4)?,
                    applied_run_id: r.get(5)?,
                    applied_at: r.get(6)?,
                    definition_sha256: r.get(7)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Record corrective applies of `ids` on `host` at `at` (RFC 3339),
    /// add them to the host's total, and forget corrections older than
    /// `keep_after`, in one transaction.
    pub fn record_corrections(
        &mut self,
        host: &str,
        ids: &[String],
        at: &str,
        keep_after: &str,
    ) -> Result<(), StoreError> {
        self.write(format!("record corrections on {host}"), |tx| {
            for id in ids {
                tx.execute(
                    "INSERT INTO corrections (host, resource_id, at) VALUES (?1, ?2, ?3)",
                    [host, id.as_str(), at],
                )?;
            }
            tx.execute(
                "INSERT INTO correction_totals (host, total) VALUES (?1, ?2)
                 ON CONFLICT (host) DO UPDATE SET total = total + excluded.total",
                rusqlite::params![host, ids.len() as i64],
            )?;
            tx.execute(
                "DELETE FROM corrections WHERE host = ?1 AND at < ?2",
                [host, keep_after],
            )?;
            Ok(())
        })
    }

    /// Record a connection guard about to be armed (state `armed`): before
    /// the command that arms it is sent.
    pub fn guard_armed(&mut self, g: &GuardRow) -> Result<(), StoreError> {
        self.write(
            format!("record the guard of {} on {}", g.resource_id, g.host),
            |tx| {
                tx.execute(
                    "INSERT INTO guards (guard_id, host, resource_id, run_id, step_index,
                   definition_sha256, revert_after_secs, armed_at, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'armed')",
                    rusqlite::params![
                        g.guard_id,
                        g.host,
                        g.resource_id,
                        g.run_id,
                        g.step_index,
                        g.definition_sha256,
                        g.revert_after_secs as i64,
                        g.armed_at
                    ],
                )?;
                Ok(())
            },
        )
    }

    /// Settle a guard: what happened on the host (`disarmed`, `reverted`,
    /// `not_armed`).
    pub fn guard_settled(
        &mut self,
        guard_id: &str,
        state: &str,
        at: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.write(format!("settle guard {guard_id}"), |tx| {
            tx.execute(
                "UPDATE guards SET state = ?2, settled_at = ?3, detail = ?4 WHERE guard_id = ?1",
                [guard_id, state, at, detail],
            )?;
            Ok(())
        })
    }

    /// The guards of `host` in `state`, oldest first.
    pub fn guards(&self, host: &str, state: &str) -> Result<Vec<GuardRow>, StoreError> {
        self.read(format!("read the guards of {host}"), |conn| {
            let mut stmt = conn.prepare(
                "SELECT guard_id, host, resource_id, run_id, step_index, definition_sha256,
                        revert_after_secs, armed_at, state, settled_at, detail
                 FROM guards WHERE host = ?1 AND state = ?2 ORDER BY armed_at, guard_id",
            )?;
            let rows = stmt.query_map([host, state], |r| {
                Ok(GuardRow {
                    guard_id: r.get(0)?,
                    host: r.get(1)?,
                    resource_id: r.get(2)?,
                    run_id: r.get(3)?,
                    step_index: r.get(4)?,
                    definition_sha256: r.get(5)?,
                    revert_after_secs: r.get::<_, i64>(6)?.max(0) as u64,
                    armed_at: r.get(7)?,
                    state: r.get(8)?,
                    settled_at: r.get(9)?,
                    detail: r.get(10)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Per resource of `host`: the definition digests a guard reverted.
    pub fn reverted_definitions(
        &self,
        host: &str,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for g in self.guards(host, "reverted")? {
            out.entry(g.resource_id)
                .or_default()
                .insert(g.definition_sha256);
        }
        Ok(out)
    }

    /// Per resource of `host`: corrective applies at or after `since`
    /// (RFC 3339) and the latest one's time.
    pub fn corrections_since(
        &self,
        host: &str,
        since: &str,
    ) -> Result<BTreeMap<String, (u32, String)>, StoreError> {
        self.read(format!("read the corrections of {host}"), |conn| {
            let mut stmt = conn.prepare(
                "SELECT resource_id, COUNT(*), MAX(at) FROM corrections
                 WHERE host = ?1 AND at >= ?2 GROUP BY resource_id",
            )?;
            let rows = stmt.query_map([host, since], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (r.get::<_, u32>(1)?, r.get::<_, String>(2)?),
                ))
            })?;
            rows.collect()
        })
    }

    /// Every corrective apply recorded on `host`.
    pub fn corrected_total(&self, host: &str) -> Result<u64, StoreError> {
        self.read(format!("read the correction total of {host}"), |conn| {
            let n: Option<i64> = conn
                .query_row(
                    "SELECT total FROM correction_totals WHERE host = ?1",
                    [host],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(n.unwrap_or(0).max(0) as u64)
        })
    }

    /// The latest `limit` outcomes of `host`, newest first: (run id,
    /// started at, outcome, reason).
    pub fn host_runs(&self, host: &str, limit: usize) -> Result<Vec<HostRun>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(format!("list the runs of {host}"), |conn| {
            let mut stmt = conn.prepare(
                "SELECT o.run_id, r.started_at, o.outcome, o.reason
                 FROM host_outcomes o JOIN runs r ON r.run_id = o.run_id
                 WHERE o.host = ?1 ORDER BY r.started_at DESC, o.run_id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(rusqlite::params![host, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            rows.collect()
        })
    }

    /// The latest `limit` runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunSummary>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read("list runs".into(), |conn| {
            let mut stmt = conn.prepare(&format!(
                "{RUN_SELECT} ORDER BY started_at DESC, run_id DESC LIMIT ?1"
            ))?;
            let rows = stmt.query_map([limit], run_summary)?;
            rows.collect()
        })
    }

    /// Runs that began and never finished (`execution_outcome` NULL): cut
    /// short by a crash or a kill -9, oldest first.
    pub fn unfinished_runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        self.read("list unfinished runs".into(), |conn| {
            let mut stmt = conn.prepare(&format!(
                "{RUN_SELECT} WHERE execution_outcome IS NULL ORDER BY started_at, run_id"
            ))?;
            let rows = stmt.query_map([], run_summary)?;
            rows.collect()
        })
    }

    /// Every recorded step attempt of a run, in (host, step, attempt) order.
    pub fn step_attempts(&self, run_id: &str) -> Result<Vec<StepAttemptRow>, StoreError> {
        self.read(format!("read the step attempts of run {run_id}"), |conn| {
            let mut stmt = conn.prepare(
                "SELECT run_id, host, step_index, resource_id, action, destructive, attempt,
                        status, started_at, finished_at, exit_code, log_path, phase
                 FROM step_attempts WHERE run_id = ?1
                 ORDER BY host, step_index, attempt",
            )?;
            let rows = stmt.query_map([run_id], |r| {
                let phase: String = r.get(12)?;
                let status = match phase.as_str() {
                    "started" => StepStatus::Failed,
                    "sent" => StepStatus::NotRun,
                    _ => enum_column(r, 7)?,
                };
                Ok(StepAttemptRow {
                    run_id: r.get(0)?,
                    host: r.get(1)?,
                    step_index: r.get(2)?,
                    resource_id: r.get(3)?,
                    action: enum_column(r, 4)?,
                    destructive: r.get(5)?,
                    attempt: r.get(6)?,
                    status,
                    started_at: r.get(8)?,
                    finished_at: r.get(9)?,
                    exit_code: r.get(10)?,
                    log_path: r.get(11)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn run(&self, run_id: &str) -> Result<Option<RunSummary>, StoreError> {
        self.read(format!("read run {run_id}"), |conn| {
            conn.query_row(
                &format!("{RUN_SELECT} WHERE run_id = ?1"),
                [run_id],
                run_summary,
            )
            .optional()
        })
    }

    /// Mark a token as used by `run_id`. Returns `false`, changing nothing,
    /// when a token with these bytes was used before: the check and the
    /// mark are one statement, so two runs can never both use one token.
    pub fn claim_token(
        &mut self,
        sha256: &str,
        file: &str,
        operation: &str,
        hosts: &[String],
        run_id: &str,
        at: &str,
    ) -> Result<bool, StoreError> {
        self.claim(
            format!("mark token {file} as used"),
            "INSERT INTO tokens (sha256, file, operation, hosts_json, used_by_run, used_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (sha256) DO UPDATE SET
                 file = excluded.file, operation = excluded.operation,
                 hosts_json = excluded.hosts_json, used_by_run = excluded.used_by_run,
                 used_at = excluded.used_at, refused_reason = NULL
             WHERE tokens.used_by_run IS NULL",
            [sha256, file, operation],
            hosts,
            (run_id, at),
        )
    }

    /// Mark one operation of a token that lists several as used by
    /// `run_id`. Returns `false`, changing nothing, when that operation of
    /// these bytes was used before (one statement: two runs can never both
    /// use one operation of one token).
    pub fn claim_token_operation(
        &mut self,
        sha256: &str,
        file: &str,
        operation: &str,
        hosts: &[String],
        run_id: &str,
        at: &str,
    ) -> Result<bool, StoreError> {
        self.claim(
            format!("mark operation {operation} of token {file} as used"),
            "INSERT INTO token_operations (sha256, file, operation, hosts_json, used_by_run, used_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (sha256, operation) DO NOTHING",
            [sha256, file, operation],
            hosts,
            (run_id, at),
        )
    }

    /// One claiming insert of a token (or of one of its operations): true
    /// when it took, false when the claim existed already. The check and the
    /// mark are one statement.
    fn claim(
        &mut self,
        doing: String,
        sql: &str,
        [sha256, file, operation]: [&str; 3],
        hosts: &[String],
        (run_id, at): (&str, &str),
    ) -> Result<bool, StoreError> {
        let hosts_json = serde_json::to_string(hosts).expect("a list of strings encodes");
        self.write_synced(doing, |tx| {
            let n = tx.execute(
                sql,
                rusqlite::params![sha256, file, operation, hosts_json, run_id, at],
            )?;
            Ok(n > 0)
        })
    }

    /// The operations of the token whose bytes hash to `sha256` that were
    /// used already (a token that lists several operations).
    pub fn token_operations_used(&self, sha256: &str) -> Result<BTreeSet<String>, StoreError> {
        self.read(
            format!("read the used operations of token {sha256}"),
            |conn| {
                let mut q =
                    conn.prepare("SELECT operation FROM token_operations WHERE sha256 = ?1")?;
                let rows = q.query_map([sha256], |r| r.get::<_, String>(0))?;
                rows.collect()
            },
        )
    }

    /// What is recorded of the token whose bytes hash to `sha256`.
    pub fn token(&self, sha256: &str) -> Result<Option<TokenRow>, StoreError> {
        self.read(format!("read token {sha256}"), |conn| {
            conn.query_row(
                "SELECT sha256, file, operation, hosts_json, used_by_run, used_at, refused_reason
                 FROM tokens WHERE sha256 = ?1",
                [sha256],
                |r| {
                    Ok(TokenRow {
                        sha256: r.get(0)?,
                        file: r.get(1)?,
                        operation: r.get(2)?,
                        hosts: json_column(r, 3)?,
                        used_by_run: r.get(4)?,
                        used_at: r.get(5)?,
                        refused_reason: r.get(6)?,
                    })
                },
            )
            .optional()
        })
    }

    /// When tend first saw the token file `file` holding bytes that hash to
    /// `sha256`: recorded as `now` the first time (one statement, so two
    /// processes agree on the earlier), read back after. A read-only
    /// connection (`tend plan`) records nothing and answers `now` for a file
    /// never recorded, which is what the next writer will record.
    pub fn token_first_seen(&self, file: &str, sha256: &str, now: i64) -> Result<i64, StoreError> {
        let doing = || format!("record when token {file} was first seen");
        if self.conn.is_readonly("main").unwrap_or(true) {
            return self.read(doing(), |conn| {
                conn.query_row(
                    "SELECT first_seen FROM token_first_seen WHERE file = ?1 AND sha256 = ?2",
                    rusqlite::params![file, sha256],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map(|t| t.unwrap_or(now).min(now))
            });
        }
        self.read(doing(), |conn| {
            conn.query_row(
                "INSERT INTO token_first_seen (file, sha256, first_seen) VALUES (?1, ?2, ?3)
                 ON CONFLICT (file, sha256) DO UPDATE SET first_seen = min(first_seen, excluded.first_seen)
                 RETURNING first_seen",
                rusqlite::params![file, sha256, now],
                |r| r.get(0),
            )
        })
    }

    /// Remove the runs that history retention lets go (SPEC 8.5), with every
    /// row that belongs to them, in one IMMEDIATE transaction; returns their
    /// ids. Times are RFC 3339 UTC strings, compared as text (every time
    /// tend records has that form). A run is removed when it is finished and
    /// started before `keep_before`, or before `destructive_before` when it
    /// ran or planned a destructive step, carried a confirmation or used a
    /// token; the newest run of each host is never removed, nor a run some
    /// other table still refers to by foreign key (a table added later that
    /// this code does not know keeps its runs rather than losing rows).
    /// Token-use and managed-resource records are kept for ever.
    pub fn remove_old_runs(
        &mut self,
        keep_before: &str,
        destructive_before: &str,
    ) -> Result<Vec<String>, StoreError> {
        self.write("remove runs past their retention".into(), |tx| {
            let mut guard = String::new();
            let mut refs = tx.prepare(
                r#"SELECT m.name, f."from" FROM sqlite_master m, pragma_foreign_key_list(m.name) f
                   WHERE m.type = 'table' AND f."table" = 'runs'
                     AND m.name NOT IN ('events', 'step_attempts', 'host_outcomes')"#,
            )?;
            let refs: Vec<(String, String)> = refs
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            for (table, column) in refs {
                let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
                guard.push_str(&format!(
                    " AND r.run_id NOT IN (SELECT {c} FROM {t} WHERE {c} IS NOT NULL)",
                    c = q(&column),
                    t = q(&table)
                ));
            }
            let select = format!(
                r#"SELECT r.run_id FROM runs r
                   WHERE r.completed_at IS NOT NULL
                     AND r.started_at < ?1
                     AND (r.started_at < ?2 OR NOT (
                          r.result_json IS NULL
                          OR EXISTS (SELECT 1 FROM step_attempts s
                                     WHERE s.run_id = r.run_id AND s.destructive = 1)
                          OR EXISTS (SELECT 1 FROM tokens t WHERE t.used_by_run = r.run_id)
                          OR EXISTS (SELECT 1 FROM token_operations t WHERE t.used_by_run = r.run_id)
                          OR json_type(r.result_json, '$.confirmation') IN ('object', 'text')
                          OR EXISTS (SELECT 1 FROM json_each(r.result_json, '$.host_outcomes') h,
                                                  json_each(h.value, '$.steps') st
                                     WHERE json_extract(st.value, '$.destructive') = 1)))
                     AND r.run_id NOT IN (
                          SELECT run_id FROM (
                              SELECT ho.run_id, row_number() OVER (
                                  PARTITION BY ho.host
                                  ORDER BY r2.started_at DESC, r2.run_id DESC) AS n
                              FROM host_outcomes ho JOIN runs r2 ON r2.run_id = ho.run_id)
                          WHERE n = 1)
                     {guard}
                   ORDER BY r.run_id"#
            );
            let ids: Vec<String> = tx
                .prepare(&select)?
                .query_map([keep_before, destructive_before], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for id in &ids {
                for table in ["events", "step_attempts", "host_outcomes", "runs"] {
                    tx.execute(&format!("DELETE FROM {table} WHERE run_id = ?1"), [id])?;
                }
            }
            Ok(ids)
        })
    }

    /// Whether a run is recorded (finished or not).
    pub fn has_run(&self, run_id: &str) -> Result<bool, StoreError> {
        self.read(format!("look up run {run_id}"), |conn| {
            conn.query_row("SELECT 1 FROM runs WHERE run_id = ?1", [run_id], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    /// Run raw SQL, for tests that need a schema this code does not make.
    #[cfg(test)]
    pub(crate) fn test_exec(&self, sql: &str) {
        self.conn.execute_batch(sql).expect("test SQL");
    }

    /// Forget when token files were first seen before `before` (seconds since
    /// the epoch). Safe to forget: a file seen again is taken as first seen
    /// then, and its `expires` must still be within `token_max_ttl` of the
    /// earlier of that and its mtime.
    pub fn forget_token_sightings(&mut self, before: i64) -> Result<usize, StoreError> {
        self.write("forget old token sightings".into(), |tx| {
            tx.execute(
                "DELETE FROM token_first_seen WHERE first_seen < ?1",
                [before],
            )
        })
    }

    /// Connection settings, set on every open (they are not persistent,
    /// except the journal mode).
    fn configure(&self) -> Result<(), StoreError> {
        // First, so that the statements below wait for a lock held by
        // another process instead of failing at once.
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| err(&self.path, "set the busy timeout", e))?;
        // WAL lets `tend status` and `tend runs` read while the controller
        // writes.
        let mode: String = self
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| err(&self.path, "enable the WAL journal", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal {
                path: self.path.clone(),
                mode,
            });
        }
        // In WAL mode NORMAL cannot corrupt the database; a power cut can only
        // lose the last transactions, which a re-probe recovers.
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| err(&self.path, "set synchronous=NORMAL", e))?;
        self.conn
            .pragma_update(None, "foreign_keys", true)
            .map_err(|e| err(&self.path, "enable foreign keys", e))?;
        // A page cache of 512 KiB rather than SQLite's 2 MiB: the controller
        // holds a connection per pass, many at once, and tend.db's hot pages
        // (the last runs, the managed records) are few.
        self.conn
            .pragma_update(None, "cache_size", -512)
            .map_err(|e| err(&self.path, "set cache_size", e))?;
        Ok(())
    }

    /// Apply the migrations the database lacks, each in its own transaction
    /// together with its `user_version` bump. The version is read inside the
    /// IMMEDIATE transaction, so two processes opening a new database at once
    /// do not both apply a migration.
    fn migrate(&mut self) -> Result<(), StoreError> {
        loop {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| err(&self.path, "begin a migration", e))?;
            let found =
                user_version(&tx).map_err(|e| err(&self.path, "read the schema version", e))?;
            let current = current_version();
            if found > current {
                return Err(StoreError::SchemaVersion {
                    path: self.path.clone(),
                    found,
                    supported: current,
                });
            }
            if found == current {
                return Ok(());
            }
            let next = found + 1;
            let apply = |tx: Transaction<'_>| {
                tx.execute_batch(MIGRATIONS[found as usize])?;
                tx.pragma_update(None, "user_version", next)?;
                tx.commit()
            };
            apply(tx)
                .map_err(|e| err(&self.path, format!("migrate to schema version {next}"), e))?;
        }
    }

    /// Run `f` in one IMMEDIATE transaction and commit; any error rolls it
    /// back and is reported as failing to do `doing`.
    fn write<T>(
        &mut self,
        doing: String,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let run = |conn: &mut Connection| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        };
        run(&mut self.conn).map_err(|e| err(&self.path, doing, e))
    }

    /// [`Self::write`], committed with `synchronous=FULL`: the commit
    /// fsyncs the WAL, so it survives a power cut, not only a crash of tend.
    /// For the records a second run must never miss: a token marked used,
    /// and the attempt of a destructive step before it is sent.
    fn write_synced<T>(
        &mut self,
        doing: String,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| err(&self.path, "set synchronous=FULL", e))?;
        let r = self.write(doing, f);
        let back = self
            .conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| err(&self.path, "set synchronous=NORMAL", e));
        let v = r?;
        back?;
        Ok(v)
    }

    fn read<T>(
        &self,
        doing: String,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        f(&self.conn).map_err(|e| err(&self.path, doing, e))
    }
}

fn err(path: &Path, doing: impl Into<String>, source: rusqlite::Error) -> StoreError {
    StoreError::Db {
        doing: doing.into(),
        path: path.to_owned(),
        source,
    }
}

fn current_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).expect("fewer than 2^32 migrations")
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

const RUN_SELECT: &str = r#"SELECT run_id, started_at, action, "trigger", dispatch_mode,
    effective_mode, policy_outcome, policy_reason, desired_revision, completed_at,
    execution_outcome, target_hosts_json FROM runs"#;

fn run_summary(r: &Row<'_>) -> rusqlite::Result<RunSummary> {
    Ok(RunSummary {
        run: RunRow {
            run_id: r.get(0)?,
            started_at: r.get(1)?,
            action: enum_column(r, 2)?,
            trigger: enum_column(r, 3)?,
            dispatch_mode: enum_column(r, 4)?,
            effective_mode: enum_column(r, 5)?,
            policy_outcome: enum_column(r, 6)?,
            policy_reason: r.get(7)?,
            desired_revision: r.get(8)?,
            target_hosts: match r.get::<_, Option<String>>(11)? {
                None => Vec::new(),
                Some(j) => serde_json::from_str(&j).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(11, Type::Text, Box::new(e))
                })?,
            },
        },
        completed_at: r.get(9)?,
        execution_outcome: r
            .get::<_, Option<String>>(10)?
            .map(|s| parse_enum(10, s))
            .transpose()?,
    })
}

/// The stored spelling of an enumerated value: its JSON string.
fn text<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        // Only unit enums from core::report come here; they are strings.
        other => unreachable!("not a unit enum: {other:?}"),
    }
}

fn parse_enum<T: DeserializeOwned>(idx: usize, s: String) -> rusqlite::Result<T> {
    serde_json::from_value(serde_json::Value::String(s))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

fn enum_column<T: DeserializeOwned>(r: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    parse_enum(idx, r.get(idx)?)
}

fn json_column<T: DeserializeOwned>(r: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = r.get(idx)?;
    serde_json::from_str(&s)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::core::report::HostOutcomeKind;
    use crate::core::report::fixtures::{self, COMPLETED as T1};

    const T0: &str = "2026-11-23T12:00:00Z";
    const RUN: &str = "r-20261123T120000Z-ab12";

    fn open() -> (tempfile::TempDir, Db) {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("tend.db")).unwrap();
        (d, db)
    }

    fn run_row(run_id: &str, started_at: &str) -> RunRow {
        RunRow {
            target_hosts: vec!["web-1".into()],
            run_id: run_id.into(),
            started_at: started_at.into(),
            action: Action::Converge,
            trigger: Trigger::Cli,
            dispatch_mode: DispatchMode::Enforced,
            effective_mode: EffectiveMode::Quick,
            policy_outcome: PolicyOutcome::Approved,
            policy_reason: "approved".into(),
            desired_revision: "abc".into(),
        }
    }

    /// A finished run of `hosts`; every host failed preflight on its host key.
    fn result(hosts: &[&str]) -> RunResult {
        let mut r = fixtures::run_result(RUN, hosts);
        r.execution_outcome = ExecutionOutcome::ExecutionFailed;
        for h in &mut r.host_outcomes {
            h.outcome = HostOutcomeKind::PreflightFailed;
            h.last_failure_class = Some(FailureClass::HostKey);
        }
        r
    }

    fn count(db: &Db, table: &str) -> i64 {
        db.conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_new_database_is_at_the_latest_version_with_wal_and_settings() {
        let (_d, db) = open();
        assert_eq!(db.schema_version().unwrap() as usize, MIGRATIONS.len());
        let mode: String = db
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let pragma = |name: &str| -> i64 {
            db.conn
                .pragma_query_value(None, name, |r| r.get(0))
                .unwrap()
        };
        assert_eq!(pragma("synchronous"), 1, "NORMAL");
        assert_eq!(pragma("foreign_keys"), 1);
        assert_eq!(pragma("busy_timeout"), 5000);
    }

    #[test]
    fn a_synced_write_commits_with_full_and_goes_back_to_normal() {
        let (_d, mut db) = open();
        let full = db
            .write_synced("probe".into(), |tx| {
                tx.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
            })
            .unwrap();
        assert_eq!(full, 2, "FULL inside");
        assert!(db.claim_token("ab", "t.yaml", "op", &[], RUN, T0).is_ok());
        let after: i64 = db
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(after, 1, "NORMAL again");
    }

    #[test]
    fn migrating_again_is_a_no_op() {
        let (d, mut db) = open();
        db.begin_run(&run_row(RUN, T0)).unwrap();
        db.migrate().unwrap();
        drop(db);
        let db = Db::open(&d.path().join("tend.db")).unwrap();
        assert_eq!(db.schema_version().unwrap() as usize, MIGRATIONS.len());
        assert!(db.run(RUN).unwrap().is_some(), "data kept");
    }

    #[test]
    fn a_database_from_a_newer_tend_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tend.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Db::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaVersion { found: 99, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("tend.db"), "{err}");
    }

    #[test]
    fn a_run_is_begun_then_finished() {
        let (_d, mut db) = open();
        db.begin_run(&run_row(RUN, T0)).unwrap();
        let s = db.run(RUN).unwrap().unwrap();
        assert_eq!(s.run, run_row(RUN, T0));
        assert_eq!((s.completed_at, s.execution_outcome), (None, None));

        let r = result(&["web-1", "web-2"]);
        db.finish_run(&r, "{\"run_id\":\"x\"}").unwrap();
        let s = db.run(RUN).unwrap().unwrap();
        assert_eq!(s.completed_at.as_deref(), Some(T1));
        assert_eq!(s.execution_outcome, Some(ExecutionOutcome::ExecutionFailed));
        assert_eq!(count(&db, "host_outcomes"), 2);
        let (class, outcome): (String, String) = db
            .conn
            .query_row(
                "SELECT last_failure_class, outcome FROM host_outcomes WHERE host = 'web-2'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (class.as_str(), outcome.as_str()),
            ("HostKey", "PreflightFailed")
        );
        let stored: String = db
            .conn
            .query_row("SELECT result_json FROM runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, "{\"run_id\":\"x\"}");
    }

    #[test]
    fn finish_run_is_all_or_nothing() {
        let (_d, mut db) = open();
        db.begin_run(&run_row(RUN, T0)).unwrap();
        // The second web-1 violates the primary key after the runs row was
        // updated and web-1 inserted: all of it must roll back.
        let r = result(&["web-1", "web-2", "web-1"]);
        let err = db.finish_run(&r, "{}").unwrap_err();
        assert!(err.to_string().contains(RUN), "{err}");
        assert!(err.to_string().contains("tend.db"), "{err}");
        let s = db.run(RUN).unwrap().unwrap();
        assert_eq!(s.run, run_row(RUN, T0));
        assert_eq!((s.completed_at, s.execution_outcome), (None, None));
        assert_eq!(count(&db, "host_outcomes"), 0);

        // And the run can still be finished properly afterwards.
        db.finish_run(&result(&["web-1", "web-2"]), "{}").unwrap();
        assert_eq!(count(&db, "host_outcomes"), 2);
    }

    #[test]
    fn a_run_is_finished_once_and_only_if_begun() {
        let (_d, mut db) = open();
        let err = db.finish_run(&result(&["web-1"]), "{}").unwrap_err();
        assert!(matches!(err, StoreError::RunNotOpen { .. }), "{err:?}");
        db.begin_run(&run_row(RUN, T0)).unwrap();
        db.finish_run(&result(&["web-1"]), "{}").unwrap();
        let err = db.finish_run(&result(&[]), "{}").unwrap_err();
        assert!(matches!(err, StoreError::RunNotOpen { .. }), "{err:?}");
        assert_eq!(count(&db, "host_outcomes"), 1);
    }

    #[test]
    fn runs_are_listed_newest_first() {
        let (_d, mut db) = open();
        for (id, at) in [
            ("r-20261123T120000Z-aaaa", "2026-11-23T12:00:00Z"),
            ("r-20261123T130000Z-cccc", "2026-11-23T13:00:00Z"),
            ("r-20261123T123000Z-bbbb", "2026-11-23T12:30:00Z"),
        ] {
            db.begin_run(&run_row(id, at)).unwrap();
        }
        let ids: Vec<String> = db
            .runs(10)
            .unwrap()
            .into_iter()
            .map(|s| s.run.run_id)
            .collect();
        assert_eq!(
            ids,
            [
                "r-20261123T130000Z-cccc",
                "r-20261123T123000Z-bbbb",
                "r-20261123T120000Z-aaaa"
            ]
        );
        assert_eq!(db.runs(1).unwrap().len(), 1);
        assert_eq!(db.run("r-nope").unwrap(), None);
    }

    #[test]
    fn events_keep_their_order() {
        let (_d, mut db) = open();
        db.begin_run(&run_row(RUN, T0)).unwrap();
        let kinds = [
            "probe_started",
            "probe_done",
            "plan_done",
            "dispatch_started",
        ];
        let mut ids = vec![];
        for (i, kind) in kinds.iter().enumerate() {
            // The same timestamp for all: the order must come from the ids.
            ids.push(
                db.record_event(Some(RUN), T0, Some("web-1"), kind, &json!({"i": i}))
                    .unwrap(),
            );
        }
        db.record_event(None, T0, None, "controller_started", &json!({}))
            .unwrap();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let got = db.events(RUN).unwrap();
        let got_kinds: Vec<&str> = got.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(got_kinds, kinds);
        assert_eq!(got[2].detail, json!({"i": 2}));
        assert_eq!(got[2].host.as_deref(), Some("web-1"));
    }

    #[test]
    fn step_attempts_need_their_run() {
        let (_d, mut db) = open();
        let a = StepAttemptRow {
            run_id: RUN.into(),
            host: "web-1".into(),
            step_index: 0,
            resource_id: "file:/etc/a".into(),
            action: StepAction::Create,
            destructive: false,
            attempt: 1,
            status: StepStatus::Failed,
            started_at: T0.into(),
            finished_at: T1.into(),
            exit_code: None,
            log_path: None,
        };
        // foreign_keys=ON: no attempt without its run.
        assert!(db.record_step_attempt(&a).is_err());
        db.begin_run(&run_row(RUN, T0)).unwrap();
        db.record_step_attempt(&a).unwrap();
        let second = StepAttemptRow {
            attempt: 2,
            status: StepStatus::Succeeded,
            exit_code: Some(0),
            log_path: Some("runs/x/hosts/web-1/0-file__etc_a.log".into()),
            ..a.clone()
        };
        db.record_step_attempt(&second).unwrap();
        assert_eq!(count(&db, "step_attempts"), 2);
        let status: String = db
            .conn
            .query_row(
                "SELECT status FROM step_attempts WHERE attempt = 2",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(status, "succeeded");
    }

    #[test]
    fn managed_resources_are_upserted_listed_and_removed() {
        let (_d, mut db) = open();
        db.begin_run(&run_row(RUN, T0)).unwrap();
        db.upsert_managed(
            "web-1",
            "package:curl",
            "package",
            "curl",
            "{}",
            None,
            RUN,
            T0,
        )
        .unwrap();
        db.upsert_managed("web-1", "file:/a", "file", "/a", "{\"v\":1}", None, RUN, T0)
            .unwrap();
        db.upsert_managed("web-2", "file:/a", "file", "/a", "{}", None, RUN, T0)
            .unwrap();
        db.upsert_managed("web-1", "file:/a", "file", "/a", "{\"v\":2}", None, RUN, T1)
            .unwrap();
        let m = db.managed("web-1").unwrap();
        let ids: Vec<&str> = m.iter().map(|r| r.resource_id.as_str()).collect();
        assert_eq!(ids, ["file:/a", "package:curl"]);
        assert_eq!(m[0].spec_json, "{\"v\":2}");
        assert_eq!(m[0].applied_at, T1);
        assert_eq!(m[0].key, "/a");

        assert!(db.remove_managed("web-1", "file:/a").unwrap());
        assert!(!db.remove_managed("web-1", "file:/a").unwrap());
        assert_eq!(db.managed("web-1").unwrap().len(), 1);
        assert_eq!(
            db.managed("web-2").unwrap().len(),
            1,
            "other hosts untouched"
        );
    }

    #[test]
    fn a_token_is_claimed_once() {
        let (_d, mut db) = open();
        db.begin_run(&run_row(RUN, T0)).unwrap();
        db.begin_run(&run_row("r-2", T1)).unwrap();
        let hosts = vec!["web-1".to_string()];
        assert_eq!(db.token("abc").unwrap(), None);
        assert!(
            db.claim_token("abc", "confirm/t.yaml", "9c1f", &hosts, RUN, T0)
                .unwrap()
        );
        // The same bytes under another name are still the same token.
        assert!(
            !db.claim_token("abc", "confirm/u.yaml", "9c1f", &hosts, "r-2", T1)
                .unwrap()
        );
        let t = db.token("abc").unwrap().unwrap();
        assert_eq!(t.used_by_run.as_deref(), Some(RUN));
        assert_eq!(t.file, "confirm/t.yaml");
        assert_eq!(t.hosts, hosts);
    }

    #[test]
    fn read_only_open_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tend.db");
        assert!(Db::open_read_only(&path).unwrap().is_none());
        assert!(!path.exists(), "no database created");

        let mut db = Db::open(&path).unwrap();
        db.begin_run(&run_row(RUN, T0)).unwrap();
        let mut ro = Db::open_read_only(&path).unwrap().unwrap();
        assert!(ro.run(RUN).unwrap().is_some());
        assert!(ro.begin_run(&run_row("r-2", T1)).is_err());

        // Also once the writer is gone and SQLite has removed the -wal and
        // -shm files, as when `tend status` runs without a controller.
        drop(ro);
        drop(db);
        let ro = Db::open_read_only(&path).unwrap().unwrap();
        assert!(ro.run(RUN).unwrap().is_some());
    }

    /// Migration 3 rebuilds `tokens` and `managed_resources` without their
    /// foreign keys to `runs`: their rows survive it, and afterwards a run
    /// they name can be removed while they stay.
    #[test]
    fn migration_3_keeps_tokens_and_managed_resources_and_frees_their_runs() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tend.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute_batch(&format!(
                r#"INSERT INTO runs (run_id, started_at, action, "trigger", dispatch_mode,
                       effective_mode, policy_outcome, policy_reason, desired_revision)
                   VALUES ('{RUN}', '{T0}', 'converge', 'cli', 'enforced', 'full',
                           'Approved', 'ok', 'abc');
                   INSERT INTO tokens VALUES ('sha', 'confirm/t.yaml', 'op', '["web-1"]',
                           '{RUN}', '{T0}', NULL);
                   INSERT INTO managed_resources VALUES ('web-1', 'file:/x', 'file', '/x',
                           '{{}}', '{RUN}', '{T0}');"#
            ))
            .unwrap();
        }
        let mut db = Db::open(&path).unwrap();
        assert!(db.schema_version().unwrap() >= 3);
        let t = db.token("sha").unwrap().unwrap();
        assert_eq!(t.used_by_run.as_deref(), Some(RUN));
        assert_eq!(db.managed("web-1").unwrap().len(), 1);
        assert!(
            !db.claim_token("sha", "confirm/t.yaml", "op", &[], "r-2", T0)
                .unwrap()
        );
        db.test_exec(&format!("DELETE FROM runs WHERE run_id = '{RUN}'"));
        assert_eq!(count(&db, "tokens"), 1);
        assert_eq!(count(&db, "managed_resources"), 1);
        assert_eq!(
            db.token_first_seen("confirm/t.yaml", "sha", 100).unwrap(),
            100
        );
        assert_eq!(
            db.token_first_seen("confirm/t.yaml", "sha", 200).unwrap(),
            100
        );
    }
}
