//! The typed store over sled.
//!
//! Trees (see [`keys`]): the log (one record per change, keyed by seq; a
//! superseded record is the delta log's entry of its version), per-client
//! mutation ids and metadata. The in-memory [`index`] says which record is
//! each document's current state. Writes go through the single group-commit
//! [`writer`]; reads go straight to sled. Callers only see domain types from
//! [`model`].

pub mod body;
pub mod canonical;
pub mod clients;
pub mod codec;
pub mod compaction;
pub mod conflict;
pub mod error;
pub mod feed;
pub mod index;
pub mod keys;
pub mod migrate;
pub mod model;
pub mod pull;
pub mod push;
pub mod readahead;
pub mod redo;
pub mod replica;
pub mod writer;

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError, RwLock},
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;

use self::{
    clients::Unflushed,
    feed::Feed,
    index::Index,
    model::{Document, PullPage, PushBatch, PushOutcome, Seq},
    readahead::ReadAhead,
    replica::{Epochs, ReplicatedCommit},
    writer::{Command, Job, ReplicaJob, Writer},
};
pub use self::{
    error::StoreError,
    feed::{FeedEvent, Subscription},
    pull::{CollectionFilter, PageLimit},
    writer::{Admin, Faults},
};

/// The on-disk layout this build reads and writes (`migrate` upgrades
/// earlier ones).
pub const SCHEMA_VERSION: u64 = 4;

/// The same layout while a redo record may be pending (see `redo`): from
/// the first one a process writes until a clean stop. A build from before
/// the record refuses it rather than miss the record after a crash; a
/// cleanly stopped store is [`SCHEMA_VERSION`] again.
pub const SCHEMA_VERSION_REDO: u64 = 5;

/// Source of the time stamped on changes and used for retention; injectable
/// so tests can age data without waiting.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// A clock running `ahead` seconds ahead of the system clock; tests move it
/// forward to make data old.
pub fn offset_clock(ahead: Arc<std::sync::atomic::AtomicU64>) -> Clock {
    Arc::new(move || {
        SystemTime::now() + Duration::from_secs(ahead.load(std::sync::atomic::Ordering::Relaxed))
    })
}

/// When a push is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// After its commit is flushed to disk.
    #[default]
    Fsync,
    /// After its commit is in memory; a flusher makes it durable within a
    /// flush interval. Readers see it only then.
    Buffered,
}

/// How to open a store.
#[derive(Clone)]
pub struct Options {
    /// fsync before acknowledging, or not.
    pub durability: Durability,
    /// Background flush period (what `buffered` may lose).
    pub flush_interval: Duration,
    /// Source of `updated_at`.
    pub clock: Clock,
    /// Commits kept in the broadcast ring before a subscriber counts as lagging.
    pub feed_capacity: usize,
    /// Most document bytes kept in the broadcast ring.
    pub feed_max_bytes: usize,
    /// Most mutations gathered into one group commit.
    pub max_group_mutations: usize,
    /// Largest body a document may be stored with (encoded bytes): a push
    /// whose patch or merge would make a larger one is refused.
    pub max_body_bytes: usize,
    /// sled's page cache, in bytes (`sled::Config::cache_capacity`).
    pub cache_bytes: u64,
    /// Failure injection for tests.
    pub faults: Faults,
    /// Where the store counts commits, flushes and subscribers (the
    /// server's registry; a fresh one by default).
    pub metrics: Metrics,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            flush_interval: Duration::from_millis(500),
            clock: Arc::new(SystemTime::now),
            feed_capacity: 1024,
            feed_max_bytes: 64 << 20,
            max_group_mutations: 10_000,
            max_body_bytes: 1 << 20,
            cache_bytes: crate::config::DEFAULT_CACHE_BYTES,
            faults: Faults::default(),
            metrics: Metrics::default(),
        }
    }
}

/// Handles to every tree.
#[derive(Clone)]
pub struct Trees {
    /// The log of changes.
    pub log: sled::Tree,
    /// Per-client last mutation ids.
    pub clients: sled::Tree,
    /// Metadata.
    pub meta: sled::Tree,
}

/// A cheap `Clone` handle to the store.
#[derive(Clone)]
pub struct Store {
    /// Everything the clones share.
    shared: Arc<Shared>,
}

struct Shared {
    /// Read handles.
    trees: Trees,
    /// Where each document's current state is in the log (as of the last
    /// published commit).
    index: Index,
    /// Clients' durable last ids while a commit of theirs is in flight.
    unflushed: Unflushed,
    /// False once the writer stopped taking writes.
    writable: watch::Receiver<bool>,
    /// Dropped on close to end the flusher thread, which is then joined
    /// (it holds the database open).
    flusher: Mutex<Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>>,
    /// How long a buffered commit may take to become durable.
    flush_interval: Duration,
    /// The store's identity, made at creation (a new replica takes its
    /// primary's).
    store_id: RwLock<Arc<str>>,
    /// Post-commit broadcast point.
    feed: Feed,
    /// Time source for retention.
    clock: Clock,
    /// Queue to the writer thread.
    writer: mpsc::Sender<Command>,
    /// The writer thread, joined on close.
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    /// Next pages of paged pulls, read while the current one is sent.
    readahead: ReadAhead,
    /// The epoch history (as in the meta tree; changed only by `admin`).
    epochs: RwLock<Arc<Epochs>>,
    /// Tombstones above this seq are not purged (see
    /// [`Store::hold_purges_above`]).
    purge_floor: Arc<std::sync::atomic::AtomicU64>,
    /// The database, for its size on disk (sampled on scrape).
    db: sled::Db,
    /// The server's metrics.
    metrics: Metrics,
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts its writer.
    pub fn open(dir: &Path, options: Options) -> Result<Self, StoreError> {
        // The flusher below flushes, so the store knows what is durable.
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .cache_capacity(options.cache_bytes)
            .open()?;
        let trees = Trees {
            log: db.open_tree(keys::LOG)?,
            clients: db.open_tree(keys::CLIENTS)?,
            meta: db.open_tree(keys::META)?,
        };
        migrate::upgrade(&db, &trees, (options.clock)())?;
        let unflushed = Unflushed::default();
        let store_id = init_store_id(&trees.meta)?;
        let head = recover_head(&db, &trees)?;
        let started = std::time::Instant::now();
        let index = Index::rebuild(&trees.log)?;
        tracing::info!(
            documents = index.len(),
            elapsed_ms = started.elapsed().as_millis(),
            "document index rebuilt"
        );
        let horizon = read_meta_u64(&trees.meta, keys::META_PURGE_HORIZON)?;
        let feed = Feed::new(
            head,
            Seq(horizon),
            options.feed_capacity,
            options.feed_max_bytes,
        );
        let (tx, rx) = mpsc::channel(1024);
        let (writable_tx, writable) = watch::channel(true);
        let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let purge_floor = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let writer = Writer {
            db: db.clone(),
            trees: trees.clone(),
            index: index.clone(),
            unflushed: unflushed.clone(),
            feed: feed.clone(),
            durability: options.durability,
            clock: options.clock.clone(),
            max_group_mutations: options.max_group_mutations,
            max_body_bytes: options.max_body_bytes,
            last_time: std::cell::Cell::new(last_commit_time(&trees)?),
            stopped: std::cell::Cell::new(false),
            writable: writable_tx,
            faults: options.faults.clone(),
            writes: writes.clone(),
            max_unflushed_bytes: options.feed_max_bytes,
            epoch: std::cell::Cell::new(replica::Epochs::read(&trees.meta)?.current()),
            purge_floor: purge_floor.clone(),
            metrics: options.metrics.clone(),
            redo_marked: std::cell::Cell::new(false),
        };
        let spawn_failed = |e| StoreError::Storage(sled::Error::Io(e));
        let thread = std::thread::Builder::new()
            .name("deltasync-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(spawn_failed)?;
        let (flusher_stop, stop) = std::sync::mpsc::channel();
        let flusher = {
            let (db, tx) = (db.clone(), tx.clone());
            let (faults, interval) = (options.faults.clone(), options.flush_interval);
            let metrics = options.metrics.clone();
            std::thread::Builder::new()
                .name("deltasync-flusher".into())
                .spawn(move || {
                    writer::run_flusher(db, writes, faults, interval, tx, stop, &metrics);
                })
                .map_err(spawn_failed)?
        };
        tracing::info!(dir = %dir.display(), %store_id, head = %head, "store opened");
        let trees_meta = trees.meta.clone();
        Ok(Self {
            shared: Arc::new(Shared {
                trees,
                index,
                unflushed,
                writable,
                flusher: Mutex::new(Some((flusher_stop, flusher))),
                flush_interval: options.flush_interval,
                store_id: RwLock::new(store_id.into()),
                feed,
                clock: options.clock,
                writer: tx,
                writer_thread: Mutex::new(Some(thread)),
                readahead: ReadAhead::default(),
                epochs: RwLock::new(Arc::new(Epochs::read(&trees_meta)?)),
                purge_floor,
                db,
                metrics: options.metrics,
            }),
        })
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// What a scrape of `/metrics` reports about the store; reads only
    /// counters kept anyway, and sled's size on disk.
    pub fn metrics_sample(&self) -> crate::metrics::Sample {
        let shared = &self.shared;
        let (documents, tombstones) = shared.index.counts();
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        crate::metrics::Sample {
            head: self.head().0,
            documents: as_u64(documents),
            tombstones: as_u64(tombstones),
            bytes_on_disk: shared.db.size_on_disk().unwrap_or(0),
            purge_horizon: self.purge_horizon().0,
            ..Default::default()
        }
    }

    /// The store's identity.
    pub fn store_id(&self) -> Arc<str> {
        self.shared
            .store_id
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Queues a commit replicated from the primary for the writer, which
    /// applies queued commits in order (several in one local commit); the
    /// receiver gets the head once it is written (durable in `fsync` mode).
    pub async fn replicate(
        &self,
        commit: ReplicatedCommit,
    ) -> Result<oneshot::Receiver<Result<Seq, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.shared
            .writer
            .send(Command::Replicate(ReplicaJob { commit, reply }))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Whether the store holds nothing at all (no commit, no client): a
    /// new replica's store, which takes its primary's identity.
    pub fn is_blank(&self) -> Result<bool, StoreError> {
        Ok(is_blank(&self.shared.trees, self.feed().written()))
    }

    /// Whether the store was last written as a replica (it holds a
    /// replica's client-state progress; a promotion clears it).
    pub fn was_replica(&self) -> Result<bool, StoreError> {
        Ok(self
            .shared
            .trees
            .meta
            .contains_key(keys::META_CLIENTS_PROGRESS)?)
    }

    /// On a replica: how complete its client states are.
    pub fn clients_progress(&self) -> Result<replica::ClientsProgress, StoreError> {
        replica::ClientsProgress::read(&self.shared.trees.meta, self.written())
    }

    /// Changes identity, epochs or horizon, in order with commits, durably.
    pub async fn admin(&self, admin: Admin) -> Result<(), StoreError> {
        let adopted = match &admin {
            Admin::AdoptStoreId(id) => Some(id.clone()),
            _ => None,
        };
        let (reply, rx) = oneshot::channel();
        self.shared
            .writer
            .send(Command::Admin(admin, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)??;
        let epochs = Epochs::read(&self.shared.trees.meta)?;
        *self
            .shared
            .epochs
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(epochs);
        if let Some(id) = adopted {
            *self
                .shared
                .store_id
                .write()
                .unwrap_or_else(PoisonError::into_inner) = id.into();
        }
        Ok(())
    }

    /// Holds back the purge of tombstones above `seq` (`None`: no hold):
    /// a primary keeps the deletions a connected replica has not yet
    /// acknowledged, as a replication slot does.
    pub fn hold_purges_above(&self, seq: Option<Seq>) {
        self.shared.purge_floor.store(
            seq.map_or(u64::MAX, |s| s.0),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// The epoch history.
    pub fn epochs(&self) -> Arc<Epochs> {
        self.shared
            .epochs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The highest epoch this store has seen (at least its own).
    pub fn seen_epoch(&self) -> Result<u64, StoreError> {
        let seen = read_meta_u64(&self.shared.trees.meta, keys::META_SEEN_EPOCH)?;
        Ok(seen.max(self.epochs().current()))
    }

    /// The records in `(after, upto]` (superseded ones included), about
    /// `max_bytes` of them at most, the seq the read reached and whether
    /// it ends a commit.
    pub async fn read_records(
        &self,
        after: Seq,
        upto: Seq,
        max_bytes: usize,
    ) -> Result<replica::Records, StoreError> {
        let shared = self.shared.clone();
        blocking(move || replica::read_records(&shared.trees, after, upto, max_bytes)).await
    }

    /// The client states written in commits `since ..= upto`.
    pub async fn clients_between(
        &self,
        since: Seq,
        upto: Seq,
    ) -> Result<replica::ClientsBetween, StoreError> {
        let shared = self.shared.clone();
        blocking(move || replica::clients_between(&shared.trees, since, upto)).await
    }

    /// Highest written seq: the head, or beyond it in `buffered` mode
    /// until the next flush.
    pub fn written(&self) -> Seq {
        self.shared.feed.written()
    }

    /// Highest committed (and published) seq.
    pub fn head(&self) -> Seq {
        self.shared.feed.head()
    }

    pub(crate) fn feed(&self) -> &Feed {
        &self.shared.feed
    }

    /// Applies a validated batch through the group-commit writer.
    pub async fn push(&self, batch: PushBatch) -> Result<PushOutcome, StoreError> {
        self.push_by(batch, None).await
    }

    /// As [`Store::push`], unless `deadline` passes before the writer
    /// takes it up: then nothing of it is committed
    /// ([`StoreError::DeadlineExceeded`]).
    pub async fn push_by(
        &self,
        batch: PushBatch,
        deadline: Option<std::time::Instant>,
    ) -> Result<PushOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        let batch = Arc::new(batch);
        let job = Job {
            batch: batch.clone(),
            reply,
            deadline,
        };
        self.shared
            .writer
            .send(Command::Push(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        let outcome = rx.await.map_err(|_| StoreError::Closed)?;
        drop(batch);
        outcome
    }

    /// One page of documents changed after `since`, up to the current head.
    /// If more remain, the next page is read ahead (see [`readahead`]).
    /// `seen` is the purge horizon `since` is consistent with (see
    /// [`Feed::check_horizon`]); the page says which one it is.
    pub async fn pull(
        &self,
        since: Seq,
        seen: Seq,
        filter: CollectionFilter,
        limit: PageLimit,
    ) -> Result<PullPage, StoreError> {
        let upto = self.head();
        self.feed().check_horizon(since, seen)?;
        let mut read = match self.shared.readahead.take(since, upto, &filter, limit) {
            Some(read) => read,
            None => self.spawn_read(since, upto, filter.clone(), limit),
        };
        let page = self.finish_read(since, seen, &mut read).await?;
        if page.has_more {
            let next = page.checkpoint;
            self.shared
                .readahead
                .start(next, upto, filter.clone(), limit, || {
                    self.spawn_read(next, upto, filter, limit)
                });
        }
        Ok(page)
    }

    /// Starts reading changes in `(since, upto]`. Fails with
    /// [`StoreError::Compacted`] if `since` is below the purge horizon.
    pub(crate) fn start_read(
        &self,
        since: Seq,
        seen: Seq,
        upto: Seq,
        filter: CollectionFilter,
        limit: PageLimit,
    ) -> Result<tokio::task::JoinHandle<Result<PullPage, StoreError>>, StoreError> {
        self.feed().check_horizon(since, seen)?;
        Ok(self.spawn_read(since, upto, filter, limit))
    }

    /// Waits for a read started after `since` passed the horizon check, and
    /// checks again: a purge racing with the read cannot go unnoticed.
    /// Cancel-safe: the read goes on in `read` if the caller stops waiting.
    /// The page says which purge horizon it is consistent with.
    pub(crate) async fn finish_read(
        &self,
        since: Seq,
        seen: Seq,
        read: &mut tokio::task::JoinHandle<Result<PullPage, StoreError>>,
    ) -> Result<PullPage, StoreError> {
        let mut page = joined(read.await)?;
        page.horizon = self.feed().check_horizon(since, seen)?;
        Ok(page)
    }

    /// Starts reading changes in `(since, upto]` on the blocking pool.
    fn spawn_read(
        &self,
        since: Seq,
        upto: Seq,
        filter: CollectionFilter,
        limit: PageLimit,
    ) -> tokio::task::JoinHandle<Result<PullPage, StoreError>> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            pull::read_changes(&shared.trees, &shared.index, since, upto, &filter, limit)
        })
    }

    /// Fails with [`StoreError::Compacted`] if `since` (not 0) is below the
    /// purge horizon and tombstones were purged after `seen`; returns the
    /// horizon the checkpoint is consistent with.
    pub fn check_checkpoint(&self, since: Seq, seen: Seq) -> Result<Seq, StoreError> {
        self.feed().check_horizon(since, seen)
    }

    /// Waits until `seq` is readable, if it was acknowledged but is not yet
    /// durable (`buffered` mode: about one flush interval); returns whether
    /// it was ever acknowledged (`false`: the checkpoint is not this
    /// store's). Fails with [`StoreError::Stopped`] if the writer stopped
    /// before it became durable (it never will be here),
    /// [`StoreError::Closed`] on shutdown and [`StoreError::NotYetDurable`]
    /// if flushes are far slower than their interval: never with a
    /// "resync" answer for a checkpoint this store gave out.
    pub async fn await_durable(&self, seq: Seq) -> Result<bool, StoreError> {
        let feed = self.feed();
        if seq <= feed.head() {
            return Ok(true);
        }
        if seq > feed.written() {
            return Ok(false);
        }
        let patience = self.shared.flush_interval * 2 + Duration::from_secs(5);
        let mut writable = self.writable();
        let published = tokio::select! {
            published = feed.wait_published(seq, patience) => published,
            stopped = writable.wait_for(|w| !w) => {
                return Err(match stopped {
                    Ok(_) => StoreError::Stopped,
                    Err(_) => StoreError::Closed,
                });
            }
        };
        if published {
            Ok(true)
        } else {
            Err(StoreError::NotYetDurable(seq.0))
        }
    }

    /// Changes to `false` once the store stops taking writes (after a
    /// failed flush): the server then reports itself not serving.
    pub fn writable(&self) -> watch::Receiver<bool> {
        self.shared.writable.clone()
    }

    /// The purge horizon: checkpoints below it (other than 0) are refused.
    pub fn purge_horizon(&self) -> Seq {
        self.feed().horizon()
    }

    /// Current documents by id; unknown ids are omitted.
    pub async fn get(
        &self,
        collection: String,
        ids: Vec<String>,
    ) -> Result<Vec<Document>, StoreError> {
        let shared = self.shared.clone();
        blocking(move || pull::get(&shared.trees, &shared.index, &collection, &ids)).await
    }

    /// The highest processed mutation id of a client, as of the last
    /// durable commit.
    pub fn last_mutation_id(&self, client_id: &str) -> Result<u64, StoreError> {
        // The tree first, then the in-flight entries: see `Unflushed`.
        let stored = match self.shared.trees.clients.get(client_id.as_bytes())? {
            Some(bytes) => clients::ClientState::decode(&bytes)?.last,
            None => 0,
        };
        Ok(self
            .shared
            .unflushed
            .durable_last(client_id)
            .unwrap_or(stored))
    }

    /// A live feed of changes after `since` (consistent with purge horizon
    /// `seen`): backlog first, then live.
    pub fn subscribe(
        &self,
        since: Seq,
        seen: Seq,
        filter: CollectionFilter,
        page: PageLimit,
    ) -> Subscription {
        Subscription::new(self.clone(), since, seen, filter, page)
    }

    /// Finishes queued pushes, flushes and stops the writer. Pushes after
    /// this fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.shared.writer.send(Command::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
        let thread = self
            .shared
            .writer_thread
            .lock()
            .ok()
            .and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let flusher = self.shared.flusher.lock().ok().and_then(|mut f| f.take());
        if let Some((stop, thread)) = flusher {
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Whether a store whose writer wrote up to `written` holds nothing at all.
fn is_blank(trees: &Trees, written: Seq) -> bool {
    written == Seq(0) && trees.log.is_empty() && trees.clients.is_empty()
}

/// Runs a blocking sled read off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    joined(tokio::task::spawn_blocking(f).await)
}

/// The result of a blocking read; a read that panicked is logged.
fn joined<T>(
    result: Result<Result<T, StoreError>, tokio::task::JoinError>,
) -> Result<T, StoreError> {
    result.unwrap_or_else(|e| {
        tracing::error!(cause = %e, "blocking read task failed");
        Err(StoreError::ReadFailed)
    })
}

/// Makes or reads the store's identity.
fn init_store_id(meta: &sled::Tree) -> Result<String, StoreError> {
    let fresh = uuid::Uuid::new_v4().to_string();
    // Only the first open's id sticks.
    let _ = meta.compare_and_swap(
        keys::META_STORE_ID,
        None as Option<&[u8]>,
        Some(fresh.as_bytes()),
    )?;
    let id = meta
        .get(keys::META_STORE_ID)?
        .ok_or_else(|| StoreError::corrupt(keys::META, "store_id missing"))?;
    String::from_utf8(id.to_vec())
        .map_err(|_| StoreError::corrupt(keys::META, "store_id is not UTF-8"))
}

fn read_meta_u64(meta: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    pull::read_u64(meta, keys::META, key)
}

/// The time of the newest record: commit times go on from it, so they do
/// not go backwards across a restart either.
fn last_commit_time(trees: &Trees) -> Result<SystemTime, StoreError> {
    match trees.log.last()? {
        Some((_, bytes)) => Ok(codec::Record::parse(&bytes)?.updated_at()),
        None => Ok(SystemTime::UNIX_EPOCH),
    }
}

/// Reads the head seq, the commit mark, removes records past it (a group
/// commit cut short by a crash, see `Writer::write`) and replays the last
/// group's client states from its redo record.
fn recover_head(db: &sled::Db, trees: &Trees) -> Result<Seq, StoreError> {
    let head = Seq(read_meta_u64(&trees.meta, keys::META_HEAD)?);
    let discarded = writer::discard_uncommitted(trees, head)?;
    if discarded > 0 {
        tracing::warn!(discarded, %head, "removed the records of a commit that did not complete");
    }
    let redo = redo::recover(trees, head)?;
    if redo == Some(true) {
        tracing::info!(%head, "wrote the last commit's client states again from its redo record");
    }
    if discarded > 0 || redo.is_some() {
        db.flush()?;
    }
    Ok(head)
}

/// Helpers for the store's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::model::{Mutation, Op, PushBatch, Strategy};

    /// A mutation of document `id` in collection `c`: untracked,
    /// unconditional, rejecting conflicts. Tests change what their rule
    /// needs with struct update syntax.
    pub fn mutation(id: &str, op: Op) -> Mutation {
        Mutation {
            mutation_id: 0,
            collection: "c".into(),
            id: id.into(),
            base_version: None,
            op,
            strategy: Strategy::Reject,
        }
    }

    /// An anonymous, non-atomic batch.
    pub fn batch(mutations: Vec<Mutation>) -> PushBatch {
        PushBatch {
            client_id: String::new(),
            updated_by: String::new(),
            mutations,
            atomic: false,
        }
    }

    /// Opens a store directory again in this process. sled lets go of a
    /// closed store's file lock only when its background I/O threads drop
    /// their last handle, a moment after ours; there is no event to wait
    /// for, so this retries (bounded) while the lock is still held.
    pub fn reopen<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> T {
        for _ in 0..500 {
            match open() {
                Ok(opened) => return opened,
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("reopening failed: {e}"),
            }
        }
        panic!("the store is still locked after 5 s")
    }
}
