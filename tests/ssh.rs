//! End to end against real OpenSSH servers with real Debian root file systems
//! (tests/fleet/fleet.sh): probing, converging, failure classes and retries.
//!
//! Each test owns the fleet hosts it touches, so tests run in parallel.

#[path = "support/fleet.rs"]
mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Desired, code, fleet, outcome, text};

fn inventory(hosts: &[&str]) -> String {
    let f = fleet();
    let mut s = String::from("hosts:\n");
    for h in hosts {
        s.push_str(&f.inventory_entry(h));
    }
    s
}

const FAST: &str = "probe_timeout: 5s\nretries: 2\nretry_backoff: 50ms\n";

#[test]
fn converges_files_directories_and_symlinks_over_ssh() {
    let f = fleet();
    f.sh("h1", "rm -rf /srv/conv");
    let host = r#"
resources:
  - kind: directory
    path: /srv/conv
    mode: "0750"
  - kind: file
    path: /srv/conv/app.conf
    content: "port = 8080\nname = 'x' $(not run)\n"
    mode: "0640"
    owner: root
    group: root
  - kind: directory
    path: /srv/conv/releases
  - kind: symlink
    path: /srv/conv/current
    target: /srv/conv/releases
"#;
    let d = Desired::new(FAST, &inventory(&["h1"]), &[("h1", host)]);
    let plan = d.tend(&["plan"]);
    assert_eq!(code(&plan), 2, "{}", text(&plan));

    let apply = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&apply), 0, "{}", text(&apply));
    let r = d.last_result();
    assert_eq!(outcome(&r, "h1")["outcome"], "Completed", "{r:#}");
    assert_eq!(outcome(&r, "h1")["dispatch_status"], "dispatched");

    // What the host says, through the system ssh client.
    assert_eq!(
        f.sh("h1", "cat /srv/conv/app.conf"),
        "port = 8080\nname = 'x' $(not run)\n"
    );
    assert_eq!(
        f.sh(
            "h1",
            "stat -c '%a %U %G %F' /srv/conv /srv/conv/app.conf /srv/conv/releases"
        ),
        "750 root root directory\n640 root root regular file\n755 root root directory\n"
    );
    assert_eq!(
        f.sh("h1", "readlink /srv/conv/current"),
        "/srv/conv/releases\n"
    );

    let again = d.tend(&["plan"]);
    assert_eq!(code(&again), 0, "{}", text(&again));

    // Drift by hand is planned and corrected.
    f.sh("h1", "chmod 600 /srv/conv/app.conf && echo tampered >> /srv/conv/app.conf && ln -sfn /tmp /srv/conv/current");
    let drift = d.tend(&["plan", "--json"]);
    assert_eq!(code(&drift), 2, "{}", text(&drift));
    let plan: Value = serde_json::from_slice(&drift.stdout).unwrap();
    let ids: Vec<&str> = plan["hosts"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["file:/srv/conv/app.conf", "symlink:/srv/conv/current"],
        "{plan:#}"
    );
    let fix = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&fix), 0, "{}", text(&fix));
    assert_eq!(
        f.sh(
            "h1",
            "stat -c %a /srv/conv/app.conf; readlink /srv/conv/current"
        ),
        "640\n/srv/conv/releases\n"
    );
}

#[test]
fn probe_reports_what_stat_says() {
    let f = fleet();
    f.sh(
        "h2",
        "rm -rf /srv/probe && mkdir -p /srv/probe/dir && chmod 2750 /srv/probe/dir \
         && printf 'hello\\n' > /srv/probe/file && chmod 604 /srv/probe/file \
         && ln -s '/target with space' /srv/probe/link",
    );
    let host = r#"
resources:
  - kind: directory
    path: /srv/probe/dir
  - kind: file
    path: /srv/probe/file
  - kind: symlink
    path: /srv/probe/link
    target: /x
  - kind: file
    path: /srv/probe/missing
"#;
    let d = Desired::new(FAST, &inventory(&["h2"]), &[("h2", host)]);
    let out = d.tend(&["probe", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let res = &doc["hosts"][0]["resources"];
    let stat = f.sh("h2", "stat -c '%a %u %g %s' /srv/probe/dir /srv/probe/file");
    // Mode is octal in stat's output; the rest decimal.
    let lines: Vec<Vec<u64>> = stat
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let mut v = vec![u64::from_str_radix(f[0], 8).unwrap()];
            v.extend(f[1..].iter().map(|n| n.parse::<u64>().unwrap()));
            v
        })
        .collect();
    let dir = &res["directory:/srv/probe/dir"];
    assert_eq!(dir["type"], "directory", "{doc:#}");
    assert_eq!(dir["mode"], lines[0][0]);
    assert_eq!(dir["uid"], lines[0][1]);
    let file = &res["file:/srv/probe/file"];
    assert_eq!(file["type"], "file");
    assert_eq!(file["mode"], lines[1][0]);
    assert_eq!(file["size"], lines[1][3]);
    let sha = f.sh("h2", "sha256sum < /srv/probe/file | cut -c1-64");
    assert_eq!(file["sha256"], sha.trim());
    let link = &res["symlink:/srv/probe/link"];
    assert_eq!(link["type"], "symlink");
    assert_eq!(link["target"], tend::core::hex(b"/target with space"));
    assert_eq!(res["file:/srv/probe/missing"]["type"], "absent");
    assert_eq!(doc["hosts"][0]["facts"]["os_id"], "debian");
}

#[test]
fn one_remote_command_per_host_per_probe() {
    let f = fleet();
    let mut resources = String::from("resources:\n");
    for i in 0..30 {
        resources.push_str(&format!(
            "  - kind: file\n    path: /srv/count/f{i}\n    content: \"{i}\\n\"\n"
        ));
    }
    let d = Desired::new(FAST, &inventory(&["h3"]), &[("h3", &resources)]);
    let before = (f.commands_started("h3"), f.connections("h3"));
    let out = d.tend(&["plan"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    support::wait_for("sshd to log the session", Duration::from_secs(5), || {
        f.commands_started("h3") > before.0
    });
    assert_eq!(
        f.commands_started("h3") - before.0,
        1,
        "one probe = one remote command"
    );
    assert_eq!(
        f.connections("h3") - before.1,
        1,
        "one probe = one connection"
    );
}

#[test]
fn a_dead_host_is_transport_unreachable_after_every_retry_and_others_converge() {
    let f = fleet();
    let live = ["h4", "h5", "h6", "h7"];
    let all = ["h4", "h5", "h6", "h7", "h8"];
    let body = "resources:\n  - kind: directory\n    path: /srv/five\n  - kind: file\n    path: /srv/five/ok\n    content: \"ok\\n\"\n";
    for h in live {
        f.sh(h, "rm -rf /srv/five");
    }
    let hosts: Vec<(&str, &str)> = all.iter().map(|h| (*h, body)).collect();
    let d = Desired::new(FAST, &inventory(&all), &hosts);
    let _down = f.stopped("h8");
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    let dead = outcome(&r, "h8");
    assert_eq!(dead["outcome"], "TransportUnreachable", "{r:#}");
    assert_eq!(dead["last_failure_class"], "Transient");
    assert_eq!(dead["attempt_count"], 3, "retries: 2 means three attempts");
    assert_eq!(dead["dispatch_status"], "not_dispatched");
    let msg = dead["last_failure_message"].as_str().unwrap();
    assert!(msg.contains("h8") && msg.contains("127.0.0.18"), "{msg}");
    for h in live {
        assert_eq!(outcome(&r, h)["outcome"], "Completed", "{h}: {r:#}");
        assert_eq!(f.sh(h, "cat /srv/five/ok"), "ok\n");
    }
    let status: Value =
        serde_json::from_slice(&std::fs::read(d.state().join("status/h8.json")).unwrap()).unwrap();
    let reachable = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Reachable")
        .unwrap();
    assert_eq!(reachable["status"], "False", "{status:#}");
}

#[test]
fn a_frozen_sshd_times_out_within_the_probe_timeout() {
    let f = fleet();
    let d = Desired::new(
        "probe_timeout: 1s\nretries: 1\nretry_backoff: 10ms\n",
        &inventory(&["h10"]),
        &[("h10", "resources: []\n")],
    );
    let _frozen = f.frozen("h10");
    let started = std::time::Instant::now();
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    let took = started.elapsed();
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    let o = outcome(&r, "h10");
    assert_eq!(o["outcome"], "TransportUnreachable", "{r:#}");
    assert_eq!(o["last_failure_class"], "Timeout");
    assert_eq!(o["attempt_count"], 2);
    // Two attempts of at most 1 s each, not a hang: a generous bound that
    // only a missing timeout could break.
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn a_wrong_pinned_host_key_is_refused_after_one_attempt() {
    let f = fleet();
    let inv = inventory(&["h2"]).replace(
        &f.host("h2").fingerprint,
        "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    );
    let d = Desired::new(FAST, &inv, &[("h2", "resources: []\n")]);
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    let o = outcome(&r, "h2");
    assert_eq!(o["outcome"], "PreflightFailed", "{r:#}");
    assert_eq!(o["last_failure_class"], "HostKey");
    assert_eq!(o["attempt_count"], 1);
    let msg = o["last_failure_message"].as_str().unwrap();
    assert!(
        msg.contains(&f.host("h2").fingerprint),
        "names the offered key: {msg}"
    );
}

#[test]
fn an_unknown_host_key_is_refused_and_known_hosts_is_honoured() {
    let f = fleet();
    // No pinned key: known_hosts decides. An empty one refuses...
    let inv = inventory(&["h2"]).replace(
        &format!("    host_key: \"{}\"\n", f.host("h2").fingerprint),
        "",
    );
    let empty = tempfile::NamedTempFile::new().unwrap();
    let cfg = format!("{FAST}known_hosts: {}\n", empty.path().display());
    let d = Desired::new(&cfg, &inv, &[("h2", "resources: []\n")]);
    let out = d.tend(&["plan"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unknown host key"),
        "{}",
        text(&out)
    );
    // ...and the fleet's accepts.
    let cfg = format!("{FAST}known_hosts: {}\n", f.known_hosts.display());
    let d = Desired::new(&cfg, &inv, &[("h2", "resources: []\n")]);
    let out = d.tend(&["plan"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
}

#[test]
fn a_wrong_identity_is_auth_after_one_attempt() {
    let f = fleet();
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("id_wrong");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let inv = inventory(&["h9"]).replace(&f.key.display().to_string(), &key.display().to_string());
    let d = Desired::new(FAST, &inv, &[("h9", "resources: []\n")]);
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    let o = outcome(&r, "h9");
    assert_eq!(o["outcome"], "PreflightFailed", "{r:#}");
    assert_eq!(o["last_failure_class"], "Auth");
    assert_eq!(o["attempt_count"], 1);
}

#[test]
fn a_missing_tool_is_a_capability_mismatch_not_a_crash() {
    let f = fleet();
    f.sh("h11", "[ -e /usr/bin/sha256sum ] || mv /usr/bin/sha256sum.off /usr/bin/sha256sum; mv /usr/bin/sha256sum /usr/bin/sha256sum.off");
    let d = Desired::new(
        FAST,
        &inventory(&["h11"]),
        &[(
            "h11",
            "resources:\n  - kind: file\n    path: /srv/cap\n    content: x\n",
        )],
    );
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    f.sh("h11", "mv /usr/bin/sha256sum.off /usr/bin/sha256sum");
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    let o = outcome(&r, "h11");
    assert_eq!(o["outcome"], "CapabilityMismatch", "{r:#}");
    assert_eq!(o["last_failure_class"], "Capability");
    assert_eq!(o["attempt_count"], 1, "a missing tool is not retried");
    assert!(
        o["last_failure_message"]
            .as_str()
            .unwrap()
            .contains("sha256sum"),
        "{r:#}"
    );
    assert_eq!(
        f.sh("h11", "[ -e /srv/cap ] && echo exists || echo absent"),
        "absent\n"
    );
}

#[test]
fn a_failing_step_is_execution_its_dependents_are_skipped_and_others_run() {
    let f = fleet();
    f.sh("h9", "rm -rf /srv/exec && mkdir -p /srv/exec");
    let host = r#"
resources:
  - kind: file
    id: broken
    path: /srv/exec/missing-parent/app.conf
    content: "x\n"
  - kind: symlink
    path: /srv/exec/link
    target: /srv/exec/missing-parent/app.conf
    requires: [broken]
  - kind: file
    path: /srv/exec/independent
    content: "ok\n"
"#;
    let d = Desired::new(FAST, &inventory(&["h9"]), &[("h9", host)]);
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    let o = outcome(&r, "h9");
    assert_eq!(o["outcome"], "PartialSuccess", "{r:#}");
    assert_eq!(o["last_failure_class"], "Execution");
    assert_eq!(r["execution_outcome"], "PartialSuccess");
    let status = |id: &str| {
        o["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status("broken"), "failed");
    assert_eq!(status("symlink:/srv/exec/link"), "skipped");
    assert_eq!(status("file:/srv/exec/independent"), "succeeded");
    assert_eq!(
        f.sh(
            "h9",
            "cat /srv/exec/independent; [ -L /srv/exec/link ] || echo nolink"
        ),
        "ok\nnolink\n"
    );
    // The failed step's log holds what the host said.
    let broken = o["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "broken")
        .unwrap();
    let log = std::fs::read_to_string(d.state().join(broken["log"].as_str().unwrap())).unwrap();
    assert!(log.contains("missing-parent"), "{log}");
}
