use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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
        set_meta("/a", Some(Mode(0o600)), None, None, PathType::File),
        make_directory("/a", None, None, None, PathType::Nothing),
        make_symlink("/a", "/b", PathType::Nothing),
        remove_file("/a", PathType::File),
        remove_symlink("/a", PathType::Symlink),
        remove_directory("/a", PathType::Directory),
    ];
    for cmd in &cmds {
        assert!(cmd.script.starts_with("set -eu\n"), "{}", cmd.script);
        assert!(!cmd.script.contains("SECRET"), "{}", cmd.script);
    }
    assert_eq!(cmds[0].stdin, [&content[..], CONTENT_END].concat());
    assert!(cmds[1..].iter().all(|c| c.stdin.is_empty()));
}

#[test]
fn values_are_quoted_once_into_variables() {
    let cmd = make_symlink("/srv/it's here/cur", "rel'$(x)", PathType::Nothing);
    assert!(cmd.script.starts_with(
        "set -eu\n\
         p='/srv/it'\\''s here/cur'\n\
         d='/srv/it'\\''s here'\n\
         t='rel'\\''$(x)'\n"
    ));
    let cmd = set_meta(
        "/x",
        Some(Mode(0o2755)),
        Some("alice"),
        Some("staff"),
        PathType::Directory,
    );
    assert!(
        cmd.script.ends_with(
            "[ \"$(stat -c %U -- \"$p\")\" = 'alice' ] || [ \"$(stat -c %u -- \"$p\")\" = 'alice' ] || chown -h -- 'alice' \"$p\"\n\
             [ \"$(stat -c %G -- \"$p\")\" = 'staff' ] || [ \"$(stat -c %g -- \"$p\")\" = 'staff' ] || chgrp -h -- 'staff' \"$p\"\n\
             [ \"$(stat -c %a -- \"$p\")\" = '2755' ] || chmod -- 02755 \"$p\"\n"
        ),
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
        let cmd = remove_directory(path, PathType::Directory);
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
    ok(&write_file_at(
        s(&p),
        b"mine",
        None,
        None,
        None,
        PathType::Symlink,
    ));
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
fn write_file_cut_short_in_transit_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    fs::write(&p, b"old").unwrap();
    let full = write_file(s(&p), b"0123456789", None, None, None);
    // The content short, or whole but without the marker after it.
    for cut in [4, 10, 10 + CONTENT_END.len() - 1] {
        let short = RemoteCommand {
            script: full.script.clone(),
            stdin: full.stdin[..cut].to_vec(),
        };
        let err = fails(&short);
        assert!(err.contains("arrived short"), "{cut}: {err}");
        assert_eq!(fs::read(&p).unwrap(), b"old", "{cut}");
        assert_eq!(entries(dir.path()), ["f"], "{cut}: no temporary file left");
    }
}

#[test]
fn write_file_never_follows_what_is_planted_at_its_temporary_name() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    fs::write(&target, b"precious").unwrap();
    let p = dir.path().join("f");
    for planted in [&target, &dir.path().join("nowhere")] {
        let cmd = write_file(s(&p), b"payload", None, None, None);
        // Someone who guessed the batch's nonce and the shell's pid.
        let script = cmd.script.replacen(
            "set -eu\n",
            &format!(
                "set -eu\ntend_nonce=x\nln -s {} {}/.tend.x.$$\n",
                crate::shell::quote(s(planted)),
                crate::shell::quote(s(dir.path()))
            ),
            1,
        );
        let out = run(&RemoteCommand {
            script,
            stdin: cmd.stdin,
        });
        assert_ne!(out.status, 0);
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        assert!(!dir.path().join("nowhere").exists());
        assert!(!p.exists());
    }
}

#[test]
fn write_file_modes_beyond_read_and_write_are_set_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for (i, mode) in [0o755, 0o700, 0o600, 0o444, 0o000, 0o1644]
        .into_iter()
        .enumerate()
    {
        let p = dir.path().join(format!("f{i}"));
        ok(&write_file(s(&p), b"x", Some(Mode(mode)), None, None));
        assert_eq!(mode_of(&p), mode, "{mode:o}");
    }
    if is_root() {
        let p = dir.path().join("suid");
        ok(&write_file(
            s(&p),
            b"x",
            Some(Mode(0o4755)),
            Some("root"),
            Some("root"),
        ));
        assert_eq!(mode_of(&p), 0o4755);
    }
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
    ok(&set_meta(
        s(&p),
        Some(Mode(0o600)),
        None,
        None,
        PathType::File,
    ));
    assert_eq!(mode_of(&p), 0o600);
    assert_eq!(fs::read(&p).unwrap(), b"keep");
}

#[test]
fn set_meta_clears_set_group_id_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d");
    fs::create_dir(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o2755)).unwrap();
    ok(&set_meta(
        s(&p),
        Some(Mode(0o755)),
        None,
        None,
        PathType::Directory,
    ));
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
    let err = fails(&set_meta(
        s(&link),
        Some(Mode(0o600)),
        None,
        None,
        PathType::File,
    ));
    assert!(err.contains("symlink"), "{err}");
    assert_eq!(mode_of(&target), 0o644);
    let err = fails(&set_meta(
        s(&dir.path().join("gone")),
        Some(Mode(0o600)),
        None,
        None,
        PathType::File,
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
    ok(&set_meta(s(&p), None, Some("daemon"), None, PathType::File));
    assert_eq!(fs::metadata(&p).unwrap().uid(), id_of("passwd", "daemon"));
    ok(&set_meta(
        s(&p),
        None,
        None,
        Some("nogroup"),
        PathType::File,
    ));
    assert_eq!(fs::metadata(&p).unwrap().gid(), id_of("group", "nogroup"));
}

// ---- make_directory ------------------------------------------------------------

#[test]
fn make_directory_default_and_given_modes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a b");
    ok(&make_directory(s(&a), None, None, None, PathType::Nothing));
    assert!(fs::metadata(&a).unwrap().is_dir());
    assert_eq!(mode_of(&a), 0o755);
    let b = dir.path().join("-b\n");
    ok(&make_directory(
        s(&b),
        Some(Mode(0o1777)),
        None,
        None,
        PathType::Nothing,
    ));
    assert_eq!(mode_of(&b), 0o1777);
}

#[test]
fn make_directory_mode_is_exact_under_a_set_group_id_parent() {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o2755)).unwrap();
    let p = dir.path().join("d");
    ok(&make_directory(
        s(&p),
        Some(Mode(0o750)),
        None,
        None,
        PathType::Nothing,
    ));
    assert_eq!(mode_of(&p), 0o750);
}

#[test]
fn make_directory_needs_a_parent_and_accepts_an_existing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x").join("y");
    let err = fails(&make_directory(s(&p), None, None, None, PathType::Nothing));
    assert!(err.contains("does not exist"), "{err}");
    assert!(entries(dir.path()).is_empty());

    let existing = dir.path().join("e");
    fs::create_dir(&existing).unwrap();
    fs::set_permissions(&existing, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(existing.join("keep"), b"").unwrap();
    ok(&make_directory(
        s(&existing),
        Some(Mode(0o750)),
        None,
        None,
        PathType::Nothing,
    ));
    assert_eq!(entries(&existing), ["keep"], "its content is left alone");
    assert_eq!(mode_of(&existing), 0o750, "and its mode made as given");
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
        PathType::Nothing,
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
        PathType::Nothing,
    ));
    assert!(err.contains("no-such-user-tend"), "{err}");
    assert!(!q.exists(), "a half-made directory is removed again");
}

// ---- make_symlink ----------------------------------------------------------------

#[test]
fn make_symlink_creates_and_retargets() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cur rent");
    ok(&make_symlink(
        s(&p),
        "/srv/app/releases/1",
        PathType::Nothing,
    ));
    assert_eq!(
        fs::read_link(&p).unwrap(),
        PathBuf::from("/srv/app/releases/1")
    );
    let nasty = "-rel'ease\n$(touch pwned)\n";
    ok(&make_symlink(s(&p), nasty, PathType::Nothing));
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
fn make_symlink_replaces_a_file_it_saw_but_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    fs::write(&f, b"").unwrap();
    let err = fails(&make_symlink(s(&f), "t", PathType::Nothing));
    assert_eq!(
        err,
        format!(
            "tend: {}: found a regular file where the plan saw nothing; not replaced\n",
            f.display()
        )
    );
    ok(&make_symlink(s(&f), "t", PathType::File));
    assert_eq!(fs::read_link(&f).unwrap(), PathBuf::from("t"));

    let d = dir.path().join("d");
    fs::create_dir(&d).unwrap();
    fails(&make_symlink(s(&d), "t", PathType::Nothing));
    assert!(fs::symlink_metadata(&d).unwrap().is_dir());
    assert_eq!(entries(dir.path()), ["d", "f"]);
}

#[test]
fn make_symlink_without_parent_fails() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails(&make_symlink(
        s(&dir.path().join("x/l")),
        "t",
        PathType::Nothing,
    ));
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

    ok(&remove_file(s(&f), PathType::File));
    assert!(!f.exists());
    ok(&remove_file(s(&f), PathType::File));

    let err = fails(&remove_symlink(s(&target), PathType::Symlink));
    assert!(
        err.ends_with("found a regular file where the plan saw a symlink; not removed\n"),
        "{err}"
    );
    ok(&remove_symlink(s(&l), PathType::Symlink));
    assert!(fs::symlink_metadata(&l).is_err());
    assert_eq!(fs::read(&target).unwrap(), b"t");
    ok(&remove_symlink(s(&l), PathType::Symlink));

    let d = dir.path().join("d");
    fs::create_dir(&d).unwrap();
    fails(&remove_file(s(&d), PathType::File));
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
    ok(&remove_directory(s(&d), PathType::Directory));
    assert!(!d.exists());
    assert_eq!(entries(&outside), ["keep"]);
    ok(&remove_directory(s(&d), PathType::Directory));
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

// ---- what the plan saw, checked on the host ----------------------------------------

/// Puts an object of type `t` at `p` (a directory with something in it, a
/// symlink to elsewhere, a fifo for `Other`).
fn place(p: &Path, t: PathType) {
    match t {
        PathType::Nothing => {}
        PathType::File => fs::write(p, b"old").unwrap(),
        PathType::Directory => {
            fs::create_dir(p).unwrap();
            fs::write(p.join("inside"), b"keep").unwrap();
        }
        PathType::Symlink => symlink("elsewhere", p).unwrap(),
        PathType::Other => {
            let st = Command::new("mkfifo").arg(p).status().unwrap();
            assert!(st.success());
        }
    }
}

/// What is at `p` now, and whether it is still the object [`place`] put there.
fn type_at(p: &Path) -> PathType {
    match fs::symlink_metadata(p) {
        Err(_) => PathType::Nothing,
        Ok(m) if m.file_type().is_symlink() => PathType::Symlink,
        Ok(m) if m.is_dir() => PathType::Directory,
        Ok(m) if m.is_file() => PathType::File,
        Ok(_) => PathType::Other,
    }
}

fn untouched(p: &Path, t: PathType) -> bool {
    type_at(p) == t
        && match t {
            PathType::File => fs::read(p).unwrap() == b"old",
            PathType::Directory => p.join("inside").exists(),
            PathType::Symlink => fs::read_link(p).unwrap() == Path::new("elsewhere"),
            _ => true,
        }
}

/// Every path builder, given every type the plan may have seen, meets every
/// type on the host: it acts only where what it finds is nothing, its own
/// kind of object (new content over a regular file, a symlink retargeted, a
/// directory's metadata), or what the plan saw; otherwise it fails, names
/// the path and what it found, and leaves the object alone.
#[test]
fn path_steps_never_remove_or_replace_what_the_plan_did_not_see() {
    use PathType::*;
    type Build = fn(&str, PathType) -> RemoteCommand;
    // Name, builder, the type it makes (None: it removes or changes), the
    // word of its refusal, and the types the plan can have seen for it.
    type Case = (
        &'static str,
        Build,
        Option<PathType>,
        &'static str,
        &'static [PathType],
    );
    let builders: [Case; 8] = [
        (
            "write",
            |p, seen| write_file_at(p, b"new", None, None, None, seen),
            Some(File),
            "not replaced",
            &PathType::ALL,
        ),
        (
            "mkdir",
            |p, seen| make_directory(p, None, None, None, seen),
            Some(Directory),
            "not replaced",
            &PathType::ALL,
        ),
        (
            "symlink",
            |p, seen| make_symlink(p, "target", seen),
            Some(Symlink),
            "not replaced",
            &PathType::ALL,
        ),
        (
            "set_meta",
            |p, seen| set_meta(p, Some(Mode(0o700)), None, None, seen),
            None,
            "not changed",
            &[File, Directory],
        ),
        (
            "remove_file",
            |p, seen| remove_file(p, seen),
            None,
            "not removed",
            &[File],
        ),
        (
            "remove_symlink",
            |p, seen| remove_symlink(p, seen),
            None,
            "not removed",
            &[Symlink],
        ),
        (
            "remove_directory",
            |p, seen| remove_directory(p, seen),
            None,
            "not removed",
            &[Directory],
        ),
        (
            "write_file",
            |p, _| write_file(p, b"new", None, None, None),
            Some(File),
            "not replaced",
            &[Nothing],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for (name, build, own, verb, seens) in builders {
        for &seen in seens {
            for found in PathType::ALL {
                n += 1;
                let p = dir.path().join(format!("p{n}"));
                place(&p, found);
                let cmd = build(s(&p), seen);
                let out = run(&cmd);
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                let allowed = match (name, own) {
                    ("set_meta", _) => found == seen && found != Nothing,
                    (_, Some(own)) => found == Nothing || found == own || found == seen,
                    (_, None) => found == Nothing || found == seen,
                };
                let case = format!("{name}: saw {seen:?}, found {found:?}: {err}");
                if allowed {
                    assert_eq!(out.status, 0, "{case}\n{}", cmd.script);
                    match own {
                        Some(own) => assert_eq!(type_at(&p), own, "{case}"),
                        None if name == "set_meta" => assert_eq!(type_at(&p), found, "{case}"),
                        None => assert_eq!(type_at(&p), Nothing, "{case}"),
                    }
                } else {
                    assert_ne!(out.status, 0, "{case}");
                    assert!(untouched(&p, found), "{case}");
                    if found != Nothing {
                        assert_eq!(
                            err,
                            format!(
                                "tend: {}: found {} where the plan saw {}; {verb}\n",
                                p.display(),
                                found.describe(),
                                seen.describe()
                            ),
                            "{case}"
                        );
                    }
                }
                let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
            }
        }
    }
    // Nothing is left behind by a refused step: no temporary files.
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

/// What an object looks like to someone checking whether a step changed it:
/// type, content or target, mode, inode, mtime and ctime.
type Fingerprint = (PathType, Vec<u8>, u32, u64, [i64; 4]);

fn fingerprint(p: &Path) -> Option<Fingerprint> {
    let m = fs::symlink_metadata(p).ok()?;
    let body = match type_at(p) {
        PathType::File => fs::read(p).unwrap(),
        PathType::Symlink => fs::read_link(p).unwrap().into_os_string().into_vec(),
        _ => vec![],
    };
    Some((
        type_at(p),
        body,
        m.mode(),
        m.ino(),
        [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()],
    ))
}

/// Every path step run twice: the second run succeeds and changes nothing,
/// not even an inode's ctime.
#[test]
fn every_path_step_run_twice_succeeds_and_changes_nothing_the_second_time() {
    use PathType::*;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    let ps = s(&p).to_string();
    let steps: Vec<(&str, Vec<RemoteCommand>)> = vec![
        (
            "file",
            vec![write_file_at(
                &ps,
                b"v1",
                Some(Mode(0o640)),
                None,
                None,
                Nothing,
            )],
        ),
        (
            "file, content and mode kept",
            vec![write_file(&ps, b"v1", None, None, None)],
        ),
        (
            "file meta",
            vec![
                write_file(&ps, b"v1", None, None, None),
                set_meta(&ps, Some(Mode(0o600)), None, None, File),
            ],
        ),
        (
            "remove file",
            vec![
                write_file(&ps, b"v1", None, None, None),
                remove_file(&ps, File),
            ],
        ),
        (
            "directory",
            vec![make_directory(&ps, Some(Mode(0o750)), None, None, Nothing)],
        ),
        (
            "directory meta",
            vec![
                make_directory(&ps, None, None, None, Nothing),
                set_meta(&ps, Some(Mode(0o711)), None, None, Directory),
            ],
        ),
        (
            "remove directory",
            vec![
                make_directory(&ps, None, None, None, Nothing),
                remove_directory(&ps, Directory),
            ],
        ),
        ("symlink", vec![make_symlink(&ps, "t\n", Nothing)]),
        (
            "retarget",
            vec![
                make_symlink(&ps, "a", Nothing),
                make_symlink(&ps, "b", Symlink),
            ],
        ),
        (
            "remove symlink",
            vec![
                make_symlink(&ps, "a", Nothing),
                remove_symlink(&ps, Symlink),
            ],
        ),
    ];
    for (name, cmds) in steps {
        for cmd in &cmds {
            ok(cmd);
        }
        let last = cmds.last().unwrap();
        let before = fingerprint(&p);
        let dir_before = fingerprint(dir.path());
        ok(last);
        assert_eq!(fingerprint(&p), before, "{name}: the second run changed it");
        assert_eq!(fingerprint(dir.path()), dir_before, "{name}: its directory");
        assert_eq!(entries(dir.path()).len(), usize::from(before.is_some()));
        let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
    }
}

#[test]
fn idempotent_steps_by_kind_and_action() {
    use crate::core::diff::Action::*;
    for (kind, action, want) in [
        ("file", Create, true),
        ("file", Update, true),
        ("file", Delete, true),
        ("directory", Create, true),
        ("directory", Update, true),
        ("directory", Delete, true),
        ("symlink", Create, true),
        ("symlink", Update, true),
        ("symlink", Delete, true),
        ("package", Create, true),
        ("package", Delete, true),
        ("user", Create, true),
        ("user", Update, true),
        ("user", Delete, true),
        ("group", Create, true),
        ("group", Update, true),
        ("group", Delete, true),
        ("command", Create, false),
        ("service", Update, false),
        ("service", Delete, false),
        ("something new", Create, false),
    ] {
        assert_eq!(is_idempotent(kind, action), want, "{kind} {action:?}");
    }
}
