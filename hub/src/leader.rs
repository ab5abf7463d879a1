//! One leader among hub replicas (feature `etcd`): a leased election key, won by a transaction that creates it
//! only when absent. The key's creation revision is the leader's [`Fence`]: every write of the leader is
//! guarded by it, so once the key is gone (the lease expired, the leader stopped) or another replica's, the old
//! leader's writes fail. A leader whose lease it cannot renew stops acting within the lease's TTL.

use crate::etcd::Fence;
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// The election key under a fleet's prefix.
pub fn election_key(prefix: &str) -> String {
    format!("{prefix}/leader")
}

/// This replica leads.
pub struct Leadership {
    pub fence: Fence,
    pub lease: i64,
    /// Cancelled when this replica may no longer act as the leader (its lease could not be renewed in time,
    /// or the key is gone).
    pub lost: CancellationToken,
    /// When it was won (Unix ms).
    pub since_ms: i64,
}

/// Who leads now, if anyone: (replica name, since Unix ms).
pub async fn current(client: &mut Client, prefix: &str) -> Result<Option<(String, i64)>, etcd_client::Error> {
    let resp = client.get(election_key(prefix), None).await?;
    Ok(resp.kvs().first().map(|kv| {
        let v = String::from_utf8_lossy(kv.value()).to_string();
        let (name, since) = v.rsplit_once(' ').unwrap_or((v.as_str(), "0"));
        (name.to_string(), since.parse().unwrap_or(0))
    }))
}

/// Campaigns until this replica leads (Some) or `shutdown` (None). `me` names the replica in the key.
pub async fn campaign(
    client: &Client,
    prefix: &str,
    me: &str,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, etcd_client::Error> {
    let key = election_key(prefix);
    let mut client = client.clone();
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let mut announced = None;
    loop {
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let since = crate::hub::now_ms();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), format!("{me} {since}"), Some(PutOptions::new().with_lease(lease)))]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            let create_revision = resp.header().map_or(0, |h| h.revision());
            let lost = CancellationToken::new();
            tokio::spawn(
                keep(client.clone(), lease, ttl, key.clone(), create_revision, lost.clone(), shutdown.clone())
                    .instrument(tracing::info_span!("leader-lease")),
            );
            info!(replica = me, %key, revision = create_revision, "this replica leads");
            return Ok(Some(Leadership { fence: Fence { key, create_revision }, lease, lost, since_ms: since }));
        }
        let _ = client.lease_revoke(lease).await;
        let leader = current(&mut client, prefix).await?;
        if leader != announced {
            if let Some((name, _)) = &leader {
                info!(replica = me, leader = %name, "standby: another replica leads");
            }
            announced = leader;
        }
        // Jittered, well inside the TTL: a vacancy is taken within about half a second.
        let wait = Duration::from_millis(300 + fastrand::u64(0..400));
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Renews the lease every third of its TTL; cancels `lost` when it was not renewed for a whole TTL, or the
/// key is no longer this leader's. Revokes the lease on shutdown, so a standby takes over at once.
async fn keep(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    key: String,
    create_revision: i64,
    lost: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut last_ok = tokio::time::Instant::now();
    let every = ttl / 3;
    let mut keeper = client.lease_keep_alive(lease).await.ok();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.lease_revoke(lease).await;
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
        let renewed = match keeper.as_mut() {
            Some((k, stream)) => match tokio::time::timeout(every, async {
                k.keep_alive().await?;
                stream.message().await
            })
            .await
            {
                Ok(Ok(Some(r))) => r.ttl() > 0,
                _ => false,
            },
            None => false,
        };
        let still_mine = renewed
            && matches!(
                tokio::time::timeout(every, client.get(key.as_str(), None)).await,
                Ok(Ok(r)) if r.kvs().first().is_some_and(|kv| kv.create_revision() == create_revision)
            );
        if still_mine {
            last_ok = tokio::time::Instant::now();
            continue;
        }
        if !renewed {
            keeper = client.lease_keep_alive(lease).await.ok();
        }
        if last_ok.elapsed() + every >= ttl || renewed && !still_mine {
            warn!(%key, "the leader's lease was not renewed in time or the key is another's: stopping as leader");
            lost.cancel();
            return;
        }
    }
}

/// Keeps this replica's presence under `<prefix>/replicas/<name>` (its own lease: gone within the lease after
/// the replica is), saying where it serves, since when, whether it leads and how many sessions it holds.
#[allow(clippy::too_many_arguments)]
pub async fn register(
    mut client: Client,
    prefix: String,
    name: String,
    address: String,
    started_ms: i64,
    ttl: Duration,
    sessions: std::sync::Arc<std::sync::atomic::AtomicU32>,
    leading: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    let key = format!("{prefix}/replicas/{name}");
    // The lease and one keep-alive stream for it, made again only when renewing fails.
    let mut lease: Option<(i64, etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    loop {
        if lease.is_none() {
            if let Ok(l) = client.lease_grant(ttl.as_secs().max(2) as i64, None).await {
                if let Ok((k, st)) = client.lease_keep_alive(l.id()).await {
                    lease = Some((l.id(), k, st));
                }
            }
        }
        let mut failed = false;
        if let Some((id, keeper, stream)) = lease.as_mut() {
            let value = serde_json::json!({
                "address": address,
                "started": started_ms,
                "sessions": sessions.load(std::sync::atomic::Ordering::Relaxed),
                "leading": leading.load(std::sync::atomic::Ordering::SeqCst),
                "seen": crate::hub::now_ms(),
            });
            let put = client.put(key.as_str(), value.to_string(), Some(PutOptions::new().with_lease(*id))).await;
            let renewed = async {
                keeper.keep_alive().await?;
                Ok::<_, etcd_client::Error>(stream.message().await?.is_some_and(|r| r.ttl() > 0))
            };
            failed = put.is_err() || !matches!(renewed.await, Ok(true));
        }
        if failed {
            lease = None;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                if let Some((id, ..)) = lease {
                    let _ = client.lease_revoke(id).await;
                }
                return;
            }
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    }
}

/// Every replica's presence, and who leads since when.
pub async fn replicas(
    mut client: Client,
    prefix: &str,
) -> Result<Vec<flotilla_proto::platform::v1::HubReplica>, etcd_client::Error> {
    let leader = current(&mut client, prefix).await?;
    let dir = format!("{prefix}/replicas/");
    let resp = client.get(dir.as_str(), Some(etcd_client::GetOptions::new().with_prefix())).await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let name = String::from_utf8_lossy(kv.key()).trim_start_matches(&dir).to_string();
        let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap_or_default();
        let is_leader = leader.as_ref().is_some_and(|(l, _)| *l == name);
        out.push(flotilla_proto::platform::v1::HubReplica {
            address: v["address"].as_str().unwrap_or_default().to_string(),
            leader: is_leader,
            leader_since_unix_ms: if is_leader { leader.as_ref().map_or(0, |(_, s)| *s) } else { 0 },
            sessions: v["sessions"].as_u64().unwrap_or(0) as u32,
            started_unix_ms: v["started"].as_i64().unwrap_or(0),
            state: if is_leader { "leading" } else { "standby" }.into(),
            seen_unix_ms: v["seen"].as_i64().unwrap_or(0),
            name,
        });
    }
    Ok(out)
}
