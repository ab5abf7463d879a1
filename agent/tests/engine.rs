//! The engine against a simulated cluster, no hub: order, pruning, health, drift (hand edits made with the
//! real kubectl), ignore rules, rejected objects, backoff, and a restarted agent enforcing the state it kept
//! in the cluster.

mod support;

use flotilla_e2e::eventually;
use flotilla_proto::agent::v1 as pb;
use flotilla_sim::Behaviour;
use std::process::Command;
use std::time::Duration;
use support::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crd_and_its_resources_apply_in_order() {
    let env = env(Behaviour { crd_after_ms: 300, ..Default::default() }).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let crd = "---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: widgets.example.com}\nspec:\n  group: example.com\n  scope: Namespaced\n  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}\n";
    let widget = "---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n";
    h.set_desired(vec![bundle("", &format!("{widget}{crd}{}", cm("plain", "")))]).await.unwrap();
    // A custom resource with no status and no rule: applied, its health not known.
    let s = status(&h, "the app applied", 30, |s| s.phase == pb::Phase::Applied as i32 && s.ready == 2).await;
    assert_eq!((s.objects, s.objects_applied, s.health), (3, 3, pb::Health::Unknown as i32), "{s:?}");
    assert!(s.health_reason.starts_with("Widget shop/w1: NoStatus: Widget reports no status"), "{s:?}");
    // The app's rule says what the kind's health is.
    let rule = "health: [{kind: Widget, healthy: 'object.spec.size > 0'}]\n";
    h.set_desired(vec![bundle(rule, &format!("{widget}{crd}{}", cm("plain", "")))]).await.unwrap();
    let s = status(&h, "the app applied and healthy", 30, healthy).await;
    assert_eq!((s.objects, s.objects_applied, s.ready), (3, 3, 3), "{s:?}");
    assert_eq!(env.get("widget/w1", "{.spec.size}").as_deref(), Some("3"));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_resources_are_pruned_and_nothing_else() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let protected = "  annotations: {flotilla.dev/protect: \"true\"}\n";
    let v1 =
        bundle("", &format!("{}{}{}{}", cm("keep", ""), cm("keep2", ""), cm("drop", ""), cm("guarded", protected)));
    h.set_desired(vec![v1]).await.unwrap();
    status(&h, "v1 applied", 30, healthy).await;
    // A neighbour nobody told the agent about, in the same namespace.
    let (ok, out) = env.kubectl_in(&["create", "-n", "shop", "-f", "-"], Some(&cm("neighbour", "")));
    assert!(ok, "{out}");
    // Two of four objects go: not more than half of the app, so no confirmation is needed.
    let v2 = bundle("", &format!("{}{}", cm("keep", ""), cm("keep2", "")));
    h.set_desired(vec![v2]).await.unwrap();
    let s = status(&h, "v2 applied with a prune", 30, |s| healthy(s) && s.objects == 2).await;
    assert_eq!(s.pruned, 1, "{s:?}");
    assert!(s.reasons.iter().any(|r| r.contains("ConfigMap shop/guarded is protected")), "{:?}", s.reasons);
    assert_eq!(env.get("configmap/drop", "{.metadata.name}"), None, "pruned");
    assert!(env.get("configmap/guarded", "{.metadata.name}").is_some(), "protected");
    assert!(env.get("configmap/neighbour", "{.metadata.name}").is_some(), "never created by the agent");

    // Pruning off: what leaves the app stays.
    let v3 = bundle("sync: {prune: false}\n", &cm("other", ""));
    h.set_desired(vec![v3]).await.unwrap();
    status(&h, "v3 applied", 30, |s| {
        healthy(s) && s.objects == 1 && s.reasons.iter().any(|r| r.contains("pruning is off"))
    })
    .await;
    assert!(env.get("configmap/keep", "{.metadata.name}").is_some());

    // The app leaves the cluster: its objects go (v4 prunes again), the neighbour stays.
    let v4 = bundle("", &cm("last", ""));
    let d4 = v4.digest.clone();
    h.set_desired(vec![v4]).await.unwrap();
    status(&h, "v4 applied", 30, |s| healthy(s) && s.digest == d4).await;
    h.set_desired(vec![]).await.unwrap();
    eventually(20, "the app's objects removed", || async {
        env.get("configmap/last", "{.metadata.name}").is_none().then_some(())
    })
    .await;
    assert!(env.get("configmap/neighbour", "{.metadata.name}").is_some());
    assert!(env.get("configmap/guarded", "{.metadata.name}").is_some());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_image_makes_the_app_degraded_with_the_clusters_reason() {
    let env =
        env(Behaviour { fail_images: Some(":broken$".into()), progress_deadline_cap_s: Some(1), ..Default::default() })
            .await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    h.set_desired(vec![bundle("", &deploy("web:broken"))]).await.unwrap();
    let s = status(&h, "Degraded", 30, |s| s.health == pb::Health::Degraded as i32).await;
    assert!(s.health_reason.starts_with("Deployment shop/web: ProgressDeadlineExceeded"), "{s:?}");
    assert_eq!(s.phase, pb::Phase::Applied as i32, "applied, but not healthy");
    assert_eq!(s.not_ready, 1);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_edits_are_corrected_under_correct() {
    let env = env(Behaviour { ready_after_ms: 50, ..Default::default() }).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    h.set_desired(vec![bundle("", &format!("{}{}", deploy("web:1"), cm("settings", "")))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    let (ok, out) = env.kubectl(&["set", "image", "-n", "shop", "deployment/web", "web=web:hacked"]);
    assert!(ok, "{out}");
    let (ok, out) =
        env.kubectl(&["patch", "-n", "shop", "configmap/settings", "--type=merge", "-p", r#"{"data":{"k":"edited"}}"#]);
    assert!(ok, "{out}");
    eventually(15, "the image put back", || async {
        (env.get("deployment/web", "{.spec.template.spec.containers[0].image}").as_deref() == Some("web:1"))
            .then_some(())
    })
    .await;
    eventually(15, "the ConfigMap put back", || async {
        (env.get("configmap/settings", "{.data.k}").as_deref() == Some("v")).then_some(())
    })
    .await;
    let (ok, _) = env.kubectl(&["delete", "-n", "shop", "configmap/settings"]);
    assert!(ok);
    eventually(15, "a deleted object re-created", || async {
        env.get("configmap/settings", "{.data.k}").filter(|v| v == "v")
    })
    .await;
    status(&h, "healthy and no drift", 15, |s| healthy(s) && s.drifted == 0 && s.missing == 0).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_edits_are_reported_with_path_and_values_under_report() {
    let env = env(Behaviour { ready_after_ms: 50, ..Default::default() }).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    h.set_desired(vec![bundle("sync: {drift: report}\n", &deploy("web:1"))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    let (ok, out) = env.kubectl(&["set", "image", "-n", "shop", "deployment/web", "web=web:hacked"]);
    assert!(ok, "{out}");
    let s = status(&h, "drift reported", 15, |s| s.drifted == 1).await;
    assert!(!s.corrects_drift);
    assert_eq!(
        s.drift,
        vec![pb::DriftItem {
            object: "Deployment shop/web".into(),
            path: "/spec/template/spec/containers[name=web]/image".into(),
            desired: "\"web:1\"".into(),
            live: "\"web:hacked\"".into(),
        }]
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.get("deployment/web", "{.spec.template.spec.containers[0].image}").as_deref(),
        Some("web:hacked"),
        "reported, not changed"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ignored_field_changed_by_another_manager_is_left_alone() {
    let env = env(Behaviour { ready_after_ms: 50, ..Default::default() }).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let ignore = "sync:\n  ignore: [{kind: Deployment, group: apps, paths: [/spec/replicas]}]\n";
    h.set_desired(vec![bundle(ignore, &deploy("web:1"))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    // An autoscaler (here: kubectl scale) owns replicas.
    let (ok, out) = env.kubectl(&["scale", "-n", "shop", "deployment/web", "--replicas=5"]);
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.get("deployment/web", "{.spec.replicas}").as_deref(), Some("5"), "not corrected");
    let s = status(&h, "healthy", 15, healthy).await;
    assert_eq!(s.drifted, 0, "not reported: {s:?}");
    // A new version of the app still leaves replicas to the autoscaler.
    let mut v2 = bundle(ignore, &deploy("web:2"));
    v2.revision = "r2".into();
    let d2 = v2.digest.clone();
    h.set_desired(vec![v2]).await.unwrap();
    status(&h, "v2 applied", 30, |s| healthy(s) && s.digest == d2).await;
    assert_eq!(env.get("deployment/web", "{.spec.template.spec.containers[0].image}").as_deref(), Some("web:2"));
    assert_eq!(
        env.get("deployment/web", "{.spec.replicas}").as_deref(),
        Some("5"),
        "the new version kept the autoscaler's value"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_object_is_marked_and_the_rest_applies_then_backs_off() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let bad = "---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: 70000}]}\n";
    h.set_desired(vec![bundle("", &format!("{}{bad}{}", cm("a", ""), cm("b", "")))]).await.unwrap();
    let s = status(&h, "failed with the API's message", 30, |s| s.phase == pb::Phase::Failed as i32).await;
    assert!(s.message.starts_with("Service shop/bad: apply failed: "), "{s:?}");
    assert!(s.message.contains("65535"), "the API server's words: {s:?}");
    assert_eq!(s.objects_applied, 2, "the rest of the app applied: {s:?}");
    assert!(
        env.get("configmap/a", "{.metadata.name}").is_some() && env.get("configmap/b", "{.metadata.name}").is_some()
    );
    // Later attempts wait longer and longer.
    let later = status(&h, "a longer wait", 20, |s| s.message.contains("(attempt 2 failed)")).await;
    assert!(later.message.contains("retrying in"), "{later:?}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_agent_without_a_hub_still_corrects_drift() {
    let env = env(Behaviour { ready_after_ms: 50, ..Default::default() }).await;
    let first = CancellationToken::new();
    let h = env.engine(&first).await;
    h.set_desired(vec![bundle("", &format!("{}{}", deploy("web:1"), cm("settings", "")))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    first.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While no agent runs, someone edits the cluster.
    let (ok, out) =
        env.kubectl(&["patch", "-n", "shop", "configmap/settings", "--type=merge", "-p", r#"{"data":{"k":"edited"}}"#]);
    assert!(ok, "{out}");
    // A new agent process, no hub: it reads its state from the cluster and enforces it.
    let second = CancellationToken::new();
    let h2 = env.engine(&second).await;
    assert_eq!(h2.applied().get("shop").map(|(d, _)| d.len()), Some(71), "it knows what was applied");
    eventually(15, "the edit corrected by the restarted agent", || async {
        (env.get("configmap/settings", "{.data.k}").as_deref() == Some("v")).then_some(())
    })
    .await;
    let s = status(&h2, "healthy", 15, healthy).await;
    assert_eq!(s.objects, 2);
    second.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wave_waits_until_the_previous_one_is_healthy() {
    let env = env(Behaviour { fail_images: Some(":broken$".into()), ready_after_ms: 50, ..Default::default() }).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let later = cm("after-web", "  annotations: {flotilla.dev/wave: \"1\"}\n");
    h.set_desired(vec![bundle("", &format!("{}{later}", deploy("web:broken")))]).await.unwrap();
    let s = status(&h, "waiting for wave 0", 20, |s| {
        s.message.starts_with("waiting for Deployment shop/web to become healthy")
    })
    .await;
    assert_eq!(s.phase, pb::Phase::Applying as i32, "{s:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.get("configmap/after-web", "{.metadata.name}"),
        None,
        "wave 1 is not applied while wave 0 is unhealthy"
    );
    // A fixed image lets the next wave go.
    let fixed = bundle("", &format!("{}{later}", deploy("web:1")));
    h.set_desired(vec![fixed]).await.unwrap();
    status(&h, "both waves applied", 30, healthy).await;
    assert!(env.get("configmap/after-web", "{.metadata.name}").is_some());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_field_another_controller_keeps_changing_is_not_fought_over() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    h.set_desired(vec![bundle("", &cm("contested", ""))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    // Another controller sets the field again and again.
    let kubeconfig = env.kubeconfig.clone();
    let rival = std::thread::spawn(move || {
        for i in 0..20 {
            let _ = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args([
                    "patch",
                    "-n",
                    "shop",
                    "configmap/contested",
                    "--type=merge",
                    "-p",
                    &format!(r#"{{"data":{{"k":"rival-{i}"}}}}"#),
                ])
                .output();
            std::thread::sleep(Duration::from_millis(400));
        }
    });
    let s = status(&h, "the fight detected", 30, |s| s.reasons.iter().any(|r| r.contains("keeps drifting back"))).await;
    assert!(s.reasons[0].starts_with("ConfigMap shop/contested: keeps drifting back"), "{s:?}");
    rival.join().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.get("configmap/contested", "{.data.k}").as_deref(),
        Some("rival-19"),
        "the agent stopped correcting it"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_that_leaves_while_the_api_fails_is_pruned_once_it_recovers() {
    let env = env(Behaviour::default()).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    h.set_desired(vec![bundle("", &cm("doomed", ""))]).await.unwrap();
    status(&h, "applied", 30, healthy).await;
    let cluster = env.sim.cluster("c").unwrap();
    cluster.set_faults(flotilla_sim::Faults { error_rate: 1.0, ..Default::default() });
    h.set_desired(vec![]).await.unwrap();
    // Longer than the client's own retries: the engine's delete fails and is kept for later.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(cluster.faults().error_rate, 1.0);
    cluster.set_faults(flotilla_sim::Faults::default());
    eventually(30, "the object deleted by a retry", || async {
        env.get("configmap/doomed", "{.metadata.name}").is_none().then_some(())
    })
    .await;
    shutdown.cancel();
}
