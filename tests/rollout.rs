//! Rollouts in waves with one failure budget (SPEC 8.2) on real SSH hosts:
//! waves of the right sizes in order; a failing health command in wave 2
//! with `max_failures: 0` halts, the later hosts `Planned` and untouched;
//! the halt survives `tend run` and a restart of it; `tend resume` (taken by
//! the running controller) continues; a budget of 1 lets one failure (an
//! unreachable host) through and halts on the second; a new commit for the
//! halted hosts starts a new rollout.
//!
//! Hosts: a second chroot fleet of its own (`scale_fleet`, h1..h14 on
//! 127.0.1.x), brought up fresh by the first test that needs it.

#[path = "support/fleet.rs"]
mod support;

use std::fs;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use support::{Daemon, Desired, Fleet, code, outcome, scale_fleet, text, wait_for};

fn hosts() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| scale_fleet(14))
}

/// One file per host, naming its version; healthy unless `/srv/unhealthy`
/// exists on the host.
fn body(version: &str) -> String {
    format!(
        "resources:\n  - kind: file\n    path: /srv/ro/app.conf\n    content: \"{version}\\n\"\n  - kind: directory\n    path: /srv/ro\n"
    )
}

fn tend_yaml(rollout: &str) -> String {
    format!(
        "dispatch: enforced\nprobe_timeout: 30s\nretries: 0\nretry_backoff: 50ms\nresync: 1h\nquiet_window: 200ms\nrollout:\n{rollout}"
    )
}

const HEALTH: &str = "  health:\n    command: \"test ! -e /srv/unhealthy\"\n    timeout: 20s\n";

fn has_version(f: &Fleet, host: &str, v: &str) -> bool {
    f.ssh(host, "cat /srv/ro/app.conf")
        .stdout
        .starts_with(format!("{v}\n").as_bytes())
}

fn timeline(d: &Desired, run: &Value) -> Vec<Value> {
    let id = run["run_id"].as_str().unwrap();
    fs::read_to_string(d.state().join("runs").join(id).join("timeline.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn fleet_rollout(d: &Desired) -> Value {
    let f: Value =
        serde_json::from_slice(&fs::read(d.state().join("status/fleet.json")).unwrap()).unwrap();
    f["rollout"].clone()
}

fn status(d: &Desired, host: &str) -> Option<Value> {
    let bytes = fs::read(d.state().join(format!("status/{host}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn converged_reason(d: &Desired, host: &str) -> String {
    let Some(s) = status(d, host) else {
        return String::new();
    };
    s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Converged")
        .map(|c| c["reason"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Hosts `range` reset, `unhealthy` made to fail the health check, and a
/// git work tree that gives each host [`body`] `v1`.
fn setup(
    f: &Fleet,
    range: std::ops::RangeInclusive<usize>,
    unhealthy: &str,
    tend_yaml: &str,
) -> (Desired, Vec<String>) {
    let names: Vec<String> = range.map(|i| format!("h{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for h in &refs {
        f.sh(h, "rm -rf /srv/ro /srv/unhealthy");
    }
    f.sh(unhealthy, "touch /srv/unhealthy");
    let files: Vec<(&str, String)> = refs.iter().map(|h| (*h, body("v1"))).collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(h, b)| (*h, b.as_str())).collect();
    let d = Desired::new(tend_yaml, &f.inventory(&refs), &files);
    d.init_git();
    (d, names)
}

#[test]
fn waves_in_order_a_failed_health_check_halts_and_resume_continues() {
    let f = hosts();
    let (d, names) = setup(
        f,
        1..=8,
        "h3",
        &tend_yaml(&format!(
            "  waves: [1, 3, 100%]\n  max_failures: 0\n{HEALTH}"
        )),
    );
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();

    // Wave 1: h1; wave 2: h2, h3 (h3's health check fails); halted there.
    let out = d.tend(&["apply"]);
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    assert_eq!(r["execution_outcome"], "Halted", "{r}");
    let tl = timeline(&d, &r);
    let waves: Vec<Value> = tl
        .iter()
        .filter(|e| e["kind"] == "rollout_wave")
        .map(|e| e["hosts"].clone())
        .collect();
    assert_eq!(
        waves,
        [serde_json::json!(["h1"]), serde_json::json!(["h2", "h3"])],
        "{tl:?}"
    );
    // In order: every host of wave 1 locked and released before wave 2 began.
    let at = |kind: &str, host: &str| -> String {
        tl.iter()
            .find(|e| e["kind"] == kind && e["host"] == host)
            .map(|e| e["at"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no {kind} for {host}"))
    };
    assert!(at("host_lock_released", "h1") <= at("host_locked", "h2"));
    assert!(at("host_lock_released", "h1") <= at("host_locked", "h3"));
    let h3 = outcome(&r, "h3");
    assert_eq!(h3["outcome"], "ExecutionFailed", "{r}");
    assert!(
        h3["last_failure_message"]
            .as_str()
            .unwrap()
            .starts_with("health: "),
        "{h3}"
    );
    assert_eq!(outcome(&r, "h2")["outcome"], "Completed");
    for h in &refs[3..] {
        let o = outcome(&r, h);
        assert_eq!(o["outcome"], "Planned", "{r}");
        assert!(o["reason"].as_str().unwrap().contains("halted"), "{o}");
        assert!(!has_version(f, h, "v1"), "{h} was touched");
        assert_eq!(converged_reason(&d, h), "RolloutHalted");
    }
    let ro = fleet_rollout(&d);
    assert_eq!(ro["state"], "Halted", "{ro}");
    assert_eq!(ro["wave"], 2);
    assert_eq!(ro["waves"], 3);
    assert_eq!(ro["failed_hosts"], serde_json::json!(["h3"]));
    assert_eq!(ro["budget"], 0);

    // Another apply of the same revision: still halted, exit 2.
    let out = d.tend(&["apply"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    for h in &refs[3..] {
        assert!(!has_version(f, h, "v1"));
    }

    // The controller keeps the halt, across a restart of it. A held host
    // whose status says so gets no pass; h4's status is removed, so the
    // controller passes over it once and records the hold.
    for round in 0..2 {
        let before = d.run_ids();
        fs::remove_file(d.state().join("status/h4.json")).unwrap();
        let mut daemon = Daemon::start(&d);
        wait_for("a controller pass of h4", Duration::from_secs(60), || {
            d.run_ids().difference(&before).any(|id| {
                // A run still going has no result.json yet.
                let Ok(bytes) = fs::read(d.state().join("runs").join(id).join("result.json"))
                else {
                    return false;
                };
                let r: Value = serde_json::from_slice(&bytes).unwrap();
                r["host_outcomes"][0]["host"] == "h4"
                    && r["host_outcomes"][0]["outcome"] == "Planned"
                    && r["host_outcomes"][0]["reason"]
                        .as_str()
                        .is_some_and(|m| m.contains("halted"))
            })
        });
        wait_for("h4's status", Duration::from_secs(10), || {
            converged_reason(&d, "h4") == "RolloutHalted"
        });
        for h in &refs[3..] {
            assert!(!has_version(f, h, "v1"), "round {round}: {h} was touched");
        }
        assert_eq!(fleet_rollout(&d)["state"], "Halted");
        daemon.signal("-TERM");
        daemon.wait(Duration::from_secs(30));
    }

    // Resume with the controller running: it takes the request, h3 (healthy
    // now) and the last wave converge.
    let mut daemon = Daemon::start(&d);
    f.sh("h3", "rm -f /srv/unhealthy");
    let out = d.tend(&["resume", "--reason", "h3 fixed"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !refs.iter().all(|h| has_version(f, h, "v1")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the rollout did not complete: {}\n{}",
            fleet_rollout(&d),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("fleet.json to say so", Duration::from_secs(30), || {
        fleet_rollout(&d)["state"] == "Complete"
    });
    daemon.signal("-TERM");
    daemon.wait(Duration::from_secs(30));
    // Nothing halted: resume has nothing to do.
    assert_eq!(code(&d.tend(&["resume", "--reason", "again"])), 1);
}

#[test]
fn a_budget_of_one_takes_an_unreachable_host_and_halts_on_the_second_failure() {
    let f = hosts();
    // One host at a time, so that "no further host starts" shows.
    let (d, names) = setup(
        f,
        9..=14,
        "h12",
        &format!(
            "concurrency: 1\n{}",
            tend_yaml(&format!("  waves: [2, 100%]\n  max_failures: 1\n{HEALTH}"))
        ),
    );
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    {
        let _down = f.stopped("h10");
        let out = d.tend(&["apply"]);
        assert_eq!(code(&out), 4, "{}", text(&out));
    }
    let r = d.last_result();
    assert_eq!(r["execution_outcome"], "Halted", "{r}");
    assert_eq!(outcome(&r, "h9")["outcome"], "Completed");
    assert_eq!(outcome(&r, "h10")["outcome"], "TransportUnreachable", "{r}");
    assert_eq!(outcome(&r, "h11")["outcome"], "Completed", "{r}");
    assert_eq!(outcome(&r, "h12")["outcome"], "ExecutionFailed", "{r}");
    for h in ["h13", "h14"] {
        assert_eq!(outcome(&r, h)["outcome"], "Planned", "{r}");
        assert!(!has_version(f, h, "v1"));
    }
    let ro = fleet_rollout(&d);
    assert_eq!(
        ro["failed_hosts"],
        serde_json::json!(["h10", "h12"]),
        "{ro}"
    );
    assert_eq!(ro["budget"], 1);

    // A commit that changes nothing for the halted hosts does not resume.
    fs::write(
        d.dir().join("tend.yaml"),
        format!(
            "{}# note\n",
            fs::read_to_string(d.dir().join("tend.yaml")).unwrap()
        ),
    )
    .unwrap();
    d.commit("a comment");
    let out = d.tend(&["apply"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(!has_version(f, "h13", "v1"));

    // A commit that changes their definition starts a new rollout.
    f.sh("h12", "rm -f /srv/unhealthy");
    for h in &refs {
        fs::write(d.dir().join(format!("hosts/{h}.yaml")), body("v2")).unwrap();
    }
    let head = d.commit("v2");
    let out = d.tend(&["apply"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let r = d.last_result();
    assert!(
        timeline(&d, &r)
            .iter()
            .any(|e| e["kind"] == "rollout_started"),
        "a new rollout"
    );
    for h in &refs {
        assert!(has_version(f, h, "v2"), "{h}");
    }
    let ro = fleet_rollout(&d);
    assert_eq!(ro["state"], "Complete", "{ro}");
    assert_eq!(ro["revision"], head.as_str());
}
