//! The running hub around its state machine: one writer task owns the state, applies every change as a
//! [`Transition`](crate::machine::Transition), commits its batch to the store (on a blocking thread), and
//! only then publishes the next state as an immutable snapshot that sessions and the platform API read
//! without locks. Callers send the writer commands over a bounded channel and get its answer back; agents'
//! observations arrive on their own bounded channel and are flushed as one store transaction per interval.

use crate::git::Follower;
use crate::machine::{Observed, State, Synced, Transition};
use crate::report::Rendering;
use crate::rollouts::Control;
use crate::sessions::Sessions;
use crate::store::Store;
use arc_swap::ArcSwap;
use bytes::Bytes;
use flotilla_common::fleet::parse;
use flotilla_common::fleet::render::{render_fleet, RenderCache};
use flotilla_common::tools::SystemTools;
use flotilla_proto::agent::v1 as pb;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// The hub's clock for rollouts (Unix ms): the system's, or a test's.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// How long the follow loop waits for one fetch before reporting the repository as unreachable.
const FETCH_LIMIT: Duration = Duration::from_secs(120);

/// The agents' reconnect backoff cap (agent::session) with its largest jitter, plus a margin: after a restart,
/// every agent that was connected has tried again within this time.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(50);

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub use flotilla_common::error_chain;

/// How a hub runs its loops.
#[derive(Clone)]
pub struct Options {
    pub clock: Clock,
    /// After the hub starts, offline rules wait this long for agents to reconnect.
    pub grace: Duration,
    /// How often rollouts are stepped (`None`: only by [`Hub::drive_rollouts`], for tests).
    pub tick: Option<Duration>,
    /// How often agents' observations are written (one transaction for all clusters).
    pub flush: Duration,
    /// The leader's epoch (hub replicas: its election key's creation revision; 0 for a single hub).
    pub epoch: u64,
    /// Start as a standby replica: serve from the state other replicas write, act on nothing (until
    /// [`Hub::promote`]).
    pub standby: bool,
    /// How a standby reaches the leader.
    pub forward: Option<crate::forward::Forward>,
    /// Why the hub does not serve current state, asked when an agent connects and by `/readyz`.
    pub behind: Option<Behind>,
    /// Traces of commits (an OTLP exporter is installed), and how many clusters' spans each records.
    pub traces: Option<usize>,
    /// Operator roles, revoked certificates and the audit sink (default: every operator is admin).
    pub identities: Arc<crate::identities::Identities>,
    /// This replica's name in audit records (empty for a single hub).
    pub replica: String,
    /// Issues certificates to joining and renewing agents (the fleet CA's key is in the certs directory).
    pub signer: Option<Arc<crate::bootstrap::Signer>>,
}

/// Says why a hub does not serve current state (None: it does).
pub type Behind = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl Default for Options {
    fn default() -> Self {
        Options {
            clock: Arc::new(now_ms),
            grace: DEFAULT_GRACE,
            tick: Some(Duration::from_secs(1)),
            flush: Duration::from_secs(1),
            epoch: 0,
            standby: false,
            forward: None,
            behind: None,
            traces: None,
            identities: Arc::default(),
            replica: String::new(),
            signer: None,
        }
    }
}

/// Identical refusals (same caller, call and answer) are recorded once within this time.
pub const REFUSAL_EVERY_MS: i64 = 10_000;

/// What the writer is asked to do.
enum Command {
    Synced(Box<Synced>, oneshot::Sender<Result<String, String>>),
    SourceFailed(String),
    SourceCurrent,
    Control {
        app: String,
        action: Control,
        who: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Tick(oneshot::Sender<()>),
    Flush(oneshot::Sender<()>),
    /// Keys another replica wrote (a standby follows the leader; the leader follows standbys' reports).
    Followed(BTreeMap<String, Option<Vec<u8>>>),
    /// The state read again in full (a watch that fell behind etcd's compaction).
    Reloaded(Box<State>),
    /// Every key another replica wrote up to this store revision has been followed.
    Caught(u64),
    /// This replica leads from now on, with this epoch (its store is already fenced).
    Promote(u64, oneshot::Sender<Result<(), String>>),
    /// This replica no longer leads (its lease is lost): it stops acting and stands by.
    Demote(oneshot::Sender<()>),
    /// An audit record on its own (a refusal, a refresh, a join token), stored before the reply.
    Audit(crate::audit::AuditRecord, oneshot::Sender<()>),
    /// A new bootstrap token, stored (with its audit record) before the reply.
    CreateToken {
        id: String,
        token: crate::join::JoinToken,
        rec: crate::audit::AuditRecord,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// A join with a bootstrap token: decided and its use spent in one transition.
    Join {
        id: String,
        secret: String,
        cluster: String,
        rec: crate::audit::AuditRecord,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// What sessions, the platform API and the writer share.
pub struct Shared {
    pub store: Arc<dyn Store>,
    snapshot: ArcSwap<State>,
    pub sessions: Sessions,
    bundles: Mutex<HashMap<String, Bytes>>,
    /// Reads of bundles missing from `bundles`, one at a time: 10,000 sessions wanting a new bundle at once
    /// read it from the store once, not 10,000 times.
    loading: tokio::sync::Mutex<()>,
    pub clock: Clock,
    pub started_ms: i64,
    pub grace_ms: i64,
    pub shutdown: CancellationToken,
    /// The leader's epoch, sent with every desired state (0 for a single hub; a standby sends the epoch of
    /// the leader it follows).
    epoch: std::sync::atomic::AtomicU64,
    /// Whether this hub acts (follows Git, steps rollouts, executes controls) or stands by.
    leading: std::sync::atomic::AtomicBool,
    /// How a standby reaches the leader (controls and refreshes are forwarded to it).
    pub forward: Option<crate::forward::Forward>,
    /// Why this hub does not serve current state, if it does not (a replica behind etcd).
    behind: Option<Behind>,
    /// The store revision the published state is at least as new as (etcd's; 0 for a single hub): set after
    /// the state is published, so a reader that reads it first and the state second never overstates it.
    revision: std::sync::atomic::AtomicU64,
    /// The hub's replicas as last seen (`flotilla hubs`), and the store they share.
    pub replicas: Mutex<(String, Vec<flotilla_proto::platform::v1::HubReplica>)>,
    pub metrics: crate::metrics::HubMetrics,
    pub traces: crate::traces::Traces,
    /// Whether a fetch of the fleet repository has succeeded since the start.
    pub followed_once: std::sync::atomic::AtomicBool,
    pub identities: Arc<crate::identities::Identities>,
    pub replica: String,
    /// Signs joins and renewals; replaced when the CA files change.
    pub signer: arc_swap::ArcSwapOption<crate::bootstrap::Signer>,
}

impl Shared {
    /// The current committed state.
    pub fn state(&self) -> Arc<State> {
        self.snapshot.load_full()
    }

    /// A bundle's bytes, read from the store once and shared by every session that sends it.
    pub async fn bundle(&self, digest: &str) -> Result<Bytes, String> {
        if let Some(b) = self.bundles.lock().unwrap_or_else(|p| p.into_inner()).get(digest) {
            return Ok(b.clone());
        }
        let _one_read = self.loading.lock().await;
        if let Some(b) = self.bundles.lock().unwrap_or_else(|p| p.into_inner()).get(digest) {
            // Read by the session that held the lock before this one.
            return Ok(b.clone());
        }
        let store = self.store.clone();
        let key = crate::keys::Key::Bundle(digest).path();
        let bytes = tokio::task::spawn_blocking(move || store.get(&key))
            .await
            .map_err(|e| format!("reading bundle {digest}: {e}"))?
            .map_err(|e| error_chain(&e))?
            .ok_or_else(|| format!("bundle {digest} is missing from the store"))?;
        let bytes = Bytes::from(bytes);
        self.bundles.lock().unwrap_or_else(|p| p.into_inner()).insert(digest.to_string(), bytes.clone());
        Ok(bytes)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A standby follows a new leader's epoch (never a lower one).
    pub fn follow_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
    }

    /// The whole state read from the store again (off the async workers).
    pub async fn load_again(&self) -> Result<State, String> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || State::load(&*store)).await {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(e)) => Err(format!("reading the state from the store failed: {}", error_chain(&e))),
            Err(e) => Err(format!("reading the state from the store failed: {e}")),
        }
    }

    /// `/readyz`: the store is open and the hub serves current state ([`Shared::readiness`]), and it has a
    /// commit to serve: one in its store, or a fetch of the repository succeeded (a hub whose store holds a
    /// commit serves it while the repository is away; one with an empty store has nothing to serve yet).
    pub fn ready(&self) -> Result<(), String> {
        self.readiness()?;
        if self.leading()
            && self.state().revision.is_empty()
            && !self.followed_once.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err("the fleet repository has not been fetched yet".into());
        }
        Ok(())
    }

    /// Whether this hub serves current state (agents are refused while it does not).
    pub fn readiness(&self) -> Result<(), String> {
        match self.behind.as_ref().and_then(|b| b()) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// See [`Shared::revision`]: read it before the state it stamps.
    pub fn revision(&self) -> u64 {
        self.revision.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this hub leads (a single hub always does).
    pub fn leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the restart grace is still running.
    pub fn in_grace(&self, now: i64) -> bool {
        now < self.started_ms + self.grace_ms
    }
}

pub struct Hub {
    pub shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    observations: mpsc::Sender<(String, Observed)>,
    follower: Follower,
    tools: Arc<SystemTools>,
    /// Renders of the previous commit, reused for apps that did not change.
    cache: Arc<Mutex<RenderCache>>,
    /// One fetch at a time: a fetch that outlives its time limit keeps the repository until it ends.
    fetching: Arc<Mutex<()>>,
    refresh: Notify,
    /// A standby's refresh on its way to the leader.
    forwarding: Arc<std::sync::atomic::AtomicBool>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Refusals recorded lately: what they were, when (at most 4,096 remembered).
    refusals: Mutex<HashMap<String, i64>>,
}

impl Hub {
    /// Loads the state a previous run left in the store and starts the writer.
    pub fn new(store: Arc<dyn Store>, follower: Follower, shutdown: CancellationToken) -> anyhow::Result<Arc<Hub>> {
        Self::with_options(store, follower, shutdown, Options::default())
    }

    pub fn with_options(
        store: Arc<dyn Store>,
        follower: Follower,
        shutdown: CancellationToken,
        opts: Options,
    ) -> anyhow::Result<Arc<Hub>> {
        let state = State::load(&*store)?;
        let started_ms = (opts.clock)();
        let shared = Arc::new(Shared {
            store,
            snapshot: ArcSwap::from_pointee(state),
            sessions: Sessions::default(),
            bundles: Mutex::default(),
            loading: tokio::sync::Mutex::default(),
            clock: opts.clock.clone(),
            started_ms,
            grace_ms: opts.grace.as_millis() as i64,
            epoch: opts.epoch.into(),
            leading: (!opts.standby).into(),
            forward: opts.forward.clone(),
            behind: opts.behind.clone(),
            revision: Default::default(),
            replicas: Mutex::new(("embedded".into(), Vec::new())),
            metrics: Default::default(),
            traces: crate::traces::Traces::new(opts.traces.is_some(), opts.traces.unwrap_or(0)),
            followed_once: Default::default(),
            identities: opts.identities.clone(),
            replica: opts.replica.clone(),
            signer: arc_swap::ArcSwapOption::new(opts.signer.clone()),
            shutdown,
        });
        let (commands, rx) = mpsc::channel(64);
        let (observations, obs_rx) = mpsc::channel(4096);
        let writer = tokio::spawn(writer(shared.clone(), rx, obs_rx, opts).instrument(tracing::info_span!("writer")));
        Ok(Arc::new(Hub {
            shared,
            commands,
            observations,
            follower,
            tools: Arc::new(SystemTools::detect()),
            cache: Arc::default(),
            fetching: Arc::default(),
            refresh: Notify::new(),
            forwarding: Arc::default(),
            refusals: Mutex::default(),
            writer: Mutex::new(Some(writer)),
        }))
    }

    pub fn state(&self) -> Arc<State> {
        self.shared.state()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Waits for the writer to flush and stop (after shutdown was cancelled).
    pub async fn stopped(&self) {
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }

    /// An app's rollout, as the hub keeps it.
    pub fn rollout(&self, app: &str) -> Option<flotilla_common::rollout::Rollout> {
        self.state().rollouts.get(app).and_then(|r| r.rollout.clone())
    }

    /// The desired state of one app on one cluster.
    pub fn desired(&self, cluster: &str, app: &str) -> Option<crate::state::DesiredApp> {
        self.state().desired.get(cluster).and_then(|a| a.get(app)).cloned()
    }

    /// An operator's control of an app's rollout, recorded whether it applies or not. Returns what happened,
    /// or why it cannot (also when the store could not record it: then nothing changed).
    pub async fn control(&self, app: &str, action: &Control, who: &str) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Control { app: app.to_string(), action: action.clone(), who: who.to_string(), reply };
        self.commands.send(cmd).await.map_err(|_| "the hub is shutting down".to_string())?;
        let result = rx.await.map_err(|_| "the hub is shutting down".to_string())?;
        let name: String = format!("{action:?}").chars().take_while(|c| c.is_alphanumeric()).collect();
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        let labels = vec![("action", name.to_lowercase()), ("result", outcome.to_string())];
        self.shared.metrics.controls.get_or_create(&labels).inc();
        info!(operator = %who, %app, ?action, result = ?result, "rollout control");
        result
    }

    /// The audit records, oldest first.
    pub fn audit(&self) -> Vec<crate::audit::AuditRecord> {
        self.shared
            .store
            .scan(crate::keys::Prefix::Audit.as_str())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice::<crate::audit::AuditRecord>(&v).ok())
            .map(crate::audit::AuditRecord::normalized)
            .collect()
    }

    /// Records `rec` (stamped with the time and this replica) in the store and ships it; returns once it is
    /// stored (or could not be: logged).
    pub async fn record(&self, mut rec: crate::audit::AuditRecord) {
        rec.at_unix_ms = (self.shared.clock)();
        rec.replica = self.shared.replica.clone();
        // A caller repeating a refused call (a loop with a revoked certificate) is recorded once per
        // REFUSAL_EVERY, so it cannot push the records that matter out of the kept 10,000.
        if !rec.allowed {
            let key = format!("{}\0{}\0{}\0{}\0{}", rec.who, rec.action, rec.app, rec.detail, rec.answer);
            let mut seen = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if seen.get(&key).is_some_and(|t| rec.at_unix_ms - t < REFUSAL_EVERY_MS) {
                self.shared.metrics.audit_refusals_coalesced.inc();
                return;
            }
            if seen.len() >= 4096 {
                seen.retain(|_, t| rec.at_unix_ms - *t < REFUSAL_EVERY_MS);
                if seen.len() >= 4096 {
                    seen.clear();
                }
            }
            seen.insert(key, rec.at_unix_ms);
        }
        let (reply, rx) = oneshot::channel();
        if self.commands.send(Command::Audit(rec, reply)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// A bootstrap token for `cluster` (`<id>.<secret>`, shown once) and when it expires; recorded.
    pub async fn create_join_token(
        &self,
        cluster: &str,
        ttl_s: u32,
        uses: u32,
        who: &str,
    ) -> Result<(String, crate::join::JoinToken), String> {
        let now = (self.shared.clock)();
        let (id, secret, token) = crate::join::new_token(cluster, ttl_s, uses, who, now);
        let rec = crate::audit::AuditRecord {
            at_unix_ms: now,
            who: who.to_string(),
            action: "create-join-token".into(),
            detail: format!(
                "cluster {cluster}, token {id}, {} uses until {}",
                token.uses_left,
                crate::report::clock(token.expires_ms)
            ),
            allowed: true,
            answer: "created".into(),
            replica: self.shared.replica.clone(),
            ..Default::default()
        };
        let (reply, rx) = oneshot::channel();
        let cmd = Command::CreateToken { id: id.clone(), token: token.clone(), rec, reply };
        self.commands.send(cmd).await.map_err(|_| "the hub is shutting down".to_string())?;
        rx.await.map_err(|_| "the hub is shutting down".to_string())??;
        Ok((format!("{id}.{secret}"), token))
    }

    /// A join of `cluster` with token `id`.`secret`: allowed (one use spent) or why not; recorded either way.
    pub async fn join(&self, id: &str, secret: &str, cluster: &str) -> Result<(), String> {
        let rec = crate::audit::AuditRecord {
            at_unix_ms: (self.shared.clock)(),
            who: format!("cluster {cluster}"),
            action: "join".into(),
            detail: format!("token {id}"),
            allowed: true,
            answer: "certificate issued".into(),
            replica: self.shared.replica.clone(),
            ..Default::default()
        };
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Join { id: id.into(), secret: secret.into(), cluster: cluster.into(), rec, reply };
        self.commands.send(cmd).await.map_err(|_| "the hub is shutting down".to_string())?;
        rx.await.map_err(|_| "the hub is shutting down".to_string())?.map(|_| ())
    }

    /// Marks a cluster's agent connected or not without a session (tests drive rollouts this way).
    pub fn set_connected(&self, cluster: &str, connected: bool) {
        self.shared.sessions.set_present(cluster, connected);
    }

    /// Queues what an agent said; written at the next flush.
    pub async fn observe(&self, cluster: &str, obs: Observed) {
        let _ = self.observations.send((cluster.to_string(), obs)).await;
    }

    /// Records an agent's status report and writes it now (tests).
    pub async fn record_report(&self, cluster: &str, report: &pb::StatusReport) {
        self.observe(
            cluster,
            Observed {
                apps: report.apps.clone(),
                api: report.api.clone(),
                seen_ms: (self.shared.clock)(),
                ..Default::default()
            },
        )
        .await;
        self.flush().await;
    }

    /// Writes the queued observations now.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// One planner step for every active rollout, now.
    pub async fn drive_rollouts(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Tick(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) fn observer(&self) -> mpsc::Sender<(String, Observed)> {
        self.observations.clone()
    }

    async fn source_failed(&self, msg: String) {
        self.shared.metrics.git_fetches.get_or_create(&crate::metrics::label("result", "failed")).inc();
        warn!(error = %msg, "following the fleet repository failed; serving the last good state");
        let _ = self.commands.send(Command::SourceFailed(msg)).await;
    }

    /// Fetches once and, on a new commit, renders it and advances every cluster's desired state.
    pub async fn sync_once(&self) {
        let fetch_started = std::time::SystemTime::now();
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
            Ok(Ok(Err(msg))) => return self.source_failed(msg).await,
            Ok(Err(e)) => return self.source_failed(format!("the fetch task failed: {e}")).await,
            Err(_) => {
                return self
                    .source_failed(format!(
                        "fetching {} took longer than {} s; retrying at the next poll",
                        self.follower.url(),
                        FETCH_LIMIT.as_secs()
                    ))
                    .await
            }
        };
        let m = &self.shared.metrics;
        self.shared.followed_once.store(true, std::sync::atomic::Ordering::SeqCst);
        m.git_last_success.set(now_ms() as f64 / 1000.0);
        if snap.revision == self.state().revision {
            m.git_fetches.get_or_create(&crate::metrics::label("result", "current")).inc();
            let _ = self.commands.send(Command::SourceCurrent).await;
            return;
        }
        m.git_fetches.get_or_create(&crate::metrics::label("result", "new")).inc();
        let revision = snap.revision.clone();
        let commit = self.shared.traces.begin_commit(&revision, fetch_started);
        let (tools, cache) = (self.tools.clone(), self.cache.clone());
        let started = std::time::Instant::now();
        let (parse_span, render_span) = (
            tracing::info_span!(target: "flotilla::trace", "parse", flotilla.revision = %revision),
            tracing::info_span!(target: "flotilla::trace", "render", flotilla.revision = %revision),
        );
        if self.shared.traces.enabled() {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let _ = parse_span.set_parent(commit.clone());
            let _ = render_span.set_parent(commit.clone());
        }
        let rendered = tokio::task::spawn_blocking(move || {
            let fleet = parse_span.in_scope(|| parse(&snap.tree));
            drop(parse_span);
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            let rendered = render_span.in_scope(|| render_fleet(&fleet, &*tools, &mut cache));
            (fleet, rendered)
        })
        .instrument(tracing::info_span!("render", %revision))
        .await;
        let (fleet, rendered) = match rendered {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("rendering {revision} failed: {e}");
                if self.shared.traces.enabled() {
                    use opentelemetry::trace::TraceContextExt;
                    commit.span().set_status(opentelemetry::trace::Status::error(msg.clone()));
                    commit.span().end();
                }
                return self.source_failed(msg).await;
            }
        };
        let rendering = Rendering::new(rendered.stats, started.elapsed().as_millis() as u64);
        m.render_seconds.observe(started.elapsed().as_secs_f64());
        m.commit_renders.observe(rendering.renders as f64);
        m.renders.get_or_create(&crate::metrics::label("kind", "rendered")).inc_by(rendering.rendered);
        m.renders
            .get_or_create(&crate::metrics::label("kind", "reused"))
            .inc_by(rendering.renders.saturating_sub(rendering.rendered));
        for p in &fleet.problems() {
            warn!(%revision, problem = %p, "fleet repository problem");
        }
        let (clusters, apps) = (fleet.clusters.len(), fleet.apps.len());
        let synced = Synced { revision: revision.clone(), fleet: Arc::new(fleet), rendered, rendering };
        let (tx, rx) = oneshot::channel();
        let gate_started = std::time::SystemTime::now();
        if self.commands.send(Command::Synced(Box::new(synced), tx)).await.is_err() {
            return;
        }
        let answer = rx.await;
        if self.shared.traces.enabled() {
            use opentelemetry::trace::TraceContextExt;
            let attrs = vec![opentelemetry::KeyValue::new("flotilla.revision", revision.clone())];
            flotilla_common::telemetry::record("gate", &commit, gate_started, std::time::SystemTime::now(), attrs);
            if let Ok(Err(e)) = &answer {
                commit.span().set_status(opentelemetry::trace::Status::error(e.clone()));
            }
            commit.span().set_attribute(opentelemetry::KeyValue::new("flotilla.clusters", clusters as i64));
            commit.span().set_attribute(opentelemetry::KeyValue::new("flotilla.apps", apps as i64));
            commit.span().end();
        }
        let _in_trace = self.shared.traces.enabled().then(|| commit.clone().attach());
        match answer {
            Ok(Ok(_)) => info!(
                %revision, clusters, apps,
                cluster_apps = rendering.cluster_apps, renders = rendering.renders, rendered = rendering.rendered,
                tool_runs = rendering.tool_runs, bundles = rendering.bundles, millis = rendering.millis,
                "fleet advanced"
            ),
            Ok(Err(e)) => warn!(%revision, error = %e, "storing the new fleet state failed; keeping the previous one"),
            Err(_) => {}
        }
    }

    /// Follows the repository until shutdown: every `poll`, or at once on [`Hub::refresh`].
    pub async fn follow(self: Arc<Self>, poll: Duration) {
        let shutdown = self.shared.shutdown.clone();
        loop {
            // Only the leader follows Git; a standby waits until it leads.
            if self.shared.leading() {
                self.sync_once().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
                _ = self.refresh.notified() => {}
            }
        }
    }

    /// Fetches now (a standby asks the leader to).
    pub fn refresh(&self) {
        match self.shared.forward.clone().filter(|_| !self.shared.leading()) {
            // One request to the leader at a time: a burst of webhooks while one is on its way adds nothing.
            Some(f) if !self.forwarding.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                let forwarding = self.forwarding.clone();
                tokio::spawn(async move {
                    if let Err(e) = f.refresh("webhook").await {
                        warn!(error = %e.message(), "asking the leader to fetch failed");
                    }
                    forwarding.store(false, std::sync::atomic::Ordering::SeqCst);
                });
            }
            Some(_) => {}
            None => self.refresh.notify_one(),
        }
    }

    /// Keys another replica wrote (see [`Command::Followed`]).
    pub async fn followed(&self, changes: BTreeMap<String, Option<Vec<u8>>>) {
        let _ = self.commands.send(Command::Followed(changes)).await;
    }

    /// Everything other replicas wrote up to `revision` has been sent with [`Hub::followed`].
    pub async fn caught_up_to(&self, revision: u64) {
        let _ = self.commands.send(Command::Caught(revision)).await;
    }

    /// The whole state read again (a standby's watch fell behind compaction).
    pub async fn reloaded(&self, state: State) {
        let _ = self.commands.send(Command::Reloaded(Box::new(state))).await;
    }

    /// This replica stops acting and stands by (it lost its lease; its store writes no more than reports).
    pub async fn demote(&self) {
        // At once: the writer may be waiting on a commit that cannot succeed any more.
        self.shared.leading.store(false, std::sync::atomic::Ordering::SeqCst);
        let (reply, rx) = oneshot::channel();
        if self.commands.send(Command::Demote(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// This replica leads from now on (its store is fenced already): the writer reads the state again and
    /// acts; the Git follower starts with its next poll.
    pub async fn promote(&self, epoch: u64) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Promote(epoch, reply)).await.map_err(|_| "the hub is shutting down".to_string())?;
        rx.await.map_err(|_| "the hub is shutting down".to_string())??;
        self.refresh.notify_one();
        Ok(())
    }
}

/// What a standby's writer answers to what only the leader does.
pub const NOT_LEADING: &str = "this hub replica does not lead (another replica does; retry there)";

/// Time the hub was down does not count against running rollouts (a restart, or a new leader taking over).
async fn resume(shared: &Shared, state: &mut Arc<State>, opts: &Options) {
    let now = (opts.clock)();
    if state.rollouts_running() && state.clock_ms > 0 && now > state.clock_ms {
        let down = now - state.clock_ms;
        info!(down_s = down / 1000, "resuming rollouts; their timers move on by the time the hub was down");
        let t = state.resumed(down, now);
        if let Err(e) = commit(shared, state, t).await {
            warn!(error = %e, "recording the restart failed");
        }
    }
}

/// Keys another replica wrote, applied to this replica's state. The leader takes only reports (of clusters
/// whose session another replica holds); a standby takes everything but the reports of its own sessions —
/// those it holds newer, and writes again when another replica's older copy overwrote them.
async fn followed(shared: &Shared, state: &mut Arc<State>, mut changes: BTreeMap<String, Option<Vec<u8>>>) {
    let mut rewrite = BTreeSet::new();
    let reports = crate::keys::Prefix::Report;
    let leading = shared.leading();
    let local = shared.sessions.present();
    changes.retain(|k, v| {
        if !k.starts_with(reports.as_str()) {
            return !leading;
        }
        let c = reports.name(k);
        if !local.contains(c) {
            return true;
        }
        // The newer of the two wins (two replicas briefly holding one cluster's session never write in turns).
        let Some(mine) = state.reports.get(c) else { return true };
        let theirs: Option<crate::report::ClusterReport> = v.as_ref().and_then(|v| serde_json::from_slice(v).ok());
        match theirs {
            Some(t) if t.last_seen_unix_ms > mine.last_seen_unix_ms => true,
            Some(t) if t == **mine => false,
            _ => {
                rewrite.insert(c.to_string());
                false
            }
        }
    });
    if !rewrite.is_empty() {
        let t = state.rewritten(&rewrite);
        if let Err(e) = commit(shared, state, t).await {
            warn!(error = %e, "writing agents' reports again failed");
        }
    }
    if changes.is_empty() {
        return;
    }
    let (from, store) = (state.clone(), shared.store.clone());
    let applied = tokio::task::spawn_blocking(move || from.apply_changes(&changes, &*store)).await;
    match applied {
        Ok(Ok((next, woken))) => {
            *state = Arc::new(next);
            shared.snapshot.store(state.clone());
            for c in woken {
                shared.sessions.wake(&c);
            }
        }
        Ok(Err(e)) => warn!(error = %error_chain(&e), "applying what another replica wrote failed"),
        Err(e) => warn!(error = %e, "applying what another replica wrote failed"),
    }
}

/// Commits a transition's batch off the async workers; publishes the next state only when it is durable.
async fn commit(shared: &Shared, state: &mut Arc<State>, t: Transition) -> Result<String, String> {
    // Every change of state comes with its batch (memory equals the store): no batch, nothing to publish.
    if t.batch.0.is_empty() {
        return t.reply;
    }
    let store = shared.store.clone();
    let batch = t.batch;
    // Audit records go to the log pipeline once they are durable, whichever transition wrote them.
    let shipped: Vec<Vec<u8>> = match &shared.identities.sink {
        Some(_) => batch
            .0
            .iter()
            .filter_map(|op| match op {
                crate::store::Op::Put(k, v) if k.starts_with(crate::keys::Prefix::Audit.as_str()) => Some(v.clone()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let ops = batch.0.len();
    let bytes: usize =
        batch.0.iter().map(|op| if let crate::store::Op::Put(k, v) = op { k.len() + v.len() } else { 0 }).sum();
    let started = std::time::Instant::now();
    let committed = tokio::task::spawn_blocking(move || store.commit(batch))
        .await
        .map_err(|e| format!("the store commit did not finish: {e}"))
        .and_then(|r| r.map_err(|e| format!("storing the change failed, nothing changed: {}", error_chain(&e))));
    if let Err(e) = committed {
        shared.metrics.store_commit_failures.inc();
        return Err(e);
    }
    if let Some(sink) = &shared.identities.sink {
        shipped.iter().for_each(|json| sink.ship_json(json));
    }
    shared.metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
    shared.metrics.store_commit_bytes.observe(bytes as f64);
    tracing::debug!(ops, bytes, millis = started.elapsed().as_millis() as u64, "committed");
    let next = Arc::new(t.next);
    // Bundles nothing references any more leave the shared cache.
    if next.bundles != state.bundles {
        shared.bundles.lock().unwrap_or_else(|p| p.into_inner()).retain(|d, _| next.bundles.contains(d));
    }
    shared.snapshot.store(next.clone());
    shared.traces.rollouts_changed(state, &next);
    // Clusters that left the inventory or were disabled: their sessions look again (and end).
    if !Arc::ptr_eq(&state.clusters, &next.clusters) {
        for (c, _) in state.clusters.iter().filter(|(c, _)| next.clusters.get(*c).is_none_or(|n| n.disabled)) {
            shared.sessions.wake(c);
        }
    }
    // The leader writes every desired state: its state is as new as its last write. (A standby's own writes
    // are reports; how new its state is, its watch says.)
    if shared.leading() {
        shared.revision.fetch_max(shared.store.revision(), std::sync::atomic::Ordering::SeqCst);
    }
    *state = next;
    for c in &t.woken {
        shared.sessions.wake(c);
    }
    t.reply
}

async fn writer(
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<Command>,
    mut observations: mpsc::Receiver<(String, Observed)>,
    opts: Options,
) {
    let mut state = shared.state();
    if shared.leading() {
        resume(&shared, &mut state, &opts).await;
    }
    let mut pending: BTreeMap<String, Observed> = BTreeMap::new();
    let mut flush = tokio::time::interval(opts.flush);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Soft state the store holds back is written within its time even when nothing else commits.
    let mut soft = tokio::time::interval(Duration::from_secs(5));
    soft.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(opts.tick.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_clock = 0i64;
    // Orders audit records of one millisecond; random at start so records of two runs never share a key.
    let mut audit_seq = fastrand::u64(..1 << 32) << 20;
    let shutdown = shared.shutdown.clone();
    let step = |state: &State| {
        let now = (shared.clock)();
        let grace = shared.in_grace(now);
        let online = shared.sessions.online();
        state.tick(now, &|c: &str| grace || online.contains(c))
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                let standby = !shared.leading();
                match cmd {
                    Command::Synced(_, reply) if standby => {
                        let _ = reply.send(Err(NOT_LEADING.to_string()));
                    }
                    Command::Control { reply, .. } if standby => {
                        let _ = reply.send(Err(NOT_LEADING.to_string()));
                    }
                    Command::SourceFailed(_) | Command::SourceCurrent if standby => {}
                    Command::Tick(reply) if standby => {
                        let _ = reply.send(());
                    }
                    Command::Followed(changes) => followed(&shared, &mut state, changes).await,
                    // After the changes sent before it: the state is now at least this new.
                    Command::Caught(revision) => {
                        shared.revision.fetch_max(revision, std::sync::atomic::Ordering::SeqCst);
                    }
                    Command::Reloaded(next) if standby => {
                        let woken: BTreeSet<String> = state.clusters.keys().chain(next.clusters.keys()).cloned().collect();
                        state = Arc::new(*next);
                        shared.snapshot.store(state.clone());
                        woken.iter().for_each(|c| shared.sessions.wake(c));
                    }
                    Command::Reloaded(next) => {
                        // The leader takes only the reports (as it does from the watch), for every cluster.
                        let reports = crate::keys::Prefix::Report;
                        let mut changes: BTreeMap<String, Option<Vec<u8>>> = state
                            .reports
                            .keys()
                            .map(|c| (format!("{}{c}", reports.as_str()), None))
                            .collect();
                        for (c, r) in &next.reports {
                            changes.insert(format!("{}{c}", reports.as_str()), serde_json::to_vec(&**r).ok());
                        }
                        followed(&shared, &mut state, changes).await;
                    }
                    Command::Promote(epoch, reply) => {
                        match shared.load_again().await {
                            Ok(loaded) => {
                                state = Arc::new(loaded);
                                shared.snapshot.store(state.clone());
                                shared.epoch.store(epoch, std::sync::atomic::Ordering::SeqCst);
                                shared.leading.store(true, std::sync::atomic::Ordering::SeqCst);
                                info!(epoch, "this replica leads: it follows Git, steps rollouts and executes controls");
                                resume(&shared, &mut state, &opts).await;
                                shared.sessions.wake_all();
                                let _ = reply.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Command::Demote(reply) => {
                        shared.leading.store(false, std::sync::atomic::Ordering::SeqCst);
                        // The reports of its own sessions, some only in memory (soft state): written as a standby
                        // writes them, so neither its own reload nor the next leader loses them (the agents stay
                        // connected and say nothing again until something changes).
                        let local: BTreeSet<String> = shared.sessions.present().into_iter().collect();
                        let t = state.rewritten(&local);
                        if let Err(e) = commit(&shared, &mut state, t).await {
                            warn!(error = %e, "writing the reports of this replica's sessions failed");
                        }
                        // What else it holds may be ahead of etcd (writes refused): read again, as a standby.
                        match shared.load_again().await {
                            Ok(mut loaded) => {
                                for c in &local {
                                    if let Some(r) = state.reports.get(c) {
                                        loaded.reports.insert(c.clone(), r.clone());
                                    }
                                }
                                state = Arc::new(loaded);
                                shared.snapshot.store(state.clone());
                            }
                            Err(e) => warn!(error = %e, "standing by on the state in memory"),
                        }
                        let _ = reply.send(());
                    }
                    Command::Synced(s, reply) => {
                        let t = state.synced(&s, (shared.clock)());
                        let _ = reply.send(commit(&shared, &mut state, t).await);
                    }
                    Command::SourceFailed(msg) => {
                        let t = state.source_failed(&msg);
                        let _ = commit(&shared, &mut state, t).await;
                    }
                    Command::SourceCurrent => {
                        let t = state.source_current();
                        let _ = commit(&shared, &mut state, t).await;
                    }
                    Command::Control { app, action, who, reply } => {
                        audit_seq += 1;
                        let t = state.control(&app, &action, &who, (shared.clock)(), audit_seq);
                        let controlled = t.reply.is_ok();
                        let r = commit(&shared, &mut state, t).await;
                        // What the control lets happen happens before the operator gets the answer.
                        if controlled && r.is_ok() {
                            let t = step(&state);
                            let _ = commit(&shared, &mut state, t).await;
                        }
                        let _ = reply.send(r);
                    }
                    Command::CreateToken { reply, .. } | Command::Join { reply, .. } if standby => {
                        let _ = reply.send(Err(NOT_LEADING.to_string()));
                    }
                    Command::CreateToken { id, token, rec, reply } => {
                        audit_seq += 1;
                        let t = state.token_created(&id, &token, &rec, audit_seq);
                        let _ = reply.send(commit(&shared, &mut state, t).await);
                    }
                    Command::Join { id, secret, cluster, rec, reply } => {
                        audit_seq += 1;
                        let t = state.joined(&id, &secret, &cluster, &rec, audit_seq);
                        let _ = reply.send(commit(&shared, &mut state, t).await);
                    }
                    Command::Audit(rec, reply) => {
                        audit_seq += 1;
                        // A standby adds its record; the leader also removes the oldest past the bounds.
                        let t = state.audited(&rec, audit_seq, !standby);
                        if let Err(e) = commit(&shared, &mut state, t).await {
                            warn!(error = %e, who = %rec.who, action = %rec.action, "storing an audit record failed");
                        }
                        let _ = reply.send(());
                    }
                    Command::Tick(reply) => {
                        let t = step(&state);
                        if let Err(e) = commit(&shared, &mut state, t).await {
                            warn!(error = %e, "storing a rollout step failed");
                        }
                        let _ = reply.send(());
                    }
                    Command::Flush(reply) => {
                        while let Ok((c, o)) = observations.try_recv() {
                            pending.entry(c).or_default().merge(o);
                        }
                        let t = state.observed(std::mem::take(&mut pending));
                        if let Err(e) = commit(&shared, &mut state, t).await {
                            warn!(error = %e, "storing agents' reports failed");
                        }
                        let _ = reply.send(());
                    }
                }
            }
            _ = flush.tick(), if !pending.is_empty() => {
                let t = state.observed(std::mem::take(&mut pending));
                if let Err(e) = commit(&shared, &mut state, t).await {
                    warn!(error = %e, "storing agents' reports failed");
                }
            }
            _ = soft.tick() => {
                let store = shared.store.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.flush_soft()).await {
                    warn!(error = %error_chain(&e), "writing agents' reports held back failed");
                }
            }
            _ = tick.tick(), if opts.tick.is_some() && shared.leading() => {
                let t = step(&state);
                if let Err(e) = commit(&shared, &mut state, t).await {
                    warn!(error = %e, "storing a rollout step failed");
                }
                let now = (shared.clock)();
                if state.rollouts_running() && now - last_clock >= 5_000 {
                    last_clock = now;
                    let t = state.clock(now);
                    let _ = commit(&shared, &mut state, t).await;
                }
            }
            // Last: a flood of reports never starves the flush and the rollout tick.
            o = observations.recv() => {
                if let Some((c, o)) = o {
                    pending.entry(c).or_default().merge(o);
                    for _ in 0..4096 {
                        let Ok((c, o)) = observations.try_recv() else { break };
                        pending.entry(c).or_default().merge(o);
                    }
                }
            }
        }
    }
    // Shutdown: what agents said is written, and the time, so a restart knows how long it was down.
    while let Ok((c, o)) = observations.try_recv() {
        pending.entry(c).or_default().merge(o);
    }
    let mut t = state.observed(pending);
    // Reports are written soft while running; the last ones, and every soft write before them, reach the disk.
    t.batch.1 = crate::store::Durability::Immediate;
    if !shared.leading() {
        let _ = commit(&shared, &mut state, t).await;
        return;
    }
    if t.batch.0.is_empty() {
        t.batch = t.batch.put(crate::keys::Key::Clock.path(), (shared.clock)().to_string());
        t.next.clock_ms = (shared.clock)();
    }
    let _ = commit(&shared, &mut state, t).await;
    if state.rollouts_running() {
        let t = state.clock((shared.clock)());
        let _ = commit(&shared, &mut state, t).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Batch, MemStore, StoreError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store that counts reads.
    #[derive(Default)]
    struct Counting {
        inner: MemStore,
        gets: AtomicUsize,
    }

    impl Store for Counting {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            self.inner.get(key)
        }
        fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.scan(prefix)
        }
        fn commit(&self, batch: Batch) -> Result<(), StoreError> {
            self.inner.commit(batch)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_sessions_wanting_one_new_bundle_read_it_from_the_store_once() {
        let store = Arc::new(Counting::default());
        let key = crate::keys::Key::Bundle("sha256:b").path();
        store.commit(Batch::default().put(key, vec![7u8; 1 << 20])).unwrap();
        let follower = Follower::new("file:///nonexistent", "main", std::env::temp_dir().join("flotilla-unused-b"));
        let shutdown = CancellationToken::new();
        let hub =
            Hub::with_options(store.clone(), follower, shutdown.clone(), Options { tick: None, ..Options::default() })
                .unwrap();
        let reads_before = store.gets.load(Ordering::SeqCst);
        let all: Vec<_> = (0..200)
            .map(|_| {
                let shared = hub.shared.clone();
                tokio::spawn(async move { shared.bundle("sha256:b").await.map(|b| b.len()) })
            })
            .collect();
        for t in all {
            assert_eq!(t.await.unwrap(), Ok(1 << 20));
        }
        assert_eq!(store.gets.load(Ordering::SeqCst) - reads_before, 1, "one read for 200 sessions");
        shutdown.cancel();
    }
}
