//! One simulated cluster's state: its objects, a resourceVersion counter shared by every kind, a bounded
//! event history for resuming watches, and the live watch fan-out (created only while someone watches, so
//! idle clusters cost a few hundred bytes plus their objects).

use crate::resources::ResourceDef;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// An object as stored: compact JSON, parsed where it is used. A parsed `serde_json::Value` costs several
/// times its text in memory; this keeps 10,000 clusters and their history small.
#[derive(Debug, PartialEq, Eq)]
pub struct Stored(Box<[u8]>);

impl Stored {
    pub fn new(v: &Value) -> Obj {
        Arc::new(Stored(serde_json::to_vec(v).unwrap_or_default().into_boxed_slice()))
    }

    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.0).unwrap_or(Value::Null)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// A cheap pre-filter before parsing: whether the JSON text contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        !needle.is_empty() && self.0.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

pub type Obj = Arc<Stored>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// A committed change.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub typ: EventType,
    pub key: String,
    pub obj: Obj,
    pub old: Option<Obj>,
}

/// What watchers receive.
#[derive(Debug, Clone)]
pub enum Signal {
    Event(Arc<Event>),
    /// The cluster went offline: every open watch is cut.
    Disconnect,
}

/// Faults injected into one cluster's API.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every request, in milliseconds.
    pub latency_ms: u64,
    /// Fraction (0.0 to 1.0) of requests answered with 503.
    pub error_rate: f64,
    /// Connections are dropped without an answer and open watches are cut.
    pub offline: bool,
}

/// How the simulated controllers behave in one cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Behaviour {
    /// Time for a workload's pods to become ready after a change, in milliseconds.
    pub ready_after_ms: u64,
    /// Time for a Job to complete (or fail).
    pub job_after_ms: u64,
    /// Time for a PersistentVolumeClaim to bind.
    pub bind_after_ms: u64,
    /// Time for a LoadBalancer Service to get an address.
    pub lb_after_ms: u64,
    /// Time for a CustomResourceDefinition to become Established.
    pub crd_after_ms: u64,
    /// Caps every Deployment's progressDeadlineSeconds, so failures surface quickly in rehearsals.
    pub progress_deadline_cap_s: Option<u64>,
    /// Regular expression: containers whose image matches never become ready.
    pub fail_images: Option<String>,
    /// Nodes reported for DaemonSet scheduling.
    pub nodes: u32,
    /// An ingress controller runs: Ingresses and Gateway API Gateways get an address (after `lb_after_ms`).
    /// Off rehearses a cluster without one, where they never do.
    pub ingress_controller: bool,
    /// Workloads get real ReplicaSets (Deployments) and Pods (ReplicaSets, StatefulSets, DaemonSets), so
    /// `kubectl get pods`, `logs` and `rollout history` look as on a real cluster. Off by default: idle
    /// clusters stay cheap.
    pub pods: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            ready_after_ms: 500,
            job_after_ms: 1000,
            bind_after_ms: 200,
            lb_after_ms: 300,
            crd_after_ms: 50,
            progress_deadline_cap_s: None,
            fail_images: None,
            nodes: 1,
            ingress_controller: true,
            pods: false,
        }
    }
}

/// Settings with the failure rule compiled.
#[derive(Debug, Clone)]
pub struct Settings {
    pub behaviour: Behaviour,
    pub fail_images: Option<regex::Regex>,
}

impl Settings {
    pub fn new(behaviour: Behaviour) -> Result<Self, regex::Error> {
        let fail_images = behaviour.fail_images.as_deref().map(regex::Regex::new).transpose()?;
        Ok(Settings { behaviour, fail_images })
    }

    pub fn image_fails(&self, image: &str) -> bool {
        self.fail_images.as_ref().is_some_and(|r| r.is_match(image))
    }
}

pub const WATCH_CHANNEL: usize = 1024;

pub struct ClusterState {
    pub rv: u64,
    /// storage key → (namespace, name) → object
    pub objects: HashMap<String, BTreeMap<(String, String), Obj>>,
    pub log: VecDeque<Arc<Event>>,
    pub log_cap: usize,
    /// Watches must start after this version; older ones get 410 Gone.
    pub compacted_rv: u64,
    pub watch_tx: Option<broadcast::Sender<Signal>>,
    /// Resources served because a CustomResourceDefinition is Established (CRD name → versions).
    pub crds: BTreeMap<String, Vec<Arc<ResourceDef>>>,
    /// owner uid → number of objects whose ownerReferences name it; lets deletions find out whether there is
    /// anything to garbage-collect without scanning the cluster.
    owners: HashMap<String, usize>,
}

impl Stored {
    /// The uids this object's ownerReferences name.
    pub fn owner_uids(&self) -> Vec<String> {
        if !self.contains("ownerReferences") {
            return Vec::new();
        }
        self.value()
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .map(|refs| refs.iter().filter_map(|r| r.get("uid")?.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

impl ClusterState {
    fn new(log_cap: usize) -> Self {
        ClusterState {
            rv: 0,
            objects: HashMap::new(),
            log: VecDeque::new(),
            log_cap,
            compacted_rv: 0,
            watch_tx: None,
            crds: BTreeMap::new(),
            owners: HashMap::new(),
        }
    }

    /// Whether any object names `uid` among its owners.
    pub fn has_dependents(&self, uid: &str) -> bool {
        self.owners.contains_key(uid)
    }

    fn count_owners(&mut self, o: &Stored, delta: isize) {
        for uid in o.owner_uids() {
            let n = self.owners.entry(uid.clone()).or_insert(0);
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                self.owners.remove(&uid);
            }
        }
    }

    pub fn get(&self, key: &str, ns: &str, name: &str) -> Option<&Obj> {
        self.objects.get(key)?.get(&(ns.to_string(), name.to_string()))
    }

    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Stores `obj` (whose resourceVersion is already set to `rv`) and publishes the change.
    pub fn put(&mut self, key: &str, ns: &str, name: &str, obj: Obj, rv: u64) {
        let old =
            self.objects.entry(key.to_string()).or_default().insert((ns.to_string(), name.to_string()), obj.clone());
        if let Some(o) = &old {
            self.count_owners(o, -1);
        }
        self.count_owners(&obj, 1);
        let typ = if old.is_some() { EventType::Modified } else { EventType::Added };
        self.publish(Event { rv, typ, key: key.to_string(), obj, old });
    }

    /// Removes an object; `last` is its final state (with the deletion's resourceVersion).
    pub fn remove(&mut self, key: &str, ns: &str, name: &str, last: Obj, rv: u64) {
        let map = self.objects.get_mut(key);
        let old = map.and_then(|m| m.remove(&(ns.to_string(), name.to_string())));
        if self.objects.get(key).is_some_and(BTreeMap::is_empty) {
            self.objects.remove(key);
        }
        if let Some(o) = &old {
            self.count_owners(o, -1);
        }
        self.publish(Event { rv, typ: EventType::Deleted, key: key.to_string(), obj: last, old });
    }

    fn publish(&mut self, ev: Event) {
        let ev = Arc::new(ev);
        self.log.push_back(ev.clone());
        while self.log.len() > self.log_cap {
            if let Some(e) = self.log.pop_front() {
                self.compacted_rv = e.rv;
            }
        }
        if let Some(tx) = &self.watch_tx {
            if tx.send(Signal::Event(ev)).is_err() {
                self.watch_tx = None;
            }
        }
    }

    pub fn subscribe(&mut self) -> broadcast::Receiver<Signal> {
        match &self.watch_tx {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(WATCH_CHANNEL);
                self.watch_tx = Some(tx);
                rx
            }
        }
    }

    /// Forgets the event history, so every watch from an older version gets 410 Gone.
    pub fn compact(&mut self) {
        self.log.clear();
        self.compacted_rv = self.rv;
    }

    pub fn disconnect_watchers(&mut self) {
        if let Some(tx) = self.watch_tx.take() {
            let _ = tx.send(Signal::Disconnect);
        }
    }

    pub fn object_count(&self) -> usize {
        self.objects.values().map(BTreeMap::len).sum()
    }
}

/// One simulated cluster.
pub struct Cluster {
    pub name: String,
    state: Mutex<ClusterState>,
    faults: Mutex<Faults>,
    settings: Mutex<Arc<Settings>>,
    /// Open TLS connections whose server name chose this cluster.
    pub connections: std::sync::atomic::AtomicUsize,
    /// None until rules are set (idle clusters stay small).
    admission: Mutex<Option<Arc<crate::admission::Admission>>>,
    /// Cancelled when the cluster goes offline: its connections close at once. Made by the first bound
    /// connection.
    cut: Mutex<Option<tokio_util::sync::CancellationToken>>,
}

impl Cluster {
    pub fn new(name: String, settings: Arc<Settings>, log_cap: usize) -> Self {
        Cluster {
            name,
            state: Mutex::new(ClusterState::new(log_cap)),
            faults: Mutex::new(Faults::default()),
            settings: Mutex::new(settings),
            connections: Default::default(),
            admission: Default::default(),
            cut: Default::default(),
        }
    }

    /// The state lock. Never held across an await point.
    pub fn state(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn faults(&self) -> Faults {
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_faults(&self, f: Faults) {
        let offline = f.offline;
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = f;
        if offline {
            self.state().disconnect_watchers();
            if let Some(cut) = self.cut.lock().unwrap_or_else(|p| p.into_inner()).take() {
                cut.cancel();
            }
        }
    }

    /// Cancelled when the cluster next goes offline.
    pub fn cut_token(&self) -> tokio_util::sync::CancellationToken {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Default::default).clone()
    }

    pub fn admission(&self) -> Arc<crate::admission::Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
    }

    pub fn set_admission(&self, a: crate::admission::Admission) {
        *self.admission.lock().unwrap_or_else(|p| p.into_inner()) = (!a.rules.is_empty()).then(|| Arc::new(a));
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_settings(&self, s: Arc<Settings>) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn history_is_bounded_and_compaction_moves_forward() {
        let c = Cluster::new("a".into(), Arc::new(Settings::new(Behaviour::default()).unwrap()), 3);
        let mut s = c.state();
        for i in 0..5 {
            let rv = s.next_rv();
            s.put("/configmaps", "default", &format!("c{i}"), Stored::new(&json!({})), rv);
        }
        assert_eq!(s.log.len(), 3);
        assert_eq!(s.compacted_rv, 2);
        assert_eq!(s.object_count(), 5);
        s.compact();
        assert_eq!(s.compacted_rv, 5);
    }

    #[test]
    fn watchers_see_events_and_disconnects() {
        let c = Cluster::new("a".into(), Arc::new(Settings::new(Behaviour::default()).unwrap()), 10);
        let mut rx = c.state().subscribe();
        {
            let mut s = c.state();
            let rv = s.next_rv();
            s.put("/configmaps", "default", "x", Stored::new(&json!({})), rv);
        }
        assert!(matches!(rx.try_recv(), Ok(Signal::Event(e)) if e.typ == EventType::Added));
        c.set_faults(Faults { offline: true, ..Default::default() });
        assert!(matches!(rx.try_recv(), Ok(Signal::Disconnect)));
    }

    #[test]
    fn owner_references_are_indexed() {
        let c = Cluster::new("a".into(), Arc::new(Settings::new(Behaviour::default()).unwrap()), 10);
        let mut s = c.state();
        let child = |owner: &str| Stored::new(&json!({"metadata": {"ownerReferences": [{"uid": owner}]}}));
        s.put("/configmaps", "default", "c", child("u1"), 1);
        assert!(s.has_dependents("u1"));
        s.put("/configmaps", "default", "c", child("u2"), 2);
        assert!(!s.has_dependents("u1") && s.has_dependents("u2"));
        s.remove("/configmaps", "default", "c", Stored::new(&json!({})), 3);
        assert!(!s.has_dependents("u2"));
    }

    #[test]
    fn failure_rule_matches_images() {
        let s = Settings::new(Behaviour { fail_images: Some(":broken$".into()), ..Default::default() }).unwrap();
        assert!(s.image_fails("nginx:broken"));
        assert!(!s.image_fails("nginx:1.27"));
        assert!(Settings::new(Behaviour { fail_images: Some("(".into()), ..Default::default() }).is_err());
    }
}
