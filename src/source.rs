//! Reads the desired-state directory into a `SourceTree` (bytes only) and
//! works out its revision: the git commit of the work tree (with a marker
//! when it is dirty), else a content hash.
//!
//! Invariant: reads only; never writes into the desired-state directory. Size
//! limits are checked on metadata before reading, so a huge file is never
//! loaded.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::core::model::{
    Blob, FILES_ROOT_KEY, MAX_SOURCE_BYTES, MAX_YAML_BYTES, SourceTree, content_hash,
};

/// Read everything `validate` needs. Only an unreadable directory is an error;
/// problems with single files become `Blob::Refused`/`TooLarge` and are
/// reported by validation with their file name.
pub fn read_tree(dir: &Path) -> Result<SourceTree> {
    let meta = fs::metadata(dir).with_context(|| {
        format!(
            "cannot read the desired-state directory {} (use --dir to point at it)",
            dir.display()
        )
    })?;
    if !meta.is_dir() {
        anyhow::bail!(
            "{} is not a directory (use --dir to point at the desired state)",
            dir.display()
        );
    }
    Ok(SourceTree {
        tend: read_optional(&dir.join("tend.yaml"), MAX_YAML_BYTES)?,
        inventory: read_optional(&dir.join("inventory.yaml"), MAX_YAML_BYTES)?,
        hosts: read_flat(&dir.join("hosts"))?,
        groups: read_flat(&dir.join("groups"))?,
        sources: read_sources(dir, &dir.join("files"))?,
    })
}

fn read_blob(path: &Path, limit: u64) -> Blob {
    match fs::metadata(path) {
        Err(e) => Blob::Refused(format!("cannot read: {e}")),
        Ok(m) if !m.is_file() => Blob::Refused("not a regular file".into()),
        Ok(m) if m.len() > limit => Blob::TooLarge(m.len()),
        Ok(_) => match fs::read(path) {
            Ok(b) if b.len() as u64 > limit => Blob::TooLarge(b.len() as u64),
            Ok(b) => Blob::Bytes(b),
            Err(e) => Blob::Refused(format!("cannot read: {e}")),
        },
    }
}

fn read_optional(path: &Path, limit: u64) -> Result<Option<Blob>> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        Ok(_) => Ok(Some(read_blob(path, limit))),
    }
}

/// `hosts/` or `groups/`: the files directly inside, by name; dotfiles (editor
/// swap files) are skipped.
fn read_flat(dir: &Path) -> Result<BTreeMap<String, Blob>> {
    let mut out = BTreeMap::new();
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        Ok(e) => e,
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        out.insert(name, read_blob(&entry.path(), MAX_YAML_BYTES));
    }
    Ok(out)
}

/// `files/**`: every regular file, by path relative to `files/`. `files/`
/// and every path under it must stay inside the desired-state dir once
/// symlinks are resolved, so a `source:` cannot copy arbitrary files of the
/// machine tend runs on to a host: `files/` resolving elsewhere refuses every
/// source (under `FILES_ROOT_KEY`) and reads nothing; a symlink under it
/// resolving elsewhere is refused by name.
fn read_sources(dir: &Path, root: &Path) -> Result<BTreeMap<String, Blob>> {
    let mut out = BTreeMap::new();
    let canon_dir =
        fs::canonicalize(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let canon_root = match fs::canonicalize(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling `files` symlink is still a refusal worth naming.
            if fs::symlink_metadata(root).is_ok() {
                out.insert(
                    FILES_ROOT_KEY.to_string(),
                    Blob::Refused(format!("files/ is a broken symlink: {e}")),
                );
            }
            return Ok(out);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", root.display())),
        Ok(p) => p,
    };
    if !canon_root.starts_with(&canon_dir) {
        out.insert(
            FILES_ROOT_KEY.to_string(),
            Blob::Refused(format!(
                "files/ resolves to {}, outside the desired-state directory",
                canon_root.display()
            )),
        );
        return Ok(out);
    }
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let path = entry.path();
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let rel = rel.to_string_lossy().replace('\\', "/");
            let ft = entry
                .file_type()
                .with_context(|| format!("cannot stat {}", path.display()))?;
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            let blob = if ft.is_symlink() {
                match fs::canonicalize(&path) {
                    Ok(real) if real.starts_with(&canon_dir) => read_blob(&real, MAX_SOURCE_BYTES),
                    Ok(real) => Blob::Refused(format!(
                        "is a symlink to {}, outside files/ and the desired-state directory",
                        real.display()
                    )),
                    Err(e) => Blob::Refused(format!("is a broken symlink: {e}")),
                }
            } else {
                read_blob(&path, MAX_SOURCE_BYTES)
            };
            out.insert(rel, blob);
        }
    }
    Ok(out)
}

/// The desired revision: `git` commit of the work tree holding `dir`, with
/// `-dirty-<hash>` when the desired state differs from the commit; otherwise
/// `sha256:<content hash>`. The state dir never counts (it is excluded from
/// the git status check and is not part of the tree).
pub fn revision(dir: &Path, state_dir: &Path, tree: &SourceTree) -> String {
    let hash = content_hash(tree);
    match git_revision(dir, state_dir) {
        Some((commit, false)) => commit,
        Some((commit, true)) => format!("{commit}-dirty-{}", &hash[..12]),
        None => format!("sha256:{hash}"),
    }
}

/// `git -C dir ARGS…`: its stdout without the trailing newline, or `None`
/// when git is missing or fails.
pub fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        // `git status` must not refresh the index: the controller watches
        // the git dir, and a write there would wake it again.
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// The git commit of a desired revision (`<commit>` or
/// `<commit>-dirty-<hash>`), or None for a revision from outside git.
pub fn commit_of(revision: &str) -> Option<&str> {
    let c = revision.get(..40)?;
    let rest = &revision[40..];
    (c.bytes().all(|b| b.is_ascii_hexdigit()) && (rest.is_empty() || rest.starts_with("-dirty-")))
        .then_some(c)
}

/// Whether commit `ancestor` is `commit` or one of its ancestors in the git
/// repository holding `dir`; false when git does not know either.
pub fn is_ancestor(dir: &Path, ancestor: &str, commit: &str) -> bool {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["merge-base", "--is-ancestor", ancestor, commit])
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn git_revision(dir: &Path, state_dir: &Path) -> Option<(String, bool)> {
    let git = |args: &[&str]| git(dir, args);
    if git(&["rev-parse", "--is-inside-work-tree"])? != "true" {
        return None;
    }
    let commit = git(&["rev-parse", "HEAD"])?;
    let mut args = vec![
        "status",
        "--porcelain",
        "--untracked-files=normal",
        "--",
        ".",
    ];
    // Exclude the state dir when it lies inside the desired-state dir.
    let exclude = fs::canonicalize(state_dir)
        .ok()
        .zip(fs::canonicalize(dir).ok())
        .and_then(|(s, d)| {
            s.strip_prefix(&d)
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
        })
        .filter(|p| !p.is_empty())
        .map(|p| format!(":(exclude){p}"));
    if let Some(e) = &exclude {
        args.push(e);
    }
    let status = git(&args)?;
    Some((commit, !status.is_empty()))
}
