//! End to end: the real daemon (`tend run`) when things go wrong inside it: a
//! pass that panics, a `git` that hangs while the desired state is loaded,
//! and a watched directory removed and created again.
//!
//! Hosts h54..h61 belong to this file (tests run in parallel).

#[path = "support/fleet.rs"]
mod support;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, Desired, code, fleet, git, text, wait_for};

/// Fast timings, but a resync of an hour: whatever the tests wait for must
/// come from the watch, a retry or the backoff, never from a resync.
const TEND_YAML: &str = "dispatch: enforced
probe_timeout: 5s
retries: 1
retry_backoff: 50ms
quiet_window: 200ms
max_defer: 1s
resync: 1h
crash_loop_threshold: 3
";

/// Generous limits: the machine may be busy with other test binaries.
const LIMIT: Duration = Duration::from_secs(60);

fn inventory(hosts: &[&str]) -> String {
    let f = fleet();
    let mut s = String::from("hosts:\n");
    for h in hosts {
        s.push_str(&f.inventory_entry(h));
    }
    s
}

/// A desired-state dir that is a git work tree (state dir ignored).
fn repo(hosts: &[(&str, &str)]) -> Desired {
    let names: Vec<&str> = hosts.iter().map(|(h, _)| *h).collect();
    let d = Desired::new(TEND_YAML, &inventory(&names), hosts);
    fs::write(d.dir().join(".gitignore"), ".tend/\n").unwrap();
    git(d.dir(), &["init", "-q", "-b", "main"]);
    git(d.dir(), &["add", "-A"]);
    git(d.dir(), &["commit", "-q", "-m", "initial desired state"]);
    d
}

fn file_body(path: &str, content: &str) -> String {
    format!(
        "resources:\n  - kind: directory\n    path: /srv/hard\n  - kind: file\n    path: {path}\n    content: {content:?}\n"
    )
}

fn status(d: &Desired, host: &str) -> Value {
    let path = d.state().join("status").join(format!("{host}.json"));
    fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn condition<'a>(s: &'a Value, kind: &str) -> &'a Value {
    s["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

fn wait_status(d: &Desired, daemon: &Daemon, host: &str, what: &str, f: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let s = status(d, host);
        if f(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {host}: {what}\nstatus: {s:#}\nlog:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `wait_for`, showing the daemon's log on timeout.
fn wait_log(daemon: &Daemon, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn running(s: &Value) -> bool {
    s["phase"] == "Running" && s["desired_revision"] == s["converged_revision"]
}

/// Every run's result.json of one host.
fn results_of(d: &Desired, host: &str) -> Vec<Value> {
    d.run_ids()
        .iter()
        .filter_map(|id| {
            fs::read(d.state().join("runs").join(id).join("result.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        })
        .filter(|r| r["operation_intent"]["target_hosts"] == serde_json::json!([host]))
        .collect()
}

#[test]
fn a_pass_that_panics_is_recorded_as_failed_and_the_other_hosts_are_served() {
    let f = fleet();
    for h in ["h54", "h55"] {
        f.sh(h, "rm -rf /srv/hard");
    }
    let d = repo(&[
        ("h54", &file_body("/srv/hard/conf", "one\n")),
        ("h55", &file_body("/srv/hard/conf", "one\n")),
    ]);
    // The test hook of `Settings`: every pass of h54 panics.
    let daemon = Daemon::start_with_env(&d, &[("TEND_TEST_PANIC_HOST", OsStr::new("h54"))]);
    wait_status(&d, &daemon, "h55", "Running", running);

    // The panic is a failed pass of h54, in its status...
    wait_status(&d, &daemon, "h54", "a failed pass in its status", |s| {
        condition(s, "Converged")["reason"] == "PassFailed"
    });
    let s = status(&d, "h54");
    let msg = condition(&s, "Converged")["message"].as_str().unwrap();
    assert!(
        msg.contains("the pass panicked: test hook TEND_TEST_PANIC_HOST"),
        "{s:#}"
    );
    // ...retried with backoff (1 s, 2 s) until it is a crash loop...
    wait_status(&d, &daemon, "h54", "Degraded after 3 panics", |s| {
        condition(s, "Degraded")["status"] == "True"
    });
    let failed = results_of(&d, "h54");
    assert!(failed.len() >= 3, "{failed:#?}");
    for r in &failed {
        let o = &r["host_outcomes"][0];
        assert_eq!(o["outcome"], "ExecutionFailed", "{r:#}");
        assert!(
            o["last_failure_message"]
                .as_str()
                .unwrap()
                .starts_with("the pass panicked: test hook"),
            "{r:#}"
        );
    }
    let last = status(&d, "h54")["last_run_id"].clone();
    assert!(
        results_of(&d, "h54").iter().any(|r| r["run_id"] == last),
        "the status names its last failed run: {last}"
    );
    // ...and in the SQLite history.
    let runs = d.tend(&["runs", "--json"]);
    assert_eq!(code(&runs), 0, "{}", text(&runs));
    let runs: Value = serde_json::from_slice(&runs.stdout).unwrap();
    let in_db = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["target_hosts"] == serde_json::json!(["h54"])
                && r["execution_outcome"] == "ExecutionFailed"
        })
        .count();
    assert!(in_db >= 3, "{runs:#}");
    assert!(
        runs.as_array()
            .unwrap()
            .iter()
            .all(|r| !r["execution_outcome"].is_null()),
        "no run left unfinished: {runs:#}"
    );

    // The daemon goes on serving the other host: an edit converges it.
    fs::write(
        d.dir().join("hosts/h55.yaml"),
        file_body("/srv/hard/conf", "two\n"),
    )
    .unwrap();
    wait_log(&daemon, "h55 to converge the edit", || {
        f.sh("h55", "cat /srv/hard/conf") == "two\n"
    });
    assert_eq!(
        f.sh("h54", "test -e /srv/hard && echo present || echo absent"),
        "absent\n"
    );
}

/// A `git` first in PATH that hangs (and says so, with its pid) while
/// `flag` exists, and is the real `git` otherwise.
fn slow_git(dir: &Path, flag: &Path, pid: &Path) {
    let real = ["/usr/bin/git", "/usr/local/bin/git", "/bin/git"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a git binary");
    let script = format!(
        "#!/bin/sh\nif [ -e '{}' ]; then echo $$ > '{}.tmp'; mv '{}.tmp' '{}'; exec sleep 120; fi\nexec {real} \"$@\"\n",
        flag.display(),
        pid.display(),
        pid.display(),
        pid.display()
    );
    let path = dir.join("git");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Kills the hanging `git` whose pid is in the file, however the test ends.
struct KillOnDrop(std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(&self.0) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

#[test]
fn a_hanging_git_stalls_neither_a_retry_nor_shutdown() {
    let f = fleet();
    for h in ["h56", "h57"] {
        f.sh(h, "rm -rf /srv/hard");
    }
    let d = repo(&[
        ("h56", &file_body("/srv/hard/conf", "one\n")),
        ("h57", &file_body("/srv/hard/conf", "one\n")),
    ]);
    let bin = tempfile::tempdir().unwrap();
    let (flag, pid) = (bin.path().join("hang"), bin.path().join("pid"));
    slow_git(bin.path(), &flag, &pid);
    let path = std::env::join_paths(
        std::iter::once(bin.path().to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let _sleeper = KillOnDrop(pid.clone());
    let mut daemon = Daemon::start_with_env(&d, &[("PATH", path.as_os_str())]);
    for h in ["h56", "h57"] {
        wait_status(&d, &daemon, h, "Running", running);
    }

    // From now on `git` hangs; a change makes the controller load again.
    fs::write(&flag, "").unwrap();
    fs::write(d.dir().join("NOTES"), "a change\n").unwrap();
    wait_for("the load to hang in git", LIMIT, || pid.exists());

    // A retry is served while the load hangs: h57 is probed again.
    let probed = status(&d, "h57")["last_probe_at"].clone();
    let retry = d.tend(&["retry", "h57", "--reason", "the load hangs"]);
    assert_eq!(code(&retry), 0, "{}", text(&retry));
    wait_status(&d, &daemon, "h57", "a pass after the retry", |s| {
        s["last_probe_at"] != probed
    });
    // So is SIGTERM: the controller exits without waiting for git.
    daemon.signal("-TERM");
    let st = daemon.wait(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "log:\n{}", daemon.log());
}

#[test]
fn a_recreated_hosts_dir_is_watched_again() {
    let f = fleet();
    f.sh("h58", "rm -rf /srv/hard");
    let d = repo(&[("h58", &file_body("/srv/hard/conf", "one\n"))]);
    let daemon = Daemon::start(&d);
    wait_status(&d, &daemon, "h58", "Running", running);
    assert_eq!(f.sh("h58", "cat /srv/hard/conf"), "one\n");

    // `hosts/` removed and created again, as a checkout does: the change
    // itself is seen (the desired dir's own watch)...
    let hosts = d.dir().join("hosts");
    fs::remove_dir_all(&hosts).unwrap();
    fs::create_dir(&hosts).unwrap();
    fs::write(hosts.join("h58.yaml"), file_body("/srv/hard/conf", "two\n")).unwrap();
    wait_log(&daemon, "the recreated dir's content to converge", || {
        f.sh("h58", "cat /srv/hard/conf") == "two\n"
    });
    wait_status(&d, &daemon, "h58", "Running at two", running);

    // ...and so is a later edit under it, well before the 1 h resync.
    fs::write(
        hosts.join("h58.yaml"),
        file_body("/srv/hard/conf", "three\n"),
    )
    .unwrap();
    wait_log(
        &daemon,
        "an edit under the recreated dir to converge",
        || f.sh("h58", "cat /srv/hard/conf") == "three\n",
    );
}
