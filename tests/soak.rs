//! The soak campaign (RELIABILITY.md): `tend run` over four hosts of the
//! second fleet for `TEND_SOAK_SECS` (180 by default, which CI runs; the
//! full campaign is 1800), with h4 flapping (its sshd stopped and started
//! every 20 s), a commit every minute and `resync: 10s`. The controller's
//! RSS, open descriptors, threads and tend.db size are sampled every
//! minute and printed with their slopes after the first minute; they must
//! stay flat (bounds below), and every host, h4 included once it stays up,
//! converges to the last commit.
//!
//! The second fleet is brought up fresh and taken down at the end; test
//! binaries run one at a time, so it is this binary's alone meanwhile.

#[path = "support/fleet.rs"]
mod support;

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, Desired, Fault, Fleet, scale_fleet};

/// Growth allowed after the first minute, for a run of any length: a leak
/// of one descriptor or a few KiB per pass shows within minutes.
const RSS_GROWTH_KB: u64 = 12 * 1024;
const FD_GROWTH: i64 = 4;

fn proc_field(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Sample {
    at: u64,
    rss_kb: u64,
    fds: usize,
    threads: usize,
    db_bytes: u64,
}

fn sample(pid: u32, d: &Desired, at: u64) -> Sample {
    let count = |p: String| fs::read_dir(p).map(|r| r.count()).unwrap_or(0);
    let size = |name: &str| {
        fs::metadata(d.state().join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    Sample {
        at,
        rss_kb: proc_field(pid, "VmRSS:"),
        fds: count(format!("/proc/{pid}/fd")),
        threads: count(format!("/proc/{pid}/task")),
        db_bytes: size("tend.db") + size("tend.db-wal"),
    }
}

/// Least-squares slope of `y` over `x`, per hour.
fn slope_per_hour(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let (mx, my) = (sx / n, sy / n);
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den * 3600.0 }
}

fn body(host: &str, round: u32) -> String {
    let mut s = String::from("resources:\n  - kind: directory\n    path: /srv/soak\n");
    for i in 0..5 {
        s.push_str(&format!(
            "  - kind: file\n    path: /srv/soak/f{i}.conf\n    content: \"{host} file {i} round {round}\\n\"\n"
        ));
    }
    s
}

fn status(d: &Desired, host: &str) -> Value {
    fs::read(d.state().join("status").join(format!("{host}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn converged_at(d: &Desired, host: &str, rev: &str) -> bool {
    let s = status(d, host);
    s["desired_revision"] == rev && s["converged_revision"] == rev
}

#[test]
fn soak_a_flapping_host_under_commits_keeps_the_controller_flat() {
    let secs: u64 = std::env::var("TEND_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let f: Fleet = scale_fleet(4);
    let hosts = ["h1", "h2", "h3", "h4"];
    let inventory = f.inventory(&hosts);
    let files: Vec<(String, String)> = hosts.iter().map(|h| (h.to_string(), body(h, 0))).collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(h, b)| (h.as_str(), b.as_str()))
        .collect();
    let d = Desired::new(
        "dispatch: enforced\nprobe_timeout: 5s\nretries: 1\nretry_backoff: 200ms\nresync: 10s\nquiet_window: 200ms\nmax_defer: 1s\n",
        &inventory,
        &refs,
    );
    d.init_git();
    let head = support::git(d.dir(), &["rev-parse", "HEAD"]);
    let daemon = Daemon::start(&d);
    let pid = daemon.pid();
    let wait_all = |rev: &str, limit: Duration, what: &str| {
        let deadline = Instant::now() + limit;
        while !hosts.iter().all(|h| converged_at(&d, h, rev)) {
            assert!(
                Instant::now() < deadline,
                "{what}: not every host converged to {rev}: {:?}\nlog tail:\n{}",
                hosts
                    .iter()
                    .map(|h| (h, status(&d, h)["phase"].clone()))
                    .collect::<Vec<_>>(),
                daemon
                    .log()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_all(&head, Duration::from_secs(120), "first converge");
    // Every host's file for `round`, committed; the new HEAD.
    let commit_round = |round: u32, msg: &str| {
        for h in hosts {
            fs::write(
                d.dir().join("hosts").join(format!("{h}.yaml")),
                body(h, round),
            )
            .unwrap();
        }
        d.commit(msg)
    };

    let start = Instant::now();
    let mut samples = vec![sample(pid, &d, 0)];
    let (mut commits, mut flaps, mut round) = (0u32, 0u32, 0u32);
    let mut down: Option<Fault<'_>> = None;
    let mut next_flap = Duration::from_secs(20);
    let mut next_commit = Duration::from_secs(60);
    let mut next_sample = Duration::from_secs(60);
    while start.elapsed() < Duration::from_secs(secs) {
        let t = start.elapsed();
        if t >= next_flap {
            down = match down.take() {
                None => Some(f.stopped("h4")),
                Some(fault) => {
                    drop(fault);
                    None
                }
            };
            flaps += 1;
            next_flap += Duration::from_secs(20);
        }
        if t >= next_commit {
            round += 1;
            commit_round(round, &format!("round {round}"));
            commits += 1;
            next_commit += Duration::from_secs(60);
        }
        if t >= next_sample {
            samples.push(sample(pid, &d, t.as_secs()));
            next_sample += Duration::from_secs(60);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(down);
    // No host stays stuck: with h4 up for good, a last commit (which also
    // lifts a crash-loop `Degraded`, retried only every 5 minutes
    // otherwise) reaches every host.
    round += 1;
    let head = commit_round(round, "after the soak");
    wait_all(&head, Duration::from_secs(120), "after the soak");
    samples.push(sample(pid, &d, start.elapsed().as_secs()));

    println!(
        "soak: {secs} s, {commits} commits, {flaps} flaps of h4, {} samples",
        samples.len()
    );
    println!("  t(s)  RSS(MiB)  fds  threads  tend.db(KiB)");
    for s in &samples {
        println!(
            "  {:>4}  {:>8.1}  {:>3}  {:>7}  {:>12}",
            s.at,
            s.rss_kb as f64 / 1024.0,
            s.fds,
            s.threads,
            s.db_bytes / 1024
        );
    }
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= 60).collect();
    let pts = |f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        after.iter().map(|s| (s.at as f64, f(s))).collect()
    };
    println!(
        "  slopes after the first minute: RSS {:+.1} MiB/h, fds {:+.1}/h, threads {:+.1}/h, tend.db {:+.0} KiB/h",
        slope_per_hour(&pts(&|s| s.rss_kb as f64 / 1024.0)),
        slope_per_hour(&pts(&|s| s.fds as f64)),
        slope_per_hour(&pts(&|s| s.threads as f64)),
        slope_per_hour(&pts(&|s| s.db_bytes as f64 / 1024.0)),
    );
    let first = after.first().expect("a sample after the first minute");
    let last = samples.last().unwrap();
    assert!(
        last.rss_kb <= first.rss_kb + RSS_GROWTH_KB,
        "RSS grew from {} to {} KiB after the first minute",
        first.rss_kb,
        last.rss_kb
    );
    assert!(
        last.fds as i64 <= first.fds as i64 + FD_GROWTH,
        "descriptors grew from {} to {}",
        first.fds,
        last.fds
    );
    assert!(commits >= 2 && flaps >= 6, "the soak ran its course");
    drop(daemon);
    f.down();
}
