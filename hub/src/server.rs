//! The running hub: follows Git, keeps the fleet state in the store, streams each cluster's desired state
//! to its agent (identified by its certificate), and serves the platform API to operators.

use crate::git::Follower;
use crate::state::{advance, Desired, DesiredApp};
use crate::store::{Batch, Store};
use flotilla_common::fleet::render::{render_fleet, RenderCache, RenderStats};
use flotilla_common::fleet::{parse, ClusterSpec};
use flotilla_common::identity::{identity_of, Identity};
use flotilla_common::tools::SystemTools;
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
use flotilla_proto::platform::v1 as api;
use flotilla_proto::platform::v1::platform_service_server::{PlatformService, PlatformServiceServer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn, Instrument};

/// What an agent last reported for one app: the agent's message itself, stored as its protobuf encoding
/// (base64) so that every field the agent reports survives a restart of the hub.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppReport(pub pb::AppStatus);

impl From<&pb::AppStatus> for AppReport {
    fn from(a: &pb::AppStatus) -> Self {
        AppReport(a.clone())
    }
}

impl AppReport {
    fn to_proto(&self, app: &str) -> pb::AppStatus {
        pb::AppStatus { app: app.to_string(), ..self.0.clone() }
    }
}

impl Serialize for AppReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(prost::Message::encode_to_vec(&self.0)))
    }
}

impl<'de> Deserialize<'de> for AppReport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(D::Error::custom)?;
                let status = <pb::AppStatus as prost::Message>::decode(bytes.as_slice()).map_err(D::Error::custom)?;
                Ok(AppReport(status))
            }
            // Reports stored by an earlier hub: the fields it kept.
            serde_json::Value::Object(m) => {
                let s = |k: &str| m.get(k).and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
                let n = |k: &str| m.get(k).and_then(serde_json::Value::as_u64).unwrap_or_default();
                Ok(AppReport(pb::AppStatus {
                    digest: s("digest"),
                    revision: s("revision"),
                    phase: n("phase") as i32,
                    objects: n("objects") as u32,
                    objects_applied: n("objects_applied") as u32,
                    message: s("message"),
                    ..Default::default()
                }))
            }
            other => Err(D::Error::custom(format!("an app report must be a string, not {other}"))),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterReport {
    pub last_seen_unix_ms: i64,
    pub apps: BTreeMap<String, AppReport>,
}

/// How the current commit was rendered (see [`RenderStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendering {
    pub cluster_apps: u64,
    pub renders: u64,
    pub rendered: u64,
    pub tool_runs: u64,
    pub bundles: u64,
    pub millis: u64,
}

impl Rendering {
    fn new(s: RenderStats, millis: u64) -> Self {
        Rendering {
            cluster_apps: s.cluster_apps as u64,
            renders: s.renders as u64,
            rendered: s.rendered as u64,
            tool_runs: s.tool_runs as u64,
            bundles: s.bundles as u64,
            millis,
        }
    }
}

/// The hub's view of the fleet; mirrored in the store so a restart loses nothing.
#[derive(Debug, Default)]
pub struct HubState {
    pub revision: String,
    pub source_error: Option<String>,
    /// Problems of the current commit outside rendering (broken files, untargeted apps).
    pub problems: Vec<String>,
    pub rendering: Rendering,
    pub clusters: BTreeMap<String, ClusterSpec>,
    pub desired: Desired,
    pub reports: BTreeMap<String, ClusterReport>,
    pub connected: BTreeSet<String>,
    /// app → its rollout record.
    pub rollouts: BTreeMap<String, crate::rollouts::Record>,
    /// The fleet of the current commit (for rollout specs and labels).
    pub fleet: Option<Arc<flotilla_common::fleet::Fleet>>,
}

/// The hub's clock for rollouts (Unix ms): the system's, or a test's.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub struct Hub {
    clock: Clock,
    /// Orders audit records written within one millisecond.
    audit_seq: std::sync::atomic::AtomicU64,
    store: Arc<dyn Store>,
    follower: Follower,
    tools: Arc<SystemTools>,
    /// Renders of the previous commit, reused for apps that did not change.
    cache: Arc<std::sync::Mutex<RenderCache>>,
    /// One fetch at a time: a fetch that outlives its time limit keeps the repository until it ends.
    fetching: Arc<std::sync::Mutex<()>>,
    state: RwLock<HubState>,
    changed: watch::Sender<u64>,
    refresh: Notify,
    shutdown: CancellationToken,
}

/// How long the follow loop waits for one fetch before reporting the repository as unreachable.
const FETCH_LIMIT: Duration = Duration::from_secs(120);

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// An error with its causes: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Hub {
    /// Loads the state a previous run left in the store.
    pub fn new(store: Arc<dyn Store>, follower: Follower, shutdown: CancellationToken) -> anyhow::Result<Arc<Hub>> {
        let mut st = HubState::default();
        let text = |k: &str| -> anyhow::Result<Option<String>> {
            Ok(store.get(k)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
        };
        st.revision = text("source/revision")?.unwrap_or_default();
        st.source_error = text("source/error")?;
        if let Some(c) = store.get("fleet/clusters")? {
            st.clusters = serde_json::from_slice(&c)?;
        }
        if let Some(p) = store.get("fleet/problems")? {
            st.problems = serde_json::from_slice(&p)?;
        }
        if let Some(r) = store.get("fleet/rendering")? {
            st.rendering = serde_json::from_slice(&r)?;
        }
        for (k, v) in store.scan("desired/")? {
            st.desired.insert(k.trim_start_matches("desired/").to_string(), serde_json::from_slice(&v)?);
        }
        for (k, v) in store.scan("reports/")? {
            st.reports.insert(k.trim_start_matches("reports/").to_string(), serde_json::from_slice(&v)?);
        }
        let data: BTreeMap<String, Vec<u8>> = store
            .scan("rollout-data/")?
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("rollout-data/").to_string(), v))
            .collect();
        for (k, v) in store.scan("rollouts/")? {
            let app = k.trim_start_matches("rollouts/").to_string();
            let rec = crate::rollouts::Record::from_stored(Some(&v), data.get(&app).map(Vec::as_slice))?;
            st.rollouts.insert(app, rec);
        }
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Hub {
            clock: Arc::new(now_ms),
            audit_seq: Default::default(),
            store,
            follower,
            tools: Arc::new(SystemTools::detect()),
            cache: Arc::default(),
            fetching: Arc::default(),
            state: RwLock::new(st),
            changed,
            refresh: Notify::new(),
            shutdown,
        }))
    }

    /// The same hub with another clock for rollouts (tests drive it with paused tokio time).
    pub fn with_clock(self: Arc<Self>, clock: Clock) -> Arc<Hub> {
        let mut hub = Arc::into_inner(self).expect("with_clock before the hub is shared");
        hub.clock = clock;
        Arc::new(hub)
    }

    /// An app's rollout, as the hub keeps it.
    pub fn rollout(&self, app: &str) -> Option<flotilla_common::rollout::Rollout> {
        self.read().rollouts.get(app).and_then(|r| r.rollout.clone())
    }

    /// The desired state of one app on one cluster.
    pub fn desired(&self, cluster: &str, app: &str) -> Option<DesiredApp> {
        self.read().desired.get(cluster).and_then(|a| a.get(app)).cloned()
    }

    /// An operator's control of an app's rollout, recorded (who, what, when, and the answer) whether it
    /// applies or not. Returns what happened, or why it cannot.
    pub fn control(&self, app: &str, action: &crate::rollouts::Control, who: &str) -> Result<String, String> {
        let now = (self.clock)();
        let result = {
            let mut st = self.write();
            let labels: BTreeMap<String, BTreeMap<String, String>> =
                st.clusters.iter().map(|(c, s)| (c.clone(), s.labels.clone())).collect();
            let fleet = st.fleet.clone();
            let spec = fleet.as_ref().and_then(|f| f.rollout_for(app).ok().flatten().cloned());
            let mut rec = st.rollouts.remove(app).unwrap_or_default();
            let ctx = crate::rollouts::ControlContext { labels: &labels, spec: spec.as_ref(), who, now_ms: now };
            let result = crate::rollouts::control(app, &mut rec, &mut st.desired, &ctx, action);
            let mut batch = Batch::default();
            if let Ok((_, clusters)) = &result {
                for c in clusters {
                    if let Some(apps) = st.desired.get(c) {
                        batch = batch.put(format!("desired/{c}"), serde_json::to_vec(apps).unwrap_or_default());
                    }
                }
                batch = batch
                    .put(format!("rollouts/{app}"), rec.progress_json())
                    .put(format!("rollout-data/{app}"), rec.data_json());
            }
            let audit = serde_json::json!({
                "at_unix_ms": now, "operator": who, "app": app, "action": format!("{action:?}"),
                "result": match &result { Ok((m, _)) => m.clone(), Err(e) => format!("refused: {e}") },
            });
            let seq = self.audit_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            batch =
                batch.put(format!("audit/{now:016}-{seq:010}-{}", uuid::Uuid::new_v4().simple()), audit.to_string());
            if rec != crate::rollouts::Record::default() {
                st.rollouts.insert(app.to_string(), rec);
            }
            self.store.commit(batch).map_err(|e| format!("storing the control failed: {}", error_chain(&e)))?;
            result
        };
        info!(operator = %who, %app, ?action, result = ?result.as_ref().map(|(m, _)| m), "rollout control");
        let (message, _) = result?;
        self.changed.send_modify(|g| *g += 1);
        self.drive_rollouts();
        Ok(message)
    }

    /// The audit records, oldest first.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.store
            .scan("audit/")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Marks a cluster's agent connected or not (sessions do this; tests too).
    pub fn set_connected(&self, cluster: &str, connected: bool) {
        let mut st = self.write();
        if connected {
            st.connected.insert(cluster.to_string());
        } else {
            st.connected.remove(cluster);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HubState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HubState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn source_failed(&self, msg: String) {
        warn!(error = %msg, "following the fleet repository failed; serving the last good state");
        let _ = self.store.commit(Batch::default().put("source/error", msg.clone()));
        self.write().source_error = Some(msg);
    }

    /// Fetches once and, on a new commit, renders it and advances every cluster's desired state.
    pub async fn sync_once(&self) {
        let f = self.follower.clone();
        let lock = self.fetching.clone();
        let fetched = tokio::task::spawn_blocking(move || {
            let Ok(_held) = lock.try_lock() else {
                return Err("the previous fetch has not finished yet".to_string());
            };
            f.fetch().map_err(|e| error_chain(&e))
        });
        let snap = match tokio::time::timeout(FETCH_LIMIT, fetched).await {
            Ok(Ok(Ok(s))) => s,
            Ok(Ok(Err(msg))) => return self.source_failed(msg),
            Ok(Err(e)) => return self.source_failed(format!("the fetch task failed: {e}")),
            Err(_) => {
                return self.source_failed(format!(
                    "fetching {} took longer than {} s; retrying at the next poll",
                    self.follower.url(),
                    FETCH_LIMIT.as_secs()
                ))
            }
        };
        if snap.revision == self.read().revision {
            if self.read().source_error.is_some() {
                let _ = self.store.commit(Batch::default().delete("source/error"));
                self.write().source_error = None;
            }
            return;
        }
        let revision = snap.revision.clone();
        let (tools, cache) = (self.tools.clone(), self.cache.clone());
        let started = std::time::Instant::now();
        let rendered = tokio::task::spawn_blocking(move || {
            let fleet = parse(&snap.tree);
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            let rendered = render_fleet(&fleet, &*tools, &mut cache);
            (fleet, rendered)
        })
        .instrument(tracing::info_span!("render", %revision))
        .await;
        let (fleet, rendered) = match rendered {
            Ok(r) => r,
            Err(e) => return self.source_failed(format!("rendering {revision} failed: {e}")),
        };
        let rendering = Rendering::new(rendered.stats, started.elapsed().as_millis() as u64);
        let problems = fleet.problems();
        for p in &problems {
            warn!(%revision, problem = %p, "fleet repository problem");
        }
        let prev = self.read().desired.clone();
        let mut adv = advance(&prev, &fleet, &rendered, &revision);
        let mut records = self.read().rollouts.clone();
        let touched = crate::rollouts::gate(&mut records, &fleet, &prev, &mut adv.desired, &revision, (self.clock)());
        // A cluster whose file is broken stays in the inventory with its previous labels.
        let mut clusters = fleet.clusters.clone();
        {
            let st = self.read();
            for name in fleet.broken_clusters.keys() {
                if let Some(spec) = st.clusters.get(name) {
                    clusters.insert(name.clone(), spec.clone());
                }
            }
        }
        let mut batch = Batch::default();
        for (digest, bundle) in &adv.bundles {
            batch = batch.put(format!("bundles/{digest}"), bundle.bytes.clone());
        }
        for (cluster, apps) in &adv.desired {
            if prev.get(cluster) != Some(apps) {
                batch = batch.put(format!("desired/{cluster}"), serde_json::to_vec(apps).unwrap_or_default());
            }
        }
        for gone in prev.keys().filter(|c| !adv.desired.contains_key(*c)) {
            batch = batch.delete(format!("desired/{gone}"));
        }
        for app in &touched {
            if let Some(rec) = records.get(app) {
                batch = batch
                    .put(format!("rollouts/{app}"), rec.progress_json())
                    .put(format!("rollout-data/{app}"), rec.data_json());
            }
        }
        batch = batch
            .put("fleet/clusters", serde_json::to_vec(&clusters).unwrap_or_default())
            .put("fleet/problems", serde_json::to_vec(&problems).unwrap_or_default())
            .put("fleet/rendering", serde_json::to_vec(&rendering).unwrap_or_default())
            .put("source/revision", revision.clone())
            .delete("source/error");
        if let Err(e) = self.store.commit(batch) {
            warn!(error = %error_chain(&e), "storing the new fleet state failed; keeping the previous one");
            return;
        }
        {
            let mut st = self.write();
            st.revision = revision.clone();
            st.source_error = None;
            st.clusters = clusters;
            st.desired = adv.desired;
            st.problems = problems;
            st.rendering = rendering;
            st.rollouts = records;
            st.fleet = Some(Arc::new(fleet.clone()));
        }
        info!(
            %revision,
            clusters = fleet.clusters.len(),
            apps = fleet.apps.len(),
            cluster_apps = rendering.cluster_apps,
            renders = rendering.renders,
            rendered = rendering.rendered,
            tool_runs = rendering.tool_runs,
            bundles = rendering.bundles,
            millis = rendering.millis,
            "fleet advanced"
        );
        self.changed.send_modify(|g| *g += 1);
    }

    /// Follows the repository until shutdown: every `poll`, or at once on [`Hub::refresh`].
    pub async fn follow(self: Arc<Self>, poll: Duration) {
        loop {
            self.sync_once().await;
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
                _ = self.refresh.notified() => {}
            }
        }
    }

    pub fn refresh(&self) {
        self.refresh.notify_one();
    }

    /// What each cluster of a rollout reports for its app.
    fn observations(
        st: &HubState,
        app: &str,
        r: &flotilla_common::rollout::Rollout,
    ) -> BTreeMap<String, flotilla_common::rollout::Observation> {
        use flotilla_common::rollout::{Observation, ObservedHealth};
        r.waves
            .iter()
            .flat_map(|w| &w.clusters)
            .map(|c| {
                let report = st.reports.get(&c.name).and_then(|rep| rep.apps.get(app)).map(|a| &a.0);
                let health = match report {
                    Some(a) if a.phase == pb::Phase::Failed as i32 => ObservedHealth::Degraded,
                    // Healthy counts once the whole revision is applied.
                    Some(a) if a.phase != pb::Phase::Applied as i32 => ObservedHealth::Progressing,
                    Some(a) => match pb::Health::try_from(a.health).unwrap_or(pb::Health::Unspecified) {
                        pb::Health::Healthy => ObservedHealth::Healthy,
                        pb::Health::Degraded => ObservedHealth::Degraded,
                        pb::Health::Progressing | pb::Health::Missing => ObservedHealth::Progressing,
                        pb::Health::Unspecified => ObservedHealth::Unknown,
                    },
                    None => ObservedHealth::Unknown,
                };
                let reason = report
                    .map(|a| if !a.message.is_empty() { a.message.clone() } else { a.health_reason.clone() })
                    .unwrap_or_default();
                let obs = Observation {
                    online: st.connected.contains(&c.name),
                    revision: report.map(|a| a.revision.clone()).unwrap_or_default(),
                    health,
                    reason,
                };
                (c.name.clone(), obs)
            })
            .collect()
    }

    /// One planner step for every active rollout; changes are stored in one batch, then streamed.
    pub fn drive_rollouts(&self) {
        let now = (self.clock)();
        let mut batch = Batch::default();
        let mut changed_any = false;
        {
            let mut st = self.write();
            let apps: Vec<String> = st
                .rollouts
                .iter()
                .filter(|(_, r)| r.rollout.as_ref().is_some_and(|r| r.active()))
                .map(|(a, _)| a.clone())
                .collect();
            for app in apps {
                let Some(mut rec) = st.rollouts.remove(&app) else { continue };
                let obs = match &rec.rollout {
                    Some(r) => Self::observations(&st, &app, r),
                    None => BTreeMap::new(),
                };
                let stepped = crate::rollouts::drive(&app, &mut rec, &mut st.desired, &obs, now);
                for c in &stepped.clusters {
                    if let Some(apps) = st.desired.get(c) {
                        batch = batch.put(format!("desired/{c}"), serde_json::to_vec(apps).unwrap_or_default());
                    }
                }
                if stepped.progressed || !stepped.clusters.is_empty() {
                    batch = batch.put(format!("rollouts/{app}"), rec.progress_json());
                    changed_any = true;
                }
                if stepped.completed {
                    batch = batch.put(format!("rollout-data/{app}"), rec.data_json());
                }
                st.rollouts.insert(app, rec);
            }
            if changed_any {
                // Under the lock, so no other change interleaves between memory and store.
                if let Err(e) = self.store.commit(batch) {
                    warn!(error = %error_chain(&e), "storing a rollout step failed");
                }
            }
        }
        if changed_any {
            self.changed.send_modify(|g| *g += 1);
        }
    }

    /// Drives rollouts every second until shutdown.
    pub async fn run_rollouts(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => self.drive_rollouts(),
            }
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Records an agent's status report (merged per app) and persists it.
    pub fn record_report(&self, cluster: &str, report: &pb::StatusReport) {
        let mut st = self.write();
        let r = st.reports.entry(cluster.to_string()).or_default();
        r.last_seen_unix_ms = now_ms();
        for a in &report.apps {
            r.apps.insert(a.app.clone(), AppReport::from(a));
        }
        let bytes = serde_json::to_vec(&*r).unwrap_or_default();
        drop(st);
        if let Err(e) = self.store.commit(Batch::default().put(format!("reports/{cluster}"), bytes)) {
            warn!(%cluster, error = %error_chain(&e), "storing a status report failed");
        }
    }

    fn cluster_view(&self, name: &str) -> Option<api::Cluster> {
        let st = self.read();
        let spec = st.clusters.get(name)?;
        let desired = st.desired.get(name).cloned().unwrap_or_default();
        let report = st.reports.get(name).cloned().unwrap_or_default();
        let mut in_sync = 0;
        let mut revisions = BTreeSet::new();
        let apps = desired
            .iter()
            .map(|(app, d)| {
                let applied = report.apps.get(app);
                if applied.is_some_and(|a| a.0.digest == d.digest && a.0.phase == pb::Phase::Applied as i32) {
                    in_sync += 1;
                }
                if let Some(a) = applied {
                    revisions.insert(a.0.revision.clone());
                }
                api::ClusterApp {
                    app: app.clone(),
                    desired_digest: d.digest.clone(),
                    desired_revision: d.revision.clone(),
                    applied: applied.map(|a| a.to_proto(app)),
                    error: d.error.clone().unwrap_or_default(),
                }
            })
            .collect();
        let revision = if in_sync == desired.len() && revisions.len() == 1 {
            revisions.into_iter().next().unwrap_or_default()
        } else {
            String::new()
        };
        Some(api::Cluster {
            name: name.to_string(),
            labels: spec.labels.clone().into_iter().collect(),
            connected: st.connected.contains(name),
            revision,
            apps_in_sync: in_sync as u32,
            apps_total: desired.len() as u32,
            last_seen_unix_ms: report.last_seen_unix_ms,
            apps,
        })
    }

    /// Serves agents and operators on `listener` with mutual TLS until shutdown, and on the in-process
    /// connections `in_process` delivers (mutual TLS as well, over memory).
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: &HubTls,
        in_process: Option<mpsc::Receiver<tokio::io::DuplexStream>>,
    ) -> Result<(), tonic::transport::Error> {
        let tls = ServerTlsConfig::new()
            .identity(TlsIdentity::from_pem(&tls.cert_pem, &tls.key_pem))
            .client_ca_root(Certificate::from_pem(&tls.ca_pem));
        let shutdown = self.shutdown.clone();
        let server = |hub: Arc<Hub>| -> Result<_, tonic::transport::Error> {
            Ok(Server::builder()
                .tls_config(tls.clone())?
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .add_service(AgentServiceServer::new(AgentApi(hub.clone())))
                .add_service(PlatformServiceServer::new(PlatformApi(hub))))
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

fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let first = certs.first().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    identity_of(first).map_err(|e| Status::unauthenticated(e.to_string()))
}

struct AgentApi(Arc<Hub>);

const CHUNK: usize = flotilla_proto::MAX_CHUNK_BYTES;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = ReceiverStream<Result<pb::HubMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let cluster = match caller(&req)? {
            Identity::Cluster(c) => c,
            other => return Err(Status::permission_denied(format!("{other} may not open an agent session"))),
        };
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(h)) }))) => h,
            _ => return Err(Status::invalid_argument("the first message of a session must be a Hello")),
        };
        let (tx, rx) = mpsc::channel(16);
        let hub = self.0.clone();
        let span = tracing::info_span!("agent-session", %cluster);
        tokio::spawn(
            async move {
                info!(version = %hello.agent_version, applied = hello.applied.len(), "agent connected");
                hub.write().connected.insert(cluster.clone());
                let held: BTreeMap<String, String> =
                    hello.applied.iter().map(|a| (a.app.clone(), a.digest.clone())).collect();
                let result = run_session(&hub, &cluster, held, inbound, &tx).await;
                hub.write().connected.remove(&cluster);
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

async fn run_session(
    hub: &Arc<Hub>,
    cluster: &str,
    // app → the digest the agent holds for it now (it keeps one bundle per app).
    mut held: BTreeMap<String, String>,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: &Tx,
) -> Result<(), String> {
    let mut changed = hub.changed.subscribe();
    let mut sent: Option<BTreeMap<String, DesiredApp>> = None;
    let mut seq = 0u64;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(15));
    loop {
        let (in_inventory, desired, revision) = {
            let st = hub.read();
            (
                st.clusters.contains_key(cluster),
                st.desired.get(cluster).cloned().unwrap_or_default(),
                st.revision.clone(),
            )
        };
        // A cluster absent from the inventory receives nothing.
        if in_inventory && sent.as_ref() != Some(&desired) {
            seq += 1;
            let mut apps = Vec::new();
            let mut to_send = Vec::new();
            let mut sent_to = Vec::new();
            for (app, d) in desired.iter().filter(|(_, d)| !d.digest.is_empty()) {
                // Bundles are read from the store only for digests the agent does not hold yet.
                let missing = held.get(app) != Some(&d.digest);
                let chunks = if missing { (d.size as usize).div_ceil(CHUNK).max(1) as u32 } else { 0 };
                apps.push(pb::DesiredApp {
                    app: app.clone(),
                    digest: d.digest.clone(),
                    revision: d.revision.clone(),
                    size: d.size,
                    chunks,
                });
                if missing && !to_send.iter().any(|(dg, _): &(String, Vec<u8>)| dg == &d.digest) {
                    let bytes = hub
                        .store
                        .get(&format!("bundles/{}", d.digest))
                        .map_err(|e| error_chain(&e))?
                        .ok_or_else(|| format!("bundle {} is missing from the store", d.digest))?;
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
                    sent_to.push((app.clone(), d.digest.clone()));
                }
            }
            send(tx, pb::hub_message::Msg::Desired(pb::DesiredState { seq, revision, apps })).await?;
            for (digest, bytes) in to_send {
                let pieces: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(CHUNK).collect() };
                for (i, piece) in pieces.into_iter().enumerate() {
                    send(
                        tx,
                        pb::hub_message::Msg::Chunk(pb::BundleChunk {
                            digest: digest.clone(),
                            index: i as u32,
                            data: piece.to_vec(),
                        }),
                    )
                    .await?;
                }
            }
            held.extend(sent_to);
            sent = Some(desired);
        }
        tokio::select! {
            _ = hub.shutdown.cancelled() => return Ok(()),
            r = changed.changed() => if r.is_err() { return Ok(()) },
            _ = heartbeat.tick() => send(tx, pb::hub_message::Msg::Heartbeat(pb::Heartbeat { sent_unix_ms: now_ms() })).await?,
            m = inbound.message() => match m {
                Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Status(report)) })) => {
                    // The agent holds the bundle of every digest it reports, applied or not.
                    for a in report.apps.iter().filter(|a| !a.digest.is_empty()) {
                        held.insert(a.app.clone(), a.digest.clone());
                    }
                    hub.record_report(cluster, &report);
                }
                Ok(Some(_)) => {
                    let mut st = hub.write();
                    st.reports.entry(cluster.to_string()).or_default().last_seen_unix_ms = now_ms();
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("receiving from the agent failed: {e}")),
            },
        }
    }
}

struct PlatformApi(Arc<Hub>);

fn operator<T>(req: &Request<T>) -> Result<String, Status> {
    match caller(req)? {
        Identity::Operator(o) => Ok(o),
        other => Err(Status::permission_denied(format!(
            "{other} may not use the platform API; an operator certificate is required"
        ))),
    }
}

#[tonic::async_trait]
impl PlatformService for PlatformApi {
    async fn list_clusters(
        &self,
        req: Request<api::ListClustersRequest>,
    ) -> Result<Response<api::ListClustersResponse>, Status> {
        operator(&req)?;
        let names: Vec<String> = self.0.read().clusters.keys().cloned().collect();
        let clusters = names.iter().filter_map(|n| self.0.cluster_view(n)).collect();
        let st = self.0.read();
        let r = st.rendering;
        Ok(Response::new(api::ListClustersResponse {
            clusters,
            revision: st.revision.clone(),
            source_error: st.source_error.clone().unwrap_or_default(),
            problems: st.problems.clone(),
            render_stats: Some(api::RenderStats {
                cluster_apps: r.cluster_apps,
                renders: r.renders,
                rendered: r.rendered,
                tool_runs: r.tool_runs,
                bundles: r.bundles,
                render_millis: r.millis,
            }),
        }))
    }

    async fn get_cluster(&self, req: Request<api::GetClusterRequest>) -> Result<Response<api::Cluster>, Status> {
        operator(&req)?;
        let name = req.into_inner().name;
        self.0
            .cluster_view(&name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("cluster {name:?} is not in the fleet inventory")))
    }

    async fn refresh(&self, req: Request<api::RefreshRequest>) -> Result<Response<api::RefreshResponse>, Status> {
        let who = operator(&req)?;
        info!(operator = %who, "refresh requested");
        self.0.refresh();
        Ok(Response::new(api::RefreshResponse { revision: self.0.read().revision.clone() }))
    }

    async fn list_rollouts(
        &self,
        req: Request<api::ListRolloutsRequest>,
    ) -> Result<Response<api::ListRolloutsResponse>, Status> {
        operator(&req)?;
        let app = req.into_inner().app;
        let st = self.0.read();
        if !app.is_empty() && !st.rollouts.contains_key(&app) {
            return Err(Status::not_found(format!(
                "app {app:?} has no rollout (no waves, or no change since they were set)"
            )));
        }
        let now = now_ms();
        let rollouts = st
            .rollouts
            .iter()
            .filter(|(a, _)| app.is_empty() || **a == app)
            .map(|(a, rec)| rollout_view(a, rec, now))
            .collect();
        Ok(Response::new(api::ListRolloutsResponse { rollouts }))
    }

    async fn control_rollout(
        &self,
        req: Request<api::ControlRolloutRequest>,
    ) -> Result<Response<api::ControlRolloutResponse>, Status> {
        use crate::rollouts::Control;
        use api::control_rollout_request::Action as A;
        let who = operator(&req)?;
        let r = req.into_inner();
        let action = match A::try_from(r.action).unwrap_or(A::Unspecified) {
            A::Pause => Control::Pause,
            A::Resume => Control::Resume,
            A::Approve if !r.wave.is_empty() => Control::Approve(r.wave.clone()),
            A::Approve => return Err(Status::invalid_argument("approve needs the wave")),
            A::Abort => Control::Abort,
            A::Rollback if !r.revision.is_empty() => {
                Control::Rollback { revision: r.revision.clone(), immediate: r.immediate }
            }
            A::Rollback => return Err(Status::invalid_argument("rollback needs the revision to go back to")),
            A::Unspecified => return Err(Status::invalid_argument("no action")),
        };
        match self.0.control(&r.app, &action, &who) {
            Ok(message) => Ok(Response::new(api::ControlRolloutResponse { message })),
            Err(e) => Err(Status::failed_precondition(e)),
        }
    }

    async fn explain(&self, req: Request<api::ExplainRequest>) -> Result<Response<api::ExplainResponse>, Status> {
        operator(&req)?;
        let r = req.into_inner();
        let st = self.0.read();
        if !st.clusters.contains_key(&r.cluster) {
            return Err(Status::not_found(format!("cluster {:?} is not in the fleet inventory", r.cluster)));
        }
        let desired = st.desired.get(&r.cluster).cloned().unwrap_or_default();
        let mut apps: BTreeSet<String> = desired.keys().cloned().collect();
        apps.extend(
            st.rollouts.iter().filter(|(_, rec)| rec.candidates.contains_key(&r.cluster)).map(|(a, _)| a.clone()),
        );
        if !r.app.is_empty() {
            if !apps.contains(&r.app) {
                return Err(Status::not_found(format!("app {:?} does not target cluster {:?}", r.app, r.cluster)));
            }
            apps.retain(|a| *a == r.app);
        }
        let mut lines = Vec::new();
        for app in apps {
            let applied = st.reports.get(&r.cluster).and_then(|rep| rep.apps.get(&app)).map(|a| a.0.revision.clone());
            let d = desired.get(&app);
            let mut line = match (d, applied.as_deref()) {
                (Some(d), Some(a)) if a == d.revision => {
                    format!("{app}: runs {}", &d.revision.get(..12).unwrap_or(&d.revision))
                }
                (Some(d), Some(a)) => format!(
                    "{app}: desired {}, runs {}",
                    d.revision.get(..12).unwrap_or(&d.revision),
                    a.get(..12).unwrap_or(a)
                ),
                (Some(d), None) => {
                    format!("{app}: desired {}, not reported yet", d.revision.get(..12).unwrap_or(&d.revision))
                }
                (None, _) => format!("{app}: not on this cluster yet"),
            };
            if let Some(e) = d.and_then(|d| d.error.clone()) {
                line.push_str(&format!("; the newest commit cannot be used: {e}"));
            }
            if let Some(rollout) = st.rollouts.get(&app).and_then(|rec| rec.rollout.as_ref()) {
                if rollout.wave_of(&r.cluster).is_some() {
                    line.push_str(&format!("; {}", flotilla_common::rollout::explain(rollout, &r.cluster)));
                }
            }
            if let Some(b) = st.rollouts.get(&app).and_then(|rec| rec.blocked.clone()) {
                line.push_str(&format!("; blocked: {b}"));
            }
            lines.push(line);
        }
        Ok(Response::new(api::ExplainResponse { lines }))
    }
}

/// A rollout as the platform API shows it.
fn rollout_view(app: &str, rec: &crate::rollouts::Record, now: i64) -> api::Rollout {
    use flotilla_common::rollout::{ClusterOutcome as O, WavePhase};
    let Some(r) = &rec.rollout else {
        return api::Rollout {
            app: app.to_string(),
            phase: "none".into(),
            timeline: rec.timeline.iter().cloned().collect(),
            blocked: rec.blocked.clone().unwrap_or_default(),
            ..Default::default()
        };
    };
    let mut earlier_open: Option<String> = None;
    let waves = r
        .waves
        .iter()
        .map(|w| {
            let count = |f: &dyn Fn(&O) -> bool| w.clusters.iter().filter(|c| f(&c.outcome)).count() as u32;
            let n = w.clusters.len();
            let waiting = match (&w.phase, &earlier_open) {
                (WavePhase::AwaitingApproval, _) => "awaits approval".to_string(),
                (WavePhase::Pending, Some(e)) => format!("waits for wave {e}"),
                _ => String::new(),
            };
            if !matches!(w.phase, WavePhase::Passed) && earlier_open.is_none() {
                earlier_open = Some(w.spec.name.clone());
            }
            api::Wave {
                name: w.spec.name.clone(),
                phase: w.phase.to_string(),
                clusters: n as u32,
                updating: count(&|o| *o == O::Updating),
                healthy: count(&|o| *o == O::Healthy),
                failed: count(&|o| matches!(o, O::Failed(_))),
                pending: count(&|o| *o == O::Pending),
                skipped: count(&|o| matches!(o, O::Skipped | O::RolledBack)),
                max_parallel: w.spec.max_parallel.map_or(n, |m| m.of(n)).max(1) as u32,
                failure_budget: w.spec.failure_budget.of(n) as u32,
                bake_remaining_s: match w.phase {
                    WavePhase::Baking { until_ms } => ((until_ms - now).max(0) + 999) / 1000,
                    _ => 0,
                },
                progress_deadline_s: w.spec.progress_deadline_seconds,
                approval: w.spec.approval,
                approved_by: w.approved_by.clone().unwrap_or_default(),
                waiting,
            }
        })
        .collect();
    api::Rollout {
        app: app.to_string(),
        revision: r.revision.clone(),
        previous: r.previous.clone().unwrap_or_default(),
        phase: r.phase.to_string(),
        waves,
        timeline: rec.timeline.iter().cloned().collect(),
        started_unix_ms: r.started_ms,
        blocked: rec.blocked.clone().unwrap_or_default(),
    }
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
}

/// Runs a hub until `shutdown` is cancelled. Returns the bound address through `bound`.
pub async fn run(
    cfg: HubConfig,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::new(crate::store::RedbStore::open(&cfg.data_dir.join("hub.redb"))?);
    let follower =
        Follower::new(cfg.repo.clone(), cfg.branch.clone(), cfg.data_dir.join("repo.git")).with_auth(cfg.auth.clone());
    let hub = Hub::new(store, follower, shutdown.clone())?;
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
    info!(%addr, repo = %cfg.repo, branch = %cfg.branch, "hub listening");
    if let Some(b) = bound {
        let _ = b.send(addr);
    }
    let follow = tokio::spawn(hub.clone().follow(cfg.poll).instrument(tracing::info_span!("git-follow")));
    let rollouts =
        tokio::spawn(hub.clone().run_rollouts(Duration::from_secs(1)).instrument(tracing::info_span!("rollouts")));
    let served = hub.serve(listener, &cfg.tls, cfg.in_process).await;
    shutdown.cancel();
    let _ = follow.await;
    let _ = rollouts.await;
    if let Some(w) = webhook {
        let _ = w.await;
    }
    served?;
    Ok(())
}
