//! `flotilla-sim`: many simulated Kubernetes clusters in one process, each served through the real
//! Kubernetes REST API at the root of its own base URL (HTTPS on one shared port, the cluster chosen by the
//! TLS server name; plain HTTP under a path prefix `http://ADDR/clusters/<name>` stays for scripts), so
//! kubectl, kube-rs and the Flotilla agent talk to it as to a real API server.
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
pub mod admission;
pub mod controllers;
pub mod discovery;
pub mod error;
pub mod fields;
pub mod kinds;
pub mod normalize;
pub mod openapi;
pub mod ops;
pub mod patch;
pub mod pods;
pub mod protobuf;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod server;
pub mod store;
pub mod table;
pub mod tls;

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
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
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
    /// Kubeconfigs point at HTTPS (the default: HTTP/2, every cluster at the root of its URL) or at plain
    /// HTTP under `/clusters/<name>`. Both are served on the same port either way.
    pub tls: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            clusters: Vec::new(),
            behaviour: Behaviour::default(),
            history: 1024,
            bookmark_interval: Duration::from_secs(5),
            tls: true,
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
    tls: tls::SimTls,
    kubeconfig_tls: bool,
    /// Open client connections (TCP), for the admin API and benchmarks.
    pub connections: std::sync::atomic::AtomicUsize,
}

fn valid_cluster_name(n: &str) -> bool {
    kinds::dns_subdomain(n) && n.len() <= 63
}

impl Inner {
    /// A connection to `cluster`'s API server inside this process: an in-memory pipe served as a TLS
    /// connection whose server name chose the cluster is (HTTP/2 or HTTP/1.1, the API at the root), for
    /// thousands of clients without a file descriptor each. `None` when the cluster does not exist or is
    /// offline.
    pub fn connect_in_process(self: &Arc<Self>, cluster: &str) -> Option<tokio::io::DuplexStream> {
        let c = self.cluster(cluster)?;
        if c.faults().offline || self.shutdown.is_cancelled() {
            return None;
        }
        let (client, server) = tokio::io::duplex(256 * 1024);
        let inner = self.clone();
        let span = tracing::debug_span!("conn", cluster = %c.name, transport = "in-process");
        tokio::spawn(
            async move {
                let _open = Open::new(InnerConns(inner.clone()));
                let _per_cluster = Open::new(ClusterConns(c.clone()));
                let stop = inner.shutdown.clone();
                tokio::select! {
                    _ = serve_io(inner, TokioIo::new(server), Some(c), None) => {}
                    _ = stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
        Some(client)
    }

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
        let opts = ops::WriteOpts { dry_run: false, field_manager: "kube-apiserver".into(), ..Default::default() };
        for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}});
            ops::create(&c, &ns, None, body, &opts)
                .map_err(|e| SimError::SeedFailed { cluster: name.into(), message: e.message })?;
        }
        Ok(c)
    }

    /// The base URL of a cluster's API server in its kubeconfig (for HTTPS, with [`tls::server_name`] as
    /// the TLS server name).
    pub fn server_url(&self, cluster: &str) -> String {
        if self.kubeconfig_tls {
            format!("https://{}", self.addr)
        } else {
            self.plain_url(cluster)
        }
    }

    /// The cluster's API over plain HTTP, under its path prefix.
    pub fn plain_url(&self, cluster: &str) -> String {
        format!("http://{}/clusters/{cluster}", self.addr)
    }

    /// The CA certificate (PEM) that signs the simulator's server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.tls.ca_pem
    }

    /// A kubeconfig for one cluster (context and cluster named after it, namespace `default`).
    pub fn kubeconfig(&self, cluster: &str) -> String {
        let tls = if self.kubeconfig_tls {
            use base64::Engine;
            format!(
                "    tls-server-name: {}\n    certificate-authority-data: {}\n",
                tls::server_name(cluster),
                base64::engine::general_purpose::STANDARD.encode(&self.tls.ca_pem)
            )
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {c}\n  cluster:\n    server: {url}\n{tls}contexts:\n- name: {c}\n  context:\n    cluster: {c}\n    user: {c}\n    namespace: default\ncurrent-context: {c}\nusers:\n- name: {c}\n  user: {user}\npreferences: {{}}\n",
            c = cluster,
            url = self.server_url(cluster),
            // kubectl asks for a user name and password on a terminal when an HTTPS user has no
            // credentials; the simulator takes any bearer token (it does no authentication).
            user = if self.kubeconfig_tls { "\n    token: flotilla-sim" } else { "{}" }
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
            tls: tls::SimTls::generate(addr.ip())?,
            kubeconfig_tls: cfg.tls,
            connections: Default::default(),
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

    pub fn plain_url(&self, cluster: &str) -> String {
        self.inner.plain_url(cluster)
    }

    pub fn ca_pem(&self) -> &str {
        self.inner.ca_pem()
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

    /// A connection to `cluster`'s API server inside this process; see [`Inner::connect_in_process`].
    pub fn connect_in_process(&self, cluster: &str) -> Option<tokio::io::DuplexStream> {
        self.inner.connect_in_process(cluster)
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
    let acceptor = tokio_rustls::TlsAcceptor::from(inner.tls.config.clone());
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, peer) = match conn {
                    Ok(c) => { backoff = Duration::from_millis(10); c }
                    Err(e) => {
                        // Out of file descriptors, most often: wait and keep serving the connections we have.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let task = connection(inner.clone(), stream, acceptor.clone(), graceful.watcher());
                tokio::spawn(task.instrument(tracing::debug_span!("conn", %peer)));
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

/// Counts a connection while it is open.
struct Open<T: AsRef<std::sync::atomic::AtomicUsize>>(T);

impl<T: AsRef<std::sync::atomic::AtomicUsize>> Open<T> {
    fn new(n: T) -> Self {
        n.as_ref().fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Open(n)
    }
}

impl<T: AsRef<std::sync::atomic::AtomicUsize>> Drop for Open<T> {
    fn drop(&mut self) {
        self.0.as_ref().fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct InnerConns(Arc<Inner>);
impl AsRef<std::sync::atomic::AtomicUsize> for InnerConns {
    fn as_ref(&self) -> &std::sync::atomic::AtomicUsize {
        &self.0.connections
    }
}
struct ClusterConns(Arc<Cluster>);
impl AsRef<std::sync::atomic::AtomicUsize> for ClusterConns {
    fn as_ref(&self) -> &std::sync::atomic::AtomicUsize {
        &self.0.connections
    }
}

/// How long a client may take to send its first bytes and finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One client connection: TLS (first byte 0x16, a handshake record) or plain HTTP on the same port; HTTP/2
/// or HTTP/1.1 either way. Over TLS the server name picks the cluster for the connection's life.
async fn connection(
    inner: Arc<Inner>,
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _open = Open::new(InnerConns(inner.clone()));
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == 0x16,
        _ => return,
    };
    if !is_tls {
        serve_io(inner, TokioIo::new(stream), None, Some(watcher)).await;
        return;
    }
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
        Err(_) => return debug!("TLS handshake timed out"),
    };
    let sni = tls.get_ref().1.server_name().map(str::to_string);
    let bound = match sni.as_deref().and_then(tls::cluster_of) {
        None => None,
        Some(name) => match inner.cluster(name) {
            // An offline cluster is a dead network: the connection closes without an answer.
            Some(c) if c.faults().offline => return,
            Some(c) => Some(c),
            None => return debug!(cluster = name, "TLS server name names no simulated cluster"),
        },
    };
    let _per_cluster = bound.clone().map(|c| Open::new(ClusterConns(c)));
    serve_io(inner.clone(), TokioIo::new(tls), bound.clone(), Some(watcher)).await;
}

async fn serve_io<I>(
    inner: Arc<Inner>,
    io: TokioIo<I>,
    bound: Option<Arc<Cluster>>,
    watcher: Option<hyper_util::server::graceful::Watcher>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // A bound connection closes when its cluster goes offline; any connection when a request finds its
    // cluster offline.
    let kill = bound.as_ref().map(|c| c.cut_token().child_token()).unwrap_or_default();
    let kill2 = kill.clone();
    let svc = hyper::service::service_fn(move |req| server::handle(inner.clone(), req, kill2.clone(), bound.clone()));
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        // A client's watches and requests share its connection (the real API server allows 250 streams).
        .max_concurrent_streams(250)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(io, svc).into_owned();
    let served = async move {
        match watcher {
            Some(w) => w.watch(conn).await,
            None => conn.await,
        }
    };
    tokio::select! {
        r = served => if let Err(e) = r {
            debug!(error = %e, "connection ended with an error");
        },
        // Dropping the connection closes the socket without an answer.
        _ = kill.cancelled() => debug!("connection dropped: cluster offline"),
    }
}
