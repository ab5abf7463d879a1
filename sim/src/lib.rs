//! `flotilla-sim`: many simulated Kubernetes clusters in one process, each served through the real
//! Kubernetes REST API under its own path prefix (`http://ADDR/clusters/<name>`), so kubectl, kube-rs and
//! the Flotilla agent talk to it as to a real API server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flotilla_sim::SimError> {
//! let sim = flotilla_sim::Simulator::start(flotilla_sim::SimConfig::with_clusters(["eu-1", "us-1"])).await?;
//! let kubeconfig_yaml = sim.kubeconfig("eu-1");
//! sim.write_kubeconfigs(std::path::Path::new("/tmp/kubeconfigs"))?;
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! See `docs/sim.md` for what is simulated and how faithfully.

pub mod admin;
pub mod controllers;
pub mod discovery;
pub mod error;
pub mod fields;
pub mod kinds;
pub mod ops;
pub mod patch;
pub mod resources;
pub mod selector;
pub mod server;
pub mod store;
pub mod table;

use hyper_util::rt::TokioIo;
use resources::ResourceDef;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
pub use store::{Behaviour, Cluster, Faults, Settings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("binding {addr} failed")]
    BindFailed {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid cluster name {0:?}: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit")]
    InvalidClusterName(String),
    #[error("a cluster named {0:?} already exists")]
    DuplicateCluster(String),
    #[error("fail_images is not a valid regular expression")]
    InvalidFailureRule(#[source] regex::Error),
    #[error("writing kubeconfig {path} failed")]
    WriteKubeconfigFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("seeding cluster {cluster} failed: {message}")]
    SeedFailed { cluster: String, message: String },
}

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub clusters: Vec<String>,
    pub behaviour: Behaviour,
    /// Events kept per cluster for resuming watches.
    pub history: usize,
    pub bookmark_interval: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            clusters: Vec::new(),
            behaviour: Behaviour::default(),
            history: 1024,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

impl SimConfig {
    pub fn with_clusters<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        SimConfig { clusters: names.into_iter().map(Into::into).collect(), ..Default::default() }
    }

    /// `prefix-0001` … `prefix-N`, zero-padded to a fixed width.
    pub fn numbered(prefix: &str, n: usize) -> Vec<String> {
        let width = n.to_string().len().max(2);
        (1..=n).map(|i| format!("{prefix}{i:0width$}")).collect()
    }
}

/// State shared by every connection.
pub struct Inner {
    pub builtins: Vec<Arc<ResourceDef>>,
    clusters: RwLock<BTreeMap<String, Arc<Cluster>>>,
    pub addr: SocketAddr,
    pub bookmark_interval: Duration,
    pub shutdown: CancellationToken,
    settings: Arc<Settings>,
    history: usize,
}

fn valid_cluster_name(n: &str) -> bool {
    kinds::dns_subdomain(n) && n.len() <= 63
}

impl Inner {
    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        self.clusters.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub fn add_cluster(&self, name: &str) -> Result<Arc<Cluster>, SimError> {
        if !valid_cluster_name(name) {
            return Err(SimError::InvalidClusterName(name.to_string()));
        }
        let c = Arc::new(Cluster::new(name.to_string(), self.settings.clone(), self.history));
        {
            let mut map = self.clusters.write().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(name) {
                return Err(SimError::DuplicateCluster(name.to_string()));
            }
            map.insert(name.to_string(), c.clone());
        }
        let ns = self.builtins.iter().find(|d| d.kind == "Namespace").cloned().expect("built-in kind");
        let opts = ops::WriteOpts { dry_run: false, field_manager: "kube-apiserver".into(), force: false };
        for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}});
            ops::create(&c, &ns, None, body, &opts)
                .map_err(|e| SimError::SeedFailed { cluster: name.into(), message: e.message })?;
        }
        Ok(c)
    }

    pub fn server_url(&self, cluster: &str) -> String {
        format!("http://{}/clusters/{cluster}", self.addr)
    }

    /// A kubeconfig for one cluster (context and cluster named after it, namespace `default`).
    pub fn kubeconfig(&self, cluster: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {c}\n  cluster:\n    server: {url}\ncontexts:\n- name: {c}\n  context:\n    cluster: {c}\n    user: {c}\n    namespace: default\ncurrent-context: {c}\nusers:\n- name: {c}\n  user: {{}}\npreferences: {{}}\n",
            c = cluster,
            url = self.server_url(cluster)
        )
    }
}

/// A running simulator.
pub struct Simulator {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Simulator {
    pub async fn start(cfg: SimConfig) -> Result<Simulator, SimError> {
        let settings = Settings::new(cfg.behaviour.clone()).map_err(SimError::InvalidFailureRule)?;
        let listener =
            TcpListener::bind(cfg.listen).await.map_err(|source| SimError::BindFailed { addr: cfg.listen, source })?;
        let addr = listener.local_addr().map_err(|source| SimError::BindFailed { addr: cfg.listen, source })?;
        let inner = Arc::new(Inner {
            builtins: resources::builtins(),
            clusters: RwLock::new(BTreeMap::new()),
            addr,
            bookmark_interval: cfg.bookmark_interval,
            shutdown: CancellationToken::new(),
            settings: Arc::new(settings),
            history: cfg.history.max(1),
        });
        for name in &cfg.clusters {
            inner.add_cluster(name)?;
        }
        let task = tokio::spawn(accept_loop(listener, inner.clone()).instrument(tracing::info_span!("sim", %addr)));
        info!(%addr, clusters = cfg.clusters.len(), "simulator listening");
        Ok(Simulator { inner, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}/admin", self.inner.addr)
    }

    pub fn server_url(&self, cluster: &str) -> String {
        self.inner.server_url(cluster)
    }

    pub fn kubeconfig(&self, cluster: &str) -> String {
        self.inner.kubeconfig(cluster)
    }

    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.inner.cluster(name)
    }

    pub fn cluster_names(&self) -> Vec<String> {
        self.inner.clusters().iter().map(|c| c.name.clone()).collect()
    }

    pub fn add_cluster(&self, name: &str) -> Result<(), SimError> {
        self.inner.add_cluster(name).map(|_| ())
    }

    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Writes `DIR/<cluster>.kubeconfig` for every cluster.
    pub fn write_kubeconfigs(&self, dir: &Path) -> Result<Vec<PathBuf>, SimError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| SimError::WriteKubeconfigFailed { path: dir.to_path_buf(), source })?;
        let mut out = Vec::new();
        for c in self.inner.clusters() {
            let path = dir.join(format!("{}.kubeconfig", c.name));
            std::fs::write(&path, self.kubeconfig(&c.name))
                .map_err(|source| SimError::WriteKubeconfigFailed { path: path.clone(), source })?;
            out.push(path);
        }
        Ok(out)
    }

    /// Stops accepting, ends open watches, and waits (at most 5 s) for connections to finish.
    pub async fn shutdown(self) {
        self.inner.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Resolves when the accept loop ends (it only ends on shutdown).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, peer) = match conn {
                    Ok(c) => { backoff = Duration::from_millis(10); c }
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let inner2 = inner.clone();
                let kill = CancellationToken::new();
                let kill2 = kill.clone();
                let svc = hyper::service::service_fn(move |req| server::handle(inner2.clone(), req, kill2.clone()));
                let conn = hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), svc);
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    tokio::select! {
                        r = fut => if let Err(e) = r {
                            debug!(%peer, error = %e, "connection ended with an error");
                        },
                        // Dropping the connection closes the socket without an answer.
                        _ = kill.cancelled() => debug!(%peer, "connection dropped: cluster offline"),
                    }
                }.instrument(tracing::debug_span!("conn")));
            }
            _ = inner.shutdown.cancelled() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => debug!("all connections closed"),
        _ = tokio::time::sleep(Duration::from_secs(5)) => warn!("connections still open after 5s; closing"),
    }
}
