//! What a Kustomize build may read, checked before the renderer starts: every path in every kustomization of
//! the app's private copy stays inside it, and remote resources and bases are refused unless `fleet.yaml`
//! allows them (`renderers.allowRemote`). Kustomize's Helm support (`helmCharts`) is refused: it fetches
//! charts and runs helm outside the renderer's limits. Free of I/O.

use super::Tree;
use serde_json::Value;

/// The names Kustomize reads as a kustomization.
pub const KUSTOMIZATION_FILES: &[&str] = &["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Fields that list paths (or remote references), and fields of list items that hold one.
const PATH_LISTS: &[&str] = &[
    "resources",
    "bases",
    "components",
    "crds",
    "configurations",
    "patchesStrategicMerge",
    "transformers",
    "generators",
    "validators",
];
const ITEM_PATHS: &[(&str, &str)] = &[("patches", "path"), ("patchesJson6902", "path"), ("replacements", "path")];
const GENERATORS: &[&str] = &["configMapGenerator", "secretGenerator"];
const REFUSED: &[&str] = &["helmCharts", "helmGlobals", "helmChartInflationGenerator"];

fn is_kustomization(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    KUSTOMIZATION_FILES.contains(&name)
}

fn looks_remote(s: &str) -> bool {
    s.contains("://") || s.starts_with("git@") || s.starts_with("ssh:")
}

/// `a/b/../c` → `a/c`; None when it climbs above the root.
fn normalize(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            p => out.push(p),
        }
    }
    Some(out.join("/"))
}

fn exists(files: &Tree, path: &str) -> bool {
    path.is_empty()
        || files.contains_key(path)
        || files.range(format!("{path}/")..).next().is_some_and(|(k, _)| k.starts_with(&format!("{path}/")))
}

/// The entries of one kustomization that name a path or a remote reference: (field, value).
fn entries(k: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    };
    for field in PATH_LISTS {
        for s in strings(k.get(*field)) {
            // Generators and transformers may also be inline YAML documents, not paths.
            if !s.contains('\n') {
                out.push((field.to_string(), s));
            }
        }
    }
    for (list, key) in ITEM_PATHS {
        for item in k.get(*list).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
            if let Some(p) = item.get(*key).and_then(Value::as_str) {
                out.push((format!("{list}.{key}"), p.to_string()));
            }
        }
    }
    for g in GENERATORS {
        for item in k.get(*g).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
            for f in strings(item.get("files")) {
                let path = f.split_once('=').map_or(f.as_str(), |(_, p)| p).to_string();
                out.push((format!("{g}.files"), path));
            }
            for f in strings(item.get("envs")) {
                out.push((format!("{g}.envs"), f));
            }
            if let Some(f) = item.get("env").and_then(Value::as_str) {
                out.push((format!("{g}.env"), f.to_string()));
            }
        }
    }
    if let Some(p) = k.pointer("/openapi/path").and_then(Value::as_str) {
        out.push(("openapi.path".into(), p.to_string()));
    }
    out
}

/// Checks every kustomization in `files` (the renderer's private copy). Returns the remote references that
/// `allow` lets through (the build then needs the network), or why the build is refused, naming the file
/// and field.
pub fn check(files: &Tree, allow: &[String]) -> Result<Vec<String>, String> {
    let mut remote = Vec::new();
    for (path, bytes) in files.iter().filter(|(p, _)| is_kustomization(p)) {
        let Ok(text) = std::str::from_utf8(bytes) else { continue };
        // An unreadable kustomization is Kustomize's to report.
        let Ok(k) = crate::yaml::parse_one(text) else { continue };
        if let Some(field) = REFUSED.iter().find(|f| k.get(**f).is_some()) {
            return Err(format!(
                "{path}: {field}: Kustomize's Helm support is refused (it fetches charts over the network and runs \
                 helm outside the renderer's limits); render the chart with a helm source in app.yaml"
            ));
        }
        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
        for (field, value) in entries(&k) {
            let allowed = || allow.iter().any(|a| value.starts_with(a.as_str()));
            if looks_remote(&value) {
                if !allowed() {
                    return Err(refused_remote(path, &field, &value));
                }
                remote.push(value);
                continue;
            }
            if value.starts_with('/') {
                return Err(format!(
                    "{path}: {field}: {value:?} is an absolute path: the renderer reads only the app's files"
                ));
            }
            let joined = if dir.is_empty() { value.clone() } else { format!("{dir}/{value}") };
            let Some(resolved) = normalize(&joined) else {
                return Err(format!(
                    "{path}: {field}: {value:?} points outside the files the renderer may read (share a base with \
                     kustomize.include in app.yaml)"
                ));
            };
            // `github.com/org/repo/path?ref=v1`: a remote base written without a scheme, when no such local path exists.
            let host = value.split('/').next().unwrap_or_default();
            if !exists(files, &resolved) && host.contains('.') && value.contains('/') && !host.starts_with('.') {
                if !allowed() {
                    return Err(refused_remote(path, &field, &value));
                }
                remote.push(value);
            }
        }
    }
    Ok(remote)
}

fn refused_remote(path: &str, field: &str, value: &str) -> String {
    format!(
        "{path}: {field}: remote resource {value:?} is refused: renderers do not reach the network (allow it in \
         fleet.yaml, renderers.allowRemote, or vendor it into the repository)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Tree {
        files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect()
    }

    #[test]
    fn local_paths_pass_and_remote_ones_are_refused_unless_allowed() {
        let ok = tree(&[
            (
                "base/kustomization.yaml",
                "resources: [cm.yaml]\nconfigMapGenerator:\n- name: x\n  files: [k=data.txt]\n",
            ),
            ("base/cm.yaml", ""),
            ("base/data.txt", ""),
            ("overlays/eu/kustomization.yaml", "resources: [../../base]\npatches:\n- path: p.yaml\n"),
        ]);
        assert_eq!(check(&ok, &[]), Ok(vec![]));
        for (field, remote) in [
            ("resources", "https://127.0.0.1:8080/cm.yaml"),
            ("resources", "github.com/kubernetes-sigs/kustomize/examples/helloWorld?ref=v5.0.0"),
            ("bases", "git@github.com:org/repo.git//base"),
            ("components", "ssh://git@example.com/repo//c"),
        ] {
            let t = tree(&[("kustomization.yaml", &format!("{field}: ['{remote}']\n"))]);
            let e = check(&t, &[]).unwrap_err();
            assert!(e.starts_with(&format!("kustomization.yaml: {field}: remote resource")), "{e}");
            assert!(e.contains("renderers.allowRemote"), "{e}");
            assert_eq!(check(&t, &[remote[..12].to_string()]), Ok(vec![remote.to_string()]), "allowed by prefix");
        }
    }

    #[test]
    fn paths_leaving_the_copy_and_helm_charts_are_refused() {
        let t = tree(&[("a/kustomization.yaml", "resources: [../../etc]\n")]);
        assert!(check(&t, &[]).unwrap_err().contains("points outside the files the renderer may read"));
        let t = tree(&[("kustomization.yaml", "configMapGenerator:\n- name: x\n  files: [/etc/passwd]\n")]);
        assert!(check(&t, &[]).unwrap_err().contains("configMapGenerator.files: \"/etc/passwd\" is an absolute path"));
        let t = tree(&[("kustomization.yaml", "helmCharts:\n- name: x\n  repo: https://charts.example.com\n")]);
        assert!(check(&t, &[]).unwrap_err().starts_with("kustomization.yaml: helmCharts: Kustomize's Helm support"));
        let t = tree(&[("kustomization.yaml", "generators:\n- |\n  apiVersion: builtins/v1\n  kind: X\n")]);
        assert_eq!(check(&t, &[]), Ok(vec![]), "inline generator documents are not paths");
    }
}
