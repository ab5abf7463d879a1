//! The hub at fleet scale: 2,000 and 10,000 clusters, five waves (no bake), three apps (one of them a 1 MiB
//! bundle). Prints the connect storm (all agents connected), the hub's resident memory per agent with no apps
//! (the connection) and with the workload (the state), the time from a commit to the last wave complete, and
//! the store commits per second while every agent reports every second.
//!
//! The hub runs in a child process (its memory is measured alone); the agents are protocol-level stand-ins
//! in this process that behave like agents: a real mutually authenticated session with its own certificate,
//! a Hello, bundle chunks received (and dropped), an Ack of every desired state, a status report of every app
//! (applied and healthy at once), heartbeats every 15 s. The numbers are the hub's (Git, rendering, rollout
//! planning, sessions, the store), not the clusters'.
//!
//! `cargo bench -p flotilla-hub --bench rollout_scale` (release); `FLOTILLA_BENCH_SIZES=2000` for one size.
//! With the hub's state on a real etcd (started here; Debian's etcd-server) and its size printed at the end:
//! `FLOTILLA_BENCH_STORE=etcd cargo bench -p flotilla-hub --features etcd --bench rollout_scale`.

use flotilla_proto::agent::v1 as pb;
use flotilla_proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use flotilla_proto::platform::v1::{ListClustersRequest, ListRolloutsRequest, RefreshRequest};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const WAVES: &str = "waves:\n- {name: w1, selector: {matchLabels: {ring: '1'}}}\n- {name: w2, selector: {matchLabels: {ring: '2'}}}\n- {name: w3, selector: {matchLabels: {ring: '3'}}}\n- {name: w4, selector: {matchLabels: {ring: '4'}}}\n- {name: w5, selector: {matchLabels: {ring: '5'}}}\n";

/// How long the hub's etcd store may hold agents' reports before writing them (`etcd::SOFT_WRITE_EVERY`; the
/// bench builds without the etcd feature too).
const SOFT_WRITE_EVERY: Duration = Duration::from_secs(30);
#[cfg(feature = "etcd")]
const _: () = assert!(SOFT_WRITE_EVERY.as_secs() == flotilla_hub::etcd::SOFT_WRITE_EVERY.as_secs());

/// The hub replicas' lease on etcd (the fail-over phase kills the leader).
const LEASE_SECONDS: u64 = 3;

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

/// Four ConfigMaps of 256 KiB: a bundle of about 1 MiB.
fn big() -> String {
    (0..4)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big-{i}}}\ndata: {{blob: '{}'}}\n",
                "x".repeat(256 * 1024 - 64)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn app_yaml(app: &str, targets: &str) -> String {
    format!("namespace: {app}\ntargets: [{{selector: {targets}}}]\n")
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
    // Store commits, for the parent to count (stderr).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter("warn,flotilla_hub::hub=debug")
        .init();
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
            store: bench_store(),
            advertise: None,
            metrics: None,
            traces: None,
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

/// A hub child (replica `replica` on etcd when `etcd` is set) and the port it serves on.
fn spawn_hub(dir: &Path, repo: &Path, etcd: Option<&str>, replica: &str) -> (std::process::Child, u16) {
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .envs(etcd.map(|e| ("FLOTILLA_BENCH_ETCD", e.to_string())))
        .env("FLOTILLA_BENCH_REPLICA", replica)
        .env("FLOTILLA_BENCH_ROLE", "hub")
        .env("FLOTILLA_BENCH_DIR", dir)
        .env("FLOTILLA_BENCH_REPO", format!("file://{}", repo.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("hub child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("port");
    (child, line.trim().parse().expect("port"))
}

/// etcd's own counters from its `/metrics` (plain HTTP on the client port): the sum of every series of `name`.
fn etcd_metric(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return 0.0 };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What etcd received from its clients (bytes) and the keys it wrote, so far.
fn etcd_written(port: Option<u16>) -> (f64, f64) {
    port.map_or((0.0, 0.0), |p| {
        (etcd_metric(p, "etcd_network_client_grpc_received_bytes_total"), etcd_metric(p, "etcd_mvcc_put_total"))
    })
}

/// The store the hub child uses: embedded, or the etcd `FLOTILLA_BENCH_ETCD` names.
fn bench_store() -> flotilla_hub::server::StoreChoice {
    #[cfg(feature = "etcd")]
    if let Ok(url) = std::env::var("FLOTILLA_BENCH_ETCD") {
        return flotilla_hub::server::StoreChoice::Etcd {
            etcd: flotilla_hub::etcd::EtcdConfig::parse(&url, "/flotilla/bench", None).expect("etcd url"),
            replica: std::env::var("FLOTILLA_BENCH_REPLICA").unwrap_or_else(|_| "bench-a".into()),
            lease: Duration::from_secs(LEASE_SECONDS),
        };
    }
    flotilla_hub::server::StoreChoice::Embedded
}

fn tls(certs: &Path, who: &str) -> ClientTlsConfig {
    let read = |f: String| std::fs::read_to_string(certs.join(f)).expect("cert");
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .identity(Identity::from_pem(read(format!("{who}.pem")), read(format!("{who}-key.pem"))))
        .domain_name("localhost")
}

/// A stand-in agent that behaves like one: Hello, chunks received, Ack, reports, heartbeats; reports every
/// second while `chatty` is set.
/// When its session ends (its hub replica died, or refused it), it opens one with the next hub of `hubs`, as
/// an agent with several hubs does.
async fn agent(hubs: Hubs, certs: PathBuf, cluster: String, chatty: Arc<AtomicBool>) {
    // Digests it holds (its Hello on a reconnect: nothing is sent again).
    let mut apps: BTreeMap<String, (String, String)> = BTreeMap::new();
    for attempt in 0usize.. {
        let port = {
            let h = hubs.lock().unwrap();
            h[attempt % h.len()]
        };
        session(port, &certs, &cluster, &chatty, &mut apps).await;
        tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(0..200))).await;
    }
}

/// The hub replicas' ports, in the order stand-in agents try them.
type Hubs = Arc<Mutex<Vec<u16>>>;

async fn session(
    port: u16,
    certs: &Path,
    cluster: &str,
    chatty: &AtomicBool,
    apps: &mut BTreeMap<String, (String, String)>,
) {
    let channel = loop {
        let ep = Endpoint::from_shared(format!("https://localhost:{port}"))
            .expect("url")
            .tls_config(tls(certs, &format!("clusters/{cluster}")))
            .expect("tls");
        match ep.connect().await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let _ = tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                protocol: flotilla_hub::report::MIN_AGENT_PROTOCOL,
                applied: apps
                    .iter()
                    .map(|(app, (digest, revision))| pb::AppliedApp {
                        app: app.clone(),
                        digest: digest.clone(),
                        revision: revision.clone(),
                    })
                    .collect(),
                ..Default::default()
            })),
        })
        .await;
    let Ok(resp) = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await else { return };
    let mut inbound = resp.into_inner();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(15));
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    let status = |apps: &BTreeMap<String, (String, String)>| {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let apps = apps
            .iter()
            .map(|(app, (digest, revision))| pb::AppStatus {
                app: app.clone(),
                digest: digest.clone(),
                revision: revision.clone(),
                phase: pb::Phase::Applied as i32,
                health: pb::Health::Healthy as i32,
                objects: 1,
                objects_applied: 1,
                ready: 1,
                changed_unix_ms: now,
                ..Default::default()
            })
            .collect();
        pb::AgentMessage { msg: Some(pb::agent_message::Msg::Status(pb::StatusReport { apps, api: None })) }
    };
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(pb::HubMessage { msg: Some(pb::hub_message::Msg::Desired(d)) })) => {
                    *apps = d.apps.iter().map(|a| (a.app.clone(), (a.digest.clone(), a.revision.clone()))).collect();
                    let ack = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Ack(pb::Ack { seq: d.seq })) };
                    if tx.send(ack).await.is_err() || tx.send(status(apps)).await.is_err() {
                        return;
                    }
                }
                // Chunks are received and dropped: the parent must not hold 10,000 copies of a bundle.
                Ok(Some(_)) => {}
                _ => return,
            },
            _ = heartbeat.tick() => {
                let hb = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default())) };
                if tx.send(hb).await.is_err() {
                    return;
                }
            }
            _ = every_second.tick() => {
                if chatty.load(Ordering::Relaxed) && tx.send(status(apps)).await.is_err() {
                    return;
                }
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

async fn complete(op: &mut PlatformServiceClient<Channel>, app: &str, revision: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let list = op.list_rollouts(ListRolloutsRequest { app: app.into() }).await.map(|r| r.into_inner()).ok();
        if let Some(r) = list.and_then(|l| l.rollouts.into_iter().next()) {
            if r.revision == revision && r.phase == "complete" {
                return t.elapsed();
            }
            assert!(!r.phase.starts_with("failed"), "{r:?}");
        }
        assert!(t.elapsed() < limit, "the rollout of {app} did not complete within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn run(n: usize) {
    let etcd = (std::env::var("FLOTILLA_BENCH_STORE").as_deref() == Ok("etcd")).then(|| {
        if !cfg!(feature = "etcd") {
            panic!("FLOTILLA_BENCH_STORE=etcd needs --features etcd");
        }
        flotilla_e2e::etcd::Etcd::start()
    });
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
    for (i, c) in names.iter().enumerate() {
        std::fs::write(repo.join(format!("clusters/{c}.yaml")), format!("labels: {{ring: '{}'}}\n", ring(i, n)))
            .expect("write");
    }
    std::fs::write(repo.join("rollout.yaml"), WAVES).expect("write");
    let apps = ["web", "big", "other"];
    // The first commit targets nobody: the agents connect with no apps (the cost of a connection).
    for app in apps {
        std::fs::create_dir_all(repo.join(format!("apps/{app}"))).expect("mkdir");
        std::fs::write(repo.join(format!("apps/{app}/app.yaml")), app_yaml(app, "{matchLabels: {nobody: 'yes'}}"))
            .expect("write");
    }
    std::fs::write(repo.join("apps/web/web.yaml"), web("1")).expect("write");
    std::fs::write(repo.join("apps/big/big.yaml"), big()).expect("write");
    std::fs::write(repo.join("apps/other/other.yaml"), web("other")).expect("write");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "nobody"]);

    let etcd_url = etcd.as_ref().map(|e| e.url());
    let (mut child, port) = spawn_hub(&dir, &repo, etcd_url.as_deref(), "bench-a");
    let pid = child.id();
    // The hub's store commits, as it logs them: (when, operations).
    let commits: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    {
        let commits = commits.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut log = std::env::var("FLOTILLA_BENCH_HUB_LOG").ok().and_then(|p| std::fs::File::create(p).ok());
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if let Some(ops) = line.split(" ops=").nth(1).and_then(|r| r.split_whitespace().next()?.parse().ok()) {
                    commits.lock().unwrap().push((Instant::now(), ops));
                }
            }
        });
    }

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let certs = dir.join("certs");
        let mut op = operator(port, &certs).await;
        let t = Instant::now();
        while op.list_clusters(ListClustersRequest::default()).await.map(|r| r.into_inner().revision.is_empty()).unwrap_or(true) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_kib(pid);
        let first_sync = t.elapsed();
        // The connect storm.
        let chatty = Arc::new(AtomicBool::new(false));
        let hubs: Hubs = Arc::new(Mutex::new(vec![port]));
        let t = Instant::now();
        for c in &names {
            tokio::spawn(agent(hubs.clone(), certs.clone(), c.clone(), chatty.clone()));
        }
        loop {
            let r = op
                .list_clusters(ListClustersRequest { problems_only: true, page_size: 1, ..Default::default() })
                .await
                .map(|r| r.into_inner());
            // Clusters with a problem: disconnected ones (no app is targeted yet).
            if r.as_ref().is_ok_and(|r| r.total == 0) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "agents not connected after 10 minutes: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let connect = t.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let connected = rss_kib(pid);
        // The workload: every app to every cluster (the 1 MiB bundle too), through the waves.
        for app in apps {
            std::fs::write(repo.join(format!("apps/{app}/app.yaml")), app_yaml(app, "{}")).expect("write");
        }
        git(&repo, &["commit", "-q", "-am", "everyone"]);
        let rev1 = git(&repo, &["rev-parse", "HEAD"]);
        let t = Instant::now();
        op.refresh(RefreshRequest {}).await.expect("refresh");
        for app in apps {
            complete(&mut op, app, &rev1, Duration::from_secs(900)).await;
        }
        let first_rollout = t.elapsed();
        // The measured commit: one app changes.
        std::fs::write(repo.join("apps/web/web.yaml"), web("2")).expect("write");
        git(&repo, &["commit", "-q", "-am", "two"]);
        let rev2 = git(&repo, &["rev-parse", "HEAD"]);
        let etcd_port = etcd.as_ref().map(|e| e.port);
        let written_before = etcd_written(etcd_port);
        op.refresh(RefreshRequest {}).await.expect("refresh");
        let took = complete(&mut op, "web", &rev2, Duration::from_secs(600)).await;
        let written_rollout = etcd_written(etcd_port);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let loaded = rss_kib(pid);
        // Every agent reports every second for 10 s.
        chatty.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let from = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        chatty.store(false, Ordering::Relaxed);
        let window = from.elapsed().as_secs_f64();
        // Reports are soft state: written with the next immediate batch or within 30 s.
        let reports_from = etcd_written(etcd_port);
        if etcd.is_some() {
            tokio::time::sleep(SOFT_WRITE_EVERY + Duration::from_secs(3)).await;
        }
        let reports_to = etcd_written(etcd_port);
        let (n_commits, ops) = commits
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= from)
            .fold((0u64, 0u64), |(c, o), (_, ops)| (c + 1, o + ops));
        let kib = |k: u64| k as f64 / n as f64;
        println!("rollout_scale: {n} clusters, 5 waves (1%, 9%, 20%, 30%, 40%), no bake, 3 apps (one a 1 MiB bundle)");
        println!("  certificates: {certs_time:.1?}; hub's first fetch and render: {first_sync:.1?}");
        println!("  connect storm: {n} agents connected in {connect:.1?}");
        println!("  first rollout of the 3 apps to every cluster (the 1 MiB bundle sent {n} times): {first_rollout:.1?}");
        println!("  commit → last wave complete (one app changed): {took:.2?}");
        println!(
            "  hub resident memory: {:.1} MiB before agents; {:.1} KiB per agent connected with no apps; {:.1} KiB per agent with the workload",
            before as f64 / 1024.0,
            kib(connected.saturating_sub(before)),
            kib(loaded.saturating_sub(before))
        );
        println!(
            "  every agent reporting every second: {:.1} store commits/s carrying {:.0} reports/s",
            n_commits as f64 / window,
            ops as f64 / window
        );
        if etcd.is_some() {
            let (bytes, puts) = (written_rollout.0 - written_before.0, written_rollout.1 - written_before.1);
            println!(
                "  etcd written for the measured commit (5 waves, {n} clusters' desired state): {:.1} MiB in {puts:.0} key writes, {:.1} MiB per wave step, {:.0} bytes per cluster",
                bytes / (1 << 20) as f64,
                bytes / 5.0 / (1 << 20) as f64,
                bytes / n as f64
            );
            let (bytes, puts) = (reports_to.0 - reports_from.0, reports_to.1 - reports_from.1);
            println!(
                "  etcd written for agents' reports (soft state, within {} s): {:.1} MiB in {puts:.0} key writes, {:.0} bytes per report written",
                SOFT_WRITE_EVERY.as_secs(),
                bytes / (1 << 20) as f64,
                bytes / puts.max(1.0)
            );
            failover(&dir, &repo, etcd_url.as_deref().unwrap_or_default(), &mut child, &mut op, &hubs, &certs, n).await;
        }
    });
    drop(child.stdin.take());
    let _ = child.wait();
    rt.shutdown_timeout(Duration::from_secs(1));
    #[cfg(feature = "etcd")]
    if let Some(e) = &etcd {
        let cfg = flotilla_hub::etcd::EtcdConfig::parse(&e.url(), "/flotilla/bench", None).expect("etcd url");
        let store = flotilla_hub::etcd::EtcdStore::open(&cfg, None).expect("etcd store");
        let (keys, bytes) = store.size().expect("size");
        let db = store.db_size().expect("db size");
        println!(
            "  etcd store after the rollouts: {keys} keys, {:.1} MiB of keys and values; etcd's database file {:.1} MiB (before compaction and defragmentation)",
            bytes as f64 / (1 << 20) as f64,
            db as f64 / (1 << 20) as f64
        );
        let families: Vec<String> = store
            .sizes()
            .expect("sizes")
            .into_iter()
            .filter(|(_, (_, b))| *b >= 64 << 10)
            .map(|(f, (k, b))| format!("{f} {k} keys {:.1} MiB", b as f64 / (1 << 20) as f64))
            .collect();
        println!("    by key family (64 KiB or more): {}", families.join(", "));
    }
    drop(etcd);
}

/// The leader killed (kill -9) in the middle of a rollout over every cluster, with every agent connected to
/// it: a standby leads, the agents move to it, the rollout takes its next step. Prints each time.
#[allow(clippy::too_many_arguments)]
async fn failover(
    dir: &Path,
    repo: &Path,
    etcd: &str,
    leader: &mut std::process::Child,
    op: &mut PlatformServiceClient<Channel>,
    hubs: &Hubs,
    certs: &Path,
    n: usize,
) {
    let (mut standby, port_b) = spawn_hub(dir, repo, Some(etcd), "bench-b");
    let mut op_b = operator(port_b, certs).await;
    let t = Instant::now();
    loop {
        let h = op_b.list_hubs(flotilla_proto::platform::v1::ListHubsRequest {}).await.map(|r| r.into_inner().hubs);
        if h.is_ok_and(|h| h.len() == 2 && h.iter().all(|r| r.caught_up)) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "the standby did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let caught_up = t.elapsed();
    hubs.lock().unwrap().push(port_b);
    std::fs::write(repo.join("apps/web/web.yaml"), web("3")).expect("write");
    git(repo, &["commit", "-q", "-am", "three"]);
    let rev3 = git(repo, &["rev-parse", "HEAD"]);
    op.refresh(RefreshRequest {}).await.expect("refresh");
    let passed = |r: &flotilla_proto::platform::v1::Rollout| r.waves.iter().filter(|w| w.phase == "passed").count();
    let at_kill = loop {
        let list = op.list_rollouts(ListRolloutsRequest { app: "web".into() }).await.map(|r| r.into_inner()).ok();
        if let Some(r) = list.and_then(|l| l.rollouts.into_iter().next()).filter(|r| r.revision == rev3) {
            if passed(&r) >= 1 {
                break passed(&r);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Who holds the election key, read from etcd itself (not through a replica busy with the agents).
    #[cfg(feature = "etcd")]
    let elected = {
        let cfg = flotilla_hub::etcd::EtcdConfig::parse(etcd, "/flotilla/bench", None).expect("etcd url");
        let client = cfg.connect().await.expect("etcd client");
        move || {
            let mut c = client.clone();
            async move { flotilla_hub::leader::current(&mut c, "/flotilla/bench").await.ok().flatten() }
        }
    };
    let killed_ms = flotilla_hub::hub::now_ms();
    let killed = Instant::now();
    let _ = leader.kill();
    let _ = leader.wait();
    #[cfg(feature = "etcd")]
    let key_taken = loop {
        // When the standby won, as it wrote in the key (this process is busy with 10,000 reconnecting agents:
        // it may see the key late).
        if let Some((_, since_ms)) = elected().await.filter(|(n, _)| n == "bench-b") {
            break Duration::from_millis((since_ms - killed_ms).max(0) as u64);
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "nobody took the election key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // (Without etcd there is no fail-over phase.)
    #[cfg(not(feature = "etcd"))]
    let key_taken = Duration::ZERO;
    let mut led = None;
    let stepped = loop {
        if led.is_none() {
            let h = op_b.list_hubs(flotilla_proto::platform::v1::ListHubsRequest {}).await.map(|r| r.into_inner().hubs);
            if h.is_ok_and(|h| h.iter().any(|r| r.leader && r.name == "bench-b")) {
                led = Some(killed.elapsed());
            }
        }
        if led.is_some() {
            let list = op_b.list_rollouts(ListRolloutsRequest { app: "web".into() }).await.map(|r| r.into_inner()).ok();
            if let Some(r) = list.and_then(|l| l.rollouts.into_iter().next()).filter(|r| r.revision == rev3) {
                if passed(&r) > at_kill || r.phase == "complete" {
                    break killed.elapsed();
                }
            }
        }
        assert!(killed.elapsed() < Duration::from_secs(300), "no rollout step within 5 minutes of the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rest = complete(&mut op_b, "web", &rev3, Duration::from_secs(600)).await;
    println!(
        "  fail-over (lease {LEASE_SECONDS} s; the standby caught up {caught_up:.1?} after it started; all {n} agents on the killed leader): the standby held the election key {:.2?} after kill -9 and said it leads after {:.2?}, the rollout's next wave passed {:.2?} after the kill ({at_kill} of 5 passed at the kill), complete {:.2?} later",
        key_taken,
        led.unwrap_or_default(),
        stepped,
        rest
    );
    drop(standby.stdin.take());
    let _ = standby.wait();
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
    if let [n] = sizes[..] {
        return run(n);
    }
    // Each size in a process of its own: what one run leaves behind (10 GiB of bundle traffic through the
    // stand-ins' buffers, the page cache) does not slow the next.
    for n in sizes {
        let status = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args(std::env::args().skip(1))
            .env("FLOTILLA_BENCH_SIZES", n.to_string())
            .status()
            .expect("bench run");
        assert!(status.success(), "the run with {n} clusters failed");
    }
}
