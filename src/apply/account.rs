//! Users and groups: `useradd`, `usermod`, `userdel`, `groupadd`,
//! `groupmod`, `groupdel` (shadow-utils, as on Debian, Fedora and Alpine's
//! `shadow` package), and `getent` to check what is there.
//!
//! Names are valid account names (the model checks `[a-z_][a-z0-9_-]*$?`),
//! but they still go through `quote` like every other value, and options end
//! with `--` before the name.

use super::{RemoteCommand, Script};
use crate::shell::quote;

/// What `useradd` is given: only the fields the resource sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserFields<'a> {
    pub uid: Option<u32>,
    pub home: Option<&'a str>,
    pub shell: Option<&'a str>,
    /// Supplementary groups; not managed when None.
    pub groups: Option<&'a [String]>,
}

impl UserFields<'_> {
    /// The options for these fields, as quoted words. `useradd` and
    /// `usermod` spell them alike.
    fn options(&self) -> Vec<String> {
        let mut o = Vec::new();
        if let Some(uid) = self.uid {
            o.push(format!("-u {}", quote(&uid.to_string())));
        }
        if let Some(home) = self.home {
            o.push(format!("-d {}", quote(home)));
        }
        if let Some(shell) = self.shell {
            o.push(format!("-s {}", quote(shell)));
        }
        if let Some(groups) = self.groups {
            o.push(format!("-G {}", quote(&groups.join(","))));
        }
        o
    }
}

/// Creates the user `name`. With `home`, the home directory is created too
/// (`-m`); `system` makes a system account (`-r`). A group named like the
/// user that exists already becomes its primary group (`-g`), since
/// `useradd` would otherwise refuse to create the user's own group;
/// otherwise `useradd` does what the host's `login.defs` says (on Debian, a
/// group of the user's name).
///
/// A user that exists already is accepted: the fields given are made so,
/// where they differ (as [`modify_user`] does), so that running the step
/// twice changes nothing.
pub fn create_user(name: &str, fields: UserFields, system: bool) -> RemoteCommand {
    let mut s = Script::new();
    s.var("n", name);
    s.line(r#"if getent passwd "$n" >/dev/null 2>&1; then"#);
    ensure_user(&mut s, fields);
    s.line("  exit 0");
    s.line("fi");
    s.line(r#"if getent group "$n" >/dev/null 2>&1; then set -- -g "$n"; else set --; fi"#);
    let mut words = vec!["useradd".to_string(), r#""$@""#.to_string()];
    if system {
        words.push("-r".into());
    }
    words.extend(fields.options());
    if fields.home.is_some() {
        words.push("-m".into());
    }
    words.push(r#"-- "$n""#.into());
    s.line(&words.join(" "));
    s.command()
}

/// Changes the given fields of the existing user `name`, those that differ
/// on the host (checked first, so a second run changes nothing). A new
/// `home` is only recorded: the old directory is neither moved nor removed
/// (that would not be a non-destructive update); `-G` sets the complete
/// list of supplementary groups. A missing user is an error.
pub fn modify_user(name: &str, fields: UserFields) -> RemoteCommand {
    let mut s = Script::new();
    s.var("n", name);
    s.line(r#"if ! getent passwd "$n" >/dev/null 2>&1; then"#);
    s.fail("cannot change user %s: it does not exist", r#""$n""#);
    s.line("fi");
    ensure_user(&mut s, fields);
    s.command()
}

/// `usermod` with the options of the fields given whose value on the host
/// differs: uid, home and shell from `getent passwd`, supplementary groups
/// (compared as sets, the primary group left out) from `id`.
fn ensure_user(s: &mut Script, fields: UserFields) {
    if fields.options().is_empty() {
        return;
    }
    s.line(r#"e=$(getent passwd "$n") || e="$n:::::""#);
    s.line("IFS=: read -r _ _ cu _ _ ch cs <<TEND_PW_END");
    s.line("$e");
    s.line("TEND_PW_END");
    s.line("set --");
    if let Some(uid) = fields.uid {
        let v = quote(&uid.to_string());
        s.line(&format!(r#"[ "$cu" = {v} ] || set -- "$@" -u {v}"#));
    }
    if let Some(home) = fields.home {
        let v = quote(home);
        s.line(&format!(r#"[ "$ch" = {v} ] || set -- "$@" -d {v}"#));
    }
    if let Some(shell) = fields.shell {
        let v = quote(shell);
        s.line(&format!(r#"[ "$cs" = {v} ] || set -- "$@" -s {v}"#));
    }
    if let Some(groups) = fields.groups {
        let want = quote(&groups.join(" "));
        s.line(&format!("w={want}"));
        s.line(r#"pg=$(id -gn -- "$n" 2>/dev/null) || pg="#);
        s.line(r#"cg=$(id -nG -- "$n" 2>/dev/null) || cg="#);
        s.line("x=");
        s.line(r#"for g in $cg; do [ "$g" = "$pg" ] || case " $w " in *" $g "*) ;; *) x=1 ;; esac; done"#);
        s.line(r#"for g in $w; do [ "$g" = "$pg" ] || case " $cg " in *" $g "*) ;; *) x=1 ;; esac; done"#);
        s.line(&format!(
            r#"[ -z "$x" ] || set -- "$@" -G {}"#,
            quote(&groups.join(","))
        ));
    }
    s.line(r#"if [ "$#" -gt 0 ]; then usermod "$@" -- "$n"; fi"#);
}

/// Removes the user `name`; its home directory and files stay. Absent
/// already is fine.
pub fn delete_user(name: &str) -> RemoteCommand {
    let mut s = Script::new();
    s.var("n", name);
    s.line(r#"if getent passwd "$n" >/dev/null 2>&1; then userdel -- "$n"; fi"#);
    s.command()
}

/// Creates the group `name`, with `gid` when given. A group that exists
/// already is accepted (its gid made `gid` where given and different).
pub fn create_group(name: &str, gid: Option<u32>) -> RemoteCommand {
    let mut s = Script::new();
    s.var("n", name);
    s.line(r#"if getent group "$n" >/dev/null 2>&1; then"#);
    if let Some(gid) = gid {
        ensure_gid(&mut s, gid);
    }
    s.line("  exit 0");
    s.line("fi");
    match gid {
        Some(gid) => s.line(&format!(
            r#"groupadd -g {} -- "$n""#,
            quote(&gid.to_string())
        )),
        None => s.line(r#"groupadd -- "$n""#),
    }
    s.command()
}

/// Changes the gid of the existing group `name`, if it differs.
pub fn modify_group(name: &str, gid: u32) -> RemoteCommand {
    let mut s = Script::new();
    s.var("n", name);
    s.line(r#"if ! getent group "$n" >/dev/null 2>&1; then"#);
    s.fail("cannot change group %s: it does not exist", r#""$n""#);
    s.line("fi");
    ensure_gid(&mut s, gid);
    s.command()
}

fn ensure_gid(s: &mut Script, gid: u32) {
    let v = quote(&gid.to_string());
    s.line(r#"e=$(getent group "$n") || e="$n::""#);
    s.line("IFS=: read -r _ _ cg _ <<TEND_GR_END");
    s.line("$e");
    s.line("TEND_GR_END");
    s.line(&format!(r#"[ "$cg" = {v} ] || groupmod -g {v} -- "$n""#));
}

/// Removes the group `name`. Absent already is fine; `groupdel` refuses a
/// group that is still some user's primary group, and the step fails.
pub fn delete_group(name: &str) -> RemoteCommand {
    let mut s = Script::new();
    s.var("n", name);
    s.line(r#"if getent group "$n" >/dev/null 2>&1; then groupdel -- "$n"; fi"#);
    s.command()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::transport::Transport;
    use crate::transport::local::LocalTransport;

    fn groups(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn create_user_passes_what_is_given() {
        let g = groups(&["adm", "sudo"]);
        let cmd = create_user(
            "app",
            UserFields {
                uid: Some(1500),
                home: Some("/srv/app home"),
                shell: Some("/bin/sh"),
                groups: Some(&g),
            },
            true,
        );
        assert!(
            cmd.script.starts_with(
                "set -eu\n\
                 n='app'\n\
                 if getent passwd \"$n\" >/dev/null 2>&1; then\n"
            ),
            "{}",
            cmd.script
        );
        assert!(
            cmd.script.ends_with(
                "if getent group \"$n\" >/dev/null 2>&1; then set -- -g \"$n\"; else set --; fi\n\
                 useradd \"$@\" -r -u '1500' -d '/srv/app home' -s '/bin/sh' -G 'adm,sudo' -m -- \"$n\"\n"
            ),
            "{}",
            cmd.script
        );
        assert!(cmd.stdin.is_empty());
        // Nothing given: no options, no home created.
        let cmd = create_user("app", UserFields::default(), false);
        assert!(
            cmd.script.ends_with("useradd \"$@\" -- \"$n\"\n"),
            "{}",
            cmd.script
        );
    }

    #[test]
    fn modify_user_passes_only_what_changed() {
        let g = groups(&["adm"]);
        let cmd = modify_user(
            "app",
            UserFields {
                shell: Some("/bin/it's"),
                groups: Some(&g),
                ..UserFields::default()
            },
        );
        for want in [
            "[ \"$cs\" = '/bin/it'\\''s' ] || set -- \"$@\" -s '/bin/it'\\''s'\n",
            "[ -z \"$x\" ] || set -- \"$@\" -G 'adm'\n",
            "if [ \"$#\" -gt 0 ]; then usermod \"$@\" -- \"$n\"; fi\n",
        ] {
            assert!(cmd.script.contains(want), "{want}\n{}", cmd.script);
        }
        assert!(!cmd.script.contains("-u "), "{}", cmd.script);
        let cmd = modify_user(
            "app",
            UserFields {
                uid: Some(7),
                home: Some("/h"),
                ..UserFields::default()
            },
        );
        assert!(cmd.script.contains("set -- \"$@\" -u '7'\n"));
        assert!(cmd.script.contains("set -- \"$@\" -d '/h'\n"));
        assert!(!cmd.script.contains("-m"), "a home is never moved");
        assert_eq!(
            modify_user("app", UserFields::default()).script,
            "set -eu\nn='app'\nif ! getent passwd \"$n\" >/dev/null 2>&1; then\n  \
             printf 'tend: cannot change user %s: it does not exist\\n' \"$n\" >&2\n  exit 1\nfi\n"
        );
    }

    #[test]
    fn deletes_check_first_and_groups_take_a_gid() {
        assert_eq!(
            delete_user("app").script,
            "set -eu\nn='app'\nif getent passwd \"$n\" >/dev/null 2>&1; then userdel -- \"$n\"; fi\n"
        );
        assert!(!delete_user("app").script.contains("-r"), "files stay");
        assert_eq!(
            delete_group("app").script,
            "set -eu\nn='app'\nif getent group \"$n\" >/dev/null 2>&1; then groupdel -- \"$n\"; fi\n"
        );
        assert!(
            create_group("app", Some(500))
                .script
                .ends_with("groupadd -g '500' -- \"$n\"\n")
        );
        assert!(
            create_group("app", None)
                .script
                .ends_with("groupadd -- \"$n\"\n")
        );
        assert!(
            modify_group("app", 501)
                .script
                .ends_with("groupmod -g '501' -- \"$n\"\n")
        );
    }

    /// Runs `cmd` with stub account tools first on PATH: each logs its name
    /// and arguments, one per line, to `log`. `getent` finds only the names
    /// listed in `existing`.
    fn run_stubbed(cmd: &RemoteCommand, existing: &[&str]) -> (i32, String) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let log = dir.path().join("log");
        let known = existing.join(" ");
        for tool in [
            "getent", "useradd", "usermod", "userdel", "groupadd", "groupmod", "groupdel",
        ] {
            let body = if tool == "getent" {
                format!(
                    "#!/bin/sh\nfor k in {known}; do [ \"$k\" = \"$1:$2\" ] && exit 0; done\nexit 2\n"
                )
            } else {
                format!(
                    "#!/bin/sh\necho {tool} >> '{log}'\nfor a in \"$@\"; do printf '[%s]\\n' \"$a\" >> '{log}'; done\n",
                    log = log.display()
                )
            };
            let p = bin.join(tool);
            fs::write(&p, body).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let script = format!("PATH={}:$PATH\n{}", bin.display(), cmd.script);
        let out = LocalTransport::new()
            .exec(&script, &cmd.stdin, Duration::from_secs(30))
            .unwrap();
        let logged = fs::read_to_string(&log).unwrap_or_default();
        (out.status, logged)
    }

    #[test]
    fn every_value_reaches_the_tool_as_one_argument() {
        let g = groups(&["adm", "web"]);
        let fields = UserFields {
            uid: Some(1500),
            home: Some("/srv/a b/it's $(x)"),
            shell: Some("/bin/sh"),
            groups: Some(&g),
        };
        let (status, log) = run_stubbed(&create_user("app", fields, false), &[]);
        assert_eq!(status, 0);
        assert_eq!(
            log,
            "useradd\n[-u]\n[1500]\n[-d]\n[/srv/a b/it's $(x)]\n[-s]\n[/bin/sh]\n[-G]\n[adm,web]\n[-m]\n[--]\n[app]\n"
        );
        assert!(!Path::new("/srv/a b").exists());
        // A group of the user's name becomes its primary group.
        let (_, log) = run_stubbed(
            &create_user("app", UserFields::default(), true),
            &["group:app"],
        );
        assert_eq!(log, "useradd\n[-g]\n[app]\n[-r]\n[--]\n[app]\n");
    }

    #[test]
    fn deletes_run_only_when_the_account_exists() {
        assert_eq!(run_stubbed(&delete_user("app"), &[]), (0, String::new()));
        assert_eq!(
            run_stubbed(&delete_user("app"), &["passwd:app"]),
            (0, "userdel\n[--]\n[app]\n".into())
        );
        assert_eq!(run_stubbed(&delete_group("app"), &[]), (0, String::new()));
        assert_eq!(
            run_stubbed(&delete_group("app"), &["group:app"]),
            (0, "groupdel\n[--]\n[app]\n".into())
        );
        assert_eq!(
            run_stubbed(&modify_group("app", 9), &["group:app"]),
            (0, "groupmod\n[-g]\n[9]\n[--]\n[app]\n".into())
        );
    }
}
