//! Dispatch on real SSH hosts, as the hardening round demands of it: big
//! applies, silent steps, bounded output, records that match what ran on
//! the host after `kill -9`, records before work, and a clean stop on
//! SIGINT. Hosts h70..h79.

#[path = "support/fleet.rs"]
mod support;

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{Desired, code, fleet, outcome, text, wait_for};

fn inventory(hosts: &[&str]) -> String {
    fleet().inventory(hosts)
}

const FAST: &str = "probe_timeout: 30s\nretries: 2\nretry_backoff: 50ms\n";

fn steps(r: &Value, host: &str) -> Vec<Value> {
    outcome(r, host)["steps"].as_array().unwrap().clone()
}

/// Class 13: 2,000 file changes in one apply. The batch once went out as
/// the SSH command string, which libssh2 refuses past about 34 KB.
#[test]
fn one_apply_creates_two_thousand_files() {
    let f = fleet();
    f.sh("h70", "rm -rf /srv/many");
    let mut host = String::from("resources:\n  - kind: directory\n    path: /srv/many\n");
    for i in 0..2000 {
        let _ = write!(
            host,
            "  - kind: file\n    path: /srv/many/f{i}\n    content: \"file {i}\\n\"\n"
        );
    }
    let d = Desired::new(FAST, &inventory(&["h70"]), &[("h70", &host)]);
    let apply = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&apply), 0, "{}", text(&apply));
    let r = d.last_result();
    assert_eq!(
        outcome(&r, "h70")["outcome"],
        "Completed",
        "{}",
        text(&apply)
    );
    assert_eq!(
        f.sh("h70", "ls /srv/many | wc -l; cat /srv/many/f1999"),
        "2000\nfile 1999\n"
    );
    let again = d.tend(&["plan"]);
    assert_eq!(code(&again), 0, "{}", text(&again));
}

/// Class 13: a step silent for longer than 15 s. A keepalive interval set
/// in libssh2 cut every blocking read short at the next keepalive ("Timed
/// out waiting on socket"), failing such steps although step_timeout was
/// minutes.
#[test]
fn a_step_silent_for_twenty_seconds_succeeds() {
    let host = r#"
resources:
  - kind: command
    name: slow
    run: "sleep 20; echo done"
    unless: "false"
"#;
    let d = Desired::new(FAST, &inventory(&["h71"]), &[("h71", host)]);
    let apply = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&apply), 0, "{}", text(&apply));
    let r = d.last_result();
    assert_eq!(outcome(&r, "h71")["outcome"], "Completed", "{r:#}");
}

/// Class 8: a step that prints 60 MB keeps a bounded log (head and tail,
/// with the count of bytes left out).
#[test]
fn a_flood_of_output_is_bounded() {
    let host = r#"
resources:
  - kind: command
    name: flood
    run: "echo FIRST; head -c 60000000 /dev/zero | tr '\\0' x; echo; echo LAST"
    unless: "false"
"#;
    let d = Desired::new(
        &format!("{FAST}step_output_limit: 65536\n"),
        &inventory(&["h72"]),
        &[("h72", host)],
    );
    let apply = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&apply), 0, "{}", text(&apply));
    let r = d.last_result();
    let log = steps(&r, "h72")[0]["log"].as_str().unwrap().to_string();
    let path = if log.starts_with('/') {
        std::path::PathBuf::from(&log)
    } else {
        d.state().join(&log)
    };
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() < 70_000, "log is {} bytes", bytes.len());
    let s = String::from_utf8_lossy(&bytes);
    assert!(s.starts_with("FIRST\n"), "{}", &s[..40]);
    assert!(s.trim_end().ends_with("LAST"));
    assert!(s.contains("bytes left out]"));
}

/// Class 6: `kill -9` of `tend apply` mid-batch. The next apply closes the
/// run as Interrupted, and its record shows every step the host ran: a step
/// whose marker exists on the host is recorded as started (succeeded, or
/// failed if its end was not recorded), never as not run.
#[test]
fn kill_9_mid_apply_leaves_a_record_of_what_ran() {
    let f = fleet();
    f.sh("h73", "rm -rf /srv/k9 && mkdir -p /srv/k9");
    let mut host = String::from("resources:\n");
    for i in 0..40 {
        let _ = write!(
            host,
            "  - kind: command\n    name: c{i:02}\n    run: \"sleep 0.3; touch /srv/k9/m{i:02}\"\n    creates: /srv/k9/m{i:02}\n"
        );
    }
    let d = Desired::new(FAST, &inventory(&["h73"]), &[("h73", &host)]);
    let mut child = d.spawn(
        &["apply", "--dispatch", "enforced"],
        Stdio::null(),
        Stdio::null(),
    );
    wait_for(
        "five steps to run on the host",
        Duration::from_secs(60),
        || {
            f.sh("h73", "ls /srv/k9 | wc -l")
                .trim()
                .parse::<u32>()
                .unwrap_or(0)
                >= 5
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let markers = || -> Vec<String> {
        f.sh("h73", "ls /srv/k9")
            .lines()
            .map(|m| format!("command:c{}", &m[1..]))
            .collect()
    };
    // What the host had done when tend died: each of these steps reported
    // its start at least 0.3 s before its marker, so the record must show
    // it. The orphaned batch may start one more step before it dies of its
    // pipe (its start report went into a connection nobody read any more):
    // that one may be recorded as not run, but never as succeeded.
    let ran = markers();
    assert!(ran.len() < 40, "the kill came too late to test anything");
    let mut after = markers();
    wait_for("the orphaned batch to end", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_secs(1));
        let now = markers();
        let settled = now == after;
        after = now;
        settled
    });

    let next = d.tend(&["apply", "--dispatch", "off"]);
    assert!(code(&next) != 1, "{}", text(&next));
    let runs: Vec<Value> = std::fs::read_dir(d.state().join("runs"))
        .unwrap()
        .map(|e| {
            serde_json::from_slice(&std::fs::read(e.unwrap().path().join("result.json")).unwrap())
                .unwrap()
        })
        .collect();
    let killed = runs
        .iter()
        .find(|r| {
            r["host_outcomes"][0]["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("interrupted")
        })
        .unwrap_or_else(|| panic!("no Interrupted run among {runs:#?}"));
    let o = &killed["host_outcomes"][0];
    assert_eq!(o["dispatch_status"], "dispatched", "{killed:#}");
    let steps = o["steps"].as_array().unwrap();
    for id in &ran {
        let s = steps
            .iter()
            .find(|s| s["id"] == id.as_str())
            .unwrap_or_else(|| {
                panic!("step {id} ran on the host but is not in the record: {killed:#}")
            });
        assert!(
            s["status"] == "succeeded" || s["status"] == "failed",
            "step {id} ran on the host but is recorded {}",
            s["status"]
        );
        assert!(s["attempts"].as_u64().unwrap() >= 1);
    }
    for s in steps.iter().filter(|s| s["status"] == "succeeded") {
        let id = s["id"].as_str().unwrap();
        assert!(
            after.iter().any(|r| r == id),
            "{id} recorded succeeded but never ran"
        );
    }
}

/// Class 6: SIGINT during `tend apply` finishes the running batch, sends
/// nothing more, and closes the run: steps left are not run, the host is
/// `PartialSuccess`, and so is the run; exit 4.
#[test]
fn sigint_mid_apply_closes_the_run() {
    let f = fleet();
    f.sh("h74", "rm -rf /srv/int && mkdir -p /srv/int");
    // A destructive command runs in a batch of its own, after the others:
    // the signal comes during the first batch.
    let host = r#"
resources:
  - kind: command
    name: slow
    run: "touch /srv/int/started; sleep 3; touch /srv/int/slow"
    unless: "false"
  - kind: command
    name: after
    run: "touch /srv/int/after"
    creates: /srv/int/after
    destructive: true
    requires: ["command:slow"]
"#;
    let d = Desired::new(FAST, &inventory(&["h74"]), &[("h74", host)]);
    // A first apply runs `slow` and holds `after` for a token.
    let first = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&first), 3, "{}", text(&first));
    let r = d.last_result();
    assert_eq!(outcome(&r, "h74")["outcome"], "EscalationRequired", "{r:#}");
    let st: Value =
        serde_json::from_slice(&std::fs::read(d.state().join("status/h74.json")).unwrap()).unwrap();
    let op = st["pending"]["awaiting_confirmation"]["operation"]
        .as_str()
        .or_else(|| st["awaiting_confirmation"]["operation"].as_str())
        .unwrap_or_else(|| panic!("no operation in {st:#}"))
        .to_string();
    let c = d.tend(&["confirm", &op, "--reason", "test"]);
    assert_eq!(code(&c), 0, "{}", text(&c));
    f.sh("h74", "rm -f /srv/int/*");
    let child = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--dir")
        .arg(d.dir())
        .args(["apply", "--dispatch", "enforced"])
        .env_remove("TEND_DISPATCH")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the slow step to start", Duration::from_secs(30), || {
        f.sh("h74", "ls /srv/int").contains("started")
    });
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    assert_eq!(r["execution_outcome"], "PartialSuccess", "{r:#}");
    assert_eq!(outcome(&r, "h74")["outcome"], "PartialSuccess", "{r:#}");
    let s = steps(&r, "h74");
    assert_eq!(s[0]["status"], "succeeded", "{r:#}");
    assert_eq!(s[1]["status"], "not_run", "{r:#}");
    assert_eq!(f.sh("h74", "ls /srv/int"), "slow\nstarted\n");
}

/// Class 7: with the state dir's file system filling up as the run begins,
/// nothing is sent: a step never runs without its record (the run could
/// begin, the records of its attempts could not be written).
#[test]
fn a_full_state_dir_dispatches_nothing() {
    let f = fleet();
    f.sh("h75", "rm -rf /srv/full");
    let mut host = String::from("resources:\n  - kind: directory\n    path: /srv/full\n");
    for i in 0..300 {
        let _ = write!(
            host,
            "  - kind: file\n    path: /srv/full/f{i}\n    content: \"{i}\\n\"\n"
        );
    }
    let d = Desired::new(FAST, &inventory(&["h75"]), &[("h75", &host)]);
    let state = d.state();
    std::fs::create_dir_all(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tendfull"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a small tmpfs (needs root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(state.clone());
    // A first run creates the database; then the disk is filled.
    let first = d.tend(&["apply", "--dispatch", "off"]);
    assert_eq!(code(&first), 2, "{}", text(&first));
    // Leave room for the run to begin (its row, a few events), not for the
    // records of 300 attempts: the disk fills up during dispatch.
    let filled = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "avail=$(df --output=avail -B4096 {0} | tail -1); dd if=/dev/zero of={0}/filler bs=4096 count=$((avail - 12)) 2>/dev/null; sync",
            state.display()
        ))
        .status()
        .unwrap();
    assert!(filled.success());
    let apply = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_ne!(code(&apply), 0, "{}", text(&apply));
    eprintln!("full state dir: {}", text(&apply));
    assert_eq!(
        f.sh("h75", "ls /srv/full 2>/dev/null | wc -l"),
        "0\n",
        "steps ran without their records: {}",
        text(&apply)
    );
}

/// Class 11: a `restart_on` restart whose trigger succeeded and which did
/// not succeed is owed: listed in status, `Converged=False` with reason
/// `RestartOwed`, and run by the next pass although nothing else changed,
/// until it succeeds. On systemd host s13: a drop-in refusing manual starts
/// makes the restart fail while the service stays active.
#[test]
fn a_failed_restart_is_owed_until_it_succeeds() {
    let f = support::systemd_fleet();
    let h = "s13";
    f.sh(
        h,
        "systemctl stop tend-owed.service 2>/dev/null; rm -rf /run/systemd/system/tend-owed.service.d /etc/tend-owed.conf; systemctl daemon-reload",
    );
    let body = |v: &str| {
        format!(
            "resources:
  - kind: file
    path: /etc/systemd/system/tend-owed.service
    content: \"[Service]\\nExecStart=/bin/sleep infinity\\n\"
  - kind: file
    path: /etc/tend-owed.conf
    content: \"{v}\\n\"
  - kind: service
    name: tend-owed
    running: true
    restart_on: [\"file:/etc/tend-owed.conf\"]
"
        )
    };
    let inv = format!("hosts:\n{}", f.inventory_entry(h));
    let d = Desired::new(FAST, &inv, &[(h, &body("1"))]);
    let apply = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&apply), 0, "{}", text(&apply));

    // The restart is refused; the service stays active.
    f.sh(
        h,
        "mkdir -p /run/systemd/system/tend-owed.service.d && printf '[Unit]\\nRefuseManualStart=yes\\n' > /run/systemd/system/tend-owed.service.d/refuse.conf && systemctl daemon-reload",
    );
    std::fs::write(d.dir().join(format!("hosts/{h}.yaml")), body("2")).unwrap();
    let apply = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&apply), 4, "{}", text(&apply));
    let status = |d: &Desired| -> Value {
        serde_json::from_slice(&std::fs::read(d.state().join(format!("status/{h}.json"))).unwrap())
            .unwrap()
    };
    let st = status(&d);
    assert_eq!(
        st["pending"]["restarts"],
        serde_json::json!(["service:tend-owed"]),
        "{st:#}"
    );
    let converged = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Converged")
        .unwrap()
        .clone();
    assert_eq!(
        (&converged["status"], &converged["reason"]),
        (&"False".into(), &"RestartOwed".into()),
        "{st:#}"
    );

    // Nothing else changes: the next plan still holds the owed restart.
    let plan = d.tend(&["plan"]);
    assert_eq!(code(&plan), 2, "{}", text(&plan));
    f.sh(
        h,
        "rm -rf /run/systemd/system/tend-owed.service.d && systemctl daemon-reload",
    );
    let before = f.sh(
        h,
        "systemctl show -p InvocationID --value tend-owed.service",
    );
    let apply = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&apply), 0, "{}", text(&apply));
    let after = f.sh(
        h,
        "systemctl show -p InvocationID --value tend-owed.service",
    );
    assert_ne!(before, after, "the owed restart ran");
    let st = status(&d);
    assert_eq!(st["pending"]["restarts"], serde_json::json!([]), "{st:#}");
    assert_eq!(d.tend(&["plan"]).status.code(), Some(0));
    f.sh(h, "systemctl stop tend-owed.service; rm -f /etc/systemd/system/tend-owed.service /etc/tend-owed.conf; systemctl daemon-reload");
}
