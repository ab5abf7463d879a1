//! One leader among hub replicas (feature `etcd`): a leased election key, won by a transaction that creates it
//! only when absent. The key's creation revision is the leader's [`Fence`]: every write of the leader is
//! guarded by it, so once the key is gone (the lease expired, the leader stopped) or another replica's, the old
//! leader's writes fail. A leader whose lease it cannot renew stops acting within the lease's TTL.

use crate::etcd::{retrying, Fence};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// A replica at most this many revisions behind etcd (when it last looked) is caught up.
pub const LAG_READY: i64 = 1000;

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
    let resp = retrying(|| {
        let mut c = client.clone();
        async move { c.get(election_key(prefix), None).await }
    })
    .await?;
    Ok(resp.kvs().first().map(|kv| {
        let v = String::from_utf8_lossy(kv.value()).to_string();
        let (name, since) = v.rsplit_once(' ').unwrap_or((v.as_str(), "0"));
        (name.to_string(), since.parse().unwrap_or(0))
    }))
}

/// Campaigns until this replica leads (Some) or `shutdown` (None). `me` names the replica in the key.
pub async fn campaign(
    cfg: &crate::etcd::EtcdConfig,
    client: &Client,
    me: &str,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, etcd_client::Error> {
    let prefix = cfg.prefix.as_str();
    let key = election_key(prefix);
    let mut client = client.clone();
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let mut announced = None;
    loop {
        let lease = retrying(|| {
            let mut c = client.clone();
            async move { c.lease_grant(ttl_secs, None).await }
        })
        .await?
        .id();
        let since = crate::hub::now_ms();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), format!("{me} {since}"), Some(PutOptions::new().with_lease(lease)))]);
        let resp = retrying(|| {
            let (mut c, txn) = (client.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
        .await?;
        if resp.succeeded() {
            let create_revision = resp.header().map_or(0, |h| h.revision());
            let lost = CancellationToken::new();
            let (k, l, stop) = (key.clone(), lost.clone(), shutdown.clone());
            on_own_thread("leader-lease", cfg, lost.clone(), move |client| {
                keep(client, lease, ttl, k, create_revision, l, stop)
            });
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

/// [`campaign`] on a thread of its own, with a client of its own (see [`on_own_thread`]): a replica busy with
/// a reconnect storm of agents takes a vacant lead on time.
pub async fn campaign_apart(
    cfg: &crate::etcd::EtcdConfig,
    me: &str,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (c2, me, stop) = (cfg.clone(), me.to_string(), shutdown.clone());
    let failed = CancellationToken::new();
    on_own_thread("campaign", cfg, failed.clone(), move |client| async move {
        let _ = tx.send(campaign(&c2, &client, &me, ttl, &stop).await.map_err(|e| e.to_string()));
    });
    tokio::select! {
        r = rx => r.unwrap_or_else(|_| Err("the campaign stopped".into())),
        _ = failed.cancelled() => Err("connecting to etcd failed".into()),
    }
}

/// Runs `task` with an etcd client of its own on a thread of its own: a lease is renewed on time however busy
/// the hub's runtime is (10,000 agent sessions and a 1 MiB bundle sent to each of them keep two cores busy for
/// a minute; a renewal queued behind them would be late). `failed` is cancelled when it cannot even start.
pub fn on_own_thread<F, Fut>(name: &str, cfg: &crate::etcd::EtcdConfig, failed: CancellationToken, task: F)
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (cfg, span) = (cfg.clone(), tracing::info_span!("etcd-lease", task = name));
    let spawned = std::thread::Builder::new().name(name.to_string()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            failed.cancel();
            return;
        };
        rt.block_on(
            async move {
                match cfg.connect().await {
                    Ok(client) => task(client).await,
                    Err(e) => {
                        warn!(error = %e, "connecting to etcd failed");
                        failed.cancel();
                    }
                }
            }
            .instrument(span),
        );
    });
    if spawned.is_err() {
        warn!("starting a thread for the etcd lease failed");
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
    let mut keeper = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.lease_revoke(lease).await;
                return;
            }
            // Given up by the replica (it could not take up the lead): the key goes at once, for another.
            _ = lost.cancelled() => {
                let _ = tokio::time::timeout(every, client.lease_revoke(lease)).await;
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
        let renewed = tokio::time::timeout(every, renew(&client, &mut keeper, lease)).await.unwrap_or(false);
        let read = retrying(|| {
            let (mut c, k) = (client.clone(), key.clone());
            async move { c.get(k, None).await }
        });
        let still_mine = renewed
            && matches!(
                tokio::time::timeout(every, read).await,
                Ok(Ok(r)) if r.kvs().first().is_some_and(|kv| kv.create_revision() == create_revision)
            );
        if still_mine {
            last_ok = tokio::time::Instant::now();
            continue;
        }
        if last_ok.elapsed() + every >= ttl || renewed && !still_mine {
            warn!(%key, "the leader's lease was not renewed in time or the key is another's: stopping as leader");
            lost.cancel();
            return;
        }
    }
}

type Keeper = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Renews the lease once over its keep-alive stream, opening the stream again (on another member) as often as
/// it fails; the caller bounds the time.
async fn renew(client: &Client, keeper: &mut Option<Keeper>, lease: i64) -> bool {
    loop {
        if keeper.is_none() {
            match retrying(|| {
                let mut c = client.clone();
                async move { c.lease_keep_alive(lease).await }
            })
            .await
            {
                Ok(k) => *keeper = Some(k),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        if let Some((k, stream)) = keeper.as_mut() {
            let answer = async {
                k.keep_alive().await?;
                stream.message().await
            };
            match answer.await {
                Ok(Some(r)) => return r.ttl() > 0,
                _ => *keeper = None,
            }
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
    progress: std::sync::Arc<crate::mirror::Progress>,
    lease_out: tokio::sync::watch::Sender<Option<i64>>,
    shutdown: CancellationToken,
) {
    let key = format!("{prefix}/replicas/{name}");
    // The lease and its keep-alive stream (opened again on another member when it fails; `renew`).
    let mut lease: Option<(i64, Option<Keeper>)> = None;
    loop {
        if lease.is_none() {
            let granted = tokio::time::timeout(
                ttl / 3,
                retrying(|| {
                    let mut c = client.clone();
                    async move { c.lease_grant(ttl.as_secs().max(2) as i64, None).await }
                }),
            )
            .await;
            if let Ok(Ok(l)) = granted {
                lease = Some((l.id(), None));
                let _ = lease_out.send(Some(l.id()));
            }
        }
        // How far behind etcd this replica's state is: revisions not applied yet when it last looked. A read etcd
        // cannot answer in time (no quorum) counts as not knowing: not ready. Measured at every turn, with or
        // without a lease (a lease lost with the quorum must not leave the last good measure standing).
        let lag = match tokio::time::timeout(ttl / 3, crate::mirror::current_revision(&mut client)).await {
            Ok(Ok(now)) => (now - progress.applied.load(std::sync::atomic::Ordering::SeqCst)).max(0),
            _ => -1,
        };
        progress.lag.store(lag, std::sync::atomic::Ordering::SeqCst);
        let mut failed = false;
        if let Some((id, keeper)) = lease.as_mut() {
            let value = serde_json::json!({
                "applied": progress.applied.load(std::sync::atomic::Ordering::SeqCst),
                "lag": lag,
                "watching": progress.watching.load(std::sync::atomic::Ordering::SeqCst),
                "address": address,
                "started": started_ms,
                "sessions": sessions.load(std::sync::atomic::Ordering::Relaxed),
                "leading": leading.load(std::sync::atomic::Ordering::SeqCst),
                "seen": crate::hub::now_ms(),
            });
            let id = *id;
            // Each step within a third of the lease: without etcd's quorum they would wait far longer, and the
            // lag above must be measured again soon (readiness depends on it).
            let put = tokio::time::timeout(
                ttl / 3,
                retrying(|| {
                    let (mut c, k, v) = (client.clone(), key.clone(), value.to_string());
                    async move { c.put(k, v, Some(PutOptions::new().with_lease(id))).await }
                }),
            )
            .await;
            let renewed = tokio::time::timeout(ttl / 3, renew(&client, keeper, id)).await.unwrap_or(false);
            failed = !matches!(put, Ok(Ok(_))) || !renewed;
        }
        if failed {
            lease = None;
            let _ = lease_out.send(None);
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
    let resp = retrying(|| {
        let (mut c, d) = (client.clone(), dir.clone());
        async move { c.get(d, Some(etcd_client::GetOptions::new().with_prefix())).await }
    })
    .await?;
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
            applied_revision: v["applied"].as_i64().unwrap_or(0),
            lag_revisions: v["lag"].as_i64().unwrap_or(-1),
            caught_up: v["watching"].as_bool().unwrap_or(false)
                && v["lag"].as_i64().is_some_and(|l| (0..=LAG_READY).contains(&l)),
            name,
        });
    }
    Ok(out)
}
