//! The fleet probe: ONE generated POSIX `sh` script per host that reports the
//! state of every resource at once ([`script`]), and a strict parser for what
//! it prints ([`parse`]).
//!
//! Invariant: pure; running the script is the transport's job. Every path goes
//! through [`crate::shell::quote`]. The parser accepts exactly the format
//! below and nothing else: truncated, garbled or foreign output is an error,
//! never a guess, because the caller must treat an ambiguous probe as a
//! failure and plan nothing destructive from it.
//!
//! # Output format (version 1)
//!
//! Line-based, `\n`-terminated, in this order:
//!
//! ```text
//! TEND-PROBE 1                          header
//! FACT kernel <uname -s, may be empty>
//! FACT os_id <ID from /etc/os-release, unquoted, may be empty>
//! FACT init <systemd when /run/systemd/system exists, else empty>
//! TOOL <name> yes|no                    once per name in TOOLS
//!
//! I <index> absent                      path items, in any order
//! I <index> file <mode> <uid> <gid> <size> <sha256>
//! U <index> <owner name, rest of line; UNKNOWN when the uid has none>
//! G <index> <group name, rest of line; UNKNOWN when the gid has none>
//! I <index> dir <mode> <uid> <gid>
//! U <index> <owner>
//! G <index> <group>
//! I <index> link <target bytes as lowercase hex>
//! I <index> other <file type as `stat -c %F` says, e.g. fifo>
//! I <index> error <what failed>
//! T <index> digest <entries> <sha256>   a path item asked for its tree
//! T <index> large                       (`ProbeItem::tree`) and seen to be a
//! T <index> error <what failed>         directory: after every `I` line
//!
//! PASSWD <status>                       when there are user items: ONE
//! PW <name>:<pw>:<uid>:<gid>:<gecos>:<home>:<shell>   `getent passwd u1 u2 ...`
//! ID <name> <group> <group> ...         (its exit status, then one PW line per
//!                                       user found, each followed by that
//!                                       user's `id -nG`, primary group first)
//! GROUP <status>                        when there are group items: ONE
//! GR <name>:<pw>:<gid>:<member,member>  `getent group g1 g2 ...`
//! PKG <manager> <status>                when there are package items: ONE query
//! PK <line of the manager's query>      of the host's manager (below)
//!
//! S <index> Id=<unit>                   service items: ONE `systemctl show`
//! S <index> LoadState=<state>           for every unit; exactly these four
//! S <index> ActiveState=<state>         lines per service, in any order
//! S <index> UnitFileState=<state>       (see [`service`])
//! I <index> error <what failed>         instead, when systemctl refused it
//!
//! I <index> guard <creates> <unless>    command items: `exists`, `missing` or
//!                                       `-` (no `creates`); the `unless`
//!                                       check's exit status, or `-`
//! END <item count>                      trailer
//! ```
//!
//! `<index>` is the item's position in the slice given to [`script`]; modes are
//! octal (`stat -c %a`), other numbers decimal. A `file` or `dir` line is
//! followed directly by its `U` and `G` lines, which carry the names on lines
//! of their own so that a name with a space cannot shift other fields. Link
//! targets are hex because they may hold any byte, newlines included.
//!
//! Accounts and packages are asked about in one batch per database, so their
//! lines carry names, not indices: every `PW`, `GR` and `PK` line must name
//! an item of its section (a user, group or package the probe asked about),
//! and each section's lines follow its header directly. `getent` exits 0 when
//! it found every name and 2 when it missed one; a missed name is absent.
//! Any other status, or a status that contradicts the lines, is an error.
//!
//! The package query depends on the manager (the first of `apt-get`, `dnf`,
//! `apk` on PATH, the same as the `package_manager` fact):
//!
//! - `apt`: `dpkg-query -W -f '${Package}\t${Status}\t${Version}\n' p1 p2 ...`
//!   (status 0, or 1 when a name is unknown to dpkg). `PK` lines are
//!   `<package>\t<want> <flag> <state>\t<version>`; a package is installed
//!   when its state is `installed`, `triggers-awaited` or `triggers-pending`,
//!   absent when `not-installed` or `config-files`; a half-installed,
//!   unpacked or half-configured package refuses the host (repair it first).
//!   An item named `name:arch` matches the lines of `name`.
//! - `dnf`: `rpm -q --qf '%{NAME}\t%{VERSION}-%{RELEASE}\n' p1 p2 ...`: `PK`
//!   lines are `<name>\t<version>` or `package <name> is not installed`;
//!   every name must be reported.
//! - `apk`: `apk info -e p1 p2 ...`: `PK` lines are the names of the
//!   installed packages (no version); a name not listed is absent.
//!
//! Services are asked about in one batch too, but systemctl prints one block
//! of properties per unit in argument order, so the script tags each line
//! with its item's index; the values are verbatim (`UnitFileState` may be
//! empty: a unit without a unit file). An `S` line for an item that is not a
//! service, an unknown or repeated property, or an incomplete set is an
//! error.
//!
//! The `unless` check runs in the probe, with `sh -c`, stdin from /dev/null
//! and its output discarded, so that `plan` says truthfully whether `run`
//! will run. It runs on every probe (`probe` and `plan` too): it must be a
//! read-only check.
//!
//! # Missing tools
//!
//! The script reports which of [`TOOLS`] are on the host's PATH. When a tool
//! that the probe or the host's resources need is missing ([`PATH_TOOLS`] for
//! paths, [`USER_TOOLS`], [`GROUP_TOOLS`], [`COMMAND_TOOLS`],
//! [`SERVICE_TOOLS`], and the manager's own tools for packages), [`parse`]
//! returns [`ProbeParseError::MissingTools`] before looking at any item
//! (whose lines are then meaningless); package items on a host without a
//! package manager give [`ProbeParseError::NoPackageManager`], and service
//! items on a host not running systemd (no `/run/systemd/system`)
//! [`ProbeParseError::NoSystemd`]. [`ProbeParseError::class`] maps those to
//! `Capability`, and every other parse error to `Execution`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::core::actual::{
    Facts, FileState, GroupState, GuardState, HostActual, Meta, Observed, PackageState, TREE_LIMIT,
    Tree, UserState,
};
use crate::core::retry::FailureClass;
use crate::shell::quote;

/// The first line of every probe's output; the number is the format version.
pub const HEADER: &str = "TEND-PROBE 1";

/// Tools the probe looks for on the host's PATH.
pub const TOOLS: &[&str] = &[
    "stat",
    "sha256sum",
    "od",
    "readlink",
    "tr",
    // Package managers (the first found is the host's) and their queries.
    "apt-get",
    "dnf",
    "apk",
    "dpkg-query",
    "rpm",
    "systemctl",
    // Accounts.
    "getent",
    "id",
    "useradd",
    "usermod",
    "userdel",
    "groupadd",
    "groupmod",
    "groupdel",
    // Commands run under it.
    "timeout",
];

/// The tools that probing paths needs.
pub const PATH_TOOLS: &[&str] = &["stat", "sha256sum", "od", "readlink", "tr"];
/// The tools that probing and converging users needs.
pub const USER_TOOLS: &[&str] = &["getent", "id", "useradd", "usermod", "userdel"];
/// The tools that probing and converging groups needs.
pub const GROUP_TOOLS: &[&str] = &["getent", "groupadd", "groupmod", "groupdel"];
/// The tools that running commands needs.
pub const COMMAND_TOOLS: &[&str] = &["timeout"];
/// The tools that probing and converging services needs.
pub const SERVICE_TOOLS: &[&str] = &["systemctl"];

mod service;

/// The tools a package manager's probe and steps need, by the name the
/// `package_manager` fact gives it.
fn package_tools(manager: &str) -> &'static [&'static str] {
    match manager {
        "apt" => &["apt-get", "dpkg-query"],
        "dnf" => &["dnf", "rpm"],
        "apk" => &["apk"],
        _ => &[],
    }
}

/// What to look at on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeTarget {
    /// The state of this absolute path, not following a symlink at the path.
    Path(String),
    /// The user account with this name.
    User(String),
    /// The group with this name.
    Group(String),
    /// The package with this name, per the host's package manager.
    Package(String),
    /// A command's guards: whether `creates` exists, and the exit status of
    /// the `unless` check.
    Command {
        creates: Option<String>,
        unless: Option<String>,
    },
    /// The state of this systemd unit (`nginx` means `nginx.service`).
    Service(String),
}

/// One thing to probe, under the id of the resource that asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeItem {
    /// Resource id; the key of the result in [`HostActual::resources`].
    pub key: String,
    pub target: ProbeTarget,
    /// A path item: when a directory is at the path, digest its whole tree
    /// too (SPEC 8.1: a directory with a destructive step pending).
    pub tree: bool,
    /// A path item whose regular file may be hashed from the host's hash
    /// cache ([`HashCache`]): only a file that is desired present, so the
    /// fingerprint of an object to be destroyed never comes from the cache.
    pub cacheable: bool,
}

impl ProbeItem {
    pub fn path(key: impl Into<String>, path: impl Into<String>) -> Self {
        ProbeItem {
            key: key.into(),
            target: ProbeTarget::Path(path.into()),
            tree: false,
            cacheable: false,
        }
    }

    /// This path item, letting a regular file there be hashed from the
    /// host's hash cache.
    pub fn cacheable(mut self) -> Self {
        self.cacheable = matches!(self.target, ProbeTarget::Path(_));
        self
    }

    /// This path item, asking also for the tree digest of a directory there.
    pub fn with_tree(mut self) -> Self {
        self.tree = matches!(self.target, ProbeTarget::Path(_));
        self
    }

    pub fn user(key: impl Into<String>, name: impl Into<String>) -> Self {
        ProbeItem {
            key: key.into(),
            target: ProbeTarget::User(name.into()),
            tree: false,
            cacheable: false,
        }
    }

    pub fn group(key: impl Into<String>, name: impl Into<String>) -> Self {
        ProbeItem {
            key: key.into(),
            target: ProbeTarget::Group(name.into()),
            tree: false,
            cacheable: false,
        }
    }

    pub fn package(key: impl Into<String>, name: impl Into<String>) -> Self {
        ProbeItem {
            key: key.into(),
            target: ProbeTarget::Package(name.into()),
            tree: false,
            cacheable: false,
        }
    }

    pub fn command(
        key: impl Into<String>,
        creates: Option<String>,
        unless: Option<String>,
    ) -> Self {
        ProbeItem {
            key: key.into(),
            target: ProbeTarget::Command { creates, unless },
            tree: false,
            cacheable: false,
        }
    }

    pub fn service(key: impl Into<String>, unit: impl Into<String>) -> Self {
        ProbeItem {
            key: key.into(),
            target: ProbeTarget::Service(unit.into()),
            tree: false,
            cacheable: false,
        }
    }
}

/// Everything before the items: header, facts, tools, and the function `p`
/// that reports one path. `p INDEX PATH` tests `-L` first so that a symlink
/// at the path is reported, not followed; `stat` runs without `-L` for the
/// same reason. No `set -e`: one unreadable path must not hide the others.
const PRELUDE: &str = r#"export LC_ALL=C
echo 'TEND-PROBE 1'
k=
{ read -r k < /proc/sys/kernel/ostype; } 2>/dev/null || k=$(uname -s 2>/dev/null)
printf 'FACT kernel %s\n' "$k"
o=
if [ -r /etc/os-release ]; then
  while IFS= read -r l || [ -n "$l" ]; do
    case $l in ID=*) o=${l#ID=} ;; esac
  done < /etc/os-release
fi
o=${o#[\"\']}; o=${o%[\"\']}
printf 'FACT os_id %s\n' "$o"
if [ -d /run/systemd/system ]; then echo 'FACT init systemd'; else echo 'FACT init '; fi
@LOCKDIR@
@READREV@
printf 'FACT revision %s\n' "$tend_r"
for t in @TOOLS@; do
  if command -v "$t" >/dev/null 2>&1; then echo "TOOL $t yes"; else echo "TOOL $t no"; fi
done
p() {
  if [ -L "$2" ]; then
    printf 'I %s link %s\n' "$1" "$(readlink -n -- "$2" | od -An -tx1 -v | tr -d ' \n')"
  elif [ -f "$2" ]; then
    if h=$(sha256sum < "$2"); then
      stat -c "I $1 file %a %u %g %s ${h%% *}
U $1 %U
G $1 %G" -- "$2" || echo "I $1 error stat failed"
    else
      echo "I $1 error sha256sum failed"
    fi
  elif [ -d "$2" ]; then
    stat -c "I $1 dir %a %u %g
U $1 %U
G $1 %G" -- "$2" || echo "I $1 error stat failed"
  elif [ -e "$2" ]; then
    stat -c "I $1 other %F" -- "$2" || echo "I $1 error stat failed"
  else
    echo "I $1 absent"
  fi
}
"#;

/// `tend_hash FILE...` sets `H` to the files' hashes, one line each, in
/// order (`sha256sum` lines: only the first word is read). Without the
/// cache: one `sha256sum` for all.
const HASH_PLAIN: &str = r#"tend_hash() { H=$(sha256sum -- "$@"); }
"#;

/// Whether a probe may use the hash cache on the host, `$l/hashes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HashCache {
    /// Hash every file: the barrier re-probe, the fingerprints of what is
    /// to be destroyed, a guard's re-probe (SPEC 8.1).
    #[default]
    Off,
    /// Trust fresh entries, never write (`plan`, `probe`).
    Read,
    /// Trust fresh entries and write the cache back (`apply`, `run`).
    ReadWrite,
}

/// The first line of a hash cache this build writes and trusts.
pub const CACHE_HEADER: &str = concat!("tend-hash-cache 1 ", env!("CARGO_PKG_VERSION"));

/// Below this many bytes of regular files in all, hashing them costs less
/// than the cache's own processes (two `stat`s and `awk`).
pub const CACHE_MIN_BYTES: u64 = 8 * 1024 * 1024;

/// `tend_hash` with the cache (after the prelude: `$l`, the lock directory,
/// and `$tend_u`, the uid, are set; `$S` holds the files' `stat` lines).
/// A cacheable file (`CI`: the indices of [`ProbeItem::cacheable`] items)
/// whose (device, inode, size, mtime, ctime, to the nanosecond) is
/// in the cache with an mtime more than a second older than the cache
/// itself (the "racy git" rule: a change in the same second as the cache's
/// write could keep all of these) is not hashed again; the others are,
/// with one `sha256sum`. The cache is trusted only in a directory `$l` of
/// the login's uid with mode 0700, as a regular file of that uid with mode
/// 0600 whose first line is [`CACHE_HEADER`]; anything else is ignored.
/// With `@WRITE@` = 1 the cache is rewritten (temp file and rename) when a
/// file was hashed. Below [`CACHE_MIN_BYTES`], or without `awk` or a
/// `stat` that prints nanoseconds, every file is hashed as without it.
const HASH_CACHED: &str = r#"tend_hash() {
  z=0 j=0
  set -f; IFS=$NL
  for x in $S; do
    if [ "$j" = 0 ]; then z=$((z + ${x##* })); fi
    j=$(((j + 1) % 3))
  done
  unset IFS; set +f
  if [ "$z" -lt @MIN@ ] || ! command -v awk >/dev/null 2>&1; then H=$(sha256sum -- "$@"); return; fi
  K=$(stat -c '%d %i %s %.9Y %.9Z' -- "$@") || { H=$(sha256sum -- "$@"); return; }
  CF="$l/hashes" CR=/dev/null CT=0 CW=
  if [ -d "$l" ] && [ ! -L "$l" ]; then
    case $(stat -c '%u %a' -- "$l" 2>/dev/null) in "$tend_u 700") CW=1 ;; esac
  fi
  if [ -n "$CW" ] && [ -f "$CF" ] && [ ! -L "$CF" ]; then
    c=$(stat -c '%u %a %Y' -- "$CF" 2>/dev/null) || c=
    case $c in "$tend_u 600 "*) CR=$CF CT=${c##* } ;; esac
  fi
  # Line 1: references to the files to hash ("${k}"); then per file
  # `h HASH` (from the cache) or `m` (hash it).
  fl=$(printf '%s ' $F)
  M=$(printf '%s\n' "$K" | awk -v cf="$CR" -v ct="$CT" -v ver='@VER@' -v fl="$fl" -v ci=" $CI " '
    BEGIN { split(fl, idx, " "); if ((getline l < cf) > 0 && l == ver) while ((getline l < cf) > 0) { if (split(l, a, " ") == 6) c[a[1] " " a[2] " " a[3] " " a[4] " " a[5]] = a[6] } }
    { k = $1 " " $2 " " $3 " " $4 " " $5; m = $4; sub(/\..*/, "", m)
      if ((k in c) && m + 1 < ct + 0 && index(ci, " " idx[NR] " ") > 0) o[NR] = "h " c[k]; else { o[NR] = "m"; q = q " \"${" NR "}\"" } }
    END { print "Q" q; for (i = 1; i <= NR; i++) print o[i] }') || return 1
  Q=${M%%"$NL"*}; Q=${Q#Q}; M=${M#*"$NL"}
  HM=
  if [ -n "$Q" ]; then eval "HM=\$(sha256sum -- $Q)" || return 1; fi
  H=$( { printf '%s\n' "$HM"; echo TEND-SEP; printf '%s\n' "$M"; } | awk '
    s == 0 { if ($0 == "TEND-SEP") { s = 1; next } h = $1; sub(/^\\/, "", h); f[++n] = h; next }
    $1 == "h" { print $2; next }
    { if (++j > n) exit 1; print f[j] }') || return 1
  if [ @WRITE@ = 1 ] && [ -n "$CW" ] && { [ -n "$Q" ] || [ "$CR" = /dev/null ]; }; then
    ( umask 077
      { printf '%s\n' "$K"; echo TEND-SEP; printf '%s\n' "$H"; } | awk -v ver='@VER@' '
        s == 0 { if ($0 == "TEND-SEP") { s = 1; print ver; next } k[++n] = $0; next }
        { print k[++j] " " $1 }' > "$CF.$$" && mv -f -- "$CF.$$" "$CF" ) 2>/dev/null || rm -f -- "$CF.$$"
  fi
}
"#;

/// After the prelude, the `Pn='path'` assignments and `PI`, the list of the
/// path items' indices: classify every path
/// with shell builtins, then stat and hash all regular files with ONE `stat`
/// and ONE `sha256sum`, and all directories with one `stat`, so a probe costs
/// a handful of processes on the host whatever the number of resources. The
/// batched outputs are joined in order; if a batch fails (an unreadable file,
/// a path that changed meanwhile) the per-path function `p` reports each of
/// those paths on its own, so the failure lands on the right item.
///
/// Every step is linear in the number of paths and runs on shell builtins:
/// the classification is one loop whose output is captured once (`C`) and
/// split by type with `for` loops over its lines; each batch's argument
/// list is set with ONE `set --` over `"$Pn"` references; and the batched
/// outputs are joined by `for` loops over their lines (split on newlines
/// only, so a line is a whole field), the k-th file's hash and index read
/// from the positional parameters (an array: one lookup each; shell
/// variables would be a hash table of a few dozen chains in dash). Appending to the positional parameters one path at
/// a time (`set -- "$@" "$x"`) copies the whole list on every append (20 s
/// for 10,000 files); and `read`, in dash, reads its input one byte per
/// system call (another 2 s).
const BATCH: &str = r#"NL='
'
C=$(for i in $PI; do
  eval "x=\$P$i"
  if [ -L "$x" ]; then echo "o $i"
  elif [ -f "$x" ]; then echo "f $i"
  elif [ -d "$x" ]; then echo "d $i"
  else echo "o $i"; fi
done)
pick() { IFS=$NL; for l in $C; do case $l in "$1 "*) echo "${l#* }" ;; esac; done; }
refs() { for i in "$@"; do printf '"$P%s" ' "$i"; done; }
O=$(pick o) F=$(pick f) D=$(pick d)
for i in $O; do eval "p \"\$i\" \"\$P$i\""; done
okF= okD=
if [ -n "$F" ]; then
  # Not in a function: `set --` in a function would set its own arguments.
  R=$(refs $F); eval "set -- $R"
  if S=$(stat -c '%a %u %g %s
%U
%G' -- "$@") && tend_hash "$@"; then okF=1; fi
fi
if [ -n "$D" ]; then
  R=$(refs $D); eval "set -- $R"
  if SD=$(stat -c '%a %u %g
%U
%G' -- "$@"); then okD=1; fi
fi
if [ -z "$okF" ]; then for i in $F; do eval "p \"\$i\" \"\$P$i\""; done; fi
if [ -z "$okD" ]; then for i in $D; do eval "p \"\$i\" \"\$P$i\""; done; fi
# Tree digests (SPEC 8.1) of the directories at the paths in TI: only
# directories with a destructive step pending are asked for, so this costs
# nothing on a host where nothing is to be removed. A count first, capped
# (head ends find early on a huge tree), then one sorted listing of every
# entry (relative path, type, size, mode; NUL-separated, since a name may
# hold a newline) hashed. F on fd 3 says find failed (an option it lacks,
# an unreadable tree): the digest would not be the tree's.
TR=
if [ -n "$TI" ]; then
  t() {
    for c in find sort head wc; do
      command -v "$c" >/dev/null 2>&1 || { echo "T $1 error $c not found"; return; }
    done
    n=$(find "$2" -mindepth 1 -printf 'x\n' 2>/dev/null | head -n 10001 | wc -l)
    if [ "$n" -gt 10000 ]; then echo "T $1 large"; return; fi
    o=$( { { find "$2" -mindepth 1 -printf '%P\0%y %s %m\0' 2>/dev/null || echo F >&3; } | sort -z | sha256sum; } 3>&1 )
    case $o in
      F*) echo "T $1 error listing the tree failed" ;;
      *) echo "T $1 digest $n ${o%% *}" ;;
    esac
  }
  # Only the items seen to be directories (D) are looked up in TI: a host
  # with 10,000 managed files pays nothing per file here.
  TR=$(for i in $D; do
    case " $TI " in *" $i "*) eval "t \"\$i\" \"\$P$i\"" ;; esac
  done)
fi
# The path variables are not needed any more. Dropping them keeps dash's
# variable table (a few dozen hash chains) short for the loops below,
# which look variables up a few times per path.
eval "unset -v x $(for i in $PI; do printf 'P%s ' "$i"; done)"
IFS=$NL; set -f
if [ -n "$okF" ]; then
  # The hashes, then the files' indices, as positional parameters: the
  # k-th of each is then one lookup away, whatever the number of files.
  set -- $H $F
  n=$(($# / 2)) k=0 j=0
  for l in $S; do
    if [ "$j" = 0 ]; then m=$l; j=1
    elif [ "$j" = 1 ]; then u=$l; j=2
    else
      k=$((k+1)); j=0; eval "h=\${$k} i=\${$((k + n))}"; h=${h#\\}; h=${h%% *}
      printf 'I %s file %s %s\nU %s %s\nG %s %s\n' "$i" "$m" "$h" "$i" "$u" "$i" "$l"
    fi
  done
fi
if [ -n "$okD" ]; then
  set -- $D
  k=0 j=0
  for l in $SD; do
    if [ "$j" = 0 ]; then m=$l; j=1
    elif [ "$j" = 1 ]; then u=$l; j=2
    else
      k=$((k+1)); j=0; eval "i=\${$k}"
      printf 'I %s dir %s\nU %s %s\nG %s %s\n' "$i" "$m" "$i" "$u" "$i" "$l"
    fi
  done
fi
unset IFS; set +f
if [ -n "$TR" ]; then printf '%s\n' "$TR"; fi
"#;

/// Users: ONE `getent passwd` for every name (set as the positional
/// parameters), then each user found with its `id -nG`.
const USERS: &str = r#"L=$(getent passwd "$@" 2>/dev/null); s=$?
echo "PASSWD $s"
if [ -n "$L" ]; then
  while IFS= read -r l; do
    printf 'PW %s\n' "$l"
    n=${l%%:*}
    printf 'ID %s %s\n' "$n" "$(id -nG -- "$n" 2>/dev/null)"
  done <<TEND_PW_END
$L
TEND_PW_END
fi
"#;

/// Groups: ONE `getent group` for every name (the positional parameters).
const GROUPS: &str = r#"L=$(getent group "$@" 2>/dev/null); s=$?
echo "GROUP $s"
if [ -n "$L" ]; then
  while IFS= read -r l; do printf 'GR %s\n' "$l"; done <<TEND_GR_END
$L
TEND_GR_END
fi
"#;

/// Packages: ONE query of the host's package manager for every name (the
/// positional parameters). The manager is chosen as the `package_manager`
/// fact is: the first of apt-get, dnf, apk on PATH.
const PACKAGES: &str = r#"if command -v apt-get >/dev/null 2>&1; then
  m=apt; L=$(dpkg-query -W -f '${Package}\t${Status}\t${Version}\n' "$@" 2>/dev/null); s=$?
elif command -v dnf >/dev/null 2>&1; then
  m=dnf; L=$(rpm -q --qf '%{NAME}\t%{VERSION}-%{RELEASE}\n' "$@" 2>/dev/null); s=$?
elif command -v apk >/dev/null 2>&1; then
  m=apk; L=$(apk info -e "$@" 2>/dev/null); s=$?
else
  m=none; L=; s=0
fi
echo "PKG $m $s"
if [ -n "$L" ]; then
  while IFS= read -r l; do printf 'PK %s\n' "$l"; done <<TEND_PK_END
$L
TEND_PK_END
fi
"#;

/// Builds the one script that probes every item: the prelude, one
/// `Pn='path'` assignment per path item (about `5 + len(path)` bytes) and the
/// batch section for paths; then one batched section per account database
/// and one package query, each only when some item needs it; one
/// `systemctl show` for the services (`Qn='unit'` assignments and `SI`, the
/// list of their indices) when there are any; then each command's guards.
pub fn script(items: &[ProbeItem]) -> String {
    script_with(items, HashCache::Off)
}

/// [`script`], with the hash cache as `cache` allows.
pub fn script_with(items: &[ProbeItem], cache: HashCache) -> String {
    let w = "writing to a String cannot fail";
    let tools: Vec<String> = TOOLS.iter().map(|t| quote(t)).collect();
    let mut s = PRELUDE
        .replace("@TOOLS@", &tools.join(" "))
        .replace("@LOCKDIR@", crate::apply::lock::LOCK_DIR)
        .replace("@READREV@", crate::apply::lock::READ_REVISION);
    let (mut paths, mut services) = (Vec::new(), Vec::new());
    let (mut users, mut groups, mut packages) = (Vec::new(), Vec::new(), Vec::new());
    for (i, item) in items.iter().enumerate() {
        match &item.target {
            ProbeTarget::Path(path) => {
                writeln!(s, "P{i}={}", quote(path)).expect(w);
                paths.push(i.to_string());
            }
            ProbeTarget::User(name) => users.push(quote(name)),
            ProbeTarget::Group(name) => groups.push(quote(name)),
            ProbeTarget::Package(name) => packages.push(quote(name)),
            ProbeTarget::Command { .. } => {}
            ProbeTarget::Service(unit) => {
                writeln!(s, "Q{i}={}", quote(unit)).expect(w);
                services.push(i.to_string());
            }
        }
    }
    writeln!(s, "PI='{}'", paths.join(" ")).expect(w);
    // The indices of the items that `want`, space-separated.
    let indices = |want: fn(&ProbeItem) -> bool| -> String {
        let v: Vec<String> = (0..items.len())
            .filter(|&i| want(&items[i]))
            .map(|i| i.to_string())
            .collect();
        v.join(" ")
    };
    writeln!(s, "TI='{}'", indices(|i| i.tree)).expect(w);
    if cache != HashCache::Off {
        writeln!(s, "CI='{}'", indices(|i| i.cacheable)).expect(w);
    }
    match cache {
        HashCache::Off => s.push_str(HASH_PLAIN),
        HashCache::Read | HashCache::ReadWrite => s.push_str(
            &HASH_CACHED
                .replace("@MIN@", &CACHE_MIN_BYTES.to_string())
                .replace("@VER@", CACHE_HEADER)
                .replace(
                    "@WRITE@",
                    if cache == HashCache::ReadWrite {
                        "1"
                    } else {
                        "0"
                    },
                ),
        ),
    }
    s.push_str(BATCH);
    for (names, section) in [(users, USERS), (groups, GROUPS), (packages, PACKAGES)] {
        if !names.is_empty() {
            writeln!(s, "set -- {}", names.join(" ")).expect(w);
            s.push_str(section);
        }
    }
    if !services.is_empty() {
        writeln!(s, "SI='{}'", services.join(" ")).expect(w);
        s.push_str(service::SECTION);
    }
    for (i, item) in items.iter().enumerate() {
        let ProbeTarget::Command { creates, unless } = &item.target else {
            continue;
        };
        s.push_str("c=- u=-\n");
        if let Some(path) = creates {
            writeln!(
                s,
                "if [ -e {} ]; then c=exists; else c=missing; fi",
                quote(path)
            )
            .expect(w);
        }
        if let Some(check) = unless {
            writeln!(s, "sh -c {} </dev/null >/dev/null 2>&1; u=$?", quote(check)).expect(w);
        }
        writeln!(s, "echo \"I {i} guard $c $u\"").expect(w);
    }
    writeln!(s, "echo 'END {}'", items.len()).expect(w);
    s
}

/// Why probe output could not be read. Every variant means "do not trust this
/// probe".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeParseError {
    #[error("probe output does not start with `{HEADER}`: not a tend probe, or another version")]
    MissingHeader,
    #[error("probe output has no `END` trailer: it was cut short")]
    MissingTrailer,
    #[error("probe output line {line}: output continues after the `END` trailer")]
    AfterTrailer { line: usize },
    #[error(
        "probe output line {line}: the trailer counts {found} items, the probe asked about {expected}"
    )]
    TrailerCount {
        line: usize,
        found: usize,
        expected: usize,
    },
    #[error("probe output line {line}: unrecognised line `{text}`")]
    UnknownLine { line: usize, text: String },
    #[error("probe output line {line}: {message}")]
    BadValue { line: usize, message: String },
    #[error("probe output line {line}: {what} reported twice")]
    Duplicate { line: usize, what: String },
    #[error("probe output does not report {what}")]
    NotReported { what: String },
    #[error("the host lacks {} on PATH, which tend needs for this host's resources", .0.join(", "))]
    MissingTools(Vec<String>),
    #[error(
        "the host has no package manager tend knows on PATH (apt-get, dnf or apk), which package resources need"
    )]
    NoPackageManager,
    #[error(
        "the host does not run systemd (no /run/systemd/system), which `service` resources need"
    )]
    NoSystemd,
    #[error("cannot probe `{key}`: {message}")]
    ItemFailed { key: String, message: String },
    #[error("two probe items have the key `{0}`")]
    DuplicateKey(String),
}

impl ProbeParseError {
    /// `Capability` for a missing tool or package manager, or a host not
    /// running systemd (retrying cannot help; the operator must install it),
    /// `Execution` for everything else (the probe ran and its output cannot
    /// be trusted).
    pub fn class(&self) -> FailureClass {
        match self {
            ProbeParseError::MissingTools(_)
            | ProbeParseError::NoPackageManager
            | ProbeParseError::NoSystemd => FailureClass::Capability,
            _ => FailureClass::Execution,
        }
    }
}

/// Reads the stdout of [`script`]`(items)` into what the host has. Strict:
/// see the module documentation for the format and the error precedence.
pub fn parse(stdout: &[u8], items: &[ProbeItem]) -> Result<HostActual, ProbeParseError> {
    let mut keys = BTreeSet::new();
    for item in items {
        if !keys.insert(item.key.as_str()) {
            return Err(ProbeParseError::DuplicateKey(item.key.clone()));
        }
    }
    let lines = split_lines(stdout, items.len())?;

    // Facts and tools first, so that a missing tool is reported as such and
    // not as the garbled item lines it causes.
    let (facts, absent) = parse_facts(&lines)?;
    let needs = |f: fn(&ProbeTarget) -> bool| items.iter().any(|i| f(&i.target));
    let mut needed: BTreeSet<&str> = BTreeSet::new();
    if needs(|t| matches!(t, ProbeTarget::Path(_))) {
        needed.extend(PATH_TOOLS);
    }
    if needs(|t| matches!(t, ProbeTarget::User(_))) {
        needed.extend(USER_TOOLS);
    }
    if needs(|t| matches!(t, ProbeTarget::Group(_))) {
        needed.extend(GROUP_TOOLS);
    }
    if needs(|t| matches!(t, ProbeTarget::Command { .. })) {
        needed.extend(COMMAND_TOOLS);
    }
    let services = needs(|t| matches!(t, ProbeTarget::Service(_)));
    if services {
        needed.extend(SERVICE_TOOLS);
    }
    let packages = needs(|t| matches!(t, ProbeTarget::Package(_)));
    if packages && let Some(m) = &facts.package_manager {
        needed.extend(package_tools(m));
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|t| needed.contains(*t) && absent.iter().any(|a| a == *t))
        .map(|t| t.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(ProbeParseError::MissingTools(missing));
    }
    if packages && facts.package_manager.is_none() {
        return Err(ProbeParseError::NoPackageManager);
    }
    if services && facts.init.as_deref() != Some("systemd") {
        return Err(ProbeParseError::NoSystemd);
    }

    let mut observed = parse_items(&lines, items, service::parse(&lines, items)?)?;
    parse_sections(&lines, items, &facts, &mut observed)?;
    let observed = items
        .iter()
        .zip(observed)
        .map(|(item, seen)| {
            seen.ok_or_else(|| ProbeParseError::NotReported {
                what: format!("`{}`", item.key),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let trees = parse_trees(&lines, items, &observed)?;
    let resources = items.iter().map(|i| i.key.clone()).zip(observed).collect();
    Ok(HostActual {
        facts,
        resources,
        trees,
    })
}

/// Reads the `T` lines: the tree digests of the items that asked for one
/// ([`ProbeItem::tree`]) and were seen to be directories. Each such item has
/// exactly one; any other item none.
///
/// ```text
/// T <index> digest <entries> <sha256>
/// T <index> large                   more than 10,000 entries
/// T <index> error <what failed>
/// ```
fn parse_trees(
    lines: &[(usize, &str)],
    items: &[ProbeItem],
    observed: &[Observed],
) -> Result<BTreeMap<String, Tree>, ProbeParseError> {
    let mut trees = BTreeMap::new();
    for &(n, text) in lines {
        let Some(rest) = text.strip_prefix("T ") else {
            continue;
        };
        let mut fields = rest.splitn(3, ' ');
        let index: usize = decimal(n, "item index", fields.next().unwrap_or(""))?;
        let (Some(item), Some(seen)) = (items.get(index), observed.get(index)) else {
            return Err(bad(
                n,
                format!("item index {index} out of range ({} items)", items.len()),
            ));
        };
        if !item.tree || !matches!(seen, Observed::Directory(_)) {
            return Err(bad(
                n,
                format!("`{}`: a tree digest the probe did not ask for", item.key),
            ));
        }
        let tree = match (fields.next().unwrap_or(""), fields.next()) {
            ("digest", Some(d)) => {
                let (count, sha) = d.split_once(' ').unwrap_or((d, ""));
                let entries: u64 = decimal(n, "tree entry count", count)?;
                if entries > TREE_LIMIT {
                    return Err(bad(n, format!("`{}`: bad tree digest `{d}`", item.key)));
                }
                Tree::Digest {
                    entries,
                    sha256: sha256(n, sha)?,
                }
            }
            ("large", None) => Tree::TooLarge,
            ("error", Some(m)) => Tree::Failed {
                message: m.to_string(),
            },
            _ => return Err(unknown(n, text)),
        };
        if trees.insert(item.key.clone(), tree).is_some() {
            return Err(dup(n, format!("tree of `{}`", item.key)));
        }
    }
    for (item, seen) in items.iter().zip(observed) {
        if item.tree && matches!(seen, Observed::Directory(_)) && !trees.contains_key(&item.key) {
            return Err(ProbeParseError::NotReported {
                what: format!("the tree of `{}`", item.key),
            });
        }
    }
    Ok(trees)
}

/// Reads the `FACT` and `TOOL` lines (and rejects unknown ones); returns the
/// facts and the tools found missing on the host.
fn parse_facts(lines: &[(usize, &str)]) -> Result<(Facts, Vec<String>), ProbeParseError> {
    let mut kernel = None;
    let mut os_id = None;
    let mut init = None;
    let mut revision = None;
    let mut tools: Vec<Option<bool>> = vec![None; TOOLS.len()];
    for &(n, text) in lines {
        let Some((tag, rest)) = text.split_once(' ') else {
            return Err(unknown(n, text));
        };
        match tag {
            "FACT" => {
                let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                let slot = match name {
                    "kernel" => &mut kernel,
                    "os_id" => &mut os_id,
                    "init" => &mut init,
                    "revision" => &mut revision,
                    _ => return Err(unknown(n, text)),
                };
                if slot.is_some() {
                    return Err(dup(n, format!("fact `{name}`")));
                }
                *slot = Some((!value.is_empty()).then(|| value.to_string()));
            }
            "TOOL" => {
                let (name, found) = rest.split_once(' ').unwrap_or((rest, ""));
                let Some(i) = TOOLS.iter().position(|t| *t == name) else {
                    return Err(unknown(n, text));
                };
                let found = match found {
                    "yes" => true,
                    "no" => false,
                    _ => {
                        return Err(bad(
                            n,
                            format!("tool `{name}`: expected `yes` or `no`, found `{found}`"),
                        ));
                    }
                };
                if tools[i].replace(found).is_some() {
                    return Err(dup(n, format!("tool `{name}`")));
                }
            }
            "I" | "U" | "G" | "T" | "PASSWD" | "PW" | "ID" | "GROUP" | "GR" | "PKG" | "PK"
            | "S" => {}
            _ => return Err(unknown(n, text)),
        }
    }
    let not_reported = |what: String| ProbeParseError::NotReported { what };
    let kernel = kernel.ok_or_else(|| not_reported("fact `kernel`".into()))?;
    let os_id = os_id.ok_or_else(|| not_reported("fact `os_id`".into()))?;
    let init = init.ok_or_else(|| not_reported("fact `init`".into()))?;
    // Optional: older outputs (and the unit tests' fixtures) have no line.
    let revision = revision.flatten();
    let mut present = Vec::new();
    let mut missing = Vec::new();
    for (name, found) in TOOLS.iter().zip(&tools) {
        match found {
            Some(true) => present.push(name.to_string()),
            Some(false) => missing.push(name.to_string()),
            None => return Err(not_reported(format!("tool `{name}`"))),
        }
    }
    Ok((
        Facts {
            kernel,
            os_id,
            init,
            package_manager: ["apt-get", "dnf", "apk"]
                .iter()
                .find(|m| present.iter().any(|p| p == *m))
                .map(|m| m.trim_end_matches("-get").to_string()),
            tools: present,
            revision,
        },
        missing,
    ))
}

/// Reads the `I`, `U` and `G` lines: the observations of path and command
/// items (and a service's `error` line), by item index, added to what the
/// `S` lines observed already (`observed`; None for the items none of these
/// lines cover).
fn parse_items(
    lines: &[(usize, &str)],
    items: &[ProbeItem],
    mut observed: Vec<Option<Observed>>,
) -> Result<Vec<Option<Observed>>, ProbeParseError> {
    let not_reported = |what: String| ProbeParseError::NotReported { what };
    // A `file` or `dir` line leaves its metadata pending
    // until the `U` and `G` lines that must follow it directly.
    let mut pending: Option<Pending> = None;
    for &(n, text) in lines {
        let (tag, rest) = text.split_once(' ').expect("checked in pass 1");
        if let Some(p) = pending.as_mut() {
            let want = if p.owner.is_none() { "U" } else { "G" };
            let key = &items[p.index].key;
            if tag != want {
                return Err(bad(n, format!("`{key}`: expected its `{want}` line")));
            }
            let (index, name) = rest.split_once(' ').unwrap_or((rest, ""));
            if index != p.index.to_string() {
                return Err(bad(
                    n,
                    format!(
                        "`{key}`: `{want}` line for item {index}, expected {}",
                        p.index
                    ),
                ));
            }
            let name = match name {
                "" => return Err(bad(n, format!("`{key}`: empty name"))),
                "UNKNOWN" => None,
                name => Some(name.to_string()),
            };
            if p.owner.is_none() {
                p.owner = Some(name);
            } else {
                let p = pending.take().expect("pending");
                let index = p.index;
                observed[index] = Some(p.finish(name));
            }
            continue;
        }
        match tag {
            "U" | "G" => {
                return Err(bad(
                    n,
                    format!("`{tag}` line without a file or directory line before it"),
                ));
            }
            "I" => {}
            _ => continue,
        }
        let mut fields = rest.splitn(3, ' ');
        let index = fields.next().unwrap_or("");
        let kind = fields.next().unwrap_or("");
        let detail = fields.next();
        let index: usize = decimal(n, "item index", index)?;
        let Some(item) = items.get(index) else {
            return Err(bad(
                n,
                format!("item index {index} out of range ({} items)", items.len()),
            ));
        };
        if observed[index].is_some() {
            return Err(dup(n, format!("`{}`", item.key)));
        }
        let key = &item.key;
        let is_path = matches!(item.target, ProbeTarget::Path(_));
        let fits = match kind {
            "absent" | "file" | "dir" | "link" | "other" => is_path,
            "guard" => matches!(item.target, ProbeTarget::Command { .. }),
            "error" => !matches!(
                item.target,
                ProbeTarget::User(_) | ProbeTarget::Group(_) | ProbeTarget::Package(_)
            ),
            _ => return Err(unknown(n, text)),
        };
        if !fits {
            return Err(bad(
                n,
                format!("`{key}`: a `{kind}` line does not answer what the probe asked"),
            ));
        }
        let field_count = |want: usize| -> Result<Vec<&str>, ProbeParseError> {
            let v: Vec<&str> = detail.map(|d| d.split(' ').collect()).unwrap_or_default();
            if v.len() != want {
                return Err(bad(
                    n,
                    format!("`{key}`: `{kind}` needs {want} fields, found {}", v.len()),
                ));
            }
            Ok(v)
        };
        match kind {
            "absent" => {
                field_count(0)?;
                observed[index] = Some(Observed::Absent);
            }
            "file" | "dir" => {
                let is_file = kind == "file";
                let f = field_count(if is_file { 5 } else { 3 })?;
                let (mode, uid, gid) = (
                    mode(n, f[0])?,
                    decimal(n, "uid", f[1])?,
                    decimal(n, "gid", f[2])?,
                );
                let file = match is_file {
                    true => Some((decimal(n, "size", f[3])?, sha256(n, f[4])?)),
                    false => None,
                };
                pending = Some(Pending {
                    index,
                    mode,
                    uid,
                    gid,
                    file,
                    owner: None,
                });
            }
            "link" => {
                let f = field_count(1)?;
                // Linux has no empty symlinks: empty means readlink failed.
                let target = unhex(f[0]).filter(|t| !t.is_empty());
                let target =
                    target.ok_or_else(|| bad(n, format!("`{key}`: bad link target `{}`", f[0])))?;
                observed[index] = Some(Observed::Symlink { target });
            }
            "other" => {
                let file_type = detail.unwrap_or("");
                if file_type.is_empty() {
                    return Err(bad(n, format!("`{key}`: `other` without a file type")));
                }
                observed[index] = Some(Observed::Other {
                    file_type: file_type.to_string(),
                });
            }
            "guard" => {
                let f = field_count(2)?;
                let ProbeTarget::Command { creates, unless } = &item.target else {
                    unreachable!("checked above");
                };
                let creates_exists = match (f[0], creates) {
                    ("-", None) => None,
                    ("exists", Some(_)) => Some(true),
                    ("missing", Some(_)) => Some(false),
                    (other, _) => {
                        return Err(bad(n, format!("`{key}`: bad `creates` result `{other}`")));
                    }
                };
                let unless_status = match (f[1], unless) {
                    ("-", None) => None,
                    (status, Some(_)) => Some(decimal::<u8>(n, "unless status", status)?),
                    (other, None) => {
                        return Err(bad(n, format!("`{key}`: bad `unless` result `{other}`")));
                    }
                };
                observed[index] = Some(Observed::Guard(GuardState::new(
                    creates_exists,
                    unless_status,
                )));
            }
            "error" => {
                return Err(ProbeParseError::ItemFailed {
                    key: key.clone(),
                    message: detail.unwrap_or("unknown failure").to_string(),
                });
            }
            _ => return Err(unknown(n, text)),
        }
    }
    if let Some(p) = pending {
        let want = if p.owner.is_none() { "owner" } else { "group" };
        return Err(not_reported(format!(
            "the {want} of `{}`",
            items[p.index].key
        )));
    }
    Ok(observed)
}

/// The batched sections of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Users,
    Groups,
    Packages,
}

impl Section {
    fn header(self) -> &'static str {
        match self {
            Section::Users => "PASSWD",
            Section::Groups => "GROUP",
            Section::Packages => "PKG",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Section::Users => "users",
            Section::Groups => "groups",
            Section::Packages => "packages",
        }
    }
}

/// The items of one section by the name they ask about (several items may
/// ask about one name).
type Names<'a> = BTreeMap<&'a str, Vec<usize>>;

/// Reads the `PASSWD`/`PW`/`ID`, `GROUP`/`GR` and `PKG`/`PK` sections into
/// the observations of user, group and package items.
fn parse_sections(
    lines: &[(usize, &str)],
    items: &[ProbeItem],
    facts: &Facts,
    observed: &mut [Option<Observed>],
) -> Result<(), ProbeParseError> {
    let mut names: [Names; 3] = Default::default();
    for (i, item) in items.iter().enumerate() {
        let (section, name) = match &item.target {
            ProbeTarget::User(n) => (0, n.as_str()),
            ProbeTarget::Group(n) => (1, n.as_str()),
            // `name:arch` asks about the lines of `name`.
            ProbeTarget::Package(n) => (2, n.split(':').next().unwrap_or(n)),
            _ => continue,
        };
        names[section].entry(name).or_default().push(i);
    }
    let [users, groups, packages] = &names;
    let manager = facts.package_manager.as_deref().unwrap_or("none");

    // Per section: (header line, exit status) once its header is seen.
    let mut status: [Option<(usize, u8)>; 3] = [None; 3];
    let mut section: Option<Section> = None;
    // A `PW` line waiting for its `ID` line: (name, uid, gid, home, shell).
    let mut pending: Option<(&str, u32, u32, String, String)> = None;
    // Accumulated package lines: name -> (installed versions, seen).
    let mut pkgs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for &(n, text) in lines {
        let (tag, rest) = text.split_once(' ').expect("checked in pass 1");
        if let Some((name, ..)) = &pending
            && tag != "ID"
        {
            return Err(bad(n, format!("user `{name}`: expected its `ID` line")));
        }
        let header = match tag {
            "PASSWD" => Some(Section::Users),
            "GROUP" => Some(Section::Groups),
            "PKG" => Some(Section::Packages),
            _ => None,
        };
        if let Some(h) = header {
            let slot = h as usize;
            if names[slot].is_empty() {
                return Err(bad(
                    n,
                    format!("`{tag}` line, but the probe asked about no {}", h.what()),
                ));
            }
            if status[slot].is_some() {
                return Err(dup(n, format!("`{tag}`")));
            }
            let code = match h {
                Section::Packages => {
                    let (m, code) = rest.split_once(' ').unwrap_or((rest, ""));
                    if m != manager {
                        return Err(bad(
                            n,
                            format!(
                                "packages queried with `{m}`, but the host's package manager is `{manager}`"
                            ),
                        ));
                    }
                    code
                }
                _ => rest,
            };
            status[slot] = Some((n, decimal(n, "exit status", code)?));
            section = Some(h);
            continue;
        }
        let inside = |want: Section| -> Result<(), ProbeParseError> {
            if section == Some(want) {
                Ok(())
            } else {
                Err(bad(
                    n,
                    format!("`{tag}` line outside the {} section", want.what()),
                ))
            }
        };
        match tag {
            "PW" => {
                inside(Section::Users)?;
                let f: Vec<&str> = rest.split(':').collect();
                if f.len() != 7 {
                    return Err(bad(
                        n,
                        format!("passwd entry needs 7 fields, found {}", f.len()),
                    ));
                }
                let Some((&name, _)) = users.get_key_value(f[0]) else {
                    return Err(bad(
                        n,
                        format!(
                            "passwd entry for `{}`, which the probe did not ask about",
                            f[0]
                        ),
                    ));
                };
                if observed[users[name][0]].is_some() {
                    return Err(dup(n, format!("user `{name}`")));
                }
                pending = Some((
                    name,
                    decimal(n, "uid", f[2])?,
                    decimal(n, "gid", f[3])?,
                    f[5].to_string(),
                    f[6].to_string(),
                ));
            }
            "ID" => {
                let Some((name, uid, gid, home, shell)) = pending.take() else {
                    return Err(bad(n, "`ID` line without a `PW` line before it".into()));
                };
                let (id_name, list) = rest.split_once(' ').unwrap_or((rest, ""));
                if id_name != name {
                    return Err(bad(n, format!("user `{name}`: `ID` line for `{id_name}`")));
                }
                let mut list = list.split(' ').filter(|g| !g.is_empty());
                let Some(primary) = list.next() else {
                    return Err(ProbeParseError::ItemFailed {
                        key: items[users[name][0]].key.clone(),
                        message: format!("`id -nG {name}` reported no groups"),
                    });
                };
                let mut supplementary: Vec<String> =
                    list.filter(|g| *g != primary).map(str::to_string).collect();
                supplementary.sort();
                supplementary.dedup();
                let state = UserState {
                    uid,
                    gid,
                    home,
                    shell,
                    primary_group: primary.to_string(),
                    groups: supplementary,
                };
                for &i in &users[name] {
                    observed[i] = Some(Observed::User(state.clone()));
                }
            }
            "GR" => {
                inside(Section::Groups)?;
                let f: Vec<&str> = rest.split(':').collect();
                if f.len() != 4 {
                    return Err(bad(
                        n,
                        format!("group entry needs 4 fields, found {}", f.len()),
                    ));
                }
                let Some(is) = groups.get(f[0]) else {
                    return Err(bad(
                        n,
                        format!(
                            "group entry for `{}`, which the probe did not ask about",
                            f[0]
                        ),
                    ));
                };
                if observed[is[0]].is_some() {
                    return Err(dup(n, format!("group `{}`", f[0])));
                }
                let state = GroupState {
                    gid: decimal(n, "gid", f[2])?,
                    members: f[3]
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect(),
                };
                for &i in is {
                    observed[i] = Some(Observed::Group(state.clone()));
                }
            }
            "PK" => {
                inside(Section::Packages)?;
                let (name, installed) = package_line(n, rest, manager, items, packages)?;
                let versions = pkgs.entry(name).or_default();
                if let Some(v) = installed {
                    versions.push(v);
                }
            }
            _ => section = None,
        }
    }
    if let Some((name, ..)) = pending {
        return Err(ProbeParseError::NotReported {
            what: format!("the groups of user `{name}`"),
        });
    }

    // Names without lines: absent when the tool's status says some were not
    // found; an error when it says all were, or when it failed.
    for (slot, section) in [Section::Users, Section::Groups, Section::Packages]
        .into_iter()
        .enumerate()
    {
        let names = &names[slot];
        if names.is_empty() {
            continue;
        }
        let Some((line, code)) = status[slot] else {
            return Err(ProbeParseError::NotReported {
                what: format!("the {} (`{}` line)", section.what(), section.header()),
            });
        };
        let unreported: Vec<&str> = names
            .keys()
            .copied()
            .filter(|n| match section {
                Section::Packages => !pkgs.contains_key(n),
                _ => observed[names[n][0]].is_none(),
            })
            .collect();
        let tool = match section {
            Section::Users => "getent passwd",
            Section::Groups => "getent group",
            Section::Packages => match manager {
                "apt" => "dpkg-query",
                "dnf" => "rpm -q",
                _ => "apk info -e",
            },
        };
        // A name without a line is absent when the tool's status says that
        // some were not found. rpm reports every name on a line of its own
        // (and exits with the number not installed); apk's status is not
        // documented, and its lines are enough.
        let (found_all, missed_some) = match (section, manager) {
            (Section::Users | Section::Groups, _) => (Some(0), Some(2)),
            (Section::Packages, "apt") => (Some(0), Some(1)),
            (Section::Packages, "dnf") => (None, None),
            _ => (None, Some(code)),
        };
        let verdict = match (unreported.is_empty(), found_all, missed_some) {
            (true, Some(all), _) if code == all => Ok(()),
            (true, None, _) => Ok(()),
            (false, _, Some(some)) if code == some => Ok(()),
            (false, _, _) if found_all.is_none_or(|a| a == code) => Err(format!(
                "{tool} exited with status {code} but did not report {}",
                unreported.join(", ")
            )),
            _ => Err(format!("{tool} exited with status {code}")),
        };
        verdict.map_err(|m| bad(line, m))?;
        for name in unreported {
            for &i in &names[name] {
                observed[i] = Some(Observed::Absent);
            }
        }
        if section == Section::Packages {
            for (name, versions) in &pkgs {
                let o = if versions.is_empty() {
                    Observed::Absent
                } else {
                    let known: Vec<&str> = versions
                        .iter()
                        .map(String::as_str)
                        .filter(|v| !v.is_empty())
                        .collect();
                    Observed::Package(PackageState {
                        version: (!known.is_empty()).then(|| known.join(", ")),
                    })
                };
                for &i in &names[name] {
                    observed[i] = Some(o.clone());
                }
            }
        }
    }
    Ok(())
}

/// One `PK` line: the package name it is about (as the items spell it, for
/// the lookup) and its version if it says the package is installed (empty
/// when the manager reports none).
fn package_line<'a>(
    n: usize,
    line: &str,
    manager: &str,
    items: &[ProbeItem],
    packages: &Names<'a>,
) -> Result<(&'a str, Option<String>), ProbeParseError> {
    let known = |name: &str| -> Result<&'a str, ProbeParseError> {
        packages
            .get_key_value(name)
            .map(|(k, _)| *k)
            .ok_or_else(|| {
                bad(
                    n,
                    format!("package line for `{name}`, which the probe did not ask about"),
                )
            })
    };
    match manager {
        "apt" => {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 3 {
                return Err(bad(
                    n,
                    format!(
                        "dpkg-query line needs 3 tab-separated fields, found {}",
                        f.len()
                    ),
                ));
            }
            let name = known(f[0])?;
            let state = match f[1].split(' ').collect::<Vec<_>>()[..] {
                [_, _, state] => state,
                _ => {
                    return Err(bad(
                        n,
                        format!("package `{name}`: bad dpkg status `{}`", f[1]),
                    ));
                }
            };
            match state {
                "installed" | "triggers-awaited" | "triggers-pending" => {
                    Ok((name, Some(f[2].to_string())))
                }
                "not-installed" | "config-files" => Ok((name, None)),
                "half-installed" | "unpacked" | "half-configured" => {
                    Err(ProbeParseError::ItemFailed {
                        key: items[packages[name][0]].key.clone(),
                        message: format!(
                            "package `{name}` is {state}: repair it on the host first (e.g. `dpkg --configure -a`)"
                        ),
                    })
                }
                other => Err(bad(
                    n,
                    format!("package `{name}`: unknown dpkg state `{other}`"),
                )),
            }
        }
        "dnf" => {
            if let Some(name) = line
                .strip_prefix("package ")
                .and_then(|l| l.strip_suffix(" is not installed"))
            {
                return Ok((known(name)?, None));
            }
            match line.split('\t').collect::<Vec<_>>()[..] {
                [name, version] if !version.is_empty() => {
                    Ok((known(name)?, Some(version.to_string())))
                }
                _ => Err(bad(n, format!("unrecognised rpm line `{line}`"))),
            }
        }
        "apk" => Ok((known(line)?, Some(String::new()))),
        _ => Err(bad(n, "package line without a package manager".into())),
    }
}

/// A `file` or `dir` line waiting for its owner and group lines.
struct Pending {
    index: usize,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Size and sha256 for a file; None for a directory.
    file: Option<(u64, String)>,
    owner: Option<Option<String>>,
}

impl Pending {
    fn finish(self, group: Option<String>) -> Observed {
        let meta = Meta {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            owner: self.owner.expect("owner line came first"),
            group,
        };
        match self.file {
            Some((size, sha256)) => Observed::File(FileState { meta, size, sha256 }),
            None => Observed::Directory(meta),
        }
    }
}

/// Checks the header and the trailer (whose count must be `expected`) and
/// returns the lines between them with their 1-based line numbers.
fn split_lines(stdout: &[u8], expected: usize) -> Result<Vec<(usize, &str)>, ProbeParseError> {
    let body = match stdout.strip_prefix(HEADER.as_bytes()) {
        // The header and nothing more: cut short right after it.
        Some([]) => return Err(ProbeParseError::MissingTrailer),
        Some([b'\n', body @ ..]) => body,
        _ => return Err(ProbeParseError::MissingHeader),
    };
    // Output that does not end in a newline was cut off mid-line.
    let Some(body) = body.strip_suffix(b"\n") else {
        return Err(ProbeParseError::MissingTrailer);
    };
    let mut lines = Vec::new();
    if !body.is_empty() {
        for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
            let n = i + 2;
            let text = std::str::from_utf8(raw).map_err(|_| bad(n, "line is not UTF-8".into()))?;
            lines.push((n, text));
        }
    }
    let Some(end) = lines
        .iter()
        .position(|(_, t)| t.split(' ').next() == Some("END"))
    else {
        return Err(ProbeParseError::MissingTrailer);
    };
    if let Some(&(line, _)) = lines.get(end + 1) {
        return Err(ProbeParseError::AfterTrailer { line });
    }
    let (line, trailer) = lines.pop().expect("the trailer is the last line");
    let found: usize = decimal(
        line,
        "trailer count",
        trailer.strip_prefix("END ").unwrap_or(""),
    )?;
    if found != expected {
        return Err(ProbeParseError::TrailerCount {
            line,
            found,
            expected,
        });
    }
    Ok(lines)
}

fn unknown(line: usize, text: &str) -> ProbeParseError {
    const MAX: usize = 80;
    let mut text = text.to_string();
    if text.len() > MAX {
        let cut = (0..=MAX)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    ProbeParseError::UnknownLine { line, text }
}

fn bad(line: usize, message: String) -> ProbeParseError {
    ProbeParseError::BadValue { line, message }
}

fn dup(line: usize, what: String) -> ProbeParseError {
    ProbeParseError::Duplicate { line, what }
}

/// A plain decimal number: digits only (no sign, no spaces), in range.
fn decimal<T: std::str::FromStr>(line: usize, what: &str, s: &str) -> Result<T, ProbeParseError> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match s.parse() {
        Ok(v) if digits => Ok(v),
        _ => Err(bad(line, format!("{what}: bad number `{s}`"))),
    }
}

/// Permission bits as `stat -c %a` prints them: octal, at most 07777.
fn mode(line: usize, s: &str) -> Result<u32, ProbeParseError> {
    let octal = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(s, 8) {
        Ok(v) if octal && v <= 0o7777 => Ok(v),
        _ => Err(bad(line, format!("mode: bad octal mode `{s}`"))),
    }
}

fn sha256(line: usize, s: &str) -> Result<String, ProbeParseError> {
    if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(s.to_string())
    } else {
        Err(bad(line, format!("sha256: bad digest `{s}`")))
    }
}

/// Lowercase hex to bytes; None when the text is not that.
fn unhex(s: &str) -> Option<Vec<u8>> {
    fn digit(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        }
    }
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests;
