//! The fleet repository as data, free of I/O: the hub hands over the files of one commit (path → bytes) and
//! gets the cluster inventory and the apps with their sources, values and targets. [`render`] turns them into
//! each cluster's content-addressed bundles. The format is documented in `docs/fleet-repo.md`.
//!
//! ```text
//! fleet.yaml              optional repository-wide defaults: namespace, values
//! clusters/<name>.yaml    labels: {region: eu, tier: prod}
//!                         values: {replicas: 3}
//! apps/<app>/app.yaml     namespace, source (manifests | kustomize | helm), values, targets
//! apps/<app>/**           the app's manifests, kustomizations or chart
//! ```
//!
//! Problems name file, line and field. A broken app or cluster file affects that app or cluster alone: the hub
//! keeps its previous desired state and shows the error.

pub mod kustomize;
pub mod objects;
pub mod policy;
pub mod render;
pub mod vars;

pub use objects::{canonical_json, digest_of, Bundle, POLICY_KEY};

use crate::selector::LabelSelector;
use objects::yaml_error;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The files of one commit: path (relative to the repository root, `/`-separated) → contents.
pub type Tree = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("{file}:{line}: {message}")]
    Yaml { file: String, line: usize, message: String },
    #[error("{file}:{line}: {field}: {message}")]
    Field { file: String, line: usize, field: String, message: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{origin}: the document has no {field}")]
    MissingField { origin: String, field: &'static str },
    #[error("{origin}: {message}")]
    Object { origin: String, message: String },
    #[error("{origin}: {object} is defined twice in this app (also at {other})")]
    DuplicateObject { origin: String, object: String, other: String },
    #[error("{origin}: {message} (cluster {cluster})")]
    Variable { origin: String, cluster: String, message: String },
    #[error("apps/{app}: {message}")]
    Render { app: String, message: String },
    #[error("{origin}: {object} is refused: {message}")]
    Policy { origin: String, object: String, message: String },
    #[error("{object} is claimed by apps {first} and {second} on cluster {cluster}; an object belongs to one app")]
    Conflict { object: String, first: String, second: String, cluster: String },
}

/// A cluster of the inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub values: Map<String, Value>,
    /// A disabled cluster stays in the inventory, but its agent's sessions are refused (a lost or
    /// decommissioned cluster): it is sent nothing and its certificate cannot be renewed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// `fleet.yaml`: repository-wide defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// The namespace of apps that name none.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Values every cluster starts from (lowest precedence).
    #[serde(default)]
    pub values: Map<String, Value>,
    /// The namespace agents keep their state in (`flotilla-system`): no app may write there.
    #[serde(default)]
    pub agent_namespace: Option<String>,
    #[serde(default)]
    pub renderers: RendererSettings,
}

/// `fleet.yaml` `renderers:`: what Kustomize and Helm may reach beyond the repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RendererSettings {
    /// Remote Kustomize resources and bases allowed (URL prefixes, `https://github.com/org/repo//path?ref=v1`);
    /// any other remote reference is refused before the renderer starts.
    #[serde(default)]
    pub allow_remote: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AppFile {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    manifests: Option<PathSpec>,
    #[serde(default)]
    kustomize: Option<KustomizeFile>,
    #[serde(default)]
    helm: Option<HelmFile>,
    #[serde(default)]
    values: Map<String, Value>,
    #[serde(default)]
    targets: Vec<TargetFile>,
    #[serde(default)]
    sync: SyncPolicy,
    #[serde(default)]
    health: Vec<crate::health::HealthRule>,
    #[serde(default)]
    rollout: Option<crate::rollout::RolloutSpec>,
    #[serde(default)]
    substitution: Option<SubstitutionFile>,
    /// Files of the app directory that are not part of the app (globs: `docs/**`, `**/*_test.yaml`).
    #[serde(default)]
    exclude: Vec<String>,
}

/// `substitution: false`, or `substitution: {skip: [globs]}`: where `${…}` is left as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SubstitutionFile {
    On(bool),
    Skip { skip: Vec<String> },
}

/// Where the app's `${…}` variables are substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Substitution {
    /// Everywhere (objects may still opt out with `flotilla.dev/substitution: "off"`).
    #[default]
    On,
    /// Nowhere: upstream files with their own `${…}` (Grafana dashboards) stay as written.
    Off,
    /// Not in the files these globs match (paths relative to the app's directory).
    Skip(Vec<String>),
}

/// An object with this annotation set to "off" is never substituted.
pub const SUBSTITUTION_ANNOTATION: &str = "flotilla.dev/substitution";

/// Whether `path` (relative to the app) matches a glob of `patterns` (`*` stays inside one directory, `**`
/// crosses them).
pub fn path_matches(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|p| {
        globset::GlobBuilder::new(p).literal_separator(true).build().is_ok_and(|g| g.compile_matcher().is_match(path))
    })
}

/// How the agent keeps an app: pruning, drift handling, fields it leaves to other controllers.
///
/// The policy structs travel in bundles and are read by agents of every version: unknown fields are refused
/// where a person wrote them (app.yaml, [`app_spec`]) and ignored with a warning by an agent that reads a
/// bundle from a newer hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncPolicy {
    /// Delete objects that left the app (only objects the agent created; never protected ones).
    #[serde(default = "yes")]
    pub prune: bool,
    #[serde(default)]
    pub drift: DriftMode,
    /// Fields other controllers own by design: neither drift nor applied over once the object exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<IgnoreRule>,
    /// Guarded kinds (Namespace, CustomResourceDefinition, PersistentVolumeClaim) the app allows pruning
    /// of; without it they stay in place when they leave the app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_prune_of: Vec<String>,
    /// Confirms a prune that deletes more than half of the app's objects at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_mass_prune: bool,
    /// Take over objects that exist in the cluster although the fleet did not create them (one object: the
    /// `flotilla.dev/adopt: "true"` annotation). Without it such an object is reported as "exists, not ours"
    /// and left alone. An adopted object is released, never deleted, when it leaves the app.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
}

/// Kinds never pruned unless the app lists them in `sync.allowPruneOf`: deleting them takes data or other
/// objects with them.
pub const GUARDED_KINDS: &[&str] = &["Namespace", "CustomResourceDefinition", "PersistentVolumeClaim"];

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy {
            prune: true,
            drift: DriftMode::Correct,
            ignore: Vec::new(),
            allow_prune_of: Vec::new(),
            allow_mass_prune: false,
            adopt: false,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftMode {
    /// Put drifted fields back within seconds.
    #[default]
    Correct,
    /// Report drift with path, desired and live values; change nothing.
    Report,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoreRule {
    pub kind: String,
    /// The API group; absent matches the kind in any group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// One object only; absent matches every object of the kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Paths (`/spec/replicas`, `/spec/template/spec/containers[name=web]/image`; see
    /// [`crate::drift`]); a path covers everything below it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Field managers (`kube-controller-manager`, `hpa`) whose fields in the live object are not drift.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub managers: Vec<String>,
}

impl IgnoreRule {
    pub fn matches(&self, o: &Value) -> bool {
        let s = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let group = s("/apiVersion").split_once('/').map_or("", |(g, _)| g);
        self.kind == s("/kind")
            && self.group.as_deref().is_none_or(|g| g == group)
            && self.name.as_deref().is_none_or(|n| n == s("/metadata/name"))
    }
}

/// What the agent needs besides the objects: travels in the bundle, so it is content-addressed and kept
/// with the bundle in the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPolicy {
    #[serde(default)]
    pub sync: SyncPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<crate::health::HealthRule>,
    /// The app's namespace, for objects whose scope only the cluster knows (a custom resource whose CRD
    /// another app brings): the agent puts them there when discovery says their kind is namespaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// What the app may write (checked again by the agent); absent in bundles of older hubs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<policy::Guard>,
}

impl AppPolicy {
    /// The ignored paths for one object (invalid paths were refused in app.yaml; any left are skipped).
    pub fn ignored_paths(&self, o: &Value) -> Vec<crate::drift::FieldPath> {
        self.sync
            .ignore
            .iter()
            .filter(|r| r.matches(o))
            .flat_map(|r| r.paths.iter().filter_map(|p| p.parse().ok()))
            .collect()
    }

    /// The managers whose fields are not drift, for one object.
    pub fn ignored_managers(&self, o: &Value) -> Vec<String> {
        self.sync.ignore.iter().filter(|r| r.matches(o)).flat_map(|r| r.managers.iter().cloned()).collect()
    }

    /// Reads a policy written by a hub of any version: fields this version does not know are skipped and
    /// named (for a warning), never an error.
    pub fn lenient(v: Value) -> Result<(AppPolicy, Vec<String>), serde_json::Error> {
        let mut unknown = Vec::new();
        let policy = serde_ignored::deserialize(v, |path| unknown.push(path.to_string()))?;
        Ok((policy, unknown))
    }
}

/// The most one file of an app may hold; a larger file is refused on its app (readers never load it whole).
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// The most files, and bytes, one app may have.
pub const MAX_APP_FILES: usize = 10_000;
pub const MAX_APP_BYTES: usize = 64 << 20;
/// What a reader puts in a [`Tree`] in place of a file over [`MAX_FILE_BYTES`]: this, then the size in bytes.
pub const OVERSIZED: &[u8] = b"\0flotilla: file over the size limit: ";

/// The placeholder for a file of `size` bytes that is too large to read.
pub fn oversized(size: u64) -> Vec<u8> {
    let mut v = OVERSIZED.to_vec();
    v.extend_from_slice(size.to_string().as_bytes());
    v
}

/// Why an app's files are too many or too large, if they are.
fn too_large(files: &Tree) -> Option<String> {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    for (f, bytes) in files {
        if let Some(size) = bytes.strip_prefix(OVERSIZED) {
            let size: u64 = String::from_utf8_lossy(size).parse().unwrap_or(0);
            return Some(format!("{f} is {}: files over {} are refused", mib(size), mib(MAX_FILE_BYTES)));
        }
    }
    if files.len() > MAX_APP_FILES {
        return Some(format!("the app has {} files: at most {MAX_APP_FILES} are read", files.len()));
    }
    let total: usize = files.values().map(Vec::len).sum();
    (total > MAX_APP_BYTES)
        .then(|| format!("the app's files hold {}: at most {} are read", mib(total as u64), mib(MAX_APP_BYTES as u64)))
}

/// Why an app is refused before any of its files is read: too large, an unsafe tree entry, an invalid name.
fn app_refusal(app: &str, files: &Tree) -> Option<String> {
    if let Some(why) = too_large(files) {
        return Some(why);
    }
    if let Some((f, why)) = files.keys().find_map(|f| unsafe_path(f).map(|why| (f, why))) {
        return Some(format!(
            "the repository tree has an entry {f:?} with {why}: refused (nothing of the app is read or written)"
        ));
    }
    (!valid_app_name(app)).then(|| {
        format!(
            "app name {app:?} is invalid: an app's directory name is a DNS label (lowercase letters, digits and '-', \
             at most 53 characters)"
        )
    })
}

/// Why a path from a repository tree is not safe to read or write, if it is not: every component must be a
/// plain name (no empty, `.`, `..` or `.git` component, no absolute path, no backslash or NUL). A Git server
/// without `receive.fsckObjects` accepts trees with such entries; materializing one would write outside the
/// directory it is written in.
pub fn unsafe_path(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("an empty path");
    }
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Some("an absolute path, a backslash or a NUL byte");
    }
    for part in path.split('/') {
        match part {
            "" => return Some("an empty path component"),
            "." | ".." => return Some("a . or .. path component"),
            p if p.trim_end_matches(['.', ' ']).eq_ignore_ascii_case(".git") => return Some("a .git path component"),
            _ => {}
        }
    }
    None
}

/// An app's name is its directory: a DNS label of at most 53 characters (it names ConfigMaps and labels).
pub fn valid_app_name(name: &str) -> bool {
    name.len() <= 53
        && !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathSpec {
    #[serde(default = "dot")]
    path: String,
}

fn dot() -> String {
    ".".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KustomizeFile {
    #[serde(default = "dot")]
    path: String,
    /// Directories of the repository outside the app that its kustomizations use (shared bases), relative to
    /// the app's directory: `../../bases/web`.
    #[serde(default)]
    include: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HelmFile {
    chart: String,
    #[serde(default)]
    release_name: Option<String>,
    #[serde(default)]
    values_files: Vec<String>,
    #[serde(default)]
    values: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TargetFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    selector: LabelSelector,
    #[serde(default)]
    values: Map<String, Value>,
    #[serde(default)]
    kustomize: Option<PathSpec>,
    #[serde(default)]
    helm: Option<HelmTargetFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HelmTargetFile {
    #[serde(default)]
    values_files: Vec<String>,
    #[serde(default)]
    values: Map<String, Value>,
}

/// Where an app's objects come from. Paths are relative to the app's directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Plain manifests: every `.yaml`, `.yml` and `.json` file under `path`, recursively.
    Manifests {
        path: String,
    },
    /// A kustomization at `path` (a target may name an overlay instead).
    Kustomize {
        path: String,
        /// Shared directories of the repository the build may read (repository-relative, normalized).
        include: Vec<String>,
    },
    Helm(HelmSource),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HelmSource {
    /// The chart's directory.
    pub chart: String,
    pub release_name: String,
    pub values_files: Vec<String>,
    pub values: Map<String, Value>,
}

/// One target of an app: which clusters, and how the app differs there.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub selector: LabelSelector,
    pub values: Map<String, Value>,
    /// A Kustomize overlay used on these clusters instead of the source's path.
    pub kustomize_path: Option<String>,
    pub helm_values_files: Vec<String>,
    pub helm_values: Map<String, Value>,
}

#[derive(Debug, Clone)]
pub struct AppSpec {
    pub namespace: String,
    pub substitution: Substitution,
    pub policy: AppPolicy,
    /// The app's own waves, replacing rollout.yaml's for this app.
    pub rollout: Option<crate::rollout::RolloutSpec>,
    pub source: Source,
    pub values: Map<String, Value>,
    /// A cluster takes its customization from the first target that selects it.
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    /// The app's files, paths relative to `apps/<app>/`.
    pub files: Arc<Tree>,
    /// Shared directories its kustomizations read (`kustomize.include`), repository-relative.
    pub included: Arc<Tree>,
    /// sha256 over the app's files and the included ones: part of every render's content address.
    pub tree_digest: String,
    /// A broken app.yaml (or fleet.yaml) is an error on the app; clusters keep its previous state.
    pub spec: Result<AppSpec, FleetError>,
}

/// The fleet at one commit.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub defaults: Defaults,
    /// `rollout.yaml`: the fleet-wide waves (none: a commit reaches every cluster at once). A broken file is
    /// an error here; rollouts of this commit are blocked and running ones continue.
    pub rollout: Option<Result<crate::rollout::RolloutSpec, FleetError>>,
    pub clusters: BTreeMap<String, ClusterSpec>,
    /// Cluster files that could not be read: those clusters keep their previous desired state.
    pub broken_clusters: BTreeMap<String, FleetError>,
    pub apps: BTreeMap<String, App>,
    /// `policies/*.yaml`, by file.
    pub policies: BTreeMap<String, policy::PolicyFile>,
}

/// The line of the first occurrence of `needle` in `text` (1 when absent): for errors found after parsing.
fn line_of(text: &[u8], needle: &str) -> usize {
    let text = String::from_utf8_lossy(text);
    text.lines().position(|l| l.contains(needle)).map_or(1, |i| i + 1)
}

/// The file as kubectl and Helm read YAML (1.1 scalars): where values come from, so they keep the types the
/// tools would give them (`0644` is 420). The structure is checked by serde on the same text.
fn yaml11(file: &str, bytes: &[u8]) -> Result<Value, FleetError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| FleetError::Invalid { file: file.to_string(), message: format!("not UTF-8: {e}") })?;
    crate::yaml::parse_one(text).map_err(|e| objects::yaml_error_at(file, e))
}

/// The mapping at `pointer` of a YAML 1.1 reading, if there is one.
fn values_at(raw: &Value, pointer: &str) -> Option<Map<String, Value>> {
    raw.pointer(pointer).and_then(Value::as_object).cloned()
}

fn parse_yaml<T: for<'de> Deserialize<'de> + Default>(file: &str, bytes: &[u8]) -> Result<T, FleetError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_yaml::from_slice(bytes).map_err(|e| yaml_error(file, &e))
}

/// A relative path inside the app: no `..`, not absolute.
fn clean_path(p: &str) -> Option<String> {
    if p.starts_with('/') || p.split('/').any(|s| s == "..") {
        return None;
    }
    let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty() && *s != ".").collect();
    Some(parts.join("/"))
}

/// `apps/x/../../bases/web` → `bases/web`; None when it climbs above the repository.
fn kustomize_path_from_root(p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            x => out.push(x),
        }
    }
    Some(out.join("/"))
}

fn has_file(files: &Tree, dir: &str, names: &[&str]) -> bool {
    names.iter().any(|n| files.contains_key(&if dir.is_empty() { n.to_string() } else { format!("{dir}/{n}") }))
}

fn has_dir(files: &Tree, dir: &str) -> bool {
    dir.is_empty() || files.keys().any(|k| k.starts_with(&format!("{dir}/")))
}

fn app_spec(app: &str, files: &Tree, defaults: &Defaults) -> Result<AppSpec, FleetError> {
    let file = format!("apps/{app}/app.yaml");
    let bytes = files
        .get("app.yaml")
        .ok_or_else(|| FleetError::Invalid { file: format!("apps/{app}/"), message: "app.yaml is missing".into() })?;
    let mut unknown = Vec::new();
    let spec: AppFile =
        serde_ignored::deserialize(serde_yaml::Deserializer::from_slice(bytes), |p| unknown.push(p.to_string()))
            .map_err(|e| yaml_error(&file, &e))?;
    let mut spec = spec;
    let raw = yaml11(&file, bytes)?;
    spec.values = values_at(&raw, "/values").unwrap_or_default();
    if let Some(h) = spec.helm.as_mut() {
        h.values = values_at(&raw, "/helm/values").unwrap_or_default();
    }
    for (i, t) in spec.targets.iter_mut().enumerate() {
        t.values = values_at(&raw, &format!("/targets/{i}/values")).unwrap_or_default();
        if let Some(h) = t.helm.as_mut() {
            h.values = values_at(&raw, &format!("/targets/{i}/helm/values")).unwrap_or_default();
        }
    }
    if let Some(path) = unknown.first() {
        let last = path.rsplit('.').next().unwrap_or(path);
        return Err(FleetError::Field {
            file: file.clone(),
            line: line_of(bytes, &format!("{last}:")),
            field: path.clone(),
            message: "unknown field".into(),
        });
    }
    let text = String::from_utf8_lossy(bytes);
    // The line of the field itself (`targets[3].selector` points at the fourth target's selector), else the
    // first line that mentions `needle`.
    let field = |field: &str, needle: &str, message: String| {
        let owned: Vec<String> = field
            .split('.')
            .flat_map(|part| part.split(['[', ']']).filter(|s| !s.is_empty()).map(str::to_string).collect::<Vec<_>>())
            .collect();
        let path: Vec<&str> = owned.iter().map(String::as_str).collect();
        FleetError::Field {
            file: file.clone(),
            line: crate::yaml::line_of_path(&text, &path).unwrap_or_else(|| line_of(bytes, needle)),
            field: field.to_string(),
            message,
        }
    };
    let namespace =
        spec.namespace.clone().or_else(|| defaults.namespace.clone()).ok_or_else(|| FleetError::Invalid {
            file: file.clone(),
            message: "namespace is missing (set it here or as the default in fleet.yaml)".into(),
        })?;
    if !crate::identity::valid_name(&namespace) || namespace.contains('.') {
        return Err(field("namespace", "namespace", format!("{namespace:?} is not a valid namespace name")));
    }
    for (i, rule) in spec.sync.ignore.iter().enumerate() {
        for (j, p) in rule.paths.iter().enumerate() {
            if let Err(e) = p.parse::<crate::drift::FieldPath>() {
                return Err(field(&format!("sync.ignore[{i}].paths[{j}]"), p, e.to_string()));
            }
        }
        if rule.paths.is_empty() && rule.managers.is_empty() {
            return Err(field(&format!("sync.ignore[{i}]"), "ignore", "an ignore rule names paths or managers".into()));
        }
    }
    for (i, kind) in spec.sync.allow_prune_of.iter().enumerate() {
        if !GUARDED_KINDS.contains(&kind.as_str()) {
            return Err(field(
                &format!("sync.allowPruneOf[{i}]"),
                kind,
                format!("{kind:?} is not a guarded kind (one of {})", GUARDED_KINDS.join(", ")),
            ));
        }
    }
    let path_in = |f: &str, p: &str| {
        clean_path(p).ok_or_else(|| field(f, p, format!("{p:?} must be a relative path inside apps/{app}/")))
    };
    let kustomization = |f: &str, p: &str| -> Result<String, FleetError> {
        let dir = path_in(f, p)?;
        if !has_file(files, &dir, &["kustomization.yaml", "kustomization.yml", "Kustomization"]) {
            return Err(field(f, p, format!("apps/{app}/{p} has no kustomization.yaml")));
        }
        Ok(dir)
    };
    let values_files = |f: &str, list: &[String]| -> Result<Vec<String>, FleetError> {
        list.iter()
            .enumerate()
            .map(|(i, p)| {
                let clean = path_in(&format!("{f}[{i}]"), p)?;
                if !files.contains_key(&clean) {
                    return Err(field(&format!("{f}[{i}]"), p, format!("apps/{app}/{p} does not exist")));
                }
                Ok(clean)
            })
            .collect()
    };
    let source = match (&spec.manifests, &spec.kustomize, &spec.helm) {
        (None, None, None) => Source::Manifests { path: String::new() },
        (Some(m), None, None) => {
            let path = path_in("manifests.path", &m.path)?;
            if !has_dir(files, &path) {
                return Err(field("manifests.path", &m.path, format!("apps/{app}/{} does not exist", m.path)));
            }
            Source::Manifests { path }
        }
        (None, Some(k), None) => {
            let mut include = Vec::new();
            for (i, p) in k.include.iter().enumerate() {
                let f = format!("kustomize.include[{i}]");
                let resolved = (!p.starts_with('/'))
                    .then(|| kustomize_path_from_root(&format!("apps/{app}/{p}")))
                    .flatten()
                    .filter(|r| {
                        let own = format!("apps/{app}");
                        !r.is_empty() && unsafe_path(r).is_none() && *r != own && !r.starts_with(&format!("{own}/"))
                    })
                    .ok_or_else(|| {
                        field(&f, p, format!("{p:?} must name a directory of the repository outside apps/{app}/"))
                    })?;
                include.push(resolved);
            }
            Source::Kustomize { path: kustomization("kustomize.path", &k.path)?, include }
        }
        (None, None, Some(h)) => {
            let chart = path_in("helm.chart", &h.chart)?;
            if !has_file(files, &chart, &["Chart.yaml"]) {
                return Err(field("helm.chart", &h.chart, format!("apps/{app}/{} has no Chart.yaml", h.chart)));
            }
            Source::Helm(HelmSource {
                chart,
                release_name: h.release_name.clone().unwrap_or_else(|| app.to_string()),
                values_files: values_files("helm.valuesFiles", &h.values_files)?,
                values: h.values.clone(),
            })
        }
        _ => {
            return Err(FleetError::Invalid {
                file,
                message: "an app has one source: manifests, kustomize or helm, not several".into(),
            })
        }
    };
    let mut targets = Vec::new();
    for (i, t) in spec.targets.iter().enumerate() {
        let name = t.name.clone().unwrap_or_else(|| format!("targets[{i}]"));
        if let Err(e) = t.selector.validate() {
            let text = e.to_string();
            let (expr, message) = text.split_once(": ").unwrap_or((&text, ""));
            return Err(field(&format!("targets[{i}].selector.{expr}"), "matchExpressions", message.to_string()));
        }
        let kustomize_path = match (&t.kustomize, &source) {
            (None, _) => None,
            (Some(k), Source::Kustomize { .. }) => {
                Some(kustomization(&format!("targets[{i}].kustomize.path"), &k.path)?)
            }
            (Some(_), _) => {
                return Err(field(
                    &format!("targets[{i}].kustomize"),
                    "kustomize",
                    "a Kustomize overlay needs an app with a kustomize source".into(),
                ))
            }
        };
        let (helm_values_files, helm_values) = match (&t.helm, &source) {
            (None, _) => (Vec::new(), Map::new()),
            (Some(h), Source::Helm(_)) => {
                (values_files(&format!("targets[{i}].helm.valuesFiles"), &h.values_files)?, h.values.clone())
            }
            (Some(_), _) => {
                return Err(field(
                    &format!("targets[{i}].helm"),
                    "helm",
                    "Helm values need an app with a helm source".into(),
                ))
            }
        };
        targets.push(Target {
            name,
            selector: t.selector.clone(),
            values: t.values.clone(),
            kustomize_path,
            helm_values_files,
            helm_values,
        });
    }
    if let Err(e) = crate::health::Rules::new(&spec.health) {
        let (what, message) = e.split_once(": ").unwrap_or(("health", &e));
        return Err(field(what, "health", message.to_string()));
    }
    if let Some(r) = &spec.rollout {
        r.validate().map_err(|e| {
            let (what, message) = e.split_once(": ").unwrap_or(("rollout", &e));
            field(&format!("rollout.{what}"), "rollout", message.to_string())
        })?;
    }
    let substitution = match spec.substitution {
        None | Some(SubstitutionFile::On(true)) => Substitution::On,
        Some(SubstitutionFile::On(false)) => Substitution::Off,
        Some(SubstitutionFile::Skip { skip }) => {
            for (i, p) in skip.iter().enumerate() {
                if let Err(e) = globset::Glob::new(p) {
                    return Err(field(&format!("substitution.skip[{i}]"), p, e.kind().to_string()));
                }
            }
            Substitution::Skip(skip)
        }
    };
    for (i, p) in spec.exclude.iter().enumerate() {
        if let Err(e) = globset::Glob::new(p) {
            return Err(field(&format!("exclude[{i}]"), p, e.kind().to_string()));
        }
    }
    let policy = AppPolicy { sync: spec.sync, health: spec.health, namespace: None, guard: None };
    Ok(AppSpec { namespace, substitution, policy, rollout: spec.rollout, source, values: spec.values, targets })
}

fn tree_digest(files: &Tree) -> String {
    let mut h = Sha256::new();
    for (p, c) in files {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
        h.update((c.len() as u64).to_le_bytes());
        h.update(c);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Reads the fleet from the files of one commit.
pub fn parse(tree: &Tree) -> Fleet {
    let mut fleet = Fleet::default();
    let defaults = match tree.get("fleet.yaml") {
        Some(bytes) => parse_yaml::<Defaults>("fleet.yaml", bytes).and_then(|mut d| {
            d.values = values_at(&yaml11("fleet.yaml", bytes)?, "/values").unwrap_or_default();
            Ok(d)
        }),
        None => Ok(Defaults::default()),
    };
    fleet.defaults = defaults.clone().unwrap_or_default();
    fleet.rollout = tree.get("rollout.yaml").map(|bytes| {
        let spec: crate::rollout::RolloutSpec =
            serde_yaml::from_slice(bytes).map_err(|e| yaml_error("rollout.yaml", &e))?;
        spec.validate().map_err(|e| {
            let needle = e.split_once(": ").map_or("waves", |(w, _)| w.split('.').next_back().unwrap_or("waves"));
            let (what, message) = e.split_once(": ").unwrap_or(("waves", &e));
            FleetError::Field {
                file: "rollout.yaml".into(),
                line: line_of(bytes, needle.split('[').next().unwrap_or("waves")),
                field: what.to_string(),
                message: message.to_string(),
            }
        })?;
        Ok(spec)
    });
    for (path, bytes) in tree.range("clusters/".to_string()..) {
        let Some(file) = path.strip_prefix("clusters/") else { break };
        let Some(name) = file.strip_suffix(".yaml").or_else(|| file.strip_suffix(".yml")) else { continue };
        if name.contains('/') {
            continue;
        }
        if !crate::identity::valid_name(name) {
            fleet.broken_clusters.insert(
                name.to_string(),
                FleetError::Invalid {
                    file: path.clone(),
                    message: format!("cluster name {name:?} is invalid: use lowercase letters, digits, '-' and '.'"),
                },
            );
            continue;
        }
        let spec = parse_yaml::<ClusterSpec>(path, bytes).and_then(|mut c| {
            c.values = values_at(&yaml11(path, bytes)?, "/values").unwrap_or_default();
            Ok(c)
        });
        match spec {
            Ok(s) => {
                fleet.clusters.insert(name.to_string(), s);
            }
            Err(e) => {
                fleet.broken_clusters.insert(name.to_string(), e);
            }
        }
    }
    let policies = parse_policies(tree);
    let agent_namespace =
        fleet.defaults.agent_namespace.clone().unwrap_or_else(|| policy::DEFAULT_AGENT_NAMESPACE.to_string());
    let mut app_files: BTreeMap<&str, Tree> = BTreeMap::new();
    for (path, bytes) in tree.range("apps/".to_string()..) {
        let Some(rest) = path.strip_prefix("apps/") else { break };
        let Some((app, file)) = rest.split_once('/') else { continue };
        app_files.entry(app).or_default().insert(file.to_string(), bytes.clone());
    }
    for (app, mut files) in app_files {
        let excluded = excluded_globs(&files);
        if !excluded.is_empty() {
            files.retain(|f, _| f == "app.yaml" || !path_matches(&excluded, f));
        }
        let spec = match (app_refusal(app, &files), &defaults) {
            (Some(message), _) => Err(FleetError::Invalid { file: format!("apps/{app}/"), message }),
            (None, Ok(d)) => match &policies {
                Ok(p) => app_spec(app, &files, d).and_then(|s| with_guard(app, s, &files, p, &agent_namespace)),
                Err(e) => Err(e.clone()),
            },
            (None, Err(e)) => Err(e.clone()),
        };
        let (included, spec) = match spec {
            Ok(s) => match included_files(tree, app, &s) {
                Ok(inc) => (inc, Ok(s)),
                Err(e) => (Tree::new(), Err(e)),
            },
            Err(e) => (Tree::new(), Err(e)),
        };
        let mut tree_digest = tree_digest(&files);
        if !included.is_empty() {
            tree_digest = self::tree_digest(&[(tree_digest, Vec::new())].into_iter().chain(included.clone()).collect());
        }
        fleet.apps.insert(
            app.to_string(),
            App { name: app.to_string(), files: Arc::new(files), included: Arc::new(included), tree_digest, spec },
        );
    }
    fleet.policies = policies.unwrap_or_default();
    fleet
}

/// The app's `exclude:` globs, read before anything else of app.yaml (a broken app.yaml excludes nothing and
/// fails on its own).
fn excluded_globs(files: &Tree) -> Vec<String> {
    #[derive(Deserialize)]
    struct Only {
        #[serde(default)]
        exclude: Vec<String>,
    }
    files.get("app.yaml").and_then(|b| serde_yaml::from_slice::<Only>(b).ok()).map(|o| o.exclude).unwrap_or_default()
}

/// The files of the directories an app includes (repository-relative), within the app's limits.
fn included_files(tree: &Tree, app: &str, spec: &AppSpec) -> Result<Tree, FleetError> {
    let Source::Kustomize { include, .. } = &spec.source else { return Ok(Tree::new()) };
    let mut out = Tree::new();
    for dir in include {
        let prefix = format!("{dir}/");
        let before = out.len();
        out.extend(
            tree.range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        if out.len() == before {
            return Err(FleetError::Invalid {
                file: format!("apps/{app}/app.yaml"),
                message: format!("kustomize.include: {dir}/ has no files"),
            });
        }
    }
    match app_refusal(app, &out) {
        Some(message) => Err(FleetError::Invalid {
            file: format!("apps/{app}/app.yaml"),
            message: format!("kustomize.include: {message}"),
        }),
        None => Ok(out),
    }
}

/// `policies/*.yaml`: each file's patterns checked. A broken policy file stops every app (they keep their
/// previous desired state): reading it as absent would loosen what some app may do.
fn parse_policies(tree: &Tree) -> Result<BTreeMap<String, policy::PolicyFile>, FleetError> {
    let mut out = BTreeMap::new();
    for (path, bytes) in tree.range("policies/".to_string()..) {
        let Some(file) = path.strip_prefix("policies/") else { break };
        if file.contains('/') || !(file.ends_with(".yaml") || file.ends_with(".yml")) {
            continue;
        }
        let p: policy::PolicyFile = serde_yaml::from_slice(bytes).map_err(|e| yaml_error(path, &e))?;
        let text = String::from_utf8_lossy(bytes);
        let lists: [(&str, &[String]); 5] = [
            ("apps", &p.apps),
            ("namespaces", &p.namespaces),
            ("kinds.allow", &p.kinds.allow),
            ("kinds.deny", &p.kinds.deny),
            ("shareNamespaceWith", &p.share_namespace_with),
        ];
        for (field, list) in lists {
            for (i, pattern) in list.iter().enumerate() {
                if let Some(why) = policy::invalid_pattern(pattern) {
                    let parts: Vec<String> = field.split('.').map(str::to_string).chain([i.to_string()]).collect();
                    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                    return Err(FleetError::Field {
                        file: path.clone(),
                        line: crate::yaml::line_of_path(&text, &parts).unwrap_or_else(|| line_of(bytes, field)),
                        field: format!("{field}[{i}]"),
                        message: format!("{pattern:?}: {why}"),
                    });
                }
            }
        }
        if p.apps.is_empty() {
            return Err(FleetError::Field {
                file: path.clone(),
                line: line_of(bytes, "apps"),
                field: "apps".into(),
                message: "a policy names the apps it is for".into(),
            });
        }
        out.insert(path.clone(), p);
    }
    Ok(out)
}

/// The app's guard: from the one policy that names it, or the defaults. The app's own namespace must be one
/// it may write.
fn with_guard(
    app: &str,
    mut spec: AppSpec,
    files: &Tree,
    policies: &BTreeMap<String, policy::PolicyFile>,
    agent_namespace: &str,
) -> Result<AppSpec, FleetError> {
    let mine: Vec<(&String, &policy::PolicyFile)> =
        policies.iter().filter(|(_, p)| policy::matches_any(&p.apps, app)).collect();
    let guard = match mine.as_slice() {
        [] => policy::Guard::defaults(agent_namespace),
        [(file, p)] => policy::Guard::from_policy(file, p, agent_namespace),
        [(a, _), (b, _), ..] => {
            return Err(FleetError::Invalid {
                file: format!("apps/{app}/"),
                message: format!("the app is named by two policies, {a} and {b}: an app has one policy"),
            })
        }
    };
    if let Err(why) = guard.namespace_allowed(&spec.namespace) {
        let bytes = files.get("app.yaml").map(Vec::as_slice).unwrap_or_default();
        return Err(FleetError::Field {
            file: format!("apps/{app}/app.yaml"),
            line: line_of(bytes, "namespace:"),
            field: "namespace".into(),
            message: why,
        });
    }
    spec.policy.guard = Some(guard);
    Ok(spec)
}

impl Fleet {
    /// Whether `app` may write namespaced objects in `ns` although other apps declare it as theirs: it is one
    /// of them, one of them shares it with `app`, or `app`'s policy names the namespace.
    pub fn may_write_in(&self, app: &str, ns: &str) -> Result<(), String> {
        let owners: Vec<&str> = self
            .apps
            .values()
            .filter(|a| a.spec.as_ref().is_ok_and(|s| s.namespace == ns))
            .map(|a| a.name.as_str())
            .collect();
        if owners.is_empty() || owners.contains(&app) {
            return Ok(());
        }
        let policy_of = |a: &str| self.policies.values().find(|p| policy::matches_any(&p.apps, a));
        if policy_of(app).is_some_and(|p| p.namespaces.iter().any(|n| n == ns)) {
            return Ok(());
        }
        if owners.iter().any(|o| policy_of(o).is_some_and(|p| policy::matches_any(&p.share_namespace_with, app))) {
            return Ok(());
        }
        Err(format!(
            "namespace {ns} belongs to app {} (its namespace); it is written by other apps only when that app's \
             policy shares it (shareNamespaceWith) or this app's policy names it",
            owners.join(", ")
        ))
    }
}

impl Fleet {
    /// The waves an app rolls out through: its own, or rollout.yaml's; None when changes go out at once.
    /// An error when rollout.yaml is broken (no new rollout may start).
    pub fn rollout_for(&self, app: &str) -> Result<Option<&crate::rollout::RolloutSpec>, &FleetError> {
        if let Some(Ok(spec)) = self.apps.get(app).map(|a| a.spec.as_ref()) {
            if let Some(r) = &spec.rollout {
                return Ok(Some(r));
            }
        }
        match &self.rollout {
            None => Ok(None),
            Some(Ok(r)) => Ok(Some(r)),
            Some(Err(e)) => Err(e),
        }
    }

    /// The apps a cluster receives, each with the target that selected it, or None when the cluster is not in
    /// the inventory (it gets nothing). Apps with a broken spec are not listed.
    pub fn apps_for(&self, cluster: &str) -> Option<Vec<(&App, &AppSpec, &Target)>> {
        let labels = &self.clusters.get(cluster)?.labels;
        Some(
            self.apps
                .values()
                .filter_map(|a| {
                    let spec = a.spec.as_ref().ok()?;
                    spec.targets.iter().find(|t| t.selector.matches(labels)).map(|t| (a, spec, t))
                })
                .collect(),
        )
    }

    /// Apps whose targets match no cluster: reported, never silently ignored.
    pub fn untargeted_apps(&self) -> Vec<&str> {
        self.apps
            .values()
            .filter(|a| {
                a.spec.as_ref().is_ok_and(|s| {
                    !self.clusters.values().any(|c| s.targets.iter().any(|t| t.selector.matches(&c.labels)))
                })
            })
            .map(|a| a.name.as_str())
            .collect()
    }

    /// Everything wrong with this commit outside rendering, for the fleet view: broken files and untargeted apps.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.broken_clusters.values().map(ToString::to_string).collect();
        if let Some(Err(e)) = &self.rollout {
            out.push(e.to_string());
        }
        out.extend(self.apps.values().filter_map(|a| a.spec.as_ref().err().map(ToString::to_string)));
        out.extend(
            self.untargeted_apps().into_iter().map(|a| format!("apps/{a}/app.yaml: no target matches any cluster")),
        );
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests;
