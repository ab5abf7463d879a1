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
use tokio::sync::Semaphore;

pub const FIELD_MANAGER: &str = "flotilla-agent";
/// An object with this annotation set to "true" is never pruned.
pub const PROTECT_ANNOTATION: &str = "flotilla.dev/protect";

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
        source: kube::Error,
    },
    #[error("Namespace {namespace}: creating it failed")]
    NamespaceFailed {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("{object}: {verb} failed")]
    Api {
        object: String,
        verb: &'static str,
        #[source]
        source: kube::Error,
    },
}

impl ApplyError {
    /// The message with the API server's answer: `Deployment shop/web: apply failed: <status message>`.
    pub fn full(&self) -> String {
        match self.kube() {
            Some(kube::Error::Api(s)) => format!("{self}: {} ({})", s.message, s.reason),
            Some(src) => format!("{self}: {src}"),
            None => self.to_string(),
        }
    }

    fn kube(&self) -> Option<&kube::Error> {
        match self {
            ApplyError::Malformed { .. } => None,
            ApplyError::UnknownKind { source, .. }
            | ApplyError::NamespaceFailed { source, .. }
            | ApplyError::Api { source, .. } => Some(source),
        }
    }

    /// The API server refused the object itself (422 Invalid, 400 BadRequest): retrying the same content
    /// cannot help until the desired state changes.
    pub fn is_rejection(&self) -> bool {
        matches!(self.kube(), Some(kube::Error::Api(s)) if s.code == 422 || s.code == 400)
    }
}

/// What a prune did with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pruned {
    Deleted,
    AlreadyGone,
    /// Left in place, with why (protected, not created by this app).
    Kept(String),
}

pub struct Applier {
    client: Client,
    kinds: Mutex<HashMap<(String, String), (ApiResource, bool)>>,
    /// Namespaces known to exist.
    namespaces: Mutex<HashSet<String>>,
    permits: Semaphore,
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
        }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The API resource of a kind and whether it is namespaced (discovery, cached once found).
    pub async fn resource(&self, r: &ObjectRef) -> Result<(ApiResource, bool), ApplyError> {
        let key = (r.api_version.clone(), r.kind.clone());
        if let Some(hit) = self.kinds.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let (group, version) = r.api_version.split_once('/').unwrap_or(("", &r.api_version));
        let gvk = GroupVersionKind::gvk(group, version, &r.kind);
        let _permit = self.permits.acquire().await;
        let (ar, caps) =
            kube::discovery::pinned_kind(&self.client, &gvk).await.map_err(|source| ApplyError::UnknownKind {
                object: r.to_string(),
                api_version: r.api_version.clone(),
                kind: r.kind.clone(),
                source,
            })?;
        let namespaced = caps.scope == kube::discovery::Scope::Namespaced;
        self.kinds.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (ar.clone(), namespaced));
        Ok((ar, namespaced))
    }

    async fn api(&self, r: &ObjectRef) -> Result<Api<DynamicObject>, ApplyError> {
        let (ar, namespaced) = self.resource(r).await?;
        Ok(match (namespaced, r.namespace.as_str()) {
            (true, "") => Api::default_namespaced_with(self.client.clone(), &ar),
            (true, ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            (false, _) => Api::all_with(self.client.clone(), &ar),
        })
    }

    /// Creates `namespace` when the cluster lacks it, as a plain create: the agent does not own it, so it is
    /// never pruned (other apps and people may share it). Labelled `app.kubernetes.io/managed-by: flotilla`.
    pub async fn ensure_namespace(&self, namespace: &str) -> Result<(), ApplyError> {
        if self.namespaces.lock().unwrap_or_else(|p| p.into_inner()).contains(namespace) {
            return Ok(());
        }
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let failed = |source| ApplyError::NamespaceFailed { namespace: namespace.to_string(), source };
        let _permit = self.permits.acquire().await;
        if api.get_opt(namespace).await.map_err(failed)?.is_none() {
            let ns = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace, "labels": {"app.kubernetes.io/managed-by": "flotilla"}},
            }))
            .expect("a valid Namespace");
            match api.create(&Default::default(), &ns).await {
                Ok(_) => tracing::info!(%namespace, "created the namespace"),
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(failed(e)),
            }
        }
        self.namespaces.lock().unwrap_or_else(|p| p.into_inner()).insert(namespace.to_string());
        Ok(())
    }

    /// Server-side applies one object (which names its own kind, namespace and name). Returns the
    /// resourceVersion the cluster gave the result.
    pub async fn apply(&self, obj: &Value) -> Result<String, ApplyError> {
        let r = ObjectRef::of(obj);
        let object = r.to_string();
        let field = |f: &'static str| ApplyError::Malformed { object: object.clone(), field: f };
        if r.api_version.is_empty() {
            return Err(field("apiVersion"));
        }
        if r.kind.is_empty() {
            return Err(field("kind"));
        }
        if r.name.is_empty() {
            return Err(field("metadata.name"));
        }
        let api = self.api(&r).await?;
        let _permit = self.permits.acquire().await;
        let applied = api
            .patch(&r.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
            .await
            .map_err(|source| ApplyError::Api { object: object.clone(), verb: "apply", source })?;
        Ok(applied.metadata.resource_version.unwrap_or_default())
    }

    /// Deletes an object the agent created for `app`: only when it carries `flotilla.dev/app: <app>` and is
    /// not protected.
    pub async fn prune(&self, app: &str, r: &ObjectRef) -> Result<Pruned, ApplyError> {
        let api = match self.api(r).await {
            Ok(api) => api,
            // The kind is gone (its CRD was removed): so are its objects.
            Err(ApplyError::UnknownKind { .. }) => return Ok(Pruned::AlreadyGone),
            Err(e) => return Err(e),
        };
        let _permit = self.permits.acquire().await;
        let err = |verb, source| ApplyError::Api { object: r.to_string(), verb, source };
        let Some(live) = api.get_opt(&r.name).await.map_err(|e| err("read", e))? else {
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
        let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
        match api.delete(&r.name, &dp).await {
            Ok(_) => Ok(Pruned::Deleted),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(Pruned::AlreadyGone),
            Err(e) => Err(err("delete", e)),
        }
    }
}
