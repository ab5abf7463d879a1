//! Real public inputs through the whole agent: the kube-prometheus manifests (Apache-2.0, not vendored here)
//! as one plain-manifests app, rendered as the hub renders it, converging on a simulated cluster.

mod support;

use flotilla_agent::engine::DesiredApp;
use flotilla_common::fleet::render::{render_fleet, RenderCache};
use flotilla_common::fleet::{parse, Tree};
use flotilla_common::tools::SystemTools;
use flotilla_proto::agent::v1 as pb;
use flotilla_sim::Behaviour;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use support::*;
use tokio_util::sync::CancellationToken;

fn files_under(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(root, &p, out);
        } else {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            out.push((rel, std::fs::read(&p).unwrap()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the kube-prometheus manifests: set FLOTILLA_KUBE_PROMETHEUS to their manifests/ directory (docs/sim.md)"]
async fn kube_prometheus_as_one_app_converges() {
    let manifests: PathBuf = std::env::var_os("FLOTILLA_KUBE_PROMETHEUS").expect("FLOTILLA_KUBE_PROMETHEUS").into();
    let mut files = Vec::new();
    files_under(&manifests, &manifests, &mut files);
    assert!(files.len() > 50, "{} holds {} files: not kube-prometheus' manifests/", manifests.display(), files.len());
    let mut tree: Tree = files.into_iter().map(|(p, c)| (format!("apps/monitoring/{p}"), c)).collect();
    tree.insert("clusters/c.yaml".into(), b"labels: {}\n".to_vec());
    tree.insert("apps/monitoring/app.yaml".into(), b"namespace: monitoring\ntargets: [{selector: {}}]\n".to_vec());
    let r = render_fleet(&parse(&tree), &SystemTools::detect(), &mut RenderCache::default());
    let b = r.clusters["c"]["monitoring"].as_ref().unwrap_or_else(|e| panic!("{e}"));
    let env = env(Behaviour { ready_after_ms: 200, ..Default::default() }).await;
    let shutdown = CancellationToken::new();
    let h = env.engine(&shutdown).await;
    let started = std::time::Instant::now();
    let app = DesiredApp {
        app: "monitoring".into(),
        digest: b.digest.clone(),
        revision: "r".into(),
        bundle: Some(Arc::new(b.bytes.clone())),
    };
    h.set_desired(vec![app]).await.unwrap();
    let s = status_of(&h, "monitoring", "every object applied", 180, |s| {
        s.phase == pb::Phase::Applied as i32 && s.objects_applied == s.objects
    })
    .await;
    println!(
        "kube-prometheus: {} objects applied in {:.1?} (CRDs first); health {:?}: {} ready, {} not ready, {} missing",
        s.objects,
        started.elapsed(),
        pb::Health::try_from(s.health).unwrap_or_default(),
        s.ready,
        s.not_ready,
        s.missing
    );
    for r in &s.reasons {
        println!("  {r}");
    }
    assert_eq!(s.missing, 0, "{s:?}");
    assert_eq!(s.drifted, 0, "no false drift on upstream manifests: {:?}", s.drift);
    assert!(s.message.is_empty() || !s.message.contains("failed"), "{s:?}");
    shutdown.cancel();
}
