//! Health of Kubernetes objects, free of I/O: built-in rules with kstatus-like semantics for the common
//! kinds, generic `Ready`/`Available`/`Stalled` conditions for everything else, and custom rules per kind
//! written in CEL (declared in the fleet repository). Per app, the worst state wins, with its reason.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Ordered from best to worst: an app takes the worst of its objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Status {
    Healthy,
    Progressing,
    /// Not known: no rule says what the object's status means, or its cluster cannot be asked.
    Unknown,
    Missing,
    Degraded,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Healthy => "Healthy",
            Status::Progressing => "Progressing",
            Status::Missing => "Missing",
            Status::Degraded => "Degraded",
            Status::Unknown => "Unknown",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: Status,
    /// A short machine-friendly cause (`ProgressDeadlineExceeded`), empty when healthy.
    pub reason: String,
    pub message: String,
}

impl Health {
    pub fn healthy() -> Health {
        Health { status: Status::Healthy, reason: String::new(), message: String::new() }
    }
    fn new(status: Status, reason: &str, message: impl Into<String>) -> Health {
        Health { status, reason: reason.to_string(), message: message.into() }
    }
    pub fn missing() -> Health {
        Health::new(Status::Missing, "NotFound", "the object does not exist in the cluster")
    }
    /// `reason: message`, or either alone.
    pub fn describe(&self) -> String {
        match (self.reason.is_empty(), self.message.is_empty()) {
            (false, false) => format!("{}: {}", self.reason, self.message),
            (false, true) => self.reason.clone(),
            (true, false) => self.message.clone(),
            (true, true) => self.status.to_string(),
        }
    }
}

fn i64_at(o: &Value, p: &str) -> Option<i64> {
    o.pointer(p).and_then(Value::as_i64)
}

fn str_at<'a>(o: &'a Value, p: &str) -> &'a str {
    o.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

/// The condition of `type` in `status.conditions`: (status, reason, message).
fn condition<'a>(o: &'a Value, kind: &str) -> Option<(&'a str, &'a str, &'a str)> {
    o.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| str_at(c, "/type") == kind)
        .map(|c| (str_at(c, "/status"), str_at(c, "/reason"), str_at(c, "/message")))
}

/// Progressing while the controller has not observed the object's generation.
fn not_observed(o: &Value) -> Option<Health> {
    let (generation, observed) = (i64_at(o, "/metadata/generation")?, i64_at(o, "/status/observedGeneration")?);
    (observed < generation).then(|| {
        Health::new(
            Status::Progressing,
            "NotObserved",
            format!("the controller has not observed generation {generation} yet (at {observed})"),
        )
    })
}

/// The built-in rules.
pub fn builtin(o: &Value) -> Health {
    let kind = str_at(o, "/kind");
    let group = str_at(o, "/apiVersion").split_once('/').map_or("", |(g, _)| g);
    if let Some(stale) = not_observed(o) {
        return stale;
    }
    let desired = i64_at(o, "/spec/replicas").unwrap_or(1);
    let n = |p: &str| i64_at(o, p).unwrap_or(0);
    match (group, kind) {
        ("apps", "Deployment") => {
            if let Some(("False", "ProgressDeadlineExceeded", msg)) = condition(o, "Progressing") {
                return Health::new(Status::Degraded, "ProgressDeadlineExceeded", msg);
            }
            if o.pointer("/spec/paused").and_then(Value::as_bool) == Some(true) {
                // Held on purpose: nothing will progress until someone resumes it.
                return Health::new(Status::Healthy, "Paused", "the rollout is paused (spec.paused)");
            }
            if o.pointer("/status").is_none() {
                return Health::new(Status::Progressing, "NoStatus", "waiting for the controller");
            }
            let (updated, total, available) =
                (n("/status/updatedReplicas"), n("/status/replicas"), n("/status/availableReplicas"));
            if updated < desired {
                Health::new(
                    Status::Progressing,
                    "RolloutInProgress",
                    format!("{updated} of {desired} replicas updated"),
                )
            } else if total > updated {
                Health::new(
                    Status::Progressing,
                    "RolloutInProgress",
                    format!("{} old replicas pending termination", total - updated),
                )
            } else if available < updated {
                Health::new(
                    Status::Progressing,
                    "RolloutInProgress",
                    format!("{available} of {updated} updated replicas available"),
                )
            } else {
                Health::healthy()
            }
        }
        ("apps", "StatefulSet") => {
            let ready = n("/status/readyReplicas");
            let (current, update) = (str_at(o, "/status/currentRevision"), str_at(o, "/status/updateRevision"));
            let partition = i64_at(o, "/spec/updateStrategy/rollingUpdate/partition").unwrap_or(0);
            if ready < desired {
                Health::new(Status::Progressing, "RolloutInProgress", format!("{ready} of {desired} replicas ready"))
            } else if partition > 0 && str_at(o, "/spec/updateStrategy/type") != "OnDelete" {
                // A partitioned rollout updates the replicas at or above the partition only.
                let want = (desired - partition).max(0);
                let updated = n("/status/updatedReplicas");
                if updated < want {
                    Health::new(
                        Status::Progressing,
                        "RolloutInProgress",
                        format!("{updated} of {want} replicas above partition {partition} updated"),
                    )
                } else {
                    Health::new(Status::Healthy, "Partitioned", format!("the rollout is held at partition {partition}"))
                }
            } else if !update.is_empty() && current != update && str_at(o, "/spec/updateStrategy/type") != "OnDelete" {
                Health::new(
                    Status::Progressing,
                    "RolloutInProgress",
                    format!("{} of {desired} replicas updated", n("/status/updatedReplicas")),
                )
            } else {
                Health::healthy()
            }
        }
        ("apps", "DaemonSet") => {
            let want = n("/status/desiredNumberScheduled");
            let (updated, available) = (n("/status/updatedNumberScheduled"), n("/status/numberAvailable"));
            let on_delete = str_at(o, "/spec/updateStrategy/type") == "OnDelete";
            if o.pointer("/status").is_none() {
                Health::new(Status::Progressing, "NoStatus", "waiting for the controller")
            } else if updated < want && !on_delete {
                // Under OnDelete, pods update only when someone deletes them: not a rollout to wait for.
                Health::new(Status::Progressing, "RolloutInProgress", format!("{updated} of {want} pods updated"))
            } else if available < want {
                Health::new(Status::Progressing, "RolloutInProgress", format!("{available} of {want} pods available"))
            } else {
                Health::healthy()
            }
        }
        ("apps", "ReplicaSet") => {
            if let Some(("True", reason, msg)) = condition(o, "ReplicaFailure") {
                return Health::new(Status::Degraded, if reason.is_empty() { "ReplicaFailure" } else { reason }, msg);
            }
            let available = n("/status/availableReplicas");
            if available < desired {
                Health::new(Status::Progressing, "Scaling", format!("{available} of {desired} replicas available"))
            } else {
                Health::healthy()
            }
        }
        ("batch", "CronJob") => {
            if o.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true) {
                Health::new(Status::Healthy, "Suspended", "the schedule is suspended (spec.suspend)")
            } else {
                Health::healthy()
            }
        }
        ("batch", "Job") => {
            if o.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true) {
                return Health::new(Status::Healthy, "Suspended", "the job is suspended (spec.suspend)");
            }
            if let Some(("True", reason, msg)) = condition(o, "Failed") {
                Health::new(Status::Degraded, if reason.is_empty() { "JobFailed" } else { reason }, msg)
            } else if let Some(("True", ..)) = condition(o, "Complete") {
                Health::healthy()
            } else {
                Health::new(
                    Status::Progressing,
                    "JobRunning",
                    format!("{} active, {} succeeded", n("/status/active"), n("/status/succeeded")),
                )
            }
        }
        ("", "Pod") => match str_at(o, "/status/phase") {
            "Succeeded" => Health::healthy(),
            "Failed" => Health::new(Status::Degraded, "PodFailed", str_at(o, "/status/message")),
            phase => {
                let waiting = o.pointer("/status/containerStatuses").and_then(Value::as_array).and_then(|cs| {
                    cs.iter().find_map(|c| {
                        let reason = str_at(c, "/state/waiting/reason");
                        matches!(
                            reason,
                            "ImagePullBackOff"
                                | "ErrImagePull"
                                | "CrashLoopBackOff"
                                | "CreateContainerConfigError"
                                | "InvalidImageName"
                        )
                        .then(|| (reason.to_string(), str_at(c, "/state/waiting/message").to_string()))
                    })
                });
                match (waiting, condition(o, "Ready")) {
                    (Some((reason, msg)), _) => Health::new(Status::Degraded, &reason, msg),
                    (None, Some(("True", ..))) if phase == "Running" => Health::healthy(),
                    _ => Health::new(
                        Status::Progressing,
                        "PodNotReady",
                        format!("phase {}", if phase.is_empty() { "unknown" } else { phase }),
                    ),
                }
            }
        },
        ("", "PersistentVolumeClaim") => match str_at(o, "/status/phase") {
            "Bound" => Health::healthy(),
            "Lost" => Health::new(Status::Degraded, "ClaimLost", "the bound volume is lost"),
            other => Health::new(
                Status::Progressing,
                "NotBound",
                format!("phase {}", if other.is_empty() { "Pending" } else { other }),
            ),
        },
        ("", "Service") => {
            let lb = str_at(o, "/spec/type") == "LoadBalancer";
            let has_ingress =
                o.pointer("/status/loadBalancer/ingress").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
            if lb && !has_ingress {
                Health::new(Status::Progressing, "NoLoadBalancerAddress", "waiting for a load balancer address")
            } else {
                Health::healthy()
            }
        }
        ("networking.k8s.io", "Ingress") => {
            let has_ingress =
                o.pointer("/status/loadBalancer/ingress").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
            if has_ingress {
                Health::healthy()
            } else {
                Health::new(Status::Progressing, "NoAddress", "waiting for an address")
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if let Some(("False", reason, msg)) = condition(o, "NamesAccepted") {
                Health::new(Status::Degraded, if reason.is_empty() { "NamesNotAccepted" } else { reason }, msg)
            } else if let Some(("True", ..)) = condition(o, "Established") {
                Health::healthy()
            } else {
                Health::new(Status::Progressing, "NotEstablished", "waiting for the CRD to be established")
            }
        }
        _ => generic(o),
    }
}

/// Groups Kubernetes itself serves: their kinds without a rule here (ConfigMap, Role, …) are healthy once
/// they exist.
fn builtin_group(group: &str) -> bool {
    group.is_empty() || !group.contains('.') || group.ends_with(".k8s.io")
}

/// kstatus semantics for everything else: `Stalled=True` is Degraded, `Ready=False`, `Available=False` or
/// `Reconciling=True` is Progressing, conditions otherwise are Healthy. A custom resource with no status at
/// all is Unknown: nothing says what it means (a health rule in the app does).
fn generic(o: &Value) -> Health {
    let group = str_at(o, "/apiVersion").split_once('/').map_or("", |(g, _)| g);
    if !builtin_group(group) && o.pointer("/status").is_none_or(|s| s.as_object().is_some_and(|m| m.is_empty())) {
        return Health::new(
            Status::Unknown,
            "NoStatus",
            format!(
                "{} reports no status and no health rule says what that means (add one under health in app.yaml)",
                str_at(o, "/kind")
            ),
        );
    }
    if let Some(("True", reason, msg)) = condition(o, "Stalled") {
        return Health::new(Status::Degraded, if reason.is_empty() { "Stalled" } else { reason }, msg);
    }
    for kind in ["Ready", "Available"] {
        if let Some(("False", reason, msg)) = condition(o, kind) {
            return Health::new(Status::Progressing, if reason.is_empty() { "NotReady" } else { reason }, msg);
        }
    }
    if let Some(("True", reason, msg)) = condition(o, "Reconciling") {
        return Health::new(Status::Progressing, if reason.is_empty() { "Reconciling" } else { reason }, msg);
    }
    Health::healthy()
}

/// A custom rule for one kind, in CEL over `object` (the live object as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthRule {
    pub kind: String,
    /// The API group; absent matches the kind in any group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// True when the object is healthy.
    pub healthy: String,
    /// True when the object is degraded (checked first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// A string explaining the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

struct Compiled {
    rule: HealthRule,
    healthy: cel_interpreter::Program,
    degraded: Option<cel_interpreter::Program>,
    message: Option<cel_interpreter::Program>,
}

/// Built-in rules plus an app's custom rules, compiled once.
#[derive(Default)]
pub struct Rules {
    custom: Vec<Compiled>,
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.custom.iter().map(|c| &c.rule)).finish()
    }
}

fn compile(what: &str, src: &str) -> Result<cel_interpreter::Program, String> {
    cel_interpreter::Program::compile(src).map_err(|e| format!("{what}: invalid CEL {src:?}: {e}"))
}

impl Rules {
    pub fn new(rules: &[HealthRule]) -> Result<Rules, String> {
        let mut custom = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            custom.push(Compiled {
                rule: r.clone(),
                healthy: compile(&format!("health[{i}].healthy"), &r.healthy)?,
                degraded: r.degraded.as_deref().map(|s| compile(&format!("health[{i}].degraded"), s)).transpose()?,
                message: r.message.as_deref().map(|s| compile(&format!("health[{i}].message"), s)).transpose()?,
            });
        }
        Ok(Rules { custom })
    }

    /// The health of a live object.
    pub fn check(&self, o: &Value) -> Health {
        let kind = str_at(o, "/kind");
        let group = str_at(o, "/apiVersion").split_once('/').map_or("", |(g, _)| g);
        let Some(c) =
            self.custom.iter().find(|c| c.rule.kind == kind && c.rule.group.as_deref().is_none_or(|g| g == group))
        else {
            return builtin(o);
        };
        // A status the controller wrote for an older generation says nothing about this one.
        if let Some(stale) = not_observed(o) {
            return stale;
        }
        let mut ctx = cel_interpreter::Context::default();
        if let Err(e) = ctx.add_variable("object", o) {
            return Health::new(Status::Progressing, "HealthRuleError", e.to_string());
        }
        let eval = |p: &cel_interpreter::Program| -> Result<bool, String> {
            match p.execute(&ctx) {
                Ok(cel_interpreter::Value::Bool(b)) => Ok(b),
                Ok(other) => Err(format!("the rule gave {other:?}, not a bool")),
                Err(e) => Err(e.to_string()),
            }
        };
        let message = c
            .message
            .as_ref()
            .and_then(|m| match m.execute(&ctx) {
                Ok(cel_interpreter::Value::String(s)) => Some(s.to_string()),
                _ => None,
            })
            .unwrap_or_default();
        if let Some(d) = &c.degraded {
            match eval(d) {
                Ok(true) => return Health::new(Status::Degraded, "HealthRule", message),
                Ok(false) => {}
                // Fields that are not there yet (no status) count as progress, not failure.
                Err(e) => return Health::new(Status::Progressing, "HealthRulePending", e),
            }
        }
        match eval(&c.healthy) {
            Ok(true) => Health { message, ..Health::healthy() },
            Ok(false) => Health::new(Status::Progressing, "HealthRule", message),
            Err(e) => Health::new(Status::Progressing, "HealthRulePending", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deploy(status: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "generation": 2},
               "spec": {"replicas": 3}, "status": status})
    }

    #[test]
    fn deployments() {
        let h = builtin(&deploy(json!({"observedGeneration": 1})));
        assert_eq!((h.status, h.reason.as_str()), (Status::Progressing, "NotObserved"));
        let h = builtin(&deploy(
            json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3}),
        ));
        assert_eq!(h.describe(), "RolloutInProgress: 1 old replicas pending termination");
        let h = builtin(&deploy(
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}),
        ));
        assert_eq!(h.status, Status::Healthy);
        let h =
            builtin(&deploy(json!({"observedGeneration": 2, "conditions": [{"type": "Progressing", "status": "False",
            "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"web-1\" has timed out progressing."}]})));
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.describe(), "ProgressDeadlineExceeded: ReplicaSet \"web-1\" has timed out progressing.");
    }

    #[test]
    fn other_kinds() {
        let job = |c: Value| json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "status": {"conditions": [c]}});
        assert_eq!(builtin(&job(json!({"type": "Complete", "status": "True"}))).status, Status::Healthy);
        assert_eq!(
            builtin(&job(json!({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}))).reason,
            "BackoffLimitExceeded"
        );
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "d"}, "status": {"phase": "Pending"}});
        assert_eq!(builtin(&pvc).status, Status::Progressing);
        let lb =
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"type": "LoadBalancer"}});
        assert_eq!(builtin(&lb).reason, "NoLoadBalancerAddress");
        let svc =
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"type": "ClusterIP"}});
        assert_eq!(builtin(&svc).status, Status::Healthy);
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": {"phase": "Pending",
            "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull failed"}}}]}});
        assert_eq!(builtin(&pod).describe(), "ImagePullBackOff: pull failed");
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "x"},
            "status": {"conditions": [{"type": "Established", "status": "True"}]}});
        assert_eq!(builtin(&crd).status, Status::Healthy);
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        assert_eq!(builtin(&cm).status, Status::Healthy, "no status, no conditions: nothing to wait for");
        let cr = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "InstallFailed", "message": "boom"}]}});
        assert_eq!(builtin(&cr).describe(), "InstallFailed: boom");
        assert_eq!(
            builtin(&cr).status,
            Status::Progressing,
            "kstatus: Ready=False is in progress, whatever the reason"
        );
        let stalled = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "status": {"conditions": [{"type": "Stalled", "status": "True", "reason": "InstallFailed"}]}});
        assert_eq!(builtin(&stalled).status, Status::Degraded);
        let bare = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}});
        assert_eq!(builtin(&bare).status, Status::Unknown, "no status and no rule: not known");
        assert!(builtin(&bare).message.contains("add one under health in app.yaml"));
    }

    #[test]
    fn held_rollouts_are_not_progress_to_wait_for() {
        let paused = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "paused": true}, "status": {"updatedReplicas": 1, "replicas": 3}});
        assert_eq!((builtin(&paused).status, builtin(&paused).reason.as_str()), (Status::Healthy, "Paused"));
        let sts = |updated: i64| {
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
            "spec": {"replicas": 4, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}},
            "status": {"readyReplicas": 4, "updatedReplicas": updated, "currentRevision": "a", "updateRevision": "b"}})
        };
        assert_eq!(builtin(&sts(2)).status, Status::Healthy, "the replicas above the partition are updated");
        assert_eq!(builtin(&sts(1)).status, Status::Progressing);
        let ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
            "spec": {"updateStrategy": {"type": "OnDelete"}},
            "status": {"desiredNumberScheduled": 3, "updatedNumberScheduled": 0, "numberAvailable": 3}});
        assert_eq!(builtin(&ds).status, Status::Healthy, "OnDelete pods update when deleted");
        let job =
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"suspend": true}});
        assert_eq!(builtin(&job).reason, "Suspended");
        let cron =
            json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"}, "spec": {"suspend": true}});
        assert_eq!(builtin(&cron).status, Status::Healthy);
    }

    #[test]
    fn custom_rules_wait_for_the_observed_generation_too() {
        let rules = Rules::new(&[HealthRule {
            kind: "Widget".into(),
            group: None,
            healthy: "object.status.ready == true".into(),
            degraded: None,
            message: None,
        }])
        .unwrap();
        let w = |observed: i64| {
            json!({"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"name": "w", "generation": 3}, "status": {"ready": true, "observedGeneration": observed}})
        };
        assert_eq!(rules.check(&w(2)).reason, "NotObserved");
        assert_eq!(rules.check(&w(3)).status, Status::Healthy);
    }

    #[test]
    fn custom_rules_in_cel() {
        let rules = Rules::new(&[HealthRule {
            kind: "Widget".into(),
            group: Some("example.com".into()),
            healthy: "object.status.phase == 'Running'".into(),
            degraded: Some("object.status.phase == 'Broken'".into()),
            message: Some("'phase ' + object.status.phase".into()),
        }])
        .unwrap();
        let w = |phase: &str| json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "status": {"phase": phase}});
        assert_eq!(rules.check(&w("Running")).status, Status::Healthy);
        let broken = rules.check(&w("Broken"));
        assert_eq!((broken.status, broken.message.as_str()), (Status::Degraded, "phase Broken"));
        assert_eq!(rules.check(&w("Starting")).status, Status::Progressing);
        let no_status = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}});
        assert_eq!(rules.check(&no_status).status, Status::Progressing, "a missing field is progress, not failure");
        assert!(Rules::new(&[HealthRule {
            kind: "X".into(),
            group: None,
            healthy: "object.(".into(),
            degraded: None,
            message: None
        }])
        .unwrap_err()
        .starts_with("health[0].healthy: invalid CEL"));
    }

    #[test]
    fn worst_wins() {
        assert!(
            Status::Degraded > Status::Missing
                && Status::Missing > Status::Progressing
                && Status::Progressing > Status::Healthy
        );
    }
}
