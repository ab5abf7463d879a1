//! Field ownership: the `managedFields` model of server-side apply (structured-merge-diff), reduced to what
//! a simulated API server needs. A [`FieldSet`] is the tree stored as `fieldsV1`; [`apply`] merges an applied
//! configuration with conflict detection; [`record_update`] gives the fields an ordinary write changed to its
//! manager.
//!
//! Lists follow the Kubernetes schema for the built-in kinds (containers keyed by name, ports by port, and so
//! on); lists in custom resources are atomic, the default for CRDs without `x-kubernetes-list-type`.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// A set of field paths, in the shape of `fieldsV1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    pub member: bool,
    pub children: BTreeMap<String, FieldSet>,
}

pub type Path = Vec<String>;

impl FieldSet {
    pub fn from_json(v: &Value) -> FieldSet {
        let mut out = FieldSet::default();
        if let Some(m) = v.as_object() {
            out.member = m.is_empty() || m.contains_key(".");
            for (k, c) in m {
                if k != "." {
                    out.children.insert(k.clone(), FieldSet::from_json(c));
                }
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &self.children {
            if !c.is_empty() {
                m.insert(k.clone(), c.to_json());
            }
        }
        Value::Object(m)
    }

    pub fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(FieldSet::is_empty)
    }

    /// Every member path, parents before children.
    pub fn members(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        if self.member && !prefix.is_empty() {
            out.push(prefix.clone());
        }
        for (k, c) in &self.children {
            prefix.push(k.clone());
            c.collect(prefix, out);
            prefix.pop();
        }
    }

    pub fn node(&self, path: &[String]) -> Option<&FieldSet> {
        let mut n = self;
        for p in path {
            n = n.children.get(p)?;
        }
        Some(n)
    }

    pub fn contains(&self, path: &[String]) -> bool {
        self.node(path).is_some_and(|n| n.member)
    }

    /// True when the path or anything beneath it is a member.
    pub fn touches(&self, path: &[String]) -> bool {
        self.node(path).is_some_and(|n| !n.is_empty())
    }

    pub fn insert(&mut self, path: &[String]) {
        let mut n = self;
        for p in path {
            n = n.children.entry(p.clone()).or_default();
        }
        n.member = true;
    }

    pub fn remove(&mut self, path: &[String]) {
        fn rec(n: &mut FieldSet, path: &[String]) {
            match path.split_first() {
                None => n.member = false,
                Some((h, rest)) => {
                    if let Some(c) = n.children.get_mut(h) {
                        rec(c, rest);
                        if c.is_empty() {
                            n.children.remove(h);
                        }
                    }
                }
            }
        }
        rec(self, path);
    }

    /// Keep only the members that are also members of `other`.
    pub fn retain_in(&mut self, other: &FieldSet) {
        for p in self.members() {
            if !other.contains(&p) {
                self.remove(&p);
            }
        }
    }
}

/// How a list is merged and owned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListType {
    Atomic,
    Set,
    Map(&'static [&'static str]),
}

/// The list type of the field at `path` (field names from the root, list positions left out).
pub fn list_type(builtin: bool, path: &[&str]) -> ListType {
    let Some(last) = path.last() else {
        return ListType::Atomic;
    };
    if path.len() == 2 && path[0] == "metadata" {
        return match *last {
            "finalizers" => ListType::Set,
            "ownerReferences" => ListType::Map(&["uid"]),
            _ => ListType::Atomic,
        };
    }
    if !builtin {
        return ListType::Atomic;
    }
    match *last {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => ListType::Map(&["name"]),
        "volumeMounts" => ListType::Map(&["mountPath"]),
        "volumeDevices" => ListType::Map(&["devicePath"]),
        "conditions" => ListType::Map(&["type"]),
        "hostAliases" => ListType::Map(&["ip"]),
        "ports" if path.contains(&"containers") || path.contains(&"initContainers") => {
            ListType::Map(&["containerPort"])
        }
        "ports" if path.first() == Some(&"spec") && path.len() == 2 => ListType::Map(&["port"]),
        _ => ListType::Atomic,
    }
}

const IGNORED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

/// Which part of an object an operation may own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything (kinds without a status subresource).
    All,
    /// Everything but `status` (the main resource of a kind with a status subresource).
    NoStatus,
    /// Only `status` (the status subresource).
    StatusOnly,
}

/// Schema context for walking an object.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub builtin: bool,
    pub scope: Scope,
}

fn item_key(item: &Value, keys: &[&str]) -> Option<String> {
    let m = item.as_object()?;
    let mut k = Map::new();
    let mut sorted: Vec<&&str> = keys.iter().collect();
    sorted.sort();
    for key in sorted {
        k.insert(key.to_string(), m.get(*key)?.clone());
    }
    Some(format!("k:{}", Value::Object(k)))
}

fn value_key(item: &Value) -> String {
    format!("v:{item}")
}

/// The field set of an object: the paths of every leaf it sets, every item of an associative list and
/// every atomic list.
pub fn fields_of(obj: &Value, ctx: Ctx) -> FieldSet {
    let mut set = FieldSet::default();
    if let Some(m) = obj.as_object() {
        walk_obj(m, &mut Vec::new(), &mut set, ctx);
    }
    set
}

fn walk_obj<'a>(m: &'a Map<String, Value>, names: &mut Vec<&'a str>, node: &mut FieldSet, ctx: Ctx) {
    for (k, v) in m {
        if names.is_empty() {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            match (ctx.scope, k.as_str()) {
                (Scope::NoStatus, "status") => continue,
                (Scope::StatusOnly, kk) if kk != "status" => continue,
                _ => {}
            }
        }
        if names.len() == 1 && names[0] == "metadata" && IGNORED_META.contains(&k.as_str()) {
            continue;
        }
        let key = format!("f:{k}");
        let child = node.children.entry(key.clone()).or_default();
        names.push(k);
        walk_value(v, names, child, ctx);
        names.pop();
        if child.is_empty() {
            node.children.remove(&key);
        }
    }
}

fn walk_value<'a>(v: &'a Value, names: &mut Vec<&'a str>, node: &mut FieldSet, ctx: Ctx) {
    match v {
        Value::Object(m) if !m.is_empty() => walk_obj(m, names, node, ctx),
        Value::Array(items) if !items.is_empty() => match list_type(ctx.builtin, names) {
            ListType::Atomic => node.member = true,
            ListType::Set => {
                for item in items {
                    node.children.entry(value_key(item)).or_default().member = true;
                }
            }
            ListType::Map(keys) => {
                let ks: Option<Vec<String>> = items.iter().map(|i| item_key(i, keys)).collect();
                match ks {
                    Some(ks) => {
                        for (k, item) in ks.into_iter().zip(items) {
                            let c = node.children.entry(k).or_default();
                            c.member = true;
                            if let Some(m) = item.as_object() {
                                walk_obj(m, names, c, ctx);
                            }
                        }
                    }
                    None => node.member = true,
                }
            }
        },
        _ => node.member = true,
    }
}

fn find_item(items: &[Value], pe: &str) -> Option<usize> {
    if let Some(k) = pe.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(k).ok()?;
        items.iter().position(|i| key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)))
    } else if let Some(v) = pe.strip_prefix("v:") {
        let val: Value = serde_json::from_str(v).ok()?;
        items.iter().position(|i| *i == val)
    } else if let Some(i) = pe.strip_prefix("i:") {
        let i: usize = i.parse().ok()?;
        (i < items.len()).then_some(i)
    } else {
        let _ = items;
        None
    }
}

/// The value at a field path, if the object has it.
pub fn get_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = obj;
    for pe in path {
        v = if let Some(f) = pe.strip_prefix("f:") {
            v.as_object()?.get(f)?
        } else {
            let items = v.as_array()?;
            &items[find_item(items, pe)?]
        };
    }
    Some(v)
}

/// Removes the value at a field path; returns whether something was removed.
pub fn remove_at(obj: &mut Value, path: &[String]) -> bool {
    let Some((last, parent_path)) = path.split_last() else {
        return false;
    };
    let mut v = obj;
    for pe in parent_path {
        v = if let Some(f) = pe.strip_prefix("f:") {
            match v.as_object_mut().and_then(|m| m.get_mut(f)) {
                Some(x) => x,
                None => return false,
            }
        } else {
            let Some(items) = v.as_array_mut() else {
                return false;
            };
            let Some(i) = find_item(items, pe) else {
                return false;
            };
            &mut items[i]
        };
    }
    if let Some(f) = last.strip_prefix("f:") {
        v.as_object_mut().and_then(|m| m.shift_remove(f)).is_some()
    } else if let Some(items) = v.as_array_mut() {
        match find_item(items, last) {
            Some(i) => {
                items.remove(i);
                true
            }
            None => false,
        }
    } else {
        false
    }
}

/// `.spec.containers[name="web"].image`, the way the API server prints a field path in a conflict.
pub fn display_path(path: &[String]) -> String {
    let mut s = String::new();
    for pe in path {
        if let Some(f) = pe.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = pe.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = pe.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        } else if let Some(i) = pe.strip_prefix("i:") {
            s.push_str(&format!("[{i}]"));
        }
    }
    s
}

/// One entry of `metadata.managedFields`.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub set: FieldSet,
}

impl Managed {
    fn same_slot(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager && self.operation == operation && self.subresource.as_deref() == subresource
    }
}

pub fn read_managed(obj: &Value) -> Vec<Managed> {
    let Some(list) = obj.pointer("/metadata/managedFields").and_then(Value::as_array) else {
        return vec![];
    };
    list.iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            Managed {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                time: s("time"),
                subresource: e.get("subresource").and_then(Value::as_str).map(str::to_string),
                set: FieldSet::from_json(e.get("fieldsV1").unwrap_or(&Value::Null)),
            }
        })
        .collect()
}

pub fn write_managed(obj: &mut Value, entries: &[Managed]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut m = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": e.set.to_json(),
            });
            if let Some(s) = &e.subresource {
                m["subresource"] = json!(s);
            }
            m
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.shift_remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub path: String,
}

/// Merges an applied configuration into a live object the way server-side apply does.
pub fn merge(live: &Value, applied: &Value, names: &mut Vec<String>, builtin: bool) -> Value {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            let mut out = l.clone();
            for (k, av) in a {
                names.push(k.clone());
                let merged = match l.get(k) {
                    Some(lv) => merge(lv, av, names, builtin),
                    None => av.clone(),
                };
                names.pop();
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::Array(l), Value::Array(a)) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            match list_type(builtin, &refs) {
                ListType::Atomic => applied.clone(),
                ListType::Set => {
                    let mut out = l.clone();
                    for v in a {
                        if !out.contains(v) {
                            out.push(v.clone());
                        }
                    }
                    Value::Array(out)
                }
                ListType::Map(keys) => {
                    let mut out = l.clone();
                    for item in a {
                        let pos = item_key(item, keys).and_then(|k| find_item(&out, &k));
                        match pos {
                            Some(i) => out[i] = merge(&out[i], item, names, builtin),
                            None => out.push(item.clone()),
                        }
                    }
                    Value::Array(out)
                }
            }
        }
        _ => applied.clone(),
    }
}

/// Inputs of one server-side apply.
pub struct ApplyRequest<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub force: bool,
    pub ctx: Ctx,
    pub subresource: Option<&'a str>,
    pub now: &'a str,
}

/// Server-side apply of `applied` onto `live` (an empty object when creating). Returns the merged object
/// with its managedFields, or the conflicts that block it.
pub fn apply(live: &Value, applied: &Value, req: &ApplyRequest<'_>) -> Result<Value, Vec<Conflict>> {
    let mut entries = read_managed(live);
    let new_set = fields_of(applied, req.ctx);
    let new_members = new_set.members();
    let mut conflicts = Vec::new();
    for e in entries.iter_mut() {
        if e.same_slot(req.manager, "Apply", req.subresource) {
            continue;
        }
        let mut lost = Vec::new();
        for p in &new_members {
            if e.set.contains(p) && get_at(live, p) != get_at(applied, p) {
                lost.push(p.clone());
            }
        }
        if req.force {
            for p in &lost {
                e.set.remove(p);
            }
        } else {
            conflicts.extend(lost.iter().map(|p| Conflict {
                manager: e.manager.clone(),
                api_version: e.api_version.clone(),
                path: display_path(p),
            }));
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let prev = entries
        .iter()
        .find(|e| e.same_slot(req.manager, "Apply", req.subresource))
        .map(|e| e.set.clone())
        .unwrap_or_default();
    let mut merged = merge(live, applied, &mut Vec::new(), req.ctx.builtin);
    // Fields this manager applied before and applies no more are removed, unless someone else owns them.
    let mut removed: Vec<Path> = prev.members().into_iter().filter(|p| !new_set.contains(p)).collect();
    removed.reverse();
    for p in removed {
        let others = entries.iter().any(|e| !e.same_slot(req.manager, "Apply", req.subresource) && e.set.touches(&p));
        if !others && !new_set.touches(&p) {
            remove_at(&mut merged, &p);
            prune_empty_parents(&mut merged, &p);
        }
    }
    match entries.iter_mut().find(|e| e.same_slot(req.manager, "Apply", req.subresource)) {
        Some(e) => {
            if e.set != new_set || e.api_version != req.api_version {
                e.set = new_set;
                e.api_version = req.api_version.to_string();
                e.time = req.now.to_string();
            }
        }
        None => entries.push(Managed {
            manager: req.manager.to_string(),
            operation: "Apply".into(),
            api_version: req.api_version.to_string(),
            time: req.now.to_string(),
            subresource: req.subresource.map(str::to_string),
            set: new_set,
        }),
    }
    finish(&mut merged, entries, req.ctx.builtin);
    Ok(merged)
}

fn prune_empty_parents(obj: &mut Value, path: &[String]) {
    for end in (1..path.len()).rev() {
        let parent = &path[..end];
        let empty = matches!(get_at(obj, parent), Some(Value::Object(m)) if m.is_empty());
        if empty && parent.iter().all(|p| p.starts_with("f:")) {
            remove_at(obj, parent);
        } else {
            break;
        }
    }
}

fn finish(obj: &mut Value, mut entries: Vec<Managed>, builtin: bool) {
    let live = fields_of(obj, Ctx { builtin, scope: Scope::All });
    for e in entries.iter_mut() {
        e.set.retain_in(&live);
    }
    entries.retain(|e| !e.set.is_empty());
    write_managed(obj, &entries);
}

/// Records an ordinary write (create, update, patch): the manager takes every field the write changed, and
/// fields that no longer exist leave every manager's set.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    ctx: Ctx,
    subresource: Option<&str>,
    now: &str,
) {
    let mut entries = old.map(read_managed).unwrap_or_default();
    let fields = fields_of(new, ctx);
    let mut changed = FieldSet::default();
    for p in fields.members() {
        let before = old.and_then(|o| get_at(o, &p));
        if before != get_at(new, &p) {
            changed.insert(&p);
        }
    }
    if !changed.is_empty() {
        for e in entries.iter_mut() {
            for p in changed.members() {
                e.set.remove(&p);
            }
        }
        match entries.iter_mut().find(|e| e.same_slot(manager, "Update", subresource)) {
            Some(e) => {
                for p in changed.members() {
                    e.set.insert(&p);
                }
                e.time = now.to_string();
                e.api_version = api_version.to_string();
            }
            None => entries.push(Managed {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                time: now.to_string(),
                subresource: subresource.map(str::to_string),
                set: changed,
            }),
        }
    }
    finish(new, entries, ctx.builtin);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CTX: Ctx = Ctx { builtin: true, scope: Scope::NoStatus };

    fn req<'a>(manager: &'a str, force: bool) -> ApplyRequest<'a> {
        ApplyRequest { manager, api_version: "apps/v1", force, ctx: CTX, subresource: None, now: "t" }
    }

    fn deploy(replicas: i64, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}
        })
    }

    #[test]
    fn fields_of_keys_containers_by_name() {
        let set = fields_of(&deploy(1, "nginx"), CTX);
        let j = set.to_json();
        assert_eq!(
            j["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"],
            json!({".": {}, "f:image": {}, "f:name": {}})
        );
        assert_eq!(j["f:metadata"], json!({"f:labels": {"f:app": {}}}));
        assert_eq!(FieldSet::from_json(&j), set);
    }

    #[test]
    fn apply_conflicts_name_field_and_manager_and_force_takes_ownership() {
        let live = apply(&json!({}), &deploy(1, "nginx"), &req("a", false)).unwrap();
        let err = apply(&live, &deploy(3, "nginx"), &req("b", false)).unwrap_err();
        assert_eq!(
            err,
            vec![Conflict { manager: "a".into(), api_version: "apps/v1".into(), path: ".spec.replicas".into() }]
        );
        // Same values are shared, not conflicting.
        let shared = apply(&live, &deploy(1, "nginx"), &req("b", false)).unwrap();
        assert_eq!(read_managed(&shared).len(), 2);
        let forced = apply(&live, &deploy(3, "nginx"), &req("b", true)).unwrap();
        assert_eq!(forced["spec"]["replicas"], json!(3));
        let m = read_managed(&forced);
        let a = m.iter().find(|e| e.manager == "a").unwrap();
        assert!(!a.set.contains(&["f:spec".into(), "f:replicas".into()]));
    }

    #[test]
    fn apply_removes_fields_the_manager_dropped_but_keeps_others() {
        let mut with_anno = deploy(1, "nginx");
        with_anno["metadata"]["annotations"] = json!({"a": "1"});
        let live = apply(&json!({}), &with_anno, &req("a", false)).unwrap();
        let mut other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"team": "x"}}});
        let live = apply(&live, &other, &req("b", false)).unwrap();
        let again = apply(&live, &deploy(1, "nginx"), &req("a", false)).unwrap();
        assert!(again["metadata"].get("annotations").is_none(), "{again}");
        assert_eq!(again["metadata"]["labels"], json!({"app": "web", "team": "x"}));
        other["metadata"]["labels"] = json!({});
        let dropped = apply(&again, &other, &req("b", false)).unwrap();
        assert_eq!(dropped["metadata"]["labels"], json!({"app": "web"}));
    }

    #[test]
    fn apply_merges_containers_by_key() {
        let live = apply(&json!({}), &deploy(1, "nginx"), &req("a", false)).unwrap();
        let side = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "envoy"}]}}}});
        let both = apply(&live, &side, &req("b", false)).unwrap();
        let names: Vec<&str> = both["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["web", "sidecar"]);
    }

    #[test]
    fn update_takes_changed_fields_from_appliers() {
        let live = apply(&json!({}), &deploy(1, "nginx"), &req("a", false)).unwrap();
        let mut new = live.clone();
        new["spec"]["replicas"] = json!(5);
        record_update(Some(&live), &mut new, "kubectl-scale", "apps/v1", CTX, None, "t");
        let m = read_managed(&new);
        assert_eq!(m.len(), 2);
        assert!(m[1].set.contains(&["f:spec".into(), "f:replicas".into()]));
        assert!(!m[0].set.contains(&["f:spec".into(), "f:replicas".into()]));
        // The applier now conflicts on replicas.
        let err = apply(&new, &deploy(1, "nginx"), &req("a", false)).unwrap_err();
        assert_eq!(err[0].manager, "kubectl-scale");
    }

    #[test]
    fn display_paths() {
        let p: Path = vec!["f:spec".into(), "f:containers".into(), "k:{\"name\":\"web\"}".into(), "f:image".into()];
        assert_eq!(display_path(&p), ".spec.containers[name=\"web\"].image");
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(|i| json!(i)),
            "[a-z]{0,4}".prop_map(|s| json!(s)),
            any::<bool>().prop_map(|b| json!(b)),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::btree_map("[a-c]{1,2}", inner.clone(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                prop::collection::vec(inner, 0..3).prop_map(Value::Array),
            ]
        })
    }

    proptest! {
        #[test]
        fn fieldset_json_roundtrips(v in arb_json()) {
            let obj = json!({"spec": v});
            let set = fields_of(&obj, Ctx { builtin: false, scope: Scope::All });
            prop_assert_eq!(FieldSet::from_json(&set.to_json()), set);
        }

        #[test]
        fn applying_the_same_config_twice_is_a_fixed_point(v in arb_json()) {
            let cfg = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n"}, "spec": v});
            let r = ApplyRequest { manager: "m", api_version: "x/v1", force: false, ctx: Ctx { builtin: false, scope: Scope::All }, subresource: None, now: "t" };
            let once = apply(&json!({}), &cfg, &r).unwrap();
            let twice = apply(&once, &cfg, &r).unwrap();
            prop_assert_eq!(once, twice);
        }

        #[test]
        fn every_member_path_resolves(v in arb_json()) {
            let obj = json!({"spec": v});
            let set = fields_of(&obj, Ctx { builtin: false, scope: Scope::All });
            for p in set.members() {
                prop_assert!(get_at(&obj, &p).is_some(), "{:?}", p);
            }
        }
    }
}
