//! A randomized, Jepsen-style convergence test of local replicas against a
//! real `deltasync` process: replicas and a direct writer make random puts,
//! patches and deletes on a small id space while the network between the
//! replicas and the server is held (answers never come back) and the
//! server is stopped (SIGTERM or SIGKILL) and started again on the same
//! data dir and address; replicas sync at random and are reopened (a
//! restarted client); one replica also syncs in the background. At the
//! end every outbox is empty and every view is
//! the server's Pull from 0, and the history checks out: every write a
//! replica acknowledged locally is accounted for (applied, merged, applied
//! by an earlier attempt, or settled as a conflict by its resolver, a merge
//! callback or by hand), and nothing was applied twice.
//!
//! `DELTASYNC_TEST_SEED=N` replays a seed's choices (printed on failure;
//! the timing of cuts and kills is the machine's);
//! `DELTASYNC_TEST_STEPS=N` sets the number of random steps (default 50).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use common::{
    cluster::{DataDir, Dial, Gate},
    local::{seed, server_view, view},
    process::Process,
};
use deltasync::{
    client::{Client, ClientBuilder, RetryPolicy},
    replica::{
        Acknowledgement, BackgroundOptions, Events, LocalReplica, ReplicaEvent, ReplicaOptions,
        Resolution, ResolvedBy, Resolver, SyncHandle,
    },
};
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------

/// splitmix64: small, seedable, good enough to pick test steps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Prints the seed if the test panics, so the run can be replayed.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "local_convergence failed with DELTASYNC_TEST_SEED={} (replay with that variable set)",
                self.0
            );
        }
    }
}

// ---------------------------------------------------------------------
// The world
// ---------------------------------------------------------------------

/// The collections, one per resolver.
const COLLECTIONS: [(&str, Resolver); 3] = [
    ("ks", Resolver::KeepServer),
    ("kl", Resolver::KeepLocal),
    ("mn", Resolver::Manual),
];
const IDS: [&str; 3] = ["a", "b", "c"];
const FIELDS: [&str; 3] = ["x", "y", "z"];
const REPLICAS: usize = 3;
/// The replica that also syncs in the background (pushing as it writes,
/// following the server), while the test calls `sync` on it too.
const BACKGROUND: usize = 2;

/// The background sync's backoff: short, so an outage costs little.
fn backoff() -> BackgroundOptions {
    BackgroundOptions {
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    }
}

/// Short retries and deadlines: a held or absent server fails a sync fast.
fn quick(b: ClientBuilder) -> ClientBuilder {
    b.retry(RetryPolicy {
        max_elapsed: Duration::from_millis(200),
        ..RetryPolicy::default()
    })
    .connect_timeout(Duration::from_millis(200))
    .timeout(Some(Duration::from_millis(400)))
}

/// What a write does to the version count of its document when applied:
/// puts and patches always write (each carries a unique tag), a delete
/// writes only if the document is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PutPatch,
    Delete,
}

/// The fate of one mutation id of a replica.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    /// In the outbox (parked or not).
    Live { parked: bool },
    /// Acknowledged by the server.
    Acked(Acknowledgement, u64),
    /// A rejected write settled: dropped (keep-server) or sent again.
    Resolved(ResolvedBy, bool),
    /// Never sent: moved to a new id behind a resolved write.
    Renumbered,
}

/// One replica, its events and its ledger.
struct Node {
    /// The replica's directory (reopened on a client restart).
    dir: tempfile::TempDir,
    /// The open replica (`None` only while it is reopened).
    replica: Option<LocalReplica>,
    /// Its events, folded into the ledger after each step.
    events: Events,
    /// Its writer tag field (`w0`, `w1`, ...).
    field: String,
    /// Mutation id -> (collection, id, kind, fate).
    ledger: BTreeMap<u64, (String, String, Kind, Fate)>,
    /// Local writes that returned Ok.
    writes: usize,
    /// Mutation ids the server answered (acknowledged or rejected).
    answered: BTreeSet<u64>,
    /// The background sync, on the replica that runs one.
    background: Option<SyncHandle>,
}

impl Node {
    fn r(&self) -> &LocalReplica {
        self.replica.as_ref().expect("open")
    }

    fn set_merge(r: &LocalReplica) {
        // Replica 1 merges its manual conflicts with a callback: theirs
        // with my fields on top (a delete of mine gives way).
        r.set_merge("mn", |c| match &c.local {
            None => Some(Resolution::KeepServer),
            Some(mine) => {
                let mut merged = c
                    .server
                    .as_ref()
                    .and_then(|d| d.body.clone())
                    .unwrap_or_default();
                merged.extend(mine.clone());
                Some(Resolution::Merged(merged))
            }
        });
    }

    /// Folds the waiting events into the ledger; `written` is the kind of
    /// the local write just made, if any.
    fn drain(&mut self, written: Option<Kind>) {
        let mut expected = written;
        while let Some(e) = self.events.try_recv() {
            let e = e.expect("the test's receiver never lags");
            self.record(e, &mut expected);
        }
        assert!(expected.is_none(), "a local write without a Written event");
    }

    fn record(&mut self, e: ReplicaEvent, written: &mut Option<Kind>) {
        let live = |l: &BTreeMap<u64, (String, String, Kind, Fate)>, m: u64| {
            matches!(l.get(&m), Some((_, _, _, Fate::Live { .. })))
        };
        match e {
            ReplicaEvent::Written {
                mutation_id,
                document,
            } => {
                let kind = written.take().expect("a Written event for a write");
                let doc = document.document;
                let old = self.ledger.insert(
                    mutation_id,
                    (doc.collection, doc.id, kind, Fate::Live { parked: false }),
                );
                assert!(old.is_none(), "mutation id {mutation_id} given twice");
            }
            ReplicaEvent::Acknowledged {
                mutation_id,
                acknowledgement,
                version,
                ..
            } => {
                assert!(
                    live(&self.ledger, mutation_id),
                    "{mutation_id} acknowledged but not in the outbox: {:?}",
                    self.ledger.get(&mutation_id)
                );
                self.ledger.get_mut(&mutation_id).unwrap().3 =
                    Fate::Acked(acknowledgement, version);
                self.answered.insert(mutation_id);
            }
            ReplicaEvent::Parked { mutation_id, .. } => {
                assert!(live(&self.ledger, mutation_id), "{mutation_id} parked");
                self.ledger.get_mut(&mutation_id).unwrap().3 = Fate::Live { parked: true };
                self.answered.insert(mutation_id);
            }
            ReplicaEvent::Resolved {
                mutation_id,
                resolution,
                by,
                resent_as,
                renumbered,
                ..
            } => {
                assert!(live(&self.ledger, mutation_id), "{mutation_id} resolved");
                if by != ResolvedBy::Hand {
                    self.answered.insert(mutation_id);
                }
                let entry = self.ledger.get_mut(&mutation_id).unwrap();
                entry.3 = Fate::Resolved(by, resent_as.is_some());
                let (c, id, kind) = (entry.0.clone(), entry.1.clone(), entry.2);
                if let Some(new) = resent_as {
                    let kind = match resolution {
                        Resolution::Merged(_) => Kind::PutPatch,
                        _ => kind,
                    };
                    let old = self
                        .ledger
                        .insert(new, (c, id, kind, Fate::Live { parked: false }));
                    assert!(old.is_none(), "resent under a used id {new}");
                }
                for (from, to) in renumbered {
                    assert!(live(&self.ledger, from), "{from} renumbered");
                    let entry = self.ledger.get_mut(&from).unwrap();
                    entry.3 = Fate::Renumbered;
                    let moved = (
                        entry.0.clone(),
                        entry.1.clone(),
                        entry.2,
                        Fate::Live { parked: false },
                    );
                    assert!(
                        self.ledger.insert(to, moved).is_none(),
                        "renumbered to {to}"
                    );
                }
            }
            ReplicaEvent::ServerChanges { .. } | ReplicaEvent::Resynced { .. } => {}
        }
    }

    /// The highest id the server has seen from this replica: every id
    /// answered (acknowledged, or rejected and then parked or settled).
    fn max_sent(&self) -> u64 {
        self.answered.last().copied().unwrap_or(0)
    }
}

/// The server process, its data dir and address, and the gate in front.
struct Server {
    /// Its store, kept across restarts.
    data: DataDir,
    /// Its address, the same after each restart (the gate's upstream).
    addr: String,
    /// The running process (`None`: stopped).
    process: Option<Process>,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(&mut self, rng: &mut Rng) {
        if let Some(p) = self.process.take() {
            if rng.chance(50) {
                p.kill_9();
            } else {
                let status = p.terminate(Duration::from_secs(20));
                assert!(
                    status.success(),
                    "the server exits cleanly on SIGTERM: {status:?}"
                );
            }
        }
    }

    fn start(&mut self) {
        if self.process.is_none() {
            self.process = Some(Process::start_at(
                &self.addr,
                self.data.as_ref(),
                &[],
                |_| {},
            ));
        }
    }
}

fn body(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// A random write body: my tag (unique, so an applied put or patch always
/// writes) and some fields; a patch may remove one.
fn random_body(rng: &mut Rng, field: &str, tag: &str, patch: bool) -> Value {
    let mut b = Map::new();
    b.insert(field.to_owned(), json!(tag));
    for f in FIELDS {
        match rng.below(4) {
            0 | 1 => {}
            2 if patch => {
                b.insert(f.to_owned(), Value::Null);
            }
            _ => {
                b.insert(f.to_owned(), json!(rng.below(3)));
            }
        }
    }
    Value::Object(b)
}

fn init(dir: &Path, url: &str) -> LocalReplica {
    let options = COLLECTIONS
        .iter()
        .fold(ReplicaOptions::new([url]), |o, (c, r)| o.collection(*c, *r));
    LocalReplica::init(dir, options, quick).expect("init")
}

/// A sync that must end (a hang is a failure): `Ok` or the error's text.
async fn sync(r: &LocalReplica) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(20), r.sync()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => panic!("a sync hung"),
    }
}

/// A sync with the way clear (network open, server up): it must succeed.
/// The deadlines are short (held answers must fail fast), so a slow disk
/// on a loaded machine gets three attempts before that is a failure.
async fn clear_sync(r: &LocalReplica, what: &str) {
    let mut last = String::new();
    for _ in 0..3 {
        match sync(r).await {
            Ok(()) => return,
            Err(e) => last = e,
        }
    }
    panic!("{what}: {last}");
}

/// Resolves every parked conflict of `node` at random.
fn resolve_all(rng: &mut Rng, node: &mut Node, tags: &mut u64) {
    for c in node.r().conflicts().unwrap() {
        *tags += 1;
        let resolution = match rng.below(3) {
            0 => Resolution::KeepServer,
            1 => Resolution::KeepLocal,
            _ => Resolution::Merged(body(
                json!({node.field.clone(): format!("{}-hand{tags}", node.field), "x": "hand"}),
            )),
        };
        node.r().resolve(&c.collection, &c.id, resolution).unwrap();
        node.drain(None);
    }
}

/// Rule: with replicas (one also syncing in the background) and a direct
/// writer writing at random, the network
/// held (answers lost after the server committed) and the server stopped
/// (SIGTERM or SIGKILL) and restarted in between, once every outbox is
/// empty (conflicts settled by keep-server, keep-local, a merge callback
/// and by hand) every replica's view equals the server's Pull from 0;
/// every write acknowledged locally has exactly one fate (applied, merged,
/// applied by an earlier attempt, or a conflict settled), the server's
/// last mutation id per replica is the highest the replica sent, and each
/// document's version counts every applied write once: none lost, none
/// applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_and_server_writers_converge_under_cuts_and_restarts() {
    let seed = seed();
    let steps = env_u64("DELTASYNC_TEST_STEPS").unwrap_or(50);
    let _guard = SeedGuard(seed);
    let mut rng = Rng(seed);

    let data = DataDir::new();
    let first = Process::start(data.as_ref(), &[], |_| {});
    let mut server = Server {
        addr: first.addr.clone(),
        data,
        process: Some(first),
    };
    let gate = Gate::start(&server.addr, u64::MAX, Dial::AtOnce).await;
    let mut held = false;
    let direct = Client::builder([server.url()])
        .retry(RetryPolicy {
            max_elapsed: Duration::from_secs(5),
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    // (collection, id) -> writes of the direct writer (each always writes).
    let mut direct_writes: BTreeMap<(String, String), u64> = BTreeMap::new();

    let mut nodes: Vec<Node> = (0..REPLICAS)
        .map(|i| {
            let dir = tempfile::tempdir().unwrap();
            let replica = init(dir.path(), &gate.url());
            if i == 1 {
                Node::set_merge(&replica);
            }
            let background = (i == BACKGROUND).then(|| replica.start_sync(backoff()));
            Node {
                events: replica.events(),
                replica: Some(replica),
                dir,
                field: format!("w{i}"),
                ledger: BTreeMap::new(),
                writes: 0,
                answered: BTreeSet::new(),
                background,
            }
        })
        .collect();
    let mut tags: u64 = 0;
    let mut stats: BTreeMap<&str, usize> = BTreeMap::new();

    let verbose = std::env::var_os("DELTASYNC_TEST_VERBOSE").is_some();
    for step in 0..steps {
        let started = std::time::Instant::now();
        // Outages are short: most steps run with the way clear.
        if held && rng.chance(20) {
            gate.open();
            held = false;
        }
        if server.process.is_none() && rng.chance(20) {
            server.start();
        }
        let roll = rng.below(100);
        let n = rng.below(REPLICAS);
        if roll < 40 {
            // A local write.
            let node = &mut nodes[n];
            let (c, _) = *rng.pick(&COLLECTIONS);
            let id = *rng.pick(&IDS);
            tags += 1;
            let tag = format!("{}-{tags}", node.field);
            let live = node
                .r()
                .get(c, id)
                .unwrap()
                .is_some_and(|d| !d.document.deleted);
            let kind = match rng.below(10) {
                0..=1 if live => {
                    node.r().delete(c, id).unwrap();
                    Kind::Delete
                }
                0..=4 => {
                    let b = random_body(&mut rng, &node.field, &tag, false);
                    node.r().put(c, id, b).unwrap();
                    Kind::PutPatch
                }
                _ => {
                    let b = random_body(&mut rng, &node.field, &tag, true);
                    node.r().patch(c, id, b).unwrap();
                    Kind::PutPatch
                }
            };
            node.writes += 1;
            node.drain(Some(kind));
            *stats.entry("local writes").or_default() += 1;
        } else if roll < 55 {
            // A direct write on the server, when it is up.
            if server.process.is_some() {
                let (c, _) = *rng.pick(&COLLECTIONS);
                let id = *rng.pick(&IDS);
                tags += 1;
                let b = random_body(&mut rng, "ws", &format!("ws-{tags}"), false);
                let result = if rng.chance(50) {
                    direct.put(c, id, b).await
                } else {
                    direct.patch(c, id, b).await
                }
                .expect("a direct write to a running server");
                assert!(result.is_applied(), "{result:?}");
                *direct_writes
                    .entry((c.to_owned(), id.to_owned()))
                    .or_default() += 1;
                *stats.entry("direct writes").or_default() += 1;
            }
        } else if roll < 70 && !held && server.process.is_some() {
            // A sync cut short: the network goes at a random moment of it
            // (maybe after the server committed a push, before the answer).
            let delay = Duration::from_millis(u64::try_from(rng.below(40)).unwrap());
            let (result, ()) = tokio::join!(sync(nodes[n].r()), async {
                tokio::time::sleep(delay).await;
                gate.cut(0);
            });
            held = true;
            *stats
                .entry(if result.is_ok() { "syncs" } else { "cut syncs" })
                .or_default() += 1;
            nodes[n].drain(None);
        } else if roll < 78 {
            // A sync: it must succeed when the way is clear.
            if !held && server.process.is_some() {
                clear_sync(nodes[n].r(), "sync with the server reachable").await;
                *stats.entry("syncs").or_default() += 1;
            } else {
                let result = sync(nodes[n].r()).await;
                *stats
                    .entry(if result.is_ok() {
                        "syncs"
                    } else {
                        "failed syncs"
                    })
                    .or_default() += 1;
            }
            nodes[n].drain(None);
        } else if roll < 84 {
            resolve_all(&mut rng, &mut nodes[n], &mut tags);
        } else if roll < 91 {
            // The network: hold every answer, or let them through.
            if held {
                gate.open();
            } else {
                gate.cut(0);
            }
            held = !held;
            *stats.entry("network changes").or_default() += 1;
        } else if roll < 96 {
            if server.process.is_some() {
                if held {
                    // A graceful stop would wait for the answers held.
                    gate.cut(0);
                }
                server.stop(&mut rng);
            } else {
                server.start();
            }
            *stats.entry("server stops and starts").or_default() += 1;
        } else {
            // A client restart: the replica is reopened from its dir.
            let node = &mut nodes[n];
            if let Some(handle) = node.background.take() {
                handle.shutdown().await;
            }
            node.drain(None);
            node.replica = None;
            let r = LocalReplica::open(node.dir.path(), quick).expect("reopen");
            if n == 1 {
                Node::set_merge(&r);
            }
            node.events = r.events();
            if n == BACKGROUND {
                node.background = Some(r.start_sync(backoff()));
            }
            node.replica = Some(r);
            *stats.entry("client restarts").or_default() += 1;
        }
        if verbose {
            eprintln!(
                "step {step}: roll {roll}, replica {n}, held {held}, server up {}: {:?}",
                server.process.is_some(),
                started.elapsed()
            );
        }
    }

    // Heal, then sync and resolve until every outbox is empty.
    let healing = std::time::Instant::now();
    gate.open();
    server.start();
    let mut rounds = 0;
    loop {
        let mut pending = 0;
        for node in &mut nodes {
            clear_sync(node.r(), "sync after healing").await;
            node.drain(None);
            resolve_all(&mut rng, node, &mut tags);
            pending += node.r().pending().unwrap().len();
        }
        if pending == 0 {
            break;
        }
        rounds += 1;
        assert!(rounds < 20, "the outboxes do not drain");
    }
    // A last round so every replica sees the others' last writes; the
    // background sync stops (after its own last round).
    for node in &mut nodes {
        clear_sync(node.r(), "last round").await;
        if let Some(handle) = node.background.take() {
            handle.shutdown().await;
            clear_sync(node.r(), "last round").await;
        }
        node.drain(None);
    }

    if verbose {
        eprintln!("healed and drained in {:?}", healing.elapsed());
    }
    // Convergence: every view is the server's Pull from 0.
    let url = server.url();
    let mut versions: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (c, _) in COLLECTIONS {
        let expected = server_view(&url, c).await;
        for (i, node) in nodes.iter().enumerate() {
            assert_eq!(view(node.r(), c), expected, "replica {i}, collection {c}");
        }
        for row in expected {
            versions.insert((c.to_owned(), row.0), row.1);
        }
    }

    // The history: every write has one fate; every chain ends.
    let mut raw = server.process.as_ref().unwrap().client().await;
    // (collection, id) -> (writes that certainly wrote, deletes that may
    // have).
    let mut counted: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for ((c, id), n) in &direct_writes {
        counted.entry((c.clone(), id.clone())).or_default().0 += n;
    }
    let mut fates: BTreeMap<String, usize> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let originals = node
            .ledger
            .values()
            .filter(|(_, _, _, f)| !matches!(f, Fate::Renumbered))
            .count();
        assert!(
            originals >= node.writes,
            "replica {i}: writes missing from the ledger"
        );
        for (m, (c, id, kind, fate)) in &node.ledger {
            match fate {
                Fate::Live { .. } => panic!("replica {i}: mutation {m} never settled"),
                Fate::Acked(ack, _) => {
                    let e = counted.entry((c.clone(), id.clone())).or_default();
                    match kind {
                        Kind::PutPatch => e.0 += 1,
                        Kind::Delete => e.1 += 1,
                    }
                    *fates.entry(format!("{ack:?}")).or_default() += 1;
                }
                Fate::Resolved(by, resent) => {
                    *fates
                        .entry(format!("resolved by {by:?}, resent {resent}"))
                        .or_default() += 1;
                }
                Fate::Renumbered => *fates.entry("renumbered".into()).or_default() += 1,
            }
        }
        assert!(node.r().pending().unwrap().is_empty());
        assert!(node.r().conflicts().unwrap().is_empty());
        let last = common::last_mutation_id(&mut raw, node.r().client_id()).await;
        assert_eq!(
            last,
            node.max_sent(),
            "replica {i}: the server's last mutation id is the highest the replica sent"
        );
    }
    for (doc, version) in &versions {
        let (sure, deletes) = counted.get(doc).copied().unwrap_or_default();
        assert!(
            sure <= *version && *version <= sure + deletes,
            "{doc:?} is at version {version}, but {sure} applied puts and patches and \
             {deletes} applied deletes were acknowledged: a write was lost or applied twice"
        );
    }
    for doc in counted.keys() {
        assert!(
            versions.contains_key(doc),
            "{doc:?} written but not on the server"
        );
    }
    eprintln!(
        "seed {seed}: {stats:?}; fates {fates:?}; {} documents",
        versions.len()
    );
}
