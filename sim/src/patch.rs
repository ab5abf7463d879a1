//! The patch types of the Kubernetes API: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and
//! strategic merge patch, the last as far as kubectl's own commands use it (keyed list merges, `$patch`
//! directives, `$retainKeys`, `$deleteFromPrimitiveList`, `$setElementOrder`).

use crate::fields::{list_type, ListType};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml")]
    Malformed(#[source] serde_json::Error),
    #[error("{0}")]
    JsonPatchFailed(String),
    #[error("strategic merge patch: {0}")]
    Invalid(String),
}

pub fn json_patch(target: &Value, body: &[u8]) -> Result<Value, PatchError> {
    let p: json_patch::Patch = serde_json::from_slice(body).map_err(PatchError::Malformed)?;
    let mut out = target.clone();
    json_patch::patch(&mut out, &p).map_err(|e| PatchError::JsonPatchFailed(e.to_string()))?;
    Ok(out)
}

pub fn merge_patch(target: &Value, body: &[u8]) -> Result<Value, PatchError> {
    let p: Value = serde_json::from_slice(body).map_err(PatchError::Malformed)?;
    if !p.is_object() {
        return Err(PatchError::Invalid("patch body must be a JSON object".into()));
    }
    let mut out = target.clone();
    json_patch::merge(&mut out, &p);
    Ok(out)
}

pub fn strategic_merge_patch(target: &Value, body: &[u8], builtin: bool) -> Result<Value, PatchError> {
    let p: Value = serde_json::from_slice(body).map_err(PatchError::Malformed)?;
    let Value::Object(pm) = p else {
        return Err(PatchError::Invalid("patch body must be a JSON object".into()));
    };
    let mut names = Vec::new();
    smp_obj(target.as_object().cloned().unwrap_or_default(), &pm, &mut names, builtin)
}

fn smp_obj(
    mut target: Map<String, Value>,
    patch: &Map<String, Value>,
    names: &mut Vec<String>,
    builtin: bool,
) -> Result<Value, PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut p = patch.clone();
            p.shift_remove("$patch");
            return Ok(Value::Object(p));
        }
        Some("delete") => return Ok(Value::Null),
        Some(other) if other != "merge" => {
            return Err(PatchError::Invalid(format!("unknown patch type: {other}")));
        }
        _ => {}
    }
    if let Some(keep) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, pv) in patch {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(del)) = (target.get_mut(field), pv.as_array()) {
                items.retain(|i| !del.contains(i));
            }
            continue;
        }
        if pv.is_null() {
            target.shift_remove(k);
            continue;
        }
        names.push(k.clone());
        let merged = match (target.shift_remove(k), pv) {
            (Some(Value::Object(t)), Value::Object(p)) => smp_obj(t, p, names, builtin)?,
            (Some(Value::Array(t)), Value::Array(p)) => smp_list(t, p, names, builtin)?,
            (None, Value::Object(p)) => smp_obj(Map::new(), p, names, builtin)?,
            (None, Value::Array(p)) => smp_list(Vec::new(), p, names, builtin)?,
            (_, v) => v.clone(),
        };
        names.pop();
        if !merged.is_null() {
            target.insert(k.clone(), merged);
        }
    }
    Ok(Value::Object(target))
}

fn smp_list(target: Vec<Value>, patch: &[Value], names: &mut Vec<String>, builtin: bool) -> Result<Value, PatchError> {
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let lt = match list_type(builtin, &refs) {
        // Strategic merge on metadata.finalizers replaces; only keyed lists merge.
        ListType::Set => ListType::Atomic,
        other => other,
    };
    let ListType::Map(keys) = lt else {
        if patch.iter().any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace")) {
            return Ok(Value::Array(patch.iter().filter(|p| p.get("$patch").is_none()).cloned().collect()));
        }
        return Ok(Value::Array(patch.to_vec()));
    };
    let key = keys[0];
    let mut out = target;
    for item in patch {
        if item.get("$patch").and_then(Value::as_str) == Some("replace") {
            return Ok(Value::Array(patch.iter().filter(|p| p.get("$patch").is_none()).cloned().collect()));
        }
        let Some(kv) = item.get(key) else {
            return Err(PatchError::Invalid(format!("map: {item} does not contain declared merge key: {key}")));
        };
        let pos = out.iter().position(|t| t.get(key) == Some(kv));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => {
                let t = out[i].as_object().cloned().unwrap_or_default();
                out[i] = smp_obj(t, item.as_object().unwrap_or(&Map::new()), names, builtin)?;
            }
            (None, false) => out.push(smp_obj(Map::new(), item.as_object().unwrap_or(&Map::new()), names, builtin)?),
        }
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deploy() -> Value {
        json!({"metadata": {"name": "web", "labels": {"a": "1"}},
               "spec": {"template": {"spec": {"containers": [
                   {"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}]},
                   {"name": "side", "image": "envoy"}]}}}})
    }

    #[test]
    fn smp_merges_containers_by_name() {
        let p = br#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:2"}]}}}}"#;
        let out = strategic_merge_patch(&deploy(), p, true).unwrap();
        let c = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["image"], json!("nginx:2"));
        assert_eq!(c[0]["env"][0]["name"], json!("A"));
        assert_eq!(c[1]["name"], json!("side"));
    }

    #[test]
    fn smp_directives() {
        let p = br#"{"metadata":{"labels":{"a":null,"b":"2"}},"spec":{"template":{"spec":{"containers":[{"name":"side","$patch":"delete"}]}}}}"#;
        let out = strategic_merge_patch(&deploy(), p, true).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["spec"]["template"]["spec"]["containers"].as_array().unwrap().len(), 1);
        let p = br#"{"spec":{"template":{"spec":{"containers":[{"name":"x","image":"y"}],"$setElementOrder/containers":[{"name":"x"}]}}}}"#;
        let out = strategic_merge_patch(&deploy(), p, true).unwrap();
        assert_eq!(out["spec"]["template"]["spec"]["containers"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn smp_keyed_item_without_key_is_an_error() {
        let p = br#"{"spec":{"template":{"spec":{"containers":[{"image":"y"}]}}}}"#;
        assert!(strategic_merge_patch(&deploy(), p, true).is_err());
    }

    proptest::proptest! {
        /// Arbitrary bodies never panic any patch type; they succeed or fail with an error.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), text in "[\\[\\]{}\":,a-z0-9$ ]{0,60}") {
            for b in [body.as_slice(), text.as_bytes()] {
                let _ = strategic_merge_patch(&deploy(), b, true);
                let _ = merge_patch(&deploy(), b);
                let _ = json_patch(&deploy(), b);
            }
        }
    }

    #[test]
    fn json_and_merge_patch() {
        let out = json_patch(&deploy(), br#"[{"op":"replace","path":"/metadata/name","value":"x"}]"#).unwrap();
        assert_eq!(out["metadata"]["name"], json!("x"));
        assert!(json_patch(&deploy(), br#"[{"op":"test","path":"/metadata/name","value":"x"}]"#).is_err());
        let out = merge_patch(&deploy(), br#"{"spec":{"template":null}}"#).unwrap();
        assert_eq!(out["spec"], json!({}));
        assert!(matches!(merge_patch(&deploy(), b"{nope"), Err(PatchError::Malformed(_))));
    }
}
