//! The fuzzing campaign (RELIABILITY.md): mutation fuzzing, on the stable
//! toolchain, of the three parsers that read bytes tend does not control:
//!
//! - `desired`: the desired-state loader and validator (`model::validate`),
//!   one file at a time in the role its corpus name gives (`tend-*`,
//!   `inventory-*`, `host-*`, `group-*`), beside valid other files;
//! - `token`: the confirmation token parser (`token::parse`), and a parsed
//!   token rendered and parsed again gives the same token;
//! - `probe`: the probe output parser (`probe::parse`), seeded with real
//!   probe output of this machine (the probe script run locally).
//!
//! Every corpus file of `tests/corpus/<target>/` is replayed first, then
//! inputs made by mutating the pool (byte flips, inserts from a dictionary
//! of YAML and probe syntax, splices, repeated lines, truncation) run for
//! `TEND_FUZZ_SECS` per target (3 s by default, which CI runs; the full
//! campaign is 600). An input that shows new behaviour (a new set of
//! problems or errors, digits aside) joins the pool, and with
//! `TEND_FUZZ_SAVE=1` the corpus. The seed is `TEND_FUZZ_SEED` or the
//! clock's, and is printed. Promised: no panic, no input over 2 s, memory
//! bounded (inputs at most 64 KiB, a pool of at most 32 MiB; the peak RSS
//! is printed). A panicking
//! input is written to `target/fuzz-crashes/` and fails the test.

#[path = "support/rng.rs"]
mod rng;

use rng::Rng;
use std::collections::HashSet;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tend::core::model::{Blob, SourceTree, validate};
use tend::core::token;
use tend::probe::{self, ProbeItem};

const MAX_INPUT: usize = 64 * 1024;
/// One input may raise the process's peak RSS by at most this much.
const MAX_GROWTH_KB: u64 = 64 * 1024;
/// The pool of inputs to mutate, at most this many bytes in all.
const POOL_BYTES: usize = 32 << 20;
/// An input that takes longer is a failure (a hang); debug builds are
/// slower, and CI runs them on a busy machine.
const SLOW: Duration = if cfg!(debug_assertions) {
    Duration::from_secs(10)
} else {
    Duration::from_secs(2)
};

const DICT: &[&str] = &[
    ": ",
    "- ",
    "\n",
    "  ",
    "    ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "&a ",
    "*a",
    "<<: *a\n",
    "!!binary ",
    "!!str ",
    "!tag ",
    "---\n",
    "...\n",
    "\"",
    "'",
    "#",
    "|\n",
    ">-\n",
    "~",
    "null",
    "true",
    "0o777",
    "0x1F",
    "1e999",
    "-1",
    "18446744073709551616",
    "\t",
    "\r\n",
    "\u{feff}",
    "\0",
    "é",
    "\u{202e}",
    "\\x7f",
    "\\u0085",
    "kind: file\n",
    "kind: directory\n",
    "kind: symlink\n",
    "kind: user\n",
    "kind: service\n",
    "kind: command\n",
    "path: /",
    "path: ../",
    "state: absent\n",
    "content: ",
    "source: ",
    "sensitive: true\n",
    "guard: connection\n",
    "mode: \"0644\"\n",
    "owner: root\n",
    "requires: [",
    "restart_on: [",
    "name: ",
    "address: ",
    "jump: ",
    "become: sudo\n",
    "hosts:\n",
    "resources:\n",
    "lifecycle: absent\n",
    "rollout:\n",
    "waves:\n",
    "operation: ",
    "operations:\n",
    "expires: ",
    "2026-12-07T00:00:00Z",
    "reason: ",
    "\tF\t",
    "\tD\t",
    "\tL\t",
    "\tA\t",
    "TEND-END\n",
    "sha256:",
    "%",
    "$(id)",
    "`id`",
    ";",
    "|",
    "&&",
];

fn mutate(rng: &mut Rng, input: &[u8], pool: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(9) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.insert(at, rng.next() as u8),
            2 if !v.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            3 | 4 => {
                let w = DICT[rng.below(DICT.len())].as_bytes();
                v.splice(at..at, w.iter().copied());
            }
            5 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())].1;
                let from = rng.below(other.len() + 1);
                let len = rng.below(other.len() - from + 1).min(4096);
                v.splice(at..at, other[from..from + len].iter().copied());
            }
            6 => {
                // Repeat the line at `at`, indented one more step each time:
                // deep nesting, long lists.
                let start = v[..at]
                    .iter()
                    .rposition(|&c| c == b'\n')
                    .map_or(0, |i| i + 1);
                let end = v[at..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(v.len(), |i| at + i + 1);
                let line = v[start..end].to_vec();
                let most = if rng.below(8) == 0 { 2000 } else { 8 };
                let times = 1 + rng.below(most);
                let mut add = Vec::new();
                for k in 0..times {
                    if v.len() + add.len() > MAX_INPUT {
                        break;
                    }
                    add.extend(std::iter::repeat_n(b' ', 2 * (k % 64)));
                    add.extend_from_slice(&line);
                }
                v.splice(end..end, add);
            }
            7 => v.truncate(at),
            _ => {
                let i = rng.below(v.len() + 1);
                let j = rng.below(v.len() + 1);
                let (a, b) = (i.min(j), i.max(j));
                let chunk = v[a..b].to_vec();
                v.splice(at..at, chunk);
            }
        }
        v.truncate(MAX_INPUT);
    }
    // Only what it holds: a pool of inputs truncated from huge ones would
    // keep their capacity.
    v.shrink_to_fit();
    v
}

/// What an input did, digits aside: new behaviour when unseen.
fn shape(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    s.chars()
        .filter(|c| !c.is_ascii_digit())
        .collect::<String>()
        .hash(&mut h);
    h.finish()
}

/// One fuzz target: runs an input, says what it did (or panics, or fails
/// a property with a message).
type Target = fn(&Path, &[u8]) -> Result<String, String>;

const VALID_TEND: &str = "dispatch: enforced\nprobe_timeout: 10s\n";
const VALID_INVENTORY: &str = "hosts:\n  - name: h\n    address: 10.0.0.1\n    tags: [web]\n";
const VALID_HOST: &str = "resources:\n  - kind: file\n    path: /etc/x\n    content: x\n";
const VALID_GROUP: &str = "resources:\n  - kind: directory\n    path: /srv\n";

fn desired(name: &Path, input: &[u8]) -> Result<String, String> {
    let role = name.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let blob = |s: &str| Some(Blob::Bytes(s.as_bytes().to_vec()));
    let mut tree = SourceTree {
        tend: blob(VALID_TEND),
        inventory: blob(VALID_INVENTORY),
        ..Default::default()
    };
    tree.hosts
        .insert("h.yaml".into(), Blob::Bytes(VALID_HOST.into()));
    tree.groups
        .insert("web.yaml".into(), Blob::Bytes(VALID_GROUP.into()));
    tree.sources
        .insert("app.conf".into(), Blob::Bytes(b"x".to_vec()));
    let file = if role.starts_with("tend") {
        tree.tend = Some(Blob::Bytes(input.to_vec()));
        "tend.yaml"
    } else if role.starts_with("inventory") {
        tree.inventory = Some(Blob::Bytes(input.to_vec()));
        "inventory.yaml"
    } else if role.starts_with("group") {
        tree.groups
            .insert("web.yaml".into(), Blob::Bytes(input.to_vec()));
        "groups/web.yaml"
    } else {
        tree.hosts
            .insert("h.yaml".into(), Blob::Bytes(input.to_vec()));
        "hosts/h.yaml"
    };
    let v = validate(&tree);
    // YAML's line breaks: LF, CRLF, and a CR alone.
    let lines = input
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c == b'\n' || (c == b'\r' && input.get(i + 1) != Some(&b'\n')))
        .count()
        + 1;
    let mut out = String::new();
    for p in &v.problems {
        // Every problem is at a place in the file it names.
        if p.file == file && (p.pos.line == 0 || p.pos.line as usize > lines) {
            return Err(format!(
                "problem at line {} of a {lines}-line file: {p}",
                p.pos.line
            ));
        }
        out.push_str(&p.to_string());
        out.push('\n');
    }
    if v.problems.is_empty() {
        out = format!("valid: {} hosts", v.state.hosts.len());
    }
    Ok(out)
}

fn token_target(_: &Path, input: &[u8]) -> Result<String, String> {
    match token::parse(input) {
        Err(e) => Ok(format!("error: {e}")),
        Ok(doc) => {
            // What tend writes, it reads back the same.
            let text = token::render(&doc);
            match token::parse(text.as_bytes()) {
                Ok(again) if again == doc => Ok("ok".into()),
                Ok(again) => Err(format!(
                    "render/parse changed the token: {doc:?} -> {again:?}"
                )),
                Err(e) => Err(format!("a rendered token does not parse ({e}):\n{text}")),
            }
        }
    }
}

/// The probe items the probe corpus was made with (paths under
/// /tmp/tend-fuzz-probe, made by `probe_seed`).
fn probe_items() -> Vec<ProbeItem> {
    let d = "/tmp/tend-fuzz-probe";
    vec![
        ProbeItem::path("file:a", format!("{d}/a")),
        ProbeItem::path("directory:d", format!("{d}/d")).with_tree(),
        ProbeItem::path("symlink:l", format!("{d}/l")),
        ProbeItem::path("file:missing", format!("{d}/missing")),
        ProbeItem::user("user:root", "root"),
        ProbeItem::group("group:root", "root"),
        ProbeItem::user("user:nobody-here", "nobody-here"),
    ]
}

fn probe_target(_: &Path, input: &[u8]) -> Result<String, String> {
    Ok(match probe::parse(input, &probe_items()) {
        Ok(a) => format!("ok: {} resources", a.resources.len()),
        Err(e) => format!("error: {e}"),
    })
}

/// Real probe output of this machine for [`probe_items`].
fn probe_seed() -> Vec<u8> {
    let d = Path::new("/tmp/tend-fuzz-probe");
    let _ = fs::remove_dir_all(d);
    fs::create_dir_all(d.join("d/e")).unwrap();
    fs::write(d.join("a"), "hello\n").unwrap();
    fs::write(d.join("d/e/f"), "inner\n").unwrap();
    let _ = std::os::unix::fs::symlink("a", d.join("l"));
    let script = probe::script(&probe_items());
    let out = std::process::Command::new("sh")
        .arg("-s")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .expect("run the probe script locally");
    assert!(
        probe::parse(&out.stdout, &probe_items()).is_ok(),
        "the local probe's own output parses"
    );
    out.stdout
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(corpus_dir(target))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .map(|p| {
                    let b = fs::read(&p).unwrap();
                    (p, b)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn peak_rss_kb() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Figures {
    execs: u64,
    shapes: usize,
    pool: usize,
    saved: usize,
    slowest: Duration,
    failures: Vec<String>,
}

/// Replay the corpus (and `extra` seeds), then fuzz for `secs`.
fn campaign(
    name: &str,
    target: Target,
    extra: Vec<(PathBuf, Vec<u8>)>,
    secs: u64,
    seed: u64,
) -> Figures {
    let save = std::env::var_os("TEND_FUZZ_SAVE").is_some();
    let crashes = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
    let mut rng = Rng(seed | 1);
    let mut seen = HashSet::new();
    let mut pool: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut f = Figures {
        execs: 0,
        shapes: 0,
        pool: 0,
        saved: 0,
        slowest: Duration::ZERO,
        failures: vec![],
    };
    let run = |path: &Path, input: &[u8], f: &mut Figures| -> Option<u64> {
        let rss0 = peak_rss_kb();
        let t0 = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| target(path, input)));
        let took = t0.elapsed();
        let grew = peak_rss_kb().saturating_sub(rss0);
        f.execs += 1;
        f.slowest = f.slowest.max(took);
        let fail = |why: String, f: &mut Figures| {
            fs::create_dir_all(&crashes).unwrap();
            let out = crashes.join(format!("{name}-{}", f.failures.len()));
            fs::write(&out, input).unwrap();
            f.failures.push(format!(
                "{why} (input: {}, from {})",
                out.display(),
                path.display()
            ));
        };
        if took > SLOW {
            fail(format!("took {took:?}"), f);
        }
        if grew > MAX_GROWTH_KB {
            fail(format!("raised the peak RSS by {} MiB", grew / 1024), f);
        }
        match r {
            Err(_) => {
                fail("panicked".into(), f);
                None
            }
            Ok(Err(why)) => {
                fail(why, f);
                None
            }
            Ok(Ok(what)) => Some(shape(&what)),
        }
    };
    for (path, input) in corpus(name).into_iter().chain(extra) {
        if let Some(s) = run(&path, &input, &mut f) {
            seen.insert(s);
        }
        pool.push((path, input));
    }
    let replayed = pool.len();
    let mut pool_bytes: usize = pool.iter().map(|(_, b)| b.len()).sum();
    let deadline = Instant::now() + Duration::from_secs(secs);
    // Panics are counted, not printed, while fuzzing.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    while Instant::now() < deadline && f.failures.len() < 20 {
        let pick = rng.below(pool.len());
        let input = mutate(&mut rng, &pool[pick].1, &pool);
        let base_path = pool[pick].0.clone();
        if let Some(s) = run(&base_path, &input, &mut f)
            && seen.insert(s)
        {
            if save {
                let stem = base_path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("x");
                let role = stem.split('-').next().unwrap_or("x");
                let out = corpus_dir(name).join(format!("{role}-found-{:016x}", s));
                fs::create_dir_all(corpus_dir(name)).unwrap();
                fs::write(out, &input).unwrap();
                f.saved += 1;
            }
            // The pool is bounded: at most 2,000 inputs, POOL_BYTES in all.
            if pool.len() < 2000 && pool_bytes + input.len() <= POOL_BYTES {
                pool_bytes += input.len();
                pool.push((base_path, input));
            }
        }
    }
    std::panic::set_hook(hook);
    f.shapes = seen.len();
    f.pool = pool.len();
    println!(
        "fuzz {name}: seed {seed}, {replayed} corpus inputs replayed, {} execs in {secs} s, {} behaviours, pool {}, {} saved, slowest {:?}, failures {}, peak RSS {} MiB",
        f.execs,
        f.shapes,
        f.pool,
        f.saved,
        f.slowest,
        f.failures.len(),
        peak_rss_kb() / 1024
    );
    f
}

/// The targets take turns: the memory bound is measured on the process.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn settings() -> (u64, u64) {
    let secs = std::env::var("TEND_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed = std::env::var("TEND_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    (secs, seed)
}

fn assert_clean(name: &str, f: &Figures) {
    assert!(
        f.failures.is_empty(),
        "fuzz {name}: {} failure(s):\n{}",
        f.failures.len(),
        f.failures.join("\n")
    );
}

#[test]
fn fuzz_the_desired_state_loader_and_validator() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (secs, seed) = settings();
    let extra = [
        ("tend-valid", VALID_TEND),
        ("inventory-valid", VALID_INVENTORY),
        ("host-valid", VALID_HOST),
        ("group-valid", VALID_GROUP),
    ]
    .into_iter()
    .map(|(n, t)| (PathBuf::from(n), t.as_bytes().to_vec()))
    .collect();
    let f = campaign("desired", desired, extra, secs, seed);
    assert_clean("desired", &f);
}

#[test]
fn fuzz_the_token_parser() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (secs, seed) = settings();
    let extra = vec![(
        PathBuf::from("token-single"),
        token::render(&token::TokenDoc::single(
            "a".repeat(64),
            vec!["h1".to_string(), "h2".to_string()],
            "2026-12-07T12:00:00Z".into(),
            "fuzz seed".into(),
            Some("ops".into()),
        ))
        .into_bytes(),
    )];
    let f = campaign("token", token_target, extra, secs, seed.wrapping_add(1));
    assert_clean("token", &f);
}

#[test]
fn fuzz_the_probe_output_parser() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (secs, seed) = settings();
    let extra = vec![(PathBuf::from("probe-local"), probe_seed())];
    let f = campaign("probe", probe_target, extra, secs, seed.wrapping_add(2));
    assert_clean("probe", &f);
}
