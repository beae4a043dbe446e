//! Live streams under load: slow consumers, dropped connections, limits.

mod common;

use std::time::Duration;

use common::*;
use deltasync::pb::{self, SubscribeRequest, subscribe_response::Event};
use serde_json::json;
use tonic::{Code, Streaming};

const WRITERS: u64 = 4;
const PUSHES: u64 = 100;

/// Starts writers that each push `PUSHES` single-document creates.
fn spawn_writers(c: &Client, tag: &'static str) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let mut c = c.clone();
            tokio::spawn(async move {
                for i in 0..PUSHES {
                    push_one(
                        &mut c,
                        "",
                        put(
                            "load",
                            &format!("{tag}-{w}-{i}"),
                            json!({"pad": "p".repeat(512)}),
                        ),
                    )
                    .await;
                }
            })
        })
        .collect()
}

/// Reads until the checkpoint reaches `until`, returning every seq seen.
/// Fails (rather than hangs) if that takes more than 60 s: heartbeats alone
/// would otherwise keep a stuck stream alive.
async fn drain(
    stream: &mut Streaming<pb::SubscribeResponse>,
    mut checkpoint: u64,
    until: u64,
) -> (Vec<u64>, u64) {
    let mut seqs = Vec::new();
    let read = async {
        while checkpoint < until {
            match stream
                .message()
                .await
                .expect("stream ok")
                .expect("stream open")
                .event
            {
                Some(Event::Changes(b)) => {
                    seqs.extend(b.documents.iter().map(|d| d.seq));
                    checkpoint = b.checkpoint;
                }
                Some(Event::Progress(p)) => checkpoint = checkpoint.max(p.checkpoint),
                None => panic!("empty event"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the stream reaches the end in time");
    (seqs, checkpoint)
}

/// Rule: a subscriber that stops reading blocks neither the writers nor the
/// other subscribers, and still receives every seq exactly once, in order,
/// once it reads again (it catches up from the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_does_not_throttle_writers_or_lose_changes() {
    let s = TestServer::start_with(|c| {
        c.feed_capacity = 8;
        c.heartbeat_interval = Duration::from_millis(200);
        c.durability = deltasync::store::Durability::Buffered;
    })
    .await;
    let c = s.client.clone();
    let mut slow = open_stream(&mut s.connect_small_window().await, 0).await;
    let mut fast = Vec::new();
    for _ in 0..3 {
        fast.push(
            s.connect()
                .await
                .subscribe(SubscribeRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let total = WRITERS * PUSHES;
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut f| tokio::spawn(async move { drain(&mut f, 0, total).await.0 }))
        .collect();

    // The slow subscriber reads nothing while the writers run: if writers
    // waited for it, they would never finish.
    let writers = spawn_writers(&c, "w");
    for w in writers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("writers finish while a reader stalls")
            .unwrap();
    }
    for r in readers {
        assert_eq!(
            r.await.unwrap(),
            (1..=total).collect::<Vec<_>>(),
            "fast subscriber: every seq once, in order"
        );
    }
    let (seqs, _) = drain(&mut slow, 0, total).await;
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "slow subscriber: every seq once, in order"
    );
}

/// Rule: a subscriber whose connection drops mid-stream resumes from its
/// last checkpoint with no gap and no duplicate, while writers keep going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_resumes_from_checkpoint() {
    let s = TestServer::start_with(|c| c.durability = deltasync::store::Durability::Buffered).await;
    let c = s.client.clone();
    let writers = spawn_writers(&c, "r");
    let mut first = s
        .connect()
        .await
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (mut seqs, checkpoint) = drain(&mut first, 0, 50).await;
    drop(first); // its connection goes with it
    let mut resumed = s
        .connect()
        .await
        .subscribe(SubscribeRequest {
            since: checkpoint,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for w in writers {
        w.await.unwrap();
    }
    let total = WRITERS * PUSHES;
    let (rest, _) = drain(&mut resumed, checkpoint, total).await;
    seqs.extend(rest);
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
}

/// Rule: --max-subscribers caps open streams with RESOURCE_EXHAUSTED and a
/// retry delay (RetryInfo), and a closed stream frees its place.
#[tokio::test]
async fn subscriber_limit() {
    let s = TestServer::start_with(|c| c.max_subscribers = 2).await;
    let mut c = s.client.clone();
    let first = open_stream(&mut c, 0).await;
    let _second = open_stream(&mut c, 0).await;
    let err = c.subscribe(SubscribeRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("2 open Subscribe streams"),
        "{}",
        err.message()
    );
    // A stream ends soon enough: the caller is told when to try again.
    let delay = tonic_types::StatusExt::get_error_details(&err)
        .retry_info()
        .and_then(|r| r.retry_delay);
    assert!(delay.is_some_and(|d| !d.is_zero()), "RetryInfo in {err:?}");
    drop(first);
    for _ in 0..200 {
        match c.subscribe(SubscribeRequest::default()).await {
            Ok(_) => return,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the closed stream's place was never freed");
}

/// Rule: --max-streams-per-connection caps concurrent streams on one HTTP/2
/// connection: a third stream waits until one of the two open ones closes.
#[tokio::test]
async fn streams_per_connection_are_capped() {
    let s = TestServer::start_with(|c| c.max_streams_per_connection = 2).await;
    let mut c = s.connect().await;
    let first = open_stream(&mut c, 0).await;
    let _second = open_stream(&mut c, 0).await;
    let mut third = Box::pin(c.subscribe(SubscribeRequest::default()));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut third)
            .await
            .is_err(),
        "a third concurrent stream on the connection must wait"
    );
    drop(first);
    let opened = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("opens once a stream closes");
    assert!(opened.is_ok());
    // Another connection is not affected by this one's streams.
    assert!(
        s.connect()
            .await
            .subscribe(SubscribeRequest::default())
            .await
            .is_ok()
    );
}
