//! One trace per commit (with `--otlp-endpoint`): `commit` (from the fetch that found it until the writer
//! stored its state) with `fetch`, `parse`, `render` (and one span per distinct render, the first
//! [`RENDER_SPANS`]), and `gate` (the writer's transition and store commit); then, as the rollout goes on,
//! one `wave` span per wave (from its release until it passes or fails) and one `send` span per cluster and
//! app the hub sends the commit's bundle to. The `send` span's W3C `traceparent` travels in the desired-state
//! message (`DesiredApp.traceparent`), so the agent's `apply` and `healthy` spans join the trace, across
//! reconnects (each new session sends again, under the same commit).
//!
//! At 10,000 clusters a trace keeps the commit's own spans and every wave, but the per-cluster spans of at
//! most `cluster_spans` clusters per commit (the first ones sent to, by default 100): the others are sent an
//! unsampled `traceparent` of the same trace, so their agents record nothing, and their log lines still carry
//! the commit's trace id. The hub keeps the contexts of the last [`COMMITS`] commits in memory only: after a
//! restart, sends of older commits carry no trace context.

use crate::machine::State;
use flotilla_common::rollout::{RolloutPhase, WavePhase};
use flotilla_common::telemetry as otel;
use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry::{Context, KeyValue};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

/// Commits whose trace context the hub keeps.
pub const COMMITS: usize = 32;
/// Spans of distinct renders per commit.
pub const RENDER_SPANS: usize = flotilla_common::fleet::render::RENDER_SPANS;
/// Clusters per commit whose send (and agent) spans are recorded, unless configured.
pub const CLUSTER_SPANS: usize = 100;

struct CommitTrace {
    revision: String,
    cx: Context,
    /// Clusters whose spans this commit's trace records.
    sampled: HashSet<String>,
}

pub struct Traces {
    enabled: bool,
    cluster_spans: usize,
    commits: Mutex<VecDeque<CommitTrace>>,
    /// Open wave spans: (app, revision, wave index) → its context.
    waves: Mutex<HashMap<(String, String, usize), Context>>,
}

impl Traces {
    pub fn new(enabled: bool, cluster_spans: usize) -> Traces {
        Traces { enabled, cluster_spans, commits: Mutex::default(), waves: Mutex::default() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Starts the trace of a new commit at the start of the fetch that found it; records the fetch.
    pub fn begin_commit(&self, revision: &str, fetch_started: SystemTime) -> Context {
        if !self.enabled {
            return Context::new();
        }
        let attrs = vec![KeyValue::new("flotilla.revision", revision.to_string())];
        let cx = otel::start("commit", &Context::new(), fetch_started, attrs.clone());
        otel::record("fetch", &cx, fetch_started, SystemTime::now(), attrs);
        let mut commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        commits.retain(|c| c.revision != revision);
        commits.push_back(CommitTrace { revision: revision.to_string(), cx: cx.clone(), sampled: HashSet::new() });
        while commits.len() > COMMITS {
            commits.pop_front();
        }
        cx
    }

    fn commit(&self, revision: &str) -> Option<Context> {
        let commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        commits.iter().find(|c| c.revision == revision).map(|c| c.cx.clone())
    }

    /// Opens and closes wave spans as a transition moved rollouts along.
    pub fn rollouts_changed(&self, prev: &State, next: &State) {
        if !self.enabled {
            return;
        }
        let now = SystemTime::now();
        let mut waves = self.waves.lock().unwrap_or_else(|p| p.into_inner());
        for (app, rec) in &next.rollouts {
            if prev.rollouts.get(app).is_some_and(|p| std::sync::Arc::ptr_eq(p, rec)) {
                continue;
            }
            let Some(ro) = &rec.rollout else { continue };
            let before = prev.rollouts.get(app).and_then(|r| r.rollout.as_ref()).filter(|p| p.revision == ro.revision);
            let over = !matches!(ro.phase, RolloutPhase::Progressing | RolloutPhase::Paused);
            for (i, w) in ro.waves.iter().enumerate() {
                let key = (app.clone(), ro.revision.clone(), i);
                let was = before.and_then(|b| b.waves.get(i)).map(|w| &w.phase);
                let running = matches!(w.phase, WavePhase::Progressing | WavePhase::Baking { .. });
                let ran = matches!(was, Some(WavePhase::Progressing | WavePhase::Baking { .. }));
                if running && !ran && !waves.contains_key(&key) {
                    let Some(parent) = self.commit(&ro.revision) else { continue };
                    let attrs = vec![
                        KeyValue::new("flotilla.app", app.clone()),
                        KeyValue::new("flotilla.revision", ro.revision.clone()),
                        KeyValue::new("flotilla.wave", w.spec.name.clone()),
                        KeyValue::new("flotilla.wave_index", i as i64),
                        KeyValue::new("flotilla.clusters", w.clusters.len() as i64),
                        KeyValue::new("flotilla.approved_by", w.approved_by.clone().unwrap_or_default()),
                    ];
                    waves.insert(key.clone(), otel::start("wave", &parent, now, attrs));
                }
                let done = matches!(w.phase, WavePhase::Passed | WavePhase::Failed(_)) || over;
                if done {
                    if let Some(cx) = waves.remove(&key) {
                        let span = cx.span();
                        match &w.phase {
                            WavePhase::Failed(why) => span.set_status(Status::error(why.clone())),
                            _ if over && ro.phase != RolloutPhase::Complete => {
                                span.set_status(Status::error(format!("the rollout is {}", ro.phase)))
                            }
                            _ => span.set_status(Status::Ok),
                        }
                        span.end_with_timestamp(now);
                    }
                }
            }
        }
        // Rollouts replaced by a newer one, or gone: their open waves end.
        waves.retain(|(app, revision, _), cx| {
            let current =
                next.rollouts.get(app).and_then(|r| r.rollout.as_ref()).is_some_and(|ro| &ro.revision == revision);
            if !current {
                cx.span().set_status(Status::error("superseded"));
                cx.span().end_with_timestamp(now);
            }
            current
        });
    }

    /// The `traceparent` to send with `app`'s bundle at `revision` to `cluster` (empty when untraced),
    /// recording a `send` span when this commit records the cluster's spans.
    pub fn sending(&self, state: &State, cluster: &str, app: &str, digest: &str, revision: &str) -> String {
        if !self.enabled {
            return String::new();
        }
        // The wave the cluster is in, when the app's rollout is of this revision (waves list clusters by name).
        let wave = state
            .rollouts
            .get(app)
            .and_then(|r| r.rollout.as_ref())
            .filter(|ro| ro.revision == revision)
            .and_then(|ro| {
                ro.waves.iter().enumerate().find_map(|(i, w)| {
                    w.clusters.binary_search_by(|c| c.name.as_str().cmp(cluster)).ok().map(|_| (i, w.spec.name.clone()))
                })
            });
        let parent = wave
            .as_ref()
            .and_then(|(i, _)| {
                let waves = self.waves.lock().unwrap_or_else(|p| p.into_inner());
                waves.get(&(app.to_string(), revision.to_string(), *i)).cloned()
            })
            .or_else(|| self.commit(revision));
        let Some(parent) = parent else { return String::new() };
        let record = {
            let mut commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
            match commits.iter_mut().find(|c| c.revision == revision) {
                Some(c) if c.sampled.contains(cluster) => true,
                Some(c) if c.sampled.len() < self.cluster_spans => c.sampled.insert(cluster.to_string()),
                _ => false,
            }
        };
        if !record {
            return otel::traceparent_unsampled(&parent);
        }
        let now = SystemTime::now();
        let attrs = vec![
            KeyValue::new("flotilla.cluster", cluster.to_string()),
            KeyValue::new("flotilla.app", app.to_string()),
            KeyValue::new("flotilla.digest", digest.to_string()),
            KeyValue::new("flotilla.revision", revision.to_string()),
            KeyValue::new("flotilla.wave", wave.map(|(_, n)| n).unwrap_or_default()),
        ];
        let cx = otel::start("send", &parent, now, attrs);
        let tp = otel::traceparent(&cx);
        cx.span().end_with_timestamp(now);
        tp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_records_the_spans_of_a_bounded_number_of_clusters_and_keeps_them_sampled_across_resends() {
        // A provider that samples everything and exports nothing: spans get real, sampled ids.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        opentelemetry::global::set_tracer_provider(provider);
        let traces = Traces::new(true, 100);
        let commit = traces.begin_commit("r1", SystemTime::now());
        let trace = otel::trace_id(&commit);
        assert_eq!(trace.len(), 32);
        let state = State::default();
        let sent: Vec<String> =
            (0..150).map(|i| traces.sending(&state, &format!("c-{i:03}"), "shop", "sha256:x", "r1")).collect();
        let sampled = |tp: &str| tp.ends_with("-01");
        assert!(
            sent.iter().all(|tp| tp.starts_with(&format!("00-{trace}-"))),
            "every cluster is sent the commit's trace"
        );
        assert_eq!(sent.iter().filter(|tp| sampled(tp)).count(), 100, "at most 100 clusters' spans are recorded");
        assert!(sent[..100].iter().all(|tp| sampled(tp)) && sent[100..].iter().all(|tp| !sampled(tp)));
        // A reconnect sends again: the clusters recorded stay recorded, the others stay quiet.
        assert!(sampled(&traces.sending(&state, "c-007", "shop", "sha256:x", "r1")));
        assert!(!sampled(&traces.sending(&state, "c-140", "shop", "sha256:x", "r1")));
        // A commit the hub did not trace (before its start) sends no context; nor does a hub without traces.
        assert_eq!(traces.sending(&state, "c-001", "shop", "sha256:y", "r0"), "");
        assert_eq!(Traces::new(false, 100).sending(&state, "c-001", "shop", "sha256:x", "r1"), "");
    }

    #[test]
    fn only_the_last_commits_are_kept() {
        let traces = Traces::new(true, 1);
        for i in 0..COMMITS + 5 {
            traces.begin_commit(&format!("r{i}"), SystemTime::now());
        }
        assert!(traces.commit("r0").is_none() && traces.commit(&format!("r{}", COMMITS + 4)).is_some());
        assert_eq!(traces.commits.lock().unwrap().len(), COMMITS);
    }
}
