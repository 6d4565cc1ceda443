//! Runs the approved parts of a plan: hosts concurrently (bounded by
//! `concurrency`), each host's steps in plan order, checking the kill switch
//! before every step, skipping the dependents of a failed step, stopping every
//! destructive step of the run after a destructive failure (fail fast), and
//! recording each attempt and its log as it happens.
//!
//! Invariant: a step runs only if policy allowed its class (non-destructive or
//! destructive) on its host, the mode dispatches to the host, the kill switch
//! is off, and every step it depends on succeeded; but a restart step (see
//! `core::plan`) runs once at least one of its triggers succeeded, and is
//! skipped when none did.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::apply::{self, PackageManager, RemoteCommand, UserFields};
use crate::clock::now_rfc3339;
use crate::core::diff::Action;
use crate::core::model::{DesiredState, Host, Resource};
use crate::core::outcome::{HostRun, StepResult};
use crate::core::plan::Step;
use crate::core::report::StepStatus;
use crate::core::retry::FailureClass;
use crate::core::spec::ResourceSpec;
use crate::reconcile::Prepared;
use crate::store::StateDir;
use crate::store::db::{Db, Record, StepAttemptRow};
use crate::transport::Transport;

/// Records a run's events to SQLite as they happen and keeps the timeline
/// for `timeline.jsonl`. Once a write fails the recorder is **broken**:
/// dispatch sends nothing more in this run (records first, then work).
pub struct Recorder {
    pub run_id: String,
    db: Mutex<Db>,
    timeline: Mutex<Vec<Value>>,
    broken: Mutex<Option<String>>,
    /// Sees every timeline line once it is recorded (`tend apply`'s live
    /// output).
    progress: Mutex<Option<Progress>>,
}

/// A watcher of the timeline as it is recorded: one call per event line.
pub type Progress = Box<dyn FnMut(&Value) + Send>;

impl Recorder {
    pub fn new(run_id: String, db: Db) -> Self {
        Recorder {
            run_id,
            db: Mutex::new(db),
            timeline: Mutex::new(Vec::new()),
            broken: Mutex::new(None),
            progress: Mutex::new(None),
        }
    }

    /// Call `p` with every timeline line recorded from now on.
    pub fn set_progress(&self, p: Progress) {
        *lock(&self.progress) = Some(p);
    }

    /// One event: to the database now, and to the timeline.
    pub fn event(&self, host: Option<&str>, kind: &str, detail: Value) {
        let _ = self.records(vec![Record::Event {
            at: now_rfc3339(),
            host: host.map(str::to_string),
            kind: kind.to_string(),
            detail,
        }]);
    }

    /// Write `records` in one transaction; their events join the timeline.
    /// A failure breaks the recorder (see [`Recorder::broken`]).
    pub fn records(&self, records: Vec<Record>) -> Result<(), String> {
        let written =
            crate::store::blocking(|| lock(&self.db).write_records(&self.run_id, &records));
        {
            let mut t = lock(&self.timeline);
            for r in records {
                if let Record::Event {
                    at,
                    host,
                    kind,
                    detail,
                } = r
                {
                    let mut line = json!({"at": at, "kind": kind, "host": host});
                    if let (Value::Object(l), Value::Object(d)) = (&mut line, detail) {
                        l.extend(d);
                    }
                    if let Some(p) = lock(&self.progress).as_mut() {
                        p(&line);
                    }
                    t.push(line);
                }
            }
        }
        written.map_err(|e| {
            let msg = format!("{e:#}");
            let mut broken = lock(&self.broken);
            if broken.is_none() {
                tracing::error!(error = %msg, "could not write a record; nothing more is dispatched in this run");
                *broken = Some(msg.clone());
            }
            msg
        })
    }

    /// Why no further work may be sent in this run: a record that could
    /// not be written.
    pub fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }

    pub fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        lock(&self.db)
    }

    pub fn take_timeline(&self) -> Vec<Value> {
        std::mem::take(&mut *lock(&self.timeline))
    }
}

/// A poisoned lock only means another thread panicked while holding it;
/// the data (a connection, a list) is still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Build the remote command for one step.
/// What building a host's step commands needs beyond the step and its
/// resource: facts from the probe, and settings.
#[derive(Clone, Debug)]
pub struct StepContext {
    /// The host's package manager, from the probe's facts.
    pub package_manager: Option<PackageManager>,
    /// `step_timeout`: a command without its own `timeout` runs under it.
    pub step_timeout: Duration,
}

/// How long the transport waits for a step: `step_timeout`, or for a
/// command, its own limit plus the time `timeout` needs to stop it and
/// report, so that the command's `timeout` fires first.
pub fn transport_timeout(r: Option<&Resource>, step_timeout: Duration) -> Duration {
    match r.map(|r| &r.spec) {
        Some(ResourceSpec::Command(c)) => {
            let limit = c.timeout.map(|t| t.0).unwrap_or(step_timeout);
            Duration::from_secs(
                apply::command::timeout_secs(limit) + apply::command::KILL_AFTER_SECS + 5,
            )
        }
        _ => step_timeout,
    }
}

fn package_manager(ctx: &StepContext) -> Result<PackageManager> {
    ctx.package_manager.ok_or_else(|| {
        anyhow!("the host has no package manager tend knows on PATH (apt-get, dnf or apk)")
    })
}

/// One call of the package manager for the package steps `steps` (all with
/// the same action) of `resources`.
pub fn package_command<'r>(
    steps: &[&Step],
    resource: impl Fn(&str) -> Option<&'r Resource>,
    ctx: &StepContext,
) -> Result<RemoteCommand> {
    let manager = package_manager(ctx)?;
    let mut names = Vec::with_capacity(steps.len());
    for step in steps {
        match resource(&step.id).map(|r| &r.spec) {
            Some(ResourceSpec::Package(p)) => names.push(p.name.as_str()),
            _ => return Err(anyhow!("`{}` is not a package resource", step.id)),
        }
    }
    // Bounded by step_timeout: a package manager waits for its lock (up to
    // two minutes) and for downloads.
    let bound = |c| apply::command::bounded(c, ctx.step_timeout);
    match steps.first().map(|s| s.action) {
        Some(Action::Create) => Ok(bound(apply::install_packages(manager, &names))),
        Some(Action::Delete) => Ok(bound(apply::remove_packages(manager, &names))),
        other => Err(anyhow!("no package command for {other:?}")),
    }
}

/// Build the remote command for one step.
pub fn command_for(step: &Step, r: &Resource, ctx: &StepContext) -> Result<RemoteCommand> {
    let content_changed = step.fields.iter().any(|f| f.field == "content");
    let changed = |field: &str| step.fields.iter().any(|f| f.field == field);
    // What the plan saw at a path: the builder checks on the host that it
    // is still what it may remove or replace (SPEC 8.1).
    let seen = step.path_seen().unwrap_or(apply::PathType::Nothing);
    let cmd = match (&r.spec, step.action) {
        (ResourceSpec::File(_), Action::Delete) => apply::remove_file(&path_of(r), seen),
        (ResourceSpec::Directory(_), Action::Delete) => apply::remove_directory(&path_of(r), seen),
        (ResourceSpec::Symlink(_), Action::Delete) => apply::remove_symlink(&path_of(r), seen),
        (ResourceSpec::File(s), Action::Create | Action::Update) => {
            if step.action == Action::Create || content_changed || step.replace {
                let empty = Vec::new();
                let bytes = r
                    .content
                    .as_ref()
                    .map(|c| c.bytes.as_slice())
                    .unwrap_or(&empty);
                apply::write_file_at(
                    &s.path,
                    bytes,
                    s.mode,
                    s.owner.as_deref(),
                    s.group.as_deref(),
                    seen,
                )
            } else {
                apply::set_meta(
                    &s.path,
                    s.mode,
                    s.owner.as_deref(),
                    s.group.as_deref(),
                    seen,
                )
            }
        }
        (ResourceSpec::Directory(s), Action::Create | Action::Update) => {
            if step.action == Action::Create || step.replace {
                apply::make_directory(
                    &s.path,
                    s.mode,
                    s.owner.as_deref(),
                    s.group.as_deref(),
                    seen,
                )
            } else {
                apply::set_meta(
                    &s.path,
                    s.mode,
                    s.owner.as_deref(),
                    s.group.as_deref(),
                    seen,
                )
            }
        }
        (ResourceSpec::Symlink(s), Action::Create | Action::Update) => {
            let target = s
                .target
                .as_deref()
                .ok_or_else(|| anyhow!("symlink `{}` has no target", r.id))?;
            apply::make_symlink(&s.path, target, seen)
        }
        (ResourceSpec::User(u), Action::Create) => apply::create_user(
            &u.name,
            UserFields {
                uid: u.uid,
                home: u.home.as_deref(),
                shell: u.shell.as_deref(),
                groups: (!u.groups.is_empty()).then_some(u.groups.as_slice()),
            },
            u.system,
        ),
        // Only what the diff found different.
        (ResourceSpec::User(u), Action::Update) => apply::modify_user(
            &u.name,
            UserFields {
                uid: u.uid.filter(|_| changed("uid")),
                home: u.home.as_deref().filter(|_| changed("home")),
                shell: u.shell.as_deref().filter(|_| changed("shell")),
                groups: Some(u.groups.as_slice()).filter(|_| changed("groups")),
            },
        ),
        (ResourceSpec::User(u), Action::Delete) => apply::delete_user(&u.name),
        (ResourceSpec::Group(g), Action::Create) => apply::create_group(&g.name, g.gid),
        (ResourceSpec::Group(g), Action::Update) => {
            let gid = g
                .gid
                .ok_or_else(|| anyhow!("group `{}` has no gid to set", r.id))?;
            apply::modify_group(&g.name, gid)
        }
        (ResourceSpec::Group(g), Action::Delete) => apply::delete_group(&g.name),
        (ResourceSpec::Package(_), Action::Create | Action::Delete) => {
            package_command(&[step], |id| (id == r.id).then_some(r), ctx)?
        }
        (ResourceSpec::Command(c), Action::Create) => apply::run_command(
            &c.run,
            c.creates.as_deref(),
            c.unless.as_deref(),
            c.timeout.map(|t| t.0).unwrap_or(ctx.step_timeout),
        ),
        (ResourceSpec::Service(s), Action::Update) if step.is_restart() => {
            apply::service::restart(&s.name, step.daemon_reload)
        }
        (ResourceSpec::Service(s), Action::Update | Action::Delete) => {
            // Only what the diff found different; a delete (teardown) turns
            // both off.
            let teardown = step.action == Action::Delete;
            let set = |field: &str, want: bool| changed(field).then_some(want && !teardown);
            apply::service::converge(
                &s.name,
                set("enabled", s.enabled),
                set("running", s.running),
                step.daemon_reload,
            )
        }
        _ => {
            return Err(anyhow!(
                "no applier for {} step on `{}` in this build",
                step.action.as_str(),
                r.id
            ));
        }
    };
    Ok(cmd)
}

fn path_of(r: &Resource) -> String {
    r.path().unwrap_or_default().to_string()
}

/// Dispatch options.
#[derive(Clone, Debug)]
pub struct DispatchOpts {
    pub step_timeout: Duration,
    pub concurrency: usize,
    pub state: StateDir,
    /// For the barrier re-probe before a host's first destructive step.
    pub probe: crate::reconcile::ProbeOpts,
    /// Set when the controller shuts down or `tend apply` gets SIGINT or
    /// SIGTERM: like the kill switch, dispatch stops before its next batch
    /// (the running one finishes or times out).
    pub stop: Option<Arc<AtomicBool>>,
    /// `step_output_limit`: bytes of a step's stdout (and stderr) kept.
    pub output_limit: u64,
    /// `retries` and `retry_backoff`, for transient failures of steps.
    pub retries: u32,
    pub backoff: Duration,
    /// Who takes the host lock (written on the host for whoever finds it
    /// busy): pid, command, state dir, controller host.
    pub holder: String,
    /// The desired revision recorded on each host this pass dispatches to.
    pub revision: String,
}

impl DispatchOpts {
    /// Why dispatch must stop before its next step, if it must: the kill
    /// switch (`kill_switch`) or a controller shutdown (`shutdown`). The
    /// word is the timeline event's kind.
    /// [`Self::halt`], and a host suspended since the pass began
    /// (`suspended`, SPEC 8.6).
    pub fn halt_host(&self, host: &str) -> Option<&'static str> {
        self.halt()
            .or_else(|| self.state.suspended(host).map(|_| "suspended"))
    }

    pub fn halt(&self) -> Option<&'static str> {
        if self.state.kill_switch_engaged() {
            Some("kill_switch")
        } else if self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            Some("shutdown")
        } else {
            None
        }
    }
}

/// What a rollout (SPEC 8.2) does around dispatch: which hosts go now,
/// whether a host may still start once its turn comes, the health command
/// after a host converged, and what to do when a host is done.
pub struct Hooks {
    /// Only these hosts are dispatched in this call, in this order (each
    /// takes its concurrency permit before the next one is considered).
    pub only: Vec<String>,
    /// Asked once a host has its concurrency permit: `Some(why)` holds it
    /// back (the failure budget is spent).
    pub before: Before,
    /// Run on the hosts in `health_for` whose every step succeeded.
    pub health: Option<(String, Duration)>,
    pub health_for: std::collections::BTreeSet<String>,
    /// Told when a host's pass (health included) is over.
    pub after: After,
    /// Shared by every call of one run: a destructive failure, or a stale
    /// plan at a barrier, stops every further destructive step of the run.
    pub flags: RunFlags,
}

/// [`Hooks::before`]: a host about to start; `Some(why)` holds it back.
pub type Before = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;
/// [`Hooks::after`]: a host's pass is over.
pub type After = Box<dyn Fn(&str, &HostRun) + Send + Sync>;

/// Flags that hold for a whole run, across dispatch calls.
#[derive(Clone, Default)]
pub struct RunFlags {
    pub destructive_failed: Arc<AtomicBool>,
    pub stale: Arc<AtomicBool>,
}

/// Execute every dispatched host of a prepared pass.
pub async fn execute(
    prep: &Prepared,
    desired: &DesiredState,
    opts: &DispatchOpts,
    rec: Arc<Recorder>,
) -> BTreeMap<String, HostRun> {
    execute_with(prep, desired, opts, rec, None).await
}

/// [`execute`], for the hosts and with the hooks of a rollout's wave.
pub async fn execute_with(
    prep: &Prepared,
    desired: &DesiredState,
    opts: &DispatchOpts,
    rec: Arc<Recorder>,
    hooks: Option<Arc<Hooks>>,
) -> BTreeMap<String, HostRun> {
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let flags = hooks.as_ref().map(|h| h.flags.clone()).unwrap_or_default();
    let destructive_failed = flags.destructive_failed;
    let stale = flags.stale;
    let mut set = JoinSet::new();
    let mut runs = BTreeMap::new();
    let decisions: Vec<&crate::core::policy::HostDecision> = match &hooks {
        None => prep.decision.hosts.iter().collect(),
        Some(h) => h
            .only
            .iter()
            .filter_map(|name| prep.decision.hosts.iter().find(|d| &d.host == name))
            .collect(),
    };
    for d in decisions {
        let Some(hp) = prep.plan.host(&d.host) else {
            continue;
        };
        let Some(transport) = prep.transports.get(&d.host).cloned() else {
            continue;
        };
        if !d.dispatch || !hp.has_changes() {
            continue;
        }
        let host = desired.hosts[&d.host].clone();
        let steps = hp.steps.clone();
        let ctx = StepContext {
            package_manager: prep
                .probes
                .get(&d.host)
                .and_then(|p| p.result.as_ref().ok())
                .and_then(|a| a.facts.package_manager.as_deref())
                .and_then(PackageManager::from_fact),
            step_timeout: opts.step_timeout,
        };
        let seen = prep
            .probes
            .get(&d.host)
            .and_then(|p| p.result.as_ref().ok())
            .and_then(|a| a.facts.revision.clone())
            .unwrap_or_default();
        let (allow_nd, allow_d) = (d.allow_nondestructive, d.allow_destructive);
        let (sem, rec, opts, fail_fast, stale) = (
            sem.clone(),
            rec.clone(),
            opts.clone(),
            destructive_failed.clone(),
            stale.clone(),
        );
        let name = host.inv.name.clone();
        let n = steps.len();
        let hooks = hooks.clone();
        let health_transport = transport.clone();
        let health_rec = rec.clone();
        // Under a rollout, hosts start in its order: the permit is taken
        // here, so that the budget is checked before each next host starts.
        let early = match &hooks {
            Some(_) => sem.clone().acquire_owned().await.ok(),
            None => None,
        };
        set.spawn(async move {
            let _permit = match early {
                Some(p) => Ok(p),
                None => sem.acquire_owned().await,
            };
            if let Some(why) = hooks.as_ref().and_then(|h| (h.before)(&name)) {
                let run = HostRun {
                    steps: vec![StepResult::not_run(false); n],
                    held_back: Some(why),
                    ..HostRun::default()
                };
                if let Some(h) = &hooks {
                    (h.after)(&name, &run);
                }
                return (name, run);
            }
            // The host's work in a task of its own: a panic in it becomes
            // this host's failed steps, never the whole run's.
            let worker = tokio::spawn(async move {
                run_host(
                    &host,
                    &steps,
                    &seen,
                    (allow_nd, allow_d),
                    &ctx,
                    transport,
                    &opts,
                    &rec,
                    (&fail_fast, &stale),
                )
                .await
            });
            let run = worker.await.unwrap_or_else(|e| {
                let msg = format!("dispatch of this host failed: {e}");
                tracing::error!(error = %msg, "dispatch task failed");
                let mut failed = StepResult::not_run(false);
                failed.status = StepStatus::Failed;
                failed.failure = Some((FailureClass::Execution, msg));
                HostRun {
                    dispatched: true,
                    steps: vec![failed; n],
                    ..HostRun::default()
                }
            });
            let mut run = run;
            if let Some(h) = &hooks {
                let converged = run.held_back.is_none()
                    && !run.steps.is_empty()
                    && run.steps.iter().all(|s| s.status == StepStatus::Succeeded);
                if let (Some((cmd, timeout)), true) =
                    (&h.health, converged && h.health_for.contains(&name))
                {
                    run.health =
                        Some(run_health(&name, cmd, *timeout, health_transport, &health_rec).await);
                }
                (h.after)(&name, &run);
            }
            (name, run)
        });
    }
    while let Some(joined) = set.join_next().await {
        // The task above does not panic: its one fallible await is caught.
        if let Ok((name, run)) = joined {
            runs.insert(name, run);
        }
    }
    runs
}

/// What a step did on the host: exit status and output, or why it could not
/// be run at all.
type StepExec = Result<crate::transport::ExecOutput, crate::transport::TransportError>;

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn run_host(
    h: &Host,
    steps: &[Step],
    seen_revision: &str,
    (allow_nd, allow_d): (bool, bool),
    ctx: &StepContext,
    transport: Arc<dyn Transport>,
    opts: &DispatchOpts,
    rec: &Arc<Recorder>,
    (fail_fast, stale): (&AtomicBool, &AtomicBool),
) -> HostRun {
    let (host, resources) = (h.name(), &h.resources[..]);
    let mut barrier_passed = false;
    let n = steps.len();
    let mut res: Vec<Option<StepResult>> = vec![None; n];
    let mut killed = false;
    let mut dispatched = false;
    // Attempts recorded per step so far in this run.
    let mut prior = vec![0u32; n];
    // The host lock (SPEC 8.7), taken before the first command that acts on
    // the host and held to the end: `Some` once taken.
    let mut lock = HostLock::default();
    rec.event(Some(host), "host_dispatch_started", json!({"steps": n}));
    // Gate the steps in plan order. Non-destructive steps that may run are
    // collected into one batch (one remote command); a destructive step runs
    // on its own, after the batch before it, and so does the batch before a
    // restart step whose triggers are in it (the restart needs their real
    // results). When a batch stops at a failed step, the steps after it are
    // gated again: dependents are skipped, the rest go into the next batch.
    // Guarded writes (SPEC 8.7) and every step after one wait until the
    // rest of the host has run: then the writes go out in a batch of their
    // own under their guards, and their restarts after them.
    let mut deferred = deferred_steps(steps);
    let mut guards_done = !deferred.contains(&true);
    let mut next = 0;
    loop {
        while next < n {
            let mut batch: Vec<usize> = Vec::new();
            let mut j = next;
            while j < n {
                if res[j].is_some() || deferred[j] {
                    j += 1;
                    continue;
                }
                let step = &steps[j];
                let allowed = if step.destructive { allow_d } else { allow_nd };
                match gate(step, allowed, &res, &batch) {
                    Gate::Decided(r) => {
                        res[j] = Some(r);
                        j += 1;
                        continue;
                    }
                    // A restart whose triggers are in the batch: run the batch
                    // first, then gate it again on their real results.
                    Gate::Flush => break,
                    Gate::Run => {}
                }
                if !step.destructive {
                    batch.push(j);
                    j += 1;
                    continue;
                }
                // A destructive step: run what is batched first.
                if !batch.is_empty() {
                    break;
                }
                res[j] = Some(if let Some(why) = opts.halt_host(host) {
                    killed = true;
                    rec.event(Some(host), why, json!({"step": step.index, "id": step.id}));
                    StepResult::not_run(false)
                } else if let Some(e) = rec.broken() {
                    unrecorded(&e)
                } else if fail_fast.load(Ordering::SeqCst) {
                    let mut r = StepResult::not_run(false);
                    r.failure = Some((
                        FailureClass::Execution,
                        "a destructive step failed earlier in this run (fail fast)".into(),
                    ));
                    r
                } else if stale.load(Ordering::SeqCst) {
                    let mut r = StepResult::not_run(false);
                    r.failure = Some((
                    FailureClass::Policy,
                    "the plan went stale at a barrier re-probe in this run; nothing destructive runs".into(),
                ));
                    r
                } else if let Err(r) =
                    hold_lock(host, &mut lock, seen_revision, &transport, opts, rec).await
                {
                    r
                } else if !barrier_passed
                    && let Err(why) = barrier(h, steps, transport.clone(), opts).await
                {
                    stale.store(true, Ordering::SeqCst);
                    rec.event(Some(host), "barrier_stale", json!({"reason": why}));
                    let mut r = StepResult::not_run(false);
                    r.failure = Some((FailureClass::Policy, why));
                    r
                } else {
                    barrier_passed = true;
                    dispatched = true;
                    let (mut ran, halted) = run_batch(
                        host,
                        resources,
                        steps,
                        &[j],
                        ctx,
                        transport.clone(),
                        opts,
                        rec,
                        &mut prior,
                    )
                    .await;
                    killed |= halted.is_some();
                    let r = ran
                        .pop()
                        .map(|(_, r)| r)
                        .unwrap_or_else(|| StepResult::not_run(false));
                    if r.status == StepStatus::Failed {
                        fail_fast.store(true, Ordering::SeqCst);
                    }
                    r
                });
                j += 1;
            }
            if !batch.is_empty() {
                if let Some(why) = opts.halt_host(host) {
                    killed = true;
                    rec.event(
                        Some(host),
                        why,
                        json!({"step": steps[batch[0]].index, "id": steps[batch[0]].id}),
                    );
                    for &k in &batch {
                        res[k] = Some(StepResult::not_run(false));
                    }
                } else if let Some(e) = rec.broken() {
                    for &k in &batch {
                        res[k] = Some(unrecorded(&e));
                    }
                } else if let Err(r) =
                    hold_lock(host, &mut lock, seen_revision, &transport, opts, rec).await
                {
                    for &k in &batch {
                        res[k] = Some(r.clone());
                    }
                } else {
                    dispatched = true;
                    let (ran, halted) = run_batch(
                        host,
                        resources,
                        steps,
                        &batch,
                        ctx,
                        transport.clone(),
                        opts,
                        rec,
                        &mut prior,
                    )
                    .await;
                    killed |= halted.is_some();
                    for (k, r) in ran {
                        res[k] = Some(r);
                    }
                }
            }
            next = (0..n)
                .find(|&k| res[k].is_none() && !deferred[k])
                .unwrap_or(n);
        }
        if guards_done {
            break;
        }
        guards_done = true;
        let mut go = Vec::new();
        let guarded: Vec<usize> = (0..n)
            .filter(|&k| steps[k].guard.is_some() && res[k].is_none())
            .collect();
        for k in guarded {
            let step = &steps[k];
            let allowed = if step.destructive { allow_d } else { allow_nd };
            match gate(step, allowed, &res, &[]) {
                Gate::Decided(r) => res[k] = Some(r),
                Gate::Flush => res[k] = Some(StepResult::not_run(false)),
                Gate::Run if step.guard.is_some_and(|g| g.reverted) => {
                    let mut r = StepResult::not_run(false);
                    r.failure = Some((FailureClass::Policy, GUARD_HELD.into()));
                    res[k] = Some(r);
                }
                Gate::Run if step.destructive => {
                    res[k] = Some(guard_failed(
                    host,
                    step,
                    "a guarded write that replaces another kind of object is refused: remove that object first".into(),
                    rec,
                ));
                }
                Gate::Run => go.push(k),
            }
        }
        if !go.is_empty() {
            let blocked = if let Some(why) = opts.halt_host(host) {
                killed = true;
                rec.event(
                    Some(host),
                    why,
                    json!({"step": steps[go[0]].index, "id": steps[go[0]].id}),
                );
                Some(StepResult::not_run(false))
            } else if let Some(e) = rec.broken() {
                Some(unrecorded(&e))
            } else {
                hold_lock(host, &mut lock, seen_revision, &transport, opts, rec)
                    .await
                    .err()
            };
            match blocked {
                Some(r) => {
                    for &k in &go {
                        res[k] = Some(r.clone());
                    }
                }
                None => {
                    dispatched = true;
                    killed |= guarded_batch(
                        h,
                        steps,
                        &go,
                        (allow_nd, ctx),
                        &transport,
                        opts,
                        rec,
                        &mut prior,
                        &mut lock,
                        &mut res,
                    )
                    .await;
                }
            }
        }
        deferred = vec![false; n];
        next = res.iter().position(Option::is_none).unwrap_or(n);
    }
    if let Some(held) = lock.held.take() {
        // Closing the lock command may wait on a dead connection.
        let _ = tokio::task::spawn_blocking(move || drop(held)).await;
        rec.event(Some(host), "host_lock_released", json!({}));
    }
    rec.event(
        Some(host),
        "host_dispatch_finished",
        json!({"killed": killed}),
    );
    HostRun {
        dispatched,
        steps: res
            .into_iter()
            .map(|r| r.expect("every step decided"))
            .collect(),
        killed,
        held_back: lock.out,
        health: None,
    }
}

/// Why a guarded write is not applied again (SPEC 8.7, `GuardReverted`).
pub const GUARD_HELD: &str = "held: its connection guard reverted this definition on the host (GuardReverted); change the definition to apply it again";

/// The guarded writes (SPEC 8.7) and every step that depends on one: they
/// run after the rest of the host. Plan order keeps a step's predecessors
/// before it, so one pass in order finds them all.
fn deferred_steps(steps: &[Step]) -> Vec<bool> {
    let mut out = vec![false; steps.len()];
    for (k, s) in steps.iter().enumerate() {
        out[k] = s.guard.is_some() || s.after.iter().any(|&a| out.get(a) == Some(&true));
    }
    out
}

fn guard_failed(host: &str, step: &Step, msg: String, rec: &Recorder) -> StepResult {
    let mut r = failed_before_start(host, step, msg, rec);
    if let Some((class, _)) = r.failure.as_mut() {
        *class = FailureClass::Execution;
    }
    r
}

/// Run the guarded writes `go` of a host under their connection guards
/// (SPEC 8.7): arm each guard (recorded first), send the writes in one
/// batch and then the restarts they trigger, over the host's session;
/// then reach the host over a NEW connection, probe it and disarm. When
/// the host cannot be reached in time, the host lock is let go (the
/// revert takes it), and the guards' fates are learnt once their time is
/// up. Returns whether the kill switch or a stop halted a batch.
#[allow(clippy::too_many_arguments)] // one call site
async fn guarded_batch(
    h: &Host,
    steps: &[Step],
    go: &[usize],
    (allow_nd, ctx): (bool, &StepContext),
    transport: &Arc<dyn Transport>,
    opts: &DispatchOpts,
    rec: &Arc<Recorder>,
    prior: &mut [u32],
    lock: &mut HostLock,
    res: &mut [Option<StepResult>],
) -> bool {
    let (host, resources) = (h.name(), &h.resources[..]);
    let n = steps.len();
    let restarts: Vec<usize> = (0..n)
        .filter(|&k| {
            res[k].is_none()
                && steps[k].is_restart()
                && steps[k].triggers.iter().any(|t| go.contains(t))
        })
        .collect();
    let unit_of = |k: usize| {
        resources.iter().find_map(|r| match &r.spec {
            ResourceSpec::Service(s) if r.id == steps[k].id => {
                Some(crate::core::model::unit_name(&s.name))
            }
            _ => None,
        })
    };
    let mut armed = Vec::new();
    for &k in go {
        let step = &steps[k];
        let Some(r) = resources.iter().find(|r| r.id == step.id) else {
            res[k] = Some(guard_failed(
                host,
                step,
                "the resource vanished from the desired state".into(),
                rec,
            ));
            continue;
        };
        let units: Vec<String> = restarts
            .iter()
            .filter(|&&x| steps[x].triggers.contains(&k))
            .filter_map(|&x| unit_of(x))
            .collect();
        let secs = step.guard.map(|g| g.revert_after_secs).unwrap_or(60);
        match crate::guard::arm(
            host,
            k,
            &step.id,
            &r.definition_digest(),
            r.path().unwrap_or_default(),
            secs,
            &units,
            transport,
            opts.probe.timeout,
            (&rec.run_id, rec.as_ref()),
        )
        .await
        {
            Ok(row) => armed.push((k, row)),
            Err(why) => res[k] = Some(guard_failed(host, step, why, rec)),
        }
    }
    if armed.is_empty() {
        return false;
    }
    let writes: Vec<usize> = armed.iter().map(|(k, _)| *k).collect();
    let (ran, mut halted) = run_batch(
        host,
        resources,
        steps,
        &writes,
        ctx,
        transport.clone(),
        opts,
        rec,
        prior,
    )
    .await;
    for (k, r) in ran {
        res[k] = Some(r);
    }
    let mut again = Vec::new();
    for &x in &restarts {
        match gate(&steps[x], allow_nd, res, &[]) {
            Gate::Decided(r) => res[x] = Some(r),
            Gate::Flush => res[x] = Some(StepResult::not_run(false)),
            Gate::Run if halted.is_some() => res[x] = Some(StepResult::not_run(false)),
            Gate::Run => again.push(x),
        }
    }
    if !again.is_empty() {
        let (ran, h2) = run_batch(
            host,
            resources,
            steps,
            &again,
            ctx,
            transport.clone(),
            opts,
            rec,
            prior,
        )
        .await;
        halted = halted.or(h2);
        for (k, r) in ran {
            res[k] = Some(r);
        }
    }
    let rows: Vec<crate::store::db::GuardRow> = armed.iter().map(|(_, g)| g.clone()).collect();
    let fates = match crate::guard::confirm(h, &rows, &opts.probe, rec.as_ref()).await {
        Some(f) => f,
        None => {
            // The revert takes the host lock: let it go, and run nothing
            // more on this host in this run.
            if let Some(held) = lock.held.take() {
                let _ = tokio::task::spawn_blocking(move || drop(held)).await;
                rec.event(
                    Some(host),
                    "host_lock_released",
                    json!({"for": "guard_revert"}),
                );
            }
            let mut r = StepResult::not_run(false);
            r.failure = Some((
                FailureClass::Transient,
                "the host could not be reached after a guarded change; nothing more runs on it in this run".into(),
            ));
            lock.failed = Some(r);
            crate::guard::await_revert(h, &rows, &opts.probe, rec.as_ref()).await
        }
    };
    for ((k, _), fate) in armed.iter().zip(fates) {
        use crate::guard::Fate;
        let msg = match fate {
            Fate::Disarmed => continue,
            Fate::Reverted => crate::guard::REVERTED.to_string(),
            Fate::Unknown(why) => format!(
                "connection guard: tend could not learn whether the host kept or reverted the change ({why}); the next pass waits for it and settles it"
            ),
        };
        let prev = res[*k].take().unwrap_or_else(|| StepResult::not_run(false));
        rec.event(
            Some(host),
            "step_finished",
            json!({"step": steps[*k].index, "id": steps[*k].id, "status": "failed", "error": msg}),
        );
        res[*k] = Some(StepResult {
            status: StepStatus::Failed,
            failure: Some((FailureClass::Execution, msg)),
            ..prev
        });
    }
    halted.is_some()
}

/// The rollout's health command on a host that converged (SPEC 8.2):
/// `Err` with what it said when it exits non-zero or times out.
pub async fn run_health(
    host: &str,
    cmd: &str,
    timeout: Duration,
    transport: Arc<dyn Transport>,
    rec: &Arc<Recorder>,
) -> Result<(), String> {
    rec.event(Some(host), "health_started", json!({"command": cmd}));
    let script = format!(
        "timeout {} sh -c {} 2>&1",
        timeout.as_secs().max(1),
        crate::shell::quote(cmd)
    );
    let t = transport.clone();
    let out = tokio::task::spawn_blocking(move || {
        t.exec(&script, b"", timeout + Duration::from_secs(10))
    })
    .await
    .unwrap_or_else(|e| {
        Err(crate::transport::TransportError::new(
            FailureClass::Execution,
            format!("the health check task failed: {e}"),
        ))
    });
    let verdict = match out {
        Ok(o) if o.status == 0 => Ok(()),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let tail: String = text
                .trim()
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(if o.status == 124 {
                format!(
                    "`{cmd}` timed out after {}",
                    humantime::format_duration(timeout)
                )
            } else {
                format!(
                    "`{cmd}` exited {}{}",
                    o.status,
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {tail}")
                    }
                )
            })
        }
        Err(e) => Err(format!("`{cmd}` could not run: {}", e.message)),
    };
    rec.event(
        Some(host),
        "health_finished",
        json!({"ok": verdict.is_ok(), "message": verdict.as_ref().err()}),
    );
    verdict
}

/// The host lock of one host's dispatch.
#[derive(Default)]
struct HostLock {
    held: Option<Box<dyn crate::transport::Held>>,
    /// Someone else holds it: why the host is not dispatched.
    out: Option<String>,
    /// It could not be taken, or was lost: the result of every step left.
    failed: Option<StepResult>,
}

/// Whether `pid` is a running tend on this machine.
fn tend_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_end().starts_with("tend"))
}

/// Take the host lock before the first command that acts on the host, or
/// check that it is still held (SPEC 8.7). `Err` is the result of every
/// step that must not run: not run, and `locked_out` set, when someone else
/// holds the lock or the revision on the host moved since the probe (the
/// host is `Planned`, tried again at the next pass); failed when the lock
/// could not be taken or was lost.
async fn hold_lock(
    host: &str,
    lock: &mut HostLock,
    seen_revision: &str,
    transport: &Arc<dyn Transport>,
    opts: &DispatchOpts,
    rec: &Arc<Recorder>,
) -> Result<(), StepResult> {
    if lock.out.is_some() {
        return Err(StepResult::not_run(false));
    }
    if let Some(r) = &lock.failed {
        return Err(r.clone());
    }
    let mut failed = |class: FailureClass, msg: String| {
        let mut r = StepResult::not_run(false);
        r.failure = Some((class, msg));
        lock.failed = Some(r.clone());
        r
    };
    if let Some(held) = lock.held.as_mut() {
        if held.alive() {
            return Ok(());
        }
        lock.held = None;
        rec.event(Some(host), "host_lock_lost", json!({}));
        return Err(failed(
            FailureClass::Transient,
            "the host lock was lost (its connection ended); nothing more runs on this host in this run".into(),
        ));
    }
    use crate::apply::lock::{Holder, Reply};
    let take = |stale: Option<String>| {
        let script = crate::apply::lock::script(
            &opts.holder,
            seen_revision,
            &opts.revision,
            stale.as_deref(),
        );
        let t = transport.clone();
        let wait = opts.probe.timeout + Duration::from_secs(crate::apply::lock::LOCK_WAIT_SECS);
        async move {
            tokio::task::spawn_blocking(move || t.hold(&script, wait))
                .await
                .unwrap_or_else(|e| {
                    Err(crate::transport::TransportError::new(
                        FailureClass::Execution,
                        format!("taking the host lock failed: {e}"),
                    ))
                })
        }
    };
    let mut taken = take(None).await;
    // A holder that is certainly gone (its tend died, or this controller's
    // own earlier pass lost its connection to a network cut the host never
    // noticed) would keep the host locked until the host's TCP stack gives
    // up on the connection, hours later: its shell is stopped, and the lock
    // taken. Steps still running from that pass hold the step lock, which
    // every batch waits for.
    if let Ok((line, _)) = &taken
        && let Reply::Busy(text) = crate::apply::lock::parse(line)
        && let (Some(h), Some(me)) = (Holder::parse(&text), Holder::parse(&opts.holder))
        && h.stale(&me, tend_running)
    {
        if let Ok((_, held)) = taken {
            let _ = tokio::task::spawn_blocking(move || drop(held)).await;
        }
        taken = take(Some(text.clone())).await;
        if let Ok((line, _)) = &taken
            && crate::apply::lock::parse(line) == Reply::Locked
        {
            rec.event(Some(host), "host_lock_broken", json!({"holder": text}));
            tracing::warn!(%host, holder = %text, "took the host lock from a holder that is gone");
        }
    }
    match taken {
        Ok((line, held)) => match crate::apply::lock::parse(&line) {
            Reply::Locked => {
                rec.event(
                    Some(host),
                    "host_locked",
                    json!({"revision": opts.revision}),
                );
                lock.held = Some(held);
                Ok(())
            }
            other => {
                let _ = tokio::task::spawn_blocking(move || drop(held)).await;
                let (kind, msg) = match other {
                    Reply::Busy(holder) => (
                        "host_lock_busy",
                        format!(
                            "host lock held by someone else ({holder}); not dispatched in this pass, tried again at the next"
                        ),
                    ),
                    Reply::Moved(now) => (
                        "host_lock_busy",
                        format!(
                            "the revision recorded on the host changed since the probe (from {} to {}): another apply ran; planned again at the next pass",
                            or_none(seen_revision),
                            or_none(&now)
                        ),
                    ),
                    Reply::Error(why) => {
                        rec.event(Some(host), "host_lock_failed", json!({"reason": why}));
                        return Err(failed(
                            FailureClass::Execution,
                            format!("cannot take the host lock: {why}"),
                        ));
                    }
                    Reply::Locked => unreachable!("handled above"),
                };
                rec.event(Some(host), kind, json!({"reason": msg}));
                lock.out = Some(msg);
                Err(StepResult::not_run(false))
            }
        },
        Err(e) => {
            rec.event(
                Some(host),
                "host_lock_failed",
                json!({"class": e.class.as_str(), "reason": e.message}),
            );
            Err(failed(
                e.class,
                format!("cannot take the host lock: {}", e.message),
            ))
        }
    }
}

fn or_none(r: &str) -> &str {
    if r.is_empty() { "none" } else { r }
}

/// A step not sent because a record of this run could not be written.
fn unrecorded(why: &str) -> StepResult {
    let mut r = StepResult::not_run(false);
    r.failure = Some((
        FailureClass::Execution,
        format!(
            "not sent: a record of this run could not be written ({why}); records come before work"
        ),
    ));
    r
}

/// What the gating loop does with a step that has no result yet.
#[derive(Debug, PartialEq)]
enum Gate {
    /// It does not run: this is its result.
    Decided(StepResult),
    /// It needs the real results of steps in the batch: run the batch first.
    Flush,
    /// It may run (in the batch, or on its own when destructive).
    Run,
}

/// Gates one step on its policy class and on the results so far (`res`, by
/// step index); steps in `batch` have no result yet. For an ordinary step,
/// the steps in the batch count as succeeding: a batch stops at the first
/// failure, so nothing after a failed step runs. A restart step needs the
/// real results of its triggers (see [`restart_gate`]), so it flushes a
/// batch that holds one of them.
fn gate(step: &Step, allowed: bool, res: &[Option<StepResult>], batch: &[usize]) -> Gate {
    if !allowed {
        return Gate::Decided(StepResult::not_run(true));
    }
    if step.is_restart() {
        if step
            .triggers
            .iter()
            .any(|&t| res[t].is_none() && batch.contains(&t))
        {
            return Gate::Flush;
        }
        // Every trigger comes earlier in plan order, so every one has a
        // result here; a missing one would count as not run.
        let pending = StepResult::not_run(false);
        let triggers: Vec<&StepResult> = step
            .triggers
            .iter()
            .map(|&t| res[t].as_ref().unwrap_or(&pending))
            .collect();
        return match restart_gate(&triggers) {
            Some(r) => Gate::Decided(r),
            None => Gate::Run,
        };
    }
    let deps: Vec<StepStatus> = step
        .after
        .iter()
        .map(|&a| match &res[a] {
            Some(r) => r.status,
            None if batch.contains(&a) => StepStatus::Succeeded,
            None => StepStatus::NotRun,
        })
        .collect();
    if deps
        .iter()
        .any(|s| matches!(s, StepStatus::Failed | StepStatus::Skipped))
    {
        let mut r = StepResult::not_run(false);
        r.status = StepStatus::Skipped;
        r.failure = Some((
            FailureClass::Execution,
            "a step it depends on failed".into(),
        ));
        Gate::Decided(r)
    } else if deps.contains(&StepStatus::NotRun) {
        Gate::Decided(StepResult::not_run(res.iter().flatten().any(|s| s.held)))
    } else {
        Gate::Run
    }
}

/// A restart step, given the results of its triggers: its result when it
/// must not run, or None when it may (at least one trigger succeeded,
/// whatever the others did). When none succeeded it is skipped, unless one
/// was not run (held for a token, or stopped by the kill switch: the change
/// may still come), which leaves it not run too, held if a trigger is.
fn restart_gate(triggers: &[&StepResult]) -> Option<StepResult> {
    // An owed restart with nothing to restart on in this pass: it runs.
    if triggers.is_empty() {
        return None;
    }
    if triggers.iter().any(|t| t.status == StepStatus::Succeeded) {
        return None;
    }
    if triggers.iter().any(|t| t.status == StepStatus::NotRun) {
        return Some(StepResult::not_run(triggers.iter().any(|t| t.held)));
    }
    let mut r = StepResult::not_run(false);
    r.status = StepStatus::Skipped;
    r.failure = Some((
        FailureClass::Execution,
        "none of the steps it restarts on succeeded, so nothing changed to restart for".into(),
    ));
    Some(r)
}

/// The barrier before a host's first destructive step: probe the host again,
/// plan it again, and require exactly the same destructive steps as the plan
/// being executed (so the operation, and the token that covers it, still
/// describe what will be destroyed). Any difference, or a failed probe, is a
/// stale plan.
async fn barrier(
    h: &Host,
    steps: &[Step],
    transport: Arc<dyn Transport>,
    opts: &DispatchOpts,
) -> Result<(), String> {
    // Never from the hash cache (SPEC 8.1): what is destroyed next must be
    // what the token's fingerprint describes, as the host has it now.
    let fresh = crate::reconcile::ProbeOpts {
        hash_cache: crate::probe::HashCache::Off,
        ..opts.probe.clone()
    };
    let probe = crate::reconcile::probe_host(h, transport, &fresh).await;
    let actual = probe
        .result
        .map_err(|(_, m)| format!("stale plan: the barrier re-probe failed: {m}"))?;
    let fresh = crate::core::plan::plan_host(h, &crate::core::diff::diff_host(h, &actual));
    let key = |s: &Step| (s.id.clone(), s.action);
    let want: Vec<_> = steps.iter().filter(|s| s.destructive).map(key).collect();
    let got: Vec<_> = fresh
        .steps
        .iter()
        .filter(|s| s.destructive)
        .map(key)
        .collect();
    if want == got {
        // The same steps: each must still act on the object as approved
        // (SPEC 8.1): a file whose content changed, a file added deep in a
        // directory to remove, a package upgraded.
        let planned = steps.iter().filter(|s| s.destructive);
        let now = fresh.steps.iter().filter(|s| s.destructive);
        for (p, n) in planned.zip(now) {
            let (a, b) = (
                crate::core::plan::operation_item(h.name(), p),
                crate::core::plan::operation_item(h.name(), n),
            );
            if a != b {
                return Err(format!(
                    "stale plan: at the barrier, `{}` on host `{}` is not the object the plan saw (planned {} of {}, now {} of {}); nothing destructive runs in this run",
                    p.id,
                    h.name(),
                    a["change"],
                    a["observed"],
                    b["change"],
                    b["observed"],
                ));
            }
        }
        Ok(())
    } else {
        Err(format!(
            "stale plan: at the barrier, host `{}` has destructive steps [{}] instead of the planned [{}]; nothing destructive runs in this run",
            h.name(),
            got.iter()
                .map(|(i, a)| format!("{} {i}", a.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            want.iter()
                .map(|(i, a)| format!("{} {i}", a.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }
}

/// The most script one batch carries. The batch travels on stdin, so no
/// channel request or argv limit applies; this bounds memory and how much
/// one attempt holds.
const MAX_BATCH_SCRIPT: usize = 4 * 1024 * 1024;

/// The most package-name bytes one package-manager call carries. A package
/// step's script runs under `timeout ... sh -c "$script"`, one argument of
/// an exec, which Linux caps at 128 KiB: a longer list of adjacent package
/// steps is cut into several calls.
const MAX_PACKAGE_CALL: usize = 32 * 1024;

/// The steps of the unit that opens `rest` (indices into `steps`): one
/// step, or the adjacent package steps of its action and wave, up to
/// [`MAX_PACKAGE_CALL`] bytes of names.
fn unit_members(steps: &[Step], rest: &[usize]) -> Vec<usize> {
    let Some(&k) = rest.first() else {
        return Vec::new();
    };
    let step = &steps[k];
    let mut members = vec![k];
    if step.kind != "package" {
        return members;
    }
    // The id (`package:NAME`) is longer than the quoted name.
    let mut bytes = step.id.len();
    for &next in &rest[1..] {
        let n = &steps[next];
        if n.kind != "package" || n.action != step.action || n.wave != step.wave {
            break;
        }
        if bytes + n.id.len() + 1 > MAX_PACKAGE_CALL {
            break;
        }
        bytes += n.id.len() + 1;
        members.push(next);
    }
    members
}

/// One unit of a batch: its member steps (several package steps share one
/// manager call), its command, and how long the transport waits for it.
struct Unit {
    members: Vec<usize>,
    cmd: RemoteCommand,
    wait: Duration,
}

/// Whether running a step again is safe when an attempt may have started
/// (SPEC 8.3; the table is `apply::is_idempotent`). A command or a service
/// action that may have started is never sent again in the run.
pub fn step_idempotent(step: &Step) -> bool {
    apply::is_idempotent(step.kind, step.action)
}

/// Run steps `batch` (indices into `steps`, in order) in one remote command;
/// the results of the steps that ran (at least the first one), and whether
/// the kill switch or a shutdown stopped it between attempts. Adjacent
/// package steps with the same action share ONE package-manager call (one
/// unit of the batch). A step whose command cannot be built fails on its
/// own and ends the batch before it.
///
/// Records first: every attempt is recorded as sent before its command
/// goes out; each step's start and end are recorded as the host reports
/// them. A transient failure is retried (up to `retries`, with backoff)
/// from the first unfinished unit when it had not started or is
/// idempotent; the batch takes the host's step lock, so a retry waits for
/// an earlier attempt that may still run.
#[allow(clippy::too_many_arguments)] // two call sites in run_host; a struct would only rename them
async fn run_batch(
    host: &str,
    resources: &[Resource],
    steps: &[Step],
    batch: &[usize],
    ctx: &StepContext,
    transport: Arc<dyn Transport>,
    opts: &DispatchOpts,
    rec: &Arc<Recorder>,
    prior: &mut [u32],
) -> (Vec<(usize, StepResult)>, Option<&'static str>) {
    // Attempts of each step already recorded in this run: this call's
    // attempts number on from them.
    let base = prior.to_vec();
    let by_id: std::collections::HashMap<&str, &Resource> =
        resources.iter().map(|r| (r.id.as_str(), r)).collect();
    let resource = |k: usize| by_id.get(steps[k].id.as_str()).copied();
    let mut units: Vec<Unit> = Vec::new();
    let mut batch_bytes = 0;
    let mut i = 0;
    while i < batch.len() {
        let k = batch[i];
        let step = &steps[k];
        let members = unit_members(steps, &batch[i..]);
        let built = match resource(k) {
            None => Err(format!(
                "resource `{}` vanished from the desired state",
                step.id
            )),
            Some(_) if step.kind == "package" => {
                let group: Vec<&Step> = members.iter().map(|&m| &steps[m]).collect();
                package_command(&group, |id| by_id.get(id).copied(), ctx).map_err(|e| e.to_string())
            }
            Some(r) => command_for(step, r, ctx).map_err(|e| e.to_string()),
        };
        match built {
            Ok(c) => {
                let bytes = c.script.len() + 200;
                if !units.is_empty() && batch_bytes + bytes > MAX_BATCH_SCRIPT {
                    break;
                }
                batch_bytes += bytes;
                let wait = transport_timeout(resource(k), ctx.step_timeout);
                i += members.len();
                units.push(Unit {
                    members,
                    cmd: c,
                    wait,
                });
            }
            Err(e) if units.is_empty() => {
                let r = members
                    .iter()
                    .map(|&m| (m, failed_before_start(host, &steps[m], e.clone(), rec)))
                    .collect();
                return (r, None);
            }
            Err(_) => break,
        }
    }

    let mut results: Vec<(usize, StepResult)> = Vec::new();
    let mut first = 0;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let todo = &units[first..];
        let sent_at = now_rfc3339();
        let mut recs = Vec::new();
        for u in todo {
            for &k in &u.members {
                recs.push(Record::AttemptSent(attempt_row(
                    rec,
                    host,
                    &steps[k],
                    base[k] + attempt,
                    &sent_at,
                )));
            }
        }
        // A restart whose trigger goes out in this batch is owed from now
        // on, until it succeeds (SPEC 8.3): a crash between the trigger and
        // the restart must not lose it.
        let sending: Vec<usize> = todo
            .iter()
            .flat_map(|u| u.members.iter().copied())
            .collect();
        for r in steps.iter().filter(|s| s.is_restart()) {
            if r.triggers.iter().any(|t| sending.contains(t)) {
                recs.push(Record::OwedRestart {
                    host: host.to_string(),
                    resource_id: r.id.clone(),
                    at: sent_at.clone(),
                });
            }
        }
        recs.push(Record::Event {
            at: sent_at.clone(),
            host: Some(host.to_string()),
            kind: "batch_sent".into(),
            detail: json!({
                "attempt": attempt,
                "steps": todo.iter().flat_map(|u| u.members.iter().map(|&k| steps[k].index)).collect::<Vec<_>>(),
            }),
        });
        if let Err(e) = rec.records(recs) {
            for u in todo {
                for &k in &u.members {
                    let mut r = StepResult::not_run(false);
                    r.failure = Some((
                        FailureClass::Execution,
                        format!("not sent: a record could not be written first ({e})"),
                    ));
                    results.push((k, r));
                }
            }
            return (results, None);
        }
        let timeout = todo.iter().map(|u| u.wait).sum::<Duration>();
        let bopts = crate::apply::batch::BatchOpts {
            output_limit: opts.output_limit,
            lock_wait_secs: timeout.as_secs().max(1),
            require_lock: attempt > 1,
            nonce: crate::clock::nonce(),
        };
        let cmds: Vec<RemoteCommand> = todo.iter().map(|u| u.cmd.clone()).collect();
        let cmd = crate::apply::batch::script(&cmds, bopts);
        let mut live = Attempt {
            host: host.to_string(),
            rec: rec.clone(),
            state: opts.state.clone(),
            units: todo
                .iter()
                .map(|u| u.members.iter().map(|&k| steps[k].clone()).collect())
                .collect(),
            attempt,
            base: base.clone(),
            sent_at: sent_at.clone(),
            parser: crate::apply::batch::Parser::new(todo.len(), bopts),
            finished: vec![None; todo.len()],
        };
        let t = transport.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let out = t.exec_streaming(&cmd.script, &cmd.stdin, timeout * 2, &mut |b| live.feed(b));
            (out, live)
        })
        .await;
        let (out, live) = match joined {
            Ok(x) => x,
            Err(e) => {
                // The attempt's thread died: what it did is unknown, so
                // every unit fails and nothing is sent again.
                for u in todo {
                    for &k in &u.members {
                        let msg = format!("the step's task failed: {e}");
                        let err =
                            crate::transport::TransportError::new(FailureClass::Execution, msg);
                        results.push((
                            k,
                            finish_step(
                                host,
                                &steps[k],
                                base[k] + attempt,
                                &sent_at,
                                Err(err),
                                opts,
                                rec,
                            ),
                        ));
                    }
                }
                return (results, None);
            }
        };
        // The units the host reported finished, in order.
        let mut j = 0;
        let mut stopped_at_failure = false;
        while j < todo.len() {
            let Some(done) = &live.finished[j] else { break };
            for (&k, r) in todo[j].members.iter().zip(done) {
                results.push((k, r.clone()));
            }
            j += 1;
            if done.iter().any(|r| r.status == StepStatus::Failed) {
                stopped_at_failure = true;
                break;
            }
        }
        if stopped_at_failure || j == todo.len() {
            // The batch stopped at a failed step (the rest are gated again
            // by the caller, so what was sent of them was no attempt) or
            // every step ran.
            let withdrawn: Vec<Record> = todo[j..]
                .iter()
                .flat_map(|u| &u.members)
                .map(|&k| Record::AttemptWithdrawn {
                    host: host.to_string(),
                    step_index: steps[k].index as u32,
                    attempt: base[k] + attempt,
                })
                .collect();
            let _ = rec.records(withdrawn);
            for &k in todo[j..].iter().flat_map(|u| &u.members) {
                prior[k] = base[k] + attempt - 1;
            }
            return (results, None);
        }
        // The attempt ended without the record of unit j.
        let err = match out {
            Err(e) => e,
            Ok(o) => {
                let why = match live.parser.error() {
                    Some(e) => e.to_string(),
                    None => "batch output: cut short".to_string(),
                };
                // 96: the step lock is held by an earlier attempt.
                let class = if o.status == 96 {
                    FailureClass::Transient
                } else {
                    FailureClass::Execution
                };
                // The batch's own stderr may hold a sensitive step's.
                let stderr = if steps.iter().any(|s| s.sensitive) {
                    "(withheld: the batch has a sensitive step)".into()
                } else {
                    String::from_utf8_lossy(&o.stderr)
                };
                crate::transport::TransportError::new(
                    class,
                    format!(
                        "{why} (exit status {}; stderr: {})",
                        o.status,
                        stderr.trim()
                    ),
                )
            }
        };
        let started = live.parser.running() == Some(j);
        let idempotent = todo[j].members.iter().all(|&k| step_idempotent(&steps[k]));
        let halt = opts.halt();
        let retry = err.class == FailureClass::Transient
            && attempt <= opts.retries
            && (!started || idempotent)
            && halt.is_none()
            && rec.broken().is_none();
        if retry {
            // Close this attempt's records, then send again from unit j.
            let at = now_rfc3339();
            let mut recs = Vec::new();
            for u in &todo[j..] {
                for &k in &u.members {
                    let mut row = attempt_row(rec, host, &steps[k], base[k] + attempt, &sent_at);
                    row.status = StepStatus::Failed;
                    row.finished_at = at.clone();
                    recs.push(Record::AttemptFinished(row));
                }
            }
            recs.push(Record::Event {
                at,
                host: Some(host.to_string()),
                kind: "batch_retry".into(),
                detail: json!({"attempt": attempt, "started": started, "class": err.class.as_str(), "message": err.message}),
            });
            let _ = rec.records(recs);
            tracing::info!(%host, attempt, error = %err.message, "transient failure of a batch; retrying");
            tokio::time::sleep(crate::core::retry::backoff(opts.backoff, attempt)).await;
            if let Some(why) = opts.halt() {
                rec.event(
                    Some(host),
                    why,
                    json!({"step": steps[todo[j].members[0]].index}),
                );
                for u in &units[first + j..] {
                    for &k in &u.members {
                        let mut r = StepResult::not_run(false);
                        r.attempts = base[k] + attempt;
                        results.push((k, r));
                    }
                }
                return (results, Some(why));
            }
            first += j;
            continue;
        }
        // Unit j fails with the error; the units after it never started.
        for &k in &todo[j].members {
            let mut e = err.clone();
            if started && !idempotent {
                e.message
                    .push_str("; the step may have run, so it is not sent again in this run");
            }
            results.push((
                k,
                finish_step(
                    host,
                    &steps[k],
                    base[k] + attempt,
                    &sent_at,
                    Err(e),
                    opts,
                    rec,
                ),
            ));
        }
        let at = now_rfc3339();
        let mut recs = Vec::new();
        for u in &todo[j + 1..] {
            for &k in &u.members {
                let mut row = attempt_row(rec, host, &steps[k], base[k] + attempt, &sent_at);
                row.finished_at = at.clone();
                recs.push(Record::AttemptFinished(row));
                let mut r = StepResult::not_run(false);
                r.attempts = base[k] + attempt;
                r.failure = Some((
                    err.class,
                    format!(
                        "host `{host}`, step {} `{}`: not started: the batch ended before it ({})",
                        steps[k].index, steps[k].id, err.message
                    ),
                ));
                results.push((k, r));
            }
        }
        let _ = rec.records(recs);
        return (results, None);
    }
}

/// An attempt's row as sent: status `not_run`, no finish yet.
fn attempt_row(
    rec: &Recorder,
    host: &str,
    step: &Step,
    attempt: u32,
    sent_at: &str,
) -> StepAttemptRow {
    StepAttemptRow {
        run_id: rec.run_id.clone(),
        host: host.to_string(),
        step_index: step.index as u32,
        resource_id: step.id.clone(),
        action: crate::core::outcome::step_action(step.action),
        destructive: step.destructive,
        attempt,
        status: StepStatus::NotRun,
        started_at: sent_at.to_string(),
        finished_at: String::new(),
        exit_code: None,
        log_path: None,
    }
}

/// One attempt of a batch as the host reports it, on the transport's
/// thread: each start and each end is recorded when its line arrives.
struct Attempt {
    host: String,
    rec: Arc<Recorder>,
    state: StateDir,
    /// The member steps of each unit sent.
    units: Vec<Vec<Step>>,
    attempt: u32,
    /// Attempts of each step (by index) recorded before this call.
    base: Vec<u32>,
    sent_at: String,
    parser: crate::apply::batch::Parser,
    /// Per unit, its members' results once the host reported its end.
    finished: Vec<Option<Vec<StepResult>>>,
}

impl Attempt {
    fn feed(&mut self, bytes: &[u8]) {
        use crate::apply::batch::BatchEvent;
        for ev in self.parser.push(bytes) {
            match ev {
                BatchEvent::Started(u) => {
                    let at = now_rfc3339();
                    let mut recs = Vec::new();
                    for s in &self.units[u] {
                        recs.push(Record::AttemptStarted {
                            host: self.host.clone(),
                            step_index: s.index as u32,
                            attempt: self.base[s.index] + self.attempt,
                        });
                        recs.push(Record::Event {
                            at: at.clone(),
                            host: Some(self.host.clone()),
                            kind: "step_started".into(),
                            detail: json!({"step": s.index, "id": s.id, "action": s.action.as_str(), "attempt": self.base[s.index] + self.attempt}),
                        });
                    }
                    let _ = self.rec.records(recs);
                }
                BatchEvent::Finished(u, out) => {
                    let done = self.units[u]
                        .iter()
                        .map(|s| {
                            let o = crate::transport::ExecOutput {
                                status: out.status,
                                stdout: out.stdout.clone(),
                                stderr: out.stderr.clone(),
                            };
                            finish_step_in(
                                &self.host,
                                s,
                                self.base[s.index] + self.attempt,
                                &self.sent_at,
                                Ok(o),
                                &self.state,
                                &self.rec,
                            )
                        })
                        .collect();
                    self.finished[u] = Some(done);
                }
                BatchEvent::End => {}
            }
        }
    }
}

/// Log, record and report one ended attempt of a step.
fn finish_step(
    host: &str,
    step: &Step,
    attempt: u32,
    sent_at: &str,
    out: StepExec,
    opts: &DispatchOpts,
    rec: &Recorder,
) -> StepResult {
    finish_step_in(host, step, attempt, sent_at, out, &opts.state, rec)
}

fn finish_step_in(
    host: &str,
    step: &Step,
    attempt: u32,
    sent_at: &str,
    out: StepExec,
    state: &StateDir,
    rec: &Recorder,
) -> StepResult {
    let (status, exit_code, log_bytes, failure) = match out {
        Ok(o) => {
            // A sensitive step's output reaches no log or message (SPEC 8.6).
            let mut log = if step.sensitive {
                format!(
                    "(sensitive: {} bytes of stdout and {} bytes of stderr withheld)\n",
                    o.stdout.len(),
                    o.stderr.len()
                )
                .into_bytes()
            } else {
                o.stdout.clone()
            };
            if !o.stderr.is_empty() && !step.sensitive {
                log.extend_from_slice(b"--- stderr ---\n");
                log.extend_from_slice(&o.stderr);
            }
            if o.status == 0 {
                (StepStatus::Succeeded, Some(0), log, None)
            } else {
                let stderr = if step.sensitive {
                    "(output withheld: sensitive)".into()
                } else {
                    String::from_utf8_lossy(&o.stderr)
                };
                let msg = format!(
                    "host `{host}`, step {} `{}`: exited with status {}: {}",
                    step.index,
                    step.id,
                    o.status,
                    stderr.trim()
                );
                // Stopped by tend's `timeout` (a command's own limit, or
                // step_timeout): class Timeout. Not sent again either way:
                // the step ran.
                let class = if apply::command::timed_out(o.status, &o.stderr) {
                    FailureClass::Timeout
                } else {
                    FailureClass::Execution
                };
                (StepStatus::Failed, Some(o.status), log, Some((class, msg)))
            }
        }
        Err(e) => {
            let msg = format!(
                "host `{host}`, step {} `{}`: {}",
                step.index, step.id, e.message
            );
            (
                StepStatus::Failed,
                None,
                msg.clone().into_bytes(),
                Some((e.class, msg)),
            )
        }
    };
    let log = match state.write_step_log(&rec.run_id, host, step.index, &step.id, &log_bytes) {
        Ok(rel) => Some(rel),
        Err(e) => {
            // A record that cannot be written stops further dispatch.
            let _ = rec.records(Vec::new());
            lock(&rec.broken).get_or_insert(format!("writing a step log: {e:#}"));
            tracing::error!(error = %e, "could not write a step log; nothing more is dispatched in this run");
            None
        }
    };
    let mut row = attempt_row(rec, host, step, attempt, sent_at);
    row.status = status;
    row.finished_at = now_rfc3339();
    row.exit_code = exit_code;
    row.log_path = log.clone();
    let _ = rec.records(vec![
        Record::AttemptFinished(row),
        Record::Event {
            at: now_rfc3339(),
            host: Some(host.to_string()),
            kind: "step_finished".into(),
            detail: {
                let mut d = json!({"step": step.index, "id": step.id, "status": status_word(status), "exit_code": exit_code, "attempt": attempt});
                if let Some((_, msg)) = &failure {
                    d["error"] = json!(msg.lines().next().unwrap_or_default());
                }
                d
            },
        },
    ]);
    if let Some((_, msg)) = &failure {
        tracing::warn!("{msg}");
    }
    StepResult {
        status,
        attempts: attempt,
        log,
        failure,
        held: false,
    }
}

fn failed_before_start(host: &str, step: &Step, msg: String, rec: &Recorder) -> StepResult {
    let msg = format!("host `{host}`, step {} `{}`: {msg}", step.index, step.id);
    rec.event(
        Some(host),
        "step_finished",
        json!({"step": step.index, "id": step.id, "status": "failed", "error": msg}),
    );
    StepResult {
        status: StepStatus::Failed,
        attempts: 0,
        log: None,
        failure: Some((FailureClass::Capability, msg)),
        held: false,
    }
}

pub fn status_word(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Succeeded => "succeeded",
        StepStatus::Failed => "failed",
        StepStatus::Skipped => "skipped",
        StepStatus::NotRun => "not_run",
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::core::model::{Blob, SourceTree, validate};
    use crate::core::spec::DispatchMode;
    use crate::reconcile::{self, ProbeOpts, TokenInput};

    /// Host `h` (local) wants two files under `root` gone; both exist.
    fn setup(root: &std::path::Path) -> DesiredState {
        for f in ["a", "b"] {
            fs::write(root.join(f), "x\n").unwrap();
        }
        let body = format!(
            "resources:\n  - kind: file\n    path: {0}/a\n    state: absent\n  - kind: file\n    path: {0}/b\n    state: absent\n",
            root.display()
        );
        let tree = SourceTree {
            inventory: Some(Blob::Bytes(
                b"hosts:\n  - name: h\n    transport: local\n".to_vec(),
            )),
            hosts: [("h.yaml".to_string(), Blob::Bytes(body.into_bytes()))].into(),
            ..Default::default()
        };
        let v = validate(&tree);
        assert!(v.is_valid(), "{:?}", v.problems);
        v.state
    }

    /// Plan, authorize the operation as a valid token would, let `meddle`
    /// change the host, then dispatch.
    async fn run(root: &std::path::Path, meddle: impl FnOnce()) -> HostRun {
        let state = setup(root);
        let opts = ProbeOpts::new(&state.config, root);
        let targets = vec!["h".to_string()];
        let mut prep = reconcile::prepare(
            &state,
            &opts,
            "rev",
            targets,
            DispatchMode::Enforced,
            false,
            &TokenInput::default(),
            Default::default(),
        )
        .await;
        assert_eq!(prep.plan.hosts[0].destructive, 2);
        prep.decision = reconcile::decide(
            &state,
            &prep.plan,
            (&prep.preflight_errors, &prep.fences),
            DispatchMode::Enforced,
            false,
            true,
        );
        meddle();
        let sd = StateDir::new(root.join("state"));
        sd.ensure().unwrap();
        let rec = Arc::new(Recorder::new("r-test".into(), {
            let mut db = Db::open(&sd.db_path()).unwrap();
            db.begin_run(&crate::store::db::RunRow {
                run_id: "r-test".into(),
                started_at: "2026-11-23T00:00:00Z".into(),
                action: crate::core::report::Action::Converge,
                trigger: crate::core::report::Trigger::Cli,
                dispatch_mode: DispatchMode::Enforced,
                effective_mode: crate::core::report::EffectiveMode::Full,
                policy_outcome: crate::core::policy::PolicyOutcome::Approved,
                policy_reason: "test".into(),
                desired_revision: "rev".into(),
                target_hosts: vec!["h".into()],
            })
            .unwrap();
            db
        }));
        let dopts = DispatchOpts {
            step_timeout: Duration::from_secs(30),
            concurrency: 1,
            state: sd,
            probe: opts,
            stop: None,
            output_limit: 1024 * 1024,
            retries: 2,
            backoff: Duration::from_millis(10),
            holder: "test".into(),
            revision: "r1".into(),
        };
        execute(&prep, &state, &dopts, rec)
            .await
            .remove("h")
            .unwrap()
    }

    #[tokio::test]
    async fn the_barrier_lets_an_unchanged_plan_through() {
        let dir = tempfile::tempdir().unwrap();
        let r = run(dir.path(), || {}).await;
        assert!(
            r.steps.iter().all(|s| s.status == StepStatus::Succeeded),
            "{r:?}"
        );
        assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());
    }

    #[tokio::test]
    async fn a_host_that_changed_since_the_plan_is_stale_at_the_barrier() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b");
        let r = run(dir.path(), || fs::remove_file(&b).unwrap()).await;
        for s in &r.steps {
            assert_eq!(s.status, StepStatus::NotRun, "{r:?}");
            let (class, msg) = s.failure.clone().unwrap();
            assert_eq!(class, FailureClass::Policy);
            assert!(msg.contains("stale"), "{msg}");
        }
        assert!(
            dir.path().join("a").exists(),
            "nothing destructive runs on a stale plan"
        );
    }

    /// SPEC 8.1: the same steps, but an object to delete is not the one the
    /// plan saw (its content changed after the plan): stale, nothing runs.
    #[tokio::test]
    async fn an_object_changed_since_the_plan_is_stale_at_the_barrier() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b");
        let r = run(dir.path(), || fs::write(&b, "changed\n").unwrap()).await;
        for s in &r.steps {
            assert_eq!(s.status, StepStatus::NotRun, "{r:?}");
            let (class, msg) = s.failure.clone().unwrap();
            assert_eq!(class, FailureClass::Policy);
            assert!(msg.contains("stale"), "{msg}");
        }
        assert!(dir.path().join("a").exists());
        assert_eq!(fs::read_to_string(&b).unwrap(), "changed\n");
    }
}

#[cfg(test)]
mod command_tests {
    use super::*;
    use crate::core::diff::FieldChange;
    use crate::core::model::{Blob, SourceTree, validate};

    /// The resources of host `h` declared by `yaml` (a host file).
    fn resources(yaml: &str) -> Vec<Resource> {
        let mut tree = SourceTree {
            inventory: Some(Blob::Bytes(
                b"hosts:\n  - name: h\n    transport: local\n".to_vec(),
            )),
            ..SourceTree::default()
        };
        tree.hosts
            .insert("h.yaml".into(), Blob::Bytes(yaml.as_bytes().to_vec()));
        let v = validate(&tree);
        assert!(v.is_valid(), "{:?}", v.problems);
        v.state.hosts["h"].resources.clone()
    }

    fn step(index: usize, id: &str, action: Action, wave: usize, fields: &[&str]) -> Step {
        Step {
            index,
            id: id.into(),
            kind: id.split(':').next().map(kind_of).unwrap(),
            action,
            destructive: action == Action::Delete,
            wave,
            after: vec![],
            fields: fields
                .iter()
                .map(|f| FieldChange {
                    field: f.to_string(),
                    from: None,
                    to: None,
                })
                .collect(),
            note: None,
            replace: false,
            triggers: vec![],
            daemon_reload: false,
            owed: false,
            approval: None,
            sensitive: false,
            guard: None,
        }
    }

    fn kind_of(k: &str) -> &'static str {
        crate::core::spec::ResourceSpec::KINDS
            .iter()
            .find(|x| **x == k)
            .copied()
            .unwrap()
    }

    fn ctx(pm: Option<PackageManager>) -> StepContext {
        StepContext {
            package_manager: pm,
            step_timeout: Duration::from_secs(300),
        }
    }

    const HOST: &str = r#"
resources:
  - kind: user
    name: app
    uid: 1500
    home: /srv/app
    shell: /bin/sh
    groups: [adm, web]
    system: true
  - kind: group
    name: web
    gid: 700
  - kind: package
    name: hello
  - kind: package
    name: tree
  - kind: command
    name: init
    run: /usr/local/bin/init
    creates: /srv/app/.done
    timeout: 90s
  - kind: command
    name: always
    run: "true"
"#;

    fn find<'a>(rs: &'a [Resource], id: &str) -> &'a Resource {
        rs.iter().find(|r| r.id == id).unwrap()
    }

    #[test]
    fn every_kind_and_action_has_a_command() {
        let rs = resources(HOST);
        let c = ctx(Some(PackageManager::Apt));
        let script = |st: Step| command_for(&st, find(&rs, &st.id), &c).unwrap().script;
        let user = script(step(0, "user:app", Action::Create, 0, &[]));
        assert!(
            user.contains(
                "useradd \"$@\" -r -u '1500' -d '/srv/app' -s '/bin/sh' -G 'adm,web' -m -- \"$n\""
            ),
            "{user}"
        );
        // An update passes only what the diff found different.
        let user = script(step(0, "user:app", Action::Update, 0, &["shell", "groups"]));
        assert!(user.contains("set -- \"$@\" -s '/bin/sh'\n"), "{user}");
        assert!(user.contains("set -- \"$@\" -G 'adm,web'\n"), "{user}");
        assert!(!user.contains("-u '1500'"), "{user}");
        let user = script(step(0, "user:app", Action::Delete, 0, &["exists"]));
        assert!(user.contains("userdel -- \"$n\""), "{user}");
        let group = script(step(0, "group:web", Action::Create, 0, &[]));
        assert!(group.ends_with("groupadd -g '700' -- \"$n\"\n"), "{group}");
        let group = script(step(0, "group:web", Action::Update, 0, &["gid"]));
        assert!(group.contains("groupmod -g '700' -- \"$n\"\n"), "{group}");
        let group = script(step(0, "group:web", Action::Delete, 0, &[]));
        assert!(group.contains("groupdel -- \"$n\""), "{group}");
        let pkg = script(step(0, "package:hello", Action::Create, 0, &[]));
        // Bounded by step_timeout, the inner script in a variable.
        assert!(pkg.contains("timeout -k 10 "), "{pkg}");
        assert!(pkg.contains(" sh -c \"$b\""), "{pkg}");
        assert!(pkg.contains("set -- '\\''hello'\\''"), "{pkg}");
        assert!(pkg.contains(" install -y "), "{pkg}");
        let pkg = script(step(0, "package:hello", Action::Delete, 0, &[]));
        assert!(pkg.contains(" remove -y -- \"$@\""), "{pkg}");
        let cmd = script(step(0, "command:init", Action::Create, 0, &["run"]));
        assert!(cmd.contains("timeout -k 10 90 sh -c \"$r\""), "{cmd}");
        assert!(cmd.contains("c='/srv/app/.done'"), "{cmd}");
        // Without its own timeout, a command gets step_timeout.
        let cmd = script(step(0, "command:always", Action::Create, 0, &["run"]));
        assert!(cmd.contains("timeout -k 10 300 sh -c \"$r\""), "{cmd}");
    }

    #[test]
    fn a_package_without_a_manager_and_a_command_update_are_refused() {
        let rs = resources(HOST);
        let err = command_for(
            &step(0, "package:hello", Action::Create, 0, &[]),
            find(&rs, "package:hello"),
            &ctx(None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no package manager"), "{err}");
        let err = command_for(
            &step(0, "command:init", Action::Delete, 0, &[]),
            find(&rs, "command:init"),
            &ctx(None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no applier"), "{err}");
    }

    #[test]
    fn package_steps_share_one_call() {
        let rs = resources(HOST);
        let a = step(2, "package:hello", Action::Create, 0, &[]);
        let b = step(3, "package:tree", Action::Create, 0, &[]);
        let cmd = package_command(
            &[&a, &b],
            |id| rs.iter().find(|r| r.id == id),
            &ctx(Some(PackageManager::Dnf)),
        )
        .unwrap();
        assert!(cmd.script.contains("set -- '\\''hello'\\'' '\\''tree'\\''"));
        assert!(cmd.script.contains("\ndnf install -y \"$@\"\n"));
        let a = step(2, "package:hello", Action::Delete, 0, &[]);
        let b = step(3, "package:tree", Action::Delete, 0, &[]);
        let cmd = package_command(
            &[&a, &b],
            |id| rs.iter().find(|r| r.id == id),
            &ctx(Some(PackageManager::Apk)),
        )
        .unwrap();
        assert!(cmd.script.contains("set -- '\\''hello'\\'' '\\''tree'\\''"));
        assert!(cmd.script.contains("\napk del \"$@\"\n"));
    }

    #[test]
    fn a_long_package_list_is_cut_into_calls_an_exec_takes() {
        let names: Vec<String> = (0..10_000)
            .map(|i| format!("a-package-with-a-long-name-{i:05}"))
            .collect();
        let yaml = names.iter().fold(String::from("resources:\n"), |mut y, n| {
            y.push_str(&format!("  - kind: package\n    name: {n}\n"));
            y
        });
        let rs = resources(&yaml);
        let steps: Vec<Step> = names
            .iter()
            .enumerate()
            .map(|(i, n)| step(i, &format!("package:{n}"), Action::Create, 0, &[]))
            .collect();
        let batch: Vec<usize> = (0..steps.len()).collect();
        let by_id: std::collections::HashMap<&str, &Resource> =
            rs.iter().map(|r| (r.id.as_str(), r)).collect();
        let (mut i, mut calls) = (0, 0);
        while i < batch.len() {
            let members = unit_members(&steps, &batch[i..]);
            assert_eq!(members[0], i, "in order, none skipped");
            let group: Vec<&Step> = members.iter().map(|&m| &steps[m]).collect();
            package_command(
                &group,
                |id| by_id.get(id).copied(),
                &ctx(Some(PackageManager::Apt)),
            )
            .unwrap();
            // The script `timeout` gets as one argument: well under the
            // 128 KiB Linux allows one.
            let inner: Vec<&str> = members.iter().map(|&m| names[m].as_str()).collect();
            let arg = apply::install_packages(PackageManager::Apt, &inner).script;
            assert!(arg.len() < 64 * 1024, "{} bytes", arg.len());
            i += members.len();
            calls += 1;
        }
        assert_eq!(i, 10_000);
        assert!((10..=20).contains(&calls), "{calls} calls");
        // A package step of another action or wave ends the unit.
        let mixed = [
            step(0, "package:a", Action::Create, 0, &[]),
            step(1, "package:b", Action::Create, 0, &[]),
            step(2, "package:c", Action::Delete, 0, &[]),
            step(3, "package:d", Action::Delete, 1, &[]),
        ];
        assert_eq!(unit_members(&mixed, &[0, 1, 2, 3]), vec![0, 1]);
        assert_eq!(unit_members(&mixed, &[2, 3]), vec![2]);
    }

    #[test]
    fn commands_get_the_transport_time_their_timeout_needs() {
        let rs = resources(HOST);
        let five = Duration::from_secs(300);
        assert_eq!(
            transport_timeout(Some(find(&rs, "command:init")), five),
            Duration::from_secs(105)
        );
        assert_eq!(
            transport_timeout(Some(find(&rs, "command:always")), five),
            Duration::from_secs(315)
        );
        assert_eq!(transport_timeout(Some(find(&rs, "user:app")), five), five);
        assert_eq!(transport_timeout(None, five), five);
    }
}

#[cfg(test)]
mod service_tests {
    use super::*;

    fn step(index: usize, triggers: Vec<usize>) -> Step {
        Step {
            index,
            id: "service:app".into(),
            kind: "service",
            action: Action::Update,
            destructive: false,
            wave: 1,
            after: triggers.clone(),
            fields: vec![],
            note: None,
            replace: false,
            triggers,
            daemon_reload: false,
            owed: false,
            approval: None,
            sensitive: false,
            guard: None,
        }
    }

    fn done(status: StepStatus, held: bool) -> StepResult {
        StepResult {
            status,
            attempts: 1,
            log: None,
            failure: None,
            held,
        }
    }

    #[test]
    fn a_restart_runs_once_any_trigger_succeeded() {
        use StepStatus::*;
        let ok = done(Succeeded, false);
        let failed = done(Failed, false);
        let skipped = done(Skipped, false);
        let held = done(NotRun, true);
        let killed = done(NotRun, false);
        // One success is enough, whatever the other did.
        for other in [&ok, &failed, &skipped, &held, &killed] {
            assert_eq!(restart_gate(&[&ok, other]), None);
            assert_eq!(restart_gate(&[other, &ok]), None);
        }
        // Nothing changed: skipped, with the reason.
        let r = restart_gate(&[&failed, &skipped]).unwrap();
        assert_eq!((r.status, r.held), (Skipped, false));
        assert!(
            r.failure
                .unwrap()
                .1
                .contains("none of the steps it restarts on succeeded")
        );
        // A trigger still to come (held for a token, or the kill switch):
        // not run, held if it is.
        let r = restart_gate(&[&failed, &held]).unwrap();
        assert_eq!((r.status, r.held), (NotRun, true));
        let r = restart_gate(&[&killed, &failed]).unwrap();
        assert_eq!((r.status, r.held), (NotRun, false));
    }

    /// In the gating loop, a restart waits for its triggers' real results:
    /// a trigger still in the batch flushes it (an ordinary dependent would
    /// count it as succeeding and join the batch).
    #[test]
    fn a_restart_flushes_the_batch_that_holds_a_trigger() {
        use StepStatus::*;
        let restart = step(2, vec![0, 1]);
        let mut dependent = step(2, vec![]);
        dependent.after = vec![0, 1];
        let ok = || Some(done(Succeeded, false));
        let failed = || Some(done(Failed, false));
        // Trigger 1 in the batch: flush, whatever trigger 0 did.
        for first in [ok(), failed(), None] {
            let batch: Vec<usize> = if first.is_none() { vec![0, 1] } else { vec![1] };
            let res = [first, None, None];
            assert_eq!(gate(&restart, true, &res, &batch), Gate::Flush);
        }
        // An ordinary step joins the batch.
        assert_eq!(gate(&dependent, true, &[ok(), None, None], &[1]), Gate::Run);
        // With the real results: runs on one success, skipped on none,
        // where an ordinary dependent is skipped on any failure.
        let res = [failed(), ok(), None];
        assert_eq!(gate(&restart, true, &res, &[]), Gate::Run);
        let Gate::Decided(r) = gate(&dependent, true, &res, &[]) else {
            panic!("a dependent of a failed step runs")
        };
        assert_eq!(r.status, Skipped);
        let res = [failed(), Some(done(Skipped, false)), None];
        let Gate::Decided(r) = gate(&restart, true, &res, &[]) else {
            panic!("a restart without a succeeded trigger runs")
        };
        assert_eq!(r.status, Skipped);
        // Held for a trigger held for a token.
        let res = [failed(), Some(done(NotRun, true)), None];
        assert_eq!(
            gate(&restart, true, &res, &[]),
            Gate::Decided(StepResult::not_run(true))
        );
        // Not allowed on this host: not run, held.
        let Gate::Decided(r) = gate(&restart, false, &[ok(), ok(), None], &[]) else {
            panic!("a restart the policy does not allow runs")
        };
        assert_eq!((r.status, r.held), (NotRun, true));
    }

    #[test]
    fn service_steps_become_systemctl_calls() {
        use crate::core::diff::FieldChange;
        use crate::core::diff::tests::{svc, svc_res};
        let ctx = StepContext {
            package_manager: None,
            step_timeout: Duration::from_secs(300),
        };
        let resource = |enabled, running| svc_res(svc(enabled, running));
        let with = |action, fields: &[&str], reload| {
            let mut s = step(0, vec![]);
            s.action = action;
            s.daemon_reload = reload;
            s.fields = fields
                .iter()
                .map(|f| FieldChange {
                    field: f.to_string(),
                    from: None,
                    to: None,
                })
                .collect();
            s
        };
        let script = |s: &Step, r: &Resource| command_for(s, r, &ctx).unwrap().script;
        let tail = |s: String| s.split_once("u='app'\n").unwrap().1.to_string();
        assert_eq!(
            tail(script(
                &with(Action::Update, &["running"], false),
                &resource(true, true)
            )),
            "systemctl is-active --quiet -- \"$u\" || systemctl start -- \"$u\"\n"
        );
        assert_eq!(
            tail(script(
                &with(Action::Update, &["enabled", "running"], true),
                &resource(false, false)
            )),
            "systemctl daemon-reload\nsystemctl disable --now -- \"$u\"\n"
        );
        assert_eq!(
            tail(script(
                &with(Action::Update, &["enabled"], false),
                &resource(true, false)
            )),
            "[ \"$(systemctl is-enabled -- \"$u\" 2>/dev/null)\" = enabled ] || systemctl enable -- \"$u\"\n"
        );
        // A teardown turns off what is on, whatever the spec says.
        assert_eq!(
            tail(script(
                &with(Action::Delete, &["running"], false),
                &resource(true, true)
            )),
            "systemctl stop -- \"$u\"\n"
        );
        let mut restart = step(1, vec![0]);
        restart.daemon_reload = true;
        assert_eq!(
            tail(script(&restart, &resource(true, true))),
            "systemctl daemon-reload\nsystemctl restart -- \"$u\"\n"
        );
    }
}

/// Step retries (SPEC 8.3) against a real `sh` behind a transport that drops
/// the connection once, mid-batch or before it.
#[cfg(test)]
mod retry_tests {
    use std::fs;
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::core::model::{Blob, SourceTree, validate};
    use crate::core::spec::DispatchMode;
    use crate::reconcile::{self, ProbeOpts, TokenInput};
    use crate::transport::local::LocalTransport;
    use crate::transport::{ExecOutput, StdoutSink, TransportError};

    /// How the second command (the first batch) fails.
    #[derive(Clone, Copy)]
    enum Drop {
        /// Before the host got anything.
        BeforeSending,
        /// The batch runs on the host; the connection drops right after the
        /// first step's start marker reached tend.
        AfterFirstStart,
        /// Never.
        Never,
    }

    struct Flaky {
        inner: LocalTransport,
        calls: AtomicU32,
        drop: Drop,
    }

    impl Transport for Flaky {
        fn hold(
            &self,
            script: &str,
            timeout: Duration,
        ) -> Result<(String, Box<dyn crate::transport::Held>), TransportError> {
            self.inner.hold(script, timeout)
        }

        fn exec_streaming(
            &self,
            script: &str,
            stdin: &[u8],
            timeout: Duration,
            sink: StdoutSink<'_>,
        ) -> Result<ExecOutput, TransportError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let lost = || TransportError::new(FailureClass::Transient, "connection dropped");
            if call != 2 || matches!(self.drop, Drop::Never) {
                return self.inner.exec_streaming(script, stdin, timeout, sink);
            }
            match self.drop {
                Drop::BeforeSending | Drop::Never => Err(lost()),
                Drop::AfterFirstStart => {
                    let mut seen = Vec::new();
                    let mut cut = false;
                    self.inner
                        .exec_streaming(script, stdin, timeout, &mut |b| {
                            if cut {
                                return;
                            }
                            seen.extend_from_slice(b);
                            let marker = b"TEND-START 0\n";
                            if let Some(p) = seen.windows(marker.len()).position(|w| w == marker) {
                                sink(&seen[..p + marker.len()]);
                                cut = true;
                            }
                        })
                        .ok();
                    Err(lost())
                }
            }
        }
    }

    async fn run(root: &std::path::Path, body: &str, drop: Drop) -> (HostRun, Vec<StepAttemptRow>) {
        let tree = SourceTree {
            inventory: Some(Blob::Bytes(
                b"hosts:\n  - name: h\n    transport: local\n".to_vec(),
            )),
            hosts: [("h.yaml".to_string(), Blob::Bytes(body.as_bytes().to_vec()))].into(),
            ..Default::default()
        };
        let v = validate(&tree);
        assert!(v.is_valid(), "{:?}", v.problems);
        let state = v.state;
        let opts = ProbeOpts::new(&state.config, root);
        let flaky: Arc<dyn Transport> = Arc::new(Flaky {
            inner: LocalTransport::new(),
            calls: AtomicU32::new(0),
            drop,
        });
        let prep = reconcile::prepare(
            &state,
            &opts,
            "rev",
            vec!["h".to_string()],
            DispatchMode::Enforced,
            false,
            &TokenInput::default(),
            [("h".to_string(), flaky)].into(),
        )
        .await;
        let sd = StateDir::new(root.join("state"));
        sd.ensure().unwrap();
        let mut db = Db::open(&sd.db_path()).unwrap();
        db.begin_run(&crate::store::db::RunRow {
            run_id: "r-retry".into(),
            started_at: "2026-11-23T00:00:00Z".into(),
            action: crate::core::report::Action::Converge,
            trigger: crate::core::report::Trigger::Cli,
            dispatch_mode: DispatchMode::Enforced,
            effective_mode: crate::core::report::EffectiveMode::Quick,
            policy_outcome: crate::core::policy::PolicyOutcome::Approved,
            policy_reason: "test".into(),
            desired_revision: "rev".into(),
            target_hosts: vec!["h".into()],
        })
        .unwrap();
        let rec = Arc::new(Recorder::new("r-retry".into(), db));
        let dopts = DispatchOpts {
            step_timeout: Duration::from_secs(30),
            concurrency: 1,
            state: sd.clone(),
            probe: opts,
            stop: None,
            output_limit: 1024 * 1024,
            retries: 2,
            backoff: Duration::from_millis(10),
            holder: "test".into(),
            revision: "r1".into(),
        };
        let run = execute(&prep, &state, &dopts, rec.clone())
            .await
            .remove("h")
            .unwrap();
        let rows = rec.db().step_attempts("r-retry").unwrap();
        (run, rows)
    }

    #[tokio::test]
    async fn an_idempotent_step_that_may_have_started_is_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let body = format!(
            "resources:\n  - kind: file\n    path: {}/f\n    content: \"x\\n\"\n",
            dir.path().display()
        );
        let (run, rows) = run(dir.path(), &body, Drop::AfterFirstStart).await;
        assert_eq!(run.steps[0].status, StepStatus::Succeeded, "{run:?}");
        assert_eq!(run.steps[0].attempts, 2);
        let statuses: Vec<_> = rows.iter().map(|r| (r.attempt, r.status)).collect();
        assert_eq!(
            statuses,
            vec![(1, StepStatus::Failed), (2, StepStatus::Succeeded)]
        );
        assert_eq!(fs::read_to_string(dir.path().join("f")).unwrap(), "x\n");
    }

    #[tokio::test]
    async fn a_command_that_may_have_started_is_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("ran");
        let body = format!(
            "resources:\n  - kind: command\n    name: c\n    run: \"echo once >> {}\"\n    unless: \"false\"\n",
            log.display()
        );
        let (run, rows) = run(dir.path(), &body, Drop::AfterFirstStart).await;
        assert_eq!(run.steps[0].status, StepStatus::Failed, "{run:?}");
        assert_eq!(run.steps[0].attempts, 1);
        let (_, msg) = run.steps[0].failure.clone().unwrap();
        assert!(msg.contains("may have run"), "{msg}");
        assert_eq!(rows.len(), 1);
        assert_eq!(fs::read_to_string(&log).unwrap(), "once\n");
    }

    #[tokio::test]
    async fn a_command_that_never_started_is_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("ran");
        let body = format!(
            "resources:\n  - kind: command\n    name: c\n    run: \"echo once >> {}\"\n    unless: \"false\"\n",
            log.display()
        );
        let (run, _) = run(dir.path(), &body, Drop::BeforeSending).await;
        assert_eq!(run.steps[0].status, StepStatus::Succeeded, "{run:?}");
        assert_eq!(run.steps[0].attempts, 2);
        assert_eq!(fs::read_to_string(&log).unwrap(), "once\n");
    }

    #[tokio::test]
    async fn steps_after_a_failed_one_go_out_again_as_first_attempts() {
        // `a` fails (no parent directory); the batch stops there; `b`, sent
        // in it but never reached, goes out in the next batch as attempt 1.
        let dir = tempfile::tempdir().unwrap();
        let body = format!(
            "resources:\n  - kind: file\n    path: {0}/a/missing/f\n    content: \"x\\n\"\n  - kind: file\n    path: {0}/b\n    content: \"y\\n\"\n",
            dir.path().display()
        );
        let (run, rows) = run(dir.path(), &body, Drop::Never).await;
        let by_status: Vec<_> = run.steps.iter().map(|s| (s.status, s.attempts)).collect();
        assert_eq!(
            by_status,
            vec![(StepStatus::Failed, 1), (StepStatus::Succeeded, 1)],
            "{run:?}"
        );
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(fs::read_to_string(dir.path().join("b")).unwrap(), "y\n");
    }
}
