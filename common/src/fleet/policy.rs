//! What an app may write. The platform team grants it in `policies/<name>.yaml` (files the app teams do not
//! own: protect `policies/` with CODEOWNERS or branch rules); an app no policy names gets the safe defaults:
//!
//! - never the agent's state namespace, nor `kube-system`, `kube-public`, `kube-node-lease` (a policy may
//!   grant the last three by name, never the agent's);
//! - no binding of `cluster-admin` and no ClusterRole granting `*` verbs;
//! - no namespaced object in a namespace another app declares as its own, unless that app shares it
//!   (`shareNamespaceWith`) or a policy grants the namespace by name;
//! - cluster-scoped objects and any kind are allowed (most real apps bring ClusterRoles and CRDs); a policy
//!   narrows them.
//!
//! The hub checks every object when it renders (the app fails on that cluster with the reason) and puts the
//! [`Guard`] in the bundle, so the agent checks again before it applies. Free of I/O.

use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Namespaces no app writes unless a policy names them.
pub const RESERVED_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];
/// Where agents keep their state unless `fleet.yaml` says otherwise (`agentNamespace`).
pub const DEFAULT_AGENT_NAMESPACE: &str = "flotilla-system";

/// `policies/<name>.yaml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyFile {
    /// The apps this policy is for: names or globs (`team-a-*`).
    pub apps: Vec<String>,
    /// Namespaces these apps may write (globs). Absent: any namespace the defaults allow.
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub kinds: KindRules,
    /// Whether they may write cluster-scoped objects.
    #[serde(default = "yes")]
    pub cluster_scoped: bool,
    /// Whether they may bind cluster-admin or grant `*` verbs in a ClusterRole.
    #[serde(default)]
    pub cluster_admin: bool,
    /// Other apps that may write in these apps' namespaces (names or globs).
    #[serde(default)]
    pub share_namespace_with: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Kinds as `Kind` (any group) or `group/Kind`, globs on both sides; the core group is written `core`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindRules {
    /// Only these kinds (absent: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Never these kinds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// What one app may write, as the agent receives it in the bundle. Only what the app's policy and the fleet
/// say: the namespaces of other apps are checked by the hub alone, so another app's commit never changes
/// this app's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Guard {
    /// The policy file that granted this (none: the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Namespaces the app may write (globs); empty: any not denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces it may never write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "kinds_empty")]
    pub kinds: KindRules,
    #[serde(default = "yes")]
    pub cluster_scoped: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster_admin: bool,
}

fn kinds_empty(k: &KindRules) -> bool {
    k.allow.is_empty() && k.deny.is_empty()
}

fn glob(p: &str) -> Option<GlobMatcher> {
    Glob::new(p).ok().map(|g| g.compile_matcher())
}

/// Whether `name` matches one of `patterns` (globs; an invalid pattern matches nothing).
pub fn matches_any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| p == name || glob(p).is_some_and(|g| g.is_match(name)))
}

fn kind_matches(pattern: &str, group: &str, kind: &str) -> bool {
    let one = |p: &str, v: &str| p == v || glob(p).is_some_and(|g| g.is_match(v));
    match pattern.rsplit_once('/') {
        None => one(pattern, kind),
        Some((g, k)) => one(g, if group.is_empty() { "core" } else { group }) && one(k, kind),
    }
}

/// Why a pattern of a policy file is invalid, if it is.
pub fn invalid_pattern(p: &str) -> Option<String> {
    if p.is_empty() {
        return Some("an empty pattern".into());
    }
    Glob::new(p).err().map(|e| e.kind().to_string())
}

fn str_at<'a>(o: &'a Value, p: &str) -> &'a str {
    o.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

/// Whether an RBAC object gives cluster-admin power: a binding of the `cluster-admin` ClusterRole, or a
/// ClusterRole with a rule granting `*` verbs.
pub fn grants_cluster_admin(o: &Value) -> Option<String> {
    let group = str_at(o, "/apiVersion").split_once('/').map_or("", |(g, _)| g);
    if group != "rbac.authorization.k8s.io" {
        return None;
    }
    match str_at(o, "/kind") {
        "ClusterRoleBinding" | "RoleBinding"
            if str_at(o, "/roleRef/kind") == "ClusterRole" && str_at(o, "/roleRef/name") == "cluster-admin" =>
        {
            Some("it binds the cluster-admin ClusterRole".into())
        }
        "ClusterRole" => {
            let rules = o.get("rules").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            rules
                .iter()
                .any(|r| r.get("verbs").and_then(Value::as_array).is_some_and(|v| v.iter().any(|x| x == "*")))
                .then(|| "it grants \"*\" verbs cluster-wide".into())
        }
        _ => None,
    }
}

impl Guard {
    /// The defaults for an app no policy names.
    pub fn defaults(agent_namespace: &str) -> Guard {
        Guard {
            policy: None,
            namespaces: Vec::new(),
            deny_namespaces: deny_list(agent_namespace, &[]),
            kinds: KindRules::default(),
            cluster_scoped: true,
            cluster_admin: false,
        }
    }

    /// What a policy grants.
    pub fn from_policy(file: &str, p: &PolicyFile, agent_namespace: &str) -> Guard {
        Guard {
            policy: Some(file.to_string()),
            namespaces: p.namespaces.clone(),
            deny_namespaces: deny_list(agent_namespace, &p.namespaces),
            kinds: p.kinds.clone(),
            cluster_scoped: p.cluster_scoped,
            cluster_admin: p.cluster_admin,
        }
    }

    fn by(&self) -> String {
        match &self.policy {
            Some(f) => format!("the app's policy ({f})"),
            None => "the default policy (no file in policies/ names the app)".into(),
        }
    }

    /// Whether the app may write in namespace `ns`; the reason when not.
    pub fn namespace_allowed(&self, ns: &str) -> Result<(), String> {
        if self.deny_namespaces.iter().any(|d| d == ns) {
            return Err(format!("namespace {ns} is off limits to apps under {}", self.by()));
        }
        if !self.namespaces.is_empty() && !matches_any(&self.namespaces, ns) {
            return Err(format!("namespace {ns} is not one {} allows ({})", self.by(), self.namespaces.join(", ")));
        }
        Ok(())
    }

    /// Whether the app may write object `o`; `namespaced` is the kind's scope when known. The reason when not.
    pub fn check(&self, o: &Value, namespaced: Option<bool>) -> Result<(), String> {
        let group = str_at(o, "/apiVersion").split_once('/').map_or("", |(g, _)| g);
        let kind = str_at(o, "/kind");
        let gk = if group.is_empty() { kind.to_string() } else { format!("{group}/{kind}") };
        if self.kinds.deny.iter().any(|p| kind_matches(p, group, kind)) {
            return Err(format!("kind {gk} is denied by {}", self.by()));
        }
        if !self.kinds.allow.is_empty() && !self.kinds.allow.iter().any(|p| kind_matches(p, group, kind)) {
            return Err(format!(
                "kind {gk} is not among the kinds {} allows ({})",
                self.by(),
                self.kinds.allow.join(", ")
            ));
        }
        if !self.cluster_admin {
            if let Some(why) = grants_cluster_admin(o) {
                return Err(format!("{why}: {} does not allow cluster-admin", self.by()));
            }
        }
        let ns = str_at(o, "/metadata/namespace");
        if kind == "Namespace" && group.is_empty() {
            // Owning the Namespace object of a reserved namespace is writing there.
            let name = str_at(o, "/metadata/name");
            if self.deny_namespaces.iter().any(|d| d == name) {
                return Err(format!("namespace {name} is off limits to apps under {}", self.by()));
            }
        }
        if namespaced == Some(false) && !self.cluster_scoped {
            return Err(format!("{gk} is cluster-scoped and {} allows only namespaced objects", self.by()));
        }
        // A namespace on an object whose scope is not known yet is checked too (the agent checks again once
        // discovery placed it).
        if ns.is_empty() {
            Ok(())
        } else {
            self.namespace_allowed(ns)
        }
    }
}

/// The agent's namespace always; the reserved namespaces unless `granted` names them.
fn deny_list(agent_namespace: &str, granted: &[String]) -> Vec<String> {
    let mut out = vec![agent_namespace.to_string()];
    out.extend(RESERVED_NAMESPACES.iter().filter(|n| !granted.iter().any(|g| g == *n)).map(|n| n.to_string()));
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cm(ns: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": ns}})
    }

    #[test]
    fn defaults_keep_apps_out_of_reserved_namespaces_and_cluster_admin() {
        let g = Guard::defaults("flotilla-system");
        assert!(g.check(&cm("shop"), Some(true)).is_ok());
        for ns in ["kube-system", "kube-public", "kube-node-lease", "flotilla-system"] {
            let e = g.check(&cm(ns), Some(true)).unwrap_err();
            assert!(e.contains(ns) && e.contains("default policy"), "{e}");
        }
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}});
        assert!(g.check(&ns, Some(false)).is_err(), "the Namespace object of a reserved namespace");
        let crb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "x"}, "roleRef": {"kind": "ClusterRole", "name": "cluster-admin"}});
        assert!(g.check(&crb, Some(false)).unwrap_err().contains("cluster-admin"));
        let star = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "x"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}]});
        assert!(g.check(&star, Some(false)).unwrap_err().contains("\"*\" verbs"));
        let fine = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "x"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]});
        assert!(g.check(&fine, Some(false)).is_ok(), "ordinary cluster-scoped RBAC is allowed");
    }

    #[test]
    fn a_policy_grants_and_narrows() {
        let p = PolicyFile {
            apps: vec!["dns".into()],
            namespaces: vec!["kube-system".into(), "dns-*".into()],
            kinds: KindRules { allow: vec!["core/*".into(), "apps/Deployment".into()], deny: vec!["Secret".into()] },
            cluster_scoped: false,
            cluster_admin: false,
            share_namespace_with: vec![],
        };
        let g = Guard::from_policy("policies/dns.yaml", &p, "flotilla-system");
        assert!(g.check(&cm("kube-system"), Some(true)).is_ok(), "granted by name");
        assert!(g.check(&cm("dns-eu"), Some(true)).is_ok(), "granted by glob");
        assert!(g.check(&cm("shop"), Some(true)).unwrap_err().contains("policies/dns.yaml"));
        assert!(g.check(&cm("flotilla-system"), Some(true)).is_err(), "never the agent's namespace");
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "dns-a"}});
        assert!(g.check(&secret, Some(true)).unwrap_err().contains("denied"));
        let sts =
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s", "namespace": "dns-a"}});
        assert!(g.check(&sts, Some(true)).unwrap_err().contains("not among"));
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "dns-a"}});
        assert!(g.check(&ns, Some(false)).unwrap_err().contains("cluster-scoped"));
    }

    #[test]
    fn the_guard_survives_the_bundle() {
        let g = Guard::defaults("flotilla-system");
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(serde_json::from_value::<Guard>(v).unwrap(), g);
    }
}
