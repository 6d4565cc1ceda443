//! Desired x actual -> changes, one per resource.
//!
//! Classification (SPEC.md sections 4 and 7): every delete is destructive
//! (a file, directory, symlink, user, group or package); replacing one kind
//! of file-system object with another (a directory with a file, a file with a
//! symlink) removes what was there and is destructive too; replacing a
//! file's content, retargeting a symlink, changing only mode or owner, and
//! changing a user's uid, home, shell or supplementary groups or a group's
//! gid are non-destructive updates. A `command` whose guard says it will run
//! is a `create`, destructive only when it says `destructive: true`;
//! commands are never undone (`lifecycle: absent` leaves them a noop). For a
//! service, starting or enabling is a non-destructive update, stopping or
//! disabling a destructive one, and a teardown (stop and disable) a
//! destructive delete.
//!
//! Invariant: pure and total: every resource gets exactly one change, in
//! resource-id order.

use serde::Serialize;

use std::collections::{BTreeMap, BTreeSet};

use super::actual::{FileState, GuardState, HostActual, Meta, Observed, ServiceState, UserState};
use super::fingerprint::{self, Approval};
use super::model::{Host, Resource, unit_name, unit_of_file};
use super::spec::{Lifecycle, Mode, ResourceSpec, ServiceSpec, State};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Delete,
    Noop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Noop => "noop",
        }
    }
}

/// One field that differs, rendered for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub field: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// What to do about one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub id: String,
    pub kind: &'static str,
    pub action: Action,
    pub destructive: bool,
    /// What differs (empty for noop).
    pub fields: Vec<FieldChange>,
    /// Why the change is destructive, or other context for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The existing object must be removed first (a destructive replacement).
    #[serde(skip)]
    pub replace: bool,
    /// A service: run `systemctl daemon-reload` before touching the unit,
    /// because one of its unit files changes in this run or systemd has not
    /// loaded it (see [`diff_host`]).
    #[serde(skip)]
    pub daemon_reload: bool,
    /// A destructive change: what it destroys and the object as probed,
    /// which the operation hash covers (SPEC 8.1). Set by [`diff_host`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// `sensitive: true` on the resource (SPEC 8.6).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// A difference left on the host and reported (SPEC 8.7: `drift:
    /// report`, or a contested resource already corrected within this
    /// resync): the action is `noop`, `fields` say what differs.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reported: bool,
    /// A guarded write (SPEC 8.7), set by [`diff_host`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<super::plan::StepGuard>,
}

impl Change {
    fn new(r: &Resource, action: Action) -> Self {
        Change {
            id: r.id.clone(),
            kind: r.kind(),
            action,
            destructive: action == Action::Delete,
            fields: vec![],
            note: None,
            replace: false,
            daemon_reload: false,
            approval: None,
            sensitive: r.sensitive(),
            reported: false,
            guard: None,
        }
    }

    fn field(mut self, field: &str, from: Option<String>, to: Option<String>) -> Self {
        self.fields.push(FieldChange {
            field: field.to_string(),
            from,
            to,
        });
        self
    }
}

/// The kinds this build can probe and converge: every kind. A kind added to
/// the model before its probe and steps would be validated, but a host that
/// used it refused before dispatch (fail closed).
pub fn is_supported(r: &Resource) -> bool {
    match r.spec {
        ResourceSpec::File(_)
        | ResourceSpec::Directory(_)
        | ResourceSpec::Symlink(_)
        | ResourceSpec::User(_)
        | ResourceSpec::Group(_)
        | ResourceSpec::Package(_)
        | ResourceSpec::Command(_)
        | ResourceSpec::Service(_) => true,
    }
}

/// Diff every resource of a host. Resources the probe did not report count as
/// unknown and are refused by policy, so they get a noop here.
///
/// A service change also learns here whether systemd must reload its unit
/// files first: when a `file` resource that is one of the unit's unit files
/// or drop-ins changes in this run, or when the unit did not load when it was
/// probed (its package or unit file comes in this run, see [`refusals`]).
pub fn diff_host(host: &Host, actual: &HostActual) -> Vec<Change> {
    let observed = |r: &Resource| actual.resources.get(&r.id).unwrap_or(&Observed::NotProbed);
    let mut changes: Vec<Change> = host
        .resources
        .iter()
        .map(|r| {
            // A pruned resource is removed, whatever the host's lifecycle.
            let lifecycle = if r.pruned {
                Lifecycle::Absent
            } else {
                host.lifecycle
            };
            let mut c = diff_resource(r, observed(r), lifecycle);
            // Drift policy (SPEC 8.7): a difference under the definition
            // last applied is left and reported for `drift: report` (unless
            // the object is gone), and for a contested resource corrected
            // within this resync.
            if c.action != Action::Noop && !r.pruned && r.applied_as_now() {
                let absent = matches!(observed(r), Observed::Absent);
                let why = if r.drift_report() && !absent {
                    Some("drift reported, not corrected (`drift: report`): change the definition to apply it")
                } else if r.applied.as_ref().is_some_and(|a| a.hold) {
                    Some("contested: another manager changes it; corrected at most once per resync")
                } else {
                    None
                };
                if let Some(why) = why {
                    c.action = Action::Noop;
                    c.destructive = false;
                    c.replace = false;
                    c.reported = true;
                    c.note = Some(why.into());
                }
            }
            if let Some(after) = r.guard()
                && matches!(c.action, Action::Create | Action::Update)
            {
                let reverted = r.applied.as_ref().is_some_and(|a| a.reverted);
                c.guard = Some(super::plan::StepGuard {
                    revert_after_secs: after.as_secs(),
                    reverted,
                });
                if !reverted && c.note.is_none() {
                    c.note = Some(format!(
                        "connection guard: the host restores the old file unless tend reaches it again within {}",
                        humantime::format_duration(after)
                    ));
                }
                if reverted {
                    c.note = Some(
                        "held: its connection guard reverted this definition on the host (GuardReverted); change the definition to apply it again"
                            .into(),
                    );
                }
            }
            if r.pruned && c.action == Action::Delete {
                c.note =
                    Some("pruned: tend applied it and it is no longer in the desired state".into());
            }
            c.approval = fingerprint::approval(r, &c, observed(r), actual.trees.get(&r.id));
            c
        })
        .collect();
    // A set, and providers indexed once: a lookup per service kept this
    // linear in the number of resources (a scan per service was not).
    let changed_units: BTreeSet<&str> = host
        .resources
        .iter()
        .zip(&changes)
        .filter(|(_, c)| c.action != Action::Noop)
        .filter_map(|(r, _)| match &r.spec {
            ResourceSpec::File(f) => unit_of_file(&f.path).map(|(unit, _)| unit),
            _ => None,
        })
        .collect();
    let providers = Providers::of(host);
    for (r, c) in host.resources.iter().zip(changes.iter_mut()) {
        if let (ResourceSpec::Service(s), Observed::Service(st)) = (&r.spec, observed(r)) {
            let unit = unit_name(&s.name);
            c.daemon_reload = changed_units.contains(unit.as_str()) || !st.is_loaded();
            if !st.is_loaded()
                && let Some(by) = providers.of_service(s)
            {
                c.note = Some(format!(
                    "unit `{unit}` is {} on the host for now; `{by}` provides it in this run",
                    st.load_state
                ));
            }
        }
    }
    changes
}

/// The resources of a host that bring a service's unit in this run: a
/// present (and not pruned) `package` with the service's name (as
/// `dependency_edges` orders it), or such a `file` that is the unit's unit
/// file. The first in resource order wins, by package name and by unit.
struct Providers<'a> {
    /// By package name and by unit: (index in the host's resources, resource).
    packages: BTreeMap<&'a str, (usize, &'a Resource)>,
    unit_files: BTreeMap<&'a str, (usize, &'a Resource)>,
}

impl<'a> Providers<'a> {
    fn of(host: &'a Host) -> Self {
        let mut p = Providers {
            packages: BTreeMap::new(),
            unit_files: BTreeMap::new(),
        };
        for (i, r) in host
            .resources
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.state().is_absent() && !r.pruned)
        {
            match &r.spec {
                ResourceSpec::Package(pk) => {
                    p.packages.entry(pk.name.as_str()).or_insert((i, r));
                }
                ResourceSpec::File(f) => {
                    if let Some((unit, true)) = unit_of_file(&f.path) {
                        p.unit_files.entry(unit).or_insert((i, r));
                    }
                }
                _ => {}
            }
        }
        p
    }

    /// The id of the first resource (in resource order) that provides the
    /// service's unit.
    fn of_service(&self, s: &ServiceSpec) -> Option<&'a str> {
        let unit = unit_name(&s.name);
        let base = s.name.strip_suffix(".service").unwrap_or(&s.name);
        let package = self.packages.get(base);
        let file = self.unit_files.get(unit.as_str());
        [package, file]
            .into_iter()
            .flatten()
            .min_by_key(|(i, _)| *i)
            .map(|(_, r)| r.id.as_str())
    }
}

/// Why a host cannot be planned from what was probed, one message per
/// problem; empty when it can. A service whose unit does not load on the host
/// (not found, or a bad unit file) cannot be converged, unless a `package`
/// or unit `file` in the desired state provides it in this same run: then
/// the service's steps are planned after it (`dependency_edges`), from the
/// state the probe saw (inactive, and disabled as far as systemd can tell).
/// A teardown never needs the unit: there is nothing to stop; neither does
/// a pruned service (it is torn down too).
pub fn refusals(host: &Host, actual: &HostActual) -> Vec<String> {
    if host.lifecycle == Lifecycle::Absent {
        return vec![];
    }
    let mut out = Vec::new();
    let providers = Providers::of(host);
    for r in host.resources.iter().filter(|r| !r.pruned) {
        if let (ResourceSpec::Service(s), Some(Observed::Service(st))) =
            (&r.spec, actual.resources.get(&r.id))
            && !st.is_loaded()
            && providers.of_service(s).is_none()
        {
            let what = if st.load_state == "not-found" {
                "does not exist on the host".to_string()
            } else {
                format!("does not load on the host (LoadState {})", st.load_state)
            };
            out.push(format!(
                "service `{}`: unit `{}` {what}, and no `package` or unit `file` in the desired state provides it; install it, or fix the name",
                r.id, st.unit
            ));
        }
    }
    out
}

fn describe(o: &Observed) -> &'static str {
    match o {
        Observed::Absent => "nothing",
        Observed::File(_) => "a regular file",
        Observed::Directory(_) => "a directory",
        Observed::Symlink { .. } => "a symlink",
        Observed::Other { .. } => "a special file",
        Observed::NotProbed => "an unprobed object",
        Observed::User(_) => "a user",
        Observed::Group(_) => "a group",
        Observed::Package(_) => "an installed package",
        Observed::Guard(_) => "a command guard",
        Observed::Service(_) => "a service",
    }
}

/// A file's content for a plan line: its digest and size, or for a
/// sensitive resource its size alone, marked (SPEC 8.6).
fn content_label(r: &Resource, sha: &str, size: usize) -> String {
    if r.sensitive() {
        format!("(sensitive) {size} bytes")
    } else {
        format!("sha256:{} ({size} bytes)", &sha[..sha.len().min(12)])
    }
}

fn owner_matches(want: &str, name: &Option<String>, id: u32) -> bool {
    if want.bytes().all(|b| b.is_ascii_digit()) {
        want.parse::<u32>() == Ok(id)
    } else {
        name.as_deref() == Some(want)
    }
}

fn owner_label(name: &Option<String>, id: u32) -> String {
    name.clone().unwrap_or_else(|| id.to_string())
}

/// Compare mode/owner/group where they are managed.
fn meta_fields(
    mut c: Change,
    meta: &Meta,
    mode: Option<Mode>,
    owner: &Option<String>,
    group: &Option<String>,
) -> Change {
    if let Some(m) = mode
        && m.0 != meta.mode
    {
        c = c.field(
            "mode",
            Some(Mode(meta.mode).to_string()),
            Some(m.to_string()),
        );
    }
    // Owner and group compare the same way: by name, or by id when the
    // desired value is numeric.
    for (field, want, name, id) in [
        ("owner", owner, &meta.owner, meta.uid),
        ("group", group, &meta.group, meta.gid),
    ] {
        if let Some(w) = want
            && !owner_matches(w, name, id)
        {
            c = c.field(field, Some(owner_label(name, id)), Some(w.clone()));
        }
    }
    c
}

/// Diff one resource. `lifecycle: absent` makes every resource absent.
pub fn diff_resource(r: &Resource, observed: &Observed, lifecycle: Lifecycle) -> Change {
    let want_absent = lifecycle == Lifecycle::Absent || r.state() == State::Absent;
    if *observed == Observed::NotProbed {
        return Change::new(r, Action::Noop);
    }
    if let ResourceSpec::Command(s) = &r.spec {
        return diff_command(r, s, observed, lifecycle);
    }
    if let (ResourceSpec::Service(s), Observed::Service(st)) = (&r.spec, observed) {
        return diff_service(r, s, st, lifecycle);
    }
    if want_absent {
        return diff_absent(r, observed);
    }
    match (&r.spec, observed) {
        (ResourceSpec::File(s), Observed::Absent) => {
            let mut c = Change::new(r, Action::Create);
            c = match &r.content {
                Some(ct) => c.field(
                    "content",
                    None,
                    Some(content_label(r, &ct.sha256, ct.bytes.len())),
                ),
                None => c.field("content", None, Some("empty".into())),
            };
            c = c.field(
                "mode",
                None,
                Some(s.mode.unwrap_or(Mode(0o644)).to_string()),
            );
            if let Some(o) = &s.owner {
                c = c.field("owner", None, Some(o.clone()));
            }
            if let Some(g) = &s.group {
                c = c.field("group", None, Some(g.clone()));
            }
            c
        }
        (ResourceSpec::File(s), Observed::File(FileState { meta, size, sha256 })) => {
            let mut c = Change::new(r, Action::Update);
            if let Some(ct) = &r.content
                && ct.sha256 != *sha256
            {
                c = c.field(
                    "content",
                    Some(content_label(r, sha256, *size as usize)),
                    Some(content_label(r, &ct.sha256, ct.bytes.len())),
                );
            }
            finish_update(meta_fields(c, meta, s.mode, &s.owner, &s.group))
        }
        (ResourceSpec::Directory(s), Observed::Absent) => {
            let mut c = Change::new(r, Action::Create).field(
                "mode",
                None,
                Some(s.mode.unwrap_or(Mode(0o755)).to_string()),
            );
            if let Some(o) = &s.owner {
                c = c.field("owner", None, Some(o.clone()));
            }
            if let Some(g) = &s.group {
                c = c.field("group", None, Some(g.clone()));
            }
            c
        }
        (ResourceSpec::Directory(s), Observed::Directory(meta)) => finish_update(meta_fields(
            Change::new(r, Action::Update),
            meta,
            s.mode,
            &s.owner,
            &s.group,
        )),
        (ResourceSpec::Symlink(s), Observed::Absent) => {
            Change::new(r, Action::Create).field("target", None, s.target.clone())
        }
        (ResourceSpec::Symlink(s), Observed::Symlink { target }) => {
            let want = s.target.as_deref().unwrap_or_default();
            if want.as_bytes() == target.as_slice() {
                Change::new(r, Action::Noop)
            } else {
                Change::new(r, Action::Update).field(
                    "target",
                    Some(String::from_utf8_lossy(target).into_owned()),
                    Some(want.to_string()),
                )
            }
        }
        (ResourceSpec::File(_) | ResourceSpec::Directory(_) | ResourceSpec::Symlink(_), other) => {
            // Something of another type is in the way: removing it is destructive.
            let mut c = Change::new(r, Action::Update).field(
                "type",
                Some(describe(other).trim_start_matches("a ").to_string()),
                Some(r.kind().to_string()),
            );
            c.destructive = true;
            c.replace = true;
            c.note = Some(format!("replaces {} at the path", describe(other)));
            c
        }
        (ResourceSpec::User(s), Observed::Absent) => {
            let mut c = Change::new(r, Action::Create);
            if let Some(uid) = s.uid {
                c = c.field("uid", None, Some(uid.to_string()));
            }
            if let Some(home) = &s.home {
                c = c.field("home", None, Some(home.clone()));
            }
            if let Some(shell) = &s.shell {
                c = c.field("shell", None, Some(shell.clone()));
            }
            if !s.groups.is_empty() {
                c = c.field("groups", None, Some(group_list(&s.groups, "")));
            }
            if s.system {
                c = c.field("system", None, Some("yes".into()));
            }
            if c.fields.is_empty() {
                c = c.field("exists", Some("no".into()), Some("yes".into()));
            }
            c
        }
        (ResourceSpec::User(s), Observed::User(u)) => {
            let mut c = Change::new(r, Action::Update);
            if let Some(uid) = s.uid
                && uid != u.uid
            {
                c = c.field("uid", Some(u.uid.to_string()), Some(uid.to_string()));
            }
            if let Some(home) = &s.home
                && *home != u.home
            {
                c = c.field("home", Some(u.home.clone()), Some(home.clone()));
            }
            if let Some(shell) = &s.shell
                && *shell != u.shell
            {
                c = c.field("shell", Some(u.shell.clone()), Some(shell.clone()));
            }
            if !s.groups.is_empty() && !same_groups(&s.groups, u) {
                c = c.field(
                    "groups",
                    Some(group_list(&u.groups, &u.primary_group)),
                    Some(group_list(&s.groups, &u.primary_group)),
                );
            }
            finish_update(c)
        }
        (ResourceSpec::Group(s), Observed::Absent) => {
            let c = Change::new(r, Action::Create);
            match s.gid {
                Some(gid) => c.field("gid", None, Some(gid.to_string())),
                None => c.field("exists", Some("no".into()), Some("yes".into())),
            }
        }
        (ResourceSpec::Group(s), Observed::Group(g)) => match s.gid {
            Some(gid) if gid != g.gid => Change::new(r, Action::Update).field(
                "gid",
                Some(g.gid.to_string()),
                Some(gid.to_string()),
            ),
            _ => Change::new(r, Action::Noop),
        },
        (ResourceSpec::Package(_), Observed::Absent) => {
            Change::new(r, Action::Create).field("installed", Some("no".into()), Some("yes".into()))
        }
        (ResourceSpec::Package(_), Observed::Package(_)) => Change::new(r, Action::Noop),
        // Observations that do not fit the kind (which the probe parser never
        // produces) stay a noop.
        _ => Change::new(r, Action::Noop),
    }
}

/// A unit file state in which the unit starts at boot (or was linked in).
fn is_enabled_in_any_way(st: &ServiceState) -> bool {
    matches!(
        st.unit_file_state.as_str(),
        "enabled" | "enabled-runtime" | "linked" | "linked-runtime"
    )
}

/// Services: `enabled` and `running`, each changed only where it differs.
/// Enabling and starting are non-destructive; disabling and stopping are
/// destructive. A teardown stops and disables (a destructive delete). Units
/// whose enablement systemd fixes (static, generated, ...) keep it: `enabled`
/// is not managed for them. A masked unit is never unmasked: enabling or
/// starting it is planned and fails with systemctl's own message.
fn diff_service(r: &Resource, s: &ServiceSpec, st: &ServiceState, lifecycle: Lifecycle) -> Change {
    let teardown = lifecycle == Lifecycle::Absent;
    let (want_enabled, want_running) = if teardown {
        (false, false)
    } else {
        (s.enabled, s.running)
    };
    let from = |v: &str| (!v.is_empty()).then(|| v.to_string());
    let mut c = Change::new(
        r,
        if teardown {
            Action::Delete
        } else {
            Action::Update
        },
    );
    let mut stops = Vec::new();
    if st.enablement_is_fixed() {
        if !want_enabled && !teardown {
            c.note = Some(format!(
                "`enabled: false` is left alone: the unit is {}",
                st.unit_file_state
            ));
        }
    } else if want_enabled && !st.is_enabled() {
        c = c.field("enabled", from(&st.unit_file_state), Some("enabled".into()));
    } else if !want_enabled && is_enabled_in_any_way(st) {
        c = c.field(
            "enabled",
            from(&st.unit_file_state),
            Some("disabled".into()),
        );
        stops.push("disables");
    }
    if want_running && !st.is_running() {
        c = c.field("running", from(&st.active_state), Some("active".into()));
    } else if !want_running && st.is_running() {
        c = c.field("running", from(&st.active_state), Some("inactive".into()));
        stops.push("stops");
    }
    if c.fields.is_empty() {
        c.action = Action::Noop;
        c.destructive = false;
        return c;
    }
    if !stops.is_empty() {
        c.destructive = true;
        c.note = Some(format!("{} `{}`", stops.join(" and "), st.unit));
    }
    c
}

/// Supplementary groups as `usermod -G` will leave them: sorted, without
/// duplicates, and without the primary group (which `id -nG` lists once, as
/// the primary group, whether or not the user is also a member).
fn group_set<'a>(groups: &'a [String], primary: &str) -> BTreeSet<&'a str> {
    groups
        .iter()
        .map(String::as_str)
        .filter(|g| *g != primary)
        .collect()
}

fn group_list(groups: &[String], primary: &str) -> String {
    let set = group_set(groups, primary);
    if set.is_empty() {
        "(none)".into()
    } else {
        set.into_iter().collect::<Vec<_>>().join(",")
    }
}

fn same_groups(want: &[String], u: &UserState) -> bool {
    group_set(want, &u.primary_group) == group_set(&u.groups, &u.primary_group)
}

/// A command runs when its guard says so; it is never undone.
fn diff_command(
    r: &Resource,
    s: &crate::core::spec::CommandSpec,
    observed: &Observed,
    lifecycle: Lifecycle,
) -> Change {
    let Observed::Guard(g) = observed else {
        return Change::new(r, Action::Noop);
    };
    if lifecycle == Lifecycle::Absent {
        let mut c = Change::new(r, Action::Noop);
        c.note = Some("commands are not undone by a teardown".into());
        return c;
    }
    // A sensitive command's run text and guards appear nowhere (SPEC 8.6).
    let why = if s.sensitive {
        "its guards are sensitive".to_string()
    } else {
        guard_reason(s, g)
    };
    if !g.will_run {
        let mut c = Change::new(r, Action::Noop);
        c.note = Some(why);
        return c;
    }
    let run = if s.sensitive {
        "(sensitive)".to_string()
    } else {
        first_line(&s.run)
    };
    let mut c = Change::new(r, Action::Create).field("run", None, Some(run));
    c.destructive = s.destructive;
    c.note = Some(format!("will run: {why}"));
    c
}

/// Why the guard says what it says, for people.
fn guard_reason(s: &crate::core::spec::CommandSpec, g: &GuardState) -> String {
    let mut why = Vec::new();
    if let (Some(path), Some(exists)) = (&s.creates, g.creates_exists) {
        why.push(if exists {
            format!("`{path}` exists")
        } else {
            format!("`{path}` does not exist")
        });
    }
    if let Some(status) = g.unless_status {
        why.push(format!("the `unless` check exited {status}"));
    }
    if why.is_empty() {
        "no `creates` or `unless` guard: it runs on every apply".into()
    } else {
        why.join(" and ")
    }
}

/// The first line of a script, shortened, for a plan line.
fn first_line(script: &str) -> String {
    const MAX: usize = 60;
    let lines: Vec<&str> = script.trim().lines().collect();
    let first = lines.first().copied().unwrap_or("");
    let mut out: String = first.chars().take(MAX).collect();
    if first.chars().count() > MAX || lines.len() > 1 {
        out.push('…');
    }
    out
}

fn finish_update(c: Change) -> Change {
    if c.fields.is_empty() {
        Change {
            action: Action::Noop,
            ..c
        }
    } else {
        c
    }
}

fn diff_absent(r: &Resource, observed: &Observed) -> Change {
    // Only remove what the resource describes: a `file` resource removes a
    // regular file, not a directory that happens to be at its path.
    let present = matches!(
        (&r.spec, observed),
        (ResourceSpec::File(_), Observed::File(_))
            | (ResourceSpec::Directory(_), Observed::Directory(_))
            | (ResourceSpec::Symlink(_), Observed::Symlink { .. })
            | (ResourceSpec::User(_), Observed::User(_))
            | (ResourceSpec::Group(_), Observed::Group(_))
            | (ResourceSpec::Package(_), Observed::Package(_))
    );
    if present {
        let mut c = match observed {
            Observed::Package(p) => Change::new(r, Action::Delete).field(
                "installed",
                Some(match &p.version {
                    Some(v) => format!("yes ({v})"),
                    None => "yes".into(),
                }),
                Some("no".into()),
            ),
            _ => Change::new(r, Action::Delete).field(
                "exists",
                Some("yes".into()),
                Some("no".into()),
            ),
        };
        match r.spec {
            ResourceSpec::Directory(_) => {
                c.note = Some("removes the directory and everything in it".into());
            }
            ResourceSpec::User(_) => {
                c.note = Some("removes the account; its home directory and files stay".into());
            }
            _ => {}
        }
        c
    } else {
        let mut c = Change::new(r, Action::Noop);
        if !matches!(observed, Observed::Absent) {
            c.note = Some(format!("{} is at the path; left alone", describe(observed)));
        }
        c
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::actual::{GroupState, PackageState};
    use crate::core::model::{Content, Origin};
    use crate::core::spec::{
        CommandSpec, DirectorySpec, FileSpec, GroupSpec, PackageSpec, SymlinkSpec, UserSpec,
    };
    use crate::core::yaml::Pos;

    fn res(spec: ResourceSpec, content: Option<&str>) -> Resource {
        let id = format!(
            "{}:{}",
            crate::core::model::kind_name(&spec),
            match &spec {
                ResourceSpec::File(s) => &s.path,
                ResourceSpec::Directory(s) => &s.path,
                ResourceSpec::Symlink(s) => &s.path,
                ResourceSpec::User(s) => &s.name,
                ResourceSpec::Group(s) => &s.name,
                ResourceSpec::Package(s) => &s.name,
                ResourceSpec::Command(s) => &s.name,
                _ => "x",
            }
        );
        Resource {
            id,
            spec,
            content: content.map(|c| Content::new(c.as_bytes().to_vec())),
            origin: Origin {
                file: "hosts/h.yaml".into(),
                pos: Pos::START,
                key_pos: Pos::START,
                requires_pos: vec![],
                restart_on_pos: vec![],
                guard_pos: Pos::START,
            },
            from_group: None,
            replaces_group: None,
            pruned: false,
            applied: None,
        }
    }

    fn file(mode: Option<u32>, state: State) -> ResourceSpec {
        ResourceSpec::File(FileSpec {
            path: "/a".into(),
            content: Some("hi\n".into()),
            source: None,
            mode: mode.map(Mode),
            owner: None,
            group: None,
            state,
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
            guard: None,
            revert_after: None,
        })
    }

    pub(crate) fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            owner: Some("root".into()),
            group: Some("root".into()),
        }
    }

    pub(crate) fn fstate(mode: u32, content: &str) -> Observed {
        Observed::File(FileState {
            meta: meta(mode),
            size: content.len() as u64,
            sha256: crate::core::sha256_hex(content.as_bytes()),
        })
    }

    /// (resource, observed) -> (action, destructive, changed fields)
    fn check(spec: ResourceSpec, observed: Observed, want: (Action, bool, &[&str])) {
        let r = res(spec, Some("hi\n"));
        let c = diff_resource(&r, &observed, Lifecycle::Running);
        let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!((c.action, c.destructive, fields.as_slice()), want, "{c:?}");
    }

    #[test]
    fn file_table() {
        use Action::*;
        check(
            file(None, State::Present),
            Observed::Absent,
            (Create, false, &["content", "mode"]),
        );
        check(
            file(None, State::Present),
            fstate(0o600, "hi\n"),
            (Noop, false, &[]),
        );
        check(
            file(Some(0o644), State::Present),
            fstate(0o600, "hi\n"),
            (Update, false, &["mode"]),
        );
        check(
            file(None, State::Present),
            fstate(0o644, "old\n"),
            (Update, false, &["content"]),
        );
        check(
            file(None, State::Absent),
            fstate(0o644, "old\n"),
            (Delete, true, &["exists"]),
        );
        check(
            file(None, State::Absent),
            Observed::Absent,
            (Noop, false, &[]),
        );
        check(
            file(None, State::Absent),
            Observed::Directory(meta(0o755)),
            (Noop, false, &[]),
        );
        check(
            file(None, State::Present),
            Observed::Directory(meta(0o755)),
            (Update, true, &["type"]),
        );
    }

    #[test]
    fn directory_and_symlink_table() {
        use Action::*;
        let dir = |mode: Option<u32>, state| {
            ResourceSpec::Directory(DirectorySpec {
                path: "/d".into(),
                mode: mode.map(Mode),
                owner: Some("root".into()),
                group: None,
                state,
                id: None,
                requires: vec![],
                sensitive: false,
                drift: Default::default(),
            })
        };
        check(
            dir(None, State::Present),
            Observed::Absent,
            (Create, false, &["mode", "owner"]),
        );
        check(
            dir(Some(0o700), State::Present),
            Observed::Directory(meta(0o755)),
            (Update, false, &["mode"]),
        );
        check(
            dir(None, State::Present),
            Observed::Directory(meta(0o755)),
            (Noop, false, &[]),
        );
        check(
            dir(None, State::Absent),
            Observed::Directory(meta(0o755)),
            (Delete, true, &["exists"]),
        );
        let link = |t: &str, state| {
            ResourceSpec::Symlink(SymlinkSpec {
                path: "/l".into(),
                target: Some(t.into()),
                state,
                id: None,
                requires: vec![],
                sensitive: false,
                drift: Default::default(),
            })
        };
        let at = |t: &str| Observed::Symlink {
            target: t.as_bytes().to_vec(),
        };
        check(
            link("/x", State::Present),
            Observed::Absent,
            (Create, false, &["target"]),
        );
        check(link("/x", State::Present), at("/x"), (Noop, false, &[]));
        check(
            link("/x", State::Present),
            at("/y"),
            (Update, false, &["target"]),
        );
        check(
            link("/x", State::Present),
            fstate(0o644, "x"),
            (Update, true, &["type"]),
        );
        check(
            link("/x", State::Absent),
            at("/y"),
            (Delete, true, &["exists"]),
        );
    }

    #[test]
    fn owner_by_name_or_id() {
        assert!(owner_matches("root", &Some("root".into()), 0));
        assert!(owner_matches("0", &Some("root".into()), 0));
        assert!(!owner_matches("1000", &None, 0));
        assert!(!owner_matches("app", &None, 1000));
    }

    fn meta_of(uid: u32, owner: Option<&str>) -> Meta {
        Meta {
            mode: 0o644,
            uid,
            gid: uid,
            owner: owner.map(str::to_string),
            group: owner.map(str::to_string),
        }
    }

    /// A file with no content, mode, owner or group.
    pub(crate) fn bare_file() -> FileSpec {
        FileSpec {
            path: "/a".into(),
            content: None,
            source: None,
            mode: None,
            owner: None,
            group: None,
            state: State::Present,
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
            guard: None,
            revert_after: None,
        }
    }

    fn owned(owner: &str, group: Option<&str>) -> ResourceSpec {
        ResourceSpec::File(FileSpec {
            owner: Some(owner.into()),
            group: group.map(str::to_string),
            ..bare_file()
        })
    }

    fn diff_of(spec: ResourceSpec, content: Option<&str>, observed: &Observed) -> Change {
        diff_resource(&res(spec, content), observed, Lifecycle::Running)
    }

    #[test]
    fn owner_by_numeric_id() {
        let file_of = |uid, name| {
            Observed::File(FileState {
                meta: meta_of(uid, name),
                size: 0,
                sha256: crate::core::sha256_hex(b""),
            })
        };
        // A numeric owner matches the uid, whatever its name.
        let c = diff_of(
            owned("1000", Some("1000")),
            None,
            &file_of(1000, Some("app")),
        );
        assert_eq!(c.action, Action::Noop, "{c:?}");
        let c = diff_of(owned("1000", None), None, &file_of(1000, None));
        assert_eq!(c.action, Action::Noop, "{c:?}");
        // ... and only the uid.
        let c = diff_of(owned("1000", Some("0")), None, &file_of(0, Some("root")));
        let fields: Vec<_> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            (c.action, c.destructive, fields.as_slice()),
            (Action::Update, false, &["owner"][..])
        );
        assert_eq!(c.fields[0].from.as_deref(), Some("root"));
        assert_eq!(c.fields[0].to.as_deref(), Some("1000"));
        // A name never matches an id without that name; the label shows the id.
        let c = diff_of(owned("app", None), None, &file_of(1000, None));
        assert_eq!(c.action, Action::Update);
        assert_eq!(c.fields[0].from.as_deref(), Some("1000"));
        // The same holds for directories.
        let d = ResourceSpec::Directory(DirectorySpec {
            path: "/d".into(),
            mode: None,
            owner: Some("0".into()),
            group: Some("1000".into()),
            state: State::Present,
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
        });
        let mut m = meta_of(0, Some("root"));
        m.gid = 1000;
        m.group = Some("app".into());
        let c = diff_of(d, None, &Observed::Directory(m));
        assert_eq!(c.action, Action::Noop, "{c:?}");
    }

    #[test]
    fn symlink_target_that_is_not_utf8() {
        let link = |t: &str| {
            ResourceSpec::Symlink(SymlinkSpec {
                path: "/l".into(),
                target: Some(t.into()),
                state: State::Present,
                id: None,
                requires: vec![],
                sensitive: false,
                drift: Default::default(),
            })
        };
        let at = |t: &[u8]| Observed::Symlink { target: t.to_vec() };
        // Retargeting away from a target that is not UTF-8 is a
        // non-destructive update; the old target is shown lossily.
        let c = diff_of(link("/srv/x"), None, &at(b"/srv/\xff"));
        assert_eq!((c.action, c.destructive), (Action::Update, false));
        assert_eq!(c.fields[0].from.as_deref(), Some("/srv/\u{fffd}"));
        assert_eq!(c.fields[0].to.as_deref(), Some("/srv/x"));
        // Compared as bytes: a target that only reads the same once decoded
        // lossily is still a different target.
        let c = diff_of(link("/srv/\u{fffd}"), None, &at(b"/srv/\xff"));
        assert_eq!(c.action, Action::Update, "{c:?}");
        let c = diff_of(link("/srv/\u{fffd}"), None, &at("/srv/\u{fffd}".as_bytes()));
        assert_eq!(c.action, Action::Noop, "{c:?}");
    }

    #[test]
    fn file_without_content_never_changes_content() {
        let bare = ResourceSpec::File(bare_file());
        for body in ["", "anything\n", "\u{0}binary"] {
            let c = diff_of(bare.clone(), None, &fstate(0o600, body));
            assert_eq!(c.action, Action::Noop, "{body:?}: {c:?}");
        }
        // A new one is created empty.
        let c = diff_of(bare, None, &Observed::Absent);
        assert_eq!(c.action, Action::Create);
        assert_eq!(c.fields[0].field, "content");
        assert_eq!(c.fields[0].to.as_deref(), Some("empty"));
    }

    #[test]
    fn unprobed_and_special_files() {
        use Action::*;
        // Not probed: never a change (policy refuses the host instead).
        check(
            file(None, State::Present),
            Observed::NotProbed,
            (Noop, false, &[]),
        );
        check(
            file(None, State::Absent),
            Observed::NotProbed,
            (Noop, false, &[]),
        );
        // A fifo in the way of a file is replaced, destructively; one at a
        // path declared absent for a file is left alone.
        let fifo = || Observed::Other {
            file_type: "fifo".into(),
        };
        check(
            file(None, State::Present),
            fifo(),
            (Update, true, &["type"]),
        );
        check(file(None, State::Absent), fifo(), (Noop, false, &[]));
    }

    #[test]
    fn teardown_deletes_every_present_resource() {
        let file_r = res(file(None, State::Present), Some("hi\n"));
        let dir = res(
            ResourceSpec::Directory(DirectorySpec {
                path: "/d".into(),
                mode: None,
                owner: None,
                group: None,
                state: State::Present,
                id: None,
                requires: vec![],
                sensitive: false,
                drift: Default::default(),
            }),
            None,
        );
        let link = res(
            ResourceSpec::Symlink(SymlinkSpec {
                path: "/l".into(),
                target: Some("/x".into()),
                state: State::Present,
                id: None,
                requires: vec![],
                sensitive: false,
                drift: Default::default(),
            }),
            None,
        );
        let cases = [
            // Present and as described: deleted, whatever its content or target.
            (&file_r, fstate(0o600, "other"), Action::Delete),
            (&dir, Observed::Directory(meta(0o700)), Action::Delete),
            (
                &link,
                Observed::Symlink {
                    target: b"/y".to_vec(),
                },
                Action::Delete,
            ),
            // Already gone, or something else at the path: nothing to do.
            (&file_r, Observed::Absent, Action::Noop),
            (&dir, fstate(0o644, ""), Action::Noop),
            (&link, Observed::Directory(meta(0o755)), Action::Noop),
        ];
        for (r, observed, want) in cases {
            let c = diff_resource(r, &observed, Lifecycle::Absent);
            assert_eq!(c.action, want, "{} on {observed:?}", r.id);
            assert_eq!(c.destructive, want == Action::Delete, "{}", r.id);
        }
    }

    /// (resource, observed, (action, destructive, changed fields))
    type Case = (
        ResourceSpec,
        Observed,
        (Action, bool, &'static [&'static str]),
    );
    /// A case and the note the change must carry.
    type NoteCase = (
        ResourceSpec,
        Observed,
        (Action, bool, &'static [&'static str]),
        &'static str,
    );

    fn user(uid: Option<u32>, shell: Option<&str>, groups: &[&str], state: State) -> ResourceSpec {
        ResourceSpec::User(UserSpec {
            name: "app".into(),
            uid,
            home: None,
            shell: shell.map(str::to_string),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            system: false,
            state,
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
        })
    }

    fn user_state(uid: u32, shell: &str, groups: &[&str]) -> Observed {
        Observed::User(UserState {
            uid,
            gid: uid,
            home: "/home/app".into(),
            shell: shell.into(),
            primary_group: "app".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        })
    }

    #[test]
    fn user_table() {
        use Action::*;
        let present = State::Present;
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // Created when absent, with what is given.
            (user(None, None, &[], present), Observed::Absent, (Create, false, &["exists"])),
            (user(Some(1500), Some("/bin/sh"), &["adm"], present), Observed::Absent, (Create, false, &["uid", "shell", "groups"])),
            // Only what is given is compared.
            (user(None, None, &[], present), user_state(1000, "/bin/bash", &["adm"]), (Noop, false, &[])),
            (user(Some(1000), Some("/bin/bash"), &["adm"], present), user_state(1000, "/bin/bash", &["adm"]), (Noop, false, &[])),
            (user(Some(1001), None, &[], present), user_state(1000, "/bin/bash", &[]), (Update, false, &["uid"])),
            (user(None, Some("/bin/sh"), &[], present), user_state(1000, "/bin/bash", &[]), (Update, false, &["shell"])),
            // Groups are the whole supplementary set: order, duplicates and
            // the primary group do not count; a missing or extra one does.
            (user(None, None, &["sudo", "adm", "adm", "app"], present), user_state(1000, "/bin/sh", &["adm", "sudo"]), (Noop, false, &[])),
            (user(None, None, &["adm"], present), user_state(1000, "/bin/sh", &["adm", "sudo"]), (Update, false, &["groups"])),
            (user(None, None, &["adm", "sudo"], present), user_state(1000, "/bin/sh", &[]), (Update, false, &["groups"])),
            (user(Some(1), Some("/bin/sh"), &["adm"], present), user_state(1000, "/bin/bash", &[]), (Update, false, &["uid", "shell", "groups"])),
            // Removal is destructive; an absent one is nothing to do.
            (user(None, None, &[], State::Absent), user_state(1000, "/bin/sh", &[]), (Delete, true, &["exists"])),
            (user(Some(5), None, &[], State::Absent), Observed::Absent, (Noop, false, &[])),
        ];
        for (spec, observed, want) in cases {
            check(spec, observed, want);
        }
        // The groups field shows the sets as usermod will leave them.
        let c = diff_of(
            user(None, None, &["sudo", "app", "adm"], present),
            None,
            &user_state(1000, "/bin/sh", &[]),
        );
        assert_eq!(c.fields[0].from.as_deref(), Some("(none)"));
        assert_eq!(c.fields[0].to.as_deref(), Some("adm,sudo"));
        let c = diff_of(
            user(None, None, &[], State::Absent),
            None,
            &user_state(1000, "/bin/sh", &[]),
        );
        assert!(
            c.note.unwrap().contains("home directory"),
            "deleting a user keeps its files"
        );
    }

    #[test]
    fn user_home_and_system() {
        let spec = ResourceSpec::User(UserSpec {
            name: "app".into(),
            uid: None,
            home: Some("/srv/app".into()),
            shell: None,
            groups: vec![],
            system: true,
            state: State::Present,
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
        });
        check(
            spec.clone(),
            Observed::Absent,
            (Action::Create, false, &["home", "system"]),
        );
        // `system` cannot change after creation and is not compared.
        check(
            spec,
            user_state(1000, "/bin/sh", &[]),
            (Action::Update, false, &["home"]),
        );
    }

    fn group(gid: Option<u32>, state: State) -> ResourceSpec {
        ResourceSpec::Group(GroupSpec {
            name: "app".into(),
            gid,
            state,
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
        })
    }

    #[test]
    fn group_table() {
        use Action::*;
        let at = |gid| {
            Observed::Group(GroupState {
                gid,
                members: vec!["web".into()],
            })
        };
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            (group(None, State::Present), Observed::Absent, (Create, false, &["exists"])),
            (group(Some(500), State::Present), Observed::Absent, (Create, false, &["gid"])),
            (group(None, State::Present), at(500), (Noop, false, &[])),
            (group(Some(500), State::Present), at(500), (Noop, false, &[])),
            (group(Some(501), State::Present), at(500), (Update, false, &["gid"])),
            (group(Some(501), State::Absent), at(500), (Delete, true, &["exists"])),
            (group(None, State::Absent), Observed::Absent, (Noop, false, &[])),
        ];
        for (spec, observed, want) in cases {
            check(spec, observed, want);
        }
    }

    fn package(state: State) -> ResourceSpec {
        ResourceSpec::Package(PackageSpec {
            name: "hello".into(),
            state,
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
        })
    }

    #[test]
    fn package_table() {
        use Action::*;
        let installed = || {
            Observed::Package(PackageState {
                version: Some("2.10-3".into()),
            })
        };
        check(
            package(State::Present),
            Observed::Absent,
            (Create, false, &["installed"]),
        );
        check(package(State::Present), installed(), (Noop, false, &[]));
        check(
            package(State::Absent),
            installed(),
            (Delete, true, &["installed"]),
        );
        check(package(State::Absent), Observed::Absent, (Noop, false, &[]));
        let c = diff_of(package(State::Absent), None, &installed());
        assert_eq!(c.fields[0].from.as_deref(), Some("yes (2.10-3)"));
        assert_eq!(c.fields[0].to.as_deref(), Some("no"));
    }

    fn command(creates: Option<&str>, unless: Option<&str>, destructive: bool) -> ResourceSpec {
        ResourceSpec::Command(CommandSpec {
            name: "init".into(),
            run: "/usr/local/bin/init --all\necho done\n".into(),
            creates: creates.map(str::to_string),
            unless: unless.map(str::to_string),
            destructive,
            timeout: None,
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
        })
    }

    #[test]
    fn command_table() {
        use Action::*;
        let guard = |c, u| Observed::Guard(GuardState::new(c, u));
        #[rustfmt::skip]
        let cases: Vec<NoteCase> = vec![
            (command(Some("/x"), None, false), guard(Some(false), None), (Create, false, &["run"]), "will run: `/x` does not exist"),
            (command(Some("/x"), None, false), guard(Some(true), None), (Noop, false, &[]), "`/x` exists"),
            (command(None, Some("check"), false), guard(None, Some(0)), (Noop, false, &[]), "the `unless` check exited 0"),
            (command(None, Some("check"), false), guard(None, Some(1)), (Create, false, &["run"]), "will run: the `unless` check exited 1"),
            // Both guards: either one holding is enough to skip it.
            (command(Some("/x"), Some("check"), false), guard(Some(false), Some(0)), (Noop, false, &[]), "`/x` does not exist and the `unless` check exited 0"),
            (command(Some("/x"), Some("check"), false), guard(Some(false), Some(2)), (Create, false, &["run"]), "will run: `/x` does not exist and the `unless` check exited 2"),
            // No guard: runs every time.
            (command(None, None, false), guard(None, None), (Create, false, &["run"]), "will run: no `creates` or `unless` guard: it runs on every apply"),
            // Destructive only when it says so.
            (command(Some("/x"), None, true), guard(Some(false), None), (Create, true, &["run"]), "will run: `/x` does not exist"),
            (command(Some("/x"), None, true), guard(Some(true), None), (Noop, false, &[]), "`/x` exists"),
        ];
        for (spec, observed, want, note) in cases {
            let c = diff_of(spec.clone(), None, &observed);
            let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
            assert_eq!((c.action, c.destructive, fields.as_slice()), want, "{c:?}");
            assert_eq!(c.note.as_deref(), Some(note), "{c:?}");
        }
        let c = diff_of(command(None, None, false), None, &guard(None, None));
        assert_eq!(
            c.fields[0].to.as_deref(),
            Some("/usr/local/bin/init --all…")
        );
        // Never undone: a teardown leaves commands alone, whatever the guard.
        for destructive in [false, true] {
            let r = res(command(None, None, destructive), None);
            let c = diff_resource(&r, &guard(None, None), Lifecycle::Absent);
            assert_eq!((c.action, c.destructive), (Noop, false), "{c:?}");
        }
    }

    #[test]
    fn teardown_removes_accounts_and_packages() {
        let cases = [
            (
                user(None, None, &[], State::Present),
                user_state(1000, "/bin/sh", &[]),
            ),
            (
                group(None, State::Present),
                Observed::Group(GroupState {
                    gid: 5,
                    members: vec![],
                }),
            ),
            (
                package(State::Present),
                Observed::Package(PackageState { version: None }),
            ),
        ];
        for (spec, observed) in cases {
            let r = res(spec, None);
            let c = diff_resource(&r, &observed, Lifecycle::Absent);
            assert_eq!((c.action, c.destructive), (Action::Delete, true), "{c:?}");
            let c = diff_resource(&r, &Observed::Absent, Lifecycle::Absent);
            assert_eq!(c.action, Action::Noop, "{c:?}");
        }
    }

    /// A service `app` (id `service:app`).
    pub(crate) fn svc(enabled: bool, running: bool) -> ResourceSpec {
        ResourceSpec::Service(ServiceSpec {
            name: "app".into(),
            enabled,
            running,
            restart_on: vec![],
            id: None,
            requires: vec![],
            sensitive: false,
            drift: Default::default(),
        })
    }

    fn unit(load: &str, active: &str, file: &str) -> Observed {
        Observed::Service(ServiceState {
            unit: "app.service".into(),
            load_state: load.into(),
            active_state: active.into(),
            unit_file_state: file.into(),
        })
    }

    pub(crate) fn svc_res(spec: ResourceSpec) -> Resource {
        let mut r = res(spec, None);
        r.id = "service:app".into();
        r
    }

    /// (enabled, running) wanted.
    type Want = (bool, bool);
    /// (ActiveState, UnitFileState) seen.
    type Seen<'a> = (&'a str, &'a str);
    /// (action, destructive, fields).
    type Expect<'a> = (Action, bool, &'a [&'a str]);
    /// (action, fields) of a teardown of the same unit.
    type Teardown<'a> = (Action, &'a [&'a str]);

    /// Wanted x seen -> expected, plus the teardown of the same unit.
    #[test]
    fn service_table() {
        use Action::*;
        #[rustfmt::skip]
        let cases: &[(Want, Seen, Expect, Teardown)] = &[
            // Starting and enabling: non-destructive updates.
            ((true, true), ("active", "enabled"), (Noop, false, &[]), (Delete, &["enabled", "running"])),
            ((true, true), ("inactive", "enabled"), (Update, false, &["running"]), (Delete, &["enabled"])),
            ((true, true), ("failed", "enabled"), (Update, false, &["running"]), (Delete, &["enabled"])),
            ((true, true), ("active", "disabled"), (Update, false, &["enabled"]), (Delete, &["running"])),
            ((true, true), ("inactive", "disabled"), (Update, false, &["enabled", "running"]), (Noop, &[])),
            ((true, true), ("activating", "enabled-runtime"), (Update, false, &["enabled"]), (Delete, &["enabled", "running"])),
            ((true, true), ("reloading", "enabled"), (Noop, false, &[]), (Delete, &["enabled", "running"])),
            // Stopping and disabling: destructive.
            ((true, false), ("active", "enabled"), (Update, true, &["running"]), (Delete, &["enabled", "running"])),
            ((false, true), ("active", "enabled"), (Update, true, &["enabled"]), (Delete, &["enabled", "running"])),
            ((false, true), ("active", "linked"), (Update, true, &["enabled"]), (Delete, &["enabled", "running"])),
            ((false, false), ("active", "enabled"), (Update, true, &["enabled", "running"]), (Delete, &["enabled", "running"])),
            ((false, false), ("inactive", "disabled"), (Noop, false, &[]), (Noop, &[])),
            ((false, false), ("deactivating", "disabled"), (Noop, false, &[]), (Noop, &[])),
            // Enabling and stopping at once: destructive, for the stop.
            ((true, false), ("active", "disabled"), (Update, true, &["enabled", "running"]), (Delete, &["running"])),
            // Enablement fixed by systemd: left alone either way.
            ((true, true), ("active", "static"), (Noop, false, &[]), (Delete, &["running"])),
            ((false, true), ("active", "static"), (Noop, false, &[]), (Delete, &["running"])),
            ((true, true), ("inactive", "generated"), (Update, false, &["running"]), (Noop, &[])),
            // Masked: more than disabled; enabling it is planned (and fails).
            ((false, false), ("inactive", "masked"), (Noop, false, &[]), (Noop, &[])),
            ((true, false), ("inactive", "masked"), (Update, false, &["enabled"]), (Noop, &[])),
        ];
        for &((enabled, running), (active, file), want, teardown) in cases {
            let r = svc_res(svc(enabled, running));
            let seen = unit("loaded", active, file);
            let c = diff_resource(&r, &seen, Lifecycle::Running);
            let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
            assert_eq!(
                (c.action, c.destructive, fields.as_slice()),
                want,
                "want {enabled}/{running}, seen {active}/{file}: {c:?}"
            );
            let c = diff_resource(&r, &seen, Lifecycle::Absent);
            let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
            assert_eq!(
                (c.action, c.destructive, fields.as_slice()),
                (teardown.0, teardown.0 == Delete, teardown.1),
                "teardown of {active}/{file}: {c:?}"
            );
        }
    }

    #[test]
    fn service_fields_say_from_what_to_what() {
        let r = svc_res(svc(true, false));
        let c = diff_resource(
            &r,
            &unit("loaded", "active", "disabled"),
            Lifecycle::Running,
        );
        let f = |i: usize| {
            let f = &c.fields[i];
            (f.field.as_str(), f.from.as_deref(), f.to.as_deref())
        };
        assert_eq!(f(0), ("enabled", Some("disabled"), Some("enabled")));
        assert_eq!(f(1), ("running", Some("active"), Some("inactive")));
        assert_eq!(c.note.as_deref(), Some("stops `app.service`"));
        // Nothing known about a unit without a unit file: `from` is null.
        let c = diff_resource(
            &svc_res(svc(true, true)),
            &unit("not-found", "inactive", ""),
            Lifecycle::Running,
        );
        assert_eq!(c.fields[0].from, None);
        assert_eq!((c.action, c.destructive), (Action::Update, false));
        // `enabled: false` on a static unit says why nothing happens.
        let c = diff_resource(
            &svc_res(svc(false, true)),
            &unit("loaded", "active", "static"),
            Lifecycle::Running,
        );
        assert_eq!(
            c.note.as_deref(),
            Some("`enabled: false` is left alone: the unit is static")
        );
    }

    fn host_of(resources: Vec<Resource>, lifecycle: Lifecycle) -> Host {
        use crate::core::spec::{InventoryHost, TransportKind};
        let mut resources = resources;
        resources.sort_by(|a, b| a.id.cmp(&b.id));
        Host {
            inv: InventoryHost {
                name: "h".into(),
                transport: TransportKind::Local,
                address: None,
                port: 22,
                user: "root".into(),
                identity: None,
                host_key: None,
                tags: vec![],
                protected: false,
                become_: None,
                jump: None,
            },
            inv_index: 0,
            file: Some("hosts/h.yaml".into()),
            lifecycle,
            resources,
            owed_restarts: vec![],
            jump: None,
        }
    }

    fn unit_file(path: &str, absent: bool) -> Resource {
        let mut r = res(
            ResourceSpec::File(FileSpec {
                path: path.into(),
                state: if absent {
                    State::Absent
                } else {
                    State::Present
                },
                ..bare_file()
            }),
            Some("[Service]\n"),
        );
        r.id = format!("file:{path}");
        r
    }

    fn package_res(name: &str, state: State) -> Resource {
        let mut r = res(
            ResourceSpec::Package(crate::core::spec::PackageSpec {
                name: name.into(),
                state,
                id: None,
                requires: vec![],
                sensitive: false,
                drift: Default::default(),
            }),
            None,
        );
        r.id = format!("package:{name}");
        r
    }

    fn actual_of(entries: &[(&str, Observed)]) -> HostActual {
        HostActual {
            facts: Default::default(),
            resources: entries
                .iter()
                .map(|(k, o)| (k.to_string(), o.clone()))
                .collect(),
            trees: Default::default(),
        }
    }

    #[test]
    fn a_unit_that_does_not_load_is_refused_unless_provided_in_this_run() {
        let missing = unit("not-found", "inactive", "");
        let svc_only = host_of(vec![svc_res(svc(true, true))], Lifecycle::Running);
        let actual = actual_of(&[("service:app", missing.clone())]);
        assert_eq!(
            refusals(&svc_only, &actual),
            [
                "service `service:app`: unit `app.service` does not exist on the host, and no \
              `package` or unit `file` in the desired state provides it; install it, or fix the name"
            ]
        );
        let broken = actual_of(&[("service:app", unit("bad-setting", "inactive", "disabled"))]);
        assert!(
            refusals(&svc_only, &broken)[0]
                .contains("does not load on the host (LoadState bad-setting)")
        );
        // Loaded, or masked (which the steps then report): planned.
        for ok in [
            unit("loaded", "inactive", "disabled"),
            unit("masked", "inactive", "masked"),
        ] {
            assert!(refusals(&svc_only, &actual_of(&[("service:app", ok)])).is_empty());
        }
        // A teardown has nothing to stop.
        let gone = host_of(vec![svc_res(svc(true, true))], Lifecycle::Absent);
        assert!(refusals(&gone, &actual).is_empty());
        // A package of that name or the unit file, present, provides it.
        let providers = [
            (package_res("app", State::Present), true),
            (package_res("app", State::Absent), false),
            (package_res("other", State::Present), false),
            (unit_file("/etc/systemd/system/app.service", false), true),
            (
                unit_file("/usr/lib/systemd/system/app.service", false),
                true,
            ),
            (unit_file("/etc/systemd/system/app.service", true), false),
            (
                unit_file("/etc/systemd/system/app.service.d/x.conf", false),
                false,
            ),
            (unit_file("/etc/systemd/system/app.socket", false), false),
        ];
        for (p, provides) in providers {
            let id = p.id.clone();
            let h = host_of(vec![svc_res(svc(true, true)), p], Lifecycle::Running);
            let mut a = actual.clone();
            a.resources.insert(id.clone(), Observed::Absent);
            assert_eq!(refusals(&h, &a).is_empty(), provides, "{id}");
            if provides {
                let c = diff_host(&h, &a);
                let s = c.iter().find(|c| c.id == "service:app").unwrap();
                assert_eq!((s.action, s.destructive), (Action::Update, false));
                assert!(s.daemon_reload, "{id}");
                assert_eq!(
                    s.note.as_deref(),
                    Some(format!("unit `app.service` is not-found on the host for now; `{id}` provides it in this run").as_str())
                );
            }
        }
    }

    #[test]
    fn daemon_reload_when_a_unit_file_or_drop_in_changes() {
        let loaded = unit("loaded", "inactive", "enabled");
        let cases = [
            (
                "/etc/systemd/system/app.service",
                fstate(0o644, "old\n"),
                true,
            ),
            (
                "/etc/systemd/system/app.service",
                fstate(0o644, "[Service]\n"),
                false,
            ),
            (
                "/etc/systemd/system/app.service.d/x.conf",
                Observed::Absent,
                true,
            ),
            ("/etc/systemd/system/other.service", Observed::Absent, false),
            ("/etc/app.conf", Observed::Absent, false),
        ];
        for (path, seen, reload) in cases {
            let h = host_of(
                vec![svc_res(svc(true, true)), unit_file(path, false)],
                Lifecycle::Running,
            );
            let a = actual_of(&[
                ("service:app", loaded.clone()),
                (&format!("file:{path}"), seen),
            ]);
            let c = diff_host(&h, &a);
            let s = c.iter().find(|c| c.id == "service:app").unwrap();
            assert_eq!(s.daemon_reload, reload, "{path}");
            assert_eq!(s.fields[0].field, "running");
        }
    }

    #[test]
    fn a_pruned_service_is_torn_down_and_never_refused() {
        let mut r = svc_res(svc(true, true));
        r.pruned = true;
        let h = host_of(vec![r], Lifecycle::Running);
        let running = actual_of(&[("service:app", unit("loaded", "active", "enabled"))]);
        let c = &diff_host(&h, &running)[0];
        assert_eq!((c.action, c.destructive), (Action::Delete, true));
        assert_eq!(
            c.note.as_deref(),
            Some("pruned: tend applied it and it is no longer in the desired state")
        );
        // Its unit gone from the host: nothing to stop, nothing refused.
        let missing = actual_of(&[("service:app", unit("not-found", "inactive", ""))]);
        assert!(refusals(&h, &missing).is_empty());
        assert_eq!(diff_host(&h, &missing)[0].action, Action::Noop);
        // A pruned package (being removed) provides no unit.
        let mut p = package_res("app", State::Present);
        p.pruned = true;
        let h = host_of(vec![svc_res(svc(true, true)), p], Lifecycle::Running);
        let mut a = missing.clone();
        a.resources.insert(
            "package:app".into(),
            Observed::Package(PackageState { version: None }),
        );
        assert_eq!(refusals(&h, &a).len(), 1);
    }

    #[test]
    fn every_kind_is_supported() {
        let kinds = [
            file(None, State::Present),
            user(None, None, &[], State::Present),
            group(None, State::Present),
            package(State::Present),
            command(None, None, false),
            svc(true, true),
        ];
        for spec in kinds {
            assert!(is_supported(&res(spec.clone(), None)), "{spec:?}");
        }
    }

    #[test]
    fn teardown_deletes_present_resources() {
        let r = res(file(None, State::Present), Some("hi\n"));
        let c = diff_resource(&r, &fstate(0o644, "hi\n"), Lifecycle::Absent);
        assert_eq!((c.action, c.destructive), (Action::Delete, true));
    }
}
