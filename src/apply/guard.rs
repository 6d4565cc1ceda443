//! Connection guards (SPEC 8.7): the commands that arm, disarm and settle
//! the dead-man timer of a guarded file write.
//!
//! A guard lives on the host in a root-only directory, `$g/<id>` with `$g`
//! `/var/lib/tend/guard` for root (beside the lock directory when
//! `TEND_LOCK_DIR` moves it, for `transport: local` tests; under `$HOME`
//! for another login). Arming keeps the old file there (`old`, copied with
//! its mode and owner, or `absent`), writes `revert.sh` (received on
//! stdin), creates the marker `armed` and starts the timer: a transient
//! systemd timer (`systemd-run --on-active`, unit `<id>.timer`) where
//! systemd runs, else a detached `setsid` process that sleeps. Whoever
//! first renames `armed` wins: the disarm (`armed` -> `disarmed`, then the
//! timer is stopped and the directory removed, leaving a tombstone
//! `<id>.disarmed`) or the revert (`armed` -> `reverting`; it takes the
//! host lock, restores the old file, re-runs the restarts the change
//! triggered, then renames `reverting` -> `reverted`). Exactly one of them
//! happens, and each says which one did. `TEND_GUARD_TIMER=process` in
//! the host shell's environment forces the detached process (only a
//! `transport: local` host can get it: tests on a machine with systemd).
//!
//! Every command answers one line:
//!
//! ```text
//! TEND-GUARD-ARMED systemd|process
//! TEND-GUARD-DISARMED
//! TEND-GUARD-REVERTED
//! TEND-GUARD-REVERTING
//! TEND-GUARD-GONE
//! TEND-GUARD-ERROR <why>
//! ```
//!
//! Invariant: pure; every value in a script goes through `shell::quote`;
//! the revert script travels on stdin.

use super::RemoteCommand;
use super::lock::LOCK_DIR;
use crate::shell::quote;

/// The guards' directory, in `$g` (after [`LOCK_DIR`], which sets `$tend_u`).
const GUARD_DIR: &str = "if [ -n \"${TEND_LOCK_DIR:-}\" ]; then g=$TEND_LOCK_DIR/guard; elif [ \"$tend_u\" = 0 ]; then g=/var/lib/tend/guard; else g=\"${HOME:-/tmp}/.tend-guard\"; fi";

/// Tombstones of settled guards are kept this many days (a lost answer
/// can be read again).
const TOMBSTONE_DAYS: u32 = 7;

/// The name of a guard on the host (its directory and timer unit): unique
/// per run, host and step.
pub fn guard_id(run_id: &str, host: &str, step: usize) -> String {
    let digest = crate::core::sha256_hex(format!("{run_id}\0{host}\0{step}").as_bytes());
    format!("tend-guard-{}", &digest[..16])
}

/// The script the timer runs: `sh revert.sh DIR`. `units` are the systemd
/// units whose restart the change triggered.
pub fn revert_script(path: &str, units: &[String]) -> String {
    let parent = match path.rfind('/') {
        Some(0) | None => "/".to_string(),
        Some(i) => path[..i].to_string(),
    };
    let mut restarts = String::new();
    for u in units {
        restarts.push_str(&format!(
            "systemctl restart -- {u} || echo \"restart of \"{u}\" failed\"\n",
            u = quote(u)
        ));
    }
    format!(
        r#"#!/bin/sh
# tend connection guard (SPEC 8.7): restores the file below and re-runs the
# restarts its change triggered, unless tend disarmed the guard first.
d=$1
mv -- "$d/armed" "$d/reverting" 2>/dev/null || exit 0
exec >>"$d/log" 2>&1 </dev/null
echo "reverting at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
l=$(head -n 1 -- "$d/lockdir" 2>/dev/null)
if [ -n "$l" ]; then
  [ -e "$l" ] || [ -L "$l" ] || mkdir -m 0700 -- "$l" 2>/dev/null
  if [ -d "$l" ] && [ ! -L "$l" ] && [ ! -L "$l/lock" ] && command -v flock >/dev/null 2>&1; then
    exec 9>>"$l/lock" && flock 9
  fi
fi
p={path}
if [ -e "$d/absent" ]; then
  rm -f -- "$p"
else
  t={parent}/.tend-guard-restore.$$
  if cp -p -- "$d/old" "$t" && mv -f -- "$t" "$p"; then :; else rm -f -- "$t"; echo "cannot restore $p"; fi
fi
{restarts}mv -- "$d/reverting" "$d/reverted"
echo "reverted at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
"#,
        path = quote(path),
        parent = quote(&parent),
    )
}

/// Arm a guard for the file at `path`: keep the old file, write the revert
/// script (the command's stdin), create the marker and start the timer,
/// which fires after `secs` seconds.
pub fn arm(id: &str, path: &str, secs: u64, units: &[String]) -> RemoteCommand {
    let revert = revert_script(path, units);
    let len = revert.len();
    let script = format!(
        r#"export LC_ALL=C
{LOCK_DIR}
{GUARD_DIR}
umask 077
fail() {{ echo "TEND-GUARD-ERROR $*"; exit 0; }}
command -v systemd-run >/dev/null 2>&1 || command -v setsid >/dev/null 2>&1 || fail "neither systemd-run nor setsid (util-linux) is installed: a connection guard cannot be armed"
[ ! -L "$g" ] || fail "$g is a symbolic link"
mkdir -p -- "$g" 2>/dev/null || fail "cannot create $g"
[ -d "$g" ] && [ ! -L "$g" ] || fail "$g is not a directory"
chmod 0700 -- "$g" || fail "cannot make $g private"
find "$g" -maxdepth 1 -type f -name 'tend-guard-*.*' -mtime +{days} -exec rm -f -- {{}} + 2>/dev/null
d="$g"/{id}
mkdir -m 0700 -- "$d" 2>/dev/null || fail "cannot create $d (a guard of that name exists)"
printf '%s\n' "$l" > "$d/lockdir"
p={path}
if [ -L "$p" ]; then fail "$p is a symbolic link"
elif [ -f "$p" ]; then cp -p -- "$p" "$d/old" || fail "cannot keep a copy of $p"
elif [ -e "$p" ] ; then fail "$p is not a regular file"
else : > "$d/absent"; fi
head -c {len} > "$d/revert.sh"
[ "$(wc -c < "$d/revert.sh")" -eq {len} ] || fail "the revert script arrived short"
: > "$d/armed"
if [ "${{TEND_GUARD_TIMER:-}}" != process ] && [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1 \
  && systemd-run --quiet --collect --unit={id} --on-active={secs} --timer-property=AccuracySec=1s \
       --description={desc} /bin/sh "$d/revert.sh" "$d" >"$d/arm.log" 2>&1; then
  echo "TEND-GUARD-ARMED systemd"
else
  command -v setsid >/dev/null 2>&1 || {{ rm -f -- "$d/armed"; fail "systemd-run failed and setsid is not installed: $(head -c 300 "$d/arm.log" 2>/dev/null)"; }}
  setsid /bin/sh -c 'sleep "$1"; exec /bin/sh "$2/revert.sh" "$2"' {id} {secs} "$d" </dev/null >/dev/null 2>&1 &
  echo $! > "$d/pid"
  echo "TEND-GUARD-ARMED process"
fi
"#,
        id = quote(id),
        path = quote(path),
        days = TOMBSTONE_DAYS,
        desc = quote(&format!("tend connection guard for {path}")),
    );
    RemoteCommand {
        script,
        stdin: revert.into_bytes(),
    }
}

/// Stop the timer of guard `$d` (named `id`) and remove its directory,
/// leaving a tombstone `$d.<word>`.
fn retire(id: &str, word: &str) -> String {
    format!(
        r#"  if [ -d /run/systemd/system ]; then systemctl stop -- {id}.timer >/dev/null 2>&1; systemctl reset-failed -- {id}.service >/dev/null 2>&1; fi
  if [ -f "$d/pid" ]; then q=$(head -c 20 -- "$d/pid"); case $q in ''|*[!0-9]*) ;; *) if tr '\0' ' ' < "/proc/$q/cmdline" 2>/dev/null | grep -qF -- {id}; then kill -- "-$q" 2>/dev/null || kill -- "$q" 2>/dev/null; fi ;; esac; fi
  rm -rf -- "$d"
  : > "$d.{word}""#,
        id = quote(id),
    )
}

/// The last branches of disarm and settle: a disarm cut short between
/// its rename and the retirement is finished; a directory with no marker
/// is an arming cut short before `armed` was created (a crash, a dropped
/// connection, a failed copy), so the guarded write was never sent: it is
/// removed, and the guard is gone.
fn cut_short(id: &str) -> String {
    format!(
        r#"elif [ -e "$d/disarmed" ]; then
{retire}
  echo TEND-GUARD-DISARMED
elif [ -d "$d" ]; then rm -rf -- "$d"; echo TEND-GUARD-GONE
else echo TEND-GUARD-GONE
fi"#,
        retire = retire(id, "disarmed"),
    )
}

/// Disarm guard `id` (after tend reached the host over a new connection):
/// `DISARMED` when it won the marker, `REVERTED` when the revert had.
pub fn disarm(id: &str) -> String {
    format!(
        r#"export LC_ALL=C
{LOCK_DIR}
{GUARD_DIR}
d="$g"/{qid}
if mv -- "$d/armed" "$d/disarmed" 2>/dev/null; then
{retire}
  echo TEND-GUARD-DISARMED
elif [ -e "$d/reverting" ] || [ -e "$d/reverted" ] || [ -e "$d.reverted" ]; then echo TEND-GUARD-REVERTED
elif [ -e "$d.disarmed" ]; then echo TEND-GUARD-DISARMED
{cut_short}
"#,
        qid = quote(id),
        retire = retire(id, "disarmed"),
        cut_short = cut_short(id),
    )
}

/// Settle guard `id` once its time is up (tend could not disarm it, or a
/// controller crashed with it armed): a guard still armed is reverted now
/// (its timer was lost: a reboot, a killed process); a revert under way is
/// awaited (at most `wait_secs`); a finished one is cleaned up.
pub fn settle(id: &str, wait_secs: u64) -> String {
    format!(
        r#"export LC_ALL=C
{LOCK_DIR}
{GUARD_DIR}
d="$g"/{qid}
if [ -e "$d/armed" ] && [ -f "$d/revert.sh" ]; then /bin/sh "$d/revert.sh" "$d" </dev/null >/dev/null 2>&1; fi
i=0
while [ -e "$d/reverting" ] && [ "$i" -lt {wait_secs} ]; do sleep 1; i=$((i + 1)); done
if [ -e "$d/reverted" ]; then
{retire}
  echo TEND-GUARD-REVERTED
elif [ -e "$d/reverting" ]; then echo TEND-GUARD-REVERTING
elif [ -e "$d.reverted" ]; then echo TEND-GUARD-REVERTED
elif [ -e "$d.disarmed" ]; then echo TEND-GUARD-DISARMED
{cut_short}
"#,
        qid = quote(id),
        retire = retire(id, "reverted"),
        cut_short = cut_short(id),
    )
}

/// What a guard command answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Armed, with `systemd` or `process` as the timer.
    Armed(String),
    Disarmed,
    Reverted,
    /// A revert has begun and not finished yet.
    Reverting,
    /// No trace of the guard on the host: it was never armed.
    Gone,
    Error(String),
}

pub fn parse(stdout: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(stdout);
    let Some(line) = text.lines().rev().find(|l| l.starts_with("TEND-GUARD-")) else {
        let mut l: String = text.trim().chars().take(200).collect();
        if l.is_empty() {
            l = "nothing".into();
        }
        return Reply::Error(format!("unexpected answer from the guard command: {l:?}"));
    };
    let line = line.trim_end();
    match line {
        "TEND-GUARD-DISARMED" => Reply::Disarmed,
        "TEND-GUARD-REVERTED" => Reply::Reverted,
        "TEND-GUARD-REVERTING" => Reply::Reverting,
        "TEND-GUARD-GONE" => Reply::Gone,
        _ => {
            if let Some(how) = line.strip_prefix("TEND-GUARD-ARMED ") {
                Reply::Armed(how.to_string())
            } else if let Some(why) = line.strip_prefix("TEND-GUARD-ERROR ") {
                Reply::Error(why.chars().take(400).collect())
            } else {
                Reply::Error(format!(
                    "unexpected answer from the guard command: {:?}",
                    line.chars().take(200).collect::<String>()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Run a script with `sh`, with `TEND_LOCK_DIR` at `lock`.
    fn sh(script: &str, stdin: &[u8], lock: &std::path::Path) -> Vec<u8> {
        use std::io::Write;
        let mut c = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("TEND_LOCK_DIR", lock)
            .env("TEND_GUARD_TIMER", "process")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin).unwrap();
        c.wait_with_output().unwrap().stdout
    }

    #[test]
    fn ids_are_names_a_unit_and_a_directory_accept() {
        let id = guard_id("20261207T000000Z-ab12", "web-1", 3);
        assert!(id.starts_with("tend-guard-") && id.len() == 27, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert_ne!(id, guard_id("20261207T000000Z-ab12", "web-1", 4));
    }

    #[test]
    fn answers_are_parsed_strictly() {
        assert_eq!(
            parse(b"TEND-GUARD-ARMED systemd\n"),
            Reply::Armed("systemd".into())
        );
        assert_eq!(parse(b"noise\nTEND-GUARD-DISARMED\n"), Reply::Disarmed);
        assert_eq!(parse(b"TEND-GUARD-REVERTED"), Reply::Reverted);
        assert_eq!(parse(b"TEND-GUARD-GONE\n"), Reply::Gone);
        assert!(matches!(parse(b""), Reply::Error(_)));
        assert!(matches!(parse(b"TEND-GUARD-WHAT\n"), Reply::Error(_)));
        assert_eq!(
            parse(b"TEND-GUARD-ERROR no setsid\n"),
            Reply::Error("no setsid".into())
        );
    }

    /// The whole life of a guard on this machine, through the fallback
    /// timer: arm, then disarm wins; arm again, the revert wins and the
    /// old content and mode come back; a disarm then says reverted.
    #[test]
    fn disarm_and_revert_race_for_one_marker() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("lock");
        let file = dir.path().join("it's a \"file\"");
        let path = file.to_str().unwrap();
        std::fs::write(&file, "old\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();

        // Disarmed before its time: nothing is restored.
        let id = guard_id("r1", "h", 0);
        let arm1 = arm(&id, path, 3600, &[]);
        let script = arm1.script.clone();
        assert_eq!(
            parse(&sh(&script, &arm1.stdin, &lock)),
            Reply::Armed("process".into())
        );
        std::fs::write(&file, "new\n").unwrap();
        assert_eq!(parse(&sh(&disarm(&id), b"", &lock)), Reply::Disarmed);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new\n");
        assert!(!lock.join("guard").join(&id).exists());
        assert_eq!(parse(&sh(&disarm(&id), b"", &lock)), Reply::Disarmed);

        // Its time is up before anyone disarms it: the settle reverts it.
        let id = guard_id("r2", "h", 0);
        let arm2 = arm(&id, path, 3600, &[]);
        let script = arm2.script.clone();
        assert_eq!(
            parse(&sh(&script, &arm2.stdin, &lock)),
            Reply::Armed("process".into())
        );
        std::fs::write(&file, "broken\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(parse(&sh(&settle(&id, 5), b"", &lock)), Reply::Reverted);
        // What the file was when the guard was armed (the kept change).
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new\n");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        assert_eq!(parse(&sh(&disarm(&id), b"", &lock)), Reply::Reverted);

        // A file that was not there is removed again.
        let new = dir.path().join("new");
        let id = guard_id("r3", "h", 0);
        let arm3 = arm(&id, new.to_str().unwrap(), 3600, &[]);
        let script = arm3.script.clone();
        assert!(matches!(
            parse(&sh(&script, &arm3.stdin, &lock)),
            Reply::Armed(_)
        ));
        std::fs::write(&new, "x").unwrap();
        assert_eq!(parse(&sh(&settle(&id, 5), b"", &lock)), Reply::Reverted);
        assert!(!new.exists());

        // Never armed: nothing on the host says otherwise.
        assert_eq!(
            parse(&sh(&settle("tend-guard-0000000000000000", 1), b"", &lock)),
            Reply::Gone
        );

        // An arming cut short before its marker (a crash: the crash
        // campaign found a guard left "armed" for ever): gone, and cleaned.
        for cmd in [settle as fn(&str, u64) -> String, |id, _| disarm(id)] {
            let id = guard_id("r-cut", "h", 0);
            let d = lock.join("guard").join(&id);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("old"), "old\n").unwrap();
            assert_eq!(parse(&sh(&cmd(&id, 1), b"", &lock)), Reply::Gone);
            assert!(!d.exists());
        }
        // A disarm cut short after its rename is finished.
        let id = guard_id("r-half", "h", 0);
        let d = lock.join("guard").join(&id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("disarmed"), "").unwrap();
        assert_eq!(parse(&sh(&settle(&id, 1), b"", &lock)), Reply::Disarmed);
        assert!(!d.exists());
        assert!(lock.join("guard").join(format!("{id}.disarmed")).exists());
    }

    /// The fallback timer fires on its own and restores the file.
    #[test]
    fn the_fallback_timer_reverts_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("lock");
        let file = dir.path().join("conf");
        std::fs::write(&file, "old\n").unwrap();
        let id = guard_id("r4", "h", 0);
        let a = arm(&id, file.to_str().unwrap(), 1, &[]);
        let script = a.script.clone();
        assert!(matches!(
            parse(&sh(&script, &a.stdin, &lock)),
            Reply::Armed(_)
        ));
        std::fs::write(&file, "new\n").unwrap();
        let marker = lock.join("guard").join(&id).join("reverted");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !marker.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no revert within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "old\n");
        assert_eq!(parse(&sh(&disarm(&id), b"", &lock)), Reply::Reverted);
    }
}
