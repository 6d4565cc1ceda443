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
//! TOOL <name> yes|no                    once per name in TOOLS
//! I <index> absent
//! I <index> file <mode> <uid> <gid> <size> <sha256>
//! U <index> <owner name, rest of line; UNKNOWN when the uid has none>
//! G <index> <group name, rest of line; UNKNOWN when the gid has none>
//! I <index> dir <mode> <uid> <gid>
//! U <index> <owner>
//! G <index> <group>
//! I <index> link <target bytes as lowercase hex>
//! I <index> other <file type as `stat -c %F` says, e.g. fifo>
//! I <index> error <what failed>
//! END <item count>                      trailer
//! ```
//!
//! `<index>` is the item's position in the slice given to [`script`]; modes are
//! octal (`stat -c %a`), other numbers decimal. A `file` or `dir` line is
//! followed directly by its `U` and `G` lines, which carry the names on lines
//! of their own so that a name with a space cannot shift other fields. Link
//! targets are hex because they may hold any byte, newlines included.
//!
//! # Missing tools
//!
//! The script reports which of [`TOOLS`] are on the host's PATH. When a probe
//! with path items finds one missing, [`parse`] returns
//! [`ProbeParseError::MissingTools`] before looking at any item (whose lines
//! are then meaningless); [`ProbeParseError::class`] maps that to
//! `Capability`, and every other parse error to `Execution`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::core::actual::{Facts, FileState, HostActual, Meta, Observed};
use crate::core::retry::FailureClass;
use crate::shell::quote;

/// The first line of every probe's output; the number is the format version.
pub const HEADER: &str = "TEND-PROBE 1";

/// Tools the path probe runs, besides `sh` and its builtins.
pub const TOOLS: &[&str] = &["stat", "sha256sum", "od", "readlink", "tr"];

/// What to look at on the host. Only path-based resources (file, directory,
/// symlink) for now; packages, services, users, groups and command guards will
/// be further variants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeTarget {
    /// The state of this absolute path, not following a symlink at the path.
    Path(String),
}

/// One thing to probe, under the id of the resource that asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeItem {
    /// Resource id; the key of the result in [`HostActual::resources`].
    pub key: String,
    pub target: ProbeTarget,
}

impl ProbeItem {
    pub fn path(key: impl Into<String>, path: impl Into<String>) -> Self {
        ProbeItem {
            key: key.into(),
            target: ProbeTarget::Path(path.into()),
        }
    }
}

/// Everything before the items: header, facts, tools, and the function `p`
/// that reports one path. `p INDEX PATH` tests `-L` first so that a symlink
/// at the path is reported, not followed; `stat` runs without `-L` for the
/// same reason. No `set -e`: one unreadable path must not hide the others.
const PRELUDE: &str = r#"export LC_ALL=C
echo 'TEND-PROBE 1'
printf 'FACT kernel %s\n' "$(uname -s 2>/dev/null)"
o=
if [ -r /etc/os-release ]; then
  while IFS= read -r l || [ -n "$l" ]; do
    case $l in ID=*) o=${l#ID=} ;; esac
  done < /etc/os-release
fi
o=${o#[\"\']}; o=${o%[\"\']}
printf 'FACT os_id %s\n' "$o"
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

/// Builds the one script that probes every item. About `5 + len(path)` bytes
/// per item on top of a fixed prelude.
pub fn script(items: &[ProbeItem]) -> String {
    let tools: Vec<String> = TOOLS.iter().map(|t| quote(t)).collect();
    let mut s = PRELUDE.replace("@TOOLS@", &tools.join(" "));
    for (i, item) in items.iter().enumerate() {
        match &item.target {
            ProbeTarget::Path(path) => writeln!(s, "p {i} {}", quote(path)),
        }
        .expect("writing to a String cannot fail");
    }
    writeln!(s, "echo 'END {}'", items.len()).expect("writing to a String cannot fail");
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
    #[error("the host lacks {} on PATH, which the probe needs", .0.join(", "))]
    MissingTools(Vec<String>),
    #[error("cannot probe `{key}`: {message}")]
    ItemFailed { key: String, message: String },
    #[error("two probe items have the key `{0}`")]
    DuplicateKey(String),
}

impl ProbeParseError {
    /// `Capability` for a missing tool (retrying cannot help; the operator
    /// must install it), `Execution` for everything else (the probe ran and
    /// its output cannot be trusted).
    pub fn class(&self) -> FailureClass {
        match self {
            ProbeParseError::MissingTools(_) => FailureClass::Capability,
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
    let (facts, missing) = parse_facts(&lines)?;
    let needs_tools = items
        .iter()
        .any(|i| matches!(i.target, ProbeTarget::Path(_)));
    if needs_tools && !missing.is_empty() {
        return Err(ProbeParseError::MissingTools(missing));
    }

    let observed = parse_items(&lines, items)?;
    let resources = items.iter().map(|i| i.key.clone()).zip(observed).collect();
    Ok(HostActual { facts, resources })
}

/// Reads the `FACT` and `TOOL` lines (and rejects unknown ones); returns the
/// facts and the tools found missing.
fn parse_facts(lines: &[(usize, &str)]) -> Result<(Facts, Vec<String>), ProbeParseError> {
    let mut kernel = None;
    let mut os_id = None;
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
            "I" | "U" | "G" => {}
            _ => return Err(unknown(n, text)),
        }
    }
    let not_reported = |what: String| ProbeParseError::NotReported { what };
    let kernel = kernel.ok_or_else(|| not_reported("fact `kernel`".into()))?;
    let os_id = os_id.ok_or_else(|| not_reported("fact `os_id`".into()))?;
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
            tools: present,
        },
        missing,
    ))
}

/// Reads the `I`, `U` and `G` lines: one observation per item, in order.
fn parse_items(
    lines: &[(usize, &str)],
    items: &[ProbeItem],
) -> Result<Vec<Observed>, ProbeParseError> {
    let not_reported = |what: String| ProbeParseError::NotReported { what };
    // A `file` or `dir` line leaves its metadata pending
    // until the `U` and `G` lines that must follow it directly.
    let mut observed: Vec<Option<Observed>> = vec![None; items.len()];
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

    items
        .iter()
        .zip(observed)
        .map(|(item, seen)| seen.ok_or_else(|| not_reported(format!("`{}`", item.key))))
        .collect()
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
