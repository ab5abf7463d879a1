//! `flotilla render`: what one cluster would receive from a fleet repository checkout, offline.

use anyhow::{bail, Context};
use flotilla_common::fleet::{self, Bundle, Tree};
use std::path::Path;

/// Reads every file under `root` (skipping `.git`) into a [`Tree`].
pub fn read_checkout(root: &Path) -> anyhow::Result<Tree> {
    fn walk(root: &Path, dir: &Path, tree: &mut Tree) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_name() == ".git" {
                continue;
            }
            if entry.file_type()?.is_dir() {
                walk(root, &path, tree)?;
            } else {
                let rel = path.strip_prefix(root)?.to_string_lossy().replace('\\', "/");
                tree.insert(rel, std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
            }
        }
        Ok(())
    }
    let mut tree = Tree::new();
    walk(root, root, &mut tree)?;
    Ok(tree)
}

/// The multi-document YAML a cluster would receive, app by app in name order.
pub fn render(tree: &Tree, cluster: &str, app: Option<&str>) -> anyhow::Result<String> {
    let fleet = fleet::parse(tree);
    let Some(apps) = fleet.apps_for(cluster) else {
        bail!("cluster {cluster:?} is not in the inventory (clusters/{cluster}.yaml): it receives nothing");
    };
    if let Some(name) = app {
        if !fleet.apps.contains_key(name) {
            bail!("there is no app {name:?} (apps/{name}/app.yaml)");
        }
        if !apps.iter().any(|a| a.name == name) {
            bail!("app {name:?} does not target cluster {cluster:?}");
        }
    }
    let mut out = String::new();
    let mut errors = Vec::new();
    for a in apps.into_iter().filter(|a| app.is_none_or(|n| n == a.name)) {
        match &a.bundle {
            Ok(b) => {
                for obj in Bundle::parse(&b.bytes)? {
                    out.push_str(&format!("---\n# app: {} ({})\n", a.name, b.digest));
                    out.push_str(&serde_yaml::to_string(&obj)?);
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Tree {
        let root: std::path::PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "examples", "fleet"].iter().collect();
        read_checkout(&root).unwrap()
    }

    #[test]
    fn renders_what_a_cluster_receives() {
        let t = example();
        let eu = render(&t, "eu-1", None).unwrap();
        assert!(eu.contains("# app: eu-compliance") && eu.contains("# app: shop") && eu.contains("# app: monitoring"));
        let us = render(&t, "us-1", None).unwrap();
        assert!(!us.contains("eu-compliance"));
        let shop = render(&t, "us-1", Some("shop")).unwrap();
        assert!(shop.contains("namespace: shop") && !shop.contains("monitoring"));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let t = example();
        assert!(render(&t, "nowhere", None).unwrap_err().to_string().contains("not in the inventory"));
        assert!(render(&t, "us-1", Some("eu-compliance")).unwrap_err().to_string().contains("does not target"));
        assert!(render(&t, "us-1", Some("nope")).unwrap_err().to_string().contains("there is no app"));
        let mut broken = t.clone();
        broken.insert("apps/shop/shop.yaml".into(), b"kind: ConfigMap\n".to_vec());
        assert_eq!(
            render(&broken, "us-1", None).unwrap_err().to_string(),
            "apps/shop/shop.yaml:1: the document has no apiVersion"
        );
    }
}
