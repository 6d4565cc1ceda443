//! Hostile input against the real binary: closed pipes, usage errors, values
//! that used to panic later, and desired-state files built to hurt the
//! parser and the validator. Every case asserts the exit code and that
//! nothing panicked. All hosts are `transport: local` in temp dirs.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, Run};

/// A fixture with one host `box` that has one change pending (a directory
/// under the fixture's root).
fn one_host() -> Fixture {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: box\n    transport: local\n",
    );
    fx.write(
        "hosts/box.yaml",
        "resources:\n  - kind: directory\n    path: {root}/d\n",
    );
    fx
}

/// Run `cmd` with stdout (or stderr) a pipe whose read end is already
/// closed: the first write gets EPIPE. Returns the exit code and what the
/// other stream said.
fn with_closed(mut cmd: Command, stream: Stream) -> (i32, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    match stream {
        Stream::Stdout => cmd.stdout(writer).stderr(Stdio::piped()),
        Stream::Stderr => cmd.stderr(writer).stdout(Stdio::piped()),
    };
    let out = cmd.output().expect("running tend");
    let other = match stream {
        Stream::Stdout => out.stderr,
        Stream::Stderr => out.stdout,
    };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&other).into_owned(),
    )
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

#[test]
fn a_closed_stdout_ends_each_command_quietly_with_its_normal_exit_code() {
    let fx = one_host();
    // A run to list and a status to show.
    fx.run(&["apply"]).code(2);
    let run_id = fx.run(&["runs", "--json"]).json()[0]["run_id"]
        .as_str()
        .expect("a run id")
        .to_string();
    for (args, code) in [
        (vec!["schema"], 0),
        (vec!["validate"], 0),
        (vec!["validate", "--json"], 0),
        (vec!["plan"], 2),
        (vec!["plan", "--json"], 2),
        (vec!["probe"], 0),
        (vec!["status"], 0),
        (vec!["status", "box"], 0),
        (vec!["status", "--json"], 0),
        (vec!["runs"], 0),
        (vec!["runs", "--json"], 0),
        (vec!["show", run_id.as_str()], 0),
        (vec!["show", run_id.as_str(), "--json"], 0),
        (vec!["apply"], 2),
        (vec!["apply", "--json"], 2),
        (vec!["--help"], 0),
        (vec!["--version"], 0),
    ] {
        let (got, stderr) = with_closed(fx.cmd(&args), Stream::Stdout);
        assert_eq!(
            got, code,
            "tend {args:?} with stdout closed: exit {got}\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.to_lowercase().contains("broken pipe"),
            "tend {args:?} with stdout closed is not quiet:\n{stderr}"
        );
    }
    // `apply` still recorded its run although nobody read its summary.
    let runs = fx.run(&["runs", "--json"]).json();
    assert_eq!(runs.as_array().map(Vec::len), Some(3), "{runs}");
}

#[test]
fn a_closed_stderr_never_panics() {
    let fx = one_host();
    for (args, code) in [
        (vec!["--no-such-flag"], 1),
        (vec!["plan", "-v"], 2),
        (vec!["show", "r-none"], 1),
    ] {
        let (got, stdout) = with_closed(fx.cmd(&args), Stream::Stderr);
        assert_eq!(
            got, code,
            "tend {args:?} with stderr closed: exit {got}\n{stdout}"
        );
    }
    // An invalid desired state prints its problems to stdout and its
    // summary to the closed stderr.
    fx.write("tend.yaml", "resync: 0s\n");
    let (got, stdout) = with_closed(fx.cmd(&["validate"]), Stream::Stderr);
    assert_eq!(got, 1, "{stdout}");
    assert!(
        stdout.contains("tend.yaml:1:9: resync must be above zero"),
        "{stdout}"
    );
}

#[test]
fn usage_errors_exit_1_and_help_and_version_exit_0_on_stdout() {
    let fx = one_host();
    for args in [
        vec!["plan", "--no-such-flag"],
        vec!["apply", "--no-such-flag"],
        vec!["apply", "--dispatch", "sometimes"],
        vec!["apply", "--dispatch"],
        vec!["runs", "--limit", "many"],
        vec!["confirm"],
        vec!["show"],
        vec!["no-such-command"],
        vec![],
    ] {
        let r = fx.run(&args);
        r.code(1);
        assert!(
            r.stderr.contains("error") || r.stderr.contains("Usage"),
            "{r}"
        );
    }
    for args in [vec!["--help"], vec!["plan", "--help"], vec!["--version"]] {
        let r = fx.run(&args);
        r.code(0);
        assert!(
            !r.stdout.is_empty(),
            "tend {args:?} printed nothing on stdout:\n{r}"
        );
    }
}

#[test]
fn every_unusable_setting_is_a_validation_problem_at_its_value() {
    let fx = one_host();
    fx.write(
        "tend.yaml",
        "resync: 0s\nprobe_timeout: 0s\nstep_timeout: 400d\ntoken_max_ttl: 0s\n\
         quiet_window: 9999d\nmax_defer: 366d\nretry_backoff: 1000d\nretries: 4000000000\n\
         concurrency: 100000\ncrash_loop_threshold: 0\n",
    );
    fx.write(
        "hosts/box.yaml",
        "resources:\n  - kind: command\n    name: slow\n    run: \"true\"\n    timeout: 0s\n\
         \x20 - kind: command\n    name: slower\n    run: \"true\"\n    timeout: 500d\n",
    );
    let r = fx.run(&["validate"]);
    r.code(1);
    for line in [
        "tend.yaml:1:9: resync must be above zero",
        "tend.yaml:2:16: probe_timeout must be above zero",
        "tend.yaml:3:15: step_timeout `400d` is above the maximum of 365d",
        "tend.yaml:4:16: token_max_ttl must be above zero",
        "tend.yaml:5:15: quiet_window `9999d` is above the maximum of 365d",
        "tend.yaml:6:12: max_defer `366d` is above the maximum of 365d",
        "tend.yaml:7:16: retry_backoff `1000d` is above the maximum of 365d",
        "tend.yaml:8:10: retries must be at most 10",
        "tend.yaml:9:14: concurrency must be between 1 and 1024",
        "tend.yaml:10:23: crash_loop_threshold must be at least 1",
        "hosts/box.yaml:5:14: timeout must be above zero",
        "hosts/box.yaml:9:14: timeout `500d` is above the maximum of 365d",
    ] {
        assert!(r.stdout.contains(line), "missing `{line}`:\n{r}");
    }
}

/// Wait for a child to exit, up to a deadline; kill it after.
fn wait_deadline(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_controller_starts_on_a_zero_resync_and_reports_it() {
    let fx = one_host();
    fx.write("tend.yaml", "resync: 0s\n");
    let mut child = fx
        .cmd(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tend run");
    // The controller reports the invalid desired state on the host's status.
    let status = fx.state().join("status/box.json");
    let end = Instant::now() + Duration::from_secs(60);
    let mut seen = false;
    while Instant::now() < end {
        if let Some(s) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("tend run ended early ({s}):\n{err}");
        }
        if let Ok(text) = std::fs::read_to_string(&status)
            && text.contains("resync must be above zero")
        {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling the child this test spawned, by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let exit = wait_deadline(&mut child, Duration::from_secs(30));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(seen, "status never named the problem:\n{err}");
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Desired-state files built to hurt: each must give `validate` and `plan`
/// an exit code of 1 with problems, never a panic, a crash or a hang.
#[test]
fn nasty_desired_state_files_are_problems_not_panics() {
    let deep_seq = "[".repeat(100_000);
    let deep_map = "a: ".repeat(20_000) + "b";
    let deep_flow = "{a: ".repeat(50_000);
    let deep_closed_seq = "[".repeat(100_000) + &"]".repeat(100_000);
    let deep_closed_map = "{a: ".repeat(100_000) + "b" + &"}".repeat(100_000);
    let deep_block: String = (0..5_000)
        .map(|i| format!("{}- \n", " ".repeat(2 * i)))
        .collect();
    let mut billion = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = if i == 1 {
            "a".to_string()
        } else {
            format!("l{}", i - 1)
        };
        billion.push_str(&format!(
            "l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    let huge_numbers = "resources:\n  - kind: user\n    name: u\n    uid: 999999999999999999999999999999999999999\n\
                        \x20 - kind: group\n    name: g\n    gid: -1\n  - kind: file\n    path: /x\n    mode: 99999999999999999999\n";
    let odd_keys = "? [a, b]\n: c\n? {x: y}\n: z\n";
    let paths = "resources:\n  - kind: file\n    path: \"/a\\nb\"\n    content: x\n  - kind: directory\n    path: \"/a\\u0000b\"\n  - kind: symlink\n    path: \"/\\u00e9/\\t\"\n    target: \"\\u0000\"\n";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("deep sequence", deep_seq.into_bytes()),
        ("deep mapping", deep_map.into_bytes()),
        ("deep flow mapping", deep_flow.into_bytes()),
        ("deep closed sequence", deep_closed_seq.into_bytes()),
        ("deep closed mapping", deep_closed_map.into_bytes()),
        ("deep block sequence", deep_block.into_bytes()),
        ("alias bomb", billion.into_bytes()),
        (
            "not UTF-8",
            b"resources:\n  - kind: file\n    path: /\xff\xfe\n".to_vec(),
        ),
        ("NUL bytes", b"resources:\0\n  - kind: \0file\n".to_vec()),
        ("huge numbers", huge_numbers.as_bytes().to_vec()),
        ("odd keys", odd_keys.as_bytes().to_vec()),
        ("control characters in paths", paths.as_bytes().to_vec()),
        ("empty", Vec::new()),
        ("only a comment", b"# nothing\n".to_vec()),
        (
            "two documents",
            b"resources: []\n---\nresources: []\n".to_vec(),
        ),
        ("a tag", b"!!binary resources: x\n".to_vec()),
        ("a scalar", b"hello\n".to_vec()),
        ("a list", b"- 1\n- 2\n".to_vec()),
        ("a BOM only", "\u{feff}".as_bytes().to_vec()),
    ];
    for (what, bytes) in cases {
        for file in ["hosts/box.yaml", "inventory.yaml", "tend.yaml"] {
            let fx = one_host();
            fx.write_bytes(file, &bytes);
            // tend.yaml is optional, every key of it too: empty is fine.
            let benign =
                file == "tend.yaml" && matches!(what, "empty" | "only a comment" | "a BOM only");
            for cmd in ["validate", "plan"] {
                let r = fx.run(&[cmd]);
                assert!(!r.stderr.contains("panicked"), "{what} in {file}:\n{r}");
                if benign {
                    assert!(matches!(r.code, 0 | 2), "{what} in {file}:\n{r}");
                    continue;
                }
                assert_eq!(
                    r.code, 1,
                    "{what} in {file}: tend {cmd} exit {}:\n{r}",
                    r.code
                );
                assert!(!r.stderr.contains("panicked"), "{what} in {file}:\n{r}");
            }
        }
    }
}

#[test]
fn odd_desired_state_layouts_are_problems_not_panics() {
    // A directory where a file is expected, a host file that is a symlink
    // loop, a FIFO, and `hosts` itself a file.
    let fx = one_host();
    std::fs::remove_file(fx.dir().join("hosts/box.yaml")).unwrap();
    std::fs::create_dir(fx.dir().join("hosts/box.yaml")).unwrap();
    check_fails(&fx, "a directory as host file");

    let fx = one_host();
    std::fs::create_dir(fx.dir().join("tend.yaml")).unwrap();
    check_fails(&fx, "a directory as tend.yaml");

    let fx = one_host();
    std::fs::remove_file(fx.dir().join("hosts/box.yaml")).unwrap();
    std::os::unix::fs::symlink("box.yaml", fx.dir().join("hosts/box.yaml")).unwrap();
    check_fails(&fx, "a symlink loop as host file");

    let fx = one_host();
    let loop_dir = fx.dir().join("hosts/loop.yaml");
    std::os::unix::fs::symlink(&loop_dir, &loop_dir).unwrap();
    check_fails(&fx, "a symlink loop beside the host file");

    let fx = one_host();
    let fifo = std::ffi::CString::new(fx.dir().join("hosts/fifo.yaml").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    check_fails(&fx, "a FIFO as host file");

    let fx = one_host();
    std::fs::remove_dir_all(fx.dir().join("hosts")).unwrap();
    std::fs::write(fx.dir().join("hosts"), "not a directory").unwrap();
    check_fails(&fx, "hosts/ as a file");

    let fx = one_host();
    std::fs::remove_file(fx.dir().join("inventory.yaml")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", fx.dir().join("inventory.yaml")).unwrap();
    check_fails(&fx, "inventory.yaml as /dev/zero");
}

fn check_fails(fx: &Fixture, what: &str) {
    for cmd in ["validate", "plan"] {
        let r: Run = fx.run(&[cmd]);
        assert_eq!(r.code, 1, "{what}: tend {cmd} exit {}:\n{r}", r.code);
        assert!(!r.stderr.contains("panicked"), "{what}:\n{r}");
    }
}
