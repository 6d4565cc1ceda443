//! The step builders against real hosts (tests/fleet/fleet.sh): a step never
//! removes or replaces an object of another type than the plan saw at its
//! path (SPEC 8.1), every step that can be is safe to run twice (SPEC 8.3),
//! and a host with ten thousand managed files probes in time.
//!
//! Hosts: h62 (a file appearing at a symlink's path during apply), h63
//! (accounts and packages run twice), h64 (a probe of 10,000 files), s12
//! (service steps run twice).

#[path = "support/fleet.rs"]
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use support::{Desired, Fleet, code, fleet, outcome, systemd_fleet, text};
use tend::apply::{self, PackageManager, PathType, RemoteCommand, UserFields};
use tend::transport::Transport;
use tend::transport::ssh::{SshTarget, SshTransport};

fn inventory(f: &Fleet, hosts: &[&str]) -> String {
    f.inventory(hosts)
}

/// tend's own transport to a fleet host, as a run uses it.
fn transport(f: &Fleet, host: &str) -> SshTransport {
    let h = f.host(host);
    SshTransport::new(SshTarget {
        host: host.into(),
        address: h.address.clone(),
        port: 22,
        user: "root".into(),
        identity: Some(f.key.clone()),
        host_key: Some(h.fingerprint.clone()),
        known_hosts: f.known_hosts.clone(),
        become_sudo: false,
        jump: None,
    })
}

/// Runs a step's command; (exit status, stdout, stderr).
fn exec(t: &SshTransport, cmd: &RemoteCommand) -> (i32, String, String) {
    let out = t
        .exec(&cmd.script, &cmd.stdin, Duration::from_secs(300))
        .expect("exec over ssh");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const FAST: &str = "probe_timeout: 10s\nretries: 2\nretry_backoff: 50ms\n";

/// The plan sees nothing at the symlink's path; a command that runs first in
/// the same apply puts a regular file there (as a package's postinst or an
/// administrator might, between probe and step). The symlink step finds it,
/// fails with class `Execution` naming the path and what it found, and the
/// file is left as it was: no unplanned destruction without a token.
#[test]
fn a_file_that_appears_at_a_symlinks_path_after_the_probe_is_not_replaced() {
    let f = fleet();
    f.sh("h62", "rm -rf /srv/race && mkdir -p /srv/race");
    let host = r#"
resources:
  - kind: command
    name: appear
    run: "printf 'precious\n' > /srv/race/link"
  - kind: symlink
    path: /srv/race/link
    target: /srv/race/elsewhere
    requires: [command:appear]
"#;
    let d = Desired::new(FAST, &inventory(f, &["h62"]), &[("h62", host)]);
    let plan = d.tend(&["plan", "--json"]);
    assert_eq!(code(&plan), 2, "{}", text(&plan));
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    assert_eq!(code(&out), 4, "{}", text(&out));
    let r = d.last_result();
    let o = outcome(&r, "h62");
    assert_eq!(o["last_failure_class"], "Execution", "{r:#}");
    let step = o["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "symlink:/srv/race/link")
        .unwrap_or_else(|| panic!("no symlink step in {r:#}"));
    assert_eq!(step["status"], "failed", "{r:#}");
    let log = std::fs::read_to_string(d.state().join(step["log"].as_str().unwrap())).unwrap();
    assert!(
        log.contains(
            "tend: /srv/race/link: found a regular file where the plan saw nothing; not replaced"
        ),
        "{log}"
    );
    assert_eq!(
        f.sh(
            "h62",
            "[ -f /srv/race/link ] && [ ! -L /srv/race/link ] && cat /srv/race/link; ls -A /srv/race"
        ),
        "precious\nlink\n",
        "the file is untouched and no temporary is left"
    );

    // The same check for every other kind of step, straight through tend's
    // transport: a directory where the plan saw a symlink (a retarget), a
    // symlink where it saw nothing (a file write), a file where it saw a
    // directory (a removal).
    let t = transport(f, "h62");
    f.sh(
        "h62",
        "mkdir /srv/race/d && touch /srv/race/d/keep && ln -s /etc/passwd /srv/race/l && touch /srv/race/f",
    );
    for (cmd, path, found, saw, verb) in [
        (
            apply::make_symlink("/srv/race/d", "x", PathType::Symlink),
            "/srv/race/d",
            "a directory",
            "a symlink",
            "not replaced",
        ),
        (
            apply::write_file_at("/srv/race/l", b"x", None, None, None, PathType::Nothing),
            "/srv/race/l",
            "a symlink",
            "nothing",
            "not replaced",
        ),
        (
            apply::remove_directory("/srv/race/f", PathType::Directory),
            "/srv/race/f",
            "a regular file",
            "a directory",
            "not removed",
        ),
    ] {
        let (status, _, stderr) = exec(&t, &cmd);
        assert_eq!(status, 1, "{stderr}");
        assert_eq!(
            stderr,
            format!("tend: {path}: found {found} where the plan saw {saw}; {verb}\n")
        );
    }
    assert_eq!(
        f.sh(
            "h62",
            "ls /srv/race/d; readlink /srv/race/l; [ -f /srv/race/f ] && echo file"
        ),
        "keep\n/etc/passwd\nfile\n"
    );
}

/// What a step may have changed on an account or package host: the
/// databases' content, inode and mtime, and the home directories.
fn account_snapshot(f: &Fleet, host: &str) -> String {
    f.sh(
        host,
        "for x in /etc/passwd /etc/group /etc/shadow /etc/gshadow /var/lib/dpkg/status; do \
           stat -c '%n %i %Y %Z' \"$x\"; sha256sum < \"$x\"; done; \
         ls -la --time-style=full-iso /home",
    )
}

/// Every account and package step run twice in a row on a real host: the
/// second run succeeds and changes nothing.
#[test]
fn account_and_package_steps_run_twice_change_nothing_the_second_time() {
    let f = fleet();
    f.sh(
        "h63",
        "userdel -r tendb >/dev/null 2>&1; groupdel tendb >/dev/null 2>&1; \
         groupdel tendbg >/dev/null 2>&1; dpkg --purge hello >/dev/null 2>&1; true",
    );
    let t = transport(f, "h63");
    let groups = vec!["tendbg".to_string()];
    let steps: Vec<(&str, RemoteCommand)> = vec![
        ("create group", apply::create_group("tendbg", Some(4321))),
        ("modify group", apply::modify_group("tendbg", 4323)),
        (
            "create user",
            apply::create_user(
                "tendb",
                UserFields {
                    uid: Some(4322),
                    home: Some("/home/tendb"),
                    shell: Some("/bin/sh"),
                    groups: Some(&groups),
                },
                false,
            ),
        ),
        (
            "modify user",
            apply::modify_user(
                "tendb",
                UserFields {
                    shell: Some("/bin/bash"),
                    groups: Some(&[]),
                    ..UserFields::default()
                },
            ),
        ),
        (
            "install package",
            apply::install_packages(PackageManager::Apt, &["hello"]),
        ),
        (
            "remove package",
            apply::remove_packages(PackageManager::Apt, &["hello"]),
        ),
        ("delete user", apply::delete_user("tendb")),
        ("delete group", apply::delete_group("tendbg")),
    ];
    for (name, cmd) in &steps {
        let (status, _, stderr) = exec(&t, cmd);
        assert_eq!(status, 0, "{name}, first run: {stderr}");
        let before = account_snapshot(f, "h63");
        let (status, stdout, stderr) = exec(&t, cmd);
        assert_eq!(status, 0, "{name}, second run: {stdout}{stderr}");
        assert_eq!(
            account_snapshot(f, "h63"),
            before,
            "{name}: the second run changed the host"
        );
        if *name == "create user" {
            assert_eq!(
                f.sh("h63", "getent passwd tendb | cut -d: -f3,6,7; id -nG tendb"),
                "4322:/home/tendb:/bin/sh\ntendb tendbg\n"
            );
        }
    }
    f.sh(
        "h63",
        "rm -rf /home/tendb; groupdel tendb >/dev/null 2>&1; true",
    );
}

/// Service steps run twice on a host with systemd: enabling and starting an
/// enabled, active unit does not start it again (same invocation), and
/// disabling and stopping what is off changes nothing either.
#[test]
fn service_steps_run_twice_change_nothing_the_second_time() {
    let f = systemd_fleet();
    let reset = "systemctl disable --now tend-demo.service 2>/dev/null; \
                 systemctl reset-failed tend-demo.service 2>/dev/null; true";
    f.sh("s12", reset);
    let t = transport(f, "s12");
    let state = || {
        f.sh(
            "s12",
            "systemctl show -p InvocationID,ActiveState,UnitFileState --value tend-demo.service",
        )
    };
    for (name, cmd) in [
        (
            "enable and start",
            apply::service::converge("tend-demo", Some(true), Some(true), false),
        ),
        (
            "start",
            apply::service::converge("tend-demo", None, Some(true), false),
        ),
        (
            "stop and disable",
            apply::service::converge("tend-demo", Some(false), Some(false), false),
        ),
        (
            "stop",
            apply::service::converge("tend-demo", None, Some(false), false),
        ),
    ] {
        let (status, _, stderr) = exec(&t, &cmd);
        assert_eq!(status, 0, "{name}, first run: {stderr}");
        let before = state();
        let (status, _, stderr) = exec(&t, &cmd);
        assert_eq!(status, 0, "{name}, second run: {stderr}");
        assert_eq!(state(), before, "{name}: the second run changed the unit");
    }
    f.sh("s12", reset);
}

/// A host with `n` existing files under /srv/many, all managed: the desired
/// state, after making the files on the host with one ssh command.
fn many_files(f: &Fleet, host: &str, n: usize) -> Desired {
    f.sh(
        host,
        &format!(
            "rm -rf /srv/many && mkdir -p /srv/many && cd /srv/many && \
             i=0; while [ $i -lt {n} ]; do echo $i > f$i; i=$((i+1)); done"
        ),
    );
    let mut body = String::from("resources:\n  - kind: directory\n    path: /srv/many\n");
    for i in 0..n {
        writeln!(
            body,
            "  - kind: file\n    path: /srv/many/f{i}\n    content: \"{i}\\n\""
        )
        .unwrap();
    }
    Desired::new(
        "probe_timeout: 10s\nretries: 0\n",
        &inventory(f, &[host]),
        &[(host, &body)],
    )
}

/// The probe is linear in the number of paths: a host with 10,000 managed
/// files (all as desired) probes within a 10 s `probe_timeout`, and its plan
/// is empty. (Before, the probe's script rebuilt its argument list once per
/// file: 21 s for 10,000.) The time is printed, not asserted.
#[test]
fn a_host_with_ten_thousand_managed_files_probes_within_the_timeout() {
    let f = fleet();
    for n in [1_000, 10_000] {
        let d = many_files(f, "h64", n);
        let t0 = Instant::now();
        let out = d.tend(&["plan"]);
        let took = t0.elapsed();
        assert_eq!(code(&out), 0, "{n} files: {}", text(&out));
        eprintln!(
            "plan of one host with {n} managed files (validate, probe, diff): {:.2} s",
            took.as_secs_f64()
        );
    }
    f.sh("h64", "rm -rf /srv/many");
}
