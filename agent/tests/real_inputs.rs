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
    // Upstream text holds `${…}` of its own (637 in Grafana dashboards and the blackbox exporter's
    // configuration): the app turns substitution off, the upstream files stay as they are.
    let mut tree: Tree = files.into_iter().map(|(p, c)| (format!("apps/monitoring/{p}"), c)).collect();
    tree.insert("clusters/c.yaml".into(), b"labels: {}\n".to_vec());
    // A platform app: it reads metrics in kube-system and default, which app teams may not write, and its
    // metrics adapter grants "*" verbs on metrics.k8s.io cluster-wide.
    tree.insert(
        "policies/monitoring.yaml".into(),
        b"apps: [monitoring]\nnamespaces: [monitoring, kube-system, default]\nclusterAdmin: true\n".to_vec(),
    );
    tree.insert(
        "apps/monitoring/app.yaml".into(),
        b"namespace: monitoring\nsubstitution: false\ntargets: [{selector: {}}]\n".to_vec(),
    );
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
        traceparent: String::new(),
    };
    h.set_desired(vec![app]).await.unwrap();
    status_of(&h, "monitoring", "every object applied", 180, |s| {
        s.phase == pb::Phase::Applied as i32 && s.objects_applied == s.objects
    })
    .await;
    let applied_after = started.elapsed();
    // Health settles once the watches have shown every object: Deployments become ready; custom resources
    // the simulator gives no status (Prometheus, Alertmanager) stay Unknown, each with its reason.
    let s = status_of(&h, "monitoring", "health settled", 120, |s| {
        s.health != pb::Health::Progressing as i32 && s.health != pb::Health::Unspecified as i32
    })
    .await;
    println!(
        "kube-prometheus: {} objects applied in {applied_after:.1?} (CRDs first), health settled after {:.1?}: {:?}: {} ready, {} not ready, {} missing",
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
    // The app says what the operator's kinds mean (here: existing is enough, as no operator runs).
    let kinds = ["Alertmanager", "Prometheus", "PrometheusRule", "ServiceMonitor", "PodMonitor", "Probe"];
    let rules: Vec<String> =
        kinds.iter().map(|k| format!("- {{kind: {k}, group: monitoring.coreos.com, healthy: 'true'}}")).collect();
    let app_yaml = format!(
        "namespace: monitoring\nsubstitution: false\ntargets: [{{selector: {{}}}}]\nhealth:\n{}\n",
        rules.join("\n")
    );
    tree.insert("apps/monitoring/app.yaml".into(), app_yaml.into_bytes());
    let r = render_fleet(&parse(&tree), &SystemTools::detect(), &mut RenderCache::default());
    let b = r.clusters["c"]["monitoring"].as_ref().unwrap_or_else(|e| panic!("{e}"));
    let with_rules = DesiredApp {
        app: "monitoring".into(),
        digest: b.digest.clone(),
        revision: "r2".into(),
        bundle: Some(Arc::new(b.bytes.clone())),
        traceparent: String::new(),
    };
    let digest = with_rules.digest.clone();
    h.set_desired(vec![with_rules]).await.unwrap();
    let s = status_of(&h, "monitoring", "healthy with the app's rules", 120, |s| {
        s.digest == digest && s.health == pb::Health::Healthy as i32
    })
    .await;
    println!(
        "with health rules for the operator's kinds: {:?}, {} of {} ready",
        pb::Health::Healthy,
        s.ready,
        s.objects
    );
    assert_eq!((s.ready, s.pruned), (s.objects, 0), "{s:?}");
    shutdown.cancel();
}
