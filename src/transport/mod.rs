//! How tend reaches a host: one narrow, synchronous trait with a local and (later)
//! an SSH implementation. Callers run it on blocking threads.
//!
//! Invariant: a transport runs a POSIX sh script with bytes on stdin and reports
//! exit status, stdout and stderr apart; it classifies its own failures. It
//! knows nothing about resources, plans or policy.

use std::time::Duration;

use crate::core::retry::FailureClass;

pub mod local;
pub mod ssh;

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

/// One connection to one host. Implementations keep their session for reuse.
pub trait Transport: Send + Sync {
    /// Run `script` with POSIX `sh` on the host, feeding `stdin`; give up after
    /// `timeout` (class `Timeout`).
    fn exec(
        &self,
        script: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<ExecOutput, TransportError>;
}
