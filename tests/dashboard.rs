//! The dashboard of `tend run --listen` (SPEC 8.6), on the real SSH hosts
//! h76 and h77 (shared with tests/listen.rs, which runs in another test
//! binary, never at the same time; this file uses /srv/dash only): every
//! route over HTTP, then the three pages in a real headless Chromium,
//! driven over the DevTools protocol. Screenshots of the pages go to
//! `<target>/dashboard/` (CI keeps them as artifacts). Every wait polls
//! with a deadline.

#[path = "support/browser.rs"]
mod browser;
#[path = "support/http.rs"]
mod http;
#[path = "support/fleet.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use http::{LIMIT, Server, get};
use serde_json::Value;

const TEND_YAML: &str = "dispatch: enforced
probe_timeout: 5s
retries: 1
retry_backoff: 50ms
quiet_window: 200ms
max_defer: 1s
resync: 30s
";

const HOSTS: [&str; 2] = ["h76", "h77"];

/// Where the screenshots go: the build folder, beside the binaries.
fn shots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| support::repo().join("target"));
    target.join("dashboard")
}

fn wait(what: &str, mut f: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            why()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn inventory(f: &support::Fleet) -> String {
    let mut s = String::from("hosts:\n");
    for (h, tag) in [("h76", "web"), ("h77", "db")] {
        s.push_str(&f.inventory_entry(h));
        s.push_str(&format!("    tags: [{tag}, dash]\n"));
    }
    s
}

fn host_yaml(app: &str, old: bool) -> String {
    let mut s = format!(
        "resources:\n  - kind: directory\n    path: /srv/dash\n  - kind: file\n    path: /srv/dash/app.conf\n    content: {app:?}\n"
    );
    if old {
        s.push_str("  - kind: file\n    path: /srv/dash/old.conf\n    content: \"old\\n\"\n");
    }
    s
}

fn phase(addr: std::net::SocketAddr, host: &str) -> String {
    let a = get(addr, &format!("/api/hosts/{host}"));
    a.json()["phase"].as_str().unwrap_or("").to_string()
}

#[test]
fn the_dashboard_shows_the_fleet_a_held_delete_live_a_diff_and_the_waterfall() {
    let f = support::fleet();
    for h in HOSTS {
        f.sh(h, "rm -rf /srv/dash");
    }
    let d = support::Desired::new(
        TEND_YAML,
        &inventory(f),
        &[
            ("h76", &host_yaml("one\n", true)),
            ("h77", &host_yaml("one\n", false)),
        ],
    );
    d.init_git();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tend"));
    cmd.arg("--dir")
        .arg(d.dir())
        .args(["run", "-v", "--listen", "127.0.0.1:0"]);
    let mut srv = Server::start(cmd);
    let addr = srv.addr;
    wait(
        "both hosts to converge",
        || get(addr, "/readyz").code == 200 && HOSTS.iter().all(|h| phase(addr, h) == "Running"),
        || format!("{:?}\n{}", get(addr, "/readyz"), srv.log()),
    );
    assert_eq!(f.sh("h76", "cat /srv/dash/old.conf"), "old\n");

    // --- Every route over HTTP, against the running controller. ---
    let fleet = get(addr, "/api/fleet");
    assert_eq!(
        (fleet.code, fleet.content_type.as_str()),
        (200, "application/json")
    );
    let fj = fleet.json();
    let tags: Vec<(String, Vec<String>)> = fj["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let t = h["tags"].as_array().unwrap();
            (
                h["host"].as_str().unwrap().to_string(),
                t.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        tags,
        vec![
            ("h76".into(), vec!["dash".into(), "web".into()]),
            ("h77".into(), vec!["dash".into(), "db".into()])
        ],
        "{}",
        fleet.body
    );
    for (path, ctype) in [
        ("/", "text/html; charset=utf-8"),
        ("/parts/fleet", "text/html; charset=utf-8"),
        ("/hosts/h76", "text/html; charset=utf-8"),
        ("/parts/hosts/h76", "text/html; charset=utf-8"),
        ("/assets/dash.css", "text/css; charset=utf-8"),
        ("/assets/dash.js", "text/javascript; charset=utf-8"),
        ("/api/hosts/h76", "application/json"),
        ("/api/hosts/h76/runs", "application/json"),
        ("/api/hosts/h76/plan", "application/json"),
        ("/api/runs?limit=5", "application/json"),
    ] {
        let a = get(addr, path);
        assert_eq!(
            (a.code, a.content_type.as_str()),
            (200, ctype),
            "{path}: {}",
            a.body
        );
    }
    let page = get(addr, "/").body;
    for h in HOSTS {
        assert!(page.contains(&format!("href=\"/hosts/{h}\"")), "{page}");
    }
    // Durations per run, for the host page's chart.
    let runs = get(addr, "/api/hosts/h76/runs").json();
    let first = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|r| r["outcome"] == "Completed")
        .unwrap_or_else(|| panic!("a completed run of h76: {runs}"))
        .clone();
    assert!(
        first["probe_ms"].is_u64() && first["apply_ms"].is_u64(),
        "{first}"
    );
    let run_id = first["run_id"].as_str().unwrap().to_string();
    let result = get(addr, &format!("/api/runs/{run_id}")).json();
    let tl = get(addr, &format!("/api/runs/{run_id}/timeline"));
    assert_eq!(tl.code, 200, "{}", tl.body);
    assert!(tl.json().as_array().is_some_and(|t| !t.is_empty()));
    let run_page = get(addr, &format!("/runs/{run_id}"));
    assert_eq!(
        (run_page.code, run_page.content_type.as_str()),
        (200, "text/html; charset=utf-8")
    );
    // Each step's log, by the link the run page gives.
    let log = result["host_outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|o| o["steps"].as_array().unwrap().iter())
        .find_map(|s| s["log"].as_str())
        .unwrap_or_else(|| panic!("a step log: {result}"))
        .to_string();
    let href = format!("/{}", log.replacen("/hosts/", "/logs/", 1));
    assert!(
        run_page.body.contains(&format!("href=\"{href}\"")),
        "{}",
        run_page.body
    );
    let l = get(addr, &href);
    assert_eq!(
        (l.code, l.content_type.as_str()),
        (200, "text/plain; charset=utf-8"),
        "{href}"
    );
    // Unknown names and every way out of the state dir: 404.
    for path in [
        "/hosts/nope",
        "/api/hosts/nope",
        "/api/hosts/nope/runs",
        "/api/hosts/..%2Fh76/plan",
        "/runs/r-20200101T000000Z-none",
        "/api/runs/r-20200101T000000Z-none",
        "/api/runs/..%2F..%2Fstatus",
        &format!("/api/runs/{run_id}%2F..%2F..%2Fstatus"),
        &format!("/runs/{run_id}/logs/h76/..%2F..%2Fresult.json"),
        &format!("/runs/{run_id}/logs/..%2F..%2F..%2F..%2Fstatus/h76.json"),
        &format!("/runs/{run_id}/logs/h76/0-x.log%2F..%2F..%2Fplan.json"),
        &format!("/runs/{run_id}/logs/h76/9999-nothing.log"),
        "/assets/../status/h76.json",
        "/nope",
    ] {
        let a = get(addr, path);
        assert_eq!(a.code, 404, "{path}: {}", a.body);
        assert!(!a.body.contains("\"schema_version\""), "{path}: {}", a.body);
    }

    // --- The pages in a real browser. ---
    let mut b = browser::Browser::launch();
    let base = format!("http://{addr}");
    b.goto(&format!("{base}/"));
    let states = b.wait_for(
        "(() => { const r = [...document.querySelectorAll('tr.host')]; \
           return r.length === 2 && r.every(x => x.dataset.state === 'ready') \
             && r.map(x => x.dataset.host + ':' + x.querySelector('.phase').textContent).join(' '); })()",
        LIMIT,
    );
    assert_eq!(states, Value::from("h76:Running h77:Running"));
    assert_eq!(
        b.eval("document.getElementById('ready-count').textContent"),
        Value::from("2")
    );
    // The filter by tag hides the other host.
    b.eval("(() => { const s = document.getElementById('f-tag'); s.value = 'db'; s.dispatchEvent(new Event('change')); })()");
    assert_eq!(
        b.eval("[...document.querySelectorAll('tr.host')].filter(r => !r.hidden).map(r => r.dataset.host).join(' ')"),
        Value::from("h77")
    );
    b.eval("(() => { const s = document.getElementById('f-tag'); s.value = ''; s.dispatchEvent(new Event('change')); })()");

    // A commit that holds a delete on h76, and a content change on h77
    // held by `tend suspend` (so that its diff stays pending): the page
    // shows the confirmation entry without a reload.
    b.eval("window.__not_reloaded = true");
    let out = d.tend(&[
        "suspend",
        "h77",
        "--reason",
        "dashboard test: keep the change pending",
    ]);
    assert_eq!(support::code(&out), 0, "{}", support::text(&out));
    std::fs::write(
        d.dir().join("hosts/h76.yaml"),
        host_yaml("one\nthree\n", false)
            + "  - kind: file\n    path: /srv/dash/old.conf\n    state: absent\n",
    )
    .unwrap();
    std::fs::write(
        d.dir().join("hosts/h77.yaml"),
        host_yaml("one\ntwo\n", false),
    )
    .unwrap();
    d.commit("drop old.conf and add a line on h76, a line on h77");
    let cmd = b.wait_for(
        "window.__not_reloaded === true && document.querySelector('#awaiting .cmd')?.textContent",
        LIMIT,
    );
    let status = get(addr, "/api/hosts/h76").json();
    assert_eq!(
        cmd.as_str(),
        status["awaiting_confirmation"]["command"].as_str(),
        "the page's command is the status document's: {status}"
    );
    assert!(cmd.as_str().unwrap().contains(" confirm "), "{cmd}");
    assert_eq!(
        b.eval("document.querySelector('tr.host[data-host=h76]').dataset.state"),
        Value::from("awaiting")
    );
    assert_eq!(
        f.sh("h76", "cat /srv/dash/old.conf"),
        "old\n",
        "the delete is held"
    );
    // What is left pending on h76 is the held delete alone: the content
    // change of the same pass ran.
    assert_eq!(f.sh("h76", "cat /srv/dash/app.conf"), "one\nthree\n");
    // (The pending plan is written right after the status files.)
    let plan_of = |h: &str| {
        get(addr, &format!("/api/hosts/{h}/plan")).json()["pending_plan"]
            .as_str()
            .map(str::to_string)
    };
    wait(
        "the pending plan of h76",
        || plan_of("h76").is_some(),
        || srv.log(),
    );
    let text = plan_of("h76").unwrap();
    assert!(
        text.contains("- file:/srv/dash/old.conf delete (destructive)"),
        "{text}"
    );
    assert!(text.contains("---- barrier"), "{text}");
    assert!(!text.contains("file:/srv/dash/app.conf"), "{text}");
    std::fs::create_dir_all(shots()).unwrap();
    assert!(b.screenshot(&shots().join("fleet.png")) > 1000);
    b.color_scheme("dark");
    assert!(b.screenshot(&shots().join("fleet-dark.png")) > 1000);
    b.color_scheme("light");

    // The host page shows the pending diff of h77.
    b.goto(&format!("{base}/hosts/h77"));
    let plan = b.wait_for(
        "document.querySelector('#pending pre.plan')?.textContent",
        LIMIT,
    );
    let plan = plan.as_str().unwrap();
    assert!(plan.contains("file:/srv/dash/app.conf update"), "{plan}");
    assert!(plan.contains("+two"), "{plan}");
    assert_eq!(
        b.eval("[...document.querySelectorAll('#pending pre.plan span.add')].some(s => s.textContent.trim() === '+two')"),
        Value::from(true)
    );
    assert_eq!(
        f.sh("h77", "cat /srv/dash/app.conf"),
        "one\n",
        "suspended: not applied"
    );
    assert!(
        b.eval("document.querySelectorAll('#conditions tr').length")
            .as_u64()
            >= Some(6),
        "the six conditions"
    );
    assert!(
        b.eval("document.querySelectorAll('#durations rect.probe').length")
            .as_u64()
            >= Some(2),
        "a probe bar for each run of h77: the converge and the suspended pass, at least"
    );
    assert!(b.screenshot(&shots().join("host.png")) > 1000);

    // The run page of the first converge: one waterfall row per executed step.
    b.goto(&format!("{base}/runs/{run_id}"));
    let executed: usize = result["host_outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|o| o["steps"].as_array().unwrap().iter())
        .filter(|s| s["attempts"].as_u64() > Some(0))
        .count();
    assert!(executed >= 3, "{result}");
    let rows = b.wait_for("document.querySelectorAll('tr.wf-row').length", LIMIT);
    assert_eq!(rows.as_u64(), Some(executed as u64), "{}", b.html());
    assert_eq!(
        b.eval("document.querySelectorAll('tr.wf-row svg rect').length")
            .as_u64(),
        Some(executed as u64),
        "one bar per attempt"
    );
    assert!(
        b.eval("document.getElementById('one-outcome').textContent")
            .as_str()
            .is_some_and(|t| t.contains("one per host")),
        "the contract"
    );
    assert!(b.screenshot(&shots().join("run.png")) > 1000);
    drop(b);

    assert_eq!(srv.stop(), 0, "{}", srv.log());
}
