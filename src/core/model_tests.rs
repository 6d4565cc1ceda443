//! Table tests for `validate`: every problem, each at the `file:line:col`
//! that SPEC.md section 7 prescribes.
//!
//! Fixtures are inline, rust-analyzer style: one string holding several
//! files, each introduced by a `//- <path>` header line. Line 1 of a file is
//! the line after its header; the common indentation of the whole fixture is
//! removed first, so columns count from the fixture's left margin.
//!
//! A header may end in one directive that replaces the file's text:
//! `@too-large N` (`Blob::TooLarge(N)`), `@refused WHY` (`Blob::Refused`),
//! `@hex BYTES` (raw bytes, e.g. `ff fe 00`), `@filled N` (N bytes of `#`).

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::core::spec::{DispatchMode, HumanDuration, Mode};

/// Parse a fixture into a tree, validate it, and compare every rendered
/// diagnostic (`file:line:col: message`, one per line, in validation order)
/// with `expect`. Returns the result for further assertions.
#[track_caller]
fn check(fixture: &str, expect: &str) -> Validated {
    let v = validate(&tree(fixture));
    let actual: Vec<String> = v.problems.iter().map(ToString::to_string).collect();
    let expect = trim_indent(expect);
    assert_eq!(
        actual.join("\n"),
        expect.trim(),
        "\n--- actual diagnostics ---\n{}\n",
        actual.join("\n")
    );
    v
}

fn tree(fixture: &str) -> SourceTree {
    let mut tree = SourceTree::default();
    let text = trim_indent(fixture);
    let mut current: Option<(String, Option<Blob>, String)> = None;
    let mut files = Vec::new();
    for line in text.split_inclusive('\n') {
        if let Some(header) = line.strip_prefix("//- ") {
            files.extend(current.take());
            let header = header.trim_end();
            let (path, blob) = match header.split_once(" @") {
                None => (header, None),
                Some((path, directive)) => (path, Some(directive_blob(directive))),
            };
            current = Some((path.to_string(), blob, String::new()));
        } else if let Some((_, _, body)) = &mut current {
            body.push_str(line);
        } else {
            assert!(
                line.trim().is_empty(),
                "fixture text before a header: {line:?}"
            );
        }
    }
    files.extend(current);
    for (path, blob, body) in files {
        let blob = blob.unwrap_or(Blob::Bytes(body.into_bytes()));
        match path.split_once('/') {
            None if path == "tend.yaml" => tree.tend = Some(blob),
            None if path == "inventory.yaml" => tree.inventory = Some(blob),
            Some(("hosts", name)) => drop(tree.hosts.insert(name.into(), blob)),
            Some(("groups", name)) => drop(tree.groups.insert(name.into(), blob)),
            Some(("files", name)) => drop(tree.sources.insert(name.into(), blob)),
            _ => panic!("fixture path not in a desired-state dir: {path}"),
        }
    }
    tree
}

fn directive_blob(directive: &str) -> Blob {
    let (word, arg) = directive.split_once(' ').unwrap_or((directive, ""));
    match word {
        "too-large" => Blob::TooLarge(arg.parse().expect("@too-large N")),
        "refused" => Blob::Refused(arg.to_string()),
        "hex" => Blob::Bytes(
            arg.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("@hex bytes"))
                .collect(),
        ),
        "filled" => Blob::Bytes(vec![b'#'; arg.parse().expect("@filled N")]),
        _ => panic!("unknown fixture directive @{word}"),
    }
}

/// Remove the indentation common to every non-blank line, and a leading
/// newline.
fn trim_indent(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.split_inclusive('\n')
        .map(|l| {
            if l.len() >= indent {
                &l[indent..]
            } else {
                l.trim_start_matches(' ')
            }
        })
        .collect()
}

fn host<'a>(v: &'a Validated, name: &str) -> &'a Host {
    v.state
        .hosts
        .get(name)
        .unwrap_or_else(|| panic!("no host `{name}`"))
}

fn res<'a>(v: &'a Validated, host_name: &str, id: &str) -> &'a Resource {
    host(v, host_name)
        .resource(id)
        .unwrap_or_else(|| panic!("no resource `{id}` on `{host_name}`"))
}

const INV: &str = "hosts: [{name: web-1, address: 10.0.0.1}]";

/// A fixture with the standard inventory (host `web-1`) and `body` as its
/// host file.
fn web1(body: &str) -> String {
    format!(
        "//- inventory.yaml\n{INV}\n//- hosts/web-1.yaml\n{}",
        trim_indent(body)
    )
}

// ---------------------------------------------------------------------------
// The fixture machinery itself.

#[test]
fn fixture_splits_files_and_trims_indent() {
    let t = tree(
        r#"
        //- tend.yaml
        dispatch: off
        //- hosts/a.yaml
          x: 1
        //- files/app/x.bin @hex ff 00
        //- groups/web.yaml @too-large 9
        "#,
    );
    assert_eq!(t.tend, Some(Blob::Bytes(b"dispatch: off\n".to_vec())));
    assert_eq!(t.hosts["a.yaml"], Blob::Bytes(b"  x: 1\n".to_vec()));
    assert_eq!(t.sources["app/x.bin"], Blob::Bytes(vec![0xff, 0]));
    assert_eq!(t.groups["web.yaml"], Blob::TooLarge(9));
    assert_eq!(t.inventory, None);
}

// ---------------------------------------------------------------------------
// A valid tree, and the defaults.

#[test]
fn minimal_tree_is_valid() {
    let v = check(&web1("resources: []"), "");
    assert!(v.is_valid());
    assert_eq!(v.state.hosts.len(), 1);
}

#[test]
fn defaults_are_applied() {
    let v = check(
        r#"
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
        //- hosts/web-1.yaml
        resources:
          - kind: file
            path: /etc/app.conf
          - kind: directory
            path: /srv/app
          - kind: symlink
            path: /srv/current
            target: /srv/app
          - kind: package
            name: curl
          - kind: service
            name: nginx
          - kind: user
            name: appsvc
          - kind: group
            name: app
          - kind: command
            name: init-db
            run: /usr/local/bin/init-db
        "#,
        "",
    );
    assert_eq!(v.state.config, TendConfig::default());
    let c = &v.state.config;
    assert_eq!(c.dispatch, DispatchMode::Off);
    assert_eq!(c.canary, None);
    assert_eq!(c.concurrency, 16);
    assert_eq!(c.probe_timeout, HumanDuration(Duration::from_secs(10)));
    assert_eq!(c.step_timeout, HumanDuration(Duration::from_secs(300)));
    assert_eq!(c.retries, 2);
    assert_eq!(c.retry_backoff, HumanDuration(Duration::from_secs(1)));
    assert_eq!(c.resync, HumanDuration(Duration::from_secs(300)));
    assert_eq!(c.quiet_window, HumanDuration(Duration::from_secs(2)));
    assert_eq!(c.max_defer, HumanDuration(Duration::from_secs(10)));
    assert_eq!(c.token_max_ttl, HumanDuration(Duration::from_secs(3600)));
    assert_eq!(c.crash_loop_threshold, 5);
    assert_eq!(c.known_hosts, "~/.ssh/known_hosts");
    assert_eq!(c.state_dir, ".tend");

    let h = host(&v, "web-1");
    assert_eq!(h.file.as_deref(), Some("hosts/web-1.yaml"));
    assert_eq!(h.lifecycle, Lifecycle::Running);
    assert_eq!(h.inv.port, 22);
    assert_eq!(h.inv.user, "root");
    assert_eq!(h.inv.transport, TransportKind::Ssh);
    assert_eq!(h.inv.identity, None);
    assert_eq!(h.inv.host_key, None);
    assert!(h.inv.tags.is_empty());
    assert!(!h.inv.protected);

    let ids: Vec<&str> = h.resources.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "command:init-db",
            "directory:/srv/app",
            "file:/etc/app.conf",
            "group:app",
            "package:curl",
            "service:nginx",
            "symlink:/srv/current",
            "user:appsvc",
        ],
        "default ids are `<kind>:<path or name>`, sorted"
    );
    for r in &h.resources {
        assert_eq!(r.state(), State::Present, "{}", r.id);
        assert!(r.requires().is_empty(), "{}", r.id);
        assert_eq!(r.from_group, None);
        assert_eq!(r.replaces_group, None);
    }
    let ResourceSpec::Service(s) = &res(&v, "web-1", "service:nginx").spec else {
        panic!()
    };
    assert!(s.enabled && s.running && s.restart_on.is_empty());
    let ResourceSpec::File(f) = &res(&v, "web-1", "file:/etc/app.conf").spec else {
        panic!()
    };
    assert_eq!((f.mode, &f.owner, &f.group), (None, &None, &None));
    assert_eq!(res(&v, "web-1", "file:/etc/app.conf").content, None);
    let ResourceSpec::Command(c) = &res(&v, "web-1", "command:init-db").spec else {
        panic!()
    };
    assert!(!c.destructive);
    assert_eq!((&c.creates, &c.unless, c.timeout), (&None, &None, None));
    let ResourceSpec::User(u) = &res(&v, "web-1", "user:appsvc").spec else {
        panic!()
    };
    assert!(!u.system && u.groups.is_empty() && u.uid.is_none());
}

#[test]
fn every_resource_kind_with_every_field() {
    let v = check(
        r#"
        //- tend.yaml
        dispatch: canary
        canary: web-1
        concurrency: 4
        probe_timeout: 3s
        step_timeout: 2m
        retries: 1
        retry_backoff: 500ms
        resync: 10m
        quiet_window: 1s
        max_defer: 5s
        token_max_ttl: 24h
        crash_loop_threshold: 3
        known_hosts: /etc/ssh/ssh_known_hosts
        state_dir: state
        //- inventory.yaml
        hosts:
          - name: web-1
            address: web-1.example.org
            port: 2222
            user: deploy
            identity: keys/id_ed25519
            host_key: "SHA256:abc"
            tags: [web, edge]
            protected: true
          - name: box
            transport: local
        //- hosts/box.yaml
        lifecycle: absent
        resources: []
        //- hosts/web-1.yaml
        lifecycle: running
        resources:
          - kind: file
            path: /etc/app/app.conf
            content: "port = 8080\n"
            mode: "0640"
            owner: appsvc
            group: app
            state: present
            id: conf
            requires: [dir]
          - kind: directory
            path: /etc/app
            mode: 0750
            owner: root
            group: "0"
            state: present
            id: dir
          - kind: symlink
            path: /srv/current
            target: /srv/releases/1
            state: present
            id: link
            requires: [dir]
          - kind: package
            name: nginx
            state: present
            id: pkg
            requires: []
          - kind: service
            name: nginx
            enabled: false
            running: true
            restart_on: [conf]
            id: svc
            requires: [pkg]
          - kind: user
            name: appsvc
            uid: 1001
            home: /srv/app
            shell: /bin/sh
            groups: [app]
            system: true
            state: present
            id: usr
          - kind: group
            name: app
            gid: 1001
            state: present
            id: grp
          - kind: command
            name: init-db
            run: |
              /usr/local/bin/init-db
            creates: /srv/app/.initialized
            unless: test -e /srv/app/db
            destructive: true
            timeout: 90s
            id: cmd
            requires: [usr]
          - kind: package
            name: telnet
            state: absent
        "#,
        "",
    );
    let c = &v.state.config;
    assert_eq!(c.dispatch, DispatchMode::Canary);
    assert_eq!(c.canary.as_deref(), Some("web-1"));
    assert_eq!(c.concurrency, 4);
    assert_eq!(c.probe_timeout.0, Duration::from_secs(3));
    assert_eq!(c.step_timeout.0, Duration::from_secs(120));
    assert_eq!(c.retries, 1);
    assert_eq!(c.retry_backoff.0, Duration::from_millis(500));
    assert_eq!(c.resync.0, Duration::from_secs(600));
    assert_eq!(c.quiet_window.0, Duration::from_secs(1));
    assert_eq!(c.max_defer.0, Duration::from_secs(5));
    assert_eq!(c.token_max_ttl.0, Duration::from_secs(86400));
    assert_eq!(c.crash_loop_threshold, 3);
    assert_eq!(c.known_hosts, "/etc/ssh/ssh_known_hosts");
    assert_eq!(c.state_dir, "state");

    let w = &host(&v, "web-1").inv;
    assert_eq!(w.address.as_deref(), Some("web-1.example.org"));
    assert_eq!((w.port, w.user.as_str()), (2222, "deploy"));
    assert_eq!(w.identity.as_deref(), Some("keys/id_ed25519"));
    assert_eq!(w.host_key.as_deref(), Some("SHA256:abc"));
    assert_eq!(w.tags, ["web", "edge"]);
    assert!(w.protected);
    let b = host(&v, "box");
    assert_eq!(b.inv.transport, TransportKind::Local);
    assert_eq!(b.inv.address, None);
    assert_eq!(b.lifecycle, Lifecycle::Absent);

    let ResourceSpec::File(f) = &res(&v, "web-1", "conf").spec else {
        panic!()
    };
    assert_eq!(f.path, "/etc/app/app.conf");
    assert_eq!(f.mode, Some(Mode(0o640)));
    assert_eq!(
        (f.owner.as_deref(), f.group.as_deref()),
        (Some("appsvc"), Some("app"))
    );
    assert_eq!(f.requires, ["dir"]);
    assert_eq!(
        res(&v, "web-1", "conf")
            .content
            .as_ref()
            .map(|c| c.bytes.as_slice()),
        Some(&b"port = 8080\n"[..])
    );
    let ResourceSpec::Directory(d) = &res(&v, "web-1", "dir").spec else {
        panic!()
    };
    assert_eq!((d.mode, d.group.as_deref()), (Some(Mode(0o750)), Some("0")));
    let ResourceSpec::Symlink(l) = &res(&v, "web-1", "link").spec else {
        panic!()
    };
    assert_eq!(l.target.as_deref(), Some("/srv/releases/1"));
    let ResourceSpec::Service(s) = &res(&v, "web-1", "svc").spec else {
        panic!()
    };
    assert!(!s.enabled && s.running);
    assert_eq!(
        (s.restart_on.as_slice(), s.requires.as_slice()),
        (&["conf".to_string()][..], &["pkg".to_string()][..])
    );
    let ResourceSpec::User(u) = &res(&v, "web-1", "usr").spec else {
        panic!()
    };
    assert_eq!(u.uid, Some(1001));
    assert_eq!(
        (u.home.as_deref(), u.shell.as_deref()),
        (Some("/srv/app"), Some("/bin/sh"))
    );
    assert_eq!(u.groups, ["app"]);
    assert!(u.system);
    let ResourceSpec::Group(g) = &res(&v, "web-1", "grp").spec else {
        panic!()
    };
    assert_eq!(g.gid, Some(1001));
    let ResourceSpec::Command(cmd) = &res(&v, "web-1", "cmd").spec else {
        panic!()
    };
    assert_eq!(cmd.run, "/usr/local/bin/init-db\n");
    assert_eq!(cmd.creates.as_deref(), Some("/srv/app/.initialized"));
    assert_eq!(cmd.unless.as_deref(), Some("test -e /srv/app/db"));
    assert!(cmd.destructive);
    assert_eq!(cmd.timeout, Some(HumanDuration(Duration::from_secs(90))));
    assert_eq!(res(&v, "web-1", "package:telnet").state(), State::Absent);

    // Origins: the item start, the key value, each requires entry.
    let o = &res(&v, "web-1", "svc").origin;
    assert_eq!(o.file, "hosts/web-1.yaml");
    assert_eq!(o.pos, Pos { line: 30, col: 5 });
    assert_eq!(o.key_pos, Pos { line: 31, col: 11 });
    assert_eq!(o.restart_on_pos, [Pos { line: 34, col: 18 }]);
    assert_eq!(o.requires_pos, [Pos { line: 36, col: 16 }]);
}

#[test]
fn mode_is_octal_quoted_or_not() {
    let v = check(
        &web1(
            r#"
            resources:
              - kind: file
                path: /a
                mode: 0644
              - kind: file
                path: /b
                mode: "0644"
              - kind: directory
                path: /c
                mode: 755
              - kind: directory
                path: /d
                mode: '0o2775'
            "#,
        ),
        "",
    );
    let mode = |id: &str| match &res(&v, "web-1", id).spec {
        ResourceSpec::File(f) => f.mode,
        ResourceSpec::Directory(d) => d.mode,
        _ => panic!(),
    };
    assert_eq!(mode("file:/a"), Some(Mode(0o644)));
    assert_eq!(mode("file:/b"), Some(Mode(0o644)));
    assert_eq!(mode("directory:/c"), Some(Mode(0o755)));
    assert_eq!(mode("directory:/d"), Some(Mode(0o2775)));
}

#[test]
fn dispatch_off_is_the_string_off() {
    // YAML 1.2: `off` is not a boolean.
    let v = check(
        &format!("//- tend.yaml\ndispatch: off\n{}", web1("resources: []")),
        "",
    );
    assert_eq!(v.state.config.dispatch, DispatchMode::Off);
    let v = check(
        &format!(
            "//- tend.yaml\ndispatch: enforced\n{}",
            web1("resources: []")
        ),
        "",
    );
    assert_eq!(v.state.config.dispatch, DispatchMode::Enforced);
}

#[test]
fn comment_only_tend_yaml_means_all_defaults() {
    let v = check(
        &format!("//- tend.yaml\n# nothing\n{}", web1("resources: []")),
        "",
    );
    assert_eq!(v.state.config, TendConfig::default());
}

#[test]
fn group_resources_merge_into_hosts_with_the_tag() {
    let v = check(
        r#"
        //- inventory.yaml
        hosts:
          - {name: web-1, address: 10.0.0.1, tags: [web]}
          - {name: web-2, address: 10.0.0.2, tags: [web, edge]}
          - {name: db-1, address: 10.0.0.3}
        //- groups/web.yaml
        resources:
          - kind: package
            name: nginx
          - kind: file
            path: /etc/motd
            content: "web\n"
        //- groups/edge.yaml
        resources:
          - kind: package
            name: haproxy
        //- hosts/web-1.yaml
        resources:
          - kind: file
            path: /etc/motd
            content: "web-1 only\n"
        //- hosts/web-2.yaml
        resources: []
        //- hosts/db-1.yaml
        resources:
          - kind: package
            name: postgresql
        "#,
        "",
    );
    let ids =
        |h: &str| -> Vec<String> { host(&v, h).resources.iter().map(|r| r.id.clone()).collect() };
    assert_eq!(ids("web-1"), ["file:/etc/motd", "package:nginx"]);
    assert_eq!(
        ids("web-2"),
        ["file:/etc/motd", "package:haproxy", "package:nginx"]
    );
    assert_eq!(ids("db-1"), ["package:postgresql"]);

    let nginx = res(&v, "web-1", "package:nginx");
    assert_eq!(nginx.from_group.as_deref(), Some("web"));
    assert_eq!(nginx.origin.file, "groups/web.yaml");
    assert_eq!(nginx.replaces_group, None);
    assert_eq!(
        res(&v, "web-2", "package:haproxy").from_group.as_deref(),
        Some("edge")
    );

    // The host's own resource with the same id replaces the group's.
    let motd = res(&v, "web-1", "file:/etc/motd");
    assert_eq!(motd.from_group, None);
    assert_eq!(motd.replaces_group.as_deref(), Some("web"));
    assert_eq!(motd.origin.file, "hosts/web-1.yaml");
    assert_eq!(
        motd.content.as_ref().unwrap().bytes.as_slice(),
        b"web-1 only\n"
    );
    let motd2 = res(&v, "web-2", "file:/etc/motd");
    assert_eq!(motd2.from_group.as_deref(), Some("web"));
    assert_eq!(motd2.content.as_ref().unwrap().bytes.as_slice(), b"web\n");
}

#[test]
fn source_content_is_resolved_with_its_sha256() {
    let v = check(
        &format!(
            "//- files/app/app.conf\nport = 8080\n//- files/bin/blob @hex 00 ff 7f\n{}",
            web1(
                r#"
                resources:
                  - kind: file
                    path: /etc/app.conf
                    source: app/app.conf
                  - kind: file
                    path: /usr/local/bin/blob
                    source: bin/blob
                "#
            )
        ),
        "",
    );
    let c = res(&v, "web-1", "file:/etc/app.conf")
        .content
        .clone()
        .unwrap();
    assert_eq!(c.bytes.as_slice(), b"port = 8080\n");
    // `printf 'port = 8080\n' | sha256sum`
    assert_eq!(
        c.sha256,
        "37107a4e5ea873399e16cc41781ede69752273d4232675d990fda44a0603dfa2"
    );
    let b = res(&v, "web-1", "file:/usr/local/bin/blob")
        .content
        .clone()
        .unwrap();
    assert_eq!(b.bytes.as_slice(), [0, 0xff, 0x7f]);
    // `printf '\x00\xff\x7f' | sha256sum`
    assert_eq!(
        b.sha256,
        "cb6dc5bd1968e27d552fd0332443db15e05fe7517cb9db8b446a60a747d03818"
    );
}

#[test]
fn user_and_group_may_share_a_name() {
    check(
        &web1(
            r#"
            resources:
              - kind: group
                name: app
              - kind: user
                name: app
                groups: [app]
            "#,
        ),
        "",
    );
}

// ---------------------------------------------------------------------------
// Unknown keys: at the key.

#[test]
fn unknown_top_level_keys() {
    check(
        r#"
        //- tend.yaml
        dispatch: off
        dispatchh: canary
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1}]
        extra: 1
        //- hosts/web-1.yaml
        resources: []
        lifecycel: absent
        //- groups/web.yaml
        resourcez: []
        "#,
        "
        groups/web.yaml:1:1: unknown field `resourcez`, expected `lifecycle` or `resources`
        hosts/web-1.yaml:2:1: unknown field `lifecycel`, expected `lifecycle` or `resources`
        inventory.yaml:2:1: unknown field `extra`, expected `hosts`
        tend.yaml:2:1: unknown field `dispatchh`, expected one of `dispatch`, `canary`, `concurrency`, `probe_timeout`, `step_timeout`, `retries`, `retry_backoff`, `resync`, `quiet_window`, `max_defer`, `token_max_ttl`, `crash_loop_threshold`, `known_hosts`, `state_dir`, `step_output_limit`, `confirmers`, `history`, `rollout`
        ",
    );
}

#[test]
fn unknown_key_in_an_inventory_host() {
    // The host stays known: its host file is not reported as orphaned.
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
            adress: 10.0.0.2
        //- hosts/web-1.yaml
        resources: []
        "#,
        "
        inventory.yaml:4:5: unknown field `adress`, expected one of `name`, `transport`, `address`, `port`, `user`, `identity`, `host_key`, `tags`, `protected`, `become`, `jump`
        ",
    );
}

#[test]
fn unknown_keys_in_every_resource_kind() {
    check(
        &web1(
            r#"
            resources:
              - kind: file
                path: /f
                mod: "0644"
              - kind: directory
                path: /d
                recurse: true
              - kind: symlink
                path: /l
                target: /f
                force: true
              - kind: package
                name: curl
                version: "8"
              - kind: service
                name: nginx
                restart: always
              - kind: user
                name: u
                password: x
              - kind: group
                name: g
                members: [u]
              - kind: command
                name: c
                run: "true"
                cwd: /tmp
            "#,
        ),
        "
        hosts/web-1.yaml:4:5: unknown field `mod`, expected one of `path`, `content`, `source`, `mode`, `owner`, `group`, `state`, `id`, `requires`, `sensitive`, `drift`, `guard`, `revert_after`
        hosts/web-1.yaml:7:5: unknown field `recurse`, expected one of `path`, `mode`, `owner`, `group`, `state`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:11:5: unknown field `force`, expected one of `path`, `target`, `state`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:14:5: unknown field `version`, expected one of `name`, `state`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:17:5: unknown field `restart`, expected one of `name`, `enabled`, `running`, `restart_on`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:20:5: unknown field `password`, expected one of `name`, `uid`, `home`, `shell`, `groups`, `system`, `state`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:23:5: unknown field `members`, expected one of `name`, `gid`, `state`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:27:5: unknown field `cwd`, expected one of `name`, `run`, `creates`, `unless`, `destructive`, `timeout`, `id`, `requires`, `sensitive`, `drift`
        ",
    );
}

#[test]
fn a_command_needs_a_script_and_a_check_that_says_something() {
    check(
        &web1(
            r#"
            resources:
              - kind: command
                name: a
                run: " "
              - kind: command
                name: b
                run: "true"
                unless: ""
              - kind: command
                name: c
                run: "true"
                creates: /srv/c
                unless: "test -e /srv/d"
            "#,
        ),
        "
        hosts/web-1.yaml:4:10: `run` must not be empty
        hosts/web-1.yaml:8:13: `unless` must not be empty: drop it, or write the check
        ",
    );
}

#[test]
fn state_is_not_a_field_of_services_and_commands() {
    check(
        &web1(
            r#"
            resources:
              - kind: service
                name: nginx
                state: absent
              - kind: command
                name: c
                run: "true"
                state: present
            "#,
        ),
        "
        hosts/web-1.yaml:4:5: unknown field `state`, expected one of `name`, `enabled`, `running`, `restart_on`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:8:5: unknown field `state`, expected one of `name`, `run`, `creates`, `unless`, `destructive`, `timeout`, `id`, `requires`, `sensitive`, `drift`
        ",
    );
}

// ---------------------------------------------------------------------------
// Wrong types: at the value.

#[test]
fn wrong_types() {
    check(
        r#"
        //- tend.yaml
        concurrency: many
        retries: [1]
        probe_timeout: soon
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
            port: abc
            protected: yes
            tags: web
        //- hosts/web-1.yaml
        resources:
          - kind: service
            name: nginx
            enabled: yes
            restart_on: nginx
          - kind: user
            name: u
            uid: -1
          - kind: file
            path: [a]
          - kind: command
            name: c
            run: "true"
            timeout: 5
            destructive: "true"
        "#,
        r#"
        hosts/web-1.yaml:4:14: expected `true` or `false`, found `yes`
        hosts/web-1.yaml:5:17: expected a list, found `nginx`
        hosts/web-1.yaml:8:10: integer -1 is out of range
        hosts/web-1.yaml:10:11: expected a string, found a list
        hosts/web-1.yaml:14:14: invalid duration `5`: time unit needed, for example 5sec or 5ms (write e.g. `10s`, `5m`, `1h`)
        hosts/web-1.yaml:15:18: expected `true` or `false`, found string "true"
        inventory.yaml:4:11: expected an integer, found `abc`
        inventory.yaml:5:16: expected `true` or `false`, found `yes`
        inventory.yaml:6:11: expected a list, found `web`
        tend.yaml:1:14: expected an integer, found `many`
        tend.yaml:2:10: expected an integer, found a list
        tend.yaml:3:16: invalid duration `soon`: expected number at 0 (write e.g. `10s`, `5m`, `1h`)
        "#,
    );
}

#[test]
fn wrong_shapes_of_whole_files_and_lists() {
    check(
        r#"
        //- tend.yaml
        - dispatch
        //- inventory.yaml
        hosts:
          web-1: {address: 10.0.0.1}
        //- hosts/web-1.yaml
        resources:
          kind: file
        //- hosts/web-2.yaml
        lifecycle: gone
        resources:
          - file
        "#,
        "
        hosts/web-1.yaml:2:3: expected a list of resources
        hosts/web-2.yaml:1:12: unknown variant `gone`, expected `running` or `absent`
        hosts/web-2.yaml:3:5: expected a resource mapping with a `kind:`
        inventory.yaml:2:3: expected a list of hosts
        tend.yaml:1:1: expected a mapping, found a list
        ",
    );
}

#[test]
fn an_unusable_inventory_is_reported_once() {
    // Not once more per host file, nor against the canary.
    check(
        r#"
        //- tend.yaml
        canary: web-1
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1}
        //- hosts/web-1.yaml
        resources: []
        "#,
        "
        inventory.yaml:1:8: invalid YAML: unclosed bracket '['
        ",
    );
}

#[test]
fn one_bad_entry_does_not_hide_another_in_the_same_mapping() {
    // A value of the wrong type is reported once: not again as missing.
    check(
        r#"
        //- tend.yaml
        dispatch: sometimes
        token_max_ttl: 25h
        canary: web-9
        //- inventory.yaml
        hosts:
          - name: web-1
            address: [10.0.0.1]
            host_key: "MD5:aa"
        //- hosts/web-1.yaml
        resources:
          - kind: file
            path: etc/app.conf
            mode: rwx
            owner: "Bad Owner"
          - kind: symlink
            path: /srv/current
            target: [a]
        "#,
        "
        hosts/web-1.yaml:3:11: path `etc/app.conf` must be absolute
        hosts/web-1.yaml:4:11: invalid mode `rwx`: write 3 or 4 octal digits, such as `0644` or `0755`
        hosts/web-1.yaml:5:12: invalid owner `Bad Owner`: a user or group name, or a numeric id
        hosts/web-1.yaml:8:13: expected a string, found a list
        inventory.yaml:3:14: expected a string, found a list
        inventory.yaml:4:15: host_key `MD5:aa` is not an OpenSSH SHA256 fingerprint (`SHA256:...`; see `ssh-keygen -lf`)
        tend.yaml:1:11: unknown variant `sometimes`, expected one of `off`, `canary`, `enforced`
        tend.yaml:2:16: token_max_ttl `25h` is above the maximum of 24h: write at most `24h`
        tend.yaml:3:9: canary `web-9` is not a host in inventory.yaml
        ",
    );
}

#[test]
fn a_missing_field_is_still_reported_beside_a_bad_one() {
    check(
        &web1(
            r#"
            resources:
              - kind: command
                name: c
                timeout: soon
            "#,
        ),
        "
        hosts/web-1.yaml:2:5: missing field `run`
        hosts/web-1.yaml:4:14: invalid duration `soon`: expected number at 0 (write e.g. `10s`, `5m`, `1h`)
        ",
    );
}

#[test]
fn a_bad_port_claims_no_duplicate_endpoint() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
          - name: web-2
            address: 10.0.0.1
            port: ssh
        //- hosts/web-1.yaml
        resources: []
        //- hosts/web-2.yaml
        resources: []
        "#,
        "
        inventory.yaml:6:11: expected an integer, found `ssh`
        ",
    );
}

#[test]
fn inventory_values_out_of_range_at_the_value() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: Web_1
            address: 10.0.0.1
            port: 0
          - name: web-2
            address: 10.0.0.2
            port: 70000
            tags: [web, Edge]
        //- hosts/Web_1.yaml
        resources: []
        //- hosts/web-2.yaml
        resources: []
        //- hosts/README.md
        see the wiki
        "#,
        "
        hosts/README.md:1:1: unexpected file: host files are named `<host>.yaml`
        inventory.yaml:2:11: invalid host name `Web_1`: use [a-z0-9][a-z0-9-]* (at most 63 characters)
        inventory.yaml:4:11: port must be between 1 and 65535
        inventory.yaml:7:11: integer 70000 is out of range
        inventory.yaml:8:17: invalid tag `Edge`: use [a-z0-9][a-z0-9-]*
        ",
    );
}

#[test]
fn crlf_line_ends_and_tabs_keep_positions() {
    check(
        "//- inventory.yaml\r\nhosts:\r\n  - name: web-1\r\n    address: 10.0.0.1\r\n    bogus: 1\r\n\
         //- hosts/web-1.yaml\nresources:\n\t- kind: file\n",
        "
        hosts/web-1.yaml:2:2: invalid YAML: tabs disallowed within this context (block indentation)
        inventory.yaml:4:5: unknown field `bogus`, expected one of `name`, `transport`, `address`, `port`, `user`, `identity`, `host_key`, `tags`, `protected`, `become`, `jump`
        ",
    );
}

// ---------------------------------------------------------------------------
// Modes and paths.

#[test]
fn bad_modes() {
    check(
        &web1(
            r#"
            resources:
              - kind: file
                path: /a
                mode: 0999
              - kind: directory
                path: /b
                mode: rwx
              - kind: file
                path: /c
                mode: 77777
              - kind: file
                path: /d
                mode: 12
            "#,
        ),
        "
        hosts/web-1.yaml:4:11: invalid mode `0999`: write 3 or 4 octal digits, such as `0644` or `0755`
        hosts/web-1.yaml:7:11: invalid mode `rwx`: write 3 or 4 octal digits, such as `0644` or `0755`
        hosts/web-1.yaml:10:11: invalid mode `77777`: write 3 or 4 octal digits, such as `0644` or `0755`
        hosts/web-1.yaml:13:11: invalid mode `12`: write 3 or 4 octal digits, such as `0644` or `0755`
        ",
    );
}

#[test]
fn relative_dotdot_and_unnormalized_paths() {
    check(
        &web1(
            r#"
            resources:
              - kind: file
                path: etc/app.conf
              - kind: directory
                path: /srv/../etc
              - kind: symlink
                path: /srv//current
                target: /x
              - kind: file
                path: /etc/app/
              - kind: directory
                path: /srv/./app
              - kind: user
                name: u
                home: home/u
              - kind: command
                name: c
                run: "true"
                creates: ../x
              - kind: file
                path: /
            "#,
        ),
        "
        hosts/web-1.yaml:3:11: path `etc/app.conf` must be absolute
        hosts/web-1.yaml:5:11: path `/srv/../etc` must not contain `..`
        hosts/web-1.yaml:7:11: path `/srv//current` is not normalized; write `/srv/current`
        hosts/web-1.yaml:10:11: path `/etc/app/` is not normalized; write `/etc/app`
        hosts/web-1.yaml:12:11: path `/srv/./app` is not normalized; write `/srv/app`
        hosts/web-1.yaml:15:11: path `home/u` must be absolute
        hosts/web-1.yaml:19:14: path `../x` must be absolute
        hosts/web-1.yaml:21:11: refusing to manage `/` itself
        ",
    );
}

// ---------------------------------------------------------------------------
// Duplicates.

#[test]
fn duplicate_yaml_keys_at_the_second_occurrence() {
    check(
        r#"
        //- tend.yaml
        retries: 1
        retries: 2
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
            address: 10.0.0.2
        //- hosts/web-1.yaml
        resources:
          - kind: package
            name: curl
            name: wget
          - kind: file
            path: /etc/x
            mode: 0644
            mode: 0600
          - kind: file
            path: etc/y
        "#,
        "
        hosts/web-1.yaml:4:5: duplicate key `name` (first at line 3): remove one
        hosts/web-1.yaml:8:5: duplicate key `mode` (first at line 7): remove one
        hosts/web-1.yaml:10:11: path `etc/y` must be absolute
        inventory.yaml:4:5: duplicate key `address` (first at line 3): remove one
        tend.yaml:2:1: duplicate key `retries` (first at line 1): remove one
        ",
    );
}

#[test]
fn duplicate_host_names_at_the_second_name() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
          - name: web-1
            address: 10.0.0.2
        //- hosts/web-1.yaml
        resources: []
        "#,
        "
        inventory.yaml:4:11: duplicate host name `web-1` (first at line 2)
        ",
    );
}

#[test]
fn duplicate_address_and_port() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
          - name: web-2
            address: 10.0.0.1
            port: 22
          - name: web-3
            address: 10.0.0.1
            port: 2222
          - name: web-4
            address: Web.Example.org
          - name: web-5
            address: web.example.org
          - name: box
            transport: local
          - name: box-2
            transport: local
        //- hosts/web-1.yaml
        resources: []
        //- hosts/web-2.yaml
        resources: []
        //- hosts/web-3.yaml
        resources: []
        //- hosts/web-4.yaml
        resources: []
        //- hosts/web-5.yaml
        resources: []
        //- hosts/box.yaml
        resources: []
        //- hosts/box-2.yaml
        resources: []
        "#,
        "
        inventory.yaml:5:14: host `web-2` has the same address and port (10.0.0.1:22) as host `web-1`
        inventory.yaml:13:14: host `web-5` has the same address and port (web.example.org:22) as host `web-4`
        ",
    );
}

#[test]
fn host_file_without_inventory_entry_at_1_1() {
    check(
        r#"
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1}]
        //- hosts/web-1.yaml
        resources: []
        //- hosts/db-1.yaml
        resources:
          - kind: package
            name: postgresql
        "#,
        "
        hosts/db-1.yaml:1:1: host file for `db-1` has no entry in inventory.yaml: add it there or remove this file
        ",
    );
}

#[test]
fn inventory_host_without_host_file_at_its_item() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
          - name: db-1
            address: 10.0.0.2
        //- hosts/web-1.yaml
        resources: []
        "#,
        "
        inventory.yaml:4:5: host `db-1` has no host file: create hosts/db-1.yaml
        ",
    );
}

#[test]
fn duplicate_resource_ids_at_the_second() {
    check(
        &web1(
            r#"
            resources:
              - kind: package
                name: curl
                id: tools
              - kind: package
                name: wget
                id: tools
              - kind: file
                path: /etc/x
              - kind: file
                path: /etc/x
                content: again
            "#,
        ),
        "
        hosts/web-1.yaml:7:9: duplicate resource id `tools` (first at line 2): rename one of them
        hosts/web-1.yaml:11:11: duplicate resource id `file:/etc/x` (first at line 8): path `/etc/x` is declared twice; remove one
        ",
    );
}

#[test]
fn two_resources_managing_one_path_or_name() {
    check(
        r#"
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1, tags: [web]}]
        //- groups/web.yaml
        resources:
          - kind: user
            name: app
        //- hosts/web-1.yaml
        resources:
          - kind: file
            path: /etc/x
          - kind: directory
            path: /etc/x
          - kind: package
            name: curl
            id: curl-a
          - kind: package
            name: curl
            id: curl-b
          - kind: user
            name: app
            id: app-user
        "#,
        "
        hosts/web-1.yaml:5:11: path `/etc/x` is already managed by `file:/etc/x` on host `web-1`; one resource per path
        hosts/web-1.yaml:10:11: name `curl` is already managed by `curl-a` on host `web-1`; one resource per name
        hosts/web-1.yaml:13:11: name `app` is already managed by `user:app` on host `web-1`; one resource per name
        ",
    );
}

// ---------------------------------------------------------------------------
// requires, restart_on and cycles.

#[test]
fn unknown_ids_in_requires_and_restart_on() {
    check(
        &web1(
            r#"
            resources:
              - kind: package
                name: curl
              - kind: file
                path: /etc/x
                requires:
                  - package:curl
                  - package:wget
              - kind: service
                name: nginx
                restart_on: [file:/etc/x, file:/etc/y]
            "#,
        ),
        "
        hosts/web-1.yaml:8:9: `file:/etc/x` requires unknown id `package:wget` on host `web-1`
        hosts/web-1.yaml:11:31: service `service:nginx` restarts on unknown id `file:/etc/y` on host `web-1`
        ",
    );
}

#[test]
fn a_rejected_resource_is_not_reported_again_as_unknown() {
    // What refers to a resource that was itself rejected, or declared in a
    // file that could not be read, is not an unknown id.
    check(
        r#"
        //- inventory.yaml
        hosts:
          - {name: web-1, address: 10.0.0.1, tags: [web]}
          - {name: web-2, address: 10.0.0.2, tags: [web]}
        //- groups/web.yaml
        resources:
          - kind: package
            name: nginx
            verison: "1.2"
          - kind: service
            name: nginx
            requires: [package:nginx, file:/etc/nginx/nginx.conf]
        //- hosts/web-1.yaml
        resources:
          - kind: file
            id: conf
            path: etc/nginx/nginx.conf
          - kind: file
            path: /etc/nginx/nginx.conf
          - kind: service
            name: app
            requires: [conf, package:nginx, nope]
            restart_on: [conf]
        //- hosts/web-2.yaml
        resources: [
        "#,
        "
        groups/web.yaml:4:5: unknown field `verison`, expected one of `name`, `state`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:4:11: path `etc/nginx/nginx.conf` must be absolute
        hosts/web-1.yaml:9:37: `service:app` requires unknown id `nope` on host `web-1`
        hosts/web-2.yaml:1:12: invalid YAML: unclosed bracket '['
        ",
    );
}

#[test]
fn dependency_cycle_through_requires() {
    check(
        &web1(
            r#"
            resources:
              - kind: command
                name: a
                id: a
                run: "true"
                requires: [b]
              - kind: command
                name: b
                id: b
                run: "true"
                requires: [a]
            "#,
        ),
        "
        hosts/web-1.yaml:6:16: dependency cycle on host `web-1`: a -> b -> a
        ",
    );
}

#[test]
fn dependency_cycle_through_an_implicit_edge() {
    // A directory comes before what is inside it; requiring its child closes a loop.
    check(
        &web1(
            r#"
            resources:
              - kind: directory
                path: /srv
                requires: [file:/srv/x]
              - kind: file
                path: /srv/x
            "#,
        ),
        "
        hosts/web-1.yaml:4:16: dependency cycle on host `web-1`: directory:/srv -> file:/srv/x -> directory:/srv
        ",
    );
}

#[test]
fn a_resource_that_requires_itself() {
    check(
        &web1(
            r#"
            resources:
              - kind: package
                name: curl
                requires: [package:curl]
            "#,
        ),
        "
        hosts/web-1.yaml:4:16: dependency cycle on host `web-1`: package:curl -> package:curl
        ",
    );
}

// ---------------------------------------------------------------------------
// Sources under files/.

#[test]
fn bad_sources() {
    check(
        &format!(
            "{}{}",
            "//- files/app.conf\nx\n//- files/leak @refused a symlink that leaves files/\n//- files/huge @too-large 70000000\n",
            web1(
                r#"
                resources:
                  - kind: file
                    path: /a
                    source: missing.conf
                  - kind: file
                    path: /b
                    source: ../etc/passwd
                  - kind: file
                    path: /c
                    source: /etc/passwd
                  - kind: file
                    path: /d
                    source: leak
                  - kind: file
                    path: /e
                    source: huge
                  - kind: file
                    path: /f
                    content: x
                    source: app.conf
                "#
            )
        ),
        "
        hosts/web-1.yaml:4:13: source `missing.conf` does not exist: expected files/missing.conf
        hosts/web-1.yaml:7:13: source `../etc/passwd` must be a relative path inside files/ without `..`
        hosts/web-1.yaml:10:13: source `/etc/passwd` must be a relative path inside files/ without `..`
        hosts/web-1.yaml:13:13: source files/leak: a symlink that leaves files/
        hosts/web-1.yaml:16:13: source files/huge is too large (70000000 bytes; the limit is 67108864)
        hosts/web-1.yaml:20:13: give either `content` or `source`, not both
        ",
    );
}

// ---------------------------------------------------------------------------
// tend.yaml settings.

#[test]
fn token_ttl_above_the_maximum() {
    check(
        &format!(
            "//- tend.yaml\ntoken_max_ttl: 48h\n{}",
            web1("resources: []")
        ),
        "
        tend.yaml:1:16: token_max_ttl `48h` is above the maximum of 24h: write at most `24h`
        ",
    );
}

#[test]
fn unknown_dispatch_mode() {
    check(
        &format!(
            "//- tend.yaml\ndispatch: sometimes\n{}",
            web1("resources: []")
        ),
        "
        tend.yaml:1:11: unknown variant `sometimes`, expected one of `off`, `canary`, `enforced`
        ",
    );
}

#[test]
fn canary_not_in_the_inventory() {
    check(
        &format!(
            "//- tend.yaml\ndispatch: canary\ncanary: web-9\n{}",
            web1("resources: []")
        ),
        "
        tend.yaml:2:9: canary `web-9` is not a host in inventory.yaml
        ",
    );
}

// ---------------------------------------------------------------------------
// Missing fields and kinds: at the start of the item.

#[test]
fn missing_required_fields_at_the_item() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
          - address: 10.0.0.2
          - name: web-3
            port: 22
        //- hosts/web-1.yaml
        resources:
          - kind: file
            content: x
          - kind: command
            name: c
          - kind: symlink
            path: /l
          - mode: "0644"
            path: /x
        //- hosts/web-3.yaml
        resources: []
        "#,
        "
        hosts/web-1.yaml:2:5: missing field `path`
        hosts/web-1.yaml:4:5: missing field `run`
        hosts/web-1.yaml:6:5: missing field `target` (required unless `state: absent`)
        hosts/web-1.yaml:8:5: missing field `kind` (one of `file`, `directory`, `symlink`, `package`, `service`, `user`, `group`, `command`)
        inventory.yaml:4:5: missing field `name`
        inventory.yaml:5:5: missing field `address` (host `web-3` uses transport ssh)
        ",
    );
}

#[test]
fn unknown_kind_at_the_kind() {
    check(
        &web1(
            r#"
            resources:
              - kind: fille
                path: /x
              - kind: [file]
                path: /y
              - kind:
                path: /z
            "#,
        ),
        "
        hosts/web-1.yaml:2:11: unknown kind `fille`, expected one of `file`, `directory`, `symlink`, `package`, `service`, `user`, `group`, `command`
        hosts/web-1.yaml:4:11: `kind` must be one of `file`, `directory`, `symlink`, `package`, `service`, `user`, `group`, `command`, found a list
        hosts/web-1.yaml:6:5: `kind` must be one of `file`, `directory`, `symlink`, `package`, `service`, `user`, `group`, `command`, found null
        ",
    );
}

// ---------------------------------------------------------------------------
// Whole-file problems: at 1:1.

#[test]
fn empty_files_at_1_1() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - {name: web-1, address: 10.0.0.1}
          - {name: web-2, address: 10.0.0.2}
        //- hosts/web-1.yaml
        //- hosts/web-2.yaml
        # nothing here yet
        //- groups/web.yaml
        "#,
        "
        groups/web.yaml:1:1: group file is empty
        hosts/web-1.yaml:1:1: host file is empty: write `resources: []` for a host with nothing to manage
        hosts/web-2.yaml:1:1: host file is empty: write `resources: []` for a host with nothing to manage
        ",
    );
    check(
        "//- inventory.yaml\n",
        "inventory.yaml:1:1: inventory.yaml is empty: list the hosts under `hosts:`",
    );
    check(
        "",
        "inventory.yaml:1:1: inventory.yaml is missing: list the hosts under `hosts:`",
    );
}

#[test]
fn non_utf8_files_at_1_1() {
    check(
        r#"
        //- tend.yaml @hex ff
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1}]
        //- hosts/web-1.yaml @hex 72 65 73 6f 75 72 63 65 73 3a 20 5b 5d 0a c3 28
        "#,
        "
        hosts/web-1.yaml:1:1: file is not valid UTF-8 (first bad byte at offset 14)
        tend.yaml:1:1: file is not valid UTF-8 (first bad byte at offset 0)
        ",
    );
}

#[test]
fn files_over_8_mib_at_1_1() {
    check(
        r#"
        //- tend.yaml @filled 8388609
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1}]
        //- hosts/web-1.yaml @too-large 9000000
        "#,
        "
        hosts/web-1.yaml:1:1: file is too large (9000000 bytes; the limit is 8388608)
        tend.yaml:1:1: file is too large (8388609 bytes; the limit is 8388608)
        ",
    );
}

#[test]
fn a_file_of_exactly_8_mib_is_read() {
    // 8 MiB of `#` is one long comment: read, and so an empty host file.
    check(
        &format!("//- inventory.yaml\n{INV}\n//- hosts/web-1.yaml @filled 8388608\n"),
        "hosts/web-1.yaml:1:1: host file is empty: write `resources: []` for a host with nothing to manage",
    );
}

// ---------------------------------------------------------------------------
// YAML syntax.

#[test]
fn yaml_syntax_errors_are_located() {
    check(
        r#"
        //- tend.yaml
        retries: [1, 2
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1}]
        //- hosts/web-1.yaml
        resources:
          - kind: file
            path: "/etc/x
        "#,
        "
        hosts/web-1.yaml:3:11: invalid YAML: unclosed quote
        tend.yaml:1:10: invalid YAML: unclosed bracket '['
        ",
    );
}

// ---------------------------------------------------------------------------
// Everything at once.

#[test]
fn every_problem_in_every_file_is_reported() {
    check(
        r#"
        //- tend.yaml
        dispatch: sometimes
        token_max_ttl: 48h
        //- inventory.yaml
        hosts:
          - name: web-1
            address: 10.0.0.1
            tags: [web]
          - name: web-2
            address: 10.0.0.1
          - name: db-1
            address: 10.0.0.3
        //- groups/web.yaml
        resources:
          - kind: package
            name: nginx
            verison: "1.2"
            name: nginx-full
        //- hosts/web-1.yaml
        resources:
          - kind: file
            path: etc/app.conf
            mode: rwx
          - kind: directory
            path: /srv
            ownr: root
            grp: root
          - kind: service
            name: nginx
            requires: [package:nginx, package:missing]
        //- hosts/web-2.yaml
        resources: []
        //- hosts/cache-1.yaml
        resources: []
        "#,
        "
        groups/web.yaml:4:5: unknown field `verison`, expected one of `name`, `state`, `id`, `requires`, `sensitive`, `drift`
        groups/web.yaml:5:5: duplicate key `name` (first at line 3): remove one
        hosts/cache-1.yaml:1:1: host file for `cache-1` has no entry in inventory.yaml: add it there or remove this file
        hosts/web-1.yaml:3:11: path `etc/app.conf` must be absolute
        hosts/web-1.yaml:4:11: invalid mode `rwx`: write 3 or 4 octal digits, such as `0644` or `0755`
        hosts/web-1.yaml:7:5: unknown field `ownr`, expected one of `path`, `mode`, `owner`, `group`, `state`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:8:5: unknown field `grp`, expected one of `path`, `mode`, `owner`, `group`, `state`, `id`, `requires`, `sensitive`, `drift`
        hosts/web-1.yaml:11:31: `service:nginx` requires unknown id `package:missing` on host `web-1`
        inventory.yaml:6:14: host `web-2` has the same address and port (10.0.0.1:22) as host `web-1`
        inventory.yaml:7:5: host `db-1` has no host file: create hosts/db-1.yaml
        tend.yaml:1:11: unknown variant `sometimes`, expected one of `off`, `canary`, `enforced`
        tend.yaml:2:16: token_max_ttl `48h` is above the maximum of 24h: write at most `24h`
        ",
    );
}

// ---------------------------------------------------------------------------
// Fuzz: whatever a host file holds, validate returns.

/// YAML-ish text: fragments that exercise indentation, flow collections,
/// anchors, tags, block scalars and document markers.
fn yamlish() -> impl Strategy<Value = String> {
    const TOKENS: &[&str] = &[
        "resources:",
        "lifecycle:",
        "kind: ",
        "file",
        "directory",
        "service",
        "path: ",
        "/etc/x",
        "name: ",
        "requires: ",
        "id: ",
        "mode: ",
        "0644",
        "content: ",
        "source: ",
        "- ",
        "  ",
        "    ",
        "\n",
        "\t",
        "[",
        "]",
        "{",
        "}",
        ", ",
        ": ",
        ":",
        "'",
        "\"",
        "#",
        "&a ",
        "*a",
        "*b",
        "!!str ",
        "!!map ",
        "!x ",
        "? ",
        "|",
        ">-",
        "---\n",
        "...\n",
        "%YAML 1.2\n",
        "~",
        "null",
        "true",
        "off",
        "-1",
        "0x10",
        "\u{feff}",
        "é",
        "\\",
        "%",
        "@",
        "`",
    ];
    proptest::collection::vec(proptest::sample::select(TOKENS), 0..64).prop_map(|t| t.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_as_a_host_file_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut t = tree(&web1("resources: []"));
        t.hosts.insert("web-1.yaml".into(), Blob::Bytes(bytes));
        let v = validate(&t);
        for p in &v.problems {
            prop_assert!(p.pos.line >= 1 && p.pos.col >= 1, "{p}");
        }
    }

    #[test]
    fn yamlish_text_never_panics(text in yamlish()) {
        let mut t = tree(&web1("resources: []"));
        t.hosts.insert("web-1.yaml".into(), Blob::Bytes(text.clone().into_bytes()));
        t.groups.insert("web.yaml".into(), Blob::Bytes(text.clone().into_bytes()));
        t.tend = Some(Blob::Bytes(text.clone().into_bytes()));
        let v = validate(&t);
        for p in &v.problems {
            prop_assert!(p.pos.line >= 1 && p.pos.col >= 1, "{p}");
        }
        let mut t = tree(&web1("resources: []"));
        t.inventory = Some(Blob::Bytes(text.into_bytes()));
        let _ = validate(&t);
    }
}

#[test]
fn reserved_host_name_and_paths_under_files() {
    check(
        "
        //- inventory.yaml
        hosts:
          - name: fleet
            transport: local
        //- hosts/fleet.yaml
        resources:
          - kind: file
            path: /a
          - kind: file
            path: /a/b
          - kind: symlink
            path: /l
            target: /x
          - kind: directory
            path: /l/d
        ",
        "
        hosts/fleet.yaml:5:11: `file:/a/b` is under `/a`, which `file:/a` manages as a file, not a directory
        hosts/fleet.yaml:10:11: `directory:/l/d` is under `/l`, which `symlink:/l` manages as a symlink, not a directory
        inventory.yaml:2:11: host name `fleet` is reserved (status/fleet.json is the fleet summary): choose another name
        ",
    );
}

#[test]
fn a_template_unit_needs_an_instance() {
    check(
        &web1(
            r"
            resources:
              - kind: service
                name: getty@
              - kind: service
                name: getty@.service
              - kind: service
                name: getty@tty1
              - kind: service
                name: app.socket
            ",
        ),
        "
        hosts/web-1.yaml:3:11: `getty@` is a template unit: name an instance of it, such as `getty@main.service`
        hosts/web-1.yaml:5:11: `getty@.service` is a template unit: name an instance of it, such as `getty@main.service`
        ",
    );
}

#[test]
fn unit_names_and_unit_files() {
    assert_eq!(unit_name("nginx"), "nginx.service");
    assert_eq!(unit_name("nginx.service"), "nginx.service");
    assert_eq!(unit_name("app.socket"), "app.socket");
    assert_eq!(unit_name("foo.bar"), "foo.bar.service");
    assert_eq!(unit_name("getty@tty1"), "getty@tty1.service");
    for (path, want) in [
        (
            "/etc/systemd/system/app.service",
            Some(("app.service", true)),
        ),
        ("/lib/systemd/system/app.socket", Some(("app.socket", true))),
        (
            "/usr/lib/systemd/system/a@.service",
            Some(("a@.service", true)),
        ),
        (
            "/etc/systemd/system/app.service.d/10-x.conf",
            Some(("app.service", false)),
        ),
        (
            "/run/systemd/system/app.service.d/x.conf",
            Some(("app.service", false)),
        ),
        ("/etc/systemd/system/app.service.d/x.txt", None),
        ("/etc/systemd/system/app.service.d/a/x.conf", None),
        (
            "/etc/systemd/system/multi-user.target.wants/app.service",
            None,
        ),
        ("/etc/systemd/systemx/app.service", None),
        ("/etc/app.service", None),
    ] {
        assert_eq!(unit_of_file(path), want, "{path}");
    }
}

#[test]
fn ancestors_are_the_proper_parent_directories_nearest_first() {
    assert_eq!(ancestors("/a/b/c").collect::<Vec<_>>(), ["/a/b", "/a"]);
    assert_eq!(ancestors("/a").count(), 0);
    for (anc, p) in [
        ("/a", "/a/b"),
        ("/a/b", "/a/b/c"),
        ("/a", "/ab"),
        ("/a/b", "/a"),
    ] {
        assert_eq!(
            ancestors(p).any(|x| x == anc),
            is_ancestor(anc, p),
            "{anc} {p}"
        );
    }
}

/// A host with 30k resources: with all-pairs checks on paths (every file
/// against every path, every directory against every path) this took
/// minutes in a debug build; with the path index it takes seconds. No
/// timing is asserted: the test states that such a host validates, that its
/// edges are the ones expected, and that path problems are still found.
#[test]
fn a_30k_resource_host_validates_with_its_path_checks() {
    use std::fmt::Write as _;
    let n = 30_000;
    let mut host = String::from("resources:\n");
    for d in 0..n / 100 {
        let _ = writeln!(host, "  - kind: directory\n    path: /srv/d{d}");
        for f in 1..100 {
            let _ = writeln!(
                host,
                "  - kind: file\n    path: /srv/d{d}/f{f}\n    content: x"
            );
        }
    }
    // One file under a file, one under an absent directory.
    host.push_str("  - kind: file\n    path: /srv/d1/f1/under\n    content: x\n");
    host.push_str("  - kind: directory\n    path: /gone\n    state: absent\n");
    host.push_str("  - kind: file\n    path: /gone/f\n    content: x\n");
    let tree = SourceTree {
        inventory: Some(Blob::Bytes(
            b"hosts:\n  - name: big\n    transport: local\n".to_vec(),
        )),
        hosts: BTreeMap::from([("big.yaml".into(), Blob::Bytes(host.into_bytes()))]),
        ..SourceTree::default()
    };
    let v = validate(&tree);
    let messages: Vec<String> = v.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            format!(
                "hosts/big.yaml:{}:11: `file:/srv/d1/f1/under` is under `/srv/d1/f1`, which `file:/srv/d1/f1` manages as a file, not a directory",
                3 * n / 100 * 99 + 2 * (n / 100) + 2 + 1
            ),
            format!(
                "hosts/big.yaml:{}:5: `file:/gone/f` is inside directory `/gone`, which is declared absent",
                3 * n / 100 * 99 + 2 * (n / 100) + 2 + 3 + 3
            ),
        ]
    );
    let host = &v.state.hosts["big"];
    assert_eq!(host.resources.len(), n + 3);
    let edges = dependency_edges(&host.resources);
    let parents = edges
        .iter()
        .filter(|e| e.2 == EdgeReason::ParentDirectory)
        .count();
    // Each file's own directory; the file under a file and the file under
    // the absent directory have theirs too.
    assert_eq!(parents, n / 100 * 99 + 2);
}

/// One resource as a flow mapping, from a small vocabulary so that paths
/// nest and collide, ids are required in cycles, and durations and numbers
/// take odd values.
fn resource_line() -> impl Strategy<Value = String> {
    const PATHS: &[&str] = &[
        "/a", "/a/b", "/a/b/c", "/d", "/d/e", "/a/./b", "/x/../y", "a",
    ];
    const NAMES: &[&str] = &["app", "root", "0", "x-y", "nginx", "a@.service", ""];
    const NUMS: &[&str] = &[
        "0",
        "1",
        "-1",
        "65536",
        "4294967296",
        "99999999999999999999",
        "0x10",
    ];
    const DURS: &[&str] = &["0s", "1ms", "1s", "366d", "1000000000000y", "x", "1h 30m"];
    let path = proptest::sample::select(PATHS);
    let name = proptest::sample::select(NAMES);
    let id = proptest::sample::select(
        &["file:/a", "directory:/a", "service:app", "user:app", "nope"][..],
    );
    (0..8usize, path, name, id, proptest::sample::select(NUMS), proptest::sample::select(DURS), any::<bool>())
        .prop_map(|(kind, path, name, id, num, dur, absent)| {
            let state = if absent { ", state: absent" } else { "" };
            match kind {
                0 => format!("{{kind: file, path: \"{path}\", content: x, mode: \"{num}\", owner: \"{name}\"{state}, requires: [\"{id}\"]}}"),
                1 => format!("{{kind: directory, path: \"{path}\", group: \"{num}\"{state}, requires: [\"{id}\"]}}"),
                2 => format!("{{kind: symlink, path: \"{path}\", target: \"{path}\"{state}}}"),
                3 => format!("{{kind: package, name: \"{name}\"{state}}}"),
                4 => format!("{{kind: service, name: \"{name}\", restart_on: [\"{id}\"], requires: [\"{id}\"]}}"),
                5 => format!("{{kind: user, name: \"{name}\", uid: {num}, groups: [\"{name}\"]{state}}}"),
                6 => format!("{{kind: group, name: \"{name}\", gid: {num}{state}}}"),
                _ => format!("{{kind: command, name: \"{name}\", run: x, creates: \"{path}\", timeout: \"{dur}\", destructive: {absent}}}"),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever validation accepts, or rejects but still returns as its
    /// best-effort state, diffs and plans without a panic, against a host
    /// where nothing exists.
    #[test]
    fn structured_resources_validate_diff_and_plan_without_panic(
        lines in proptest::collection::vec(resource_line(), 0..24),
        dur in proptest::sample::select(&["0s", "1s", "366d", "1000000000000y", "5m"][..]),
    ) {
        let body: String = lines.iter().map(|l| format!("  - {l}\n")).collect();
        let mut t = tree(&web1("resources: []"));
        t.hosts.insert("web-1.yaml".into(), Blob::Bytes(format!("resources:\n{body}").into_bytes()));
        t.tend = Some(Blob::Bytes(
            format!("resync: {dur}\nprobe_timeout: {dur}\nquiet_window: {dur}\nretry_backoff: {dur}\n").into_bytes(),
        ));
        let v = validate(&t);
        // The settings that leave validation are usable, valid or not.
        let c = &v.state.config;
        prop_assert!(!c.resync.0.is_zero() && c.resync.0 <= DURATION_CEILING);
        prop_assert!(!c.probe_timeout.0.is_zero() && c.quiet_window.0 <= DURATION_CEILING);
        for host in v.state.hosts.values() {
            let mut actual = crate::core::actual::HostActual::default();
            for r in &host.resources {
                actual.resources.insert(r.id.clone(), crate::core::actual::Observed::Absent);
            }
            let changes = crate::core::diff::diff_host(host, &actual);
            let plan = crate::core::plan::plan_host(host, &changes);
            prop_assert!(plan.barrier <= plan.steps.len());
        }
    }
}

#[test]
fn addresses_users_and_identities_that_no_connection_could_use() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: a
            address: "[::1]:22"
          - name: b
            address: "root@10.0.0.1"
          - name: c
            address: fe80::1%eth0
            user: "ro ot"
            identity: "keys/id\u0000"
          - name: d
            address: "10.0.0.1\n"
        //- hosts/a.yaml
        resources: []
        //- hosts/b.yaml
        resources: []
        //- hosts/c.yaml
        resources: []
        //- hosts/d.yaml
        resources: []
        "#,
        r#"
        inventory.yaml:3:14: invalid address "[::1]:22": write an IP address or a DNS name (the port goes in `port`)
        inventory.yaml:5:14: invalid address "root@10.0.0.1": write an IP address or a DNS name (the port goes in `port`)
        inventory.yaml:8:11: user "ro ot" contains a space or a control character
        inventory.yaml:9:15: identity "keys/id\0" contains a control character
        inventory.yaml:11:14: invalid address "10.0.0.1\n": write an IP address or a DNS name (the port goes in `port`)
        "#,
    );
}

#[test]
fn rollout_settings_are_checked_where_they_are_written() {
    check(
        r#"
        //- tend.yaml
        rollout:
          waves: [1, 25%, 150%]
          max_failures: lots
          pause: soon
          health:
            command: ""
            timeout: 0s
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1}]
        //- hosts/web-1.yaml
        resources: []
        "#,
        "
        tend.yaml:2:19: `150%`: a percentage is at most 100%
        ",
    );
    check(
        r#"
        //- tend.yaml
        rollout:
          waves: []
          health:
            command: ""
            timeout: 0s
        //- inventory.yaml
        hosts: [{name: web-1, address: 10.0.0.1}]
        //- hosts/web-1.yaml
        resources: []
        "#,
        "
        tend.yaml:2:10: rollout.waves must list at least one wave, e.g. `[1, 25%, 100%]`
        tend.yaml:4:14: rollout.health.command must not be empty
        tend.yaml:5:14: rollout.health.timeout must be above zero
        ",
    );
}

#[test]
fn jump_and_become_are_checked_with_their_positions() {
    check(
        r#"
        //- inventory.yaml
        hosts:
          - name: bastion
            address: 10.0.0.1
          - name: web-1
            address: 10.0.1.1
            user: deploy
            become: sudo
            jump: bastion
          - name: web-2
            address: 10.0.1.2
            jump: nowhere
          - name: web-3
            address: 10.0.1.3
            jump: web-3
          - name: web-4
            address: 10.0.1.4
            jump: web-1
          - name: a
            address: 10.0.2.1
            jump: b
          - name: b
            address: 10.0.2.2
            jump: a
          - name: web-5
            address: 10.0.1.5
            jump: "ops@jump.example.org:2222"
          - name: web-6
            address: 10.0.1.6
            jump: "ops@:22"
          - name: box
            transport: local
            become: sudo
          - name: web-7
            address: 10.0.1.7
            become: doas
        //- hosts/bastion.yaml
        resources: []
        //- hosts/web-1.yaml
        resources: []
        //- hosts/web-2.yaml
        resources: []
        //- hosts/web-3.yaml
        resources: []
        //- hosts/web-4.yaml
        resources: []
        //- hosts/a.yaml
        resources: []
        //- hosts/b.yaml
        resources: []
        //- hosts/web-5.yaml
        resources: []
        //- hosts/web-6.yaml
        resources: []
        //- hosts/box.yaml
        resources: []
        //- hosts/web-7.yaml
        resources: []
        "#,
        "
        inventory.yaml:11:11: jump `nowhere` is not a host in inventory.yaml (write `[user@]address[:port]` for a host outside it)
        inventory.yaml:14:11: host `web-3` cannot be reached through itself
        inventory.yaml:17:11: chains of jumps are not supported: jump host `web-1` is itself reached through `bastion`; reach `web-4` through `bastion` directly
        inventory.yaml:20:11: jump cycle: `a` is reached through `b`, and `b` through `a`
        inventory.yaml:23:11: jump cycle: `b` is reached through `a`, and `a` through `b`
        inventory.yaml:29:11: invalid jump \"ops@:22\": name a host of inventory.yaml, or write `[user@]address[:port]`
        inventory.yaml:32:13: `become` applies to hosts reached over SSH; host `box` uses transport local
        inventory.yaml:35:13: unknown variant `doas`, expected `sudo`
        ",
    );
}

#[test]
fn a_jump_resolves_to_its_host_or_its_address() {
    let v = check(
        r#"
        //- inventory.yaml
        hosts:
          - name: bastion
            address: 10.0.0.1
            port: 2200
            user: ops
            host_key: "SHA256:abc"
          - name: web-1
            address: 10.0.1.1
            user: deploy
            identity: keys/deploy
            jump: bastion
          - name: web-2
            address: 10.0.1.2
            user: deploy
            identity: keys/deploy
            jump: "[fd00::1]:2222"
        //- hosts/bastion.yaml
        resources: []
        //- hosts/web-1.yaml
        resources: []
        //- hosts/web-2.yaml
        resources: []
        "#,
        "",
    );
    let j1 = v.state.hosts["web-1"].jump.as_deref().unwrap();
    assert_eq!(
        (
            j1.name.as_str(),
            j1.port,
            j1.user.as_str(),
            j1.host_key.as_deref()
        ),
        ("bastion", 2200, "ops", Some("SHA256:abc"))
    );
    let j2 = v.state.hosts["web-2"].jump.as_deref().unwrap();
    assert_eq!(
        (
            j2.address.as_deref(),
            j2.port,
            j2.user.as_str(),
            j2.identity.as_deref(),
            j2.host_key.as_deref()
        ),
        (Some("fd00::1"), 2222, "deploy", Some("keys/deploy"), None)
    );
    assert!(v.state.hosts["bastion"].jump.is_none());
}

#[test]
fn parse_jump_takes_user_address_and_port() {
    assert_eq!(
        parse_jump("ops@10.0.0.1:2222"),
        Some((Some("ops".into()), "10.0.0.1".into(), 2222))
    );
    assert_eq!(
        parse_jump("jump.example.org"),
        Some((None, "jump.example.org".into(), 22))
    );
    assert_eq!(parse_jump("[fd00::1]"), Some((None, "fd00::1".into(), 22)));
    assert_eq!(parse_jump("fd00::1"), Some((None, "fd00::1".into(), 22)));
    for bad in [
        "",
        "@host",
        "ops@",
        "host:0",
        "host:99999",
        "[fd00::1",
        "a b",
        "ops@host:x",
    ] {
        assert_eq!(parse_jump(bad), None, "{bad:?}");
    }
}
