//! Apps written for other tools apply without edits to their files: Argo CD's hooks and sync waves keep their
//! order (a PreSync Job completes before anything else applies, waves go in order, a PostSync Job starts once
//! everything else is healthy).

mod support;

use flotilla_sim::Behaviour;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::*;
use tokio_util::sync::CancellationToken;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/argocd-hooks");

fn fixture() -> String {
    let mut files: Vec<_> = std::fs::read_dir(FIXTURE)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.iter().map(|p| format!("---\n{}", std::fs::read_to_string(p).unwrap())).collect()
}

fn api(client: &kube::Client, group: &str, version: &str, kind: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Api::namespaced_with(client.clone(), "shop", &ar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn argo_cd_hooks_and_sync_waves_keep_their_order() {
    let behaviour = Behaviour { job_after_ms: 700, ready_after_ms: 700, ..Behaviour::default() };
    let env = env(behaviour).await;
    let client = env.client().await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let desired = bundle("", &fixture());
    let bundle_text = String::from_utf8_lossy(desired.bundle.as_deref().unwrap()).to_string();
    assert!(bundle_text.contains("\"name\":\"before-"), "generateName becomes a name from the content");
    h.set_desired(vec![desired]).await.unwrap();

    // When each thing was first seen, polled every 20 ms.
    let (jobs, deploys, configs, services) = (
        api(&client, "batch", "v1", "Job"),
        api(&client, "apps", "v1", "Deployment"),
        api(&client, "", "v1", "ConfigMap"),
        api(&client, "", "v1", "Service"),
    );
    let start = Instant::now();
    let mut seen: BTreeMap<&str, Duration> = BTreeMap::new();
    while start.elapsed() < Duration::from_secs(40) && seen.len() < 7 {
        let mut mark = |what: &'static str, yes: bool| {
            if yes {
                seen.entry(what).or_insert(start.elapsed());
            }
        };
        for j in jobs.list(&Default::default()).await.unwrap().items {
            let name = j.metadata.name.clone().unwrap_or_default();
            let done = j.data.pointer("/status/succeeded").and_then(|v| v.as_i64()) == Some(1);
            if name.starts_with("before-") {
                mark("pre-sync job", true);
                mark("pre-sync job complete", done);
            } else if name.starts_with("after-") {
                mark("post-sync job", true);
            }
        }
        for d in deploys.list(&Default::default()).await.unwrap().items {
            mark("deployment", true);
            mark(
                "deployment available",
                d.data.pointer("/status/availableReplicas").and_then(|v| v.as_i64()) == Some(1),
            );
        }
        mark("config (wave -1)", configs.get_opt("web-config").await.unwrap().is_some());
        mark("service (wave 1)", services.get_opt("web").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{seen:#?}");
    let at = |w: &str| *seen.get(w).unwrap_or_else(|| panic!("{w} never seen: {seen:?}"));
    assert!(at("pre-sync job complete") <= at("config (wave -1)"), "PreSync completes before anything else applies");
    assert!(at("config (wave -1)") <= at("deployment"), "wave -1 before wave 0");
    assert!(at("deployment available") <= at("service (wave 1)"), "wave 0 healthy before wave 1");
    assert!(at("service (wave 1)") <= at("post-sync job"), "PostSync after every wave");
    status(&h, "healthy", 30, healthy).await;
    shutdown.cancel();
}
