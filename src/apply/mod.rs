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
//! Tools used on the host: `dd` (`iflag=count_bytes,fullblock`,
//! `conv=excl,fsync`), `head`, `stat`, `chmod`, `chown`, `chgrp`, `sync`
//! (with file operands, to fsync a directory), `mv -T`, `ln`, `mkdir`,
//! `rmdir`, `rm`, `sha256sum`: GNU coreutils.
//!
//! Few processes per step (each one costs the host CPU): a new file is one
//! `dd` (exact length, exclusive create, fsync) and one `mv`, its mode set
//! by the umask where it can be; a new directory is one `mkdir -m`.

pub mod batch;
pub mod guard;
pub mod lock;

use std::fmt::Write as _;

use crate::core::diff::Action;
pub use crate::core::plan::PathType;
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

/// [`write_file_at`] where the plan saw nothing at `path`.
pub fn write_file(
    path: &str,
    content: &[u8],
    mode: Option<Mode>,
    owner: Option<&str>,
    group: Option<&str>,
) -> RemoteCommand {
    write_file_at(path, content, mode, owner, group, PathType::Nothing)
}

/// Replaces (or creates) the regular file at `path` with `content`,
/// atomically: the content goes to a temporary file in the same directory,
/// which gets its ownership and mode, is fsynced, and is renamed over `path`;
/// then the directory is fsynced. On any failure the temporary file is
/// removed and `path` is untouched.
///
/// `mode`, `owner` and `group` are managed only when given. What is not given
/// is kept from the regular file being replaced; a new file gets
/// [`NEW_FILE_MODE`] and the ownership of whoever runs the script.
///
/// `seen` is what the plan saw at `path`. New content over a regular file
/// always proceeds (it is not destructive, also when the file appeared after
/// the probe); anything else found at `path` (a directory, a symlink, a
/// special file) is replaced only when it is what the plan saw (a planned
/// replacement), else the step fails naming it. A regular file that already
/// has this content, mode and ownership is left alone.
pub fn write_file_at(
    path: &str,
    content: &[u8],
    mode: Option<Mode>,
    owner: Option<&str>,
    group: Option<&str>,
    seen: PathType,
) -> RemoteCommand {
    let mut s = Script::new();
    s.path_and_parent(path);
    s.require_parent("write");
    s.found();
    s.require_found(
        &[PathType::Nothing, PathType::File, seen],
        seen,
        "not replaced",
    );
    let len = content.len();
    // Already as desired (this content, and the mode and ownership given):
    // the content is read and dropped, and nothing on the host is touched,
    // not even the directory (no temporary file), so that running the step
    // twice changes nothing. The hash is computed here, from the content.
    let mut same = vec![
        r#"[ "$f" = file ]"#.to_string(),
        format!(
            r#"{{ h=$(sha256sum < "$p") && [ "${{h%% *}}" = {} ]; }}"#,
            crate::core::sha256_hex(content)
        ),
    ];
    same.extend(meta_matches(mode, owner, group));
    s.line(&format!("if {}; then", same.join(" && ")));
    s.line(&format!(
        "  head -c {} > /dev/null",
        len + CONTENT_END.len()
    ));
    s.line(r#"  printf 'tend: %s already has this content, mode and ownership\n' "$p""#);
    s.line("  exit 0");
    s.line("fi");
    s.temp_cleanup("rm -f");
    // The temporary name: the batch's nonce (from the controller) and the
    // shell's pid. `conv=excl` creates it with O_EXCL, so nothing planted
    // under that name (a symlink, a FIFO) is ever followed or written.
    s.line(r#"tmp="$d/.tend.${tend_nonce:-0}.$$""#);
    // A new file gets its mode from the umask where the mode has no bits
    // beyond rw (no chmod process); a kept mode or any other is set below.
    let created_mode = match mode {
        Some(m) if m.0 & !0o666 == 0 => Some(m),
        Some(_) => None,
        None => Some(NEW_FILE_MODE),
    };
    if let Some(m) = created_mode {
        s.line(&format!("umask {:03o}", !m.0 & 0o777));
    }
    // Exactly the content's length, not "until EOF": in a batch, the next
    // step's content follows on the same stdin. `dd` reads exactly that
    // many bytes, creates the file exclusively and fsyncs it, in one
    // process. The marker that follows the content proves it arrived whole:
    // a stream cut short ends before it.
    s.line(&format!(
        r#"dd bs=64K count={len} iflag=count_bytes,fullblock conv=excl,fsync status=none of="$tmp""#
    ));
    s.line(&format!(
        r#"IFS= read -r tend_m && [ "$tend_m" = {} ] || {{ echo "tend: content of $p arrived short" >&2; exit 1; }}"#,
        std::str::from_utf8(&CONTENT_END[..CONTENT_END.len() - 1]).expect("ASCII")
    ));
    // Ownership before mode: chown clears the set-user-ID and set-group-ID bits.
    let keep_ids = match (owner, group) {
        (None, None) => Some("%u:%g"),
        (None, Some(_)) => Some("%u"),
        (Some(_), None) => Some(":%g"),
        (Some(_), Some(_)) => None,
    };
    if mode.is_none() {
        s.line("m=");
    }
    if keep_ids.is_some() || mode.is_none() {
        s.line(r#"if [ "$f" = file ]; then"#);
        if let Some(format) = keep_ids {
            let format = quote(format);
            s.line(&format!("  o=$(stat -c {format} -- \"$p\")"));
            s.line(&format!(
                "  [ \"$o\" = \"$(stat -c {format} -- \"$tmp\")\" ] || chown -- \"$o\" \"$tmp\""
            ));
        }
        if mode.is_none() {
            s.line(r#"  m=$(stat -c %a -- "$p")"#);
        }
        s.line("fi");
    }
    s.chown(r#""$tmp""#, owner, group, false);
    // After every chown (which clears set-user-ID and set-group-ID bits):
    // the mode kept from the file replaced, or one the umask cannot give.
    match mode {
        None => s.line(&format!(
            r#"[ -z "$m" ] || [ "$m" = {:o} ] || chmod -- "$m" "$tmp""#,
            NEW_FILE_MODE.0
        )),
        Some(m) if created_mode.is_none() => {
            s.line(&format!(r#"chmod -- {} "$tmp""#, chmod_mode(m)))
        }
        Some(_) => {}
    }
    if seen == PathType::Directory {
        // A planned replacement of a directory: `mv` cannot rename a file
        // over one.
        s.line(r#"if [ "$f" = directory ]; then rm -rf -- "$p"; fi"#);
    }
    s.line(r#"mv -Tf -- "$tmp" "$p""#);
    s.line("tmp=");
    s.sync_dir();
    let mut stdin = Vec::with_capacity(len + CONTENT_END.len());
    stdin.extend_from_slice(content);
    stdin.extend_from_slice(CONTENT_END);
    RemoteCommand {
        script: s.finish(),
        stdin,
    }
}

/// What follows a file's content on the step's stdin: the write reads it
/// after the content, so a stream cut short is never renamed into place.
pub const CONTENT_END: &[u8] = b"tend-content-end\n";

/// Changes the mode and/or ownership of the existing file or directory at
/// `path` (`seen`, what the plan saw there), leaving its content alone, as
/// far as they differ. Refuses a missing path and anything but `seen` (a
/// symlink: chmod would follow it).
pub fn set_meta(
    path: &str,
    mode: Option<Mode>,
    owner: Option<&str>,
    group: Option<&str>,
    seen: PathType,
) -> RemoteCommand {
    let mut s = Script::new();
    s.var("p", path);
    s.found();
    s.line(r#"if [ "$f" = nothing ]; then"#);
    s.fail("cannot change %s: it does not exist", r#""$p""#);
    s.line("fi");
    // Only a file or a directory: chmod would follow a symlink.
    let allowed: Vec<PathType> = [seen]
        .into_iter()
        .filter(|t| matches!(t, PathType::File | PathType::Directory))
        .collect();
    s.require_found(&allowed, seen, "not changed");
    s.ensure_meta(mode, owner, group);
    s.command()
}

/// Creates the directory `path` (its parent must exist), with `mode`
/// (default [`NEW_DIRECTORY_MODE`]) and the ownership given. It starts out
/// private (0700) until owner and mode are set, and is removed again if
/// setting them fails. A directory already at `path` is accepted: it gets
/// the mode and ownership given, where they differ. Anything else at `path`
/// is removed only when it is what the plan saw (`seen`: a planned
/// replacement), else the step fails naming it.
pub fn make_directory(
    path: &str,
    mode: Option<Mode>,
    owner: Option<&str>,
    group: Option<&str>,
    seen: PathType,
) -> RemoteCommand {
    let mut s = Script::new();
    s.path_and_parent(path);
    s.require_parent("create");
    s.found();
    s.require_found(
        &[PathType::Nothing, PathType::Directory, seen],
        seen,
        "not replaced",
    );
    s.line(r#"if [ "$f" = directory ]; then"#);
    s.ensure_meta(mode, owner, group);
    s.line("  exit 0");
    s.line("fi");
    if !matches!(seen, PathType::Nothing | PathType::Directory) {
        s.line(r#"if [ "$f" != nothing ]; then rm -f -- "$p"; fi"#);
    }
    let mode = mode.unwrap_or(NEW_DIRECTORY_MODE);
    if owner.is_none() && group.is_none() {
        // One process: `mkdir -m` sets the mode regardless of the umask.
        // Under a set-group-ID parent the new directory inherits that bit,
        // which the mode given may not have: chmod then clears it.
        s.line(&format!(r#"mkdir -m {} -- "$p""#, chmod_mode(mode)));
        s.line(&format!(
            r#"[ ! -g "$d" ] || chmod -- {} "$p""#,
            chmod_mode(mode)
        ));
    } else {
        s.line("c=");
        s.line(r#"trap '[ -z "$c" ] || rmdir -- "$p"' EXIT"#);
        s.signal_traps();
        s.line(r#"mkdir -m 0700 -- "$p""#);
        s.line("c=1");
        s.chown(r#""$p""#, owner, group, false);
        s.line(&format!(r#"chmod -- {} "$p""#, chmod_mode(mode)));
        s.line("c=");
    }
    s.sync_dir();
    s.command()
}

/// Makes `path` a symlink to `target`, atomically: the link is made under a
/// temporary directory beside `path` and renamed over it. A symlink at
/// `path` is retargeted (one that already points at `target` is left
/// alone); anything else is replaced only when it is what the plan saw
/// (`seen`: a planned replacement), else the step fails naming it.
pub fn make_symlink(path: &str, target: &str, seen: PathType) -> RemoteCommand {
    let mut s = Script::new();
    s.path_and_parent(path);
    s.var("t", target);
    s.require_parent("create");
    s.found();
    s.require_found(
        &[PathType::Nothing, PathType::Symlink, seen],
        seen,
        "not replaced",
    );
    // `readlink` ends the target with a newline and `$(...)` strips every
    // trailing newline, so both sides get one more character first.
    s.var("w", &format!("{target}\n."));
    s.line(r#"if [ "$f" = symlink ] && [ "$(readlink -- "$p"; echo .)" = "$w" ]; then exit 0; fi"#);
    if seen == PathType::Directory {
        s.line(r#"if [ "$f" = directory ]; then rm -rf -- "$p"; fi"#);
    }
    // symlink(2) never follows or reuses a name that exists, so the
    // temporary link cannot be redirected by anything planted there.
    s.temp_cleanup("rm -f");
    s.line(r#"tmp="$d/.tend.${tend_nonce:-0}.$$""#);
    s.line(r#"ln -s -- "$t" "$tmp""#);
    s.line(r#"mv -Tf -- "$tmp" "$p""#);
    s.line("tmp=");
    s.sync_dir();
    s.command()
}

/// Removes the file at `path`; absent already is fine. Refuses anything but
/// what the plan saw (`seen`).
pub fn remove_file(path: &str, seen: PathType) -> RemoteCommand {
    remove(path, seen, "rm -f")
}

/// Removes the symlink at `path` (not its target); absent already is fine.
/// Refuses anything but what the plan saw (`seen`).
pub fn remove_symlink(path: &str, seen: PathType) -> RemoteCommand {
    remove(path, seen, "rm -f")
}

/// Removes the directory at `path` and everything in it; absent already is
/// fine. Whether that is allowed is the planner's decision; what is there
/// must still be what the plan saw (`seen`). The root directory is refused
/// outright.
pub fn remove_directory(path: &str, seen: PathType) -> RemoteCommand {
    if path.bytes().all(|b| b == b'/') {
        let mut s = Script::new();
        s.var("p", path);
        s.fail("refusing to remove %s", r#""$p""#);
        return s.command();
    }
    remove(path, seen, "rm -rf")
}

fn remove(path: &str, seen: PathType, rm: &str) -> RemoteCommand {
    let mut s = Script::new();
    s.var("p", path);
    s.found();
    s.require_found(&[PathType::Nothing, seen], seen, "not removed");
    s.line(&format!(r#"{rm} -- "$p""#));
    s.command()
}

/// Whether a step of this kind and action may be sent again after an
/// attempt that may have started (SPEC 8.3): running it twice ends in the
/// same state as running it once. Path writes, package installs, user and
/// group creates and updates are, because their builders check the host
/// first and accept "already as desired". Deletes of paths, users, groups
/// and packages are too: their builders accept "already gone" and refuse
/// anything of another type than the plan saw, so a second attempt removes
/// at most what the first was allowed to. A `command` (its effect is
/// unknown) and a service action (a second restart is a second outage;
/// stop and start are not checked before they act) are not.
pub fn is_idempotent(kind: &str, action: Action) -> bool {
    match kind {
        "file" | "directory" | "symlink" | "user" | "group" | "package" => true,
        "command" | "service" => action == Action::Noop,
        _ => false,
    }
}

/// A mode as `chmod` must see it: five octal digits, because GNU chmod keeps
/// a directory's set-user-ID and set-group-ID bits for a four-digit mode and
/// clears them only when the mode has a fifth, leading zero.
fn chmod_mode(mode: Mode) -> String {
    format!("{:05o}", mode.0 & 0o7777)
}

/// Tests (shell words) that `$p` has the mode and ownership given; an
/// owner or group matches by name or by number.
fn meta_matches(mode: Option<Mode>, owner: Option<&str>, group: Option<&str>) -> Vec<String> {
    let mut tests = Vec::new();
    for (want, name, id) in [(owner, "%U", "%u"), (group, "%G", "%g")] {
        if let Some(w) = want {
            let w = quote(w);
            tests.push(format!(
                r#"{{ [ "$(stat -c {name} -- "$p")" = {w} ] || [ "$(stat -c {id} -- "$p")" = {w} ]; }}"#
            ));
        }
    }
    if let Some(m) = mode {
        tests.push(format!(
            r#"[ "$(stat -c %a -- "$p")" = '{:o}' ]"#,
            m.0 & 0o7777
        ));
    }
    tests
}

/// The word [`Script::found`] sets `f` to for this type.
fn code(t: PathType) -> &'static str {
    match t {
        PathType::Nothing => "nothing",
        PathType::File => "file",
        PathType::Directory => "directory",
        PathType::Symlink => "symlink",
        PathType::Other => "other",
    }
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

    /// Sets `f` to what is at `$p` now, without following a symlink:
    /// `nothing`, `file`, `directory`, `symlink` or `other`.
    fn found(&mut self) {
        self.line(
            r#"if [ -L "$p" ]; then f=symlink; elif [ -d "$p" ]; then f=directory; elif [ -f "$p" ]; then f=file; elif [ -e "$p" ]; then f=other; else f=nothing; fi"#,
        );
    }

    /// Fails, naming `$p` and what is there, unless `f` is one of
    /// `allowed`: the step never removes or replaces an object of another
    /// type than the plan saw (`seen`). The check and the change run in
    /// the same script, on the host.
    fn require_found(&mut self, allowed: &[PathType], seen: PathType, verb: &str) {
        let refused: Vec<PathType> = PathType::ALL
            .into_iter()
            .filter(|t| !allowed.contains(t))
            .collect();
        if refused.is_empty() {
            return;
        }
        self.line("case $f in");
        for t in refused {
            self.line(&format!("{})", code(t)));
            self.fail(
                &format!(
                    "%s: found {} where the plan saw {}; {verb}",
                    t.describe(),
                    seen.describe()
                ),
                r#""$p""#,
            );
            self.line("  ;;");
        }
        self.line("esac");
    }

    /// Mode and ownership of `$p` as given, each changed only where it
    /// differs (an owner or group matches by name or by number), so that a
    /// second run changes nothing, not even the inode's ctime.
    fn ensure_meta(&mut self, mode: Option<Mode>, owner: Option<&str>, group: Option<&str>) {
        // Ownership before mode: chown clears the set-user-ID and set-group-ID bits.
        for (want, name, id, tool) in [(owner, "%U", "%u", "chown"), (group, "%G", "%g", "chgrp")] {
            if let Some(w) = want {
                let w = quote(w);
                // -h: should a symlink appear after the check, change the
                // link, not its target.
                self.line(&format!(
                    r#"[ "$(stat -c {name} -- "$p")" = {w} ] || [ "$(stat -c {id} -- "$p")" = {w} ] || {tool} -h -- {w} "$p""#
                ));
            }
        }
        if let Some(m) = mode {
            self.line(&format!(
                r#"[ "$(stat -c %a -- "$p")" = '{:o}' ] || chmod -- {} "$p""#,
                m.0 & 0o7777,
                chmod_mode(m)
            ));
        }
    }

    /// Makes the entries changed in `$d` durable: in a batch, one `sync`
    /// of every directory touched when the batch ends (the batch's
    /// `tend_dirs` list); alone, right away.
    fn sync_dir(&mut self) {
        self.line(r#"if [ -n "${tend_dirs:-}" ]; then printf '%s\0' "$d" >> "$tend_dirs"; else sync -- "$d"; fi"#);
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
