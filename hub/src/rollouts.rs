//! Rollouts in the hub, free of I/O: a new commit's desired state is held back per cluster until the app's
//! rollout releases it (the planner, `flotilla_common::rollout`, decides); releases, reverts and controls
//! change the desired state the sessions stream. The server persists [`Record`]s and the desired state in one
//! store batch after every change, so a restarted hub resumes exactly where it was.
//!
//! Rules (docs/rollouts.md):
//! - an app without waves (no rollout.yaml, no `rollout:`) goes everywhere at once, as before;
//! - a commit that changes an app's bundle on some clusters starts a rollout of that commit; a running rollout
//!   of the app is superseded: clusters it released keep what they got, the others wait for the new rollout,
//!   so no cluster moves backwards except by a rollback;
//! - a broken rollout.yaml blocks new rollouts (clusters keep their desired state, the app shows why) and
//!   leaves running ones alone;
//! - a rollback only targets a revision the hub rendered for the app.

use crate::state::{Desired, DesiredApp};
use flotilla_common::fleet::Fleet;
use flotilla_common::rollout::{self, Action, Observation, Rollout, RolloutPhase};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Events kept per app.
const TIMELINE: usize = 200;
/// Revisions kept per app for rollbacks.
const HISTORY: usize = 5;

/// cluster → the app's desired state there.
pub type PerCluster = BTreeMap<String, DesiredApp>;

/// Stored in two parts (see [`Record::progress_json`] and [`Record::data_json`]), never whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub rollout: Option<Rollout>,
    /// The app at the rollout's revision, per cluster.
    pub candidates: PerCluster,
    /// The app before the rollout, per cluster (absent: the cluster did not have it).
    pub before: PerCluster,
    pub timeline: VecDeque<String>,
    /// Why the newest commit could not start a rollout.
    pub blocked: Option<String>,
    /// The app at the last revision whose rollout completed.
    pub good: Option<(String, PerCluster)>,
    /// Revisions rendered for the app, newest last, for rollbacks.
    pub history: Vec<(String, PerCluster)>,
}

/// What a rollout step changes: stored under `rollouts/<app>` at every step.
#[derive(Serialize)]
struct ProgressRef<'a> {
    rollout: &'a Option<Rollout>,
    timeline: &'a VecDeque<String>,
    blocked: &'a Option<String>,
}

#[derive(Deserialize, Default)]
struct Progress {
    #[serde(default)]
    rollout: Option<Rollout>,
    #[serde(default)]
    timeline: VecDeque<String>,
    #[serde(default)]
    blocked: Option<String>,
}

/// The bulky part, per cluster: stored under `rollout-data/<app>` only when a rollout starts, completes or is
/// controlled, never at every step.
#[derive(Serialize)]
struct DataRef<'a> {
    candidates: &'a PerCluster,
    before: &'a PerCluster,
    good: &'a Option<(String, PerCluster)>,
    history: &'a Vec<(String, PerCluster)>,
}

#[derive(Deserialize, Default)]
struct Data {
    #[serde(default)]
    candidates: PerCluster,
    #[serde(default)]
    before: PerCluster,
    #[serde(default)]
    good: Option<(String, PerCluster)>,
    #[serde(default)]
    history: Vec<(String, PerCluster)>,
}

impl Record {
    /// The per-step part, as stored.
    pub fn progress_json(&self) -> Vec<u8> {
        serde_json::to_vec(&ProgressRef { rollout: &self.rollout, timeline: &self.timeline, blocked: &self.blocked })
            .unwrap_or_default()
    }

    /// The bulky part, as stored.
    pub fn data_json(&self) -> Vec<u8> {
        serde_json::to_vec(&DataRef {
            candidates: &self.candidates,
            before: &self.before,
            good: &self.good,
            history: &self.history,
        })
        .unwrap_or_default()
    }

    /// A record from its stored parts.
    pub fn from_stored(progress: Option<&[u8]>, data: Option<&[u8]>) -> Result<Record, serde_json::Error> {
        let p: Progress = progress.map(serde_json::from_slice).transpose()?.unwrap_or_default();
        let d: Data = data.map(serde_json::from_slice).transpose()?.unwrap_or_default();
        Ok(Record {
            rollout: p.rollout,
            timeline: p.timeline,
            blocked: p.blocked,
            candidates: d.candidates,
            before: d.before,
            good: d.good,
            history: d.history,
        })
    }
}

/// What one planner step did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stepped {
    /// Clusters whose desired state changed.
    pub clusters: Vec<String>,
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
        self.history.retain(|(r, _)| r != revision);
        self.history.push((revision.to_string(), per.clone()));
        while self.history.len() > HISTORY {
            self.history.remove(0);
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
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

fn per_cluster(d: &Desired, app: &str) -> PerCluster {
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
        let changed: Vec<&String> = new
            .iter()
            .filter(|(c, d)| !d.digest.is_empty() && old.get(*c).is_none_or(|o| o.digest != d.digest))
            .map(|(c, _)| c)
            .collect();
        if changed.is_empty() {
            continue;
        }
        match fleet.rollout_for(&app) {
            Ok(None) => {
                if let Some(rec) = records.get_mut(&app) {
                    rec.supersede(revision, now_ms);
                    rec.blocked = None;
                    rec.remember(revision, &new);
                    touched.push(app.clone());
                }
            }
            Err(e) => {
                let why = format!("{e} (this commit waits for a valid rollout spec)");
                for c in changed {
                    let mut kept = old.get(c).cloned();
                    if let Some(k) = kept.as_mut() {
                        k.error = Some(why.clone());
                    }
                    set(next, c, &app, kept.as_ref());
                }
                let rec = records.entry(app.clone()).or_default();
                rec.blocked = Some(why);
                touched.push(app.clone());
            }
            Ok(Some(spec)) => {
                let rec = records.entry(app.clone()).or_default();
                rec.blocked = None;
                rec.supersede(revision, now_ms);
                let previous = rec.good.as_ref().map(|(r, _)| r.clone()).or_else(|| {
                    // Before any rollout completed: the revision most clusters ran.
                    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                    for d in old.values() {
                        *counts.entry(d.revision.as_str()).or_default() += 1;
                    }
                    counts.into_iter().max_by_key(|(_, n)| *n).map(|(r, _)| r.to_string())
                });
                let labels =
                    new.keys().filter_map(|c| fleet.clusters.get(c).map(|s| (c.clone(), s.labels.clone()))).collect();
                let r = Rollout::new(&app, revision, previous, spec, &labels, now_ms);
                rec.event(now_ms, &format!("rollout of {} started over {} waves", short(revision), r.waves.len()));
                // Nothing changes until the waves release it.
                for c in new.keys() {
                    set(next, c, &app, old.get(c));
                }
                if rec.good.is_none() && !old.is_empty() {
                    if let Some(p) = &r.previous {
                        rec.good = Some((p.clone(), old.clone()));
                    }
                }
                rec.remember(revision, &new);
                rec.candidates = new;
                rec.before = old;
                rec.rollout = Some(r);
                touched.push(app.clone());
            }
        }
    }
    touched
}

/// Runs the planner for one app and applies its decisions to `desired`.
pub fn drive(
    app: &str,
    rec: &mut Record,
    desired: &mut Desired,
    obs: &BTreeMap<String, Observation>,
    now_ms: i64,
) -> Stepped {
    let Some(r) = rec.rollout.as_mut() else { return Stepped::default() };
    let before = r.clone();
    let actions = rollout::step(r, obs, now_ms);
    let progressed = *r != before;
    let completed = r.phase == RolloutPhase::Complete && before.phase != RolloutPhase::Complete;
    let revision = r.revision.clone();
    let mut clusters = Vec::new();
    for a in actions {
        match a {
            Action::Release { cluster } => {
                set(desired, &cluster, app, rec.candidates.get(&cluster));
                clusters.push(cluster);
            }
            Action::Revert { cluster, .. } => {
                set(desired, &cluster, app, rec.before.get(&cluster));
                clusters.push(cluster);
            }
            Action::Event(e) => rec.event(now_ms, &e),
        }
    }
    if completed {
        rec.good = Some((revision, rec.candidates.clone()));
    }
    Stepped { clusters, progressed, completed }
}

/// An operator's control, applied to the record (and, for an immediate rollback, to `desired`). Returns what
/// happened, or why it cannot.
pub fn control(
    app: &str,
    rec: &mut Record,
    desired: &mut Desired,
    ctx: &ControlContext,
    action: &Control,
) -> Result<(String, Vec<String>), String> {
    let ControlContext { labels: fleet_labels, spec, who, now_ms } = *ctx;
    let none = || format!("app {app} has no rollout");
    let mut changed = Vec::new();
    let message = match action {
        Control::Pause => {
            rollout::pause(rec.rollout.as_mut().ok_or_else(none)?)?;
            "paused".to_string()
        }
        Control::Resume => {
            rollout::resume(rec.rollout.as_mut().ok_or_else(none)?)?;
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
        Control::Rollback { revision, immediate } => {
            let target = rec
                .history
                .iter()
                .rev()
                .chain(rec.good.iter())
                .find(|(r, _)| r == revision || (revision.len() >= 7 && r.starts_with(revision.as_str())))
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = rec.history.iter().map(|(r, _)| short(r)).collect();
                    format!("revision {revision} was never rendered for app {app} (known: {})", known.join(", "))
                })?;
            let (rev, per) = target;
            rec.supersede(&rev, now_ms);
            let before = per_cluster(desired, app);
            if *immediate {
                for (c, d) in &per {
                    set(desired, c, app, Some(d));
                    changed.push(c.clone());
                }
                rec.rollout = None;
                format!("rolled back to {} on every cluster at once", short(&rev))
            } else {
                let spec = spec.ok_or_else(|| format!("app {app} has no waves: use an immediate rollback"))?;
                let labels = per.keys().filter_map(|c| fleet_labels.get(c).map(|l| (c.clone(), l.clone()))).collect();
                let previous = rec.rollout.as_ref().map(|r| r.revision.clone());
                rec.rollout = Some(Rollout::new(app, &rev, previous, spec, &labels, now_ms));
                rec.candidates = per;
                rec.before = before;
                format!("rolling back to {} through the waves", short(&rev))
            }
        }
    };
    rec.event(now_ms, &format!("{message} by {who}"));
    Ok((message, changed))
}

/// Who controls, when, and what the fleet says about the app.
#[derive(Debug, Clone, Copy)]
pub struct ControlContext<'a> {
    /// cluster → labels, for a rollback through the waves.
    pub labels: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// The app's waves at the current commit.
    pub spec: Option<&'a rollout::RolloutSpec>,
    pub who: &'a str,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Approve(String),
    Abort,
    Rollback { revision: String, immediate: bool },
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

    fn desired(rev: &str) -> Desired {
        (0..4)
            .map(|i| {
                let d = DesiredApp { digest: format!("sha256:{rev}"), revision: rev.into(), size: 1, error: None };
                (format!("c{i}"), [("shop".to_string(), d)].into_iter().collect())
            })
            .collect()
    }

    const WAVES: &str = "waves:\n- {name: first, selector: {matchLabels: {ring: r0}}, maxParallel: 1}\n- {name: second, selector: {matchLabels: {ring: r1}}}\n";

    fn healthy_on(d: &Desired) -> BTreeMap<String, Observation> {
        d.iter()
            .filter_map(|(c, a)| {
                let a = a.get("shop")?;
                Some((
                    c.clone(),
                    Observation {
                        online: true,
                        revision: a.revision.clone(),
                        health: ObservedHealth::Healthy,
                        reason: String::new(),
                    },
                ))
            })
            .collect()
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
        let mut now = 0;
        let mut order = Vec::new();
        while rec.rollout.as_ref().unwrap().active() && now < 100_000 {
            let obs = healthy_on(&d);
            order.extend(drive("shop", rec, &mut d, &obs, now).clusters);
            now += 1_000;
        }
        assert_eq!(order, vec!["c0", "c1", "c2", "c3"]);
        assert_eq!(d, desired("r2"));
        assert_eq!(rec.good.as_ref().unwrap().0, "r2");
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
        let obs = healthy_on(&d);
        drive("shop", rec, &mut d, &obs, 0);
        assert_eq!(d["c0"]["shop"].revision, "r2");
        let mut d3 = desired("r3");
        gate(&mut records, &f, &d, &mut d3, "r3", 1_000);
        assert_eq!(records["shop"].timeline.iter().filter(|e| e.contains("superseded by r3")).count(), 1);
        assert_eq!(d3["c0"]["shop"].revision, "r2", "released clusters keep what they got");
        assert_eq!(d3["c3"]["shop"].revision, "r1", "the others wait for r3");
        assert_eq!(records["shop"].rollout.as_ref().unwrap().revision, "r3");
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
        assert!(control("shop", rec, &mut d, &ctx, &nope).unwrap_err().starts_with("revision r9 was never rendered"));
        let back = Control::Rollback { revision: "r1".into(), immediate: true };
        let (msg, changed) = control("shop", rec, &mut d, &ctx, &back).unwrap();
        assert_eq!(msg, "rolled back to r1 on every cluster at once");
        assert_eq!(changed.len(), 4);
        assert_eq!(d, desired("r1"));
        assert!(rec.timeline.back().unwrap().ends_with("rolled back to r1 on every cluster at once by alice"));
    }
}
