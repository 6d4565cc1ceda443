//! Approvals bind the objects, not the commit (SPEC 8.1), on real SSH
//! hosts: a token survives an unrelated commit; a change on the host to an
//! object to destroy makes it stale; a token for one host set or one change
//! never covers another; one `tend confirm --pending` token releases a prune
//! on eight hosts under the controller, once per operation. Hosts h80..h90
//! and s14.

#[path = "support/fleet.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serde_json::Value;
use std::time::Duration;

use support::{Daemon, Desired, Fleet, code, fleet, outcome, systemd_fleet, text, wait_for};

const FAST: &str = "probe_timeout: 30s\nretries: 2\nretry_backoff: 50ms\n";

/// Two tests apply to h89; each holds this for its whole length, so they
/// never race each other's run on the host (the fleet has no free host).
static H89: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn h89() -> std::sync::MutexGuard<'static, ()> {
    H89.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn git_desired(inventory: &str, hosts: &[(&str, &str)]) -> Desired {
    let d = Desired::new(FAST, inventory, hosts);
    d.init_git();
    d
}

fn status(d: &Desired, host: &str) -> Value {
    let p = d.state().join("status").join(format!("{host}.json"));
    serde_json::from_slice(&fs::read(&p).unwrap()).unwrap()
}

/// `tend apply --dispatch enforced ARGS`: (exit code, result.json).
fn apply(d: &Desired, hosts: &[&str]) -> (i32, Value) {
    let mut args = vec!["apply", "--dispatch", "enforced"];
    args.extend(hosts);
    let out = d.tend(&args);
    let c = code(&out);
    assert!([0, 3].contains(&c), "apply exited {c}: {}", text(&out));
    (c, d.last_result())
}

/// The operation that waits on `host`, as its status says; and the apply
/// output names it with its `tend confirm` command.
fn awaiting(d: &Desired, hosts: &[&str]) -> String {
    let mut args = vec!["apply", "--dispatch", "enforced"];
    args.extend(hosts);
    let out = d.tend(&args);
    assert_eq!(code(&out), 3, "{}", text(&out));
    let s = status(d, hosts[0]);
    let op = s["awaiting_confirmation"]["operation"]
        .as_str()
        .unwrap_or_else(|| panic!("no operation waits: {s}"))
        .to_string();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!("confirm {op} --reason")),
        "apply names the confirm command:\n{printed}"
    );
    op
}

fn confirm(d: &Desired, op: &str) {
    let out = d.tend(&["confirm", op, "--reason", "approved in a test"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
}

fn used_tokens(d: &Desired) -> usize {
    fs::read_dir(d.state().join("confirm/used"))
        .map(|r| r.count())
        .unwrap_or(0)
}

fn exists(f: &Fleet, host: &str, path: &str) -> bool {
    f.sh(host, &format!("test -e {path} && echo yes || echo no")) == "yes\n"
}

#[test]
fn a_token_survives_an_unrelated_commit_and_the_delete_runs() {
    let f = fleet();
    f.sh(
        "h88",
        "rm -rf /srv/appr && mkdir -p /srv/appr && echo old > /srv/appr/old.conf",
    );
    let body = |keep: &str| {
        format!(
            "resources:\n  - kind: directory\n    path: /srv/appr\n  - kind: file\n    path: /srv/appr/keep\n    content: \"{keep}\\n\"\n  - kind: file\n    path: /srv/appr/old.conf\n    state: absent\n"
        )
    };
    let d = git_desired(&f.inventory(&["h88"]), &[("h88", &body("one"))]);
    let op = awaiting(&d, &["h88"]);
    let before = d.last_result();
    confirm(&d, &op);

    // Unrelated commits: another file's content, and a comment in tend.yaml.
    fs::write(d.dir().join("hosts/h88.yaml"), body("two")).unwrap();
    fs::write(d.dir().join("tend.yaml"), format!("{FAST}# a comment\n")).unwrap();
    let head = d.commit("unrelated");

    let (c, r) = apply(&d, &["h88"]);
    assert_eq!(c, 0, "{r}");
    assert_eq!(r["desired_revision"], head.as_str());
    assert_ne!(r["desired_revision"], before["desired_revision"]);
    assert_eq!(r["confirmation"]["operation"], op.as_str());
    assert_eq!(r["confirmation"]["scope_match"], true, "{r}");
    assert_eq!(outcome(&r, "h88")["outcome"], "Completed", "{r}");
    assert!(!exists(f, "h88", "/srv/appr/old.conf"));
    assert_eq!(f.sh("h88", "cat /srv/appr/keep"), "two\n");
    assert_eq!(used_tokens(&d), 1);
}

/// Each change to the object to destroy, made on the host after the token
/// was written, makes the token stale: refused, nothing destroyed. A fresh
/// approval of the object as it is now then runs.
#[test]
fn a_change_on_the_host_to_the_object_makes_the_token_stale() {
    let _h89 = h89();
    let f = fleet();
    // A package of our own, built on the host: version 1.0, then 1.1.
    let build_pkg = |version: &str| {
        format!(
            "set -e; d=$(mktemp -d); mkdir $d/DEBIAN; printf 'Package: tend-appr\\nVersion: {version}\\nArchitecture: all\\nMaintainer: t <t@t>\\nDescription: approvals test\\n' > $d/DEBIAN/control; dpkg-deb -b $d /tmp/tend-appr.deb >/dev/null; dpkg -i /tmp/tend-appr.deb >/dev/null; rm -rf $d"
        )
    };
    let cases: Vec<(&str, &str, String, String)> = vec![
        (
            "file content",
            "  - kind: file\n    path: /srv/st/f\n    state: absent\n",
            "rm -rf /srv/st && mkdir -p /srv/st && echo a > /srv/st/f".into(),
            "echo b > /srv/st/f".into(),
        ),
        (
            "a file mode",
            "  - kind: file\n    path: /srv/st/f\n    state: absent\n",
            "rm -rf /srv/st && mkdir -p /srv/st && echo a > /srv/st/f && chmod 644 /srv/st/f"
                .into(),
            "chmod 600 /srv/st/f".into(),
        ),
        (
            "a new file deep inside a directory",
            "  - kind: directory\n    path: /srv/st/d\n    state: absent\n",
            "rm -rf /srv/st && mkdir -p /srv/st/d/a/b/c && echo x > /srv/st/d/a/b/c/x".into(),
            "touch /srv/st/d/a/b/c/new".into(),
        ),
        (
            "a package upgraded",
            "  - kind: package\n    name: tend-appr\n    state: absent\n",
            build_pkg("1.0"),
            build_pkg("1.1"),
        ),
    ];
    for (what, resource, setup, meddle) in cases {
        f.sh("h89", &setup);
        let d = Desired::new(
            FAST,
            &f.inventory(&["h89"]),
            &[("h89", &format!("resources:\n{resource}"))],
        );
        let op = awaiting(&d, &["h89"]);
        confirm(&d, &op);
        f.sh("h89", &meddle);

        let (c, r) = apply(&d, &["h89"]);
        assert_eq!(c, 3, "{what}: {r}");
        assert_eq!(
            outcome(&r, "h89")["outcome"],
            "EscalationRequired",
            "{what}"
        );
        assert_eq!(r["confirmation"]["scope_match"], false, "{what}: {r}");
        let refusal = r["confirmation"]["refusal"].as_str().unwrap_or_default();
        assert!(refusal.contains("stale"), "{what}: {refusal}");
        assert_eq!(used_tokens(&d), 0, "{what}");
        let still = f.sh(
            "h89",
            "test -e /srv/st/f -o -e /srv/st/d/a/b/c/x -o -n \"$(dpkg-query -W -f '${Status}' tend-appr 2>/dev/null | grep ' installed')\" && echo there",
        );
        assert_eq!(still, "there\n", "{what}: the object was destroyed");

        // Approved anew, as the object is now: it goes.
        let fresh = awaiting(&d, &["h89"]);
        assert_ne!(fresh, op, "{what}");
        confirm(&d, &fresh);
        let (c, r) = apply(&d, &["h89"]);
        assert_eq!(c, 0, "{what}: {r}");
        assert_eq!(used_tokens(&d), 1, "{what}");
    }
    f.sh("h89", "rm -rf /srv/st /tmp/tend-appr.deb");
}

#[test]
fn a_token_for_one_host_set_never_covers_another() {
    let _h89 = h89();
    let f = fleet();
    let hosts = ["h89", "h90"];
    for h in hosts {
        f.sh(h, "mkdir -p /srv/hs && echo x > /srv/hs/gone");
    }
    let body = "resources:\n  - kind: file\n    path: /srv/hs/gone\n    state: absent\n";
    let d = Desired::new(FAST, &f.inventory(&hosts), &[("h89", body), ("h90", body)]);
    let both = awaiting(&d, &hosts);

    // A hand-written token naming the two-host operation with one host.
    let expires = String::from_utf8(
        Command::new("date")
            .args(["-u", "-d", "+30 min", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let token = d.state().join("confirm/narrow.yaml");
    fs::write(
        &token,
        format!(
            "operation: {both}\nhosts: [h89]\nexpires: {}\nreason: too narrow\n",
            expires.trim()
        ),
    )
    .unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let (c, r) = apply(&d, &hosts);
    assert_eq!(c, 3, "{r}");
    assert!(
        r["confirmation"]["refusal"]
            .as_str()
            .unwrap_or_default()
            .contains("names hosts"),
        "{r}"
    );
    fs::remove_file(&token).unwrap();

    // The one-host operation's token does not cover the two-host apply...
    let one = awaiting(&d, &["h89"]);
    assert_ne!(both, one, "the operation covers its host set");
    confirm(&d, &one);
    let (c, r) = apply(&d, &hosts);
    assert_eq!(c, 3, "{r}");
    assert_eq!(r["confirmation"]["scope_match"], false, "{r}");
    for h in hosts {
        assert!(exists(f, h, "/srv/hs/gone"), "{h}");
    }
    // ...and covers exactly its own.
    let (c, r) = apply(&d, &["h89"]);
    assert_eq!(c, 0, "{r}");
    assert!(!exists(f, "h89", "/srv/hs/gone"));
    assert!(exists(f, "h90", "/srv/hs/gone"));
}

#[test]
fn a_token_for_stop_does_not_cover_stop_and_disable() {
    let f = systemd_fleet();
    f.sh(
        "s14",
        "systemctl enable --now tend-demo.service >/dev/null 2>&1; true",
    );
    let demo = || {
        f.sh(
            "s14",
            "systemctl show -p ActiveState,UnitFileState --value tend-demo.service",
        )
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
    };
    assert_eq!(demo(), "active enabled");
    let body = |enabled: bool| {
        format!(
            "resources:\n  - kind: service\n    name: tend-demo\n    enabled: {enabled}\n    running: false\n"
        )
    };
    let inventory = format!("hosts:\n{}", f.inventory_entry("s14"));
    let d = Desired::new(FAST, &inventory, &[("s14", &body(true))]);
    let stop = awaiting(&d, &["s14"]);
    confirm(&d, &stop);

    fs::write(d.dir().join("hosts/s14.yaml"), body(false)).unwrap();
    let (c, r) = apply(&d, &["s14"]);
    assert_eq!(c, 3, "{r}");
    assert_eq!(r["confirmation"]["scope_match"], false, "{r}");
    assert_eq!(demo(), "active enabled", "nothing was stopped or disabled");

    fs::write(d.dir().join("hosts/s14.yaml"), body(true)).unwrap();
    let (c, r) = apply(&d, &["s14"]);
    assert_eq!(c, 0, "{r}");
    assert_eq!(demo(), "inactive enabled");
    f.sh(
        "s14",
        "systemctl disable --now tend-demo.service >/dev/null 2>&1; true",
    );
}

/// Every run's result.json.
fn results(d: &Desired) -> Vec<Value> {
    d.run_ids().iter().map(|id| d.result(id)).collect()
}

#[test]
fn one_pending_token_releases_a_prune_on_eight_hosts_once_per_operation() {
    let f = fleet();
    let hosts: Vec<String> = (80..=87).map(|i| format!("h{i}")).collect();
    let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
    for h in &names {
        f.sh(h, "rm -rf /srv/fleetprune");
    }
    let mut inventory = String::from("hosts:\n");
    for h in &names {
        inventory.push_str(&f.inventory_entry(h));
        inventory.push_str("    tags: [web]\n");
    }
    let host_body = "resources:\n  - kind: directory\n    path: /srv/fleetprune\n";
    let bodies: Vec<(&str, &str)> = names.iter().map(|h| (*h, host_body)).collect();
    let tend_yaml = "dispatch: enforced\nprobe_timeout: 30s\nretries: 1\nretry_backoff: 50ms\nquiet_window: 200ms\nmax_defer: 1s\nresync: 5m\n";
    let d = Desired::new(tend_yaml, &inventory, &bodies);
    fs::create_dir_all(d.dir().join("groups")).unwrap();
    fs::write(
        d.dir().join("groups/web.yaml"),
        "resources:\n  - kind: file\n    path: /srv/fleetprune/old.conf\n    content: \"old\\n\"\n",
    )
    .unwrap();
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 0, "{}", text(&out));

    // The group resource goes: a prune on every host, one operation each.
    fs::remove_file(d.dir().join("groups/web.yaml")).unwrap();
    // Nothing is pending yet: --pending refuses to write an empty token.
    let none = d.tend(&["confirm", "--pending", "--reason", "r"]);
    assert_eq!(code(&none), 1, "{}", text(&none));
    let daemon = Daemon::start(&d);
    let ops = || -> Vec<String> {
        names
            .iter()
            .filter_map(|h| {
                let p = d.state().join("status").join(format!("{h}.json"));
                let s: Value = serde_json::from_slice(&fs::read(p).ok()?).ok()?;
                s["awaiting_confirmation"]["operation"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    };
    wait_for(
        "every host awaits its prune",
        Duration::from_secs(120),
        || ops().len() == names.len(),
    );
    let waiting = ops();
    let distinct: std::collections::BTreeSet<&String> = waiting.iter().collect();
    assert_eq!(distinct.len(), 8, "one operation per host: {waiting:?}");
    for h in &names {
        assert!(exists(f, h, "/srv/fleetprune/old.conf"), "{h}");
    }

    let out = d.tend(&[
        "confirm",
        "--pending",
        "--tag",
        "web",
        "--reason",
        "retire old.conf on the web fleet",
        "--ttl",
        "10m",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    for op in &waiting {
        assert!(printed.contains(op.as_str()), "{op} listed:\n{printed}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !(ops().is_empty()
        && names
            .iter()
            .all(|h| !exists(f, h, "/srv/fleetprune/old.conf")))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the prune did not run on every host; still waiting: {:?}\nlog:\n{}",
            ops(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The token was used once per operation, by one run each, then moved.
    let token_runs: Vec<Value> = results(&d)
        .into_iter()
        .filter(|r| r["effective_mode"] == "full")
        .collect();
    assert_eq!(token_runs.len(), 8, "{}", daemon.log());
    let mut used_ops: Vec<String> = token_runs
        .iter()
        .map(|r| {
            assert_eq!(r["confirmation"]["scope_match"], true, "{r:#}");
            r["confirmation"]["operation"].as_str().unwrap().to_string()
        })
        .collect();
    used_ops.sort();
    let mut want = waiting.clone();
    want.sort();
    assert_eq!(used_ops, want);
    wait_for(
        "the token moved to confirm/used",
        Duration::from_secs(30),
        || {
            used_tokens(&d) == 1
                && fs::read_dir(d.state().join("confirm"))
                    .unwrap()
                    .filter(|e| e.as_ref().unwrap().path().is_file())
                    .count()
                    == 0
        },
    );
}
