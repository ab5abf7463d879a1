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
//! `cargo bench -p flotilla-hub --bench rollout_scale` (release); `FLOTILLA_BENCH_SIZES=2000` for one size;
//! `FLOTILLA_BENCH_TLS=static` serves with tonic's static TLS instead of the hub binary's reloading acceptor.
//! With the hub's state on a real etcd (started here; Debian's etcd-server) and its size printed at the end:
//! `FLOTILLA_BENCH_STORE=etcd cargo bench -p flotilla-hub --features etcd --bench rollout_scale`.
//!
//! Each size runs twice: with tracing and metrics off, then on (`FLOTILLA_BENCH_TELEMETRY=off` or `on` for
//! one): the hub exports one trace per commit over OTLP to a collector in this process, which counts the
//! spans, and serves `/metrics`, scraped every 5 s (faster than usual) for the whole run. The two runs are
//! printed side by side at the end. `FLOTILLA_BENCH_TELEMETRY=off` runs only the first.
//! `FLOTILLA_BENCH_REPEAT=3` runs each pair three times (off, on, off, on, …) and prints the median and the
//! range of each measure: one run on two cores shared with 10,000 stand-in agents varies by tens of percent.

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

/// CPU seconds (user and system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: fields 14 and 15 (utime, stime) in clock ticks (100 per second).
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<f64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    f.get(11).zip(f.get(12)).map_or(0.0, |(u, s)| (u + s) / 100.0)
}

/// The child: a hub following `repo`, printing its port.
fn hub_child(dir: PathBuf, repo: String) {
    flotilla_common::install_crypto_provider();
    let otlp = std::env::var("FLOTILLA_BENCH_OTLP").ok();
    let metrics = std::env::var("FLOTILLA_BENCH_METRICS").ok().map(|p| format!("127.0.0.1:{p}").parse().expect("addr"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Store commits, for the parent to count (stderr).
    let filter = "warn,flotilla_hub::hub=debug";
    let _telemetry = match &otlp {
        None => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_env_filter(filter).init();
            None
        }
        Some(endpoint) => {
            std::env::set_var("RUST_LOG", filter);
            let _rt = rt.enter();
            Some(
                flotilla_common::telemetry::init(&flotilla_common::telemetry::Options {
                    service: "flotilla-hub",
                    instance: "bench".into(),
                    otlp_endpoint: Some(endpoint.clone()),
                    log_format: flotilla_common::telemetry::LogFormat::Text,
                    roots: flotilla_common::telemetry::Roots::Keep,
                })
                .expect("telemetry"),
            )
        }
    };
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
            metrics,
            traces: otlp.is_some().then_some(flotilla_hub::traces::CLUSTER_SPANS),
            identities: Default::default(),
            bootstrap: None,
            signer: None,
            // TLS as the hub binary does it (its own acceptor, files read again when they change), or tonic's
            // static configuration with FLOTILLA_BENCH_TLS=static, to compare.
            certs_dir: (std::env::var("FLOTILLA_BENCH_TLS").as_deref() != Ok("static")).then(|| dir.join("certs")),
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
fn spawn_hub(
    dir: &Path,
    repo: &Path,
    etcd: Option<&str>,
    replica: &str,
    telemetry: Option<&Telemetry>,
) -> (std::process::Child, u16) {
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .envs(etcd.map(|e| ("FLOTILLA_BENCH_ETCD", e.to_string())))
        .envs(telemetry.map(|t| ("FLOTILLA_BENCH_OTLP", format!("http://127.0.0.1:{}", t.otlp))))
        .envs(telemetry.map(|t| ("FLOTILLA_BENCH_METRICS", t.metrics.to_string())))
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

/// Tracing and metrics on: where the hub exports spans and serves `/metrics`, and what came of it.
struct Telemetry {
    otlp: u16,
    metrics: u16,
    spans: Arc<std::sync::atomic::AtomicU64>,
    /// Scrapes of `/metrics`: (count, slowest, largest body in bytes).
    scrapes: Arc<Mutex<(u64, Duration, usize)>>,
}

/// A collector that counts the spans it receives.
#[derive(Clone)]
struct SpanCounter(Arc<std::sync::atomic::AtomicU64>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for SpanCounter {
    async fn export(
        &self,
        req: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let n: usize = req.into_inner().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(Default::default()))
    }
}

fn telemetry_on() -> bool {
    std::env::var("FLOTILLA_BENCH_TELEMETRY").as_deref() == Ok("on")
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
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let telemetry = telemetry_on().then(|| {
        let t = Telemetry {
            otlp: flotilla_e2e::free_port(),
            metrics: flotilla_e2e::free_port(),
            spans: Arc::default(),
            scrapes: Arc::default(),
        };
        let svc = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
            SpanCounter(t.spans.clone()),
        );
        rt.spawn(tonic::transport::Server::builder().add_service(svc).serve(([127, 0, 0, 1], t.otlp).into()));
        // Prometheus, scraping every 5 s.
        let (port, scrapes) = (t.metrics, t.scrapes.clone());
        rt.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let started = Instant::now();
                let (code, body) = tokio::task::spawn_blocking(move || flotilla_e2e::http_get(port, "/metrics"))
                    .await
                    .unwrap_or_default();
                if code == 200 {
                    let mut s = scrapes.lock().unwrap();
                    s.0 += 1;
                    s.1 = s.1.max(started.elapsed());
                    s.2 = s.2.max(body.len());
                }
            }
        });
        t
    });
    let (mut child, port) = spawn_hub(&dir, &repo, etcd_url.as_deref(), "bench-a", telemetry.as_ref());
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
        let cpu = cpu_seconds(pid);
        println!("  hub CPU time over the whole run: {cpu:.1} s");
        let mut summary = serde_json::json!({
            "clusters": n,
            "telemetry": telemetry.is_some(),
            "connect_s": connect.as_secs_f64(),
            "first_rollout_s": first_rollout.as_secs_f64(),
            "commit_to_last_wave_s": took.as_secs_f64(),
            "kib_per_agent_loaded": kib(loaded.saturating_sub(before)),
            "hub_rss_mib": loaded as f64 / 1024.0,
            "hub_cpu_s": cpu,
            "reports_per_s": ops as f64 / window,
        });
        if let Some(t) = &telemetry {
            let (count, slowest, largest) = *t.scrapes.lock().unwrap();
            let spans = t.spans.load(Ordering::Relaxed);
            // One scrape with the fleet at rest (the slowest above fell during a storm on the shared cores).
            let port = t.metrics;
            let started = Instant::now();
            let _ = tokio::task::spawn_blocking(move || flotilla_e2e::http_get(port, "/metrics")).await;
            let rest = started.elapsed();
            println!(
                "  telemetry: {spans} spans exported; /metrics scraped {count} times, slowest {slowest:.1?}, at rest {rest:.1?}, largest {:.1} KiB",
                largest as f64 / 1024.0
            );
            summary["scrape_rest_ms"] = (rest.as_secs_f64() * 1000.0).into();
            summary["spans"] = spans.into();
            summary["scrape_max_ms"] = (slowest.as_secs_f64() * 1000.0).into();
            summary["metrics_kib"] = (largest as f64 / 1024.0).into();
        }
        if let Ok(path) = std::env::var("FLOTILLA_BENCH_SUMMARY") {
            std::fs::write(path, summary.to_string()).expect("summary");
        }
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
    let (mut standby, port_b) = spawn_hub(dir, repo, Some(etcd), "bench-b", None);
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
    #[cfg(feature = "etcd")]
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
    let modes: Vec<&str> = match std::env::var("FLOTILLA_BENCH_TELEMETRY").as_deref() {
        Ok("on") => vec!["on"],
        Ok("off") => vec!["off"],
        _ => vec!["off", "on"],
    };
    if let ([n], [_]) = (&sizes[..], &modes[..]) {
        return run(*n);
    }
    // Each size and mode in a process of its own: what one run leaves behind (10 GiB of bundle traffic through
    // the stand-ins' buffers, the page cache) does not slow the next.
    let tmp = tempfile::tempdir().expect("tempdir");
    let repeat: usize = std::env::var("FLOTILLA_BENCH_REPEAT").ok().and_then(|r| r.parse().ok()).unwrap_or(1).max(1);
    let mut table = Vec::new();
    for n in sizes {
        // row[mode] = one summary per repetition.
        let mut row: Vec<Vec<serde_json::Value>> = vec![Vec::new(); modes.len()];
        for (i, mode) in (0..repeat).flat_map(|_| modes.iter().enumerate()) {
            let summary = tmp.path().join(format!("{n}-{mode}.json"));
            let status = std::process::Command::new(std::env::current_exe().expect("exe"))
                .args(std::env::args().skip(1))
                .env("FLOTILLA_BENCH_SIZES", n.to_string())
                .env("FLOTILLA_BENCH_TELEMETRY", mode)
                .env("FLOTILLA_BENCH_SUMMARY", &summary)
                .status()
                .expect("bench run");
            assert!(status.success(), "the run with {n} clusters (telemetry {mode}) failed");
            let s: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&summary).expect("summary")).expect("json");
            row[i].push(s);
        }
        table.push((n, row));
    }
    if modes.len() < 2 {
        return;
    }
    println!(
        "\ntracing and metrics off vs on (on: one trace per commit over OTLP, /metrics scraped every 5 s); median of {repeat} (range):"
    );
    println!("| clusters | measure | off | on | on vs off |");
    println!("|---|---|---|---|---|");
    for (n, row) in table {
        let (off, on) = (&row[0], &row[1]);
        // The median of a measure over the repetitions, and its range.
        let stat = |runs: &[serde_json::Value], key: &str| {
            let mut v: Vec<f64> = runs.iter().map(|r| r[key].as_f64().unwrap_or(0.0)).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        for (key, what) in [
            ("connect_s", "connect storm (s)"),
            ("first_rollout_s", "first rollout, 3 apps (s)"),
            ("commit_to_last_wave_s", "commit → last wave (s)"),
            ("kib_per_agent_loaded", "hub memory per agent (KiB)"),
            ("hub_rss_mib", "hub resident memory (MiB)"),
            ("hub_cpu_s", "hub CPU time (s)"),
        ] {
            let ((a, a0, a1), (b, b0, b1)) = (stat(off, key), stat(on, key));
            println!(
                "| {n} | {what} | {a:.2} ({a0:.2}–{a1:.2}) | {b:.2} ({b0:.2}–{b1:.2}) | {:+.1}% |",
                (b / a.max(1e-9) - 1.0) * 100.0
            );
        }
        let (spans, scrape, kib) = (stat(on, "spans"), stat(on, "scrape_max_ms"), stat(on, "metrics_kib"));
        let rest = stat(on, "scrape_rest_ms");
        println!(
            "| {n} | spans exported; slowest scrape (at rest); /metrics size | | {:.0} spans; {:.0} ms ({:.0} ms); {:.1} KiB | |",
            spans.0, scrape.0, rest.0, kib.0
        );
    }
}
