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

pub mod pulse;
pub mod real;
pub mod recover;
pub mod schedule;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::core::report::Trigger;
use pulse::Pulse;
use schedule::{Backoff, Debouncer, WorkQueue};

/// Everything that can wake the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A file of the desired state (or its git dir) changed; debounced.
    DesiredChanged,
    /// A token file appeared or changed in `confirm/`.
    TokenAppeared,
    /// The KILL file appeared (true) or went away (false).
    KillChanged(bool),
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
    /// Held by the rollout (its wave has not come, or it halted): look
    /// again after `retry_in`.
    Waiting { retry_in: Duration },
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
/// a fake. None of these may block the thread that calls it: the loop runs
/// them on the async runtime, and a blocking call there would stall every
/// timer, signal and host behind it.
pub trait Reconciler: Send + Sync + 'static {
    /// Read the desired state again. It runs `git` and reads files, so the
    /// real one does that on a blocking thread; the loop runs it as a task
    /// of its own and goes on serving timers, signals and passes meanwhile.
    fn load(&self) -> impl Future<Output = Loaded> + Send;
    /// One pass for `host`. `degraded` is the host's crash-loop verdict, to
    /// show in its status.
    fn reconcile(
        &self,
        host: String,
        trigger: Trigger,
        degraded: Option<(String, String)>,
    ) -> impl Future<Output = Verdict> + Send;
    /// A pass of `host` ended without a verdict (it panicked, or its task
    /// was cancelled): record it as a failed pass of that host, `message`
    /// saying why, as a pass's own failure would be recorded.
    fn record_failure(
        &self,
        host: String,
        trigger: Trigger,
        message: String,
    ) -> impl Future<Output = ()> + Send;
    /// Show (or clear) a host's crash-loop verdict in its status. Called
    /// from the loop: it must not block (the real one hands the write to a
    /// blocking thread).
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
    /// What the loop tells `tend run --listen`.
    pulse: Arc<Pulse>,
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

/// Loads of the desired state run as tasks of their own, one at a time: a
/// slow `git` or disk delays only the load, never the loop.
struct Loads {
    /// The load in flight and whether it was forced (SIGHUP).
    task: Option<(JoinHandle<Loaded>, bool)>,
    /// A load was asked for while one ran (`Some(force)`): it starts when
    /// the running one ends, since that one may have read the tree before
    /// the change that asked for it.
    again: Option<bool>,
}

impl Loads {
    fn request<R: Reconciler>(&mut self, r: &Arc<R>, force: bool) {
        if self.task.is_some() {
            self.again = Some(self.again.unwrap_or(false) || force);
        } else {
            self.task = Some((spawn_load(r), force));
        }
    }

    /// Wait for the load in flight; pending forever when there is none.
    async fn join(&mut self) -> (Result<Loaded, JoinError>, bool) {
        match &mut self.task {
            Some((task, force)) => (task.await, *force),
            None => std::future::pending().await,
        }
    }

    /// The load in flight ended: start the one asked for meanwhile.
    fn finished<R: Reconciler>(&mut self, r: &Arc<R>) {
        self.task = None;
        if let Some(force) = self.again.take() {
            self.request(r, force);
        }
    }
}

fn spawn_load<R: Reconciler>(r: &Arc<R>) -> JoinHandle<Loaded> {
    let r = r.clone();
    tokio::spawn(async move { r.load().await })
}

/// What a pass task that ended without a verdict means, for its record.
fn crash_message(e: JoinError) -> String {
    if e.is_cancelled() {
        return "the pass was cancelled before it finished".into();
    }
    let payload = e.into_panic();
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    format!("the pass panicked: {what}")
}

/// One pass of `host`, in a task of its own. Its `JoinHandle` is awaited
/// here, where the host is known: a pass that panics (or is cancelled)
/// becomes a failed pass of that host, recorded by the reconciler and
/// retried with backoff by `settle`, like any other failure.
async fn pass<R: Reconciler>(
    r: Arc<R>,
    host: String,
    trigger: Trigger,
    degraded: Option<(String, String)>,
) -> (String, Verdict) {
    let task = {
        let (r, host) = (r.clone(), host.clone());
        tokio::spawn(async move { r.reconcile(host, trigger, degraded).await })
    };
    let verdict = match task.await {
        Ok(v) => v,
        Err(e) => {
            let message = crash_message(e);
            tracing::error!(%host, %message, "pass crashed: recorded as a failed pass");
            r.record_failure(host.clone(), trigger, message.clone())
                .await;
            // A panic's message can hold changing details (addresses,
            // counters); its first line is what repeats in a crash loop.
            let first = message.lines().next().unwrap_or_default();
            Verdict::Failed {
                signature: format!("crash/{first}"),
                message,
            }
        }
    };
    (host, verdict)
}

/// Run the controller until shutdown. `events` carries every trigger;
/// `seed` seeds the jitter (tests pass a fixed one); `pulse` gets the
/// loop's heartbeat, queue depth and which hosts have had a pass.
pub async fn run<R: Reconciler>(
    r: Arc<R>,
    mut events: mpsc::UnboundedReceiver<Event>,
    seed: u64,
    pulse: Arc<Pulse>,
) {
    // The loop beats at least every HEARTBEAT, woken by this timer when
    // nothing else wakes it; a beat that stops means the loop is stuck.
    let mut heartbeat = tokio::time::interval(pulse::HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first load decides the hosts and the timing. Events that arrive
    // meanwhile wait for it, except a shutdown, which is served at once.
    let mut early = Vec::new();
    let mut first = spawn_load(&r);
    let loaded = loop {
        pulse.beat();
        tokio::select! {
            _ = heartbeat.tick() => {}
            res = &mut first => match res {
                Ok(l) => break l,
                Err(e) => {
                    tracing::error!(error = %crash_message(e), "loading the desired state failed; trying again");
                    tokio::time::sleep(BACKOFF_FIRST).await;
                    first = spawn_load(&r);
                }
            },
            ev = events.recv() => match ev {
                None | Some(Event::Shutdown) => {
                    tracing::info!("shutting down before the first load finished");
                    r.stop();
                    return;
                }
                Some(ev) => early.push(ev),
            },
        }
    };
    let timing = loaded.timing;
    pulse.set_hosts(&loaded.hosts);
    let mut book = Book {
        queue: WorkQueue::new(),
        backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, timing.crash_loop_threshold),
        awaiting: BTreeSet::new(),
        degraded: BTreeMap::new(),
        loaded,
        seed: seed | 1,
        pulse,
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
    // The host of each pass task, so that even a task that fails outside
    // `pass` releases its host.
    let mut running_hosts: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut loads = Loads {
        task: None,
        again: None,
    };
    let mut stopping = false;
    // The desired state is also read again every `resync`, in case a
    // change escaped the watch (a network file system, a lost event).
    let mut reread = tokio::time::interval_at(Instant::now() + timing.resync, timing.resync);
    reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut early = early.into_iter();

    loop {
        if stopping && running.is_empty() {
            break;
        }
        let room = running.len() < book.loaded.timing.concurrency.max(1);
        let deadline = debounce.deadline();
        book.pulse.beat();
        book.pulse.set_queue_depth(book.queue.due(Instant::now()));
        tokio::select! {
            _ = heartbeat.tick() => {}
            ev = async { match early.next() { Some(ev) => Some(ev), None => events.recv().await } }, if !stopping => {
                match ev {
                    None | Some(Event::Shutdown) => {
                        tracing::info!(running = running.len(), "shutting down: no new passes; running steps finish");
                        stopping = true;
                        r.stop();
                    }
                    Some(Event::DesiredChanged) => debounce.touch(Instant::now()),
                    Some(Event::Reload) => {
                        debounce.fire();
                        loads.request(&r, true);
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
                    Some(Event::KillChanged(engaged)) => {
                        // Engaging it needs nothing here (dispatch checks the file
                        // before every step); lifting it resumes work at once.
                        if engaged {
                            tracing::warn!("kill switch engaged (KILL file in the state dir): nothing is dispatched until it is removed");
                        } else {
                            tracing::info!("kill switch lifted: reconciling every host");
                        }
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
            _ = reread.tick(), if !stopping => loads.request(&r, false),
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() && !stopping => {
                debounce.fire();
                loads.request(&r, false);
            }
            (res, force) = loads.join(), if !stopping => {
                loads.finished(&r);
                match res {
                    Ok(fresh) => apply_load(&*r, &mut book, &mut debounce, fresh, force),
                    // The loaded state stays as it was; the next change or
                    // resync loads again.
                    Err(e) => tracing::error!(error = %crash_message(e), "loading the desired state failed; keeping the last one"),
                }
            }
            next = book.queue.next(), if room && !stopping && !book.queue.is_empty() => {
                if let Some((host, trigger)) = next {
                    let degraded = book.degraded.get(&host).cloned();
                    tracing::debug!(%host, ?trigger, "pass starts");
                    let task = running.spawn(pass(r.clone(), host.clone(), trigger, degraded));
                    running_hosts.insert(task.id(), host);
                }
            }
            Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                match joined {
                    Ok((id, (host, verdict))) => {
                        running_hosts.remove(&id);
                        settle(&*r, &mut book, &host, verdict, stopping);
                    }
                    // `pass` itself failed (recording the crash panicked):
                    // the host is still released and retried with backoff.
                    Err(e) => {
                        let id = e.id();
                        let message = crash_message(e);
                        match running_hosts.remove(&id) {
                            Some(host) => {
                                tracing::error!(%host, %message, "pass task failed");
                                let verdict = Verdict::Failed {
                                    signature: format!("crash/{message}"),
                                    message,
                                };
                                settle(&*r, &mut book, &host, verdict, stopping);
                            }
                            None => tracing::error!(%message, "a pass task of an unknown host failed"),
                        }
                    }
                }
            }
        }
    }
    tracing::info!("controller stopped");
}

/// The error policy: a verdict becomes the host's next deadline.
fn settle<R: Reconciler>(r: &R, book: &mut Book, host: &str, verdict: Verdict, stopping: bool) {
    tracing::debug!(%host, ?verdict, "pass ends");
    book.queue.done(host);
    book.pulse.passed(host);
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
        Verdict::Waiting { retry_in } => {
            book.backoff.success(host);
            book.queue.schedule(host, now + retry_in, Trigger::Resync);
        }
        Verdict::Failed { signature, message } => {
            let j = book.jitter();
            let f = book.backoff.failure(host, &signature, j);
            tracing::warn!(%host, consecutive = f.consecutive, retry_in = ?f.delay, %message, "pass failed");
            if f.degraded && !book.degraded.contains_key(host) {
                let d = (
                    "CrashLoop".to_string(),
                    format!(
                        "{} consecutive passes failed the same way ({message}); retried every {} until the desired state changes, a token arrives or `tend retry {host} --reason TEXT`",
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

/// Take a fresh load of the desired state. A new revision (or `force`, for
/// SIGHUP) releases every crash loop and reconciles every host now; hosts
/// that left the inventory are forgotten.
fn apply_load<R: Reconciler>(
    r: &R,
    book: &mut Book,
    debounce: &mut Debouncer,
    fresh: Loaded,
    force: bool,
) {
    let changed = fresh.revision != book.loaded.revision || fresh.valid != book.loaded.valid;
    if !changed && !force {
        tracing::debug!(revision = %fresh.revision, "desired state unchanged");
        return;
    }
    if fresh.valid && changed {
        tracing::info!(revision = %fresh.revision, "desired state changed");
    } else if fresh.valid {
        tracing::info!(revision = %fresh.revision, "desired state reloaded (SIGHUP): unchanged; every host is reconciled now");
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
    book.pulse.set_hosts(&fresh.hosts);
    book.loaded = fresh;
    for h in book.degraded.keys().cloned().collect::<Vec<_>>() {
        book.release(&h, r);
    }
    book.schedule_all(Instant::now(), Trigger::Watch);
}

#[cfg(test)]
mod tests;
