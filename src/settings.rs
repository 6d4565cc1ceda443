//! Arguments, environment and tend.yaml resolved once into `Settings`.
//!
//! Precedence for the dispatch mode: the KILL file beats everything (checked
//! at dispatch time, not here), then `--dispatch`, then `TEND_DISPATCH`, then
//! `dispatch:` in tend.yaml, then `off`.
//!
//! Invariant: the only place that reads environment variables.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::cli::{DispatchArg, Global};
use crate::core::spec::{DispatchMode, TendConfig};
use crate::store::StateDir;

pub const DISPATCH_ENV: &str = "TEND_DISPATCH";
/// Test hook, for the end-to-end tests of the controller only: every
/// controller pass of the host it names panics, to show that the daemon
/// records the failure and keeps serving every other host.
pub const TEST_PANIC_HOST_ENV: &str = "TEND_TEST_PANIC_HOST";

/// Where the dispatch mode came from, for the run record and for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeSource {
    Default,
    TendYaml,
    Env,
    Flag,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    /// `--state-dir` was given: commands printed for the operator repeat it.
    pub state_dir_given: bool,
    /// `--allow-older`: no revision fencing (SPEC 8.1).
    pub allow_older: bool,
    pub json: bool,
    /// Colour on stdout for people (`--color`, `NO_COLOR`, a terminal).
    pub paint: crate::output::Paint,
    pub config: TendConfig,
    pub dispatch: DispatchMode,
    pub dispatch_source: ModeSource,
    /// Who asked, for `operation_intent.requested_by`.
    pub requested_by: String,
    /// `TEND_TEST_PANIC_HOST`: a test hook, see `TEST_PANIC_HOST_ENV`.
    pub test_panic_host: Option<String>,
}

impl Settings {
    /// Resolve settings. `config` is tend.yaml as validated (defaults when it
    /// is absent or invalid; an invalid desired state never dispatches anyway).
    pub fn resolve(global: &Global, config: TendConfig, flag: Option<DispatchArg>) -> Result<Self> {
        let env = std::env::var(DISPATCH_ENV).ok();
        let (dispatch, dispatch_source) = resolve_mode(
            config.dispatch,
            config_has_dispatch(&config),
            env.as_deref(),
            flag,
        )?;
        let state_dir = match &global.state_dir {
            Some(s) => s.clone(),
            None => resolve_relative(&global.dir, &config.state_dir),
        };
        check_state_dir_placement(&global.dir, &state_dir)?;
        let requested_by = requested_by();
        Ok(Settings {
            dir: global.dir.clone(),
            state_dir,
            state_dir_given: global.state_dir.is_some(),
            allow_older: false,
            json: global.json,
            paint: crate::output::Paint::for_stdout(global.color),
            config,
            dispatch,
            dispatch_source,
            requested_by,
            test_panic_host: std::env::var(TEST_PANIC_HOST_ENV)
                .ok()
                .filter(|h| !h.is_empty()),
        })
    }

    /// The state dir, with `confirmers` resolved on this machine.
    pub fn state_dir(&self) -> Result<StateDir> {
        let sd = StateDir::with_confirmers(self.state_dir.clone(), &self.config.confirmers)?;
        if let Some(key) = sd.seal_key() {
            crate::core::set_seal_key(key);
        }
        Ok(sd)
    }

    /// A path from tend.yaml or the inventory, relative to the desired-state dir.
    pub fn desired_path(&self, p: &str) -> PathBuf {
        resolve_relative(&self.dir, p)
    }
}

/// A state dir inside `hosts/`, `groups/` or `files/` of the desired-state
/// dir would turn tend's own records into desired state (and change the
/// revision at every run). Checked on the paths as resolved, symlinks
/// included, so an absolute `state_dir`, `--state-dir` or a symlink cannot
/// slip past the lexical check of validation.
pub fn check_state_dir_placement(dir: &Path, state_dir: &Path) -> Result<()> {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Ok(());
    };
    let state = resolve_existing(state_dir);
    for sub in ["hosts", "groups", "files"] {
        let inside = resolve_existing(&dir.join(sub));
        if state.starts_with(&inside) {
            bail!(
                "state_dir {} lies inside {sub}/ of the desired-state directory, which holds desired state: put it elsewhere (e.g. `.tend`)",
                state_dir.display()
            );
        }
    }
    Ok(())
}

/// `p` with symlinks resolved as far as it exists; the missing rest is
/// appended as written (it holds no symlink yet).
fn resolve_existing(p: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = p.to_path_buf();
    loop {
        if let Ok(real) = std::fs::canonicalize(&cur) {
            return rest.iter().rev().fold(real, |acc: PathBuf, c| acc.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

fn config_has_dispatch(config: &TendConfig) -> bool {
    config.dispatch != DispatchMode::Off
}

/// Pure precedence: flag > env > tend.yaml > off. An unknown env value is an
/// error rather than a silent fallback: fail closed.
pub fn resolve_mode(
    file: DispatchMode,
    file_set: bool,
    env: Option<&str>,
    flag: Option<DispatchArg>,
) -> Result<(DispatchMode, ModeSource)> {
    if let Some(f) = flag {
        let m = match f {
            DispatchArg::Off => DispatchMode::Off,
            DispatchArg::Canary => DispatchMode::Canary,
            DispatchArg::Enforced => DispatchMode::Enforced,
        };
        return Ok((m, ModeSource::Flag));
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        return match DispatchMode::parse(e.trim()) {
            Some(m) => Ok((m, ModeSource::Env)),
            None => bail!("{DISPATCH_ENV}={e} is not a dispatch mode: use off, canary or enforced"),
        };
    }
    Ok((
        file,
        if file_set {
            ModeSource::TendYaml
        } else {
            ModeSource::Default
        },
    ))
}

/// `~/` expands to $HOME; relative paths are relative to `base`.
pub fn resolve_relative(base: &Path, p: &str) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Who runs this command: `SUDO_USER`, `USER` or `LOGNAME`, else `unknown`.
pub fn requested_by() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        use DispatchMode::*;
        let r = |file, env, flag| resolve_mode(file, file != Off, env, flag).unwrap().0;
        assert_eq!(r(Off, None, None), Off);
        assert_eq!(r(Enforced, None, None), Enforced);
        assert_eq!(r(Enforced, Some("off"), None), Off);
        assert_eq!(r(Off, Some("canary"), None), Canary);
        assert_eq!(
            r(Off, Some("canary"), Some(DispatchArg::Enforced)),
            Enforced
        );
        assert_eq!(r(Enforced, Some(""), None), Enforced);
        assert!(resolve_mode(Off, false, Some("yes"), None).is_err());
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            resolve_relative(Path::new("/d"), ".tend"),
            PathBuf::from("/d/.tend")
        );
        assert_eq!(
            resolve_relative(Path::new("/d"), "/abs"),
            PathBuf::from("/abs")
        );
    }
}
