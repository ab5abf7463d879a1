//! What agents report, as the hub keeps it, and the bounds it keeps it within: only apps the cluster is meant
//! to run, a bounded number of apps, reasons and drift items, and bounded texts.

use flotilla_common::fleet::render::RenderStats;
use flotilla_proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Apps kept per cluster report.
pub const MAX_APPS: usize = 256;
/// Reasons and drift items kept per app.
pub const MAX_REASONS: usize = 20;
pub const MAX_DRIFT: usize = 50;
/// Characters kept of a message or reason.
pub const MAX_TEXT: usize = 4096;

pub(crate) fn clip(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// An agent's app status within the hub's bounds.
pub fn bounded(mut a: pb::AppStatus) -> pb::AppStatus {
    clip(&mut a.message, MAX_TEXT);
    clip(&mut a.health_reason, MAX_TEXT);
    a.reasons.truncate(MAX_REASONS);
    for r in &mut a.reasons {
        clip(r, 1024);
    }
    a.drift.truncate(MAX_DRIFT);
    for d in &mut a.drift {
        clip(&mut d.object, 512);
        clip(&mut d.path, 512);
        clip(&mut d.desired, 1024);
        clip(&mut d.live, 1024);
    }
    a
}

/// What an agent last reported for one app: the agent's message itself, stored as its protobuf encoding
/// (base64) so that every field the agent reports survives a restart of the hub.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppReport(pub pb::AppStatus);

impl From<&pb::AppStatus> for AppReport {
    fn from(a: &pb::AppStatus) -> Self {
        AppReport(a.clone())
    }
}

impl AppReport {
    pub fn to_proto(&self, app: &str) -> pb::AppStatus {
        pb::AppStatus { app: app.to_string(), ..self.0.clone() }
    }
}

impl Serialize for AppReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(prost::Message::encode_to_vec(&self.0)))
    }
}

impl<'de> Deserialize<'de> for AppReport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(D::Error::custom)?;
                let status = <pb::AppStatus as prost::Message>::decode(bytes.as_slice()).map_err(D::Error::custom)?;
                Ok(AppReport(status))
            }
            // Reports stored by an earlier hub: the fields it kept.
            serde_json::Value::Object(m) => {
                let s = |k: &str| m.get(k).and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
                let n = |k: &str| m.get(k).and_then(serde_json::Value::as_u64).unwrap_or_default();
                Ok(AppReport(pb::AppStatus {
                    digest: s("digest"),
                    revision: s("revision"),
                    phase: n("phase") as i32,
                    objects: n("objects") as u32,
                    objects_applied: n("objects_applied") as u32,
                    message: s("message"),
                    ..Default::default()
                }))
            }
            other => Err(D::Error::custom(format!("an app report must be a string, not {other}"))),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterReport {
    pub last_seen_unix_ms: i64,
    pub apps: BTreeMap<String, AppReport>,
    /// Since when (unix ms) the agent cannot reach its cluster's API server, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_down: Option<(i64, String)>,
    /// The agent's version and protocol revision, from its last Hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<(String, u32)>,
}

/// The oldest agent protocol revision this hub serves fully; older agents are shown as too old.
pub const MIN_AGENT_PROTOCOL: u32 = 1;

impl ClusterReport {
    /// What operators are told about the cluster's agent and API server, if anything is wrong.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((since, error)) = &self.api_down {
            out.push(format!("API unreachable since {}: {error}", clock(*since)));
        }
        if let Some((version, protocol)) = &self.agent {
            if *protocol < MIN_AGENT_PROTOCOL {
                out.push(format!(
                    "its agent {version} is too old (protocol {protocol}; this hub expects {MIN_AGENT_PROTOCOL} or \
                     newer): upgrade it"
                ));
            }
        }
        out
    }
}

/// `2026-12-01 12:03:04 UTC`
pub fn clock(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, t) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", t / 3600, t % 3600 / 60, t % 60)
}

/// How the current commit was rendered (see [`RenderStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendering {
    pub cluster_apps: u64,
    pub renders: u64,
    pub rendered: u64,
    pub tool_runs: u64,
    pub bundles: u64,
    pub millis: u64,
}

impl Rendering {
    pub fn new(s: RenderStats, millis: u64) -> Self {
        Rendering {
            cluster_apps: s.cluster_apps as u64,
            renders: s.renders as u64,
            rendered: s.rendered as u64,
            tool_runs: s.tool_runs as u64,
            bundles: s.bundles as u64,
            millis,
        }
    }
}

#[cfg(test)]
mod clock_tests {
    #[test]
    fn clock_prints_utc() {
        assert_eq!(super::clock(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::clock(1_796_126_584_000), "2026-12-01 12:03:04 UTC");
    }
}
