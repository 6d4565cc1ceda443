//! The real SSH test fleet (tests/fleet/fleet.sh), seen from a test: bring it
//! up once, run commands on hosts with the system `ssh`, count sessions in
//! sshd's VERBOSE log, and inject faults (stop, freeze) that are undone when
//! the guard drops. [`systemd_fleet`] brings up the systemd-nspawn hosts
//! (s1..sN, real systemd) the same way; its hosts' `log` is the container's
//! console log, and faults are for the chroot hosts only.
//!
//! Tests that need the fleet run in CI: there is no flag that skips them. The
//! fleet needs root; without it, these tests fail with a clear message.

#![allow(dead_code)] // each test binary uses a different part of this file

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Hosts the fleet provides to the tests: h1..h11 for paths and transport
/// failures, h12..h16 for users, groups, packages and commands, h17..h24 for
/// the controller (and h35, h36), h25..h29 for the controller bench, h30..h34
/// for the five-host no-op converge, h37 and h38 for drift triage
/// (tests/drift.rs), h39 for connection guards (tests/guard.rs), h40..h47 for the safety campaign,
/// h48..h53 for the state dir's trust rules, h54..h61 for the controller's
/// hardening, h62..h69 for step builders and large probes, h70..h75, h78
/// and h79 for dispatch records, retries and large applies, h76 and h77 for
/// the HTTP endpoints (tests/listen.rs), h80..h90 for approvals
/// (h80..h87: fleet-scale confirmation under the controller). No more:
/// h91 would listen on 127.0.0.101, the first systemd host's address.
pub const HOSTS: usize = 90;

/// Systemd hosts the fleet provides to the tests: s1..s4 and s17 for the
/// service tests (one host per test), s5..s9 for every kind on five hosts, s10..s11 for the campaign,
/// s12..s13 for idempotent service steps and owed restarts, s14 for
/// approvals, s15..s16 for connection guards (tests/guard.rs, with h39),
/// s18 for logins with sudo (tests/access.rs).
pub const SYSTEMD_HOSTS: usize = 18;

#[derive(Clone, Debug)]
pub struct FleetHost {
    pub name: String,
    pub address: String,
    pub fingerprint: String,
    pub log: PathBuf,
    /// The host's sshd pid file, and its root file system as this machine
    /// sees it (chroot hosts; empty for the others).
    pub pid_file: PathBuf,
    pub root: PathBuf,
}

pub struct Fleet {
    /// The fleet dir (`TEND_FLEET_DIR`).
    pub dir: PathBuf,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    pub ssh_config: PathBuf,
    pub hosts: BTreeMap<String, FleetHost>,
    /// The network namespace its hosts live in ([`private_fleet`]).
    pub netns: Option<String>,
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fleet_dir() -> PathBuf {
    PathBuf::from(std::env::var("TEND_FLEET_DIR").unwrap_or_else(|_| "/var/tmp/tend-fleet".into()))
}

/// Run `fleet.sh CMD N` once per test process (idempotent across processes:
/// the script keeps running hosts, and a file lock serializes the tests'
/// calls), then read the hosts from `files/hosts.tsv`. `n` gets the fleet
/// dir, under the lock.
fn bring_up(cmd: &str, n: impl FnOnce(&Path) -> usize, files: &Path) -> Fleet {
    let dir = fleet_dir();
    fs::create_dir_all(&dir).expect("create fleet dir");
    let lock = File::create(dir.join(".test-lock")).expect("fleet lock");
    lock.lock().expect("lock fleet");
    let args = [cmd.to_string(), n(&dir).to_string()];
    let out = Command::new("bash")
        .arg(repo().join("tests/fleet/fleet.sh"))
        .args(&args)
        .env("TEND_FLEET_DIR", &dir)
        // A deadline, not a sleep: generous, because the machine may be busy
        // compiling and running other suites while 80 hosts start.
        .env(
            "TEND_FLEET_WAIT",
            std::env::var("TEND_FLEET_WAIT").unwrap_or_else(|_| "180".into()),
        )
        .stdin(Stdio::null())
        .output()
        .expect("run tests/fleet/fleet.sh");
    assert!(
        out.status.success(),
        "tests/fleet/fleet.sh {} failed (it needs root and the packages of .ci/run):\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    if cmd == "up" {
        // Each test binary starts with no revision recorded on the hosts
        // (tests make fresh git repos; SPEC 8.1 would fence them off).
        let out = Command::new("bash")
            .arg(repo().join("tests/fleet/fleet.sh"))
            .arg("forget-revisions")
            .env("TEND_FLEET_DIR", &dir)
            .stdin(Stdio::null())
            .output()
            .expect("run tests/fleet/fleet.sh forget-revisions");
        assert!(out.status.success(), "fleet.sh forget-revisions failed");
    }
    drop(lock);
    let files = dir.join(files);
    let hosts = read_hosts(&files.join("hosts.tsv"));
    Fleet {
        key: dir.join("id_ed25519"),
        known_hosts: files.join("known_hosts"),
        ssh_config: files.join("ssh_config"),
        hosts,
        dir,
        netns: None,
    }
}

/// The hosts of a fleet's `hosts.tsv` (name, address, fingerprint, _, log).
fn read_hosts(tsv: &Path) -> BTreeMap<String, FleetHost> {
    let text = fs::read_to_string(tsv).expect("hosts.tsv");
    let mut hosts = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        hosts.insert(
            f[0].to_string(),
            FleetHost {
                name: f[0].into(),
                address: f[1].into(),
                fingerprint: f[2].into(),
                log: PathBuf::from(f[4]),
                pid_file: f.get(3).map(PathBuf::from).unwrap_or_default(),
                root: f.get(5).map(PathBuf::from).unwrap_or_default(),
            },
        );
    }
    hosts
}

/// The fleet, started on first use (idempotent across test processes: the
/// script keeps running hosts, and a file lock serializes `up`).
pub fn fleet() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| {
        // Never ask for fewer hosts than run (another test binary, a
        // benchmark): `up` keeps them anyway, and asking for them keeps the
        // answer the same whoever came first.
        bring_up("up", |dir| HOSTS.max(highest_running(dir)), Path::new(""))
    })
}

/// The systemd hosts s1..sN (`fleet.sh up-systemd`), booted on first use:
/// real systemd as PID 1, each with a disabled, stopped `tend-demo.service`.
pub fn systemd_fleet() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| {
        let f = bring_up("up-systemd", |_| SYSTEMD_HOSTS, Path::new("systemd"));
        // As for the chroot hosts: no revision recorded (SPEC 8.1).
        for h in f.hosts.keys() {
            f.ssh(h, "rm -f /run/tend/revision");
        }
        f
    })
}

/// The highest host index that `fleet.sh status` does not report `down`.
fn highest_running(dir: &Path) -> usize {
    let out = Command::new("bash")
        .arg(repo().join("tests/fleet/fleet.sh"))
        .arg("status")
        .env("TEND_FLEET_DIR", dir)
        .stdin(Stdio::null())
        .output()
        .expect("run tests/fleet/fleet.sh status");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let i = f.first()?.strip_prefix('h')?.parse::<usize>().ok()?;
            (f.get(2).is_some_and(|s| *s != "down")).then_some(i)
        })
        .max()
        .unwrap_or(0)
}

impl Fleet {
    pub fn host(&self, name: &str) -> &FleetHost {
        &self.hosts[name]
    }

    /// Where the ssh master of a host of this fleet listens. `%C` hashes
    /// this machine's name and the host's address, port and user, which are
    /// the same in every fleet dir (fleets in network namespaces of their
    /// own); the fleet dir's hash keeps two such fleets from sharing a
    /// master, and so from running one fleet's checks on the other's host.
    /// Short enough for a socket path.
    fn control_path(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.dir.hash(&mut h);
        format!("/tmp/tend-test-cm-{:016x}-%C", h.finish())
    }

    /// Run a shell script on a host with the system ssh client.
    pub fn ssh(&self, host: &str, script: &str) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg("30");
        if let Some(ns) = &self.netns {
            cmd.args(["ip", "netns", "exec", ns]);
        }
        cmd.args(["ssh", "-F"])
            .arg(&self.ssh_config)
            // One multiplexed connection per host for the tests' own checks:
            // a new SSH handshake per check costs more than the check. The
            // master lingers 60 s and never counts as a command of tend's.
            .args(["-o", "BatchMode=yes", "-o", "ControlMaster=auto", "-o"])
            .arg(format!("ControlPath={}", self.control_path()))
            .args(["-o", "ControlPersist=60", host, "sh", "-c"])
            .arg(shell_quote(script))
            .stdin(Stdio::null())
            .output()
            .expect("run ssh")
    }

    /// Run a script that must succeed; its stdout.
    pub fn sh(&self, host: &str, script: &str) -> String {
        let out = self.ssh(host, script);
        assert!(
            out.status.success(),
            "on {host}: `{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Remote commands started on a host so far (sshd VERBOSE logs one line
    /// per session command).
    pub fn commands_started(&self, host: &str) -> usize {
        let log = fs::read_to_string(&self.host(host).log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("Starting session: command"))
            .count()
    }

    /// Connections sshd accepted so far.
    pub fn connections(&self, host: &str) -> usize {
        let log = fs::read_to_string(&self.host(host).log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("Connection from"))
            .count()
    }

    fn script(&self, args: &[&str]) {
        let mut cmd = Command::new("bash");
        if let Some(ns) = &self.netns {
            cmd.env("TEND_FLEET_NETNS", ns)
                .env("TEND_FLEET_NET", PRIVATE_NET)
                .env("TEND_FLEET_WAIT", "180");
        }
        let out = cmd
            .arg(repo().join("tests/fleet/fleet.sh"))
            .args(args)
            .env("TEND_FLEET_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run fleet.sh");
        assert!(
            out.status.success(),
            "fleet.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn index(host: &str) -> String {
        host.trim_start_matches('h').to_string()
    }

    /// Stop a host's sshd until the guard drops: connections are refused.
    pub fn stopped(&self, host: &str) -> Fault<'_> {
        self.script(&["stop", &Self::index(host)]);
        Fault {
            fleet: self,
            undo: "start",
            host: host.to_string(),
        }
    }

    /// Freeze a host's sshd until the guard drops: TCP connects, no banner.
    pub fn frozen(&self, host: &str) -> Fault<'_> {
        self.script(&["freeze", &Self::index(host)]);
        Fault {
            fleet: self,
            undo: "thaw",
            host: host.to_string(),
        }
    }

    /// `inventory.yaml` for these hosts, each pinned to its real host key.
    pub fn inventory(&self, hosts: &[&str]) -> String {
        let mut s = String::from("hosts:\n");
        for h in hosts {
            s.push_str(&self.inventory_entry(h));
        }
        s
    }

    /// An inventory entry for a host, pinned to its real host key.
    pub fn inventory_entry(&self, host: &str) -> String {
        let h = self.host(host);
        format!(
            "  - name: {}\n    address: {}\n    identity: {}\n    host_key: \"{}\"\n",
            h.name,
            h.address,
            self.key.display(),
            h.fingerprint
        )
    }
}

/// Undoes a fault when dropped, so a failing test never leaves a host broken.
pub struct Fault<'a> {
    fleet: &'a Fleet,
    undo: &'static str,
    host: String,
}

impl Drop for Fault<'_> {
    fn drop(&mut self) {
        self.fleet.script(&[self.undo, &Fleet::index(&self.host)]);
    }
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// An RFC 3339 time `m` minutes from now (negative: ago), for tokens.
pub fn minutes_from_now(m: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    tend::core::token::format_rfc3339(now + m * 60)
}

/// Poll until `f` holds or the deadline passes.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `git -C DIR ARGS` with a fixed identity; its trimmed stdout. Panics
/// with git's output when it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=operator",
            "-c",
            "user.email=operator@example.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A desired-state directory in a temp dir.
pub struct Desired {
    pub tmp: tempfile::TempDir,
}

impl Desired {
    pub fn new(tend_yaml: &str, inventory: &str, hosts: &[(&str, &str)]) -> Desired {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path();
        fs::write(d.join("tend.yaml"), tend_yaml).unwrap();
        fs::write(d.join("inventory.yaml"), inventory).unwrap();
        fs::create_dir_all(d.join("hosts")).unwrap();
        for (name, body) in hosts {
            fs::write(d.join("hosts").join(format!("{name}.yaml")), body).unwrap();
        }
        Desired { tmp }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn state(&self) -> PathBuf {
        self.dir().join(".tend")
    }

    /// Make the dir a git work tree (the state dir ignored) and commit it.
    pub fn init_git(&self) {
        fs::write(self.dir().join(".gitignore"), ".tend/\n").unwrap();
        git(self.dir(), &["init", "-q", "-b", "main"]);
        self.commit("initial desired state");
    }

    /// Commit everything; returns the new HEAD.
    pub fn commit(&self, msg: &str) -> String {
        git(self.dir(), &["add", "-A"]);
        git(self.dir(), &["commit", "-q", "-m", msg]);
        git(self.dir(), &["rev-parse", "HEAD"])
    }

    /// The real binary with `--dir` set to this desired state, stdin
    /// closed, and none of the caller's dispatch mode or SSH agent.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tend"));
        c.arg("--dir")
            .arg(self.dir())
            .args(args)
            .env_remove("TEND_DISPATCH")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null());
        c
    }

    /// Run the real binary with `--dir` set to this desired state.
    pub fn tend(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run tend")
    }

    /// The real binary with `--dir` set, started in the background (stdin
    /// closed), for a test that kills it or acts while it runs.
    pub fn spawn(&self, args: &[&str], stdout: Stdio, stderr: Stdio) -> Child {
        self.command(args)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start tend")
    }

    /// The run ids in the state dir.
    pub fn run_ids(&self) -> std::collections::BTreeSet<String> {
        match fs::read_dir(self.state().join("runs")) {
            Ok(dir) => dir
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Default::default(),
        }
    }

    /// One run's result.json.
    pub fn result(&self, run_id: &str) -> serde_json::Value {
        let path = self.state().join("runs").join(run_id).join("result.json");
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    /// The newest run's result.json (by start time: run ids only have
    /// second resolution, so their order within a second is random).
    pub fn last_result(&self) -> serde_json::Value {
        let runs = self.state().join("runs");
        fs::read_dir(&runs)
            .expect("runs dir")
            .map(|e| {
                let path = e.unwrap().path().join("result.json");
                serde_json::from_slice::<serde_json::Value>(&fs::read(path).unwrap()).unwrap()
            })
            .max_by(|a, b| {
                let key = |v: &serde_json::Value| {
                    v["execution_started_at"].as_str().unwrap_or("").to_string()
                };
                key(a).cmp(&key(b))
            })
            .expect("a run")
    }
}

/// A running `tend run`, killed (SIGKILL) if the test did not stop it. Its
/// log lives outside the desired-state dir (a write there is a change).
pub struct Daemon {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Daemon {
    pub fn start(d: &Desired) -> Daemon {
        Daemon::start_with_env(d, &[])
    }

    /// `start` with extra environment variables.
    pub fn start_with_env(d: &Desired, env: &[(&str, &std::ffi::OsStr)]) -> Daemon {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tend"))
            .arg("--dir")
            .arg(d.dir())
            .args(["run", "-v"])
            .envs(env.iter().copied())
            .env_remove("TEND_DISPATCH")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start tend run");
        Daemon {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Wait for the process to exit on its own.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "tend run did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One host's entry in `host_outcomes` of a result.json.
pub fn outcome<'a>(result: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    result["host_outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["host"] == host)
        .unwrap_or_else(|| panic!("no outcome for {host} in {result:#}"))
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The second chroot fleet's dir: a fleet of its own beside the default one
/// (`TEND_SCALE_FLEET_DIR`, default `/var/tmp/tend-fleet-scale`).
pub fn scale_fleet_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("TEND_SCALE_FLEET_DIR")
            .unwrap_or_else(|_| "/var/tmp/tend-fleet-scale".into()),
    )
}

/// The loopback range of the second fleet: its host hI listens on
/// `127.0.1.(10+I)`, clear of the default fleet (`127.0.0.11..`) and the
/// systemd hosts (`127.0.0.101..`).
pub const SCALE_NET: &str = "127.0.1";

/// The second fleet's range: [`SCALE_NET`], or `TEND_SCALE_FLEET_NET`
/// (with its own `TEND_SCALE_FLEET_DIR`) to run a long campaign on a
/// second fleet of its own while the suite uses the usual one.
pub fn scale_net() -> String {
    std::env::var("TEND_SCALE_FLEET_NET").unwrap_or_else(|_| SCALE_NET.into())
}

/// Run `fleet.sh ARGS` on the second fleet (its dir and range), with a
/// generous deadline for `up`; panics with the script's stderr on failure.
fn scale_script(args: &[&str]) {
    let dir = scale_fleet_dir();
    fs::create_dir_all(&dir).expect("create the second fleet's dir");
    let out = Command::new("bash")
        .arg(repo().join("tests/fleet/fleet.sh"))
        .args(args)
        .env("TEND_FLEET_DIR", &dir)
        .env("TEND_FLEET_NET", scale_net())
        // A deadline, not a sleep: a couple of hundred hosts starting on a
        // machine busy with other suites take minutes.
        .env(
            "TEND_FLEET_WAIT",
            std::env::var("TEND_SCALE_FLEET_WAIT").unwrap_or_else(|_| "600".into()),
        )
        .stdin(Stdio::null())
        .output()
        .expect("run tests/fleet/fleet.sh");
    assert!(
        out.status.success(),
        "TEND_FLEET_DIR={} TEND_FLEET_NET={} tests/fleet/fleet.sh {} failed (it needs root and the packages of .ci/run):\n{}",
        dir.display(),
        scale_net(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A second chroot fleet of `n` hosts (h1..hN on `127.0.1.(10+I)`, in
/// [`scale_fleet_dir`]), every host started fresh: whatever an earlier run
/// left of it is taken down first. It never touches the default fleet. Take
/// it down with [`Fleet::down`] when done (hosts stay up otherwise).
pub fn scale_fleet(n: usize) -> Fleet {
    scale_script(&["down"]);
    scale_script(&["up", &n.to_string()]);
    let dir = scale_fleet_dir();
    let hosts = read_hosts(&dir.join("hosts.tsv"));
    Fleet {
        key: dir.join("id_ed25519"),
        known_hosts: dir.join("known_hosts"),
        ssh_config: dir.join("ssh_config"),
        hosts,
        dir,
        netns: None,
    }
}

impl Fleet {
    /// `fleet.sh down` for this fleet's dir: every host of it stopped and
    /// unmounted (another fleet dir's hosts are not touched).
    pub fn down(&self) {
        self.script(&["down"]);
    }
}

/// The private fleet's network namespace and range: its h1 (the bastion)
/// listens on `198.51.100.11`, which the machine reaches over a veth; h2..hN
/// listen on the namespace's loopback (`198.51.100.12..`), which the machine
/// has no route to. See "A fleet in a network namespace" in
/// tests/fleet/README.md.
pub const PRIVATE_NETNS: &str = "tendpriv";
pub const PRIVATE_NET: &str = "198.51.100";
/// h1 (bastion) and h2..h4 behind it.
pub const PRIVATE_HOSTS: usize = 4;

/// The private fleet's dir (`TEND_PRIVATE_FLEET_DIR`, default
/// `/var/tmp/tend-fleet-private`).
pub fn private_fleet_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("TEND_PRIVATE_FLEET_DIR")
            .unwrap_or_else(|_| "/var/tmp/tend-fleet-private".into()),
    )
}

/// The private fleet (hosts in a network namespace of their own, reached
/// through h1), started on first use; hosts already up stay up.
pub fn private_fleet() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| {
        let dir = private_fleet_dir();
        fs::create_dir_all(&dir).expect("create the private fleet's dir");
        let f = Fleet {
            key: dir.join("id_ed25519"),
            known_hosts: dir.join("known_hosts"),
            ssh_config: dir.join("ssh_config"),
            hosts: BTreeMap::new(),
            dir: dir.clone(),
            netns: Some(PRIVATE_NETNS.into()),
        };
        f.script(&["up", &PRIVATE_HOSTS.to_string()]);
        f.script(&["forget-revisions"]);
        Fleet {
            hosts: read_hosts(&dir.join("hosts.tsv")),
            ..f
        }
    })
}
