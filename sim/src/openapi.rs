//! OpenAPI v3 schemas of the built-in kinds, as the API server publishes them under `/openapi/v3/<gv>`:
//! built from the `k8s-openapi` crate's types (their `schemars` schemas carry the Kubernetes descriptions
//! and types of the version we report), each group-version document holding the schemas its kinds
//! reach, the kinds and their lists tagged with `x-kubernetes-group-version-kind`. `kubectl explain` reads
//! them; [`crate::schema`] validates and prunes objects with them.

use k8s_openapi::api::{
    apps::v1 as apps, autoscaling::v1 as autoscaling1, autoscaling::v2 as autoscaling2, batch::v1 as batch,
    coordination::v1 as coordination, core::v1 as core, discovery::v1 as discovery, networking::v1 as networking,
    policy::v1 as policy, rbac::v1 as rbac, scheduling::v1 as scheduling, storage::v1 as storage,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1 as apiregistration;
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

/// Every component schema, by name (`io.k8s.api.apps.v1.Deployment`), and the schema name of each kind.
pub struct Catalogue {
    pub schemas: Map<String, Value>,
    /// (group, version, kind) → schema name.
    pub kinds: BTreeMap<(String, String, String), String>,
}

macro_rules! kinds {
    ($gen:ident, $out:ident; $( ($group:literal, $version:literal, $kind:literal, $ty:ty) ),* $(,)?) => {
        $(
            let r = $gen.subschema_for::<$ty>();
            let name = r.get("$ref").and_then(Value::as_str).unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string();
            $out.push(($group, $version, $kind, name));
        )*
    };
}

fn build() -> Catalogue {
    let mut generator = SchemaSettings::openapi3().with(|s| s.meta_schema = None).into_generator();
    let mut found: Vec<(&str, &str, &str, String)> = Vec::new();
    kinds!(generator, found;
        ("", "v1", "Namespace", core::Namespace),
        ("", "v1", "ConfigMap", core::ConfigMap),
        ("", "v1", "Secret", core::Secret),
        ("", "v1", "Service", core::Service),
        ("", "v1", "ServiceAccount", core::ServiceAccount),
        ("", "v1", "Pod", core::Pod),
        ("", "v1", "PersistentVolumeClaim", core::PersistentVolumeClaim),
        ("", "v1", "PersistentVolume", core::PersistentVolume),
        ("", "v1", "Node", core::Node),
        ("", "v1", "Event", core::Event),
        ("", "v1", "Endpoints", core::Endpoints),
        ("", "v1", "LimitRange", core::LimitRange),
        ("", "v1", "ResourceQuota", core::ResourceQuota),
        ("", "v1", "ReplicationController", core::ReplicationController),
        ("apps", "v1", "Deployment", apps::Deployment),
        ("apps", "v1", "StatefulSet", apps::StatefulSet),
        ("apps", "v1", "DaemonSet", apps::DaemonSet),
        ("apps", "v1", "ReplicaSet", apps::ReplicaSet),
        ("apps", "v1", "ControllerRevision", apps::ControllerRevision),
        ("batch", "v1", "Job", batch::Job),
        ("batch", "v1", "CronJob", batch::CronJob),
        ("networking.k8s.io", "v1", "Ingress", networking::Ingress),
        ("networking.k8s.io", "v1", "NetworkPolicy", networking::NetworkPolicy),
        ("networking.k8s.io", "v1", "IngressClass", networking::IngressClass),
        ("rbac.authorization.k8s.io", "v1", "Role", rbac::Role),
        ("rbac.authorization.k8s.io", "v1", "RoleBinding", rbac::RoleBinding),
        ("rbac.authorization.k8s.io", "v1", "ClusterRole", rbac::ClusterRole),
        ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", rbac::ClusterRoleBinding),
        ("apiextensions.k8s.io", "v1", "CustomResourceDefinition", apiextensions::CustomResourceDefinition),
        ("apiregistration.k8s.io", "v1", "APIService", apiregistration::APIService),
        ("coordination.k8s.io", "v1", "Lease", coordination::Lease),
        ("discovery.k8s.io", "v1", "EndpointSlice", discovery::EndpointSlice),
        ("policy", "v1", "PodDisruptionBudget", policy::PodDisruptionBudget),
        ("policy", "v1", "Eviction", policy::Eviction),
        ("autoscaling", "v2", "HorizontalPodAutoscaler", autoscaling2::HorizontalPodAutoscaler),
        ("autoscaling", "v1", "HorizontalPodAutoscaler", autoscaling1::HorizontalPodAutoscaler),
        ("autoscaling", "v1", "Scale", autoscaling1::Scale),
        ("storage.k8s.io", "v1", "StorageClass", storage::StorageClass),
        ("scheduling.k8s.io", "v1", "PriorityClass", scheduling::PriorityClass),
    );
    let list_meta = generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta>();
    let mut schemas = generator.take_definitions(true);
    // Where the crate's schemas are narrower than the API server's: JSON is any value (CRD defaults,
    // enums, examples), and a Quantity is a string or any number (`cpu: 0.5`).
    if let Some(Value::Object(j)) = schemas.get_mut("io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSON") {
        j.shift_remove("type");
    }
    if let Some(Value::Object(q)) = schemas.get_mut("io.k8s.apimachinery.pkg.api.resource.Quantity") {
        q.shift_remove("x-kubernetes-int-or-string");
        q.insert("oneOf".into(), json!([{"type": "string"}, {"type": "number"}]));
    }
    let mut kinds = BTreeMap::new();
    for (group, version, kind, name) in found {
        let gvk = json!({"group": group, "version": version, "kind": kind});
        if let Some(s) = schemas.get_mut(&name).and_then(Value::as_object_mut) {
            let tags = s.entry("x-kubernetes-group-version-kind").or_insert_with(|| json!([]));
            if let Some(a) = tags.as_array_mut() {
                a.push(gvk);
            }
        }
        // The list kind (`DeploymentList`), which kubectl validates `kind: ConfigMapList` files against.
        let list_name = format!("{name}List");
        if !["Eviction", "Scale"].contains(&kind) && !schemas.contains_key(&list_name) {
            let api_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
            schemas.insert(
                list_name.clone(),
                json!({
                    "description": format!("{kind}List is a list of {kind} objects ({api_version})."),
                    "type": "object",
                    "required": ["items"],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."},
                        "kind": {"type": "string", "description": "Kind is a string value representing the REST resource this object represents."},
                        "metadata": {"allOf": [list_meta.as_value()], "description": "Standard list metadata."},
                        "items": {"type": "array", "description": format!("List of {kind} objects."), "items": {"$ref": format!("#/components/schemas/{name}")}},
                    },
                    "x-kubernetes-group-version-kind": [{"group": group, "version": version, "kind": format!("{kind}List")}],
                }),
            );
        }
        kinds.insert((group.to_string(), version.to_string(), kind.to_string()), name);
    }
    Catalogue { schemas, kinds }
}

/// The catalogue, built once per process.
pub fn catalogue() -> &'static Catalogue {
    static CAT: OnceLock<Catalogue> = OnceLock::new();
    CAT.get_or_init(build)
}

/// The schema of a built-in kind, if it has one.
pub fn schema_of(group: &str, version: &str, kind: &str) -> Option<&'static Value> {
    let c = catalogue();
    let name = c.kinds.get(&(group.to_string(), version.to_string(), kind.to_string()))?;
    c.schemas.get(name)
}

/// Follows `$ref` (and a lone `allOf: [$ref]`) to the schema it names.
pub fn resolve<'a>(mut s: &'a Value, schemas: &'a Map<String, Value>) -> &'a Value {
    for _ in 0..16 {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            match r.rsplit('/').next().and_then(|n| schemas.get(n)) {
                Some(next) => s = next,
                None => return s,
            }
        } else if let Some([only]) = s.get("allOf").and_then(Value::as_array).map(Vec::as_slice) {
            s = only;
        } else {
            return s;
        }
    }
    s
}

/// The names of every schema `roots` reach through `$ref`.
pub fn closure(roots: &[String], schemas: &Map<String, Value>) -> BTreeSet<String> {
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    if let Some(n) = r.rsplit('/').next() {
                        out.push(n.to_string());
                    }
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.to_vec();
    while let Some(n) = todo.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        if let Some(s) = schemas.get(&n) {
            refs(s, &mut todo);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_real_schemas_with_descriptions_and_gvk() {
        let d = schema_of("apps", "v1", "Deployment").expect("Deployment");
        assert_eq!(
            d["x-kubernetes-group-version-kind"],
            json!([{"group": "apps", "version": "v1", "kind": "Deployment"}])
        );
        let c = catalogue();
        let spec = resolve(&d["properties"]["spec"], &c.schemas);
        let replicas = &spec["properties"]["replicas"];
        assert_eq!(replicas["type"], "integer");
        assert!(replicas["description"].as_str().unwrap().contains("desired pods"), "{replicas}");
        assert!(c.schemas.contains_key("io.k8s.api.core.v1.ConfigMapList"));
        let reach = closure(&["io.k8s.api.apps.v1.Deployment".to_string()], &c.schemas);
        assert!(reach.contains("io.k8s.api.core.v1.Container"));
        assert!(!reach.contains("io.k8s.api.rbac.v1.Role"));
        let tp = resolve(
            &resolve(&resolve(&spec["properties"]["strategy"], &c.schemas)["properties"]["rollingUpdate"], &c.schemas)
                ["properties"]["maxSurge"],
            &c.schemas,
        );
        assert_eq!(tp["x-kubernetes-int-or-string"], true, "{tp}");
    }
}
