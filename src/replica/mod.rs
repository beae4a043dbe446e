//! Offline-first local replicas: an embedded copy of chosen collections,
//! written to while the server is away and kept in sync with it.
//!
//! ```no_run
//! # async fn example() -> Result<(), deltasync::replica::ReplicaError> {
//! use deltasync::replica::{LocalReplica, ReplicaOptions, Resolver};
//! use serde_json::json;
//!
//! let dir = std::path::Path::new("./todos-replica");
//! let options = ReplicaOptions::new(["http://127.0.0.1:50051"]).collection("todos", Resolver::Manual);
//! let replica = LocalReplica::init(dir, options, |b| b)?;
//! replica.put("todos", "milk", json!({"title": "Buy milk"}))?; // durable, server or not
//! let report = replica.sync().await?; // push the outbox, catch up
//! // Or keep following the server, pushing each write as it is made:
//! let mut events = replica.events();
//! let handle = replica.start_sync(Default::default());
//! while let Some(Ok(event)) = events.recv().await {
//!     println!("{event:?}");
//! #   break;
//! }
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! How it works (the layout is in [`store`]):
//! - **Base and outbox.** The base holds the documents as the server last
//!   sent them, with the checkpoint they are consistent with. Every local
//!   write is one outbox entry (no squashing) with its own mutation id, its
//!   base version, the body at that version (the common ancestor shown with
//!   a conflict) and its collection's [`Resolver`], committed and flushed
//!   in one transaction before the call returns.
//! - **The optimistic view.** Reads return the base with the document's
//!   pending writes replayed on it ([`view`]), flagged
//!   [`LocalDocument::pending`].
//! - **Based on its own writes.** A write on a document with pending writes
//!   takes their base version; when the earlier one is acknowledged, the
//!   later ones move to the version it produced, so a replica never
//!   conflicts with itself. Writes of one document are sent one at a time
//!   for that reason (a push holds at most one write per document). One
//!   exception keeps foreign changes from being overwritten unseen: when
//!   the answer shows fields someone else changed (merged in, or since, for
//!   a `DUPLICATE`), a later write that changes one of them keeps its base,
//!   and the server's field check reports the conflict.
//! - **Exactly once.** The client id is generated at init and used by this
//!   replica only; mutation ids are the outbox keys, sent in increasing
//!   order, the same on every retry ([`crate::client::Client::resend`]), so
//!   a push whose answer was lost is answered `DUPLICATE` (or `CONFLICT`
//!   again) when resent, never applied twice.
//! - **Conflicts** go to the collection's [`Resolver`]: keep the server's
//!   state (the write is dropped), keep mine (the write is sent again
//!   against the server's version under a new mutation id, since the
//!   rejected id stays used on the server), or by hand: a callback
//!   ([`LocalReplica::set_merge`]) or, without one, parked in
//!   [`LocalReplica::conflicts`] (still in the view, held with the
//!   document's later writes) until [`LocalReplica::resolve`]. A resolved
//!   write and the writes held behind it get new mutation ids at the end
//!   of the outbox: they were never sent, and ids keep going out in
//!   increasing order.
//! - **Resync.** A checkpoint the server cannot resume from (compacted,
//!   diverged, another store, lost writes) rebuilds the base from a Pull
//!   from 0; the outbox and parked conflicts stay.
//!
//! - **In the background.** [`LocalReplica::start_sync`] runs a task
//!   ([`background`]) that syncs, then follows the server with Subscribe
//!   from the stored checkpoint and pushes each local write as it is made;
//!   on a failure it backs off and starts again (the client library moves
//!   across endpoints). [`LocalReplica::sync`] still works on demand,
//!   alongside it.
//! - **Events.** [`LocalReplica::events`] streams every change after the
//!   commit that made it ([`ReplicaEvent`]): local writes, the server's
//!   changes, acknowledgements, conflicts parked and resolved, resyncs. A
//!   receiver that falls behind is told it lagged ([`Lagged`]), never left
//!   to miss changes silently.

pub mod background;
pub mod events;
pub mod store;
mod sync;
pub mod view;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::store::{ConflictRecord, Plan, Store};
pub use self::{
    background::{BackgroundOptions, SyncHandle, SyncStatus},
    events::{Acknowledgement, Events, Lagged, ReplicaEvent, ResolvedBy},
    store::{BaseDoc, Entry, LocalOp, ReplicaConfig},
    sync::SyncReport,
};
use crate::client::{Body, Client, ClientBuilder, ClientError, Document};

/// How long [`LocalReplica::open`] waits for sled's directory lock.
pub const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How a write the server answered CONFLICT is settled; chosen per
/// collection at init and kept with each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[value(rename_all = "kebab-case")]
pub enum Resolver {
    /// Keep the server's state: the write is dropped.
    KeepServer,
    /// Keep mine: the write is sent again against the server's version,
    /// under a new mutation id.
    KeepLocal,
    /// By hand: the collection's merge callback, if one is set, else the
    /// conflict is parked until [`LocalReplica::resolve`].
    #[default]
    Manual,
}

/// How a conflict is resolved by hand.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Drop my write (and keep the writes made after it, still based on
    /// the version it was based on: the server checks them field by field).
    KeepServer,
    /// Send my write again against the server's current version.
    KeepLocal,
    /// Replace my write with a put of this body against the server's
    /// current version.
    Merged(Body),
}

/// A parked conflict with both sides.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// Collection of the document.
    pub collection: String,
    /// Id of the document.
    pub id: String,
    /// The mutation id the server rejected.
    pub mutation_id: u64,
    /// My write.
    pub op: LocalOp,
    /// The common ancestor: the body at my write's base version (`None`:
    /// no document then, or unknown).
    pub base: Option<Body>,
    /// Mine: the ancestor with my write applied (`None`: a delete).
    pub local: Option<Body>,
    /// Theirs: the server's document as the replica last saw it (`None`:
    /// unknown to the replica).
    pub server: Option<Document>,
    /// The top-level fields both sides changed, as the server listed them.
    pub conflicting_fields: Vec<String>,
}

/// A merge callback: given a conflict, a resolution, or `None` to park it.
pub type MergeFn = Arc<dyn Fn(&Conflict) -> Option<Resolution> + Send + Sync>;

/// A document of the optimistic view.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDocument {
    /// The document: version, seq and times of the base (0 and none if the
    /// server never sent it), body and `deleted` after the pending writes.
    pub document: Document,
    /// True when pending writes (acknowledged by nobody yet, or parked in
    /// a conflict) are folded in.
    pub pending: bool,
}

/// One pending write, as [`LocalReplica::pending`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Its mutation id (the outbox key).
    pub mutation_id: u64,
    /// The write.
    pub entry: Entry,
    /// True when it is held: its document has a parked conflict.
    pub held: bool,
}

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The local sled store failed (or is locked by another process).
    #[error("local store: {0}")]
    Storage(#[from] sled::Error),
    /// The local store holds what this build cannot read.
    #[error("local store is corrupt: {0}")]
    Corrupt(String),
    /// Another process has the directory open (sled locks it: one
    /// process at a time).
    #[error("the local store in {} is in use by another process (a sync?); one process at a time", .0.display())]
    Locked(std::path::PathBuf),
    /// The directory has no replica: run init first.
    #[error("no local replica in this directory (init one first)")]
    NotInitialized,
    /// The caller asked for something invalid (nothing was written).
    #[error("invalid input: {0}")]
    Input(String),
    /// `resolve` of a document without a parked conflict.
    #[error("no parked conflict for {collection}/{id}")]
    NoConflict {
        /// Collection.
        collection: String,
        /// Id.
        id: String,
    },
    /// The server could not be reached or refused (the outbox is kept).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server answered something impossible (a foreign store, a
    /// version or checkpoint going backwards): the sync stopped, the
    /// outbox is kept.
    #[error("bad answer from the server: {0}")]
    BadAnswer(String),
}

/// What a new replica replicates, from where.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Server URLs, tried in order.
    pub endpoints: Vec<String>,
    /// Collections and their resolvers.
    pub collections: BTreeMap<String, Resolver>,
    /// How many events a receiver may fall behind by before it is told it
    /// lagged, in the process that inits the replica (not kept: `open`
    /// uses [`events::CAPACITY`]).
    pub event_capacity: usize,
}

impl ReplicaOptions {
    /// A replica of these endpoints, with no collection yet.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            collections: BTreeMap::new(),
            event_capacity: events::CAPACITY,
        }
    }

    /// Replicates `collection`, settling its conflicts with `resolver`.
    #[must_use]
    pub fn collection(mut self, collection: impl Into<String>, resolver: Resolver) -> Self {
        self.collections.insert(collection.into(), resolver);
        self
    }
}

/// A local replica: cheap to clone (clones share the store and the client).
#[derive(Clone)]
pub struct LocalReplica {
    /// Shared by every clone.
    inner: Arc<Inner>,
}

/// What clones of a [`LocalReplica`] share.
struct Inner {
    /// The sled store.
    store: Store,
    /// What init fixed.
    config: ReplicaConfig,
    /// The client, under the replica's client id.
    client: Client,
    /// Serializes local commits that read before they write (writes, the
    /// sync's answers and pages, resolutions): held only around local work,
    /// never across a call to the server.
    write: Mutex<()>,
    /// One sync at a time.
    sync: tokio::sync::Mutex<()>,
    /// Merge callbacks by collection (not persisted).
    merge: RwLock<HashMap<String, MergeFn>>,
    /// Where events go, after the commits that make them true.
    events: events::Emitter,
    /// Woken by every local write, so a background sync pushes it.
    wrote: tokio::sync::Notify,
}

impl LocalReplica {
    /// Creates a replica in `dir` (a new client id is generated and kept
    /// there). `configure` adds TLS, a token, deadlines or retries to the
    /// client (endpoints and client id are the replica's).
    pub fn init(
        dir: &Path,
        options: ReplicaOptions,
        configure: impl FnOnce(ClientBuilder) -> ClientBuilder,
    ) -> Result<Self, ReplicaError> {
        if options.endpoints.is_empty() {
            return Err(ReplicaError::Input("no endpoint".into()));
        }
        if options.collections.is_empty() {
            return Err(ReplicaError::Input("no collection".into()));
        }
        for c in options.collections.keys() {
            crate::service::validate::collection("collection", c)
                .map_err(|e| ReplicaError::Input(format!("`{c}`: {e}")))?;
        }
        let store = Store::open(dir)?;
        let config = ReplicaConfig {
            client_id: uuid::Uuid::new_v4().to_string(),
            endpoints: options.endpoints,
            collections: options.collections,
        };
        store.init(&config)?;
        Self::with_store(store, configure, options.event_capacity)
    }

    /// Opens the replica in `dir` (see [`LocalReplica::init`] for
    /// `configure`). One process at a time: sled locks the directory, and
    /// releases it a moment after the last handle of a replica is dropped,
    /// so this waits up to [`REOPEN_WAIT`] for the lock before it answers
    /// [`ReplicaError::Locked`] (see [`LocalReplica::open_waiting`] for
    /// longer). Blocks the thread.
    pub fn open(
        dir: &Path,
        configure: impl FnOnce(ClientBuilder) -> ClientBuilder,
    ) -> Result<Self, ReplicaError> {
        Self::open_waiting(dir, configure, REOPEN_WAIT)
    }

    /// As [`LocalReplica::open`], but while another process has the
    /// directory open (a sync under way), waits for it to let go, up to
    /// `wait`, trying again every 20 ms; then [`ReplicaError::Locked`].
    /// Blocks the thread.
    pub fn open_waiting(
        dir: &Path,
        configure: impl FnOnce(ClientBuilder) -> ClientBuilder,
        wait: std::time::Duration,
    ) -> Result<Self, ReplicaError> {
        // sled would create its files in any directory it opens: a
        // mistyped `--dir` must not leave them behind.
        if !Store::exists(dir) {
            return Err(ReplicaError::NotInitialized);
        }
        let deadline = std::time::Instant::now() + wait;
        let store = loop {
            match Store::open(dir) {
                Err(ReplicaError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        Self::with_store(store, configure, events::CAPACITY)
    }

    fn with_store(
        store: Store,
        configure: impl FnOnce(ClientBuilder) -> ClientBuilder,
        event_capacity: usize,
    ) -> Result<Self, ReplicaError> {
        let config = store.config()?;
        let client = configure(Client::builder(config.endpoints.clone()))
            .client_id(config.client_id.clone())
            .build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                config,
                client,
                write: Mutex::new(()),
                sync: tokio::sync::Mutex::new(()),
                merge: RwLock::new(HashMap::new()),
                events: events::Emitter::new(event_capacity),
                wrote: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The configuration init fixed.
    pub fn config(&self) -> &ReplicaConfig {
        &self.inner.config
    }

    /// The client id its mutations are counted under.
    pub fn client_id(&self) -> &str {
        &self.inner.config.client_id
    }

    /// Replaces the endpoints; used from the next [`LocalReplica::open`].
    pub fn set_endpoints<S: Into<String>>(
        &self,
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<(), ReplicaError> {
        let _w = self.lock();
        let mut config = self.inner.store.config()?;
        config.endpoints = endpoints.into_iter().map(Into::into).collect();
        let mut plan = Plan::default();
        plan.set_config(&config);
        self.inner.store.commit(&plan)
    }

    /// Resolves the conflicts of `collection` with `merge` from now on (in
    /// this process): it gets each conflict and returns a resolution, or
    /// `None` to park it. It runs while the sync holds the replica's write
    /// lock, so it must not call this replica (a read or a write would wait
    /// for that lock forever): everything it needs comes as its argument.
    pub fn set_merge(
        &self,
        collection: &str,
        merge: impl Fn(&Conflict) -> Option<Resolution> + Send + Sync + 'static,
    ) {
        self.inner
            .merge
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(collection.to_owned(), Arc::new(merge));
    }

    /// A receiver of every [`ReplicaEvent`] from now on: local writes,
    /// changes from the server, acknowledgements, conflicts parked and
    /// resolved. A receiver that falls [`events::CAPACITY`] events behind
    /// is told so ([`Lagged`]).
    pub fn events(&self) -> Events {
        self.inner.events.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is the store, which a panic cannot leave half
        // written (commits are transactions).
        self.inner
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // -----------------------------------------------------------------
    // Writes
    // -----------------------------------------------------------------

    /// Replaces a document's body; durable on return.
    pub fn put(
        &self,
        collection: &str,
        id: &str,
        body: Value,
    ) -> Result<LocalDocument, ReplicaError> {
        let body = Self::body(body)?;
        self.write(collection, id, LocalOp::Put(body))
    }

    /// Merges top-level fields into a document (null removes a field);
    /// durable on return.
    pub fn patch(
        &self,
        collection: &str,
        id: &str,
        body: Value,
    ) -> Result<LocalDocument, ReplicaError> {
        let body = Self::body(body)?;
        self.write(collection, id, LocalOp::Patch(body))
    }

    /// Deletes a document; durable on return.
    pub fn delete(&self, collection: &str, id: &str) -> Result<LocalDocument, ReplicaError> {
        self.write(collection, id, LocalOp::Delete)
    }

    fn body(body: Value) -> Result<Body, ReplicaError> {
        match body {
            Value::Object(map) => view::normalize(&map).map_err(ReplicaError::Input),
            other => Err(ReplicaError::Input(format!(
                "the body must be a JSON object, not {other}"
            ))),
        }
    }

    fn resolver(&self, collection: &str) -> Result<Resolver, ReplicaError> {
        self.inner
            .config
            .collections
            .get(collection)
            .copied()
            .ok_or_else(|| {
                ReplicaError::Input(format!("collection `{collection}` is not replicated here"))
            })
    }

    fn write(
        &self,
        collection: &str,
        id: &str,
        op: LocalOp,
    ) -> Result<LocalDocument, ReplicaError> {
        let resolver = self.resolver(collection)?;
        crate::service::validate::id("id", id).map_err(|e| ReplicaError::Input(e.to_string()))?;
        let store = &self.inner.store;
        let _w = self.lock();
        let mut entries = store.doc_entries(collection, id)?;
        let base = store.base(collection, id)?;
        // On top of pending writes: their base (moved when they are
        // acknowledged). Else the base's version (0: no document).
        let (base_version, ancestor) = match entries.last() {
            Some((_, e)) => (e.base_version, e.ancestor.clone()),
            None => (
                base.as_ref().map_or(0, |b| b.version),
                base.as_ref().and_then(BaseDoc::live_body).cloned(),
            ),
        };
        let entry = Entry {
            collection: collection.to_owned(),
            id: id.to_owned(),
            op,
            base_version,
            ancestor,
            resolver,
        };
        let mutation_id = store.next_id()?;
        let mut plan = Plan::default();
        plan.put_entry(mutation_id, &entry);
        plan.set_next_id(next(mutation_id)?);
        store.commit(&plan)?;
        entries.push((mutation_id, entry));
        let document = local_document(collection, id, base.as_ref(), &entries);
        self.inner.events.send([ReplicaEvent::Written {
            mutation_id,
            document: document.clone(),
        }]);
        self.inner.wrote.notify_one();
        Ok(document)
    }

    // -----------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------

    /// A document of the optimistic view (tombstones included; `None` if
    /// neither the server nor a local write ever made it).
    pub fn get(&self, collection: &str, id: &str) -> Result<Option<LocalDocument>, ReplicaError> {
        self.resolver(collection)?;
        let store = &self.inner.store;
        let _w = self.lock();
        let base = store.base(collection, id)?;
        let entries = store.doc_entries(collection, id)?;
        if base.is_none() && entries.is_empty() {
            return Ok(None);
        }
        Ok(Some(local_document(
            collection,
            id,
            base.as_ref(),
            &entries,
        )))
    }

    /// Every document of a collection in the optimistic view, by id
    /// (tombstones included).
    pub fn list(&self, collection: &str) -> Result<Vec<LocalDocument>, ReplicaError> {
        self.resolver(collection)?;
        let store = &self.inner.store;
        let _w = self.lock();
        let mut base = store.base_collection(collection)?;
        let mut ids: Vec<String> = base.keys().cloned().collect();
        ids.extend(store.pending_ids(collection)?);
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let entries = store.doc_entries(collection, &id)?;
                let doc = base.remove(&id);
                Ok(local_document(collection, &id, doc.as_ref(), &entries))
            })
            .collect()
    }

    /// The outbox, in the order it is sent.
    pub fn pending(&self) -> Result<Vec<Pending>, ReplicaError> {
        let store = &self.inner.store;
        let _w = self.lock();
        let parked: std::collections::HashSet<(String, String)> =
            store.conflicts()?.into_iter().map(|(k, _)| k).collect();
        store
            .outbox_iter()
            .map(|item| {
                let (mutation_id, entry) = item?;
                let held = parked.contains(&(entry.collection.clone(), entry.id.clone()));
                Ok(Pending {
                    mutation_id,
                    entry,
                    held,
                })
            })
            .collect()
    }

    /// Every parked conflict, with both sides.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, ReplicaError> {
        let store = &self.inner.store;
        let _w = self.lock();
        store
            .conflicts()?
            .into_iter()
            .map(|((collection, id), record)| {
                let server = store.base(&collection, &id)?;
                self.conflict_view(collection, id, &record, server.as_ref())
            })
            .collect()
    }

    /// The public form of a parked (or about to be parked) conflict.
    fn conflict_view(
        &self,
        collection: String,
        id: String,
        record: &ConflictRecord,
        server: Option<&BaseDoc>,
    ) -> Result<Conflict, ReplicaError> {
        let entry = self.inner.store.entry(record.mutation_id)?.ok_or_else(|| {
            ReplicaError::Corrupt(format!(
                "conflict {collection}/{id} names mutation {}, not in the outbox",
                record.mutation_id
            ))
        })?;
        Ok(Conflict {
            server: server.map(|s| s.to_document(&collection, &id)),
            local: view::apply(entry.ancestor.clone(), &entry.op),
            base: entry.ancestor,
            op: entry.op,
            mutation_id: record.mutation_id,
            conflicting_fields: record.conflicting_fields.clone(),
            collection,
            id,
        })
    }

    // -----------------------------------------------------------------
    // Conflicts
    // -----------------------------------------------------------------

    /// Resolves a parked conflict; the resolved write (if any) is sent at
    /// the next sync. Returns the document's optimistic view.
    pub fn resolve(
        &self,
        collection: &str,
        id: &str,
        resolution: Resolution,
    ) -> Result<LocalDocument, ReplicaError> {
        self.resolver(collection)?;
        let resolution = match resolution {
            Resolution::Merged(b) => {
                Resolution::Merged(view::normalize(&b).map_err(ReplicaError::Input)?)
            }
            other => other,
        };
        let store = &self.inner.store;
        let _w = self.lock();
        let no_conflict = || ReplicaError::NoConflict {
            collection: collection.to_owned(),
            id: id.to_owned(),
        };
        let record = store.conflict(collection, id)?.ok_or_else(no_conflict)?;
        let entry = store.entry(record.mutation_id)?.ok_or_else(no_conflict)?;
        let server = store.base(collection, id)?;
        let mut plan = Plan::default();
        let mut next_id = store.next_id()?;
        let (resent_as, renumbered) = sync::plan_resolution(
            store,
            &mut plan,
            &mut next_id,
            (record.mutation_id, &entry),
            &resolution,
            server.as_ref(),
        )?;
        plan.set_next_id(next_id);
        store.commit(&plan)?;
        self.inner.events.send([ReplicaEvent::Resolved {
            mutation_id: record.mutation_id,
            collection: collection.to_owned(),
            id: id.to_owned(),
            resolution,
            by: ResolvedBy::Hand,
            resent_as,
            renumbered,
        }]);
        self.inner.wrote.notify_one();
        let entries = store.doc_entries(collection, id)?;
        Ok(local_document(collection, id, server.as_ref(), &entries))
    }
}

/// The id after `id`.
fn next(id: u64) -> Result<u64, ReplicaError> {
    id.checked_add(1)
        .ok_or_else(|| ReplicaError::Corrupt("mutation ids exhausted".into()))
}

/// A document of the optimistic view from its base and pending entries.
fn local_document(
    collection: &str,
    id: &str,
    base: Option<&BaseDoc>,
    entries: &[(u64, Entry)],
) -> LocalDocument {
    let body = view::replay(base, entries.iter().map(|(_, e)| &e.op));
    let mut document = match base {
        Some(b) => b.to_document(collection, id),
        None => Document {
            collection: collection.to_owned(),
            id: id.to_owned(),
            version: 0,
            seq: 0,
            deleted: false,
            body: None,
            updated_at: None,
            updated_by: String::new(),
        },
    };
    document.deleted = body.is_none();
    document.body = body;
    LocalDocument {
        document,
        pending: !entries.is_empty(),
    }
}
