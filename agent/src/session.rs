//! The agent's side of the stream: dial the hub with jittered exponential backoff, say what is applied,
//! receive desired state and bundle chunks, apply each app whose digest changed, report status.

use crate::apply::Applier;
use flotilla_common::fleet::{digest_of, Bundle};
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::agent::v1::agent_service_client::AgentServiceClient;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{info, warn};

pub struct AgentConfig {
    /// `https://HOST:PORT` of the hub.
    pub hub: String,
    /// The name in the hub's certificate (defaults to the URL's host).
    pub hub_name: Option<String>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Default)]
struct AgentState {
    /// What the agent has applied, per app, as it reports it.
    applied: BTreeMap<String, pb::AppStatus>,
    /// Bundles held, by digest.
    bundles: HashMap<String, Vec<u8>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Runs until `shutdown`, reconnecting with jittered exponential backoff (0.5 s doubling to 30 s).
pub async fn run(cfg: AgentConfig, applier: Applier, shutdown: CancellationToken) {
    let mut state = AgentState::default();
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = tokio::time::Instant::now();
        match session(&cfg, &applier, &mut state, &shutdown).await {
            Ok(()) => return,
            Err(e) => warn!(error = %e, "session with the hub ended"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        let jittered = backoff.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn session(
    cfg: &AgentConfig,
    applier: &Applier,
    state: &mut AgentState,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cfg.ca_pem))
        .identity(Identity::from_pem(&cfg.cert_pem, &cfg.key_pem));
    if let Some(n) = &cfg.hub_name {
        tls = tls.domain_name(n.clone());
    }
    let channel = Endpoint::from_shared(cfg.hub.clone())
        .map_err(|e| format!("invalid hub URL {}: {e}", cfg.hub))?
        .tls_config(tls)
        .map_err(|e| format!("TLS configuration: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| format!("connecting to {} failed: {e:?}", cfg.hub))?;
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
    let hello = pb::Hello {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        applied: state
            .applied
            .iter()
            .filter(|(_, a)| a.phase == pb::Phase::Applied as i32)
            .map(|(app, a)| pb::AppliedApp { app: app.clone(), digest: a.digest.clone(), revision: a.revision.clone() })
            .collect(),
    };
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) }).await.map_err(|e| e.to_string())?;
    let mut inbound = AgentServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("the hub refused the session: {}: {}", s.code(), s.message()))?
        .into_inner();
    info!(hub = %cfg.hub, "connected to the hub");
    let mut pending: Option<pb::DesiredState> = None;
    let mut chunks: HashMap<String, BTreeMap<u32, Vec<u8>>> = HashMap::new();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = heartbeat.tick() => {
                let hb = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { sent_unix_ms: now_ms() })) };
                tx.send(hb).await.map_err(|e| e.to_string())?;
            }
            m = inbound.message() => match m {
                Ok(Some(pb::HubMessage { msg: Some(msg) })) => match msg {
                    pb::hub_message::Msg::Desired(d) => {
                        // Chunks of digests the new state no longer wants are dropped.
                        chunks.retain(|digest, _| d.apps.iter().any(|a| &a.digest == digest));
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
        // Assemble complete bundles.
        for app in &desired.apps {
            if state.bundles.contains_key(&app.digest) {
                continue;
            }
            if let Some(parts) = chunks.get(&app.digest) {
                if app.chunks > 0 && parts.len() as u32 == app.chunks {
                    let bytes: Vec<u8> = parts.values().flatten().copied().collect();
                    chunks.remove(&app.digest);
                    // Content addressing: a bundle that does not hash to its digest is never applied.
                    if digest_of(&bytes) != app.digest {
                        return Err(format!("bundle {} arrived corrupted; reconnecting", app.digest));
                    }
                    state.bundles.insert(app.digest.clone(), bytes);
                }
            }
        }
        let ready = desired.apps.iter().all(|a| {
            state.bundles.contains_key(&a.digest) || state.applied.get(&a.app).is_some_and(|x| x.digest == a.digest)
        });
        if !ready {
            continue;
        }
        let desired = pending.take().unwrap_or_default();
        let report = apply_desired(applier, state, &desired).await;
        tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Status(report)) })
            .await
            .map_err(|e| e.to_string())?;
        tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Ack(pb::Ack { seq: desired.seq })) })
            .await
            .map_err(|e| e.to_string())?;
    }
}

/// An error with its immediate cause (the API server's message).
fn with_source(e: &dyn std::error::Error) -> String {
    match e.source() {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// Applies every app whose digest is not applied yet (nothing is applied twice) and reports all of them.
async fn apply_desired(applier: &Applier, state: &mut AgentState, desired: &pb::DesiredState) -> pb::StatusReport {
    let mut report = pb::StatusReport::default();
    for app in &desired.apps {
        let done =
            state.applied.get(&app.app).is_some_and(|a| a.digest == app.digest && a.phase == pb::Phase::Applied as i32);
        if done {
            // Same content at a newer commit: nothing to apply, but the cluster now runs that commit.
            if let Some(a) = state.applied.get_mut(&app.app) {
                a.revision = app.revision.clone();
            }
        } else {
            let result = match state.bundles.get(&app.digest).map(|b| Bundle::parse(b)) {
                Some(Ok(objects)) => {
                    let total = objects.len() as u32;
                    let mut applied = 0;
                    let mut error = None;
                    // The namespaces the app's objects live in, unless the app brings them itself.
                    let own: std::collections::BTreeSet<&str> = objects
                        .iter()
                        .filter(|o| o.get("kind").and_then(|k| k.as_str()) == Some("Namespace"))
                        .filter_map(|o| o.pointer("/metadata/name").and_then(|n| n.as_str()))
                        .collect();
                    let needed: std::collections::BTreeSet<&str> = objects
                        .iter()
                        .filter_map(|o| o.pointer("/metadata/namespace").and_then(|n| n.as_str()))
                        .filter(|ns| !own.contains(ns))
                        .collect();
                    for ns in needed {
                        if let Err(e) = applier.ensure_namespace(ns).await {
                            error = Some(with_source(&e));
                            break;
                        }
                    }
                    for o in objects.iter().filter(|_| error.is_none()) {
                        match applier.apply(o).await {
                            Ok(()) => applied += 1,
                            Err(e) => {
                                error = Some(with_source(&e));
                                break;
                            }
                        }
                    }
                    let phase = if error.is_none() { pb::Phase::Applied } else { pb::Phase::Failed };
                    pb::AppStatus {
                        app: app.app.clone(),
                        digest: app.digest.clone(),
                        revision: app.revision.clone(),
                        phase: phase as i32,
                        objects: total,
                        objects_applied: applied,
                        message: error.unwrap_or_default(),
                    }
                }
                Some(Err(e)) => pb::AppStatus {
                    app: app.app.clone(),
                    digest: app.digest.clone(),
                    revision: app.revision.clone(),
                    phase: pb::Phase::Failed as i32,
                    message: format!("the bundle is corrupt: {e}"),
                    ..Default::default()
                },
                None => pb::AppStatus {
                    app: app.app.clone(),
                    digest: app.digest.clone(),
                    revision: app.revision.clone(),
                    phase: pb::Phase::Failed as i32,
                    message: "the bundle never arrived".into(),
                    ..Default::default()
                },
            };
            info!(app = %app.app, revision = %app.revision, phase = result.phase, objects = result.objects_applied, "applied");
            state.applied.insert(app.app.clone(), result);
        }
        report.apps.push(state.applied[&app.app].clone());
    }
    // Apps that left the desired state are no longer reported (pruning their objects comes with the
    // agent's inventory).
    state.applied.retain(|app, _| desired.apps.iter().any(|a| &a.app == app));
    state.bundles.retain(|digest, _| desired.apps.iter().any(|a| &a.digest == digest));
    report
}
