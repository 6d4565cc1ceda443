//! End to end: the real daemon (`tend run`) against real SSH hosts of the
//! fleet, driven the way an operator drives it: commits to a git work tree,
//! hand edits on a host, broken YAML, tokens, `tend retry`, SIGTERM and
//! kill -9.
//!
//! Hosts h17..h24, h35 and h36 belong to this file (tests run in parallel).

#[path = "support/fleet.rs"]
mod support;

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, Desired, code, fleet, git, text, wait_for};

/// Fast timings so that each scenario takes seconds.
const TEND_YAML: &str = "dispatch: enforced
probe_timeout: 5s
retries: 1
retry_backoff: 50ms
quiet_window: 200ms
max_defer: 1s
resync: 3s
crash_loop_threshold: 3
";

/// Generous limits: the machine may be busy with other test binaries.
const CONVERGE: Duration = Duration::from_secs(60);

fn inventory(hosts: &[&str]) -> String {
    let f = fleet();
    let mut s = String::from("hosts:\n");
    for h in hosts {
        s.push_str(&f.inventory_entry(h));
    }
    s
}

/// A desired-state dir that is a git work tree (state dir ignored).
fn repo(tend_yaml: &str, hosts: &[(&str, &str)]) -> Desired {
    let names: Vec<&str> = hosts.iter().map(|(h, _)| *h).collect();
    let d = Desired::new(tend_yaml, &inventory(&names), hosts);
    d.init_git();
    d
}

/// Commit everything; returns the new HEAD.
fn commit(d: &Desired, msg: &str) -> String {
    d.commit(msg)
}

fn write_host(d: &Desired, host: &str, body: &str) {
    fs::write(d.dir().join("hosts").join(format!("{host}.yaml")), body).unwrap();
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

/// Wait until the host's status satisfies `f`; on timeout, show the status
/// and the daemon's log.
fn wait_status(d: &Desired, daemon: &Daemon, host: &str, what: &str, f: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + CONVERGE;
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

fn running_at(s: &Value, rev: &str) -> bool {
    s["phase"] == "Running" && s["desired_revision"] == rev && s["converged_revision"] == rev
}

/// Every run's result.json.
fn results(d: &Desired) -> Vec<Value> {
    d.run_ids()
        .iter()
        .filter_map(|id| {
            fs::read(d.state().join("runs").join(id).join("result.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        })
        .collect()
}

fn file_body(path: &str, content: &str) -> String {
    format!(
        "resources:\n  - kind: directory\n    path: /srv/ctl\n  - kind: file\n    path: {path}\n    content: {content:?}\n"
    )
}

#[test]
fn a_commit_converges_every_host_and_status_runs_at_the_new_revision() {
    let f = fleet();
    for h in ["h17", "h18"] {
        f.sh(h, "rm -rf /srv/ctl");
    }
    let d = repo(
        TEND_YAML,
        &[
            ("h17", &file_body("/srv/ctl/app.conf", "one\n")),
            ("h18", &file_body("/srv/ctl/app.conf", "one\n")),
        ],
    );
    let head1 = git(d.dir(), &["rev-parse", "HEAD"]);
    let mut daemon = Daemon::start(&d);
    for h in ["h17", "h18"] {
        wait_status(&d, &daemon, h, "Running at the first commit", |s| {
            running_at(s, &head1)
        });
        assert_eq!(f.sh(h, "cat /srv/ctl/app.conf"), "one\n");
    }
    let reachable_since =
        condition(&status(&d, "h17"), "Reachable")["last_transition_time"].clone();

    // One controller per state dir: a second one, and apply, are refused
    // with the holder's pid.
    let pid = daemon.pid().to_string();
    let second = d.tend(&["run"]);
    assert_eq!(code(&second), 1, "{}", text(&second));
    assert!(
        text(&second).contains(&format!("pid {pid}")),
        "{}",
        text(&second)
    );
    let apply = d.tend(&["apply"]);
    assert_eq!(code(&apply), 1, "{}", text(&apply));
    assert!(
        text(&apply).contains(&format!("pid {pid}")),
        "{}",
        text(&apply)
    );

    // The operator commits a change and walks away.
    for h in ["h17", "h18"] {
        write_host(&d, h, &file_body("/srv/ctl/app.conf", "two\n"));
    }
    let head2 = commit(&d, "bump app.conf");
    for h in ["h17", "h18"] {
        wait_status(&d, &daemon, h, "Running at the second commit", |s| {
            running_at(s, &head2)
        });
        assert_eq!(f.sh(h, "cat /srv/ctl/app.conf"), "two\n");
    }
    // Each host had one pass at the new commit, and a watch-triggered pass
    // changed the file (the edit and the commit may come as one burst of
    // changes or as two, the first at the work tree's dirty revision).
    let rs = results(&d);
    for h in ["h17", "h18"] {
        let at_head2 = rs
            .iter()
            .filter(|r| r["operation_intent"]["target_hosts"] == serde_json::json!([h]))
            .filter(|r| r["operation_intent"]["trigger"] == "watch")
            .filter(|r| r["desired_revision"] == head2)
            .count();
        assert_eq!(at_head2, 1, "{h}: one watch run at {head2}");
        assert!(
            rs.iter()
                .any(|r| r["operation_intent"]["trigger"] == "watch"
                    && r["execution_outcome"] == "Completed"
                    && r["host_outcomes"][0]["host"] == h
                    && r["host_outcomes"][0]["changes"]["update"] == 1),
            "{h}: a watch run updated the file"
        );
    }
    // Honest transitions: the host never stopped being reachable.
    assert_eq!(
        condition(&status(&d, "h17"), "Reachable")["last_transition_time"],
        reachable_since
    );
    let fleet_json: Value =
        serde_json::from_slice(&fs::read(d.state().join("status/fleet.json")).unwrap()).unwrap();
    assert_eq!(
        fleet_json["hosts"].as_array().unwrap().len(),
        2,
        "{fleet_json:#}"
    );

    daemon.signal("-TERM");
    let st = daemon.wait(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "log:\n{}", daemon.log());
}

#[test]
fn a_hand_edit_on_a_host_is_corrected_within_one_resync() {
    let f = fleet();
    f.sh("h19", "rm -rf /srv/ctl");
    let d = repo(
        TEND_YAML,
        &[("h19", &file_body("/srv/ctl/motd", "managed\n"))],
    );
    let head = git(d.dir(), &["rev-parse", "HEAD"]);
    let daemon = Daemon::start(&d);
    wait_status(&d, &daemon, "h19", "Running", |s| running_at(s, &head));
    // A resync that finds nothing to do records no run: once the first
    // no-op pass has recorded the host's move to Drifted=False, later
    // resyncs only move last_probe_at.
    wait_status(&d, &daemon, "h19", "a no-op pass", |s| {
        running_at(s, &head) && condition(s, "Drifted")["status"] == "False"
    });
    let (runs, probed) = (d.run_ids(), status(&d, "h19")["last_probe_at"].clone());
    wait_status(&d, &daemon, "h19", "a quiet resync", |s| {
        s["last_probe_at"] != probed
    });
    assert_eq!(d.run_ids(), runs, "a quiet resync recorded a run");

    f.sh("h19", "echo 'edited by hand' > /srv/ctl/motd");
    // resync is 3 s (+10% jitter): give it one resync and a margin.
    wait_for(
        "the hand edit to be corrected",
        Duration::from_secs(20),
        || f.sh("h19", "cat /srv/ctl/motd") == "managed\n",
    );
    // The host is corrected before its run is recorded: wait for the record.
    let fixing = |d: &Desired| -> Vec<Value> {
        results(d)
            .into_iter()
            .filter(|r| r["operation_intent"]["trigger"] == "resync")
            .filter(|r| r["host_outcomes"][0]["changes"]["update"] == 1)
            .collect()
    };
    wait_for("the correcting run's record", CONVERGE, || {
        !fixing(&d).is_empty()
    });
    wait_status(&d, &daemon, "h19", "Running again", |s| {
        running_at(s, &head)
    });
    let fixed = fixing(&d);
    assert_eq!(fixed.len(), 1, "one resync run corrected the drift");
    assert_eq!(fixed[0]["host_outcomes"][0]["outcome"], "Completed");
}

#[test]
fn broken_yaml_dispatches_nothing_until_it_is_fixed() {
    let f = fleet();
    f.sh("h20", "rm -rf /srv/ctl");
    let d = repo(TEND_YAML, &[("h20", &file_body("/srv/ctl/conf", "good\n"))]);
    let head = git(d.dir(), &["rev-parse", "HEAD"]);
    let daemon = Daemon::start(&d);
    wait_status(&d, &daemon, "h20", "Running", |s| running_at(s, &head));

    // A broken commit, and drift on the host that a valid state would fix.
    write_host(
        &d,
        "h20",
        "resources:\n  - kind: file\n    path: [unclosed\n",
    );
    let broken = commit(&d, "broken");
    f.sh("h20", "echo drifted > /srv/ctl/conf");
    wait_status(&d, &daemon, "h20", "ValidDesiredState=False", |s| {
        condition(s, "ValidDesiredState")["status"] == "False" && s["desired_revision"] == broken
    });
    let s = status(&d, "h20");
    let msg = condition(&s, "ValidDesiredState")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.starts_with("hosts/h20.yaml:3:"), "{msg}");
    assert_ne!(s["phase"], "Running", "{s:#}");
    // Probing and drift reporting go on: a resync after the edit sees it...
    wait_status(&d, &daemon, "h20", "drift reported", |s| {
        condition(s, "Drifted")["status"] == "True"
            && s["pending"]["update"] == 1
            && condition(s, "ValidDesiredState")["status"] == "False"
    });
    // ...and nothing is dispatched: the drift stays, every run says off.
    assert_eq!(f.sh("h20", "cat /srv/ctl/conf"), "drifted\n");
    let off: Vec<Value> = results(&d)
        .into_iter()
        .filter(|r| r["dispatch_mode"] == "off")
        .collect();
    assert!(
        !off.is_empty(),
        "passes under the broken state run with dispatch off"
    );
    for r in &off {
        assert_eq!(
            r["host_outcomes"][0]["dispatch_status"], "not_dispatched",
            "{r:#}"
        );
        // Planned against the last valid state.
        assert_eq!(r["desired_revision"], head, "{r:#}");
    }

    // The fix is picked up by the watch.
    write_host(&d, "h20", &file_body("/srv/ctl/conf", "fixed\n"));
    let fixed = commit(&d, "fix");
    wait_status(&d, &daemon, "h20", "Running at the fix", |s| {
        running_at(s, &fixed) && condition(s, "ValidDesiredState")["status"] == "True"
    });
    assert_eq!(f.sh("h20", "cat /srv/ctl/conf"), "fixed\n");
}

#[test]
fn a_token_releases_the_held_destructive_step() {
    let f = fleet();
    f.sh("h21", "rm -rf /srv/ctl");
    let two = "resources:\n  - kind: directory\n    path: /srv/ctl\n  - kind: file\n    path: /srv/ctl/keep\n    content: \"k\\n\"\n  - kind: file\n    path: /srv/ctl/old\n    content: \"o\\n\"\n";
    let d = repo(TEND_YAML, &[("h21", two)]);
    let head = git(d.dir(), &["rev-parse", "HEAD"]);
    let daemon = Daemon::start(&d);
    wait_status(&d, &daemon, "h21", "Running", |s| running_at(s, &head));
    assert_eq!(f.sh("h21", "cat /srv/ctl/old"), "o\n");

    // Drop the resource: a prune, destructive, held for a token.
    write_host(&d, "h21", &file_body("/srv/ctl/keep", "k\n"));
    let head2 = commit(&d, "retire old");
    wait_status(&d, &daemon, "h21", "awaiting confirmation", |s| {
        s["desired_revision"] == head2 && !s["awaiting_confirmation"].is_null()
    });
    let s = status(&d, "h21");
    assert_eq!(condition(&s, "AwaitingConfirmation")["status"], "True");
    assert_eq!(s["pending"]["destructive"], 1);
    assert_eq!(
        f.sh("h21", "cat /srv/ctl/old"),
        "o\n",
        "nothing deleted without a token"
    );
    let op = s["awaiting_confirmation"]["operation"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        s["awaiting_confirmation"]["hosts"],
        serde_json::json!(["h21"])
    );

    let confirm = d.tend(&[
        "confirm",
        &op,
        "--reason",
        "retire the old file",
        "--ttl",
        "10m",
    ]);
    assert_eq!(code(&confirm), 0, "{}", text(&confirm));
    wait_status(&d, &daemon, "h21", "Running after the token", |s| {
        running_at(s, &head2) && s["awaiting_confirmation"].is_null()
    });
    assert_eq!(
        f.sh("h21", "test -e /srv/ctl/old && echo present || echo gone"),
        "gone\n"
    );
    let used: Vec<_> = fs::read_dir(d.state().join("confirm/used"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(used.len(), 1, "{used:?}");
    let token_runs: Vec<Value> = results(&d)
        .into_iter()
        .filter(|r| r["effective_mode"] == "full")
        .collect();
    assert_eq!(token_runs.len(), 1, "one run deleted: {token_runs:#?}");
    let r = &token_runs[0];
    assert_eq!(r["operation_intent"]["trigger"], "token", "{r:#}");
    assert_eq!(r["confirmation"]["scope_match"], true);
    assert_eq!(r["confirmation"]["operation"], op.as_str());
}

/// A host whose apply takes a while: a command that marks its start, sleeps,
/// then marks its end.
fn slow_body() -> String {
    "resources:\n  - kind: directory\n    path: /srv/ctl\n  - kind: command\n    name: slow\n    run: \"touch /srv/ctl/started; sleep 3; touch /srv/ctl/done\"\n    creates: /srv/ctl/done\n".to_string()
}

#[test]
fn sigterm_mid_apply_lets_the_step_finish_and_exits_cleanly() {
    let f = fleet();
    f.sh("h22", "rm -rf /srv/ctl");
    let d = repo(TEND_YAML, &[("h22", &slow_body())]);
    let head = git(d.dir(), &["rev-parse", "HEAD"]);
    let mut daemon = Daemon::start(&d);
    wait_for("the slow step to start", CONVERGE, || {
        f.sh("h22", "test -e /srv/ctl/started && echo y || echo n") == "y\n"
    });
    daemon.signal("-TERM");
    let st = daemon.wait(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "log:\n{}", daemon.log());
    // The running step finished, and its run was closed.
    assert_eq!(
        f.sh("h22", "test -e /srv/ctl/done && echo y || echo n"),
        "y\n"
    );
    let rs = results(&d);
    assert_eq!(rs.len(), d.run_ids().len(), "every run has its result.json");
    assert!(
        rs.iter().all(|r| r["execution_outcome"] != "Interrupted"),
        "{rs:#?}"
    );
    let s = status(&d, "h22");
    assert_eq!(s["last_run_id"], rs[0]["run_id"], "{s:#}");

    // A restart finds a consistent state and converges.
    let daemon = Daemon::start(&d);
    wait_status(&d, &daemon, "h22", "Running after restart", |s| {
        running_at(s, &head)
    });
    assert!(
        results(&d)
            .iter()
            .all(|r| r["execution_outcome"] != "Interrupted")
    );
}

#[test]
fn kill_9_mid_apply_is_marked_interrupted_at_restart_and_converges() {
    let f = fleet();
    f.sh("h23", "rm -rf /srv/ctl");
    let d = repo(TEND_YAML, &[("h23", &slow_body())]);
    let head = git(d.dir(), &["rev-parse", "HEAD"]);
    let mut daemon = Daemon::start(&d);
    wait_for("the slow step to start", CONVERGE, || {
        f.sh("h23", "test -e /srv/ctl/started && echo y || echo n") == "y\n"
    });
    daemon.signal("-KILL");
    daemon.wait(Duration::from_secs(10));
    let runs: Value = serde_json::from_slice(&d.tend(&["runs", "--json"]).stdout).unwrap();
    let open: Vec<String> = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["execution_outcome"].is_null())
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(open.len(), 1, "the killed run is unfinished: {runs:#}");

    let daemon = Daemon::start(&d);
    wait_status(&d, &daemon, "h23", "Running after restart", |s| {
        running_at(s, &head)
    });
    let r = d.result(&open[0]);
    assert_eq!(r["execution_outcome"], "Interrupted", "{r:#}");
    assert_eq!(r["blast_radius"], serde_json::json!(["h23"]));
    assert_eq!(r["host_outcomes"].as_array().unwrap().len(), 1);
    let runs = d.tend(&["runs", "--json"]);
    assert!(text(&runs).contains("Interrupted"), "{}", text(&runs));
    assert!(daemon.log().contains("Interrupted"), "{}", daemon.log());
}

#[test]
fn a_crash_loop_degrades_the_host_and_tend_retry_releases_it() {
    let f = fleet();
    f.sh("h24", "rm -rf /srv/ctl");
    let failing = "resources:\n  - kind: command\n    name: broken\n    run: \"echo no such thing >&2; exit 3\"\n    creates: /srv/ctl/never\n";
    let d = repo(TEND_YAML, &[("h24", failing)]);
    let daemon = Daemon::start(&d);
    // Three failures (backoff 1 s, 2 s) with the same signature: Degraded.
    wait_status(&d, &daemon, "h24", "Degraded", |s| {
        condition(s, "Degraded")["status"] == "True"
    });
    let s = status(&d, "h24");
    let deg = condition(&s, "Degraded");
    assert_eq!(deg["reason"], "CrashLoop", "{s:#}");
    assert!(
        deg["message"].as_str().unwrap().contains("3 consecutive"),
        "{s:#}"
    );

    assert_eq!(code(&d.tend(&["retry", "h24"])), 1, "--reason is required");
    let retry = d.tend(&["retry", "h24", "--reason", "disk replaced"]);
    assert_eq!(code(&retry), 0, "{}", text(&retry));
    assert!(
        text(&retry).contains(&format!("(pid {})", daemon.pid())),
        "names the controller that takes it: {}",
        text(&retry)
    );
    wait_status(&d, &daemon, "h24", "released by tend retry", |s| {
        condition(s, "Degraded")["status"] == "False"
    });
    wait_for("the controller to take the request", CONVERGE, || {
        daemon.log().contains("retry requested")
    });
    assert!(
        !d.state().join("retry/h24").exists(),
        "the request file is consumed"
    );
    let used: Vec<_> = fs::read_dir(d.state().join("retry/used"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(used.len(), 1, "kept as the record of the override");
    assert!(used[0].contains("disk replaced"), "{used:?}");
    let unknown = d.tend(&["retry", "nosuchhost", "--reason", "x"]);
    assert_eq!(code(&unknown), 1, "{}", text(&unknown));

    // Fixing the desired state converges it.
    write_host(
        &d,
        "h24",
        "resources:\n  - kind: directory\n    path: /srv/ctl\n  - kind: command\n    name: broken\n    run: \"touch /srv/ctl/never\"\n    creates: /srv/ctl/never\n",
    );
    let fixed = commit(&d, "fix the command");
    wait_status(&d, &daemon, "h24", "Running, not degraded", |s| {
        running_at(s, &fixed) && condition(s, "Degraded")["status"] == "False"
    });
}

#[test]
fn canary_mode_converges_the_canary_and_holds_the_others() {
    let f = fleet();
    for h in ["h35", "h36"] {
        f.sh(h, "rm -rf /srv/ctl");
    }
    let tend_yaml = TEND_YAML.replace("dispatch: enforced", "dispatch: canary\ncanary: h35");
    let d = repo(
        &tend_yaml,
        &[
            ("h35", &file_body("/srv/ctl/conf", "new\n")),
            ("h36", &file_body("/srv/ctl/conf", "new\n")),
        ],
    );
    let head = git(d.dir(), &["rev-parse", "HEAD"]);
    let daemon = Daemon::start(&d);
    wait_status(&d, &daemon, "h35", "the canary Running", |s| {
        running_at(s, &head)
    });
    // The other host is planned, not dispatched, and not blocked by policy.
    wait_status(&d, &daemon, "h36", "held by the mode", |s| {
        s["phase"] == "Ready" && s["desired_revision"] == head
    });
    let s = status(&d, "h36");
    assert_eq!(condition(&s, "Converged")["status"], "False", "{s:#}");
    assert_eq!(
        condition(&s, "AwaitingConfirmation")["reason"],
        "NothingHeld",
        "{s:#}"
    );
    assert_eq!(
        f.sh("h36", "test -e /srv/ctl && echo present || echo absent"),
        "absent\n"
    );
    let held: Vec<Value> = results(&d)
        .into_iter()
        .filter(|r| r["operation_intent"]["target_hosts"] == serde_json::json!(["h36"]))
        .collect();
    assert!(!held.is_empty());
    for r in &held {
        assert_eq!(r["policy_outcome"], "Approved", "{r:#}");
        let o = &r["host_outcomes"][0];
        assert_eq!(o["outcome"], "Planned", "{r:#}");
        assert_eq!(o["dispatch_status"], "not_dispatched");
    }
}
