//! Remote command builders: one POSIX `sh` script per change, ready for
//! [`crate::transport::Transport::exec`]. Path-based resources (file,
//! directory, symlink) are here; users and groups in [`account`], packages
//! (one call for a list) in [`package`], commands in [`command`], services
//! in [`service`].
//!
//! Invariant: pure. Every path, name and value reaches the script through
//! [`crate::shell::quote`], assigned once to a shell variable and used as
//! `"$var"` after that; file content never appears in a script, it travels on
//! stdin. Every script starts with `set -eu`, reports its own refusals on
//! stderr as `tend: ...` with the path, and exits non-zero on any failure.
//! Whether a change is allowed (destructive or not) is the planner's call,
//! not these builders'.
//!
//! Paths are absolute (the model validates that). Parents are never created:
//! the planner orders a directory before what is inside it, so a missing
//! parent is an error worth seeing, not something to paper over with `-p`.
//!
//! Tools used on the host: `mktemp`, `cat`, `stat`, `chmod`, `chown`, `chgrp`,
//! `sync` (with file operands, to fsync one file or directory), `mv -T`,
//! `ln`, `mkdir`, `rmdir`, `rm`: GNU coreutils or a recent BusyBox.

pub mod batch;

use std::fmt::Write as _;

use crate::core::spec::Mode;
use crate::shell::quote;

pub mod account;
pub mod command;
pub mod package;
pub mod service;

pub use account::{
    UserFields, create_group, create_user, delete_group, delete_user, modify_group, modify_user,
};
pub use command::run_command;
pub use package::{PackageManager, install_packages, remove_packages};

#[cfg(test)]
mod tests;

/// The mode of a file that tend creates without a `mode`.
pub const NEW_FILE_MODE: Mode = Mode(0o644);
/// The mode of a directory that tend creates without a `mode`.
pub const NEW_DIRECTORY_MODE: Mode = Mode(0o755);

/// A script for the host's `sh` and the bytes to feed it on stdin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteCommand {
    pub script: String,
    pub stdin: Vec<u8>,
}

/// Replaces (or creates) the regular file at `path` with `content`,
/// atomically: the content goes to a temporary file in the same directory,
/// which gets its ownership and mode, is fsynced, and is renamed over `path`;
/// then the directory is fsynced. On any failure the temporary file is
/// removed and `path` is untouched.
///
/// `mode`, `owner` and `group` are managed only when given. What is not given
/// is kept from the regular file being replaced; a new file gets
/// [`NEW_FILE_MODE`] and the ownership of whoever runs the script. A symlink
/// at `path` is replaced by the file (its target is left alone); a directory
/// at `path` is an error.
pub fn write_file(
    path: &str,
    content: &[u8],
    mode: Option<Mode>,
    owner: Option<&str>,
    group: Option<&str>,
) -> RemoteCommand {
    let mut s = Script::new();
    s.path_and_parent(path);
    s.require_parent("write");
    s.temp_cleanup("rm -f");
    s.line(r#"tmp=$(mktemp "$d/.tend.XXXXXX")"#);
    // Exactly the content's length, not "until EOF": in a batch, the next
    // step's content follows on the same stdin. A short read is an error.
    let len = content.len();
    s.line(&format!(r#"head -c {len} > "$tmp""#));
    s.line(&format!(
        r#"[ "$(wc -c < "$tmp")" -eq {len} ] || {{ echo "tend: content of $p arrived short" >&2; exit 1; }}"#
    ));
    // Ownership before mode: chown clears the set-user-ID and set-group-ID bits.
    let keep_ids = match (owner, group) {
        (None, None) => Some("%u:%g"),
        (None, Some(_)) => Some("%u"),
        (Some(_), None) => Some(":%g"),
        (Some(_), Some(_)) => None,
    };
    if keep_ids.is_some() || mode.is_none() {
        s.line(r#"if [ -f "$p" ] && [ ! -L "$p" ]; then"#);
        if let Some(format) = keep_ids {
            let format = quote(format);
            s.line(&format!("  o=$(stat -c {format} -- \"$p\")"));
            s.line(&format!(
                "  [ \"$o\" = \"$(stat -c {format} -- \"$tmp\")\" ] || chown -- \"$o\" \"$tmp\""
            ));
        }
        if mode.is_none() {
            s.line(r#"  m=$(stat -c %a -- "$p")"#);
            s.line("else");
            s.line(&format!("  m={}", chmod_mode(NEW_FILE_MODE)));
        }
        s.line("fi");
    }
    s.chown(r#""$tmp""#, owner, group, false);
    match mode {
        Some(m) => s.line(&format!(r#"chmod -- {} "$tmp""#, chmod_mode(m))),
        None => s.line(r#"chmod -- "$m" "$tmp""#),
    }
    s.line(r#"sync -- "$tmp""#);
    s.line(r#"mv -Tf -- "$tmp" "$p""#);
    s.line("tmp=");
    s.line(r#"sync -- "$d""#);
    RemoteCommand {
        script: s.finish(),
        stdin: content.to_vec(),
    }
}

/// Changes the mode and/or ownership of the existing file or directory at
/// `path`, leaving its content alone. Refuses a symlink (chmod would follow
/// it) and a missing path.
pub fn set_meta(
    path: &str,
    mode: Option<Mode>,
    owner: Option<&str>,
    group: Option<&str>,
) -> RemoteCommand {
    let mut s = Script::new();
    s.var("p", path);
    s.line(r#"if [ -L "$p" ]; then"#);
    s.fail("cannot change %s: it is a symlink", r#""$p""#);
    s.line(r#"elif [ ! -e "$p" ]; then"#);
    s.fail("cannot change %s: it does not exist", r#""$p""#);
    s.line("fi");
    // -h: should a symlink appear after the check, change the link, not its target.
    s.chown(r#""$p""#, owner, group, true);
    if let Some(m) = mode {
        s.line(&format!(r#"chmod -- {} "$p""#, chmod_mode(m)));
    }
    s.command()
}

/// Creates the directory `path` (its parent must exist), with `mode`
/// (default [`NEW_DIRECTORY_MODE`]) and the ownership given. It starts out
/// private (0700) until owner and mode are set, and is removed again if
/// setting them fails. An existing `path` is an error.
pub fn make_directory(
    path: &str,
    mode: Option<Mode>,
    owner: Option<&str>,
    group: Option<&str>,
) -> RemoteCommand {
    let mut s = Script::new();
    s.path_and_parent(path);
    s.require_parent("create");
    s.line("c=");
    s.line(r#"trap '[ -z "$c" ] || rmdir -- "$p"' EXIT"#);
    s.signal_traps();
    s.line(r#"mkdir -m 0700 -- "$p""#);
    s.line("c=1");
    s.chown(r#""$p""#, owner, group, false);
    s.line(&format!(
        r#"chmod -- {} "$p""#,
        chmod_mode(mode.unwrap_or(NEW_DIRECTORY_MODE))
    ));
    s.line("c=");
    s.line(r#"sync -- "$d""#);
    s.command()
}

/// Makes `path` a symlink to `target`, atomically, whether `path` is absent,
/// a symlink (retarget) or a file: the link is made under a temporary
/// directory beside `path` and renamed over it. A directory at `path` is an
/// error.
pub fn make_symlink(path: &str, target: &str) -> RemoteCommand {
    let mut s = Script::new();
    s.path_and_parent(path);
    s.var("t", target);
    s.require_parent("create");
    // A fresh directory gives a link name nobody else can race for.
    s.temp_cleanup("rm -rf");
    s.line(r#"tmp=$(mktemp -d "$d/.tend.XXXXXX")"#);
    s.line(r#"ln -s -- "$t" "$tmp/l""#);
    s.line(r#"mv -Tf -- "$tmp/l" "$p""#);
    s.line(r#"rmdir -- "$tmp""#);
    s.line("tmp=");
    s.line(r#"sync -- "$d""#);
    s.command()
}

/// Removes the file at `path`; absent already is fine. `rm` without `-r`
/// will not remove a directory.
pub fn remove_file(path: &str) -> RemoteCommand {
    let mut s = Script::new();
    s.var("p", path);
    s.line(r#"rm -f -- "$p""#);
    s.command()
}

/// Removes the symlink at `path` (not its target); absent already is fine.
/// Refuses if something other than a symlink is there now.
pub fn remove_symlink(path: &str) -> RemoteCommand {
    let mut s = Script::new();
    s.var("p", path);
    s.line(r#"if [ -e "$p" ] && [ ! -L "$p" ]; then"#);
    s.fail("not removing %s: it is no longer a symlink", r#""$p""#);
    s.line("fi");
    s.line(r#"rm -f -- "$p""#);
    s.command()
}

/// Removes the directory at `path` and everything in it; absent already is
/// fine. Whether that is allowed is the planner's decision. The root
/// directory is refused outright.
pub fn remove_directory(path: &str) -> RemoteCommand {
    let mut s = Script::new();
    s.var("p", path);
    if path.bytes().all(|b| b == b'/') {
        s.fail("refusing to remove %s", r#""$p""#);
        return s.command();
    }
    s.line(r#"rm -rf -- "$p""#);
    s.command()
}

/// A mode as `chmod` must see it: five octal digits, because GNU chmod keeps
/// a directory's set-user-ID and set-group-ID bits for a four-digit mode and
/// clears them only when the mode has a fifth, leading zero.
fn chmod_mode(mode: Mode) -> String {
    format!("{:05o}", mode.0 & 0o7777)
}

/// The parent directory of an absolute path, without following anything:
/// `/a/b` → `/a`, `/a` → `/`, `/a/b/` → `/a`.
fn parent(path: &str) -> &str {
    debug_assert!(path.starts_with('/'), "paths are absolute: {path:?}");
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &trimmed[..i],
    }
}

/// A script under construction: `set -eu`, then one line at a time.
struct Script(String);

impl Script {
    fn new() -> Self {
        Script("set -eu\n".to_string())
    }

    fn line(&mut self, line: &str) {
        self.0.push_str(line);
        self.0.push('\n');
    }

    /// `name=VALUE`, quoted: the only way values enter a script.
    fn var(&mut self, name: &str, value: &str) {
        writeln!(self.0, "{name}={}", quote(value)).expect("writing to a String cannot fail");
    }

    /// `p` is the path and `d` its parent directory. The parent is computed
    /// here, not with `dirname`, because `$(...)` would strip a trailing
    /// newline from a directory name.
    fn path_and_parent(&mut self, path: &str) {
        self.var("p", path);
        self.var("d", parent(path));
    }

    fn require_parent(&mut self, verb: &str) {
        self.line(r#"if [ ! -d "$d" ]; then"#);
        self.fail(
            &format!("cannot {verb} %s: directory %s does not exist"),
            r#""$p" "$d""#,
        );
        self.line("fi");
    }

    /// Prints `tend: MESSAGE` (a printf format whose `%s` take `args`) on
    /// stderr and exits 1.
    fn fail(&mut self, format: &str, args: &str) {
        // `\n` stays two characters here: printf turns it into the newline.
        let format = quote(&format!("tend: {format}\\n"));
        self.line(&format!("  printf {format} {args} >&2"));
        self.line("  exit 1");
    }

    /// Removes `$tmp` with `rm` when the script ends before clearing it,
    /// including on the usual termination signals.
    fn temp_cleanup(&mut self, rm: &str) {
        self.line("tmp=");
        self.line(&format!(r#"trap '[ -z "$tmp" ] || {rm} -- "$tmp"' EXIT"#));
        self.signal_traps();
    }

    /// Turns HUP, INT and TERM into an ordinary exit so that the EXIT trap
    /// runs. (SIGKILL, e.g. from a transport timeout, cannot be caught: a
    /// `.tend.*` temporary may then stay behind.)
    fn signal_traps(&mut self) {
        self.line("trap 'exit 129' HUP");
        self.line("trap 'exit 130' INT");
        self.line("trap 'exit 143' TERM");
    }

    /// `chown`/`chgrp` of `target` (already a shell word) as far as given.
    fn chown(&mut self, target: &str, owner: Option<&str>, group: Option<&str>, no_follow: bool) {
        let h = if no_follow { "-h " } else { "" };
        let line = match (owner, group) {
            (Some(o), Some(g)) => format!("chown {h}-- {} {target}", quote(&format!("{o}:{g}"))),
            (Some(o), None) => format!("chown {h}-- {} {target}", quote(o)),
            (None, Some(g)) => format!("chgrp {h}-- {} {target}", quote(g)),
            (None, None) => return,
        };
        self.line(&line);
    }

    fn finish(self) -> String {
        self.0
    }

    fn command(self) -> RemoteCommand {
        RemoteCommand {
            script: self.finish(),
            stdin: Vec::new(),
        }
    }
}
