//! What the rendering tests share: trees from literal files, the machine's renderers.
#![allow(dead_code)]

use flotilla_common::fleet::Tree;
use flotilla_common::tools::SystemTools;

pub fn tree(files: &[(&str, &str)]) -> Tree {
    files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect()
}

/// The renderers found here; kubectl (for Kustomize) is required.
pub fn tools() -> SystemTools {
    let t = SystemTools::detect();
    assert!(
        t.kustomize_program().is_some(),
        "kubectl (or kustomize) is needed: install kubectl, https://kubernetes.io/docs/tasks/tools/"
    );
    t
}
