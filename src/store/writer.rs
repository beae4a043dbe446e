//! The single writer: group commit.
//!
//! Every push goes through one thread. It takes the first waiting push, then
//! every other push already queued (up to a cap), plans them all against the
//! committed state (`push`), writes the plan as one commit (records, then the
//! head as the commit mark), makes that durable with one flush (in `fsync`
//! mode), updates the index, publishes the commit to the feed and only then
//! answers each caller. One writer also means seqs are assigned without
//! contention and nothing else changes the state a plan was made against.

use std::{
    cell::Cell,
    sync::Arc,
    time::{Instant, SystemTime},
};

use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError},
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Clock, Durability, Trees, codec,
    compaction::{Purge, Removed},
    error::StoreError,
    feed::{Commit, Feed},
    index::Index,
    keys,
    model::{PushBatch, PushOutcome, Seq},
    push::{self, GroupCommit},
};

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
}

/// What the writer is asked to do.
pub enum Command {
    /// Apply a push.
    Push(Job),
    /// Apply one batch of retention deletions.
    Compact(Purge, oneshot::Sender<Result<Removed, StoreError>>),
    /// Finish queued work, flush, and stop.
    Close(oneshot::Sender<()>),
}

/// The writer's state; runs on its own thread.
pub struct Writer {
    /// The database, for flushes.
    pub db: sled::Db,
    /// The trees a push touches.
    pub trees: Trees,
    /// The document index, changed only here, after each commit.
    pub index: Index,
    /// Where commits are published.
    pub feed: Feed,
    /// fsync before acknowledging, or not.
    pub durability: Durability,
    /// Source of `updated_at`.
    pub clock: Clock,
    /// Most mutations gathered into one group commit.
    pub max_group_mutations: usize,
    /// Time of the last commit: commit times never go backwards, so seq
    /// order is time order even if the system clock is stepped back.
    pub last_time: Cell<SystemTime>,
    /// Set when a flush fails: what is on disk is then unknown, so the
    /// writer takes no more commits until a restart recovers from the disk
    /// (as PostgreSQL does after a failed fsync, rather than retrying it).
    pub stopped: Cell<bool>,
}

impl Writer {
    /// Serves commands until closed.
    pub fn run(self, mut rx: mpsc::Receiver<Command>) {
        let mut jobs = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut close = None;
            let mut mutations = 0;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Push(job) => {
                        mutations += job.batch.mutations.len();
                        jobs.push(job);
                    }
                    Command::Compact(purge, reply) => {
                        // Pushes gathered so far commit first, keeping queue order.
                        self.commit(std::mem::take(&mut jobs));
                        let _ = reply.send(self.purge(&purge));
                    }
                    Command::Close(ack) => {
                        close = Some(ack);
                        break;
                    }
                }
                if mutations < self.max_group_mutations {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(std::mem::take(&mut jobs));
            if let Some(ack) = close {
                self.flush();
                let _ = ack.send(());
                return;
            }
        }
        self.flush();
    }

    fn commit(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        if self.stopped.get() {
            return fail_all(jobs);
        }
        let started = Instant::now();
        let now = codec::stored_time((self.clock)()).max(self.last_time.get());
        self.last_time.set(now);
        let batches: Vec<&PushBatch> = jobs.iter().map(|j| &*j.batch).collect();
        let group = match push::apply_group(&self.trees, &self.index, &batches, now) {
            Ok(group) => group,
            Err(e) => {
                tracing::error!(cause = %e, pushes = jobs.len(), "planning a group commit failed");
                return fail_all(jobs);
            }
        };
        let wrote = group.head != group.prev_head || !group.clients.is_empty();
        if wrote && let Err(e) = self.write(&group) {
            tracing::error!(cause = %e, pushes = jobs.len(), "group commit failed");
            return fail_all(jobs);
        }
        if self.durability == Durability::Fsync
            && wrote
            && let Err(e) = self.db.flush()
        {
            // The commit may or may not survive a crash now; callers retry
            // with the same mutation ids and get APPLIED or DUPLICATE. The
            // index and the feed stay at the last durable commit.
            tracing::error!(cause = %e, "flush after commit failed; no more writes until restarted");
            self.stopped.set(true);
            return fail_all(jobs);
        }
        tracing::trace!(pushes = jobs.len(), changes = group.changes.len(), head = %group.head, elapsed = ?started.elapsed(), "group committed");
        self.index.apply(group.index);
        if group.head != group.prev_head {
            self.feed.publish(Commit {
                prev_head: group.prev_head,
                head: group.head,
                docs: group.changes.into_iter().map(Arc::new).collect(),
            });
        }
        for (job, outcome) in jobs.into_iter().zip(group.outcomes) {
            let _ = job.reply.send(Ok(outcome));
        }
    }

    /// Writes a planned group: its records first, as one batch, then the
    /// clients' mutation ids and the head together, in one transaction.
    /// The head is the commit mark: sled recovers its log as a prefix, so
    /// the head is never recovered without the records before it, and
    /// records past the recovered head (a commit cut short, never
    /// acknowledged) are removed when the store opens
    /// ([`discard_uncommitted`]). sled's multi-tree transactions read every
    /// key before writing it; the records skip that.
    fn write(&self, group: &GroupCommit) -> Result<(), StoreError> {
        let t = &self.trees;
        let mut records = sled::Batch::default();
        for (seq, record) in (group.prev_head.0 + 1..).zip(&group.records) {
            records.insert(&keys::seq_key(Seq(seq)), record.as_slice());
        }
        t.log.apply_batch(records)?;
        let marked = (&t.clients, &t.meta).transaction(|(clients, meta)| {
            for (client, last) in &group.clients {
                clients.insert(client.as_bytes(), &last.to_be_bytes())?;
            }
            if group.head != group.prev_head {
                meta.insert(keys::META_HEAD, &group.head.0.to_be_bytes())?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        });
        if let Err(e) = marked {
            // Without the mark the records are not committed: take them
            // back (a crash now leaves them for discard_uncommitted).
            for seq in group.prev_head.0 + 1..=group.head.0 {
                let _ = t.log.remove(keys::seq_key(Seq(seq)));
            }
            return Err(match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => e.into(),
            });
        }
        Ok(())
    }

    /// Removes delta-log entries and purges tombstones that are still the
    /// tombstone planned (a rewritten document is left alone), with their
    /// chains. The horizon is raised in memory before the commit, so readers
    /// re-checking it after a read cannot miss a purge.
    fn purge(&self, purge: &Purge) -> Result<Removed, StoreError> {
        if self.stopped.get() {
            return Err(StoreError::CommitFailed);
        }
        // Only this thread changes the index, so what it says now holds
        // through the commit.
        let tombstones: Vec<_> = purge
            .tombstones
            .iter()
            .filter(|t| {
                self.index
                    .get(t.key.as_bytes())
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
        self.index.remove(tombstones.iter().map(|t| &t.key));
        Ok(removed)
    }

    fn flush(&self) {
        if let Err(e) = self.db.flush() {
            tracing::error!(cause = %e, "final flush failed");
        }
    }
}

/// Answers every job of a failed group; the cause is already logged.
fn fail_all(jobs: Vec<Job>) {
    for job in jobs {
        let _ = job.reply.send(Err(StoreError::CommitFailed));
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
        let page = store.pull(Seq(0), all.clone(), limit).await.unwrap();
        assert_eq!(page.documents.len(), 1);
        let torn = store.get("c".into(), vec!["torn".into()]).await.unwrap();
        assert!(torn.is_empty());
        let outcome = store.push(put("b")).await.unwrap();
        assert_eq!(outcome.results[0].outcome, Outcome::Applied);
        assert_eq!(outcome.checkpoint, Seq(2));
        let page = store.pull(Seq(1), all, limit).await.unwrap();
        let ids: Vec<_> = page.documents.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["b"]);
        store.close().await;
    }
}
