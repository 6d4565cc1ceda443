//! Failure classes and what to do about them: retry or not, and the backoff.
//!
//! Invariant: pure; the caller sleeps.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why an attempt failed (SPEC.md section 4). Serialized PascalCase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FailureClass {
    /// Connection refused or reset, DNS failure, SSH channel failure.
    Transient,
    Auth,
    HostKey,
    /// A tool the plan needs is missing on the host.
    Capability,
    /// A step or probe ran and exited non-zero.
    Execution,
    Policy,
    Timeout,
}

impl FailureClass {
    /// Only transient transport failures are retried.
    pub fn is_retryable(self) -> bool {
        matches!(self, FailureClass::Transient | FailureClass::Timeout)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "Transient",
            FailureClass::Auth => "Auth",
            FailureClass::HostKey => "HostKey",
            FailureClass::Capability => "Capability",
            FailureClass::Execution => "Execution",
            FailureClass::Policy => "Policy",
            FailureClass::Timeout => "Timeout",
        }
    }
}

/// Backoff before retry number `retry` (1-based): `first`, doubling each time.
pub fn backoff(first: Duration, retry: u32) -> Duration {
    first.saturating_mul(1u32 << retry.saturating_sub(1).min(16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_and_timeout_retry() {
        use FailureClass::*;
        for (c, r) in [
            (Transient, true),
            (Timeout, true),
            (Auth, false),
            (HostKey, false),
            (Capability, false),
            (Execution, false),
            (Policy, false),
        ] {
            assert_eq!(c.is_retryable(), r, "{c:?}");
        }
    }

    #[test]
    fn backoff_doubles() {
        let s = Duration::from_secs(1);
        assert_eq!(backoff(s, 1), s);
        assert_eq!(backoff(s, 2), 2 * s);
        assert_eq!(backoff(s, 3), 4 * s);
    }
}
