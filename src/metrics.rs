//! The controller's metrics (SPEC 8.6), in the Prometheus text format
//! (version 0.0.4) of `prometheus-client`.
//!
//! Two kinds, fed two ways:
//! - **Events** (`tend_reconciles_total`, the two duration histograms,
//!   `tend_tokens_total`) are recorded by the controller where a pass ends,
//!   from the `PassReport` whose result it just wrote (`controller::real`),
//!   so that they count what the run artifacts show.
//! - **State** (`tend_hosts`, `tend_hosts_awaiting_confirmation`,
//!   `tend_drifted_resources`, `tend_rollout_state`, `tend_queue_depth`) is
//!   set at each scrape from a `FleetView` read from the status files and
//!   the loop's `Pulse`, so that it can never disagree with them.
//!
//! Invariant: no label value comes from outside tend's own records (host
//! names of the inventory, outcome and phase words, token file names that
//! the state dir holds); nothing here reads a file or the clock.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::core::report::{
    ConditionStatus, ConditionType, HostOutcomeKind, HostStatus, Phase, RolloutStatus,
};
use crate::pass::TokenResult;

/// The content type of what `render` returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every phase of a host status (SPEC 5), in the order they are shown.
pub const PHASES: [Phase; 6] = [
    Phase::Unknown,
    Phase::Probed,
    Phase::Ready,
    Phase::Running,
    Phase::TeardownPending,
    Phase::TeardownComplete,
];

/// The states of a rollout in `fleet.json` (SPEC 8.2).
pub const ROLLOUT_STATES: [&str; 3] = ["InProgress", "Halted", "Complete"];

/// Probes take from milliseconds (a local host) to `probe_timeout` and
/// retries (tens of seconds).
const PROBE_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Applies run from one quick batch to package installs and restarts.
const APPLY_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostOutcome {
    host: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabel {
    host: String,
    /// `corrective` or `intentional` (SPEC 8.7).
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

type Histograms = Family<HostLabel, Histogram, fn() -> Histogram>;

fn probe_histogram() -> Histogram {
    Histogram::new(PROBE_BUCKETS)
}

fn apply_histogram() -> Histogram {
    Histogram::new(APPLY_BUCKETS)
}

/// The state metrics at one scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetView {
    /// Hosts due for a pass and waiting for a free slot.
    pub queue_depth: u64,
    /// Hosts per phase (every phase present).
    pub phases: BTreeMap<Phase, u64>,
    /// Hosts whose status has `awaiting_confirmation`.
    pub awaiting: u64,
    /// Per host: resources that differ from the desired state after its
    /// last pass, while its `Drifted` condition is `True`; 0 otherwise.
    pub drifted: BTreeMap<String, u64>,
    /// The rollout's state word of `fleet.json`, if there is a rollout.
    pub rollout: Option<String>,
}

impl FleetView {
    /// From the status documents of the hosts kept (a host without one is
    /// `Unknown`: pass `HostStatus::new`) and the fleet's rollout.
    pub fn from_statuses<'a>(
        statuses: impl IntoIterator<Item = &'a HostStatus>,
        rollout: Option<&RolloutStatus>,
        queue_depth: u64,
    ) -> FleetView {
        let mut v = FleetView {
            queue_depth,
            phases: PHASES.iter().map(|p| (*p, 0)).collect(),
            rollout: rollout.map(|r| r.state.clone()),
            ..FleetView::default()
        };
        for s in statuses {
            *v.phases.entry(s.phase).or_default() += 1;
            if s.awaiting_confirmation.is_some() {
                v.awaiting += 1;
            }
            let drifted = s
                .condition(ConditionType::Drifted)
                .is_some_and(|c| c.status == ConditionStatus::True);
            let p = &s.pending;
            // Left uncorrected by the pass, plus reported by drift policy.
            let n = if drifted {
                u64::from(p.create)
                    + u64::from(p.update)
                    + u64::from(p.delete)
                    + s.drift.reported.len() as u64
            } else {
                0
            };
            v.drifted.insert(s.host.clone(), n);
        }
        v
    }
}

/// The registry and its families.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<HostOutcome, Counter>,
    changes: Family<ChangeLabel, Counter>,
    probe: Histograms,
    apply: Histograms,
    tokens: Family<ResultLabel, Counter>,
    /// (token file, result) already counted: each once per result.
    tokens_seen: Mutex<HashSet<(String, TokenResult)>>,
    queue_depth: Gauge,
    hosts: Family<PhaseLabel, Gauge>,
    awaiting: Gauge,
    drifted: Family<HostLabel, Gauge>,
    rollout: Family<StateLabel, Gauge>,
    /// One scrape at a time sets the state gauges and encodes them.
    render: Mutex<()>,
    /// (name as rendered, type, help) of every family: the encoder leaves
    /// out a family without samples, and a scraper should see each one.
    families: Vec<(String, &'static str, String)>,
}

/// Register `metric` and remember its descriptor (see `families`).
fn register(
    registry: &mut Registry,
    families: &mut Vec<(String, &'static str, String)>,
    name: &str,
    kind: &'static str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    let shown = if kind == "counter" {
        format!("{name}_total")
    } else {
        name.to_string()
    };
    families.push((shown, kind, format!("{help}.")));
    registry.register(name, help, metric);
}

/// The word an enum is written as in tend's documents (`Running`).
pub(crate) fn word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "Unknown".into(),
    }
}

impl Metrics {
    /// The families, with `tend_build_info` for this build.
    pub fn new(version: &str, commit: &str) -> Metrics {
        let mut registry = Registry::default();
        let mut families = Vec::new();
        let reconciles = Family::<HostOutcome, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "tend_reconciles",
            "counter",
            "Host passes ended, by host and outcome (the host's outcome in result.json; a resync that found nothing to do and recorded no run counts as NoChange)",
            reconciles.clone(),
        );
        let changes = Family::<ChangeLabel, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "tend_changes",
            "counter",
            "Changes made, by host and kind: corrective (the host drifted from a definition already applied) or intentional (the desired definition changed)",
            changes.clone(),
        );
        let probe: Histograms = Family::new_with_constructor(probe_histogram);
        register(
            &mut registry,
            &mut families,
            "tend_probe_duration_seconds",
            "histogram",
            "Time to probe a host in a pass (connect, retries and the probe command)",
            probe.clone(),
        );
        let apply: Histograms = Family::new_with_constructor(apply_histogram);
        register(
            &mut registry,
            &mut families,
            "tend_apply_duration_seconds",
            "histogram",
            "Time to dispatch a pass's steps to a host, for passes that dispatched any",
            apply.clone(),
        );
        let queue_depth = Gauge::default();
        register(
            &mut registry,
            &mut families,
            "tend_queue_depth",
            "gauge",
            "Hosts due for a pass and waiting for a free slot",
            queue_depth.clone(),
        );
        let hosts = Family::<PhaseLabel, Gauge>::default();
        register(
            &mut registry,
            &mut families,
            "tend_hosts",
            "gauge",
            "Hosts by phase of their status document",
            hosts.clone(),
        );
        let awaiting = Gauge::default();
        register(
            &mut registry,
            &mut families,
            "tend_hosts_awaiting_confirmation",
            "gauge",
            "Hosts whose destructive steps wait for a confirmation token",
            awaiting.clone(),
        );
        let tokens = Family::<ResultLabel, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "tend_tokens",
            "counter",
            "Confirmation token files judged: accepted (claimed for a run) or refused (meant for the operation, or unreadable, and not valid); each file once per result",
            tokens.clone(),
        );
        // Both series exist from the start, at 0.
        for r in [TokenResult::Accepted, TokenResult::Refused] {
            tokens.get_or_create_owned(&ResultLabel {
                result: r.as_str().into(),
            });
        }
        let drifted = Family::<HostLabel, Gauge>::default();
        register(
            &mut registry,
            &mut families,
            "tend_drifted_resources",
            "gauge",
            "Resources that differ from the desired state after the host's last pass (left uncorrected, or reported by drift policy), while its Drifted condition is True",
            drifted.clone(),
        );
        let rollout = Family::<StateLabel, Gauge>::default();
        register(
            &mut registry,
            &mut families,
            "tend_rollout_state",
            "gauge",
            "1 for the state of the current rollout (fleet.json), 0 for the others",
            rollout.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: version.into(),
                commit: commit.into(),
            })
            .set(1);
        register(
            &mut registry,
            &mut families,
            "tend_build_info",
            "gauge",
            "Always 1: the version and git commit of this build",
            build,
        );
        Metrics {
            registry,
            reconciles,
            changes,
            probe,
            apply,
            tokens,
            tokens_seen: Mutex::new(HashSet::new()),
            queue_depth,
            hosts,
            awaiting,
            drifted,
            rollout,
            render: Mutex::new(()),
            families,
        }
    }

    /// For this build (`tend version`'s version and commit).
    pub fn for_this_build() -> Metrics {
        Metrics::new(env!("CARGO_PKG_VERSION"), env!("TEND_GIT_COMMIT"))
    }

    /// A pass of `host` ended with this outcome.
    pub fn pass_ended(&self, host: &str, outcome: HostOutcomeKind) {
        self.reconciles
            .get_or_create(&HostOutcome {
                host: host.into(),
                outcome: word(&outcome),
            })
            .inc();
    }

    /// Changes a pass made on `host` (SPEC 8.7).
    pub fn changed(&self, host: &str, corrective: u32, intentional: u32) {
        for (kind, n) in [("corrective", corrective), ("intentional", intentional)] {
            let c = self.changes.get_or_create(&ChangeLabel {
                host: host.into(),
                kind: kind.into(),
            });
            c.inc_by(u64::from(n));
        }
    }

    pub fn probed(&self, host: &str, took: Duration) {
        self.probe
            .get_or_create(&HostLabel { host: host.into() })
            .observe(took.as_secs_f64());
    }

    pub fn applied(&self, host: &str, took: Duration) {
        self.apply
            .get_or_create(&HostLabel { host: host.into() })
            .observe(took.as_secs_f64());
    }

    /// A token file was judged; counted once per (file, result).
    pub fn token(&self, file: &str, result: TokenResult) {
        let fresh = self
            .tokens_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((file.to_string(), result));
        if fresh {
            self.tokens
                .get_or_create(&ResultLabel {
                    result: result.as_str().into(),
                })
                .inc();
        }
    }

    /// Every family as Prometheus text, the state gauges set from `view`.
    pub fn render(&self, view: &FleetView) -> String {
        let _one = self.render.lock().unwrap_or_else(PoisonError::into_inner);
        self.queue_depth
            .set(i64::try_from(view.queue_depth).unwrap_or(i64::MAX));
        for p in PHASES {
            let n = view.phases.get(&p).copied().unwrap_or(0);
            self.hosts
                .get_or_create(&PhaseLabel { phase: word(&p) })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.awaiting
            .set(i64::try_from(view.awaiting).unwrap_or(i64::MAX));
        // Hosts that left the inventory leave the family.
        self.drifted.clear();
        for (host, n) in &view.drifted {
            self.drifted
                .get_or_create(&HostLabel { host: host.clone() })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        for s in ROLLOUT_STATES {
            let on = view.rollout.as_deref() == Some(s);
            self.rollout
                .get_or_create(&StateLabel { state: s.into() })
                .set(i64::from(on));
        }
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            // Writing to a String cannot fail; say so rather than panic.
            out.clear();
            let _ = writeln!(out, "# the metrics could not be encoded");
        }
        for (name, kind, help) in &self.families {
            if !out.contains(&format!("# TYPE {name} ")) {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::report::{AwaitingConfirmation, Pending};

    fn status(host: &str, phase: Phase) -> HostStatus {
        let mut s = HostStatus::new(host, "2026-12-03T10:00:00.000Z");
        s.phase = phase;
        s
    }

    /// The value of the sample `line` starts with (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn changes_count_by_kind() {
        let m = Metrics::new("0.1.0", "abc123");
        m.changed("web-1", 2, 3);
        m.changed("web-1", 1, 0);
        let text = m.render(&FleetView::from_statuses([], None, 0));
        assert_eq!(
            sample(
                &text,
                "tend_changes_total{host=\"web-1\",kind=\"corrective\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                "tend_changes_total{host=\"web-1\",kind=\"intentional\"}"
            ),
            Some(3.0)
        );
    }

    #[test]
    fn every_family_is_rendered_even_before_anything_happened() {
        let m = Metrics::new("0.1.0", "abc123");
        let text = m.render(&FleetView::from_statuses([], None, 0));
        for family in [
            "tend_reconciles_total",
            "tend_changes_total",
            "tend_probe_duration_seconds",
            "tend_apply_duration_seconds",
            "tend_queue_depth",
            "tend_hosts",
            "tend_hosts_awaiting_confirmation",
            "tend_tokens_total",
            "tend_drifted_resources",
            "tend_rollout_state",
            "tend_build_info",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing:\n{text}"
            );
        }
        assert_eq!(
            sample(
                &text,
                "tend_build_info{version=\"0.1.0\",commit=\"abc123\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tend_tokens_total{result=\"accepted\"}"),
            Some(0.0)
        );
        assert_eq!(sample(&text, "tend_hosts{phase=\"Unknown\"}"), Some(0.0));
        assert_eq!(
            sample(&text, "tend_rollout_state{state=\"InProgress\"}"),
            Some(0.0)
        );
    }

    #[test]
    fn passes_probes_and_applies_are_counted_per_host() {
        let m = Metrics::new("0.1.0", "c");
        m.pass_ended("web-1", HostOutcomeKind::Completed);
        m.pass_ended("web-1", HostOutcomeKind::Completed);
        m.pass_ended("web-1", HostOutcomeKind::NoChange);
        m.pass_ended("db-1", HostOutcomeKind::EscalationRequired);
        m.probed("web-1", Duration::from_millis(30));
        m.applied("web-1", Duration::from_secs(2));
        let text = m.render(&FleetView::default());
        let r = |h: &str, o: &str| {
            sample(
                &text,
                &format!("tend_reconciles_total{{host=\"{h}\",outcome=\"{o}\"}}"),
            )
        };
        assert_eq!(r("web-1", "Completed"), Some(2.0));
        assert_eq!(r("web-1", "NoChange"), Some(1.0));
        assert_eq!(r("db-1", "EscalationRequired"), Some(1.0));
        assert_eq!(
            sample(
                &text,
                "tend_probe_duration_seconds_bucket{host=\"web-1\",le=\"0.05\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "tend_probe_duration_seconds_count{host=\"web-1\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "tend_apply_duration_seconds_bucket{host=\"web-1\",le=\"1\"}"
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "tend_apply_duration_seconds_sum{host=\"web-1\"}"),
            Some(2.0)
        );
    }

    #[test]
    fn a_token_file_counts_once_per_result() {
        let m = Metrics::new("0.1.0", "c");
        for _ in 0..3 {
            m.token("confirm/t.yaml", TokenResult::Refused);
        }
        m.token("confirm/t.yaml", TokenResult::Accepted);
        m.token("confirm/u.yaml", TokenResult::Accepted);
        let text = m.render(&FleetView::default());
        assert_eq!(
            sample(&text, "tend_tokens_total{result=\"refused\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tend_tokens_total{result=\"accepted\"}"),
            Some(2.0)
        );
    }

    #[test]
    fn state_gauges_mirror_the_status_documents() {
        let mut a = status("a", Phase::Ready);
        a.pending = Pending {
            create: 1,
            update: 2,
            delete: 1,
            destructive: 1,
            restarts: vec![],
        };
        a.set_condition(
            ConditionType::Drifted,
            ConditionStatus::True,
            "DriftDetected",
            "4 resource(s) differ",
            "2026-12-03T10:00:00.000Z",
        );
        a.awaiting_confirmation = Some(AwaitingConfirmation {
            operation: "op".into(),
            hosts: vec!["a".into()],
            steps: vec![],
            token_file: "confirm/op.yaml".into(),
            command: "tend confirm op --reason TEXT".into(),
        });
        let mut b = status("b", Phase::Ready);
        // Pending without Drifted=True (a new desired definition): not drift.
        b.pending.create = 3;
        let c = status("c", Phase::Running);
        let rollout = RolloutStatus {
            revision: "r".into(),
            state: "Halted".into(),
            wave: 1,
            waves: 2,
            failed_hosts: vec![],
            budget: 0,
            halted_reason: None,
        };
        let view = FleetView::from_statuses([&a, &b, &c], Some(&rollout), 4);
        let m = Metrics::new("0.1.0", "c");
        let text = m.render(&view);
        assert_eq!(sample(&text, "tend_hosts{phase=\"Ready\"}"), Some(2.0));
        assert_eq!(sample(&text, "tend_hosts{phase=\"Running\"}"), Some(1.0));
        assert_eq!(sample(&text, "tend_hosts{phase=\"Unknown\"}"), Some(0.0));
        assert_eq!(sample(&text, "tend_hosts_awaiting_confirmation"), Some(1.0));
        assert_eq!(sample(&text, "tend_queue_depth"), Some(4.0));
        assert_eq!(
            sample(&text, "tend_drifted_resources{host=\"a\"}"),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, "tend_drifted_resources{host=\"b\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "tend_rollout_state{state=\"Halted\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tend_rollout_state{state=\"InProgress\"}"),
            Some(0.0)
        );
        // A host gone from the next view leaves the family.
        let text = m.render(&FleetView::from_statuses([&c], None, 0));
        assert_eq!(sample(&text, "tend_drifted_resources{host=\"a\"}"), None);
        assert_eq!(
            sample(&text, "tend_rollout_state{state=\"Halted\"}"),
            Some(0.0)
        );
    }
}
