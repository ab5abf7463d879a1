//! The hub's store on etcd (feature `etcd`), for hub replicas: the same [`Store`] contract as the embedded
//! store — prefix scans, all-or-nothing batches — within etcd's limits, and every write fenced by the
//! leader's election key so a deposed leader can change nothing.
//!
//! Layout under the fleet's prefix (several fleets can share one etcd):
//!
//! ```text
//! <prefix>/k/<key>             a value of at most 900 KiB, or a pointer to its chunks
//! <prefix>/c/<h(key)>/<h(v)>/<n>  the chunks of a larger value (written before the pointer; immutable)
//! <prefix>/journal             the pending batch, when one is being applied: "<seq> <parts>"
//! <prefix>/j/<seq>/<n>         that batch's operations (immutable)
//! <prefix>/leader              the election key (a lease's; see `leader`)
//! ```
//!
//! A batch of at most [`MAX_TXN_OPS`] operations is one etcd transaction. A larger one is written as a
//! journal first (immutable parts, then one small transaction flipping `journal`), then applied in
//! transactions of at most [`MAX_TXN_OPS`], then the journal is removed. Readers overlay a pending journal on
//! what they read, so a batch becomes visible at once, at the flip; a leader that dies in between leaves the
//! journal for the next one, which rolls it forward before anything else.

use crate::store::{Batch, Op, Store, StoreError};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// The largest value kept in one key (etcd's default request limit is 1.5 MiB; keys and framing need room).
pub const MAX_VALUE: usize = 900 * 1024;
/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNKED: &[u8] = b"\0flotilla-chunks:";
/// Keys per page of a range read.
const PAGE_KEYS: usize = 64;

/// Whether an etcd call failed before a member could answer it (the member the client picked is down, or
/// is electing a new raft leader): worth another try, which the client sends to another member.
pub fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// Runs an etcd call, again after a transient failure (up to 6 tries within about two seconds). Every call
/// the hub makes is safe to repeat: puts of the same values, fenced transactions, reads.
pub async fn retrying<T, F, Fut>(mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 0u64;
    loop {
        match call().await {
            Err(e) if transient(&e) && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(60 * tries + fastrand::u64(0..40))).await;
            }
            r => return r,
        }
    }
}

/// A batch's operations, one per key: the last (in a batch the last operation on a key is the one that counts;
/// etcd refuses a transaction that names a key twice). Soft state waiting to be written and the batch that
/// takes it along may both hold an agent's report.
fn last_per_key(ops: &[Op]) -> Vec<&Op> {
    let mut last: BTreeMap<&str, &Op> = BTreeMap::new();
    for op in ops {
        let (Op::Put(k, _) | Op::Delete(k)) = op;
        last.insert(k.as_str(), op);
    }
    last.into_values().collect()
}

/// The first key after every key starting with `prefix` (etcd's prefix range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Where the store lives: endpoints, TLS, the key prefix.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub tls: Option<EtcdTls>,
}

#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca_pem: String,
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
}

impl EtcdConfig {
    /// `etcd://HOST:PORT[,HOST:PORT…]` (with TLS, `etcds://`).
    pub fn parse(url: &str, prefix: &str, tls: Option<EtcdTls>) -> Result<EtcdConfig, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?}: expected etcd://HOST:PORT[,…]"))?;
        let http = match scheme {
            "etcd" if tls.is_none() => "http",
            "etcd" | "etcds" => "https",
            other => return Err(format!("{url:?}: unknown scheme {other:?} (etcd:// or etcds://)")),
        };
        let endpoints: Vec<String> = rest
            .split(',')
            .filter(|e| !e.is_empty())
            .map(|e| format!("{http}://{}", e.trim_end_matches('/')))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{url:?} names no endpoint"));
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() || !prefix.starts_with('/') {
            return Err(format!("the etcd key prefix {prefix:?} must start with / (for example /flotilla/prod)"));
        }
        Ok(EtcdConfig { endpoints, prefix: prefix.to_string(), tls })
    }

    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            let mut t = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let (Some(c), Some(k)) = (&tls.cert_pem, &tls.key_pem) {
                t = t.identity(etcd_client::Identity::from_pem(c, k));
            }
            opts = opts.with_tls(t);
        }
        Client::connect(&self.endpoints, Some(opts)).await
    }
}

/// What makes a write the current leader's: the election key and the revision that created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub create_revision: i64,
}

/// The store. Its methods block (the hub calls them from blocking threads); the etcd calls run on a small
/// runtime of the store's own.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    writer: std::sync::Mutex<Writer>,
    /// Taken on drop (shut down in the background: the store may be dropped on an async thread).
    rt: Option<tokio::runtime::Runtime>,
    /// Commits and garbage collection one at a time: a collection never sees chunks whose pointer is not
    /// written yet.
    writing: std::sync::Mutex<()>,
    /// Soft state (agents' reports, rewritten every second) not written yet: visible to reads at once, written
    /// with the next immediate batch or after [`SOFT_WRITE_EVERY`] (the `Durability::Soft` contract), so
    /// 10,000 agents reporting every second do not write etcd 10,000 times a second.
    soft: std::sync::Mutex<(Pending, Option<std::time::Instant>)>,
    /// etcd's revision after this store's last successful write.
    written: std::sync::atomic::AtomicI64,
    /// How long soft state may wait ([`SOFT_WRITE_EVERY`]; shorter in tests).
    soft_every: Duration,
}

/// Who writes through a store.
#[derive(Debug, Clone)]
enum Writer {
    /// One writer and no election (tests, tools).
    Single,
    /// The leader: every write is fenced by its election key.
    Leader(Fence),
    /// A standby replica: writes only its agents' reports, each cluster's key on its own (never a journal:
    /// the journal is the leader's).
    Replica,
}

/// Operations waiting to be written: key → the value to put, or None to delete.
type Pending = BTreeMap<String, Option<Vec<u8>>>;

/// How long soft state may wait for an immediate batch before it is written on its own.
pub const SOFT_WRITE_EVERY: Duration = Duration::from_secs(30);

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

fn hex12(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..12])
}

/// A batch's operations as bytes (length-prefixed), for the journal.
fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        let (tag, k, v): (u8, &str, &[u8]) = match op {
            Op::Put(k, v) => (b'P', k, v),
            Op::Delete(k) => (b'D', k, &[]),
        };
        out.push(tag);
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn decode_ops(mut b: &[u8]) -> Option<Vec<Op>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let tag = b[0];
        let klen = u32::from_le_bytes(b.get(1..5)?.try_into().ok()?) as usize;
        let k = std::str::from_utf8(b.get(5..5 + klen)?).ok()?.to_string();
        let at = 5 + klen;
        let vlen = u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?) as usize;
        let v = b.get(at + 8..at + 8 + vlen)?.to_vec();
        b = &b[at + 8 + vlen..];
        out.push(match tag {
            b'P' => Op::Put(k, v),
            b'D' => Op::Delete(k),
            _ => return None,
        });
    }
    Some(out)
}

impl EtcdStore {
    /// Opens the store; `fence`: writes succeed only while that election key is the one it names (None: a
    /// single writer with no election, for tests and tools). A pending journal is rolled forward first.
    pub fn open(cfg: &EtcdConfig, fence: Option<Fence>) -> Result<EtcdStore, StoreError> {
        let store = Self::connected(cfg, fence.map_or(Writer::Single, Writer::Leader))?;
        store
            .roll_forward()
            .map_err(|e| StoreError::OpenFailed { path: cfg.endpoints.join(","), source: Box::new(e) })?;
        Ok(store)
    }

    /// Opens the store without rolling a pending journal forward (a reader, for tests of what readers see).
    #[doc(hidden)]
    pub fn open_without_recovery(cfg: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        Self::connected(cfg, Writer::Single)
    }

    /// Opens the store for a standby replica: it reads everything and writes only agents' reports (the keys
    /// under `reports/`), until [`EtcdStore::promote`] makes it the leader's.
    pub fn open_replica(cfg: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        Self::connected(cfg, Writer::Replica)
    }

    /// This replica leads from now on: its writes are fenced by `fence`; a journal the previous leader left is
    /// rolled forward first.
    pub fn promote(&self, fence: Fence) -> Result<(), StoreError> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = Writer::Leader(fence);
        self.roll_forward()
    }

    /// This replica no longer leads: it writes only its agents' reports again.
    pub fn demote(&self) {
        *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = Writer::Replica;
        self.soft.lock().unwrap_or_else(|p| p.into_inner()).0.clear();
    }

    /// The etcd client and the fleet's prefix (for the replica's watch).
    pub fn client(&self) -> (Client, String) {
        (self.client.clone(), self.prefix.clone())
    }

    /// The value a watched `<prefix>/k/…` key holds (chunks gathered).
    pub fn resolve_value(&self, raw: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.resolve(raw)
    }

    /// The operations of the batch being applied, if one is (what readers overlay).
    pub fn pending_ops(&self) -> Result<Option<Vec<Op>>, StoreError> {
        Ok(self.pending()?.map(|(_, ops)| ops))
    }

    fn connected(cfg: &EtcdConfig, writer: Writer) -> Result<EtcdStore, StoreError> {
        let failed = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::OpenFailed {
            path: cfg.endpoints.join(","),
            source: e,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| failed(boxed(e)))?;
        let c = cfg.clone();
        let client = Self::wait(&rt, async move { c.connect().await }).map_err(|e| failed(boxed(e)))?;
        Ok(EtcdStore {
            client,
            prefix: cfg.prefix.clone(),
            writer: std::sync::Mutex::new(writer),
            rt: Some(rt),
            writing: Default::default(),
            soft: Default::default(),
            written: Default::default(),
            soft_every: SOFT_WRITE_EVERY,
        })
    }

    /// How long soft state may wait before it is written (tests shorten it).
    #[doc(hidden)]
    pub fn set_soft_every(&mut self, every: Duration) {
        self.soft_every = every;
    }

    /// Whether a batch is being applied (or was left half-applied).
    pub fn has_pending_journal(&self) -> Result<bool, StoreError> {
        Ok(self.pending()?.is_some())
    }

    /// Writes a batch's journal and flips it, but applies none of its keys: what a leader that dies at that
    /// moment leaves behind (for tests).
    #[doc(hidden)]
    pub fn commit_journal_only(&self, batch: Batch) -> Result<(), StoreError> {
        self.write_journal(&batch.0).map(|_| ())
    }

    /// The journal of `ops`: immutable parts, then the flip that makes the batch visible. Returns its sequence.
    fn write_journal(&self, ops: &[Op]) -> Result<String, StoreError> {
        let seq = format!("{:020}", crate::hub::now_ms());
        let bytes = encode_ops(ops);
        for (i, part) in bytes.chunks(MAX_VALUE).enumerate() {
            self.txn(vec![TxnOp::put(format!("{}/j/{seq}/{i:06}", self.prefix), part.to_vec(), None)])?;
        }
        let parts = bytes.len().div_ceil(MAX_VALUE);
        self.txn(vec![TxnOp::put(format!("{}/journal", self.prefix), format!("{seq} {parts}"), None)])?;
        Ok(seq)
    }

    /// Runs `fut` on the store's runtime and waits for it from any thread (a runtime's own threads included).
    fn wait<T: Send + 'static>(
        rt: &tokio::runtime::Runtime,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("the etcd store's runtime stopped")
    }

    fn run<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
        Self::wait(self.rt.as_ref().expect("the store's runtime lives until it is dropped"), fut)
    }

    fn data_key(&self, key: &str) -> String {
        format!("{}/k/{key}", self.prefix)
    }

    fn compares(&self) -> Vec<Compare> {
        match &*self.writer.lock().unwrap_or_else(|p| p.into_inner()) {
            Writer::Leader(f) => vec![Compare::create_revision(f.key.as_str(), CompareOp::Equal, f.create_revision)],
            Writer::Single | Writer::Replica => Vec::new(),
        }
    }

    /// One fenced transaction; an error when the fence does not hold.
    fn txn(&self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let n = ops.len();
        let txn = Txn::new().when(self.compares()).and_then(ops);
        let kv = self.kv();
        let resp = self.run(retrying(move || {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        }));
        match resp {
            Ok(r) if r.succeeded() => {
                let revision = r.header().map_or(0, |h| h.revision());
                self.written.fetch_max(revision, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
            Ok(_) => Err(StoreError::CommitFailed {
                ops: n,
                source: "fenced: this hub no longer holds the leader's election key (another replica leads)".into(),
            }),
            Err(e) => Err(StoreError::CommitFailed { ops: n, source: boxed(e) }),
        }
    }

    /// Writes `value` of `key`: inline, or as chunks first and a pointer to them. Returns the txn op that
    /// writes the key itself.
    fn value_op(&self, key: &str, value: &[u8]) -> Result<TxnOp, StoreError> {
        if value.len() <= MAX_VALUE && !value.starts_with(CHUNKED) {
            return Ok(TxnOp::put(self.data_key(key), value.to_vec(), None));
        }
        let dir = format!("{}/c/{}/{}", self.prefix, hex12(key.as_bytes()), hex12(value));
        let chunks: Vec<TxnOp> = value
            .chunks(MAX_VALUE)
            .enumerate()
            .map(|(i, c)| TxnOp::put(format!("{dir}/{i:06}"), c.to_vec(), None))
            .collect();
        let n = chunks.len();
        // One chunk per transaction: each is up to MAX_VALUE bytes.
        for op in chunks {
            self.txn(vec![op])?;
        }
        let mut pointer = CHUNKED.to_vec();
        pointer.extend_from_slice(format!("{dir} {n} {}", value.len()).as_bytes());
        Ok(TxnOp::put(self.data_key(key), pointer, None))
    }

    /// The value behind what `key` holds in etcd (chunks gathered).
    fn resolve(&self, raw: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let Some(rest) = raw.strip_prefix(CHUNKED) else { return Ok(raw) };
        let text = String::from_utf8_lossy(rest).to_string();
        let mut parts = text.split(' ');
        let (dir, n, len) = (parts.next().unwrap_or_default(), parts.next(), parts.next());
        let n: usize = n.and_then(|n| n.parse().ok()).unwrap_or(0);
        let len: usize = len.and_then(|n| n.parse().ok()).unwrap_or(0);
        let mut out = Vec::with_capacity(len);
        for (_, v) in self.raw_scan(&format!("{dir}/"))?.into_iter().take(n) {
            out.extend_from_slice(&v);
        }
        if out.len() != len {
            return Err(StoreError::ReadFailed {
                key: dir.to_string(),
                source: format!("a chunked value has {} of its {len} bytes", out.len()).into(),
            });
        }
        Ok(out)
    }

    /// The batch being applied, if one is: its operations.
    fn pending(&self) -> Result<Option<(String, Vec<Op>)>, StoreError> {
        let head = format!("{}/journal", self.prefix);
        let kv = self.kv();
        let h = head.clone();
        let resp = self
            .run(retrying(move || {
                let (mut kv, h) = (kv.clone(), h.clone());
                async move { kv.get(h, None).await }
            }))
            .map_err(|e| StoreError::ReadFailed { key: head.clone(), source: boxed(e) })?;
        let Some(kv0) = resp.kvs().first() else { return Ok(None) };
        let seq = String::from_utf8_lossy(kv0.value()).split(' ').next().unwrap_or_default().to_string();
        let dir = format!("{}/j/{seq}/", self.prefix);
        let mut bytes = Vec::new();
        for (_, part) in self.raw_scan(&dir)? {
            bytes.extend_from_slice(&part);
        }
        let ops = decode_ops(&bytes).ok_or_else(|| StoreError::ReadFailed {
            key: dir.clone(),
            source: "the pending journal cannot be read".into(),
        })?;
        Ok(Some((seq, ops)))
    }

    /// Applies a pending journal, then removes it.
    fn roll_forward(&self) -> Result<(), StoreError> {
        let Some((seq, ops)) = self.pending()? else { return Ok(()) };
        tracing::info!(seq = %seq, ops = ops.len(), "applying the batch a previous leader left half-applied");
        self.apply(&ops)?;
        self.finish_journal(&seq)
    }

    /// Writes `ops` in transactions of at most [`MAX_TXN_OPS`] (not atomic by itself: see `commit`).
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut txn_ops = Vec::with_capacity(MAX_TXN_OPS);
        let mut bytes = 0;
        for op in last_per_key(ops) {
            let size = match op {
                Op::Put(k, v) => k.len() + v.len().min(MAX_VALUE),
                Op::Delete(k) => k.len(),
            };
            if !txn_ops.is_empty() && (txn_ops.len() == MAX_TXN_OPS || bytes + size > MAX_VALUE) {
                self.txn(std::mem::take(&mut txn_ops))?;
                bytes = 0;
            }
            txn_ops.push(match op {
                Op::Put(k, v) => self.value_op(k, v)?,
                Op::Delete(k) => TxnOp::delete(self.data_key(k), None),
            });
            bytes += size;
        }
        if !txn_ops.is_empty() {
            self.txn(txn_ops)?;
        }
        Ok(())
    }

    fn finish_journal(&self, seq: &str) -> Result<(), StoreError> {
        let head = format!("{}/journal", self.prefix);
        let parts = format!("{}/j/{seq}/", self.prefix);
        self.txn(vec![
            TxnOp::delete(head, None),
            TxnOp::delete(parts, Some(etcd_client::DeleteOptions::new().with_prefix())),
        ])
    }

    /// Chunks no key points at any more (left by overwritten or deleted chunked values): deleted.
    pub fn collect_garbage(&self) -> Result<usize, StoreError> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let live: std::collections::HashSet<String> = self
            .raw_scan(&format!("{}/k/", self.prefix))?
            .into_iter()
            .filter_map(|(_, v)| {
                let rest = v.strip_prefix(CHUNKED)?;
                Some(String::from_utf8_lossy(rest).split(' ').next()?.to_string())
            })
            .collect();
        let chunks = self.raw_keys(&format!("{}/c/", self.prefix))?;
        let mut dead: Vec<String> = chunks
            .iter()
            .filter_map(|k| k.rsplit_once('/').map(|(d, _)| d.to_string()))
            .filter(|d| !live.contains(d))
            .collect();
        dead.dedup();
        for d in &dead {
            self.txn(vec![TxnOp::delete(format!("{d}/"), Some(etcd_client::DeleteOptions::new().with_prefix()))])?;
        }
        Ok(dead.len())
    }

    /// A kv client that takes answers as large as a page can be.
    fn kv(&self) -> etcd_client::KvClient {
        self.client.kv_client().max_decoding_message_size(PAGE_KEYS * (MAX_VALUE + 4096) + (1 << 20))
    }

    /// Every key under `prefix` with its value, read in pages of [`PAGE_KEYS`] (one answer for 10,000 keys
    /// would exceed any message limit).
    fn raw_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.paged(prefix, false)
    }

    fn raw_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.paged(prefix, true)?.into_iter().map(|(k, _)| k).collect())
    }

    fn paged(&self, prefix: &str, keys_only: bool) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            let kv = self.kv();
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE_KEYS as i64);
            if keys_only {
                opts = opts.with_keys_only();
            }
            let start = from.clone();
            let resp = self
                .run(retrying(move || {
                    let (mut kv, start, opts) = (kv.clone(), start.clone(), opts.clone());
                    async move { kv.get(start, Some(opts)).await }
                }))
                .map_err(|e| StoreError::ReadFailed { key: format!("{prefix}*"), source: boxed(e) })?;
            let kvs = resp.kvs();
            out.extend(kvs.iter().map(|kv| (String::from_utf8_lossy(kv.key()).to_string(), kv.value().to_vec())));
            match kvs.last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// The journal's operations on keys under `prefix`, for readers to overlay.
    fn overlay(&self, prefix: &str) -> Result<BTreeMap<String, Option<Vec<u8>>>, StoreError> {
        let mut out = BTreeMap::new();
        if let Some((_, ops)) = self.pending()? {
            for op in ops {
                match op {
                    Op::Put(k, v) if k.starts_with(prefix) => {
                        out.insert(k, Some(v));
                    }
                    Op::Delete(k) if k.starts_with(prefix) => {
                        out.insert(k, None);
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// The size of etcd's database file (all prefixes, history included), as the member it asks reports it.
    pub fn db_size(&self) -> Result<i64, StoreError> {
        let mut m = self.client.maintenance_client();
        let status = self
            .run(async move { m.status().await })
            .map_err(|e| StoreError::ReadFailed { key: "status".into(), source: boxed(e) })?;
        Ok(status.db_size())
    }

    /// Bytes stored under the prefix, and the number of keys: for the size benchmark.
    pub fn size(&self) -> Result<(usize, usize), StoreError> {
        let all = self.raw_scan(&format!("{}/", self.prefix))?;
        Ok((all.len(), all.iter().map(|(k, v)| k.len() + v.len()).sum()))
    }

    /// Keys and bytes per key family (`desired`, `reports`, `rollout-data`, …: a chunked value counted whole
    /// under its own key's family; `chunks` then says what its chunks take), for the size benchmark.
    pub fn sizes(&self) -> Result<BTreeMap<String, (usize, usize)>, StoreError> {
        let root = format!("{}/", self.prefix);
        let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (k, v) in self.raw_scan(&root)? {
            let rest = k.strip_prefix(&root).unwrap_or(&k);
            let (family, size) = match rest.split_once('/') {
                Some(("k", key)) => {
                    let len = match v.strip_prefix(CHUNKED) {
                        Some(p) => {
                            String::from_utf8_lossy(p).split(' ').nth(2).and_then(|n| n.parse().ok()).unwrap_or(0)
                        }
                        None => v.len(),
                    };
                    (key.split('/').next().unwrap_or(key).to_string(), key.len() + len)
                }
                Some(("c", _)) => ("chunks".to_string(), rest.len() + v.len()),
                Some(("j", _)) => ("journal".to_string(), rest.len() + v.len()),
                Some((top, _)) => (top.to_string(), rest.len() + v.len()),
                None => (rest.to_string(), rest.len() + v.len()),
            };
            let e = out.entry(family).or_default();
            e.0 += 1;
            e.1 += size;
        }
        Ok(out)
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.soft.lock().unwrap_or_else(|p| p.into_inner()).0.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.overlay(key)?.remove(key) {
            return Ok(v);
        }
        let kv = self.kv();
        let k = self.data_key(key);
        let resp = self
            .run(retrying(move || {
                let (mut kv, k) = (kv.clone(), k.clone());
                async move { kv.get(k, None).await }
            }))
            .map_err(|e| StoreError::ReadFailed { key: key.into(), source: boxed(e) })?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some(self.resolve(kv.value().to_vec())?)),
            None => Ok(None),
        }
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let strip = format!("{}/k/", self.prefix);
        let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (k, v) in self.raw_scan(&self.data_key(prefix))? {
            let key = k.strip_prefix(&strip).unwrap_or(&k).to_string();
            out.insert(key, self.resolve(v)?);
        }
        let soft: Vec<(String, Option<Vec<u8>>)> = {
            let buffered = self.soft.lock().unwrap_or_else(|p| p.into_inner());
            buffered
                .0
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in self.overlay(prefix)?.into_iter().chain(soft) {
            match v {
                Some(v) => out.insert(k, v),
                None => out.remove(&k),
            };
        }
        Ok(out.into_iter().collect())
    }

    fn revision(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::SeqCst).max(0) as u64
    }

    fn flush_soft(&self) -> Result<(), StoreError> {
        let due = self.soft.lock().unwrap_or_else(|p| p.into_inner()).1.is_some_and(|t| t.elapsed() >= self.soft_every);
        if due {
            // An empty immediate batch: what waits goes with it.
            self.commit(Batch::default())?;
        }
        Ok(())
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*self.writer.lock().unwrap_or_else(|p| p.into_inner()), Writer::Replica) {
            return self.commit_reports(batch);
        }
        let ops = {
            let mut soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
            let is_soft = batch.1 == crate::store::Durability::Soft;
            let mut own = batch.0;
            if is_soft {
                for op in std::mem::take(&mut own) {
                    match op {
                        Op::Put(k, v) => soft.0.insert(k, Some(v)),
                        Op::Delete(k) => soft.0.insert(k, None),
                    };
                }
                let since = *soft.1.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() < self.soft_every {
                    return Ok(());
                }
            }
            // The soft state waiting goes first; this batch's own operations win over it.
            let mut ops: Vec<Op> = std::mem::take(&mut soft.0)
                .into_iter()
                .map(|(k, v)| match v {
                    Some(v) => Op::Put(k, v),
                    None => Op::Delete(k),
                })
                .collect();
            soft.1 = None;
            ops.extend(own);
            ops
        };
        let written = self.write_ops(&ops);
        if written.is_err() {
            // Kept for the next attempt (the hub's state still has it).
            let mut soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
            for op in &ops {
                if let Op::Put(k, v) = op {
                    soft.0.entry(k.clone()).or_insert_with(|| Some(v.clone()));
                }
            }
        }
        written
    }
}

impl EtcdStore {
    /// A standby's write: agents' reports (at once: the leader waits for them) and its audit records, each key on
    /// its own.
    fn commit_reports(&self, batch: Batch) -> Result<(), StoreError> {
        let reports = crate::keys::Prefix::Report.as_str();
        // And its own audit records (keys no other replica writes; only the leader removes old ones).
        let audit = crate::keys::Prefix::Audit.as_str();
        if let Some(op) = batch.0.iter().find(|op| {
            !matches!(op, Op::Put(k, _) | Op::Delete(k) if k.starts_with(reports))
                && !matches!(op, Op::Put(k, _) if k.starts_with(audit))
        }) {
            let key = match op {
                Op::Put(k, _) | Op::Delete(k) => k,
            };
            return Err(StoreError::CommitFailed {
                ops: batch.0.len(),
                source: format!("a standby replica writes only agents' reports, not {key} (only the leader does)")
                    .into(),
            });
        }
        self.apply(&batch.0)
    }

    fn write_ops(&self, ops: &[Op]) -> Result<(), StoreError> {
        // Bytes the keys' own transaction carries (values over MAX_VALUE become small pointers).
        let inline: usize = ops
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => k.len() + if v.len() <= MAX_VALUE { v.len() } else { 128 },
                Op::Delete(k) => k.len(),
            })
            .sum();
        if ops.len() <= MAX_TXN_OPS && inline <= MAX_VALUE {
            // One transaction: atomic by itself (large values' chunks are written first).
            return self.apply(ops);
        }
        // The journal: immutable parts, then the flip that makes the batch visible, then the keys.
        let seq = self.write_journal(ops)?;
        self.apply(ops)?;
        self.finish_journal(&seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_named_twice_in_a_batch_is_written_once_with_its_last_operation() {
        let ops = vec![
            Op::Put("reports/a".into(), b"old".to_vec()),
            Op::Put("desired/a".into(), b"d".to_vec()),
            Op::Put("reports/a".into(), b"new".to_vec()),
            Op::Put("reports/b".into(), b"b".to_vec()),
            Op::Delete("reports/b".into()),
        ];
        let kept = last_per_key(&ops);
        assert_eq!(kept.len(), 3);
        assert!(kept.contains(&&Op::Put("reports/a".into(), b"new".to_vec())));
        assert!(kept.contains(&&Op::Delete("reports/b".into())));
    }

    #[test]
    fn journal_ops_round_trip() {
        let ops = vec![Op::Put("a".into(), vec![1, 2, 3]), Op::Delete("b/c".into()), Op::Put("é".into(), vec![])];
        assert_eq!(decode_ops(&encode_ops(&ops)), Some(ops));
        assert_eq!(decode_ops(&[b'X', 0, 0, 0, 0]), None);
    }

    #[test]
    fn urls_name_endpoints_and_prefixes_are_checked() {
        let c = EtcdConfig::parse("etcd://127.0.0.1:2379,10.0.0.2:2379", "/flotilla/prod/", None).unwrap();
        assert_eq!(c.endpoints, vec!["http://127.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(c.prefix, "/flotilla/prod");
        assert!(EtcdConfig::parse("http://x", "/p", None).is_err());
        assert!(EtcdConfig::parse("etcd://x:1", "p", None).is_err());
        assert!(EtcdConfig::parse("etcd://", "/p", None).is_err());
    }
}
