//! File and signal triggers into `Event`s: the desired-state directory and
//! its git dir (debounced by the loop), the state dir's `KILL`, `confirm/`
//! and `retry/`, and SIGHUP, SIGINT, SIGTERM.
//!
//! Invariant: a change that only touches the state dir (status files, runs,
//! the database) never becomes `DesiredChanged`, even when the state dir
//! lies inside the desired-state directory; and the watches never descend
//! into the state dir, whose `runs/` grows without bound.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use super::Event;

/// Where things are, as absolute paths.
#[derive(Clone, Debug)]
pub struct Paths {
    pub desired: PathBuf,
    pub state: PathBuf,
    /// The git dir of the work tree holding the desired state, if any.
    pub git: Option<PathBuf>,
}

impl Paths {
    pub fn resolve(desired: &Path, state: &Path) -> Result<Paths> {
        let desired = desired
            .canonicalize()
            .with_context(|| format!("resolving the desired-state dir {}", desired.display()))?;
        let state = state
            .canonicalize()
            .with_context(|| format!("resolving the state dir {}", state.display()))?;
        Ok(Paths {
            git: git_dir(&desired),
            desired,
            state,
        })
    }

    /// What a changed path means, if anything.
    pub fn classify(&self, path: &Path) -> Option<Event> {
        if let Ok(rel) = path.strip_prefix(&self.state) {
            let parts: Vec<_> = rel.iter().collect();
            return match parts.as_slice() {
                [k] if *k == "KILL" => {
                    Some(Event::KillChanged(std::fs::symlink_metadata(path).is_ok()))
                }
                [c, f] if *c == "confirm" && Path::new(f).extension() == Some("yaml".as_ref()) => {
                    Some(Event::TokenAppeared)
                }
                [r, h] if *r == "retry" && *h != "used" => {
                    let h = h.to_string_lossy();
                    (!h.starts_with('.')).then(|| Event::RetryRequested(h.into_owned()))
                }
                _ => None,
            };
        }
        if let Some(git) = &self.git
            && let Ok(rel) = path.strip_prefix(git)
        {
            // A commit, checkout or reset moves HEAD or a ref; objects and
            // logs follow them and say nothing new.
            let s = rel.to_string_lossy();
            let relevant = (s == "HEAD" || s == "packed-refs" || s.starts_with("refs/"))
                && !s.ends_with(".lock");
            return relevant.then_some(Event::DesiredChanged);
        }
        if path.starts_with(&self.desired) {
            let name = path.file_name().map(|n| n.to_string_lossy());
            // Editors' swap and backup files are not the desired state.
            if name.is_some_and(|n| n.ends_with('~') || n.ends_with(".swp") || n.starts_with(".#"))
            {
                return None;
            }
            return Some(Event::DesiredChanged);
        }
        None
    }
}

/// `git rev-parse --absolute-git-dir`, when `dir` is in a git work tree.
fn git_dir(dir: &Path) -> Option<PathBuf> {
    crate::source::git(dir, &["rev-parse", "--absolute-git-dir"]).map(PathBuf::from)
}

/// The file watches; dropping it stops them.
pub struct Watches {
    watcher: RecommendedWatcher,
    paths: Paths,
    /// Directories of the desired state watched so far, each with the
    /// identity (device, inode) it had when its watch was added. A watch
    /// follows an inode, not a path: a directory removed and created again
    /// (a checkout, `git stash`) or the desired-state dir replaced by a
    /// rename is a new inode that nothing watches until it is re-armed.
    watched: BTreeMap<PathBuf, Identity>,
}

type Identity = (u64, u64);

fn identity(p: &Path) -> Option<Identity> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

impl Watches {
    pub fn start(paths: Paths, tx: UnboundedSender<Event>) -> Result<Watches> {
        let classify = paths.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let ev = match res {
                Ok(ev) => ev,
                Err(e) => {
                    // A lost event (queue overflow): assume the desired state
                    // changed; a reload of an unchanged tree costs little.
                    tracing::warn!(error = %e, "file watch error; re-reading the desired state");
                    let _ = tx.send(Event::DesiredChanged);
                    return;
                }
            };
            let meaningful = match ev.kind {
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
                // A token written in place is complete when it is closed.
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                _ => false,
            };
            if !meaningful {
                return;
            }
            for p in &ev.paths {
                if let Some(e) = classify.classify(p) {
                    if let Event::RetryRequested(_) = &e {
                        // The request is consumed by being seen (kept in
                        // retry/used/); a missing file means another event
                        // already took it.
                        if !crate::commands::retry::take(p) {
                            continue;
                        }
                    }
                    let _ = tx.send(e);
                }
            }
        })
        .context("starting the file watcher")?;
        let mut w = Watches {
            watcher,
            paths,
            watched: BTreeMap::new(),
        };
        let state = w.paths.state.clone();
        for (dir, mode) in [
            (state.clone(), RecursiveMode::NonRecursive),
            (state.join("confirm"), RecursiveMode::NonRecursive),
            (state.join("retry"), RecursiveMode::NonRecursive),
        ] {
            w.add(&dir, mode)?;
        }
        if let Some(git) = w.paths.git.clone() {
            w.add(&git, RecursiveMode::NonRecursive)?;
            w.add(&git.join("refs"), RecursiveMode::Recursive)?;
        }
        w.refresh()?;
        Ok(w)
    }

    fn add(&mut self, dir: &Path, mode: RecursiveMode) -> Result<()> {
        self.watcher
            .watch(dir, mode)
            .with_context(|| format!("watching {}", dir.display()))
    }

    /// Watch `dir`, again when it is watched already. A watch follows an
    /// inode, and the inode numbers of a removed directory and of one
    /// created at once at the same path are often equal, so identity alone
    /// cannot tell a recreated directory: adding the watch again is cheap
    /// and harmless for the same directory (the watcher merges it) and arms
    /// the new one. A directory whose identity did change (the desired dir
    /// replaced by a rename) loses its old watch first, which would
    /// otherwise report on a directory that is no longer the desired state.
    fn arm(&mut self, dir: &Path, mode: RecursiveMode) -> Result<()> {
        let Some(id) = identity(dir) else {
            // Gone since it was listed: nothing to watch; its parent's
            // watch reports it if it comes back.
            self.disarm(dir);
            return Ok(());
        };
        if self.watched.get(dir).is_some_and(|old| *old != id) {
            tracing::info!(dir = %dir.display(), "directory replaced: watching the new one");
            self.disarm(dir);
        }
        self.add(dir, mode)?;
        self.watched.insert(dir.to_path_buf(), id);
        Ok(())
    }

    fn disarm(&mut self, dir: &Path) {
        if self.watched.remove(dir).is_some() {
            // The kernel drops the watch of a removed directory by itself;
            // this only clears the watcher's own book.
            let _ = self.watcher.unwatch(dir);
        }
    }

    /// Watch the desired dir: its own entries, and every subdirectory but
    /// the state dir and the git dir recursively. Called before each load
    /// (a change of a top-level entry is seen by the desired dir's own
    /// watch and causes one), to pick up new top-level directories and to
    /// re-arm the watch of a directory that was removed and created again,
    /// or of the desired dir itself when it was replaced.
    pub fn refresh(&mut self) -> Result<()> {
        let desired = self.paths.desired.clone();
        if !self.state_inside() {
            // One recursive watch, which adds the subdirectories created
            // under it as they appear.
            return self.arm(&desired, RecursiveMode::Recursive);
        }
        self.arm(&desired, RecursiveMode::NonRecursive)?;
        let entries = std::fs::read_dir(&desired)
            .with_context(|| format!("listing {}", desired.display()))?;
        let mut present = BTreeSet::new();
        for entry in entries.flatten() {
            let p = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let skip = self.paths.state.starts_with(&p)
                || self.paths.git.as_ref().is_some_and(|g| g.starts_with(&p));
            if is_dir && !skip {
                self.arm(&p, RecursiveMode::Recursive)?;
                present.insert(p);
            }
        }
        // Directories that went away: forget them, so that one created
        // again under the same name is watched anew.
        let gone: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|p| **p != desired && !present.contains(*p))
            .cloned()
            .collect();
        for p in gone {
            self.disarm(&p);
        }
        Ok(())
    }

    fn state_inside(&self) -> bool {
        self.paths.state.starts_with(&self.paths.desired)
    }
}

/// SIGINT and SIGTERM become `Shutdown`, SIGHUP `Reload`. A second SIGINT
/// or SIGTERM exits at once: the operator insists, and the runs left open
/// are closed as `Interrupted` at the next start.
pub fn signals(tx: UnboundedSender<Event>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        let mut stopping = false;
        loop {
            let ev = tokio::select! {
                _ = int.recv() => Event::Shutdown,
                _ = term.recv() => Event::Shutdown,
                _ = hup.recv() => Event::Reload,
            };
            if ev == Event::Shutdown {
                if stopping {
                    tracing::warn!(
                        "second stop signal: exiting now; unfinished runs are closed as Interrupted at the next start"
                    );
                    std::process::exit(1);
                }
                stopping = true;
            }
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths {
            desired: "/d".into(),
            state: "/d/.tend".into(),
            git: Some("/d/.git".into()),
        }
    }

    #[test]
    fn classify_paths() {
        let p = paths();
        let c = |s: &str| p.classify(Path::new(s));
        assert_eq!(c("/d/hosts/web.yaml"), Some(Event::DesiredChanged));
        assert_eq!(c("/d/inventory.yaml"), Some(Event::DesiredChanged));
        assert_eq!(c("/d/hosts/.web.yaml.swp"), None);
        // The state dir never counts as a desired-state change.
        assert_eq!(c("/d/.tend/status/web.json"), None);
        assert_eq!(c("/d/.tend/runs/r-1/result.json"), None);
        assert_eq!(c("/d/.tend/tend.db-wal"), None);
        assert_eq!(c("/d/.tend/KILL"), Some(Event::KillChanged(false)));
        assert_eq!(c("/d/.tend/confirm/op.yaml"), Some(Event::TokenAppeared));
        assert_eq!(c("/d/.tend/confirm/op.yaml.tmp"), None);
        assert_eq!(c("/d/.tend/confirm/used/x.yaml"), None);
        assert_eq!(
            c("/d/.tend/retry/web"),
            Some(Event::RetryRequested("web".into()))
        );
        assert_eq!(c("/d/.tend/retry/.web.tmp"), None);
        assert_eq!(c("/d/.git/refs/heads/main"), Some(Event::DesiredChanged));
        assert_eq!(c("/d/.git/HEAD"), Some(Event::DesiredChanged));
        assert_eq!(c("/d/.git/HEAD.lock"), None);
        assert_eq!(c("/d/.git/objects/ab/cdef"), None);
        assert_eq!(c("/d/.git/index"), None);
        assert_eq!(c("/elsewhere/x"), None);
    }
}
