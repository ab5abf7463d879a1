//! The fleet repository as data, free of I/O: the hub hands over the files of one commit (path → bytes) and
//! gets the cluster inventory, the apps, and each cluster's desired state as content-addressed bundles.
//!
//! ```text
//! clusters/<name>.yaml    labels: {region: eu, tier: prod}
//! apps/<app>/app.yaml     namespace: shop
//!                         targets: [{selector: {matchLabels: {tier: prod}}}]
//! apps/<app>/**.yaml|yml|json   plain manifests (multi-document YAML, JSON objects or arrays)
//! ```
//!
//! A broken app (a YAML error, a document without kind or name) carries its error with file and line, and
//! only that app is affected: the hub keeps the app's previous good bundle where it has one.

use crate::selector::LabelSelector;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The files of one commit: path (relative to the repository root, `/`-separated) → contents.
pub type Tree = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("{file}:{line}: {message}")]
    Yaml { file: String, line: usize, message: String },
    #[error("{file}:{line}: the document has no {field}")]
    MissingField { file: String, line: usize, field: &'static str },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{file}: {object} is defined twice in this app (also in {other})")]
    DuplicateObject { file: String, object: String, other: String },
}

/// A cluster of the inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub values: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    namespace: String,
    #[serde(default)]
    targets: Vec<TargetFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    #[serde(default)]
    selector: LabelSelector,
}

/// The content address of a bundle: `sha256:<hex>`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The rendered, canonical content of one app: what an agent applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// One JSON object per line, keys sorted, objects in apply order.
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub objects: usize,
}

impl Bundle {
    fn new(mut objects: Vec<Value>) -> Bundle {
        objects.sort_by_key(sort_key);
        let mut bytes = Vec::new();
        for o in &objects {
            bytes.extend_from_slice(canonical_json(o).as_bytes());
            bytes.push(b'\n');
        }
        let digest = digest_of(&bytes);
        Bundle { bytes, digest, objects: objects.len() }
    }

    /// The objects of a bundle, in apply order.
    pub fn parse(bytes: &[u8]) -> Result<Vec<Value>, serde_json::Error> {
        bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(serde_json::from_slice).collect()
    }
}

#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    pub namespace: String,
    pub targets: Vec<LabelSelector>,
    pub bundle: Result<Bundle, FleetError>,
}

/// The fleet at one commit.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub clusters: BTreeMap<String, ClusterSpec>,
    pub apps: BTreeMap<String, App>,
    /// Problems outside any app's manifests: an unreadable cluster file, a broken app.yaml.
    pub errors: Vec<FleetError>,
}

/// Kinds that are not namespaced; everything else gets the app's namespace when it names none.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "Node",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "APIService",
];

fn kind_rank(kind: &str) -> u8 {
    match kind {
        "CustomResourceDefinition" => 0,
        "Namespace" => 1,
        k if CLUSTER_SCOPED.contains(&k) => 2,
        _ => 3,
    }
}

fn str_at<'a>(o: &'a Value, p: &str) -> &'a str {
    o.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn sort_key(o: &Value) -> (u8, String, String, String, String) {
    let kind = str_at(o, "/kind");
    (
        kind_rank(kind),
        str_at(o, "/apiVersion").split('/').next().unwrap_or_default().to_string(),
        kind.to_string(),
        str_at(o, "/metadata/namespace").to_string(),
        str_at(o, "/metadata/name").to_string(),
    )
}

/// JSON with object keys sorted, so equal objects always give equal bytes.
pub fn canonical_json(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = Map::new();
                for k in keys {
                    out.insert(k.clone(), sorted(&m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

fn yaml_error(file: &str, e: &serde_yaml::Error) -> FleetError {
    let line = e.location().map_or(1, |l| l.line());
    FleetError::Yaml { file: file.to_string(), line, message: e.to_string() }
}

/// Start line (1-based) of each YAML document in `text`.
fn document_lines(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    for (i, l) in text.lines().enumerate() {
        if l.starts_with("---") {
            if i == 0 {
                starts[0] = 2;
            } else {
                starts.push(i + 2);
            }
        }
    }
    starts
}

/// Parses one manifest file into objects with their line.
fn manifests(file: &str, bytes: &[u8]) -> Result<Vec<(usize, Value)>, FleetError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| FleetError::Invalid { file: file.to_string(), message: format!("not UTF-8: {e}") })?;
    if file.ends_with(".json") {
        let v: Value = serde_json::from_str(text).map_err(|e| FleetError::Yaml {
            file: file.to_string(),
            line: e.line(),
            message: e.to_string(),
        })?;
        return Ok(match v {
            Value::Array(items) => items.into_iter().map(|i| (1, i)).collect(),
            other => vec![(1, other)],
        });
    }
    let lines = document_lines(text);
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc).map_err(|e| yaml_error(file, &e))?;
        if !v.is_null() {
            out.push((lines.get(i).copied().unwrap_or(1), v));
        }
    }
    Ok(out)
}

fn build_app(namespace: &str, files: &[(&String, &Vec<u8>)]) -> Result<Bundle, FleetError> {
    let mut objects = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (file, bytes) in files {
        for (line, mut obj) in manifests(file, bytes)? {
            let missing = |field| FleetError::MissingField { file: file.to_string(), line, field };
            if !obj.is_object() {
                return Err(FleetError::Yaml {
                    file: file.to_string(),
                    line,
                    message: "a manifest must be a mapping".into(),
                });
            }
            let kind =
                obj.get("kind").and_then(Value::as_str).filter(|k| !k.is_empty()).ok_or(missing("kind"))?.to_string();
            if obj.get("apiVersion").and_then(Value::as_str).is_none_or(str::is_empty) {
                return Err(missing("apiVersion"));
            }
            let oname = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or(missing("metadata.name"))?
                .to_string();
            if !CLUSTER_SCOPED.contains(&kind.as_str()) && obj.pointer("/metadata/namespace").is_none() {
                obj["metadata"]["namespace"] = Value::String(namespace.to_string());
            }
            let ns = str_at(&obj, "/metadata/namespace").to_string();
            let id = if ns.is_empty() { format!("{kind} {oname}") } else { format!("{kind} {ns}/{oname}") };
            let here = format!("{file}:{line}");
            if let Some(other) = seen.insert(id.clone(), here) {
                return Err(FleetError::DuplicateObject { file: format!("{file}:{line}"), object: id, other });
            }
            objects.push(obj);
        }
    }
    Ok(Bundle::new(objects))
}

/// Reads the fleet from the files of one commit.
pub fn parse(tree: &Tree) -> Fleet {
    let mut fleet = Fleet::default();
    for (path, bytes) in tree.range("clusters/".to_string()..) {
        let Some(file) = path.strip_prefix("clusters/") else { break };
        let Some(name) = file.strip_suffix(".yaml").or_else(|| file.strip_suffix(".yml")) else { continue };
        if name.contains('/') {
            continue;
        }
        if !crate::identity::valid_name(name) {
            fleet.errors.push(FleetError::Invalid {
                file: path.clone(),
                message: format!("cluster name {name:?} is invalid: use lowercase letters, digits, '-' and '.'"),
            });
            continue;
        }
        let spec = if bytes.iter().all(u8::is_ascii_whitespace) {
            Ok(ClusterSpec::default())
        } else {
            serde_yaml::from_slice::<ClusterSpec>(bytes).map_err(|e| yaml_error(path, &e))
        };
        match spec {
            Ok(s) => {
                fleet.clusters.insert(name.to_string(), s);
            }
            Err(e) => fleet.errors.push(e),
        }
    }
    let mut app_files: BTreeMap<&str, Vec<(&String, &Vec<u8>)>> = BTreeMap::new();
    for (path, bytes) in tree.range("apps/".to_string()..) {
        let Some(rest) = path.strip_prefix("apps/") else { break };
        let Some((app, _)) = rest.split_once('/') else { continue };
        app_files.entry(app).or_default().push((path, bytes));
    }
    for (app, files) in app_files {
        let app_yaml = format!("apps/{app}/app.yaml");
        let Some(spec_bytes) = tree.get(&app_yaml) else {
            fleet
                .errors
                .push(FleetError::Invalid { file: format!("apps/{app}/"), message: "app.yaml is missing".into() });
            continue;
        };
        let spec = match serde_yaml::from_slice::<AppFile>(spec_bytes) {
            Ok(s) => s,
            Err(e) => {
                fleet.errors.push(yaml_error(&app_yaml, &e));
                continue;
            }
        };
        let mut targets = Vec::new();
        let mut bad_target = None;
        for (i, t) in spec.targets.iter().enumerate() {
            match t.selector.validate() {
                Ok(()) => targets.push(t.selector.clone()),
                Err(e) => {
                    bad_target = Some(FleetError::Invalid {
                        file: app_yaml.clone(),
                        message: format!("targets[{i}].selector.{e}"),
                    })
                }
            }
        }
        if let Some(e) = bad_target {
            fleet.errors.push(e);
            continue;
        }
        let manifests: Vec<(&String, &Vec<u8>)> = files
            .into_iter()
            .filter(|(p, _)| **p != app_yaml)
            .filter(|(p, _)| p.ends_with(".yaml") || p.ends_with(".yml") || p.ends_with(".json"))
            .collect();
        let bundle = build_app(&spec.namespace, &manifests);
        fleet.apps.insert(app.to_string(), App { name: app.to_string(), namespace: spec.namespace, targets, bundle });
    }
    fleet
}

impl Fleet {
    /// The apps a cluster receives, or None when the cluster is not in the inventory (it gets nothing).
    pub fn apps_for(&self, cluster: &str) -> Option<Vec<&App>> {
        let spec = self.clusters.get(cluster)?;
        Some(self.apps.values().filter(|a| a.targets.iter().any(|t| t.matches(&spec.labels))).collect())
    }

    /// Apps whose targets match no cluster: reported, never silently ignored.
    pub fn untargeted_apps(&self) -> Vec<&str> {
        self.apps
            .values()
            .filter(|a| !self.clusters.values().any(|c| a.targets.iter().any(|t| t.matches(&c.labels))))
            .map(|a| a.name.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Tree {
        files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect()
    }

    const WEB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";

    fn example() -> Tree {
        tree(&[
            ("clusters/eu-1.yaml", "labels: {region: eu, tier: prod}\n"),
            ("clusters/us-1.yaml", "labels: {region: us, tier: prod}\n"),
            ("clusters/lab.yaml", "labels: {tier: dev}\n"),
            ("apps/shop/app.yaml", "namespace: shop\ntargets:\n- selector: {matchLabels: {tier: prod}}\n"),
            ("apps/shop/web.yaml", WEB),
            ("apps/shop/README.md", "not a manifest"),
            ("apps/eu-only/app.yaml", "namespace: eu\ntargets:\n- selector:\n    matchExpressions: [{key: region, operator: In, values: [eu]}]\n"),
            ("apps/eu-only/cm.json", r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}"#),
            ("apps/nowhere/app.yaml", "namespace: x\ntargets:\n- selector: {matchLabels: {tier: nope}}\n"),
        ])
    }

    #[test]
    fn targeting_by_labels_and_expressions() {
        let f = parse(&example());
        assert!(f.errors.is_empty(), "{:?}", f.errors);
        let names = |c: &str| f.apps_for(c).unwrap().iter().map(|a| a.name.clone()).collect::<Vec<_>>();
        assert_eq!(names("eu-1"), vec!["eu-only", "shop"]);
        assert_eq!(names("us-1"), vec!["shop"]);
        assert!(names("lab").is_empty());
        assert!(f.apps_for("not-in-inventory").is_none(), "a cluster not listed gets nothing");
        assert_eq!(f.untargeted_apps(), vec!["nowhere"]);
    }

    #[test]
    fn bundles_are_canonical_and_ordered() {
        let f = parse(&example());
        let b = f.apps["shop"].bundle.as_ref().unwrap();
        let objs = Bundle::parse(&b.bytes).unwrap();
        assert_eq!(objs[0]["kind"], "Namespace", "namespaces before namespaced objects");
        assert_eq!(objs[1]["metadata"]["namespace"], "shop", "the app's namespace is filled in");
        assert!(objs[0]["metadata"].get("namespace").is_none());
        // The same content in another key order and file layout has the same digest.
        let reordered = "kind: Namespace\nmetadata: {name: shop}\napiVersion: v1\n---\nspec: {replicas: 1}\nmetadata: {name: web, namespace: shop}\nkind: Deployment\napiVersion: apps/v1\n";
        let mut t = example();
        t.insert("apps/shop/web.yaml".into(), reordered.as_bytes().to_vec());
        assert_eq!(parse(&t).apps["shop"].bundle.as_ref().unwrap().digest, b.digest);
        t.insert("apps/shop/web.yaml".into(), WEB.replace("replicas: 1", "replicas: 2").into_bytes());
        assert_ne!(parse(&t).apps["shop"].bundle.as_ref().unwrap().digest, b.digest);
    }

    #[test]
    fn a_broken_manifest_names_file_and_line_and_affects_only_its_app() {
        let mut t = example();
        t.insert(
            "apps/shop/web.yaml".into(),
            b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ok\n---\napiVersion: v1\nmetadata:\n  name: nokind\n"
                .to_vec(),
        );
        let f = parse(&t);
        let err = f.apps["shop"].bundle.as_ref().unwrap_err();
        assert_eq!(err.to_string(), "apps/shop/web.yaml:6: the document has no kind");
        assert!(f.apps["eu-only"].bundle.is_ok());

        t.insert(
            "apps/shop/web.yaml".into(),
            b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n".to_vec(),
        );
        let err = parse(&t).apps["shop"].bundle.clone().unwrap_err();
        assert!(matches!(err, FleetError::Yaml { ref file, .. } if file == "apps/shop/web.yaml"), "{err}");
        assert!(err.to_string().contains("while parsing a flow sequence at line 4"), "{err}");

        t.insert("apps/shop/web.yaml".into(), b"apiVersion: v1\nkind: ConfigMap\n".to_vec());
        assert_eq!(
            parse(&t).apps["shop"].bundle.clone().unwrap_err().to_string(),
            "apps/shop/web.yaml:1: the document has no metadata.name"
        );

        t.insert("apps/shop/dup.yaml".into(), b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n".to_vec());
        t.insert("apps/shop/web.yaml".into(), b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n".to_vec());
        let err = parse(&t).apps["shop"].bundle.clone().unwrap_err().to_string();
        assert_eq!(
            err,
            "apps/shop/web.yaml:1: ConfigMap shop/x is defined twice in this app (also in apps/shop/dup.yaml:1)"
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// The digest depends on the objects, not on how they are spread over documents and files.
        #[test]
        fn digest_ignores_document_order(order in Just((0..6).collect::<Vec<usize>>()).prop_shuffle()) {
            let docs: Vec<String> = (0..6).map(|i| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\ndata: {{k: v{i}}}\n")).collect();
            let forward = docs.join("---\n");
            let shuffled: Vec<String> = order.iter().map(|i| docs[*i].clone()).collect();
            let (a, b) = shuffled.split_at(3);
            let mut t1 = example();
            t1.insert("apps/shop/web.yaml".into(), forward.into_bytes());
            let mut t2 = example();
            t2.insert("apps/shop/web.yaml".into(), a.join("---\n").into_bytes());
            t2.insert("apps/shop/more.yaml".into(), b.join("---\n").into_bytes());
            let d1 = parse(&t1).apps["shop"].bundle.clone().unwrap().digest;
            let d2 = parse(&t2).apps["shop"].bundle.clone().unwrap().digest;
            prop_assert_eq!(d1, d2);
        }
    }

    #[test]
    fn inventory_and_app_spec_errors_are_reported() {
        let mut t = example();
        t.insert("clusters/Bad_Name.yaml".into(), b"labels: {}\n".to_vec());
        t.insert("clusters/eu-2.yaml".into(), b"labels: {region: eu}\nlabel: typo\n".to_vec());
        t.insert(
            "apps/broken/app.yaml".into(),
            b"namespace: x\ntargets:\n- selector: {matchExpressions: [{key: a, operator: In}]}\n".to_vec(),
        );
        t.insert("apps/orphan/cm.yaml".into(), b"kind: ConfigMap\n".to_vec());
        let f = parse(&t);
        let errs: Vec<String> = f.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(errs.iter().any(|e| e.starts_with("clusters/Bad_Name.yaml: cluster name")));
        assert!(errs.iter().any(|e| e.starts_with("clusters/eu-2.yaml:2: unknown field `label`")), "{errs:#?}");
        assert!(errs.iter().any(|e| e
            == "apps/broken/app.yaml: targets[0].selector.matchExpressions[0]: operator In needs at least one value"));
        assert!(errs.iter().any(|e| e == "apps/orphan/: app.yaml is missing"));
        assert!(!f.clusters.contains_key("eu-2"));
    }
}
