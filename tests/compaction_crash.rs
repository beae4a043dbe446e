//! Compaction under load and `kill -9`: the real server binary runs retention
//! rounds that are slow (batches of two keys) and back to back while writers
//! rewrite, delete, and re-create documents. The server is killed at random
//! points and right after rounds that purged tombstones, then restarted on the
//! same store. Each document must still be in the state last acknowledged:
//! nothing purged or superseded may come back.

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::*;
use deltasync::pb::{self, GetRequest, Outcome, PullRequest, PushRequest};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const COLLECTION: &str = "compaction";
/// Concurrent writers; each owns its documents, so it knows their order.
const WRITERS: usize = 4;
/// Enough documents that a document's last two records are far apart in
/// the log, so a round's scan between them is long.
const DOCS_PER_WRITER: u64 = 8;
/// Kill cycles under load.
const KILLS: usize = 24;
/// A live document is deleted on about one visit in this many: it lives
/// long enough (hundreds of versions, many rounds) to be compacted while
/// written, and enough tombstones are purged under load.
const DELETE_ONE_IN: u64 = 100;
/// A deleted document is re-created only after this long, so its tombstone
/// (1 s retention) has usually been purged by then.
const RECREATE_AFTER: Duration = Duration::from_millis(1300);
/// Pull page size: every document fits one page. Smaller pages cannot be
/// read from 0 once the purge horizon is above the first page's checkpoint
/// (the next page is OUT_OF_RANGE however often the pull starts over).
const PAGE: u32 = 1000;

/// Aggressive retention: rounds every 10 ms that take many writer batches,
/// so a round overlaps many writes, and tombstones purged after 1 s.
const RETENTION: [&str; 10] = [
    "--history-retention",
    "1s",
    "--tombstone-retention",
    "1s",
    "--history-max-versions",
    "2",
    "--compaction-interval",
    "10ms",
    "--compaction-batch",
    "2",
];

/// The server binary with aggressive retention, counting the rounds that
/// purged at least one tombstone (from its log).
struct Server {
    /// The process.
    process: process::Process,
    /// Rounds that purged at least one tombstone.
    purges: watch::Receiver<u64>,
}

impl Server {
    fn start(data_dir: &std::path::Path) -> Self {
        let (purged, purges) = watch::channel(0);
        let process = process::Process::start(data_dir, &RETENTION, move |entry| {
            if entry["message"] == "compaction finished"
                && entry["tombstones_purged"].as_u64().unwrap_or(0) > 0
            {
                purged.send_modify(|n| *n += 1);
            }
        });
        Self { process, purges }
    }

    async fn client(&self) -> Client {
        self.process.client().await
    }

    /// Kills the server with SIGKILL and reaps it.
    fn kill_9(self) {
        self.process.kill_9();
    }
}

/// A small generator (SplitMix64). Every failure names its seed;
/// `COMPACTION_CRASH_SEED` replays the same choices (not the same timing).
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A duration in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// A document's state as its writer knows it.
#[derive(Clone, Debug, PartialEq)]
enum State {
    /// Never created, or deleted (a tombstone, or purged).
    Gone,
    /// Live with this body; `at` is the acknowledged (version, seq), unknown
    /// for a write whose push failed.
    Live { body: Value, at: Option<(u64, u64)> },
}

impl State {
    /// Whether `found` (a Get or Pull result) is this state.
    fn matches(&self, found: Option<&pb::Document>) -> bool {
        match (self, found) {
            (Self::Gone, None) => true,
            (Self::Gone, Some(d)) => d.deleted,
            (Self::Live { .. }, None) => false,
            (Self::Live { body, at }, Some(d)) => {
                !d.deleted
                    && json(d) == *body
                    && at.is_none_or(|(version, seq)| (d.version, d.seq) == (version, seq))
            }
        }
    }
}

/// A document owned by one writer.
struct Doc {
    /// Its id in [`COLLECTION`].
    id: String,
    /// The state of its last acknowledged write.
    acked: State,
    /// When it was last deleted.
    deleted_at: Option<Instant>,
}

/// A write whose push failed (the server died): applied or not, unknown.
struct Pending {
    /// Which of the writer's documents.
    doc: usize,
    /// The mutation, to retry with the same mutation id.
    mutation: pb::Mutation,
    /// The document's state if it was applied.
    effect: State,
    /// When it was sent.
    sent_at: Instant,
}

/// One writer: a client id, its documents and its next mutation id.
struct Writer {
    /// Its client id, for mutation ids.
    client_id: String,
    /// The documents only it writes.
    docs: Vec<Doc>,
    /// Its next mutation id.
    next_id: u64,
    /// Its own choices.
    rng: Rng,
    /// Set by a push that failed, until it is retried after a restart.
    pending: Option<Pending>,
    /// Deletes acknowledged so far.
    deletes: usize,
}

impl Writer {
    fn new(w: usize, seed: u64) -> Self {
        let docs = (0..DOCS_PER_WRITER)
            .map(|d| Doc {
                id: format!("w{w}-d{d}"),
                acked: State::Gone,
                deleted_at: None,
            })
            .collect();
        Self {
            client_id: format!("writer-{w}"),
            docs,
            next_id: 1,
            rng: Rng(seed),
            pending: None,
            deletes: 0,
        }
    }

    /// The next write: a put (in bursts, so a document is often written
    /// twice while a round scans), a delete, or a re-create once the
    /// tombstone is likely purged. `None` when the chosen document waits.
    fn next_write(&mut self, doc: usize) -> Option<(pb::Mutation, State)> {
        let d = &self.docs[doc];
        let mutation_id = self.next_id;
        let delete = match (&d.acked, d.deleted_at) {
            (State::Live { .. }, _) => self.rng.below(DELETE_ONE_IN) == 0,
            (State::Gone, Some(t)) if t.elapsed() < RECREATE_AFTER => return None,
            (State::Gone, _) => false,
        };
        let (mutation, effect) = if delete {
            (delete_mutation(&d.id), State::Gone)
        } else {
            let body = json!({ "writer": self.client_id, "doc": d.id, "m": mutation_id });
            let effect = State::Live {
                body: body.clone(),
                at: None,
            };
            (put(COLLECTION, &d.id, body), effect)
        };
        self.next_id += 1;
        Some((mutation.id(mutation_id), effect))
    }

    /// Records an acknowledged write.
    fn acknowledged(&mut self, doc: usize, effect: State, result: &pb::MutationResult) {
        let d = &mut self.docs[doc];
        let found = result.document.as_ref();
        d.acked = match effect {
            State::Gone => {
                let deleted = found.is_none_or(|f| f.deleted);
                assert!(deleted, "{}: delete answered {}", d.id, describe(found));
                d.deleted_at = Some(Instant::now());
                self.deletes += 1;
                State::Gone
            }
            State::Live { body, .. } => {
                let found = found.expect("a put returns its document");
                let acked = State::Live {
                    body,
                    at: Some((found.version, found.seq)),
                };
                let same = acked.matches(Some(found));
                assert!(same, "{}: put answered {}", d.id, describe(Some(found)));
                acked
            }
        };
    }

    /// Writes until `killed`; a push without an answer by then is pending.
    async fn run(mut self, mut client: Client, killed: CancellationToken) -> Self {
        // Bounded: the kill ends it long before.
        for _ in 0..1_000_000 {
            if killed.is_cancelled() {
                break;
            }
            let doc = usize::try_from(self.rng.below(DOCS_PER_WRITER)).expect("small");
            let burst = 1 + self.rng.below(3);
            for _ in 0..burst {
                let Some((mutation, effect)) = self.next_write(doc) else {
                    // Let time pass for the tombstone to age.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    break;
                };
                let request = PushRequest {
                    client_id: self.client_id.clone(),
                    mutations: vec![mutation.clone()],
                    atomic: false,
                };
                let sent_at = Instant::now();
                let answer = tokio::select! {
                    answer = client.push(request) => answer.ok(),
                    () = killed.cancelled() => None,
                };
                match answer {
                    Some(response) => {
                        let result = &response.into_inner().results[0];
                        assert_eq!(outcome(result), Outcome::Applied, "{result:?}");
                        let deleted = effect == State::Gone;
                        self.acknowledged(doc, effect, result);
                        if deleted {
                            break;
                        }
                    }
                    None => {
                        self.pending = Some(Pending {
                            doc,
                            mutation,
                            effect,
                            sent_at,
                        });
                        return self;
                    }
                }
            }
        }
        self
    }

    /// Retries the failed write with its mutation id (APPLIED if it was
    /// lost, DUPLICATE if it was applied) and takes its effect as acked.
    async fn resolve(&mut self, client: &mut Client) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let result = push_one(client, &self.client_id, p.mutation).await;
        let outcome = outcome(&result);
        assert!(
            matches!(outcome, Outcome::Applied | Outcome::Duplicate),
            "{}: retry gave {outcome:?}",
            self.docs[p.doc].id
        );
        let deleted = p.effect == State::Gone;
        self.acknowledged(p.doc, p.effect, &result);
        if deleted && outcome == Outcome::Duplicate {
            // Deleted before the kill.
            self.docs[p.doc].deleted_at = Some(p.sent_at);
        }
    }
}

fn delete_mutation(id: &str) -> pb::Mutation {
    delete(COLLECTION, id)
}

/// Every document's current state by Get, by id.
async fn get_all(client: &mut Client, writers: &[Writer]) -> HashMap<String, pb::Document> {
    let ids = writers
        .iter()
        .flat_map(|w| w.docs.iter().map(|d| d.id.clone()))
        .collect();
    let request = GetRequest {
        collection: COLLECTION.into(),
        ids,
        ..Default::default()
    };
    let documents = client
        .get(request)
        .await
        .expect("get")
        .into_inner()
        .documents;
    documents.into_iter().map(|d| (d.id.clone(), d)).collect()
}

/// Every document by a Pull from 0, all pages; starts again from 0 if a
/// purge between two pages raised the horizon past the checkpoint (as
/// OUT_OF_RANGE tells a client to). Fails on a document seen twice.
async fn pull_all(client: &mut Client, context: &str) -> HashMap<String, pb::Document> {
    'attempt: for _ in 0..20 {
        let mut docs = HashMap::new();
        let mut since = 0;
        for _ in 0..1000 {
            let request = PullRequest {
                since,
                collections: vec![COLLECTION.into()],
                limit: PAGE,
                ..Default::default()
            };
            let page = match client.pull(request).await {
                Ok(page) => page.into_inner(),
                Err(s) if s.code() == Code::OutOfRange => continue 'attempt,
                Err(s) => panic!("{context}: pull failed: {s:?}"),
            };
            for d in page.documents {
                let id = d.id.clone();
                assert!(
                    docs.insert(id.clone(), d).is_none(),
                    "{context}: pull from 0 returned {id} twice"
                );
            }
            since = page.checkpoint;
            if !page.has_more {
                return docs;
            }
        }
        panic!("{context}: pull from 0 does not end");
    }
    panic!("{context}: pull from 0 kept meeting purges");
}

fn describe(found: Option<&pb::Document>) -> String {
    match found {
        None => "absent".into(),
        Some(d) if d.deleted => format!("tombstone v{} seq {}", d.version, d.seq),
        Some(d) => format!("live v{} seq {} {}", d.version, d.seq, json(d)),
    }
}

/// Checks every document against what was acknowledged (a write whose
/// push failed may or may not be there), and Pull from 0 against Get.
async fn check(client: &mut Client, writers: &[Writer], context: &str) {
    let got = get_all(client, writers).await;
    let pulled = pull_all(client, context).await;
    let mut ids = HashSet::new();
    for w in writers {
        for (i, d) in w.docs.iter().enumerate() {
            ids.insert(d.id.as_str());
            let mut allowed = vec![&d.acked];
            if let Some(p) = w.pending.as_ref().filter(|p| p.doc == i) {
                allowed.push(&p.effect);
            }
            let found = got.get(&d.id);
            assert!(
                allowed.iter().any(|s| s.matches(found)),
                "{context}: {} is {} by Get, expected {allowed:?}",
                d.id,
                describe(found)
            );
            let in_pull = pulled.get(&d.id);
            let agree = match (found, in_pull) {
                (Some(a), Some(b)) if !a.deleted || !b.deleted => a == b,
                // A tombstone may be purged between the two reads.
                (a, b) => a.is_none_or(|a| a.deleted) && b.is_none_or(|b| b.deleted),
            };
            assert!(
                agree,
                "{context}: {} is {} by Get but {} by Pull",
                d.id,
                describe(found),
                describe(in_pull)
            );
        }
    }
    for id in pulled.keys() {
        assert!(ids.contains(id.as_str()), "{context}: unknown {id} pulled");
    }
}

/// Restarts on the store, checks, settles the failed writes and checks again.
async fn recover(data: &std::path::Path, writers: &mut [Writer], context: &str) -> Server {
    let server = Server::start(data);
    let mut client = server.client().await;
    check(&mut client, writers, context).await;
    for w in writers.iter_mut() {
        w.resolve(&mut client).await;
    }
    check(&mut client, writers, &format!("{context}, after retries")).await;
    server
}

/// Rule: after any compaction round, and after a `kill -9` at any point of
/// one, every document's current state is exactly the last acknowledged one:
/// a deleted document is absent or a tombstone, never live again (not even
/// below the purge horizon), and a live one has its last acknowledged body,
/// version and seq. Nothing purged or superseded comes back. Writers race
/// slow, back-to-back rounds (documents written twice during a scan,
/// deleted, purged, re-created); the server is killed at random points and
/// right after rounds that purged tombstones, then left to run quiet rounds
/// and killed once more. A Pull from 0 returns each document at most once
/// and agrees with Get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_never_brings_back_what_it_removed() {
    let seed = std::env::var("COMPACTION_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            u64::try_from(now.as_nanos() % u128::from(u64::MAX)).unwrap()
        });
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let mut writers: Vec<Writer> = (0..WRITERS).map(|w| Writer::new(w, rng.next())).collect();
    let mut server = Server::start(&data);
    let mut purge_rounds = 0;

    for kill in 0..KILLS {
        let killed = CancellationToken::new();
        let mut tasks = Vec::new();
        for w in writers.drain(..) {
            let client = server.client().await;
            tasks.push(tokio::spawn(w.run(client, killed.clone())));
        }
        let after_purge = rng.below(3) != 0;
        tokio::time::sleep(rng.millis(100, 800)).await;
        if after_purge {
            // Right after a round that purged tombstones: its orphans (if
            // any) are pruned only by the next round.
            let mut purges = server.purges.clone();
            purges.mark_unchanged();
            let _ = tokio::time::timeout(Duration::from_millis(1500), purges.changed()).await;
        }
        purge_rounds += *server.purges.borrow();
        server.kill_9();
        killed.cancel();
        for task in tasks {
            writers.push(task.await.expect("writer"));
        }
        let context = format!(
            "seed {seed}, kill {kill} ({})",
            if after_purge {
                "after a purge"
            } else {
                "at a random point"
            }
        );
        server = recover(&data, &mut writers, &context).await;
    }

    // Quiet rounds: the last tombstones age past retention and are purged,
    // what they leave is pruned. Then a kill at a random point of them, and
    // one after they are done.
    for (quiet, pause) in [rng.millis(200, 1200), Duration::from_millis(1500)]
        .into_iter()
        .enumerate()
    {
        tokio::time::sleep(pause).await;
        let context = format!("seed {seed}, quiet {quiet}");
        check(&mut server.client().await, &writers, &context).await;
        purge_rounds += *server.purges.borrow();
        server.kill_9();
        server = recover(&data, &mut writers, &format!("{context}, after kill -9")).await;
    }
    server.kill_9();

    let deletes: usize = writers.iter().map(|w| w.deletes).sum();
    assert!(
        deletes >= 10 && purge_rounds >= 1,
        "seed {seed}: the load must delete and purge ({deletes} deletes, {purge_rounds} purge rounds)"
    );
}
