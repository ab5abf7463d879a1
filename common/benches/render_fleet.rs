//! Rendering a commit for a large fleet: 10,000 clusters, 20 apps (10 plain, 10 Kustomize with an
//! overlay), 10 distinct value sets (one per region). Prints the time to render the commit, the number of
//! renders and tool runs, the same Kustomize build run by kubectl alone, and a second commit that changes one
//! app (the others come from the render cache).
//!
//! `cargo bench -p flotilla-common --bench render_fleet` (release). Needs kubectl (or kustomize).

use flotilla_common::fleet::render::{render_fleet, RenderCache};
use flotilla_common::fleet::{parse, Tree};
use flotilla_common::tools::{run, SystemTools};
use std::process::Command;
use std::time::{Duration, Instant};

const CLUSTERS: usize = 10_000;
const APPS: usize = 20;
const VALUE_SETS: usize = 10;

fn fleet(version: &str) -> Tree {
    let mut t = Tree::new();
    let mut put = |p: String, c: String| {
        t.insert(p, c.into_bytes());
    };
    put("fleet.yaml".into(), "values: {logLevel: info}\n".into());
    for i in 0..CLUSTERS {
        let region = i % VALUE_SETS;
        put(
            format!("clusters/c-{i:05}.yaml"),
            format!(
                "labels: {{region: r{region}, tier: prod}}\nvalues: {{replicas: {}, domain: r{region}.example.com}}\n",
                2 + region % 3
            ),
        );
    }
    for a in 0..APPS {
        let app = format!("app-{a:02}");
        let deploy = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {app}}}\nspec:\n  replicas: ${{values.replicas}}\n  selector: {{matchLabels: {{app: {app}}}}}\n  template:\n    metadata: {{labels: {{app: {app}}}}}\n    spec:\n      containers:\n      - name: main\n        image: registry.example.com/{app}:{version}\n        args: ['--log=${{values.logLevel}}', '--host={app}.${{values.domain}}', '--region=${{cluster.labels.region}}']\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {app}}}\nspec: {{selector: {{app: {app}}}, ports: [{{port: 80}}]}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {app}-settings}}\ndata: {{region: '${{cluster.labels.region}}', owner: team-{a}}}\n"
        );
        if a % 2 == 0 {
            put(
                format!("apps/{app}/app.yaml"),
                format!("namespace: {app}\ntargets: [{{selector: {{matchLabels: {{tier: prod}}}}}}]\n"),
            );
            put(format!("apps/{app}/manifests.yaml"), deploy);
        } else {
            put(
                format!("apps/{app}/app.yaml"),
                format!("namespace: {app}\nkustomize: {{path: overlays/prod}}\ntargets: [{{selector: {{matchLabels: {{tier: prod}}}}}}]\n"),
            );
            put(
                format!("apps/{app}/base/kustomization.yaml"),
                "resources: [app.yaml]\nlabels:\n- pairs: {team: platform}\n".into(),
            );
            put(format!("apps/{app}/base/app.yaml"), deploy);
            put(
                format!("apps/{app}/overlays/prod/kustomization.yaml"),
                "resources: [../../base]\ncommonAnnotations: {tier: prod}\nconfigMapGenerator:\n- name: overlay\n  literals: [tier=prod]\n".into(),
            );
        }
    }
    t
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) * 1024)
        })
        .unwrap_or(0)
}

fn main() {
    let tools = SystemTools::detect();
    let program = tools
        .kustomize_program()
        .expect("kubectl or kustomize is needed: https://kubernetes.io/docs/tasks/tools/")
        .to_path_buf();
    println!("render_fleet: {CLUSTERS} clusters, {APPS} apps ({} Kustomize), {VALUE_SETS} value sets", APPS / 2);

    let t0 = Instant::now();
    let tree = fleet("1.0");
    let built = t0.elapsed();
    let before = rss();
    let t1 = Instant::now();
    let parsed = parse(&tree);
    let parse_time = t1.elapsed();
    let mut cache = RenderCache::default();
    let t2 = Instant::now();
    let r = render_fleet(&parsed, &tools, &mut cache);
    let render_time = t2.elapsed();
    let errors: usize = r.clusters.values().flat_map(|a| a.values()).filter(|x| x.is_err()).count();
    assert_eq!(errors, 0, "the benchmark fleet renders cleanly");
    let s = r.stats;
    println!("  repository: {} files, generated in {:.2?}", tree.len(), built);
    println!(
        "  first commit: parse {:.2?} + render {:.2?} = {:.2?}",
        parse_time,
        render_time,
        parse_time + render_time
    );
    println!(
        "    {} cluster apps from {} renders ({} kustomize runs), {} distinct bundles; {:.1} MiB more resident",
        s.cluster_apps,
        s.renders,
        s.tool_runs,
        s.bundles,
        mib(rss().saturating_sub(before))
    );

    // The same Kustomize build, by kubectl alone.
    let dir = tempfile::tempdir().expect("tempdir");
    for (p, c) in tree.range("apps/app-01/".to_string()..).take_while(|(p, _)| p.starts_with("apps/app-01/")) {
        let path = dir.path().join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, c).expect("write");
    }
    let runs = 5;
    let mut alone = Duration::ZERO;
    for _ in 0..runs {
        let mut cmd = Command::new(&program);
        if program.ends_with("kubectl") {
            cmd.arg("kustomize");
        } else {
            cmd.arg("build");
        }
        cmd.arg(dir.path().join("apps/app-01/overlays/prod"));
        let t = Instant::now();
        run(cmd, Duration::from_secs(60)).expect("kustomize build");
        alone += t.elapsed();
    }
    let one = alone / runs;
    println!(
        "  {} alone, one build of the same overlay: {:.2?} (x{} builds = {:.2?}; the render above ran {} builds for {} cluster apps)",
        program.file_name().and_then(|n| n.to_str()).unwrap_or("kustomize"),
        one,
        s.tool_runs,
        one * s.tool_runs as u32,
        s.tool_runs,
        s.cluster_apps
    );

    // A second commit that changes one Kustomize app: the rest comes from the cache.
    let mut next = tree.clone();
    let base = "apps/app-03/base/app.yaml".to_string();
    let changed = String::from_utf8(next[&base].clone()).expect("utf8").replace(":1.0", ":1.1");
    next.insert(base, changed.into_bytes());
    let t3 = Instant::now();
    let parsed = parse(&next);
    let r2 = render_fleet(&parsed, &tools, &mut cache);
    let s2 = r2.stats;
    println!(
        "  second commit (one app changed): {:.2?}; {} renders, {} rendered now, {} kustomize runs",
        t3.elapsed(),
        s2.renders,
        s2.rendered,
        s2.tool_runs
    );
}
