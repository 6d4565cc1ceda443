//! The front half of every pass, shared by `probe`, `plan`, `apply` (and the
//! controller): connect, probe every target host concurrently, diff, plan and
//! decide. Nothing here writes anything.
//!
//! Invariant: one probe command per host per attempt; one transport per host,
//! reused by dispatch; hosts never wait on each other beyond `concurrency`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::core::actual::HostActual;
use crate::core::diff::{self, Change};
use crate::core::model::{DesiredState, Host};
use crate::core::plan::{self, HostPlan, Plan};
use crate::core::policy::{self, HostFacts, RunDecision};
use crate::core::retry::{self, FailureClass};
use crate::core::spec::{DispatchMode, ResourceSpec, TendConfig, TransportKind};
use crate::probe::{self, ProbeItem};
use crate::transport::local::LocalTransport;
use crate::transport::ssh::{SshTarget, SshTransport};
use crate::transport::{Transport, TransportError};

/// How one host's probe went.
#[derive(Clone, Debug)]
pub struct HostProbe {
    pub result: Result<HostActual, (FailureClass, String)>,
    /// Attempts made (1 + retries used).
    pub attempts: u32,
    /// When the probe finished (RFC 3339).
    pub at: String,
}

/// Everything decided before dispatch.
pub struct Prepared {
    pub revision: String,
    /// Resolved target hosts, sorted.
    pub targets: Vec<String>,
    pub transports: BTreeMap<String, Arc<dyn Transport>>,
    pub probes: BTreeMap<String, HostProbe>,
    /// Per host: one change per resource (absent when the host was not probed).
    pub changes: BTreeMap<String, Vec<Change>>,
    pub plan: Plan,
    pub decision: RunDecision,
}

/// Resolve the hosts named on the command line (all when none).
pub fn resolve_targets(state: &DesiredState, named: &[String]) -> Result<Vec<String>> {
    if named.is_empty() {
        return Ok(state.hosts.keys().cloned().collect());
    }
    let mut out = Vec::new();
    for n in named {
        if !state.hosts.contains_key(n) {
            let known: Vec<&str> = state.hosts.keys().map(String::as_str).collect();
            bail!("unknown host `{n}`: the inventory has {}", known.join(", "));
        }
        out.push(n.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A transport for a host. SSH sessions open lazily, on the first command,
/// so that connecting counts against that command's timeout.
pub fn connect(host: &Host, opts: &ProbeOpts) -> Result<Arc<dyn Transport>, TransportError> {
    match host.inv.transport {
        TransportKind::Local => Ok(Arc::new(LocalTransport::new())),
        TransportKind::Ssh => {
            let inv = &host.inv;
            let address = inv.address.clone().ok_or_else(|| {
                TransportError::new(
                    FailureClass::Capability,
                    format!("host `{}` has no address", inv.name),
                )
            })?;
            Ok(Arc::new(SshTransport::new(SshTarget {
                host: inv.name.clone(),
                address,
                port: inv.port,
                user: inv.user.clone(),
                identity: inv
                    .identity
                    .as_deref()
                    .map(|p| crate::settings::resolve_relative(&opts.desired_dir, p)),
                host_key: inv.host_key.clone(),
                known_hosts: opts.known_hosts.clone(),
            })))
        }
    }
}

/// What the probe must look at for a host.
pub fn probe_items(host: &Host) -> Vec<ProbeItem> {
    host.resources
        .iter()
        .filter_map(|r| match &r.spec {
            ResourceSpec::Service(s) => Some(ProbeItem::service(r.id.clone(), s.name.clone())),
            _ => r.path().map(|p| ProbeItem::path(r.id.clone(), p)),
        })
        .collect()
}

/// Probe settings.
#[derive(Clone, Debug)]
pub struct ProbeOpts {
    pub timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
    pub concurrency: usize,
    /// Relative identity paths are relative to it.
    pub desired_dir: PathBuf,
    pub known_hosts: PathBuf,
}

impl ProbeOpts {
    pub fn new(config: &TendConfig, desired_dir: &Path) -> Self {
        ProbeOpts {
            timeout: config.probe_timeout.0,
            retries: config.retries,
            backoff: config.retry_backoff.0,
            concurrency: config.concurrency as usize,
            desired_dir: desired_dir.to_path_buf(),
            known_hosts: crate::settings::resolve_relative(desired_dir, &config.known_hosts),
        }
    }
}

/// Probe one host: one remote command per attempt; transient failures are
/// retried with doubling backoff.
pub async fn probe_host(host: &Host, transport: Arc<dyn Transport>, opts: &ProbeOpts) -> HostProbe {
    let items = Arc::new(probe_items(host));
    let script = Arc::new(probe::script(&items));
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        let (t, s, timeout) = (transport.clone(), script.clone(), opts.timeout);
        let out = tokio::task::spawn_blocking(move || t.exec(&s, &[], timeout))
            .await
            .unwrap_or_else(|e| {
                Err(TransportError::new(
                    FailureClass::Transient,
                    format!("probe task failed: {e}"),
                ))
            });
        match out {
            Ok(o) if o.status == 0 => {
                break probe::parse(&o.stdout, &items).map_err(|e| {
                    (
                        e.class(),
                        format!(
                            "host `{}`: probe output refused (fail closed): {e}",
                            host.name()
                        ),
                    )
                });
            }
            Ok(o) => {
                break Err((
                    FailureClass::Execution,
                    format!(
                        "host `{}`: probe exited with status {}: {}",
                        host.name(),
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                ));
            }
            Err(e) if e.class.is_retryable() && attempts <= opts.retries => {
                tracing::info!(host = host.name(), attempt = attempts, error = %e, "probe failed; retrying");
                tokio::time::sleep(retry::backoff(opts.backoff, attempts)).await;
            }
            Err(e) => break Err((e.class, e.message)),
        }
    };
    HostProbe {
        result,
        attempts,
        at: crate::clock::now_rfc3339(),
    }
}

/// Transports for the target hosts that have one; a host whose transport
/// cannot even be built gets its failure as a probe result.
pub type Transports = BTreeMap<String, Arc<dyn Transport>>;

/// Build a transport for every target host (SSH sessions open lazily).
pub fn connect_all(
    state: &DesiredState,
    targets: &[String],
    opts: &ProbeOpts,
) -> (Transports, BTreeMap<String, HostProbe>) {
    let mut transports = BTreeMap::new();
    let mut failed = BTreeMap::new();
    for name in targets {
        match connect(&state.hosts[name], opts) {
            Ok(t) => {
                transports.insert(name.clone(), t);
            }
            Err(e) => {
                failed.insert(
                    name.clone(),
                    HostProbe {
                        result: Err((e.class, e.message)),
                        attempts: 1,
                        at: crate::clock::now_rfc3339(),
                    },
                );
            }
        }
    }
    (transports, failed)
}

/// Probe every host that has a transport, concurrently (at most
/// `concurrency` at once). Sessions already open are reused.
pub async fn probe_all(
    state: &DesiredState,
    transports: &Transports,
    opts: &ProbeOpts,
) -> BTreeMap<String, HostProbe> {
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut set = JoinSet::new();
    for (name, t) in transports {
        let host = state.hosts[name].clone();
        let (sem, opts, t) = (sem.clone(), opts.clone(), t.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let p = probe_host(&host, t, &opts).await;
            (host.inv.name.clone(), p)
        });
    }
    let mut probes = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let (name, p) = joined.expect("probe task panicked");
        probes.insert(name, p);
    }
    probes
}

/// Connect to and probe every target host concurrently.
pub async fn probe_fleet(
    state: &DesiredState,
    targets: &[String],
    opts: &ProbeOpts,
) -> (Transports, BTreeMap<String, HostProbe>) {
    let (transports, mut probes) = connect_all(state, targets, opts);
    probes.extend(probe_all(state, &transports, opts).await);
    (transports, probes)
}

/// Diff and plan every host, then decide.
pub fn plan_and_decide(
    state: &DesiredState,
    revision: &str,
    targets: &[String],
    probes: &BTreeMap<String, HostProbe>,
    mode: DispatchMode,
    kill_switch: bool,
) -> (BTreeMap<String, Vec<Change>>, Plan, RunDecision) {
    let mut changes = BTreeMap::new();
    let mut host_plans = Vec::new();
    let mut errors: BTreeMap<String, (FailureClass, String)> = BTreeMap::new();
    for name in targets {
        let host = &state.hosts[name];
        match &probes[name].result {
            Err((class, msg)) => {
                errors.insert(name.clone(), (*class, msg.clone()));
                host_plans.push(HostPlan::failed(name, msg.clone()));
            }
            Ok(actual) => {
                let unsupported: Vec<&str> = host
                    .resources
                    .iter()
                    .filter(|r| !diff::is_supported(r))
                    .map(|r| r.id.as_str())
                    .collect();
                if !unsupported.is_empty() {
                    let msg = format!(
                        "host `{name}`: this build of tend cannot converge {} yet; nothing is dispatched to this host (fail closed)",
                        unsupported.join(", ")
                    );
                    errors.insert(name.clone(), (FailureClass::Capability, msg.clone()));
                    host_plans.push(HostPlan::failed(name, msg));
                    continue;
                }
                // What the host lacks (a unit nothing provides) is a capability
                // mismatch, found at plan time, before anything runs.
                let refused = diff::refusals(host, actual);
                if !refused.is_empty() {
                    let msg = format!(
                        "host `{name}`: {}; nothing is dispatched to this host (fail closed)",
                        refused.join("; ")
                    );
                    errors.insert(name.clone(), (FailureClass::Capability, msg.clone()));
                    host_plans.push(HostPlan::failed(name, msg));
                    continue;
                }
                let c = diff::diff_host(host, actual);
                host_plans.push(plan::plan_host(host, &c));
                changes.insert(name.clone(), c);
            }
        }
    }
    let plan = Plan::new(revision, host_plans);
    let facts: Vec<HostFacts> = plan
        .hosts
        .iter()
        .map(|hp| HostFacts {
            plan: hp,
            protected: state.hosts[&hp.host].inv.protected,
            preflight_error: errors.get(&hp.host).cloned(),
        })
        .collect();
    let decision = policy::decide(&facts, mode, state.config.canary.as_deref(), kill_switch);
    (changes, plan, decision)
}

/// The whole front half.
pub async fn prepare(
    state: &DesiredState,
    opts: &ProbeOpts,
    revision: &str,
    targets: Vec<String>,
    mode: DispatchMode,
    kill_switch: bool,
) -> Prepared {
    let (transports, probes) = probe_fleet(state, &targets, opts).await;
    let (changes, plan, decision) =
        plan_and_decide(state, revision, &targets, &probes, mode, kill_switch);
    Prepared {
        revision: revision.to_string(),
        targets,
        transports,
        probes,
        changes,
        plan,
        decision,
    }
}
