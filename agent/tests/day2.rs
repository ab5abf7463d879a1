//! Day-2 changes to a fleet repository, against a simulated cluster: the agent never deletes what the new
//! desired state still holds (renames, moves, version changes), prunes only after success, waits for kinds the
//! cluster does not serve while the rest applies, keeps other controllers' fields, says when the API server
//! does not answer, and survives a damaged state and a bundle from a newer hub.

mod support;

use flotilla_agent::apply::{Applier, Pruned};
use flotilla_agent::engine::DesiredApp;
use flotilla_agent::state::ObjectRef;
use flotilla_e2e::eventually;
use flotilla_proto::agent::v1 as pb;
use flotilla_sim::{Behaviour, Faults};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio_util::sync::CancellationToken;

fn uid(env: &Env, what: &str) -> String {
    env.get(what, "{.metadata.uid}").unwrap_or_else(|| panic!("{what} does not exist"))
}

fn applied(s: &pb::AppStatus) -> bool {
    s.phase == pb::Phase::Applied as i32
}

const NAMESPACE: &str = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renaming_an_app_directory_moves_its_objects_and_deletes_nothing() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let manifests = format!("{NAMESPACE}{}{}", cm("a", ""), cm("b", ""));
    h.set_desired(vec![bundle_of("shop", "", &manifests)]).await.unwrap();
    status_of(&h, "shop", "shop applied", 30, healthy).await;
    let (a, ns) = (uid(&env, "configmap/a"), env.get("namespace/shop", "{.metadata.uid}").unwrap());

    // apps/shop → apps/store, in one commit.
    h.set_desired(vec![bundle_of("store", "", &manifests)]).await.unwrap();
    status_of(&h, "store", "store applied", 30, healthy).await;
    // Long enough for the app that left to have done whatever it would do.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(uid(&env, "configmap/a"), a, "never deleted and re-created");
    assert_eq!(env.get("namespace/shop", "{.metadata.uid}").unwrap(), ns, "the Namespace was not deleted");
    assert_eq!(env.get("configmap/b", "{.metadata.labels.flotilla\\.dev/app}").as_deref(), Some("store"));
    assert!(h.statuses().borrow().get("shop").is_none(), "the old app is gone");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_that_moves_between_apps_keeps_its_identity() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let a1 = bundle_of("front", "", &format!("{}{}", cm("front", ""), cm("shared", "")));
    let b1 = bundle_of("back", "", &format!("{}{}", cm("back", ""), cm("back2", "")));
    h.set_desired(vec![a1, b1]).await.unwrap();
    status_of(&h, "front", "front applied", 30, healthy).await;
    status_of(&h, "back", "back applied", 30, healthy).await;
    let shared = uid(&env, "configmap/shared");
    let a2 = bundle_of("front", "", &cm("front", ""));
    let b2 = bundle_of("back", "", &format!("{}{}{}", cm("back", ""), cm("back2", ""), cm("shared", "")));
    h.set_desired(vec![a2.clone(), b2.clone()]).await.unwrap();
    status_of(&h, "front", "front v2", 30, |s| healthy(s) && s.digest == a2.digest).await;
    status_of(&h, "back", "back v2", 30, |s| healthy(s) && s.digest == b2.digest).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(uid(&env, "configmap/shared"), shared, "moved, not deleted and re-created");
    assert_eq!(env.get("configmap/shared", "{.metadata.labels.flotilla\\.dev/app}").as_deref(), Some("back"));
    shutdown.cancel();
}

const WIDGET_CRD: &str = "---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - {name: v1beta1, served: true, storage: false, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
  - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_custom_resource_moving_to_a_new_api_version_is_the_same_object() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let widget =
        |v: &str| format!("---\napiVersion: example.com/{v}\nkind: Widget\nmetadata: {{name: w}}\nspec: {{size: 1}}\n");
    h.set_desired(vec![bundle("", &format!("{WIDGET_CRD}{}", widget("v1beta1")))]).await.unwrap();
    status(&h, "v1beta1 applied", 30, applied).await;
    let before = uid(&env, "widgets.example.com/w");
    let v2 = bundle("", &format!("{WIDGET_CRD}{}", widget("v1")));
    h.set_desired(vec![v2.clone()]).await.unwrap();
    let s = status(&h, "v1 applied", 30, |s| applied(s) && s.digest == v2.digest).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(uid(&env, "widgets.example.com/w"), before, "{s:?}");
    assert_eq!(s.pruned, 0);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_pruned_while_the_new_version_does_not_apply() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let svc = |name: &str, port: u32| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: {port}}}]}}\n")
    };
    h.set_desired(vec![bundle("", &format!("{}{}", cm("a", ""), svc("web", 80)))]).await.unwrap();
    status(&h, "v1 applied", 30, applied).await;
    // The Service is renamed, and its new version is one the API server rejects.
    h.set_desired(vec![bundle("", &format!("{}{}", cm("a", ""), svc("web-v2", 70000)))]).await.unwrap();
    let s = status(&h, "v2 failed", 30, |s| s.phase == pb::Phase::Failed as i32).await;
    assert!(s.message.contains("Service shop/web-v2: apply failed"), "{s:?}");
    assert!(
        s.reasons
            .iter()
            .any(|r| r.contains("pruning 1 objects waits until every object of the app applies (1 did not)")),
        "{:?}",
        s.reasons
    );
    assert!(env.get("service/web", "{.metadata.name}").is_some(), "the old Service still serves");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transient_error_while_pruning_is_never_read_as_gone() {
    let env = env(Behaviour::default()).await;
    let (ok, out) = env.kubectl_in(&["apply", "-f", "-"], Some(WIDGET_CRD));
    assert!(ok, "{out}");
    let r = ObjectRef {
        api_version: "example.com/v1".into(),
        kind: "Widget".into(),
        namespace: "shop".into(),
        name: "w".into(),
    };
    let cluster = env.sim.cluster("c").unwrap();
    cluster.set_faults(Faults { error_rate: 1.0, ..Default::default() });
    // A fresh agent: the kind is not known yet, so pruning must ask discovery, which answers 503.
    let applier = Applier::new(env.client().await);
    let outcome = applier.prune("shop", &r).await;
    cluster.set_faults(Faults::default());
    let err = outcome.expect_err("a 503 is not an answer about the kind");
    assert!(err.full().starts_with("Widget shop/w: discovery failed: "), "{}", err.full());
    assert!(err.full().contains("ServiceUnavailable"), "{}", err.full());
    assert!(applier.reach().down_since_ms.is_none(), "an answer, even a 503, is an answer");
    // Once it answers, a kind that is really not served is gone (with its objects).
    let gadget = ObjectRef { kind: "Gadget".into(), ..r.clone() };
    assert_eq!(applier.prune("shop", &gadget).await.unwrap(), Pruned::AlreadyGone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_scoped_custom_resource_whose_crd_another_app_brings_is_placed_by_discovery() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let crd = "---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: clusterissuers.cert-manager.io}
spec:
  group: cert-manager.io
  scope: Cluster
  names: {plural: clusterissuers, singular: clusterissuer, kind: ClusterIssuer}
  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]
";
    let issuer =
        "---\napiVersion: cert-manager.io/v1\nkind: ClusterIssuer\nmetadata: {name: letsencrypt}\nspec: {acme: {}}\n";
    let shop = bundle("", &format!("{}{issuer}", cm("a", "")));
    h.set_desired(vec![bundle_of("crds", "", crd), shop]).await.unwrap();
    let s = status(&h, "the issuer applied", 30, |s| applied(s) && s.objects_applied == 2).await;
    let (ok, out) =
        env.kubectl(&["get", "clusterissuers.cert-manager.io", "letsencrypt", "-o", "jsonpath={.metadata.namespace}"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "", "cluster-scoped, no namespace");
    assert_eq!(s.missing, 0, "{s:?}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kind_the_cluster_does_not_serve_waits_while_everything_else_applies() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let gadget = "---\napiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g}\n";
    h.set_desired(vec![bundle("", &format!("{NAMESPACE}{}{gadget}", cm("a", "")))]).await.unwrap();
    let s = status(&h, "the rest applied", 30, |s| s.objects_applied == 2).await;
    assert_eq!(s.phase, pb::Phase::Applying as i32, "not applied while an object waits: {s:?}");
    assert!(s.message.contains("the cluster does not serve example.com/v1 Gadget"), "{s:?}");
    assert!(env.get("configmap/a", "{.metadata.name}").is_some());
    // The CRD arrives from elsewhere (another app, a person): the waiting object applies within seconds.
    let crd = WIDGET_CRD.replace("widgets", "gadgets").replace("widget", "gadget").replace("Widget", "Gadget");
    let (ok, out) = env.kubectl_in(&["apply", "-f", "-"], Some(&crd));
    assert!(ok, "{out}");
    let started = std::time::Instant::now();
    status(&h, "the gadget applied", 15, |s| applied(s) && s.objects_applied == 3).await;
    println!("the waiting object applied {:?} after its CRD", started.elapsed());
    assert!(env.get("gadgets.example.com/g", "{.metadata.name}").is_some());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ignored_field_nobody_else_writes_keeps_its_value_across_versions() {
    let env = env(Behaviour { ready_after_ms: 50, ..Default::default() }).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let ignore = "sync:\n  ignore: [{kind: Deployment, group: apps, paths: [/spec/replicas]}]\n";
    let three = |image: &str| deploy(image).replace("replicas: 2", "replicas: 3");
    h.set_desired(vec![bundle(ignore, &three("web:1"))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    assert_eq!(env.get("deployment/web", "{.spec.replicas}").as_deref(), Some("3"), "created with the desired value");
    let v2 = bundle(ignore, &deploy("web:2").replace("replicas: 2", "replicas: 1"));
    h.set_desired(vec![v2.clone()]).await.unwrap();
    status(&h, "v2 applied", 30, |s| healthy(s) && s.digest == v2.digest).await;
    assert_eq!(env.get("deployment/web", "{.spec.template.spec.containers[0].image}").as_deref(), Some("web:2"));
    assert_eq!(env.get("deployment/web", "{.spec.replicas}").as_deref(), Some("3"), "never reset nor removed");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_whose_api_server_is_down_is_unknown_and_says_since_when() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    h.set_desired(vec![bundle("", &cm("a", ""))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    let cluster = env.sim.cluster("c").unwrap();
    cluster.set_faults(Faults { offline: true, ..Default::default() });
    let started = std::time::Instant::now();
    let s = status(&h, "unknown", 30, |s| s.health == pb::Health::Unknown as i32).await;
    println!("the agent said the API server is down {:?} after it went", started.elapsed());
    assert!(s.health_reason.starts_with("the cluster's API server has not answered since "), "{s:?}");
    assert!(!s.health_reason.contains("ServiceError") && !s.health_reason.contains("SendRequest"), "{s:?}");
    assert!(h.reach().borrow().down_since_ms.is_some());
    cluster.set_faults(Faults::default());
    status(&h, "healthy again", 30, healthy).await;
    assert!(h.reach().borrow().down_since_ms.is_none());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_admission_denies_is_marked_and_the_rest_applies() {
    let env = env(Behaviour::default()).await;
    let cluster = env.sim.cluster("c").unwrap();
    cluster.set_admission(flotilla_sim::admission::Admission {
        rules: vec![flotilla_sim::admission::Rule {
            kinds: vec!["ConfigMap".into()],
            names: vec!["privileged".into()],
            deny: Some("violates PodSecurity \"restricted:latest\"".into()),
            ..Default::default()
        }],
    });
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    h.set_desired(vec![bundle("", &format!("{}{}{}", cm("a", ""), cm("privileged", ""), cm("b", "")))]).await.unwrap();
    let s = status(&h, "failed on the denied object", 30, |s| {
        s.phase == pb::Phase::Failed as i32 && s.objects_applied == 2
    })
    .await;
    assert!(s.message.starts_with("ConfigMap shop/privileged: apply failed: "), "{s:?}");
    assert!(s.message.contains("restricted:latest"), "the policy's words: {s:?}");
    assert!(
        env.get("configmap/a", "{.metadata.name}").is_some() && env.get("configmap/b", "{.metadata.name}").is_some()
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_app_state_is_reported_and_the_agent_keeps_every_other_app() {
    let env = env(Behaviour::default()).await;
    let first = CancellationToken::new();
    let h = env.engine(&first).await;
    h.set_desired(vec![bundle("", &cm("a", "")), bundle_of("extra", "", &cm("x", ""))]).await.unwrap();
    status(&h, "shop applied", 30, healthy).await;
    status_of(&h, "extra", "extra applied", 30, healthy).await;
    first.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, out) = env.kubectl(&[
        "patch",
        "configmap",
        "-n",
        "flotilla-system",
        "flotilla-app-shop",
        "--type",
        "merge",
        "-p",
        r#"{"data": {"digest": "sha256:damaged"}}"#,
    ]);
    assert!(ok, "{out}");
    // A restarted agent starts, keeps the other app, and rebuilds the damaged one from what the hub sends.
    let second = CancellationToken::new();
    let h = env.engine(&second).await;
    status_of(&h, "extra", "extra enforced after the restart", 30, healthy).await;
    assert!(h.applied().contains_key("extra") && !h.applied().contains_key("shop"));
    h.set_desired(vec![bundle("", &cm("a", "")), bundle_of("extra", "", &cm("x", ""))]).await.unwrap();
    status(&h, "shop rebuilt", 30, healthy).await;
    second.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_from_a_newer_hub_applies_and_names_what_this_agent_ignores() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let b = bundle("", &cm("a", ""));
    let text = String::from_utf8(b.bundle.as_ref().unwrap().to_vec()).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let mut policy: serde_json::Value = serde_json::from_str(first).unwrap();
    policy["flotilla.dev/policy"]["rolloutHints"] = serde_json::json!({"canary": true});
    let bytes = format!("{policy}\n{rest}").into_bytes();
    let newer = DesiredApp { digest: flotilla_common::fleet::digest_of(&bytes), bundle: Some(Arc::new(bytes)), ..b };
    h.set_desired(vec![newer]).await.unwrap();
    let s = status(&h, "applied", 30, healthy).await;
    assert!(s.reasons.iter().any(|r| r.contains("does not know") && r.contains("rolloutHints")), "{:?}", s.reasons);
    eventually(10, "the object applied", || async { env.get("configmap/a", "{.metadata.name}") }).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifests_are_read_as_kubectl_reads_them() {
    let env = env(Behaviour { ready_after_ms: 50, ..Default::default() }).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let with_volume = deploy("web:1").replace(
        "    spec: {containers: [{name: web, image: 'web:1'}]}\n",
        "    spec:\n      containers: [{name: web, image: 'web:1'}]\n      volumes: [{name: cfg, configMap: {name: settings, defaultMode: 0644}}]\n",
    );
    let settings =
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {enabled: \"yes\", mode: '0644'}\n";
    h.set_desired(vec![bundle("", &format!("{with_volume}{settings}"))]).await.unwrap();
    let s = status(&h, "applied", 30, healthy).await;
    assert_eq!(s.drifted, 0, "{s:?}");
    assert_eq!(
        env.get("deployment/web", "{.spec.template.spec.volumes[0].configMap.defaultMode}").as_deref(),
        Some("420")
    );
    assert_eq!(env.get("configmap/settings", "{.data.enabled}").as_deref(), Some("yes"), "quoted stays a string");
    assert_eq!(env.get("configmap/settings", "{.data.mode}").as_deref(), Some("0644"));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drifted_secret_is_reported_without_its_values() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let secret = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: hunter2}\n";
    h.set_desired(vec![bundle("sync: {drift: report}\n", secret)]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    let (ok, out) =
        env.kubectl(&["patch", "secret", "-n", "shop", "db", "-p", r#"{"stringData": {"password": "stolen"}}"#]);
    assert!(ok, "{out}");
    let s = status(&h, "drift reported", 20, |s| s.drifted == 1).await;
    assert_eq!(s.drift.len(), 1, "{s:?}");
    assert_eq!(s.drift[0].path, "/data/password");
    assert_eq!((s.drift[0].desired.as_str(), s.drift[0].live.as_str()), ("\"(redacted)\"", "\"(redacted)\""));
    let text = format!("{s:?}");
    assert!(!text.contains("hunter2") && !text.contains("c3RvbGVu") && !text.contains("aHVudGVyMg"), "{text}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_applied_that_the_agent_could_not_record_first() {
    let env = env(Behaviour::default()).await;
    let cluster = env.sim.cluster("c").unwrap();
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    // The agent's own state namespace refuses writes (a policy, a full etcd).
    cluster.set_admission(flotilla_sim::admission::Admission {
        rules: vec![flotilla_sim::admission::Rule {
            kinds: vec!["ConfigMap".into()],
            namespaces: vec!["flotilla-system".into()],
            deny: Some("the state namespace is read-only".into()),
            ..Default::default()
        }],
    });
    h.set_desired(vec![bundle("", &cm("a", ""))]).await.unwrap();
    let s = status(&h, "the save failure reported", 20, |s| {
        s.message.contains("keeping the app's state in the cluster failed")
    })
    .await;
    assert!(s.message.contains("read-only"), "{s:?}");
    assert_eq!(env.get("configmap/a", "{.metadata.name}"), None, "not applied before it is recorded");
    cluster.set_admission(flotilla_sim::admission::Admission::default());
    status(&h, "applied once the save succeeds", 30, healthy).await;
    assert!(env.get("configmap/a", "{.metadata.name}").is_some());
    shutdown.cancel();
}
