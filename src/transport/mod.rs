//! How tend reaches a host: one narrow, synchronous trait with a local and (later)
//! an SSH implementation. Callers run it on blocking threads.
//!
//! Invariant: a transport runs a POSIX sh script with bytes on stdin and reports
//! exit status, stdout and stderr apart; it classifies its own failures. It
//! knows nothing about resources, plans or policy.

use std::time::Duration;

use crate::core::retry::FailureClass;

pub mod jump;
pub mod local;
pub mod ssh;

/// A command that runs its stdin as the script (for scripts too long for
/// one command-line argument, that read nothing from stdin themselves).
/// Transports may run such a stdin script directly (with `become: sudo`,
/// as the sudo shell's own input).
pub const STDIN_SCRIPT: &str = "exec sh -s";

/// What a remote command returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; 128 + signal number when killed by a signal.
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A failure to run a command at all (not a non-zero exit).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TransportError {
    pub class: FailureClass,
    pub message: String,
}

impl TransportError {
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        TransportError {
            class,
            message: message.into(),
        }
    }
}

/// Receives a command's stdout as it arrives, chunk by chunk.
pub type StdoutSink<'a> = &'a mut dyn FnMut(&[u8]);

/// Bytes of stderr a transport keeps: the head and the tail, with the count
/// of bytes left out between them (a runaway command cannot grow tend).
pub const STDERR_LIMIT: usize = 1024 * 1024;

/// A command left running on the host for as long as its holder keeps it
/// (the host lock, SPEC 8.7). Dropping it closes the command's stdin, which
/// ends it; drop it on a blocking thread (it may wait a few seconds for a
/// dead connection).
pub trait Held: Send {
    /// Whether the command still runs, as far as can be told without
    /// waiting: false once it exited or its connection failed.
    fn alive(&mut self) -> bool;
}

/// How long dropping a [`Held`] waits for its command to end.
pub const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// One connection to one host. Implementations keep their session for reuse.
pub trait Transport: Send + Sync {
    /// Start `script` on the host with stdin left open and wait, up to
    /// `timeout`, for its first line of stdout (returned without the
    /// newline; empty when the command ended without one). The command keeps
    /// running until the returned [`Held`] is dropped, used one call at a
    /// time with the transport's other commands by the one caller that owns
    /// the host's work.
    fn hold(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<(String, Box<dyn Held>), TransportError>;

    /// Run `script` with POSIX `sh` on the host, feeding `stdin`; give up after
    /// `timeout` (class `Timeout`). Stdout goes to `sink` as it arrives (the
    /// returned `stdout` is empty); stderr is kept, bounded by
    /// [`STDERR_LIMIT`].
    fn exec_streaming(
        &self,
        script: &str,
        stdin: &[u8],
        timeout: Duration,
        sink: StdoutSink<'_>,
    ) -> Result<ExecOutput, TransportError>;

    /// [`Transport::exec_streaming`] with stdout collected.
    fn exec(
        &self,
        script: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<ExecOutput, TransportError> {
        let mut stdout = Vec::new();
        let mut out =
            self.exec_streaming(script, stdin, timeout, &mut |b| stdout.extend_from_slice(b))?;
        out.stdout = stdout;
        Ok(out)
    }
}

/// A byte buffer that keeps at most `limit` bytes: the first half and the
/// last half of what was pushed, and how many bytes were left out between.
#[derive(Clone, Debug)]
pub struct Bounded {
    limit: usize,
    head: Vec<u8>,
    /// A ring of the last bytes once the head is full.
    tail: std::collections::VecDeque<u8>,
    omitted: u64,
}

impl Bounded {
    pub fn new(limit: usize) -> Self {
        Bounded {
            limit,
            head: Vec::new(),
            tail: std::collections::VecDeque::new(),
            omitted: 0,
        }
    }

    pub fn push(&mut self, mut b: &[u8]) {
        let head_cap = self.limit / 2;
        if self.head.len() < head_cap {
            let n = (head_cap - self.head.len()).min(b.len());
            self.head.extend_from_slice(&b[..n]);
            b = &b[n..];
        }
        let tail_cap = self.limit - head_cap;
        for &c in b.iter().skip(b.len().saturating_sub(tail_cap)) {
            if self.tail.len() == tail_cap {
                self.tail.pop_front();
                self.omitted += 1;
            }
            self.tail.push_back(c);
        }
        self.omitted += b.len().saturating_sub(tail_cap) as u64;
    }

    /// How many bytes were left out.
    pub fn omitted(&self) -> u64 {
        self.omitted
    }

    /// The bytes kept, with a line naming what was left out between the
    /// head and the tail.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = self.head;
        if self.omitted > 0 {
            out.extend_from_slice(
                format!("\n[tend: {} bytes left out]\n", self.omitted).as_bytes(),
            );
        }
        out.extend(self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Bounded;

    #[test]
    fn bounded_keeps_head_and_tail_and_counts_the_rest() {
        let mut b = Bounded::new(8);
        b.push(b"abc");
        assert_eq!(b.clone().into_bytes(), b"abc");
        b.push(b"defghijkl");
        b.push(b"mn");
        assert_eq!(b.omitted(), 6);
        assert_eq!(b.into_bytes(), b"abcd\n[tend: 6 bytes left out]\nklmn");
        let mut big = Bounded::new(10);
        for _ in 0..1000 {
            big.push(&[b'x'; 1000]);
        }
        assert_eq!(big.omitted(), 1_000_000 - 10);
    }
}
