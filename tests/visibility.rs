//! What readers may see, and honest health: readers see only durable
//! commits, a failed flush is reported and refused clearly, reads examine a
//! bounded number of records, and the live ring is bounded in bytes.
//! Storage failures are injected through `store::Faults`.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::*;
use deltasync::{
    pb::{self, Outcome, PullRequest, SubscribeRequest, subscribe_response::Event},
    store::{self, Durability, Faults},
};
use serde_json::json;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Guards against a hung stream or server; never reached when the rule holds.
const PATIENCE: Duration = Duration::from_secs(20);

/// A server whose flushes fail once `faults.fail_flush` is set.
async fn server_with_faults(
    faults: &Faults,
    configure: impl FnOnce(&mut deltasync::Config),
) -> TestServer {
    let options = store::Options {
        faults: faults.clone(),
        ..Default::default()
    };
    TestServer::start_with_options(configure, options).await
}

async fn serving(s: &TestServer) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "deltasync.v1.SyncService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(resp.status).unwrap()
}

/// Waits (bounded) for health to report NOT_SERVING: it is set by a task
/// that watches the store.
async fn not_serving(s: &TestServer) {
    tokio::time::timeout(PATIENCE, async {
        while serving(s).await != ServingStatus::NotServing {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("health reports NOT_SERVING");
}

async fn pull_with(c: &mut Client, req: PullRequest) -> Result<pb::PullResponse, tonic::Status> {
    c.pull(req).await.map(tonic::Response::into_inner)
}

/// Rule: in `buffered` mode a push is answered before its commit is
/// durable, but no reader sees the commit until it is: here it never
/// becomes durable (every flush fails), so Get, Pull, Subscribe and
/// `last_mutation_id` keep showing the state before it, and a Pull from the
/// checkpoint the pusher was given is refused (UNAVAILABLE: it can never be
/// served by this server) rather than served from state a restart loses.
#[tokio::test]
async fn buffered_commits_are_seen_only_once_durable() {
    let faults = Faults::default();
    let s = server_with_faults(&faults, |c| {
        c.durability = Durability::Buffered;
        c.flush_interval = Duration::from_millis(20);
        c.heartbeat_interval = Duration::from_millis(20);
    })
    .await;
    let mut c = s.client.clone();
    let first = push(
        &mut c,
        "phone",
        vec![put("todos", "a", json!({"n": 1})).id(1)],
    )
    .await;
    // Durable within a flush interval: then every reader sees it.
    let mut stream = open_stream(&mut c, 0).await;
    let mut seen = Vec::new();
    while seen.is_empty() {
        let msg = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("the first commit is published")
            .unwrap()
            .unwrap();
        if let Some(Event::Changes(b)) = msg.event {
            seen.extend(b.documents.into_iter().map(|d| d.id));
        }
    }
    assert_eq!(seen, ["a"]);

    faults.fail_flush.store(true, Ordering::Relaxed);
    let second = push(
        &mut c,
        "phone",
        vec![put("todos", "b", json!({"n": 2})).id(2)],
    )
    .await;
    assert_eq!(
        outcome(&second.results[0]),
        Outcome::Applied,
        "answered early"
    );
    assert!(second.checkpoint > first.checkpoint);

    // The flush fails: the writer stops (health says so once it has).
    not_serving(&s).await;
    assert!(get(&mut c, "todos", "b").await.is_none(), "Get");
    let page = pull_with(
        &mut c,
        PullRequest {
            client_id: "phone".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ids: Vec<_> = page.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["a"], "Pull");
    assert_eq!(page.checkpoint, first.checkpoint);
    assert_eq!(page.last_mutation_id, 1, "last_mutation_id");
    let err = pull_with(
        &mut c,
        PullRequest {
            since: second.checkpoint,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The live stream gets heartbeats at the old head, never the change.
    for _ in 0..3 {
        let msg = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("a heartbeat")
            .unwrap()
            .unwrap();
        match msg.event {
            Some(Event::Progress(p)) => assert_eq!(p.checkpoint, first.checkpoint),
            other => panic!("Subscribe saw {other:?}"),
        }
    }
}

/// Rule: a buffered push is answered before its commit is durable, and
/// readers see the commit only once it is: right after the answer, Get does
/// not show it (the flush interval is 2 s), and a Pull or Subscribe from
/// the checkpoint the pusher was given waits for it instead of answering
/// OUT_OF_RANGE. (If a slow disk keeps the flush from landing within the
/// server's patience, it answers UNAVAILABLE: retry; never OUT_OF_RANGE.)
#[tokio::test]
async fn a_buffered_commit_is_seen_once_durable_and_its_checkpoint_waited_for() {
    let s = TestServer::start_with(|c| {
        c.durability = Durability::Buffered;
        c.flush_interval = Duration::from_secs(2);
    })
    .await;
    let mut c = s.client.clone();
    let pushed = push(&mut c, "", vec![put("todos", "a", json!({}))]).await;
    assert_eq!(outcome(&pushed.results[0]), Outcome::Applied);
    assert!(
        get(&mut c, "todos", "a").await.is_none(),
        "not durable yet, so not visible"
    );
    let since = pushed.checkpoint;
    let page = tokio::time::timeout(PATIENCE, async {
        loop {
            match pull_with(
                &mut c.clone(),
                PullRequest {
                    since,
                    ..Default::default()
                },
            )
            .await
            {
                Err(e) if e.code() == Code::Unavailable => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("the checkpoint becomes durable")
    .expect("the checkpoint is waited for, not refused");
    assert_eq!(page.checkpoint, since);
    assert!(get(&mut c, "todos", "a").await.is_some(), "durable now");
    let pushed = push(&mut c, "", vec![put("todos", "b", json!({}))]).await;
    let mut stream = c
        .subscribe(SubscribeRequest {
            since: pushed.checkpoint,
            ..Default::default()
        })
        .await
        .expect("Subscribe waits too")
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(msg.event, Some(Event::Progress(p)) if p.caught_up && p.checkpoint == pushed.checkpoint),
        "{msg:?}"
    );
    // A checkpoint never given out is still refused at once.
    let err = pull_with(
        &mut c,
        PullRequest {
            since: pushed.checkpoint + 100,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}

/// Rule: in `fsync` mode a push whose flush failed is not acknowledged (its
/// outcome is unknown: UNAVAILABLE, retry with the same ids), and the
/// mutation id it wrote (not durable) is not reported by Pull either.
#[tokio::test]
async fn a_mutation_id_is_reported_only_once_durable() {
    let faults = Faults::default();
    let s = server_with_faults(&faults, |_| {}).await;
    let mut c = s.client.clone();
    push(&mut c, "phone", vec![put("todos", "a", json!({})).id(1)]).await;
    faults.fail_flush.store(true, Ordering::Relaxed);
    let err = push_refused(
        &mut c,
        pb::PushRequest {
            client_id: "phone".into(),
            mutations: vec![put("todos", "b", json!({})).id(2)],
            atomic: false,
        },
    )
    .await;
    assert_eq!(err.code(), Code::Unavailable, "outcome unknown: {err:?}");
    assert_eq!(last_mutation_id(&mut c, "phone").await, 1);
    assert!(get(&mut c, "todos", "b").await.is_none());
}

/// Rule: after a failed flush the server takes no more writes until
/// restarted, and says so: health reports NOT_SERVING for
/// `deltasync.v1.SyncService` and Push answers UNAVAILABLE (the push whose
/// flush failed too: its outcome is unknown); reads of what is durable go
/// on.
#[tokio::test]
async fn a_failed_flush_is_reported_not_serving_and_unavailable() {
    let faults = Faults::default();
    let s = server_with_faults(&faults, |_| {}).await;
    let mut c = s.client.clone();
    push(&mut c, "", vec![put("todos", "a", json!({"n": 1}))]).await;
    assert_eq!(serving(&s).await, ServingStatus::Serving);
    faults.fail_flush.store(true, Ordering::Relaxed);
    let failed = push_refused(
        &mut c,
        pb::PushRequest {
            mutations: vec![put("todos", "b", json!({}))],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert!(
        failed.message().contains("same mutation ids"),
        "says what to do, and no storage details: {failed:?}"
    );
    not_serving(&s).await;
    // Even with the disk healthy again: what is on disk is unknown until a
    // restart recovers it.
    faults.fail_flush.store(false, Ordering::Relaxed);
    let refused = push_refused(
        &mut c,
        pb::PushRequest {
            mutations: vec![put("todos", "c", json!({}))],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(get(&mut c, "todos", "a").await.unwrap().version, 1);
    let s = s.restart().await;
    assert_eq!(serving(&s).await, ServingStatus::Serving);
    let mut c = s.client.clone();
    push(&mut c, "", vec![put("todos", "c", json!({}))]).await;
}

/// Fills collection `a` with `n` tiny documents, then one document in `b`.
async fn a_big_log_with_one_match(c: &mut Client, n: usize) {
    for start in (0..n).step_by(1000) {
        let batch = (start..n.min(start + 1000))
            .map(|i| put("a", &i.to_string(), json!({})))
            .collect();
        push(c, "", batch).await;
    }
    push(c, "", vec![put("b", "needle", json!({}))]).await;
}

/// Rule: a Pull page examines a bounded number of records (20,000),
/// matching or not: a filter that matches little answers with an advanced
/// checkpoint and `has_more` instead of scanning the whole log in one call.
#[tokio::test]
async fn a_filtered_pull_examines_a_bounded_number_of_records() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    a_big_log_with_one_match(&mut c, 45_000).await;
    let mut since = 0;
    let mut pages = Vec::new();
    let found = loop {
        let page = pull_with(
            &mut c,
            PullRequest {
                since,
                collections: vec!["b".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        pages.push((page.documents.len(), page.checkpoint, page.has_more));
        assert!(page.checkpoint > since || !page.has_more, "progress");
        since = page.checkpoint;
        if !page.documents.is_empty() {
            break page.documents;
        }
        assert!(page.has_more, "the match is still ahead");
    };
    assert_eq!(found[0].id, "needle");
    assert_eq!(
        pages,
        [(0, 20_000, true), (0, 40_000, true), (1, 45_001, false)]
    );
}

/// Rule: a Subscribe catch-up over a big log with a filter that matches
/// little advances in bounded steps, and a heartbeat falling due during a
/// step never throws that step's work away: even with heartbeats far more
/// frequent than a step, the match arrives and the stream catches up.
#[tokio::test]
async fn heartbeats_never_throw_catch_up_work_away() {
    let s = TestServer::start_with(|c| c.heartbeat_interval = Duration::from_millis(1)).await;
    let mut c = s.client.clone();
    a_big_log_with_one_match(&mut c, 45_000).await;
    let mut stream = c
        .subscribe(SubscribeRequest {
            collections: vec!["b".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut checkpoints = Vec::new();
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            let msg = stream.message().await.unwrap().unwrap();
            match msg.event {
                Some(Event::Changes(b)) => break b.documents,
                Some(Event::Progress(p)) => checkpoints.push(p.checkpoint),
                None => {}
            }
        }
    })
    .await
    .expect("the catch-up reaches the match despite heartbeats");
    assert_eq!(found[0].id, "needle");
    assert!(
        checkpoints.windows(2).all(|w| w[0] <= w[1]),
        "heartbeat checkpoints never go back"
    );
}

/// Rule: with the live ring's byte bound smaller than any commit, every
/// commit's documents are dropped from the ring at once, and live
/// subscribers still get every change, in order, once: from the log.
#[tokio::test]
async fn a_ring_over_its_byte_bound_still_delivers_everything() {
    let s = TestServer::start_with(|c| c.feed_max_bytes = 1).await;
    let mut c = s.client.clone();
    let mut stream = open_stream(&mut c, 0).await;
    let msg = stream.message().await.unwrap().unwrap();
    assert!(matches!(msg.event, Some(Event::Progress(p)) if p.caught_up));
    let writer = {
        let mut c = c.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                push(
                    &mut c,
                    "",
                    vec![put("todos", &i.to_string(), json!({"i": i}))],
                )
                .await;
            }
        })
    };
    let mut seqs = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while seqs.len() < 50 {
            let msg = stream.message().await.unwrap().unwrap();
            if let Some(Event::Changes(b)) = msg.event {
                seqs.extend(b.documents.iter().map(|d| d.seq));
            }
        }
    })
    .await
    .expect("every change arrives");
    writer.await.unwrap();
    assert_eq!(
        seqs,
        (1..=50).collect::<Vec<u64>>(),
        "in order, once, no gap"
    );
}
