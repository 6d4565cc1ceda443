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

use crate::apply::{self, RemoteCommand};
use crate::clock::now_rfc3339;
use crate::core::diff::Action;
use crate::core::model::{DesiredState, Resource};
use crate::core::outcome::{HostRun, StepResult};
use crate::core::plan::Step;
use crate::core::report::StepStatus;
use crate::core::retry::FailureClass;
use crate::core::spec::ResourceSpec;
use crate::reconcile::Prepared;
use crate::store::StateDir;
use crate::store::db::{Db, StepAttemptRow};
use crate::transport::Transport;

/// Records a run's events to SQLite as they happen and keeps the timeline
/// for `timeline.jsonl`.
pub struct Recorder {
    pub run_id: String,
    db: Mutex<Db>,
    timeline: Mutex<Vec<Value>>,
}

impl Recorder {
    pub fn new(run_id: String, db: Db) -> Self {
        Recorder {
            run_id,
            db: Mutex::new(db),
            timeline: Mutex::new(Vec::new()),
        }
    }

    /// One event: to the database now, and to the timeline.
    pub fn event(&self, host: Option<&str>, kind: &str, detail: Value) {
        let at = now_rfc3339();
        if let Err(e) = self.db.lock().expect("db lock").record_event(
            Some(&self.run_id),
            &at,
            host,
            kind,
            &detail,
        ) {
            tracing::warn!(error = %e, kind, "could not record event");
        }
        let mut line = json!({"at": at, "kind": kind, "host": host});
        if let (Value::Object(l), Value::Object(d)) = (&mut line, detail) {
            l.extend(d);
        }
        self.timeline.lock().expect("timeline lock").push(line);
    }

    pub fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().expect("db lock")
    }

    pub fn take_timeline(&self) -> Vec<Value> {
        std::mem::take(&mut *self.timeline.lock().expect("timeline lock"))
    }
}

/// Build the remote command for one step.
pub fn command_for(step: &Step, r: &Resource) -> Result<RemoteCommand> {
    let content_changed = step.fields.iter().any(|f| f.field == "content");
    let cmd = match (&r.spec, step.action) {
        (ResourceSpec::File(_), Action::Delete) => apply::remove_file(&path_of(r)),
        (ResourceSpec::Directory(_), Action::Delete) => apply::remove_directory(&path_of(r)),
        (ResourceSpec::Symlink(_), Action::Delete) => apply::remove_symlink(&path_of(r)),
        (ResourceSpec::File(s), Action::Create | Action::Update) => {
            if step.action == Action::Create || content_changed || step.replace {
                let empty = Vec::new();
                let bytes = r
                    .content
                    .as_ref()
                    .map(|c| c.bytes.as_slice())
                    .unwrap_or(&empty);
                let write = apply::write_file(
                    &s.path,
                    bytes,
                    s.mode,
                    s.owner.as_deref(),
                    s.group.as_deref(),
                );
                prefix_removal(step, &s.path, write)
            } else {
                apply::set_meta(&s.path, s.mode, s.owner.as_deref(), s.group.as_deref())
            }
        }
        (ResourceSpec::Directory(s), Action::Create | Action::Update) => {
            if step.action == Action::Create || step.replace {
                let mk =
                    apply::make_directory(&s.path, s.mode, s.owner.as_deref(), s.group.as_deref());
                prefix_removal(step, &s.path, mk)
            } else {
                apply::set_meta(&s.path, s.mode, s.owner.as_deref(), s.group.as_deref())
            }
        }
        (ResourceSpec::Symlink(s), Action::Create | Action::Update) => {
            let target = s
                .target
                .as_deref()
                .ok_or_else(|| anyhow!("symlink `{}` has no target", r.id))?;
            prefix_removal(step, &s.path, apply::make_symlink(&s.path, target))
        }
        (ResourceSpec::Service(s), Action::Update) if step.is_restart() => {
            apply::service::restart(&s.name, step.daemon_reload)
        }
        (ResourceSpec::Service(s), Action::Update | Action::Delete) => {
            // Only what the diff found different; a delete (teardown) turns
            // both off.
            let teardown = step.action == Action::Delete;
            let changes = |field: &str, want: bool| {
                step.fields
                    .iter()
                    .any(|f| f.field == field)
                    .then_some(want && !teardown)
            };
            apply::service::converge(
                &s.name,
                changes("enabled", s.enabled),
                changes("running", s.running),
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

/// A destructive replacement removes what is in the way first.
fn prefix_removal(step: &Step, path: &str, then: RemoteCommand) -> RemoteCommand {
    if !step.replace {
        return then;
    }
    let rm = apply::remove_directory(path);
    RemoteCommand {
        script: format!("( {}\n) || exit $?\n{}", rm.script, then.script),
        stdin: then.stdin,
    }
}

/// Dispatch options.
#[derive(Clone, Debug)]
pub struct DispatchOpts {
    pub step_timeout: Duration,
    pub concurrency: usize,
    pub state: StateDir,
}

/// Execute every dispatched host of a prepared pass.
pub async fn execute(
    prep: &Prepared,
    desired: &DesiredState,
    opts: &DispatchOpts,
    rec: Arc<Recorder>,
) -> BTreeMap<String, HostRun> {
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let destructive_failed = Arc::new(AtomicBool::new(false));
    let mut set = JoinSet::new();
    let mut runs = BTreeMap::new();
    for d in &prep.decision.hosts {
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
        let (allow_nd, allow_d) = (d.allow_nondestructive, d.allow_destructive);
        let (sem, rec, opts, fail_fast) = (
            sem.clone(),
            rec.clone(),
            opts.clone(),
            destructive_failed.clone(),
        );
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let run = run_host(
                host.name(),
                &host.resources,
                &steps,
                (allow_nd, allow_d),
                transport,
                &opts,
                &rec,
                &fail_fast,
            )
            .await;
            (host.inv.name.clone(), run)
        });
    }
    while let Some(joined) = set.join_next().await {
        let (name, run) = joined.expect("dispatch task panicked");
        runs.insert(name, run);
    }
    runs
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn run_host(
    host: &str,
    resources: &[Resource],
    steps: &[Step],
    (allow_nd, allow_d): (bool, bool),
    transport: Arc<dyn Transport>,
    opts: &DispatchOpts,
    rec: &Recorder,
    fail_fast: &AtomicBool,
) -> HostRun {
    let mut run = HostRun::default();
    rec.event(
        Some(host),
        "host_dispatch_started",
        json!({"steps": steps.len()}),
    );
    for step in steps {
        let allowed = if step.destructive { allow_d } else { allow_nd };
        let dep_status: Vec<StepStatus> = step.after.iter().map(|&a| run.steps[a].status).collect();
        let result = if !allowed {
            StepResult::not_run(true)
        } else if let Some(r) = restart_gate(step, &run.steps) {
            r
        } else if step.is_restart() {
            // At least one trigger succeeded: run it, whatever the others did.
            run_gated(
                host, resources, step, &transport, opts, rec, fail_fast, &mut run,
            )
            .await
        } else if dep_status
            .iter()
            .any(|s| matches!(s, StepStatus::Failed | StepStatus::Skipped))
        {
            let mut r = StepResult::not_run(false);
            r.status = StepStatus::Skipped;
            r.failure = Some((
                FailureClass::Execution,
                "a step it depends on failed".into(),
            ));
            r
        } else if dep_status.contains(&StepStatus::NotRun) {
            StepResult::not_run(run.steps.iter().any(|s| s.held))
        } else {
            run_gated(
                host, resources, step, &transport, opts, rec, fail_fast, &mut run,
            )
            .await
        };
        run.steps.push(result);
    }
    rec.event(
        Some(host),
        "host_dispatch_finished",
        json!({"killed": run.killed}),
    );
    run
}

/// For a restart step: its result when it must not run (no trigger
/// succeeded), or None when it may. None for every other step.
fn restart_gate(step: &Step, done: &[StepResult]) -> Option<StepResult> {
    if !step.is_restart() {
        return None;
    }
    let triggers: Vec<&StepResult> = step.triggers.iter().map(|&t| &done[t]).collect();
    if triggers.iter().any(|t| t.status == StepStatus::Succeeded) {
        return None;
    }
    if triggers.iter().any(|t| t.status == StepStatus::NotRun) {
        // Held for a token, or stopped by the kill switch: it may still come.
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

/// The kill switch and fail-fast checks, then the step itself.
#[allow(clippy::too_many_arguments)] // the loop's state, passed through once
async fn run_gated(
    host: &str,
    resources: &[Resource],
    step: &Step,
    transport: &Arc<dyn Transport>,
    opts: &DispatchOpts,
    rec: &Recorder,
    fail_fast: &AtomicBool,
    run: &mut HostRun,
) -> StepResult {
    if opts.state.kill_switch_engaged() {
        run.killed = true;
        rec.event(
            Some(host),
            "kill_switch",
            json!({"step": step.index, "id": step.id}),
        );
        return StepResult::not_run(false);
    }
    if step.destructive && fail_fast.load(Ordering::SeqCst) {
        let mut r = StepResult::not_run(false);
        r.failure = Some((
            FailureClass::Execution,
            "a destructive step failed earlier in this run (fail fast)".into(),
        ));
        return r;
    }
    let r = run_step(host, resources, step, transport.clone(), opts, rec).await;
    run.dispatched = true;
    if step.destructive && r.status == StepStatus::Failed {
        fail_fast.store(true, Ordering::SeqCst);
    }
    r
}

async fn run_step(
    host: &str,
    resources: &[Resource],
    step: &Step,
    transport: Arc<dyn Transport>,
    opts: &DispatchOpts,
    rec: &Recorder,
) -> StepResult {
    let started = now_rfc3339();
    rec.event(
        Some(host),
        "step_started",
        json!({"step": step.index, "id": step.id, "action": step.action.as_str()}),
    );
    let resource = resources.iter().find(|r| r.id == step.id);
    let cmd = match resource.map(|r| command_for(step, r)) {
        Some(Ok(c)) => c,
        Some(Err(e)) => return failed_before_start(host, step, e.to_string(), rec),
        None => {
            return failed_before_start(
                host,
                step,
                format!("resource `{}` vanished from the desired state", step.id),
                rec,
            );
        }
    };
    let timeout = opts.step_timeout;
    let out = tokio::task::spawn_blocking(move || transport.exec(&cmd.script, &cmd.stdin, timeout))
        .await
        .unwrap_or_else(|e| {
            Err(crate::transport::TransportError::new(
                FailureClass::Transient,
                format!("step task failed: {e}"),
            ))
        });
    let finished = now_rfc3339();
    let (status, exit_code, log_bytes, failure) = match out {
        Ok(o) => {
            let mut log = o.stdout.clone();
            if !o.stderr.is_empty() {
                log.extend_from_slice(b"--- stderr ---\n");
                log.extend_from_slice(&o.stderr);
            }
            if o.status == 0 {
                (StepStatus::Succeeded, Some(0), log, None)
            } else {
                let msg = format!(
                    "host `{host}`, step {} `{}`: exited with status {}: {}",
                    step.index,
                    step.id,
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                (
                    StepStatus::Failed,
                    Some(o.status),
                    log,
                    Some((FailureClass::Execution, msg)),
                )
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
    let log = match opts
        .state
        .write_step_log(&rec.run_id, host, step.index, &step.id, &log_bytes)
    {
        Ok(rel) => Some(rel),
        Err(e) => {
            tracing::warn!(error = %e, "could not write step log");
            None
        }
    };
    let row = StepAttemptRow {
        run_id: rec.run_id.clone(),
        host: host.to_string(),
        step_index: step.index as u32,
        resource_id: step.id.clone(),
        action: crate::core::outcome::step_action(step.action),
        destructive: step.destructive,
        attempt: 1,
        status,
        started_at: started,
        finished_at: finished,
        exit_code,
        log_path: log.clone(),
    };
    if let Err(e) = rec.db().record_step_attempt(&row) {
        tracing::warn!(error = %e, "could not record step attempt");
    }
    rec.event(
        Some(host),
        "step_finished",
        json!({"step": step.index, "id": step.id, "status": status_word(status), "exit_code": exit_code}),
    );
    if let Some((_, msg)) = &failure {
        tracing::warn!("{msg}");
    }
    StepResult {
        status,
        attempts: 1,
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
        let restart = step(2, vec![0, 1]);
        // One success is enough, whatever the other did.
        for other in [&ok, &failed, &skipped, &held, &killed] {
            assert_eq!(restart_gate(&restart, &[ok.clone(), other.clone()]), None);
            assert_eq!(restart_gate(&restart, &[other.clone(), ok.clone()]), None);
        }
        // Nothing changed: skipped, with the reason.
        let r = restart_gate(&restart, &[failed.clone(), skipped.clone()]).unwrap();
        assert_eq!((r.status, r.held), (Skipped, false));
        assert!(
            r.failure
                .unwrap()
                .1
                .contains("none of the steps it restarts on succeeded")
        );
        // A trigger still to come (held for a token, or the kill switch):
        // not run, held if it is.
        let r = restart_gate(&restart, &[failed.clone(), held.clone()]).unwrap();
        assert_eq!((r.status, r.held), (NotRun, true));
        let r = restart_gate(&restart, &[killed.clone(), failed]).unwrap();
        assert_eq!((r.status, r.held), (NotRun, false));
        // Not a restart: no say.
        assert_eq!(restart_gate(&step(1, vec![]), &[held]), None);
    }

    #[test]
    fn service_steps_become_systemctl_calls() {
        use crate::core::diff::FieldChange;
        use crate::core::diff::tests::{svc, svc_res};
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
        let script = |s: &Step, r: &Resource| command_for(s, r).unwrap().script;
        let tail = |s: String| s.split_once("u='app'\n").unwrap().1.to_string();
        assert_eq!(
            tail(script(
                &with(Action::Update, &["running"], false),
                &resource(true, true)
            )),
            "systemctl start -- \"$u\"\n"
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
            "systemctl enable -- \"$u\"\n"
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
