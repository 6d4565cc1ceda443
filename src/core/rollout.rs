//! Rollout waves and the failure budget (SPEC 8.2), as pure arithmetic over
//! the rollout's fixed host count N: the cumulative wave sizes, the budget,
//! the order hosts enter waves in, what counts as failed, and the rollout's
//! state as hosts finish.
//!
//! The shell (`src/rollout.rs`) keeps a [`Record`] per rollout in SQLite and
//! drives it from `tend apply` and the controller's passes.
//!
//! Invariant: no I/O, no clock; every function is total (no input panics)
//! and property-tested.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::report::HostOutcomeKind;

/// A host count, or a percentage of N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Count(u64),
    Percent(u64),
}

impl Amount {
    /// `3` or `25%` (a percentage from 0 to 100).
    pub fn parse(s: &str) -> Result<Amount, String> {
        let t = s.trim();
        let bad = || format!("`{s}`: expected a host count (e.g. 3) or a percentage (e.g. 25%)");
        match t.strip_suffix('%') {
            Some(p) => {
                let v: u64 = p.trim().parse().map_err(|_| bad())?;
                if v > 100 {
                    return Err(format!("`{s}`: a percentage is at most 100%"));
                }
                Ok(Amount::Percent(v))
            }
            None => t.parse().map(Amount::Count).map_err(|_| bad()),
        }
    }
}

/// Cumulative wave sizes for N hosts: a wave of p% is ceil(p·N/100) hosts,
/// at least 1, never more than N nor fewer than the wave before. A last wave
/// short of N is followed by one of N, so every host has a wave. Empty for
/// N = 0.
pub fn wave_sizes(waves: &[Amount], n: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    if n == 0 {
        return out;
    }
    for w in waves {
        let size = match *w {
            Amount::Count(c) => c,
            Amount::Percent(p) => (p.min(100) * n).div_ceil(100),
        }
        .clamp(1, n);
        let size = size.max(out.last().copied().unwrap_or(0));
        if out.last() != Some(&size) {
            out.push(size);
        }
    }
    if out.last() != Some(&n) {
        out.push(n);
    }
    out
}

/// The failure budget: a count as given, p% as floor(p·N/100). The rollout
/// halts once more hosts than this failed ("within" means ≤).
pub fn budget(max: Amount, n: u64) -> u64 {
    match max {
        Amount::Count(c) => c,
        Amount::Percent(p) => p.min(100) * n / 100,
    }
}

/// The order hosts enter waves in: inventory order, the canary first.
pub fn order<'a>(inventory: &'a [String], canary: Option<&str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::with_capacity(inventory.len());
    if let Some(c) = canary.filter(|c| inventory.iter().any(|h| h == c)) {
        out.push(inventory.iter().find(|h| *h == c).expect("present"));
    }
    out.extend(
        inventory
            .iter()
            .map(String::as_str)
            .filter(|h| Some(*h) != canary),
    );
    out
}

/// Whether a host's pass counts against the budget. A host held back (the
/// kill switch, a signal, a host lock held by someone else: `Planned`) is
/// not failed and not done; a host waiting for a token or blocked by policy
/// is done and not failed. `health_failed`: its health command exited
/// non-zero or timed out.
pub fn is_failure(outcome: HostOutcomeKind, failed_step: bool, health_failed: bool) -> bool {
    use HostOutcomeKind::*;
    health_failed
        || match outcome {
            ExecutionFailed | TransportUnreachable | CapabilityMismatch | PreflightFailed => true,
            PartialSuccess => failed_step,
            Completed | NoChange | Planned | EscalationRequired | PolicyBlocked => false,
        }
}

/// Whether a host's pass ended it for the rollout (`Planned` hosts stay in
/// their wave and are tried again).
pub fn is_done(outcome: HostOutcomeKind) -> bool {
    outcome != HostOutcomeKind::Planned
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    InProgress,
    Halted,
    Complete,
}

/// One rollout: N, its waves and budget, and the hosts done and failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Hosts in the order they enter waves; N is its length.
    pub hosts: Vec<String>,
    /// Cumulative sizes ([`wave_sizes`]).
    pub waves: Vec<u64>,
    pub budget: u64,
    pub done: Vec<bool>,
    pub failed: Vec<bool>,
    pub halted: bool,
    /// Failures before this index do not count (a resume gives a fresh
    /// budget from the halted wave on).
    pub counted_from: usize,
}

impl Rollout {
    pub fn new(hosts: Vec<String>, waves: &[Amount], max_failures: Amount) -> Rollout {
        let n = hosts.len() as u64;
        Rollout {
            waves: wave_sizes(waves, n),
            budget: budget(max_failures, n),
            done: vec![false; hosts.len()],
            failed: vec![false; hosts.len()],
            halted: false,
            counted_from: 0,
            hosts,
        }
    }

    /// The wave (0-based) a host belongs to, None for a host not in it.
    pub fn wave_of(&self, host: &str) -> Option<usize> {
        let i = self.hosts.iter().position(|h| h == host)? as u64;
        self.waves.iter().position(|&end| i < end)
    }

    /// The current wave: the first with a host not done (None: complete).
    pub fn current_wave(&self) -> Option<usize> {
        let first = self.done.iter().position(|d| !d)? as u64;
        self.waves.iter().position(|&end| first < end)
    }

    /// The wave shown for the rollout: the current one, the one that halted
    /// it (its last failed host's), or the last once complete. 0-based.
    pub fn shown_wave(&self) -> usize {
        if self.halted {
            return self
                .hosts
                .iter()
                .zip(&self.failed)
                .filter(|(_, f)| **f)
                .filter_map(|(h, _)| self.wave_of(h))
                .max()
                .unwrap_or(0);
        }
        self.current_wave()
            .unwrap_or(self.waves.len().saturating_sub(1))
    }

    /// Failures that count against the budget.
    pub fn failures(&self) -> u64 {
        self.failed[self.counted_from.min(self.failed.len())..]
            .iter()
            .filter(|f| **f)
            .count() as u64
    }

    pub fn state(&self) -> State {
        if self.halted {
            State::Halted
        } else if self.done.iter().all(|d| *d) {
            State::Complete
        } else {
            State::InProgress
        }
    }

    /// May this host start now? Only while not halted, and only a host of
    /// the current wave (or an earlier one) that is not done.
    pub fn may_start(&self, host: &str) -> bool {
        let (Some(i), Some(cur)) = (
            self.hosts.iter().position(|h| h == host),
            self.current_wave(),
        ) else {
            return false;
        };
        !self.halted && !self.done[i] && self.wave_of(host).is_some_and(|w| w <= cur)
    }

    /// Record the end of a host's pass; halts once the budget is exceeded.
    pub fn finish(&mut self, host: &str, outcome: HostOutcomeKind, failed: bool) {
        let Some(i) = self.hosts.iter().position(|h| h == host) else {
            return;
        };
        if !is_done(outcome) {
            return;
        }
        self.done[i] = true;
        self.failed[i] = failed;
        if self.failures() > self.budget {
            self.halted = true;
        }
    }

    /// `tend resume`: continue from the halted wave with a fresh budget; its
    /// failed hosts are tried again.
    pub fn resume(&mut self) {
        if !self.halted {
            return;
        }
        self.halted = false;
        let wave = self
            .hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| self.failed[*i])
            .filter_map(|(_, h)| self.wave_of(h))
            .max()
            .unwrap_or(0);
        let start = if wave == 0 {
            0
        } else {
            self.waves[wave - 1] as usize
        };
        for i in start..self.hosts.len() {
            if self.failed[i] {
                self.failed[i] = false;
                self.done[i] = false;
            }
        }
        self.counted_from = start;
    }
}

/// A rollout as it is kept: what started it and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The desired revision it rolls out (the latest one with the same
    /// definitions for its hosts).
    pub revision: String,
    pub started_at: String,
    /// Each inventory host's definition hash when it started: a revision
    /// that changes one of its pending hosts' starts a new rollout.
    pub defs: BTreeMap<String, String>,
    pub rollout: Rollout,
    /// Why it halted, naming the failed hosts.
    pub halted_reason: Option<String>,
    /// When the next wave may start (RFC 3339), after `pause`.
    pub next_wave_at: Option<String>,
}

impl Record {
    /// Hosts of the rollout not done yet.
    pub fn pending(&self) -> Vec<&str> {
        let r = &self.rollout;
        r.hosts
            .iter()
            .zip(&r.done)
            .filter(|(_, d)| !**d)
            .map(|(h, _)| h.as_str())
            .collect()
    }

    pub fn is_pending(&self, host: &str) -> bool {
        let r = &self.rollout;
        r.hosts
            .iter()
            .position(|h| h == host)
            .is_some_and(|i| !r.done[i])
    }

    /// The failed hosts, in wave order.
    pub fn failed_hosts(&self) -> Vec<String> {
        let r = &self.rollout;
        r.hosts
            .iter()
            .zip(&r.failed)
            .filter(|(_, f)| **f)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Why a pending host does not start now: (condition reason, message);
    /// None when it may. `now` is RFC 3339 (compared as text: same format).
    pub fn hold(&self, host: &str, now: &str) -> Option<(&'static str, String)> {
        let r = &self.rollout;
        // A halt holds the hosts not done and the failed ones (they run
        // again on resume); a host done and not failed only gets drift
        // correction, which no halt holds.
        let failed = r
            .hosts
            .iter()
            .position(|h| h == host)
            .is_some_and(|i| r.failed[i]);
        if !(self.is_pending(host) || r.halted && failed) {
            return None;
        }
        let wave = r.wave_of(host).unwrap_or(0);
        if r.halted {
            return Some((
                "RolloutHalted",
                format!(
                    "rollout of {} halted: {}; `tend resume --reason TEXT` continues it, a new revision for this host starts a new one",
                    short(&self.revision),
                    self.halted_reason
                        .as_deref()
                        .unwrap_or("the failure budget is spent")
                ),
            ));
        }
        let cur = r.current_wave().unwrap_or(0);
        if wave > cur {
            let (end, start) = (r.waves[cur], if cur == 0 { 0 } else { r.waves[cur - 1] });
            let done = r.done[start as usize..end as usize]
                .iter()
                .filter(|d| **d)
                .count();
            return Some((
                "RolloutWaiting",
                format!(
                    "waits for wave {} of {} of the rollout of {}: wave {} has {done} of {} host(s) done",
                    wave + 1,
                    r.waves.len(),
                    short(&self.revision),
                    cur + 1,
                    end - start
                ),
            ));
        }
        if let Some(at) = &self.next_wave_at
            && now < at.as_str()
            && cur > 0
            && wave == cur
        {
            return Some((
                "RolloutWaiting",
                format!(
                    "waits for wave {} of {} of the rollout of {}: the pause between waves ends at {at}",
                    wave + 1,
                    r.waves.len(),
                    short(&self.revision)
                ),
            ));
        }
        None
    }
}

/// A revision for messages: a git commit's first 12 characters.
pub fn short(revision: &str) -> &str {
    let r = revision.strip_prefix("sha256:").unwrap_or(revision);
    r.get(..12).unwrap_or(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use HostOutcomeKind::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("h{i}")).collect()
    }

    #[test]
    fn amounts_parse() {
        assert_eq!(Amount::parse("3"), Ok(Amount::Count(3)));
        assert_eq!(Amount::parse("25%"), Ok(Amount::Percent(25)));
        assert_eq!(Amount::parse(" 100% "), Ok(Amount::Percent(100)));
        assert!(Amount::parse("101%").is_err());
        assert!(Amount::parse("-1").is_err());
        assert!(Amount::parse("x%").is_err());
        assert!(Amount::parse("").is_err());
    }

    #[test]
    fn the_spec_example() {
        use Amount::*;
        // waves: [1, 25%, 100%] over 10 hosts: 1, ceil(2.5) = 3, 10.
        assert_eq!(
            wave_sizes(&[Count(1), Percent(25), Percent(100)], 10),
            [1, 3, 10]
        );
        // max_failures 10% of 10: 1; of 9: 0.
        assert_eq!(budget(Percent(10), 10), 1);
        assert_eq!(budget(Percent(10), 9), 0);
        // A short list gets a last wave of N; at least 1 host per wave.
        assert_eq!(wave_sizes(&[Percent(0), Count(2)], 5), [1, 2, 5]);
        assert_eq!(wave_sizes(&[Count(50)], 4), [4]);
        assert!(wave_sizes(&[Count(1)], 0).is_empty());
    }

    #[test]
    fn the_canary_goes_first() {
        let inv = names(4);
        assert_eq!(order(&inv, Some("h3")), ["h3", "h1", "h2", "h4"]);
        assert_eq!(order(&inv, Some("zz")), ["h1", "h2", "h3", "h4"]);
        assert_eq!(order(&inv, None), ["h1", "h2", "h3", "h4"]);
    }

    #[test]
    fn what_counts_as_failed() {
        assert!(is_failure(ExecutionFailed, true, false));
        assert!(is_failure(TransportUnreachable, false, false));
        assert!(is_failure(PartialSuccess, true, false));
        assert!(
            !is_failure(PartialSuccess, false, false),
            "cut short by the kill switch"
        );
        assert!(!is_failure(Planned, false, false));
        assert!(!is_failure(EscalationRequired, false, false));
        assert!(!is_failure(PolicyBlocked, false, false));
        assert!(is_failure(Completed, false, true), "health failed");
        assert!(!is_done(Planned) && is_done(EscalationRequired));
    }

    #[test]
    fn a_budget_of_one_lets_one_failure_through_and_halts_on_the_second() {
        use Amount::*;
        let mut r = Rollout::new(names(8), &[Count(2), Count(4), Percent(100)], Count(1));
        assert!(r.may_start("h1") && r.may_start("h2") && !r.may_start("h3"));
        r.finish("h1", Completed, false);
        r.finish("h2", ExecutionFailed, true);
        assert_eq!(r.state(), State::InProgress);
        assert_eq!(r.current_wave(), Some(1));
        assert!(r.may_start("h3") && !r.may_start("h5"));
        // A locked host stays in its wave, not done, not failed.
        r.finish("h3", Planned, false);
        assert!(r.may_start("h3"));
        r.finish("h3", Completed, false);
        r.finish("h4", TransportUnreachable, true);
        assert_eq!(r.state(), State::Halted);
        assert!(!r.may_start("h5") && !r.may_start("h4"));
        // Resume: from the halted wave, fresh budget, its failed host again.
        r.resume();
        assert_eq!(r.state(), State::InProgress);
        assert!(r.may_start("h4") && !r.may_start("h5"));
        assert!(
            !r.may_start("h2"),
            "a failed host of an earlier wave stays done"
        );
        assert_eq!(r.failures(), 0);
        r.finish("h4", Completed, false);
        assert!(r.may_start("h5"));
    }

    #[test]
    fn a_record_says_why_a_host_waits() {
        use Amount::*;
        let mut rec = Record {
            revision: "0123456789abcdef0123".into(),
            started_at: "2026-12-06T10:00:00.000Z".into(),
            defs: Default::default(),
            rollout: Rollout::new(names(4), &[Count(1), Count(2), Percent(100)], Count(0)),
            halted_reason: None,
            next_wave_at: None,
        };
        let now = "2026-12-06T10:00:01.000Z";
        assert_eq!(rec.hold("h1", now), None);
        let (reason, msg) = rec.hold("h3", now).unwrap();
        assert_eq!(reason, "RolloutWaiting");
        assert!(
            msg.contains("waits for wave 3 of 3") && msg.contains("0123456789ab"),
            "{msg}"
        );
        assert_eq!(rec.hold("zz", now), None, "not in the rollout");
        // Wave 1 done; the pause holds wave 2 until it ends.
        rec.rollout.finish("h1", Completed, false);
        rec.next_wave_at = Some("2026-12-06T10:00:30.000Z".into());
        let (_, msg) = rec.hold("h2", now).unwrap();
        assert!(msg.contains("pause"), "{msg}");
        assert_eq!(rec.hold("h2", "2026-12-06T10:00:31.000Z"), None);
        // Halted: the pending and the failed hosts are held, the done ones not.
        rec.rollout.finish("h2", ExecutionFailed, true);
        rec.halted_reason = Some("1 host(s) failed (h2)".into());
        assert!(rec.rollout.halted);
        for h in ["h2", "h3", "h4"] {
            assert_eq!(rec.hold(h, now).unwrap().0, "RolloutHalted", "{h}");
        }
        assert_eq!(rec.hold("h1", now), None, "done: drift correction only");
        assert_eq!(rec.failed_hosts(), ["h2"]);
        assert_eq!(rec.rollout.shown_wave(), 1, "the wave that halted");
    }

    proptest! {
        #[test]
        fn waves_are_cumulative_and_end_at_n(
            n in 0u64..600,
            ws in proptest::collection::vec((any::<bool>(), 0u64..700), 0..6),
        ) {
            let ws: Vec<Amount> = ws
                .into_iter()
                .map(|(pct, v)| if pct { Amount::Percent(v % 101) } else { Amount::Count(v) })
                .collect();
            let sizes = wave_sizes(&ws, n);
            if n == 0 {
                prop_assert!(sizes.is_empty());
            } else {
                prop_assert_eq!(*sizes.last().unwrap(), n);
                prop_assert!(sizes[0] >= 1);
                prop_assert!(sizes.windows(2).all(|w| w[0] < w[1]));
            }
        }

        #[test]
        fn a_halted_rollout_starts_nothing(
            outcomes in proptest::collection::vec(0usize..4, 1..40),
            max in 0u64..4,
        ) {
            let hosts = names(outcomes.len());
            let mut r = Rollout::new(hosts.clone(), &[Amount::Count(1), Amount::Percent(50)], Amount::Count(max));
            for (h, o) in hosts.iter().zip(&outcomes) {
                if !r.may_start(h) {
                    continue;
                }
                let (kind, failed) = [(Completed, false), (ExecutionFailed, true), (Planned, false), (EscalationRequired, false)][*o];
                r.finish(h, kind, failed);
                if r.state() == State::Halted {
                    prop_assert!(r.failures() > max);
                    prop_assert!(hosts.iter().all(|h| !r.may_start(h)));
                }
            }
        }
    }
}
