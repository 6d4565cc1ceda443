//! Access as real fleets need it (SPEC 8.9), on real hosts:
//!
//! - `become: sudo`: a non-root login that becomes root through `sudo -n sh
//!   -s`, on systemd host s18 (every resource kind, drift, a held delete
//!   released by its token, one remote command per no-op probe); logins
//!   that sudo refuses fail with `Auth` and say so.
//! - `jump`: the private fleet (tests/fleet/fleet.sh with `TEND_FLEET_NETNS`),
//!   whose h2..h4 live in a network namespace that only its h1 (the bastion)
//!   reaches: they converge through one shared session to h1 (one of them as
//!   `deploy` with sudo); h1 stopped makes them `TransportUnreachable`
//!   naming it; a wrong host key behind the jump is `HostKey`, nothing
//!   written.
//!
//! The tests take turns (they count sessions on shared hosts).

#[path = "support/fleet.rs"]
mod support;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use support::{Desired, Fleet, code, outcome, private_fleet, systemd_fleet, text, wait_for};

const FAST: &str = "probe_timeout: 30s\nretries: 1\nretry_backoff: 50ms\n";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `tend apply --dispatch enforced`: (exit code, result.json).
fn apply(d: &Desired) -> (i32, Value) {
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    let c = code(&out);
    assert!(
        [0, 2, 3, 4].contains(&c),
        "apply exited {c}: {}",
        text(&out)
    );
    (c, d.last_result())
}

/// An inventory entry logging in as `user`, with `extra` lines (`become`,
/// `jump`) and the host's real key pinned.
fn entry(f: &Fleet, name: &str, host: &str, user: &str, extra: &[&str]) -> String {
    let h = f.host(host);
    let mut s = format!(
        "  - name: {name}\n    address: {}\n    user: {user}\n    identity: {}\n    host_key: \"{}\"\n",
        h.address,
        f.key.display(),
        h.fingerprint
    );
    for e in extra {
        s.push_str(&format!("    {e}\n"));
    }
    s
}

/// On systemd host `host`, as root: logins `deploy` (sudo without a
/// password), `pwuser` (sudo with a password) and `nosudo` (no rule), each
/// with the fleet's key.
fn sudo_users(f: &Fleet, host: &str) {
    f.sh(
        host,
        r#"set -e
for u in deploy pwuser nosudo; do
  id "$u" >/dev/null 2>&1 || useradd -m -s /bin/bash "$u"
  usermod -p '*' "$u"
  install -d -o "$u" -g "$u" -m 0700 "/home/$u/.ssh"
  install -o "$u" -g "$u" -m 0600 /root/.ssh/authorized_keys "/home/$u/.ssh/authorized_keys"
done
echo 'deploy ALL=(root) NOPASSWD: ALL' > /etc/sudoers.d/tend-deploy
echo 'pwuser ALL=(root) ALL' > /etc/sudoers.d/tend-pwuser
chmod 0440 /etc/sudoers.d/tend-deploy /etc/sudoers.d/tend-pwuser
"#,
    );
}

/// Sessions sshd started for `user` on a systemd host (its journal).
fn sd_commands(f: &Fleet, host: &str, user: &str) -> usize {
    f.sh(
        host,
        &format!("journalctl -u ssh.service -o cat --no-pager | grep -c 'Starting session: command for {user} ' || true"),
    )
    .trim()
    .parse()
    .unwrap()
}

fn awaiting_operation(d: &Desired, host: &str) -> String {
    let p = d.state().join("status").join(format!("{host}.json"));
    let s: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    s["awaiting_confirmation"]["operation"]
        .as_str()
        .unwrap_or_else(|| panic!("no operation waits: {s}"))
        .to_string()
}

const EVERY_KIND: &str = r#"
resources:
  - kind: group
    name: tksudo
  - kind: user
    name: tksudo
    groups: [tksudo]
    shell: /bin/sh
  - kind: directory
    path: /srv/sudo
    owner: tksudo
    group: tksudo
    mode: "0750"
  - kind: file
    path: /srv/sudo/app.conf
    content: "port = 8080\n"
    owner: tksudo
    mode: "0640"
  - kind: file
    path: /srv/sudo/old.conf
    state: absent
  - kind: symlink
    path: /srv/sudo/current
    target: /srv/sudo/app.conf
  - kind: package
    name: sudo
  - kind: command
    name: init-marker
    run: id -u > /srv/sudo/.initialized
    creates: /srv/sudo/.initialized
    requires: ["directory:/srv/sudo"]
  - kind: service
    name: tend-demo
    restart_on: ["file:/srv/sudo/app.conf"]
"#;

#[test]
fn become_sudo_converges_every_kind_corrects_drift_and_runs_a_held_delete() {
    let _turn = serial();
    let f = systemd_fleet();
    let h = "s18";
    sudo_users(f, h);
    f.sh(
        h,
        "systemctl disable --now tend-demo.service 2>/dev/null; rm -rf /srv/sudo; userdel tksudo 2>/dev/null; groupdel tksudo 2>/dev/null; mkdir -p /srv/sudo && echo old > /srv/sudo/old.conf",
    );
    let inventory = format!("hosts:\n{}", entry(f, h, h, "deploy", &["become: sudo"]));
    let d = Desired::new(FAST, &inventory, &[(h, EVERY_KIND)]);

    // Everything but the delete converges; the delete waits for its token.
    let (c, r) = apply(&d);
    assert_eq!(c, 3, "{r:#}");
    assert_eq!(outcome(&r, h)["outcome"], "EscalationRequired", "{r:#}");
    let op = awaiting_operation(&d, h);
    assert_eq!(f.sh(h, "test -e /srv/sudo/old.conf && echo kept"), "kept\n");
    let out = d.tend(&["confirm", &op, "--reason", "approved in a test"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(outcome(&r, h)["outcome"], "Completed", "{r:#}");
    assert_eq!(
        f.sh(
            h,
            "stat -c '%U %G %a' /srv/sudo /srv/sudo/app.conf; readlink /srv/sudo/current; cat /srv/sudo/.initialized; id -nG tksudo; dpkg-query -W -f '${Status}\\n' sudo; systemctl is-active tend-demo.service; test -e /srv/sudo/old.conf || echo deleted"
        ),
        "tksudo tksudo 750\ntksudo root 640\n/srv/sudo/app.conf\n0\ntksudo\ninstall ok installed\nactive\ndeleted\n",
        "every kind, as root"
    );

    // Drift by hand is corrected through sudo.
    f.sh(
        h,
        "echo tampered >> /srv/sudo/app.conf; systemctl stop tend-demo.service",
    );
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    assert_eq!(outcome(&r, h)["outcome"], "Completed", "{r:#}");
    assert_eq!(
        f.sh(
            h,
            "cat /srv/sudo/app.conf; systemctl is-active tend-demo.service"
        ),
        "port = 8080\nactive\n"
    );

    // A no-op probe is one remote command.
    let before = sd_commands(f, h, "deploy");
    let out = d.tend(&["plan", "--json"]);
    assert_eq!(code(&out), 0, "nothing to do: {}", text(&out));
    wait_for(
        "the probe's session in the journal",
        Duration::from_secs(30),
        || sd_commands(f, h, "deploy") > before,
    );
    assert_eq!(
        sd_commands(f, h, "deploy"),
        before + 1,
        "one remote command per no-op probe"
    );
}

#[test]
fn logins_that_sudo_refuses_fail_with_auth_and_say_so() {
    let _turn = serial();
    let f = systemd_fleet();
    let h = "s18";
    sudo_users(f, h);
    for user in ["nosudo", "pwuser"] {
        let inventory = format!("hosts:\n{}", entry(f, h, h, user, &["become: sudo"]));
        let d = Desired::new(
            FAST,
            &inventory,
            &[(
                h,
                "resources:\n  - kind: file\n    path: /srv/refused\n    content: x\n",
            )],
        );
        let (c, r) = apply(&d);
        assert_ne!(c, 0, "{r:#}");
        let o = outcome(&r, h);
        assert_eq!(o["outcome"], "PreflightFailed", "{user}: {r:#}");
        assert_eq!(o["last_failure_class"], "Auth", "{user}: {r:#}");
        let msg = o["last_failure_message"].as_str().unwrap();
        assert!(
            msg.contains("sudo refused")
                && msg.contains(&format!("`{user}`"))
                && msg.contains("a password is required"),
            "{user}: {msg}"
        );
        assert_eq!(f.sh(h, "test -e /srv/refused || echo absent"), "absent\n");
    }
}

/// Private-fleet host `hI` as root: a `deploy` login (the machine's uid,
/// which fleet.sh made) with sudo without a password.
fn private_deploy(f: &Fleet, host: &str) {
    f.sh(
        host,
        "id deploy >/dev/null 2>&1 || useradd -u 60100 -M -d / -s /bin/bash deploy; echo 'deploy ALL=(root) NOPASSWD: ALL' > /etc/sudoers.d/tend-deploy; chmod 0440 /etc/sudoers.d/tend-deploy",
    );
}

fn body(name: &str) -> String {
    format!(
        "resources:\n  - kind: directory\n    path: /srv/jump\n  - kind: file\n    path: /srv/jump/{name}.conf\n    content: \"I am {name}\\n\"\n"
    )
}

#[test]
fn hosts_behind_a_bastion_converge_through_one_shared_session() {
    let _turn = serial();
    let f = private_fleet();
    for h in ["h1", "h2", "h3"] {
        f.sh(h, "rm -rf /srv/jump");
    }
    private_deploy(f, "h3");
    // The controller has no route to the hosts behind the bastion.
    let direct = std::net::TcpStream::connect_timeout(
        &f.host("h2")
            .address
            .parse::<std::net::IpAddr>()
            .map(|a| (a, 22).into())
            .unwrap(),
        Duration::from_secs(3),
    );
    assert!(direct.is_err(), "h2 must be out of the controller's reach");

    let inventory = format!(
        "hosts:\n{}{}{}",
        entry(f, "bastion", "h1", "root", &[]),
        entry(f, "p2", "h2", "root", &["jump: bastion"]),
        entry(f, "p3", "h3", "deploy", &["become: sudo", "jump: bastion"]),
    );
    let d = Desired::new(
        FAST,
        &inventory,
        &[
            ("bastion", &body("bastion")),
            ("p2", &body("p2")),
            ("p3", &body("p3")),
        ],
    );
    let before = f.connections("h1");
    let (c, r) = apply(&d);
    assert_eq!(c, 0, "{r:#}");
    for h in ["bastion", "p2", "p3"] {
        assert_eq!(outcome(&r, h)["outcome"], "Completed", "{h}: {r:#}");
    }
    assert_eq!(f.sh("h2", "cat /srv/jump/p2.conf"), "I am p2\n");
    assert_eq!(
        f.sh("h3", "cat /srv/jump/p3.conf; stat -c %U /srv/jump/p3.conf"),
        "I am p3\nroot\n"
    );
    // One connection for the bastion's own work, one jump session shared
    // by both hosts behind it.
    assert_eq!(
        f.connections("h1") - before,
        2,
        "connections to the bastion"
    );

    // A second run finds nothing to do, through the bastion again.
    let out = d.tend(&["plan", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
}

#[test]
fn a_stopped_bastion_makes_its_hosts_unreachable_naming_it() {
    let _turn = serial();
    let f = private_fleet();
    let inventory = format!(
        "hosts:\n{}{}",
        entry(f, "bastion", "h1", "root", &[]),
        entry(f, "p2", "h2", "root", &["jump: bastion"]),
    );
    let d = Desired::new(
        FAST,
        &inventory,
        &[("bastion", &body("bastion")), ("p2", &body("p2"))],
    );
    let _down = f.stopped("h1");
    let (c, r) = apply(&d);
    assert_ne!(c, 0, "{r:#}");
    let o = outcome(&r, "p2");
    assert_eq!(o["outcome"], "TransportUnreachable", "{r:#}");
    let msg = o["last_failure_message"].as_str().unwrap();
    assert!(msg.contains("jump host `bastion`"), "{msg}");
    assert_eq!(
        outcome(&r, "bastion")["outcome"],
        "TransportUnreachable",
        "{r:#}"
    );
}

#[test]
fn a_wrong_host_key_behind_the_jump_is_hostkey_and_nothing_is_written() {
    let _turn = serial();
    let f = private_fleet();
    f.sh("h2", "rm -rf /srv/jumpkey");
    // The jump host by address, its key from known_hosts; the target pinned
    // to another host's key.
    let inventory = format!(
        "hosts:\n  - name: p2\n    address: {}\n    identity: {}\n    host_key: \"{}\"\n    jump: root@{}:22\n",
        f.host("h2").address,
        f.key.display(),
        f.host("h3").fingerprint,
        f.host("h1").address,
    );
    let d = Desired::new(
        &format!("{FAST}known_hosts: {}\n", f.known_hosts.display()),
        &inventory,
        &[(
            "p2",
            "resources:\n  - kind: file\n    path: /srv/jumpkey/x\n    content: x\n",
        )],
    );
    let (c, r) = apply(&d);
    assert_ne!(c, 0, "{r:#}");
    let o = outcome(&r, "p2");
    assert_eq!(o["last_failure_class"], "HostKey", "{r:#}");
    assert_eq!(o["outcome"], "PreflightFailed", "{r:#}");
    let msg = o["last_failure_message"].as_str().unwrap();
    assert!(
        msg.contains("host key mismatch") && msg.contains("host `p2`"),
        "{msg}"
    );
    assert_eq!(
        f.sh("h2", "test -e /srv/jumpkey || echo absent"),
        "absent\n"
    );
}

#[test]
fn the_jump_session_is_opened_again_after_the_bastion_restarts() {
    use tend::transport::Transport;
    use tend::transport::ssh::{SshTarget, SshTransport};
    let _turn = serial();
    let f = private_fleet();
    let target = |h: &str, jump| SshTarget {
        host: h.into(),
        address: f.host(h).address.clone(),
        port: 22,
        user: "root".into(),
        identity: Some(f.key.clone()),
        host_key: Some(f.host(h).fingerprint.clone()),
        known_hosts: f.known_hosts.clone(),
        become_sudo: false,
        jump,
    };
    let jump = tend::transport::jump::shared(target("h1", None));
    let t = SshTransport::new(target("h2", Some(jump)));
    let run = |t: &SshTransport| t.exec("hostname", &[], Duration::from_secs(20));
    assert_eq!(run(&t).expect("through the bastion").stdout, b"h2\n");
    {
        let _down = f.stopped("h1");
        // The session through the dead jump session fails; the next
        // command tries the jump host again and says so.
        assert!(run(&t).is_err(), "a session through a dead jump session");
        let e = run(&t).unwrap_err();
        assert_eq!(e.class, tend::core::retry::FailureClass::Transient, "{e}");
        assert!(
            e.message.contains("host `h2`") && e.message.contains("through jump host `h1`"),
            "{e}"
        );
    }
    // Back up (fleet.sh checked it with a session of its own by now).
    let before = f.connections("h1");
    assert_eq!(run(&t).expect("the bastion is back").stdout, b"h2\n");
    assert_eq!(
        f.connections("h1") - before,
        1,
        "one new jump session after the restart"
    );
}
