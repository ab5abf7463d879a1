//! One active agent per cluster when several run (a Deployment with two replicas, a DaemonSet on an edge
//! cluster): a `coordination.k8s.io` Lease in the state namespace. The agent that holds it runs the engine
//! and the hub session; the others wait, and take over once the holder has not renewed it for the lease's
//! duration. Every write of the Lease is conditional on the resourceVersion read, so two agents never both
//! believe they hold it. The holder renews every third of the duration and stops acting (exits) when it could
//! not renew within the duration; on shutdown it releases the Lease so a standby takes over at once.

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::Client;
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

pub const LEASE_NAME: &str = "flotilla-agent";

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    /// This agent (the pod's name).
    pub identity: String,
    pub duration: Duration,
}

/// The Lease is held; `lost` is cancelled when it no longer is.
pub struct Held {
    pub lost: CancellationToken,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn micro(ms: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms).map(|t| format!("{t:.6}")).unwrap_or_default()
}

fn lease_body(cfg: &LeaseConfig, resource_version: Option<&str>, acquired_ms: i64, transitions: i32) -> Lease {
    let mut v = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE_NAME, "namespace": cfg.namespace},
        "spec": {
            "holderIdentity": cfg.identity,
            "leaseDurationSeconds": cfg.duration.as_secs().max(1),
            "acquireTime": micro(acquired_ms),
            "renewTime": micro(now_ms()),
            "leaseTransitions": transitions,
        },
    });
    if let Some(rv) = resource_version {
        v["metadata"]["resourceVersion"] = json!(rv);
    }
    serde_json::from_value(v).expect("a valid Lease")
}

/// (holder, renewed at Unix ms, duration ms, transitions) of a Lease.
fn holder(l: &Lease) -> (String, i64, i64, i32) {
    let spec = l.spec.clone().unwrap_or_default();
    (
        spec.holder_identity.unwrap_or_default(),
        spec.renew_time.map_or(0, |t| t.0.as_millisecond()),
        i64::from(spec.lease_duration_seconds.unwrap_or(15)) * 1000,
        spec.lease_transitions.unwrap_or(0),
    )
}

/// Waits until this agent holds the Lease (Some), or `shutdown` (None).
pub async fn acquire(client: Client, cfg: LeaseConfig, shutdown: CancellationToken) -> Option<Held> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let mut announced = String::new();
    loop {
        let attempt = async {
            match api.get_opt(LEASE_NAME).await? {
                None => api.create(&PostParams::default(), &lease_body(&cfg, None, now_ms(), 0)).await.map(Some),
                Some(l) => {
                    let (who, renewed, duration, transitions) = holder(&l);
                    let expired = who.is_empty() || renewed + duration < now_ms();
                    if who != cfg.identity && !expired {
                        if who != announced {
                            info!(holder = %who, "standby: another agent of this cluster is active");
                            announced = who;
                        }
                        return Ok(None);
                    }
                    let rv = l.metadata.resource_version.as_deref();
                    let next = if who == cfg.identity { transitions } else { transitions + 1 };
                    api.replace(LEASE_NAME, &PostParams::default(), &lease_body(&cfg, rv, now_ms(), next))
                        .await
                        .map(Some)
                }
            }
        };
        match attempt.await {
            Ok(Some(l)) => {
                let rv = l.metadata.resource_version.clone().unwrap_or_default();
                let transitions = holder(&l).3;
                info!(identity = %cfg.identity, transitions, "this agent is the active one of its cluster");
                let lost = CancellationToken::new();
                let task = renew(api, cfg, rv, transitions, lost.clone(), shutdown);
                tokio::spawn(task.instrument(tracing::info_span!("agent-lease")));
                return Some(Held { lost });
            }
            Ok(None) => {}
            // 409: another agent wrote the Lease first; read it again.
            Err(e) => tracing::debug!(error = %e, "taking the agent lease failed; trying again"),
        }
        let wait = (cfg.duration / 5).mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn renew(
    api: Api<Lease>,
    cfg: LeaseConfig,
    mut rv: String,
    transitions: i32,
    lost: CancellationToken,
    shutdown: CancellationToken,
) {
    let acquired = now_ms();
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Released: a standby takes over at once.
                let dp = DeleteParams {
                    preconditions: Some(Preconditions { resource_version: Some(rv.clone()), uid: None }),
                    ..Default::default()
                };
                let _ = api.delete(LEASE_NAME, &dp).await;
                return;
            }
            _ = tokio::time::sleep(cfg.duration / 3) => {}
        }
        let body = lease_body(&cfg, Some(&rv), acquired, transitions);
        match api.replace(LEASE_NAME, &PostParams::default(), &body).await {
            Ok(l) => {
                rv = l.metadata.resource_version.unwrap_or_default();
                last_ok = tokio::time::Instant::now();
            }
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                warn!("the agent lease was taken by another agent: stopping");
                lost.cancel();
                return;
            }
            Err(e) => {
                if last_ok.elapsed() + cfg.duration / 3 >= cfg.duration {
                    warn!(error = %e, "the agent lease could not be renewed in time: stopping");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
