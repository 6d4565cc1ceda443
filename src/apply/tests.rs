use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::transport::local::LocalTransport;
use crate::transport::{ExecOutput, Transport};

fn run(cmd: &RemoteCommand) -> ExecOutput {
    LocalTransport::new()
        .exec(&cmd.script, &cmd.stdin, Duration::from_secs(60))
        .expect("exec")
}

#[track_caller]
fn ok(cmd: &RemoteCommand) {
    let out = run(cmd);
    assert_eq!(
        out.status,
        0,
        "script failed: {}\n--- script:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cmd.script
    );
}

/// Runs `cmd`, expects it to fail, and returns its stderr.
#[track_caller]
fn fails(cmd: &RemoteCommand) -> String {
    let out = run(cmd);
    assert_ne!(out.status, 0, "script succeeded:\n{}", cmd.script);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn entries(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    v.sort();
    v
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().unwrap().stdout == b"0\n"
}

fn id_of(db: &str, name: &str) -> u32 {
    let out = Command::new("getent").args([db, name]).output().unwrap();
    assert!(out.status.success(), "no {db} entry {name}");
    let line = String::from_utf8(out.stdout).unwrap();
    line.split(':').nth(2).unwrap().parse().unwrap()
}

/// Content no text tool would pass through unharmed.
fn binary() -> Vec<u8> {
    let mut v = b"\0\0head\xff\xfe\xc3(\n'$(touch x)'\r\n".to_vec();
    v.extend((0..=255u8).cycle().take(70_000));
    v.push(0);
    v
}

// ---- pure ------------------------------------------------------------------

#[test]
fn scripts_start_with_set_eu_and_carry_no_content() {
    let content = b"SECRET CONTENT \0 bytes";
    let cmds = [
        write_file("/a", content, None, None, None),
        set_meta("/a", Some(Mode(0o600)), None, None),
        make_directory("/a", None, None, None),
        make_symlink("/a", "/b"),
        remove_file("/a"),
        remove_symlink("/a"),
        remove_directory("/a"),
    ];
    for cmd in &cmds {
        assert!(cmd.script.starts_with("set -eu\n"), "{}", cmd.script);
        assert!(!cmd.script.contains("SECRET"), "{}", cmd.script);
    }
    assert_eq!(cmds[0].stdin, content);
    assert!(cmds[1..].iter().all(|c| c.stdin.is_empty()));
}

#[test]
fn values_are_quoted_once_into_variables() {
    let cmd = make_symlink("/srv/it's here/cur", "rel'$(x)");
    assert!(cmd.script.starts_with(
        "set -eu\n\
         p='/srv/it'\\''s here/cur'\n\
         d='/srv/it'\\''s here'\n\
         t='rel'\\''$(x)'\n"
    ));
    let cmd = set_meta("/x", Some(Mode(0o2755)), Some("alice"), Some("staff"));
    assert!(
        cmd.script
            .ends_with("chown -h -- 'alice:staff' \"$p\"\nchmod -- 02755 \"$p\"\n"),
        "{}",
        cmd.script
    );
}

#[test]
fn parent_of_absolute_paths() {
    for (path, want) in [
        ("/a/b", "/a"),
        ("/a", "/"),
        ("/a/b/", "/a"),
        ("/a//b", "/a/"),
        ("/a\n/b\n", "/a\n"),
    ] {
        assert_eq!(parent(path), want, "{path:?}");
    }
}

#[test]
fn removing_the_root_directory_is_refused_without_running_rm() {
    for path in ["/", "//"] {
        let cmd = remove_directory(path);
        assert!(!cmd.script.contains("rm "), "{}", cmd.script);
        assert!(cmd.script.contains("refusing to remove"), "{}", cmd.script);
    }
}

// ---- write_file --------------------------------------------------------------

#[test]
fn write_file_creates_with_exact_bytes_and_default_mode() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    ok(&write_file(s(&p), &binary(), None, None, None));
    assert_eq!(fs::read(&p).unwrap(), binary());
    assert_eq!(mode_of(&p), 0o644);
    assert_eq!(entries(dir.path()), ["f"], "no temporary file left behind");
}

#[test]
fn write_file_sets_a_given_mode_and_writes_empty_content() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    ok(&write_file(s(&p), b"", Some(Mode(0o640)), None, None));
    assert_eq!(fs::read(&p).unwrap(), b"");
    assert_eq!(mode_of(&p), 0o640);
}

#[test]
fn write_file_keeps_the_mode_of_the_file_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    fs::write(&p, b"old").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    let inode = fs::metadata(&p).unwrap().ino();
    ok(&write_file(s(&p), b"new", None, None, None));
    assert_eq!(fs::read(&p).unwrap(), b"new");
    assert_eq!(mode_of(&p), 0o600);
    assert_ne!(
        fs::metadata(&p).unwrap().ino(),
        inode,
        "replaced by rename, not rewritten in place"
    );
    assert_eq!(entries(dir.path()), ["f"]);
}

#[test]
fn write_file_replaces_a_symlink_without_touching_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    fs::write(&target, b"target").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    let p = dir.path().join("f");
    symlink(&target, &p).unwrap();
    ok(&write_file(s(&p), b"mine", None, None, None));
    assert!(fs::symlink_metadata(&p).unwrap().file_type().is_file());
    assert_eq!(fs::read(&p).unwrap(), b"mine");
    assert_eq!(
        mode_of(&p),
        0o644,
        "a link's target's mode is not the link's"
    );
    assert_eq!(fs::read(&target).unwrap(), b"target");
}

#[test]
fn write_file_without_parent_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no such dir").join("f");
    let err = fails(&write_file(s(&p), b"x", None, None, None));
    let want = format!(
        "tend: cannot write {}: directory {} does not exist\n",
        p.display(),
        p.parent().unwrap().display()
    );
    assert_eq!(err, want);
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

#[test]
fn write_file_over_a_directory_fails_and_leaves_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d");
    fs::create_dir(&p).unwrap();
    fails(&write_file(s(&p), b"x", None, None, None));
    assert!(fs::metadata(&p).unwrap().is_dir());
    assert_eq!(entries(dir.path()), ["d"]);
    assert!(entries(&p).is_empty());
}

#[test]
fn write_file_failing_late_removes_its_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    // chown to a user that does not exist fails after the temp file exists.
    let err = fails(&write_file(
        s(&p),
        b"x",
        None,
        Some("no-such-user-tend"),
        None,
    ));
    assert!(err.contains("no-such-user-tend"), "{err}");
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

#[test]
fn write_file_handles_nasty_paths() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    for name in [
        "sp ace",
        "it's",
        "new\nline\n",
        "-rf",
        "--",
        "$(touch pwned)",
        "`touch pwned`",
        "*",
        "\u{e9}\t~",
    ] {
        let p = dir.path().join(name);
        ok(&write_file(s(&p), name.as_bytes(), None, None, None));
        assert_eq!(fs::read(&p).unwrap(), name.as_bytes(), "{name:?}");
    }
    assert!(!marker.exists() && !Path::new("/pwned").exists());
    assert_eq!(entries(dir.path()).len(), 9, "{:?}", entries(dir.path()));
}

#[test]
fn write_file_sets_and_keeps_ownership_as_root() {
    if !is_root() {
        eprintln!("skipped: chown needs root");
        return;
    }
    let daemon = id_of("passwd", "daemon");
    let nogroup = id_of("group", "nogroup");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let ids = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        (m.uid(), m.gid())
    };

    // Setuid survives because chown runs before chmod.
    ok(&write_file(
        s(&p),
        b"1",
        Some(Mode(0o4750)),
        Some("daemon"),
        Some("nogroup"),
    ));
    assert_eq!(ids(&p), (daemon, nogroup));
    assert_eq!(mode_of(&p), 0o4750);

    // Nothing given: owner, group and mode stay.
    ok(&write_file(s(&p), b"2", None, None, None));
    assert_eq!(ids(&p), (daemon, nogroup));
    assert_eq!(mode_of(&p), 0o4750);
    assert_eq!(fs::read(&p).unwrap(), b"2");

    // Only the owner given: the group stays.
    ok(&write_file(s(&p), b"3", None, Some("root"), None));
    assert_eq!(ids(&p), (0, nogroup));

    // Only the group given: the owner stays.
    ok(&write_file(
        s(&p),
        b"4",
        Some(Mode(0o640)),
        None,
        Some("daemon"),
    ));
    assert_eq!(ids(&p), (0, id_of("group", "daemon")));
    assert_eq!(mode_of(&p), 0o640);
}

// ---- set_meta ----------------------------------------------------------------

#[test]
fn set_meta_changes_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    fs::write(&p, b"keep").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    ok(&set_meta(s(&p), Some(Mode(0o600)), None, None));
    assert_eq!(mode_of(&p), 0o600);
    assert_eq!(fs::read(&p).unwrap(), b"keep");
}

#[test]
fn set_meta_clears_set_group_id_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d");
    fs::create_dir(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o2755)).unwrap();
    ok(&set_meta(s(&p), Some(Mode(0o755)), None, None));
    assert_eq!(mode_of(&p), 0o755);
}

#[test]
fn set_meta_refuses_symlinks_and_missing_paths() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    fs::write(&target, b"").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.path().join("link");
    symlink(&target, &link).unwrap();
    let err = fails(&set_meta(s(&link), Some(Mode(0o600)), None, None));
    assert!(err.contains("symlink"), "{err}");
    assert_eq!(mode_of(&target), 0o644);
    let err = fails(&set_meta(
        s(&dir.path().join("gone")),
        Some(Mode(0o600)),
        None,
        None,
    ));
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn set_meta_changes_ownership_as_root() {
    if !is_root() {
        eprintln!("skipped: chown needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("it's");
    fs::write(&p, b"").unwrap();
    ok(&set_meta(s(&p), None, Some("daemon"), None));
    assert_eq!(fs::metadata(&p).unwrap().uid(), id_of("passwd", "daemon"));
    ok(&set_meta(s(&p), None, None, Some("nogroup")));
    assert_eq!(fs::metadata(&p).unwrap().gid(), id_of("group", "nogroup"));
}

// ---- make_directory ------------------------------------------------------------

#[test]
fn make_directory_default_and_given_modes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a b");
    ok(&make_directory(s(&a), None, None, None));
    assert!(fs::metadata(&a).unwrap().is_dir());
    assert_eq!(mode_of(&a), 0o755);
    let b = dir.path().join("-b\n");
    ok(&make_directory(s(&b), Some(Mode(0o1777)), None, None));
    assert_eq!(mode_of(&b), 0o1777);
}

#[test]
fn make_directory_mode_is_exact_under_a_set_group_id_parent() {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o2755)).unwrap();
    let p = dir.path().join("d");
    ok(&make_directory(s(&p), Some(Mode(0o750)), None, None));
    assert_eq!(mode_of(&p), 0o750);
}

#[test]
fn make_directory_needs_a_parent_and_no_existing_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x").join("y");
    let err = fails(&make_directory(s(&p), None, None, None));
    assert!(err.contains("does not exist"), "{err}");
    assert!(entries(dir.path()).is_empty());

    let existing = dir.path().join("e");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("keep"), b"").unwrap();
    fails(&make_directory(s(&existing), None, None, None));
    assert_eq!(
        entries(&existing),
        ["keep"],
        "an existing directory is left alone"
    );
}

#[test]
fn make_directory_with_owner_and_removal_on_failure_as_root() {
    if !is_root() {
        eprintln!("skipped: chown needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("owned");
    ok(&make_directory(
        s(&p),
        Some(Mode(0o700)),
        Some("daemon"),
        Some("nogroup"),
    ));
    let m = fs::metadata(&p).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (id_of("passwd", "daemon"), id_of("group", "nogroup"))
    );
    assert_eq!(mode_of(&p), 0o700);

    let q = dir.path().join("half");
    let err = fails(&make_directory(
        s(&q),
        None,
        Some("no-such-user-tend"),
        None,
    ));
    assert!(err.contains("no-such-user-tend"), "{err}");
    assert!(!q.exists(), "a half-made directory is removed again");
}

// ---- make_symlink ----------------------------------------------------------------

#[test]
fn make_symlink_creates_and_retargets() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cur rent");
    ok(&make_symlink(s(&p), "/srv/app/releases/1"));
    assert_eq!(
        fs::read_link(&p).unwrap(),
        PathBuf::from("/srv/app/releases/1")
    );
    let nasty = "-rel'ease\n$(touch pwned)\n";
    ok(&make_symlink(s(&p), nasty));
    assert_eq!(
        fs::read_link(&p).unwrap().as_os_str().as_bytes(),
        nasty.as_bytes()
    );
    assert_eq!(
        entries(dir.path()),
        ["cur rent"],
        "no temporary directory left behind"
    );
}

#[test]
fn make_symlink_replaces_a_file_but_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    fs::write(&f, b"").unwrap();
    ok(&make_symlink(s(&f), "t"));
    assert_eq!(fs::read_link(&f).unwrap(), PathBuf::from("t"));

    let d = dir.path().join("d");
    fs::create_dir(&d).unwrap();
    fails(&make_symlink(s(&d), "t"));
    assert!(fs::symlink_metadata(&d).unwrap().is_dir());
    assert_eq!(entries(dir.path()), ["d", "f"]);
}

#[test]
fn make_symlink_without_parent_fails() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails(&make_symlink(s(&dir.path().join("x/l")), "t"));
    assert!(err.contains("does not exist"), "{err}");
    assert!(entries(dir.path()).is_empty());
}

// ---- removals ----------------------------------------------------------------------

#[test]
fn remove_file_and_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("-f it's");
    fs::write(&f, b"").unwrap();
    let target = dir.path().join("target");
    fs::write(&target, b"t").unwrap();
    let l = dir.path().join("l\n");
    symlink(&target, &l).unwrap();

    ok(&remove_file(s(&f)));
    assert!(!f.exists());
    ok(&remove_file(s(&f)));

    let err = fails(&remove_symlink(s(&target)));
    assert!(err.contains("no longer a symlink"), "{err}");
    ok(&remove_symlink(s(&l)));
    assert!(fs::symlink_metadata(&l).is_err());
    assert_eq!(fs::read(&target).unwrap(), b"t");
    ok(&remove_symlink(s(&l)));

    let d = dir.path().join("d");
    fs::create_dir(&d).unwrap();
    fails(&remove_file(s(&d)));
    assert!(d.is_dir(), "remove_file does not remove directories");
}

#[test]
fn remove_directory_removes_the_tree_and_not_a_link_target() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("tree $(x)");
    fs::create_dir_all(d.join("a/b")).unwrap();
    fs::write(d.join("a/b/f"), b"").unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("keep"), b"").unwrap();
    symlink(&outside, d.join("link")).unwrap();
    ok(&remove_directory(s(&d)));
    assert!(!d.exists());
    assert_eq!(entries(&outside), ["keep"]);
    ok(&remove_directory(s(&d)));
}

// ---- property ----------------------------------------------------------------------

/// A path component from a hostile alphabet; never `.`, `..` or empty.
fn component() -> impl Strategy<Value = String> {
    let alphabet: Vec<char> = "ab-_ .'\"$()`\\\n\t*?[]~!#;&|<>{}é✓".chars().collect();
    proptest::collection::vec(proptest::sample::select(alphabet), 1..12)
        .prop_map(|cs| cs.into_iter().collect::<String>())
        .prop_filter("not . or ..", |c| c != "." && c != "..")
}

#[test]
fn write_file_round_trips_random_paths_and_bytes() {
    let config = ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        dirs in proptest::collection::vec(component(), 0..3),
        name in component(),
        content in proptest::collection::vec(any::<u8>(), 0..4096),
    )| {
        let root = tempfile::tempdir().unwrap();
        let parent = dirs.iter().fold(root.path().to_path_buf(), |p, c| p.join(c));
        fs::create_dir_all(&parent).unwrap();
        let p = parent.join(&name);
        let out = run(&write_file(s(&p), &content, None, None, None));
        prop_assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
        prop_assert_eq!(fs::read(&p).unwrap(), content);
        prop_assert_eq!(entries(&parent), vec![OsString::from(&name)]);
    });
}
