//! Jump hosts (SPEC 8.9): a host reached through another host's SSH
//! session, as a forwarded TCP channel (`direct-tcpip`), the way
//! `ssh -J` does it.
//!
//! One [`Jump`] per jump host and login, shared by every host behind it
//! ([`shared`]): one SSH session to the jump host, opened on first use and
//! opened again after it failed. Each target's own SSH session runs over one
//! end of a Unix socket pair; a thread per jump session (the "mux") moves
//! bytes between the other ends and the forwarded channels, with the jump
//! session non-blocking, so no target's wait ever holds up another's.
//!
//! Invariant: the jump host's key is checked like any host's (its pinned
//! `host_key`, else known_hosts), and the target's key is checked by the
//! target's own session, end to end: the jump host only ever sees
//! encrypted bytes. Nothing is forwarded back (no agent forwarding).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use ssh2::{ErrorCode, Session};

use super::TransportError;
use super::ssh::{SshTarget, SshTransport};
use crate::core::retry::FailureClass;

const ERR_EAGAIN: i32 = -37;
const ERR_TIMEOUT: i32 = -9;

/// How long the mux sleeps with nothing to do: keepalives go out at most
/// this late.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// A keepalive to the jump host when its session has been silent this long.
const KEEPALIVE_EVERY: u32 = 15;

/// One jump host, as every host behind it sees it.
pub struct Jump {
    ssh: SshTransport,
    mux: Mutex<Option<Mux>>,
}

impl std::fmt::Debug for Jump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jump({})", self.ssh.label())
    }
}

/// The one [`Jump`] of a jump host and login, shared by every transport
/// that names it; it lives as long as one of them does.
pub fn shared(target: SshTarget) -> Arc<Jump> {
    static JUMPS: OnceLock<Mutex<HashMap<String, Weak<Jump>>>> = OnceLock::new();
    let key = format!(
        "{}@{}:{} {:?} {:?} {}",
        target.user,
        target.address,
        target.port,
        target.identity,
        target.host_key,
        target.known_hosts.display()
    );
    let mut map = JUMPS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(j) = map.get(&key).and_then(Weak::upgrade) {
        return j;
    }
    let j = Arc::new(Jump {
        ssh: SshTransport::jump_host(target),
        mux: Mutex::new(None),
    });
    map.insert(key, Arc::downgrade(&j));
    j
}

impl Jump {
    /// A stream to `address:port` as seen from the jump host, through its
    /// session (connected first when there is none, or when the last one
    /// failed). Errors name the jump host.
    pub fn open(
        &self,
        address: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<UnixStream, TransportError> {
        let mut guard = self.mux.lock().unwrap_or_else(|p| p.into_inner());
        if guard
            .as_ref()
            .is_some_and(|m| m.shared.dead.load(Ordering::SeqCst))
        {
            tracing::debug!(jump = %self.ssh.label(), "jump session failed; reconnecting");
            *guard = None;
        }
        if guard.is_none() {
            let sess = self.ssh.connect_session(deadline)?;
            *guard = Some(Mux::start(sess, &self.ssh.label()).map_err(|e| {
                self.ssh
                    .error(FailureClass::Transient, format!("cannot start: {e}"))
            })?);
        }
        let mux = guard.as_ref().expect("connected");
        match mux.open(address, port, deadline) {
            Ok(s) => Ok(s),
            Err(OpenError::Refused(why)) => Err(self.ssh.error(
                FailureClass::Transient,
                format!("cannot forward a connection to {address}:{port}: {why}; can the jump host reach it?"),
            )),
            Err(OpenError::Session(class, why)) => {
                // A session that cannot open a channel is not trusted again.
                mux.shared.dead.store(true, Ordering::SeqCst);
                *guard = None;
                Err(self.ssh.error(
                    class,
                    format!("forwarding a connection to {address}:{port}: {why}"),
                ))
            }
        }
    }
}

enum OpenError {
    /// The jump host answered: it cannot or will not connect there.
    Refused(String),
    /// The jump session itself failed or timed out.
    Session(FailureClass, String),
}

/// What the mux thread and the openers share.
#[derive(Default)]
struct Shared {
    /// Channels opened, waiting for the mux to take them.
    queue: Mutex<Vec<Pipe>>,
    /// The jump session failed: the next open reconnects.
    dead: AtomicBool,
    /// The [`Jump`] is gone: the thread ends.
    stop: AtomicBool,
}

/// A running mux: its session, its thread's shared state, and the socket
/// that wakes the thread.
struct Mux {
    sess: Session,
    shared: Arc<Shared>,
    waker: UnixStream,
}

impl Mux {
    fn start(sess: Session, label: &str) -> std::io::Result<Mux> {
        let (waker, wake_rx) = UnixStream::pair()?;
        waker.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        sess.set_keepalive(false, KEEPALIVE_EVERY);
        sess.set_blocking(false);
        let shared = Arc::new(Shared::default());
        let (s2, sess2) = (shared.clone(), sess.clone());
        std::thread::Builder::new()
            .name(format!("tend-jump {label}"))
            .spawn(move || run(sess2, s2, wake_rx))?;
        Ok(Mux {
            sess,
            shared,
            waker,
        })
    }

    fn wake(&self) {
        let _ = (&self.waker).write(&[1]);
    }

    fn open(&self, address: &str, port: u16, deadline: Instant) -> Result<UnixStream, OpenError> {
        let ch = loop {
            if self.shared.dead.load(Ordering::SeqCst) {
                return Err(OpenError::Session(
                    FailureClass::Transient,
                    "the jump session failed".into(),
                ));
            }
            match self.sess.channel_direct_tcpip(address, port, None) {
                Ok(ch) => break ch,
                Err(e) if e.code() == ErrorCode::Session(ERR_EAGAIN) => {
                    if Instant::now() >= deadline {
                        return Err(OpenError::Session(
                            FailureClass::Timeout,
                            "the jump host did not answer in time".into(),
                        ));
                    }
                    // The mux thread may read the answer off the socket
                    // first (libssh2 queues it for us): poll briefly.
                    poll_one(
                        self.sess.as_raw_fd(),
                        libc::POLLIN,
                        Duration::from_millis(10),
                    );
                }
                Err(e) if is_session_error(&e) => {
                    return Err(OpenError::Session(
                        FailureClass::Transient,
                        e.message().to_string(),
                    ));
                }
                Err(e) => return Err(OpenError::Refused(e.message().to_string())),
            }
        };
        let pair = UnixStream::pair().and_then(|(a, b)| b.set_nonblocking(true).map(|()| (a, b)));
        let (ours, theirs) = match pair {
            Ok(p) => p,
            Err(e) => return Err(OpenError::Refused(format!("no socket pair: {e}"))),
        };
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pipe::new(ch, theirs));
        self.wake();
        Ok(ours)
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// Errors that mean the jump session itself is gone.
fn is_session_error(e: &ssh2::Error) -> bool {
    matches!(
        e.code(),
        ErrorCode::Session(-1 | -7 | -13 | -14 | -43 | ERR_TIMEOUT)
    )
}

fn io_is_session_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<ssh2::Error>())
        .is_none_or(is_session_error)
}

/// One forwarded connection: a channel and the mux's end of the target's
/// socket, with what is read from one and not yet written to the other.
struct Pipe {
    ch: ssh2::Channel,
    sock: UnixStream,
    /// Socket -> channel.
    up: Vec<u8>,
    up_at: usize,
    /// Channel -> socket.
    down: Vec<u8>,
    down_at: usize,
    sock_eof: bool,
    ch_eof: bool,
    done: bool,
}

impl Pipe {
    fn new(ch: ssh2::Channel, sock: UnixStream) -> Pipe {
        Pipe {
            ch,
            sock,
            up: Vec::new(),
            up_at: 0,
            down: Vec::new(),
            down_at: 0,
            sock_eof: false,
            ch_eof: false,
            done: false,
        }
    }

    /// Move what can move without waiting. Ok(progress), or Err when the
    /// jump session failed.
    fn step(&mut self, buf: &mut [u8]) -> Result<bool, ()> {
        let wb = |e: &std::io::Error| e.kind() == std::io::ErrorKind::WouldBlock;
        let mut progress = false;
        // Channel -> socket.
        if self.down_at < self.down.len() {
            match self.sock.write(&self.down[self.down_at..]) {
                Ok(n) => {
                    self.down_at += n;
                    progress |= n > 0;
                }
                Err(e) if wb(&e) => {}
                // The target's session is gone.
                Err(_) => self.sock_eof = true,
            }
        }
        if self.down_at == self.down.len() && !self.ch_eof {
            self.down.clear();
            self.down_at = 0;
            match self.ch.read(buf) {
                Ok(0) if self.ch.eof() => {
                    self.ch_eof = true;
                    let _ = self.sock.shutdown(std::net::Shutdown::Write);
                    progress = true;
                }
                Ok(0) => {}
                Ok(n) => {
                    self.down.extend_from_slice(&buf[..n]);
                    progress = true;
                }
                Err(e) if wb(&e) => {}
                Err(e) if io_is_session_error(&e) => return Err(()),
                Err(_) => {
                    self.ch_eof = true;
                    self.sock_eof = true;
                }
            }
        }
        // Socket -> channel.
        if self.up_at < self.up.len() {
            match self.ch.write(&self.up[self.up_at..]) {
                Ok(n) => {
                    self.up_at += n;
                    progress |= n > 0;
                }
                Err(e) if wb(&e) => {}
                Err(e) if io_is_session_error(&e) => return Err(()),
                Err(_) => {
                    self.up.clear();
                    self.up_at = 0;
                    self.sock_eof = true;
                }
            }
        }
        if self.up_at == self.up.len() && !self.sock_eof {
            self.up.clear();
            self.up_at = 0;
            match self.sock.read(buf) {
                Ok(0) => {
                    self.sock_eof = true;
                    progress = true;
                }
                Ok(n) => {
                    self.up.extend_from_slice(&buf[..n]);
                    progress = true;
                }
                Err(e) if wb(&e) => {}
                Err(_) => self.sock_eof = true,
            }
        }
        // The target's session never half-closes: once its socket ended
        // (and what it sent went out), the channel is closed.
        if self.sock_eof && self.up_at == self.up.len() {
            match self.ch.close() {
                Err(e) if e.code() == ErrorCode::Session(ERR_EAGAIN) => {}
                _ => {
                    self.done = true;
                    progress = true;
                }
            }
        }
        Ok(progress)
    }

    /// Whether data already waits in libssh2 for this pipe (read off the
    /// socket while serving another channel): no sleeping then.
    fn ready(&self) -> bool {
        self.down_at == self.down.len()
            && !self.ch_eof
            && (self.ch.read_window().available > 0 || self.ch.eof())
    }
}

/// The mux thread: serve every pipe until the jump session fails or the
/// [`Jump`] is dropped. Dropping the pipes closes the targets' sockets, so
/// their sessions fail and reconnect (through a new jump session).
fn run(sess: Session, shared: Arc<Shared>, mut wake_rx: UnixStream) {
    let mut pipes: Vec<Pipe> = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        pipes.append(&mut shared.queue.lock().unwrap_or_else(|p| p.into_inner()));
        let mut drain = [0u8; 64];
        while matches!(wake_rx.read(&mut drain), Ok(n) if n > 0) {}
        let mut progress = false;
        let mut failed = false;
        for p in pipes.iter_mut() {
            match p.step(&mut buf) {
                Ok(moved) => progress |= moved,
                Err(()) => failed = true,
            }
        }
        if failed {
            break;
        }
        pipes.retain(|p| !p.done);
        match sess.keepalive_send() {
            Err(e) if is_session_error(&e) => break,
            _ => {}
        }
        if progress || pipes.iter().any(Pipe::ready) {
            continue;
        }
        fds.clear();
        fds.push(pollfd(wake_rx.as_raw_fd(), libc::POLLIN));
        let outbound = matches!(
            sess.block_directions(),
            ssh2::BlockDirections::Outbound | ssh2::BlockDirections::Both
        );
        fds.push(pollfd(
            sess.as_raw_fd(),
            libc::POLLIN | if outbound { libc::POLLOUT } else { 0 },
        ));
        let mut waiting_on_window = false;
        for p in &pipes {
            let mut ev = 0;
            if p.up_at == p.up.len() && !p.sock_eof {
                ev |= libc::POLLIN;
            }
            if p.down_at < p.down.len() {
                ev |= libc::POLLOUT;
            }
            waiting_on_window |= p.up_at < p.up.len();
            fds.push(pollfd(p.sock.as_raw_fd(), ev));
        }
        // A channel write held back by the peer's window resumes when a
        // window adjust arrives, which shows as the session socket readable;
        // a short wait covers an adjust read off while serving another pipe.
        let wait = if waiting_on_window {
            Duration::from_millis(20)
        } else {
            IDLE_WAIT
        };
        let ms = wait.as_millis() as i32;
        // SAFETY: `fds` is a valid array of pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n > 0 && fds[1].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            // The connection to the jump host is gone; the reads above
            // report it next round, or this does.
            if fds[1].revents & libc::POLLIN == 0 {
                break;
            }
        }
    }
    shared.dead.store(true, Ordering::SeqCst);
    // Pipes queued after the last round go with the others.
    drop(pipes);
    shared
        .queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn poll_one(fd: i32, events: i16, wait: Duration) {
    let mut p = pollfd(fd, events);
    // SAFETY: one valid pollfd for the call's duration.
    unsafe {
        libc::poll(&mut p, 1, wait.as_millis().max(1) as i32);
    }
}
