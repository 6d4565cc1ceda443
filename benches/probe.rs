//! Probe benchmark against the real SSH fleet (tests/fleet/fleet.sh): 5 and 50
//! hosts with 30 resources each, cold (new SSH sessions) and warm (sessions
//! kept from the cold pass). Prints wall time, CPU time, peak RSS and remote
//! commands per host. Not a test: nothing is asserted.
//!
//!     sudo cargo bench --bench probe            # needs root: it starts the fleet
//!     TEND_BENCH_SIZES=5,50,100 cargo bench --bench probe
//!
//! Then one host with many managed files (all present, so each is hashed):
//! 1,000 and 10,000 by default, on the fleet's last host (h79), or as
//! `TEND_BENCH_FILES=1000,10000 TEND_BENCH_FILES_HOST=h64`; prints the
//! probe's wall time (one warm probe, the session already open).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tend::core::model::{self, Blob, SourceTree};
use tend::reconcile::{self, ProbeOpts};

const RESOURCES: usize = 30;

fn main() {
    let sizes: Vec<usize> = std::env::var("TEND_BENCH_SIZES")
        .unwrap_or_else(|_| "5,50".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("TEND_BENCH_SIZES: numbers"))
        .collect();
    // Empty: only the many-files figure, on a fleet that is already up.
    let max = sizes.iter().copied().max().unwrap_or(0);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fleet_dir = PathBuf::from(
        std::env::var("TEND_FLEET_DIR").unwrap_or_else(|_| "/var/tmp/tend-fleet".into()),
    );
    if max > 0 {
        let up = Command::new("bash")
            .arg(repo.join("tests/fleet/fleet.sh"))
            .args(["up", &max.to_string()])
            .env("TEND_FLEET_DIR", &fleet_dir)
            .stdin(Stdio::null())
            .status()
            .expect("run fleet.sh");
        assert!(up.success(), "fleet.sh up {max} failed");
    }
    let tsv = fs::read_to_string(fleet_dir.join("hosts.tsv")).unwrap();
    let hosts: Vec<Vec<String>> = tsv
        .lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();

    // Half of each host's resources exist, so the probe hashes real content.
    for h in &hosts[..max] {
        let seed = "mkdir -p /srv/bench && for i in $(seq 0 14); do printf 'content %s\\n' $i > /srv/bench/f$i; done";
        let ok = Command::new("ssh")
            .arg("-F")
            .arg(fleet_dir.join("ssh_config"))
            .args(["-o", "BatchMode=yes", &h[0], seed])
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "seeding {}", h[0]);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "tend probe benchmark: {RESOURCES} resources per host, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:>6} {:>6} {:>10} {:>10} {:>10} {:>12}",
        "hosts", "pass", "wall", "cpu", "peak_rss", "cmds/host"
    );
    for &n in &sizes {
        let tree = tree(&hosts[..n], &fleet_dir);
        let validated = model::validate(&tree);
        assert!(validated.is_valid(), "{:?}", validated.problems);
        let state = validated.state;
        let targets: Vec<String> = state.hosts.keys().cloned().collect();
        let mut opts = ProbeOpts::new(&state.config, std::path::Path::new("/"));
        opts.concurrency = n.max(1);
        let (transports, failed) = reconcile::connect_all(&state, &targets, &opts);
        assert!(failed.is_empty());
        for pass in ["cold", "warm", "noop"] {
            if pass == "noop" {
                // The floor: one `true` per host over the same warm sessions.
                let t0 = Instant::now();
                rt.block_on(async {
                    let mut set = tokio::task::JoinSet::new();
                    for t in transports.values() {
                        let t = t.clone();
                        set.spawn_blocking(move || t.exec("true", &[], Duration::from_secs(30)));
                    }
                    while let Some(r) = set.join_next().await {
                        r.unwrap().expect("noop exec");
                    }
                });
                println!(
                    "{:>6} {:>6} {:>8.0}ms   (one `true` per host: the transport's floor)",
                    n,
                    pass,
                    t0.elapsed().as_secs_f64() * 1000.0
                );
                continue;
            }
            let cmds_before = count_commands(&hosts[..n]);
            let cpu0 = cpu_time();
            let t0 = Instant::now();
            let probes = rt.block_on(reconcile::probe_all(&state, &transports, &opts));
            let wall = t0.elapsed();
            let cpu = cpu_time() - cpu0;
            let bad: Vec<_> = probes.iter().filter(|(_, p)| p.result.is_err()).collect();
            assert!(bad.is_empty(), "probe failures: {bad:?}");
            // sshd writes its log line as the session starts; give it a moment.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut cmds = count_commands(&hosts[..n]) - cmds_before;
            while cmds < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                cmds = count_commands(&hosts[..n]) - cmds_before;
            }
            println!(
                "{:>6} {:>6} {:>8.0}ms {:>8.0}ms {:>8}MiB {:>12.2}",
                n,
                pass,
                wall.as_secs_f64() * 1000.0,
                cpu.as_secs_f64() * 1000.0,
                peak_rss_kib() / 1024,
                cmds as f64 / n as f64
            );
        }
    }
    let host = match std::env::var("TEND_BENCH_FILES_HOST") {
        Ok(name) => hosts
            .iter()
            .find(|h| h[0] == name)
            .expect("no such fleet host"),
        Err(_) => hosts.last().expect("the fleet has hosts"),
    };
    many_files(&rt, host, &fleet_dir);
}

/// One host with `n` existing, managed files: the probe's wall time.
fn many_files(rt: &tokio::runtime::Runtime, host: &[String], fleet_dir: &std::path::Path) {
    let counts: Vec<usize> = std::env::var("TEND_BENCH_FILES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("TEND_BENCH_FILES: numbers"))
        .collect();
    println!("one host, N managed files (all present):");
    println!("{:>8} {:>10}", "files", "probe");
    for n in counts {
        let seed = format!(
            "rm -rf /srv/many && mkdir -p /srv/many && cd /srv/many && \
             i=0; while [ $i -lt {n} ]; do echo $i > f$i; i=$((i+1)); done"
        );
        let ok = Command::new("ssh")
            .arg("-F")
            .arg(fleet_dir.join("ssh_config"))
            .args(["-o", "BatchMode=yes", &host[0], &seed])
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "seeding {}", host[0]);
        let mut tree = tree(std::slice::from_ref(&host.to_vec()), fleet_dir);
        let mut body = String::from("resources:\n");
        for i in 0..n {
            body.push_str(&format!(
                "  - kind: file\n    path: /srv/many/f{i}\n    content: \"{i}\\n\"\n"
            ));
        }
        tree.tend = Some(Blob::Bytes(b"probe_timeout: 120s\n".to_vec()));
        tree.hosts = BTreeMap::from([(format!("{}.yaml", host[0]), Blob::Bytes(body.into()))]);
        let validated = model::validate(&tree);
        assert!(validated.is_valid(), "{:?}", validated.problems);
        let state = validated.state;
        let targets: Vec<String> = state.hosts.keys().cloned().collect();
        let opts = ProbeOpts::new(&state.config, std::path::Path::new("/"));
        let (transports, failed) = reconcile::connect_all(&state, &targets, &opts);
        assert!(failed.is_empty());
        // Open the session first: the figure is the probe, not the handshake.
        for t in transports.values() {
            t.exec("true", &[], Duration::from_secs(30))
                .expect("warm up");
        }
        let t0 = Instant::now();
        let probes = rt.block_on(reconcile::probe_all(&state, &transports, &opts));
        let wall = t0.elapsed();
        let bad: Vec<_> = probes.iter().filter(|(_, p)| p.result.is_err()).collect();
        assert!(bad.is_empty(), "probe failures: {bad:?}");
        println!("{:>8} {:>8.0}ms", n, wall.as_secs_f64() * 1000.0);
    }
}

fn tree(hosts: &[Vec<String>], fleet_dir: &std::path::Path) -> SourceTree {
    let mut inv = String::from("hosts:\n");
    let mut host_files = BTreeMap::new();
    for h in hosts {
        inv.push_str(&format!(
            "  - name: {}\n    address: {}\n    identity: {}\n    host_key: \"{}\"\n",
            h[0],
            h[1],
            fleet_dir.join("id_ed25519").display(),
            h[2]
        ));
        let mut body = String::from("resources:\n  - kind: directory\n    path: /srv/bench\n");
        for i in 0..RESOURCES - 1 {
            body.push_str(&format!(
                "  - kind: file\n    path: /srv/bench/f{i}\n    content: \"content {i}\\n\"\n"
            ));
        }
        host_files.insert(format!("{}.yaml", h[0]), Blob::Bytes(body.into_bytes()));
    }
    SourceTree {
        tend: Some(Blob::Bytes(b"probe_timeout: 30s\n".to_vec())),
        inventory: Some(Blob::Bytes(inv.into_bytes())),
        hosts: host_files,
        groups: BTreeMap::new(),
        sources: BTreeMap::new(),
    }
}

fn count_commands(hosts: &[Vec<String>]) -> usize {
    hosts
        .iter()
        .map(|h| {
            fs::read_to_string(&h[4])
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("Starting session: command"))
                .count()
        })
        .sum()
}

fn rusage() -> libc::rusage {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid start.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    }
}

fn cpu_time() -> Duration {
    let u = rusage();
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn peak_rss_kib() -> u64 {
    rusage().ru_maxrss as u64
}
