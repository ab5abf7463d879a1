//! Drift: where a live object differs from what was applied, free of I/O.
//!
//! Only the fields the desired object sets are compared (what the agent applies and owns); fields other
//! controllers add (defaults, status) are not drift. Lists of objects with a `name` are matched by name, as
//! server-side apply merges them; other lists are compared whole. Ignored paths (JSON pointers, a prefix
//! covers everything below it) are skipped: fields another controller owns by design, such as replicas under
//! an autoscaler.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftItem {
    /// JSON pointer (`/spec/replicas`).
    pub path: String,
    pub desired: Value,
    /// `null` when the live object lacks the field.
    pub live: Value,
}

fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

fn ignored(path: &str, ignore: &[String]) -> bool {
    ignore.iter().any(|i| path == i || path.starts_with(&format!("{i}/")))
}

fn walk(path: &str, desired: &Value, live: &Value, ignore: &[String], out: &mut Vec<DriftItem>) {
    if ignored(path, ignore) {
        return;
    }
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => {
            for (k, dv) in d {
                let p = format!("{path}/{}", escape(k));
                walk(&p, dv, l.get(k).unwrap_or(&Value::Null), ignore, out);
            }
        }
        (Value::Array(d), Value::Array(l))
            if d.iter().all(|e| e.get("name").and_then(Value::as_str).is_some()) && !d.is_empty() =>
        {
            for de in d {
                let name = de.get("name").and_then(Value::as_str).unwrap_or_default();
                let p = format!("{path}/{}", escape(name));
                match l.iter().find(|le| le.get("name").and_then(Value::as_str) == Some(name)) {
                    Some(le) => walk(&p, de, le, ignore, out),
                    None => out.push(DriftItem { path: p, desired: de.clone(), live: Value::Null }),
                }
            }
        }
        (Value::Array(d), Value::Array(l)) if d.len() == l.len() && d.iter().all(Value::is_object) => {
            for (i, (de, le)) in d.iter().zip(l).enumerate() {
                walk(&format!("{path}/{i}"), de, le, ignore, out);
            }
        }
        (d, l) if d == l => {}
        // Numbers may come back as floats of the same value.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (d, l) => out.push(DriftItem { path: path.to_string(), desired: d.clone(), live: l.clone() }),
    }
}

/// The fields of `desired` whose live value differs. `metadata` is compared for labels and annotations only;
/// `status` never.
pub fn drift(desired: &Value, live: &Value, ignore: &[String]) -> Vec<DriftItem> {
    let mut out = Vec::new();
    let (Some(d), Some(l)) = (desired.as_object(), live.as_object()) else { return out };
    for (k, dv) in d {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for field in ["labels", "annotations"] {
                    if let Some(dm) = dv.get(field) {
                        let lm = l.get("metadata").and_then(|m| m.get(field)).unwrap_or(&Value::Null);
                        let lm = if lm.is_null() { &Value::Object(Default::default()) } else { lm };
                        walk(&format!("/metadata/{field}"), dm, lm, ignore, &mut out);
                    }
                }
            }
            _ => walk(&format!("/{}", escape(k)), dv, l.get(k).unwrap_or(&Value::Null), ignore, &mut out),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desired() -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "image": "web:1"}]}}}})
    }

    #[test]
    fn defaults_and_status_are_not_drift() {
        let mut live = desired();
        live["metadata"]["resourceVersion"] = json!("7");
        live["metadata"]["labels"]["extra"] = json!("x");
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("IfNotPresent");
        live["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "sidecar", "image": "s"}));
        live["spec"]["strategy"] = json!({"type": "RollingUpdate"});
        live["status"] = json!({"replicas": 2});
        assert_eq!(drift(&desired(), &live, &[]), vec![]);
    }

    #[test]
    fn hand_edits_are_drift_with_path_and_values() {
        let mut live = desired();
        live["spec"]["replicas"] = json!(5);
        live["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:hacked");
        live["metadata"]["labels"]["app"] = json!("other");
        let items = drift(&desired(), &live, &[]);
        assert_eq!(
            items,
            vec![
                DriftItem { path: "/metadata/labels/app".into(), desired: json!("web"), live: json!("other") },
                DriftItem { path: "/spec/replicas".into(), desired: json!(2), live: json!(5) },
                DriftItem {
                    path: "/spec/template/spec/containers/web/image".into(),
                    desired: json!("web:1"),
                    live: json!("web:hacked")
                },
            ]
        );
        assert_eq!(
            drift(&desired(), &live, &["/spec/replicas".into(), "/metadata/labels".into(), "/spec/template".into()]),
            vec![]
        );
    }

    #[test]
    fn removed_fields_are_drift() {
        let mut live = desired();
        live["spec"].as_object_mut().unwrap().remove("replicas");
        live["spec"]["template"]["spec"]["containers"] = json!([]);
        let items = drift(&desired(), &live, &[]);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], DriftItem { path: "/spec/replicas".into(), desired: json!(2), live: Value::Null });
    }

    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            "[a-z]{0,4}".prop_map(Value::from)
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map("[a-c]{1,2}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// An object never drifts from itself, and ignoring every top-level field hides all drift.
        #[test]
        fn no_drift_from_itself(spec in json_value(), other in json_value()) {
            let d = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "spec": spec});
            prop_assert!(drift(&d, &d, &[]).is_empty());
            let l = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "spec": other});
            prop_assert!(drift(&d, &l, &["/spec".into()]).is_empty());
            for item in drift(&d, &l, &[]) {
                prop_assert!(item.path.starts_with("/spec"));
            }
        }
    }
}
