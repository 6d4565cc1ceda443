//! Drift triage (SPEC 8.7) on real fleet hosts (h37, h38): a `drift:
//! report` resource edited by hand is reported and left, a commit redefining
//! it converges it, intentional and corrective counts follow a commit and a
//! hand edit, and a file another manager keeps rewriting (a loop on the
//! host) becomes contested, then is corrected at most once per resync.

#[path = "support/fleet.rs"]
mod support;

use serde_json::{Value, json};
use support::{Desired, code, fleet, text};

const FAST: &str = "probe_timeout: 5s\nretries: 2\nretry_backoff: 50ms\n";

fn outcome(r: &Value) -> (i64, i64) {
    let o = &r["host_outcomes"][0];
    (
        o["intentional"].as_i64().unwrap(),
        o["corrective"].as_i64().unwrap(),
    )
}

fn status(d: &Desired, host: &str) -> Value {
    let p = d.state().join("status").join(format!("{host}.json"));
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn drifted(st: &Value) -> (String, String) {
    let c = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Drifted")
        .unwrap();
    (
        c["status"].as_str().unwrap().into(),
        c["reason"].as_str().unwrap().into(),
    )
}

#[test]
fn a_report_resource_is_reported_and_left_until_redefined() {
    let f = fleet();
    f.sh("h37", "rm -rf /srv/drift && mkdir -p /srv/drift");
    let host = |motd: &str| {
        format!(
            "resources:\n  - kind: file\n    path: /srv/drift/motd\n    content: \"{motd}\\n\"\n    drift: report\n  - kind: file\n    path: /srv/drift/app.conf\n    content: \"port = 80\\n\"\n"
        )
    };
    let d = Desired::new(FAST, &f.inventory(&["h37"]), &[("h37", &host("hello"))]);
    let apply = |want: i32| {
        let out = d.tend(&["apply", "--dispatch", "enforced"]);
        assert_eq!(code(&out), want, "{}", text(&out));
        d.last_result()
    };
    assert_eq!(
        outcome(&apply(0)),
        (2, 0),
        "first converge: both intentional"
    );

    // Hand edits: the report resource is left and reported, the other corrected.
    f.sh(
        "h37",
        "echo by-hand > /srv/drift/motd; echo port=1 > /srv/drift/app.conf",
    );
    let out = d.tend(&["drift"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        text(&out).contains("/srv/drift/motd (reported"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("-port=1"), "the diff: {}", text(&out));
    assert_eq!(
        outcome(&apply(0)),
        (0, 1),
        "the hand edit of app.conf: corrective"
    );
    assert_eq!(f.sh("h37", "cat /srv/drift/motd"), "by-hand\n");
    assert_eq!(f.sh("h37", "cat /srv/drift/app.conf"), "port = 80\n");
    let st = status(&d, "h37");
    assert_eq!(st["drift"]["reported"], json!(["file:/srv/drift/motd"]));
    assert_eq!(st["drift"]["corrected_total"], 1);
    assert_eq!(drifted(&st), ("True".into(), "DriftReported".into()));
    let plan = d.tend(&["plan"]);
    assert_eq!(
        code(&plan),
        0,
        "reported drift is not pending: {}",
        text(&plan)
    );

    // A commit redefining it converges it: intentional.
    std::fs::write(d.dir().join("hosts/h37.yaml"), host("hello again")).unwrap();
    assert_eq!(outcome(&apply(0)), (1, 0));
    assert_eq!(f.sh("h37", "cat /srv/drift/motd"), "hello again\n");
    let st = status(&d, "h37");
    assert_eq!(st["drift"]["reported"], json!([]));
    assert_eq!(drifted(&st).0, "False");
}

#[test]
fn a_file_another_manager_rewrites_becomes_contested() {
    let f = fleet();
    f.sh(
        "h38",
        "[ -f /run/flip.pid ] && kill $(cat /run/flip.pid) 2>/dev/null; rm -rf /srv/contest && mkdir -p /srv/contest",
    );
    let d = Desired::new(
        FAST,
        &f.inventory(&["h38"]),
        &[(
            "h38",
            "resources:\n  - kind: file\n    path: /srv/contest/app.conf\n    content: \"ours\\n\"\n",
        )],
    );
    let apply = || {
        let out = d.tend(&["apply", "--dispatch", "enforced"]);
        assert_eq!(code(&out), 0, "{}", text(&out));
        d.last_result()
    };
    assert_eq!(outcome(&apply()), (1, 0));
    // Another manager: rewrites the file every 100 ms, for as long as the test runs.
    f.sh(
        "h38",
        "setsid sh -c 'echo $$ > /run/flip.pid; while :; do echo theirs > /srv/contest/app.conf.tmp && mv /srv/contest/app.conf.tmp /srv/contest/app.conf; sleep 0.1; done' </dev/null >/dev/null 2>&1 &",
    );
    support::wait_for(
        "the other manager to write",
        std::time::Duration::from_secs(5),
        || f.sh("h38", "cat /srv/contest/app.conf") == "theirs\n",
    );
    for n in 1..=3 {
        assert_eq!(outcome(&apply()), (0, 1), "correction {n}");
    }
    let st = status(&d, "h38");
    assert_eq!(
        st["drift"]["contested"],
        json!(["file:/srv/contest/app.conf"])
    );
    assert_eq!(drifted(&st), ("True".into(), "Contested".into()));
    // Contested, corrected less than a resync (5 min) ago: left and reported.
    assert_eq!(outcome(&apply()), (0, 0));
    let st = status(&d, "h38");
    assert_eq!(
        st["drift"]["reported"],
        json!(["file:/srv/contest/app.conf"])
    );
    assert_eq!(st["drift"]["corrected_total"], 3);
    f.sh("h38", "kill $(cat /run/flip.pid); rm -f /run/flip.pid");
}
