use super::*;
use proptest::prelude::*;
use serde_json::json;

fn p(s: &str) -> FieldPath {
    s.parse().unwrap()
}

#[test]
fn paths_parse_and_print_in_one_syntax() {
    for s in [
        "/spec/replicas",
        "/spec/template/spec/containers[name=web]/image",
        "/spec/ports[port=80,protocol=TCP]",
        "/metadata/annotations/a~1b",
        "/spec/args/0",
    ] {
        assert_eq!(p(s).to_string(), s);
    }
    assert_eq!(
        p("/metadata/annotations/a~1b").0,
        vec![Seg::Key("metadata".into()), Seg::Key("annotations".into()), Seg::Key("a/b".into())]
    );
    for bad in ["spec", "/spec//x", "/a[name=x", "/a[x]", "/a[=x]", "/a[n=x]b"] {
        let e = bad.parse::<FieldPath>().unwrap_err();
        assert!(e.to_string().contains(bad), "{e}");
    }
    assert!(p("/spec").covers(&p("/spec/replicas")) && !p("/spec/replicas").covers(&p("/spec")));
    let o = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "web", "image": "y"}]}});
    assert_eq!(p("/spec/containers[name=web]/image").get(&o), Some(&json!("y")));
    assert_eq!(p("/spec/containers/0/image").get(&o), Some(&json!("x")));
}

fn deploy(replicas: i64) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"app": "web"}},
           "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": "web:1"}]}}}})
}

#[test]
fn ignored_fields_take_their_live_value_and_are_never_removed() {
    let ignore = vec![p("/spec/replicas")];
    let mut d = deploy(1);
    with_live_values(&mut d, Some(&deploy(5)), &ignore);
    assert_eq!(d["spec"]["replicas"], 5, "the other controller's value is kept");
    let mut d = deploy(1);
    with_live_values(&mut d, None, &ignore);
    assert_eq!(d["spec"]["replicas"], 1, "created with the desired value");
    let mut live = deploy(1);
    live["spec"].as_object_mut().unwrap().remove("replicas");
    let mut d = deploy(1);
    with_live_values(&mut d, Some(&live), &ignore);
    assert!(d["spec"].get("replicas").is_none(), "left out where the live object has none");
    let mut d = deploy(1);
    let mut l = deploy(1);
    l["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:9");
    with_live_values(&mut d, Some(&l), &[p("/spec/template/spec/containers[name=web]/image")]);
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], "web:9");
}

#[test]
fn only_managed_fields_that_differ_are_drift() {
    let desired = deploy(2);
    let fields = fieldset_of(&desired);
    // What the server made of it: defaults added, another manager's fields.
    let mut predicted = desired.clone();
    predicted["spec"]["strategy"] = json!({"type": "RollingUpdate"});
    predicted["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("IfNotPresent");
    predicted["metadata"]["labels"]["team"] = json!("x");
    predicted["status"] = json!({"replicas": 2});
    assert_eq!(managed_drift(&predicted, &predicted, &fields, &Ignore::default()), vec![]);

    let mut live = predicted.clone();
    live["spec"]["replicas"] = json!(5);
    live["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:hacked");
    live["metadata"]["labels"].as_object_mut().unwrap().remove("app");
    live["spec"]["strategy"] = json!({"type": "Recreate"});
    let items = managed_drift(&predicted, &live, &fields, &Ignore::default());
    let paths: Vec<&str> = items.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(paths, vec!["/metadata/labels/app", "/spec/replicas", "/spec/template/spec/containers[name=web]/image"]);
    assert_eq!(items[0].live, Value::Null);
    assert_eq!(items[1], DriftItem { path: "/spec/replicas".into(), desired: json!(2), live: json!(5) });

    let ig = [p("/spec/replicas"), p("/spec/template")];
    let items = managed_drift(&predicted, &live, &fields, &Ignore { paths: &ig, owned_by_others: &[] });
    assert_eq!(items.len(), 1);
    live["spec"]["template"]["spec"]["containers"] = json!([]);
    let items = managed_drift(&predicted, &live, &fields, &Ignore::default());
    assert!(items.iter().any(|i| i.path == "/spec/template/spec/containers[name=web]" && i.live.is_null()));
}

#[test]
fn fields_other_managers_own_are_not_drift_with_the_managers_option() {
    let live = json!({"metadata": {"managedFields": [
        {"manager": "hpa", "operation": "Update", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
        {"manager": "flotilla-agent", "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}, "f:paused": {}}}},
    ]}});
    assert_eq!(owned_by(&live, &["hpa".into()]), vec![p("/spec/replicas")]);
    assert_eq!(fields_of_manager(&live, "flotilla-agent").map(|m| m.len()), Some(1));
    assert!(owned_by(&live, &["other".into()]).is_empty());
}

#[test]
fn a_secrets_string_data_is_compared_as_its_data() {
    let fields =
        serde_json::from_value::<Map<String, Value>>(json!({"f:stringData": {"f:password": {}}, "f:type": {}}))
            .unwrap();
    let predicted = json!({"data": {"password": "aHVudGVyMg=="}, "type": "Opaque"});
    let live = json!({"data": {"password": "c3RvbGVu"}, "type": "Opaque"});
    assert!(managed_drift(&predicted, &live, &fields, &Ignore::default()).is_empty(), "stringData is not in either");
    let items = managed_drift(&predicted, &live, &secret_fields(&fields), &Ignore::default());
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].path, "/data/password");
}

#[test]
fn secret_values_are_redacted() {
    let mut items =
        vec![DriftItem { path: "/data/password".into(), desired: json!("c2VjcmV0"), live: json!("b3RoZXI=") }];
    redact(&mut items);
    assert_eq!(items[0].desired, json!(REDACTED));
    assert_eq!(items[0].live, json!(REDACTED));
}

/// A random object: nested maps with scalar leaves, lists of named items, atomic lists.
fn tree(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::from),
        (-1000i64..1000).prop_map(Value::from),
        "[a-z]{1,4}".prop_map(Value::from),
        proptest::collection::vec("[a-z]{1,3}", 0..3).prop_map(|v| json!(v)),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        2 => leaf,
        2 => proptest::collection::btree_map("[a-d]{1,2}", tree(depth - 1), 1..4)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => proptest::collection::btree_map("[a-c]", proptest::collection::btree_map("[e-g]", tree(depth - 1), 1..3), 1..3)
            .prop_map(|items| Value::Array(items.into_iter().map(|(name, m)| {
                let mut o: Map<String, Value> = m.into_iter().collect();
                o.insert("name".into(), Value::from(name));
                Value::Object(o)
            }).collect())),
    ]
    .boxed()
}

/// What a server's defaulting adds: fields the desired object does not set, at random places.
fn default_into(v: &mut Value, seed: &mut impl Iterator<Item = u8>) {
    match v {
        Value::Object(m) => {
            if seed.next().unwrap_or(0).is_multiple_of(2) {
                m.entry("zz-default").or_insert(json!("defaulted"));
            }
            for x in m.values_mut() {
                default_into(x, seed);
            }
        }
        Value::Array(a) if a.iter().all(|e| e.get("name").is_some()) => {
            for e in a.iter_mut() {
                default_into(e, seed);
            }
        }
        _ => {}
    }
}

fn leaves(path: &FieldPath, v: &Value, out: &mut Vec<FieldPath>) {
    match v {
        Value::Object(m) => m.iter().for_each(|(k, x)| leaves(&path.push(Seg::Key(k.clone())), x, out)),
        Value::Array(a) if !a.is_empty() && a.iter().all(|e| e.get("name").and_then(Value::as_str).is_some()) => {
            for e in a {
                let name = e["name"].as_str().unwrap_or_default().to_string();
                if let Value::Object(m) = e {
                    for (k, x) in m.iter().filter(|(k, _)| *k != "name") {
                        leaves(
                            &path.push(Seg::Select(vec![("name".into(), name.clone())])).push(Seg::Key(k.clone())),
                            x,
                            out,
                        );
                    }
                }
            }
        }
        _ => out.push(path.clone()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// For random objects and random server-side defaulting, a freshly applied object has no drift, and a
    /// changed managed field always does, at its path.
    #[test]
    fn fresh_objects_have_no_drift_and_changed_managed_fields_always_do(
        spec in tree(3), seed in proptest::collection::vec(any::<u8>(), 64), pick in any::<prop::sample::Index>(),
        other in "[A-Z]{1,3}",
    ) {
        let desired = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a", "labels": {"l": "v"}}, "spec": spec});
        let fields = fieldset_of(&desired);
        let mut predicted = desired.clone();
        default_into(&mut predicted, &mut seed.into_iter().cycle());
        predicted["status"] = json!({"observed": 1});
        prop_assert_eq!(managed_drift(&predicted, &predicted, &fields, &Ignore::default()), vec![]);

        let mut all = Vec::new();
        leaves(&FieldPath::default(), &desired, &mut all);
        all.retain(|p| !matches!(p.0.first(), Some(Seg::Key(k)) if k == "apiVersion" || k == "kind")
            && !matches!(p.0.get(1), Some(Seg::Key(k)) if k == "name"));
        let target = pick.get(&all).clone();
        let mut live = predicted.clone();
        target.set(&mut live, Some(Value::String(format!("changed-{other}"))));
        let items = managed_drift(&predicted, &live, &fields, &Ignore::default());
        prop_assert!(items.iter().any(|i| i.path == target.to_string()), "{} not in {:?}", target, items);
        let ig = [target.clone()];
        let items = managed_drift(&predicted, &live, &fields, &Ignore { paths: &ig, owned_by_others: &[] });
        prop_assert!(items.is_empty(), "ignored, yet {:?}", items);
    }
}
