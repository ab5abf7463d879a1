//! The hub at fleet scale: 2,000 and 10,000 clusters, five waves (no bake), one commit. Prints the time from
//! the commit to the last wave complete, and the hub's resident memory per connected agent.
//!
//! The hub runs in a child process (its memory is measured alone); the agents are protocol-level stand-ins
//! in this process: each holds a real mutually authenticated session with its own certificate and reports
//! every desired app as applied and healthy at once, so the numbers are the hub's (Git, rendering, rollout
//! planning, sessions), not the clusters'.
//!
//! `cargo bench -p flotilla-hub --bench rollout_scale` (release).

use flotilla_proto::agent::v1 as pb;
use flotilla_proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use flotilla_proto::platform::v1::{ListClustersRequest, ListRolloutsRequest, RefreshRequest};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const WAVES: &str = "waves:\n- {name: w1, selector: {matchLabels: {ring: '1'}}}\n- {name: w2, selector: {matchLabels: {ring: '2'}}}\n- {name: w3, selector: {matchLabels: {ring: '3'}}}\n- {name: w4, selector: {matchLabels: {ring: '4'}}}\n- {name: w5, selector: {matchLabels: {ring: '5'}}}\n";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.invalid")
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn ring(i: usize, n: usize) -> usize {
    match i * 100 / n {
        0 => 1,
        1..=9 => 2,
        10..=29 => 3,
        30..=59 => 4,
        _ => 5,
    }
}

fn web(version: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web}}\ndata: {{version: '{version}'}}\n")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The child: a hub following `repo`, printing its port.
fn hub_child(dir: PathBuf, repo: String) {
    flotilla_common::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let read = |f: &str| std::fs::read_to_string(dir.join("certs").join(f)).expect("cert");
        let tls = flotilla_hub::server::HubTls {
            ca_pem: read("ca.pem"),
            cert_pem: read("hub.pem"),
            key_pem: read("hub-key.pem"),
        };
        let cfg = flotilla_hub::server::HubConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            repo,
            branch: "main".into(),
            poll: Duration::from_secs(3600),
            data_dir: dir.join("hub"),
            tls,
            auth: flotilla_hub::git::GitAuth::None,
            webhook: None,
            in_process: None,
            grace: flotilla_hub::hub::DEFAULT_GRACE,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let hub = tokio::spawn(flotilla_hub::server::run(cfg, shutdown.clone(), Some(tx)));
        let addr = rx.await.expect("bound");
        println!("{}", addr.port());
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
        shutdown.cancel();
        let _ = hub.await;
    });
}

fn tls(certs: &Path, who: &str) -> ClientTlsConfig {
    let read = |f: String| std::fs::read_to_string(certs.join(f)).expect("cert");
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .identity(Identity::from_pem(read(format!("{who}.pem")), read(format!("{who}-key.pem"))))
        .domain_name("localhost")
}

/// A stand-in agent: a real session; every desired app reported applied and healthy at once.
async fn agent(port: u16, certs: PathBuf, cluster: String) {
    let channel = loop {
        let ep = Endpoint::from_shared(format!("https://localhost:{port}"))
            .expect("url")
            .tls_config(tls(&certs, &format!("clusters/{cluster}")))
            .expect("tls");
        match ep.connect().await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let _ = tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(pb::Hello::default())) }).await;
    let Ok(resp) = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await else { return };
    let mut inbound = resp.into_inner();
    while let Ok(Some(m)) = inbound.message().await {
        if let Some(pb::hub_message::Msg::Desired(d)) = m.msg {
            let apps = d
                .apps
                .iter()
                .map(|a| pb::AppStatus {
                    app: a.app.clone(),
                    digest: a.digest.clone(),
                    revision: a.revision.clone(),
                    phase: pb::Phase::Applied as i32,
                    health: pb::Health::Healthy as i32,
                    objects: 1,
                    objects_applied: 1,
                    ready: 1,
                    ..Default::default()
                })
                .collect();
            if tx
                .send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Status(pb::StatusReport { apps })) })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

async fn operator(port: u16, certs: &Path) -> PlatformServiceClient<Channel> {
    let ep = Endpoint::from_shared(format!("https://localhost:{port}"))
        .expect("url")
        .tls_config(tls(certs, "operators/bench"))
        .expect("tls");
    PlatformServiceClient::new(ep.connect().await.expect("operator connection"))
}

async fn complete(op: &mut PlatformServiceClient<Channel>, revision: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let list = op.list_rollouts(ListRolloutsRequest { app: "web".into() }).await.map(|r| r.into_inner()).ok();
        if let Some(r) = list.and_then(|l| l.rollouts.into_iter().next()) {
            if r.revision == revision && r.phase == "complete" {
                return t.elapsed();
            }
            assert!(!r.phase.starts_with("failed"), "{r:?}");
        }
        assert!(t.elapsed() < limit, "the rollout did not complete within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn run(n: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let names: Vec<String> = (0..n).map(|i| format!("c-{i:05}")).collect();
    let t = Instant::now();
    flotilla_common::identity::write_fleet(
        &dir.join("certs"),
        "bench",
        &["localhost".into()],
        &names,
        &["bench".into()],
    )
    .expect("certificates");
    let certs_time = t.elapsed();
    let repo = dir.join("fleet");
    std::fs::create_dir_all(repo.join("clusters")).expect("mkdir");
    std::fs::create_dir_all(repo.join("apps/web")).expect("mkdir");
    for (i, c) in names.iter().enumerate() {
        std::fs::write(repo.join(format!("clusters/{c}.yaml")), format!("labels: {{ring: '{}'}}\n", ring(i, n)))
            .expect("write");
    }
    std::fs::write(repo.join("rollout.yaml"), WAVES).expect("write");
    std::fs::write(repo.join("apps/web/app.yaml"), "namespace: web\ntargets: [{selector: {}}]\n").expect("write");
    std::fs::write(repo.join("apps/web/web.yaml"), web("1")).expect("write");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let rev1 = git(&repo, &["rev-parse", "HEAD"]);

    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env("FLOTILLA_BENCH_ROLE", "hub")
        .env("FLOTILLA_BENCH_DIR", &dir)
        .env("FLOTILLA_BENCH_REPO", format!("file://{}", repo.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hub child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("port");
    let port: u16 = line.trim().parse().expect("port");
    let pid = child.id();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let certs = dir.join("certs");
        let mut op = operator(port, &certs).await;
        // The hub before any agent: the fleet is read and rendered.
        let t = Instant::now();
        while op.list_clusters(ListClustersRequest::default()).await.map(|r| r.into_inner().revision.is_empty()).unwrap_or(true) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_kib(pid);
        let first_sync = t.elapsed();
        let t = Instant::now();
        for c in &names {
            tokio::spawn(agent(port, certs.clone(), c.clone()));
        }
        loop {
            let connected = op.list_clusters(ListClustersRequest::default()).await.map(|r| r.into_inner().clusters.iter().filter(|c| c.connected).count()).unwrap_or(0);
            if connected == n {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "{connected} of {n} agents connected after 10 minutes");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let connect = t.elapsed();
        // The first commit rolls out from nothing.
        complete(&mut op, &rev1, Duration::from_secs(600)).await;
        // The measured commit.
        std::fs::write(repo.join("apps/web/web.yaml"), web("2")).expect("write");
        git(&repo, &["commit", "-q", "-am", "two"]);
        let rev2 = git(&repo, &["rev-parse", "HEAD"]);
        let t = Instant::now();
        op.refresh(RefreshRequest {}).await.expect("refresh");
        let took = complete(&mut op, &rev2, Duration::from_secs(600)).await;
        let _ = t;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid);
        println!("rollout_scale: {n} clusters, 5 waves (1%, 9%, 20%, 30%, 40%), no bake, agents report healthy at once");
        println!("  certificates for {n} clusters: {:.1?}; hub's first fetch and render: {:.1?}; {n} agents connected in {:.1?}", certs_time, first_sync, connect);
        println!("  commit → last wave complete: {:.2?}", took);
        println!(
            "  hub resident memory: {:.1} MiB before agents, {:.1} MiB with {n} connected = {:.1} KiB per agent",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            after.saturating_sub(before) as f64 / n as f64
        );
    });
    drop(child.stdin.take());
    let _ = child.wait();
    rt.shutdown_timeout(Duration::from_secs(1));
}

fn main() {
    if std::env::var("FLOTILLA_BENCH_ROLE").as_deref() == Ok("hub") {
        let dir = PathBuf::from(std::env::var("FLOTILLA_BENCH_DIR").expect("dir"));
        return hub_child(dir, std::env::var("FLOTILLA_BENCH_REPO").expect("repo"));
    }
    flotilla_common::install_crypto_provider();
    let sizes: Vec<usize> = std::env::var("FLOTILLA_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2_000, 10_000]);
    for n in sizes {
        run(n);
    }
}
