//! Replication review fixes: real `deltasync` processes checking the rules
//! a review of the replication change found broken. A catch-up cut before
//! its client snapshot must not lose client mutation-id states (nor let the
//! replica be promoted meanwhile); a follower of another store never
//! deposes a primary; a checkpoint from a replaced primary's unreplicated
//! suffix is refused (CHECKPOINT_DIVERGED) instead of silently skipping
//! changes; and a primary keeps the tombstones a connected replica has not
//! acknowledged.
//!
//! Nothing sleeps to wait for a server: every wait is a bounded poll
//! ([`Patience`]). Where a test must hold the replication stream it puts a
//! [`Gate`], a TCP relay with a byte allowance, between the replica and its
//! primary.

mod common;

use std::time::Duration;

use common::{cluster::*, process::Process, *};
use deltasync::pb::{
    self, EpochStart, FollowRequest, FollowStart, Outcome, PullRequest, Role, SubscribeRequest,
    follow_request,
};
use serde_json::json;
use tokio::time::Instant;
use tonic::{Code, Status};

/// The collection every test writes to.
const DOCS: &str = "docs";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A Pull on `p` from `since`, naming the store and the epoch the
/// checkpoint was given out in (0: an old client that does not say).
async fn pull_at(
    p: &Process,
    store_id: &str,
    since: u64,
    checkpoint_epoch: u64,
) -> Result<pb::PullResponse, Status> {
    let mut c = p.client().await;
    let request = PullRequest {
        since,
        store_id: store_id.into(),
        checkpoint_epoch,
        ..Default::default()
    };
    c.pull(request).await.map(tonic::Response::into_inner)
}

/// `p`'s purge horizon, as a Pull from 0 reports it.
async fn purge_horizon(p: &Process) -> u64 {
    pull_page(&mut p.client().await, 0).await.purge_horizon
}

// ---------------------------------------------------------------------------
// Client states across a catch-up cut before its snapshot
// ---------------------------------------------------------------------------

/// Rule: a replica whose catch-up from the log is cut before the client
/// snapshot still ends with every client's mutation-id state, and cannot be
/// promoted while its client states are behind its documents; once they
/// have caught up it can, and a retry of a mutation applied before the cut
/// answers DUPLICATE on it.
#[tokio::test(flavor = "multi_thread")]
async fn a_catch_up_cut_before_the_snapshot_keeps_client_states() {
    let dp = DataDir::new();
    let dr = DataDir::new();
    let primary = start(&dp, &SMALL_MESSAGES);
    let mut c = primary.client().await;
    // c0 gives the replica a non-empty clients tree.
    push(&mut c, "c0", vec![put(DOCS, "zero", json!({})).id(1)]).await;
    let gate = Gate::start(&primary.addr, u64::MAX, Dial::WhenAllowed).await;
    let replica = start_replica(&dr, &gate.url(), &[]);
    converged(&primary, &[&replica], &["c0".to_owned()]).await;

    // Break the stream; the replica's next connection waits at the gate
    // before reaching the primary, so everything below is sent from the log.
    gate.cut(0);
    let c1_at = push(&mut c, "c1", vec![put(DOCS, "one", json!({})).id(1)])
        .await
        .checkpoint;
    for k in 0..40 {
        push(&mut c, "", vec![put(DOCS, &format!("b{k}"), big(k, BIG))]).await;
    }
    let head = primary.status().await.head;
    assert_eq!(head, c1_at + 40);

    // The hello and about two of the catch-up's ~60 KiB messages (of 160 KiB).
    gate.allow(130_000);
    let wait = Patience::new("the replica applies past c1's write");
    let applied = loop {
        let applied = replica.status().await.head;
        if applied > c1_at {
            break applied;
        }
        wait.tick().await;
    };
    assert!(applied < head, "130 KB cannot carry the whole catch-up");
    let mut rc = replica.client().await;
    assert_eq!(
        last_mutation_id(&mut rc, "c1").await,
        0,
        "the client snapshot comes after the log records, held at the gate"
    );
    let refused = promote(&replica)
        .await
        .expect_err("a replica whose client states are behind its documents");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(replica.status().await.role(), Role::Replica);

    // Cut again; the next connection passes everything.
    gate.cut(u64::MAX);
    let wait = Patience::new("the replica learns c1's mutation id");
    while last_mutation_id(&mut rc, "c1").await != 1 {
        wait.tick().await;
    }
    let clients = vec!["c0".to_owned(), "c1".to_owned()];
    let s = converged(&primary, &[&replica], &clients).await;
    assert_eq!((s.last_ids["c0"], s.last_ids["c1"]), (1, 1));

    let promoted = promote(&replica)
        .await
        .expect("a replica whose client states caught up");
    assert_eq!((promoted.epoch, promoted.head), (2, head));
    let retried = push_one(&mut rc, "c1", put(DOCS, "one", json!({})).id(1)).await;
    assert_eq!(outcome(&retried), Outcome::Duplicate, "{retried:?}");
    let retried = push_one(&mut rc, "c0", put(DOCS, "zero", json!({})).id(1)).await;
    assert_eq!(outcome(&retried), Outcome::Duplicate, "{retried:?}");
    assert_eq!(replica.status().await.head, head, "a retry writes nothing");
}

// ---------------------------------------------------------------------------
// A foreign follower
// ---------------------------------------------------------------------------

/// Rule: a follower of another store never deposes a primary, whatever
/// epoch it claims: it is refused FAILED_PRECONDITION (STORE_MISMATCH), and
/// the primary stays a primary at its own epoch, taking writes, also after
/// a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_follower_never_deposes_the_primary() {
    let dp = DataDir::new();
    let primary = start(&dp, &[]);
    assert_eq!(write(&primary, vec![put(DOCS, "a", json!({}))]).await, 1);
    let own = primary.status().await;

    // Another store's cluster failed over once: its follower is at epoch 2.
    let mut follow = replication(&primary).await;
    let foreign = FollowRequest {
        request: Some(follow_request::Request::Start(FollowStart {
            store_id: "some-other-store".into(),
            applied: 1,
            epoch: 2,
            url: "http://elsewhere:1".into(),
            clients_since: 1,
            epochs: vec![
                EpochStart {
                    epoch: 1,
                    first_seq: 1,
                    id: 0,
                },
                EpochStart {
                    epoch: 2,
                    first_seq: 1,
                    id: 7,
                },
            ],
        })),
    };
    let refused = follow
        .follow(futures_util::stream::iter([foreign]))
        .await
        .expect_err("a follower of another store is refused");
    assert_reason(&refused, Code::FailedPrecondition, "STORE_MISMATCH");

    assert_still_primary(&primary, &own, "after the refusal").await;
    // Nothing of the foreign epoch was kept: a restart leaves it primary.
    primary.kill_9();
    let primary = start(&dp, &[]);
    assert_still_primary(&primary, &own, "after a restart").await;
}

/// Asserts `p` is the primary `own` described (same store, epoch, not
/// deposed), and takes a write.
async fn assert_still_primary(p: &Process, own: &pb::StatusResponse, context: &str) {
    let s = p.status().await;
    assert_eq!(
        (s.role(), s.deposed, s.epoch, s.store_id.as_str()),
        (Role::Primary, false, own.epoch, own.store_id.as_str()),
        "{context}"
    );
    let mut c = p.client().await;
    let pushed = c
        .push(pb::PushRequest {
            mutations: vec![put(DOCS, context, json!({}))],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{context}: the primary takes writes: {e:?}"))
        .into_inner();
    assert_eq!(outcome(&pushed.results[0]), Outcome::Applied, "{context}");
    assert_eq!(pushed.checkpoint, s.head + 1, "{context}");
}

// ---------------------------------------------------------------------------
// Checkpoints across a failover
// ---------------------------------------------------------------------------

/// Rule: a reader holding a checkpoint from the old primary's unreplicated
/// suffix is told to resync after failover instead of silently missing
/// changes: once the promoted replica's own seqs pass that checkpoint, a
/// Pull or Subscribe from it with its epoch is OUT_OF_RANGE (reason
/// CHECKPOINT_DIVERGED). A checkpoint both primaries share is served, and
/// answered with the new epoch; a reader that does not say its
/// checkpoint's epoch (0, an old client) is served as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_from_an_unreplicated_suffix_is_refused_after_failover() {
    let da = DataDir::new();
    let db = DataDir::new();
    let a = start(&da, &["--sync-replicas", "0"]);
    let gate = Gate::start(&a.addr, u64::MAX, Dial::WhenAllowed).await;
    let b = start_replica(&db, &gate.url(), &[]);
    let shared = (0..5)
        .map(|i| put(DOCS, &format!("shared{i}"), json!({"i": i})))
        .collect();
    let shared = write(&a, shared).await;
    converged(&a, &[&b], &[]).await;
    let store_id = a.status().await.store_id;

    // B is held: what A writes from now on is never replicated, but a
    // reader of A sees it.
    gate.hold();
    let page = pull_at(&a, &store_id, 0, 0).await.expect("a pull from 0");
    assert_eq!((page.checkpoint, page.checkpoint_epoch), (shared, 1));
    for i in 0..3 {
        write(&a, vec![put(DOCS, &format!("lost{i}"), json!({"i": i}))]).await;
    }
    let page = pull_at(&a, &store_id, shared, 1)
        .await
        .expect("the reader reads on");
    let (checkpoint, epoch) = (page.checkpoint, page.checkpoint_epoch);
    assert_eq!(
        (checkpoint, epoch, page.documents.len()),
        (shared + 3, 1, 3)
    );
    a.kill_9();

    let promoted = promote(&b).await.expect("B is promoted");
    assert_eq!((promoted.epoch, promoted.head), (2, shared));
    let refused = pull_at(&b, &store_id, checkpoint, epoch)
        .await
        .expect_err("a checkpoint beyond B's head");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");

    // B's own writes take the seqs after `shared`, past the checkpoint.
    for i in 0..4 {
        write(&b, vec![put(DOCS, &format!("new{i}"), json!({"i": i}))]).await;
    }
    let head = b.status().await.head;
    assert_eq!(head, shared + 4);
    assert!(head > checkpoint);

    let refused = pull_at(&b, &store_id, checkpoint, epoch)
        .await
        .expect_err("a checkpoint of the unreplicated suffix");
    let info = assert_reason(&refused, Code::OutOfRange, "CHECKPOINT_DIVERGED");
    let metadata = |key: &str| info.metadata.get(key).cloned().unwrap_or_default();
    assert_eq!(
        (
            metadata("checkpoint"),
            metadata("checkpoint_epoch"),
            metadata("epoch")
        ),
        (checkpoint.to_string(), "1".to_owned(), "2".to_owned())
    );
    let refused = b
        .client()
        .await
        .subscribe(SubscribeRequest {
            since: checkpoint,
            store_id: store_id.clone(),
            checkpoint_epoch: epoch,
            ..Default::default()
        })
        .await
        .expect_err("a Subscribe from the unreplicated suffix");
    assert_reason(&refused, Code::OutOfRange, "CHECKPOINT_DIVERGED");

    // The shared checkpoint is served: every change B made, in epoch 2.
    let page = pull_at(&b, &store_id, shared, 1)
        .await
        .expect("a checkpoint both primaries share");
    let ids: Vec<&str> = page.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["new0", "new1", "new2", "new3"]);
    assert_eq!((page.checkpoint, page.checkpoint_epoch), (head, 2));

    // An old client (no epoch) is served as before.
    let page = pull_at(&b, &store_id, checkpoint, 0)
        .await
        .expect("a checkpoint without its epoch");
    let ids: Vec<&str> = page.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["new3"]);
    assert_eq!((page.checkpoint, page.checkpoint_epoch), (head, 2));
}

// ---------------------------------------------------------------------------
// Tombstones a replica has not acknowledged
// ---------------------------------------------------------------------------

/// Rule: a primary does not purge tombstones a connected replica has not
/// acknowledged: while the replica's stream is held, the primary's purge
/// horizon stays at or below the replica's ack, though a lone primary with
/// the same retention purges the same deletions; once released, the
/// replica converges (the documents deleted on both, identical Pulls from
/// 0) and the primary purges them.
#[tokio::test(flavor = "multi_thread")]
async fn a_primary_keeps_tombstones_a_replica_has_not_acknowledged() {
    let dp = DataDir::new();
    let dr = DataDir::new();
    let dl = DataDir::new();
    let primary = start(&dp, &SHORT_RETENTION);
    let lone = start(&dl, &SHORT_RETENTION);
    let gate = Gate::start(&primary.addr, u64::MAX, Dial::WhenAllowed).await;
    let replica = start_replica(&dr, &gate.url(), &SHORT_RETENTION);
    let created: Vec<_> = (0..5)
        .map(|i| put(DOCS, &format!("d{i}"), json!({"i": i})))
        .collect();
    for node in [&primary, &lone] {
        assert_eq!(write(node, created.clone()).await, 5);
    }
    let acked = |s: pb::StatusResponse| s.replicas.iter().map(|r| r.acked).collect::<Vec<_>>();
    let wait = Patience::new("the replica acknowledges the creations");
    while acked(primary.status().await) != [5] {
        wait.tick().await;
    }

    // Held: the deletions (seqs 6..=8) do not reach the replica.
    gate.hold();
    let deletions: Vec<_> = (0..3).map(|i| delete(DOCS, &format!("d{i}"))).collect();
    for node in [&primary, &lone] {
        assert_eq!(write(node, deletions.clone()).await, 8);
    }
    // Watched for as long as the lone primary takes to purge them, and ten
    // compaction rounds more.
    let wait = Patience::new("the lone primary purges the deletions");
    let mut until = None;
    loop {
        assert_eq!(
            acked(primary.status().await),
            [5],
            "the held replica acknowledged the creations only"
        );
        let horizon = purge_horizon(&primary).await;
        assert!(
            horizon <= 5,
            "the primary purged up to {horizon}, above its replica's ack 5"
        );
        match until {
            None if purge_horizon(&lone).await == 8 => {
                until = Some(Instant::now() + Duration::from_secs(1));
            }
            Some(t) if Instant::now() >= t => break,
            _ => {}
        }
        wait.tick().await;
    }
    let kept = snapshot(&primary, &[]).await;
    let tombstones: Vec<&str> = kept
        .documents
        .iter()
        .filter(|d| d.deleted)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(tombstones, ["d0", "d1", "d2"]);
    assert_eq!(replica.status().await.head, 5);

    gate.open();
    let wait = Patience::new("the replica applies the deletions");
    while replica.status().await.head != 8 {
        wait.tick().await;
    }
    let mut rc = replica.client().await;
    for i in 0..3 {
        let id = format!("d{i}");
        let doc = get(&mut rc, DOCS, &id).await;
        assert!(
            doc.is_none_or(|d| d.deleted),
            "{id} is deleted on the replica"
        );
    }
    let wait = Patience::new("the primary purges the acknowledged deletions");
    while purge_horizon(&primary).await != 8 {
        wait.tick().await;
    }
    let s = converged(&primary, &[&replica], &[]).await;
    let live: Vec<&str> = s.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!((live, s.purge_horizon), (vec!["d3", "d4"], 8));
}

/// Rule: a primary that is stopped (SIGTERM) while pushes wait for
/// `--sync-replicas` acks answers them once its replicas acknowledged: its
/// Follow streams end only after the pushes in flight, so none is answered
/// UNAVAILABLE ("not replicated") for want of acks that could no longer
/// come, and shutdown does not wait out `--sync-timeout`; a push that
/// arrives once shutdown began is refused (UNAVAILABLE) before it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_primary_answers_its_sync_pushes_before_its_replicas_streams_end() {
    let (primary_dir, replica_dir) = (DataDir::new(), DataDir::new());
    let wait = ["--sync-replicas", "1", "--sync-timeout", "60s"];
    let primary = start(
        &primary_dir,
        &[&wait[..], &["--shutdown-grace", "60s"]].concat(),
    );
    let _replica = start_replica(&replica_dir, &primary.url(), &[]);
    write(&primary, vec![put(DOCS, "first", json!({}))]).await;

    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (mut c, answered) = (primary.client().await, answered.clone());
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                let m = put(DOCS, &format!("w{w}-{n}"), json!({"n": n}));
                match c
                    .push(pb::PushRequest {
                        mutations: vec![m],
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                    Err(status) => return status,
                };
            }
            unreachable!()
        }));
    }
    wait_for("pushes answered", async || {
        answered.load(std::sync::atomic::Ordering::SeqCst) >= 40
    })
    .await;
    let stopping = Instant::now();
    let exit = tokio::task::spawn_blocking(move || primary.terminate(Duration::from_secs(90)))
        .await
        .expect("terminate");
    let took = stopping.elapsed();
    assert!(exit.success(), "the primary exits cleanly: {exit:?}");
    assert!(
        took < Duration::from_secs(30),
        "shutdown took {took:?}: pushes waited for acks after the replica's stream ended"
    );
    for writer in writers {
        let status = writer.await.expect("writer");
        assert!(
            !status.message().contains("acknowledged it in time"),
            "a push in flight at shutdown was answered {status:?}"
        );
    }
}

/// Rule: a push forwarded by a replica whose connection to the primary
/// breaks mid-call (the primary committed it, the answer never came back)
/// is answered UNAVAILABLE, which clients retry with the same mutation ids
/// (the retry is then a DUPLICATE), never the UNKNOWN or INTERNAL the
/// transport reports, which clients do not retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_push_cut_mid_call_is_unavailable() {
    let (primary_dir, replica_dir) = (DataDir::new(), DataDir::new());
    let primary = start(&primary_dir, &[]);
    let gate = Gate::start(&primary.addr, u64::MAX, Dial::AtOnce).await;
    let replica = start_replica(&replica_dir, &gate.url(), &[]);
    let mut p = primary.client().await;
    let mut r = replica.client().await;
    let m = put(DOCS, "first", json!({})).id(1);
    push(&mut r, "cut", vec![m]).await;

    // Nothing more of the primary's passes the gate, on any connection
    // (the replica's stream and its forwarding channel share it); the next
    // push commits on the primary.
    gate.allow(0);
    let before = common::pull_page(&mut p, 0).await.checkpoint;
    let m = put(DOCS, "second", json!({})).id(2);
    let request = pb::PushRequest {
        client_id: "cut".into(),
        mutations: vec![m.clone()],
        atomic: false,
    };
    let call = tokio::spawn(async move { r.push(request).await });
    wait_for("the forwarded push committed on the primary", async || {
        common::pull_page(&mut p, 0).await.checkpoint > before
    })
    .await;
    // Cut with nothing allowed: a relay woken by a raised allowance could
    // deliver the held answer before it is aborted.
    gate.cut(0);
    let status = call.await.expect("call").expect_err("no answer came back");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("unknown"), "{status:?}");

    // Retried with the same id, it is the DUPLICATE it should be.
    let mut p = primary.client().await;
    let retry = push(&mut p, "cut", vec![m]).await;
    assert_eq!(outcome(&retry.results[0]), Outcome::Duplicate);
}
