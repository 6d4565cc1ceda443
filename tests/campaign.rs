//! The safety campaign: generated scenarios on the real SSH fleet that mix
//! destructive changes (deletes, prunes, teardowns, replacements,
//! destructive commands, service stops) with
//! confirmation tokens that are missing, valid, expired, for another
//! operation, for a superset or subset of the hosts, reused, world-writable,
//! malformed or stale, under every dispatch mode and the kill switch. Each
//! scenario checks ON THE HOSTS that a destructive change happened exactly
//! when it was authorized and exactly once, and that the run's artifacts
//! record the decision. It prints the totals; unauthorized executions must be 0.

#[path = "support/fleet.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;
use support::{Desired, Fleet, code, fleet, minutes_from_now, systemd_fleet, text};

const SCENARIOS: usize = 200;
const WORKERS: [[&str; 2]; 4] = [
    ["h40", "h41"],
    ["h42", "h43"],
    ["h44", "h45"],
    ["h46", "h47"],
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Change {
    Delete,
    Prune,
    Teardown,
    Replace,
    /// A `command` with `destructive: true` that removes the victim.
    Command,
    /// `running: false` for a running service (systemd hosts).
    ServiceStop,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Token {
    Missing,
    Valid,
    Expired,
    OtherOperation,
    Superset,
    Subset,
    WorldWritable,
    Malformed,
    Stale,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Enforced,
    Off,
    /// Canary names the first host of the scenario.
    Canary,
    Kill,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    change: Change,
    token: Token,
    mode: Mode,
    two_hosts: bool,
    protected_first: bool,
}

/// xorshift64*: reproducible scenarios without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn scenarios() -> Vec<Scenario> {
    use Token::*;
    let mut rng = Rng(0x7e4d_5eed_0000_0001);
    let tokens = [
        Missing,
        Valid,
        Valid,
        Valid,
        Expired,
        OtherOperation,
        Superset,
        Subset,
        WorldWritable,
        Malformed,
        Stale,
    ];
    (0..SCENARIOS + SERVICE_SCENARIOS)
        .map(|n| {
            let two_hosts = rng.next().is_multiple_of(2);
            let mut token = rng.pick(&tokens);
            if token == Subset && !two_hosts {
                token = Superset;
            }
            let change = rng.pick(&[
                Change::Delete,
                Change::Prune,
                Change::Teardown,
                Change::Replace,
                Change::Command,
            ]);
            Scenario {
                change: if n < SCENARIOS {
                    change
                } else {
                    Change::ServiceStop
                },
                token,
                mode: rng.pick(&[
                    Mode::Enforced,
                    Mode::Enforced,
                    Mode::Off,
                    Mode::Canary,
                    Mode::Kill,
                ]),
                two_hosts,
                protected_first: rng.next().is_multiple_of(8),
            }
        })
        .collect()
}

/// Service stops run on two systemd hosts of their own.
const SERVICE_SCENARIOS: usize = 40;
const SERVICE_WORKER: [&str; 2] = ["s10", "s11"];

/// The fleet a host belongs to: `sN` are the systemd hosts.
fn fleet_of(host: &str) -> &'static Fleet {
    if host.starts_with('s') {
        systemd_fleet()
    } else {
        fleet()
    }
}

/// What one scenario did.
#[derive(Default)]
struct Tally {
    authorized_executed: usize,
    unauthorized_executed: usize,
    double_executed: usize,
    failures: Vec<String>,
}

fn inventory(hosts: &[&str], protected_first: bool) -> String {
    let mut s = String::from("hosts:\n");
    for (i, h) in hosts.iter().enumerate() {
        s.push_str(&fleet_of(h).inventory_entry(h));
        if i == 0 && protected_first {
            s.push_str("    protected: true\n");
        }
    }
    s
}

/// The host file before the destructive change (what gets applied first).
fn before(change: Change, dir: &str) -> String {
    match change {
        Change::ServiceStop => format!(
            "resources:\n  - kind: directory\n    path: {dir}\n  - kind: service\n    name: tend-demo\n"
        ),
        Change::Delete | Change::Replace | Change::Command => {
            format!("resources:\n  - kind: directory\n    path: {dir}\n")
        }
        Change::Prune | Change::Teardown => format!(
            "resources:\n  - kind: directory\n    path: {dir}\n  - kind: file\n    path: {dir}/victim\n    content: \"v\\n\"\n"
        ),
    }
}

/// The host file that asks for the destructive change.
fn after(change: Change, dir: &str, extra: bool) -> String {
    let mut s = match change {
        Change::ServiceStop => format!(
            "resources:\n  - kind: directory\n    path: {dir}\n  - kind: service\n    name: tend-demo\n    running: false\n"
        ),
        Change::Delete => format!(
            "resources:\n  - kind: directory\n    path: {dir}\n  - kind: file\n    path: {dir}/victim\n    state: absent\n"
        ),
        Change::Prune => format!("resources:\n  - kind: directory\n    path: {dir}\n"),
        Change::Teardown => format!("lifecycle: absent\n{}", before(change, dir)),
        Change::Replace => format!(
            "resources:\n  - kind: directory\n    path: {dir}\n  - kind: directory\n    path: {dir}/victim\n"
        ),
        // Runs only while the victim exists (the guard is probed).
        Change::Command => format!(
            "resources:\n  - kind: directory\n    path: {dir}\n  - kind: command\n    name: drop-victim\n    run: rm -f {dir}/victim\n    unless: test ! -e {dir}/victim\n    destructive: true\n    requires: [\"directory:{dir}\"]\n"
        ),
    };
    if extra {
        // Another destructive step: the operation (and its hash) changes.
        s.push_str(&format!(
            "  - kind: file\n    path: {dir}/extra\n    state: absent\n"
        ));
    }
    s
}

/// Whether the destructive change happened on a host: the regular file
/// `victim` is gone (deleted, pruned, torn down, or replaced by a directory).
fn destroyed(change: Change, host: &str, dir: &str) -> bool {
    let check = match change {
        Change::ServiceStop => {
            "systemctl is-active --quiet tend-demo.service && echo kept || echo gone".to_string()
        }
        _ => format!("[ -f {dir}/victim ] && echo kept || echo gone"),
    };
    fleet_of(host).sh(host, &check) == "gone\n"
}

fn token_body(op: &str, hosts: &[&str], expires: &str) -> String {
    format!(
        "operation: {op}\nhosts: [{}]\nexpires: {expires}\nreason: campaign\n",
        hosts.join(", ")
    )
}

fn drop_token(state: &Path, name: &str, body: &str, mode: u32) {
    let dir = state.join("confirm");
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    fs::write(&p, body).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn run_scenario(n: usize, sc: Scenario, pair: [&str; 2], t: &mut Tally) {
    let f = fleet_of(pair[0]);
    let hosts: Vec<&str> = if sc.two_hosts {
        pair.to_vec()
    } else {
        vec![pair[0]]
    };
    let dir = format!("/srv/camp/{}", pair[0]);
    let mut fail = |m: String| t.failures.push(format!("scenario {n} {sc:?}: {m}"));
    for h in &hosts {
        f.sh(h, &format!("rm -rf {dir} && mkdir -p {dir} && printf 'v\\n' > {dir}/victim && printf 'e\\n' > {dir}/extra"));
        if sc.change == Change::ServiceStop {
            f.sh(h, "systemctl enable --now tend-demo.service");
        }
    }
    let tend_yaml = format!("probe_timeout: 10s\nretries: 0\ncanary: {}\n", hosts[0]);
    let body = before(sc.change, &dir);
    let files: Vec<(&str, &str)> = hosts.iter().map(|h| (*h, body.as_str())).collect();
    let d = Desired::new(&tend_yaml, &inventory(&hosts, sc.protected_first), &files);
    let write_hosts = |text: &str| {
        for h in &hosts {
            fs::write(d.dir().join("hosts").join(format!("{h}.yaml")), text).unwrap();
        }
    };
    // Apply the starting point (records what tend manages, for prune/teardown).
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    if code(&out) != 0 {
        return fail(format!("setup apply: {}", text(&out)));
    }
    // Ask for the destructive change: held, with the operation to confirm.
    write_hosts(&after(sc.change, &dir, false));
    let out = d.tend(&["apply", "--dispatch", "enforced"]);
    if code(&out) != 3 {
        return fail(format!("hold apply: {}", text(&out)));
    }
    let plan = d.tend(&["plan", "--json"]);
    let plan: Value = match serde_json::from_slice(&plan.stdout) {
        Ok(v) => v,
        Err(e) => return fail(format!("plan --json: {e}: {}", text(&plan))),
    };
    let Some(op) = plan["operation"].as_str().map(str::to_string) else {
        return fail(format!("no operation in the plan: {plan:#}"));
    };
    let op_hosts: Vec<String> = serde_json::from_value(plan["operation_hosts"].clone()).unwrap();
    let op_hosts: Vec<&str> = op_hosts.iter().map(String::as_str).collect();
    for h in &hosts {
        if destroyed(sc.change, h, &dir) {
            t.unauthorized_executed += 1;
            return fail(format!("{h}: destroyed without any token"));
        }
    }

    // The token of the scenario.
    let state = d.state();
    let good = token_body(&op, &op_hosts, &minutes_from_now(10));
    match sc.token {
        Token::Missing => {}
        Token::Valid => drop_token(&state, "t.yaml", &good, 0o600),
        Token::Expired => drop_token(
            &state,
            "t.yaml",
            &token_body(&op, &op_hosts, &minutes_from_now(-1)),
            0o600,
        ),
        Token::OtherOperation => drop_token(
            &state,
            "t.yaml",
            &token_body(&"ab".repeat(32), &op_hosts, &minutes_from_now(10)),
            0o600,
        ),
        Token::Superset => {
            let mut more = op_hosts.clone();
            more.push("h99");
            drop_token(
                &state,
                "t.yaml",
                &token_body(&op, &more, &minutes_from_now(10)),
                0o600,
            )
        }
        Token::Subset => drop_token(
            &state,
            "t.yaml",
            &token_body(&op, &op_hosts[..1], &minutes_from_now(10)),
            0o600,
        ),
        Token::WorldWritable => drop_token(&state, "t.yaml", &good, 0o666),
        Token::Malformed => drop_token(&state, "t.yaml", "operation: [unterminated\n", 0o600),
        Token::Stale => {
            drop_token(&state, "t.yaml", &good, 0o600);
            write_hosts(&after(sc.change, &dir, true));
        }
    }
    if sc.mode == Mode::Kill {
        fs::write(state.join("KILL"), "").unwrap();
    }
    let mode = match sc.mode {
        Mode::Enforced | Mode::Kill => "enforced",
        Mode::Off => "off",
        Mode::Canary => "canary",
    };
    let out = d.tend(&["apply", "--dispatch", mode]);
    let result = d.last_result();

    // Who may destroy: a valid token, a dispatched host, not protected, no KILL.
    let token_valid = sc.token == Token::Valid;
    let authorized = |i: usize| {
        token_valid
            && sc.mode != Mode::Kill
            && sc.mode != Mode::Off
            && (sc.mode != Mode::Canary || i == 0)
            && !(i == 0 && sc.protected_first)
    };
    for (i, h) in hosts.iter().enumerate() {
        let gone = destroyed(sc.change, h, &dir);
        match (gone, authorized(i)) {
            (true, true) => t.authorized_executed += 1,
            (true, false) => {
                t.unauthorized_executed += 1;
                fail(format!(
                    "{h}: destroyed without authorization\n{}",
                    text(&out)
                ));
            }
            (false, true) => fail(format!(
                "{h}: authorized but not executed\n{}\n{result:#}",
                text(&out)
            )),
            (false, false) => {}
        }
        // Every host outcome explains itself.
        let o = result["host_outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["host"] == *h)
            .cloned()
            .unwrap_or_default();
        if o["outcome"].is_null()
            || o["dispatch_status"].is_null()
            || o.get("last_failure_class").is_none()
        {
            fail(format!("{h}: outcome does not explain itself: {o:#}"));
        }
    }
    // The confirmation record: present whenever a token was offered.
    let c = &result["confirmation"];
    if sc.token != Token::Missing && sc.token != Token::Stale {
        if c.is_null() {
            fail(format!("no confirmation record: {result:#}"));
        } else if token_valid != c["refusal"].is_null() {
            fail(format!("refusal does not match validity: {c:#}"));
        } else if matches!(
            sc.token,
            Token::OtherOperation | Token::Superset | Token::Subset
        ) && c["scope_match"] != false
        {
            fail(format!("scope_match should be false: {c:#}"));
        }
    }
    if sc.token == Token::Stale && !c.is_null() && c["scope_match"] != false {
        fail(format!("a stale token matched: {c:#}"));
    }
    let any_authorized = (0..hosts.len()).any(authorized);
    let full = result["effective_mode"] == "full";
    if full != any_authorized {
        fail(format!(
            "effective_mode {} but authorized={any_authorized}",
            result["effective_mode"]
        ));
    }

    // Exactly once: put the victims back and offer the same bytes again.
    if any_authorized {
        for h in &hosts {
            match sc.change {
                Change::ServiceStop => f.sh(h, "systemctl start tend-demo.service"),
                _ => f.sh(
                    h,
                    &format!(
                        "mkdir -p {dir} && rm -rf {dir}/victim && printf 'v\\n' > {dir}/victim"
                    ),
                ),
            };
        }
        drop_token(&state, "again.yaml", &good, 0o600);
        let out = d.tend(&["apply", "--dispatch", mode]);
        for h in &hosts {
            if destroyed(sc.change, h, &dir) {
                t.double_executed += 1;
                t.unauthorized_executed += 1;
                fail(format!(
                    "{h}: destroyed twice with one token\n{}",
                    text(&out)
                ));
            }
        }
        // When the same operation comes back, the same bytes are refused as
        // used; a pruned resource is no longer managed and is not planned.
        let again = d.last_result();
        let c = &again["confirmation"];
        if !c.is_null() && c["refusal"].is_null() {
            fail(format!("a used token was accepted again: {c:#}"));
        }
    }
}

#[test]
fn safety_campaign_zero_unauthorized_destructive_operations() {
    let all = scenarios();
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let workers: Vec<[&str; 2]> = WORKERS.iter().copied().chain([SERVICE_WORKER]).collect();
        let handles: Vec<_> = workers
            .into_iter()
            .enumerate()
            .map(|(w, pair)| {
                // Service stops on the systemd pair, the rest spread over
                // the chroot pairs.
                let mine: Vec<(usize, Scenario)> = all
                    .iter()
                    .copied()
                    .enumerate()
                    .filter(|(n, _)| {
                        if w == WORKERS.len() {
                            *n >= SCENARIOS
                        } else {
                            *n < SCENARIOS && n % WORKERS.len() == w
                        }
                    })
                    .collect();
                s.spawn(move || {
                    let mut t = Tally::default();
                    for (n, sc) in mine {
                        run_scenario(n, sc, pair, &mut t);
                    }
                    t
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let authorized: usize = tallies.iter().map(|t| t.authorized_executed).sum();
    let unauthorized: usize = tallies.iter().map(|t| t.unauthorized_executed).sum();
    let twice: usize = tallies.iter().map(|t| t.double_executed).sum();
    let failures: Vec<&String> = tallies.iter().flat_map(|t| &t.failures).collect();
    let by_kind = |c: Change| all.iter().filter(|s| s.change == c).count();
    println!(
        "safety campaign: {} scenarios ({} deletes, {} prunes, {} teardowns, {} replacements, {} destructive commands, {} service stops)",
        all.len(),
        by_kind(Change::Delete),
        by_kind(Change::Prune),
        by_kind(Change::Teardown),
        by_kind(Change::Replace),
        by_kind(Change::Command),
        by_kind(Change::ServiceStop)
    );
    println!("  authorized destructive operations executed:   {authorized}");
    println!("  unauthorized destructive operations executed: {unauthorized}");
    println!("  executed more than once:                      {twice}");
    assert_eq!(
        unauthorized, 0,
        "unauthorized destructive operations:\n{failures:#?}"
    );
    assert!(
        failures.is_empty(),
        "{} failing scenario(s):\n{failures:#?}",
        failures.len()
    );
    assert!(
        authorized > 0,
        "the campaign authorized nothing: it proves nothing"
    );
}
