//! Label and field selectors with the syntax and error messages of the Kubernetes API.

use serde_json::Value;

/// A parsed `labelSelector` query parameter (the parser and the matching rules are the fleet's own,
/// `flotilla_common::selector`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(flotilla_common::selector::LabelSelector);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(pub String);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        s.parse().map(LabelSelector).map_err(SelectorError)
    }

    pub fn is_empty(&self) -> bool {
        self.0.match_labels.is_empty() && self.0.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        if self.is_empty() {
            return true;
        }
        let labels: std::collections::BTreeMap<String, String> =
            labels.into_iter().flatten().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect();
        self.0.matches(&labels)
    }

    pub fn matches_object(&self, obj: &Value) -> bool {
        self.matches(obj.pointer("/metadata/labels").and_then(Value::as_object))
    }
}

/// A parsed `fieldSelector`: the API server supports `metadata.name` and `metadata.namespace` on every kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut out = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(out));
        }
        for part in s.split(',') {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(SelectorError(format!("invalid selector: '{s}'; can't understand '{part}'")));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(SelectorError(format!("field label not supported: {field}")));
            }
            out.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches_object(&self, obj: &Value) -> bool {
        self.0.iter().all(|(f, eq, v)| {
            let ptr = if f == "metadata.name" { "/metadata/name" } else { "/metadata/namespace" };
            let actual = obj.pointer(ptr).and_then(Value::as_str).unwrap_or("");
            (actual == v) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selector_operators() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=web,tier=back", false),
            ("app in (db),tier", false),
            ("missing notin (x)", true),
            ("", true),
        ] {
            assert_eq!(LabelSelector::parse(sel).unwrap().matches_object(&o), want, "{sel}");
        }
    }

    #[test]
    fn label_selector_rejects_garbage() {
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a=b=c").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,40}") {
            let _ = LabelSelector::parse(&s);
            let _ = FieldSelector::parse(&s);
        }
    }

    #[test]
    fn field_selector_name_and_namespace() {
        let o = obj(json!({}));
        assert!(FieldSelector::parse("metadata.name=a").unwrap().matches_object(&o));
        assert!(!FieldSelector::parse("metadata.name!=a").unwrap().matches_object(&o));
        assert!(FieldSelector::parse("metadata.namespace==ns,metadata.name=a").unwrap().matches_object(&o));
        assert_eq!(
            FieldSelector::parse("spec.nodeName=x").unwrap_err().to_string(),
            "unable to parse requirement: field label not supported: spec.nodeName"
        );
    }
}
