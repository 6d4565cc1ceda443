//! What a confirmation token approves (SPEC 8.1): for each destructive step,
//! the destructive part of the step (`change`) and a fingerprint of the
//! object it acts on as the probe saw it (`observed`). The operation hash is
//! computed over these, not over the desired revision, so an approval means
//! "destroy exactly these objects, as they are now": a commit elsewhere
//! leaves it valid, a change on the host to an object to be destroyed voids
//! it (the barrier re-probe computes a fresh fingerprint).
//!
//! Fingerprint fields per kind:
//!
//! | kind | fields |
//! |---|---|
//! | file | `type`, `size`, `sha256`, `mode`, `uid`, `gid` |
//! | file, `sensitive: true` | `type`, `size`, `sealed` (keyed digest, SPEC 8.6), `mode`, `uid`, `gid` |
//! | directory | `type`, `mode`, `uid`, `gid`, `tree` {`entries`, `sha256`} |
//! | symlink | `type`, `target` (hex of its bytes) |
//! | special file | `type`, `file_type` |
//! | package | `type`, `version` |
//! | user | `type`, `uid`, `home` |
//! | group | `type`, `gid` |
//! | service | `type`, `unit_file_state`, `active` (`active` or `inactive`) |
//! | command | `type`, `definition_sha256` |
//! | command, `sensitive: true` | `type`, `definition_sealed` |
//!
//! Invariant: pure; nothing here reads the host. A directory whose tree the
//! probe could not digest (more than [`TREE_LIMIT`] entries, or a listing that
//! failed) gets a `blocked` reason, and policy blocks its removal.

use serde::Serialize;
use serde_json::{Value, json};

use super::actual::{Observed, TREE_LIMIT, Tree};
use super::diff::{Action, Change};
use super::model::Resource;
use super::spec::ResourceSpec;

/// The subject of an approval: one destructive step's change and object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Approval {
    /// The destructive part of the step: `delete`, `stop`, `disable`,
    /// `stop+disable`, `replace:file->symlink`, `run`.
    pub change: String,
    /// The object as probed (the fields of the module table).
    pub observed: Value,
    /// Why this step cannot be approved at all: its removal is
    /// `PolicyBlocked` with this reason, token or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

/// The approval subject of a destructive change, from the resource, what
/// the probe saw and (for a directory) its tree digest. None for a change
/// that is not destructive.
pub fn approval(
    r: &Resource,
    c: &Change,
    observed: &Observed,
    tree: Option<&Tree>,
) -> Option<Approval> {
    if !c.destructive {
        return None;
    }
    let mut blocked = None;
    let observed = object(r, observed, tree, &mut blocked);
    Some(Approval {
        change: change_word(r, c, observed.get("type").and_then(Value::as_str)),
        observed,
        blocked,
    })
}

/// The destructive part of a change, as one word (or `a+b`).
fn change_word(r: &Resource, c: &Change, observed_type: Option<&str>) -> String {
    match &r.spec {
        ResourceSpec::Service(_) => {
            let to = |field: &str, value: &str| {
                c.fields
                    .iter()
                    .any(|f| f.field == field && f.to.as_deref() == Some(value))
            };
            let mut parts = Vec::new();
            if to("running", "inactive") {
                parts.push("stop");
            }
            if to("enabled", "disabled") {
                parts.push("disable");
            }
            if parts.is_empty() {
                // A teardown of a unit with nothing to stop is a noop in
                // diff; this is never reached for a planned step.
                "delete".into()
            } else {
                parts.join("+")
            }
        }
        ResourceSpec::Command(_) => "run".into(),
        _ if c.replace => format!(
            "replace:{}->{}",
            observed_type.unwrap_or("nothing"),
            r.kind()
        ),
        _ => match c.action {
            Action::Delete => "delete".into(),
            other => other.as_str().into(),
        },
    }
}

fn mode(m: u32) -> String {
    format!("{m:04o}")
}

/// The fingerprint of the object a destructive step acts on.
fn object(r: &Resource, o: &Observed, tree: Option<&Tree>, blocked: &mut Option<String>) -> Value {
    match o {
        // A sensitive file's digest is sealed (SPEC 8.6): it still binds
        // the content, and a short secret cannot be guessed from it.
        Observed::File(f) if r.sensitive() => json!({
            "type": "file",
            "size": f.size,
            "sealed": super::seal(f.sha256.as_bytes()),
            "mode": mode(f.meta.mode),
            "uid": f.meta.uid,
            "gid": f.meta.gid,
        }),
        Observed::File(f) => json!({
            "type": "file",
            "size": f.size,
            "sha256": f.sha256,
            "mode": mode(f.meta.mode),
            "uid": f.meta.uid,
            "gid": f.meta.gid,
        }),
        Observed::Directory(m) => {
            let tree = match tree {
                Some(Tree::Digest { entries, sha256 }) => {
                    json!({"entries": entries, "sha256": sha256})
                }
                Some(Tree::TooLarge) => {
                    *blocked = Some(format!(
                        "the directory at `{}` holds more than {TREE_LIMIT} entries: too many to fingerprint for an approval; remove it by hand or in parts",
                        r.path().unwrap_or_default()
                    ));
                    Value::Null
                }
                Some(Tree::Failed { message }) => {
                    *blocked = Some(format!(
                        "the directory at `{}` could not be fingerprinted for an approval: {message}",
                        r.path().unwrap_or_default()
                    ));
                    Value::Null
                }
                None => {
                    // Fail closed: a directory to destroy without its tree
                    // digest cannot be approved (the probe was not asked for
                    // it, which is a bug, never a reason to go ahead).
                    *blocked = Some(format!(
                        "the directory at `{}` was probed without its tree digest; it cannot be approved",
                        r.path().unwrap_or_default()
                    ));
                    Value::Null
                }
            };
            json!({
                "type": "directory",
                "mode": mode(m.mode),
                "uid": m.uid,
                "gid": m.gid,
                "tree": tree,
            })
        }
        Observed::Symlink { target } => json!({
            "type": "symlink",
            "target": super::hex(target),
        }),
        Observed::Other { file_type } => json!({"type": "other", "file_type": file_type}),
        Observed::Package(p) => json!({"type": "package", "version": p.version}),
        Observed::User(u) => json!({"type": "user", "uid": u.uid, "home": u.home}),
        Observed::Group(g) => json!({"type": "group", "gid": g.gid}),
        Observed::Service(s) => json!({
            "type": "service",
            "unit_file_state": s.unit_file_state,
            "active": if s.is_running() { "active" } else { "inactive" },
        }),
        Observed::Guard(_) => {
            let definition = serde_json::to_vec(&r.spec).unwrap_or_default();
            if r.sensitive() {
                json!({"type": "command", "definition_sealed": super::seal(&definition)})
            } else {
                json!({
                    "type": "command",
                    "definition_sha256": super::sha256_hex(&definition),
                })
            }
        }
        Observed::Absent => json!({"type": "nothing"}),
        Observed::NotProbed => {
            *blocked = Some(format!("`{}` was not probed; it cannot be approved", r.id));
            json!({"type": "not_probed"})
        }
    }
}
