//! The verbs of the Kubernetes API on one simulated cluster, free of HTTP: get, list, create, update, patch
//! (JSON, merge, strategic, apply), delete with finalizers and propagation, and the start of a watch.

use crate::admission::Operation;
use crate::error::ApiError;
use crate::fields::{self, Ctx, Scope};
use crate::kinds;
use crate::patch;
use crate::resources::ResourceDef;
use crate::schema::FieldValidation;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Cluster, ClusterState, EventType, Signal, Stored};
use base64::Engine;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::broadcast;

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Which part of an object a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
    Scale,
}

impl Sub {
    fn name(self) -> Option<&'static str> {
        match self {
            Sub::Main => None,
            Sub::Status => Some("status"),
            Sub::Scale => Some("scale"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    pub dry_run: bool,
    pub field_manager: String,
    pub force: bool,
    pub validation: crate::schema::FieldValidation,
}

/// Drops what `obj`'s schema does not declare; refuses wrong types, and unknown fields under Strict.
/// `apply` words the errors as server-side apply does.
/// Returns the warnings (`unknown field "…"`) for what was dropped under Warn.
fn check_schema(
    res: &ResourceDef,
    obj: &mut Value,
    validation: FieldValidation,
    apply: bool,
) -> Result<Vec<String>, ApiError> {
    let cat = crate::openapi::catalogue();
    let schema = match &res.crd_schema {
        Some(s) => s.as_ref(),
        None if res.builtin => match crate::openapi::schema_of(&res.group, &res.version, &res.kind) {
            Some(s) => s,
            None => return Ok(Vec::new()),
        },
        None => return Ok(Vec::new()),
    };
    let f = crate::schema::check(schema, &cat.schemas, obj);
    let name = meta_str(obj, "name").unwrap_or_default().to_string();
    let ns = meta_str(obj, "namespace").unwrap_or_default().to_string();
    if !f.wrong_type.is_empty() {
        if !res.builtin {
            let causes = f
                .wrong_type
                .iter()
                .map(|(p, t, _)| {
                    (p.clone(), format!("Invalid value: \"{}\": {p} in body must be of type {t}", f.wrong_type[0].2))
                })
                .collect();
            return Err(ApiError::invalid(res, &name, causes));
        }
        let (p, t, got) = &f.wrong_type[0];
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{v}\" cannot be handled as a {kind}: json: cannot unmarshal {got} into Go struct field .{p} of type {t}",
            kind = res.kind,
            v = res.version
        )));
    }
    if validation == FieldValidation::Strict && !f.unknown.is_empty() {
        if apply {
            let fields: Vec<String> = f.unknown.iter().map(|p| format!(".{p}: field not declared in schema")).collect();
            return Err(ApiError::bad_request(format!(
                "failed to create typed patch object ({ns}/{name}; {}, Kind={}): {}",
                res.api_version(),
                res.kind,
                fields.join(", ")
            )));
        }
        let fields: Vec<String> = f.unknown.iter().map(|p| format!("unknown field \"{p}\"")).collect();
        return Err(ApiError::bad_request(format!("strict decoding error: {}", fields.join(", "))));
    }
    if validation == FieldValidation::Warn {
        return Ok(f.unknown.iter().map(|p| format!("unknown field \"{p}\"")).collect());
    }
    Ok(Vec::new())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    pub dry_run: bool,
    pub propagation: Propagation,
    pub precondition_rv: Option<String>,
    pub precondition_uid: Option<String>,
}

/// The resources this cluster serves right now (built-ins plus Established CRDs).
pub fn served(builtins: &[Arc<ResourceDef>], state: &ClusterState) -> Vec<Arc<ResourceDef>> {
    let mut v = builtins.to_vec();
    for defs in state.crds.values() {
        v.extend(defs.iter().cloned());
    }
    v
}

pub fn resolve(
    builtins: &[Arc<ResourceDef>],
    c: &Cluster,
    group: &str,
    version: &str,
    plural: &str,
) -> Option<Arc<ResourceDef>> {
    if let Some(d) = builtins.iter().find(|d| d.group == group && d.version == version && d.plural == plural) {
        return Some(d.clone());
    }
    let st = c.state();
    st.crds.values().flatten().find(|d| d.group == group && d.version == version && d.plural == plural).cloned()
}

fn ns_key(res: &ResourceDef, ns: Option<&str>) -> String {
    if res.namespaced {
        ns.unwrap_or_default().to_string()
    } else {
        String::new()
    }
}

/// The object as served at the resource's version.
fn present(res: &ResourceDef, obj: &Value) -> Value {
    let mut v = obj.clone();
    v["apiVersion"] = json!(res.api_version());
    v["kind"] = json!(res.kind);
    v
}

fn scope_for(res: &ResourceDef, sub: Sub) -> Scope {
    match sub {
        Sub::Status => Scope::StatusOnly,
        _ if res.status => Scope::NoStatus,
        _ => Scope::All,
    }
}

pub fn get(c: &Cluster, res: &ResourceDef, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
    let st = c.state();
    let o = st.get(&res.storage_key(), &ns_key(res, ns), name).ok_or_else(|| ApiError::not_found(res, name))?;
    Ok(present(res, &o.value()))
}

#[derive(Debug, Default)]
pub struct ListOpts {
    pub label: LabelSelector,
    pub field: FieldSelector,
    pub limit: Option<usize>,
    pub continue_: Option<String>,
}

pub struct ListResult {
    pub items: Vec<Value>,
    pub rv: u64,
    pub continue_: Option<String>,
    pub remaining: Option<usize>,
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(json!({"rv": rv, "ns": ns, "name": name}).to_string())
}

fn decode_continue(tok: &str) -> Option<(u64, String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(tok).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((v["rv"].as_u64()?, v["ns"].as_str()?.to_string(), v["name"].as_str()?.to_string()))
}

pub fn list(c: &Cluster, res: &ResourceDef, ns: Option<&str>, opts: &ListOpts) -> Result<ListResult, ApiError> {
    let st = c.state();
    let after = match &opts.continue_ {
        Some(tok) => {
            let (rv, n, name) = decode_continue(tok)
                .ok_or_else(|| ApiError::bad_request("continue key is not valid: illegal base64 data"))?;
            if rv < st.compacted_rv {
                return Err(ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."));
            }
            Some((n, name))
        }
        None => None,
    };
    let mut items = Vec::new();
    let mut last = None;
    let mut remaining = 0usize;
    let matching = st
        .objects
        .get(&res.storage_key())
        .into_iter()
        .flatten()
        .filter(|((ons, _), _)| !res.namespaced || ns.is_none_or(|n| n == ons))
        .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
        .map(|(k, o)| (k, o.value()))
        .filter(|(_, o)| opts.label.matches_object(o) && opts.field.matches_object(o));
    for (k, o) in matching {
        if opts.limit.is_some_and(|l| l > 0 && items.len() >= l) {
            remaining += 1;
            continue;
        }
        items.push(present(res, &o));
        last = Some(k.clone());
    }
    let continue_ = (remaining > 0).then(|| {
        let (n, name) = last.unwrap_or_default();
        encode_continue(st.rv, &n, &name)
    });
    Ok(ListResult { items, rv: st.rv, continue_, remaining: (remaining > 0).then_some(remaining) })
}

fn meta_str<'a>(o: &'a Value, k: &str) -> Option<&'a str> {
    o.get("metadata")?.get(k)?.as_str()
}

fn check_body_identity(res: &ResourceDef, body: &Value) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON or YAML object"));
    }
    if let Some(av) = body.get("apiVersion").and_then(Value::as_str) {
        if av != res.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                res.api_version()
            )));
        }
    }
    if let Some(k) = body.get("kind").and_then(Value::as_str) {
        if k != res.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                res.kind
            )));
        }
    }
    if body.get("metadata").is_some_and(|m| !m.is_object()) {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    Ok(())
}

fn check_namespace(res: &ResourceDef, ns: Option<&str>, body: &Value) -> Result<(), ApiError> {
    if res.namespaced {
        if let (Some(url_ns), Some(body_ns)) = (ns, meta_str(body, "namespace")) {
            if !body_ns.is_empty() && body_ns != url_ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
    }
    Ok(())
}

/// Checks a request body against the URL it was sent to: kind, apiVersion, namespace and name.
fn check_body(res: &ResourceDef, ns: Option<&str>, name: Option<&str>, body: &Value) -> Result<(), ApiError> {
    check_body_identity(res, body)?;
    check_namespace(res, ns, body)?;
    match (name, meta_str(body, "name")) {
        (Some(url), Some(n)) if n != url => {
            Err(ApiError::bad_request("the name of the object does not match the name on the URL"))
        }
        _ => Ok(()),
    }
}

/// Namespace checks for a write that creates an object.
fn namespace_admits(st: &ClusterState, res: &ResourceDef, ns: &str, name: &str) -> Result<(), ApiError> {
    if !res.namespaced {
        return Ok(());
    }
    match st.get("/namespaces", "", ns) {
        None => Err(ApiError::namespace_not_found(ns)),
        Some(n) if n.contains("deletionTimestamp") && n.value().pointer("/metadata/deletionTimestamp").is_some() => {
            Err(ApiError::forbidden(
                res,
                name,
                format!("unable to create new content in namespace {ns} because it is being terminated"),
            ))
        }
        Some(_) => Ok(()),
    }
}

/// Fills system metadata and checks the result; returns false when nothing changed.
#[allow(clippy::too_many_arguments)]
fn finalize(
    c: &Cluster,
    res: &ResourceDef,
    ns: &str,
    old: Option<&Value>,
    new: &mut Value,
    sub: Sub,
    // `None` when the caller checked what it brings already (server-side apply checks the applied
    // configuration; the stored object it merges into was checked when it was written).
    validation: Option<FieldValidation>,
    warnings: &mut Vec<String>,
) -> Result<bool, ApiError> {
    let name = meta_str(new, "name").unwrap_or_default().to_string();
    let meta = new
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("object must be a JSON object"))?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else {
        return Err(ApiError::bad_request("metadata must be an object"));
    };
    if res.namespaced {
        meta.insert("namespace".into(), json!(ns));
    } else {
        meta.shift_remove("namespace");
    }
    match old {
        Some(o) => {
            for k in ["uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds"] {
                match o.pointer(&format!("/metadata/{k}")) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.shift_remove(k),
                };
            }
            if let Some(rv) = o.pointer("/metadata/resourceVersion") {
                meta.insert("resourceVersion".into(), rv.clone());
            }
        }
        None => {
            meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            meta.insert("creationTimestamp".into(), json!(now()));
            meta.shift_remove("resourceVersion");
            meta.shift_remove("deletionTimestamp");
            if kinds::has_generation(res) {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.shift_remove("generation");
            }
        }
    }
    new["apiVersion"] = json!(res.api_version());
    new["kind"] = json!(res.kind);
    if let Some(o) = old {
        if kinds::has_generation(res) && kinds::spec_changed(o, new) {
            let g = o.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(g);
        }
    }
    if let Some(v) = validation {
        warnings.extend(check_schema(res, new, v, false)?);
    }
    if res.builtin {
        if let Some(msg) = crate::normalize::bad_quantity(&res.kind, new) {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{v}\" cannot be handled as a {kind}: {msg}",
                kind = res.kind,
                v = res.version
            )));
        }
    }
    let mut errs = kinds::validate(res, new);
    if let Some(o) = old {
        errs.extend(kinds::immutable(res, o, new));
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(res, &name, errs));
    }
    if sub == Sub::Main {
        let op = if old.is_some() { Operation::Update } else { Operation::Create };
        c.admission().admit(op, res, new)?;
    }
    if let Some(o) = old {
        let norm = |v: &Value| {
            let mut v = v.clone();
            v["apiVersion"] = json!("");
            v
        };
        if norm(o) == norm(new) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The result of a committed (or dry-run) write.
pub struct Written {
    pub obj: Value,
    pub created: bool,
    /// What the API server would send as `Warning` headers (fields dropped under fieldValidation=Warn).
    pub warnings: Vec<String>,
}

/// Stores `new` unless dry-run; an object marked for deletion whose finalizers are all gone is removed.
fn commit(
    c: &Arc<Cluster>,
    st: &mut ClusterState,
    res: &Arc<ResourceDef>,
    ns: &str,
    name: &str,
    mut new: Value,
    dry_run: bool,
) -> Value {
    if dry_run {
        return present(res, &new);
    }
    let rv = st.next_rv();
    new["metadata"]["resourceVersion"] = json!(rv.to_string());
    let key = res.storage_key();
    if kinds::is_gone(res, &new) {
        st.remove(&key, ns, name, Stored::new(&new), rv);
        crate::controllers::after_delete(c, st, res, &new);
        return present(res, &new);
    }
    st.put(&key, ns, name, Stored::new(&new), rv);
    present(res, &new)
}

fn reset_status_on_create(res: &ResourceDef, obj: &mut Value) {
    if res.status && res.builtin {
        if let Some(m) = obj.as_object_mut() {
            m.shift_remove("status");
        }
    }
}

/// Keeps the part of `old` that a write to `sub` may not change.
fn preserve(res: &ResourceDef, sub: Sub, old: &Value, new: &mut Value) {
    match sub {
        Sub::Main if res.status => match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.shift_remove("status");
                }
            }
        },
        Sub::Status => {
            let status = new.get("status").cloned();
            *new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.shift_remove("status");
                    }
                }
            }
        }
        _ => {}
    }
}

pub fn create(
    c: &Arc<Cluster>,
    res: &Arc<ResourceDef>,
    ns: Option<&str>,
    mut body: Value,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    check_body(res, ns, None, &body)?;
    let ns = ns_key(res, ns);
    let mut name = meta_str(&body, "name").unwrap_or_default().to_string();
    if name.is_empty() {
        if let Some(prefix) = meta_str(&body, "generateName").map(str::to_string) {
            let suffix: String =
                (0..5).map(|_| fastrand::choice(b"bcdfghjklmnpqrstvwxz2456789").map_or('x', |b| *b as char)).collect();
            name = format!("{prefix}{suffix}");
            body["metadata"]["name"] = json!(name);
        }
    }
    let mut st = c.state();
    if !name.is_empty() {
        namespace_admits(&st, res, &ns, &name)?;
        if st.get(&res.storage_key(), &ns, &name).is_some() {
            return Err(ApiError::already_exists(res, &name));
        }
    }
    reset_status_on_create(res, &mut body);
    if body.get("metadata").is_none() {
        body["metadata"] = json!({});
    }
    body["metadata"]["namespace"] = json!(ns);
    kinds::apply_defaults(res, &mut body, None);
    let mut warnings = Vec::new();
    finalize(c, res, &ns, None, &mut body, Sub::Main, Some(opts.validation), &mut warnings)?;
    let ctx = Ctx { builtin: res.builtin, scope: Scope::All };
    fields::record_update(None, &mut body, &opts.field_manager, &res.api_version(), ctx, None, &now());
    let obj = commit(c, &mut st, res, &ns, &name, body, opts.dry_run);
    drop(st);
    if !opts.dry_run {
        crate::controllers::observe(c, res, &obj);
    }
    Ok(Written { obj, created: true, warnings })
}

/// PUT: replace the object (or its status), with optimistic concurrency on metadata.resourceVersion.
pub fn update(
    c: &Arc<Cluster>,
    res: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    mut body: Value,
    sub: Sub,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    if sub == Sub::Scale {
        return write_scale(c, res, ns, name, body, opts);
    }
    check_body(res, ns, Some(name), &body)?;
    let ns = ns_key(res, ns);
    let st = c.state();
    let old = st.get(&res.storage_key(), &ns, name).map(|o| o.value()).ok_or_else(|| ApiError::not_found(res, name))?;
    if let Some(rv) = meta_str(&body, "resourceVersion") {
        if meta_str(&old, "resourceVersion") != Some(rv) {
            return Err(ApiError::stale(res, name));
        }
    }
    if body.get("metadata").is_none() {
        body["metadata"] = json!({});
    }
    body["metadata"]["name"] = json!(name);
    preserve(res, sub, &old, &mut body);
    if let Some(mf) = old.pointer("/metadata/managedFields") {
        body["metadata"]["managedFields"] = mf.clone();
    }
    write_changed(c, st, res, &ns, name, &old, body, sub, opts)
}

#[allow(clippy::too_many_arguments)]
fn write_changed(
    c: &Arc<Cluster>,
    mut st: std::sync::MutexGuard<'_, ClusterState>,
    res: &Arc<ResourceDef>,
    ns: &str,
    name: &str,
    old: &Value,
    mut new: Value,
    sub: Sub,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    kinds::apply_defaults(res, &mut new, Some(old));
    let mut warnings = Vec::new();
    if !finalize(c, res, ns, Some(old), &mut new, sub, Some(opts.validation), &mut warnings)? {
        return Ok(Written { obj: present(res, old), created: false, warnings });
    }
    let ctx = Ctx { builtin: res.builtin, scope: scope_for(res, sub) };
    fields::record_update(Some(old), &mut new, &opts.field_manager, &res.api_version(), ctx, sub.name(), &now());
    let obj = commit(c, &mut st, res, ns, name, new, opts.dry_run);
    drop(st);
    if !opts.dry_run {
        crate::controllers::observe(c, res, &obj);
    }
    Ok(Written { obj, created: false, warnings })
}

fn scale_of(res: &ResourceDef, obj: &Value) -> Result<Value, ApiError> {
    let spec = res.scale.as_ref().ok_or_else(ApiError::no_route)?;
    let at = |p: &[String]| -> Value {
        let mut v = obj;
        for k in p {
            match v.get(k) {
                Some(x) => v = x,
                None => return Value::Null,
            }
        }
        v.clone()
    };
    let replicas = at(&spec.spec_replicas).as_i64().unwrap_or(0);
    let status_replicas = at(&spec.status_replicas).as_i64().unwrap_or(0);
    let selector = match &spec.label_selector {
        Some(p) => at(p).as_str().map(str::to_string),
        None => None,
    }
    .or_else(|| {
        obj.pointer("/spec/selector/matchLabels").and_then(Value::as_object).map(|m| {
            m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(",")
        })
    });
    let mut meta = json!({
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "resourceVersion": obj["metadata"]["resourceVersion"],
        "creationTimestamp": obj["metadata"]["creationTimestamp"],
    });
    if let Some(ns) = obj.pointer("/metadata/namespace") {
        meta["namespace"] = ns.clone();
    }
    let mut status = json!({"replicas": status_replicas});
    if let Some(s) = selector {
        status["selector"] = json!(s);
    }
    Ok(
        json!({"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": meta, "spec": {"replicas": replicas}, "status": status}),
    )
}

pub fn get_scale(c: &Cluster, res: &ResourceDef, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
    let o = get(c, res, ns, name)?;
    scale_of(res, &o)
}

fn set_replicas(res: &ResourceDef, obj: &mut Value, replicas: i64) -> Result<(), ApiError> {
    let spec = res.scale.as_ref().ok_or_else(ApiError::no_route)?;
    let mut cur = obj;
    for (i, k) in spec.spec_replicas.iter().enumerate() {
        if i + 1 == spec.spec_replicas.len() {
            cur[k.as_str()] = json!(replicas);
        } else {
            if cur.get(k).is_none() {
                cur[k.as_str()] = json!({});
            }
            cur = &mut cur[k.as_str()];
        }
    }
    Ok(())
}

fn write_scale(
    c: &Arc<Cluster>,
    res: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    scale: Value,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    let replicas = scale.pointer("/spec/replicas").and_then(Value::as_i64).filter(|r| *r >= 0).ok_or_else(|| {
        ApiError::invalid(
            res,
            name,
            vec![(
                "spec.replicas".into(),
                format!(
                    "Invalid value: {}: must be greater than or equal to 0",
                    scale.pointer("/spec/replicas").unwrap_or(&Value::Null)
                ),
            )],
        )
    })?;
    let nsk = ns_key(res, ns);
    let st = c.state();
    let old =
        st.get(&res.storage_key(), &nsk, name).map(|o| o.value()).ok_or_else(|| ApiError::not_found(res, name))?;
    if let Some(rv) = meta_str(&scale, "resourceVersion") {
        if meta_str(&old, "resourceVersion") != Some(rv) {
            return Err(ApiError::stale(res, name));
        }
    }
    let mut new = old.clone();
    set_replicas(res, &mut new, replicas)?;
    let w = write_changed(c, st, res, &nsk, name, &old, new, Sub::Scale, opts)?;
    Ok(Written { obj: scale_of(res, &w.obj)?, created: false, warnings: w.warnings })
}

#[allow(clippy::too_many_arguments)] // mirrors the REST call: target, patch type, body, subresource, options
pub fn patch(
    c: &Arc<Cluster>,
    res: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    ptype: PatchType,
    body: &[u8],
    sub: Sub,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    let to_err = |e: patch::PatchError| match e {
        patch::PatchError::Malformed(e) => ApiError::bad_request(format!("error decoding patch: {e}")),
        other => ApiError::invalid(res, name, vec![("patch".into(), other.to_string())]),
    };
    if sub == Sub::Scale {
        let cur = get_scale(c, res, ns, name)?;
        let patched = match ptype {
            PatchType::Json => patch::json_patch(&cur, body).map_err(to_err)?,
            PatchType::Merge | PatchType::Strategic => patch::merge_patch(&cur, body).map_err(to_err)?,
            PatchType::Apply => {
                let applied = parse_apply_body(body)?;
                patch::merge_patch(&cur, serde_json::to_vec(&applied).unwrap_or_default().as_slice()).map_err(to_err)?
            }
        };
        return write_scale(c, res, ns, name, patched, opts);
    }
    if ptype == PatchType::Apply {
        return apply(c, res, ns, name, body, sub, opts);
    }
    let nsk = ns_key(res, ns);
    let st = c.state();
    let old =
        st.get(&res.storage_key(), &nsk, name).map(|o| o.value()).ok_or_else(|| ApiError::not_found(res, name))?;
    let mut new = match ptype {
        PatchType::Json => patch::json_patch(&old, body).map_err(to_err)?,
        PatchType::Merge => patch::merge_patch(&old, body).map_err(to_err)?,
        PatchType::Strategic => {
            if !res.builtin {
                return Err(ApiError::unsupported_media("application/strategic-merge-patch+json"));
            }
            patch::strategic_merge_patch(&old, body, res.builtin).map_err(to_err)?
        }
        PatchType::Apply => unreachable!("handled above"),
    };
    if let Some(rv) = meta_str(&new, "resourceVersion") {
        if meta_str(&old, "resourceVersion") != Some(rv) {
            return Err(ApiError::stale(res, name));
        }
    }
    if meta_str(&new, "name") != Some(name) {
        return Err(ApiError::bad_request("the name of the object does not match the name on the URL"));
    }
    preserve(res, sub, &old, &mut new);
    write_changed(c, st, res, &nsk, name, &old, new, sub, opts)
}

pub fn parse_apply_body(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            serde_yaml::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
        }
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("error decoding YAML: the applied configuration must be an object"));
    }
    Ok(v)
}

/// Server-side apply (`application/apply-patch+yaml`): creates or merges with field ownership.
fn apply(
    c: &Arc<Cluster>,
    res: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    body: &[u8],
    sub: Sub,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    if opts.field_manager.is_empty() {
        return Err(ApiError::bad_request("PATCH, application/apply-patch+yaml requests must specify a fieldManager"));
    }
    let applied = parse_apply_body(body)?;
    if applied.get("apiVersion").is_none() || applied.get("kind").is_none() {
        return Err(ApiError::bad_request("error decoding YAML: Object 'Kind' is missing in applied configuration"));
    }
    check_body(res, ns, Some(name), &applied)?;
    let nsk = ns_key(res, ns);
    let mut st = c.state();
    let old = st.get(&res.storage_key(), &nsk, name).map(|o| o.value());
    if old.is_none() {
        if sub != Sub::Main {
            return Err(ApiError::not_found(res, name));
        }
        namespace_admits(&st, res, &nsk, name)?;
    }
    let mut applied = applied;
    let mut warnings = check_schema(res, &mut applied, opts.validation, true)?;
    if sub == Sub::Main && res.status {
        if let Some(m) = applied.as_object_mut() {
            m.shift_remove("status");
        }
    }
    let base = old.clone().unwrap_or_else(|| json!({"metadata": {"name": name}}));
    let req = fields::ApplyRequest {
        manager: &opts.field_manager,
        api_version: &res.api_version(),
        force: opts.force,
        ctx: Ctx { builtin: res.builtin, scope: scope_for(res, sub) },
        subresource: sub.name(),
        now: &now(),
    };
    let mut new = fields::apply(&base, &applied, &req).map_err(|cs| ApiError::apply_conflicts(res, name, &cs))?;
    new["metadata"]["name"] = json!(name);
    match old {
        Some(old) => {
            if let Some(o) = old.as_object() {
                preserve_for_apply(res, sub, o, &mut new);
            }
            kinds::apply_defaults(res, &mut new, Some(&old));
            if !finalize(c, res, &nsk, Some(&old), &mut new, sub, None, &mut warnings)? {
                return Ok(Written { obj: present(res, &old), created: false, warnings });
            }
            let obj = commit(c, &mut st, res, &nsk, name, new, opts.dry_run);
            drop(st);
            if !opts.dry_run {
                crate::controllers::observe(c, res, &obj);
            }
            Ok(Written { obj, created: false, warnings })
        }
        None => {
            kinds::apply_defaults(res, &mut new, None);
            finalize(c, res, &nsk, None, &mut new, sub, None, &mut warnings)?;
            let obj = commit(c, &mut st, res, &nsk, name, new, opts.dry_run);
            drop(st);
            if !opts.dry_run {
                crate::controllers::observe(c, res, &obj);
            }
            Ok(Written { obj, created: true, warnings })
        }
    }
}

fn preserve_for_apply(res: &ResourceDef, sub: Sub, old: &serde_json::Map<String, Value>, new: &mut Value) {
    let mf = new.pointer("/metadata/managedFields").cloned();
    preserve(res, sub, &Value::Object(old.clone()), new);
    if let Some(mf) = mf {
        new["metadata"]["managedFields"] = mf;
    }
}

pub fn delete(
    c: &Arc<Cluster>,
    res: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    opts: &DeleteOpts,
) -> Result<Value, ApiError> {
    let nsk = ns_key(res, ns);
    let mut st = c.state();
    let old =
        st.get(&res.storage_key(), &nsk, name).map(|o| o.value()).ok_or_else(|| ApiError::not_found(res, name))?;
    if let Some(uid) = &opts.precondition_uid {
        if meta_str(&old, "uid") != Some(uid) {
            return Err(ApiError::stale(res, name));
        }
    }
    if let Some(rv) = &opts.precondition_rv {
        if meta_str(&old, "resourceVersion") != Some(rv) {
            return Err(ApiError::stale(res, name));
        }
    }
    c.admission().admit(Operation::Delete, res, &old)?;
    if opts.dry_run {
        return Ok(present(res, &old));
    }
    let mut new = old.clone();
    let terminating = old.pointer("/metadata/deletionTimestamp").is_some();
    let is_namespace = res.builtin && res.kind == "Namespace";
    if opts.propagation == Propagation::Orphan {
        crate::controllers::orphan_dependents(&mut st, meta_str(&old, "uid").unwrap_or_default());
    }
    if is_namespace {
        if !terminating {
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            new["status"]["phase"] = json!("Terminating");
            let rv = st.next_rv();
            new["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.put(&res.storage_key(), "", name, Stored::new(&new), rv);
            drop(st);
            crate::controllers::finalize_namespace(c, name.to_string());
            return Ok(present(res, &new));
        }
        return Ok(present(res, &old));
    }
    let mut finalizers: Vec<Value> =
        old.pointer("/metadata/finalizers").and_then(Value::as_array).cloned().unwrap_or_default();
    if opts.propagation == Propagation::Foreground && !terminating {
        let f = json!("foregroundDeletion");
        if !finalizers.contains(&f) {
            finalizers.push(f);
        }
        new["metadata"]["finalizers"] = json!(finalizers);
    }
    if !finalizers.is_empty() {
        if terminating && opts.propagation != Propagation::Foreground {
            return Ok(present(res, &old));
        }
        if !terminating {
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        }
        let rv = st.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.put(&res.storage_key(), &nsk, name, Stored::new(&new), rv);
        drop(st);
        if opts.propagation == Propagation::Foreground {
            crate::controllers::foreground_delete(c, res.clone(), nsk, name.to_string());
        }
        return Ok(present(res, &new));
    }
    let rv = st.next_rv();
    new["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.remove(&res.storage_key(), &nsk, name, Stored::new(&new), rv);
    crate::controllers::after_delete(c, &mut st, res, &new);
    Ok(present(res, &new))
}

/// A started watch: events already due, then the live feed.
pub struct WatchStart {
    pub initial: Vec<(EventType, Value)>,
    pub backlog: Vec<Arc<crate::store::Event>>,
    pub rx: broadcast::Receiver<Signal>,
    pub rv: u64,
}

pub fn watch(
    c: &Cluster,
    res: &ResourceDef,
    ns: Option<&str>,
    from: Option<u64>,
    opts: &ListOpts,
) -> Result<WatchStart, ApiError> {
    let mut st = c.state();
    let key = res.storage_key();
    let mut initial = Vec::new();
    let mut backlog = Vec::new();
    match from {
        Some(rv) if rv > 0 => {
            if rv < st.compacted_rv {
                return Err(ApiError::gone(format!("too old resource version: {rv} ({})", st.compacted_rv + 1)));
            }
            backlog = st.log.iter().filter(|e| e.rv > rv && e.key == key).cloned().collect();
        }
        _ => {
            for ((ons, _), o) in st.objects.get(&key).into_iter().flatten() {
                if res.namespaced && ns.is_some_and(|n| n != ons) {
                    continue;
                }
                let o = o.value();
                if opts.label.matches_object(&o) && opts.field.matches_object(&o) {
                    initial.push((EventType::Added, o));
                }
            }
        }
    }
    let rx = st.subscribe();
    Ok(WatchStart { initial, backlog, rx, rv: st.rv })
}

/// How a committed event looks to one watcher: label and field selectors turn modifications into
/// additions or deletions as objects enter or leave the selection.
pub fn filter_event(
    res: &ResourceDef,
    ns: Option<&str>,
    opts: &ListOpts,
    ev: &crate::store::Event,
) -> Option<(EventType, Value)> {
    if ev.key != res.storage_key() {
        return None;
    }
    let in_ns = |o: &Value| !res.namespaced || ns.is_none_or(|n| meta_str(o, "namespace") == Some(n));
    let sel = |o: &Value| in_ns(o) && opts.label.matches_object(o) && opts.field.matches_object(o);
    let obj = ev.obj.value();
    let now_in = sel(&obj);
    let was_in = ev.old.as_ref().is_some_and(|o| sel(&o.value()));
    let typ = match (ev.typ, was_in, now_in) {
        (EventType::Deleted, _, true) => EventType::Deleted,
        (EventType::Deleted, true, false) => EventType::Deleted,
        (EventType::Added, _, true) => EventType::Added,
        (EventType::Modified, true, true) => EventType::Modified,
        (EventType::Modified, false, true) => EventType::Added,
        (EventType::Modified, true, false) => EventType::Deleted,
        _ => return None,
    };
    Some((typ, present(res, &obj)))
}

pub fn present_obj(res: &ResourceDef, o: &Value) -> Value {
    present(res, o)
}

/// `POST pods/NAME/eviction`: the pod is deleted unless a PodDisruptionBudget selecting it allows no
/// disruption now (429, as the API server answers).
pub fn evict(c: &Arc<Cluster>, pods: &Arc<ResourceDef>, ns: &str, name: &str, dry_run: bool) -> Result<(), ApiError> {
    let pod = get(c, pods, Some(ns), name)?;
    let labels = pod.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
    let blocked = {
        let st = c.state();
        st.objects.get("policy/poddisruptionbudgets").into_iter().flatten().any(|((pns, _), o)| {
            let pdb = o.value();
            pns == ns
                && pdb.pointer("/status/disruptionsAllowed").and_then(Value::as_i64) == Some(0)
                && pdb
                    .pointer("/spec/selector/matchLabels")
                    .and_then(Value::as_object)
                    .is_some_and(|ml| ml.iter().all(|(k, v)| labels.get(k) == Some(v)))
        })
    };
    if blocked {
        return Err(ApiError {
            code: 429,
            reason: "TooManyRequests",
            message: "Cannot evict pod as it would violate the pod's disruption budget.".into(),
            details: Some(
                json!({"causes": [{"reason": "DisruptionBudget", "message": "The disruption budget needs more healthy pods"}]}),
            ),
            delay_ms: 0,
        });
    }
    delete(c, pods, Some(ns), name, &DeleteOpts { dry_run, ..Default::default() })?;
    Ok(())
}
