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
    fleet().inventory(hosts)
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
    // Mode is octal in stat's output (and in the JSON); the rest decimal.
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
    assert_eq!(dir["mode"], format!("{:04o}", lines[0][0]));
    assert_eq!(dir["uid"], lines[0][1]);
    let file = &res["file:/srv/probe/file"];
    assert_eq!(file["type"], "file");
    assert_eq!(file["mode"], format!("{:04o}", lines[1][0]));
    assert_eq!(file["size"], lines[1][3]);
    let sha = f.sh("h2", "sha256sum < /srv/probe/file | cut -c1-64");
    assert_eq!(file["sha256"], sha.trim());
    let link = &res["symlink:/srv/probe/link"];
    assert_eq!(link["type"], "symlink");
    assert_eq!(link["target"], "/target with space");
    assert_eq!(res["file:/srv/probe/missing"]["type"], "absent");
    assert_eq!(doc["hosts"][0]["facts"]["os_id"], "debian");
}

#[test]
fn one_remote_command_per_host_per_probe() {
    let f = fleet();
    // Files left by an earlier run (or anyone else) would leave nothing to plan.
    f.sh("h3", "rm -rf /srv/count");
    let mut resources = String::from("resources:\n");
    for i in 0..30 {
        resources.push_str(&format!(
            "  - kind: file\n    path: /srv/count/f{i}\n    content: \"{i}\\n\"\n"
        ));
    }
    let d = Desired::new(FAST, &inventory(&["h3"]), &[("h3", &resources)]);
    f.sh("h3", "rm -rf /srv/count");
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

    // Converging 30 files: the probe, the host lock (SPEC 8.7), then ONE
    // batch for every non-destructive step, over one connection.
    f.sh("h3", "rm -rf /srv/count && mkdir /srv/count");
    let before = (f.commands_started("h3"), f.connections("h3"));
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    support::wait_for("sshd to log both commands", Duration::from_secs(5), || {
        f.commands_started("h3") >= before.0 + 3
    });
    assert_eq!(
        f.commands_started("h3") - before.0,
        3,
        "probe + host lock + one batch"
    );
    assert_eq!(f.connections("h3") - before.1, 1, "the session is reused");
    assert_eq!(f.sh("h3", "cat /srv/count/f7"), "7\n");
    let r = d.last_result();
    assert_eq!(r["host_outcomes"][0]["steps"].as_array().unwrap().len(), 30);

    // A no-op converge: the probe and nothing else.
    let before = f.commands_started("h3");
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    support::wait_for("sshd to log the probe", Duration::from_secs(5), || {
        f.commands_started("h3") > before
    });
    assert_eq!(
        f.commands_started("h3") - before,
        1,
        "a no-op converge is one remote command"
    );
    assert_eq!(d.last_result()["host_outcomes"][0]["outcome"], "NoChange");
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

mod bytes_over_ssh {
    use std::time::Duration;

    use proptest::prelude::*;
    use tend::apply;
    use tend::transport::Transport;
    use tend::transport::ssh::{SshTarget, SshTransport};

    use super::support::{fleet, shell_quote};

    /// Path components that would do harm if anything reached a shell
    /// unquoted: quotes, substitutions, globs, newlines, leading dashes. No
    /// `/`: one component, in one existing directory.
    fn component() -> impl Strategy<Value = String> {
        let nasty = prop::sample::select(vec![
            "'",
            "\"",
            "$(touch tend-pwned)",
            "`touch tend-pwned`",
            "\n",
            " ",
            "-rf",
            "--",
            "*",
            "?",
            "[a]",
            "~",
            ";",
            "&",
            "|",
            "\\",
            "é",
            "日本",
            "\t",
            "$HOME",
            "a",
            "b",
        ]);
        prop::collection::vec(nasty, 1..5).prop_map(|parts| {
            let s = parts.concat();
            // `.` and `..` are not names a resource can have.
            if s == "." || s == ".." {
                format!("{s}x")
            } else {
                s
            }
        })
    }

    /// One session for every case, like a run.
    fn transport() -> &'static SshTransport {
        static T: std::sync::OnceLock<SshTransport> = std::sync::OnceLock::new();
        T.get_or_init(|| {
            let f = fleet();
            let h = f.host("h2");
            f.sh("h2", "mkdir -p /srv/bytes && rm -f /root/tend-pwned");
            SshTransport::new(SshTarget {
                host: "h2".into(),
                address: h.address.clone(),
                port: 22,
                user: "root".into(),
                identity: Some(f.key.clone()),
                host_key: Some(h.fingerprint.clone()),
                known_hosts: f.known_hosts.clone(),
                become_sudo: false,
                jump: None,
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn any_path_and_content_round_trip_exactly(
            name in component(),
            content in prop::collection::vec(any::<u8>(), 0..4096),
        ) {
            let f = fleet();
            let t = transport();
            let path = format!("/srv/bytes/{name}");
            let cmd = apply::write_file(&path, &content, None, None, None);
            let out = t.exec(&cmd.script, &cmd.stdin, Duration::from_secs(30)).unwrap();
            prop_assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
            // Read back through the system ssh client, not tend's transport;
            // a substitution would have run in root's home, the session's cwd.
            let p = shell_quote(&path);
            let back = f.ssh("h2", &format!("cat -- {p} && rm -f -- {p} && [ ! -e /root/tend-pwned ]"));
            prop_assert!(back.status.success(), "read back, or a name was executed: {}", String::from_utf8_lossy(&back.stderr));
            prop_assert_eq!(back.stdout, content);
        }
    }
}

#[test]
fn a_no_op_converge_of_five_hosts_with_thirty_resources_is_one_command_per_host() {
    let f = fleet();
    let hosts = ["h30", "h31", "h32", "h33", "h34"];
    let mut body = String::from("resources:\n  - kind: directory\n    path: /srv/noop\n");
    for i in 0..29 {
        body.push_str(&format!(
            "  - kind: file\n    path: /srv/noop/f{i}\n    content: \"{i}\\n\"\n    mode: \"0640\"\n"
        ));
    }
    let files: Vec<(&str, &str)> = hosts.iter().map(|h| (*h, body.as_str())).collect();
    let d = Desired::new(FAST, &inventory(&hosts), &files);
    for h in hosts {
        f.sh(h, "rm -rf /srv/noop");
    }
    let first = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&first), 0, "{}", text(&first));
    let before: Vec<usize> = hosts.iter().map(|h| f.commands_started(h)).collect();
    let again = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&again), 0, "{}", text(&again));
    let r = d.last_result();
    for (h, b) in hosts.iter().zip(&before) {
        assert_eq!(outcome(&r, h)["outcome"], "NoChange", "{r:#}");
        support::wait_for("sshd to log the probe", Duration::from_secs(5), || {
            f.commands_started(h) > *b
        });
        assert_eq!(
            f.commands_started(h) - b,
            1,
            "{h}: a no-op converge is one remote command"
        );
    }
}

// ---- users, groups, packages and commands (h12..h16) ------------------------

/// The steps of a host's plan in `tend plan --json`.
fn plan_steps(d: &Desired, host: &str) -> (i32, Vec<Value>) {
    let out = d.tend(&["plan", "--json"]);
    let plan: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("plan --json: {e}\n{}", text(&out)));
    let hp = plan["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("no plan for {host}: {plan:#}"))
        .clone();
    assert!(hp["error"].is_null(), "{hp:#}");
    (code(&out), hp["steps"].as_array().unwrap().clone())
}

/// `(id, action, destructive, [changed fields])` of each step.
fn summary(steps: &[Value]) -> Vec<(String, String, bool, Vec<String>)> {
    steps
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["action"].as_str().unwrap().to_string(),
                s["destructive"].as_bool().unwrap(),
                s["fields"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f["field"].as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn step(
    id: &str,
    action: &str,
    destructive: bool,
    fields: &[&str],
) -> (String, String, bool, Vec<String>) {
    (
        id.into(),
        action.into(),
        destructive,
        fields.iter().map(|f| f.to_string()).collect(),
    )
}

/// Applies in enforced mode; returns the exit code, the host's outcome and
/// the remote commands the apply started on the host (probe included).
fn apply_counting(d: &Desired, host: &str) -> (i32, Value, usize) {
    let f = fleet();
    let before = f.commands_started(host);
    let runs = d.run_ids();
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    support::wait_for("sshd to log the sessions", Duration::from_secs(5), || {
        f.commands_started(host) > before
    });
    // sshd logs a session as it starts it; every one has started by now.
    std::thread::sleep(Duration::from_millis(200));
    let new: Vec<String> = d.run_ids().difference(&runs).cloned().collect();
    assert_eq!(new.len(), 1, "one new run: {new:?}\n{}", text(&out));
    let r = d.result(&new[0]);
    (
        code(&out),
        outcome(&r, host).clone(),
        f.commands_started(host) - before,
    )
}

/// A re-apply of a converged host is NoChange and runs only the probe.
fn assert_converged(d: &Desired, host: &str) {
    let (code, o, commands) = apply_counting(d, host);
    assert_eq!(code, 0, "{o:#}");
    assert_eq!(o["outcome"], "NoChange", "{o:#}");
    assert_eq!(o["dispatch_status"], "not_dispatched", "{o:#}");
    assert_eq!(commands, 1, "only the probe ran");
}

/// A desired state whose only change is a held destructive delete: planned
/// as such, `apply` exits 3 with EscalationRequired, and nothing runs.
fn assert_delete_held(d: &Desired, host: &str, id: &str) {
    let (plan_code, steps) = plan_steps(d, host);
    assert_eq!(plan_code, 2);
    let got: Vec<(String, String, bool)> = summary(&steps)
        .into_iter()
        .map(|(id, action, destructive, _)| (id, action, destructive))
        .collect();
    assert_eq!(got, [(id.to_string(), "delete".to_string(), true)]);
    let (code, o, commands) = apply_counting(d, host);
    assert_eq!(code, 3, "{o:#}");
    assert_eq!(o["outcome"], "EscalationRequired", "{o:#}");
    assert_eq!(commands, 1, "only the probe ran");
}

#[test]
fn users_converge_and_drift_is_corrected() {
    let f = fleet();
    let h = "h12";
    f.sh(h, "userdel tkapp 2>/dev/null; groupdel tkweb 2>/dev/null; groupdel tkapp 2>/dev/null; rm -rf /srv/tkapp; true");
    let host = |state: &str| {
        format!(
            r#"
resources:
  - kind: group
    name: tkweb
  - kind: user
    name: tkapp
    uid: 1600
    home: /srv/tkapp
    shell: /bin/sh
    groups: [tkweb, adm]
    state: {state}
"#
        )
    };
    let d = Desired::new(FAST, &inventory(&[h]), &[(h, &host("present"))]);
    let (plan_code, steps) = plan_steps(&d, h);
    assert_eq!(plan_code, 2);
    assert_eq!(
        summary(&steps),
        [
            step("group:tkweb", "create", false, &["exists"]),
            step(
                "user:tkapp",
                "create",
                false,
                &["uid", "home", "shell", "groups"]
            ),
        ]
    );
    let (code, o, commands) = apply_counting(&d, h);
    assert_eq!(code, 0, "{o:#}");
    assert_eq!(o["outcome"], "Completed", "{o:#}");
    assert_eq!(
        commands, 3,
        "the probe, the host lock and one batch for both steps"
    );
    assert_eq!(
        f.sh(
            h,
            "getent passwd tkapp | cut -d: -f1,3,6,7; id -nG tkapp; stat -c %U /srv/tkapp"
        ),
        "tkapp:1600:/srv/tkapp:/bin/sh\ntkapp adm tkweb\ntkapp\n"
    );
    assert_converged(&d, h);

    // Drift by hand: another shell, no supplementary groups.
    f.sh(h, "usermod -s /bin/bash -G '' tkapp");
    let (plan_code, steps) = plan_steps(&d, h);
    assert_eq!(plan_code, 2);
    assert_eq!(
        summary(&steps),
        [step("user:tkapp", "update", false, &["shell", "groups"])]
    );
    assert_eq!(steps[0]["fields"][0]["from"], "/bin/bash");
    assert_eq!(steps[0]["fields"][1]["from"], "(none)");
    assert_eq!(steps[0]["fields"][1]["to"], "adm,tkweb");
    let (code, o, _) = apply_counting(&d, h);
    assert_eq!(code, 0, "{o:#}");
    assert_eq!(
        f.sh(h, "getent passwd tkapp | cut -d: -f7; id -nG tkapp"),
        "/bin/sh\ntkapp adm tkweb\n"
    );
    assert_converged(&d, h);

    // Removal is destructive: held until the token gate exists.
    let gone = Desired::new(FAST, &inventory(&[h]), &[(h, &host("absent"))]);
    assert_delete_held(&gone, h, "user:tkapp");
    assert_eq!(f.sh(h, "getent passwd tkapp | cut -d: -f1"), "tkapp\n");
    // The removal that step would run, by hand (no token gate yet): the
    // account goes, its home stays; gone already is fine.
    let rm = tend::apply::delete_user("tkapp");
    f.sh(h, &rm.script);
    f.sh(h, &rm.script);
    assert_eq!(
        f.sh(h, "getent passwd tkapp || echo gone; stat -c %u /srv/tkapp"),
        "gone\n1600\n"
    );
}

#[test]
fn groups_converge_and_drift_is_corrected() {
    let f = fleet();
    let h = "h13";
    f.sh(
        h,
        "groupdel tkops 2>/dev/null; groupdel tkdev 2>/dev/null; true",
    );
    let host = |state: &str| {
        format!(
            "resources:\n  - kind: group\n    name: tkops\n    gid: 2345\n    state: {state}\n  - kind: group\n    name: tkdev\n"
        )
    };
    let d = Desired::new(FAST, &inventory(&[h]), &[(h, &host("present"))]);
    let (plan_code, steps) = plan_steps(&d, h);
    assert_eq!(plan_code, 2);
    assert_eq!(
        summary(&steps),
        [
            step("group:tkdev", "create", false, &["exists"]),
            step("group:tkops", "create", false, &["gid"]),
        ]
    );
    let (code, o, _) = apply_counting(&d, h);
    assert_eq!(code, 0, "{o:#}");
    assert_eq!(
        f.sh(h, "getent group tkops | cut -d: -f1,3"),
        "tkops:2345\n"
    );
    assert_converged(&d, h);

    f.sh(h, "groupmod -g 2400 tkops");
    let (_, steps) = plan_steps(&d, h);
    assert_eq!(
        summary(&steps),
        [step("group:tkops", "update", false, &["gid"])]
    );
    assert_eq!(steps[0]["fields"][0]["from"], "2400");
    assert_eq!(steps[0]["fields"][0]["to"], "2345");
    let (code, o, _) = apply_counting(&d, h);
    assert_eq!(code, 0, "{o:#}");
    assert_eq!(f.sh(h, "getent group tkops | cut -d: -f3"), "2345\n");
    assert_converged(&d, h);

    let gone = Desired::new(FAST, &inventory(&[h]), &[(h, &host("absent"))]);
    assert_delete_held(&gone, h, "group:tkops");
    assert_eq!(f.sh(h, "getent group tkops | cut -d: -f1"), "tkops\n");
    let rm = tend::apply::delete_group("tkops");
    f.sh(h, &rm.script);
    f.sh(h, &rm.script);
    assert_eq!(f.sh(h, "getent group tkops || echo gone"), "gone\n");
}

#[test]
fn packages_install_in_one_call_from_the_hosts_apt() {
    let f = fleet();
    let h = "h14";
    // A host without package lists: the install fails once, apt-get update
    // runs, the install is retried in the same step.
    f.sh(
        h,
        "dpkg --purge hello tree >/dev/null 2>&1; rm -rf /var/lib/apt/lists/*; true",
    );
    let host = |tree: &str| {
        format!(
            "resources:\n  - kind: package\n    name: hello\n  - kind: package\n    name: tree\n    state: {tree}\n"
        )
    };
    let slow = "probe_timeout: 10s\nretries: 0\nstep_timeout: 5m\n";
    let d = Desired::new(slow, &inventory(&[h]), &[(h, &host("present"))]);
    let (plan_code, steps) = plan_steps(&d, h);
    assert_eq!(plan_code, 2);
    assert_eq!(
        summary(&steps),
        [
            step("package:hello", "create", false, &["installed"]),
            step("package:tree", "create", false, &["installed"]),
        ]
    );
    let (code, o, commands) = apply_counting(&d, h);
    assert_eq!(code, 0, "{o:#}");
    assert_eq!(o["outcome"], "Completed", "{o:#}");
    assert_eq!(
        commands, 3,
        "the probe, the host lock and ONE apt-get call for both packages"
    );
    assert_eq!(
        f.sh(h, "dpkg-query -W -f '${Package} ${Status}\\n' hello tree"),
        "hello install ok installed\ntree install ok installed\n"
    );
    // Both steps logged the one call's output, the retry included.
    for s in o["steps"].as_array().unwrap() {
        assert_eq!(s["status"], "succeeded", "{o:#}");
        let log = std::fs::read_to_string(d.state().join(s["log"].as_str().unwrap())).unwrap();
        assert!(log.contains("updating the package lists once"), "{log}");
        assert!(
            log.contains("Setting up hello") && log.contains("Setting up tree"),
            "{log}"
        );
    }
    assert_converged(&d, h);

    // Removed by hand: planned and installed again.
    f.sh(h, "dpkg -r hello >/dev/null");
    let (_, steps) = plan_steps(&d, h);
    assert_eq!(
        summary(&steps),
        [step("package:hello", "create", false, &["installed"])]
    );
    let (code, o, commands) = apply_counting(&d, h);
    assert_eq!((code, commands), (0, 3), "probe, host lock, batch: {o:#}");
    assert_eq!(
        f.sh(h, "dpkg-query -W -f '${Status}\\n' hello"),
        "install ok installed\n"
    );
    assert_converged(&d, h);

    // `state: absent` is a destructive delete, held.
    let gone = Desired::new(slow, &inventory(&[h]), &[(h, &host("absent"))]);
    assert_delete_held(&gone, h, "package:tree");
    assert_eq!(
        f.sh(h, "dpkg-query -W -f '${Status}\\n' tree"),
        "install ok installed\n"
    );

    // The removal that step would run (no token gate yet, so run its script
    // by hand): it removes what it names, and refuses to take along a
    // package that was not named (python3 depends on python3.11).
    use tend::apply::{PackageManager, remove_packages};
    let rm = remove_packages(PackageManager::Apt, &["tree"]);
    f.sh(h, &rm.script);
    assert_eq!(
        f.sh(h, "dpkg-query -W -f '${Status}\\n' tree 2>/dev/null; true"),
        ""
    );
    let rm = remove_packages(PackageManager::Apt, &["python3.11"]);
    let out = f.ssh(h, &rm.script);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tend: not removing python3.11: apt would also remove python3; declare those absent too\n"
    );
    assert_eq!(
        f.sh(h, "dpkg-query -W -f '${Status}\\n' python3.11 python3"),
        "install ok installed\ninstall ok installed\n"
    );
}

#[test]
fn commands_run_only_when_their_guard_says_so() {
    let f = fleet();
    let h = "h15";
    f.sh(h, "rm -rf /srv/cmd && mkdir -p /srv/cmd");
    let base = r#"
resources:
  - kind: command
    name: once
    run: "echo hello-from-once; echo ran >> /srv/cmd/once.log; touch /srv/cmd/once.done"
    creates: /srv/cmd/once.done
  - kind: command
    name: never
    run: "touch /srv/cmd/never"
    unless: "test -d /srv/cmd"
"#;
    let d = Desired::new(FAST, &inventory(&[h]), &[(h, base)]);
    // probe --json says what each guard found; plan --json lists only what runs.
    let out = d.tend(&["probe", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let res = &doc["hosts"][0]["resources"];
    assert_eq!(res["command:once"]["type"], "guard");
    assert_eq!(res["command:once"]["will_run"], true);
    assert_eq!(res["command:once"]["creates_exists"], false);
    assert_eq!(res["command:never"]["will_run"], false);
    assert_eq!(res["command:never"]["unless_status"], 0);
    let (plan_code, steps) = plan_steps(&d, h);
    assert_eq!(plan_code, 2);
    assert_eq!(
        summary(&steps),
        [step("command:once", "create", false, &["run"])]
    );
    assert_eq!(
        steps[0]["note"],
        "will run: `/srv/cmd/once.done` does not exist"
    );

    let (code, o, _) = apply_counting(&d, h);
    assert_eq!(code, 0, "{o:#}");
    let s = &o["steps"][0];
    let log = std::fs::read_to_string(d.state().join(s["log"].as_str().unwrap())).unwrap();
    assert!(
        log.contains("hello-from-once"),
        "the command's output is its step log: {log}"
    );
    // Once, not again.
    assert_converged(&d, h);
    assert_eq!(
        f.sh(
            h,
            "cat /srv/cmd/once.log; [ -e /srv/cmd/never ] || echo never-ran"
        ),
        "ran\nnever-ran\n"
    );

    // A destructive command waits for a token; a slow one is stopped by
    // its timeout and fails.
    let more = format!(
        "{base}  - kind: command\n    name: wipe\n    run: \"touch /srv/cmd/wiped\"\n    creates: /srv/cmd/wiped\n    destructive: true\n"
    );
    let d = Desired::new(FAST, &inventory(&[h]), &[(h, &more)]);
    let (_, steps) = plan_steps(&d, h);
    assert_eq!(
        summary(&steps),
        [step("command:wipe", "create", true, &["run"])]
    );
    let (code, o, _) = apply_counting(&d, h);
    assert_eq!(code, 3, "{o:#}");
    assert_eq!(o["outcome"], "EscalationRequired", "{o:#}");
    let slow = format!(
        "{base}  - kind: command\n    name: slow\n    run: \"sleep 60\"\n    timeout: 1s\n"
    );
    let d = Desired::new(FAST, &inventory(&[h]), &[(h, &slow)]);
    let started = std::time::Instant::now();
    let (code, o, _) = apply_counting(&d, h);
    assert_eq!(code, 4, "{o:#}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(o["outcome"], "ExecutionFailed", "{o:#}");
    let msg = o["last_failure_message"].as_str().unwrap();
    assert!(
        msg.contains("status 124") && msg.contains("timed out after 1s"),
        "{msg}"
    );
    assert_eq!(
        f.sh(h, "cat /srv/cmd/once.log; ls /srv/cmd"),
        "ran\nonce.done\nonce.log\n"
    );
}

#[test]
fn packages_on_a_host_without_a_package_manager_are_a_capability_mismatch() {
    let f = fleet();
    let h = "h16";
    f.sh(h, "[ -e /usr/bin/apt-get ] || mv /usr/bin/apt-get.off /usr/bin/apt-get; mv /usr/bin/apt-get /usr/bin/apt-get.off");
    let d = Desired::new(
        FAST,
        &inventory(&[h]),
        &[(h, "resources:\n  - kind: package\n    name: hello\n")],
    );
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    f.sh(h, "mv /usr/bin/apt-get.off /usr/bin/apt-get");
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    let o = outcome(&r, h);
    assert_eq!(o["outcome"], "CapabilityMismatch", "{r:#}");
    assert_eq!(o["last_failure_class"], "Capability");
    assert_eq!(o["attempt_count"], 1);
    let msg = o["last_failure_message"].as_str().unwrap();
    assert!(msg.contains("no package manager"), "{msg}");
}
