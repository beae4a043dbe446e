//! The local store's sled layout: the only place its keys are built and its
//! values encoded.
//!
//! | tree        | key                                   | value                          |
//! |-------------|---------------------------------------|--------------------------------|
//! | `meta`      | `format`, `config`, `checkpoint`, `next_mutation_id` | u32 BE, JSON, JSON, u64 BE |
//! | `base`      | `collection \0 id`                    | [`BaseDoc`] (JSON)             |
//! | `outbox`    | mutation id (u64 BE)                  | [`Entry`] (JSON)               |
//! | `by_doc`    | `collection \0 id \0` mutation id (u64 BE) | empty: the outbox by document |
//! | `conflicts` | `collection \0 id`                    | [`ConflictRecord`] (JSON)      |
//!
//! The outbox is keyed by mutation id, so its order is both the order the
//! writes were made in and the order their ids are sent in. Collections are
//! `[A-Za-z0-9_.-]` and ids have no control characters, so `\0` separates
//! them without ambiguity. Every change goes through [`Store::commit`]: one
//! sled transaction over all trees (a pure closure over a precomputed
//! [`Plan`], since sled may retry it), then a flush, so a change is durable
//! when it returns.

use std::{collections::BTreeMap, path::Path, time::SystemTime};

use serde::{Deserialize, Serialize};
use sled::{
    Transactional, Tree,
    transaction::{ConflictableTransactionError, TransactionError},
};

use super::{ReplicaError, Resolver};
use crate::client::{Body, Checkpoint, Document};

/// The layout version written at init; an unknown one is refused.
const FORMAT: u32 = 1;

const META_FORMAT: &[u8] = b"format";
const META_CONFIG: &[u8] = b"config";
const META_CHECKPOINT: &[u8] = b"checkpoint";
const META_NEXT_ID: &[u8] = b"next_mutation_id";

/// What `init` fixes and `open` reads back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaConfig {
    /// The client id every mutation id of this replica is counted under:
    /// generated at init, never shared with another replica.
    pub client_id: String,
    /// Server URLs, tried in order (the client library's failover).
    pub endpoints: Vec<String>,
    /// The replicated collections and how each one's conflicts are settled.
    pub collections: BTreeMap<String, Resolver>,
}

/// The stored checkpoint: where the next Pull resumes, with what the server
/// wants back with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredCheckpoint {
    /// Every change with seq <= this is in the base.
    pub seq: u64,
    /// The store the base came from (empty before the first pull).
    pub store_id: String,
    /// The purge horizon `seq` is consistent with.
    pub purge_horizon: u64,
    /// The epoch `seq` was committed in.
    pub epoch: u64,
}

impl From<&StoredCheckpoint> for Checkpoint {
    fn from(c: &StoredCheckpoint) -> Self {
        Checkpoint {
            seq: c.seq,
            store_id: c.store_id.clone(),
            purge_horizon: c.purge_horizon,
            epoch: c.epoch,
        }
    }
}

impl From<&Checkpoint> for StoredCheckpoint {
    fn from(c: &Checkpoint) -> Self {
        Self {
            seq: c.seq,
            store_id: c.store_id.clone(),
            purge_horizon: c.purge_horizon,
            epoch: c.epoch,
        }
    }
}

/// A document as the server last sent it (from a Pull or a Push answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseDoc {
    /// The server's version.
    pub version: u64,
    /// Seq of its latest change: a newer answer has a higher seq.
    pub seq: u64,
    /// True for a tombstone.
    pub deleted: bool,
    /// The body; `None` for a tombstone.
    pub body: Option<Body>,
    /// Server time of its latest change.
    pub updated_at: Option<SystemTime>,
    /// Client id (or principal) of its latest change.
    pub updated_by: String,
}

impl BaseDoc {
    /// The base form of a server document.
    pub fn from_document(d: &Document) -> Self {
        Self {
            version: d.version,
            seq: d.seq,
            deleted: d.deleted,
            body: d.body.clone(),
            updated_at: d.updated_at,
            updated_by: d.updated_by.clone(),
        }
    }

    /// The client library's form.
    pub fn to_document(&self, collection: &str, id: &str) -> Document {
        Document {
            collection: collection.to_owned(),
            id: id.to_owned(),
            version: self.version,
            seq: self.seq,
            deleted: self.deleted,
            body: self.body.clone(),
            updated_at: self.updated_at,
            updated_by: self.updated_by.clone(),
        }
    }

    /// The live body, if any.
    pub fn live_body(&self) -> Option<&Body> {
        if self.deleted {
            None
        } else {
            self.body.as_ref()
        }
    }
}

/// The change a local write makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocalOp {
    /// Replace the body.
    Put(Body),
    /// Merge top-level fields; a null removes the field.
    Patch(Body),
    /// Make the document a tombstone.
    Delete,
}

/// One outbox entry: a local write waiting for the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Collection of the document.
    pub collection: String,
    /// Id of the document.
    pub id: String,
    /// The change.
    pub op: LocalOp,
    /// The server version this write is based on (0: the document did not
    /// exist). Moved to the version an earlier pending write of the same
    /// document produced once that one is acknowledged.
    pub base_version: u64,
    /// The body at `base_version` (the common ancestor shown with a
    /// conflict); `None` when there was none (no document, a tombstone) or
    /// it is unknown (an answer without its body).
    pub ancestor: Option<Body>,
    /// How a conflict of this write is settled.
    pub resolver: Resolver,
}

impl Entry {
    /// About what the entry takes in a push request: its ids and its body
    /// as JSON (a protobuf `Struct` is of the same order).
    pub fn encoded_len(&self) -> usize {
        /// Counts bytes written.
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        if let LocalOp::Put(body) | LocalOp::Patch(body) = &self.op {
            // Writing into a counter cannot fail; a map always serializes.
            let _ = serde_json::to_writer(&mut count, body);
        }
        self.collection.len() + self.id.len() + count.0
    }
}

/// A pending write that the server answered CONFLICT and that waits for
/// [`LocalReplica::resolve`](super::LocalReplica::resolve); the write
/// itself stays in the outbox (held: neither it nor later writes of the
/// same document are sent until it is resolved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// The outbox entry that conflicted.
    pub mutation_id: u64,
    /// The server's version when it answered CONFLICT.
    pub server_version: u64,
    /// The top-level fields both sides changed, as the server listed them.
    pub conflicting_fields: Vec<String>,
}

/// A document's (collection, id).
pub type DocName = (String, String);

/// The base key of a document: `collection \0 id`.
pub fn doc_key(collection: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(collection.len() + id.len() + 1);
    k.extend_from_slice(collection.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The prefix of every base key of a collection.
fn collection_prefix(collection: &str) -> Vec<u8> {
    let mut k = collection.as_bytes().to_vec();
    k.push(0);
    k
}

/// The prefix of a document's `by_doc` keys: `collection \0 id \0`.
fn by_doc_prefix(collection: &str, id: &str) -> Vec<u8> {
    let mut k = doc_key(collection, id);
    k.push(0);
    k
}

/// A `by_doc` key.
pub fn by_doc_key(collection: &str, id: &str, mutation_id: u64) -> Vec<u8> {
    let mut k = by_doc_prefix(collection, id);
    k.extend_from_slice(&mutation_id.to_be_bytes());
    k
}

/// An outbox key.
pub fn outbox_key(mutation_id: u64) -> [u8; 8] {
    mutation_id.to_be_bytes()
}

/// Splits a base or conflicts key into (collection, id).
fn split_doc_key(key: &[u8]) -> Result<(String, String), ReplicaError> {
    let bad = || ReplicaError::Corrupt(format!("bad document key {key:?}"));
    let at = key.iter().position(|b| *b == 0).ok_or_else(bad)?;
    let collection = std::str::from_utf8(&key[..at]).map_err(|_| bad())?;
    let id = std::str::from_utf8(&key[at + 1..]).map_err(|_| bad())?;
    Ok((collection.to_owned(), id.to_owned()))
}

/// The mutation id at the end of an outbox or `by_doc` key.
fn trailing_id(key: &[u8]) -> Result<u64, ReplicaError> {
    let tail = key
        .len()
        .checked_sub(8)
        .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
        .ok_or_else(|| ReplicaError::Corrupt(format!("bad mutation id key {key:?}")))?;
    Ok(u64::from_be_bytes(tail))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Only maps with string keys and plain data: serialization cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, ReplicaError> {
    serde_json::from_slice(bytes).map_err(|e| ReplicaError::Corrupt(format!("{what}: {e}")))
}

/// Which tree a planned change goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeId {
    /// `meta`.
    Meta,
    /// `base`.
    Base,
    /// `outbox`.
    Outbox,
    /// `by_doc`.
    ByDoc,
    /// `conflicts`.
    Conflicts,
}

/// Changes to commit together: built from reads outside the transaction
/// (under the replica's write lock), applied by a pure closure.
#[derive(Debug, Default)]
pub struct Plan {
    /// (tree, key, new value or `None` to remove), in order.
    changes: Vec<(TreeId, Vec<u8>, Option<Vec<u8>>)>,
}

impl Plan {
    fn set(&mut self, tree: TreeId, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.changes.push((tree, key.into(), Some(value)));
    }

    fn remove(&mut self, tree: TreeId, key: impl Into<Vec<u8>>) {
        self.changes.push((tree, key.into(), None));
    }

    /// Puts `entry` in the outbox under `mutation_id`.
    pub fn put_entry(&mut self, mutation_id: u64, entry: &Entry) {
        self.set(TreeId::Outbox, outbox_key(mutation_id), encode(entry));
        self.set(
            TreeId::ByDoc,
            by_doc_key(&entry.collection, &entry.id, mutation_id),
            Vec::new(),
        );
    }

    /// Takes the entry under `mutation_id` out of the outbox.
    pub fn remove_entry(&mut self, mutation_id: u64, entry: &Entry) {
        self.remove(TreeId::Outbox, outbox_key(mutation_id));
        self.remove(
            TreeId::ByDoc,
            by_doc_key(&entry.collection, &entry.id, mutation_id),
        );
    }

    /// Sets a document of the base.
    pub fn put_base(&mut self, collection: &str, id: &str, doc: &BaseDoc) {
        self.set(TreeId::Base, doc_key(collection, id), encode(doc));
    }

    /// Removes a document from the base.
    pub fn remove_base(&mut self, collection: &str, id: &str) {
        self.remove(TreeId::Base, doc_key(collection, id));
    }

    /// Parks a conflict.
    pub fn put_conflict(&mut self, collection: &str, id: &str, c: &ConflictRecord) {
        self.set(TreeId::Conflicts, doc_key(collection, id), encode(c));
    }

    /// Clears a parked conflict.
    pub fn remove_conflict(&mut self, collection: &str, id: &str) {
        self.remove(TreeId::Conflicts, doc_key(collection, id));
    }

    /// Sets the next unused mutation id.
    pub fn set_next_id(&mut self, next: u64) {
        self.set(TreeId::Meta, META_NEXT_ID, next.to_be_bytes().to_vec());
    }

    /// Sets the checkpoint.
    pub fn set_checkpoint(&mut self, c: &StoredCheckpoint) {
        self.set(TreeId::Meta, META_CHECKPOINT, encode(c));
    }

    /// Sets the configuration.
    pub fn set_config(&mut self, c: &ReplicaConfig) {
        self.set(TreeId::Meta, META_CONFIG, encode(c));
    }

    /// True when nothing is planned.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// The local store: a sled database with one tree per keyspace.
#[derive(Debug)]
pub struct Store {
    /// The database (its directory is locked against other processes).
    db: sled::Db,
    /// Format, configuration, checkpoint, next mutation id.
    meta: Tree,
    /// Documents as the server last sent them.
    base: Tree,
    /// Pending writes by mutation id.
    outbox: Tree,
    /// The outbox indexed by document.
    by_doc: Tree,
    /// Parked conflicts by document.
    conflicts: Tree,
}

impl Store {
    /// Whether `dir` holds a database (sled's data file).
    pub fn exists(dir: &Path) -> bool {
        dir.join("db").is_file()
    }

    /// Opens (or creates) the database in `dir`; [`ReplicaError::Locked`]
    /// while another process has it open.
    pub fn open(dir: &Path) -> Result<Self, ReplicaError> {
        // No background flusher: every change flushes before it returns,
        // and a flusher thread would hold the directory's lock for up to
        // its interval after the replica is dropped, so reopening it at
        // once (a restarted process, a test) would find it locked.
        let config = sled::Config::new().path(dir).flush_every_ms(None);
        let db = config.open().map_err(|e| match e {
            // sled's words for a directory another process holds.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                ReplicaError::Locked(dir.to_owned())
            }
            other => ReplicaError::Storage(other),
        })?;
        Ok(Self {
            meta: db.open_tree("meta")?,
            base: db.open_tree("base")?,
            outbox: db.open_tree("outbox")?,
            by_doc: db.open_tree("by_doc")?,
            conflicts: db.open_tree("conflicts")?,
            db,
        })
    }

    /// Writes the format and the configuration of a new replica; refuses a
    /// directory that already holds one.
    pub fn init(&self, config: &ReplicaConfig) -> Result<(), ReplicaError> {
        if self.meta.get(META_FORMAT)?.is_some() {
            return Err(ReplicaError::Input(
                "the directory already holds a local replica".into(),
            ));
        }
        let mut plan = Plan::default();
        plan.set_config(config);
        plan.set_checkpoint(&StoredCheckpoint::default());
        plan.set_next_id(1);
        plan.set(TreeId::Meta, META_FORMAT, FORMAT.to_be_bytes().to_vec());
        self.commit(&plan)
    }

    /// The configuration; fails on a directory `init` never ran in.
    pub fn config(&self) -> Result<ReplicaConfig, ReplicaError> {
        match self.meta.get(META_FORMAT)? {
            None => return Err(ReplicaError::NotInitialized),
            Some(v) if v.as_ref() != FORMAT.to_be_bytes() => {
                return Err(ReplicaError::Corrupt(format!(
                    "unknown layout version {v:?} (this build reads {FORMAT})"
                )));
            }
            Some(_) => {}
        }
        let bytes = self
            .meta
            .get(META_CONFIG)?
            .ok_or_else(|| ReplicaError::Corrupt("no configuration".into()))?;
        decode("config", &bytes)
    }

    /// The stored checkpoint.
    pub fn checkpoint(&self) -> Result<StoredCheckpoint, ReplicaError> {
        match self.meta.get(META_CHECKPOINT)? {
            Some(b) => decode("checkpoint", &b),
            None => Ok(StoredCheckpoint::default()),
        }
    }

    /// The next unused mutation id.
    pub fn next_id(&self) -> Result<u64, ReplicaError> {
        match self.meta.get(META_NEXT_ID)? {
            Some(b) => trailing_id(&b),
            None => Err(ReplicaError::Corrupt("no next mutation id".into())),
        }
    }

    /// A document of the base.
    pub fn base(&self, collection: &str, id: &str) -> Result<Option<BaseDoc>, ReplicaError> {
        self.base
            .get(doc_key(collection, id))?
            .map(|b| decode("base document", &b))
            .transpose()
    }

    /// Every base document of a collection, by id.
    pub fn base_collection(
        &self,
        collection: &str,
    ) -> Result<BTreeMap<String, BaseDoc>, ReplicaError> {
        self.base
            .scan_prefix(collection_prefix(collection))
            .map(|kv| {
                let (k, v) = kv?;
                let (_, id) = split_doc_key(&k)?;
                Ok((id, decode("base document", &v)?))
            })
            .collect()
    }

    /// The keys of every base document (for a resync's rebuild).
    pub fn base_keys(&self) -> Result<Vec<(String, String)>, ReplicaError> {
        self.base
            .iter()
            .keys()
            .map(|k| split_doc_key(&k?))
            .collect()
    }

    /// The outbox entry under `mutation_id`.
    pub fn entry(&self, mutation_id: u64) -> Result<Option<Entry>, ReplicaError> {
        self.outbox
            .get(outbox_key(mutation_id))?
            .map(|b| decode("outbox entry", &b))
            .transpose()
    }

    /// The whole outbox, in order.
    pub fn outbox(&self) -> Result<Vec<(u64, Entry)>, ReplicaError> {
        self.outbox_iter().collect()
    }

    /// The outbox, in order, lazily.
    pub fn outbox_iter(&self) -> impl Iterator<Item = Result<(u64, Entry), ReplicaError>> + '_ {
        self.outbox.iter().map(|kv| {
            let (k, v) = kv?;
            Ok((trailing_id(&k)?, decode("outbox entry", &v)?))
        })
    }

    /// Number of outbox entries.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// A document's pending entries, in order.
    pub fn doc_entries(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Vec<(u64, Entry)>, ReplicaError> {
        self.by_doc
            .scan_prefix(by_doc_prefix(collection, id))
            .keys()
            .map(|k| {
                let m = trailing_id(&k?)?;
                let entry = self.entry(m)?.ok_or_else(|| {
                    ReplicaError::Corrupt(format!("by_doc names mutation {m}, not in the outbox"))
                })?;
                Ok((m, entry))
            })
            .collect()
    }

    /// The ids of the documents of a collection with pending entries.
    pub fn pending_ids(&self, collection: &str) -> Result<Vec<String>, ReplicaError> {
        let mut ids: Vec<String> = Vec::new();
        for k in self
            .by_doc
            .scan_prefix(collection_prefix(collection))
            .keys()
        {
            let k = k?;
            let doc = k
                .len()
                .checked_sub(9)
                .map(|end| &k[..end])
                .ok_or_else(|| ReplicaError::Corrupt(format!("bad by_doc key {k:?}")))?;
            let (_, id) = split_doc_key(doc)?;
            if ids.last() != Some(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// A parked conflict.
    pub fn conflict(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<ConflictRecord>, ReplicaError> {
        self.conflicts
            .get(doc_key(collection, id))?
            .map(|b| decode("conflict", &b))
            .transpose()
    }

    /// Every parked conflict: ((collection, id), record).
    pub fn conflicts(&self) -> Result<Vec<(DocName, ConflictRecord)>, ReplicaError> {
        self.conflicts
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((split_doc_key(&k)?, decode("conflict", &v)?))
            })
            .collect()
    }

    /// Applies `plan` in one transaction, then flushes: durable on return.
    pub fn commit(&self, plan: &Plan) -> Result<(), ReplicaError> {
        if plan.is_empty() {
            return Ok(());
        }
        let trees = (
            &self.meta,
            &self.base,
            &self.outbox,
            &self.by_doc,
            &self.conflicts,
        );
        trees
            .transaction(|(meta, base, outbox, by_doc, conflicts)| {
                for (tree, key, value) in &plan.changes {
                    let t = match tree {
                        TreeId::Meta => meta,
                        TreeId::Base => base,
                        TreeId::Outbox => outbox,
                        TreeId::ByDoc => by_doc,
                        TreeId::Conflicts => conflicts,
                    };
                    match value {
                        Some(v) => t.insert(key.as_slice(), v.as_slice())?,
                        None => t.remove(key.as_slice())?,
                    };
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => ReplicaError::Storage(e),
                TransactionError::Abort(()) => ReplicaError::Corrupt("aborted commit".into()),
            })?;
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back_and_sort_by_document_then_id() {
        let k = doc_key("todos", "a b/ü");
        assert_eq!(
            split_doc_key(&k).unwrap(),
            ("todos".to_owned(), "a b/ü".to_owned())
        );
        // A collection's documents sort before those of a collection it
        // prefixes.
        assert!(doc_key("a", "zzz") < doc_key("a.b", "a"));
        assert!(by_doc_key("t", "x", 2) < by_doc_key("t", "x", 10));
        assert!(by_doc_key("t", "x", u64::MAX) < by_doc_key("t", "x0", 1));
        assert_eq!(trailing_id(&by_doc_key("t", "x", 300)).unwrap(), 300);
    }

    #[test]
    fn a_plan_commits_whole_and_the_outbox_reads_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let config = ReplicaConfig {
            client_id: "c".into(),
            endpoints: vec![],
            collections: BTreeMap::from([("t".to_owned(), Resolver::Manual)]),
        };
        store.init(&config).unwrap();
        assert!(store.init(&config).is_err(), "init twice");
        let entry = |id: &str| Entry {
            collection: "t".into(),
            id: id.into(),
            op: LocalOp::Delete,
            base_version: 0,
            ancestor: None,
            resolver: Resolver::Manual,
        };
        let mut plan = Plan::default();
        plan.put_entry(300, &entry("b"));
        plan.put_entry(2, &entry("a"));
        plan.put_entry(7, &entry("a"));
        plan.set_next_id(301);
        store.commit(&plan).unwrap();
        let ids: Vec<u64> = store
            .outbox()
            .unwrap()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        assert_eq!(ids, [2, 7, 300]);
        let a: Vec<u64> = store
            .doc_entries("t", "a")
            .unwrap()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        assert_eq!(a, [2, 7]);
        assert_eq!(store.pending_ids("t").unwrap(), ["a", "b"]);
        assert_eq!(store.next_id().unwrap(), 301);
        assert_eq!(store.config().unwrap(), config);
    }
}
