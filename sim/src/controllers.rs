//! Simulated controllers. Each write that needs a controller's reaction spawns one short task for that
//! object; an idle cluster runs no task at all, which is what lets one process hold 10,000 clusters.
//! Every task re-reads the object before it writes and stops when a newer generation has superseded it.
//!
//! - Deployments, StatefulSets, DaemonSets, ReplicaSets: rollout status and conditions, ready after the
//!   cluster's `ready_after_ms`; an image matching the failure rule never becomes ready and a Deployment then
//!   reports `Progressing=False` / `ProgressDeadlineExceeded` after its deadline.
//! - Jobs complete (or fail on the failure rule), Pods run, PVCs bind, LoadBalancer Services get an address.
//! - CustomResourceDefinitions become Established and their kinds are served.
//! - Namespace deletion removes the contents, then the namespace; garbage collection follows ownerReferences.

use crate::fields::{self, Ctx, Scope};
use crate::kinds;
use crate::ops::now;
use crate::resources::{self, ResourceDef};
use crate::store::{Cluster, ClusterState, Stored};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, Instrument};

const MANAGER: &str = "kube-controller-manager";

fn spawn<F>(name: &'static str, c: &Arc<Cluster>, obj: &str, fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        let span = tracing::debug_span!("controller", kind = name, cluster = %c.name, object = %obj);
        h.spawn(fut.instrument(span));
    }
}

fn s<'a>(o: &'a Value, p: &str) -> Option<&'a str> {
    o.pointer(p).and_then(Value::as_str)
}

fn i(o: &Value, p: &str) -> Option<i64> {
    o.pointer(p).and_then(Value::as_i64)
}

/// Reacts to a committed write.
pub fn observe(c: &Arc<Cluster>, res: &Arc<ResourceDef>, obj: &Value) {
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return;
    }
    let ns = s(obj, "/metadata/namespace").unwrap_or_default().to_string();
    let name = s(obj, "/metadata/name").unwrap_or_default().to_string();
    let uid = s(obj, "/metadata/uid").unwrap_or_default().to_string();
    let id = format!("{ns}/{name}");
    if !res.builtin {
        if res.group == "gateway.networking.k8s.io"
            && res.kind == "Gateway"
            && obj.pointer("/status/addresses").is_none()
        {
            let (c2, r2) = (c.clone(), res.clone());
            spawn("gateway", c, &id, async move { ingress(c2, r2, ns, name, uid).await });
        }
        return;
    }
    match res.kind.as_str() {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" => {
            let generation = i(obj, "/metadata/generation").unwrap_or(1);
            if i(obj, "/status/observedGeneration") != Some(generation) {
                let (c2, r2) = (c.clone(), res.clone());
                spawn("workload", c, &id, async move { workload(c2, r2, ns, name, uid, generation).await });
            }
        }
        "Job" if obj.pointer("/status/startTime").is_none() => {
            let (c2, r2) = (c.clone(), res.clone());
            spawn("job", c, &id, async move { job(c2, r2, ns, name, uid).await });
        }
        "Pod" if obj.pointer("/status/conditions").is_none() => {
            let (c2, r2) = (c.clone(), res.clone());
            spawn("pod", c, &id, async move { pod(c2, r2, ns, name, uid).await });
        }
        "PersistentVolumeClaim" if s(obj, "/status/phase") != Some("Bound") => {
            let (c2, r2) = (c.clone(), res.clone());
            spawn("pvc", c, &id, async move { pvc(c2, r2, ns, name, uid).await });
        }
        "Ingress" if obj.pointer("/status/loadBalancer/ingress").is_none() => {
            let (c2, r2) = (c.clone(), res.clone());
            spawn("ingress", c, &id, async move { ingress(c2, r2, ns, name, uid).await });
        }
        "APIService" => {
            let (c2, r2) = (c.clone(), res.clone());
            spawn("apiservice", c, &id, async move { api_service(c2, r2, name, uid).await });
        }
        "Service" => {
            // An APIService waiting for this Service becomes Available.
            let waiting: Vec<(String, String)> = {
                let st = c.state();
                st.objects
                    .get("apiregistration.k8s.io/apiservices")
                    .into_iter()
                    .flatten()
                    .map(|(_, o)| o.value())
                    .filter(|a| {
                        s(a, "/spec/service/namespace") == Some(&ns) && s(a, "/spec/service/name") == Some(&name)
                    })
                    .map(|a| {
                        (
                            s(&a, "/metadata/name").unwrap_or_default().to_string(),
                            s(&a, "/metadata/uid").unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            };
            if let Some(def) = crate::resources::catalogue().iter().find(|d| d.kind == "APIService") {
                for (n, u) in waiting {
                    let (c2, r2) = (c.clone(), def.clone());
                    spawn("apiservice", c, &n.clone(), async move { api_service(c2, r2, n, u).await });
                }
            }
            if s(obj, "/spec/type") == Some("LoadBalancer") && obj.pointer("/status/loadBalancer/ingress").is_none() {
                let (c2, r2) = (c.clone(), res.clone());
                spawn("service", c, &id, async move { load_balancer(c2, r2, ns, name, uid).await });
            }
        }
        "CustomResourceDefinition" => {
            let (c2, r2) = (c.clone(), res.clone());
            let generation = i(obj, "/metadata/generation").unwrap_or(1);
            spawn("crd", c, &id, async move { establish(c2, r2, name, uid, generation).await });
        }
        _ => {}
    }
}

/// Writes with the controller's identity, if the object still has `uid` and `check` accepts it.
fn controller_write(
    c: &Arc<Cluster>,
    res: &Arc<ResourceDef>,
    ns: &str,
    name: &str,
    uid: &str,
    status_only: bool,
    f: impl FnOnce(&Value) -> Option<Value>,
) -> bool {
    let mut st = c.state();
    let key = res.storage_key();
    let Some(old) = st.get(&key, ns, name).map(|o| o.value()) else {
        return false;
    };
    if s(&old, "/metadata/uid") != Some(uid) {
        return false;
    }
    let Some(mut new) = f(&old) else { return false };
    if new == old {
        return true;
    }
    let ctx = Ctx { builtin: res.builtin, scope: if status_only { Scope::StatusOnly } else { Scope::All } };
    fields::record_update(
        Some(&old),
        &mut new,
        MANAGER,
        &res.api_version(),
        ctx,
        status_only.then_some("status"),
        &now(),
    );
    let rv = st.next_rv();
    new["metadata"]["resourceVersion"] = json!(rv.to_string());
    let gone = kinds::is_gone(res, &new);
    if gone {
        st.remove(&key, ns, name, Stored::new(&new), rv);
        after_delete(c, &mut st, res, &new);
    } else {
        st.put(&key, ns, name, Stored::new(&new), rv);
    }
    true
}

fn set_status(old: &Value, status: Value) -> Value {
    let mut new = old.clone();
    new["status"] = status;
    new
}

fn condition(t: &str, status: bool, reason: &str, message: &str, prev: Option<&Value>) -> Value {
    let now = now();
    let st = if status { "True" } else { "False" };
    let same = prev
        .and_then(|conds| conds.as_array())
        .and_then(|cs| cs.iter().find(|c| c["type"] == t))
        .filter(|c| c["status"] == st);
    let transition = same.and_then(|c| c.get("lastTransitionTime").cloned()).unwrap_or_else(|| json!(now));
    json!({"type": t, "status": st, "lastUpdateTime": now, "lastTransitionTime": transition, "reason": reason, "message": message})
}

pub(crate) fn template_hash(obj: &Value) -> String {
    let t = obj.pointer("/spec/template").map(Value::to_string).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in t.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10).map(|k| alphabet[((h >> (k * 6)) % alphabet.len() as u64) as usize] as char).collect()
}

fn failing(c: &Cluster, obj: &Value) -> Option<String> {
    let settings = c.settings();
    kinds::images(obj).into_iter().find(|img| settings.image_fails(img))
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Progressing,
    Ready,
    Failed,
}

/// The status a workload controller reports. While a new pod template rolls out, the old pods keep serving
/// (ready and available) and one surge pod of the new template is not ready yet, as with the real
/// RollingUpdate strategy; a scale keeps the template and only waits for the added pods.
fn workload_status(kind: &str, obj: &Value, phase: Phase, nodes: i64) -> Value {
    let generation = i(obj, "/metadata/generation").unwrap_or(1);
    let name = s(obj, "/metadata/name").unwrap_or_default();
    let replicas = if kind == "DaemonSet" { nodes } else { i(obj, "/spec/replicas").unwrap_or(1) };
    let prev = obj.get("status");
    let prev_ready =
        prev.and_then(|p| p.get("readyReplicas").or_else(|| p.get("numberReady"))).and_then(Value::as_i64).unwrap_or(0);
    let hash = template_hash(obj);
    let rs = format!("{name}-{hash}");
    let template_changed = match kind {
        "Deployment" => prev
            .and_then(|p| p.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing"))
            .and_then(|c| c["message"].as_str())
            .is_some_and(|m| !m.contains(&format!("\"{rs}\""))),
        "StatefulSet" => prev.and_then(|p| p.get("updateRevision")).and_then(Value::as_str).is_some_and(|r| r != rs),
        _ => prev.and_then(|p| p.get("observedGeneration")).and_then(Value::as_i64).is_some_and(|g| g != generation),
    };
    let old_ready = prev_ready.min(replicas).max(0);
    // (ready, updated, total pods)
    let (ready, updated, total) = match phase {
        Phase::Ready => (replicas, replicas, replicas),
        _ if old_ready == 0 => (0, replicas, replicas),
        _ if template_changed => (old_ready, replicas.min(1), replicas + 1),
        _ => (old_ready, replicas, replicas),
    };
    match kind {
        "Deployment" => {
            let conds = prev.and_then(|p| p.get("conditions"));
            let available = ready >= replicas;
            let progressing = match phase {
                Phase::Ready => condition(
                    "Progressing",
                    true,
                    "NewReplicaSetAvailable",
                    &format!("ReplicaSet \"{rs}\" has successfully progressed."),
                    conds,
                ),
                Phase::Progressing => condition(
                    "Progressing",
                    true,
                    "ReplicaSetUpdated",
                    &format!("ReplicaSet \"{rs}\" is progressing."),
                    conds,
                ),
                Phase::Failed => condition(
                    "Progressing",
                    false,
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet \"{rs}\" has timed out progressing."),
                    conds,
                ),
            };
            let avail = if available {
                condition("Available", true, "MinimumReplicasAvailable", "Deployment has minimum availability.", conds)
            } else {
                condition(
                    "Available",
                    false,
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.",
                    conds,
                )
            };
            let mut st = json!({
                "observedGeneration": generation,
                "replicas": total,
                "updatedReplicas": updated,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "conditions": [avail, progressing],
            });
            if total > ready {
                st["unavailableReplicas"] = json!(total - ready);
            }
            st
        }
        "StatefulSet" => {
            let current = if phase == Phase::Ready || !template_changed {
                rs.clone()
            } else {
                prev.and_then(|p| p.get("currentRevision")).and_then(Value::as_str).unwrap_or(&rs).to_string()
            };
            let sts_updated = if template_changed && phase != Phase::Ready { 0 } else { updated };
            json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "readyReplicas": ready,
                "currentReplicas": if current == rs { replicas } else { replicas - sts_updated },
                "updatedReplicas": sts_updated,
                "availableReplicas": ready,
                "currentRevision": current,
                "updateRevision": rs,
                "collisionCount": 0,
            })
        }
        "DaemonSet" => {
            let ds_updated = if template_changed && phase != Phase::Ready { 0 } else { replicas };
            json!({
                "observedGeneration": generation,
                "desiredNumberScheduled": replicas,
                "currentNumberScheduled": replicas,
                "updatedNumberScheduled": ds_updated,
                "numberReady": ready,
                "numberAvailable": ready,
                "numberMisscheduled": 0,
            })
        }
        _ => json!({
            "observedGeneration": generation,
            "replicas": replicas,
            "fullyLabeledReplicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
        }),
    }
}

async fn workload(c: Arc<Cluster>, res: Arc<ResourceDef>, ns: String, name: String, uid: String, generation: i64) {
    let kind = res.kind.clone();
    let nodes = c.settings().behaviour.nodes as i64;
    let current_gen = |o: &Value| i(o, "/metadata/generation").unwrap_or(1) == generation;
    let write = |phase: Phase| {
        controller_write(&c, &res, &ns, &name, &uid, true, |o| {
            current_gen(o).then(|| set_status(o, workload_status(&kind, o, phase, nodes)))
        })
    };
    if !write(Phase::Progressing) {
        return;
    }
    let obj = { c.state().get(&res.storage_key(), &ns, &name).map(|o| o.value()) };
    let Some(obj) = obj else { return };
    if c.settings().behaviour.pods {
        crate::pods::sync(&c, &kind, &obj);
    }
    let settings = c.settings();
    match failing(&c, &obj) {
        None => {
            tokio::time::sleep(Duration::from_millis(settings.behaviour.ready_after_ms)).await;
            write(Phase::Ready);
        }
        Some(image) => {
            debug!(%image, "image matches the failure rule; pods never become ready");
            if kind != "Deployment" {
                return;
            }
            let mut deadline = i(&obj, "/spec/progressDeadlineSeconds").unwrap_or(600).max(0) as u64;
            if let Some(cap) = settings.behaviour.progress_deadline_cap_s {
                deadline = deadline.min(cap);
            }
            tokio::time::sleep(Duration::from_secs(deadline)).await;
            write(Phase::Failed);
        }
    }
}

async fn job(c: Arc<Cluster>, res: Arc<ResourceDef>, ns: String, name: String, uid: String) {
    let started = now();
    let ok = controller_write(&c, &res, &ns, &name, &uid, true, |o| {
        let par = i(o, "/spec/parallelism").unwrap_or(1);
        Some(set_status(o, json!({"startTime": started, "active": par, "ready": 0, "terminating": 0})))
    });
    if !ok {
        return;
    }
    tokio::time::sleep(Duration::from_millis(c.settings().behaviour.job_after_ms)).await;
    let fail = c.state().get(&res.storage_key(), &ns, &name).map(|o| o.value()).and_then(|o| failing(&c, &o));
    controller_write(&c, &res, &ns, &name, &uid, true, |o| {
        let done = now();
        let status = match &fail {
            None => {
                let completions = i(o, "/spec/completions").unwrap_or(1);
                json!({"startTime": started, "completionTime": done, "succeeded": completions, "ready": 0, "terminating": 0,
                       "conditions": [condition("SuccessCriteriaMet", true, "CompletionsReached", "Reached expected number of succeeded pods", None),
                                      condition("Complete", true, "CompletionsReached", "Reached expected number of succeeded pods", None)]})
            }
            Some(_) => {
                let failed = i(o, "/spec/backoffLimit").unwrap_or(6) + 1;
                json!({"startTime": started, "failed": failed, "ready": 0, "terminating": 0,
                       "conditions": [condition("FailureTarget", true, "BackoffLimitExceeded", "Job has reached the specified backoff limit", None),
                                      condition("Failed", true, "BackoffLimitExceeded", "Job has reached the specified backoff limit", None)]})
            }
        };
        Some(set_status(o, status))
    });
}

async fn pod(c: Arc<Cluster>, res: Arc<ResourceDef>, ns: String, name: String, uid: String) {
    tokio::time::sleep(Duration::from_millis(c.settings().behaviour.ready_after_ms)).await;
    let fail = c.state().get(&res.storage_key(), &ns, &name).map(|o| o.value()).and_then(|o| failing(&c, &o));
    controller_write(&c, &res, &ns, &name, &uid, true, |o| {
        let containers = o.pointer("/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default();
        let ready = fail.is_none();
        let statuses: Vec<Value> = containers
            .iter()
            .map(|ct| {
                let state = if ready {
                    json!({"running": {"startedAt": now()}})
                } else {
                    json!({"waiting": {"reason": "ImagePullBackOff", "message": format!("Back-off pulling image {:?}", ct["image"])}})
                };
                json!({"name": ct["name"], "image": ct["image"], "ready": ready, "restartCount": 0, "started": ready, "state": state})
            })
            .collect();
        Some(set_status(
            o,
            json!({
                "phase": if ready { "Running" } else { "Pending" },
                "conditions": [condition("Ready", ready, if ready { "" } else { "ContainersNotReady" }, "", None)],
                "containerStatuses": statuses,
                "startTime": now(),
            }),
        ))
    });
}

async fn pvc(c: Arc<Cluster>, res: Arc<ResourceDef>, ns: String, name: String, uid: String) {
    tokio::time::sleep(Duration::from_millis(c.settings().behaviour.bind_after_ms)).await;
    controller_write(&c, &res, &ns, &name, &uid, true, |o| {
        let storage = o.pointer("/spec/resources/requests/storage").cloned().unwrap_or(json!("1Gi"));
        let modes = o.pointer("/spec/accessModes").cloned().unwrap_or(json!(["ReadWriteOnce"]));
        Some(set_status(o, json!({"phase": "Bound", "accessModes": modes, "capacity": {"storage": storage}})))
    });
}

async fn load_balancer(c: Arc<Cluster>, res: Arc<ResourceDef>, ns: String, name: String, uid: String) {
    tokio::time::sleep(Duration::from_millis(c.settings().behaviour.lb_after_ms)).await;
    controller_write(&c, &res, &ns, &name, &uid, true, |o| {
        if s(o, "/spec/type") != Some("LoadBalancer") {
            return None;
        }
        let ip = lb_address(s(o, "/metadata/uid").unwrap_or_default());
        Some(set_status(o, json!({"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}})))
    });
}

/// An ingress controller gives Ingresses (status.loadBalancer) and Gateways (status.addresses, Accepted
/// and Programmed) an address, when the cluster has one.
async fn ingress(c: Arc<Cluster>, res: Arc<ResourceDef>, ns: String, name: String, uid: String) {
    tokio::time::sleep(Duration::from_millis(c.settings().behaviour.lb_after_ms)).await;
    if !c.settings().behaviour.ingress_controller {
        return;
    }
    controller_write(&c, &res, &ns, &name, &uid, res.status, |o| {
        let ip = lb_address(s(o, "/metadata/uid").unwrap_or_default());
        if res.kind == "Ingress" {
            return Some(set_status(o, json!({"loadBalancer": {"ingress": [{"ip": ip}]}})));
        }
        let generation = i(o, "/metadata/generation").unwrap_or(1);
        let cond = |t: &str| {
            json!({"type": t, "status": "True", "reason": t, "message": format!("simulated gateway {t}"),
                   "observedGeneration": generation, "lastTransitionTime": now()})
        };
        Some(set_status(
            o,
            json!({"addresses": [{"type": "IPAddress", "value": ip}], "conditions": [cond("Accepted"), cond("Programmed")]}),
        ))
    });
}

/// An APIService is Available when it is local or its Service exists.
async fn api_service(c: Arc<Cluster>, res: Arc<ResourceDef>, name: String, uid: String) {
    tokio::time::sleep(Duration::from_millis(c.settings().behaviour.crd_after_ms)).await;
    let services = crate::resources::catalogue().iter().find(|d| d.kind == "Service").map(|d| d.storage_key());
    let exists = |ns: &str, n: &str| services.as_ref().is_some_and(|k| c.state().get(k, ns, n).is_some());
    let target = {
        let st = c.state();
        st.get(&res.storage_key(), "", &name).map(|o| o.value())
    };
    let Some(target) = target else { return };
    let svc = (
        s(&target, "/spec/service/namespace").map(str::to_string),
        s(&target, "/spec/service/name").map(str::to_string),
    );
    let (ok, reason, message) = match &svc {
        (Some(ns), Some(n)) if exists(ns, n) => (true, "Passed", "all checks passed".to_string()),
        (Some(ns), Some(n)) => (false, "ServiceNotFound", format!("service/{n} in \"{ns}\" is not present")),
        _ => (true, "Local", "Local APIServices are always available".to_string()),
    };
    controller_write(&c, &res, "", &name, &uid, true, |o| {
        let prev = o.pointer("/status/conditions");
        let mut cond = condition("Available", ok, reason, &message, prev);
        if let Some(m) = cond.as_object_mut() {
            m.shift_remove("lastUpdateTime");
        }
        Some(set_status(o, json!({"conditions": [cond]})))
    });
}

/// A stable external address per Service, in the benchmarking range 198.18.0.0/15 (never routed).
fn lb_address(uid: &str) -> String {
    let mut h: u32 = 2166136261;
    for b in uid.bytes() {
        h = (h ^ b as u32).wrapping_mul(16777619);
    }
    format!("198.19.{}.{}", (h >> 8) & 0xff, (h & 0xff).max(1))
}

async fn establish(c: Arc<Cluster>, res: Arc<ResourceDef>, name: String, uid: String, generation: i64) {
    tokio::time::sleep(Duration::from_millis(c.settings().behaviour.crd_after_ms)).await;
    let obj = c.state().get(&res.storage_key(), "", &name).map(|o| o.value());
    let Some(obj) = obj else { return };
    let Ok(defs) = resources::from_crd(&obj) else {
        return;
    };
    {
        let mut st = c.state();
        if st.get(&res.storage_key(), "", &name).and_then(|o| i(&o.value(), "/metadata/generation")) != Some(generation)
        {
            return;
        }
        st.crds.insert(name.clone(), defs.into_iter().map(Arc::new).collect());
    }
    controller_write(&c, &res, "", &name, &uid, true, |o| {
        let conds = o.pointer("/status/conditions");
        let names = o.pointer("/spec/names").cloned().unwrap_or(json!({}));
        let stored: Vec<Value> = o
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| v["storage"] == json!(true))
            .map(|v| v["name"].clone())
            .collect();
        let mut nc = condition("NamesAccepted", true, "NoConflicts", "no conflicts found", conds);
        let mut ec =
            condition("Established", true, "InitialNamesAccepted", "the initial names have been accepted", conds);
        for cnd in [&mut nc, &mut ec] {
            if let Some(m) = cnd.as_object_mut() {
                m.shift_remove("lastUpdateTime");
            }
        }
        Some(set_status(o, json!({"conditions": [nc, ec], "acceptedNames": names, "storedVersions": stored})))
    });
}

/// Bookkeeping when an object has left the store (called with the state lock held).
pub fn after_delete(c: &Arc<Cluster>, st: &mut ClusterState, res: &ResourceDef, obj: &Value) {
    let uid = s(obj, "/metadata/uid").unwrap_or_default().to_string();
    if res.builtin && res.kind == "CustomResourceDefinition" {
        let name = s(obj, "/metadata/name").unwrap_or_default();
        if let Some(defs) = st.crds.remove(name) {
            if let Some(d) = defs.first() {
                let key = d.storage_key();
                let items: Vec<_> =
                    st.objects.get(&key).into_iter().flatten().map(|(k, o)| (k.clone(), o.clone())).collect();
                for ((ns, n), o) in items {
                    let rv = st.next_rv();
                    let mut last = o.value();
                    last["metadata"]["resourceVersion"] = json!(rv.to_string());
                    st.remove(&key, &ns, &n, Stored::new(&last), rv);
                }
            }
        }
    }
    if st.has_dependents(&uid) {
        let c2 = c.clone();
        spawn("gc", c, &uid.clone(), async move { collect_dependents(c2, uid).await });
    }
}

/// Removes the owner reference `uid` from every dependent (delete with propagationPolicy=Orphan).
pub fn orphan_dependents(st: &mut ClusterState, uid: &str) {
    if !st.has_dependents(uid) {
        return;
    }
    let found: Vec<(String, String, String, Value)> = st
        .objects
        .iter()
        .flat_map(|(key, m)| m.iter().map(move |((ns, n), o)| (key, ns, n, o)))
        .filter(|(_, _, _, o)| o.owner_uids().iter().any(|u| u == uid))
        .map(|(k, ns, n, o)| (k.clone(), ns.clone(), n.clone(), o.value()))
        .collect();
    for (key, ns, n, mut o) in found {
        if let Some(refs) = o.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut) {
            refs.retain(|r| s(r, "/uid") != Some(uid));
        }
        let rv = st.next_rv();
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.put(&key, &ns, &n, Stored::new(&o), rv);
    }
}

fn def_for_key(st: &ClusterState, key: &str) -> Option<Arc<ResourceDef>> {
    if let Some(d) = resources::catalogue().iter().find(|d| d.storage_key() == key) {
        return Some(d.clone());
    }
    st.crds.values().flatten().find(|d| d.storage_key() == key).cloned()
}

/// Deletes (or marks, when they carry finalizers) every object owned by `uid`; returns how many remain.
fn delete_matching(c: &Arc<Cluster>, pred: impl Fn(&str, &str, &Stored) -> bool) -> usize {
    let mut st = c.state();
    let found: Vec<(String, String, String, Value)> = st
        .objects
        .iter()
        .flat_map(|(key, m)| m.iter().map(move |((ns, n), o)| (key, ns, n, o)))
        .filter(|(key, ns, _, o)| pred(key, ns, o))
        .map(|(k, ns, n, o)| (k.clone(), ns.clone(), n.clone(), o.value()))
        .collect();
    let mut remaining = 0;
    for (key, ns, n, mut o) in found {
        let has_finalizers = o.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if has_finalizers {
            remaining += 1;
            if o.pointer("/metadata/deletionTimestamp").is_none() {
                o["metadata"]["deletionTimestamp"] = json!(now());
                let rv = st.next_rv();
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                st.put(&key, &ns, &n, Stored::new(&o), rv);
            }
            continue;
        }
        let rv = st.next_rv();
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.remove(&key, &ns, &n, Stored::new(&o), rv);
        if let Some(d) = def_for_key(&st, &key) {
            after_delete(c, &mut st, &d, &o);
        }
    }
    remaining
}

async fn collect_dependents(c: Arc<Cluster>, uid: String) {
    for attempt in 0..600u32 {
        if !c.state().has_dependents(&uid) || delete_matching(&c, |_, _, o| o.owner_uids().contains(&uid)) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10) + 1))).await;
    }
}

/// Foreground deletion: dependents first, then the owner.
pub fn foreground_delete(c: &Arc<Cluster>, res: Arc<ResourceDef>, ns: String, name: String) {
    let c2 = c.clone();
    spawn("foreground", c, &name.clone(), async move {
        let uid = c2
            .state()
            .get(&res.storage_key(), &ns, &name)
            .and_then(|o| s(&o.value(), "/metadata/uid").map(str::to_string));
        let Some(uid) = uid else { return };
        collect_dependents(c2.clone(), uid.clone()).await;
        controller_write(&c2, &res, &ns, &name, &uid, false, |o| {
            let mut n = o.clone();
            if let Some(f) = n.pointer_mut("/metadata/finalizers").and_then(Value::as_array_mut) {
                f.retain(|x| x != "foregroundDeletion");
            }
            Some(n)
        });
    });
}

/// Namespace deletion: remove everything in it, wait for finalizers, then remove the namespace.
pub fn finalize_namespace(c: &Arc<Cluster>, ns: String) {
    let c2 = c.clone();
    spawn("namespace", c, &ns.clone(), async move {
        let nsdef = resources::catalogue().iter().find(|d| d.kind == "Namespace").cloned().expect("built-in kind");
        for attempt in 0..3600u32 {
            let remaining = delete_matching(&c2, |key, ons, _| key != "/namespaces" && ons == ns);
            if remaining == 0 {
                let uid = c2
                    .state()
                    .get("/namespaces", "", &ns)
                    .and_then(|o| s(&o.value(), "/metadata/uid").map(str::to_string));
                if let Some(uid) = uid {
                    controller_write(&c2, &nsdef, "", &ns, &uid, false, |o| {
                        let mut n = o.clone();
                        n["spec"]["finalizers"] = json!([]);
                        if let Some(m) = n.pointer_mut("/metadata").and_then(Value::as_object_mut) {
                            m.shift_remove("finalizers");
                        }
                        Some(n)
                    });
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10) + 1))).await;
        }
    });
}
