//! Subscribe: backlog, caught-up marker, live changes, resume, heartbeat.

mod common;

use std::time::Duration;

use common::*;
use deltasync::pb::{self, SubscribeRequest, subscribe_response::Event};
use serde_json::json;
use tonic::{Code, Streaming};

/// Guards against a hung stream; never reached when the rule holds.
const PATIENCE: Duration = Duration::from_secs(20);

async fn open(
    c: &mut Client,
    since: u64,
    collections: &[&str],
) -> Streaming<pb::SubscribeResponse> {
    let req = SubscribeRequest {
        since,
        collections: collections.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    c.subscribe(req).await.expect("subscribe").into_inner()
}

async fn next(stream: &mut Streaming<pb::SubscribeResponse>) -> Event {
    let msg = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a message in time");
    msg.expect("stream ok")
        .expect("stream open")
        .event
        .expect("event set")
}

/// Everything a subscriber saw until its checkpoint reached `until`.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    caught_up_at: Option<usize>,
    checkpoint: u64,
}

async fn collect_until(stream: &mut Streaming<pb::SubscribeResponse>, until: u64) -> Seen {
    let mut seen = Seen::default();
    while seen.checkpoint < until {
        match next(stream).await {
            Event::Changes(batch) => {
                assert!(batch.checkpoint >= seen.checkpoint);
                seen.seqs.extend(batch.documents.iter().map(|d| d.seq));
                assert!(batch.documents.iter().all(|d| d.seq <= batch.checkpoint));
                seen.checkpoint = batch.checkpoint;
            }
            Event::Progress(p) => {
                if p.caught_up && seen.caught_up_at.is_none() {
                    seen.caught_up_at = Some(seen.seqs.len());
                }
                assert!(p.checkpoint >= seen.checkpoint);
                seen.checkpoint = p.checkpoint;
            }
        }
    }
    seen
}

/// Rule: backlog then live, with writers running during the switch, delivers
/// every seq exactly once and in order, to every subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_then_live_with_concurrent_writers() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    for batch in 0..4 {
        let mutations = (0..50)
            .map(|i| put("todos", &format!("pre-{batch}-{i}"), json!({"i": i})))
            .collect();
        push(&mut c, "", mutations).await;
    }
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let mut c = c.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    push_one(
                        &mut c,
                        "",
                        put("todos", &format!("w{w}-{i}"), json!({"w": w})),
                    )
                    .await;
                }
            })
        })
        .collect();
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open(&mut s.connect().await, 0, &[]).await);
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = 200 + 300;
    for mut stream in streams {
        let seen = collect_until(&mut stream, total).await;
        assert_eq!(
            seen.seqs,
            (1..=total).collect::<Vec<_>>(),
            "every seq once, in order"
        );
        let at = seen.caught_up_at.expect("a caught_up marker");
        assert!(at >= 200, "the backlog comes before caught_up");
    }
}

/// Rule: resuming from the last checkpoint seen gives exactly what was missed.
#[tokio::test]
async fn resume_from_checkpoint_has_no_gap_and_no_duplicate() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push(
        &mut c,
        "",
        (0..5)
            .map(|i| put("todos", &format!("a{i}"), json!({})))
            .collect(),
    )
    .await;
    let mut stream = open(&mut c, 0, &[]).await;
    let first = collect_until(&mut stream, 5).await;
    assert_eq!(first.seqs, vec![1, 2, 3, 4, 5]);
    let live = push(&mut c, "", vec![put("todos", "b", json!({}))]).await;
    let second = collect_until(&mut stream, live.checkpoint).await;
    assert_eq!(second.seqs, vec![6]);
    drop(stream);

    push(
        &mut c,
        "",
        (0..3)
            .map(|i| put("todos", &format!("c{i}"), json!({})))
            .collect(),
    )
    .await;
    let mut resumed = open(&mut c, second.checkpoint, &[]).await;
    let missed = collect_until(&mut resumed, 9).await;
    assert_eq!(missed.seqs, vec![7, 8, 9]);
}

/// Rule: one push's changes arrive in one message; filters only pass their
/// collections but the checkpoint still covers the whole commit.
#[tokio::test]
async fn one_push_one_message_and_filters() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let mut stream = open(&mut c, 0, &["todos"]).await;
    assert!(matches!(
        next(&mut stream).await,
        Event::Progress(pb::Progress {
            checkpoint: 0,
            caught_up: true,
            ..
        })
    ));
    let mut mutations: Vec<_> = (0..5)
        .map(|i| put("todos", &format!("t{i}"), json!({})))
        .collect();
    mutations.extend((0..3).map(|i| put("notes", &format!("n{i}"), json!({}))));
    let resp = push(&mut c, "", mutations).await;
    match next(&mut stream).await {
        Event::Changes(batch) => {
            assert_eq!(batch.documents.len(), 5);
            assert!(batch.documents.iter().all(|d| d.collection == "todos"));
            assert_eq!(batch.checkpoint, resp.checkpoint);
        }
        other => panic!("expected changes, got {other:?}"),
    }
}

/// Rule: an idle stream still gets Progress at the heartbeat interval.
#[tokio::test]
async fn heartbeat_on_idle_stream() {
    let s = TestServer::start_with(|c| c.heartbeat_interval = Duration::from_millis(100)).await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "x", json!({}))).await;
    let mut stream = open(&mut c, 1, &[]).await;
    assert!(matches!(
        next(&mut stream).await,
        Event::Progress(pb::Progress {
            checkpoint: 1,
            caught_up: true,
            ..
        })
    ));
    for _ in 0..2 {
        assert!(matches!(
            next(&mut stream).await,
            Event::Progress(pb::Progress {
                checkpoint: 1,
                caught_up: true,
                ..
            })
        ));
    }
}

/// Rule: a change too big to share a message goes alone; large commits are
/// split by size without losing or repeating a document.
#[tokio::test]
async fn large_commits_split_under_the_message_cap() {
    let s = TestServer::start_with(|c| {
        c.max_message_bytes = 64 * 1024;
        // Every result of a full batch must fit a message: 1024 bytes each.
        c.max_batch = c.max_batch.min(50);
        c.max_body_bytes = 56 * 1024;
    })
    .await;
    let mut c = s.client.clone();
    let mut stream = open(&mut c, 0, &[]).await;
    next(&mut stream).await;
    let near_cap = "y".repeat(55 * 1024);
    let resp = push(
        &mut c,
        "",
        (0..4)
            .map(|i| put("blobs", &format!("{i}"), json!({"d": near_cap})))
            .collect(),
    )
    .await;
    let mut seqs = Vec::new();
    let mut messages = 0;
    while seqs.len() < 4 {
        if let Event::Changes(batch) = next(&mut stream).await {
            messages += 1;
            assert!(prost::Message::encoded_len(&batch) < 64 * 1024);
            seqs.extend(batch.documents.iter().map(|d| d.seq));
            if seqs.len() == 4 {
                assert_eq!(batch.checkpoint, resp.checkpoint);
            }
        }
    }
    assert_eq!((seqs, messages), (vec![1, 2, 3, 4], 4));
}

/// Rule: a foreign store id is refused before the stream starts.
#[tokio::test]
async fn foreign_store_id_is_refused() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let err = c
        .subscribe(SubscribeRequest {
            store_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}
