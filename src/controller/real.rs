//! The real `Reconciler`: reads the desired-state directory, runs passes
//! through `pass::run` (one host per pass, one run per pass that has
//! something to tell), keeps SSH sessions across passes, and writes status
//! files and `fleet.json`.
//!
//! Invariant: while the desired state is invalid, passes run on the last
//! valid state with dispatch off and say `ValidDesiredState=False` with the
//! problems; with no valid state ever seen, hosts are not even probed. No
//! file, `git` or SQLite work of its own runs on an async worker thread:
//! each goes to `spawn_blocking`, so a slow disk or `git` stalls only the
//! work that waits for it. A pass that fails without a result (an error or
//! a panic) is still recorded: a failed run of its host, and its status.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use serde_json::json;

use crate::cli::Global;
use crate::clock::{new_run_id, now_rfc3339};
use crate::core::model::{self, DesiredState};
use crate::core::policy::PolicyOutcome;
use crate::core::report::{
    self, Action, Changes, ConditionStatus, ConditionType, DispatchStatus, EffectiveMode,
    HostOutcome, HostOutcomeKind, HostStatus, OperationIntent, RunResult, StepStatus, Trigger,
};
use crate::core::spec::DispatchMode;
use crate::metrics::Metrics;
use crate::pass::{self, Overlay, PassInput, PassReport, TransportCache};
use crate::settings::Settings;
use crate::store::StateDir;
use crate::store::db::{Db, RunRow};

use super::{Loaded, Reconciler, Timing, Verdict};

/// How many problems of an invalid desired state a status message quotes.
const PROBLEMS_SHOWN: usize = 5;

/// What the controller knows of the desired state.
struct Snapshot {
    settings: Settings,
    /// The last valid desired state and its revision.
    valid: Option<(Arc<DesiredState>, String)>,
    /// The desired state as it stands is invalid: (revision, problems).
    invalid: Option<(String, String)>,
    /// Hosts known while no valid state was ever seen (from the partial
    /// inventory and the status files), to report on.
    orphans: Vec<String>,
}

/// The real reconciler: a handle on the state that its blocking work
/// shares (`spawn_blocking` needs owned data).
pub struct Real {
    inner: Arc<Inner>,
}

struct Inner {
    global: Global,
    state_dir: StateDir,
    snapshot: RwLock<Arc<Snapshot>>,
    cache: TransportCache,
    stop: Arc<AtomicBool>,
    /// One pass at a time decides whether a new rollout starts (SPEC 8.2).
    rollout: tokio::sync::Mutex<()>,
    /// `fleet.json` is rebuilt from every status file after passes;
    /// one rebuild at a time keeps the last writer from using older reads.
    fleet: Mutex<()>,
    /// A rebuild of `fleet.json` is due (it covers every pass that ended
    /// before it begins), and when the last one began.
    fleet_due: AtomicBool,
    fleet_last: Mutex<Option<tokio::time::Instant>>,
    /// The file watches, refreshed before each load to cover new and
    /// recreated directories.
    watches: Mutex<Option<super::watch::Watches>>,
    /// Read-modify-writes of a status file made here (not by a pass) take
    /// turns, so that one does not overwrite another's change.
    status: Mutex<()>,
    /// Fed where each pass ends, from what it recorded.
    metrics: Arc<Metrics>,
}

/// The least time between two rebuilds of `fleet.json` by passes.
const FLEET_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// A lock whose holder panicked is still usable: what it guards is replaced
/// whole (snapshot, watches) or is a unit token, so a panic never leaves it
/// half-written, and one crashed pass must not take every later one down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Run blocking work off the async runtime. A panic in it is re-raised in
/// the caller's task, where the controller records it as a failed pass.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking work was cancelled: {e}"),
    }
}

impl Real {
    /// The controller for `--dir` and friends. The state dir is fixed for
    /// the life of the process (moving `state_dir` in tend.yaml needs a
    /// restart); `settings` is the first resolution. `metrics` counts each
    /// pass's end, probe, apply and tokens.
    pub fn new(
        global: Global,
        settings: Settings,
        state_dir: StateDir,
        metrics: Arc<Metrics>,
    ) -> Real {
        let snap = Snapshot {
            settings,
            valid: None,
            invalid: None,
            orphans: Vec::new(),
        };
        Real {
            inner: Arc::new(Inner {
                global,
                state_dir,
                snapshot: RwLock::new(Arc::new(snap)),
                cache: TransportCache::default(),
                rollout: tokio::sync::Mutex::new(()),
                stop: Arc::new(AtomicBool::new(false)),
                fleet: Mutex::new(()),
                fleet_due: AtomicBool::new(false),
                fleet_last: Mutex::new(None),
                watches: Mutex::new(None),
                status: Mutex::new(()),
                metrics,
            }),
        }
    }

    pub fn set_watches(&self, w: super::watch::Watches) {
        *lock(&self.inner.watches) = Some(w);
    }

    pub fn state_dir(&self) -> &StateDir {
        &self.inner.state_dir
    }

    pub fn desired_dir(&self) -> PathBuf {
        self.inner.global.dir.clone()
    }
}

impl Inner {
    fn current(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn hosts(snap: &Snapshot) -> Vec<String> {
        match &snap.valid {
            Some((s, _)) => s.hosts.keys().cloned().collect(),
            None => snap.orphans.clone(),
        }
    }

    fn write_fleet(&self, snap: &Snapshot) {
        let _one = lock(&self.fleet);
        let hosts = Self::hosts(snap);
        let state = snap.valid.as_ref().map(|(s, _)| s.as_ref());
        if let Err(e) = pass::write_fleet(&self.state_dir, hosts.iter(), state, &now_rfc3339()) {
            tracing::error!(error = %format!("{e:#}"), "could not write fleet.json");
        }
    }

    /// `fleet.json` after a pass: rebuilt at most once per [`FLEET_EVERY`]
    /// (a rebuild reads every host's status file, so one per pass would be
    /// quadratic in hosts), and always once after the last pass: a pass
    /// that ends while a rebuild is due joins it; one that ends while a
    /// rebuild runs gets the next. While stopping, at once.
    async fn fleet_soon(self: &Arc<Self>) {
        let inner = self;
        if inner.stop.load(Ordering::SeqCst) {
            let me = self.clone();
            blocking(move || me.write_fleet_now()).await;
            return;
        }
        if inner.fleet_due.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let last = *lock(&me.fleet_last);
            if let Some(at) = last {
                tokio::time::sleep_until(at + FLEET_EVERY).await;
            }
            me.fleet_due.store(false, Ordering::SeqCst);
            blocking(move || me.write_fleet_now()).await;
        });
    }

    fn write_fleet_now(&self) {
        *lock(&self.fleet_last) = Some(tokio::time::Instant::now());
        self.write_fleet(&self.current());
    }

    /// Status of a host that cannot be planned at all: the desired state
    /// was never valid, or names the host only in a broken inventory.
    fn report_unplannable(&self, host: &str, snap: &Snapshot, degraded: Option<(String, String)>) {
        let _turn = lock(&self.status);
        let now = now_rfc3339();
        let mut s = match self.state_dir.read_status(host) {
            Ok(Some(s)) => s,
            _ => HostStatus::new(host, &now),
        };
        if let Some((rev, problems)) = &snap.invalid {
            s.desired_revision = Some(rev.clone());
            s.set_condition(
                ConditionType::ValidDesiredState,
                ConditionStatus::False,
                "InvalidDesiredState",
                problems.clone(),
                &now,
            );
        }
        set_degraded_condition(&mut s, degraded, &now);
        if let Err(e) = self.state_dir.write_status(&s) {
            tracing::error!(%host, error = %e, "could not write status");
        }
    }
}

fn set_degraded_condition(s: &mut HostStatus, degraded: Option<(String, String)>, now: &str) {
    match degraded {
        Some((reason, msg)) => s.set_condition(
            ConditionType::Degraded,
            ConditionStatus::True,
            reason,
            msg,
            now,
        ),
        None => s.set_condition(
            ConditionType::Degraded,
            ConditionStatus::False,
            "NotDegraded",
            "no repeated failures",
            now,
        ),
    }
}

impl Inner {
    /// Read, validate and take the desired state. Blocking: runs `git`
    /// and reads the tree.
    fn load_blocking(&self) -> Loaded {
        // Watches first: a directory recreated since the last load (a
        // checkout, `git stash`) is watched again before the tree is read,
        // so an edit either lands before the read or is seen by the watch.
        if let Some(w) = lock(&self.watches).as_mut()
            && let Err(e) = w.refresh()
        {
            tracing::warn!(error = %format!("{e:#}"), "could not watch a new directory");
        }
        let prev = self.current();
        let dir = &self.global.dir;
        let (validated, tree) = match crate::source::read_tree(dir) {
            Ok(tree) => (Some(model::validate(&tree)), Some(tree)),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot read the desired state");
                (None, None)
            }
        };
        let revision = tree
            .as_ref()
            .map(|t| crate::source::revision(dir, self.state_dir.root(), t))
            .unwrap_or_else(|| "unreadable".into());
        let mut snap = Snapshot {
            settings: prev.settings.clone(),
            valid: prev.valid.clone(),
            invalid: None,
            orphans: prev.orphans.clone(),
        };
        match validated {
            Some(v) if v.is_valid() => {
                match Settings::resolve(&self.global, v.state.config.clone(), None) {
                    Ok(s) => {
                        if s.state_dir != snap.settings.state_dir {
                            tracing::warn!(
                                configured = %s.state_dir.display(),
                                in_use = %snap.settings.state_dir.display(),
                                "state_dir changed in tend.yaml; it takes effect at the next start"
                            );
                        }
                        snap.settings = Settings {
                            state_dir: snap.settings.state_dir.clone(),
                            ..s
                        };
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "settings unchanged")
                    }
                }
                snap.valid = Some((Arc::new(v.state), revision.clone()));
            }
            other => {
                let problems = match &other {
                    Some(v) => {
                        let mut lines: Vec<String> = v
                            .problems
                            .iter()
                            .take(PROBLEMS_SHOWN)
                            .map(|p| p.to_string())
                            .collect();
                        if v.problems.len() > PROBLEMS_SHOWN {
                            lines.push(format!(
                                "and {} more (tend validate)",
                                v.problems.len() - PROBLEMS_SHOWN
                            ));
                        }
                        lines.join("; ")
                    }
                    None => format!(
                        "the desired-state directory {} cannot be read",
                        dir.display()
                    ),
                };
                for line in problems.split("; ") {
                    tracing::warn!(problem = %line, "invalid desired state");
                }
                snap.invalid = Some((revision.clone(), problems));
                if snap.valid.is_none() {
                    let mut names: Vec<String> = other
                        .map(|v| v.state.hosts.keys().cloned().collect())
                        .unwrap_or_default();
                    names.extend(self.state_dir.status_hosts().unwrap_or_default());
                    names.sort();
                    names.dedup();
                    snap.orphans = names;
                }
            }
        }
        let c = &snap.settings.config;
        let timing = Timing {
            resync: c.resync.0,
            quiet_window: c.quiet_window.0,
            max_defer: c.max_defer.0,
            concurrency: c.concurrency.max(1) as usize,
            crash_loop_threshold: c.crash_loop_threshold.max(1),
        };
        let loaded = Loaded {
            hosts: Self::hosts(&snap),
            revision,
            valid: snap.invalid.is_none(),
            timing,
        };
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
        let keep = loaded.hosts.clone();
        self.cache.retain(|h| keep.iter().any(|k| k == h));
        loaded
    }

    fn set_degraded_blocking(&self, host: &str, degraded: Option<(String, String)>) {
        {
            let _turn = lock(&self.status);
            let now = now_rfc3339();
            match self.state_dir.read_status(host) {
                Ok(Some(mut s)) => {
                    set_degraded_condition(&mut s, degraded, &now);
                    if let Err(e) = self.state_dir.write_status(&s) {
                        tracing::error!(%host, error = %e, "could not write status");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(%host, error = %e, "could not read status"),
            }
        }
        self.write_fleet(&self.current());
    }

    /// Record a pass of `host` that ended without a result: a run of that
    /// host that failed with `message`, and its status. A run the pass had
    /// begun is closed with what its step attempts show (as start-up
    /// recovery closes a crashed one); a pass that failed before it began
    /// one gets a run of its own, so the history shows every failed pass.
    fn record_failed_pass(&self, host: &str, trigger: Trigger, message: &str) -> Result<String> {
        let _turn = lock(&self.status);
        let sd = &self.state_dir;
        sd.ensure()?;
        let now = now_rfc3339();
        let reason = format!("the pass failed: {message}; the host is retried with backoff");
        let mut db = Db::open(&sd.db_path())?;
        // Never two passes of one host at once, and the controller holds
        // the state dir: an unfinished run of this host alone is this pass's.
        let mut run_id = None;
        for open in db.unfinished_runs()? {
            if open.run.target_hosts != [host] {
                continue;
            }
            let id = open.run.run_id.clone();
            let attempts = db.step_attempts(&id)?;
            let mut result = super::recover::interrupted_result(&open.run, &attempts, &now);
            result.execution_outcome = report::ExecutionOutcome::ExecutionFailed;
            for o in &mut result.host_outcomes {
                o.reason = Some(reason.clone());
                o.last_failure_message = Some(message.to_string());
            }
            db.record_event(
                Some(&id),
                &now,
                Some(host),
                "pass_failed",
                &json!({"message": message}),
            )?;
            db.finish_run(&result, &serde_json::to_string_pretty(&result)?)?;
            let timeline = super::recover::timeline(&db, &id)?;
            sd.write_interrupted_run(&result, &timeline)?;
            run_id = Some(id);
        }
        let run_id = match run_id {
            Some(id) => id,
            None => self.record_new_failed_run(&mut db, host, trigger, message, &reason, &now)?,
        };
        let mut s = match sd.read_status(host) {
            Ok(Some(s)) => s,
            _ => HostStatus::new(host, &now),
        };
        s.last_run_id = Some(run_id.clone());
        s.set_condition(
            ConditionType::Converged,
            ConditionStatus::False,
            "PassFailed",
            reason,
            &now,
        );
        sd.write_status(&s)?;
        Ok(run_id)
    }

    fn record_new_failed_run(
        &self,
        db: &mut Db,
        host: &str,
        trigger: Trigger,
        message: &str,
        reason: &str,
        now: &str,
    ) -> Result<String> {
        let snap = self.current();
        let revision = match (&snap.valid, &snap.invalid) {
            (Some((_, rev)), _) => rev.clone(),
            (None, Some((rev, _))) => rev.clone(),
            (None, None) => "unknown".into(),
        };
        let mut row = RunRow {
            run_id: new_run_id(SystemTime::now()),
            started_at: now.to_string(),
            action: Action::Converge,
            trigger,
            dispatch_mode: snap.settings.dispatch,
            effective_mode: EffectiveMode::Quick,
            policy_outcome: PolicyOutcome::PreflightFailed,
            policy_reason: reason.to_string(),
            desired_revision: revision.clone(),
            target_hosts: vec![host.to_string()],
        };
        // Run ids are random in their last characters: draw again on a clash.
        let mut tries = 0;
        loop {
            match db.begin_run(&row) {
                Ok(()) => break,
                Err(_) if tries < 8 && db.run(&row.run_id)?.is_some() => {
                    tries += 1;
                    row.run_id = new_run_id(SystemTime::now());
                }
                Err(e) => return Err(e.into()),
            }
        }
        db.record_event(
            Some(&row.run_id),
            now,
            Some(host),
            "pass_failed",
            &json!({"message": message}),
        )?;
        let outcomes = vec![HostOutcome {
            host: host.to_string(),
            outcome: HostOutcomeKind::ExecutionFailed,
            reason: Some(reason.to_string()),
            dispatch_status: DispatchStatus::NotDispatched,
            attempt_count: 0,
            last_failure_class: None,
            last_failure_message: Some(message.to_string()),
            changes: Changes::default(),
            steps: Vec::new(),
            corrective: 0,
            intentional: 0,
            probe_ms: None,
            apply_ms: None,
        }];
        let result = RunResult {
            schema_version: report::SCHEMA_VERSION,
            run_id: row.run_id.clone(),
            operation_intent: OperationIntent {
                action: Action::Converge,
                trigger,
                target_hosts: row.target_hosts.clone(),
                requested_by: snap.settings.requested_by.clone(),
            },
            desired_revision: revision,
            effective_mode: EffectiveMode::Quick,
            dispatch_mode: row.dispatch_mode,
            policy_outcome: PolicyOutcome::PreflightFailed,
            policy_reason: reason.to_string(),
            blast_radius: row.target_hosts.clone(),
            execution_outcome: report::ExecutionOutcome::ExecutionFailed,
            execution_started_at: now.to_string(),
            execution_completed_at: now.to_string(),
            confirmation: None,
            host_outcomes: outcomes,
        };
        db.finish_run(&result, &serde_json::to_string_pretty(&result)?)?;
        let timeline = super::recover::timeline(db, &row.run_id)?;
        self.state_dir.write_interrupted_run(&result, &timeline)?;
        Ok(row.run_id)
    }

    /// Record a failed pass, off the async runtime; a failure to record is
    /// logged (the host is retried with backoff either way).
    async fn record_failure(self: Arc<Self>, host: String, trigger: Trigger, message: String) {
        let me = self.clone();
        blocking(move || {
            match me.record_failed_pass(&host, trigger, &message) {
                Ok(run_id) => {
                    me.metrics
                        .pass_ended(&host, HostOutcomeKind::ExecutionFailed);
                    tracing::warn!(%host, %run_id, %message, "failed pass recorded")
                }
                Err(e) => {
                    tracing::error!(%host, error = %format!("{e:#}"), %message, "could not record a failed pass")
                }
            }
            me.write_fleet(&me.current());
        })
        .await;
    }

    async fn reconcile(
        self: Arc<Self>,
        host: String,
        trigger: Trigger,
        degraded: Option<(String, String)>,
    ) -> Verdict {
        let snap = self.current();
        if snap.settings.test_panic_host.as_deref() == Some(host.as_str()) {
            // The test hook of `TEND_TEST_PANIC_HOST` (see `Settings`): a
            // real pass that panics, to show the daemon survives one.
            panic!("test hook TEND_TEST_PANIC_HOST: the pass of host `{host}` panics");
        }
        if let Some(v) = self.clone().rollout_gate(&snap, &host).await {
            return v;
        }
        let verdict = match &snap.valid {
            Some((state, revision)) if state.hosts.contains_key(&host) => {
                let mut overlay = Overlay {
                    invalid: snap.invalid.clone(),
                    ..Overlay::default()
                };
                if let Some(d) = degraded {
                    overlay.degraded.insert(host.clone(), d);
                }
                let report = pass::run(PassInput {
                    progress: None,
                    settings: &snap.settings,
                    state,
                    revision,
                    state_dir: &self.state_dir,
                    targets: vec![host.clone()],
                    trigger,
                    mode: snap.settings.dispatch,
                    cache: Some(&self.cache),
                    stop: Some(self.stop.clone()),
                    quiet_noop: true,
                    fleet_scope: true,
                    overlay: &overlay,
                    rollout_prep: None,
                })
                .await;
                match report {
                    Ok(r) => {
                        if let Some(res) = &r.result {
                            log_run(&host, res);
                        }
                        count_pass(&self.metrics, &host, &r);
                        let (sd, h) = (self.state_dir.clone(), host.clone());
                        let rollouts = snap.settings.dispatch == DispatchMode::Enforced
                            && state.config.rollout.is_some();
                        blocking(move || verdict(&h, r.result.as_ref(), &sd, rollouts)).await
                    }
                    Err(e) => {
                        // A pass that failed without a result is still a
                        // failed pass of its host, recorded as such.
                        let message = format!("{e:#}");
                        tracing::error!(%host, error = %message, "pass failed");
                        self.clone()
                            .record_failure(host.clone(), trigger, message.clone())
                            .await;
                        return Verdict::Failed {
                            signature: format!("pass error: {message}"),
                            message,
                        };
                    }
                }
            }
            _ => {
                let me = self.clone();
                let (h, s) = (host.clone(), snap.clone());
                blocking(move || me.report_unplannable(&h, &s, degraded)).await;
                Verdict::Settled { awaiting: false }
            }
        };
        drop(snap);
        self.fleet_soon().await;
        verdict
    }
}

impl Reconciler for Real {
    async fn load(&self) -> Loaded {
        let me = self.inner.clone();
        blocking(move || me.load_blocking()).await
    }

    async fn reconcile(
        &self,
        host: String,
        trigger: Trigger,
        degraded: Option<(String, String)>,
    ) -> Verdict {
        self.inner.clone().reconcile(host, trigger, degraded).await
    }

    async fn record_failure(&self, host: String, trigger: Trigger, message: String) {
        self.inner
            .clone()
            .record_failure(host, trigger, message)
            .await
    }

    fn set_degraded(&self, host: &str, degraded: Option<(String, String)>) {
        let me = self.inner.clone();
        let host = host.to_string();
        // Called from the loop, which must not wait on the disk.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || me.set_degraded_blocking(&host, degraded));
            }
            Err(_) => me.set_degraded_blocking(&host, degraded),
        }
    }

    fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
    }
}

impl Real {
    /// After the loop: `fleet.json` as the last passes left the hosts
    /// (a coalesced rebuild may not have run yet).
    pub fn flush_fleet(&self) {
        self.inner.write_fleet_now();
    }
}

impl Inner {
    /// The rollout before a controller pass (SPEC 8.2): a revision that
    /// starts a new rollout has its hosts decided over the whole fleet
    /// first (one pass at a time does this); a host the rollout holds whose
    /// status says so already gets no pass, only another look soon.
    async fn rollout_gate(self: Arc<Self>, snap: &Snapshot, host: &str) -> Option<Verdict> {
        let (state, revision) = snap.valid.as_ref()?;
        let spec = state.config.rollout.clone()?;
        if snap.settings.dispatch != DispatchMode::Enforced || snap.invalid.is_some() {
            return None;
        }
        let sd = self.state_dir.clone();
        {
            let _one = self.rollout.lock().await;
            let (sd2, st) = (sd.clone(), state.clone());
            let needs = blocking(move || -> anyhow::Result<bool> {
                sd2.ensure()?;
                let db = Db::open(&sd2.db_path())?;
                // A resume request is taken by `begin` too.
                Ok(crate::rollout::needs_start(&db, &st)?
                    || crate::rollout::resume_waiting(&db, &sd2)?)
            })
            .await;
            match needs {
                Ok(true) => {
                    let all = state.inventory_order();
                    match pass::plan_only(
                        &snap.settings,
                        state,
                        revision,
                        &sd,
                        all,
                        Some(&self.cache),
                    )
                    .await
                    {
                        Ok(prep) => {
                            let (sd2, st, rev) = (sd.clone(), state.clone(), revision.clone());
                            let begun = blocking(move || -> anyhow::Result<Vec<String>> {
                                let mut db = Db::open(&sd2.db_path())?;
                                let g = crate::rollout::begin(
                                    &mut db,
                                    &sd2,
                                    &spec,
                                    &st,
                                    (&prep, true),
                                    &rev,
                                    "controller",
                                    &crate::clock::now_rfc3339(),
                                )?;
                                Ok(g.snapshot().rollout.hosts.clone())
                            })
                            .await;
                            match begun {
                                Ok(hosts) => {
                                    tracing::info!(revision = %revision, hosts = hosts.len(), "rollout decided (started, continued or resumed)")
                                }
                                Err(e) => {
                                    tracing::error!(error = %format!("{e:#}"), "cannot start the rollout")
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot plan the fleet for a rollout")
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot read the rollout"),
            }
        }
        // Held, and its status says so: look again soon, without a probe.
        let h = host.to_string();
        blocking(move || {
            let record = crate::pass::current_rollout(&sd).ok().flatten()?;
            let now = crate::clock::now_rfc3339();
            let (reason, _) = record.hold(&h, &now)?;
            let told = sd
                .read_status(&h)
                .ok()
                .flatten()
                .and_then(|s| {
                    s.condition(crate::core::report::ConditionType::Converged)
                        .map(|c| c.reason == reason)
                })
                .unwrap_or(false);
            let retry_in = record
                .next_wave_at
                .as_deref()
                .and_then(|at| humantime::parse_rfc3339(at).ok())
                .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
                .unwrap_or(ROLLOUT_POLL)
                .clamp(Duration::from_millis(200), ROLLOUT_POLL);
            told.then_some(Verdict::Waiting { retry_in })
        })
        .await
    }
}

/// How often a host that the rollout holds is looked at again (no probe:
/// a read of the rollout's record).
const ROLLOUT_POLL: Duration = Duration::from_secs(2);

/// A pass's end in the metrics, from the report whose result (if any) was
/// just written: the host's outcome as in `result.json`, and a quiet pass
/// (nothing to do, no run recorded) as `NoChange`.
fn count_pass(m: &Metrics, host: &str, r: &PassReport) {
    let o = r
        .result
        .as_ref()
        .and_then(|res| res.host_outcomes.iter().find(|o| o.host == host));
    m.pass_ended(
        host,
        o.map(|o| o.outcome).unwrap_or(HostOutcomeKind::NoChange),
    );
    if let Some(o) = o {
        m.changed(host, o.corrective, o.intentional);
    }
    for (h, took) in &r.probed {
        m.probed(h, *took);
    }
    for (h, took) in &r.applied {
        m.applied(h, *took);
    }
    for (file, result) in &r.tokens {
        m.token(file, *result);
    }
}

fn log_run(host: &str, res: &RunResult) {
    for o in &res.host_outcomes {
        tracing::info!(
            %host,
            run_id = %res.run_id,
            trigger = ?res.operation_intent.trigger,
            outcome = ?o.outcome,
            steps = o.steps.iter().filter(|s| s.status == StepStatus::Succeeded).count(),
            "pass recorded"
        );
    }
}

/// What a recorded pass means for the error policy.
/// `rollouts`: dispatch is `enforced` and tend.yaml has a rollout (a host
/// it still counts on is looked at again soon).
fn verdict(host: &str, res: Option<&RunResult>, sd: &StateDir, rollouts: bool) -> Verdict {
    use HostOutcomeKind::*;
    let Some(o) = res.and_then(|r| r.host_outcomes.iter().find(|o| o.host == host)) else {
        // A quiet pass: converged, nothing to tell.
        return Verdict::Settled { awaiting: false };
    };
    match o.outcome {
        Completed | NoChange | Planned | EscalationRequired | PolicyBlocked => {
            let status = sd.read_status(host).ok().flatten();
            let held = status.as_ref().is_some_and(|s| {
                s.condition(crate::core::report::ConditionType::Converged)
                    .is_some_and(|c| c.reason == "RolloutWaiting" || c.reason == "RolloutHalted")
            });
            // Still pending in the rollout, whatever its status says (the
            // rollout may have moved on while the pass ran): not settled.
            let pending = || {
                rollouts
                    && crate::pass::current_rollout(sd)
                        .ok()
                        .flatten()
                        .is_some_and(|r| r.is_pending(host))
            };
            if o.outcome == Planned && (held || pending()) {
                // Its wave comes when other hosts finish: look again soon.
                return Verdict::Waiting {
                    retry_in: ROLLOUT_POLL,
                };
            }
            let awaiting = status.is_some_and(|s| s.awaiting_confirmation.is_some());
            Verdict::Settled { awaiting }
        }
        PartialSuccess | ExecutionFailed | TransportUnreachable | PreflightFailed
        | CapabilityMismatch => {
            let failed_step = o
                .steps
                .iter()
                .find(|s| s.status == StepStatus::Failed)
                .map(|s| s.id.clone());
            let message = o
                .last_failure_message
                .clone()
                .or_else(|| o.reason.clone())
                .unwrap_or_else(|| format!("{:?}", o.outcome));
            let class = o
                .last_failure_class
                .map(|c| c.as_str().to_string())
                .unwrap_or_default();
            Verdict::Failed {
                signature: format!(
                    "{:?}/{class}/{}",
                    o.outcome,
                    failed_step.as_deref().unwrap_or(&message)
                ),
                message,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::LogFormat;
    use crate::core::report::ExecutionOutcome;
    use crate::core::spec::TendConfig;

    fn real(dir: &std::path::Path) -> Real {
        let g = Global {
            dir: dir.join("desired"),
            state_dir: Some(dir.join("state")),
            json: false,
            verbose: 0,
            quiet: false,
            log_format: LogFormat::Human,
            color: crate::cli::ColorArg::Never,
        };
        let settings = Settings::resolve(&g, TendConfig::default(), None).unwrap();
        let sd = settings.state_dir().unwrap();
        let r = Real::new(g, settings, sd, Arc::new(Metrics::new("0", "test")));
        r.state_dir().ensure().unwrap();
        r
    }

    fn row(run_id: &str, host: &str) -> RunRow {
        RunRow {
            run_id: run_id.into(),
            started_at: "2026-12-03T10:00:00.000Z".into(),
            action: Action::Converge,
            trigger: Trigger::Resync,
            dispatch_mode: crate::core::spec::DispatchMode::Enforced,
            effective_mode: EffectiveMode::Quick,
            policy_outcome: PolicyOutcome::Approved,
            policy_reason: "planning".into(),
            desired_revision: "rev".into(),
            target_hosts: vec![host.into()],
        }
    }

    #[test]
    fn a_failed_pass_closes_the_run_it_began_and_no_other() {
        let tmp = tempfile::tempdir().unwrap();
        let r = real(tmp.path());
        let sd = r.state_dir().clone();
        let mut db = Db::open(&sd.db_path()).unwrap();
        db.begin_run(&row("r-20261203T100000Z-aaaa", "a")).unwrap();
        db.begin_run(&row("r-20261203T100000Z-bbbb", "b")).unwrap();
        drop(db);

        let id = r
            .inner
            .record_failed_pass("a", Trigger::Resync, "the pass panicked: boom")
            .unwrap();
        assert_eq!(id, "r-20261203T100000Z-aaaa");
        let db = Db::open(&sd.db_path()).unwrap();
        let open: Vec<String> = db
            .unfinished_runs()
            .unwrap()
            .into_iter()
            .map(|r| r.run.run_id)
            .collect();
        // The other host's pass may still be running: its run stays open.
        assert_eq!(open, vec!["r-20261203T100000Z-bbbb"]);
        let run = db.run(&id).unwrap().unwrap();
        assert_eq!(
            run.execution_outcome,
            Some(ExecutionOutcome::ExecutionFailed)
        );
        let result = sd.read_run_result(&id).unwrap().unwrap();
        let o = &result.host_outcomes[0];
        assert_eq!(o.outcome, HostOutcomeKind::ExecutionFailed);
        assert_eq!(
            o.last_failure_message.as_deref(),
            Some("the pass panicked: boom")
        );
        let s = sd.read_status("a").unwrap().unwrap();
        assert_eq!(s.last_run_id.as_deref(), Some(id.as_str()));
        let c = s.condition(ConditionType::Converged).unwrap();
        assert_eq!(c.status, ConditionStatus::False);
        assert_eq!(c.reason, "PassFailed");
        assert!(c.message.contains("boom"), "{}", c.message);
    }

    #[test]
    fn a_pass_that_failed_before_its_run_began_gets_a_failed_run() {
        let tmp = tempfile::tempdir().unwrap();
        let r = real(tmp.path());
        let sd = r.state_dir().clone();
        let id = r
            .inner
            .record_failed_pass("a", Trigger::Retry, "the pass panicked: early")
            .unwrap();
        let db = Db::open(&sd.db_path()).unwrap();
        assert!(db.unfinished_runs().unwrap().is_empty());
        let run = db.run(&id).unwrap().unwrap();
        assert_eq!(
            run.execution_outcome,
            Some(ExecutionOutcome::ExecutionFailed)
        );
        assert_eq!(run.run.target_hosts, vec!["a"]);
        assert_eq!(run.run.trigger, Trigger::Retry);
        let events: Vec<String> = db
            .events(&id)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(events, vec!["pass_failed"]);
        let result = sd.read_run_result(&id).unwrap().unwrap();
        assert_eq!(result.host_outcomes.len(), 1);
        assert_eq!(
            result.host_outcomes[0].last_failure_message.as_deref(),
            Some("the pass panicked: early")
        );
        let s = sd.read_status("a").unwrap().unwrap();
        assert_eq!(s.last_run_id.as_deref(), Some(id.as_str()));
    }
}
