//! The single writer: group commit.
//!
//! Every push goes through one thread. It takes the first waiting push, then
//! every other push already queued (up to a cap), plans them all against the
//! committed state (`push`), writes the plan as one commit (records, then the
//! head as the commit mark) and makes it durable: in `fsync` mode with one
//! flush before anyone is answered; in `buffered` mode the callers are
//! answered at once and a flusher thread flushes every flush interval.
//!
//! Readers see a commit only once it is durable: only then does the writer
//! *publish* it, updating the index, the clients' published mutation ids
//! and the feed. Until then its index entries stay in an overlay that only
//! planning reads. So a crash never takes back anything a reader saw. One
//! writer also means seqs are assigned without contention and nothing else
//! changes the state a plan was made against.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use sled::{Transactional, transaction::ConflictableTransactionError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;

use super::{
    Clock, Durability, Trees,
    clients::{ClientState, Unflushed},
    codec,
    compaction::{Forget, Purge, Removed},
    error::StoreError,
    feed::{Commit, Feed},
    index::{DocMap, Entry, Index},
    keys::{self, DocKey},
    model::{Document, PushBatch, PushOutcome, Seq},
    pull,
    push::{self, GroupCommit, Limits},
    redo,
    replica::{self, ClientsProgress, Epochs, ReplicatedCommit},
};

/// Most document bytes in one commit published to subscribers when durable
/// commits are merged (one commit bigger than this stays whole).
const FEED_CHUNK_BYTES: usize = 1 << 20;

/// Removes records past the head when the store opens: they belong to a
/// group commit whose head never reached the disk, so it was never
/// acknowledged or published. Returns how many there were.
pub fn discard_uncommitted(trees: &Trees, head: Seq) -> Result<usize, StoreError> {
    let mut removed = 0;
    for key in trees.log.range(keys::seq_key(Seq(head.0 + 1))..).keys() {
        trees.log.remove(key?)?;
        removed += 1;
    }
    Ok(removed)
}

/// A push waiting for the writer.
pub struct Job {
    /// The validated batch. Shared with the caller, which keeps it until
    /// answered, so freeing it is the caller's work, not the writer's.
    pub batch: Arc<PushBatch>,
    /// Where its outcome goes.
    pub reply: oneshot::Sender<Result<PushOutcome, StoreError>>,
    /// Not committed if this passes before the writer takes it up (the
    /// call's deadline: its caller has stopped waiting).
    pub deadline: Option<Instant>,
}

/// A replicated commit waiting for the writer.
pub struct ReplicaJob {
    /// The commit.
    pub commit: ReplicatedCommit,
    /// The head once it is written (durable in `fsync` mode).
    pub reply: oneshot::Sender<Result<Seq, StoreError>>,
}

/// A change to the store's identity or epochs, made in order with commits.
#[derive(Debug)]
pub enum Admin {
    /// Take the primary's store id (only an empty store may).
    AdoptStoreId(String),
    /// Take this epoch history (a primary's, or this node's promotion)
    /// and note the highest epoch seen.
    SetEpochs(Epochs, u64),
    /// Note a higher epoch seen elsewhere: a primary is then deposed.
    SeenEpoch(u64),
    /// Raise the purge horizon to the primary's.
    RaiseHorizon(Seq),
    /// Remove every record at or after this seq, and the client states
    /// written there (a rejoining node's divergent suffix).
    Discard(Seq),
    /// Nothing but the flush: everything queued before is durable and
    /// published once it answers.
    Flush,
    /// This replica becomes a primary with this history: its clients'
    /// states are its own from now on.
    Promote(Epochs),
}

/// What the writer is asked to do.
pub enum Command {
    /// Apply a push.
    Push(Job),
    /// Apply a commit replicated from the primary.
    Replicate(ReplicaJob),
    /// Change identity, epochs or horizon.
    Admin(Admin, oneshot::Sender<Result<(), StoreError>>),
    /// Apply one batch of retention deletions.
    Compact(Purge, oneshot::Sender<Result<Removed, StoreError>>),
    /// Forget clients unseen since a cutoff.
    Forget(Forget, oneshot::Sender<Result<usize, StoreError>>),
    /// The flusher made every write up to this count durable.
    Durable(u64),
    /// The flusher's flush failed.
    FlushFailed,
    /// Finish queued work, flush, and stop.
    Close(oneshot::Sender<()>),
}

/// Test hooks for failures that cannot be caused from outside.
#[derive(Clone, Default)]
pub struct Faults {
    /// When set, every flush fails as a full or failing disk would.
    pub fail_flush: Arc<AtomicBool>,
    /// 0: off; else one more than how many of the writer's next inserts
    /// succeed before one fails (a disk failing mid-commit; the process
    /// dying there, once the store stops). See [`Faults::fail_inserts_after`].
    inserts_left: Arc<AtomicUsize>,
}

impl Faults {
    /// From now on, `n` more inserts of the writer succeed and the next
    /// fails (`None`: none fail).
    pub fn fail_inserts_after(&self, n: Option<usize>) {
        let encoded = n.map_or(0, |n| n.saturating_add(1));
        self.inserts_left.store(encoded, Ordering::Relaxed);
    }

    /// Inserts into `tree`, or fails if told to. Only the writer thread
    /// inserts, so a load and a store suffice.
    fn insert(&self, tree: &sled::Tree, key: &[u8], value: &[u8]) -> Result<(), sled::Error> {
        match self.inserts_left.load(Ordering::Relaxed) {
            0 => {}
            1 => {
                return Err(sled::Error::Io(std::io::Error::other(
                    "injected insert failure",
                )));
            }
            left => self.inserts_left.store(left - 1, Ordering::Relaxed),
        }
        tree.insert(key, value).map(drop)
    }

    /// Flushes `db`, or fails if told to.
    pub fn flush(&self, db: &sled::Db) -> Result<usize, sled::Error> {
        if self.fail_flush.load(Ordering::Relaxed) {
            return Err(sled::Error::Io(std::io::Error::other(
                "injected flush failure",
            )));
        }
        db.flush()
    }
}

/// Durable commits merged for the feed.
struct Chunk {
    prev_head: Seq,
    head: Seq,
    docs: Vec<Arc<Document>>,
    clients: HashMap<String, ClientState>,
    bytes: usize,
}

/// A commit written but not yet published (not yet durable).
struct Unpublished {
    /// Its number in the writer's count of writes.
    write: u64,
    /// Head before it.
    prev_head: Seq,
    /// Head after it.
    head: Seq,
    /// Its new document states, for the feed.
    changes: Vec<Document>,
    /// Its index entries.
    index: DocMap<Entry>,
    /// Its clients' new states.
    clients: Vec<(String, ClientState)>,
}

/// The writer's state; runs on its own thread.
pub struct Writer {
    /// The database, for flushes.
    pub db: sled::Db,
    /// The trees a push touches.
    pub trees: Trees,
    /// The document index, changed only here, when a commit is published.
    pub index: Index,
    /// Clients' durable mutation ids while a commit of theirs is in flight.
    pub unflushed: Unflushed,
    /// Where commits are published.
    pub feed: Feed,
    /// fsync before acknowledging, or not.
    pub durability: Durability,
    /// Source of `updated_at`.
    pub clock: Clock,
    /// Most mutations gathered into one group commit.
    pub max_group_mutations: usize,
    /// Largest body a document may be stored with.
    pub max_body_bytes: usize,
    /// Time of the last commit: commit times never go backwards, so seq
    /// order is time order even if the system clock is stepped back.
    pub last_time: Cell<SystemTime>,
    /// Set when a flush fails: what is on disk is then unknown, so the
    /// writer takes no more commits until a restart recovers from the disk
    /// (as PostgreSQL does after a failed fsync, rather than retrying it).
    pub stopped: Cell<bool>,
    /// Tells the server the store stopped taking writes (false).
    pub writable: watch::Sender<bool>,
    /// Failure injection for tests.
    pub faults: Faults,
    /// Counts every write to sled (commits, purges, forgotten clients); the
    /// flusher reads it before a flush and reports it durable after. A seq
    /// cannot serve: a commit that only records clients' ids has none.
    pub writes: Arc<AtomicU64>,
    /// Most document bytes written but not yet durable in `buffered` mode:
    /// past it the writer flushes at once rather than hold more.
    pub max_unflushed_bytes: usize,
    /// The current epoch, stamped on published commits.
    pub epoch: Cell<u64>,
    /// Tombstones above this seq stay (a replica has not acknowledged
    /// them yet); `u64::MAX`: no hold.
    pub purge_floor: Arc<AtomicU64>,
    /// Counts group commits, flushes and pushed mutations' outcomes.
    pub metrics: Metrics,
    /// Whether the store is marked as possibly holding a redo record
    /// ([`redo::begin`]), done before the first one this process writes.
    pub redo_marked: Cell<bool>,
}

/// State only the writer thread touches.
#[derive(Default)]
struct Local {
    /// Commits written, oldest first, waiting to be durable.
    unpublished: VecDeque<Unpublished>,
    /// What their documents take (as the feed counts them).
    unpublished_bytes: usize,
    /// The newest unpublished index entry of each document they touch.
    overlay: DocMap<Entry>,
}

impl Writer {
    /// Serves commands until closed.
    pub fn run(self, mut rx: mpsc::Receiver<Command>) {
        let local = RefCell::new(Local::default());
        let mut jobs = Vec::new();
        let mut replicated = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut close = None;
            let mut mutations = 0;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                // Work gathered so far commits first, keeping queue order.
                if !matches!(cmd, Command::Replicate(_)) {
                    self.replicate(&local, std::mem::take(&mut replicated));
                }
                match cmd {
                    Command::Push(job) => {
                        mutations += job.batch.mutations.len();
                        jobs.push(job);
                    }
                    Command::Replicate(job) => {
                        self.commit(&local, std::mem::take(&mut jobs));
                        mutations += job.commit.records.len().max(1);
                        replicated.push(job);
                    }
                    Command::Admin(admin, reply) => {
                        self.commit(&local, std::mem::take(&mut jobs));
                        let _ = reply.send(self.admin(&mut local.borrow_mut(), admin));
                    }
                    Command::Compact(purge, reply) => {
                        self.commit(&local, std::mem::take(&mut jobs));
                        let _ = reply.send(self.purge(&local.borrow(), &purge));
                    }
                    Command::Forget(forget, reply) => {
                        self.commit(&local, std::mem::take(&mut jobs));
                        let _ = reply.send(self.forget(&forget));
                    }
                    Command::Durable(write) => self.publish(&mut local.borrow_mut(), write),
                    Command::FlushFailed => self.stop(),
                    Command::Close(ack) => {
                        close = Some(ack);
                        break;
                    }
                }
                if mutations < self.max_group_mutations {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(&local, std::mem::take(&mut jobs));
            self.replicate(&local, std::mem::take(&mut replicated));
            if let Some(ack) = close {
                self.close(&mut local.borrow_mut());
                let _ = ack.send(());
                return;
            }
        }
        self.close(&mut local.borrow_mut());
    }

    fn commit(&self, local: &RefCell<Local>, jobs: Vec<Job>) {
        // A push whose caller's deadline has passed, or whose caller is gone
        // (its call was cancelled), is not committed.
        let now = Instant::now();
        let (jobs, expired): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| j.deadline.is_none_or(|d| d > now) && !j.reply.is_closed());
        fail_all(expired, || StoreError::DeadlineExceeded);
        if jobs.is_empty() {
            return;
        }
        if self.stopped.get() {
            return fail_all(jobs, || StoreError::Stopped);
        }
        let started = Instant::now();
        let now = codec::stored_time((self.clock)()).max(self.last_time.get());
        self.last_time.set(now);
        let batches: Vec<&PushBatch> = jobs.iter().map(|j| &*j.batch).collect();
        let limits = Limits {
            max_body_bytes: self.max_body_bytes,
            purge_horizon: self.feed.horizon(),
        };
        let planned = push::apply_group(
            &self.trees,
            &self.index,
            &local.borrow().overlay,
            &batches,
            now,
            limits,
        );
        let group = match planned {
            Ok(group) => group,
            Err(e) => {
                tracing::error!(cause = %e, pushes = jobs.len(), "planning a group commit failed");
                return fail_all(jobs, || StoreError::CommitFailed);
            }
        };
        let pushes = jobs.len();
        let outcomes = match self.land(local, group) {
            Ok(outcomes) => outcomes,
            Err(e) => return fail_all(jobs, || e.clone_kind()),
        };
        tracing::trace!(pushes, elapsed = ?started.elapsed(), "group committed");
        self.metrics
            .group_commit(jobs.iter().map(|j| j.batch.mutations.len()).sum());
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            if let Ok(outcome) = &outcome {
                self.metrics.push_mutations(
                    job.batch
                        .mutations
                        .iter()
                        .zip(&outcome.results)
                        .map(|(m, r)| (m.collection.as_str(), r.outcome, m.strategy)),
                );
            }
            let _ = job.reply.send(outcome);
        }
    }

    /// Applies replicated commits as one local commit; each is answered
    /// with the head once written (durable in `fsync` mode).
    fn replicate(&self, local: &RefCell<Local>, jobs: Vec<ReplicaJob>) {
        if jobs.is_empty() {
            return;
        }
        if self.stopped.get() {
            for job in jobs {
                let _ = job.reply.send(Err(StoreError::Stopped));
            }
            return;
        }
        let (commits, replies): (Vec<ReplicatedCommit>, Vec<_>) =
            jobs.into_iter().map(|j| (j.commit, j.reply)).unzip();
        self.metrics
            .group_commit(commits.iter().map(|c| c.records.len()).sum());
        let head = self.feed.written();
        let planned = ClientsProgress::read(&self.trees.meta, head).and_then(|progress| {
            replica::plan(
                &self.trees,
                &self.index,
                &local.borrow().overlay,
                head,
                progress,
                commits,
            )
        });
        let result = planned.and_then(|group| {
            // Commit times go on from the primary's: after a promotion
            // they still never go backwards.
            if let Some(last) = group.changes.iter().map(|d| d.updated_at).max() {
                self.last_time.set(self.last_time.get().max(last));
            }
            let head = group.head;
            self.land(local, group).map(|_| head)
        });
        for reply in replies {
            let _ = reply.send(match &result {
                Ok(head) => Ok(*head),
                Err(e) => Err(e.clone_kind()),
            });
        }
    }

    /// Writes a planned group, makes it durable as the durability mode
    /// says and publishes it; returns its outcomes. On failure the cause is
    /// logged and the error says what callers are told.
    fn land(
        &self,
        local: &RefCell<Local>,
        group: GroupCommit,
    ) -> Result<Vec<Result<PushOutcome, StoreError>>, StoreError> {
        let wrote = group.head != group.prev_head
            || !group.clients.is_empty()
            || group.clients_progress.is_some();
        if wrote && let Err(e) = self.write(&group) {
            tracing::error!(cause = %e, "group commit failed");
            return Err(match e {
                StoreError::OutcomeUnknown => e,
                _ => StoreError::CommitFailed,
            });
        }
        let GroupCommit {
            outcomes,
            changes,
            clients,
            index,
            prev_head,
            head,
            ..
        } = group;
        if !wrote {
            return Ok(outcomes);
        }
        let commit = Unpublished {
            write: self.writes.fetch_add(1, Ordering::AcqRel) + 1,
            prev_head,
            head,
            changes,
            index,
            clients: clients.into_iter().map(|(c, w)| (c, w.state)).collect(),
        };
        self.feed.set_written(head);
        let mut local = local.borrow_mut();
        let (direct, flush_now) = match self.durability {
            Durability::Fsync => (Some(commit), true),
            Durability::Buffered => {
                let overlay = commit.index.iter().map(|(k, e)| (k.clone(), *e));
                local.overlay.extend(overlay);
                local.unpublished_bytes +=
                    commit.changes.iter().map(pull::wire_size).sum::<usize>();
                local.unpublished.push_back(commit);
                // Bounded memory: a backlog past the bound is flushed
                // now instead of waiting for the flusher.
                (None, local.unpublished_bytes > self.max_unflushed_bytes)
            }
        };
        if flush_now {
            let write = self.writes.load(Ordering::Acquire);
            let flushing = Instant::now();
            let flushed = self.faults.flush(&self.db);
            self.metrics.fsync(flushing.elapsed());
            if let Err(e) = flushed {
                // The commit may or may not survive a crash now: its
                // callers are told to retry with the same mutation ids,
                // which get the truth. Readers stay at the last durable
                // commit.
                tracing::error!(cause = %e, "flush after commit failed; no more writes until restarted");
                drop(local);
                self.stop();
                return Err(StoreError::OutcomeUnknown);
            }
            match direct {
                // Nothing is planned between an fsync commit and its
                // flush, so it needs no overlay.
                Some(commit) => self.publish_all(vec![commit]),
                None => self.publish(&mut local, write),
            }
        }
        Ok(outcomes)
    }

    /// Publishes the buffered commits among the first `durable` writes.
    fn publish(&self, local: &mut Local, durable: u64) {
        let mut ready = Vec::new();
        while local
            .unpublished
            .front()
            .is_some_and(|c| c.write <= durable)
        {
            let Some(commit) = local.unpublished.pop_front() else {
                break;
            };
            for (key, entry) in &commit.index {
                if local.overlay.get(key) == Some(entry) {
                    local.overlay.remove(key);
                }
            }
            local.unpublished_bytes -= commit.changes.iter().map(pull::wire_size).sum::<usize>();
            ready.push(commit);
        }
        self.publish_all(ready);
    }

    /// Makes durable commits (consecutive, in order) visible: index,
    /// clients' ids, feed. Subscribers get them merged into commits of up
    /// to [`FEED_CHUNK_BYTES`], so a flush of many small buffered commits
    /// does not overrun the ring, nor make one huge commit.
    fn publish_all(&self, commits: Vec<Unpublished>) {
        let mut chunks: Vec<Chunk> = Vec::new();
        self.index.apply(commits.into_iter().flat_map(|c| {
            let bytes: usize = c.changes.iter().map(pull::wire_size).sum();
            match chunks.last_mut() {
                Some(chunk) if chunk.bytes + bytes <= FEED_CHUNK_BYTES => {
                    chunk.head = c.head;
                    chunk.bytes += bytes;
                }
                _ => chunks.push(Chunk {
                    prev_head: c.prev_head,
                    head: c.head,
                    docs: Vec::new(),
                    clients: HashMap::new(),
                    bytes,
                }),
            }
            if let Some(chunk) = chunks.last_mut() {
                chunk.docs.extend(c.changes.into_iter().map(Arc::new));
                // A later state of a client in the same chunk replaces the
                // earlier one: the chunk is one commit to its readers.
                for (client, state) in c.clients {
                    self.unflushed.published(&client, Some(state.last));
                    chunk.clients.insert(client, state);
                }
            }
            c.index
        }));
        for chunk in chunks {
            if chunk.head != chunk.prev_head || !chunk.clients.is_empty() {
                self.feed.publish(Commit::with_clients(
                    chunk.prev_head,
                    chunk.head,
                    self.epoch.get(),
                    chunk.docs,
                    chunk.clients.into_iter().collect(),
                ));
            }
        }
    }

    /// Takes no more writes and says so.
    fn stop(&self) {
        if !self.stopped.replace(true) {
            tracing::error!(
                "the store stopped taking writes after a failed flush; restart to recover"
            );
            let _ = self.writable.send(false);
        }
    }

    /// Flushes what is left and publishes it.
    fn close(&self, local: &mut Local) {
        if self.stopped.get() {
            return;
        }
        let write = self.writes.load(Ordering::Acquire);
        // Everything the redo record holds is written: a cleanly stopped
        // store has none, and is marked as the plain layout again, which
        // builds from before the record read.
        if let Err(e) = redo::finish(&self.trees.meta) {
            tracing::error!(cause = %e, "removing the redo record failed");
        }
        match self.faults.flush(&self.db) {
            Ok(_) => self.publish(local, write),
            Err(e) => tracing::error!(cause = %e, "final flush failed"),
        }
    }

    /// Writes a planned group with plain sled inserts, in this order: its
    /// records; if it records client states or a replica's clients'
    /// progress, a redo record holding them with the head ([`redo`]); the
    /// head; then the states and progress themselves. The head is the
    /// commit mark (for a group that only records states, the redo record
    /// is): sled recovers a prefix of its log after a process crash, so a
    /// recovered mark has what was written before it. At open, records past
    /// the recovered head are removed ([`discard_uncommitted`]) and the
    /// states of the group whose redo record matches it are written again.
    ///
    /// No `sled::Batch` and, below [`redo::MAX_BYTES`], no transaction: a
    /// transaction reads every key before writing it, and every batch or
    /// transaction first seals sled's current IO buffer and then its own
    /// (`PageCache::pin_log`), which costs two log writes with two
    /// `sync_file_range` calls on sled's thread pool, waking all its idle
    /// threads, whether or not anyone flushes. Plain inserts leave the
    /// buffer to the group's one flush (docs/benchmarks.md, "Third pass").
    ///
    /// A failure while writing the records takes them back: nothing is
    /// marked. Once a mark has been tried, a failure may leave it on disk
    /// or not (sled can fail an insert after installing it), so the store
    /// stops, as after a failed flush, callers are told the outcome is
    /// unknown, and a restart finds out.
    fn write(&self, group: &GroupCommit) -> Result<(), StoreError> {
        let t = &self.trees;
        for (doc, record) in group.changes.iter().zip(&group.records) {
            let key = keys::seq_key(doc.seq);
            if let Err(e) = self.faults.insert(&t.log, &key, record) {
                self.take_back(group);
                return Err(e.into());
            }
        }
        let moved = group.head != group.prev_head;
        let head = group.head.0.to_be_bytes();
        // The head alone (no client states, no replication progress: a push
        // without a client id) is one key, atomic by itself.
        if group.clients.is_empty() && group.clients_progress.is_none() {
            if !moved {
                return Ok(());
            }
            return self
                .faults
                .insert(&t.meta, keys::META_HEAD, &head)
                .map_err(|e| self.outcome_unknown(&e));
        }
        let states: Vec<(&String, Vec<u8>)> = group
            .clients
            .iter()
            .map(|(client, write)| (client, write.state.encode()))
            .collect();
        let progress = group.clients_progress.as_ref().map(|p| p.encode());
        let record = redo::Redo::encode(group.head, progress, &states)
            .filter(|r| r.len() <= redo::MAX_BYTES);
        if record.is_some() && !self.redo_marked.get() {
            if let Err(e) = redo::begin(&t.meta) {
                self.take_back(group);
                return Err(e);
            }
            self.redo_marked.set(true);
        }
        // Before the states are written: readers go on seeing the durable
        // ones until this commit is published.
        for (client, write) in &group.clients {
            self.unflushed.begin(client, write.stored_last);
        }
        let Some(record) = record else {
            return self.write_in_transaction(moved.then_some(head), &states, progress);
        };
        let mut written = self.faults.insert(&t.meta, keys::META_REDO, &record);
        if moved {
            written = written.and_then(|()| self.faults.insert(&t.meta, keys::META_HEAD, &head));
        }
        for (client, state) in &states {
            written =
                written.and_then(|()| self.faults.insert(&t.clients, client.as_bytes(), state));
        }
        if let Some(p) = progress {
            written =
                written.and_then(|()| self.faults.insert(&t.meta, keys::META_CLIENTS_PROGRESS, &p));
        }
        written.map_err(|e| self.outcome_unknown(&e))
    }

    /// A group whose redo record would be too big for one sled value kept
    /// inline in its log (sled stores big values in separate files, which
    /// it does not sync): its states, progress and head in one
    /// transaction, which also removes an older redo record so that it
    /// cannot be replayed over these states.
    fn write_in_transaction(
        &self,
        head: Option<[u8; 8]>,
        states: &[(&String, Vec<u8>)],
        progress: Option<[u8; 16]>,
    ) -> Result<(), StoreError> {
        let t = &self.trees;
        let marked = (&t.clients, &t.meta).transaction(|(clients, meta)| {
            for (client, state) in states {
                clients.insert(client.as_bytes(), state.as_slice())?;
            }
            meta.remove(keys::META_REDO)?;
            if let Some(head) = &head {
                meta.insert(keys::META_HEAD, head)?;
            }
            if let Some(p) = &progress {
                meta.insert(keys::META_CLIENTS_PROGRESS, p)?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        });
        marked.map_err(|e| self.outcome_unknown(&e))
    }

    /// After a failure that may or may not have left a commit marked: the
    /// store stops, and callers learn the outcome by retrying after a
    /// restart.
    fn outcome_unknown(&self, cause: &dyn std::fmt::Display) -> StoreError {
        tracing::error!(%cause, "writing a commit mark failed; no more writes until restarted");
        self.stop();
        StoreError::OutcomeUnknown
    }

    /// Removes a group's records when writing it failed before its commit
    /// mark was tried: without the mark they are not committed (a crash
    /// before this leaves them for [`discard_uncommitted`]).
    fn take_back(&self, group: &GroupCommit) {
        for doc in &group.changes {
            let _ = self.trees.log.remove(keys::seq_key(doc.seq));
        }
    }

    /// Removes delta-log entries and purges tombstones that are still the
    /// tombstone planned (a rewritten document is left alone, even by a
    /// commit not yet durable), with their chains. The horizon is raised in
    /// memory before the commit, so readers re-checking it after a read
    /// cannot miss a purge.
    fn purge(&self, local: &Local, purge: &Purge) -> Result<Removed, StoreError> {
        if self.stopped.get() {
            return Err(StoreError::Stopped);
        }
        // Only this thread changes the index, so what it says now holds
        // through the commit.
        let floor = self.purge_floor.load(Ordering::Acquire);
        let tombstones: Vec<_> = purge
            .tombstones
            .iter()
            .filter(|t| t.seq.0 <= floor)
            .filter(|t| {
                local
                    .overlay
                    .get(&t.key)
                    .copied()
                    .or_else(|| self.index.get(t.key.as_bytes()))
                    .is_some_and(|e| e.deleted && e.seq == t.seq)
            })
            .collect();
        if let Some(max) = tombstones.iter().map(|t| t.seq).max() {
            self.feed.raise_horizon(max);
        }
        let t = &self.trees;
        let result = (&t.log, &t.meta).transaction(|(log, meta)| {
            let mut removed = Removed::default();
            for seq in &purge.history {
                removed.history += usize::from(log.remove(&keys::seq_key(*seq))?.is_some());
            }
            let stored = meta
                .get(keys::META_PURGE_HORIZON)?
                .and_then(|v| keys::parse_u64(&v))
                .unwrap_or(0);
            let mut horizon = stored;
            for tomb in &tombstones {
                log.remove(&keys::seq_key(tomb.seq))?;
                for seq in &tomb.chain {
                    removed.history += usize::from(log.remove(&keys::seq_key(*seq))?.is_some());
                }
                removed.tombstones += 1;
                horizon = horizon.max(tomb.seq.0);
            }
            if horizon != stored {
                meta.insert(keys::META_PURGE_HORIZON, &horizon.to_be_bytes())?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(removed)
        });
        let removed = result.map_err(|e| {
            tracing::error!(cause = %e, "compaction batch failed");
            StoreError::CommitFailed
        })?;
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.index.remove(tombstones.iter().map(|t| &t.key));
        Ok(removed)
    }

    /// Changes identity, epochs or horizon, durably, in order with commits.
    fn admin(&self, local: &mut Local, admin: Admin) -> Result<(), StoreError> {
        if self.stopped.get() {
            return Err(StoreError::Stopped);
        }
        let meta = &self.trees.meta;
        match admin {
            Admin::AdoptStoreId(primary) => {
                let stored = meta.get(keys::META_STORE_ID)?.unwrap_or_default();
                if *stored == *primary.as_bytes() {
                    return Ok(());
                }
                if !super::is_blank(&self.trees, self.feed.written()) {
                    return Err(StoreError::StoreMismatch {
                        local: String::from_utf8_lossy(&stored).into_owned(),
                        primary,
                    });
                }
                meta.insert(keys::META_STORE_ID, primary.as_bytes())?;
            }
            Admin::SetEpochs(epochs, seen) => {
                let stored = pull::read_u64(meta, keys::META, keys::META_SEEN_EPOCH)?;
                let seen = seen.max(epochs.current()).max(stored);
                (meta.insert(keys::META_EPOCHS, epochs.encode())?);
                meta.insert(keys::META_SEEN_EPOCH, &seen.to_be_bytes())?;
                self.epoch.set(epochs.current());
            }
            Admin::SeenEpoch(seen) => {
                let stored = pull::read_u64(meta, keys::META, keys::META_SEEN_EPOCH)?;
                if seen <= stored {
                    return Ok(());
                }
                meta.insert(keys::META_SEEN_EPOCH, &seen.to_be_bytes())?;
            }
            Admin::RaiseHorizon(horizon) => {
                let stored = pull::read_u64(meta, keys::META, keys::META_PURGE_HORIZON)?;
                if horizon.0 <= stored {
                    return Ok(());
                }
                self.feed.raise_horizon(horizon);
                meta.insert(keys::META_PURGE_HORIZON, &horizon.0.to_be_bytes())?;
            }
            Admin::Discard(from) => self.discard(local, from)?,
            Admin::Flush => {}
            Admin::Promote(epochs) => {
                let epoch = epochs.current();
                // Nor bring the clients' progress back after this.
                redo::clear(meta)?;
                meta.insert(keys::META_EPOCHS, epochs.encode())?;
                meta.insert(keys::META_SEEN_EPOCH, &epoch.to_be_bytes())?;
                meta.remove(keys::META_CLIENTS_PROGRESS)?;
                self.epoch.set(epoch);
            }
        }
        let write = self.writes.fetch_add(1, Ordering::AcqRel) + 1;
        self.faults.flush(&self.db)?;
        self.publish(local, write);
        Ok(())
    }

    /// Removes the records at or after `from` (each document dropped is
    /// logged), puts the documents back at their state before it, moves
    /// the head back and forgets every client state (the primary sends them
    /// all again). Refused if a document's state before `from` was already
    /// removed by retention: then only a copy from an empty store is right.
    fn discard(&self, local: &mut Local, from: Seq) -> Result<(), StoreError> {
        // Unpublished commits would be part of what goes.
        let write = self.writes.load(Ordering::Acquire);
        self.faults.flush(&self.db)?;
        self.publish(local, write);
        let log = &self.trees.log;
        let mut restore: DocMap<Option<Entry>> = DocMap::default();
        let mut dropped = Vec::new();
        for entry in log.range(keys::seq_key(from)..) {
            let (key, value) = entry?;
            let seq = super::index::parse_seq(&key)?;
            let record = codec::Record::parse(&value)?;
            let doc_key = DocKey::from_stored(record.key());
            if let std::collections::hash_map::Entry::Vacant(slot) = restore.entry(doc_key) {
                let before = match record.prev {
                    Seq(0) => None,
                    prev => {
                        let bytes = log.get(keys::seq_key(prev))?.ok_or_else(|| {
                            StoreError::Replication(format!(
                                "the state before seq {from} of a divergent document is gone \
                                 (retention removed seq {prev}); start this node from an empty data directory"
                            ))
                        })?;
                        let old = codec::Record::parse(&bytes)?;
                        Some(Entry {
                            seq: prev,
                            version: old.version,
                            deleted: old.deleted,
                        })
                    }
                };
                slot.insert(before);
            }
            dropped.push((seq, record.key().to_vec(), record.version));
        }
        for (seq, key, version) in &dropped {
            let (collection, id) = keys::parse_doc_key(key).unwrap_or(("?", "?"));
            tracing::warn!(%seq, collection, id, %version, "discarding a divergent change");
        }
        let head = Seq(from.0.saturating_sub(1));
        let mut batch = sled::Batch::default();
        for (seq, _, _) in &dropped {
            batch.remove(&keys::seq_key(*seq));
        }
        log.apply_batch(batch)?;
        redo::clear(&self.trees.meta)?;
        self.trees.clients.clear()?;
        self.trees
            .meta
            .insert(keys::META_HEAD, &head.0.to_be_bytes())?;
        // Every client state is copied again from the primary.
        let progress = ClientsProgress {
            from: 0,
            consistent_at: None,
        };
        self.trees
            .meta
            .insert(keys::META_CLIENTS_PROGRESS, &progress.encode())?;
        let (back, gone): (Vec<_>, Vec<_>) = restore.into_iter().partition(|(_, e)| e.is_some());
        self.index.remove(gone.iter().map(|(k, _)| k));
        self.index
            .apply(back.into_iter().filter_map(|(k, e)| e.map(|e| (k, e))));
        self.feed.reset_head(head);
        tracing::warn!(
            from = %from,
            documents = dropped.len(),
            "discarded the divergent suffix; client states will be copied again from the primary"
        );
        Ok(())
    }

    /// Forgets the clients of `forget` that are still unseen since its
    /// cutoff (a push may have come in since they were chosen).
    fn forget(&self, forget: &Forget) -> Result<usize, StoreError> {
        if self.stopped.get() {
            return Err(StoreError::Stopped);
        }
        // An old redo record must not bring a forgotten client back.
        redo::clear(&self.trees.meta)?;
        let mut gone = Vec::new();
        for client in &forget.clients {
            let Some(bytes) = self.trees.clients.get(client.as_bytes())? else {
                continue;
            };
            if ClientState::decode(&bytes)?.unseen_since(forget.cutoff) {
                self.trees.clients.remove(client.as_bytes())?;
                gone.push(client);
            }
        }
        self.writes.fetch_add(1, Ordering::AcqRel);
        Ok(gone.len())
    }
}

/// Flushes every `interval` when something was written since the last
/// flush and tells the writer how many writes that made durable. Ends when
/// `stop` is dropped or the writer is gone.
pub fn run_flusher(
    db: sled::Db,
    writes: Arc<AtomicU64>,
    faults: Faults,
    interval: Duration,
    writer: mpsc::Sender<Command>,
    stop: std::sync::mpsc::Receiver<()>,
    metrics: &Metrics,
) {
    let mut flushed = writes.load(Ordering::Acquire);
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        // Every write counted before this read is covered by the flush.
        let written = writes.load(Ordering::Acquire);
        if written == flushed {
            continue;
        }
        let flushing = Instant::now();
        let result = faults.flush(&db);
        metrics.fsync(flushing.elapsed());
        let told = match result {
            Ok(_) => {
                flushed = written;
                writer.blocking_send(Command::Durable(written))
            }
            Err(e) => {
                tracing::error!(cause = %e, "background flush failed");
                writer.blocking_send(Command::FlushFailed)
            }
        };
        if told.is_err() {
            return;
        }
    }
}

/// Answers every job of a failed group; the cause is already logged.
fn fail_all(jobs: Vec<Job>, error: impl Fn() -> StoreError) {
    for job in jobs {
        let _ = job.reply.send(Err(error()));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::{
        CollectionFilter, Options, PageLimit, Store, codec,
        keys::DocKey,
        model::{Document, EncodedBody, Op, Outcome, Version},
        testing,
    };

    fn put(id: &str) -> PushBatch {
        let body = json!({ "id": id }).as_object().unwrap().clone();
        testing::batch(vec![testing::mutation(id, Op::Put(body.into()))])
    }

    /// Rule: commit times never go backwards, when the clock is stepped back
    /// and across a restart (retention prunes a chain from its oldest end
    /// only because seq order is time order); the time acknowledged is the
    /// time stored.
    #[tokio::test]
    async fn commit_times_never_go_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = Arc::new(std::sync::atomic::AtomicU64::new(3600));
        let options = || Options {
            clock: crate::store::offset_clock(ahead.clone()),
            ..Options::default()
        };
        let time = |outcome: PushOutcome| outcome.results[0].document.as_ref().unwrap().updated_at;
        let store = Store::open(dir.path(), options()).unwrap();
        let first = time(store.push(put("a")).await.unwrap());
        let read = store.get("c".into(), vec!["a".into()]).await.unwrap();
        assert_eq!(
            read[0].updated_at, first,
            "a read returns the time acknowledged"
        );
        ahead.store(0, std::sync::atomic::Ordering::Relaxed);
        let second = time(store.push(put("b")).await.unwrap());
        assert!(second >= first, "the clock went back an hour");
        store.close().await;
        drop(store);
        let store = testing::reopen(|| Store::open(dir.path(), options()));
        let third = time(store.push(put("c")).await.unwrap());
        assert!(third >= first, "the clock went back across a restart");
        store.close().await;
    }

    /// Rule: records past the head (a group commit whose head never reached
    /// the disk) are removed when the store opens: they are not served, and
    /// their seq goes to the next real write.
    #[tokio::test]
    async fn records_past_the_head_are_discarded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        store.push(put("a")).await.unwrap();
        store.close().await;
        drop(store);
        {
            // What a crash between the records and the head leaves.
            let db = testing::reopen(|| sled::open(dir.path()));
            let log = db.open_tree(keys::LOG).unwrap();
            let key = DocKey::new("c", "torn").unwrap();
            let doc = Document {
                collection: "c".into(),
                id: "torn".into(),
                version: Version(1),
                body: EncodedBody::default(),
                deleted: false,
                seq: Seq(2),
                updated_at: std::time::SystemTime::now(),
                updated_by: "c1".into(),
            };
            let record = codec::encode(&doc, &key, Seq(0)).unwrap();
            log.insert(keys::seq_key(Seq(2)), record).unwrap();
            db.flush().unwrap();
        }
        let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
        assert_eq!(store.head(), Seq(1));
        let all = CollectionFilter::default();
        let limit = PageLimit {
            docs: 10,
            bytes: usize::MAX,
        };
        let page = store
            .pull(Seq(0), Seq(0), all.clone(), limit)
            .await
            .unwrap();
        assert_eq!(page.documents.len(), 1);
        let torn = store.get("c".into(), vec!["torn".into()]).await.unwrap();
        assert!(torn.is_empty());
        let outcome = store.push(put("b")).await.unwrap();
        assert_eq!(outcome.results[0].outcome, Outcome::Applied);
        assert_eq!(outcome.checkpoint, Seq(2));
        let page = store.pull(Seq(1), Seq(0), all, limit).await.unwrap();
        let ids: Vec<_> = page.documents.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["b"]);
        store.close().await;
    }

    /// A store in `dir` with its failure hooks.
    fn open_with_faults(dir: &std::path::Path) -> (Store, Faults) {
        let faults = Faults::default();
        let options = Options {
            faults: faults.clone(),
            ..Options::default()
        };
        (Store::open(dir, options).unwrap(), faults)
    }

    /// Client `c1`'s mutation `n`: a put of document `id`.
    fn tracked(n: u64, id: &str) -> PushBatch {
        let mut batch = put(id);
        batch.client_id = "c1".into();
        batch.updated_by = "c1".into();
        batch.mutations[0].mutation_id = n;
        batch
    }

    /// Rule: a group's client states are durable exactly when its commit
    /// is. A crash after the commit mark but before the states leaves the
    /// redo record, which puts them back at open (a retry is DUPLICATE,
    /// not applied twice); a crash before the mark leaves a record whose
    /// head is ahead, which is ignored (the retry is applied once).
    #[tokio::test]
    async fn client_states_are_durable_exactly_with_their_commit() {
        for committed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let raw = || testing::reopen(|| sled::open(dir.path()));
            let state = |db: &sled::Db| db.open_tree(keys::CLIENTS).unwrap().get("c1").unwrap();
            let store = Store::open(dir.path(), Options::default()).unwrap();
            store.push(tracked(1, "a")).await.unwrap();
            store.close().await;
            drop(store);
            let first = state(&raw()).unwrap();
            let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
            store.push(tracked(2, "b")).await.unwrap();
            store.close().await;
            drop(store);
            {
                // What a crash leaves: the second group's records and
                // redo record, its head (or the first's), and c1's state
                // still the first.
                let db = raw();
                let meta = db.open_tree(keys::META).unwrap();
                assert!(
                    meta.get(keys::META_REDO).unwrap().is_none(),
                    "a clean stop leaves no redo record"
                );
                let second = state(&db).unwrap().to_vec();
                let c1 = "c1".to_string();
                let record = redo::Redo::encode(Seq(2), None, &[(&c1, second)]).unwrap();
                meta.insert(keys::META_REDO, record).unwrap();
                if !committed {
                    meta.insert(keys::META_HEAD, &1u64.to_be_bytes()).unwrap();
                }
                db.open_tree(keys::CLIENTS)
                    .unwrap()
                    .insert("c1", first.clone())
                    .unwrap();
                db.flush().unwrap();
            }
            let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
            let retry = store.push(tracked(2, "b")).await.unwrap();
            let (want, head) = if committed {
                (Outcome::Duplicate, Seq(2))
            } else {
                (Outcome::Applied, Seq(2))
            };
            assert_eq!(retry.results[0].outcome, want, "committed: {committed}");
            assert_eq!(store.head(), head, "committed: {committed}");
            let b = store.get("c".into(), vec!["b".into()]).await.unwrap();
            assert_eq!(b[0].version, Version(1), "b written once");
            store.close().await;
        }
    }

    /// Rule: whichever insert of a group with client states fails (a disk
    /// failing there, or the process dying there: a stopped store writes
    /// nothing more), the store reopens consistent: the retry of that push
    /// is DUPLICATE if its commit is on disk and applied otherwise, the
    /// document is written exactly once, and a push that was answered
    /// applied is on disk. Guards the order of `Writer::write` (records,
    /// redo record, head, states) together with the replay at open.
    #[tokio::test]
    async fn a_commit_cut_at_any_insert_is_applied_exactly_once() {
        // The second group's inserts: its record, the redo record, the head,
        // c1's state; and one more cut that fails nothing.
        for cut in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let (store, faults) = open_with_faults(dir.path());
            store.push(tracked(1, "a")).await.unwrap();
            faults.fail_inserts_after(Some(cut));
            let first_try = store.push(tracked(2, "b")).await;
            faults.fail_inserts_after(None);
            store.close().await;
            drop(store);
            let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
            let retry = store.push(tracked(2, "b")).await.unwrap();
            let b = store.get("c".into(), vec!["b".into()]).await.unwrap();
            assert_eq!(b.len(), 1, "cut at {cut}: b is there after the retry");
            assert_eq!(b[0].version, Version(1), "cut at {cut}: b written once");
            assert_eq!(store.head(), Seq(2), "cut at {cut}");
            if let Ok(outcome) = &first_try {
                assert_eq!(outcome.results[0].outcome, Outcome::Applied);
                assert_eq!(
                    retry.results[0].outcome,
                    Outcome::Duplicate,
                    "cut at {cut}: acknowledged, so the retry is a duplicate"
                );
            }
            store.close().await;
        }
    }

    /// Rule: a store that may hold a redo record is marked so that a build
    /// from before the record refuses it; a clean stop removes the record
    /// and the mark.
    #[tokio::test]
    async fn a_pending_redo_record_is_marked_in_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults) = open_with_faults(dir.path());
        store.push(tracked(1, "a")).await.unwrap();
        // Cut after the redo record: the store stops, as at a crash.
        faults.fail_inserts_after(Some(2));
        assert!(store.push(tracked(2, "b")).await.is_err());
        store.close().await;
        drop(store);
        let schema = || {
            let db = testing::reopen(|| sled::open(dir.path()));
            let meta = db.open_tree(keys::META).unwrap();
            let version = meta
                .get(keys::META_SCHEMA)
                .unwrap()
                .and_then(|v| keys::parse_u64(&v));
            (version, meta.get(keys::META_REDO).unwrap().is_some())
        };
        assert_eq!(schema(), (Some(crate::store::SCHEMA_VERSION_REDO), true));
        let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
        store.close().await;
        drop(store);
        assert_eq!(schema(), (Some(crate::store::SCHEMA_VERSION), false));
    }

    /// Rule: forgetting a client removes the last group's redo record
    /// first, so a crash after it cannot bring the client's state back (a
    /// forgotten client's ids apply again, as its retention promises).
    #[tokio::test]
    async fn a_forgotten_client_stays_forgotten_across_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = Arc::new(AtomicU64::new(0));
        let faults = Faults::default();
        let options = || Options {
            clock: crate::store::offset_clock(ahead.clone()),
            faults: faults.clone(),
            ..Options::default()
        };
        let store = Store::open(dir.path(), options()).unwrap();
        store.push(tracked(1, "a")).await.unwrap();
        ahead.store(3 * 3600, Ordering::Relaxed);
        let hour = Duration::from_secs(3600);
        let retention = crate::store::compaction::Retention {
            history: hour,
            max_versions: 100,
            tombstones: hour,
            clients: hour,
            batch: 100,
        };
        let report = store.compact(&retention).await.unwrap();
        assert_eq!(report.removed.clients, 1, "c1 is forgotten");
        // A crash: the next commit's mark fails, the store stops and
        // writes nothing more (not even at close).
        faults.fail_inserts_after(Some(1));
        assert!(store.push(put("b")).await.is_err());
        faults.fail_inserts_after(None);
        store.close().await;
        drop(store);
        let store = testing::reopen(|| Store::open(dir.path(), options()));
        let retry = store.push(tracked(1, "a")).await.unwrap();
        assert_eq!(
            retry.results[0].outcome,
            Outcome::Applied,
            "a forgotten client's id applies again"
        );
        store.close().await;
    }

    /// Rule: a replica's commit, cut at any of its inserts (the process
    /// dying there), reopens with its client states and their progress
    /// consistent with its head: both the commit's or both the one before.
    #[tokio::test]
    async fn a_replicated_commit_cut_at_any_insert_keeps_states_with_their_head() {
        use crate::store::clients::ClientState;
        use crate::store::replica::{CommitKind, ReplicatedCommit};
        let doc = |id: &str, seq: u64| Document {
            collection: "c".into(),
            id: id.into(),
            version: Version(1),
            body: EncodedBody::default(),
            deleted: false,
            seq: Seq(seq),
            updated_at: std::time::SystemTime::now(),
            updated_by: "c1".into(),
        };
        let commit = |seq: u64| ReplicatedCommit {
            prev_head: Seq(seq - 1),
            head: Seq(seq),
            epoch: 1,
            records: vec![doc(&format!("d{seq}"), seq)],
            clients: vec![(
                "c1".into(),
                ClientState::from_parts(seq, 0, 0, seq, []).unwrap(),
            )],
            kind: CommitKind::Live,
        };
        // Its inserts: the record, the redo record, the head, c1's state,
        // the progress; and one more cut that fails nothing.
        for cut in 0..6 {
            let dir = tempfile::tempdir().unwrap();
            let (store, faults) = open_with_faults(dir.path());
            store
                .replicate(commit(1))
                .await
                .unwrap()
                .await
                .unwrap()
                .unwrap();
            faults.fail_inserts_after(Some(cut));
            let second = store.replicate(commit(2)).await.unwrap().await.unwrap();
            faults.fail_inserts_after(None);
            store.close().await;
            drop(store);
            let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
            let head = store.head();
            assert!(
                head == Seq(1) || head == Seq(2),
                "cut at {cut}: head {head}"
            );
            if second.is_ok() {
                assert_eq!(head, Seq(2), "cut at {cut}: acknowledged");
            }
            assert_eq!(
                store.last_mutation_id("c1").unwrap(),
                head.0,
                "cut at {cut}: c1's state belongs to the head"
            );
            assert_eq!(
                store.clients_progress().unwrap().from,
                head.0,
                "cut at {cut}: the progress belongs to the head"
            );
            store.close().await;
        }
    }

    /// Rule: a group whose redo record would be too big for sled to keep
    /// inline writes its states in a transaction, which also removes the
    /// older record: after a crash, that record is not replayed over the
    /// newer states.
    #[tokio::test]
    async fn a_big_group_of_states_is_not_undone_by_an_older_redo_record() {
        use crate::store::clients::ClientState;
        use crate::store::replica::{CommitKind, ReplicatedCommit};
        let state = |last: u64| ClientState::from_parts(last, 0, 0, 1, []).unwrap();
        let commit = |prev: u64, head: u64, clients: Vec<(String, ClientState)>| ReplicatedCommit {
            prev_head: Seq(prev),
            head: Seq(head),
            epoch: 1,
            records: Vec::new(),
            clients,
            kind: CommitKind::Live,
        };
        let dir = tempfile::tempdir().unwrap();
        let (store, faults) = open_with_faults(dir.path());
        let replicate = |c| async { store.replicate(c).await.unwrap().await.unwrap() };
        // A small group: its redo record names c1 at 1.
        replicate(commit(0, 0, vec![("c1".into(), state(1))]))
            .await
            .unwrap();
        // A group of states only, too big for a redo record (2,000
        // clients), moving c1 to 5.
        let mut many: Vec<_> = (0..2000)
            .map(|i| (format!("client-{i:05}"), state(1)))
            .collect();
        many.push(("c1".into(), state(5)));
        replicate(commit(0, 0, many)).await.unwrap();
        // A crash: the next group's redo record fails, the store stops.
        faults.fail_inserts_after(Some(0));
        assert!(
            replicate(commit(0, 0, vec![("c2".into(), state(1))]))
                .await
                .is_err()
        );
        faults.fail_inserts_after(None);
        store.close().await;
        drop(store);
        let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
        assert_eq!(store.last_mutation_id("c1").unwrap(), 5);
        assert_eq!(store.last_mutation_id("client-01999").unwrap(), 1);
        store.close().await;
    }
}
