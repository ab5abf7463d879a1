//! The agent with one app of 5,000 objects (4,000 ConfigMaps, 500 Services, 500 Deployments) against a
//! simulated cluster running in a child process, so the numbers are the agent's own: objects applied per
//! second, time to healthy, then resident memory and CPU while idle, enforcing (watching) all 5,000.
//!
//! `cargo bench -p flotilla-agent --bench agent_scale` (release).

use flotilla_agent::apply::Applier;
use flotilla_agent::engine::{start, DesiredApp, EngineConfig};
use flotilla_common::fleet::render::{render_fleet, RenderCache};
use flotilla_common::fleet::{parse, Tree};
use flotilla_common::tools::SystemTools;
use flotilla_proto::agent::v1 as pb;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const CONFIGMAPS: usize = 4000;
const SERVICES: usize = 500;
const DEPLOYMENTS: usize = 500;

fn proc_status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// User + system CPU time of this process, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn app_tree() -> Tree {
    let mut m = String::new();
    for i in 0..CONFIGMAPS {
        m.push_str(&format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:05}}}\ndata: {{index: '{i}', payload: '{}'}}\n", "x".repeat(200)));
    }
    for i in 0..SERVICES {
        m.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:04}}}\nspec: {{selector: {{app: d-{i:04}}}, ports: [{{port: 80}}]}}\n"));
    }
    for i in 0..DEPLOYMENTS {
        m.push_str(&format!("---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d-{i:04}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: d-{i:04}}}}}\n  template:\n    metadata: {{labels: {{app: d-{i:04}}}}}\n    spec: {{containers: [{{name: main, image: 'app:1'}}]}}\n"));
    }
    [
        ("clusters/c.yaml".to_string(), b"labels: {}\n".to_vec()),
        ("apps/big/app.yaml".to_string(), b"namespace: big\ntargets: [{selector: {}}]\n".to_vec()),
        ("apps/big/objects.yaml".to_string(), m.into_bytes()),
    ]
    .into_iter()
    .collect()
}

/// The child process: renders the bundle and starts a simulator with one cluster; prints the kubeconfig and
/// bundle paths, runs until stdin closes. (Rendering here keeps its memory out of the agent's numbers.)
fn simulator_child() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let cfg = flotilla_sim::SimConfig {
            behaviour: flotilla_sim::Behaviour { ready_after_ms: 100, ..Default::default() },
            ..flotilla_sim::SimConfig::with_clusters(["c"])
        };
        let sim = flotilla_sim::Simulator::start(cfg).await.expect("simulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.kubeconfig");
        std::fs::write(&path, sim.kubeconfig("c")).expect("kubeconfig");
        let r = render_fleet(&parse(&app_tree()), &SystemTools::detect(), &mut RenderCache::default());
        let b = r.clusters["c"]["big"].as_ref().expect("bundle");
        let bundle = dir.path().join("bundle");
        std::fs::write(&bundle, &b.bytes).expect("bundle");
        println!("{} {} {}", path.display(), bundle.display(), b.digest);
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
        sim.shutdown().await;
    });
}

fn main() {
    if std::env::var("FLOTILLA_BENCH_ROLE").as_deref() == Ok("sim") {
        return simulator_child();
    }
    flotilla_common::install_crypto_provider();
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env("FLOTILLA_BENCH_ROLE", "sim")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("simulator child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("kubeconfig path");
    let mut parts = line.split_whitespace();
    let (kubeconfig, bundle_path, digest) = (
        parts.next().expect("kubeconfig").to_string(),
        parts.next().expect("bundle").to_string(),
        parts.next().expect("digest").to_string(),
    );

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let bytes = std::fs::read(&bundle_path).expect("bundle");
        let objects = flotilla_common::fleet::Bundle::parse(&bytes).expect("bundle").len();
        let desired = DesiredApp { app: "big".into(), digest, revision: "r1".into(), bundle: Some(Arc::new(bytes)), traceparent: String::new() };
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        let client = flotilla_agent::kube_client::client(cfg).expect("client");
        let shutdown = CancellationToken::new();
        let before = proc_status("VmRSS:");
        let applier = Arc::new(Applier::new(client));
        let engine = start(applier.clone(), EngineConfig::default(), shutdown.clone()).await.expect("engine");
        let statuses = engine.statuses();
        let t0 = Instant::now();
        engine.set_desired(vec![desired]).await.expect("desired");
        let mut applied_at = None;
        let healthy_at = loop {
            let s = statuses.borrow().get("big").cloned().unwrap_or_default();
            if applied_at.is_none() && s.phase == pb::Phase::Applied as i32 {
                applied_at = Some(t0.elapsed());
            }
            if s.phase == pb::Phase::Applied as i32 && s.health == pb::Health::Healthy as i32 && s.ready as usize == objects {
                break t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(600) {
                panic!("not healthy after 10 minutes: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let applied = applied_at.unwrap_or(healthy_at);
        println!("agent_scale: one app of {objects} objects ({CONFIGMAPS} ConfigMaps, {SERVICES} Services, {DEPLOYMENTS} Deployments), 8 API calls in flight");
        println!("  applied in {:.2?} = {:.0} objects/s; all healthy after {:.2?}", applied, objects as f64 / applied.as_secs_f64(), healthy_at);
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "  API calls until healthy: {} applies, {} dry-run applies (drift checks), {} other",
            n(&applier.calls.applies),
            n(&applier.calls.dry_runs),
            n(&applier.calls.other)
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (c0, t) = (cpu_ticks(), Instant::now());
        tokio::time::sleep(Duration::from_secs(20)).await;
        let ticks_per_s = 100.0;
        let cpu = (cpu_ticks() - c0) as f64 / ticks_per_s / t.elapsed().as_secs_f64() * 100.0;
        let rss = proc_status("VmRSS:");
        let s = statuses.borrow().get("big").cloned().unwrap_or_default();
        println!(
            "  idle, enforcing {} objects: resident {:.1} MiB (the process started at {:.1} MiB), CPU {:.2}% over 20 s; drifted {}, missing {}",
            s.objects,
            rss as f64 / 1024.0,
            before as f64 / 1024.0,
            cpu,
            s.drifted,
            s.missing
        );
        shutdown.cancel();
        // A restarted agent checks every object's drift once, by a server-side dry-run of its apply.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        let applier = Arc::new(Applier::new(flotilla_agent::kube_client::client(cfg).expect("client")));
        let second = CancellationToken::new();
        let t1 = Instant::now();
        let engine = start(applier.clone(), EngineConfig::default(), second.clone()).await.expect("engine");
        let statuses = engine.statuses();
        loop {
            let checked = applier.calls.dry_runs.load(std::sync::atomic::Ordering::Relaxed) as usize;
            let s = statuses.borrow().get("big").cloned().unwrap_or_default();
            if checked >= objects && s.health == pb::Health::Healthy as i32 && s.ready as usize == objects {
                break;
            }
            if t1.elapsed() > Duration::from_secs(300) {
                panic!("the restarted agent did not check every object in 5 minutes: {checked} checked, {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = statuses.borrow().get("big").cloned().unwrap_or_default();
        println!(
            "  restarted agent: drift of all {objects} objects checked by dry-run in {:.2?} ({} dry-runs, {} applies); drifted {}",
            t1.elapsed(),
            applier.calls.dry_runs.load(std::sync::atomic::Ordering::Relaxed),
            applier.calls.applies.load(std::sync::atomic::Ordering::Relaxed),
            s.drifted
        );
        second.cancel();
    });
    drop(child.stdin.take());
    let _ = child.wait();
}
