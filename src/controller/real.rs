//! The real `Reconciler`: reads the desired-state directory, runs passes
//! through `pass::run` (one host per pass, one run per pass that has
//! something to tell), keeps SSH sessions across passes, and writes status
//! files and `fleet.json`.
//!
//! Invariant: while the desired state is invalid, passes run on the last
//! valid state with dispatch off and say `ValidDesiredState=False` with the
//! problems; with no valid state ever seen, hosts are not even probed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::cli::Global;
use crate::clock::now_rfc3339;
use crate::core::model::{self, DesiredState};
use crate::core::report::{
    ConditionStatus, ConditionType, HostOutcomeKind, HostStatus, RunResult, StepStatus, Trigger,
};
use crate::pass::{self, Overlay, PassInput, TransportCache};
use crate::settings::Settings;
use crate::store::StateDir;

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

pub struct Real {
    global: Global,
    state_dir: StateDir,
    snapshot: RwLock<Arc<Snapshot>>,
    cache: TransportCache,
    stop: Arc<AtomicBool>,
    /// `fleet.json` is rebuilt from every status file after each pass;
    /// one rebuild at a time keeps the last writer from using older reads.
    fleet: Mutex<()>,
    /// The file watches, refreshed after each load to cover new directories.
    watches: Mutex<Option<super::watch::Watches>>,
}

impl Real {
    /// The controller for `--dir` and friends. The state dir is fixed for
    /// the life of the process (moving `state_dir` in tend.yaml needs a
    /// restart); `settings` is the first resolution.
    pub fn new(global: Global, settings: Settings, state_dir: StateDir) -> Real {
        let snap = Snapshot {
            settings,
            valid: None,
            invalid: None,
            orphans: Vec::new(),
        };
        Real {
            global,
            state_dir,
            snapshot: RwLock::new(Arc::new(snap)),
            cache: TransportCache::default(),
            stop: Arc::new(AtomicBool::new(false)),
            fleet: Mutex::new(()),
            watches: Mutex::new(None),
        }
    }

    pub fn set_watches(&self, w: super::watch::Watches) {
        *self.watches.lock().expect("watches lock") = Some(w);
    }

    pub fn state_dir(&self) -> &StateDir {
        &self.state_dir
    }

    pub fn desired_dir(&self) -> PathBuf {
        self.global.dir.clone()
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    fn hosts(snap: &Snapshot) -> Vec<String> {
        match &snap.valid {
            Some((s, _)) => s.hosts.keys().cloned().collect(),
            None => snap.orphans.clone(),
        }
    }

    fn write_fleet(&self, snap: &Snapshot) {
        let _one = self.fleet.lock().expect("fleet lock");
        let hosts = Self::hosts(snap);
        if let Err(e) = pass::write_fleet(&self.state_dir, hosts.iter(), &now_rfc3339()) {
            tracing::error!(error = %format!("{e:#}"), "could not write fleet.json");
        }
    }

    /// Status of a host that cannot be planned at all: the desired state
    /// was never valid, or names the host only in a broken inventory.
    fn report_unplannable(&self, host: &str, snap: &Snapshot, degraded: Option<(String, String)>) {
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

impl Reconciler for Real {
    fn load(&self) -> Loaded {
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
        *self.snapshot.write().expect("snapshot lock") = Arc::new(snap);
        if let Some(w) = self.watches.lock().expect("watches lock").as_mut()
            && let Err(e) = w.refresh()
        {
            tracing::warn!(error = %format!("{e:#}"), "could not watch a new directory");
        }
        let keep = loaded.hosts.clone();
        self.cache.retain(|h| keep.iter().any(|k| k == h));
        loaded
    }

    async fn reconcile(
        &self,
        host: String,
        trigger: Trigger,
        degraded: Option<(String, String)>,
    ) -> Verdict {
        let snap = self.current();
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
                })
                .await;
                match report {
                    Ok(r) => {
                        if let Some(res) = &r.result {
                            log_run(&host, res);
                        }
                        verdict(&host, r.result.as_ref(), &self.state_dir)
                    }
                    Err(e) => {
                        let message = format!("{e:#}");
                        tracing::error!(%host, error = %message, "pass failed");
                        Verdict::Failed {
                            signature: format!("pass error: {message}"),
                            message,
                        }
                    }
                }
            }
            _ => {
                self.report_unplannable(&host, &snap, degraded);
                Verdict::Settled { awaiting: false }
            }
        };
        self.write_fleet(&snap);
        verdict
    }

    fn set_degraded(&self, host: &str, degraded: Option<(String, String)>) {
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
        self.write_fleet(&self.current());
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
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
fn verdict(host: &str, res: Option<&RunResult>, sd: &StateDir) -> Verdict {
    use HostOutcomeKind::*;
    let Some(o) = res.and_then(|r| r.host_outcomes.iter().find(|o| o.host == host)) else {
        // A quiet pass: converged, nothing to tell.
        return Verdict::Settled { awaiting: false };
    };
    match o.outcome {
        Completed | NoChange | Planned | EscalationRequired | PolicyBlocked => {
            let awaiting = sd
                .read_status(host)
                .ok()
                .flatten()
                .is_some_and(|s| s.awaiting_confirmation.is_some());
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
