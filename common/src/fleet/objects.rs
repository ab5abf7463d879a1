//! Kubernetes objects as the fleet renders them: parsing manifests (multi-document YAML, JSON), checking
//! what every object needs, giving namespaced objects the app's namespace, and the canonical bundle an
//! agent applies. Free of I/O.

use super::FleetError;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The content address of a bundle: `sha256:<hex>`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An object with where it came from (`apps/shop/web.yaml:12`, `kustomize build overlays/eu`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sourced {
    pub origin: String,
    pub object: Value,
}

/// The rendered, canonical content of one app: what an agent applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// One JSON object per line, keys sorted, objects in apply order.
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub objects: usize,
    /// `Kind namespace/name` (or `Kind name`) of every object, in bundle order.
    pub ids: Vec<String>,
}

/// The key of a bundle's first line, which carries the app's policy rather than an object.
pub const POLICY_KEY: &str = "flotilla.dev/policy";

impl Bundle {
    fn new(mut objects: Vec<Value>, policy: &super::AppPolicy) -> Bundle {
        objects.sort_by_key(sort_key);
        let mut bytes = Vec::new();
        let header = serde_json::json!({ POLICY_KEY: policy });
        bytes.extend_from_slice(canonical_json(&header).as_bytes());
        bytes.push(b'\n');
        let mut ids = Vec::with_capacity(objects.len());
        for o in &objects {
            bytes.extend_from_slice(canonical_json(o).as_bytes());
            bytes.push(b'\n');
            ids.push(object_id(o));
        }
        let digest = digest_of(&bytes);
        Bundle { bytes, digest, objects: objects.len(), ids }
    }

    /// The objects of a bundle, in apply order.
    pub fn parse(bytes: &[u8]) -> Result<Vec<Value>, serde_json::Error> {
        let all: Vec<Value> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(serde_json::from_slice)
            .collect::<Result<_, _>>()?;
        Ok(all.into_iter().filter(|v| v.get(POLICY_KEY).is_none()).collect())
    }

    /// The app's policy (the default for a bundle without one).
    pub fn policy(bytes: &[u8]) -> Result<super::AppPolicy, serde_json::Error> {
        Self::policy_lenient(bytes).map(|(p, _)| p)
    }

    /// The app's policy and the fields of it this version does not know (a bundle from a newer hub).
    pub fn policy_lenient(bytes: &[u8]) -> Result<(super::AppPolicy, Vec<String>), serde_json::Error> {
        let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
        match serde_json::from_slice::<Value>(first) {
            Ok(mut v) if v.get(POLICY_KEY).is_some() => super::AppPolicy::lenient(v[POLICY_KEY].take()),
            _ => Ok((super::AppPolicy::default(), Vec::new())),
        }
    }
}

/// The API groups Kubernetes itself serves: their kinds' scope is known here ([`CLUSTER_SCOPED`] lists the
/// cluster-scoped ones). The scope of any other kind is known from a CRD in the same app, or else only from
/// the cluster's discovery, which the agent reads.
const BUILTIN_GROUPS: &[&str] = &[
    "",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "flowcontrol.apiserver.k8s.io",
    "internal.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "storagemigration.k8s.io",
];

/// Built-in kinds that are not namespaced.
const CLUSTER_SCOPED: &[&str] = &[
    "CertificateSigningRequest",
    "ClusterTrustBundle",
    "ComponentStatus",
    "CSINode",
    "DeviceClass",
    "FlowSchema",
    "IPAddress",
    "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding",
    "PriorityLevelConfiguration",
    "ResourceSlice",
    "ServiceCIDR",
    "StorageVersion",
    "StorageVersionMigration",
    "VolumeAttributesClass",
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "Node",
    "RuntimeClass",
    "CSIDriver",
    "VolumeAttachment",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "APIService",
];

fn kind_rank(kind: &str) -> u8 {
    match kind {
        "CustomResourceDefinition" => 0,
        "Namespace" => 1,
        k if CLUSTER_SCOPED.contains(&k) => 2,
        _ => 3,
    }
}

fn str_at<'a>(o: &'a Value, p: &str) -> &'a str {
    o.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn sort_key(o: &Value) -> (u8, String, String, String, String) {
    let kind = str_at(o, "/kind");
    (
        kind_rank(kind),
        str_at(o, "/apiVersion").split('/').next().unwrap_or_default().to_string(),
        kind.to_string(),
        str_at(o, "/metadata/namespace").to_string(),
        str_at(o, "/metadata/name").to_string(),
    )
}

/// `Kind namespace/name`, or `Kind name` for cluster-scoped objects.
pub fn object_id(o: &Value) -> String {
    let (kind, ns, name) = (str_at(o, "/kind"), str_at(o, "/metadata/namespace"), str_at(o, "/metadata/name"));
    if ns.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {ns}/{name}")
    }
}

/// JSON with object keys sorted, so equal objects always give equal bytes.
pub fn canonical_json(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = Map::new();
                for k in keys {
                    out.insert(k.clone(), sorted(&m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

pub(crate) fn yaml_error(file: &str, e: &serde_yaml::Error) -> FleetError {
    let line = e.location().map_or(1, |l| l.line());
    FleetError::Yaml { file: file.to_string(), line, message: e.to_string() }
}

/// A YAML error of `file` in the fleet's terms.
pub(crate) fn yaml_error_at(file: &str, e: crate::yaml::YamlError) -> FleetError {
    FleetError::Yaml { file: file.to_string(), line: e.line, message: e.message }
}

/// Parses one manifest file (or a tool's output, named by `file`) into objects with their origin.
pub fn parse_manifests(file: &str, bytes: &[u8]) -> Result<Vec<Sourced>, FleetError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| FleetError::Invalid { file: file.to_string(), message: format!("not UTF-8: {e}") })?;
    let at = |line: usize| format!("{file}:{line}");
    if file.ends_with(".json") {
        let v: Value = serde_json::from_str(text).map_err(|e| FleetError::Yaml {
            file: file.to_string(),
            line: e.line(),
            message: e.to_string(),
        })?;
        return Ok(match v {
            Value::Array(items) => items.into_iter().map(|object| Sourced { origin: at(1), object }).collect(),
            object => vec![Sourced { origin: at(1), object }],
        });
    }
    // As kubectl reads YAML (1.1 scalars: 0644 is 420), bounded against alias bombs.
    let docs = crate::yaml::parse_documents(text).map_err(|e| yaml_error_at(file, e))?;
    let mut out = Vec::new();
    for d in docs.into_iter().filter(|d| !d.value.is_null()) {
        // A list (`kind: List`, `ConfigMapList`, …) stands for its items, as kubectl reads it.
        let is_list = d.value.get("kind").and_then(Value::as_str).is_some_and(|k| k.ends_with("List"));
        match d.value {
            Value::Object(mut m) if is_list && m.get("items").is_some_and(Value::is_array) => {
                if let Some(Value::Array(items)) = m.remove("items") {
                    out.extend(items.into_iter().map(|object| Sourced { origin: at(d.line), object }));
                }
            }
            object => out.push(Sourced { origin: at(d.line), object }),
        }
    }
    Ok(out)
}

/// The annotation ordering an app's objects into waves (Argo CD's `argocd.argoproj.io/sync-wave` is read too).
pub const WAVE_ANNOTATION: &str = "flotilla.dev/wave";
pub const ARGO_SYNC_WAVE: &str = "argocd.argoproj.io/sync-wave";
pub const ARGO_HOOK: &str = "argocd.argoproj.io/hook";
pub const ARGO_HOOK_DELETE_POLICY: &str = "argocd.argoproj.io/hook-delete-policy";
pub const ARGO_SYNC_OPTIONS: &str = "argocd.argoproj.io/sync-options";
/// Argo CD's hook phases as wave offsets: PreSync hooks before every wave, PostSync after every wave.
const PHASE: i64 = 1 << 40;
/// `sync-options` Flotilla honours (the rest is refused, never ignored).
const SYNC_OPTIONS: &[&str] =
    &["Prune=false", "Delete=false", "ServerSideApply=true", "CreateNamespace=true", "PruneLast=true", "Validate=true"];

fn annotation<'a>(o: &'a Value, key: &str) -> Option<&'a str> {
    o.pointer("/metadata/annotations").and_then(|a| a.get(key)).and_then(Value::as_str)
}

/// The wave object `o` applies in: `flotilla.dev/wave`, else Argo CD's sync-wave (default 0), with Argo CD's
/// PreSync hooks before every wave and PostSync hooks after every wave (each wave waits for the one before to
/// be healthy: a PreSync Job completes before anything else applies).
pub fn wave_of(o: &Value) -> Result<i64, String> {
    let (key, raw) = match (annotation(o, WAVE_ANNOTATION), annotation(o, ARGO_SYNC_WAVE)) {
        (Some(w), _) => (WAVE_ANNOTATION, w),
        (None, Some(w)) => (ARGO_SYNC_WAVE, w),
        (None, None) => ("", "0"),
    };
    let wave: i64 = raw
        .trim()
        .parse()
        .ok()
        .filter(|w: &i64| w.abs() < PHASE / 2)
        .ok_or_else(|| format!("annotation {key}: {raw:?} is not a whole number"))?;
    let offset = match annotation(o, ARGO_HOOK).map(str::trim) {
        None | Some("Sync") => 0,
        Some("PreSync") => -PHASE,
        Some("PostSync") => PHASE,
        Some(other) => {
            return Err(format!(
                "annotation {ARGO_HOOK}: {other:?} is not supported (PreSync, Sync, PostSync and Skip are; a hook \
                 runs in one phase)"
            ))
        }
    };
    Ok(wave + offset)
}

/// Checks Argo CD's annotations Flotilla reads, so none is silently ignored.
fn check_argo(o: &Value) -> Result<(), String> {
    wave_of(o)?;
    if let Some(p) = annotation(o, ARGO_HOOK_DELETE_POLICY) {
        for v in p.split(',').map(str::trim) {
            if !["BeforeHookCreation", "HookSucceeded", "HookFailed"].contains(&v) {
                return Err(format!("annotation {ARGO_HOOK_DELETE_POLICY}: {v:?} is not a hook deletion policy"));
            }
        }
    }
    if let Some(opts) = annotation(o, ARGO_SYNC_OPTIONS) {
        for v in opts.split(',').map(str::trim).filter(|v| !v.is_empty()) {
            if !SYNC_OPTIONS.contains(&v) {
                return Err(format!(
                    "annotation {ARGO_SYNC_OPTIONS}: {v:?} is not supported (supported: {})",
                    SYNC_OPTIONS.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// A hook written with `generateName` (Argo CD creates a new one per sync): named here from its content, so
/// the same hook keeps its name and a changed hook is a new object (the old one is pruned).
fn name_generated(object: &mut Value) {
    let Some(prefix) = object.pointer("/metadata/generateName").and_then(Value::as_str).map(str::to_string) else {
        return;
    };
    if object.pointer("/metadata/name").and_then(Value::as_str).is_some_and(|n| !n.is_empty()) {
        return;
    }
    let digest = digest_of(canonical_json(object).as_bytes());
    let suffix = &digest["sha256:".len().."sha256:".len() + 5];
    if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("generateName");
        m.insert("name".into(), Value::String(format!("{prefix}{suffix}")));
    }
}

/// Checks every object (apiVersion, kind, metadata.name), fills in the app's namespace where an object is
/// namespaced and names none, refuses an object defined twice, and builds the canonical bundle.
pub fn finalize(namespace: &str, policy: &super::AppPolicy, objects: Vec<Sourced>) -> Result<Bundle, FleetError> {
    // group/kind → namespaced, for the kinds this app's CRDs define.
    let custom: BTreeMap<(String, String), bool> = objects
        .iter()
        .filter(|o| str_at(&o.object, "/kind") == "CustomResourceDefinition")
        .map(|o| {
            let gk = (str_at(&o.object, "/spec/group").to_string(), str_at(&o.object, "/spec/names/kind").to_string());
            (gk, str_at(&o.object, "/spec/scope") != "Cluster")
        })
        .collect();
    let mut scope_unknown = false;
    let mut out = Vec::with_capacity(objects.len());
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for Sourced { origin, mut object } in objects {
        let missing = |field| FleetError::MissingField { origin: origin.clone(), field };
        if !object.is_object() {
            return Err(FleetError::Object { origin, message: "a manifest must be a mapping".into() });
        }
        let kind = object.get("kind").and_then(Value::as_str).filter(|k| !k.is_empty()).ok_or(missing("kind"))?;
        let Some(api_version) = object.get("apiVersion").and_then(Value::as_str).filter(|a| !a.is_empty()) else {
            return Err(missing("apiVersion"));
        };
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        // Some(namespaced), or None when only the cluster knows.
        let namespaced = if BUILTIN_GROUPS.contains(&group) {
            Some(!CLUSTER_SCOPED.contains(&kind))
        } else {
            custom.get(&(group.to_string(), kind.to_string())).copied()
        };
        if annotation(&object, ARGO_HOOK).map(str::trim) == Some("Skip") {
            // Argo CD's "never apply this".
            continue;
        }
        check_argo(&object).map_err(|message| FleetError::Object { origin: origin.clone(), message })?;
        name_generated(&mut object);
        if object.pointer("/metadata/name").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(missing("metadata.name"));
        }
        match namespaced {
            Some(true) if object.pointer("/metadata/namespace").is_none() => {
                object["metadata"]["namespace"] = Value::String(namespace.to_string());
            }
            None if object.pointer("/metadata/namespace").is_none() => scope_unknown = true,
            _ => {}
        }
        let id = object_id(&object);
        if let Some(guard) = &policy.guard {
            if let Err(message) = guard.check(&object, namespaced) {
                return Err(FleetError::Policy { origin, object: id, message });
            }
        }
        if let Some(other) = seen.insert(id.clone(), origin.clone()) {
            return Err(FleetError::DuplicateObject { origin, object: id, other });
        }
        out.push(object);
    }
    if scope_unknown {
        // The agent places these once discovery tells it their kind's scope.
        let policy = super::AppPolicy { namespace: Some(namespace.to_string()), ..policy.clone() };
        return Ok(Bundle::new(out, &policy));
    }
    Ok(Bundle::new(out, policy))
}
