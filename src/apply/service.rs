//! Command builders for `service` resources: `systemctl` on one unit.
//!
//! Invariant: pure; the unit name reaches the script once, through
//! [`crate::shell::quote`], as `u`, and is used as `"$u"` after `--`, so a
//! name can never be read as an option. `systemctl` waits for the start or
//! stop job to finish and exits non-zero (with its reason on stderr) if the
//! unit fails to start, is masked, or does not exist.

use super::{RemoteCommand, Script};

/// Brings a unit to the given enablement and activity, as far as given:
/// `Some(true)` enables (starts), `Some(false)` disables (stops), `None`
/// leaves it. Turning both off is one `disable --now` call; enabling and
/// starting each check first whether the unit already is so.
/// With `daemon_reload`, systemd re-reads its unit files first (one of them
/// changed in this run, or the unit was not loaded yet).
pub fn converge(
    unit: &str,
    enable: Option<bool>,
    running: Option<bool>,
    daemon_reload: bool,
) -> RemoteCommand {
    let mut s = start(unit, daemon_reload);
    match (enable, running) {
        (Some(false), Some(false)) => s.line(r#"systemctl disable --now -- "$u""#),
        (enable, running) => {
            // Checked first: an enabled unit is not enabled again, an
            // active one not started again. (Disabling and stopping what
            // is already off are no-ops of systemctl itself.)
            match enable {
                Some(true) => s.line(ENABLE),
                Some(false) => s.line(r#"systemctl disable -- "$u""#),
                None => {}
            }
            match running {
                Some(true) => s.line(START),
                Some(false) => s.line(r#"systemctl stop -- "$u""#),
                None => {}
            }
        }
    }
    s.command()
}

const ENABLE: &str =
    r#"[ "$(systemctl is-enabled -- "$u" 2>/dev/null)" = enabled ] || systemctl enable -- "$u""#;
const START: &str = r#"systemctl is-active --quiet -- "$u" || systemctl start -- "$u""#;

/// Restarts a unit (starting it if it is not running), after a
/// `daemon-reload` when asked.
pub fn restart(unit: &str, daemon_reload: bool) -> RemoteCommand {
    let mut s = start(unit, daemon_reload);
    s.line(r#"systemctl restart -- "$u""#);
    s.command()
}

fn start(unit: &str, daemon_reload: bool) -> Script {
    let mut s = Script::new();
    s.var("u", unit);
    if daemon_reload {
        s.line("systemctl daemon-reload");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(cmd: &RemoteCommand) -> &str {
        assert!(cmd.stdin.is_empty());
        cmd.script
            .strip_prefix("set -eu\nu='nginx'\n")
            .unwrap_or_else(|| panic!("{}", cmd.script))
    }

    #[test]
    fn one_call_per_change_and_a_check_before_enabling_or_starting() {
        let en = format!("{ENABLE}\n");
        let st = format!("{START}\n");
        let cases: Vec<(Option<bool>, Option<bool>, String)> = vec![
            (Some(true), Some(true), format!("{en}{st}")),
            (
                Some(false),
                Some(false),
                "systemctl disable --now -- \"$u\"\n".into(),
            ),
            (Some(true), None, en.clone()),
            (Some(false), None, "systemctl disable -- \"$u\"\n".into()),
            (None, Some(true), st.clone()),
            (None, Some(false), "systemctl stop -- \"$u\"\n".into()),
            (
                Some(true),
                Some(false),
                format!("{en}systemctl stop -- \"$u\"\n"),
            ),
            (
                Some(false),
                Some(true),
                format!("systemctl disable -- \"$u\"\n{st}"),
            ),
            (None, None, String::new()),
        ];
        for (enable, running, want) in cases {
            let cmd = converge("nginx", enable, running, false);
            assert_eq!(body(&cmd), want, "{enable:?} {running:?}");
        }
    }

    #[test]
    fn restart_and_daemon_reload_first() {
        assert_eq!(
            body(&restart("nginx", false)),
            "systemctl restart -- \"$u\"\n"
        );
        assert_eq!(
            body(&restart("nginx", true)),
            "systemctl daemon-reload\nsystemctl restart -- \"$u\"\n"
        );
        assert_eq!(
            body(&converge("nginx", None, Some(true), true)),
            format!("systemctl daemon-reload\n{START}\n")
        );
    }

    #[test]
    fn the_unit_is_quoted_once_and_never_an_option() {
        for unit in ["a'b$(touch x)", "-h", "foo@bar baz.service"] {
            let cmd = converge(unit, Some(true), None, false);
            let assignment = format!("u={}\n", crate::shell::quote(unit));
            assert!(
                cmd.script.starts_with(&format!("set -eu\n{assignment}")),
                "{}",
                cmd.script
            );
            assert_eq!(cmd.script.matches(&assignment).count(), 1);
            assert!(cmd.script.ends_with(&format!("{ENABLE}\n")));
        }
    }
}
