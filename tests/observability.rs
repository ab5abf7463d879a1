//! What on-call sees, with real processes: the OpenTelemetry trace of one commit across the hub and three
//! agents (one of them restarted while the commit rolls out), received by an OTLP collector in this test;
//! `/metrics` of a hub and its agents, read with a Prometheus text parser and checked against the fleet; and
//! the dashboard and alert rules in deploy/observability, which may only name metrics the processes export.

use flotilla_e2e::{commit, eventually, free_port, http_get, kube, start_agent_with, start_hub_with, value, Proc};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

const CLUSTERS: [&str; 3] = ["eu-1", "eu-2", "us-1"];

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(AnyValue::StringValue(s)) => s.clone(),
            Some(AnyValue::IntValue(i)) => i.to_string(),
            Some(AnyValue::BoolValue(b)) => b.to_string(),
            other => format!("{other:?}"),
        };
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace: hex::encode(&s.trace_id),
                        id: hex::encode(&s.span_id),
                        parent: hex::encode(&s.parent_span_id),
                        attrs: s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn shop(greeting: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop-config\n  namespace: shop\ndata:\n  greeting: {greeting}\n"
    )
}

/// Three clusters, app `shop` on all of them through two waves (eu-1 first), drift reported, not corrected.
fn fleet(tmp: &Path) -> std::path::PathBuf {
    let repo = flotilla_e2e::new_repo(tmp);
    let app = "namespace: shop\ntargets:\n- selector: {}\nsync:\n  drift: report\nrollout:\n  waves:\n  - name: canary\n    selector: {matchLabels: {canary: \"true\"}}\n  - name: others\n    selector: {}\n";
    commit(
        &repo,
        &[
            ("clusters/eu-1.yaml", Some("labels: {region: eu, canary: \"true\"}\n")),
            ("clusters/eu-2.yaml", Some("labels: {region: eu}\n")),
            ("clusters/us-1.yaml", Some("labels: {region: us}\n")),
            ("apps/shop/app.yaml", Some(app)),
            ("apps/shop/manifests.yaml", Some(&shop("hello"))),
        ],
        "first",
    );
    repo
}

struct Fleet {
    _dir: tempfile::TempDir,
    _daemon: Proc,
    _sim: Proc,
    repo: std::path::PathBuf,
    hub_port: u16,
    clients: Vec<kube::Client>,
}

impl Fleet {
    fn tmp(&self) -> &Path {
        self._dir.path()
    }
}

async fn fleet_up() -> (Fleet, String) {
    flotilla_common::install_crypto_provider();
    // FLOTILLA_KEEP_TMP=1 keeps the work directory (logs) after the test.
    let dir =
        tempfile::Builder::new().disable_cleanup(std::env::var_os("FLOTILLA_KEEP_TMP").is_some()).tempdir().unwrap();
    let tmp = dir.path().to_path_buf();
    eprintln!("work directory (logs): {}", tmp.display());
    flotilla_e2e::issue_certs(&tmp, "eu-1,eu-2,us-1", "alice");
    let repo = fleet(&tmp);
    let (daemon, git_port) = flotilla_e2e::git_daemon(&tmp.join("served"));
    let sim = flotilla_e2e::start_sim(&tmp, "eu-1,eu-2,us-1");
    let mut clients = Vec::new();
    for c in CLUSTERS {
        clients.push(kube(&tmp.join("kc"), c).await);
    }
    let url = format!("git://127.0.0.1:{git_port}/fleet.git");
    (Fleet { _dir: dir, _daemon: daemon, _sim: sim, repo, hub_port: free_port(), clients }, url)
}

fn agent(f: &Fleet, cluster: &str, extra: &[&str], tag: &str) -> Proc {
    start_agent_with(f.tmp(), &format!("https://localhost:{}", f.hub_port), cluster, cluster, extra, tag)
}

async fn greeting_everywhere(f: &Fleet, greeting: &str) {
    for (c, client) in CLUSTERS.iter().zip(&f.clients) {
        eventually(90, &format!("{greeting} on {c}"), || async {
            (value(client, "shop", "shop-config", "greeting").await.as_deref() == Some(greeting)).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_is_one_trace_from_fetch_to_healthy_on_every_cluster_across_an_agent_restart() {
    let collector = Collector::default();
    let otlp_port = free_port();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve(([127, 0, 0, 1], otlp_port).into());
    tokio::spawn(server);
    let otlp = format!("http://127.0.0.1:{otlp_port}");
    // Exports within a fraction of a second (the default batches for 5 s).
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
    let (f, url) = fleet_up().await;
    let tmp = f.tmp().to_path_buf();
    let extra: Vec<String> = vec!["--otlp-endpoint".into(), otlp.clone(), "--log-format".into(), "json".into()];
    let _hub = start_hub_with(&tmp, f.hub_port, &url, &extra);
    let agent_extra = ["--otlp-endpoint", otlp.as_str(), "--log-format", "json"];
    let mut agents: BTreeMap<&str, Proc> = CLUSTERS.iter().map(|c| (*c, agent(&f, c, &agent_extra, ""))).collect();
    greeting_everywhere(&f, "hello").await;

    // us-1's agent is down when the commit lands, and comes back while the rollout goes on.
    agents.get_mut("us-1").unwrap().kill();
    let revision = commit(&f.repo, &[("apps/shop/manifests.yaml", Some(&shop("bonjour")))], "second");
    for (c, client) in CLUSTERS.iter().zip(&f.clients).take(2) {
        eventually(90, &format!("bonjour on {c}"), || async {
            (value(client, "shop", "shop-config", "greeting").await.as_deref() == Some("bonjour")).then_some(())
        })
        .await;
    }
    agents.insert("us-1", agent(&f, "us-1", &agent_extra, "-again"));
    greeting_everywhere(&f, "bonjour").await;

    // The commit's trace: its root, then every step, each cluster's spans from hub and agent in one trace.
    let spans = eventually(30, "the commit's trace with every cluster healthy", || {
        let collector = collector.clone();
        let revision = revision.clone();
        async move {
            let got = collector.0.lock().unwrap().clone();
            let root =
                got.iter().find(|s| s.name == "commit" && s.attrs["flotilla.revision"] == revision)?.trace.clone();
            let trace: Vec<Got> = got.into_iter().filter(|s| s.trace == root).collect();
            let healthy: BTreeSet<&str> =
                trace.iter().filter(|s| s.name == "healthy").map(|s| s.attrs["flotilla.cluster"].as_str()).collect();
            // A wave's span is exported when the wave is over.
            let waves = trace.iter().filter(|s| s.name == "wave").count();
            (healthy.len() == 3 && waves == 2).then_some(trace)
        }
    })
    .await;
    let by_id: BTreeMap<&str, &Got> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for step in ["commit", "fetch", "parse", "render", "render app", "gate", "wave", "send", "apply", "healthy"] {
        assert!(names.contains(step), "the trace has a {step} span: {names:?}");
    }
    let root = spans.iter().find(|s| s.name == "commit").unwrap();
    assert!(root.parent.is_empty() || root.parent == "0000000000000000", "the commit span is the root");
    for step in ["fetch", "parse", "render", "gate"] {
        let s = spans.iter().find(|s| s.name == step).unwrap();
        assert_eq!(s.parent, root.id, "{step} is a child of the commit");
        assert_eq!(s.service, "flotilla-hub");
    }
    let waves: BTreeSet<&str> =
        spans.iter().filter(|s| s.name == "wave").map(|s| s.attrs["flotilla.wave"].as_str()).collect();
    assert_eq!(waves, BTreeSet::from(["canary", "others"]), "one span per wave");
    for c in CLUSTERS {
        let apply: Vec<&Got> = spans.iter().filter(|s| s.name == "apply" && s.attrs["flotilla.cluster"] == c).collect();
        assert!(!apply.is_empty(), "{c} applied in the trace");
        for a in &apply {
            assert_eq!(a.service, "flotilla-agent", "apply is the agent's");
            assert_eq!(a.attrs["flotilla.app"], "shop");
            let send = by_id.get(a.parent.as_str()).unwrap_or_else(|| panic!("{c}: apply's parent is in the trace"));
            assert_eq!(send.name, "send");
            assert_eq!(send.service, "flotilla-hub");
            assert_eq!(send.attrs["flotilla.cluster"], c, "the agent's span hangs under the send to its own cluster");
            assert_eq!(send.attrs["flotilla.digest"], a.attrs["flotilla.digest"]);
            let wave = by_id.get(send.parent.as_str()).expect("the send's parent");
            assert_eq!(wave.name, "wave");
            let expected = if c == "eu-1" { "canary" } else { "others" };
            assert_eq!(wave.attrs["flotilla.wave"], expected, "{c} was sent in its wave");
            assert_eq!(by_id.get(wave.parent.as_str()).map(|w| w.name.as_str()), Some("commit"));
        }
        let healthy = spans.iter().find(|s| s.name == "healthy" && s.attrs["flotilla.cluster"] == c).unwrap();
        assert_eq!(by_id.get(healthy.parent.as_str()).map(|p| p.name.as_str()), Some("apply"));
    }

    // JSON log lines inside traced steps carry the trace's ids (the hub's render, the agent's apply).
    let hub_log = std::fs::read_to_string(tmp.join(format!("hub-{}.log", std::process::id()))).unwrap();
    let lines: Vec<serde_json::Value> = hub_log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!lines.is_empty(), "the hub logs JSON lines");
    assert!(
        lines.iter().any(|l| l["message"] == "fleet advanced"
            && l["revision"] == revision.as_str()
            && l["trace_id"] == root.trace.as_str()),
        "the hub's line for the commit carries its trace id"
    );
    let agent_log = std::fs::read_to_string(tmp.join("agent-us-1-as-us-1-again.log")).unwrap();
    let agent_lines: Vec<serde_json::Value> = agent_log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        agent_lines.iter().any(|l| l["trace_id"] == root.trace.as_str() && l["span_id"].is_string()),
        "a log line of us-1's agent inside the apply carries the commit's trace id"
    );
    drop(agents);
}

/// Parses a Prometheus text exposition into (name, labels) → value.
fn scrape(port: u16) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let (code, body) = http_get(port, "/metrics");
    assert_eq!(code, 200, "GET /metrics on {port}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    parsed
        .samples
        .into_iter()
        .filter_map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let labels: BTreeMap<String, String> = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            Some(((s.metric, labels), v))
        })
        .collect()
}

fn get(m: &BTreeMap<(String, BTreeMap<String, String>), f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.get(&(name.to_string(), want)).copied()
}

/// Every metric name `text` mentions (`flotilla_…`), histogram and counter suffixes included.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("flotilla_") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_string());
        i = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_hub_and_agents_match_the_fleet_and_every_dashboard_and_alert_metric_exists() {
    let (f, url) = fleet_up().await;
    let tmp = f.tmp().to_path_buf();
    let hub_metrics = free_port();
    let extra: Vec<String> = vec!["--metrics-listen".into(), format!("127.0.0.1:{hub_metrics}")];
    let mut hub = start_hub_with(&tmp, f.hub_port, &url, &extra);
    let ports: BTreeMap<&str, u16> = CLUSTERS.iter().map(|c| (*c, free_port())).collect();
    let mut agents: BTreeMap<&str, Proc> = CLUSTERS
        .iter()
        .map(|c| {
            let listen = format!("127.0.0.1:{}", ports[c]);
            (*c, agent(&f, c, &["--metrics-listen", &listen], ""))
        })
        .collect();
    greeting_everywhere(&f, "hello").await;

    // The hub: agents connected equals the agents started; shop in sync on all three.
    let m = eventually(30, "the hub's metrics to show the fleet in sync", || async {
        let m = scrape(hub_metrics);
        (get(&m, "flotilla_hub_agents_connected", &[]) == Some(3.0)
            && get(&m, "flotilla_hub_cluster_apps", &[("app", "shop"), ("state", "in_sync")]) == Some(3.0))
        .then_some(m)
    })
    .await;
    assert_eq!(get(&m, "flotilla_hub_clusters", &[]), Some(3.0));
    assert_eq!(get(&m, "flotilla_hub_leader", &[]), Some(1.0));
    assert_eq!(get(&m, "flotilla_hub_git_failing", &[]), Some(0.0));
    assert!(get(&m, "flotilla_hub_sessions_opened_total", &[]).unwrap() >= 3.0);
    assert!(get(&m, "flotilla_hub_git_fetches_total", &[("result", "new")]).unwrap() >= 1.0);
    assert!(get(&m, "flotilla_hub_reports_total", &[]).unwrap() >= 3.0);
    assert_eq!(get(&m, "flotilla_hub_drift_items", &[("app", "shop")]), Some(0.0));
    assert_eq!(http_get(hub_metrics, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(http_get(hub_metrics, "/healthz").0, 200);
    for c in CLUSTERS {
        let a = eventually(30, &format!("{c}'s agent to say shop is applied and healthy"), || async {
            let a = scrape(ports[c]);
            (get(&a, "flotilla_agent_apps", &[("phase", "applied"), ("health", "healthy")]) == Some(1.0)).then_some(a)
        })
        .await;
        assert_eq!(get(&a, "flotilla_agent_connected", &[]), Some(1.0), "{c} is connected");
        assert_eq!(get(&a, "flotilla_agent_api_reachable", &[]), Some(1.0));
        let (code, body) = http_get(ports[c], "/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("flotilla_agent_apply_duration_seconds_count{kind=\"ConfigMap\"}"), "{body}");
        assert_eq!(http_get(ports[c], "/readyz").0, 200);
    }

    // Someone edits the object on eu-2 by hand: the agent reports the drift (policy: report) and so does the hub.
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(f.clients[1].clone(), "shop");
    let patch = serde_json::json!({"data": {"greeting": "edited by hand"}});
    cms.patch("shop-config", &kube::api::PatchParams::apply("someone").force(), &kube::api::Patch::Apply(
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shop-config"}, "data": patch["data"]}),
    ))
    .await
    .unwrap();
    eventually(30, "eu-2's agent to count the drift", || async {
        (get(&scrape(ports["eu-2"]), "flotilla_agent_drift_items", &[("app", "shop")]) == Some(1.0)).then_some(())
    })
    .await;
    eventually(30, "the hub to count the drift", || async {
        (get(&scrape(hub_metrics), "flotilla_hub_drift_items", &[("app", "shop")]) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(get(&scrape(ports["eu-1"]), "flotilla_agent_drift_items", &[("app", "shop")]), Some(0.0));

    // eu-1's API server answers 503 to everything: its agent counts the errors and says it is not reachable.
    let server = std::fs::read_to_string(tmp.join("kc/server")).unwrap().trim().to_string();
    flotilla_e2e::admin_patch(&server, "/admin/clusters/eu-1/faults", r#"{"error_rate": 1.0}"#);
    eventually(30, "eu-1's agent to count API errors", || async {
        let a = scrape(ports["eu-1"]);
        (get(&a, "flotilla_agent_api_errors_total", &[("code", "503")]).unwrap_or(0.0) >= 1.0
            && get(&a, "flotilla_agent_api_reachable", &[]) == Some(0.0))
        .then_some(())
    })
    .await;

    // The dashboard and the alert rules use only metrics the hub and agents export.
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for port in [hub_metrics, ports["eu-1"]] {
        let (_, body) = http_get(port, "/metrics");
        for l in body.lines() {
            // `# TYPE name counter`: a counter's samples are name_total, a histogram's name_bucket, _sum, _count.
            if let Some(t) = l.strip_prefix("# TYPE ") {
                let mut parts = t.split_whitespace();
                let (name, kind) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    _ => &[""],
                };
                exported.extend(suffixes.iter().map(|s| format!("{name}{s}")));
            }
        }
    }
    flotilla_e2e::admin_patch(&server, "/admin/clusters/eu-1/faults", r#"{"error_rate": 0.0}"#);

    // An agent stops: the hub counts two.
    agents.get_mut("us-1").unwrap().kill();
    eventually(30, "the hub to count two agents", || async {
        (get(&scrape(hub_metrics), "flotilla_hub_agents_connected", &[]) == Some(2.0)).then_some(())
    })
    .await;

    // A commit while us-1 is away: its wave waits for it, and the hub says since when the wave runs.
    commit(&f.repo, &[("apps/shop/manifests.yaml", Some(&shop("bonjour")))], "second");
    let m = eventually(60, "the others wave to progress, waiting for us-1", || async {
        let m = scrape(hub_metrics);
        get(&m, "flotilla_hub_rollout_wave_released_timestamp_seconds", &[("app", "shop"), ("wave", "others")])
            .map(|_| m)
    })
    .await;
    let since = get(&m, "flotilla_hub_rollout_wave_released_timestamp_seconds", &[("app", "shop"), ("wave", "others")]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(since.is_some_and(|t| t <= now && t > now - 120.0), "{since:?}");
    assert_eq!(get(&m, "flotilla_hub_rollout_waves", &[("app", "shop"), ("phase", "progressing")]), Some(1.0));
    let updating =
        get(&m, "flotilla_hub_rollout_wave_clusters", &[("app", "shop"), ("wave", "others"), ("outcome", "updating")]);
    assert!(updating.is_some_and(|n| n >= 1.0), "us-1 at least is updating: {updating:?}");
    assert_eq!(get(&m, "flotilla_hub_rollouts", &[("phase", "progressing")]), Some(1.0));
    let (_, body) = http_get(hub_metrics, "/metrics");
    exported.extend(
        body.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|t| t.split(' ').next().unwrap_or("").to_string()),
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability");
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let alerts = std::fs::read_to_string(root.join("alerts.yaml")).unwrap();
    let rules = alert_rules::parse(&alerts);
    assert!(
        rules.alerts >= 4,
        "alert rules for a stuck wave, disconnected agents, rising drift, a failing Git follower"
    );
    for name in metric_names(&dashboard).into_iter().chain(metric_names(&alerts)) {
        assert!(exported.contains(&name), "{name} is used by the dashboard or alerts but not exported: {exported:?}");
    }

    // A hub whose store is empty and whose repository cannot be fetched is alive but not ready.
    hub.kill();
    drop(agents);
    std::fs::rename(tmp.join("hub-data"), tmp.join("hub-data-old")).unwrap();
    let nowhere = format!("git://127.0.0.1:{}/nothing.git", free_port());
    let port = free_port();
    let hub2 = start_hub_with(&tmp, free_port(), &nowhere, &["--metrics-listen".into(), format!("127.0.0.1:{port}")]);
    eventually(30, "the endpoint", || async { (http_get(port, "/healthz").0 == 200).then_some(()) }).await;
    let (code, body) = eventually(30, "a failed first fetch", || async {
        let m = scrape(port);
        (get(&m, "flotilla_hub_git_fetches_total", &[("result", "failed")]).unwrap_or(0.0) >= 1.0)
            .then(|| http_get(port, "/readyz"))
    })
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("fleet repository"), "{body}");

    // The same unreachable repository, with the store that holds the fleet's commit: ready, serving it, and
    // the metrics say Git is failing.
    drop(hub2);
    std::fs::remove_dir_all(tmp.join("hub-data")).unwrap();
    std::fs::rename(tmp.join("hub-data-old"), tmp.join("hub-data")).unwrap();
    let port = free_port();
    let _hub3 = start_hub_with(&tmp, free_port(), &nowhere, &["--metrics-listen".into(), format!("127.0.0.1:{port}")]);
    eventually(30, "the hub with its store to say Git is failing", || async {
        let m = scrape(port);
        (get(&m, "flotilla_hub_git_failing", &[]) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(http_get(port, "/readyz"), (200, "ready\n".to_string()), "it serves the commit in its store");
}

/// The alert rules file, read just enough to count its alerts.
mod alert_rules {
    pub struct Rules {
        pub alerts: usize,
    }

    pub fn parse(text: &str) -> Rules {
        let v: serde_json::Value = serde_yaml::from_str(text).expect("alerts.yaml is YAML");
        let groups = v["groups"].as_array().expect("groups");
        let alerts = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["alert"].is_string() && r["expr"].is_string())
            .count();
        Rules { alerts }
    }
}
