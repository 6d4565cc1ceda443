//! Approvals bind the objects, not the commit (SPEC 8.1), on real SSH
//! hosts: a token survives an unrelated commit; a change on the host to an
//! object to destroy makes it stale; a token for one host set or one change
//! never covers another. Hosts h80..h83 and s14.

#[path = "support/fleet.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::{Desired, Fleet, code, fleet, outcome, systemd_fleet, text};

const FAST: &str = "probe_timeout: 30s\nretries: 2\nretry_backoff: 50ms\n";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Commit everything in the desired-state dir (the state dir is ignored).
fn commit(d: &Desired, message: &str) -> String {
    git(d.dir(), &["add", "-A"]);
    git(d.dir(), &["commit", "-q", "-m", message]);
    git(d.dir(), &["rev-parse", "HEAD"])
}

fn git_desired(inventory: &str, hosts: &[(&str, &str)]) -> Desired {
    let d = Desired::new(FAST, inventory, hosts);
    fs::write(d.dir().join(".gitignore"), ".tend/\n").unwrap();
    git(d.dir(), &["init", "-q"]);
    commit(&d, "first");
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
        "h80",
        "rm -rf /srv/appr && mkdir -p /srv/appr && echo old > /srv/appr/old.conf",
    );
    let body = |keep: &str| {
        format!(
            "resources:\n  - kind: directory\n    path: /srv/appr\n  - kind: file\n    path: /srv/appr/keep\n    content: \"{keep}\\n\"\n  - kind: file\n    path: /srv/appr/old.conf\n    state: absent\n"
        )
    };
    let d = git_desired(&f.inventory(&["h80"]), &[("h80", &body("one"))]);
    let op = awaiting(&d, &["h80"]);
    let before = d.last_result();
    confirm(&d, &op);

    // Unrelated commits: another file's content, and a comment in tend.yaml.
    fs::write(d.dir().join("hosts/h80.yaml"), body("two")).unwrap();
    fs::write(d.dir().join("tend.yaml"), format!("{FAST}# a comment\n")).unwrap();
    let head = commit(&d, "unrelated");

    let (c, r) = apply(&d, &["h80"]);
    assert_eq!(c, 0, "{r}");
    assert_eq!(r["desired_revision"], head.as_str());
    assert_ne!(r["desired_revision"], before["desired_revision"]);
    assert_eq!(r["confirmation"]["operation"], op.as_str());
    assert_eq!(r["confirmation"]["scope_match"], true, "{r}");
    assert_eq!(outcome(&r, "h80")["outcome"], "Completed", "{r}");
    assert!(!exists(f, "h80", "/srv/appr/old.conf"));
    assert_eq!(f.sh("h80", "cat /srv/appr/keep"), "two\n");
    assert_eq!(used_tokens(&d), 1);
}

/// Each change to the object to destroy, made on the host after the token
/// was written, makes the token stale: refused, nothing destroyed. A fresh
/// approval of the object as it is now then runs.
#[test]
fn a_change_on_the_host_to_the_object_makes_the_token_stale() {
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
        f.sh("h81", &setup);
        let d = Desired::new(
            FAST,
            &f.inventory(&["h81"]),
            &[("h81", &format!("resources:\n{resource}"))],
        );
        let op = awaiting(&d, &["h81"]);
        confirm(&d, &op);
        f.sh("h81", &meddle);

        let (c, r) = apply(&d, &["h81"]);
        assert_eq!(c, 3, "{what}: {r}");
        assert_eq!(
            outcome(&r, "h81")["outcome"],
            "EscalationRequired",
            "{what}"
        );
        assert_eq!(r["confirmation"]["scope_match"], false, "{what}: {r}");
        let refusal = r["confirmation"]["refusal"].as_str().unwrap_or_default();
        assert!(refusal.contains("stale"), "{what}: {refusal}");
        assert_eq!(used_tokens(&d), 0, "{what}");
        let still = f.sh(
            "h81",
            "test -e /srv/st/f -o -e /srv/st/d/a/b/c/x -o -n \"$(dpkg-query -W -f '${Status}' tend-appr 2>/dev/null | grep ' installed')\" && echo there",
        );
        assert_eq!(still, "there\n", "{what}: the object was destroyed");

        // Approved anew, as the object is now: it goes.
        let fresh = awaiting(&d, &["h81"]);
        assert_ne!(fresh, op, "{what}");
        confirm(&d, &fresh);
        let (c, r) = apply(&d, &["h81"]);
        assert_eq!(c, 0, "{what}: {r}");
        assert_eq!(used_tokens(&d), 1, "{what}");
    }
    f.sh("h81", "rm -rf /srv/st /tmp/tend-appr.deb");
}

#[test]
fn a_token_for_one_host_set_never_covers_another() {
    let f = fleet();
    let hosts = ["h82", "h83"];
    for h in hosts {
        f.sh(h, "mkdir -p /srv/hs && echo x > /srv/hs/gone");
    }
    let body = "resources:\n  - kind: file\n    path: /srv/hs/gone\n    state: absent\n";
    let d = Desired::new(FAST, &f.inventory(&hosts), &[("h82", body), ("h83", body)]);
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
            "operation: {both}\nhosts: [h82]\nexpires: {}\nreason: too narrow\n",
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
    let one = awaiting(&d, &["h82"]);
    assert_ne!(both, one, "the operation covers its host set");
    confirm(&d, &one);
    let (c, r) = apply(&d, &hosts);
    assert_eq!(c, 3, "{r}");
    assert_eq!(r["confirmation"]["scope_match"], false, "{r}");
    for h in hosts {
        assert!(exists(f, h, "/srv/hs/gone"), "{h}");
    }
    // ...and covers exactly its own.
    let (c, r) = apply(&d, &["h82"]);
    assert_eq!(c, 0, "{r}");
    assert!(!exists(f, "h82", "/srv/hs/gone"));
    assert!(exists(f, "h83", "/srv/hs/gone"));
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
