//! Post-commit fan-out to subscribers, with catch-up and lag recovery.
//!
//! The writer publishes each group commit once, after it is durable, into a
//! bounded broadcast ring shared by all subscribers. A subscriber holds only
//! a cursor into it, so memory does not grow with the number of subscribers,
//! and a slow one never blocks the writer: when the ring overtakes it, it
//! falls back to reading the log from its last delivered seq, then
//! rejoins the ring. The ring is subscribed *before* the head is read, so the
//! switch from the log to the ring can neither lose nor repeat a change.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::broadcast::{self, error::RecvError},
    task::JoinHandle,
};

use super::{
    Store,
    clients::ClientState,
    error::StoreError,
    model::{Document, PullPage, Seq},
    pull::{self, CollectionFilter, PageLimit},
};

/// One group commit as subscribers see it.
#[derive(Debug)]
pub struct Commit {
    /// Head before the commit: the commit holds seqs `prev_head + 1 ..= head`.
    pub prev_head: Seq,
    /// Head after the commit (equal to `prev_head` for a commit that only
    /// changed clients' mutation-id states).
    pub head: Seq,
    /// The epoch it was committed in.
    pub epoch: u64,
    /// The clients' mutation-id states it wrote, for replicas (never
    /// evicted: replication needs them and the log does not hold them).
    pub clients: Vec<(String, ClientState)>,
    /// New document states in seq order; `None` once the ring's byte bound
    /// evicted them (a subscriber then reads the commit from the log).
    docs: RwLock<Option<Arc<[Arc<Document>]>>>,
    /// What the documents take, as counted against the ring's byte bound.
    bytes: usize,
}

impl Commit {
    /// A commit of `docs` (in seq order) without client states, in epoch 1.
    #[cfg(test)]
    pub fn new(prev_head: Seq, head: Seq, docs: Vec<Arc<Document>>) -> Self {
        Self::with_clients(prev_head, head, 1, docs, Vec::new())
    }

    /// A commit of `docs` (in seq order) and client states.
    pub fn with_clients(
        prev_head: Seq,
        head: Seq,
        epoch: u64,
        docs: Vec<Arc<Document>>,
        clients: Vec<(String, ClientState)>,
    ) -> Self {
        let bytes = docs.iter().map(|d| pull::wire_size(d)).sum::<usize>()
            + clients
                .iter()
                .map(|(c, s)| c.len() + s.encoded_len())
                .sum::<usize>();
        Self {
            prev_head,
            head,
            epoch,
            clients,
            docs: RwLock::new(Some(docs.into())),
            bytes,
        }
    }

    /// Its documents, unless evicted.
    pub fn docs(&self) -> Option<Arc<[Arc<Document>]>> {
        self.docs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn evict(&self) {
        *self.docs.write().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// The broadcast point: a cheap `Clone` handle.
#[derive(Clone)]
pub struct Feed {
    /// State shared by the writer and every subscriber.
    shared: Arc<FeedShared>,
}

struct FeedShared {
    /// Highest seq published (durable and visible to readers).
    head: AtomicU64,
    /// Highest seq written (acknowledged in `buffered` mode, maybe not
    /// durable yet): a checkpoint up to it is waited for, not refused.
    written: AtomicU64,
    /// Purge horizon: raised *before* a purge commits, so a reader that
    /// re-checks it after reading cannot miss a purge that hid something.
    horizon: AtomicU64,
    /// The ring all subscribers read from.
    tx: broadcast::Sender<Arc<Commit>>,
    /// The commits whose documents the ring holds, oldest first, and their
    /// bytes: what bounds the ring's memory in bytes, not only in commits.
    retained: Mutex<(VecDeque<Arc<Commit>>, usize)>,
    /// Most commits in the ring.
    capacity: usize,
    /// Most document bytes in the ring.
    max_bytes: usize,
}

impl Feed {
    /// A feed whose head is `head`, keeping the documents of at most the
    /// last `capacity` commits and `max_bytes` bytes.
    pub fn new(head: Seq, horizon: Seq, capacity: usize, max_bytes: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity);
        let shared = FeedShared {
            head: AtomicU64::new(head.0),
            written: AtomicU64::new(head.0),
            horizon: AtomicU64::new(horizon.0),
            tx,
            retained: Mutex::new((VecDeque::new(), 0)),
            capacity,
            max_bytes,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Highest published seq.
    pub fn head(&self) -> Seq {
        Seq(self.shared.head.load(Ordering::Acquire))
    }

    /// Highest written seq (at least the head).
    pub fn written(&self) -> Seq {
        Seq(self.shared.written.load(Ordering::Acquire))
    }

    /// Moves the head (and what was written) back to `head`: only when a
    /// rejoining replica discards a divergent suffix.
    pub fn reset_head(&self, head: Seq) {
        self.shared.head.store(head.0, Ordering::Release);
        self.shared.written.store(head.0, Ordering::Release);
    }

    /// Notes a commit written (not yet published).
    pub fn set_written(&self, seq: Seq) {
        self.shared.written.fetch_max(seq.0, Ordering::AcqRel);
    }

    /// The purge horizon.
    pub fn horizon(&self) -> Seq {
        Seq(self.shared.horizon.load(Ordering::Acquire))
    }

    /// Raises the purge horizon (never lowers it).
    pub fn raise_horizon(&self, seq: Seq) {
        self.shared.horizon.fetch_max(seq.0, Ordering::AcqRel);
    }

    /// Fails if checkpoint `since` (not 0) is below the purge horizon and
    /// tombstones were purged after the reader's `seen` horizon (the one
    /// its checkpoint is consistent with): only then can it have missed a
    /// deletion. Returns the horizon the checkpoint is now consistent with.
    pub fn check_horizon(&self, since: Seq, seen: Seq) -> Result<Seq, StoreError> {
        let horizon = self.horizon();
        if since.0 > 0 && since < horizon && horizon > seen {
            return Err(StoreError::Compacted {
                since: since.0,
                horizon: horizon.0,
            });
        }
        Ok(horizon)
    }

    /// Waits until `seq` is published, at most `timeout`; whether it is.
    pub async fn wait_published(&self, seq: Seq, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        while self.head() < seq {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(_) | Err(RecvError::Lagged(_))) => {}
                Ok(Err(RecvError::Closed)) | Err(_) => break,
            }
        }
        self.head() >= seq
    }

    /// Publishes a commit: the head moves first, so anyone who reads the head
    /// after subscribing either sees the commit in the ring or below the head.
    /// The oldest commits' documents are evicted to keep the ring within its
    /// bounds.
    pub fn publish(&self, commit: Commit) {
        let commit = Arc::new(commit);
        self.shared.head.store(commit.head.0, Ordering::Release);
        self.shared
            .written
            .fetch_max(commit.head.0, Ordering::AcqRel);
        {
            let mut retained = self
                .shared
                .retained
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (commits, bytes) = &mut *retained;
            commits.push_back(commit.clone());
            *bytes += commit.bytes;
            while commits.len() > self.shared.capacity || *bytes > self.shared.max_bytes {
                let Some(old) = commits.pop_front() else {
                    break;
                };
                old.evict();
                *bytes -= old.bytes;
            }
        }
        // No receivers is not an error: nobody is listening.
        let _ = self.shared.tx.send(commit);
    }

    /// A cursor into the ring: every commit published from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Commit>> {
        self.shared.tx.subscribe()
    }
}

/// What a subscription yields next.
#[derive(Debug)]
pub enum FeedEvent {
    /// Matching changes, in seq order; everything up to `checkpoint` is done.
    Changes {
        /// The documents.
        docs: Vec<Arc<Document>>,
        /// Checkpoint after them.
        checkpoint: Seq,
    },
    /// The backlog is done; live changes follow.
    CaughtUp {
        /// Checkpoint at the switch.
        checkpoint: Seq,
    },
}

enum Mode {
    /// Reading the log up to `upto`; `announce` the switch to live.
    CatchUp { upto: Seq, announce: bool },
    /// Following the ring.
    Live,
}

/// One subscriber's cursor.
pub struct Subscription {
    /// Where catch-up pages are read.
    store: Store,
    /// This subscriber's cursor into the shared ring.
    rx: broadcast::Receiver<Arc<Commit>>,
    /// Collections it wants.
    filter: CollectionFilter,
    /// Every matching change with seq <= this has been yielded.
    delivered: Seq,
    /// The purge horizon `delivered` is consistent with.
    seen: Seq,
    /// Reading the log or following the ring.
    mode: Mode,
    /// Most documents and bytes per catch-up page.
    page: PageLimit,
    /// The catch-up read in progress and the checkpoint it reads from. It
    /// is kept here, not in the future of [`Subscription::next`], so a
    /// caller that stops waiting (a heartbeat is due) loses no work.
    reading: Option<(Seq, JoinHandle<Result<PullPage, StoreError>>)>,
}

impl Subscription {
    pub(super) fn new(
        store: Store,
        since: Seq,
        seen: Seq,
        filter: CollectionFilter,
        page: PageLimit,
    ) -> Self {
        let rx = store.feed().subscribe();
        let upto = store.feed().head();
        Self {
            store,
            rx,
            filter,
            delivered: since,
            seen,
            mode: Mode::CatchUp {
                upto,
                announce: true,
            },
            page: PageLimit {
                docs: page.docs.max(1),
                ..page
            },
            reading: None,
        }
    }

    /// Checkpoint reached so far.
    pub fn checkpoint(&self) -> Seq {
        self.delivered
    }

    /// The purge horizon the checkpoint is consistent with.
    pub fn purge_horizon(&self) -> Seq {
        self.seen
    }

    /// Whether the backlog is done.
    pub fn is_live(&self) -> bool {
        matches!(self.mode, Mode::Live)
    }

    /// Records how far behind the head this subscriber is as it is handed
    /// changes up to `checkpoint` (or, overtaken by the ring, as it falls
    /// back to the log from there).
    fn observe_lag(&self, checkpoint: Seq) {
        let head = self.store.feed().head();
        self.store.metrics().subscriber_lag(head.0, checkpoint.0);
    }

    /// The next event. Cancel-safe: state changes only after each await.
    pub async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        loop {
            match self.mode {
                Mode::CatchUp { upto, announce } => {
                    if self.delivered >= upto {
                        self.mode = Mode::Live;
                        if announce {
                            return Ok(FeedEvent::CaughtUp {
                                checkpoint: self.delivered,
                            });
                        }
                        continue;
                    }
                    if self.reading.is_none() {
                        let read = self.store.start_read(
                            self.delivered,
                            self.seen,
                            upto,
                            self.filter.clone(),
                            self.page,
                        )?;
                        self.reading = Some((self.delivered, read));
                    }
                    let Some((since, read)) = &mut self.reading else {
                        continue;
                    };
                    let page = self.store.finish_read(*since, self.seen, read).await;
                    self.reading = None;
                    let page = page?;
                    self.delivered = page.checkpoint;
                    self.seen = page.horizon;
                    if !page.documents.is_empty() {
                        self.observe_lag(page.checkpoint);
                        let docs = page.documents.into_iter().map(Arc::new).collect();
                        return Ok(FeedEvent::Changes {
                            docs,
                            checkpoint: page.checkpoint,
                        });
                    }
                }
                Mode::Live => match self.rx.recv().await {
                    Ok(commit) => {
                        if commit.head <= self.delivered {
                            continue;
                        }
                        if commit.prev_head > self.delivered {
                            // Never expected; if it happens, the log fills the
                            // hole *and* this commit (it is durable, so in the log).
                            self.mode = Mode::CatchUp {
                                upto: commit.head,
                                announce: false,
                            };
                            continue;
                        }
                        let Some(docs) = commit.docs() else {
                            // Evicted by the ring's byte bound: read it from the log.
                            self.store.metrics().subscriber_fallback();
                            self.mode = Mode::CatchUp {
                                upto: commit.head,
                                announce: false,
                            };
                            continue;
                        };
                        let docs: Vec<Arc<Document>> = docs
                            .iter()
                            .filter(|d| {
                                d.seq > self.delivered
                                    && self.filter.matches(d.collection.as_bytes())
                            })
                            .cloned()
                            .collect();
                        self.delivered = commit.head;
                        if !docs.is_empty() {
                            self.observe_lag(commit.head);
                            return Ok(FeedEvent::Changes {
                                docs,
                                checkpoint: commit.head,
                            });
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, delivered = %self.delivered, "subscriber lagged; catching up from the log");
                        self.store.metrics().subscriber_fallback();
                        // How far behind it fell, before the log catches it up.
                        self.observe_lag(self.delivered);
                        self.mode = Mode::CatchUp {
                            upto: self.store.feed().head(),
                            announce: false,
                        };
                    }
                    Err(RecvError::Closed) => return Err(StoreError::Closed),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{
        Options,
        model::{Body, Op, PushBatch},
        testing,
    };

    fn create(id: &str) -> PushBatch {
        testing::batch(vec![testing::mutation(id, Op::Put(Body::new().into()))])
    }

    /// Rule: the ring holds at most `max_bytes` of documents (and at most
    /// `capacity` commits): older commits' documents are dropped first, the
    /// newest commit's even when it alone is over the bound.
    #[test]
    fn the_ring_is_bounded_in_bytes() {
        let doc = |seq| {
            Arc::new(Document {
                collection: "c".into(),
                id: "x".into(),
                version: crate::store::model::Version(1),
                body: crate::store::model::EncodedBody::default(),
                deleted: false,
                seq: Seq(seq),
                updated_at: std::time::SystemTime::now(),
                updated_by: String::new(),
            })
        };
        let one = crate::store::pull::wire_size(&doc(1));
        let feed = Feed::new(Seq(0), Seq(0), 100, 3 * one);
        let commits: Vec<_> = (1..=5)
            .map(|seq| {
                feed.publish(Commit::new(Seq(seq - 1), Seq(seq), vec![doc(seq)]));
                feed.shared
                    .retained
                    .lock()
                    .unwrap()
                    .0
                    .back()
                    .unwrap()
                    .clone()
            })
            .collect();
        let kept: Vec<bool> = commits.iter().map(|c| c.docs().is_some()).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert_eq!(feed.shared.retained.lock().unwrap().1, 3 * one);
        feed.publish(Commit::new(Seq(5), Seq(6), (6..=9).map(doc).collect()));
        let retained = feed.shared.retained.lock().unwrap();
        assert!(
            retained.0.is_empty() && retained.1 == 0,
            "over the bound alone"
        );
        let small = Feed::new(Seq(0), Seq(0), 2, usize::MAX);
        for seq in 1..=3 {
            small.publish(Commit::new(Seq(seq - 1), Seq(seq), vec![doc(seq)]));
        }
        assert_eq!(small.shared.retained.lock().unwrap().0.len(), 2, "capacity");
    }

    /// Rule: a hole in the live ring (a commit that never arrived) is filled
    /// from the log, including the commit that revealed the hole.
    #[tokio::test]
    async fn a_hole_in_the_ring_is_filled_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        store.push(create("a")).await.unwrap();
        let page = PageLimit {
            docs: 100,
            bytes: usize::MAX,
        };
        let mut sub = store.subscribe(Seq(0), Seq(0), CollectionFilter::default(), page);
        assert!(matches!(
            sub.next().await.unwrap(),
            FeedEvent::Changes { .. }
        ));
        assert!(matches!(
            sub.next().await.unwrap(),
            FeedEvent::CaughtUp { checkpoint: Seq(1) }
        ));
        store.push(create("b")).await.unwrap();
        store.push(create("c")).await.unwrap();
        // Lose the commit of "b" from this subscriber's ring.
        let lost = sub.rx.recv().await.unwrap();
        assert_eq!(lost.head, Seq(2));
        let mut seen = Vec::new();
        while sub.checkpoint() < Seq(3) {
            let event = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("no stall")
                .unwrap();
            if let FeedEvent::Changes { docs, .. } = event {
                seen.extend(docs.iter().map(|d| (d.id.clone(), d.seq)));
            }
        }
        assert_eq!(
            seen,
            vec![("b".to_string(), Seq(2)), ("c".to_string(), Seq(3))]
        );
        store.close().await;
    }
}
