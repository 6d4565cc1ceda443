//! The host lock (SPEC 8.7) and revision fencing (SPEC 8.1) on real SSH
//! hosts: two state dirs applying to one host never overlap; a host whose
//! lock someone else holds is `Planned`, naming the holder; a lock path
//! planted by another user neither blocks nor redirects tend; an apply from
//! an older checkout is refused, and accepted with `--allow-older`.
//!
//! Hosts: a second chroot fleet of its own (`scale_fleet`, h1..h4 on
//! 127.0.1.x), brought up fresh by the first test that needs it.

#[path = "support/fleet.rs"]
mod support;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use support::{Desired, Fleet, code, outcome, scale_fleet, text, wait_for};

const FAST: &str = "probe_timeout: 30s\nretries: 0\nretry_backoff: 50ms\n";

/// The second fleet, shared by this binary's tests (each owns its hosts).
fn hosts() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| scale_fleet(4))
}

/// A command resource that logs its start and end on the host around a
/// sleep; `round` makes it run again (a new `creates` path).
fn marker(tag: &str, round: u32, secs: u32) -> String {
    format!(
        "resources:\n  - kind: command\n    name: mark-{tag}\n    run: \"echo start {tag} >> /srv/lock.log; sleep {secs}; echo end {tag} >> /srv/lock.log; touch /srv/mark-{tag}-{round}\"\n    creates: /srv/mark-{tag}-{round}\n"
    )
}

fn spawn_apply(d: &Desired) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--dir")
        .arg(d.dir())
        .args(["apply", "--dispatch", "enforced"])
        .env_remove("TEND_DISPATCH")
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tend apply")
}

/// The events of a run's timeline of one kind, with their times.
fn events(d: &Desired, run: &Value, kind: &str) -> Vec<String> {
    let id = run["run_id"].as_str().unwrap();
    let path = d.state().join("runs").join(id).join("timeline.jsonl");
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == kind)
        .map(|e| e["at"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn two_state_dirs_applying_to_one_host_never_overlap() {
    let f = hosts();
    f.sh("h1", "rm -f /srv/lock.log /srv/mark-*");
    let inv = f.inventory(&["h1"]);
    let a = Desired::new(FAST, &inv, &[("h1", &marker("a", 1, 3))]);
    let b = Desired::new(FAST, &inv, &[("h1", &marker("b", 1, 3))]);
    let (pa, pb) = (spawn_apply(&a), spawn_apply(&b));
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    // Whoever took the lock second either waited for the first (3 s < the
    // 10 s wait) and ran after it, or found the revision on the host moved
    // since its probe and is planned again (exit 2); never both at once.
    for (o, d) in [(&oa, &a), (&ob, &b)] {
        match code(o) {
            0 => {}
            2 => {
                let r = d.last_result();
                let reason = outcome(&r, "h1")["reason"].as_str().unwrap().to_string();
                assert!(reason.contains("changed since the probe"), "{r}");
                let again = d.tend(&["apply", "--dispatch", "enforced"]);
                assert_eq!(code(&again), 0, "{}", text(&again));
            }
            c => panic!("apply exited {c}: {}", text(o)),
        }
    }
    let log = f.sh("h1", "cat /srv/lock.log");
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines == ["start a", "end a", "start b", "end b"]
            || lines == ["start b", "end b", "start a", "end a"],
        "steps of the two state dirs interleaved on the host:\n{log}"
    );
    // The lock intervals, as each run recorded them, do not overlap either.
    let spans = |d: &Desired| -> Vec<(String, String, String)> {
        d.run_ids()
            .iter()
            .map(|id| d.result(id))
            .filter_map(|r| {
                let (l, u) = (
                    events(d, &r, "host_locked"),
                    events(d, &r, "host_lock_released"),
                );
                assert_eq!(l.len(), u.len(), "{r}");
                let rev = r["desired_revision"].as_str().unwrap().to_string();
                l.first().map(|l| (l.clone(), u[0].clone(), rev))
            })
            .collect()
    };
    let mut all = spans(&a);
    all.extend(spans(&b));
    all.sort();
    assert!(all.len() >= 2, "{all:?}");
    for w in all.windows(2) {
        assert!(w[0].1 <= w[1].0, "lock held by two runs at once: {all:?}");
    }
    // The last to hold the lock recorded its revision beside it.
    assert_eq!(
        f.sh("h1", "cat /run/tend/revision").trim(),
        all.last().unwrap().2
    );
}

#[test]
fn a_host_locked_by_someone_else_is_planned_naming_the_holder() {
    let f = hosts();
    f.sh("h2", "rm -f /srv/lock.log /srv/mark-*");
    let inv = f.inventory(&["h2"]);
    let a = Desired::new(FAST, &inv, &[("h2", &marker("a", 1, 14))]);
    let b = Desired::new(FAST, &inv, &[("h2", &marker("b", 1, 0))]);
    let pa = spawn_apply(&a);
    wait_for(
        "the first apply to hold the lock",
        Duration::from_secs(60),
        || f.ssh("h2", "cat /run/tend/holder").status.success(),
    );
    let holder = f.sh("h2", "cat /run/tend/holder");
    assert!(
        holder.contains("tend apply") && holder.contains(a.state().to_str().unwrap()),
        "{holder}"
    );
    let out = b.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let r = b.last_result();
    let o = outcome(&r, "h2");
    assert_eq!(o["outcome"], "Planned", "{r}");
    assert_eq!(o["dispatch_status"], "not_dispatched", "{r}");
    let reason = o["reason"].as_str().unwrap();
    assert!(
        reason.contains("host lock held") && reason.contains(a.state().to_str().unwrap()),
        "the reason names the holder: {reason}"
    );
    let oa = pa.wait_with_output().unwrap();
    assert_eq!(code(&oa), 0, "{}", text(&oa));
    assert_eq!(f.sh("h2", "cat /srv/lock.log"), "start a\nend a\n");
    // The holder let go: the next pass runs.
    assert!(!f.ssh("h2", "test -e /run/tend/holder").status.success());
    let out = b.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        f.sh("h2", "cat /srv/lock.log"),
        "start a\nend a\nstart b\nend b\n"
    );
}

#[test]
fn a_lock_path_planted_by_another_user_neither_blocks_nor_redirects() {
    let f = hosts();
    // `mallory` owns a trap directory and holds a lock in it; /run/tend is
    // a symlink to it.
    f.sh(
        "h3",
        "id mallory >/dev/null 2>&1 || useradd -m mallory
         rm -rf /run/tend /run/tend.untrusted.* /srv/mark-* /srv/lock.log /home/mallory/trap
         mkdir -p /home/mallory/trap && touch /home/mallory/trap/lock
         chown -R mallory /home/mallory/trap && chmod 0777 /home/mallory/trap
         ln -s /home/mallory/trap /run/tend
         nohup flock /home/mallory/trap/lock sleep 40 >/dev/null 2>&1 &",
    );
    let inv = f.inventory(&["h3"]);
    let d = Desired::new(FAST, &inv, &[("h3", &marker("a", 1, 0))]);
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 0, "not blocked: {}", text(&out));
    assert_eq!(f.sh("h3", "cat /srv/lock.log"), "start a\nend a\n");
    let seen = f.sh(
        "h3",
        "stat -c '%F %U %a' /run/tend; ls /home/mallory/trap; ls -d /run/tend.untrusted.* | wc -l",
    );
    assert_eq!(
        seen, "directory root 700\nlock\n1\n",
        "the symlink was moved aside, nothing written through it"
    );

    // A directory of mallory's at the path, world-writable, with `lock` a
    // symlink to a file of the host's.
    f.sh(
        "h3",
        "rm -rf /run/tend /run/tend.untrusted.*
         echo precious > /srv/precious
         mkdir /run/tend && chown mallory /run/tend && chmod 0777 /run/tend
         ln -s /srv/precious /run/tend/lock",
    );
    let d = Desired::new(FAST, &inv, &[("h3", &marker("a", 2, 0))]);
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        f.sh(
            "h3",
            "cat /srv/precious; stat -c '%F %U %a' /run/tend /run/tend/lock"
        ),
        "precious\ndirectory root 700\nregular empty file root 644\n"
    );
}

#[test]
fn an_apply_from_an_older_checkout_is_refused_unless_allow_older() {
    let f = hosts();
    f.sh("h4", "rm -rf /srv/fence");
    let body = |v: &str| {
        format!("resources:\n  - kind: file\n    path: /srv/fence\n    content: \"{v}\\n\"\n")
    };
    let d = Desired::new(FAST, &f.inventory(&["h4"]), &[("h4", &body("one"))]);
    d.init_git();
    let c1 = support::git(d.dir(), &["rev-parse", "HEAD"]);
    let apply = |extra: &[&str]| {
        let mut args = vec!["apply", "--dispatch", "enforced"];
        args.extend(extra);
        let out = d.tend(&args);
        (code(&out), d.last_result(), text(&out))
    };
    assert_eq!(apply(&[]).0, 0);
    assert_eq!(f.sh("h4", "cat /run/tend/revision").trim(), c1);
    fs::write(d.dir().join("hosts/h4.yaml"), body("two")).unwrap();
    let c2 = d.commit("two");
    assert_eq!(apply(&[]).0, 0);
    assert_eq!(f.sh("h4", "cat /run/tend/revision").trim(), c2);

    // A stale checkout: the older commit, which c2 descends from.
    support::git(d.dir(), &["checkout", "-q", &c1]);
    let (c, r, out) = apply(&[]);
    assert_eq!(c, 3, "{out}");
    let o = outcome(&r, "h4");
    assert_eq!(o["outcome"], "PolicyBlocked", "{r}");
    let msg = o["last_failure_message"].as_str().unwrap();
    assert!(
        msg.contains(&c1) && msg.contains(&c2) && msg.contains("--allow-older"),
        "the reason names both revisions: {msg}"
    );
    assert_eq!(f.sh("h4", "cat /srv/fence"), "two\n", "nothing rolled back");
    let plan = d.tend(&["plan"]);
    assert!(text(&plan).contains("not a descendant"), "{}", text(&plan));

    let (c, r, out) = apply(&["--allow-older"]);
    assert_eq!(c, 0, "{out}");
    assert_eq!(outcome(&r, "h4")["outcome"], "Completed", "{r}");
    assert_eq!(f.sh("h4", "cat /srv/fence"), "one\n");
    assert_eq!(f.sh("h4", "cat /run/tend/revision").trim(), c1);

    // Forward again: c2 descends from c1, no flag needed.
    support::git(d.dir(), &["checkout", "-q", "main"]);
    assert_eq!(apply(&[]).0, 0);
    assert_eq!(f.sh("h4", "cat /srv/fence"), "two\n");
}
