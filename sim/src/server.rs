//! HTTP front: routes `/clusters/<name>/...` to the Kubernetes API of that cluster, `/admin/...` to the
//! admin API, applies injected faults, and streams watches.

use crate::error::ApiError;
use crate::ops::{self, DeleteOpts, ListOpts, PatchType, Propagation, Sub, WriteOpts};
use crate::resources::ResourceDef;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Cluster, Signal};
use crate::{admin, discovery, table, Inner};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, Instrument};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Largest request body accepted (the real API server's limit is 3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// Returned to hyper to drop a connection without an answer (an offline cluster).
#[derive(Debug, thiserror::Error)]
#[error("cluster {0} is offline")]
pub struct Offline(pub String);

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
}

pub fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(v).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(full("")))
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

/// Entry point for every request. `kill` closes the request's connection at once (an offline cluster
/// must look like a dead network, not like an error answer).
/// `bound` is the cluster a TLS connection's server name chose: its API is served at the root, as a real
/// API server's. Without one (plain HTTP, or TLS to the bare address) clusters are under `/clusters/<name>`
/// and the admin API under `/admin`.
pub async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    kill: tokio_util::sync::CancellationToken,
    bound: Option<Arc<Cluster>>,
) -> Result<Response<Body>, Offline> {
    let path = req.uri().path().to_string();
    let (cluster, prefix, rest) = match bound {
        Some(c) => {
            if path == "/healthz" || path == "/readyz" || path == "/livez" {
                return Ok(Response::new(full("ok")));
            }
            (c, String::new(), path)
        }
        None => {
            if let Some(rest) = path.strip_prefix("/admin") {
                return Ok(admin::handle(&inner, req, rest).await);
            }
            if path == "/healthz" || path == "/readyz" || path == "/livez" {
                return Ok(Response::new(full("ok")));
            }
            let Some(rest) = path.strip_prefix("/clusters/") else {
                return Ok(error_response(&ApiError::no_route()));
            };
            let (name, rest) = rest.split_once('/').unwrap_or((rest, ""));
            let Some(cluster) = inner.cluster(name) else {
                return Ok(json_response(
                    404,
                    &ApiError::bad_request(format!("no simulated cluster named {name:?}")).to_status(),
                ));
            };
            (cluster, format!("/clusters/{name}"), rest.to_string())
        }
    };
    let name = cluster.name.as_str();
    let faults = cluster.faults();
    if faults.offline {
        kill.cancel();
        return Err(Offline(name.to_string()));
    }
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if faults.error_rate > 0.0 && fastrand::f64() < faults.error_rate {
        let mut r =
            error_response(&ApiError::unavailable("the simulated cluster injected a fault: service unavailable"));
        r.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        return Ok(r);
    }
    let method = req.method().clone();
    let span = tracing::debug_span!("api", cluster = %name, %method, path = %rest);
    let resp = serve(&inner, &cluster, &prefix, rest, req).instrument(span).await;
    match resp {
        Ok(r) => Ok(r),
        Err(e) => {
            if e.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(e.delay_ms.into())).await;
            }
            Ok(error_response(&e))
        }
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

enum Route {
    Version,
    Api,
    Apis,
    Group(String),
    GroupVersion(String, String),
    OpenApiV3,
    OpenApiV3Gv(String),
    OpenApiV2,
    Resource(ResPath),
}

struct ResPath {
    group: String,
    version: String,
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    watch: bool,
}

fn route(rest: &str) -> Option<Route> {
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let res = |group: &str, version: &str, r: &[&str]| -> Option<Route> {
        let mut r = r;
        let watch = r.first() == Some(&"watch");
        if watch {
            r = &r[1..];
        }
        let mut ns = None;
        if r.len() >= 3 && r[0] == "namespaces" && r[2] != "status" && r[2] != "finalize" {
            ns = Some(r[1].to_string());
            r = &r[2..];
        }
        if r.is_empty() || r.len() > 3 {
            return None;
        }
        Some(Route::Resource(ResPath {
            group: group.into(),
            version: version.into(),
            plural: r[0].into(),
            ns,
            name: r.get(1).map(|s| s.to_string()),
            sub: r.get(2).map(|s| s.to_string()),
            watch,
        }))
    };
    match segs.as_slice() {
        ["version"] => Some(Route::Version),
        ["api"] => Some(Route::Api),
        ["api", v] => Some(Route::GroupVersion(String::new(), v.to_string())),
        ["api", v, r @ ..] => res("", v, r),
        ["apis"] => Some(Route::Apis),
        ["apis", g] => Some(Route::Group(g.to_string())),
        ["apis", g, v] => Some(Route::GroupVersion(g.to_string(), v.to_string())),
        ["apis", g, v, r @ ..] => res(g, v, r),
        ["openapi", "v3"] => Some(Route::OpenApiV3),
        ["openapi", "v2"] => Some(Route::OpenApiV2),
        ["openapi", "v3", r @ ..] => Some(Route::OpenApiV3Gv(r.join("/"))),
        _ => None,
    }
}

async fn serve(
    inner: &Arc<Inner>,
    c: &Arc<Cluster>,
    prefix: &str,
    rest: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let r = route(&rest).ok_or_else(ApiError::no_route)?;
    let served = || ops::served(&inner.builtins, &c.state());
    let get_only = |m: &Method| {
        if m == Method::GET {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match r {
        Route::Version => {
            get_only(req.method())?;
            Ok(json_response(200, &discovery::version()))
        }
        Route::Api => {
            get_only(req.method())?;
            Ok(json_response(200, &discovery::api_versions(&inner.addr.to_string())))
        }
        Route::Apis => {
            get_only(req.method())?;
            Ok(json_response(200, &discovery::api_group_list(&served())))
        }
        Route::Group(g) => {
            get_only(req.method())?;
            discovery::api_group(&served(), &g).map(|v| json_response(200, &v)).ok_or_else(ApiError::no_route)
        }
        Route::GroupVersion(g, v) => {
            get_only(req.method())?;
            discovery::resource_list(&served(), &g, &v).map(|v| json_response(200, &v)).ok_or_else(ApiError::no_route)
        }
        Route::OpenApiV3 => {
            get_only(req.method())?;
            Ok(json_response(200, &discovery::openapi_v3_root(&served(), prefix)))
        }
        Route::OpenApiV3Gv(gv) => {
            get_only(req.method())?;
            discovery::openapi_v3_gv(&served(), &gv).map(|v| json_response(200, &v)).ok_or_else(ApiError::no_route)
        }
        Route::OpenApiV2 => {
            get_only(req.method())?;
            // OpenAPI v2 carries no schemas here: v3 has them. kubectl reads v2 (as protobuf) only for
            // kinds v3 has no operations for, such as `ConfigMapList` files, and skips validating those
            // (their items are validated by the server when they are applied).
            let proto =
                req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("protobuf"));
            if proto {
                return Ok(Response::builder()
                    .status(200)
                    .header(header::CONTENT_TYPE, "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
                    .body(full(Bytes::new()))
                    .unwrap_or_else(|_| Response::new(full(""))));
            }
            let info =
                json!({"title": "Kubernetes", "version": format!("v{}.{}.0", discovery::MAJOR, discovery::MINOR)});
            Ok(json_response(200, &json!({"swagger": "2.0", "info": info, "paths": {}, "definitions": {}})))
        }
        Route::Resource(p) => resource(inner, c, p, req).await,
    }
}

fn field_manager(q: &HashMap<String, String>, req: &Request<Incoming>) -> String {
    if let Some(m) = q.get("fieldManager") {
        return m.clone();
    }
    req.headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| ua.split('/').next().unwrap_or(ua).to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn dry_run(q: &HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("dryRun").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => {
            Err(ApiError::bad_request(format!("Invalid dry run argument: {other:?}: supported values: \"All\"")))
        }
    }
}

fn wants_table(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').next().is_some_and(|first| first.contains("as=Table")))
}

/// `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`: metadata only.
fn wants_metadata(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').next().is_some_and(|first| first.contains("as=PartialObjectMetadata")))
}

async fn read_body(req: Request<Incoming>) -> Result<(String, Bytes), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError {
                    code: 413,
                    reason: "RequestEntityTooLarge",
                    message: "the request body is too large".into(),
                    details: None,
                    delay_ms: 0,
                }
            } else {
                ApiError::bad_request(format!("reading the request body failed: {e}"))
            }
        })?
        .to_bytes();
    Ok((ct, body))
}

fn decode_object(res: &ResourceDef, ct: &str, body: &[u8]) -> Result<Value, ApiError> {
    let unrecognized = |e: String| {
        ApiError::bad_request(format!("the object provided is unrecognized (must be of type {}): couldn't get version/kind; json parse error: {e}", res.kind))
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the body of the request was empty"));
    }
    let v: Value = match ct {
        "application/yaml" | "application/x-yaml" | "text/yaml" => {
            serde_yaml::from_slice(body).map_err(|e| unrecognized(e.to_string()))?
        }
        "application/json" | "" | "*/*" => serde_json::from_slice(body).map_err(|e| unrecognized(e.to_string()))?,
        crate::protobuf::MEDIA_TYPE if res.builtin => crate::protobuf::decode(res, body)?,
        other => return Err(ApiError::unsupported_media(other)),
    };
    if !v.is_object() {
        return Err(unrecognized("the body must be an object".into()));
    }
    Ok(v)
}

fn list_opts(q: &HashMap<String, String>) -> Result<ListOpts, ApiError> {
    let label = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let field = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let limit = match q.get("limit") {
        Some(l) if !l.is_empty() => {
            Some(l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?)
        }
        _ => None,
    };
    Ok(ListOpts { label, field, limit, continue_: q.get("continue").filter(|c| !c.is_empty()).cloned() })
}

async fn resource(
    inner: &Arc<Inner>,
    c: &Arc<Cluster>,
    p: ResPath,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let res = ops::resolve(&inner.builtins, c, &p.group, &p.version, &p.plural).ok_or_else(ApiError::no_route)?;
    if !res.namespaced && p.ns.is_some() {
        return Err(ApiError::no_route());
    }
    let pod_sub = |method: Method| -> Result<(String, String), ApiError> {
        let (Some(ns), Some(name)) = (p.ns.clone(), p.name.clone()) else {
            return Err(ApiError::no_route());
        };
        if req.method() != method {
            return Err(ApiError::method_not_allowed());
        }
        Ok((ns, name))
    };
    let is_pod = res.builtin && res.kind == "Pod";
    if p.sub.as_deref() == Some("log") && is_pod {
        let (ns, name) = pod_sub(Method::GET)?;
        let (ns, name) = (ns.as_str(), name.as_str());
        let q = query(&req);
        let pod = ops::get(c, &res, Some(ns), name)?;
        let text = crate::pods::log(&pod, q.get("container").map(String::as_str))?;
        return Ok(Response::builder()
            .status(200)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(full(text))
            .unwrap_or_else(|_| Response::new(full(""))));
    }
    if p.sub.as_deref() == Some("eviction") && is_pod {
        let (ns, name) = pod_sub(Method::POST)?;
        let (ns, name) = (ns.as_str(), name.as_str());
        let q = query(&req);
        let (ct, body) = read_body(req).await?;
        let eviction_def = policy_eviction();
        let eviction = decode_object(&eviction_def, &ct, &body)?;
        let dry = dry_run(&q)?
            || eviction
                .pointer("/deleteOptions/dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v == "All"));
        ops::evict(c, &res, ns, name, dry)?;
        return Ok(json_response(
            201,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        ));
    }
    let sub = match p.sub.as_deref() {
        None => Sub::Main,
        Some("status") if res.status => Sub::Status,
        Some("scale") if res.scale.is_some() => Sub::Scale,
        Some(_) => return Err(ApiError::no_route()),
    };
    let q = query(&req);
    let ns = p.ns.as_deref();
    let method = req.method().clone();
    let is_watch = p.watch || matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let table = wants_table(&req);
    let metadata_only = wants_metadata(&req);
    let include = q.get("includeObject").cloned().unwrap_or_else(|| "Metadata".into());
    let opts = WriteOpts {
        dry_run: dry_run(&q)?,
        field_manager: field_manager(&q, &req),
        force: q.get("force").is_some_and(|f| f == "true"),
        validation: crate::schema::FieldValidation::parse(q.get("fieldValidation").map(String::as_str))
            .map_err(ApiError::bad_request)?,
    };
    match (method, p.name) {
        (Method::GET, None) if is_watch => watch(inner, c, &res, ns, &q, table, &include),
        (Method::GET, Some(name)) if is_watch => {
            let mut q = q.clone();
            q.insert("fieldSelector".into(), format!("metadata.name={name}"));
            watch(inner, c, &res, ns, &q, table, &include)
        }
        (Method::GET, None) => {
            if res.namespaced && ns.is_none() && sub != Sub::Main {
                return Err(ApiError::no_route());
            }
            let l = ops::list(c, &res, ns, &list_opts(&q)?)?;
            let mut meta = json!({"resourceVersion": l.rv.to_string()});
            if let Some(cont) = &l.continue_ {
                meta["continue"] = json!(cont);
            }
            if let Some(r) = l.remaining {
                meta["remainingItemCount"] = json!(r);
            }
            if table {
                return Ok(json_response(200, &table::table(&res, &l.items, meta, &include)));
            }
            if metadata_only {
                let items: Vec<Value> = l
                    .items
                    .iter()
                    .map(|o| json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}))
                    .collect();
                return Ok(json_response(
                    200,
                    &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items}),
                ));
            }
            Ok(json_response(
                200,
                &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": meta, "items": l.items}),
            ))
        }
        (Method::GET, Some(name)) => {
            needs_ns(&res, ns)?;
            let obj = match sub {
                Sub::Scale => ops::get_scale(c, &res, ns, &name)?,
                _ => ops::get(c, &res, ns, &name)?,
            };
            if table && sub == Sub::Main {
                let rv = obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""));
                return Ok(json_response(200, &table::table(&res, &[obj], json!({"resourceVersion": rv}), &include)));
            }
            Ok(json_response(200, &obj))
        }
        (Method::POST, None) => {
            needs_ns(&res, ns)?;
            let (ct, body) = read_body(req).await?;
            strict_duplicates(&opts, &ct, &body)?;
            let obj = decode_object(&res, &ct, &body)?;
            let w = ops::create(c, &res, ns, obj, &opts)?;
            Ok(warned(json_response(201, &w.obj), &w.warnings))
        }
        (Method::PUT, Some(name)) => {
            needs_ns(&res, ns)?;
            let (ct, body) = read_body(req).await?;
            strict_duplicates(&opts, &ct, &body)?;
            let obj = decode_object(&res, &ct, &body)?;
            let w = ops::update(c, &res, ns, &name, obj, sub, &opts)?;
            Ok(warned(json_response(200, &w.obj), &w.warnings))
        }
        (Method::PATCH, Some(name)) => {
            needs_ns(&res, ns)?;
            let (ct, body) = read_body(req).await?;
            strict_duplicates(&opts, &ct, &body)?;
            let ptype = match ct.as_str() {
                "application/json-patch+json" => PatchType::Json,
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => PatchType::Apply,
                other => return Err(ApiError::unsupported_media(other)),
            };
            if ptype != PatchType::Apply && opts.force {
                return Err(ApiError::bad_request("force is only supported for apply patch requests"));
            }
            let w = ops::patch(c, &res, ns, &name, ptype, &body, sub, &opts)?;
            Ok(warned(json_response(if w.created { 201 } else { 200 }, &w.obj), &w.warnings))
        }
        (Method::DELETE, Some(name)) => {
            needs_ns(&res, ns)?;
            if sub != Sub::Main {
                return Err(ApiError::method_not_allowed());
            }
            let (_, body) = read_body(req).await?;
            let d = delete_opts(&q, &body)?;
            let obj = ops::delete(c, &res, ns, &name, &d)?;
            Ok(json_response(200, &obj))
        }
        (Method::DELETE, None) => {
            let (_, body) = read_body(req).await?;
            let d = delete_opts(&q, &body)?;
            let l = ops::list(c, &res, ns, &list_opts(&q)?)?;
            let mut deleted = Vec::new();
            for item in l.items {
                let n = item.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
                let ins = item.pointer("/metadata/namespace").and_then(Value::as_str).map(str::to_string);
                match ops::delete(c, &res, ins.as_deref(), &n, &d) {
                    Ok(o) => deleted.push(o),
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(json_response(
                200,
                &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": {"resourceVersion": l.rv.to_string()}, "items": deleted}),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// The Eviction kind a pod's `eviction` subresource takes (not served as a resource of its own).
fn policy_eviction() -> ResourceDef {
    let mut d = crate::resources::catalogue()
        .iter()
        .find(|d| d.kind == "PodDisruptionBudget")
        .map(|d| (**d).clone())
        .unwrap_or_else(|| crate::resources::catalogue()[0].as_ref().clone());
    d.kind = "Eviction".into();
    d.plural = "evictions".into();
    d
}

/// `Warning` headers, as the API server sends them (`299 - "unknown field \"spec.foo\""`).
fn warned(mut r: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - {}", serde_json::Value::String(w.clone()));
        if let Ok(v) = http::HeaderValue::from_str(&text) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    r
}

/// Under `fieldValidation=Strict`, a JSON body naming a field twice is refused, as the API server's strict
/// decoder does (a plain JSON parser would keep the last).
fn strict_duplicates(opts: &WriteOpts, ct: &str, body: &[u8]) -> Result<(), ApiError> {
    let json = matches!(
        ct,
        "application/json"
            | ""
            | "*/*"
            | "application/apply-patch+yaml"
            | "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
    ) && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if opts.validation != crate::schema::FieldValidation::Strict || !json {
        return Ok(());
    }
    let dups = crate::schema::duplicate_fields(body);
    if dups.is_empty() {
        return Ok(());
    }
    let fields: Vec<String> = dups.iter().map(|p| format!("duplicate field \"{p}\"")).collect();
    Err(ApiError::bad_request(format!("strict decoding error: {}", fields.join(", "))))
}

fn needs_ns(res: &ResourceDef, ns: Option<&str>) -> Result<(), ApiError> {
    if res.namespaced && ns.is_none() {
        return Err(ApiError::method_not_allowed());
    }
    Ok(())
}

fn delete_opts(q: &HashMap<String, String>, body: &[u8]) -> Result<DeleteOpts, ApiError> {
    let b: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let prop = q
        .get("propagationPolicy")
        .cloned()
        .or_else(|| b.get("propagationPolicy").and_then(Value::as_str).map(str::to_string))
        .or_else(|| match b.get("orphanDependents").and_then(Value::as_bool) {
            Some(true) => Some("Orphan".into()),
            Some(false) => Some("Background".into()),
            None => None,
        });
    let propagation = match prop.as_deref() {
        None | Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""
            )))
        }
    };
    let body_dry = b.get("dryRun").and_then(Value::as_array).is_some_and(|a| a.iter().any(|v| v == "All"));
    Ok(DeleteOpts {
        dry_run: dry_run(q)? || body_dry,
        propagation,
        precondition_rv: b.pointer("/preconditions/resourceVersion").and_then(Value::as_str).map(str::to_string),
        precondition_uid: b.pointer("/preconditions/uid").and_then(Value::as_str).map(str::to_string),
    })
}

fn event_line(typ: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": typ, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

type Tx = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

async fn send(tx: &Tx, b: Bytes) -> bool {
    tx.send(Ok(Frame::data(b))).await.is_ok()
}

fn watch(
    inner: &Arc<Inner>,
    c: &Arc<Cluster>,
    res: &Arc<ResourceDef>,
    ns: Option<&str>,
    q: &HashMap<String, String>,
    table: bool,
    include: &str,
) -> Result<Response<Body>, ApiError> {
    let opts = list_opts(q)?;
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(rv) => {
            Some(rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?)
        }
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let initial_events = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1800);
    let (tx, rx) = mpsc::channel(256);
    match ops::watch(c, res, ns, if initial_events { None } else { from }, &opts) {
        Ok(start) => {
            let job = WatchJob {
                res: res.clone(),
                ns: ns.map(str::to_string),
                opts,
                table,
                include: include.to_string(),
                bookmarks,
                initial_events,
                timeout: Duration::from_secs(timeout),
                bookmark_every: inner.bookmark_interval,
                shutdown: inner.shutdown.clone(),
            };
            let span = tracing::debug_span!("watch", cluster = %c.name, resource = %res.qualified());
            tokio::spawn(job.run(start, tx).instrument(span));
        }
        Err(e) if e.code == 410 => {
            // The API server answers 200 and reports an expired version as an ERROR event.
            let line = event_line("ERROR", &e.to_status());
            tokio::spawn(async move {
                let _ = send(&tx, line).await;
            });
        }
        Err(e) => return Err(e),
    }
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
        .unwrap_or_else(|_| Response::new(full(""))))
}

struct WatchJob {
    res: Arc<ResourceDef>,
    ns: Option<String>,
    opts: ListOpts,
    table: bool,
    include: String,
    bookmarks: bool,
    initial_events: bool,
    timeout: Duration,
    bookmark_every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
}

impl WatchJob {
    fn render(&self, obj: &Value) -> Value {
        if self.table {
            let meta =
                json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
            table::table(&self.res, std::slice::from_ref(obj), meta, &self.include)
        } else {
            obj.clone()
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        event_line("BOOKMARK", &json!({"kind": self.res.kind, "apiVersion": self.res.api_version(), "metadata": meta}))
    }

    async fn run(self, start: ops::WatchStart, tx: Tx) {
        let mut rx = start.rx;
        let mut last_rv = start.rv;
        for (typ, obj) in &start.initial {
            let obj = ops::present_obj(&self.res, obj);
            if !send(&tx, event_line(typ.as_str(), &self.render(&obj))).await {
                return;
            }
        }
        if self.initial_events && self.bookmarks && !send(&tx, self.bookmark(last_rv, true)).await {
            return;
        }
        for ev in &start.backlog {
            if let Some((typ, obj)) = ops::filter_event(&self.res, self.ns.as_deref(), &self.opts, ev) {
                if !send(&tx, event_line(typ.as_str(), &self.render(&obj))).await {
                    return;
                }
            }
        }
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(self.bookmark_every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = self.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tick.tick(), if self.bookmarks => {
                    if !send(&tx, self.bookmark(last_rv, false)).await { return; }
                }
                sig = rx.recv() => match sig {
                    Ok(Signal::Event(ev)) => {
                        last_rv = ev.rv;
                        if let Some((typ, obj)) = ops::filter_event(&self.res, self.ns.as_deref(), &self.opts, &ev) {
                            if !send(&tx, event_line(typ.as_str(), &self.render(&obj))).await { return; }
                        }
                    }
                    Ok(Signal::Disconnect) => {
                        debug!("cluster went offline; cutting the watch");
                        let _ = tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "cluster offline"))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        debug!(missed = n, "watcher fell behind; expiring it");
                        let e = ApiError::gone(format!("too old resource version: {last_rv}: the watcher fell {n} events behind"));
                        let _ = send(&tx, event_line("ERROR", &e.to_status())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}
