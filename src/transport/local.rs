//! The `transport: local` host: runs scripts with the local `sh`.
//!
//! Each call spawns `sh -c SCRIPT` in a process group of its own, feeds stdin
//! from one thread, drains stdout and stderr on two more (so no pipe can fill
//! up and stall the others), and reaps the child on a fourth. The calling
//! thread only waits on a channel with a deadline. On timeout the whole
//! process group is killed, so a script's children (a `sleep`, a pipeline)
//! die with it.
//!
//! Like sshd, the call completes when `sh` has exited AND both output pipes
//! reached end of file: a background process that keeps stdout open keeps the
//! call waiting, up to the timeout.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{ExecOutput, Transport, TransportError};
use crate::core::retry::FailureClass;

/// How long to wait for the killed process to be reaped after a timeout.
/// SIGKILL takes effect at once; this bound only guards against a stuck
/// kernel or a process that escaped the group while holding the pipes.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Runs scripts on the machine tend runs on.
#[derive(Clone, Debug)]
pub struct LocalTransport {
    shell: PathBuf,
}

impl Default for LocalTransport {
    fn default() -> Self {
        LocalTransport::new()
    }
}

impl LocalTransport {
    /// Uses the first `sh` on PATH.
    pub fn new() -> Self {
        LocalTransport {
            shell: PathBuf::from("sh"),
        }
    }

    /// Uses the given shell, which must accept `-c SCRIPT` as POSIX `sh` does.
    pub fn with_shell(shell: impl Into<PathBuf>) -> Self {
        LocalTransport {
            shell: shell.into(),
        }
    }
}

/// What the helper threads report back to the waiting thread.
enum Event {
    Stdin(io::Result<()>),
    Stdout(io::Result<Vec<u8>>),
    Stderr(io::Result<Vec<u8>>),
    Exited(io::Result<ExitStatus>),
}

impl Transport for LocalTransport {
    fn exec(
        &self,
        script: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<ExecOutput, TransportError> {
        let deadline = Instant::now() + timeout;
        if script.as_bytes().contains(&0) {
            // No argv element can hold NUL; this is a bug in whoever built
            // the script, and running it again would fail the same way.
            return Err(TransportError::new(
                FailureClass::Execution,
                "script contains a NUL byte",
            ));
        }
        let mut child = Command::new(&self.shell)
            .arg("-c")
            .arg(script)
            // Paths in scripts are absolute; a fixed working directory keeps
            // local runs from depending on where tend was started.
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own, so that a timeout can kill the script's
            // children too, and a Ctrl-C at tend's terminal is tend's to handle.
            .process_group(0)
            .spawn()
            .map_err(|e| spawn_error(&self.shell, e))?;
        let pgid = child.id() as libc::pid_t;

        let (tx, rx) = mpsc::channel();
        spawn_io(&mut child, stdin.to_vec(), &tx);
        {
            let tx = tx.clone();
            thread::spawn(move || {
                let _ = tx.send(Event::Exited(child.wait()));
            });
        }
        drop(tx);

        let mut stdout = None;
        let mut stderr = None;
        let mut status = None;
        while stdout.is_none() || stderr.is_none() || status.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Stdin(Ok(()))) => {}
                // The script exited or closed stdin without reading it all;
                // its exit status says whether that was a failure.
                Ok(Event::Stdin(Err(e))) if e.kind() == io::ErrorKind::BrokenPipe => {}
                Ok(Event::Stdin(Err(e))) => {
                    return Err(io_failure(pgid, &rx, "write the script's stdin", e));
                }
                Ok(Event::Stdout(r)) => {
                    stdout = Some(r.map_err(|e| io_failure(pgid, &rx, "read stdout", e))?)
                }
                Ok(Event::Stderr(r)) => {
                    stderr = Some(r.map_err(|e| io_failure(pgid, &rx, "read stderr", e))?)
                }
                Ok(Event::Exited(r)) => {
                    status = Some(r.map_err(|e| io_failure(pgid, &rx, "wait for sh", e))?)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    kill_group(pgid, &rx, status.is_some());
                    return Err(TransportError::new(
                        FailureClass::Timeout,
                        format!(
                            "local command timed out after {}",
                            humantime::format_duration(timeout)
                        ),
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Every helper sends once before it ends, so this means
                    // one of them panicked.
                    kill_group(pgid, &rx, true);
                    return Err(TransportError::new(
                        FailureClass::Transient,
                        "local command: a helper thread died",
                    ));
                }
            }
        }
        let status = status.expect("loop ends with a status");
        Ok(ExecOutput {
            status: exit_code(status),
            stdout: stdout.expect("loop ends with stdout"),
            stderr: stderr.expect("loop ends with stderr"),
        })
    }
}

/// Starts the stdin writer and the two output readers.
fn spawn_io(child: &mut Child, input: Vec<u8>, tx: &mpsc::Sender<Event>) {
    let mut pipe_in = child.stdin.take().expect("stdin is piped");
    let mut pipe_out = child.stdout.take().expect("stdout is piped");
    let mut pipe_err = child.stderr.take().expect("stderr is piped");
    let t = tx.clone();
    thread::spawn(move || {
        // Dropping the pipe at the end closes it: the script sees end of file.
        let _ = t.send(Event::Stdin(pipe_in.write_all(&input)));
    });
    let t = tx.clone();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = t.send(Event::Stdout(pipe_out.read_to_end(&mut buf).map(|_| buf)));
    });
    let t = tx.clone();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = t.send(Event::Stderr(pipe_err.read_to_end(&mut buf).map(|_| buf)));
    });
}

/// Kills the process group and waits (briefly) for `sh` to be reaped, so that
/// the caller does not return while the script may still be running.
fn kill_group(pgid: libc::pid_t, rx: &mpsc::Receiver<Event>, already_reaped: bool) {
    // SAFETY: kill(2) with a negative pid signals a process group; it has no
    // memory-safety preconditions. The group id is the pid of our child, which
    // the kernel does not reuse while the group has members. ESRCH (nobody
    // left in the group) is fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    if already_reaped {
        return;
    }
    let until = Instant::now() + KILL_GRACE;
    while let Ok(ev) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        if matches!(ev, Event::Exited(_)) {
            return;
        }
    }
}

/// An I/O failure on our side of the pipes: stop the script and report it.
fn io_failure(
    pgid: libc::pid_t,
    rx: &mpsc::Receiver<Event>,
    what: &str,
    e: io::Error,
) -> TransportError {
    kill_group(pgid, rx, false);
    TransportError::new(
        FailureClass::Transient,
        format!("local command: cannot {what}: {e}"),
    )
}

fn spawn_error(shell: &std::path::Path, e: io::Error) -> TransportError {
    let class = match e.kind() {
        // No usable shell here: retrying will not make one appear.
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => FailureClass::Capability,
        // The script is longer than one argv element may be (128 KiB on
        // Linux); the same script will never fit.
        io::ErrorKind::ArgumentListTooLong => FailureClass::Capability,
        // Out of processes, file descriptors or memory: may pass.
        _ => FailureClass::Transient,
    };
    TransportError::new(class, format!("cannot start `{}`: {e}", shell.display()))
}

/// The shell convention: 128 + signal number for a process killed by a signal.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => unreachable!("a reaped process either exited or was signalled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    fn run(script: &str, stdin: &[u8]) -> ExecOutput {
        LocalTransport::new().exec(script, stdin, T).expect("exec")
    }

    #[test]
    fn stdout_stderr_and_status_come_back_apart() {
        let out = run("echo out; echo err >&2; exit 3", b"");
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status, 3);
    }

    #[test]
    fn large_stdin_round_trips_without_deadlock() {
        // Bigger than any pipe buffer in both directions at once.
        let input: Vec<u8> = (0..6 * 1024 * 1024u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let out = run("cat; cat /dev/null >&2", &input);
        assert_eq!(out.status, 0);
        assert!(
            out.stdout == input,
            "stdout differs from stdin ({} bytes)",
            out.stdout.len()
        );
    }

    #[test]
    fn binary_bytes_round_trip() {
        let input: Vec<u8> = (0..=255u8).chain([0, 0, b'\n', 0xff, 0xfe]).collect();
        let out = run("cat", &input);
        assert_eq!(out.stdout, input);
    }

    #[test]
    fn script_that_ignores_stdin_is_not_an_error() {
        let input = vec![b'x'; 4 * 1024 * 1024];
        let out = run("exit 0", &input);
        assert_eq!(out.status, 0);
    }

    #[test]
    fn death_by_signal_is_128_plus_signal() {
        let out = run("kill -TERM $$", b"");
        assert_eq!(out.status, 128 + libc::SIGTERM);
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "sleep 30 & echo $! > {}; wait",
            crate::shell::quote(pidfile.to_str().unwrap())
        );
        let started = Instant::now();
        let err = LocalTransport::new()
            .exec(&script, b"", Duration::from_millis(300))
            .expect_err("must time out");
        assert_eq!(err.class, FailureClass::Timeout, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timeout did not stop the call"
        );

        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild was SIGKILLed; its new parent reaps it when it gets
        // round to it. Gone or a zombie both mean it no longer runs.
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
            let running = match &stat {
                Ok(s) => !s
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z'),
                Err(_) => false,
            };
            if !running {
                break;
            }
            assert!(
                Instant::now() < until,
                "grandchild {pid} still runs: {stat:?}"
            );
            thread::yield_now();
        }
    }

    #[test]
    fn background_process_holding_stdout_times_out() {
        // Like sshd: output is complete only when every writer closed it.
        let err = LocalTransport::new()
            .exec("sleep 30 & exit 0", b"", Duration::from_millis(300))
            .expect_err("must time out");
        assert_eq!(err.class, FailureClass::Timeout);
    }

    #[test]
    fn missing_shell_is_a_capability_failure() {
        let err = LocalTransport::with_shell("/nonexistent/sh")
            .exec("true", b"", T)
            .unwrap_err();
        assert_eq!(err.class, FailureClass::Capability);
        assert!(err.message.contains("/nonexistent/sh"), "{}", err.message);
    }

    #[test]
    fn nul_in_script_is_refused() {
        let err = LocalTransport::new().exec("echo a\0b", b"", T).unwrap_err();
        assert_eq!(err.class, FailureClass::Execution);
    }

    #[test]
    fn oversized_script_is_a_capability_failure() {
        let script = format!("# {}\ntrue", "x".repeat(256 * 1024));
        let err = LocalTransport::new().exec(&script, b"", T).unwrap_err();
        assert_eq!(err.class, FailureClass::Capability, "{err}");
    }
}
