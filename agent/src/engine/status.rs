//! An app's status as the hub sees it, computed from the engine's view without I/O.

use super::app::{AppRun, Phase};
use crate::apply::Reach;
use flotilla_common::drift::DriftItem;
use flotilla_common::health::{Health, Status};
use flotilla_proto::agent::v1 as pb;

/// How many reasons and drift items a status carries.
const FIRST: usize = 5;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// "the cluster's API server has not answered since 12:03:04 UTC: connection refused"
pub fn unreachable_text(reach: &Reach) -> Option<String> {
    let since = reach.down_since_ms?;
    let secs = since.div_euclid(1000);
    let t = secs.rem_euclid(86_400);
    Some(format!(
        "the cluster's API server has not answered since {:02}:{:02}:{:02} UTC: {}",
        t / 3600,
        t % 3600 / 60,
        t % 60,
        reach.error.trim_start_matches("the cluster's API server did not answer: ")
    ))
}

pub fn health_of(s: Status) -> pb::Health {
    match s {
        Status::Healthy => pb::Health::Healthy,
        Status::Progressing => pb::Health::Progressing,
        Status::Missing => pb::Health::Missing,
        Status::Degraded => pb::Health::Degraded,
        Status::Unknown => pb::Health::Unknown,
    }
}

pub fn status(run: &AppRun, prev: Option<&pb::AppStatus>, reach: &Reach) -> pb::AppStatus {
    let mut s = pb::AppStatus {
        app: run.name.clone(),
        digest: run.digest.clone(),
        revision: run.revision.clone(),
        objects: run.refs.len() as u32,
        corrects_drift: run.policy.sync.drift == flotilla_common::fleet::DriftMode::Correct,
        pruned: run.pruned,
        ..Default::default()
    };
    if let Some(b) = &run.broken {
        s.phase = pb::Phase::Failed as i32;
        s.message = b.clone();
        s.health = pb::Health::Degraded as i32;
        return finish_status(s, prev);
    }
    let done: usize = run.stages.iter().take(run.stage.min(run.stages.len())).map(Vec::len).sum();
    let failed_done = run.errors.keys().filter(|i| run.stages.iter().take(run.stage).any(|st| st.contains(i))).count();
    s.objects_applied = done.saturating_sub(failed_done) as u32;
    s.phase = if !run.errors.is_empty() {
        pb::Phase::Failed
    } else if run.phase() == Phase::Applied && run.applied && run.unserved.is_empty() {
        pb::Phase::Applied
    } else {
        pb::Phase::Applying
    } as i32;
    let mut worst: Option<(Health, String)> = None;
    let mut reasons: Vec<String> = run.errors.values().cloned().collect();
    fn consider(worst: &mut Option<(Health, String)>, h: Health, text: String, reasons: &mut Vec<String>) {
        if reasons.len() < FIRST {
            reasons.push(text.clone());
        }
        if worst.as_ref().is_none_or(|(w, _)| h.status > w.status) {
            *worst = Some((h, text));
        }
    }
    for (i, why) in &run.unserved {
        s.not_ready += 1;
        let h = Health { status: Status::Progressing, reason: "KindNotServed".into(), message: why.clone() };
        consider(&mut worst, h, format!("{}: {why}", run.refs[*i]), &mut reasons);
    }
    for i in 0..run.refs.len() {
        if run.unserved.contains_key(&i) {
            continue;
        }
        let Some(e) = run.eval(i) else {
            // Applied, and the watch has not shown the result yet.
            s.not_ready += 1;
            if worst.is_none() {
                worst = Some((
                    Health {
                        status: Status::Progressing,
                        reason: "Applying".into(),
                        message: "waiting for the cluster to report the applied change".into(),
                    },
                    format!("{}: waiting for the cluster to report the applied change", run.refs[i]),
                ));
            }
            continue;
        };
        let h = &e.health;
        match h.status {
            Status::Healthy => s.ready += 1,
            Status::Missing => s.missing += 1,
            _ => s.not_ready += 1,
        }
        if !e.drift.is_empty() {
            s.drifted += 1;
            for DriftItem { path, desired, live } in &e.drift {
                if s.drift.len() < FIRST * 2 {
                    s.drift.push(pb::DriftItem {
                        object: run.refs[i].to_string(),
                        path: path.clone(),
                        desired: desired.to_string(),
                        live: live.to_string(),
                    });
                }
            }
        }
        if h.status != Status::Healthy {
            consider(&mut worst, h.clone(), format!("{}: {}", run.refs[i], h.describe()), &mut reasons);
        }
    }
    for i in run.fighting.keys() {
        reasons.insert(
            0,
            format!("{}: keeps drifting back: another controller changes it (add a sync.ignore rule)", run.refs[*i]),
        );
    }
    reasons.extend(run.prune_notes.iter().cloned());
    if !run.unknown_policy.is_empty() {
        reasons.push(format!(
            "the bundle's policy has fields this agent does not know (ignored; upgrade the agent): {}",
            run.unknown_policy.join(", ")
        ));
    }
    let (mut health, mut reason) = match worst {
        Some((h, text)) => (h.status, text),
        None => (Status::Healthy, String::new()),
    };
    let mut message = match (run.errors.values().next(), &run.waiting) {
        (Some(e), Some(w)) => format!("{e} ({w})"),
        (Some(e), None) => e.clone(),
        (None, Some(w)) => w.clone(),
        (None, None) => match run.unserved.values().next() {
            Some(why) => format!("{} objects wait: {why}", run.unserved.len()),
            None => String::new(),
        },
    };
    if let Some(down) = unreachable_text(reach) {
        // What the agent last saw is no longer known to be true.
        health = Status::Unknown;
        reason = down.clone();
        reasons.insert(0, down.clone());
        message = down;
    }
    reasons.truncate(FIRST);
    s.reasons = reasons;
    s.health = health_of(health) as i32;
    s.health_reason = reason;
    s.message = message;
    finish_status(s, prev)
}

/// Keeps the previous change time when nothing but the time changed.
fn finish_status(mut s: pb::AppStatus, prev: Option<&pb::AppStatus>) -> pb::AppStatus {
    match prev {
        Some(p) if pb::AppStatus { changed_unix_ms: 0, ..p.clone() } == s => p.clone(),
        _ => {
            s.changed_unix_ms = now_ms();
            s
        }
    }
}
