//! kube-rs against the simulator: typed and dynamic `Api`, `Discovery`, server-side apply with conflicts,
//! kube-runtime's `watcher` across a restarted watch, pagination, subresources, and bad input.

use flotilla_e2e::eventually;
use flotilla_sim::{Behaviour, Faults, SimConfig, Simulator};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::Discovery;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use serde_json::json;
use std::time::Duration;

async fn sim(clusters: &[&str]) -> Simulator {
    let cfg = SimConfig {
        behaviour: Behaviour { ready_after_ms: 100, crd_after_ms: 10, ..Behaviour::default() },
        bookmark_interval: Duration::from_millis(200),
        ..SimConfig::with_clusters(clusters.iter().copied())
    };
    Simulator::start(cfg).await.expect("start simulator")
}

async fn client(sim: &Simulator, cluster: &str) -> Client {
    client_with(sim, cluster, true).await
}

/// `retry`: kube's default retry of 503s (with backoff up to minutes); off where a test wants to see them.
async fn client_with(sim: &Simulator, cluster: &str, retry: bool) -> Client {
    let kc = Kubeconfig::from_yaml(&sim.kubeconfig(cluster)).expect("kubeconfig parses");
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("config");
    cfg.default_retry = retry;
    Client::try_from(cfg).expect("client")
}

fn api_err(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})).unwrap()
}

#[tokio::test]
async fn typed_api_crud_with_optimistic_concurrency_and_pagination() {
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    for i in 0..5 {
        let labels = if i % 2 == 0 { json!({"parity": "even"}) } else { json!({"parity": "odd"}) };
        cms.create(&PostParams::default(), &cm(&format!("cm-{i}"), labels)).await.unwrap();
    }
    let dup = api_err(cms.create(&PostParams::default(), &cm("cm-0", json!({}))).await.unwrap_err());
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(dup.message, "configmaps \"cm-0\" already exists");

    let even = cms.list(&ListParams::default().labels("parity=even")).await.unwrap();
    assert_eq!(even.items.len(), 3);
    let by_name = cms.list(&ListParams::default().fields("metadata.name=cm-3")).await.unwrap();
    assert_eq!(by_name.items.len(), 1);

    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    loop {
        let page = cms.list(&lp).await.unwrap();
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(|i| i.metadata.name.clone().unwrap()));
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => lp = lp.continue_token(&t),
            _ => break,
        }
    }
    assert_eq!(names, vec!["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);

    let mut first = cms.get("cm-1").await.unwrap();
    let stale = first.clone();
    first.data = Some([("k".to_string(), "v2".to_string())].into());
    let updated = cms.replace("cm-1", &PostParams::default(), &first).await.unwrap();
    assert_ne!(updated.metadata.resource_version, stale.metadata.resource_version);
    let conflict = api_err(cms.replace("cm-1", &PostParams::default(), &stale).await.unwrap_err());
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));

    cms.delete("cm-1", &DeleteParams::default()).await.unwrap();
    let gone = api_err(cms.get("cm-1").await.unwrap_err());
    assert_eq!((gone.code, gone.reason.as_str()), (404, "NotFound"));
    sim.shutdown().await;
}

#[tokio::test]
async fn resource_versions_increase_across_kinds_and_generation_tracks_spec() {
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let deps: Api<Deployment> = Api::namespaced(c.clone(), "default");
    let a = cms.create(&PostParams::default(), &cm("x", json!({}))).await.unwrap();
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}},
                 "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
    }))
    .unwrap();
    let d = deps.create(&PostParams::default(), &d).await.unwrap();
    let rv = |s: &Option<String>| s.as_deref().unwrap().parse::<u64>().unwrap();
    assert!(rv(&d.metadata.resource_version) > rv(&a.metadata.resource_version));
    assert_eq!(d.metadata.generation, Some(1));
    assert!(d.metadata.uid.is_some() && d.metadata.creation_timestamp.is_some());
    let pp = PatchParams::default();
    let labelled = deps.patch("web", &pp, &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}))).await.unwrap();
    assert_eq!(labelled.metadata.generation, Some(1), "metadata changes leave generation alone");
    let scaled = deps.patch("web", &pp, &Patch::Merge(json!({"spec": {"replicas": 4}}))).await.unwrap();
    assert_eq!(scaled.metadata.generation, Some(2));
    let ready = eventually(10, "deployment ready", || {
        let deps = deps.clone();
        async move {
            let d = deps.get("web").await.ok()?;
            let s = d.status?;
            (s.ready_replicas == Some(4) && s.observed_generation == Some(2)).then_some(s)
        }
    })
    .await;
    let conds = ready.conditions.unwrap();
    assert!(conds.iter().any(|c| c.type_ == "Available" && c.status == "True"));
    let scale = deps.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(4));
    deps.patch_scale("web", &pp, &Patch::Merge(json!({"spec": {"replicas": 1}}))).await.unwrap();
    assert_eq!(deps.get("web").await.unwrap().spec.unwrap().replicas, Some(1));
    sim.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_conflicts_and_force() {
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let cms: Api<ConfigMap> = Api::namespaced(c, "default");
    let cfg = |v: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"owner": v, "extra": "1"}});
    cms.patch("shared", &PatchParams::apply("team-a"), &Patch::Apply(cfg("a"))).await.unwrap();
    let err = api_err(cms.patch("shared", &PatchParams::apply("team-b"), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"owner": "b"}}))).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(err.message.contains("conflict with \"team-a\""), "{}", err.message);
    assert!(err.message.contains(".data.owner"), "{}", err.message);
    let forced = cms
        .patch("shared", &PatchParams::apply("team-b").force(), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"owner": "b"}})))
        .await
        .unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["owner"], "b");
    let managers: Vec<String> =
        forced.metadata.managed_fields.unwrap().iter().map(|m| m.manager.clone().unwrap()).collect();
    assert_eq!(managers, vec!["team-a", "team-b"]);
    // team-a drops "extra" from its config: the field goes, since nobody else owns it.
    let after = cms
        .patch(
            "shared",
            &PatchParams::apply("team-a"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {}})),
        )
        .await
        .unwrap();
    assert_eq!(after.data.unwrap().into_iter().collect::<Vec<_>>(), vec![("owner".to_string(), "b".to_string())]);
    // dryRun=All changes nothing.
    let before = cms.get("shared").await.unwrap();
    let dry = cms
        .patch("shared", &PatchParams::apply("team-b").dry_run(), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"owner": "dry"}})))
        .await
        .unwrap();
    assert_eq!(dry.data.unwrap()["owner"], "dry");
    assert_eq!(cms.get("shared").await.unwrap(), before);
    sim.shutdown().await;
}

#[tokio::test]
async fn discovery_and_dynamic_api_follow_crds() {
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let d = Discovery::new(c.clone()).run().await.unwrap();
    let (ar, caps) = d.resolve_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment")).expect("deployments discovered");
    assert_eq!(ar.plural, "deployments");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let (_, ns_caps) = d.resolve_gvk(&GroupVersionKind::gvk("", "v1", "Namespace")).unwrap();
    assert_eq!(ns_caps.scope, kube::discovery::Scope::Cluster);
    assert!(d.resolve_gvk(&GroupVersionKind::gvk("example.com", "v1", "Widget")).is_none());

    let crd_ar =
        d.resolve_gvk(&GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition")).unwrap().0;
    let crds: Api<DynamicObject> = Api::all_with(c.clone(), &crd_ar);
    let crd: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "widgets", "kind": "Widget", "singular": "widget"},
                 "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {"type": "object"}}}]}
    }))
    .unwrap();
    crds.patch("widgets.example.com", &PatchParams::apply("test"), &Patch::Apply(&crd)).await.unwrap();
    let widget_ar = eventually(10, "Widget discovered", || {
        let c = c.clone();
        async move {
            let d = Discovery::new(c).run().await.ok()?;
            d.resolve_gvk(&GroupVersionKind::gvk("example.com", "v1", "Widget")).map(|(ar, _)| ar)
        }
    })
    .await;
    let widgets: Api<DynamicObject> = Api::namespaced_with(c.clone(), "default", &widget_ar);
    let w: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}),
    )
    .unwrap();
    widgets.create(&PostParams::default(), &w).await.unwrap();
    let listed = widgets.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].data["spec"]["size"], 3);
    // Deleting the CRD removes its objects and stops serving the kind.
    crds.delete("widgets.example.com", &DeleteParams::default()).await.unwrap();
    let err = api_err(widgets.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(err.code, 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn watcher_survives_a_restarted_watch_and_expired_history() {
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    cms.create(&PostParams::default(), &cm("before", json!({}))).await.unwrap();
    let mut stream = watcher(cms.clone(), watcher::Config::default()).default_backoff().applied_objects().boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("before"));

    // Cut every open watch and forget the history: the watcher must resume, get 410 Gone, relist.
    let cluster = sim.cluster("a").unwrap();
    cluster.set_faults(Faults { offline: true, ..Faults::default() });
    cluster.state().compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.set_faults(Faults::default());
    cms.create(&PostParams::default(), &cm("after", json!({}))).await.unwrap();

    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let obj = stream.try_next().await.unwrap().unwrap();
            if obj.metadata.name.as_deref() == Some("after") {
                return obj;
            }
        }
    })
    .await
    .expect("the watcher saw the object created after the restart");
    assert_eq!(seen.data.unwrap()["k"], "v");
    sim.shutdown().await;
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_410_gone() {
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let created = cms.create(&PostParams::default(), &cm("x", json!({}))).await.unwrap();
    sim.cluster("a").unwrap().state().compact();
    let old_rv = created.metadata.resource_version.unwrap().parse::<u64>().unwrap() - 1;
    let mut events = cms.watch(&kube::api::WatchParams::default(), &old_rv.to_string()).await.unwrap().boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
    match ev {
        kube::api::WatchEvent::Error(e) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410 Gone, got {other:?}"),
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn namespace_deletion_and_finalizers() {
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let nss: Api<Namespace> = Api::all(c.clone());
    nss.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap())
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "shop");
    cms.create(&PostParams::default(), &cm("plain", json!({}))).await.unwrap();
    let mut held = cm("held", json!({}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &held).await.unwrap();

    nss.delete("shop", &DeleteParams::default()).await.unwrap();
    let ns = nss.get("shop").await.unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    let err = api_err(cms.create(&PostParams::default(), &cm("late", json!({}))).await.unwrap_err());
    assert_eq!(err.code, 403, "{}", err.message);
    // The finalizer keeps "held" (marked for deletion) and the namespace alive.
    let marked = eventually(10, "held marked for deletion", || {
        let cms = cms.clone();
        async move {
            let list = cms.list(&ListParams::default()).await.ok()?;
            (list.items.len() == 1).then(|| list.items[0].clone())
        }
    })
    .await;
    assert!(marked.metadata.deletion_timestamp.is_some());
    cms.patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    eventually(15, "namespace gone", || {
        let nss = nss.clone();
        async move { matches!(nss.get("shop").await, Err(kube::Error::Api(s)) if s.code == 404).then_some(()) }
    })
    .await;
    sim.shutdown().await;
}

/// Sends a raw request and returns (status code, reason, message).
async fn raw(c: &Client, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(body.to_vec())
        .unwrap();
    match c.request_text(req).await {
        Ok(text) => (200, String::new(), text),
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone(), s.message.clone()),
        Err(e) => panic!("transport error: {e:?}"),
    }
}

#[tokio::test]
async fn bad_input_gets_the_api_servers_answers_and_leaves_the_store_intact() {
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let cms = "/api/v1/namespaces/default/configmaps";
    let count_before = sim.cluster("a").unwrap().state().object_count();

    let (code, reason, msg) = raw(&c, "POST", cms, "application/json", b"{\"metadata\": {\"name\": ").await;
    assert_eq!((code, reason.as_str()), (400, "BadRequest"), "{msg}");
    assert!(msg.contains("json parse error"), "{msg}");

    let (code, reason, _) =
        raw(&c, "PATCH", &format!("{cms}/x?fieldManager=t"), "application/apply-patch+yaml", b"kind: [unclosed").await;
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));

    // Protobuf bodies: no envelope, a truncated envelope, an object of another kind, no object inside.
    for body in [
        &b"\x0a\x02hi"[..],
        b"k8s\0\x0a\x05",
        b"k8s\0\x0a\x0c\x0a\x02v1\x12\x06Secret\x12\x00",
        b"k8s\0\x12\x03\xff\xff\xff",
    ] {
        let (code, reason, msg) = raw(&c, "POST", cms, "application/vnd.kubernetes.protobuf", body).await;
        assert_eq!((code, reason.as_str()), (400, "BadRequest"), "{body:?}: {msg}");
    }

    let (code, reason, msg) =
        raw(&c, "POST", cms, "application/json", br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{}}"#).await;
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(msg, "ConfigMap \"\" is invalid: metadata.name: Required value: name or generateName is required");

    let (code, reason, msg) = raw(
        &c,
        "POST",
        cms,
        "application/json",
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"Bad_Name"}}"#,
    )
    .await;
    assert_eq!((code, reason.as_str()), (422, "Invalid"), "{msg}");
    assert!(msg.contains("RFC 1123 subdomain"), "{msg}");

    let (code, reason, msg) = raw(&c, "GET", "/apis/example.com/v1/gizmos", "application/json", b"").await;
    assert_eq!(
        (code, reason.as_str(), msg.as_str()),
        (404, "NotFound", "the server could not find the requested resource")
    );

    let (code, _, _) = raw(
        &c,
        "POST",
        "/api/v1/namespaces/default/namespaces",
        "application/json",
        br#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"x"}}"#,
    )
    .await;
    assert_eq!(code, 404, "cluster-scoped kinds have no namespaced path");

    let (code, reason, msg) = raw(
        &c,
        "POST",
        cms,
        "application/json",
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x","namespace":"other"}}"#,
    )
    .await;
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));
    assert_eq!(msg, "the namespace of the provided object does not match the namespace sent on the request");

    let (code, reason, msg) = raw(
        &c,
        "POST",
        "/api/v1/namespaces/nowhere/configmaps",
        "application/json",
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}"#,
    )
    .await;
    assert_eq!((code, reason.as_str(), msg.as_str()), (404, "NotFound", "namespaces \"nowhere\" not found"));

    let (code, reason, _) = raw(
        &c,
        "POST",
        cms,
        "application/json",
        br#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"x"}}"#,
    )
    .await;
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));

    let (code, reason, _) = raw(&c, "PUT", cms, "application/json", b"{}").await;
    assert_eq!((code, reason.as_str()), (405, "MethodNotAllowed"));

    let (code, reason, _) = raw(&c, "PATCH", &format!("{cms}/missing"), "application/merge-patch+json", b"{}").await;
    assert_eq!((code, reason.as_str()), (404, "NotFound"));

    let (code, reason, _) = raw(&c, "GET", &format!("{cms}?labelSelector=a%20in%20b"), "application/json", b"").await;
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));

    let deploy = br#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web"},"spec":{"selector":{"matchLabels":{"app":"web"}},"template":{"metadata":{"labels":{"app":"other"}},"spec":{"containers":[{"name":"c","image":"i"}]}}}}"#;
    let (code, reason, msg) =
        raw(&c, "POST", "/apis/apps/v1/namespaces/default/deployments", "application/json", deploy).await;
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(msg.starts_with("Deployment.apps \"web\" is invalid: spec.template.metadata.labels"), "{msg}");

    assert_eq!(sim.cluster("a").unwrap().state().object_count(), count_before, "no bad request changed the store");
    // And the server still answers.
    let (code, _, _) = raw(&c, "GET", "/version", "application/json", b"").await;
    assert_eq!(code, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn clusters_are_isolated_and_faults_are_per_cluster() {
    let sim = sim(&["a", "b"]).await;
    let (ca, cb) = (client(&sim, "a").await, client_with(&sim, "b", false).await);
    let a: Api<ConfigMap> = Api::namespaced(ca, "default");
    let b: Api<ConfigMap> = Api::namespaced(cb, "default");
    a.create(&PostParams::default(), &cm("only-in-a", json!({}))).await.unwrap();
    assert!(b.get_opt("only-in-a").await.unwrap().is_none());

    sim.cluster("b").unwrap().set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let err = api_err(b.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(err.code, 503);
    assert!(a.list(&ListParams::default()).await.is_ok(), "a fault in b leaves a alone");
    sim.cluster("b").unwrap().set_faults(Faults { offline: true, ..Faults::default() });
    assert!(
        matches!(b.list(&ListParams::default()).await, Err(e) if !matches!(e, kube::Error::Api(_))),
        "offline drops the connection"
    );
    sim.cluster("b").unwrap().set_faults(Faults::default());
    assert!(b.list(&ListParams::default()).await.is_ok());
    sim.shutdown().await;
}

/// The answers the simulator gives to a fixed sequence of requests, for comparison with a real API server.
async fn answers(c: Client, name: &str) -> Vec<(u16, String, String)> {
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let mut out = Vec::new();
    let mut record = |r: Result<ConfigMap, kube::Error>| match r {
        Ok(_) => out.push((200, String::new(), String::new())),
        Err(e) => {
            let s = api_err(e);
            out.push((s.code, s.reason.clone(), s.message.clone()));
        }
    };
    let cfg = |owner: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"owner": owner}});
    record(cms.get(name).await);
    record(cms.patch(name, &PatchParams::apply("team-a"), &Patch::Apply(cfg("a"))).await);
    record(cms.patch(name, &PatchParams::apply("team-b"), &Patch::Apply(cfg("b"))).await);
    record(cms.create(&PostParams::default(), &cm(name, json!({}))).await);
    record(cms.create(&PostParams::default(), &cm("Not_Valid", json!({}))).await);
    let _ = cms.delete(name, &DeleteParams::default()).await;
    out
}

/// Keeps the simulator honest: the same requests against a real cluster must get the same answers.
#[tokio::test]
#[ignore = "needs cluster: set KUBECONFIG"]
async fn a_real_cluster_answers_like_the_simulator() {
    let real = Client::try_default().await.expect("KUBECONFIG must point at a reachable cluster");
    let sim = sim(&["a"]).await;
    let name = format!("flotilla-sim-parity-{}", std::process::id());
    let from_real = answers(real, &name).await;
    let from_sim = answers(client(&sim, "a").await, &name).await;
    assert_eq!(from_sim, from_real);
    sim.shutdown().await;
}

/// A protobuf body as client-go's typed clients send it (the `k8s\0` envelope around `runtime.Unknown`),
/// from a kube client over HTTPS: stored as the same object in JSON would be.
#[tokio::test]
async fn protobuf_bodies_are_stored_as_their_json_form() {
    use k8s_pb::api::core::v1 as pb;
    use prost::Message;
    let sim = sim(&["a"]).await;
    let c = client(&sim, "a").await;
    let cm = pb::ConfigMap {
        metadata: Some(k8s_pb::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("from-protobuf".into()),
            labels: [("team".to_string(), "a".to_string())].into(),
            ..Default::default()
        }),
        data: [("k".to_string(), "v".to_string())].into(),
        ..Default::default()
    };
    let envelope = k8s_pb::apimachinery::pkg::runtime::Unknown {
        type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
        }),
        raw: Some(cm.encode_to_vec()),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut body = b"k8s\0".to_vec();
    body.extend(envelope.encode_to_vec());
    let (code, _, text) =
        raw(&c, "POST", "/api/v1/namespaces/default/configmaps", "application/vnd.kubernetes.protobuf", &body).await;
    assert_eq!(code, 200, "{text}");
    let got = Api::<ConfigMap>::namespaced(c.clone(), "default").get("from-protobuf").await.unwrap();
    assert_eq!(got.data.unwrap().get("k").map(String::as_str), Some("v"));
    assert_eq!(got.metadata.labels.unwrap().get("team").map(String::as_str), Some("a"));
    sim.shutdown().await;
}

/// Admission rules from the admin API: a denial is a 403 with its reason, a webhook timeout a 500 after its
/// delay; neither stores anything, and other objects pass.
#[tokio::test]
async fn admission_rules_deny_or_time_out_writes() {
    let sim = sim(&["a"]).await;
    let c = client_with(&sim, "a", false).await;
    let cluster = sim.cluster("a").unwrap();
    let rules: flotilla_sim::admission::Admission = serde_json::from_value(json!({"rules": [
        {"kinds": ["ConfigMap"], "names": ["denied"], "deny": "not this one"},
        {"kinds": ["ConfigMap"], "names": ["slow"], "timeout_ms": 300}
    ]}))
    .unwrap();
    cluster.set_admission(rules);
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let cm = |n: &str| -> ConfigMap { serde_json::from_value(json!({"metadata": {"name": n}})).unwrap() };
    match cms.create(&PostParams::default(), &cm("denied")).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403);
            assert!(s.message.ends_with("denied the request: not this one"), "{}", s.message);
        }
        other => panic!("a denied write went through: {other:?}"),
    }
    let t = std::time::Instant::now();
    match cms.create(&PostParams::default(), &cm("slow")).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 500);
            assert!(s.message.contains("context deadline exceeded"), "{}", s.message);
        }
        other => panic!("a timed-out write went through: {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(300), "the timeout answers after its delay");
    assert!(cms.get_opt("denied").await.unwrap().is_none() && cms.get_opt("slow").await.unwrap().is_none());
    cms.create(&PostParams::default(), &cm("fine")).await.expect("other objects pass");
    sim.shutdown().await;
}
