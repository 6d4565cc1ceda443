//! Runs the approved parts of a plan: hosts concurrently (bounded by
//! `concurrency`), each host's steps in plan order, checking the kill switch
//! before every step, skipping the dependents of a failed step, stopping every
//! destructive step of the run after a destructive failure (fail fast), and
//! recording each attempt and its log as it happens.
//!
//! Package steps of a host that are adjacent in its plan, in the same wave,
//! with the same action and ready to run together, are batched into ONE call
//! of the package manager (`apt-get install a b c`); each keeps its own step
//! result, attempt row and log (the call's output). In a plan, the package
//! steps of a wave are adjacent (steps are ordered by wave, then by resource
//! id, and every `package:` id sorts together), so a run installs its
//! packages in one call, and removes them in another.
//!
//! Invariant: a step runs only if policy allowed its class (non-destructive or
//! destructive) on its host, the mode dispatches to the host, the kill switch
//! is off, and every step it depends on succeeded.

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
pub fn package_command(
    steps: &[&Step],
    resources: &[Resource],
    ctx: &StepContext,
) -> Result<RemoteCommand> {
    let manager = package_manager(ctx)?;
    let mut names = Vec::with_capacity(steps.len());
    for step in steps {
        match resources.iter().find(|r| r.id == step.id).map(|r| &r.spec) {
            Some(ResourceSpec::Package(p)) => names.push(p.name.as_str()),
            _ => return Err(anyhow!("`{}` is not a package resource", step.id)),
        }
    }
    match steps.first().map(|s| s.action) {
        Some(Action::Create) => Ok(apply::install_packages(manager, &names)),
        Some(Action::Delete) => Ok(apply::remove_packages(manager, &names)),
        other => Err(anyhow!("no package command for {other:?}")),
    }
}

/// Build the remote command for one step.
pub fn command_for(step: &Step, r: &Resource, ctx: &StepContext) -> Result<RemoteCommand> {
    let content_changed = step.fields.iter().any(|f| f.field == "content");
    let changed = |field: &str| step.fields.iter().any(|f| f.field == field);
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
            package_command(&[step], std::slice::from_ref(r), ctx)?
        }
        (ResourceSpec::Command(c), Action::Create) => apply::run_command(
            &c.run,
            c.creates.as_deref(),
            c.unless.as_deref(),
            c.timeout.map(|t| t.0).unwrap_or(ctx.step_timeout),
        ),
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
        let ctx = StepContext {
            package_manager: prep
                .probes
                .get(&d.host)
                .and_then(|p| p.result.as_ref().ok())
                .and_then(|a| a.facts.package_manager.as_deref())
                .and_then(PackageManager::from_fact),
            step_timeout: opts.step_timeout,
        };
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
                &ctx,
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

/// How many steps from `steps[i]` on run as one call: the package steps
/// right after it with the same action, wave and class, allowed, and whose
/// dependencies all succeeded. 1 for any other step.
fn batch_len(steps: &[Step], i: usize, run: &HostRun, allowed: impl Fn(&Step) -> bool) -> usize {
    let first = &steps[i];
    if first.kind != "package" {
        return 1;
    }
    let mut n = 1;
    while let Some(next) = steps.get(i + n) {
        let joins = next.kind == "package"
            && next.action == first.action
            && next.wave == first.wave
            && next.destructive == first.destructive
            && allowed(next)
            && next
                .after
                .iter()
                .all(|&a| a < i && run.steps[a].status == StepStatus::Succeeded);
        if !joins {
            break;
        }
        n += 1;
    }
    n
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn run_host(
    host: &str,
    resources: &[Resource],
    steps: &[Step],
    (allow_nd, allow_d): (bool, bool),
    ctx: &StepContext,
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
    let allowed = |s: &Step| if s.destructive { allow_d } else { allow_nd };
    let mut i = 0;
    while i < steps.len() {
        let step = &steps[i];
        let dep_status: Vec<StepStatus> = step.after.iter().map(|&a| run.steps[a].status).collect();
        let result = if !allowed(step) {
            StepResult::not_run(true)
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
        } else if opts.state.kill_switch_engaged() {
            run.killed = true;
            rec.event(
                Some(host),
                "kill_switch",
                json!({"step": step.index, "id": step.id}),
            );
            StepResult::not_run(false)
        } else if step.destructive && fail_fast.load(Ordering::SeqCst) {
            let mut r = StepResult::not_run(false);
            r.failure = Some((
                FailureClass::Execution,
                "a destructive step failed earlier in this run (fail fast)".into(),
            ));
            r
        } else {
            let n = batch_len(steps, i, &run, allowed);
            let group: Vec<&Step> = steps[i..i + n].iter().collect();
            let results =
                run_steps(host, resources, &group, ctx, transport.clone(), opts, rec).await;
            run.dispatched = true;
            for r in results {
                if step.destructive && r.status == StepStatus::Failed {
                    fail_fast.store(true, Ordering::SeqCst);
                }
                run.steps.push(r);
            }
            i += n;
            continue;
        };
        run.steps.push(result);
        i += 1;
    }
    rec.event(
        Some(host),
        "host_dispatch_finished",
        json!({"killed": run.killed}),
    );
    run
}

/// Runs one step, or several package steps as one call; one result per step.
async fn run_steps(
    host: &str,
    resources: &[Resource],
    group: &[&Step],
    ctx: &StepContext,
    transport: Arc<dyn Transport>,
    opts: &DispatchOpts,
    rec: &Recorder,
) -> Vec<StepResult> {
    let started = now_rfc3339();
    let batch: Vec<usize> = group.iter().map(|s| s.index).collect();
    for step in group {
        let mut detail = json!({"step": step.index, "id": step.id, "action": step.action.as_str()});
        if group.len() > 1 {
            detail["batch"] = json!(batch);
        }
        rec.event(Some(host), "step_started", detail);
    }
    let resource = resources.iter().find(|r| r.id == group[0].id);
    let built = if group.len() > 1 {
        package_command(group, resources, ctx)
    } else {
        match resource {
            Some(r) => command_for(group[0], r, ctx),
            None => Err(anyhow!(
                "resource `{}` vanished from the desired state",
                group[0].id
            )),
        }
    };
    let cmd = match built {
        Ok(c) => c,
        Err(e) => {
            return group
                .iter()
                .map(|step| failed_before_start(host, step, e.to_string(), rec))
                .collect();
        }
    };
    let timeout = transport_timeout(resource, opts.step_timeout);
    let out = tokio::task::spawn_blocking(move || transport.exec(&cmd.script, &cmd.stdin, timeout))
        .await
        .unwrap_or_else(|e| {
            Err(crate::transport::TransportError::new(
                FailureClass::Transient,
                format!("step task failed: {e}"),
            ))
        });
    let finished = now_rfc3339();
    // Who else was in the call, for the messages of a batch.
    let along = |step: &Step| -> String {
        let others: Vec<String> = group
            .iter()
            .filter(|s| s.index != step.index)
            .map(|s| format!("`{}`", s.id))
            .collect();
        if others.is_empty() {
            String::new()
        } else {
            format!(" (in one call with {})", others.join(", "))
        }
    };
    let mut results = Vec::with_capacity(group.len());
    for step in group {
        let (status, exit_code, log_bytes, failure) = match &out {
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
                        "host `{host}`, step {} `{}`{}: exited with status {}: {}",
                        step.index,
                        step.id,
                        along(step),
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
                    "host `{host}`, step {} `{}`{}: {}",
                    step.index,
                    step.id,
                    along(step),
                    e.message
                );
                (
                    StepStatus::Failed,
                    None,
                    msg.clone().into_bytes(),
                    Some((e.class, msg)),
                )
            }
        };
        let log =
            match opts
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
            started_at: started.clone(),
            finished_at: finished.clone(),
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
        results.push(StepResult {
            status,
            attempts: 1,
            log,
            failure,
            held: false,
        });
    }
    results
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
        assert!(
            user.ends_with("usermod -s '/bin/sh' -G 'adm,web' -- \"$n\"\n"),
            "{user}"
        );
        let user = script(step(0, "user:app", Action::Delete, 0, &["exists"]));
        assert!(user.contains("userdel -- \"$n\""), "{user}");
        let group = script(step(0, "group:web", Action::Create, 0, &[]));
        assert!(group.ends_with("groupadd -g '700' -- \"$n\"\n"), "{group}");
        let group = script(step(0, "group:web", Action::Update, 0, &["gid"]));
        assert!(group.ends_with("groupmod -g '700' -- \"$n\"\n"), "{group}");
        let group = script(step(0, "group:web", Action::Delete, 0, &[]));
        assert!(group.contains("groupdel -- \"$n\""), "{group}");
        let pkg = script(step(0, "package:hello", Action::Create, 0, &[]));
        assert!(pkg.starts_with("set -eu\nset -- 'hello'\n"), "{pkg}");
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
        let cmd = package_command(&[&a, &b], &rs, &ctx(Some(PackageManager::Dnf))).unwrap();
        assert_eq!(
            cmd.script,
            "set -eu\nset -- 'hello' 'tree'\ndnf install -y \"$@\"\n"
        );
        let a = step(2, "package:hello", Action::Delete, 0, &[]);
        let b = step(3, "package:tree", Action::Delete, 0, &[]);
        let cmd = package_command(&[&a, &b], &rs, &ctx(Some(PackageManager::Apk))).unwrap();
        assert_eq!(
            cmd.script,
            "set -eu\nset -- 'hello' 'tree'\napk del \"$@\"\n"
        );
    }

    #[test]
    fn batches_are_adjacent_package_steps_of_one_wave_action_and_class() {
        use Action::*;
        let ok = |_: &Step| true;
        let done = |n: usize| HostRun {
            steps: vec![
                StepResult {
                    status: StepStatus::Succeeded,
                    attempts: 1,
                    log: None,
                    failure: None,
                    held: false,
                };
                n
            ],
            ..HostRun::default()
        };
        let steps = vec![
            step(0, "group:web", Create, 0, &[]),
            step(1, "package:a", Create, 0, &[]),
            step(2, "package:b", Create, 0, &[]),
            step(3, "package:c", Create, 0, &[]),
            step(4, "user:app", Create, 1, &[]),
            step(5, "package:d", Create, 1, &[]),
            step(6, "package:e", Create, 2, &[]),
            step(7, "package:f", Delete, 3, &[]),
            step(8, "package:g", Delete, 3, &[]),
        ];
        assert_eq!(batch_len(&steps, 0, &done(0), ok), 1, "not a package");
        assert_eq!(batch_len(&steps, 1, &done(1), ok), 3);
        assert_eq!(batch_len(&steps, 2, &done(2), ok), 2);
        assert_eq!(batch_len(&steps, 5, &done(5), ok), 1, "next wave");
        assert_eq!(batch_len(&steps, 6, &done(6), ok), 1, "other action");
        assert_eq!(batch_len(&steps, 7, &done(7), ok), 2);
        // A step policy holds does not join.
        assert_eq!(
            batch_len(&steps, 1, &done(1), |s: &Step| s.id != "package:c"),
            2
        );
        // Nor one whose dependency did not succeed.
        let mut steps = steps;
        steps[3].after = vec![0];
        let mut run = done(1);
        run.steps[0].status = StepStatus::Failed;
        assert_eq!(batch_len(&steps, 1, &run, ok), 2);
        assert_eq!(batch_len(&steps, 1, &done(1), ok), 3);
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
