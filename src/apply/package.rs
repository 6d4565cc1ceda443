//! Packages: one call of the host's package manager for a whole list of
//! packages (dispatch groups the adjacent package steps of a host into one
//! list), for apt, dnf and apk.
//!
//! apt runs non-interactively (`DEBIAN_FRONTEND=noninteractive`, keeping
//! changed configuration files: `--force-confdef --force-confold`) and waits
//! up to two minutes for the dpkg lock. An install that fails is retried once
//! after `apt-get update`, which is what a fresh host with no (or stale)
//! package lists needs. A removal refuses to go on when apt would also
//! remove packages that were not named (their dependents): those must be
//! declared absent too, so that the plan and its confirmation show them.
//!
//! Names are valid package names (the model checks that they start with a
//! letter or digit), so they cannot be taken for options; apt-get still gets
//! `--` before them.

use super::{RemoteCommand, Script};
use crate::shell::quote;

/// The package managers tend drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackageManager {
    Apt,
    Dnf,
    Apk,
}

impl PackageManager {
    /// From the probe's `package_manager` fact (`apt`, `dnf`, `apk`).
    pub fn from_fact(fact: &str) -> Option<Self> {
        match fact {
            "apt" => Some(PackageManager::Apt),
            "dnf" => Some(PackageManager::Dnf),
            "apk" => Some(PackageManager::Apk),
            _ => None,
        }
    }
}

/// Options every apt-get call gets: wait for the dpkg lock rather than fail
/// at once when something else holds it.
const APT: &str = "apt-get -q -o DPkg::Lock::Timeout=120";

/// `set -- 'p1' 'p2' ...`: the names as the script's positional parameters.
fn names_line(s: &mut Script, names: &[&str]) {
    let quoted: Vec<String> = names.iter().map(|n| quote(n)).collect();
    s.line(&format!("set -- {}", quoted.join(" ")));
}

/// `set --` to the packages of the positional parameters that are
/// installed (`want = true`) or not installed (`want = false`), asking the
/// host's package database about each first: the step then acts only on
/// what is not yet as desired, and ends at once when nothing is left.
fn keep_only(s: &mut Script, manager: PackageManager, want: bool, done: &str) {
    let check = match manager {
        // One dpkg-query for the whole list (not a process per name): every
        // installed package as each name may ask for it (`NAME`, and
        // `NAME:ARCH` whether or not dpkg prints it qualified), between
        // blanks. dpkg's `config-files` state is not installed, as the
        // probe says.
        PackageManager::Apt => {
            s.line(r#"tend_q=$(dpkg-query -W -f '${binary:Package} ${Package} ${Architecture} ${Status}\n' -- "$@" 2>/dev/null) || :"#);
            s.line("tend_n=' '");
            s.line(r#"while read -r tend_b tend_p tend_r tend_s; do case $tend_s in *' installed') tend_n="$tend_n$tend_b $tend_p $tend_p:$tend_r " ;; esac; done <<TEND_PKG_END"#);
            s.line("$tend_q");
            s.line("TEND_PKG_END");
            r#"case $tend_n in *" $a "*) i=1 ;; *) i= ;; esac"#
        }
        PackageManager::Dnf => r#"if rpm -q --quiet "$a" 2>/dev/null; then i=1; else i=; fi"#,
        PackageManager::Apk => r#"if apk info -e "$a" >/dev/null 2>&1; then i=1; else i=; fi"#,
    };
    let keep = if want {
        r#"[ -n "$i" ]"#
    } else {
        r#"[ -z "$i" ]"#
    };
    // Package names are validated (no blanks, no glob characters), so the
    // list can go through a variable and field splitting.
    s.line("k=");
    s.line(&format!(
        r#"for a in "$@"; do {check}; if {keep}; then k="$k $a"; fi; done"#
    ));
    s.line(r#"if [ -z "$k" ]; then"#);
    s.line(&format!("  printf 'tend: %s: {done}\\n' \"$*\""));
    s.line("  exit 0");
    s.line("fi");
    s.line("set -f; set -- $k; set +f");
}

#[cfg(test)]
mod keep_only_tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;
    use crate::transport::Transport;
    use crate::transport::local::LocalTransport;

    /// The names `keep_only` keeps, run by this machine's shell against its
    /// own dpkg database.
    fn kept(want: bool, names: &[&str]) -> String {
        let mut s = Script::new();
        names_line(&mut s, names);
        keep_only(&mut s, PackageManager::Apt, want, "none left");
        s.line(r#"printf '%s\n' "$@""#);
        let out = LocalTransport::new()
            .exec(&s.command().script, b"", Duration::from_secs(60))
            .expect("exec");
        assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn one_dpkg_query_tells_installed_names_in_every_form() {
        let Ok(arch) = Command::new("dpkg").arg("--print-architecture").output() else {
            eprintln!("no dpkg on this machine: skipped");
            return;
        };
        let arch = String::from_utf8(arch.stdout).unwrap();
        let arch = arch.trim();
        // dpkg and bash are installed on every Debian machine (essential);
        // dpkg prints neither with its architecture.
        let dpkg_arch = format!("dpkg:{arch}");
        let absent_arch = format!("tend-no-such-package:{arch}");
        let names = [
            "dpkg",
            "tend-no-such-package",
            dpkg_arch.as_str(),
            "bash",
            "dpkg:no-such-arch",
            absent_arch.as_str(),
        ];
        assert_eq!(
            kept(false, &names),
            format!("tend-no-such-package\ndpkg:no-such-arch\n{absent_arch}\n"),
            "to install: the ones not installed"
        );
        assert_eq!(
            kept(true, &names),
            format!("dpkg\n{dpkg_arch}\nbash\n"),
            "to remove: the ones installed"
        );
        // Nothing left: the step ends at once, saying so.
        assert_eq!(
            kept(true, &["tend-no-such-package"]),
            "tend: tend-no-such-package: none left\n"
        );
    }
}

/// Installs every package of `names` that is not installed yet, in one
/// call; nothing when every one is.
pub fn install_packages(manager: PackageManager, names: &[&str]) -> RemoteCommand {
    let mut s = Script::new();
    names_line(&mut s, names);
    keep_only(&mut s, manager, false, "already installed");
    match manager {
        PackageManager::Apt => {
            s.line("export DEBIAN_FRONTEND=noninteractive");
            s.line(&format!(
                "i() {{ {APT} install -y --no-install-recommends \
                 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -- \"$@\"; }}"
            ));
            s.line(r#"if ! i "$@"; then"#);
            s.line("  echo 'tend: apt-get install failed; updating the package lists once and retrying' >&2");
            s.line(&format!("  {APT} update"));
            s.line(r#"  i "$@""#);
            s.line("fi");
        }
        PackageManager::Dnf => s.line(r#"dnf install -y "$@""#),
        PackageManager::Apk => s.line(r#"apk add "$@""#),
    }
    s.command()
}

/// Removes every package of `names` that is installed, in one call
/// (configuration files stay); nothing when none is.
pub fn remove_packages(manager: PackageManager, names: &[&str]) -> RemoteCommand {
    let mut s = Script::new();
    names_line(&mut s, names);
    keep_only(&mut s, manager, true, "not installed");
    match manager {
        PackageManager::Apt => {
            s.line("export DEBIAN_FRONTEND=noninteractive");
            // What apt would remove (`Remv NAME[:ARCH] ...` lines of a
            // simulation) beyond the names given.
            s.line(&format!(r#"sim=$({APT} -s remove -- "$@")"#));
            s.line("x=");
            s.line("while IFS=' ' read -r w p rest; do");
            s.line(r#"  [ "$w" = Remv ] || continue"#);
            s.line("  k=");
            s.line(r#"  for a in "$@"; do if [ "${p%%:*}" = "${a%%:*}" ]; then k=1; fi; done"#);
            s.line(r#"  [ -n "$k" ] || x="$x $p""#);
            s.line("done <<TEND_SIM_END");
            s.line("$sim");
            s.line("TEND_SIM_END");
            s.line(r#"if [ -n "$x" ]; then"#);
            s.fail(
                "not removing %s: apt would also remove%s; declare those absent too",
                r#""$*" "$x""#,
            );
            s.line("fi");
            s.line(&format!(r#"{APT} remove -y -- "$@""#));
        }
        PackageManager::Dnf => s.line(r#"dnf remove -y "$@""#),
        PackageManager::Apk => s.line(r#"apk del "$@""#),
    }
    s.command()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;
    use crate::transport::Transport;
    use crate::transport::local::LocalTransport;

    #[test]
    fn managers_from_facts() {
        assert_eq!(PackageManager::from_fact("apt"), Some(PackageManager::Apt));
        assert_eq!(PackageManager::from_fact("dnf"), Some(PackageManager::Dnf));
        assert_eq!(PackageManager::from_fact("apk"), Some(PackageManager::Apk));
        assert_eq!(PackageManager::from_fact("apt-get"), None);
    }

    #[test]
    fn one_call_for_every_package_with_quoted_names() {
        let names = ["hello", "tree", "it's"];
        let want_names = "set -- 'hello' 'tree' 'it'\\''s'\n";
        for (cmd, call) in [
            (
                install_packages(PackageManager::Dnf, &names),
                "dnf install -y \"$@\"\n",
            ),
            (
                remove_packages(PackageManager::Dnf, &names),
                "dnf remove -y \"$@\"\n",
            ),
            (
                install_packages(PackageManager::Apk, &names),
                "apk add \"$@\"\n",
            ),
            (
                remove_packages(PackageManager::Apk, &names),
                "apk del \"$@\"\n",
            ),
        ] {
            assert!(
                cmd.script
                    .starts_with(&format!("set -eu\n{want_names}k=\n")),
                "{}",
                cmd.script
            );
            assert!(cmd.script.ends_with(call), "{}", cmd.script);
        }
        let apt = install_packages(PackageManager::Apt, &names);
        assert!(apt.script.starts_with(&format!("set -eu\n{want_names}")));
        assert!(
            apt.script
                .contains("export DEBIAN_FRONTEND=noninteractive\n"),
            "{}",
            apt.script
        );
        assert!(
            apt.script.contains(
                "apt-get -q -o DPkg::Lock::Timeout=120 install -y --no-install-recommends \
                 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -- \"$@\""
            ),
            "{}",
            apt.script
        );
        assert_eq!(apt.script.matches(" update").count(), 1, "{}", apt.script);
        let rm = remove_packages(PackageManager::Apt, &names);
        assert!(
            rm.script
                .ends_with("apt-get -q -o DPkg::Lock::Timeout=120 remove -y -- \"$@\"\n"),
            "{}",
            rm.script
        );
        assert!(!rm.script.contains("purge"), "configuration files stay");
    }

    /// A stub `apt-get` that logs its arguments, installs only once the lists
    /// exist (`update` creates them, or fails when `update_fails`), and
    /// simulates removals with the `Remv` lines in `remv`; a stub
    /// `dpkg-query` reports every package installed when `installed`, else
    /// none.
    fn run_with_apt(
        cmd: &RemoteCommand,
        lists: bool,
        update_fails: bool,
        remv: &str,
        installed: bool,
    ) -> (i32, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let log = dir.path().join("log");
        let marker = dir.path().join("lists");
        if lists {
            fs::write(&marker, "").unwrap();
        }
        let stub = format!(
            r#"#!/bin/sh
log='{log}'; lists='{lists}'
# The verb is the first argument that is not an option or an option's value.
v=; skip=
for a in "$@"; do
  if [ -n "$skip" ]; then skip=; continue; fi
  case $a in -o) skip=1 ;; -*) ;; *) v=$a; break ;; esac
done
printf '%s' "$v" >> "$log"
for a in "$@"; do case $a in -*|*::*) ;; "$v") ;; *) printf ' %s' "$a" >> "$log" ;; esac; done
echo "${{DEBIAN_FRONTEND:-}}" >> "$log"
case $v in
  update) {update}; touch "$lists" ;;
  install) [ -e "$lists" ] || {{ echo 'E: Unable to locate package' >&2; exit 100; }} ;;
  remove) for a in "$@"; do [ "$a" = -s ] && printf '%s' '{remv}'; done ;;
esac
exit 0
"#,
            log = log.display(),
            lists = marker.display(),
            update = if update_fails { "exit 100" } else { ":" },
        );
        let p = bin.join("apt-get");
        fs::write(&p, stub).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        let status = if installed {
            "install ok installed"
        } else {
            "unknown ok not-installed"
        };
        let q = bin.join("dpkg-query");
        // As dpkg-query -W -f '${binary:Package} ${Package} ${Architecture}
        // ${Status}\n' -- NAMES prints them.
        fs::write(
            &q,
            format!(
                "#!/bin/sh\nwhile [ $# -gt 0 ] && [ \"$1\" != -- ]; do shift; done; shift\nfor a in \"$@\"; do printf '%s %s amd64 %s\\n' \"$a\" \"${{a%%:*}}\" '{status}'; done\n"
            ),
        )
        .unwrap();
        fs::set_permissions(&q, fs::Permissions::from_mode(0o755)).unwrap();
        let script = format!("PATH={}:$PATH\n{}", bin.display(), cmd.script);
        let out = LocalTransport::new()
            .exec(&script, &cmd.stdin, Duration::from_secs(30))
            .unwrap();
        (
            out.status,
            fs::read_to_string(&log).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn apt_install_updates_the_lists_once_when_it_fails() {
        let cmd = install_packages(PackageManager::Apt, &["hello", "tree"]);
        // Lists present: one install.
        let (status, log, _) = run_with_apt(&cmd, true, false, "", false);
        assert_eq!(
            (status, log.as_str()),
            (0, "install hello treenoninteractive\n")
        );
        // A fresh host: install fails, update, install again.
        let (status, log, stderr) = run_with_apt(&cmd, false, false, "", false);
        assert_eq!(status, 0, "{stderr}");
        assert_eq!(
            log,
            "install hello treenoninteractive\nupdatenoninteractive\ninstall hello treenoninteractive\n"
        );
        assert!(
            stderr.contains("updating the package lists once"),
            "{stderr}"
        );
        // An update that fails ends it.
        let (status, log, _) = run_with_apt(&cmd, false, true, "", false);
        assert_ne!(status, 0);
        assert_eq!(
            log,
            "install hello treenoninteractive\nupdatenoninteractive\n"
        );
    }

    #[test]
    fn what_is_already_as_desired_is_left_alone() {
        let cmd = install_packages(PackageManager::Apt, &["hello", "tree"]);
        let (status, log, _) = run_with_apt(&cmd, true, false, "", true);
        assert_eq!((status, log.as_str()), (0, ""), "nothing to install");
        let cmd = remove_packages(PackageManager::Apt, &["hello"]);
        let (status, log, _) = run_with_apt(&cmd, true, false, "", false);
        assert_eq!((status, log.as_str()), (0, ""), "nothing to remove");
    }

    #[test]
    fn apt_remove_refuses_to_take_unnamed_packages_along() {
        let cmd = remove_packages(PackageManager::Apt, &["hello", "libfoo:amd64"]);
        let named = "Remv hello [2.10-3]\nRemv libfoo [1.0]\n";
        let (status, log, stderr) = run_with_apt(&cmd, true, false, named, true);
        assert_eq!(status, 0, "{stderr}");
        assert_eq!(
            log,
            "remove hello libfoo:amd64noninteractive\nremove hello libfoo:amd64noninteractive\n"
        );
        let more = "Remv hello [2.10-3]\nRemv app-using-hello [1]\nRemv other:i386 [2]\n";
        let (status, log, stderr) = run_with_apt(&cmd, true, false, more, true);
        assert_eq!(status, 1);
        assert_eq!(
            log, "remove hello libfoo:amd64noninteractive\n",
            "only simulated"
        );
        assert_eq!(
            stderr,
            "tend: not removing hello libfoo:amd64: apt would also remove app-using-hello other:i386; declare those absent too\n"
        );
    }
}
