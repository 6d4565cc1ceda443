//! What the running loop tells the world, for `tend run --listen`: its
//! heartbeat, how many hosts wait for a free slot, the hosts it keeps and
//! which of them have had a pass since the controller started.
//!
//! Invariant: the loop only writes here, never reads or waits: every
//! method is a short lock or an atomic, so a slow scrape never stalls the
//! loop. The heartbeat is a monotonic clock reading (`std::time::Instant`),
//! not the loop's (possibly paused) tokio time.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How often the loop beats when nothing else wakes it.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// A heartbeat older than this means the loop is stuck: `/healthz` answers
/// 503. Six missed beats: a busy machine delays a tick, never by this much.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// No beat yet.
const NEVER: u64 = u64::MAX;

pub struct Pulse {
    origin: Instant,
    /// Milliseconds since `origin` of the last beat, or `NEVER`.
    beat_ms: AtomicU64,
    queue_depth: AtomicU64,
    hosts: Mutex<Hosts>,
}

#[derive(Default)]
struct Hosts {
    /// `None` until the first load of the desired state finished.
    kept: Option<Vec<String>>,
    /// Hosts whose pass ended (whatever its verdict) since the start.
    passed: BTreeSet<String>,
}

/// `/readyz`: every host kept has had a pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The desired state was not loaded yet.
    NotLoaded,
    /// These hosts (sorted) have not had a pass yet, of `of` hosts.
    Waiting {
        hosts: Vec<String>,
        of: usize,
    },
    Ready {
        hosts: usize,
    },
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data replaced whole: a panic elsewhere never leaves it torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pulse {
    pub fn new() -> Pulse {
        Pulse {
            origin: Instant::now(),
            beat_ms: AtomicU64::new(NEVER),
            queue_depth: AtomicU64::new(0),
            hosts: Mutex::new(Hosts::default()),
        }
    }

    /// The loop is alive now.
    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(NEVER - 1);
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the loop last beat; `None` before its first beat.
    pub fn since_beat(&self) -> Option<Duration> {
        let ms = self.beat_ms.load(Ordering::Relaxed);
        (ms != NEVER).then(|| {
            self.origin
                .elapsed()
                .saturating_sub(Duration::from_millis(ms))
        })
    }

    /// Fresh: a beat within `HEALTHY_WITHIN`.
    pub fn healthy(&self) -> bool {
        self.since_beat().is_some_and(|d| d <= HEALTHY_WITHIN)
    }

    pub fn set_queue_depth(&self, n: usize) {
        self.queue_depth.store(n as u64, Ordering::Relaxed);
    }

    /// Hosts due for a pass and waiting for a free slot.
    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.load(Ordering::Relaxed)
    }

    /// A load of the desired state decided the hosts kept.
    pub fn set_hosts(&self, hosts: &[String]) {
        let mut h = lock(&self.hosts);
        let mut kept = hosts.to_vec();
        kept.sort();
        h.kept = Some(kept);
    }

    /// A pass of `host` ended, whatever its verdict.
    pub fn passed(&self, host: &str) {
        let mut h = lock(&self.hosts);
        if !h.passed.contains(host) {
            h.passed.insert(host.to_string());
        }
    }

    /// The hosts kept (sorted), once the desired state was loaded.
    pub fn hosts(&self) -> Option<Vec<String>> {
        lock(&self.hosts).kept.clone()
    }

    pub fn readiness(&self) -> Readiness {
        let h = lock(&self.hosts);
        let Some(kept) = &h.kept else {
            return Readiness::NotLoaded;
        };
        let waiting: Vec<String> = kept
            .iter()
            .filter(|k| !h.passed.contains(*k))
            .cloned()
            .collect();
        if waiting.is_empty() {
            Readiness::Ready { hosts: kept.len() }
        } else {
            Readiness::Waiting {
                hosts: waiting,
                of: kept.len(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_beat_is_unhealthy_and_a_fresh_one_is_healthy() {
        let p = Pulse::new();
        assert_eq!(p.since_beat(), None);
        assert!(!p.healthy());
        p.beat();
        assert!(p.since_beat().unwrap() < HEALTHY_WITHIN);
        assert!(p.healthy());
    }

    #[test]
    fn ready_once_every_kept_host_had_a_pass() {
        let p = Pulse::new();
        assert_eq!(p.readiness(), Readiness::NotLoaded);
        p.set_hosts(&["b".into(), "a".into()]);
        assert_eq!(
            p.readiness(),
            Readiness::Waiting {
                hosts: vec!["a".into(), "b".into()],
                of: 2
            }
        );
        p.passed("b");
        p.passed("b");
        assert_eq!(
            p.readiness(),
            Readiness::Waiting {
                hosts: vec!["a".into()],
                of: 2
            }
        );
        p.passed("a");
        assert_eq!(p.readiness(), Readiness::Ready { hosts: 2 });
        // A host that joins the inventory has not had its pass yet.
        p.set_hosts(&["a".into(), "b".into(), "c".into()]);
        assert!(matches!(p.readiness(), Readiness::Waiting { of: 3, .. }));
        // An empty inventory is ready at once.
        p.set_hosts(&[]);
        assert_eq!(p.readiness(), Readiness::Ready { hosts: 0 });
    }
}
