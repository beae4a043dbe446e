//! Retention: pruning the delta log and purging expired tombstones.
//!
//! Planning is a read-only scan on a blocking thread; every deletion is sent
//! to the single writer in bounded batches, so compaction never races a push
//! and never holds the writer for longer than one small batch.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::{
    Store, StoreError, Trees, codec,
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
    /// Most keys handed to the writer at once.
    pub batch: usize,
}

/// A batch of deletions for the writer.
#[derive(Debug, Default)]
pub struct Purge {
    /// Delta-log keys to remove.
    pub history: Vec<Vec<u8>>,
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
    /// Its delta-log keys.
    pub history: Vec<Vec<u8>>,
}

/// What one batch removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Delta-log entries removed.
    pub history: usize,
    /// Tombstones purged.
    pub tombstones: usize,
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
            plan_history(&store.shared.trees, now, &retention, &mut planner)?;
            plan_tombstones(&store.shared.trees, now, &retention, &mut planner)?;
            planner.send()?;
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
    fn add_history(&mut self, key: Vec<u8>) -> Result<(), StoreError> {
        self.batch.history.push(key);
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
                .map(|t| 1 + t.history.len())
                .sum::<usize>();
        if size >= self.limit {
            self.send()
        } else {
            Ok(())
        }
    }

    fn send(&mut self) -> Result<(), StoreError> {
        let purge = std::mem::take(&mut self.batch);
        if purge.history.is_empty() && purge.tombstones.is_empty() {
            return Ok(());
        }
        let (reply, done) = oneshot::channel();
        self.store
            .shared
            .writer
            .blocking_send(Command::Compact(purge, reply))
            .map_err(|_| StoreError::Closed)?;
        let removed = done.blocking_recv().map_err(|_| StoreError::Closed)??;
        self.removed.history += removed.history;
        self.removed.tombstones += removed.tombstones;
        Ok(())
    }
}

/// The moment before which data older than `keep` expires.
fn cutoff(now: SystemTime, keep: Duration) -> SystemTime {
    now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Delta-log entries to prune: superseded before `now - retention.history`,
/// or beyond the newest `max_versions` of their document. An entry's
/// supersede time is the time of the next version (a base stays available
/// for the retention period after it stopped being current).
fn plan_history(
    trees: &Trees,
    now: SystemTime,
    retention: &Retention,
    planner: &mut Planner<'_>,
) -> Result<(), StoreError> {
    let cutoff = cutoff(now, retention.history);
    let mut group: Vec<(Vec<u8>, SystemTime)> = Vec::new();
    let mut group_doc: Vec<u8> = Vec::new();
    for entry in trees.history.iter() {
        let (key, value) = entry?;
        let (doc, _) = keys::split_history_key(&key)
            .ok_or_else(|| StoreError::corrupt(keys::HISTORY, "bad key"))?;
        if doc != group_doc.as_slice() {
            flush_group(
                trees,
                &group_doc,
                &mut group,
                cutoff,
                retention.max_versions,
                planner,
            )?;
            group_doc = doc.to_vec();
        }
        let time = codec::decode_header(keys::HISTORY, &value)?.updated_at();
        group.push((key.to_vec(), time));
    }
    flush_group(
        trees,
        &group_doc,
        &mut group,
        cutoff,
        retention.max_versions,
        planner,
    )
}

fn flush_group(
    trees: &Trees,
    doc: &[u8],
    group: &mut Vec<(Vec<u8>, SystemTime)>,
    cutoff: SystemTime,
    max_versions: usize,
    planner: &mut Planner<'_>,
) -> Result<(), StoreError> {
    if group.is_empty() {
        return Ok(());
    }
    // The last entry was superseded by the current document (gone: orphan).
    let current = match trees.docs.get(doc)? {
        Some(bytes) => Some(codec::decode_header(keys::DOCS, &bytes)?.updated_at()),
        None => None,
    };
    let over = group.len().saturating_sub(max_versions);
    let superseded: Vec<Option<SystemTime>> = group
        .iter()
        .skip(1)
        .map(|(_, t)| Some(*t))
        .chain([current])
        .collect();
    for (i, ((key, _), superseded_at)) in group.drain(..).zip(superseded).enumerate() {
        if i < over || superseded_at.is_none_or(|t| t < cutoff) {
            planner.add_history(key)?;
        }
    }
    Ok(())
}

/// Tombstones older than the tombstone retention. The change index is in
/// seq order, which is time order, so the scan stops at the first change
/// newer than the cutoff.
fn plan_tombstones(
    trees: &Trees,
    now: SystemTime,
    retention: &Retention,
    planner: &mut Planner<'_>,
) -> Result<(), StoreError> {
    let cutoff = cutoff(now, retention.tombstones);
    for entry in trees.changes.iter() {
        let (seq, key) = entry?;
        let seq = keys::parse_u64(&seq)
            .map(Seq)
            .ok_or_else(|| StoreError::corrupt(keys::CHANGES, "bad seq key"))?;
        let Some(bytes) = trees.docs.get(&key)? else {
            continue;
        };
        let header = codec::decode_header(keys::DOCS, &bytes)?;
        if header.updated_at() >= cutoff {
            break;
        }
        if header.deleted && header.seq == seq {
            let key = DocKey::from_stored(&key);
            let history = trees
                .history
                .scan_prefix(keys::history_prefix(&key))
                .keys()
                .map(|k| k.map(|k| k.to_vec()))
                .collect::<Result<_, _>>()?;
            planner.add_tombstone(Tombstone { key, seq, history })?;
        }
    }
    Ok(())
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
                Ok(r) => tracing::info!(
                    history_pruned = r.removed.history,
                    tombstones_purged = r.removed.tombstones,
                    purge_horizon = %r.horizon,
                    elapsed_ms = r.elapsed.as_millis(),
                    "compaction finished"
                ),
                Err(StoreError::Closed) => return,
                Err(e) => tracing::error!(cause = %e, "compaction failed"),
            },
        }
    }
}
