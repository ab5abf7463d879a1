//! The hub's durable state behind one small trait: a key-value map with prefix scans and atomic batches,
//! which both an embedded database (redb, the default) and etcd (for HA, later) provide. A batch is all or
//! nothing, so a crash never leaves half of a change behind.

use redb::ReadableDatabase;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store at {path} failed")]
    OpenFailed {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading {key:?} from the store failed")]
    ReadFailed {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("committing {ops} change(s) to the store failed")]
    CommitFailed {
        ops: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// Changes applied together or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch(pub Vec<Op>, pub Durability);

/// How soon a committed batch must be on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// On disk when the commit returns.
    #[default]
    Immediate,
    /// Soft state the hub can get again (agents' reports: every agent resends its whole status when it
    /// reconnects): visible at once, on disk with the next immediate commit; a crash may lose it.
    Soft,
}

impl Batch {
    /// The same changes as soft state (see [`Durability::Soft`]).
    pub fn soft(mut self) -> Self {
        self.1 = Durability::Soft;
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.0.push(Op::Put(key.into(), value.into()));
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.0.push(Op::Delete(key.into()));
        self
    }
}

pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The keys starting with `prefix`, in key order, without their values.
    fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.scan(prefix)?.into_iter().map(|(k, _)| k).collect())
    }
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;
    /// The store's revision after this store's last write (etcd's; 0 for stores without one).
    fn revision(&self) -> u64 {
        0
    }
    /// Writes soft state that has waited its longest, when no immediate commit took it along (the etcd store
    /// holds it in memory, where other replicas cannot see it). The hub calls it every few seconds.
    fn flush_soft(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A store in memory that can be told to fail its next commits: for tests of what a failed commit leaves.
#[derive(Default)]
pub struct MemStore {
    map: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    /// Commits to refuse before the next one succeeds.
    pub fail_commits: std::sync::atomic::AtomicUsize,
}

impl Store for MemStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned())
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self.fail_commits.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(StoreError::CommitFailed {
                ops: batch.0.len(),
                source: "the disk is full (a test's failure)".into(),
            });
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for op in batch.0 {
            match op {
                Op::Put(k, v) => {
                    map.insert(k, v);
                }
                Op::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
        Ok(())
    }
}

const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("flotilla");

/// The embedded store: one redb file.
pub struct RedbStore {
    db: redb::Database,
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let err = |e| StoreError::OpenFailed { path: path.display().to_string(), source: e };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(boxed(e)))?;
        }
        let db = redb::Database::create(path).map_err(|e| err(boxed(e)))?;
        // The store holds reports and bundles (Secrets among them): readable by the hub's user only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| err(boxed(e)))?;
        }
        // Create the table up front so reads never meet a missing table.
        let txn = db.begin_write().map_err(|e| err(boxed(e)))?;
        txn.open_table(TABLE).map_err(|e| err(boxed(e)))?;
        txn.commit().map_err(|e| err(boxed(e)))?;
        Ok(RedbStore { db })
    }
}

impl RedbStore {
    /// Every entry under `prefix`, in key order, as `f` makes it (nothing is copied that `f` does not take).
    fn range<T>(&self, prefix: &str, f: impl Fn(&str, &[u8]) -> T) -> Result<Vec<T>, StoreError> {
        let err = |e| StoreError::ReadFailed { key: format!("{prefix}*"), source: e };
        let txn = self.db.begin_read().map_err(|e| err(boxed(e)))?;
        let table = txn.open_table(TABLE).map_err(|e| err(boxed(e)))?;
        let mut out = Vec::new();
        for item in table.range(prefix..).map_err(|e| err(boxed(e)))? {
            let (k, v) = item.map_err(|e| err(boxed(e)))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push(f(k.value(), v.value()));
        }
        Ok(out)
    }
}

impl Store for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let err = |e| StoreError::ReadFailed { key: key.to_string(), source: e };
        let txn = self.db.begin_read().map_err(|e| err(boxed(e)))?;
        let table = txn.open_table(TABLE).map_err(|e| err(boxed(e)))?;
        let v = table.get(key).map_err(|e| err(boxed(e)))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.range(prefix, |k, v| (k.to_string(), v.to_vec()))
    }

    fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.range(prefix, |k, _| k.to_string())
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let ops = batch.0.len();
        let err = |e| StoreError::CommitFailed { ops, source: e };
        let mut txn = self.db.begin_write().map_err(|e| err(boxed(e)))?;
        if batch.1 == Durability::Soft {
            txn.set_durability(redb::Durability::None).map_err(|e| err(boxed(e)))?;
        }
        {
            let mut table = txn.open_table(TABLE).map_err(|e| err(boxed(e)))?;
            for op in &batch.0 {
                match op {
                    Op::Put(k, v) => {
                        table.insert(k.as_str(), v.as_slice()).map_err(|e| err(boxed(e)))?;
                    }
                    Op::Delete(k) => {
                        table.remove(k.as_str()).map_err(|e| err(boxed(e)))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| err(boxed(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn put_get_scan_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            assert_eq!(s.get("a").unwrap(), None);
            s.commit(Batch::default().put("clusters/eu-1", "x").put("clusters/eu-2", "y").put("other", "z")).unwrap();
            assert_eq!(s.get("clusters/eu-1").unwrap().as_deref(), Some(&b"x"[..]));
            let keys: Vec<String> = s.scan("clusters/").unwrap().into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys, vec!["clusters/eu-1", "clusters/eu-2"]);
            s.commit(Batch::default().delete("clusters/eu-1")).unwrap();
        }
        // A restarted hub sees exactly what was committed.
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.get("clusters/eu-1").unwrap(), None);
        assert_eq!(s.get("clusters/eu-2").unwrap().as_deref(), Some(&b"y"[..]));
        assert_eq!(s.scan("").unwrap().len(), 2);
    }

    #[derive(Debug, Clone)]
    enum ModelOp {
        Put(u8, u8),
        Delete(u8),
    }

    fn op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![(0u8..8, any::<u8>()).prop_map(|(k, v)| ModelOp::Put(k, v)), (0u8..8).prop_map(ModelOp::Delete)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// The store behaves like an ordered map, batch by batch.
        #[test]
        fn behaves_like_an_ordered_map(batches in proptest::collection::vec(proptest::collection::vec(op(), 0..6), 0..6)) {
            let dir = tempfile::tempdir().unwrap();
            let s = RedbStore::open(&dir.path().join("m.redb")).unwrap();
            let mut model = BTreeMap::new();
            for ops in batches {
                let mut b = Batch::default();
                for o in ops {
                    match o {
                        ModelOp::Put(k, v) => { model.insert(format!("k/{k}"), vec![v]); b = b.put(format!("k/{k}"), vec![v]); }
                        ModelOp::Delete(k) => { model.remove(&format!("k/{k}")); b = b.delete(format!("k/{k}")); }
                    }
                }
                s.commit(b).unwrap();
                let got: BTreeMap<String, Vec<u8>> = s.scan("k/").unwrap().into_iter().collect();
                prop_assert_eq!(&got, &model);
            }
        }
    }
}
