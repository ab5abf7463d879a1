//! What an app may not do on a cluster, against a simulated cluster checked with kubectl: take over an object
//! the fleet did not create (unless it adopts it, and then it is released, never deleted, when it leaves),
//! write into the agent's state namespace, or apply what the bundle's guard refuses (the agent checks again
//! what the hub checked at render).

mod support;

use flotilla_agent::engine::DesiredApp;
use flotilla_proto::agent::v1 as pb;
use flotilla_sim::Behaviour;
use std::sync::Arc;
use support::*;
use tokio_util::sync::CancellationToken;

fn failed(s: &pb::AppStatus) -> bool {
    s.phase == pb::Phase::Failed as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_the_fleet_did_not_create_is_left_alone_until_adopted_and_then_released_not_deleted() {
    let env = env(Behaviour::default()).await;
    let (ok, out) = env.kubectl_in(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: legacy, namespace: shop}\ndata: {k: theirs}\n"),
    );
    assert!(ok, "{out}");
    let uid = env.get("configmap/legacy", "{.metadata.uid}").unwrap();
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let manifests = format!("{}{}", cm("legacy", ""), cm("fresh", ""));
    h.set_desired(vec![bundle("", &manifests)]).await.unwrap();
    let s = status(&h, "the existing object refused", 30, |s| failed(s) && s.objects_applied == 1).await;
    assert!(s.message.contains("ConfigMap shop/legacy exists, not ours"), "{s:?}");
    assert!(s.message.contains("sync.adopt"), "says how to take it over: {s:?}");
    assert_eq!(env.get("configmap/legacy", "{.data.k}").as_deref(), Some("theirs"), "not touched");
    assert_eq!(env.get("configmap/legacy", "{.metadata.labels}").as_deref(), Some(""), "not labelled");
    assert_eq!(env.get("configmap/fresh", "{.data.k}").as_deref(), Some("v"), "the rest applies");

    // The app adopts it.
    h.set_desired(vec![bundle("sync: {adopt: true}\n", &manifests)]).await.unwrap();
    status(&h, "adopted", 30, healthy).await;
    assert_eq!(env.get("configmap/legacy", "{.data.k}").as_deref(), Some("v"));
    assert_eq!(env.get("configmap/legacy", "{.metadata.annotations.flotilla\\.dev/adopted}").as_deref(), Some("true"));
    assert_eq!(env.get("configmap/legacy", "{.metadata.uid}").as_deref(), Some(uid.as_str()), "the same object");

    // It leaves the app: released, the fleet's marks removed; what the app created is pruned.
    // (Two of three objects leave at once: confirmed as a mass prune.)
    h.set_desired(vec![bundle("sync: {adopt: true, allowMassPrune: true}\n", &cm("other", ""))]).await.unwrap();
    status(&h, "the new version", 30, |s| healthy(s) && s.objects == 1).await;
    eventually_gone(&env, "configmap/fresh").await;
    assert_eq!(env.get("configmap/legacy", "{.metadata.uid}").as_deref(), Some(uid.as_str()), "released, not deleted");
    assert_eq!(env.get("configmap/legacy", "{.metadata.labels}").as_deref(), Some(""), "no fleet label left");
    assert_eq!(env.get("configmap/legacy", "{.metadata.annotations.flotilla\\.dev/adopted}").as_deref(), Some(""));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_object_is_adopted_by_its_annotation_alone() {
    let env = env(Behaviour::default()).await;
    let (ok, out) = env.kubectl(&["create", "namespace", "shop"]);
    assert!(ok, "{out}");
    for name in ["mine", "theirs"] {
        let (ok, out) = env.kubectl(&["-n", "shop", "create", "configmap", name, "--from-literal=k=old"]);
        assert!(ok, "{out}");
    }
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let manifests = format!("{}{}", cm("mine", "  annotations: {flotilla.dev/adopt: 'true'}\n"), cm("theirs", ""));
    h.set_desired(vec![bundle("", &manifests)]).await.unwrap();
    let s = status(&h, "one adopted, one refused", 30, |s| failed(s) && s.objects_applied == 1).await;
    assert!(s.message.contains("ConfigMap shop/theirs exists, not ours"), "{s:?}");
    assert_eq!(env.get("configmap/mine", "{.data.k}").as_deref(), Some("v"));
    assert_eq!(env.get("configmap/theirs", "{.data.k}").as_deref(), Some("old"));
    shutdown.cancel();
}

/// A bundle as a hub that did not check (an older or a compromised one) could send it.
fn crafted(objects: &[&str]) -> DesiredApp {
    let policy =
        r#"{"flotilla.dev/policy":{"guard":{"denyNamespaces":["flotilla-system","kube-system"]},"namespace":"shop"}}"#;
    let text = std::iter::once(policy).chain(objects.iter().copied()).collect::<Vec<_>>().join("\n");
    DesiredApp {
        app: "shop".into(),
        digest: flotilla_common::fleet::digest_of(text.as_bytes()),
        revision: "r".into(),
        bundle: Some(Arc::new(text.into_bytes())),
        traceparent: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_refuses_its_state_namespace_and_what_the_guard_refuses_even_when_the_hub_sent_it() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    h.set_desired(vec![crafted(&[
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"flotilla-app-x","namespace":"flotilla-system"},"data":{"index":"garbage"}}"#,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"coredns","namespace":"kube-system"}}"#,
        r#"{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"own-the-cluster"},"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"cluster-admin"},"subjects":[{"kind":"ServiceAccount","name":"default","namespace":"shop"}]}"#,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"fine","namespace":"shop"}}"#,
    ])])
    .await
    .unwrap();
    let s = status(&h, "three refused, one applied", 30, |s| failed(s) && s.objects_applied == 1).await;
    assert!(s.message.contains("refused"), "{s:?}");
    let (_, out) = env.kubectl(&["get", "configmap", "-n", "flotilla-system", "flotilla-app-x"]);
    assert!(out.contains("NotFound"), "the state namespace was not written: {out}");
    let (_, out) = env.kubectl(&["get", "configmap", "-n", "kube-system", "coredns"]);
    assert!(out.contains("NotFound"), "{out}");
    let (_, out) = env.kubectl(&["get", "clusterrolebinding", "own-the-cluster"]);
    assert!(out.contains("NotFound"), "{out}");
    assert_eq!(env.get("configmap/fine", "{.metadata.name}").as_deref(), Some("fine"));
    let all: Vec<String> = std::iter::once(s.message.clone()).chain(s.reasons.iter().cloned()).collect();
    let joined = all.join("\n");
    assert!(joined.contains("holds the agent's state"), "{joined}");
    assert!(joined.contains("namespace kube-system is off limits"), "{joined}");
    assert!(joined.contains("cluster-admin"), "{joined}");
    shutdown.cancel();
}

async fn eventually_gone(env: &Env, what: &str) {
    flotilla_e2e::eventually(30, &format!("{what} pruned"), || {
        let gone = env.get(what, "{.metadata.name}").is_none();
        async move { gone.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_holding_a_secret_is_kept_in_secrets_and_read_back_after_a_restart() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let secret = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: hunter2}\n";
    h.set_desired(vec![bundle("", &format!("{secret}{}", cm("plain", "")))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    let names = |kind: &str| {
        let (ok, out) = env.kubectl(&[
            "get",
            kind,
            "-n",
            "flotilla-system",
            "-l",
            "flotilla.dev/agent-state=chunk",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        assert!(ok, "{out}");
        out.split_whitespace().map(str::to_string).collect::<Vec<_>>()
    };
    let (secrets, configmaps) = (names("secrets"), names("configmaps"));
    assert!(secrets.iter().any(|n| n.starts_with("flotilla-app-shop-")), "bundle chunks in Secrets: {secrets:?}");
    assert!(configmaps.iter().all(|n| n.contains("-inv-")), "only the inventory in ConfigMaps: {configmaps:?}");
    shutdown.cancel();
    // A restarted agent reads the state back from the Secrets and enforces it.
    let again = CancellationToken::new();
    let h = env.engine(&again).await;
    status(&h, "enforced after the restart", 30, healthy).await;
    // Without a Secret, a new version moves the bundle back to ConfigMaps and removes the Secret chunks.
    h.set_desired(vec![bundle("sync: {allowMassPrune: true}\n", &cm("plain", ""))]).await.unwrap();
    status(&h, "the new version", 30, |s| healthy(s) && s.objects == 1).await;
    flotilla_e2e::eventually(30, "the Secret chunks removed", || {
        let gone = names("secrets").is_empty();
        async move { gone.then_some(()) }
    })
    .await;
    again.cancel();
}
