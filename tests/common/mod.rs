//! Helpers for the CLI tests: a desired-state fixture in its own temp dir, a
//! way to run the real `tend` binary on it, and the snapshot filters.
//!
//! Every fixture lives in a fresh temp dir that holds both the desired-state
//! dir (`<tmp>/desired-state`) and the paths its `transport: local` hosts
//! manage (`<tmp>/root/...`), so tests never share a path and run in parallel.

#![allow(dead_code)] // Each helper is used by some tests, not necessarily all.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

/// The repository's own checkout (for the shipped example and the schema).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(out: Output) -> Self {
        Run {
            // A signal (a panic that aborts, a crash) has no code: -1 fails
            // every exit-code assertion.
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
        }
    }

    /// Stdout as a JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self))
    }

    /// Assert the exit code, showing everything the binary said when it is wrong.
    #[track_caller]
    pub fn code(&self, expected: i32) -> &Self {
        assert_eq!(self.code, expected, "unexpected exit code:\n{self}");
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked:\n{self}"
        );
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code: {}\n--- stdout\n{}--- stderr\n{}---",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The real binary, with none of the environment that changes what it does.
/// A test that wants `TEND_DISPATCH` sets it on the returned command.
pub fn tend_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tend"));
    cmd.env_remove("TEND_DISPATCH")
        .env_remove("TEND_LOG")
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "0");
    cmd
}

pub fn run_command(mut cmd: Command) -> Run {
    let out = cmd.output().expect("running the tend binary");
    Run::from_output(out)
}

/// A desired-state dir and a managed root in one temp dir.
pub struct Fixture {
    tmp: TempDir,
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    /// An empty fixture: `<tmp>/desired-state/` and `<tmp>/root/` exist, and
    /// nothing else.
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("tend-cli-")
            .tempdir()
            .expect("temp dir");
        let fx = Fixture { tmp };
        fs::create_dir(fx.dir()).unwrap();
        fs::create_dir(fx.root()).unwrap();
        fx
    }

    /// Two `transport: local` hosts, `a` and `b`, each with one file under the
    /// root (`<root>/a.txt`, `<root>/b.txt`); no tend.yaml.
    pub fn two_hosts() -> Self {
        let fx = Self::new();
        fx.write(
            "inventory.yaml",
            "hosts:\n  - name: a\n    transport: local\n  - name: b\n    transport: local\n",
        );
        fx.write(
            "hosts/a.yaml",
            "resources:\n  - kind: file\n    path: {root}/a.txt\n    content: \"a\\n\"\n",
        );
        fx.write(
            "hosts/b.yaml",
            "resources:\n  - kind: file\n    path: {root}/b.txt\n    content: \"b\\n\"\n",
        );
        fx
    }

    /// A copy of the shipped example, retargeted from /tmp/tend-demo to
    /// `<root>/demo` (its state dir, if any, is not copied).
    pub fn example() -> Self {
        let fx = Self::new();
        let src = repo().join("desired-state");
        copy_tree(&src, &fx.dir(), &|p| {
            p.file_name() == Some(OsStr::new(".tend"))
        });
        let demo = fx.root().join("demo");
        for entry in fs::read_dir(fx.dir().join("hosts")).unwrap() {
            let path = entry.unwrap().path();
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.contains("/tmp/tend-demo"), "the example moved");
            fs::write(
                &path,
                text.replace("/tmp/tend-demo", demo.to_str().unwrap()),
            )
            .unwrap();
        }
        fx
    }

    /// The temp dir itself (what the path filter replaces).
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// The desired-state dir, passed as `--dir`.
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("desired-state")
    }

    /// Where the fixture's hosts manage files.
    pub fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    /// The default state dir (`state_dir: .tend` relative to the desired state).
    pub fn state(&self) -> PathBuf {
        self.dir().join(".tend")
    }

    /// `{root}` in `text` replaced by the managed root.
    pub fn expand(&self, text: &str) -> String {
        text.replace("{root}", self.root().to_str().unwrap())
    }

    /// Write a file of the desired-state dir (parents created); `{root}` in
    /// the text becomes the managed root.
    pub fn write(&self, rel: &str, text: &str) {
        self.write_bytes(rel, self.expand(text).as_bytes());
    }

    pub fn write_bytes(&self, rel: &str, bytes: &[u8]) {
        let path = self.dir().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }

    /// `tend` with `--dir <desired-state>` after the arguments (global flags
    /// are accepted after the subcommand), run in the temp dir.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = tend_command();
        // The `transport: local` host's lock and revision record (SPEC 8.7)
        // in this test's own dir: tests run in parallel on one machine.
        cmd.env("TEND_LOCK_DIR", self.tmp().join("host-lock"));
        // Connection guards: never a timer of this machine's systemd.
        cmd.env("TEND_GUARD_TIMER", "process");
        cmd.current_dir(self.tmp())
            .args(args)
            .arg("--dir")
            .arg(self.dir());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        run_command(self.cmd(args))
    }

    /// Run with `TEND_DISPATCH` set.
    pub fn run_env(&self, dispatch: &str, args: &[&str]) -> Run {
        let mut cmd = self.cmd(args);
        cmd.env("TEND_DISPATCH", dispatch);
        run_command(cmd)
    }

    /// The snapshot filters for this fixture: its temp dir, run ids,
    /// timestamps, sha256 hex and git revisions.
    pub fn filters(&self) -> Vec<(String, String)> {
        let mut f = vec![(regex_escape(self.tmp().to_str().unwrap()), "[TMP]".into())];
        f.extend(common_filters());
        f
    }

    /// The latest status of a host.
    pub fn status(&self, host: &str) -> Value {
        read_json(&self.state().join("status").join(format!("{host}.json")))
    }

    /// A run's `result.json`.
    pub fn result(&self, run_id: &str) -> Value {
        read_json(&self.state().join("runs").join(run_id).join("result.json"))
    }
}

pub fn common_filters() -> Vec<(String, String)> {
    [
        (r"r-\d{8}T\d{6}Z-[a-z0-9]{4}", "[RUN_ID]"),
        (
            r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z",
            "[TIMESTAMP]",
        ),
        (r"\b[0-9a-f]{64}\b", "[SHA256]"),
        (r"sealed:[0-9a-f]{24}\b", "sealed:[SEALED]"),
        (r"\b[0-9a-f]{40}(-dirty-[0-9a-f]{12})?\b", "[GIT_REVISION]"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

/// Escape every regex metacharacter of a literal.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Permission bits of a path (not following a symlink).
pub fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every path under `dir`, relative and sorted (empty if it does not exist).
pub fn list_tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn copy_tree(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if skip(&path) {
            continue;
        }
        let to = dst.join(entry.file_name());
        let ft = entry.file_type().unwrap();
        if ft.is_dir() {
            copy_tree(&path, &to, skip);
        } else if ft.is_file() {
            fs::copy(&path, &to).unwrap();
        }
    }
}

/// Run id format: `r-YYYYMMDDTHHMMSSZ-` and 4 lowercase alphanumerics.
pub fn is_run_id(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 23
        && s.starts_with("r-")
        && digits(2..10)
        && b[10] == b'T'
        && digits(11..17)
        && b[17] == b'Z'
        && b[18] == b'-'
        && b[19..]
            .iter()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
}

/// An RFC 3339 timestamp in UTC.
#[track_caller]
pub fn assert_rfc3339(v: &Value, what: &str) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    humantime::parse_rfc3339(s)
        .unwrap_or_else(|e| panic!("{what} = {s:?} is not RFC 3339 UTC: {e}"));
}

/// Compare the key sets of `actual` with `shape` recursively: every object
/// must have exactly the keys of its shape. Arrays in a shape hold one
/// element, the shape of every item. A `null` in the shape is a leaf. A
/// `null` in the document where the shape has an object is allowed (an
/// optional document, such as `confirmation`).
#[track_caller]
pub fn assert_keys(actual: &Value, shape: &Value, at: &str) {
    match (shape, actual) {
        (Value::Object(_), Value::Null) => {}
        (Value::Object(s), Value::Object(a)) => {
            let want: std::collections::BTreeSet<_> = s.keys().collect();
            let have: std::collections::BTreeSet<_> = a.keys().collect();
            assert_eq!(have, want, "keys of {at}");
            for (k, sub) in s {
                assert_keys(&a[k], sub, &format!("{at}.{k}"));
            }
        }
        (Value::Object(_), other) => panic!("{at} should be an object, found {other}"),
        (Value::Array(s), Value::Array(a)) => {
            if let Some(item) = s.first() {
                for (i, v) in a.iter().enumerate() {
                    assert_keys(v, item, &format!("{at}[{i}]"));
                }
            }
        }
        (Value::Array(_), other) => panic!("{at} should be an array, found {other}"),
        _ => {}
    }
}
