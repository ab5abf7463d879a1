//! The agent's state, kept in the cluster so that a restarted agent with no hub still enforces it: per app,
//! the last desired bundle (gzipped, in chunks of ConfigMaps when large) and the inventory of every object the
//! agent may have created for the app (what pruning may ever delete).
//!
//! Layout in the state namespace (`flotilla-system` by default):
//! - `flotilla-app-<app>`: the index: digest, revision, whether it is fully applied, the names of the chunks
//!   of the bundle and of the inventory;
//! - `flotilla-app-<app>-<digest12>-<n>`: the bundle's gzipped chunks, in Secrets rather than ConfigMaps when
//!   the bundle holds a Secret (its values are then as protected at rest as the Secret itself);
//! - `flotilla-app-<app>-inv-<hash12>-<n>`: the inventory's gzipped chunks (one object reference per line),
//!   so an inventory of any size fits.
//!
//! Chunks are written before the index that names them, and old chunks are deleted only after: a crash at
//! any point leaves a complete previous or complete new state. Each app's state stands alone: a damaged one
//! is reported and skipped, never the end of the agent.

use flate2::{read::GzDecoder, write::GzEncoder, Compression};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

pub const STATE_LABEL: &str = "flotilla.dev/agent-state";
const APP_LABEL: &str = "flotilla.dev/state-app";
const FIELD_MANAGER: &str = "flotilla-agent-state";
/// ConfigMaps hold at most 1 MiB; leave room for metadata.
const CHUNK: usize = 900 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} in namespace {namespace} failed")]
    Api {
        what: String,
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("the stored state of app {app} is damaged: {message}")]
    Damaged { app: String, message: String },
}

impl StateError {
    /// The message with the API server's answer, in words.
    pub fn full(&self) -> String {
        match self {
            StateError::Api { source, .. } => format!("{self}: {}", crate::apply::in_words(source)),
            StateError::Damaged { .. } => self.to_string(),
        }
    }
}

/// A reference to an object the agent manages: enough to find and delete it. Two references are the same
/// object when group, kind, namespace and name agree: the apiVersion is only the version it was last written
/// in (a custom resource moving from v1beta1 to v1 is the same object, never pruned and re-created).
#[derive(Debug, Clone)]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// group, kind, namespace, name: what makes the object this object.
    pub fn identity(&self) -> (&str, &str, &str, &str) {
        (self.group(), &self.kind, &self.namespace, &self.name)
    }

    pub fn of(o: &serde_json::Value) -> ObjectRef {
        let s = |p: &str| o.pointer(p).and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
        ObjectRef {
            api_version: s("/apiVersion"),
            kind: s("/kind"),
            namespace: s("/metadata/namespace"),
            name: s("/metadata/name"),
        }
    }

    pub fn group(&self) -> &str {
        self.api_version.split_once('/').map_or("", |(g, _)| g)
    }

    fn encode(&self) -> String {
        format!(
            "{} {} {} {}",
            self.api_version,
            self.kind,
            if self.namespace.is_empty() { "-" } else { &self.namespace },
            self.name
        )
    }

    fn decode(line: &str) -> Option<ObjectRef> {
        let mut p = line.split(' ');
        let (api_version, kind, ns, name) = (p.next()?, p.next()?, p.next()?, p.next()?);
        Some(ObjectRef {
            api_version: api_version.into(),
            kind: kind.into(),
            namespace: if ns == "-" { String::new() } else { ns.into() },
            name: name.into(),
        })
    }
}

impl PartialEq for ObjectRef {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for ObjectRef {}

impl PartialOrd for ObjectRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ObjectRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.identity().cmp(&other.identity())
    }
}

impl std::hash::Hash for ObjectRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity().hash(state)
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One app's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppState {
    pub app: String,
    pub digest: String,
    pub revision: String,
    /// Every object of the bundle was applied.
    pub applied: bool,
    pub bundle: Vec<u8>,
    pub inventory: BTreeSet<ObjectRef>,
    /// The app left the cluster and these objects still have to be deleted.
    pub leaving: bool,
}

pub struct StateStore {
    api: Api<ConfigMap>,
    secrets: Api<Secret>,
    namespace: String,
}

/// Whether a bundle holds a Secret (its canonical JSON lines say `"kind":"Secret"`; a false positive only
/// protects more).
fn holds_secret(bundle: &[u8]) -> bool {
    bundle.windows(15).any(|w| w == br#""kind":"Secret""#)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    let _ = e.write_all(bytes);
    e.finish().unwrap_or_default()
}

fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

impl StateStore {
    pub fn new(client: Client, namespace: &str) -> Self {
        StateStore {
            api: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
        }
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(kube::Error) -> StateError + '_ {
        let what = what.into();
        move |source| StateError::Api { what, namespace: self.namespace.clone(), source }
    }

    /// Creates the state namespace when missing.
    pub async fn ensure_namespace(&self, client: Client) -> Result<(), StateError> {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}});
        api.patch(&self.namespace, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&ns))
            .await
            .map_err(self.err("creating the state namespace"))?;
        Ok(())
    }

    async fn put(&self, name: &str, labels: BTreeMap<&str, &str>, data: serde_json::Value) -> Result<(), StateError> {
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}});
        for (k, v) in data.as_object().into_iter().flatten() {
            cm[k] = v.clone();
        }
        self.api
            .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm))
            .await
            .map_err(self.err(format!("writing ConfigMap {name}")))?;
        Ok(())
    }

    async fn put_secret(
        &self,
        name: &str,
        labels: BTreeMap<&str, &str>,
        key: &str,
        bytes: &[u8],
    ) -> Result<(), StateError> {
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "labels": labels}, "data": {key: ByteString(bytes.to_vec())}});
        self.secrets
            .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&secret))
            .await
            .map_err(self.err(format!("writing Secret {name}")))?;
        Ok(())
    }

    async fn delete_chunk(&self, name: &str, in_secret: bool) {
        let dp = DeleteParams::default();
        let _ = if in_secret {
            self.secrets.delete(name, &dp).await.map(|_| ())
        } else {
            self.api.delete(name, &dp).await.map(|_| ())
        };
    }

    /// Stores an app's state; the bundle's chunks are written only when the digest is new.
    pub async fn save(&self, s: &AppState) -> Result<(), StateError> {
        let index = format!("flotilla-app-{}", s.app);
        let existing = self.api.get_opt(&index).await.map_err(self.err(format!("reading ConfigMap {index}")))?;
        let old_chunks: Vec<String> = existing
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get("chunks"))
            .map(|c| c.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let same_digest =
            existing.as_ref().and_then(|c| c.data.as_ref()).and_then(|d| d.get("digest")) == Some(&s.digest);
        let old_in_secrets = existing
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get("chunksIn"))
            .is_some_and(|k| k == "Secret");
        let in_secrets = holds_secret(&s.bundle);
        let chunks: Vec<String> = if same_digest && !old_chunks.is_empty() && old_in_secrets == in_secrets {
            old_chunks.clone()
        } else {
            let packed = gzip(&s.bundle);
            let mut names = Vec::new();
            let pieces: Vec<&[u8]> = if packed.is_empty() { vec![&[][..]] } else { packed.chunks(CHUNK).collect() };
            for (i, piece) in pieces.into_iter().enumerate() {
                let name = format!("{index}-{}-{i}", short(&s.digest));
                let labels: BTreeMap<&str, &str> = [(STATE_LABEL, "chunk"), (APP_LABEL, s.app.as_str())].into();
                if in_secrets {
                    self.put_secret(&name, labels, "bundle.gz", piece).await?;
                } else {
                    let data = json!({"binaryData": {"bundle.gz": ByteString(piece.to_vec())}});
                    self.put(&name, labels, data).await?;
                }
                names.push(name);
            }
            names
        };
        let inventory: Vec<String> = s.inventory.iter().map(ObjectRef::encode).collect();
        let inventory = inventory.join("\n");
        let old_inventory: Vec<String> = existing
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get("inventoryChunks"))
            .map(|c| c.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let hash = flotilla_common::fleet::digest_of(inventory.as_bytes());
        let prefix = format!("{index}-inv-{}-", short(&hash));
        let inventory_chunks: Vec<String> =
            if !old_inventory.is_empty() && old_inventory.iter().all(|c| c.starts_with(&prefix)) {
                old_inventory.clone()
            } else {
                let packed = gzip(inventory.as_bytes());
                let mut names = Vec::new();
                for (i, piece) in packed.chunks(CHUNK).enumerate() {
                    let name = format!("{prefix}{i}");
                    let data = json!({"binaryData": {"inventory.gz": ByteString(piece.to_vec())}});
                    self.put(&name, [(STATE_LABEL, "chunk"), (APP_LABEL, s.app.as_str())].into(), data).await?;
                    names.push(name);
                }
                names
            };
        let data = json!({"data": {
            "digest": s.digest,
            "revision": s.revision,
            "applied": s.applied.to_string(),
            "chunks": chunks.join("\n"),
            "inventoryChunks": inventory_chunks.join("\n"),
            "leaving": s.leaving.to_string(),
            "chunksIn": if in_secrets { "Secret" } else { "ConfigMap" },
        }});
        self.put(&index, [(STATE_LABEL, "index"), (APP_LABEL, s.app.as_str())].into(), data).await?;
        // Old chunks of the same name in the other kind (the bundle's kind changed) go too.
        for old in old_chunks.iter().filter(|c| !chunks.contains(c) || old_in_secrets != in_secrets) {
            self.delete_chunk(old, old_in_secrets).await;
        }
        for old in old_inventory.iter().filter(|c| !inventory_chunks.contains(c)) {
            self.delete_chunk(old, false).await;
        }
        Ok(())
    }

    /// Every app's stored state, and the apps whose stored state is damaged (each app stands alone).
    pub async fn load_all(&self) -> Result<(Vec<AppState>, Vec<StateError>), StateError> {
        let lp = ListParams::default().labels(&format!("{STATE_LABEL}=index"));
        let list = self.api.list(&lp).await.map_err(self.err("listing the agent's state"))?;
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for cm in list.items {
            match self.load(cm).await {
                Ok(s) => out.push(s),
                Err(e @ StateError::Damaged { .. }) => damaged.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok((out, damaged))
    }

    async fn gathered(&self, names: &str, key: &str, app: &str, in_secrets: bool) -> Result<Vec<u8>, StateError> {
        let mut packed = Vec::new();
        for name in names.lines() {
            let bytes = if in_secrets {
                let chunk = self.secrets.get_opt(name).await.map_err(self.err(format!("reading Secret {name}")))?;
                chunk.and_then(|c| c.data).and_then(|b| b.get(key).cloned())
            } else {
                let chunk = self.api.get_opt(name).await.map_err(self.err(format!("reading ConfigMap {name}")))?;
                chunk.and_then(|c| c.binary_data).and_then(|b| b.get(key).cloned())
            };
            let bytes = bytes.ok_or_else(|| StateError::Damaged {
                app: app.to_string(),
                message: format!("chunk {name} is missing"),
            })?;
            packed.extend_from_slice(&bytes.0);
        }
        gunzip(&packed).map_err(|e| StateError::Damaged { app: app.to_string(), message: format!("{key}: {e}") })
    }

    async fn load(&self, cm: ConfigMap) -> Result<AppState, StateError> {
        let data = cm.data.unwrap_or_default();
        let app = cm.metadata.labels.unwrap_or_default().get(APP_LABEL).cloned().unwrap_or_default();
        let damaged = |message: String| StateError::Damaged { app: app.clone(), message };
        if !flotilla_common::fleet::valid_app_name(&app) {
            return Err(damaged(format!("ConfigMap {} names no valid app", cm.metadata.name.unwrap_or_default())));
        }
        let in_secrets = data.get("chunksIn").is_some_and(|k| k == "Secret");
        let chunks = data.get("chunks").map(String::as_str).unwrap_or_default();
        let bundle = self.gathered(chunks, "bundle.gz", &app, in_secrets).await?;
        let digest = data.get("digest").cloned().unwrap_or_default();
        if flotilla_common::fleet::digest_of(&bundle) != digest {
            return Err(damaged(format!("the stored bundle does not match its digest {digest}")));
        }
        let inventory = match data.get("inventoryChunks") {
            Some(names) => {
                let bytes = self.gathered(names, "inventory.gz", &app, false).await?;
                String::from_utf8(bytes).map_err(|e| damaged(format!("the inventory is not text: {e}")))?
            }
            // Written by an agent before inventories were chunked.
            None => data.get("inventory").cloned().unwrap_or_default(),
        };
        Ok(AppState {
            app: app.clone(),
            digest,
            revision: data.get("revision").cloned().unwrap_or_default(),
            applied: data.get("applied").map(String::as_str) == Some("true"),
            bundle,
            inventory: inventory.lines().filter_map(ObjectRef::decode).collect(),
            leaving: data.get("leaving").map(String::as_str) == Some("true"),
        })
    }

    /// Forgets an app.
    pub async fn remove(&self, app: &str) -> Result<(), StateError> {
        let lp = ListParams::default().labels(&format!("{APP_LABEL}={app}"));
        let list = self.api.list(&lp).await.map_err(self.err("listing the agent's state"))?;
        for cm in list.items {
            if let Some(name) = cm.metadata.name {
                self.api
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map_err(self.err(format!("deleting ConfigMap {name}")))?;
            }
        }
        let list = self.secrets.list_metadata(&lp).await.map_err(self.err("listing the agent's state Secrets"))?;
        for secret in list.items {
            if let Some(name) = secret.metadata.name {
                self.secrets
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map_err(self.err(format!("deleting Secret {name}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip() {
        for r in [
            ObjectRef {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                namespace: "shop".into(),
                name: "web".into(),
            },
            ObjectRef {
                api_version: "v1".into(),
                kind: "Namespace".into(),
                namespace: String::new(),
                name: "shop".into(),
            },
        ] {
            assert_eq!(ObjectRef::decode(&r.encode()), Some(r.clone()));
        }
        assert_eq!(gunzip(&gzip(b"hello")).unwrap(), b"hello");
    }
}
