//! What the agent's tests share: a simulated cluster, kubectl against it, bundles rendered as the hub renders
//! them, waiting for a status.
#![allow(dead_code)]

use flotilla_agent::apply::Applier;
use flotilla_agent::engine::{start, DesiredApp, EngineConfig, EngineHandle};
use flotilla_common::fleet::render::{render_fleet, RenderCache};
use flotilla_common::fleet::{parse, Tree};
use flotilla_common::tools::SystemTools;
use flotilla_e2e::eventually;
use flotilla_proto::agent::v1 as pb;
use flotilla_sim::{Behaviour, SimConfig, Simulator};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Env {
    pub sim: Simulator,
    pub kubeconfig: PathBuf,
    _tmp: tempfile::TempDir,
}

pub async fn env(behaviour: Behaviour) -> Env {
    let sim = Simulator::start(SimConfig { behaviour, ..SimConfig::with_clusters(["c"]) }).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("c.kubeconfig");
    std::fs::write(&kubeconfig, sim.kubeconfig("c")).unwrap();
    Env { sim, kubeconfig, _tmp: tmp }
}

impl Env {
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::from_yaml(&self.sim.kubeconfig("c")).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        flotilla_agent::kube_client::client(cfg).unwrap()
    }

    pub async fn engine(&self, shutdown: &CancellationToken) -> EngineHandle {
        let cfg = EngineConfig {
            tick: Duration::from_millis(300),
            debounce: Duration::from_millis(30),
            ..Default::default()
        };
        start(Arc::new(Applier::new(self.client().await)), cfg, shutdown.clone()).await.unwrap()
    }

    /// kubectl against the cluster: (success, stdout + stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String) {
        self.kubectl_in(args, None)
    }

    pub fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl is needed: https://kubernetes.io/docs/tasks/tools/");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    pub fn get(&self, what: &str, jsonpath: &str) -> Option<String> {
        let (ok, out) = self.kubectl(&["get", what, "-n", "shop", "-o", &format!("jsonpath={jsonpath}")]);
        ok.then(|| out.trim().to_string())
    }
}

/// The bundle of app `shop` (namespace shop) rendered from an app.yaml tail and manifests.
pub fn bundle(app_extra: &str, manifests: &str) -> DesiredApp {
    bundle_of("shop", app_extra, manifests)
}

/// The bundle of `app` (namespace shop) rendered from an app.yaml tail and manifests, as the hub renders it.
pub fn bundle_of(app: &str, app_extra: &str, manifests: &str) -> DesiredApp {
    let tree: Tree = [
        ("clusters/c.yaml".to_string(), "labels: {}\n".to_string()),
        (format!("apps/{app}/app.yaml"), format!("namespace: shop\ntargets: [{{selector: {{}}}}]\n{app_extra}")),
        (format!("apps/{app}/manifests.yaml"), manifests.to_string()),
    ]
    .into_iter()
    .map(|(p, c)| (p, c.into_bytes()))
    .collect();
    let r = render_fleet(&parse(&tree), &SystemTools::detect(), &mut RenderCache::default());
    let b = r.clusters["c"][app].as_ref().unwrap_or_else(|e| panic!("{e}"));
    DesiredApp {
        app: app.into(),
        digest: b.digest.clone(),
        revision: "r".into(),
        bundle: Some(Arc::new(b.bytes.clone())),
        traceparent: String::new(),
    }
}

pub async fn status(h: &EngineHandle, what: &str, secs: u64, pred: impl Fn(&pb::AppStatus) -> bool) -> pb::AppStatus {
    status_of(h, "shop", what, secs, pred).await
}

pub async fn status_of(
    h: &EngineHandle,
    app: &str,
    what: &str,
    secs: u64,
    pred: impl Fn(&pb::AppStatus) -> bool,
) -> pb::AppStatus {
    let rx = h.statuses();
    eventually(secs, what, || {
        let s = rx.borrow().get(app).cloned();
        let ok = s.filter(|s| pred(s));
        async move { ok }
    })
    .await
}

pub fn cm(name: &str, extra: &str) -> String {
    format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n{extra}data: {{k: v}}\n")
}

pub fn deploy(image: &str) -> String {
    format!("---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: '{image}'}}]}}\n")
}

pub fn healthy(s: &pb::AppStatus) -> bool {
    s.phase == pb::Phase::Applied as i32 && s.health == pb::Health::Healthy as i32
}
