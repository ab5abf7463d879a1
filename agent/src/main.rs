//! `flotilla-agent`: the agent of one cluster.

use anyhow::Context;
use clap::Parser;
use flotilla_agent::apply::Applier;
use flotilla_agent::engine::{start, EngineConfig};
use flotilla_agent::session::{run, AgentConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "flotilla-agent", version, about = "Flotilla agent")]
struct Args {
    /// The hub, https://HOST:PORT; several replicas separated by commas (https://a:7443,https://b:7443): the
    /// agent moves to another when its replica is lost.
    #[arg(long, env = "FLOTILLA_AGENT_HUB")]
    hub: String,
    /// The name in the hub's certificate, when the URL's host is not it.
    #[arg(long, env = "FLOTILLA_AGENT_HUB_NAME")]
    hub_name: Option<String>,
    /// The fleet CA certificate.
    #[arg(long, env = "FLOTILLA_AGENT_CA")]
    ca: PathBuf,
    /// This cluster's certificate (its name is the cluster's identity). When it does not exist and a join
    /// token is given, the agent joins and writes it (and its key) here; renewed certificates replace it.
    #[arg(long, env = "FLOTILLA_AGENT_CERT", required_unless_present = "cert_secret")]
    cert: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_AGENT_KEY", required_unless_present = "cert_secret")]
    key: Option<PathBuf>,
    /// The cluster's name, for joining (the certificate names it afterwards).
    #[arg(long, env = "FLOTILLA_AGENT_CLUSTER")]
    cluster: Option<String>,
    /// A join token (`flotilla join-token create CLUSTER`), used when --cert does not exist yet.
    #[arg(long, env = "FLOTILLA_AGENT_BOOTSTRAP_TOKEN", hide_env_values = true, requires_all = ["cluster", "bootstrap_url"])]
    bootstrap_token: Option<String>,
    /// The hub's bootstrap port, https://HOST:PORT (its `--bootstrap-listen`).
    #[arg(long, env = "FLOTILLA_AGENT_BOOTSTRAP_URL")]
    bootstrap_url: Option<String>,
    /// Keep the certificate and key in this Secret of the state namespace (`tls.crt`, `tls.key`) instead of
    /// the --cert and --key files: what an agent in a cluster wants (it survives restarts and moves).
    #[arg(long, env = "FLOTILLA_AGENT_CERT_SECRET")]
    cert_secret: Option<String>,
    /// Renew the certificate when this little of its lifetime is left (default: a third of it).
    #[arg(long, env = "FLOTILLA_AGENT_RENEW_BEFORE", value_parser = flotilla_common::identity::parse_ttl)]
    renew_before: Option<Duration>,
    /// Kubeconfig of the cluster; without it, KUBECONFIG or the in-cluster configuration.
    #[arg(long, env = "FLOTILLA_AGENT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace where the agent keeps its state (the last desired state of each app and its inventory).
    #[arg(long, env = "FLOTILLA_AGENT_STATE_NAMESPACE", default_value = "flotilla-system")]
    state_namespace: String,
    /// Most API calls in flight at once.
    #[arg(long, env = "FLOTILLA_AGENT_CONCURRENCY", default_value_t = 8)]
    concurrency: usize,
    /// Run as one of several agents of this cluster (a Deployment with replicas, a DaemonSet): this agent's
    /// name (the pod's); the one holding the `flotilla-agent` Lease in the state namespace is active.
    #[arg(long, env = "FLOTILLA_AGENT_REPLICA")]
    replica: Option<String>,
    /// Seconds of the agents' Lease: a standby takes over when the active agent has not renewed it for this long.
    #[arg(long, env = "FLOTILLA_AGENT_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Where to serve `/metrics` (Prometheus), `/healthz` (alive) and `/readyz` (its state read from the
    /// cluster and enforced), plain HTTP.
    #[arg(long, env = "FLOTILLA_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// OTLP/gRPC collector for traces (`http://HOST:4317`): the agent's spans of the commits the hub traces.
    #[arg(long, env = "FLOTILLA_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// `text`, or `json` (one object per line, with trace and span ids inside traced steps).
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", default_value = "text")]
    log_format: flotilla_common::telemetry::LogFormat,
}

/// What `/metrics` and `/readyz` ask.
struct Observe(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl flotilla_common::telemetry::endpoint::Observed for Observe {
    fn metrics(&self) -> String {
        flotilla_agent::telemetry::METRICS.encode()
    }
    fn ready(&self) -> Result<(), String> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the agent has not read its state from the cluster yet (it holds the agents' Lease)".into())
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_common::install_crypto_provider();
    let args = Args::parse();
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let ca_pem = read(&args.ca)?;
    let bootstrap = match (&args.bootstrap_url, &args.bootstrap_token, &args.cluster) {
        (Some(u), Some(t), Some(c)) => Some((u.as_str(), t.as_str(), c.as_str())),
        _ => None,
    };
    // The cluster's name for the logs: from the certificate when there is one, else the one it joins as.
    let named = args
        .cert
        .as_ref()
        .and_then(|c| std::fs::read_to_string(c).ok())
        .and_then(|p| match flotilla_common::identity::identity_of_pem(&p) {
            Ok(flotilla_common::identity::Identity::Cluster(c)) => Some(c),
            _ => None,
        })
        .or_else(|| args.cluster.clone())
        .unwrap_or_default();
    let _telemetry = flotilla_common::telemetry::init(&flotilla_common::telemetry::Options {
        service: "flotilla-agent",
        instance: named,
        otlp_endpoint: args.otlp_endpoint.clone(),
        log_format: args.log_format,
        roots: flotilla_common::telemetry::Roots::FollowOnly,
    })?;
    let kube_cfg = match &args.kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = flotilla_agent::kube_client::client(kube_cfg)?;
    let shutdown = flotilla_common::process::shutdown_on_signal();
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        tracing::info!(addr = %l.local_addr()?, "/metrics, /healthz and /readyz listening");
        let observe = std::sync::Arc::new(Observe(ready.clone()));
        tokio::spawn(flotilla_common::telemetry::endpoint::serve(observe, l, shutdown.clone()));
    }
    let applier = std::sync::Arc::new(Applier::with_concurrency(client, args.concurrency));
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(identity) = args.replica.clone() {
        // Only the active agent applies and talks to the hub; a standby waits for the Lease.
        let lease = flotilla_agent::lease::LeaseConfig {
            namespace: args.state_namespace.clone(),
            identity,
            duration: Duration::from_secs(args.lease_seconds.max(2)),
        };
        flotilla_agent::state::StateStore::new(applier.client(), &args.state_namespace)
            .ensure_namespace(applier.client())
            .await
            .context("creating the state namespace")?;
        // A standby is ready: it does its job, waiting.
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let Some(held) = flotilla_agent::lease::acquire(applier.client(), lease, shutdown.clone()).await else {
            return Ok(());
        };
        ready.store(false, std::sync::atomic::Ordering::SeqCst);
        let (stop, flag) = (shutdown.clone(), lost.clone());
        tokio::spawn(async move {
            held.lost.cancelled().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            stop.cancel();
        });
    }
    let engine_cfg = EngineConfig { state_namespace: args.state_namespace.clone(), ..EngineConfig::default() };
    let engine_client = applier.client();
    // The state kept in the cluster is enforced before (and without) any hub.
    let engine = start(applier, engine_cfg, shutdown.clone()).await.context("starting the engine")?;
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    // After the Lease (with replicas): the active agent joins, a standby finds what it kept.
    if args.cert_secret.is_some() {
        flotilla_agent::state::StateStore::new(engine_client.clone(), &args.state_namespace)
            .ensure_namespace(engine_client.clone())
            .await
            .context("creating the state namespace")?;
    }
    let keep = match &args.cert_secret {
        Some(name) => flotilla_agent::certs::Keep::Secret {
            client: engine_client.clone(),
            namespace: args.state_namespace.clone(),
            name: name.clone(),
        },
        None => flotilla_agent::certs::Keep::Files(
            args.cert.clone().unwrap_or_default(),
            args.key.clone().unwrap_or_default(),
        ),
    };
    let (cert_pem, key_pem) = flotilla_agent::certs::obtain(&keep, bootstrap, args.hub_name.as_deref(), &ca_pem)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let cluster = match flotilla_common::identity::identity_of_pem(&cert_pem) {
        Ok(flotilla_common::identity::Identity::Cluster(c)) => c,
        Ok(other) => anyhow::bail!("the agent's certificate is the certificate of {other}, not of a cluster"),
        Err(e) => anyhow::bail!("the agent's certificate: {e}"),
    };
    let _ = flotilla_agent::telemetry::CLUSTER.set(cluster.clone());
    if let Some(c) = args.cluster.as_deref().filter(|c| *c != cluster) {
        anyhow::bail!("--cluster {c}, but the agent's certificate is the certificate of cluster {cluster}");
    }
    let credentials =
        flotilla_agent::certs::Credentials::new(cert_pem.clone(), key_pem.clone(), Some(keep), args.renew_before);
    let cfg = AgentConfig {
        hub: args.hub.clone(),
        hub_name: args.hub_name.clone(),
        ca_pem,
        cert_pem,
        key_pem,
        in_process: None,
        credentials: Some(std::sync::Arc::new(credentials)),
    };
    run(cfg, engine, shutdown).await;
    if lost.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("this agent lost the agents' Lease and stopped (another agent of the cluster is active)");
    }
    Ok(())
}
