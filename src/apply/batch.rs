//! Several steps in ONE remote command: each step's script runs in its own
//! subshell, in order, with its stdout and stderr kept apart, and the batch
//! stops at the first step that fails. Each step's content follows the
//! previous step's on the one stdin (every builder reads exactly its own
//! length), so content still never appears in a command line.
//!
//! The batch script itself travels on stdin too, ahead of the content: the
//! command line is a short, fixed bootstrap ([`bootstrap`]) that reads
//! exactly the script's length and runs it only if it arrived whole. So a
//! batch has no size limit from the SSH channel request or from `ARG_MAX`.
//!
//! Output, as the host reports it: a start marker before each step, its
//! record after it, then a trailer when every step ran:
//!
//! ```text
//! TEND-START <k>\n
//! TEND-STEP <k> <exit status> <stdout bytes> <stderr bytes>\n<stdout><stderr>
//! TEND-BATCH-END <steps>\n
//! ```
//!
//! A step's output is bounded on the host: past `limit` bytes only the first
//! `limit/2` and the last `limit - limit/2` are sent (the byte counts in the
//! record are the full sizes), and the parser marks what was left out.
//!
//! Before the first step the batch takes `/run/tend/steps.lock` (flock;
//! `$TMPDIR/tend-<uid>/` for a login that is not root; the host lock's
//! `TEND_LOCK_DIR`, which only a `transport: local` host can get), so
//! that an attempt never runs while an earlier one on the same host may
//! still run (a retry after a dropped connection waits for it instead).
//!
//! Invariant: pure; the parser is strict and incremental (bounded memory),
//! and a step without its record is reported as such, never assumed to have
//! succeeded.

use super::RemoteCommand;
use crate::shell::quote;

/// What one step of a batch did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// How a batch runs on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOpts {
    /// Bytes of each step's stdout (and of its stderr) sent back at most.
    pub output_limit: u64,
    /// How long to wait for `/run/tend/steps.lock` (an earlier attempt).
    pub lock_wait_secs: u64,
    /// A retry: refuse to run on a host without `flock`, where it cannot be
    /// told whether the earlier attempt still runs.
    pub require_lock: bool,
    /// Names the batch's temporary files on the host (`.tend.<nonce>.<pid>`
    /// beside the path written): any value; a fresh one per batch keeps a
    /// leftover of a killed batch from being in the way.
    pub nonce: u64,
}

/// The last line of every batch script; the bootstrap runs a script only
/// when it ends with it (a script cut short in transit never runs).
const SENTINEL: &str = "#TEND-SCRIPT-END";

/// One command that runs `steps` in order: `(command line, stdin)`.
pub fn script(steps: &[RemoteCommand], opts: BatchOpts) -> RemoteCommand {
    let limit = opts.output_limit.max(2);
    let (h, t) = (limit / 2, limit - limit / 2);
    let mut s = format!(
        "t=$(mktemp -d) || {{ echo 'tend: mktemp failed' >&2; exit 97; }}\n\
         o=\"$t/o\" e=\"$t/e\" tend_dirs=\"$t/dirs\" tend_nonce={nonce}\n\
         trap 'rm -rf -- \"$t\"' EXIT\n\
         tend_part() {{ if [ \"$2\" -eq 0 ]; then :; elif [ \"$2\" -le {limit} ]; then cat -- \"$1\"; else head -c {h} -- \"$1\"; tail -c {t} -- \"$1\"; fi; }}\n\
         tend_emit() {{ no=0 ne=0; if [ -s \"$o\" ]; then no=$(wc -c < \"$o\"); fi; if [ -s \"$e\" ]; then ne=$(wc -c < \"$e\"); fi; printf 'TEND-STEP %s %s %s %s\\n' \"$1\" \"$2\" $no $ne; tend_part \"$o\" $no; tend_part \"$e\" $ne; }}\n\
         tend_flush() {{ if [ -s \"$tend_dirs\" ]; then xargs -0 sync -- < \"$tend_dirs\" || echo 'tend: cannot fsync the directories this batch changed' >&2; : > \"$tend_dirs\"; fi; }}\n\
         u=; {{ while read -r k a e b; do if [ \"$k\" = Uid: ]; then u=$e; break; fi; done < /proc/self/status; }} 2>/dev/null; [ -n \"$u\" ] || u=$(id -u)\n\
         if [ -n \"${{TEND_LOCK_DIR:-}}\" ]; then l=$TEND_LOCK_DIR; elif [ \"$u\" = 0 ]; then l=/run/tend; else l=\"${{TMPDIR:-/tmp}}/tend-$u\"; fi\n\
         if command -v flock >/dev/null 2>&1; then\n\
         \x20 {{ {{ [ -d \"$l\" ] || {{ mkdir -p \"$l\" && chmod 0700 \"$l\"; }}; }} && exec 9>>\"$l/steps.lock\" && flock -w {wait} 9; }} || {{ echo \"tend: an earlier attempt still holds $l/steps.lock on this host\" >&2; exit 96; }}\n\
         elif [ {require} = 1 ]; then\n\
         \x20 echo 'tend: no flock on this host, so it cannot be told whether an earlier attempt still runs; not retried' >&2; exit 96\n\
         fi\n",
        wait = opts.lock_wait_secs.max(1),
        require = u8::from(opts.require_lock),
        nonce = format_args!("{:016x}", opts.nonce),
    );
    let mut stdin = Vec::new();
    for (k, step) in steps.iter().enumerate() {
        // A step without content must not read what belongs to the next one.
        let input = if step.stdin.is_empty() {
            " </dev/null"
        } else {
            ""
        };
        // Each step runs in a subshell of the batch's shell (a fork, no
        // new shell to start), so its `set -eu`, traps, umask and exit stay
        // its own. fd 9 (the lock) is closed for the step: a process it
        // leaves running must not hold the lock for ever.
        s.push_str(&format!(
            "printf 'TEND-START {k}\\n'\n\
             ( eval {} ){input} >\"$o\" 2>\"$e\" 9>&-; rc=$?\n\
             tend_emit {k} \"$rc\"\n\
             [ \"$rc\" -eq 0 ] || {{ tend_flush; exit 0; }}\n",
            quote(&step.script)
        ));
        stdin.extend_from_slice(&step.stdin);
    }
    s.push_str(&format!(
        "tend_flush\necho 'TEND-BATCH-END {}'\n{SENTINEL}",
        steps.len()
    ));
    let mut all = s.into_bytes();
    let script_len = all.len();
    all.extend_from_slice(&stdin);
    RemoteCommand {
        script: bootstrap(script_len),
        stdin: all,
    }
}

/// The command line of a batch: read exactly `len` bytes of script from
/// stdin, check that it arrived whole, run it; the rest of stdin is the
/// steps' content.
fn bootstrap(len: usize) -> String {
    format!(
        "s=$(head -c {len}) || exit 97\n\
         case $s in *{SENTINEL}) ;; *) echo 'tend: the batch script arrived cut short' >&2; exit 97;; esac\n\
         eval \"$s\""
    )
}

/// Why batch output could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("batch output: {0}")]
pub struct BatchParseError(pub String);

/// What the host reported, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchEvent {
    /// Step `k` (0-based unit index) started.
    Started(usize),
    /// Step `k` ended.
    Finished(usize, StepOutput),
    /// Every step ran.
    End,
}

/// An incremental parser of batch output: feed it chunks as they arrive.
#[derive(Debug)]
pub struct Parser {
    steps: usize,
    limit: u64,
    buf: Vec<u8>,
    /// The next step whose start marker is due.
    next: usize,
    /// The step started and not finished.
    running: Option<usize>,
    /// A record header read, its body not yet complete.
    body: Option<Body>,
    /// No more output may follow (trailer seen, or a step failed).
    closed: bool,
    ended: bool,
    error: Option<BatchParseError>,
}

#[derive(Debug)]
struct Body {
    k: usize,
    status: i32,
    out_total: u64,
    err_total: u64,
}

impl Parser {
    pub fn new(steps: usize, opts: BatchOpts) -> Self {
        Parser {
            steps,
            limit: opts.output_limit.max(2),
            buf: Vec::new(),
            next: 0,
            running: None,
            body: None,
            closed: false,
            ended: false,
            error: None,
        }
    }

    /// The step started and not finished, if any.
    pub fn running(&self) -> Option<usize> {
        self.running
    }

    /// Every step ran and the trailer came.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The first error in the output, if any; nothing after it is parsed.
    pub fn error(&self) -> Option<&BatchParseError> {
        self.error.as_ref()
    }

    /// Feed a chunk; the events it completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<BatchEvent> {
        let mut events = Vec::new();
        if self.error.is_some() {
            return events;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(bytes);
        let mut used = 0;
        loop {
            match self.step(&buf[used..]) {
                Ok(Some((n, ev))) => {
                    used += n;
                    events.extend(ev);
                }
                Ok(None) => break,
                Err(e) => {
                    self.error = Some(e);
                    break;
                }
            }
        }
        buf.drain(..used);
        self.buf = buf;
        events
    }

    /// Parse one item at the front of `rest`: bytes used and its event, or
    /// None when more bytes are needed.
    fn step(
        &mut self,
        rest: &[u8],
    ) -> Result<Option<(usize, Option<BatchEvent>)>, BatchParseError> {
        let err = |m: String| BatchParseError(m);
        if let Some(b) = &self.body {
            let shown = |total: u64| total.min(self.limit) as usize;
            let (no, ne) = (shown(b.out_total), shown(b.err_total));
            if rest.len() < no + ne {
                return Ok(None);
            }
            let out = StepOutput {
                status: b.status,
                stdout: self.expand(&rest[..no], b.out_total),
                stderr: self.expand(&rest[no..no + ne], b.err_total),
            };
            let k = b.k;
            self.body = None;
            self.running = None;
            self.next = k + 1;
            if out.status != 0 {
                // The batch stops at a failed step; nothing may follow.
                self.closed = true;
            }
            return Ok(Some((no + ne, Some(BatchEvent::Finished(k, out)))));
        }
        if rest.is_empty() {
            return Ok(None);
        }
        if self.closed {
            return Err(err(format!("output after the end, at step {}", self.next)));
        }
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            // A header is short; a long line without a newline is garbage.
            if rest.len() > 256 {
                return Err(err("a header line is too long".into()));
            }
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&rest[..nl]).map_err(|_| err("header is not UTF-8".into()))?;
        let f: Vec<&str> = line.split(' ').collect();
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| err(format!("bad number in `{line}`")))
        };
        let ev = match (f.as_slice(), self.running) {
            (["TEND-START", k], None) if num(k)? == self.next as u64 && self.next < self.steps => {
                self.running = Some(self.next);
                BatchEvent::Started(self.next)
            }
            (["TEND-STEP", k, status, no, ne], Some(r)) if num(k)? == r as u64 => {
                let status: i32 = status
                    .parse()
                    .map_err(|_| err(format!("bad status in `{line}`")))?;
                self.body = Some(Body {
                    k: r,
                    status,
                    out_total: num(no)?,
                    err_total: num(ne)?,
                });
                return Ok(Some((nl + 1, None)));
            }
            (["TEND-BATCH-END", n], None)
                if num(n)? == self.steps as u64 && self.next == self.steps =>
            {
                self.closed = true;
                self.ended = true;
                BatchEvent::End
            }
            _ => {
                return Err(err(format!(
                    "expected {} of step {}, found `{line}`",
                    if self.running.is_some() {
                        "the record"
                    } else {
                        "the start"
                    },
                    self.next
                )));
            }
        };
        Ok(Some((nl + 1, Some(ev))))
    }

    /// The bytes shown of an output of `total` bytes, with what the host
    /// left out marked between its head and its tail.
    fn expand(&self, shown: &[u8], total: u64) -> Vec<u8> {
        if total <= self.limit {
            return shown.to_vec();
        }
        let h = (self.limit / 2) as usize;
        let mut v = shown[..h].to_vec();
        v.extend_from_slice(
            format!("\n[tend: {} bytes left out]\n", total - self.limit).as_bytes(),
        );
        v.extend_from_slice(&shown[h..]);
        v
    }
}

/// The records of the steps that ran, in order, from complete output.
/// Fewer than `steps` when a step failed (it is the last record) — or when
/// the output was cut short, which is an error.
pub fn parse(
    stdout: &[u8],
    steps: usize,
    opts: BatchOpts,
) -> Result<Vec<StepOutput>, BatchParseError> {
    let mut p = Parser::new(steps, opts);
    let mut out = Vec::new();
    for ev in p.push(stdout) {
        if let BatchEvent::Finished(_, o) = ev {
            out.push(o);
        }
    }
    if let Some(e) = p.error() {
        return Err(e.clone());
    }
    let failed = out.last().is_some_and(|o| o.status != 0);
    if !p.ended() && !failed || !p.buf.is_empty() || p.body.is_some() {
        return Err(BatchParseError(format!(
            "cut short after {} step(s)",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::Transport;
    use crate::transport::local::LocalTransport;

    const OPTS: BatchOpts = BatchOpts {
        output_limit: 1024 * 1024,
        lock_wait_secs: 5,
        require_lock: false,
        nonce: 7,
    };

    fn cmd(script: &str, stdin: &[u8]) -> RemoteCommand {
        RemoteCommand {
            script: script.into(),
            stdin: stdin.to_vec(),
        }
    }

    fn run_with(steps: &[RemoteCommand], opts: BatchOpts) -> Vec<StepOutput> {
        let b = script(steps, opts);
        let out = LocalTransport::new()
            .exec(&b.script, &b.stdin, Duration::from_secs(120))
            .unwrap();
        assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
        parse(&out.stdout, steps.len(), opts).unwrap()
    }

    fn run(steps: &[RemoteCommand]) -> Vec<StepOutput> {
        run_with(steps, OPTS)
    }

    #[test]
    fn steps_run_in_order_with_their_own_stdin_and_output() {
        let got = run(&[
            cmd("head -c 3; echo ' one'; echo err1 >&2", b"abc"),
            cmd("cat", b""),
            cmd("head -c 4 | od -An -c | tr -s ' '", b"x\ny\x00"),
        ]);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].stdout, b"abc one\n");
        assert_eq!(got[0].stderr, b"err1\n");
        assert_eq!(got[1].stdout, b"", "a step without content reads nothing");
        assert_eq!(
            String::from_utf8_lossy(&got[2].stdout).trim(),
            "x \\n y \\0"
        );
    }

    #[test]
    fn a_step_keeps_its_shell_state_to_itself() {
        let got = run(&[
            cmd(
                "set -eu\numask 077\nx=1\ncd /usr\ntrap 'echo bye' EXIT\nexit 0",
                b"",
            ),
            cmd("set -eu\numask; echo \"${x:-unset}\"; pwd", b""),
            cmd("false; echo not reached", b""),
        ]);
        assert_eq!(
            got[0].stdout, b"bye\n",
            "a step's EXIT trap runs when it ends"
        );
        let second = String::from_utf8_lossy(&got[1].stdout).into_owned();
        let mut lines = second.lines();
        assert_ne!(lines.next(), Some("0077"), "{second}");
        assert_eq!(lines.next(), Some("unset"), "{second}");
        assert_ne!(lines.next(), Some("/usr"), "{second}");
        assert_eq!(got[2].status, 0, "no set -e unless the step says so");
    }

    #[test]
    fn path_writes_in_a_batch_land_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        let d = d.to_str().unwrap();
        let steps = [
            crate::apply::make_directory(d, None, None, None, crate::apply::PathType::Nothing),
            crate::apply::write_file(&format!("{d}/a"), b"one", None, None, None),
            crate::apply::write_file(&format!("{d}/b"), b"", None, None, None),
            crate::apply::make_symlink(&format!("{d}/l"), "a", crate::apply::PathType::Nothing),
        ];
        let got = run(&steps);
        assert!(got.iter().all(|o| o.status == 0), "{got:?}");
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b", "l"]);
        assert_eq!(std::fs::read(format!("{d}/a")).unwrap(), b"one");
        assert_eq!(
            std::fs::read_link(format!("{d}/l")).unwrap().to_str(),
            Some("a")
        );
    }

    #[test]
    fn the_script_travels_on_stdin_so_a_huge_batch_fits() {
        // 2,000 steps of 100 bytes of script each: past what one SSH
        // channel request or one argv element may carry.
        let steps: Vec<RemoteCommand> = (0..2000)
            .map(|i| cmd(&format!("echo {i} >/dev/null; : {}", "x".repeat(80)), b""))
            .collect();
        let b = script(&steps, OPTS);
        assert!(
            b.script.len() < 300,
            "the command line is a short bootstrap"
        );
        assert!(b.stdin.len() > 200_000);
        assert_eq!(run(&steps).len(), 2000);
    }

    #[test]
    fn a_script_cut_short_in_transit_never_runs() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let b = script(
            &[cmd(
                &format!("touch {}", quote(marker.to_str().unwrap())),
                b"",
            )],
            OPTS,
        );
        let cut = &b.stdin[..b.stdin.len() - 5];
        let out = LocalTransport::new()
            .exec(&b.script, cut, Duration::from_secs(30))
            .unwrap();
        assert_eq!(out.status, 97, "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("cut short"));
        assert!(!marker.exists());
    }

    #[test]
    fn output_past_the_limit_keeps_head_and_tail_on_the_host() {
        let opts = BatchOpts {
            output_limit: 100,
            ..OPTS
        };
        let got = run_with(
            &[cmd(
                "printf 'HEAD'; head -c 100000 /dev/zero | tr '\\0' x; printf 'TAIL'; seq 1 30000 >&2",
                b"",
            )],
            opts,
        );
        let out = String::from_utf8_lossy(&got[0].stdout);
        assert!(out.starts_with("HEAD"), "{out}");
        assert!(out.ends_with("TAIL"), "{out}");
        assert!(out.contains("[tend: 99908 bytes left out]"), "{out}");
        assert!(got[0].stderr.len() < 200);
        assert!(String::from_utf8_lossy(&got[0].stderr).ends_with("30000\n"));
    }

    #[test]
    fn stops_at_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let got = run(&[
            cmd("true", b""),
            cmd("echo nope >&2; exit 3", b""),
            cmd(&format!("touch {}", quote(marker.to_str().unwrap())), b""),
        ]);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[1].status, got[1].stderr.as_slice()),
            (3, &b"nope\n"[..])
        );
        assert!(!marker.exists(), "nothing after a failed step runs");
    }

    #[test]
    fn an_exit_in_a_step_does_not_end_the_batch() {
        let got = run(&[cmd("exit 0", b""), cmd("set -e; echo two", b"")]);
        assert_eq!(got[1].stdout, b"two\n");
    }

    #[test]
    fn output_with_quotes_and_binary_survives() {
        let got = run(&[cmd(
            "printf '%s' \"it's $(echo ok)\"; printf '\\377\\000'",
            b"",
        )]);
        assert_eq!(got[0].stdout, b"it's ok\xff\x00");
    }

    #[test]
    fn events_arrive_as_the_output_does() {
        let mut p = Parser::new(2, OPTS);
        assert_eq!(p.push(b"TEND-STA"), vec![]);
        assert_eq!(p.push(b"RT 0\n"), vec![BatchEvent::Started(0)]);
        assert_eq!(p.running(), Some(0));
        assert_eq!(p.push(b"TEND-STEP 0 0 2 0\nh"), vec![]);
        let done = StepOutput {
            status: 0,
            stdout: b"hi".to_vec(),
            stderr: vec![],
        };
        assert_eq!(
            p.push(b"iTEND-START 1\n"),
            vec![BatchEvent::Finished(0, done), BatchEvent::Started(1)]
        );
        assert_eq!(p.running(), Some(1));
        assert!(p.error().is_none());
    }

    #[test]
    fn garbled_output_is_an_error() {
        for (out, n) in [
            (&b""[..], 1),
            (b"TEND-START 0\n", 1),
            (b"TEND-STEP 0 0 0 0\n", 1),
            (b"TEND-START 1\nTEND-STEP 1 0 0 0\nTEND-BATCH-END 1\n", 1),
            (b"TEND-START 0\nTEND-STEP 0 0 5 0\nabc", 1),
            (b"TEND-START 0\nTEND-STEP 0 0 0 0\nTEND-BATCH-END 2\n", 1),
            (b"TEND-START 0\nTEND-STEP 0 1 0 0\nTEND-START 1\n", 2),
            (b"TEND-START 0\nTEND-STEP 0 x 0 0\n", 1),
            (b"TEND-BATCH-END 1\n", 1),
            (b"TEND-START 0\nTEND-START 0\n", 1),
        ] {
            assert!(
                parse(out, n, OPTS).is_err(),
                "{:?}",
                String::from_utf8_lossy(out)
            );
        }
        assert_eq!(
            parse(b"TEND-START 0\nTEND-STEP 0 2 1 0\nx", 3, OPTS)
                .unwrap()
                .len(),
            1
        );
    }
}
