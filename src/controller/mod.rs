//! The daemon (`tend run`): every trigger becomes one `Event`; a per-host
//! work queue decides when each host is reconciled next; each pass is
//! level-triggered (it reads the whole desired and actual state afresh, not
//! the event that woke it) and returns a `Verdict` that the error policy
//! turns into the host's next deadline.
//!
//! Invariant: never two passes of one host at once, at most `concurrency`
//! passes at once, and one host's failure never stops the loop. The loop
//! itself does no I/O: it talks to the world through `Reconciler`, so that it
//! runs on paused time against a fake in tests.

pub mod real;
pub mod recover;
pub mod schedule;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::core::report::Trigger;
use schedule::{Backoff, Debouncer, WorkQueue};

/// Everything that can wake the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A file of the desired state (or its git dir) changed; debounced.
    DesiredChanged,
    /// A token file appeared or changed in `confirm/`.
    TokenAppeared,
    /// The KILL file appeared or went away.
    KillChanged,
    /// `tend retry HOST`.
    RetryRequested(String),
    /// SIGHUP: re-read the desired state now.
    Reload,
    /// SIGINT or SIGTERM.
    Shutdown,
}

/// What a pass concluded about its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Converged, or waiting on a person (a token, dispatch off, the kill
    /// switch): look again at the next resync. `awaiting` is true when a
    /// destructive step waits for a token.
    Settled { awaiting: bool },
    /// The pass failed for the host; `signature` says which failure (the
    /// same signature repeated makes a crash loop).
    Failed { signature: String, message: String },
}

/// The timing knobs of tend.yaml that the loop uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub resync: Duration,
    pub quiet_window: Duration,
    pub max_defer: Duration,
    pub concurrency: usize,
    pub crash_loop_threshold: u32,
}

/// The desired state after a (re)load, as the loop needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The hosts to keep converged (of the last valid desired state).
    pub hosts: Vec<String>,
    /// The desired revision now, valid or not.
    pub revision: String,
    pub valid: bool,
    pub timing: Timing,
}

/// The loop's window on the world. The real one runs `pass::run`; tests use
/// a fake.
pub trait Reconciler: Send + Sync + 'static {
    /// Read the desired state again.
    fn load(&self) -> Loaded;
    /// One pass for `host`. `degraded` is the host's crash-loop verdict, to
    /// show in its status.
    fn reconcile(
        &self,
        host: String,
        trigger: Trigger,
        degraded: Option<(String, String)>,
    ) -> impl Future<Output = Verdict> + Send;
    /// Show (or clear) a host's crash-loop verdict in its status now.
    fn set_degraded(&self, host: &str, degraded: Option<(String, String)>);
    /// Shutdown began: running passes stop before their next step.
    fn stop(&self);
}

/// Backoff bounds of the error policy.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// The loop's memory of each host.
struct Book {
    queue: WorkQueue<Trigger>,
    backoff: Backoff,
    /// Hosts whose last pass left a destructive step waiting for a token.
    awaiting: BTreeSet<String>,
    /// Hosts currently Degraded, with the reason shown.
    degraded: BTreeMap<String, (String, String)>,
    loaded: Loaded,
    seed: u64,
}

impl Book {
    fn jitter(&mut self) -> f64 {
        Backoff::jitter_from(&mut self.seed)
    }

    /// The next resync of a host: `resync`, stretched by up to 10% so that
    /// hosts converged together do not probe together forever.
    fn resync_at(&mut self, now: Instant) -> Instant {
        let j = self.jitter();
        now + self.loaded.timing.resync.mul_f64(1.0 + 0.1 * j)
    }

    fn schedule_all(&mut self, at: Instant, why: Trigger) {
        for h in self.loaded.hosts.clone() {
            self.queue.schedule(&h, at, why);
        }
    }

    fn release<R: Reconciler>(&mut self, host: &str, r: &R) {
        self.backoff.release(host);
        if self.degraded.remove(host).is_some() {
            r.set_degraded(host, None);
        }
    }
}

/// Run the controller until shutdown. `events` carries every trigger;
/// `seed` seeds the jitter (tests pass a fixed one).
pub async fn run<R: Reconciler>(r: Arc<R>, mut events: mpsc::UnboundedReceiver<Event>, seed: u64) {
    let loaded = r.load();
    let timing = loaded.timing;
    let mut book = Book {
        queue: WorkQueue::new(),
        backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, timing.crash_loop_threshold),
        awaiting: BTreeSet::new(),
        degraded: BTreeMap::new(),
        loaded,
        seed: seed | 1,
    };
    let mut debounce = Debouncer::new(timing.quiet_window, timing.max_defer);
    tracing::info!(
        hosts = book.loaded.hosts.len(),
        revision = %book.loaded.revision,
        valid = book.loaded.valid,
        "controller started"
    );
    book.schedule_all(Instant::now(), Trigger::Resync);
    let mut running: JoinSet<(String, Verdict)> = JoinSet::new();
    let mut stopping = false;
    // The desired state is also read again every `resync`, in case a
    // change escaped the watch (a network file system, a lost event).
    let mut reread = tokio::time::interval_at(Instant::now() + timing.resync, timing.resync);
    reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        if stopping && running.is_empty() {
            break;
        }
        let room = running.len() < book.loaded.timing.concurrency.max(1);
        let deadline = debounce.deadline();
        tokio::select! {
            ev = events.recv(), if !stopping => {
                match ev {
                    None | Some(Event::Shutdown) => {
                        tracing::info!(running = running.len(), "shutting down: no new passes; running steps finish");
                        stopping = true;
                        r.stop();
                    }
                    Some(Event::DesiredChanged) => debounce.touch(Instant::now()),
                    Some(Event::Reload) => {
                        debounce.fire();
                        reload(&*r, &mut book, &mut debounce, true);
                    }
                    Some(Event::TokenAppeared) => {
                        let hosts: Vec<String> = book
                            .awaiting
                            .iter()
                            .chain(book.degraded.keys())
                            .cloned()
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect();
                        tracing::info!(?hosts, "token file seen: reconciling the hosts that wait for one");
                        for h in hosts {
                            book.release(&h, &*r);
                            book.queue.schedule(&h, Instant::now(), Trigger::Token);
                        }
                    }
                    Some(Event::KillChanged) => {
                        // Engaging it needs nothing here (dispatch checks the file
                        // before every step); lifting it resumes work at once.
                        tracing::info!("kill switch changed: reconciling every host");
                        book.schedule_all(Instant::now(), Trigger::Resync);
                    }
                    Some(Event::RetryRequested(h)) => {
                        if book.loaded.hosts.contains(&h) {
                            tracing::info!(host = %h, "retry requested");
                            book.release(&h, &*r);
                            book.queue.schedule(&h, Instant::now(), Trigger::Retry);
                        } else {
                            tracing::warn!(host = %h, "retry requested for a host not in the inventory; ignored");
                        }
                    }
                }
            }
            _ = reread.tick(), if !stopping => reload(&*r, &mut book, &mut debounce, false),
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() && !stopping => {
                debounce.fire();
                reload(&*r, &mut book, &mut debounce, false);
            }
            next = book.queue.next(), if room && !stopping && !book.queue.is_empty() => {
                if let Some((host, trigger)) = next {
                    let degraded = book.degraded.get(&host).cloned();
                    let r = r.clone();
                    tracing::debug!(%host, ?trigger, "pass starts");
                    running.spawn(async move {
                        let v = r.reconcile(host.clone(), trigger, degraded).await;
                        (host, v)
                    });
                }
            }
            Some(joined) = running.join_next(), if !running.is_empty() => {
                match joined {
                    Ok((host, verdict)) => settle(&*r, &mut book, &host, verdict, stopping),
                    // A pass that panicked: its host is unknown here, so the
                    // queue cannot release it; log loudly. The real
                    // reconciler catches its own errors, so this is a bug.
                    Err(e) => tracing::error!(error = %e, "a pass task failed"),
                }
            }
        }
    }
    tracing::info!("controller stopped");
}

/// The error policy: a verdict becomes the host's next deadline.
fn settle<R: Reconciler>(r: &R, book: &mut Book, host: &str, verdict: Verdict, stopping: bool) {
    book.queue.done(host);
    if stopping || !book.loaded.hosts.iter().any(|h| h == host) {
        return;
    }
    let now = Instant::now();
    match verdict {
        Verdict::Settled { awaiting } => {
            book.backoff.success(host);
            if book.degraded.remove(host).is_some() {
                r.set_degraded(host, None);
            }
            if awaiting {
                book.awaiting.insert(host.to_string());
            } else {
                book.awaiting.remove(host);
            }
            let at = book.resync_at(now);
            book.queue.schedule(host, at, Trigger::Resync);
        }
        Verdict::Failed { signature, message } => {
            let j = book.jitter();
            let f = book.backoff.failure(host, &signature, j);
            tracing::warn!(%host, consecutive = f.consecutive, retry_in = ?f.delay, %message, "pass failed");
            if f.degraded && !book.degraded.contains_key(host) {
                let d = (
                    "CrashLoop".to_string(),
                    format!(
                        "{} consecutive passes failed the same way ({message}); retried every {} until the desired state changes, a token arrives or `tend retry {host}`",
                        f.consecutive,
                        humantime::format_duration(BACKOFF_CAP)
                    ),
                );
                tracing::error!(%host, reason = %d.1, "host degraded");
                r.set_degraded(host, Some(d.clone()));
                book.degraded.insert(host.to_string(), d);
            }
            book.queue.schedule(host, now + f.delay, Trigger::Retry);
        }
    }
}

/// Re-read the desired state. A new revision (or `force`, for SIGHUP)
/// releases every crash loop and reconciles every host now; hosts that left
/// the inventory are forgotten.
fn reload<R: Reconciler>(r: &R, book: &mut Book, debounce: &mut Debouncer, force: bool) {
    let fresh = r.load();
    let changed = fresh.revision != book.loaded.revision || fresh.valid != book.loaded.valid;
    if !changed && !force {
        tracing::debug!(revision = %fresh.revision, "desired state unchanged");
        return;
    }
    if fresh.valid {
        tracing::info!(revision = %fresh.revision, "desired state changed");
    } else {
        tracing::warn!(revision = %fresh.revision, "desired state is invalid: nothing is dispatched until it is fixed");
    }
    for gone in book
        .loaded
        .hosts
        .iter()
        .filter(|h| !fresh.hosts.contains(h))
    {
        tracing::info!(host = %gone, "host left the inventory");
        book.queue.forget(gone);
        book.backoff.release(gone);
        book.awaiting.remove(gone);
        book.degraded.remove(gone);
    }
    if fresh.timing.quiet_window != book.loaded.timing.quiet_window
        || fresh.timing.max_defer != book.loaded.timing.max_defer
    {
        *debounce = Debouncer::new(fresh.timing.quiet_window, fresh.timing.max_defer);
    }
    if fresh.timing.crash_loop_threshold != book.loaded.timing.crash_loop_threshold {
        book.backoff = Backoff::new(
            BACKOFF_FIRST,
            BACKOFF_CAP,
            fresh.timing.crash_loop_threshold,
        );
    }
    book.loaded = fresh;
    for h in book.degraded.keys().cloned().collect::<Vec<_>>() {
        book.release(&h, r);
    }
    book.schedule_all(Instant::now(), Trigger::Watch);
}

#[cfg(test)]
mod tests;
