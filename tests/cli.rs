//! The real `tend` binary, run as a user would, on fixtures in temp dirs
//! (SPEC.md sections 2, 3, 5, 6 and 7). One test binary, like ripgrep's
//! `tests/tests.rs`; helpers in `common/`.
//!
//! Every fixture's `transport: local` hosts manage paths inside the test's
//! own temp dir, so the tests run in parallel. Human output is compared with
//! insta snapshots, with filters for the temp dir, run ids, timestamps and
//! hashes.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use common::{
    Fixture, Run, assert_keys, assert_rfc3339, is_run_id, list_tree, mode_of, read_json, repo,
    run_command, tend_command,
};
use serde_json::{Value, json};

/// Snapshot `$value` with the fixture's filters.
macro_rules! snapshot {
    ($fx:expr, $name:expr, $value:expr) => {{
        let filters = $fx.filters();
        let filters: Vec<(&str, &str)> = filters
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        insta::with_settings!({filters => filters, prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!($name, $value);
        });
    }};
}

/// A run rendered for a snapshot: exit code, stdout and stderr.
fn transcript(r: &Run) -> String {
    format!(
        "exit code: {}\n----- stdout -----\n{}----- stderr -----\n{}",
        r.code, r.stdout, r.stderr
    )
}

fn host_outcome<'a>(result: &'a Value, host: &str) -> &'a Value {
    let all = result["host_outcomes"].as_array().expect("host_outcomes");
    let mine: Vec<_> = all.iter().filter(|o| o["host"] == host).collect();
    assert_eq!(mine.len(), 1, "one outcome for `{host}` in {result:#}");
    mine[0]
}

/// The result document that `apply --json` printed.
fn apply_json(fx: &Fixture, args: &[&str], code: i32) -> Value {
    let mut all = vec!["apply", "--json"];
    all.extend_from_slice(args);
    let r = fx.run(&all);
    r.code(code);
    let result = r.json();
    let id = result["run_id"].as_str().unwrap();
    assert_eq!(fx.result(id), result, "stdout is the run's result.json");
    result
}

// ---------------------------------------------------------------------------
// 1. validate
// ---------------------------------------------------------------------------

#[test]
fn validate_shipped_example() {
    let dir = repo().join("desired-state");
    let mut cmd = tend_command();
    cmd.arg("validate").arg("--dir").arg(&dir);
    let r = run_command(cmd);
    r.code(0);
    assert!(r.stdout.contains(": valid ("), "{r}");

    let mut cmd = tend_command();
    cmd.args(["validate", "--json", "--dir"]).arg(&dir);
    let r = run_command(cmd);
    r.code(0);
    assert_eq!(r.json(), json!({"valid": true, "problems": []}));
}

/// A valid desired state for the validation cases: hosts `a` and `b`, each
/// case replaces one file.
fn valid_base() -> Fixture {
    let fx = Fixture::two_hosts();
    fx.write("tend.yaml", "dispatch: off\n");
    fx.write("hosts/b.yaml", "resources: []\n");
    fx
}

type Edit = fn(&Fixture);

/// One row per kind of problem: the edit of the valid base, the expected
/// `file:line:col: ` prefix (file relative to `--dir`), and a piece of the
/// message. Each edit makes exactly one problem.
const VALIDATION_CASES: &[(&str, Edit, &str, &str)] = &[
    (
        "unknown key",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: {root}/f\n    colour: red\n",
            )
        },
        "hosts/a.yaml:4:5: ",
        "unknown field `colour`",
    ),
    (
        "unknown key in the inventory",
        |fx| {
            fx.write(
                "inventory.yaml",
                "hosts:\n  - name: a\n    transport: local\n    colour: red\n  - name: b\n    transport: local\n",
            )
        },
        "inventory.yaml:4:5: ",
        "unknown field `colour`",
    ),
    (
        "wrong type",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: [1, 2]\n",
            )
        },
        "hosts/a.yaml:3:11: ",
        "expected a string",
    ),
    (
        "bad mode",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: {root}/f\n    mode: \"0999\"\n",
            )
        },
        "hosts/a.yaml:4:11: ",
        "invalid mode `0999`",
    ),
    (
        "relative path",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: relative/f\n",
            )
        },
        "hosts/a.yaml:3:11: ",
        "must be absolute",
    ),
    (
        "`..` in a path",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: {root}/../etc/f\n",
            )
        },
        "hosts/a.yaml:3:11: ",
        "must not contain `..`",
    ),
    (
        "duplicate host names",
        |fx| {
            fx.write(
                "inventory.yaml",
                "hosts:\n  - name: a\n    transport: local\n  - name: b\n    transport: local\n  - name: a\n    transport: local\n",
            )
        },
        "inventory.yaml:6:11: ",
        "duplicate host name `a`",
    ),
    (
        "duplicate address and port",
        |fx| {
            fx.write(
                "inventory.yaml",
                "hosts:\n  - name: a\n    transport: local\n  - name: b\n    transport: local\n  - name: c\n    address: 127.0.0.1\n    port: 2222\n  - name: d\n    address: 127.0.0.1\n    port: 2222\n",
            );
            fx.write("hosts/c.yaml", "resources: []\n");
            fx.write("hosts/d.yaml", "resources: []\n");
        },
        "inventory.yaml:10:14: ",
        "same address and port (127.0.0.1:2222) as host `c`",
    ),
    (
        "host file without inventory entry",
        |fx| fx.write("hosts/z.yaml", "resources: []\n"),
        "hosts/z.yaml:1:1: ",
        "no entry in inventory.yaml",
    ),
    (
        "inventory host without host file",
        |fx| fs::remove_file(fx.dir().join("hosts/b.yaml")).unwrap(),
        "inventory.yaml:4:5: ",
        "host `b` has no host file: create hosts/b.yaml",
    ),
    (
        "duplicate ids",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    id: same\n    path: {root}/f\n  - kind: file\n    id: same\n    path: {root}/g\n",
            )
        },
        "hosts/a.yaml:6:9: ",
        "duplicate resource id `same`",
    ),
    (
        "two resources on one path",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    id: one\n    path: {root}/f\n  - kind: file\n    id: two\n    path: {root}/f\n",
            )
        },
        "hosts/a.yaml:7:11: ",
        "is already managed by `one`",
    ),
    (
        "unknown id in requires",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: {root}/f\n    requires: [nope]\n",
            )
        },
        "hosts/a.yaml:4:16: ",
        "requires unknown id `nope`",
    ),
    (
        "dependency cycle",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    id: one\n    path: {root}/p\n    requires: [two]\n  - kind: file\n    id: two\n    path: {root}/q\n    requires: [one]\n",
            )
        },
        "hosts/a.yaml:5:16: ",
        "dependency cycle on host `a`: one -> two -> one",
    ),
    (
        "missing field",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    mode: \"0644\"\n",
            )
        },
        "hosts/a.yaml:2:5: ",
        "missing field `path`",
    ),
    (
        "duplicate key",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: {root}/f\n    path: {root}/g\n",
            )
        },
        "hosts/a.yaml:4:5: ",
        "duplicate",
    ),
    (
        "missing source",
        |fx| {
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: {root}/f\n    source: missing.conf\n",
            )
        },
        "hosts/a.yaml:4:13: ",
        "source `missing.conf` does not exist",
    ),
    (
        "source leaving files/",
        |fx| {
            fs::create_dir_all(fx.dir().join("files")).unwrap();
            // /etc/hostname as asked; a file of the temp dir where a
            // container has none.
            let outside = if Path::new("/etc/hostname").is_file() {
                "/etc/hostname".into()
            } else {
                let p = fx.tmp().join("outside");
                fs::write(&p, "secret\n").unwrap();
                p
            };
            symlink(outside, fx.dir().join("files/evil")).unwrap();
            fx.write(
                "hosts/a.yaml",
                "resources:\n  - kind: file\n    path: {root}/f\n    source: evil\n",
            )
        },
        "hosts/a.yaml:4:13: ",
        "outside files/",
    ),
    (
        "token_max_ttl above 24h",
        |fx| fx.write("tend.yaml", "token_max_ttl: 48h\n"),
        "tend.yaml:1:16: ",
        "token_max_ttl `48h` is above the maximum of 24h",
    ),
    (
        "unknown dispatch mode",
        |fx| fx.write("tend.yaml", "dispatch: sometimes\n"),
        "tend.yaml:1:11: ",
        "unknown variant `sometimes`",
    ),
    (
        "canary not in the inventory",
        |fx| fx.write("tend.yaml", "canary: zz\n"),
        "tend.yaml:1:9: ",
        "canary `zz` is not a host in inventory.yaml",
    ),
    (
        "empty host file",
        |fx| fx.write("hosts/b.yaml", ""),
        "hosts/b.yaml:1:1: ",
        "empty",
    ),
    (
        "non-UTF-8 file",
        |fx| {
            fx.write_bytes(
                "hosts/b.yaml",
                b"resources:\n  - kind: file\n    path: /caf\xe9\n",
            )
        },
        "hosts/b.yaml:1:1: ",
        "not valid UTF-8",
    ),
    (
        "file over 8 MiB",
        |fx| {
            let mut big = b"resources: []\n".to_vec();
            big.resize(8 * 1024 * 1024 + 1, b'#');
            fx.write_bytes("hosts/b.yaml", &big)
        },
        "hosts/b.yaml:1:1: ",
        "too large",
    ),
];

#[test]
fn validate_locates_each_kind_of_problem() {
    let base = valid_base();
    base.run(&["validate"]).code(0);

    let mut failures = Vec::new();
    for &(name, edit, prefix, message) in VALIDATION_CASES {
        let fx = valid_base();
        edit(&fx);
        let r = fx.run(&["validate"]);
        let want = format!("{}/{prefix}", fx.dir().display());
        let lines: Vec<&str> = r.stdout.lines().collect();
        let ok = r.code == 1
            && lines.len() == 1
            && lines[0].starts_with(&want)
            && lines[0].contains(message)
            && r.stderr.contains("1 problem(s)");
        if !ok {
            failures.push(format!(
                "case `{name}`: want one line `{want}…{message}…` and exit 1, got\n{r}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn validate_reports_every_problem_at_once() {
    let fx = valid_base();
    fx.write("tend.yaml", "dispatch: sometimes\nretries: many\n");
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n  - name: b\n    transport: local\n  - name: c\n    transport: local\n",
    );
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/f\n    mode: \"0999\"\n  - kind: directory\n    path: etc\n  - kind: file\n    path: {root}/g\n    requires: [nope]\n",
    );
    fx.write(
        "hosts/b.yaml",
        "resources:\n  - kind: file\n    id: one\n    path: {root}/p\n    requires: [two]\n  - kind: file\n    id: two\n    path: {root}/q\n    requires: [one]\n",
    );
    fx.write("hosts/z.yaml", "resources: []\n");
    let r = fx.run(&["validate"]);
    r.code(1);
    snapshot!(fx, "validate_several_problems", transcript(&r));
    let human = r.stdout.lines().count();

    // The same problems as a document.
    let r = fx.run(&["validate", "--json"]);
    r.code(1);
    let doc = r.json();
    assert_eq!(doc["valid"], false);
    let problems = doc["problems"].as_array().unwrap();
    assert_eq!(problems.len(), human, "{doc:#}");
    for p in problems {
        assert_keys(
            p,
            &json!({"file": null, "line": null, "column": null, "message": null}),
            "problem",
        );
        assert!(
            p["file"]
                .as_str()
                .unwrap()
                .starts_with(fx.dir().to_str().unwrap())
        );
    }
}

// ---------------------------------------------------------------------------
// 2. schema
// ---------------------------------------------------------------------------

#[test]
fn schema_is_the_committed_file() {
    let r = run_command({
        let mut c = tend_command();
        c.arg("schema");
        c
    });
    r.code(0);
    let printed = r.json();
    let path = repo().join("schema/tend.schema.json");
    let committed = fs::read_to_string(&path).expect("schema/tend.schema.json is committed");
    assert_eq!(
        r.stdout, committed,
        "schema/tend.schema.json is stale: run `tend schema > schema/tend.schema.json`"
    );
    assert_eq!(
        printed["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    jsonschema::meta::validate(&printed).expect("the schema is a valid JSON Schema");
}

/// A YAML file as JSON, through tend's own YAML reader.
fn yaml_to_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap();
    let node = tend::core::yaml::parse(&text)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
        .expect("not empty");
    tend::core::yaml::from_node::<Value>(&node)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
}

/// The schema of one file kind: the committed schema with its root replaced
/// by a reference to that kind's `$defs` entry.
fn validator_for(def: &str) -> jsonschema::Validator {
    let mut schema = read_json(&repo().join("schema/tend.schema.json"));
    let obj = schema.as_object_mut().unwrap();
    obj.remove("anyOf");
    obj.insert("$ref".into(), json!(format!("#/$defs/{def}")));
    jsonschema::validator_for(&schema).expect("schema compiles")
}

#[test]
fn shipped_example_matches_the_schema() {
    let root = read_json(&repo().join("schema/tend.schema.json"));
    let any = jsonschema::validator_for(&root).expect("schema compiles");
    let dir = repo().join("desired-state");
    let mut files = vec![
        (dir.join("tend.yaml"), "TendConfig"),
        (dir.join("inventory.yaml"), "InventorySpec"),
    ];
    for sub in ["hosts", "groups"] {
        if let Ok(entries) = fs::read_dir(dir.join(sub)) {
            for e in entries {
                files.push((e.unwrap().path(), "HostSpec"));
            }
        }
    }
    assert!(files.len() >= 3);
    for (path, def) in files {
        let doc = yaml_to_json(&path);
        let v = validator_for(def);
        let errors: Vec<String> = v.iter_errors(&doc).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{} vs {def}: {errors:#?}",
            path.display()
        );
        assert!(any.is_valid(&doc), "{} vs the root schema", path.display());
        // Each example file starts with the modeline that points at the schema.
        let text = fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap();
        let target = first
            .strip_prefix("# yaml-language-server: $schema=")
            .unwrap_or_else(|| panic!("{}: no schema modeline", path.display()));
        let resolved = path.parent().unwrap().join(target);
        assert!(
            fs::canonicalize(&resolved).ok()
                == fs::canonicalize(repo().join("schema/tend.schema.json")).ok(),
            "{}: modeline points at {}",
            path.display(),
            resolved.display()
        );
    }
}

#[test]
fn schema_refuses_what_validate_refuses() {
    // The schema is not vacuous: unknown keys and bad values fail it.
    let host = validator_for("HostSpec");
    let ok = json!({"resources": [{"kind": "file", "path": "/x", "mode": "0644"}]});
    assert!(host.is_valid(&ok));
    for bad in [
        json!({"resources": [{"kind": "file", "path": "/x", "colour": "red"}]}),
        json!({"resources": [{"kind": "file"}]}),
        json!({"resources": [{"kind": "file", "path": "/x", "mode": "0999"}]}),
        json!({"resources": [{"kind": "teapot", "path": "/x"}]}),
        json!({"lifecycle": "sometimes"}),
        json!({"bogus": 1}),
    ] {
        assert!(!host.is_valid(&bad), "accepted {bad}");
    }
    let inv = validator_for("InventorySpec");
    assert!(!inv.is_valid(&json!({"hosts": [{"name": "a", "colour": "red"}]})));
    let cfg = validator_for("TendConfig");
    assert!(cfg.is_valid(&json!({"dispatch": "off"})));
    assert!(!cfg.is_valid(&json!({"dispatch": "sometimes"})));
}

// ---------------------------------------------------------------------------
// 3. plan and probe
// ---------------------------------------------------------------------------

/// A small fixture with one of each change: a create, an update, and a
/// destructive delete behind the barrier.
fn small_fixture() -> Fixture {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n",
    );
    fx.write(
        "hosts/web.yaml",
        "resources:\n  - kind: directory\n    path: {root}/app\n    mode: \"0750\"\n  - kind: file\n    path: {root}/app/app.conf\n    content: \"port = 8080\\n\"\n  - kind: file\n    path: {root}/motd\n    content: \"hello\\n\"\n    mode: 0600\n  - kind: file\n    path: {root}/legacy.conf\n    state: absent\n",
    );
    for (name, text) in [("motd", "old\n"), ("legacy.conf", "legacy\n")] {
        let path = fx.root().join(name);
        fs::write(&path, text).unwrap();
        // The plan shows the mode: make it independent of the umask.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    }
    fx
}

#[test]
fn plan_human_output() {
    let fx = small_fixture();
    let r = fx.run(&["plan"]);
    r.code(2);
    snapshot!(fx, "plan_small_fixture", transcript(&r));
    assert!(!fx.state().exists());
}

#[test]
fn plan_json_is_deterministic() {
    let fx = small_fixture();
    let one = fx.run(&["plan", "--json"]);
    one.code(2);
    let two = fx.run(&["plan", "--json"]);
    two.code(2);
    assert_eq!(one.stdout, two.stdout, "plan --json is byte-identical");
    let plan = one.json();
    assert_eq!(plan["schema_version"], 1);
    assert_eq!(plan["hosts"][0]["host"], "web");
    assert_eq!(plan["hosts"][0]["destructive"], 1);
    assert!(!fx.state().exists());
}

#[test]
fn plan_exit_codes() {
    let fx = Fixture::two_hosts();
    fx.run(&["plan"]).code(2);
    fx.run(&["apply", "--dispatch", "enforced"]).code(0);
    let r = fx.run(&["plan"]);
    r.code(0);
    assert!(r.stdout.contains("host a: no changes"), "{r}");
    // Drift brings the changes back.
    fs::write(fx.root().join("a.txt"), "edited\n").unwrap();
    fx.run(&["plan"]).code(2);
}

#[test]
fn plan_and_probe_write_nothing() {
    let fx = small_fixture();
    fx.run(&["plan"]).code(2);
    fx.run(&["plan", "--json"]).code(2);
    let r = fx.run(&["probe"]);
    r.code(0);
    assert!(r.stdout.contains("web:"), "{r}");
    let r = fx.run(&["probe", "--json"]);
    r.code(0);
    assert_eq!(r.json()["hosts"][0]["ok"], true);
    assert!(!fx.state().exists(), "plan or probe created the state dir");
    assert!(!fx.root().join("app").exists());
    assert_eq!(fs::read_to_string(fx.root().join("motd")).unwrap(), "old\n");

    // With a state dir already there, they add no run and touch no status.
    fx.run(&["apply"]).code(2);
    let before = list_tree(&fx.state());
    let status = fs::read(fx.state().join("status/web.json")).unwrap();
    let db = fs::read(fx.state().join("tend.db")).unwrap();
    fx.run(&["plan"]).code(2);
    fx.run(&["probe"]).code(0);
    // `plan` reads the managed resources (for prune) from the WAL-mode
    // database, which may leave SQLite's empty -wal/-shm companions; no data.
    let companions = |l: Vec<String>| -> Vec<String> {
        l.into_iter()
            .filter(|p| !p.ends_with("-wal") && !p.ends_with("-shm"))
            .collect()
    };
    assert_eq!(companions(list_tree(&fx.state())), companions(before));
    assert_eq!(
        fs::read(fx.state().join("status/web.json")).unwrap(),
        status
    );
    assert_eq!(fs::read(fx.state().join("tend.db")).unwrap(), db);
    let runs = fx.run(&["runs", "--json"]);
    runs.code(0);
    assert_eq!(runs.json().as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------
// 4. end to end on the shipped example
// ---------------------------------------------------------------------------

fn result_shape() -> Value {
    json!({
        "schema_version": null,
        "run_id": null,
        "operation_intent": {
            "action": null, "trigger": null, "target_hosts": null, "requested_by": null
        },
        "desired_revision": null,
        "effective_mode": null,
        "dispatch_mode": null,
        "policy_outcome": null,
        "policy_reason": null,
        "blast_radius": null,
        "execution_outcome": null,
        "execution_started_at": null,
        "execution_completed_at": null,
        "confirmation": {
            "operation": null, "hosts": null, "token_file": null,
            "scope_match": null, "reason": null, "refusal": null
        },
        "host_outcomes": [{
            "host": null,
            "outcome": null,
            "reason": null, // extension (README)
            "dispatch_status": null,
            "attempt_count": null,
            "last_failure_class": null,
            "last_failure_message": null,
            "changes": {"create": null, "update": null, "delete": null},
            "corrective": null, "intentional": null, // SPEC 8.7
            "probe_ms": null, "apply_ms": null, // extension (README)
            "steps": [{
                "id": null, "action": null, "destructive": null, "status": null,
                "attempts": null,
                "log": null, // extension (README)
                "message": null // extension (README)
            }]
        }]
    })
}

fn pending_shape() -> Value {
    json!({"create": null, "update": null, "delete": null, "destructive": null, "restarts": null})
}

fn status_shape() -> Value {
    json!({
        "schema_version": null,
        "host": null,
        "phase": null,
        "desired_revision": null,
        "converged_revision": null,
        "last_probe_at": null,
        "last_run_id": null,
        "conditions": [{
            "type": null, "status": null, "reason": null, "message": null,
            "last_transition_time": null
        }],
        "pending": pending_shape(),
        "awaiting_confirmation": {
            "operation": null, "hosts": null, "steps": null, "token_file": null,
            "command": null
        },
        "drift": {"reported": null, "corrected_total": null, "contested": null} // SPEC 8.7
    })
}

fn fleet_shape() -> Value {
    json!({
        "schema_version": null,
        "generated_at": null,
        "hosts": [{"host": null, "phase": null, "converged": null, "pending": pending_shape(),
            "tags": null}], // tags: extension (README)
        "rollout": {"revision": null, "state": null, "wave": null, "waves": null,
                    "failed_hosts": null, "budget": null, "halted_reason": null}
    })
}

/// Every contract check of a result document.
#[track_caller]
fn check_result(result: &Value) {
    assert_keys(result, &result_shape(), "result");
    assert_eq!(result["schema_version"], 1);
    let id = result["run_id"].as_str().unwrap();
    assert!(is_run_id(id), "run id {id}");
    assert_rfc3339(&result["execution_started_at"], "execution_started_at");
    assert_rfc3339(&result["execution_completed_at"], "execution_completed_at");
    let radius = result["blast_radius"].as_array().unwrap();
    let hosts: Vec<_> = result["host_outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["host"].clone())
        .collect();
    assert_eq!(&hosts, radius, "one host outcome per host of blast_radius");
    assert_eq!(
        result["operation_intent"]["target_hosts"],
        result["blast_radius"]
    );
}

#[track_caller]
fn check_status(status: &Value, host: &str) {
    assert_keys(status, &status_shape(), &format!("status/{host}.json"));
    assert_eq!(status["schema_version"], 1);
    assert_eq!(status["host"], host);
    assert_rfc3339(&status["last_probe_at"], "last_probe_at");
    let types: Vec<&str> = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_rfc3339(&c["last_transition_time"], "last_transition_time");
            c["type"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        types,
        [
            "Reachable",
            "Converged",
            "Drifted",
            "AwaitingConfirmation",
            "Degraded",
            "ValidDesiredState"
        ]
    );
}

#[track_caller]
fn check_fleet(fx: &Fixture) -> Value {
    let fleet = read_json(&fx.state().join("status/fleet.json"));
    assert_keys(&fleet, &fleet_shape(), "status/fleet.json");
    assert_eq!(fleet["schema_version"], 1);
    assert_rfc3339(&fleet["generated_at"], "generated_at");
    fleet
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap()
}

#[test]
fn example_end_to_end() {
    let fx = Fixture::example();
    let demo = fx.root().join("demo");

    // First apply converges.
    let first = apply_json(&fx, &["--dispatch", "enforced"], 0);
    check_result(&first);
    assert_eq!(first["execution_outcome"], "Completed");
    assert_eq!(first["dispatch_mode"], "enforced");
    assert_eq!(first["effective_mode"], "quick");
    assert_eq!(first["policy_outcome"], "Approved");
    assert_eq!(first["operation_intent"]["action"], "converge");
    assert_eq!(first["operation_intent"]["trigger"], "cli");
    let o = host_outcome(&first, "demo");
    assert_eq!(o["outcome"], "Completed");
    assert_eq!(o["dispatch_status"], "dispatched");
    assert_eq!(o["changes"], json!({"create": 7, "update": 0, "delete": 0}));
    assert_eq!(o["steps"].as_array().unwrap().len(), 7);
    for s in o["steps"].as_array().unwrap() {
        assert_eq!(s["status"], "succeeded", "{s}");
        let log = fx.state().join(s["log"].as_str().unwrap());
        assert!(log.is_file(), "step log {}", log.display());
    }

    // The files, with the exact bytes and modes.
    assert_eq!(
        fs::read(demo.join("etc/app.conf")).unwrap(),
        fs::read(repo().join("desired-state/files/demo/app.conf")).unwrap()
    );
    assert_eq!(mode_of(&demo.join("etc/app.conf")), 0o640);
    assert_eq!(
        fs::read(demo.join("releases/1/VERSION")).unwrap(),
        b"1.0.0\n"
    );
    assert_eq!(mode_of(&demo.join("releases/1/VERSION")), 0o644);
    assert_eq!(mode_of(&demo), 0o755);
    assert_eq!(mode_of(&demo.join("etc")), 0o750);
    assert_eq!(mode_of(&demo.join("releases")), 0o755);
    assert_eq!(mode_of(&demo.join("releases/1")), 0o755);
    assert_eq!(
        fs::read_link(demo.join("current")).unwrap(),
        demo.join("releases/1")
    );

    // Nothing left to do.
    fx.run(&["plan"]).code(0);

    // The second apply executes nothing.
    let second = apply_json(&fx, &["--dispatch", "enforced"], 0);
    check_result(&second);
    assert_eq!(second["execution_outcome"], "NotExecuted");
    let o = host_outcome(&second, "demo");
    assert_eq!(o["outcome"], "NoChange");
    assert_eq!(o["changes"], json!({"create": 0, "update": 0, "delete": 0}));
    for o in second["host_outcomes"].as_array().unwrap() {
        assert_eq!(o["steps"], json!([]));
    }
    let id2 = second["run_id"].as_str().unwrap();
    let run2 = fx.state().join("runs").join(id2);
    let logs: Vec<_> = list_tree(&run2)
        .into_iter()
        .filter(|p| p.ends_with(".log"))
        .collect();
    assert!(logs.is_empty(), "the no-op run wrote step logs: {logs:?}");
    assert!(run2.join("plan.json").is_file());
    assert!(run2.join("timeline.jsonl").is_file());
    for line in fs::read_to_string(run2.join("timeline.jsonl"))
        .unwrap()
        .lines()
    {
        serde_json::from_str::<Value>(line).expect("timeline line is JSON");
    }
    let plan = read_json(&run2.join("plan.json"));
    assert_eq!(plan["desired_revision"], second["desired_revision"]);

    // Status documents.
    let status = fx.status("demo");
    check_status(&status, "demo");
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["last_run_id"], id2);
    assert_eq!(status["converged_revision"], status["desired_revision"]);
    assert_eq!(status["desired_revision"], second["desired_revision"]);
    assert_eq!(
        status["pending"],
        json!({"create": 0, "update": 0, "delete": 0, "destructive": 0, "restarts": []})
    );
    assert_eq!(status["awaiting_confirmation"], Value::Null);
    assert_eq!(condition(&status, "Converged")["status"], "True");
    assert_eq!(condition(&status, "Reachable")["status"], "True");
    assert_eq!(condition(&status, "ValidDesiredState")["status"], "True");
    let fleet = check_fleet(&fx);
    assert_eq!(fleet["hosts"].as_array().unwrap().len(), 1);
    assert_eq!(fleet["hosts"][0]["host"], "demo");
    assert_eq!(fleet["hosts"][0]["phase"], "Running");
    assert_eq!(fleet["hosts"][0]["converged"], true);

    // Reading commands.
    let id1 = first["run_id"].as_str().unwrap();
    let runs = fx.run(&["runs"]);
    runs.code(0);
    assert!(
        runs.stdout.contains(id1) && runs.stdout.contains(id2),
        "{runs}"
    );
    let runs = fx.run(&["runs", "--json"]);
    runs.code(0);
    let ids: Vec<_> = runs
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].clone())
        .collect();
    assert_eq!(ids, [json!(id2), json!(id1)], "newest first");
    let show = fx.run(&["show", id1]);
    show.code(0);
    assert!(
        show.stdout.contains(id1) && show.stdout.contains("Completed"),
        "{show}"
    );
    let show = fx.run(&["show", id1, "--json"]);
    show.code(0);
    assert_eq!(show.json(), first);
    fx.run(&["show", "r-20000101T000000Z-none"]).code(1);
    let st = fx.run(&["status"]);
    st.code(0);
    assert!(
        st.stdout.contains("demo") && st.stdout.contains("Running"),
        "{st}"
    );
    let st = fx.run(&["status", "demo", "--json"]);
    st.code(0);
    assert_eq!(st.json(), status);
    fx.run(&["status", "demo"]).code(0);
}

#[test]
fn apply_human_output() {
    let fx = Fixture::two_hosts();
    let r = fx.run(&["apply", "--dispatch", "enforced"]);
    r.code(0);
    // The batches' step lock is in the test's own lock dir, beside the host
    // lock: not the machine's /run/tend, where another test's slow step
    // would hold it.
    assert!(fx.tmp().join("host-lock/steps.lock").exists());
    snapshot!(fx, "apply_two_hosts", transcript(&r));
    let r = fx.run(&["apply", "--dispatch", "enforced"]);
    r.code(0);
    snapshot!(fx, "apply_two_hosts_again", transcript(&r));
}

// ---------------------------------------------------------------------------
// 5. dispatch modes and overrides
// ---------------------------------------------------------------------------

#[track_caller]
fn assert_not_dispatched(fx: &Fixture, result: &Value) {
    check_result(result);
    assert_eq!(result["execution_outcome"], "NotExecuted");
    for host in ["a", "b"] {
        let o = host_outcome(result, host);
        assert_eq!(o["outcome"], "Planned", "{o}");
        assert_eq!(o["dispatch_status"], "not_dispatched", "{o}");
        assert_eq!(o["changes"]["create"], 1);
        assert!(!fx.root().join(format!("{host}.txt")).exists());
    }
}

#[track_caller]
fn assert_dispatched(fx: &Fixture, result: &Value) {
    check_result(result);
    assert_eq!(result["execution_outcome"], "Completed");
    for host in ["a", "b"] {
        let o = host_outcome(result, host);
        assert_eq!(o["outcome"], "Completed", "{o}");
        assert_eq!(o["dispatch_status"], "dispatched", "{o}");
        assert_eq!(
            fs::read_to_string(fx.root().join(format!("{host}.txt"))).unwrap(),
            format!("{host}\n")
        );
    }
}

#[test]
fn dispatch_defaults_to_off() {
    for tend_yaml in [
        None,
        Some("dispatch: off\n"),
        Some("# nothing set\nretries: 1\n"),
    ] {
        let fx = Fixture::two_hosts();
        if let Some(t) = tend_yaml {
            fx.write("tend.yaml", t);
        }
        let result = apply_json(&fx, &[], 2);
        assert_eq!(result["dispatch_mode"], "off", "tend.yaml {tend_yaml:?}");
        assert_not_dispatched(&fx, &result);
        for host in ["a", "b"] {
            let s = fx.status(host);
            check_status(&s, host);
            assert_eq!(s["phase"], "Ready");
            assert_eq!(s["pending"]["create"], 1);
        }
    }
}

#[test]
fn dispatch_from_the_environment() {
    let fx = Fixture::two_hosts();
    let r = fx.run_env("enforced", &["apply", "--json"]);
    r.code(0);
    let result = r.json();
    assert_eq!(result["dispatch_mode"], "enforced");
    assert_dispatched(&fx, &result);
}

#[test]
fn dispatch_from_tend_yaml() {
    let fx = Fixture::two_hosts();
    fx.write("tend.yaml", "dispatch: enforced\n");
    let result = apply_json(&fx, &[], 0);
    assert_dispatched(&fx, &result);
}

#[test]
fn dispatch_flag_beats_the_environment() {
    let fx = Fixture::two_hosts();
    let r = fx.run_env("enforced", &["apply", "--json", "--dispatch", "off"]);
    r.code(2);
    let result = r.json();
    assert_eq!(result["dispatch_mode"], "off");
    assert_not_dispatched(&fx, &result);
}

#[test]
fn environment_beats_tend_yaml() {
    let fx = Fixture::two_hosts();
    fx.write("tend.yaml", "dispatch: enforced\n");
    let r = fx.run_env("off", &["apply", "--json"]);
    r.code(2);
    assert_not_dispatched(&fx, &r.json());
}

#[test]
fn bogus_dispatch_environment_is_an_error() {
    let fx = Fixture::two_hosts();
    let r = fx.run_env("bogus", &["apply"]);
    r.code(1);
    assert!(r.stderr.contains("TEND_DISPATCH=bogus"), "{r}");
    assert!(!fx.state().exists());
    assert!(!fx.root().join("a.txt").exists());
    fx.run_env("bogus", &["plan"]).code(1);
    assert!(!fx.state().exists());
}

#[test]
fn kill_switch_beats_everything() {
    let fx = Fixture::two_hosts();
    fs::create_dir_all(fx.state()).unwrap();
    fs::write(fx.state().join("KILL"), "").unwrap();
    let result = apply_json(&fx, &["--dispatch", "enforced"], 2);
    assert_not_dispatched(&fx, &result);
    let r = fx.run_env("enforced", &["apply", "--json"]);
    r.code(2);
    assert_not_dispatched(&fx, &r.json());
    assert!(
        host_outcome(&r.json(), "a")["reason"]
            .as_str()
            .unwrap()
            .contains("kill switch")
    );

    // Removing it lets the same command dispatch.
    fs::remove_file(fx.state().join("KILL")).unwrap();
    let result = apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_dispatched(&fx, &result);
}

#[test]
fn canary_dispatches_only_to_the_canary() {
    let fx = Fixture::two_hosts();
    fx.write("tend.yaml", "canary: a\n");
    let result = apply_json(&fx, &["--dispatch", "canary"], 2);
    check_result(&result);
    assert_eq!(result["dispatch_mode"], "canary");
    assert_eq!(result["host_outcomes"].as_array().unwrap().len(), 2);
    let a = host_outcome(&result, "a");
    assert_eq!(a["outcome"], "Completed");
    assert_eq!(a["dispatch_status"], "dispatched");
    let b = host_outcome(&result, "b");
    assert_eq!(b["outcome"], "Planned");
    assert_eq!(b["dispatch_status"], "not_dispatched");
    assert_eq!(b["changes"]["create"], 1);
    assert!(fx.root().join("a.txt").exists());
    assert!(!fx.root().join("b.txt").exists());

    // Canary from tend.yaml, with the canary converged: still nothing for b.
    fx.write("tend.yaml", "dispatch: canary\ncanary: a\n");
    let result = apply_json(&fx, &[], 2);
    assert_eq!(host_outcome(&result, "a")["outcome"], "NoChange");
    assert_eq!(host_outcome(&result, "b")["outcome"], "Planned");
    assert!(!fx.root().join("b.txt").exists());
}

#[test]
fn canary_not_targeted_is_policy_blocked() {
    let fx = Fixture::two_hosts();
    fx.write("tend.yaml", "canary: a\n");
    let result = apply_json(&fx, &["b", "--dispatch", "canary"], 3);
    check_result(&result);
    assert_eq!(result["policy_outcome"], "PolicyBlocked");
    assert_eq!(result["blast_radius"], json!(["b"]));
    let b = host_outcome(&result, "b");
    assert_eq!(b["outcome"], "PolicyBlocked");
    assert_eq!(b["dispatch_status"], "not_dispatched");
    assert_eq!(b["last_failure_class"], "Policy");
    assert!(!fx.root().join("a.txt").exists());
    assert!(!fx.root().join("b.txt").exists());
}

// ---------------------------------------------------------------------------
// 6. destructive changes are held
// ---------------------------------------------------------------------------

fn delete_fixture() -> Fixture {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n",
    );
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/old.conf\n    state: absent\n",
    );
    fs::write(fx.root().join("old.conf"), "old\n").unwrap();
    fx
}

#[track_caller]
fn check_awaiting(fx: &Fixture, host: &str, steps: usize) -> String {
    let status = fx.status(host);
    check_status(&status, host);
    let a = &status["awaiting_confirmation"];
    let op = a["operation"]
        .as_str()
        .expect("awaiting_confirmation.operation");
    assert!(
        op.len() == 64
            && op
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
        "operation {op}"
    );
    assert_eq!(a["hosts"], json!([host]));
    assert_eq!(a["steps"].as_array().unwrap().len(), steps);
    assert_eq!(a["token_file"], format!("confirm/{op}.yaml"));
    let command = a["command"].as_str().unwrap();
    assert!(
        command.starts_with("tend ") && command.contains(&format!("confirm {op}")),
        "{command}"
    );
    assert_eq!(status["pending"]["destructive"], steps);
    assert_eq!(condition(&status, "AwaitingConfirmation")["status"], "True");
    op.to_string()
}

#[test]
fn delete_is_held() {
    let fx = delete_fixture();
    let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
    check_result(&result);
    let o = host_outcome(&result, "a");
    assert_eq!(o["outcome"], "EscalationRequired");
    assert_eq!(o["changes"], json!({"create": 0, "update": 0, "delete": 1}));
    assert_eq!(o["steps"][0]["destructive"], true);
    assert_eq!(o["steps"][0]["status"], "not_run");
    assert_eq!(result["effective_mode"], "quick");
    assert_eq!(result["execution_outcome"], "NotExecuted");
    assert_eq!(
        fs::read_to_string(fx.root().join("old.conf")).unwrap(),
        "old\n"
    );
    let op = check_awaiting(&fx, "a", 1);
    let plan = fx.run(&["plan", "--json"]);
    plan.code(2);
    assert_eq!(plan.json()["operation"], op.as_str());
    // No token file is written for the operator.
    assert!(!fx.state().join(format!("confirm/{op}.yaml")).exists());
}

#[test]
fn mixed_create_and_delete() {
    let fx = delete_fixture();
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/old.conf\n    state: absent\n  - kind: file\n    path: {root}/new.conf\n    content: \"new\\n\"\n",
    );
    let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
    check_result(&result);
    let o = host_outcome(&result, "a");
    assert_eq!(o["outcome"], "EscalationRequired");
    assert_eq!(o["dispatch_status"], "dispatched");
    assert_eq!(o["changes"], json!({"create": 1, "update": 0, "delete": 1}));
    assert_eq!(result["execution_outcome"], "Completed");
    assert_eq!(
        fs::read_to_string(fx.root().join("new.conf")).unwrap(),
        "new\n"
    );
    assert_eq!(
        fs::read_to_string(fx.root().join("old.conf")).unwrap(),
        "old\n"
    );
    check_awaiting(&fx, "a", 1);
    let status = fx.status("a");
    assert_eq!(
        status["pending"],
        json!({"create": 0, "update": 0, "delete": 1, "destructive": 1, "restarts": []})
    );
}

#[test]
fn replacing_a_directory_by_a_file_is_held() {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n",
    );
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/thing\n    content: \"a file\\n\"\n",
    );
    fs::create_dir(fx.root().join("thing")).unwrap();
    fs::write(fx.root().join("thing/inside"), "keep\n").unwrap();
    let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
    let o = host_outcome(&result, "a");
    assert_eq!(o["outcome"], "EscalationRequired");
    assert_eq!(o["steps"][0]["destructive"], true);
    assert_eq!(o["steps"][0]["status"], "not_run");
    assert!(fx.root().join("thing").is_dir());
    assert_eq!(
        fs::read_to_string(fx.root().join("thing/inside")).unwrap(),
        "keep\n"
    );
    check_awaiting(&fx, "a", 1);
}

#[test]
fn operation_hash_is_stable_and_follows_the_desired_state() {
    let fx = delete_fixture();
    let op = |fx: &Fixture| {
        let r = fx.run(&["plan", "--json"]);
        r.code(2);
        r.json()["operation"].as_str().unwrap().to_string()
    };
    let one = op(&fx);
    assert_eq!(one.len(), 64);
    assert_eq!(op(&fx), one);
    fs::write(fx.root().join("other.conf"), "other\n").unwrap();
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/old.conf\n    state: absent\n  - kind: file\n    path: {root}/other.conf\n    state: absent\n",
    );
    let two = op(&fx);
    assert_ne!(two, one);
    assert_eq!(op(&fx), two);
}

// ---------------------------------------------------------------------------
// 7. global flags on either side of the subcommand
// ---------------------------------------------------------------------------

#[test]
fn global_flags_before_or_after_the_subcommand() {
    let fx = small_fixture();
    let dir = fx.dir();
    let dir = dir.to_str().unwrap();
    let after = {
        let mut c = tend_command();
        c.args(["plan", "--dir", dir, "--json"]);
        run_command(c)
    };
    after.code(2);
    let before = {
        let mut c = tend_command();
        c.args(["--dir", dir, "--json", "plan"]);
        run_command(c)
    };
    before.code(2);
    assert_eq!(after.stdout, before.stdout);
    after.json();

    // --state-dir, -q and -v too, and the state dir is where they say.
    let state = fx.tmp().join("elsewhere");
    let state = state.to_str().unwrap();
    let r = {
        let mut c = tend_command();
        c.args(["apply", "-q", "--state-dir", state, "--dir", dir]);
        run_command(c)
    };
    r.code(2);
    assert!(Path::new(state).join("status/web.json").is_file());
    assert!(!fx.state().exists());
    let r = {
        let mut c = tend_command();
        c.args([
            "-v",
            "--state-dir",
            state,
            "--dir",
            dir,
            "--json",
            "status",
            "web",
        ]);
        run_command(c)
    };
    r.code(0);
    assert_eq!(r.json()["host"], "web");
}

#[test]
fn default_dir_is_desired_state_in_the_working_directory() {
    let fx = Fixture::two_hosts();
    let mut c = tend_command();
    c.current_dir(fx.tmp()).arg("validate");
    let r = run_command(c);
    r.code(0);
    assert!(r.stdout.starts_with("./desired-state: valid"), "{r}");
}

// ---------------------------------------------------------------------------
// 8. one writer per state dir
// ---------------------------------------------------------------------------

#[test]
fn second_writer_is_refused() {
    let fx = Fixture::two_hosts();
    fs::create_dir_all(fx.state()).unwrap();
    let lock = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(fx.state().join("lock"))
        .unwrap();
    lock.try_lock().expect("the test takes the lock");
    let r = fx.run(&["apply", "--dispatch", "enforced"]);
    r.code(1);
    assert!(r.stderr.contains("lock"), "{r}");
    assert!(
        r.stderr.contains(fx.state().join("lock").to_str().unwrap()),
        "{r}"
    );
    assert!(!fx.root().join("a.txt").exists());
    assert!(!fx.state().join("runs").exists() || list_tree(&fx.state().join("runs")).is_empty());

    drop(lock);
    fx.run(&["apply", "--dispatch", "enforced"]).code(0);
}

// ---------------------------------------------------------------------------
// 9. invalid desired state never dispatches
// ---------------------------------------------------------------------------

#[test]
fn invalid_desired_state_never_dispatches() {
    let fx = Fixture::two_hosts();
    fx.write(
        "hosts/b.yaml",
        "resources:\n  - kind: file\n    path: {root}/b.txt\n    mode: \"0999\"\n",
    );
    let r = fx.run(&["apply", "--dispatch", "enforced"]);
    r.code(1);
    let want = format!("{}/hosts/b.yaml:4:11: ", fx.dir().display());
    assert!(r.stdout.starts_with(&want), "{r}");
    assert!(r.stderr.contains("nothing was probed or dispatched"), "{r}");
    assert!(
        !fx.root().join("a.txt").exists(),
        "the valid host was dispatched"
    );
    assert!(!fx.state().exists());
    let r = fx.run_env("enforced", &["apply"]);
    r.code(1);
    assert!(!fx.root().join("a.txt").exists());
    fx.run(&["plan"]).code(1);
    fx.run(&["probe"]).code(1);
    assert!(list_tree(&fx.root()).is_empty());
}

#[test]
fn unknown_host_is_an_error() {
    let fx = Fixture::two_hosts();
    let r = fx.run(&["apply", "nope", "--dispatch", "enforced"]);
    r.code(1);
    assert!(r.stderr.contains("nope"), "{r}");
    assert!(list_tree(&fx.root()).is_empty());
    fx.run(&["plan", "nope"]).code(1);
}

// ---------------------------------------------------------------------------
// Prune and teardown
// ---------------------------------------------------------------------------

/// Host `a` with a directory and two files in it, applied.
fn applied_fixture() -> Fixture {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n",
    );
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: directory\n    path: {root}/app\n  - kind: file\n    path: {root}/app/keep\n    content: \"k\\n\"\n  - kind: file\n    path: {root}/app/gone\n    content: \"g\\n\"\n",
    );
    apply_json(&fx, &["--dispatch", "enforced"], 0);
    fx
}

fn plan_steps(fx: &Fixture) -> Vec<(String, String, bool)> {
    let plan = fx.run(&["plan", "--json"]);
    plan.json()["hosts"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["action"].as_str().unwrap().to_string(),
                s["destructive"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_resource_removed_from_the_desired_state_is_pruned_only_with_confirmation() {
    let fx = applied_fixture();
    let gone = fx.root().join("app/gone");
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: directory\n    path: {root}/app\n  - kind: file\n    path: {root}/app/keep\n    content: \"k\\n\"\n",
    );
    let id = format!("file:{}", gone.display());
    assert_eq!(plan_steps(&fx), [(id.clone(), "delete".to_string(), true)]);
    fx.run(&["plan"]).code(2);
    let plan = fx.run(&["plan"]);
    assert!(plan.stdout.contains("pruned"), "{plan}");

    let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
    let o = host_outcome(&result, "a");
    assert_eq!(o["outcome"], "EscalationRequired");
    assert_eq!(o["changes"], json!({"create": 0, "update": 0, "delete": 1}));
    assert!(gone.exists(), "a prune never runs without confirmation");
    let status = fx.status("a");
    assert_eq!(status["awaiting_confirmation"]["steps"], json!([id]));

    // Removed by hand: nothing left to prune, and tend forgets it.
    fs::remove_file(&gone).unwrap();
    apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(plan_steps(&fx), []);
    fs::write(&gone, "back\n").unwrap();
    assert_eq!(plan_steps(&fx), [], "no longer managed: not pruned again");
}

#[test]
fn teardown_plans_every_managed_resource_in_reverse_order_and_waits() {
    let fx = applied_fixture();
    let body = fs::read_to_string(fx.dir().join("hosts/a.yaml")).unwrap();
    fx.write("hosts/a.yaml", &format!("lifecycle: absent\n{body}"));
    let root = fx.root();
    let steps = plan_steps(&fx);
    let ids: Vec<&str> = steps.iter().map(|s| s.0.as_str()).collect();
    let dir = format!("directory:{}/app", root.display());
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert!(steps.iter().all(|s| s.1 == "delete" && s.2), "{steps:?}");
    assert_eq!(
        ids.last(),
        Some(&dir.as_str()),
        "contents before their directory: {ids:?}"
    );

    let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
    assert_eq!(result["operation_intent"]["action"], "teardown");
    assert_eq!(host_outcome(&result, "a")["outcome"], "EscalationRequired");
    assert_eq!(fx.status("a")["phase"], "TeardownPending");
    assert!(root.join("app/keep").exists() && root.join("app/gone").exists());

    // Once everything is gone (by hand here; with a token later), the
    // teardown is complete while the host file still lists its resources.
    fs::remove_dir_all(root.join("app")).unwrap();
    apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(fx.status("a")["phase"], "TeardownComplete");
}

// ---------------------------------------------------------------------------
// Confirmation tokens
// ---------------------------------------------------------------------------

/// `delete_fixture` applied once: the delete awaits operation `op`.
fn awaiting() -> (Fixture, String) {
    let fx = delete_fixture();
    apply_json(&fx, &["--dispatch", "enforced"], 3);
    let op = fx.status("a")["awaiting_confirmation"]["operation"]
        .as_str()
        .unwrap()
        .to_string();
    (fx, op)
}

fn write_token(fx: &Fixture, name: &str, body: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = fx.state().join("confirm");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    fs::write(&path, body).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn token_body(op: &str, hosts: &str, expires: &str) -> String {
    format!("operation: {op}\nhosts: [{hosts}]\nexpires: {expires}\nreason: clean up\n")
}

fn in_minutes(m: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    tend::core::token::format_rfc3339(now + m * 60)
}

#[test]
fn confirm_writes_a_token_that_runs_the_delete_exactly_once() {
    let (fx, op) = awaiting();
    let r = fx.run(&[
        "confirm",
        &op,
        "--reason",
        "retire old.conf",
        "--ttl",
        "10m",
    ]);
    r.code(0);
    let token = fx.state().join(format!("confirm/{op}.yaml"));
    assert_eq!(mode_of(&token) & 0o777, 0o600);
    let plan = fx.run(&["plan"]);
    assert!(plan.stdout.contains("covers the operation"), "{plan}");

    let result = apply_json(&fx, &["--dispatch", "enforced"], 0);
    let o = host_outcome(&result, "a");
    assert_eq!(o["outcome"], "Completed", "{result:#}");
    assert_eq!(o["steps"][0]["status"], "succeeded");
    assert_eq!(result["effective_mode"], "full");
    assert_eq!(result["policy_outcome"], "Approved");
    let c = &result["confirmation"];
    assert_eq!(c["operation"], op.as_str());
    assert_eq!(c["hosts"], json!(["a"]));
    assert_eq!(c["token_file"], format!("confirm/{op}.yaml"));
    assert_eq!(c["scope_match"], true);
    assert_eq!(c["reason"], "retire old.conf");
    assert_eq!(c["refusal"], Value::Null);
    assert!(
        !fx.root().join("old.conf").exists(),
        "the confirmed delete ran"
    );
    assert!(!token.exists(), "a used token leaves confirm/");
    let used: Vec<_> = fs::read_dir(fx.state().join("confirm/used"))
        .unwrap()
        .collect();
    assert_eq!(used.len(), 1);
    assert_eq!(fx.status("a")["phase"], "Running");

    // The same content again, for the same operation: refused as reused.
    fs::write(fx.root().join("old.conf"), "old\n").unwrap();
    let used_path = used.into_iter().next().unwrap().unwrap().path();
    let bytes = fs::read(&used_path).unwrap();
    write_token(
        &fx,
        "again.yaml",
        std::str::from_utf8(&bytes).unwrap(),
        0o600,
    );
    let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
    assert_eq!(host_outcome(&result, "a")["outcome"], "EscalationRequired");
    assert!(
        result["confirmation"]["refusal"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{result:#}"
    );
    assert!(fx.root().join("old.conf").exists());
    assert!(
        fx.state().join("confirm/again.yaml").exists(),
        "refused tokens stay where they are"
    );
    let msg = condition(&fx.status("a"), "AwaitingConfirmation")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("already used"), "{msg}");
}

#[test]
fn refused_tokens_say_why_and_nothing_is_deleted() {
    let (fx, op) = awaiting();
    let cases: Vec<(&str, String, u32, &str, bool)> = vec![
        (
            "expired",
            token_body(&op, "a", &in_minutes(-1)),
            0o600,
            "expired",
            true,
        ),
        (
            "writable",
            token_body(&op, "a", &in_minutes(10)),
            0o666,
            "writable by group or others",
            true,
        ),
        (
            "too-long",
            token_body(&op, "a", &in_minutes(120)),
            0o600,
            "token_max_ttl",
            true,
        ),
        (
            "other-op",
            token_body(&"0".repeat(64), "a", &in_minutes(10)),
            0o600,
            "is for operation",
            false,
        ),
        (
            "superset",
            token_body(&op, "a, b", &in_minutes(10)),
            0o600,
            "exactly [a]",
            false,
        ),
        (
            "malformed",
            "operation: [\n".to_string(),
            0o600,
            "malformed",
            false,
        ),
    ];
    for (name, body, mode, why, scope) in cases {
        let path = write_token(&fx, &format!("{name}.yaml"), &body, mode);
        let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
        let o = host_outcome(&result, "a");
        assert_eq!(o["outcome"], "EscalationRequired", "{name}: {result:#}");
        assert_eq!(result["effective_mode"], "quick", "{name}");
        let c = &result["confirmation"];
        assert_eq!(c["token_file"], format!("confirm/{name}.yaml"), "{name}");
        assert_eq!(c["scope_match"], scope, "{name}: {c:#}");
        assert!(
            c["refusal"].as_str().unwrap().contains(why),
            "{name}: {c:#}"
        );
        assert!(
            fx.root().join("old.conf").exists(),
            "{name}: deleted without a valid token"
        );
        assert!(path.exists(), "{name}: a refused token stays");
        fs::remove_file(path).unwrap();
    }
}

#[test]
fn a_token_goes_stale_when_the_desired_state_changes() {
    let (fx, op) = awaiting();
    let c = fx.run(&["confirm", &op, "--reason", "r"]);
    c.code(0);
    // Dispatch is off (no tend.yaml) and no controller runs: it says who will run it.
    assert!(
        c.stdout.contains("note: dispatch is off")
            && c.stdout.contains("apply --dispatch enforced a"),
        "{c}"
    );
    // Another destructive step joins the operation: its hash changes.
    fs::write(fx.root().join("older.conf"), "x\n").unwrap();
    fx.write(
        "hosts/a.yaml",
        "resources:\n  - kind: file\n    path: {root}/old.conf\n    state: absent\n  - kind: file\n    path: {root}/older.conf\n    state: absent\n",
    );
    let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
    assert_ne!(result["confirmation"]["operation"], op.as_str());
    assert_eq!(result["confirmation"]["scope_match"], false);
    assert!(fx.root().join("old.conf").exists() && fx.root().join("older.conf").exists());
}

#[test]
fn a_protected_host_is_policy_blocked_token_or_not() {
    let (fx, op) = awaiting();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n    protected: true\n",
    );
    write_token(&fx, "t.yaml", &token_body(&op, "a", &in_minutes(10)), 0o600);
    let result = apply_json(&fx, &["--dispatch", "enforced"], 3);
    let o = host_outcome(&result, "a");
    assert_eq!(o["outcome"], "PolicyBlocked", "{result:#}");
    assert_eq!(o["last_failure_class"], "Policy");
    assert!(fx.root().join("old.conf").exists());
    assert!(fx.state().join("confirm/t.yaml").exists(), "not consumed");
}

#[test]
fn confirm_refuses_what_it_cannot_scope() {
    let (fx, op) = awaiting();
    fx.run(&["confirm", &"1".repeat(64), "--reason", "r"])
        .code(1);
    fx.run(&["confirm", "abc", "--reason", "r"]).code(1);
    fx.run(&["confirm", &op, "--reason", "r", "--ttl", "3h"])
        .code(1);
    fx.run(&["confirm", &op, "--reason", " "]).code(1);
    assert!(!fx.state().join(format!("confirm/{op}.yaml")).exists());
}

#[test]
fn a_host_with_hundreds_of_steps_converges_in_several_batches() {
    // Far more than one `sh -c` argument (128 KiB) can carry in one batch.
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n",
    );
    let mut body = String::from("resources:\n  - kind: directory\n    path: {root}/many\n");
    for i in 0..400 {
        body.push_str(&format!(
            "  - kind: file\n    path: {{root}}/many/file-with-a-rather-long-name-to-make-the-scripts-longer-{i:04}\n    content: \"{i}\\n\"\n"
        ));
    }
    fx.write("hosts/a.yaml", &body);
    let result = apply_json(&fx, &["--dispatch", "enforced"], 0);
    let o = host_outcome(&result, "a");
    assert_eq!(o["outcome"], "Completed");
    assert_eq!(o["steps"].as_array().unwrap().len(), 401);
    let n = fs::read_dir(fx.root().join("many")).unwrap().count();
    assert_eq!(n, 400);
    fx.run(&["plan"]).code(0);
}

#[test]
fn a_probe_larger_than_one_shell_argument_still_works() {
    // ~3000 paths make a probe script of several hundred KiB: it goes to the
    // host's shell on stdin, so no argument limit applies.
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n",
    );
    let mut body = String::from("resources:\n");
    for i in 0..3000 {
        body.push_str(&format!(
            "  - kind: file\n    path: {{root}}/absent/a-long-path-name-so-that-the-probe-script-grows-well-past-the-limit-{i:05}\n    state: absent\n"
        ));
    }
    fx.write("hosts/a.yaml", &body);
    let r = fx.run(&["probe", "--json"]);
    r.code(0);
    let doc = r.json();
    assert_eq!(
        doc["hosts"][0]["resources"].as_object().unwrap().len(),
        3000
    );
    fx.run(&["plan"]).code(0);
}

/// SPEC 8.6: the fleet view works before any run (every host `Unknown`,
/// exit 0) and leads with trouble.
#[test]
fn status_lists_every_host_trouble_first() {
    let fx = Fixture::two_hosts();
    let st = fx.run(&["status"]);
    st.code(0);
    let lines: Vec<&str> = st.stdout.lines().take_while(|l| !l.is_empty()).collect();
    assert!(
        lines[0].starts_with("HOST") && lines[0].contains("READY"),
        "{st}"
    );
    assert_eq!(lines.len(), 3, "{st}");
    // No tend.yaml: dispatch is off, and the fleet view says so once.
    assert!(st.stdout.contains("\nDispatch is off"), "{st}");
    for (line, host) in lines[1..].iter().zip(["a", "b"]) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[..3], [host, "Unknown", "False"], "{st}");
    }
    fx.run(&["status", "--json"]).code(0);

    // `a` converges; `b`'s file then breaks the desired state.
    fx.run(&["apply", "a", "--dispatch", "enforced"]).code(0);
    fx.run(&["apply", "b", "--dispatch", "off"]).code(2);
    let st = fx.run(&["status"]);
    st.code(0);
    let order: Vec<(&str, &str)> = st
        .stdout
        .lines()
        .take_while(|l| !l.is_empty())
        .skip(1)
        .map(|l| {
            let mut c = l.split_whitespace();
            (c.next().unwrap(), c.nth(1).unwrap())
        })
        .collect();
    // `b` has a change pending (Converged=False): it comes before the ready `a`.
    assert_eq!(order, [("b", "False"), ("a", "True")], "{st}");
}

/// SPEC 8.6: `--tag` (any of) and `--exclude` select hosts like names; a tag
/// or host that matches nothing is an error, never "every host".
#[test]
fn tag_and_exclude_select_hosts() {
    let fx = Fixture::two_hosts();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n    tags: [web]\n  - name: b\n    transport: local\n    tags: [db]\n",
    );
    let planned = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["plan", "--json"];
        a.extend(args);
        let r = fx.run(&a);
        r.code(2);
        r.json()["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["host"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(planned(&[]), ["a", "b"]);
    assert_eq!(planned(&["--tag", "web"]), ["a"]);
    assert_eq!(planned(&["--tag", "web", "--tag", "db"]), ["a", "b"]);
    assert_eq!(planned(&["--exclude", "a"]), ["b"]);
    assert_eq!(planned(&["a", "--tag", "db", "--exclude", "a"]), ["b"]);
    for bad in [
        &["plan", "--tag", "nope"][..],
        &["plan", "--exclude", "zz"],
        &["plan", "--exclude", "a", "--exclude", "b"],
    ] {
        let r = fx.run(bad);
        r.code(1);
    }
    // apply runs only the selected host.
    fx.run(&["apply", "--tag", "db", "--dispatch", "enforced"])
        .code(0);
    assert!(fx.root().join("b.txt").exists() && !fx.root().join("a.txt").exists());
    let st = fx.run(&["status", "--exclude", "b"]);
    st.code(0);
    let rows: Vec<&str> = st
        .stdout
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(rows.len(), 1, "{st}");
    assert!(rows[0].starts_with("a "), "{st}");
}

/// `tend confirm --pending` selects like `plan`: an unknown tag is an
/// error, `--exclude` leaves a host's operation out, and the one token it
/// writes runs each listed operation once.
#[test]
fn confirm_pending_selects_like_plan_and_each_operation_runs_once() {
    let fx = Fixture::two_hosts();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: a\n    transport: local\n    tags: [web]\n  - name: b\n    transport: local\n    tags: [web]\n",
    );
    for h in ["a", "b"] {
        fs::write(fx.root().join(format!("{h}.old")), "x\n").unwrap();
        fx.write(
            &format!("hosts/{h}.yaml"),
            &format!("resources:\n  - kind: file\n    path: {{root}}/{h}.old\n    state: absent\n"),
        );
    }
    // One operation per host, as the controller makes them.
    fx.run(&["apply", "a", "--dispatch", "enforced"]).code(3);
    fx.run(&["apply", "b", "--dispatch", "enforced"]).code(3);
    fx.run(&["confirm", "--pending", "--tag", "nope", "--reason", "r"])
        .code(1);
    let c = fx.run(&[
        "confirm",
        "--pending",
        "--tag",
        "web",
        "--exclude",
        "b",
        "--reason",
        "r",
    ]);
    c.code(0);
    let op_a = fx.status("a")["awaiting_confirmation"]["operation"]
        .as_str()
        .unwrap()
        .to_string();
    let op_b = fx.status("b")["awaiting_confirmation"]["operation"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(c.stdout.contains(&op_a) && !c.stdout.contains(&op_b), "{c}");
    // The token covers a only.
    fx.run(&["apply", "b", "--dispatch", "enforced"]).code(3);
    fx.run(&["apply", "a", "--dispatch", "enforced"]).code(0);
    assert!(!fx.root().join("a.old").exists() && fx.root().join("b.old").exists());
    assert_eq!(
        fs::read_dir(fx.state().join("confirm/used"))
            .unwrap()
            .count(),
        1
    );
}

/// A host's `Converged` condition, from its status file.
fn converged_of(fx: &Fixture, host: &str) -> Value {
    let status = read_json(&fx.state().join(format!("status/{host}.json")));
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Converged")
        .unwrap()
        .clone()
}

#[test]
fn a_suspended_host_is_probed_and_never_dispatched_until_unsuspended() {
    let fx = Fixture::two_hosts();
    fx.run(&["suspend", "a", "--reason", "disk swap"]).code(0);
    // A host the inventory lacks is an error, and suspends nothing.
    fx.run(&["suspend", "zz", "--reason", "typo"]).code(1);
    let result = apply_json(&fx, &["--dispatch", "enforced"], 2);
    let a = host_outcome(&result, "a");
    assert_eq!(a["outcome"], "Planned", "{result}");
    assert!(a["reason"].as_str().unwrap().contains("disk swap"), "{a}");
    assert_eq!(host_outcome(&result, "b")["outcome"], "Completed");
    assert!(!fx.root().join("a.txt").exists(), "nothing ran on a");
    let converged = converged_of(&fx, "a");
    assert_eq!(converged["status"], "False");
    assert_eq!(converged["reason"], "Suspended", "{converged}");
    fx.run(&["unsuspend", "a"]).code(0);
    let result = apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(host_outcome(&result, "a")["outcome"], "Completed");
    assert!(fx.root().join("a.txt").exists());
}

#[test]
fn dispatch_off_says_so_in_the_status() {
    let fx = Fixture::two_hosts();
    apply_json(&fx, &[], 2);
    let converged = converged_of(&fx, "a");
    assert_eq!(converged["reason"], "DispatchOff", "{converged}");
    assert!(
        converged["message"]
            .as_str()
            .unwrap()
            .contains("dispatch: enforced"),
        "says how to enable it: {converged}"
    );
}

#[test]
fn version_names_the_commit() {
    let r = run_command({
        let mut c = tend_command();
        c.args(["version", "--json"]);
        c
    });
    r.code(0);
    let v = r.json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let commit = v["commit"].as_str().unwrap();
    assert!(
        commit == "unknown"
            || (commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{v}"
    );
    let r = run_command({
        let mut c = tend_command();
        c.arg("--version");
        c
    });
    r.code(0);
    assert!(r.stdout.contains(commit), "{}", r.stdout);
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let r = run_command({
            let mut c = tend_command();
            c.args(["completions", shell]);
            c
        });
        r.code(0);
        for sub in ["apply", "confirm", "resume", "suspend"] {
            assert!(r.stdout.contains(sub), "{shell}: no `{sub}`");
        }
        if shell == "bash" {
            // The script is valid bash.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tend.bash");
            fs::write(&path, &r.stdout).unwrap();
            let ok = std::process::Command::new("bash")
                .arg("-n")
                .arg(&path)
                .status()
                .unwrap()
                .success();
            assert!(ok, "bash -n refused the completion script");
        }
    }
    let r = run_command({
        let mut c = tend_command();
        c.args(["completions", "tcsh"]);
        c
    });
    r.code(1);
}

#[test]
fn show_speaks_the_documents_words() {
    let fx = Fixture::two_hosts();
    let result = apply_json(&fx, &["--dispatch", "enforced"], 0);
    let id = result["run_id"].as_str().unwrap();
    let r = fx.run(&["show", id]);
    r.code(0);
    assert!(r.stdout.contains("(converge, trigger cli)"), "{r}");
    assert!(r.stdout.contains("(effective quick)"), "{r}");
    assert!(r.stdout.contains("host a: Completed, dispatched"), "{r}");
    assert!(r.stdout.contains("create file:"), "{r}");
    // A step's log path opens from where the command ran.
    let log = r
        .stdout
        .lines()
        .find_map(|l| l.split(" log: ").nth(1))
        .expect("a log path");
    assert!(
        fx.tmp().join(log).is_file() || std::path::Path::new(log).is_file(),
        "{log}"
    );
}

#[test]
fn retry_without_a_controller_says_who_will_take_it() {
    let fx = Fixture::two_hosts();
    fx.run(&["retry", "a"]).code(1);
    let r = fx.run(&["retry", "a", "--reason", "test"]);
    r.code(0);
    assert!(r.stdout.contains("no controller runs"), "{r}");
    let r = fx.run(&["retry", "a", "--reason", "test", "--json"]);
    r.code(0);
    let v = r.json();
    assert_eq!(v["host"], "a");
    assert_eq!(v["controller_pid"], Value::Null);
    assert!(fx.state().join("retry/a").exists());
}

/// A host with a text file update, a binary file update, a new file and a
/// delete: what `plan` shows as content diffs.
fn diff_fixture() -> Fixture {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n",
    );
    fx.write(
        "hosts/web.yaml",
        "resources:\n  - kind: file\n    path: {root}/app.conf\n    content: \"port = 8080\\nworkers = 8\\nlog = info\\n\"\n  - kind: file\n    path: {root}/blob\n    content: \"now text\\n\"\n  - kind: file\n    path: {root}/new.conf\n    content: \"fresh\\n\"\n  - kind: file\n    path: {root}/legacy.conf\n    state: absent\n",
    );
    for (name, bytes) in [
        ("app.conf", &b"port = 8080\nworkers = 4\nlog = info\n"[..]),
        ("blob", &b"\x00\x01binary"[..]),
        ("legacy.conf", &b"legacy\n"[..]),
    ] {
        let path = fx.root().join(name);
        fs::write(&path, bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    }
    fx
}

#[test]
fn plan_shows_unified_content_diffs() {
    let fx = diff_fixture();
    let r = fx.run(&["plan"]);
    r.code(2);
    // Piped: no colour.
    assert!(!r.stdout.contains('\x1b'), "{}", r.stdout);
    assert!(r.stdout.contains("-workers = 4\n") && r.stdout.contains("+workers = 8\n"));
    assert!(r.stdout.contains("(binary content differs: 8 -> 9 bytes)"));
    snapshot!(fx, "plan_content_diffs", transcript(&r));
    let plain = fx.run(&["plan", "--no-diff"]);
    plain.code(2);
    assert!(
        !plain.stdout.contains("workers = 4") && plain.stdout.contains("content: sha256:"),
        "{plain}"
    );
}

#[test]
fn plan_colours_only_when_asked_or_on_a_terminal() {
    let fx = diff_fixture();
    let r = fx.run(&["plan", "--color", "always"]);
    r.code(2);
    assert!(
        r.stdout.contains("\x1b[31m-workers = 4\x1b[0m"),
        "{}",
        r.stdout
    );
    snapshot!(
        fx,
        "plan_content_diffs_colour",
        transcript(&r).replace('\x1b', "<ESC>")
    );
    let never = fx.run(&["plan", "--color", "never"]);
    assert!(!never.stdout.contains('\x1b'));
    let mut cmd = fx.cmd(&["plan", "--color", "auto"]);
    cmd.env("NO_COLOR", "1");
    assert!(!common::run_command(cmd).stdout.contains('\x1b'));
    let bad = fx.run(&["plan", "--color", "sometimes"]);
    bad.code(1);
    assert!(bad.stderr.contains("sometimes"), "{}", bad.stderr);
}

/// Every byte under `dir` (files only), for a search.
fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(b) = fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

#[test]
fn sensitive_content_reaches_no_output_artifact_or_database() {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n",
    );
    let resources = "resources:\n  - kind: file\n    path: {root}/token\n    content: \"NEW-SECRET-1234\\n\"\n    sensitive: true\n  - kind: file\n    path: {root}/db.pass\n    content: \"fresh-PASSWORD\\n\"\n    mode: \"0600\"\n    sensitive: true\n  - kind: command\n    name: seed\n    run: \"echo RUNTEXT-zeta; echo OUTPUT-omega; echo ERR-sigma >&2\"\n    creates: {root}/GUARD-path-kappa\n    sensitive: true\n";
    fx.write("hosts/web.yaml", resources);
    fs::write(fx.root().join("db.pass"), "OLD-PASSWORD\n").unwrap();
    let secrets = [
        "NEW-SECRET",
        "PASSWORD",
        "RUNTEXT",
        "OUTPUT-omega",
        "ERR-sigma",
        "GUARD-path",
    ];
    let plan = fx.run(&["plan"]);
    plan.code(2);
    let json = fx.run(&["plan", "--json"]);
    let apply = fx.run(&["apply", "--dispatch", "enforced"]);
    apply.code(0);
    let status = fx.run(&["status", "web"]);
    let run_id = fs::read_dir(fx.state().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("r-"))
        .unwrap();
    let show = fx.run(&["show", &run_id]);
    for out in [&plan, &json, &apply, &status, &show] {
        for s in secrets {
            assert!(
                !out.stdout.contains(s) && !out.stderr.contains(s),
                "`{s}` in output:\n{}\n{}",
                out.stdout,
                out.stderr
            );
        }
    }
    assert!(
        plan.stdout.contains("content: - -> (sensitive) 16 bytes"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .contains("content: (sensitive) 13 bytes -> (sensitive) 15 bytes"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("run: - -> (sensitive)"),
        "{}",
        plan.stdout
    );
    for (path, bytes) in all_bytes(&fx.state()) {
        let text = String::from_utf8_lossy(&bytes);
        for s in secrets {
            assert!(!text.contains(s), "`{s}` in {}", path.display());
        }
    }
    // The command ran and its content arrived: withheld, not lost.
    assert_eq!(
        fs::read_to_string(fx.root().join("db.pass")).unwrap(),
        "fresh-PASSWORD\n"
    );
    // A sensitive file to delete is approved by a sealed digest, never a
    // plain sha256 of its content.
    fx.write(
        "hosts/web.yaml",
        &resources.replace(
            "    content: \"NEW-SECRET-1234\\n\"\n    sensitive: true\n",
            "    state: absent\n    sensitive: true\n",
        ),
    );
    let del = fx.run(&["plan", "--json"]);
    del.code(2);
    let doc: Value = serde_json::from_str(&del.stdout).unwrap();
    let step = doc["hosts"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"].as_str().unwrap().ends_with("/token"))
        .unwrap()
        .clone();
    let observed = &step["approval"]["observed"];
    assert!(observed["sha256"].is_null(), "{observed}");
    assert!(
        observed["sealed"].as_str().unwrap().starts_with("sealed:"),
        "{observed}"
    );
    let sha_of_secret = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(b"NEW-SECRET-1234\n"))
    };
    assert!(!del.stdout.contains(&sha_of_secret));
    // The same state dir seals the same way: a second plan names the same operation.
    let again: Value = serde_json::from_str(&fx.run(&["plan", "--json"]).stdout).unwrap();
    assert_eq!(again["operation"], doc["operation"]);
}

#[test]
fn apply_streams_one_line_per_finished_step() {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n",
    );
    fx.write(
        "hosts/web.yaml",
        "resources:\n  - kind: file\n    path: {root}/a.conf\n    content: \"a\\n\"\n  - kind: command\n    name: broken\n    run: \"echo first line of trouble >&2; exit 3\"\n    requires: [\"file:{root}/a.conf\"]\n",
    );
    let r = fx.run(&["apply", "--dispatch", "enforced", "--progress"]);
    r.code(4);
    let mut filters = fx.filters();
    filters.push((r"\(\d+\.\ds\)".into(), "([SECS])".into()));
    let filters: Vec<(&str, &str)> = filters
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    insta::with_settings!({filters => filters, prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("apply_streamed_lines", transcript(&r));
    });
    // Piped without --progress: only the summary.
    fx.write(
        "hosts/web.yaml",
        "resources:\n  - kind: file\n    path: {root}/a.conf\n    content: \"a\\n\"\n  - kind: file\n    path: {root}/b.conf\n    content: \"b\\n\"\n",
    );
    let quiet = fx.run(&["apply", "--dispatch", "enforced"]);
    quiet.code(0);
    assert!(
        !quiet.stdout.contains("succeeded  file:"),
        "{}",
        quiet.stdout
    );
    assert!(quiet.stdout.contains("changed: file:"), "{}", quiet.stdout);
}

#[test]
fn apply_shows_a_slow_step_is_alive() {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n",
    );
    fx.write(
        "hosts/web.yaml",
        "resources:\n  - kind: command\n    name: slow\n    run: \"sleep 11\"\n",
    );
    let r = fx.run(&["apply", "--dispatch", "enforced", "--progress"]);
    r.code(0);
    // The ticker looks every 5 s: an 11 s step is seen running at least once.
    assert!(
        r.stdout.contains("running    command:slow (") && r.stdout.contains("s so far)"),
        "{}",
        r.stdout
    );
}

#[test]
fn drift_lists_corrective_differences_only() {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n",
    );
    let conf = "resources:\n  - kind: file\n    path: {root}/app.conf\n    content: \"port = 80\\n\"\n  - kind: file\n    path: {root}/other.conf\n    content: \"x\\n\"\n";
    fx.write("hosts/web.yaml", conf);
    // Nothing applied yet: pending changes are not drift.
    let r = fx.run(&["drift"]);
    r.code(0);
    assert!(r.stdout.contains("host web: no drift"), "{}", r.stdout);
    fx.run(&["apply", "--dispatch", "enforced"]).code(0);
    fx.run(&["drift"]).code(0);
    // A hand edit is drift, with its diff.
    fs::write(fx.root().join("app.conf"), "port = 8080\n").unwrap();
    let r = fx.run(&["drift"]);
    r.code(2);
    snapshot!(fx, "drift_hand_edit", transcript(&r));
    let doc = fx.run(&["drift", "--json"]);
    doc.code(2);
    let doc: Value = serde_json::from_str(&doc.stdout).unwrap();
    assert_eq!(
        doc["hosts"][0]["drift"][0]["id"],
        format!("file:{}", fx.root().join("app.conf").display())
    );
    assert_eq!(doc["hosts"][0]["drift"].as_array().unwrap().len(), 1);
    // A commit that redefines the drifted resource makes it a pending
    // change, no longer drift; the other file's hand edit still is.
    fs::write(fx.root().join("other.conf"), "y\n").unwrap();
    fx.write("hosts/web.yaml", &conf.replace("port = 80", "port = 81"));
    let doc = fx.run(&["drift", "--json"]);
    doc.code(2);
    let doc: Value = serde_json::from_str(&doc.stdout).unwrap();
    let ids: Vec<&str> = doc["hosts"][0]["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![format!("file:{}", fx.root().join("other.conf").display())]
    );
    // Drift never changes the host.
    assert_eq!(
        fs::read_to_string(fx.root().join("other.conf")).unwrap(),
        "y\n"
    );
    // A host that cannot be probed: exit 1.
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n  - name: gone\n    address: 127.0.0.1\n    port: 1\n",
    );
    fx.write("hosts/gone.yaml", "resources: []\n");
    let r = fx.run(&["drift"]);
    r.code(1);
    assert!(r.stdout.contains("host gone: not probed"), "{}", r.stdout);
}

#[test]
fn man_page_covers_every_subcommand() {
    let r = run_command({
        let mut c = tend_command();
        c.arg("man");
        c
    });
    r.code(0);
    assert!(
        r.stdout.starts_with(".ie") || r.stdout.contains(".TH tend 1"),
        "{}",
        &r.stdout[..200.min(r.stdout.len())]
    );
    for sub in [
        "VALIDATE",
        "SCHEMA",
        "PROBE",
        "PLAN",
        "DRIFT",
        "APPLY",
        "RUN",
        "STATUS",
        "CONFIRM",
        "RETRY",
        "RESUME",
        "SUSPEND",
        "UNSUSPEND",
        "RUNS",
        "SHOW",
        "VERSION",
        "COMPLETIONS",
        "MAN",
    ] {
        assert!(
            r.stdout.contains(&format!(".SH \"TEND {sub}\"")),
            "no section for {sub}"
        );
    }
    assert!(r.stdout.contains("\\-\\-reason"), "options are rendered");
}

#[test]
fn status_describes_a_host_and_leads_the_fleet_with_trouble() {
    let fx = Fixture::two_hosts();
    fx.write("tend.yaml", "crash_loop_threshold: 2\nretries: 0\n");
    // Before any run: every host Unknown, exit 0, also for one host.
    let fresh = fx.run(&["status", "a"]);
    fresh.code(0);
    assert!(fresh.stdout.contains("Phase:   Unknown"), "{fresh}");
    // `b` fails its step: trouble, listed first.
    fx.write(
        "hosts/b.yaml",
        "resources:\n  - kind: command\n    name: broken\n    run: \"echo no >&2; exit 1\"\n",
    );
    fx.run(&["apply", "a", "--dispatch", "enforced"]).code(0);
    fx.run(&["apply", "b", "--dispatch", "enforced"]).code(4);
    fx.run(&["apply", "b", "--dispatch", "enforced"]).code(4);
    let mut filters = fx.filters();
    filters.push((r"\b\d+[smhd]\b".into(), "[AGE]".into()));
    filters.push((r"\b[0-9a-f]{12}\b".into(), "[REVISION]".into()));
    let filters: Vec<(&str, &str)> = filters
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let fleet = fx.run(&["status"]);
    fleet.code(0);
    let first = fleet.stdout.lines().nth(1).unwrap();
    assert!(first.starts_with("b "), "trouble first: {fleet}");
    let host = fx.run(&["status", "b"]);
    host.code(0);
    insta::with_settings!({filters => filters, prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("status_fleet_trouble_first", transcript(&fleet));
        insta::assert_snapshot!("status_describe_host", transcript(&host));
        insta::assert_snapshot!("status_fresh_host", transcript(&fresh));
    });
}

/// SPEC 8.7 on a local host: `drift: report` is reported and left until its
/// definition changes; changes are counted corrective or intentional; a
/// resource corrected 3 times in the hour is contested and then corrected at
/// most once per resync.
#[test]
fn drift_policy_reports_counts_and_contests() {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n",
    );
    let desired = |motd: &str| {
        format!(
            "resources:\n  - kind: file\n    path: {{root}}/motd\n    content: \"{motd}\\n\"\n    drift: report\n  - kind: file\n    path: {{root}}/app.conf\n    content: \"port = 80\\n\"\n"
        )
    };
    fx.write("hosts/web.yaml", &desired("welcome"));
    let outcome = |r: &Value| host_outcome(r, "web").clone();
    let first = apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(
        (
            outcome(&first)["intentional"].clone(),
            outcome(&first)["corrective"].clone()
        ),
        (json!(2), json!(0))
    );
    let motd = fx.root().join("motd");
    let app = fx.root().join("app.conf");

    // A hand edit of the `report` resource: reported, left, not pending.
    fs::write(&motd, "edited by hand\n").unwrap();
    fx.run(&["plan"]).code(0);
    let r = apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(outcome(&r)["steps"], json!([]));
    assert_eq!(fs::read_to_string(&motd).unwrap(), "edited by hand\n");
    let st = fx.status("web");
    let motd_id = format!("file:{}", motd.display());
    assert_eq!(st["drift"]["reported"], json!([motd_id]));
    assert_eq!(condition(&st, "Drifted")["status"], "True");
    assert_eq!(condition(&st, "Drifted")["reason"], "DriftReported");
    assert_eq!(condition(&st, "Converged")["status"], "True");
    assert_eq!(st["pending"]["update"], 0);
    let d = fx.run(&["drift", "--json"]);
    d.code(2);
    assert_eq!(d.json()["hosts"][0]["drift"][0]["reported"], true);
    let d = fx.run(&["drift"]);
    d.code(2);
    assert!(
        d.stdout.contains("-edited by hand") && d.stdout.contains("+welcome"),
        "{d}"
    );

    // A commit redefining it converges it: intentional.
    fx.write("hosts/web.yaml", &desired("welcome back"));
    let r = apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(
        (
            outcome(&r)["intentional"].clone(),
            outcome(&r)["corrective"].clone()
        ),
        (json!(1), json!(0))
    );
    assert_eq!(fs::read_to_string(&motd).unwrap(), "welcome back\n");
    assert_eq!(fx.status("web")["drift"]["reported"], json!([]));

    // Hand edits of a `correct` resource: corrective, three times contested.
    for n in 1..=3 {
        fs::write(&app, format!("port = {n}\n")).unwrap();
        let r = apply_json(&fx, &["--dispatch", "enforced"], 0);
        assert_eq!(
            (
                outcome(&r)["intentional"].clone(),
                outcome(&r)["corrective"].clone()
            ),
            (json!(0), json!(1)),
            "edit {n}"
        );
        assert_eq!(fs::read_to_string(&app).unwrap(), "port = 80\n");
    }
    let st = fx.status("web");
    let app_id = format!("file:{}", app.display());
    assert_eq!(st["drift"]["corrected_total"], 3);
    assert_eq!(st["drift"]["contested"], json!([app_id]));
    assert_eq!(condition(&st, "Drifted")["reason"], "Contested");
    // Contested and corrected less than a resync ago: left this time.
    fs::write(&app, "port = 4\n").unwrap();
    let r = apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(outcome(&r)["corrective"], 0);
    assert_eq!(fs::read_to_string(&app).unwrap(), "port = 4\n");
    assert_eq!(fx.status("web")["drift"]["reported"], json!([app_id]));
}

#[test]
fn status_watch_redraws_on_change_and_ends_with_its_reader() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let fx = Fixture::two_hosts();
    let mut child = fx
        .cmd(&["status", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_header = || loop {
        let l = lines.next().expect("watch output").unwrap();
        if l.contains("HOST ") {
            return l;
        }
    };
    next_header();
    // A run writes status files: the view is drawn again.
    fx.run(&["apply", "a", "--dispatch", "enforced"]).code(0);
    next_header();
    drop(lines);
    // The reader went away: watch ends (within its 1 s poll), exit 0.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "watch did not end after its reader left"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    fx.run(&["status", "--watch", "--json"]).code(1);
}

/// `guard: connection` (SPEC 8.7) on a `transport: local` host: bad terms
/// are refused with file:line:col; a guarded write is armed (recorded
/// first), confirmed over a new connection and disarmed; a definition the
/// host reverted is held (`GuardReverted`) until the definition changes.
/// The revert itself is proven on real hosts (tests/guard.rs).
#[test]
fn connection_guard_terms_disarm_and_hold() {
    let fx = Fixture::new();
    fx.write(
        "inventory.yaml",
        "hosts:\n  - name: web\n    transport: local\n",
    );
    fx.write("tend.yaml", "probe_timeout: 40s\n");
    fx.write(
        "hosts/web.yaml",
        "resources:\n  - kind: file\n    path: {root}/a\n    content: \"a\\n\"\n    guard: connection\n    revert_after: 10s\n  - kind: file\n    path: {root}/b\n    content: \"b\\n\"\n    revert_after: 60s\n  - kind: file\n    path: {root}/c\n    state: absent\n    guard: connection\n  - kind: file\n    path: {root}/d\n    content: \"d\\n\"\n    guard: connection\n    revert_after: 35s\n",
    );
    let v = fx.run(&["validate"]);
    v.code(1);
    for want in [
        "hosts/web.yaml:6:19: revert_after `10s` is below the minimum of 30s",
        "hosts/web.yaml:10:19: `revert_after` needs `guard: connection` on the same file",
        "hosts/web.yaml:14:12: `guard: connection` protects a write: a file with `state: absent` cannot be guarded",
        "hosts/web.yaml:19:19: revert_after `35s` must be more than probe_timeout `40s`",
    ] {
        assert!(
            v.stderr.contains(want) || v.stdout.contains(want),
            "{want}:\n{v}"
        );
    }

    fx.write("tend.yaml", "probe_timeout: 5s\n");
    let desired = |content: &str| {
        format!(
            "resources:\n  - kind: file\n    path: {{root}}/sshd.conf\n    content: \"{content}\\n\"\n    guard: connection\n    revert_after: 40s\n"
        )
    };
    fx.write("hosts/web.yaml", &desired("Port 22"));
    let plan = fx.run(&["plan"]);
    plan.code(2);
    assert!(
        plan.stdout.contains("connection guard: the host restores the old file unless tend reaches it again within 40s"),
        "{plan}"
    );
    let r = apply_json(&fx, &["--dispatch", "enforced"], 0);
    let id = format!("file:{}", fx.root().join("sshd.conf").display());
    assert_eq!(host_outcome(&r, "web")["steps"][0]["status"], "succeeded");
    let run = r["run_id"].as_str().unwrap();
    let timeline =
        fs::read_to_string(fx.state().join("runs").join(run).join("timeline.jsonl")).unwrap();
    let kinds: Vec<String> = timeline
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let at = |k: &str| {
        kinds
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("{k} in {kinds:?}"))
    };
    // Armed before the write, reached and disarmed after it.
    assert!(at("guard_arming") < at("guard_armed"));
    let write = kinds.iter().rposition(|k| k == "batch_sent").unwrap();
    assert!(at("guard_armed") < write && write < at("guard_host_reached"));
    assert!(at("guard_armed") < at("guard_host_reached"));
    assert!(at("guard_host_reached") < at("guard_disarmed"));
    let guard_dir = fx.tmp().join("host-lock").join("guard");
    let left: Vec<String> = fs::read_dir(&guard_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        left.len() == 1 && left[0].ends_with(".disarmed"),
        "only a tombstone is left: {left:?}"
    );
    let db = rusqlite::Connection::open(fx.state().join("tend.db")).unwrap();
    let state: String = db
        .query_row("SELECT state FROM guards", [], |r| r.get(0))
        .unwrap();
    assert_eq!(state, "disarmed");

    // A new definition, and (as if the host had reverted it) its guard
    // recorded as reverted: held, not applied, GuardReverted.
    fx.write("hosts/web.yaml", &desired("Port 2222"));
    apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(
        fs::read_to_string(fx.root().join("sshd.conf")).unwrap(),
        "Port 2222\n"
    );
    db.execute(
        "UPDATE guards SET state = 'reverted' WHERE armed_at = (SELECT MAX(armed_at) FROM guards)",
        [],
    )
    .unwrap();
    fs::write(fx.root().join("sshd.conf"), "Port 22\n").unwrap();
    let r = apply_json(&fx, &["--dispatch", "enforced"], 3);
    let step = &host_outcome(&r, "web")["steps"][0];
    assert_eq!(step["status"], "not_run", "{r:#}");
    assert!(
        step["message"].as_str().unwrap().contains("GuardReverted"),
        "{r:#}"
    );
    assert_eq!(
        fs::read_to_string(fx.root().join("sshd.conf")).unwrap(),
        "Port 22\n"
    );
    let st = fx.status("web");
    assert_eq!(condition(&st, "Converged")["status"], "False");
    assert_eq!(condition(&st, "Converged")["reason"], "GuardReverted");
    assert!(
        condition(&st, "Converged")["message"]
            .as_str()
            .unwrap()
            .contains(&id),
        "{st:#}"
    );
    // Redefined: applied again.
    fx.write("hosts/web.yaml", &desired("Port 2200"));
    apply_json(&fx, &["--dispatch", "enforced"], 0);
    assert_eq!(
        fs::read_to_string(fx.root().join("sshd.conf")).unwrap(),
        "Port 2200\n"
    );
    assert_eq!(
        condition(&fx.status("web"), "Converged")["reason"],
        "Converged"
    );
}
