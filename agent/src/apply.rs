//! Talks to the cluster for the engine: server-side apply under the agent's own field manager, deletes
//! that only ever remove objects the agent created, discovery of kinds (cached per kind). At most
//! `concurrency` API calls run at once, whatever the size of the apps.

use crate::cache::APP_LABEL;
use crate::state::ObjectRef;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Semaphore;

pub const FIELD_MANAGER: &str = "flotilla-agent";
/// An object with this annotation set to "true" is never pruned.
pub const PROTECT_ANNOTATION: &str = "flotilla.dev/protect";
/// On a desired object: take it over although it exists and the agent did not create it.
pub const ADOPT_ANNOTATION: &str = "flotilla.dev/adopt";
/// On a live object the agent took over: it existed before, so it is released, never deleted, when it leaves
/// its app.
pub const ADOPTED_ANNOTATION: &str = "flotilla.dev/adopted";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{object}: the object has no {field}")]
    Malformed { object: String, field: &'static str },
    #[error("{object}: the cluster does not serve {api_version} {kind}")]
    UnknownKind {
        object: String,
        api_version: String,
        kind: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("Namespace {namespace}: creating it failed")]
    NamespaceFailed {
        namespace: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("{object}: {verb} failed")]
    Api {
        object: String,
        verb: &'static str,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("{object}: {verb} failed: the cluster's API server did not answer within {} s", .after.as_secs())]
    Timeout { object: String, verb: &'static str, after: Duration },
}

/// What an error from the API server means, in words: the server's own message for an answer
/// (`namespaces "x" not found (NotFound)`), what happened on the way for no answer ("the cluster's API
/// server did not answer: connection refused"), never a client library's internals.
pub fn in_words(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.message.is_empty() => format!("the API server answered {} {}", s.code, s.reason),
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        kube::Error::Discovery(d) => format!("the cluster does not serve it ({d})"),
        kube::Error::SerdeError(e) => format!("the API server's answer could not be read: {e}"),
        other => {
            // The innermost cause says what happened (connection refused, reset, a TLS failure, a timeout).
            let mut cause: &dyn std::error::Error = other;
            while let Some(next) = cause.source() {
                cause = next;
            }
            let text = cause.to_string();
            let text = if text.is_empty() { other.to_string() } else { text };
            format!("the cluster's API server did not answer: {}", text.trim_end_matches('.'))
        }
    }
}

/// The API server did not answer, or answered that it cannot answer now (429, 5xx): worth a retry.
pub fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        kube::Error::Discovery(_) | kube::Error::SerdeError(_) => false,
        _ => true,
    }
}

/// The API server answered that it does not serve the kind (a group-version it does not know, a kind the
/// group-version lacks). Anything else (a timeout, a 503 of an aggregated API) proves nothing.
pub fn is_not_served(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 404,
        kube::Error::Discovery(_) => true,
        _ => false,
    }
}

impl ApplyError {
    /// The message with the API server's answer: `Deployment shop/web: apply failed: <status message>`.
    pub fn full(&self) -> String {
        match self.kube() {
            Some(src) => format!("{self}: {}", in_words(src)),
            None => self.to_string(),
        }
    }

    fn kube(&self) -> Option<&kube::Error> {
        match self {
            ApplyError::Malformed { .. } | ApplyError::Timeout { .. } => None,
            ApplyError::UnknownKind { source, .. }
            | ApplyError::NamespaceFailed { source, .. }
            | ApplyError::Api { source, .. } => Some(&**source),
        }
    }

    /// The `code` label of the failure: the HTTP status the API server answered, else what happened
    /// (`timeout`, `unreachable`, `malformed`, `not_served`).
    pub fn code(&self) -> String {
        match (self, self.kube()) {
            (_, Some(kube::Error::Api(s))) => s.code.to_string(),
            (ApplyError::Timeout { .. }, _) => "timeout".into(),
            (ApplyError::Malformed { .. }, _) => "malformed".into(),
            (ApplyError::UnknownKind { .. }, _) => "not_served".into(),
            _ => "unreachable".into(),
        }
    }

    /// The API server refused the object itself (422 Invalid, 400 BadRequest, 403 Forbidden from admission
    /// or policy): retrying the same content at once cannot help. The object is marked; the rest applies.
    pub fn is_rejection(&self) -> bool {
        matches!(self.kube(), Some(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422))
            || matches!(self, ApplyError::Malformed { .. })
    }

    /// The API server gave no answer at all (no connection, a timeout): transient, and not an answer.
    pub fn is_unreachable(&self) -> bool {
        self.transient() && !matches!(self.kube(), Some(kube::Error::Api(_)))
    }

    fn transient(&self) -> bool {
        match self {
            ApplyError::Timeout { .. } => true,
            ApplyError::Malformed { .. } | ApplyError::UnknownKind { .. } => false,
            ApplyError::NamespaceFailed { source, .. } | ApplyError::Api { source, .. } => is_transient(source),
        }
    }
}

/// The HTTP status the API server answered with, if it answered.
fn api_code(e: &ApplyError) -> Option<u16> {
    match e.kube() {
        Some(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    }
}

/// How long one API call may take before it counts as unanswered.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Quick retries of a transient failure inside one call: after 0.5 s, 1 s, 2 s (jittered), well within any
/// progress deadline, before the failure reaches the app.
const QUICK_RETRIES: u32 = 3;

/// What a prune did with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pruned {
    Deleted,
    AlreadyGone,
    /// An adopted object left in place with the fleet's label and annotation removed.
    Released,
    /// Left in place, with why (protected, not created by this app).
    Kept(String),
}

/// Whether the API server answers: set by every call (an answer of any kind, or none) and by a probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    /// Unix ms since when the API server has not answered; `None` while it answers.
    pub down_since_ms: Option<i64>,
    /// What the last failure was, in words.
    pub error: String,
}

/// API calls made, by what they were for (the benchmark prints them).
#[derive(Debug, Default)]
pub struct Calls {
    pub applies: std::sync::atomic::AtomicU64,
    pub dry_runs: std::sync::atomic::AtomicU64,
    pub other: std::sync::atomic::AtomicU64,
}

pub struct Applier {
    client: Client,
    pub calls: Calls,
    kinds: Mutex<HashMap<(String, String), (ApiResource, bool)>>,
    /// Namespaces known to exist.
    namespaces: Mutex<HashSet<String>>,
    permits: Semaphore,
    reach: Mutex<Reach>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Applier {
    pub fn new(client: Client) -> Self {
        Self::with_concurrency(client, 8)
    }

    pub fn with_concurrency(client: Client, concurrency: usize) -> Self {
        Applier {
            client,
            kinds: Mutex::new(HashMap::new()),
            namespaces: Mutex::new(HashSet::new()),
            permits: Semaphore::new(concurrency.max(1)),
            reach: Mutex::new(Reach::default()),
            calls: Calls::default(),
        }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Whether the API server answered the last call.
    pub fn reach(&self) -> Reach {
        self.reach.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records an answer (`None`) or the lack of one.
    pub fn observe(&self, failure: Option<String>) {
        crate::telemetry::METRICS.api_reachable.set(failure.is_none() as i64);
        let mut r = self.reach.lock().unwrap_or_else(|p| p.into_inner());
        match failure {
            None => *r = Reach::default(),
            Some(error) => {
                r.down_since_ms.get_or_insert_with(now_ms);
                r.error = error;
            }
        }
    }

    /// Asks the API server for its version: the probe of reachability (bounded by [`CALL_TIMEOUT`]).
    pub async fn probe(&self) {
        let outcome = tokio::time::timeout(CALL_TIMEOUT, self.client.apiserver_version()).await;
        let failed = match &outcome {
            Ok(Ok(_)) => None,
            Ok(Err(kube::Error::Api(s))) => Some(s.code.to_string()),
            Ok(Err(_)) => Some("unreachable".to_string()),
            Err(_) => Some("timeout".to_string()),
        };
        if let Some(code) = failed {
            crate::telemetry::METRICS.api_errors.get_or_create(&vec![("code", code)]).inc();
        }
        self.observe(match outcome {
            Ok(Ok(_)) => None,
            // Any answer but "cannot answer now" is an answer.
            Ok(Err(e)) if !is_transient(&e) => None,
            Ok(Err(e)) => Some(in_words(&e)),
            Err(_) => Some(format!("the cluster's API server did not answer within {} s", CALL_TIMEOUT.as_secs())),
        });
    }

    /// One API call, bounded in time, retried quickly (three times, jittered) while the failure is transient.
    async fn call<T, F, Fut>(&self, object: &str, verb: &'static str, mut f: F) -> Result<T, ApplyError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let mut attempt = 0;
        let counter = match verb {
            "apply" => &self.calls.applies,
            "dry-run apply" => &self.calls.dry_runs,
            _ => &self.calls.other,
        };
        loop {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let permit = self.permits.acquire().await;
            let started = std::time::Instant::now();
            let outcome = tokio::time::timeout(CALL_TIMEOUT, f()).await;
            drop(permit);
            let m = &crate::telemetry::METRICS;
            let err = match outcome {
                Ok(Ok(v)) => {
                    if verb == "apply" {
                        let kind = vec![("kind", m.kind_label(object))];
                        m.apply_seconds.get_or_create(&kind).observe(started.elapsed().as_secs_f64());
                    }
                    self.observe(None);
                    return Ok(v);
                }
                Ok(Err(source)) => ApplyError::Api { object: object.to_string(), verb, source: Box::new(source) },
                Err(_) => ApplyError::Timeout { object: object.to_string(), verb, after: CALL_TIMEOUT },
            };
            m.api_errors.get_or_create(&vec![("code", err.code())]).inc();
            if err.is_unreachable() {
                self.observe(Some(err.kube().map_or_else(|| err.to_string(), in_words)));
            } else {
                self.observe(None);
            }
            if attempt >= QUICK_RETRIES || !err.transient() {
                return Err(err);
            }
            attempt += 1;
            let wait = Duration::from_millis(500 << (attempt - 1)).mul_f64(0.75 + fastrand::f64() * 0.5);
            tokio::time::sleep(wait).await;
        }
    }

    /// The API resource of a kind and whether it is namespaced (discovery, cached once found). The kind is
    /// `UnknownKind` only when the API server says it does not serve it; a failure to ask is an `Api` error.
    pub async fn resource(&self, r: &ObjectRef) -> Result<(ApiResource, bool), ApplyError> {
        let key = (r.api_version.clone(), r.kind.clone());
        if let Some(hit) = self.kinds.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let (group, version) = r.api_version.split_once('/').unwrap_or(("", &r.api_version));
        let gvk = GroupVersionKind::gvk(group, version, &r.kind);
        let found = self.call(&r.to_string(), "discovery", || kube::discovery::pinned_kind(&self.client, &gvk)).await;
        let (ar, caps) = found.map_err(|e| self.not_served(r, e))?;
        let namespaced = caps.scope == kube::discovery::Scope::Namespaced;
        self.kinds.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (ar.clone(), namespaced));
        Ok((ar, namespaced))
    }

    fn not_served(&self, r: &ObjectRef, e: ApplyError) -> ApplyError {
        match e {
            ApplyError::Api { source, .. } if is_not_served(&source) => ApplyError::UnknownKind {
                object: r.to_string(),
                api_version: r.api_version.clone(),
                kind: r.kind.clone(),
                source,
            },
            other => other,
        }
    }

    /// The kind in the version recorded, else in any version its group serves now (an object recorded as
    /// v1beta1 is found as v1 once v1beta1 is no longer served).
    pub async fn resource_any_version(&self, r: &ObjectRef) -> Result<(ApiResource, bool), ApplyError> {
        match self.resource(r).await {
            Err(ApplyError::UnknownKind { source, .. }) if !r.group().is_empty() => {
                let group = r.group().to_string();
                let found =
                    self.call(&r.to_string(), "discovery", || kube::discovery::group(&self.client, &group)).await;
                let g = found.map_err(|e| self.not_served(r, e))?;
                match g.recommended_kind(&r.kind) {
                    Some((ar, caps)) => Ok((ar, caps.scope == kube::discovery::Scope::Namespaced)),
                    None => Err(ApplyError::UnknownKind {
                        object: r.to_string(),
                        api_version: r.api_version.clone(),
                        kind: r.kind.clone(),
                        source,
                    }),
                }
            }
            other => other,
        }
    }

    fn api_for(&self, ar: &ApiResource, namespaced: bool, r: &ObjectRef) -> Api<DynamicObject> {
        match (namespaced, r.namespace.as_str()) {
            (true, "") => Api::default_namespaced_with(self.client.clone(), ar),
            (true, ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            (false, _) => Api::all_with(self.client.clone(), ar),
        }
    }

    async fn api(&self, r: &ObjectRef) -> Result<Api<DynamicObject>, ApplyError> {
        let (ar, namespaced) = self.resource(r).await?;
        Ok(self.api_for(&ar, namespaced, r))
    }

    /// Creates `namespace` when the cluster lacks it, as a plain create: the agent does not own it, so it is
    /// never pruned (other apps and people may share it). Labelled `app.kubernetes.io/managed-by: flotilla`.
    pub async fn ensure_namespace(&self, namespace: &str) -> Result<(), ApplyError> {
        if self.namespaces.lock().unwrap_or_else(|p| p.into_inner()).contains(namespace) {
            return Ok(());
        }
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let what = format!("Namespace {namespace}");
        let to_ns = |e: ApplyError| match e {
            ApplyError::Api { source, .. } => ApplyError::NamespaceFailed { namespace: namespace.to_string(), source },
            other => other,
        };
        if self.call(&what, "read", || api.get_opt(namespace)).await.map_err(to_ns)?.is_none() {
            let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace, "labels": {"app.kubernetes.io/managed-by": "flotilla"}},
            }))
            .expect("a valid Namespace");
            let pp = kube::api::PostParams::default();
            match self.call(&what, "create", || api.create(&pp, &ns)).await {
                Ok(_) => tracing::info!(%namespace, "created the namespace"),
                Err(e) if api_code(&e) == Some(409) => {}
                Err(e) => return Err(to_ns(e)),
            }
        }
        self.namespaces.lock().unwrap_or_else(|p| p.into_inner()).insert(namespace.to_string());
        Ok(())
    }

    fn checked(obj: &Value) -> Result<ObjectRef, ApplyError> {
        let r = ObjectRef::of(obj);
        let field = |f: &'static str| ApplyError::Malformed { object: r.to_string(), field: f };
        if r.api_version.is_empty() {
            return Err(field("apiVersion"));
        }
        if r.kind.is_empty() {
            return Err(field("kind"));
        }
        if r.name.is_empty() {
            return Err(field("metadata.name"));
        }
        Ok(r)
    }

    /// Server-side applies one object (which names its own kind, namespace and name) under the agent's field
    /// manager. Returns the object as the cluster stored it.
    pub async fn apply(&self, obj: &Value) -> Result<Value, ApplyError> {
        self.apply_as(obj, false).await
    }

    /// What applying `obj` would make of the live object (a server-side dry-run: defaults, normalization,
    /// admission, the merge with other managers' fields), changing nothing.
    pub async fn dry_run(&self, obj: &Value) -> Result<Value, ApplyError> {
        self.apply_as(obj, true).await
    }

    async fn apply_as(&self, obj: &Value, dry_run: bool) -> Result<Value, ApplyError> {
        let r = Self::checked(obj)?;
        let api = self.api(&r).await?;
        let mut pp = PatchParams::apply(FIELD_MANAGER).force();
        pp.dry_run = dry_run;
        let verb = if dry_run { "dry-run apply" } else { "apply" };
        let patch = Patch::Apply(obj);
        let mut applied = self.call(&r.to_string(), verb, || api.patch(&r.name, &pp, &patch)).await?;
        if !dry_run {
            // Large, and never read from an apply's answer (a dry-run's answer keeps them: drift reads them).
            applied.metadata.managed_fields = None;
        }
        Ok(serde_json::to_value(applied).unwrap_or(Value::Null))
    }

    /// The live object with everything the API server keeps (managedFields included), if it exists.
    pub async fn get(&self, r: &ObjectRef) -> Result<Option<Value>, ApplyError> {
        let api = self.api(r).await?;
        let live = self.call(&r.to_string(), "read", || api.get_opt(&r.name)).await?;
        Ok(live.map(|o| serde_json::to_value(o).unwrap_or(Value::Null)))
    }

    /// The names of the objects of `r`'s kind in `r`'s namespace that carry no `flotilla.dev/app` label: objects
    /// the fleet did not create.
    pub async fn unlabelled(&self, r: &ObjectRef) -> Result<HashSet<String>, ApplyError> {
        let api = self.api(r).await?;
        // Namespaces the agent created for apps (`ensure_namespace`) are the fleet's too.
        let lp =
            kube::api::ListParams::default().labels(&format!("!{APP_LABEL},app.kubernetes.io/managed-by!=flotilla"));
        let what = format!(
            "{} {} in {}",
            r.api_version,
            r.kind,
            if r.namespace.is_empty() { "the cluster" } else { &r.namespace }
        );
        let list = self.call(&what, "list", || api.list_metadata(&lp)).await?;
        Ok(list.items.into_iter().filter_map(|o| o.metadata.name).collect())
    }

    /// Deletes an object the agent created for `app`: only when it carries `flotilla.dev/app: <app>` and is
    /// not protected. The kind is found in any version its group serves; "gone" only when the API server
    /// says the kind is not served, never because it could not be asked.
    pub async fn prune(&self, app: &str, r: &ObjectRef) -> Result<Pruned, ApplyError> {
        let (ar, namespaced) = match self.resource_any_version(r).await {
            Ok(found) => found,
            // The API server says the kind is not served (its CRD was removed): so are its objects.
            Err(ApplyError::UnknownKind { .. }) => return Ok(Pruned::AlreadyGone),
            Err(e) => return Err(e),
        };
        if namespaced && r.namespace.is_empty() {
            return Ok(Pruned::Kept(format!("{r} names no namespace: the agent never guesses one to delete in")));
        }
        let api = self.api_for(&ar, namespaced, r);
        let object = r.to_string();
        let Some(live) = self.call(&object, "read", || api.get_opt(&r.name)).await? else {
            return Ok(Pruned::AlreadyGone);
        };
        let labels = live.metadata.labels.clone().unwrap_or_default();
        if labels.get(APP_LABEL).map(String::as_str) != Some(app) {
            return Ok(Pruned::Kept(format!("{r} is not labelled {APP_LABEL}={app}: the agent did not create it")));
        }
        let annotations = live.metadata.annotations.clone().unwrap_or_default();
        if annotations.get(PROTECT_ANNOTATION).map(String::as_str) == Some("true") {
            return Ok(Pruned::Kept(format!("{r} is protected ({PROTECT_ANNOTATION}: \"true\")")));
        }
        let argo = annotations.get(flotilla_common::fleet::objects::ARGO_SYNC_OPTIONS).map(String::as_str);
        if argo.is_some_and(|o| o.split(',').any(|v| matches!(v.trim(), "Prune=false" | "Delete=false"))) {
            return Ok(Pruned::Kept(format!(
                "{r} says {}: {}",
                flotilla_common::fleet::objects::ARGO_SYNC_OPTIONS,
                argo.unwrap_or_default()
            )));
        }
        if annotations.get(ADOPTED_ANNOTATION).map(String::as_str) == Some("true") {
            // It existed before the app took it over: released as it is, with the fleet's marks removed.
            let patch = serde_json::json!({"metadata": {
                "labels": {APP_LABEL: null},
                "annotations": {ADOPTED_ANNOTATION: null},
            }});
            let (pp, patch) = (PatchParams::default(), Patch::Merge(&patch));
            self.call(&object, "release", || api.patch(&r.name, &pp, &patch)).await?;
            return Ok(Pruned::Released);
        }
        // Deleted only as the object just read: a re-created object (another uid) is left alone.
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            preconditions: Some(kube::api::Preconditions { uid: live.metadata.uid.clone(), resource_version: None }),
            ..Default::default()
        };
        match self.call(&object, "delete", || api.delete(&r.name, &dp)).await {
            Ok(_) => {
                crate::telemetry::METRICS.pruned.inc();
                Ok(Pruned::Deleted)
            }
            Err(e) if api_code(&e) == Some(404) => Ok(Pruned::AlreadyGone),
            Err(e) if api_code(&e) == Some(409) => {
                Ok(Pruned::Kept(format!("{r} was replaced while being pruned: left alone")))
            }
            Err(e) => Err(e),
        }
    }
}
