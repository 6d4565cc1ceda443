//! Validate and plan benchmark: one host with 10k and 100k resources (a
//! generated host file of directories, files inside them, symlinks, users,
//! groups, packages, services restarting on files, and guarded commands, with
//! `requires` between them), validated from bytes in memory and then planned
//! against an empty host (every resource absent). Prints the time of each
//! stage. Not a test: nothing is asserted.
//!
//!     cargo bench --bench validate
//!     TEND_BENCH_SIZES=1000,10000,100000,200000 cargo bench --bench validate

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use tend::core::actual::{HostActual, Observed, ServiceState};
use tend::core::model::{self, Blob, SourceTree};
use tend::core::spec::ResourceSpec;
use tend::core::{diff, plan};

fn main() {
    let sizes: Vec<usize> = std::env::var("TEND_BENCH_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("TEND_BENCH_SIZES: numbers"))
        .collect();
    println!(
        "{:>9} {:>10} {:>12} {:>10} {:>10} {:>10} {:>8}",
        "resources", "yaml MiB", "validate s", "diff s", "plan s", "total s", "steps"
    );
    for n in sizes {
        let text = host_file(n);
        let tree = SourceTree {
            inventory: Some(Blob::Bytes(
                b"hosts:\n  - name: big\n    transport: local\n".to_vec(),
            )),
            hosts: BTreeMap::from([("big.yaml".to_string(), Blob::Bytes(text.clone().into()))]),
            ..SourceTree::default()
        };
        let t0 = Instant::now();
        let validated = model::validate(&tree);
        let t_validate = t0.elapsed();
        assert!(
            validated.is_valid(),
            "generated state must be valid: {:?}",
            &validated.problems[..validated.problems.len().min(5)]
        );
        let host = &validated.state.hosts["big"];
        let actual = empty_actual(host);
        let t1 = Instant::now();
        let changes = diff::diff_host(host, &actual);
        let t_diff = t1.elapsed();
        let t2 = Instant::now();
        let hp = plan::plan_host(host, &changes);
        let p = plan::Plan::new("bench", vec![hp]);
        let t_plan = t2.elapsed();
        println!(
            "{:>9} {:>10.1} {:>12.2} {:>10.2} {:>10.2} {:>10.2} {:>8}",
            n,
            text.len() as f64 / (1024.0 * 1024.0),
            t_validate.as_secs_f64(),
            t_diff.as_secs_f64(),
            t_plan.as_secs_f64(),
            (t_validate + t_diff + t_plan).as_secs_f64(),
            p.hosts[0].steps.len()
        );
    }
}

/// A host file of `n` resources, one flow mapping per line so that 100k
/// stay under the 8 MiB file limit. One directory holds 100 entries; every
/// tenth file requires the file before it; in each directory there is a
/// group, a user in it owning the files, a package, its service restarting
/// on a file, a guarded command and a symlink.
fn host_file(n: usize) -> String {
    let mut s = String::with_capacity(n * 64);
    s.push_str("resources:\n");
    let mut dir = String::new();
    for i in 0..n {
        let k = i % 100;
        let _ = match k {
            0 => {
                dir = format!("/srv/d{}", i / 100);
                writeln!(s, "- {{kind: directory, path: {dir}, mode: \"0755\"}}")
            }
            1 => writeln!(s, "- {{kind: group, name: g{i}}}"),
            2 => writeln!(s, "- {{kind: user, name: u{i}, groups: [g{}]}}", i - 1),
            3 => writeln!(s, "- {{kind: package, name: p{i}}}"),
            4 => writeln!(
                s,
                "- {{kind: service, name: p{}, restart_on: [\"file:{dir}/f{}\"]}}",
                i - 1,
                i + 1
            ),
            6 => writeln!(
                s,
                "- {{kind: command, name: c{i}, run: \"true\", creates: {dir}/done{i}}}"
            ),
            7 => writeln!(
                s,
                "- {{kind: symlink, path: {dir}/l{i}, target: {dir}/f{}}}",
                i - 2
            ),
            k if k % 10 == 9 => writeln!(
                s,
                "- {{kind: file, path: {dir}/f{i}, content: x, owner: u{}, requires: [\"file:{dir}/f{}\"]}}",
                i - k + 2,
                i - 1
            ),
            k => writeln!(
                s,
                "- {{kind: file, path: {dir}/f{i}, content: x, owner: u{}}}",
                i - k + 2
            ),
        };
    }
    s
}

/// Nothing of the host exists yet: every resource is absent, every service
/// is a unit that does not load yet (its package comes in the same run).
fn empty_actual(host: &model::Host) -> HostActual {
    let mut a = HostActual::default();
    for r in &host.resources {
        let o = match &r.spec {
            ResourceSpec::Service(s) => Observed::Service(ServiceState {
                unit: model::unit_name(&s.name),
                load_state: "not-found".into(),
                active_state: "inactive".into(),
                unit_file_state: String::new(),
            }),
            ResourceSpec::Command(_) => {
                Observed::Guard(tend::core::actual::GuardState::new(Some(false), None))
            }
            _ => Observed::Absent,
        };
        a.resources.insert(r.id.clone(), o);
    }
    a
}
