//! The catalogue of kinds a simulated cluster serves: the built-in kinds a fleet manager deploys, plus
//! whatever an Established CustomResourceDefinition adds at run time.

use serde_json::{json, Value};
use std::sync::Arc;

/// Where a resource's `/scale` subresource reads and writes its numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleSpec {
    pub spec_replicas: Vec<String>,
    pub status_replicas: Vec<String>,
    pub label_selector: Option<Vec<String>>,
}

impl ScaleSpec {
    fn standard() -> Self {
        ScaleSpec {
            spec_replicas: vec!["spec".into(), "replicas".into()],
            status_replicas: vec!["status".into(), "replicas".into()],
            label_selector: Some(vec!["status".into(), "selector".into()]),
        }
    }
}

/// A printer column for `kubectl get` tables (CRD additionalPrinterColumns use the same shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub json_path: String,
    pub priority: i64,
}

/// One served group/version/resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Whether `status` is a subresource (and so ignored on writes to the main resource).
    pub status: bool,
    pub scale: Option<ScaleSpec>,
    /// False for kinds defined by a CustomResourceDefinition.
    pub builtin: bool,
    pub printer_columns: Vec<PrinterColumn>,
    /// A custom resource's `openAPIV3Schema` for this version (built-in kinds: [`crate::openapi`]).
    pub crd_schema: Option<Arc<Value>>,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Storage key shared by every version of one resource.
    pub fn storage_key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// `deployments.apps`, the way the API server names a resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn api_resource_json(&self) -> Vec<Value> {
        let verbs = json!(["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]);
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.builtin && self.kind == "Pod" {
            out.push(json!({
                "name": "pods/log",
                "singularName": "",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["get"],
            }));
            out.push(json!({
                "name": "pods/eviction",
                "singularName": "",
                "namespaced": true,
                "group": "policy",
                "version": "v1",
                "kind": "Eviction",
                "verbs": ["create"],
            }));
        }
        if self.scale.is_some() {
            out.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

const NS: bool = true;
const CL: bool = false;

/// group, version, kind, plural, namespaced, short names, status subresource, scale subresource, in "all"
type Row = (&'static str, &'static str, &'static str, &'static str, bool, &'static [&'static str], bool, bool, bool);

#[rustfmt::skip]
const BUILTINS: &[Row] = &[
    ("", "v1", "Namespace", "namespaces", CL, &["ns"], true, false, false),
    ("", "v1", "ConfigMap", "configmaps", NS, &["cm"], false, false, false),
    ("", "v1", "Secret", "secrets", NS, &[], false, false, false),
    ("", "v1", "Service", "services", NS, &["svc"], true, false, true),
    ("", "v1", "ServiceAccount", "serviceaccounts", NS, &["sa"], false, false, false),
    ("", "v1", "Pod", "pods", NS, &["po"], true, false, true),
    ("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", NS, &["pvc"], true, false, false),
    ("", "v1", "PersistentVolume", "persistentvolumes", CL, &["pv"], true, false, false),
    ("", "v1", "Node", "nodes", CL, &["no"], true, false, false),
    ("", "v1", "Event", "events", NS, &["ev"], false, false, false),
    ("", "v1", "Endpoints", "endpoints", NS, &["ep"], false, false, false),
    ("", "v1", "LimitRange", "limitranges", NS, &["limits"], false, false, false),
    ("", "v1", "ResourceQuota", "resourcequotas", NS, &["quota"], true, false, false),
    ("", "v1", "ReplicationController", "replicationcontrollers", NS, &["rc"], true, true, true),
    ("apps", "v1", "Deployment", "deployments", NS, &["deploy"], true, true, true),
    ("apps", "v1", "StatefulSet", "statefulsets", NS, &["sts"], true, true, true),
    ("apps", "v1", "DaemonSet", "daemonsets", NS, &["ds"], true, false, true),
    ("apps", "v1", "ReplicaSet", "replicasets", NS, &["rs"], true, true, true),
    ("apps", "v1", "ControllerRevision", "controllerrevisions", NS, &[], false, false, false),
    ("batch", "v1", "Job", "jobs", NS, &[], true, false, true),
    ("batch", "v1", "CronJob", "cronjobs", NS, &["cj"], true, false, true),
    ("networking.k8s.io", "v1", "Ingress", "ingresses", NS, &["ing"], true, false, false),
    ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", NS, &["netpol"], false, false, false),
    ("networking.k8s.io", "v1", "IngressClass", "ingressclasses", CL, &[], false, false, false),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles", NS, &[], false, false, false),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", NS, &[], false, false, false),
    ("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", CL, &[], false, false, false),
    ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", CL, &[], false, false, false),
    ("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", CL, &["crd", "crds"], true, false, false),
    ("coordination.k8s.io", "v1", "Lease", "leases", NS, &[], false, false, false),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", NS, &[], false, false, false),
    ("apiregistration.k8s.io", "v1", "APIService", "apiservices", CL, &[], true, false, false),
    ("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", NS, &["pdb"], true, false, false),
    ("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", NS, &["hpa"], true, false, true),
    ("autoscaling", "v1", "HorizontalPodAutoscaler", "horizontalpodautoscalers", NS, &["hpa"], true, false, true),
    ("storage.k8s.io", "v1", "StorageClass", "storageclasses", CL, &["sc"], false, false, false),
    ("scheduling.k8s.io", "v1", "PriorityClass", "priorityclasses", CL, &["pc"], false, false, false),
];

/// The built-in kinds, in discovery order (preferred versions first within a group).
pub fn builtins() -> Vec<Arc<ResourceDef>> {
    catalogue().to_vec()
}

/// The built-in kinds, built once per process.
pub fn catalogue() -> &'static [Arc<ResourceDef>] {
    static CATALOGUE: std::sync::OnceLock<Vec<Arc<ResourceDef>>> = std::sync::OnceLock::new();
    CATALOGUE.get_or_init(build)
}

fn build() -> Vec<Arc<ResourceDef>> {
    BUILTINS
        .iter()
        .map(|&(group, version, kind, plural, namespaced, short, status, scale, all)| {
            Arc::new(ResourceDef {
                group: group.into(),
                version: version.into(),
                kind: kind.into(),
                plural: plural.into(),
                singular: kind.to_ascii_lowercase(),
                namespaced,
                short_names: short.iter().map(|s| s.to_string()).collect(),
                categories: if all { vec!["all".into()] } else { vec![] },
                status,
                scale: scale.then(ScaleSpec::standard),
                builtin: true,
                printer_columns: vec![],
                crd_schema: None,
            })
        })
        .collect()
}

/// Errors in a CustomResourceDefinition that make it unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CrdError {
    #[error("spec.{0}: Required value")]
    Missing(&'static str),
    #[error("metadata.name: Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group")]
    NameMismatch { name: String },
    #[error("spec.scope: Unsupported value: {0:?}: supported values: \"Cluster\", \"Namespaced\"")]
    Scope(String),
    #[error("spec.versions: Invalid value: must have exactly one version marked as storage version")]
    StorageVersions,
}

/// The resources a CustomResourceDefinition defines, one per served version.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceDef>, CrdError> {
    let spec = crd.get("spec").ok_or(CrdError::Missing("group"))?;
    let s = |p: &[&str]| -> Option<String> {
        let mut v = spec;
        for k in p {
            v = v.get(*k)?;
        }
        v.as_str().map(str::to_string)
    };
    let group = s(&["group"]).filter(|g| !g.is_empty()).ok_or(CrdError::Missing("group"))?;
    let plural = s(&["names", "plural"]).filter(|g| !g.is_empty()).ok_or(CrdError::Missing("names.plural"))?;
    let kind = s(&["names", "kind"]).filter(|g| !g.is_empty()).ok_or(CrdError::Missing("names.kind"))?;
    let singular = s(&["names", "singular"]).unwrap_or_else(|| kind.to_ascii_lowercase());
    let name = crd.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    if name != format!("{plural}.{group}") {
        return Err(CrdError::NameMismatch { name: name.to_string() });
    }
    let namespaced = match s(&["scope"]).as_deref() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        Some(other) => return Err(CrdError::Scope(other.to_string())),
        None => return Err(CrdError::Missing("scope")),
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let short_names = strings(spec.pointer("/names/shortNames"));
    let categories = strings(spec.pointer("/names/categories"));
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
        .ok_or(CrdError::Missing("versions"))?;
    let storage = versions.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true)).count();
    if storage != 1 {
        return Err(CrdError::StorageVersions);
    }
    let path = |p: Option<&Value>| -> Option<Vec<String>> {
        let p = p?.as_str()?;
        Some(p.trim_start_matches('.').split('.').map(str::to_string).collect())
    };
    let mut out = Vec::new();
    for v in versions {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let version = v.get("name").and_then(Value::as_str).ok_or(CrdError::Missing("versions[].name"))?;
        let sub = v.get("subresources");
        let status = sub.and_then(|s| s.get("status")).is_some();
        let scale = sub.and_then(|s| s.get("scale")).and_then(|sc| {
            Some(ScaleSpec {
                spec_replicas: path(sc.get("specReplicasPath"))?,
                status_replicas: path(sc.get("statusReplicasPath"))?,
                label_selector: path(sc.get("labelSelectorPath")),
            })
        });
        let printer_columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .filter_map(|c| {
                        Some(PrinterColumn {
                            name: c.get("name")?.as_str()?.to_string(),
                            type_: c.get("type").and_then(Value::as_str).unwrap_or("string").to_string(),
                            json_path: c.get("jsonPath")?.as_str()?.to_string(),
                            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(ResourceDef {
            group: group.clone(),
            version: version.to_string(),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            namespaced,
            short_names: short_names.clone(),
            categories: categories.clone(),
            status,
            scale,
            builtin: false,
            printer_columns,
            crd_schema: v.pointer("/schema/openAPIV3Schema").cloned().map(Arc::new),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true,
                     "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}}},
                    {"name": "v1beta1", "served": true, "storage": false},
                    {"name": "v1alpha1", "served": false, "storage": false}
                ]
            }
        })
    }

    #[test]
    fn crd_defines_one_resource_per_served_version() {
        let defs = from_crd(&crd()).unwrap();
        assert_eq!(defs.len(), 2);
        assert_eq!(defs[0].api_version(), "example.com/v1");
        assert!(defs[0].status && defs[0].scale.is_some());
        assert!(!defs[1].status && defs[1].scale.is_none());
        assert_eq!(defs[0].storage_key(), defs[1].storage_key());
        assert_eq!(defs[0].short_names, vec!["wd"]);
    }

    #[test]
    fn crd_errors_name_the_field() {
        let mut c = crd();
        c["metadata"]["name"] = json!("widgets.other.com");
        assert!(matches!(from_crd(&c), Err(CrdError::NameMismatch { .. })));
        let mut c = crd();
        c["spec"]["scope"] = json!("Galaxy");
        assert_eq!(
            from_crd(&c).unwrap_err().to_string(),
            "spec.scope: Unsupported value: \"Galaxy\": supported values: \"Cluster\", \"Namespaced\""
        );
        let mut c = crd();
        c["spec"]["versions"][1]["storage"] = json!(true);
        assert_eq!(from_crd(&c), Err(CrdError::StorageVersions));
    }

    #[test]
    fn builtins_have_the_required_kinds_with_scope() {
        let defs = builtins();
        let find = |k: &str| defs.iter().find(|d| d.kind == k).unwrap_or_else(|| panic!("{k}"));
        for k in [
            "Namespace",
            "ConfigMap",
            "Secret",
            "Service",
            "ServiceAccount",
            "Pod",
            "PersistentVolumeClaim",
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "Job",
            "CronJob",
            "Ingress",
            "NetworkPolicy",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Lease",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
        ] {
            find(k);
        }
        assert!(!find("Namespace").namespaced);
        assert!(!find("ClusterRole").namespaced);
        assert!(find("Deployment").namespaced && find("Deployment").scale.is_some());
    }
}
