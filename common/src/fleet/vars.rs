//! Per-cluster variables in rendered manifests and Helm values, free of I/O.
//!
//! - `${cluster.name}`: the cluster's name;
//! - `${cluster.labels.KEY}`: one of its inventory labels (KEY verbatim, dots and slashes included);
//! - `${values.KEY}`: a value, KEY a dotted path into nested maps (`${values.db.host}`);
//! - `$${...}` is a literal `${...}` (for shell scripts in ConfigMaps and the like).
//!
//! A string that is exactly one variable takes the value's type (`replicas: ${values.replicas}` gives a
//! number); a variable inside a longer string is interpolated as text. An unknown variable is an error, never
//! an empty string.

use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Var {
    ClusterName,
    Label(String),
    Value(String),
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::ClusterName => write!(f, "${{cluster.name}}"),
            Var::Label(k) => write!(f, "${{cluster.labels.{k}}}"),
            Var::Value(k) => write!(f, "${{values.{k}}}"),
        }
    }
}

const KNOWN: &str = "use ${cluster.name}, ${cluster.labels.KEY} or ${values.KEY}, or $${...} for a literal";

fn parse_var(expr: &str) -> Result<Var, String> {
    let var = match expr {
        "cluster.name" => Some(Var::ClusterName),
        e => match (e.strip_prefix("cluster.labels."), e.strip_prefix("values.")) {
            (Some(k), _) if !k.is_empty() => Some(Var::Label(k.to_string())),
            (_, Some(k)) if !k.is_empty() && k.split('.').all(|p| !p.is_empty()) => Some(Var::Value(k.to_string())),
            _ => None,
        },
    };
    var.ok_or_else(|| format!("unknown variable ${{{expr}}}: {KNOWN}"))
}

#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Var(Var),
}

/// Splits a string into text and variables; `$${` yields a literal `${`.
fn pieces(s: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if i > 0 && rest.as_bytes()[i - 1] == b'$' {
            // `$${` → literal `${`: keep the text up to the first `$`, then `${` verbatim.
            out.push(Piece::Text(&rest[..i - 1]));
            let end = rest[i..].find('}').map_or(rest.len(), |e| i + e + 1);
            out.push(Piece::Text(&rest[i..end]));
            rest = &rest[end..];
            continue;
        }
        out.push(Piece::Text(&rest[..i]));
        let Some(close) = rest[i + 2..].find('}') else {
            return Err(format!("unterminated variable in {s:?}: {KNOWN}"));
        };
        out.push(Piece::Var(parse_var(&rest[i + 2..i + 2 + close])?));
        rest = &rest[i + 2 + close + 1..];
    }
    out.push(Piece::Text(rest));
    out.retain(|p| !matches!(p, Piece::Text("")));
    Ok(out)
}

fn walk_strings(v: &Value, f: &mut dyn FnMut(&str) -> Result<(), String>) -> Result<(), String> {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().try_for_each(|i| walk_strings(i, f)),
        Value::Object(m) => m.iter().try_for_each(|(k, i)| {
            f(k)?;
            walk_strings(i, f)
        }),
        _ => Ok(()),
    }
}

/// Every variable `v` uses (in string values and map keys).
pub fn collect(v: &Value, out: &mut BTreeSet<Var>) -> Result<(), String> {
    walk_strings(v, &mut |s| {
        if s.contains("${") {
            for p in pieces(s)? {
                if let Piece::Var(var) = p {
                    out.insert(var);
                }
            }
        }
        Ok(())
    })
}

/// What a cluster offers to resolve variables with.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub cluster: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// Value layers, lowest precedence first; `${values.KEY}` sees them deep-merged (see [`merge`]).
    pub values: &'a [&'a Map<String, Value>],
}

impl Context<'_> {
    pub fn resolve(&self, var: &Var) -> Option<Value> {
        match var {
            Var::ClusterName => Some(Value::String(self.cluster.to_string())),
            Var::Label(k) => self.labels.get(k).map(|v| Value::String(v.clone())),
            Var::Value(path) => {
                let mut parts = path.split('.');
                let first = parts.next()?;
                // Merging is per top-level key, so only this key's layers need merging.
                let mut merged: Option<Value> = None;
                for layer in self.values {
                    if let Some(v) = layer.get(first) {
                        match &mut merged {
                            None => merged = Some(v.clone()),
                            Some(m) => merge(m, v),
                        }
                    }
                }
                let merged = merged?;
                parts.try_fold(&merged, |cur, p| cur.get(p)).filter(|v| !v.is_null()).cloned()
            }
        }
    }
}

/// Resolved variables: what a render actually reads, and so part of its content address.
pub type Resolved = BTreeMap<Var, Value>;

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn substitute_str(s: &str, vars: &Resolved) -> Result<Value, String> {
    if !s.contains("${") {
        return Ok(Value::String(s.to_string()));
    }
    let parts = pieces(s)?;
    let lookup = |v: &Var| vars.get(v).ok_or_else(|| format!("{v} is not resolved"));
    if let [Piece::Var(v)] = parts.as_slice() {
        return lookup(v).cloned();
    }
    let mut out = String::new();
    for p in parts {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Var(v) => out.push_str(&as_text(lookup(&v)?)),
        }
    }
    Ok(Value::String(out))
}

/// `v` with every variable replaced by its resolved value and every `$${` by `${`.
pub fn substitute(v: &Value, vars: &Resolved) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => substitute_str(s, vars)?,
        Value::Array(a) => Value::Array(a.iter().map(|i| substitute(i, vars)).collect::<Result<_, _>>()?),
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, i) in m {
                let key = if k.contains("${") { as_text(&substitute_str(k, vars)?) } else { k.clone() };
                out.insert(key, substitute(i, vars)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// Deep merge: maps merge key by key, anything else in `over` replaces what `base` has.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx_values() -> (BTreeMap<String, String>, Map<String, Value>) {
        let labels = [("region".to_string(), "eu".to_string()), ("topology.kubernetes.io/zone".into(), "a".into())]
            .into_iter()
            .collect();
        let values = json!({"replicas": 3, "db": {"host": "db.eu"}, "debug": false}).as_object().unwrap().clone();
        (labels, values)
    }

    fn resolve_all(v: &Value) -> Result<Value, String> {
        let (labels, values) = ctx_values();
        let ctx = Context { cluster: "eu-1", labels: &labels, values: &[&values] };
        let mut used = BTreeSet::new();
        collect(v, &mut used)?;
        let mut resolved = Resolved::new();
        for var in used {
            let value = ctx.resolve(&var).ok_or_else(|| format!("{var} is not set"))?;
            resolved.insert(var, value);
        }
        substitute(v, &resolved)
    }

    #[test]
    fn substitutes_typed_and_interpolated() {
        let v = json!({
            "name": "web-${cluster.name}",
            "replicas": "${values.replicas}",
            "debug": "${values.debug}",
            "zone": "${cluster.labels.topology.kubernetes.io/zone}",
            "host": "${values.db.host}:5432",
            "${cluster.labels.region}-key": "x",
            "script": "echo $${HOME} and $$ and $5",
        });
        assert_eq!(
            resolve_all(&v).unwrap(),
            json!({
                "name": "web-eu-1", "replicas": 3, "debug": false, "zone": "a", "host": "db.eu:5432",
                "eu-key": "x", "script": "echo ${HOME} and $$ and $5",
            })
        );
    }

    #[test]
    fn unknown_variables_are_errors() {
        assert_eq!(
            resolve_all(&json!({"a": "${cluster.region}"})).unwrap_err(),
            "unknown variable ${cluster.region}: use ${cluster.name}, ${cluster.labels.KEY} or ${values.KEY}, or $${...} for a literal"
        );
        assert_eq!(resolve_all(&json!(["${values.nope}"])).unwrap_err(), "${values.nope} is not set");
        assert_eq!(resolve_all(&json!(["${values.db.port}"])).unwrap_err(), "${values.db.port} is not set");
        assert!(resolve_all(&json!("${values.a")).unwrap_err().starts_with("unterminated variable"));
        assert!(resolve_all(&json!("${values.}")).unwrap_err().starts_with("unknown variable ${values.}"));
        assert!(resolve_all(&json!("${}")).is_err());
    }

    #[test]
    fn layered_values_resolve_as_if_merged() {
        let labels = BTreeMap::new();
        let low = json!({"db": {"host": "low", "port": 5432}, "gone": {"a": 1}, "n": 1}).as_object().unwrap().clone();
        let high = json!({"db": {"host": "high"}, "gone": null, "n": 2}).as_object().unwrap().clone();
        let layers = [&low, &high];
        let ctx = Context { cluster: "c", labels: &labels, values: &layers };
        let mut merged = Value::Object(low.clone());
        merge(&mut merged, &Value::Object(high.clone()));
        for path in ["db", "db.host", "db.port", "gone", "gone.a", "n", "missing", "db.missing"] {
            let whole = merged.as_object().unwrap().clone();
            let one = [&whole];
            let expected = Context { cluster: "c", labels: &labels, values: &one }.resolve(&Var::Value(path.into()));
            assert_eq!(ctx.resolve(&Var::Value(path.into())), expected, "{path}");
        }
        assert_eq!(ctx.resolve(&Var::Value("db".into())), Some(json!({"host": "high", "port": 5432})));
    }

    #[test]
    fn merge_is_deep() {
        let mut base = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge(&mut base, &json!({"a": {"c": 3, "d": 4}, "l": [3]}));
        assert_eq!(base, json!({"a": {"b": 1, "c": 3, "d": 4}, "l": [3]}));
    }

    use proptest::prelude::*;

    proptest! {
        /// Text without `${` comes back unchanged, and substitution never panics on arbitrary text.
        #[test]
        fn plain_text_is_untouched(s in "[^$]{0,40}", t in "\\PC{0,40}") {
            prop_assert_eq!(substitute(&json!(s.clone()), &Resolved::new()).unwrap(), json!(s));
            let _ = substitute(&json!(t), &Resolved::new());
        }

        /// An escaped variable is always a literal, whatever it names.
        #[test]
        fn escapes_are_literal(name in "[a-z.]{0,12}") {
            let s = format!("x$${{{name}}}y");
            prop_assert_eq!(substitute(&json!(s), &Resolved::new()).unwrap(), json!(format!("x${{{name}}}y")));
        }
    }
}
