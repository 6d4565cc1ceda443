//! Connection-safe changes (SPEC 8.7, `guard: connection`) on real hosts:
//! systemd hosts s15 and s16 (a transient systemd timer) and chroot host
//! h39 (no systemd: the detached-process timer).
//!
//! - s15: an sshd drop-in that locks root out (`AllowUsers nobody`), with
//!   `restart_on` on ssh, is reverted within `revert_after`; the host is
//!   reachable again, the step failed with the SPEC's message, the next
//!   pass does not apply it again (`GuardReverted`), a corrected
//!   definition converges.
//! - s16: a good change is disarmed (the timer unit is gone, nothing
//!   reverts after `revert_after`); then `kill -9` of `tend run` right
//!   after a guarded write: the host reverts, and the restarted controller
//!   waits before it probes the host, and records the revert.
//! - h39: a change after which the host stops answering (a watcher on the
//!   host freezes its sshd while the file says BREAK) is reverted by the
//!   fallback timer, and recorded.

#[path = "support/fleet.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, Desired, Fleet, code, fleet, systemd_fleet, text, wait_for};

const FAST: &str = "probe_timeout: 10s\nretries: 1\nretry_backoff: 50ms\n";
const REVERTED: &str = "reverted: the host was unreachable after the change";
const DROPIN: &str = "/etc/ssh/sshd_config.d/00-tend-guard.conf";

fn desired(f: &Fleet, host: &str, tend_yaml: &str, body: &str) -> Desired {
    let inventory = format!("hosts:\n{}", f.inventory_entry(host));
    Desired::new(tend_yaml, &inventory, &[(host, body)])
}

fn sshd_dropin(line: &str) -> String {
    format!(
        "resources:\n  - kind: file\n    path: {DROPIN}\n    content: \"{line}\\n\"\n    guard: connection\n    revert_after: 30s\n  - kind: service\n    name: ssh\n    restart_on: [\"file:{DROPIN}\"]\n"
    )
}

fn apply(d: &Desired) -> (i32, Value) {
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    let c = code(&out);
    assert!(
        [0, 2, 3, 4].contains(&c),
        "apply exited {c}: {}",
        text(&out)
    );
    (c, d.last_result())
}

/// The step of resource `id` in a host outcome.
fn step<'a>(r: &'a Value, id: &str) -> &'a Value {
    r["host_outcomes"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id}: {r:#}"))
}

fn status(d: &Desired, host: &str) -> Value {
    let p = d.state().join("status").join(format!("{host}.json"));
    serde_json::from_slice(&std::fs::read(p).unwrap_or_default()).unwrap_or(Value::Null)
}

fn converged(st: &Value) -> (String, String) {
    st["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Converged"))
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_default()
}

/// (state, armed_at) of every guard recorded, oldest first.
fn guards(d: &Desired) -> Vec<(String, String)> {
    let db = rusqlite::Connection::open(d.state().join("tend.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT state, armed_at FROM guards ORDER BY armed_at")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Event kinds of the newest run's timeline.
fn timeline(d: &Desired, run_id: &str) -> Vec<Value> {
    let p = d.state().join("runs").join(run_id).join("timeline.jsonl");
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// tend can open a new connection to the host and probe it.
fn reachable(d: &Desired) -> bool {
    code(&d.tend(&["probe", "--json"])) == 0
}

#[test]
fn a_lockout_of_root_is_reverted_held_then_a_corrected_change_converges() {
    let f = systemd_fleet();
    let h = "s15";
    f.sh(h, &format!("rm -f {DROPIN}; systemctl restart ssh"));
    let d = desired(f, h, FAST, &sshd_dropin("AllowUsers nobody"));
    let id = format!("file:{DROPIN}");

    let begun = Instant::now();
    let (c, r) = apply(&d);
    assert_ne!(c, 0, "{r:#}");
    let s = step(&r, &id);
    assert_eq!(s["status"], "failed", "{r:#}");
    assert_eq!(s["message"], REVERTED, "{r:#}");
    assert_eq!(step(&r, "service:ssh")["status"], "succeeded", "{r:#}");
    // Reverted within revert_after (and the grace tend gives the host):
    // the apply came back, and the host with it.
    assert!(begun.elapsed() < Duration::from_secs(120));
    assert!(reachable(&d), "the host is reachable again");
    assert_eq!(
        f.sh(h, &format!("test -e {DROPIN} && echo there || echo gone")),
        "gone\n"
    );
    assert_eq!(
        guards(&d).iter().map(|g| g.0.as_str()).collect::<Vec<_>>(),
        ["reverted"]
    );
    let run = r["run_id"].as_str().unwrap().to_string();
    let k = kinds(&timeline(&d, &run));
    for want in ["guard_armed", "guard_host_unreachable", "guard_reverted"] {
        assert!(k.contains(&want.to_string()), "{want} in {k:?}");
    }
    assert!(!k.contains(&"guard_host_reached".to_string()), "{k:?}");
    assert_eq!(
        converged(&status(&d, h)),
        ("False".into(), "GuardReverted".into())
    );

    // The next pass does not apply it again.
    let (_, r) = apply(&d);
    let s = step(&r, &id);
    assert_eq!(s["status"], "not_run", "{r:#}");
    assert!(
        s["message"]
            .as_str()
            .unwrap_or("")
            .contains("GuardReverted"),
        "{r:#}"
    );
    assert_eq!(
        f.sh(h, &format!("test -e {DROPIN} && echo there || echo gone")),
        "gone\n"
    );
    assert_eq!(guards(&d).len(), 1, "no new guard armed");
    assert_eq!(
        converged(&status(&d, h)),
        ("False".into(), "GuardReverted".into())
    );
    let plan = d.tend(&["plan"]);
    assert!(text(&plan).contains("GuardReverted"), "{}", text(&plan));

    // A corrected definition converges (and is disarmed).
    std::fs::write(
        d.dir().join(format!("hosts/{h}.yaml")),
        sshd_dropin("AllowUsers root"),
    )
    .unwrap();
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(step(&r, &id)["status"], "succeeded", "{r:#}");
    assert_eq!(f.sh(h, &format!("cat {DROPIN}")), "AllowUsers root\n");
    assert_eq!(guards(&d).last().unwrap().0, "disarmed");
    assert!(reachable(&d));
    assert_eq!(
        converged(&status(&d, h)),
        ("True".into(), "Converged".into())
    );
    f.sh(h, &format!("rm -f {DROPIN}; systemctl restart ssh"));
}

#[test]
fn a_good_change_is_disarmed_and_a_crash_after_the_write_reverts() {
    let f = systemd_fleet();
    let h = "s16";
    f.sh(
        h,
        &format!("rm -rf {DROPIN} /srv/guard/flag.conf /var/lib/tend/guard; systemctl restart ssh; systemctl stop tend-slow 2>/dev/null; rm -f /etc/systemd/system/tend-slow.service; systemctl daemon-reload; true"),
    );

    // A good change: kept, its timer gone, nothing reverts after its time.
    let d = desired(f, h, FAST, &sshd_dropin("LoginGraceTime 90"));
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(guards(&d)[0].0, "disarmed");
    assert_eq!(
        f.sh(
            h,
            "systemctl list-units --all --no-legend 'tend-guard-*' | wc -l"
        ),
        "0\n",
        "the timer unit is gone"
    );
    assert_eq!(
        f.sh(
            h,
            "find /var/lib/tend/guard -mindepth 1 -maxdepth 1 -type d | wc -l; ls /var/lib/tend/guard | grep -c '\\.disarmed$'"
        ),
        "0\n1\n",
        "only a tombstone is left"
    );
    // The assertion is about time passing: revert_after (30 s) must go
    // by with the change kept.
    std::thread::sleep(Duration::from_secs(35));
    assert_eq!(f.sh(h, &format!("cat {DROPIN}")), "LoginGraceTime 90\n");
    f.sh(h, &format!("rm -f {DROPIN}; systemctl restart ssh"));

    // kill -9 of the controller right after a guarded write. The restart
    // it triggers is slow (the unit takes 6 s to stop), so the kill lands
    // between the write and the disarm.
    let body = |v: &str| {
        format!(
            "resources:\n  - kind: directory\n    path: /srv/guard\n  - kind: file\n    path: /etc/systemd/system/tend-slow.service\n    content: \"[Service]\\nExecStart=/bin/sleep infinity\\nExecStop=/bin/sleep 6\\n\"\n  - kind: service\n    name: tend-slow\n    enabled: false\n    restart_on: [\"file:/srv/guard/flag.conf\"]\n  - kind: file\n    path: /srv/guard/flag.conf\n    content: \"{v}\\n\"\n    guard: connection\n    revert_after: 30s\n"
        )
    };
    let d = desired(
        f,
        h,
        &format!("{FAST}dispatch: enforced\nresync: 1h\n"),
        &body("v1"),
    );
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(f.sh(h, "cat /srv/guard/flag.conf"), "v1\n");
    std::fs::write(d.dir().join(format!("hosts/{h}.yaml")), body("v2")).unwrap();
    let mut daemon = Daemon::start(&d);
    wait_for("the guarded write of v2", Duration::from_secs(60), || {
        f.sh(h, "cat /srv/guard/flag.conf 2>/dev/null") == "v2\n"
    });
    daemon.signal("-KILL");
    daemon.wait(Duration::from_secs(10));
    let killed_at = Instant::now();
    assert_eq!(
        f.sh(h, "ls /var/lib/tend/guard/*/armed 2>/dev/null | wc -l"),
        "1\n",
        "armed at the kill"
    );
    let armed = guards(&d);
    assert_eq!(armed.last().unwrap().0, "armed", "{armed:?}");
    let before = d.run_ids();

    // Restarted: the host reverts on its own; the controller waits for its
    // time before probing the host, then records the revert.
    let daemon = Daemon::start(&d);
    wait_for("the revert recorded", Duration::from_secs(120), || {
        guards(&d).last().is_some_and(|g| g.0 == "reverted")
    });
    assert_eq!(f.sh(h, "cat /srv/guard/flag.conf"), "v1\n");
    assert!(killed_at.elapsed() >= Duration::from_secs(20));
    wait_for("GuardReverted", Duration::from_secs(60), || {
        converged(&status(&d, h)) == ("False".into(), "GuardReverted".into())
    });
    // The run after the restart waited, then probed.
    let new: Vec<String> = d.run_ids().difference(&before).cloned().collect();
    let events: Vec<Value> = new.iter().flat_map(|r| timeline(&d, r)).collect();
    let k = kinds(&events);
    assert!(k.contains(&"guard_waiting".to_string()), "{k:?}");
    assert!(k.contains(&"guard_reverted".to_string()), "{k:?}");
    let due = support_rfc3339(&armed.last().unwrap().1) + 30;
    let probed = status(&d, h)["last_probe_at"]
        .as_str()
        .map(support_rfc3339)
        .unwrap_or(0);
    assert!(
        probed >= due,
        "probed at {probed}, before the guard's time {due}: {}",
        daemon.log()
    );
    drop(daemon);
    f.sh(
        h,
        "systemctl stop tend-slow 2>/dev/null; rm -rf /srv/guard /etc/systemd/system/tend-slow.service; systemctl daemon-reload; true",
    );
}

/// Seconds since the epoch of an RFC 3339 time.
fn support_rfc3339(s: &str) -> i64 {
    humantime::parse_rfc3339(s)
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64)
        .unwrap_or_else(|e| panic!("not RFC 3339: {s:?}: {e}"))
}

#[test]
fn without_systemd_the_fallback_timer_reverts() {
    let f = fleet();
    let h = "h39";
    f.sh(h, "rm -rf /srv/guard; mkdir -p /srv/guard");
    let listener = std::process::Command::new("bash")
        .arg(support::repo().join("tests/fleet/fleet.sh"))
        .arg("status")
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&listener.stdout)
        .lines()
        .find_map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            (c.first() == Some(&h)).then(|| c.get(3).unwrap_or(&"").to_string())
        })
        .unwrap();
    assert!(pid.parse::<u32>().is_ok(), "listener pid of {h}: {pid:?}");
    // The "network" of this host: a step before the guarded write marks
    // its start (and gives the watcher time); from then until the revert
    // took BREAK out of the file again, the host's sshd answers no new
    // connection (frozen). Open sessions go on.
    f.sh(
        h,
        &format!(
            "setsid sh -c 'while [ ! -e /srv/guard/started ]; do sleep 0.05; done; kill -STOP {pid}; while ! grep -qs BREAK /srv/guard/net.conf; do sleep 0.1; done; while grep -qs BREAK /srv/guard/net.conf; do sleep 0.1; done; kill -CONT {pid}' </dev/null >/dev/null 2>&1 &"
        ),
    );
    let body = |c: &str| {
        format!(
            "resources:\n  - kind: command\n    name: mark\n    run: \"touch /srv/guard/started; sleep 3\"\n    creates: /srv/guard/started\n  - kind: file\n    path: /srv/guard/net.conf\n    content: \"{c}\\n\"\n    guard: connection\n    revert_after: 30s\n"
        )
    };
    let d = desired(f, h, FAST, &body("BREAK"));
    let (c, r) = apply(&d);
    // Whatever happened, the host answers again after the test.
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    assert_ne!(c, 0, "{r:#}");
    let s = step(&r, "file:/srv/guard/net.conf");
    assert_eq!(s["message"], REVERTED, "{r:#}");
    let run = r["run_id"].as_str().unwrap().to_string();
    let events = timeline(&d, &run);
    let timer = events
        .iter()
        .find(|e| e["kind"] == "guard_armed")
        .map(|e| e["timer"].clone());
    assert_eq!(timer, Some(Value::from("process")), "{events:#?}");
    assert!(reachable(&d));
    assert_eq!(
        f.sh(h, "test -e /srv/guard/net.conf && echo there || echo gone"),
        "gone\n"
    );
    assert_eq!(guards(&d)[0].0, "reverted");

    // Redefined: applied, and kept.
    std::fs::write(d.dir().join(format!("hosts/{h}.yaml")), body("ok")).unwrap();
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(f.sh(h, "cat /srv/guard/net.conf"), "ok\n");
    assert_eq!(guards(&d).last().unwrap().0, "disarmed");
    f.sh(h, "rm -rf /srv/guard");
}
