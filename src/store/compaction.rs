//! Retention: pruning the delta log and purging expired tombstones.
//!
//! Planning is a read-only scan on a blocking thread; every deletion is sent
//! to the single writer in bounded batches, so compaction never races a push
//! and never holds the writer for longer than one small batch.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::{
    Store, StoreError, Trees,
    clients::ClientState,
    codec::Record,
    index::{self, Index},
    keys::{self, DocKey},
    model::Seq,
    writer::Command,
};

/// What to keep.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Delta-log entries superseded longer ago than this are pruned.
    pub history: Duration,
    /// At most this many delta-log versions are kept per document.
    pub max_versions: usize,
    /// Tombstones older than this are purged (>= `history`).
    pub tombstones: Duration,
    /// Clients unseen (no push) for longer than this are forgotten (>=
    /// `history`): a retry older than that is taken as a new mutation.
    pub clients: Duration,
    /// Most keys handed to the writer at once.
    pub batch: usize,
}

/// A batch of deletions for the writer.
#[derive(Debug, Default)]
pub struct Purge {
    /// Superseded records to remove (a superseded record never becomes
    /// current again, so these need no re-check).
    pub history: Vec<Seq>,
    /// Tombstones to purge, each only if it is still that tombstone.
    pub tombstones: Vec<Tombstone>,
}

/// A tombstone to purge with everything kept about it.
#[derive(Debug)]
pub struct Tombstone {
    /// Its document key.
    pub key: DocKey,
    /// The seq it had when planned; a changed seq means it was rewritten.
    pub seq: Seq,
    /// The records of its earlier versions still in the log.
    pub chain: Vec<Seq>,
}

/// Clients to forget, each only if still unseen since `cutoff`.
#[derive(Debug)]
pub struct Forget {
    /// Their ids.
    pub clients: Vec<String>,
    /// The time they must not have been seen since.
    pub cutoff: SystemTime,
}

/// What one batch removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Delta-log entries removed.
    pub history: usize,
    /// Tombstones purged.
    pub tombstones: usize,
    /// Clients forgotten.
    pub clients: usize,
}

/// What a compaction round did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    /// Totals removed.
    pub removed: Removed,
    /// Purge horizon afterwards.
    pub horizon: Seq,
    /// Wall time of the round.
    pub elapsed: Duration,
}

impl Store {
    /// Runs one compaction round now.
    pub async fn compact(&self, retention: &Retention) -> Result<Report, StoreError> {
        let started = Instant::now();
        let store = self.clone();
        let retention = retention.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let now = (store.shared.clock)();
            let mut planner = Planner {
                store: &store,
                batch: Purge::default(),
                removed: Removed::default(),
                limit: retention.batch.max(1),
            };
            let head = store.head();
            let shared = &store.shared;
            plan(
                &shared.trees,
                &shared.index,
                head,
                now,
                &retention,
                &mut planner,
            )?;
            planner.send()?;
            planner.forget_clients(&shared.trees, cutoff(now, retention.clients))?;
            Ok::<_, StoreError>(planner.removed)
        })
        .await
        .map_err(|e| {
            tracing::error!(cause = %e, "compaction task failed");
            StoreError::CommitFailed
        })??;
        Ok(Report {
            removed,
            horizon: self.purge_horizon(),
            elapsed: started.elapsed(),
        })
    }
}

/// Collects deletions and hands them to the writer a batch at a time.
struct Planner<'a> {
    /// Where batches are sent.
    store: &'a Store,
    /// Deletions gathered since the last send.
    batch: Purge,
    /// Totals so far.
    removed: Removed,
    /// Keys per batch.
    limit: usize,
}

impl Planner<'_> {
    fn add_history(&mut self, seq: Seq) -> Result<(), StoreError> {
        self.batch.history.push(seq);
        self.maybe_send()
    }

    fn add_tombstone(&mut self, t: Tombstone) -> Result<(), StoreError> {
        self.batch.tombstones.push(t);
        self.maybe_send()
    }

    fn maybe_send(&mut self) -> Result<(), StoreError> {
        let size = self.batch.history.len()
            + self
                .batch
                .tombstones
                .iter()
                .map(|t| 1 + t.chain.len())
                .sum::<usize>();
        if size >= self.limit {
            self.send()
        } else {
            Ok(())
        }
    }

    /// Forgets, through the writer, the clients unseen since `cutoff`.
    fn forget_clients(&mut self, trees: &Trees, cutoff: SystemTime) -> Result<(), StoreError> {
        let mut clients = Vec::new();
        for entry in trees.clients.iter() {
            let (key, value) = entry?;
            if ClientState::decode(&value)?.unseen_since(cutoff) {
                let client = String::from_utf8(key.to_vec())
                    .map_err(|_| StoreError::corrupt(keys::CLIENTS, "client id is not UTF-8"))?;
                clients.push(client);
            }
            if clients.len() >= self.limit {
                self.forget(std::mem::take(&mut clients), cutoff)?;
            }
        }
        if clients.is_empty() {
            return Ok(());
        }
        self.forget(clients, cutoff)
    }

    fn forget(&mut self, clients: Vec<String>, cutoff: SystemTime) -> Result<(), StoreError> {
        let forget = Forget { clients, cutoff };
        self.removed.clients += self.ask(|reply| Command::Forget(forget, reply))?;
        Ok(())
    }

    fn send(&mut self) -> Result<(), StoreError> {
        let purge = std::mem::take(&mut self.batch);
        if purge.history.is_empty() && purge.tombstones.is_empty() {
            return Ok(());
        }
        let removed = self.ask(|reply| Command::Compact(purge, reply))?;
        self.removed.history += removed.history;
        self.removed.tombstones += removed.tombstones;
        Ok(())
    }

    /// Sends the writer a command and waits for its answer.
    fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, done) = oneshot::channel();
        self.store
            .shared
            .writer
            .blocking_send(command(reply))
            .map_err(|_| StoreError::Closed)?;
        done.blocking_recv().map_err(|_| StoreError::Closed)?
    }
}

/// The moment before which data older than `keep` expires.
fn cutoff(now: SystemTime, keep: Duration) -> SystemTime {
    now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Plans a round in one pass over the log up to `head` (everything the
/// index already reflects):
/// - a superseded record is pruned once it was superseded (the time of the
///   record that points back at it) before `now - retention.history`, or
///   when it is not among the newest `max_versions` of its document;
/// - a current tombstone older than `now - retention.tombstones` is purged
///   with its chain;
/// - a record of a document the index no longer has, or not older than its
///   current version (an earlier life whose versions restarted, as builds
///   before versions outlived purges did), is an orphan. A purge removes a
///   tombstone with its whole chain in one batch, so this build leaves
///   none: these are what a chain broken by an earlier build left.
///
/// Commit times never go backwards (the writer sees to it), so what is
/// pruned of a chain is always its oldest part and the rest stays reachable.
fn plan(
    trees: &Trees,
    index: &Index,
    head: Seq,
    now: SystemTime,
    retention: &Retention,
    planner: &mut Planner<'_>,
) -> Result<(), StoreError> {
    let history_cutoff = cutoff(now, retention.history);
    let tombstone_cutoff = cutoff(now, retention.tombstones);
    let max_versions = u64::try_from(retention.max_versions).unwrap_or(u64::MAX);
    for entry in trees.log.range(..=keys::seq_key(head)) {
        let (seq, bytes) = entry?;
        let seq = index::parse_seq(&seq)?;
        let record = Record::parse(&bytes)?;
        let current = index.get(record.key());
        let Some(current) = current.filter(|c| c.seq == seq || c.version > record.version) else {
            planner.add_history(seq)?;
            continue;
        };
        if record.prev.0 != 0 {
            // `record` superseded its previous version. The count rule is
            // judged against the document as of `head`, the same for every
            // record of the round: a document written since (its current
            // state is past `head`) keeps its count-pruning for the next
            // round, or a newer version could be pruned while an older one
            // was kept, breaking the chain.
            let prev_version = record.version.0.saturating_sub(1);
            let too_many = current.seq <= head
                && current.version.0.saturating_sub(prev_version) > max_versions;
            if too_many || record.updated_at() < history_cutoff {
                planner.add_history(record.prev)?;
            }
        }
        if current.seq == seq && record.deleted && record.updated_at() < tombstone_cutoff {
            let key = DocKey::from_stored(record.key());
            let chain = chain(trees, record.prev)?;
            planner.add_tombstone(Tombstone { key, seq, chain })?;
        }
    }
    Ok(())
}

/// The seqs of the records reachable back from `prev`.
fn chain(trees: &Trees, mut prev: Seq) -> Result<Vec<Seq>, StoreError> {
    let mut seqs = Vec::new();
    while prev.0 != 0 {
        let Some(bytes) = trees.log.get(keys::seq_key(prev))? else {
            break;
        };
        seqs.push(prev);
        let next = Record::parse(&bytes)?.prev;
        if next >= prev {
            return Err(StoreError::corrupt(
                keys::LOG,
                format!("chain loops at {prev}"),
            ));
        }
        prev = next;
    }
    Ok(seqs)
}

/// Runs compaction every `interval` until `shutdown`; logs what each round
/// removed and how long it took.
pub async fn run(
    store: Store,
    retention: Retention,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => match store.compact(&retention).await {
                Ok(r) => {
                    store.metrics().compaction_round(
                        r.removed.history,
                        r.removed.tombstones,
                        r.removed.clients,
                        r.elapsed,
                    );
                    tracing::info!(
                    history_pruned = r.removed.history,
                    tombstones_purged = r.removed.tombstones,
                    clients_forgotten = r.removed.clients,
                    purge_horizon = %r.horizon,
                    elapsed_ms = r.elapsed.as_millis(),
                    "compaction finished"
                    );
                }
                Err(StoreError::Closed) => return,
                Err(e) => tracing::error!(cause = %e, "compaction failed"),
            },
        }
    }
}
