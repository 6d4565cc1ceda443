//! Changes -> a plan per host: a DAG of steps in waves, every non-destructive
//! step before the barrier, the destructive steps after it; plus the plan hash
//! and the operation hash that a confirmation token must name.
//!
//! Ordering: a step that creates or updates runs after the steps that create
//! or update what it needs (its parent directory, its owner, its `requires`);
//! removals run in the reverse direction (contents before their directory).
//! A step that `requires` a removal, or a service restarted by one, runs after
//! that removal.
//! A replacement (something of another type at the path) runs after the
//! removals of managed resources under its path.
//! A non-destructive step that depends on a destructive one also waits until
//! after the barrier, so the barrier never reorders a dependency.
//!
//! Restarts (`restart_on`): a running service whose `restart_on` names
//! resources with a create or update step in this plan gets one extra step,
//! a restart (action `update`, non-destructive, same resource id as the
//! service), after all of those trigger steps. Its `triggers` (equal to its
//! `after`) lists them: dispatch runs it only if at least one of them
//! succeeded. It does not depend on the service's own step (an enable that
//! fails, or a disable that waits for a token, must not keep a change that
//! did land from reaching the service). None is planned
//! when the service's own step starts it (it starts after the triggers, with
//! what they wrote), when it is meant to be stopped, in a teardown, or when
//! the service is pruned (it is torn down).
//!
//! Invariant: pure and deterministic. The same inputs give byte-identical
//! plan JSON; nothing here reads a clock or the environment.

use std::collections::BTreeSet;

use serde::Serialize;

use super::actual::Observed;
use super::diff::{Action, Change, FieldChange};
use super::fingerprint::Approval;
use super::model::{EdgeReason, Host, dependency_edges, is_ancestor};
use super::spec::{Lifecycle, ResourceSpec};

pub const SCHEMA_VERSION: u32 = 1;

/// One step of a host plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Position in the host's execution order (0-based).
    pub index: usize,
    /// Resource id.
    pub id: String,
    pub kind: &'static str,
    pub action: Action,
    pub destructive: bool,
    pub wave: usize,
    /// Indices of the steps that must succeed first.
    pub after: Vec<usize>,
    pub fields: Vec<FieldChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Remove what is at the path before creating (a destructive replacement).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
    /// A restart step: the steps (all in `after`) that it restarts on; it runs
    /// only if at least one of them succeeded. Empty for every other step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<usize>,
    /// A service step: `systemctl daemon-reload` first (a unit file of the
    /// service changes in this run, or the unit was not loaded).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub daemon_reload: bool,
    /// A restart owed by an earlier pass (SPEC 8.3): it runs whatever its
    /// triggers do in this pass.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub owed: bool,
    /// A destructive step: its change and the object as probed, which the
    /// operation hash covers (SPEC 8.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// The resource is `sensitive: true` (SPEC 8.6): its output and content
    /// are withheld from logs, messages and diffs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `guard: connection` (SPEC 8.7): the write runs last, in a batch of
    /// its own, under a dead-man timer on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<StepGuard>,
}

/// A guarded write's terms (SPEC 8.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StepGuard {
    /// Seconds the host waits for tend to confirm the change.
    pub revert_after_secs: u64,
    /// The host reverted this very definition before: the step is held
    /// until the desired definition changes (`GuardReverted`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reverted: bool,
}

impl Step {
    /// A restart planned for `restart_on`, or owed from an earlier pass.
    pub fn is_restart(&self) -> bool {
        !self.triggers.is_empty() || self.owed
    }
}

/// What the probe saw at a path-managing step's path, as far as a step's
/// builder must know it: the step may remove or replace only an object of
/// this type (SPEC 8.1), and checks on the host that it still is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathType {
    Nothing,
    File,
    Directory,
    Symlink,
    /// A socket, fifo or device.
    Other,
}

impl PathType {
    pub const ALL: [PathType; 5] = [
        PathType::Nothing,
        PathType::File,
        PathType::Directory,
        PathType::Symlink,
        PathType::Other,
    ];

    /// The type a `file`, `directory` or `symlink` resource manages.
    pub fn of_kind(kind: &str) -> Option<PathType> {
        match kind {
            "file" => Some(PathType::File),
            "directory" => Some(PathType::Directory),
            "symlink" => Some(PathType::Symlink),
            _ => None,
        }
    }

    /// The type of an observed object, None for what is not a path.
    pub fn of_observed(o: &Observed) -> Option<PathType> {
        match o {
            Observed::Absent => Some(PathType::Nothing),
            Observed::File(_) => Some(PathType::File),
            Observed::Directory(_) => Some(PathType::Directory),
            Observed::Symlink { .. } => Some(PathType::Symlink),
            Observed::Other { .. } => Some(PathType::Other),
            _ => None,
        }
    }

    /// For people: `nothing`, `a regular file`, ...
    pub fn describe(self) -> &'static str {
        match self {
            PathType::Nothing => "nothing",
            PathType::File => "a regular file",
            PathType::Directory => "a directory",
            PathType::Symlink => "a symlink",
            PathType::Other => "a special file",
        }
    }
}

impl Step {
    /// What the plan saw at the path of a `file`, `directory` or `symlink`
    /// step; None for other kinds. The step itself says it: diff makes a
    /// create only where nothing is, an update without `replace` only of an
    /// object of the resource's own type, a delete only of that type, and
    /// a replacement names the type it replaces in its `type` field (as
    /// `diff` describes it: `regular file`, `directory`, `symlink`, or
    /// another word for a special file).
    pub fn path_seen(&self) -> Option<PathType> {
        let own = PathType::of_kind(self.kind)?;
        Some(match self.action {
            Action::Create => PathType::Nothing,
            Action::Update if self.replace => {
                let from = self
                    .fields
                    .iter()
                    .find(|f| f.field == "type")
                    .and_then(|f| f.from.as_deref());
                match from {
                    Some("regular file") => PathType::File,
                    Some("directory") => PathType::Directory,
                    Some("symlink") => PathType::Symlink,
                    Some("nothing") | None => PathType::Nothing,
                    Some(_) => PathType::Other,
                }
            }
            Action::Update | Action::Delete | Action::Noop => own,
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub create: usize,
    pub update: usize,
    pub delete: usize,
}

/// The plan of one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostPlan {
    pub host: String,
    /// Why the host could not be planned (probe failed, refused); then no steps.
    pub error: Option<String>,
    pub changes: Counts,
    /// Number of destructive steps.
    pub destructive: usize,
    /// Steps `0..barrier` run before the barrier; `barrier..` after it.
    pub barrier: usize,
    /// Step indices per wave; a wave's steps depend only on earlier waves.
    pub waves: Vec<Vec<usize>>,
    pub steps: Vec<Step>,
}

impl HostPlan {
    pub fn failed(host: &str, error: String) -> Self {
        HostPlan {
            host: host.to_string(),
            error: Some(error),
            changes: Counts::default(),
            destructive: 0,
            barrier: 0,
            waves: vec![],
            steps: vec![],
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.steps.is_empty()
    }

    pub fn destructive_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.destructive)
    }
}

/// The plan document (`plan.json`, `tend plan --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub schema_version: u32,
    pub desired_revision: String,
    pub hosts: Vec<HostPlan>,
    /// Operation hash over the destructive steps of every host in the plan,
    /// or None when there are none.
    pub operation: Option<String>,
    /// Hosts that have destructive steps (the scope a token must name).
    pub operation_hosts: Vec<String>,
    /// sha256 over this document without `plan_hash`.
    pub plan_hash: String,
}

impl Plan {
    /// Assemble the document and its hashes. Hosts are sorted by name.
    pub fn new(desired_revision: &str, mut hosts: Vec<HostPlan>) -> Self {
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        let (operation, operation_hosts) = match operation_hash(&hosts) {
            Some((h, hs)) => (Some(h), hs),
            None => (None, vec![]),
        };
        let mut plan = Plan {
            schema_version: SCHEMA_VERSION,
            desired_revision: desired_revision.to_string(),
            hosts,
            operation,
            operation_hosts,
            plan_hash: String::new(),
        };
        let body = serde_json::to_vec(&plan).expect("plan serializes");
        plan.plan_hash = super::sha256_hex(&body);
        plan
    }

    pub fn host(&self, name: &str) -> Option<&HostPlan> {
        self.hosts.iter().find(|h| h.host == name)
    }

    /// Canonical JSON bytes, pretty-printed with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("plan serializes");
        v.push(b'\n');
        v
    }
}

/// sha256 over the canonical JSON of the destructive steps, sorted by host
/// and step (the step's resource id, unique within a host), with the host
/// set. Each step is [`operation_item`]: host, resource id, action, change
/// and the fingerprint of the object as probed (SPEC 8.1). The desired
/// revision is left out on purpose: a commit that leaves the destructive
/// steps and their objects as they are leaves the hash, and a pending
/// token, valid.
///
/// The step order is left out on purpose too: a non-destructive step that
/// appears or goes (drift between the plan an operator confirmed and the
/// re-probe at the barrier) can move destructive steps relative to each
/// other without changing what they destroy, and must not void the token.
pub fn operation_hash(hosts: &[HostPlan]) -> Option<(String, Vec<String>)> {
    let mut items = Vec::new();
    let mut scope = BTreeSet::new();
    for h in hosts {
        for s in h.destructive_steps() {
            scope.insert(h.host.clone());
            items.push((h.host.clone(), s.id.clone(), operation_item(&h.host, s)));
        }
    }
    if items.is_empty() {
        return None;
    }
    items.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let list: Vec<serde_json::Value> = items.into_iter().map(|(_, _, v)| v).collect();
    let bytes = serde_json::to_vec(&list).expect("json");
    Some((super::sha256_hex(&bytes), scope.into_iter().collect()))
}

/// What the operation hash covers of one destructive step: `host`,
/// `resource_id`, `action`, `change` and `observed` (SPEC 8.1). serde_json
/// without `preserve_order` sorts object keys, so the JSON is canonical.
pub fn operation_item(host: &str, s: &Step) -> serde_json::Value {
    let (change, observed) = match &s.approval {
        Some(a) => (
            serde_json::Value::from(a.change.as_str()),
            a.observed.clone(),
        ),
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    serde_json::json!({
        "host": host,
        "resource_id": s.id,
        "action": s.action.as_str(),
        "change": change,
        "observed": observed,
    })
}

/// Restarts to plan: (service resource index, trigger resource indices).
/// The restarts of a host: (its service's change, the changes it restarts
/// on, whether it is owed from an earlier pass). An owed restart is planned
/// even when nothing it restarts on changes now.
fn restarts(host: &Host, changes: &[Change]) -> Vec<(usize, Vec<usize>, bool)> {
    if host.lifecycle == Lifecycle::Absent {
        return vec![];
    }
    let mut out = Vec::new();
    for (i, r) in host.resources.iter().enumerate() {
        let ResourceSpec::Service(s) = &r.spec else {
            continue;
        };
        // Started by its own step (after the triggers), or meant to be stopped
        // (pruned: torn down).
        let starts = changes[i]
            .fields
            .iter()
            .any(|f| f.field == "running" && f.to.as_deref() == Some("active"));
        if !s.running || starts || r.pruned {
            continue;
        }
        let mut triggers: Vec<usize> = s
            .restart_on
            .iter()
            // Resources are sorted by id: a search, not a scan per trigger.
            .filter_map(|t| host.resources.binary_search_by(|x| x.id.cmp(t)).ok())
            .filter(|&j| j != i && matches!(changes[j].action, Action::Create | Action::Update))
            .collect();
        triggers.sort();
        triggers.dedup();
        let owed = host.owed_restarts.binary_search(&r.id).is_ok();
        if !triggers.is_empty() || owed {
            out.push((i, triggers, owed));
        }
    }
    out
}

/// Plan one host from its changes (one per resource, in resource order).
pub fn plan_host(host: &Host, changes: &[Change]) -> HostPlan {
    debug_assert_eq!(host.resources.len(), changes.len());
    let n = changes.len();
    // Nodes 0..n are the resources' changes; n.. are restarts, one per entry.
    let restarts = restarts(host, changes);
    let total = n + restarts.len();
    let mut active: Vec<bool> = changes.iter().map(|c| c.action != Action::Noop).collect();
    active.resize(total, true);
    let removal = |i: usize| i < n && changes[i].action == Action::Delete;
    // The change a node stands for (a restart: its service's).
    let change_of = |i: usize| {
        if i < n {
            &changes[i]
        } else {
            &changes[restarts[i - n].0]
        }
    };

    // Step-level edges among active changes.
    let mut preds: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); total];
    for (a, b, why) in dependency_edges(&host.resources) {
        if !active[a] || !active[b] {
            continue;
        }
        match (removal(a), removal(b)) {
            (false, false) => {
                preds[b].insert(a);
            }
            // Removals in reverse: what is inside goes before its container.
            (true, true) => {
                preds[a].insert(b);
            }
            // An explicit `requires` on a removal, and a restart triggered by
            // one, still follow it. Edges only ever run from removals to
            // the rest, never back, so this cannot close a cycle.
            (true, false) if matches!(why, EdgeReason::Requires | EdgeReason::RestartTrigger) => {
                preds[b].insert(a);
            }
            // Otherwise mixed pairs cannot depend on each other meaningfully
            // (a removed container cannot hold a created resource; validation
            // refuses that), so no edge.
            _ => {}
        }
    }
    // A replacement removes whatever is at its path, a directory with all in
    // it included. Removals of managed resources under that path go first:
    // after the replacement they would find nothing, or worse, reach through
    // the symlink that now stands at the path.
    for (i, c) in changes.iter().enumerate() {
        let Some(p) = host.resources[i].path().filter(|_| c.replace) else {
            continue;
        };
        for (j, r) in host.resources.iter().enumerate() {
            if removal(j) && r.path().is_some_and(|q| is_ancestor(p, q)) {
                preds[i].insert(j);
            }
        }
    }
    // A restart depends on its triggers only: whether the service's own
    // step (an enable, say) succeeds or waits for a token, the change that
    // did land must reach the service.
    for (k, (_, triggers, _)) in restarts.iter().enumerate() {
        preds[n + k].extend(triggers.iter().copied());
    }

    // Phase: after the barrier if destructive, or if it depends on such.
    let order = topo_order(total, &active, &preds);
    // Only edges that close a cycle point forward in `order`; drop them.
    let mut pos = vec![usize::MAX; total];
    for (k, &i) in order.iter().enumerate() {
        pos[i] = k;
    }
    for i in 0..total {
        let at = pos[i];
        preds[i].retain(|&p| pos[p] < at);
    }
    let destructive = |i: usize| i < n && changes[i].destructive;
    let mut late = vec![false; total];
    for &i in &order {
        late[i] = destructive(i) || preds[i].iter().any(|&p| late[p]);
    }
    // Depth within the DAG; late steps start after every early wave.
    let mut depth = vec![0usize; total];
    for &i in &order {
        depth[i] = preds[i].iter().map(|&p| depth[p] + 1).max().unwrap_or(0);
    }
    let early_waves = order
        .iter()
        .filter(|&&i| !late[i])
        .map(|&i| depth[i] + 1)
        .max()
        .unwrap_or(0);
    let mut late_depth = vec![0usize; total];
    for &i in &order {
        if late[i] {
            late_depth[i] = preds[i]
                .iter()
                .filter(|&&p| late[p])
                .map(|&p| late_depth[p] + 1)
                .max()
                .unwrap_or(0);
        }
    }
    let wave_of = |i: usize| {
        if late[i] {
            early_waves + late_depth[i]
        } else {
            depth[i]
        }
    };

    // Final order: early before late, then by wave, then by resource id
    // (a restart after its service's own step, which is in an earlier wave).
    let mut chosen: Vec<usize> = order.clone();
    chosen.sort_by(|&a, &b| {
        (late[a], wave_of(a), &change_of(a).id, a >= n).cmp(&(
            late[b],
            wave_of(b),
            &change_of(b).id,
            b >= n,
        ))
    });
    let mut step_of = vec![usize::MAX; total];
    for (k, &i) in chosen.iter().enumerate() {
        step_of[i] = k;
    }
    let mut counts = Counts::default();
    let mut steps = Vec::with_capacity(chosen.len());
    for (k, &i) in chosen.iter().enumerate() {
        let c = change_of(i);
        let mut after: Vec<usize> = preds[i].iter().map(|&p| step_of[p]).collect();
        after.sort();
        if i >= n {
            counts.update += 1;
            let (_, triggers, owed) = &restarts[i - n];
            let mut trigger_steps: Vec<usize> = triggers.iter().map(|&t| step_of[t]).collect();
            trigger_steps.sort();
            let ids: Vec<&str> = triggers.iter().map(|&t| changes[t].id.as_str()).collect();
            let (why, note) = if ids.is_empty() {
                (
                    "owed: an earlier restart did not succeed".to_string(),
                    "owed from an earlier pass: runs until it succeeds",
                )
            } else {
                (
                    format!("on change of {}", ids.join(", ")),
                    "restarts once, if at least one of the steps it restarts on succeeds",
                )
            };
            steps.push(Step {
                index: k,
                id: c.id.clone(),
                kind: c.kind,
                action: Action::Update,
                destructive: false,
                wave: wave_of(i),
                after,
                fields: vec![FieldChange {
                    field: "restart".into(),
                    from: None,
                    to: Some(why),
                }],
                note: Some(note.into()),
                replace: false,
                triggers: trigger_steps,
                daemon_reload: c.daemon_reload,
                owed: *owed,
                approval: None,
                sensitive: false,
                guard: None,
            });
            continue;
        }
        match c.action {
            Action::Create => counts.create += 1,
            Action::Update => counts.update += 1,
            Action::Delete => counts.delete += 1,
            Action::Noop => {}
        }
        steps.push(Step {
            index: k,
            id: c.id.clone(),
            kind: c.kind,
            action: c.action,
            destructive: c.destructive,
            wave: wave_of(i),
            after,
            fields: c.fields.clone(),
            note: c.note.clone(),
            replace: c.replace,
            triggers: vec![],
            daemon_reload: c.daemon_reload,
            owed: false,
            approval: c.approval.clone(),
            sensitive: c.sensitive,
            guard: c.guard,
        });
    }
    let barrier = chosen.iter().filter(|&&i| !late[i]).count();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for s in &steps {
        if waves.len() <= s.wave {
            waves.resize(s.wave + 1, vec![]);
        }
        waves[s.wave].push(s.index);
    }
    waves.retain(|w| !w.is_empty());
    HostPlan {
        host: host.name().to_string(),
        error: None,
        changes: counts,
        destructive: steps.iter().filter(|s| s.destructive).count(),
        barrier,
        waves,
        steps,
    }
}

/// Kahn's algorithm over active nodes, smallest index first (deterministic).
/// Validation rejects cycles; should one slip through (planning the
/// best-effort state of an invalid desired state), the smallest stuck node is
/// taken next as if it were ready, so every node is ordered, and the caller
/// drops the edges into it that close the cycle.
fn topo_order(n: usize, active: &[bool], preds: &[BTreeSet<usize>]) -> Vec<usize> {
    let mut indeg: Vec<usize> = (0..n).map(|i| preds[i].len()).collect();
    let mut succs: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, ps) in preds.iter().enumerate() {
        for &p in ps {
            succs[p].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| active[i] && indeg[i] == 0).collect();
    let mut done = vec![false; n];
    let mut out = Vec::new();
    loop {
        while let Some(i) = ready.pop_first() {
            done[i] = true;
            out.push(i);
            for &s in &succs[i] {
                indeg[s] = indeg[s].saturating_sub(1);
                if indeg[s] == 0 && !done[s] {
                    ready.insert(s);
                }
            }
        }
        match (0..n).find(|&i| active[i] && !done[i]) {
            Some(stuck) => {
                indeg[stuck] = 0;
                ready.insert(stuck);
            }
            None => return out,
        }
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "plan_props.rs"]
mod props;
