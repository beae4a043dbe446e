//! The client library (`deltasync::client`) against real servers over real
//! gRPC: exactly-once retries across a kill, failover, NOT_PRIMARY
//! redirects, a watch across a restart, and resync as an event.

mod common;

use std::{
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};

use common::{
    HOUR, TestServer,
    auth::free_loopback_addr,
    cluster::{DataDir, Dial, Gate, start, start_replica, wait_for},
    eventually, get,
    process::Process,
};
use deltasync::{
    client::{
        Checkpoint, Client, ClientError, Document, Mutation, PullOptions, ResyncReason,
        RetryPolicy, Watch, WatchEvent, WatchOptions,
    },
    pb,
};
use futures_util::StreamExt;
use serde_json::json;

/// Retries for long enough to ride out a server restart.
fn patient() -> RetryPolicy {
    RetryPolicy {
        max_elapsed: Duration::from_secs(60),
        max_attempts: 5000,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    }
}

fn client_of(urls: &[String], client_id: &str) -> Client {
    Client::builder(urls.iter().cloned())
        .client_id(client_id)
        .retry(patient())
        .build()
        .expect("client")
}

/// The head of a node, asked directly (not through the client under test).
async fn head(p: &Process) -> u64 {
    p.status().await.head
}

/// The next event of a watch, failing the test after 30 s.
async fn next_event(watch: &mut Watch) -> Option<Result<WatchEvent, ClientError>> {
    tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("a watch event within 30 s")
}

/// Reads a watch until it has delivered `n` more documents.
async fn documents(watch: &mut Watch, n: usize) -> Vec<Document> {
    let mut got = Vec::new();
    while got.len() < n {
        match next_event(watch).await.expect("the watch goes on") {
            Ok(WatchEvent::Changes { documents, .. }) => got.extend(documents),
            Ok(WatchEvent::Progress { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

/// Rule: a push whose answer is lost in a server kill is resent by the
/// client with the same mutation ids, and the server restarted on the same
/// data directory answers it DUPLICATE: every mutation of a stream of
/// pushes is applied exactly once (versions, head and the client's last
/// mutation id add up), and the resent one is reported as applied by the
/// earlier attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_lost_in_a_kill_is_retried_and_applied_once() {
    const PUSHES: u64 = 30;
    let data = DataDir::new();
    let server = start(&data, &[]);
    let addr = server.addr.clone();
    // The client reaches the server through a gate that can hold answers.
    let gate = Gate::start(&addr, u64::MAX, Dial::AtOnce).await;
    let client = client_of(&[gate.url()], "exactly-once");
    // The pusher stops before push HELD until the gate holds answers, so
    // that push's answer is held for certain (nothing else is in flight).
    const HELD: u64 = 10;
    let (at_hold, reached) = tokio::sync::oneshot::channel::<()>();
    let (go, held) = tokio::sync::oneshot::channel::<()>();
    let pusher = tokio::spawn({
        let client = client.clone();
        let (mut at_hold, mut held) = (Some(at_hold), Some(held));
        async move {
            let mut results = Vec::new();
            for i in 0..PUSHES {
                if i == HELD {
                    let _ = at_hold.take().map(|t| t.send(()));
                    if let Some(held) = held.take() {
                        let _ = held.await;
                    }
                }
                let batch = [
                    Mutation::put("docs", format!("d{i}"), json!({"i": i})),
                    Mutation::put("docs", "counter", json!({"n": i})),
                ];
                results.push(client.push(batch).await.expect("push"));
            }
            results
        }
    });

    reached.await.expect("the pusher reaches the hold");
    // From now on no answer reaches the client, on any of its connections;
    // the next push commits.
    gate.allow(0);
    go.send(()).expect("the pusher waits");
    wait_for("the held push committed", async || {
        head(&server).await == 2 * (HELD + 1)
    })
    .await;
    server.kill_9();
    let server = Process::start_at(&addr, data.as_ref(), &[], |_| {});
    // Broken with nothing allowed (a raised allowance could deliver the held
    // answer before the abort), then open for the retry's new connection.
    gate.cut(0);
    gate.open();

    let results = tokio::time::timeout(Duration::from_secs(60), pusher)
        .await
        .expect("the pushes finish")
        .expect("pusher");
    let all: Vec<_> = results.iter().flat_map(|r| &r.results).collect();
    assert_eq!(all.len(), usize::try_from(2 * PUSHES).unwrap());
    assert!(all.iter().all(|r| r.is_applied()), "{all:#?}");
    let held_push = &results[usize::try_from(HELD).unwrap()];
    assert!(
        held_push
            .results
            .iter()
            .all(|r| r.applied_by_earlier_attempt),
        "the held push was answered by its retry: {held_push:?}"
    );

    let mut c = server.client().await;
    assert_eq!(head(&server).await, 2 * PUSHES, "one commit per push");
    let counter = get(&mut c, "docs", "counter").await.expect("counter");
    assert_eq!(counter.version, PUSHES, "the counter was put once per push");
    for i in 0..PUSHES {
        let d = get(&mut c, "docs", &format!("d{i}")).await.expect("doc");
        assert_eq!(d.version, 1, "d{i} applied once");
    }
    assert_eq!(
        common::last_mutation_id(&mut c, "exactly-once").await,
        2 * PUSHES
    );
}

/// Rule: a new client with a used client id learns where that id stands
/// on the server before its first push, so it does not reuse ids (its
/// push is applied, with the next id, not answered DUPLICATE).
#[tokio::test]
async fn a_restarted_client_id_continues_after_its_last_id() {
    let server = TestServer::start().await;
    let url = format!("http://{}", server.addr);
    let first = client_of(std::slice::from_ref(&url), "worker-1");
    for i in 0..3 {
        first
            .put("docs", &format!("a{i}"), json!({}))
            .await
            .unwrap();
    }
    let again = client_of(&[url], "worker-1");
    let r = again.put("docs", "b", json!({"x": 1})).await.unwrap();
    assert_eq!(
        (r.outcome, r.mutation_id, r.applied_by_earlier_attempt),
        (pb::Outcome::Applied, 4, false)
    );
}

/// Rule: the client fails over from an endpoint that refuses connections
/// to the next one, for writes and reads.
#[tokio::test]
async fn failover_from_a_dead_endpoint() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let server = TestServer::start().await;
    let client = Client::builder([dead, format!("http://{}", server.addr)])
        .build()
        .unwrap();
    let r = client.put("docs", "a", json!({"v": 1})).await.unwrap();
    assert_eq!(r.outcome, pb::Outcome::Applied);
    let docs = client.get("docs", ["a"]).await.unwrap();
    assert_eq!(docs[0].body.as_ref().unwrap()["v"], 1);
}

/// Rule: a push sent to a replica that does not forward writes
/// (FAILED_PRECONDITION, NOT_PRIMARY, naming the primary) is sent by the
/// client to that primary and applied there; the client then reads its
/// write on the replica (read-your-writes).
#[tokio::test(flavor = "multi_thread")]
async fn not_primary_sends_the_push_to_the_primary() {
    let (dp, dr) = (DataDir::new(), DataDir::new());
    let primary = start(&dp, &[]);
    let replica = start_replica(&dr, &primary.url(), &["--forward-writes=false"]);
    let client = client_of(&[replica.url()], "redirected");
    let r = client.put("docs", "p", json!({"v": 1})).await.unwrap();
    assert_eq!(r.outcome, pb::Outcome::Applied);
    let mut pc = primary.client().await;
    assert!(get(&mut pc, "docs", "p").await.is_some(), "on the primary");
    let read = client.get("docs", ["p"]).await.unwrap();
    assert_eq!(read.len(), 1, "read back on the replica");
}

/// Rule: a watch survives a server killed and restarted on the same data
/// directory and port: it resumes from the last checkpoint it delivered,
/// and every change arrives once, in seq order.
#[tokio::test(flavor = "multi_thread")]
async fn watch_survives_a_restart_without_gap_or_duplicate() {
    let data = DataDir::new();
    let server = start(&data, &[]);
    let addr = server.addr.clone();
    let client = client_of(&[server.url()], "watcher");
    let mut watch = client.watch(WatchOptions::default());
    for i in 0..5 {
        client
            .put("docs", &format!("a{i}"), json!({"i": i}))
            .await
            .unwrap();
    }
    let mut seen = documents(&mut watch, 5).await;

    server.kill_9();
    let server = Process::start_at(&addr, data.as_ref(), &[], |_| {});
    for i in 0..5 {
        client
            .put("docs", &format!("b{i}"), json!({"i": i}))
            .await
            .unwrap();
    }
    seen.extend(documents(&mut watch, 5).await);
    // A last change: nothing may come between the ten and it.
    client.put("docs", "last", json!({})).await.unwrap();
    seen.extend(documents(&mut watch, 1).await);

    let seqs: Vec<u64> = seen.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
    assert_eq!(seen[10].id, "last");
    drop(server);
}

/// Rule: a checkpoint the server cannot resume from is a typed event,
/// not an error string: below the purge horizon the watch yields
/// ResyncNeeded(Compacted) and ends, and pull_all fails with
/// ClientError::ResyncNeeded; a checkpoint of another store yields
/// ResyncNeeded(StoreChanged).
#[tokio::test]
async fn out_of_range_is_resync_needed() {
    let ahead = Arc::new(AtomicU64::new(0));
    let server = TestServer::start_with_clock(&ahead, |_| {}).await;
    let client = Client::connect([format!("http://{}", server.addr)]).unwrap();
    client.put("todos", "gone", json!({"a": 1})).await.unwrap();
    client.put("todos", "kept", json!({"b": 1})).await.unwrap();
    client.delete("todos", "gone").await.unwrap();
    ahead.store(2 * HOUR + 60, Ordering::Relaxed);
    eventually(|| {
        let mut c = server.client.clone();
        async move { get(&mut c, "todos", "gone").await.is_none() }
    })
    .await;

    let mut watch = client.watch(WatchOptions {
        since: Checkpoint::at(1),
        ..Default::default()
    });
    match next_event(&mut watch).await {
        Some(Ok(WatchEvent::ResyncNeeded { reason, message })) => {
            assert_eq!(reason, ResyncReason::Compacted);
            assert!(message.contains("resync from 0"), "{message}");
        }
        other => panic!("expected ResyncNeeded, got {other:?}"),
    }
    assert!(next_event(&mut watch).await.is_none(), "the watch ends");

    let mut pages = client.pull_all(PullOptions {
        since: Checkpoint::at(1),
        ..Default::default()
    });
    let err = pages.next().await.unwrap().unwrap_err();
    assert!(err.is_resync_needed(), "{err}");
    assert_eq!(err.reason().as_deref(), Some("CHECKPOINT_COMPACTED"));

    let mut elsewhere = client.watch(WatchOptions {
        since: Checkpoint {
            seq: 2,
            store_id: "another-store".into(),
            ..Default::default()
        },
        ..Default::default()
    });
    match next_event(&mut elsewhere).await {
        Some(Ok(WatchEvent::ResyncNeeded { reason, .. })) => {
            assert_eq!(reason, ResyncReason::StoreChanged);
        }
        other => panic!("expected ResyncNeeded, got {other:?}"),
    }
}

/// Rule: the retry budget is time, not attempts: with three endpoints that
/// all refuse connections, a put with the default policy keeps trying
/// until the server comes up (~1.5 s later) on one of them, and succeeds
/// (with attempts counted per round it gave up in under a second).
#[tokio::test(flavor = "multi_thread")]
async fn retries_ride_out_a_restart_whatever_the_endpoint_count() {
    let addrs: Vec<String> = (0..3).map(|_| free_loopback_addr().to_string()).collect();
    let client = Client::connect(addrs.iter().map(|a| format!("http://{a}"))).unwrap();
    let data = DataDir::new();
    let late = addrs[1].clone();
    let server = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(1500));
        Process::start_at(&late, data.as_ref(), &[], |_| {})
    });
    let started = std::time::Instant::now();
    let r = client.put("docs", "a", json!({"v": 1})).await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    let r = r.expect("the put waits for the server");
    assert_eq!(r.outcome, pb::Outcome::Applied);
    drop(server.await.unwrap());
}

/// Rule: a push the client gives up on fails with Unacknowledged, holding
/// the request with its ids; `Client::resend` sends it later and each
/// mutation is applied exactly once: APPLIED when no earlier attempt got
/// through (every endpoint dead), DUPLICATE flagged
/// applied_by_earlier_attempt when an earlier attempt's answer was lost
/// (here held until its deadline), from the same or a new client with the
/// same client id.
#[tokio::test(flavor = "multi_thread")]
async fn an_unacknowledged_push_is_resent_with_its_ids() {
    let brief = RetryPolicy {
        max_elapsed: Duration::from_millis(1500),
        max_attempts: 1000,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    };
    // Nothing listens: the push never leaves the client.
    let addr = free_loopback_addr().to_string();
    let client = Client::builder([format!("http://{addr}")])
        .retry(brief.clone())
        .build()
        .unwrap();
    let err = client
        .put("docs", "a", json!({"v": 1}))
        .await
        .expect_err("no server");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    let pending = err
        .unacknowledged_push()
        .expect("the push to resend")
        .clone();
    assert_eq!(pending.mutation_ids(), [1]);
    assert!(
        !pending.maybe_applied(),
        "a refused connection applies nothing"
    );
    let data = DataDir::new();
    let server = Process::start_at(&addr, data.as_ref(), &[], |_| {});
    let r = client.resend(&pending).await.unwrap();
    assert_eq!(r.results[0].outcome, pb::Outcome::Applied);
    let again = client.resend(&pending).await.unwrap();
    assert_eq!(again.results[0].outcome, pb::Outcome::Duplicate);
    let mut c = server.client().await;
    assert_eq!(get(&mut c, "docs", "a").await.unwrap().version, 1);

    // An answer lost: the push commits, its answer is held past the
    // deadline of every attempt.
    let gate = Gate::start(&server.addr, u64::MAX, Dial::AtOnce).await;
    let client = Client::builder([gate.url()])
        .client_id("resender")
        .retry(brief)
        .timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    client.put("docs", "warm", json!({})).await.unwrap();
    // Nothing more passes, on any of the client's connections.
    gate.allow(0);
    let err = client
        .push([
            Mutation::put("docs", "b", json!({"v": 1})),
            Mutation::patch("docs", "a", json!({"w": 2})),
        ])
        .await
        .expect_err("no answer gets through");
    let pending = err
        .unacknowledged_push()
        .expect("the push to resend")
        .clone();
    assert_eq!(pending.mutation_ids(), [2, 3]);
    assert!(pending.maybe_applied(), "{err}");
    wait_for("the held push committed", async || {
        get(&mut c, "docs", "b").await.is_some()
    })
    .await;
    drop(gate);
    // A new process with the same client id resends it.
    let later = client_of(&[server.url()], "resender");
    let r = later.resend(&pending).await.unwrap();
    assert!(
        r.results.iter().all(|m| m.outcome == pb::Outcome::Duplicate
            && m.applied_by_earlier_attempt
            && m.is_applied()),
        "{r:#?}"
    );
    assert_eq!(get(&mut c, "docs", "b").await.unwrap().version, 1);
    assert_eq!(get(&mut c, "docs", "a").await.unwrap().version, 2);
    let other = client_of(&[server.url()], "someone-else");
    assert!(matches!(
        other.resend(&pending).await,
        Err(ClientError::Input(_))
    ));
}

/// Rule: a watch refused for a stream cap (RESOURCE_EXHAUSTED, with or
/// without RetryInfo) waits and retries instead of ending: with
/// --max-subscribers 1, a second watch starts once the first ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_waits_for_a_free_subscriber_slot() {
    let server = TestServer::start_with(|c| c.max_subscribers = 1).await;
    let client = client_of(&[format!("http://{}", server.addr)], "watchers");
    client.put("docs", "a", json!({})).await.unwrap();
    let mut first = client.watch(WatchOptions::default());
    assert_eq!(documents(&mut first, 1).await.len(), 1);
    let mut second = client.watch(WatchOptions::default());
    let waiting = tokio::spawn(async move { documents(&mut second, 1).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "the second watch waits for a slot");
    drop(first);
    let got = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the second watch starts once the first ends")
        .expect("no panic");
    assert_eq!(got[0].id, "a");
}

// Needs the server to answer OUT_OF_RANGE MIN_CHECKPOINT_AHEAD when a
// primary is asked for a min_checkpoint beyond its head (the server-side
// change made in parallel): remove the `ignore` once it is merged. Until
// then a primary waits and answers UNAVAILABLE REPLICA_BEHIND, the client
// retries for its whole budget, and this test fails on its 20 s bounds.
/// Rule: reads after this client's writes were lost (its primary replaced
/// by a fresh one at the same address with fewer writes) do not hang on
/// read-your-writes: `get` answers (reading again without the floor) and a
/// new watch yields ResyncNeeded(WritesLost).
#[tokio::test(flavor = "multi_thread")]
async fn reads_after_lost_writes_resync_instead_of_hanging() {
    let data = DataDir::new();
    let server = start(&data, &[]);
    let addr = server.addr.clone();
    let reader = client_of(&[server.url()], "reader");
    let watcher = client_of(&[server.url()], "watcher");
    for i in 0..3 {
        reader
            .put("docs", &format!("r{i}"), json!({}))
            .await
            .unwrap();
        watcher
            .put("docs", &format!("w{i}"), json!({}))
            .await
            .unwrap();
    }
    server.kill_9();
    let fresh = DataDir::new();
    let server = Process::start_at(&addr, fresh.as_ref(), &[], |_| {});
    common::push(
        &mut server.client().await,
        "other",
        vec![common::put("docs", "x", json!({}))],
    )
    .await;

    let docs = tokio::time::timeout(Duration::from_secs(20), reader.get("docs", ["x", "r0"]))
        .await
        .expect("get does not wait for writes that are gone")
        .expect("get answers");
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].id, "x");
    assert!(reader.written() <= 1, "the floor dropped to the head");

    let mut watch = watcher.watch(WatchOptions::default());
    match tokio::time::timeout(Duration::from_secs(20), watch.next()).await {
        Ok(Some(Ok(WatchEvent::ResyncNeeded { reason, .. }))) => {
            assert_eq!(reason, ResyncReason::WritesLost);
        }
        other => panic!("expected ResyncNeeded(WritesLost), got {other:?}"),
    }
    assert!(watcher.written() <= 1);
}
