//! `flotilla audit` and `flotilla whoami`, and the check of the operator's own certificate before a call.

use crate::view::{status_err, Output};
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use flotilla_proto::platform::v1::{ListAuditRequest, WhoAmIRequest};
use std::path::Path;
use tonic::transport::Channel;

fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// A duration in words, to the largest unit: `3d`, `5h`, `12m`, `40s`.
fn span(ms: i64) -> String {
    let s = ms.abs() / 1000;
    match s {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Refuses to use an expired operator certificate, with what to do; warns when it expires within the hour.
pub fn check_certificate(cert_pem: &str, path: &Path, operator: &str, now_ms: i64) -> anyhow::Result<()> {
    let Some(expires) =
        flotilla_common::identity::pem_der(cert_pem).and_then(|d| flotilla_common::identity::expiry_of(&d))
    else {
        anyhow::bail!("{} is not a certificate", path.display());
    };
    if expires <= now_ms {
        anyhow::bail!(
            "the operator certificate {} expired at {} ({} ago); ask for a new one \
             (flotilla certs --operator {operator} --ttl 12h)",
            path.display(),
            utc(expires),
            span(now_ms - expires)
        );
    }
    if expires - now_ms < 3_600_000 {
        eprintln!(
            "warning: the operator certificate {} expires at {} (in {})",
            path.display(),
            utc(expires),
            span(expires - now_ms)
        );
    }
    Ok(())
}

/// `--since`: a duration back from now (`1h`, `30m`, `7d`) or a time (RFC 3339).
pub fn parse_since(text: &str, now_ms: i64) -> anyhow::Result<i64> {
    if let Ok(d) = humantime::parse_duration(text.trim()) {
        return Ok(now_ms - d.as_millis() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(text).map(|t| t.timestamp_millis()).map_err(|_| {
        anyhow::anyhow!("--since {text:?}: give a duration (30m, 2h, 7d) or a time (2026-12-07T10:00:00Z)")
    })
}

pub async fn audit(
    client: &mut PlatformServiceClient<Channel>,
    since_ms: i64,
    who: &str,
    limit: u32,
    output: Output,
) -> anyhow::Result<()> {
    let req = ListAuditRequest { since_unix_ms: since_ms, who: who.to_string(), limit };
    let records = client.list_audit(req).await.map_err(status_err)?.into_inner().records;
    let as_json = || -> Vec<serde_json::Value> {
        records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "at": utc(r.at_unix_ms), "at_unix_ms": r.at_unix_ms, "who": r.who, "action": r.action,
                    "app": r.app, "detail": r.detail, "allowed": r.allowed, "answer": r.answer, "replica": r.replica,
                })
            })
            .collect()
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&as_json())?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&as_json())?),
        Output::Table => {
            println!("{:<23}  {:<12}  {:<17}  {:<24}  {:<7}  ANSWER", "WHEN", "WHO", "ACTION", "ON", "ALLOWED");
            for r in &records {
                let on =
                    [r.app.as_str(), r.detail.as_str()].iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>();
                println!(
                    "{:<23}  {:<12}  {:<17}  {:<24}  {:<7}  {}",
                    utc(r.at_unix_ms),
                    r.who,
                    r.action,
                    on.join(" "),
                    if r.allowed { "yes" } else { "no" },
                    r.answer
                );
            }
        }
    }
    Ok(())
}

pub async fn create_join_token(
    client: &mut PlatformServiceClient<Channel>,
    cluster: &str,
    ttl: std::time::Duration,
    uses: u32,
    output: Output,
) -> anyhow::Result<()> {
    let req = flotilla_proto::platform::v1::CreateJoinTokenRequest {
        cluster: cluster.to_string(),
        ttl_seconds: ttl.as_secs().min(u64::from(u32::MAX)) as u32,
        uses,
    };
    let r = client.create_join_token(req).await.map_err(status_err)?.into_inner();
    match output {
        Output::Table => {
            println!("{}", r.token);
            eprintln!(
                "join token for cluster {cluster}: {} use(s) until {}; start its agent with --cluster {cluster} \
                 --bootstrap-token <token> (docs/security.md)",
                r.uses,
                utc(r.expires_unix_ms)
            );
        }
        _ => {
            let v = serde_json::json!({"cluster": cluster, "token": r.token, "uses": r.uses, "expires": utc(r.expires_unix_ms)});
            match output {
                Output::Yaml => print!("{}", serde_yaml::to_string(&v)?),
                _ => println!("{}", serde_json::to_string_pretty(&v)?),
            }
        }
    }
    Ok(())
}

pub async fn whoami(client: &mut PlatformServiceClient<Channel>, output: Output) -> anyhow::Result<()> {
    let r = client.who_am_i(WhoAmIRequest {}).await.map_err(status_err)?.into_inner();
    let v = serde_json::json!({
        "operator": r.who,
        "role": if r.role.is_empty() { "none" } else { r.role.as_str() },
        "rolesFile": !r.open,
        "certificateExpires": utc(r.certificate_expires_unix_ms),
    });
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&v)?),
        Output::Table => {
            let role = if r.role.is_empty() { "none".to_string() } else { r.role.clone() };
            let open = if r.open { " (the hub has no roles file: every operator is admin)" } else { "" };
            println!("operator {}: {role}{open}; certificate expires {}", r.who, utc(r.certificate_expires_unix_ms));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_certificate_is_refused_with_what_to_do() {
        let ca = flotilla_common::identity::FleetCa::generate("t").unwrap();
        let id = flotilla_common::Identity::Operator("alice".into());
        let c = ca.issue_for(&id, &[], Some(std::time::Duration::from_secs(3600 * 12))).unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        let p = Path::new("certs/operators/alice.pem");
        check_certificate(&c.cert_pem, p, "alice", now).unwrap();
        let e = check_certificate(&c.cert_pem, p, "alice", now + 13 * 3_600_000).unwrap_err().to_string();
        assert!(e.starts_with("the operator certificate certs/operators/alice.pem expired at "), "{e}");
        assert!(e.contains("(1h ago)") && e.contains("flotilla certs --operator alice --ttl 12h"), "{e}");
    }

    #[test]
    fn since_takes_durations_and_times() {
        assert_eq!(parse_since("2h", 10_000_000).unwrap(), 10_000_000 - 7_200_000);
        assert_eq!(parse_since("2026-12-07T10:00:00Z", 0).unwrap(), 1_796_637_600_000);
        assert!(parse_since("yesterday", 0).unwrap_err().to_string().contains("--since"));
    }
}
