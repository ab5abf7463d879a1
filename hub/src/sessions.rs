//! Agent sessions: one per cluster, identified by its certificate. A new connection with the same
//! certificate replaces the old one (which ends with a clear status); presence is tracked per session, so
//! the end of a replaced session never marks its cluster offline. A session wakes only when its own
//! cluster's desired state changes; bundles are read once and shared by every session that sends them.

use crate::hub::{now_ms, Hub};
use crate::machine::Observed;
use crate::state::DesiredApp;
use flotilla_common::identity::Identity;
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::agent::v1::agent_service_server::AgentService;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn, Instrument};

/// How long a new session waits for this replica to catch up with the state its agent was sent elsewhere.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// New sessions one certificate may open per minute; more are refused until the minute has passed.
pub const SESSIONS_PER_MINUTE: usize = 20;

/// Bundles go out in chunks of 256 KiB (the protocol allows up to 1 MiB): a session's send buffers stay small
/// however large the bundle.
const CHUNK: usize = flotilla_proto::MAX_CHUNK_BYTES / 4;

/// One live session, as the rest of the hub sees it.
pub struct Presence {
    pub id: u64,
    pub sent_seq: AtomicU64,
    pub acked_seq: AtomicU64,
    pub last_seen_ms: AtomicI64,
    wake: Notify,
    replaced: CancellationToken,
}

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Arc<Presence>>>,
    /// Session starts per cluster in the last minute.
    opened: Mutex<HashMap<String, VecDeque<i64>>>,
    next_id: AtomicU64,
    /// Sessions refused, logged once a minute rather than once per attempt.
    refused: Mutex<Option<crate::limits::Tally>>,
    /// Clusters whose session another hub replica holds: cluster → replica (from the replicas' presence keys).
    remote: Mutex<HashMap<String, String>>,
}

impl Sessions {
    /// Registers a new session for `cluster`, replacing (and ending) the one it had.
    fn open(&self, cluster: &str) -> Result<Arc<Presence>, Status> {
        let now = now_ms();
        {
            let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
            let q = opened.entry(cluster.to_string()).or_default();
            while q.front().is_some_and(|t| *t < now - 60_000) {
                q.pop_front();
            }
            if q.len() >= SESSIONS_PER_MINUTE {
                let mut tally = self.refused.lock().unwrap_or_else(|p| p.into_inner());
                let tally = tally.get_or_insert_with(|| crate::limits::Tally::new(std::time::Duration::from_secs(60)));
                if let Some(counts) = tally.count("sessions over the per-minute cap", tokio::time::Instant::now()) {
                    let n: u64 = counts.values().sum();
                    warn!(%cluster, refused = n, "agent sessions refused: too many new sessions per minute (counted since the last such line)");
                }
                return Err(Status::resource_exhausted(format!(
                    "cluster {cluster} opened {SESSIONS_PER_MINUTE} sessions within a minute; try again later"
                )));
            }
            q.push_back(now);
        }
        let p = Arc::new(Presence {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            sent_seq: AtomicU64::new(0),
            acked_seq: AtomicU64::new(0),
            last_seen_ms: AtomicI64::new(now),
            wake: Notify::new(),
            replaced: CancellationToken::new(),
        });
        let old = self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(cluster.to_string(), p.clone());
        if let Some(old) = old {
            info!(%cluster, old = old.id, new = p.id, "a new session replaces the cluster's previous one");
            old.replaced.cancel();
        }
        Ok(p)
    }

    /// Ends a session's presence, unless a newer session has replaced it.
    fn close(&self, cluster: &str, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(cluster).is_some_and(|p| p.id == id) {
            live.remove(cluster);
        }
    }

    /// A cluster's live session.
    pub fn get(&self, cluster: &str) -> Option<Arc<Presence>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).get(cluster).cloned()
    }

    /// The clusters with a live session.
    pub fn present(&self) -> HashSet<String> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// The clusters with a live session here or at another hub replica.
    pub fn online(&self) -> HashSet<String> {
        let mut all = self.present();
        all.extend(self.remote.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned());
        all
    }

    /// The replica holding the cluster's session, when another replica holds it.
    pub fn remote(&self, cluster: &str) -> Option<String> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner()).get(cluster).cloned()
    }

    /// Records which clusters' sessions other replicas hold (None: the cluster's session ended there).
    pub fn set_remote(&self, changes: impl IntoIterator<Item = (String, Option<String>)>) {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        for (cluster, replica) in changes {
            match replica {
                Some(r) => remote.insert(cluster, r),
                None => remote.remove(&cluster),
            };
        }
    }

    /// Wakes every session (a new leader: its epoch).
    pub fn wake_all(&self) {
        for p in self.live.lock().unwrap_or_else(|p| p.into_inner()).values() {
            p.wake.notify_one();
        }
    }

    /// Wakes the cluster's session: its desired state changed.
    pub fn wake(&self, cluster: &str) {
        if let Some(p) = self.get(cluster) {
            p.wake.notify_one();
        }
    }

    /// A presence without a session (tests drive rollouts with it).
    pub fn set_present(&self, cluster: &str, present: bool) {
        if present {
            let _ = self.open(cluster);
        } else {
            self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(cluster);
        }
    }
}

pub struct AgentApi(pub Arc<Hub>);

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = ReceiverStream<Result<pb::HubMessage, Status>>;

    async fn renew(&self, req: Request<pb::CertificateRequest>) -> Result<Response<pb::IssuedCertificate>, Status> {
        let cluster = match crate::platform::caller(&req)? {
            Identity::Cluster(c) => c,
            other => return Err(Status::permission_denied(format!("{other} has no cluster certificate to renew"))),
        };
        let serial = crate::platform::caller_serial(&req).unwrap_or_default();
        crate::bootstrap::renew(&self.0, &cluster, &serial, &req.get_ref().csr_pem).await.map(Response::new)
    }

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let cluster = match crate::platform::caller(&req)? {
            Identity::Cluster(c) => c,
            other => return Err(Status::permission_denied(format!("{other} may not open an agent session"))),
        };
        let serial = crate::platform::caller_serial(&req).unwrap_or_default();
        if let Err(why) = admitted(&self.0, &cluster, &serial) {
            let reason = if why.contains("revoked") { "revoked" } else { "not_admitted" };
            self.0.shared.metrics.sessions_refused.get_or_create(&crate::metrics::label("reason", reason)).inc();
            warn!(%cluster, reason = %why, "agent session refused");
            return Err(Status::permission_denied(why));
        }
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(h)) }))) => h,
            _ => return Err(Status::invalid_argument("the first message of a session must be a Hello")),
        };
        let hub = self.0.clone();
        // A replica that is not caught up with etcd would send a state older than the one the agent may hold:
        // the agent is sent to another replica instead (it keeps enforcing what it has meanwhile).
        if let Err(why) = hub.shared.readiness() {
            hub.shared.metrics.sessions_refused.get_or_create(&crate::metrics::label("reason", "not_ready")).inc();
            return Err(Status::unavailable(format!("this hub replica does not serve current state: {why}")));
        }
        // Nor one older than a state the agent was already sent (by the leader, or a replica further ahead):
        // it waits a little for its watch, then sends the agent elsewhere.
        let waited = tokio::time::Instant::now();
        while hub.shared.revision() < hello.store_revision {
            if waited.elapsed() > CATCH_UP_WAIT {
                hub.shared.metrics.sessions_refused.get_or_create(&crate::metrics::label("reason", "behind")).inc();
                return Err(Status::unavailable(format!(
                    "this hub replica's state (store revision {}) is older than the one the agent was sent ({})",
                    hub.shared.revision(),
                    hello.store_revision
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let presence = hub.shared.sessions.open(&cluster).inspect_err(|_| {
            hub.shared.metrics.sessions_refused.get_or_create(&crate::metrics::label("reason", "rate")).inc();
        })?;
        hub.shared.metrics.sessions_opened.inc();
        let (tx, rx) = mpsc::channel(16);
        let span = tracing::info_span!("agent-session", %cluster, session = presence.id);
        tokio::spawn(
            async move {
                info!(version = %hello.agent_version, applied = hello.applied.len(), "agent connected");
                let obs = Observed {
                    hello: Some(hello.applied.clone()),
                    agent: Some((hello.agent_version.clone(), hello.protocol)),
                    seen_ms: now_ms(),
                    ..Default::default()
                };
                hub.observe(&cluster, obs).await;
                let held: BTreeMap<String, (String, String)> =
                    hello.applied.iter().map(|a| (a.app.clone(), (a.digest.clone(), a.revision.clone()))).collect();
                let result = run_session(&hub, &cluster, &serial, &presence, held, inbound, &tx).await;
                hub.shared.sessions.close(&cluster, presence.id);
                hub.shared.metrics.sessions_closed.inc();
                match result {
                    Ok(()) => info!("agent disconnected"),
                    Err(e) => warn!(error = %e, "agent session ended"),
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type Tx = mpsc::Sender<Result<pb::HubMessage, Status>>;

async fn send(tx: &Tx, msg: pb::hub_message::Msg) -> Result<(), String> {
    tx.send(Ok(pb::HubMessage { msg: Some(msg) })).await.map_err(|_| "the agent went away".to_string())
}

/// The desired state as this agent is sent it: "adopted" apps become what the agent holds for them (or are
/// left out when it holds nothing: there is nothing to keep).
fn resolve(
    desired: &BTreeMap<String, DesiredApp>,
    held: &BTreeMap<String, (String, String)>,
    reported: Option<&crate::report::ClusterReport>,
) -> Vec<(String, DesiredApp)> {
    desired
        .iter()
        .filter_map(|(app, d)| {
            if d.adopt {
                // What this session's agent holds, else what the cluster last reported running.
                let from_report = || {
                    let a = &reported?.apps.get(app)?.0;
                    (!a.digest.is_empty()).then(|| (a.digest.clone(), a.revision.clone()))
                };
                let (digest, revision) = &held.get(app).cloned().or_else(from_report)?;
                return Some((
                    app.clone(),
                    DesiredApp {
                        digest: digest.clone(),
                        revision: revision.clone(),
                        size: 0,
                        error: None,
                        adopt: false,
                    },
                ));
            }
            (!d.digest.is_empty()).then(|| (app.clone(), d.clone()))
        })
        .collect()
}

/// Whether the agent of `cluster`, holding a certificate with `serial`, may have a session now: its
/// certificate is not revoked, and the cluster is in the inventory (once the hub knows one) and not disabled.
pub fn admitted(hub: &Hub, cluster: &str, serial: &str) -> Result<(), String> {
    if !serial.is_empty() && hub.shared.identities.is_revoked(serial) {
        return Err(format!("the certificate of cluster {cluster} (serial {serial}) is revoked"));
    }
    let st = hub.state();
    match st.clusters.get(cluster) {
        Some(spec) if spec.disabled => {
            Err(format!("cluster {cluster} is disabled in the fleet inventory (clusters/{cluster}.yaml)"))
        }
        None if !st.revision.is_empty() => Err(format!(
            "cluster {cluster} is not in the fleet inventory (no clusters/{cluster}.yaml at {})",
            st.revision.get(..12).unwrap_or(&st.revision)
        )),
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    hub: &Arc<Hub>,
    cluster: &str,
    serial: &str,
    presence: &Presence,
    // app → the digest (and revision) the agent holds for it now (it keeps one bundle per app).
    held: BTreeMap<String, (String, String)>,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: &Tx,
) -> Result<(), String> {
    // Reading and sending run side by side: a session busy sending (a slow agent, a large bundle) still reads
    // what its agent says, so neither side can wait on the other forever.
    let held = Mutex::new(held);
    let observer = hub.observer();
    let reader = async {
        loop {
            let m = inbound.message().await;
            presence.last_seen_ms.store(now_ms(), Ordering::Relaxed);
            match m {
                Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Status(report)) })) => {
                    // The agent holds the bundle of every digest it reports, applied or not.
                    {
                        let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                        for a in report.apps.iter().filter(|a| !a.digest.is_empty()) {
                            held.insert(a.app.clone(), (a.digest.clone(), a.revision.clone()));
                        }
                    }
                    hub.shared.metrics.reports.inc();
                    let obs = Observed { apps: report.apps, api: report.api, seen_ms: now_ms(), ..Default::default() };
                    if observer.send((cluster.to_string(), obs)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Ack(a)) })) => {
                    presence.acked_seq.store(a.seq, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("receiving from the agent failed: {e}")),
            }
        }
    };
    tokio::select! {
        r = reader => r,
        r = send_loop(hub, cluster, serial, presence, &held, tx) => r,
    }
}

/// Sends the cluster's desired state whenever it changes, and heartbeats.
async fn send_loop(
    hub: &Arc<Hub>,
    cluster: &str,
    serial: &str,
    presence: &Presence,
    held: &Mutex<BTreeMap<String, (String, String)>>,
    tx: &Tx,
) -> Result<(), String> {
    let mut sent: Option<Vec<(String, DesiredApp)>> = None;
    let mut seq = 0u64;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(15));
    let shutdown = hub.shared.shutdown.clone();
    let mut revocations = hub.shared.identities.revocations();
    loop {
        // A revoked certificate, a cluster removed from the inventory or disabled: the session ends now.
        if let Err(why) = admitted(hub, cluster, serial) {
            let _ = tx.send(Err(Status::permission_denied(why.clone()))).await;
            return Err(why);
        }
        // Read before the state: the state is at least this new.
        let store_revision = hub.shared.revision();
        let state = hub.state();
        // A cluster absent from the inventory receives nothing; a cluster the hub has no record of yet (an empty
        // store before its first commit) is sent nothing either: it keeps running what it runs.
        let desired = state.desired.get(cluster).filter(|_| state.clusters.contains_key(cluster));
        if let Some(desired) = desired {
            let snapshot = held.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let apps = resolve(desired, &snapshot, state.reports.get(cluster).map(|r| &**r));
            if sent.as_ref() != Some(&apps) {
                seq += 1;
                let mut msg = Vec::new();
                let mut to_send: Vec<(String, bytes::Bytes)> = Vec::new();
                let mut sent_to = Vec::new();
                for (app, d) in &apps {
                    // Bundles are read only for digests the agent does not hold yet.
                    let missing = snapshot.get(app).map(|h| &h.0) != Some(&d.digest);
                    let chunks = if missing { (d.size as usize).div_ceil(CHUNK).max(1) as u32 } else { 0 };
                    msg.push(pb::DesiredApp {
                        app: app.clone(),
                        digest: d.digest.clone(),
                        revision: d.revision.clone(),
                        size: d.size,
                        chunks,
                        traceparent: if missing {
                            hub.shared.traces.sending(&state, cluster, app, &d.digest, &d.revision)
                        } else {
                            String::new()
                        },
                    });
                    if missing && !to_send.iter().any(|(dg, _)| dg == &d.digest) {
                        let bytes = hub.shared.bundle(&d.digest).await?;
                        if bytes.len() as u64 != d.size {
                            return Err(format!(
                                "bundle {} in the store has {} bytes, expected {}",
                                d.digest,
                                bytes.len(),
                                d.size
                            ));
                        }
                        to_send.push((d.digest.clone(), bytes));
                    }
                    if missing {
                        sent_to.push((app.clone(), (d.digest.clone(), d.revision.clone())));
                    }
                }
                send(
                    tx,
                    pb::hub_message::Msg::Desired(pb::DesiredState {
                        seq,
                        revision: state.revision.clone(),
                        apps: msg,
                        epoch: hub.shared.epoch(),
                        store_revision,
                    }),
                )
                .await?;
                presence.sent_seq.store(seq, Ordering::Relaxed);
                for (digest, bytes) in to_send {
                    let n = bytes.len().div_ceil(CHUNK).max(1);
                    for i in 0..n {
                        let data = bytes.slice((i * CHUNK).min(bytes.len())..((i + 1) * CHUNK).min(bytes.len()));
                        let chunk = pb::BundleChunk { digest: digest.clone(), index: i as u32, data };
                        send(tx, pb::hub_message::Msg::Chunk(chunk)).await?;
                    }
                }
                held.lock().unwrap_or_else(|p| p.into_inner()).extend(sent_to);
                sent = Some(apps);
            }
        }
        drop(state);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = presence.replaced.cancelled() => {
                let _ = tx.send(Err(Status::aborted(format!(
                    "a newer session of cluster {cluster} replaced this one (two agents with one certificate?)"
                )))).await;
                return Err("replaced by a newer session of the same cluster".into());
            }
            _ = presence.wake.notified() => {}
            _ = revocations.changed() => {}
            _ = heartbeat.tick() => send(tx, pb::hub_message::Msg::Heartbeat(pb::Heartbeat { sent_unix_ms: now_ms() })).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_session_replaces_the_older_and_the_older_cannot_end_the_presence() {
        let s = Sessions::default();
        let a = s.open("eu-1").unwrap();
        let b = s.open("eu-1").unwrap();
        assert!(a.replaced.is_cancelled() && !b.replaced.is_cancelled());
        s.close("eu-1", a.id);
        assert!(s.present().contains("eu-1"), "the replaced session's end leaves the cluster connected");
        s.close("eu-1", b.id);
        assert!(s.present().is_empty());
    }

    #[tokio::test]
    async fn only_the_cluster_whose_desired_state_changed_wakes() {
        let s = Sessions::default();
        let a = s.open("a").unwrap();
        let b = s.open("b").unwrap();
        s.wake("a");
        let soon = Duration::from_millis(50);
        assert!(tokio::time::timeout(soon, a.wake.notified()).await.is_ok(), "a wakes");
        assert!(tokio::time::timeout(soon, b.wake.notified()).await.is_err(), "b sleeps on");
    }

    #[test]
    fn a_certificate_opening_sessions_in_a_loop_is_refused() {
        let s = Sessions::default();
        for _ in 0..SESSIONS_PER_MINUTE {
            s.open("eu-1").unwrap();
        }
        let e = s.open("eu-1").err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(s.open("eu-2").is_ok(), "other clusters are not affected");
    }

    #[test]
    fn adopted_apps_become_what_the_agent_holds() {
        let d = |digest: &str| DesiredApp {
            digest: digest.into(),
            revision: "r".into(),
            size: 1,
            error: None,
            adopt: false,
        };
        let desired: BTreeMap<String, DesiredApp> = [
            ("a".to_string(), d("sha256:a")),
            ("b".to_string(), DesiredApp::adopted()),
            ("c".to_string(), DesiredApp::adopted()),
        ]
        .into_iter()
        .collect();
        let held = [("b".to_string(), ("sha256:b".to_string(), "r0".to_string()))].into_iter().collect();
        let apps = resolve(&desired, &held, None);
        let names: Vec<(&str, &str)> = apps.iter().map(|(a, d)| (a.as_str(), d.digest.as_str())).collect();
        assert_eq!(names, vec![("a", "sha256:a"), ("b", "sha256:b")], "c is held by nobody: nothing to keep");
    }
}
