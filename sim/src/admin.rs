//! The admin API, beside the clusters on the same listener:
//!
//! | request | effect |
//! |---|---|
//! | `GET /admin/clusters` | every cluster with its object count, faults and behaviour |
//! | `POST /admin/clusters` `{"name": "eu-1"}` | adds a cluster |
//! | `GET /admin/clusters/NAME` | one cluster |
//! | `PUT` or `PATCH /admin/clusters/NAME/faults` `{"latency_ms", "error_rate", "offline"}` | sets faults |
//! | `PUT` or `PATCH /admin/clusters/NAME/behaviour` `{"ready_after_ms", "fail_images", ...}` | sets controller behaviour |
//! | `PUT` or `PATCH /admin/clusters/NAME/admission` `{"rules": [...]}` | admission rules (see `admission`) |
//! | `POST /admin/clusters/NAME/compact` | forgets watch history: older watches get 410 Gone |
//! | `GET /admin/kubeconfig/NAME` | the cluster's kubeconfig |
//!
//! NAME `*` addresses every cluster. PUT replaces the whole setting; PATCH merges the given fields.

use crate::admission::Admission;
use crate::server::{json_response, Body};
use crate::store::{Behaviour, Faults, Settings};
use crate::Inner;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::sync::Arc;

fn err(code: u16, msg: impl Into<String>) -> Response<Body> {
    json_response(code, &json!({"error": msg.into()}))
}

pub async fn handle(inner: &Arc<Inner>, req: Request<Incoming>, path: &str) -> Response<Body> {
    let method = req.method().clone();
    let segs: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(str::to_string).collect();
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return err(400, format!("reading the body failed: {e}")),
    };
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method, segs.as_slice()) {
        (Method::GET, ["clusters"]) => {
            let all: Vec<Value> = inner.clusters().iter().map(|c| describe(c)).collect();
            json_response(200, &json!({"clusters": all}))
        }
        (Method::POST, ["clusters"]) => {
            let name = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["name"].as_str().map(str::to_string));
            let Some(name) = name else {
                return err(400, "body must be {\"name\": \"CLUSTER\"}");
            };
            match inner.add_cluster(&name) {
                Ok(c) => json_response(201, &describe(&c)),
                Err(e) => err(409, e.to_string()),
            }
        }
        (Method::GET, ["clusters", name]) => match inner.cluster(name) {
            Some(c) => json_response(200, &describe(&c)),
            None => err(404, format!("no simulated cluster named {name:?}")),
        },
        (Method::GET, ["kubeconfig", name]) => match inner.cluster(name) {
            Some(_) => Response::builder()
                .header("content-type", "application/yaml")
                .body(crate::server::full(inner.kubeconfig(name)))
                .unwrap_or_else(|_| err(500, "response")),
            None => err(404, format!("no simulated cluster named {name:?}")),
        },
        (m @ (Method::PUT | Method::PATCH), ["clusters", name, "admission"]) => {
            let targets = match targets(inner, name) {
                Ok(t) => t,
                Err(r) => return *r,
            };
            let given: Admission = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => return err(400, format!("invalid admission rules: {e}")),
            };
            if let Err(e) = given.validate() {
                return err(400, e);
            }
            for c in &targets {
                let mut a = if m == Method::PATCH { (*c.admission()).clone() } else { Admission::default() };
                a.rules.extend(given.rules.iter().cloned());
                c.set_admission(a);
            }
            json_response(200, &json!({"clusters": targets.iter().map(|c| describe(c)).collect::<Vec<_>>()}))
        }
        (m @ (Method::PUT | Method::PATCH), ["clusters", name, what @ ("faults" | "behaviour")]) => {
            let targets = match targets(inner, name) {
                Ok(t) => t,
                Err(r) => return *r,
            };
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return err(400, format!("invalid JSON: {e}")),
            };
            for c in &targets {
                let result = if *what == "faults" {
                    merged::<Faults>(&c.faults(), &patch, m == Method::PATCH).map(|f| {
                        if !(0.0..=1.0).contains(&f.error_rate) {
                            return Err("error_rate must be between 0.0 and 1.0".to_string());
                        }
                        c.set_faults(f);
                        Ok(())
                    })
                } else {
                    merged::<Behaviour>(&c.settings().behaviour, &patch, m == Method::PATCH).map(|b| {
                        let s = Settings::new(b)
                            .map_err(|e| format!("fail_images is not a valid regular expression: {e}"))?;
                        c.set_settings(Arc::new(s));
                        Ok(())
                    })
                };
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) | Err(e) => return err(400, e),
                }
            }
            json_response(200, &json!({"clusters": targets.iter().map(|c| describe(c)).collect::<Vec<_>>()}))
        }
        (Method::POST, ["clusters", name, "compact"]) => {
            let targets = match targets(inner, name) {
                Ok(t) => t,
                Err(r) => return *r,
            };
            for c in &targets {
                c.state().compact();
            }
            json_response(200, &json!({"compacted": targets.len()}))
        }
        _ => err(404, format!("no admin endpoint {path:?}")),
    }
}

fn targets(inner: &Inner, name: &str) -> Result<Vec<Arc<crate::store::Cluster>>, Box<Response<Body>>> {
    if name == "*" {
        return Ok(inner.clusters());
    }
    inner
        .cluster(name)
        .map(|c| vec![c])
        .ok_or_else(|| Box::new(err(404, format!("no simulated cluster named {name:?}"))))
}

fn merged<T: serde::Serialize + serde::de::DeserializeOwned>(cur: &T, patch: &Value, merge: bool) -> Result<T, String> {
    let v = if merge {
        let mut base = serde_json::to_value(cur).map_err(|e| e.to_string())?;
        json_patch::merge(&mut base, patch);
        base
    } else {
        patch.clone()
    };
    serde_json::from_value(v).map_err(|e| format!("invalid settings: {e}"))
}

fn describe(c: &crate::store::Cluster) -> Value {
    let objects = c.state().object_count();
    let connections = c.connections.load(std::sync::atomic::Ordering::Relaxed);
    json!({"name": c.name, "objects": objects, "connections": connections, "faults": c.faults(), "behaviour": c.settings().behaviour, "admission": *c.admission()})
}
