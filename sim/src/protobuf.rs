//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`) for the kinds kubectl's typed
//! generators create (`kubectl create configmap|secret|namespace|serviceaccount|deployment|job|cronjob|
//! role|rolebinding|clusterrole|clusterrolebinding|service|quota`).
//!
//! The wire format: the magic `k8s\0`, then a `runtime.Unknown` whose `raw` field holds the object's message.
//! Messages are decoded with the `k8s-pb` crate's types and written as the JSON the API server stores: Go
//! writes every non-pointer field, so empty strings, zeros and `false` are dropped unless the field is a
//! pointer whose zero means something (`replicas: 0`, `backoffLimit: 0`). Nothing is dropped silently: a
//! message carrying a field this module does not map is refused with 415 and the field named, so the
//! client can send JSON instead.

use crate::error::ApiError;
use crate::resources::ResourceDef;
use base64::Engine;
use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::batch::v1 as batch;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use prost::Message;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

type R<T> = Result<T, String>;

fn bad(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("the body of the request could not be decoded as protobuf: {msg}"))
}

/// Decodes a protobuf body for `res` into its JSON form.
pub fn decode(res: &ResourceDef, body: &[u8]) -> Result<Value, ApiError> {
    let rest = body.strip_prefix(MAGIC).ok_or_else(|| bad("it does not start with the k8s\\0 envelope"))?;
    let unknown = k8s_pb::apimachinery::pkg::runtime::Unknown::decode(rest).map_err(bad)?;
    let tm = unknown.type_meta.ok_or_else(|| bad("the envelope has no typeMeta"))?;
    let kind = tm.kind.unwrap_or_default();
    if kind != res.kind {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): {kind:?} is not {}",
            res.kind, res.kind
        )));
    }
    if unknown.content_encoding.as_deref().is_some_and(|e| !e.is_empty()) {
        return Err(bad("content encodings are not supported"));
    }
    let raw = unknown.raw.ok_or_else(|| bad("the envelope has no raw object"))?;
    let unsupported = |m: String| {
        ApiError::unsupported_protobuf(format!(
            "{MEDIA_TYPE} bodies are decoded only for the kinds kubectl's generators create, with their fields: {m}; send JSON instead"
        ))
    };
    let decoded = match (res.group.as_str(), res.kind.as_str()) {
        ("", "ConfigMap") => config_map(core::ConfigMap::decode(raw.as_slice()).map_err(bad)?),
        ("", "Secret") => secret(core::Secret::decode(raw.as_slice()).map_err(bad)?),
        ("", "Namespace") => namespace(core::Namespace::decode(raw.as_slice()).map_err(bad)?),
        ("", "ServiceAccount") => service_account(core::ServiceAccount::decode(raw.as_slice()).map_err(bad)?),
        ("", "Service") => service(core::Service::decode(raw.as_slice()).map_err(bad)?),
        ("", "ResourceQuota") => quota(core::ResourceQuota::decode(raw.as_slice()).map_err(bad)?),
        ("apps", "Deployment") => deployment(apps::Deployment::decode(raw.as_slice()).map_err(bad)?),
        ("batch", "Job") => job(batch::Job::decode(raw.as_slice()).map_err(bad)?),
        ("batch", "CronJob") => cron_job(batch::CronJob::decode(raw.as_slice()).map_err(bad)?),
        ("rbac.authorization.k8s.io", "Role") => {
            let mut r = rbac::Role::decode(raw.as_slice()).map_err(bad)?;
            rules(&mut r.metadata, &mut r.rules).and_then(|o| done(r, "Role").map(|_| o))
        }
        ("rbac.authorization.k8s.io", "ClusterRole") => {
            let mut r = rbac::ClusterRole::decode(raw.as_slice()).map_err(bad)?;
            rules(&mut r.metadata, &mut r.rules).and_then(|o| done(r, "ClusterRole").map(|_| o))
        }
        ("rbac.authorization.k8s.io", "RoleBinding") => {
            let mut b = rbac::RoleBinding::decode(raw.as_slice()).map_err(bad)?;
            binding(&mut b.metadata, &mut b.subjects, &mut b.role_ref).and_then(|o| done(b, "RoleBinding").map(|_| o))
        }
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => {
            let mut b = rbac::ClusterRoleBinding::decode(raw.as_slice()).map_err(bad)?;
            binding(&mut b.metadata, &mut b.subjects, &mut b.role_ref)
                .and_then(|o| done(b, "ClusterRoleBinding").map(|_| o))
        }
        _ => return Err(unsupported(format!("no protobuf decoding for {}", res.api_version()))),
    };
    let mut obj = Value::Object(decoded.map_err(unsupported)?);
    obj["apiVersion"] = json!(tm.api_version.filter(|v| !v.is_empty()).unwrap_or_else(|| res.api_version()));
    obj["kind"] = json!(res.kind);
    Ok(obj)
}

/// What is left of a message after its mapped fields were taken out must be empty, or hold only the zero
/// values Go writes for fields nobody set.
fn done<T: Message + Default + PartialEq + std::fmt::Debug>(rest: T, what: &str) -> R<()> {
    if rest == T::default() || all_zero(&rest.encode_to_vec(), 0) {
        Ok(())
    } else {
        Err(format!("{what} has fields the simulator does not decode: {rest:?}"))
    }
}

/// True when every field in an encoded message is a zero: varint 0, fixed 0, an empty string, or a nested
/// message of zeros.
fn all_zero(mut b: &[u8], depth: usize) -> bool {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    if depth > 32 {
        return false;
    }
    while !b.is_empty() {
        let Some(key) = varint(&mut b) else { return false };
        let ok = match key & 7 {
            0 => varint(&mut b) == Some(0),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                if b.len() < n {
                    return false;
                }
                let (v, rest) = b.split_at(n);
                b = rest;
                v.iter().all(|&x| x == 0)
            }
            2 => {
                let Some(len) = varint(&mut b).and_then(|l| usize::try_from(l).ok()) else { return false };
                if b.len() < len {
                    return false;
                }
                let (v, rest) = b.split_at(len);
                b = rest;
                v.is_empty() || all_zero(v, depth + 1)
            }
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// A JSON object built from taken message fields.
struct J(Map<String, Value>);

impl J {
    fn new() -> J {
        J(Map::new())
    }
    fn put(mut self, k: &str, v: Option<Value>) -> J {
        if let Some(v) = v {
            self.0.insert(k.to_string(), v);
        }
        self
    }
    /// A string; empty means unset (Go writes non-pointer strings always).
    fn s(self, k: &str, v: &mut Option<String>) -> J {
        let v = v.take().filter(|s| !s.is_empty()).map(Value::String);
        self.put(k, v)
    }
    /// An integer; `keep_zero` for pointer fields whose zero means something.
    fn i<N: Into<i64>>(self, k: &str, v: &mut Option<N>, keep_zero: bool) -> J {
        let v = v.take().map(Into::into).filter(|n| keep_zero || *n != 0).map(|n| json!(n));
        self.put(k, v)
    }
    fn b(self, k: &str, v: &mut Option<bool>, keep_false: bool) -> J {
        let v = v.take().filter(|b| keep_false || *b).map(Value::Bool);
        self.put(k, v)
    }
    fn strs(self, k: &str, v: &mut Vec<String>) -> J {
        let v = std::mem::take(v);
        self.put(k, (!v.is_empty()).then(|| json!(v)))
    }
    fn map(self, k: &str, v: &mut BTreeMap<String, String>) -> J {
        let v = std::mem::take(v);
        self.put(k, (!v.is_empty()).then(|| json!(v)))
    }
    fn quantities(self, k: &str, v: &mut BTreeMap<String, k8s_pb::apimachinery::pkg::api::resource::Quantity>) -> J {
        let v = std::mem::take(v);
        let m: Map<String, Value> = v.into_iter().map(|(k, q)| (k, json!(q.string.unwrap_or_default()))).collect();
        self.put(k, (!m.is_empty()).then_some(Value::Object(m)))
    }
    fn msg<T>(self, k: &str, v: &mut Option<T>, f: fn(T) -> R<Map<String, Value>>) -> R<J> {
        Ok(match v.take() {
            Some(m) => {
                let o = f(m)?;
                self.put(k, Some(Value::Object(o)))
            }
            None => self,
        })
    }
    fn arr<T>(self, k: &str, v: &mut Vec<T>, f: fn(T) -> R<Map<String, Value>>) -> R<J> {
        let items = std::mem::take(v);
        if items.is_empty() {
            return Ok(self);
        }
        let out: R<Vec<Value>> = items.into_iter().map(|m| f(m).map(Value::Object)).collect();
        Ok(self.put(k, Some(Value::Array(out?))))
    }
    fn int_or_string(self, k: &str, v: &mut Option<k8s_pb::apimachinery::pkg::util::intstr::IntOrString>) -> J {
        let v = v.take().map(|x| match x.r#type {
            Some(1) => json!(x.str_val.unwrap_or_default()),
            _ => json!(x.int_val.unwrap_or_default()),
        });
        self.put(k, v)
    }
    fn meta(self, v: &mut Option<meta::ObjectMeta>) -> R<J> {
        self.msg("metadata", v, object_meta)
    }
    /// A status the client sent: the API server resets it on create, so it is dropped.
    fn ignore<T>(self, v: &mut Option<T>) -> J {
        v.take();
        self
    }
}

fn time(t: meta::Time) -> Value {
    match t.seconds {
        // Go writes the zero time as an empty message.
        None => Value::Null,
        Some(s) => chrono::DateTime::from_timestamp(s, 0)
            .map_or(Value::Null, |t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))),
    }
}

fn object_meta(mut m: meta::ObjectMeta) -> R<Map<String, Value>> {
    let created = m.creation_timestamp.take().map(time);
    let o = J::new()
        .s("name", &mut m.name)
        .s("generateName", &mut m.generate_name)
        .s("namespace", &mut m.namespace)
        .s("uid", &mut m.uid)
        .s("resourceVersion", &mut m.resource_version)
        .map("labels", &mut m.labels)
        .map("annotations", &mut m.annotations)
        .strs("finalizers", &mut m.finalizers)
        .put("creationTimestamp", created);
    // Server-set fields a client may echo: self links, generations.
    m.self_link.take();
    m.generation.take();
    done(m, "ObjectMeta")?;
    Ok(o.0)
}

fn config_map(mut c: core::ConfigMap) -> R<Map<String, Value>> {
    let binary: Map<String, Value> = std::mem::take(&mut c.binary_data)
        .into_iter()
        .map(|(k, v)| (k, json!(base64::engine::general_purpose::STANDARD.encode(v))))
        .collect();
    let o = J::new()
        .meta(&mut c.metadata)?
        .map("data", &mut c.data)
        .put("binaryData", (!binary.is_empty()).then_some(Value::Object(binary)))
        .b("immutable", &mut c.immutable, true);
    done(c, "ConfigMap")?;
    Ok(o.0)
}

fn secret(mut s: core::Secret) -> R<Map<String, Value>> {
    let data: Map<String, Value> = std::mem::take(&mut s.data)
        .into_iter()
        .map(|(k, v)| (k, json!(base64::engine::general_purpose::STANDARD.encode(v))))
        .collect();
    let o = J::new()
        .meta(&mut s.metadata)?
        .put("data", (!data.is_empty()).then_some(Value::Object(data)))
        .map("stringData", &mut s.string_data)
        .s("type", &mut s.r#type)
        .b("immutable", &mut s.immutable, true);
    done(s, "Secret")?;
    Ok(o.0)
}

fn namespace(mut n: core::Namespace) -> R<Map<String, Value>> {
    let spec = n.spec.take().map(|mut s| J::new().strs("finalizers", &mut s.finalizers).0);
    let o = J::new()
        .meta(&mut n.metadata)?
        .put("spec", spec.filter(|m| !m.is_empty()).map(Value::Object))
        .ignore(&mut n.status);
    done(n, "Namespace")?;
    Ok(o.0)
}

fn local_ref(mut r: core::LocalObjectReference) -> R<Map<String, Value>> {
    let o = J::new().s("name", &mut r.name);
    done(r, "LocalObjectReference")?;
    Ok(o.0)
}

fn service_account(mut a: core::ServiceAccount) -> R<Map<String, Value>> {
    let o = J::new().meta(&mut a.metadata)?.arr("imagePullSecrets", &mut a.image_pull_secrets, local_ref)?.b(
        "automountServiceAccountToken",
        &mut a.automount_service_account_token,
        true,
    );
    done(a, "ServiceAccount")?;
    Ok(o.0)
}

fn service_port(mut p: core::ServicePort) -> R<Map<String, Value>> {
    let o = J::new()
        .s("name", &mut p.name)
        .s("protocol", &mut p.protocol)
        .s("appProtocol", &mut p.app_protocol)
        .i("port", &mut p.port, true)
        .int_or_string("targetPort", &mut p.target_port)
        .i("nodePort", &mut p.node_port, false);
    done(p, "ServicePort")?;
    Ok(o.0)
}

fn service(mut s: core::Service) -> R<Map<String, Value>> {
    let spec = match s.spec.take() {
        Some(mut p) => {
            let o = J::new()
                .arr("ports", &mut p.ports, service_port)?
                .map("selector", &mut p.selector)
                .s("clusterIP", &mut p.cluster_ip)
                .strs("clusterIPs", &mut p.cluster_ips)
                .s("type", &mut p.r#type)
                .s("externalName", &mut p.external_name)
                .strs("externalIPs", &mut p.external_ips)
                .s("sessionAffinity", &mut p.session_affinity);
            done(p, "ServiceSpec")?;
            Some(Value::Object(o.0))
        }
        None => None,
    };
    let o = J::new().meta(&mut s.metadata)?.put("spec", spec).ignore(&mut s.status);
    done(s, "Service")?;
    Ok(o.0)
}

fn quota(mut q: core::ResourceQuota) -> R<Map<String, Value>> {
    let spec = match q.spec.take() {
        Some(mut p) => {
            let o = J::new().quantities("hard", &mut p.hard).strs("scopes", &mut p.scopes);
            done(p, "ResourceQuotaSpec")?;
            Some(Value::Object(o.0))
        }
        None => None,
    };
    let o = J::new().meta(&mut q.metadata)?.put("spec", spec).ignore(&mut q.status);
    done(q, "ResourceQuota")?;
    Ok(o.0)
}

fn label_selector(mut s: meta::LabelSelector) -> R<Map<String, Value>> {
    let o = J::new().map("matchLabels", &mut s.match_labels).arr(
        "matchExpressions",
        &mut s.match_expressions,
        |mut e| {
            let o = J::new().s("key", &mut e.key).s("operator", &mut e.operator).strs("values", &mut e.values);
            done(e, "LabelSelectorRequirement")?;
            Ok(o.0)
        },
    )?;
    done(s, "LabelSelector")?;
    Ok(o.0)
}

fn container_port(mut p: core::ContainerPort) -> R<Map<String, Value>> {
    let o = J::new()
        .s("name", &mut p.name)
        .i("containerPort", &mut p.container_port, true)
        .i("hostPort", &mut p.host_port, false)
        .s("protocol", &mut p.protocol)
        .s("hostIP", &mut p.host_ip);
    done(p, "ContainerPort")?;
    Ok(o.0)
}

fn env_var(mut e: core::EnvVar) -> R<Map<String, Value>> {
    let value = e.value.take().map(Value::String);
    let o = J::new().s("name", &mut e.name).put("value", value);
    done(e, "EnvVar")?;
    Ok(o.0)
}

fn resources(mut r: core::ResourceRequirements) -> R<Map<String, Value>> {
    let o = J::new().quantities("limits", &mut r.limits).quantities("requests", &mut r.requests);
    done(r, "ResourceRequirements")?;
    Ok(o.0)
}

fn container(mut c: core::Container) -> R<Map<String, Value>> {
    let o = J::new()
        .s("name", &mut c.name)
        .s("image", &mut c.image)
        .strs("command", &mut c.command)
        .strs("args", &mut c.args)
        .s("workingDir", &mut c.working_dir)
        .arr("ports", &mut c.ports, container_port)?
        .arr("env", &mut c.env, env_var)?
        .msg("resources", &mut c.resources, resources)?
        .s("terminationMessagePath", &mut c.termination_message_path)
        .s("terminationMessagePolicy", &mut c.termination_message_policy)
        .s("imagePullPolicy", &mut c.image_pull_policy)
        .b("stdin", &mut c.stdin, false)
        .b("stdinOnce", &mut c.stdin_once, false)
        .b("tty", &mut c.tty, false);
    done(c, "Container")?;
    Ok(o.0)
}

fn pod_spec(mut p: core::PodSpec) -> R<Map<String, Value>> {
    let o = J::new()
        .arr("initContainers", &mut p.init_containers, container)?
        .arr("containers", &mut p.containers, container)?
        .s("restartPolicy", &mut p.restart_policy)
        .i("terminationGracePeriodSeconds", &mut p.termination_grace_period_seconds, true)
        .i("activeDeadlineSeconds", &mut p.active_deadline_seconds, true)
        .s("dnsPolicy", &mut p.dns_policy)
        .map("nodeSelector", &mut p.node_selector)
        .s("serviceAccountName", &mut p.service_account_name)
        .s("serviceAccount", &mut p.service_account)
        .b("hostNetwork", &mut p.host_network, false)
        .b("hostPID", &mut p.host_pid, false)
        .b("hostIPC", &mut p.host_ipc, false)
        .arr("imagePullSecrets", &mut p.image_pull_secrets, local_ref)?
        .s("schedulerName", &mut p.scheduler_name)
        .s("priorityClassName", &mut p.priority_class_name);
    // An empty pod security context is what Go writes for an unset one (the server defaults it to {}).
    if p.security_context.as_ref().is_some_and(|s| *s == core::PodSecurityContext::default()) {
        p.security_context = None;
    }
    done(p, "PodSpec")?;
    Ok(o.0)
}

fn pod_template(mut t: core::PodTemplateSpec) -> R<Map<String, Value>> {
    let o = J::new().meta(&mut t.metadata)?.msg("spec", &mut t.spec, pod_spec)?;
    done(t, "PodTemplateSpec")?;
    Ok(o.0)
}

fn deployment(mut d: apps::Deployment) -> R<Map<String, Value>> {
    let spec = match d.spec.take() {
        Some(mut s) => {
            let strategy = match s.strategy.take() {
                Some(mut st) => {
                    let ru = st.rolling_update.take().map(|mut ru| {
                        J::new()
                            .int_or_string("maxUnavailable", &mut ru.max_unavailable)
                            .int_or_string("maxSurge", &mut ru.max_surge)
                            .0
                    });
                    let o = J::new().s("type", &mut st.r#type).put("rollingUpdate", ru.map(Value::Object));
                    done(st, "DeploymentStrategy")?;
                    Some(Value::Object(o.0))
                }
                None => None,
            };
            let o = J::new()
                .i("replicas", &mut s.replicas, true)
                .msg("selector", &mut s.selector, label_selector)?
                .msg("template", &mut s.template, pod_template)?
                .put("strategy", strategy)
                .i("minReadySeconds", &mut s.min_ready_seconds, false)
                .i("revisionHistoryLimit", &mut s.revision_history_limit, true)
                .b("paused", &mut s.paused, false)
                .i("progressDeadlineSeconds", &mut s.progress_deadline_seconds, true);
            done(s, "DeploymentSpec")?;
            Some(Value::Object(o.0))
        }
        None => None,
    };
    let o = J::new().meta(&mut d.metadata)?.put("spec", spec).ignore(&mut d.status);
    done(d, "Deployment")?;
    Ok(o.0)
}

fn job_spec(mut s: batch::JobSpec) -> R<Map<String, Value>> {
    let o = J::new()
        .i("parallelism", &mut s.parallelism, true)
        .i("completions", &mut s.completions, true)
        .i("activeDeadlineSeconds", &mut s.active_deadline_seconds, true)
        .i("backoffLimit", &mut s.backoff_limit, true)
        .msg("selector", &mut s.selector, label_selector)?
        .b("manualSelector", &mut s.manual_selector, true)
        .msg("template", &mut s.template, pod_template)?
        .i("ttlSecondsAfterFinished", &mut s.ttl_seconds_after_finished, true)
        .s("completionMode", &mut s.completion_mode)
        .b("suspend", &mut s.suspend, true);
    done(s, "JobSpec")?;
    Ok(o.0)
}

fn job(mut j: batch::Job) -> R<Map<String, Value>> {
    let o = J::new().meta(&mut j.metadata)?.msg("spec", &mut j.spec, job_spec)?.ignore(&mut j.status);
    done(j, "Job")?;
    Ok(o.0)
}

fn cron_job(mut c: batch::CronJob) -> R<Map<String, Value>> {
    let spec = match c.spec.take() {
        Some(mut s) => {
            let template = match s.job_template.take() {
                Some(mut t) => {
                    let o = J::new().meta(&mut t.metadata)?.msg("spec", &mut t.spec, job_spec)?;
                    done(t, "JobTemplateSpec")?;
                    Some(Value::Object(o.0))
                }
                None => None,
            };
            let o = J::new()
                .s("schedule", &mut s.schedule)
                .s("timeZone", &mut s.time_zone)
                .i("startingDeadlineSeconds", &mut s.starting_deadline_seconds, true)
                .s("concurrencyPolicy", &mut s.concurrency_policy)
                .b("suspend", &mut s.suspend, true)
                .put("jobTemplate", template)
                .i("successfulJobsHistoryLimit", &mut s.successful_jobs_history_limit, true)
                .i("failedJobsHistoryLimit", &mut s.failed_jobs_history_limit, true);
            done(s, "CronJobSpec")?;
            Some(Value::Object(o.0))
        }
        None => None,
    };
    let o = J::new().meta(&mut c.metadata)?.put("spec", spec).ignore(&mut c.status);
    done(c, "CronJob")?;
    Ok(o.0)
}

fn rules(m: &mut Option<meta::ObjectMeta>, r: &mut Vec<rbac::PolicyRule>) -> R<Map<String, Value>> {
    Ok(J::new().meta(m)?.arr("rules", r, policy_rule)?.0)
}

fn binding(
    m: &mut Option<meta::ObjectMeta>,
    s: &mut Vec<rbac::Subject>,
    r: &mut Option<rbac::RoleRef>,
) -> R<Map<String, Value>> {
    Ok(J::new().meta(m)?.arr("subjects", s, subject)?.msg("roleRef", r, role_ref)?.0)
}

fn policy_rule(mut r: rbac::PolicyRule) -> R<Map<String, Value>> {
    let o = J::new()
        .strs("verbs", &mut r.verbs)
        .strs("apiGroups", &mut r.api_groups)
        .strs("resources", &mut r.resources)
        .strs("resourceNames", &mut r.resource_names)
        .strs("nonResourceURLs", &mut r.non_resource_ur_ls);
    done(r, "PolicyRule")?;
    Ok(o.0)
}

fn subject(mut s: rbac::Subject) -> R<Map<String, Value>> {
    let o = J::new()
        .s("kind", &mut s.kind)
        .s("apiGroup", &mut s.api_group)
        .s("name", &mut s.name)
        .s("namespace", &mut s.namespace);
    done(s, "Subject")?;
    Ok(o.0)
}

fn role_ref(mut r: rbac::RoleRef) -> R<Map<String, Value>> {
    let o = J::new().s("apiGroup", &mut r.api_group).s("kind", &mut r.kind).s("name", &mut r.name);
    done(r, "RoleRef")?;
    Ok(o.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(kind: &str) -> std::sync::Arc<ResourceDef> {
        crate::resources::builtins().into_iter().find(|d| d.kind == kind && d.version == "v1").unwrap()
    }

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = k8s_pb::apimachinery::pkg::runtime::Unknown {
            type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    fn meta(name: &str) -> Option<meta::ObjectMeta> {
        Some(meta::ObjectMeta {
            name: Some(name.into()),
            generate_name: Some(String::new()),
            self_link: Some(String::new()),
            generation: Some(0),
            creation_timestamp: Some(meta::Time::default()),
            ..Default::default()
        })
    }

    #[test]
    fn a_configmap_as_kubectl_sends_it() {
        let cm = core::ConfigMap {
            metadata: meta("cm"),
            data: [("a".to_string(), "1".to_string()), ("empty".to_string(), String::new())].into(),
            ..Default::default()
        };
        let v = decode(&def("ConfigMap"), &envelope("v1", "ConfigMap", cm.encode_to_vec())).unwrap();
        assert_eq!(
            v,
            json!({"metadata": {"name": "cm", "creationTimestamp": null}, "data": {"a": "1", "empty": ""},
                   "apiVersion": "v1", "kind": "ConfigMap"})
        );
    }

    #[test]
    fn go_zero_values_are_dropped_but_meaningful_zeros_kept() {
        let d = apps::Deployment {
            metadata: meta("d"),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(0),
                min_ready_seconds: Some(0),
                paused: Some(false),
                strategy: Some(apps::DeploymentStrategy { r#type: Some(String::new()), rolling_update: None }),
                template: Some(core::PodTemplateSpec {
                    metadata: meta(""),
                    spec: Some(core::PodSpec {
                        containers: vec![core::Container {
                            name: Some("c".into()),
                            image: Some("nginx".into()),
                            resources: Some(Default::default()),
                            stdin: Some(false),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
            status: Some(Default::default()),
        };
        let v = decode(&def("Deployment"), &envelope("apps/v1", "Deployment", d.encode_to_vec())).unwrap();
        assert_eq!(v["spec"]["replicas"], 0);
        assert!(v["spec"].get("minReadySeconds").is_none() && v["spec"].get("paused").is_none());
        assert_eq!(v["spec"]["strategy"], json!({}));
        assert_eq!(
            v["spec"]["template"]["spec"]["containers"],
            json!([{"name": "c", "image": "nginx", "resources": {}}])
        );
        assert!(v.get("status").is_none());
    }

    #[test]
    fn fields_it_does_not_map_are_refused_not_dropped() {
        let mut cm = core::ConfigMap { metadata: meta("cm"), ..Default::default() };
        cm.metadata.as_mut().unwrap().owner_references =
            vec![meta::OwnerReference { name: Some("x".into()), ..Default::default() }];
        let e = decode(&def("ConfigMap"), &envelope("v1", "ConfigMap", cm.encode_to_vec())).unwrap_err();
        assert_eq!(e.code, 415, "{e}");
        assert!(e.message.contains("owner_references"), "{}", e.message);
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        let cm = def("ConfigMap");
        for body in [&b""[..], b"{}", b"k8s\0\xff\xff\xff", b"k8s\0\x0a\x02\x0a"] {
            let e = decode(&cm, body).unwrap_err();
            assert_eq!(e.code, 400, "{body:?}: {e}");
        }
        assert_eq!(decode(&cm, &envelope("v1", "Secret", Vec::new())).unwrap_err().code, 400);
        assert_eq!(decode(&cm, &envelope("v1", "ConfigMap", vec![0xff, 0xff])).unwrap_err().code, 400);
    }
}
