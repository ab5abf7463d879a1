//! Discovery documents: `/version`, `/api`, `/apis`, group and group-version resource lists, and the
//! OpenAPI v3 index and documents (real schemas: `kubectl explain` works, and kubectl's default
//! `--validate=strict` leaves field validation to the server, which refuses unknown fields).

use crate::resources::ResourceDef;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const MAJOR: &str = "1";
/// The version reported; the schemas of [`crate::openapi`] are this version's (k8s-openapi `v1_33`).
pub const MINOR: &str = "33";

pub fn version() -> Value {
    json!({
        "major": MAJOR,
        "minor": MINOR,
        "gitVersion": format!("v{MAJOR}.{MINOR}.0-flotilla-sim"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
        "emulationMajor": MAJOR,
        "emulationMinor": MINOR,
    })
}

pub fn api_versions(server_addr: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_addr}]})
}

/// Kubernetes version priority: GA before beta before alpha, higher numbers first.
fn version_rank(v: &str) -> (u8, i64, i64) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let major: i64 = digits.parse().unwrap_or(0);
    let tail = &rest[digits.len()..];
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (kind, n) = if let Some(b) = tail.strip_prefix("beta") {
        (2, b)
    } else if let Some(a) = tail.strip_prefix("alpha") {
        (1, a)
    } else {
        return (0, 0, 0);
    };
    (kind, major, n.parse().unwrap_or(0))
}

/// group → versions (preferred first), in first-seen group order.
fn groups(defs: &[Arc<ResourceDef>]) -> Vec<(String, Vec<String>)> {
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in defs.iter().filter(|d| !d.group.is_empty()) {
        if !by.contains_key(&d.group) {
            order.push(d.group.clone());
        }
        let vs = by.entry(d.group.clone()).or_default();
        if !vs.contains(&d.version) {
            vs.push(d.version.clone());
        }
    }
    order
        .into_iter()
        .map(|g| {
            let mut vs = by.remove(&g).unwrap_or_default();
            vs.sort_by_key(|v| std::cmp::Reverse(version_rank(v)));
            (g, vs)
        })
        .collect()
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> =
        versions.iter().map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v})).collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(json!({}))})
}

pub fn api_group_list(defs: &[Arc<ResourceDef>]) -> Value {
    let gs: Vec<Value> = groups(defs).iter().map(|(g, vs)| group_json(g, vs)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs})
}

pub fn api_group(defs: &[Arc<ResourceDef>], group: &str) -> Option<Value> {
    let (g, vs) = groups(defs).into_iter().find(|(g, _)| g == group)?;
    let mut v = group_json(&g, &vs);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Some(v)
}

pub fn resource_list(defs: &[Arc<ResourceDef>], group: &str, version: &str) -> Option<Value> {
    let rs: Vec<Value> =
        defs.iter().filter(|d| d.group == group && d.version == version).flat_map(|d| d.api_resource_json()).collect();
    if rs.is_empty() {
        return None;
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": rs}))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: one entry per group-version; `prefix` is the cluster's path prefix.
pub fn openapi_v3_root(defs: &[Arc<ResourceDef>], prefix: &str) -> Value {
    // The hash changes with the document (kubectl caches documents by it): the kinds served and the
    // schemas of custom resources.
    let mut content: BTreeMap<String, String> = BTreeMap::new();
    for d in defs {
        let p = gv_path(&d.group, &d.version);
        let c = content.entry(p).or_default();
        c.push_str(&d.kind);
        if let Some(s) = &d.crd_schema {
            c.push_str(&s.to_string());
        }
    }
    let mut paths = serde_json::Map::new();
    for (p, c) in content {
        let hash = format!("{:016X}", fnv(&format!("{p}\n{c}")));
        paths.insert(p.clone(), json!({"serverRelativeURL": format!("{prefix}/openapi/v3/{p}?hash={hash}")}));
    }
    json!({"paths": paths})
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

/// `example.com` → `com.example`, as the API server names custom resource schemas.
fn reverse_domain(group: &str) -> String {
    group.split('.').rev().collect::<Vec<_>>().join(".")
}

/// A group-version's OpenAPI v3 document: the paths and the operations with their GVK and parameters,
/// and the schemas of its kinds (with every schema they reach) as the API server publishes them.
pub fn openapi_v3_gv(defs: &[Arc<ResourceDef>], gvpath: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    let mut roots: Vec<String> = Vec::new();
    for d in defs.iter().filter(|d| gv_path(&d.group, &d.version) == gvpath) {
        let gvk = json!({"group": d.group, "version": d.version, "kind": d.kind});
        let params = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}},
        ]);
        let ns = if d.namespaced { "/namespaces/{namespace}" } else { "" };
        let base = format!("/{gvpath}{ns}/{}", d.plural);
        let schema_name =
            match crate::openapi::catalogue().kinds.get(&(d.group.clone(), d.version.clone(), d.kind.clone())) {
                Some(n) if d.builtin => n.clone(),
                _ => format!("{}.{}.{}", reverse_domain(&d.group), d.version, d.kind),
            };
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema_name}")}}}}});
        paths.insert(
            base.clone(),
            json!({
                "get": {"x-kubernetes-action": "list", "x-kubernetes-group-version-kind": gvk, "responses": ok},
                "post": {"x-kubernetes-action": "post", "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": ok},
            }),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": ok},
                "put": {"x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": ok},
                "patch": {"x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": ok},
                "delete": {"x-kubernetes-action": "delete", "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": ok},
            }),
        );
        match (&d.crd_schema, d.builtin) {
            (_, true) => roots.push(schema_name),
            (Some(s), false) => {
                let mut s = (**s).clone();
                s["x-kubernetes-group-version-kind"] = json!([gvk]);
                schemas.insert(schema_name, s);
            }
            (None, false) => {
                schemas.insert(
                    schema_name,
                    json!({"type": "object", "x-kubernetes-group-version-kind": [gvk], "x-kubernetes-preserve-unknown-fields": true}),
                );
            }
        }
    }
    let cat = crate::openapi::catalogue();
    let lists: Vec<String> = roots.iter().map(|r| format!("{r}List")).filter(|l| cat.schemas.contains_key(l)).collect();
    roots.extend(lists);
    for name in crate::openapi::closure(&roots, &cat.schemas) {
        if let Some(s) = cat.schemas.get(&name) {
            schemas.insert(name, s.clone());
        }
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{MAJOR}.{MINOR}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::builtins;

    #[test]
    fn preferred_versions() {
        assert!(version_rank("v2") > version_rank("v1"));
        assert!(version_rank("v1") > version_rank("v1beta1"));
        assert!(version_rank("v1beta2") > version_rank("v1beta1"));
        assert!(version_rank("v1beta1") > version_rank("v1alpha1"));
        let defs = builtins();
        let g = api_group(&defs, "autoscaling").unwrap();
        assert_eq!(g["preferredVersion"]["version"], "v2");
    }

    #[test]
    fn resource_lists_include_subresources() {
        let defs = builtins();
        let l = resource_list(&defs, "apps", "v1").unwrap();
        let names: Vec<&str> = l["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"deployments/scale") && names.contains(&"deployments/status"));
        assert!(resource_list(&defs, "apps", "v9").is_none());
    }

    #[test]
    fn openapi_index_points_into_the_cluster_prefix() {
        let defs = builtins();
        let root = openapi_v3_root(&defs, "/clusters/a");
        assert!(root["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .starts_with("/clusters/a/openapi/v3/apis/apps/v1?hash="));
        let doc = openapi_v3_gv(&defs, "apis/apps/v1").unwrap();
        let p = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(p["x-kubernetes-group-version-kind"]["kind"], "Deployment");
    }
}
