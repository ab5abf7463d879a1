//! Objects checked against their schema as the API server decodes them: fields the schema does not declare
//! are dropped (built-in kinds always; custom resources unless the schema preserves unknown fields), and
//! reported so that `fieldValidation=Strict` (kubectl's default) can refuse them; a value of the wrong type
//! is refused whatever the validation level.

use serde_json::{Map, Value};

/// `fieldValidation`: what unknown fields do to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    /// The API server's default: dropped, with a warning.
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> Result<FieldValidation, String> {
        match s {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            )),
        }
    }
}

/// What checking an object found.
#[derive(Debug, Default, PartialEq)]
pub struct Findings {
    /// Paths of undeclared fields (now removed), as `spec.template.spec.containers[0].foo`.
    pub unknown: Vec<String>,
    /// (path, expected type, the JSON type found).
    pub wrong_type: Vec<(String, String, &'static str)>,
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Checks `v` against `schema` (component schemas referenced by `$ref` are looked up in `components`),
/// removing undeclared fields. At the top level `apiVersion`, `kind` and `metadata` are always allowed.
pub fn check(schema: &Value, components: &Map<String, Value>, v: &mut Value) -> Findings {
    let mut f = Findings::default();
    walk(schema, components, v, "", true, &mut f);
    f
}

fn walk(schema: &Value, components: &Map<String, Value>, v: &mut Value, path: &str, top: bool, f: &mut Findings) {
    let s = crate::openapi::resolve(schema, components);
    if v.is_null() {
        return;
    }
    if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            f.wrong_type.push((path.to_string(), "int-or-string".into(), json_type(v)));
        }
        return;
    }
    let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let ty = s.get("type").and_then(Value::as_str);
    match (ty, &mut *v) {
        (Some("object"), Value::Object(m)) | (None, Value::Object(m)) => {
            let props = s.get("properties").and_then(Value::as_object);
            let extra = s.get("additionalProperties").filter(|a| a.is_object());
            if props.is_none() && extra.is_none() {
                return; // free-form (RawExtension, JSON, an open object)
            }
            let mut gone = Vec::new();
            for (k, child) in m.iter_mut() {
                let p = join(path, k);
                if let Some(cs) = props.and_then(|ps| ps.get(k)) {
                    walk(cs, components, child, &p, false, f);
                } else if let Some(cs) = extra {
                    walk(cs, components, child, &p, false, f);
                } else if top && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                } else if !preserve {
                    gone.push(k.clone());
                    f.unknown.push(p);
                }
            }
            for k in gone {
                m.shift_remove(&k);
            }
        }
        (Some("array"), Value::Array(items)) => {
            if let Some(is) = s.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(is, components, item, &format!("{path}[{i}]"), false, f);
                }
            }
        }
        (Some("string"), Value::String(_)) | (Some("boolean"), Value::Bool(_)) => {}
        (Some("integer"), Value::Number(n)) if n.is_i64() || n.is_u64() => {}
        (Some("number"), Value::Number(_)) => {}
        (Some(t), other) if !preserve => f.wrong_type.push((path.to_string(), t.to_string(), json_type(other))),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> &'static Value {
        crate::openapi::schema_of("apps", "v1", "Deployment").unwrap()
    }

    #[test]
    fn unknown_fields_are_removed_and_named() {
        let c = &crate::openapi::catalogue().schemas;
        let mut d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x", "labels": {"a": "b"}},
            "spec": {"replicas": 2, "replicass": 3, "selector": {"matchLabels": {"a": "b"}},
                "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagePullPolice": "x",
                    "resources": {"limits": {"cpu": "1"}}}]}}},
            "extra": true});
        let f = check(deployment(), c, &mut d);
        assert_eq!(f.unknown, vec!["spec.replicass", "spec.template.spec.containers[0].imagePullPolice", "extra"]);
        assert!(f.wrong_type.is_empty(), "{:?}", f.wrong_type);
        assert!(d["spec"].get("replicass").is_none() && d.get("extra").is_none());
        assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"], "1");
    }

    #[test]
    fn wrong_types_are_found() {
        let c = &crate::openapi::catalogue().schemas;
        let mut d = json!({"spec": {"replicas": "two", "strategy": {"rollingUpdate": {"maxSurge": true}},
            "template": {"spec": {"volumes": [{"name": "v", "configMap": {"name": "c", "defaultMode": "0644"}}]}}}});
        let f = check(deployment(), c, &mut d);
        assert_eq!(
            f.wrong_type,
            vec![
                ("spec.replicas".into(), "integer".into(), "string"),
                ("spec.strategy.rollingUpdate.maxSurge".into(), "int-or-string".into(), "bool"),
                ("spec.template.spec.volumes[0].configMap.defaultMode".into(), "integer".into(), "string"),
            ]
        );
    }

    #[test]
    fn custom_resources_follow_their_crd_schema() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"size": {"type": "integer"}, "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}});
        let mut o = json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "a"},
            "spec": {"size": 1, "colour": "red", "free": {"anything": [1]}}});
        let f = check(&schema, &Map::new(), &mut o);
        assert_eq!(f.unknown, vec!["spec.colour"]);
        assert_eq!(o["spec"]["free"]["anything"], json!([1]));
        assert_eq!(FieldValidation::parse(Some("Strict")), Ok(FieldValidation::Strict));
        assert!(FieldValidation::parse(Some("strict")).is_err());
    }
}

/// Paths of fields given twice in one JSON object of `body` (`spec.replicas`), which a JSON parser would
/// otherwise resolve silently (the last wins). Empty when the body is not JSON.
pub fn duplicate_fields(body: &[u8]) -> Vec<String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Walk<'a> {
        path: String,
        found: &'a mut Vec<String>,
    }
    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
            let mut i = 0;
            while a.next_element_seed(Walk { path: format!("{}[{i}]", self.path), found: &mut *self.found })?.is_some()
            {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = a.next_key::<String>()? {
                let path = join(&self.path, &k);
                if !seen.insert(k) {
                    self.found.push(path.clone());
                }
                a.next_value_seed(Walk { path, found: &mut *self.found })?;
            }
            Ok(())
        }
    }
    let mut found = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = Walk { path: String::new(), found: &mut found }.deserialize(&mut de);
    found
}

#[cfg(test)]
mod duplicate_tests {
    #[test]
    fn duplicate_fields_are_found_with_their_path() {
        let body = br#"{"spec": {"replicas": 1, "replicas": 2, "template": {"spec": {"containers": [{"name": "a", "name": "b"}]}}}, "kind": "x"}"#;
        assert_eq!(super::duplicate_fields(body), vec!["spec.replicas", "spec.template.spec.containers[0].name"]);
        assert!(super::duplicate_fields(br#"{"a": {"b": 1}, "c": {"b": 2}}"#).is_empty());
        assert!(super::duplicate_fields(b"kind: [yaml").is_empty());
    }
}
