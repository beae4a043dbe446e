//! The document index: doc key → where its current state is in the log.
//!
//! It lives in memory and is rebuilt from the log when the store opens, as
//! etcd keeps its key index. That is what lets a change be one insert (its
//! log record) and a pull be one scan of the log. Besides the map the index
//! keeps the set of current seqs as a compressed bitmap: a reader scanning
//! the log in seq order asks "is this record current?" of neighbouring bits
//! rather than of a hash table scattered over memory (that lookup was the
//! largest single cost of a pull). It costs about 150 bytes of memory per
//! document (measured with a million).
//!
//! Only the writer changes it, after a commit is durable and before the
//! commit is published, so a reader bounded by the published head never sees
//! the index behind the log.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use roaring::RoaringTreemap;

use super::{
    codec::Record,
    error::StoreError,
    keys::{self, DocKey},
    model::{Seq, Version},
};

/// Where a document's current state is, and what the writer needs to know
/// about it without reading the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Seq of the current state's record.
    pub seq: Seq,
    /// Its version.
    pub version: Version,
    /// Whether it is a tombstone.
    pub deleted: bool,
}

/// A map keyed by document. Keys are chosen by clients: foldhash's random
/// per-process seed keeps collisions from being crafted, at a fraction of
/// SipHash's cost (SipHash was most of the index's time on the writer).
pub type DocMap<V> = HashMap<DocKey, V, foldhash::fast::RandomState>;

/// An [`Entry`] as the index keeps it: 16 bytes instead of 24, with the
/// tombstone flag in the version's top bit (versions never get near it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed {
    /// [`Entry::seq`].
    seq: u64,
    /// [`Entry::version`], with [`Entry::deleted`] as bit 63.
    version: u64,
}

const DELETED: u64 = 1 << 63;

impl From<Entry> for Packed {
    fn from(e: Entry) -> Self {
        Self {
            seq: e.seq.0,
            version: e.version.0 | if e.deleted { DELETED } else { 0 },
        }
    }
}

impl From<Packed> for Entry {
    fn from(p: Packed) -> Self {
        Self {
            seq: Seq(p.seq),
            version: Version(p.version & !DELETED),
            deleted: p.version & DELETED != 0,
        }
    }
}

/// A cheap `Clone` handle to the shared index.
#[derive(Clone, Default)]
pub struct Index(Arc<RwLock<Inner>>);

#[derive(Default)]
struct Inner {
    /// Each document's current state.
    docs: DocMap<Packed>,
    /// The seqs of current states: the `seq`s of `docs`.
    live: RoaringTreemap,
    /// How many of `docs` are tombstones (for metrics, kept as it changes
    /// so a scrape never walks the index).
    tombstones: usize,
}

impl Inner {
    fn set(&mut self, key: DocKey, entry: Entry) {
        let packed = Packed::from(entry);
        if let Some(old) = self.docs.insert(key, packed) {
            self.live.remove(old.seq);
            self.tombstones -= usize::from(old.version & DELETED != 0);
        }
        self.tombstones += usize::from(entry.deleted);
        self.live.insert(entry.seq.0);
    }
}

impl Index {
    /// Builds the index from every record of the log: the last record of
    /// each document (in seq order) is its current state.
    pub fn rebuild(log: &sled::Tree) -> Result<Self, StoreError> {
        let mut inner = Inner::default();
        for entry in log.iter() {
            let (seq, bytes) = entry?;
            let seq = parse_seq(&seq)?;
            let record = Record::parse(&bytes)?;
            if record.version.0 & DELETED != 0 {
                return Err(StoreError::corrupt(
                    keys::LOG,
                    format!("version overflow at {seq}"),
                ));
            }
            let entry = Entry {
                seq,
                version: record.version,
                deleted: record.deleted,
            };
            match inner.docs.get_mut(record.key()) {
                Some(current) => {
                    inner.live.remove(current.seq);
                    inner.tombstones -= usize::from(current.version & DELETED != 0);
                    *current = entry.into();
                }
                None => {
                    inner
                        .docs
                        .insert(DocKey::from_stored(record.key()), entry.into());
                }
            }
            inner.live.insert(seq.0);
            inner.tombstones += usize::from(entry.deleted);
        }
        inner.docs.shrink_to_fit();
        Ok(Self(Arc::new(RwLock::new(inner))))
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current state of a document, if it has one.
    pub fn get(&self, key: &[u8]) -> Option<Entry> {
        self.read().docs.get(key).copied().map(Entry::from)
    }

    /// Whether the record at `seq` is its document's current state.
    pub fn is_current(&self, seq: Seq) -> bool {
        self.read().live.contains(seq.0)
    }

    /// Records committed changes (in seq order).
    pub fn apply(&self, changes: impl IntoIterator<Item = (DocKey, Entry)>) {
        let mut inner = self.write();
        for (key, entry) in changes {
            inner.set(key, entry);
        }
    }

    /// Forgets purged documents.
    pub fn remove<'a>(&self, purged: impl IntoIterator<Item = &'a DocKey>) {
        let mut inner = self.write();
        for key in purged {
            if let Some(old) = inner.docs.remove(key) {
                inner.live.remove(old.seq);
                inner.tombstones -= usize::from(old.version & DELETED != 0);
            }
        }
    }

    /// How many documents (tombstones included) it holds.
    pub fn len(&self) -> usize {
        self.read().docs.len()
    }

    /// How many documents it holds, and how many of them are tombstones.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.docs.len(), inner.tombstones)
    }

    /// Whether it holds no document.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A [`keys::LOG`] key.
pub fn parse_seq(bytes: &[u8]) -> Result<Seq, StoreError> {
    keys::parse_u64(bytes)
        .map(Seq)
        .ok_or_else(|| StoreError::corrupt(keys::LOG, "bad seq key"))
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, atomic::AtomicU64, atomic::Ordering},
        time::Duration,
    };

    use serde_json::json;

    use super::*;
    use crate::store::{
        Options, Store,
        compaction::Retention,
        model::{Op, PushBatch},
        testing,
    };

    fn push(id: &str, op: Op) -> PushBatch {
        testing::batch(vec![testing::mutation(id, op)])
    }

    #[test]
    fn entries_pack_into_16_bytes_and_back() {
        assert_eq!(std::mem::size_of::<Packed>(), 16);
        for (version, deleted) in [(1, false), (7, true), (DELETED - 1, true)] {
            let entry = Entry {
                seq: Seq(42),
                version: Version(version),
                deleted,
            };
            assert_eq!(Entry::from(Packed::from(entry)), entry);
        }
    }

    /// The index's entries in seq order; checks that the live set is
    /// exactly their seqs.
    fn snapshot(store: &Store) -> Vec<(DocKey, Entry)> {
        let inner = store.shared.index.read();
        let mut entries: Vec<_> = inner
            .docs
            .iter()
            .map(|(k, e)| (k.clone(), Entry::from(*e)))
            .collect();
        entries.sort_by_key(|(_, e)| e.seq);
        let seqs: Vec<u64> = entries.iter().map(|(_, e)| e.seq.0).collect();
        assert_eq!(inner.live.iter().collect::<Vec<_>>(), seqs);
        entries
    }

    /// Rule: the index rebuilt from the log at open is the index the writer
    /// kept: updates, deletes and a document purged and created again (its
    /// old life must not come back) included.
    #[tokio::test]
    async fn the_rebuilt_index_is_the_one_kept_live() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = Arc::new(AtomicU64::new(0));
        let options = || Options {
            clock: crate::store::offset_clock(ahead.clone()),
            ..Default::default()
        };
        let store = Store::open(dir.path(), options()).unwrap();
        let put = |n: i64| Op::Put(json!({ "n": n }).as_object().unwrap().clone().into());
        for (id, op) in [
            ("a", put(1)),
            ("b", put(1)),
            ("a", put(2)),
            ("gone", put(1)),
            ("gone", Op::Delete),
            ("b", Op::Delete),
        ] {
            store.push(push(id, op)).await.unwrap();
        }
        ahead.store(3 * 3600, Ordering::Relaxed);
        let retention = Retention {
            history: Duration::from_secs(3600),
            max_versions: 10,
            tombstones: Duration::from_secs(3600),
            clients: Duration::from_secs(3600),
            batch: 100,
        };
        let report = store.compact(&retention).await.unwrap();
        assert_eq!(report.removed.tombstones, 2, "b and gone are purged");
        store.push(push("gone", put(7))).await.unwrap();
        let live = snapshot(&store);
        let gone = DocKey::new("c", "gone").unwrap();
        let entry = live.iter().find(|(k, _)| *k == gone).unwrap().1;
        // A new life starts above the purge horizon (6): no version reused.
        assert_eq!((entry.version, entry.seq), (Version(7), Seq(7)));
        store.close().await;
        drop(store);

        let store = testing::reopen(|| Store::open(dir.path(), options()));
        assert_eq!(snapshot(&store), live);
        store.close().await;
    }
}
