//! Scale benchmark for the simulator; prints numbers, asserts nothing.
//!
//! `cargo bench -p flotilla-sim --bench sim_scale [-- --idle 10000 --loaded 1000 --objects 50 --requests 20000]`
//!
//! 1. memory per idle cluster: resident memory added by `--idle` clusters, divided by their number;
//! 2. memory of `--loaded` clusters holding `--objects` objects each (a third each ConfigMaps, Deployments,
//!    Services), written through the same server-side apply path the HTTP API uses;
//! 3. server-side apply requests per second over plain HTTP/1.1, from concurrent keep-alive connections;
//! 4. the same over HTTPS and HTTP/2 as an agent sends them: one client per cluster (the agent's kube
//!    client), each multiplexing its requests over its one connection.

use bytes::Bytes;
use flotilla_sim::{ops, Behaviour, SimConfig, Simulator};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn object(i: usize) -> (&'static str, serde_json::Value) {
    match i % 3 {
        0 => (
            "ConfigMap",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("cfg-{i}"), "namespace": "default", "labels": {"app": format!("app-{i}")}},
                   "data": {"config.yaml": "log_level: info\nfeature_flags: [a, b, c]\n", "region": "eu-west"}}),
        ),
        1 => (
            "Deployment",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": format!("web-{i}"), "namespace": "default", "labels": {"app": format!("app-{i}")}},
                   "spec": {"replicas": 2, "selector": {"matchLabels": {"app": format!("app-{i}")}},
                            "template": {"metadata": {"labels": {"app": format!("app-{i}")}},
                                         "spec": {"containers": [{"name": "web", "image": "registry.example/web:1.2.3", "ports": [{"containerPort": 8080}],
                                                                  "env": [{"name": "MODE", "value": "production"}],
                                                                  "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}}}}),
        ),
        _ => (
            "Service",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc-{i}"), "namespace": "default", "labels": {"app": format!("app-{i}")}},
                   "spec": {"selector": {"app": format!("app-{i}")}, "ports": [{"port": 80, "targetPort": 8080}]}}),
        ),
    }
}

async fn idle(n: usize) {
    // The schemas are built once per process, not per cluster.
    let _ = flotilla_sim::openapi::catalogue();
    let base = rss_bytes();
    let t = Instant::now();
    let sim = Simulator::start(SimConfig { clusters: SimConfig::numbered("idle-", n), ..SimConfig::default() })
        .await
        .expect("start");
    let took = t.elapsed();
    let used = rss_bytes().saturating_sub(base);
    println!(
        "idle clusters: {n} in {:.2}s; resident memory +{:.1} MiB = {:.1} KiB per cluster",
        took.as_secs_f64(),
        mib(used),
        used as f64 / 1024.0 / n as f64
    );
    sim.shutdown().await;
}

async fn loaded(n: usize, objects: usize) {
    let base = rss_bytes();
    let behaviour = Behaviour { ready_after_ms: 10, ..Behaviour::default() };
    let sim =
        Simulator::start(SimConfig { clusters: SimConfig::numbered("busy-", n), behaviour, ..SimConfig::default() })
            .await
            .expect("start");
    let defs = &sim.inner().builtins;
    let def = |kind: &str| defs.iter().find(|d| d.kind == kind).cloned().expect("kind");
    let opts = ops::WriteOpts { dry_run: false, field_manager: "bench".into(), ..Default::default() };
    let t = Instant::now();
    for name in sim.cluster_names() {
        let c = sim.cluster(&name).expect("cluster");
        for i in 0..objects {
            let (kind, obj) = object(i);
            let body = serde_json::to_vec(&obj).expect("json");
            let oname = obj["metadata"]["name"].as_str().expect("name").to_string();
            ops::patch(&c, &def(kind), Some("default"), &oname, ops::PatchType::Apply, &body, ops::Sub::Main, &opts)
                .expect("apply");
        }
    }
    let took = t.elapsed();
    // Let the simulated controllers finish their status updates.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let used = rss_bytes().saturating_sub(base);
    let total = n * objects;
    println!(
        "loaded clusters: {n} x {objects} objects ({total} applies in-process in {:.2}s = {:.0}/s); resident memory +{:.1} MiB = {:.1} KiB per cluster, {:.2} KiB per object",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        mib(used),
        used as f64 / 1024.0 / n as f64,
        used as f64 / 1024.0 / total as f64
    );
    sim.shutdown().await;
}

/// The i-th server-side apply of the rate benchmarks: its path in the cluster and its object. Every fourth
/// request changes the object; the rest are no-op re-applies, as a steady fleet sees.
fn apply_request(i: usize, clusters: usize) -> (String, serde_json::Value) {
    let (kind, mut obj) = object(i / clusters % 30);
    if i.is_multiple_of(4) {
        obj["metadata"]["annotations"] = json!({"rev": i.to_string()});
    }
    let name = obj["metadata"]["name"].as_str().expect("name").to_string();
    let path = match kind {
        "Deployment" => format!("/apis/apps/v1/namespaces/default/deployments/{name}"),
        "Service" => format!("/api/v1/namespaces/default/services/{name}"),
        _ => format!("/api/v1/namespaces/default/configmaps/{name}"),
    };
    (path, obj)
}

/// Sends requests 0..`requests` through `send` (true when answered with success), `concurrency` at a time;
/// returns the time taken and the number of failures.
async fn drive<F, Fut>(requests: usize, concurrency: usize, send: F) -> (f64, usize)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (send, next, errors) = (send.clone(), next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                if !send(i).await {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    (t.elapsed().as_secs_f64(), errors.load(std::sync::atomic::Ordering::Relaxed))
}

async fn apply_rate(requests: usize, concurrency: usize) {
    let clusters = 100;
    let sim = Simulator::start(SimConfig { clusters: SimConfig::numbered("rate-", clusters), ..SimConfig::default() })
        .await
        .expect("start");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let addr = sim.addr();
    let (took, errors) = drive(requests, concurrency, move |i| {
        let client = client.clone();
        async move {
            let (path, obj) = apply_request(i, clusters);
            let uri =
                format!("http://{addr}/clusters/rate-{:03}{path}?fieldManager=bench&force=true", i % clusters + 1);
            let req = http::Request::patch(uri)
                .header("content-type", "application/apply-patch+yaml")
                .body(Full::new(Bytes::from(serde_json::to_vec(&obj).expect("json"))))
                .expect("request");
            match client.request(req).await {
                Ok(resp) => {
                    let ok = resp.status().is_success();
                    let _ = resp.into_body().collect().await;
                    ok
                }
                Err(_) => false,
            }
        }
    })
    .await;
    println!(
        "server-side apply over HTTP: {requests} requests from {concurrency} connections to {clusters} clusters in {took:.2}s = {:.0} requests/s ({errors} errors)",
        requests as f64 / took
    );
    sim.shutdown().await;
}

async fn apply_rate_h2(requests: usize, concurrency: usize) {
    flotilla_common::install_crypto_provider();
    let clusters = 100;
    let sim = Simulator::start(SimConfig { clusters: SimConfig::numbered("h2-", clusters), ..SimConfig::default() })
        .await
        .expect("start");
    let mut kube_clients = Vec::new();
    for name in sim.cluster_names() {
        let kc = kube::config::Kubeconfig::from_yaml(&sim.kubeconfig(&name)).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        kube_clients.push(flotilla_agent::kube_client::client(cfg).expect("client"));
    }
    let kube_clients = Arc::new(kube_clients);
    let (took, errors) = drive(requests, concurrency, move |i| {
        let kube_clients = kube_clients.clone();
        async move {
            let (path, obj) = apply_request(i, clusters);
            let req = http::Request::patch(format!("{path}?fieldManager=bench&force=true"))
                .header("content-type", "application/apply-patch+yaml")
                .body(serde_json::to_vec(&obj).expect("json"))
                .expect("request");
            kube_clients[i % clusters].request_text(req).await.is_ok()
        }
    })
    .await;
    let open = sim.inner().connections.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "server-side apply over HTTPS/HTTP/2: {requests} requests, {concurrency} at a time, from {clusters} clients to {clusters} clusters over {open} connections in {took:.2}s = {:.0} requests/s ({errors} errors)",
        requests as f64 / took
    );
    sim.shutdown().await;
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo's bench discovery probe
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!("flotilla-sim scale benchmark ({} cores)", std::thread::available_parallelism().map_or(1, |n| n.get()));
    rt.block_on(idle(arg("--idle", 10_000)));
    rt.block_on(loaded(arg("--loaded", 1_000), arg("--objects", 50)));
    rt.block_on(apply_rate(arg("--requests", 20_000), arg("--concurrency", 16)));
    rt.block_on(apply_rate_h2(arg("--requests", 20_000), arg("--concurrency", 16)));
}
