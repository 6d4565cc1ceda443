//! Commands: `run` under `sh -c`, bounded by `timeout`, after checking its
//! guards once more.
//!
//! The probe evaluated the guards when the plan was made; they are checked
//! again right before running, so that a command whose `creates` path
//! appeared (or whose `unless` check started to pass) since then does not run
//! after all: the step succeeds and says why on stdout. The command's stdout
//! and stderr are the step's (dispatch writes them to the step log); its
//! stdin is /dev/null.

use std::time::Duration;

use super::{RemoteCommand, Script};

/// Seconds `timeout` waits after its TERM before it sends KILL.
pub const KILL_AFTER_SECS: u64 = 10;

/// The whole seconds `timeout` is given: `limit` rounded up, at least 1 (a
/// plain number is what both GNU and BusyBox `timeout` take).
pub fn timeout_secs(limit: Duration) -> u64 {
    let secs = limit.as_secs() + u64::from(limit.subsec_nanos() > 0);
    secs.max(1)
}

/// Runs `run` with `sh -c` under `timeout limit`, unless a guard now holds.
/// Exits with the command's status; 124 when it timed out (and says so on
/// stderr).
pub fn run_command(
    run: &str,
    creates: Option<&str>,
    unless: Option<&str>,
    limit: Duration,
) -> RemoteCommand {
    let mut s = Script::new();
    s.var("r", run);
    if let Some(path) = creates {
        s.var("c", path);
        s.line(r#"if [ -e "$c" ]; then"#);
        s.line(r#"  printf 'tend: not running: %s exists now\n' "$c""#);
        s.line("  exit 0");
        s.line("fi");
    }
    if let Some(check) = unless {
        s.var("k", check);
        s.line(r#"if sh -c "$k" </dev/null >/dev/null 2>&1; then"#);
        s.line(r#"  echo 'tend: not running: the `unless` check succeeds now'"#);
        s.line("  exit 0");
        s.line("fi");
    }
    let secs = timeout_secs(limit);
    // `set +e`: the command's status is the script's, reported below.
    s.line("set +e");
    s.line(&format!(
        r#"timeout -k {KILL_AFTER_SECS} {secs} sh -c "$r" </dev/null"#
    ));
    s.line("st=$?");
    s.line(r#"if [ "$st" -eq 124 ]; then"#);
    s.line(&format!("  echo '{TIMED_OUT}{secs}s' >&2"));
    s.line("fi");
    s.line(r#"exit "$st""#);
    s.command()
}

/// What a step wrapped by [`run_command`] or [`bounded`] says on stderr
/// when `timeout` stopped it (exit status 124): the step failed with class
/// `Timeout`, not `Execution`. `timeout` exits 124 too when the command
/// itself does (GNU and BusyBox alike), so a command that exits 124 on its
/// own is reported as timed out.
pub const TIMED_OUT: &str = "tend: timed out after ";

/// Whether a step's exit status and stderr say that tend's `timeout`
/// stopped it.
pub fn timed_out(status: i32, stderr: &[u8]) -> bool {
    status == 124
        && String::from_utf8_lossy(stderr)
            .lines()
            .any(|l| l.starts_with(TIMED_OUT))
}

/// `inner` (a script without stdin) run by `sh -c` under `timeout limit`:
/// for steps whose tools may wait without bound (a package manager
/// waiting for its lock, a download), so that `step_timeout` holds for
/// them as for commands. Exits with the script's status, 124 (saying so
/// on stderr) when it timed out.
pub fn bounded(inner: RemoteCommand, limit: Duration) -> RemoteCommand {
    debug_assert!(inner.stdin.is_empty(), "bounded scripts read no stdin");
    let mut s = Script::new();
    s.var("b", &inner.script);
    let secs = timeout_secs(limit);
    s.line("set +e");
    s.line(&format!(
        r#"timeout -k {KILL_AFTER_SECS} {secs} sh -c "$b" </dev/null"#
    ));
    s.line("st=$?");
    s.line(r#"if [ "$st" -eq 124 ]; then"#);
    s.line(&format!("  echo '{TIMED_OUT}{secs}s' >&2"));
    s.line("fi");
    s.line(r#"exit "$st""#);
    s.command()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::time::Instant;

    use super::*;
    use crate::transport::local::LocalTransport;
    use crate::transport::{ExecOutput, Transport};

    fn run(cmd: &RemoteCommand) -> ExecOutput {
        LocalTransport::new()
            .exec(&cmd.script, &cmd.stdin, Duration::from_secs(60))
            .expect("exec")
    }

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(timeout_secs(Duration::from_secs(300)), 300);
        assert_eq!(timeout_secs(Duration::from_millis(1500)), 2);
        assert_eq!(timeout_secs(Duration::from_millis(10)), 1);
        assert_eq!(timeout_secs(Duration::ZERO), 1);
    }

    #[test]
    fn script_quotes_run_and_guards_into_variables() {
        let cmd = run_command(
            "echo 'it''s' $HOME",
            Some("/srv/it's"),
            Some("test -e '/x'"),
            Duration::from_secs(90),
        );
        assert_eq!(
            cmd.script,
            "set -eu\n\
             r='echo '\\''it'\\'''\\''s'\\'' $HOME'\n\
             c='/srv/it'\\''s'\n\
             if [ -e \"$c\" ]; then\n\
             \x20 printf 'tend: not running: %s exists now\\n' \"$c\"\n\
             \x20 exit 0\n\
             fi\n\
             k='test -e '\\''/x'\\'''\n\
             if sh -c \"$k\" </dev/null >/dev/null 2>&1; then\n\
             \x20 echo 'tend: not running: the `unless` check succeeds now'\n\
             \x20 exit 0\n\
             fi\n\
             set +e\n\
             timeout -k 10 90 sh -c \"$r\" </dev/null\n\
             st=$?\n\
             if [ \"$st\" -eq 124 ]; then\n\
             \x20 echo 'tend: timed out after 90s' >&2\n\
             fi\n\
             exit \"$st\"\n"
        );
        assert!(cmd.stdin.is_empty());
    }

    #[test]
    fn runs_the_script_and_keeps_its_output_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let script = format!(
            "echo out; echo err >&2\ntouch '{}'\nread x || echo 'no stdin'\nexit 3",
            marker.display()
        );
        let out = run(&run_command(&script, None, None, Duration::from_secs(30)));
        assert_eq!(out.status, 3);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\nno stdin\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
        assert!(marker.exists());
    }

    #[test]
    fn guards_are_checked_again_before_running() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let there = dir.path().join("there");
        fs::write(&there, "").unwrap();
        let run_it = format!("touch '{}'", marker.display());
        let t = Duration::from_secs(30);
        let out = run(&run_command(
            &run_it,
            Some(there.to_str().unwrap()),
            None,
            t,
        ));
        assert_eq!(out.status, 0);
        assert!(String::from_utf8_lossy(&out.stdout).contains("exists now"));
        let out = run(&run_command(&run_it, None, Some("true"), t));
        assert_eq!(out.status, 0);
        assert!(String::from_utf8_lossy(&out.stdout).contains("`unless` check succeeds now"));
        assert!(!marker.exists(), "neither ran");
        let missing = dir.path().join("missing");
        let out = run(&run_command(
            &run_it,
            Some(missing.to_str().unwrap()),
            Some("exit 1"),
            t,
        ));
        assert_eq!(out.status, 0);
        assert!(marker.exists(), "both guards let it run");
    }

    #[test]
    fn a_command_that_outlives_its_timeout_is_stopped() {
        let started = Instant::now();
        let out = run(&run_command(
            "echo started; sleep 30",
            None,
            None,
            Duration::from_millis(300),
        ));
        assert!(started.elapsed() < Duration::from_secs(10), "not stopped");
        assert_eq!(out.status, 124);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "tend: timed out after 1s\n"
        );
        assert!(timed_out(out.status, &out.stderr));
        // A failure that is not a timeout says nothing of one.
        let own = run(&run_command("exit 3", None, None, Duration::from_secs(5)));
        assert_eq!(own.status, 3);
        assert!(!timed_out(own.status, &own.stderr));
    }

    /// `bounded` holds a script without its own limit (a package manager
    /// waiting for its lock) to step_timeout, the whole process group.
    #[test]
    fn a_bounded_script_is_stopped_at_its_limit() {
        let started = Instant::now();
        let inner = RemoteCommand {
            script: "set -eu\nset -- 'a b'\necho \"$1\"; sleep 30 & wait\n".into(),
            stdin: vec![],
        };
        let out = run(&bounded(inner, Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(10), "not stopped");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b\n");
        assert!(timed_out(out.status, &out.stderr), "{out:?}");
        let ok = RemoteCommand {
            script: "exit 3\n".into(),
            stdin: vec![],
        };
        let out = run(&bounded(ok, Duration::from_secs(5)));
        assert_eq!(out.status, 3);
        assert!(!timed_out(out.status, &out.stderr));
    }
}
