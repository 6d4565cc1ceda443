//! The state dir's trust rules (SPEC 8.4) and history retention (SPEC 8.5),
//! through the real binary on `transport: local` fixtures.
//!
//! Several tests change file owners (to `nobody`) or groups, so they expect
//! to run as root, as the project's tests and CI do.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{Fixture, run_command};
use serde_json::Value;

/// One `transport: local` host `a` whose file `old.conf` is to be deleted:
/// a destructive step that needs a token.
fn delete_fixture() -> Fixture {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n",
    );
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/old.conf\n    state: absent\n",
    );
    fs::write(fx.root().join("old.conf"), "old\n").unwrap();
    fx
}

fn apply(fx: &Fixture, code: i32) -> Value {
    let r = fx.run(&["apply", "--json", "--dispatch", "enforced"]);
    r.code(code);
    r.json()
}

/// `delete_fixture` applied once: the delete awaits operation `op`.
fn awaiting() -> (Fixture, String) {
    let fx = delete_fixture();
    apply(&fx, 3);
    let op = fx.status("a")["awaiting_confirmation"]["operation"]
        .as_str()
        .unwrap()
        .to_string();
    (fx, op)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn at(t: i64) -> String {
    tend::core::token::format_rfc3339(t)
}

fn token_body(op: &str, expires: &str) -> String {
    format!("operation: {op}\nhosts: [a]\nexpires: {expires}\nreason: clean up\n")
}

fn write_token(fx: &Fixture, name: &str, body: &str) -> PathBuf {
    let path = fx.state().join("confirm").join(name);
    fs::write(&path, body).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The `token_checked` events of a run's timeline: file -> refusal.
fn token_checks(fx: &Fixture, result: &Value) -> Vec<(String, Option<String>)> {
    let id = result["run_id"].as_str().unwrap();
    let text = fs::read_to_string(fx.state().join("runs").join(id).join("timeline.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "token_checked")
        .map(|e| {
            (
                e["file"].as_str().unwrap().to_string(),
                e["refusal"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn refusal_of(checks: &[(String, Option<String>)], file: &str) -> String {
    checks
        .iter()
        .find(|(f, _)| f == file)
        .unwrap_or_else(|| panic!("{file} not listed in {checks:?}"))
        .1
        .clone()
        .unwrap_or_else(|| panic!("{file} not refused: {checks:?}"))
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

// ---------------------------------------------------------------------------
// Token parser: no input panics
// ---------------------------------------------------------------------------

#[test]
fn tokens_with_non_ascii_or_odd_offsets_are_refused_without_a_panic() {
    let (fx, op) = awaiting();
    let exp = at(now() + 600);
    write_token(&fx, "a.yaml", &token_body("aéééééééééééé", &exp));
    write_token(&fx, "b.yaml", &token_body(&op, "2026-11-23T12:00:00+0é:0"));
    write_token(&fx, "c.yaml", "\u{feff}operation: é\n");
    let result = apply(&fx, 3);
    let checks = token_checks(&fx, &result);
    assert!(refusal_of(&checks, "confirm/a.yaml").contains("is for operation aééé"));
    assert!(refusal_of(&checks, "confirm/b.yaml").contains("not an RFC 3339 time"));
    assert!(refusal_of(&checks, "confirm/c.yaml").contains("malformed"));
    assert!(fx.root().join("old.conf").exists());
}

// ---------------------------------------------------------------------------
// Token files: type, owner, mode, directory, first seen
// ---------------------------------------------------------------------------

#[test]
fn symlink_fifo_and_directory_tokens_are_listed_with_reasons_and_never_block() {
    let (fx, op) = awaiting();
    let confirm = fx.state().join("confirm");
    let good = fx.tmp().join("elsewhere.yaml");
    fs::write(&good, token_body(&op, &at(now() + 600))).unwrap();
    symlink(&good, confirm.join("link.yaml")).unwrap();
    let fifo = std::ffi::CString::new(confirm.join("fifo.yaml").to_str().unwrap()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    fs::create_dir(confirm.join("dir.yaml")).unwrap();
    // A pass that opened the FIFO for reading would block here for ever;
    // the test harness's own timeout is the backstop.
    let result = apply(&fx, 3);
    let checks = token_checks(&fx, &result);
    assert!(refusal_of(&checks, "confirm/link.yaml").contains("symlink"));
    assert!(refusal_of(&checks, "confirm/fifo.yaml").contains("a FIFO, not a regular file"));
    assert!(refusal_of(&checks, "confirm/dir.yaml").contains("a directory, not a regular file"));
    assert!(fx.root().join("old.conf").exists(), "no token was valid");
}

#[test]
fn a_token_owned_by_another_user_is_refused() {
    let (fx, op) = awaiting();
    let path = write_token(&fx, "t.yaml", &token_body(&op, &at(now() + 600)));
    // uid 65534 is `nobody`: not tend's user, not root, not a confirmer.
    std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    let result = apply(&fx, 3);
    let checks = token_checks(&fx, &result);
    assert!(refusal_of(&checks, "confirm/t.yaml").contains("owned by uid 65534"));
    assert!(fx.root().join("old.conf").exists());
    let status = fx.status("a");
    let shown = status.to_string();
    assert!(shown.contains("owned by uid 65534"), "{status:#}");

    // The same owner listed in `confirmers` may confirm: the same token is
    // now trusted (a change to tend.yaml leaves the operation as it is,
    // SPEC 8.1).
    fx.write("tend.yaml", "confirmers: [nobody]\n");
    let result = apply(&fx, 0);
    assert_eq!(result["confirmation"]["operation"], op.as_str());
    assert_eq!(result["confirmation"]["token_file"], "confirm/t.yaml");
    assert_eq!(result["confirmation"]["refusal"], Value::Null, "{result:#}");
    assert!(!fx.root().join("old.conf").exists());
}

#[test]
fn tokens_in_a_world_writable_confirm_dir_are_refused() {
    let (fx, op) = awaiting();
    write_token(&fx, "t.yaml", &token_body(&op, &at(now() + 600)));
    let confirm = fx.state().join("confirm");
    fs::set_permissions(&confirm, fs::Permissions::from_mode(0o777)).unwrap();
    // `tend plan` reads without changing anything: it reports the refusal.
    let plan = fx.run(&["plan"]);
    assert!(plan.stdout.contains("world-writable"), "{plan}");
    // `tend apply` tightens the directory it owns before reading tokens, so
    // the token decides on its own merits.
    let result = apply(&fx, 0);
    assert_eq!(mode_of(&confirm), 0o700);
    assert_eq!(result["confirmation"]["refusal"], Value::Null);
}

#[test]
fn a_future_mtime_does_not_stretch_token_max_ttl() {
    let (fx, op) = awaiting();
    // Two hours out with token_max_ttl 1h: valid only if the file counted
    // as written an hour or more from now.
    let path = write_token(&fx, "t.yaml", &token_body(&op, &at(now() + 7200)));
    let f = fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(86400))
        .unwrap();
    drop(f);
    let result = apply(&fx, 3);
    let checks = token_checks(&fx, &result);
    assert!(
        refusal_of(&checks, "confirm/t.yaml").contains("token_max_ttl"),
        "{checks:?}"
    );
    assert!(fx.root().join("old.conf").exists());
}

// ---------------------------------------------------------------------------
// The state dir: modes, lock
// ---------------------------------------------------------------------------

fn with_umask(cmd: &mut std::process::Command, mask: libc::mode_t) {
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask);
            Ok(())
        });
    }
}

#[test]
fn the_state_dir_is_private_whatever_the_umask() {
    let fx = delete_fixture();
    let mut cmd = fx.cmd(&["apply"]);
    with_umask(&mut cmd, 0);
    run_command(cmd).code(3);
    assert_eq!(mode_of(&fx.state()), 0o700);
    assert_eq!(mode_of(&fx.state().join("confirm")), 0o700);
    assert_eq!(mode_of(&fx.state().join("confirm/used")), 0o700);
}

#[test]
fn a_confirmers_group_gets_its_modes_and_group_tokens() {
    let fx = delete_fixture();
    // Root's group: one this process may give its files.
    fx.write("tend.yaml", "confirmers: ['@root']\n");
    let mut cmd = fx.cmd(&["apply", "--dispatch", "enforced"]);
    with_umask(&mut cmd, 0);
    run_command(cmd).code(3);
    let op = fx.status("a")["awaiting_confirmation"]["operation"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(mode_of(&fx.state()), 0o750);
    assert_eq!(mode_of(&fx.state().join("confirm")), 0o1770);
    assert_eq!(fs::metadata(fx.state().join("confirm")).unwrap().gid(), 0);
    let mut cmd = fx.cmd(&["confirm", &op, "--reason", "clean up"]);
    with_umask(&mut cmd, 0);
    run_command(cmd).code(0);
    let token = fx.state().join(format!("confirm/{op}.yaml"));
    assert_eq!(mode_of(&token), 0o640);
    assert_eq!(fs::metadata(&token).unwrap().gid(), 0);
    apply(&fx, 0);
    assert!(!fx.root().join("old.conf").exists());
}

#[test]
fn a_lock_symlink_is_refused_and_its_target_untouched() {
    let fx = delete_fixture();
    fs::create_dir_all(fx.state()).unwrap();
    let victim = fx.tmp().join("victim");
    fs::write(&victim, "precious\n").unwrap();
    symlink(&victim, fx.state().join("lock")).unwrap();
    let r = fx.run(&["apply"]);
    r.code(1);
    assert!(r.stderr.contains("lock file is a symlink"), "{r}");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
}

// ---------------------------------------------------------------------------
// The desired-state dir: files/, state_dir placement
// ---------------------------------------------------------------------------

#[test]
fn files_as_a_symlink_out_of_the_desired_state_is_a_validation_error() {
    let fx = Fixture::new();
    let outside = fx.tmp().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), "secret\n").unwrap();
    symlink(&outside, fx.dir().join("files")).unwrap();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n",
    );
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/f\n    source: secret\n",
    );
    let r = fx.run(&["validate"]);
    r.code(1);
    assert!(
        r.stdout.contains("hosts/a.yaml:4:") || r.stderr.contains("hosts/a.yaml:4:"),
        "{r}"
    );
    assert!(
        format!("{r}").contains("source files/secret: files/ resolves to"),
        "{r}"
    );

    // A `files` symlink that stays inside the desired-state dir is fine.
    fs::remove_file(fx.dir().join("files")).unwrap();
    fx.write("shared/secret", "not secret\n");
    symlink("shared", fx.dir().join("files")).unwrap();
    fx.run(&["validate"]).code(0);
}

#[test]
fn a_state_dir_inside_hosts_groups_or_files_is_an_error() {
    for sd in ["hosts/.tend", "./groups/x", "a/../files/st"] {
        let fx = delete_fixture();
        fx.write("tend.yaml", &format!("state_dir: {sd}\n"));
        let r = fx.run(&["validate"]);
        r.code(1);
        assert!(format!("{r}").contains("tend.yaml:1:12"), "{sd}: {r}");
        assert!(format!("{r}").contains("holds desired state"), "{sd}: {r}");
    }
    // `../hosts` is outside the desired-state dir: allowed.
    let fx = delete_fixture();
    fx.write("tend.yaml", "state_dir: ../hosts/st\n");
    fx.run(&["validate"]).code(0);
    // An absolute path or --state-dir into hosts/ is refused when resolved.
    let fx = delete_fixture();
    let inside = fx.dir().join("hosts/st");
    let r = fx.run(&["apply", "--state-dir", inside.to_str().unwrap()]);
    r.code(1);
    assert!(r.stderr.contains("lies inside hosts/"), "{r}");
    assert!(!inside.exists());
}

// ---------------------------------------------------------------------------
// Retention at the end of `tend apply`
// ---------------------------------------------------------------------------

#[test]
fn apply_ends_with_history_retention() {
    let fx = Fixture::two_hosts();
    let first = fx.run(&["apply", "--json"]);
    first.code(2);
    let first = first.json()["run_id"].as_str().unwrap().to_string();
    // Age the first run by two months, as if it were recorded then.
    let db = rusqlite::Connection::open(fx.state().join("tend.db")).unwrap();
    db.execute(
        "UPDATE runs SET started_at = '2020-01-01T00:00:00.000Z' WHERE run_id = ?1",
        [&first],
    )
    .unwrap();
    drop(db);
    // A directory a crash left without its rows, and an old used token.
    let orphan = fx.state().join("runs/r-20200101T000000Z-dead");
    fs::create_dir_all(&orphan).unwrap();
    let used = fx
        .state()
        .join("confirm/used/r-20200101T000000Z-dead-t.yaml");
    fs::write(&used, "x").unwrap();
    fs::File::options()
        .write(true)
        .open(&used)
        .unwrap()
        .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800))
        .unwrap();

    fx.run(&["apply", "--json"]).code(2);
    assert!(
        !fx.state().join("runs").join(&first).exists(),
        "aged run removed"
    );
    assert!(!orphan.exists(), "orphan removed");
    assert!(!used.exists(), "old used token removed");
    let db = rusqlite::Connection::open(fx.state().join("tend.db")).unwrap();
    let n: i64 = db
        .query_row(
            "SELECT count(*) FROM runs WHERE run_id = ?1",
            [&first],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0);
    let left: i64 = db
        .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 1, "the newest run of each host stays");
}

#[test]
fn confirmers_and_history_are_validated() {
    for (yaml, want) in [
        (
            "confirmers: ['@a', '@b']\n",
            "tend.yaml:1:13: confirmers may name at most one `@group`",
        ),
        ("confirmers: ['@']\n", "is not a user name or `@group` name"),
        (
            "history:\n  keep: 30d\n  keep_destructive: 7d\n",
            "tend.yaml:2:3: history: `keep_destructive` must be at least `keep`",
        ),
        ("history:\n  keep: 0s\n", "must be above zero"),
        ("history:\n  kept: 30d\n", "unknown field `kept`"),
    ] {
        let fx = delete_fixture();
        fx.write("tend.yaml", yaml);
        let r = fx.run(&["validate"]);
        r.code(1);
        assert!(format!("{r}").contains(want), "{yaml}: {r}");
    }
    let fx = delete_fixture();
    fx.write(
        "tend.yaml",
        "confirmers: [root, '@root']\nhistory:\n  keep: 1d\n  keep_destructive: 1d\n",
    );
    fx.run(&["validate"]).code(0);
    // A name unknown to this machine is an error when the state dir is
    // needed, not a silent drop.
    fx.write("tend.yaml", "confirmers: [no-such-user-here]\n");
    let r = fx.run(&["apply"]);
    r.code(1);
    assert!(r.stderr.contains("no user `no-such-user-here`"), "{r}");
}
