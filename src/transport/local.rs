//! The `transport: local` host: runs scripts with the local `sh`.
//!
//! Each call spawns `sh -c SCRIPT` in a process group of its own, feeds stdin
//! from one thread, drains stdout and stderr on two more (so no pipe can fill
//! up and stall the others), and learns of its exit on a fourth. The calling
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

/// How long to wait for `sh` to die after SIGKILL before leaving its reaping
/// to a background thread; only a process stuck in the kernel takes longer.
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
    /// A chunk of stdout as it arrives.
    StdoutChunk(Vec<u8>),
    /// Stdout reached end of file (or failed).
    StdoutEnd(io::Result<()>),
    Stderr(io::Result<Vec<u8>>),
    /// `sh` has exited; it stays a zombie until [`Child::wait`] reaps it.
    Exited(io::Result<()>),
}

impl Transport for LocalTransport {
    fn hold(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<(String, Box<dyn super::Held>), TransportError> {
        self.hold_impl(script, timeout)
    }

    fn exec_streaming(
        &self,
        script: &str,
        stdin: &[u8],
        timeout: Duration,
        sink: super::StdoutSink<'_>,
    ) -> Result<ExecOutput, TransportError> {
        let deadline = Instant::now() + timeout;
        let mut child = self.spawn(script, Stdio::piped())?;

        let (tx, rx) = mpsc::channel();
        spawn_io(&mut child, stdin.to_vec(), &tx);
        let pid = child.id();
        thread::spawn(move || {
            let _ = tx.send(Event::Exited(wait_without_reaping(pid)));
        });

        match collect(&rx, deadline, sink) {
            Ok(stderr) => {
                // Exited already: this only reaps and reads the status.
                let status = child.wait().map_err(|e| {
                    TransportError::new(
                        FailureClass::Transient,
                        format!("local command: cannot reap sh: {e}"),
                    )
                })?;
                Ok(ExecOutput {
                    status: exit_code(status),
                    stdout: Vec::new(),
                    stderr,
                })
            }
            Err(failure) => {
                kill_group(child, &rx);
                Err(match failure {
                    Failure::Timeout => TransportError::new(
                        FailureClass::Timeout,
                        format!(
                            "local command timed out after {}",
                            humantime::format_duration(timeout)
                        ),
                    ),
                    Failure::Io(what, e) => TransportError::new(
                        FailureClass::Transient,
                        format!("local command: cannot {what}: {e}"),
                    ),
                })
            }
        }
    }
}

impl LocalTransport {
    /// `sh -c SCRIPT` in a process group of its own, with stdin and stdout
    /// piped.
    fn spawn(&self, script: &str, stderr: Stdio) -> Result<Child, TransportError> {
        if script.as_bytes().contains(&0) {
            // No argv element can hold NUL; this is a bug in whoever built
            // the script, and running it again would fail the same way.
            return Err(TransportError::new(
                FailureClass::Execution,
                "script contains a NUL byte",
            ));
        }
        Command::new(&self.shell)
            .arg("-c")
            .arg(script)
            // Paths in scripts are absolute; a fixed working directory keeps
            // local runs from depending on where tend was started.
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            // A group of its own, so that a timeout can kill the script's
            // children too, and a Ctrl-C at tend's terminal is tend's to handle.
            .process_group(0)
            .spawn()
            .map_err(|e| spawn_error(&self.shell, e))
    }

    fn hold_impl(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<(String, Box<dyn super::Held>), TransportError> {
        let mut child = self.spawn(script, Stdio::null())?;
        let stdin = child.stdin.take();
        let mut out = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        // The first line goes back; the rest is read and dropped, so the
        // command never blocks on a full pipe.
        thread::spawn(move || {
            let mut line = Vec::new();
            let mut sent = false;
            let mut buf = [0u8; 4096];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) if !sent => {
                        line.extend_from_slice(&buf[..n]);
                        if let Some(i) = line.iter().position(|&c| c == b'\n') {
                            line.truncate(i);
                            sent = true;
                            let _ = tx.send(std::mem::take(&mut line));
                        } else if line.len() > 4096 {
                            sent = true;
                            let _ = tx.send(std::mem::take(&mut line));
                        }
                    }
                    Ok(_) => {}
                }
            }
            if !sent {
                let _ = tx.send(line);
            }
        });
        let mut held = LocalHeld {
            child: Some(child),
            stdin,
        };
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok((String::from_utf8_lossy(&line).into_owned(), Box::new(held))),
            Err(_) => {
                held.kill();
                Err(TransportError::new(
                    FailureClass::Timeout,
                    format!(
                        "local command gave no answer within {}",
                        humantime::format_duration(timeout)
                    ),
                ))
            }
        }
    }
}

/// A local command kept running: its stdin is the thread that holds it.
struct LocalHeld {
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
}

impl LocalHeld {
    fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            thread::spawn(move || child.wait());
        }
    }
}

impl super::Held for LocalHeld {
    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for LocalHeld {
    fn drop(&mut self) {
        // End of file on its stdin ends it; one that lingers is killed.
        self.stdin = None;
        let until = Instant::now() + super::RELEASE_WAIT;
        while let Some(c) = self.child.as_mut() {
            match c.try_wait() {
                Ok(None) if Instant::now() < until => {
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => break,
                _ => {
                    self.child = None;
                    return;
                }
            }
        }
        self.kill();
    }
}

/// Why [`collect`] stopped early.
enum Failure {
    Timeout,
    Io(&'static str, io::Error),
}

/// Waits until `sh` has exited and both output pipes are at end of file, or
/// the deadline passes; passes stdout to `sink` as it comes and returns
/// stderr.
fn collect(
    rx: &mpsc::Receiver<Event>,
    deadline: Instant,
    sink: super::StdoutSink<'_>,
) -> Result<Vec<u8>, Failure> {
    let mut stdout_done = false;
    let mut stderr = None;
    let mut exited = false;
    while !stdout_done || stderr.is_none() || !exited {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Stdin(Ok(()))) => {}
            // The script exited or closed stdin without reading it all; its
            // exit status says whether that was a failure.
            Ok(Event::Stdin(Err(e))) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Ok(Event::Stdin(Err(e))) => return Err(Failure::Io("write the script's stdin", e)),
            Ok(Event::StdoutChunk(b)) => sink(&b),
            Ok(Event::StdoutEnd(r)) => {
                r.map_err(|e| Failure::Io("read stdout", e))?;
                stdout_done = true;
            }
            Ok(Event::Stderr(r)) => stderr = Some(r.map_err(|e| Failure::Io("read stderr", e))?),
            Ok(Event::Exited(r)) => {
                r.map_err(|e| Failure::Io("wait for sh", e))?;
                exited = true;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(Failure::Timeout),
            // Every helper sends once before it ends, so one of them panicked.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Failure::Io(
                    "collect output",
                    io::Error::other("a helper thread died"),
                ));
            }
        }
    }
    Ok(stderr.unwrap_or_default())
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
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            match pipe_out.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if t.send(Event::StdoutChunk(buf[..n].to_vec())).is_err() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let _ = t.send(Event::StdoutEnd(end));
    });
    let t = tx.clone();
    thread::spawn(move || {
        // Bounded: a script that floods stderr cannot grow tend.
        let mut kept = super::Bounded::new(super::STDERR_LIMIT);
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            match pipe_err.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => kept.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let _ = t.send(Event::Stderr(end.map(|()| kept.into_bytes())));
    });
}

/// Blocks until process `pid` has exited, without reaping it. While it is an
/// unreaped zombie its pid, which is also its process group id, cannot be
/// reused, so a later `kill(-pgid)` cannot hit a stranger's group.
fn wait_without_reaping(pid: u32) -> io::Result<()> {
    loop {
        // SAFETY: siginfo_t is plain data, valid when zeroed; waitid writes
        // into it and reads nothing else of ours.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a plain system call with a valid pointer to `info`.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Kills the script's whole process group, then reaps `sh`: at once if it has
/// died within [`KILL_GRACE`] (SIGKILL is not refused, so it normally has),
/// otherwise on a thread of its own, so the caller never hangs on a process
/// stuck in the kernel.
fn kill_group(mut child: Child, rx: &mpsc::Receiver<Event>) {
    // `sh` is not reaped before this point, so its pid is still its group's id.
    let pgid = child.id() as libc::pid_t;
    // SAFETY: kill(2) has no memory-safety preconditions. ESRCH (nobody left
    // in the group) is fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let until = Instant::now() + KILL_GRACE;
    while let Ok(ev) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        if matches!(ev, Event::Exited(_)) {
            let _ = child.wait();
            return;
        }
    }
    thread::spawn(move || child.wait());
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
    fn a_held_command_runs_until_its_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ended");
        let script = format!(
            "trap 'touch {}' EXIT; echo READY; echo more; cat >/dev/null",
            flag.display()
        );
        let (line, mut held) = LocalTransport::new().hold(&script, T).expect("hold");
        assert_eq!(line, "READY");
        assert!(held.alive());
        assert!(!flag.exists(), "still running");
        drop(held);
        assert!(flag.exists(), "ended when its stdin closed");

        // One that answers and exits is not alive for long.
        let (line, mut held) = LocalTransport::new().hold("echo BUSY", T).unwrap();
        assert_eq!(line, "BUSY");
        let until = Instant::now() + T;
        while held.alive() {
            assert!(Instant::now() < until, "exited");
            thread::sleep(Duration::from_millis(5));
        }
        // No answer at all: an empty line.
        let (line, _held) = LocalTransport::new().hold("exit 0", T).unwrap();
        assert_eq!(line, "");
        // No answer in time: a timeout, and the command is gone.
        let err = LocalTransport::new()
            .hold("sleep 30", Duration::from_millis(200))
            .err()
            .expect("timeout");
        assert_eq!(err.class, FailureClass::Timeout);
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
