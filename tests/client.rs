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
        max_attempts: 500,
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
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pusher = tokio::spawn({
        let (client, answered) = (client.clone(), answered.clone());
        async move {
            let mut results = Vec::new();
            for i in 0..PUSHES {
                let batch = [
                    Mutation::put("docs", format!("d{i}"), json!({"i": i})),
                    Mutation::put("docs", "counter", json!({"n": i})),
                ];
                results.push(client.push(batch).await.expect("push"));
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            results
        }
    });

    wait_for("a few pushes", async || head(&server).await >= 10).await;
    // From now on no answer reaches the client; the next push commits.
    gate.hold();
    // A push is committed (two seqs each) whose answer the gate holds:
    // the one in flight at the hold, or the next one.
    wait_for("a committed push whose answer is held", async || {
        head(&server).await / 2 > answered.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    server.kill_9();
    let server = Process::start_at(&addr, data.as_ref(), &[], |_| {});
    gate.cut(u64::MAX);

    let results = tokio::time::timeout(Duration::from_secs(60), pusher)
        .await
        .expect("the pushes finish")
        .expect("pusher");
    let all: Vec<_> = results.iter().flat_map(|r| &r.results).collect();
    assert_eq!(all.len(), usize::try_from(2 * PUSHES).unwrap());
    assert!(all.iter().all(|r| r.is_applied()), "{all:#?}");
    assert!(
        all.iter().any(|r| r.applied_by_earlier_attempt),
        "the held push was answered by its retry"
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
