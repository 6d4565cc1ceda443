//! History retention (SPEC 8.5): old runs leave `runs/` and SQLite, used
//! tokens leave `confirm/used/`.
//!
//! Order, so that a crash at any point leaves nothing half-referenced: the
//! rows of every removed run go first, in one transaction; only after it
//! commits are their `runs/<id>/` directories removed. A crash in between
//! leaves directories that no record refers to, never a record whose
//! artifacts are gone; each sweep also removes such orphans (a `runs/<id>/`
//! with no row, whose id says it began before the `keep` cutoff).
//!
//! Invariant: only finished runs are removed; the newest run of each host,
//! token-use records and managed-resource records are always kept. The
//! clock is the caller's (`now`), so the rules are tested with a fake one.

use std::fs;
use std::io;
use std::time::Duration;

use super::{Db, StateDir, StoreError};
use crate::core::spec::History;
use crate::core::token::format_rfc3339;

/// What one sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Runs whose records and directory were removed, by id.
    pub runs: Vec<String>,
    /// `runs/<id>/` directories without a record that were removed.
    pub orphans: Vec<String>,
    /// Files removed from `confirm/used/`.
    pub used_tokens: Vec<String>,
}

/// Apply `history` to the state dir at `now` (seconds since the epoch),
/// through an open database. `tend apply` calls this at its end.
pub fn apply(sd: &StateDir, db: &mut Db, history: &History, now: i64) -> Result<Swept, StoreError> {
    let keep = cutoff(now, history.keep.0);
    let keep_destructive = cutoff(now, history.keep_destructive.0);
    let runs = db.remove_old_runs(&format_rfc3339(keep), &format_rfc3339(keep_destructive))?;
    // The rows are gone (committed): now the directories.
    for id in &runs {
        remove_run_dir(sd, id)?;
    }
    let orphans = sweep_orphans(sd, db, keep)?;
    let used_tokens = sweep_used_tokens(sd, keep_destructive)?;
    db.forget_token_sightings(keep_destructive)?;
    Ok(Swept {
        runs,
        orphans,
        used_tokens,
    })
}

/// The controller's entry point, called at its start and then hourly: opens
/// the state dir's database and applies `history` at `now` (seconds since
/// the epoch). Blocking (SQLite and file removal): call it off the async
/// runtime. Takes the database's write lock for one short transaction; the
/// state dir's `lock` must already be held by the caller.
pub fn sweep(sd: &StateDir, history: &History, now: i64) -> Result<Swept, StoreError> {
    let mut db = Db::open(&sd.db_path())?;
    apply(sd, &mut db, history, now)
}

/// [`sweep`] by the clock now, for the end of `tend apply` and the
/// controller's timer: what it removed is logged, and a failure is logged as
/// a warning and returned as `None`, since retention failing must not change
/// the outcome of the run that called it (the next sweep tries again).
pub fn sweep_now(sd: &StateDir, history: &History) -> Option<Swept> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    match sweep(sd, history, now) {
        Ok(s) => {
            if s != Swept::default() {
                tracing::info!(
                    runs = s.runs.len(),
                    orphans = s.orphans.len(),
                    used_tokens = s.used_tokens.len(),
                    "history retention removed old records"
                );
            }
            Some(s)
        }
        Err(e) => {
            tracing::warn!(error = %e, "history retention failed; it is tried again next time");
            None
        }
    }
}

fn cutoff(now: i64, keep: Duration) -> i64 {
    now.saturating_sub(i64::try_from(keep.as_secs()).unwrap_or(i64::MAX))
}

fn remove_run_dir(sd: &StateDir, id: &str) -> Result<(), StoreError> {
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return Ok(());
    }
    let dir = sd.run_dir(id);
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(StoreError::io("remove run directory", &dir, e))
        }
        _ => Ok(()),
    }
}

/// The start time a run id carries (`r-YYYYMMDDTHHMMSSZ-xxxx`), as seconds
/// since the epoch; `None` for a name of another form, which is left alone.
pub fn run_id_time(id: &str) -> Option<i64> {
    let stamp = id.strip_prefix("r-")?.get(..16)?;
    let b = stamp.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        stamp.get(0..4)?,
        stamp.get(4..6)?,
        stamp.get(6..8)?,
        stamp.get(9..11)?,
        stamp.get(11..13)?,
        stamp.get(13..15)?
    );
    crate::core::token::parse_rfc3339(&rfc)
}

/// `runs/<id>/` with no row, begun before `keep_before`: left by a crash
/// between the removal of its rows and of its directory.
fn sweep_orphans(sd: &StateDir, db: &Db, keep_before: i64) -> Result<Vec<String>, StoreError> {
    let runs = sd.root().join("runs");
    let entries = match fs::read_dir(&runs) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list", &runs, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list", &runs, e))?;
        let id = entry.file_name().to_string_lossy().into_owned();
        let old = run_id_time(&id).is_some_and(|t| t < keep_before);
        if old && entry.file_type().is_ok_and(|t| t.is_dir()) && !db.has_run(&id)? {
            remove_run_dir(sd, &id)?;
            out.push(id);
        }
    }
    out.sort();
    Ok(out)
}

/// Files in `confirm/used/` last modified before `before`. Their records
/// in SQLite stay: a used token is refused for ever by its content.
fn sweep_used_tokens(sd: &StateDir, before: i64) -> Result<Vec<String>, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let dir = sd.confirm_used_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list", &dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() && meta.mtime() < before {
            let path = entry.path();
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(StoreError::io("remove used token", &path, e));
                }
                _ => out.push(entry.file_name().to_string_lossy().into_owned()),
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::report::{self, RunResult, fixtures};
    use crate::core::spec::HumanDuration;
    use crate::store::db::{RunRow, StepAttemptRow};

    const DAY: i64 = 86400;
    /// 2026-12-01T00:00:00Z, the fake `now`.
    const NOW: i64 = 1_796_083_200;

    fn history() -> History {
        History {
            keep: HumanDuration(Duration::from_secs(30 * DAY as u64)),
            keep_destructive: HumanDuration(Duration::from_secs(365 * DAY as u64)),
        }
    }

    fn id_at(t: i64, tag: &str) -> String {
        let s = format_rfc3339(t).replace(['-', ':'], "");
        format!("r-{s}-{tag}")
    }

    struct Fx {
        _d: tempfile::TempDir,
        sd: StateDir,
        db: Db,
    }

    fn fx() -> Fx {
        let d = tempfile::tempdir().unwrap();
        let sd = StateDir::new(d.path().join("st"));
        sd.ensure().unwrap();
        let db = Db::open(&sd.db_path()).unwrap();
        Fx { _d: d, sd, db }
    }

    /// Record a finished run of `host` begun `age_days` before NOW, with or
    /// without a destructive step in its result, and its artifacts.
    fn run(fx: &mut Fx, host: &str, age_days: i64, tag: &str, destructive: bool) -> String {
        let t = NOW - age_days * DAY;
        let id = id_at(t, tag);
        let row = RunRow {
            run_id: id.clone(),
            started_at: format_rfc3339(t),
            action: report::Action::Converge,
            trigger: report::Trigger::Cli,
            dispatch_mode: report::DispatchMode::Enforced,
            effective_mode: report::EffectiveMode::Quick,
            policy_outcome: report::PolicyOutcome::Approved,
            policy_reason: "approved".into(),
            desired_revision: "abc".into(),
            target_hosts: vec![host.into()],
        };
        fx.db.begin_run(&row).unwrap();
        let mut result: RunResult = fixtures::run_result(&id, &[host]);
        for o in &mut result.host_outcomes {
            o.steps[0].destructive = destructive;
        }
        fx.db
            .finish_run(&result, &serde_json::to_string(&result).unwrap())
            .unwrap();
        fx.db
            .record_event(
                Some(&id),
                &row.started_at,
                Some(host),
                "probed",
                &serde_json::json!({}),
            )
            .unwrap();
        fx.sd.write_run_artifacts(&id, &result, b"{}", &[]).unwrap();
        id
    }

    fn runs_left(fx: &Fx) -> Vec<String> {
        let mut v: Vec<String> = fx
            .db
            .runs(1000)
            .unwrap()
            .into_iter()
            .map(|r| r.run.run_id)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn old_runs_go_destructive_ones_stay_longer_newest_per_host_always() {
        let mut fx = fx();
        let old = run(&mut fx, "a", 40, "old1", false);
        let old_destructive = run(&mut fx, "a", 40, "des1", true);
        let ancient_destructive = run(&mut fx, "a", 400, "des2", true);
        let recent = run(&mut fx, "a", 5, "new1", false);
        // Host b's only run is ancient: it is b's newest, so it stays.
        let b_only = run(&mut fx, "b", 500, "bbb1", false);

        let swept = apply(&fx.sd, &mut fx.db, &history(), NOW).unwrap();
        let mut gone = vec![old.clone(), ancient_destructive.clone()];
        gone.sort();
        assert_eq!(swept.runs, gone);
        let mut kept = vec![old_destructive.clone(), recent.clone(), b_only.clone()];
        kept.sort();
        assert_eq!(runs_left(&fx), kept);
        for id in &gone {
            assert!(!fx.sd.run_dir(id).exists(), "{id}");
            assert!(fx.db.events(id).unwrap().is_empty(), "{id}");
        }
        for id in &kept {
            assert!(fx.sd.run_dir(id).join("result.json").is_file(), "{id}");
        }
        // A second sweep at the same time removes nothing more.
        assert_eq!(
            apply(&fx.sd, &mut fx.db, &history(), NOW).unwrap(),
            Swept::default()
        );
    }

    #[test]
    fn a_run_that_used_a_token_or_ran_a_destructive_step_is_destructive() {
        let mut fx = fx();
        let used = run(&mut fx, "a", 40, "tok1", false);
        let ran = run(&mut fx, "a", 40, "ran1", false);
        run(&mut fx, "a", 1, "new1", false);
        assert!(
            fx.db
                .claim_token("sha", "confirm/t.yaml", "op", &["a".into()], &used, "x")
                .unwrap()
        );
        fx.db
            .record_step_attempt(&StepAttemptRow {
                run_id: ran.clone(),
                host: "a".into(),
                step_index: 0,
                resource_id: "file:/x".into(),
                action: report::StepAction::Delete,
                destructive: true,
                attempt: 1,
                status: report::StepStatus::Succeeded,
                started_at: format_rfc3339(NOW - 40 * DAY),
                finished_at: format_rfc3339(NOW - 40 * DAY),
                exit_code: Some(0),
                log_path: None,
            })
            .unwrap();
        let swept = apply(&fx.sd, &mut fx.db, &history(), NOW).unwrap();
        assert!(swept.runs.is_empty(), "{swept:?}");
        // A year later both go, and the token stays used for ever.
        let later = NOW + 400 * DAY;
        run(&mut fx, "a", -399, "new2", false);
        let swept = apply(&fx.sd, &mut fx.db, &history(), later).unwrap();
        assert!(
            swept.runs.contains(&used) && swept.runs.contains(&ran),
            "{swept:?}"
        );
        let token = fx.db.token("sha").unwrap().unwrap();
        assert_eq!(token.used_by_run.as_deref(), Some(used.as_str()));
    }

    #[test]
    fn unfinished_runs_are_never_removed() {
        let mut fx = fx();
        let t = NOW - 100 * DAY;
        let id = id_at(t, "open");
        fx.db
            .begin_run(&RunRow {
                run_id: id.clone(),
                started_at: format_rfc3339(t),
                action: report::Action::Converge,
                trigger: report::Trigger::Cli,
                dispatch_mode: report::DispatchMode::Enforced,
                effective_mode: report::EffectiveMode::Quick,
                policy_outcome: report::PolicyOutcome::Approved,
                policy_reason: "approved".into(),
                desired_revision: "abc".into(),
                target_hosts: vec!["a".into()],
            })
            .unwrap();
        run(&mut fx, "a", 1, "new1", false);
        assert!(
            apply(&fx.sd, &mut fx.db, &history(), NOW)
                .unwrap()
                .runs
                .is_empty()
        );
        assert!(fx.db.run(&id).unwrap().is_some());
    }

    #[test]
    fn orphaned_run_dirs_and_old_used_tokens_are_swept() {
        let mut fx = fx();
        // A crash after the rows went and before the directory did.
        let orphan = id_at(NOW - 40 * DAY, "orph");
        fs::create_dir_all(fx.sd.run_dir(&orphan)).unwrap();
        let young_orphan = id_at(NOW - DAY, "yorp");
        fs::create_dir_all(fx.sd.run_dir(&young_orphan)).unwrap();
        fs::create_dir_all(fx.sd.root().join("runs/not-a-run")).unwrap();
        let used = fx.sd.confirm_used_dir();
        for (name, age) in [("old.yaml", 400), ("new.yaml", 10)] {
            let p = used.join(name);
            fs::write(&p, "x").unwrap();
            let f = fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs((NOW - age * DAY) as u64))
                .unwrap();
        }
        fx.db
            .token_first_seen("confirm/x.yaml", "s", NOW - 400 * DAY)
            .unwrap();
        let swept = apply(&fx.sd, &mut fx.db, &history(), NOW).unwrap();
        assert_eq!(swept.orphans, [orphan]);
        assert_eq!(swept.used_tokens, ["old.yaml"]);
        assert!(fx.sd.run_dir(&young_orphan).exists());
        assert!(fx.sd.root().join("runs/not-a-run").exists());
        assert!(used.join("new.yaml").exists());
        // The old sighting was forgotten: the file counts as first seen now.
        assert_eq!(
            fx.db.token_first_seen("confirm/x.yaml", "s", NOW).unwrap(),
            NOW
        );
    }

    #[test]
    fn a_table_that_refers_to_runs_keeps_its_runs() {
        let mut fx = fx();
        let old = run(&mut fx, "a", 40, "old1", false);
        run(&mut fx, "a", 1, "new1", false);
        fx.db
            .test_exec("CREATE TABLE later (run_id TEXT REFERENCES runs (run_id)) STRICT;");
        fx.db
            .test_exec(&format!("INSERT INTO later VALUES ('{old}')"));
        assert!(
            apply(&fx.sd, &mut fx.db, &history(), NOW)
                .unwrap()
                .runs
                .is_empty()
        );
    }

    #[test]
    fn run_ids_carry_their_time() {
        assert_eq!(run_id_time("r-20261201T000000Z-ab12"), Some(NOW));
        assert_eq!(run_id_time(&id_at(NOW - 5, "x")), Some(NOW - 5));
        for bad in [
            "r-2026",
            "x-20261201T000000Z-ab12",
            "r-20261201X000000Z-a",
            "r-2026é201T000000Z-ab",
        ] {
            assert_eq!(run_id_time(bad), None, "{bad}");
        }
    }
}
