//! The engine keeps every app of the cluster the way its last desired bundle says, with or without a hub.
//! The pure parts live in [`app`] (the bundle's index, placement, stages, evaluation), [`prune`] (what may be
//! deleted) and [`status`]; this module acts on the cluster:
//!
//! - **order**: objects apply in stages: by wave (`flotilla.dev/wave` annotation, default 0), then
//!   CustomResourceDefinitions, Namespaces, other cluster-scoped kinds, namespaced kinds. A stage after CRDs
//!   waits until they are Established; a new wave waits until the previous one is healthy. Objects whose kind
//!   the cluster does not serve wait (marked, with the missing API named) while everything else applies;
//!   they apply within seconds of their kind appearing.
//! - **inventory and pruning**: every object applied carries `flotilla.dev/app: <app>` and is recorded in the
//!   app's inventory (by group, kind, namespace and name), kept in the cluster ([`crate::state`]); the save
//!   must succeed before the apply it records. Objects that leave the bundle are deleted only after every
//!   object of the new bundle applied, never while another app's desired state holds them (they move), never
//!   guarded kinds without opt-in, never more than half of the app without confirmation ([`prune`]).
//! - **health**: from the watch-driven cache ([`crate::cache`]), built-in rules or the app's CEL rules; the
//!   worst object decides the app's health, with its reason.
//! - **drift**: a server-side dry-run of the apply, compared with the live object on the fields the agent
//!   manages (ignored fields and fields of ignored managers skipped), checked again only when the live
//!   object's content changes; corrected within seconds under `correct` (an object that keeps drifting back
//!   is left alone and reported as a fight), reported with path and values under `report`.
//! - **failures**: an object the API rejects (400, 403, 422) is marked with the API's message and the rest of
//!   the app still applies; transient failures are retried quickly inside each call, then the app backs off
//!   (1 s to 5 min, jittered). When the API server does not answer, every app is Unknown, saying since when.
//! - **status**: per app, published only when it changes.

pub mod app;
pub mod prune;
pub mod status;

use crate::apply::{Applier, ApplyError, Pruned, Reach, ADOPTED_ANNOTATION, ADOPT_ANNOTATION, FIELD_MANAGER};
use crate::cache::Cache;
use crate::state::{AppState, ObjectRef, StateError, StateStore};
use app::{evaluate, fingerprint, AppRun};
use flotilla_common::drift::{fields_of_manager, managed_drift, owned_by, redact, DriftItem, Ignore};
use flotilla_common::fleet::DriftMode;
use flotilla_common::health::Status;
use flotilla_proto::agent::v1 as pb;
use futures::StreamExt;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

pub use app::WAVE_ANNOTATION;

/// Corrections of one object within [`FIGHT_WINDOW`] after which the agent stops correcting it.
const FIGHT_LIMIT: usize = 3;
const FIGHT_WINDOW: Duration = Duration::from_secs(60);
const FIGHT_PAUSE: Duration = Duration::from_secs(300);
/// How often kinds the cluster does not serve are asked for again.
const UNSERVED_RECHECK: Duration = Duration::from_secs(1);
/// How often the API server is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where the agent keeps its state.
    pub state_namespace: String,
    /// How often apps are re-evaluated without any event (timers: backoff, fights).
    pub tick: Duration,
    /// Quiet time after a cluster event before re-evaluating (coalesces bursts).
    pub debounce: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            state_namespace: "flotilla-system".into(),
            tick: Duration::from_secs(5),
            debounce: Duration::from_millis(200),
        }
    }
}

/// One app as the hub wants it.
#[derive(Debug, Clone)]
pub struct DesiredApp {
    pub app: String,
    pub digest: String,
    pub revision: String,
    /// The bundle, unless the engine holds this digest already.
    pub bundle: Option<Arc<Vec<u8>>>,
    /// The hub's trace context for this digest (empty: untraced).
    pub traceparent: String,
}

enum Command {
    /// The complete desired state: apps not listed are removed.
    Desired(Vec<DesiredApp>),
}

pub type Statuses = Arc<BTreeMap<String, pb::AppStatus>>;

/// The running engine, as the session sees it.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    statuses: watch::Receiver<Statuses>,
    held: watch::Receiver<BTreeMap<String, (String, String)>>,
    reach: watch::Receiver<Reach>,
}

impl EngineHandle {
    pub async fn set_desired(&self, apps: Vec<DesiredApp>) -> Result<(), String> {
        self.tx.send(Command::Desired(apps)).await.map_err(|_| "the engine stopped".to_string())
    }

    pub fn statuses(&self) -> watch::Receiver<Statuses> {
        self.statuses.clone()
    }

    /// Whether the cluster's API server answers.
    pub fn reach(&self) -> watch::Receiver<Reach> {
        self.reach.clone()
    }

    /// app → (digest, revision) of every bundle the engine holds, applied or still applying.
    pub fn applied(&self) -> BTreeMap<String, (String, String)> {
        self.held.borrow().clone()
    }
}

/// An app that left the cluster with objects still to delete (a delete failed): retried with backoff.
struct Leaving {
    state: AppState,
    sync: flotilla_common::fleet::SyncPolicy,
    failures: u32,
    retry_at: Instant,
}

struct Engine {
    applier: Arc<Applier>,
    cache: Arc<Cache>,
    store: StateStore,
    apps: BTreeMap<String, AppRun>,
    leaving: BTreeMap<String, Leaving>,
    /// Cache key → (app, object index): invalidates evaluations when objects change, and says which app's
    /// desired state holds an object (what pruning must leave alone).
    index: HashMap<crate::cache::Key, (String, usize)>,
    synced_seen: u64,
    statuses: watch::Sender<Statuses>,
    held: watch::Sender<BTreeMap<String, (String, String)>>,
    reach: watch::Sender<Reach>,
    cfg: EngineConfig,
    /// The trace spans of apps whose new digest is not healthy yet.
    traces: HashMap<String, crate::telemetry::AppTrace>,
}

/// What is kept of an apply's answer: the resourceVersion it produced and its fingerprint.
type Applied = (Option<u64>, u64);

fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.min(9)).min(Duration::from_secs(300));
    base.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// Starts the engine: loads the state kept in the cluster and enforces it at once, hub or no hub. A damaged
/// app state is reported and left for the hub to send again; it never stops the agent.
pub async fn start(
    applier: Arc<Applier>,
    cfg: EngineConfig,
    shutdown: CancellationToken,
) -> Result<EngineHandle, StateError> {
    let client = applier.client();
    let store = StateStore::new(client.clone(), &cfg.state_namespace);
    store.ensure_namespace(client.clone()).await?;
    let cache = Cache::new(client, shutdown.clone());
    let mut apps = BTreeMap::new();
    let mut leaving = BTreeMap::new();
    let (states, damaged) = store.load_all().await?;
    for d in damaged {
        warn!(error = %d, "a stored app state is damaged; the app is rebuilt when the hub sends it");
    }
    for s in states {
        if s.leaving {
            info!(app = %s.app, objects = s.inventory.len(), "an app that left still has objects to delete");
            let sync = flotilla_common::fleet::Bundle::policy(&s.bundle).unwrap_or_default().sync;
            leaving.insert(s.app.clone(), Leaving { state: s, sync, failures: 0, retry_at: Instant::now() });
            continue;
        }
        info!(app = %s.app, digest = %s.digest, applied = s.applied, "enforcing the state kept in the cluster");
        let mut run = AppRun::new(&s.app, &s.digest, &s.revision, Arc::new(s.bundle), s.inventory);
        run.applied = s.applied;
        run.saved = true;
        apps.insert(s.app.clone(), run);
    }
    let (statuses, status_rx) = watch::channel(Statuses::default());
    let (held, held_rx) = watch::channel(BTreeMap::new());
    let (reach, reach_rx) = watch::channel(Reach::default());
    let (tx, rx) = mpsc::channel(8);
    let mut engine = Engine {
        applier: applier.clone(),
        cache: cache.clone(),
        store,
        apps,
        leaving,
        index: HashMap::new(),
        synced_seen: 0,
        statuses,
        held,
        reach,
        cfg,
        traces: HashMap::new(),
    };
    engine.reindex();
    for run in engine.apps.values_mut() {
        if run.applied {
            // Already applied before the restart: resolve kinds and watch, apply nothing.
            run.stage = usize::MAX;
        }
    }
    engine.publish_held();
    let probe_shutdown = shutdown.clone();
    tokio::spawn(
        async move {
            let mut down = false;
            loop {
                applier.probe().await;
                let now_down = applier.reach().down_since_ms.is_some();
                if now_down != down {
                    down = now_down;
                    // Wakes the engine, which publishes statuses saying so.
                    cache.changed.notify_one();
                }
                tokio::select! {
                    _ = probe_shutdown.cancelled() => return,
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                }
            }
        }
        .instrument(tracing::debug_span!("probe")),
    );
    tokio::spawn(engine.run(rx, shutdown).instrument(tracing::info_span!("engine")));
    Ok(EngineHandle { tx, statuses: status_rx, held: held_rx, reach: reach_rx })
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let cache = self.cache.clone();
        loop {
            self.step_all().await;
            let tick = tokio::time::sleep(self.cfg.tick);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    Some(Command::Desired(apps)) => self.set_desired(apps).await,
                    None => return,
                },
                _ = cache.changed.notified() => tokio::time::sleep(self.cfg.debounce).await,
                _ = tick => {}
            }
        }
    }

    fn reindex(&mut self) {
        self.index.clear();
        for (name, run) in &self.apps {
            for (i, r) in run.refs.iter().enumerate() {
                self.index.insert(crate::cache::key_of(r), (name.clone(), i));
            }
        }
    }

    /// Whether some app other than `app` holds `r` in its desired state.
    fn claimed_elsewhere(&self, app: &str, r: &ObjectRef) -> bool {
        self.index.get(&crate::cache::key_of(r)).is_some_and(|(other, _)| other != app)
    }

    /// Marks evaluations stale for every object the cache saw change.
    fn invalidate(&mut self) {
        let generation = self.cache.synced_generation();
        if generation != self.synced_seen {
            self.synced_seen = generation;
            for run in self.apps.values_mut() {
                run.evals.iter_mut().for_each(|e| *e = None);
            }
        }
        for k in self.cache.take_dirty() {
            if let Some((app, i)) = self.index.get(&k) {
                if let Some(e) = self.apps.get_mut(app).and_then(|r| r.evals.get_mut(*i)) {
                    *e = None;
                }
            }
        }
    }

    fn publish_held(&self) {
        // Every app the agent holds a bundle for, applied or still applying: a hub with no record of the cluster
        // keeps exactly these (a Hello that left one out would have it removed).
        let held = self.apps.values().map(|r| (r.name.clone(), (r.digest.clone(), r.revision.clone()))).collect();
        self.held.send_replace(held);
    }

    /// Keeps the app's state in the cluster; until that succeeds nothing of the app is applied.
    async fn save(&self, run: &mut AppRun) -> Result<(), String> {
        match self.store.save(&run.state()).await {
            Ok(()) => {
                run.saved = true;
                Ok(())
            }
            Err(e) => {
                run.saved = false;
                warn!(app = %run.name, error = %e.full(), "keeping the app's state in the cluster failed");
                Err(format!("keeping the app's state in the cluster failed: {}", e.full()))
            }
        }
    }

    async fn set_desired(&mut self, desired: Vec<DesiredApp>) {
        let wanted: BTreeSet<String> = desired.iter().map(|d| d.app.clone()).collect();
        // Apps that left the cluster's desired state: their objects go (unless pruning is off), then their state.
        let gone: Vec<String> = self.apps.keys().filter(|a| !wanted.contains(*a)).cloned().collect();
        for app in gone {
            self.traces.remove(&app);
            if let Some(run) = self.apps.remove(&app) {
                let state = AppState { leaving: true, ..run.state() };
                let sync = run.policy.sync.clone();
                let leaving = Leaving { state, sync, failures: 0, retry_at: Instant::now() };
                if run.policy.sync.prune {
                    self.leaving.insert(app.clone(), leaving);
                } else {
                    info!(%app, objects = run.inventory.len(), "app removed from this cluster; pruning is off, its objects stay");
                    if let Err(e) = self.store.remove(&app).await {
                        warn!(%app, error = %e.full(), "forgetting the app's state failed");
                    }
                }
            }
        }
        // An app that comes back takes over what its leaving self still had to delete.
        let mut returning: BTreeMap<String, BTreeSet<ObjectRef>> = BTreeMap::new();
        for app in &wanted {
            if let Some(l) = self.leaving.remove(app) {
                returning.insert(app.clone(), l.state.inventory);
            }
        }
        for d in desired {
            // The same content may be held by another app already.
            let held = self.apps.values().find(|r| r.digest == d.digest).map(|r| r.bundle.clone());
            match self.apps.get_mut(&d.app) {
                Some(run) if run.digest == d.digest => {
                    if run.revision != d.revision {
                        run.revision = d.revision.clone();
                        run.saved = false;
                    }
                }
                existing => {
                    let Some(bundle) = d.bundle.clone().or(held) else {
                        warn!(app = %d.app, digest = %d.digest, "desired without its bundle; waiting for it");
                        continue;
                    };
                    let mut inventory = existing.map(|r| r.inventory.clone()).unwrap_or_default();
                    inventory.extend(returning.remove(&d.app).unwrap_or_default());
                    let mut run = AppRun::new(&d.app, &d.digest, &d.revision, bundle, BTreeSet::new());
                    // Every object is recorded before it is applied (in the version it is applied in): a crash
                    // never loses track of what was created.
                    for r in &run.refs {
                        inventory.replace(r.clone());
                    }
                    run.inventory = inventory;
                    match crate::telemetry::AppTrace::start(&d.traceparent, &d.app, &d.digest, &d.revision) {
                        Some(t) => self.traces.insert(d.app.clone(), t),
                        None => self.traces.remove(&d.app),
                    };
                    let _ = self.save(&mut run).await;
                    let _in_trace = self.traces.get(&d.app).map(|t| t.attach());
                    info!(app = %d.app, digest = %d.digest, objects = run.refs.len(), "new desired state");
                    drop(_in_trace);
                    self.apps.insert(d.app.clone(), run);
                }
            }
        }
        self.reindex();
        self.publish_held();
        // With every new app in place: what they hold now is not deleted by the apps that left.
        self.prune_leaving().await;
    }

    /// Deletes what apps that left the cluster still have (objects another app now holds move to it, guarded
    /// kinds stay); forgets an app once everything is gone. Failed deletes are retried with backoff, and the
    /// list is kept in the cluster meanwhile.
    async fn prune_leaving(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self.leaving.iter().filter(|(_, l)| l.retry_at <= now).map(|(a, _)| a.clone()).collect();
        for app in due {
            let Some(mut l) = self.leaving.remove(&app) else { continue };
            let plan = prune::plan(
                &l.state.inventory,
                &BTreeSet::new(),
                |r| self.claimed_elsewhere(&app, r),
                &l.sync,
                prune::Cause::Left,
            );
            for note in &plan.notes {
                info!(%app, %note, "left in place");
            }
            if plan.handed_over > 0 {
                info!(%app, objects = plan.handed_over, "objects now held by other apps move to them");
            }
            let mut remaining = BTreeSet::new();
            for r in &plan.delete {
                match self.applier.prune(&app, r).await {
                    Ok(Pruned::Kept(why)) => info!(%app, %why, "left in place"),
                    Ok(Pruned::Released) => info!(%app, object = %r, "released: it existed before the app adopted it"),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(%app, error = %e.full(), "pruning failed; retrying later");
                        remaining.insert(r.clone());
                    }
                }
            }
            if remaining.is_empty() {
                info!(%app, objects = l.state.inventory.len(), "app removed from this cluster");
                if let Err(e) = self.store.remove(&app).await {
                    warn!(%app, error = %e.full(), "forgetting the app's state failed");
                }
                continue;
            }
            l.state.inventory = remaining;
            l.failures += 1;
            l.retry_at = Instant::now() + backoff(l.failures);
            if let Err(e) = self.store.save(&l.state).await {
                warn!(%app, error = %e.full(), "keeping what is left to delete failed");
            }
            self.leaving.insert(app, l);
        }
    }

    async fn step_all(&mut self) {
        self.prune_leaving().await;
        self.invalidate();
        let reach = self.applier.reach();
        self.reach.send_if_modified(|r| {
            let changed = *r != reach;
            *r = reach.clone();
            changed
        });
        let names: Vec<String> = self.apps.keys().cloned().collect();
        let mut statuses = BTreeMap::new();
        for name in names {
            let Some(mut run) = self.apps.remove(&name) else { continue };
            self.step(&mut run).await;
            let prev = self.statuses.borrow().get(&name).cloned();
            let s = status::status(&run, prev.as_ref(), &self.applier.reach());
            if self.traces.get_mut(&name).is_some_and(|t| t.observe(&s)) {
                self.traces.remove(&name);
            }
            statuses.insert(name.clone(), s);
            self.apps.insert(name, run);
        }
        // Published with every app in place: an app being stepped is still held (a Hello sent meanwhile that
        // left it out would let a hub with no record of the cluster remove it).
        self.publish_held();
        if **self.statuses.borrow() != statuses {
            crate::telemetry::METRICS.set_statuses(&statuses);
            self.statuses.send_replace(Arc::new(statuses));
        }
    }

    /// Resolves kinds (scope, and a watch for each) and places objects, then plans stages. Kinds the cluster
    /// does not serve leave their objects waiting; every other object goes ahead. Asked again (at most once
    /// a second) while some kind is missing.
    async fn prepare(&mut self, run: &mut AppRun) -> Result<(), String> {
        let first = run.unserved_checked.is_none();
        let recheck = !run.unserved.is_empty() && run.unserved_checked.is_none_or(|t| t.elapsed() >= UNSERVED_RECHECK);
        if run.refs.is_empty() || !first && !recheck {
            return Ok(());
        }
        run.unserved_checked = Some(Instant::now());
        let mut seen: HashMap<(String, String), Result<bool, String>> = HashMap::new();
        let mut moved = Vec::new();
        let mut newly_served = false;
        for i in 0..run.refs.len() {
            if run.scope[i].is_some() {
                continue;
            }
            let r = run.refs[i].clone();
            let key = (r.api_version.clone(), r.kind.clone());
            let found = match seen.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = match self.applier.resource(&r).await {
                        Ok((ar, ns)) => {
                            self.cache.watch(&ar);
                            Ok(ns)
                        }
                        // A kind a CRD of this app brings: its scope is the CRD's.
                        Err(ApplyError::UnknownKind { .. }) => match run.crd_scope(&r) {
                            Some(ns) => Ok(ns),
                            None => Err(format!(
                                "the cluster does not serve {} {} (waiting for it: a CRD or an APIService \
                                 from another app or from the cluster)",
                                r.api_version, r.kind
                            )),
                        },
                        Err(e) => return Err(e.full()),
                    };
                    seen.insert(key, f.clone());
                    f
                }
            };
            match found {
                Ok(ns) => {
                    if let Some(old) = run.place(i, ns) {
                        moved.push((i, old, run.refs[i].clone()));
                    }
                    newly_served |= run.unserved.remove(&i).is_some();
                    run.evals[i] = None;
                }
                Err(why) => {
                    run.unserved.insert(i, why);
                }
            }
        }
        if !moved.is_empty() {
            // Recorded where they really are before anything is applied there.
            for (i, old, new) in &moved {
                run.inventory.remove(old);
                run.inventory.insert(new.clone());
                self.index.remove(&crate::cache::key_of(old));
                self.index.insert(crate::cache::key_of(new), (run.name.clone(), *i));
            }
            run.saved = false;
        }
        if first || newly_served {
            if newly_served {
                info!(app = %run.name, "a kind the app waited for is served now; applying its objects");
            }
            run.plan();
            run.stage = if run.stage == usize::MAX && !newly_served { usize::MAX } else { 0 };
        }
        Ok(())
    }

    async fn step(&mut self, run: &mut AppRun) {
        if run.broken.is_some() {
            return;
        }
        let need = evaluate(run, &self.cache);
        self.check_drift(run, need).await;
        if let Some(at) = run.retry_at {
            if Instant::now() < at {
                let left = (at - Instant::now()).as_secs() + 1;
                let problem = run.problem.as_deref().map(|p| format!("{p}; ")).unwrap_or_default();
                run.waiting = Some(format!("{problem}retrying in {left} s (attempt {} failed)", run.failures));
                self.enforce(run).await;
                return;
            }
            run.retry_at = None;
        }
        if let Err(e) = self.prepare(run).await {
            self.back_off(run, e);
            return;
        }
        if !run.saved {
            if let Err(e) = self.save(run).await {
                self.back_off(run, e);
                return;
            }
        }
        run.problem = None;
        if run.stage == usize::MAX {
            // Restarted with an applied state: nothing to apply, only enforcement.
            run.stage = run.stages.len();
        }
        if run.stage >= run.stages.len() && !run.errors.is_empty() {
            // The backoff of a failed apply is over: start again (unchanged objects are no-ops under
            // server-side apply).
            run.stage = 0;
        }
        let mut progressed = false;
        while run.stage < run.stages.len() {
            if run.gate[run.stage] {
                if let Some(why) = self.unhealthy(run, run.stage - 1) {
                    run.waiting = Some(why);
                    return;
                }
            }
            run.waiting = None;
            let indices = run.stages[run.stage].clone();
            let transient = self.apply_objects(run, &indices).await;
            progressed = true;
            if transient {
                run.failures += 1;
                let wait = backoff(run.failures);
                run.retry_at = Some(Instant::now() + wait);
                run.waiting = Some(format!("retrying in {} s", wait.as_secs().max(1)));
                return;
            }
            run.stage += 1;
        }
        if progressed {
            self.finish(run).await;
        }
        self.enforce(run).await;
    }

    fn back_off(&self, run: &mut AppRun, why: String) {
        run.failures += 1;
        let wait = backoff(run.failures);
        run.waiting = Some(format!("{why}; retrying in {} s (attempt {} failed)", wait.as_secs() + 1, run.failures));
        run.problem = Some(why);
        run.retry_at = Some(Instant::now() + wait);
    }

    /// Drift of the objects whose live content changed since it was last checked: a server-side dry-run of
    /// the apply, compared with the live object on the agent's fields.
    async fn check_drift(&self, run: &mut AppRun, need: Vec<(usize, Value)>) {
        if need.is_empty() {
            return;
        }
        let forms: Vec<(usize, Value, Value)> =
            need.into_iter().map(|(i, live)| (i, run.applied_form(i, Some(&live)), live)).collect();
        let applier = self.applier.clone();
        let results: Vec<(usize, Value, Result<Value, ApplyError>)> = futures::stream::iter(forms)
            .map(move |(i, obj, live)| {
                let applier = applier.clone();
                async move {
                    let r = applier.dry_run(&obj).await;
                    (i, live, r)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        for (i, live, result) in results {
            let predicted = match result {
                Ok(p) => p,
                Err(e) => {
                    // Not known now; checked again when the object changes or the app is applied.
                    tracing::debug!(app = %run.name, object = %run.refs[i], error = %e.full(), "the drift check failed");
                    continue;
                }
            };
            let Some(fields) = fields_of_manager(&predicted, FIELD_MANAGER) else { continue };
            let secret = run.refs[i].kind == "Secret" && run.refs[i].group().is_empty();
            let secret_fields;
            let fields = if secret {
                secret_fields = flotilla_common::drift::secret_fields(fields);
                &secret_fields
            } else {
                fields
            };
            let ignore = Ignore { paths: &run.ignore[i], owned_by_others: &[] };
            let mut items = managed_drift(&predicted, &live, fields, &ignore);
            if !items.is_empty() && !run.managers[i].is_empty() {
                // Fields the named managers own in the live object are theirs.
                if let Ok(Some(full)) = self.applier.get(&run.refs[i]).await {
                    let theirs = owned_by(&full, &run.managers[i]);
                    let ignore = Ignore { paths: &run.ignore[i], owned_by_others: &theirs };
                    items = managed_drift(&predicted, &live, fields, &ignore);
                }
            }
            if secret {
                redact(&mut items);
            }
            run.checked.insert(i, (fingerprint(&live), items.clone()));
            if let Some(Some(e)) = run.evals.get_mut(i) {
                e.drift = items;
            }
        }
    }

    /// Why stage `s` is not healthy yet, if it is not.
    fn unhealthy(&self, run: &AppRun, s: usize) -> Option<String> {
        run.stages[s].iter().find_map(|i| match run.eval(*i) {
            Some(e) if e.health.status == Status::Healthy => None,
            Some(e) => Some(format!("waiting for {} to become healthy: {}", run.refs[*i], e.health.describe())),
            None => Some(format!("waiting for {}", run.refs[*i])),
        })
    }

    /// The objects of `indices` the agent may apply. Marked and left out: objects the app may not write (the
    /// agent's namespace, the guard in the bundle) and objects that exist but carry no fleet label, unless the
    /// app adopts them (one list per kind and namespace for objects the cache does not know).
    async fn admissible(&self, run: &mut AppRun, indices: &[usize]) -> Result<Vec<usize>, ApplyError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut unknown: BTreeMap<(String, String, String), Vec<usize>> = BTreeMap::new();
        let adopted = format!("/metadata/annotations/{}", ADOPTED_ANNOTATION.replace('/', "~1"));
        for &i in indices {
            if let Some(why) = run.refusal(i, &self.cfg.state_namespace) {
                run.errors.insert(i, why);
                continue;
            }
            let r = &run.refs[i];
            match self.cache.get(r) {
                Some(live) => {
                    if live.pointer(&adopted).and_then(Value::as_str) == Some("true") {
                        run.adopted.insert(i);
                    }
                    out.push(i);
                }
                None if run.applied_rv.contains_key(&i) || run.adopted.contains(&i) => out.push(i),
                None => {
                    unknown.entry((r.api_version.clone(), r.kind.clone(), r.namespace.clone())).or_default().push(i)
                }
            }
        }
        for idx in unknown.into_values() {
            let names = self.applier.unlabelled(&run.refs[idx[0]]).await?;
            for i in idx {
                let r = &run.refs[i];
                if !names.contains(&r.name) {
                    out.push(i);
                } else if run.may_adopt(i) {
                    info!(app = %run.name, object = %r, "adopting an object the fleet did not create");
                    run.adopted.insert(i);
                    out.push(i);
                } else {
                    run.errors.insert(
                        i,
                        format!(
                            "{r} exists, not ours: the fleet did not create it, so it is left alone (to take it over, \
                             set sync.adopt: true in app.yaml or annotate it {ADOPT_ANNOTATION}: \"true\")"
                        ),
                    );
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Applies objects concurrently (the applier bounds API calls). Returns true when a failure is worth a
    /// retry of the whole app later (anything but the API rejecting an object).
    async fn apply_objects(&self, run: &mut AppRun, indices: &[usize]) -> bool {
        let indices = match self.admissible(run, indices).await {
            Ok(v) => v,
            Err(e) => {
                for i in indices {
                    run.errors.insert(*i, e.full());
                }
                return !e.is_rejection();
            }
        };
        let indices = &indices[..];
        let needed: BTreeSet<String> = indices
            .iter()
            .map(|i| run.refs[*i].namespace.clone())
            .filter(|ns| !ns.is_empty() && !run.own_namespaces.contains(ns))
            .collect();
        for ns in needed {
            if let Err(e) = self.applier.ensure_namespace(&ns).await {
                for i in indices {
                    if run.refs[*i].namespace == ns {
                        run.errors.insert(*i, e.full());
                    }
                }
                return true;
            }
        }
        let objs: Vec<(usize, Value)> = indices
            .iter()
            .map(|i| {
                // Fields other controllers own keep their live values (never removed, never reset).
                let live = if run.ignore[*i].is_empty() { None } else { self.cache.get(&run.refs[*i]) };
                (*i, run.applied_form(*i, live.as_ref()))
            })
            .collect();
        let applier = self.applier.clone();
        // Each answer is reduced at once to what is kept of it (its resourceVersion and fingerprint): 5,000
        // whole objects held until the last answer would cost tens of MiB.
        let results: Vec<(usize, Result<Applied, ApplyError>)> = futures::stream::iter(objs)
            .map(move |(i, obj)| {
                let applier = applier.clone();
                async move {
                    let kept = applier.apply(&obj).await.map(|applied| {
                        let rv = applied.pointer("/metadata/resourceVersion").and_then(Value::as_str);
                        (rv.and_then(|v| v.parse::<u64>().ok()), fingerprint(&applied))
                    });
                    (i, kept)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        // Kinds a CRD of this app brought are watched once they exist.
        let mut kinds = BTreeSet::new();
        for (i, r) in &results {
            let o = &run.refs[*i];
            if r.is_ok() && kinds.insert((o.api_version.clone(), o.kind.clone())) && !self.cache.synced(o) {
                if let Ok((ar, _)) = self.applier.resource(o).await {
                    self.cache.watch(&ar);
                }
            }
        }
        let mut transient = false;
        for (i, r) in results {
            match r {
                Ok((rv, fp)) => {
                    run.errors.remove(&i);
                    if let Some(v) = rv {
                        run.applied_rv.insert(i, v);
                    }
                    // What the apply produced has no drift by definition.
                    run.checked.insert(i, (fp, Vec::<DriftItem>::new()));
                    run.evals[i] = None;
                }
                Err(e) => {
                    transient |= !e.is_rejection();
                    run.errors.insert(i, e.full());
                }
            }
        }
        transient
    }

    /// After the last stage: prune what left the bundle (only once every object applied), record the result
    /// in the cluster.
    async fn finish(&mut self, run: &mut AppRun) {
        let current: BTreeSet<ObjectRef> = run.refs.iter().cloned().collect();
        let not_applied = run.errors.len() + run.unserved.len();
        let plan = prune::plan(
            &run.inventory,
            &current,
            |r| self.claimed_elsewhere(&run.name, r),
            &run.policy.sync,
            prune::Cause::Changed { not_applied },
        );
        run.pruned = 0;
        run.prune_notes = plan.notes.clone();
        if plan.handed_over > 0 {
            info!(app = %run.name, objects = plan.handed_over, "objects that moved to other apps are theirs now");
        }
        let mut still = plan.kept.clone();
        for r in plan.delete {
            match self.applier.prune(&run.name, &r).await {
                Ok(Pruned::Deleted) => {
                    run.pruned += 1;
                    info!(app = %run.name, object = %r, "pruned");
                }
                Ok(Pruned::AlreadyGone) => {}
                Ok(Pruned::Released) => {
                    info!(app = %run.name, object = %r, "released: it existed before the app adopted it");
                    run.prune_notes.push(format!("{r} existed before the app adopted it: released, not deleted"));
                }
                Ok(Pruned::Kept(why)) => run.prune_notes.push(why),
                Err(e) => {
                    run.prune_notes.push(e.full());
                    still.insert(r);
                }
            }
        }
        run.inventory = current.union(&still).cloned().collect();
        run.applied = run.errors.is_empty() && run.unserved.is_empty();
        if run.errors.is_empty() {
            run.failures = 0;
        } else {
            // Rejected objects: the rest is applied; try again later in case the cluster changes its mind
            // (a CRD or webhook fixed), backing off.
            run.failures += 1;
            run.retry_at = Some(Instant::now() + backoff(run.failures));
        }
        let _ = self.save(run).await;
    }

    /// Drift: correct (re-apply the object) or leave it for the report.
    async fn enforce(&self, run: &mut AppRun) {
        let planned = !run.stages.is_empty();
        if run.policy.sync.drift != DriftMode::Correct || !planned || run.stage < run.stages.len() {
            return;
        }
        if self.applier.reach().down_since_ms.is_some() {
            return;
        }
        let now = Instant::now();
        run.fighting.retain(|_, until| *until > now);
        let mut to_fix = Vec::new();
        for i in 0..run.refs.len() {
            if run.errors.contains_key(&i) || run.fighting.contains_key(&i) || run.scope[i].is_none() {
                continue;
            }
            let drifted = run.eval(i).is_some_and(|e| !e.drift.is_empty() || (!e.present && e.synced));
            if drifted {
                to_fix.push(i);
            }
        }
        if to_fix.is_empty() {
            return;
        }
        for i in &to_fix {
            let q = run.corrections.entry(*i).or_default();
            q.retain(|t| now.duration_since(*t) < FIGHT_WINDOW);
            q.push_back(now);
            if q.len() > FIGHT_LIMIT {
                warn!(app = %run.name, object = %run.refs[*i], "keeps drifting back after corrections: another controller changes it; leaving it for 5 min");
                run.fighting.insert(*i, now + FIGHT_PAUSE);
            }
        }
        let fix: Vec<usize> = to_fix.into_iter().filter(|i| !run.fighting.contains_key(i)).collect();
        info!(app = %run.name, objects = fix.len(), "correcting drift");
        let transient = self.apply_objects(run, &fix).await;
        if transient {
            run.failures += 1;
            run.retry_at = Some(Instant::now() + backoff(run.failures));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_five_minutes_with_jitter() {
        assert!(backoff(0) <= Duration::from_millis(1250) && backoff(0) >= Duration::from_millis(750));
        assert!(backoff(3) >= Duration::from_secs(6));
        assert!(backoff(30) <= Duration::from_secs(375));
    }
}
