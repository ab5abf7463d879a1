//! Rendering through the real tools: kubectl's kustomize (installed with kubectl) and helm where present.

mod support;

use support::{tools, tree};

use flotilla_common::fleet::render::{render_fleet, RenderCache};
use flotilla_common::fleet::{parse, Bundle, Tree};
use flotilla_common::tools::SystemTools;

fn overlay_fleet() -> Tree {
    tree(&[
        ("clusters/eu-1.yaml", "labels: {region: eu}\nvalues: {replicas: 3}\n"),
        ("clusters/eu-2.yaml", "labels: {region: eu}\nvalues: {replicas: 3}\n"),
        ("clusters/us-1.yaml", "labels: {region: us}\n"),
        (
            "apps/web/app.yaml",
            "namespace: web\nkustomize: {path: base}\nvalues: {replicas: 1}\ntargets:\n- selector: {matchLabels: {region: eu}}\n  kustomize: {path: overlays/eu}\n- selector: {}\n",
        ),
        ("apps/web/base/kustomization.yaml", "resources: [deploy.yaml]\ncommonLabels: {app: web}\n"),
        (
            "apps/web/base/deploy.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: ${values.replicas}\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: 'web:1', env: [{name: CLUSTER, value: '${cluster.name}'}]}]}\n",
        ),
        ("apps/web/overlays/eu/kustomization.yaml", "resources: [../../base]\nnamePrefix: eu-\nconfigMapGenerator:\n- name: residency\n  literals: ['region=${cluster.labels.region}']\n"),
    ])
}

#[test]
fn kustomize_overlays_render_through_kubectl() {
    let r = render_fleet(&parse(&overlay_fleet()), &tools(), &mut RenderCache::default());
    let objects =
        |c: &str| Bundle::parse(&r.clusters[c]["web"].as_ref().unwrap_or_else(|e| panic!("{e}")).bytes).unwrap();
    let eu = objects("eu-1");
    assert_eq!(eu.len(), 2, "{eu:#?}");
    let cm = eu.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    assert!(cm["metadata"]["name"].as_str().unwrap().starts_with("eu-residency-"), "the generator's hashed name");
    assert_eq!(cm["data"]["region"], "eu");
    let deploy = eu.iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(deploy["metadata"]["name"], "eu-web");
    assert_eq!(deploy["metadata"]["namespace"], "web");
    assert_eq!(deploy["spec"]["replicas"], 3);
    assert_eq!(deploy["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"], "eu-1");
    let us = objects("us-1");
    assert_eq!(us.len(), 1);
    assert_eq!(us[0]["metadata"]["name"], "web");
    assert_eq!(us[0]["spec"]["replicas"], 1);
    // eu-1 and eu-2 differ by ${cluster.name}; two builds (base, eu overlay) serve three clusters.
    assert_eq!(r.stats.tool_runs, 2);
    assert_eq!(r.stats.renders, 3);
}

#[test]
fn a_kustomize_build_error_names_the_app_and_the_problem() {
    let mut t = overlay_fleet();
    t.insert("apps/web/overlays/eu/kustomization.yaml".into(), b"resources: [../../base, missing.yaml]\n".to_vec());
    let r = render_fleet(&parse(&t), &tools(), &mut RenderCache::default());
    let e = r.clusters["eu-1"]["web"].as_ref().unwrap_err().to_string();
    assert!(e.starts_with("apps/web: kustomize build overlays/eu failed: "), "{e}");
    assert!(e.contains("missing.yaml"), "{e}");
    assert!(!e.contains("flotilla-render-"), "no temporary paths in the message: {e}");
    assert!(r.clusters["us-1"]["web"].is_ok(), "the base still renders for the clusters that use it");
}

#[test]
#[ignore = "needs helm"]
fn helm_charts_render_through_helm() {
    let t = tree(&[
        ("clusters/eu-1.yaml", "labels: {region: eu}\n"),
        (
            "apps/h/app.yaml",
            "namespace: web\nhelm: {chart: chart, values: {greeting: 'hi ${cluster.name}'}}\ntargets: [{selector: {}}]\n",
        ),
        ("apps/h/chart/Chart.yaml", "apiVersion: v2\nname: site\nversion: 0.1.0\n"),
        ("apps/h/chart/values.yaml", "greeting: hello\n"),
        (
            "apps/h/chart/templates/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\n  namespace: {{ .Release.Namespace }}\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
        ),
    ]);
    let tools = SystemTools::detect();
    assert!(tools.has_helm(), "helm is not installed: https://helm.sh/docs/intro/install/");
    let r = render_fleet(&parse(&t), &tools, &mut RenderCache::default());
    let objs = Bundle::parse(&r.clusters["eu-1"]["h"].as_ref().unwrap().bytes).unwrap();
    assert_eq!(objs[0]["metadata"]["name"], "h");
    assert_eq!(objs[0]["metadata"]["namespace"], "web");
    assert_eq!(objs[0]["data"]["greeting"], "hi eu-1");
}

/// The files of a fixture directory as `apps/<app>/…`.
fn fixture_app(dir: &str, app: &str) -> Tree {
    fn walk(root: &std::path::Path, dir: &std::path::Path, prefix: &str, out: &mut Tree) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, prefix, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
                out.insert(format!("{prefix}{rel}"), std::fs::read(&p).unwrap());
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(dir);
    let mut out = Tree::new();
    walk(&root, &root, &format!("apps/{app}/"), &mut out);
    out
}

#[test]
fn a_multi_cluster_kustomize_layout_ports_without_edits() {
    let mut t = fixture_app("multi-cluster-kustomize", "guestbook");
    for (c, env) in [("dev-1", "dev"), ("test-1", "test"), ("prod-1", "prod"), ("prod-2", "prod")] {
        t.insert(format!("clusters/{c}.yaml"), format!("labels: {{env: {env}}}\n").into_bytes());
    }
    let r = render_fleet(&parse(&t), &tools(), &mut RenderCache::default());
    let replicas = |c: &str| {
        let b = r.clusters[c]["guestbook"].as_ref().unwrap_or_else(|e| panic!("{c}: {e}"));
        let objects = Bundle::parse(&b.bytes).unwrap();
        assert_eq!(objects.len(), 4, "{c}: two Deployments, two Services");
        let f = objects.iter().find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "frontend").unwrap();
        assert_eq!(f["metadata"]["namespace"], "fleet-mc-kustomize-example");
        f["spec"]["replicas"].as_i64().unwrap()
    };
    assert_eq!([replicas("dev-1"), replicas("test-1"), replicas("prod-1")], [1, 2, 3]);
    assert_eq!(
        r.clusters["prod-1"]["guestbook"].as_ref().unwrap().digest,
        r.clusters["prod-2"]["guestbook"].as_ref().unwrap().digest
    );
    assert_eq!(r.stats.tool_runs, 3, "one build per overlay: {:?}", r.stats);
}
