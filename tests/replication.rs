//! Replication: real `deltasync` processes, one primary and replicas that
//! copy its store (`--replicate-from`). The tests check what a client of any
//! node can see: identical Pulls (documents, versions, seqs, times, authors,
//! store id) and client mutation ids on every node, read-your-writes with
//! `min_checkpoint`, readiness, refusals with clear statuses, and recovery
//! from `kill -9`.
//!
//! Nothing sleeps to wait for a server: every wait is a bounded poll
//! ([`Patience`]). Where a test must hold the replication stream at a chosen
//! point (before the hello, in the middle of a commit) it puts a [`Gate`], a
//! TCP relay with a byte allowance, between the replica and its primary.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    cluster::*,
    process::{Logs, Process},
    *,
};
use deltasync::pb::{
    self, ConflictStrategy, FollowRequest, FollowStart, GetRequest, Outcome, PullRequest,
    PushRequest, Role, SubscribeRequest, follow_request, follow_response,
    subscribe_response::Event,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The collection every test writes to.
const DOCS: &str = "docs";
/// The service name whose health is the node's readiness.
const SYNC_SERVICE: &str = "deltasync.v1.SyncService";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// The health of `service` on `p` (`""` is liveness).
async fn health(p: &Process, service: &str) -> ServingStatus {
    let channel = Channel::from_shared(p.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(response.status).expect("known serving status")
}

/// A JSON object with one field.
fn field(name: String, value: Value) -> Value {
    Value::Object(serde_json::Map::from_iter([(name, value)]))
}

/// Polls `p`'s head for half a second and fails if it is ever strictly
/// inside the commit that wrote seqs `first..=last`: a replica applies a
/// primary's commit whole or not at all. (What must *not* happen can only
/// be watched for a while; half a second is hundreds of polls.)
async fn never_inside(p: &Process, first: u64, last: u64, context: &str) {
    let until = Instant::now() + Duration::from_millis(500);
    let mut admin = p.admin().await;
    while Instant::now() < until {
        let head = admin
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .head;
        if (first..last).contains(&head) {
            let mut c = p.client().await;
            let visible = pull_page(&mut c, first - 1).await.documents.len();
            panic!(
                "{context}: the replica's head is {head}, inside the commit of seqs {first}..={last}: \
                 {visible} of its {} documents are readable there",
                last - first + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------
// Convergence under concurrent writers
// ---------------------------------------------------------------------------

/// Documents the writers of the convergence test share.
const KEYS: u64 = 12;

/// What one writer of the convergence test does, over and over.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// Unconditional puts.
    Put,
    /// Patches on the base just read (or one older), under each strategy.
    Patch,
    /// Deletes on the base just read, and re-creations (base 0).
    Delete,
    /// Atomic batches of 2-3 mutations, one in three with a base far
    /// ahead: the whole batch is then NOT_APPLIED.
    Atomic,
}

/// Runs `load` through `c` as `client` (mutation ids 1, 2, ...) until
/// `stop`; returns what its pushes got.
async fn writer(
    load: Load,
    mut c: Client,
    client: String,
    seed: u64,
    stop: CancellationToken,
) -> Tally {
    let key = |n: u64| format!("k{}", (n * 5 + seed) % KEYS);
    let mut next_id = 1;
    let mut n = 0;
    let mut tally = Tally::default();
    while !stop.is_cancelled() {
        n += 1;
        let mut mutations = match load {
            Load::Put => vec![put(DOCS, &key(n), json!({"by": client, "n": n}))],
            Load::Patch => {
                let body = field(format!("f{}", n % 3), json!(n));
                let strategy = [
                    ConflictStrategy::Reject,
                    ConflictStrategy::ServerWins,
                    ConflictStrategy::ClientWins,
                ][usize::try_from(n % 3).expect("small")];
                match get(&mut c, DOCS, &key(n)).await {
                    Some(d) if !d.deleted => {
                        let base = if n % 4 == 0 {
                            d.version.saturating_sub(1).max(1)
                        } else {
                            d.version
                        };
                        vec![patch(DOCS, &key(n), body).base(base).on_conflict(strategy)]
                    }
                    _ => vec![put(DOCS, &key(n), body).base(0)],
                }
            }
            Load::Delete => match get(&mut c, DOCS, &key(n)).await {
                Some(d) if !d.deleted && n % 5 == 0 => vec![delete(DOCS, &key(n))],
                Some(d) if !d.deleted => vec![delete(DOCS, &key(n)).base(d.version)],
                _ => vec![put(DOCS, &key(n), json!({"reborn": n})).base(0)],
            },
            Load::Atomic => {
                let mut batch = vec![
                    put(DOCS, &key(n), json!({"atomic": n, "by": client})),
                    patch(DOCS, &key(n + 1), json!({"touched": n})),
                ];
                if n % 3 == 0 {
                    batch.push(put(DOCS, &key(n + 2), json!({})).base(1_000_000));
                }
                batch
            }
        };
        for m in &mut mutations {
            m.mutation_id = next_id;
            next_id += 1;
        }
        let request = PushRequest {
            client_id: client.clone(),
            mutations,
            atomic: matches!(load, Load::Atomic),
        };
        let deleting: Vec<bool> = request
            .mutations
            .iter()
            .map(|m| matches!(m.op, Some(pb::mutation::Op::Delete(()))))
            .collect();
        let response = match c.push(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => panic!("{client}: push {n} failed: {status:?}"),
        };
        tally.pushes += 1;
        for (result, deleting) in response.results.iter().zip(deleting) {
            *tally.outcomes.entry(outcome(result)).or_default() += 1;
            if deleting && outcome(result) == Outcome::Applied {
                tally.deletes += 1;
            }
        }
    }
    tally
}

/// What the writers of the convergence test got: proof that the load did
/// what it is meant to.
#[derive(Debug, Default)]
struct Tally {
    /// Pushes answered.
    pushes: u64,
    /// Results by outcome.
    outcomes: BTreeMap<Outcome, u64>,
    /// Deletes applied.
    deletes: u64,
}

impl Tally {
    fn add(&mut self, other: Self) {
        self.pushes += other.pushes;
        self.deletes += other.deletes;
        for (outcome, n) in other.outcomes {
            *self.outcomes.entry(outcome).or_default() += n;
        }
    }
}

/// Rule: a primary and its replicas hold the same store. After concurrent
/// writers (puts, patches, deletes, conflicts, atomic batches with client
/// and mutation ids) sent to the primary and through both replicas (which
/// forward them), every node reaches the primary's head and returns the
/// identical Pull from 0 (documents, versions, seqs, times, authors,
/// store_id) and the identical last_mutation_id for every client; the
/// primary's Status lists both replicas as caught up.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_converge_under_concurrent_writers() {
    let dp = DataDir::new();
    let da = DataDir::new();
    let db = DataDir::new();
    let primary = start(&dp, &[]);
    let a = start_replica(&da, &primary.url(), &[]);
    let b = start_replica(&db, &primary.url(), &[]);

    let plan = [
        (Load::Put, &primary),
        (Load::Put, &a),
        (Load::Patch, &a),
        (Load::Patch, &b),
        (Load::Delete, &b),
        (Load::Atomic, &primary),
        (Load::Atomic, &a),
        (Load::Atomic, &b),
    ];
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    for (i, (load, node)) in plan.into_iter().enumerate() {
        let client = format!("{load:?}-{i}").to_lowercase();
        clients.push(client.clone());
        let seed = u64::try_from(i).expect("small");
        tasks.push(tokio::spawn(writer(
            load,
            node.client().await,
            client,
            seed,
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // the load's duration
    stop.cancel();
    let mut tally = Tally::default();
    for t in tasks {
        tally.add(t.await.expect("writer"));
    }
    let seen = |o| tally.outcomes.get(&o).copied().unwrap_or(0);
    assert!(
        tally.pushes >= 40
            && tally.deletes > 0
            && seen(Outcome::Applied) > 0
            && seen(Outcome::Conflict) > 0
            && seen(Outcome::NotApplied) > 0
            && seen(Outcome::Merged) + seen(Outcome::Resolved) > 0,
        "the load must push, delete, conflict, merge and roll back: {tally:?}"
    );

    let expected = converged(&primary, &[&a, &b], &clients).await;
    assert!(expected.last_ids.values().all(|&id| id > 0));
    let store_id = primary.status().await.store_id;
    assert_eq!(expected.store_id, store_id);
    for r in [&a, &b] {
        let s = r.status().await;
        assert_eq!(
            (s.role(), s.store_id.as_str(), s.primary.as_str()),
            (Role::Replica, store_id.as_str(), primary.url().as_str())
        );
    }
    // The primary sees both replicas acknowledge its head.
    let head = expected.checkpoint;
    let wait = Patience::new("the primary lists both replicas with lag 0");
    loop {
        let s = primary.status().await;
        let mut listed: Vec<_> = s
            .replicas
            .iter()
            .map(|r| (r.url.clone(), r.acked, r.lag))
            .collect();
        listed.sort();
        let mut want = vec![(a.url(), head, 0), (b.url(), head, 0)];
        want.sort();
        if listed == want {
            assert_eq!(s.role(), Role::Primary);
            break;
        }
        wait.tick().await;
    }
}

// ---------------------------------------------------------------------------
// kill -9 of a replica, and a subscriber that follows it across the restart
// ---------------------------------------------------------------------------

/// What a subscriber received: every document's seq in order, and where to
/// resume.
#[derive(Debug, Default)]
struct Received {
    seqs: Vec<u64>,
    checkpoint: u64,
    purge_horizon: u64,
}

/// Reads `stream` into `got` until its checkpoint reaches `upto`; an error
/// (the node died) ends it early.
async fn receive(
    mut stream: tonic::Streaming<pb::SubscribeResponse>,
    got: &Mutex<Received>,
    upto: u64,
) -> Result<(), Status> {
    while got.lock().unwrap().checkpoint < upto {
        let Some(message) = stream.message().await? else {
            return Err(Status::unavailable("the stream ended"));
        };
        let mut got = got.lock().unwrap();
        match message.event {
            Some(Event::Changes(batch)) => {
                got.seqs.extend(batch.documents.iter().map(|d| d.seq));
                (got.checkpoint, got.purge_horizon) = (batch.checkpoint, batch.purge_horizon);
            }
            Some(Event::Progress(p)) => {
                (got.checkpoint, got.purge_horizon) = (p.checkpoint, p.purge_horizon);
            }
            None => panic!("an empty Subscribe message"),
        }
    }
    Ok(())
}

/// Creates documents of its own (base 0, mutation ids 1, 2, ...) on the
/// primary until `stop`: every push is one change with one seq.
async fn creator(mut c: Client, w: u64, stop: CancellationToken) {
    let client = format!("creator-{w}");
    let mut id = 1;
    while !stop.is_cancelled() {
        let m = put(DOCS, &format!("w{w}-{id}"), json!({"w": w, "id": id}))
            .base(0)
            .id(id);
        let result = push_one(&mut c, &client, m).await;
        assert_eq!(outcome(&result), Outcome::Applied);
        id += 1;
    }
}

/// Rule: a replica killed with `kill -9` mid-load and restarted on the same
/// data directory resumes from what it had applied and converges (identical
/// Pull from 0 and client ids); a client subscribed to it that resumes on
/// the restarted replica from its last checkpoint (with the store_id and
/// purge_horizon it got) sees every change exactly once: its seqs are
/// exactly 1..=head, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_replica_resumes_and_its_subscriber_sees_every_change_once() {
    let dp = DataDir::new();
    let dr = DataDir::new();
    let primary = start(&dp, &[]);
    let replica = start_replica(&dr, &primary.url(), &[]);
    let store_id = primary.status().await.store_id;

    let got = Arc::new(Mutex::new(Received::default()));
    let mut c = replica.client().await;
    let stream = c
        .subscribe(SubscribeRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    let first = tokio::spawn({
        let got = got.clone();
        async move { receive(stream, &got, u64::MAX).await }
    });

    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..2 {
        writers.push(tokio::spawn(creator(
            primary.client().await,
            w,
            stop.clone(),
        )));
    }

    // Kill the replica while it applies and its subscriber reads.
    let wait = Patience::new("the subscriber receives 40 changes from the replica");
    while got.lock().unwrap().seqs.len() < 40 {
        wait.tick().await;
    }
    replica.kill_9();
    let ended = first.await.expect("subscriber task");
    assert!(ended.is_err(), "the stream of a killed replica fails");
    let killed_at = primary.status().await.head;

    let replica = start_replica(&dr, &primary.url(), &[]);
    let (since, seen) = {
        let got = got.lock().unwrap();
        (got.checkpoint, got.purge_horizon)
    };
    // It kept what it had applied (everything its subscriber was shown).
    let kept = replica.status().await.head;
    assert!(
        kept >= since,
        "restarted at head {kept}, below {since} it served"
    );
    let mut c = replica.client().await;
    let stream = c
        .subscribe(SubscribeRequest {
            since,
            store_id: store_id.clone(),
            purge_horizon: seen,
            ..Default::default()
        })
        .await
        .expect("resubscribe from the last checkpoint")
        .into_inner();

    // More load after the restart, then stop.
    let wait = Patience::new("the load goes on after the restart");
    while primary.status().await.head < killed_at + 100 {
        wait.tick().await;
    }
    stop.cancel();
    for w in writers {
        w.await.expect("writer");
    }
    let head = primary.status().await.head;
    tokio::time::timeout(Duration::from_secs(20), receive(stream, &got, head))
        .await
        .expect("the subscriber reaches the primary's head in 20 s")
        .expect("the resumed stream");
    let got = std::mem::take(&mut *got.lock().unwrap());
    assert_eq!(got.checkpoint, head);
    let expected: Vec<u64> = (1..=head).collect();
    if got.seqs != expected {
        let mut sorted = got.seqs.clone();
        sorted.sort_unstable();
        let duplicates = sorted.windows(2).filter(|w| w[0] == w[1]).count();
        let missing = expected
            .iter()
            .filter(|s| sorted.binary_search(s).is_err())
            .count();
        panic!(
            "the subscriber got {} changes for {head} seqs ({duplicates} duplicated, {missing} missing, resumed at {since})",
            got.seqs.len()
        );
    }
    let clients = vec!["creator-0".to_owned(), "creator-1".to_owned()];
    converged(&primary, &[&replica], &clients).await;
}

// ---------------------------------------------------------------------------
// Bootstrap from a compacted primary
// ---------------------------------------------------------------------------

/// Whether version `base` of `DOCS/id` is gone from the delta log, asked
/// without writing: an atomic batch whose second mutation always conflicts.
/// A patch of a field nobody touched merges if the base is known (so it is
/// NOT_APPLIED here) and conflicts if it was pruned.
async fn base_pruned(c: &mut Client, id: &str, base: u64) -> bool {
    let request = PushRequest {
        atomic: true,
        mutations: vec![
            patch(DOCS, id, json!({"probe": 1})).base(base),
            put(DOCS, id, json!({})).base(1_000_000),
        ],
        ..Default::default()
    };
    let response = push_req(c, request).await;
    assert_eq!(outcome(&response.results[1]), Outcome::Conflict);
    outcome(&response.results[0]) == Outcome::Conflict
}

/// Asserts that a Pull from `since` (with no purge_horizon) is refused as
/// below the purge horizon.
async fn assert_pull_compacted(p: &Process, since: u64, horizon: u64) {
    let mut c = p.client().await;
    let status = c
        .pull(PullRequest {
            since,
            ..Default::default()
        })
        .await
        .expect_err("a checkpoint below the purge horizon is refused");
    let info = assert_reason(&status, Code::OutOfRange, "CHECKPOINT_COMPACTED");
    assert_eq!(
        (
            info.metadata.get("purge_horizon"),
            info.metadata.get("checkpoint")
        ),
        (Some(&horizon.to_string()), Some(&since.to_string())),
        "{}",
        p.url()
    );
    let status = c
        .subscribe(SubscribeRequest {
            since,
            ..Default::default()
        })
        .await
        .expect_err("a Subscribe below the purge horizon is refused");
    assert_reason(&status, Code::OutOfRange, "CHECKPOINT_COMPACTED");
}

/// Rule: a new replica bootstraps from a primary that has purged tombstones
/// and pruned superseded history: it converges to the identical Pull from 0
/// (same purge horizon), and, like the primary, refuses a Pull or Subscribe
/// from a checkpoint below the horizon (OUT_OF_RANGE, CHECKPOINT_COMPACTED).
/// A Follow from below the horizon is refused the same way.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_replica_bootstraps_from_a_compacted_primary() {
    let dp = DataDir::new();
    let primary = start(&dp, &SHORT_RETENTION);
    let mut c = primary.client().await;
    for i in 0..6 {
        push_one(
            &mut c,
            "boot",
            put(DOCS, &format!("d{i}"), json!({"v": 1})).id(i + 1),
        )
        .await;
    }
    for i in 0..3 {
        push_one(
            &mut c,
            "boot",
            patch(DOCS, &format!("d{i}"), json!({"v": 2})).id(10 + i),
        )
        .await;
        push_one(
            &mut c,
            "boot",
            patch(DOCS, &format!("d{i}"), json!({"v": 3})).id(20 + i),
        )
        .await;
    }
    for i in 3..5 {
        push_one(&mut c, "boot", delete(DOCS, &format!("d{i}")).id(30 + i)).await;
    }
    // Seqs 1..=6 created, 7..=12 patched, 13..=14 deleted; then a live write
    // after them, so the log keeps a document past the horizon.
    push_one(&mut c, "boot", put(DOCS, "late", json!({"v": 1})).id(40)).await;
    let head = primary.status().await.head;
    assert_eq!(head, 15);

    let wait = Patience::new("the primary purges both tombstones and prunes history");
    loop {
        let s = snapshot(&primary, &[]).await;
        if s.purge_horizon == 14
            && !s.documents.iter().any(|d| d.deleted)
            && base_pruned(&mut c, "d0", 2).await
        {
            break;
        }
        wait.tick().await;
    }
    assert_pull_compacted(&primary, 5, 14).await;

    let dr = DataDir::new();
    let replica = start_replica(&dr, &primary.url(), &[]);
    let clients = vec!["boot".to_owned()];
    let s = converged(&primary, &[&replica], &clients).await;
    assert_eq!(
        (s.purge_horizon, s.documents.len(), s.last_ids["boot"]),
        (14, 5, 40)
    );
    assert_eq!(replica.status().await.head, head);
    assert_pull_compacted(&replica, 5, 14).await;
    // A pass from 0 with the horizon passed back is served on both.
    for node in [&primary, &replica] {
        let mut c = node.client().await;
        let page = c
            .pull(PullRequest {
                since: 12,
                purge_horizon: 14,
                ..Default::default()
            })
            .await
            .expect("a checkpoint consistent with the horizon")
            .into_inner();
        assert_eq!(page.documents.len(), 1);
    }

    // A follower that stopped below the horizon must start again from empty.
    let mut follow = replication(&primary).await;
    let stale = FollowRequest {
        request: Some(follow_request::Request::Start(FollowStart {
            store_id: s.store_id.clone(),
            applied: 5,
            epoch: primary.status().await.epoch,
            url: "http://stale-follower".into(),
            clients_since: 5,
            ..Default::default()
        })),
    };
    let status = follow
        .follow(futures_util::stream::iter([stale]))
        .await
        .expect_err("a follower below the horizon is refused");
    assert_reason(&status, Code::OutOfRange, "CHECKPOINT_COMPACTED");
}

// ---------------------------------------------------------------------------
// Read-your-writes and min_checkpoint
// ---------------------------------------------------------------------------

/// A Get of one document with `min_checkpoint`.
fn get_at(id: &str, min_checkpoint: u64) -> GetRequest {
    GetRequest {
        collection: DOCS.into(),
        ids: vec![id.into()],
        min_checkpoint,
    }
}

/// Rule: a write forwarded by replica A is readable from A as soon as the
/// Push is answered (no min_checkpoint), and from replica B with
/// min_checkpoint = the Push's checkpoint (Get, Pull, Subscribe), which
/// waits while B has not applied it (a `since` above B's head waits the
/// same way); a min_checkpoint (or a `since`) a replica does not reach
/// within --replica-wait fails UNAVAILABLE with reason REPLICA_BEHIND and
/// metadata applied / wanted.
#[tokio::test(flavor = "multi_thread")]
async fn reads_see_writes_through_forwarding_and_min_checkpoint() {
    let dp = DataDir::new();
    let da = DataDir::new();
    let db = DataDir::new();
    let dc = DataDir::new();
    let primary = start(&dp, &[]);
    let a = start_replica(&da, &primary.url(), &[]);
    // B follows through a gate, to be held behind; C gives up early.
    let gate = Gate::start(&primary.addr, u64::MAX, Dial::AtOnce).await;
    let b = start_replica(&db, &gate.url(), &[]);
    let c = start_replica(&dc, &primary.url(), &["--replica-wait", "300ms"]);
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    let mut last = 0;
    for i in 1..=10 {
        let id = format!("ryw-{i}");
        let response = push(&mut ca, "ryw", vec![put(DOCS, &id, json!({"i": i})).id(i)]).await;
        let written = response.results[0].document.clone().expect("document");
        assert!(response.checkpoint > last);
        last = response.checkpoint;

        let on_a = get(&mut ca, DOCS, &id).await;
        assert_eq!(on_a.as_ref(), Some(&written), "A reads its forwarded write");

        let on_b = cb
            .get(get_at(&id, last))
            .await
            .expect("get with min_checkpoint")
            .into_inner()
            .documents;
        assert_eq!(on_b, vec![written.clone()], "B at min_checkpoint {last}");
        let page = cb
            .pull(PullRequest {
                since: last - 1,
                min_checkpoint: last,
                client_id: "ryw".into(),
                ..Default::default()
            })
            .await
            .expect("pull with min_checkpoint")
            .into_inner();
        assert_eq!((page.documents, page.last_mutation_id), (vec![written], i));
    }
    let mut feed = cb
        .subscribe(SubscribeRequest {
            since: last - 1,
            min_checkpoint: last,
            ..Default::default()
        })
        .await
        .expect("subscribe with min_checkpoint")
        .into_inner();
    match feed.message().await.expect("message").expect("a message") {
        pb::SubscribeResponse {
            event: Some(Event::Changes(batch)),
        } => assert_eq!(
            (batch.documents.len(), batch.checkpoint),
            (1, last),
            "the backlog is the last write"
        ),
        other => panic!("expected the last write, got {other:?}"),
    }

    // B held: its reads at the new checkpoint wait until it gets there.
    gate.hold();
    let response = push(&mut ca, "ryw", vec![put(DOCS, "held", json!({})).id(11)]).await;
    let (held, written) = (response.checkpoint, response.results[0].document.clone());
    let get_held = tokio::spawn({
        let mut cb = cb.clone();
        async move { cb.get(get_at("held", held)).await }
    });
    let pull_held = tokio::spawn({
        let mut cb = cb.clone();
        async move {
            let request = PullRequest {
                since: held,
                ..Default::default()
            };
            cb.pull(request).await
        }
    });
    assert!(b.status().await.head < held, "B is held behind its gate");
    gate.open();
    let found = get_held.await.expect("task").expect("the Get waits for B");
    assert_eq!(found.into_inner().documents, Vec::from_iter(written));
    let page = pull_held
        .await
        .expect("task")
        .expect("the Pull waits for B");
    assert_eq!(page.into_inner().checkpoint, held);

    // Far ahead: C gives up after its --replica-wait.
    let mut cc = c.client().await;
    cc.get(get_at("held", held)).await.expect("C catches up");
    let wanted = held + 1_000_000;
    let started = Instant::now();
    let status = cc
        .get(get_at("ryw-1", wanted))
        .await
        .expect_err("C never reaches it");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "--replica-wait 300ms"
    );
    let info = assert_reason(&status, Code::Unavailable, "REPLICA_BEHIND");
    assert_eq!(
        (info.metadata.get("applied"), info.metadata.get("wanted")),
        (Some(&held.to_string()), Some(&wanted.to_string()))
    );
    let status = cc
        .pull(PullRequest {
            since: wanted,
            ..Default::default()
        })
        .await
        .expect_err("a since above the replica's head waits, then fails");
    assert_reason(&status, Code::Unavailable, "REPLICA_BEHIND");
    let status = cc
        .subscribe(SubscribeRequest {
            min_checkpoint: wanted,
            ..Default::default()
        })
        .await
        .expect_err("subscribe too");
    assert_reason(&status, Code::Unavailable, "REPLICA_BEHIND");
}

/// Rule: a read's wait for min_checkpoint is bounded by the call's deadline
/// when that is shorter than --replica-wait, and the caller still gets
/// UNAVAILABLE with reason REPLICA_BEHIND (not CANCELLED or
/// DEADLINE_EXCEEDED): the node answers before the deadline it was given.
#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_bounds_the_min_checkpoint_wait() {
    let dp = DataDir::new();
    let dr = DataDir::new();
    let primary = start(&dp, &[]);
    let replica = start_replica(&dr, &primary.url(), &[]);
    let head = write(&primary, vec![put(DOCS, "x", json!({}))]).await;
    let mut c = replica.client().await;
    c.get(get_at("x", head)).await.expect("caught up");

    for attempt in 0..5 {
        let wanted = head + 1_000_000;
        let mut request = Request::new(get_at("x", wanted));
        request.set_timeout(Duration::from_millis(300));
        let started = Instant::now();
        let status = c.get(request).await.expect_err("never reached");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the 300 ms deadline bounds the wait (--replica-wait is 5 s)"
        );
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "attempt {attempt}: a read past its node's head within its deadline: {status:?}"
        );
        let info = assert_reason(&status, Code::Unavailable, "REPLICA_BEHIND");
        assert_eq!(info.metadata.get("wanted"), Some(&wanted.to_string()));
    }
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// Rule: a replica started with --forward-writes=false refuses a Push with
/// FAILED_PRECONDITION, ErrorInfo reason NOT_PRIMARY and metadata `primary`
/// = its --replicate-from URL, writing nothing; it still serves reads.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_does_not_forward_names_the_primary() {
    let dp = DataDir::new();
    let dr = DataDir::new();
    let primary = start(&dp, &[]);
    let replica = start_replica(&dr, &primary.url(), &["--forward-writes=false"]);
    let head = write(&primary, vec![put(DOCS, "p", json!({"v": 1}))]).await;

    let mut c = replica.client().await;
    let request = PushRequest {
        client_id: "refused".into(),
        mutations: vec![put(DOCS, "r", json!({"v": 1})).id(1)],
        atomic: false,
    };
    let status = push_refused(&mut c, request).await;
    let info = assert_reason(&status, Code::FailedPrecondition, "NOT_PRIMARY");
    assert_eq!(info.metadata.get("primary"), Some(&primary.url()));
    assert!(status.message().contains(&primary.url()), "{status:?}");

    assert_eq!(primary.status().await.head, head, "nothing was written");
    let read = c.get(get_at("p", head)).await.expect("reads are served");
    assert_eq!(read.into_inner().documents.len(), 1);
    let mut pc = primary.client().await;
    assert_eq!(last_mutation_id(&mut pc, "refused").await, 0);
}

/// Rule: a replica whose data directory holds another store refuses to
/// follow: its store_id and head stay its own, the primary lists no
/// replica, and its log has exactly one error naming both store ids.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_of_another_store_refuses_to_follow() {
    let dr = DataDir::new();
    let other = start(&dr, &[]);
    let own_head = write(&other, vec![put(DOCS, "mine", json!({"v": 1}))]).await;
    let own = other.status().await.store_id;
    other.kill_9();

    let dp = DataDir::new();
    let primary = start(&dp, &[]);
    write(&primary, vec![put(DOCS, "theirs", json!({"v": 1}))]).await;
    write(&primary, vec![put(DOCS, "theirs", json!({"v": 2}))]).await;
    let theirs = primary.status().await.store_id;
    assert_ne!(own, theirs);

    let (replica, logs) = start_replica_logged(&dr, &primary.url(), &[]);
    let names_both = |logs: &Logs| {
        logs.lock()
            .unwrap()
            .iter()
            .filter(|e| {
                let text = e.to_string();
                e["level"] == "ERROR" && text.contains(&own) && text.contains(&theirs)
            })
            .count()
    };
    let wait = Patience::new("the replica logs an error naming both stores");
    while names_both(&logs) == 0 {
        wait.tick().await;
    }
    let s = replica.status().await;
    assert_eq!(
        (s.role(), s.store_id.as_str(), s.head),
        (Role::Replica, own.as_str(), own_head)
    );
    let mut c = replica.client().await;
    assert!(get(&mut c, DOCS, "theirs").await.is_none());
    assert!(get(&mut c, DOCS, "mine").await.is_some());
    assert!(primary.status().await.replicas.is_empty());
    assert_eq!(names_both(&logs), 1, "one clear error, not a retry loop");
}

/// Rule: bad input on Follow gets a clear status: a first message that is
/// not `start` is INVALID_ARGUMENT; a foreign store_id is
/// FAILED_PRECONDITION (STORE_MISMATCH); an `applied` above the primary's
/// head is FAILED_PRECONDITION (DIVERGED, metadata first/last); Follow on a
/// replica is FAILED_PRECONDITION (NOT_PRIMARY). A follower that leaves in
/// the middle of its stream leaves the primary serving: it drops off
/// Status, and writes and the real replica go on.
#[tokio::test(flavor = "multi_thread")]
async fn follow_refuses_bad_input_and_survives_a_departing_follower() {
    let dp = DataDir::new();
    let dr = DataDir::new();
    let primary = start(&dp, &SMALL_MESSAGES);
    let replica = start_replica(&dr, &primary.url(), &[]);
    let mut c = primary.client().await;
    for i in 0..5 {
        let batch = (0..10)
            .map(|j| put(DOCS, &format!("f{i}-{j}"), big(j, BIG)))
            .collect();
        push(&mut c, "", batch).await;
    }
    let status = primary.status().await;
    let follow_start = |store_id: &str, applied: u64, url: &str| FollowRequest {
        request: Some(follow_request::Request::Start(FollowStart {
            store_id: store_id.into(),
            applied,
            epoch: status.epoch,
            url: url.into(),
            clients_since: applied,
            ..Default::default()
        })),
    };
    let mut follow = replication(&primary).await;

    let ack = FollowRequest {
        request: Some(follow_request::Request::Ack(pb::FollowAck { applied: 1 })),
    };
    let refused = follow
        .follow(futures_util::stream::iter([ack]))
        .await
        .expect_err("an ack first");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = follow
        .follow(futures_util::stream::iter([FollowRequest {
            request: None,
        }]))
        .await
        .expect_err("an empty message first");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = follow
        .follow(futures_util::stream::iter(Vec::<FollowRequest>::new()))
        .await
        .expect_err("no message at all");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let refused = follow
        .follow(futures_util::stream::iter([follow_start(
            "another-store",
            0,
            "",
        )]))
        .await
        .expect_err("a foreign store");
    assert_reason(&refused, Code::FailedPrecondition, "STORE_MISMATCH");
    assert!(refused.message().contains("another-store"), "{refused:?}");

    let ahead = status.head + 10;
    let refused = follow
        .follow(futures_util::stream::iter([follow_start(
            &status.store_id,
            ahead,
            "",
        )]))
        .await
        .expect_err("a follower ahead of the primary");
    let info = assert_reason(&refused, Code::FailedPrecondition, "DIVERGED");
    assert_eq!(
        (info.metadata.get("first"), info.metadata.get("last")),
        (
            Some(&(status.head + 1).to_string()),
            Some(&ahead.to_string())
        )
    );

    let mut on_replica = replication(&replica).await;
    let refused = on_replica
        .follow(futures_util::stream::iter([follow_start("", 0, "")]))
        .await
        .expect_err("a replica does not stream");
    let info = assert_reason(&refused, Code::FailedPrecondition, "NOT_PRIMARY");
    assert_eq!(info.metadata.get("primary"), Some(&primary.url()));

    // A follower that reads the hello and part of the catch-up, then leaves.
    let (tx, rx) = tokio::sync::mpsc::channel::<FollowRequest>(4);
    tx.send(follow_start("", 0, "http://departing"))
        .await
        .unwrap();
    let requests =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut stream = follow
        .follow(requests)
        .await
        .expect("a new store may follow")
        .into_inner();
    match stream.message().await.expect("hello").expect("a message") {
        pb::FollowResponse {
            response: Some(follow_response::Response::Hello(hello)),
        } => assert_eq!(
            (hello.store_id.as_str(), hello.head),
            (status.store_id.as_str(), status.head)
        ),
        other => panic!("expected the hello, got {other:?}"),
    }
    match stream
        .message()
        .await
        .expect("a commit")
        .expect("a message")
    {
        pb::FollowResponse {
            response: Some(follow_response::Response::Commit(commit)),
        } => assert!(
            commit.prev_head == 0 && commit.head > 0 && commit.head < status.head,
            "the catch-up spans several messages: ({}, {}]",
            commit.prev_head,
            commit.head
        ),
        other => panic!("expected a commit, got {other:?}"),
    }
    // An unexpected second start is no reason to fail; then it leaves.
    tx.send(follow_start("", 0, "http://departing"))
        .await
        .unwrap();
    drop(stream);
    drop(tx);

    let wait = Patience::new("the departed follower drops off Status");
    while primary
        .status()
        .await
        .replicas
        .iter()
        .any(|r| r.url == "http://departing")
    {
        wait.tick().await;
    }
    let head = write(&primary, vec![put(DOCS, "after", json!({"v": 1}))]).await;
    assert_eq!(head, status.head + 1);
    converged(&primary, &[&replica], &[]).await;
    let listed: Vec<_> = primary
        .status()
        .await
        .replicas
        .into_iter()
        .map(|r| r.url)
        .collect();
    assert_eq!(listed, vec![replica.url()]);
}

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

/// Rule: readiness (health of `deltasync.v1.SyncService`) is NOT_SERVING on
/// a replica that has not heard its primary (unreachable, or its stream
/// held before the hello) and on one that heard a head it has not reached
/// (more than --max-replica-lag behind), and SERVING once caught up;
/// liveness (the empty service name) is SERVING throughout.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_replica_lag() {
    // A primary that hangs up on every connection, then nobody listening.
    let hangs_up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let nowhere = format!("http://{}", hangs_up.local_addr().expect("addr"));
    let dn = DataDir::new();
    let orphan = start_replica(&dn, &nowhere, &[]);
    for attempt in 0..2 {
        let (conn, _) = tokio::time::timeout(Duration::from_secs(20), hangs_up.accept())
            .await
            .unwrap_or_else(|_| panic!("the replica tries to connect (attempt {attempt})"))
            .expect("accept");
        drop(conn);
    }
    drop(hangs_up);
    assert_eq!(
        health(&orphan, SYNC_SERVICE).await,
        ServingStatus::NotServing
    );
    assert_eq!(health(&orphan, "").await, ServingStatus::Serving);
    let s = orphan.status().await;
    assert_eq!((s.role(), s.head, s.primary), (Role::Replica, 0, nowhere));
    drop(orphan);

    // A primary with 12 commits of 5 documents of 4 KB: several messages.
    let dp = DataDir::new();
    let primary = start(&dp, &SMALL_MESSAGES);
    let mut c = primary.client().await;
    for i in 0..12 {
        let batch = (0..5)
            .map(|j| put(DOCS, &format!("r{i}-{j}"), big(j, BIG)))
            .collect();
        push(&mut c, "", batch).await;
    }
    let head = primary.status().await.head;
    assert_eq!(head, 60);

    // Held before the hello: it never heard the primary.
    let gate = Gate::start(&primary.addr, 0, Dial::AtOnce).await;
    let dr = DataDir::new();
    let replica = start_replica(&dr, &gate.url(), &["--max-replica-lag", "0"]);
    let wait = Patience::new("the replica opens its stream");
    while primary.status().await.replicas.is_empty() {
        wait.tick().await;
    }
    assert_eq!(
        health(&replica, SYNC_SERVICE).await,
        ServingStatus::NotServing
    );
    assert_eq!(health(&replica, "").await, ServingStatus::Serving);
    assert_eq!(replica.status().await.head, 0);

    // The hello and the first message of the catch-up: it heard head 60
    // and applied part of it.
    gate.allow(70_000);
    let wait = Patience::new("the replica applies the first catch-up message");
    loop {
        let applied = replica.status().await.head;
        if applied > 0 {
            assert!(applied < head, "70 KB cannot carry 240 KB");
            break;
        }
        wait.tick().await;
    }
    assert_eq!(
        health(&replica, SYNC_SERVICE).await,
        ServingStatus::NotServing
    );
    assert_eq!(health(&replica, "").await, ServingStatus::Serving);

    gate.open();
    let wait = Patience::new("the caught-up replica becomes ready");
    while health(&replica, SYNC_SERVICE).await != ServingStatus::Serving {
        wait.tick().await;
    }
    assert_eq!(replica.status().await.head, head);
    assert_eq!(health(&replica, "").await, ServingStatus::Serving);
}

// ---------------------------------------------------------------------------
// A commit cut in the middle
// ---------------------------------------------------------------------------

/// Rule: a replica applies each commit of its primary whole: when the
/// stream stops or breaks in the middle of a commit larger than one
/// replication message (an atomic batch), whether while the replica catches
/// up or while it follows live, no reader of the replica ever sees part of
/// it (its head is never inside the commit), and it converges once the
/// stream resumes.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_cut_mid_stream_is_never_half_applied() {
    let dp = DataDir::new();
    let primary = start(&dp, &SMALL_MESSAGES);
    let mut c = primary.client().await;
    let atomic_batch = |from: u64| PushRequest {
        client_id: "atomic".into(),
        mutations: (from..from + 40)
            .map(|i| put(DOCS, &format!("a{i}"), big(i, BIG)).id(i))
            .collect(),
        atomic: true,
    };
    assert_eq!(
        write(&primary, vec![put(DOCS, "first", json!({}))]).await,
        1
    );
    // Seqs 2..=41: about 160 KB, some three messages' worth.
    assert_eq!(push_req(&mut c, atomic_batch(1)).await.checkpoint, 41);

    // Catching up: the hello and the first message only.
    let gate = Gate::start(&primary.addr, 70_000, Dial::AtOnce).await;
    let dr = DataDir::new();
    let replica = start_replica(&dr, &gate.url(), &[]);
    gate.wait_delivered(0, 70_000).await;
    never_inside(&replica, 2, 41, "catching up").await;
    gate.open();
    let clients = vec!["atomic".to_owned()];
    converged(&primary, &[&replica], &clients).await;

    // Live: the first parts of the next atomic commit get through, then the
    // connection breaks; the replica reconnects and catches up, held again
    // after its first message.
    let accepted = gate.accepted();
    let target = gate.delivered() + 70_000;
    gate.allow(target);
    assert_eq!(push_req(&mut c, atomic_batch(41)).await.checkpoint, 81);
    gate.wait_delivered(accepted - 1, target).await;
    never_inside(&replica, 42, 81, "live, held mid-commit").await;
    gate.cut(70_000);
    gate.wait_delivered(accepted, 70_000).await;
    never_inside(&replica, 42, 81, "catching up after the break").await;
    gate.open();
    converged(&primary, &[&replica], &clients).await;
}

/// Rule: a primary asked to wait for a min_checkpoint it never wrote (the
/// caller's writes were lost in a failover or a restore) answers at once
/// OUT_OF_RANGE with reason MIN_CHECKPOINT_AHEAD (metadata head, wanted),
/// which clients take as "resync", instead of UNAVAILABLE, which they would
/// retry forever.
#[tokio::test]
async fn a_primary_refuses_a_min_checkpoint_it_never_wrote() {
    let s = TestServer::start_with(|c| c.replica_wait = Duration::from_secs(30)).await;
    let mut c = s.client.clone();
    let head = push(&mut c, "w", vec![put("docs", "a", json!({}))])
        .await
        .checkpoint;
    let wanted = head + 10;
    let started = Instant::now();
    let status = c
        .get(GetRequest {
            collection: "docs".into(),
            ids: vec!["a".into()],
            min_checkpoint: wanted,
        })
        .await
        .expect_err("never written");
    let info = assert_reason(&status, Code::OutOfRange, "MIN_CHECKPOINT_AHEAD");
    assert_eq!(
        (info.metadata.get("head"), info.metadata.get("wanted")),
        (Some(&head.to_string()), Some(&wanted.to_string()))
    );
    let status = c
        .pull(PullRequest {
            min_checkpoint: wanted,
            ..Default::default()
        })
        .await
        .expect_err("pull too");
    assert_reason(&status, Code::OutOfRange, "MIN_CHECKPOINT_AHEAD");
    let status = c
        .subscribe(SubscribeRequest {
            min_checkpoint: wanted,
            ..Default::default()
        })
        .await
        .expect_err("subscribe too");
    assert_reason(&status, Code::OutOfRange, "MIN_CHECKPOINT_AHEAD");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered without waiting out --replica-wait (30 s)"
    );
}
