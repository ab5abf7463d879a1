//! The agent's side of the stream: dial the hub with jittered exponential backoff, say what is applied,
//! receive desired state and bundle chunks, hand complete desired states to the [engine](crate::engine), and
//! report the engine's status: only what changed, at most once per second (coalesced).

use crate::engine::{DesiredApp, EngineHandle, Statuses};
use flotilla_common::fleet::digest_of;
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::agent::v1::agent_service_client::AgentServiceClient;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{info, warn};

/// The protocol revision this agent speaks (`Hello.protocol`): 1 added it, the API server's reachability
/// and the Unknown health.
pub const PROTOCOL: u32 = 1;

/// The least time between two status reports.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

pub struct AgentConfig {
    /// `https://HOST:PORT` of the hub.
    pub hub: String,
    /// The name in the hub's certificate (defaults to the URL's host).
    pub hub_name: Option<String>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Reach the hub inside this process instead of over the network (a local fleet of thousands of
    /// agents): the same mutual TLS, over in-memory pipes the hub serves.
    pub in_process: Option<InProcessHub>,
    /// The certificate to renew over the session when it is due (`cert_pem`/`key_pem` are then unused).
    pub credentials: Option<Arc<crate::certs::Credentials>>,
}

/// Hands the hub one end of a new in-memory pipe per connection.
#[derive(Clone)]
pub struct InProcessHub(pub mpsc::Sender<tokio::io::DuplexStream>);

/// Bytes an in-memory pipe buffers each way.
const PIPE_BYTES: usize = 256 * 1024;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Runs until `shutdown`, reconnecting with jittered exponential backoff (0.5 s doubling to 30 s). The engine
/// keeps enforcing the last desired state meanwhile.
pub async fn run(cfg: AgentConfig, engine: EngineHandle, shutdown: CancellationToken) {
    let hubs = hub_urls(&cfg.hub);
    // The highest leader epoch and store revision seen, across sessions and hubs.
    let seen = Seen::default();
    let mut backoff = Duration::from_millis(500);
    let mut next = fastrand::usize(0..hubs.len().max(1));
    loop {
        let started = tokio::time::Instant::now();
        let hub = hubs.get(next % hubs.len().max(1)).cloned().unwrap_or_else(|| cfg.hub.clone());
        match session(&cfg, &hub, &engine, &seen, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                crate::telemetry::METRICS.session_failures.inc();
                warn!(%hub, error = %e, "session with the hub ended; the cluster keeps its last desired state")
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        // The next replica at once (jittered a little); the whole list again only after the backoff.
        next += 1;
        let round_done = next % hubs.len().max(1) == 0;
        let wait = if round_done { backoff } else { Duration::from_millis(100) };
        let jittered = wait.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        if round_done {
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// `flotilla_agent_connected` is 1 while one of these lives (one per session).
struct Connected;

impl Connected {
    fn now() -> Connected {
        crate::telemetry::METRICS.connected.set(1);
        Connected
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        crate::telemetry::METRICS.connected.set(0);
    }
}

/// Records a desired state's epoch, or refuses it: a lower epoch than one seen is a deposed leader's (its
/// session ends; the agent moves to another hub).
pub fn accept_epoch(seen: &std::sync::atomic::AtomicU64, epoch: u64) -> Result<(), String> {
    let before = seen.fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
    if epoch < before {
        return Err(format!(
            "the hub sent a desired state of epoch {epoch}, but a leader of epoch {before} has been seen: a deposed \
             leader's state is never applied"
        ));
    }
    if epoch > before && before > 0 {
        info!(epoch, previous = before, "a new leading hub");
    }
    Ok(())
}

/// Records a desired state's store revision, or refuses it: older than one already sent is a replica behind the
/// leader (its session ends; the agent moves to another hub). 0 (a single hub) is never compared.
pub fn accept_store_revision(seen: &std::sync::atomic::AtomicU64, revision: u64) -> Result<(), String> {
    if revision == 0 {
        return Ok(());
    }
    let before = seen.fetch_max(revision, std::sync::atomic::Ordering::SeqCst);
    if revision < before {
        return Err(format!(
            "the hub sent a desired state as of store revision {revision}, older than one of revision {before} it              was sent before: a replica behind the leader's state is never applied"
        ));
    }
    Ok(())
}

/// `https://a:7443,https://b:7443` → each hub replica's URL.
pub fn hub_urls(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect()
}

type Tx = mpsc::Sender<pb::AgentMessage>;

async fn send(tx: &Tx, msg: pb::agent_message::Msg) -> Result<(), String> {
    tx.send(pb::AgentMessage { msg: Some(msg) }).await.map_err(|_| "the stream to the hub closed".to_string())
}

/// What the agent has seen of its hubs, so no hub can take it back in time.
#[derive(Default)]
struct Seen {
    epoch: std::sync::atomic::AtomicU64,
    store_revision: std::sync::atomic::AtomicU64,
}

async fn session(
    cfg: &AgentConfig,
    hub: &str,
    engine: &EngineHandle,
    seen: &Seen,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let (cert_pem, key_pem) = match &cfg.credentials {
        Some(c) => c.current(),
        None => (cfg.cert_pem.clone(), cfg.key_pem.clone()),
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cfg.ca_pem))
        .identity(Identity::from_pem(&cert_pem, &key_pem));
    if let Some(n) = &cfg.hub_name {
        tls = tls.domain_name(n.clone());
    }
    let endpoint = Endpoint::from_shared(hub.to_string())
        .map_err(|e| format!("invalid hub URL {hub}: {e}"))?
        .tls_config(tls)
        .map_err(|e| format!("TLS configuration: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20));
    let channel = match &cfg.in_process {
        None => endpoint.connect().await,
        Some(hub) => {
            let hub = hub.clone();
            endpoint
                .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
                    let hub = hub.clone();
                    async move {
                        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
                        hub.0.send(theirs).await.map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "the in-process hub is gone")
                        })?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(ours))
                    }
                }))
                .await
        }
    }
    .map_err(|e| format!("connecting to {hub} failed: {e:?}"))?;
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
    let hello = pb::Hello {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL,
        applied: engine
            .applied()
            .into_iter()
            .map(|(app, (digest, revision))| pb::AppliedApp { app, digest, revision })
            .collect(),
        store_revision: seen.store_revision.load(std::sync::atomic::Ordering::SeqCst),
    };
    send(&tx, pb::agent_message::Msg::Hello(hello)).await?;
    let renewal_channel = channel.clone();
    let mut inbound = AgentServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("the hub refused the session: {}: {}", s.code(), s.message()))?
        .into_inner();
    info!(%hub, "connected to the hub");
    crate::telemetry::METRICS.sessions.inc();
    let _connected = Connected::now();
    let mut statuses = engine.statuses();
    let mut reach = engine.reach();
    // Sent first on every session, then when it changes.
    let mut reach_due = true;
    // What happened while disconnected: the whole current status first.
    let mut reported: BTreeMap<String, pb::AppStatus> = BTreeMap::new();
    let mut last_report = tokio::time::Instant::now() - REPORT_INTERVAL;
    let mut report_due = true;
    let mut pending: Option<pb::DesiredState> = None;
    let mut chunks: HashMap<String, BTreeMap<u32, bytes::Bytes>> = HashMap::new();
    let mut bundles: HashMap<String, Arc<Vec<u8>>> = HashMap::new();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(15));
    // The certificate is renewed over this session's connection when due; the session goes on.
    let mut renew_at = cfg.credentials.as_ref().map(|c| tokio::time::Instant::now() + c.renew_in());
    loop {
        let report_at = last_report + REPORT_INTERVAL;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = async { tokio::time::sleep_until(renew_at.unwrap_or_else(tokio::time::Instant::now)).await }, if renew_at.is_some() => {
                if let Some(c) = &cfg.credentials {
                    let cluster = match flotilla_common::identity::identity_of_pem(&c.current().0) {
                        Ok(flotilla_common::identity::Identity::Cluster(n)) => n,
                        _ => String::new(),
                    };
                    match c.renew(renewal_channel.clone(), &cluster).await {
                        Ok(expires) => {
                            info!(expires_unix_ms = expires, "certificate renewed over the live session");
                            crate::telemetry::METRICS.renewals.inc();
                            renew_at = Some(tokio::time::Instant::now() + c.renew_in().max(Duration::from_secs(1)));
                        }
                        Err(e) => {
                            warn!(error = %e, "renewing the certificate failed; trying again in a minute");
                            renew_at = Some(tokio::time::Instant::now() + Duration::from_secs(60));
                        }
                    }
                }
            }
            _ = heartbeat.tick() => send(&tx, pb::agent_message::Msg::Heartbeat(pb::Heartbeat { sent_unix_ms: now_ms() })).await?,
            r = statuses.changed() => {
                if r.is_err() {
                    return Err("the engine stopped".into());
                }
                report_due = true;
            }
            r = reach.changed() => {
                if r.is_err() {
                    return Err("the engine stopped".into());
                }
                reach_due = true;
                report_due = true;
            }
            _ = tokio::time::sleep_until(report_at), if report_due => {
                let current: Statuses = statuses.borrow_and_update().clone();
                let changed: Vec<pb::AppStatus> =
                    current.values().filter(|s| reported.get(&s.app) != Some(*s)).cloned().collect();
                let api = reach_due.then(|| {
                    let r = reach.borrow_and_update().clone();
                    pb::ApiServer { unreachable_since_unix_ms: r.down_since_ms.unwrap_or(0), error: r.error }
                });
                reach_due = false;
                if !changed.is_empty() || api.is_some() {
                    for s in &changed {
                        reported.insert(s.app.clone(), s.clone());
                    }
                    send(&tx, pb::agent_message::Msg::Status(pb::StatusReport { apps: changed, api })).await?;
                    crate::telemetry::METRICS.reports_sent.inc();
                }
                last_report = tokio::time::Instant::now();
                report_due = false;
            }
            m = inbound.message() => match m {
                Ok(Some(pb::HubMessage { msg: Some(msg) })) => match msg {
                    pb::hub_message::Msg::Desired(d) => {
                        crate::telemetry::METRICS.desired_states.inc();
                        accept_epoch(&seen.epoch, d.epoch)?;
                        accept_store_revision(&seen.store_revision, d.store_revision)?;
                        // Chunks and bundles of digests the new state no longer wants are dropped.
                        chunks.retain(|digest, _| d.apps.iter().any(|a| &a.digest == digest));
                        bundles.retain(|digest, _| d.apps.iter().any(|a| &a.digest == digest));
                        pending = Some(d);
                    }
                    pb::hub_message::Msg::Chunk(c) => {
                        chunks.entry(c.digest).or_default().insert(c.index, c.data);
                    }
                    pb::hub_message::Msg::Ack(_) | pb::hub_message::Msg::Heartbeat(_) => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => return Err("the hub closed the stream".into()),
                Err(s) => return Err(format!("the stream failed: {}: {}", s.code(), s.message())),
            },
        }
        let Some(desired) = pending.as_ref() else { continue };
        for app in &desired.apps {
            if bundles.contains_key(&app.digest) || app.chunks == 0 {
                continue;
            }
            if let Some(parts) = chunks.get(&app.digest) {
                if parts.len() as u32 == app.chunks {
                    let bytes: Vec<u8> = parts.values().flatten().copied().collect();
                    chunks.remove(&app.digest);
                    // Content addressing: a bundle that does not hash to its digest is never applied.
                    if digest_of(&bytes) != app.digest {
                        return Err(format!("bundle {} arrived corrupted; reconnecting", app.digest));
                    }
                    bundles.insert(app.digest.clone(), Arc::new(bytes));
                }
            }
        }
        // Wait until every bundle the hub sends has arrived: a desired state is handed over whole.
        if !desired.apps.iter().all(|a| a.chunks == 0 || bundles.contains_key(&a.digest)) {
            continue;
        }
        let desired = pending.take().unwrap_or_default();
        let apps = desired
            .apps
            .iter()
            .map(|a| DesiredApp {
                app: a.app.clone(),
                digest: a.digest.clone(),
                revision: a.revision.clone(),
                bundle: bundles.get(&a.digest).cloned(),
                traceparent: a.traceparent.clone(),
            })
            .collect();
        engine.set_desired(apps).await?;
        send(&tx, pb::agent_message::Msg::Ack(pb::Ack { seq: desired.seq })).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_store_revision_is_refused_and_a_single_hub_is_never_compared() {
        let seen = std::sync::atomic::AtomicU64::new(0);
        assert!(accept_store_revision(&seen, 0).is_ok(), "a single hub");
        assert!(accept_store_revision(&seen, 500).is_ok());
        assert!(accept_store_revision(&seen, 500).is_ok(), "the same state again");
        let e = accept_store_revision(&seen, 499).unwrap_err();
        assert!(e.contains("revision 499") && e.contains("revision 500"), "{e}");
        assert!(accept_store_revision(&seen, 0).is_ok(), "0 says nothing about age");
        assert!(accept_store_revision(&seen, 900).is_ok());
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 900);
    }

    #[test]
    fn a_lower_epoch_is_refused_and_equal_or_higher_ones_are_taken() {
        let seen = std::sync::atomic::AtomicU64::new(0);
        assert!(accept_epoch(&seen, 0).is_ok(), "a single hub");
        assert!(accept_epoch(&seen, 12).is_ok());
        assert!(accept_epoch(&seen, 12).is_ok());
        let e = accept_epoch(&seen, 7).unwrap_err();
        assert!(e.contains("epoch 7") && e.contains("epoch 12"), "{e}");
        assert!(accept_epoch(&seen, 30).is_ok());
        assert_eq!(hub_urls(" https://a:1, ,https://b:2"), vec!["https://a:1", "https://b:2"]);
    }
}
