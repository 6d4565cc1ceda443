//! Controller latency benchmark against the real SSH fleet: the time from a
//! write to the desired state to every one of 5 hosts' status saying
//! `Running` at the new revision, minus the quiet window (which is a
//! deliberate wait, not work). Runs the release-built `tend run` as an
//! operator would. Not a test: nothing is asserted.
//!
//!     sudo cargo bench --bench controller     # needs root: it starts the fleet
//!     TEND_BENCH_ROUNDS=50 cargo bench --bench controller

#[path = "../tests/support/fleet.rs"]
mod support;

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, Desired, fleet};

const HOSTS: [&str; 5] = ["h25", "h26", "h27", "h28", "h29"];
const QUIET: Duration = Duration::from_millis(100);

fn status(d: &Desired, host: &str) -> Value {
    fs::read(d.state().join("status").join(format!("{host}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Every host Running at one revision other than `old`: that revision.
fn all_running(d: &Desired, old: &str) -> Option<String> {
    let mut rev = None;
    for h in HOSTS {
        let s = status(d, h);
        let r = s["desired_revision"].as_str()?;
        if s["phase"] != "Running" || s["converged_revision"] != r || r == old {
            return None;
        }
        if rev.get_or_insert_with(|| r.to_string()) != r {
            return None;
        }
    }
    rev
}

fn body(round: usize) -> String {
    format!(
        "resources:\n  - kind: directory\n    path: /srv/bench-ctl\n  - kind: file\n    path: /srv/bench-ctl/conf\n    content: \"round {round}\\n\"\n"
    )
}

fn main() {
    let rounds: usize = std::env::var("TEND_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let f = fleet();
    let mut inventory = String::from("hosts:\n");
    for h in HOSTS {
        inventory.push_str(&f.inventory_entry(h));
    }
    let tend_yaml = format!(
        "dispatch: enforced\nquiet_window: {}ms\nmax_defer: 1s\nresync: 10m\n",
        QUIET.as_millis()
    );
    let hosts: Vec<(&str, String)> = HOSTS.iter().map(|h| (*h, body(0))).collect();
    let refs: Vec<(&str, &str)> = hosts.iter().map(|(h, b)| (*h, b.as_str())).collect();
    let d = Desired::new(&tend_yaml, &inventory, &refs);
    let daemon = Daemon::start(&d);

    let wait = |old: &str| -> (String, Instant) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(rev) = all_running(&d, old) {
                return (rev, Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "hosts did not converge; log:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let (mut rev, _) = wait("");
    let mut samples = Vec::new();
    for round in 1..=rounds {
        let t0 = Instant::now();
        for h in HOSTS {
            fs::write(d.dir().join("hosts").join(format!("{h}.yaml")), body(round)).unwrap();
        }
        let (new, t1) = wait(&rev);
        rev = new;
        samples.push((t1 - t0).saturating_sub(QUIET));
    }
    drop(daemon);

    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "controller latency, file write -> 5 hosts Running at the new revision, minus quiet_window ({} ms), {} rounds:",
        QUIET.as_millis(),
        samples.len()
    );
    println!(
        "  min {:.0} ms   median {:.0} ms   p90 {:.0} ms   max {:.0} ms   (target < 300 ms)",
        ms(samples[0]),
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(*samples.last().unwrap())
    );
}
