//! Prune: what tend applied on a host before and what has since left the
//! desired state. Such resources are planned as removals (destructive, like
//! every delete), as if declared `state: absent`.
//!
//! Invariant: pure. The shell reads the managed-resource records from SQLite
//! and passes them in; a record that cannot be read back refuses the host's
//! plan rather than being silently forgotten (fail closed).

use serde_json::Value;

use super::model::{Host, Origin, Resource};
use super::spec::{
    CommandSpec, DirectorySpec, FileSpec, GroupSpec, PackageSpec, ResourceSpec, ServiceSpec,
    SymlinkSpec, UserSpec,
};
use super::yaml::Pos;

/// One resource tend recorded as applied on a host.
#[derive(Clone, Debug, PartialEq)]
pub struct Managed {
    pub id: String,
    pub spec: ResourceSpec,
    /// What drift policy needs of its last apply (SPEC 8.7).
    pub applied: super::model::Applied,
}

/// Read back a recorded spec (`{"kind": "file", ...}`).
pub fn spec_from_json(json: &str) -> Result<ResourceSpec, String> {
    let mut v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let kind = v
        .as_object_mut()
        .and_then(|o| o.remove("kind"))
        .and_then(|k| k.as_str().map(str::to_string))
        .ok_or("no `kind`")?;
    let e = |e: serde_json::Error| e.to_string();
    Ok(match kind.as_str() {
        "file" => ResourceSpec::File(serde_json::from_value::<FileSpec>(v).map_err(e)?),
        "directory" => {
            ResourceSpec::Directory(serde_json::from_value::<DirectorySpec>(v).map_err(e)?)
        }
        "symlink" => ResourceSpec::Symlink(serde_json::from_value::<SymlinkSpec>(v).map_err(e)?),
        "package" => ResourceSpec::Package(serde_json::from_value::<PackageSpec>(v).map_err(e)?),
        "service" => ResourceSpec::Service(serde_json::from_value::<ServiceSpec>(v).map_err(e)?),
        "user" => ResourceSpec::User(serde_json::from_value::<UserSpec>(v).map_err(e)?),
        "group" => ResourceSpec::Group(serde_json::from_value::<GroupSpec>(v).map_err(e)?),
        "command" => ResourceSpec::Command(serde_json::from_value::<CommandSpec>(v).map_err(e)?),
        other => return Err(format!("unknown kind `{other}`")),
    })
}

/// Where pruned resources say they come from.
pub const PRUNED_ORIGIN: &str = "(managed by tend, no longer in the desired state)";

/// The host with its pruned resources added: every managed resource whose id
/// is no longer declared, unless a declared resource now manages the same
/// path or name (that resource's own diff replaces it). Resources stay sorted
/// by id.
pub fn with_pruned(mut host: Host, managed: &[Managed]) -> Host {
    let mut added = Vec::new();
    for m in managed {
        // `resources` is sorted by id: a binary search, a linear one only
        // to confirm a miss (a host built out of order).
        let at = match host
            .resources
            .binary_search_by(|r| r.id.as_str().cmp(&m.id))
        {
            Ok(i) => Some(i),
            Err(_) => host.resources.iter().position(|r| r.id == m.id),
        };
        if let Some(i) = at {
            host.resources[i].applied = Some(m.applied.clone());
            continue;
        }
        let r = Resource {
            id: m.id.clone(),
            spec: m.spec.clone(),
            content: None,
            origin: Origin {
                file: PRUNED_ORIGIN.into(),
                pos: Pos::START,
                key_pos: Pos::START,
                requires_pos: vec![],
                restart_on_pos: vec![],
                guard_pos: Pos::START,
            },
            from_group: None,
            replaces_group: None,
            pruned: true,
            applied: None,
        };
        if host.resources.iter().any(|d| d.key() == r.key()) {
            continue;
        }
        added.push(r);
    }
    host.resources.extend(added);
    host.resources.sort_by(|a, b| a.id.cmp(&b.id));
    host
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Blob;
    use crate::core::model::{SourceTree, validate};

    fn host(yaml: &str) -> Host {
        let tree = SourceTree {
            inventory: Some(Blob::Bytes(
                b"hosts:\n  - name: h\n    transport: local\n".to_vec(),
            )),
            hosts: [("h.yaml".to_string(), Blob::Bytes(yaml.as_bytes().to_vec()))].into(),
            ..Default::default()
        };
        let v = validate(&tree);
        assert!(v.is_valid(), "{:?}", v.problems);
        v.state.hosts["h"].clone()
    }

    fn managed(json: &str) -> Managed {
        let spec = spec_from_json(json).unwrap();
        let id = format!(
            "{}:{}",
            crate::core::model::kind_name(&spec),
            match &spec {
                ResourceSpec::File(s) => s.path.clone(),
                ResourceSpec::Directory(s) => s.path.clone(),
                ResourceSpec::User(s) => s.name.clone(),
                _ => unreachable!(),
            }
        );
        Managed {
            id,
            spec,
            applied: Default::default(),
        }
    }

    #[test]
    fn specs_round_trip_through_json() {
        let h = host(
            "resources:\n  - kind: file\n    path: /a\n    content: x\n    mode: \"0600\"\n  - kind: user\n    name: u\n    groups: [g]\n",
        );
        for r in &h.resources {
            let json = serde_json::to_string(&r.spec).unwrap();
            assert_eq!(spec_from_json(&json).unwrap(), r.spec, "{json}");
        }
        assert!(spec_from_json("{\"kind\":\"widget\"}").is_err());
        assert!(spec_from_json("{\"path\":\"/a\"}").is_err());
        assert!(spec_from_json("not json").is_err());
    }

    #[test]
    fn only_what_left_the_desired_state_is_pruned() {
        let h = host(
            "resources:\n  - kind: file\n    path: /kept\n    content: x\n  - kind: directory\n    path: /now-a-dir\n",
        );
        let m = [
            managed("{\"kind\":\"file\",\"path\":\"/kept\",\"content\":\"x\"}"),
            managed("{\"kind\":\"file\",\"path\":\"/gone\",\"content\":\"x\"}"),
            // Same path, now declared as a directory: the directory's diff
            // replaces the file; no separate prune.
            managed("{\"kind\":\"file\",\"path\":\"/now-a-dir\"}"),
            managed("{\"kind\":\"user\",\"name\":\"olduser\"}"),
        ];
        let h = with_pruned(h, &m);
        let ids: Vec<(&str, bool)> = h
            .resources
            .iter()
            .map(|r| (r.id.as_str(), r.pruned))
            .collect();
        assert_eq!(
            ids,
            [
                ("directory:/now-a-dir", false),
                ("file:/gone", true),
                ("file:/kept", false),
                ("user:olduser", true),
            ]
        );
        assert_eq!(h.resource("file:/gone").unwrap().origin.file, PRUNED_ORIGIN);
    }
}
