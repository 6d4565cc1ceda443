//! End to end against real systemd: `service` resources on the
//! systemd-nspawn hosts of the test fleet (`tests/fleet/fleet.sh
//! up-systemd`), each with systemd as PID 1 and its own sshd.
//!
//! Each test owns the host it changes (s1..s4, s17), so tests run in parallel;
//! every test first puts its units back the way the fleet made them.

#[path = "support/fleet.rs"]
mod support;

use serde_json::Value;
use support::{Desired, Fleet, code, outcome, systemd_fleet, text};

const FAST: &str = "probe_timeout: 10s\nretries: 2\nretry_backoff: 50ms\n";

fn desired(f: &Fleet, host: &str, body: &str) -> Desired {
    let inventory = format!("hosts:\n{}", f.inventory_entry(host));
    Desired::new(FAST, &inventory, &[(host, body)])
}

/// `systemctl show -p PROPS --value UNIT`, one value per line.
fn show(f: &Fleet, host: &str, props: &str, unit: &str) -> String {
    f.sh(host, &format!("systemctl show -p {props} --value {unit}"))
}

/// ActiveState and UnitFileState of tend-demo, e.g. `inactive disabled`.
fn demo(f: &Fleet, host: &str) -> String {
    show(f, host, "ActiveState,UnitFileState", "tend-demo.service")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The demo unit as the fleet ships it: stopped and disabled.
fn reset_demo(f: &Fleet, host: &str) {
    f.sh(host, "systemctl disable --now tend-demo.service 2>/dev/null; systemctl reset-failed tend-demo.service 2>/dev/null; true");
    assert_eq!(demo(f, host), "inactive disabled");
}

fn apply(d: &Desired) -> (i32, Value) {
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    let c = code(&out);
    assert!([0, 3, 4].contains(&c), "apply exited {c}: {}", text(&out));
    (c, d.last_result())
}

fn plan_json(d: &Desired) -> (i32, Value) {
    let out = d.tend(&["plan", "--json"]);
    (
        code(&out),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
    )
}

/// (id, action, destructive, status) of every step of a host outcome.
fn steps(o: &Value) -> Vec<(String, String, bool, String)> {
    o["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["action"].as_str().unwrap().to_string(),
                s["destructive"].as_bool().unwrap(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn step(id: &str, action: &str, destructive: bool, status: &str) -> (String, String, bool, String) {
    (id.into(), action.into(), destructive, status.into())
}

#[test]
fn starts_a_stopped_unit_and_probes_it() {
    let f = systemd_fleet();
    reset_demo(f, "s1");
    let d = desired(
        f,
        "s1",
        "resources:\n  - kind: service\n    name: tend-demo\n    enabled: false\n",
    );
    let probe = d.tend(&["probe", "--json"]);
    assert_eq!(code(&probe), 0, "{}", text(&probe));
    let doc: Value = serde_json::from_slice(&probe.stdout).unwrap();
    let host = &doc["hosts"][0];
    assert_eq!(host["facts"]["init"], "systemd", "{doc:#}");
    assert_eq!(
        host["resources"]["service:tend-demo"],
        serde_json::json!({
            "type": "service",
            "unit": "tend-demo.service",
            "load_state": "loaded",
            "active_state": "inactive",
            "unit_file_state": "disabled",
        })
    );

    // Starting is a non-destructive update: planned, then run.
    let (c, plan) = plan_json(&d);
    assert_eq!(c, 2, "{plan:#}");
    let s = &plan["hosts"][0]["steps"][0];
    assert_eq!(
        (&s["action"], &s["destructive"], &s["fields"][0]["field"]),
        (&"update".into(), &false.into(), &"running".into()),
        "{plan:#}"
    );
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    let o = outcome(&r, "s1");
    assert_eq!(o["outcome"], "Completed", "{r:#}");
    assert_eq!(
        steps(o),
        [step("service:tend-demo", "update", false, "succeeded")]
    );
    assert_eq!(demo(f, "s1"), "active disabled");

    // Converged: nothing left to do.
    let (c, r) = apply(&d);
    assert_eq!(c, 0);
    assert_eq!(outcome(&r, "s1")["outcome"], "NoChange", "{r:#}");
    reset_demo(f, "s1");
}

#[test]
fn stopping_a_running_unit_waits_for_confirmation() {
    let f = systemd_fleet();
    reset_demo(f, "s2");
    f.sh("s2", "systemctl enable --now tend-demo.service 2>/dev/null");
    let before = show(f, "s2", "InvocationID", "tend-demo.service");
    let d = desired(
        f,
        "s2",
        "resources:\n  - kind: service\n    name: tend-demo\n    running: false\n",
    );
    let (c, plan) = plan_json(&d);
    assert_eq!(c, 2, "{plan:#}");
    let h = &plan["hosts"][0];
    assert_eq!(h["destructive"], 1, "{plan:#}");
    assert_eq!(h["barrier"], 0, "{plan:#}");
    assert!(plan["operation"].is_string(), "{plan:#}");

    let (c, r) = apply(&d);
    assert_eq!(c, 3, "{r:#}");
    let o = outcome(&r, "s2");
    assert_eq!(o["outcome"], "EscalationRequired", "{r:#}");
    assert_eq!(
        steps(o),
        [step("service:tend-demo", "update", true, "not_run")]
    );
    // Still the same running process.
    assert_eq!(demo(f, "s2"), "active enabled");
    assert_eq!(show(f, "s2", "InvocationID", "tend-demo.service"), before);

    // Disabling is destructive too; enabling while stopping is one step,
    // held as a whole.
    let d = desired(
        f,
        "s2",
        "resources:\n  - kind: service\n    name: tend-demo\n    enabled: false\n",
    );
    let (c, r) = apply(&d);
    assert_eq!(c, 3, "{r:#}");
    assert_eq!(demo(f, "s2"), "active enabled");
    reset_demo(f, "s2");
}

#[test]
fn enables_a_disabled_unit_and_refuses_a_missing_one() {
    let f = systemd_fleet();
    reset_demo(f, "s3");
    let d = desired(
        f,
        "s3",
        "resources:\n  - kind: service\n    name: tend-demo.service\n    running: false\n",
    );
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(
        steps(outcome(&r, "s3")),
        [step(
            "service:tend-demo.service",
            "update",
            false,
            "succeeded"
        )]
    );
    assert_eq!(demo(f, "s3"), "inactive enabled");
    let (c, r) = apply(&d);
    assert_eq!((c, &outcome(&r, "s3")["outcome"]), (0, &"NoChange".into()));

    // A unit the host does not have, and nothing in the desired state
    // provides: refused at plan time, nothing runs.
    let d = desired(
        f,
        "s3",
        "resources:\n  - kind: service\n    name: tend-no-such-unit\n  - kind: file\n    path: /etc/tend-never-written\n    content: x\n",
    );
    let plan = d.tend(&["plan"]);
    assert_eq!(code(&plan), 1, "{}", text(&plan));
    let (c, r) = apply(&d);
    assert_eq!(c, 4, "{r:#}");
    let o = outcome(&r, "s3");
    assert_eq!(o["outcome"], "CapabilityMismatch", "{r:#}");
    assert_eq!(o["last_failure_class"], "Capability");
    let msg = o["last_failure_message"].as_str().unwrap();
    assert!(
        msg.contains("unit `tend-no-such-unit.service` does not exist on the host"),
        "{msg}"
    );
    f.sh("s3", "test ! -e /etc/tend-never-written");
    reset_demo(f, "s3");
}

#[test]
fn a_unit_file_in_the_same_run_provides_its_service() {
    let f = systemd_fleet();
    f.sh(
        "s17",
        "systemctl disable --now tend-new.service 2>/dev/null; rm -f /etc/systemd/system/tend-new.service; systemctl daemon-reload",
    );
    let unit = "[Unit]\\nDescription=made by tend\\n[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n";
    let d = desired(
        f,
        "s17",
        &format!(
            "resources:\n  - kind: service\n    name: tend-new\n  - kind: file\n    path: /etc/systemd/system/tend-new.service\n    content: \"{unit}\"\n"
        ),
    );
    let (c, plan) = plan_json(&d);
    assert_eq!(c, 2, "{plan:#}");
    let svc = &plan["hosts"][0]["steps"][1];
    assert_eq!(svc["id"], "service:tend-new", "{plan:#}");
    assert_eq!(svc["after"], serde_json::json!([0]), "{plan:#}");
    assert_eq!(svc["daemon_reload"], true, "{plan:#}");
    assert!(
        svc["note"]
            .as_str()
            .unwrap()
            .contains("provides it in this run"),
        "{plan:#}"
    );
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(
        show(
            f,
            "s17",
            "ActiveState,UnitFileState,Description",
            "tend-new.service"
        ),
        "made by tend\nactive\nenabled\n"
    );
    let (c, r) = apply(&d);
    assert_eq!((c, &outcome(&r, "s17")["outcome"]), (0, &"NoChange".into()));
    f.sh(
        "s17",
        "systemctl disable --now tend-new.service; rm -f /etc/systemd/system/tend-new.service; systemctl daemon-reload",
    );
}

/// How often systemd started tend-demo so far, and its current invocation.
fn starts(f: &Fleet, host: &str) -> (usize, String) {
    let n = f
        .sh(
            host,
            "journalctl -q -u tend-demo.service -o cat --no-pager | grep -c '^Started' || true",
        )
        .trim()
        .parse()
        .unwrap();
    (n, show(f, host, "InvocationID", "tend-demo.service"))
}

#[test]
fn restart_on_restarts_once_when_a_trigger_changes() {
    let f = systemd_fleet();
    reset_demo(f, "s4");
    f.sh("s4", "rm -rf /etc/tend-demo");
    // `extra` adds a trigger that always fails (its directory is not there).
    let body = |a: &str, b: &str, other: &str, extra: Option<&str>| {
        let mut s = format!(
            "resources:
  - kind: directory
    path: /etc/tend-demo
  - kind: file
    path: /etc/tend-demo/a.conf
    content: \"{a}\"
  - kind: file
    path: /etc/tend-demo/b.conf
    content: \"{b}\"
  - kind: file
    path: /etc/tend-demo/unrelated.conf
    content: \"{other}\"
  - kind: service
    name: tend-demo
    restart_on: [\"file:/etc/tend-demo/a.conf\", \"file:/etc/tend-demo/b.conf\"{}]
",
            if extra.is_some() {
                ", \"file:/etc/tend-demo/no/c.conf\""
            } else {
                ""
            }
        );
        if let Some(c) = extra {
            s.push_str(&format!(
                "  - kind: file\n    path: /etc/tend-demo/no/c.conf\n    content: \"{c}\"\n"
            ));
        }
        s
    };
    // The service's steps in a host outcome: (action, status).
    let service_steps = |o: &Value| -> Vec<(String, String)> {
        o["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["id"] == "service:tend-demo")
            .map(|s| {
                (
                    s["action"].as_str().unwrap().to_string(),
                    s["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let one = |action: &str, status: &str| vec![(action.to_string(), status.to_string())];

    // First run: the files are created, then the service is enabled and
    // started with what they hold: no restart on top.
    let d = desired(f, "s4", &body("1", "1", "1", None));
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(service_steps(outcome(&r, "s4")), one("update", "succeeded"));
    assert_eq!(demo(f, "s4"), "active enabled");
    let (n0, id0) = starts(f, "s4");

    // Unchanged: no change, no restart.
    let (c, r) = apply(&d);
    assert_eq!((c, &outcome(&r, "s4")["outcome"]), (0, &"NoChange".into()));
    assert_eq!(starts(f, "s4"), (n0, id0.clone()));

    // Only a file it does not restart on changes: no restart.
    let d = desired(f, "s4", &body("1", "1", "2", None));
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(service_steps(outcome(&r, "s4")), vec![]);
    assert_eq!(starts(f, "s4"), (n0, id0.clone()));

    // Both triggers change: ONE restart, after both, an `update` in
    // result.json; in the plan it names the steps it waits on.
    let d = desired(f, "s4", &body("2", "2", "2", None));
    let (c, plan) = plan_json(&d);
    assert_eq!(c, 2, "{plan:#}");
    let psteps = plan["hosts"][0]["steps"].as_array().unwrap();
    assert_eq!(psteps.len(), 3, "{plan:#}");
    let restart = &psteps[2];
    assert_eq!(restart["id"], "service:tend-demo", "{plan:#}");
    assert_eq!(restart["fields"][0]["field"], "restart", "{plan:#}");
    assert_eq!(restart["triggers"], serde_json::json!([0, 1]), "{plan:#}");
    assert_eq!(restart["after"], restart["triggers"], "{plan:#}");
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(service_steps(outcome(&r, "s4")), one("update", "succeeded"));
    let (n1, id1) = starts(f, "s4");
    assert_eq!(n1, n0 + 1, "started exactly once more");
    assert_ne!(id1, id0);
    assert_eq!(
        f.sh("s4", "cat /etc/tend-demo/a.conf /etc/tend-demo/b.conf"),
        "22"
    );
    let (c, r) = apply(&d);
    assert_eq!((c, &outcome(&r, "s4")["outcome"]), (0, &"NoChange".into()));
    assert_eq!(starts(f, "s4"), (n1, id1.clone()));

    // Drift and a trigger change at once: the service's own step (enable)
    // and its restart, two steps with one id, both `update`.
    f.sh("s4", "systemctl disable tend-demo.service 2>/dev/null");
    let d = desired(f, "s4", &body("3", "2", "2", None));
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    let both = vec![
        ("update".to_string(), "succeeded".to_string()),
        ("update".to_string(), "succeeded".to_string()),
    ];
    assert_eq!(service_steps(outcome(&r, "s4")), both, "{r:#}");
    assert_eq!(demo(f, "s4"), "active enabled");
    let (n2, id2) = starts(f, "s4");
    assert_eq!(n2, n1 + 1);
    assert_ne!(id2, id1);

    // One trigger changes and another fails: the change that landed still
    // reaches the service.
    let (n1, id1) = (n2, id2);
    let d = desired(f, "s4", &body("4", "2", "2", Some("x")));
    let (c, r) = apply(&d);
    assert_eq!(c, 4, "{r:#}");
    let o = outcome(&r, "s4");
    assert_eq!(o["outcome"], "PartialSuccess", "{r:#}");
    assert_eq!(service_steps(o), one("update", "succeeded"));
    let (n2, id2) = starts(f, "s4");
    assert_eq!(n2, n1 + 1);
    assert_ne!(id2, id1);

    // Only the failing trigger is pending: the restart is skipped, and the
    // service keeps running as it was.
    let (c, r) = apply(&d);
    assert_eq!(c, 4, "{r:#}");
    let o = outcome(&r, "s4");
    assert_eq!(o["outcome"], "ExecutionFailed", "{r:#}");
    assert_eq!(service_steps(o), one("update", "skipped"));
    assert_eq!(starts(f, "s4"), (n2, id2));

    reset_demo(f, "s4");
    f.sh("s4", "rm -rf /etc/tend-demo");
}

/// Every resource kind on five systemd hosts (s5..s9): converged, then a
/// plan with nothing to do, then drift made by hand planned and corrected.
#[test]
fn every_kind_converges_on_five_hosts_and_drift_is_corrected() {
    let f = systemd_fleet();
    let hosts = ["s5", "s6", "s7", "s8", "s9"];
    for h in hosts {
        reset_demo(f, h);
        f.sh(
            h,
            "rm -rf /srv/all; userdel tkall 2>/dev/null; groupdel tkall 2>/dev/null; true",
        );
    }
    let body = r#"
resources:
  - kind: group
    name: tkall
  - kind: user
    name: tkall
    groups: [tkall]
    shell: /bin/sh
  - kind: directory
    path: /srv/all
    owner: tkall
    group: tkall
    mode: "0750"
  - kind: file
    path: /srv/all/app.conf
    content: "port = 8080\n"
    owner: tkall
    mode: "0640"
  - kind: symlink
    path: /srv/all/current
    target: /srv/all/app.conf
  - kind: package
    name: sudo
  - kind: command
    name: init-marker
    run: date > /srv/all/.initialized
    creates: /srv/all/.initialized
    requires: ["directory:/srv/all"]
  - kind: service
    name: tend-demo
    restart_on: ["file:/srv/all/app.conf"]
"#;
    let mut inventory = String::from("hosts:\n");
    for h in hosts {
        inventory.push_str(&f.inventory_entry(h));
    }
    let files: Vec<(&str, &str)> = hosts.iter().map(|h| (*h, body)).collect();
    let d = Desired::new(FAST, &inventory, &files);
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    for h in hosts {
        assert_eq!(outcome(&r, h)["outcome"], "Completed", "{h}: {r:#}");
        assert_eq!(demo(f, h), "active enabled", "{h}");
        assert_eq!(
            f.sh(h, "stat -c '%U %G %a' /srv/all /srv/all/app.conf; readlink /srv/all/current; [ -s /srv/all/.initialized ] && echo init; id -nG tkall; dpkg-query -W -f '${Status}\\n' sudo"),
            "tkall tkall 750\ntkall root 640\n/srv/all/app.conf\ninit\ntkall\ninstall ok installed\n",
            "{h}"
        );
    }
    let (c, plan) = plan_json(&d);
    assert_eq!(c, 0, "nothing left to do: {plan:#}");

    // Drift by hand on one host: the service stopped, the file edited, the
    // user's shell changed.
    f.sh("s7", "systemctl stop tend-demo.service; echo tampered >> /srv/all/app.conf; usermod -s /bin/bash tkall");
    let (c, plan) = plan_json(&d);
    assert_eq!(c, 2, "{plan:#}");
    let s7 = plan["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "s7")
        .unwrap();
    let ids: Vec<&str> = s7["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"file:/srv/all/app.conf")
            && ids.contains(&"user:tkall")
            && ids.contains(&"service:tend-demo"),
        "{ids:?}"
    );
    let others_quiet = plan["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["host"] != "s7")
        .all(|h| h["steps"].as_array().unwrap().is_empty());
    assert!(others_quiet, "{plan:#}");
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(outcome(&r, "s7")["outcome"], "Completed", "{r:#}");
    assert_eq!(demo(f, "s7"), "active enabled");
    assert_eq!(
        f.sh(
            "s7",
            "cat /srv/all/app.conf; getent passwd tkall | cut -d: -f7"
        ),
        "port = 8080\n/bin/sh\n"
    );
    let (c, plan) = plan_json(&d);
    assert_eq!(c, 0, "{plan:#}");
}
