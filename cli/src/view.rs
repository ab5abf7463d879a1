//! `flotilla clusters` and `flotilla cluster NAME`: the fleet view from the hub's platform API.

use anyhow::Context;
use flotilla_proto::agent::v1::Phase;
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use flotilla_proto::platform::v1::{Cluster, GetClusterRequest, ListClustersRequest, ListClustersResponse};
use serde_json::{json, Value};
use std::path::Path;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// Connects to the hub as an operator (certificate `CERTS/operators/NAME.pem`).
pub async fn connect(
    hub: &str,
    hub_name: &str,
    certs: &Path,
    operator: &str,
) -> anyhow::Result<PlatformServiceClient<Channel>> {
    let read = |f: &str| {
        let p = certs.join(f);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let cert = read(&format!("operators/{operator}.pem"))?;
    let now = chrono::Utc::now().timestamp_millis();
    crate::access::check_certificate(&cert, &certs.join(format!("operators/{operator}.pem")), operator, now)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(cert, read(&format!("operators/{operator}-key.pem"))?))
        .domain_name(hub_name);
    let channel = Channel::from_shared(hub.to_string())
        .with_context(|| format!("invalid hub URL {hub}"))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the hub at {hub}"))?;
    Ok(PlatformServiceClient::new(channel))
}

/// The hub's answer as a user error: its message, without gRPC's status wording; an unreachable hub says so.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow::anyhow!("the hub is unreachable: {}", s.message()),
        tonic::Code::Unauthenticated => anyhow::anyhow!("the hub refused the operator certificate: {}", s.message()),
        tonic::Code::PermissionDenied => anyhow::anyhow!("permission denied: {}", s.message()),
        tonic::Code::DeadlineExceeded => anyhow::anyhow!("the hub did not answer in time: {}", s.message()),
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

fn phase(p: i32) -> &'static str {
    match Phase::try_from(p).unwrap_or(Phase::Unspecified) {
        Phase::Unspecified => "Unknown",
        Phase::Pending => "Pending",
        Phase::Applying => "Applying",
        Phase::Applied => "Applied",
        Phase::Failed => "Failed",
    }
}

fn health(h: i32) -> &'static str {
    match flotilla_proto::agent::v1::Health::try_from(h).unwrap_or(flotilla_proto::agent::v1::Health::Unspecified) {
        flotilla_proto::agent::v1::Health::Unspecified => "-",
        flotilla_proto::agent::v1::Health::Healthy => "Healthy",
        flotilla_proto::agent::v1::Health::Progressing => "Progressing",
        flotilla_proto::agent::v1::Health::Missing => "Missing",
        flotilla_proto::agent::v1::Health::Degraded => "Degraded",
        flotilla_proto::agent::v1::Health::Unknown => "Unknown",
    }
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let secs = (chrono::Utc::now().timestamp_millis() - ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

pub fn cluster_json(c: &Cluster) -> Value {
    json!({
        "name": c.name,
        "labels": c.labels,
        "connected": c.connected,
        "revision": c.revision,
        "appsInSync": c.apps_in_sync,
        "appsHeldBack": c.apps_held_back,
        "appsBroken": c.apps_broken,
        "appsTotal": c.apps_total,
        "problems": c.problems,
        "desiredSeq": c.desired_seq,
        "ackedSeq": c.acked_seq,
        "lastSeenUnixMs": c.last_seen_unix_ms,
        "apps": c.apps.iter().map(|a| json!({
            "app": a.app,
            "desiredDigest": a.desired_digest,
            "desiredRevision": a.desired_revision,
            "state": a.state,
            "heldBackRevision": a.held_back_revision,
            "error": a.error,
            "applied": a.applied.as_ref().map(|s| json!({
                "digest": s.digest, "revision": s.revision, "phase": phase(s.phase),
                "objects": s.objects, "objectsApplied": s.objects_applied, "message": s.message,
                "health": health(s.health), "healthReason": s.health_reason,
                "ready": s.ready, "notReady": s.not_ready, "drifted": s.drifted, "missing": s.missing,
                "pruned": s.pruned, "reasons": s.reasons, "driftPolicy": if s.corrects_drift { "correct" } else { "report" },
                "drift": s.drift.iter().map(|d| json!({"object": d.object, "path": d.path, "desired": d.desired, "live": d.live})).collect::<Vec<_>>(),
            })),
        })).collect::<Vec<_>>(),
    })
}

fn print(v: &Value, out: Output) -> anyhow::Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        _ => print!("{}", serde_yaml::to_string(v)?),
    }
    Ok(())
}

pub fn render_clusters(r: &ListClustersResponse, out: Output) -> anyhow::Result<String> {
    if out != Output::Table {
        let stats = r.render_stats.unwrap_or_default();
        let v = json!({
            "revision": r.revision,
            "sourceError": r.source_error,
            "problems": r.problems,
            "rendering": {
                "clusterApps": stats.cluster_apps, "renders": stats.renders, "renderedNow": stats.rendered,
                "toolRuns": stats.tool_runs, "bundles": stats.bundles, "millis": stats.render_millis,
            },
            "total": r.total,
            "clusters": r.clusters.iter().map(cluster_json).collect::<Vec<_>>(),
        });
        print(&v, out)?;
        return Ok(String::new());
    }
    let mut s = format!(
        "{:<20} {:<10} {:<13} {:<8} {:<10} {:<7} {}\n",
        "CLUSTER", "CONNECTED", "REVISION", "IN SYNC", "HELD BACK", "BROKEN", "LAST SEEN"
    );
    let mut cluster_problems = Vec::new();
    for c in &r.clusters {
        let rev = if c.revision.is_empty() { "-" } else { short(&c.revision) };
        s.push_str(&format!(
            "{:<20} {:<10} {:<13} {:<8} {:<10} {:<7} {}\n",
            c.name,
            if c.connected { "yes" } else { "no" },
            rev,
            format!("{}/{}", c.apps_in_sync, c.apps_total),
            c.apps_held_back,
            c.apps_broken,
            ago(c.last_seen_unix_ms)
        ));
        cluster_problems
            .extend(c.problems.iter().filter(|p| !p.contains("not connected")).map(|p| format!("{}: {p}", c.name)));
    }
    if r.total as usize > r.clusters.len() {
        s.push_str(&format!("({} of {} clusters)\n", r.clusters.len(), r.total));
    }
    s.push_str(&format!(
        "\nfleet repository at {}",
        if r.revision.is_empty() { "(not fetched yet)" } else { short(&r.revision) }
    ));
    if let Some(st) = r.render_stats.filter(|st| st.cluster_apps > 0) {
        s.push_str(&format!(
            ": {} cluster apps from {} renders ({} new, {} kustomize/helm runs) in {} ms",
            st.cluster_apps, st.renders, st.rendered, st.tool_runs, st.render_millis
        ));
    }
    if !r.source_error.is_empty() {
        s.push_str(&format!("\nerror following the fleet repository: {}", r.source_error));
    }
    for p in &r.problems {
        s.push_str(&format!("\nproblem: {p}"));
    }
    const SHOWN: usize = 20;
    for p in cluster_problems.iter().take(SHOWN) {
        s.push_str(&format!("\n{p}"));
    }
    if cluster_problems.len() > SHOWN {
        s.push_str(&format!("\n… and {} more (flotilla clusters --problems -o json)", cluster_problems.len() - SHOWN));
    }
    s.push('\n');
    Ok(s)
}

pub fn render_cluster(c: &Cluster, out: Output) -> anyhow::Result<String> {
    if out != Output::Table {
        print(&cluster_json(c), out)?;
        return Ok(String::new());
    }
    let labels: Vec<String> = c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut s = format!(
        "Cluster:    {}\nLabels:     {}\nConnected:  {}\nRevision:   {}\nIn sync:    {}/{} ({} held back, {} broken)\nLast seen:  {}\nDesired:    sent #{}, acknowledged #{}\n\n",
        c.name,
        labels.join(","),
        if c.connected { "yes" } else { "no" },
        if c.revision.is_empty() { "-" } else { &c.revision },
        c.apps_in_sync,
        c.apps_total,
        c.apps_held_back,
        c.apps_broken,
        ago(c.last_seen_unix_ms),
        c.desired_seq,
        c.acked_seq
    );
    for p in &c.problems {
        s.push_str(&format!("problem: {p}\n"));
    }
    if !c.problems.is_empty() {
        s.push('\n');
    }
    s.push_str(&format!(
        "{:<20} {:<13} {:<13} {:<13} {:<9} {:<12} {:<22} {}\n",
        "APP", "STATE", "DESIRED", "APPLIED", "PHASE", "HEALTH", "READY/DRIFT/MISSING", "MESSAGE"
    ));
    let mut details = String::new();
    for a in &c.apps {
        let (applied, ph, hl, counts, msg) = match &a.applied {
            Some(st) => (
                short(&st.revision).to_string(),
                phase(st.phase),
                health(st.health),
                format!("{}/{} {} {}", st.ready, st.objects, st.drifted, st.missing),
                if !st.message.is_empty() { st.message.clone() } else { st.health_reason.clone() },
            ),
            None => ("-".into(), "Pending", "-", "-".into(), String::new()),
        };
        // A rendering error of the newest commit comes first: it says why the cluster is not on it.
        let msg = if a.error.is_empty() { msg } else { a.error.clone() };
        let desired = if a.desired_revision.is_empty() { "-" } else { short(&a.desired_revision) };
        s.push_str(&format!(
            "{:<20} {:<13} {:<13} {:<13} {:<9} {:<12} {:<22} {}\n",
            a.app, a.state, desired, applied, ph, hl, counts, msg
        ));
        if let Some(st) = &a.applied {
            for r in st.reasons.iter().filter(|r| **r != msg) {
                details.push_str(&format!("  {}: {r}\n", a.app));
            }
            for d in &st.drift {
                let verb = if st.corrects_drift { "corrected" } else { "drifted" };
                details.push_str(&format!(
                    "  {}: {verb}: {} {}: desired {} live {}\n",
                    a.app, d.object, d.path, d.desired, d.live
                ));
            }
            if st.pruned > 0 {
                details.push_str(&format!("  {}: pruned {} objects\n", a.app, st.pruned));
            }
        }
    }
    if !details.is_empty() {
        s.push('\n');
        s.push_str(&details);
    }
    Ok(s)
}

/// Every cluster matching the filters, page by page.
pub async fn list_all(
    client: &mut PlatformServiceClient<Channel>,
    selector: &str,
    problems_only: bool,
) -> anyhow::Result<ListClustersResponse> {
    let mut all: Option<ListClustersResponse> = None;
    let mut token = String::new();
    loop {
        let req =
            ListClustersRequest { page_size: 0, page_token: token, selector: selector.to_string(), problems_only };
        let mut r = client.list_clusters(req).await.map_err(status_err)?.into_inner();
        token = std::mem::take(&mut r.next_page_token);
        match all.as_mut() {
            None => all = Some(r),
            Some(a) => a.clusters.append(&mut r.clusters),
        }
        if token.is_empty() {
            break;
        }
    }
    Ok(all.unwrap_or_default())
}

pub async fn clusters(
    client: &mut PlatformServiceClient<Channel>,
    out: Output,
    selector: &str,
    problems_only: bool,
) -> anyhow::Result<()> {
    let r = list_all(client, selector, problems_only).await?;
    print!("{}", render_clusters(&r, out)?);
    Ok(())
}

/// The hub's replicas: which leads since when, each one's sessions.
pub async fn hubs(client: &mut PlatformServiceClient<Channel>, out: Output) -> anyhow::Result<()> {
    let r = client.list_hubs(flotilla_proto::platform::v1::ListHubsRequest {}).await.map_err(status_err)?.into_inner();
    print!("{}", render_hubs(&r, out)?);
    Ok(())
}

pub fn render_hubs(r: &flotilla_proto::platform::v1::ListHubsResponse, out: Output) -> anyhow::Result<String> {
    if out != Output::Table {
        let v = json!({
            "store": r.store,
            "hubs": r.hubs.iter().map(|h| json!({
                "name": h.name, "address": h.address, "state": h.state, "leader": h.leader,
                "leaderSinceUnixMs": h.leader_since_unix_ms, "sessions": h.sessions,
                "startedUnixMs": h.started_unix_ms, "seenUnixMs": h.seen_unix_ms,
                "appliedRevision": h.applied_revision, "lagRevisions": h.lag_revisions, "caughtUp": h.caught_up,
            })).collect::<Vec<_>>(),
        });
        print(&v, out)?;
        return Ok(String::new());
    }
    let mut s = format!(
        "store: {}\n{:<24} {:<22} {:<9} {:<14} {:<9} {:<16} {}\n",
        r.store, "REPLICA", "ADDRESS", "STATE", "LEADS SINCE", "SESSIONS", "LAG", "SEEN"
    );
    for h in &r.hubs {
        let since = if h.leader { ago(h.leader_since_unix_ms) } else { "-".into() };
        let lag = match (r.store.as_str(), h.lag_revisions) {
            ("embedded", _) => "-".to_string(),
            (_, l) if l < 0 => "unknown".to_string(),
            (_, l) if h.caught_up => format!("{l} rev"),
            (_, l) => format!("{l} rev (behind)"),
        };
        s.push_str(&format!(
            "{:<24} {:<22} {:<9} {:<14} {:<9} {:<16} {}\n",
            h.name,
            h.address,
            h.state,
            since,
            h.sessions,
            lag,
            ago(h.seen_unix_ms)
        ));
    }
    Ok(s)
}

pub async fn cluster(client: &mut PlatformServiceClient<Channel>, name: &str, out: Output) -> anyhow::Result<()> {
    let c = client.get_cluster(GetClusterRequest { name: name.to_string() }).await.map_err(status_err)?.into_inner();
    print!("{}", render_cluster(&c, out)?);
    Ok(())
}
