//! A bounded fuzz run of the fleet repository reader and renderer: random repositories (hostile paths, broken
//! and hostile YAML, deep nesting, alias chains, policies, kustomizations with remote references) through
//! `parse` and `render_fleet` never panic and stay bounded. Runs in the suite with a fixed number of cases;
//! `FLOTILLA_FUZZ_CASES=100000` runs longer. Each run prints its executions and time.

use flotilla_common::fleet::render::{render_fleet, HelmInvocation, RenderCache, Tools};
use flotilla_common::fleet::{kustomize, parse, Tree};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::time::Instant;

/// Tools that never run a process: kustomize "builds" by concatenating the files it was given.
struct Echo;

impl Tools for Echo {
    fn kustomize(&self, files: &Tree, dir: &str, _network: bool) -> Result<String, String> {
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let out: Vec<String> = files
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix) && p.ends_with(".yaml") && !p.ends_with("kustomization.yaml"))
            .map(|(_, c)| String::from_utf8_lossy(c).to_string())
            .collect();
        Ok(out.join("\n---\n"))
    }

    fn helm_template(&self, _files: &Tree, helm: &HelmInvocation) -> Result<String, String> {
        Ok(format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {}}}\n", helm.release))
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("FLOTILLA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn path_part() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just(".git".to_string()),
        Just(String::new()),
        Just("base".to_string()),
        Just("overlays".to_string()),
        "[a-z]{1,6}",
        "[a-zA-Z0-9._\\-]{1,10}",
    ]
}

fn file_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("app.yaml".to_string()),
        Just("kustomization.yaml".to_string()),
        Just("values.yaml".to_string()),
        Just("Chart.yaml".to_string()),
        "[a-z]{1,5}\\.(yaml|yml|json)",
    ]
}

fn yaml_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {k: '${cluster.name}'}\n".to_string()),
        Just("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: kube-system}\nspec: {replicas: ${values.r}}\n".to_string()),
        Just("namespace: shop\ntargets: [{selector: {}}]\n".to_string()),
        Just("namespace: shop\nkustomize: {path: base, include: ['../../shared']}\ntargets: [{selector: {matchLabels: {a: b}}}]\nsync: {adopt: true}\n".to_string()),
        Just("namespace: shop\nhelm: {chart: .}\nsubstitution: {skip: ['*']}\nexclude: ['**/x']\ntargets: [{selector: {}}]\n".to_string()),
        Just("resources: ['https://127.0.0.1:1/x.yaml', '../../../../etc', github.com/a/b]\nhelmCharts: [{name: x}]\n".to_string()),
        Just("apps: ['*']\nnamespaces: ['[']\nclusterAdmin: true\n".to_string()),
        Just("labels: {tier: prod}\nvalues: {r: 3}\n".to_string()),
        Just("a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\nd: [*c, *c, *c, *c]\n".to_string()),
        Just("kind: List\nitems: [{apiVersion: v1, kind: ConfigMap, metadata: {name: l}}]\n".to_string()),
        Just("metadata:\n  annotations:\n    argocd.argoproj.io/hook: PreSync\n  generateName: x-\n".to_string()),
        Just("<<: *nope\n".to_string()),
        Just("a: 1\na: 2\n".to_string()),
        Just("{".to_string()),
        Just("\t- : :\n".to_string()),
        (1usize..3000).prop_map(|n| format!("{}x{}", "[".repeat(n), "]".repeat(n))),
        (1usize..3000).prop_map(|n| (0..n).map(|i| format!("{}k: \n", " ".repeat(i))).collect()),
        ".{0,200}",
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| String::from_utf8_lossy(&b).to_string()),
    ]
}

fn repository() -> impl Strategy<Value = Tree> {
    let entry = (
        prop_oneof![Just("apps"), Just("clusters"), Just("policies"), Just("shared"), Just("")],
        proptest::collection::vec(path_part(), 0..4),
        file_name(),
        proptest::collection::vec(yaml_piece(), 1..4),
    )
        .prop_map(|(top, parts, name, pieces)| {
            let mut p: Vec<String> = if top.is_empty() { vec![] } else { vec![top.to_string()] };
            p.extend(parts);
            p.push(name);
            (p.join("/"), pieces.join("\n---\n").into_bytes())
        });
    proptest::collection::btree_map(any::<u8>(), entry, 0..12).prop_map(|m| {
        let mut t: Tree = m.into_values().collect();
        t.insert("clusters/c.yaml".into(), b"labels: {a: b}\nvalues: {r: 1}\n".to_vec());
        t.insert("fleet.yaml".into(), b"namespace: default-ns\n".to_vec());
        t
    })
}

#[test]
fn random_repositories_never_panic_the_reader_or_the_renderer() {
    let n = cases(1500);
    let started = Instant::now();
    let mut runner = TestRunner::new(Config { cases: n, failure_persistence: None, ..Config::default() });
    runner
        .run(&repository(), |tree| {
            let fleet = parse(&tree);
            let rendered = render_fleet(&fleet, &Echo, &mut RenderCache::default());
            // Every cluster of the inventory has an answer for every app it receives: a bundle or an error.
            for (cluster, apps) in &rendered.clusters {
                prop_assert!(fleet.clusters.contains_key(cluster));
                for b in apps.values().flatten() {
                    prop_assert_eq!(b.ids.len(), b.objects);
                }
            }
            let _ = fleet.problems();
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz: {n} random repositories read and rendered in {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn random_text_never_panics_the_yaml_reader_or_the_kustomization_check() {
    let n = cases(3000);
    let started = Instant::now();
    let mut runner = TestRunner::new(Config { cases: n, failure_persistence: None, ..Config::default() });
    runner
        .run(&proptest::collection::vec(yaml_piece(), 1..6), |pieces| {
            let text = pieces.join("\n");
            let _ = flotilla_common::yaml::parse_documents(&text);
            let mut t = Tree::new();
            t.insert("a/kustomization.yaml".into(), text.into_bytes());
            let _ = kustomize::check(&t, &[]);
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz: {n} random YAML texts read in {:.1} s", started.elapsed().as_secs_f64());
}
