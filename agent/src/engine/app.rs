//! One app as the engine keeps it, and the parts of keeping it that need no I/O: the bundle's index, the
//! placement of objects whose scope only discovery knows, stage planning, evaluation from the cache.

use crate::apply::{ADOPTED_ANNOTATION, ADOPT_ANNOTATION};
use crate::cache::{Cache, APP_LABEL};
use crate::state::{AppState, ObjectRef};
use flotilla_common::drift::{DriftItem, FieldPath};
use flotilla_common::fleet::{AppPolicy, Bundle};
use flotilla_common::health::{Health, Rules, Status};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use tokio::time::Instant;

pub use flotilla_common::fleet::objects::WAVE_ANNOTATION;

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

/// What the app is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its bundle cannot be read.
    Broken,
    /// Kinds not resolved yet (discovery), or a stage still to apply.
    Applying,
    /// Every stage went through; objects the API rejected or whose kind is not served are marked.
    Applied,
}

pub struct AppRun {
    pub name: String,
    pub digest: String,
    pub revision: String,
    pub bundle: Arc<Vec<u8>>,
    pub policy: AppPolicy,
    pub rules: Rules,
    /// Each object's line in the bundle: desired objects are parsed when used, not kept parsed.
    lines: Vec<(usize, usize)>,
    pub refs: Vec<ObjectRef>,
    pub ignore: Vec<Vec<FieldPath>>,
    pub managers: Vec<Vec<String>>,
    waves: Vec<i64>,
    /// Namespaces the app brings itself, and the scope of kinds its CRDs define ((group, kind) → namespaced).
    pub own_namespaces: BTreeSet<String>,
    pub crd_kinds: HashMap<(String, String), bool>,
    /// Whether each object's kind is namespaced, once discovery (or the app's CRD) said so.
    pub scope: Vec<Option<bool>>,
    /// Objects whose kind the cluster does not serve (yet), with what is missing.
    pub unserved: BTreeMap<usize, String>,
    pub unserved_checked: Option<Instant>,
    /// Health and drift of each object, recomputed when the cache says the object changed.
    pub evals: Vec<Option<Eval>>,
    /// The resourceVersion the last apply of each object returned: an older copy in the cache predates it.
    pub applied_rv: HashMap<usize, u64>,
    /// Drift as last checked, by the fingerprint of the live object it was checked on: a live object that
    /// changed only in status needs no new dry-run.
    pub checked: HashMap<usize, (u64, Vec<DriftItem>)>,
    /// Object indices per stage, in order; `gate[i]`: stage i waits for stage i-1 to be healthy.
    pub stages: Vec<Vec<usize>>,
    pub gate: Vec<bool>,
    pub stage: usize,
    /// Every object the app may have created (pruning reads it).
    pub inventory: BTreeSet<ObjectRef>,
    /// The stored state is what the engine holds (a save must succeed before the apply it records).
    pub saved: bool,
    /// Every stage applied without error at this digest.
    pub applied: bool,
    /// Apply errors of the last attempt, by object index.
    pub errors: BTreeMap<usize, String>,
    /// Why the apply cannot go on now (a gate, a backoff).
    pub waiting: Option<String>,
    pub failures: u32,
    pub retry_at: Option<Instant>,
    pub pruned: u32,
    pub prune_notes: Vec<String>,
    pub corrections: HashMap<usize, VecDeque<Instant>>,
    pub fighting: HashMap<usize, Instant>,
    /// An app whose bundle could not be read: the reason.
    pub broken: Option<String>,
    /// Why the last attempt could not start (discovery failed), shown while it backs off.
    pub problem: Option<String>,
    /// Policy fields from a newer hub this agent does not know (ignored).
    pub unknown_policy: Vec<String>,
    /// Objects that existed before the app took them over (`sync.adopt`): marked so, released when they leave.
    pub adopted: BTreeSet<usize>,
}

/// One object's health and drift, as last evaluated.
#[derive(Debug, Clone)]
pub struct Eval {
    pub health: Health,
    pub drift: Vec<DriftItem>,
    /// The object exists in the cluster.
    pub present: bool,
    /// Its kind's watch has listed everything once (so absence means missing).
    pub synced: bool,
}

impl AppRun {
    pub fn new(
        name: &str,
        digest: &str,
        revision: &str,
        bundle: Arc<Vec<u8>>,
        inventory: BTreeSet<ObjectRef>,
    ) -> AppRun {
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
            managers: Vec::new(),
            waves: Vec::new(),
            own_namespaces: BTreeSet::new(),
            crd_kinds: HashMap::new(),
            scope: Vec::new(),
            unserved: BTreeMap::new(),
            unserved_checked: None,
            evals: Vec::new(),
            applied_rv: HashMap::new(),
            checked: HashMap::new(),
            stages: Vec::new(),
            gate: Vec::new(),
            stage: 0,
            inventory,
            saved: false,
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
            unknown_policy: Vec::new(),
            adopted: BTreeSet::new(),
        };
        if let Err(e) = run.read_bundle() {
            run.broken = Some(format!("the bundle cannot be read: {e}"));
        }
        run
    }

    /// Indexes the bundle's objects (one pass; nothing parsed is kept).
    fn read_bundle(&mut self) -> Result<(), String> {
        let bundle = self.bundle.clone();
        let (policy, unknown) = Bundle::policy_lenient(&bundle).map_err(|e| e.to_string())?;
        self.policy = policy;
        self.unknown_policy = unknown;
        self.rules = Rules::new(&self.policy.health)?;
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
                    let gk = (str_at(&o, "/spec/group").to_string(), str_at(&o, "/spec/names/kind").to_string());
                    self.crd_kinds.insert(gk, str_at(&o, "/spec/scope") != "Cluster");
                }
                _ => {}
            }
            self.lines.push(range);
            self.refs.push(ObjectRef::of(&o));
            self.ignore.push(self.policy.ignored_paths(&o));
            self.managers.push(self.policy.ignored_managers(&o));
            // Checked by the hub; a bundle from an older hub with a bad wave applies it in wave 0.
            self.waves.push(flotilla_common::fleet::objects::wave_of(&o).unwrap_or(0));
        }
        self.evals = vec![None; self.refs.len()];
        self.scope = vec![None; self.refs.len()];
        Ok(())
    }

    pub fn phase(&self) -> Phase {
        if self.broken.is_some() {
            Phase::Broken
        } else if !self.stages.is_empty() && self.stage >= self.stages.len() || self.refs.is_empty() {
            Phase::Applied
        } else {
            Phase::Applying
        }
    }

    /// Object `i` as the agent applies it: the bundle's object with the app's label, in the namespace its
    /// scope gives it.
    pub fn desired(&self, i: usize) -> Value {
        let (a, b) = self.lines[i];
        let mut o: Value = serde_json::from_slice(&self.bundle[a..b]).unwrap_or(Value::Null);
        if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            let labels = m.entry("labels").or_insert_with(|| Value::Object(Default::default()));
            if let Some(l) = labels.as_object_mut() {
                l.insert(APP_LABEL.to_string(), Value::String(self.name.clone()));
            }
            match self.refs[i].namespace.as_str() {
                "" => m.remove("namespace"),
                ns => m.insert("namespace".into(), Value::String(ns.to_string())),
            };
        }
        o
    }

    /// Object `i` as applied over `live`: fields other controllers own keep their live values; an adopted
    /// object keeps saying so.
    pub fn applied_form(&self, i: usize, live: Option<&Value>) -> Value {
        let mut o = self.desired(i);
        flotilla_common::drift::with_live_values(&mut o, live, &self.ignore[i]);
        if self.adopted.contains(&i) {
            if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                let a = m.entry("annotations").or_insert_with(|| Value::Object(Default::default()));
                if let Some(a) = a.as_object_mut() {
                    a.insert(ADOPTED_ANNOTATION.into(), Value::String("true".into()));
                }
            }
        }
        o
    }

    /// Whether the app may take over object `i` though the fleet did not create it.
    pub fn may_adopt(&self, i: usize) -> bool {
        self.policy.sync.adopt || {
            let pointer = format!("/metadata/annotations/{}", ADOPT_ANNOTATION.replace('/', "~1"));
            let (a, b) = self.lines[i];
            serde_json::from_slice::<Value>(&self.bundle[a..b]).is_ok_and(|o| str_at(&o, &pointer) == "true")
        }
    }

    /// Why object `i` may not be written on this cluster, if it may not: the agent's own namespace, or the
    /// guard the hub put in the bundle (checked again here, after placement).
    pub fn refusal(&self, i: usize, state_namespace: &str) -> Option<String> {
        let r = &self.refs[i];
        let named = r.kind == "Namespace" && r.group().is_empty() && r.name == state_namespace;
        if r.namespace == state_namespace || named {
            return Some(format!(
                "{r} is refused: namespace {state_namespace} holds the agent's state and is never written by an app"
            ));
        }
        let guard = self.policy.guard.as_ref()?;
        // Only RBAC objects are judged on their content (what they bind or grant); the rest on their identity,
        // so the apply path parses no object twice.
        let o = if r.group() == "rbac.authorization.k8s.io" {
            self.desired(i)
        } else {
            serde_json::json!({"apiVersion": r.api_version, "kind": r.kind,
                "metadata": {"name": r.name, "namespace": r.namespace}})
        };
        guard.check(&o, self.scope[i]).err().map(|why| format!("{r} is refused: {why}"))
    }

    /// Records a kind's scope for object `i` and places it: a namespaced object that names no namespace goes
    /// to the app's namespace, a cluster-scoped one has none. Returns the reference it had before when the
    /// placement changed it.
    pub fn place(&mut self, i: usize, namespaced: bool) -> Option<ObjectRef> {
        self.scope[i] = Some(namespaced);
        let r = &self.refs[i];
        let ns = match (namespaced, r.namespace.is_empty()) {
            (true, true) => self.policy.namespace.clone().unwrap_or_else(|| "default".into()),
            (false, false) => String::new(),
            _ => return None,
        };
        let old = r.clone();
        self.refs[i].namespace = ns;
        Some(old)
    }

    /// The scope of a kind this app's CRDs define.
    pub fn crd_scope(&self, r: &ObjectRef) -> Option<bool> {
        self.crd_kinds.get(&(r.group().to_string(), r.kind.clone())).copied()
    }

    /// Splits the objects whose scope is known into stages (scope comes from discovery).
    pub fn plan(&mut self) {
        let mut keyed: BTreeMap<(i64, u8), Vec<usize>> = BTreeMap::new();
        // CRDs and Namespaces go with the first wave: a PreSync hook runs in the namespace the app brings.
        let first = self.waves.iter().copied().min().unwrap_or(0);
        for (i, r) in self.refs.iter().enumerate() {
            if let Some(namespaced) = self.scope[i] {
                let rank = kind_rank(&r.kind, namespaced);
                let wave = if rank <= 1 { first.min(self.waves[i]) } else { self.waves[i] };
                keyed.entry((wave, rank)).or_default().push(i);
            }
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

    pub fn state(&self) -> AppState {
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

    pub fn eval(&self, i: usize) -> Option<&Eval> {
        self.evals.get(i).and_then(Option::as_ref)
    }
}

/// A hash of what an object says apart from its status and bookkeeping (resourceVersion, managedFields):
/// equal fingerprints mean equal drift. Order-insensitive for mappings (no sorting, no allocation).
pub fn fingerprint(o: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    fn hash_of(x: impl Hash) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        x.hash(&mut h);
        h.finish()
    }
    fn fp(v: &Value, top: bool, meta: bool) -> u64 {
        match v {
            Value::Null => 0x9e37_79b9_7f4a_7c15,
            Value::Bool(b) => hash_of((1u8, *b)),
            Value::Number(n) => match n.as_i64() {
                Some(i) => hash_of((2u8, i)),
                None => hash_of((2u8, n.as_f64().map(f64::to_bits))),
            },
            Value::String(s) => hash_of((3u8, s.as_str())),
            Value::Array(a) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (4u8, a.len()).hash(&mut h);
                for x in a {
                    fp(x, false, false).hash(&mut h);
                }
                h.finish()
            }
            Value::Object(m) => {
                let (mut sum, mut n) = (0u64, 0usize);
                for (k, x) in m {
                    if top && k == "status" || meta && (k == "resourceVersion" || k == "managedFields") {
                        continue;
                    }
                    n += 1;
                    sum = sum.wrapping_add(hash_of((k.as_str(), fp(x, false, top && k == "metadata"))));
                }
                sum ^ hash_of((5u8, n))
            }
        }
    }
    fp(o, true, false)
}

/// Evaluates the objects whose evaluation is stale: health from the live object (or missing); drift from the
/// last check when the live object's fingerprint is the one checked. Returns the objects (with their live
/// version) whose drift needs a new dry-run.
pub fn evaluate(run: &mut AppRun, cache: &Cache) -> Vec<(usize, Value)> {
    let mut need = Vec::new();
    for i in 0..run.evals.len() {
        if run.evals[i].is_some() || run.unserved.contains_key(&i) || run.scope[i].is_none() {
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
            Some(live) => {
                let fp = fingerprint(&live);
                let drift = match run.checked.get(&i) {
                    Some((f, d)) if *f == fp => d.clone(),
                    _ => {
                        need.push((i, live.clone()));
                        Vec::new()
                    }
                };
                Eval { health: run.rules.check(&live), drift, present: true, synced }
            }
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
    need
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn run_of(objects: &[Value]) -> AppRun {
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
        for (i, ns) in [true, true, false, false, true, false].into_iter().enumerate() {
            run.place(i, ns);
        }
        run.plan();
        assert_eq!(run.stages, vec![vec![2], vec![3], vec![4], vec![5], vec![0, 1]]);
        assert_eq!(
            run.gate,
            vec![false, true, false, true, false],
            "CRDs and Namespaces with the first wave; wave -1 before wave 0; CRDs gate what follows"
        );
        assert_eq!(run.desired(0)["metadata"]["labels"][APP_LABEL], "shop", "every object carries its app");
    }

    #[test]
    fn objects_whose_scope_only_the_cluster_knows_are_placed_by_discovery() {
        let mut run = run_of(&[
            json!({"flotilla.dev/policy": {"namespace": "shop", "fromANewerHub": true, "sync": {"alsoNew": 1}}}),
            json!({"apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer", "metadata": {"name": "le"}}),
            json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "c"}}),
            json!({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t", "namespace": "x"}}),
        ]);
        assert!(run.broken.is_none(), "{:?}", run.broken);
        assert_eq!(run.unknown_policy, vec!["fromANewerHub".to_string(), "sync.alsoNew".to_string()]);
        assert_eq!(run.place(0, false), None, "cluster-scoped, no namespace: as it is");
        assert_eq!(run.place(1, true).map(|r| r.namespace), Some(String::new()));
        assert_eq!(run.refs[1].namespace, "shop");
        assert_eq!(run.desired(1)["metadata"]["namespace"], "shop");
        assert!(run.place(2, false).is_some());
        assert!(run.desired(2)["metadata"].get("namespace").is_none());
        run.plan();
        assert_eq!(run.stages.iter().flatten().count(), 3);
    }

    #[test]
    fn fingerprints_ignore_status_and_bookkeeping_only() {
        let a = json!({"metadata": {"name": "a", "resourceVersion": "1", "labels": {"x": "1"}}, "spec": {"r": 1}, "status": {"s": 1}});
        let mut b = a.clone();
        b["metadata"]["resourceVersion"] = json!("9");
        b["status"]["s"] = json!(2);
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b["spec"]["r"] = json!(2);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let mut c = a.clone();
        c["metadata"]["labels"]["x"] = json!("2");
        assert_ne!(fingerprint(&a), fingerprint(&c));
        let mut d = a.clone();
        d["spec"]["status"] = json!("a field named status below the top is content");
        assert_ne!(fingerprint(&a), fingerprint(&d));
    }

    #[test]
    fn an_unreadable_bundle_is_reported() {
        let run = AppRun::new("x", "sha256:y", "r", Arc::new(b"not json".to_vec()), BTreeSet::new());
        assert!(run.broken.as_deref().unwrap().starts_with("the bundle cannot be read"));
    }
}
