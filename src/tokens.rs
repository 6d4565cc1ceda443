//! Confirmation token files in `<state_dir>/confirm/`: reading them with the
//! facts the check needs (bytes, mode, mtime, used before), choosing the one
//! that decides a run, and consuming it (recorded as used in SQLite first,
//! then moved to `confirm/used/`).
//!
//! Invariant: a token is claimed in the database before any destructive step
//! it authorizes runs, so its content can never authorize two runs.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::core::token::{self, TokenFile, Verdict};
use crate::store::StateDir;
use crate::store::db::Db;

/// Every `*.yaml` directly in `confirm/`, sorted by name. A file that cannot
/// be read is still listed (its check refuses it).
pub fn load(sd: &StateDir, db: Option<&Db>) -> Result<Vec<TokenFile>> {
    let dir = sd.confirm_dir();
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        Ok(e) => e,
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && !n.starts_with('.'))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let (bytes, mode, mtime) = match (fs::read(&path), fs::metadata(&path)) {
            (Ok(b), Ok(m)) => (b, m.mode(), m.mtime()),
            // Unreadable: refused as malformed, with its name.
            _ => (Vec::new(), 0o600, 0),
        };
        let sha = crate::core::sha256_hex(&bytes);
        let used_before = match db {
            Some(db) => db.token(&sha)?.is_some_and(|t| t.used_by_run.is_some()),
            None => false,
        };
        out.push(TokenFile {
            rel_path: format!("confirm/{name}"),
            bytes,
            mode,
            mtime,
            used_before,
        });
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
            verdicts
                .iter()
                .position(|v| v.doc.as_ref().is_some_and(|d| d.operation == operation))
        })
        .or(if verdicts.is_empty() { None } else { Some(0) });
    (
        pick.map(|i| (verdicts[i].clone(), files[i].clone())),
        verdicts,
    )
}

/// Use a token for `run_id`: claim it in the database (refused if its
/// content was used before, even by a concurrent run), then move the file to
/// `confirm/used/`.
pub fn consume(
    sd: &StateDir,
    db: &mut Db,
    file: &TokenFile,
    operation: &str,
    hosts: &[String],
    run_id: &str,
    at: &str,
) -> Result<()> {
    if !db.claim_token(&file.sha256(), &file.rel_path, operation, hosts, run_id, at)? {
        bail!("token {} was used by another run meanwhile", file.rel_path);
    }
    let from = sd.root().join(&file.rel_path);
    let name = from
        .file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned();
    let to = sd.confirm_used_dir().join(format!("{run_id}-{name}"));
    fs::create_dir_all(sd.confirm_used_dir())
        .with_context(|| format!("creating {}", sd.confirm_used_dir().display()))?;
    fs::rename(&from, &to)
        .with_context(|| format!("moving used token {} to {}", from.display(), to.display()))?;
    Ok(())
}
