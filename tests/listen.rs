//! `tend run --listen` (SPEC 8.6), end to end: the real daemon serving its
//! read-only endpoints, first on `transport: local` hosts in a temp dir,
//! then on the real SSH hosts h76 and h77 of the fleet (no other test uses
//! them). Requests go to 127.0.0.1 only, through a plain HTTP/1.1 client
//! over a `TcpStream`; every wait polls with a deadline.

mod common;
#[path = "support/http.rs"]
mod http;
#[path = "support/fleet.rs"]
mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Fixture;
use http::{LIMIT, Server, get, request};
use serde_json::Value;

/// Fast timings so that a change is picked up in well under a second.
const TEND_YAML: &str = "dispatch: enforced
probe_timeout: 5s
retries: 1
retry_backoff: 50ms
quiet_window: 200ms
max_defer: 1s
resync: 30s
";

/// Every metric family SPEC 8.6 names, as the text format spells it.
const FAMILIES: [&str; 10] = [
    "tend_reconciles_total",
    "tend_probe_duration_seconds",
    "tend_apply_duration_seconds",
    "tend_queue_depth",
    "tend_hosts",
    "tend_hosts_awaiting_confirmation",
    "tend_tokens_total",
    "tend_drifted_resources",
    "tend_rollout_state",
    "tend_build_info",
];

/// The value of one sample of a metrics text (`name{labels}` exactly).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// The sum of every `tend_reconciles_total` sample of `host`.
fn reconciles(metrics: &str, host: &str) -> f64 {
    let prefix = format!("tend_reconciles_total{{host=\"{host}\",");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Poll `f` until it says yes, or fail after `LIMIT` showing `why()`.
fn wait_for(what: &str, mut f: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            why()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn local_fixture() -> Fixture {
    let fx = Fixture::two_hosts();
    fx.write("tend.yaml", TEND_YAML);
    fx
}

fn status_files(state: &Path) -> usize {
    std::fs::read_dir(state.join("status"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn every_route_answers_and_a_change_moves_the_reconcile_counter() {
    let fx = local_fixture();
    let mut srv = Server::start(fx.cmd(&["run", "-v", "--listen", "127.0.0.1:0"]));
    let addr = srv.addr;

    wait_for(
        "/readyz to say every host had a pass",
        || get(addr, "/readyz").code == 200,
        || format!("{:?}\n{}", get(addr, "/readyz"), srv.log()),
    );
    assert_eq!(
        std::fs::read_to_string(fx.root().join("a.txt")).unwrap(),
        "a\n"
    );

    let h = get(addr, "/healthz");
    assert_eq!(h.code, 200, "{h:?}");
    assert!(h.content_type.starts_with("text/plain"), "{h:?}");
    let r = get(addr, "/readyz");
    assert!(r.content_type.starts_with("text/plain"), "{r:?}");

    // /metrics: the text format, every family.
    let m = get(addr, "/metrics");
    assert_eq!(m.code, 200);
    assert!(
        m.content_type.starts_with("text/plain; version=0.0.4")
            || m.content_type.starts_with("application/openmetrics-text"),
        "{}",
        m.content_type
    );
    for family in FAMILIES {
        assert!(m.body.contains(family), "{family} missing:\n{}", m.body);
    }
    let commit = m
        .body
        .lines()
        .find(|l| l.starts_with("tend_build_info{"))
        .unwrap_or_else(|| panic!("no tend_build_info sample:\n{}", m.body));
    assert!(
        commit.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && commit.ends_with(" 1"),
        "{commit}"
    );
    assert_eq!(
        sample(&m.body, "tend_hosts{phase=\"Running\"}"),
        Some(2.0),
        "{}",
        m.body
    );
    assert_eq!(
        sample(&m.body, "tend_hosts_awaiting_confirmation"),
        Some(0.0)
    );
    assert_eq!(
        sample(&m.body, "tend_tokens_total{result=\"refused\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&m.body, "tend_drifted_resources{host=\"a\"}"),
        Some(0.0)
    );
    assert!(
        sample(
            &m.body,
            "tend_reconciles_total{host=\"a\",outcome=\"Completed\"}"
        ) >= Some(1.0),
        "{}",
        m.body
    );
    assert_eq!(
        sample(&m.body, "tend_probe_duration_seconds_count{host=\"a\"}").map(|n| n >= 1.0),
        Some(true),
        "{}",
        m.body
    );
    assert_eq!(
        sample(&m.body, "tend_apply_duration_seconds_count{host=\"a\"}"),
        Some(1.0),
        "{}",
        m.body
    );

    // The documents, as the state dir holds them.
    let f = get(addr, "/api/fleet");
    assert_eq!((f.code, f.content_type.as_str()), (200, "application/json"));
    let fleet = f.json();
    assert_eq!(fleet["hosts"].as_array().unwrap().len(), 2, "{fleet:#}");
    let on_disk: Value = common::read_json(&fx.state().join("status/fleet.json"));
    assert_eq!(fleet["schema_version"], on_disk["schema_version"]);

    let a = get(addr, "/api/hosts/a");
    assert_eq!((a.code, a.content_type.as_str()), (200, "application/json"));
    assert_eq!(a.json()["host"], "a");
    assert_eq!(a.json()["phase"], "Running");

    let runs = get(addr, "/api/runs");
    assert_eq!(
        (runs.code, runs.content_type.as_str()),
        (200, "application/json")
    );
    let list = runs.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "one first run per host: {list:#?}");
    let id = list[0]["run_id"].as_str().unwrap().to_string();
    assert!(common::is_run_id(&id), "{id}");
    let one = get(addr, &format!("/api/runs/{id}"));
    assert_eq!(
        (one.code, one.content_type.as_str()),
        (200, "application/json")
    );
    assert_eq!(one.json(), fx.result(&id));
    let first = get(addr, "/api/runs?limit=1").json();
    assert_eq!(first.as_array().unwrap().len(), 1);
    for bad in ["abc", "0", "201", "-3", ""] {
        let b = get(addr, &format!("/api/runs?limit={bad}"));
        assert_eq!(b.code, 400, "limit={bad}: {b:?}");
        assert!(b.json()["error"].is_string());
    }

    let page = get(addr, "/");
    assert_eq!(page.code, 200);
    assert!(page.content_type.starts_with("text/html"), "{page:?}");
    assert!(
        page.body.contains("<title>fleet · tend</title>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("href=\"/hosts/a\"") && page.body.contains("Running"));
    // The one script is the dashboard's own file: nothing inline.
    assert!(!page.body.contains("<script>"), "{}", page.body);
    assert!(
        page.body
            .contains("<script src=\"/assets/dash.js\" defer></script>")
    );

    // Unknown names and anything that tries to leave its directory.
    for path in [
        "/api/hosts/nope",
        "/api/hosts/fleet",
        "/api/hosts/..",
        "/api/hosts/..%2Ffleet",
        "/api/hosts/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/hosts/a%00",
        "/api/runs/r-20200101T000000Z-zzzz",
        "/api/runs/..%2F..",
        "/api/runs/..%2F..%2Fstatus%2Ffleet.json",
        "/api/runs/%2e%2e",
        &format!("/api/runs/{id}%2F..%2F.."),
        &format!("/api/runs/{id}/plan.json"),
        "/api/runs/../../tend.db",
        "/api/../status/fleet.json",
        "/nope",
        "/metrics/x",
    ] {
        let a = get(addr, path);
        assert!(a.code == 404 || a.code == 400, "{path}: {a:?}");
        assert!(!a.body.contains("schema_version"), "{path}: {a:?}");
    }
    // Read-only: nothing but GET (and HEAD).
    for method in ["POST", "PUT", "DELETE"] {
        let a = request(addr, method, "/api/fleet");
        assert_eq!(a.code, 405, "{method}: {a:?}");
    }

    // A change of the desired state: the controller applies it, and the
    // counter of host a moves.
    let before = reconciles(&srv.metrics(), "a");
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/a.txt\n    content: \"a2\\n\"\n",
    );
    wait_for(
        "tend_reconciles_total of host a to move",
        || reconciles(&srv.metrics(), "a") > before,
        || format!("{}\n{}", srv.metrics(), srv.log()),
    );
    wait_for(
        "a.txt to change",
        || std::fs::read_to_string(fx.root().join("a.txt")).is_ok_and(|t| t == "a2\n"),
        || srv.log(),
    );
    let m = srv.metrics();
    assert!(
        sample(
            &m,
            "tend_reconciles_total{host=\"a\",outcome=\"Completed\"}"
        ) >= Some(2.0),
        "{m}"
    );

    // Stops with the controller.
    assert_eq!(srv.stop(), 0, "{}", srv.log());
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "still listening after the controller stopped"
    );
}

#[test]
fn a_held_delete_shows_in_the_gauges_and_tokens_count_once_per_result() {
    let fx = local_fixture();
    let mut srv = Server::start(fx.cmd(&["run", "-v", "--listen", "127.0.0.1:0"]));
    let addr = srv.addr;
    wait_for("/readyz", || get(addr, "/readyz").code == 200, || srv.log());
    let value = |m: &str, series: &str| sample(m, series).unwrap_or(-1.0);

    // a.txt leaves the desired state: its prune is destructive, held for a
    // token, and stays a difference after the pass.
    fx.write("hosts/a.yaml", "resources: []\n");
    wait_for(
        "host a to await confirmation",
        || {
            let m = srv.metrics();
            value(&m, "tend_hosts_awaiting_confirmation") == 1.0
                && value(&m, "tend_drifted_resources{host=\"a\"}") == 1.0
                && value(&m, "tend_drifted_resources{host=\"b\"}") == 0.0
                && value(
                    &m,
                    "tend_reconciles_total{host=\"a\",outcome=\"EscalationRequired\"}",
                ) >= 1.0
        },
        || format!("{}\n{}", srv.metrics(), srv.log()),
    );
    let op = fx.status("a")["awaiting_confirmation"]["operation"]
        .as_str()
        .expect("an operation awaits a token")
        .to_string();

    // A token that does not parse is refused, once however often judged.
    std::fs::write(
        fx.state().join("confirm/bad.yaml"),
        "operation: [unclosed\n",
    )
    .unwrap();
    wait_for(
        "the bad token to be refused",
        || value(&srv.metrics(), "tend_tokens_total{result=\"refused\"}") == 1.0,
        || format!("{}\n{}", srv.metrics(), srv.log()),
    );

    // A real one is accepted: claimed, and the prune runs.
    fx.run(&["confirm", &op, "--reason", "remove a.txt"])
        .code(0);
    wait_for(
        "the token to be accepted and a.txt removed",
        || {
            let m = srv.metrics();
            value(&m, "tend_tokens_total{result=\"accepted\"}") == 1.0
                && value(&m, "tend_hosts_awaiting_confirmation") == 0.0
                && !fx.root().join("a.txt").exists()
        },
        || format!("{}\n{}", srv.metrics(), srv.log()),
    );
    let m = srv.metrics();
    assert_eq!(
        value(&m, "tend_tokens_total{result=\"refused\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(value(&m, "tend_drifted_resources{host=\"a\"}"), 0.0, "{m}");
    assert_eq!(srv.stop(), 0, "{}", srv.log());
}

#[test]
fn a_non_loopback_address_needs_listen_public_and_is_warned_about() {
    let fx = local_fixture();
    let r = fx.run(&["run", "--listen", "0.0.0.0:0"]);
    assert_eq!(r.code, 1, "{r}");
    assert!(r.stderr.contains("--listen-public"), "{r}");
    assert_eq!(status_files(&fx.state()), 0, "no pass ran: {r}");

    // --listen-public alone is a usage error; so is a bad address.
    let r = fx.run(&["run", "--listen-public"]);
    assert_eq!(r.code, 1, "{r}");
    let r = fx.run(&["run", "--listen", "nowhere"]);
    assert_eq!(r.code, 1, "{r}");
    assert!(r.stderr.contains("ADDR:PORT"), "{r}");

    // With it: served (this test talks to it on loopback only), and the
    // log says the endpoints are unauthenticated.
    let mut srv = Server::start(fx.cmd(&["run", "-v", "--listen", "0.0.0.0:0", "--listen-public"]));
    let log = srv.log();
    assert!(
        log.contains("WARN") && log.contains("unauthenticated") && log.contains("reverse proxy"),
        "{log}"
    );
    let local: SocketAddr = format!("127.0.0.1:{}", srv.addr.port()).parse().unwrap();
    wait_for(
        "/healthz",
        || get(local, "/healthz").code == 200,
        || srv.log(),
    );
    assert_eq!(srv.stop(), 0, "{}", srv.log());
}

#[test]
fn a_port_in_use_stops_run_before_any_work() {
    let fx = local_fixture();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let r = fx.run(&["run", "--listen", &addr]);
    assert_eq!(r.code, 1, "{r}");
    assert!(r.stderr.contains(&addr), "{r}");
    assert!(r.stderr.contains("cannot listen"), "{r}");
    assert!(!fx.root().join("a.txt").exists(), "a pass ran: {r}");
    assert_eq!(status_files(&fx.state()), 0, "a pass ran: {r}");
}

/// The same on real SSH hosts: h76 and h77 (no other test uses them).
#[test]
fn on_fleet_hosts_the_counters_move_after_a_commit() {
    let f = support::fleet();
    for h in ["h76", "h77"] {
        f.sh(h, "rm -rf /srv/listen");
    }
    let body = |content: &str| {
        format!(
            "resources:\n  - kind: directory\n    path: /srv/listen\n  - kind: file\n    path: /srv/listen/app.conf\n    content: {content:?}\n"
        )
    };
    let d = support::Desired::new(
        TEND_YAML,
        &f.inventory(&["h76", "h77"]),
        &[("h76", &body("one\n")), ("h77", &body("one\n"))],
    );
    d.init_git();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tend"));
    cmd.arg("--dir")
        .arg(d.dir())
        .args(["run", "-v", "--listen", "127.0.0.1:0"]);
    let mut srv = Server::start(cmd);
    let addr = srv.addr;
    wait_for(
        "/readyz",
        || get(addr, "/readyz").code == 200,
        || format!("{:?}\n{}", get(addr, "/readyz"), srv.log()),
    );
    let m = srv.metrics();
    for family in FAMILIES {
        assert!(m.contains(family), "{family} missing:\n{m}");
    }
    for h in ["h76", "h77"] {
        assert_eq!(f.sh(h, "cat /srv/listen/app.conf"), "one\n");
        assert!(
            sample(
                &m,
                &format!("tend_probe_duration_seconds_count{{host=\"{h}\"}}")
            ) >= Some(1.0),
            "{m}"
        );
    }
    let before: Vec<f64> = ["h76", "h77"].iter().map(|h| reconciles(&m, h)).collect();
    let applies = |m: &str, h: &str| {
        sample(
            m,
            &format!("tend_apply_duration_seconds_count{{host=\"{h}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let applied: Vec<f64> = ["h76", "h77"].iter().map(|h| applies(&m, h)).collect();

    for h in ["h76", "h77"] {
        std::fs::write(
            d.dir().join("hosts").join(format!("{h}.yaml")),
            body("two\n"),
        )
        .unwrap();
    }
    d.commit("bump app.conf");
    for (i, h) in ["h76", "h77"].iter().enumerate() {
        wait_for(
            &format!("the counters of {h} to move"),
            || {
                let m = srv.metrics();
                reconciles(&m, h) > before[i] && applies(&m, h) > applied[i]
            },
            || format!("{}\n{}", srv.metrics(), srv.log()),
        );
        wait_for(
            &format!("{h} to get the new file"),
            || f.sh(h, "cat /srv/listen/app.conf") == "two\n",
            || srv.log(),
        );
    }
    let m = srv.metrics();
    assert_eq!(
        sample(&m, "tend_hosts{phase=\"Running\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(srv.stop(), 0, "{}", srv.log());
}
