//! The hub process: its configuration, the gRPC server (mutual TLS over TCP and over in-process pipes), and
//! the loops it runs (Git follower, the state machine's writer). The parts live in their own modules:
//! [`crate::machine`] (the state machine), [`crate::hub`] (its writer and snapshots, the Git sync),
//! [`crate::sessions`] (agent sessions), [`crate::platform`] (operators' views and controls).

use crate::git::Follower;
pub use crate::hub::{error_chain, Clock, Hub, Options};
use crate::platform::PlatformApi;
pub use crate::report::{AppReport, ClusterReport, Rendering};
use crate::sessions::AgentApi;
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
        reloading: Option<Arc<crate::tls::Reloading>>,
    ) -> Result<(), tonic::transport::Error> {
        // A stranger who connects and never finishes the handshake is cut off.
        let tls = ServerTlsConfig::new()
            .identity(TlsIdentity::from_pem(&tls.cert_pem, &tls.key_pem))
            .client_ca_root(Certificate::from_pem(&tls.ca_pem))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        let shutdown = self.shared.shutdown.clone();
        let server = |hub: Arc<Hub>, with_tls: bool| -> Result<_, tonic::transport::Error> {
            let builder = Server::builder();
            let builder = if with_tls { builder.tls_config(tls.clone())? } else { builder };
            Ok(builder
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
                let router = server(self.clone(), true)?;
                let stop = shutdown.clone().cancelled_owned();
                Some(tokio::spawn(async move { router.serve_with_incoming_shutdown(incoming, stop).await }))
            }
            None => None,
        };
        let served = match reloading {
            // The TLS is the hub's own (read again when its files change); tonic serves what it hands over.
            Some(r) => {
                let incoming = r.incoming(listener, TLS_HANDSHAKE_TIMEOUT, shutdown.clone());
                server(self, false)?.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await
            }
            None => {
                server(self, true)?
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
                    .await
            }
        };
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
#[derive(Clone)]
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
    /// Where other hub replicas reach this one (`host:port`); the bound address when None.
    pub advertise: Option<String>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (plain HTTP).
    pub metrics: Option<SocketAddr>,
    /// Commits are traced (an OTLP exporter is installed), recording the spans of this many clusters each.
    pub traces: Option<usize>,
    /// Operator roles, revoked certificates, the audit sink (followed from their files while the hub runs).
    pub identities: Arc<crate::identities::Identities>,
    /// Where joining agents ask for their certificate with a bootstrap token (server TLS only).
    pub bootstrap: Option<SocketAddr>,
    /// Signs joining and renewing agents' requests (the fleet CA's key was found).
    pub signer: Option<Arc<crate::bootstrap::Signer>>,
    /// Where `hub.pem`, `hub-key.pem` and `ca.pem` are read again when they change (None: the TLS read at start
    /// stays).
    pub certs_dir: Option<std::path::PathBuf>,
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

/// What `/metrics` and `/readyz` ask.
struct Observe(Arc<Hub>);

impl flotilla_common::telemetry::endpoint::Observed for Observe {
    fn metrics(&self) -> String {
        let s = &self.0.shared;
        s.metrics.encode(&s.state(), &s.sessions, s.leading())
    }
    fn ready(&self) -> Result<(), String> {
        self.0.shared.ready()
    }
}

/// Connects to etcd and reads its revision, again with jittered backoff (0.5 s up to 5 s) until it answers or
/// the hub shuts down: a hub started before etcd has a leader waits instead of exiting.
#[cfg(feature = "etcd")]
async fn wait_for_etcd(
    etcd: &crate::etcd::EtcdConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<(etcd_client::Client, i64)> {
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = async {
            let mut client = etcd.connect().await?;
            let from = crate::mirror::current_revision(&mut client).await?;
            Ok::<_, etcd_client::Error>((client, from))
        };
        match attempt.await {
            Ok(r) => return Ok(r),
            Err(e) => {
                warn!(error = %e, endpoints = %etcd.endpoints.join(","), retry_in_ms = delay.as_millis() as u64, "etcd does not answer yet");
            }
        }
        let jittered = delay.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("stopped while waiting for etcd"),
            _ = tokio::time::sleep(jittered) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Runs a hub until `shutdown` is cancelled. Returns the bound address through `bound`.
pub async fn run(
    cfg: HubConfig,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let started_ms = crate::hub::now_ms();
    // What this replica tells the others (and `flotilla hubs`): its sessions, whether it leads.
    let sessions_now = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let leading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Bound first: replicas say where they serve.
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let follower =
        Follower::new(cfg.repo.clone(), cfg.branch.clone(), cfg.data_dir.join("repo.git")).with_auth(cfg.auth.clone());
    #[allow(unused_mut)]
    let mut opts = Options {
        grace: cfg.grace,
        traces: cfg.traces,
        identities: cfg.identities.clone(),
        signer: cfg.signer.clone(),
        ..Options::default()
    };
    tokio::spawn(cfg.identities.clone().follow(shutdown.clone()).instrument(tracing::info_span!("identities")));
    #[cfg(feature = "etcd")]
    let mut replica_view: Option<(etcd_client::Client, String)> = None;
    let hub = match &cfg.store {
        StoreChoice::Embedded => {
            let store = Arc::new(crate::store::RedbStore::open(&cfg.data_dir.join("hub.redb"))?);
            leading.store(true, std::sync::atomic::Ordering::SeqCst);
            Hub::with_options(store, follower, shutdown.clone(), opts)?
        }
        #[cfg(feature = "etcd")]
        StoreChoice::Etcd { etcd, replica, lease } => {
            // etcd may not answer yet (starting beside the hub, electing its first leader): wait for it.
            let (client, from) = wait_for_etcd(etcd, &shutdown).await?;
            let progress = Arc::new(crate::mirror::Progress::default());
            let (lease_tx, lease_rx) = tokio::sync::watch::channel(None);
            // The presence lease on a thread of its own, as the leader's: renewed on time under any load.
            let (prefix, name, address) = (etcd.prefix.clone(), replica.clone(), advertised(&cfg, addr));
            let (n, l, p, stop) = (sessions_now.clone(), leading.clone(), progress.clone(), shutdown.clone());
            let lease_ttl = *lease;
            // (It cannot fail to connect: the client above just did; if it did, the replica would be absent from
            // `flotilla hubs`, and still serve.)
            crate::leader::on_own_thread("replica-presence", etcd, CancellationToken::new(), move |c| {
                crate::leader::register(c, prefix, name, address, started_ms, lease_ttl, n, l, p, lease_tx, stop)
            });
            replica_view = Some((client.clone(), etcd.prefix.clone()));
            // Every replica serves agents and operators from the state in etcd, followed by a watch from the
            // revision it was read at; only the one that wins the election acts.
            let e = etcd.clone();
            let store = Arc::new(tokio::task::spawn_blocking(move || crate::etcd::EtcdStore::open_replica(&e)).await??);
            let domain = flotilla_common::identity::host_names(&cfg.tls.cert_pem)
                .into_iter()
                .next()
                .unwrap_or_else(|| "localhost".into());
            opts.standby = true;
            opts.replica = replica.clone();
            opts.forward =
                Some(crate::forward::Forward::new(&cfg.tls.ca_pem, &cfg.tls.cert_pem, &cfg.tls.key_pem, &domain));
            let p = progress.clone();
            opts.behind = Some(Arc::new(move || p.behind()));
            let hub = Hub::with_options(store.clone(), follower, shutdown.clone(), opts)?;
            // What it read is at least as new as the revision it asked for before reading.
            hub.caught_up_to(from.max(0) as u64).await;
            tokio::spawn(
                crate::mirror::follow(hub.clone(), store.clone(), replica.clone(), from, progress)
                    .instrument(tracing::info_span!("follow-etcd")),
            );
            tokio::spawn(
                crate::mirror::publish_sessions(
                    hub.clone(),
                    client.clone(),
                    etcd.prefix.clone(),
                    replica.clone(),
                    lease_rx,
                )
                .instrument(tracing::info_span!("session-presence")),
            );
            let lead = LeadTask {
                hub: hub.clone(),
                store,
                etcd: etcd.clone(),
                replica: replica.clone(),
                lease: *lease,
                leading: leading.clone(),
            };
            tokio::spawn(lead.run().instrument(tracing::info_span!("campaign", %replica)));
            hub
        }
    };
    {
        // The replicas' view, every 2 s: this hub's sessions, and (on etcd) every replica's word.
        let (hub, sessions_now, stop) = (hub.clone(), sessions_now.clone(), shutdown.clone());
        let address = advertised(&cfg, addr);
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
                        caught_up: true,
                        ..Default::default()
                    };
                    #[allow(unused_mut)]
                    let mut seen = ("embedded".to_string(), vec![me]);
                    #[cfg(feature = "etcd")]
                    if let Some((client, prefix)) = &view {
                        match crate::leader::replicas(client.clone(), prefix).await {
                            Ok(list) => {
                                if let Some(f) = &hub.shared.forward {
                                    f.set_leader(list.iter().find(|r| r.leader).map(|r| r.address.clone()));
                                }
                                seen = ("etcd".to_string(), list);
                            }
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
    if let Some(addr) = cfg.metrics {
        let l = tokio::net::TcpListener::bind(addr).await?;
        info!(addr = %l.local_addr()?, "/metrics, /healthz and /readyz listening");
        let task = flotilla_common::telemetry::endpoint::serve(Arc::new(Observe(hub.clone())), l, shutdown.clone());
        tokio::spawn(task.instrument(tracing::info_span!("metrics")));
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
    let bootstrap = match cfg.bootstrap {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            if cfg.signer.is_none() {
                warn!("the bootstrap port is open but the certificates directory has no ca-key.pem: joins are refused");
            }
            info!(addr = %l.local_addr()?, "bootstrap (joining agents) listening");
            let (hub, tls) = (hub.clone(), cfg.tls.clone());
            let task = async move {
                if let Err(e) = crate::bootstrap::serve(hub, l, &tls).await {
                    warn!(error = %e, "serving the bootstrap port failed");
                }
            };
            Some(tokio::spawn(task.instrument(tracing::info_span!("bootstrap"))))
        }
        None => None,
    };
    info!(%addr, repo = %crate::git::redacted_url(&cfg.repo), branch = %cfg.branch, "hub listening");
    if let Some(b) = bound {
        let _ = b.send(addr);
    }
    let follow = tokio::spawn(hub.clone().follow(cfg.poll).instrument(tracing::info_span!("git-follow")));
    let reloading = match &cfg.certs_dir {
        Some(dir) => {
            let ttl = cfg.signer.as_ref().map_or(std::time::Duration::from_secs(30 * 24 * 3600), |s| s.ttl);
            let (signing_hub, signing_dir) = (hub.clone(), dir.clone());
            // The signing CA is read again with the files (step 4 of a CA rotation needs no restart).
            let r = crate::tls::Reloading::new(dir.clone(), &cfg.tls).map_err(|e| anyhow::anyhow!(e))?.on_change(
                move || match crate::bootstrap::Signer::load(&signing_dir, ttl) {
                    Ok(s) => signing_hub.shared.signer.store(s.map(Arc::new)),
                    Err(e) => warn!(error = %e, "the fleet CA cannot be read: the signing CA read before stays"),
                },
            );
            let r = Arc::new(r);
            tokio::spawn(r.clone().follow(shutdown.clone()).instrument(tracing::info_span!("tls-files")));
            Some(r)
        }
        None => None,
    };
    let served = hub.clone().serve(listener, &cfg.tls, cfg.in_process, reloading).await;
    shutdown.cancel();
    let _ = follow.await;
    hub.stopped().await;
    if let Some(w) = webhook {
        let _ = w.await;
    }
    if let Some(b) = bootstrap {
        let _ = b.await;
    }
    served?;
    Ok(())
}

/// Where other replicas reach this one: `--advertise`, else the bound address.
fn advertised(cfg: &HubConfig, bound: SocketAddr) -> String {
    cfg.advertise.clone().unwrap_or_else(|| bound.to_string())
}

/// A replica's campaign: when it wins, its store is fenced and its writer acts; when it loses the lease, the
/// process stops (a supervisor starts it again, as a standby).
#[cfg(feature = "etcd")]
struct LeadTask {
    hub: Arc<Hub>,
    store: Arc<crate::etcd::EtcdStore>,
    etcd: crate::etcd::EtcdConfig,
    replica: String,
    lease: Duration,
    leading: Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(feature = "etcd")]
impl LeadTask {
    /// Campaigns; leads while it holds the lease; stands by again when it loses it (etcd lost its quorum, the
    /// process stalled past its lease): it stops acting within the lease and campaigns again.
    async fn run(self) {
        let shutdown = self.hub.shared.shutdown.clone();
        info!(replica = %self.replica, prefix = %self.etcd.prefix, "campaigning to lead the hub replicas");
        loop {
            let lead = match crate::leader::campaign_apart(&self.etcd, &self.replica, self.lease, &shutdown).await {
                Ok(Some(lead)) => lead,
                Ok(None) => return,
                Err(e) => {
                    warn!(error = %e, "campaigning failed (etcd unreachable, or without quorum): trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(0..500))) => {}
                    }
                    continue;
                }
            };
            let epoch = lead.fence.create_revision.max(0) as u64;
            let (store, fence) = (self.store.clone(), lead.fence.clone());
            let promoted = match tokio::task::spawn_blocking(move || store.promote(fence)).await {
                Ok(Ok(())) => self.hub.promote(epoch).await,
                Ok(Err(e)) => Err(format!("taking over the store failed: {}", crate::hub::error_chain(&e))),
                Err(e) => Err(format!("taking over the store failed: {e}")),
            };
            match promoted {
                Ok(()) => {
                    self.leading.store(true, std::sync::atomic::Ordering::SeqCst);
                    self.lead(&lead).await;
                }
                Err(e) => warn!(error = %e, "this replica won the election but cannot lead"),
            }
            if shutdown.is_cancelled() {
                return;
            }
            // Lost (or never took up) the lead: stop acting, stand by, campaign again.
            self.leading.store(false, std::sync::atomic::Ordering::SeqCst);
            self.store.demote();
            lead.lost.cancel();
            warn!("lost the leadership lease: this replica stopped acting and stands by (another replica leads, or etcd has no quorum)");
            self.hub.demote().await;
        }
    }

    /// While leading: collects unused chunks every 5 minutes; returns when the lease is lost (or at shutdown).
    async fn lead(&self, lead: &crate::leader::Leadership) {
        let shutdown = self.hub.shared.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = lead.lost.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(300)) => {}
            }
            let g = self.store.clone();
            match tokio::task::spawn_blocking(move || g.collect_garbage()).await {
                Ok(Ok(n)) if n > 0 => info!(values = n, "collected the chunks of values no key holds any more"),
                Ok(Err(e)) => warn!(error = %crate::hub::error_chain(&e), "collecting unused chunks failed"),
                _ => {}
            }
        }
    }
}
