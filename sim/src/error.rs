//! API errors, rendered as `metav1.Status` with the code, reason and message the real API server uses.

use crate::resources::ResourceDef;
use serde_json::{json, Value};

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// Milliseconds to wait before answering (a webhook that times out); 0 answers at once.
    pub delay_ms: u32,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: None, delay_ms: 0 }
    }

    fn with_details(mut self, d: Value) -> Self {
        self.details = Some(d);
        self
    }

    fn res_details(res: &ResourceDef, name: &str) -> Value {
        let mut d = json!({"name": name, "kind": res.plural});
        if !res.group.is_empty() {
            d["group"] = json!(res.group);
        }
        d
    }

    pub fn not_found(res: &ResourceDef, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{}\" not found", res.qualified(), name))
            .with_details(Self::res_details(res, name))
    }

    pub fn namespace_not_found(ns: &str) -> Self {
        Self::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
            .with_details(json!({"name": ns, "kind": "namespaces"}))
    }

    pub fn no_route() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource").with_details(json!({}))
    }

    pub fn already_exists(res: &ResourceDef, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{}\" already exists", res.qualified(), name))
            .with_details(Self::res_details(res, name))
    }

    pub fn stale(res: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                res.qualified(),
                name
            ),
        )
        .with_details(Self::res_details(res, name))
    }

    pub fn apply_conflicts(res: &ResourceDef, name: &str, conflicts: &[crate::fields::Conflict]) -> Self {
        let n = conflicts.len();
        let items: Vec<String> = conflicts
            .iter()
            .map(|c| format!("conflict with \"{}\" using {}: {}", c.manager, c.api_version, c.path))
            .collect();
        let message = if n == 1 {
            format!("Apply failed with 1 conflict: {}", items[0])
        } else {
            format!("Apply failed with {n} conflicts: {}", items.join("\n"))
        };
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|c| {
                json!({"reason": "FieldManagerConflict",
                       "message": format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                       "field": c.path})
            })
            .collect();
        let mut d = Self::res_details(res, name);
        d["causes"] = json!(causes);
        Self::new(409, "Conflict", message).with_details(d)
    }

    /// 422 with field causes: `Deployment.apps "web" is invalid: spec.selector: Required value`.
    pub fn invalid(res: &ResourceDef, name: &str, causes: Vec<(String, String)>) -> Self {
        let kind = if res.group.is_empty() { res.kind.clone() } else { format!("{}.{}", res.kind, res.group) };
        let parts: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        let msg = if parts.len() == 1 {
            format!("{kind} \"{name}\" is invalid: {}", parts[0])
        } else {
            format!("{kind} \"{name}\" is invalid: [{}]", parts.join(", "))
        };
        let cause_json: Vec<Value> = causes
            .iter()
            .map(|(f, m)| {
                let reason = if m.starts_with("Required value") {
                    "FieldValueRequired"
                } else if m.starts_with("Unsupported value") {
                    "FieldValueNotSupported"
                } else {
                    "FieldValueInvalid"
                };
                json!({"reason": reason, "message": m, "field": f})
            })
            .collect();
        let mut d = json!({"name": name, "kind": res.kind, "causes": cause_json});
        if !res.group.is_empty() {
            d["group"] = json!(res.group);
        }
        Self::new(422, "Invalid", msg).with_details(d)
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", msg)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            .with_details(json!({}))
    }

    pub fn unsupported_media(ct: &str) -> Self {
        Self::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"))
    }

    /// 415 for a protobuf body the simulator cannot decode faithfully.
    pub fn unsupported_protobuf(msg: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", msg)
    }

    pub fn not_acceptable() -> Self {
        Self::new(
            406,
            "NotAcceptable",
            "only the following media types are accepted: application/json, application/yaml",
        )
    }

    pub fn gone(msg: impl Into<String>) -> Self {
        Self::new(410, "Expired", msg)
    }

    pub fn forbidden(res: &ResourceDef, name: &str, msg: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", format!("{} \"{}\" is forbidden: {}", res.qualified(), name, msg.into()))
            .with_details(Self::res_details(res, name))
    }

    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", msg)
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(500, "InternalError", msg)
    }

    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_matches_the_api_server() {
        let defs = crate::resources::builtins();
        let d = defs.iter().find(|d| d.kind == "Deployment").unwrap();
        let s = ApiError::not_found(d, "web").to_status();
        assert_eq!(s["message"], "deployments.apps \"web\" not found");
        assert_eq!(s["code"], 404);
        assert_eq!(s["details"]["group"], "apps");
    }
}
