//! Several steps in ONE remote command: each step's script runs in its own
//! subshell, in order, with its stdout and stderr kept apart, and the batch
//! stops at the first step that fails. Each step's content follows the
//! previous step's on the one stdin (every builder reads exactly its own
//! length), so content still never appears in a command line.
//!
//! Output, per executed step, then a trailer when every step ran:
//!
//! ```text
//! TEND-STEP <k> <exit status> <stdout bytes> <stderr bytes>\n<stdout><stderr>
//! TEND-BATCH-END <steps>\n
//! ```
//!
//! Invariant: pure; the parser is strict, and a step without its record is
//! reported as such, never assumed to have succeeded.

use super::RemoteCommand;
use crate::shell::quote;

/// What one step of a batch did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// One command that runs `steps` in order.
pub fn script(steps: &[RemoteCommand]) -> RemoteCommand {
    let mut s = String::from(
        "o=$(mktemp) && e=$(mktemp) || { echo 'tend: mktemp failed' >&2; exit 97; }\n\
         trap 'rm -f \"$o\" \"$e\"' EXIT\n",
    );
    let mut stdin = Vec::new();
    for (k, step) in steps.iter().enumerate() {
        // A step without content must not read what belongs to the next one.
        let input = if step.stdin.is_empty() {
            " </dev/null"
        } else {
            ""
        };
        s.push_str(&format!(
            "( sh -c {} ){input} >\"$o\" 2>\"$e\"; rc=$?\n\
             printf 'TEND-STEP {k} %s %s %s\\n' \"$rc\" \"$(wc -c < \"$o\")\" \"$(wc -c < \"$e\")\"\n\
             cat -- \"$o\" \"$e\"\n\
             [ \"$rc\" -eq 0 ] || exit 0\n",
            quote(&step.script)
        ));
        stdin.extend_from_slice(&step.stdin);
    }
    s.push_str(&format!("echo 'TEND-BATCH-END {}'\n", steps.len()));
    RemoteCommand { script: s, stdin }
}

/// Why batch output could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("batch output: {0}")]
pub struct BatchParseError(pub String);

/// The records of the steps that ran, in order. Fewer than `steps` when a step
/// failed (it is the last record) — or when the output was cut short, which
/// is an error.
pub fn parse(stdout: &[u8], steps: usize) -> Result<Vec<StepOutput>, BatchParseError> {
    let err = |m: String| BatchParseError(m);
    let mut out = Vec::new();
    let mut rest = stdout;
    loop {
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| err(format!("cut short after {} step(s)", out.len())))?;
        let line =
            std::str::from_utf8(&rest[..nl]).map_err(|_| err("header is not UTF-8".into()))?;
        rest = &rest[nl + 1..];
        if let Some(n) = line.strip_prefix("TEND-BATCH-END ") {
            if n != steps.to_string() || out.len() != steps || !rest.is_empty() {
                return Err(err(format!(
                    "trailer `{line}` after {} of {steps} step(s)",
                    out.len()
                )));
            }
            return Ok(out);
        }
        let f: Vec<&str> = line.split(' ').collect();
        let num = |s: &str| {
            s.parse::<usize>()
                .map_err(|_| err(format!("bad number in `{line}`")))
        };
        if f.len() != 5 || f[0] != "TEND-STEP" || num(f[1])? != out.len() {
            return Err(err(format!(
                "expected the record of step {}, found `{line}`",
                out.len()
            )));
        }
        let status: i32 = f[2]
            .parse()
            .map_err(|_| err(format!("bad status in `{line}`")))?;
        let (no, ne) = (num(f[3])?, num(f[4])?);
        if rest.len() < no + ne {
            return Err(err(format!("step {} output cut short", out.len())));
        }
        out.push(StepOutput {
            status,
            stdout: rest[..no].to_vec(),
            stderr: rest[no..no + ne].to_vec(),
        });
        rest = &rest[no + ne..];
        if status != 0 {
            // The batch stops at a failed step; nothing may follow.
            if !rest.is_empty() {
                return Err(err(format!("output after failed step {}", out.len() - 1)));
            }
            return Ok(out);
        }
        if out.len() > steps {
            return Err(err("more records than steps".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::Transport;
    use crate::transport::local::LocalTransport;

    fn cmd(script: &str, stdin: &[u8]) -> RemoteCommand {
        RemoteCommand {
            script: script.into(),
            stdin: stdin.to_vec(),
        }
    }

    fn run(steps: &[RemoteCommand]) -> Vec<StepOutput> {
        let b = script(steps);
        let out = LocalTransport::new()
            .exec(&b.script, &b.stdin, Duration::from_secs(30))
            .unwrap();
        assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
        parse(&out.stdout, steps.len()).unwrap()
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
    fn garbled_output_is_an_error() {
        for (out, n) in [
            (&b""[..], 1),
            (b"TEND-STEP 0 0 0 0\n", 1),
            (b"TEND-STEP 1 0 0 0\nTEND-BATCH-END 1\n", 1),
            (b"TEND-STEP 0 0 5 0\nabc", 1),
            (b"TEND-STEP 0 0 0 0\nTEND-BATCH-END 2\n", 1),
            (b"TEND-STEP 0 1 0 0\nTEND-STEP 1 0 0 0\n", 2),
            (b"TEND-STEP 0 x 0 0\n", 1),
            (b"TEND-BATCH-END 1\n", 1),
        ] {
            assert!(parse(out, n).is_err(), "{:?}", String::from_utf8_lossy(out));
        }
        assert_eq!(parse(b"TEND-STEP 0 2 1 0\nx", 3).unwrap().len(), 1);
    }
}
