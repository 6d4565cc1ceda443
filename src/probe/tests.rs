use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::*;
use crate::core::actual::{GroupState, GuardState, PackageState, UserState};
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
    assert!(
        s.ends_with(
            "unset IFS; set +f\nif [ -n \"$TR\" ]; then printf '%s\\n' \"$TR\"; fi\necho 'END 0'\n"
        ),
        "{s}"
    );
    assert!(
        s.contains(
            "for t in 'stat' 'sha256sum' 'od' 'readlink' 'tr' 'apt-get' 'dnf' 'apk' 'dpkg-query' \
             'rpm' 'systemctl' 'getent' 'id' 'useradd' 'usermod' 'userdel' 'groupadd' 'groupmod' \
             'groupdel' 'timeout'; do\n"
        ),
        "{s}"
    );
    // Without accounts, packages or commands, none of their sections.
    for absent in ["getent passwd", "getent group", "dpkg-query -W", "guard"] {
        assert!(!s.contains(absent), "{absent}: {s}");
    }
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
        .split("PI='0 1 2 3 4'\n")
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
    assert_eq!(overhead, 5 * "P0=\n".len() + "0 1 2 3 4".len());
}

// ---- parsing ---------------------------------------------------------------

const FACTS: &str = "FACT kernel Linux\nFACT os_id debian\nFACT init \n";
const TOOLS_OK: &str = "TOOL stat yes\nTOOL sha256sum yes\nTOOL od yes\nTOOL readlink yes\nTOOL tr yes\n\
    TOOL apt-get yes\nTOOL dnf no\nTOOL apk no\nTOOL dpkg-query yes\nTOOL rpm no\nTOOL systemctl no\n\
    TOOL getent yes\nTOOL id yes\nTOOL useradd yes\nTOOL usermod yes\nTOOL userdel yes\n\
    TOOL groupadd yes\nTOOL groupmod yes\nTOOL groupdel yes\nTOOL timeout yes\n";
/// The line number of the first line after the facts and tools.
const B: usize = 2 + 3 + TOOLS.len();
/// The tools TOOLS_OK says `no` for.
const NOT_OK: &[&str] = &["dnf", "apk", "rpm", "systemctl"];

/// Every tool in TOOLS_OK that says `yes`, in order.
fn present() -> Vec<&'static str> {
    TOOLS
        .iter()
        .copied()
        .filter(|t| !NOT_OK.contains(t))
        .collect()
}

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
    assert_eq!(got.facts.tools, present());
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
    assert_eq!(got.facts.revision, None);
    assert!(got.resources.is_empty());
    let out = format!(
        "TEND-PROBE 1\nFACT kernel \nFACT os_id \nFACT init \nFACT revision 0123abc\n{TOOLS_OK}END 0\n"
    );
    let got = parse(out.as_bytes(), &[]).unwrap();
    assert_eq!(got.facts.revision.as_deref(), Some("0123abc"));
    let twice = out.replace(
        "FACT revision 0123abc\n",
        "FACT revision a\nFACT revision b\n",
    );
    assert!(parse(twice.as_bytes(), &[]).is_err());
}

#[test]
fn missing_tools_are_reported_before_garbled_items() {
    let tools = TOOLS_OK
        .replace("TOOL sha256sum yes", "TOOL sha256sum no")
        .replace("TOOL od yes", "TOOL od no");
    let out = format!("TEND-PROBE 1\n{FACTS}{tools}I 0 error sha256sum failed\nEND 1\n");
    let err = parse(out.as_bytes(), &items(&["/a"])).unwrap_err();
    assert_eq!(
        err,
        ProbeParseError::MissingTools(vec!["sha256sum".into(), "od".into()])
    );
    assert_eq!(err.class(), FailureClass::Capability);
    assert_eq!(
        err.to_string(),
        "the host lacks sha256sum, od on PATH, which tend needs for this host's resources"
    );
    // Without path items nothing needs the tools; the facts list what exists.
    let out = format!("TEND-PROBE 1\n{FACTS}{tools}END 0\n");
    let mut present = present();
    present.retain(|t| !["sha256sum", "od"].contains(t));
    assert_eq!(parse(out.as_bytes(), &[]).unwrap().facts.tools, present);
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
        ([output("I 0 absent\n", 1), b"I 0 absent\n".to_vec()].concat(), &one, AfterTrailer { line: B + 2 }),
        (output("I 0 absent\n", 1), &two, TrailerCount { line: B + 1, found: 1, expected: 2 }),
        (output("I 0 absent\nEND x\n", 1), &one, AfterTrailer { line: B + 2 }),
        (format!("TEND-PROBE 1\n{FACTS}{TOOLS_OK}END x\n").into_bytes(), &[], bv(B, "trailer count: bad number `x`")),
        (output("hello world\n", 0), &[], UnknownLine { line: B, text: "hello world".into() }),
        (output("oops\n", 0), &[], UnknownLine { line: B, text: "oops".into() }),
        (output("FACT colour blue\n", 0), &[], UnknownLine { line: B, text: "FACT colour blue".into() }),
        (output("TOOL curl yes\n", 0), &[], UnknownLine { line: B, text: "TOOL curl yes".into() }),
        (output("I 0 socketish\n", 1), &one, UnknownLine { line: B, text: "I 0 socketish".into() }),
        (output("TOOL od no\n", 0), &[], Duplicate { line: B, what: "tool `od`".into() }),
        (output("FACT kernel Linux\n", 0), &[], Duplicate { line: B, what: "fact `kernel`".into() }),
        (output("I 0 absent\nI 0 absent\n", 1), &one, Duplicate { line: B + 1, what: "`file:/a`".into() }),
        (output("I 0 absent\n", 1).replace_str("TOOL od yes\n", ""), &one, NotReported { what: "tool `od`".into() }),
        (output("", 1), &one, NotReported { what: "`file:/a`".into() }),
        (output(&file0, 1), &one, NotReported { what: "the owner of `file:/a`".into() }),
        (output(&format!("{file0}U 0 root\n"), 1), &one, NotReported { what: "the group of `file:/a`".into() }),
        (output(&format!("{file0}I 0 absent\n"), 1), &one, bv(B + 1, "`file:/a`: expected its `U` line")),
        (output(&format!("{file0}U 0 root\nU 0 root\n"), 1), &one, bv(B + 2, "`file:/a`: expected its `G` line")),
        (output(&format!("{file0}U 1 root\n"), 1), &one, bv(B + 1, "`file:/a`: `U` line for item 1, expected 0")),
        (output(&format!("{file0}U 0 \n"), 1), &one, bv(B + 1, "`file:/a`: empty name")),
        (output("U 0 root\n", 1), &one, bv(B, "`U` line without a file or directory line before it")),
        (output("I 1 absent\n", 1), &one, bv(B, "item index 1 out of range (1 items)")),
        (output("I -0 absent\n", 1), &one, bv(B, "item index: bad number `-0`")),
        (output("I +0 absent\n", 1), &one, bv(B, "item index: bad number `+0`")),
        (output("I 0 absent now\n", 1), &one, bv(B, "`file:/a`: `absent` needs 0 fields, found 1")),
        (output("I 0 dir 755 0\n", 1), &one, bv(B, "`file:/a`: `dir` needs 3 fields, found 2")),
        (output("I 0 dir 755 0  0\n", 1), &one, bv(B, "`file:/a`: `dir` needs 3 fields, found 4")),
        (output("I 0 dir 798 0 0\n", 1), &one, bv(B, "mode: bad octal mode `798`")),
        (output("I 0 dir 17777 0 0\n", 1), &one, bv(B, "mode: bad octal mode `17777`")),
        (output("I 0 dir 755 x 0\n", 1), &one, bv(B, "uid: bad number `x`")),
        (output("I 0 dir 755 0 4294967296\n", 1), &one, bv(B, "gid: bad number `4294967296`")),
        (output("I 0 file 644 0 0 -1 x\n", 1), &one, bv(B, "size: bad number `-1`")),
        (output("I 0 file 644 0 0 1 ABC\n", 1), &one, bv(B, "sha256: bad digest `ABC`")),
        (output("I 0 link \n", 1), &one, bv(B, "`file:/a`: bad link target ``")),
        (output("I 0 link 6g\n", 1), &one, bv(B, "`file:/a`: bad link target `6g`")),
        (output("I 0 link 616\n", 1), &one, bv(B, "`file:/a`: bad link target `616`")),
        (output("I 0 other\n", 1), &one, bv(B, "`file:/a`: `other` without a file type")),
        (output("TOOL od maybe\n", 0).replace_str("TOOL od yes\n", ""), &[], bv(B - 1, "tool `od`: expected `yes` or `no`, found `maybe`")),
        (output("I 0 \u{fffd}\n", 1).replace_str("\u{fffd}", "\u{ff}"), &one, UnknownLine { line: B, text: "I 0 \u{ff}".into() }),
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
    assert_eq!(
        err.to_string(),
        format!("probe output line {B}: uid: bad number `x`")
    );
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

/// A temp dir with `bin/NAME`, an executable script: a tool that stands in
/// for the real one when `bin` comes first in PATH.
fn fake_tool(name: &str, script: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let fake = bin.join(name);
    fs::write(&fake, script).unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    (dir, bin)
}

#[test]
fn live_probe_falls_back_per_path_when_a_batch_fails() {
    // A sha256sum that refuses to hash more than one file at a time forces
    // the per-path fallback; the result must be the same as the batch's.
    let (dir, bin) = fake_tool(
        "sha256sum",
        "#!/bin/sh\n[ $# -gt 1 ] && exit 1\nexec /usr/bin/sha256sum \"$@\"\n",
    );
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
    // stat: `-c FORMAT --` and the five files; sha256sum: `--` and the
    // five files; then stat for the one directory.
    assert_eq!(calls, "stat 8\nsha256sum 6\nstat 4\n", "{calls}");
}

// ---- users, groups, packages and command guards -----------------------------

fn kinds() -> Vec<ProbeItem> {
    vec![
        ProbeItem::user("user:app", "app"),
        ProbeItem::user("user:gone", "gone"),
        ProbeItem::group("group:app", "app"),
        ProbeItem::group("group:gone", "gone"),
        ProbeItem::package("package:hello", "hello"),
        ProbeItem::package("package:less", "less"),
        ProbeItem::package("package:tree", "tree"),
        ProbeItem::command("command:a", Some("/srv/x".into()), None),
        ProbeItem::command("command:b", None, Some("test -e /srv/y".into())),
        ProbeItem::command("command:c", Some("/srv/z".into()), Some("false".into())),
        ProbeItem::command("command:d", None, None),
    ]
}

#[test]
fn script_asks_each_database_once_with_every_name() {
    let mut its = kinds();
    its.push(ProbeItem::user("user:q", "it's"));
    its.push(ProbeItem::path("file:/a", "/a"));
    let s = script(&its);
    assert_eq!(s.matches("getent passwd").count(), 1, "{s}");
    assert_eq!(s.matches("getent group").count(), 1, "{s}");
    assert_eq!(s.matches("dpkg-query -W").count(), 1, "{s}");
    assert_eq!(s.matches("rpm -q").count(), 1, "{s}");
    assert_eq!(s.matches("apk info -e").count(), 1, "{s}");
    // Names are the positional parameters of each query, quoted.
    assert!(s.contains("set -- 'app' 'gone' 'it'\\''s'\n"), "{s}");
    assert!(s.contains("set -- 'app' 'gone'\n"), "{s}");
    assert!(s.contains("set -- 'hello' 'less' 'tree'\n"), "{s}");
    assert!(
        s.contains("dpkg-query -W -f '${Package}\\t${Status}\\t${Version}\\n' \"$@\" 2>/dev/null"),
        "{s}"
    );
    assert!(
        s.contains("rpm -q --qf '%{NAME}\\t%{VERSION}-%{RELEASE}\\n' \"$@\""),
        "{s}"
    );
    assert!(s.contains("apk info -e \"$@\""), "{s}");
    // The one path item keeps its own index.
    assert!(s.contains("P12='/a'\nPI='12'\n"), "{s}");
    // Guards: `test -e` for creates, the check under `sh -c` for unless.
    let guards = s
        .split("fi\nc=- u=-\n")
        .skip(1)
        .collect::<Vec<_>>()
        .join("");
    assert_eq!(
        format!("c=- u=-\n{guards}"),
        "c=- u=-\n\
         if [ -e '/srv/x' ]; then c=exists; else c=missing; fi\n\
         echo \"I 7 guard $c $u\"\n\
         c=- u=-\n\
         sh -c 'test -e /srv/y' </dev/null >/dev/null 2>&1; u=$?\n\
         echo \"I 8 guard $c $u\"\n\
         c=- u=-\n\
         if [ -e '/srv/z' ]; then c=exists; else c=missing; fi\n\
         sh -c 'false' </dev/null >/dev/null 2>&1; u=$?\n\
         echo \"I 9 guard $c $u\"\n\
         c=- u=-\n\
         echo \"I 10 guard $c $u\"\n\
         echo 'END 13'\n"
    );
}

#[test]
fn a_check_with_quotes_stays_one_word() {
    let its = [ProbeItem::command(
        "c",
        Some("/srv/it's $(x)".into()),
        Some("grep -q 'a b' /etc/x && [ \"$HOME\" ]".into()),
    )];
    let s = script(&its);
    assert!(s.contains("if [ -e '/srv/it'\\''s $(x)' ]; then"), "{s}");
    assert!(
        s.contains("sh -c 'grep -q '\\''a b'\\'' /etc/x && [ \"$HOME\" ]' </dev/null"),
        "{s}"
    );
}

/// Output for `kinds()`: app exists, gone does not; hello installed, less
/// removed with its config files left, tree unknown to dpkg.
fn kinds_output() -> String {
    "PASSWD 2\n\
     PW app:x:1001:1001:App,,,:/srv/app home:/bin/sh\n\
     ID app app wheel adm app\n\
     GROUP 2\n\
     GR app:x:1001:web,api\n\
     PKG apt 1\n\
     PK hello\tinstall ok installed\t2.10-3\n\
     PK less\tdeinstall ok config-files\t590-2\n\
     I 7 guard missing -\n\
     I 8 guard - 0\n\
     I 9 guard exists 1\n\
     I 10 guard - -\n"
        .to_string()
}

#[test]
fn parses_users_groups_packages_and_guards() {
    let its = kinds();
    let got = parse(&output(&kinds_output(), its.len()), &its).unwrap();
    let r = |k: &str| got.resources[k].clone();
    assert_eq!(
        r("user:app"),
        Observed::User(UserState {
            uid: 1001,
            gid: 1001,
            home: "/srv/app home".into(),
            shell: "/bin/sh".into(),
            primary_group: "app".into(),
            groups: vec!["adm".into(), "wheel".into()],
        })
    );
    assert_eq!(r("user:gone"), Observed::Absent);
    assert_eq!(
        r("group:app"),
        Observed::Group(GroupState {
            gid: 1001,
            members: vec!["web".into(), "api".into()],
        })
    );
    assert_eq!(r("group:gone"), Observed::Absent);
    assert_eq!(
        r("package:hello"),
        Observed::Package(PackageState {
            version: Some("2.10-3".into())
        })
    );
    assert_eq!(r("package:less"), Observed::Absent);
    assert_eq!(r("package:tree"), Observed::Absent);
    let guard = |k: &str| match r(k) {
        Observed::Guard(g) => (g.will_run, g.creates_exists, g.unless_status),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(guard("command:a"), (true, Some(false), None));
    assert_eq!(guard("command:b"), (false, None, Some(0)));
    assert_eq!(guard("command:c"), (false, Some(true), Some(1)));
    assert_eq!(guard("command:d"), (true, None, None));
}

#[test]
fn every_package_manager_has_its_own_lines() {
    let its = [
        ProbeItem::package("a", "hello"),
        ProbeItem::package("b", "tree"),
        ProbeItem::package("c", "libc6:amd64"),
    ];
    let with = |manager: &str, body: &str| {
        let tools = match manager {
            "dnf" => TOOLS_OK
                .replace("TOOL apt-get yes", "TOOL apt-get no")
                .replace("TOOL dnf no", "TOOL dnf yes")
                .replace("TOOL rpm no", "TOOL rpm yes"),
            "apk" => TOOLS_OK
                .replace("TOOL apt-get yes", "TOOL apt-get no")
                .replace("TOOL apk no", "TOOL apk yes"),
            _ => TOOLS_OK.to_string(),
        };
        let out = format!("TEND-PROBE 1\n{FACTS}{tools}{body}END 3\n");
        parse(out.as_bytes(), &its)
    };
    let installed = |v: Option<&str>| {
        Observed::Package(PackageState {
            version: v.map(str::to_string),
        })
    };
    // apt: multiarch instances of one name are one package; unknown names
    // are absent (dpkg-query exits 1).
    let got = with(
        "apt",
        "PKG apt 1\nPK hello\tinstall ok installed\t2.10-3\n\
         PK libc6\tinstall ok installed\t2.36-9\nPK libc6\tinstall ok triggers-pending\t2.36-9+b1\n",
    )
    .unwrap();
    assert_eq!(got.resources["a"], installed(Some("2.10-3")));
    assert_eq!(got.resources["b"], Observed::Absent);
    assert_eq!(got.resources["c"], installed(Some("2.36-9, 2.36-9+b1")));
    assert_eq!(got.facts.package_manager.as_deref(), Some("apt"));
    // dnf: rpm reports every name.
    let got = with(
        "dnf",
        "PKG dnf 1\nPK hello\t2.10-3.fc40\nPK package tree is not installed\nPK libc6\t2.39-1.fc40\n",
    )
    .unwrap();
    assert_eq!(got.resources["a"], installed(Some("2.10-3.fc40")));
    assert_eq!(got.resources["b"], Observed::Absent);
    assert_eq!(got.resources["c"], installed(Some("2.39-1.fc40")));
    assert_eq!(
        with("dnf", "PKG dnf 0\nPK hello\t1-1\nPK libc6\t1-1\n").unwrap_err(),
        ProbeParseError::BadValue {
            line: B,
            message: "rpm -q exited with status 0 but did not report tree".into()
        }
    );
    // apk: the names installed, no versions.
    let got = with("apk", "PKG apk 1\nPK hello\n").unwrap();
    assert_eq!(got.resources["a"], installed(None));
    assert_eq!(got.resources["b"], Observed::Absent);
    // The query must be the host's manager's.
    assert_eq!(
        with("apt", "PKG dnf 0\n").unwrap_err(),
        ProbeParseError::BadValue {
            line: B,
            message: "packages queried with `dnf`, but the host's package manager is `apt`".into()
        }
    );
}

#[test]
fn missing_tools_and_managers_are_capability_failures() {
    let no = |tools: &[&str]| {
        let mut t = TOOLS_OK.to_string();
        for tool in tools {
            t = t.replace(&format!("TOOL {tool} yes"), &format!("TOOL {tool} no"));
        }
        t
    };
    let run = |tools: String, its: &[ProbeItem]| {
        let out = format!("TEND-PROBE 1\n{FACTS}{tools}END {}\n", its.len());
        parse(out.as_bytes(), its).unwrap_err()
    };
    let user = [ProbeItem::user("u", "app")];
    let group = [ProbeItem::group("g", "app")];
    let pkg = [ProbeItem::package("p", "hello")];
    let cmd = [ProbeItem::command("c", None, None)];
    let cases: Vec<(String, &[ProbeItem], ProbeParseError)> = vec![
        (
            no(&["getent", "usermod"]),
            &user,
            ProbeParseError::MissingTools(vec!["getent".into(), "usermod".into()]),
        ),
        (
            no(&["groupdel", "id"]),
            &group,
            ProbeParseError::MissingTools(vec!["groupdel".into()]),
        ),
        (
            no(&["dpkg-query"]),
            &pkg,
            ProbeParseError::MissingTools(vec!["dpkg-query".into()]),
        ),
        (no(&["apt-get"]), &pkg, ProbeParseError::NoPackageManager),
        (
            no(&["timeout"]),
            &cmd,
            ProbeParseError::MissingTools(vec!["timeout".into()]),
        ),
    ];
    for (i, (tools, its, want)) in cases.into_iter().enumerate() {
        let err = run(tools, its);
        assert_eq!(err, want, "case {i}");
        assert_eq!(err.class(), FailureClass::Capability, "case {i}");
    }
    // A tool only another kind needs is not required.
    let out = format!(
        "TEND-PROBE 1\n{FACTS}{}GROUP 0\nGR app:x:5:\nEND 1\n",
        no(&["useradd", "timeout", "dpkg-query", "sha256sum"])
    );
    assert!(parse(out.as_bytes(), &group).is_ok());
    assert_eq!(
        ProbeParseError::NoPackageManager.to_string(),
        "the host has no package manager tend knows on PATH (apt-get, dnf or apk), which package resources need"
    );
}

#[test]
fn every_malformed_section_is_an_error() {
    use ProbeParseError::*;
    let its = kinds();
    let n = its.len();
    let base = kinds_output();
    let bv = |line: usize, message: &str| BadValue {
        line,
        message: message.into(),
    };
    // Line numbers of kinds_output(): PASSWD at B, PW B+1, ID B+2, GROUP B+3,
    // GR B+4, PKG B+5, PK B+6 and B+7, guards B+8..B+11.
    let edit = |from: &str, to: &str| {
        assert!(base.contains(from), "{from}");
        base.replacen(from, to, 1)
    };
    #[rustfmt::skip]
    let cases: Vec<(String, ProbeParseError)> = vec![
        // users
        (edit("PASSWD 2\n", ""), bv(B, "`PW` line outside the users section")),
        (edit("PASSWD 2\n", "PASSWD 0\n"), bv(B, "getent passwd exited with status 0 but did not report gone")),
        (edit("PASSWD 2\n", "PASSWD 1\n"), bv(B, "getent passwd exited with status 1")),
        (edit("PASSWD 2\n", "PASSWD x\n"), bv(B, "exit status: bad number `x`")),
        (edit("PASSWD 2\n", "PASSWD 2\nPASSWD 2\n"), Duplicate { line: B + 1, what: "`PASSWD`".into() }),
        (edit("ID app app wheel adm app\n", ""), bv(B + 2, "user `app`: expected its `ID` line")),
        (edit("ID app app wheel adm app\n", "ID web app\n"), bv(B + 2, "user `app`: `ID` line for `web`")),
        (edit("ID app app wheel adm app\n", "ID app \n"), ItemFailed { key: "user:app".into(), message: "`id -nG app` reported no groups".into() }),
        (edit("ID app app wheel adm app\n", "ID app app\nID app app\n"), bv(B + 3, "`ID` line without a `PW` line before it")),
        (edit("PW app:x:1001:1001:App,,,:/srv/app home:/bin/sh\n", "PW app:x:1001:1001:/bin/sh\n"), bv(B + 1, "passwd entry needs 7 fields, found 5")),
        (edit("PW app:x:1001:", "PW web:x:1001:"), bv(B + 1, "passwd entry for `web`, which the probe did not ask about")),
        (edit("PW app:x:1001:1001:", "PW app:x:-1:1001:"), bv(B + 1, "uid: bad number `-1`")),
        (edit("PW app:x:1001:1001:", "PW app:x:1001:g:"), bv(B + 1, "gid: bad number `g`")),
        (edit("ID app app wheel adm app\n", "ID app app\nPW app:x:1:1::/:/bin/sh\nID app app\n"), Duplicate { line: B + 3, what: "user `app`".into() }),
        (edit("GROUP 2\n", ""), bv(B + 3, "`GR` line outside the groups section")),
        // groups
        (edit("GROUP 2\n", "GROUP 0\n"), bv(B + 3, "getent group exited with status 0 but did not report gone")),
        (edit("GR app:x:1001:web,api\n", "GR app:x:1001\n"), bv(B + 4, "group entry needs 4 fields, found 3")),
        (edit("GR app:", "GR web:"), bv(B + 4, "group entry for `web`, which the probe did not ask about")),
        (edit("GR app:x:1001:", "GR app:x:1e3:"), bv(B + 4, "gid: bad number `1e3`")),
        (edit("GR app:x:1001:web,api\n", "GR app:x:1:\nGR app:x:1:\n"), Duplicate { line: B + 5, what: "group `app`".into() }),
        // packages
        (edit("PKG apt 1\n", "PKG apt 2\n"), bv(B + 5, "dpkg-query exited with status 2")),
        (edit("PKG apt 1\n", "PKG apt 0\n"), bv(B + 5, "dpkg-query exited with status 0 but did not report tree")),
        (edit("PKG apt 1\n", "PKG apt\n"), bv(B + 5, "exit status: bad number ``")),
        (edit("PK hello\tinstall ok installed\t2.10-3\n", "PK hello\tinstall ok installed\n"), bv(B + 6, "dpkg-query line needs 3 tab-separated fields, found 2")),
        (edit("PK hello\t", "PK curl\t"), bv(B + 6, "package line for `curl`, which the probe did not ask about")),
        (edit("install ok installed", "installed"), bv(B + 6, "package `hello`: bad dpkg status `installed`")),
        (edit("install ok installed", "install ok sideways"), bv(B + 6, "package `hello`: unknown dpkg state `sideways`")),
        (edit("install ok installed", "install reinstreq half-configured"), ItemFailed { key: "package:hello".into(), message: "package `hello` is half-configured: repair it on the host first (e.g. `dpkg --configure -a`)".into() }),
        (edit("PKG apt 1\n", "").replacen("PK less", "PKG apt 1\nPK less", 1), bv(B + 5, "`PK` line outside the packages section")),
        // guards
        (edit("I 7 guard missing -\n", "I 7 guard - -\n"), bv(B + 8, "`command:a`: bad `creates` result `-`")),
        (edit("I 7 guard missing -\n", "I 7 guard missing 0\n"), bv(B + 8, "`command:a`: bad `unless` result `0`")),
        (edit("I 8 guard - 0\n", "I 8 guard - -\n"), bv(B + 9, "unless status: bad number `-`")),
        (edit("I 8 guard - 0\n", "I 8 guard - 256\n"), bv(B + 9, "unless status: bad number `256`")),
        (edit("I 8 guard - 0\n", "I 8 guard maybe 0\n"), bv(B + 9, "`command:b`: bad `creates` result `maybe`")),
        (edit("I 8 guard - 0\n", "I 8 guard -\n"), bv(B + 9, "`command:b`: `guard` needs 2 fields, found 1")),
        (edit("I 8 guard - 0\n", ""), NotReported { what: "`command:b`".into() }),
        (edit("I 8 guard - 0\n", "I 8 absent\n"), bv(B + 9, "`command:b`: a `absent` line does not answer what the probe asked")),
        (edit("I 8 guard - 0\n", "I 0 guard - 0\n"), bv(B + 9, "`user:app`: a `guard` line does not answer what the probe asked")),
        // a section the probe did not ask for
        (base.clone() + "PASSWD 0\n", Duplicate { line: B + 12, what: "`PASSWD`".into() }),
    ];
    for (i, (body, want)) in cases.into_iter().enumerate() {
        let got = parse(&output(&body, n), &its);
        assert_eq!(got.as_ref().err(), Some(&want), "case {i}: {body}");
        assert_eq!(want.class(), FailureClass::Execution, "case {i}");
    }
    // Sections nobody asked for, and missing sections.
    let paths = items(&["/a"]);
    assert_eq!(
        parse(&output("I 0 absent\nGROUP 0\n", 1), &paths).unwrap_err(),
        bv(B + 1, "`GROUP` line, but the probe asked about no groups")
    );
    let user = [ProbeItem::user("u", "app")];
    assert_eq!(
        parse(&output("", 1), &user).unwrap_err(),
        NotReported {
            what: "the users (`PASSWD` line)".into()
        }
    );
    assert_eq!(
        parse(&output("PASSWD 0\nPW app:x:1:1::/:/bin/sh\n", 1), &user).unwrap_err(),
        NotReported {
            what: "the groups of user `app`".into()
        }
    );
}

// ---- the new sections, run on this machine (read-only) ----------------------

#[test]
fn live_probe_of_accounts_packages_and_guards() {
    let tmp = tempfile::tempdir().unwrap();
    let there = tmp.path().join("there");
    fs::write(&there, "x").unwrap();
    let marker = tmp.path().join("unless-ran");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let its = vec![
        ProbeItem::user("user:root", "root"),
        ProbeItem::user("user:none", "tend-no-such-user"),
        ProbeItem::group("group:root", "root"),
        ProbeItem::group("group:none", "tend-no-such-group"),
        ProbeItem::package("package:dpkg", "dpkg"),
        ProbeItem::package("package:none", "tend-no-such-package"),
        ProbeItem::command("creates-there", Some(s(&there)), None),
        ProbeItem::command("creates-missing", Some(s(&tmp.path().join("nope"))), None),
        ProbeItem::command(
            "unless-true",
            None,
            Some(format!(
                "touch '{}'; echo noise; echo err >&2; true",
                s(&marker)
            )),
        ),
        ProbeItem::command("unless-exit-3", None, Some("exit 3".into())),
        ProbeItem::path("file", s(&there)),
    ];
    let got = run_probe(&its).unwrap();
    match &got.resources["user:root"] {
        Observed::User(u) => {
            assert_eq!((u.uid, u.gid, u.primary_group.as_str()), (0, 0, "root"));
            assert_eq!(u.home, "/root");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(got.resources["user:none"], Observed::Absent);
    assert!(matches!(&got.resources["group:root"], Observed::Group(g) if g.gid == 0));
    assert_eq!(got.resources["group:none"], Observed::Absent);
    if got.facts.package_manager.as_deref() == Some("apt") {
        assert!(matches!(
            &got.resources["package:dpkg"],
            Observed::Package(PackageState { version: Some(_) })
        ));
        assert_eq!(got.resources["package:none"], Observed::Absent);
    }
    let guard = |k: &str| match &got.resources[k] {
        Observed::Guard(g) => g.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(guard("creates-there"), GuardState::new(Some(true), None));
    assert_eq!(guard("creates-missing"), GuardState::new(Some(false), None));
    assert_eq!(guard("unless-true"), GuardState::new(None, Some(0)));
    assert!(!guard("unless-true").will_run);
    assert_eq!(guard("unless-exit-3"), GuardState::new(None, Some(3)));
    assert!(guard("unless-exit-3").will_run);
    // The check ran, and its output did not disturb the probe's.
    assert!(marker.exists());
    assert!(matches!(got.resources["file"], Observed::File(_)));
}

// ---- tree digests (SPEC 8.1) ------------------------------------------------

/// The tree digest the probe computed for `key`.
fn tree_of(its: &[ProbeItem], key: &str) -> Option<Tree> {
    run_probe(its).unwrap().trees.get(key).cloned()
}

#[test]
fn live_tree_digest_changes_with_anything_deep_inside() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("d");
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::write(root.join("a/b/c/one"), "1\n").unwrap();
    fs::write(root.join("two\nlines"), "2\n").unwrap();
    let its = vec![ProbeItem::path("directory:/d", root.to_str().unwrap()).with_tree()];
    let first = tree_of(&its, "directory:/d").expect("a digest");
    let Tree::Digest { entries, .. } = &first else {
        panic!("{first:?}")
    };
    // a, a/b, a/b/c, a/b/c/one, `two\nlines`.
    assert_eq!(*entries, 5);
    assert_eq!(
        tree_of(&its, "directory:/d").as_ref(),
        Some(&first),
        "stable"
    );

    // A file added four levels down.
    fs::write(root.join("a/b/c/new"), "").unwrap();
    let added = tree_of(&its, "directory:/d").unwrap();
    assert_ne!(added, first);
    fs::remove_file(root.join("a/b/c/new")).unwrap();
    assert_eq!(tree_of(&its, "directory:/d").as_ref(), Some(&first));
    // A mode change deep inside, then a size change.
    fs::set_permissions(root.join("a/b/c/one"), fs::Permissions::from_mode(0o600)).unwrap();
    let moded = tree_of(&its, "directory:/d").unwrap();
    assert_ne!(moded, first);
    fs::write(root.join("a/b/c/one"), "11\n").unwrap();
    assert_ne!(tree_of(&its, "directory:/d").unwrap(), moded);
}

#[test]
fn live_tree_digest_only_where_asked_and_only_for_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d");
    fs::create_dir(&d).unwrap();
    let f = dir.path().join("f");
    fs::write(&f, "x").unwrap();
    let l = dir.path().join("l");
    std::os::unix::fs::symlink(&d, &l).unwrap();
    let its = vec![
        // A directory without the flag: no digest.
        ProbeItem::path("plain", d.to_str().unwrap()),
        // A file item with a directory in its way: a digest.
        ProbeItem::path("in-the-way", d.to_str().unwrap()).with_tree(),
        // A regular file, a symlink to a directory, nothing: none.
        ProbeItem::path("file", f.to_str().unwrap()).with_tree(),
        ProbeItem::path("link", l.to_str().unwrap()).with_tree(),
        ProbeItem::path("none", dir.path().join("none").to_str().unwrap()).with_tree(),
    ];
    let got = run_probe(&its).unwrap();
    let keys: Vec<&str> = got.trees.keys().map(String::as_str).collect();
    assert_eq!(keys, ["in-the-way"]);
    assert!(matches!(
        got.trees["in-the-way"],
        Tree::Digest { entries: 0, .. }
    ));
}

#[test]
fn live_tree_over_the_limit_is_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("big");
    fs::create_dir(&root).unwrap();
    for i in 0..=TREE_LIMIT {
        fs::File::create(root.join(i.to_string())).unwrap();
    }
    let its = vec![ProbeItem::path("big", root.to_str().unwrap()).with_tree()];
    assert_eq!(tree_of(&its, "big"), Some(Tree::TooLarge));
    fs::remove_file(root.join("0")).unwrap();
    assert!(matches!(
        tree_of(&its, "big"),
        Some(Tree::Digest {
            entries: TREE_LIMIT,
            ..
        })
    ));
}

#[test]
fn live_tree_with_a_find_that_fails_is_an_error_not_a_digest() {
    // A `find` without -printf (busybox's, say) must not pass for an
    // empty tree: the digest would not change when the tree does.
    let (dir, bin) = fake_tool(
        "find",
        "#!/bin/sh\necho 'find: unrecognized: -printf' >&2\nexit 1\n",
    );
    let root = dir.path().join("d");
    fs::create_dir(&root).unwrap();
    let its = vec![ProbeItem::path("d", root.to_str().unwrap()).with_tree()];
    let script = format!("PATH={}:$PATH\n{}", bin.display(), script(&its));
    let out = LocalTransport::new()
        .exec(&script, b"", Duration::from_secs(60))
        .unwrap();
    let got = parse(&out.stdout, &its).unwrap();
    assert!(
        matches!(&got.trees["d"], Tree::Failed { message } if message.contains("listing")),
        "{:?}",
        got.trees
    );
}

#[test]
fn tree_lines_must_be_asked_for_and_present() {
    let dir_line = "I 0 dir 755 0 0\nU 0 root\nG 0 root\n";
    let frame = |body: &str| {
        let mut s =
            String::from("TEND-PROBE 1\nFACT kernel Linux\nFACT os_id debian\nFACT init \n");
        for t in TOOLS {
            s.push_str(&format!("TOOL {t} yes\n"));
        }
        s.push_str(body);
        s.push_str("END 1\n");
        s
    };
    let sha = "a".repeat(64);
    let asked = vec![ProbeItem::path("d", "/d").with_tree()];
    let not_asked = vec![ProbeItem::path("d", "/d")];
    let ok = frame(&format!("{dir_line}T 0 digest 3 {sha}\n"));
    let got = parse(ok.as_bytes(), &asked).unwrap();
    assert_eq!(
        got.trees["d"],
        Tree::Digest {
            entries: 3,
            sha256: sha.clone()
        }
    );
    assert!(matches!(
        parse(ok.as_bytes(), &not_asked),
        Err(ProbeParseError::BadValue { .. })
    ));
    assert!(matches!(
        parse(frame(dir_line).as_bytes(), &asked),
        Err(ProbeParseError::NotReported { .. })
    ));
    let twice = frame(&format!("{dir_line}T 0 large\nT 0 large\n"));
    assert!(matches!(
        parse(twice.as_bytes(), &asked),
        Err(ProbeParseError::Duplicate { .. })
    ));
    for bad in [
        format!("T 0 digest 10001 {sha}"),
        "T 0 digest 3 xyz".into(),
        "T 0 what".into(),
    ] {
        let text = frame(&format!("{dir_line}{bad}\n"));
        assert!(parse(text.as_bytes(), &asked).is_err(), "{bad}");
    }
}

// ---- the hash cache ------------------------------------------------------------

/// The probe with the cache as `mode` allows, the threshold lowered to 0
/// bytes, and the lock directory at `lock`.
fn probe_cached(its: &[ProbeItem], mode: HashCache, lock: &Path) -> HostActual {
    let s = script_with(its, mode).replace(&format!("-lt {CACHE_MIN_BYTES} ]"), "-lt 0 ]");
    let s = format!(
        "TEND_LOCK_DIR={}\n{s}",
        crate::shell::quote(lock.to_str().unwrap())
    );
    let out = LocalTransport::new()
        .exec(PROBE_SH, s.as_bytes(), Duration::from_secs(60))
        .expect("run probe");
    assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
    parse(&out.stdout, its).expect("parse")
}

const PROBE_SH: &str = "exec sh -s";

fn sha_of(a: &HostActual, key: &str) -> String {
    match &a.resources[key] {
        Observed::File(f) => f.sha256.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

/// Plants `hash` for `file` in the cache at `lock/hashes`, under the file's
/// current stat key, and dates the cache `age` seconds after the file.
fn plant(lock: &Path, file: &Path, hash: &str, age: i64) {
    let key = Command::new("stat")
        .args(["-c", "%d %i %s %.9Y %.9Z", "--"])
        .arg(file)
        .output()
        .unwrap();
    let key = String::from_utf8(key.stdout).unwrap();
    let c = lock.join("hashes");
    std::fs::write(&c, format!("{CACHE_HEADER}\n{} {hash}\n", key.trim())).unwrap();
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mtime = std::fs::metadata(file).unwrap().modified().unwrap();
    let when = if age >= 0 {
        mtime + Duration::from_secs(age as u64)
    } else {
        mtime - Duration::from_secs((-age) as u64)
    };
    std::fs::File::options()
        .write(true)
        .open(&c)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

#[test]
fn the_hash_cache_is_written_by_apply_probes_and_trusted_only_when_old_enough() {
    use crate::core::sha256_hex;
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("lock");
    std::fs::create_dir(&lock).unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o700)).unwrap();
    let f = dir.path().join("big");
    std::fs::write(&f, b"hello\n").unwrap();
    let g = dir.path().join("other");
    std::fs::write(&g, b"other\n").unwrap();
    let mut its = items(&[f.to_str().unwrap(), g.to_str().unwrap()]);
    its[0] = its[0].clone().cacheable();
    let (kf, kg) = (&its[0].key.clone(), &its[1].key.clone());

    // Read-only probes (plan) never write it; an apply probe does.
    let a = probe_cached(&its, HashCache::Read, &lock);
    assert_eq!(sha_of(&a, kf), HELLO_SHA);
    assert!(
        !lock.join("hashes").exists(),
        "a read-only probe wrote the cache"
    );
    probe_cached(&its, HashCache::ReadWrite, &lock);
    let written = std::fs::read_to_string(lock.join("hashes")).unwrap();
    assert!(
        written.starts_with(&format!("{CACHE_HEADER}\n")),
        "{written}"
    );
    assert!(written.contains(HELLO_SHA), "{written}");
    let mode = std::fs::metadata(lock.join("hashes"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // An entry older than the cache by more than a second is trusted (the
    // planted wrong hash shows it was not recomputed) ...
    let fake = "f".repeat(64);
    plant(&lock, &f, &fake, 5);
    for mode in [HashCache::Read, HashCache::ReadWrite] {
        let a = probe_cached(&its, mode, &lock);
        assert_eq!(sha_of(&a, kf), fake, "{mode:?}");
        assert_eq!(
            sha_of(&a, kg),
            sha256_hex(b"other\n"),
            "{mode:?}: a file not in the cache is hashed"
        );
    }
    // ... and never by the barrier re-probe (Off), nor for an item that
    // is not cacheable (a file to be deleted: its fingerprint).
    let a = probe_cached(&its, HashCache::Off, &lock);
    assert_eq!(sha_of(&a, kf), HELLO_SHA);
    let fresh = items(&[f.to_str().unwrap()]);
    let a = probe_cached(&fresh, HashCache::ReadWrite, &lock);
    assert_eq!(sha_of(&a, &fresh[0].key), HELLO_SHA);

    // Racy: the cache written within a second of the file's mtime.
    plant(&lock, &f, &fake, 0);
    let a = probe_cached(&its, HashCache::Read, &lock);
    assert_eq!(sha_of(&a, kf), HELLO_SHA, "a racy entry was trusted");

    // The file changed (same size, mtime put back): its ctime moved.
    plant(&lock, &f, &fake, 5);
    let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
    std::fs::write(&f, b"HELLO\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let a = probe_cached(&its, HashCache::Read, &lock);
    assert_eq!(sha_of(&a, kf), sha256_hex(b"HELLO\n"));
    std::fs::write(&f, b"hello\n").unwrap();

    // Not trusted: another header, a cache others can read, a lock
    // directory others can enter.
    for spoil in ["header", "mode", "dir"] {
        plant(&lock, &f, &fake, 5);
        let c = lock.join("hashes");
        match spoil {
            "header" => {
                let t = std::fs::read_to_string(&c).unwrap().replacen(
                    "tend-hash-cache 1",
                    "tend-hash-cache 0",
                    1,
                );
                let m = std::fs::metadata(&c).unwrap().modified().unwrap();
                std::fs::write(&c, t).unwrap();
                std::fs::File::options()
                    .write(true)
                    .open(&c)
                    .unwrap()
                    .set_modified(m)
                    .unwrap();
            }
            "mode" => std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o644)).unwrap(),
            _ => std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o755)).unwrap(),
        }
        let a = probe_cached(&its, HashCache::Read, &lock);
        assert_eq!(
            sha_of(&a, kf),
            HELLO_SHA,
            "{spoil}: an untrusted cache was read"
        );
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

#[test]
fn the_hash_cache_keeps_names_that_sha256sum_escapes_in_their_place() {
    use crate::core::sha256_hex;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("lock");
    std::fs::create_dir(&lock).unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o700)).unwrap();
    let names = ["plain", "back\\slash", "new\nline", "sp ace", "-dash"];
    let paths: Vec<String> = names
        .iter()
        .map(|n| dir.path().join(n).to_str().unwrap().to_string())
        .collect();
    for (i, p) in paths.iter().enumerate() {
        std::fs::write(p, format!("content {i}\n")).unwrap();
    }
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let its: Vec<ProbeItem> = items(&refs).into_iter().map(ProbeItem::cacheable).collect();
    for round in 0..3 {
        if round == 2 {
            // Some from the cache (trusted once it is older), some hashed.
            let c = lock.join("hashes");
            let m = std::fs::metadata(&c).unwrap().modified().unwrap();
            std::fs::File::options()
                .write(true)
                .open(&c)
                .unwrap()
                .set_modified(m + Duration::from_secs(5))
                .unwrap();
            std::fs::write(&paths[2], b"changed\n").unwrap();
        }
        let a = probe_cached(&its, HashCache::ReadWrite, &lock);
        for (i, it) in its.iter().enumerate() {
            let want = if round == 2 && i == 2 {
                b"changed\n".to_vec()
            } else {
                format!("content {i}\n").into_bytes()
            };
            assert_eq!(
                sha_of(&a, &it.key),
                sha256_hex(&want),
                "round {round}, {:?}",
                names[i]
            );
        }
    }
}

#[test]
fn below_the_threshold_the_cached_probe_hashes_everything_without_extra_processes() {
    let its = items(&["/etc/hostname"]);
    let s = script_with(&its, HashCache::ReadWrite);
    assert!(s.contains(&format!("-lt {CACHE_MIN_BYTES} ]")));
    assert!(
        !script(&its).contains("awk"),
        "the plain probe never uses awk"
    );
}
