//! What each cluster should run, computed from a new commit and what was desired before; free of I/O.
//!
//! Rules:
//! - a cluster not in the inventory gets nothing;
//! - an app targeting a cluster gets the bundle rendered at the new commit;
//! - an app whose manifests are broken at the new commit keeps its previous good bundle on every cluster
//!   that had one, and carries the error (file and line) until a commit fixes it; nothing is half-applied;
//! - an app that stops targeting a cluster leaves that cluster's desired state.

use flotilla_common::fleet::{Bundle, Fleet};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One app's desired state on one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredApp {
    /// The bundle to apply; empty when the app has never had a good bundle.
    pub digest: String,
    /// The commit the bundle was rendered from.
    pub revision: String,
    /// The bundle's size in bytes, so a session can announce it without reading the bundle.
    #[serde(default)]
    pub size: u64,
    /// Why the newest commit could not be used for this app, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// cluster → app → desired state.
pub type Desired = BTreeMap<String, BTreeMap<String, DesiredApp>>;

/// The result of advancing to a new commit: the new desired state and the bundles it needs.
#[derive(Debug, Default)]
pub struct Advance {
    pub desired: Desired,
    /// Bundles rendered at this commit, by digest (each stored once however many clusters share it).
    pub bundles: BTreeMap<String, Bundle>,
}

pub fn advance(prev: &Desired, fleet: &Fleet, revision: &str) -> Advance {
    let mut out = Advance::default();
    for cluster in fleet.clusters.keys() {
        let mut apps = BTreeMap::new();
        for app in fleet.apps_for(cluster).unwrap_or_default() {
            let before = prev.get(cluster).and_then(|a| a.get(&app.name));
            let d = match &app.bundle {
                Ok(b) => {
                    out.bundles.entry(b.digest.clone()).or_insert_with(|| b.clone());
                    DesiredApp {
                        digest: b.digest.clone(),
                        revision: revision.to_string(),
                        size: b.bytes.len() as u64,
                        error: None,
                    }
                }
                Err(e) => match before {
                    Some(b) => DesiredApp { error: Some(e.to_string()), ..b.clone() },
                    None => DesiredApp {
                        digest: String::new(),
                        revision: String::new(),
                        size: 0,
                        error: Some(e.to_string()),
                    },
                },
            };
            apps.insert(app.name.clone(), d);
        }
        out.desired.insert(cluster.clone(), apps);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::fleet::{parse, Tree};

    fn tree(files: &[(&str, &str)]) -> Tree {
        files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect()
    }

    fn fleet(cm_value: &str, target_tier: &str) -> Fleet {
        parse(&tree(&[
            ("clusters/eu-1.yaml", "labels: {tier: prod}\n"),
            ("clusters/eu-2.yaml", "labels: {tier: prod}\n"),
            ("clusters/lab.yaml", "labels: {tier: dev}\n"),
            (
                "apps/shop/app.yaml",
                &format!("namespace: shop\ntargets:\n- selector: {{matchLabels: {{tier: {target_tier}}}}}\n"),
            ),
            (
                "apps/shop/cm.yaml",
                &format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{v: {cm_value}}}\n"),
            ),
        ]))
    }

    #[test]
    fn identical_inputs_share_one_bundle() {
        let a = advance(&Desired::new(), &fleet("one", "prod"), "r1");
        assert_eq!(a.bundles.len(), 1);
        assert_eq!(a.desired["eu-1"]["shop"], a.desired["eu-2"]["shop"]);
        assert!(a.desired["lab"].is_empty());
    }

    #[test]
    fn a_broken_commit_keeps_the_previous_good_bundle_with_its_error() {
        let a = advance(&Desired::new(), &fleet("one", "prod"), "r1");
        let broken = fleet("[unclosed", "prod");
        let b = advance(&a.desired, &broken, "r2");
        let d = &b.desired["eu-1"]["shop"];
        assert_eq!(d.digest, a.desired["eu-1"]["shop"].digest);
        assert_eq!(d.revision, "r1");
        assert!(d.error.as_deref().unwrap().starts_with("apps/shop/cm.yaml:"), "{d:?}");
        assert!(b.bundles.is_empty(), "nothing new to send");
        let fixed = advance(&b.desired, &fleet("two", "prod"), "r3");
        assert_eq!(fixed.desired["eu-1"]["shop"].revision, "r3");
        assert_eq!(fixed.desired["eu-1"]["shop"].error, None);
    }

    #[test]
    fn a_removed_target_leaves_the_cluster() {
        let a = advance(&Desired::new(), &fleet("one", "prod"), "r1");
        let b = advance(&a.desired, &fleet("one", "dev"), "r2");
        assert!(b.desired["eu-1"].is_empty());
        assert_eq!(b.desired["lab"]["shop"].revision, "r2");
    }
}
