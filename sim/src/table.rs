//! Server-side printing (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), which `kubectl get`
//! asks for: the columns kubectl shows for the built-in kinds, and a CRD's additionalPrinterColumns.

use crate::resources::ResourceDef;
use serde_json::{json, Value};

/// kubectl's HumanDuration.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 730 {
        format!("{d}d")
    } else if d < 2920 {
        format!("{}y{}d", d / 365, d % 365)
    } else {
        format!("{}y", d / 365)
    }
}

fn age(obj: &Value) -> String {
    obj.pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| human_duration((chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()))
        .unwrap_or_else(|| "<unknown>".into())
}

fn n(obj: &Value, p: &str) -> i64 {
    obj.pointer(p).and_then(Value::as_i64).unwrap_or(0)
}

fn st<'a>(obj: &'a Value, p: &str) -> &'a str {
    obj.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn col(name: &str, type_: &str, priority: i64) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": type_, "format": format, "description": "", "priority": priority})
}

fn images(obj: &Value) -> (String, String) {
    let cs = obj.pointer("/spec/template/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<&str> = cs.iter().map(|c| st(c, "/name")).collect();
    let imgs: Vec<&str> = cs.iter().map(|c| st(c, "/image")).collect();
    (names.join(","), imgs.join(","))
}

fn selector(obj: &Value) -> String {
    obj.pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(","))
        .unwrap_or_else(|| "<none>".into())
}

fn len_of(obj: &Value, p: &str) -> i64 {
    obj.pointer(p).and_then(Value::as_object).map_or(0, |m| m.len() as i64)
}

/// Evaluates the simple JSONPath subset CRD printer columns use (`.spec.replicas`, `.status.conditions[0].type`,
/// `.status.conditions[?(@.type=="Ready")].status`).
pub fn json_path(obj: &Value, path: &str) -> Value {
    let mut cur = obj.clone();
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}').trim_start_matches('.');
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        if !field.is_empty() {
            cur = cur.get(field).cloned().unwrap_or(Value::Null);
        }
        rest = tail;
        if let Some(t) = rest.strip_prefix('[') {
            let close = t.find(']').unwrap_or(t.len());
            let idx = &t[..close];
            rest = t.get(close + 1..).unwrap_or("");
            if let Some(filter) = idx.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (k, v) = filter.split_once("==").unwrap_or((filter, ""));
                let v = v.trim_matches(|c| c == '"' || c == '\'');
                cur = cur
                    .as_array()
                    .and_then(|a| a.iter().find(|i| i.get(k).and_then(Value::as_str) == Some(v)).cloned())
                    .unwrap_or(Value::Null);
            } else if let Ok(i) = idx.parse::<usize>() {
                cur = cur.get(i).cloned().unwrap_or(Value::Null);
            }
        }
        rest = rest.trim_start_matches('.');
    }
    cur
}

/// Column definitions and the cells of one object.
fn columns(res: &ResourceDef) -> Vec<Value> {
    let mut cols = vec![col("Name", "string", 0)];
    let extra: &[(&str, &str, i64)] = if !res.builtin {
        &[]
    } else {
        match res.kind.as_str() {
            "Deployment" => &[
                ("Ready", "string", 0),
                ("Up-to-date", "integer", 0),
                ("Available", "integer", 0),
                ("Age", "string", 0),
                ("Containers", "string", 1),
                ("Images", "string", 1),
                ("Selector", "string", 1),
            ],
            "StatefulSet" => {
                &[("Ready", "string", 0), ("Age", "string", 0), ("Containers", "string", 1), ("Images", "string", 1)]
            }
            "ReplicaSet" => {
                &[("Desired", "integer", 0), ("Current", "integer", 0), ("Ready", "integer", 0), ("Age", "string", 0)]
            }
            "DaemonSet" => &[
                ("Desired", "integer", 0),
                ("Current", "integer", 0),
                ("Ready", "integer", 0),
                ("Up-to-date", "integer", 0),
                ("Available", "integer", 0),
                ("Node Selector", "string", 0),
                ("Age", "string", 0),
            ],
            "Pod" => {
                &[("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0), ("Age", "string", 0)]
            }
            "Namespace" => &[("Status", "string", 0), ("Age", "string", 0)],
            "ConfigMap" => &[("Data", "integer", 0), ("Age", "string", 0)],
            "Secret" => &[("Type", "string", 0), ("Data", "integer", 0), ("Age", "string", 0)],
            "Service" => &[
                ("Type", "string", 0),
                ("Cluster-IP", "string", 0),
                ("External-IP", "string", 0),
                ("Port(s)", "string", 0),
                ("Age", "string", 0),
                ("Selector", "string", 1),
            ],
            "Job" => &[("Status", "string", 0), ("Completions", "string", 0), ("Age", "string", 0)],
            "PersistentVolumeClaim" => &[
                ("Status", "string", 0),
                ("Capacity", "string", 0),
                ("Access Modes", "string", 0),
                ("Age", "string", 0),
            ],
            "CustomResourceDefinition" => &[("Created At", "date", 0)],
            _ => &[("Age", "string", 0)],
        }
    };
    for (name, t, p) in extra {
        cols.push(col(name, t, *p));
    }
    if !res.builtin {
        for pc in &res.printer_columns {
            cols.push(col(&pc.name, &pc.type_, pc.priority));
        }
        if !res.printer_columns.iter().any(|p| p.name == "Age") {
            cols.push(col("Age", "date", 0));
        }
    }
    cols
}

fn cells(res: &ResourceDef, o: &Value) -> Vec<Value> {
    let name = json!(st(o, "/metadata/name"));
    if !res.builtin {
        let mut v = vec![name];
        for pc in &res.printer_columns {
            let cell = json_path(o, &pc.json_path);
            // The API server prints date columns as ages, as it does for built-in kinds.
            let cell = match (pc.type_.as_str(), cell.as_str()) {
                ("date", Some(t)) => chrono::DateTime::parse_from_rfc3339(t)
                    .map(|t| json!(human_duration((chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds())))
                    .unwrap_or(cell),
                _ => cell,
            };
            v.push(cell);
        }
        if !res.printer_columns.iter().any(|p| p.name == "Age") {
            v.push(json!(age(o)));
        }
        return v;
    }
    let a = json!(age(o));
    match res.kind.as_str() {
        "Deployment" => {
            let (c, i) = images(o);
            vec![
                name,
                json!(format!("{}/{}", n(o, "/status/readyReplicas"), n(o, "/spec/replicas"))),
                json!(n(o, "/status/updatedReplicas")),
                json!(n(o, "/status/availableReplicas")),
                a,
                json!(c),
                json!(i),
                json!(selector(o)),
            ]
        }
        "StatefulSet" => {
            let (c, i) = images(o);
            vec![
                name,
                json!(format!("{}/{}", n(o, "/status/readyReplicas"), n(o, "/spec/replicas"))),
                a,
                json!(c),
                json!(i),
            ]
        }
        "ReplicaSet" => vec![
            name,
            json!(n(o, "/spec/replicas")),
            json!(n(o, "/status/replicas")),
            json!(n(o, "/status/readyReplicas")),
            a,
        ],
        "DaemonSet" => {
            let ns = o
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                json!(n(o, "/status/desiredNumberScheduled")),
                json!(n(o, "/status/currentNumberScheduled")),
                json!(n(o, "/status/numberReady")),
                json!(n(o, "/status/updatedNumberScheduled")),
                json!(n(o, "/status/numberAvailable")),
                json!(ns),
                a,
            ]
        }
        "Pod" => {
            let total = o.pointer("/spec/containers").and_then(Value::as_array).map_or(0, Vec::len);
            let ready = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |cs| cs.iter().filter(|c| c["ready"] == json!(true)).count());
            let waiting = o.pointer("/status/containerStatuses/0/state/waiting/reason").and_then(Value::as_str);
            let phase = waiting.unwrap_or_else(|| st(o, "/status/phase"));
            vec![name, json!(format!("{ready}/{total}")), json!(phase), json!("0"), a]
        }
        "Namespace" => vec![name, json!(st(o, "/status/phase")), a],
        "ConfigMap" => vec![name, json!(len_of(o, "/data") + len_of(o, "/binaryData")), a],
        "Secret" => vec![name, json!(st(o, "/type")), json!(len_of(o, "/data")), a],
        "Service" => {
            let t = st(o, "/spec/type");
            let ext = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|i| i.iter().filter_map(|x| x["ip"].as_str()).collect::<Vec<_>>().join(","));
            let ext = match (t, ext) {
                ("LoadBalancer", Some(e)) if !e.is_empty() => e,
                ("LoadBalancer", _) => "<pending>".into(),
                _ => "<none>".into(),
            };
            let ports = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter().map(|p| format!("{}/{}", p["port"], st(p, "/protocol"))).collect::<Vec<_>>().join(",")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "<none>".into());
            let sel = o
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")
                })
                .unwrap_or_else(|| "<none>".into());
            let ip = o.pointer("/spec/clusterIP").and_then(Value::as_str).unwrap_or("<none>");
            vec![name, json!(t), json!(ip), json!(ext), json!(ports), a, json!(sel)]
        }
        "Job" => {
            let conds = o.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
            let has = |t: &str| conds.iter().any(|c| c["type"] == t && c["status"] == "True");
            let status = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else {
                "Running"
            };
            vec![
                name,
                json!(status),
                json!(format!("{}/{}", n(o, "/status/succeeded"), n(o, "/spec/completions").max(1))),
                a,
            ]
        }
        "PersistentVolumeClaim" => {
            let modes = o
                .pointer("/status/accessModes")
                .and_then(Value::as_array)
                .map(|m| {
                    m.iter()
                        .filter_map(Value::as_str)
                        .map(|m| match m {
                            "ReadWriteOnce" => "RWO",
                            "ReadOnlyMany" => "ROX",
                            "ReadWriteMany" => "RWX",
                            other => other,
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![name, json!(st(o, "/status/phase")), json!(st(o, "/status/capacity/storage")), json!(modes), a]
        }
        "CustomResourceDefinition" => {
            vec![name, o.pointer("/metadata/creationTimestamp").cloned().unwrap_or(Value::Null)]
        }
        _ => vec![name, a],
    }
}

fn row_object(o: &Value, include: &str) -> Value {
    match include {
        "None" => Value::Null,
        "Object" => o.clone(),
        _ => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o.get("metadata").cloned().unwrap_or(json!({}))})
        }
    }
}

/// A Table of the given objects.
pub fn table(res: &ResourceDef, objs: &[Value], list_meta: Value, include: &str) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut r = json!({"cells": cells(res, o)});
            let obj = row_object(o, include);
            if !obj.is_null() {
                r["object"] = obj;
            }
            r
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "columnDefinitions": columns(res), "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(86400 * 3), "3d");
    }

    #[test]
    fn json_path_subset() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]}, "spec": {"replicas": 3}});
        assert_eq!(json_path(&o, ".spec.replicas"), json!(3));
        assert_eq!(json_path(&o, ".status.conditions[0].type"), json!("A"));
        assert_eq!(json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"), json!("True"));
        assert_eq!(json_path(&o, ".missing.x"), Value::Null);
    }

    #[test]
    fn every_row_has_a_cell_per_column() {
        for res in crate::resources::builtins() {
            let o = json!({"metadata": {"name": "x", "creationTimestamp": "2026-01-01T00:00:00Z"}});
            let t = table(&res, &[o], json!({}), "Metadata");
            assert_eq!(
                t["rows"][0]["cells"].as_array().unwrap().len(),
                t["columnDefinitions"].as_array().unwrap().len(),
                "{}",
                res.kind
            );
        }
    }
}
