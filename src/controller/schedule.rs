//! When hosts get a pass: the per-host work queue, the debouncer for changes
//! to the desired-state directory, and the per-host failure backoff.
//!
//! [`WorkQueue`] hands out hosts in deadline order, one request per host, and
//! never a host that is still running: a request for a running host is parked
//! until the pass ends. [`Debouncer`] turns a burst of file changes into one
//! reconcile, bounded by a maximum deferral so a constant trickle of writes
//! cannot starve it. [`Backoff`] computes retry delays and notices crash loops
//! (the same failure again and again) so the caller can mark a host degraded.
//!
//! Invariant: a host handed out by [`WorkQueue::next`] is not handed out again
//! before its [`WorkQueue::done`]. Everything is deterministic: time is tokio's
//! clock (paused in tests) and randomness comes from a seed the caller keeps.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue::Key};

/// How far ahead the `DelayQueue` is asked to wait. Its wheel cannot hold
/// deadlines beyond about two years (it panics), so a later deadline waits
/// in steps of this size and is re-armed when a step expires early.
const HORIZON: Duration = Duration::from_secs(365 * 24 * 3600);

/// A per-host queue of pending passes, ordered by deadline.
pub struct WorkQueue<T: Clone> {
    delay: DelayQueue<String>,
    /// Hosts queued: waiting in `delay` or already due.
    queued: HashMap<String, Entry<T>>,
    /// Queued hosts whose deadline has passed, by (requested deadline,
    /// host). `DelayQueue` hands out expired entries in wheel order, not
    /// deadline order; taking them from here instead keeps the queue fair
    /// when more hosts are due than there are free slots.
    due: BTreeSet<(Instant, String)>,
    /// Hosts handed out by `next` and not yet `done`.
    running: HashSet<String>,
    /// Requests that arrived while their host was running.
    parked: HashMap<String, (Instant, T)>,
}

struct Entry<T> {
    /// The key in `delay`; `None` once the entry is in `due`.
    key: Option<Key>,
    at: Instant,
    why: T,
}

impl<T: Clone> Default for WorkQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> WorkQueue<T> {
    pub fn new() -> Self {
        Self {
            delay: DelayQueue::new(),
            queued: HashMap::new(),
            due: BTreeSet::new(),
            running: HashSet::new(),
            parked: HashMap::new(),
        }
    }

    /// Ask for a pass of `host` at `at`. The earliest request wins, whether
    /// it is queued or parked behind a running pass; a later one is dropped
    /// because the earlier pass will observe the same state anyway.
    pub fn schedule(&mut self, host: &str, at: Instant, why: T) {
        if self.running.contains(host) {
            match self.parked.get(host) {
                Some((old, _)) if *old <= at => {}
                _ => {
                    self.parked.insert(host.to_string(), (at, why));
                }
            }
            return;
        }
        let armed = at.min(after(Instant::now(), HORIZON));
        match self.queued.get_mut(host) {
            Some(e) if e.at <= at => {}
            Some(e) => {
                match &e.key {
                    Some(key) => self.delay.reset_at(key, armed),
                    None => {
                        self.due.remove(&(e.at, host.to_string()));
                        self.due.insert((at, host.to_string()));
                    }
                }
                e.at = at;
                e.why = why;
            }
            None => {
                let key = self.delay.insert_at(host.to_string(), armed);
                self.queued.insert(
                    host.to_string(),
                    Entry {
                        key: Some(key),
                        at,
                        why,
                    },
                );
            }
        }
    }

    /// Move an expired entry of `delay` into `due`.
    fn expired(&mut self, host: String) {
        // Every entry of `delay` is in `queued`; a stray one is dropped.
        if let Some(e) = self.queued.get_mut(&host) {
            e.key = None;
            self.due.insert((e.at, host));
        }
    }

    /// Wait for the earliest due host, mark it running and return it with its
    /// payload. `None` at once when nothing is queued. Cancel-safe: the only
    /// await that can be pending is `poll_expired`, which removes an entry
    /// only in the poll that returns it, and the bookkeeping after it runs
    /// without yielding.
    pub async fn next(&mut self) -> Option<(String, T)> {
        loop {
            if self.queued.is_empty() {
                return None;
            }
            if self.due.is_empty() {
                let first = std::future::poll_fn(|cx| self.delay.poll_expired(cx)).await?;
                self.expired(first.into_inner());
            }
            // Everything else already expired joins `due` too, so that the
            // earliest deadline goes first.
            while let Some(e) = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(match self.delay.poll_expired(cx) {
                    std::task::Poll::Ready(Some(e)) => Some(e),
                    _ => None,
                })
            })
            .await
            {
                self.expired(e.into_inner());
            }
            let Some((at, host)) = self.due.pop_first() else {
                continue;
            };
            let Some(entry) = self.queued.remove(&host) else {
                continue;
            };
            if at > Instant::now() {
                // Only a deadline beyond the horizon expires early: re-arm it.
                let armed = at.min(after(Instant::now(), HORIZON));
                let key = self.delay.insert_at(host.clone(), armed);
                self.queued.insert(
                    host,
                    Entry {
                        key: Some(key),
                        ..entry
                    },
                );
                continue;
            }
            self.running.insert(host.clone());
            return Some((host, entry.why));
        }
    }

    /// The pass of `host` finished; a request parked meanwhile is queued now.
    pub fn done(&mut self, host: &str) {
        if self.running.remove(host)
            && let Some((at, why)) = self.parked.remove(host)
        {
            self.schedule(host, at, why);
        }
    }

    /// `host` left the inventory. A running pass is left to finish (and stays
    /// counted as running so the host is not handed out twice meanwhile).
    pub fn forget(&mut self, host: &str) {
        if let Some(e) = self.queued.remove(host) {
            match e.key {
                Some(key) => {
                    self.delay.remove(&key);
                }
                None => {
                    self.due.remove(&(e.at, host.to_string()));
                }
            }
        }
        self.parked.remove(host);
    }

    /// Nothing queued; parked and running hosts do not count.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queued.len()
    }

    /// Queued hosts whose deadline is `now` or past: due, waiting for a
    /// free slot (running and parked hosts do not count).
    pub fn due(&self, now: Instant) -> usize {
        self.queued.values().filter(|e| e.at <= now).count()
    }

    pub fn is_running(&self, host: &str) -> bool {
        self.running.contains(host)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// The deadline of a queued host (not of a parked request).
    pub fn deadline(&self, host: &str) -> Option<Instant> {
        self.queued.get(host).map(|e| e.at)
    }
}

/// `t + d`, saturating far in the future instead of panicking on overflow.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(HORIZON))
        .unwrap_or(t)
}

/// Debounce for changes to the desired state: reconcile once the changes
/// have been quiet for `quiet`, but never later than `max_defer` after the
/// first change of the burst.
pub struct Debouncer {
    quiet: Duration,
    max_defer: Duration,
    /// First and last change of the current burst.
    burst: Option<(Instant, Instant)>,
}

impl Debouncer {
    pub fn new(quiet: Duration, max_defer: Duration) -> Self {
        Self {
            quiet,
            max_defer,
            burst: None,
        }
    }

    /// A change was seen at `now`.
    pub fn touch(&mut self, now: Instant) {
        self.burst = Some(match self.burst {
            Some((first, last)) => (first, last.max(now)),
            None => (now, now),
        });
    }

    /// When to reconcile, if a burst is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.burst
            .map(|(first, last)| after(last, self.quiet).min(after(first, self.max_defer)))
    }

    /// The caller reconciled; the next change starts a new burst.
    pub fn fire(&mut self) {
        self.burst = None;
    }

    pub fn pending(&self) -> bool {
        self.burst.is_some()
    }
}

/// What a failure means for the host's next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub delay: Duration,
    /// Consecutive failures with the same signature, this one included.
    pub consecutive: u32,
    pub degraded: bool,
}

#[derive(Default)]
struct HostFailures {
    /// Consecutive failures of any signature; drives the exponential delay.
    streak: u32,
    signature: String,
    /// Consecutive failures with `signature`.
    consecutive: u32,
    /// The crash loop that degraded the host: signature and count.
    degraded: Option<(String, u32)>,
}

/// Per-host failure bookkeeping: exponential backoff and crash-loop detection.
pub struct Backoff {
    first: Duration,
    cap: Duration,
    threshold: u32,
    hosts: HashMap<String, HostFailures>,
}

impl Backoff {
    /// A `cap` below `first` is raised to `first`, and a threshold of 0 acts
    /// as 1, so the bounds promised by [`Backoff::failure`] always hold.
    pub fn new(first: Duration, cap: Duration, crash_loop_threshold: u32) -> Self {
        Self {
            first,
            cap: cap.max(first),
            threshold: crash_loop_threshold.max(1),
            hosts: HashMap::new(),
        }
    }

    /// Record a failure of `host` and say when to retry. `jitter` in [0, 1)
    /// spreads the delay over +-10% of nominal; 0.5 gives exactly nominal.
    /// Once the same signature fails `crash_loop_threshold` times in a row
    /// the host is degraded and retries at the cap, whatever fails next,
    /// until a success or [`Backoff::release`].
    pub fn failure(&mut self, host: &str, signature: &str, jitter: f64) -> Failure {
        let h = self.hosts.entry(host.to_string()).or_default();
        h.streak = h.streak.saturating_add(1);
        if h.consecutive > 0 && h.signature == signature {
            h.consecutive = h.consecutive.saturating_add(1);
        } else {
            h.signature = signature.to_string();
            h.consecutive = 1;
        }
        if h.consecutive >= self.threshold {
            h.degraded = Some((h.signature.clone(), h.consecutive));
        }
        let nominal = if h.degraded.is_some() {
            self.cap
        } else {
            // first * 2^(streak-1), where any overflow is past the cap anyway.
            1u32.checked_shl(h.streak - 1)
                .and_then(|m| self.first.checked_mul(m))
                .map_or(self.cap, |d| d.min(self.cap))
        };
        Failure {
            delay: jittered(nominal, jitter),
            consecutive: h.consecutive,
            degraded: h.degraded.is_some(),
        }
    }

    /// A pass succeeded: forget the host's failures.
    pub fn success(&mut self, host: &str) {
        self.hosts.remove(host);
    }

    /// Lift a degraded state (operator retry, desired-state change, token):
    /// the next failure starts from the first delay and a zero count.
    pub fn release(&mut self, host: &str) {
        self.hosts.remove(host);
    }

    pub fn is_degraded(&self, host: &str) -> bool {
        self.degraded_reason(host).is_some()
    }

    /// The failure signature that degraded the host and how often it repeated.
    pub fn degraded_reason(&self, host: &str) -> Option<(&str, u32)> {
        let (sig, n) = self.hosts.get(host)?.degraded.as_ref()?;
        Some((sig.as_str(), *n))
    }

    /// One xorshift64* step over `seed`, mapped to [0, 1). A zero seed (the
    /// generator's fixed point) is replaced by a constant.
    pub fn jitter_from(seed: &mut u64) -> f64 {
        let mut x = if *seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            *seed
        };
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *seed = x;
        // The top 53 bits fit an f64 mantissa exactly, so the result is < 1.
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `d * (0.9 + 0.2 * jitter)`, in integer parts-per-million so that jitter
/// 0.5 is exactly `d` and nothing can panic on odd input.
fn jittered(d: Duration, jitter: f64) -> Duration {
    let j = if jitter.is_nan() {
        0.5
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let ppm = 900_000 + (200_000.0 * j) as u128;
    let nanos = d.as_nanos() * ppm / 1_000_000;
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    Duration::new(secs, (nanos % 1_000_000_000) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{sleep, sleep_until};

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn duplicates_collapse_to_one_pop() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        for why in 1..=3 {
            q.schedule("a", t0 + S, why);
        }
        assert_eq!(q.len(), 1);
        assert_eq!(q.next().await, Some(("a".to_string(), 1)));
        assert!(q.is_empty());
        assert_eq!(q.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn earliest_request_wins() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        q.schedule("a", t0 + 10 * S, "late");
        q.schedule("a", t0 + S, "early");
        assert_eq!(q.deadline("a"), Some(t0 + S));
        assert_eq!(q.next().await, Some(("a".to_string(), "early")));
        assert_eq!(Instant::now() - t0, S);
        q.done("a");

        let t1 = Instant::now();
        q.schedule("a", t1 + S, "early");
        q.schedule("a", t1 + 10 * S, "late");
        assert_eq!(q.next().await, Some(("a".to_string(), "early")));
        assert_eq!(Instant::now() - t1, S);
    }

    #[tokio::test(start_paused = true)]
    async fn hosts_come_out_in_deadline_order() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        q.schedule("c", t0 + 3 * S, ());
        q.schedule("a", t0 + S, ());
        q.schedule("b", t0 + 2 * S, ());
        for (host, secs) in [("a", 1), ("b", 2), ("c", 3)] {
            let (h, ()) = q.next().await.expect("queued");
            assert_eq!((h.as_str(), Instant::now() - t0), (host, secs * S));
        }
        assert_eq!(q.running(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn overdue_hosts_go_earliest_deadline_first() {
        // Nobody asks while the slots are full; when one frees up, the host
        // that has waited longest goes first, whatever the timer wheel says.
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        for (i, host) in ["e", "d", "c", "b", "a"].iter().enumerate() {
            q.schedule(host, t0 + (i as u32 + 1) * S, ());
        }
        tokio::time::sleep(100 * S).await;
        q.schedule("z", t0 + 50 * S, ());
        let mut order = Vec::new();
        while !q.is_empty() {
            order.push(q.next().await.expect("queued").0);
        }
        assert_eq!(order, ["e", "d", "c", "b", "a", "z"]);
        assert_eq!(Instant::now() - t0, 100 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn running_host_is_not_handed_out_twice() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        q.schedule("a", t0, 1);
        assert_eq!(q.next().await, Some(("a".to_string(), 1)));
        // Parked while running: earliest wins, and the queue stays empty.
        q.schedule("a", t0 + 2 * S, 2);
        q.schedule("a", t0 + S, 3);
        q.schedule("a", t0 + 3 * S, 5);
        assert!(q.is_empty() && q.is_running("a"));
        q.schedule("b", t0 + 5 * S, 4);
        assert_eq!(q.next().await, Some(("b".to_string(), 4)));
        assert_eq!(Instant::now() - t0, 5 * S);
        q.done("a");
        assert!(!q.is_running("a"));
        assert_eq!(q.deadline("a"), Some(t0 + S));
        assert_eq!(q.next().await, Some(("a".to_string(), 3)));
        assert_eq!(
            Instant::now() - t0,
            5 * S,
            "an overdue deadline pops at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn next_is_cancel_safe() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        q.schedule("a", t0 + 5 * S, ());
        tokio::select! {
            _ = sleep(S) => {}
            _ = q.next() => panic!("popped before its deadline"),
        }
        assert_eq!(q.len(), 1);
        assert_eq!(q.next().await, Some(("a".to_string(), ())));
        assert_eq!(Instant::now() - t0, 5 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_beyond_the_wheel_does_not_pop_early() {
        let t0 = Instant::now();
        let far = t0 + 3 * HORIZON;
        let mut q = WorkQueue::new();
        q.schedule("a", far, ());
        assert_eq!(q.next().await, Some(("a".to_string(), ())));
        assert_eq!(Instant::now(), far);
    }

    #[tokio::test(start_paused = true)]
    async fn forget_drops_queued_and_parked() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        q.schedule("a", t0, ());
        q.schedule("b", t0 + S, ());
        assert_eq!(q.next().await, Some(("a".to_string(), ())));
        q.schedule("a", t0, ());
        q.forget("a");
        q.forget("b");
        assert!(q.is_empty() && q.is_running("a"));
        q.done("a");
        assert!(q.is_empty() && !q.is_running("a") && q.running() == 0);
        assert_eq!(q.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn single_change_fires_after_quiet() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(2 * S, 30 * S);
        assert!(!d.pending() && d.deadline().is_none());
        d.touch(t0);
        sleep_until(d.deadline().expect("pending")).await;
        assert_eq!(Instant::now() - t0, 2 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn steady_trickle_fires_at_max_defer() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(2 * S, 30 * S);
        d.touch(t0);
        // A change every quiet/2 for five minutes: the quiet window never
        // elapses, so only max_defer can end the burst.
        for _ in 0..300 {
            let due = d.deadline().expect("pending");
            tokio::select! {
                _ = sleep(S) => d.touch(Instant::now()),
                _ = sleep_until(due) => break,
            }
        }
        assert_eq!(Instant::now() - t0, 30 * S);
        d.fire();
        assert!(!d.pending());
        let t1 = Instant::now();
        d.touch(t1);
        assert_eq!(d.deadline(), Some(t1 + 2 * S), "a new burst starts fresh");
    }

    fn backoff() -> Backoff {
        Backoff::new(S, 60 * S, 5)
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut b = Backoff::new(S, 60 * S, 100);
        let got: Vec<u64> = (0..9)
            .map(|_| b.failure("h", "boom", 0.5).delay.as_secs())
            .collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // Jitter stays within +-10% of nominal, even at the extremes.
        assert_eq!(b.failure("h", "boom", 0.0).delay, S * 54);
        assert_eq!(b.failure("h", "boom", 1.0).delay, S * 66);
        b.success("h");
        let f = b.failure("h", "boom", 0.0);
        assert_eq!((f.delay, f.consecutive), (S * 9 / 10, 1));
    }

    #[test]
    fn same_failure_repeated_is_a_crash_loop() {
        let mut b = backoff();
        for n in 1..5 {
            let f = b.failure("h", "exit 1", 0.5);
            assert_eq!((f.consecutive, f.degraded), (n, false));
        }
        let f = b.failure("h", "exit 1", 0.5);
        assert_eq!((f.delay, f.consecutive, f.degraded), (60 * S, 5, true));
        assert_eq!(b.degraded_reason("h"), Some(("exit 1", 5)));
        assert!(!b.is_degraded("other"));
    }

    #[test]
    fn a_different_failure_restarts_the_count_not_the_delay() {
        let mut b = backoff();
        for _ in 0..4 {
            b.failure("h", "exit 1", 0.5);
        }
        let f = b.failure("h", "timeout", 0.5);
        assert_eq!((f.consecutive, f.degraded, f.delay), (1, false, 16 * S));
        // The delay keeps doubling across signatures; the count does not.
        for secs in [32, 60, 60] {
            let f = b.failure("h", "exit 1", 0.5);
            assert_eq!((f.delay, f.degraded), (secs * S, false));
        }
        assert!(!b.is_degraded("h"));
    }

    #[test]
    fn release_lifts_degraded() {
        let mut b = backoff();
        for _ in 0..5 {
            b.failure("h", "exit 1", 0.5);
        }
        assert!(b.is_degraded("h"));
        b.release("h");
        assert!(!b.is_degraded("h"));
        let f = b.failure("h", "exit 1", 0.5);
        assert_eq!((f.delay, f.consecutive, f.degraded), (S, 1, false));
    }

    #[test]
    fn jitter_is_deterministic_and_in_range() {
        let draw = |mut seed: u64| -> Vec<f64> {
            (0..1000).map(|_| Backoff::jitter_from(&mut seed)).collect()
        };
        let xs = draw(42);
        assert_eq!(xs, draw(42));
        assert_ne!(xs, draw(43));
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.iter().any(|x| *x < 0.1) && xs.iter().any(|x| *x > 0.9));
        let mut zero = 0u64;
        Backoff::jitter_from(&mut zero);
        assert_ne!(zero, 0);
    }
}
