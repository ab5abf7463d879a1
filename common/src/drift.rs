//! Drift: where a live object differs from what applying the desired object would make of it. Free of I/O.
//!
//! The agent asks the API server for a server-side dry-run of its apply; the answer (`predicted`) is the live
//! object with the agent's fields merged in, defaulted, normalized and admitted exactly as a real apply would
//! be. Drift is then the difference between `predicted` and `live` on the fields the agent manages: the
//! field set recorded for the agent's manager in `predicted`'s managedFields. Defaults, canonical quantities,
//! `stringData`, omitted empty values and fields other managers add are therefore never drift.
//!
//! Paths have one syntax everywhere (ignore rules, drift items): a JSON pointer whose segments may select an
//! item of a keyed list by its keys, `/spec/template/spec/containers[name=web]/image`,
//! `/spec/ports[port=80,protocol=TCP]`. A plain number selects by position. A path covers everything below it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftItem {
    /// The field, in the path syntax of this module.
    pub path: String,
    pub desired: Value,
    /// `null` when the live object lacks the field.
    pub live: Value,
}

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    /// A list item with these keys (`[name=web]`): compared as strings, numbers by their text.
    Select(Vec<(String, String)>),
    Index(usize),
}

/// A field of an object: `/spec/containers[name=web]/image`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldPath(pub Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid path {path:?}: {why} (paths look like /spec/replicas or /spec/template/spec/containers[name=web]/image)"
)]
pub struct PathError {
    pub path: String,
    pub why: &'static str,
}

fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

fn unescape(k: &str) -> String {
    k.replace("~1", "/").replace("~0", "~")
}

impl std::str::FromStr for FieldPath {
    type Err = PathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| PathError { path: s.to_string(), why };
        let rest = s.strip_prefix('/').ok_or(err("a path starts with /"))?;
        let mut segs = Vec::new();
        if rest.is_empty() {
            return Ok(FieldPath(segs));
        }
        for part in rest.split('/') {
            let (key, mut selectors) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if key.is_empty() && selectors.is_empty() {
                return Err(err("empty segment"));
            }
            if !key.is_empty() {
                match key.parse::<usize>() {
                    Ok(i) if selectors.is_empty() => segs.push(Seg::Index(i)),
                    _ => segs.push(Seg::Key(unescape(key))),
                }
            }
            while !selectors.is_empty() {
                let close = selectors.find(']').ok_or(err("a [ without its ]"))?;
                let inner = &selectors[1..close];
                let mut keys = Vec::new();
                for kv in inner.split(',') {
                    let (k, v) = kv.split_once('=').ok_or(err("a selector is [key=value]"))?;
                    if k.is_empty() {
                        return Err(err("a selector names its key"));
                    }
                    keys.push((k.to_string(), v.to_string()));
                }
                segs.push(Seg::Select(keys));
                selectors = &selectors[close + 1..];
                if !selectors.is_empty() && !selectors.starts_with('[') {
                    return Err(err("text after a selector"));
                }
            }
        }
        Ok(FieldPath(segs))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for s in &self.0 {
            match s {
                Seg::Key(k) => write!(f, "/{}", escape(k))?,
                Seg::Index(i) => write!(f, "/{i}")?,
                Seg::Select(keys) => {
                    let inner: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    write!(f, "[{}]", inner.join(","))?;
                }
            }
        }
        Ok(())
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn selects(item: &Value, keys: &[(String, String)]) -> bool {
    keys.iter().all(|(k, v)| item.get(k).and_then(scalar_text).as_deref() == Some(v.as_str()))
}

impl FieldPath {
    pub fn push(&self, s: Seg) -> FieldPath {
        let mut p = self.clone();
        p.0.push(s);
        p
    }

    /// `self` is `other` or lies above it.
    pub fn covers(&self, other: &FieldPath) -> bool {
        other.0.len() >= self.0.len() && other.0[..self.0.len()] == self.0[..]
    }

    pub fn get<'a>(&self, v: &'a Value) -> Option<&'a Value> {
        let mut cur = v;
        for s in &self.0 {
            cur = match (s, cur) {
                (Seg::Key(k), Value::Object(m)) => m.get(k)?,
                (Seg::Index(i), Value::Array(a)) => a.get(*i)?,
                (Seg::Select(keys), Value::Array(a)) => a.iter().find(|e| selects(e, keys))?,
                _ => return None,
            };
        }
        Some(cur)
    }

    fn get_mut<'a>(&self, v: &'a mut Value) -> Option<&'a mut Value> {
        let mut cur = v;
        for s in &self.0 {
            cur = match (s, cur) {
                (Seg::Key(k), Value::Object(m)) => m.get_mut(k)?,
                (Seg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
                (Seg::Select(keys), Value::Array(a)) => a.iter_mut().find(|e| selects(e, keys))?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Sets the field where its parent exists in `v` (nothing is created above it); `None` removes it.
    pub fn set(&self, v: &mut Value, value: Option<Value>) {
        let Some((last, parent)) = self.0.split_last() else { return };
        let Some(parent) = FieldPath(parent.to_vec()).get_mut(v) else { return };
        match (last, parent, value) {
            (Seg::Key(k), Value::Object(m), Some(x)) => {
                m.insert(k.clone(), x);
            }
            (Seg::Key(k), Value::Object(m), None) => {
                m.remove(k);
            }
            (Seg::Index(i), Value::Array(a), Some(x)) if *i < a.len() => a[*i] = x,
            (Seg::Index(i), Value::Array(a), None) if *i < a.len() => {
                a.remove(*i);
            }
            (Seg::Select(keys), Value::Array(a), Some(x)) => {
                if let Some(e) = a.iter_mut().find(|e| selects(e, keys)) {
                    *e = x;
                }
            }
            (Seg::Select(keys), Value::Array(a), None) => a.retain(|e| !selects(e, keys)),
            _ => {}
        }
    }
}

/// Parses ignore paths, naming the first invalid one.
pub fn parse_paths(paths: &[String]) -> Result<Vec<FieldPath>, PathError> {
    paths.iter().map(|p| p.parse()).collect()
}

/// The object to apply when some of its fields belong to other controllers: each ignored field takes its live
/// value (so the agent shares the field at the value the other controller chose and never resets it), or is
/// left out when the live object lacks it. Before the object exists (`live` is `None`) the desired values
/// are applied as they are.
pub fn with_live_values(desired: &mut Value, live: Option<&Value>, ignore: &[FieldPath]) {
    let Some(live) = live else { return };
    for p in ignore {
        if p.get(desired).is_none() {
            continue;
        }
        p.set(desired, p.get(live).cloned());
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w)),
        _ => a == b,
    }
}

/// What a drift check ignores.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ignore<'a> {
    /// Fields owned by another controller by design.
    pub paths: &'a [FieldPath],
    /// Fields some manager other than the agent owns in the live object (`managers` ignore option).
    pub owned_by_others: &'a [FieldPath],
}

impl Ignore<'_> {
    fn skips(&self, p: &FieldPath) -> bool {
        self.paths.iter().any(|i| i.covers(p)) || self.owned_by_others.iter().any(|i| i.covers(p))
    }
}

fn walk(
    path: &FieldPath,
    fields: &Map<String, Value>,
    pred: &Value,
    live: &Value,
    ig: &Ignore,
    out: &mut Vec<DriftItem>,
) {
    for (k, sub) in fields {
        let (p, pv, lv) = if let Some(name) = k.strip_prefix("f:") {
            let p = path.push(Seg::Key(name.to_string()));
            (p, pred.get(name), live.get(name))
        } else if let Some(keys) = k.strip_prefix("k:") {
            let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(keys) else { continue };
            let sel: Vec<(String, String)> =
                keys.iter().filter_map(|(k, v)| Some((k.clone(), scalar_text(v)?))).collect();
            let find = |v: &Value| v.as_array().and_then(|a| a.iter().find(|e| selects(e, &sel)).cloned());
            let p = path.push(Seg::Select(sel.clone()));
            match (find(pred), find(live)) {
                (Some(pe), Some(le)) if !ig.skips(&p) => {
                    if let Some(m) = sub.as_object() {
                        walk(&p, m, &pe, &le, ig, out);
                    }
                }
                (Some(pe), None) if !ig.skips(&p) => {
                    out.push(DriftItem { path: p.to_string(), desired: pe, live: Value::Null })
                }
                _ => {}
            }
            continue;
        } else if let Some(item) = k.strip_prefix("v:") {
            let Ok(item) = serde_json::from_str::<Value>(item) else { continue };
            let has = |v: &Value| v.as_array().is_some_and(|a| a.iter().any(|e| same(e, &item)));
            if has(pred) && !has(live) && !ig.skips(path) {
                out.push(DriftItem { path: path.to_string(), desired: item, live: live.clone() });
            }
            continue;
        } else {
            // "." (the node itself) and "i:" (by position) say nothing more than their parent.
            continue;
        };
        if ig.skips(&p) {
            continue;
        }
        let Some(pv) = pv else { continue };
        let children = sub.as_object().filter(|m| m.keys().any(|k| k != "."));
        match (children, lv) {
            (Some(m), Some(lv)) => walk(&p, m, pv, lv, ig, out),
            (_, None) => out.push(DriftItem { path: p.to_string(), desired: pv.clone(), live: Value::Null }),
            (None, Some(lv)) if !same(pv, lv) => {
                out.push(DriftItem { path: p.to_string(), desired: pv.clone(), live: lv.clone() })
            }
            (None, Some(_)) => {}
        }
    }
}

/// The field set (managedFields `fieldsV1`) recorded for `manager` in `o`.
pub fn fields_of_manager<'a>(o: &'a Value, manager: &str) -> Option<&'a Map<String, Value>> {
    o.pointer("/metadata/managedFields")?
        .as_array()?
        .iter()
        .filter(|e| e.get("manager").and_then(Value::as_str) == Some(manager))
        .filter(|e| e.get("operation").and_then(Value::as_str) == Some("Apply"))
        .filter(|e| e.get("subresource").and_then(Value::as_str).is_none_or(str::is_empty))
        .find_map(|e| e.get("fieldsV1")?.as_object())
}

/// The leaf paths of a field set: what its manager owns.
pub fn owned_paths(fields: &Map<String, Value>) -> Vec<FieldPath> {
    fn go(path: &FieldPath, fields: &Map<String, Value>, out: &mut Vec<FieldPath>) {
        for (k, sub) in fields {
            let p = if let Some(name) = k.strip_prefix("f:") {
                path.push(Seg::Key(name.to_string()))
            } else if let Some(keys) = k.strip_prefix("k:") {
                let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(keys) else { continue };
                path.push(Seg::Select(keys.iter().filter_map(|(k, v)| Some((k.clone(), scalar_text(v)?))).collect()))
            } else {
                continue;
            };
            match sub.as_object().filter(|m| m.keys().any(|k| k != ".")) {
                Some(m) => go(&p, m, out),
                None => out.push(p),
            }
        }
    }
    let mut out = Vec::new();
    go(&FieldPath::default(), fields, &mut out);
    out
}

/// Every path some manager named in `managers` owns in `live`.
pub fn owned_by(live: &Value, managers: &[String]) -> Vec<FieldPath> {
    let Some(entries) = live.pointer("/metadata/managedFields").and_then(Value::as_array) else { return Vec::new() };
    entries
        .iter()
        .filter(|e| e.get("manager").and_then(Value::as_str).is_some_and(|m| managers.iter().any(|x| x == m)))
        .filter_map(|e| e.get("fieldsV1")?.as_object())
        .flat_map(owned_paths)
        .collect()
}

/// Drift of `live` from `predicted` (the dry-run of the agent's apply) on the fields `fields` (the agent's
/// field set in `predicted`), minus ignored fields. `status` is never drift.
pub fn managed_drift(predicted: &Value, live: &Value, fields: &Map<String, Value>, ignore: &Ignore) -> Vec<DriftItem> {
    let mut own = fields.clone();
    own.remove("f:status");
    let mut out = Vec::new();
    walk(&FieldPath::default(), &own, predicted, live, ignore, &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// A Secret's field set with `stringData` read as `data`: the API server moves written `stringData` into
/// `data` (base64), so the dry-run's answer and the live object both hold the value under `data`.
pub fn secret_fields(fields: &Map<String, Value>) -> Map<String, Value> {
    let mut out = fields.clone();
    if let Some(Value::Object(string_data)) = out.remove("f:stringData") {
        let data = out.entry("f:data").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(d) = data {
            for (k, v) in string_data {
                d.entry(k).or_insert(v);
            }
        }
    }
    out
}

/// The text shown for every value of a Secret's drift.
pub const REDACTED: &str = "(redacted)";

/// Drift items with their values hidden: a Secret's values never leave the agent.
pub fn redact(items: &mut [DriftItem]) {
    for i in items {
        if !i.desired.is_null() {
            i.desired = Value::String(REDACTED.into());
        }
        if !i.live.is_null() {
            i.live = Value::String(REDACTED.into());
        }
    }
}

/// The field set an API server records for a manager that applied `applied` (named lists keyed by `name`,
/// other lists atomic): what a real server's managedFields say, for tests and models.
pub fn fieldset_of(applied: &Value) -> Map<String, Value> {
    fn go(v: &Value) -> Map<String, Value> {
        let mut out = Map::new();
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let inner = match x {
                        Value::Object(_) => go(x),
                        Value::Array(a)
                            if !a.is_empty() && a.iter().all(|e| e.get("name").and_then(Value::as_str).is_some()) =>
                        {
                            go(x)
                        }
                        _ => Map::new(),
                    };
                    out.insert(format!("f:{k}"), Value::Object(inner));
                }
            }
            Value::Array(a) => {
                for e in a {
                    let name = e.get("name").and_then(Value::as_str).unwrap_or_default();
                    let mut inner = go(e);
                    inner.insert(".".into(), Value::Object(Map::new()));
                    out.insert(format!("k:{}", serde_json::json!({"name": name})), Value::Object(inner));
                }
            }
            _ => {}
        }
        out
    }
    let mut m = go(applied);
    for k in ["f:apiVersion", "f:kind"] {
        m.remove(k);
    }
    if let Some(Value::Object(meta)) = m.get_mut("f:metadata") {
        meta.remove("f:name");
        meta.remove("f:namespace");
    }
    m
}

#[cfg(test)]
mod tests;
