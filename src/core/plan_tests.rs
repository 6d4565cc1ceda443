//! Table tests for the planner: ordering, barrier placement, waves, counts,
//! determinism and the operation hash; plus a snapshot of the plan document.
//!
//! Changes are built by hand here (not through `diff`) so that every kind can
//! be planned, including the ones this build does not probe yet.

use super::*;
use crate::core::actual::{HostActual, Observed};
use crate::core::diff::diff_host;
use crate::core::diff::tests::{bare_file, fstate, meta};
use crate::core::model::{Content, Origin, Resource};
use crate::core::spec::{
    DirectorySpec, FileSpec, GroupSpec, InventoryHost, Lifecycle, Mode, PackageSpec, ResourceSpec,
    ServiceSpec, State, SymlinkSpec, TransportKind, UserSpec,
};
use crate::core::yaml::Pos;

// ---- builders shared with the property tests ------------------------------

fn origin() -> Origin {
    Origin {
        file: "hosts/h.yaml".into(),
        pos: Pos::START,
        key_pos: Pos::START,
        requires_pos: vec![],
        restart_on_pos: vec![],
        guard_pos: Pos::START,
    }
}

/// A resource with its default id (`kind:path-or-name`).
pub(super) fn res(spec: ResourceSpec) -> Resource {
    let mut r = Resource {
        id: String::new(),
        spec,
        content: None,
        origin: origin(),
        from_group: None,
        replaces_group: None,
        pruned: false,
        applied: None,
    };
    r.id = format!("{}:{}", r.kind(), r.key().1);
    r.content = match &r.spec {
        ResourceSpec::File(s) => s
            .content
            .as_ref()
            .map(|c| Content::new(c.as_bytes().into())),
        _ => None,
    };
    r
}

pub(super) fn file(path: &str) -> Resource {
    res(ResourceSpec::File(FileSpec {
        path: path.into(),
        ..bare_file()
    }))
}

pub(super) fn dir(path: &str) -> Resource {
    res(ResourceSpec::Directory(DirectorySpec {
        path: path.into(),
        mode: None,
        owner: None,
        group: None,
        state: State::Present,
        id: None,
        requires: vec![],
        sensitive: false,
        drift: Default::default(),
    }))
}

pub(super) fn link(path: &str, target: &str) -> Resource {
    res(ResourceSpec::Symlink(SymlinkSpec {
        path: path.into(),
        target: Some(target.into()),
        state: State::Present,
        id: None,
        requires: vec![],
        sensitive: false,
        drift: Default::default(),
    }))
}

fn user(name: &str) -> Resource {
    res(ResourceSpec::User(UserSpec {
        name: name.into(),
        uid: None,
        home: None,
        shell: None,
        groups: vec![],
        system: false,
        state: State::Present,
        id: None,
        requires: vec![],
        sensitive: false,
        drift: Default::default(),
    }))
}

fn group(name: &str) -> Resource {
    res(ResourceSpec::Group(GroupSpec {
        name: name.into(),
        gid: None,
        state: State::Present,
        id: None,
        requires: vec![],
        sensitive: false,
        drift: Default::default(),
    }))
}

fn package(name: &str) -> Resource {
    res(ResourceSpec::Package(PackageSpec {
        name: name.into(),
        state: State::Present,
        id: None,
        requires: vec![],
        sensitive: false,
        drift: Default::default(),
    }))
}

fn service(name: &str) -> Resource {
    res(ResourceSpec::Service(ServiceSpec {
        name: name.into(),
        enabled: true,
        running: true,
        restart_on: vec![],
        id: None,
        requires: vec![],
        sensitive: false,
        drift: Default::default(),
    }))
}

/// Modifiers on a built resource.
pub(super) trait With: Sized {
    fn absent(self) -> Self;
    fn requires(self, ids: &[&str]) -> Self;
    fn content(self, c: &str) -> Self;
    fn mode(self, m: u32) -> Self;
    fn owner(self, o: &str) -> Self;
    fn owner_group(self, g: &str) -> Self;
    fn uid(self, uid: u32) -> Self;
    fn gid(self, gid: u32) -> Self;
    fn in_groups(self, gs: &[&str]) -> Self;
    fn restart_on(self, ids: &[&str]) -> Self;
}

impl With for Resource {
    fn absent(mut self) -> Self {
        match &mut self.spec {
            ResourceSpec::File(s) => s.state = State::Absent,
            ResourceSpec::Directory(s) => s.state = State::Absent,
            ResourceSpec::Symlink(s) => s.state = State::Absent,
            ResourceSpec::Package(s) => s.state = State::Absent,
            ResourceSpec::User(s) => s.state = State::Absent,
            ResourceSpec::Group(s) => s.state = State::Absent,
            _ => panic!("{} has no state", self.id),
        }
        self
    }

    fn requires(mut self, ids: &[&str]) -> Self {
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        match &mut self.spec {
            ResourceSpec::File(s) => s.requires = ids,
            ResourceSpec::Directory(s) => s.requires = ids,
            ResourceSpec::Symlink(s) => s.requires = ids,
            ResourceSpec::Package(s) => s.requires = ids,
            ResourceSpec::Service(s) => s.requires = ids,
            ResourceSpec::User(s) => s.requires = ids,
            ResourceSpec::Group(s) => s.requires = ids,
            ResourceSpec::Command(s) => s.requires = ids,
        }
        self
    }

    fn content(mut self, c: &str) -> Self {
        let ResourceSpec::File(s) = &mut self.spec else {
            panic!("content on {}", self.id)
        };
        s.content = Some(c.into());
        self.content = Some(Content::new(c.as_bytes().into()));
        self
    }

    fn mode(mut self, m: u32) -> Self {
        match &mut self.spec {
            ResourceSpec::File(s) => s.mode = Some(Mode(m)),
            ResourceSpec::Directory(s) => s.mode = Some(Mode(m)),
            _ => panic!("mode on {}", self.id),
        }
        self
    }

    fn owner(mut self, o: &str) -> Self {
        match &mut self.spec {
            ResourceSpec::File(s) => s.owner = Some(o.into()),
            ResourceSpec::Directory(s) => s.owner = Some(o.into()),
            _ => panic!("owner on {}", self.id),
        }
        self
    }

    fn owner_group(mut self, g: &str) -> Self {
        match &mut self.spec {
            ResourceSpec::File(s) => s.group = Some(g.into()),
            ResourceSpec::Directory(s) => s.group = Some(g.into()),
            _ => panic!("group on {}", self.id),
        }
        self
    }

    fn uid(mut self, uid: u32) -> Self {
        let ResourceSpec::User(s) = &mut self.spec else {
            panic!("uid on {}", self.id)
        };
        s.uid = Some(uid);
        self
    }

    fn gid(mut self, gid: u32) -> Self {
        let ResourceSpec::Group(s) = &mut self.spec else {
            panic!("gid on {}", self.id)
        };
        s.gid = Some(gid);
        self
    }

    fn in_groups(mut self, gs: &[&str]) -> Self {
        let ResourceSpec::User(s) = &mut self.spec else {
            panic!("groups on {}", self.id)
        };
        s.groups = gs.iter().map(|g| g.to_string()).collect();
        self
    }

    fn restart_on(mut self, ids: &[&str]) -> Self {
        let ResourceSpec::Service(s) = &mut self.spec else {
            panic!("restart_on on {}", self.id)
        };
        s.restart_on = ids.iter().map(|g| g.to_string()).collect();
        self
    }
}

pub(super) fn host_with(name: &str, lifecycle: Lifecycle, mut resources: Vec<Resource>) -> Host {
    resources.sort_by(|a, b| a.id.cmp(&b.id));
    Host {
        inv: InventoryHost {
            name: name.into(),
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
        file: Some(format!("hosts/{name}.yaml")),
        lifecycle,
        resources,
        owed_restarts: vec![],
        jump: None,
    }
}

pub(super) fn host(name: &str, resources: Vec<Resource>) -> Host {
    host_with(name, Lifecycle::Running, resources)
}

/// Checks every plan must pass, whatever its input.
pub(super) fn assert_plan_invariants(p: &HostPlan) {
    let n = p.steps.len();
    for (k, s) in p.steps.iter().enumerate() {
        assert_eq!(s.index, k, "step index");
        assert!(s.action != Action::Noop, "noop step {}", s.id);
        if s.is_restart() {
            // A restart: a non-destructive update gated on its triggers
            // alone, each a create or update of another resource.
            assert_eq!(s.triggers, s.after, "triggers of restart {k}");
            assert_eq!((s.action, s.destructive), (Action::Update, false));
            for &t in &s.triggers {
                let t = &p.steps[t];
                assert!(matches!(t.action, Action::Create | Action::Update));
                assert!(t.id != s.id && !t.is_restart(), "trigger {}", t.id);
            }
        }
        let mut sorted = s.after.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(s.after, sorted, "after of {} is sorted and unique", s.id);
        for &a in &s.after {
            assert!(a < k, "step {k} ({}) runs after later step {a}", s.id);
            assert!(
                p.steps[a].wave < s.wave,
                "step {k} ({}) in wave {} depends on step {a} in wave {}",
                s.id,
                s.wave,
                p.steps[a].wave
            );
        }
    }
    // Barrier: everything destructive after it, nothing destructive before.
    assert!(p.barrier <= n);
    assert!(p.steps[..p.barrier].iter().all(|s| !s.destructive));
    assert_eq!(
        p.steps[p.barrier..]
            .iter()
            .filter(|s| s.destructive)
            .count(),
        p.destructive
    );
    // A step after the barrier is destructive or waits for one that is.
    for s in &p.steps[p.barrier..] {
        assert!(
            s.destructive || s.after.iter().any(|&a| a >= p.barrier),
            "{} is after the barrier for no reason",
            s.id
        );
    }
    // Waves partition the steps in order, and early waves precede late ones.
    let flat: Vec<usize> = p.waves.iter().flatten().copied().collect();
    assert_eq!(flat, (0..n).collect::<Vec<_>>(), "waves in step order");
    for (w, wave) in p.waves.iter().enumerate() {
        assert!(!wave.is_empty());
        for &i in wave {
            assert_eq!(p.steps[i].wave, w, "wave of step {i}");
        }
        let before = wave.iter().filter(|&&i| i < p.barrier).count();
        assert!(
            before == 0 || before == wave.len(),
            "wave {w} straddles the barrier"
        );
    }
    let count = |a: Action| p.steps.iter().filter(|s| s.action == a).count();
    assert_eq!(
        p.changes,
        Counts {
            create: count(Action::Create),
            update: count(Action::Update),
            delete: count(Action::Delete),
        }
    );
    assert_eq!(
        p.destructive,
        p.steps.iter().filter(|s| s.destructive).count()
    );
}

// ---- table tests ----------------------------------------------------------

/// Changes by hand: `create`, `update`, `delete` (destructive), `replace`
/// (a destructive update that removes what is at the path), `stop` (a
/// destructive update of field `running`, as stopping a service is), `start`
/// (a non-destructive one), `disable` (a destructive update of `enabled`).
/// Unnamed resources are noops.
fn changes_of(h: &Host, spec: &[(&str, &str)]) -> Vec<Change> {
    for (id, _) in spec {
        assert!(h.resource(id).is_some(), "no resource {id}");
    }
    h.resources
        .iter()
        .map(|r| {
            let what = spec.iter().find(|(id, _)| *id == r.id).map(|(_, w)| *w);
            let (action, destructive, replace) = match what {
                None => (Action::Noop, false, false),
                Some("create") => (Action::Create, false, false),
                Some("update") => (Action::Update, false, false),
                Some("delete") => (Action::Delete, true, false),
                Some("replace") => (Action::Update, true, true),
                Some("stop") => (Action::Update, true, false),
                Some("start") => (Action::Update, false, false),
                Some("disable") => (Action::Update, true, false),
                Some(other) => panic!("unknown change {other}"),
            };
            let field = |field: &str, to: &str| {
                vec![FieldChange {
                    field: field.into(),
                    from: None,
                    to: Some(to.into()),
                }]
            };
            let fields = match what {
                Some("start") => field("running", "active"),
                Some("stop") => field("running", "inactive"),
                Some("disable") => field("enabled", "disabled"),
                _ => vec![],
            };
            Change {
                id: r.id.clone(),
                kind: r.kind(),
                action,
                destructive,
                fields,
                note: None,
                replace,
                daemon_reload: false,
                approval: None,
                sensitive: false,
                reported: false,
                guard: None,
            }
        })
        .collect()
}

/// One line per step: `index action id wave [after ..] [!]`, `!` marking a
/// destructive step, and a `--` line at the barrier.
fn render(p: &HostPlan) -> String {
    let mut out = String::new();
    for s in &p.steps {
        if s.index == p.barrier {
            out.push_str("--\n");
        }
        out.push_str(&format!(
            "{} {} {} w{}",
            s.index,
            s.action.as_str(),
            s.id,
            s.wave
        ));
        if !s.after.is_empty() {
            let a: Vec<String> = s.after.iter().map(|a| a.to_string()).collect();
            out.push_str(&format!(" after {}", a.join(",")));
        }
        if s.is_restart() {
            let t: Vec<String> = s.triggers.iter().map(|a| a.to_string()).collect();
            out.push_str(&format!(" restart on {}", t.join(",")));
        }
        if s.destructive {
            out.push_str(" !");
        }
        out.push('\n');
    }
    if p.barrier == p.steps.len() && !p.steps.is_empty() {
        out.push_str("--\n");
    }
    out
}

fn check(resources: Vec<Resource>, spec: &[(&str, &str)], want: &str) -> HostPlan {
    let h = host("h", resources);
    let p = plan_host(&h, &changes_of(&h, spec));
    assert_plan_invariants(&p);
    let want: String = want
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(render(&p), want, "\n--- got:\n{}", render(&p));
    p
}

#[test]
fn parent_directory_before_the_file_inside() {
    check(
        vec![dir("/srv/app"), file("/srv/app/app.conf"), dir("/srv")],
        &[
            ("directory:/srv", "create"),
            ("directory:/srv/app", "create"),
            ("file:/srv/app/app.conf", "create"),
        ],
        "
        0 create directory:/srv w0
        1 create directory:/srv/app w1 after 0
        2 create file:/srv/app/app.conf w2 after 0,1
        --
        ",
    );
}

#[test]
fn unchanged_parent_imposes_no_order() {
    check(
        vec![dir("/srv"), file("/srv/a"), link("/srv/l", "/srv/a")],
        &[("file:/srv/a", "update"), ("symlink:/srv/l", "create")],
        "
        0 update file:/srv/a w0
        1 create symlink:/srv/l w0
        --
        ",
    );
}

#[test]
fn removals_run_in_reverse() {
    check(
        vec![
            dir("/srv").absent(),
            dir("/srv/app").absent(),
            file("/srv/app/app.conf").absent(),
            link("/srv/current", "/srv/app").absent(),
        ],
        &[
            ("directory:/srv", "delete"),
            ("directory:/srv/app", "delete"),
            ("file:/srv/app/app.conf", "delete"),
            ("symlink:/srv/current", "delete"),
        ],
        "
        --
        0 delete file:/srv/app/app.conf w0 !
        1 delete symlink:/srv/current w0 !
        2 delete directory:/srv/app w1 after 0 !
        3 delete directory:/srv w2 after 0,1,2 !
        ",
    );
}

#[test]
fn explicit_requires() {
    // Against the id order: `file:/a` comes first by id, but requires `/b`.
    check(
        vec![
            file("/a").requires(&["file:/b"]),
            file("/b").requires(&["file:/c"]),
            file("/c"),
        ],
        &[
            ("file:/a", "create"),
            ("file:/b", "update"),
            ("file:/c", "create"),
        ],
        "
        0 create file:/c w0
        1 update file:/b w1 after 0
        2 create file:/a w2 after 1
        --
        ",
    );
    // Two removals that require each other run in reverse.
    check(
        vec![
            file("/a").absent().requires(&["file:/b"]),
            file("/b").absent(),
        ],
        &[("file:/a", "delete"), ("file:/b", "delete")],
        "
        --
        0 delete file:/a w0 !
        1 delete file:/b w1 after 0 !
        ",
    );
}

#[test]
fn owner_before_the_file_it_owns() {
    check(
        vec![
            file("/srv/a").owner("app").owner_group("web"),
            dir("/srv/d").owner("app"),
            user("app"),
            group("web"),
        ],
        &[
            ("file:/srv/a", "create"),
            ("directory:/srv/d", "create"),
            ("user:app", "create"),
            ("group:web", "create"),
        ],
        "
        0 create group:web w0
        1 create user:app w0
        2 create directory:/srv/d w1 after 1
        3 create file:/srv/a w1 after 0,1
        --
        ",
    );
}

#[test]
fn numeric_owner_orders_after_the_account_with_that_id() {
    check(
        vec![
            file("/srv/a").owner("1500").owner_group("1600"),
            user("app").uid(1500),
            group("app").gid(1600),
            group("other").gid(1500),
            file("/srv/b").owner("1501"),
        ],
        &[
            ("file:/srv/a", "create"),
            ("file:/srv/b", "create"),
            ("user:app", "create"),
            ("group:app", "create"),
            ("group:other", "create"),
        ],
        "
        0 create file:/srv/b w0
        1 create group:app w0
        2 create group:other w0
        3 create user:app w1 after 1
        4 create file:/srv/a w2 after 1,3
        --
        ",
    );
}

#[test]
fn group_before_a_user_in_it() {
    check(
        vec![user("alice").in_groups(&["web", "wheel"]), group("wheel")],
        &[("user:alice", "create"), ("group:wheel", "create")],
        "
        0 create group:wheel w0
        1 create user:alice w1 after 0
        --
        ",
    );
}

#[test]
fn a_group_named_like_a_user_comes_first_and_goes_last() {
    check(
        vec![user("app"), group("app")],
        &[("user:app", "create"), ("group:app", "create")],
        "
        0 create group:app w0
        1 create user:app w1 after 0
        --
        ",
    );
    check(
        vec![user("app"), group("app")],
        &[("user:app", "delete"), ("group:app", "delete")],
        "
        --
        0 delete user:app w0 !
        1 delete group:app w1 after 0 !
        ",
    );
}

#[test]
fn package_before_its_service() {
    check(
        vec![service("nginx.service"), package("nginx"), service("sshd")],
        &[
            ("service:nginx.service", "update"),
            ("package:nginx", "create"),
            ("service:sshd", "update"),
        ],
        "
        0 create package:nginx w0
        1 update service:sshd w0
        2 update service:nginx.service w1 after 0
        --
        ",
    );
}

#[test]
fn restart_trigger_before_its_service() {
    check(
        vec![
            service("nginx").restart_on(&["file:/etc/nginx/nginx.conf"]),
            file("/etc/nginx/nginx.conf"),
        ],
        &[
            ("service:nginx", "update"),
            ("file:/etc/nginx/nginx.conf", "update"),
        ],
        "
        0 update file:/etc/nginx/nginx.conf w0
        1 update service:nginx w1 after 0
        2 update service:nginx w1 after 0 restart on 0
        --
        ",
    );
    // A removed trigger file orders the service's step after it (and so
    // behind the barrier), but a removal is no trigger for a restart.
    check(
        vec![
            service("nginx").restart_on(&["file:/etc/nginx/conf.d/old.conf"]),
            file("/etc/nginx/conf.d/old.conf").absent(),
        ],
        &[
            ("service:nginx", "update"),
            ("file:/etc/nginx/conf.d/old.conf", "delete"),
        ],
        "
        --
        0 delete file:/etc/nginx/conf.d/old.conf w0 !
        1 update service:nginx w1 after 0
        ",
    );
}

#[test]
fn restart_once_after_every_trigger_that_changes() {
    let nginx = || {
        service("nginx").restart_on(&[
            "file:/etc/nginx/nginx.conf",
            "file:/etc/nginx/mime.types",
            "directory:/etc/nginx/conf.d",
        ])
    };
    let resources = || {
        vec![
            nginx(),
            file("/etc/nginx/nginx.conf"),
            file("/etc/nginx/mime.types"),
            dir("/etc/nginx/conf.d"),
        ]
    };
    // The service itself is fine: one restart, after both changed triggers
    // (not after the unchanged one).
    let p = check(
        resources(),
        &[
            ("file:/etc/nginx/nginx.conf", "update"),
            ("directory:/etc/nginx/conf.d", "create"),
        ],
        "
        0 create directory:/etc/nginx/conf.d w0
        1 update file:/etc/nginx/nginx.conf w0
        2 update service:nginx w1 after 0,1 restart on 0,1
        --
        ",
    );
    assert_eq!(
        p.changes,
        Counts {
            create: 1,
            update: 2,
            delete: 0
        }
    );
    let restart = &p.steps[2];
    assert_eq!(restart.fields[0].field, "restart");
    assert_eq!(
        restart.fields[0].to.as_deref(),
        Some("on change of directory:/etc/nginx/conf.d, file:/etc/nginx/nginx.conf")
    );
    // No trigger changes: no restart.
    check(resources(), &[], "");
    // Its own step starts it, after the triggers: no restart on top.
    check(
        resources(),
        &[
            ("file:/etc/nginx/nginx.conf", "update"),
            ("service:nginx", "start"),
        ],
        "
        0 update file:/etc/nginx/nginx.conf w0
        1 update service:nginx w1 after 0
        --
        ",
    );
    // Its own step disables it (held for a token): the restart does not
    // wait for that, and runs before the barrier.
    check(
        resources(),
        &[
            ("file:/etc/nginx/nginx.conf", "update"),
            ("service:nginx", "disable"),
        ],
        "
        0 update file:/etc/nginx/nginx.conf w0
        1 update service:nginx w1 after 0 restart on 0
        --
        2 update service:nginx w2 after 0 !
        ",
    );
    // A trigger that replaces what is at its path is destructive: the
    // restart follows it behind the barrier.
    check(
        resources(),
        &[
            ("file:/etc/nginx/nginx.conf", "update"),
            ("file:/etc/nginx/mime.types", "replace"),
        ],
        "
        0 update file:/etc/nginx/nginx.conf w0
        --
        1 update file:/etc/nginx/mime.types w1 !
        2 update service:nginx w2 after 0,1 restart on 0,1
        ",
    );
}

#[test]
fn no_restart_for_a_stopped_service_or_a_teardown() {
    let mut stopped = service("app").restart_on(&["file:/etc/app.conf"]);
    let ResourceSpec::Service(s) = &mut stopped.spec else {
        unreachable!()
    };
    s.running = false;
    check(
        vec![stopped, file("/etc/app.conf")],
        &[("file:/etc/app.conf", "update")],
        "
        0 update file:/etc/app.conf w0
        --
        ",
    );
    let h = host_with(
        "h",
        Lifecycle::Absent,
        vec![
            service("app").restart_on(&["file:/etc/app.conf"]),
            file("/etc/app.conf"),
        ],
    );
    let p = plan_host(&h, &changes_of(&h, &[("file:/etc/app.conf", "update")]));
    assert!(p.steps.iter().all(|s| !s.is_restart()), "{p:#?}");
    // A pruned service is torn down: no restart either.
    let mut pruned = service("app").restart_on(&["file:/etc/app.conf"]);
    pruned.pruned = true;
    check(
        vec![pruned, file("/etc/app.conf")],
        &[("file:/etc/app.conf", "update"), ("service:app", "delete")],
        "
        0 update file:/etc/app.conf w0
        --
        1 delete service:app w1 !
        ",
    );
}

#[test]
fn unit_file_before_its_service_and_reload_flag_carried() {
    let h = host(
        "h",
        vec![
            service("app").restart_on(&["file:/etc/systemd/system/app.service"]),
            file("/etc/systemd/system/app.service"),
            file("/etc/systemd/system/app.service.d/limits.conf"),
            file("/etc/systemd/system/other.service"),
        ],
    );
    let mut changes = changes_of(
        &h,
        &[
            ("file:/etc/systemd/system/app.service", "update"),
            (
                "file:/etc/systemd/system/app.service.d/limits.conf",
                "create",
            ),
            ("file:/etc/systemd/system/other.service", "create"),
            ("service:app", "update"),
        ],
    );
    let app = changes.iter().position(|c| c.id == "service:app").unwrap();
    changes[app].daemon_reload = true;
    let p = plan_host(&h, &changes);
    assert_plan_invariants(&p);
    assert_eq!(
        render(&p),
        "0 update file:/etc/systemd/system/app.service w0\n\
         1 create file:/etc/systemd/system/app.service.d/limits.conf w0\n\
         2 create file:/etc/systemd/system/other.service w0\n\
         3 update service:app w1 after 0,1\n\
         4 update service:app w1 after 0 restart on 0\n\
         --\n"
    );
    assert!(p.steps[3].daemon_reload && p.steps[4].daemon_reload);
    assert!(!p.steps[1].daemon_reload);
    // In the plan document only where they apply.
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["steps"][4]["triggers"], serde_json::json!([0]));
    assert_eq!(json["steps"][4]["daemon_reload"], true);
    assert!(json["steps"][1].get("triggers").is_none());
    assert!(json["steps"][1].get("daemon_reload").is_none());
}

#[test]
fn requires_on_a_removal_waits_for_it() {
    // `new` requires `old` to be gone first: it runs after the removal, hence
    // after the barrier, although it is not destructive itself.
    check(
        vec![
            file("/etc/app/new.conf").requires(&["file:/etc/app/old.conf"]),
            file("/etc/app/old.conf").absent(),
            file("/etc/app/other.conf"),
        ],
        &[
            ("file:/etc/app/new.conf", "create"),
            ("file:/etc/app/old.conf", "delete"),
            ("file:/etc/app/other.conf", "create"),
        ],
        "
        0 create file:/etc/app/other.conf w0
        --
        1 delete file:/etc/app/old.conf w1 !
        2 create file:/etc/app/new.conf w2 after 1
        ",
    );
}

#[test]
fn destructive_steps_after_the_barrier() {
    check(
        vec![
            file("/a").absent(),
            file("/b"),
            link("/c", "/b"),
            service("nginx"),
            dir("/z"),
        ],
        &[
            ("file:/a", "delete"),
            ("file:/b", "update"),
            ("symlink:/c", "replace"),
            ("service:nginx", "stop"),
            ("directory:/z", "create"),
        ],
        "
        0 create directory:/z w0
        1 update file:/b w0
        --
        2 delete file:/a w1 !
        3 update service:nginx w1 !
        4 update symlink:/c w1 !
        ",
    );
}

#[test]
fn dependent_of_a_destructive_step_lands_after_the_barrier() {
    // `/srv` holds a file that must make way for the directory; what goes
    // inside it waits for that, so after the barrier too.
    check(
        vec![
            dir("/srv"),
            dir("/srv/app"),
            file("/srv/app/a"),
            file("/etc/motd"),
        ],
        &[
            ("directory:/srv", "replace"),
            ("directory:/srv/app", "create"),
            ("file:/srv/app/a", "create"),
            ("file:/etc/motd", "update"),
        ],
        "
        0 update file:/etc/motd w0
        --
        1 update directory:/srv w1 !
        2 create directory:/srv/app w2 after 1
        3 create file:/srv/app/a w3 after 1,2
        ",
    );
}

#[test]
fn removals_inside_a_replaced_path_run_first() {
    // `/srv/current` is a directory holding a managed file that is to go;
    // the symlink that replaces the directory must wait for that removal, or
    // the removal would run through the new link.
    check(
        vec![
            link("/srv/current", "/srv/releases/2"),
            dir("/srv/current/cache").absent(),
            file("/srv/current/cache/x").absent(),
        ],
        &[
            ("symlink:/srv/current", "replace"),
            ("directory:/srv/current/cache", "delete"),
            ("file:/srv/current/cache/x", "delete"),
        ],
        "
        --
        0 delete file:/srv/current/cache/x w0 !
        1 delete directory:/srv/current/cache w1 after 0 !
        2 update symlink:/srv/current w2 after 0,1 !
        ",
    );
}

#[test]
fn a_cycle_that_slips_through_still_plans_every_change() {
    // Validation refuses cycles, but the best-effort state of an invalid
    // desired state may hold one: every change still gets a step (none
    // vanishes), the edges that close the cycle are dropped, the rest kept.
    check(
        vec![
            file("/a").requires(&["file:/b"]),
            file("/b").requires(&["file:/a"]),
            file("/c").requires(&["file:/b"]),
            file("/d"),
        ],
        &[
            ("file:/a", "update"),
            ("file:/b", "update"),
            ("file:/c", "update"),
            ("file:/d", "update"),
        ],
        "
        0 update file:/a w0
        1 update file:/d w0
        2 update file:/b w1 after 0
        3 update file:/c w2 after 2
        --
        ",
    );
}

#[test]
fn noop_resources_produce_no_step() {
    let p = check(
        vec![dir("/srv"), file("/srv/a"), file("/srv/b").absent()],
        &[],
        "",
    );
    assert_eq!(
        (p.changes, p.destructive, p.barrier, p.waves.len()),
        (Counts::default(), 0, 0, 0)
    );
    assert!(!p.has_changes());
}

#[test]
fn change_counts() {
    let p = check(
        vec![
            file("/a"),
            file("/b"),
            file("/c").absent(),
            link("/d", "/a"),
            dir("/e"),
        ],
        &[
            ("file:/a", "create"),
            ("file:/b", "update"),
            ("file:/c", "delete"),
            ("symlink:/d", "replace"),
        ],
        "
        0 create file:/a w0
        1 update file:/b w0
        --
        2 delete file:/c w1 !
        3 update symlink:/d w1 !
        ",
    );
    assert_eq!(
        (p.changes, p.destructive, p.barrier),
        (
            Counts {
                create: 1,
                update: 2,
                delete: 1
            },
            2,
            2
        )
    );
    assert_eq!(p.destructive_steps().count(), 2);
}

#[test]
fn after_lists_exactly_the_direct_predecessors() {
    // `/srv/a/b/f` has three ancestors under management but only two change;
    // `after` names exactly the changing ones, and the unrelated step none.
    let p = check(
        vec![
            dir("/srv"),
            dir("/srv/a"),
            dir("/srv/a/b"),
            file("/srv/a/b/f").requires(&["file:/z"]),
            file("/z"),
            file("/y"),
        ],
        &[
            ("directory:/srv/a", "create"),
            ("directory:/srv/a/b", "create"),
            ("file:/srv/a/b/f", "create"),
            ("file:/z", "update"),
            ("file:/y", "update"),
        ],
        "
        0 create directory:/srv/a w0
        1 update file:/y w0
        2 update file:/z w0
        3 create directory:/srv/a/b w1 after 0
        4 create file:/srv/a/b/f w2 after 0,2,3
        --
        ",
    );
    assert_eq!(p.waves, vec![vec![0, 1, 2], vec![3], vec![4]]);
}

// ---- determinism and hashes ------------------------------------------------

/// web-1: a new app directory and config, an old file to remove.
fn web1() -> (Host, HostActual) {
    let h = host(
        "web-1",
        vec![
            dir("/srv/app").mode(0o750),
            file("/srv/app/app.conf").content("port = 8080\n"),
            file("/etc/old.conf").absent(),
            link("/srv/current", "/srv/app"),
        ],
    );
    let mut a = HostActual::default();
    a.resources
        .insert("directory:/srv/app".into(), Observed::Absent);
    a.resources
        .insert("file:/srv/app/app.conf".into(), Observed::Absent);
    a.resources
        .insert("file:/etc/old.conf".into(), fstate(0o644, "x\n"));
    a.resources.insert(
        "symlink:/srv/current".into(),
        Observed::Symlink {
            target: b"/srv/app".to_vec(),
        },
    );
    (h, a)
}

/// web-2: only a mode change.
fn web2() -> (Host, HostActual) {
    let h = host("web-2", vec![file("/etc/motd").content("hi\n").mode(0o644)]);
    let mut a = HostActual::default();
    a.resources
        .insert("file:/etc/motd".into(), fstate(0o600, "hi\n"));
    (h, a)
}

fn plan_of(h: &Host, a: &HostActual) -> HostPlan {
    let p = plan_host(h, &diff_host(h, a));
    assert_plan_invariants(&p);
    p
}

fn fleet(rev: &str, hosts: &[(Host, HostActual)]) -> Plan {
    Plan::new(rev, hosts.iter().map(|(h, a)| plan_of(h, a)).collect())
}

#[test]
fn same_inputs_same_bytes() {
    let one = fleet("rev1", &[web1(), web2()]);
    let two = fleet("rev1", &[web1(), web2()]);
    assert_eq!(one.to_json(), two.to_json());
    assert_eq!(one.plan_hash, two.plan_hash);
    assert_eq!(one.plan_hash.len(), 64);
    // Host order in the input does not matter.
    let swapped = fleet("rev1", &[web2(), web1()]);
    assert_eq!(one.to_json(), swapped.to_json());
    assert_eq!(one.plan_hash, swapped.plan_hash);
    let names: Vec<&str> = swapped.hosts.iter().map(|h| h.host.as_str()).collect();
    assert_eq!(names, ["web-1", "web-2"]);
    // The plan hash covers the document: another revision, another hash.
    assert_ne!(one.plan_hash, fleet("rev2", &[web1(), web2()]).plan_hash);
}

#[test]
fn plan_hash_is_over_the_document_without_itself() {
    // sha256 of the compact JSON, fields in declaration order, with an
    // empty `plan_hash`.
    let p = fleet("rev1", &[web1(), web2()]);
    let mut blank = p.clone();
    blank.plan_hash.clear();
    let body = serde_json::to_vec(&blank).unwrap();
    assert_eq!(crate::core::sha256_hex(&body), p.plan_hash);
}

#[test]
fn operation_hash_only_with_destructive_steps() {
    let p = fleet("rev1", &[web2()]);
    assert!(p.hosts[0].has_changes());
    assert_eq!((p.operation.as_deref(), p.operation_hosts.len()), (None, 0));
    assert_eq!(operation_hash(&p.hosts), None);

    let p = fleet("rev1", &[web1(), web2()]);
    let op = p.operation.clone().expect("web-1 deletes a file");
    assert_eq!(op.len(), 64);
    assert_eq!(p.operation_hosts, ["web-1"]);
    assert_eq!(
        operation_hash(&p.hosts),
        Some((op.clone(), vec!["web-1".to_string()]))
    );
}

#[test]
fn operation_hash_follows_the_destructive_steps() {
    let base = fleet("rev1", &[web1(), web2()]).operation.unwrap();
    // Another desired revision, same destructive steps on the same objects:
    // the same operation (SPEC 8.1), so a pending token survives a commit.
    assert_eq!(fleet("rev2", &[web1(), web2()]).operation.unwrap(), base);
    // The object to destroy changed on the host (content, then mode):
    // another operation each time.
    for changed in [fstate(0o644, "y\n"), fstate(0o600, "x\n")] {
        let (h1, mut a1) = web1();
        a1.resources.insert("file:/etc/old.conf".into(), changed);
        let other = fleet("rev1", &[(h1, a1), web2()]);
        assert_ne!(other.operation.unwrap(), base);
    }
    // Another destructive step: another operation, and a wider scope.
    let (mut h2, mut a2) = web2();
    h2.resources.push(file("/etc/gone").absent());
    h2.resources.sort_by(|a, b| a.id.cmp(&b.id));
    a2.resources
        .insert("file:/etc/gone".into(), fstate(0o644, ""));
    let wider = fleet("rev1", &[web1(), (h2, a2)]);
    assert_ne!(wider.operation.as_deref().unwrap(), base);
    assert_eq!(wider.operation_hosts, ["web-1", "web-2"]);
    // A non-destructive step that changes, appears or goes: same operation.
    let (h1, mut a1) = web1();
    a1.resources.insert(
        "file:/srv/app/app.conf".into(),
        fstate(0o644, "port = 8080\n"),
    );
    let (h2, mut a2) = web2();
    a2.resources
        .insert("file:/etc/motd".into(), fstate(0o644, "hi\n"));
    let quieter = fleet("rev1", &[(h1, a1), (h2, a2)]);
    assert_eq!(quieter.operation.as_deref().unwrap(), base);
    assert_eq!(quieter.operation_hosts, ["web-1"]);
}

#[test]
fn operation_hash_ignores_where_non_destructive_steps_put_destructive_ones() {
    // `/b` and `/m` replace files with symlinks. `/b` requires `/q`, which
    // requires the replacement at `/a`; whether `/q` itself changes moves `/b`
    // relative to `/m` in the step order, but the same things are destroyed.
    let resources = || {
        vec![
            link("/a", "/x"),
            file("/q").requires(&["symlink:/a"]),
            link("/b", "/x").requires(&["file:/q"]),
            link("/m", "/x"),
        ]
    };
    let h = host("h", resources());
    let with_q = plan_host(
        &h,
        &changes_of(
            &h,
            &[
                ("symlink:/a", "replace"),
                ("file:/q", "update"),
                ("symlink:/b", "replace"),
                ("symlink:/m", "replace"),
            ],
        ),
    );
    let without_q = plan_host(
        &h,
        &changes_of(
            &h,
            &[
                ("symlink:/a", "replace"),
                ("symlink:/b", "replace"),
                ("symlink:/m", "replace"),
            ],
        ),
    );
    assert_plan_invariants(&with_q);
    assert_plan_invariants(&without_q);
    assert_eq!(
        Plan::new("rev1", vec![with_q]).operation,
        Plan::new("rev1", vec![without_q]).operation
    );
}

#[test]
fn teardown_plan() {
    // `lifecycle: absent`: every present resource goes, contents first.
    let h = host_with(
        "old",
        Lifecycle::Absent,
        vec![dir("/srv"), file("/srv/a"), link("/srv/l", "/srv/a")],
    );
    let mut a = HostActual::default();
    a.resources
        .insert("directory:/srv".into(), Observed::Directory(meta(0o755)));
    a.resources.insert("file:/srv/a".into(), fstate(0o644, ""));
    a.resources
        .insert("symlink:/srv/l".into(), Observed::Absent);
    let p = plan_of(&h, &a);
    assert_eq!(
        render(&p),
        "--\n0 delete file:/srv/a w0 !\n1 delete directory:/srv w1 after 0 !\n"
    );
}

#[test]
fn plan_document_snapshot() {
    let p = fleet("0123abcd", &[web1(), web2()]);
    let json = String::from_utf8(p.to_json()).unwrap();
    insta::assert_snapshot!(json);
}

/// What the plan saw at a path, as its step tells the builder: for every
/// path kind, desired present or absent, over every type the probe can
/// report, the step's `path_seen` is the type the probe saw.
#[test]
fn path_steps_carry_the_type_the_probe_saw() {
    let observed = [
        Observed::Absent,
        fstate(0o644, "other\n"),
        Observed::Directory(meta(0o700)),
        Observed::Symlink {
            target: b"/elsewhere".to_vec(),
        },
        Observed::Other {
            file_type: "fifo".into(),
        },
    ];
    let kinds: Vec<Resource> = vec![file("/p").content("x\n"), dir("/p"), link("/p", "/t")];
    let mut seen = 0;
    for lifecycle in [Lifecycle::Running, Lifecycle::Absent] {
        for r in &kinds {
            for o in &observed {
                let h = host_with("h", lifecycle, vec![r.clone()]);
                let mut a = HostActual::default();
                a.resources.insert(r.id.clone(), o.clone());
                let p = plan_host(&h, &diff_host(&h, &a));
                for step in &p.steps {
                    seen += 1;
                    assert_eq!(
                        step.path_seen(),
                        PathType::of_observed(o),
                        "{} {:?} over {o:?}",
                        r.id,
                        step.action
                    );
                }
            }
        }
    }
    assert!(seen >= 15, "{seen} steps");
    // Not a path: nothing to say.
    let h = host("h", vec![user("app")]);
    let mut a = HostActual::default();
    a.resources.insert("user:app".into(), Observed::Absent);
    let p = plan_host(&h, &diff_host(&h, &a));
    assert_eq!(p.steps[0].path_seen(), None);
}

// ---- approvals (SPEC 8.1) ---------------------------------------------------

fn service_state(unit_file_state: &str, active: &str) -> Observed {
    Observed::Service(crate::core::actual::ServiceState {
        unit: "app.service".into(),
        load_state: "loaded".into(),
        active_state: active.into(),
        unit_file_state: unit_file_state.into(),
    })
}

/// The (change, observed) of the one destructive step of `h` against `a`.
fn approval_of(h: &Host, a: &HostActual) -> (String, serde_json::Value, Option<String>) {
    let p = plan_of(h, a);
    let steps: Vec<&Step> = p.destructive_steps().collect();
    assert_eq!(steps.len(), 1, "{p:?}");
    let ap = steps[0]
        .approval
        .clone()
        .expect("a destructive step has an approval");
    (ap.change, ap.observed, ap.blocked)
}

fn actual(entries: &[(&str, Observed)]) -> HostActual {
    let mut a = HostActual::default();
    for (k, o) in entries {
        a.resources.insert(k.to_string(), o.clone());
    }
    a
}

#[test]
fn service_approvals_name_stop_disable_or_both() {
    let mut stop = service("app");
    let mut stop_disable = service("app");
    if let ResourceSpec::Service(s) = &mut stop.spec {
        s.running = false;
    }
    if let ResourceSpec::Service(s) = &mut stop_disable.spec {
        s.running = false;
        s.enabled = false;
    }
    let a = actual(&[("service:app", service_state("enabled", "active"))]);
    let (c1, o1, _) = approval_of(&host("h", vec![stop]), &a);
    let (c2, o2, _) = approval_of(&host("h", vec![stop_disable.clone()]), &a);
    assert_eq!((c1.as_str(), c2.as_str()), ("stop", "stop+disable"));
    assert_eq!(o1, o2);
    assert_eq!(
        o1,
        serde_json::json!({"type": "service", "unit_file_state": "enabled", "active": "active"})
    );
    let only_disable = actual(&[("service:app", service_state("enabled", "inactive"))]);
    let (c3, o3, _) = approval_of(&host("h", vec![stop_disable]), &only_disable);
    assert_eq!(c3, "disable");
    assert_eq!(o3["active"], "inactive");
    // A stop and a stop+disable are two operations: a token for one never
    // covers the other.
    let op = |r: Resource| {
        Plan::new("rev", vec![plan_of(&host("h", vec![r]), &a)])
            .operation
            .unwrap()
    };
    let mut s1 = service("app");
    let mut s2 = service("app");
    if let ResourceSpec::Service(s) = &mut s1.spec {
        s.running = false;
    }
    if let ResourceSpec::Service(s) = &mut s2.spec {
        s.running = false;
        s.enabled = false;
    }
    assert_ne!(op(s1), op(s2));
}

#[test]
fn fingerprints_per_kind() {
    use crate::core::actual::{GroupState, PackageState, UserState};
    let (c, o, _) = approval_of(
        &host("h", vec![file("/f").absent()]),
        &actual(&[("file:/f", fstate(0o640, "x\n"))]),
    );
    assert_eq!(c, "delete");
    assert_eq!(
        o,
        serde_json::json!({"type": "file", "size": 2, "sha256": crate::core::sha256_hex(b"x\n"),
            "mode": "0640", "uid": 0, "gid": 0})
    );
    let (_, o, _) = approval_of(
        &host("h", vec![package("hello").absent()]),
        &actual(&[(
            "package:hello",
            Observed::Package(PackageState {
                version: Some("2.10-3".into()),
            }),
        )]),
    );
    assert_eq!(
        o,
        serde_json::json!({"type": "package", "version": "2.10-3"})
    );
    let (_, o, _) = approval_of(
        &host("h", vec![user("app").absent()]),
        &actual(&[(
            "user:app",
            Observed::User(UserState {
                uid: 1001,
                gid: 1001,
                home: "/home/app".into(),
                shell: "/bin/sh".into(),
                primary_group: "app".into(),
                groups: vec![],
            }),
        )]),
    );
    assert_eq!(
        o,
        serde_json::json!({"type": "user", "uid": 1001, "home": "/home/app"})
    );
    let (_, o, _) = approval_of(
        &host("h", vec![group("app").absent()]),
        &actual(&[(
            "group:app",
            Observed::Group(GroupState {
                gid: 1001,
                members: vec![],
            }),
        )]),
    );
    assert_eq!(o, serde_json::json!({"type": "group", "gid": 1001}));
    // A replacement names both types, and fingerprints what it replaces.
    let (c, o, _) = approval_of(
        &host("h", vec![link("/l", "/x")]),
        &actual(&[("symlink:/l", fstate(0o644, "x\n"))]),
    );
    assert_eq!(c, "replace:file->symlink");
    assert_eq!(o["type"], "file");
    let (c, o, _) = approval_of(
        &host("h", vec![file("/f").content("x")]),
        &actual(&[(
            "file:/f",
            Observed::Symlink {
                target: b"/t".to_vec(),
            },
        )]),
    );
    assert_eq!(c, "replace:symlink->file");
    assert_eq!(o, serde_json::json!({"type": "symlink", "target": "2f74"}));
}

#[test]
fn a_directory_approval_covers_its_tree_and_blocks_without_one() {
    use crate::core::actual::Tree;
    let h = host("h", vec![dir("/d").absent()]);
    let with_tree = |tree: Option<Tree>| {
        let mut a = actual(&[("directory:/d", Observed::Directory(meta(0o755)))]);
        if let Some(t) = tree {
            a.trees.insert("directory:/d".into(), t);
        }
        a
    };
    let digest = |entries, c: char| Tree::Digest {
        entries,
        sha256: c.to_string().repeat(64),
    };
    let (c, o, blocked) = approval_of(&h, &with_tree(Some(digest(3, 'a'))));
    assert_eq!((c.as_str(), blocked), ("delete", None));
    assert_eq!(
        o["tree"],
        serde_json::json!({"entries": 3, "sha256": "a".repeat(64)})
    );
    // Something changed deep inside: another operation.
    let op = |a: &HostActual| Plan::new("rev", vec![plan_of(&h, a)]).operation.unwrap();
    assert_ne!(
        op(&with_tree(Some(digest(3, 'a')))),
        op(&with_tree(Some(digest(3, 'b'))))
    );
    // Too large, a failed listing, or no digest at all: blocked, token or not.
    for tree in [
        Some(Tree::TooLarge),
        Some(Tree::Failed {
            message: "listing the tree failed".into(),
        }),
        None,
    ] {
        let a = with_tree(tree.clone());
        let (_, _, blocked) = approval_of(&h, &a);
        let why = blocked.unwrap_or_else(|| panic!("{tree:?} must block"));
        let p = plan_of(&h, &a);
        let d = crate::core::policy::decide(
            &[crate::core::policy::HostFacts {
                plan: &p,
                protected: false,
                preflight_error: None,
                fence: None,
            }],
            crate::core::spec::DispatchMode::Enforced,
            None,
            false,
            true,
        );
        assert_eq!(
            d.hosts[0].outcome,
            crate::core::policy::PolicyOutcome::PolicyBlocked
        );
        assert!(!d.hosts[0].allow_destructive);
        assert!(d.hosts[0].reason.contains(&why), "{}", d.hosts[0].reason);
    }
    assert!(
        approval_of(&h, &with_tree(Some(Tree::TooLarge)))
            .2
            .unwrap()
            .contains("more than 10000 entries")
    );
}
