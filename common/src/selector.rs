//! Kubernetes-style label selectors (`matchLabels`, `matchExpressions`), used to target clusters by their
//! inventory labels.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("matchExpressions[{index}]: operator {operator:?} needs at least one value")]
    MissingValues { index: usize, operator: Operator },
    #[error("matchExpressions[{index}]: operator {operator:?} takes no values")]
    UnexpectedValues { index: usize, operator: Operator },
}

impl std::str::FromStr for LabelSelector {
    type Err = String;

    /// The Kubernetes API's `labelSelector` syntax (kubectl's `-l`): `tier=prod,region in (eu,us),env!=dev,canary,
    /// !legacy`. Keys and values are checked as the API server checks them; the error names the requirement.
    fn from_str(text: &str) -> Result<Self, String> {
        fn valid_key(k: &str) -> bool {
            !k.is_empty() && k.len() <= 317 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        }
        fn valid_value(v: &str) -> bool {
            v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        }
        fn set_op<'a>(p: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
            let i = p.find(op)?;
            Some((p[..i].trim(), p[i + op.len()..].trim()))
        }
        let mut sel = LabelSelector::default();
        if text.trim().is_empty() {
            return Ok(sel);
        }
        // Requirements are separated by commas outside parentheses.
        let (mut depth, mut start, mut parts) = (0i32, 0usize, Vec::new());
        for (i, ch) in text.char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&text[start..]);
        for part in parts {
            let p = part.trim();
            let bad = || format!("invalid label selector requirement {p:?}");
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
                Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
            };
            let req = |key: &str, operator, values: Vec<String>| Requirement { key: key.to_string(), operator, values };
            let r = if let Some(k) = p.strip_prefix('!') {
                req(k.trim(), Operator::DoesNotExist, vec![])
            } else if let Some((k, v)) = p.split_once("!=") {
                req(k.trim(), Operator::NotIn, vec![v.trim().to_string()])
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                req(k.trim(), Operator::In, vec![v.trim().to_string()])
            } else if let Some((k, rest)) = set_op(p, " notin ") {
                req(k, Operator::NotIn, set(rest)?)
            } else if let Some((k, rest)) = set_op(p, " in ") {
                req(k, Operator::In, set(rest)?)
            } else {
                req(p, Operator::Exists, vec![])
            };
            if !valid_key(&r.key) || !r.values.iter().all(|v| valid_value(v)) {
                return Err(bad());
            }
            match (r.operator, r.values.as_slice()) {
                // `k=v`, unless k is given twice (both must hold then).
                (Operator::In, [v]) if (p.contains('=')) && !sel.match_labels.contains_key(&r.key) => {
                    sel.match_labels.insert(r.key.clone(), v.clone());
                }
                _ => sel.match_expressions.push(r),
            }
        }
        sel.validate().map_err(|e| format!("selector {text:?}: {e}"))?;
        Ok(sel)
    }
}

impl LabelSelector {
    pub fn validate(&self) -> Result<(), SelectorError> {
        for (index, r) in self.match_expressions.iter().enumerate() {
            match r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => {
                    return Err(SelectorError::MissingValues { index, operator: r.operator })
                }
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues { index, operator: r.operator })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// An empty selector matches everything, as in Kubernetes.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    Operator::In => got.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => got.is_some(),
                    Operator::DoesNotExist => got.is_none(),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_form_parses() {
        let l = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let s: super::LabelSelector = "tier=prod, region in (eu,us),env!=dev,canary,!legacy".parse().unwrap();
        assert!(s.matches(&l(&[("tier", "prod"), ("region", "eu"), ("canary", "")])));
        assert!(!s.matches(&l(&[("tier", "prod"), ("region", "ap"), ("canary", "")])));
        assert!(!s.matches(&l(&[("tier", "prod"), ("region", "eu"), ("canary", ""), ("legacy", "1")])));
        assert!("".parse::<super::LabelSelector>().unwrap().matches(&l(&[])));
        assert!("a in b".parse::<super::LabelSelector>().unwrap_err().contains("invalid label selector requirement"));
        let twice: super::LabelSelector = "a=1,a=2".parse().unwrap();
        assert!(!twice.matches(&l(&[("a", "1")])) && !twice.matches(&l(&[("a", "2")])), "both must hold");
    }

    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn match_labels_and_expressions() {
        let sel: LabelSelector = serde_yaml::from_str(
            "matchLabels: {tier: prod}\nmatchExpressions:\n- {key: region, operator: In, values: [eu, us]}\n- {key: canary, operator: DoesNotExist}\n",
        )
        .unwrap();
        sel.validate().unwrap();
        assert!(sel.matches(&labels(&[("tier", "prod"), ("region", "eu")])));
        assert!(!sel.matches(&labels(&[("tier", "prod"), ("region", "ap")])));
        assert!(!sel.matches(&labels(&[("tier", "prod"), ("region", "eu"), ("canary", "yes")])));
        assert!(!sel.matches(&labels(&[("region", "eu")])));
    }

    #[test]
    fn invalid_selectors_name_the_expression() {
        let sel: LabelSelector = serde_yaml::from_str("matchExpressions: [{key: a, operator: In}]").unwrap();
        assert_eq!(
            sel.validate().unwrap_err().to_string(),
            "matchExpressions[0]: operator In needs at least one value"
        );
        assert!(serde_yaml::from_str::<LabelSelector>("matchLabel: {a: b}").is_err(), "unknown fields are errors");
        assert!(serde_yaml::from_str::<LabelSelector>("matchExpressions: [{key: a, operator: Maybe}]").is_err());
    }

    proptest! {
        #[test]
        fn in_and_notin_are_complements(v in "[a-c]", vals in proptest::collection::vec("[a-c]", 1..3)) {
            let l = labels(&[("k", &v)]);
            let sel = |op| LabelSelector { match_labels: BTreeMap::new(), match_expressions: vec![Requirement { key: "k".into(), operator: op, values: vals.clone() }] };
            prop_assert_ne!(sel(Operator::In).matches(&l), sel(Operator::NotIn).matches(&l));
        }

        #[test]
        fn the_empty_selector_matches_everything(k in "[a-z]{1,5}", v in "[a-z]{0,5}") {
            prop_assert!(LabelSelector::default().matches(&labels(&[(&k, &v)])));
        }
    }
}
