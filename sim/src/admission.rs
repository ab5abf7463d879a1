//! Admission rules per cluster, set through the admin API (`PUT|PATCH /admin/clusters/NAME/admission`), to
//! break writes the way Pod Security, a policy engine or a slow webhook does in a real cluster:
//!
//! ```json
//! {"rules": [
//!   {"kinds": ["ClusterRoleBinding"], "deny": "cluster-admin bindings are not allowed here"},
//!   {"namespaces": ["kube-system"], "operations": ["CREATE", "UPDATE", "DELETE"], "deny": "hands off"},
//!   {"kinds": ["ConfigMap"], "labels": {"slow": "true"}, "timeout_ms": 2000}
//! ]}
//! ```
//!
//! A rule matches when every criterion given matches (an empty one matches everything): the object's kind,
//! namespace (cluster-scoped objects have none), name, labels (all of them, on the object being written or
//! deleted) and the operation. `deny` answers 403 Forbidden with the reason, as a validating webhook's
//! denial; `timeout_ms` waits that long and answers 500, as a webhook that times out. Writes to
//! subresources (status, scale) are not subject to rules, so simulated controllers keep working.

use crate::error::ApiError;
use crate::resources::ResourceDef;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The name the simulated webhook goes by in error messages.
pub const WEBHOOK: &str = "policy.flotilla-sim.internal";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admission {
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// CREATE, UPDATE, DELETE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

impl Admission {
    /// Checks the rules themselves (for the admin API's 400).
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.rules.iter().enumerate() {
            if r.deny.is_some() == r.timeout_ms.is_some() {
                return Err(format!("rules[{i}]: give exactly one of deny (a reason) or timeout_ms"));
            }
            if let Some(op) = r.operations.iter().find(|o| !["CREATE", "UPDATE", "DELETE"].contains(&o.as_str())) {
                return Err(format!("rules[{i}].operations: unknown operation {op:?}: use CREATE, UPDATE or DELETE"));
            }
        }
        Ok(())
    }

    /// The answer for writing (or deleting) `obj`: Ok, a 403, or a 500 to be sent after a delay.
    pub fn admit(&self, op: Operation, res: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).filter(|_| res.namespaced);
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        for r in &self.rules {
            let matches = (r.kinds.is_empty() || r.kinds.contains(&res.kind))
                && (r.namespaces.is_empty() || ns.is_some_and(|n| r.namespaces.iter().any(|x| x == n)))
                && (r.names.is_empty() || r.names.iter().any(|x| x == name))
                && (r.operations.is_empty() || r.operations.iter().any(|o| o == op.name()))
                && r.labels.iter().all(|(k, v)| labels.and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v));
            if !matches {
                continue;
            }
            if let Some(reason) = &r.deny {
                let mut e = ApiError::forbidden(
                    res,
                    name,
                    format!("admission webhook \"{WEBHOOK}\" denied the request: {reason}"),
                );
                e.message = format!("admission webhook \"{WEBHOOK}\" denied the request: {reason}");
                return Err(e);
            }
            if let Some(ms) = r.timeout_ms {
                let mut e = ApiError::internal(format!(
                    "Internal error occurred: failed calling webhook \"{WEBHOOK}\": failed to call webhook: Post \"https://{WEBHOOK}:443/validate?timeout={}s\": context deadline exceeded",
                    ms.div_ceil(1000)
                ));
                e.delay_ms = ms.min(u32::MAX.into()) as u32;
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(kind: &str) -> std::sync::Arc<ResourceDef> {
        crate::resources::builtins().into_iter().find(|d| d.kind == kind).unwrap()
    }

    #[test]
    fn rules_match_on_every_criterion_given() {
        let a: Admission = serde_json::from_value(json!({"rules": [
            {"kinds": ["ConfigMap"], "namespaces": ["kube-system"], "labels": {"team": "x"}, "deny": "no"},
            {"kinds": ["Secret"], "operations": ["DELETE"], "timeout_ms": 1500}
        ]}))
        .unwrap();
        a.validate().unwrap();
        let cm = |ns: &str, team: &str| json!({"metadata": {"name": "a", "namespace": ns, "labels": {"team": team}}});
        let e = a.admit(Operation::Create, &def("ConfigMap"), &cm("kube-system", "x")).unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(e.message, "admission webhook \"policy.flotilla-sim.internal\" denied the request: no");
        assert!(a.admit(Operation::Create, &def("ConfigMap"), &cm("default", "x")).is_ok());
        assert!(a.admit(Operation::Create, &def("ConfigMap"), &cm("kube-system", "y")).is_ok());
        let s = json!({"metadata": {"name": "s", "namespace": "default"}});
        assert!(a.admit(Operation::Update, &def("Secret"), &s).is_ok());
        let e = a.admit(Operation::Delete, &def("Secret"), &s).unwrap_err();
        assert_eq!((e.code, e.delay_ms), (500, 1500));
    }

    #[test]
    fn a_rule_needs_one_effect() {
        let bad: Admission = serde_json::from_value(json!({"rules": [{"kinds": ["Secret"]}]})).unwrap();
        assert!(bad.validate().is_err());
        let bad: Admission =
            serde_json::from_value(json!({"rules": [{"deny": "x", "operations": ["PATCH"]}]})).unwrap();
        assert!(bad.validate().unwrap_err().contains("PATCH"));
        assert!(serde_json::from_value::<Admission>(json!({"rules": [{"kind": "x", "deny": "y"}]})).is_err());
    }
}
