//! The service part of the probe: ONE `systemctl show` for every unit of the
//! host, inside the one probe script, and a strict parser for its lines.
//!
//! # Lines
//!
//! ```text
//! S <index> Id=<unit>                   exactly these four lines per service item,
//! S <index> LoadState=<state>           in any order; values verbatim from
//! S <index> ActiveState=<state>         `systemctl show` (UnitFileState may be
//! S <index> UnitFileState=<state>       empty: a unit without a unit file)
//! I <index> error <what failed>         instead, when systemctl refused the unit
//! ```
//!
//! `systemctl show -p Id,LoadState,ActiveState,UnitFileState -- U1 U2 ...`
//! prints one block of `Key=Value` lines per unit, in argument order,
//! separated by empty lines; the script tags each line with the index of its
//! item. One unit name that systemctl refuses fails the whole call, so the
//! script then asks about each unit on its own and reports the refused one as
//! an `error` line. Nothing is printed for services when the host lacks
//! `systemctl` or does not run systemd: the parser turns that into a
//! `Capability` failure from the `TOOL systemctl` and `FACT init` lines.

use super::{ProbeItem, ProbeParseError, ProbeTarget, bad, decimal, dup, unknown};
use crate::core::actual::{Observed, ServiceState};

/// Runs when there are service items, with `Q<index>='unit'` assigned for
/// every one of them and `SI` the list of their indices.
pub(super) const SECTION: &str = r#"set --; for i in $SI; do eval "set -- \"\$@\" \"\$Q$i\""; done
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  if O=$(systemctl show -p Id,LoadState,ActiveState,UnitFileState -- "$@" 2>/dev/null); then
    set -- $SI
    while IFS= read -r l; do
      if [ -z "$l" ]; then
        if [ "$#" -gt 0 ]; then shift; fi
      else
        printf 'S %s %s\n' "${1-}" "$l"
      fi
    done <<TEND_SVC_END
$O
TEND_SVC_END
  else
    for i in $SI; do
      eval "u=\$Q$i"
      if O=$(systemctl show -p Id,LoadState,ActiveState,UnitFileState -- "$u" 2>/dev/null); then
        while IFS= read -r l; do printf 'S %s %s\n' "$i" "$l"; done <<TEND_SVC_END
$O
TEND_SVC_END
      else
        E=$(systemctl show -p Id -- "$u" 2>&1 >/dev/null)
        printf 'I %s error systemctl show failed: %s\n' "$i" "$(printf '%s' "$E" | tr '\n' ' ')"
      fi
    done
  fi
fi
"#;

/// The properties every service item must report, in the order `systemctl`
/// prints them.
const KEYS: [&str; 4] = ["Id", "LoadState", "ActiveState", "UnitFileState"];

/// Reads the `S` lines: an observation for every service item that has them
/// (None for the rest). An `S` line for a path item, an unknown or repeated
/// property, or an incomplete set is an error.
pub(super) fn parse(
    lines: &[(usize, &str)],
    items: &[ProbeItem],
) -> Result<Vec<Option<Observed>>, ProbeParseError> {
    let mut props: Vec<[Option<String>; 4]> = vec![Default::default(); items.len()];
    let mut seen = vec![false; items.len()];
    for &(n, text) in lines {
        let Some(rest) = text.strip_prefix("S ") else {
            continue;
        };
        let (index, prop) = rest.split_once(' ').unwrap_or((rest, ""));
        let index: usize = decimal(n, "item index", index)?;
        let Some(item) = items.get(index) else {
            return Err(bad(
                n,
                format!("item index {index} out of range ({} items)", items.len()),
            ));
        };
        if !matches!(item.target, ProbeTarget::Service(_)) {
            return Err(bad(
                n,
                format!(
                    "`{}`: a service line for an item that is not a service",
                    item.key
                ),
            ));
        }
        let Some((key, value)) = prop.split_once('=') else {
            return Err(unknown(n, text));
        };
        let Some(k) = KEYS.iter().position(|&p| p == key) else {
            return Err(bad(
                n,
                format!("`{}`: unexpected property `{key}`", item.key),
            ));
        };
        if props[index][k].replace(value.to_string()).is_some() {
            return Err(dup(n, format!("`{}` property `{key}`", item.key)));
        }
        seen[index] = true;
    }
    let mut out = vec![None; items.len()];
    for (index, item) in items.iter().enumerate() {
        if !seen[index] {
            continue;
        }
        let [id, load, active, file] = std::mem::take(&mut props[index]);
        let missing = |k: usize| ProbeParseError::NotReported {
            what: format!("`{}` property `{}`", item.key, KEYS[k]),
        };
        let state = ServiceState {
            unit: id.filter(|v| !v.is_empty()).ok_or_else(|| missing(0))?,
            load_state: load.filter(|v| !v.is_empty()).ok_or_else(|| missing(1))?,
            active_state: active.filter(|v| !v.is_empty()).ok_or_else(|| missing(2))?,
            unit_file_state: file.ok_or_else(|| missing(3))?,
        };
        out[index] = Some(Observed::Service(state));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{ProbeParseError, parse, script};
    use super::*;
    use crate::core::retry::FailureClass;
    use crate::transport::Transport;
    use crate::transport::local::LocalTransport;

    /// The line number of the first item line: after the header, three
    /// facts and one line per tool.
    const FIRST: usize = 5 + super::super::TOOLS.len();

    /// Probe output of a systemd host (every tool present) with `body` as
    /// its items.
    fn output(body: &str, count: usize) -> Vec<u8> {
        let tools: String = super::super::TOOLS
            .iter()
            .map(|t| format!("TOOL {t} yes\n"))
            .collect();
        format!(
            "TEND-PROBE 1\nFACT kernel Linux\nFACT os_id debian\nFACT init systemd\n{tools}{body}END {count}\n"
        )
        .into_bytes()
    }

    fn block(i: usize, id: &str, load: &str, active: &str, file: &str) -> String {
        format!(
            "S {i} Id={id}\nS {i} LoadState={load}\nS {i} ActiveState={active}\nS {i} UnitFileState={file}\n"
        )
    }

    fn state(unit: &str, load: &str, active: &str, file: &str) -> Observed {
        Observed::Service(ServiceState {
            unit: unit.into(),
            load_state: load.into(),
            active_state: active.into(),
            unit_file_state: file.into(),
        })
    }

    fn items() -> Vec<ProbeItem> {
        vec![
            ProbeItem::service("service:nginx", "nginx"),
            ProbeItem::path("file:/a", "/a"),
            ProbeItem::service("service:sshd", "sshd.service"),
            ProbeItem::service("service:gone", "gone"),
        ]
    }

    #[test]
    fn script_assigns_units_beside_paths_and_asks_systemctl_once() {
        let s = script(&items());
        assert!(
            s.contains("\nQ0='nginx'\nP1='/a'\nQ2='sshd.service'\nQ3='gone'\nPI='1'\n"),
            "{s}"
        );
        assert!(s.contains("\nSI='0 2 3'\n"), "{s}");
        assert!(s.ends_with("fi\necho 'END 4'\n"), "{s}");
        // One batched call; the per-unit calls only in the fallback branch.
        assert_eq!(
            s.matches("systemctl show -p Id,LoadState,ActiveState,UnitFileState -- \"$@\"")
                .count(),
            1
        );
        let s = script(&[ProbeItem::service("service:x", "it's $(x)")]);
        assert!(s.contains("\nQ0='it'\\''s $(x)'\nPI=''\n"), "{s}");
        // Without service items, no service section.
        let s = script(&[ProbeItem::path("file:/a", "/a")]);
        assert!(!s.contains("systemctl show"), "{s}");
    }

    #[test]
    fn parses_services_beside_paths() {
        let body = format!(
            "I 1 absent\n{}{}S 3 UnitFileState=\nS 3 ActiveState=inactive\nS 3 LoadState=not-found\nS 3 Id=gone.service\n",
            block(0, "nginx.service", "loaded", "active", "enabled"),
            block(2, "ssh.service", "loaded", "failed", "disabled"),
        );
        let got = parse(&output(&body, 4), &items()).unwrap();
        let r = |k: &str| got.resources[k].clone();
        assert_eq!(
            r("service:nginx"),
            state("nginx.service", "loaded", "active", "enabled")
        );
        assert_eq!(r("file:/a"), Observed::Absent);
        // An alias is reported under the unit it resolves to.
        assert_eq!(
            r("service:sshd"),
            state("ssh.service", "loaded", "failed", "disabled")
        );
        assert_eq!(
            r("service:gone"),
            state("gone.service", "not-found", "inactive", "")
        );
    }

    #[test]
    fn a_host_without_systemd_is_a_capability_mismatch() {
        let its = items();
        let no_systemctl = String::from_utf8(output("", 4))
            .unwrap()
            .replace("TOOL systemctl yes", "TOOL systemctl no");
        let err = parse(no_systemctl.as_bytes(), &its).unwrap_err();
        assert_eq!(err, ProbeParseError::MissingTools(vec!["systemctl".into()]));
        assert_eq!(err.class(), FailureClass::Capability);
        // With the path tools missing too, all are named.
        let both = no_systemctl.replace("TOOL od yes", "TOOL od no");
        assert_eq!(
            parse(both.as_bytes(), &its).unwrap_err(),
            ProbeParseError::MissingTools(vec!["od".into(), "systemctl".into()])
        );
        let no_init = String::from_utf8(output("", 4))
            .unwrap()
            .replace("FACT init systemd", "FACT init ");
        let err = parse(no_init.as_bytes(), &its).unwrap_err();
        assert_eq!(err, ProbeParseError::NoSystemd);
        assert_eq!(err.class(), FailureClass::Capability);
        assert_eq!(
            err.to_string(),
            "the host does not run systemd (no /run/systemd/system), which `service` resources need"
        );
        // Without service items, neither matters.
        let paths = [ProbeItem::path("file:/a", "/a")];
        assert!(
            parse(
                no_init
                    .replace("TOOL systemctl yes", "TOOL systemctl no")
                    .replace("END 4", "I 0 absent\nEND 1")
                    .as_bytes(),
                &paths
            )
            .is_ok()
        );
    }

    #[test]
    fn every_malformed_service_line_is_an_error() {
        use ProbeParseError::*;
        let one = [ProbeItem::service("service:a", "a")];
        let mixed = [
            ProbeItem::service("service:a", "a"),
            ProbeItem::path("file:/b", "/b"),
        ];
        let ok = block(0, "a.service", "loaded", "active", "enabled");
        let bv = |line: usize, message: &str| BadValue {
            line,
            message: message.into(),
        };
        let (l1, l5, l6) = (FIRST, FIRST + 4, FIRST + 5);
        #[rustfmt::skip]
        let cases: Vec<(String, &[ProbeItem], ProbeParseError)> = vec![
            (String::new(), &one, NotReported { what: "`service:a`".into() }),
            (ok.replace("S 0 UnitFileState=enabled\n", ""), &one, NotReported { what: "`service:a` property `UnitFileState`".into() }),
            (ok.replace("Id=a.service", "Id="), &one, NotReported { what: "`service:a` property `Id`".into() }),
            (ok.replace("ActiveState=active", "ActiveState="), &one, NotReported { what: "`service:a` property `ActiveState`".into() }),
            (format!("{ok}S 0 Id=b.service\n"), &one, Duplicate { line: l5, what: "`service:a` property `Id`".into() }),
            (format!("{ok}S 0 SubState=running\n"), &one, bv(l5, "`service:a`: unexpected property `SubState`")),
            (format!("{ok}S 0 oops\n"), &one, UnknownLine { line: l5, text: "S 0 oops".into() }),
            (format!("{ok}S 1 Id=b\n"), &one, bv(l5, "item index 1 out of range (1 items)")),
            (format!("{ok}S x Id=b\n"), &one, bv(l5, "item index: bad number `x`")),
            (format!("{ok}S  Id=b\n"), &one, bv(l5, "item index: bad number ``")),
            (format!("{ok}I 1 absent\nS 1 Id=b\n"), &mixed, bv(l6, "`file:/b`: a service line for an item that is not a service")),
            ("I 0 absent\n".into(), &one, bv(l1, "`service:a`: a `absent` line does not answer what the probe asked")),
            (format!("{ok}I 0 error again\n"), &one, Duplicate { line: l5, what: "`service:a`".into() }),
            ("I 0 error systemctl show failed: Unit name @x.service is neither\n".into(), &one,
                ItemFailed { key: "service:a".into(), message: "systemctl show failed: Unit name @x.service is neither".into() }),
        ];
        for (i, (body, its, want)) in cases.into_iter().enumerate() {
            let got = parse(&output(&body, its.len()), its);
            assert_eq!(got.as_ref().err(), Some(&want), "case {i}: {body:?}");
            assert_eq!(want.class(), FailureClass::Execution, "case {i}");
        }
    }

    /// This machine runs no systemd (tests run in a container or a chroot
    /// host): the real script prints nothing for services, and the parser
    /// names the reason. Where systemd runs, the services are reported.
    #[test]
    fn live_probe_on_this_machine() {
        let its = [ProbeItem::service("service:x", "tend-no-such-unit")];
        let out = LocalTransport::new()
            .exec(&script(&its), b"", Duration::from_secs(60))
            .expect("run probe");
        assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let systemd = std::path::Path::new("/run/systemd/system").is_dir();
        let has_systemctl = text.contains("TOOL systemctl yes");
        match parse(&out.stdout, &its) {
            Ok(a) => {
                assert!(systemd && has_systemctl, "{text}");
                let Observed::Service(s) = &a.resources["service:x"] else {
                    panic!("{a:?}")
                };
                assert_eq!(
                    (s.unit.as_str(), s.load_state.as_str()),
                    ("tend-no-such-unit.service", "not-found")
                );
            }
            Err(e) => {
                assert!(!text.contains("\nS "), "{text}");
                let want = if has_systemctl {
                    ProbeParseError::NoSystemd
                } else {
                    ProbeParseError::MissingTools(vec!["systemctl".into()])
                };
                assert_eq!(e, want, "{text}");
            }
        }
    }
}
