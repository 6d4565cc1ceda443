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
use crate::core::prune::{self, Managed};
use crate::core::retry::{self, FailureClass};
use crate::core::spec::{DispatchMode, ResourceSpec, TendConfig, TransportKind};
use crate::core::token::{TokenFile, Verdict};
use crate::probe::{self, ProbeItem};
use crate::store::db::Db;
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
    /// How long the probe took, connecting and retries included; `None`
    /// when no probe ran (the host's transport could not be built).
    pub elapsed: Option<Duration>,
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
    /// The token that decided the run's operation (valid, or the refused one
    /// the operator should see), with the file it came from.
    pub token: Option<(Verdict, TokenFile)>,
    /// Every token checked against the operation.
    pub token_verdicts: Vec<Verdict>,
    /// Hosts refused before planning: (class, message).
    pub preflight_errors: PreflightErrors,
    /// Hosts whose recorded revision fences off this one (SPEC 8.1): why.
    pub fences: Fences,
}

/// Per host, why revision fencing refuses the desired revision there.
pub type Fences = BTreeMap<String, String>;

/// Resolve the hosts selected on the command line: the named ones and those
/// carrying any `--tag` (every host when neither is given), less every
/// `--exclude`. A name, tag or exclusion that matches no host is an error
/// (a typo must never widen or empty the selection silently), and so is a
/// selection left empty.
pub fn resolve_targets(
    state: &DesiredState,
    named: &[String],
    select: &crate::cli::Select,
) -> Result<Vec<String>> {
    let known = || {
        state
            .hosts
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    for n in named.iter().chain(&select.exclude) {
        if !state.hosts.contains_key(n) {
            bail!("unknown host `{n}`: the inventory has {}", known());
        }
    }
    for t in &select.tags {
        if !state.hosts.values().any(|h| h.inv.tags.contains(t)) {
            bail!("no host in the inventory carries the tag `{t}`");
        }
    }
    let mut out: Vec<String> = if named.is_empty() && select.tags.is_empty() {
        state.hosts.keys().cloned().collect()
    } else {
        state
            .hosts
            .iter()
            .filter(|(name, h)| {
                named.contains(name) || h.inv.tags.iter().any(|t| select.tags.contains(t))
            })
            .map(|(name, _)| name.clone())
            .collect()
    };
    out.retain(|h| !select.exclude.contains(h));
    if out.is_empty() {
        bail!("no host is left to work on: every selected host is excluded");
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
            let identity = |inv: &crate::core::spec::InventoryHost| {
                inv.identity
                    .as_deref()
                    .map(|p| crate::settings::resolve_relative(&opts.desired_dir, p))
            };
            // The jump host's own address: validation made sure it has one.
            let jump = host.jump.as_deref().and_then(|j| {
                Some(crate::transport::jump::shared(SshTarget {
                    host: j.name.clone(),
                    address: j.address.clone()?,
                    port: j.port,
                    user: j.user.clone(),
                    identity: identity(j),
                    host_key: j.host_key.clone(),
                    known_hosts: opts.known_hosts.clone(),
                    become_sudo: false,
                    jump: None,
                }))
            });
            if inv.jump.is_some() && jump.is_none() {
                return Err(TransportError::new(
                    FailureClass::Capability,
                    format!("host `{}`: its jump host has no address", inv.name),
                ));
            }
            Ok(Arc::new(SshTransport::new(SshTarget {
                host: inv.name.clone(),
                address,
                port: inv.port,
                user: inv.user.clone(),
                identity: identity(inv),
                host_key: inv.host_key.clone(),
                known_hosts: opts.known_hosts.clone(),
                become_sudo: inv.become_ == Some(crate::core::spec::Become::Sudo),
                jump,
            })))
        }
    }
}

/// What the probe must look at for a host: one item per resource of a kind
/// this build probes (every kind). A path item whose resource may destroy
/// a directory asks for its tree digest too (SPEC 8.1): a directory to
/// remove (absent, pruned, or in a teardown), and a file or symlink, in
/// case a directory is in its way (the digest is computed only when one
/// is).
pub fn probe_items(host: &Host) -> Vec<ProbeItem> {
    let teardown = host.lifecycle == crate::core::spec::Lifecycle::Absent;
    host.resources
        .iter()
        .map(|r| {
            let id = r.id.clone();
            match &r.spec {
                ResourceSpec::File(s) => {
                    let item = ProbeItem::path(id, &s.path).with_tree();
                    if teardown || r.pruned || r.state().is_absent() {
                        item
                    } else {
                        item.cacheable()
                    }
                }
                ResourceSpec::Directory(s) => {
                    let item = ProbeItem::path(id, &s.path);
                    if teardown || r.pruned || r.state().is_absent() {
                        item.with_tree()
                    } else {
                        item
                    }
                }
                ResourceSpec::Symlink(s) => ProbeItem::path(id, &s.path).with_tree(),
                ResourceSpec::User(s) => ProbeItem::user(id, &s.name),
                ResourceSpec::Group(s) => ProbeItem::group(id, &s.name),
                ResourceSpec::Package(s) => ProbeItem::package(id, &s.name),
                ResourceSpec::Command(s) => {
                    ProbeItem::command(id, s.creates.clone(), s.unless.clone())
                }
                ResourceSpec::Service(s) => ProbeItem::service(id, &s.name),
            }
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
    /// `--allow-older`: apply a git revision to hosts that last applied one
    /// it does not descend from (SPEC 8.1).
    pub allow_older: bool,
    /// Whether the probe may skip hashing files unchanged since the host's
    /// hash cache saw them: `Read` by default (plan, probe), `ReadWrite`
    /// for a pass that dispatches, `Off` for the barrier re-probe and a
    /// guard's re-probe.
    pub hash_cache: probe::HashCache,
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
            allow_older: false,
            hash_cache: probe::HashCache::Read,
        }
    }
}

/// The probe script goes to `sh` on stdin, not as an argument: an argument
/// is capped at 128 KiB, which a host with thousands of resources would pass.
/// Nothing in the script reads stdin itself.
const PROBE_COMMAND: &str = crate::transport::STDIN_SCRIPT;

/// Probe one host: one remote command per attempt; transient failures are
/// retried with doubling backoff.
pub async fn probe_host(host: &Host, transport: Arc<dyn Transport>, opts: &ProbeOpts) -> HostProbe {
    let begun = std::time::Instant::now();
    let items = Arc::new(probe_items(host));
    let script = Arc::new(probe::script_with(&items, opts.hash_cache));
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        let (t, s, timeout) = (transport.clone(), script.clone(), opts.timeout);
        let out = tokio::task::spawn_blocking(move || t.exec(PROBE_COMMAND, s.as_bytes(), timeout))
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
        elapsed: Some(begun.elapsed()),
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
                        elapsed: None,
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

/// Hosts refused before planning, with the class and message of the refusal.
pub type PreflightErrors = BTreeMap<String, (FailureClass, String)>;

/// Diff and plan every host. Hosts that could not be probed or use a kind
/// this build cannot converge get a failed host plan and a preflight error.
pub fn plan_fleet(
    state: &DesiredState,
    revision: &str,
    targets: &[String],
    probes: &BTreeMap<String, HostProbe>,
) -> (BTreeMap<String, Vec<Change>>, Plan, PreflightErrors) {
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
    (changes, Plan::new(revision, host_plans), errors)
}

/// Decide the hosts of a controller pass: like [`decide`], except that in
/// canary mode a pass that does not hold the canary (which has a pass of its
/// own) holds its hosts back instead of being `PolicyBlocked`.
pub fn decide_in_fleet(
    state: &DesiredState,
    plan: &Plan,
    (errors, fences): (&PreflightErrors, &Fences),
    mode: DispatchMode,
    kill_switch: bool,
    authorized: bool,
) -> RunDecision {
    match (mode, state.config.canary.as_deref()) {
        (DispatchMode::Canary, Some(c))
            if state.hosts.contains_key(c) && plan.host(c).is_none() =>
        {
            policy::decide_canary_elsewhere(
                &host_facts(state, plan, errors, fences),
                c,
                kill_switch,
                authorized,
            )
        }
        _ => decide(state, plan, (errors, fences), mode, kill_switch, authorized),
    }
}

/// What policy needs to know of each planned host.
fn host_facts<'a>(
    state: &DesiredState,
    plan: &'a Plan,
    errors: &PreflightErrors,
    fences: &Fences,
) -> Vec<HostFacts<'a>> {
    plan.hosts
        .iter()
        .map(|hp| HostFacts {
            plan: hp,
            protected: state.hosts[&hp.host].inv.protected,
            preflight_error: errors.get(&hp.host).cloned(),
            fence: fences.get(&hp.host).cloned(),
        })
        .collect()
}

/// Decide every host of a plan.
pub fn decide(
    state: &DesiredState,
    plan: &Plan,
    (errors, fences): (&PreflightErrors, &Fences),
    mode: DispatchMode,
    kill_switch: bool,
    authorized: bool,
) -> RunDecision {
    policy::decide(
        &host_facts(state, plan, errors, fences),
        mode,
        state.config.canary.as_deref(),
        kill_switch,
        authorized,
    )
}

impl TokenInput {
    /// The token files of a state dir, checked by the clock now.
    pub fn load(sd: &crate::store::StateDir, db: Option<&Db>, max_ttl: Duration) -> Result<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Ok(TokenInput {
            files: crate::tokens::load(sd, db, now)?,
            now,
            max_ttl,
        })
    }
}

/// The confirmation tokens a pass may use, and the clock to check them by.
#[derive(Clone, Debug, Default)]
pub struct TokenInput {
    pub files: Vec<TokenFile>,
    /// Seconds since the epoch.
    pub now: i64,
    pub max_ttl: Duration,
}

/// The whole front half. The plan's operation (if any) is checked against
/// the tokens; a valid one authorizes its destructive steps. `open` holds
/// transports kept from earlier passes; the other targets get new ones.
#[allow(clippy::too_many_arguments)] // the inputs of a pass; a struct would only rename them
pub async fn prepare(
    state: &DesiredState,
    opts: &ProbeOpts,
    revision: &str,
    targets: Vec<String>,
    mode: DispatchMode,
    kill_switch: bool,
    tokens: &TokenInput,
    open: Transports,
) -> Prepared {
    let missing: Vec<String> = targets
        .iter()
        .filter(|t| !open.contains_key(*t))
        .cloned()
        .collect();
    let (mut transports, mut probes) = connect_all(state, &missing, opts);
    transports.extend(open);
    probes.extend(probe_all(state, &transports, opts).await);
    let (changes, plan, errors) = plan_fleet(state, revision, &targets, &probes);
    let fences = if opts.allow_older {
        Fences::new()
    } else {
        fences(&opts.desired_dir, revision, &probes)
    };
    let (token, verdicts) = match &plan.operation {
        Some(op) => {
            let hosts = plan.operation_hosts.iter().cloned().collect();
            crate::tokens::choose(&tokens.files, op, &hosts, tokens.now, tokens.max_ttl)
        }
        None => (None, vec![]),
    };
    let authorized = token.as_ref().is_some_and(|(v, _)| v.is_valid());
    let decision = decide(
        state,
        &plan,
        (&errors, &fences),
        mode,
        kill_switch,
        authorized,
    );
    Prepared {
        preflight_errors: errors,
        fences,
        revision: revision.to_string(),
        targets,
        transports,
        probes,
        changes,
        plan,
        decision,
        token,
        token_verdicts: verdicts,
    }
}

/// The managed-resource records of the target hosts, read from SQLite (none
/// when there is no database yet). A record that cannot be read back is an
/// error: forgetting it would silently stop pruning it.
pub fn load_managed(db: Option<&Db>, targets: &[String]) -> Result<Records> {
    let mut out = Records::default();
    let Some(db) = db else { return Ok(out) };
    // Connection guards arrived with schema 10; an older read-only
    // database (`tend plan`) has none.
    let guards = db.schema_version().unwrap_or(0) >= 10;
    for host in targets {
        if guards {
            out.reverted
                .insert(host.clone(), db.reverted_definitions(host)?);
        }
    }
    let now = std::time::SystemTime::now();
    let hour_ago =
        humantime::format_rfc3339_millis(now - std::time::Duration::from_secs(3600)).to_string();
    for host in targets {
        let mut list = Vec::new();
        // A database from before corrections were recorded has none.
        let corrections = db.corrections_since(host, &hour_ago).unwrap_or_default();
        for row in db.managed(host)? {
            let spec = prune::spec_from_json(&row.spec_json).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read back managed resource `{}` of host `{host}` from {} ({e}); refusing to plan without it",
                    row.resource_id,
                    db.path().display()
                )
            })?;
            let (n, last) = corrections
                .get(&row.resource_id)
                .map(|(n, at)| (*n, crate::core::token::parse_rfc3339(at)))
                .unwrap_or((0, None));
            let now_secs =
                crate::core::token::parse_rfc3339(&crate::clock::now_rfc3339()).unwrap_or(0);
            list.push(Managed {
                applied: crate::core::model::Applied {
                    definition: row.definition_sha256.clone(),
                    corrections_last_hour: n,
                    last_correction_secs: last.map(|t| now_secs.saturating_sub(t).max(0) as u64),
                    hold: false,
                    reverted: false,
                },
                id: row.resource_id,
                spec,
            });
        }
        out.managed.insert(host.clone(), list);
    }
    Ok(out)
}

/// What the database says about the target hosts' resources: the managed
/// records (prune, drift policy) and the definitions a connection guard
/// reverted (held, SPEC 8.7).
#[derive(Clone, Debug, Default)]
pub struct Records {
    pub managed: BTreeMap<String, Vec<Managed>>,
    /// Per host, per resource id: definition digests reverted on the host.
    pub reverted: BTreeMap<String, BTreeMap<String, std::collections::BTreeSet<String>>>,
}

/// The desired state with every target host's pruned resources added.
/// Plan the restarts owed by earlier passes (SPEC 8.3) on the target hosts.
pub fn add_owed_restarts(
    state: &mut DesiredState,
    db: Option<&Db>,
    targets: &[String],
) -> Result<()> {
    let Some(db) = db else { return Ok(()) };
    for h in targets {
        let owed = db.owed_restarts(h)?;
        if let Some(host) = state.hosts.get_mut(h) {
            host.owed_restarts = owed;
        }
    }
    Ok(())
}

pub fn with_prunes(state: &DesiredState, records: &Records) -> DesiredState {
    prunes_applied(state.clone(), records)
}

/// [`with_prunes`] for a pass over `targets`: only their hosts are copied,
/// and the canary's (canary mode asks whether the canary is a host of the
/// inventory, [`decide_in_fleet`]). The controller runs a pass per host,
/// many at once; each holding a copy of the whole fleet's desired state made
/// memory quadratic in hosts (500 hosts: 500 copies of 500 hosts).
pub fn with_prunes_for(
    state: &DesiredState,
    records: &Records,
    targets: &[String],
) -> DesiredState {
    let hosts = targets
        .iter()
        .chain(state.config.canary.as_ref())
        .filter_map(|t| state.hosts.get(t).map(|h| (t.clone(), h.clone())))
        .collect();
    let state = DesiredState {
        config: state.config.clone(),
        hosts,
    };
    prunes_applied(state, records)
}

fn prunes_applied(mut state: DesiredState, records: &Records) -> DesiredState {
    let resync = state.config.resync.0.as_secs();
    for (host, list) in &records.managed {
        if let Some(h) = state.hosts.remove(host) {
            let mut h = prune::with_pruned(h, list);
            // A contested resource is corrected at most once per resync.
            for r in &mut h.resources {
                if let Some(a) = r.applied.as_mut() {
                    a.hold = a.contested() && a.last_correction_secs.is_some_and(|s| s < resync);
                }
            }
            state.hosts.insert(host.clone(), h);
        }
    }
    // After the managed records, which set `applied`.
    for (host, reverted) in &records.reverted {
        let Some(h) = state.hosts.get_mut(host) else {
            continue;
        };
        for r in &mut h.resources {
            if r.guard().is_some()
                && reverted
                    .get(&r.id)
                    .is_some_and(|d| d.contains(&r.definition_digest()))
            {
                r.applied.get_or_insert_with(Default::default).reverted = true;
            }
        }
    }
    state
}

/// Revision fencing (SPEC 8.1): the hosts whose recorded revision `revision`
/// does not descend from, with why. Only git commits are compared (a
/// revision of a directory outside git has no ancestry); the same commit,
/// dirty or not, is no step back. One `git merge-base` per distinct
/// recorded commit.
fn fences(dir: &Path, revision: &str, probes: &BTreeMap<String, HostProbe>) -> Fences {
    let mut out = Fences::new();
    let Some(ours) = crate::source::commit_of(revision) else {
        return out;
    };
    let mut known: BTreeMap<String, bool> = BTreeMap::new();
    for (host, p) in probes {
        let Some(recorded) = p
            .result
            .as_ref()
            .ok()
            .and_then(|a| a.facts.revision.as_deref())
        else {
            continue;
        };
        let Some(theirs) = crate::source::commit_of(recorded) else {
            continue;
        };
        if theirs == ours {
            continue;
        }
        let descends = *known
            .entry(theirs.to_string())
            .or_insert_with(|| crate::source::is_ancestor(dir, theirs, ours));
        if !descends {
            out.insert(
                host.clone(),
                format!(
                    "revision fencing: the desired revision {revision} is not a descendant of {recorded}, the revision last applied to host `{host}` (a stale checkout?); pull, or pass --allow-older to apply it anyway"
                ),
            );
        }
    }
    out
}
