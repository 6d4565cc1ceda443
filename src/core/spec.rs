//! The desired-state file formats (SPEC.md section 2): `tend.yaml`,
//! `inventory.yaml`, `hosts/<host>.yaml`, `groups/<tag>.yaml`.
//!
//! These types are a stability boundary: field names are the external
//! contract, and the JSON Schema printed by `tend schema` is derived from them.
//! Defaults live here (`#[serde(default)]`); semantic checks live in `model`.
//!
//! Invariant: plain data with serde and schemars derives; no I/O, no checks
//! beyond what a type can say.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// `tend.yaml`. Every key is optional.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
#[schemars(title = "tend.yaml")]
pub struct TendConfig {
    /// `off` plans only, `canary` dispatches to the canary host, `enforced` to every host.
    pub dispatch: DispatchMode,
    /// The one host that `canary` mode dispatches to.
    pub canary: Option<String>,
    /// Hosts worked on at once.
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: u32,
    /// Bounds connect, handshake and probe together, per attempt.
    pub probe_timeout: HumanDuration,
    /// Longest time one step may run.
    pub step_timeout: HumanDuration,
    /// Transient retries after the first attempt.
    #[schemars(range(max = 10))]
    pub retries: u32,
    /// First backoff between retries; doubles each retry.
    pub retry_backoff: HumanDuration,
    /// Periodic re-probe for drift.
    pub resync: HumanDuration,
    /// Debounce after the last desired-state change.
    pub quiet_window: HumanDuration,
    /// Longest a burst of changes can delay a reconcile.
    pub max_defer: HumanDuration,
    /// Longest lifetime a confirmation token may have (at most 24h).
    pub token_max_ttl: HumanDuration,
    /// Consecutive failed reconciles before a host is Degraded.
    #[schemars(range(min = 1))]
    pub crash_loop_threshold: u32,
    /// known_hosts file used to verify host keys that the inventory does not pin.
    pub known_hosts: String,
    /// State directory, relative to the desired-state directory.
    pub state_dir: String,
    /// Bytes of a step's stdout (and of its stderr) kept: past it, the
    /// first and the last half of it, with the count of bytes left out.
    #[schemars(range(min = 1024))]
    pub step_output_limit: u64,
    /// Who besides the user tend runs as may confirm: user names and at most
    /// one `@group`. With a group, the state dir is created 0750 and
    /// `confirm/` 1770 with that group.
    pub confirmers: Vec<String>,
    /// How long run history is kept.
    pub history: History,
    /// Roll a new desired revision out in waves, with one failure budget
    /// (dispatch mode `enforced` only).
    pub rollout: Option<RolloutSpec>,
}

/// `rollout:` in tend.yaml (SPEC 8.2).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Cumulative host counts or percentages of the rollout's hosts, e.g.
    /// `[1, 25%, 100%]`.
    pub waves: Vec<HostAmount>,
    /// Failed hosts the whole rollout may have (count or %); default 0.
    #[serde(default)]
    pub max_failures: HostAmount,
    /// Wait between waves; default 0s.
    #[serde(default = "zero_duration")]
    pub pause: HumanDuration,
    /// Run on each host of a wave after it converged; a non-zero exit or a
    /// timeout fails the host.
    #[serde(default)]
    pub health: Option<HealthSpec>,
}

fn zero_duration() -> HumanDuration {
    HumanDuration(Duration::ZERO)
}

/// `rollout.health`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// A sh script run on the host.
    pub command: String,
    /// How long it may run; default 30s.
    #[serde(default = "health_timeout")]
    pub timeout: HumanDuration,
}

fn health_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// A host count (`3`) or a percentage (`25%`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostAmount(pub super::rollout::Amount);

impl Default for HostAmount {
    fn default() -> Self {
        HostAmount(super::rollout::Amount::Count(0))
    }
}

impl<'de> Deserialize<'de> for HostAmount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        super::rollout::Amount::parse(&s)
            .map(HostAmount)
            .map_err(de::Error::custom)
    }
}

impl Serialize for HostAmount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            super::rollout::Amount::Count(c) => s.serialize_u64(c),
            super::rollout::Amount::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl JsonSchema for HostAmount {
    fn schema_name() -> Cow<'static, str> {
        "HostAmount".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A host count such as `3`, or a percentage such as `25%`.",
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^\\s*([0-9]+|([0-9]|[1-9][0-9]|100)%)\\s*$"}
            ]
        })
    }
}

/// `history:` in tend.yaml (SPEC 8.5).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct History {
    /// Runs older than this are removed (`runs/<id>/` and their records).
    pub keep: HumanDuration,
    /// Runs that ran or refused a destructive step, or used a token, are
    /// kept this long; so are the files in `confirm/used/`.
    pub keep_destructive: HumanDuration,
}

impl Default for History {
    fn default() -> Self {
        History {
            keep: HumanDuration(Duration::from_secs(30 * 86400)),
            keep_destructive: HumanDuration(Duration::from_secs(365 * 86400)),
        }
    }
}

impl Default for TendConfig {
    fn default() -> Self {
        let s = |secs| HumanDuration(Duration::from_secs(secs));
        TendConfig {
            dispatch: DispatchMode::Off,
            canary: None,
            concurrency: 16,
            probe_timeout: s(10),
            step_timeout: s(300),
            retries: 2,
            retry_backoff: s(1),
            resync: s(300),
            quiet_window: s(2),
            max_defer: s(10),
            token_max_ttl: s(3600),
            crash_loop_threshold: 5,
            known_hosts: "~/.ssh/known_hosts".into(),
            state_dir: ".tend".into(),
            step_output_limit: 1024 * 1024,
            confirmers: Vec::new(),
            history: History::default(),
            rollout: None,
        }
    }
}

/// Upper bound on `token_max_ttl`: a confirmation is for a change about to
/// happen, not a standing permission.
pub const TOKEN_TTL_CEILING: Duration = Duration::from_secs(24 * 3600);

#[derive(
    Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum DispatchMode {
    #[default]
    Off,
    Canary,
    Enforced,
}

impl DispatchMode {
    pub const NAMES: &'static [&'static str] = &["off", "canary", "enforced"];

    pub fn as_str(self) -> &'static str {
        match self {
            DispatchMode::Off => "off",
            DispatchMode::Canary => "canary",
            DispatchMode::Enforced => "enforced",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(DispatchMode::Off),
            "canary" => Some(DispatchMode::Canary),
            "enforced" => Some(DispatchMode::Enforced),
            _ => None,
        }
    }
}

impl fmt::Display for DispatchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A humantime duration such as `10s`, `5m`, `1h 30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration `{s}`: {e} (write e.g. `10s`, `5m`, `1h`)"
                ))
            })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as `500ms`, `10s`, `5m`, `1h 30m`.",
            "pattern": "^\\s*[0-9]+\\s*[a-zA-Z]+(\\s*[0-9]+\\s*[a-zA-Z]+)*\\s*$"
        })
    }
}

/// A permission mode, octal whether written `0644`, `644` or `"0644"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mode(pub u32);

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        // `0o` spells octal explicitly; bare digits must be a whole mode
        // (3 or 4 digits) so that `mode: 12` is not silently 0012.
        let (digits, min) = match s.strip_prefix("0o") {
            Some(d) => (d, 1),
            None => (s, 3),
        };
        if digits.len() < min
            || digits.len() > 4
            || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
        {
            return Err(format!(
                "invalid mode `{s}`: write 3 or 4 octal digits, such as `0644` or `0755`"
            ));
        }
        let v = u32::from_str_radix(digits, 8).expect("octal digits");
        if v > 0o7777 {
            return Err(format!("invalid mode `{s}`: above 07777"));
        }
        Ok(Mode(v))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal mode such as \"0644\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Mode, E> {
                Mode::parse(s).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Mode, E> {
                // JSON input: the digits as written are octal.
                Mode::parse(&n.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl JsonSchema for Mode {
    fn schema_name() -> Cow<'static, str> {
        "Mode".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Octal permission mode: `0644`, `\"0644\"` or `644`.",
            "anyOf": [
                {"type": "string", "pattern": "^(0o)?[0-7]{1,5}$"},
                {"type": "integer", "minimum": 0, "maximum": 7777}
            ]
        })
    }
}

/// `inventory.yaml`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
#[schemars(title = "inventory.yaml")]
pub struct InventorySpec {
    pub hosts: Vec<InventoryHost>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryHost {
    /// Host name: `[a-z0-9][a-z0-9-]*`, unique; also the name of its host file.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub name: String,
    /// `ssh` (default) or `local` (the machine tend runs on, no SSH).
    #[serde(default)]
    pub transport: TransportKind,
    /// IP address or DNS name; required for `transport: ssh`.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    /// Private key file; relative paths are relative to the desired-state dir.
    /// Without it, ssh-agent is used.
    #[serde(default)]
    pub identity: Option<String>,
    /// Pinned host key fingerprint in OpenSSH form (`SHA256:...`).
    #[serde(default)]
    pub host_key: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Destructive steps on this host are PolicyBlocked, token or not.
    #[serde(default)]
    pub protected: bool,
    /// `sudo`: run the probe and every batch as root through `sudo -n sh -s`
    /// (SPEC 8.9), for a non-root `user`.
    #[serde(default, rename = "become")]
    pub become_: Option<Become>,
    /// Reach the host through another host's SSH session: an inventory host
    /// name, or `[user@]address[:port]` (SPEC 8.9).
    #[serde(default)]
    pub jump: Option<String>,
}

/// How a non-root login becomes root on its host.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Become {
    /// `sudo -n sh -s`: no password prompt, no tty.
    Sudo,
}

fn default_port() -> u16 {
    22
}

fn default_user() -> String {
    "root".into()
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    #[default]
    Ssh,
    Local,
}

/// `hosts/<host>.yaml` and `groups/<tag>.yaml`. Read by `model` key by key so
/// that each resource is checked on its own.
#[derive(Clone, Debug, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
#[schemars(title = "host or group file")]
pub struct HostSpec {
    /// `running` (default), or `absent`: tear down every resource tend manages here.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    #[serde(default)]
    pub resources: Vec<ResourceSpec>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    #[default]
    Running,
    Absent,
}

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Deserialize,
    Serialize,
    JsonSchema,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Present,
    Absent,
}

impl State {
    pub fn is_absent(&self) -> bool {
        *self == State::Absent
    }
}

/// What tend does about a difference on the host (SPEC 8.7).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Correct it (the default).
    #[default]
    Correct,
    /// Apply only when absent, never applied, or redefined; otherwise
    /// report the difference and leave it.
    Report,
}

impl DriftPolicy {
    pub fn is_correct(&self) -> bool {
        *self == DriftPolicy::Correct
    }
}

/// One resource. Parsed by `model` per kind (so that errors keep their
/// positions); this enum carries the `kind` tag for the schema and for output.
#[derive(Clone, Debug, Serialize, JsonSchema, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ResourceSpec {
    File(FileSpec),
    Directory(DirectorySpec),
    Symlink(SymlinkSpec),
    Package(PackageSpec),
    Service(ServiceSpec),
    User(UserSpec),
    Group(GroupSpec),
    Command(CommandSpec),
}

impl ResourceSpec {
    pub const KINDS: &'static [&'static str] = &[
        "file",
        "directory",
        "symlink",
        "package",
        "service",
        "user",
        "group",
        "command",
    ];
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path, no `..`.
    pub path: String,
    /// Inline content (exclusive with `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A file under the desired-state `files/` directory (exclusive with `content`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Managed only when given; a new file gets 0644.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Keep this resource's content (a file's, old and new; a command's
    /// `run`, guards and output) out of every output, log, artifact, status
    /// document, HTTP response and the database (SPEC 8.6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `report`: a difference on the host under an unchanged definition is
    /// reported, not corrected (SPEC 8.7).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_correct")]
    pub drift: DriftPolicy,
    /// `connection`: a change to this file (sshd, network or firewall
    /// configuration) is reverted on the host unless tend can still connect
    /// and probe it afterwards (SPEC 8.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
    /// How long a guarded change waits for tend to confirm it before the
    /// host restores the old file (default 60s; at least 30s and more than
    /// `probe_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_after: Option<HumanDuration>,
}

/// What a guarded change must keep working (SPEC 8.7).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Guard {
    /// tend's own SSH connection to the host.
    Connection,
}

/// `revert_after` when not given.
pub const DEFAULT_REVERT_AFTER: Duration = Duration::from_secs(60);
/// The least `revert_after` accepted.
pub const MIN_REVERT_AFTER: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectorySpec {
    pub path: String,
    /// Managed only when given; a new directory gets 0755.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Keep this resource's content (a file's, old and new; a command's
    /// `run`, guards and output) out of every output, log, artifact, status
    /// document, HTTP response and the database (SPEC 8.6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `report`: a difference on the host under an unchanged definition is
    /// reported, not corrected (SPEC 8.7).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_correct")]
    pub drift: DriftPolicy,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SymlinkSpec {
    pub path: String,
    /// Where the link points; required unless `state: absent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default)]
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Keep this resource's content (a file's, old and new; a command's
    /// `run`, guards and output) out of every output, log, artifact, status
    /// document, HTTP response and the database (SPEC 8.6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `report`: a difference on the host under an unchanged definition is
    /// reported, not corrected (SPEC 8.7).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_correct")]
    pub drift: DriftPolicy,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PackageSpec {
    pub name: String,
    #[serde(default)]
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Keep this resource's content (a file's, old and new; a command's
    /// `run`, guards and output) out of every output, log, artifact, status
    /// document, HTTP response and the database (SPEC 8.6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `report`: a difference on the host under an unchanged definition is
    /// reported, not corrected (SPEC 8.7).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_correct")]
    pub drift: DriftPolicy,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// systemd unit name (`nginx` means `nginx.service`).
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "yes")]
    pub running: bool,
    /// Resource ids whose change in a run restarts this service once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Keep this resource's content (a file's, old and new; a command's
    /// `run`, guards and output) out of every output, log, artifact, status
    /// document, HTTP response and the database (SPEC 8.6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `report`: a difference on the host under an unchanged definition is
    /// reported, not corrected (SPEC 8.7).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_correct")]
    pub drift: DriftPolicy,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Supplementary groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default)]
    pub system: bool,
    #[serde(default)]
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Keep this resource's content (a file's, old and new; a command's
    /// `run`, guards and output) out of every output, log, artifact, status
    /// document, HTTP response and the database (SPEC 8.6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `report`: a difference on the host under an unchanged definition is
    /// reported, not corrected (SPEC 8.7).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_correct")]
    pub drift: DriftPolicy,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default)]
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Keep this resource's content (a file's, old and new; a command's
    /// `run`, guards and output) out of every output, log, artifact, status
    /// document, HTTP response and the database (SPEC 8.6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `report`: a difference on the host under an unchanged definition is
    /// reported, not corrected (SPEC 8.7).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_correct")]
    pub drift: DriftPolicy,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    pub name: String,
    /// POSIX sh script.
    pub run: String,
    /// Run only when this path does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creates: Option<String>,
    /// Run only when this sh check exits non-zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unless: Option<String>,
    /// A destructive command waits for a confirmation token.
    #[serde(default)]
    pub destructive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Keep this resource's content (a file's, old and new; a command's
    /// `run`, guards and output) out of every output, log, artifact, status
    /// document, HTTP response and the database (SPEC 8.6).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// `report`: a difference on the host under an unchanged definition is
    /// reported, not corrected (SPEC 8.7).
    #[serde(default, skip_serializing_if = "DriftPolicy::is_correct")]
    pub drift: DriftPolicy,
}

/// The JSON Schema of every desired-state file, one document with named
/// definitions: `TendConfig`, `InventorySpec`, `HostSpec`.
pub fn schema() -> serde_json::Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let tend = generator.subschema_for::<TendConfig>();
    let inventory = generator.subschema_for::<InventorySpec>();
    let host = generator.subschema_for::<HostSpec>();
    let defs = generator.take_definitions(true);
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://tend.dev/schema/v1.json",
        "title": "tend desired state",
        "description": "Any one tend desired-state file: tend.yaml, inventory.yaml, hosts/<host>.yaml or groups/<tag>.yaml. Each file kind is also a named definition under $defs.",
        "anyOf": [tend, inventory, host],
        "$defs": defs,
    })
}
