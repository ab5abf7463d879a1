//! Applies a bundle's objects with server-side apply under the agent's own field manager.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

pub const FIELD_MANAGER: &str = "flotilla-agent";

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
    #[error("{object}: server-side apply failed")]
    ApplyFailed {
        object: String,
        #[source]
        source: kube::Error,
    },
}

/// Applies objects, resolving their kinds through discovery (cached per kind).
pub struct Applier {
    client: Client,
    kinds: Mutex<HashMap<(String, String), (ApiResource, bool)>>,
    /// Namespaces known to exist.
    namespaces: Mutex<HashSet<String>>,
}

fn describe(o: &Value) -> String {
    let s = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap_or("?");
    match o.pointer("/metadata/namespace").and_then(Value::as_str) {
        Some(ns) => format!("{} {}/{}", s("/kind"), ns, s("/metadata/name")),
        None => format!("{} {}", s("/kind"), s("/metadata/name")),
    }
}

impl Applier {
    pub fn new(client: Client) -> Self {
        Applier { client, kinds: Mutex::new(HashMap::new()), namespaces: Mutex::new(HashSet::new()) }
    }

    async fn resolve(&self, object: &str, api_version: &str, kind: &str) -> Result<(ApiResource, bool), ApplyError> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(hit) = self.kinds.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (ar, caps) =
            kube::discovery::pinned_kind(&self.client, &gvk).await.map_err(|source| ApplyError::UnknownKind {
                object: object.to_string(),
                api_version: api_version.into(),
                kind: kind.into(),
                source,
            })?;
        let namespaced = caps.scope == kube::discovery::Scope::Namespaced;
        self.kinds.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (ar.clone(), namespaced));
        Ok((ar, namespaced))
    }

    /// Creates `namespace` when the cluster lacks it, as a plain create: the agent does not own it, so it is
    /// never pruned (other apps and people may share it). Labelled `app.kubernetes.io/managed-by: flotilla`.
    pub async fn ensure_namespace(&self, namespace: &str) -> Result<(), ApplyError> {
        if self.namespaces.lock().unwrap_or_else(|p| p.into_inner()).contains(namespace) {
            return Ok(());
        }
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let failed = |source| ApplyError::NamespaceFailed { namespace: namespace.to_string(), source };
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

    /// Applies one object; the object names its own kind, namespace and name.
    pub async fn apply(&self, obj: &Value) -> Result<(), ApplyError> {
        let object = describe(obj);
        let field = |f: &'static str| ApplyError::Malformed { object: object.clone(), field: f };
        let api_version = obj.get("apiVersion").and_then(Value::as_str).ok_or_else(|| field("apiVersion"))?;
        let kind = obj.get("kind").and_then(Value::as_str).ok_or_else(|| field("kind"))?;
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).ok_or_else(|| field("metadata.name"))?;
        let (ar, namespaced) = self.resolve(&object, api_version, kind).await?;
        let api: Api<DynamicObject> = match (namespaced, obj.pointer("/metadata/namespace").and_then(Value::as_str)) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &ar),
            (true, None) => Api::default_namespaced_with(self.client.clone(), &ar),
            (false, _) => Api::all_with(self.client.clone(), &ar),
        };
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
            .await
            .map_err(|source| ApplyError::ApplyFailed { object: object.clone(), source })?;
        Ok(())
    }
}
