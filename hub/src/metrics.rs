//! The hub's Prometheus metrics (`--metrics-listen`, `/metrics`). Counters and histograms are counted where
//! things happen; the fleet's gauges are computed from the current snapshot at each scrape, so they are never
//! stale and cost nothing between scrapes.
//!
//! Label cardinality is bounded by the fleet's shape, never by its size: `app` (the apps in the repository),
//! `wave` (each app's waves), and closed sets (`state`, `health`, `phase`, `outcome`, `result`). No metric has a
//! cluster label. The list, with meanings, is in docs/observability.md.

use crate::machine::State;
use crate::sessions::Sessions;
use flotilla_common::rollout::{ClusterOutcome, RolloutPhase, WavePhase};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;
type GaugeF = Gauge<f64, AtomicU64>;

pub struct HubMetrics {
    registry: Registry,
    pub sessions_opened: Counter,
    pub sessions_closed: Counter,
    pub sessions_refused: Family<Labels, Counter>,
    pub reports: Counter,
    pub git_fetches: Family<Labels, Counter>,
    pub git_last_success: GaugeF,
    pub render_seconds: Histogram,
    pub commit_renders: Histogram,
    pub renders: Family<Labels, Counter>,
    pub store_commit_seconds: Histogram,
    pub store_commit_bytes: Histogram,
    pub store_commit_failures: Counter,
    pub controls: Family<Labels, Counter>,
    pub audit_refusals_coalesced: Counter,
    // From the snapshot, at each scrape.
    agents_connected: Gauge,
    clusters: Gauge,
    cluster_apps: Family<Labels, Gauge>,
    cluster_app_health: Family<Labels, Gauge>,
    drift_items: Family<Labels, Gauge>,
    rollouts: Family<Labels, Gauge>,
    waves: Family<Labels, Gauge>,
    wave_clusters: Family<Labels, Gauge>,
    wave_released: Family<Labels, GaugeF>,
    leader: Gauge,
    git_failing: Gauge,
    problems: Gauge,
}

fn family<M: Default + prometheus_client::metrics::TypedMetric + prometheus_client::encoding::EncodeMetric>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, M>
where
    Family<Labels, M>: prometheus_client::registry::Metric,
{
    let f = Family::<Labels, M>::default();
    registry.register(name, help, f.clone());
    f
}

impl Default for HubMetrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("flotilla_hub");
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let histogram = |r: &mut Registry, name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::new(buckets);
            r.register(name, help, h.clone());
            h
        };
        let seconds = || exponential_buckets(0.001, 2.0, 18).collect::<Vec<f64>>();
        let sessions_opened = counter(&mut r, "sessions_opened", "Agent sessions opened");
        let sessions_closed = counter(&mut r, "sessions_closed", "Agent sessions ended");
        let sessions_refused = family(&mut r, "sessions_refused", "Agent sessions refused, by reason");
        let reports = counter(&mut r, "reports", "Status reports received from agents");
        let git_fetches =
            family(&mut r, "git_fetches", "Fetches of the fleet repository, by result (new, current, failed)");
        let git_last_success = GaugeF::default();
        r.register(
            "git_last_success_timestamp_seconds",
            "When a fetch of the fleet repository last succeeded (Unix seconds)",
            git_last_success.clone(),
        );
        let render_seconds =
            histogram(&mut r, "render_duration_seconds", "Time to parse and render one commit of the fleet", seconds());
        let commit_renders = histogram(
            &mut r,
            "commit_renders",
            "Distinct renders one commit needed (reused ones included)",
            exponential_buckets(1.0, 4.0, 10).collect(),
        );
        let renders = family(
            &mut r,
            "renders",
            "Distinct renders, by kind (rendered: run now; reused: from the previous commit)",
        );
        let store_commit_seconds =
            histogram(&mut r, "store_commit_duration_seconds", "Time to commit one batch to the store", seconds());
        let store_commit_bytes = histogram(
            &mut r,
            "store_commit_bytes",
            "Bytes of keys and values written by one store batch",
            exponential_buckets(256.0, 4.0, 12).collect(),
        );
        let store_commit_failures =
            counter(&mut r, "store_commit_failures", "Store batches that failed (nothing changed)");
        let controls = family(&mut r, "rollout_controls", "Rollout controls by action and result (ok, refused)");
        let audit_refusals_coalesced = counter(
            &mut r,
            "audit_refusals_coalesced",
            "Refused platform calls not recorded again: the same refusal was recorded within 10 s",
        );
        let agents_connected = gauge(&mut r, "agents_connected", "Agents with a live session on this hub");
        let clusters = gauge(&mut r, "clusters", "Clusters in the inventory");
        let cluster_apps = family(
            &mut r,
            "cluster_apps",
            "Apps on clusters by app and state (in sync, applying, held back, failed, broken, adopted, not reported)",
        );
        let cluster_app_health = family(&mut r, "cluster_app_health", "Apps on clusters by app and reported health");
        let drift_items = family(
            &mut r,
            "drift_items",
            "Objects that drifted from their desired state, by app, summed over clusters",
        );
        let rollouts = family(&mut r, "rollouts", "Rollouts by phase");
        let waves = family(&mut r, "rollout_waves", "Waves of each app's current rollout by phase");
        let wave_clusters =
            family(&mut r, "rollout_wave_clusters", "Clusters of each wave of each app's current rollout by outcome");
        let wave_released = family(
            &mut r,
            "rollout_wave_released_timestamp_seconds",
            "When a progressing wave first released a cluster (Unix seconds): with time(), how long it has run",
        );
        let leader = gauge(&mut r, "leader", "1 when this hub leads (follows Git, steps rollouts), 0 on a standby");
        let git_failing = gauge(
            &mut r,
            "git_failing",
            "1 while following the fleet repository fails (the last good state is served)",
        );
        let problems =
            gauge(&mut r, "problems", "Problems of the current commit (broken files, apps that cannot be rendered)");
        // Counters of closed label sets start at zero, so rate() and increase() see their first event.
        for reason in ["not_ready", "behind", "rate", "revoked", "not_admitted"] {
            let _ = sessions_refused.get_or_create(&label("reason", reason));
        }
        for result in ["new", "current", "failed"] {
            let _ = git_fetches.get_or_create(&label("result", result));
        }
        for kind in ["rendered", "reused"] {
            let _ = renders.get_or_create(&label("kind", kind));
        }
        for action in ["pause", "resume", "approve", "abort", "retry", "rollback"] {
            for result in ["ok", "refused"] {
                let _ = controls.get_or_create(&vec![("action", action.to_string()), ("result", result.to_string())]);
            }
        }
        HubMetrics {
            registry: r,
            sessions_opened,
            sessions_closed,
            sessions_refused,
            reports,
            git_fetches,
            git_last_success,
            render_seconds,
            commit_renders,
            renders,
            store_commit_seconds,
            store_commit_bytes,
            store_commit_failures,
            controls,
            audit_refusals_coalesced,
            agents_connected,
            clusters,
            cluster_apps,
            cluster_app_health,
            drift_items,
            rollouts,
            waves,
            wave_clusters,
            wave_released,
            leader,
            git_failing,
            problems,
        }
    }
}

pub fn label(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

fn phase_name(p: &RolloutPhase) -> &'static str {
    match p {
        RolloutPhase::Progressing => "progressing",
        RolloutPhase::Paused => "paused",
        RolloutPhase::Complete => "complete",
        RolloutPhase::Failed(_) => "failed",
        RolloutPhase::RolledBack(_) => "rolled_back",
        RolloutPhase::Aborted(_) => "aborted",
        RolloutPhase::Superseded(_) => "superseded",
    }
}

fn wave_phase_name(p: &WavePhase) -> &'static str {
    match p {
        WavePhase::Pending => "pending",
        WavePhase::AwaitingApproval => "awaiting_approval",
        WavePhase::Progressing => "progressing",
        WavePhase::Baking { .. } => "baking",
        WavePhase::Passed => "passed",
        WavePhase::Failed(_) => "failed",
    }
}

fn outcome_name(o: &ClusterOutcome) -> &'static str {
    match o {
        ClusterOutcome::Pending => "pending",
        ClusterOutcome::Updating => "updating",
        ClusterOutcome::Healthy => "healthy",
        ClusterOutcome::Failed(_) => "failed",
        ClusterOutcome::Skipped => "skipped",
        ClusterOutcome::RolledBack => "rolled_back",
    }
}

impl HubMetrics {
    /// The text exposition, with the fleet's gauges computed from `state` now.
    pub fn encode(&self, state: &State, sessions: &Sessions, leading: bool) -> String {
        self.agents_connected.set(sessions.present().len() as i64);
        self.clusters.set(state.clusters.len() as i64);
        self.leader.set(leading as i64);
        self.git_failing.set(state.source_error.is_some() as i64);
        self.problems.set(state.problems.len() as i64);
        // Counted first, then set, so a scrape never sees a family half filled.
        let mut apps: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        let mut health: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut drift: BTreeMap<String, i64> = BTreeMap::new();
        for name in state.clusters.keys() {
            for a in crate::platform::apps_on(state, name) {
                *apps.entry((a.app.to_string(), a.state.label())).or_default() += 1;
                if let Some(st) = a.applied {
                    *health.entry((a.app.to_string(), flotilla_proto::health_label(st.health))).or_default() += 1;
                    *drift.entry(a.app.to_string()).or_default() += st.drifted as i64;
                }
            }
        }
        self.cluster_apps.clear();
        for ((app, s), n) in apps {
            self.cluster_apps.get_or_create(&vec![("app", app), ("state", s.to_string())]).set(n);
        }
        self.cluster_app_health.clear();
        for ((app, h), n) in health {
            self.cluster_app_health.get_or_create(&vec![("app", app), ("health", h)]).set(n);
        }
        self.drift_items.clear();
        for (app, n) in drift {
            self.drift_items.get_or_create(&label("app", app)).set(n);
        }
        let mut phases: BTreeMap<&'static str, i64> = BTreeMap::new();
        self.waves.clear();
        self.wave_clusters.clear();
        self.wave_released.clear();
        for (app, rec) in &state.rollouts {
            let Some(ro) = &rec.rollout else { continue };
            *phases.entry(phase_name(&ro.phase)).or_default() += 1;
            let mut by_phase: BTreeMap<&'static str, i64> = BTreeMap::new();
            for w in &ro.waves {
                *by_phase.entry(wave_phase_name(&w.phase)).or_default() += 1;
                let mut outcomes: BTreeMap<&'static str, i64> = BTreeMap::new();
                for c in &w.clusters {
                    *outcomes.entry(outcome_name(&c.outcome)).or_default() += 1;
                }
                for (o, n) in outcomes {
                    let l = vec![("app", app.clone()), ("wave", w.spec.name.clone()), ("outcome", o.to_string())];
                    self.wave_clusters.get_or_create(&l).set(n);
                }
                if matches!(w.phase, WavePhase::Progressing) && ro.phase == RolloutPhase::Progressing {
                    if let Some(first) = w.clusters.iter().filter_map(|c| c.released_ms).min() {
                        let l = vec![("app", app.clone()), ("wave", w.spec.name.clone())];
                        self.wave_released.get_or_create(&l).set(first as f64 / 1000.0);
                    }
                }
            }
            for (p, n) in by_phase {
                self.waves.get_or_create(&vec![("app", app.clone()), ("phase", p.to_string())]).set(n);
            }
        }
        self.rollouts.clear();
        for (p, n) in phases {
            self.rollouts.get_or_create(&label("phase", p)).set(n);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_closed_label_sets_start_at_zero_and_the_exposition_is_openmetrics() {
        let m = HubMetrics::default();
        let text = m.encode(&State::default(), &Sessions::default(), true);
        for family in [
            "rollout_controls counter",
            "sessions_refused counter",
            "git_fetches counter",
            "store_commit_duration_seconds histogram",
        ] {
            assert!(text.contains(&format!("# TYPE flotilla_hub_{family}")), "{family}:\n{text}");
        }
        assert!(text.contains("flotilla_hub_leader 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
