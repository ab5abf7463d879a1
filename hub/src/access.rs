//! Who may do what on the platform API, free of I/O: roles bound to operator names, optionally scoped to apps
//! or to clusters by a label selector, read from a roles file the hub reloads when it changes
//! (docs/security.md says why the file is the hub's and not the fleet repository's).
//!
//! ```yaml
//! bindings:
//!   - operators: [alice]
//!     role: admin
//!   - operators: [bob, ci-bot]
//!     role: operator
//!     apps: [shop]            # only shop's rollouts
//!   - operators: [eu-oncall]
//!     role: viewer
//!     clusters: region=eu     # only these clusters
//!   - operators: ["*"]        # every operator certificate of the fleet's CA
//!     role: viewer
//! ```

use flotilla_common::selector::LabelSelector;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// What a binding grants; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the fleet, rollouts, hubs and explanations.
    Viewer,
    /// And pauses, resumes, approves, retries, refreshes; reads the audit trail.
    Operator,
    /// And aborts and rolls back (and will create join tokens: `Action::CreateJoinToken` is reserved for it).
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// A call of the platform API, by what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    View,
    Refresh,
    Pause,
    Resume,
    Approve,
    Retry,
    Abort,
    Rollback,
    ReadAudit,
    CreateJoinToken,
}

impl Action {
    /// The least role that may do it.
    pub fn role(self) -> Role {
        match self {
            Action::View => Role::Viewer,
            Action::Refresh | Action::Pause | Action::Resume | Action::Approve | Action::Retry | Action::ReadAudit => {
                Role::Operator
            }
            Action::Abort | Action::Rollback | Action::CreateJoinToken => Role::Admin,
        }
    }

    /// As the audit trail and error messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Action::View => "view",
            Action::Refresh => "refresh",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Approve => "approve",
            Action::Retry => "retry",
            Action::Abort => "abort",
            Action::Rollback => "rollback",
            Action::ReadAudit => "read-audit",
            Action::CreateJoinToken => "create-join-token",
        }
    }
}

/// What a call acts on: an app (rollout views and controls), a cluster (its labels), or neither (the fleet).
#[derive(Debug, Clone, Copy, Default)]
pub struct Target<'a> {
    pub app: Option<&'a str>,
    pub cluster: Option<&'a BTreeMap<String, String>>,
}

impl<'a> Target<'a> {
    pub fn fleet() -> Self {
        Target::default()
    }

    pub fn app(app: &'a str) -> Self {
        Target { app: Some(app), cluster: None }
    }

    pub fn cluster(labels: &'a BTreeMap<String, String>) -> Self {
        Target { app: None, cluster: Some(labels) }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// Operator names; `*` is every operator.
    pub operators: Vec<String>,
    pub role: Role,
    /// Empty: every app.
    pub apps: Vec<String>,
    /// Empty: every cluster.
    pub clusters: LabelSelector,
    /// As written (`region=eu`), for messages.
    clusters_text: String,
}

impl Binding {
    fn names(&self, who: &str) -> bool {
        self.operators.iter().any(|o| o == "*" || o == who)
    }

    /// A scoped binding covers targets in its scope; the fleet-wide lists are views it may read (filtered by
    /// cluster scope); a rollout acts on every cluster of its app, so only bindings without a cluster scope
    /// cover rollouts.
    fn covers(&self, action: Action, t: &Target) -> bool {
        let view = action.role() == Role::Viewer;
        let app_ok = match t.app {
            Some(a) => self.apps.is_empty() || self.apps.iter().any(|x| x == a),
            None => self.apps.is_empty() || view,
        };
        let clusters_ok = match t.cluster {
            Some(labels) => self.clusters.matches(labels),
            None => self.clusters_text.is_empty() || (view && t.app.is_none()),
        };
        app_ok && clusters_ok
    }

    fn describe(&self) -> String {
        let mut scope = Vec::new();
        if !self.apps.is_empty() {
            scope.push(format!("apps {}", self.apps.join(",")));
        }
        if !self.clusters_text.is_empty() {
            scope.push(format!("clusters {}", self.clusters_text));
        }
        if scope.is_empty() {
            self.role.to_string()
        } else {
            format!("{} for {}", self.role, scope.join(" and "))
        }
    }
}

/// Why a call is refused: names the role it needs and what the caller holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("operator {who} may not {action}{on}: it needs the {needs} role{holds}")]
pub struct Denied {
    pub who: String,
    pub action: &'static str,
    pub on: String,
    pub needs: Role,
    pub holds: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RolesError {
    #[error("{file}: {source}")]
    Unreadable {
        file: String,
        #[source]
        source: flotilla_common::yaml::YamlError,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    bindings: Vec<BindingSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingSpec {
    operators: Vec<String>,
    role: Role,
    #[serde(default)]
    apps: Vec<String>,
    #[serde(default)]
    clusters: String,
}

/// The bindings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Roles {
    bindings: Vec<Binding>,
    /// No roles file: every operator certificate is an admin (as before roles existed).
    open: bool,
}

impl Roles {
    /// Without a roles file: every holder of an operator certificate of the fleet's CA may do everything.
    pub fn everyone_admin() -> Roles {
        Roles { bindings: Vec::new(), open: true }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// A roles file; `file` names it in errors (with the line, or the binding's position).
    pub fn parse(text: &str, file: &str) -> Result<Roles, RolesError> {
        let value = flotilla_common::yaml::parse_one(text)
            .map_err(|source| RolesError::Unreadable { file: file.to_string(), source })?;
        let invalid = |message: String| RolesError::Invalid { file: file.to_string(), message };
        let spec: FileSpec = if value.is_null() {
            FileSpec { bindings: Vec::new() }
        } else {
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?
        };
        let mut bindings = Vec::new();
        for (i, b) in spec.bindings.into_iter().enumerate() {
            let at = |m: String| invalid(format!("bindings[{i}]: {m}"));
            if b.operators.is_empty() {
                return Err(at("operators is empty".into()));
            }
            if let Some(bad) =
                b.operators.iter().find(|o| o.as_str() != "*" && !flotilla_common::identity::valid_name(o))
            {
                return Err(at(format!("{bad:?} is not an operator name")));
            }
            let clusters: LabelSelector = b.clusters.parse().map_err(|e: String| at(format!("clusters: {e}")))?;
            bindings.push(Binding {
                operators: b.operators,
                role: b.role,
                apps: b.apps,
                clusters,
                clusters_text: b.clusters.trim().to_string(),
            });
        }
        Ok(Roles { bindings, open: false })
    }

    /// Whether `who` may do `action` on `target`: the highest role that covers it, or why not.
    pub fn check(&self, who: &str, action: Action, target: &Target) -> Result<Role, Denied> {
        if self.open {
            return Ok(Role::Admin);
        }
        let needs = action.role();
        let best = self.bindings.iter().filter(|b| b.names(who) && b.covers(action, target)).map(|b| b.role).max();
        match best {
            Some(r) if r >= needs => Ok(r),
            _ => {
                let on = match (target.app, target.cluster) {
                    (Some(a), _) => format!(" on app {a}"),
                    (None, Some(_)) => " on this cluster".to_string(),
                    (None, None) => String::new(),
                };
                let held: Vec<String> = self.bindings.iter().filter(|b| b.names(who)).map(Binding::describe).collect();
                let holds = if held.is_empty() {
                    "; it holds no role on this hub".to_string()
                } else {
                    format!("; it holds {}", held.join(", "))
                };
                Err(Denied { who: who.to_string(), action: action.name(), on, needs, holds })
            }
        }
    }

    pub fn allows(&self, who: &str, action: Action, target: &Target) -> bool {
        self.check(who, action, target).is_ok()
    }

    /// The highest role `who` holds anywhere (what a dashboard uses to hide buttons).
    pub fn highest(&self, who: &str) -> Option<Role> {
        if self.open {
            return Some(Role::Admin);
        }
        self.bindings.iter().filter(|b| b.names(who)).map(|b| b.role).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
bindings:
  - operators: [alice]
    role: admin
  - operators: [bob]
    role: operator
    apps: [shop]
  - operators: [erin]
    role: operator
    clusters: region=eu
  - operators: [vera]
    role: viewer
"#;

    fn labels(region: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("region".to_string(), region.to_string())])
    }

    #[test]
    fn each_role_includes_the_ones_below_and_nothing_above() {
        let r = Roles::parse(FILE, "roles.yaml").unwrap();
        let shop = Target::app("shop");
        assert!(r.allows("vera", Action::View, &shop));
        let e = r.check("vera", Action::Approve, &shop).unwrap_err();
        assert_eq!(e.needs, Role::Operator);
        assert_eq!(
            e.to_string(),
            "operator vera may not approve on app shop: it needs the operator role; it holds viewer"
        );
        assert!(r.allows("bob", Action::Approve, &shop));
        let e = r.check("bob", Action::Rollback, &shop).unwrap_err();
        assert_eq!(e.needs, Role::Admin, "{e}");
        assert!(e.to_string().contains("it holds operator for apps shop"), "{e}");
        assert!(r.allows("alice", Action::Rollback, &shop));
        assert!(r.allows("alice", Action::CreateJoinToken, &Target::cluster(&labels("eu"))));
    }

    #[test]
    fn scopes_limit_apps_and_clusters() {
        let r = Roles::parse(FILE, "roles.yaml").unwrap();
        assert!(!r.allows("bob", Action::Pause, &Target::app("payments")), "bob's scope is shop");
        assert!(r.allows("bob", Action::View, &Target::fleet()), "the fleet-wide lists are views");
        assert!(!r.allows("bob", Action::Refresh, &Target::fleet()), "refresh is fleet-wide, bob is scoped");
        let (eu, us) = (labels("eu"), labels("us"));
        assert!(r.allows("erin", Action::View, &Target::cluster(&eu)));
        assert!(!r.allows("erin", Action::View, &Target::cluster(&us)));
        assert!(!r.allows("erin", Action::Pause, &Target::app("shop")), "a rollout spans clusters");
        assert!(r.allows("alice", Action::View, &Target::cluster(&us)));
    }

    #[test]
    fn unknown_operators_hold_nothing_and_a_wildcard_binds_everyone() {
        let r = Roles::parse(FILE, "roles.yaml").unwrap();
        let e = r.check("mallory", Action::View, &Target::fleet()).unwrap_err();
        assert!(e.to_string().ends_with("it holds no role on this hub"), "{e}");
        let r = Roles::parse("bindings:\n  - operators: ['*']\n    role: viewer\n", "r").unwrap();
        assert!(r.allows("mallory", Action::View, &Target::fleet()));
        assert!(!r.allows("mallory", Action::Pause, &Target::app("shop")));
        assert_eq!(r.highest("mallory"), Some(Role::Viewer));
    }

    #[test]
    fn without_a_file_everyone_is_admin_and_an_empty_file_grants_nothing() {
        assert!(Roles::everyone_admin().allows("anyone", Action::Rollback, &Target::app("x")));
        let r = Roles::parse("", "roles.yaml").unwrap();
        assert!(!r.allows("alice", Action::View, &Target::fleet()));
    }

    #[test]
    fn a_bad_file_is_refused_with_where_and_what() {
        let e = Roles::parse("bindings:\n  - operators: [a]\n    role: root\n", "/etc/roles.yaml").unwrap_err();
        assert!(e.to_string().starts_with("/etc/roles.yaml: "), "{e}");
        assert!(e.to_string().contains("root"), "{e}");
        let e = Roles::parse("bindings:\n  - operators: [Bad_Name]\n    role: viewer\n", "r.yaml").unwrap_err();
        assert!(e.to_string().contains("bindings[0]") && e.to_string().contains("Bad_Name"), "{e}");
        let e =
            Roles::parse("bindings:\n  - operators: [a]\n    role: viewer\n    clusters: 'a in ('\n", "r").unwrap_err();
        assert!(e.to_string().contains("bindings[0]: clusters"), "{e}");
        let e = Roles::parse("bindings: [\n", "r.yaml").unwrap_err();
        assert!(e.to_string().contains("r.yaml"), "{e}");
        let e = Roles::parse("bindingz: []\n", "r.yaml").unwrap_err();
        assert!(e.to_string().contains("bindingz"), "{e}");
    }
}
