//! Each cluster's desired state from the fleet: which apps it gets and, per app, the bundle rendered for it.
//!
//! Rendering is content-addressed. The input of a render is the app's files at the commit, the source variant
//! (a Kustomize overlay, a Helm target) and the values the render actually reads; clusters with identical
//! inputs share one render and one bundle. Kustomize builds do not depend on values (variables are
//! substituted in their output), so each overlay is built once per commit however many value sets use it.
//! A [`RenderCache`] kept between commits reuses what an unchanged app rendered before.
//!
//! External tools (kustomize, helm) sit behind [`Tools`]; everything else here is free of I/O.

use super::objects::{finalize, parse_manifests, Bundle, Sourced};
use super::vars::{self, Context, Resolved, Var};
use super::{App, AppSpec, Fleet, FleetError, Source, Target, Tree};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Runs the external renderers. Errors are messages meant for the user (what failed, what to install).
pub trait Tools: Sync {
    /// Builds the kustomization in `dir` of `files` (the app's files, or the repository's layout when the app
    /// includes shared directories). `network`: the build names remote resources the fleet allows; without
    /// it the build must not reach the network.
    fn kustomize(&self, files: &Tree, dir: &str, network: bool) -> Result<String, String>;
    /// Runs `helm template` on the chart in the app's files.
    fn helm_template(&self, files: &Tree, helm: &HelmInvocation) -> Result<String, String>;
}

/// One `helm template` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelmInvocation {
    pub release: String,
    pub namespace: String,
    /// The chart's directory, relative to the app's directory.
    pub chart: String,
    /// The merged, substituted values, as YAML.
    pub values_yaml: String,
}

impl HelmInvocation {
    /// The arguments of `helm`, with the chart and the values file where the caller put them.
    pub fn args(&self, chart_dir: &str, values_file: &str) -> Vec<String> {
        [
            "template",
            &self.release,
            chart_dir,
            "--namespace",
            &self.namespace,
            "--values",
            values_file,
            "--include-crds",
            "--skip-tests",
        ]
        .map(String::from)
        .to_vec()
    }
}

/// How many renders a commit took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenderStats {
    /// (cluster, app) pairs with a desired state.
    pub cluster_apps: usize,
    /// Distinct render inputs at this commit.
    pub renders: usize,
    /// Of those, rendered now (the rest were reused from the previous commit).
    pub rendered: usize,
    /// kustomize and helm processes run.
    pub tool_runs: usize,
    /// Distinct bundles.
    pub bundles: usize,
}

/// What one app should be on one cluster at this commit.
pub type AppResult = Result<Arc<Bundle>, FleetError>;

#[derive(Debug, Default)]
pub struct Rendered {
    /// cluster → app → bundle or error, for every cluster of the inventory.
    pub clusters: BTreeMap<String, BTreeMap<String, AppResult>>,
    pub stats: RenderStats,
}

/// Renders kept between commits: an app whose files did not change is not rendered again.
#[derive(Default)]
pub struct RenderCache {
    bases: HashMap<String, Arc<Base>>,
    renders: HashMap<String, AppResult>,
}

/// What a render starts from before values are applied.
#[derive(Debug)]
enum Base {
    /// Objects (from manifests or a kustomize build) with the variables they use and where each is first used;
    /// `literal[i]`: object i is kept as written (substitution off for it).
    Objects { objects: Vec<Sourced>, literal: Vec<bool>, vars: BTreeMap<Var, String> },
    /// Merged Helm values before substitution.
    Helm { values: Value, vars: BTreeMap<Var, String> },
}

impl Base {
    fn vars(&self) -> &BTreeMap<Var, String> {
        match self {
            Base::Objects { vars, .. } | Base::Helm { vars, .. } => vars,
        }
    }
}

/// Which base an app uses on a cluster.
fn variant(spec: &AppSpec, target_index: usize) -> String {
    match &spec.source {
        Source::Manifests { path } => format!("manifests:{path}"),
        Source::Kustomize { path, .. } => {
            format!("kustomize:{}", spec.targets[target_index].kustomize_path.as_deref().unwrap_or(path))
        }
        Source::Helm(_) => format!("helm:{target_index}"),
    }
}

fn base_key(app: &App, spec: &AppSpec, variant: &str) -> String {
    // The guard comes from outside the app's files (policies/, fleet.yaml): a change there renders again.
    let guard = spec.policy.guard.as_ref().map(|g| serde_json::to_string(g).unwrap_or_default()).unwrap_or_default();
    format!("{}\0{}\0{}\0{}\0{}", app.name, app.tree_digest, spec.namespace, variant, guard)
}

/// The namespaces a bundle writes namespaced objects in (from its ids, `Kind ns/name`).
fn namespaces_of(bundle: &Bundle) -> std::collections::BTreeSet<&str> {
    bundle.ids.iter().filter_map(|id| id.split_once(' ')?.1.split_once('/').map(|(ns, _)| ns)).collect()
}

/// Which objects keep their `${…}` as written: the app's substitution setting, the file they come from
/// (`file` of manifests; None for a tool's output), the object's own annotation.
fn literal_objects(spec: &AppSpec, objects: &[Sourced], file_of: impl Fn(&Sourced) -> Option<String>) -> Vec<bool> {
    let pointer = format!("/metadata/annotations/{}", super::SUBSTITUTION_ANNOTATION.replace('/', "~1"));
    objects
        .iter()
        .map(|o| {
            o.object.pointer(&pointer).and_then(Value::as_str) == Some("off")
                || match &spec.substitution {
                    super::Substitution::On => false,
                    super::Substitution::Off => true,
                    super::Substitution::Skip(globs) => file_of(o).is_some_and(|f| super::path_matches(globs, &f)),
                }
        })
        .collect()
}

fn collect_vars(objects: &[Sourced], literal: &[bool]) -> Result<BTreeMap<Var, String>, FleetError> {
    let mut out = BTreeMap::new();
    for (o, _) in objects.iter().zip(literal).filter(|(_, l)| !**l) {
        let mut used = std::collections::BTreeSet::new();
        vars::collect(&o.object, &mut used)
            .map_err(|message| FleetError::Object { origin: o.origin.clone(), message })?;
        for v in used {
            out.entry(v).or_insert_with(|| o.origin.clone());
        }
    }
    Ok(out)
}

fn parse_values_file(app: &str, files: &Tree, path: &str) -> Result<Value, FleetError> {
    let file = format!("apps/{app}/{path}");
    let bytes = files.get(path).ok_or_else(|| FleetError::Invalid { file: file.clone(), message: "missing".into() })?;
    let text = std::str::from_utf8(bytes)
        .map_err(|e| FleetError::Invalid { file: file.clone(), message: format!("not UTF-8: {e}") })?;
    // As Helm reads values (YAML 1.1 scalars), so values keep the types Helm would give them.
    let v = crate::yaml::parse_one(text).map_err(|e| super::objects::yaml_error_at(&file, e))?;
    match v {
        Value::Null => Ok(Value::Object(Map::new())),
        Value::Object(_) => Ok(v),
        _ => Err(FleetError::Invalid { file, message: "Helm values must be a mapping".into() }),
    }
}

/// Helm values for one target, merged in order: the app's values files, the app's values, the target's values
/// files, the target's values (the chart's own values.yaml comes first, applied by helm itself).
pub fn helm_values(app: &App, spec: &AppSpec, target: &Target) -> Result<(Value, BTreeMap<Var, String>), FleetError> {
    let Source::Helm(h) = &spec.source else {
        return Err(FleetError::Render { app: app.name.clone(), message: "not a Helm app".into() });
    };
    let app_yaml = format!("apps/{}/app.yaml", app.name);
    let mut layers: Vec<(String, Value)> = Vec::new();
    for f in &h.values_files {
        layers.push((format!("apps/{}/{f}", app.name), parse_values_file(&app.name, &app.files, f)?));
    }
    layers.push((format!("{app_yaml}: helm.values"), Value::Object(h.values.clone())));
    for f in &target.helm_values_files {
        layers.push((format!("apps/{}/{f}", app.name), parse_values_file(&app.name, &app.files, f)?));
    }
    layers.push((format!("{app_yaml}: {}.helm.values", target.name), Value::Object(target.helm_values.clone())));
    let mut merged = Value::Object(Map::new());
    let mut used = BTreeMap::new();
    for (origin, layer) in layers {
        let mut vs = std::collections::BTreeSet::new();
        vars::collect(&layer, &mut vs).map_err(|message| FleetError::Object { origin: origin.clone(), message })?;
        for v in vs {
            used.entry(v).or_insert_with(|| origin.clone());
        }
        vars::merge(&mut merged, &layer);
    }
    Ok((merged, used))
}

fn render_error(app: &App, message: String) -> FleetError {
    FleetError::Render { app: app.name.clone(), message }
}

fn make_base(
    app: &App,
    spec: &AppSpec,
    target: &Target,
    allow_remote: &[String],
    tools: &dyn Tools,
    runs: &AtomicUsize,
) -> Result<Base, FleetError> {
    match &spec.source {
        Source::Manifests { path } => {
            let prefix = if path.is_empty() { String::new() } else { format!("{path}/") };
            let mut objects = Vec::new();
            for (file, bytes) in app.files.range(prefix.clone()..) {
                if !file.starts_with(&prefix) {
                    break;
                }
                let manifest = file.ends_with(".yaml") || file.ends_with(".yml") || file.ends_with(".json");
                if !manifest || file == "app.yaml" {
                    continue;
                }
                objects.extend(parse_manifests(&format!("apps/{}/{file}", app.name), bytes)?);
            }
            let root = format!("apps/{}/", app.name);
            let literal = literal_objects(spec, &objects, |o| {
                o.origin.strip_prefix(&root).and_then(|f| f.rsplit_once(':')).map(|(f, _)| f.to_string())
            });
            let vars = collect_vars(&objects, &literal)?;
            Ok(Base::Objects { objects, literal, vars })
        }
        Source::Kustomize { path, include } => {
            let dir = target.kustomize_path.as_deref().unwrap_or(path);
            let shown = if dir.is_empty() { "." } else { dir };
            // The build's private copy: the app's files, or with shared directories, the repository's layout.
            let (files, build_dir) = if include.is_empty() {
                (app.files.clone(), dir.to_string())
            } else {
                let root = format!("apps/{}", app.name);
                let mut w: Tree = app.files.iter().map(|(k, v)| (format!("{root}/{k}"), v.clone())).collect();
                w.extend(app.included.iter().map(|(k, v)| (k.clone(), v.clone())));
                (Arc::new(w), if dir.is_empty() { root } else { format!("{root}/{dir}") })
            };
            let remote = super::kustomize::check(&files, allow_remote)
                .map_err(|e| render_error(app, format!("kustomize build {shown} refused: {e}")))?;
            runs.fetch_add(1, Ordering::Relaxed);
            let out = tools
                .kustomize(&files, &build_dir, !remote.is_empty())
                .map_err(|e| render_error(app, format!("kustomize build {shown} failed: {e}")))?;
            let origin = format!("apps/{}/{shown} (kustomize output)", app.name);
            let objects = parse_manifests(&origin, out.as_bytes())?;
            let literal = literal_objects(spec, &objects, |_| None);
            let vars = collect_vars(&objects, &literal)?;
            Ok(Base::Objects { objects, literal, vars })
        }
        Source::Helm(_) => {
            let (values, mut vars) = helm_values(app, spec, target)?;
            if spec.substitution == super::Substitution::Off {
                vars.clear();
            }
            Ok(Base::Helm { values, vars })
        }
    }
}

fn render_one(
    app: &App,
    spec: &AppSpec,
    base: &Base,
    resolved: &Resolved,
    tools: &dyn Tools,
    runs: &AtomicUsize,
) -> Result<Bundle, FleetError> {
    match base {
        Base::Objects { objects, literal, .. } => {
            let mut out = Vec::with_capacity(objects.len());
            for (o, literal) in objects.iter().zip(literal) {
                if *literal {
                    out.push(o.clone());
                    continue;
                }
                let object = vars::substitute(&o.object, resolved)
                    .map_err(|message| FleetError::Object { origin: o.origin.clone(), message })?;
                out.push(Sourced { origin: o.origin.clone(), object });
            }
            finalize(&spec.namespace, &spec.policy, out)
        }
        Base::Helm { values, .. } => {
            let Source::Helm(h) = &spec.source else { unreachable!("a Helm base comes from a Helm source") };
            let values = if spec.substitution == super::Substitution::Off {
                values.clone()
            } else {
                vars::substitute(values, resolved).map_err(|m| render_error(app, m))?
            };
            let values_yaml = serde_yaml::to_string(
                &serde_json::from_str::<Value>(&super::canonical_json(&values)).unwrap_or(values),
            )
            .map_err(|e| render_error(app, e.to_string()))?;
            let inv = HelmInvocation {
                release: h.release_name.clone(),
                namespace: spec.namespace.clone(),
                chart: h.chart.clone(),
                values_yaml,
            };
            runs.fetch_add(1, Ordering::Relaxed);
            let out = tools
                .helm_template(&app.files, &inv)
                .map_err(|e| render_error(app, format!("helm template {} failed: {e}", h.chart)))?;
            let origin = format!("apps/{}/{} (helm output)", app.name, h.chart);
            finalize(&spec.namespace, &spec.policy, parse_manifests(&origin, out.as_bytes())?)
        }
    }
}

/// Runs `f` over `items` on up to `available_parallelism` threads; results in input order.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// The value layers a cluster sees for an app, lowest precedence first: fleet defaults, app values, cluster
/// values, target values.
pub fn value_layers<'a>(
    fleet: &'a Fleet,
    spec: &'a AppSpec,
    cluster: &'a super::ClusterSpec,
    target: &'a Target,
) -> [&'a Map<String, Value>; 4] {
    [&fleet.defaults.values, &spec.values, &cluster.values, &target.values]
}

/// The values of the variables a base reads, in the base's order.
fn resolve(
    fleet: &Fleet,
    cluster: &str,
    spec: &AppSpec,
    target: &Target,
    needed: &BTreeMap<Var, String>,
) -> Result<Vec<Value>, FleetError> {
    let cspec = &fleet.clusters[cluster];
    let layers = value_layers(fleet, spec, cspec, target);
    let ctx = Context { cluster, labels: &cspec.labels, values: &layers };
    needed
        .iter()
        .map(|(var, origin)| {
            ctx.resolve(var).ok_or_else(|| FleetError::Variable {
                origin: origin.clone(),
                cluster: cluster.to_string(),
                message: match var {
                    Var::Label(k) => format!("{var} is not set: clusters/{cluster}.yaml has no label {k:?}"),
                    _ => format!(
                        "{var} is not set: give it a value in clusters/{cluster}.yaml, the app, its target or fleet.yaml"
                    ),
                },
            })
        })
        .collect()
}

/// Resolved values in a stable text form, for render keys (the base fixes which variable is where).
fn resolved_key(values: &[Value]) -> String {
    let mut out = String::new();
    for v in values {
        match v {
            Value::Object(_) | Value::Array(_) => out.push_str(&super::canonical_json(v)),
            other => out.push_str(&other.to_string()),
        }
        out.push('\0');
    }
    out
}

/// One distinct render: the app, its base and the values it reads.
struct Input<'a> {
    app: &'a App,
    spec: &'a AppSpec,
    base: Arc<Base>,
    resolved: Resolved,
    /// The content address: base key + resolved values.
    key: String,
}

/// Renders every cluster's apps at this commit.
/// Distinct renders of one commit that get a trace span each (the rest are counted on the commit's).
pub const RENDER_SPANS: usize = 64;

pub fn render_fleet(fleet: &Fleet, tools: &dyn Tools, cache: &mut RenderCache) -> Rendered {
    let runs = AtomicUsize::new(0);
    // 1. The bases each (app, variant) needs: kustomize builds and manifest parsing, once each.
    struct Pair<'a> {
        cluster: &'a str,
        app: &'a App,
        spec: &'a AppSpec,
        target: &'a Target,
        base: usize,
    }
    let mut pairs: Vec<Pair> = Vec::new();
    let mut base_index: HashMap<String, usize> = HashMap::new();
    let mut wanted: Vec<(String, &App, &AppSpec, &Target)> = Vec::new();
    for cluster in fleet.clusters.keys() {
        for (app, spec, target) in fleet.apps_for(cluster).unwrap_or_default() {
            let t = spec.targets.iter().position(|x| std::ptr::eq(x, target)).unwrap_or(0);
            let mut key = base_key(app, spec, &variant(spec, t));
            if matches!(spec.source, Source::Kustomize { .. }) {
                key.push_str(&fleet.defaults.renderers.allow_remote.join("\0"));
            }
            let base = match base_index.get(&key) {
                Some(i) => *i,
                None => {
                    base_index.insert(key.clone(), wanted.len());
                    wanted.push((key, app, spec, target));
                    wanted.len() - 1
                }
            };
            pairs.push(Pair { cluster, app, spec, target, base });
        }
    }
    let missing: Vec<usize> = (0..wanted.len()).filter(|i| !cache.bases.contains_key(&wanted[*i].0)).collect();
    let built = par_map(&missing, |i| {
        let (_, app, spec, target) = &wanted[*i];
        make_base(app, spec, target, &fleet.defaults.renderers.allow_remote, tools, &runs).map(Arc::new)
    });
    let mut bases: Vec<Option<Result<Arc<Base>, FleetError>>> =
        wanted.iter().map(|(k, ..)| cache.bases.get(k).map(|b| Ok(b.clone()))).collect();
    for (i, b) in missing.into_iter().zip(built) {
        bases[i] = Some(b);
    }
    let bases: Vec<Result<Arc<Base>, FleetError>> = bases.into_iter().flatten().collect();

    // 2. Per (cluster, app): resolve the variables the base reads; the render key is base + resolved values.
    let mut input_index: HashMap<(usize, String), usize> = HashMap::new();
    let mut inputs: Vec<Input> = Vec::new();
    let mut assigned: Vec<Result<usize, FleetError>> = Vec::with_capacity(pairs.len());
    for p in &pairs {
        let r = match &bases[p.base] {
            Err(e) => Err(e.clone()),
            Ok(base) => resolve(fleet, p.cluster, p.spec, p.target, base.vars()).map(|values| {
                let rkey = resolved_key(&values);
                *input_index.entry((p.base, rkey)).or_insert_with_key(|(b, rkey)| {
                    let key = format!("{}\0{rkey}", wanted[*b].0);
                    let resolved = base.vars().keys().cloned().zip(values).collect();
                    inputs.push(Input { app: p.app, spec: p.spec, base: base.clone(), resolved, key });
                    inputs.len() - 1
                })
            }),
        };
        assigned.push(r);
    }

    // 3. Render each distinct input once (reusing the previous commit's good renders).
    let todo: Vec<usize> = (0..inputs.len()).filter(|i| !cache.renders.contains_key(&inputs[*i].key)).collect();
    // Spans of the first renders, under the caller's (the commit's) span: worker threads do not inherit it.
    let parent = tracing::Span::current();
    let spans = AtomicUsize::new(0);
    let done = par_map(&todo, |i| {
        let input = &inputs[*i];
        let span = if spans.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < RENDER_SPANS {
            tracing::info_span!(target: "flotilla::trace", parent: &parent, "render app", flotilla.app = %input.app.name)
        } else {
            tracing::Span::none()
        };
        span.in_scope(|| render_one(input.app, input.spec, &input.base, &input.resolved, tools, &runs).map(Arc::new))
    });
    let mut renders: Vec<Option<AppResult>> = inputs.iter().map(|i| cache.renders.get(&i.key).cloned()).collect();
    for (i, r) in todo.iter().zip(done) {
        renders[*i] = Some(r);
    }
    let renders: Vec<AppResult> = renders.into_iter().flatten().collect();

    // 4. Assign, then refuse objects claimed by two apps on one cluster (checked once per distinct set of
    //    renders: clusters with the same inputs share the answer).
    let mut out = Rendered::default();
    // cluster → (app, index of its render or why it has none)
    type Assigned<'a> = Vec<(&'a str, Result<usize, FleetError>)>;
    let mut by_cluster: BTreeMap<&str, Assigned> = fleet.clusters.keys().map(|c| (c.as_str(), Vec::new())).collect();
    for (p, r) in pairs.iter().zip(assigned) {
        if let Some(v) = by_cluster.get_mut(p.cluster) {
            v.push((p.app.name.as_str(), r));
        }
    }
    let mut conflicts_seen: HashMap<Vec<usize>, Vec<(String, String, String)>> = HashMap::new();
    let mut trespass: HashMap<(&str, String), Option<FleetError>> = HashMap::new();
    let mut digests = HashSet::new();
    for (cluster, apps) in by_cluster {
        let signature: Vec<usize> = apps.iter().filter_map(|(_, r)| r.as_ref().ok().copied()).collect();
        let found = conflicts_seen.entry(signature).or_insert_with(|| {
            conflicts(apps.iter().filter_map(|(a, r)| {
                let b = renders[*r.as_ref().ok()?].as_ref().ok()?;
                Some((*a, b.as_ref()))
            }))
        });
        let mut results: BTreeMap<String, AppResult> = BTreeMap::new();
        for (app, r) in apps {
            let result = r.and_then(|i| renders[i].clone()).and_then(|b| {
                // Another app's namespace: checked here, not in the cached render, as it depends on other apps.
                let refused = trespass.entry((app, b.digest.clone())).or_insert_with(|| {
                    namespaces_of(&b).into_iter().find_map(|ns| {
                        fleet.may_write_in(app, ns).err().map(|message| FleetError::Policy {
                            origin: format!("apps/{app}"),
                            object: format!("objects in namespace {ns}"),
                            message,
                        })
                    })
                });
                match refused {
                    Some(e) => Err(e.clone()),
                    None => Ok(b),
                }
            });
            if let Ok(b) = &result {
                digests.insert(b.digest.clone());
            }
            results.insert(app.to_string(), result);
        }
        for (object, first, second) in found.iter() {
            let e = FleetError::Conflict {
                object: object.clone(),
                first: first.clone(),
                second: second.clone(),
                cluster: cluster.to_string(),
            };
            for a in [first, second] {
                if let Some(r) = results.get_mut(a) {
                    if r.is_ok() {
                        *r = Err(e.clone());
                    }
                }
            }
        }
        out.clusters.insert(cluster.to_string(), results);
    }
    out.stats = RenderStats {
        cluster_apps: pairs.len(),
        renders: inputs.len(),
        rendered: todo.len(),
        tool_runs: runs.load(Ordering::Relaxed),
        bundles: digests.len(),
    };
    // Keep what this commit used (good results only: an environment problem, such as a missing tool, is retried).
    cache.bases = wanted.iter().zip(bases).filter_map(|((k, ..), b)| b.ok().map(|b| (k.clone(), b))).collect();
    cache.renders = inputs.iter().zip(renders).filter(|(_, r)| r.is_ok()).map(|(i, r)| (i.key.clone(), r)).collect();
    out
}

/// Objects claimed by two apps among one cluster's bundles: (object, first app, second app).
fn conflicts<'a>(apps: impl Iterator<Item = (&'a str, &'a Bundle)>) -> Vec<(String, String, String)> {
    let mut owner: HashMap<&str, &str> = HashMap::new();
    let mut out = Vec::new();
    for (app, bundle) in apps {
        for id in &bundle.ids {
            if let Some(first) = owner.insert(id, app) {
                out.push((id.clone(), first.to_string(), app.to_string()));
            }
        }
    }
    out
}
