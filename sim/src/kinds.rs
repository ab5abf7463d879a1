//! Per-kind behaviour of the API server: defaulting, validation, which kinds carry a generation.

use crate::resources::ResourceDef;
use serde_json::{json, Map, Value};

const GENERATION_KINDS: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
    "CronJob",
    "Ingress",
    "NetworkPolicy",
    "CustomResourceDefinition",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
];

pub fn has_generation(res: &ResourceDef) -> bool {
    !res.builtin || GENERATION_KINDS.contains(&res.kind.as_str())
}

/// True when anything outside metadata and status differs.
pub fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| -> Map<String, Value> {
        let mut m = v.as_object().cloned().unwrap_or_default();
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.shift_remove(k);
        }
        m
    };
    strip(old) != strip(new)
}

fn set_default(obj: &mut Value, path: &[&str], v: Value) {
    let mut cur = obj;
    for (i, k) in path.iter().enumerate() {
        let Some(m) = cur.as_object_mut() else { return };
        if i + 1 == path.len() {
            m.entry(k.to_string()).or_insert(v);
            return;
        }
        cur = m.entry(k.to_string()).or_insert_with(|| json!({}));
    }
}

fn ip_for(name: &str, ns: &str) -> String {
    // Stable, collision-tolerant address in the documentation range 198.18.0.0/15 (never routed).
    let mut h: u32 = 2166136261;
    for b in ns.bytes().chain([b'/']).chain(name.bytes()) {
        h = (h ^ b as u32).wrapping_mul(16777619);
    }
    format!("198.{}.{}.{}", 18 + (h >> 16 & 1), (h >> 8) & 0xff, (h & 0xff).max(1))
}

/// Defaults the API server fills in; `old` keeps allocated values (a Service's cluster IP) stable.
pub fn apply_defaults(res: &ResourceDef, obj: &mut Value, old: Option<&Value>) {
    if !res.builtin {
        return;
    }
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_string();
    let template = match res.kind.as_str() {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            Some("/spec/template/spec")
        }
        "CronJob" => Some("/spec/jobTemplate/spec/template/spec"),
        "Pod" => Some("/spec"),
        _ => None,
    };
    if let Some(spec) = template.and_then(|p| obj.pointer_mut(p)) {
        pod_spec_defaults(spec, !matches!(res.kind.as_str(), "Job" | "CronJob"));
    }
    match res.kind.as_str() {
        "Namespace" => {
            set_default(obj, &["spec", "finalizers"], json!(["kubernetes"]));
            set_default(obj, &["status", "phase"], json!("Active"));
            set_default(obj, &["metadata", "labels"], json!({}));
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        "Secret" => set_default(obj, &["type"], json!("Opaque")),
        "Service" => {
            set_default(obj, &["spec", "type"], json!("ClusterIP"));
            if obj.pointer("/spec/type") != Some(&json!("ExternalName")) {
                let ip = old
                    .and_then(|o| o.pointer("/spec/clusterIP"))
                    .cloned()
                    .unwrap_or_else(|| json!(ip_for(&name, &ns)));
                set_default(obj, &["spec", "clusterIP"], ip.clone());
                let ip = obj["spec"]["clusterIP"].clone();
                set_default(obj, &["spec", "clusterIPs"], json!([ip]));
                set_default(obj, &["spec", "ipFamilies"], json!(["IPv4"]));
                set_default(obj, &["spec", "ipFamilyPolicy"], json!("SingleStack"));
                set_default(obj, &["spec", "internalTrafficPolicy"], json!("Cluster"));
            }
            set_default(obj, &["spec", "sessionAffinity"], json!("None"));
            if let Some(ports) = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
                for p in ports {
                    let port = p.get("port").cloned().unwrap_or(Value::Null);
                    if let Some(m) = p.as_object_mut() {
                        m.entry("protocol").or_insert(json!("TCP"));
                        m.entry("targetPort").or_insert(port);
                    }
                }
            }
            set_default(obj, &["status", "loadBalancer"], json!({}));
        }
        "Deployment" => {
            set_default(obj, &["spec", "replicas"], json!(1));
            set_default(obj, &["spec", "revisionHistoryLimit"], json!(10));
            set_default(obj, &["spec", "progressDeadlineSeconds"], json!(600));
            set_default(obj, &["spec", "strategy", "type"], json!("RollingUpdate"));
            if obj.pointer("/spec/strategy/type") == Some(&json!("RollingUpdate")) {
                set_default(obj, &["spec", "strategy", "rollingUpdate", "maxSurge"], json!("25%"));
                set_default(obj, &["spec", "strategy", "rollingUpdate", "maxUnavailable"], json!("25%"));
            }
        }
        "StatefulSet" => {
            set_default(obj, &["spec", "replicas"], json!(1));
            set_default(obj, &["spec", "podManagementPolicy"], json!("OrderedReady"));
            set_default(obj, &["spec", "revisionHistoryLimit"], json!(10));
            set_default(
                obj,
                &["spec", "updateStrategy"],
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
        }
        "ReplicaSet" | "ReplicationController" => set_default(obj, &["spec", "replicas"], json!(1)),
        "DaemonSet" => {
            set_default(obj, &["spec", "revisionHistoryLimit"], json!(10));
            set_default(
                obj,
                &["spec", "updateStrategy"],
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
            );
        }
        "Job" => {
            set_default(obj, &["spec", "completions"], json!(1));
            set_default(obj, &["spec", "parallelism"], json!(1));
            set_default(obj, &["spec", "backoffLimit"], json!(6));
        }
        "Pod" => set_default(obj, &["status", "phase"], json!("Pending")),
        "PersistentVolumeClaim" => set_default(obj, &["status", "phase"], json!("Pending")),
        _ => {}
    }
    crate::normalize::normalize(&res.kind, obj);
}

/// The pod defaults the API server adds, which show up in every live object and so in every drift check.
fn pod_spec_defaults(spec: &mut Value, restart_always: bool) {
    let Some(m) = spec.as_object_mut() else { return };
    if restart_always {
        m.entry("restartPolicy").or_insert(json!("Always"));
    }
    m.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    m.entry("schedulerName").or_insert(json!("default-scheduler"));
    m.entry("securityContext").or_insert(json!({}));
    m.entry("terminationGracePeriodSeconds").or_insert(json!(30));
    for field in ["initContainers", "containers"] {
        for c in m.get_mut(field).and_then(Value::as_array_mut).into_iter().flatten() {
            let Some(c) = c.as_object_mut() else { continue };
            let latest =
                c.get("image").and_then(Value::as_str).is_some_and(|i| i.ends_with(":latest") || !i.contains(':'));
            c.entry("imagePullPolicy").or_insert(json!(if latest { "Always" } else { "IfNotPresent" }));
            c.entry("terminationMessagePath").or_insert(json!("/dev/termination-log"));
            c.entry("terminationMessagePolicy").or_insert(json!("File"));
            c.entry("resources").or_insert(json!({}));
            for p in c.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                if let Some(p) = p.as_object_mut() {
                    p.entry("protocol").or_insert(json!("TCP"));
                }
            }
        }
    }
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

fn label_value_ok(v: &str) -> bool {
    v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

/// Validation errors as (field path, message) pairs, empty when the object is valid.
pub fn validate(res: &ResourceDef, obj: &Value) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    if name.is_empty() {
        errs.push(("metadata.name".into(), "Required value: name or generateName is required".into()));
    } else if ["Namespace", "Service"].contains(&res.kind.as_str()) && res.builtin {
        if !dns_label(name) {
            errs.push(("metadata.name".into(), format!("Invalid value: {name:?}: {LABEL_MSG}")));
        }
    } else if !(dns_subdomain(name) || res.builtin && res.group == "rbac.authorization.k8s.io") {
        errs.push(("metadata.name".into(), format!("Invalid value: {name:?}: {SUBDOMAIN_MSG}")));
    }
    if let Some(labels) = obj.pointer("/metadata/labels") {
        match labels.as_object() {
            Some(m) => {
                for (k, v) in m {
                    match v.as_str() {
                        Some(s) if label_value_ok(s) => {}
                        _ => errs.push((
                            "metadata.labels".into(),
                            format!("Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (label {k:?})"),
                        )),
                    }
                }
            }
            None => errs.push(("metadata.labels".into(), "Invalid value: must be a map of strings".into())),
        }
    }
    if !res.builtin {
        return errs;
    }
    match res.kind.as_str() {
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" => {
            validate_workload(obj, &mut errs);
        }
        "Job" => validate_pod_spec(obj.pointer("/spec/template/spec"), "spec.template.spec", &mut errs),
        "Pod" => validate_pod_spec(obj.pointer("/spec"), "spec", &mut errs),
        "Service" => {
            let t = obj.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP");
            let ports = obj.pointer("/spec/ports").and_then(Value::as_array);
            if t != "ExternalName"
                && obj.pointer("/spec/clusterIP") != Some(&json!("None"))
                && ports.is_none_or(Vec::is_empty)
            {
                errs.push(("spec.ports".into(), "Required value".into()));
            }
            for (i, p) in ports.into_iter().flatten().enumerate() {
                if !p.get("port").and_then(Value::as_i64).is_some_and(|n| (1..=65535).contains(&n)) {
                    errs.push((
                        format!("spec.ports[{i}].port"),
                        format!(
                            "Invalid value: {}: must be between 1 and 65535, inclusive",
                            p.get("port").unwrap_or(&Value::Null)
                        ),
                    ));
                }
            }
            if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&t) {
                errs.push(("spec.type".into(), format!("Unsupported value: {t:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"")));
            }
        }
        "ConfigMap" | "Secret" => {
            for field in ["data", "binaryData", "stringData"] {
                if let Some(m) = obj.get(field).and_then(Value::as_object) {
                    for k in m.keys() {
                        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                            errs.push((format!("{field}[{k}]"), format!("Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')")));
                        }
                    }
                }
            }
        }
        "CustomResourceDefinition" => {
            if let Err(e) = crate::resources::from_crd(obj) {
                let s = e.to_string();
                let (f, m) = s.split_once(": ").unwrap_or(("spec", &s));
                errs.push((f.to_string(), m.to_string()));
            }
        }
        _ => {}
    }
    errs
}

/// Fields the API server refuses to change once set, as (field path, message) pairs.
pub fn immutable(res: &ResourceDef, old: &Value, new: &Value) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    if !res.builtin {
        return errs;
    }
    let mut same = |path: &str, field: &str| {
        let (o, n) = (old.pointer(path), new.pointer(path));
        if o != n {
            let shown = n.map_or_else(|| "null".to_string(), Value::to_string);
            errs.push((field.to_string(), format!("Invalid value: {shown}: field is immutable")));
        }
    };
    match res.kind.as_str() {
        "Deployment" | "ReplicaSet" | "DaemonSet" => same("/spec/selector", "spec.selector"),
        "Job" => {
            same("/spec/selector", "spec.selector");
            same("/spec/template", "spec.template");
            same("/spec/completionMode", "spec.completionMode");
        }
        "Service" => {
            let ip = |v: &Value| v.pointer("/spec/clusterIP").cloned();
            let external = |v: &Value| v.pointer("/spec/type") == Some(&json!("ExternalName"));
            if ip(old).is_some() && ip(old) != ip(new) && !external(old) && !external(new) {
                same("/spec/clusterIP", "spec.clusterIP");
            }
        }
        "StatefulSet" => {
            const MUTABLE: &[&str] = &[
                "replicas",
                "ordinals",
                "template",
                "updateStrategy",
                "persistentVolumeClaimRetentionPolicy",
                "minReadySeconds",
            ];
            let rest = |v: &Value| -> Map<String, Value> {
                let mut m = v.get("spec").and_then(Value::as_object).cloned().unwrap_or_default();
                m.retain(|k, _| !MUTABLE.contains(&k.as_str()));
                m
            };
            if rest(old) != rest(new) {
                errs.push(("spec".into(), "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".into()));
            }
        }
        "PersistentVolumeClaim" => {
            let rest = |v: &Value| -> Map<String, Value> {
                let mut m = v.get("spec").and_then(Value::as_object).cloned().unwrap_or_default();
                // The binder fills volumeName; requests may grow (expansion).
                for k in ["resources", "volumeName", "volumeAttributesClassName"] {
                    m.shift_remove(k);
                }
                m
            };
            if rest(old) != rest(new) {
                errs.push(("spec".into(), "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims".into()));
            }
        }
        "ConfigMap" | "Secret" if old.get("immutable") == Some(&json!(true)) => {
            for f in ["data", "binaryData"] {
                if old.get(f) != new.get(f) {
                    errs.push((f.into(), "Forbidden: field is immutable when `immutable` is set".into()));
                }
            }
            if new.get("immutable") != Some(&json!(true)) {
                errs.push(("immutable".into(), "Forbidden: field is immutable when `immutable` is set".into()));
            }
        }
        _ => {}
    }
    errs
}

fn validate_workload(obj: &Value, errs: &mut Vec<(String, String)>) {
    match obj.pointer("/spec/selector") {
        None => errs.push(("spec.selector".into(), "Required value".into())),
        Some(sel) => {
            let tmpl = obj.pointer("/spec/template/metadata/labels").and_then(Value::as_object);
            let ml = sel.get("matchLabels").and_then(Value::as_object);
            if ml.is_none_or(Map::is_empty) && sel.get("matchExpressions").is_none() {
                errs.push((
                    "spec.selector".into(),
                    "Invalid value: {}: empty selector is invalid for deployment".into(),
                ));
            }
            let ok = ml.into_iter().flatten().all(|(k, v)| tmpl.and_then(|t| t.get(k)) == Some(v));
            if !ok {
                errs.push((
                    "spec.template.metadata.labels".into(),
                    format!(
                        "Invalid value: {}: `selector` does not match template `labels`",
                        Value::Object(tmpl.cloned().unwrap_or_default())
                    ),
                ));
            }
        }
    }
    validate_pod_spec(obj.pointer("/spec/template/spec"), "spec.template.spec", errs);
}

fn validate_pod_spec(spec: Option<&Value>, at: &str, errs: &mut Vec<(String, String)>) {
    let containers = spec.and_then(|s| s.get("containers")).and_then(Value::as_array);
    match containers {
        None => errs.push((format!("{at}.containers"), "Required value".into())),
        Some(cs) if cs.is_empty() => errs.push((format!("{at}.containers"), "Required value".into())),
        Some(cs) => {
            for (i, c) in cs.iter().enumerate() {
                if c.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
                    errs.push((format!("{at}.containers[{i}].name"), "Required value".into()));
                }
                if c.get("image").and_then(Value::as_str).is_none_or(str::is_empty) {
                    errs.push((format!("{at}.containers[{i}].image"), "Required value".into()));
                }
            }
        }
    }
}

/// Every image a workload's pods run.
pub fn images(obj: &Value) -> Vec<String> {
    let spec = obj.pointer("/spec/template/spec").or_else(|| obj.pointer("/spec"));
    let mut out = Vec::new();
    for field in ["initContainers", "containers"] {
        for c in spec.and_then(|s| s.get(field)).and_then(Value::as_array).into_iter().flatten() {
            if let Some(i) = c.get("image").and_then(Value::as_str) {
                out.push(i.to_string());
            }
        }
    }
    out
}

/// An object marked for deletion whose finalizers are all gone leaves the store.
pub fn is_gone(res: &ResourceDef, obj: &Value) -> bool {
    let empty = |p: &str| obj.pointer(p).and_then(Value::as_array).is_none_or(Vec::is_empty);
    obj.pointer("/metadata/deletionTimestamp").is_some()
        && empty("/metadata/finalizers")
        && (!(res.builtin && res.kind == "Namespace") || empty("/spec/finalizers"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::builtins;

    fn def(kind: &str) -> std::sync::Arc<ResourceDef> {
        builtins().into_iter().find(|d| d.kind == kind).unwrap()
    }

    #[test]
    fn deployment_selector_must_match_template() {
        let d = json!({"metadata": {"name": "web"}, "spec": {"selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "other"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let errs = validate(&def("Deployment"), &d);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, "spec.template.metadata.labels");
    }

    #[test]
    fn names_are_checked() {
        let errs = validate(&def("ConfigMap"), &json!({"metadata": {"name": "Bad_Name"}}));
        assert_eq!(errs[0].0, "metadata.name");
        let errs = validate(&def("ConfigMap"), &json!({"metadata": {}}));
        assert!(errs[0].1.starts_with("Required value"));
        assert!(validate(&def("Namespace"), &json!({"metadata": {"name": "a.b"}})).len() == 1);
        assert!(validate(&def("ConfigMap"), &json!({"metadata": {"name": "a.b"}})).is_empty());
    }

    #[test]
    fn service_defaults_keep_cluster_ip() {
        let svc = def("Service");
        let mut a = json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}});
        apply_defaults(&svc, &mut a, None);
        assert_eq!(a["spec"]["ports"][0]["targetPort"], json!(80));
        let ip = a["spec"]["clusterIP"].clone();
        let mut b = json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"ports": [{"port": 81}]}});
        apply_defaults(&svc, &mut b, Some(&a));
        assert_eq!(b["spec"]["clusterIP"], ip);
    }

    #[test]
    fn generation_ignores_metadata_and_status() {
        let a = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"x": 1}, "status": {"y": 1}});
        let b = json!({"metadata": {"labels": {"a": "2"}}, "spec": {"x": 1}, "status": {"y": 2}});
        assert!(!spec_changed(&a, &b));
        let c = json!({"metadata": {}, "spec": {"x": 2}});
        assert!(spec_changed(&a, &c));
    }
}
