//! Rollouts in the hub, free of I/O: a new commit's desired state is held back per cluster until the app's
//! rollout releases it (the planner, `flotilla_common::rollout`, decides); releases, reverts and controls
//! change the desired state the sessions stream. The hub's state machine persists [`Record`]s and the desired
//! state in one store batch after every change, so a restarted hub resumes exactly where it was.
//!
//! Rules (docs/rollouts.md):
//! - a rollout is an app moving to a set of rendered bundles, one per cluster: it is keyed by content, not by
//!   commit. A commit that does not change the app's rendered content leaves its rollout exactly as it is
//!   (running, waiting for approval, baking, failed or rolled back);
//! - an app without waves (no rollout.yaml, no `rollout:`) goes everywhere at once, as before;
//! - a commit that changes an app's content on some clusters starts a rollout of that content; a running
//!   rollout of the app is superseded: clusters it released keep what they got, the others wait for the new
//!   rollout, so no cluster moves backwards except by a rollback;
//! - content that failed, was aborted or was rolled back is not rolled out again by a commit that leaves it
//!   unchanged; `retry` starts it again;
//! - a cluster the hub has no record of keeps what its agent runs while it waits ([`DesiredApp::adopted`]);
//! - a broken rollout.yaml blocks new rollouts (clusters keep their desired state, the app shows why) and
//!   leaves running ones alone;
//! - a cluster that leaves the fleet, or stops being targeted, leaves the rollout (it is not waited for);
//! - a rollback only targets a revision the hub rendered for the app.

use crate::state::{Desired, DesiredApp};
use flotilla_common::fleet::Fleet;
use flotilla_common::rollout::{self, Action, Observation, Rollout, RolloutPhase, RolloutSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Events kept per app.
const TIMELINE: usize = 200;
/// Revisions kept per app for rollbacks.
const HISTORY: usize = 5;

/// cluster → the app's desired state there.
pub type PerCluster = BTreeMap<String, DesiredApp>;

/// Changes of one app's desired state: cluster → the new value (`None`: the app leaves the cluster).
pub type Changes = Vec<(String, Option<DesiredApp>)>;

/// One app's rollout state. Stored in two parts (see [`Record::progress_json`] and [`Record::data_json`]),
/// never whole; the bulky part is shared between snapshots of the hub's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub rollout: Option<Rollout>,
    pub timeline: VecDeque<String>,
    /// Why the newest commit could not start a rollout.
    pub blocked: Option<String>,
    /// The revision of the newest commit that left this app's content unchanged, when newer than the rollout's.
    pub noted: Option<String>,
    pub data: Arc<RecordData>,
}

/// The per-cluster part of a [`Record`]: written only when a rollout starts, completes or is controlled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordData {
    /// The app at the rollout's content, per cluster.
    #[serde(default)]
    pub candidates: PerCluster,
    /// The app before the rollout, per cluster (absent: the cluster did not have it).
    #[serde(default)]
    pub before: PerCluster,
    /// The app at the last revision whose rollout completed.
    #[serde(default)]
    pub good: Option<(String, PerCluster)>,
    /// Revisions rendered for the app, newest last, for rollbacks.
    #[serde(default)]
    pub history: Vec<(String, PerCluster)>,
    /// Content an operator rolled back from: a commit that leaves it unchanged does not roll it out again.
    #[serde(default)]
    pub rejected: Option<(String, PerCluster)>,
}

/// Clusters sharing one value of a per-cluster map: a rollout's clusters mostly share one bundle, so 10,000 of
/// them take a list of names (about 100 KB) instead of 10,000 copies of the value (about 2 MB).
pub(crate) type Groups = Vec<(DesiredApp, Vec<String>)>;

pub(crate) fn group<'a>(p: impl IntoIterator<Item = (&'a String, &'a DesiredApp)>) -> Groups {
    let mut out: Groups = Vec::new();
    for (c, d) in p {
        match out.iter_mut().find(|(v, _)| v == d) {
            Some((_, clusters)) => clusters.push(c.clone()),
            None => out.push((d.clone(), vec![c.clone()])),
        }
    }
    out
}

pub(crate) fn ungroup(g: Groups) -> PerCluster {
    g.into_iter().flat_map(|(d, clusters)| clusters.into_iter().map(move |c| (c, d.clone()))).collect()
}

/// How [`RecordData`] is stored: every per-cluster map as [`Groups`].
#[derive(Serialize, Deserialize)]
struct StoredData {
    /// The format (2); records written before it are plain maps ([`AnyData::Plain`]).
    grouped: u32,
    candidates: Groups,
    before: Groups,
    good: Option<(String, Groups)>,
    history: Vec<(String, Groups)>,
    rejected: Option<(String, Groups)>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AnyData {
    Grouped(StoredData),
    Plain(RecordData),
}

impl From<&RecordData> for StoredData {
    fn from(d: &RecordData) -> StoredData {
        let named = |(rev, p): &(String, PerCluster)| (rev.clone(), group(p));
        StoredData {
            grouped: 2,
            candidates: group(&d.candidates),
            before: group(&d.before),
            good: d.good.as_ref().map(named),
            history: d.history.iter().map(named).collect(),
            rejected: d.rejected.as_ref().map(named),
        }
    }
}

impl From<StoredData> for RecordData {
    fn from(s: StoredData) -> RecordData {
        let named = |(rev, g): (String, Groups)| (rev, ungroup(g));
        RecordData {
            candidates: ungroup(s.candidates),
            before: ungroup(s.before),
            good: s.good.map(named),
            history: s.history.into_iter().map(named).collect(),
            rejected: s.rejected.map(named),
        }
    }
}

/// What a rollout step changes: stored under `rollouts/<app>` at every step.
#[derive(Serialize)]
struct ProgressRef<'a> {
    rollout: &'a Option<Rollout>,
    timeline: &'a VecDeque<String>,
    blocked: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    noted: &'a Option<String>,
}

#[derive(Deserialize, Default)]
struct Progress {
    #[serde(default)]
    rollout: Option<Rollout>,
    #[serde(default)]
    timeline: VecDeque<String>,
    #[serde(default)]
    blocked: Option<String>,
    #[serde(default)]
    noted: Option<String>,
}

impl Record {
    /// The per-step part, as stored.
    pub fn progress_json(&self) -> Vec<u8> {
        serde_json::to_vec(&ProgressRef {
            rollout: &self.rollout,
            timeline: &self.timeline,
            blocked: &self.blocked,
            noted: &self.noted,
        })
        .unwrap_or_default()
    }

    /// The bulky part, as stored.
    pub fn data_json(&self) -> Vec<u8> {
        serde_json::to_vec(&StoredData::from(&*self.data)).unwrap_or_default()
    }

    /// A record from its stored parts.
    pub fn from_stored(progress: Option<&[u8]>, data: Option<&[u8]>) -> Result<Record, serde_json::Error> {
        let p: Progress = progress.map(serde_json::from_slice).transpose()?.unwrap_or_default();
        let d: RecordData = match data.map(serde_json::from_slice::<AnyData>).transpose()? {
            Some(AnyData::Grouped(g)) => g.into(),
            Some(AnyData::Plain(d)) => d,
            None => RecordData::default(),
        };
        Ok(Record { rollout: p.rollout, timeline: p.timeline, blocked: p.blocked, noted: p.noted, data: Arc::new(d) })
    }

    /// Every bundle digest the record may still give a cluster (for collecting unreferenced bundles).
    pub fn digests(&self) -> impl Iterator<Item = &str> {
        let d = &*self.data;
        d.candidates
            .values()
            .chain(d.before.values())
            .chain(d.good.iter().flat_map(|(_, p)| p.values()))
            .chain(d.history.iter().flat_map(|(_, p)| p.values()))
            .chain(d.rejected.iter().flat_map(|(_, p)| p.values()))
            .map(|a| a.digest.as_str())
            .filter(|d| !d.is_empty())
    }

    /// Whether the cluster is part of the app's current rollout content.
    pub fn targets(&self, cluster: &str) -> bool {
        self.rollout.is_some() && self.data.candidates.contains_key(cluster)
    }
}

/// What one planner step did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stepped {
    /// The app's desired state changes.
    pub changes: Changes,
    /// The rollout's state changed (store the progress).
    pub progressed: bool,
    /// The rollout completed: the bulky part changed too (the good revision).
    pub completed: bool,
}

fn stamp(now_ms: i64, text: &str) -> String {
    let t = chrono::DateTime::from_timestamp_millis(now_ms).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
    format!("{} {text}", t.unwrap_or_default())
}

impl Record {
    fn event(&mut self, now_ms: i64, text: &str) {
        self.timeline.push_back(stamp(now_ms, text));
        while self.timeline.len() > TIMELINE {
            self.timeline.pop_front();
        }
    }

    fn remember(&mut self, revision: &str, per: &PerCluster) {
        let d = Arc::make_mut(&mut self.data);
        d.history.retain(|(r, _)| r != revision);
        d.history.push((revision.to_string(), per.clone()));
        while d.history.len() > HISTORY {
            d.history.remove(0);
        }
    }

    fn supersede(&mut self, by: &str, now_ms: i64) {
        if let Some(r) =
            self.rollout.as_mut().filter(|r| matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Paused))
        {
            r.phase = RolloutPhase::Superseded(by.to_string());
            let rev = r.revision.clone();
            self.event(now_ms, &format!("rollout of {} superseded by {}", short(&rev), short(by)));
        }
    }

    /// The content the app is moving to (or was moving to, when its rollout stopped) on a cluster.
    fn target(&self, cluster: &str) -> Option<&DesiredApp> {
        self.rollout.as_ref().and_then(|_| self.data.candidates.get(cluster))
    }

    fn rejected(&self, cluster: &str) -> Option<&str> {
        self.data.rejected.as_ref().and_then(|(_, p)| p.get(cluster)).map(|d| d.digest.as_str())
    }
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

pub fn per_cluster(d: &Desired, app: &str) -> PerCluster {
    d.iter().filter_map(|(c, apps)| apps.get(app).map(|a| (c.clone(), a.clone()))).collect()
}

fn set(d: &mut Desired, cluster: &str, app: &str, value: Option<&DesiredApp>) {
    let apps = d.entry(cluster.to_string()).or_default();
    match value {
        Some(v) => {
            apps.insert(app.to_string(), v.clone());
        }
        None => {
            apps.remove(app);
        }
    }
}

/// Holds back what a new commit changes for apps with waves, starting their rollouts. `prev` is the desired
/// state before the commit, `next` the commit's (changed in place). Returns the apps whose record changed.
pub fn gate(
    records: &mut BTreeMap<String, Record>,
    fleet: &Fleet,
    prev: &Desired,
    next: &mut Desired,
    revision: &str,
    now_ms: i64,
) -> Vec<String> {
    let mut apps: Vec<String> = fleet.apps.keys().cloned().collect();
    apps.extend(records.keys().cloned());
    apps.sort();
    apps.dedup();
    let mut touched = Vec::new();
    for app in apps {
        let old = per_cluster(prev, &app);
        let new = per_cluster(next, &app);
        // What this cluster keeps while it waits: its desired state, or (no record of it) whatever its agent
        // runs: agents are the truth about what runs. An error of an earlier commit no longer applies.
        let keep =
            |c: &str| old.get(c).map(|o| DesiredApp { error: None, ..o.clone() }).unwrap_or_else(DesiredApp::adopted);
        // Clusters that left the app (or the fleet) leave its rollout.
        if let Some(rec) = records.get_mut(&app) {
            let gone = |c: &str| !new.contains_key(c);
            let mut dropped = rec.rollout.as_mut().is_some_and(|r| r.drop_clusters(&gone));
            if !fleet.apps.contains_key(&app) {
                if let Some(r) =
                    rec.rollout.as_mut().filter(|r| matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Paused))
                {
                    r.phase = RolloutPhase::Aborted("the app was removed from the fleet repository".into());
                    dropped = true;
                }
            }
            if dropped {
                let d = Arc::make_mut(&mut rec.data);
                d.candidates.retain(|c, _| new.contains_key(c));
                d.before.retain(|c, _| new.contains_key(c));
                touched.push(app.clone());
            }
        }
        let rec = records.get(&app);
        // Fresh renders of this commit (a cluster where the app is broken keeps what it had, with the error).
        let fresh = |d: &DesiredApp| d.error.is_none() && !d.adopt && !d.digest.is_empty();
        let changed: Vec<&String> = new
            .iter()
            .filter(|(c, d)| {
                let target = rec.and_then(|r| r.target(c)).or_else(|| old.get(*c)).map(|t| t.digest.as_str());
                fresh(d) && target != Some(d.digest.as_str()) && rec.and_then(|r| r.rejected(c)) != Some(&d.digest)
            })
            .map(|(c, _)| c)
            .collect();
        if changed.is_empty() {
            // The app's content is what it was: everything stays exactly as it is (held back or released).
            for (c, d) in &new {
                if fresh(d) {
                    set(next, c, &app, old.contains_key(c).then(|| keep(c)).as_ref());
                }
            }
            if let Some(rec) = records.get_mut(&app) {
                if rec.rollout.as_ref().is_some_and(|r| r.revision != revision) && !new.is_empty() {
                    rec.noted = Some(revision.to_string());
                    touched.push(app.clone());
                }
            }
            continue;
        }
        match fleet.rollout_for(&app) {
            Ok(None) => {
                if let Some(rec) = records.get_mut(&app) {
                    rec.supersede(revision, now_ms);
                    rec.blocked = None;
                    rec.noted = None;
                    Arc::make_mut(&mut rec.data).rejected = None;
                    rec.remember(revision, &new);
                    touched.push(app.clone());
                }
            }
            Err(e) => {
                let why = format!("{e} (this commit waits for a valid rollout spec)");
                for (c, d) in &new {
                    if changed.contains(&c) {
                        let mut kept = keep(c);
                        kept.error = Some(why.clone());
                        set(next, c, &app, Some(&kept));
                    } else if fresh(d) {
                        set(next, c, &app, old.contains_key(c).then(|| keep(c)).as_ref());
                    }
                }
                let rec = records.entry(app.clone()).or_default();
                rec.blocked = Some(why);
                touched.push(app.clone());
            }
            Ok(Some(spec)) => {
                let rec = records.entry(app.clone()).or_default();
                rec.blocked = None;
                rec.noted = None;
                rec.supersede(revision, now_ms);
                let previous = rec.data.good.as_ref().map(|(r, _)| r.clone()).or_else(|| {
                    // Before any rollout completed: the revision most clusters ran.
                    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                    for d in old.values().filter(|d| !d.revision.is_empty()) {
                        *counts.entry(d.revision.as_str()).or_default() += 1;
                    }
                    counts.into_iter().max_by_key(|(_, n)| *n).map(|(r, _)| r.to_string())
                });
                let labels =
                    new.keys().filter_map(|c| fleet.clusters.get(c).map(|s| (c.clone(), s.labels.clone()))).collect();
                let r = Rollout::new(&app, revision, previous, spec, &labels, now_ms);
                rec.event(now_ms, &format!("rollout of {} started over {} waves", short(revision), r.waves.len()));
                // Nothing changes until the waves release it; a cluster whose content did not change keeps its
                // desired state as it is (same bundle, same revision), so releasing it changes nothing.
                let mut candidates = PerCluster::new();
                let mut before = PerCluster::new();
                for (c, d) in &new {
                    let kept = keep(c);
                    let unchanged = !changed.contains(&c) && old.get(c).is_some_and(|o| o.digest == d.digest);
                    candidates.insert(c.clone(), if unchanged { kept.clone() } else { d.clone() });
                    set(next, c, &app, Some(&kept));
                    before.insert(c.clone(), kept);
                }
                if rec.data.good.is_none() && !old.is_empty() {
                    if let Some(p) = &r.previous {
                        Arc::make_mut(&mut rec.data).good = Some((p.clone(), old.clone()));
                    }
                }
                rec.remember(revision, &new);
                let d = Arc::make_mut(&mut rec.data);
                d.candidates = candidates;
                d.before = before;
                d.rejected = None;
                rec.rollout = Some(r);
                touched.push(app.clone());
            }
        }
    }
    touched.dedup();
    touched
}

/// Runs the planner for one app; returns the desired-state changes it decided.
pub fn drive(rec: &mut Record, obs: &BTreeMap<String, Observation>, now_ms: i64) -> Stepped {
    let Some(r) = rec.rollout.as_mut() else { return Stepped::default() };
    let before = r.clone();
    let actions = rollout::step(r, obs, now_ms);
    let progressed = *r != before;
    let completed = r.phase == RolloutPhase::Complete && before.phase != RolloutPhase::Complete;
    let revision = r.revision.clone();
    let mut changes = Vec::new();
    for a in actions {
        match a {
            Action::Release { cluster } => {
                let v = rec.data.candidates.get(&cluster).cloned();
                changes.push((cluster, v));
            }
            Action::Revert { cluster, .. } => {
                // A cluster with no earlier state keeps what its agent ran before ("adopted"), never nothing.
                let v = rec.data.before.get(&cluster).cloned().or_else(|| Some(DesiredApp::adopted()));
                changes.push((cluster, v));
            }
            Action::Event(e) => rec.event(now_ms, &e),
        }
    }
    if completed {
        let d = Arc::make_mut(&mut rec.data);
        d.good = Some((revision, d.candidates.clone()));
    }
    Stepped { changes, progressed, completed }
}

/// An operator's control, applied to the record. `current` is the app's desired state now, per cluster.
/// Returns what happened and the desired-state changes, or why it cannot.
pub fn control(
    app: &str,
    rec: &mut Record,
    current: &PerCluster,
    ctx: &ControlContext,
    action: &Control,
) -> Result<(String, Changes), String> {
    let ControlContext { labels: fleet_labels, spec, who, now_ms } = *ctx;
    let none = || format!("app {app} has no rollout");
    let mut changes = Vec::new();
    let through_waves = |rec: &mut Record, rev: &str, per: PerCluster, previous: Option<String>| {
        let spec =
            spec.ok_or_else(|| format!("app {app} has no waves at the current commit: use an immediate rollback"))?;
        let labels = per.keys().filter_map(|c| fleet_labels.get(c).map(|l| (c.clone(), l.clone()))).collect();
        rec.rollout = Some(Rollout::new(app, rev, previous, spec, &labels, now_ms));
        let d = Arc::make_mut(&mut rec.data);
        d.before = per.keys().filter_map(|c| current.get(c).map(|v| (c.clone(), v.clone()))).collect();
        d.candidates = per;
        Ok::<(), String>(())
    };
    let message = match action {
        Control::Pause => {
            rollout::pause(rec.rollout.as_mut().ok_or_else(none)?)?;
            "paused".to_string()
        }
        Control::Resume => {
            let r = rec.rollout.as_mut().ok_or_else(none)?;
            if matches!(r.phase, RolloutPhase::Failed(_) | RolloutPhase::Aborted(_) | RolloutPhase::RolledBack(_)) {
                return Err(format!(
                    "the rollout is {}: use `flotilla rollout retry {app}` to start it again",
                    r.phase
                ));
            }
            rollout::resume(r)?;
            "resumed".to_string()
        }
        Control::Approve(wave) => {
            rollout::approve(rec.rollout.as_mut().ok_or_else(none)?, wave, who)?;
            format!("wave {wave} approved")
        }
        Control::Abort => {
            rollout::abort(rec.rollout.as_mut().ok_or_else(none)?, who)?;
            "aborted".to_string()
        }
        Control::Retry => {
            let (rev, per) = match (&rec.data.rejected, &rec.rollout) {
                (Some((rev, per)), _) => (rev.clone(), per.clone()),
                (None, Some(r))
                    if matches!(
                        r.phase,
                        RolloutPhase::Failed(_) | RolloutPhase::Aborted(_) | RolloutPhase::RolledBack(_)
                    ) =>
                {
                    (r.revision.clone(), rec.data.candidates.clone())
                }
                (None, Some(r)) => {
                    return Err(format!(
                        "the rollout is {}; only a failed, aborted or rolled-back rollout can be retried",
                        r.phase
                    ))
                }
                (None, None) => return Err(none()),
            };
            let previous = rec.data.good.as_ref().map(|(r, _)| r.clone());
            through_waves(rec, &rev, per, previous)?;
            Arc::make_mut(&mut rec.data).rejected = None;
            rec.blocked = None;
            format!("retrying {} through the waves", short(&rev))
        }
        Control::Rollback { revision, immediate } => {
            let d = &*rec.data;
            let target = d
                .history
                .iter()
                .rev()
                .chain(d.good.iter())
                .find(|(r, _)| r == revision || (revision.len() >= 7 && r.starts_with(revision.as_str())))
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = d.history.iter().map(|(r, _)| short(r)).collect();
                    format!("revision {revision} was never rendered for app {app} (known: {})", known.join(", "))
                })?;
            let (rev, per) = target;
            // What is rolled back from is not rolled out again by a commit that leaves it unchanged.
            let from = match &rec.rollout {
                Some(r) if r.revision != rev => Some((r.revision.clone(), rec.data.candidates.clone())),
                _ => None,
            };
            rec.supersede(&rev, now_ms);
            if *immediate {
                if let Some(r) = rec.rollout.as_mut() {
                    if r.active() || matches!(r.phase, RolloutPhase::Paused | RolloutPhase::Superseded(_)) {
                        r.phase = RolloutPhase::RolledBack(format!("to {} by {who}", short(&rev)));
                    }
                }
                for (c, d) in &per {
                    changes.push((c.clone(), Some(d.clone())));
                }
                let d = Arc::make_mut(&mut rec.data);
                if let Some(f) = from {
                    d.rejected = Some(f);
                }
                // Later commits compare against what the clusters now run.
                d.candidates = per.clone();
                format!("rolled back to {} on every cluster at once", short(&rev))
            } else {
                let previous = rec.rollout.as_ref().map(|r| r.revision.clone());
                through_waves(rec, &rev, per, previous)?;
                if let Some(f) = from {
                    Arc::make_mut(&mut rec.data).rejected = Some(f);
                }
                format!("rolling back to {} through the waves", short(&rev))
            }
        }
    };
    rec.event(now_ms, &format!("{message} by {who}"));
    Ok((message, changes))
}

/// Who controls, when, and what the fleet says about the app.
#[derive(Debug, Clone, Copy)]
pub struct ControlContext<'a> {
    /// cluster → labels, for a rollback through the waves.
    pub labels: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// The app's waves at the current commit.
    pub spec: Option<&'a RolloutSpec>,
    pub who: &'a str,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Approve(String),
    Abort,
    Retry,
    Rollback { revision: String, immediate: bool },
}

/// Apps a cluster is meant to run or may be given: its desired apps and the apps whose rollout targets it.
pub fn targeted<'a>(
    desired: Option<&'a BTreeMap<String, DesiredApp>>,
    records: impl Iterator<Item = (&'a String, &'a Record)>,
    cluster: &str,
) -> BTreeSet<&'a str> {
    let mut out: BTreeSet<&str> = desired.into_iter().flat_map(|d| d.keys().map(String::as_str)).collect();
    out.extend(records.filter(|(_, r)| r.targets(cluster)).map(|(a, _)| a.as_str()));
    out
}

#[cfg(test)]
mod stored {
    use super::*;

    /// As the hub stores them: a sha256 digest and a commit id.
    fn at(digest: &str) -> DesiredApp {
        DesiredApp {
            digest: format!("{digest}{}", "0".repeat(64 - digest.len() + 7)),
            revision: "5f3a9c2e1b7d4a6c8e0f2b4d6a8c0e2f4b6d8a0c".into(),
            size: 1_048_576,
            error: None,
            adopt: false,
        }
    }

    #[test]
    fn per_cluster_maps_are_stored_grouped_and_read_back_whole_and_old_records_still_read() {
        let mut candidates = PerCluster::new();
        for i in 0..10_000 {
            candidates.insert(format!("c-{i:05}"), at(if i % 100 == 0 { "sha256:b" } else { "sha256:a" }));
        }
        let data = RecordData {
            candidates: candidates.clone(),
            before: candidates.iter().take(10).map(|(c, _)| (c.clone(), at("sha256:old"))).collect(),
            good: Some(("r0".into(), candidates.clone())),
            history: vec![("r0".into(), candidates.clone()), ("r1".into(), candidates.clone())],
            rejected: None,
        };
        let rec = Record { data: Arc::new(data.clone()), ..Record::default() };
        let stored = rec.data_json();
        let plain = serde_json::to_vec(&data).unwrap();
        assert!(stored.len() * 10 < plain.len(), "grouped {} bytes, plain {} bytes", stored.len(), plain.len());
        let back = Record::from_stored(Some(&rec.progress_json()), Some(&stored)).unwrap();
        assert_eq!(*back.data, data);
        // A record an earlier version wrote (plain maps) reads the same.
        let old = Record::from_stored(Some(&rec.progress_json()), Some(&plain)).unwrap();
        assert_eq!(*old.data, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::fleet::parse;
    use flotilla_common::rollout::ObservedHealth;

    fn fleet(rollout: Option<&str>) -> Fleet {
        let mut files: Vec<(String, String)> =
            (0..4).map(|i| (format!("clusters/c{i}.yaml"), format!("labels: {{ring: r{}}}\n", i / 2))).collect();
        files.push(("apps/shop/app.yaml".into(), "namespace: shop\ntargets: [{selector: {}}]\n".into()));
        if let Some(r) = rollout {
            files.push(("rollout.yaml".into(), r.into()));
        }
        parse(&files.into_iter().map(|(p, c)| (p, c.into_bytes())).collect())
    }

    fn app(content: &str, rev: &str) -> DesiredApp {
        DesiredApp { digest: format!("sha256:{content}"), revision: rev.into(), size: 1, error: None, adopt: false }
    }

    /// Every cluster at `content`, rendered from `rev`.
    fn at(content: &str, rev: &str) -> Desired {
        (0..4).map(|i| (format!("c{i}"), [("shop".to_string(), app(content, rev))].into_iter().collect())).collect()
    }

    fn desired(rev: &str) -> Desired {
        at(rev, rev)
    }

    const WAVES: &str = "waves:\n- {name: first, selector: {matchLabels: {ring: r0}}, maxParallel: 1}\n- {name: second, selector: {matchLabels: {ring: r1}}}\n";

    fn healthy_on(d: &Desired, r: &Record) -> BTreeMap<String, Observation> {
        d.iter()
            .filter_map(|(c, a)| {
                let a = a.get("shop")?;
                let on = r.data.candidates.get(c).is_some_and(|x| x.digest == a.digest);
                let revision = if on { r.rollout.as_ref()?.revision.clone() } else { a.revision.clone() };
                Some((
                    c.clone(),
                    Observation { online: true, revision, health: ObservedHealth::Healthy, reason: String::new() },
                ))
            })
            .collect()
    }

    fn apply(d: &mut Desired, changes: Changes) {
        for (c, v) in changes {
            set(d, &c, "shop", v.as_ref());
        }
    }

    /// Steps the rollout until it stops moving; returns the clusters released, in order.
    fn run(rec: &mut Record, d: &mut Desired, mut now: i64) -> Vec<String> {
        let mut order = Vec::new();
        while rec.rollout.as_ref().unwrap().active() && now < 100_000 {
            let obs = healthy_on(d, rec);
            let stepped = drive(rec, &obs, now);
            order.extend(stepped.changes.iter().map(|(c, _)| c.clone()));
            apply(d, stepped.changes);
            now += 1_000;
        }
        order
    }

    #[test]
    fn a_commit_is_held_back_and_released_wave_by_wave() {
        let f = fleet(Some(WAVES));
        let mut records = BTreeMap::new();
        let prev = desired("r1");
        let mut next = desired("r2");
        assert_eq!(gate(&mut records, &f, &prev, &mut next, "r2", 0), vec!["shop"]);
        assert_eq!(next, prev, "nothing changes before the waves release it");
        let rec = records.get_mut("shop").unwrap();
        assert_eq!(rec.rollout.as_ref().unwrap().previous.as_deref(), Some("r1"));
        let mut d = next;
        assert_eq!(run(rec, &mut d, 0), vec!["c0", "c1", "c2", "c3"]);
        assert_eq!(d, desired("r2"));
        assert_eq!(rec.data.good.as_ref().unwrap().0, "r2");
    }

    #[test]
    fn without_waves_a_commit_goes_at_once() {
        let f = fleet(None);
        let mut records = BTreeMap::new();
        let mut next = desired("r2");
        assert!(gate(&mut records, &f, &desired("r1"), &mut next, "r2", 0).is_empty());
        assert_eq!(next, desired("r2"));
    }

    #[test]
    fn a_broken_spec_blocks_the_commit_and_leaves_the_running_rollout() {
        let mut records = BTreeMap::new();
        let mut next = desired("r2");
        gate(&mut records, &fleet(Some(WAVES)), &desired("r1"), &mut next, "r2", 0);
        let running = records["shop"].rollout.clone();
        let mut broken = desired("r3");
        gate(&mut records, &fleet(Some("waves:\n- {name: a, maxParallel: 101%}\n")), &next, &mut broken, "r3", 1);
        assert_eq!(records["shop"].rollout, running, "the running rollout is untouched");
        assert!(records["shop"].blocked.as_deref().unwrap().starts_with("rollout.yaml:2:"));
        assert_eq!(broken["c0"]["shop"].digest, "sha256:r1", "the commit waits");
        assert!(broken["c0"]["shop"].error.as_deref().unwrap().contains("this commit waits"));
    }

    #[test]
    fn a_newer_commit_supersedes_and_nobody_moves_backwards() {
        let f = fleet(Some(WAVES));
        let mut records = BTreeMap::new();
        let mut d = desired("r2");
        gate(&mut records, &f, &desired("r1"), &mut d, "r2", 0);
        let rec = records.get_mut("shop").unwrap();
        let obs = healthy_on(&d, rec);
        apply(&mut d, drive(rec, &obs, 0).changes);
        assert_eq!(d["c0"]["shop"].revision, "r2");
        let mut d3 = desired("r3");
        gate(&mut records, &f, &d, &mut d3, "r3", 1_000);
        assert_eq!(records["shop"].timeline.iter().filter(|e| e.contains("superseded by r3")).count(), 1);
        assert_eq!(d3["c0"]["shop"].revision, "r2", "released clusters keep what they got");
        assert_eq!(d3["c3"]["shop"].revision, "r1", "the others wait for r3");
        assert_eq!(records["shop"].rollout.as_ref().unwrap().revision, "r3");
    }

    #[test]
    fn a_commit_that_leaves_the_content_alone_leaves_the_rollout_alone() {
        let f = fleet(Some(WAVES));
        let mut records = BTreeMap::new();
        let mut d = at("v2", "r2");
        gate(&mut records, &f, &at("v1", "r1"), &mut d, "r2", 0);
        let rec = records.get_mut("shop").unwrap();
        let obs = healthy_on(&d, rec);
        apply(&mut d, drive(rec, &obs, 0).changes);
        let before = records["shop"].rollout.clone();
        // r3 changes something else: the app's content is v2 still.
        let mut d3 = at("v2", "r3");
        gate(&mut records, &f, &d, &mut d3, "r3", 5_000);
        assert_eq!(records["shop"].rollout, before, "same rollout, same progress");
        assert_eq!(d3, d, "nothing released or held back changes");
        assert_eq!(records["shop"].noted.as_deref(), Some("r3"));
    }

    #[test]
    fn failed_content_is_not_rolled_out_again_until_retried() {
        let f = fleet(Some(WAVES));
        let labels: BTreeMap<String, BTreeMap<String, String>> =
            f.clusters.iter().map(|(c, s)| (c.clone(), s.labels.clone())).collect();
        let mut records = BTreeMap::new();
        let mut d = at("bad", "r2");
        gate(&mut records, &f, &at("v1", "r1"), &mut d, "r2", 0);
        let rec = records.get_mut("shop").unwrap();
        rec.rollout.as_mut().unwrap().phase = RolloutPhase::Failed("wave first failed: c0: degraded".into());
        let mut d3 = at("bad", "r3");
        assert!(gate(&mut records, &f, &d, &mut d3, "r3", 1_000).iter().all(|a| a == "shop"));
        assert!(matches!(records["shop"].rollout.as_ref().unwrap().phase, RolloutPhase::Failed(_)));
        assert_eq!(d3, d, "the failed content stays where it was");
        // Retried by an operator: a new rollout of the same content.
        let rec = records.get_mut("shop").unwrap();
        let ctx = ControlContext { labels: &labels, spec: f.rollout_for("shop").unwrap(), who: "alice", now_ms: 2_000 };
        let (msg, changes) = control("shop", rec, &per_cluster(&d3, "shop"), &ctx, &Control::Retry).unwrap();
        assert!(msg.starts_with("retrying r2"), "{msg}");
        assert!(changes.is_empty());
        let mut d4 = d3.clone();
        run(rec, &mut d4, 2_000);
        assert_eq!(d4, at("bad", "r2"));
    }

    #[test]
    fn rolled_back_content_is_not_rolled_out_again() {
        let f = fleet(Some(WAVES));
        let labels = BTreeMap::new();
        let mut records = BTreeMap::new();
        let mut d = at("v1", "r1");
        gate(&mut records, &f, &Desired::new(), &mut d, "r1", 0);
        let rec = records.get_mut("shop").unwrap();
        run(rec, &mut d, 0);
        let mut d2 = at("bad", "r2");
        gate(&mut records, &f, &d, &mut d2, "r2", 10_000);
        let rec = records.get_mut("shop").unwrap();
        run(rec, &mut d2, 10_000);
        assert_eq!(d2, at("bad", "r2"));
        let ctx = ControlContext { labels: &labels, spec: None, who: "alice", now_ms: 20_000 };
        let back = Control::Rollback { revision: "r1".into(), immediate: true };
        let (_, changes) = control("shop", rec, &per_cluster(&d2, "shop"), &ctx, &back).unwrap();
        apply(&mut d2, changes);
        assert_eq!(d2, at("v1", "r1"));
        let mut d3 = at("bad", "r3");
        gate(&mut records, &f, &d2, &mut d3, "r3", 30_000);
        assert_eq!(d3, at("v1", "r1"), "an unrelated commit does not bring the rolled-back content back");
    }

    #[test]
    fn a_cluster_with_no_record_keeps_what_its_agent_runs() {
        let f = fleet(Some(WAVES));
        let mut records = BTreeMap::new();
        let mut next = desired("r2");
        gate(&mut records, &f, &Desired::new(), &mut next, "r2", 0);
        assert!(next.values().all(|apps| apps["shop"].adopt), "{next:?}");
        let rec = records.get_mut("shop").unwrap();
        rec.rollout.as_mut().unwrap().phase = RolloutPhase::Progressing;
        let stepped = drive(rec, &BTreeMap::new(), 0);
        assert_eq!(stepped.changes.len(), 1, "the first cluster is released");
    }

    #[test]
    fn a_removed_cluster_leaves_the_rollout() {
        let f = fleet(Some(WAVES));
        let mut records = BTreeMap::new();
        let mut d = desired("r2");
        gate(&mut records, &f, &desired("r1"), &mut d, "r2", 0);
        let mut without = d.clone();
        without.remove("c3");
        // r3 removes c3 from the inventory; the app's content is r2's still.
        let mut next = at("r2", "r3");
        next.remove("c3");
        gate(&mut records, &f, &without, &mut next, "r3", 1_000);
        let r = records["shop"].rollout.as_ref().unwrap();
        assert!(r.wave_of("c3").is_none() && r.wave_of("c2").is_some());
        assert_eq!(r.revision, "r2", "the same rollout goes on");
    }

    #[test]
    fn rollbacks_only_go_to_rendered_revisions() {
        let f = fleet(Some(WAVES));
        let spec = f.rollout_for("shop").unwrap();
        let labels: BTreeMap<String, BTreeMap<String, String>> =
            f.clusters.iter().map(|(c, s)| (c.clone(), s.labels.clone())).collect();
        let mut records = BTreeMap::new();
        let mut d = desired("r2");
        gate(&mut records, &f, &desired("r1"), &mut d, "r2", 0);
        let rec = records.get_mut("shop").unwrap();
        let nope = Control::Rollback { revision: "r9".into(), immediate: true };
        let ctx = ControlContext { labels: &labels, spec, who: "alice", now_ms: 0 };
        let current = per_cluster(&d, "shop");
        assert!(control("shop", rec, &current, &ctx, &nope).unwrap_err().starts_with("revision r9 was never rendered"));
        let back = Control::Rollback { revision: "r1".into(), immediate: true };
        let (msg, changed) = control("shop", rec, &current, &ctx, &back).unwrap();
        assert_eq!(msg, "rolled back to r1 on every cluster at once");
        assert_eq!(changed.len(), 4);
        apply(&mut d, changed);
        assert_eq!(d, desired("r1"));
        assert!(rec.timeline.back().unwrap().ends_with("rolled back to r1 on every cluster at once by alice"));
    }
}
