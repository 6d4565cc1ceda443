//! The SSH transport on libssh2 (`ssh2`). One session per host, opened on
//! first use and kept for every later command (probe, apply, re-probe); a
//! session that fails is dropped and the next command reconnects.
//!
//! Host key verification is mandatory and fails closed: the inventory's pinned
//! `host_key` fingerprint, else the `known_hosts` file. Authentication is
//! public-key only: the inventory's `identity`, else ssh-agent.
//!
//! Invariant: the remote command is `sh -c <quoted script>`, or with
//! `become: sudo` (SPEC 8.9) `sudo -n sh -s` with the script on stdin
//! ([`SUDO_BOOT`]); content travels on the channel's stdin; every failure
//! carries a class that drives retries and a message naming the host, the
//! address and what to do. A host with `jump` is reached through the jump
//! host's shared session ([`super::jump`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ssh2::{CheckResult, ErrorCode, KnownHostFileKind, Session};

use super::{ExecOutput, Transport, TransportError};
use crate::core::retry::FailureClass;

/// libssh2 error codes that the classification needs.
const ERR_TIMEOUT: i32 = -9;
const ERR_SOCKET_TIMEOUT: i32 = -30;
const ERR_AUTH_FAILED: i32 = -18;
const ERR_PUBKEY_UNVERIFIED: i32 = -19;
const ERR_EAGAIN: i32 = -37;

/// A silent command gets a keepalive this often.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// Channel window: large enough that stderr never stalls while stdout is
/// read to its end (libssh2 queues what is not read yet).
const WINDOW: u32 = 64 * 1024 * 1024;
const PACKET: u32 = 32 * 1024;

/// How to reach and verify one host.
#[derive(Clone, Debug)]
pub struct SshTarget {
    /// Inventory name, for messages.
    pub host: String,
    pub address: String,
    pub port: u16,
    pub user: String,
    /// Private key file; None: ssh-agent.
    pub identity: Option<PathBuf>,
    /// Pinned `SHA256:...` fingerprint; None: `known_hosts`.
    pub host_key: Option<String>,
    pub known_hosts: PathBuf,
    /// `become: sudo`: every command runs as root through `sudo -n sh -s`.
    pub become_sudo: bool,
    /// `jump`: connect through this jump host's session.
    pub jump: Option<Arc<super::jump::Jump>>,
}

/// The first line a `sudo -n sh -s` shell prints: proof that sudo let it
/// start (anything else first, or nothing, is sudo refusing).
pub const SUDO_READY: &str = "tend-sudo-ready";

/// The line that makes a sudo shell print [`SUDO_READY`].
const SUDO_READY_ECHO: &str = "echo tend-sudo-ready\n";

/// What `sudo -n sh -s` reads first when the command has stdin of its own
/// (content, or a held command's release): it says it started, then reads
/// the script's length, the script (one `head`, which never reads past it)
/// and runs it; the command's stdin follows the script. Sent alone, and the
/// rest only after the ready line, so that the shell (dash reads its input
/// in blocks) has nothing of the rest to read ahead.
pub const SUDO_BOOT: &str = "echo tend-sudo-ready; IFS= read -r tend_n || exit 125; tend_s=$(head -c \"$tend_n\") || exit 125; eval \"$tend_s\"; exit\n";

impl SshTarget {
    fn endpoint(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

/// A session idle for longer than this is checked with a keepalive before
/// it is trusted with a command.
const IDLE_CHECK: Duration = Duration::from_secs(15);

pub struct SshTransport {
    target: SshTarget,
    /// `host`, or `jump host` for a jump host's session: in messages.
    role: &'static str,
    /// The open session and when it last completed a command.
    session: Mutex<Option<(Session, Instant)>>,
}

impl SshTransport {
    pub fn new(target: SshTarget) -> Self {
        SshTransport {
            target,
            role: "host",
            session: Mutex::new(None),
        }
    }

    /// The connector of a jump host's session: its messages say `jump host`.
    pub(super) fn jump_host(target: SshTarget) -> Self {
        SshTransport {
            target,
            role: "jump host",
            session: Mutex::new(None),
        }
    }

    /// `host `name` (address:port)`, as messages name it.
    pub(super) fn label(&self) -> String {
        format!(
            "{} `{}` ({})",
            self.role,
            self.target.host,
            self.target.endpoint()
        )
    }

    fn err(&self, class: FailureClass, what: impl std::fmt::Display) -> TransportError {
        TransportError::new(class, format!("{}: {what}", self.label()))
    }

    pub(super) fn error(
        &self,
        class: FailureClass,
        what: impl std::fmt::Display,
    ) -> TransportError {
        self.err(class, what)
    }

    /// A new authenticated session (for a jump host's mux).
    pub(super) fn connect_session(&self, deadline: Instant) -> Result<Session, TransportError> {
        self.connect(deadline)
    }

    /// Connect, handshake, verify the host key and authenticate, all within
    /// `deadline`.
    fn connect(&self, deadline: Instant) -> Result<Session, TransportError> {
        let t = &self.target;
        let mut sess = Session::new().map_err(|e| self.err(FailureClass::Transient, e))?;
        match &t.jump {
            Some(jump) => {
                let stream = jump
                    .open(&t.address, t.port, deadline)
                    .map_err(|e| self.err(e.class, format_args!("through {}", e.message)))?;
                sess.set_tcp_stream(stream);
            }
            None => sess.set_tcp_stream(self.tcp(deadline)?),
        }
        self.establish(&mut sess, deadline)?;
        Ok(sess)
    }

    /// A TCP connection to the host, within `deadline`.
    /// A TCP connection to the host (or its jump host), with
    /// [`dead_peer_detection`].
    fn tcp(&self, deadline: Instant) -> Result<TcpStream, TransportError> {
        let t = &self.target;
        let addrs: Vec<SocketAddr> = (t.address.as_str(), t.port)
            .to_socket_addrs()
            .map_err(|e| {
                self.err(
                    FailureClass::Transient,
                    format!("cannot resolve address: {e}; check `address` in inventory.yaml"),
                )
            })?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            let left = remaining(deadline)
                .ok_or_else(|| self.err(FailureClass::Timeout, "timed out before connecting"))?;
            match TcpStream::connect_timeout(&a, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match (stream, last) {
            (Some(s), _) => s,
            (None, Some(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(self.err(FailureClass::Timeout, format!("connect timed out: {e}")));
            }
            (None, Some(e)) => {
                return Err(self.err(
                    FailureClass::Transient,
                    format!("cannot connect: {e}; is sshd running and reachable?"),
                ));
            }
            (None, None) => {
                return Err(self.err(FailureClass::Transient, "the address resolved to nothing"));
            }
        };
        let _ = stream.set_nodelay(true);
        dead_peer_detection(&stream);
        Ok(stream)
    }

    /// Handshake, host key, authentication, on a session whose stream is set.
    fn establish(&self, sess: &mut Session, deadline: Instant) -> Result<(), TransportError> {
        let t = &self.target;
        set_timeout(sess, deadline);
        sess.handshake()
            .map_err(|e| self.classify(e, "SSH handshake failed"))?;
        self.verify_host_key(sess)?;
        set_timeout(sess, deadline);
        match &t.identity {
            Some(key) => sess
                .userauth_pubkey_file(&t.user, None, key, None)
                .map_err(|e| match e.code() {
                    ErrorCode::Session(ERR_AUTH_FAILED | ERR_PUBKEY_UNVERIFIED) | ErrorCode::Session(-16) => self.err(
                        FailureClass::Auth,
                        format!(
                            "public-key authentication as `{}` with {} was refused ({}); check `identity` and the host's authorized_keys",
                            t.user,
                            key.display(),
                            e.message()
                        ),
                    ),
                    _ => self.classify(e, "authentication failed"),
                })?,
            None => sess.userauth_agent(&t.user).map_err(|e| {
                self.err(
                    FailureClass::Auth,
                    format!(
                        "ssh-agent authentication as `{}` failed ({}); set `identity` in inventory.yaml or load a key into the agent",
                        t.user,
                        e.message()
                    ),
                )
            })?,
        }
        if !sess.authenticated() {
            return Err(self.err(
                FailureClass::Auth,
                format!("not authenticated as `{}`", t.user),
            ));
        }
        // No keepalive interval in libssh2: one configured there also cuts
        // every blocking wait short at the next keepalive, failing any
        // command silent for that long with "Timed out waiting on socket".
        // `pump` sends keepalives by hand instead.
        sess.set_keepalive(false, 0);
        Ok(())
    }

    fn verify_host_key(&self, sess: &Session) -> Result<(), TransportError> {
        let t = &self.target;
        let (key, _) = sess
            .host_key()
            .ok_or_else(|| self.err(FailureClass::HostKey, "the server offered no host key"))?;
        let offered = fingerprint(key);
        if let Some(pinned) = &t.host_key {
            if *pinned == offered {
                return Ok(());
            }
            return Err(self.err(
                FailureClass::HostKey,
                format!(
                    "host key mismatch: the server offered {offered}, inventory.yaml pins {pinned}; if the key changed legitimately, update `host_key` for this host"
                ),
            ));
        }
        let mut kh = sess
            .known_hosts()
            .map_err(|e| self.err(FailureClass::HostKey, e))?;
        kh.read_file(&t.known_hosts, KnownHostFileKind::OpenSSH)
            .map_err(|e| {
                self.err(
                    FailureClass::HostKey,
                    format!(
                        "cannot read known_hosts {} ({}); pin the key as `host_key: {offered}` in inventory.yaml or fix `known_hosts` in tend.yaml",
                        t.known_hosts.display(),
                        e.message()
                    ),
                )
            })?;
        match kh.check_port(&t.address, t.port, key) {
            CheckResult::Match => Ok(()),
            CheckResult::Mismatch => Err(self.err(
                FailureClass::HostKey,
                format!(
                    "host key CHANGED: the server offered {offered}, which does not match {}; verify the host, then update known_hosts",
                    t.known_hosts.display()
                ),
            )),
            CheckResult::NotFound => Err(self.err(
                FailureClass::HostKey,
                format!(
                    "unknown host key {offered}: not in {}; verify it, then pin it as `host_key: {offered}` in inventory.yaml or add it to known_hosts",
                    t.known_hosts.display()
                ),
            )),
            CheckResult::Failure => Err(self.err(FailureClass::HostKey, "known_hosts check failed")),
        }
    }

    fn classify(&self, e: ssh2::Error, doing: &str) -> TransportError {
        let class = match e.code() {
            ErrorCode::Session(ERR_TIMEOUT | ERR_SOCKET_TIMEOUT) => FailureClass::Timeout,
            _ => FailureClass::Transient,
        };
        self.err(class, format!("{doing}: {}", e.message()))
    }

    /// Run one command on an open session. Stdin is written, and stdout
    /// and stderr read, in one non-blocking loop, so that what the host
    /// reports reaches `sink` as it happens (even while content is still
    /// going out), neither stream can stall the other, and a long silence
    /// is waited out up to the deadline (a keepalive every
    /// [`KEEPALIVE_EVERY`] keeps middleboxes from dropping the connection).
    fn run(
        &self,
        sess: &Session,
        script: &str,
        stdin: &[u8],
        deadline: Instant,
        sink: super::StdoutSink<'_>,
    ) -> Result<ExecOutput, TransportError> {
        let mut ch = self.start(sess, script, deadline)?;
        // With sudo, the script goes on stdin: inline before an empty stdin
        // (a brace group the shell parses whole before it runs any of it,
        // with its own stdin from /dev/null), else after SUDO_BOOT.
        let inline;
        let header;
        let feed = if !self.target.become_sudo {
            Feed {
                pre: b"",
                main: [stdin, b"", b""],
                wait_gate: false,
                gate: false,
            }
        } else if script == super::STDIN_SCRIPT {
            // The probe: stdin is the script, and the sudo shell reads it
            // as its own input, after the ready line.
            Feed {
                pre: SUDO_READY_ECHO.as_bytes(),
                main: [stdin, b"", b""],
                wait_gate: false,
                gate: true,
            }
        } else if stdin.is_empty() {
            inline = format!("echo {SUDO_READY}\n{{\n{script}\n}} </dev/null\n");
            Feed {
                pre: inline.as_bytes(),
                main: [b"", b"", b""],
                wait_gate: false,
                gate: true,
            }
        } else {
            header = format!("{}\n", script.len());
            Feed {
                pre: SUDO_BOOT.as_bytes(),
                main: [header.as_bytes(), script.as_bytes(), stdin],
                wait_gate: true,
                gate: true,
            }
        };
        sess.set_blocking(false);
        let pumped = self.pump(sess, &mut ch, feed, deadline, sink);
        sess.set_blocking(true);
        let (stderr, started) = pumped?;
        set_timeout(sess, deadline);
        ch.wait_close()
            .map_err(|e| self.classify(e, "waiting for the remote command"))?;
        let mut status = ch
            .exit_status()
            .map_err(|e| self.classify(e, "reading the exit status"))?;
        if let Ok(sig) = ch.exit_signal()
            && let Some(name) = sig.exit_signal
        {
            status = 128 + signal_number(&name);
        }
        if !started {
            return Err(self.sudo_refused(status, &stderr));
        }
        Ok(ExecOutput {
            status,
            stdout: Vec::new(),
            stderr,
        })
    }

    /// The failure of a `sudo -n sh -s` whose shell never said it started.
    fn sudo_refused(&self, status: i32, stderr: &[u8]) -> TransportError {
        let text = String::from_utf8_lossy(stderr);
        let said: String = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        let user = &self.target.user;
        let fix = format!(
            "tend needs `{user} ALL=(root) NOPASSWD: ALL` (or at least `/bin/sh -s`) in the host's sudoers, and never types a password"
        );
        if status == 127 || (said.contains("sudo") && said.contains("not found")) {
            return self.err(
                FailureClass::Capability,
                format!("`sudo` is not installed for `{user}` (become: sudo): {said}"),
            );
        }
        // sudo -n says "a password is required" both to a user it would
        // ask for one and to a user with no rule for `sh` at all.
        let what = if said.contains("password is required")
            || said.contains("terminal is required")
            || said.contains("askpass")
        {
            "it wants a password (or the user may not run `sh` as root)"
        } else if said.contains("tty") {
            "it wants a tty"
        } else {
            "the shell never started"
        };
        let said = if said.is_empty() {
            format!("exit {status}, nothing said")
        } else {
            format!("exit {status}: `{said}`")
        };
        self.err(
            FailureClass::Auth,
            format!("become: sudo as `{user}`: sudo refused to run `sudo -n sh -s`: {what} ({said}); {fix}"),
        )
    }

    /// The non-blocking loop of [`Self::run`]; returns stderr (bounded) and
    /// whether the shell started (always, without a gate).
    fn pump(
        &self,
        sess: &Session,
        ch: &mut ssh2::Channel,
        feed: Feed<'_>,
        deadline: Instant,
        sink: super::StdoutSink<'_>,
    ) -> Result<(Vec<u8>, bool), TransportError> {
        let would_block = |e: &std::io::Error| e.kind() == std::io::ErrorKind::WouldBlock;
        // What goes to stdin, in order: `pre`, then (after the gate opened,
        // when it must wait for it) the parts of `main`.
        let parts: [&[u8]; 4] = [feed.pre, feed.main[0], feed.main[1], feed.main[2]];
        let (mut part, mut written) = (0usize, 0usize);
        let mut eof_sent = false;
        let (mut out_done, mut err_done) = (false, false);
        let mut stderr = super::Bounded::new(super::STDERR_LIMIT);
        let mut gate: Option<Vec<u8>> = feed.gate.then(Vec::new);
        let mut buf = vec![0u8; 64 * 1024];
        let mut idle_since = Instant::now();
        while !(out_done && err_done) {
            let mut progress = false;
            while part < parts.len() && written == parts[part].len() {
                part += 1;
                written = 0;
            }
            let held_back = part >= 1 && feed.wait_gate && gate.is_some();
            if part < parts.len() && !held_back {
                match ch.write(&parts[part][written..]) {
                    Ok(n) => {
                        written += n;
                        progress |= n > 0;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(self.io_err(e, "writing stdin")),
                }
            }
            if part == parts.len() && !eof_sent {
                match ch.send_eof() {
                    Ok(()) => {
                        eof_sent = true;
                        progress = true;
                    }
                    Err(e) if e.code() == ErrorCode::Session(ERR_EAGAIN) => {}
                    Err(e) => return Err(self.classify(e, "closing stdin")),
                }
            }
            if !out_done {
                match ch.read(&mut buf) {
                    Ok(0) => {
                        out_done = ch.eof();
                        progress |= out_done;
                    }
                    Ok(n) => {
                        progress = true;
                        match gate.as_mut() {
                            None => sink(&buf[..n]),
                            Some(g) => {
                                g.extend_from_slice(&buf[..n]);
                                if let Some(rest) = after_ready(g) {
                                    let rest = rest.to_vec();
                                    gate = None;
                                    if !rest.is_empty() {
                                        sink(&rest);
                                    }
                                } else if g.len() > 64 * 1024 {
                                    return Err(self.err(
                                        FailureClass::Auth,
                                        "become: sudo: 64 KiB of output before the shell started; is `sudo -n sh -s` the command that ran?",
                                    ));
                                }
                            }
                        }
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(self.io_err(e, "reading stdout")),
                }
            }
            if !err_done {
                match ch.stderr().read(&mut buf) {
                    Ok(0) => {
                        err_done = ch.eof();
                        progress |= err_done;
                    }
                    Ok(n) => {
                        stderr.push(&buf[..n]);
                        progress = true;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(self.io_err(e, "reading stderr")),
                }
            }
            if progress {
                idle_since = Instant::now();
                continue;
            }
            let Some(left) = remaining(deadline) else {
                return Err(self.err(
                    FailureClass::Timeout,
                    "the remote command did not finish in time",
                ));
            };
            if idle_since.elapsed() >= KEEPALIVE_EVERY {
                // Best effort: a dead peer shows as a failed read or write,
                // or at the deadline.
                sess.set_keepalive(false, 1);
                let _ = sess.keepalive_send();
                sess.set_keepalive(false, 0);
                idle_since = Instant::now();
            }
            wait_socket(sess, left.min(KEEPALIVE_EVERY));
        }
        Ok((stderr.into_bytes(), gate.is_none()))
    }

    fn io_err(&self, e: std::io::Error, doing: &str) -> TransportError {
        let class = if e.kind() == std::io::ErrorKind::TimedOut {
            FailureClass::Timeout
        } else {
            FailureClass::Transient
        };
        self.err(class, format!("{doing}: {e}"))
    }
}

impl SshTransport {
    /// Run `f` on the open session (connecting first when there is none, or
    /// when an idle one fails its keepalive); a session that fails in `f`
    /// is dropped, so the next command reconnects.
    fn with_session<T>(
        &self,
        deadline: Instant,
        f: impl FnOnce(&Session) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        // A session that sat idle may have died under us (sshd restarted,
        // NAT state dropped): probe it with a keepalive, reconnect if it fails.
        if let Some((sess, last)) = guard.as_ref()
            && last.elapsed() > IDLE_CHECK
        {
            set_timeout(sess, deadline);
            if sess.keepalive_send().is_err() {
                tracing::debug!(host = %self.target.host, "idle session failed its keepalive; reconnecting");
                *guard = None;
            }
        }
        if guard.is_none() {
            *guard = Some((self.connect(deadline)?, Instant::now()));
        }
        let (sess, last) = guard.as_mut().expect("connected");
        match f(sess) {
            Ok(out) => {
                *last = Instant::now();
                Ok(out)
            }
            Err(e) => {
                // A session that failed mid-command is not trusted again.
                *guard = None;
                Err(e)
            }
        }
    }

    /// Open a channel and start `sh -c SCRIPT` on it.
    fn start(
        &self,
        sess: &Session,
        script: &str,
        deadline: Instant,
    ) -> Result<ssh2::Channel, TransportError> {
        set_timeout(sess, deadline);
        let mut ch = sess
            .channel_open("session", WINDOW, PACKET, None)
            .map_err(|e| self.classify(e, "cannot open a channel"))?;
        let command = if self.target.become_sudo {
            "sudo -n sh -s".to_string()
        } else {
            format!("sh -c {}", crate::shell::quote(script))
        };
        ch.exec(&command)
            .map_err(|e| self.classify(e, "cannot start the remote command"))?;
        Ok(ch)
    }

    /// Start a held command and read its first line (blocking, by the
    /// session's timeout).
    fn open_held(
        &self,
        sess: &Session,
        script: &str,
        deadline: Instant,
    ) -> Result<(String, SshHeld), TransportError> {
        let mut ch = self.start(sess, script, deadline)?;
        let mut line = Vec::new();
        let mut buf = [0u8; 1024];
        if self.target.become_sudo {
            line = self.sudo_handshake(&mut ch, script)?;
            if let Some(i) = line.iter().position(|&c| c == b'\n') {
                line.truncate(i);
                return Ok((
                    String::from_utf8_lossy(&line).into_owned(),
                    SshHeld {
                        sess: sess.clone(),
                        ch,
                    },
                ));
            }
        }
        loop {
            match ch.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    line.extend_from_slice(&buf[..n]);
                    if let Some(i) = line.iter().position(|&c| c == b'\n') {
                        line.truncate(i);
                        break;
                    }
                    if line.len() > 4096 {
                        break;
                    }
                }
                Err(e) => return Err(self.io_err(e, "waiting for the remote command's answer")),
            }
        }
        Ok((
            String::from_utf8_lossy(&line).into_owned(),
            SshHeld {
                sess: sess.clone(),
                ch,
            },
        ))
    }
}

impl SshTransport {
    /// On a blocking channel running `sudo -n sh -s`: send [`SUDO_BOOT`],
    /// wait for the ready line, then send the script. Returns what stdout
    /// held after the ready line.
    fn sudo_handshake(
        &self,
        ch: &mut ssh2::Channel,
        script: &str,
    ) -> Result<Vec<u8>, TransportError> {
        ch.write_all(SUDO_BOOT.as_bytes())
            .map_err(|e| self.io_err(e, "writing stdin"))?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let rest = loop {
            if let Some(rest) = after_ready(&out) {
                break rest.to_vec();
            }
            match ch.read(&mut buf) {
                Ok(0) => {
                    let mut err = Vec::new();
                    let _ = ch.stderr().take(64 * 1024).read_to_end(&mut err);
                    let _ = ch.wait_close();
                    let status = ch.exit_status().unwrap_or(-1);
                    return Err(self.sudo_refused(status, &err));
                }
                Ok(n) if out.len() + n > 64 * 1024 => {
                    return Err(self.err(
                        FailureClass::Auth,
                        "become: sudo: 64 KiB of output before the shell started",
                    ));
                }
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return Err(self.io_err(e, "waiting for sudo")),
            }
        };
        ch.write_all(format!("{}\n", script.len()).as_bytes())
            .and_then(|()| ch.write_all(script.as_bytes()))
            .map_err(|e| self.io_err(e, "writing stdin"))?;
        Ok(rest)
    }
}

/// A remote command kept running on its channel. The channel keeps its
/// session's connection open even after the transport reconnected for
/// later commands.
struct SshHeld {
    sess: Session,
    ch: ssh2::Channel,
}

impl super::Held for SshHeld {
    fn alive(&mut self) -> bool {
        if self.ch.eof() {
            return false;
        }
        let mut b = [0u8; 256];
        self.sess.set_blocking(false);
        let r = self.ch.read(&mut b);
        self.sess.set_blocking(true);
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => !self.ch.eof(),
            Ok(0) | Err(_) => false,
            Ok(_) => !self.ch.eof(),
        }
    }
}

impl Drop for SshHeld {
    fn drop(&mut self) {
        self.sess.set_blocking(true);
        self.sess
            .set_timeout(super::RELEASE_WAIT.as_millis() as u32);
        let _ = self.ch.send_eof();
        let _ = self.ch.wait_eof();
        let _ = self.ch.close();
        let _ = self.ch.wait_close();
    }
}

impl Transport for SshTransport {
    fn exec_streaming(
        &self,
        script: &str,
        stdin: &[u8],
        timeout: Duration,
        sink: super::StdoutSink<'_>,
    ) -> Result<ExecOutput, TransportError> {
        let deadline = Instant::now() + timeout;
        self.with_session(deadline, |sess| {
            self.run(sess, script, stdin, deadline, sink)
        })
    }

    fn hold(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<(String, Box<dyn super::Held>), TransportError> {
        let deadline = Instant::now() + timeout;
        let (line, held) =
            self.with_session(deadline, |sess| self.open_held(sess, script, deadline))?;
        Ok((line, Box::new(held)))
    }
}

/// What [`SshTransport::pump`] writes to the command's stdin, and whether
/// stdout starts with [`SUDO_READY`] (`gate`), which must come before
/// `main` goes out (`wait_gate`).
struct Feed<'a> {
    pre: &'a [u8],
    main: [&'a [u8]; 3],
    wait_gate: bool,
    gate: bool,
}

/// What follows the ready line in `out`, once it holds it whole (a line of
/// its own; lines before it, from a chatty login shell, are dropped).
fn after_ready(out: &[u8]) -> Option<&[u8]> {
    let line = SUDO_READY.as_bytes();
    let mut at = 0;
    while at < out.len() {
        let end = out[at..].iter().position(|&c| c == b'\n')? + at;
        if &out[at..end] == line {
            return Some(&out[end + 1..]);
        }
        at = end + 1;
    }
    None
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Wait until the session's socket can move data in the direction libssh2
/// is blocked on, or `wait` passes.
fn wait_socket(sess: &Session, wait: Duration) {
    use std::os::unix::io::AsRawFd;
    let events = match sess.block_directions() {
        ssh2::BlockDirections::Outbound => libc::POLLOUT,
        ssh2::BlockDirections::Both => libc::POLLIN | libc::POLLOUT,
        ssh2::BlockDirections::Inbound | ssh2::BlockDirections::None => libc::POLLIN,
    };
    let mut fd = libc::pollfd {
        fd: sess.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for the duration of the call. An error
    // (EINTR) only ends the wait early; the caller loops.
    unsafe {
        libc::poll(&mut fd, 1, ms);
    }
}

/// Every blocking libssh2 call gives up at the deadline.
fn set_timeout(sess: &Session, deadline: Instant) {
    let ms = remaining(deadline).map(|d| d.as_millis().clamp(1, u32::MAX as u128) as u32);
    // 0 would mean "no timeout": use 1 ms when the deadline has passed.
    sess.set_timeout(ms.unwrap_or(1));
}

/// OpenSSH's fingerprint of a host key blob: `SHA256:` + unpadded base64.
pub fn fingerprint(key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("SHA256:{}", base64_unpadded(&Sha256::digest(key)))
}

fn base64_unpadded(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn signal_number(name: &str) -> i32 {
    match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "SEGV" => 11,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "USR1" => 10,
        "USR2" => 12,
        _ => 0,
    }
}

/// TCP keepalives (idle 10 s, then every 5 s, 3 unanswered: about 25 s)
/// and a 30 s bound on data left unacknowledged. A step may be silent for
/// many minutes, and tend only reads while it runs: without these, a
/// network cut during a batch (no reset ever arrives) left tend waiting
/// for the whole batch's deadline, twice the sum of its steps' timeouts
/// (the fault campaign). A live host's kernel answers keepalives whatever
/// its sshd is doing. Best effort: a failing option only loses the early
/// notice.
fn dead_peer_detection(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: a valid socket descriptor owned by `stream`, and a
        // pointer to an int of the size given.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 30_000);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sudo_shell_says_ready_first() {
        assert_eq!(SUDO_READY_ECHO, format!("echo {SUDO_READY}\n"));
        assert!(SUDO_BOOT.starts_with(&format!("echo {SUDO_READY};")));
        assert!(SUDO_BOOT.ends_with('\n') && SUDO_BOOT.matches('\n').count() == 1);
    }

    #[test]
    fn after_ready_needs_the_whole_line_and_drops_what_came_before() {
        assert_eq!(after_ready(b"tend-sudo-ready"), None);
        assert_eq!(after_ready(b"tend-sudo-ready\n"), Some(&b""[..]));
        assert_eq!(
            after_ready(b"motd\ntend-sudo-ready\nout"),
            Some(&b"out"[..])
        );
        assert_eq!(after_ready(b"xtend-sudo-ready\nout"), None);
        assert_eq!(after_ready(b"tend-sudo-ready-not\n"), None);
    }

    #[test]
    fn base64_matches_rfc4648_without_padding() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_unpadded(input.as_bytes()), want);
        }
    }

    #[test]
    fn fingerprint_is_openssh_form() {
        // sha256("") in base64, as OpenSSH would print it.
        assert_eq!(
            fingerprint(b""),
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }

    #[test]
    fn refused_connection_is_transient_and_names_the_host() {
        // Port 9 on a loopback address nobody listens on: refused at once.
        let t = SshTransport::new(SshTarget {
            host: "h".into(),
            address: "127.0.0.1".into(),
            port: 9,
            user: "root".into(),
            identity: None,
            host_key: None,
            known_hosts: "/nonexistent".into(),
            become_sudo: false,
            jump: None,
        });
        let e = t.exec("true", &[], Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.class, FailureClass::Transient, "{e}");
        assert!(e.message.contains("host `h` (127.0.0.1:9)"), "{e}");
    }
}
