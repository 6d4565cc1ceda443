//! Property tests for diff + plan over generated hosts: files, directories
//! and symlinks over a small path alphabet (so parents and children meet),
//! random `state: absent`, random `requires`, random `lifecycle`, and a
//! random actual state.
//!
//! Cyclic inputs (which validation refuses) are kept for the first
//! properties only.
//!
//! Properties: every plan keeps the invariants of `assert_plan_invariants`
//! (acyclic, `after` only names earlier steps, nothing destructive before the
//! barrier); the steps respect every dependency edge; planning is
//! deterministic; and applying the steps in order to a model of the file
//! system leaves nothing to change. The simulator also checks that each step
//! finds what the plan was made from, that nothing is created under a missing
//! managed directory, and that nothing removes a path while a managed child
//! with a pending step still exists under it.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::tests::{With, assert_plan_invariants, dir, file, host_with, link};
use super::*;
use crate::core::actual::{FileState, HostActual, Meta, Observed};
use crate::core::diff::diff_host;
use crate::core::model::{EdgeReason, Resource, find_cycle, is_ancestor};
use crate::core::spec::{Lifecycle, Mode, ResourceSpec};

/// Every proper ancestor of a path here that is below `/t` is here too, but
/// a resource set may leave any of them unmanaged.
const PATHS: &[&str] = &[
    "/t", "/t/a", "/t/a/x", "/t/a/x/1", "/t/a/y", "/t/b", "/t/b/x",
];
const CONTENTS: &[&str] = &["", "a\n", "b\n", "zz"];
const MODES: &[u32] = &[0o644, 0o600, 0o755];
/// (uid, name) of the accounts on the simulated host.
const ACCOUNTS: &[(u32, Option<&str>)] = &[(0, Some("root")), (1000, Some("app")), (1001, None)];
const OWNERS: &[&str] = &["root", "0", "app", "1000", "1001"];
const TARGETS: &[&str] = &["/t/a", "/x", "/y"];
/// Actual link targets: one is not UTF-8.
const ACTUAL_TARGETS: &[&[u8]] = &[b"/t/a", b"/x", b"/\xff\xfe"];

#[derive(Clone, Copy, Debug)]
enum Kind {
    File,
    Dir,
    Link,
}

#[derive(Clone, Debug)]
struct GenRes {
    kind: Kind,
    absent: bool,
    content: Option<usize>,
    mode: Option<u32>,
    owner: Option<&'static str>,
    group: Option<&'static str>,
    target: &'static str,
    /// Indices into PATHS; those without a resource are dropped.
    requires: Vec<usize>,
}

#[derive(Clone, Debug)]
enum GenObs {
    Absent,
    File {
        mode: u32,
        owner: usize,
        content: usize,
    },
    Dir {
        mode: u32,
        owner: usize,
    },
    Link(usize),
    Other,
}

fn gen_res() -> impl Strategy<Value = GenRes> {
    (
        prop_oneof![Just(Kind::File), Just(Kind::Dir), Just(Kind::Link)],
        prop::bool::weighted(0.35),
        prop::option::of(0..3usize),
        prop::option::of(prop::sample::select(MODES)),
        prop::option::of(prop::sample::select(OWNERS)),
        prop::option::of(prop::sample::select(OWNERS)),
        prop::sample::select(TARGETS),
        prop::collection::vec(0..PATHS.len(), 0..=1),
    )
        .prop_map(
            |(kind, absent, content, mode, owner, group, target, requires)| GenRes {
                kind,
                absent,
                content,
                mode,
                owner,
                group,
                target,
                requires,
            },
        )
}

fn gen_obs() -> impl Strategy<Value = GenObs> {
    prop_oneof![
        2 => Just(GenObs::Absent),
        2 => (prop::sample::select(MODES), 0..ACCOUNTS.len(), 0..CONTENTS.len())
            .prop_map(|(mode, owner, content)| GenObs::File { mode, owner, content }),
        3 => (prop::sample::select(MODES), 0..ACCOUNTS.len())
            .prop_map(|(mode, owner)| GenObs::Dir { mode, owner }),
        1 => (0..ACTUAL_TARGETS.len()).prop_map(GenObs::Link),
        1 => Just(GenObs::Other),
    ]
}

fn meta(mode: u32, account: usize) -> Meta {
    let (id, name) = ACCOUNTS[account];
    Meta {
        mode,
        uid: id,
        gid: id,
        owner: name.map(str::to_string),
        group: name.map(str::to_string),
    }
}

fn observed_file(meta: Meta, content: &[u8]) -> Observed {
    Observed::File(FileState {
        meta,
        size: content.len() as u64,
        sha256: crate::core::sha256_hex(content),
    })
}

/// One generated case: the host, and the actual state by path.
#[derive(Clone, Debug)]
struct Case {
    host: Host,
    /// The resources form a dependency cycle: validation would refuse them.
    cyclic: bool,
    actual: BTreeMap<String, Observed>,
}

impl Case {
    fn path_of(&self, i: usize) -> &str {
        self.host.resources[i].path().expect("file-system resource")
    }

    fn host_actual(&self, fs: &BTreeMap<String, Observed>) -> HostActual {
        let mut a = HostActual::default();
        for r in &self.host.resources {
            let p = r.path().expect("path");
            a.resources.insert(r.id.clone(), fs[p].clone());
        }
        a
    }
}

/// Build a case: valid but for dependency cycles, which are flagged.
fn build(resources: &[Option<GenRes>], observed: &[GenObs], teardown: bool) -> Case {
    let mut gen_: Vec<Option<GenRes>> = resources.to_vec();
    // Only a directory can hold a present resource: turn whatever else is at
    // such an ancestor into a present directory (otherwise the desired state
    // cannot exist at all).
    for k in 0..PATHS.len() {
        let has_present_child = (0..PATHS.len()).any(|c| {
            is_ancestor(PATHS[k], PATHS[c]) && gen_[c].as_ref().is_some_and(|g| !g.absent)
        });
        if let Some(g) = &mut gen_[k]
            && has_present_child
            && !matches!(g.kind, Kind::Dir)
        {
            g.kind = Kind::Dir;
            g.absent = false;
        }
    }
    // Validation refuses a present resource inside a directory declared
    // absent: make those absent too.
    for k in 0..PATHS.len() {
        if gen_[k]
            .as_ref()
            .is_some_and(|g| matches!(g.kind, Kind::Dir) && g.absent)
        {
            for (c, child) in gen_.iter_mut().enumerate() {
                if is_ancestor(PATHS[k], PATHS[c])
                    && let Some(child) = child
                {
                    child.absent = true;
                }
            }
        }
    }
    let ids: Vec<Option<String>> = gen_
        .iter()
        .enumerate()
        .map(|(k, g)| {
            g.as_ref().map(|g| {
                let kind = match g.kind {
                    Kind::File => "file",
                    Kind::Dir => "directory",
                    Kind::Link => "symlink",
                };
                format!("{kind}:{}", PATHS[k])
            })
        })
        .collect();
    let mut out = Vec::new();
    for (k, g) in gen_.iter().enumerate() {
        let Some(g) = g else { continue };
        let mut r = match g.kind {
            Kind::File => match g.content {
                Some(c) => file(PATHS[k]).content(CONTENTS[c]),
                None => file(PATHS[k]),
            },
            Kind::Dir => dir(PATHS[k]),
            Kind::Link => link(PATHS[k], g.target),
        };
        if !matches!(g.kind, Kind::Link) {
            if let Some(m) = g.mode {
                r = r.mode(m);
            }
            if let Some(o) = g.owner {
                r = r.owner(o);
            }
            if let Some(o) = g.group {
                r = r.owner_group(o);
            }
        }
        if g.absent {
            r = r.absent();
        }
        let reqs: Vec<&str> = g
            .requires
            .iter()
            .filter(|&&j| j != k)
            .filter_map(|&j| ids[j].as_deref())
            .collect();
        if !reqs.is_empty() {
            r = r.requires(&reqs);
        }
        out.push(r);
    }
    let lifecycle = if teardown {
        Lifecycle::Absent
    } else {
        Lifecycle::Running
    };
    let host = host_with("h", lifecycle, out);
    let cyclic = find_cycle(&host.resources, &dependency_edges(&host.resources)).is_some();
    // A consistent actual state: below a managed path that is not a
    // directory nothing exists. Unmanaged paths are taken to exist as
    // directories, so they never block what is below them.
    let mut actual: BTreeMap<String, Observed> = BTreeMap::new();
    for (k, p) in PATHS.iter().enumerate() {
        if ids[k].is_none() {
            continue;
        }
        let blocked = actual
            .iter()
            .any(|(a, o)| is_ancestor(a, p) && !matches!(o, Observed::Directory(_)));
        let o = if blocked {
            Observed::Absent
        } else {
            match &observed[k] {
                GenObs::Absent => Observed::Absent,
                GenObs::File {
                    mode,
                    owner,
                    content,
                } => observed_file(meta(*mode, *owner), CONTENTS[*content].as_bytes()),
                GenObs::Dir { mode, owner } => Observed::Directory(meta(*mode, *owner)),
                GenObs::Link(t) => Observed::Symlink {
                    target: ACTUAL_TARGETS[*t].to_vec(),
                },
                GenObs::Other => Observed::Other {
                    file_type: "fifo".into(),
                },
            }
        };
        actual.insert(p.to_string(), o);
    }
    Case {
        host,
        cyclic,
        actual,
    }
}

fn account(want: &str) -> (u32, Option<String>) {
    if let Some(&(id, name)) = ACCOUNTS
        .iter()
        .find(|(id, name)| *name == Some(want) || id.to_string() == want)
    {
        (id, name.map(str::to_string))
    } else {
        (want.parse().expect("numeric owner"), None)
    }
}

/// What a step leaves at the path: the resource's managed fields, the rest
/// kept from `cur` (or the defaults of something new).
fn converge(r: &Resource, cur: &Observed) -> Observed {
    let base = |cur: &Observed, default_mode: u32| match cur {
        Observed::File(f) => f.meta.clone(),
        Observed::Directory(m) => m.clone(),
        _ => meta(default_mode, 0),
    };
    let own = |mut m: Meta, mode: Option<Mode>, owner: &Option<String>, group: &Option<String>| {
        if let Some(mode) = mode {
            m.mode = mode.0;
        }
        if let Some(o) = owner {
            (m.uid, m.owner) = account(o);
        }
        if let Some(g) = group {
            (m.gid, m.group) = account(g);
        }
        m
    };
    match (&r.spec, cur) {
        (ResourceSpec::File(s), _) => {
            let m = own(base(cur, 0o644), s.mode, &s.owner, &s.group);
            match (&r.content, cur) {
                (Some(c), _) => observed_file(m, &c.bytes),
                (None, Observed::File(f)) => Observed::File(FileState {
                    meta: m,
                    ..f.clone()
                }),
                (None, _) => observed_file(m, b""),
            }
        }
        (ResourceSpec::Directory(s), _) => {
            Observed::Directory(own(base(cur, 0o755), s.mode, &s.owner, &s.group))
        }
        (ResourceSpec::Symlink(s), _) => Observed::Symlink {
            target: s.target.clone().expect("target").into_bytes(),
        },
        _ => unreachable!("only file-system resources are generated"),
    }
}

/// Apply the steps in order to the file-system model; Err on the first step
/// that could not run as planned.
fn simulate(
    case: &Case,
    changes: &[Change],
    plan: &HostPlan,
) -> Result<BTreeMap<String, Observed>, String> {
    let mut fs = case.actual.clone();
    let step_of: BTreeMap<&str, usize> = plan
        .steps
        .iter()
        .map(|s| (s.id.as_str(), s.index))
        .collect();
    let managed_under = |p: &str| -> Vec<usize> {
        (0..case.host.resources.len())
            .filter(|&i| is_ancestor(p, case.path_of(i)))
            .collect()
    };
    for s in &plan.steps {
        let i = case
            .host
            .resources
            .iter()
            .position(|r| r.id == s.id)
            .ok_or_else(|| format!("step {} names no resource", s.index))?;
        let r = &case.host.resources[i];
        let p = case.path_of(i);
        let c = &changes[i];
        if (s.action, s.destructive, s.replace) != (c.action, c.destructive, c.replace) {
            return Err(format!("step {} is not the change for {}", s.index, r.id));
        }
        // The plan was made from the probe: the step must find that.
        if fs[p] != case.actual[p] {
            return Err(format!(
                "step {} ({} {}) finds {:?}, planned against {:?}",
                s.index,
                s.action.as_str(),
                r.id,
                fs[p],
                case.actual[p]
            ));
        }
        // Removing the path (a delete, or a replacement) takes what is under
        // it along: no managed child may still be waiting for its own step.
        if s.action == Action::Delete || s.replace {
            for q in managed_under(p) {
                let qp = case.path_of(q);
                let pending = step_of
                    .get(case.host.resources[q].id.as_str())
                    .is_some_and(|&k| k > s.index);
                if pending && fs[qp] != Observed::Absent {
                    return Err(format!(
                        "step {} ({} {}) removes {qp}, which still waits for step {}",
                        s.index,
                        s.action.as_str(),
                        r.id,
                        step_of[case.host.resources[q].id.as_str()]
                    ));
                }
            }
            for q in managed_under(p) {
                fs.insert(case.path_of(q).to_string(), Observed::Absent);
            }
        }
        if s.action == Action::Delete {
            fs.insert(p.to_string(), Observed::Absent);
            continue;
        }
        // Creating (or replacing): every managed ancestor must be a
        // directory by now; unmanaged ones are taken to exist.
        if s.action == Action::Create || s.replace {
            for a in 0..case.host.resources.len() {
                let ap = case.path_of(a);
                if is_ancestor(ap, p) && !matches!(fs[ap], Observed::Directory(_)) {
                    return Err(format!(
                        "step {} ({} {}) runs while its parent {ap} is {:?}",
                        s.index,
                        s.action.as_str(),
                        r.id,
                        fs[ap]
                    ));
                }
            }
        }
        let cur = if s.replace {
            Observed::Absent
        } else {
            fs[p].clone()
        };
        fs.insert(p.to_string(), converge(r, &cur));
    }
    Ok(fs)
}

/// Every dependency edge between two steps is respected, removals in reverse.
fn assert_edges_respected(host: &Host, changes: &[Change], plan: &HostPlan) {
    let step_of: BTreeMap<&str, usize> = plan
        .steps
        .iter()
        .map(|s| (s.id.as_str(), s.index))
        .collect();
    for (a, b, why) in dependency_edges(&host.resources) {
        let (ia, ib) = (&host.resources[a].id, &host.resources[b].id);
        let (Some(&sa), Some(&sb)) = (step_of.get(ia.as_str()), step_of.get(ib.as_str())) else {
            continue;
        };
        let del = |i: usize| changes[i].action == Action::Delete;
        match (del(a), del(b)) {
            (false, false) => assert!(sa < sb, "{ia} before {ib} ({why:?})"),
            (true, true) => assert!(sb < sa, "removing {ib} before {ia} ({why:?})"),
            (true, false) if why == EdgeReason::Requires => {
                assert!(sa < sb, "{ib} after removing {ia}")
            }
            _ => {}
        }
    }
}

fn check_case(case: &Case) -> Result<(), TestCaseError> {
    let actual = case.host_actual(&case.actual);
    let changes = diff_host(&case.host, &actual);
    let plan = plan_host(&case.host, &changes);
    // (a), (b): acyclic, `after` earlier, barrier, waves, counts.
    assert_plan_invariants(&plan);
    let planned: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
    let mut changed: Vec<&str> = changes
        .iter()
        .filter(|c| c.action != Action::Noop)
        .map(|c| c.id.as_str())
        .collect();
    let mut sorted = planned.clone();
    sorted.sort();
    changed.sort();
    prop_assert_eq!(sorted, changed, "one step per change");
    // (d): deterministic.
    let again = plan_host(&case.host, &diff_host(&case.host, &actual));
    prop_assert_eq!(&plan, &again);
    let doc = Plan::new("rev", vec![plan.clone()]);
    prop_assert_eq!(doc.to_json(), Plan::new("rev", vec![again]).to_json());
    if case.cyclic {
        // Validation refuses these; the planner must still not lose a change
        // or break its invariants, but the order cannot honour every edge.
        return Ok(());
    }
    assert_edges_respected(&case.host, &changes, &plan);
    // (c): applying the plan leaves nothing to change.
    let fs = simulate(case, &changes, &plan).map_err(TestCaseError::fail)?;
    let after = diff_host(&case.host, &case.host_actual(&fs));
    for c in &after {
        prop_assert_eq!(
            c.action,
            Action::Noop,
            "{} still changes after the plan: {:?}",
            &c.id,
            c
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    })]

    #[test]
    fn plans_converge(
        resources in prop::collection::vec(prop::option::weighted(0.7, gen_res()), PATHS.len()),
        observed in prop::collection::vec(gen_obs(), PATHS.len()),
        teardown in prop::bool::weighted(0.1),
    ) {
        check_case(&build(&resources, &observed, teardown))?;
    }
}

#[test]
fn simulator_catches_a_removal_out_of_order() {
    // The simulator must be able to fail: delete a directory before the
    // file inside it and it refuses.
    let h = host_with(
        "h",
        Lifecycle::Running,
        vec![dir("/t/a").absent(), file("/t/a/x").absent()],
    );
    let mut actual = BTreeMap::new();
    actual.insert("/t/a".to_string(), Observed::Directory(meta(0o755, 0)));
    actual.insert("/t/a/x".to_string(), observed_file(meta(0o644, 0), b""));
    let case = Case {
        host: h,
        cyclic: false,
        actual,
    };
    let changes = diff_host(&case.host, &case.host_actual(&case.actual));
    let mut plan = plan_host(&case.host, &changes);
    assert!(simulate(&case, &changes, &plan).is_ok());
    plan.steps.reverse();
    for (k, s) in plan.steps.iter_mut().enumerate() {
        s.index = k;
    }
    let err = simulate(&case, &changes, &plan).unwrap_err();
    assert!(err.contains("still waits"), "{err}");
}
