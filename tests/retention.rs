//! Retention: delta-log pruning, tombstone purge, the purge horizon and
//! "checkpoint too old". Time is moved with an injected clock, not slept.

mod common;

use std::{
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};

use common::*;
use deltasync::pb::{self, Outcome, PullRequest, SubscribeRequest, subscribe_response::Event};
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt;

async fn server(
    ahead: &Arc<AtomicU64>,
    configure: impl FnOnce(&mut deltasync::Config),
) -> TestServer {
    TestServer::start_with_clock(ahead, |c| {
        c.history_max_versions = 3;
        // Tiny batches: every round spans several writer batches.
        c.compaction_batch = 2;
        configure(c);
    })
    .await
}

fn assert_compacted(status: &Status, horizon: u64) {
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("resync from 0"),
        "{}",
        status.message()
    );
    let info = status
        .get_details_error_info()
        .expect("an ErrorInfo detail");
    assert_eq!(info.reason, "CHECKPOINT_COMPACTED");
    assert_eq!(
        info.metadata.get("purge_horizon"),
        Some(&horizon.to_string())
    );
}

/// Whether `base` of todos/t is gone from the delta log, asked without
/// writing: an atomic batch with a mutation that always conflicts. A patch of
/// a field nobody touched merges if the base is known (so it is NOT_APPLIED
/// here) and conflicts if the base was pruned (every field counts as changed).
async fn base_pruned(c: &mut Client, base: u64) -> bool {
    let req = pb::PushRequest {
        atomic: true,
        mutations: vec![
            patch("todos", "t", json!({"probe": 1})).base(base),
            put("todos", "t", json!({})).base(1_000),
        ],
        ..Default::default()
    };
    let resp = push_req(c, req).await;
    assert_eq!(outcome(&resp.results[1]), Outcome::Conflict);
    outcome(&resp.results[0]) == Outcome::Conflict
}

/// Rule: the delta log keeps at most --history-max-versions per document and
/// nothing superseded longer ago than --history-retention; a stale push whose
/// base was pruned counts every field as changed by the server.
#[tokio::test]
async fn history_is_pruned_by_count_and_age() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = server(&ahead, |_| {}).await;
    let mut c = s.client.clone();
    push_one(
        &mut c,
        "",
        put("todos", "t", json!({"title": "v1", "n": 0})),
    )
    .await;
    for v in 1..=5 {
        push_one(&mut c, "", patch("todos", "t", json!({"n": v}))).await; // versions 2..=6
    }
    // Versions 1 and 2 fall out by count (3 kept: 3, 4, 5).
    eventually(|| {
        let mut c = c.clone();
        async move { base_pruned(&mut c, 2).await }
    })
    .await;
    assert!(base_pruned(&mut c, 1).await);
    assert!(
        !base_pruned(&mut c, 3).await,
        "the newest versions are kept"
    );
    let merged = push_one(
        &mut c,
        "",
        patch("todos", "t", json!({"title": "merged"})).base(5),
    )
    .await;
    assert_eq!(outcome(&merged), Outcome::Merged);

    // An hour later every superseded version is gone.
    assert!(!base_pruned(&mut c, 6).await);
    ahead.store(HOUR + 60, Ordering::Relaxed);
    eventually(|| {
        let mut c = c.clone();
        async move { base_pruned(&mut c, 6).await }
    })
    .await;
    let late = push_one(
        &mut c,
        "",
        patch("todos", "t", json!({"other": "x"})).base(6),
    )
    .await;
    assert_eq!(
        (outcome(&late), late.conflicting_fields),
        (Outcome::Conflict, vec!["other".to_string()])
    );
    assert_eq!(
        json(&get(&mut c, "todos", "t").await.unwrap())["title"],
        "merged"
    );
}

/// Rule: expired tombstones are purged from the log with their delta-log
/// versions; the purge horizon moves to the newest purged tombstone's seq;
/// checkpoints below it get OUT_OF_RANGE with CHECKPOINT_COMPACTED (Pull
/// and Subscribe), while 0 and newer checkpoints still work.
#[tokio::test]
async fn tombstones_are_purged_and_old_checkpoints_refused() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = server(&ahead, |_| {}).await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "gone", json!({"a": 1}))).await; // seq 1
    push_one(&mut c, "", put("todos", "kept", json!({"b": 1}))).await; // seq 2
    let tomb = push_one(&mut c, "", delete("todos", "gone"))
        .await
        .document
        .unwrap();
    assert_eq!(tomb.seq, 3);
    let old_checkpoint = 2;

    // Past history retention but not tombstone retention: still served.
    ahead.store(HOUR + 60, Ordering::Relaxed);
    let page = pull_page(&mut c, old_checkpoint).await;
    assert_eq!(page.documents.len(), 1);

    ahead.store(2 * HOUR + 60, Ordering::Relaxed);
    eventually(|| {
        let mut c = c.clone();
        async move { get(&mut c, "todos", "gone").await.is_none() }
    })
    .await;

    let err = c
        .pull(PullRequest {
            since: old_checkpoint,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_compacted(&err, 3);
    let err = c
        .subscribe(SubscribeRequest {
            since: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_compacted(&err, 3);

    // At or past the horizon, and from 0, everything still works.
    let page = pull_page(&mut c, 3).await;
    assert_eq!((page.documents.len(), page.checkpoint), (0, 3));
    let page = pull_page(&mut c, 0).await;
    let ids: Vec<_> = page.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["kept"],
        "the purged tombstone is gone from the log"
    );
    // A recreated document starts above the purge horizon (3): its history
    // is gone, and no version of its earlier life is reused.
    let again = push_one(
        &mut c,
        "",
        put("todos", "gone", json!({"new": true})).base(0),
    )
    .await;
    assert_eq!(again.document.unwrap().version, 4);

    // The horizon survives a restart.
    let s = s.restart().await;
    let mut c = s.client.clone();
    let err = c
        .pull(PullRequest {
            since: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_compacted(&err, 3);
}

/// Rule: an idle (filtered) subscriber's Progress messages carry the head, so
/// it can resume past a purge it had no stake in.
#[tokio::test]
async fn progress_moves_idle_subscribers_past_purges() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = server(&ahead, |c| c.heartbeat_interval = Duration::from_millis(50)).await;
    let mut c = s.client.clone();
    let req = SubscribeRequest {
        collections: vec!["quiet".into()],
        ..Default::default()
    };
    let mut stream = c.subscribe(req).await.unwrap().into_inner();
    push_one(&mut c, "", put("todos", "x", json!({}))).await;
    let tomb = push_one(&mut c, "", delete("todos", "x"))
        .await
        .document
        .unwrap();
    let mut checkpoint = 0;
    while checkpoint < tomb.seq {
        if let Some(pb::SubscribeResponse {
            event: Some(Event::Progress(p)),
        }) = stream.message().await.unwrap()
        {
            checkpoint = p.checkpoint;
        }
    }
    drop(stream);
    ahead.store(2 * HOUR + 60, Ordering::Relaxed);
    eventually(|| {
        let mut c = c.clone();
        async move {
            c.pull(PullRequest {
                since: 1,
                ..Default::default()
            })
            .await
            .is_err()
        }
    })
    .await;
    let req = SubscribeRequest {
        since: checkpoint,
        collections: vec!["quiet".into()],
        ..Default::default()
    };
    assert!(
        c.subscribe(req).await.is_ok(),
        "a checkpoint from Progress is past the horizon"
    );
}

/// Rule: a live subscriber that falls behind a purge gets OUT_OF_RANGE on
/// its stream instead of a silent gap.
#[tokio::test]
async fn lagging_subscriber_behind_a_purge_gets_out_of_range() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = server(&ahead, |c| {
        c.feed_capacity = 1;
        c.durability = deltasync::store::Durability::Buffered;
        // Catch-up pages of ~60 of the 1 KiB documents below, so the reader
        // cannot have read (into the server's send queue) up to the
        // tombstone before the purge, whenever the writes become durable.
        c.max_message_bytes = 64 * 1024;
        c.max_body_bytes = 16 * 1024;
        c.max_batch = 50;
    })
    .await;
    let mut c = s.client.clone();
    // A reader with a small receive window stops the server sending early.
    let mut slow = s.connect_small_window().await;
    let mut stream = open_stream(&mut slow, 0).await;
    assert!(matches!(
        stream.message().await.unwrap().unwrap().event,
        Some(Event::Progress(_))
    ));
    // 2 MB of filler: far more than the server queues for a reader that
    // does not read (about 200 KB was seen).
    let filler = "f".repeat(1024);
    for batch in 0..40 {
        let fill = (0..50)
            .map(|i| put("fill", &format!("{batch}-{i}"), json!({"f": filler})))
            .collect();
        push(&mut c, "", fill).await;
    }
    push_one(&mut c, "", put("todos", "x", json!({}))).await;
    let tomb = push_one(&mut c, "", delete("todos", "x"))
        .await
        .document
        .unwrap();
    ahead.store(2 * HOUR + 60, Ordering::Relaxed);
    eventually(|| {
        let mut c = c.clone();
        async move { get(&mut c, "todos", "x").await.is_none() }
    })
    .await;
    let mut last = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if let Some(Event::Changes(b)) = m.event {
                    last = b.checkpoint;
                }
            }
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert!(
        last < tomb.seq,
        "the reader was behind the purged tombstone"
    );
    assert_compacted(&status, tomb.seq);
}

/// Creates, deletes and purges one document after `n` others, so the purge
/// horizon (returned) is above the checkpoints of a paged pass from 0.
async fn purge_after(c: &mut Client, ahead: &Arc<AtomicU64>, n: usize) -> u64 {
    for start in (0..n).step_by(1000) {
        let batch = (start..n.min(start + 1000))
            .map(|i| put("todos", &i.to_string(), json!({})))
            .collect();
        push(c, "", batch).await;
    }
    push_one(c, "", put("todos", "gone", json!({}))).await;
    let tomb = push_one(c, "", delete("todos", "gone")).await;
    ahead.fetch_add(2 * HOUR + 60, Ordering::Relaxed);
    eventually(|| {
        let mut c = c.clone();
        async move { get(&mut c, "todos", "gone").await.is_none() }
    })
    .await;
    tomb.document.unwrap().seq
}

/// Rule: a pass that started from 0 after a purge pages through a store
/// whose purge horizon is above its pages: a page's checkpoint comes with
/// the horizon it is consistent with, and passing both back is accepted
/// (without the horizon, the checkpoint is refused as before: the client
/// may have seen a document whose deletion was purged). A purge during the
/// pass refuses the next page.
#[tokio::test]
async fn a_pass_from_zero_pages_past_an_older_purge() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = server(&ahead, |_| {}).await;
    let mut c = s.client.clone();
    let horizon = purge_after(&mut c, &ahead, 10).await;
    let page = |since, purge_horizon| PullRequest {
        since,
        purge_horizon,
        limit: 3,
        ..Default::default()
    };
    let first = c.pull(page(0, 0)).await.unwrap().into_inner();
    assert!(first.checkpoint < horizon && first.has_more);
    assert_eq!(first.purge_horizon, horizon);
    let err = c.pull(page(first.checkpoint, 0)).await.unwrap_err();
    assert_compacted(&err, horizon);
    let (mut since, mut seen, mut ids) = (0, 0, Vec::new());
    loop {
        let p = c.pull(page(since, seen)).await.unwrap().into_inner();
        ids.extend(p.documents.into_iter().map(|d| d.id));
        (since, seen) = (p.checkpoint, p.purge_horizon);
        if !p.has_more {
            break;
        }
    }
    assert_eq!(ids.len(), 10, "every live document, once: {ids:?}");

    // Another purge after this page: the pass must start again.
    let newer = purge_after(&mut c, &ahead, 0).await;
    let err = c
        .pull(page(first.checkpoint, first.purge_horizon))
        .await
        .unwrap_err();
    assert_compacted(&err, newer);
}

/// Rule: a Subscribe from 0 catches up, in pages, over a store whose purge
/// horizon is above its first pages, and its messages carry the horizon to
/// resume with.
#[tokio::test]
async fn a_subscribe_from_zero_catches_up_past_an_older_purge() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = server(&ahead, |_| {}).await;
    let mut c = s.client.clone();
    let horizon = purge_after(&mut c, &ahead, 2500).await;
    let mut stream = open_stream(&mut c, 0).await;
    let mut seen = 0;
    loop {
        match stream
            .message()
            .await
            .expect("no OUT_OF_RANGE")
            .unwrap()
            .event
        {
            Some(Event::Changes(b)) => {
                assert_eq!(b.purge_horizon, horizon);
                seen += b.documents.len();
            }
            Some(Event::Progress(p)) if p.caught_up => {
                assert_eq!(p.purge_horizon, horizon);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(seen, 2500);
}
