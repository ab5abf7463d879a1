//! Every hub replica follows etcd (feature `etcd`): a watch on the fleet's prefix keeps its state current —
//! a standby takes everything the leader writes, the leader takes the reports standbys write — and tells it
//! where every agent session is, and which epoch leads. Each replica publishes its own sessions as keys under
//! its presence lease, so they vanish with it.

use crate::etcd::{retrying, EtcdStore};
use crate::hub::Hub;
use crate::store::Op;
use etcd_client::{Client, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// The revision a replica has applied, and whether its watch runs (readiness: "caught up with etcd").
#[derive(Default)]
pub struct Progress {
    pub applied: AtomicI64,
    pub watching: std::sync::atomic::AtomicBool,
    /// Revisions behind etcd when the replica last looked (-1: it could not look).
    pub lag: AtomicI64,
}

impl Progress {
    /// Why the replica does not serve current state, if it does not.
    pub fn behind(&self) -> Option<String> {
        let lag = self.lag.load(Ordering::SeqCst);
        if !self.watching.load(Ordering::SeqCst) {
            return Some("not following etcd (its watch is not running)".into());
        }
        match lag {
            l if l < 0 => Some("etcd cannot be reached".into()),
            l if l > crate::leader::LAG_READY => Some(format!("{l} revisions behind etcd")),
            _ => None,
        }
    }
}

/// Where replicas publish which clusters' sessions they hold.
pub fn sessions_dir(prefix: &str) -> String {
    format!("{prefix}/sessions/")
}

/// What one watched key means to a replica.
enum Seen {
    /// A store key: its new value (raw: maybe a chunk pointer), or deleted.
    Key(String, Option<Vec<u8>>),
    /// A batch became visible (its journal flipped).
    Journal,
    /// A cluster's session is now held by this replica (None: it ended).
    Session(String, Option<String>),
    /// The election key: a leader with this epoch, or none.
    Leader(Option<i64>),
}

fn classify(prefix: &str, ev: &etcd_client::Event) -> Option<Seen> {
    let kv = ev.kv()?;
    let key = String::from_utf8_lossy(kv.key());
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let put = ev.event_type() == EventType::Put;
    let value = put.then(|| kv.value().to_vec());
    if let Some(k) = rest.strip_prefix("k/") {
        return Some(Seen::Key(k.to_string(), value));
    }
    if let Some(c) = rest.strip_prefix("sessions/") {
        return Some(Seen::Session(c.to_string(), value.map(|v| String::from_utf8_lossy(&v).into_owned())));
    }
    match rest {
        "journal" if put => Some(Seen::Journal),
        "leader" => Some(Seen::Leader(put.then(|| kv.create_revision()))),
        _ => None,
    }
}

/// Which clusters' sessions other replicas hold now (`me` left out), read in full.
async fn sessions_now(
    client: &mut Client,
    prefix: &str,
    me: &str,
) -> Result<Vec<(String, String)>, etcd_client::Error> {
    let dir = sessions_dir(prefix);
    let resp = retrying(|| {
        let (mut c, d) = (client.clone(), dir.clone());
        async move { c.get(d, Some(GetOptions::new().with_prefix())).await }
    })
    .await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| {
            let c = String::from_utf8_lossy(kv.key()).trim_start_matches(&dir).to_string();
            (c, String::from_utf8_lossy(kv.value()).into_owned())
        })
        .filter(|(_, r)| r != me)
        .collect())
}

/// Follows etcd from `from` (the revision the replica's state was read at) until shutdown. A watch that falls
/// behind compaction reads everything again.
pub async fn follow(hub: Arc<Hub>, store: Arc<EtcdStore>, me: String, mut from: i64, progress: Arc<Progress>) {
    let (mut client, prefix) = store.client();
    let shutdown = hub.shared.shutdown.clone();
    let mut backoff = Duration::from_millis(200);
    let mut known_remote: HashSet<String> = HashSet::new();
    loop {
        match follow_from(&hub, &store, &mut client, &prefix, &me, from, &progress, &mut known_remote).await {
            Ok(Some(next)) => {
                from = next;
                backoff = Duration::from_millis(200);
            }
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "following etcd failed; watching again");
                progress.watching.store(false, Ordering::SeqCst);
            }
        }
        let wait = backoff + Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        backoff = (backoff * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One watch: Ok(None) at shutdown, Ok(Some(revision)) to watch again from there (after a full read when
/// the watch was compacted away), Err when etcd failed.
#[allow(clippy::too_many_arguments)]
async fn follow_from(
    hub: &Arc<Hub>,
    store: &Arc<EtcdStore>,
    client: &mut Client,
    prefix: &str,
    me: &str,
    from: i64,
    progress: &Progress,
    known_remote: &mut HashSet<String>,
) -> Result<Option<i64>, etcd_client::Error> {
    let shutdown = hub.shared.shutdown.clone();
    // Sessions held elsewhere: read in full at every (re)start, then followed.
    let now: Vec<(String, String)> = sessions_now(client, prefix, me).await?;
    let fresh: HashSet<String> = now.iter().map(|(c, _)| c.clone()).collect();
    let gone: Vec<(String, Option<String>)> =
        known_remote.iter().filter(|c| !fresh.contains(*c)).map(|c| (c.clone(), None)).collect();
    hub.shared.sessions.set_remote(gone.into_iter().chain(now.into_iter().map(|(c, r)| (c, Some(r)))));
    *known_remote = fresh;
    let leader = retrying(|| {
        let mut c = client.clone();
        async move { c.get(crate::leader::election_key(prefix), None).await }
    })
    .await?;
    if let Some(l) = leader.kvs().first() {
        hub.shared.follow_epoch(l.create_revision().max(0) as u64);
    }
    let mut watch = client.watch_client().max_decoding_message_size(64 << 20);
    let opts = || WatchOptions::new().with_start_revision(from + 1);
    // The keys a replica needs, not the chunks and journal parts (large, and read when a key points at them).
    let mut stream = watch.watch(format!("{prefix}/k/"), Some(opts().with_prefix())).await?;
    stream.watch(format!("{prefix}/journal"), Some(opts())).await?;
    stream.watch(sessions_dir(prefix), Some(opts().with_prefix())).await?;
    stream.watch(crate::leader::election_key(prefix), Some(opts())).await?;
    progress.watching.store(true, Ordering::SeqCst);
    debug!(from, "following etcd");
    let mut ask = tokio::time::interval(Duration::from_secs(2));
    let mut last = from;
    loop {
        let resp = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = ask.tick() => {
                // A progress answer says every event up to its revision was sent: the replica's lag.
                stream.request_progress().await?;
                continue;
            }
            r = stream.message() => r?,
        };
        let Some(resp) = resp else { return Ok(Some(last)) };
        if resp.canceled() || resp.compact_revision() > 0 {
            warn!(
                compacted = resp.compact_revision(),
                "the watch fell behind etcd's compaction: reading everything again"
            );
            return reload(hub, client).await.map(Some);
        }
        // A response without events answers a progress request: every event up to its revision has been sent
        // (on every watch of the stream), and everything sent before it has been handed to the writer.
        if resp.events().is_empty() {
            if !resp.created() {
                last = resp.header().map_or(last, |h| h.revision()).max(last);
                progress.applied.fetch_max(last, Ordering::SeqCst);
                hub.caught_up_to(last.max(0) as u64).await;
            }
            continue;
        }
        // The leader wrote everything but the standbys' reports itself: it neither reads nor applies the rest.
        let leading = hub.shared.leading();
        let reports = crate::keys::Prefix::Report.as_str();
        let seen: Vec<Seen> = resp
            .events()
            .iter()
            .filter_map(|e| classify(prefix, e))
            .filter(|s| {
                !leading || !matches!(s, Seen::Journal) && !matches!(s, Seen::Key(k, _) if !k.starts_with(reports))
            })
            .collect();
        if !seen.is_empty() {
            let mut sessions = Vec::new();
            let mut keys = Vec::new();
            for s in seen {
                match s {
                    Seen::Session(c, r) => {
                        let r = r.filter(|r| r != me);
                        match &r {
                            Some(_) => known_remote.insert(c.clone()),
                            None => known_remote.remove(&c),
                        };
                        sessions.push((c, r));
                    }
                    Seen::Leader(Some(epoch)) => {
                        hub.shared.follow_epoch(epoch.max(0) as u64);
                        if !hub.shared.leading() {
                            info!(epoch, "a replica leads");
                        }
                    }
                    Seen::Leader(None) => {}
                    other => keys.push(other),
                }
            }
            hub.shared.sessions.set_remote(sessions);
            if !keys.is_empty() {
                let s = store.clone();
                let changes = tokio::task::spawn_blocking(move || resolve(&s, keys)).await;
                match changes {
                    Ok(Ok(changes)) if !changes.is_empty() => hub.followed(changes).await,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        warn!(error = %crate::hub::error_chain(&e), "reading what another replica wrote failed");
                        return reload(hub, client).await.map(Some);
                    }
                    Err(e) => warn!(error = %e, "reading what another replica wrote failed"),
                }
            }
        }
        // How new the state is now, etcd says in its answer to this.
        stream.request_progress().await?;
    }
}

/// Watched keys as store changes: chunked values gathered, a flipped journal's operations read.
fn resolve(store: &EtcdStore, seen: Vec<Seen>) -> Result<BTreeMap<String, Option<Vec<u8>>>, crate::store::StoreError> {
    let mut out = BTreeMap::new();
    for s in seen {
        match s {
            Seen::Key(k, Some(v)) => {
                out.insert(k, Some(store.resolve_value(v)?));
            }
            Seen::Key(k, None) => {
                out.insert(k, None);
            }
            Seen::Journal => {
                for op in store.pending_ops()?.unwrap_or_default() {
                    match op {
                        Op::Put(k, v) => out.insert(k, Some(v)),
                        Op::Delete(k) => out.insert(k, None),
                    };
                }
            }
            Seen::Session(..) | Seen::Leader(_) => {}
        }
    }
    Ok(out)
}

/// Reads the whole state again; returns the revision it was read at (or before).
async fn reload(hub: &Arc<Hub>, client: &mut Client) -> Result<i64, etcd_client::Error> {
    let revision = current_revision(client).await?;
    match hub.shared.load_again().await {
        Ok(state) => hub.reloaded(state).await,
        Err(e) => warn!(error = %e, "reading the state again failed"),
    }
    Ok(revision)
}

/// etcd's current revision.
pub async fn current_revision(client: &mut Client) -> Result<i64, etcd_client::Error> {
    let resp = retrying(|| {
        let mut c = client.clone();
        async move { c.get("\0", Some(GetOptions::new().with_count_only())).await }
    })
    .await?;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// Publishes this replica's agent sessions as `<prefix>/sessions/<cluster>` = its name, under its presence
/// lease (`lease` says which: all are written again under a new one), twice a second.
pub async fn publish_sessions(
    hub: Arc<Hub>,
    mut client: Client,
    prefix: String,
    me: String,
    mut lease: tokio::sync::watch::Receiver<Option<i64>>,
) {
    let shutdown = hub.shared.shutdown.clone();
    let dir = sessions_dir(&prefix);
    let mut written: HashSet<String> = HashSet::new();
    let mut under: Option<i64> = None;
    loop {
        let id = *lease.borrow_and_update();
        if id != under {
            written.clear();
            under = id;
        }
        if let Some(id) = id {
            let now = hub.shared.sessions.present();
            let new: Vec<&String> = now.iter().filter(|c| !written.contains(*c)).collect();
            for part in new.chunks(crate::etcd::MAX_TXN_OPS) {
                let ops: Vec<TxnOp> = part
                    .iter()
                    .map(|c| TxnOp::put(format!("{dir}{c}"), me.as_str(), Some(PutOptions::new().with_lease(id))))
                    .collect();
                if client.txn(Txn::new().and_then(ops)).await.is_ok() {
                    written.extend(part.iter().map(|c| (*c).clone()));
                }
            }
            let ended: Vec<String> = written.iter().filter(|c| !now.contains(*c)).cloned().collect();
            for c in ended {
                // Only while it is still this replica's (the agent may have moved on already).
                let key = format!("{dir}{c}");
                let txn = Txn::new()
                    .when([etcd_client::Compare::value(key.as_str(), etcd_client::CompareOp::Equal, me.as_str())])
                    .and_then([TxnOp::delete(key.as_str(), None)]);
                if client.txn(txn).await.is_ok() {
                    written.remove(&c);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = lease.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
