//! Offline commands on a fleet repository checkout: `flotilla render` (what one cluster would receive) and
//! `flotilla diff` (which clusters and apps a change touches, the blast radius of a pull request).

use anyhow::{bail, Context};
use flotilla_common::fleet::render::{render_fleet, RenderCache, Rendered, Tools};
use flotilla_common::fleet::{self, Bundle, Fleet, Tree};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Reads every file under `root` (skipping `.git`) into a [`Tree`], as the hub reads a commit: symbolic links
/// are never followed (the hub skips them; followed, one could read any file of the machine, such as the fleet
/// CA's key), and are named on standard error.
pub fn read_checkout(root: &Path) -> anyhow::Result<Tree> {
    fn walk(root: &Path, dir: &Path, tree: &mut Tree) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_name() == ".git" {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_symlink() {
                let rel = path.strip_prefix(root)?.to_string_lossy().replace('\\', "/");
                eprintln!("warning: {rel} is a symbolic link: not followed (the hub skips links too)");
                continue;
            }
            if kind.is_dir() {
                walk(root, &path, tree)?;
            } else {
                let rel = path.strip_prefix(root)?.to_string_lossy().replace('\\', "/");
                let size = entry.metadata()?.len();
                let bytes = if size > fleet::MAX_FILE_BYTES {
                    fleet::oversized(size)
                } else {
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
                };
                tree.insert(rel, bytes);
            }
        }
        Ok(())
    }
    let mut tree = Tree::new();
    walk(root, root, &mut tree)?;
    Ok(tree)
}

/// A bundle as multi-document YAML, each object headed by its app and digest.
fn bundle_yaml(app: &str, b: &Bundle) -> anyhow::Result<String> {
    let mut out = String::new();
    for obj in Bundle::parse(&b.bytes)? {
        out.push_str(&format!("---\n# app: {app} ({})\n", b.digest));
        out.push_str(&serde_yaml::to_string(&obj)?);
    }
    Ok(out)
}

/// The multi-document YAML a cluster would receive, app by app in name order.
pub fn render(tree: &Tree, cluster: &str, app: Option<&str>, tools: &dyn Tools) -> anyhow::Result<String> {
    let mut fleet = fleet::parse(tree);
    if let Some(e) = fleet.broken_clusters.get(cluster) {
        bail!("{e}");
    }
    let Some(apps) = fleet.apps_for(cluster) else {
        bail!("cluster {cluster:?} is not in the inventory (clusters/{cluster}.yaml): it receives nothing");
    };
    if let Some(name) = app {
        match fleet.apps.get(name) {
            None => bail!("there is no app {name:?} (apps/{name}/app.yaml)"),
            Some(a) if a.spec.is_err() => {
                bail!("{}", a.spec.as_ref().err().map(ToString::to_string).unwrap_or_default())
            }
            Some(_) if !apps.iter().any(|(a, ..)| a.name == name) => {
                bail!("app {name:?} does not target cluster {cluster:?}")
            }
            Some(_) => {}
        }
    }
    // Render this one cluster only.
    fleet.clusters.retain(|c, _| c == cluster);
    let rendered = render_fleet(&fleet, tools, &mut RenderCache::default());
    let mut out = String::new();
    // Apps whose files cannot be read are named, never left out in silence.
    let mut errors: Vec<String> = fleet
        .apps
        .values()
        .filter(|a| app.is_none_or(|n| n == a.name))
        .filter_map(|a| a.spec.as_ref().err().map(ToString::to_string))
        .collect();
    for (name, result) in &rendered.clusters[cluster] {
        if app.is_some_and(|a| a != name) {
            continue;
        }
        match result {
            Ok(b) => out.push_str(&bundle_yaml(name, b)?),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(out)
}

/// How one app changes on a set of clusters between two revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub app: String,
    /// `added`, `removed`, `changed`, or `error` (the app cannot be rendered at the newer revision).
    pub change: &'static str,
    pub clusters: Vec<String>,
    /// The distinct errors, for `error`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// One entry per distinct pair of bundles: clusters sharing a render share a patch.
    pub renders: Vec<RenderChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RenderChange {
    pub clusters: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub from_digest: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub to_digest: String,
    /// A unified diff of the rendered objects, when asked for.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub patch: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlastRadius {
    /// The revisions as given, and the commits they name.
    pub from: String,
    pub to: String,
    pub from_commit: String,
    pub to_commit: String,
    pub clusters_total: usize,
    pub clusters_changed: usize,
    pub changes: Vec<Change>,
    /// Problems of the newer revision outside rendering (broken files, untargeted apps).
    pub problems: Vec<String>,
    /// Cluster, app and rollout files of the newer revision that cannot be read (a failed check).
    pub broken_files: usize,
}

/// A revision: what the user called it, the commit, and the files.
pub struct Revision<'a> {
    pub name: &'a str,
    pub commit: &'a str,
    pub tree: &'a Tree,
}

fn render_all(tree: &Tree, tools: &dyn Tools) -> (Fleet, Rendered) {
    let fleet = fleet::parse(tree);
    let rendered = render_fleet(&fleet, tools, &mut RenderCache::default());
    (fleet, rendered)
}

/// (from digest, to digest): clusters with the same pair share a render and a patch.
type DigestPair = (String, String);

/// Compares the desired state of every cluster between two revisions.
pub fn blast_radius(from: Revision, to: Revision, patch: bool, tools: &dyn Tools) -> anyhow::Result<BlastRadius> {
    let (_, before) = render_all(from.tree, tools);
    let (fleet, after) = render_all(to.tree, tools);
    // (app, change) → (from digest, to digest) → clusters; errors per (app) → messages.
    let mut groups: BTreeMap<(String, &'static str), BTreeMap<DigestPair, Vec<String>>> = BTreeMap::new();
    let mut errors: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    let mut bundles: BTreeMap<String, (String, std::sync::Arc<Bundle>)> = BTreeMap::new();
    let empty = BTreeMap::new();
    let clusters: std::collections::BTreeSet<&String> = before.clusters.keys().chain(after.clusters.keys()).collect();
    let mut changed_clusters = std::collections::BTreeSet::new();
    for cluster in &clusters {
        let a = before.clusters.get(*cluster).unwrap_or(&empty);
        let b = after.clusters.get(*cluster).unwrap_or(&empty);
        let apps: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for app in apps {
            let digest = |r: Option<&fleet::render::AppResult>| match r {
                Some(Ok(b)) => b.digest.clone(),
                _ => String::new(),
            };
            for r in [a.get(app), b.get(app)].into_iter().flatten().flatten() {
                bundles.entry(r.digest.clone()).or_insert_with(|| (app.clone(), r.clone()));
            }
            let (fd, td) = (digest(a.get(app)), digest(b.get(app)));
            let change = match (a.get(app), b.get(app)) {
                (_, Some(Err(e))) => {
                    errors.entry(app.clone()).or_default().insert(e.to_string());
                    Some("error")
                }
                (None, Some(Ok(_))) => Some("added"),
                (Some(_), None) => Some("removed"),
                (Some(_), Some(Ok(_))) if fd != td => Some("changed"),
                _ => None,
            };
            if let Some(change) = change {
                changed_clusters.insert((*cluster).clone());
                let pair = if change == "error" { (fd, String::new()) } else { (fd, td) };
                groups.entry((app.clone(), change)).or_default().entry(pair).or_default().push((*cluster).clone());
            }
        }
    }
    let text = |d: &str| -> anyhow::Result<String> {
        match bundles.get(d) {
            Some((app, b)) if !d.is_empty() => bundle_yaml(app, b),
            _ => Ok(String::new()),
        }
    };
    let mut changes = Vec::new();
    for ((app, change), pairs) in groups {
        let mut renders = Vec::new();
        let mut all = Vec::new();
        for ((from_digest, to_digest), clusters) in pairs {
            all.extend(clusters.iter().cloned());
            let patch = if patch && change != "error" {
                similar::TextDiff::from_lines(&text(&from_digest)?, &text(&to_digest)?)
                    .unified_diff()
                    .context_radius(3)
                    .header(&format!("{}/apps/{app}", from.name), &format!("{}/apps/{app}", to.name))
                    .to_string()
            } else {
                String::new()
            };
            renders.push(RenderChange { clusters, from_digest, to_digest, patch });
        }
        all.sort();
        let errors = if change == "error" {
            errors.get(&app).cloned().unwrap_or_default().into_iter().collect()
        } else {
            Vec::new()
        };
        changes.push(Change { app, change, clusters: all, errors, renders });
    }
    Ok(BlastRadius {
        from: from.name.to_string(),
        to: to.name.to_string(),
        from_commit: from.commit.to_string(),
        to_commit: to.commit.to_string(),
        clusters_total: clusters.len(),
        clusters_changed: changed_clusters.len(),
        changes,
        problems: fleet.problems(),
        broken_files: fleet.broken_clusters.len()
            + fleet.apps.values().filter(|a| a.spec.is_err()).count()
            + usize::from(matches!(fleet.rollout, Some(Err(_)))),
    })
}

/// The blast radius as text: a summary line, one line per app and change with its clusters, patches on request.
pub fn format_blast_radius(r: &BlastRadius) -> String {
    let apps: std::collections::BTreeSet<&str> = r.changes.iter().map(|c| c.app.as_str()).collect();
    let mut out = format!(
        "{}..{}: {} of {} clusters change, {} app{}\n",
        r.from,
        r.to,
        r.clusters_changed,
        r.clusters_total,
        apps.len(),
        if apps.len() == 1 { "" } else { "s" }
    );
    for c in &r.changes {
        out.push_str(&format!("{:<8} {:<20} {}\n", c.change, c.app, c.clusters.join(" ")));
        for e in &c.errors {
            out.push_str(&format!("         {e}\n"));
        }
    }
    for p in &r.problems {
        out.push_str(&format!("problem  {p}\n"));
    }
    for c in &r.changes {
        for rc in r.changes.iter().filter(|x| std::ptr::eq(*x, c)).flat_map(|c| &c.renders) {
            if !rc.patch.is_empty() {
                out.push_str(&format!("\n# {} on {}\n{}", c.app, rc.clusters.join(", "), rc.patch));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::tools::SystemTools;

    fn example() -> Tree {
        let root: std::path::PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "examples", "fleet"].iter().collect();
        read_checkout(&root).unwrap()
    }

    #[test]
    fn a_checkout_never_follows_links_out_of_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("fleet"), dir.path().join("secret"));
        std::fs::create_dir_all(root.join("apps/shop")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("ca-key.pem"), "-----BEGIN PRIVATE KEY-----").unwrap();
        std::fs::write(root.join("apps/shop/app.yaml"), "namespace: shop\n").unwrap();
        std::os::unix::fs::symlink(outside.join("ca-key.pem"), root.join("apps/shop/key.yaml")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("apps/shop/dir")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("apps/shop/passwd.yaml")).unwrap();
        let tree = read_checkout(&root).unwrap();
        assert_eq!(tree.keys().collect::<Vec<_>>(), ["apps/shop/app.yaml"], "links skipped, as the hub skips them");
        assert!(tree.values().all(|v| !String::from_utf8_lossy(v).contains("PRIVATE KEY")));
    }

    #[test]
    fn renders_what_a_cluster_receives() {
        let t = example();
        let tools = SystemTools::detect();
        let eu = render(&t, "eu-1", None, &tools).unwrap();
        assert!(eu.contains("# app: eu-compliance") && eu.contains("# app: shop") && eu.contains("# app: monitoring"));
        let us = render(&t, "us-1", None, &tools).unwrap();
        assert!(!us.contains("eu-compliance"));
        let shop = render(&t, "us-1", Some("shop"), &tools).unwrap();
        assert!(shop.contains("namespace: shop") && !shop.contains("monitoring"));
        assert!(shop.contains("currency: USD") && shop.contains("region: us"), "per-cluster values:\n{shop}");
        let staging = render(&t, "us-4", Some("shop"), &tools).unwrap();
        assert!(
            staging.contains("replicas: 1") && staging.contains("log-level: debug"),
            "the staging overlay:\n{staging}"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let t = example();
        let tools = SystemTools::detect();
        assert!(render(&t, "nowhere", None, &tools).unwrap_err().to_string().contains("not in the inventory"));
        assert!(render(&t, "us-1", Some("eu-compliance"), &tools).unwrap_err().to_string().contains("does not target"));
        assert!(render(&t, "us-1", Some("nope"), &tools).unwrap_err().to_string().contains("there is no app"));
        let mut broken = t.clone();
        broken.insert("apps/monitoring/agent.yaml".into(), b"kind: ConfigMap\n".to_vec());
        assert_eq!(
            render(&broken, "us-1", None, &tools).unwrap_err().to_string(),
            "apps/monitoring/agent.yaml:1: the document has no apiVersion"
        );
    }

    fn rev<'a>(name: &'a str, tree: &'a Tree) -> Revision<'a> {
        Revision { name, commit: name, tree }
    }

    #[test]
    fn the_blast_radius_of_a_regional_change() {
        let from = example();
        let mut to = from.clone();
        let residency = String::from_utf8(to["apps/eu-compliance/residency.yaml"].clone()).unwrap();
        to.insert("apps/eu-compliance/residency.yaml".into(), format!("{residency}\n# changed\n").into_bytes());
        assert_eq!(
            blast_radius(rev("a", &from), rev("b", &to), false, &SystemTools::detect()).unwrap().changes,
            vec![]
        );
        let changed = residency.replacen("data:", "data:\n  extra: \"1\"", 1);
        assert_ne!(changed, residency, "the example has a data section");
        to.insert("apps/eu-compliance/residency.yaml".into(), changed.into_bytes());
        let r = blast_radius(rev("a", &from), rev("b", &to), true, &SystemTools::detect()).unwrap();
        assert_eq!(r.clusters_changed, 4);
        assert_eq!(r.changes.len(), 1);
        assert_eq!(r.changes[0].clusters, vec!["eu-1", "eu-2", "eu-3", "eu-4"]);
        assert_eq!(r.changes[0].change, "changed");
        assert_eq!(r.changes[0].renders.len(), 1, "the four clusters share one render");
        assert!(r.changes[0].renders[0].patch.contains("+  extra: '1'"), "{:?}", r.changes[0].renders);
        let text = format_blast_radius(&r);
        assert!(text.starts_with("a..b: 4 of 12 clusters change, 1 app\nchanged  eu-compliance"), "{text}");
    }
}
