//! What tend records: the SQLite history (`db`), and the files of the state
//! directory (SPEC.md section 5) that people and scripts read.
//!
//! Invariant: this is the only code that knows SQL or the state dir layout.
//! Every file is written atomically (`fsutil`); every error names the file.
//! It decides nothing: the documents it writes come from `core::report`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::core::report::{FleetStatus, HostStatus, RunResult};

pub mod db;
pub mod fsutil;
pub mod retention;
pub mod trust;

pub use db::Db;
pub use fsutil::{write_atomic, write_json_atomic};
pub use trust::Confirmers;

/// Everything that can go wrong recording state. Each message names the file
/// (or database) and says what was being done to it; the cause is in `source`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to {doing} {}", path.display())]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to parse {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to encode JSON for {}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("refusing {what} {name:?} as a file name under {}", path.display())]
    UnsafeName {
        what: &'static str,
        name: String,
        path: PathBuf,
    },
    #[error("database {}: failed to {doing}", path.display())]
    Db {
        doing: String,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("refusing {}: {why}", path.display())]
    Untrusted { path: PathBuf, why: String },
    #[error("confirmers: {0}")]
    Confirmers(String),
    #[error(
        "database {} has schema version {found}, but this tend uses version {supported}{}",
        path.display(),
        if found > supported { "; use a newer tend" } else { "; run `tend apply` to migrate it" }
    )]
    SchemaVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "database {} stays in journal mode {mode:?}, not wal; put the state dir on a local file system",
        path.display()
    )]
    NotWal { path: PathBuf, mode: String },
    #[error(
        "database {}: failed to finish run {run_id}: it was never begun or is already finished",
        path.display()
    )]
    RunNotOpen { run_id: String, path: PathBuf },
}

impl StoreError {
    pub(crate) fn io(doing: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            doing,
            path: path.to_owned(),
            source,
        }
    }
}

/// File name of the SQLite database in the state dir.
const DB_FILE: &str = "tend.db";
/// The kill switch: while this file exists nothing is dispatched.
const KILL_FILE: &str = "KILL";
const LOCK_FILE: &str = "lock";
const FLEET_FILE: &str = "fleet.json";
/// Longest made-safe resource id in a step log name, so that the file name
/// stays far below the 255-byte limit of common file systems.
const SAFE_ID_MAX: usize = 100;

/// The layout of a state directory (SPEC.md section 5). Path methods only
/// compute paths; the writers create what they need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
    /// Who besides tend's own user may confirm (SPEC 8.4); decides the
    /// modes the state dir and `confirm/` are created with and which token
    /// files are trusted.
    confirmers: Confirmers,
}

/// 32 bytes from the kernel's random source.
pub fn random_key() -> Option<[u8; 32]> {
    use std::io::Read;
    let mut k = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut k))
        .ok()?;
    Some(k)
}

impl StateDir {
    /// A state dir that only tend's own user may confirm in.
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir {
            root: root.into(),
            confirmers: Confirmers::default(),
        }
    }

    /// A state dir with `confirmers` from tend.yaml, resolved against the
    /// user and group databases of this machine. An unknown name is an
    /// error: silently dropping it would lock that confirmer out, and
    /// guessing would let someone else in.
    pub fn with_confirmers(
        root: impl Into<PathBuf>,
        names: &[String],
    ) -> Result<StateDir, StoreError> {
        Ok(StateDir {
            root: root.into(),
            confirmers: Confirmers::resolve(names)?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn confirmers(&self) -> &Confirmers {
        &self.confirmers
    }

    /// Create the state dir and its fixed subdirectories. The state dir,
    /// `confirm/` and `confirm/used/` get their modes set explicitly (not
    /// left to the umask): 0700 without a confirmers group; with one, the
    /// state dir 0750 and `confirm/` 1770 with that group, so its members
    /// can drop tokens but not remove each other's. Directories that exist
    /// are brought to these modes too, so a state dir made by an older tend
    /// or a permissive umask is tightened.
    pub fn ensure(&self) -> Result<(), StoreError> {
        let c = &self.confirmers;
        trust::ensure_private_dir(&self.root, c.root_mode(), c.gid(), true)?;
        trust::ensure_private_dir(&self.confirm_dir(), c.confirm_mode(), c.gid(), false)?;
        trust::ensure_private_dir(&self.confirm_used_dir(), 0o700, None, false)?;
        for dir in [
            self.root.join("status"),
            self.root.join("runs"),
            self.retry_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        }
        if let Some(key) = self.seal_key() {
            crate::core::set_seal_key(key);
        }
        Ok(())
    }

    /// Open the lock file without following a symlink: a `lock` that points
    /// at another file must never be truncated through. Created 0600.
    pub fn open_lock(&self) -> Result<fs::File, StoreError> {
        trust::open_lock(&self.lock_path())
    }

    /// The key that seals sensitive values (SPEC 8.6) in this state dir:
    /// `seal.key`, 32 random bytes, mode 0600, made on first use when the
    /// state dir exists. None when it does not exist yet or the key cannot be
    /// read or made (sealing then uses a key of this process alone).
    pub fn seal_key(&self) -> Option<[u8; 32]> {
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.root.join("seal.key");
        let read = |path: &Path| -> Option<[u8; 32]> {
            let mut f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .ok()?;
            let mut k = [0u8; 32];
            f.read_exact(&mut k).ok()?;
            Some(k)
        };
        if let Some(k) = read(&path) {
            return Some(k);
        }
        if !self.root.is_dir() {
            return None;
        }
        let k = random_key()?;
        // Written whole under a temporary name, then linked into place:
        // two processes racing both end up reading the one that won.
        let tmp = self.root.join(format!(".seal.key.{}", std::process::id()));
        let made = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&k).and_then(|_| f.sync_all()));
        let linked = made.and_then(|_| fs::hard_link(&tmp, &path));
        let _ = fs::remove_file(&tmp);
        if let Err(e) = linked
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the seal key");
            return None;
        }
        read(&path)
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join(DB_FILE)
    }

    pub fn lock_path(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }

    pub fn kill_path(&self) -> PathBuf {
        self.root.join(KILL_FILE)
    }

    /// Where operators drop token files.
    pub fn confirm_dir(&self) -> PathBuf {
        self.root.join("confirm")
    }

    /// Where used tokens are moved.
    pub fn confirm_used_dir(&self) -> PathBuf {
        self.confirm_dir().join("used")
    }

    pub fn status_path(&self, host: &str) -> PathBuf {
        self.root.join("status").join(format!("{host}.json"))
    }

    pub fn fleet_path(&self) -> PathBuf {
        self.root.join("status").join(FLEET_FILE)
    }

    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.root.join("runs").join(run_id)
    }

    /// `runs/<run-id>/hosts/<host>/<step-index>-<safe-resource-id>.log`,
    /// relative to the state dir; this is what `StepOutcome.log` holds.
    pub fn step_log_rel(
        &self,
        run_id: &str,
        host: &str,
        step_index: usize,
        resource_id: &str,
    ) -> String {
        format!(
            "runs/{run_id}/hosts/{host}/{step_index}-{}.log",
            safe_file_part(resource_id)
        )
    }

    pub fn step_log_path(
        &self,
        run_id: &str,
        host: &str,
        step_index: usize,
        resource_id: &str,
    ) -> PathBuf {
        self.root
            .join(self.step_log_rel(run_id, host, step_index, resource_id))
    }

    pub fn write_status(&self, status: &HostStatus) -> Result<(), StoreError> {
        self.check_status_name(&status.host)?;
        write_json_atomic(&self.status_path(&status.host), status)
    }

    /// The status of `host`, or `None` when none was written yet. A file that
    /// does not parse is an error naming it, not `None`: silently starting
    /// over would hide a problem the operator should see.
    pub fn read_status(&self, host: &str) -> Result<Option<HostStatus>, StoreError> {
        self.check_status_name(host)?;
        read_json(&self.status_path(host))
    }

    /// The hosts that have a status file.
    pub fn status_hosts(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("status");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("list", &dir, e)),
        };
        let mut hosts = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(host) = name.strip_suffix(".json")
                && host != "fleet"
            {
                hosts.push(host.to_string());
            }
        }
        hosts.sort();
        Ok(hosts)
    }

    /// `pending/<host>.txt`: the host's pending plan as `tend plan` prints
    /// it (no colour, content diffs included), written by the pass that
    /// left changes pending and removed by the one that left none.
    pub fn pending_path(&self, host: &str) -> PathBuf {
        self.root.join("pending").join(format!("{host}.txt"))
    }

    /// Write or (None) remove the host's pending plan.
    pub fn write_pending(&self, host: &str, text: Option<&str>) -> Result<(), StoreError> {
        self.check_name("host", host)?;
        let path = self.pending_path(host);
        match text {
            Some(t) => write_atomic(&path, t.as_bytes()),
            None => match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StoreError::io("remove", &path, e)),
            },
        }
    }

    /// The host's pending plan, or None when nothing is pending.
    pub fn read_pending(&self, host: &str) -> Result<Option<String>, StoreError> {
        self.check_name("host", host)?;
        Ok(read_bytes(&self.pending_path(host))?.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// A step log named as `StepOutcome.log` names it, relative to the
    /// state dir: `runs/<run-id>/hosts/<host>/<file>.log`, at most `max`
    /// bytes of it (and whether there was more). The caller checks the
    /// parts; this refuses any that could leave the run's folder.
    pub fn read_step_log(
        &self,
        run_id: &str,
        host: &str,
        file: &str,
        max: usize,
    ) -> Result<Option<(Vec<u8>, bool)>, StoreError> {
        self.check_name("run id", run_id)?;
        self.check_name("host", host)?;
        self.check_name("log", file)?;
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.run_dir(run_id).join("hosts").join(host).join(file);
        // The last part is not followed if it is a symlink, nor read if it
        // is not a regular file (a FIFO would block the reader).
        let f = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        let meta = f.metadata().map_err(|e| StoreError::io("stat", &path, e))?;
        if !meta.is_file() {
            return Ok(None);
        }
        let mut buf = Vec::new();
        f.take(max as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| StoreError::io("read", &path, e))?;
        let more = buf.len() > max;
        buf.truncate(max);
        Ok(Some((buf, more)))
    }

    /// Where `tend retry HOST` leaves its requests for the controller.
    pub fn retry_dir(&self) -> PathBuf {
        self.root.join("retry")
    }

    pub fn write_fleet(&self, fleet: &FleetStatus) -> Result<(), StoreError> {
        write_json_atomic(&self.fleet_path(), fleet)
    }

    pub fn read_fleet(&self) -> Result<Option<FleetStatus>, StoreError> {
        read_json(&self.fleet_path())
    }

    /// Write `plan.json` (the bytes as given: the planner's byte-stable
    /// JSON), `timeline.jsonl` (one compact JSON value per line) and
    /// `result.json` into `runs/<run-id>/`. `result.json` goes last: a reader
    /// that finds it can rely on the other two being complete.
    pub fn write_run_artifacts(
        &self,
        run_id: &str,
        result: &RunResult,
        plan_json: &[u8],
        timeline: &[serde_json::Value],
    ) -> Result<(), StoreError> {
        self.check_name("run id", run_id)?;
        debug_assert_eq!(run_id, result.run_id, "artifacts filed under another run");
        let dir = self.run_dir(run_id);
        self.sync_step_logs(&dir)?;
        write_atomic(&dir.join("plan.json"), plan_json)?;

        write_timeline(&dir, timeline)?;
        write_json_atomic(&dir.join("result.json"), result)
    }

    /// Make the step logs of a run durable: one fsync of each
    /// `hosts/<host>/` directory and of `hosts/`, before `result.json`.
    fn sync_step_logs(&self, run_dir: &Path) -> Result<(), StoreError> {
        let hosts = run_dir.join("hosts");
        let entries = match fs::read_dir(&hosts) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("read directory", &hosts, e)),
        };
        for e in entries {
            let e = e.map_err(|e| StoreError::io("read directory", &hosts, e))?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                fsutil::sync_dir(&e.path())?;
            }
        }
        fsutil::sync_dir(&hosts)
    }

    /// Close the artifacts of a run cut short by a crash: its timeline (from
    /// the events recorded as it went) and its `result.json`. Its plan was
    /// never written and is not made up.
    pub fn write_interrupted_run(
        &self,
        result: &RunResult,
        timeline: &[serde_json::Value],
    ) -> Result<(), StoreError> {
        self.check_name("run id", &result.run_id)?;
        let dir = self.run_dir(&result.run_id);
        self.sync_step_logs(&dir)?;
        write_timeline(&dir, timeline)?;
        write_json_atomic(&dir.join("result.json"), result)
    }

    pub fn read_run_result(&self, run_id: &str) -> Result<Option<RunResult>, StoreError> {
        self.check_name("run id", run_id)?;
        read_json(&self.run_dir(run_id).join("result.json"))
    }

    /// `result.json` of a run as written (for `/api/runs`), or `None`.
    pub fn run_result_bytes(&self, run_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_name("run id", run_id)?;
        read_bytes(&self.run_dir(run_id).join("result.json"))
    }

    /// A host's status document as written (for `/api/hosts/<host>`), or
    /// `None`.
    pub fn status_bytes(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_status_name(host)?;
        read_bytes(&self.status_path(host))
    }

    /// `fleet.json` as written (for `/api/fleet`), or `None`.
    pub fn fleet_bytes(&self) -> Result<Option<Vec<u8>>, StoreError> {
        read_bytes(&self.fleet_path())
    }

    /// Write the stdout and stderr of one step; returns the log's path
    /// relative to the state dir, for `StepOutcome.log`.
    pub fn write_step_log(
        &self,
        run_id: &str,
        host: &str,
        step_index: usize,
        resource_id: &str,
        bytes: &[u8],
    ) -> Result<String, StoreError> {
        self.check_name("run id", run_id)?;
        self.check_name("host", host)?;
        let rel = self.step_log_rel(run_id, host, step_index, resource_id);
        // One fsync per log; the directory's once, when the run's artifacts
        // are written ([`StateDir::write_run_artifacts`]).
        fsutil::write_atomic_deferred(&self.root.join(&rel), bytes)?;
        Ok(rel)
    }

    /// Whether the kill switch is engaged. Fails closed: anything at the
    /// path (even a dangling symlink), or a path that cannot be checked,
    /// counts as engaged, because wrongly stopping is cheap and wrongly
    /// dispatching is not.
    pub fn kill_switch_engaged(&self) -> bool {
        match fs::symlink_metadata(self.kill_path()) {
            Ok(_) => true,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        }
    }

    /// Where `tend suspend HOST` leaves a host's hold (SPEC 8.6).
    pub fn suspend_dir(&self) -> PathBuf {
        self.root.join("suspend")
    }

    /// Whether a host is suspended, and why (the file's first line). Fails
    /// closed like the kill switch: anything at the path, readable or not,
    /// suspends the host.
    pub fn suspended(&self, host: &str) -> Option<String> {
        if host.is_empty() || host.contains('/') || host.starts_with('.') {
            return None;
        }
        let path = self.suspend_dir().join(host);
        match fs::symlink_metadata(&path) {
            Ok(_) => Some(
                fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| {
                        serde_json::from_str::<serde_json::Value>(&t)
                            .ok()
                            .and_then(|v| v["reason"].as_str().map(str::to_string))
                    })
                    .unwrap_or_else(|| "no reason could be read".into()),
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(_) => Some("its suspend file cannot be checked".into()),
        }
    }

    /// Host names and run ids become path components; one holding a `/` or
    /// being `..` would write outside its place. Validation upstream should
    /// make this unreachable; this is the last line.
    fn check_name(&self, what: &'static str, name: &str) -> Result<(), StoreError> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(StoreError::UnsafeName {
                what,
                name: name.to_owned(),
                path: self.root.clone(),
            });
        }
        Ok(())
    }

    /// A host named `fleet` would have `status/fleet.json`, the fleet
    /// summary, as its status file; the two would overwrite each other.
    fn check_status_name(&self, host: &str) -> Result<(), StoreError> {
        self.check_name("host", host)?;
        if format!("{host}.json") == FLEET_FILE {
            return Err(StoreError::UnsafeName {
                what: "host",
                name: host.to_owned(),
                path: self.root.clone(),
            });
        }
        Ok(())
    }
}

fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read", path, e)),
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Parse {
            path: path.to_owned(),
            source,
        })
}

/// A resource id as a file name part: every byte outside `[A-Za-z0-9._-]`
/// becomes `_`, at most `SAFE_ID_MAX` bytes, and never `.` or `..` (nor
/// empty). Different ids may map to one name; the step index in front keeps
/// log names unique.
/// `timeline.jsonl`: one compact JSON value per line.
fn write_timeline(dir: &Path, timeline: &[serde_json::Value]) -> Result<(), StoreError> {
    let path = dir.join("timeline.jsonl");
    let mut lines = Vec::new();
    for event in timeline {
        // A `Value` always encodes; the error arm is for form's sake.
        serde_json::to_writer(&mut lines, event).map_err(|source| StoreError::Encode {
            path: path.clone(),
            source,
        })?;
        lines.push(b'\n');
    }
    write_atomic(&path, &lines)
}

pub fn safe_file_part(id: &str) -> String {
    let mut s: String = id
        .bytes()
        .take(SAFE_ID_MAX)
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                b as char
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        s = s.replace('.', "_");
        if s.is_empty() {
            s.push('_');
        }
    }
    s
}

/// Run blocking work (files, SQLite, `git`) from async code without
/// stalling the runtime: on a multi-threaded runtime the worker hands its
/// other tasks to the rest first (`block_in_place`); elsewhere (a
/// current-thread test runtime, no runtime) it runs inline.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::core::report::fixtures;

    const T0: &str = "2026-11-23T12:00:00Z";
    const RUN: &str = "r-20261123T120000Z-ab12";

    fn state() -> (tempfile::TempDir, StateDir) {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path().join(".tend"));
        (d, s)
    }

    fn result() -> RunResult {
        fixtures::run_result(RUN, &["web-1"])
    }

    #[test]
    fn layout_matches_the_spec() {
        let s = StateDir::new("/st");
        assert_eq!(s.db_path(), Path::new("/st/tend.db"));
        assert_eq!(s.lock_path(), Path::new("/st/lock"));
        assert_eq!(s.kill_path(), Path::new("/st/KILL"));
        assert_eq!(s.confirm_dir(), Path::new("/st/confirm"));
        assert_eq!(s.confirm_used_dir(), Path::new("/st/confirm/used"));
        assert_eq!(s.status_path("web-1"), Path::new("/st/status/web-1.json"));
        assert_eq!(s.fleet_path(), Path::new("/st/status/fleet.json"));
        assert_eq!(s.run_dir(RUN), Path::new("/st/runs").join(RUN));
        assert_eq!(
            s.step_log_rel(RUN, "web-1", 3, "file:/etc/app/app.conf"),
            format!("runs/{RUN}/hosts/web-1/3-file__etc_app_app.conf.log")
        );
        assert_eq!(
            s.step_log_path(RUN, "web-1", 3, "file:/etc/app/app.conf"),
            Path::new("/st").join(format!(
                "runs/{RUN}/hosts/web-1/3-file__etc_app_app.conf.log"
            ))
        );
    }

    #[test]
    fn ensure_creates_the_fixed_directories_and_is_idempotent() {
        let (_d, s) = state();
        s.ensure().unwrap();
        s.ensure().unwrap();
        for sub in ["status", "runs", "confirm", "confirm/used"] {
            assert!(s.root().join(sub).is_dir(), "{sub}");
        }
    }

    #[test]
    fn safe_file_part_maps_bytes_caps_length_and_avoids_dot_names() {
        assert_eq!(safe_file_part("package:curl"), "package_curl");
        assert_eq!(safe_file_part("a.b_c-D9"), "a.b_c-D9");
        // Each byte of a multi-byte character becomes one `_`.
        assert_eq!(safe_file_part("é"), "__");
        assert_eq!(safe_file_part("a\nb c"), "a_b_c");
        assert_eq!(safe_file_part("."), "_");
        assert_eq!(safe_file_part(".."), "__");
        assert_eq!(safe_file_part(""), "_");
        assert_eq!(safe_file_part("..."), "...");
        let long = "x".repeat(300);
        assert_eq!(safe_file_part(&long).len(), SAFE_ID_MAX);
        let long_utf8 = "é".repeat(300);
        assert_eq!(safe_file_part(&long_utf8), "_".repeat(SAFE_ID_MAX));
    }

    #[test]
    fn status_round_trips_and_a_missing_one_is_none() {
        let (_d, s) = state();
        assert_eq!(s.read_status("web-1").unwrap(), None);
        let st = HostStatus::new("web-1", T0);
        s.write_status(&st).unwrap();
        assert_eq!(s.read_status("web-1").unwrap(), Some(st));
        let text = fs::read_to_string(s.status_path("web-1")).unwrap();
        assert!(text.ends_with("}\n"), "{text}");
    }

    #[test]
    fn a_corrupt_status_is_an_error_naming_the_file() {
        let (_d, s) = state();
        s.ensure().unwrap();
        fs::write(s.status_path("web-1"), b"{\"schema_version\": 1,").unwrap();
        let err = s.read_status("web-1").unwrap_err();
        assert!(matches!(err, StoreError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains("status/web-1.json"), "{err}");
    }

    #[test]
    fn names_that_would_escape_are_refused() {
        let (_d, s) = state();
        for bad in ["", ".", "..", "../x", "a/b"] {
            let st = HostStatus::new(bad, T0);
            assert!(
                matches!(s.write_status(&st), Err(StoreError::UnsafeName { .. })),
                "{bad:?}"
            );
            assert!(s.write_step_log(RUN, bad, 0, "x", b"").is_err(), "{bad:?}");
            assert!(
                s.write_step_log(bad, "web-1", 0, "x", b"").is_err(),
                "{bad:?}"
            );
        }
        assert!(matches!(
            s.write_status(&HostStatus::new("fleet", T0)),
            Err(StoreError::UnsafeName { .. })
        ));
        assert!(!s.root().exists(), "nothing was written");
    }

    #[test]
    fn fleet_round_trips() {
        let (_d, s) = state();
        assert_eq!(s.read_fleet().unwrap(), None);
        let st = HostStatus::new("web-1", T0);
        let fleet = FleetStatus::from_statuses(T0, [&st]);
        s.write_fleet(&fleet).unwrap();
        assert_eq!(s.read_fleet().unwrap(), Some(fleet));
        assert!(s.fleet_path().ends_with("status/fleet.json"));
    }

    #[test]
    fn run_artifacts_are_written_in_their_formats() {
        let (_d, s) = state();
        let r = result();
        let plan = b"{\"hosts\":[]}\n";
        let timeline = [
            json!({"at": T0, "kind": "probe_started"}),
            json!({"at": T0, "kind": "run_finished", "detail": {"n": 1}}),
        ];
        s.write_run_artifacts(RUN, &r, plan, &timeline).unwrap();
        let dir = s.run_dir(RUN);
        assert_eq!(fs::read(dir.join("plan.json")).unwrap(), plan);
        assert_eq!(
            fs::read_to_string(dir.join("timeline.jsonl")).unwrap(),
            "{\"at\":\"2026-11-23T12:00:00Z\",\"kind\":\"probe_started\"}\n\
             {\"at\":\"2026-11-23T12:00:00Z\",\"detail\":{\"n\":1},\"kind\":\"run_finished\"}\n"
        );
        assert_eq!(s.read_run_result(RUN).unwrap(), Some(r));
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["plan.json", "result.json", "timeline.jsonl"]);
    }

    #[test]
    fn an_empty_timeline_is_an_empty_file() {
        let (_d, s) = state();
        s.write_run_artifacts(RUN, &result(), b"{}", &[]).unwrap();
        assert_eq!(
            fs::read(s.run_dir(RUN).join("timeline.jsonl")).unwrap(),
            b""
        );
    }

    #[test]
    fn step_logs_go_where_the_spec_says_and_return_the_relative_path() {
        let (_d, s) = state();
        let rel = s
            .write_step_log(RUN, "web-1", 2, "service:nginx", b"out\0err\n")
            .unwrap();
        assert_eq!(rel, format!("runs/{RUN}/hosts/web-1/2-service_nginx.log"));
        assert_eq!(fs::read(s.root().join(&rel)).unwrap(), b"out\0err\n");
        assert_eq!(
            s.step_log_path(RUN, "web-1", 2, "service:nginx"),
            s.root().join(&rel)
        );
    }

    #[test]
    fn kill_switch_is_any_entry_named_kill() {
        let (_d, s) = state();
        assert!(!s.kill_switch_engaged(), "no state dir at all");
        s.ensure().unwrap();
        assert!(!s.kill_switch_engaged());
        fs::write(s.kill_path(), b"").unwrap();
        assert!(s.kill_switch_engaged());
        fs::remove_file(s.kill_path()).unwrap();
        std::os::unix::fs::symlink("/nonexistent/target", s.kill_path()).unwrap();
        assert!(s.kill_switch_engaged(), "a dangling symlink counts");
    }
}
