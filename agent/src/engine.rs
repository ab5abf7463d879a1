//! The engine keeps every app of the cluster the way its last desired bundle says, with or without a hub:
//!
//! - **order**: objects apply in stages: by wave (`flotilla.dev/wave` annotation, default 0), then
//!   CustomResourceDefinitions, Namespaces, other cluster-scoped kinds, namespaced kinds. A stage after CRDs
//!   waits until they are Established; a new wave waits until the previous one is healthy.
//! - **inventory and pruning**: every object applied carries `flotilla.dev/app: <app>` and is recorded in
//!   the app's inventory, kept in the cluster ([`crate::state`]) before it is applied; objects that leave the
//!   bundle are deleted afterwards, unless pruning is off for the app or the object is protected
//!   (`flotilla.dev/protect: "true"`), and never an object the agent did not label.
//! - **health**: from the watch-driven cache ([`crate::cache`]), built-in rules or the app's CEL rules; the
//!   worst object decides the app's health, with its reason.
//! - **drift**: the fields each object sets, compared with the live object (minus ignored paths); corrected
//!   within seconds under `correct` (an object that keeps drifting back is left alone and reported as a
//!   fight), reported with path and values under `report`.
//! - **failures**: an object the API rejects (422) is marked with the API's message and the rest of the app
//!   still applies; failing applies back off exponentially (1 s to 5 min, jittered).
//! - **status**: per app, published only when it changes.

use crate::apply::{Applier, ApplyError, Pruned};
use crate::cache::{Cache, APP_LABEL};
use crate::state::{AppState, ObjectRef, StateError, StateStore};
use flotilla_common::drift::{drift, DriftItem};
use flotilla_common::fleet::{AppPolicy, Bundle, DriftMode};
use flotilla_common::health::{Health, Rules, Status};
use flotilla_proto::agent::v1 as pb;
use futures::StreamExt;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// The annotation ordering an app's objects into waves.
pub const WAVE_ANNOTATION: &str = "flotilla.dev/wave";
/// Corrections of one object within [`FIGHT_WINDOW`] after which the agent stops correcting it.
const FIGHT_LIMIT: usize = 3;
const FIGHT_WINDOW: Duration = Duration::from_secs(60);
const FIGHT_PAUSE: Duration = Duration::from_secs(300);
/// How many reasons and drift items a status carries.
const FIRST: usize = 5;

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
}

impl EngineHandle {
    pub async fn set_desired(&self, apps: Vec<DesiredApp>) -> Result<(), String> {
        self.tx.send(Command::Desired(apps)).await.map_err(|_| "the engine stopped".to_string())
    }

    pub fn statuses(&self) -> watch::Receiver<Statuses> {
        self.statuses.clone()
    }

    /// app → (digest, revision) of every bundle the engine holds, applied or still applying.
    pub fn applied(&self) -> BTreeMap<String, (String, String)> {
        self.held.borrow().clone()
    }
}

fn str_at<'a>(o: &'a Value, p: &str) -> &'a str {
    o.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn kind_rank(kind: &str, namespaced: bool) -> u8 {
    match kind {
        "CustomResourceDefinition" => 0,
        "Namespace" => 1,
        _ if !namespaced => 2,
        _ => 3,
    }
}

/// Removes the fields at `paths` (JSON pointers) from `o`.
fn strip(o: &mut Value, paths: &[String]) {
    for p in paths {
        let Some((parent, last)) = p.rsplit_once('/') else { continue };
        let last = last.replace("~1", "/").replace("~0", "~");
        if let Some(Value::Object(m)) = o.pointer_mut(parent) {
            m.remove(&last);
        }
    }
}

struct AppRun {
    name: String,
    digest: String,
    revision: String,
    bundle: Arc<Vec<u8>>,
    policy: AppPolicy,
    rules: Rules,
    /// Each object's line in the bundle: desired objects are parsed when used, not kept parsed.
    lines: Vec<(usize, usize)>,
    refs: Vec<ObjectRef>,
    ignore: Vec<Vec<String>>,
    waves: Vec<i64>,
    /// Namespaces the app brings itself, and the scope of kinds its CRDs define (kind → namespaced).
    own_namespaces: BTreeSet<String>,
    crd_kinds: HashMap<String, bool>,
    /// Health and drift of each object, recomputed when the cache says the object changed.
    evals: Vec<Option<Eval>>,
    /// The resourceVersion the last apply of each object returned: an older copy in the cache predates it
    /// and says nothing about the applied state.
    applied_rv: HashMap<usize, u64>,
    /// Object indices per stage, in order; `gate[i]`: stage i waits for stage i-1 to be healthy.
    stages: Vec<Vec<usize>>,
    gate: Vec<bool>,
    stage: usize,
    /// Every object applied since the last complete apply (pruning reads it).
    inventory: BTreeSet<ObjectRef>,
    /// Every stage applied without error at this digest.
    applied: bool,
    /// Apply errors of the last attempt, by object index.
    errors: BTreeMap<usize, String>,
    /// Why the apply cannot go on now (a gate, a backoff).
    waiting: Option<String>,
    failures: u32,
    retry_at: Option<Instant>,
    pruned: u32,
    prune_notes: Vec<String>,
    corrections: HashMap<usize, VecDeque<Instant>>,
    fighting: HashMap<usize, Instant>,
    /// An app whose bundle could not be read: the reason.
    broken: Option<String>,
    /// Why the last attempt could not start (an unknown kind), shown while it backs off.
    problem: Option<String>,
}

/// One object's health and drift, as last evaluated.
#[derive(Debug, Clone)]
struct Eval {
    health: Health,
    drift: Vec<DriftItem>,
    /// The object exists in the cluster.
    present: bool,
    /// Its kind's watch has listed everything once (so absence means missing).
    synced: bool,
}

impl AppRun {
    fn new(name: &str, digest: &str, revision: &str, bundle: Arc<Vec<u8>>, inventory: BTreeSet<ObjectRef>) -> AppRun {
        let mut run = AppRun {
            name: name.to_string(),
            digest: digest.to_string(),
            revision: revision.to_string(),
            bundle: bundle.clone(),
            policy: AppPolicy::default(),
            rules: Rules::default(),
            lines: Vec::new(),
            refs: Vec::new(),
            ignore: Vec::new(),
            waves: Vec::new(),
            own_namespaces: BTreeSet::new(),
            crd_kinds: HashMap::new(),
            evals: Vec::new(),
            applied_rv: HashMap::new(),
            stages: Vec::new(),
            gate: Vec::new(),
            stage: 0,
            inventory,
            applied: false,
            errors: BTreeMap::new(),
            waiting: None,
            failures: 0,
            retry_at: None,
            pruned: 0,
            prune_notes: Vec::new(),
            corrections: HashMap::new(),
            fighting: HashMap::new(),
            broken: None,
            problem: None,
        };
        if let Err(e) = run.read_bundle() {
            run.broken = Some(format!("the bundle cannot be read: {e}"));
        }
        run
    }

    /// Indexes the bundle's objects (one pass; nothing parsed is kept).
    fn read_bundle(&mut self) -> Result<(), String> {
        let bundle = self.bundle.clone();
        self.policy = Bundle::policy(&bundle).map_err(|e| e.to_string())?;
        self.rules = Rules::new(&self.policy.health)?;
        let wave_pointer = format!("/metadata/annotations/{}", WAVE_ANNOTATION.replace('/', "~1"));
        let mut start = 0;
        for line in bundle.split(|b| *b == b'\n') {
            let range = (start, start + line.len());
            start += line.len() + 1;
            if line.is_empty() {
                continue;
            }
            let o: Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
            if o.get(flotilla_common::fleet::POLICY_KEY).is_some() {
                continue;
            }
            match str_at(&o, "/kind") {
                "Namespace" => {
                    self.own_namespaces.insert(str_at(&o, "/metadata/name").to_string());
                }
                "CustomResourceDefinition" => {
                    self.crd_kinds
                        .insert(str_at(&o, "/spec/names/kind").to_string(), str_at(&o, "/spec/scope") != "Cluster");
                }
                _ => {}
            }
            self.lines.push(range);
            self.refs.push(ObjectRef::of(&o));
            self.ignore.push(self.policy.ignored_paths(&o));
            self.waves.push(str_at(&o, &wave_pointer).parse::<i64>().unwrap_or(0));
        }
        self.evals = vec![None; self.refs.len()];
        Ok(())
    }

    /// Object `i` as the agent applies it: the bundle's object with the app's label.
    fn desired(&self, i: usize) -> Value {
        let (a, b) = self.lines[i];
        let mut o: Value = serde_json::from_slice(&self.bundle[a..b]).unwrap_or(Value::Null);
        if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            let labels = m.entry("labels").or_insert_with(|| Value::Object(Default::default()));
            if let Some(l) = labels.as_object_mut() {
                l.insert(APP_LABEL.to_string(), Value::String(self.name.clone()));
            }
        }
        o
    }

    /// Splits the objects into stages once kinds are resolved (scope comes from discovery).
    fn plan(&mut self, namespaced: &[bool]) {
        let mut keyed: BTreeMap<(i64, u8), Vec<usize>> = BTreeMap::new();
        for (i, r) in self.refs.iter().enumerate() {
            keyed.entry((self.waves[i], kind_rank(&r.kind, namespaced[i]))).or_default().push(i);
        }
        let mut prev: Option<(i64, u8)> = None;
        self.stages.clear();
        self.gate.clear();
        for (k, idx) in keyed {
            // After CRDs, and at every new wave, wait for what came before to be healthy.
            self.gate.push(prev.is_some_and(|p| p.1 == 0 || p.0 != k.0));
            self.stages.push(idx);
            prev = Some(k);
        }
    }

    fn state(&self) -> AppState {
        AppState {
            app: self.name.clone(),
            digest: self.digest.clone(),
            revision: self.revision.clone(),
            applied: self.applied,
            bundle: self.bundle.to_vec(),
            inventory: self.inventory.clone(),
            leaving: false,
        }
    }
}

/// Evaluates the objects whose evaluation is stale: health from the live object (or missing), drift of
/// the fields the desired object sets.
fn evaluate(run: &mut AppRun, cache: &Cache) {
    for i in 0..run.evals.len() {
        if run.evals[i].is_some() {
            continue;
        }
        let r = &run.refs[i];
        let synced = cache.synced(r);
        let live = cache.get(r);
        let rv = |o: &Value| str_at(o, "/metadata/resourceVersion").parse::<u64>().ok();
        if let (Some(l), Some(min)) = (&live, run.applied_rv.get(&i)) {
            if rv(l).is_some_and(|v| v < *min) {
                // The watch has not delivered the applied object yet: not evaluated (retried on the event).
                continue;
            }
        }
        let eval = match live {
            Some(live) => Eval {
                health: run.rules.check(&live),
                drift: drift(&run.desired(i), &live, &run.ignore[i]),
                present: true,
                synced,
            },
            None if synced => Eval { health: Health::missing(), drift: Vec::new(), present: false, synced },
            None => Eval {
                health: Health {
                    status: Status::Progressing,
                    reason: "NotObserved".into(),
                    message: "waiting for the watch".into(),
                },
                drift: Vec::new(),
                present: false,
                synced,
            },
        };
        run.evals[i] = Some(eval);
    }
}

fn eval_of(run: &AppRun, i: usize) -> Option<&Eval> {
    run.evals.get(i).and_then(Option::as_ref)
}

/// An app that left the cluster with objects still to delete (a delete failed): retried with backoff.
struct Leaving {
    state: AppState,
    failures: u32,
    retry_at: Instant,
}

struct Engine {
    applier: Arc<Applier>,
    cache: Arc<Cache>,
    store: StateStore,
    apps: BTreeMap<String, AppRun>,
    leaving: BTreeMap<String, Leaving>,
    /// Cache key → (app, object index), to invalidate evaluations when objects change.
    index: HashMap<crate::cache::Key, (String, usize)>,
    synced_seen: u64,
    statuses: watch::Sender<Statuses>,
    held: watch::Sender<BTreeMap<String, (String, String)>>,
    cfg: EngineConfig,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.min(9)).min(Duration::from_secs(300));
    base.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// Starts the engine: loads the state kept in the cluster and enforces it at once, hub or no hub.
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
    for s in store.load_all().await? {
        if s.leaving {
            info!(app = %s.app, objects = s.inventory.len(), "an app that left still has objects to delete");
            leaving.insert(s.app.clone(), Leaving { state: s, failures: 0, retry_at: Instant::now() });
            continue;
        }
        info!(app = %s.app, digest = %s.digest, applied = s.applied, "enforcing the state kept in the cluster");
        let mut run = AppRun::new(&s.app, &s.digest, &s.revision, Arc::new(s.bundle), s.inventory);
        run.applied = s.applied;
        apps.insert(s.app.clone(), run);
    }
    let (statuses, status_rx) = watch::channel(Statuses::default());
    let (held, held_rx) = watch::channel(BTreeMap::new());
    let (tx, rx) = mpsc::channel(8);
    let mut engine =
        Engine { applier, cache, store, apps, leaving, index: HashMap::new(), synced_seen: 0, statuses, held, cfg };
    engine.reindex();
    for run in engine.apps.values_mut() {
        if run.applied {
            // Already applied before the restart: resolve kinds and watch, apply nothing.
            run.stage = usize::MAX;
        }
    }
    engine.publish_held();
    tokio::spawn(engine.run(rx, shutdown).instrument(tracing::info_span!("engine")));
    Ok(EngineHandle { tx, statuses: status_rx, held: held_rx })
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

    async fn save(&self, run: &AppRun) {
        if let Err(e) = self.store.save(&run.state()).await {
            warn!(app = %run.name, error = %e, "keeping the app's state in the cluster failed");
        }
    }

    async fn set_desired(&mut self, desired: Vec<DesiredApp>) {
        let wanted: BTreeSet<String> = desired.iter().map(|d| d.app.clone()).collect();
        // Apps that left the cluster's desired state: their objects go (unless pruning is off), then their state.
        let gone: Vec<String> = self.apps.keys().filter(|a| !wanted.contains(*a)).cloned().collect();
        for app in gone {
            if let Some(run) = self.apps.remove(&app) {
                let state = AppState { leaving: true, ..run.state() };
                let leaving = Leaving { state, failures: 0, retry_at: Instant::now() };
                if run.policy.sync.prune {
                    self.leaving.insert(app.clone(), leaving);
                } else {
                    info!(%app, objects = run.inventory.len(), "app removed from this cluster; pruning is off, its objects stay");
                    if let Err(e) = self.store.remove(&app).await {
                        warn!(%app, error = %e, "forgetting the app's state failed");
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
        self.prune_leaving().await;
        for d in desired {
            // The same content may be held by another app already.
            let held = self.apps.values().find(|r| r.digest == d.digest).map(|r| r.bundle.clone());
            match self.apps.get_mut(&d.app) {
                Some(run) if run.digest == d.digest => {
                    if run.revision != d.revision {
                        run.revision = d.revision.clone();
                        let run = &self.apps[&d.app];
                        self.save(run).await;
                    }
                }
                existing => {
                    let Some(bundle) = d.bundle.clone().or(held) else {
                        warn!(app = %d.app, digest = %d.digest, "desired without its bundle; waiting for it");
                        continue;
                    };
                    let mut inventory = existing.map(|r| r.inventory.clone()).unwrap_or_default();
                    inventory.extend(returning.remove(&d.app).unwrap_or_default());
                    let run = AppRun::new(&d.app, &d.digest, &d.revision, bundle, BTreeSet::new());
                    // Record every object before it is applied: a crash never loses track of what was created.
                    inventory.extend(run.refs.iter().cloned());
                    let run = AppRun { inventory, ..run };
                    self.save(&run).await;
                    info!(app = %d.app, digest = %d.digest, objects = run.refs.len(), "new desired state");
                    self.apps.insert(d.app.clone(), run);
                }
            }
        }
        self.reindex();
        self.publish_held();
    }

    /// Deletes what apps that left the cluster still have; forgets an app once everything is gone. Failed
    /// deletes are retried with backoff, and the list is kept in the cluster meanwhile.
    async fn prune_leaving(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self.leaving.iter().filter(|(_, l)| l.retry_at <= now).map(|(a, _)| a.clone()).collect();
        for app in due {
            let Some(mut l) = self.leaving.remove(&app) else { continue };
            let mut remaining = BTreeSet::new();
            for r in &l.state.inventory {
                match self.applier.prune(&app, r).await {
                    Ok(Pruned::Kept(why)) => info!(%app, %why, "left in place"),
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
                    warn!(%app, error = %e, "forgetting the app's state failed");
                }
                continue;
            }
            l.state.inventory = remaining;
            l.failures += 1;
            l.retry_at = Instant::now() + backoff(l.failures);
            if let Err(e) = self.store.save(&l.state).await {
                warn!(%app, error = %e, "keeping what is left to delete failed");
            }
            self.leaving.insert(app, l);
        }
    }

    async fn step_all(&mut self) {
        self.prune_leaving().await;
        self.invalidate();
        let names: Vec<String> = self.apps.keys().cloned().collect();
        let mut statuses = BTreeMap::new();
        for name in names {
            let Some(mut run) = self.apps.remove(&name) else { continue };
            self.step(&mut run).await;
            let prev = self.statuses.borrow().get(&name).cloned();
            statuses.insert(name.clone(), self.status(&run, prev.as_ref()));
            self.apps.insert(name, run);
        }
        // Published with every app in place: an app being stepped is still held (a Hello sent meanwhile that
        // left it out would let a hub with no record of the cluster remove it).
        self.publish_held();
        if **self.statuses.borrow() != statuses {
            self.statuses.send_replace(Arc::new(statuses));
        }
    }

    /// Resolves kinds (scope, and a watch for each), then plans stages once.
    async fn prepare(&self, run: &mut AppRun) -> Result<(), String> {
        if !run.stages.is_empty() || run.refs.is_empty() {
            return Ok(());
        }
        let mut namespaced = Vec::with_capacity(run.refs.len());
        let mut seen: HashMap<(String, String), bool> = HashMap::new();
        for r in &run.refs {
            let key = (r.api_version.clone(), r.kind.clone());
            let ns = match seen.get(&key) {
                Some(ns) => *ns,
                None => match self.applier.resource(r).await {
                    Ok((ar, ns)) => {
                        self.cache.watch(&ar);
                        seen.insert(key, ns);
                        ns
                    }
                    // A kind a CRD of this app will bring: namespaced unless the CRD says otherwise.
                    Err(ApplyError::UnknownKind { .. }) => match run.crd_kinds.get(&r.kind) {
                        Some(namespaced) => *namespaced,
                        None => return Err(format!("{r}: the cluster does not serve {} {}", r.api_version, r.kind)),
                    },
                    Err(e) => return Err(e.full()),
                },
            };
            namespaced.push(ns);
        }
        run.plan(&namespaced);
        Ok(())
    }

    async fn step(&mut self, run: &mut AppRun) {
        if run.broken.is_some() {
            return;
        }
        evaluate(run, &self.cache);
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
            run.failures += 1;
            let wait = backoff(run.failures);
            run.waiting = Some(format!("{e}; retrying in {} s (attempt {} failed)", wait.as_secs() + 1, run.failures));
            run.problem = Some(e);
            run.retry_at = Some(Instant::now() + wait);
            return;
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

    /// Why stage `s` is not healthy yet, if it is not.
    fn unhealthy(&self, run: &AppRun, s: usize) -> Option<String> {
        run.stages[s].iter().find_map(|i| match eval_of(run, *i) {
            Some(e) if e.health.status == Status::Healthy => None,
            Some(e) => Some(format!("waiting for {} to become healthy: {}", run.refs[*i], e.health.describe())),
            None => Some(format!("waiting for {}", run.refs[*i])),
        })
    }

    /// Applies objects concurrently (the applier bounds API calls). Returns true when a failure is worth a
    /// retry of the whole app later (anything but the API rejecting an object).
    async fn apply_objects(&self, run: &mut AppRun, indices: &[usize]) -> bool {
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
                let mut obj = run.desired(*i);
                // Fields other controllers own are set on creation only.
                if !run.ignore[*i].is_empty() && self.cache.contains(&run.refs[*i]) {
                    strip(&mut obj, &run.ignore[*i]);
                }
                (*i, obj)
            })
            .collect();
        let applier = self.applier.clone();
        let results: Vec<(usize, Result<String, ApplyError>)> = futures::stream::iter(objs)
            .map(move |(i, obj)| {
                let applier = applier.clone();
                async move { (i, applier.apply(&obj).await) }
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
                Ok(rv) => {
                    run.errors.remove(&i);
                    if let Ok(v) = rv.parse::<u64>() {
                        run.applied_rv.insert(i, v);
                    }
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

    /// After the last stage: prune what left the bundle, record the result in the cluster.
    async fn finish(&mut self, run: &mut AppRun) {
        let current: BTreeSet<ObjectRef> = run.refs.iter().cloned().collect();
        let leaving: Vec<ObjectRef> = run.inventory.difference(&current).cloned().collect();
        run.pruned = 0;
        run.prune_notes.clear();
        let mut still = BTreeSet::new();
        if run.policy.sync.prune {
            for r in leaving {
                match self.applier.prune(&run.name, &r).await {
                    Ok(Pruned::Deleted) => {
                        run.pruned += 1;
                        info!(app = %run.name, object = %r, "pruned");
                    }
                    Ok(Pruned::AlreadyGone) => {}
                    Ok(Pruned::Kept(why)) => run.prune_notes.push(why),
                    Err(e) => {
                        run.prune_notes.push(e.full());
                        still.insert(r);
                    }
                }
            }
        } else if !leaving.is_empty() {
            run.prune_notes.push(format!("{} objects left the app and stay in place: pruning is off", leaving.len()));
        }
        run.inventory = current.union(&still).cloned().collect();
        run.applied = run.errors.is_empty();
        if run.errors.is_empty() {
            run.failures = 0;
        } else {
            // Rejected objects: the rest is applied; try again later in case the cluster changes its mind
            // (a CRD or webhook fixed), backing off.
            run.failures += 1;
            run.retry_at = Some(Instant::now() + backoff(run.failures));
        }
        self.save(run).await;
    }

    /// Drift: correct (re-apply the object) or leave it for the report.
    async fn enforce(&self, run: &mut AppRun) {
        let planned = !run.stages.is_empty();
        if run.policy.sync.drift != DriftMode::Correct || !planned || run.stage < run.stages.len() {
            return;
        }
        let now = Instant::now();
        run.fighting.retain(|_, until| *until > now);
        let mut to_fix = Vec::new();
        for i in 0..run.refs.len() {
            if run.errors.contains_key(&i) || run.fighting.contains_key(&i) {
                continue;
            }
            let drifted = eval_of(run, i).is_some_and(|e| !e.drift.is_empty() || (!e.present && e.synced));
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

    fn status(&self, run: &AppRun, prev: Option<&pb::AppStatus>) -> pb::AppStatus {
        let mut s = pb::AppStatus {
            app: run.name.clone(),
            digest: run.digest.clone(),
            revision: run.revision.clone(),
            objects: run.refs.len() as u32,
            corrects_drift: run.policy.sync.drift == DriftMode::Correct,
            pruned: run.pruned,
            ..Default::default()
        };
        if let Some(b) = &run.broken {
            s.phase = pb::Phase::Failed as i32;
            s.message = b.clone();
            s.health = pb::Health::Degraded as i32;
            return finish_status(s, prev);
        }
        let applied_objects = run.stages.iter().take(run.stage.min(run.stages.len())).map(Vec::len).sum::<usize>();
        s.objects_applied = (applied_objects
            - run.errors.keys().filter(|i| run.stages.iter().take(run.stage).any(|st| st.contains(i))).count())
            as u32;
        s.phase = if !run.errors.is_empty() {
            pb::Phase::Failed
        } else if run.stage >= run.stages.len() && run.applied {
            pb::Phase::Applied
        } else {
            pb::Phase::Applying
        } as i32;
        let mut worst: Option<(Health, String)> = None;
        let mut reasons = Vec::new();
        for (i, e) in &run.errors {
            let _ = i;
            reasons.push(e.clone());
        }
        for i in 0..run.refs.len() {
            let Some(e) = eval_of(run, i) else {
                // Applied, and the watch has not shown the result yet.
                s.not_ready += 1;
                if worst.is_none() {
                    worst = Some((
                        Health {
                            status: Status::Progressing,
                            reason: "Applying".into(),
                            message: "waiting for the cluster to report the applied change".into(),
                        },
                        format!("{}: waiting for the cluster to report the applied change", run.refs[i]),
                    ));
                }
                continue;
            };
            let h = &e.health;
            match h.status {
                Status::Healthy => s.ready += 1,
                Status::Missing => s.missing += 1,
                _ => s.not_ready += 1,
            }
            if !e.drift.is_empty() {
                s.drifted += 1;
                for DriftItem { path, desired, live } in &e.drift {
                    if s.drift.len() < FIRST * 2 {
                        s.drift.push(pb::DriftItem {
                            object: run.refs[i].to_string(),
                            path: path.clone(),
                            desired: desired.to_string(),
                            live: live.to_string(),
                        });
                    }
                }
            }
            if h.status != Status::Healthy {
                let text = format!("{}: {}", run.refs[i], h.describe());
                if reasons.len() < FIRST {
                    reasons.push(text.clone());
                }
                if worst.as_ref().is_none_or(|(w, _): &(Health, String)| h.status > w.status) {
                    worst = Some((h.clone(), text));
                }
            }
        }
        for i in run.fighting.keys() {
            reasons.insert(
                0,
                format!(
                    "{}: keeps drifting back: another controller changes it (add a sync.ignore rule)",
                    run.refs[*i]
                ),
            );
        }
        reasons.extend(run.prune_notes.iter().cloned());
        reasons.truncate(FIRST);
        s.reasons = reasons;
        let (health, reason) = match worst {
            Some((h, text)) => (h.status, text),
            None => (Status::Healthy, String::new()),
        };
        s.health = match health {
            Status::Healthy => pb::Health::Healthy,
            Status::Progressing => pb::Health::Progressing,
            Status::Missing => pb::Health::Missing,
            Status::Degraded => pb::Health::Degraded,
        } as i32;
        s.health_reason = reason;
        s.message = match (run.errors.values().next(), &run.waiting) {
            (Some(e), Some(w)) => format!("{e} ({w})"),
            (Some(e), None) => e.clone(),
            (None, Some(w)) => w.clone(),
            (None, None) => String::new(),
        };
        finish_status(s, prev)
    }
}

/// Keeps the previous change time when nothing but the time changed.
fn finish_status(mut s: pb::AppStatus, prev: Option<&pb::AppStatus>) -> pb::AppStatus {
    match prev {
        Some(p) if pb::AppStatus { changed_unix_ms: 0, ..p.clone() } == s => p.clone(),
        _ => {
            s.changed_unix_ms = now_ms();
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run_of(objects: &[Value]) -> AppRun {
        let lines: Vec<String> = objects.iter().map(|o| o.to_string()).collect();
        let bytes = Arc::new(lines.join("\n").into_bytes());
        AppRun::new("shop", "sha256:x", "r1", bytes, BTreeSet::new())
    }

    #[test]
    fn stages_follow_waves_and_kinds() {
        let mut run = run_of(&[
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}}),
            json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "shop"}}),
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "widgets.example.com"}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate", "namespace": "shop",
                   "annotations": {"flotilla.dev/wave": "-1"}}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "r"}}),
        ]);
        run.plan(&[true, true, false, false, true, false]);
        assert_eq!(run.stages, vec![vec![4], vec![2], vec![3], vec![5], vec![0, 1]]);
        assert_eq!(run.gate, vec![false, true, true, false, false], "wave -1 before wave 0; CRDs gate what follows");
        assert_eq!(run.desired(0)["metadata"]["labels"][APP_LABEL], "shop", "every object carries its app");
    }

    #[test]
    fn strip_removes_ignored_fields() {
        let mut o = json!({"spec": {"replicas": 3, "template": {"a": 1}}, "metadata": {"annotations": {"a/b": "x"}}});
        strip(&mut o, &["/spec/replicas".into(), "/metadata/annotations/a~1b".into(), "/nope/x".into()]);
        assert_eq!(o, json!({"spec": {"template": {"a": 1}}, "metadata": {"annotations": {}}}));
    }

    #[test]
    fn backoff_grows_to_five_minutes_with_jitter() {
        assert!(backoff(0) <= Duration::from_millis(1250) && backoff(0) >= Duration::from_millis(750));
        assert!(backoff(3) >= Duration::from_secs(6));
        assert!(backoff(30) <= Duration::from_secs(375));
    }

    #[test]
    fn an_unreadable_bundle_is_reported() {
        let run = AppRun::new("x", "sha256:y", "r", Arc::new(b"not json".to_vec()), BTreeSet::new());
        assert!(run.broken.as_deref().unwrap().starts_with("the bundle cannot be read"));
    }
}
