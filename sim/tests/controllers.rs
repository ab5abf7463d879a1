//! The simulated controllers on paused tokio time: readiness delays, progress deadlines, the failure rule,
//! Jobs, CRDs, rolling updates, garbage collection and dry runs, driven through the verbs in-process.

use flotilla_sim::ops::{self, DeleteOpts, PatchType, Propagation, Sub, WriteOpts};
use flotilla_sim::resources::{builtins, ResourceDef};
use flotilla_sim::store::{Behaviour, Cluster, Settings};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

fn cluster(b: Behaviour) -> Arc<Cluster> {
    let c = Arc::new(Cluster::new("t".into(), Arc::new(Settings::new(b).unwrap()), 1024));
    let ns = def("Namespace");
    ops::create(
        &c,
        &ns,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        &opts(),
    )
    .unwrap();
    c
}

fn def(kind: &str) -> Arc<ResourceDef> {
    builtins().into_iter().find(|d| d.kind == kind).unwrap()
}

fn opts() -> WriteOpts {
    WriteOpts { dry_run: false, field_manager: "test".into(), ..Default::default() }
}

fn apply(c: &Arc<Cluster>, kind: &str, obj: Value) -> Value {
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    let body = serde_json::to_vec(&obj).unwrap();
    ops::patch(c, &def(kind), Some("default"), &name, PatchType::Apply, &body, Sub::Main, &opts()).unwrap().obj
}

fn get(c: &Arc<Cluster>, kind: &str, name: &str) -> Value {
    ops::get(c, &def(kind), Some("default"), name).unwrap()
}

fn deployment(image: &str, replicas: i64, deadline: i64) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"replicas": replicas, "progressDeadlineSeconds": deadline, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": image}]}}}})
}

fn condition<'a>(obj: &'a Value, t: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")?.as_array()?.iter().find(|c| c["type"] == t)
}

async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn deployment_becomes_ready_after_the_configured_delay() {
    let c = cluster(Behaviour { ready_after_ms: 2000, ..Behaviour::default() });
    apply(&c, "Deployment", deployment("nginx:1", 3, 600));
    settle(Duration::from_millis(10)).await;
    let d = get(&c, "Deployment", "web");
    assert_eq!(d["status"]["observedGeneration"], 1);
    assert_eq!(d["status"]["readyReplicas"], 0);
    assert_eq!(condition(&d, "Available").unwrap()["status"], "False");
    settle(Duration::from_millis(1900)).await;
    assert_eq!(get(&c, "Deployment", "web")["status"]["readyReplicas"], 0, "not before ready_after_ms");
    settle(Duration::from_millis(200)).await;
    let d = get(&c, "Deployment", "web");
    assert_eq!(d["status"]["readyReplicas"], 3);
    assert_eq!(d["status"]["updatedReplicas"], 3);
    assert_eq!(condition(&d, "Available").unwrap()["status"], "True");
    assert_eq!(condition(&d, "Progressing").unwrap()["reason"], "NewReplicaSetAvailable");
}

#[tokio::test(start_paused = true)]
async fn failing_image_exceeds_the_progress_deadline_exactly_then() {
    let c = cluster(Behaviour { ready_after_ms: 100, fail_images: Some(":broken$".into()), ..Behaviour::default() });
    apply(&c, "Deployment", deployment("app:broken", 2, 30));
    settle(Duration::from_secs(29)).await;
    let d = get(&c, "Deployment", "web");
    assert_eq!(condition(&d, "Progressing").unwrap()["status"], "True", "still within the deadline");
    assert_eq!(d["status"]["readyReplicas"], 0);
    settle(Duration::from_secs(2)).await;
    let d = get(&c, "Deployment", "web");
    let p = condition(&d, "Progressing").unwrap();
    assert_eq!((p["status"].as_str(), p["reason"].as_str()), (Some("False"), Some("ProgressDeadlineExceeded")));
    assert_eq!(condition(&d, "Available").unwrap()["status"], "False");
}

#[tokio::test(start_paused = true)]
async fn progress_deadline_cap_shortens_long_deadlines() {
    let b = Behaviour { fail_images: Some("broken".into()), progress_deadline_cap_s: Some(5), ..Behaviour::default() };
    let c = cluster(b);
    apply(&c, "Deployment", deployment("broken", 1, 600));
    settle(Duration::from_secs(6)).await;
    assert_eq!(condition(&get(&c, "Deployment", "web"), "Progressing").unwrap()["reason"], "ProgressDeadlineExceeded");
}

#[tokio::test(start_paused = true)]
async fn a_new_template_rolls_out_with_old_pods_serving() {
    let c = cluster(Behaviour { ready_after_ms: 1000, fail_images: Some(":2$".into()), ..Behaviour::default() });
    apply(&c, "Deployment", deployment("app:1", 3, 60));
    settle(Duration::from_secs(2)).await;
    assert_eq!(get(&c, "Deployment", "web")["status"]["readyReplicas"], 3);
    apply(&c, "Deployment", deployment("app:2", 3, 60));
    settle(Duration::from_secs(5)).await;
    let d = get(&c, "Deployment", "web");
    assert_eq!(d["metadata"]["generation"], 2);
    assert_eq!(d["status"]["observedGeneration"], 2);
    assert_eq!(d["status"]["readyReplicas"], 3, "old pods keep serving");
    assert_eq!(d["status"]["updatedReplicas"], 1, "one surge pod of the new template, never ready");
    assert_eq!(condition(&d, "Available").unwrap()["status"], "True");
    // A scale of the running template completes without a new rollout.
    apply(&c, "Deployment", deployment("app:1", 5, 60));
    settle(Duration::from_secs(2)).await;
    let d = get(&c, "Deployment", "web");
    assert_eq!((d["status"]["readyReplicas"].as_i64(), d["status"]["updatedReplicas"].as_i64()), (Some(5), Some(5)));
}

#[tokio::test(start_paused = true)]
async fn jobs_complete_or_fail_on_the_failure_rule() {
    let c = cluster(Behaviour { job_after_ms: 3000, fail_images: Some("bad".into()), ..Behaviour::default() });
    let job = |name: &str, image: &str| {
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "default"},
               "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "j", "image": image}]}}}})
    };
    apply(&c, "Job", job("good", "busybox"));
    apply(&c, "Job", job("worse", "bad-image"));
    settle(Duration::from_millis(10)).await;
    assert_eq!(get(&c, "Job", "good")["status"]["active"], 1);
    settle(Duration::from_secs(3)).await;
    let good = get(&c, "Job", "good");
    assert_eq!(condition(&good, "Complete").unwrap()["status"], "True");
    assert_eq!(good["status"]["succeeded"], 1);
    let bad = get(&c, "Job", "worse");
    assert_eq!(condition(&bad, "Failed").unwrap()["reason"], "BackoffLimitExceeded");
}

#[tokio::test(start_paused = true)]
async fn crd_is_established_then_served_and_its_deletion_removes_objects() {
    let c = cluster(Behaviour { crd_after_ms: 500, ..Behaviour::default() });
    let crd_def = def("CustomResourceDefinition");
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "gadgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced", "names": {"plural": "gadgets", "kind": "Gadget"},
                 "versions": [{"name": "v1", "served": true, "storage": true}]}});
    ops::patch(
        &c,
        &crd_def,
        None,
        "gadgets.example.com",
        PatchType::Apply,
        &serde_json::to_vec(&crd).unwrap(),
        Sub::Main,
        &opts(),
    )
    .unwrap();
    let served = |c: &Arc<Cluster>| ops::resolve(&builtins(), c, "example.com", "v1", "gadgets");
    assert!(served(&c).is_none(), "not before Established");
    settle(Duration::from_millis(600)).await;
    let g = served(&c).expect("served once Established");
    let got = ops::get(&c, &crd_def, None, "gadgets.example.com").unwrap();
    assert_eq!(condition(&got, "Established").unwrap()["status"], "True");
    let body =
        json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g1"}, "spec": {"x": [1, 2]}});
    ops::create(&c, &g, Some("default"), body, &opts()).unwrap();
    ops::delete(&c, &crd_def, None, "gadgets.example.com", &DeleteOpts::default()).unwrap();
    assert!(served(&c).is_none());
    assert_eq!(c.state().objects.get("example.com/gadgets").map_or(0, |m| m.len()), 0);
}

#[tokio::test(start_paused = true)]
async fn deletion_propagation_background_foreground_orphan() {
    let c = cluster(Behaviour::default());
    let cm = def("ConfigMap");
    let owner = ops::create(&c, &cm, Some("default"), json!({"metadata": {"name": "owner"}}), &opts()).unwrap().obj;
    let uid = owner["metadata"]["uid"].as_str().unwrap().to_string();
    let child = |name: &str| json!({"metadata": {"name": name, "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}});
    ops::create(&c, &cm, Some("default"), child("child"), &opts()).unwrap();
    ops::delete(&c, &cm, Some("default"), "owner", &DeleteOpts::default()).unwrap();
    settle(Duration::from_millis(300)).await;
    assert!(ops::get(&c, &cm, Some("default"), "child").is_err(), "background deletion collects dependents");

    let owner = ops::create(&c, &cm, Some("default"), json!({"metadata": {"name": "owner"}}), &opts()).unwrap().obj;
    let uid2 = owner["metadata"]["uid"].as_str().unwrap().to_string();
    let child2 = json!({"metadata": {"name": "kept", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid2}]}});
    ops::create(&c, &cm, Some("default"), child2, &opts()).unwrap();
    let d = DeleteOpts { propagation: Propagation::Orphan, ..DeleteOpts::default() };
    ops::delete(&c, &cm, Some("default"), "owner", &d).unwrap();
    settle(Duration::from_millis(300)).await;
    let kept = ops::get(&c, &cm, Some("default"), "kept").unwrap();
    assert!(kept["metadata"].get("ownerReferences").is_none_or(|r| r.as_array().unwrap().is_empty()));

    let owner = ops::create(&c, &cm, Some("default"), json!({"metadata": {"name": "fg"}}), &opts()).unwrap().obj;
    let uid3 = owner["metadata"]["uid"].as_str().unwrap().to_string();
    let child3 = json!({"metadata": {"name": "fg-child", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "fg", "uid": uid3}]}});
    ops::create(&c, &cm, Some("default"), child3, &opts()).unwrap();
    let d = DeleteOpts { propagation: Propagation::Foreground, ..DeleteOpts::default() };
    let marked = ops::delete(&c, &cm, Some("default"), "fg", &d).unwrap();
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(marked["metadata"]["finalizers"], json!(["foregroundDeletion"]));
    settle(Duration::from_millis(500)).await;
    assert!(ops::get(&c, &cm, Some("default"), "fg-child").is_err());
    assert!(ops::get(&c, &cm, Some("default"), "fg").is_err(), "the owner goes after its dependents");
}

#[tokio::test(start_paused = true)]
async fn dry_run_writes_change_nothing() {
    let c = cluster(Behaviour::default());
    let cm = def("ConfigMap");
    let dry = WriteOpts { dry_run: true, ..opts() };
    let rv_before = c.state().rv;
    let created =
        ops::create(&c, &cm, Some("default"), json!({"metadata": {"name": "x"}, "data": {"a": "1"}}), &dry).unwrap();
    assert_eq!(created.obj["data"]["a"], "1");
    assert!(ops::get(&c, &cm, Some("default"), "x").is_err());
    ops::create(&c, &cm, Some("default"), json!({"metadata": {"name": "x"}, "data": {"a": "1"}}), &opts()).unwrap();
    let rv = c.state().rv;
    ops::patch(&c, &cm, Some("default"), "x", PatchType::Merge, br#"{"data":{"a":"2"}}"#, Sub::Main, &dry).unwrap();
    ops::delete(&c, &cm, Some("default"), "x", &DeleteOpts { dry_run: true, ..DeleteOpts::default() }).unwrap();
    assert_eq!(ops::get(&c, &cm, Some("default"), "x").unwrap()["data"]["a"], "1");
    assert_eq!(c.state().rv, rv);
    assert!(rv > rv_before);
}

#[tokio::test(start_paused = true)]
async fn status_and_main_resource_writes_are_separate() {
    let c = cluster(Behaviour { ready_after_ms: 100, ..Behaviour::default() });
    apply(&c, "Deployment", deployment("nginx", 1, 600));
    settle(Duration::from_secs(1)).await;
    let dep = def("Deployment");
    let mut body = get(&c, "Deployment", "web");
    body["status"]["readyReplicas"] = json!(99);
    body["spec"]["replicas"] = json!(2);
    let after = ops::update(&c, &dep, Some("default"), "web", body.clone(), Sub::Main, &opts()).unwrap().obj;
    assert_eq!(after["spec"]["replicas"], 2);
    assert_ne!(after["status"]["readyReplicas"], 99, "a main-resource write ignores status");
    let mut body = after.clone();
    body["spec"]["replicas"] = json!(7);
    body["status"]["observedGeneration"] = json!(42);
    let st = ops::update(&c, &dep, Some("default"), "web", body, Sub::Status, &opts()).unwrap().obj;
    assert_eq!(st["status"]["observedGeneration"], 42);
    assert_eq!(st["spec"]["replicas"], 2, "a status write ignores spec");
    // Server defaults appear in the live object without being owned by the applier.
    let live = get(&c, "Deployment", "web");
    assert_eq!(live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"], "Always");
    assert_eq!(live["spec"]["template"]["spec"]["restartPolicy"], "Always");
}
