//! The host lock and the revision fence (SPEC 8.7, 8.1): one command that
//! stays running on the host for as long as tend works on it.
//!
//! The command makes sure the lock directory (`/run/tend`; for a login that
//! is not root, `$TMPDIR/tend-<uid>`) is a real directory owned by the login
//! with mode 0700, and moves anything else found at that path aside (a
//! symlink, a file, a directory of another owner or mode: it could redirect
//! or block tend), then creates it afresh. Nobody else can create anything
//! inside such a directory, so `lock` cannot be a symlink planted by another
//! user; one found there anyway is removed, never followed. It then takes
//! `flock` on `lock` (waiting at most [`LOCK_WAIT_SECS`]), checks that the
//! revision recorded on the host is still the one the probe saw, records the
//! revision being applied and who holds the lock, and answers one line:
//!
//! ```text
//! TEND-LOCKED
//! TEND-LOCK-BUSY <what the holder wrote about itself>
//! TEND-LOCK-MOVED <the revision now recorded on the host>
//! TEND-LOCK-ERROR <why>
//! ```
//!
//! After `TEND-LOCKED` it waits for end of file on its stdin: the lock is
//! held until tend closes the command or its connection ends (a controller
//! killed mid-apply cannot leave a host locked).
//!
//! Invariant: pure; every value in the script goes through `shell::quote`.

use crate::shell::quote;

/// How long the lock command waits for another holder to let go before it
/// answers `TEND-LOCK-BUSY`.
pub const LOCK_WAIT_SECS: u64 = 10;

/// Reads the revision recorded on the host into `tend_r`, as the probe
/// does, so that the two compare equal: its first line, with shell builtins
/// only (no process); one longer than 200 bytes or with a character a
/// revision never has reads as `invalid`.
pub const READ_REVISION: &str = "tend_r=; if [ -f \"$l/revision\" ] && [ -r \"$l/revision\" ]; then IFS= read -r tend_r < \"$l/revision\" || :; fi; case $tend_r in *[!A-Za-z0-9:._-]*) tend_r=invalid ;; esac; [ ${#tend_r} -le 200 ] || tend_r=invalid";

/// The lock directory, in `$l`, and the effective uid, in `$tend_u` (read
/// from `/proc/self/status` by the shell itself; `id -u` only where there
/// is no /proc). `TEND_LOCK_DIR` in the environment of the
/// host's shell moves it: only a `transport: local` host can get it (sshd
/// passes no such variable), so that tests on one machine can each have
/// their own.
pub const LOCK_DIR: &str = concat!(
    "tend_u=; { while read -r tend_k tend_a tend_e tend_b; do if [ \"$tend_k\" = Uid: ]; then tend_u=$tend_e; break; fi; done < /proc/self/status; } 2>/dev/null; [ -n \"$tend_u\" ] || tend_u=$(id -u)\n",
    "if [ -n \"${TEND_LOCK_DIR:-}\" ]; then l=$TEND_LOCK_DIR; elif [ \"$tend_u\" = 0 ]; then l=/run/tend; else l=\"${TMPDIR:-/tmp}/tend-$tend_u\"; fi"
);

/// The lock command. `holder` says who holds the lock (written to
/// `<dir>/holder` for whoever finds it busy, and the holding shell's pid
/// to `<dir>/holder.pid`); `seen` is the revision the probe read on the
/// host (empty for none); `revision` the one being applied. `stale`: a
/// holder that tend found dead (see [`Holder::stale`]): when the lock is
/// busy and `<dir>/holder` still says exactly that, its shell is stopped
/// (TERM: it lets go of the lock) and the lock taken without waiting.
pub fn script(holder: &str, seen: &str, revision: &str, stale: Option<&str>) -> String {
    let take = match stale {
        None => format!("flock -w {LOCK_WAIT_SECS} 9"),
        Some(_) => "flock -n 9".to_string(),
    };
    let stale = stale.map(one_line).unwrap_or_default();
    format!(
        r#"export LC_ALL=C
{LOCK_DIR}
command -v flock >/dev/null 2>&1 || {{ echo 'TEND-LOCK-ERROR flock is not installed on this host (util-linux); tend applies only under the host lock'; exit 0; }}
u=$tend_u
tend_private() {{ [ ! -L "$l" ] && [ -d "$l" ] && [ "$(stat -c '%u %a' -- "$l")" = "$u 700" ]; }}
ok=
if [ -e "$l" ] || [ -L "$l" ]; then
  if tend_private; then ok=1; else
    m="$l.untrusted.$(date +%s).$$"
    mv -f -- "$l" "$m" || {{ echo "TEND-LOCK-ERROR $l is not a directory of uid $u with mode 0700, and cannot be moved aside"; exit 0; }}
  fi
fi
if [ -z "$ok" ] && [ ! -e "$l" ] && [ ! -L "$l" ]; then mkdir -m 0700 -- "$l" 2>/dev/null && ok=1 || tend_private || {{ echo "TEND-LOCK-ERROR cannot create $l"; exit 0; }}; fi
[ -n "$ok" ] || tend_private || {{ echo "TEND-LOCK-ERROR $l is not a directory of uid $u with mode 0700"; exit 0; }}
if [ -L "$l/lock" ]; then rm -f -- "$l/lock"; fi
exec 9>>"$l/lock" || {{ echo "TEND-LOCK-ERROR cannot open $l/lock"; exit 0; }}
if ! {take}; then
  h=$(head -c 512 -- "$l/holder" 2>/dev/null | tr -d '\n\r')
  s={stale}
  if [ -n "$s" ] && [ "$h" = "$s" ] && [ -f "$l/holder.pid" ]; then
    IFS= read -r p < "$l/holder.pid" || p=
    case $p in ''|*[!0-9]*) ;; *) kill -TERM "$p" 2>/dev/null ;; esac
    flock -w {wait} 9 || {{ echo "TEND-LOCK-BUSY $h"; exit 0; }}
  else
    echo "TEND-LOCK-BUSY ${{h:-a process that did not say who it is}}"
    exit 0
  fi
fi
{READ_REVISION}
r=$tend_r
if [ "$r" != {seen} ] && [ "$r" != {revision} ]; then echo "TEND-LOCK-MOVED $r"; exit 0; fi
if [ "$r" != {revision} ]; then
  {{ printf '%s\n' {revision} > "$l/revision.new" && mv -f -- "$l/revision.new" "$l/revision"; }} || {{ echo "TEND-LOCK-ERROR cannot record the revision in $l/revision"; exit 0; }}
fi
# Only whoever finds the lock busy reads this, and only for a message:
# written in place (one write), no rename.
printf '%s\n' {holder} > "$l/holder"
printf '%s\n' $$ > "$l/holder.pid"
trap 'rm -f -- "$l/holder" "$l/holder.pid"' EXIT
trap 'exit 0' HUP INT TERM
echo TEND-LOCKED
while IFS= read -r tend_x; do :; done
"#,
        wait = LOCK_WAIT_SECS,
        seen = quote(seen),
        revision = quote(revision),
        holder = quote(&one_line(holder)),
        take = take,
        stale = quote(&stale),
    )
}

/// What a lock holder wrote about itself, as tend writes it: `pid P (WHAT,
/// run R) with state dir D on MACHINE, since T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub run_id: String,
    pub machine: String,
}

impl Holder {
    pub fn parse(text: &str) -> Option<Holder> {
        let rest = text.strip_prefix("pid ")?;
        let (pid, rest) = rest.split_once(' ')?;
        let (_, rest) = rest.split_once(", run ")?;
        let (run_id, rest) = rest.split_once(") with state dir ")?;
        let (_, rest) = rest.rsplit_once(" on ")?;
        let (machine, _) = rest.rsplit_once(", since ")?;
        Some(Holder {
            pid: pid.parse().ok()?,
            run_id: run_id.to_string(),
            machine: machine.to_string(),
        })
    }

    /// Whether this holder is certainly gone, seen from process `me` (its
    /// pid, run and machine) with `alive` telling whether a pid of this
    /// machine is a running tend: a holder on this machine whose process
    /// is no tend any more (it was killed, or crashed), or this very
    /// process under another run (a pass of this controller whose
    /// connection died without the host noticing: a network cut). A holder
    /// on another machine, or a live tend, is never stale.
    pub fn stale(&self, me: &Holder, alive: impl Fn(u32) -> bool) -> bool {
        if self.machine != me.machine {
            return false;
        }
        if self.pid == me.pid {
            return self.run_id != me.run_id;
        }
        !alive(self.pid)
    }
}

/// What the lock command answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Locked,
    /// Someone else holds the lock: what it wrote about itself.
    Busy(String),
    /// The revision on the host changed since the probe: what it is now.
    Moved(String),
    /// The lock could not be taken: why.
    Error(String),
}

pub fn parse(line: &str) -> Reply {
    let line = line.trim_end();
    if line == "TEND-LOCKED" {
        Reply::Locked
    } else if let Some(h) = line.strip_prefix("TEND-LOCK-BUSY ") {
        Reply::Busy(h.to_string())
    } else if let Some(r) = line.strip_prefix("TEND-LOCK-MOVED") {
        Reply::Moved(r.trim().to_string())
    } else if let Some(e) = line.strip_prefix("TEND-LOCK-ERROR ") {
        Reply::Error(e.to_string())
    } else if line.is_empty() {
        Reply::Error("the lock command ended without an answer".into())
    } else {
        let mut l: String = line.chars().take(200).collect();
        if l.len() < line.len() {
            l.push('…');
        }
        Reply::Error(format!("unexpected answer from the lock command: {l:?}"))
    }
}

/// `s` on one line, at most 400 characters.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        assert_eq!(parse("TEND-LOCKED\n"), Reply::Locked);
        assert_eq!(
            parse("TEND-LOCK-BUSY pid 7 tend apply"),
            Reply::Busy("pid 7 tend apply".into())
        );
        assert_eq!(parse("TEND-LOCK-MOVED "), Reply::Moved(String::new()));
        assert_eq!(parse("TEND-LOCK-MOVED abc"), Reply::Moved("abc".into()));
        assert!(matches!(parse(""), Reply::Error(_)));
        assert!(matches!(parse("sh: 1: bad"), Reply::Error(_)));
    }

    #[test]
    fn holders_parse_and_only_a_gone_one_is_stale() {
        let text = "pid 42 (tend run, run r-1) with state dir /srv/on x/.tend on vm, since 2026-12-07T18:00:00Z";
        let h = Holder::parse(text).unwrap();
        assert_eq!(
            h,
            Holder {
                pid: 42,
                run_id: "r-1".into(),
                machine: "vm".into()
            }
        );
        assert_eq!(Holder::parse("a process that did not say who it is"), None);
        let me = |pid, run: &str, machine: &str| Holder {
            pid,
            run_id: run.into(),
            machine: machine.into(),
        };
        // Another machine: never.
        assert!(!h.stale(&me(1, "r-2", "other"), |_| false));
        // This machine, a dead process: stale; a live tend: not.
        assert!(h.stale(&me(1, "r-2", "vm"), |_| false));
        assert!(!h.stale(&me(1, "r-2", "vm"), |_| true));
        // This very process: stale under another run only.
        assert!(h.stale(&me(42, "r-2", "vm"), |_| true));
        assert!(!h.stale(&me(42, "r-1", "vm"), |_| true));
    }

    /// A holder found gone is stopped and the lock taken; one that is not
    /// the holder named stays.
    #[test]
    fn a_stale_holder_is_stopped_and_the_lock_taken() {
        use crate::transport::Transport;
        use crate::transport::local::LocalTransport;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let env = format!(
            "export TEND_LOCK_DIR='{}'\n",
            dir.path().join("lock").display()
        );
        let t = LocalTransport::new();
        let wait = Duration::from_secs(30);
        let a = "pid 999999 (tend apply, run r-a) with state dir /s on m, since t";
        let b = "pid 1000000 (tend apply, run r-b) with state dir /s on m, since t";
        let (line, mut held_a) = t
            .hold(&format!("{env}{}", script(a, "", "rev", None)), wait)
            .unwrap();
        assert_eq!(parse(&line), Reply::Locked);
        // Named stale, but not the holder there: busy, at once.
        let (line, _) = t
            .hold(&format!("{env}{}", script(b, "rev", "rev", Some(b))), wait)
            .unwrap();
        assert_eq!(parse(&line), Reply::Busy(a.into()));
        assert!(held_a.alive());
        // The holder there: stopped, the lock taken.
        let (line, mut held_b) = t
            .hold(&format!("{env}{}", script(b, "rev", "rev", Some(a))), wait)
            .unwrap();
        assert_eq!(parse(&line), Reply::Locked);
        assert!(held_b.alive());
        let until = std::time::Instant::now() + wait;
        while held_a.alive() {
            assert!(
                std::time::Instant::now() < until,
                "the stale holder still runs"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let now = std::fs::read_to_string(dir.path().join("lock/holder")).unwrap();
        assert_eq!(now.trim_end(), b);
    }

    #[test]
    fn values_are_quoted_and_on_one_line() {
        let s = script("pid 1\nx'; rm -rf /", "", "abc'def", Some("it's"));
        assert!(s.contains(r#"'pid 1 x'\''; rm -rf /'"#), "{s}");
        assert!(s.contains(r#"'abc'\''def'"#));
        assert!(!s.contains("pid 1\nx"));
    }
}
