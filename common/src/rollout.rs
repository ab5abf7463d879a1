//! Staged rollouts, free of I/O: the wave spec of the fleet repository and the planner that decides, from the
//! spec, the clusters and what they report, which clusters receive a new revision next.
//!
//! The planner is a pure function of its inputs ([`step`]): the same rollout, observations and time give the
//! same decisions. The hub persists the [`Rollout`] between steps, so a restarted hub resumes exactly where it
//! was.

use crate::selector::LabelSelector;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

// ---------------------------------------------------------------------------------------------------------
// The spec
// ---------------------------------------------------------------------------------------------------------

/// A count of clusters or a percentage of a wave's clusters: `3` or `"25%"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// The amount for a wave of `n` clusters. A percentage rounds down, but allows at least one cluster when it
    /// is above zero (so `10%` of a 3-cluster wave is 1, not 0).
    pub fn of(self, n: usize) -> usize {
        match self {
            Amount::Count(c) => c as usize,
            Amount::Percent(0) => 0,
            Amount::Percent(p) => ((n * p as usize) / 100).max(1),
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Count(c) => s.serialize_u32(*c),
            Amount::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Amount::Count(n)),
            Raw::S(s) => {
                let p = s.strip_suffix('%').and_then(|p| p.trim().parse::<u32>().ok()).ok_or_else(|| {
                    D::Error::custom(format!("{s:?} is neither a count nor a percentage such as \"25%\""))
                })?;
                if p > 100 {
                    return Err(D::Error::custom(format!("{s:?}: a percentage cannot be over 100%")));
                }
                Ok(Amount::Percent(p))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Stop: the failed wave keeps what it has, later waves never see the revision.
    #[default]
    Halt,
    /// Put the failed wave's updated clusters back on the last good revision.
    Rollback,
}

/// What an updating cluster that is offline counts as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offline {
    /// Wait for it up to the progress deadline; then it has failed.
    #[default]
    Wait,
    /// It has failed at once.
    Fail,
    /// Leave it out: it is not released, and counts neither as updated nor as failed.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WaveSpec {
    pub name: String,
    #[serde(default)]
    pub selector: LabelSelector,
    /// How many clusters of the wave may update at once (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<Amount>,
    /// How many clusters of the wave may fail before the wave fails (default 0).
    #[serde(default = "no_failures")]
    pub failure_budget: Amount,
    /// How long the whole wave must stay healthy before the next starts.
    #[serde(default)]
    pub bake_seconds: u64,
    /// How long an updating cluster may take to be healthy on the new revision before it counts as failed.
    #[serde(default = "ten_minutes")]
    pub progress_deadline_seconds: u64,
    /// An operator approves the wave before it starts.
    #[serde(default)]
    pub approval: bool,
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn no_failures() -> Amount {
    Amount::Count(0)
}

fn ten_minutes() -> u64 {
    600
}

/// `rollout.yaml` (fleet-wide) or an app's `rollout:` (replaces the fleet-wide spec for that app).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutSpec {
    pub waves: Vec<WaveSpec>,
    /// Clusters no wave selects form a last wave named `rest` (default); `false` leaves them out of rollouts:
    /// they keep the revision they run.
    #[serde(default = "yes")]
    pub final_wave: bool,
    #[serde(default)]
    pub offline: Offline,
}

fn yes() -> bool {
    true
}

impl RolloutSpec {
    /// Problems a parser cannot see: duplicate or empty names, invalid selectors.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = BTreeSet::new();
        if self.waves.is_empty() {
            return Err("waves: at least one wave is needed".into());
        }
        for (i, w) in self.waves.iter().enumerate() {
            if w.name.is_empty() || !crate::identity::valid_name(&w.name) {
                return Err(format!(
                    "waves[{i}].name: {:?} is not a valid name (lowercase letters, digits, '-')",
                    w.name
                ));
            }
            if w.name == REST && self.final_wave {
                return Err(format!("waves[{i}].name: {REST:?} is the name of the final wave"));
            }
            if !names.insert(w.name.as_str()) {
                return Err(format!("waves[{i}].name: two waves are named {:?}", w.name));
            }
            if w.max_parallel == Some(Amount::Count(0)) || w.max_parallel == Some(Amount::Percent(0)) {
                return Err(format!("waves[{i}].maxParallel: 0 would never update a cluster"));
            }
            w.selector.validate().map_err(|e| format!("waves[{i}].selector.{e}"))?;
        }
        Ok(())
    }

    /// Each cluster's wave (the first that selects it; `rest` for the others when there is a final wave), in
    /// wave order, clusters by name.
    pub fn assign(&self, clusters: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<(WaveSpec, Vec<String>)> {
        let mut out: Vec<(WaveSpec, Vec<String>)> = self.waves.iter().map(|w| (w.clone(), Vec::new())).collect();
        let mut rest = Vec::new();
        for (name, labels) in clusters {
            match self.waves.iter().position(|w| w.selector.matches(labels)) {
                Some(i) => out[i].1.push(name.clone()),
                None => rest.push(name.clone()),
            }
        }
        if self.final_wave && !rest.is_empty() {
            let last = self.waves.last().cloned();
            out.push((
                WaveSpec {
                    name: REST.into(),
                    selector: LabelSelector::default(),
                    max_parallel: last.as_ref().and_then(|l| l.max_parallel),
                    failure_budget: last.as_ref().map_or(Amount::Count(0), |l| l.failure_budget),
                    bake_seconds: 0,
                    progress_deadline_seconds: last.as_ref().map_or(600, |l| l.progress_deadline_seconds),
                    approval: false,
                    on_failure: last.as_ref().map_or(OnFailure::Halt, |l| l.on_failure),
                },
                rest,
            ));
        }
        out
    }
}

/// The final wave's name.
pub const REST: &str = "rest";

// ---------------------------------------------------------------------------------------------------------
// The state a rollout is in
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterOutcome {
    /// Not released yet.
    Pending,
    /// Released; waiting for it to run the revision healthily.
    Updating,
    Healthy,
    Failed(String),
    /// Left out (offline under `offline: skip`).
    Skipped,
    /// Put back on the previous revision by a rollback.
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterProgress {
    pub name: String,
    pub outcome: ClusterOutcome,
    /// When the cluster was released (Unix ms).
    pub released_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WavePhase {
    Pending,
    AwaitingApproval,
    Progressing,
    /// Every cluster is done; the wave must stay healthy until `until_ms`.
    Baking {
        until_ms: i64,
    },
    Passed,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveState {
    pub spec: WaveSpec,
    pub phase: WavePhase,
    /// Stored grouped (see [`progress_groups`]): a rollout's progress is written at every step, and 10,000
    /// clusters as one object each would be about 650 KB every time.
    #[serde(with = "progress_groups")]
    pub clusters: Vec<ClusterProgress>,
    pub approved_by: Option<String>,
}

/// A wave's clusters as groups of those with the same outcome and release time, their names listed: a few
/// dozen groups instead of one object per cluster. Read back in name order, which is the order waves keep
/// (`RolloutSpec::assign` lists clusters by name); a list in another order is written as it is. The
/// one-object-per-cluster form of earlier versions is read too.
mod progress_groups {
    use super::{ClusterOutcome, ClusterProgress};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    type Group = (ClusterOutcome, Option<i64>, Vec<String>);

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Stored {
        /// Objects: an order other than by name, or an earlier version's.
        Plain(Vec<ClusterProgress>),
        Grouped {
            grouped: Vec<Group>,
        },
    }

    pub fn serialize<S: Serializer>(clusters: &[ClusterProgress], s: S) -> Result<S::Ok, S::Error> {
        if !clusters.windows(2).all(|w| w[0].name < w[1].name) {
            return Stored::Plain(clusters.to_vec()).serialize(s);
        }
        let mut grouped: Vec<Group> = Vec::new();
        for c in clusters {
            match grouped.iter_mut().find(|(o, r, _)| *o == c.outcome && *r == c.released_ms) {
                Some((_, _, names)) => names.push(c.name.clone()),
                None => grouped.push((c.outcome.clone(), c.released_ms, vec![c.name.clone()])),
            }
        }
        Stored::Grouped { grouped }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ClusterProgress>, D::Error> {
        Ok(match Stored::deserialize(d)? {
            Stored::Plain(list) => list,
            Stored::Grouped { grouped } => {
                let mut list: Vec<ClusterProgress> = grouped
                    .into_iter()
                    .flat_map(|(outcome, released_ms, names)| {
                        names.into_iter().map(move |name| ClusterProgress {
                            name,
                            outcome: outcome.clone(),
                            released_ms,
                        })
                    })
                    .collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                list
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    Progressing,
    Paused,
    Complete,
    Failed(String),
    RolledBack(String),
    Aborted(String),
    Superseded(String),
}

/// One app's rollout of one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub app: String,
    /// The revision being rolled out.
    pub revision: String,
    /// The last revision that completed a rollout: what a rollback goes back to.
    pub previous: Option<String>,
    pub phase: RolloutPhase,
    pub waves: Vec<WaveState>,
    pub offline: Offline,
    pub started_ms: i64,
}

/// What a cluster reports for the app.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    pub online: bool,
    /// The revision the app runs there (applied), empty when none.
    pub revision: String,
    pub health: ObservedHealth,
    /// Why it is not healthy (object and reason), for explanations.
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ObservedHealth {
    #[default]
    Unknown,
    Healthy,
    Progressing,
    Degraded,
}

/// What the hub must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Give the cluster the rollout's revision.
    Release { cluster: String },
    /// Give the cluster the previous revision back.
    Revert { cluster: String, revision: String },
    /// A line for the rollout's timeline.
    Event(String),
}

impl Rollout {
    /// A new rollout of `revision` over `clusters` (name → labels).
    pub fn new(
        app: &str,
        revision: &str,
        previous: Option<String>,
        spec: &RolloutSpec,
        clusters: &BTreeMap<String, BTreeMap<String, String>>,
        now_ms: i64,
    ) -> Rollout {
        let waves = spec
            .assign(clusters)
            .into_iter()
            .map(|(spec, names)| WaveState {
                phase: WavePhase::Pending,
                clusters: names
                    .into_iter()
                    .map(|name| ClusterProgress { name, outcome: ClusterOutcome::Pending, released_ms: None })
                    .collect(),
                spec,
                approved_by: None,
            })
            .collect();
        Rollout {
            app: app.to_string(),
            revision: revision.to_string(),
            previous,
            phase: RolloutPhase::Progressing,
            waves,
            offline: spec.offline,
            started_ms: now_ms,
        }
    }

    /// Whether the rollout still moves (may release clusters).
    pub fn active(&self) -> bool {
        matches!(self.phase, RolloutPhase::Progressing)
    }

    /// The clusters that have been given this rollout's revision (and not reverted).
    pub fn released(&self) -> BTreeSet<&str> {
        self.waves
            .iter()
            .flat_map(|w| &w.clusters)
            .filter(|c| c.released_ms.is_some() && c.outcome != ClusterOutcome::RolledBack)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// Leaves out clusters that left the fleet or stopped being targeted: a removed cluster is not waited for.
    /// Returns whether any was removed.
    pub fn drop_clusters(&mut self, gone: &dyn Fn(&str) -> bool) -> bool {
        let mut dropped = false;
        for w in &mut self.waves {
            let before = w.clusters.len();
            w.clusters.retain(|c| !gone(&c.name));
            dropped |= w.clusters.len() != before;
        }
        dropped
    }

    /// Moves the rollout's timers (release times, bakes) `by_ms` later: time the hub was not running does not
    /// count against a cluster's progress deadline or as bake time.
    pub fn shift(&mut self, by_ms: i64) {
        for w in &mut self.waves {
            if let WavePhase::Baking { until_ms } = &mut w.phase {
                *until_ms += by_ms;
            }
            for c in w.clusters.iter_mut().filter(|c| c.outcome == ClusterOutcome::Updating) {
                if let Some(r) = &mut c.released_ms {
                    *r += by_ms;
                }
            }
        }
    }

    /// The wave a cluster belongs to, with its index.
    pub fn wave_of(&self, cluster: &str) -> Option<(usize, &WaveState)> {
        self.waves.iter().enumerate().find(|(_, w)| w.clusters.iter().any(|c| c.name == cluster))
    }
}

impl fmt::Display for WavePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WavePhase::Pending => write!(f, "pending"),
            WavePhase::AwaitingApproval => write!(f, "awaiting approval"),
            WavePhase::Progressing => write!(f, "progressing"),
            WavePhase::Baking { .. } => write!(f, "baking"),
            WavePhase::Passed => write!(f, "passed"),
            WavePhase::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

impl fmt::Display for RolloutPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RolloutPhase::Progressing => write!(f, "progressing"),
            RolloutPhase::Paused => write!(f, "paused"),
            RolloutPhase::Complete => write!(f, "complete"),
            RolloutPhase::Failed(w) => write!(f, "failed: {w}"),
            RolloutPhase::RolledBack(w) => write!(f, "rolled back: {w}"),
            RolloutPhase::Aborted(w) => write!(f, "aborted: {w}"),
            RolloutPhase::Superseded(w) => write!(f, "superseded by {w}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The planner
// ---------------------------------------------------------------------------------------------------------

/// Advances the rollout by what the clusters report at `now_ms`: updates outcomes, moves waves through their
/// gates, and says which clusters to release (or revert). Pure and deterministic.
pub fn step(r: &mut Rollout, obs: &BTreeMap<String, Observation>, now_ms: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    if !r.active() {
        return actions;
    }
    let unknown = Observation::default();
    for k in 0..r.waves.len() {
        let offline_rule = r.offline;
        let revision = r.revision.clone();
        let w = &mut r.waves[k];
        match w.phase.clone() {
            WavePhase::Passed => continue,
            WavePhase::Failed(_) => return actions,
            WavePhase::Pending => {
                // Every earlier wave has passed (the loop stops at the first that has not).
                if w.spec.approval && w.approved_by.is_none() {
                    w.phase = WavePhase::AwaitingApproval;
                    actions.push(Action::Event(format!("wave {} awaits approval", w.spec.name)));
                    return actions;
                }
                w.phase = WavePhase::Progressing;
                actions.push(Action::Event(format!("wave {} started ({} clusters)", w.spec.name, w.clusters.len())));
            }
            WavePhase::AwaitingApproval => {
                if w.approved_by.is_none() {
                    return actions;
                }
                w.phase = WavePhase::Progressing;
                actions.push(Action::Event(format!(
                    "wave {} approved by {}; started",
                    w.spec.name,
                    w.approved_by.clone().unwrap_or_default()
                )));
            }
            WavePhase::Progressing | WavePhase::Baking { .. } => {}
        }
        let n = w.clusters.len();
        let deadline_ms = (w.spec.progress_deadline_seconds as i64) * 1000;
        // 1. Outcomes of released clusters.
        for c in w.clusters.iter_mut() {
            let o = obs.get(&c.name).unwrap_or(&unknown);
            match &c.outcome {
                ClusterOutcome::Updating => {
                    let on_revision = o.revision == revision;
                    let released = c.released_ms.unwrap_or(now_ms);
                    if on_revision && o.health == ObservedHealth::Healthy {
                        // No event: a timeline of wave transitions and failures reads better than one line per
                        // cluster (the counts are in the status).
                        c.outcome = ClusterOutcome::Healthy;
                    } else if on_revision && o.health == ObservedHealth::Degraded {
                        c.outcome = ClusterOutcome::Failed(if o.reason.is_empty() {
                            "degraded".into()
                        } else {
                            o.reason.clone()
                        });
                    } else if !o.online && offline_rule == Offline::Fail {
                        c.outcome = ClusterOutcome::Failed("offline".into());
                    } else if now_ms - released >= deadline_ms {
                        let why = if !o.online {
                            "offline past the progress deadline".to_string()
                        } else if o.reason.is_empty() {
                            format!("not healthy on {} within {} s", short(&revision), w.spec.progress_deadline_seconds)
                        } else {
                            format!("progress deadline exceeded: {}", o.reason)
                        };
                        c.outcome = ClusterOutcome::Failed(why);
                    }
                    if let ClusterOutcome::Failed(why) = &c.outcome {
                        actions.push(Action::Event(format!("{} failed: {why}", c.name)));
                    }
                }
                // A cluster that was healthy and degrades during the bake fails the same way.
                ClusterOutcome::Healthy if o.revision == revision && o.health == ObservedHealth::Degraded => {
                    let why = if o.reason.is_empty() { "degraded".to_string() } else { o.reason.clone() };
                    actions.push(Action::Event(format!("{} failed after it was healthy: {why}", c.name)));
                    c.outcome = ClusterOutcome::Failed(why);
                }
                _ => {}
            }
        }
        // 2. The failure budget.
        let failed: Vec<&ClusterProgress> =
            w.clusters.iter().filter(|c| matches!(c.outcome, ClusterOutcome::Failed(_))).collect();
        if failed.len() > w.spec.failure_budget.of(n) {
            let first = failed[0];
            let why = match &first.outcome {
                ClusterOutcome::Failed(r) => format!("{}: {r}", first.name),
                _ => String::new(),
            };
            let why = format!("wave {} failed: {why}", w.spec.name);
            w.phase = WavePhase::Failed(why.clone());
            actions.push(Action::Event(why.clone()));
            match (w.spec.on_failure, r.previous.clone()) {
                (OnFailure::Rollback, Some(previous)) => {
                    for c in w.clusters.iter_mut().filter(|c| c.released_ms.is_some()) {
                        c.outcome = ClusterOutcome::RolledBack;
                        actions.push(Action::Revert { cluster: c.name.clone(), revision: previous.clone() });
                    }
                    actions.push(Action::Event(format!("wave {} rolled back to {}", w.spec.name, short(&previous))));
                    r.phase = RolloutPhase::RolledBack(why);
                }
                _ => r.phase = RolloutPhase::Failed(why),
            }
            return actions;
        }
        // 3. Releases, within maxParallel, in name order.
        if w.phase == WavePhase::Progressing {
            let limit = w.spec.max_parallel.map_or(n, |m| m.of(n)).max(1);
            let mut updating = w.clusters.iter().filter(|c| c.outcome == ClusterOutcome::Updating).count();
            for c in w.clusters.iter_mut().filter(|c| c.outcome == ClusterOutcome::Pending) {
                if updating >= limit {
                    break;
                }
                let o = obs.get(&c.name).unwrap_or(&unknown);
                if !o.online && offline_rule == Offline::Skip {
                    c.outcome = ClusterOutcome::Skipped;
                    actions.push(Action::Event(format!("{} skipped: offline", c.name)));
                    continue;
                }
                c.outcome = ClusterOutcome::Updating;
                c.released_ms = Some(now_ms);
                updating += 1;
                actions.push(Action::Release { cluster: c.name.clone() });
            }
            let done = w.clusters.iter().all(|c| {
                matches!(c.outcome, ClusterOutcome::Healthy | ClusterOutcome::Failed(_) | ClusterOutcome::Skipped)
            });
            if done {
                w.phase = WavePhase::Baking { until_ms: now_ms + (w.spec.bake_seconds as i64) * 1000 };
                actions.push(Action::Event(format!("wave {} baking for {} s", w.spec.name, w.spec.bake_seconds)));
            }
        }
        // 4. The bake.
        if let WavePhase::Baking { until_ms } = w.phase {
            if now_ms >= until_ms {
                w.phase = WavePhase::Passed;
                actions.push(Action::Event(format!("wave {} passed", w.spec.name)));
                continue;
            }
        }
        return actions;
    }
    r.phase = RolloutPhase::Complete;
    actions.push(Action::Event(format!("rollout of {} complete", short(&r.revision))));
    actions
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

/// Operator controls. Each returns an error saying why it does not apply.
pub fn pause(r: &mut Rollout) -> Result<(), String> {
    match r.phase {
        RolloutPhase::Progressing => {
            r.phase = RolloutPhase::Paused;
            Ok(())
        }
        ref p => Err(format!("the rollout is {p}, not progressing")),
    }
}

pub fn resume(r: &mut Rollout) -> Result<(), String> {
    match r.phase {
        RolloutPhase::Paused => {
            r.phase = RolloutPhase::Progressing;
            Ok(())
        }
        ref p => Err(format!("the rollout is {p}, not paused")),
    }
}

pub fn approve(r: &mut Rollout, wave: &str, who: &str) -> Result<(), String> {
    let w = r.waves.iter_mut().find(|w| w.spec.name == wave).ok_or_else(|| format!("there is no wave {wave:?}"))?;
    if !w.spec.approval {
        return Err(format!("wave {wave} needs no approval"));
    }
    if w.approved_by.is_some() {
        return Err(format!("wave {wave} is approved already"));
    }
    w.approved_by = Some(who.to_string());
    Ok(())
}

pub fn abort(r: &mut Rollout, who: &str) -> Result<(), String> {
    match r.phase {
        RolloutPhase::Progressing | RolloutPhase::Paused => {
            r.phase = RolloutPhase::Aborted(format!("by {who}"));
            Ok(())
        }
        ref p => Err(format!("the rollout is {p}: nothing to abort")),
    }
}

/// Where a cluster is in the rollout, for `flotilla explain`.
pub fn explain(r: &Rollout, cluster: &str) -> String {
    let Some((k, w)) = r.wave_of(cluster) else {
        return format!("{cluster} is in no wave of this rollout (no wave selects it and there is no final wave)");
    };
    let c = w.clusters.iter().find(|c| c.name == cluster).expect("the cluster is in its wave");
    let rev = short(&r.revision);
    match (&c.outcome, &w.phase) {
        (ClusterOutcome::Healthy, _) => format!("{cluster} runs {rev} (wave {}, healthy)", w.spec.name),
        (ClusterOutcome::Updating, _) => format!("{cluster} is updating to {rev} (wave {})", w.spec.name),
        (ClusterOutcome::Failed(why), _) => format!("{cluster} failed on {rev}: {why}"),
        (ClusterOutcome::RolledBack, _) => format!("{cluster} was rolled back: {}", r.phase),
        (ClusterOutcome::Skipped, _) => {
            format!("{cluster} was skipped: it was offline when wave {} released it", w.spec.name)
        }
        (ClusterOutcome::Pending, _) => {
            if let RolloutPhase::Paused = r.phase {
                return format!("{cluster} waits: the rollout of {rev} is paused");
            }
            if !r.active() {
                return format!("{cluster} does not get {rev}: the rollout is {}", r.phase);
            }
            // The first wave before it that has not passed says why.
            for (i, earlier) in r.waves.iter().enumerate().take(k + 1) {
                match &earlier.phase {
                    WavePhase::Passed => {}
                    WavePhase::AwaitingApproval => {
                        return format!("{cluster} waits: wave {} awaits approval", earlier.spec.name)
                    }
                    WavePhase::Failed(why) => return format!("{cluster} does not get {rev}: {why}"),
                    WavePhase::Baking { .. } if i < k => {
                        return format!("{cluster} waits: wave {} is baking", earlier.spec.name)
                    }
                    _ if i < k => return format!("{cluster} waits: wave {} is {}", earlier.spec.name, earlier.phase),
                    _ => {
                        return format!(
                            "{cluster} waits its turn in wave {} (at most {} clusters at once)",
                            w.spec.name,
                            w.spec.max_parallel.map_or(w.clusters.len(), |m| m.of(w.clusters.len()))
                        )
                    }
                }
            }
            format!("{cluster} waits in wave {}", w.spec.name)
        }
    }
}

#[cfg(test)]
mod stored {
    use super::*;

    fn wave(clusters: Vec<ClusterProgress>) -> WaveState {
        let spec = WaveSpec {
            name: "w".into(),
            selector: LabelSelector::default(),
            max_parallel: None,
            failure_budget: Amount::Count(0),
            bake_seconds: 0,
            progress_deadline_seconds: 600,
            approval: false,
            on_failure: OnFailure::Halt,
        };
        WaveState { spec, phase: WavePhase::Progressing, clusters, approved_by: None }
    }

    #[test]
    fn a_waves_clusters_are_stored_grouped_and_read_back_in_order() {
        let clusters: Vec<ClusterProgress> = (0..10_000)
            .map(|i| ClusterProgress {
                name: format!("c-{i:05}"),
                outcome: match i % 10 {
                    0 => ClusterOutcome::Updating,
                    1 => ClusterOutcome::Failed("not healthy within 600 s".into()),
                    _ => ClusterOutcome::Healthy,
                },
                released_ms: Some(1_700_000_000_000 + (i / 1000) as i64),
            })
            .collect();
        let w = wave(clusters.clone());
        let stored = serde_json::to_vec(&w).unwrap();
        let plain = serde_json::to_vec(&clusters).unwrap();
        assert!(stored.len() * 4 < plain.len(), "grouped {} bytes, plain {} bytes", stored.len(), plain.len());
        assert_eq!(serde_json::from_slice::<WaveState>(&stored).unwrap(), w);
        // The one-object-per-cluster form of earlier versions still reads.
        let mut old = serde_json::to_value(&w).unwrap();
        old["clusters"] = serde_json::to_value(&w.clusters).unwrap();
        assert_eq!(serde_json::from_value::<WaveState>(old).unwrap(), w);
        // Another order is kept as it is.
        let mut shuffled = clusters;
        shuffled.swap(0, 5);
        let w = wave(shuffled);
        assert_eq!(serde_json::from_slice::<WaveState>(&serde_json::to_vec(&w).unwrap()).unwrap(), w);
    }
}

#[cfg(test)]
mod tests;
