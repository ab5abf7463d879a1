//! What each cluster should run, computed from a new commit's renders and what was desired before; free of
//! I/O.
//!
//! Rules:
//! - a cluster not in the inventory gets nothing;
//! - an app targeting a cluster gets the bundle rendered for that cluster at the new commit;
//! - an app that cannot be rendered for a cluster at the new commit (broken manifests or app.yaml, an unset
//!   variable, a failed kustomize build, an object another app claims) keeps its previous good bundle on that
//!   cluster and carries the error until a commit fixes it; nothing is half-applied;
//! - a cluster whose inventory file is broken keeps its previous desired state, with the error on every app;
//! - an app that stops targeting a cluster leaves that cluster's desired state.

use flotilla_common::fleet::render::Rendered;
use flotilla_common::fleet::{Bundle, Fleet};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// Held back for a cluster the hub has no record of: whatever the cluster's agent runs for the app stays
    /// (a hub on an empty store never removes an app it lacks a record of). Resolved per session from the
    /// agent's Hello.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
}

impl DesiredApp {
    /// "Keep what the agent runs".
    pub fn adopted() -> DesiredApp {
        DesiredApp { digest: String::new(), revision: String::new(), size: 0, error: None, adopt: true }
    }
}

/// cluster → app → desired state.
pub type Desired = BTreeMap<String, BTreeMap<String, DesiredApp>>;

/// The result of advancing to a new commit: the new desired state and the bundles it needs.
#[derive(Debug, Default)]
pub struct Advance {
    pub desired: Desired,
    /// Bundles rendered at this commit, by digest (each stored once however many clusters share it).
    pub bundles: BTreeMap<String, Arc<Bundle>>,
}

fn kept(before: Option<&DesiredApp>, error: String) -> DesiredApp {
    match before {
        Some(b) => DesiredApp { error: Some(error), ..b.clone() },
        None => DesiredApp { error: Some(error), adopt: false, ..DesiredApp::adopted() },
    }
}

pub fn advance(prev: &Desired, fleet: &Fleet, rendered: &Rendered, revision: &str) -> Advance {
    let mut out = Advance::default();
    for (cluster, apps) in &rendered.clusters {
        let before = prev.get(cluster);
        let mut next = BTreeMap::new();
        for (app, result) in apps {
            let d = match result {
                Ok(b) => {
                    out.bundles.entry(b.digest.clone()).or_insert_with(|| b.clone());
                    DesiredApp {
                        digest: b.digest.clone(),
                        revision: revision.to_string(),
                        size: b.bytes.len() as u64,
                        error: None,
                        adopt: false,
                    }
                }
                Err(e) => kept(before.and_then(|b| b.get(app)), e.to_string()),
            };
            next.insert(app.clone(), d);
        }
        // An app whose app.yaml is broken: its targets are unknown, so every cluster that had it keeps it.
        for (app, a) in &fleet.apps {
            if let (Err(e), Some(b)) = (&a.spec, before.and_then(|b| b.get(app))) {
                next.insert(app.clone(), kept(Some(b), e.to_string()));
            }
        }
        out.desired.insert(cluster.clone(), next);
    }
    for (cluster, e) in &fleet.broken_clusters {
        if let Some(before) = prev.get(cluster) {
            let apps = before.iter().map(|(a, d)| (a.clone(), kept(Some(d), e.to_string()))).collect();
            out.desired.insert(cluster.clone(), apps);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::fleet::render::{render_fleet, RenderCache};
    use flotilla_common::fleet::{parse, Tree};
    use flotilla_common::tools::SystemTools;

    fn tree(files: &[(&str, &str)]) -> Tree {
        files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect()
    }

    fn files(cm_value: &str, target_tier: &str) -> Tree {
        tree(&[
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
        ])
    }

    fn step(prev: &Desired, t: &Tree, rev: &str) -> Advance {
        let fleet = parse(t);
        let rendered = render_fleet(&fleet, &SystemTools::detect(), &mut RenderCache::default());
        advance(prev, &fleet, &rendered, rev)
    }

    #[test]
    fn identical_inputs_share_one_bundle() {
        let a = step(&Desired::new(), &files("one", "prod"), "r1");
        assert_eq!(a.bundles.len(), 1);
        assert_eq!(a.desired["eu-1"]["shop"], a.desired["eu-2"]["shop"]);
        assert!(a.desired["lab"].is_empty());
    }

    #[test]
    fn a_broken_commit_keeps_the_previous_good_bundle_with_its_error() {
        let a = step(&Desired::new(), &files("one", "prod"), "r1");
        let b = step(&a.desired, &files("[unclosed", "prod"), "r2");
        let d = &b.desired["eu-1"]["shop"];
        assert_eq!(d.digest, a.desired["eu-1"]["shop"].digest);
        assert_eq!(d.revision, "r1");
        assert!(d.error.as_deref().unwrap().starts_with("apps/shop/cm.yaml:"), "{d:?}");
        assert!(b.bundles.is_empty(), "nothing new to send");
        let fixed = step(&b.desired, &files("two", "prod"), "r3");
        assert_eq!(fixed.desired["eu-1"]["shop"].revision, "r3");
        assert_eq!(fixed.desired["eu-1"]["shop"].error, None);
    }

    #[test]
    fn a_broken_app_file_or_cluster_file_keeps_what_was_there() {
        let a = step(&Desired::new(), &files("one", "prod"), "r1");
        let mut t = files("two", "prod");
        t.insert(
            "apps/shop/app.yaml".into(),
            b"namespace: shop\ntargets: [{selector: {matchLabels: {tier: prod}}}]\nprune: maybe\n".to_vec(),
        );
        let b = step(&a.desired, &t, "r2");
        let d = &b.desired["eu-1"]["shop"];
        assert_eq!((d.digest.as_str(), d.revision.as_str()), (a.desired["eu-1"]["shop"].digest.as_str(), "r1"));
        assert!(d.error.as_deref().unwrap().starts_with("apps/shop/app.yaml:3: unknown field `prune`"), "{d:?}");
        assert!(b.desired["lab"].is_empty(), "a cluster that never had the app does not get it");

        let mut t = files("two", "prod");
        t.insert("clusters/eu-2.yaml".into(), b"labels: {tier: prod\n".to_vec());
        let c = step(&a.desired, &t, "r3");
        assert_eq!(c.desired["eu-1"]["shop"].revision, "r3");
        let kept = &c.desired["eu-2"]["shop"];
        assert_eq!(kept.revision, "r1", "a broken cluster file keeps the cluster where it was");
        assert!(kept.error.as_deref().unwrap().starts_with("clusters/eu-2.yaml:"), "{kept:?}");
    }

    #[test]
    fn a_removed_target_leaves_the_cluster() {
        let a = step(&Desired::new(), &files("one", "prod"), "r1");
        let b = step(&a.desired, &files("one", "dev"), "r2");
        assert!(b.desired["eu-1"].is_empty());
        assert_eq!(b.desired["lab"]["shop"].revision, "r2");
    }
}
