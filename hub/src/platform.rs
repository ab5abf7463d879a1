//! The platform API: operators' views of the fleet, read from the hub's current snapshot without locks, and
//! their controls, sent to the hub's writer.

use crate::access::{Action, Target};
use crate::audit::AuditRecord;
use crate::hub::{now_ms, Hub};
use crate::machine::State;
use crate::rollouts::Control;
use crate::sessions::Sessions;
use flotilla_common::identity::{identity_of, Identity};
use flotilla_common::rollout::RolloutPhase;
use flotilla_common::selector::LabelSelector;
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::platform::v1 as api;
use flotilla_proto::platform::v1::platform_service_server::PlatformService;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::info;

/// Clusters per page of `ListClusters`: the default and the most.
pub const PAGE_SIZE: usize = 500;
pub const MAX_PAGE_SIZE: usize = 2000;

/// The identity in the caller's client certificate.
pub fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let first = certs.first().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    identity_of(first).map_err(|e| Status::unauthenticated(e.to_string()))
}

/// The serial number of the caller's client certificate.
pub fn caller_serial<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    flotilla_common::identity::serial_of(certs.first()?)
}

/// Why the caller is refused, as the audit names it: the operator's name, or the identity.
struct Refused {
    who: String,
    status: Status,
}

fn operator<T>(req: &Request<T>, hub: &Hub) -> Result<String, Refused> {
    let id = caller(req).map_err(|status| Refused { who: "unknown".into(), status })?;
    if let Some(serial) = caller_serial(req).filter(|s| hub.shared.identities.is_revoked(s)) {
        let who = match &id {
            Identity::Operator(o) => o.clone(),
            other => other.to_string(),
        };
        return Err(Refused {
            who,
            status: Status::unauthenticated(format!("the certificate of {id} (serial {serial}) is revoked")),
        });
    }
    match id {
        Identity::Operator(o) => Ok(o),
        // A standby hub replica forwarding an operator's control: it checked the operator's certificate.
        Identity::Hub => match req.metadata().get(crate::forward::ON_BEHALF_OF).and_then(|v| v.to_str().ok()) {
            Some(o) if flotilla_common::identity::valid_name(o) => Ok(o.to_string()),
            _ => Err(Refused {
                who: "hub".into(),
                status: Status::permission_denied(
                    "a hub replica may only forward an operator's call, naming the operator",
                ),
            }),
        },
        other => Err(Refused {
            who: other.to_string(),
            status: Status::permission_denied(format!(
                "{other} may not use the platform API; an operator certificate is required"
            )),
        }),
    }
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

/// One cluster as operators see it: every app targeted at it (applied, applying, held back by a rollout,
/// broken at the current commit), its problems, and its session.
/// How one app stands on one cluster (what `flotilla clusters` and the metrics count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppState {
    /// The current commit cannot be used for it (the cluster keeps the last good bundle).
    Broken,
    Failed,
    /// A rollout holds it back.
    HeldBack,
    Adopted,
    InSync,
    NotReported,
    Applying,
}

impl AppState {
    /// As operators read it ("held back").
    pub fn words(self) -> &'static str {
        match self {
            AppState::Broken => "broken",
            AppState::Failed => "failed",
            AppState::HeldBack => "held back",
            AppState::Adopted => "adopted",
            AppState::InSync => "in sync",
            AppState::NotReported => "not reported",
            AppState::Applying => "applying",
        }
    }

    /// As a metric label ("held_back").
    pub fn label(self) -> &'static str {
        match self {
            AppState::HeldBack => "held_back",
            AppState::InSync => "in_sync",
            AppState::NotReported => "not_reported",
            other => other.words(),
        }
    }
}

/// One app targeted at a cluster, with what decides its state.
pub struct AppOnCluster<'a> {
    pub app: &'a str,
    pub desired: Option<&'a crate::state::DesiredApp>,
    pub applied: Option<&'a pb::AppStatus>,
    /// The rollout holding it back, when one does.
    pub waiting: Option<&'a flotilla_common::rollout::Rollout>,
    pub state: AppState,
}

/// Every app targeted at `name` (desired there, or in a rollout that targets it), and how it stands.
pub fn apps_on<'a>(st: &'a State, name: &str) -> Vec<AppOnCluster<'a>> {
    let desired = st.desired.get(name);
    let report = st.reports.get(name);
    let targeted = crate::rollouts::targeted(desired.map(|d| &**d), st.rollouts.iter().map(|(a, r)| (a, &**r)), name);
    targeted
        .into_iter()
        .map(|app| {
            let d = desired.and_then(|d| d.get(app));
            let applied = report.and_then(|r| r.apps.get(app)).map(|a| &a.0);
            let waiting = st
                .rollouts
                .get(app)
                .and_then(|r| r.rollout.as_ref().map(|ro| (ro, r)))
                .filter(|(ro, _)| !matches!(ro.phase, RolloutPhase::Complete | RolloutPhase::Superseded(_)))
                .and_then(|(ro, r)| r.data.candidates.get(name).map(|c| (ro, c)))
                .filter(|(_, c)| d.is_none_or(|d| d.digest != c.digest))
                .map(|(ro, _)| ro);
            let state = if d.is_some_and(|d| d.error.is_some()) {
                AppState::Broken
            } else if applied.is_some_and(|a| a.phase == pb::Phase::Failed as i32) {
                AppState::Failed
            } else if waiting.is_some() {
                AppState::HeldBack
            } else if d.is_some_and(|d| d.adopt) {
                AppState::Adopted
            } else {
                match (d, applied) {
                    (Some(d), Some(a)) if a.digest == d.digest && a.phase == pb::Phase::Applied as i32 => {
                        AppState::InSync
                    }
                    (_, None) => AppState::NotReported,
                    _ => AppState::Applying,
                }
            };
            AppOnCluster { app, desired: d, applied, waiting, state }
        })
        .collect()
}

pub fn cluster_view(st: &State, sessions: &Sessions, name: &str) -> Option<api::Cluster> {
    let spec = st.clusters.get(name)?;
    let report = st.reports.get(name);
    let presence = sessions.get(name);
    let (mut in_sync, mut held_back, mut broken) = (0u32, 0u32, 0u32);
    let mut problems = Vec::new();
    let elsewhere = if presence.is_none() { sessions.remote(name) } else { None };
    if presence.is_none() && elsewhere.is_none() {
        problems.push("its agent is not connected".to_string());
    }
    problems.extend(report.map(|r| r.problems()).unwrap_or_default());
    let mut apps = Vec::new();
    for a in apps_on(st, name) {
        let (app, d, applied) = (a.app, a.desired, a.applied);
        match a.state {
            AppState::Broken => {
                broken += 1;
                let e = d.and_then(|d| d.error.as_deref()).unwrap_or_default();
                problems.push(format!("{app}: the current commit cannot be used: {e}"));
            }
            AppState::Failed => {
                problems.push(format!("{app}: {}", applied.map(|a| a.message.as_str()).unwrap_or_default()));
            }
            AppState::HeldBack => {
                held_back += 1;
                if let Some(ro) = a.waiting.filter(|ro| !ro.active() && ro.phase != RolloutPhase::Paused) {
                    problems.push(format!("{app}: held back: the rollout of {} is {}", short(&ro.revision), ro.phase));
                }
            }
            AppState::InSync => in_sync += 1,
            AppState::Adopted | AppState::NotReported | AppState::Applying => {}
        }
        apps.push(api::ClusterApp {
            app: app.to_string(),
            desired_digest: d.map(|d| d.digest.clone()).unwrap_or_default(),
            desired_revision: d.map(|d| d.revision.clone()).unwrap_or_default(),
            applied: applied.map(|a| pb::AppStatus { app: app.to_string(), ..a.clone() }),
            error: d.and_then(|d| d.error.clone()).unwrap_or_default(),
            state: a.state.words().to_string(),
            held_back_revision: a.waiting.map(|ro| ro.revision.clone()).unwrap_or_default(),
        });
    }
    let total = apps.len() as u32;
    // Every app the cluster is meant to run is in sync: it runs the current commit (an app the commit did not
    // change keeps the bundle, and the revision, it was rendered from earlier).
    let revision = if in_sync == total && total > 0 { st.revision.clone() } else { String::new() };
    let last_seen = presence
        .as_ref()
        .map(|p| p.last_seen_ms.load(Ordering::Relaxed))
        .or_else(|| report.map(|r| r.last_seen_unix_ms))
        .unwrap_or_default();
    Some(api::Cluster {
        name: name.to_string(),
        labels: spec.labels.clone().into_iter().collect(),
        connected: presence.is_some() || elsewhere.is_some(),
        revision,
        apps_in_sync: in_sync,
        apps_total: total,
        last_seen_unix_ms: last_seen,
        apps,
        apps_held_back: held_back,
        apps_broken: broken,
        desired_seq: presence.as_ref().map_or(0, |p| p.sent_seq.load(Ordering::Relaxed)),
        acked_seq: presence.as_ref().map_or(0, |p| p.acked_seq.load(Ordering::Relaxed)),
        problems,
    })
}

/// Whether a cluster needs someone's attention.
fn has_problem(c: &api::Cluster) -> bool {
    !c.connected || !c.problems.is_empty() || c.apps_in_sync + c.apps_held_back < c.apps_total
}

/// A page of clusters, filtered by labels and by problems, in name order.
pub fn list_clusters(
    st: &State,
    sessions: &Sessions,
    r: &api::ListClustersRequest,
) -> Result<api::ListClustersResponse, Status> {
    list_clusters_visible(st, sessions, r, &|_| true)
}

/// [`list_clusters`] of the clusters `visible` lets the caller see.
pub fn list_clusters_visible(
    st: &State,
    sessions: &Sessions,
    r: &api::ListClustersRequest,
    visible: &dyn Fn(&flotilla_common::fleet::ClusterSpec) -> bool,
) -> Result<api::ListClustersResponse, Status> {
    let selector: LabelSelector = r.selector.parse().map_err(Status::invalid_argument)?;
    let size = match r.page_size as usize {
        0 => PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let mut clusters = Vec::new();
    let mut total = 0u32;
    let mut next_page_token = String::new();
    for (name, spec) in st.clusters.iter() {
        if !selector.matches(&spec.labels) || !visible(spec) {
            continue;
        }
        let view = if r.problems_only {
            match cluster_view(st, sessions, name) {
                Some(v) if has_problem(&v) => Some(v),
                _ => continue,
            }
        } else {
            None
        };
        total += 1;
        if !r.page_token.is_empty() && name.as_str() <= r.page_token.as_str() {
            continue;
        }
        if clusters.len() == size {
            if next_page_token.is_empty() {
                next_page_token = clusters.last().map(|c: &api::Cluster| c.name.clone()).unwrap_or_default();
            }
            continue;
        }
        if let Some(v) = view.or_else(|| cluster_view(st, sessions, name)) {
            clusters.push(v);
        }
    }
    let rs = st.rendering;
    Ok(api::ListClustersResponse {
        clusters,
        revision: st.revision.clone(),
        source_error: st.source_error.clone().unwrap_or_default(),
        problems: (*st.problems).clone(),
        render_stats: Some(api::RenderStats {
            cluster_apps: rs.cluster_apps,
            renders: rs.renders,
            rendered: rs.rendered,
            tool_runs: rs.tool_runs,
            bundles: rs.bundles,
            render_millis: rs.millis,
        }),
        next_page_token,
        total,
    })
}

pub struct PlatformApi(pub Arc<Hub>);

impl PlatformApi {
    /// The calling operator, if it may do `action` on `target`; every refusal is audited (and a mutating call
    /// that is allowed is audited where it takes effect).
    async fn authorize<T>(
        &self,
        req: &Request<T>,
        action: Action,
        target: Target<'_>,
        app: &str,
        detail: &str,
    ) -> Result<String, Status> {
        let who = match operator(req, &self.0) {
            Ok(w) => w,
            Err(r) => return Err(self.refused(r.who, action, app, detail, r.status).await),
        };
        match self.0.shared.identities.roles().check(&who, action, &target) {
            Ok(_) => Ok(who),
            Err(denied) => {
                let status = Status::permission_denied(denied.to_string());
                Err(self.refused(who, action, app, detail, status).await)
            }
        }
    }

    /// Records a refusal and returns its status.
    async fn refused(&self, who: String, action: Action, app: &str, detail: &str, status: Status) -> Status {
        info!(%who, action = action.name(), %app, reason = %status.message(), "platform call refused");
        let rec = AuditRecord {
            who,
            action: action.name().to_string(),
            app: app.to_string(),
            detail: detail.to_string(),
            allowed: false,
            answer: format!("refused: {}", status.message()),
            ..Default::default()
        };
        self.0.record(rec).await;
        status
    }

    /// Whether `who` may see cluster `name` (its labels in the inventory); a refusal is audited.
    async fn may_see_cluster(&self, st: &State, who: String, name: &str, app: &str) -> Result<(), Status> {
        let roles = self.0.shared.identities.roles();
        if st.clusters.get(name).is_some_and(|c| roles.allows(&who, Action::View, &Target::cluster(&c.labels))) {
            return Ok(());
        }
        let status = Status::permission_denied(format!(
            "operator {who} may not view cluster {name}: no binding of its roles covers the cluster's labels"
        ));
        Err(self.refused(who, Action::View, app, &format!("cluster {name}"), status).await)
    }
}

#[tonic::async_trait]
impl PlatformService for PlatformApi {
    async fn list_clusters(
        &self,
        req: Request<api::ListClustersRequest>,
    ) -> Result<Response<api::ListClustersResponse>, Status> {
        let who = self.authorize(&req, Action::View, Target::fleet(), "", "").await?;
        let st = self.0.state();
        let roles = self.0.shared.identities.roles();
        let sees = |spec: &flotilla_common::fleet::ClusterSpec| {
            roles.allows(&who, Action::View, &Target::cluster(&spec.labels))
        };
        let mut view = list_clusters_visible(&st, &self.0.shared.sessions, req.get_ref(), &sees)?;
        // A roles or revoked file that cannot be used is the fleet's problem too.
        view.problems.extend(self.0.shared.identities.problems());
        Ok(Response::new(view))
    }

    async fn get_cluster(&self, req: Request<api::GetClusterRequest>) -> Result<Response<api::Cluster>, Status> {
        let who = self.authorize(&req, Action::View, Target::fleet(), "", "").await?;
        let name = req.into_inner().name;
        let st = self.0.state();
        if st.clusters.contains_key(&name) {
            self.may_see_cluster(&st, who, &name, "").await?;
        }
        cluster_view(&st, &self.0.shared.sessions, &name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("cluster {name:?} is not in the fleet inventory")))
    }

    async fn refresh(&self, req: Request<api::RefreshRequest>) -> Result<Response<api::RefreshResponse>, Status> {
        let forwarded = req.metadata().contains_key(crate::forward::ON_BEHALF_OF);
        if let Some(f) = self.0.shared.forward.as_ref().filter(|_| !self.0.shared.leading() && !forwarded) {
            // The leader decides and records; this replica only checks the certificate.
            let who = operator(&req, &self.0).map_err(|r| r.status)?;
            info!(operator = %who, "refresh requested: forwarded to the leader");
            return f.refresh(&who).await.map(Response::new);
        }
        let who = self.authorize(&req, Action::Refresh, Target::fleet(), "", "").await?;
        info!(operator = %who, "refresh requested");
        if !self.0.shared.leading() {
            return Err(Status::unavailable(crate::hub::NOT_LEADING));
        }
        self.0.refresh();
        let revision = self.0.state().revision.clone();
        let rec = AuditRecord {
            who,
            action: Action::Refresh.name().into(),
            allowed: true,
            answer: format!("fetching now (serving {})", short(&revision)),
            ..Default::default()
        };
        self.0.record(rec).await;
        Ok(Response::new(api::RefreshResponse { revision }))
    }

    async fn list_rollouts(
        &self,
        req: Request<api::ListRolloutsRequest>,
    ) -> Result<Response<api::ListRolloutsResponse>, Status> {
        let app = req.get_ref().app.clone();
        let target = if app.is_empty() { Target::fleet() } else { Target::app(&app) };
        let who = self.authorize(&req, Action::View, target, &app, "").await?;
        let st = self.0.state();
        if !app.is_empty() && !st.rollouts.contains_key(&app) {
            return Err(Status::not_found(format!(
                "app {app:?} has no rollout (no waves, or no change since they were set)"
            )));
        }
        let roles = self.0.shared.identities.roles();
        let now = now_ms();
        let rollouts = st
            .rollouts
            .iter()
            .filter(|(a, _)| app.is_empty() || **a == app)
            .filter(|(a, _)| roles.allows(&who, Action::View, &Target::app(a)))
            .map(|(a, rec)| rollout_view(a, rec, now, &st.reports))
            .collect();
        Ok(Response::new(api::ListRolloutsResponse { rollouts }))
    }

    async fn control_rollout(
        &self,
        req: Request<api::ControlRolloutRequest>,
    ) -> Result<Response<api::ControlRolloutResponse>, Status> {
        use api::control_rollout_request::Action as A;
        // A forwarded call is never forwarded again (two standbys with an old view would pass it around).
        let forwarded = req.metadata().contains_key(crate::forward::ON_BEHALF_OF);
        if let Some(f) = self.0.shared.forward.as_ref().filter(|_| !self.0.shared.leading() && !forwarded) {
            // The leader decides and records; this replica only checks the certificate.
            let who = operator(&req, &self.0).map_err(|r| r.status)?;
            let r = req.into_inner();
            info!(operator = %who, app = %r.app, "rollout control: forwarded to the leader");
            return f.control(&who, r).await.map(Response::new);
        }
        let r = req.get_ref().clone();
        let (action, needs) = match A::try_from(r.action).unwrap_or(A::Unspecified) {
            A::Pause => (Control::Pause, Action::Pause),
            A::Resume => (Control::Resume, Action::Resume),
            A::Approve if !r.wave.is_empty() => (Control::Approve(r.wave.clone()), Action::Approve),
            A::Approve => return Err(Status::invalid_argument("approve needs the wave")),
            A::Abort => (Control::Abort, Action::Abort),
            A::Retry => (Control::Retry, Action::Retry),
            A::Rollback if !r.revision.is_empty() => {
                (Control::Rollback { revision: r.revision.clone(), immediate: r.immediate }, Action::Rollback)
            }
            A::Rollback => return Err(Status::invalid_argument("rollback needs the revision to go back to")),
            A::Unspecified => return Err(Status::invalid_argument("no action")),
        };
        let detail = match &action {
            Control::Approve(w) => format!("wave {w}"),
            Control::Rollback { revision, .. } => format!("to {revision}"),
            _ => String::new(),
        };
        let who = self.authorize(&req, needs, Target::app(&r.app), &r.app, &detail).await?;
        match self.0.control(&r.app, &action, &who).await {
            Ok(message) => Ok(Response::new(api::ControlRolloutResponse { message })),
            Err(e) => Err(Status::failed_precondition(e)),
        }
    }

    async fn list_hubs(&self, req: Request<api::ListHubsRequest>) -> Result<Response<api::ListHubsResponse>, Status> {
        self.authorize(&req, Action::View, Target::fleet(), "", "").await?;
        let (store, hubs) = self.0.shared.replicas.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Response::new(api::ListHubsResponse { hubs, store }))
    }

    async fn list_audit(
        &self,
        req: Request<api::ListAuditRequest>,
    ) -> Result<Response<api::ListAuditResponse>, Status> {
        self.authorize(&req, Action::ReadAudit, Target::fleet(), "", "").await?;
        let r = req.into_inner();
        let q = crate::audit::Query { since_unix_ms: r.since_unix_ms, who: r.who, limit: r.limit as usize };
        let hub = self.0.clone();
        let all = tokio::task::spawn_blocking(move || hub.audit())
            .await
            .map_err(|e| Status::internal(format!("reading the audit trail: {e}")))?;
        let records = crate::audit::select(all, &q)
            .into_iter()
            .map(|a| api::AuditRecord {
                at_unix_ms: a.at_unix_ms,
                who: a.who,
                action: a.action,
                app: a.app,
                detail: a.detail,
                allowed: a.allowed,
                answer: a.answer,
                replica: a.replica,
            })
            .collect();
        Ok(Response::new(api::ListAuditResponse { records }))
    }

    async fn create_join_token(
        &self,
        req: Request<api::CreateJoinTokenRequest>,
    ) -> Result<Response<api::CreateJoinTokenResponse>, Status> {
        let cluster = req.get_ref().cluster.clone();
        if !flotilla_common::identity::valid_name(&cluster) {
            return Err(Status::invalid_argument(format!("{cluster:?} is not a cluster name")));
        }
        let st = self.0.state();
        // A cluster-scoped admin may make tokens for its clusters; one not in the inventory yet needs an admin of
        // the whole fleet (it joins only once it is added: double opt-in).
        let target = st.clusters.get(&cluster).map_or(Target::fleet(), |c| Target::cluster(&c.labels));
        let detail = format!("cluster {cluster}");
        let who = self.authorize(&req, Action::CreateJoinToken, target, "", &detail).await?;
        drop(st);
        let r = req.into_inner();
        let ttl = if r.ttl_seconds == 0 { 3600 } else { r.ttl_seconds.min(crate::join::MAX_TTL_SECONDS) };
        let uses = if r.uses == 0 { 1 } else { r.uses.min(crate::join::MAX_USES) };
        match self.0.create_join_token(&cluster, ttl, uses, &who).await {
            Ok((token, t)) => Ok(Response::new(api::CreateJoinTokenResponse {
                token,
                expires_unix_ms: t.expires_ms,
                uses: t.uses_left,
            })),
            Err(e) if e == crate::hub::NOT_LEADING => {
                Err(Status::unavailable(format!("{e}: ask the leading replica (flotilla hubs)")))
            }
            Err(e) => Err(Status::internal(e)),
        }
    }

    async fn who_am_i(&self, req: Request<api::WhoAmIRequest>) -> Result<Response<api::WhoAmIResponse>, Status> {
        let who = operator(&req, &self.0).map_err(|r| r.status)?;
        let roles = self.0.shared.identities.roles();
        let expires = req
            .peer_certs()
            .and_then(|c| c.first().and_then(|c| flotilla_common::identity::expiry_of(c)))
            .unwrap_or_default();
        Ok(Response::new(api::WhoAmIResponse {
            role: roles.highest(&who).map(|r| r.to_string()).unwrap_or_default(),
            who,
            open: roles.is_open(),
            certificate_expires_unix_ms: expires,
        }))
    }

    async fn explain(&self, req: Request<api::ExplainRequest>) -> Result<Response<api::ExplainResponse>, Status> {
        let who = self.authorize(&req, Action::View, Target::fleet(), "", "").await?;
        let r = req.into_inner();
        let st = self.0.state();
        if !st.clusters.contains_key(&r.cluster) {
            return Err(Status::not_found(format!("cluster {:?} is not in the fleet inventory", r.cluster)));
        }
        self.may_see_cluster(&st, who, &r.cluster, &r.app).await?;
        let desired = st.desired.get(&r.cluster).map(|d| (**d).clone()).unwrap_or_default();
        let mut apps: BTreeSet<String> = desired.keys().cloned().collect();
        apps.extend(st.rollouts.iter().filter(|(_, rec)| rec.targets(&r.cluster)).map(|(a, _)| a.clone()));
        if !r.app.is_empty() {
            if !apps.contains(&r.app) {
                return Err(Status::not_found(format!("app {:?} does not target cluster {:?}", r.app, r.cluster)));
            }
            apps.retain(|a| *a == r.app);
        }
        let mut lines: Vec<String> = st.reports.get(&r.cluster).map(|rep| rep.problems()).unwrap_or_default();
        for app in apps {
            let applied = st.reports.get(&r.cluster).and_then(|rep| rep.apps.get(&app)).map(|a| a.0.revision.clone());
            let d = desired.get(&app);
            let mut line = match (d, applied.as_deref()) {
                (Some(d), _) if d.adopt => format!("{app}: keeps what its agent runs until the rollout reaches it"),
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
pub fn rollout_view(
    app: &str,
    rec: &crate::rollouts::Record,
    now: i64,
    reports: &BTreeMap<String, Arc<crate::report::ClusterReport>>,
) -> api::Rollout {
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
            // A released cluster whose agent cannot reach its API server holds the wave: say so.
            let unreachable: Vec<(&str, &(i64, String))> = w
                .clusters
                .iter()
                .filter(|c| c.outcome == O::Updating)
                .filter_map(|c| reports.get(&c.name)?.api_down.as_ref().map(|d| (c.name.as_str(), d)))
                .collect();
            let waiting = match (&w.phase, &earlier_open, unreachable.first()) {
                (WavePhase::AwaitingApproval, _, _) => "awaits approval".to_string(),
                (WavePhase::Pending, Some(e), _) => format!("waits for wave {e}"),
                (_, _, Some((c, (since, error)))) => {
                    let more = match unreachable.len() - 1 {
                        0 => String::new(),
                        n => format!(" (and {n} more clusters)"),
                    };
                    format!("waits on {c}: API unreachable since {}: {error}{more}", crate::report::clock(*since))
                }
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
