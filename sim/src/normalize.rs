//! What the real API server does to an object between the request and storage, beyond defaults: Secret
//! `stringData` merged into `data`, resource quantities in canonical form, `null`s and empty lists and maps
//! of `omitempty` fields dropped. Driven by the tables below; to cover another field, add its path.
//!
//! Paths are dotted, relative to the object (or, for [`POD_SPEC_QUANTITIES`], to each pod spec the kind
//! carries); `*` is every element of a list or every value of a map.

use base64::Engine;
use serde_json::{Map, Value};

/// Quantities inside a pod spec (Pods, every workload's template, CronJobs' job template).
pub const POD_SPEC_QUANTITIES: &[&str] = &[
    "containers.*.resources.limits.*",
    "containers.*.resources.requests.*",
    "initContainers.*.resources.limits.*",
    "initContainers.*.resources.requests.*",
    "ephemeralContainers.*.resources.limits.*",
    "ephemeralContainers.*.resources.requests.*",
    "resources.limits.*",
    "resources.requests.*",
    "overhead.*",
    "volumes.*.emptyDir.sizeLimit",
];

/// Quantities by kind, relative to the object.
pub const KIND_QUANTITIES: &[(&str, &[&str])] = &[
    (
        "PersistentVolumeClaim",
        &["spec.resources.requests.*", "spec.resources.limits.*", "status.capacity.*", "status.allocatedResources.*"],
    ),
    ("PersistentVolume", &["spec.capacity.*"]),
    ("ResourceQuota", &["spec.hard.*", "status.hard.*", "status.used.*"]),
    (
        "LimitRange",
        &[
            "spec.limits.*.max.*",
            "spec.limits.*.min.*",
            "spec.limits.*.default.*",
            "spec.limits.*.defaultRequest.*",
            "spec.limits.*.maxLimitRequestRatio.*",
        ],
    ),
    ("Node", &["status.capacity.*", "status.allocatable.*"]),
    ("StatefulSet", &["spec.volumeClaimTemplates.*.spec.resources.requests.*"]),
];

/// Status counters with `omitempty`: a zero is not written (a Deployment with no ready replica has no
/// `readyReplicas`, and clients must read the absence as 0).
pub const STATUS_OMITEMPTY_COUNTS: &[(&str, &[&str])] = &[
    (
        "Deployment",
        &[
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
            "observedGeneration",
        ],
    ),
    ("ReplicaSet", &["fullyLabeledReplicas", "readyReplicas", "availableReplicas", "observedGeneration"]),
    ("StatefulSet", &["readyReplicas", "currentReplicas", "updatedReplicas", "observedGeneration"]),
    ("Job", &["active", "succeeded", "failed"]),
];

/// Where each kind keeps its pod spec.
pub fn pod_spec_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" | "PodTemplate" => {
            Some("spec.template.spec")
        }
        "CronJob" => Some("spec.jobTemplate.spec.template.spec"),
        "Pod" => Some("spec"),
        _ => None,
    }
}

/// Lists that Go serializes even when empty (no `omitempty`): kept as `[]`.
const KEPT_EMPTY_LISTS: &[&str] = &["containers", "rules", "endpoints"];

/// Map-valued fields with `omitempty`: dropped when empty. (An empty object elsewhere is usually a struct,
/// which Go always serializes: `securityContext: {}` stays.)
const DROPPED_EMPTY_MAPS: &[&str] = &[
    "labels",
    "annotations",
    "data",
    "binaryData",
    "stringData",
    "nodeSelector",
    "matchLabels",
    "limits",
    "requests",
    "hard",
    "capacity",
];

/// Every value a dotted path with `*` reaches, for rewriting.
pub fn each_mut(v: &mut Value, path: &str, f: &mut dyn FnMut(&mut Value)) {
    fn go(v: &mut Value, segs: &[&str], f: &mut dyn FnMut(&mut Value)) {
        let Some((first, rest)) = segs.split_first() else {
            f(v);
            return;
        };
        match (*first, v) {
            ("*", Value::Array(a)) => a.iter_mut().for_each(|e| go(e, rest, f)),
            ("*", Value::Object(m)) => m.values_mut().for_each(|e| go(e, rest, f)),
            (k, Value::Object(m)) => {
                if let Some(e) = m.get_mut(k) {
                    go(e, rest, f)
                }
            }
            _ => {}
        }
    }
    let segs: Vec<&str> = path.split('.').collect();
    go(v, &segs, f);
}

/// The quantity paths of a kind, relative to the object.
pub fn quantity_paths(kind: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Some(base) = pod_spec_path(kind) {
        out.extend(POD_SPEC_QUANTITIES.iter().map(|p| format!("{base}.{p}")));
    }
    for (k, paths) in KIND_QUANTITIES {
        if *k == kind {
            out.extend(paths.iter().map(|p| p.to_string()));
        }
    }
    out
}

/// Rewrites `obj` (a built-in kind) as the API server stores it.
pub fn normalize(kind: &str, obj: &mut Value) {
    if kind == "Secret" {
        merge_string_data(obj);
    }
    for path in quantity_paths(kind) {
        each_mut(obj, &path, &mut |q| {
            let canonical = match &*q {
                Value::String(s) => Quantity::parse(s).map(|p| p.canonical()),
                Value::Number(n) => Quantity::parse(&n.to_string()).map(|p| p.canonical()),
                _ => None,
            };
            if let Some(c) = canonical {
                *q = Value::String(c);
            }
        });
    }
    for (k, fields) in STATUS_OMITEMPTY_COUNTS {
        if *k == kind {
            if let Some(st) = obj.get_mut("status").and_then(Value::as_object_mut) {
                st.retain(|f, v| !(fields.contains(&f.as_str()) && v.as_i64() == Some(0)));
            }
        }
    }
    drop_empty(obj);
}

/// Every value a dotted path with `*` reaches.
pub fn each(v: &Value, path: &str, f: &mut dyn FnMut(&Value)) {
    fn go(v: &Value, segs: &[&str], f: &mut dyn FnMut(&Value)) {
        let Some((first, rest)) = segs.split_first() else {
            f(v);
            return;
        };
        match (*first, v) {
            ("*", Value::Array(a)) => a.iter().for_each(|e| go(e, rest, f)),
            ("*", Value::Object(m)) => m.values().for_each(|e| go(e, rest, f)),
            (k, Value::Object(m)) => {
                if let Some(e) = m.get(k) {
                    go(e, rest, f)
                }
            }
            _ => {}
        }
    }
    let segs: Vec<&str> = path.split('.').collect();
    go(v, &segs, f);
}

/// The first quantity that does not parse, as the API server's decoding error.
pub fn bad_quantity(kind: &str, obj: &Value) -> Option<String> {
    let mut bad = None;
    for path in quantity_paths(kind) {
        each(obj, &path, &mut |q| {
            let ok = match q {
                Value::String(s) => Quantity::parse(s).is_some(),
                Value::Number(n) => Quantity::parse(&n.to_string()).is_some(),
                _ => false,
            };
            if !ok && bad.is_none() {
                bad = Some(q.to_string());
            }
        });
    }
    bad.map(|q| {
        format!("quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$' (got {q})")
    })
}

/// `stringData` is write-only: each key is base64-encoded into `data` (winning over the same key there).
fn merge_string_data(obj: &mut Value) {
    let Some(m) = obj.as_object_mut() else { return };
    let Some(Value::Object(sd)) = m.shift_remove("stringData") else { return };
    let data = m.entry("data").or_insert_with(|| Value::Object(Map::new()));
    if !data.is_object() {
        *data = Value::Object(Map::new());
    }
    let Some(data) = data.as_object_mut() else { return };
    for (k, v) in sd {
        let s = match v {
            Value::String(s) => s,
            other => other.to_string(),
        };
        data.insert(k, Value::String(base64::engine::general_purpose::STANDARD.encode(s)));
    }
}

fn drop_empty(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, e| {
                drop_empty(e);
                match e {
                    // metav1.Time serializes its zero value as null (pod templates show `creationTimestamp: null`).
                    Value::Null => k == "creationTimestamp",
                    Value::Array(a) => !a.is_empty() || KEPT_EMPTY_LISTS.contains(&k.as_str()),
                    Value::Object(o) => !o.is_empty() || !DROPPED_EMPTY_MAPS.contains(&k.as_str()),
                    _ => true,
                }
            });
        }
        Value::Array(a) => a.iter_mut().for_each(drop_empty),
        _ => {}
    }
}

/// How a quantity was written, which its canonical form keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    DecimalSi,
    BinarySi,
    DecimalExponent,
}

/// A resource quantity (`resource.Quantity`): an exact value in units of 10^-9, and its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    nanos: i128,
    format: Format,
}

const NANO: i128 = 1_000_000_000;

impl Quantity {
    /// Parses the Kubernetes quantity syntax; `None` where the API server answers "quantities must match
    /// the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'".
    pub fn parse(s: &str) -> Option<Quantity> {
        let s = s.trim();
        let (neg, body) = match s.as_bytes().first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let num_end = body.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(body.len());
        let (num, suffix) = body.split_at(num_end);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return None;
        }
        let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
        let digits = format!("{int_part}{frac_part}");
        if digits.len() > 30 {
            return None;
        }
        let mantissa: i128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
        let frac_digits = frac_part.len() as i32;
        // value = mantissa * 10^(exp10 - frac_digits) * 1024^exp1024
        let (format, exp10, exp1024) = match suffix {
            "" => (Format::DecimalSi, 0, 0),
            "n" => (Format::DecimalSi, -9, 0),
            "u" => (Format::DecimalSi, -6, 0),
            "m" => (Format::DecimalSi, -3, 0),
            "k" => (Format::DecimalSi, 3, 0),
            "M" => (Format::DecimalSi, 6, 0),
            "G" => (Format::DecimalSi, 9, 0),
            "T" => (Format::DecimalSi, 12, 0),
            "P" => (Format::DecimalSi, 15, 0),
            "E" => (Format::DecimalSi, 18, 0),
            "Ki" => (Format::BinarySi, 0, 1),
            "Mi" => (Format::BinarySi, 0, 2),
            "Gi" => (Format::BinarySi, 0, 3),
            "Ti" => (Format::BinarySi, 0, 4),
            "Pi" => (Format::BinarySi, 0, 5),
            "Ei" => (Format::BinarySi, 0, 6),
            e if e.starts_with(['e', 'E']) => {
                let n: i32 = e[1..].parse().ok()?;
                if !(-30..=30).contains(&n) {
                    return None;
                }
                (Format::DecimalExponent, n, 0)
            }
            _ => return None,
        };
        // Scale to nanos, rounding up below 10^-9 as the API server does.
        let mut value = mantissa.checked_mul(1024i128.checked_pow(exp1024)?)?;
        let scale = 9 + exp10 - frac_digits;
        if scale >= 0 {
            value = value.checked_mul(10i128.checked_pow(scale as u32)?)?;
        } else {
            let d = 10i128.checked_pow((-scale) as u32)?;
            value = (value + d - 1) / d;
        }
        Some(Quantity { nanos: if neg { -value } else { value }, format })
    }

    /// The canonical string: the largest suffix with an integer mantissa, in the quantity's format;
    /// binary quantities below 1024 or with a fraction are written in decimal.
    pub fn canonical(&self) -> String {
        let v = self.nanos;
        if v == 0 {
            return "0".into();
        }
        let sign = if v < 0 { "-" } else { "" };
        let a = v.abs();
        let whole_bytes = a % NANO == 0;
        if self.format == Format::BinarySi && whole_bytes && a / NANO >= 1024 {
            let mut n = a / NANO;
            let mut k = 0;
            while k < 6 && n % 1024 == 0 {
                n /= 1024;
                k += 1;
            }
            let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][k];
            return format!("{sign}{n}{suffix}");
        }
        let mut exp = 18i32;
        while exp > -9 && a % 10i128.pow((9 + exp) as u32) != 0 {
            exp -= 3;
        }
        let m = a / 10i128.pow((9 + exp) as u32);
        if self.format == Format::DecimalExponent {
            return if exp == 0 { format!("{sign}{m}") } else { format!("{sign}{m}e{exp}") };
        }
        let suffix = match exp {
            18 => "E",
            15 => "P",
            12 => "T",
            9 => "G",
            6 => "M",
            3 => "k",
            0 => "",
            -3 => "m",
            -6 => "u",
            _ => "n",
        };
        format!("{sign}{m}{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canon(s: &str) -> String {
        Quantity::parse(s).unwrap_or_else(|| panic!("{s} parses")).canonical()
    }

    #[test]
    fn quantities_are_canonical_as_the_api_server_writes_them() {
        for (input, want) in [
            ("1000m", "1"),
            ("1", "1"),
            ("0.5", "500m"),
            ("1.5", "1500m"),
            ("100m", "100m"),
            ("2000m", "2"),
            ("1000", "1k"),
            ("1500M", "1500M"),
            ("1000M", "1G"),
            ("128Mi", "128Mi"),
            ("1024Mi", "1Gi"),
            ("0.5Gi", "512Mi"),
            ("1.5Ki", "1536"),
            ("0.5Ki", "512"),
            ("1e3", "1e3"),
            ("0", "0"),
            ("0m", "0"),
            ("-1500m", "-1500m"),
            ("+2", "2"),
            ("0.0000000001", "1n"),
        ] {
            assert_eq!(canon(input), want, "{input}");
        }
        for bad in ["", "abc", "1.2.3", "1Xi", "m", "1e", "--1"] {
            assert!(Quantity::parse(bad).is_none(), "{bad:?} is not a quantity");
        }
    }

    #[test]
    fn secret_string_data_goes_into_data() {
        let mut s = json!({"kind": "Secret", "data": {"a": "b2xk", "b": "eA=="}, "stringData": {"a": "new", "c": "z"}});
        normalize("Secret", &mut s);
        assert_eq!(s, json!({"kind": "Secret", "data": {"a": "bmV3", "b": "eA==", "c": "eg=="}}));
    }

    #[test]
    fn pod_template_quantities_and_empty_fields() {
        let mut d = json!({"spec": {"template": {"metadata": {"labels": {}, "creationTimestamp": null},
            "spec": {"containers": [{"name": "a", "args": [], "env": null, "securityContext": {},
                "resources": {"limits": {"cpu": "1000m", "memory": "1024Mi"}, "requests": {}}}]}}}});
        normalize("Deployment", &mut d);
        assert_eq!(
            d,
            json!({"spec": {"template": {"metadata": {"creationTimestamp": null},
                "spec": {"containers": [{"name": "a", "securityContext": {},
                    "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}}}})
        );
    }
}
