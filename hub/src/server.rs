//! The hub process: its configuration, the gRPC server (mutual TLS over TCP and over in-process pipes), and
//! the loops it runs (Git follower, the state machine's writer). The parts live in their own modules:
//! [`crate::machine`] (the state machine), [`crate::hub`] (its writer and snapshots, the Git sync),
//! [`crate::sessions`] (agent sessions), [`crate::platform`] (operators' views and controls).

use crate::git::Follower;
pub use crate::hub::{error_chain, Clock, Hub, Options};
use crate::platform::PlatformApi;
pub use crate::report::{AppReport, ClusterReport, Rendering};
use crate::sessions::AgentApi;
use crate::store::Store;
use flotilla_proto::agent::v1::agent_service_server::AgentServiceServer;
use flotilla_proto::platform::v1::platform_service_server::PlatformServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tracing::{info, warn, Instrument};

/// How long a TLS handshake on the gRPC port may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message an agent may send (a status report of every app with its first drift items).
pub const MAX_AGENT_MESSAGE: usize = 8 << 20;
/// The largest request an operator may send.
pub const MAX_OPERATOR_MESSAGE: usize = 1 << 20;
/// Streams one connection may hold open (an agent needs two, an operator a few).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
const MAX_HEADER_BYTES: u32 = 64 << 10;

impl Hub {
    /// Serves agents and operators on `listener` with mutual TLS until shutdown, and on the in-process
    /// connections `in_process` delivers (mutual TLS as well, over memory).
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: &HubTls,
        in_process: Option<mpsc::Receiver<tokio::io::DuplexStream>>,
    ) -> Result<(), tonic::transport::Error> {
        // A stranger who connects and never finishes the handshake is cut off.
        let tls = ServerTlsConfig::new()
            .identity(TlsIdentity::from_pem(&tls.cert_pem, &tls.key_pem))
            .client_ca_root(Certificate::from_pem(&tls.ca_pem))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        let shutdown = self.shared.shutdown.clone();
        let server = |hub: Arc<Hub>| -> Result<_, tonic::transport::Error> {
            Ok(Server::builder()
                .tls_config(tls.clone())?
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
                .http2_max_header_list_size(Some(MAX_HEADER_BYTES))
                .add_service(
                    AgentServiceServer::new(AgentApi(hub.clone())).max_decoding_message_size(MAX_AGENT_MESSAGE),
                )
                .add_service(
                    PlatformServiceServer::new(PlatformApi(hub)).max_decoding_message_size(MAX_OPERATOR_MESSAGE),
                ))
        };
        let memory = match in_process {
            Some(rx) => {
                let incoming = ReceiverStream::new(rx).map(|io| Ok::<_, std::io::Error>(InProcessConn(io)));
                let router = server(self.clone())?;
                let stop = shutdown.clone().cancelled_owned();
                Some(tokio::spawn(async move { router.serve_with_incoming_shutdown(incoming, stop).await }))
            }
            None => None,
        };
        let served = server(self)?
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
            .await;
        if let Some(m) = memory {
            if let Ok(Err(e)) = m.await {
                warn!(error = %e, "serving in-process connections failed");
            }
        }
        served
    }
}

/// A connection from inside the process (the agents of a local fleet): the same mutual TLS as over TCP,
/// over an in-memory pipe, so thousands of agents need no file descriptor each.
pub struct InProcessConn(pub tokio::io::DuplexStream);

impl tokio::io::AsyncRead for InProcessConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for InProcessConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for InProcessConn {
    // The TCP type, so that the client certificate is found where the API handlers look for it.
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo { local_addr: None, remote_addr: None }
    }
}

/// The hub's TLS material, PEM-encoded.
pub struct HubTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Everything the hub binary needs.
pub struct HubConfig {
    pub listen: SocketAddr,
    pub repo: String,
    pub branch: String,
    pub poll: Duration,
    pub data_dir: std::path::PathBuf,
    pub tls: HubTls,
    pub auth: crate::git::GitAuth,
    /// Where to serve the Git webhook (plain HTTP, usually behind the ingress that terminates TLS), and
    /// the secret events must prove.
    pub webhook: Option<(SocketAddr, Option<crate::git::Secret>)>,
    /// In-process connections to serve beside the listener (a local fleet's agents).
    pub in_process: Option<mpsc::Receiver<tokio::io::DuplexStream>>,
    /// After a start, how long offline rules wait for agents to reconnect.
    pub grace: Duration,
    pub store: StoreChoice,
}

/// Where the hub keeps its state.
#[derive(Debug, Clone, Default)]
pub enum StoreChoice {
    /// One hub: the embedded store in the data directory.
    #[default]
    Embedded,
    /// Hub replicas on etcd: the one that wins the election leads; the others wait as standbys.
    #[cfg(feature = "etcd")]
    Etcd {
        etcd: crate::etcd::EtcdConfig,
        /// This replica's name in the election key.
        replica: String,
        /// The leader's lease: a leader that cannot renew it stops within this time; a standby takes over.
        lease: Duration,
    },
}

/// Runs a hub until `shutdown` is cancelled. Returns the bound address through `bound`.
pub async fn run(
    cfg: HubConfig,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    #[allow(unused_mut)]
    let mut epoch = 0;
    let started_ms = crate::hub::now_ms();
    // What this replica tells the others (and `flotilla hubs`): its sessions, whether it leads.
    let sessions_now = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let leading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    #[cfg(feature = "etcd")]
    let mut replica_view: Option<(etcd_client::Client, String)> = None;
    let store: Arc<dyn Store> = match &cfg.store {
        StoreChoice::Embedded => Arc::new(crate::store::RedbStore::open(&cfg.data_dir.join("hub.redb"))?),
        #[cfg(feature = "etcd")]
        StoreChoice::Etcd { etcd, replica, lease } => {
            let client = etcd.connect().await?;
            tokio::spawn(
                crate::leader::register(
                    client.clone(),
                    etcd.prefix.clone(),
                    replica.clone(),
                    cfg.listen.to_string(),
                    started_ms,
                    *lease,
                    sessions_now.clone(),
                    leading.clone(),
                    shutdown.clone(),
                )
                .instrument(tracing::info_span!("replica-presence")),
            );
            replica_view = Some((client.clone(), etcd.prefix.clone()));
            info!(%replica, prefix = %etcd.prefix, "campaigning to lead the hub replicas");
            let Some(lead) = crate::leader::campaign(&client, &etcd.prefix, replica, *lease, &shutdown).await? else {
                return Ok(());
            };
            epoch = lead.fence.create_revision.max(0) as u64;
            let (e, fence) = (etcd.clone(), lead.fence.clone());
            let store = tokio::task::spawn_blocking(move || crate::etcd::EtcdStore::open(&e, Some(fence))).await??;
            // A leader that can no longer prove it leads stops at once; a standby takes over.
            let (stop, flag) = (shutdown.clone(), lost.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = lead.lost.cancelled() => {
                        warn!("lost the leadership lease: stopping this replica (a standby takes over)");
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        stop.cancel();
                    }
                    _ = stop.cancelled() => {}
                }
            });
            let store = Arc::new(store);
            // Chunks of values overwritten or deleted (bundles no state references any more), every 5 minutes.
            let (gc, stop) = (store.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(300)) => {}
                    }
                    let g = gc.clone();
                    match tokio::task::spawn_blocking(move || g.collect_garbage()).await {
                        Ok(Ok(n)) if n > 0 => info!(values = n, "collected the chunks of values no key holds any more"),
                        Ok(Err(e)) => warn!(error = %crate::hub::error_chain(&e), "collecting unused chunks failed"),
                        _ => {}
                    }
                }
            });
            store
        }
    };
    let follower =
        Follower::new(cfg.repo.clone(), cfg.branch.clone(), cfg.data_dir.join("repo.git")).with_auth(cfg.auth.clone());
    let opts = Options { grace: cfg.grace, epoch, ..Options::default() };
    let hub = Hub::with_options(store, follower, shutdown.clone(), opts)?;
    leading.store(true, std::sync::atomic::Ordering::SeqCst);
    {
        // The replicas' view, every 2 s: this hub's sessions, and (on etcd) every replica's word.
        let (hub, sessions_now, stop) = (hub.clone(), sessions_now.clone(), shutdown.clone());
        let address = cfg.listen.to_string();
        #[cfg(feature = "etcd")]
        let view = replica_view.take();
        tokio::spawn(
            async move {
                loop {
                    let n = hub.shared.sessions.present().len() as u32;
                    sessions_now.store(n, std::sync::atomic::Ordering::Relaxed);
                    let me = flotilla_proto::platform::v1::HubReplica {
                        name: "this hub".into(),
                        address: address.clone(),
                        leader: true,
                        leader_since_unix_ms: started_ms,
                        sessions: n,
                        started_unix_ms: started_ms,
                        state: "leading".into(),
                        seen_unix_ms: crate::hub::now_ms(),
                    };
                    #[allow(unused_mut)]
                    let mut seen = ("embedded".to_string(), vec![me]);
                    #[cfg(feature = "etcd")]
                    if let Some((client, prefix)) = &view {
                        match crate::leader::replicas(client.clone(), prefix).await {
                            Ok(list) => seen = ("etcd".to_string(), list),
                            Err(e) => warn!(error = %e, "reading the replicas from etcd failed"),
                        }
                    }
                    *hub.shared.replicas.lock().unwrap_or_else(|p| p.into_inner()) = seen;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
            .instrument(tracing::debug_span!("replica-view")),
        );
    }
    let webhook = match &cfg.webhook {
        Some((addr, secret)) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            let url = crate::webhook::url(l.local_addr()?);
            if secret.is_none() {
                warn!(%url, "the webhook has no secret: any caller can trigger a fetch (never content)");
            }
            info!(%url, "webhook listening");
            let task = crate::webhook::serve(hub.clone(), l, secret.clone(), cfg.branch.clone());
            Some(tokio::spawn(task.instrument(tracing::info_span!("webhook"))))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    info!(%addr, repo = %crate::git::redacted_url(&cfg.repo), branch = %cfg.branch, "hub listening");
    if let Some(b) = bound {
        let _ = b.send(addr);
    }
    let follow = tokio::spawn(hub.clone().follow(cfg.poll).instrument(tracing::info_span!("git-follow")));
    let served = hub.clone().serve(listener, &cfg.tls, cfg.in_process).await;
    shutdown.cancel();
    let _ = follow.await;
    hub.stopped().await;
    if let Some(w) = webhook {
        let _ = w.await;
    }
    served?;
    if lost.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("this replica lost the leadership lease and stopped acting");
    }
    Ok(())
}
