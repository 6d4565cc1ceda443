use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::*;
use crate::transport::Transport;
use crate::transport::local::LocalTransport;

const HELLO_SHA: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

fn items(paths: &[&str]) -> Vec<ProbeItem> {
    paths
        .iter()
        .map(|p| ProbeItem::path(format!("file:{p}"), *p))
        .collect()
}

// ---- script generation ----------------------------------------------------

#[test]
fn script_is_framed_and_defines_the_function_once() {
    let s = script(&[]);
    assert!(
        s.starts_with("export LC_ALL=C\necho 'TEND-PROBE 1'\n"),
        "{s}"
    );
    assert!(s.ends_with("fi\necho 'END 0'\n"), "{s}");
    assert!(
        s.contains("for t in 'stat' 'sha256sum' 'od' 'readlink' 'tr' 'apt-get' 'dnf' 'apk' 'systemctl'; do\n"),
        "{s}"
    );
    assert_eq!(s.matches("p() {").count(), 1);
}

#[test]
fn script_calls_the_function_once_per_item_with_quoted_paths() {
    let paths = [
        "/etc/app.conf",
        "/srv/a b",
        "/x/it's",
        "/y/$(rm -rf /)",
        "/z/new\nline",
    ];
    let s = script(&items(&paths));
    let assignments = s
        .split("\n}\n")
        .nth(1)
        .unwrap()
        .split("N=5\n")
        .next()
        .unwrap();
    assert_eq!(
        assignments,
        "P0='/etc/app.conf'\n\
         P1='/srv/a b'\n\
         P2='/x/it'\\''s'\n\
         P3='/y/$(rm -rf /)'\n\
         P4='/z/new\nline'\n"
    );
    // Small per item: the assignment, the index and the quoted path.
    let overhead = s.len()
        - script(&[]).len()
        - paths
            .iter()
            .map(|p| crate::shell::quote(p).len())
            .sum::<usize>();
    assert_eq!(overhead, 5 * "P0=\n".len());
}

// ---- parsing ---------------------------------------------------------------

const FACTS: &str = "FACT kernel Linux\nFACT os_id debian\nFACT init \n";
const TOOLS_OK: &str = "TOOL stat yes\nTOOL sha256sum yes\nTOOL od yes\nTOOL readlink yes\nTOOL tr yes\n\
    TOOL apt-get yes\nTOOL dnf no\nTOOL apk no\nTOOL systemctl no\n";

/// Probe output with the usual facts and tools around `body`.
fn output(body: &str, count: usize) -> Vec<u8> {
    format!("TEND-PROBE 1\n{FACTS}{TOOLS_OK}{body}END {count}\n").into_bytes()
}

fn meta(mode: u32, owner: Option<&str>, group: Option<&str>) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        owner: owner.map(str::to_string),
        group: group.map(str::to_string),
    }
}

#[test]
fn parses_every_kind_of_item() {
    let its = items(&["/a", "/b", "/c", "/d", "/e", "/f"]);
    let body = format!(
        "I 0 absent\n\
         I 1 file 4755 0 0 6 {HELLO_SHA}\nU 1 root\nG 1 domain users\n\
         I 2 dir 750 0 0\nU 2 UNKNOWN\nG 2 UNKNOWN\n\
         I 3 link 610a27ff\n\
         I 4 other fifo\n\
         I 5 other character special file\n"
    );
    let got = parse(&output(&body, 6), &its).unwrap();
    assert_eq!(got.facts.kernel.as_deref(), Some("Linux"));
    assert_eq!(got.facts.os_id.as_deref(), Some("debian"));
    assert_eq!(
        got.facts.tools,
        ["stat", "sha256sum", "od", "readlink", "tr", "apt-get"]
    );
    assert_eq!(got.facts.package_manager.as_deref(), Some("apt"));
    assert_eq!(got.facts.init, None);
    let r = |i: usize| got.resources[&its[i].key].clone();
    assert_eq!(r(0), Observed::Absent);
    assert_eq!(
        r(1),
        Observed::File(FileState {
            meta: meta(0o4755, Some("root"), Some("domain users")),
            size: 6,
            sha256: HELLO_SHA.into(),
        })
    );
    assert_eq!(r(2), Observed::Directory(meta(0o750, None, None)));
    assert_eq!(
        r(3),
        Observed::Symlink {
            target: b"a\n'\xff".to_vec()
        }
    );
    assert_eq!(
        r(4),
        Observed::Other {
            file_type: "fifo".into()
        }
    );
    assert_eq!(
        r(5),
        Observed::Other {
            file_type: "character special file".into()
        }
    );
}

#[test]
fn empty_facts_are_none_and_no_items_is_fine() {
    let out = format!("TEND-PROBE 1\nFACT kernel \nFACT os_id \nFACT init \n{TOOLS_OK}END 0\n");
    let got = parse(out.as_bytes(), &[]).unwrap();
    assert_eq!(got.facts.kernel, None);
    assert_eq!(got.facts.os_id, None);
    assert!(got.resources.is_empty());
}

#[test]
fn missing_tools_are_reported_before_garbled_items() {
    let tools = TOOLS_OK
        .replace("sha256sum yes", "sha256sum no")
        .replace("od yes", "od no");
    let out = format!("TEND-PROBE 1\n{FACTS}{tools}I 0 error sha256sum failed\nEND 1\n");
    let err = parse(out.as_bytes(), &items(&["/a"])).unwrap_err();
    assert_eq!(
        err,
        ProbeParseError::MissingTools(vec!["sha256sum".into(), "od".into()])
    );
    assert_eq!(err.class(), FailureClass::Capability);
    assert_eq!(
        err.to_string(),
        "the host lacks sha256sum, od on PATH, which the probe needs"
    );
    // Without path items nothing needs the tools; the facts list what exists.
    let out = format!("TEND-PROBE 1\n{FACTS}{tools}END 0\n");
    assert_eq!(
        parse(out.as_bytes(), &[]).unwrap().facts.tools,
        ["stat", "readlink", "tr", "apt-get"]
    );
}

#[test]
fn every_malformed_output_is_an_error() {
    use ProbeParseError::*;
    let one = items(&["/a"]);
    let two = items(&["/a", "/b"]);
    let same_key = [ProbeItem::path("k", "/a"), ProbeItem::path("k", "/b")];
    let file0 = format!("I 0 file 644 0 0 6 {HELLO_SHA}\n");
    let bv = |line: usize, message: &str| BadValue {
        line,
        message: message.into(),
    };
    #[rustfmt::skip]
    let cases: Vec<(Vec<u8>, &[ProbeItem], ProbeParseError)> = vec![
        (b"".to_vec(), &one, MissingHeader),
        (b"sh: 1: syntax error\n".to_vec(), &one, MissingHeader),
        (b"TEND-PROBE 2\nEND 0\n".to_vec(), &[], MissingHeader),
        (b"TEND-PROBE 1".to_vec(), &[], MissingTrailer),
        (format!("TEND-PROBE 1\n{FACTS}{TOOLS_OK}I 0 absent\n").into_bytes(), &one, MissingTrailer),
        (output("I 0 absent\n", 1)[..100].to_vec(), &one, MissingTrailer),
        (format!("TEND-PROBE 1\n{FACTS}{TOOLS_OK}END 1").into_bytes(), &one, MissingTrailer),
        ([output("I 0 absent\n", 1), b"I 0 absent\n".to_vec()].concat(), &one, AfterTrailer { line: 16 }),
        (output("I 0 absent\n", 1), &two, TrailerCount { line: 15, found: 1, expected: 2 }),
        (output("I 0 absent\nEND x\n", 1), &one, AfterTrailer { line: 16 }),
        (format!("TEND-PROBE 1\n{FACTS}{TOOLS_OK}END x\n").into_bytes(), &[], bv(14, "trailer count: bad number `x`")),
        (output("hello world\n", 0), &[], UnknownLine { line: 14, text: "hello world".into() }),
        (output("oops\n", 0), &[], UnknownLine { line: 14, text: "oops".into() }),
        (output("FACT colour blue\n", 0), &[], UnknownLine { line: 14, text: "FACT colour blue".into() }),
        (output("TOOL curl yes\n", 0), &[], UnknownLine { line: 14, text: "TOOL curl yes".into() }),
        (output("I 0 socketish\n", 1), &one, UnknownLine { line: 14, text: "I 0 socketish".into() }),
        (output("TOOL od no\n", 0), &[], Duplicate { line: 14, what: "tool `od`".into() }),
        (output("FACT kernel Linux\n", 0), &[], Duplicate { line: 14, what: "fact `kernel`".into() }),
        (output("I 0 absent\nI 0 absent\n", 1), &one, Duplicate { line: 15, what: "`file:/a`".into() }),
        (output("I 0 absent\n", 1).replace_str("TOOL od yes\n", ""), &one, NotReported { what: "tool `od`".into() }),
        (output("", 1), &one, NotReported { what: "`file:/a`".into() }),
        (output(&file0, 1), &one, NotReported { what: "the owner of `file:/a`".into() }),
        (output(&format!("{file0}U 0 root\n"), 1), &one, NotReported { what: "the group of `file:/a`".into() }),
        (output(&format!("{file0}I 0 absent\n"), 1), &one, bv(15, "`file:/a`: expected its `U` line")),
        (output(&format!("{file0}U 0 root\nU 0 root\n"), 1), &one, bv(16, "`file:/a`: expected its `G` line")),
        (output(&format!("{file0}U 1 root\n"), 1), &one, bv(15, "`file:/a`: `U` line for item 1, expected 0")),
        (output(&format!("{file0}U 0 \n"), 1), &one, bv(15, "`file:/a`: empty name")),
        (output("U 0 root\n", 1), &one, bv(14, "`U` line without a file or directory line before it")),
        (output("I 1 absent\n", 1), &one, bv(14, "item index 1 out of range (1 items)")),
        (output("I -0 absent\n", 1), &one, bv(14, "item index: bad number `-0`")),
        (output("I +0 absent\n", 1), &one, bv(14, "item index: bad number `+0`")),
        (output("I 0 absent now\n", 1), &one, bv(14, "`file:/a`: `absent` needs 0 fields, found 1")),
        (output("I 0 dir 755 0\n", 1), &one, bv(14, "`file:/a`: `dir` needs 3 fields, found 2")),
        (output("I 0 dir 755 0  0\n", 1), &one, bv(14, "`file:/a`: `dir` needs 3 fields, found 4")),
        (output("I 0 dir 798 0 0\n", 1), &one, bv(14, "mode: bad octal mode `798`")),
        (output("I 0 dir 17777 0 0\n", 1), &one, bv(14, "mode: bad octal mode `17777`")),
        (output("I 0 dir 755 x 0\n", 1), &one, bv(14, "uid: bad number `x`")),
        (output("I 0 dir 755 0 4294967296\n", 1), &one, bv(14, "gid: bad number `4294967296`")),
        (output("I 0 file 644 0 0 -1 x\n", 1), &one, bv(14, "size: bad number `-1`")),
        (output("I 0 file 644 0 0 1 ABC\n", 1), &one, bv(14, "sha256: bad digest `ABC`")),
        (output("I 0 link \n", 1), &one, bv(14, "`file:/a`: bad link target ``")),
        (output("I 0 link 6g\n", 1), &one, bv(14, "`file:/a`: bad link target `6g`")),
        (output("I 0 link 616\n", 1), &one, bv(14, "`file:/a`: bad link target `616`")),
        (output("I 0 other\n", 1), &one, bv(14, "`file:/a`: `other` without a file type")),
        (output("TOOL od maybe\n", 0).replace_str("TOOL od yes\n", ""), &[], bv(13, "tool `od`: expected `yes` or `no`, found `maybe`")),
        (output("I 0 \u{fffd}\n", 1).replace_str("\u{fffd}", "\u{ff}"), &one, UnknownLine { line: 14, text: "I 0 \u{ff}".into() }),
        ([&output("", 0)[..13], b"\xff\n", &output("", 0)[13..]].concat(), &[], bv(2, "line is not UTF-8")),
        (output("I 0 error stat failed\n", 1), &one, ItemFailed { key: "file:/a".into(), message: "stat failed".into() }),
        (output("", 2), &same_key, DuplicateKey("k".into())),
    ];
    for (i, (out, its, want)) in cases.into_iter().enumerate() {
        let got = parse(&out, its);
        assert_eq!(
            got.as_ref().err(),
            Some(&want),
            "case {i}: {:?}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(want.class(), FailureClass::Execution, "case {i}");
    }
}

/// Byte-level replace, for editing fixtures.
trait ReplaceStr {
    fn replace_str(self, from: &str, to: &str) -> Vec<u8>;
}

impl ReplaceStr for Vec<u8> {
    fn replace_str(self, from: &str, to: &str) -> Vec<u8> {
        String::from_utf8(self)
            .unwrap()
            .replace(from, to)
            .into_bytes()
    }
}

#[test]
fn messages_say_what_and_where() {
    let err = parse(&output("I 0 dir 755 x 0\n", 1), &items(&["/a"])).unwrap_err();
    assert_eq!(err.to_string(), "probe output line 14: uid: bad number `x`");
    let err = parse(b"", &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "probe output does not start with `TEND-PROBE 1`: not a tend probe, or another version"
    );
}

// ---- running the script on this machine -------------------------------------

fn run_probe(its: &[ProbeItem]) -> Result<HostActual, ProbeParseError> {
    let out = LocalTransport::new()
        .exec(&script(its), b"", Duration::from_secs(60))
        .expect("run probe");
    assert_eq!(
        out.status,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&out.stdout, its)
}

/// The name of a uid or gid per the system databases, as `stat` reports it.
fn name_of(db: &str, id: u32) -> Option<String> {
    let out = Command::new("getent")
        .args([db, &id.to_string()])
        .output()
        .unwrap();
    out.status.success().then(|| {
        let line = String::from_utf8(out.stdout).unwrap();
        line.split(':').next().unwrap().to_string()
    })
}

/// What the probe should say about `path`, per std.
fn expected(path: &Path) -> Observed {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Observed::Absent,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    let meta = Meta {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        owner: name_of("passwd", m.uid()),
        group: name_of("group", m.gid()),
    };
    let ft = m.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).unwrap().into_os_string().into_vec();
        Observed::Symlink { target }
    } else if ft.is_file() {
        Observed::File(FileState {
            meta,
            size: m.len(),
            sha256: crate::core::sha256_hex(&fs::read(path).unwrap()),
        })
    } else if ft.is_dir() {
        Observed::Directory(meta)
    } else {
        use std::os::unix::fs::FileTypeExt;
        assert!(ft.is_fifo(), "only fifos are seeded as `other`");
        Observed::Other {
            file_type: "fifo".into(),
        }
    }
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    out.stdout == b"0\n"
}

#[test]
fn live_probe_matches_the_filesystem() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let marker = root.join("pwned");
    let p = |name: &str| root.join(name);

    let file = p("conf 0640");
    fs::write(&file, b"hello\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(p("empty"), b"").unwrap();
    fs::create_dir(p("dir")).unwrap();
    fs::set_permissions(p("dir"), fs::Permissions::from_mode(0o2750)).unwrap();
    std::os::unix::fs::symlink(OsStr::from_bytes(b"a\n'b\xff\"$(x)"), p("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", p("dangling")).unwrap();
    std::os::unix::fs::symlink(&file, p("link-to-file")).unwrap();
    let st = Command::new("mkfifo").arg(p("fifo")).status().unwrap();
    assert!(st.success());
    let nasty = [
        "sp ace",
        "quo'te\"d",
        "$(touch pwned)",
        "`touch pwned`",
        "new\nline",
        "-rf",
        "*",
        "~",
        "tab\there",
        "\u{e9}t\u{e9}",
    ];
    for (i, name) in nasty.iter().enumerate() {
        fs::write(p(name), format!("nasty {i}\n")).unwrap();
    }
    let unnamed = p("unnamed-owner");
    if is_root() {
        fs::write(&unnamed, b"x").unwrap();
        std::os::unix::fs::chown(&unnamed, Some(54321), Some(54321)).unwrap();
    }

    let mut paths: Vec<std::path::PathBuf> = vec![
        file.clone(),
        p("empty"),
        p("dir"),
        p("link"),
        p("dangling"),
        p("link-to-file"),
        p("fifo"),
        p("missing"),
        p("dir/missing/deeper"),
        root.join(format!("$(touch {})", marker.display())),
        unnamed.clone(),
    ];
    paths.extend(nasty.iter().map(|n| p(n)));
    let its: Vec<ProbeItem> = paths
        .iter()
        .enumerate()
        .map(|(i, path)| ProbeItem::path(format!("r{i:02}"), path.to_str().unwrap()))
        .collect();

    let got = run_probe(&its).unwrap();

    for (item, path) in its.iter().zip(&paths) {
        assert_eq!(
            got.resources[&item.key],
            expected(path),
            "{}",
            path.display()
        );
    }
    // Spot checks that do not rely on the oracle above.
    let r = |i: usize| got.resources[&its[i].key].clone();
    match r(0) {
        Observed::File(f) => {
            assert_eq!(f.meta.mode, 0o640);
            assert_eq!((f.size, f.sha256.as_str()), (6, HELLO_SHA));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r(3),
        Observed::Symlink {
            target: b"a\n'b\xff\"$(x)".to_vec()
        }
    );
    assert_eq!(
        r(6),
        Observed::Other {
            file_type: "fifo".into()
        }
    );
    assert_eq!(r(7), Observed::Absent);
    if is_root() {
        match r(10) {
            Observed::File(f) => {
                assert_eq!(
                    (f.meta.uid, f.meta.owner, f.meta.group),
                    (54321, None, None)
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        !marker.exists() && !Path::new("/pwned").exists(),
        "a path was executed"
    );

    assert_eq!(got.facts.kernel.as_deref(), Some("Linux"));
    let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let id = os_release
        .lines()
        .find_map(|l| l.strip_prefix("ID="))
        .map(|v| v.trim_matches('"').to_string());
    assert_eq!(got.facts.os_id, id);
    for t in PATH_TOOLS {
        assert!(got.facts.tools.iter().any(|x| x == t), "{t} found");
    }
}

#[test]
fn live_probe_without_a_tool_is_a_capability_failure() {
    // A PATH holding every tool the probe uses except sha256sum.
    let bin = tempfile::tempdir().unwrap();
    for tool in ["stat", "od", "readlink", "tr", "uname"] {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let real = String::from_utf8(out.stdout).unwrap();
        std::os::unix::fs::symlink(real.trim(), bin.path().join(tool)).unwrap();
    }
    let its = items(&["/etc/hostname"]);
    let script = format!(
        "PATH={}\n{}",
        crate::shell::quote(bin.path().to_str().unwrap()),
        script(&its)
    );
    let out = LocalTransport::new()
        .exec(&script, b"", Duration::from_secs(60))
        .unwrap();
    let err = parse(&out.stdout, &its).unwrap_err();
    assert_eq!(err, ProbeParseError::MissingTools(vec!["sha256sum".into()]));
    assert_eq!(err.class(), FailureClass::Capability);
}

#[test]
fn live_probe_falls_back_per_path_when_a_batch_fails() {
    // A sha256sum that refuses to hash more than one file at a time forces
    // the per-path fallback; the result must be the same as the batch's.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let fake = bin.join("sha256sum");
    fs::write(
        &fake,
        "#!/bin/sh\n[ $# -gt 1 ] && exit 1\nexec /usr/bin/sha256sum \"$@\"\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let a = dir.path().join("a b");
    let b = dir.path().join("it's\nhere");
    fs::write(&a, "hello\n").unwrap();
    fs::write(&b, "hello\n").unwrap();
    let its = vec![
        ProbeItem::path("a", a.to_str().unwrap()),
        ProbeItem::path("b", b.to_str().unwrap()),
    ];
    let script = format!("PATH={}:$PATH\n{}", bin.display(), script(&its));
    let out = LocalTransport::new()
        .exec(&script, b"", Duration::from_secs(60))
        .expect("run probe");
    let got = parse(&out.stdout, &its).unwrap();
    let batched = run_probe(&its).unwrap();
    assert_eq!(got.resources, batched.resources);
    for key in ["a", "b"] {
        match &got.resources[key] {
            Observed::File(f) => assert_eq!(f.sha256, HELLO_SHA),
            other => panic!("{key}: {other:?}"),
        }
    }
}

#[test]
fn live_probe_hashes_and_stats_every_file_in_one_process_each() {
    // Wrappers log each call's argument count, then run the real tool.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let log = dir.path().join("calls");
    for tool in ["sha256sum", "stat"] {
        let w = bin.join(tool);
        fs::write(
            &w,
            format!(
                "#!/bin/sh\necho \"{tool} $#\" >> '{}'\nexec /usr/bin/{tool} \"$@\"\n",
                log.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&w, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut its = Vec::new();
    for i in 0..5 {
        let p = dir.path().join(format!("f {i}"));
        fs::write(&p, "hello\n").unwrap();
        its.push(ProbeItem::path(format!("f{i}"), p.to_str().unwrap()));
    }
    its.push(ProbeItem::path("d", dir.path().to_str().unwrap()));
    let script = format!("PATH={}:$PATH\n{}", bin.display(), script(&its));
    let out = LocalTransport::new()
        .exec(&script, b"", Duration::from_secs(60))
        .expect("run probe");
    let got = parse(&out.stdout, &its).unwrap();
    assert!(matches!(got.resources["d"], Observed::Directory(_)));
    let calls = fs::read_to_string(&log).unwrap();
    // sha256sum: `--` and the five files; stat: `-c FORMAT --` and the five
    // files, then the same for the one directory.
    assert_eq!(calls, "sha256sum 6\nstat 8\nstat 4\n", "{calls}");
}
