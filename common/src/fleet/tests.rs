//! The fleet model and rendering, with the external tools replaced by a recording fake.

use super::render::{render_fleet, HelmInvocation, RenderCache, Rendered, Tools};
use super::*;
use std::sync::Mutex;

fn tree(files: &[(&str, &str)]) -> Tree {
    files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect()
}

/// kustomize: concatenates the YAML files of the directory (except the kustomization) and of `../base`;
/// helm: one ConfigMap carrying the invocation. Calls are recorded.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    fail_kustomize: Option<String>,
}

impl Tools for Fake {
    fn kustomize(&self, files: &Tree, dir: &str, _network: bool) -> Result<String, String> {
        self.calls.lock().unwrap().push(format!("kustomize {dir}"));
        if let Some(e) = &self.fail_kustomize {
            return Err(e.clone());
        }
        let base = dir
            .rsplit_once('/')
            .map_or(String::new(), |(p, _)| p.rsplit_once('/').map_or("base".into(), |(q, _)| format!("{q}/base")));
        let mut out = String::new();
        for d in [dir.to_string(), base] {
            for (p, c) in files.range(format!("{d}/")..).take_while(|(p, _)| p.starts_with(&format!("{d}/"))) {
                if !p.ends_with("kustomization.yaml") && p[d.len() + 1..].split('/').count() == 1 {
                    out.push_str("---\n");
                    out.push_str(std::str::from_utf8(c).unwrap());
                }
            }
        }
        Ok(out)
    }

    fn helm_template(&self, _files: &Tree, h: &HelmInvocation) -> Result<String, String> {
        self.calls.lock().unwrap().push(format!("helm {} {} {}", h.release, h.namespace, h.chart));
        let data = serde_json::json!({"values": h.values_yaml});
        Ok(format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {}-values}}\ndata: {data}\n", h.release))
    }
}

fn render(t: &Tree) -> Rendered {
    render_fleet(&parse(t), &Fake::default(), &mut RenderCache::default())
}

fn objects(r: &Rendered, cluster: &str, app: &str) -> Vec<serde_json::Value> {
    let b = r.clusters[cluster][app].as_ref().unwrap_or_else(|e| panic!("{cluster}/{app}: {e}"));
    Bundle::parse(&b.bytes).unwrap()
}

fn err(r: &Rendered, cluster: &str, app: &str) -> String {
    r.clusters[cluster][app].as_ref().expect_err("an error").to_string()
}

const WEB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";

fn example() -> Tree {
    tree(&[
        ("clusters/eu-1.yaml", "labels: {region: eu, tier: prod}\n"),
        ("clusters/us-1.yaml", "labels: {region: us, tier: prod}\n"),
        ("clusters/lab.yaml", "labels: {tier: dev}\n"),
        ("apps/shop/app.yaml", "namespace: shop\ntargets:\n- selector: {matchLabels: {tier: prod}}\n"),
        ("apps/shop/web.yaml", WEB),
        ("apps/shop/README.md", "not a manifest"),
        (
            "apps/eu-only/app.yaml",
            "namespace: eu\ntargets:\n- selector:\n    matchExpressions: [{key: region, operator: In, values: [eu]}]\n",
        ),
        ("apps/eu-only/cm.json", r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}"#),
        ("apps/nowhere/app.yaml", "namespace: x\ntargets:\n- selector: {matchLabels: {tier: nope}}\n"),
    ])
}

fn app_names(f: &Fleet, c: &str) -> Vec<String> {
    f.apps_for(c).unwrap().iter().map(|(a, ..)| a.name.clone()).collect()
}

#[test]
fn targeting_by_labels_and_expressions() {
    let f = parse(&example());
    assert!(f.problems() == vec!["apps/nowhere/app.yaml: no target matches any cluster"], "{:?}", f.problems());
    assert_eq!(app_names(&f, "eu-1"), vec!["eu-only", "shop"]);
    assert_eq!(app_names(&f, "us-1"), vec!["shop"]);
    assert!(app_names(&f, "lab").is_empty());
    assert!(f.apps_for("not-in-inventory").is_none(), "a cluster not listed gets nothing");
    assert_eq!(f.untargeted_apps(), vec!["nowhere"]);
}

#[test]
fn bundles_are_canonical_and_ordered() {
    let r = render(&example());
    let objs = objects(&r, "eu-1", "shop");
    assert_eq!(objs[0]["kind"], "Namespace", "namespaces before namespaced objects");
    assert_eq!(objs[1]["metadata"]["namespace"], "shop", "the app's namespace is filled in");
    assert!(objs[0]["metadata"].get("namespace").is_none());
    let digest = r.clusters["eu-1"]["shop"].as_ref().unwrap().digest.clone();
    // The same content in another key order and file layout has the same digest.
    let reordered = "kind: Namespace\nmetadata: {name: shop}\napiVersion: v1\n---\nspec: {replicas: 1}\nmetadata: {name: web, namespace: shop}\nkind: Deployment\napiVersion: apps/v1\n";
    let mut t = example();
    t.insert("apps/shop/web.yaml".into(), reordered.as_bytes().to_vec());
    assert_eq!(render(&t).clusters["us-1"]["shop"].as_ref().unwrap().digest, digest);
    t.insert("apps/shop/web.yaml".into(), WEB.replace("replicas: 1", "replicas: 2").into_bytes());
    assert_ne!(render(&t).clusters["us-1"]["shop"].as_ref().unwrap().digest, digest);
}

#[test]
fn a_broken_manifest_names_file_and_line_and_affects_only_its_app() {
    let mut t = example();
    t.insert(
        "apps/shop/web.yaml".into(),
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ok\n---\napiVersion: v1\nmetadata:\n  name: nokind\n"
            .to_vec(),
    );
    let r = render(&t);
    assert_eq!(err(&r, "eu-1", "shop"), "apps/shop/web.yaml:6: the document has no kind");
    assert!(r.clusters["eu-1"]["eu-only"].is_ok(), "other apps keep flowing");

    t.insert("apps/shop/web.yaml".into(), b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n".to_vec());
    let e = err(&render(&t), "eu-1", "shop");
    assert!(e.starts_with("apps/shop/web.yaml:") && e.contains("while parsing a flow sequence"), "{e}");

    t.insert("apps/shop/web.yaml".into(), b"apiVersion: v1\nkind: ConfigMap\n".to_vec());
    assert_eq!(err(&render(&t), "eu-1", "shop"), "apps/shop/web.yaml:1: the document has no metadata.name");

    t.insert("apps/shop/dup.yaml".into(), b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n".to_vec());
    t.insert("apps/shop/web.yaml".into(), b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n".to_vec());
    assert_eq!(
        err(&render(&t), "eu-1", "shop"),
        "apps/shop/web.yaml:1: ConfigMap shop/x is defined twice in this app (also at apps/shop/dup.yaml:1)"
    );
}

#[test]
fn inventory_and_app_spec_errors_name_file_line_and_field() {
    let mut t = example();
    t.insert("clusters/Bad_Name.yaml".into(), b"labels: {}\n".to_vec());
    t.insert("clusters/eu-2.yaml".into(), b"labels: {region: eu}\nlabel: typo\n".to_vec());
    t.insert(
        "apps/broken/app.yaml".into(),
        b"namespace: x\ntargets:\n- selector:\n    matchExpressions: [{key: a, operator: In}]\n".to_vec(),
    );
    t.insert(
        "apps/badop/app.yaml".into(),
        b"namespace: x\ntargets:\n- selector:\n    matchExpressions:\n    - {key: a, operator: Inn, values: [b]}\n"
            .to_vec(),
    );
    t.insert("apps/typo/app.yaml".into(), b"namespace: x\ntarget: []\n".to_vec());
    t.insert("apps/orphan/cm.yaml".into(), b"kind: ConfigMap\n".to_vec());
    let f = parse(&t);
    let errs = f.problems();
    let has = |s: &str| assert!(errs.iter().any(|e| e.starts_with(s)), "no {s:?} in {errs:#?}");
    has("clusters/Bad_Name.yaml: cluster name");
    has("clusters/eu-2.yaml:2: unknown field `label`, expected one of `labels`, `values`, `disabled`");
    has("apps/broken/app.yaml:4: targets[0].selector.matchExpressions[0]: operator In needs at least one value");
    has("apps/badop/app.yaml:5: targets[0].selector.matchExpressions[0].operator: unknown variant `Inn`");
    has("apps/typo/app.yaml:2: unknown field `target`");
    has("apps/orphan/: app.yaml is missing");
    assert!(!f.clusters.contains_key("eu-2") && f.broken_clusters.contains_key("eu-2"));
}

#[test]
fn values_and_variables_per_cluster() {
    let t = tree(&[
        ("fleet.yaml", "namespace: apps\nvalues: {logLevel: info, replicas: 1}\n"),
        ("clusters/eu-1.yaml", "labels: {region: eu}\nvalues: {replicas: 3}\n"),
        ("clusters/eu-2.yaml", "labels: {region: eu}\nvalues: {replicas: 3}\n"),
        ("clusters/us-1.yaml", "labels: {region: us}\n"),
        ("clusters/us-2.yaml", "labels: {region: us}\nvalues: {logLevel: debug}\n"),
        (
            "apps/web/app.yaml",
            "values: {replicas: 2}\ntargets:\n- name: eu\n  selector: {matchLabels: {region: eu}}\n  values: {greeting: hallo}\n- selector: {}\n  values: {greeting: hello}\n",
        ),
        (
            "apps/web/web.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, labels: {region: '${cluster.labels.region}'}}\nspec:\n  replicas: ${values.replicas}\n  template: {spec: {containers: [{name: web, image: 'web:1', args: ['--log=${values.logLevel}', '--greet=${values.greeting}', '$${NOT_A_VAR}']}]}}\n",
        ),
    ]);
    let r = render(&t);
    let get = |c: &str| objects(&r, c, "web").remove(0);
    let eu1 = get("eu-1");
    assert_eq!(eu1["metadata"]["namespace"], "apps", "fleet.yaml's default namespace");
    assert_eq!(eu1["spec"]["replicas"], 3, "cluster values beat app values; typed substitution");
    assert_eq!(eu1["metadata"]["labels"]["region"], "eu");
    let args = &eu1["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args, &serde_json::json!(["--log=info", "--greet=hallo", "${NOT_A_VAR}"]));
    let us2 = get("us-2");
    assert_eq!(us2["spec"]["replicas"], 2, "app values beat fleet defaults");
    assert_eq!(us2["spec"]["template"]["spec"]["containers"][0]["args"][0], "--log=debug");
    assert_eq!(us2["spec"]["template"]["spec"]["containers"][0]["args"][1], "--greet=hello", "second target");
    // Identical inputs share one render and one digest; the stats count renders versus clusters.
    let d = |c: &str| r.clusters[c]["web"].as_ref().unwrap().digest.clone();
    assert_eq!(d("eu-1"), d("eu-2"));
    assert_ne!(d("eu-1"), d("us-1"));
    assert_ne!(d("us-1"), d("us-2"));
    assert_eq!((r.stats.cluster_apps, r.stats.renders, r.stats.bundles), (4, 3, 3), "{:?}", r.stats);
}

#[test]
fn renders_depend_only_on_the_values_they_read() {
    let mut files = vec![
        ("apps/a/app.yaml", "namespace: a\ntargets: [{selector: {}}]\n"),
        (
            "apps/a/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {region: '${cluster.labels.region}'}\n",
        ),
    ];
    let clusters: Vec<(String, String)> = (0..20)
        .map(|i| {
            (format!("clusters/c-{i}.yaml"), format!("labels: {{region: r{}, n: '{i}'}}\nvalues: {{id: {i}}}\n", i % 2))
        })
        .collect();
    files.extend(clusters.iter().map(|(p, c)| (p.as_str(), c.as_str())));
    let r = render(&tree(&files));
    assert_eq!((r.stats.cluster_apps, r.stats.renders, r.stats.bundles), (20, 2, 2), "{:?}", r.stats);
}

#[test]
fn unknown_and_unset_variables_are_errors_naming_where() {
    let mut t = example();
    t.insert(
        "apps/shop/web.yaml".into(),
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: '${cluster.region}'}\n".to_vec(),
    );
    assert_eq!(
        err(&render(&t), "eu-1", "shop"),
        "apps/shop/web.yaml:1: unknown variable ${cluster.region}: use ${cluster.name}, ${cluster.labels.KEY} or ${values.KEY}, or $${...} for a literal"
    );
    t.insert(
        "apps/shop/web.yaml".into(),
        b"---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: '${values.size}'}\n".to_vec(),
    );
    t.insert("clusters/us-1.yaml".into(), b"labels: {region: us, tier: prod}\nvalues: {size: large}\n".to_vec());
    let r = render(&t);
    assert_eq!(
        err(&r, "eu-1", "shop"),
        "apps/shop/web.yaml:2: ${values.size} is not set: give it a value in clusters/eu-1.yaml, the app, its target or fleet.yaml (cluster eu-1)"
    );
    assert_eq!(objects(&r, "us-1", "shop")[0]["data"]["a"], "large", "the cluster that has the value renders");
}

#[test]
fn two_apps_claiming_one_object_is_an_error_naming_both() {
    let mut t = example();
    t.insert(
        "apps/other/app.yaml".into(),
        b"namespace: shop\ntargets: [{selector: {matchLabels: {region: eu}}}]\n".to_vec(),
    );
    t.insert("apps/other/web.yaml".into(), b"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n".to_vec());
    let r = render(&t);
    let e = "Deployment shop/web is claimed by apps other and shop on cluster eu-1; an object belongs to one app";
    assert_eq!(err(&r, "eu-1", "shop"), e);
    assert_eq!(err(&r, "eu-1", "other"), e);
    assert!(r.clusters["us-1"]["shop"].is_ok(), "no conflict where only one app claims it");
    assert!(r.clusters["eu-1"]["eu-only"].is_ok());
}

fn kustomize_fleet() -> Tree {
    tree(&[
        ("clusters/eu-1.yaml", "labels: {region: eu}\nvalues: {replicas: 3}\n"),
        ("clusters/eu-2.yaml", "labels: {region: eu}\nvalues: {replicas: 4}\n"),
        ("clusters/us-1.yaml", "labels: {region: us}\n"),
        (
            "apps/k/app.yaml",
            "namespace: k\nkustomize: {path: base}\nvalues: {replicas: 1}\ntargets:\n- selector: {matchLabels: {region: eu}}\n  kustomize: {path: overlays/eu}\n- selector: {}\n",
        ),
        ("apps/k/base/kustomization.yaml", "resources: [cm.yaml]\n"),
        ("apps/k/base/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: base}\ndata: {replicas: '${values.replicas}'}\n"),
        ("apps/k/overlays/eu/kustomization.yaml", "resources: [../../base]\n"),
        ("apps/k/overlays/eu/extra.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: 'eu-${cluster.name}'}\n"),
    ])
}

#[test]
fn kustomize_overlays_build_once_per_commit_and_substitute_per_cluster() {
    let fake = Fake::default();
    let mut cache = RenderCache::default();
    let r = render_fleet(&parse(&kustomize_fleet()), &fake, &mut cache);
    let mut calls = fake.calls.lock().unwrap().clone();
    calls.sort();
    assert_eq!(calls, vec!["kustomize base", "kustomize overlays/eu"], "one build per overlay");
    let eu1 = objects(&r, "eu-1", "k");
    assert_eq!(eu1.len(), 2);
    assert_eq!(eu1[1]["metadata"]["name"], "eu-eu-1");
    assert_eq!(eu1[0]["data"]["replicas"], 3);
    assert_eq!(objects(&r, "us-1", "k").len(), 1);
    assert_eq!(objects(&r, "us-1", "k")[0]["data"]["replicas"], 1);
    assert_eq!((r.stats.renders, r.stats.rendered, r.stats.tool_runs), (3, 3, 2));

    // The next commit, with the app unchanged, renders nothing again.
    let again = render_fleet(&parse(&kustomize_fleet()), &fake, &mut cache);
    assert_eq!((again.stats.renders, again.stats.rendered, again.stats.tool_runs), (3, 0, 0));
    assert_eq!(fake.calls.lock().unwrap().len(), 2);
}

#[test]
fn a_kustomize_error_is_the_apps_alone() {
    let mut t = kustomize_fleet();
    t.extend(example());
    let fake =
        Fake { fail_kustomize: Some("accumulating resources: missing.yaml: no such file".into()), ..Fake::default() };
    let r = render_fleet(&parse(&t), &fake, &mut RenderCache::default());
    assert_eq!(
        err(&r, "eu-1", "k"),
        "apps/k: kustomize build overlays/eu failed: accumulating resources: missing.yaml: no such file"
    );
    assert!(r.clusters["eu-1"]["shop"].is_ok());
}

#[test]
fn a_kustomize_overlay_must_exist_and_sources_are_exclusive() {
    let mut t = kustomize_fleet();
    t.insert(
        "apps/k/app.yaml".into(),
        b"namespace: k\nkustomize: {path: base}\ntargets:\n- selector: {}\n  kustomize: {path: overlays/nope}\n"
            .to_vec(),
    );
    assert_eq!(
        parse(&t).apps["k"].spec.as_ref().unwrap_err().to_string(),
        "apps/k/app.yaml:5: targets[0].kustomize.path: apps/k/overlays/nope has no kustomization.yaml"
    );
    t.insert("apps/k/app.yaml".into(), b"namespace: k\nkustomize: {}\nmanifests: {}\n".to_vec());
    assert!(parse(&t).apps["k"].spec.as_ref().unwrap_err().to_string().contains("an app has one source"));
    t.insert("apps/k/app.yaml".into(), b"namespace: k\nmanifests: {path: ../other}\n".to_vec());
    assert!(parse(&t).apps["k"]
        .spec
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("must be a relative path inside apps/k/"));
}

fn helm_fleet() -> Tree {
    tree(&[
        ("clusters/eu-1.yaml", "labels: {region: eu}\nvalues: {domain: eu.example.com}\n"),
        ("clusters/us-1.yaml", "labels: {region: us}\nvalues: {domain: us.example.com}\n"),
        (
            "apps/h/app.yaml",
            "namespace: web\nhelm:\n  chart: chart\n  releaseName: site\n  valuesFiles: [values-prod.yaml]\n  values: {image: {tag: '1.0'}, host: 'www.${values.domain}'}\ntargets:\n- selector: {matchLabels: {region: eu}}\n  helm:\n    valuesFiles: [values-eu.yaml]\n    values: {image: {tag: '1.1'}}\n- selector: {}\n",
        ),
        ("apps/h/chart/Chart.yaml", "apiVersion: v2\nname: site\nversion: 0.1.0\n"),
        ("apps/h/chart/values.yaml", "replicas: 1\n"),
        ("apps/h/chart/templates/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: {{ .Release.Name }}}\n"),
        ("apps/h/values-prod.yaml", "replicas: 2\nimage: {repository: site, tag: '0.9'}\n"),
        ("apps/h/values-eu.yaml", "replicas: 5\n"),
    ])
}

#[test]
fn helm_values_merge_app_target_and_cluster_and_pass_release_and_namespace() {
    let fake = Fake::default();
    let r = render_fleet(&parse(&helm_fleet()), &fake, &mut RenderCache::default());
    let values = |c: &str| -> serde_json::Value {
        let cm = objects(&r, c, "h").remove(0);
        serde_yaml::from_str(cm["data"]["values"].as_str().unwrap()).unwrap()
    };
    assert_eq!(
        values("eu-1"),
        serde_json::json!({"replicas": 5, "image": {"repository": "site", "tag": "1.1"}, "host": "www.eu.example.com"})
    );
    assert_eq!(
        values("us-1"),
        serde_json::json!({"replicas": 2, "image": {"repository": "site", "tag": "1.0"}, "host": "www.us.example.com"})
    );
    assert_eq!(objects(&r, "eu-1", "h")[0]["metadata"]["namespace"], "web");
    let calls = fake.calls.lock().unwrap();
    assert!(calls.iter().all(|c| c == "helm site web chart"), "{calls:?}");
    let inv = HelmInvocation {
        release: "site".into(),
        namespace: "web".into(),
        chart: "chart".into(),
        values_yaml: String::new(),
    };
    assert_eq!(
        inv.args("/tmp/x/chart", "/tmp/x/v.yaml").join(" "),
        "template site /tmp/x/chart --namespace web --values /tmp/x/v.yaml --include-crds --skip-tests"
    );
}

#[test]
fn helm_errors_name_what_is_wrong() {
    let mut t = helm_fleet();
    t.insert("apps/h/app.yaml".into(), b"namespace: web\nhelm: {chart: nochart}\ntargets: [{selector: {}}]\n".to_vec());
    assert_eq!(
        parse(&t).apps["h"].spec.as_ref().unwrap_err().to_string(),
        "apps/h/app.yaml:2: helm.chart: apps/h/nochart has no Chart.yaml"
    );
    t.insert(
        "apps/h/app.yaml".into(),
        b"namespace: web\nhelm:\n  chart: chart\n  valuesFiles: [nope.yaml]\ntargets: [{selector: {}}]\n".to_vec(),
    );
    assert_eq!(
        parse(&t).apps["h"].spec.as_ref().unwrap_err().to_string(),
        "apps/h/app.yaml:4: helm.valuesFiles[0]: apps/h/nope.yaml does not exist"
    );
    t.insert(
        "apps/h/app.yaml".into(),
        b"namespace: web\nhelm: {chart: chart, values: {a: '${values.missing}'}}\ntargets: [{selector: {}}]\n".to_vec(),
    );
    let r = render(&t);
    assert_eq!(
        err(&r, "eu-1", "h"),
        "apps/h/app.yaml: helm.values: ${values.missing} is not set: give it a value in clusters/eu-1.yaml, the app, its target or fleet.yaml (cluster eu-1)"
    );
    let absent = crate::tools::SystemTools::detect().without_helm();
    let r = render_fleet(&parse(&helm_fleet()), &absent, &mut RenderCache::default());
    assert_eq!(
        err(&r, "eu-1", "h"),
        "apps/h: helm template chart failed: helm is not installed: install helm to render Helm charts (https://helm.sh/docs/intro/install/)"
    );
}

#[test]
fn a_broken_fleet_yaml_blocks_every_app() {
    let mut t = example();
    t.insert("fleet.yaml".into(), b"values: {a: 1}\nnamspace: x\n".to_vec());
    let f = parse(&t);
    assert!(f
        .apps
        .values()
        .all(|a| a.spec.as_ref().is_err_and(|e| e.to_string().starts_with("fleet.yaml:2: unknown field `namspace`"))));
}

use proptest::prelude::*;

proptest! {
    /// The digest depends on the objects, not on how they are spread over documents and files.
    #[test]
    fn digest_ignores_document_order(order in Just((0..6).collect::<Vec<usize>>()).prop_shuffle()) {
        let docs: Vec<String> = (0..6).map(|i| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\ndata: {{k: v{i}}}\n")).collect();
        let shuffled: Vec<String> = order.iter().map(|i| docs[*i].clone()).collect();
        let (a, b) = shuffled.split_at(3);
        let mut t1 = example();
        t1.insert("apps/shop/web.yaml".into(), docs.join("---\n").into_bytes());
        let mut t2 = example();
        t2.insert("apps/shop/web.yaml".into(), a.join("---\n").into_bytes());
        t2.insert("apps/shop/more.yaml".into(), b.join("---\n").into_bytes());
        let d = |t: &Tree| render(t).clusters["eu-1"]["shop"].as_ref().unwrap().digest.clone();
        prop_assert_eq!(d(&t1), d(&t2));
    }

    /// Whatever the cluster labels, an app lands exactly on the clusters one of its targets selects, and
    /// rendering twice gives the same result.
    #[test]
    fn targeting_matches_selectors(regions in proptest::collection::vec("[abc]", 1..12)) {
        let mut t = tree(&[
            ("apps/x/app.yaml", "namespace: x\ntargets:\n- selector: {matchExpressions: [{key: r, operator: In, values: [a, b]}]}\n"),
            ("apps/x/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {r: '${cluster.labels.r}'}\n"),
        ]);
        for (i, r) in regions.iter().enumerate() {
            t.insert(format!("clusters/c{i}.yaml"), format!("labels: {{r: {r}}}\n").into_bytes());
        }
        let first = render(&t);
        for (i, r) in regions.iter().enumerate() {
            prop_assert_eq!(first.clusters[&format!("c{i}")].contains_key("x"), r != "c");
        }
        let second = render(&t);
        let digests = |r: &Rendered| r.clusters.iter().map(|(c, a)| (c.clone(), a.get("x").map(|b| b.as_ref().unwrap().digest.clone()))).collect::<Vec<_>>();
        prop_assert_eq!(digests(&first), digests(&second));
    }
}

#[test]
fn the_sync_policy_travels_in_the_bundle() {
    let mut t = example();
    t.insert(
        "apps/shop/app.yaml".into(),
        b"namespace: shop\ntargets: [{selector: {}}]\nsync:\n  prune: false\n  drift: report\n  ignore:\n  - {kind: Deployment, group: apps, paths: [/spec/replicas]}\nhealth:\n- kind: Widget\n  healthy: object.status.ready == true\n".to_vec(),
    );
    let r = render(&t);
    let b = r.clusters["eu-1"]["shop"].as_ref().unwrap();
    let policy = Bundle::policy(&b.bytes).unwrap();
    assert!(!policy.sync.prune);
    assert_eq!(policy.sync.drift, DriftMode::Report);
    assert_eq!(policy.health[0].kind, "Widget");
    let deploy = Bundle::parse(&b.bytes).unwrap().into_iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(policy.ignored_paths(&deploy), vec!["/spec/replicas".parse::<crate::drift::FieldPath>().unwrap()]);
    assert_eq!(Bundle::parse(&b.bytes).unwrap().len(), b.objects, "the header is not an object");
    // A policy change is a new bundle.
    let plain = render(&example());
    assert_ne!(plain.clusters["eu-1"]["shop"].as_ref().unwrap().digest, b.digest);
    let plain = Bundle::policy(&plain.clusters["eu-1"]["shop"].as_ref().unwrap().bytes).unwrap();
    assert_eq!(plain.sync, AppPolicy::default().sync);
    assert_eq!(plain.guard, Some(super::policy::Guard::defaults("flotilla-system")), "the default guard travels too");
}

#[test]
fn sync_policy_errors_name_the_field() {
    let mut t = example();
    let err = |t: &Tree| parse(t).apps["shop"].spec.as_ref().unwrap_err().to_string();
    t.insert("apps/shop/app.yaml".into(), b"namespace: shop\nsync: {drift: fix}\n".to_vec());
    assert!(
        err(&t).starts_with("apps/shop/app.yaml:2: sync.drift: unknown variant `fix`, expected `correct` or `report`"),
        "{}",
        err(&t)
    );
    t.insert(
        "apps/shop/app.yaml".into(),
        b"namespace: shop\nsync:\n  ignore: [{kind: Deployment, paths: [spec.replicas]}]\n".to_vec(),
    );
    assert_eq!(
        err(&t),
        "apps/shop/app.yaml:3: sync.ignore[0].paths[0]: invalid path \"spec.replicas\": a path starts with / (paths \
         look like /spec/replicas or /spec/template/spec/containers[name=web]/image)"
    );
    t.insert(
        "apps/shop/app.yaml".into(),
        b"namespace: shop\nhealth:\n- {kind: Widget, healthy: 'object.status.('}\n".to_vec(),
    );
    assert!(err(&t).starts_with("apps/shop/app.yaml:3: health[0].healthy: invalid CEL"), "{}", err(&t));
}

#[test]
fn rollout_specs_fleet_wide_and_per_app() {
    let mut t = example();
    t.insert("rollout.yaml".into(), b"waves:\n- name: canary\n  selector: {matchLabels: {region: eu}}\n  maxParallel: 1\n- name: rest-of-prod\n  maxParallel: 50%\n".to_vec());
    t.insert(
        "apps/eu-only/app.yaml".into(),
        b"namespace: eu\ntargets: [{selector: {}}]\nrollout:\n  waves: [{name: all, bakeSeconds: 60}]\n".to_vec(),
    );
    let f = parse(&t);
    assert_eq!(f.rollout_for("shop").unwrap().unwrap().waves[0].name, "canary");
    assert_eq!(f.rollout_for("eu-only").unwrap().unwrap().waves[0].bake_seconds, 60, "the app's own waves");

    t.insert("rollout.yaml".into(), b"waves:\n- {name: a, maxParallel: 120%}\n".to_vec());
    let f = parse(&t);
    let e = f.rollout_for("shop").unwrap_err().to_string();
    assert!(e.starts_with("rollout.yaml:2: waves[0]: \"120%\": a percentage cannot be over 100%"), "{e}");
    assert!(f.problems().iter().any(|p| p.starts_with("rollout.yaml:2:")));
    t.insert("rollout.yaml".into(), b"waves:\n- {name: a}\n- {name: b}\n- {name: a}\n".to_vec());
    assert_eq!(
        parse(&t).rollout_for("shop").unwrap_err().to_string(),
        "rollout.yaml:2: waves[2].name: two waves are named \"a\""
    );
    t.insert("rollout.yaml".into(), b"waves:\n- {name: a, bake: 5}\n".to_vec());
    assert!(parse(&t)
        .rollout_for("shop")
        .unwrap_err()
        .to_string()
        .starts_with("rollout.yaml:2: waves[0]: unknown field `bake`"));
    t.insert("apps/shop/app.yaml".into(), b"namespace: shop\nrollout: {waves: [{name: x}, {name: x}]}\n".to_vec());
    assert_eq!(
        parse(&t).apps["shop"].spec.as_ref().unwrap_err().to_string(),
        "apps/shop/app.yaml:2: rollout.waves[1].name: two waves are named \"x\""
    );
}

#[test]
fn a_list_stands_for_its_items() {
    let text = b"apiVersion: v1\nkind: ConfigMapList\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n";
    let objs = super::objects::parse_manifests("apps/x/list.yaml", text).unwrap();
    let names: Vec<&str> = objs.iter().map(|o| o.object["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(objs[1].origin, "apps/x/list.yaml:1");
}

#[test]
fn a_tree_entry_that_would_escape_breaks_only_its_app_and_is_never_written() {
    let mut t = example();
    t.insert("apps/shop/../../../tmp/flotilla-pwned".into(), b"x".to_vec());
    let fleet = parse(&t);
    let e = fleet.apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert!(e.contains("\"../../../tmp/flotilla-pwned\" with a . or .. path component: refused"), "{e}");
    assert!(fleet.apps.values().filter(|a| a.name != "shop").all(|a| a.spec.is_ok()), "other apps keep flowing");
    for bad in ["", "/etc/passwd", "a//b", "a/./b", "a/../b", ".git/config", "x/.GIT/hooks", "x/.git. /y", "a\\b"] {
        assert!(super::unsafe_path(bad).is_some(), "{bad:?}");
    }
    for good in ["a", "a/b.yaml", ".gitignore", "x/..y", "base/.github/x"] {
        assert_eq!(super::unsafe_path(good), None, "{good:?}");
    }
    let mut files = Tree::new();
    files.insert("../escape".into(), b"x".to_vec());
    let e = crate::tools::SystemTools::detect().kustomize(&files, ".", false).unwrap_err();
    assert!(e.contains("refusing to write \"../escape\""), "{e}");
}

#[test]
fn a_file_too_large_or_too_many_files_refuse_only_their_app() {
    let mut t = example();
    t.insert("apps/shop/huge.yaml".into(), super::oversized(200 << 20));
    let fleet = parse(&t);
    let e = fleet.apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert!(e.contains("huge.yaml is 200.0 MiB: files over 8.0 MiB are refused"), "{e}");
    assert!(fleet.apps.values().filter(|a| a.name != "shop").all(|a| a.spec.is_ok()), "other apps keep flowing");
    let mut t = example();
    for i in 0..=super::MAX_APP_FILES {
        t.insert(format!("apps/shop/many/{i}.txt"), Vec::new());
    }
    let e = parse(&t).apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert!(e.contains("files: at most 10000 are read"), "{e}");
}

#[test]
fn an_error_in_a_later_target_points_at_its_own_line() {
    let mut t = example();
    t.insert(
        "apps/shop/app.yaml".into(),
        b"namespace: shop\ntargets:\n- selector: {}\n- selector: {}\n- selector:\n    matchExpressions:\n    - {key: a, operator: In}\n".to_vec(),
    );
    let e = parse(&t).apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert!(e.starts_with("apps/shop/app.yaml:7: targets[2].selector.matchExpressions[0]"), "{e}");
}

#[test]
fn an_unknown_field_in_app_yaml_is_an_error_at_its_line() {
    let mut t = example();
    t.insert("apps/shop/app.yaml".into(), b"namespace: shop\nsync:\n  prune: true\n  prun: false\n".to_vec());
    let e = parse(&t).apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert_eq!(e, "apps/shop/app.yaml:4: sync.prun: unknown field");
}

fn with(files: &[(&str, &str)]) -> Tree {
    let mut t = example();
    for (p, c) in files {
        t.insert(p.to_string(), c.as_bytes().to_vec());
    }
    t
}

const KS_CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: coredns, namespace: kube-system}\n";
const ADMIN: &str = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: mine}\n\
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}\n\
subjects: [{kind: ServiceAccount, name: default, namespace: shop}]\n";

#[test]
fn by_default_an_app_writes_neither_reserved_namespaces_nor_cluster_admin() {
    let r = render(&with(&[("apps/shop/evil.yaml", KS_CM)]));
    let e = err(&r, "eu-1", "shop");
    assert!(
        e.starts_with(
            "apps/shop/evil.yaml:1: ConfigMap kube-system/coredns is refused: namespace kube-system is off limits"
        ),
        "{e}"
    );
    assert!(r.clusters["eu-1"]["eu-only"].is_ok(), "other apps keep flowing");
    let r = render(&with(&[("apps/shop/admin.yaml", ADMIN)]));
    assert!(err(&r, "eu-1", "shop").contains("binds the cluster-admin ClusterRole"), "{}", err(&r, "eu-1", "shop"));
    let r = render(&with(&[("apps/shop/state.yaml", &KS_CM.replace("kube-system", "flotilla-system"))]));
    assert!(err(&r, "eu-1", "shop").contains("namespace flotilla-system is off limits"));
    // The app's own namespace is checked where it is written.
    let t = with(&[("apps/shop/app.yaml", "targets: [{selector: {}}]\nnamespace: kube-system\n")]);
    let e = parse(&t).apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert!(e.starts_with("apps/shop/app.yaml:2: namespace: namespace kube-system is off limits"), "{e}");
}

#[test]
fn a_policy_in_policies_grants_what_the_defaults_refuse_and_narrows_the_rest() {
    let granted = with(&[
        ("apps/shop/evil.yaml", KS_CM),
        ("apps/shop/admin.yaml", ADMIN),
        ("policies/platform.yaml", "apps: [shop]\nnamespaces: [shop, kube-system]\nclusterAdmin: true\n"),
    ]);
    let r = render(&granted);
    assert!(r.clusters["eu-1"]["shop"].is_ok(), "{:?}", r.clusters["eu-1"]["shop"]);
    let narrow = with(&[("policies/shop.yaml", "apps: [shop]\nkinds: {allow: [apps/*]}\nclusterScoped: false\n")]);
    let e = err(&render(&narrow), "eu-1", "shop");
    assert!(
        e.starts_with(
            "apps/shop/web.yaml:8: Namespace shop is refused: kind Namespace is not among the kinds the app's \
                       policy (policies/shop.yaml) allows (apps/*)"
        ),
        "{e}"
    );
    // A policy change renders again, though the app's files did not change.
    let mut cache = RenderCache::default();
    let before = render_fleet(&parse(&example()), &Fake::default(), &mut cache);
    assert!(before.clusters["eu-1"]["shop"].is_ok());
    let after = render_fleet(&parse(&narrow), &Fake::default(), &mut cache);
    assert!(after.clusters["eu-1"]["shop"].is_err(), "the cached render is not reused under a new policy");
}

#[test]
fn another_apps_namespace_is_written_only_when_shared() {
    let cm_in_shop = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: sneaky, namespace: shop}\n";
    let t = with(&[("apps/eu-only/sneaky.yaml", cm_in_shop)]);
    let e = err(&render(&t), "eu-1", "eu-only");
    assert!(e.contains("namespace shop belongs to app shop"), "{e}");
    assert!(render(&t).clusters["eu-1"]["shop"].is_ok(), "the owner is unaffected");
    let shared = with(&[
        ("apps/eu-only/sneaky.yaml", cm_in_shop),
        ("policies/shop.yaml", "apps: [shop]\nshareNamespaceWith: [eu-*]\n"),
    ]);
    assert!(render(&shared).clusters["eu-1"]["eu-only"].is_ok());
}

#[test]
fn broken_or_ambiguous_policies_stop_the_apps_they_might_loosen() {
    let t = with(&[("policies/bad.yaml", "apps: [shop]\nnamespaces:\n- shop\n- 'a[b'\n")]);
    let f = parse(&t);
    for app in ["shop", "eu-only"] {
        let e = f.apps[app].spec.as_ref().unwrap_err().to_string();
        assert!(e.starts_with("policies/bad.yaml:4: namespaces[1]: \"a[b\""), "{e}");
    }
    let t = with(&[("policies/a.yaml", "apps: [shop]\n"), ("policies/b.yaml", "apps: ['sh*']\n")]);
    let e = parse(&t).apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert!(e.contains("named by two policies, policies/a.yaml and policies/b.yaml"), "{e}");
    let t = with(&[("policies/c.yaml", "apps: [shop]\nclusterAdmn: true\n")]);
    assert!(parse(&t).apps["shop"].spec.as_ref().unwrap_err().to_string().contains("unknown field `clusterAdmn`"));
}

const DASHBOARD: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: dash}\ndata: {d: '{\"datasource\": \"${DS_PROMETHEUS}\"}'}\n";

#[test]
fn substitution_can_be_switched_off_per_app_file_and_object() {
    let t = with(&[("apps/shop/dash.yaml", DASHBOARD)]);
    assert!(err(&render(&t), "eu-1", "shop").contains("unknown variable ${DS_PROMETHEUS}"), "on by default");
    let data = |t: &Tree| {
        let o = objects(&render(t), "eu-1", "shop");
        o.iter().find(|o| o["metadata"]["name"] == "dash").unwrap()["data"]["d"].as_str().unwrap().to_string()
    };
    let off = with(&[
        ("apps/shop/dash.yaml", DASHBOARD),
        ("apps/shop/app.yaml", "namespace: shop\nsubstitution: false\ntargets: [{selector: {}}]\n"),
    ]);
    assert_eq!(data(&off), "{\"datasource\": \"${DS_PROMETHEUS}\"}");
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mine}\ndata: {c: '${cluster.name}'}\n";
    let skip = with(&[
        ("apps/shop/dashboards/dash.yaml", DASHBOARD),
        ("apps/shop/mine.yaml", cm),
        ("apps/shop/app.yaml", "namespace: shop\nsubstitution: {skip: ['dashboards/*']}\ntargets: [{selector: {}}]\n"),
    ]);
    assert_eq!(data(&skip), "{\"datasource\": \"${DS_PROMETHEUS}\"}");
    let o = objects(&render(&skip), "eu-1", "shop");
    assert_eq!(o.iter().find(|o| o["metadata"]["name"] == "mine").unwrap()["data"]["c"], "eu-1", "elsewhere it is on");
    let annotated = DASHBOARD
        .replace("metadata: {name: dash}", "metadata: {name: dash, annotations: {flotilla.dev/substitution: 'off'}}");
    assert_eq!(data(&with(&[("apps/shop/dash.yaml", &annotated)])), "{\"datasource\": \"${DS_PROMETHEUS}\"}");
}

#[test]
fn excluded_files_are_not_part_of_the_app() {
    let t = with(&[
        ("apps/shop/app.yaml", "namespace: shop\nexclude: ['docs/**', '**/*_test.yaml']\ntargets: [{selector: {}}]\n"),
        ("apps/shop/docs/example.yaml", "kind: NotAnObject\n"),
        ("apps/shop/a/b/web_test.yaml", "broken: [\n"),
    ]);
    let r = render(&t);
    assert!(r.clusters["eu-1"]["shop"].is_ok(), "{:?}", r.clusters["eu-1"]["shop"]);
    let f = parse(&t);
    assert!(f.apps["shop"].files.keys().all(|k| !k.starts_with("docs/") && !k.ends_with("_test.yaml")));
    // An excluded file does not change the app's content address.
    let mut t2 = t.clone();
    t2.insert("apps/shop/docs/example.yaml".into(), b"changed".to_vec());
    assert_eq!(parse(&t2).apps["shop"].tree_digest, f.apps["shop"].tree_digest);
    let bad = with(&[("apps/shop/app.yaml", "namespace: shop\nexclude: ['a[']\ntargets: [{selector: {}}]\n")]);
    let e = parse(&bad).apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert!(e.starts_with("apps/shop/app.yaml:2: exclude[0]:"), "{e}");
}

#[test]
fn argo_cd_annotations_are_honoured_or_refused_never_ignored() {
    let hook = |annotations: &str| {
        format!("apiVersion: batch/v1\nkind: Job\nmetadata:\n  generateName: before-\n  annotations: {{{annotations}}}\nspec: {{}}\n")
    };
    let one = |a: &str| render(&with(&[("apps/shop/hook.yaml", &hook(a))]));
    let r = one("argocd.argoproj.io/hook: PreSync");
    let jobs: Vec<_> = objects(&r, "eu-1", "shop").into_iter().filter(|o| o["kind"] == "Job").collect();
    let name = jobs[0]["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("before-") && name.len() == "before-".len() + 5, "{name}");
    assert_eq!(
        objects(&one("argocd.argoproj.io/hook: PreSync"), "eu-1", "shop"),
        objects(&r, "eu-1", "shop"),
        "stable"
    );
    assert_eq!(super::objects::wave_of(&jobs[0]).unwrap(), -(1 << 40), "before every wave");
    let skipped = one("argocd.argoproj.io/hook: Skip");
    assert!(objects(&skipped, "eu-1", "shop").iter().all(|o| o["kind"] != "Job"), "Skip is never applied");
    for (a, words) in [
        ("argocd.argoproj.io/hook: SyncFail", "\"SyncFail\" is not supported"),
        ("argocd.argoproj.io/sync-wave: soon", "\"soon\" is not a whole number"),
        ("argocd.argoproj.io/sync-options: Replace=true", "\"Replace=true\" is not supported"),
        ("argocd.argoproj.io/hook-delete-policy: Sometimes", "\"Sometimes\" is not a hook deletion policy"),
    ] {
        let e = err(&one(a), "eu-1", "shop");
        assert!(e.starts_with("apps/shop/hook.yaml:1: ") && e.contains(words), "{a}: {e}");
    }
}
