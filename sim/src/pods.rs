//! Optional ReplicaSets and Pods for workloads (`Behaviour::pods`), so that a demo cluster explored with
//! kubectl looks real: a Deployment owns one ReplicaSet per template (`<name>-<hash>`, labelled
//! `pod-template-hash`, annotated with its revision; older ones scaled to zero and kept up to
//! `revisionHistoryLimit`); ReplicaSets, StatefulSets (`<name>-<ordinal>`) and DaemonSets (one per node) own
//! their Pods, which the pod controller makes Running. Everything is owned through `ownerReferences`, so
//! deleting a workload collects what it made.

use crate::ops::{self, DeleteOpts, ListOpts, WriteOpts};
use crate::resources::{catalogue, ResourceDef};
use crate::selector::LabelSelector;
use crate::store::Cluster;
use serde_json::{json, Value};
use std::sync::Arc;
use tracing::debug;

const REVISION: &str = "deployment.kubernetes.io/revision";

fn def(kind: &str) -> Option<Arc<ResourceDef>> {
    catalogue().iter().find(|d| d.kind == kind && d.builtin).cloned()
}

fn opts() -> WriteOpts {
    WriteOpts { field_manager: "kube-controller-manager".into(), ..Default::default() }
}

fn owner_ref(owner: &Value) -> Value {
    json!({
        "apiVersion": owner["apiVersion"], "kind": owner["kind"],
        "name": owner.pointer("/metadata/name"), "uid": owner.pointer("/metadata/uid"),
        "controller": true, "blockOwnerDeletion": true,
    })
}

fn uid(o: &Value) -> &str {
    o.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default()
}

fn name(o: &Value) -> &str {
    o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

/// Objects of `res` in `ns` whose controller is `owner`.
fn owned(c: &Cluster, res: &ResourceDef, ns: &str, owner: &Value) -> Vec<Value> {
    let Ok(l) = ops::list(c, res, Some(ns), &ListOpts { label: LabelSelector::default(), ..Default::default() }) else {
        return Vec::new();
    };
    l.items
        .into_iter()
        .filter(|o| {
            o.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid(owner) && r["controller"] == true))
        })
        .collect()
}

fn suffix() -> String {
    (0..5).map(|_| fastrand::choice(b"bcdfghjklmnpqrstvwxz2456789").map_or('x', |b| *b as char)).collect()
}

/// Makes the objects a workload owns match it.
pub fn sync(c: &Arc<Cluster>, kind: &str, obj: &Value) {
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_string();
    let result = match kind {
        "Deployment" => deployment(c, &ns, obj),
        "ReplicaSet" => {
            let n = obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
            pods(c, &ns, obj, n, |_| None)
        }
        "StatefulSet" => {
            let n = obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
            let base = name(obj).to_string();
            pods(c, &ns, obj, n, move |i| Some(format!("{base}-{i}")))
        }
        "DaemonSet" => pods(c, &ns, obj, i64::from(c.settings().behaviour.nodes), |_| None),
        _ => Ok(()),
    };
    if let Err(e) = result {
        debug!(error = %e, "syncing owned objects failed");
    }
}

fn deployment(c: &Arc<Cluster>, ns: &str, d: &Value) -> Result<(), crate::error::ApiError> {
    let (Some(rs_def), Some(pod_def)) = (def("ReplicaSet"), def("Pod")) else { return Ok(()) };
    let hash = crate::controllers::template_hash(d);
    let rs_name = format!("{}-{hash}", name(d));
    let mut sets = owned(c, &rs_def, ns, d);
    let revision_of = |o: &Value| -> i64 {
        o.pointer(&format!("/metadata/annotations/{}", REVISION.replace('/', "~1")))
            .and_then(Value::as_str)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0)
    };
    let newest = sets.iter().map(revision_of).max().unwrap_or(0);
    let replicas = d.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let current = sets.iter().find(|s| name(s) == rs_name).cloned();
    let revision = match &current {
        Some(s) if revision_of(s) == newest => newest,
        _ => newest + 1,
    };
    let mut template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
    template["metadata"]["labels"]["pod-template-hash"] = json!(hash);
    let mut selector = d.pointer("/spec/selector").cloned().unwrap_or(json!({}));
    selector["matchLabels"]["pod-template-hash"] = json!(hash);
    let labels = template["metadata"]["labels"].clone();
    let rs = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": rs_name, "namespace": ns, "labels": labels,
                     "annotations": {REVISION: revision.to_string()}, "ownerReferences": [owner_ref(d)]},
        "spec": {"replicas": replicas, "selector": selector, "template": template},
    });
    let body = serde_json::to_vec(&rs).unwrap_or_default();
    let mut apply = opts();
    apply.force = true;
    ops::patch(c, &rs_def, Some(ns), &rs_name, ops::PatchType::Apply, &body, ops::Sub::Main, &apply)?;
    // Older ReplicaSets: scaled to zero, their pods gone; kept for `rollout history` up to the limit.
    let limit = d.pointer("/spec/revisionHistoryLimit").and_then(Value::as_i64).unwrap_or(10).max(0) as usize;
    sets.retain(|s| name(s) != rs_name);
    sets.sort_by_key(|s| std::cmp::Reverse(revision_of(s)));
    for (i, old) in sets.iter().enumerate() {
        if i >= limit {
            ops::delete(c, &rs_def, Some(ns), name(old), &DeleteOpts::default())?;
            continue;
        }
        if old.pointer("/spec/replicas").and_then(Value::as_i64) != Some(0) {
            let zero = serde_json::to_vec(&json!({"spec": {"replicas": 0}})).unwrap_or_default();
            ops::patch(c, &rs_def, Some(ns), name(old), ops::PatchType::Merge, &zero, ops::Sub::Main, &opts())?;
            for p in owned(c, &pod_def, ns, old) {
                ops::delete(c, &pod_def, Some(ns), name(&p), &DeleteOpts::default())?;
            }
        }
    }
    Ok(())
}

/// `n` Pods from `owner`'s template; `named(i)` names the i-th (StatefulSets), otherwise a random suffix.
fn pods(
    c: &Arc<Cluster>,
    ns: &str,
    owner: &Value,
    n: i64,
    named: impl Fn(i64) -> Option<String>,
) -> Result<(), crate::error::ApiError> {
    let Some(pod_def) = def("Pod") else { return Ok(()) };
    let hash = crate::controllers::template_hash(owner);
    let mut have = owned(c, &pod_def, ns, owner);
    // Pods of an older template go (StatefulSets, DaemonSets: their template hash label).
    let stale: Vec<Value> = have
        .iter()
        .filter(|p| {
            p.pointer("/metadata/labels/controller-revision-hash").and_then(Value::as_str).is_some_and(|h| h != hash)
        })
        .cloned()
        .collect();
    for p in &stale {
        ops::delete(c, &pod_def, Some(ns), name(p), &DeleteOpts::default())?;
    }
    have.retain(|p| !stale.iter().any(|s| name(s) == name(p)));
    let n = n.max(0) as usize;
    for extra in have.iter().skip(n) {
        ops::delete(c, &pod_def, Some(ns), name(extra), &DeleteOpts::default())?;
    }
    let template = owner.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let kind = owner["kind"].as_str().unwrap_or_default();
    for i in have.len().min(n)..n {
        let pod_name = named(i as i64).unwrap_or_else(|| format!("{}-{}", name(owner), suffix()));
        let mut labels = template.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
        if kind != "ReplicaSet" {
            labels["controller-revision-hash"] = json!(hash);
        }
        let node = format!("sim-node-{}", i % c.settings().behaviour.nodes.max(1) as usize + 1);
        let mut spec = template.pointer("/spec").cloned().unwrap_or(json!({}));
        spec["nodeName"] = json!(node);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": ns, "labels": labels, "ownerReferences": [owner_ref(owner)]},
            "spec": spec,
        });
        match ops::create(c, &pod_def, Some(ns), pod, &opts()) {
            // Created objects are observed by their controllers as every write is.
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `GET pods/NAME/log`: what a container printed (a fixed line per container: the simulator runs nothing).
pub fn log(pod: &Value, container: Option<&str>) -> Result<String, crate::error::ApiError> {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default();
    let chosen = match container {
        Some(want) => containers.iter().find(|c| c["name"] == want).ok_or_else(|| {
            crate::error::ApiError::bad_request(format!("container {want} is not valid for pod {}", name(pod)))
        })?,
        None if containers.len() == 1 => &containers[0],
        None => {
            let names: Vec<&str> = containers.iter().filter_map(|c| c["name"].as_str()).collect();
            return Err(crate::error::ApiError::bad_request(format!(
                "a container name must be specified for pod {}, choose one of: [{}]",
                name(pod),
                names.join(" ")
            )));
        }
    };
    Ok(format!(
        "flotilla-sim: container {} (image {}) of pod {} is simulated; it prints nothing else\n",
        chosen["name"].as_str().unwrap_or_default(),
        chosen["image"].as_str().unwrap_or_default(),
        name(pod)
    ))
}
