//! What the agent manages, as the cluster has it: one watch per kind across the cluster, filtered by the
//! `flotilla.dev/app` label the agent puts on every object it applies. Health and drift are computed from
//! this cache, so they follow the cluster as it changes (no polling), and a watch that breaks relists with
//! backoff (kube-runtime's watcher).

use crate::state::ObjectRef;
use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

/// The label on every object the agent applies: the app it belongs to.
pub const APP_LABEL: &str = "flotilla.dev/app";

/// (group, kind, namespace, name)
pub type Key = (String, String, String, String);

pub fn key_of(r: &ObjectRef) -> Key {
    (r.group().to_string(), r.kind.clone(), r.namespace.clone(), r.name.clone())
}

fn key_of_value(o: &Value) -> Key {
    key_of(&ObjectRef::of(o))
}

pub struct Cache {
    client: Client,
    /// Live objects as compact JSON (managedFields removed): a few times smaller than parsed values.
    objects: RwLock<HashMap<Key, Arc<str>>>,
    /// Keys changed since the engine last looked.
    dirty: Mutex<HashSet<Key>>,
    /// Bumped when a kind's first list completes (absence of its objects becomes meaningful).
    synced_generation: std::sync::atomic::AtomicU64,
    /// (group, kind) watched, and whether its first list completed.
    watched: Mutex<HashMap<(String, String), bool>>,
    /// Woken on every change.
    pub changed: Notify,
    shutdown: CancellationToken,
}

impl Cache {
    pub fn new(client: Client, shutdown: CancellationToken) -> Arc<Cache> {
        Arc::new(Cache {
            client,
            objects: RwLock::default(),
            dirty: Mutex::default(),
            synced_generation: Default::default(),
            watched: Mutex::default(),
            changed: Notify::new(),
            shutdown,
        })
    }

    /// The live object, parsed.
    pub fn get(&self, r: &ObjectRef) -> Option<Value> {
        let text = self.objects.read().unwrap_or_else(|p| p.into_inner()).get(&key_of(r)).cloned()?;
        serde_json::from_str(&text).ok()
    }

    pub fn contains(&self, r: &ObjectRef) -> bool {
        self.objects.read().unwrap_or_else(|p| p.into_inner()).contains_key(&key_of(r))
    }

    /// The keys changed since the last call.
    pub fn take_dirty(&self) -> HashSet<Key> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn synced_generation(&self) -> u64 {
        self.synced_generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the kind's watch has listed everything once (before that, absence means nothing).
    pub fn synced(&self, r: &ObjectRef) -> bool {
        let w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        w.get(&(r.group().to_string(), r.kind.clone())).copied().unwrap_or(false)
    }

    /// Starts watching a kind unless it is watched already.
    pub fn watch(self: &Arc<Self>, ar: &ApiResource) {
        let gk = (ar.group.clone(), ar.kind.clone());
        {
            let mut w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            if w.contains_key(&gk) {
                return;
            }
            w.insert(gk.clone(), false);
        }
        let cache = self.clone();
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), ar);
        let span = tracing::debug_span!("watch", group = %ar.group, kind = %ar.kind);
        tokio::spawn(
            async move {
                let cfg = watcher::Config::default().labels(APP_LABEL);
                let mut stream = watcher(api, cfg).default_backoff().boxed();
                let mut initial: Option<HashSet<Key>> = None;
                loop {
                    let event = tokio::select! {
                        _ = cache.shutdown.cancelled() => return,
                        e = stream.next() => e,
                    };
                    match event {
                        None => return,
                        Some(Err(e)) => warn!(error = %e, "watch failed; retrying with backoff"),
                        Some(Ok(ev)) => cache.on_event(&gk, ev, &mut initial),
                    }
                }
            }
            .instrument(span),
        );
    }

    fn on_event(&self, gk: &(String, String), ev: watcher::Event<DynamicObject>, initial: &mut Option<HashSet<Key>>) {
        let text = |o: DynamicObject| -> Option<(Key, Arc<str>)> {
            let mut v = serde_json::to_value(o).ok()?;
            // managedFields are large and never read here.
            if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("managedFields");
            }
            Some((key_of_value(&v), Arc::from(v.to_string())))
        };
        let mut dirty = Vec::new();
        let mut synced = false;
        match ev {
            watcher::Event::Init => *initial = Some(HashSet::new()),
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                if let Some((k, t)) = text(o) {
                    if let Some(seen) = initial.as_mut() {
                        seen.insert(k.clone());
                    }
                    let mut objects = self.objects.write().unwrap_or_else(|p| p.into_inner());
                    if objects.get(&k).is_none_or(|old| **old != *t) {
                        objects.insert(k.clone(), t);
                        dirty.push(k);
                    }
                }
            }
            watcher::Event::Delete(o) => {
                if let Some((k, _)) = text(o) {
                    self.objects.write().unwrap_or_else(|p| p.into_inner()).remove(&k);
                    dirty.push(k);
                }
            }
            watcher::Event::InitDone => {
                // Objects of this kind not in the new list are gone.
                if let Some(seen) = initial.take() {
                    self.objects.write().unwrap_or_else(|p| p.into_inner()).retain(|k, _| {
                        let keep = (&k.0, &k.1) != (&gk.0, &gk.1) || seen.contains(k);
                        if !keep {
                            dirty.push(k.clone());
                        }
                        keep
                    });
                }
                let first =
                    self.watched.lock().unwrap_or_else(|p| p.into_inner()).insert(gk.clone(), true) != Some(true);
                if first {
                    self.synced_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    synced = true;
                }
                debug!("initial list complete");
            }
        }
        if dirty.is_empty() && !synced {
            return;
        }
        self.dirty.lock().unwrap_or_else(|p| p.into_inner()).extend(dirty);
        self.changed.notify_one();
    }
}
