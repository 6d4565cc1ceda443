//! Probed host state as plain data: what the probe parser produces and what
//! `diff` compares the desired state against.
//!
//! Invariant: plain data; no I/O. Paths and link targets are bytes (a path may
//! hold any byte but NUL), shown lossily only for humans. Accounts, packages
//! and command guards are what the host's own tools reported (`getent`,
//! `id`, the package manager's query, `test -e` and the `unless` check).

use std::collections::BTreeMap;

use serde::Serialize;

/// Everything one probe learned about one host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostActual {
    pub facts: Facts,
    /// Keyed by resource id.
    pub resources: BTreeMap<String, Observed>,
    /// The tree digests of directories with a destructive step pending (SPEC
    /// 8.1), keyed by resource id: computed on the host only for the items
    /// the probe was asked to (a directory to remove, or a directory in the
    /// way of a file or symlink), and only when a directory is there.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub trees: BTreeMap<String, Tree>,
}

/// A digest of a directory's whole tree, as the probe computed it on the
/// host: every entry below the directory (its relative path, type, size and
/// mode), sorted, hashed. A file added deep inside changes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "tree", rename_all = "snake_case")]
pub enum Tree {
    Digest {
        /// Entries below the directory (the directory itself not counted).
        entries: u64,
        /// Lowercase hex sha256 of the sorted entry list.
        sha256: String,
    },
    /// More than [`TREE_LIMIT`] entries: not digested; its removal is
    /// `PolicyBlocked`.
    TooLarge,
    /// The host could not list the tree (the message says why); its removal
    /// is `PolicyBlocked`.
    Failed { message: String },
}

/// The most entries a tree digest covers (SPEC 8.1).
pub const TREE_LIMIT: u64 = 10_000;

/// Facts about the host that plans and capability checks need.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Facts {
    /// `uname -s`, e.g. `Linux`.
    pub kernel: Option<String>,
    /// `ID` from /etc/os-release, e.g. `debian`.
    pub os_id: Option<String>,
    /// `systemd` when systemd is the running init, else None.
    pub init: Option<String>,
    /// `apt`, `dnf` or `apk`: the first package manager found.
    pub package_manager: Option<String>,
    /// Tools the probe looked for and found on PATH (e.g. `sha256sum`, `stat`).
    pub tools: Vec<String>,
    /// The desired revision last applied to the host, as recorded beside
    /// the host lock (SPEC 8.1); None when none is recorded.
    pub revision: Option<String>,
}

/// The observed state of one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Observed {
    /// Nothing exists at the path; for a user or group, no such account;
    /// for a package, not installed (dpkg's `config-files` included).
    Absent,
    File(FileState),
    Directory(Meta),
    Symlink {
        /// The link target, as bytes (in JSON a string, or `{"hex": …}`
        /// when it is not UTF-8).
        #[serde(serialize_with = "text_or_hex")]
        target: Vec<u8>,
    },
    /// Something else exists at the path (socket, fifo, device).
    Other {
        file_type: String,
    },
    /// This version does not probe this kind of resource yet.
    NotProbed,
    /// A user account that exists.
    User(UserState),
    /// A group that exists.
    Group(GroupState),
    /// An installed package.
    Package(PackageState),
    /// A command's guard, evaluated on the host by the probe.
    Guard(GuardState),
    /// A systemd unit, as `systemctl show` reports it.
    Service(ServiceState),
}

/// A user account as `getent passwd` and `id -nG` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UserState {
    pub uid: u32,
    /// The primary group's id.
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// The primary group's name (its number when it has no name).
    pub primary_group: String,
    /// Supplementary groups, sorted, without the primary group.
    pub groups: Vec<String>,
}

/// A group as `getent group` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupState {
    pub gid: u32,
    /// Members listed in the group database (not users whose primary group it is).
    pub members: Vec<String>,
}

/// An installed package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PackageState {
    /// The installed version, when the manager's query reports one (apk's
    /// `info -e` does not); several installed instances (multiarch) are
    /// joined with `, `.
    pub version: Option<String>,
}

/// What a command's guard said on the host. `run` runs only when neither
/// guard holds: `creates` names a path that does not exist, and the `unless`
/// check exits non-zero. A command with neither guard always runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuardState {
    /// Will `run` run?
    pub will_run: bool,
    /// Whether the `creates` path exists (`test -e`); None without `creates`.
    pub creates_exists: Option<bool>,
    /// The exit status of the `unless` check; None without `unless`.
    pub unless_status: Option<u8>,
}

impl GuardState {
    pub fn new(creates_exists: Option<bool>, unless_status: Option<u8>) -> Self {
        GuardState {
            will_run: creates_exists != Some(true) && unless_status != Some(0),
            creates_exists,
            unless_status,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileState {
    #[serde(flatten)]
    pub meta: Meta,
    pub size: u64,
    /// Lowercase hex sha256 of the content.
    pub sha256: String,
}

/// Ownership and permission bits of a file or directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Meta {
    /// Permission bits (07777 mask); octal text in JSON.
    #[serde(serialize_with = "octal")]
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Owner name, or None when the uid has no name.
    pub owner: Option<String>,
    /// Group name, or None when the gid has no name.
    pub group: Option<String>,
}

/// The state of a systemd unit: four properties of `systemctl show`, verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceState {
    /// `Id`: the unit's full name (`nginx.service`; an alias resolves to its unit).
    pub unit: String,
    /// `LoadState`: `loaded`, `not-found`, `masked`, `bad-setting`, `error`, ...
    pub load_state: String,
    /// `ActiveState`: `active`, `inactive`, `failed`, `activating`, ...
    pub active_state: String,
    /// `UnitFileState`: `enabled`, `disabled`, `static`, `masked`, ...; empty
    /// when the unit has no unit file (not found, transient).
    pub unit_file_state: String,
}

impl ServiceState {
    /// Running, or on its way there (`activating` includes a unit waiting to
    /// be restarted by systemd): starting it again would change nothing.
    pub fn is_running(&self) -> bool {
        matches!(
            self.active_state.as_str(),
            "active" | "reloading" | "activating"
        )
    }

    /// Enabled for good: `enabled-runtime` lasts only until the next boot.
    pub fn is_enabled(&self) -> bool {
        self.unit_file_state == "enabled"
    }

    /// Units without an `[Install]` section (or made by a generator, or at
    /// run time) have no enablement of their own that `systemctl enable`
    /// could change; `enabled` is left alone for them.
    pub fn enablement_is_fixed(&self) -> bool {
        matches!(
            self.unit_file_state.as_str(),
            "static" | "indirect" | "generated" | "transient" | "alias"
        )
    }

    pub fn is_loaded(&self) -> bool {
        matches!(self.load_state.as_str(), "loaded" | "masked")
    }
}

fn text_or_hex<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    match std::str::from_utf8(b) {
        Ok(t) => s.serialize_str(t),
        Err(_) => {
            let mut m = s.serialize_map(Some(1))?;
            m.serialize_entry("hex", &crate::core::hex(b))?;
            m.end()
        }
    }
}

/// A mode as octal text, `0755`, as it is written in the desired state.
fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}
