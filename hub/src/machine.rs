//! The hub as one state machine, free of I/O. Every change of hub state is a transition computed from the
//! current [`State`]: a Git sync result, a rollout step, an operator control, agents' observations. A
//! transition yields the next state, the store batch that makes it durable, and the clusters whose desired
//! state changed. The hub's writer (crate::hub) commits the batch and only then publishes the next state, so
//! a failed commit changes nothing and readers always see a committed state. [`State::load`] reads the same
//! state back from the store: after a restart memory equals the store.

use crate::audit::AuditRecord;
use crate::keys::{self, Key, Prefix};
use crate::report::{bounded, AppReport, ClusterReport, Rendering, MAX_APPS};
use crate::rollouts::{self, Control, ControlContext, Record};
use crate::state::{advance, Desired, DesiredApp};
use crate::store::{Batch, Store, StoreError};
use flotilla_common::fleet::render::Rendered;
use flotilla_common::fleet::{ClusterSpec, Fleet};
use flotilla_common::rollout::{Observation, ObservedHealth, RolloutSpec};
use flotilla_proto::agent::v1 as pb;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// The apps of one cluster: app → desired state.
pub type Apps = BTreeMap<String, DesiredApp>;

/// Audit records kept: the newest `AUDIT_MAX`, none older than `AUDIT_AGE_MS`.
pub const AUDIT_MAX: usize = 10_000;
pub const AUDIT_AGE_MS: i64 = 90 * 24 * 3600 * 1000;

/// The hub's whole state. Cloning is cheap (per-cluster and per-app values are shared), so every transition
/// builds a new one and readers keep the one they were given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub revision: String,
    pub source_error: Option<String>,
    /// Problems of the current commit: broken files, untargeted apps, apps that cannot be rendered.
    pub problems: Arc<Vec<String>>,
    pub rendering: Rendering,
    pub clusters: Arc<BTreeMap<String, ClusterSpec>>,
    /// Each app's rollout spec at the current commit: none (no waves), or why it is broken.
    pub specs: Arc<BTreeMap<String, Result<Option<RolloutSpec>, String>>>,
    pub desired: BTreeMap<String, Arc<Apps>>,
    pub reports: BTreeMap<String, Arc<ClusterReport>>,
    pub rollouts: BTreeMap<String, Arc<Record>>,
    /// Digests of the bundles in the store.
    pub bundles: Arc<BTreeSet<String>>,
    /// Audit keys, oldest first.
    pub audit: Arc<VecDeque<String>>,
    /// Bootstrap tokens by id (until they expire).
    pub join_tokens: Arc<BTreeMap<String, crate::join::JoinToken>>,
    /// The last time the hub recorded that it runs.
    pub clock_ms: i64,
    /// The desired state was read from per-cluster keys (a store written before releases): the next change of
    /// desired state writes every release and removes those keys.
    pub desired_legacy: bool,
}

/// A new commit, parsed and rendered (outside the writer: rendering may take seconds).
pub struct Synced {
    pub revision: String,
    pub fleet: Arc<Fleet>,
    pub rendered: Rendered,
    pub rendering: Rendering,
}

/// What one agent said since the last flush.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// The apps its Hello says are applied (a new session).
    pub hello: Option<Vec<pb::AppliedApp>>,
    /// Changed app statuses, newest last.
    pub apps: Vec<pb::AppStatus>,
    pub seen_ms: i64,
    /// The agent's reach of its API server, when it changed.
    pub api: Option<pb::ApiServer>,
    /// The agent's version and protocol revision (a new session).
    pub agent: Option<(String, u32)>,
}

impl Observed {
    /// Adds what arrived later.
    pub fn merge(&mut self, later: Observed) {
        if later.hello.is_some() {
            self.hello = later.hello;
        }
        if later.api.is_some() {
            self.api = later.api;
        }
        if later.agent.is_some() {
            self.agent = later.agent;
        }
        for a in later.apps {
            self.apps.retain(|x| x.app != a.app);
            self.apps.push(a);
        }
        self.seen_ms = self.seen_ms.max(later.seen_ms);
    }
}

/// A transition: the next state, what makes it durable, whom it concerns, and the answer for the caller.
#[derive(Debug)]
pub struct Transition {
    pub next: State,
    pub batch: Batch,
    /// Clusters whose desired state (or membership of the inventory) changed: their sessions wake.
    pub woken: BTreeSet<String>,
    pub reply: Result<String, String>,
}

impl Transition {
    fn unchanged(state: &State) -> Transition {
        Transition { next: state.clone(), batch: Batch::default(), woken: BTreeSet::new(), reply: Ok(String::new()) }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store holds an unreadable value under {key}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl State {
    /// The state a previous run left in the store.
    pub fn load(store: &dyn Store) -> Result<State, LoadError> {
        fn parse<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, LoadError> {
            serde_json::from_slice(v).map_err(|source| LoadError::Corrupt { key: key.to_string(), source })
        }
        let text = |k: Key| -> Result<Option<String>, LoadError> {
            Ok(store.get(&k.path())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
        };
        let value = |k: Key| -> Result<Option<Vec<u8>>, LoadError> { Ok(store.get(&k.path())?) };
        let mut st = State {
            revision: text(Key::Revision)?.unwrap_or_default(),
            source_error: text(Key::SourceError)?,
            clock_ms: text(Key::Clock)?.and_then(|t| t.parse().ok()).unwrap_or_default(),
            ..State::default()
        };
        if let Some(v) = value(Key::Clusters)? {
            st.clusters = Arc::new(parse(&Key::Clusters.path(), &v)?);
        }
        if let Some(v) = value(Key::Problems)? {
            st.problems = Arc::new(parse(&Key::Problems.path(), &v)?);
        }
        if let Some(v) = value(Key::Rendering)? {
            st.rendering = parse(&Key::Rendering.path(), &v)?;
        }
        if let Some(v) = value(Key::Specs)? {
            st.specs = Arc::new(parse(&Key::Specs.path(), &v)?);
        }
        for (k, v) in store.scan(Prefix::Desired.as_str())? {
            st.desired.insert(Prefix::Desired.name(&k).to_string(), Arc::new(parse(&k, &v)?));
            st.desired_legacy = true;
        }
        if let Some(v) = value(Key::DesiredClusters)? {
            let clusters: Vec<String> = parse(&Key::DesiredClusters.path(), &v)?;
            let mut desired: BTreeMap<String, Apps> = clusters.into_iter().map(|c| (c, Apps::new())).collect();
            for (k, v) in store.scan(Prefix::Release.as_str())? {
                let app = Prefix::Release.name(&k);
                for (c, d) in rollouts::ungroup(parse(&k, &v)?) {
                    desired.entry(c).or_default().insert(app.to_string(), d);
                }
            }
            st.desired.extend(desired.into_iter().map(|(c, a)| (c, Arc::new(a))));
        }
        for (k, v) in store.scan(Prefix::Report.as_str())? {
            st.reports.insert(Prefix::Report.name(&k).to_string(), Arc::new(parse(&k, &v)?));
        }
        let data: BTreeMap<String, Vec<u8>> = store
            .scan(Prefix::RolloutData.as_str())?
            .into_iter()
            .map(|(k, v)| (Prefix::RolloutData.name(&k).to_string(), v))
            .collect();
        for (k, v) in store.scan(Prefix::Rollout.as_str())? {
            let app = Prefix::Rollout.name(&k).to_string();
            let rec = Record::from_stored(Some(&v), data.get(&app).map(Vec::as_slice))
                .map_err(|source| LoadError::Corrupt { key: k.clone(), source })?;
            st.rollouts.insert(app, Arc::new(rec));
        }
        st.bundles =
            Arc::new(store.keys(Prefix::Bundle.as_str())?.iter().map(|k| Prefix::Bundle.name(k).to_string()).collect());
        st.audit = Arc::new(store.keys(Prefix::Audit.as_str())?.into_iter().collect());
        let mut tokens = BTreeMap::new();
        for (k, v) in store.scan(Prefix::JoinToken.as_str())? {
            tokens.insert(Prefix::JoinToken.name(&k).to_string(), parse(&k, &v)?);
        }
        st.join_tokens = Arc::new(tokens);
        Ok(st)
    }

    /// The reports of `clusters` written again as this state holds them (another replica overwrote them with
    /// an older copy). The state does not change.
    pub fn rewritten(&self, clusters: &BTreeSet<String>) -> Transition {
        let mut batch = Batch::default();
        for c in clusters {
            if let Some(r) = self.reports.get(c) {
                batch = batch.put(Key::Report(c).path(), json(&**r));
            }
        }
        Transition { next: self.clone(), batch, woken: BTreeSet::new(), reply: Ok(String::new()) }
    }

    /// This state with store keys changed by another writer (a replica following the leader through etcd):
    /// `changes` maps a store key to its new value (None: deleted). A rollout's record is made of two keys;
    /// when only one of them changed, the other is read from `store`. Returns the next state and the clusters
    /// whose desired state (or membership of the inventory) changed. Applying every key of a store to an empty
    /// state gives what [`State::load`] reads.
    pub fn apply_changes(
        &self,
        changes: &BTreeMap<String, Option<Vec<u8>>>,
        store: &dyn Store,
    ) -> Result<(State, BTreeSet<String>), LoadError> {
        fn parse<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, LoadError> {
            serde_json::from_slice(v).map_err(|source| LoadError::Corrupt { key: key.to_string(), source })
        }
        let text = |v: &Option<Vec<u8>>| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned());
        let mut next = self.clone();
        let mut woken = BTreeSet::new();
        let mut rollouts: BTreeSet<&str> = BTreeSet::new();
        let mut releases: BTreeMap<&str, &Option<Vec<u8>>> = BTreeMap::new();
        let (mut bundles, mut audit) = (None::<BTreeSet<String>>, None::<BTreeSet<String>>);
        for (k, v) in changes {
            match k.as_str() {
                "source/revision" => next.revision = text(v).unwrap_or_default(),
                "source/error" => next.source_error = text(v),
                "hub/clock" => next.clock_ms = text(v).and_then(|t| t.parse().ok()).unwrap_or_default(),
                "fleet/clusters" => {
                    let clusters: BTreeMap<String, ClusterSpec> =
                        v.as_ref().map(|v| parse(k, v)).transpose()?.unwrap_or_default();
                    let before = &*self.clusters;
                    let changed = before.keys().chain(clusters.keys()).filter(|c| before.get(*c) != clusters.get(*c));
                    woken.extend(changed.cloned());
                    next.clusters = Arc::new(clusters);
                }
                "fleet/problems" => {
                    next.problems = Arc::new(v.as_ref().map(|v| parse(k, v)).transpose()?.unwrap_or_default())
                }
                "fleet/rendering" => next.rendering = v.as_ref().map(|v| parse(k, v)).transpose()?.unwrap_or_default(),
                "fleet/specs" => {
                    next.specs = Arc::new(v.as_ref().map(|v| parse(k, v)).transpose()?.unwrap_or_default())
                }
                "fleet/desired-clusters" => {
                    let listed: BTreeSet<String> = v.as_ref().map(|v| parse(k, v)).transpose()?.unwrap_or_default();
                    let unlisted: Vec<String> = next.desired.keys().filter(|c| !listed.contains(*c)).cloned().collect();
                    for c in unlisted {
                        next.desired.remove(&c);
                        woken.insert(c);
                    }
                    for c in listed {
                        if !next.desired.contains_key(&c) {
                            next.desired.insert(c.clone(), Arc::new(Apps::new()));
                            woken.insert(c);
                        }
                    }
                    next.desired_legacy = false;
                }
                _ if k.starts_with(Prefix::Release.as_str()) => {
                    releases.insert(Prefix::Release.name(k), v);
                }
                _ if k.starts_with(Prefix::Desired.as_str()) => {
                    let c = Prefix::Desired.name(k).to_string();
                    match v {
                        Some(v) => {
                            next.desired_legacy = true;
                            next.desired.insert(c.clone(), Arc::new(parse(k, v)?))
                        }
                        None => next.desired.remove(&c),
                    };
                    woken.insert(c);
                }
                _ if k.starts_with(Prefix::Report.as_str()) => {
                    let c = Prefix::Report.name(k).to_string();
                    match v {
                        Some(v) => next.reports.insert(c, Arc::new(parse(k, v)?)),
                        None => next.reports.remove(&c),
                    };
                }
                _ if k.starts_with(Prefix::RolloutData.as_str()) => {
                    rollouts.insert(Prefix::RolloutData.name(k));
                }
                _ if k.starts_with(Prefix::Rollout.as_str()) => {
                    rollouts.insert(Prefix::Rollout.name(k));
                }
                _ if k.starts_with(Prefix::Bundle.as_str()) => {
                    let set = bundles.get_or_insert_with(|| (*self.bundles).clone());
                    let d = Prefix::Bundle.name(k).to_string();
                    if v.is_some() {
                        set.insert(d);
                    } else {
                        set.remove(&d);
                    }
                }
                _ if k.starts_with(Prefix::Audit.as_str()) => {
                    let set = audit.get_or_insert_with(|| self.audit.iter().cloned().collect());
                    if v.is_some() {
                        set.insert(k.clone());
                    } else {
                        set.remove(k);
                    }
                }
                _ => {}
            }
        }
        // Releases after the clusters with a record (`fleet/desired-clusters` sorts before them).
        for (app, v) in releases {
            let key = Key::Release(app).path();
            let members: rollouts::PerCluster = match v {
                Some(v) => rollouts::ungroup(parse(&key, v)?),
                None => rollouts::PerCluster::new(),
            };
            let names: BTreeSet<String> = next.desired.keys().chain(members.keys()).cloned().collect();
            for c in names {
                let now = members.get(&c);
                let had = next.desired.get(&c).and_then(|m| m.get(app));
                if now == had {
                    continue;
                }
                let apps = Arc::make_mut(next.desired.entry(c.clone()).or_default());
                match now {
                    Some(d) => apps.insert(app.to_string(), d.clone()),
                    None => apps.remove(app),
                };
                woken.insert(c);
            }
        }
        for app in rollouts {
            let (pk, dk) = (Key::Rollout(app).path(), Key::RolloutData(app).path());
            let part = |key: &str| -> Result<Option<Vec<u8>>, LoadError> {
                match changes.get(key) {
                    Some(v) => Ok(v.clone()),
                    None => Ok(store.get(key)?),
                }
            };
            let (progress, data) = (part(&pk)?, part(&dk)?);
            if progress.is_none() {
                next.rollouts.remove(app);
                continue;
            }
            let rec = Record::from_stored(progress.as_deref(), data.as_deref())
                .map_err(|source| LoadError::Corrupt { key: pk.clone(), source })?;
            next.rollouts.insert(app.to_string(), Arc::new(rec));
        }
        if let Some(b) = bundles {
            next.bundles = Arc::new(b);
        }
        if let Some(a) = audit {
            next.audit = Arc::new(a.into_iter().collect());
        }
        Ok((next, woken))
    }

    /// The desired state as one map (for the pure functions of `state` and `rollouts`).
    pub fn desired_map(&self) -> Desired {
        self.desired.iter().map(|(c, a)| (c.clone(), (**a).clone())).collect()
    }

    /// Clusters → labels.
    pub fn labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.clusters.iter().map(|(c, s)| (c.clone(), s.labels.clone())).collect()
    }

    /// Every bundle digest the hub may still send.
    fn referenced(&self) -> BTreeSet<&str> {
        let mut out: BTreeSet<&str> = self
            .desired
            .values()
            .flat_map(|a| a.values())
            .map(|d| d.digest.as_str())
            .filter(|d| !d.is_empty())
            .collect();
        out.extend(self.rollouts.values().flat_map(|r| r.digests()));
        out
    }

    /// The store keys of the desired state that changed from this state to `next`: `releases/<app>` of every app
    /// whose value changed on some cluster (all its clusters, grouped by value: a wave step is a few keys
    /// whatever the number of clusters it releases), `fleet/desired-clusters` when the clusters with a record
    /// changed. A state read from per-cluster keys writes everything once and removes them.
    fn write_desired(&self, next: &mut State, batch: &mut Batch) {
        let mut apps: BTreeSet<String> = BTreeSet::new();
        let migrate = self.desired_legacy;
        let clusters: BTreeSet<&String> = self.desired.keys().chain(next.desired.keys()).collect();
        for c in clusters {
            let (a, b) = (self.desired.get(c), next.desired.get(c));
            if migrate || a.zip(b).is_some_and(|(a, b)| Arc::ptr_eq(a, b)) {
                continue;
            }
            let (a, b) = (a.map(|m| &**m), b.map(|m| &**m));
            for app in a.into_iter().flat_map(|m| m.keys()).chain(b.into_iter().flat_map(|m| m.keys())) {
                if a.and_then(|m| m.get(app)) != b.and_then(|m| m.get(app)) {
                    apps.insert(app.clone());
                }
            }
        }
        if migrate {
            apps.extend(next.desired.values().flat_map(|m| m.keys().cloned()));
            for c in self.desired.keys() {
                batch.0.push(crate::store::Op::Delete(Key::Desired(c).path()));
            }
            next.desired_legacy = false;
        }
        for app in &apps {
            let groups = rollouts::group(next.desired.iter().filter_map(|(c, m)| m.get(app).map(|d| (c, d))));
            batch.0.push(match groups.is_empty() {
                true => crate::store::Op::Delete(Key::Release(app).path()),
                false => crate::store::Op::Put(Key::Release(app).path(), json(&groups)),
            });
        }
        if migrate || !self.desired.keys().eq(next.desired.keys()) {
            let names: Vec<&String> = next.desired.keys().collect();
            batch.0.push(crate::store::Op::Put(Key::DesiredClusters.path(), json(&names)));
        }
    }

    /// Writes one cluster's desired state into `next` and the batch, if it changed.
    fn put_desired(&self, next: &mut State, woken: &mut BTreeSet<String>, c: &str, apps: Apps) {
        if self.desired.get(c).map(|a| &**a) == Some(&apps) {
            return;
        }
        next.desired.insert(c.to_string(), Arc::new(apps));
        woken.insert(c.to_string());
    }

    fn put_record(batch: &mut Batch, app: &str, rec: &Record, data: bool) {
        batch.0.push(crate::store::Op::Put(Key::Rollout(app).path(), rec.progress_json()));
        if data {
            batch.0.push(crate::store::Op::Put(Key::RolloutData(app).path(), rec.data_json()));
        }
    }

    fn clone_desired(&self, c: &str) -> Option<Apps> {
        self.desired.get(c).map(|a| (**a).clone())
    }

    // -----------------------------------------------------------------------------------------------------
    // Transitions
    // -----------------------------------------------------------------------------------------------------

    /// A new commit: advance every cluster's desired state, gate it through the apps' rollouts, store the new
    /// bundles, collect the ones nothing references any more.
    pub fn synced(&self, s: &Synced, now_ms: i64) -> Transition {
        let fleet = &*s.fleet;
        let prev = self.desired_map();
        let mut adv = advance(&prev, fleet, &s.rendered, &s.revision);
        let mut records: BTreeMap<String, Record> =
            self.rollouts.iter().map(|(a, r)| (a.clone(), (**r).clone())).collect();
        let touched = rollouts::gate(&mut records, fleet, &prev, &mut adv.desired, &s.revision, now_ms);
        let mut next = self.clone();
        let mut batch = Batch::default();
        let mut woken = BTreeSet::new();
        // A cluster whose file is broken stays in the inventory with its previous labels.
        let mut clusters = fleet.clusters.clone();
        for name in fleet.broken_clusters.keys() {
            if let Some(spec) = self.clusters.get(name) {
                clusters.insert(name.clone(), spec.clone());
            }
        }
        for c in clusters.keys().filter(|c| !self.clusters.contains_key(*c)) {
            woken.insert(c.clone());
        }
        for c in self.clusters.keys().filter(|c| !clusters.contains_key(*c)) {
            woken.insert(c.clone());
        }
        for (c, apps) in &adv.desired {
            self.put_desired(&mut next, &mut woken, c, apps.clone());
        }
        for gone in self.desired.keys().filter(|c| !adv.desired.contains_key(*c)) {
            next.desired.remove(gone);
            woken.insert(gone.clone());
        }
        for app in &touched {
            if let Some(rec) = records.remove(app) {
                Self::put_record(&mut batch, app, &rec, true);
                next.rollouts.insert(app.clone(), Arc::new(rec));
            }
        }
        // Reports keep only the apps the cluster is now meant to run; clusters that left the fleet lose theirs.
        for (c, rep) in &self.reports {
            if !clusters.contains_key(c) {
                batch = batch.delete(Key::Report(c).path());
                next.reports.remove(c);
                continue;
            }
            let targeted =
                rollouts::targeted(next.desired.get(c).map(|a| &**a), next.rollouts.iter().map(|(a, r)| (a, &**r)), c);
            if rep.apps.keys().any(|a| !targeted.contains(a.as_str())) {
                let mut r = (**rep).clone();
                r.apps.retain(|a, _| targeted.contains(a.as_str()));
                batch = batch.put(Key::Report(c).path(), json(&r));
                next.reports.insert(c.clone(), Arc::new(r));
            }
        }
        // Bundles: the new ones, then collect what nothing references.
        let mut bundles = (*self.bundles).clone();
        for (digest, bundle) in &adv.bundles {
            if bundles.insert(digest.clone()) {
                batch = batch.put(Key::Bundle(digest).path(), bundle.bytes.clone());
            }
        }
        next.clusters = Arc::new(clusters);
        let referenced: BTreeSet<String> = next.referenced().into_iter().map(str::to_string).collect();
        for gone in bundles.iter().filter(|d| !referenced.contains(*d)) {
            batch = batch.delete(Key::Bundle(gone).path());
        }
        bundles.retain(|d| referenced.contains(d));
        next.bundles = Arc::new(bundles);
        // The specs, so controls work after a restart without re-reading Git.
        let specs: BTreeMap<String, Result<Option<RolloutSpec>, String>> = fleet
            .apps
            .keys()
            .map(|a| (a.clone(), fleet.rollout_for(a).map(|s| s.cloned()).map_err(|e| e.to_string())))
            .collect();
        let mut problems = fleet.problems();
        problems.extend(app_problems(&adv.desired));
        next.specs = Arc::new(specs);
        next.problems = Arc::new(problems);
        next.rendering = s.rendering;
        next.revision = s.revision.clone();
        next.source_error = None;
        batch = batch
            .put(Key::Clusters.path(), json(&*next.clusters))
            .put(Key::Problems.path(), json(&*next.problems))
            .put(Key::Rendering.path(), json(&next.rendering))
            .put(Key::Specs.path(), json(&*next.specs))
            .put(Key::Revision.path(), s.revision.clone())
            .delete(Key::SourceError.path());
        self.write_desired(&mut next, &mut batch);
        Transition { next, batch, woken, reply: Ok(format!("advanced to {}", s.revision)) }
    }

    /// Following the repository failed: the last good state stays, with the error.
    pub fn source_failed(&self, msg: &str) -> Transition {
        let mut next = self.clone();
        next.source_error = Some(msg.to_string());
        let batch = Batch::default().put(Key::SourceError.path(), msg.to_string());
        Transition { next, batch, woken: BTreeSet::new(), reply: Ok(String::new()) }
    }

    /// The repository was followed and has no new commit.
    pub fn source_current(&self) -> Transition {
        if self.source_error.is_none() {
            return Transition::unchanged(self);
        }
        let mut next = self.clone();
        next.source_error = None;
        Transition {
            next,
            batch: Batch::default().delete(Key::SourceError.path()),
            woken: BTreeSet::new(),
            reply: Ok(String::new()),
        }
    }

    /// What the clusters of a rollout report for its app. `online` says whether a cluster's agent is
    /// connected (or may still reconnect, in the restart grace).
    fn observations(&self, app: &str, rec: &Record, online: &dyn Fn(&str) -> bool) -> BTreeMap<String, Observation> {
        let Some(r) = &rec.rollout else { return BTreeMap::new() };
        r.waves
            .iter()
            .flat_map(|w| &w.clusters)
            .map(|c| {
                let report = self.reports.get(&c.name).and_then(|rep| rep.apps.get(app)).map(|a| &a.0);
                // A failure reported before the cluster was released says nothing about the release (a retry of
                // content a cluster already runs): it counts once the agent reports again, or at the deadline.
                let stale = |a: &pb::AppStatus| c.released_ms.is_some_and(|r| a.changed_unix_ms < r);
                let health = match report {
                    Some(a) if stale(a) && a.phase == pb::Phase::Failed as i32 => ObservedHealth::Progressing,
                    Some(a) if stale(a) && a.health == pb::Health::Degraded as i32 => ObservedHealth::Progressing,
                    Some(a) if a.phase == pb::Phase::Failed as i32 => ObservedHealth::Degraded,
                    // Healthy counts once the whole revision is applied.
                    Some(a) if a.phase != pb::Phase::Applied as i32 => ObservedHealth::Progressing,
                    Some(a) => match pb::Health::try_from(a.health).unwrap_or(pb::Health::Unspecified) {
                        pb::Health::Healthy => ObservedHealth::Healthy,
                        pb::Health::Degraded => ObservedHealth::Degraded,
                        pb::Health::Progressing | pb::Health::Missing => ObservedHealth::Progressing,
                        pb::Health::Unspecified | pb::Health::Unknown => ObservedHealth::Unknown,
                    },
                    None => ObservedHealth::Unknown,
                };
                let reason = report
                    .map(|a| if !a.message.is_empty() { a.message.clone() } else { a.health_reason.clone() })
                    .unwrap_or_default();
                // Content decides: a cluster that runs the rollout's bundle runs its revision, whatever commit
                // the bundle was last announced with.
                let candidate = rec.data.candidates.get(&c.name).map(|d| d.digest.as_str());
                let revision = match report {
                    Some(a) if Some(a.digest.as_str()) == candidate => r.revision.clone(),
                    Some(a) => a.revision.clone(),
                    None => String::new(),
                };
                (c.name.clone(), Observation { online: online(&c.name), revision, health, reason })
            })
            .collect()
    }

    /// One planner step for every active rollout.
    pub fn tick(&self, now_ms: i64, online: &dyn Fn(&str) -> bool) -> Transition {
        let mut next = self.clone();
        let mut batch = Batch::default();
        let mut woken = BTreeSet::new();
        for (app, rec) in &self.rollouts {
            if !rec.rollout.as_ref().is_some_and(|r| r.active()) {
                continue;
            }
            let obs = self.observations(app, rec, online);
            let mut rec = (**rec).clone();
            let stepped = rollouts::drive(&mut rec, &obs, now_ms);
            if !stepped.progressed && stepped.changes.is_empty() {
                continue;
            }
            apply_changes(&mut next, &mut woken, app, stepped.changes);
            Self::put_record(&mut batch, app, &rec, stepped.completed);
            next.rollouts.insert(app.clone(), Arc::new(rec));
        }
        self.write_desired(&mut next, &mut batch);
        Transition { next, batch, woken, reply: Ok(String::new()) }
    }

    /// An operator's control, recorded (who, what, when, the answer) whether it applies or not.
    pub fn control(&self, app: &str, action: &Control, who: &str, now_ms: i64, seq: u64) -> Transition {
        let mut next = self.clone();
        let mut batch = Batch::default();
        let mut woken = BTreeSet::new();
        let labels = self.labels();
        let spec = self.specs.get(app).and_then(|s| s.as_ref().ok()).and_then(|s| s.as_ref());
        let current = rollouts::per_cluster(&self.desired_map_of(app), app);
        let mut rec = self.rollouts.get(app).map(|r| (**r).clone()).unwrap_or_default();
        let ctx = ControlContext { labels: &labels, spec, who, now_ms };
        let result = rollouts::control(app, &mut rec, &current, &ctx, action);
        let reply = match result {
            Ok((message, changes)) => {
                apply_changes(&mut next, &mut woken, app, changes);
                Self::put_record(&mut batch, app, &rec, true);
                next.rollouts.insert(app.to_string(), Arc::new(rec));
                Ok(message)
            }
            Err(e) => Err(e),
        };
        let (action_name, detail) = match action {
            Control::Pause => ("pause", String::new()),
            Control::Resume => ("resume", String::new()),
            Control::Approve(w) => ("approve", format!("wave {w}")),
            Control::Abort => ("abort", String::new()),
            Control::Retry => ("retry", String::new()),
            Control::Rollback { revision, immediate } => {
                ("rollback", format!("to {revision}{}", if *immediate { " at once" } else { "" }))
            }
        };
        let rec = AuditRecord {
            at_unix_ms: now_ms,
            who: who.to_string(),
            action: action_name.to_string(),
            app: app.to_string(),
            detail,
            allowed: true,
            answer: match &reply {
                Ok(m) => m.clone(),
                Err(e) => format!("refused: {e}"),
            },
            replica: String::new(),
        };
        Self::put_audit(&mut next, &mut batch, &rec, seq, true);
        self.write_desired(&mut next, &mut batch);
        Transition { next, batch, woken, reply }
    }

    /// A new bootstrap token (`id`), recorded with `rec`; tokens that expired are removed.
    pub fn token_created(&self, id: &str, token: &crate::join::JoinToken, rec: &AuditRecord, seq: u64) -> Transition {
        let mut next = self.clone();
        let mut batch = Batch::default();
        let mut tokens = (*self.join_tokens).clone();
        tokens.retain(|old, t| {
            let keep = t.expires_ms > rec.at_unix_ms;
            if !keep {
                batch = std::mem::take(&mut batch).delete(format!("{}{old}", Prefix::JoinToken.as_str()));
            }
            keep
        });
        tokens.insert(id.to_string(), token.clone());
        batch = batch.put(format!("{}{id}", Prefix::JoinToken.as_str()), json(token));
        next.join_tokens = Arc::new(tokens);
        Self::put_audit(&mut next, &mut batch, rec, seq, true);
        Transition { next, batch, woken: BTreeSet::new(), reply: Ok(String::new()) }
    }

    /// A join with token `id`.`secret` by `cluster`: one use spent when it may proceed (double opt-in,
    /// `join::admit`), recorded either way.
    pub fn joined(&self, id: &str, secret: &str, cluster: &str, rec: &AuditRecord, seq: u64) -> Transition {
        let mut next = self.clone();
        let mut batch = Batch::default();
        let token = self.join_tokens.get(id);
        let decided = crate::join::admit(id, token, secret, cluster, self.clusters.get(cluster), rec.at_unix_ms);
        let mut rec = rec.clone();
        match (&decided, token) {
            (Ok(()), Some(t)) => {
                let t = crate::join::JoinToken { uses_left: t.uses_left - 1, ..t.clone() };
                batch = batch.put(format!("{}{id}", Prefix::JoinToken.as_str()), json(&t));
                let mut tokens = (*self.join_tokens).clone();
                tokens.insert(id.to_string(), t);
                next.join_tokens = Arc::new(tokens);
            }
            (Err(e), _) => {
                rec.allowed = false;
                rec.answer = format!("refused: {e}");
            }
            (Ok(()), None) => unreachable!("admit needs the token"),
        }
        Self::put_audit(&mut next, &mut batch, &rec, seq, true);
        Transition { next, batch, woken: BTreeSet::new(), reply: decided.map(|()| String::new()) }
    }

    /// An audit record on its own (a refusal, a refresh, a join token): written, and (by the leader) the
    /// oldest records past the count or the age removed. A standby only adds its record.
    pub fn audited(&self, rec: &AuditRecord, seq: u64, prune: bool) -> Transition {
        let mut next = self.clone();
        let mut batch = Batch::default();
        Self::put_audit(&mut next, &mut batch, rec, seq, prune);
        Transition { next, batch, woken: BTreeSet::new(), reply: Ok(String::new()) }
    }

    fn put_audit(next: &mut State, batch: &mut Batch, rec: &AuditRecord, seq: u64, prune: bool) {
        let now_ms = rec.at_unix_ms;
        let key = keys::audit(now_ms, seq);
        *batch = std::mem::take(batch).put(key.clone(), json(rec));
        let mut kept = (*next.audit).clone();
        kept.push_back(key);
        while prune
            && (kept.len() > AUDIT_MAX
                || kept.front().and_then(|k| keys::audit_time(k)).is_some_and(|t| t < now_ms - AUDIT_AGE_MS))
        {
            if let Some(old) = kept.pop_front() {
                *batch = std::mem::take(batch).delete(old);
            }
        }
        next.audit = Arc::new(kept);
    }

    /// The desired state of one app only, as a map (cheaper than the whole).
    fn desired_map_of(&self, app: &str) -> Desired {
        self.desired
            .iter()
            .filter_map(|(c, a)| a.get(app).map(|d| (c.clone(), BTreeMap::from([(app.to_string(), d.clone())]))))
            .collect()
    }

    /// Agents' hellos and status reports since the last flush: one batch for all clusters, only clusters of the
    /// inventory, only apps the cluster is meant to run (or, in a Hello, runs), within the report bounds.
    pub fn observed(&self, obs: BTreeMap<String, Observed>) -> Transition {
        let mut next = self.clone();
        let mut batch = Batch::default();
        for (c, o) in obs {
            if !self.clusters.contains_key(&c) {
                continue;
            }
            let targeted = rollouts::targeted(
                self.desired.get(&c).map(|a| &**a),
                self.rollouts.iter().map(|(a, r)| (a, &**r)),
                &c,
            );
            let mut rep = self.reports.get(&c).map(|r| (**r).clone()).unwrap_or_default();
            let before = rep.clone();
            if let Some(hello) = &o.hello {
                for a in hello.iter().filter(|a| !a.digest.is_empty()) {
                    let known = rep.apps.get(&a.app).is_some_and(|r| r.0.digest == a.digest);
                    if !known && (rep.apps.contains_key(&a.app) || rep.apps.len() < MAX_APPS) {
                        rep.apps.insert(
                            a.app.clone(),
                            AppReport(pb::AppStatus {
                                app: String::new(),
                                digest: a.digest.clone(),
                                revision: a.revision.clone(),
                                phase: pb::Phase::Applied as i32,
                                ..Default::default()
                            }),
                        );
                    }
                }
            }
            for a in o.apps {
                let allowed = targeted.contains(a.app.as_str()) || rep.apps.contains_key(&a.app);
                if !allowed || (!rep.apps.contains_key(&a.app) && rep.apps.len() >= MAX_APPS) {
                    continue;
                }
                let app = a.app.clone();
                let mut status = bounded(a);
                status.app = String::new();
                rep.apps.insert(app, AppReport(status));
            }
            if let Some(api) = o.api {
                rep.api_down = (api.unreachable_since_unix_ms != 0).then(|| {
                    let mut error = api.error;
                    crate::report::clip(&mut error, 1024);
                    (api.unreachable_since_unix_ms, error)
                });
            }
            if o.agent.is_some() {
                rep.agent = o.agent.map(|(mut v, p)| {
                    crate::report::clip(&mut v, 64);
                    (v, p)
                });
            }
            if rep != before || before.last_seen_unix_ms == 0 {
                rep.last_seen_unix_ms = o.seen_ms;
                batch = batch.put(Key::Report(&c).path(), json(&rep));
                next.reports.insert(c, Arc::new(rep));
            }
        }
        Transition { next, batch: batch.soft(), woken: BTreeSet::new(), reply: Ok(String::new()) }
    }

    /// The hub starts again after `down_ms`: running rollouts' timers move on by that much, so the time the hub
    /// was down counts neither against progress deadlines nor as bake time.
    pub fn resumed(&self, down_ms: i64, now_ms: i64) -> Transition {
        let mut next = self.clone();
        let mut batch = Batch::default();
        for (app, rec) in &self.rollouts {
            if !rec
                .rollout
                .as_ref()
                .is_some_and(|r| r.active() || r.phase == flotilla_common::rollout::RolloutPhase::Paused)
            {
                continue;
            }
            let mut rec = (**rec).clone();
            if let Some(r) = rec.rollout.as_mut() {
                r.shift(down_ms);
            }
            Self::put_record(&mut batch, app, &rec, false);
            next.rollouts.insert(app.clone(), Arc::new(rec));
        }
        next.clock_ms = now_ms;
        batch = batch.put(Key::Clock.path(), now_ms.to_string());
        Transition { next, batch, woken: BTreeSet::new(), reply: Ok(String::new()) }
    }

    /// Records that the hub runs at `now_ms` (for the downtime of a later restart).
    pub fn clock(&self, now_ms: i64) -> Transition {
        let mut next = self.clone();
        next.clock_ms = now_ms;
        Transition {
            next,
            batch: Batch::default().put(Key::Clock.path(), now_ms.to_string()),
            woken: BTreeSet::new(),
            reply: Ok(String::new()),
        }
    }

    /// Whether any rollout may still move (its timers matter).
    pub fn rollouts_running(&self) -> bool {
        self.rollouts.values().any(|r| {
            r.rollout.as_ref().is_some_and(|r| r.active() || r.phase == flotilla_common::rollout::RolloutPhase::Paused)
        })
    }
}

/// Applies desired-state changes of one app to `next` and the batch.
fn apply_changes(next: &mut State, woken: &mut BTreeSet<String>, app: &str, changes: rollouts::Changes) {
    let mut per: BTreeMap<String, Apps> = BTreeMap::new();
    for (c, v) in changes {
        let apps = per.entry(c.clone()).or_insert_with(|| next.clone_desired(&c).unwrap_or_default());
        match v {
            Some(v) => apps.insert(app.to_string(), v),
            None => apps.remove(app),
        };
    }
    for (c, apps) in per {
        if next.desired.get(&c).map(|a| &**a) != Some(&apps) {
            next.desired.insert(c.clone(), Arc::new(apps));
            woken.insert(c);
        }
    }
}

/// The apps the current commit cannot be used for, one line per app and error, with where.
fn app_problems(desired: &Desired) -> Vec<String> {
    let mut by: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for (c, apps) in desired {
        for (a, d) in apps {
            if let Some(e) = &d.error {
                by.entry((a.as_str(), e.as_str())).or_default().push(c.as_str());
            }
        }
    }
    by.into_iter()
        .map(|((app, e), clusters)| {
            let shown: Vec<&str> = clusters.iter().take(3).copied().collect();
            let more = if clusters.len() > 3 { format!(" and {} more", clusters.len() - 3) } else { String::new() };
            format!("app {app} on {}{more}: {e}", shown.join(", "))
        })
        .collect()
}
