//! `flotilla rollout …` and `flotilla explain`: rollouts as the hub runs them.

use crate::view::Output;
use flotilla_proto::platform::v1::control_rollout_request::Action;
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use flotilla_proto::platform::v1::{ControlRolloutRequest, ExplainRequest, ListRolloutsRequest, Rollout};
use serde_json::json;
use tonic::transport::Channel;

use crate::view::status_err;

fn bar(done: u32, failed: u32, total: u32, width: usize) -> String {
    if total == 0 {
        return format!("[{}]", " ".repeat(width));
    }
    let d = (done as usize * width) / total as usize;
    let f = ((failed as usize * width) / total as usize).min(width - d);
    format!("[{}{}{}]", "#".repeat(d), "x".repeat(f), ".".repeat(width - d - f))
}

fn short(r: &str) -> &str {
    r.get(..12).unwrap_or(r)
}

/// One rollout as text: a header, a line per wave with a progress bar, the latest events.
pub fn render(r: &Rollout) -> String {
    let mut s = format!("{}  {}  {}", r.app, if r.revision.is_empty() { "-" } else { short(&r.revision) }, r.phase);
    if !r.previous.is_empty() {
        s.push_str(&format!("  (from {})", short(&r.previous)));
    }
    s.push('\n');
    if !r.blocked.is_empty() {
        s.push_str(&format!("  blocked: {}\n", r.blocked));
    }
    if !r.waves.is_empty() {
        s.push_str(&format!(
            "  {:<14} {:<22} {:<24} {:>7} {:>7} {:>6} {:>7}  {}\n",
            "WAVE", "PHASE", "PROGRESS", "UPDATED", "HEALTHY", "FAILED", "PENDING", "NOTE"
        ));
    }
    for w in &r.waves {
        let mut note = Vec::new();
        if !w.waiting.is_empty() {
            note.push(w.waiting.clone());
        }
        if w.bake_remaining_s > 0 {
            note.push(format!("bake {} s left", w.bake_remaining_s));
        }
        if w.updating > 0 {
            note.push(format!(
                "{} updating (max {}), deadline {} s",
                w.updating, w.max_parallel, w.progress_deadline_s
            ));
        }
        if w.approval {
            note.push(if w.approved_by.is_empty() {
                "needs approval".into()
            } else {
                format!("approved by {}", w.approved_by)
            });
        }
        if w.failure_budget > 0 {
            note.push(format!("failure budget {}", w.failure_budget));
        }
        let phase: String = w.phase.chars().take(22).collect();
        s.push_str(&format!(
            "  {:<14} {:<22} {:<24} {:>7} {:>7} {:>6} {:>7}  {}\n",
            w.name,
            phase,
            bar(w.healthy, w.failed, w.clusters, 22),
            format!("{}/{}", w.healthy + w.updating + w.failed, w.clusters),
            w.healthy,
            w.failed,
            w.pending,
            note.join("; ")
        ));
    }
    for e in r.timeline.iter().rev().take(5).rev() {
        s.push_str(&format!("  {e}\n"));
    }
    s
}

pub async fn status(
    client: &mut PlatformServiceClient<Channel>,
    app: Option<&str>,
    watch: bool,
    out: Output,
) -> anyhow::Result<()> {
    loop {
        let list = client
            .list_rollouts(ListRolloutsRequest { app: app.unwrap_or_default().to_string() })
            .await
            .map_err(status_err)?
            .into_inner();
        match out {
            Output::Table => {
                if watch {
                    print!("\x1b[2J\x1b[H");
                }
                if list.rollouts.is_empty() {
                    println!("no rollouts: apps without waves go to every cluster at once (docs/rollouts.md)");
                }
                for r in &list.rollouts {
                    println!("{}", render(r));
                }
            }
            _ => {
                let v = json!(list
                    .rollouts
                    .iter()
                    .map(|r| json!({
                        "app": r.app, "revision": r.revision, "previous": r.previous, "phase": r.phase,
                        "blocked": r.blocked, "startedUnixMs": r.started_unix_ms, "timeline": r.timeline,
                        "waves": r.waves.iter().map(|w| json!({
                            "name": w.name, "phase": w.phase, "clusters": w.clusters, "updating": w.updating,
                            "healthy": w.healthy, "failed": w.failed, "pending": w.pending, "skipped": w.skipped,
                            "maxParallel": w.max_parallel, "failureBudget": w.failure_budget,
                            "bakeRemainingSeconds": w.bake_remaining_s, "approval": w.approval,
                            "approvedBy": w.approved_by, "waiting": w.waiting,
                        })).collect::<Vec<_>>(),
                    }))
                    .collect::<Vec<_>>());
                if out == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{}", serde_yaml::to_string(&v)?);
                }
            }
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    }
}

pub enum Control {
    Pause,
    Resume,
    Abort,
    Approve(String),
    Retry,
    Rollback { revision: String, immediate: bool },
}

pub async fn control(client: &mut PlatformServiceClient<Channel>, app: &str, c: Control) -> anyhow::Result<()> {
    let mut req = ControlRolloutRequest { app: app.to_string(), ..Default::default() };
    req.action = match c {
        Control::Pause => Action::Pause,
        Control::Resume => Action::Resume,
        Control::Abort => Action::Abort,
        Control::Retry => Action::Retry,
        Control::Approve(w) => {
            req.wave = w;
            Action::Approve
        }
        Control::Rollback { revision, immediate } => {
            req.revision = revision;
            req.immediate = immediate;
            Action::Rollback
        }
    } as i32;
    let r = client.control_rollout(req).await.map_err(status_err)?.into_inner();
    println!("{app}: {}", r.message);
    Ok(())
}

pub async fn explain(
    client: &mut PlatformServiceClient<Channel>,
    cluster: &str,
    app: Option<&str>,
) -> anyhow::Result<()> {
    let r = client
        .explain(ExplainRequest { cluster: cluster.to_string(), app: app.unwrap_or_default().to_string() })
        .await
        .map_err(status_err)?
        .into_inner();
    for l in r.lines {
        println!("{cluster} {l}");
    }
    Ok(())
}
