//! The loop on paused tokio time against a fake reconciler: startup, resync,
//! debounce, dedupe, backoff schedule, crash loop and its release, the
//! concurrency bound, no two passes of one host at once, shutdown, a pass
//! that panics, and a slow load that stalls nothing else.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;

const RESYNC: Duration = Duration::from_secs(300);
const QUIET: Duration = Duration::from_secs(2);
const MAX_DEFER: Duration = Duration::from_secs(10);

struct Fake {
    loaded: Mutex<Loaded>,
    /// Verdicts to return per host, in order; `Settled` when none is left.
    script: Mutex<BTreeMap<String, VecDeque<Verdict>>>,
    /// How long a pass takes.
    pass_time: Duration,
    t0: Instant,
    /// Every pass start: (seconds since t0, host, trigger).
    passes: Mutex<Vec<(f64, String, Trigger)>>,
    active: Mutex<BTreeSet<String>>,
    max_active: AtomicUsize,
    overlap: AtomicBool,
    loads: AtomicUsize,
    degraded: Mutex<Vec<(String, bool)>>,
    stopped: AtomicBool,
    /// Hosts whose passes panic.
    panics: Mutex<BTreeSet<String>>,
    /// Every failure recorded through `record_failure`: (seconds since t0,
    /// host, message).
    recorded: Mutex<Vec<(f64, String, String)>>,
    /// How long a load takes (awaited, as a slow `git` would be).
    load_time: Mutex<Duration>,
    /// Loads finished: (seconds since t0 at the start, at the end).
    loads_done: Mutex<Vec<(f64, f64)>>,
}

impl Fake {
    fn new(hosts: &[&str], concurrency: usize, pass_time: Duration) -> Arc<Fake> {
        Arc::new(Fake {
            loaded: Mutex::new(Loaded {
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                revision: "rev-1".into(),
                valid: true,
                timing: Timing {
                    resync: RESYNC,
                    quiet_window: QUIET,
                    max_defer: MAX_DEFER,
                    concurrency,
                    crash_loop_threshold: 3,
                },
            }),
            script: Mutex::new(BTreeMap::new()),
            pass_time,
            t0: Instant::now(),
            passes: Mutex::new(Vec::new()),
            active: Mutex::new(BTreeSet::new()),
            max_active: AtomicUsize::new(0),
            overlap: AtomicBool::new(false),
            loads: AtomicUsize::new(0),
            degraded: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
            panics: Mutex::new(BTreeSet::new()),
            recorded: Mutex::new(Vec::new()),
            load_time: Mutex::new(Duration::ZERO),
            loads_done: Mutex::new(Vec::new()),
        })
    }

    fn fail(&self, host: &str, n: usize, signature: &str) {
        let mut s = self.script.lock().unwrap();
        let q = s.entry(host.into()).or_default();
        for _ in 0..n {
            q.push_back(Verdict::Failed {
                signature: signature.into(),
                message: format!("{signature} failed"),
            });
        }
    }

    fn passes_of(&self, host: &str) -> Vec<(f64, Trigger)> {
        self.passes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, h, _)| h == host)
            .map(|(t, _, tr)| (*t, *tr))
            .collect()
    }

    fn set_revision(&self, rev: &str) {
        self.loaded.lock().unwrap().revision = rev.into();
    }

    fn since(&self) -> f64 {
        (Instant::now() - self.t0).as_secs_f64()
    }
}

impl Reconciler for Fake {
    async fn load(&self) -> Loaded {
        let start = self.since();
        let wait = *self.load_time.lock().unwrap();
        tokio::time::sleep(wait).await;
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.loads_done.lock().unwrap().push((start, self.since()));
        self.loaded.lock().unwrap().clone()
    }

    async fn reconcile(
        &self,
        host: String,
        trigger: Trigger,
        _degraded: Option<(String, String)>,
    ) -> Verdict {
        let t = (Instant::now() - self.t0).as_secs_f64();
        self.passes.lock().unwrap().push((t, host.clone(), trigger));
        {
            let mut a = self.active.lock().unwrap();
            if !a.insert(host.clone()) {
                self.overlap.store(true, Ordering::SeqCst);
            }
            self.max_active.fetch_max(a.len(), Ordering::SeqCst);
        }
        tokio::time::sleep(self.pass_time).await;
        self.active.lock().unwrap().remove(&host);
        if self.panics.lock().unwrap().contains(&host) {
            panic!("index out of bounds in the pass of {host}");
        }
        self.script
            .lock()
            .unwrap()
            .get_mut(&host)
            .and_then(|q| q.pop_front())
            .unwrap_or(Verdict::Settled { awaiting: false })
    }

    async fn record_failure(&self, host: String, _trigger: Trigger, message: String) {
        let t = self.since();
        self.recorded.lock().unwrap().push((t, host, message));
    }

    fn set_degraded(&self, host: &str, degraded: Option<(String, String)>) {
        self.degraded
            .lock()
            .unwrap()
            .push((host.into(), degraded.is_some()));
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

fn start(fake: &Arc<Fake>) -> (mpsc::UnboundedSender<Event>, tokio::task::JoinHandle<()>) {
    let (tx, h, _) = start_with_pulse(fake);
    (tx, h)
}

fn start_with_pulse(
    fake: &Arc<Fake>,
) -> (
    mpsc::UnboundedSender<Event>,
    tokio::task::JoinHandle<()>,
    Arc<Pulse>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pulse = Arc::new(Pulse::new());
    let h = tokio::spawn(run(fake.clone(), rx, 42, pulse.clone()));
    (tx, h, pulse)
}

async fn at(fake: &Fake, secs: f64) {
    tokio::time::sleep_until(fake.t0 + Duration::from_secs_f64(secs)).await;
}

#[tokio::test(start_paused = true)]
async fn the_pulse_says_ready_once_every_host_had_a_pass_and_counts_due_hosts() {
    // One slot for three hosts: two wait while the first pass runs.
    let fake = Fake::new(&["a", "b", "c"], 1, Duration::from_secs(10));
    let (_tx, _h, pulse) = start_with_pulse(&fake);
    at(&fake, 1.0).await;
    assert!(pulse.healthy());
    assert_eq!(pulse.queue_depth(), 2);
    assert!(matches!(
        pulse.readiness(),
        pulse::Readiness::Waiting { of: 3, .. }
    ));
    at(&fake, 31.0).await;
    assert_eq!(pulse.readiness(), pulse::Readiness::Ready { hosts: 3 });
    assert_eq!(pulse.queue_depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn every_host_once_at_start_then_at_each_resync() {
    let fake = Fake::new(&["a", "b"], 4, Duration::from_millis(100));
    let (_tx, _h) = start(&fake);
    at(&fake, 1000.0).await;
    for host in ["a", "b"] {
        let p = fake.passes_of(host);
        assert_eq!(p[0], (0.0, Trigger::Resync), "{host}: {p:?}");
        // Resync every 300 s stretched by at most 10% jitter.
        assert!(p.len() >= 3 && p.len() <= 4, "{host}: {p:?}");
        for w in p.windows(2) {
            let gap = w[1].0 - w[0].0;
            assert!((300.0..=330.2).contains(&gap), "{host}: gap {gap} in {p:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_is_one_reload_and_one_pass_per_host() {
    let fake = Fake::new(&["a", "b"], 4, Duration::from_millis(10));
    let (tx, _h) = start(&fake);
    at(&fake, 5.0).await;
    fake.set_revision("rev-2");
    for i in 0..5 {
        at(&fake, 5.0 + 0.5 * i as f64).await;
        tx.send(Event::DesiredChanged).unwrap();
    }
    at(&fake, 20.0).await;
    // The first load is the start; the burst is exactly one more.
    assert_eq!(fake.loads.load(Ordering::SeqCst), 2);
    for host in ["a", "b"] {
        let p = fake.passes_of(host);
        assert_eq!(p.len(), 2, "{p:?}");
        // Last change at 7.0 s, quiet window 2 s.
        assert!((p[1].0 - 9.0).abs() < 0.01, "{p:?}");
        assert_eq!(p[1].1, Trigger::Watch);
    }
}

#[tokio::test(start_paused = true)]
async fn endless_changes_still_reload_by_max_defer() {
    let fake = Fake::new(&["a"], 4, Duration::from_millis(10));
    let (tx, _h) = start(&fake);
    at(&fake, 1.0).await;
    fake.set_revision("rev-2");
    for i in 0..30 {
        at(&fake, 1.0 + i as f64).await;
        tx.send(Event::DesiredChanged).unwrap();
    }
    let p = fake.passes_of("a");
    assert!(p.len() >= 2, "{p:?}");
    // First change at 1 s; max_defer 10 s.
    assert!((p[1].0 - 11.0).abs() < 0.01, "{p:?}");
}

#[tokio::test(start_paused = true)]
async fn unchanged_revision_does_not_reconcile() {
    let fake = Fake::new(&["a"], 4, Duration::from_millis(10));
    let (tx, _h) = start(&fake);
    at(&fake, 1.0).await;
    tx.send(Event::DesiredChanged).unwrap();
    at(&fake, 10.0).await;
    assert_eq!(fake.loads.load(Ordering::SeqCst), 2);
    assert_eq!(fake.passes_of("a").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_and_reset_on_success() {
    let fake = Fake::new(&["a"], 4, Duration::ZERO);
    // Alternating failures: the delay grows with every failure, but none
    // repeats often enough to be a crash loop.
    for i in 0..6 {
        fake.fail("a", 1, &format!("Transient/{}", i % 2));
    }
    let (_tx, _h) = start(&fake);
    at(&fake, 200.0).await;
    let p = fake.passes_of("a");
    let gaps: Vec<f64> = p.windows(2).map(|w| w[1].0 - w[0].0).collect();
    // 1, 2, 4, 8, 16, 32 s, each within +-10%, then success -> resync.
    for (i, nominal) in [1.0, 2.0, 4.0, 8.0, 16.0, 32.0].iter().enumerate() {
        assert!(
            (gaps[i] - nominal).abs() <= nominal * 0.1 + 0.001,
            "gap {i}: {gaps:?}"
        );
        assert_eq!(p[i + 1].1, Trigger::Retry);
    }
    // The seventh pass succeeded: the next is a resync, not a retry.
    assert_eq!(p.len(), 7, "{p:?}");
}

#[tokio::test(start_paused = true)]
async fn crash_loop_degrades_and_retry_releases() {
    let fake = Fake::new(&["a"], 4, Duration::ZERO);
    fake.fail("a", 100, "Execution/step file:/x");
    let (tx, _h) = start(&fake);
    at(&fake, 10.0).await;
    // Threshold 3: after the third failure (t = 0, 1, 3) the host is degraded.
    assert_eq!(
        *fake.degraded.lock().unwrap(),
        vec![("a".to_string(), true)]
    );
    let p = fake.passes_of("a");
    assert_eq!(p.len(), 3, "{p:?}");
    // Degraded: the next try comes only at the cap (300 s +-10%).
    at(&fake, 250.0).await;
    assert_eq!(fake.passes_of("a").len(), 3);
    at(&fake, 340.0).await;
    assert_eq!(fake.passes_of("a").len(), 4);
    // Still failing: degraded is not announced twice.
    assert_eq!(fake.degraded.lock().unwrap().len(), 1);
    // An operator retry releases it and runs at once.
    tx.send(Event::RetryRequested("a".into())).unwrap();
    at(&fake, 340.5).await;
    let p = fake.passes_of("a");
    assert_eq!(p.len(), 5, "{p:?}");
    assert_eq!(p[4].1, Trigger::Retry);
    assert!((p[4].0 - 340.0).abs() < 0.01, "{p:?}");
    assert_eq!(fake.degraded.lock().unwrap()[1], ("a".to_string(), false));
}

#[tokio::test(start_paused = true)]
async fn a_different_failure_restarts_the_crash_loop_count() {
    let fake = Fake::new(&["a"], 4, Duration::ZERO);
    fake.fail("a", 2, "one");
    fake.fail("a", 2, "two");
    let (_tx, _h) = start(&fake);
    at(&fake, 100.0).await;
    assert!(fake.degraded.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_desired_state_change_releases_a_crash_loop() {
    let fake = Fake::new(&["a"], 4, Duration::ZERO);
    fake.fail("a", 3, "same");
    let (tx, _h) = start(&fake);
    at(&fake, 10.0).await;
    assert_eq!(fake.degraded.lock().unwrap().len(), 1);
    fake.set_revision("rev-2");
    tx.send(Event::DesiredChanged).unwrap();
    at(&fake, 13.0).await;
    assert_eq!(fake.degraded.lock().unwrap()[1], ("a".to_string(), false));
    let p = fake.passes_of("a");
    assert_eq!(p.last().unwrap().1, Trigger::Watch, "{p:?}");
}

#[tokio::test(start_paused = true)]
async fn never_two_passes_of_a_host_and_at_most_concurrency() {
    let hosts: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
    let names: Vec<&str> = hosts.iter().map(|s| s.as_str()).collect();
    let fake = Fake::new(&names, 3, Duration::from_secs(30));
    let (tx, _h) = start(&fake);
    // Hammer triggers while passes run.
    for i in 1..40 {
        at(&fake, i as f64 * 5.0).await;
        tx.send(Event::RetryRequested(format!("h{}", i % 10)))
            .unwrap();
        tx.send(Event::KillChanged(false)).unwrap();
    }
    at(&fake, 400.0).await;
    let all = fake.passes.lock().unwrap().clone();
    assert!(!fake.overlap.load(Ordering::SeqCst), "{all:?}");
    assert_eq!(fake.max_active.load(Ordering::SeqCst), 3, "{all:?}");
    // Fair: hosts requested again and again while they ran do not jump
    // the queue; the first ten passes are ten different hosts.
    let first: BTreeSet<&String> = all[..10].iter().map(|(_, h, _)| h).collect();
    assert_eq!(first.len(), 10, "{all:?}");
    // Requests made while a host ran were parked, not lost.
    assert!(
        all.iter().any(|(_, _, tr)| *tr == Trigger::Retry),
        "{all:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn duplicates_collapse_while_queued() {
    // One slot, three hosts: b and c wait while a runs; ten retries of b
    // while it waits are one pass.
    let fake = Fake::new(&["a", "b", "c"], 1, Duration::from_secs(10));
    let (tx, _h) = start(&fake);
    at(&fake, 1.0).await;
    for _ in 0..10 {
        tx.send(Event::RetryRequested("b".into())).unwrap();
    }
    at(&fake, 35.0).await;
    let b = fake.passes_of("b");
    assert_eq!(b.len(), 1, "{b:?}");
}

#[tokio::test(start_paused = true)]
async fn a_token_reconciles_the_hosts_that_wait_for_one() {
    let fake = Fake::new(&["a", "b"], 4, Duration::ZERO);
    fake.script
        .lock()
        .unwrap()
        .entry("a".into())
        .or_default()
        .push_back(Verdict::Settled { awaiting: true });
    let (tx, _h) = start(&fake);
    at(&fake, 5.0).await;
    tx.send(Event::TokenAppeared).unwrap();
    at(&fake, 6.0).await;
    let a = fake.passes_of("a");
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[1], (5.0, Trigger::Token));
    assert_eq!(fake.passes_of("b").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_running_passes_and_takes_no_new_work() {
    let fake = Fake::new(&["a", "b", "c"], 2, Duration::from_secs(20));
    let (tx, h) = start(&fake);
    at(&fake, 5.0).await;
    tx.send(Event::Shutdown).unwrap();
    h.await.unwrap();
    assert!(fake.stopped.load(Ordering::SeqCst));
    // a and b were running and finished (at 20 s); c never started.
    assert_eq!(Instant::now() - fake.t0, Duration::from_secs(20));
    assert_eq!(fake.passes.lock().unwrap().len(), 2);
    assert!(fake.active.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn hosts_that_leave_the_inventory_are_forgotten() {
    let fake = Fake::new(&["a", "b"], 4, Duration::ZERO);
    let (tx, _h) = start(&fake);
    at(&fake, 1.0).await;
    {
        let mut l = fake.loaded.lock().unwrap();
        l.hosts = vec!["a".into()];
        l.revision = "rev-2".into();
    }
    tx.send(Event::Reload).unwrap();
    at(&fake, 1000.0).await;
    assert_eq!(fake.passes_of("b").len(), 1);
    assert!(fake.passes_of("a").len() >= 3);
}

#[tokio::test(start_paused = true)]
async fn a_change_the_watch_missed_is_found_at_the_next_resync() {
    let fake = Fake::new(&["a"], 4, Duration::ZERO);
    let (_tx, _h) = start(&fake);
    at(&fake, 1.0).await;
    // No event: the revision changes behind the watch's back.
    fake.set_revision("rev-2");
    at(&fake, 301.0).await;
    let p = fake.passes_of("a");
    assert!(
        p.iter()
            .any(|(t, tr)| *tr == Trigger::Watch && (*t - 300.0).abs() < 0.01),
        "{p:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pass_that_panics_is_a_recorded_failure_retried_with_backoff() {
    let fake = Fake::new(&["a", "b"], 4, Duration::from_millis(100));
    fake.panics.lock().unwrap().insert("a".into());
    let (tx, _h) = start(&fake);
    at(&fake, 5.0).await;
    // The other host is served as usual meanwhile: a retry runs at once.
    tx.send(Event::RetryRequested("b".into())).unwrap();
    at(&fake, 6.0).await;
    let b = fake.passes_of("b");
    assert_eq!(b.len(), 2, "{b:?}");
    assert_eq!(b[1].1, Trigger::Retry);
    assert!((b[1].0 - 5.0).abs() < 0.01, "{b:?}");
    // The host that panicked was released and retried with backoff: 1 s,
    // then 2 s (each +-10%, after a pass of 0.1 s).
    let a = fake.passes_of("a");
    assert_eq!(a.len(), 3, "{a:?}");
    let gaps: Vec<f64> = a.windows(2).map(|w| w[1].0 - w[0].0).collect();
    for (gap, nominal) in gaps.iter().zip([1.0, 2.0]) {
        let want = nominal + 0.1;
        assert!((gap - want).abs() <= nominal * 0.1 + 0.01, "{gaps:?}");
    }
    assert!(a[1..].iter().all(|(_, tr)| *tr == Trigger::Retry), "{a:?}");
    // Each crash was recorded as a failed pass of its host, with the
    // panic's message.
    let rec = fake.recorded.lock().unwrap().clone();
    assert_eq!(rec.len(), 3, "{rec:?}");
    for (_, host, msg) in &rec {
        assert_eq!(host, "a");
        assert_eq!(
            msg,
            "the pass panicked: index out of bounds in the pass of a"
        );
    }
    // The same crash again and again is a crash loop, like any failure.
    assert_eq!(
        *fake.degraded.lock().unwrap(),
        vec![("a".to_string(), true)]
    );
    // Once it stops panicking, the next pass settles it.
    fake.panics.lock().unwrap().clear();
    tx.send(Event::RetryRequested("a".into())).unwrap();
    at(&fake, 7.0).await;
    assert_eq!(fake.passes_of("a").len(), 4);
    assert_eq!(fake.degraded.lock().unwrap()[1], ("a".to_string(), false));
    assert_eq!(fake.recorded.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_slow_load_stalls_neither_timers_nor_passes_nor_shutdown() {
    let fake = Fake::new(&["a", "b"], 4, Duration::from_millis(100));
    let (tx, h) = start(&fake);
    at(&fake, 1.0).await;
    // From now on a load takes 1000 s (a `git` that hangs).
    *fake.load_time.lock().unwrap() = Duration::from_secs(1000);
    fake.set_revision("rev-2");
    tx.send(Event::DesiredChanged).unwrap();
    // The load starts when the quiet window ends (3 s) and is still
    // running at 10 s; a retry and a failure's backoff are served anyway.
    fake.fail("b", 1, "Transient/x");
    tx.send(Event::RetryRequested("b".into())).unwrap();
    at(&fake, 10.0).await;
    assert_eq!(fake.loads_done.lock().unwrap().len(), 1, "only the first");
    let b = fake.passes_of("b");
    // Start, the retry at 1 s (which failed), then its backoff retry.
    assert_eq!(b.len(), 3, "{b:?}");
    assert!((b[1].0 - 1.0).abs() < 0.01, "{b:?}");
    assert!(b[2].0 > 2.0 && b[2].0 < 3.5, "{b:?}");
    // More changes while the load runs are one more load after it, not a
    // pile of them.
    for i in 0..5 {
        at(&fake, 20.0 + i as f64).await;
        tx.send(Event::DesiredChanged).unwrap();
    }
    at(&fake, 900.0).await;
    // Resyncs went on at 300 s intervals while the load hung.
    let a = fake.passes_of("a");
    assert!(
        a.iter().any(|(t, tr)| *tr == Trigger::Resync && *t > 290.0),
        "{a:?}"
    );
    // And a shutdown is served at once, without waiting for the load.
    tx.send(Event::Shutdown).unwrap();
    h.await.unwrap();
    assert!(Instant::now() - fake.t0 < Duration::from_secs(901));
    assert!(fake.stopped.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn loads_asked_for_during_a_load_run_once_after_it() {
    let fake = Fake::new(&["a"], 4, Duration::ZERO);
    let (tx, _h) = start(&fake);
    at(&fake, 1.0).await;
    *fake.load_time.lock().unwrap() = Duration::from_secs(50);
    tx.send(Event::Reload).unwrap();
    at(&fake, 2.0).await;
    fake.set_revision("rev-2");
    for _ in 0..3 {
        tx.send(Event::Reload).unwrap();
    }
    at(&fake, 200.0).await;
    // The start, the first SIGHUP's load (1..51 s), then one load for the
    // three that came while it ran (51..101 s), which sees rev-2.
    let loads = fake.loads_done.lock().unwrap().clone();
    assert_eq!(loads.len(), 3, "{loads:?}");
    assert!((loads[2].0 - 51.0).abs() < 0.01, "{loads:?}");
    let p = fake.passes_of("a");
    assert!(
        p.iter()
            .any(|(t, tr)| *tr == Trigger::Watch && (*t - 101.0).abs() < 0.01),
        "{p:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_host_the_rollout_holds_is_looked_at_again_soon_without_backoff() {
    let fake = Fake::new(&["a"], 4, Duration::ZERO);
    {
        let mut s = fake.script.lock().unwrap();
        let q = s.entry("a".into()).or_default();
        for _ in 0..3 {
            q.push_back(Verdict::Waiting {
                retry_in: Duration::from_secs(2),
            });
        }
    }
    let (_tx, _h) = start(&fake);
    at(&fake, 100.0).await;
    let p = fake.passes_of("a");
    // Three waits of 2 s each, then settled: the next look is the resync.
    let times: Vec<f64> = p.iter().map(|(t, _)| *t).collect();
    assert_eq!(&times[..4], &[0.0, 2.0, 4.0, 6.0], "{p:?}");
    assert_eq!(p.len(), 4, "{p:?}");
    assert!(fake.degraded.lock().unwrap().is_empty());
}
