//! Confirmation token files in `<state_dir>/confirm/`: reading them with the
//! facts the check needs (bytes, mode, mtime, used before), choosing the one
//! that decides a run, and consuming it (recorded as used in SQLite first,
//! then moved to `confirm/used/`).
//!
//! Invariant: a token is claimed in the database before any destructive step
//! it authorizes runs, so its content can never authorize two runs.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::core::token::{self, TokenFile, Verdict};
use crate::store::db::Db;
use crate::store::{StateDir, trust};

/// Every `*.yaml` directly in `confirm/`, sorted by name, whatever its type:
/// a symlink, FIFO or directory is listed with the reason it is refused, as
/// is every file of a `confirm/` that is not safe (world-writable, or
/// group-writable by a group outside `confirmers`). Each file is opened
/// without following symlinks and without blocking, and judged by `fstat` of
/// what was opened (`store::trust::read_token`). When tend first saw each
/// file with its bytes is recorded in SQLite (`db`; read only when the
/// connection is read-only) and bounds its `expires`.
pub fn load(sd: &StateDir, db: Option<&Db>, now: i64) -> Result<Vec<TokenFile>> {
    let dir = sd.confirm_dir();
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        Ok(e) => e,
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && !n.starts_with('.'))
        .collect();
    names.sort();
    let dir_refusal = trust::confirm_dir_refusal(&dir, sd.confirmers());
    for name in names {
        let rel_path = format!("confirm/{name}");
        let read = match &dir_refusal {
            Some(why) => Err(why.clone()),
            None => trust::read_token(&dir.join(&name), sd.confirmers()),
        };
        let file = match read {
            Ok(r) => {
                let sha = crate::core::sha256_hex(&r.bytes);
                let (used_before, used_operations, first_seen) = match db {
                    Some(db) => (
                        db.token(&sha)?.is_some_and(|t| t.used_by_run.is_some()),
                        db.token_operations_used(&sha)?,
                        db.token_first_seen(&rel_path, &sha, now)?,
                    ),
                    None => (false, BTreeSet::new(), now),
                };
                TokenFile {
                    rel_path,
                    bytes: r.bytes,
                    mode: r.mode,
                    mtime: r.mtime,
                    first_seen,
                    used_before,
                    used_operations,
                    refused: None,
                }
            }
            Err(why) => TokenFile {
                rel_path,
                bytes: Vec::new(),
                mode: 0,
                mtime: 0,
                first_seen: now,
                used_before: false,
                used_operations: BTreeSet::new(),
                refused: Some(why),
            },
        };
        out.push(file);
    }
    Ok(out)
}

/// Check every token against an operation and choose the one that decides:
/// the first valid one; else the first that names this operation (its
/// refusal is what the operator needs to see); else the first at all.
pub fn choose(
    files: &[TokenFile],
    operation: &str,
    hosts: &BTreeSet<String>,
    now: i64,
    max_ttl: Duration,
) -> (Option<(Verdict, TokenFile)>, Vec<Verdict>) {
    let verdicts: Vec<Verdict> = files
        .iter()
        .map(|f| token::check(f, operation, hosts, now, max_ttl))
        .collect();
    let pick = verdicts
        .iter()
        .position(Verdict::is_valid)
        .or_else(|| {
            verdicts.iter().position(|v| {
                v.doc
                    .as_ref()
                    .is_some_and(|d| d.scope_of(operation).is_some())
            })
        })
        .or(if verdicts.is_empty() { None } else { Some(0) });
    (
        pick.map(|i| (verdicts[i].clone(), files[i].clone())),
        verdicts,
    )
}

/// Use a token for `run_id`: claim it in the database (refused if its
/// content was used before, even by a concurrent run), then move the file to
/// `confirm/used/`. A token that lists several operations is claimed for
/// `operation` alone, and moves once all of its operations were used.
pub fn consume(
    sd: &StateDir,
    db: &mut Db,
    file: &TokenFile,
    operation: &str,
    hosts: &[String],
    run_id: &str,
    at: &str,
) -> Result<()> {
    let doc = token::parse(&file.bytes).ok();
    let multi = doc.as_ref().is_some_and(|d| d.is_multi());
    if let Some(doc) = doc.as_ref().filter(|d| d.is_multi()) {
        // A token listing several operations is used once per operation,
        // and leaves `confirm/` when every one of them was used.
        let sha = file.sha256();
        if !db.claim_token_operation(&sha, &file.rel_path, operation, hosts, run_id, at)? {
            bail!(
                "operation {operation} of token {} was used by another run meanwhile",
                file.rel_path
            );
        }
        let used = db.token_operations_used(&sha)?;
        if !doc.scopes().iter().all(|s| used.contains(&s.operation)) {
            return Ok(());
        }
    } else if !db.claim_token(&file.sha256(), &file.rel_path, operation, hosts, run_id, at)? {
        bail!("token {} was used by another run meanwhile", file.rel_path);
    }
    let from = sd.root().join(&file.rel_path);
    let name = from
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "token.yaml".into());
    let to = sd.confirm_used_dir().join(format!("{run_id}-{name}"));
    sd.ensure()
        .with_context(|| format!("creating {}", sd.confirm_used_dir().display()))?;
    match fs::rename(&from, &to) {
        // Two passes that used the last operations of one token at once
        // both move it; the second finds it moved (claims are in SQLite).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && multi => Ok(()),
        r => r.with_context(|| format!("moving used token {} to {}", from.display(), to.display())),
    }
}
