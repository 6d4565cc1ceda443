//! `validate(tree) -> DesiredState`, reporting every problem at once, each with
//! its `file:line:col`.
//!
//! The shell reads the desired-state directory into a [`SourceTree`] (bytes
//! only); this module decodes, parses, type-checks and cross-checks it.
//! Each mapping entry is checked on its own before the whole mapping, so one
//! bad key does not hide the next, and one bad resource does not hide another.
//!
//! Invariant: pure. No file system access: `files/` sources arrive as bytes in
//! the tree. The resulting [`DesiredState`] is sorted (hosts by name,
//! resources by id), so everything derived from it is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::spec::{
    CommandSpec, DirectorySpec, FileSpec, GroupSpec, InventoryHost, Lifecycle, PackageSpec,
    ResourceSpec, ServiceSpec, State, SymlinkSpec, TOKEN_TTL_CEILING, TendConfig, TransportKind,
    UserSpec,
};
use super::yaml::{self, LocError, Node, NodeKind, Pos};

/// Largest desired-state YAML file accepted.
pub const MAX_YAML_BYTES: u64 = 8 * 1024 * 1024;
/// Largest `files/` source accepted (content is held in memory and sent whole).
pub const MAX_SOURCE_BYTES: u64 = 64 * 1024 * 1024;

/// One file as the shell read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blob {
    Bytes(Vec<u8>),
    /// Not read: larger than the limit (size in bytes).
    TooLarge(u64),
    /// Could not be used (a symlink leaving `files/`, not a regular file, unreadable).
    Refused(String),
}

/// The key of `SourceTree::sources` that holds the refusal of `files/`
/// itself; no source can be named by it (an empty path is refused).
pub const FILES_ROOT_KEY: &str = "";

/// The desired-state directory as bytes. Paths are relative to it, with `/`.
#[derive(Clone, Debug, Default)]
pub struct SourceTree {
    /// `tend.yaml`, if present.
    pub tend: Option<Blob>,
    /// `inventory.yaml`, if present.
    pub inventory: Option<Blob>,
    /// `hosts/*`: file name -> content.
    pub hosts: BTreeMap<String, Blob>,
    /// `groups/*`: file name -> content.
    pub groups: BTreeMap<String, Blob>,
    /// `files/**`: path under `files/` -> content.
    pub sources: BTreeMap<String, Blob>,
}

/// A problem at a place in the desired state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// Path relative to the desired-state directory, e.g. `hosts/web-1.yaml`.
    pub file: String,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.pos, self.message)
    }
}

/// Resolved file content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub bytes: Arc<Vec<u8>>,
    pub sha256: String,
}

impl Content {
    pub fn new(bytes: Vec<u8>) -> Self {
        Content {
            sha256: super::sha256_hex(&bytes),
            bytes: Arc::new(bytes),
        }
    }
}

/// Where a resource was declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    /// Start of the resource's mapping.
    pub pos: Pos,
    /// The `path` or `name` value.
    pub key_pos: Pos,
    /// Each `requires` entry.
    pub requires_pos: Vec<Pos>,
    /// Each `restart_on` entry (services).
    pub restart_on_pos: Vec<Pos>,
    /// A file's `revert_after`, else its `guard`, else the mapping.
    pub guard_pos: Pos,
}

/// One validated resource of one host.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub id: String,
    pub spec: ResourceSpec,
    /// The content of a `file` (inline or from `files/`), when it has one.
    pub content: Option<Content>,
    pub origin: Origin,
    /// Set when this resource comes from `groups/<tag>.yaml`.
    pub from_group: Option<String>,
    /// Set when this host resource replaces a group resource with the same id.
    pub replaces_group: Option<String>,
    /// Applied by tend earlier and no longer declared: planned as a removal
    /// (see `prune`).
    pub pruned: bool,
    /// What the database recorded when tend last applied it (None: never,
    /// or not looked up).
    pub applied: Option<Applied>,
}

/// The record of a resource's last apply that drift policy needs (SPEC 8.7).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// `definition_digest` at that apply (None: before it was recorded).
    pub definition: Option<String>,
    /// Corrective applies in the trailing 60 minutes.
    pub corrections_last_hour: u32,
    /// Seconds since the last corrective apply, if any.
    pub last_correction_secs: Option<u64>,
    /// Contested and corrected less than one `resync` ago: not corrected
    /// again in this pass (SPEC 8.7).
    pub hold: bool,
    /// A connection guard reverted this very definition on the host (SPEC
    /// 8.7): held, not applied, until the definition changes.
    pub reverted: bool,
}

/// Corrective applies in the trailing hour that make a resource contested.
pub const CONTESTED_AT: u32 = 3;

impl Applied {
    /// Another manager changes it (SPEC 8.7).
    pub fn contested(&self) -> bool {
        self.corrections_last_hour >= CONTESTED_AT
    }
}

/// Which namespace a resource's key lives in: two resources may not share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeySpace {
    Path,
    Package,
    Service,
    User,
    Group,
    Command,
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        kind_name(&self.spec)
    }

    /// The path or name that this resource manages.
    pub fn key(&self) -> (KeySpace, &str) {
        match &self.spec {
            ResourceSpec::File(s) => (KeySpace::Path, &s.path),
            ResourceSpec::Directory(s) => (KeySpace::Path, &s.path),
            ResourceSpec::Symlink(s) => (KeySpace::Path, &s.path),
            ResourceSpec::Package(s) => (KeySpace::Package, &s.name),
            ResourceSpec::Service(s) => (KeySpace::Service, &s.name),
            ResourceSpec::User(s) => (KeySpace::User, &s.name),
            ResourceSpec::Group(s) => (KeySpace::Group, &s.name),
            ResourceSpec::Command(s) => (KeySpace::Command, &s.name),
        }
    }

    pub fn path(&self) -> Option<&str> {
        match self.key() {
            (KeySpace::Path, p) => Some(p),
            _ => None,
        }
    }

    /// `present` unless the resource says `state: absent`. Services and
    /// commands have no state.
    pub fn state(&self) -> State {
        match &self.spec {
            ResourceSpec::File(s) => s.state,
            ResourceSpec::Directory(s) => s.state,
            ResourceSpec::Symlink(s) => s.state,
            ResourceSpec::Package(s) => s.state,
            ResourceSpec::User(s) => s.state,
            ResourceSpec::Group(s) => s.state,
            ResourceSpec::Service(_) | ResourceSpec::Command(_) => State::Present,
        }
    }

    pub fn requires(&self) -> &[String] {
        match &self.spec {
            ResourceSpec::File(s) => &s.requires,
            ResourceSpec::Directory(s) => &s.requires,
            ResourceSpec::Symlink(s) => &s.requires,
            ResourceSpec::Package(s) => &s.requires,
            ResourceSpec::Service(s) => &s.requires,
            ResourceSpec::User(s) => &s.requires,
            ResourceSpec::Group(s) => &s.requires,
            ResourceSpec::Command(s) => &s.requires,
        }
    }

    /// `drift: report` (SPEC 8.7).
    pub fn drift_report(&self) -> bool {
        let d = match &self.spec {
            ResourceSpec::File(s) => s.drift,
            ResourceSpec::Directory(s) => s.drift,
            ResourceSpec::Symlink(s) => s.drift,
            ResourceSpec::Package(s) => s.drift,
            ResourceSpec::Service(s) => s.drift,
            ResourceSpec::User(s) => s.drift,
            ResourceSpec::Group(s) => s.drift,
            ResourceSpec::Command(s) => s.drift,
        };
        d == super::spec::DriftPolicy::Report
    }

    /// Applied before under this very definition: a change now corrects
    /// drift (corrective), rather than applying a new definition
    /// (intentional).
    pub fn applied_as_now(&self) -> bool {
        self.applied
            .as_ref()
            .and_then(|a| a.definition.as_deref())
            .is_some_and(|d| d == self.definition_digest())
    }

    /// `guard: connection` (SPEC 8.7): how long the host waits for tend to
    /// confirm a change before it restores the old file.
    pub fn guard(&self) -> Option<std::time::Duration> {
        match &self.spec {
            ResourceSpec::File(s) if s.guard.is_some() && !self.pruned => Some(
                s.revert_after
                    .map(|d| d.0)
                    .unwrap_or(super::spec::DEFAULT_REVERT_AFTER),
            ),
            _ => None,
        }
    }

    /// `sensitive: true` (SPEC 8.6): its content never reaches an output.
    pub fn sensitive(&self) -> bool {
        match &self.spec {
            ResourceSpec::File(s) => s.sensitive,
            ResourceSpec::Directory(s) => s.sensitive,
            ResourceSpec::Symlink(s) => s.sensitive,
            ResourceSpec::Package(s) => s.sensitive,
            ResourceSpec::Service(s) => s.sensitive,
            ResourceSpec::User(s) => s.sensitive,
            ResourceSpec::Group(s) => s.sensitive,
            ResourceSpec::Command(s) => s.sensitive,
        }
    }

    /// A digest of the whole desired definition (the spec and the file's
    /// content): what changes when the desired state changes this
    /// resource. Sealed for a sensitive resource (SPEC 8.6).
    pub fn definition_digest(&self) -> String {
        let mut bytes = serde_json::to_vec(&self.spec).unwrap_or_default();
        if let Some(c) = &self.content {
            bytes.push(0);
            bytes.extend_from_slice(c.sha256.as_bytes());
        }
        if self.sensitive() {
            super::seal(&bytes)
        } else {
            super::sha256_hex(&bytes)
        }
    }

    /// The definition as the database keeps it: for a sensitive resource,
    /// a file's inline content and a command's `run` and guards are
    /// replaced by their sealed digests (SPEC 8.6: tend.db keeps a hash,
    /// not the content).
    pub fn stored_spec(&self) -> ResourceSpec {
        let mut spec = self.spec.clone();
        if !self.sensitive() {
            return spec;
        }
        let seal = |t: &str| format!("(sensitive) {}", super::seal(t.as_bytes()));
        match &mut spec {
            ResourceSpec::File(s) => {
                s.content = s.content.as_deref().map(seal);
            }
            ResourceSpec::Command(s) => {
                s.run = seal(&s.run);
                s.unless = s.unless.as_deref().map(seal);
                s.creates = s.creates.as_deref().map(seal);
            }
            _ => {}
        }
        spec
    }

    fn explicit_id(&self) -> Option<&str> {
        match &self.spec {
            ResourceSpec::File(s) => s.id.as_deref(),
            ResourceSpec::Directory(s) => s.id.as_deref(),
            ResourceSpec::Symlink(s) => s.id.as_deref(),
            ResourceSpec::Package(s) => s.id.as_deref(),
            ResourceSpec::Service(s) => s.id.as_deref(),
            ResourceSpec::User(s) => s.id.as_deref(),
            ResourceSpec::Group(s) => s.id.as_deref(),
            ResourceSpec::Command(s) => s.id.as_deref(),
        }
    }
}

pub fn kind_name(spec: &ResourceSpec) -> &'static str {
    match spec {
        ResourceSpec::File(_) => "file",
        ResourceSpec::Directory(_) => "directory",
        ResourceSpec::Symlink(_) => "symlink",
        ResourceSpec::Package(_) => "package",
        ResourceSpec::Service(_) => "service",
        ResourceSpec::User(_) => "user",
        ResourceSpec::Group(_) => "group",
        ResourceSpec::Command(_) => "command",
    }
}

/// One host: its inventory entry and its merged resources.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub inv: InventoryHost,
    /// Its position in inventory.yaml.
    pub inv_index: usize,
    /// `hosts/<name>.yaml`, or None when the host file is missing (an error).
    pub file: Option<String>,
    pub lifecycle: Lifecycle,
    /// Host and group resources, merged, sorted by id.
    pub resources: Vec<Resource>,
    /// Services whose `restart_on` restart is owed (SPEC 8.3: a trigger
    /// succeeded, the restart did not), sorted; from the history, like
    /// prunes. Empty from validation.
    pub owed_restarts: Vec<String>,
    /// The host reached through `jump` (SPEC 8.9): the inventory entry of the
    /// jump host, or one made of `[user@]address[:port]` (named so, with the
    /// target's identity and no pinned key).
    pub jump: Option<Box<InventoryHost>>,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.inv.name
    }

    pub fn resource(&self, id: &str) -> Option<&Resource> {
        self.resources
            .binary_search_by(|r| r.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.resources[i])
    }
}

/// The validated desired state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    pub config: TendConfig,
    /// By host name.
    pub hosts: BTreeMap<String, Host>,
}

impl DesiredState {
    /// Host names in inventory order (the order rollout waves take them).
    pub fn inventory_order(&self) -> Vec<String> {
        let mut hosts: Vec<&Host> = self.hosts.values().collect();
        hosts.sort_by_key(|h| h.inv_index);
        hosts.into_iter().map(|h| h.inv.name.clone()).collect()
    }
}

/// What validation produced: a best-effort state and every problem found.
/// Nothing may be dispatched unless `problems` is empty.
#[derive(Clone, Debug)]
pub struct Validated {
    pub state: DesiredState,
    pub problems: Vec<Diagnostic>,
}

impl Validated {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Problems collected for one file.
struct Sink<'a> {
    file: &'a str,
    out: &'a mut Vec<Diagnostic>,
}

impl Sink<'_> {
    fn at(&mut self, pos: Pos, message: impl Into<String>) {
        self.out.push(Diagnostic {
            file: self.file.to_string(),
            pos,
            message: message.into(),
        });
    }

    fn loc(&mut self, e: LocError) {
        self.at(e.pos.unwrap_or(Pos::START), e.msg);
    }
}

/// Resources that were declared but could not be used: what refers to them
/// is not reported again as unknown, since the resource itself already was.
#[derive(Clone, Debug, Default)]
struct Rejected {
    ids: BTreeSet<String>,
    /// No resource of the file could be read (missing, empty or unparsable).
    all: bool,
}

impl Rejected {
    const ALL: Rejected = Rejected {
        ids: BTreeSet::new(),
        all: true,
    };

    fn covers(&self, id: &str) -> bool {
        self.all || self.ids.contains(id)
    }

    fn extend(&mut self, other: &Rejected) {
        self.all |= other.all;
        self.ids.extend(other.ids.iter().cloned());
    }
}

/// The id a resource declares, read from its raw mapping (for a resource
/// that did not parse).
fn declared_id(item: &Node) -> Option<String> {
    if let Some(id) = item.get("id").and_then(Node::as_str) {
        return Some(id.to_string());
    }
    let kind = item.get("kind")?.as_str()?;
    let key = item.get("path").or_else(|| item.get("name"))?.as_str()?;
    Some(format!("{kind}:{key}"))
}

/// Decode a blob into a YAML node. `Ok(None)` for an empty document.
fn load_yaml(blob: &Blob, sink: &mut Sink) -> Option<Option<Node>> {
    let bytes = match blob {
        Blob::Bytes(b) => b,
        Blob::TooLarge(n) => {
            sink.at(
                Pos::START,
                format!("file is too large ({n} bytes; the limit is {MAX_YAML_BYTES})"),
            );
            return None;
        }
        Blob::Refused(why) => {
            sink.at(Pos::START, why.clone());
            return None;
        }
    };
    if bytes.len() as u64 > MAX_YAML_BYTES {
        sink.at(
            Pos::START,
            format!(
                "file is too large ({} bytes; the limit is {MAX_YAML_BYTES})",
                bytes.len()
            ),
        );
        return None;
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            sink.at(
                Pos::START,
                format!(
                    "file is not valid UTF-8 (first bad byte at offset {})",
                    e.valid_up_to()
                ),
            );
            return None;
        }
    };
    // Duplicate keys do not end the parse: the rest of the file is checked too.
    match yaml::parse_all(text.strip_prefix('\u{feff}').unwrap_or(text)) {
        Ok((node, duplicates)) => {
            duplicates.into_iter().for_each(|e| sink.loc(e));
            Some(node)
        }
        Err(errors) => {
            errors.into_iter().for_each(|e| sink.loc(e));
            None
        }
    }
}

/// Check each entry of a mapping against `T` on its own (so every bad key is
/// reported), then the whole mapping (for missing fields).
///
/// Returns the value built from the entries that passed, when they make one,
/// and whether every entry passed. Callers run their semantic checks on that
/// value even when some entry was bad, so that one bad key does not hide a
/// problem in another; a value with a bad entry must not be used as valid.
fn typed<T: DeserializeOwned>(node: &Node, skip: &[&str], sink: &mut Sink) -> (Option<T>, bool) {
    let NodeKind::Map(entries) = &node.kind else {
        match yaml::from_node::<T>(node) {
            Ok(v) => return (Some(v), true),
            Err(e) => {
                sink.loc(e);
                return (None, false);
            }
        }
    };
    let mut good = Vec::with_capacity(entries.len());
    for entry in entries {
        if entry.0.as_str().is_some_and(|k| skip.contains(&k)) {
            good.push(entry.clone());
            continue;
        }
        let single = Node {
            kind: NodeKind::Map(vec![entry.clone()]),
            pos: node.pos,
        };
        match T::deserialize(yaml::NodeDe::new(&single)) {
            Err(e) if !e.msg.starts_with("missing field") => sink.loc(e),
            _ => good.push(entry.clone()),
        }
    }
    let clean = good.len() == entries.len();
    let partial = Node {
        kind: NodeKind::Map(good),
        pos: node.pos,
    };
    match T::deserialize(yaml::NodeDe::skipping(&partial, skip)) {
        Ok(v) => (Some(v), clean),
        Err(e) => {
            // With a bad entry left out, only a field that is really absent
            // is missing; one that is present but wrong was reported above.
            let absent = e
                .msg
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
                .is_some_and(|field| node.get(field).is_none());
            if clean || absent {
                sink.loc(LocError {
                    pos: e.pos.or(Some(node.pos)),
                    msg: e.msg,
                });
            }
            (None, false)
        }
    }
}

/// An IP address (v4, or v6 with an optional `%zone`) or a DNS name: what
/// the SSH transport can resolve, without brackets, a port, a user or
/// anything a log line or a command would need to quote.
fn is_address(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'%'))
}

/// `[a-z0-9][a-z0-9-]*`, at most 63 characters: an inventory host name
/// (and a tag).
pub fn is_host_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Why an absolute path is unacceptable, if it is.
pub fn path_problem(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return Some(format!("path `{p}` must be absolute"));
    }
    if p == "/" {
        return Some("refusing to manage `/` itself".into());
    }
    if p.contains('\0') {
        return Some("path contains a NUL byte".into());
    }
    let comps: Vec<&str> = p[1..].split('/').collect();
    if comps.contains(&"..") {
        return Some(format!("path `{p}` must not contain `..`"));
    }
    if comps.iter().any(|c| c.is_empty() || *c == ".") {
        let norm: Vec<&str> = comps
            .iter()
            .copied()
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        return Some(format!(
            "path `{p}` is not normalized; write `/{}`",
            norm.join("/")
        ));
    }
    None
}

/// Is `anc` a proper ancestor directory of `p` (both normalized absolute)?
pub fn is_ancestor(anc: &str, p: &str) -> bool {
    p.len() > anc.len() && p.starts_with(anc) && p.as_bytes()[anc.len()] == b'/'
}

/// The proper ancestors of a path that [`is_ancestor`] accepts, nearest
/// first: `/a/b/c` gives `/a/b`, `/a` (never `/` itself). Looking these up in
/// an index of paths finds every ancestor relation in time linear in the
/// number of paths times their depth.
pub fn ancestors(p: &str) -> impl Iterator<Item = &str> {
    let mut end = p.len();
    std::iter::from_fn(move || {
        let cut = p[..end].rfind('/')?;
        end = cut;
        (cut > 0).then(|| &p[..cut])
    })
}

fn is_account_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter().enumerate().all(|(i, c)| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || *c == b'_'
                || *c == b'-'
                || (*c == b'$' && i == b.len() - 1)
        })
}

fn is_owner_ref(s: &str) -> bool {
    is_account_name(s) || (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
}

fn is_package_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"+._-:@".contains(c))
}

fn is_unit_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":_.@-\\".contains(&c))
}

/// Unit types `systemctl` recognises by suffix; any other name gets `.service`.
const UNIT_TYPES: &[&str] = &[
    "service",
    "socket",
    "timer",
    "target",
    "path",
    "mount",
    "automount",
    "swap",
    "slice",
    "scope",
    "device",
];

/// The full unit name of a `service` resource's `name`, as `systemctl`
/// completes it: `nginx` is `nginx.service`, `nginx.socket` stays.
pub fn unit_name(name: &str) -> String {
    match name.rsplit_once('.') {
        Some((_, suffix)) if UNIT_TYPES.contains(&suffix) => name.to_string(),
        _ => format!("{name}.service"),
    }
}

/// A template unit without an instance (`getty@`, `getty@.service`):
/// systemd cannot load, start or enable it by that name.
fn is_bare_template(name: &str) -> bool {
    unit_name(name)
        .rsplit_once('.')
        .is_some_and(|(stem, _)| stem.ends_with('@'))
}

/// Directories systemd loads unit files from, most specific first.
pub const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// The unit whose unit file (`/etc/systemd/system/nginx.service`) or drop-in
/// (`/etc/systemd/system/nginx.service.d/x.conf`) is at `path`, if any; with
/// `true` for a unit file proper.
pub fn unit_of_file(path: &str) -> Option<(&str, bool)> {
    UNIT_DIRS.iter().find_map(|dir| {
        let rest = path.strip_prefix(dir)?.strip_prefix('/')?;
        match rest.split_once('/') {
            None => Some((rest, true)),
            Some((unit, conf)) => {
                let unit = unit.strip_suffix(".d")?;
                (!conf.contains('/') && conf.ends_with(".conf")).then_some((unit, false))
            }
        }
    })
}

/// Validate the desired-state tree.
pub fn validate(tree: &SourceTree) -> Validated {
    let mut problems = Vec::new();
    let sources = Sources::new(tree);

    // tend.yaml
    let mut config = TendConfig::default();
    let mut canary_pos = None;
    if let Some(blob) = &tree.tend {
        let mut sink = Sink {
            file: "tend.yaml",
            out: &mut problems,
        };
        if let Some(Some(node)) = load_yaml(blob, &mut sink) {
            canary_pos = Some(node.pos_of("canary"));
            // A partly bad tend.yaml still has its other settings checked.
            if let (Some(mut c), _) = typed::<TendConfig>(&node, &[], &mut sink) {
                check_config(&mut c, &node, &mut sink);
                config = c;
                check_trust_config(&config, &node, &mut sink);
            }
        }
    }

    // inventory.yaml
    let mut inventory: Vec<(InventoryHost, Pos)> = Vec::new();
    // Whether inventory.yaml gave a list of hosts to check host files and the
    // canary against: when it did not, that is reported once, not once per host.
    let mut inventory_ok = false;
    match &tree.inventory {
        None => problems.push(Diagnostic {
            file: "inventory.yaml".into(),
            pos: Pos::START,
            message: "inventory.yaml is missing: list the hosts under `hosts:`".into(),
        }),
        Some(blob) => {
            let mut sink = Sink {
                file: "inventory.yaml",
                out: &mut problems,
            };
            match load_yaml(blob, &mut sink) {
                None => {}
                Some(None) => sink.at(
                    Pos::START,
                    "inventory.yaml is empty: list the hosts under `hosts:`",
                ),
                Some(Some(node)) => {
                    if let Some(hosts) = load_inventory(&node, &mut sink) {
                        inventory = hosts;
                        inventory_ok = true;
                    }
                }
            }
        }
    }
    let inv_names: BTreeSet<&str> = inventory.iter().map(|(h, _)| h.name.as_str()).collect();

    if let (Some(canary), Some(pos)) = (&config.canary, canary_pos)
        && !inv_names.contains(canary.as_str())
        && inventory_ok
    {
        problems.push(Diagnostic {
            file: "tend.yaml".into(),
            pos,
            message: format!("canary `{canary}` is not a host in inventory.yaml"),
        });
    }

    // groups/<tag>.yaml
    let mut groups: BTreeMap<String, Vec<Resource>> = BTreeMap::new();
    // By file: resources declared there that were rejected.
    let mut rejected: BTreeMap<String, Rejected> = BTreeMap::new();
    for (fname, blob) in &tree.groups {
        let file = format!("groups/{fname}");
        let mut sink = Sink {
            file: &file,
            out: &mut problems,
        };
        let Some(tag) = fname.strip_suffix(".yaml") else {
            sink.at(
                Pos::START,
                "unexpected file: group files are named `<tag>.yaml`",
            );
            continue;
        };
        if !is_host_name(tag) {
            sink.at(
                Pos::START,
                format!("invalid tag `{tag}`: use [a-z0-9][a-z0-9-]*"),
            );
        }
        let mut gone = Rejected::ALL;
        match load_yaml(blob, &mut sink) {
            None => {}
            Some(None) => sink.at(Pos::START, "group file is empty"),
            Some(Some(node)) => {
                gone = Rejected::default();
                let (lifecycle, resources) =
                    load_resource_file(&node, &sources, &mut sink, Some(tag), &mut gone);
                if let Some((pos, _)) = lifecycle {
                    sink.at(
                        pos,
                        "`lifecycle` is set per host, in hosts/<host>.yaml, not in a group file",
                    );
                }
                groups.insert(tag.to_string(), resources);
            }
        }
        rejected.insert(file, gone);
    }

    // hosts/<host>.yaml
    let mut host_files: BTreeMap<String, (String, Lifecycle, Vec<Resource>)> = BTreeMap::new();
    for (fname, blob) in &tree.hosts {
        let file = format!("hosts/{fname}");
        let mut sink = Sink {
            file: &file,
            out: &mut problems,
        };
        let Some(name) = fname.strip_suffix(".yaml") else {
            sink.at(
                Pos::START,
                "unexpected file: host files are named `<host>.yaml`",
            );
            continue;
        };
        if !inv_names.contains(name) && inventory_ok {
            sink.at(
                Pos::START,
                format!("host file for `{name}` has no entry in inventory.yaml: add it there or remove this file"),
            );
        }
        let mut gone = Rejected::ALL;
        match load_yaml(blob, &mut sink) {
            None => {}
            Some(None) => sink.at(
                Pos::START,
                "host file is empty: write `resources: []` for a host with nothing to manage",
            ),
            Some(Some(node)) => {
                gone = Rejected::default();
                let (lifecycle, resources) =
                    load_resource_file(&node, &sources, &mut sink, None, &mut gone);
                host_files.insert(
                    name.to_string(),
                    (
                        file.clone(),
                        lifecycle.map(|(_, l)| l).unwrap_or_default(),
                        resources,
                    ),
                );
            }
        }
        rejected.insert(file, gone);
    }

    // Join inventory, host files and groups.
    let by_name: BTreeMap<String, InventoryHost> = inventory
        .iter()
        .map(|(h, _)| (h.name.clone(), h.clone()))
        .collect();
    let mut hosts = BTreeMap::new();
    for (inv_index, (inv, pos)) in inventory.into_iter().enumerate() {
        let name = inv.name.clone();
        let jump = inv
            .jump
            .as_deref()
            .and_then(|j| resolve_jump(j, &inv, &by_name))
            .map(Box::new);
        let has_file = tree.hosts.contains_key(&format!("{name}.yaml"));
        if !has_file {
            problems.push(Diagnostic {
                file: "inventory.yaml".into(),
                pos,
                message: format!("host `{name}` has no host file: create hosts/{name}.yaml"),
            });
        }
        let (file, lifecycle, own) = match host_files.remove(&name) {
            Some((f, l, r)) => (Some(f), l, r),
            None => (
                has_file.then(|| format!("hosts/{name}.yaml")),
                Lifecycle::Running,
                vec![],
            ),
        };
        let mut gone = rejected
            .get(&format!("hosts/{name}.yaml"))
            .cloned()
            .unwrap_or(Rejected::ALL);
        for tag in &inv.tags {
            if let Some(g) = rejected.get(&format!("groups/{tag}.yaml")) {
                gone.extend(g);
            }
        }
        let resources = merge_host(&name, &inv.tags, own, &groups, &mut problems);
        let host = Host {
            inv,
            inv_index,
            file,
            lifecycle,
            resources,
            owed_restarts: Vec::new(),
            jump,
        };
        check_host(&host, &gone, &mut problems);
        check_guards(&host, config.probe_timeout.0, &mut problems);
        hosts.insert(name, host);
    }

    problems.sort();
    problems.dedup();
    Validated {
        state: DesiredState { config, hosts },
        problems,
    }
}

/// The tend.yaml settings of the state dir's trust rules and retention
/// (SPEC 8.4, 8.5): `confirmers` names at most one group; history durations
/// are above zero, and destructive runs are kept at least as long as the
/// others; a relative `state_dir` does not lie inside `hosts/`, `groups/` or
/// `files/`, where its files would become desired state (an absolute one is
/// checked by the shell, which can resolve it).
fn check_trust_config(config: &TendConfig, node: &Node, sink: &mut Sink) {
    let groups = config.confirmers.iter().filter(|c| c.starts_with('@'));
    if groups.count() > 1 {
        sink.at(
            node.pos_of("confirmers"),
            "confirmers may name at most one `@group`: the confirm directory belongs to one group",
        );
    }
    if let Some(bad) = config
        .confirmers
        .iter()
        .find(|c| c.trim_start_matches('@').is_empty() || c.contains(['/', ':', ' ', '\0']))
    {
        sink.at(
            node.pos_of("confirmers"),
            format!("confirmers: `{bad}` is not a user name or `@group` name"),
        );
    }
    let history_pos = || node.get("history").map_or(Pos::START, |h| h.pos);
    let (keep, keep_destructive) = (config.history.keep.0, config.history.keep_destructive.0);
    if keep.is_zero() || keep_destructive.is_zero() {
        sink.at(
            history_pos(),
            "history: `keep` and `keep_destructive` must be above zero",
        );
    } else if keep_destructive < keep {
        sink.at(
            history_pos(),
            "history: `keep_destructive` must be at least `keep` (destructive runs are kept longer)",
        );
    }
    let sd = config.state_dir.trim();
    if !sd.starts_with('/') && !sd.starts_with("~/") {
        // Lexical: `a/../hosts/x` is inside hosts/; `../hosts/x` is not
        // inside the desired-state dir at all.
        let mut parts: Vec<&str> = Vec::new();
        let mut outside = false;
        for c in sd.split('/') {
            match c {
                "" | "." => {}
                ".." if parts.is_empty() => outside = true,
                ".." => {
                    parts.pop();
                }
                c if !outside => parts.push(c),
                _ => {}
            }
        }
        if let Some(first) = parts
            .first()
            .filter(|f| matches!(**f, "hosts" | "groups" | "files"))
        {
            sink.at(
                node.pos_of("state_dir"),
                format!(
                    "state_dir `{sd}` lies inside {first}/, which holds desired state: put it elsewhere (e.g. `.tend`)"
                ),
            );
        }
    }
}

/// Longest duration any setting may have. Every duration ends up added to
/// a clock reading or armed on a timer; a year keeps that arithmetic far
/// from overflow (`Instant + Duration` panics on overflow) and inside the
/// timer wheel, and no setting has a use for more.
pub const DURATION_CEILING: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
/// Most hosts worked on at once (as the schema says).
pub const CONCURRENCY_CEILING: u32 = 1024;
/// Most transient retries after the first attempt (as the schema says).
pub const RETRIES_CEILING: u32 = 10;

/// Check tend.yaml's values, and put the default back in place of every
/// value found wrong: a `TendConfig` that leaves validation, valid or not,
/// holds only values every consumer can use (the controller starts on the
/// settings of an invalid desired state, and must not panic on them).
fn check_config(config: &mut TendConfig, node: &Node, sink: &mut Sink) {
    let defaults = TendConfig::default();
    // Quote a value as written: humantime would render `48h` as `2days`.
    let written = |key: &str, d: std::time::Duration| {
        node.get(key)
            .and_then(Node::as_str)
            .map_or_else(|| humantime::format_duration(d).to_string(), str::to_string)
    };
    if config.token_max_ttl.0 > TOKEN_TTL_CEILING {
        sink.at(
            node.pos_of("token_max_ttl"),
            format!(
                "token_max_ttl `{}` is above the maximum of 24h: write at most `24h`",
                written("token_max_ttl", config.token_max_ttl.0)
            ),
        );
        config.token_max_ttl = defaults.token_max_ttl;
    }
    if config.concurrency == 0 || config.concurrency > CONCURRENCY_CEILING {
        sink.at(
            node.pos_of("concurrency"),
            format!("concurrency must be between 1 and {CONCURRENCY_CEILING}"),
        );
        config.concurrency = defaults.concurrency;
    }
    if config.retries > RETRIES_CEILING {
        sink.at(
            node.pos_of("retries"),
            format!("retries must be at most {RETRIES_CEILING}"),
        );
        config.retries = defaults.retries;
    }
    if config.crash_loop_threshold == 0 {
        sink.at(
            node.pos_of("crash_loop_threshold"),
            "crash_loop_threshold must be at least 1",
        );
        config.crash_loop_threshold = defaults.crash_loop_threshold;
    }
    if config.state_dir.trim().is_empty() {
        sink.at(node.pos_of("state_dir"), "state_dir must not be empty");
        config.state_dir = defaults.state_dir.clone();
    }
    // Every duration, whether zero is meaningful for it: a timeout of zero
    // could never succeed, a resync of zero would re-probe without pause,
    // and a token lifetime of zero refuses every token; a zero backoff,
    // quiet window or deferral only means "at once".
    let durations: [(
        &str,
        &mut super::spec::HumanDuration,
        bool,
        super::spec::HumanDuration,
    ); 7] = [
        (
            "probe_timeout",
            &mut config.probe_timeout,
            true,
            defaults.probe_timeout,
        ),
        (
            "step_timeout",
            &mut config.step_timeout,
            true,
            defaults.step_timeout,
        ),
        (
            "retry_backoff",
            &mut config.retry_backoff,
            false,
            defaults.retry_backoff,
        ),
        ("resync", &mut config.resync, true, defaults.resync),
        (
            "quiet_window",
            &mut config.quiet_window,
            false,
            defaults.quiet_window,
        ),
        (
            "max_defer",
            &mut config.max_defer,
            false,
            defaults.max_defer,
        ),
        (
            "token_max_ttl",
            &mut config.token_max_ttl,
            true,
            defaults.token_max_ttl,
        ),
    ];
    for (key, value, nonzero, default) in durations {
        if let Some(why) = duration_problem(key, value.0, nonzero, &written) {
            sink.at(node.pos_of(key), why);
            *value = default;
        }
    }
    check_rollout(config, node, sink);
}

/// `rollout:` (SPEC 8.2): at least one wave; a usable pause and health
/// check. A rollout with a problem is dropped (and reported): the desired
/// state is invalid, so nothing dispatches on it anyway.
fn check_rollout(config: &mut TendConfig, node: &Node, sink: &mut Sink) {
    let Some(r) = &config.rollout else { return };
    let Some(rn) = node.get("rollout") else {
        return;
    };
    let mut bad = false;
    if r.waves.is_empty() {
        sink.at(
            rn.pos_of("waves"),
            "rollout.waves must list at least one wave, e.g. `[1, 25%, 100%]`",
        );
        bad = true;
    }
    let written = |key: &str, d: std::time::Duration| {
        rn.get(key)
            .and_then(Node::as_str)
            .map_or_else(|| humantime::format_duration(d).to_string(), str::to_string)
    };
    if let Some(why) = duration_problem("rollout.pause", r.pause.0, false, &|_, d| {
        written("pause", d)
    }) {
        sink.at(rn.pos_of("pause"), why);
        bad = true;
    }
    if let Some(h) = &r.health {
        let hn = rn.get("health");
        let at = |key: &str| hn.map_or_else(|| rn.pos_of("health"), |n| n.pos_of(key));
        if h.command.trim().is_empty() {
            sink.at(at("command"), "rollout.health.command must not be empty");
            bad = true;
        }
        let hw = |key: &str, d: std::time::Duration| {
            hn.and_then(|n| n.get(key))
                .and_then(Node::as_str)
                .map_or_else(|| humantime::format_duration(d).to_string(), str::to_string)
        };
        if let Some(why) = duration_problem("rollout.health.timeout", h.timeout.0, true, &|_, d| {
            hw("timeout", d)
        }) {
            sink.at(at("timeout"), why);
            bad = true;
        }
    }
    if bad {
        config.rollout = None;
    }
}

/// Why a duration setting is unusable, if it is.
fn duration_problem(
    key: &str,
    d: std::time::Duration,
    nonzero: bool,
    written: &dyn Fn(&str, std::time::Duration) -> String,
) -> Option<String> {
    if nonzero && d.is_zero() {
        Some(format!("{key} must be above zero"))
    } else if d > DURATION_CEILING {
        Some(format!(
            "{key} `{}` is above the maximum of 365d: write at most `365d`",
            written(key, d)
        ))
    } else {
        None
    }
}

/// The hosts of inventory.yaml; None when it has no usable `hosts:` list.
fn load_inventory(node: &Node, sink: &mut Sink) -> Option<Vec<(InventoryHost, Pos)>> {
    let NodeKind::Map(entries) = &node.kind else {
        sink.at(node.pos, "expected a mapping with a `hosts:` list");
        return None;
    };
    for (k, _) in entries {
        if k.as_str() != Some("hosts") {
            sink.at(
                k.pos,
                format!(
                    "unknown field `{}`, expected `hosts`",
                    k.as_str().unwrap_or("")
                ),
            );
        }
    }
    let Some(list) = node.get("hosts") else {
        sink.at(node.pos, "missing field `hosts`");
        return None;
    };
    if !matches!(list.kind, NodeKind::Seq(_)) {
        sink.at(list.pos, "expected a list of hosts");
        return None;
    }
    let mut out: Vec<(InventoryHost, Pos)> = Vec::new();
    let mut names: BTreeMap<String, Pos> = BTreeMap::new();
    let mut endpoints: BTreeMap<(String, u16), String> = BTreeMap::new();
    let mut jumps: Vec<(String, String, Pos)> = Vec::new();
    for item in list.items() {
        // A host with a bad field is still a host: its name keeps its host
        // file from looking orphaned, and the rest of it is still checked.
        let (Some(h), clean) = typed::<InventoryHost>(item, &[], sink) else {
            continue;
        };
        let mut ok = true;
        if !is_host_name(&h.name) {
            sink.at(
                item.pos_of("name"),
                format!(
                    "invalid host name `{}`: use [a-z0-9][a-z0-9-]* (at most 63 characters)",
                    h.name
                ),
            );
            ok = false;
        } else if h.name == "fleet" {
            // status/fleet.json is the fleet summary.
            sink.at(
                item.pos_of("name"),
                "host name `fleet` is reserved (status/fleet.json is the fleet summary): choose another name",
            );
            ok = false;
        }
        if let Some(first) = names.get(&h.name) {
            sink.at(
                item.pos_of("name"),
                format!(
                    "duplicate host name `{}` (first at line {})",
                    h.name, first.line
                ),
            );
            continue;
        }
        names.insert(h.name.clone(), item.pos_of("name"));
        match h.transport {
            TransportKind::Ssh => match &h.address {
                None if item.get("address").is_none() => {
                    sink.at(
                        item.pos,
                        format!(
                            "missing field `address` (host `{}` uses transport ssh)",
                            h.name
                        ),
                    );
                    ok = false;
                }
                // Present but of the wrong type: already reported.
                None => ok = false,
                Some(a) if !is_address(a) => {
                    sink.at(
                        item.pos_of("address"),
                        format!(
                            "invalid address {a:?}: write an IP address or a DNS name (the port goes in `port`)"
                        ),
                    );
                    ok = false;
                }
                Some(a) => {
                    if h.port == 0 {
                        sink.at(item.pos_of("port"), "port must be between 1 and 65535");
                        ok = false;
                    }
                    let key = (a.to_ascii_lowercase(), h.port);
                    if let Some(other) = endpoints.get(&key)
                        // Not when the port may be a default standing in for
                        // a bad value: no duplicate claimed on a guess.
                        && clean
                    {
                        sink.at(
                            item.pos_of("address"),
                            format!("host `{}` has the same address and port ({a}:{}) as host `{other}`", h.name, h.port),
                        );
                        ok = false;
                    } else if clean {
                        endpoints.insert(key, h.name.clone());
                    }
                }
            },
            TransportKind::Local => {}
        }
        if let Some(k) = &h.host_key
            && !k.starts_with("SHA256:")
        {
            sink.at(
                item.pos_of("host_key"),
                format!("host_key `{k}` is not an OpenSSH SHA256 fingerprint (`SHA256:...`; see `ssh-keygen -lf`)"),
            );
            ok = false;
        }
        if let Some(i) = &h.identity
            && i.trim().is_empty()
        {
            sink.at(item.pos_of("identity"), "identity must not be empty");
            ok = false;
        } else if let Some(i) = &h.identity
            && i.contains(char::is_control)
        {
            // A NUL could never reach the file system, and a newline only
            // confuses every message that names the file.
            sink.at(
                item.pos_of("identity"),
                format!("identity {i:?} contains a control character"),
            );
            ok = false;
        }
        if h.user.is_empty() {
            sink.at(item.pos_of("user"), "user must not be empty");
            ok = false;
        } else if h
            .user
            .contains(|c: char| c.is_control() || c.is_whitespace())
        {
            sink.at(
                item.pos_of("user"),
                format!("user {:?} contains a space or a control character", h.user),
            );
            ok = false;
        }
        if h.transport == TransportKind::Local {
            for key in ["become", "jump"] {
                if item.get(key).is_some() {
                    sink.at(
                        item.pos_of(key),
                        format!("`{key}` applies to hosts reached over SSH; host `{}` uses transport local", h.name),
                    );
                    ok = false;
                }
            }
        }
        if let Some(j) = &h.jump {
            if j == &h.name {
                sink.at(
                    item.pos_of("jump"),
                    format!("host `{}` cannot be reached through itself", h.name),
                );
                ok = false;
            } else if !is_host_name(j) && parse_jump(j).is_none() {
                sink.at(
                    item.pos_of("jump"),
                    format!("invalid jump {j:?}: name a host of inventory.yaml, or write `[user@]address[:port]`"),
                );
                ok = false;
            } else {
                jumps.push((h.name.clone(), j.clone(), item.pos_of("jump")));
            }
        }
        if let Some(tags) = item.get("tags") {
            for (t, tnode) in h.tags.iter().zip(tags.items()) {
                if !is_host_name(t) {
                    sink.at(
                        tnode.pos,
                        format!("invalid tag `{t}`: use [a-z0-9][a-z0-9-]*"),
                    );
                    ok = false;
                }
            }
        }
        // Keep the host even when a field is wrong, so that its host file is
        // still checked; the problems above already make the state invalid.
        let _ = ok;
        out.push((h, item.pos));
    }
    check_jumps(&out, &jumps, sink);
    Some(out)
}

/// `jump` names (SPEC 8.9): an inventory host reached over SSH that is not
/// itself behind a jump, or an address. Chains are refused: each link
/// would be one more session to keep alive and one more host key to trust
/// for every host behind it, and a cycle could never connect.
fn check_jumps(hosts: &[(InventoryHost, Pos)], jumps: &[(String, String, Pos)], sink: &mut Sink) {
    let by_name: BTreeMap<&str, &InventoryHost> =
        hosts.iter().map(|(h, _)| (h.name.as_str(), h)).collect();
    for (name, j, pos) in jumps {
        match by_name.get(j.as_str()) {
            Some(via) if via.transport == TransportKind::Local => sink.at(
                *pos,
                format!("jump host `{j}` uses transport local; a jump host is reached over SSH"),
            ),
            Some(via) => match via.jump.as_deref() {
                Some(back) if back == name => sink.at(
                    *pos,
                    format!("jump cycle: `{name}` is reached through `{j}`, and `{j}` through `{name}`"),
                ),
                Some(next) => sink.at(
                    *pos,
                    format!("chains of jumps are not supported: jump host `{j}` is itself reached through `{next}`; reach `{name}` through `{next}` directly"),
                ),
                None => {}
            },
            None if is_host_name(j) && !j.contains('.') => sink.at(
                *pos,
                format!("jump `{j}` is not a host in inventory.yaml (write `[user@]address[:port]` for a host outside it)"),
            ),
            None => {}
        }
    }
}

/// `[user@]address[:port]`, address an IP, a DNS name or `[IPv6]`: (user,
/// address, port).
pub fn parse_jump(s: &str) -> Option<(Option<String>, String, u16)> {
    let (user, rest) = match s.rsplit_once('@') {
        Some((u, r)) => {
            if u.is_empty() || u.contains(|c: char| c.is_control() || c.is_whitespace() || c == '@')
            {
                return None;
            }
            (Some(u.to_string()), r)
        }
        None => (None, s),
    };
    let (addr, port) = if let Some(r) = rest.strip_prefix('[') {
        let (a, tail) = r.split_once(']')?;
        match tail {
            "" => (a, 22),
            t => (a, t.strip_prefix(':')?.parse::<u16>().ok()?),
        }
    } else if rest.matches(':').count() == 1 {
        let (a, p) = rest.split_once(':')?;
        (a, p.parse::<u16>().ok()?)
    } else {
        (rest, 22)
    };
    (port != 0 && is_address(addr)).then(|| (user, addr.to_string(), port))
}

/// The jump host of `inv`: its inventory entry, or one made of the address
/// form with the target's identity (host key from known_hosts).
fn resolve_jump(
    j: &str,
    inv: &InventoryHost,
    by_name: &BTreeMap<String, InventoryHost>,
) -> Option<InventoryHost> {
    if let Some(h) = by_name.get(j) {
        return Some(h.clone());
    }
    let (user, address, port) = parse_jump(j)?;
    Some(InventoryHost {
        name: j.to_string(),
        transport: TransportKind::Ssh,
        address: Some(address),
        port,
        user: user.unwrap_or_else(|| inv.user.clone()),
        identity: inv.identity.clone(),
        host_key: None,
        tags: vec![],
        protected: false,
        become_: None,
        jump: None,
    })
}

/// Parse a host or group file: `lifecycle` (with its position) and resources.
fn load_resource_file(
    node: &Node,
    tree: &Sources<'_>,
    sink: &mut Sink,
    group: Option<&str>,
    rejected: &mut Rejected,
) -> (Option<(Pos, Lifecycle)>, Vec<Resource>) {
    let NodeKind::Map(entries) = &node.kind else {
        sink.at(
            node.pos,
            "expected a mapping with `resources:` (and optionally `lifecycle:`)",
        );
        rejected.all = true;
        return (None, vec![]);
    };
    let mut lifecycle = None;
    let mut resources = Vec::new();
    let mut ids: BTreeMap<String, Pos> = BTreeMap::new();
    for (k, v) in entries {
        match k.as_str() {
            Some("lifecycle") => match yaml::from_node::<Lifecycle>(v) {
                Ok(l) => lifecycle = Some((k.pos, l)),
                Err(e) => sink.loc(e),
            },
            Some("resources") => {
                if v.is_null() {
                    continue;
                }
                if !matches!(v.kind, NodeKind::Seq(_)) {
                    sink.at(v.pos, "expected a list of resources");
                    rejected.all = true;
                    continue;
                }
                for item in v.items() {
                    let Some(r) = load_resource(item, tree, sink, group) else {
                        rejected.ids.extend(declared_id(item));
                        continue;
                    };
                    if let Some(first) = ids.get(&r.id) {
                        if item.get("id").is_some() {
                            sink.at(
                                item.pos_of("id"),
                                format!("duplicate resource id `{}` (first at line {}): rename one of them", r.id, first.line),
                            );
                        } else {
                            // A default id: the same kind and path or name
                            // twice, so the path or name is what to point at.
                            let (space, key) = r.key();
                            let what = if space == KeySpace::Path {
                                "path"
                            } else {
                                "name"
                            };
                            sink.at(
                                r.origin.key_pos,
                                format!("duplicate resource id `{}` (first at line {}): {what} `{key}` is declared twice; remove one", r.id, first.line),
                            );
                        }
                        continue;
                    }
                    ids.insert(r.id.clone(), item.pos);
                    resources.push(r);
                }
            }
            other => sink.at(
                k.pos,
                format!(
                    "unknown field `{}`, expected `lifecycle` or `resources`",
                    other.unwrap_or("")
                ),
            ),
        }
    }
    (lifecycle, resources)
}

fn load_resource(
    item: &Node,
    tree: &Sources<'_>,
    sink: &mut Sink,
    group: Option<&str>,
) -> Option<Resource> {
    if !matches!(item.kind, NodeKind::Map(_)) {
        sink.at(item.pos, "expected a resource mapping with a `kind:`");
        return None;
    }
    let Some(kind_node) = item.get("kind") else {
        sink.at(
            item.pos,
            format!(
                "missing field `kind` (one of {})",
                yaml::quote_list(ResourceSpec::KINDS)
            ),
        );
        return None;
    };
    // Counted before the typed parse: a resource with a bad entry still has
    // its other fields checked, but is not kept.
    let problems_before = sink.out.len();
    let skip = &["kind"];
    let spec = match kind_node.as_str() {
        Some("file") => ResourceSpec::File(typed::<FileSpec>(item, skip, sink).0?),
        Some("directory") => ResourceSpec::Directory(typed::<DirectorySpec>(item, skip, sink).0?),
        Some("symlink") => ResourceSpec::Symlink(typed::<SymlinkSpec>(item, skip, sink).0?),
        Some("package") => ResourceSpec::Package(typed::<PackageSpec>(item, skip, sink).0?),
        Some("service") => ResourceSpec::Service(typed::<ServiceSpec>(item, skip, sink).0?),
        Some("user") => ResourceSpec::User(typed::<UserSpec>(item, skip, sink).0?),
        Some("group") => ResourceSpec::Group(typed::<GroupSpec>(item, skip, sink).0?),
        Some("command") => ResourceSpec::Command(typed::<CommandSpec>(item, skip, sink).0?),
        Some(other) => {
            sink.at(
                kind_node.pos,
                format!(
                    "unknown kind `{other}`, expected one of {}",
                    yaml::quote_list(ResourceSpec::KINDS)
                ),
            );
            return None;
        }
        None => {
            sink.at(
                item.pos_of("kind"),
                format!(
                    "`kind` must be one of {}, found {}",
                    yaml::quote_list(ResourceSpec::KINDS),
                    kind_node.describe()
                ),
            );
            return None;
        }
    };
    let bad = |pos: Pos, msg: String, sink: &mut Sink| sink.at(pos, msg);
    let mut content = None;
    // Path checks and kind-specific checks.
    let check_path = |field: &str, p: &str, sink: &mut Sink| -> bool {
        if let Some(why) = path_problem(p) {
            sink.at(item.pos_of(field), why);
            return false;
        }
        true
    };
    let check_owner = |field: &str, v: &Option<String>, sink: &mut Sink| -> bool {
        match v {
            Some(o) if !is_owner_ref(o) => {
                sink.at(
                    item.pos_of(field),
                    format!("invalid {field} `{o}`: a user or group name, or a numeric id"),
                );
                false
            }
            _ => true,
        }
    };
    match &spec {
        ResourceSpec::File(s) => {
            check_path("path", &s.path, sink);
            check_owner("owner", &s.owner, sink);
            check_owner("group", &s.group, sink);
            match (&s.content, &s.source) {
                (Some(_), Some(_)) => bad(
                    item.pos_of("source"),
                    "give either `content` or `source`, not both".into(),
                    sink,
                ),
                (Some(c), None) => content = Some(Content::new(c.as_bytes().to_vec())),
                (None, Some(src)) => match tree.resolve(src) {
                    Ok(c) => content = Some(c),
                    Err(why) => bad(item.pos_of("source"), why, sink),
                },
                (None, None) => {}
            }
            if s.guard.is_some() && s.state.is_absent() {
                bad(
                    item.pos_of("guard"),
                    "`guard: connection` protects a write: a file with `state: absent` cannot be guarded"
                        .into(),
                    sink,
                );
            }
            if let Some(t) = s.revert_after {
                let written = |_: &str, d| {
                    item.get("revert_after")
                        .and_then(Node::as_str)
                        .map_or_else(|| humantime::format_duration(d).to_string(), str::to_string)
                };
                if s.guard.is_none() {
                    bad(
                        item.pos_of("revert_after"),
                        "`revert_after` needs `guard: connection` on the same file".into(),
                        sink,
                    );
                } else if t.0 < super::spec::MIN_REVERT_AFTER {
                    bad(
                        item.pos_of("revert_after"),
                        format!(
                            "revert_after `{}` is below the minimum of 30s: the host must have time to come back before it reverts",
                            written("revert_after", t.0)
                        ),
                        sink,
                    );
                } else if let Some(why) = duration_problem("revert_after", t.0, true, &written) {
                    bad(item.pos_of("revert_after"), why, sink);
                }
            }
        }
        ResourceSpec::Directory(s) => {
            check_path("path", &s.path, sink);
            check_owner("owner", &s.owner, sink);
            check_owner("group", &s.group, sink);
        }
        ResourceSpec::Symlink(s) => {
            check_path("path", &s.path, sink);
            match &s.target {
                None if !s.state.is_absent() && item.get("target").is_none() => bad(
                    item.pos,
                    "missing field `target` (required unless `state: absent`)".into(),
                    sink,
                ),
                Some(t) if t.is_empty() || t.contains('\0') => bad(
                    item.pos_of("target"),
                    "target must be a non-empty path without NUL bytes".into(),
                    sink,
                ),
                _ => {}
            }
        }
        ResourceSpec::Package(s) => {
            if !is_package_name(&s.name) {
                bad(
                    item.pos_of("name"),
                    format!("invalid package name `{}`", s.name),
                    sink,
                );
            }
        }
        ResourceSpec::Service(s) => {
            if !is_unit_name(&s.name) {
                bad(
                    item.pos_of("name"),
                    format!("invalid systemd unit name `{}`", s.name),
                    sink,
                );
            } else if is_bare_template(&s.name) {
                bad(
                    item.pos_of("name"),
                    format!(
                        "`{}` is a template unit: name an instance of it, such as `{}`",
                        s.name,
                        unit_name(&s.name).replacen("@.", "@main.", 1)
                    ),
                    sink,
                );
            }
        }
        ResourceSpec::User(s) => {
            if !is_account_name(&s.name) {
                bad(
                    item.pos_of("name"),
                    format!(
                        "invalid user name `{}`: use [a-z_][a-z0-9_-]* (at most 32)",
                        s.name
                    ),
                    sink,
                );
            }
            if let Some(h) = &s.home {
                check_path("home", h, sink);
            }
            if let Some(sh) = &s.shell {
                check_path("shell", sh, sink);
            }
            if let Some(gs) = item.get("groups") {
                for (g, gnode) in s.groups.iter().zip(gs.items()) {
                    if !is_account_name(g) {
                        bad(gnode.pos, format!("invalid group name `{g}`"), sink);
                    }
                }
            }
        }
        ResourceSpec::Group(s) => {
            if !is_account_name(&s.name) {
                bad(
                    item.pos_of("name"),
                    format!(
                        "invalid group name `{}`: use [a-z_][a-z0-9_-]* (at most 32)",
                        s.name
                    ),
                    sink,
                );
            }
        }
        ResourceSpec::Command(s) => {
            if s.name.trim().is_empty() {
                bad(
                    item.pos_of("name"),
                    "command name must not be empty".into(),
                    sink,
                );
            }
            if s.run.trim().is_empty() {
                bad(item.pos_of("run"), "`run` must not be empty".into(), sink);
            }
            // An empty check exits 0: the command would silently never run.
            if s.unless.as_deref().is_some_and(|u| u.trim().is_empty()) {
                bad(
                    item.pos_of("unless"),
                    "`unless` must not be empty: drop it, or write the check".into(),
                    sink,
                );
            }
            if let Some(c) = &s.creates {
                check_path("creates", c, sink);
            }
            if let Some(t) = s.timeout {
                let written = |_: &str, d| {
                    item.get("timeout")
                        .and_then(Node::as_str)
                        .map_or_else(|| humantime::format_duration(d).to_string(), str::to_string)
                };
                if let Some(why) = duration_problem("timeout", t.0, true, &written) {
                    bad(item.pos_of("timeout"), why, sink);
                }
            }
        }
    }
    let mut r = Resource {
        id: String::new(),
        spec,
        content,
        origin: Origin {
            file: sink.file.to_string(),
            pos: item.pos,
            key_pos: item.pos_of(if item.get("path").is_some() {
                "path"
            } else {
                "name"
            }),
            requires_pos: item
                .get("requires")
                .map(|n| n.items().iter().map(|i| i.pos).collect())
                .unwrap_or_default(),
            restart_on_pos: item
                .get("restart_on")
                .map(|n| n.items().iter().map(|i| i.pos).collect())
                .unwrap_or_default(),
            guard_pos: if item.get("revert_after").is_some() {
                item.pos_of("revert_after")
            } else {
                item.pos_of("guard")
            },
        },
        from_group: group.map(str::to_string),
        replaces_group: None,
        pruned: false,
        applied: None,
    };
    r.id = match r.explicit_id() {
        Some(id) if id.trim().is_empty() || id.chars().any(char::is_control) => {
            sink.at(item.pos_of("id"), "id must be non-empty and printable");
            return None;
        }
        Some(id) => id.to_string(),
        None => format!("{}:{}", r.kind(), r.key().1),
    };
    (sink.out.len() == problems_before).then_some(r)
}

/// `files/` as the resources of one validation see it: each source read
/// into a [`Content`] (and hashed) once, however many resources name it,
/// all of them sharing its bytes.
struct Sources<'a> {
    tree: &'a SourceTree,
    memo: std::cell::RefCell<BTreeMap<String, Result<Content, String>>>,
}

impl<'a> Sources<'a> {
    fn new(tree: &'a SourceTree) -> Self {
        Sources {
            tree,
            memo: Default::default(),
        }
    }

    fn resolve(&self, src: &str) -> Result<Content, String> {
        if let Some(r) = self.memo.borrow().get(src) {
            return r.clone();
        }
        let r = resolve_source(src, self.tree);
        self.memo.borrow_mut().insert(src.to_string(), r.clone());
        r
    }
}

fn resolve_source(src: &str, tree: &SourceTree) -> Result<Content, String> {
    if src.starts_with('/')
        || src
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty())
    {
        return Err(format!(
            "source `{src}` must be a relative path inside files/ without `..`"
        ));
    }
    match tree.sources.get(src) {
        // `files/` itself refused (it resolves outside the desired-state
        // dir): every source names that reason.
        None if let Some(Blob::Refused(why)) = tree.sources.get(FILES_ROOT_KEY) => {
            Err(format!("source files/{src}: {why}"))
        }
        None => Err(format!(
            "source `{src}` does not exist: expected files/{src}"
        )),
        Some(Blob::Bytes(b)) => Ok(Content::new(b.clone())),
        Some(Blob::TooLarge(n)) => Err(format!(
            "source files/{src} is too large ({n} bytes; the limit is {MAX_SOURCE_BYTES})"
        )),
        Some(Blob::Refused(why)) => Err(format!("source files/{src}: {why}")),
    }
}

/// Merge a host's own resources with those of its tags' groups.
fn merge_host(
    host: &str,
    tags: &[String],
    own: Vec<Resource>,
    groups: &BTreeMap<String, Vec<Resource>>,
    problems: &mut Vec<Diagnostic>,
) -> Vec<Resource> {
    let mut by_id: BTreeMap<String, Resource> = BTreeMap::new();
    let mut tags: Vec<&String> = tags.iter().collect();
    tags.sort();
    tags.dedup();
    let own_ids: BTreeSet<&str> = own.iter().map(|o| o.id.as_str()).collect();
    for tag in tags {
        for r in groups.get(tag.as_str()).into_iter().flatten() {
            if let Some(prev) = by_id.get(&r.id)
                && !own_ids.contains(r.id.as_str())
            {
                problems.push(Diagnostic {
                    file: r.origin.file.clone(),
                    pos: r.origin.pos,
                    message: format!(
                        "resource `{}` is defined by groups `{}` and `{tag}`, which both apply to host `{host}`: rename one, or override it in hosts/{host}.yaml",
                        r.id,
                        prev.from_group.as_deref().unwrap_or("?")
                    ),
                });
                continue;
            }
            by_id.insert(r.id.clone(), r.clone());
        }
    }
    for mut r in own {
        if let Some(g) = by_id.get(&r.id) {
            r.replaces_group = g.from_group.clone();
        }
        by_id.insert(r.id.clone(), r);
    }
    by_id.into_values().collect()
}

/// A guarded file's `revert_after` must leave tend time to probe the host
/// after the change (SPEC 8.7: more than `probe_timeout`).
fn check_guards(host: &Host, probe_timeout: std::time::Duration, problems: &mut Vec<Diagnostic>) {
    for r in &host.resources {
        if let Some(after) = r.guard()
            && after <= probe_timeout
        {
            problems.push(Diagnostic {
                file: r.origin.file.clone(),
                pos: r.origin.guard_pos,
                message: format!(
                    "revert_after `{}` must be more than probe_timeout `{}`: tend probes the host before it disarms the guard",
                    humantime::format_duration(after),
                    humantime::format_duration(probe_timeout)
                ),
            });
        }
    }
}

/// Cross-resource checks on one merged host. `rejected` ids are known to
/// exist but to be invalid (already reported), so references to them are
/// not unknown.
fn check_host(host: &Host, rejected: &Rejected, problems: &mut Vec<Diagnostic>) {
    let name = host.name();
    let mut push = |r: &Resource, pos: Pos, message: String| {
        problems.push(Diagnostic {
            file: r.origin.file.clone(),
            pos,
            message,
        });
    };
    // Two resources managing one path or name. Report the later one in file order.
    let mut by_key: BTreeMap<(KeySpace, &str), Vec<&Resource>> = BTreeMap::new();
    for r in &host.resources {
        by_key.entry(r.key()).or_default().push(r);
    }
    for ((space, key), mut rs) in by_key {
        if rs.len() < 2 {
            continue;
        }
        rs.sort_by(|a, b| (&a.origin.file, a.origin.pos).cmp(&(&b.origin.file, b.origin.pos)));
        let what = if space == KeySpace::Path {
            "path"
        } else {
            "name"
        };
        for r in &rs[1..] {
            push(
                r,
                r.origin.key_pos,
                format!(
                    "{what} `{key}` is already managed by `{}` on host `{name}`; one resource per {what}",
                    rs[0].id
                ),
            );
        }
    }
    // requires and restart_on must name resources of this host.
    for r in &host.resources {
        for (k, req) in r.requires().iter().enumerate() {
            let pos = r
                .origin
                .requires_pos
                .get(k)
                .copied()
                .unwrap_or(r.origin.pos);
            if *req == r.id {
                // dependency_edges leaves self-edges out, so find_cycle
                // cannot see this one-resource cycle.
                push(
                    r,
                    pos,
                    format!("dependency cycle on host `{name}`: {req} -> {req}"),
                );
            } else if host.resource(req).is_none() && !rejected.covers(req) {
                push(
                    r,
                    pos,
                    format!("`{}` requires unknown id `{req}` on host `{name}`", r.id),
                );
            }
        }
        if let ResourceSpec::Service(s) = &r.spec {
            for (k, t) in s.restart_on.iter().enumerate() {
                if host.resource(t).is_none() && !rejected.covers(t) {
                    let pos = r
                        .origin
                        .restart_on_pos
                        .get(k)
                        .copied()
                        .unwrap_or(r.origin.pos);
                    push(
                        r,
                        pos,
                        format!(
                            "service `{}` restarts on unknown id `{t}` on host `{name}`",
                            r.id
                        ),
                    );
                }
            }
        }
    }
    // A present path under a present file or symlink resource (it could
    // never exist), or inside a directory declared absent. Each path looks
    // up its own ancestors in an index of those resources' paths, so the
    // checks cost the number of resources times the path depth, not the
    // number of pairs of resources.
    let mut leaves: BTreeMap<&str, Vec<&Resource>> = BTreeMap::new();
    let mut absent_dirs: BTreeMap<&str, Vec<&Resource>> = BTreeMap::new();
    for r in &host.resources {
        match (&r.spec, r.path()) {
            (ResourceSpec::File(_) | ResourceSpec::Symlink(_), Some(p))
                if !r.state().is_absent() =>
            {
                leaves.entry(p).or_default().push(r)
            }
            (ResourceSpec::Directory(d), Some(p)) if d.state.is_absent() => {
                absent_dirs.entry(p).or_default().push(r)
            }
            _ => {}
        }
    }
    for r in &host.resources {
        let Some(p) = r.path().filter(|_| !r.state().is_absent()) else {
            continue;
        };
        for anc in ancestors(p) {
            for f in leaves.get(anc).into_iter().flatten() {
                push(
                    r,
                    r.origin.key_pos,
                    format!(
                        "`{}` is under `{anc}`, which `{}` manages as a {}, not a directory",
                        r.id,
                        f.id,
                        f.kind()
                    ),
                );
            }
            if absent_dirs.contains_key(anc) {
                push(
                    r,
                    r.origin.pos,
                    format!(
                        "`{}` is inside directory `{anc}`, which is declared absent",
                        r.id
                    ),
                );
            }
        }
    }
    // Dependency cycles.
    let edges = dependency_edges(&host.resources);
    if let Some(cycle) = find_cycle(&host.resources, &edges) {
        // Point at an explicit `requires` entry on the cycle when there is one:
        // that is the edge an operator wrote and can change.
        let mut at = (cycle[0], host.resources[cycle[0]].origin.pos);
        'find: for (k, &after) in cycle.iter().enumerate() {
            let before = cycle[(k + cycle.len() - 1) % cycle.len()];
            let r = &host.resources[after];
            for (j, req) in r.requires().iter().enumerate() {
                if *req == host.resources[before].id {
                    at = (
                        after,
                        r.origin
                            .requires_pos
                            .get(j)
                            .copied()
                            .unwrap_or(r.origin.pos),
                    );
                    break 'find;
                }
            }
        }
        let first = &host.resources[at.0];
        let names: Vec<&str> = cycle
            .iter()
            .chain(std::iter::once(&cycle[0]))
            .map(|&i| host.resources[i].id.as_str())
            .collect();
        push(
            first,
            at.1,
            format!("dependency cycle on host `{name}`: {}", names.join(" -> ")),
        );
    }
}

/// Why one resource must come before another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EdgeReason {
    Requires,
    ParentDirectory,
    GroupOfUser,
    Owner,
    PackageOfService,
    RestartTrigger,
    /// A unit file (or drop-in) before the service of that unit.
    UnitFile,
}

/// Ordering edges `(before, after, why)` between resources (indices into
/// `resources`), for resources as they are meant to exist. Deduplicated and
/// sorted. Removals run in the reverse direction (see `plan`).
pub fn dependency_edges(resources: &[Resource]) -> Vec<(usize, usize, EdgeReason)> {
    let index: BTreeMap<&str, usize> = resources
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut edges = BTreeSet::new();
    // Directories by path: each resource looks up its ancestors here.
    let mut dirs: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in resources.iter().enumerate() {
        if let (ResourceSpec::Directory(_), Some(p)) = (&r.spec, r.path()) {
            dirs.entry(p).or_default().push(i);
        }
    }
    let users: BTreeMap<&str, usize> = resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.spec {
            ResourceSpec::User(u) => Some((u.name.as_str(), i)),
            _ => None,
        })
        .collect();
    let groups: BTreeMap<&str, usize> = resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.spec {
            ResourceSpec::Group(g) => Some((g.name.as_str(), i)),
            _ => None,
        })
        .collect();
    // A numeric owner or group names the account with that id.
    let uids: BTreeMap<u32, usize> = resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.spec {
            ResourceSpec::User(u) => u.uid.map(|id| (id, i)),
            _ => None,
        })
        .collect();
    let gids: BTreeMap<u32, usize> = resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.spec {
            ResourceSpec::Group(g) => g.gid.map(|id| (id, i)),
            _ => None,
        })
        .collect();
    let by_id = |map: &BTreeMap<u32, usize>, s: &str| -> Option<usize> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse::<u32>().ok().and_then(|id| map.get(&id).copied())
        } else {
            None
        }
    };
    // Unit files and drop-ins by the unit they belong to.
    let mut unit_files: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in resources.iter().enumerate() {
        if let ResourceSpec::File(f) = &r.spec
            && let Some((unit, _)) = unit_of_file(&f.path)
        {
            unit_files.entry(unit).or_default().push(i);
        }
    }
    let packages: BTreeMap<&str, usize> = resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.spec {
            ResourceSpec::Package(p) => Some((p.name.as_str(), i)),
            _ => None,
        })
        .collect();
    for (i, r) in resources.iter().enumerate() {
        for req in r.requires() {
            if let Some(&j) = index.get(req.as_str())
                && j != i
            {
                edges.insert((j, i, EdgeReason::Requires));
            }
        }
        let own_path = match &r.spec {
            ResourceSpec::Command(c) => c.creates.as_deref(),
            _ => r.path(),
        };
        if let Some(p) = own_path {
            for anc in ancestors(p) {
                for &d in dirs.get(anc).into_iter().flatten() {
                    if d != i {
                        edges.insert((d, i, EdgeReason::ParentDirectory));
                    }
                }
            }
        }
        let (owner, group) = match &r.spec {
            ResourceSpec::File(s) => (s.owner.as_deref(), s.group.as_deref()),
            ResourceSpec::Directory(s) => (s.owner.as_deref(), s.group.as_deref()),
            _ => (None, None),
        };
        if let Some(u) = owner.and_then(|o| users.get(o).copied().or_else(|| by_id(&uids, o))) {
            edges.insert((u, i, EdgeReason::Owner));
        }
        if let Some(g) = group.and_then(|g| groups.get(g).copied().or_else(|| by_id(&gids, g))) {
            edges.insert((g, i, EdgeReason::Owner));
        }
        match &r.spec {
            ResourceSpec::User(u) => {
                // Its supplementary groups, and a group with its own name,
                // which `useradd` then takes as its primary group instead of
                // creating one (and which `groupadd` could not create after).
                let own = std::iter::once(&u.name);
                for g in u.groups.iter().chain(own) {
                    if let Some(&gi) = groups.get(g.as_str()) {
                        edges.insert((gi, i, EdgeReason::GroupOfUser));
                    }
                }
            }
            ResourceSpec::Service(s) => {
                let base = s.name.strip_suffix(".service").unwrap_or(&s.name);
                if let Some(&p) = packages.get(base) {
                    edges.insert((p, i, EdgeReason::PackageOfService));
                }
                for &f in unit_files
                    .get(unit_name(&s.name).as_str())
                    .into_iter()
                    .flatten()
                {
                    edges.insert((f, i, EdgeReason::UnitFile));
                }
                for t in &s.restart_on {
                    if let Some(&j) = index.get(t.as_str())
                        && j != i
                    {
                        edges.insert((j, i, EdgeReason::RestartTrigger));
                    }
                }
            }
            _ => {}
        }
    }
    edges.into_iter().collect()
}

/// A cycle in the graph, as resource indices in order, starting at the
/// smallest index on it; None when acyclic.
pub fn find_cycle(
    resources: &[Resource],
    edges: &[(usize, usize, EdgeReason)],
) -> Option<Vec<usize>> {
    let n = resources.len();
    let mut adj = vec![Vec::new(); n];
    for &(a, b, _) in edges {
        adj[a].push(b);
    }
    // Iterative DFS with colors: 0 white, 1 on stack, 2 done.
    let mut color = vec![0u8; n];
    for start in 0..n {
        if color[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        color[start] = 1;
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            if *next < adj[v].len() {
                let w = adj[v][*next];
                *next += 1;
                match color[w] {
                    0 => {
                        color[w] = 1;
                        stack.push((w, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|&(x, _)| x == w).expect("on stack");
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|&(x, _)| x).collect();
                        let min = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|&(_, &x)| x)
                            .map(|(i, _)| i)
                            .unwrap_or(0);
                        cycle.rotate_left(min);
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                color[v] = 2;
                stack.pop();
            }
        }
    }
    None
}

/// Content hash of the desired state (the revision when the directory is not
/// a git work tree): sha256 over every file's relative path and bytes.
pub fn content_hash(tree: &SourceTree) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut feed = |name: &str, blob: &Blob| {
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        match blob {
            Blob::Bytes(b) => {
                h.update([0]);
                h.update((b.len() as u64).to_be_bytes());
                h.update(b);
            }
            Blob::TooLarge(n) => {
                h.update([1]);
                h.update(n.to_be_bytes());
            }
            Blob::Refused(w) => {
                h.update([2]);
                h.update(w.as_bytes());
            }
        }
    };
    if let Some(b) = &tree.tend {
        feed("tend.yaml", b);
    }
    if let Some(b) = &tree.inventory {
        feed("inventory.yaml", b);
    }
    for (n, b) in &tree.hosts {
        feed(&format!("hosts/{n}"), b);
    }
    for (n, b) in &tree.groups {
        feed(&format!("groups/{n}"), b);
    }
    for (n, b) in &tree.sources {
        feed(&format!("files/{n}"), b);
    }
    super::hex(&h.finalize())
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
