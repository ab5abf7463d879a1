//! `flotilla-hub`: follows the fleet repository and serves agents and operators over mutual TLS.

use anyhow::Context;
use clap::Parser;
use flotilla_hub::git::{GitAuth, Secret};
use flotilla_hub::server::{run, HubConfig, HubTls};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "flotilla-hub", version, about = "Flotilla hub")]
struct Args {
    /// Address for agents and the platform API.
    #[arg(long, env = "FLOTILLA_HUB_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Fleet repository URL (file://, git://, http(s)://).
    #[arg(long, env = "FLOTILLA_HUB_REPO")]
    repo: String,
    /// Branch to follow.
    #[arg(long, env = "FLOTILLA_HUB_BRANCH", default_value = "main")]
    branch: String,
    /// Seconds between fetches.
    #[arg(long, env = "FLOTILLA_HUB_POLL_SECONDS", default_value_t = 15)]
    poll_seconds: u64,
    /// Directory for the hub's store and its clone of the repository.
    #[arg(long, env = "FLOTILLA_HUB_DATA_DIR", default_value = "flotilla-hub-data")]
    data_dir: PathBuf,
    /// Directory with ca.pem, hub.pem and hub-key.pem (see `flotilla certs`).
    #[arg(long, env = "FLOTILLA_HUB_CERTS_DIR", default_value = "flotilla-certs")]
    certs: PathBuf,
    /// User name for HTTPS Git credentials (GitHub accepts any with a token; GitLab wants oauth2).
    #[arg(long, env = "FLOTILLA_GIT_USERNAME", default_value = "x-access-token")]
    git_username: String,
    /// File holding the HTTPS Git password or token (read at every fetch, so rotation needs no restart).
    #[arg(long, env = "FLOTILLA_GIT_PASSWORD_FILE", conflicts_with = "git_ssh_key")]
    git_password_file: Option<PathBuf>,
    /// The HTTPS Git password or token itself (prefer --git-password-file).
    #[arg(long = "git-password", env = "FLOTILLA_GIT_PASSWORD", hide_env_values = true, conflicts_with_all = ["git_password_file", "git_ssh_key"])]
    git_password: Option<String>,
    /// SSH private key for ssh:// or user@host:path repositories.
    #[arg(long, env = "FLOTILLA_GIT_SSH_KEY")]
    git_ssh_key: Option<PathBuf>,
    /// known_hosts file pinning the Git host's key; without it the key is trusted on first use and pinned.
    #[arg(long, env = "FLOTILLA_GIT_KNOWN_HOSTS", requires = "git_ssh_key")]
    git_known_hosts: Option<PathBuf>,
    /// Address for the Git webhook (POST /hooks/git, GitHub and GitLab push events); off when unset.
    #[arg(long, env = "FLOTILLA_HUB_WEBHOOK_LISTEN")]
    webhook_listen: Option<SocketAddr>,
    /// File holding the webhook secret (GitHub's signing secret, GitLab's token).
    #[arg(long, env = "FLOTILLA_HUB_WEBHOOK_SECRET_FILE", requires = "webhook_listen")]
    webhook_secret_file: Option<PathBuf>,
    /// Seconds after a start during which agents that have not reconnected yet count as online for rollouts
    /// (offline rules wait); default: the agents' reconnect backoff cap with its jitter, plus a margin.
    #[arg(long, env = "FLOTILLA_HUB_RESTART_GRACE_SECONDS", default_value_t = flotilla_hub::hub::DEFAULT_GRACE.as_secs())]
    restart_grace_seconds: u64,
    /// Where the hub keeps its state: `embedded` (a file in the data directory, one hub) or
    /// `etcd://HOST:PORT[,HOST:PORT…]` (hub replicas: one leads, the others stand by).
    #[arg(long, env = "FLOTILLA_HUB_STORE", default_value = "embedded")]
    store: String,
    /// The key prefix of this fleet in etcd (several fleets can share one etcd).
    #[arg(long, env = "FLOTILLA_HUB_ETCD_PREFIX", default_value = "/flotilla/default")]
    etcd_prefix: String,
    /// CA certificate for TLS to etcd.
    #[arg(long, env = "FLOTILLA_HUB_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate and key for TLS to etcd.
    #[arg(long, env = "FLOTILLA_HUB_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_HUB_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// This replica's name (default: host name and process id).
    #[arg(long, env = "FLOTILLA_HUB_REPLICA")]
    replica: Option<String>,
    /// Seconds of the leader's lease: a leader that cannot renew it stops within this time.
    #[arg(long, env = "FLOTILLA_HUB_LEASE_SECONDS", default_value_t = 5)]
    lease_seconds: u64,
    /// Where the other hub replicas reach this one, `HOST:PORT` (default: the listen address; in Kubernetes the
    /// pod's address). Standbys forward operators' controls and webhooks' fetches to the leader there.
    #[arg(long, env = "FLOTILLA_HUB_ADVERTISE")]
    advertise: Option<String>,
    /// Where to serve `/metrics` (Prometheus), `/healthz` (alive) and `/readyz` (serving current state: the
    /// store open, a commit to serve, a replica caught up with etcd), plain HTTP. `--health-listen` is the same.
    #[arg(long, alias = "health-listen", env = "FLOTILLA_HUB_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// OTLP/gRPC collector for traces (`http://HOST:4317`): one trace per commit. Off when unset.
    #[arg(long, env = "FLOTILLA_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Clusters per commit whose spans (the hub's send, the agent's apply and healthy) a trace records.
    #[arg(long, env = "FLOTILLA_TRACE_CLUSTERS", default_value_t = flotilla_hub::traces::CLUSTER_SPANS)]
    trace_clusters: usize,
    /// `text`, or `json` (one object per line, with trace and span ids inside traced steps).
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", default_value = "text")]
    log_format: flotilla_common::telemetry::LogFormat,
    /// Operator roles (viewer, operator, admin, optionally scoped to apps or clusters), read again when the
    /// file changes (docs/security.md). Without it every operator certificate of the fleet's CA is an admin.
    #[arg(long, env = "FLOTILLA_HUB_ROLES")]
    roles: Option<PathBuf>,
    /// Revoked certificate serials, one per line (hex): their sessions end and their calls are refused
    /// within seconds of the file changing.
    #[arg(long, env = "FLOTILLA_HUB_REVOKED")]
    revoked: Option<PathBuf>,
    /// Also write every audit record as a JSON line to this file (`-`: stdout), for a log pipeline.
    #[arg(long, env = "FLOTILLA_HUB_AUDIT_LOG")]
    audit_log: Option<String>,
    /// Where agents join with a bootstrap token (`flotilla join-token create`): server TLS with the hub's
    /// certificate, no client certificate. Needs ca-key.pem in the certificates directory.
    #[arg(long, env = "FLOTILLA_HUB_BOOTSTRAP_LISTEN")]
    bootstrap_listen: Option<std::net::SocketAddr>,
    /// How long the certificates the hub issues to joining and renewing agents are valid (agents renew
    /// theirs when a third of it is left).
    #[arg(long, env = "FLOTILLA_HUB_CERT_TTL", default_value = "30d", value_parser = flotilla_common::identity::parse_ttl)]
    cert_ttl: Duration,
}

/// The store the flags name.
fn store_choice(args: &Args) -> anyhow::Result<flotilla_hub::server::StoreChoice> {
    if args.store == "embedded" {
        return Ok(flotilla_hub::server::StoreChoice::Embedded);
    }
    #[cfg(feature = "etcd")]
    {
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let tls = match &args.etcd_ca {
            Some(ca) => Some(flotilla_hub::etcd::EtcdTls {
                ca_pem: read(ca)?,
                cert_pem: args.etcd_cert.as_ref().map(read).transpose()?,
                key_pem: args.etcd_key.as_ref().map(read).transpose()?,
            }),
            None => None,
        };
        let etcd = flotilla_hub::etcd::EtcdConfig::parse(&args.store, &args.etcd_prefix, tls)
            .map_err(|e| anyhow::anyhow!("--store: {e}"))?;
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string();
        let replica = args.replica.clone().unwrap_or_else(|| format!("{}-{}", host, std::process::id()));
        Ok(flotilla_hub::server::StoreChoice::Etcd {
            etcd,
            replica,
            lease: Duration::from_secs(args.lease_seconds.max(2)),
        })
    }
    #[cfg(not(feature = "etcd"))]
    anyhow::bail!(
        "--store {}: this hub was built without etcd support (build it with `cargo build -p flotilla-hub --features etcd`, \
         which needs protoc: apt-get install protobuf-compiler)",
        args.store
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_common::install_crypto_provider();
    let args = Args::parse();
    let _telemetry = flotilla_common::telemetry::init(&flotilla_common::telemetry::Options {
        service: "flotilla-hub",
        instance: args.replica.clone().unwrap_or_else(|| args.listen.to_string()),
        otlp_endpoint: args.otlp_endpoint.clone(),
        log_format: args.log_format,
        roots: flotilla_common::telemetry::Roots::Keep,
    })?;
    let read = |f: &str| {
        let p = args.certs.join(f);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let tls = HubTls { ca_pem: read("ca.pem")?, cert_pem: read("hub.pem")?, key_pem: read("hub-key.pem")? };
    let auth = match (&args.git_ssh_key, &args.git_password_file, &args.git_password) {
        (Some(key), _, _) => GitAuth::Ssh { key_file: key.clone(), known_hosts: args.git_known_hosts.clone() },
        (None, Some(file), _) => {
            GitAuth::Basic { username: args.git_username.clone(), password: Secret::File(file.clone()) }
        }
        (None, None, Some(p)) => {
            GitAuth::Basic { username: args.git_username.clone(), password: Secret::Literal(p.clone()) }
        }
        (None, None, None) => GitAuth::None,
    };
    if let GitAuth::Basic { password, .. } = &auth {
        password.read().context("reading the Git password or token")?;
    }
    let webhook = args.webhook_listen.map(|addr| (addr, args.webhook_secret_file.clone().map(Secret::File)));
    if let Some((_, Some(secret))) = &webhook {
        secret.read().context("reading the webhook secret")?;
    }
    let store = store_choice(&args)?;
    let sink = match &args.audit_log {
        Some(t) => Some(flotilla_hub::audit::Sink::open(t).with_context(|| format!("--audit-log {t}"))?),
        None => None,
    };
    let identities = flotilla_hub::identities::Identities::load(args.roles.clone(), args.revoked.clone(), sink)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let shutdown = flotilla_common::process::shutdown_on_signal();
    let cfg = HubConfig {
        listen: args.listen,
        repo: args.repo,
        branch: args.branch,
        poll: Duration::from_secs(args.poll_seconds.max(1)),
        data_dir: args.data_dir,
        tls,
        auth,
        webhook,
        in_process: None,
        grace: Duration::from_secs(args.restart_grace_seconds),
        store,
        advertise: args.advertise,
        metrics: args.metrics_listen,
        traces: args.otlp_endpoint.is_some().then_some(args.trace_clusters),
        identities: std::sync::Arc::new(identities),
        bootstrap: args.bootstrap_listen,
        certs_dir: Some(args.certs.clone()),
        signer: flotilla_hub::bootstrap::Signer::load(&args.certs, args.cert_ttl)
            .with_context(|| format!("reading the fleet CA in {}", args.certs.display()))?
            .map(std::sync::Arc::new),
    };
    run(cfg, shutdown, None).await
}
