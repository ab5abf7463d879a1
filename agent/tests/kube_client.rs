//! The agent's Kubernetes client against the simulator over HTTPS: HTTP/2 is negotiated, and one client's
//! requests and watches of many kinds share one connection; a cluster that drops off the network and
//! comes back is redialled and its watches resume.

use flotilla_agent::kube_client;
use flotilla_e2e::eventually;
use flotilla_sim::{Faults, SimConfig, Simulator};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

async fn client(sim: &Simulator, cluster: &str) -> kube::Client {
    flotilla_common::install_crypto_provider();
    let kc = kube::config::Kubeconfig::from_yaml(&sim.kubeconfig(cluster)).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    kube_client::client(cfg).unwrap()
}

fn connections(sim: &Simulator, cluster: &str) -> usize {
    sim.cluster(cluster).unwrap().connections.load(Ordering::Relaxed)
}

/// Counts events from a watcher of `K` until the test ends.
fn watch<K>(api: Api<K>, seen: Arc<AtomicUsize>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut s = watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Apply(_) | watcher::Event::InitApply(_)) = ev {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
}

#[tokio::test]
async fn watches_of_many_kinds_share_one_http2_connection() {
    let sim = Simulator::start(SimConfig::with_clusters(["c"])).await.unwrap();
    assert!(sim.server_url("c").starts_with("https://"), "kubeconfigs point at HTTPS by default");
    let client = client(&sim, "c").await;
    let seen = Arc::new(AtomicUsize::new(0));
    watch(Api::<ConfigMap>::all(client.clone()), seen.clone());
    watch(Api::<Secret>::all(client.clone()), seen.clone());
    watch(Api::<Service>::all(client.clone()), seen.clone());
    watch(Api::<ServiceAccount>::all(client.clone()), seen.clone());
    watch(Api::<Deployment>::all(client.clone()), seen.clone());
    watch(Api::<Namespace>::all(client.clone()), seen.clone());
    // Four namespaces exist from the start: every watcher is running once they are seen.
    eventually(10, "the namespace watcher lists", || async { (seen.load(Ordering::Relaxed) >= 4).then_some(()) }).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..20 {
        let cm: ConfigMap =
            serde_json::from_value(serde_json::json!({"metadata": {"name": format!("cm-{i}")}, "data": {"i": "x"}}))
                .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    eventually(10, "the configmap watcher sees every create", || async {
        ({ seen.load(Ordering::Relaxed) >= 24 }).then_some(())
    })
    .await;
    assert_eq!(connections(&sim, "c"), 1, "six watches and twenty writes over one connection");
    sim.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_cluster_is_redialled_and_its_watches_resume() {
    let sim = Simulator::start(SimConfig::with_clusters(["c"])).await.unwrap();
    let client = client(&sim, "c").await;
    let seen = Arc::new(AtomicUsize::new(0));
    watch(Api::<ConfigMap>::namespaced(client.clone(), "default"), seen.clone());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mk = |n: &str| -> ConfigMap { serde_json::from_value(serde_json::json!({"metadata": {"name": n}})).unwrap() };
    cms.create(&PostParams::default(), &mk("before")).await.unwrap();
    eventually(10, "the watch sees the first object", || async { (seen.load(Ordering::Relaxed) >= 1).then_some(()) })
        .await;
    let c = sim.cluster("c").unwrap();
    assert_eq!(connections(&sim, "c"), 1);
    c.set_faults(Faults { offline: true, ..Default::default() });
    // Its connection closes at once, with no request on it, as a dead network would take it.
    eventually(10, "the connection is closed", || async { (connections(&sim, "c") == 0).then_some(()) }).await;
    let err = tokio::time::timeout(Duration::from_secs(20), cms.get("before")).await;
    assert!(matches!(err, Ok(Err(_))), "an offline cluster answers nothing: {err:?}");
    c.set_faults(Faults::default());
    cms.create(&PostParams::default(), &mk("after")).await.unwrap();
    eventually(30, "the resumed watch sees the object made after the outage", || async {
        ({ seen.load(Ordering::Relaxed) >= 2 }).then_some(())
    })
    .await;
    sim.shutdown().await;
}

/// A cluster name with a dot is not covered by the simulator's wildcard certificate: it gets a certificate
/// of its own, and the client verifies it like any other.
#[tokio::test]
async fn a_cluster_name_with_a_dot_gets_a_certificate_of_its_own() {
    let sim = Simulator::start(SimConfig::with_clusters(["eu.prod-1"])).await.unwrap();
    let client = client(&sim, "eu.prod-1").await;
    let names: Vec<String> = Api::<Namespace>::all(client)
        .list(&Default::default())
        .await
        .expect("TLS to a dotted cluster name verifies")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(names.contains(&"kube-system".to_string()), "{names:?}");
    assert_eq!(connections(&sim, "eu.prod-1"), 1);
    sim.shutdown().await;
}
