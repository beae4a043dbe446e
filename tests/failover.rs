//! Failover: a replica takes over from a dead primary without losing an
//! acknowledged write, a primary that was replaced is fenced off, and an old
//! primary rejoins as a replica of the new one. Every node is the real
//! `deltasync` binary (so it can be `kill -9`ed) on its own temporary store;
//! nothing sleeps to wait for a node: every wait polls, bounded.

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    cluster::*,
    process::{Logs, Process},
    *,
};
use deltasync::pb::{self, Outcome, PushRequest, Role};
use serde_json::{Value, json};
use tonic::Code;

/// Waits until `replica` has everything `primary` has, and `primary` lists
/// it (by its advertise URL) as in sync at its head.
async fn caught_up(primary: &Process, replica: &Process) {
    let url = replica.url();
    wait_for("the replica catches up", async || {
        let (p, r) = (primary.status().await, replica.status().await);
        r.head == p.head
            && p.replicas
                .iter()
                .any(|s| s.url == url && s.sync && s.acked == p.head)
    })
    .await;
}

/// A primary on `dirs[0]` and two replicas of it on `dirs[1]` and
/// `dirs[2]` (logs kept), all started with `args`: the cluster a failover
/// starts from, returned once both replicas have caught up.
async fn primary_and_replicas(
    dirs: [&DataDir; 3],
    args: &[&str],
) -> (Process, (Process, Logs), (Process, Logs)) {
    let primary = start(dirs[0], args);
    let a = start_replica_logged(dirs[1], &primary.url(), args);
    let b = start_replica_logged(dirs[2], &primary.url(), args);
    caught_up(&primary, &a.0).await;
    caught_up(&primary, &b.0).await;
    (primary, a, b)
}

/// Every document of `node` by id, to look a writer's documents up.
async fn docs_by_id(node: &Process) -> HashMap<String, pb::Document> {
    pull_all(node)
        .await
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect()
}

/// The log entries at `level` whose message contains `text`.
fn logged(logs: &Logs, level: &str, text: &str) -> Vec<Value> {
    logs.lock()
        .expect("logs")
        .iter()
        .filter(|e| e["level"] == level && e["message"].as_str().is_some_and(|m| m.contains(text)))
        .cloned()
        .collect()
}

/// A log field holding a number (tracing writes `%`-formatted ones as
/// strings).
fn number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// A push request of `client_id`.
fn request(client_id: &str, mutations: Vec<pb::Mutation>) -> PushRequest {
    PushRequest {
        client_id: client_id.into(),
        mutations,
        atomic: false,
    }
}

const COLLECTION: &str = "failover";
const WRITERS: u64 = 4;
const DOCS_PER_WRITER: u64 = 3;
/// How long the writers run before the primary is killed.
const LOAD: Duration = Duration::from_millis(1200);

/// Change `n` (from 0) of a writer's document: it is created, patched
/// twice, deleted, created again, and so on; every change is unconditional
/// and applies, so a document's version is the number of changes applied.
fn nth_change(writer: u64, id: &str, n: u64) -> pb::Mutation {
    match n % 4 {
        0 => put(
            COLLECTION,
            id,
            json!({"writer": writer, "n": n, "created": n}),
        ),
        1 | 2 => patch(COLLECTION, id, json!({"n": n})),
        _ => delete(COLLECTION, id),
    }
}

/// The body a writer's document has at `version` (its first `version`
/// changes applied); `None` for a tombstone.
fn body_at(writer: u64, version: u64) -> Option<Value> {
    let last = version.checked_sub(1).expect("a version from 1");
    (last % 4 != 3).then(|| json!({"writer": writer, "n": last, "created": last - last % 4}))
}

/// What one writer sent and was told.
#[derive(Default)]
struct Writer {
    /// Its number.
    n: u64,
    /// Its client id.
    client_id: String,
    /// Every acknowledged mutation in order, with its result and the
    /// checkpoint of its answer.
    acked: Vec<(pb::Mutation, pb::MutationResult, u64)>,
    /// The push in flight when the primary died: sent, never answered.
    unacked: Option<PushRequest>,
    /// Changes sent per document id, acknowledged or not.
    sent: HashMap<String, u64>,
    /// The last mutation id it sent.
    last_id: u64,
}

/// Pushes changes of the writer's own documents (one or two per push, one
/// push at a time, mutation ids increasing) until a push fails.
async fn write_until_error(mut client: Client, n: u64, acks: Arc<AtomicUsize>) -> Writer {
    let mut w = Writer {
        n,
        client_id: format!("writer-{n}"),
        ..Default::default()
    };
    let mut round = 0;
    loop {
        let docs = if round % 2 == 0 {
            vec![round % DOCS_PER_WRITER]
        } else {
            vec![round % DOCS_PER_WRITER, (round + 1) % DOCS_PER_WRITER]
        };
        round += 1;
        let mutations = docs
            .into_iter()
            .map(|d| {
                let id = format!("w{n}-d{d}");
                let sent = w.sent.entry(id.clone()).or_default();
                w.last_id += 1;
                let m = nth_change(n, &id, *sent).id(w.last_id);
                *sent += 1;
                m
            })
            .collect();
        let req = request(&w.client_id, mutations);
        match tokio::time::timeout(PATIENCE, client.push(req.clone())).await {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                assert_eq!(resp.results.len(), req.mutations.len());
                for (m, r) in req.mutations.into_iter().zip(resp.results) {
                    w.acked.push((m, r, resp.checkpoint));
                }
                acks.fetch_add(1, Ordering::Relaxed);
            }
            // The primary died: this push may or may not be committed.
            Ok(Err(_)) | Err(_) => {
                w.unacked = Some(req);
                return w;
            }
        }
    }
}

/// Checks a writer's document as a node holds it against the changes that
/// make its version.
fn check_state(w: &Writer, doc: &pb::Document) {
    let expected = body_at(w.n, doc.version);
    assert_eq!(
        doc.deleted,
        expected.is_none(),
        "{} at version {}",
        doc.id,
        doc.version
    );
    if let Some(body) = expected {
        assert_eq!(json(doc), body, "{} at version {}", doc.id, doc.version);
    }
    assert_eq!(doc.updated_by, w.client_id, "{}", doc.id);
}

/// Rule: with --sync-replicas 1, every acknowledged push survives the
/// primary's `kill -9` under load on the most advanced replica: promoted
/// (epoch 2, its head), it holds each acknowledged change at its
/// acknowledged version and seq (at or below the promoted head); the other
/// replica, pointed at it, converges; retrying the mutation ids that were
/// never answered gives APPLIED or DUPLICATE, and no change is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_failover() {
    let sync = ["--sync-replicas", "1"];
    let (p_dir, a_dir, b_dir) = (DataDir::new(), DataDir::new(), DataDir::new());
    let (old, (a, a_logs), (b, b_logs)) =
        primary_and_replicas([&p_dir, &a_dir, &b_dir], &sync).await;

    let acks = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..WRITERS {
        let client = old.client().await;
        tasks.push(tokio::spawn(write_until_error(client, n, acks.clone())));
    }
    let started = Instant::now();
    wait_for("the load runs a while", async || {
        started.elapsed() >= LOAD && acks.load(Ordering::Relaxed) >= 20
    })
    .await;
    let logged_before = (a_logs.lock().unwrap().len(), b_logs.lock().unwrap().len());
    old.kill_9();
    let mut writers = Vec::new();
    for t in tasks {
        writers.push(t.await.expect("writer"));
    }

    // Both streams ended (nothing more comes from the dead primary), and
    // what they brought has landed: the heads no longer move.
    for (logs, before) in [(&a_logs, logged_before.0), (&b_logs, logged_before.1)] {
        wait_for("the replica sees its primary die", async || {
            logs.lock().unwrap()[before..]
                .iter()
                .any(|e| e["message"] == "replication stream ended; reconnecting")
        })
        .await;
    }
    let mut heads = (0, 0);
    let mut steady = 0;
    wait_for("the replicas' heads settle", async || {
        let now = (a.status().await.head, b.status().await.head);
        steady = if now == heads { steady + 1 } else { 0 };
        heads = now;
        steady >= 3
    })
    .await;

    // Promote the most advanced replica.
    let ((new, _new_dir), (other, other_dir), head) = if heads.0 >= heads.1 {
        ((a, a_dir), (b, b_dir), heads.0)
    } else {
        ((b, b_dir), (a, a_dir), heads.1)
    };
    let promoted = promote(&new).await.expect("promote");
    assert_eq!((promoted.epoch, promoted.head), (2, head));
    let status = new.status().await;
    assert_eq!(
        (status.role(), status.epoch, status.head),
        (Role::Primary, 2, head)
    );

    // Every acknowledged change is there as acknowledged.
    let acked: usize = writers.iter().map(|w| w.acked.len()).sum();
    assert!(acked >= 20, "only {acked} mutations acknowledged");
    let docs = docs_by_id(&new).await;
    let mut client = new.client().await;
    for w in &writers {
        let mut changes: HashMap<&str, u64> = HashMap::new();
        let mut last: HashMap<&str, &pb::Document> = HashMap::new();
        for (m, r, checkpoint) in &w.acked {
            let version = changes.entry(&m.id).or_default();
            *version += 1;
            let doc = r.document.as_ref().expect("a result's document");
            assert_eq!(
                (outcome(r), doc.version),
                (Outcome::Applied, *version),
                "{} mutation {} as answered",
                w.client_id,
                m.mutation_id
            );
            assert!(
                doc.seq <= *checkpoint && *checkpoint <= promoted.head,
                "{} mutation {}: seq {}, checkpoint {checkpoint}, promoted at {}",
                w.client_id,
                m.mutation_id,
                doc.seq,
                promoted.head
            );
            last.insert(&m.id, doc);
        }
        let in_flight = |id: &str| {
            w.unacked
                .iter()
                .flat_map(|r| &r.mutations)
                .any(|m| m.id == id)
        };
        for id in w.sent.keys() {
            let now = docs.get(id);
            match (last.get(id.as_str()), now) {
                (Some(acked), Some(now)) if now.version == acked.version => {
                    assert_eq!((now.seq, now.deleted), (acked.seq, acked.deleted), "{id}");
                }
                (Some(acked), Some(now)) => assert!(
                    in_flight(id) && now.version == acked.version + 1,
                    "{id}: acknowledged at version {}, at {} on the new primary",
                    acked.version,
                    now.version
                ),
                (Some(acked), None) => panic!("{id}, acknowledged at {}, is lost", acked.version),
                (None, Some(now)) => assert!(in_flight(id) && now.version == 1, "{id}"),
                (None, None) => {}
            }
            if let Some(now) = now {
                assert!(now.seq <= promoted.head, "{id} beyond the promoted head");
                check_state(w, now);
            }
        }
        let acked_id = w.acked.last().map_or(0, |(m, _, _)| m.mutation_id);
        assert!(last_mutation_id(&mut client, &w.client_id).await >= acked_id);
    }

    // The other replica, pointed at the new primary, converges.
    other.kill_9();
    let other = start_replica(&other_dir, &new.url(), &sync);
    caught_up(&new, &other).await;
    assert_eq!(pull_all(&other).await, pull_all(&new).await);

    // Retrying what was never answered applies each change exactly once.
    for w in &writers {
        let Some(req) = &w.unacked else { continue };
        let resp = client
            .push(req.clone())
            .await
            .expect("a retry on the new primary")
            .into_inner();
        for (m, r) in req.mutations.iter().zip(&resp.results) {
            let doc = r.document.as_ref().expect("a result's document");
            assert!(
                matches!(outcome(r), Outcome::Applied | Outcome::Duplicate),
                "{} retry of {}: {:?}",
                w.client_id,
                m.mutation_id,
                outcome(r)
            );
            assert_eq!(doc.version, w.sent[&m.id], "{} retried", m.id);
        }
    }
    let docs = pull_all(&new).await;
    let total: usize = writers.iter().map(|w| w.sent.len()).sum();
    assert_eq!(docs.len(), total);
    for doc in &docs {
        let w = writers
            .iter()
            .find(|w| w.sent.contains_key(&doc.id))
            .expect("a writer's document");
        assert_eq!(
            doc.version, w.sent[&doc.id],
            "{}: a change applied twice or lost",
            doc.id
        );
        check_state(w, doc);
    }
    caught_up(&new, &other).await;
    assert_eq!(pull_all(&other).await, docs);
    let mut other_client = other.client().await;
    for w in &writers {
        let on_new = last_mutation_id(&mut client, &w.client_id).await;
        assert_eq!(on_new, w.last_id, "{}", w.client_id);
        assert_eq!(
            last_mutation_id(&mut other_client, &w.client_id).await,
            on_new
        );
    }
}

/// Rule: with --sync-replicas 1 and no replica, a Push is committed on the
/// primary but answered UNAVAILABLE after about --sync-timeout, saying so;
/// a retry with the same ids waits the same way (a DUPLICATE answer is not
/// an acknowledgement) until a replica has caught up, then answers
/// DUPLICATE: applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreplicated_push_is_unavailable_until_a_replica_holds_it() {
    let (p_dir, r_dir) = (DataDir::new(), DataDir::new());
    let node = start(&p_dir, &["--sync-replicas", "1", "--sync-timeout", "500ms"]);
    let mut client = node.client().await;
    let req = request(
        "sync-client",
        vec![
            put(COLLECTION, "a", json!({"x": 1})).id(1),
            put(COLLECTION, "b", json!({"x": 2})).id(2),
        ],
    );
    for attempt in ["first", "retry"] {
        let started = Instant::now();
        let status = push_refused(&mut client, req.clone()).await;
        let took = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{attempt}: {status:?}");
        for text in ["committed on the primary", "same mutation ids"] {
            assert!(status.message().contains(text), "{attempt}: {status:?}");
        }
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(3),
            "{attempt}: answered after {took:?}, the timeout is 500ms"
        );
    }

    let replica = start_replica(&r_dir, &node.url(), &[]);
    caught_up(&node, &replica).await;
    let resp = client.push(req).await.expect("the retry").into_inner();
    for r in &resp.results {
        let doc = r.document.as_ref().expect("document");
        assert_eq!((outcome(r), doc.version), (Outcome::Duplicate, 1), "{r:?}");
    }
    assert_eq!(resp.last_mutation_id, 2);
    let mut on_replica = replica.client().await;
    for id in ["a", "b"] {
        let doc = get(&mut on_replica, COLLECTION, id).await.expect(id);
        assert_eq!(doc.version, 1, "{id}");
    }
    // With the replica in sync, a new write is acknowledged.
    let next = push_one(
        &mut client,
        "sync-client",
        put(COLLECTION, "c", json!({})).id(3),
    )
    .await;
    assert_eq!(outcome(&next), Outcome::Applied);
}

/// Rule: a primary restarted after another node was promoted cannot
/// acknowledge a write with --sync-replicas 1 (no replica of the new epoch
/// follows it); once a replica of the new primary (epoch 2) connects to it,
/// it is deposed: Push fails FAILED_PRECONDITION, reason NOT_PRIMARY,
/// Status shows deposed and epoch 2, a restart keeps it deposed, and the
/// replica takes nothing from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_primary_is_fenced_by_the_new_epoch() {
    let sync = ["--sync-replicas", "1", "--sync-timeout", "500ms"];
    let (p_dir, a_dir, b_dir) = (DataDir::new(), DataDir::new(), DataDir::new());
    let (old, (a, _), (b, _)) = primary_and_replicas([&p_dir, &a_dir, &b_dir], &sync).await;
    let mut client = old.client().await;
    push(
        &mut client,
        "fence",
        vec![
            put(COLLECTION, "one", json!({"n": 1})).id(1),
            put(COLLECTION, "two", json!({"n": 2})).id(2),
        ],
    )
    .await;
    caught_up(&old, &a).await;
    caught_up(&old, &b).await;
    old.kill_9();

    // A becomes the primary (epoch 2); B follows it and writes continue.
    let promoted = promote(&a).await.expect("promote");
    assert_eq!(promoted.epoch, 2);
    b.kill_9();
    let b = start_replica(&b_dir, &a.url(), &sync);
    caught_up(&a, &b).await;
    let mut on_new = a.client().await;
    push(
        &mut on_new,
        "fence",
        vec![put(COLLECTION, "three", json!({"n": 3})).id(3)],
    )
    .await;
    caught_up(&a, &b).await;
    assert_eq!(b.status().await.epoch, 2);

    // The old primary comes back as a primary: it has not heard of epoch 2,
    // but no replica of it holds its writes, so none is acknowledged.
    let old = start(&p_dir, &sync);
    let status = old.status().await;
    assert_eq!(
        (status.role(), status.epoch, status.deposed),
        (Role::Primary, 1, false)
    );
    let mut client = old.client().await;
    let stale = request(
        "stale",
        vec![put(COLLECTION, "stale", json!({"old": true})).id(1)],
    );
    let refused = push_refused(&mut client, stale.clone()).await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // B (epoch 2) is pointed at it: it is deposed, and B takes nothing.
    let (b_head, b_docs) = (b.status().await.head, pull_all(&b).await);
    b.kill_9();
    let b = start_replica(&b_dir, &old.url(), &sync);
    wait_for("the old primary is deposed", async || {
        old.status().await.deposed
    })
    .await;
    let status = old.status().await;
    assert_eq!((status.deposed, status.epoch), (true, 2));
    let refused = push_refused(&mut client, stale.clone()).await;
    assert_reason(&refused, Code::FailedPrecondition, "NOT_PRIMARY");
    let status = b.status().await;
    assert_eq!((status.head, status.epoch), (b_head, 2));
    assert_eq!(pull_all(&b).await, b_docs);
    assert_eq!(pull_all(&a).await, b_docs);

    // Restarted as a primary, it is still deposed.
    old.kill_9();
    let old = start(&p_dir, &sync);
    assert!(old.status().await.deposed);
    let refused = push_refused(&mut old.client().await, stale).await;
    assert_reason(&refused, Code::FailedPrecondition, "NOT_PRIMARY");
}

/// Rule: an old primary restarted as a replica of the new primary while
/// holding commits that were never replicated refuses to follow (its head
/// and documents stay; its log names the divergent seq range); restarted
/// with --discard-divergent it logs each dropped document at warn level,
/// then converges: the same Pull from 0 and the same last mutation ids as
/// the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_primary_rejoins_after_discarding_its_divergent_suffix() {
    let (p_dir, r_dir) = (DataDir::new(), DataDir::new());
    let old = start(&p_dir, &[]);
    let old_url = old.url();
    let r = start_replica(&r_dir, &old_url, &[]);
    let mut client = old.client().await;
    push(
        &mut client,
        "w",
        ["a", "b", "c", "d"]
            .iter()
            .zip(1..)
            .map(|(id, n)| put(COLLECTION, id, json!({"n": n})).id(n))
            .collect(),
    )
    .await;
    caught_up(&old, &r).await;
    let shared = r.status().await.head;
    r.kill_9();

    // Only the old primary has these.
    let divergent = [
        ("w", patch(COLLECTION, "a", json!({"by": "old"})).id(5)),
        ("w", delete(COLLECTION, "b").id(6)),
        ("w", put(COLLECTION, "e", json!({"by": "old"})).id(7)),
        ("x", put(COLLECTION, "f", json!({"by": "old"})).id(1)),
    ];
    for (client_id, m) in divergent.clone() {
        push_one(&mut client, client_id, m).await;
    }
    let old_head = old.status().await.head;
    assert_eq!(old_head, shared + 4);
    old.kill_9();

    // The replica, restarted while its primary is down, is promoted and
    // takes other writes, with the same client's next ids.
    let r = start_replica(&r_dir, &old_url, &[]);
    let promoted = promote(&r).await.expect("promote");
    assert_eq!((promoted.epoch, promoted.head), (2, shared));
    let mut on_new = r.client().await;
    push(
        &mut on_new,
        "w",
        vec![
            patch(COLLECTION, "a", json!({"by": "new"})).id(5),
            put(COLLECTION, "g", json!({"by": "new"})).id(6),
        ],
    )
    .await;

    // Pointed at the new primary, the old one refuses to follow.
    let (old, logs) = start_replica_logged(&p_dir, &r.url(), &[]);
    let range = format!("{}..={}", shared + 1, old_head);
    wait_for("the old primary refuses to follow", async || {
        !logged(&logs, "ERROR", &range).is_empty()
    })
    .await;
    let status = old.status().await;
    assert_eq!((status.role(), status.head), (Role::Replica, old_head));
    let docs = docs_by_id(&old).await;
    assert_eq!(json(&docs["a"])["by"], "old");
    assert!(docs["b"].deleted);
    assert!(docs.contains_key("e") && docs.contains_key("f"));
    assert!(!docs.contains_key("g"));
    let mut on_old = old.client().await;
    assert_eq!(last_mutation_id(&mut on_old, "x").await, 1);
    old.kill_9();

    // With --discard-divergent it drops them, logging each, and converges.
    let (old, logs) = start_replica_logged(&p_dir, &r.url(), &["--discard-divergent"]);
    wait_for("the old primary converges", async || {
        if let Some(refusal) = logged(&logs, "ERROR", "not following").pop() {
            panic!("with --discard-divergent it still refuses to follow: {refusal}");
        }
        old.status().await.head == r.status().await.head
            && pull_all(&old).await == pull_all(&r).await
    })
    .await;
    let dropped = logged(&logs, "WARN", "discarding a divergent change");
    let dropped_docs: BTreeSet<(String, String)> = dropped
        .iter()
        .map(|e| {
            let seq = number(&e["seq"]).expect("a seq field");
            assert!((shared + 1..=old_head).contains(&seq), "{e}");
            let field = |name: &str| e[name].as_str().expect(name).to_owned();
            (field("collection"), field("id"))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = divergent
        .iter()
        .map(|(_, m)| (m.collection.clone(), m.id.clone()))
        .collect();
    assert_eq!(dropped_docs, expected);
    let mut on_old = old.client().await;
    for client_id in ["w", "x"] {
        assert_eq!(
            last_mutation_id(&mut on_old, client_id).await,
            last_mutation_id(&mut on_new, client_id).await,
            "{client_id}"
        );
    }
    assert_eq!(last_mutation_id(&mut on_old, "w").await, 6);
    assert_eq!(last_mutation_id(&mut on_old, "x").await, 0);
}

/// Rule: Promote on a primary is FAILED_PRECONDITION. Status tells a
/// primary (role, epoch 1, the store id all nodes share, each replica by
/// its advertise URL, in sync with lag 0 once caught up) and a replica
/// (role, epoch, store id, head, its --replicate-from).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_describes_the_cluster_and_a_primary_is_not_promoted() {
    let (p_dir, a_dir, b_dir) = (DataDir::new(), DataDir::new(), DataDir::new());
    let node = start(&p_dir, &[]);
    let url = node.url();
    let a = start_replica(&a_dir, &url, &[]);
    let b = start_replica(&b_dir, &url, &[]);
    let mut client = node.client().await;
    push(
        &mut client,
        "status",
        vec![
            put(COLLECTION, "x", json!({})).id(1),
            put(COLLECTION, "y", json!({})).id(2),
        ],
    )
    .await;
    caught_up(&node, &a).await;
    caught_up(&node, &b).await;

    let refused = promote(&node).await.expect_err("a primary is not promoted");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    let status = node.status().await;
    assert_eq!(
        (status.role(), status.epoch, status.head, status.deposed),
        (Role::Primary, 1, 2, false)
    );
    assert!(!status.store_id.is_empty());
    assert_eq!(status.primary, "");
    let mut expected = vec![
        pb::ReplicaStatus {
            url: a.url(),
            acked: 2,
            lag: 0,
            sync: true,
        },
        pb::ReplicaStatus {
            url: b.url(),
            acked: 2,
            lag: 0,
            sync: true,
        },
    ];
    expected.sort_by(|x, y| x.url.cmp(&y.url));
    let mut replicas = status.replicas.clone();
    replicas.sort_by(|x, y| x.url.cmp(&y.url));
    assert_eq!(replicas, expected);

    for r in [&a, &b] {
        let s = r.status().await;
        assert_eq!(
            (s.role(), s.epoch, s.store_id.as_str(), s.head),
            (Role::Replica, 1, status.store_id.as_str(), 2)
        );
        assert_eq!(s.primary, url);
        assert!(s.replicas.is_empty() && !s.deposed);
    }
}
