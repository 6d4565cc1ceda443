//! Unified diffs of file content for people (`tend plan`, `tend drift`).
//!
//! The probe brings back a digest and a size per file, never content: one
//! round trip, little output. To show what a content change does, `plan`
//! asks each host, in one more remote command per host and only when a
//! change is shown, for the current content of the files whose content
//! changes: at most [`MAX_BYTES`] of each, through `head -c` and `od`
//! (tools the probe already needs). Nothing is fetched for a `sensitive`
//! resource (SPEC 8.6), nor for a file larger than the cap: its diff says
//! so instead. A fetch that fails leaves the plan as it was, with a note.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::core::actual::Observed;
use crate::core::diff::Action;
use crate::core::model::DesiredState;
use crate::reconcile::Prepared;
use crate::shell::quote;
use crate::transport::Transport;

/// Bytes of a file's old or new content that a diff is made of.
pub const MAX_BYTES: usize = 64 * 1024;
/// Lines of one file's diff that are shown; the rest are counted.
pub const MAX_LINES: usize = 200;
/// How long the fetch of one host's old contents may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Per (host, step id): the lines to show under the step.
pub type Diffs = BTreeMap<(String, String), Vec<String>>;

/// One file to show a diff for.
struct Wanted {
    id: String,
    path: String,
    /// Current size on the host; None when there is no file yet.
    old_size: Option<u64>,
    new: Arc<Vec<u8>>,
}

/// The content diffs of every file step of the plan that changes content.
pub async fn for_plan(prep: &Prepared, state: &DesiredState) -> Diffs {
    for_steps(prep, state, |_, _| true).await
}

/// The content diffs of the file steps for which `keep(host, step id)`.
pub async fn for_steps(
    prep: &Prepared,
    state: &DesiredState,
    keep: impl Fn(&str, &str) -> bool,
) -> Diffs {
    let mut diffs = Diffs::new();
    let mut jobs = Vec::new();
    for hp in &prep.plan.hosts {
        let (Some(host), Some(Ok(actual))) = (
            state.hosts.get(&hp.host),
            prep.probes.get(&hp.host).map(|p| &p.result),
        ) else {
            continue;
        };
        let mut wanted = Vec::new();
        // The plan's steps, and the differences drift policy reported.
        let reported = prep
            .changes
            .get(&hp.host)
            .into_iter()
            .flatten()
            .filter(|c| c.reported)
            .map(|c| (c.id.as_str(), c.kind, Action::Update, &c.fields));
        let candidates = hp
            .steps
            .iter()
            .map(|s| (s.id.as_str(), s.kind, s.action, &s.fields))
            .chain(reported);
        for (id, kind, action, fields) in candidates {
            if !keep(&hp.host, id)
                || kind != "file"
                || !matches!(action, Action::Create | Action::Update)
                || !fields.iter().any(|f| f.field == "content")
            {
                continue;
            }
            let Some(r) = host.resource(id) else {
                continue;
            };
            if r.sensitive() {
                continue;
            }
            let (Some(content), Some(path)) = (&r.content, r.path()) else {
                continue;
            };
            let old_size = match actual.resources.get(id) {
                Some(Observed::File(f)) => Some(f.size),
                _ => None,
            };
            wanted.push(Wanted {
                id: id.to_string(),
                path: path.to_string(),
                old_size,
                new: content.bytes.clone(),
            });
        }
        if wanted.is_empty() {
            continue;
        }
        let transport = prep.transports.get(&hp.host).cloned();
        let name = hp.host.clone();
        jobs.push(tokio::task::spawn_blocking(move || {
            let olds = fetch(transport.as_deref(), &wanted);
            (name, wanted, olds)
        }));
    }
    for job in jobs {
        let Ok((host, wanted, olds)) = job.await else {
            continue;
        };
        for (w, old) in wanted.iter().zip(olds) {
            let lines = match old {
                Ok(old) if w.old_size.is_none() => {
                    let mut l = render(&old, &w.new, &w.path);
                    if let Some(first) = l.first_mut()
                        && first.starts_with("--- ")
                    {
                        *first = format!("--- {} (not on the host)", w.path);
                    }
                    l
                }
                Ok(old) => render(&old, &w.new, &w.path),
                Err(why) => vec![format!("(no diff: {why})")],
            };
            diffs.insert((host.clone(), w.id.clone()), lines);
        }
    }
    diffs
}

/// The old content of each wanted file (empty for a file not there yet),
/// or why it is not shown.
fn fetch(t: Option<&dyn Transport>, wanted: &[Wanted]) -> Vec<Result<Vec<u8>, String>> {
    let mut out: Vec<Result<Vec<u8>, String>> = wanted
        .iter()
        .map(|w| match w.old_size {
            None => Ok(Vec::new()),
            Some(n) if n as usize > MAX_BYTES => Err(format!(
                "the file on the host has {n} bytes, more than the {MAX_BYTES} a diff shows"
            )),
            Some(_) => Err(String::new()),
        })
        .collect();
    let asked: Vec<usize> = (0..wanted.len())
        .filter(|&i| matches!(&out[i], Err(e) if e.is_empty()))
        .collect();
    if asked.is_empty() {
        return out;
    }
    let Some(t) = t else {
        for &i in &asked {
            out[i] = Err("the host's connection is gone".into());
        }
        return out;
    };
    let paths: Vec<&str> = asked.iter().map(|&i| wanted[i].path.as_str()).collect();
    let got = t
        .exec(&script(&paths), b"", FETCH_TIMEOUT)
        .map_err(|e| format!("reading the current content failed: {}", e.message))
        .and_then(|o| parse(&o.stdout, paths.len()));
    match got {
        Ok(contents) => {
            for (&i, c) in asked.iter().zip(contents) {
                out[i] = c.ok_or_else(|| "the file could not be read on the host".to_string());
            }
        }
        Err(why) => {
            for &i in &asked {
                out[i] = Err(why.clone());
            }
        }
    }
    out
}

/// For each path: `F`, its first [`MAX_BYTES`] bytes as hex from `od`, `E`
/// (or `X` when it cannot be read). Paths are quoted by [`quote`].
pub fn script(paths: &[&str]) -> String {
    let mut s = String::from("export LC_ALL=C\n");
    for p in paths {
        let q = quote(p);
        s.push_str(&format!(
            "if [ -f {q} ] && [ -r {q} ]; then echo F; head -c {MAX_BYTES} -- {q} | od -An -v -tx1; echo E; else echo X; fi\n"
        ));
    }
    s
}

/// The contents `script` printed, one per path (None: not readable).
pub fn parse(stdout: &[u8], n: usize) -> Result<Vec<Option<Vec<u8>>>, String> {
    let text = std::str::from_utf8(stdout).map_err(|_| "unreadable answer".to_string())?;
    let mut out = Vec::with_capacity(n);
    let mut cur: Option<Vec<u8>> = None;
    for line in text.lines() {
        match (line, cur.as_mut()) {
            ("X", None) => out.push(None),
            ("F", None) => cur = Some(Vec::new()),
            ("E", Some(_)) => out.push(cur.take()),
            (hex, Some(buf)) => {
                for b in hex.split_ascii_whitespace() {
                    let v = u8::from_str_radix(b, 16).map_err(|_| "bad hex".to_string())?;
                    buf.push(v);
                }
                if buf.len() > MAX_BYTES {
                    return Err("answer larger than asked".into());
                }
            }
            _ => return Err(format!("unexpected line `{line}`")),
        }
    }
    if cur.is_some() || out.len() != n {
        return Err(format!("{} of {n} file(s) in the answer", out.len()));
    }
    Ok(out)
}

/// One line of a diff in colour: headers bold, additions green, removals
/// red, hunk headers cyan.
pub fn paint_line(p: crate::output::Paint, l: &str) -> String {
    if l.starts_with("+++") || l.starts_with("---") {
        p.bold(l)
    } else if l.starts_with('+') {
        p.green(l)
    } else if l.starts_with('-') {
        p.red(l)
    } else if l.starts_with("@@") {
        p.cyan(l)
    } else {
        l.to_string()
    }
}

/// Whether bytes are shown as text: UTF-8 without NUL.
fn is_text(b: &[u8]) -> bool {
    !b.contains(&0) && std::str::from_utf8(b).is_ok()
}

/// The lines of a unified diff from `old` to `new` (3 lines of context),
/// or one line saying why there is none.
pub fn render(old: &[u8], new: &[u8], path: &str) -> Vec<String> {
    if new.len() > MAX_BYTES {
        return vec![format!(
            "(no diff: the new content has {} bytes, more than the {MAX_BYTES} a diff shows)",
            new.len()
        )];
    }
    if !is_text(old) || !is_text(new) {
        return vec![format!(
            "(binary content differs: {} -> {} bytes)",
            old.len(),
            new.len()
        )];
    }
    let (old, new) = (
        String::from_utf8_lossy(old).into_owned(),
        String::from_utf8_lossy(new).into_owned(),
    );
    let diff = similar::TextDiff::from_lines(&old, &new);
    let text = diff
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("{path} (on the host)"),
            &format!("{path} (desired)"),
        )
        .to_string();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.len() > MAX_LINES {
        let more = lines.len() - MAX_LINES;
        lines.truncate(MAX_LINES);
        lines.push(format!("({more} more line(s) of diff not shown)"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_what_the_script_prints() {
        let out = b"F\n 68 69\n 0a\nE\nX\nF\nE\n";
        assert_eq!(
            parse(out, 3).unwrap(),
            vec![Some(b"hi\n".to_vec()), None, Some(vec![])]
        );
        assert!(parse(out, 2).is_err());
        assert!(parse(b"F\n zz\nE\n", 1).is_err());
        assert!(parse(b"F\n 01\n", 1).is_err());
        assert!(parse(b"Q\n", 1).is_err());
    }

    #[test]
    fn the_script_quotes_every_path() {
        let s = script(&["/etc/a b", "/x'; rm -rf /"]);
        assert!(s.contains("'/etc/a b'"), "{s}");
        assert!(s.contains(r"'/x'\''; rm -rf /'"), "{s}");
    }

    #[test]
    fn text_diffs_are_unified_and_binary_ones_say_so() {
        let lines = render(b"a\nb\nc\n", b"a\nB\nc\n", "/etc/x");
        assert_eq!(
            lines,
            vec![
                "--- /etc/x (on the host)",
                "+++ /etc/x (desired)",
                "@@ -1,3 +1,3 @@",
                " a",
                "-b",
                "+B",
                " c",
            ]
        );
        assert_eq!(
            render(b"\0\x01", b"ab", "/b"),
            vec!["(binary content differs: 2 -> 2 bytes)"]
        );
        let big = vec![b'a'; MAX_BYTES + 1];
        assert!(render(b"", &big, "/big")[0].starts_with("(no diff"));
        let many: String = (0..500).map(|i| format!("{i}\n")).collect();
        let l = render(b"", many.as_bytes(), "/m");
        assert_eq!(l.len(), MAX_LINES + 1);
        assert!(l[MAX_LINES].contains("more line(s)"), "{:?}", l.last());
    }
}
