//! What the agent says about itself: Prometheus metrics (`--metrics-listen`, `/metrics`) and the spans of a
//! commit's trace for each app it receives (`apply`: from the desired state's arrival until every object is
//! applied; `healthy`: from then until the app is healthy), children of the hub's `send` span named by the
//! desired state's `traceparent`.
//!
//! One agent per process: the metrics are the process's. Labels are bounded: `app` (the apps sent to this
//! cluster), `kind` (at most [`KINDS`] distinct kinds, the rest counted as `other`), `code` (HTTP status codes
//! and a closed set of failures without one), `phase` and `health` (closed sets).

use flotilla_common::telemetry as otel;
use flotilla_proto::agent::v1 as pb;
use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry::{Context, KeyValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::SystemTime;

type Labels = Vec<(&'static str, String)>;

/// Distinct `kind` label values; further kinds are counted as `other`.
pub const KINDS: usize = 64;

pub struct AgentMetrics {
    registry: Registry,
    pub connected: Gauge,
    pub sessions: Counter,
    pub session_failures: Counter,
    pub renewals: Counter,
    pub desired_states: Counter,
    pub reports_sent: Counter,
    pub apply_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub api_errors: Family<Labels, Counter>,
    pub pruned: Counter,
    pub api_reachable: Gauge,
    apps: Family<Labels, Gauge>,
    drift_items: Family<Labels, Gauge>,
    kinds: Mutex<std::collections::BTreeSet<String>>,
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("flotilla_agent");
        let connected = Gauge::default();
        r.register("connected", "1 while the agent has a session with a hub", connected.clone());
        let sessions = Counter::default();
        r.register("sessions", "Sessions opened with a hub", sessions.clone());
        let session_failures = Counter::default();
        r.register("session_failures", "Sessions that failed or could not be opened", session_failures.clone());
        let renewals = Counter::default();
        r.register("certificate_renewals", "Certificates renewed over a live session", renewals.clone());
        let desired_states = Counter::default();
        r.register("desired_states", "Desired states received from the hub", desired_states.clone());
        let reports_sent = Counter::default();
        r.register("reports_sent", "Status reports sent to the hub", reports_sent.clone());
        let apply_seconds: Family<Labels, Histogram, fn() -> Histogram> = Family::new_with_constructor(seconds);
        r.register("apply_duration_seconds", "Server-side apply of one object, by kind", apply_seconds.clone());
        let api_errors = Family::<Labels, Counter>::default();
        r.register(
            "api_errors",
            "Failed calls to the cluster's API server, by HTTP code or failure",
            api_errors.clone(),
        );
        let pruned = Counter::default();
        r.register("pruned", "Objects deleted because they left the desired state", pruned.clone());
        let api_reachable = Gauge::default();
        r.register("api_reachable", "1 while the cluster's API server answers", api_reachable.clone());
        let apps = Family::<Labels, Gauge>::default();
        r.register("apps", "Apps by phase and health", apps.clone());
        let drift_items = Family::<Labels, Gauge>::default();
        r.register("drift_items", "Objects that drifted from their desired state, by app", drift_items.clone());
        // Failures without an HTTP code start at zero (codes appear as the API server answers them).
        for code in ["timeout", "unreachable"] {
            let _ = api_errors.get_or_create(&vec![("code", code.to_string())]);
        }
        AgentMetrics {
            registry: r,
            connected,
            sessions,
            session_failures,
            renewals,
            desired_states,
            reports_sent,
            apply_seconds,
            api_errors,
            pruned,
            api_reachable,
            apps,
            drift_items,
            kinds: Mutex::default(),
        }
    }
}

pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::default);

impl AgentMetrics {
    /// The `kind` label of an object ("Deployment shop/web" → "Deployment"), bounded.
    pub fn kind_label(&self, object: &str) -> String {
        let kind = object.split_whitespace().next().unwrap_or("").to_string();
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if kinds.contains(&kind) || kinds.len() < KINDS && kinds.insert(kind.clone()) {
            kind
        } else {
            "other".into()
        }
    }

    /// The apps' gauges from the statuses the engine published.
    pub fn set_statuses(&self, statuses: &BTreeMap<String, pb::AppStatus>) {
        let mut by: BTreeMap<(String, String), i64> = BTreeMap::new();
        self.drift_items.clear();
        for s in statuses.values() {
            let key = (flotilla_proto::phase_label(s.phase), flotilla_proto::health_label(s.health));
            *by.entry(key).or_default() += 1;
            self.drift_items.get_or_create(&vec![("app", s.app.clone())]).set(s.drifted as i64);
        }
        self.apps.clear();
        for ((phase, health), n) in by {
            self.apps.get_or_create(&vec![("phase", phase), ("health", health)]).set(n);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The cluster this agent serves (span attributes), set once at start.
pub static CLUSTER: OnceLock<String> = OnceLock::new();

/// The spans of one app's new digest on this cluster.
#[derive(Debug)]
pub struct AppTrace {
    apply: Option<Context>,
    healthy: Option<Context>,
    attrs: Vec<KeyValue>,
}

impl AppTrace {
    /// Starts `apply` under the hub's span (None when the desired state carried no sampled trace context).
    pub fn start(traceparent: &str, app: &str, digest: &str, revision: &str) -> Option<AppTrace> {
        let parent = otel::from_traceparent(traceparent);
        if !parent.span().span_context().is_sampled() {
            return None;
        }
        let attrs = vec![
            KeyValue::new("flotilla.cluster", CLUSTER.get().cloned().unwrap_or_default()),
            KeyValue::new("flotilla.app", app.to_string()),
            KeyValue::new("flotilla.digest", digest.to_string()),
            KeyValue::new("flotilla.revision", revision.to_string()),
        ];
        let apply = otel::start("apply", &parent, SystemTime::now(), attrs.clone());
        otel::recording(&apply).then_some(AppTrace { apply: Some(apply), healthy: None, attrs })
    }

    /// Makes the current span's context current (log lines written meanwhile carry its trace and span ids);
    /// hold the guard across no await.
    pub fn attach(&self) -> Option<opentelemetry::ContextGuard> {
        self.apply.as_ref().or(self.healthy.as_ref()).map(|cx| cx.clone().attach())
    }

    /// Moves the spans along with the app's status; true once the trace has nothing left to record.
    pub fn observe(&mut self, s: &pb::AppStatus) -> bool {
        let now = SystemTime::now();
        if s.phase == pb::Phase::Failed as i32 {
            if let Some(cx) = self.apply.take().or_else(|| self.healthy.take()) {
                cx.span().set_status(Status::error(s.message.clone()));
                cx.span().end_with_timestamp(now);
            }
            return true;
        }
        if s.phase == pb::Phase::Applied as i32 {
            if let Some(cx) = self.apply.take() {
                cx.span().set_attribute(KeyValue::new("flotilla.objects", s.objects as i64));
                cx.span().set_status(Status::Ok);
                cx.span().end_with_timestamp(now);
                self.healthy = Some(otel::start("healthy", &cx, now, self.attrs.clone()));
            }
            if s.health == pb::Health::Healthy as i32 {
                if let Some(cx) = self.healthy.take() {
                    cx.span().set_status(Status::Ok);
                    cx.span().end_with_timestamp(now);
                }
                return true;
            }
            if s.health == pb::Health::Degraded as i32 {
                if let Some(cx) = &self.healthy {
                    cx.span().add_event("degraded", vec![KeyValue::new("reason", s.health_reason.clone())]);
                }
            }
        }
        false
    }
}

impl Drop for AppTrace {
    /// A digest replaced before it was healthy: its spans end, saying so.
    fn drop(&mut self) {
        for cx in [self.apply.take(), self.healthy.take()].into_iter().flatten() {
            cx.span().set_status(Status::error("replaced before it was healthy"));
            cx.span().end();
        }
    }
}
