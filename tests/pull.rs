//! Pull: pages from a checkpoint, filters, store identity, size cap.

mod common;

use std::collections::HashMap;

use common::*;
use deltasync::pb::PullRequest;
use serde_json::json;
use tonic::Code;

async fn pull_all(
    c: &mut Client,
    since: u64,
    collections: &[&str],
    limit: u32,
) -> (Vec<deltasync::pb::Document>, u64, usize) {
    let mut docs = Vec::new();
    let mut checkpoint = since;
    let mut pages = 0;
    loop {
        let req = PullRequest {
            since: checkpoint,
            collections: collections.iter().map(|s| s.to_string()).collect(),
            limit,
            ..Default::default()
        };
        let page = c.pull(req).await.expect("pull").into_inner();
        pages += 1;
        assert!(page.documents.len() <= limit as usize);
        assert!(page.checkpoint >= checkpoint, "checkpoints never go back");
        for d in &page.documents {
            assert!(
                d.seq > checkpoint && d.seq <= page.checkpoint,
                "documents lie in (since, checkpoint]"
            );
        }
        docs.extend(page.documents);
        checkpoint = page.checkpoint;
        if !page.has_more {
            return (docs, checkpoint, pages);
        }
    }
}

/// Rule: paging with filters visits every matching document exactly once,
/// at its latest state (tombstones included), in seq order, and the final
/// checkpoint is the head even when the last changes did not match.
#[tokio::test]
async fn pagination_with_filters_visits_every_document_once() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    for i in 0..60 {
        let coll = ["todos", "notes", "other"][i % 3];
        push_one(&mut c, "", put(coll, &format!("d{i}"), json!({"i": i}))).await;
    }
    // Move some documents forward in the index, delete one.
    for i in [0, 1, 4, 30] {
        let coll = ["todos", "notes", "other"][i % 3];
        push_one(
            &mut c,
            "",
            patch(coll, &format!("d{i}"), json!({"touched": true})),
        )
        .await;
    }
    push_one(&mut c, "", delete("notes", "d7")).await;
    let last = push_one(&mut c, "", put("other", "tail", json!({}))).await;
    let head = last.document.unwrap().seq;

    let (docs, checkpoint, pages) = pull_all(&mut c, 0, &["todos", "notes"], 7).await;
    assert_eq!(
        checkpoint, head,
        "filtered pulls advance past non-matching changes"
    );
    assert!(pages >= 6);
    let mut seen: HashMap<String, u64> = HashMap::new();
    for d in &docs {
        assert!(d.collection == "todos" || d.collection == "notes");
        assert!(
            seen.insert(format!("{}/{}", d.collection, d.id), d.version)
                .is_none(),
            "{} twice",
            d.id
        );
    }
    assert_eq!(seen.len(), 40);
    assert!(docs.windows(2).all(|w| w[0].seq < w[1].seq), "seq order");
    assert_eq!(seen["todos/d0"], 2);
    assert_eq!(seen["notes/d7"], 2);
    assert!(docs.iter().find(|d| d.id == "d7").unwrap().deleted);

    // From a mid checkpoint, only later changes come back.
    let (later, _, _) = pull_all(&mut c, head - 2, &[], 100).await;
    let ids: Vec<_> = later.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, vec!["d7", "tail"]);
}

/// Rule: limit 0 uses the default page size and the server caps large limits.
#[tokio::test]
async fn limit_defaults_and_caps() {
    let s = TestServer::start_with(|c| c.pull_max_limit = 5).await;
    let mut c = s.client.clone();
    let mutations = (0..12)
        .map(|i| put("todos", &format!("{i}"), json!({})))
        .collect();
    push(&mut c, "", mutations).await;
    let page = c
        .pull(PullRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (page.documents.len(), page.has_more, page.checkpoint),
        (5, true, 5)
    );
    let page = pull_page(&mut c, 5).await;
    assert_eq!(
        (page.documents.len(), page.has_more, page.checkpoint),
        (5, true, 10)
    );
}

/// Rule: Pull returns the client's last mutation id and the store id; a
/// foreign store id is FAILED_PRECONDITION and a checkpoint past the head is
/// OUT_OF_RANGE.
#[tokio::test]
async fn store_identity_and_client_progress() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let resp = push(&mut c, "app", vec![put("todos", "1", json!({})).id(41)]).await;
    let page = c
        .pull(PullRequest {
            client_id: "app".into(),
            store_id: resp.store_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (page.last_mutation_id, page.store_id.as_str()),
        (41, resp.store_id.as_str())
    );

    let err = c
        .pull(PullRequest {
            store_id: "another-store".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("resync from 0"), "{}", err.message());

    let err = c
        .pull(PullRequest {
            since: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}

/// Rule: a page never exceeds the message cap: it is cut after the last
/// document that fits, and the next page resumes there without a gap.
#[tokio::test]
async fn pages_are_cut_to_the_message_cap() {
    let s = TestServer::start_with(|c| {
        c.max_message_bytes = 64 * 1024;
        // Every result of a full batch must fit a message: 1024 bytes each.
        c.max_batch = c.max_batch.min(50);
        c.max_body_bytes = 40 * 1024;
    })
    .await;
    let mut c = s.client.clone();
    let big = "x".repeat(30 * 1024);
    for i in 0..8 {
        push_one(
            &mut c,
            "",
            put("blobs", &format!("{i}"), json!({"data": big})),
        )
        .await;
    }
    let first = pull_page(&mut c, 0).await;
    assert_eq!(
        first.documents.len(),
        1,
        "two 30 KiB documents do not fit in 60 KiB"
    );
    assert!(first.has_more);
    let (docs, checkpoint, pages) = pull_all(&mut c, 0, &[], 1000).await;
    assert_eq!((docs.len(), checkpoint, pages), (8, 8, 8));
}

/// Rule: a Pull reflects every commit made before it, even though the
/// server reads the next page ahead: a page read before a write is not
/// served after it (here the rewritten document must leave the page and come
/// back later at its new seq and version).
#[tokio::test]
async fn a_page_read_ahead_is_not_served_after_a_write() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    for id in ["a", "b", "c", "d", "e"] {
        push_one(&mut c, "", put("todos", id, json!({"v": 1}))).await;
    }
    let page = |since| PullRequest {
        since,
        limit: 2,
        ..Default::default()
    };
    for round in 0..20 {
        let first = c.pull(page(0)).await.expect("pull").into_inner();
        assert_eq!(first.checkpoint, 2, "a and b never change");
        // The server now reads (checkpoint, head] ahead; rewrite "c" in it.
        push_one(&mut c, "", put("todos", "c", json!({"v": round + 2}))).await;
        let next = c
            .pull(page(first.checkpoint))
            .await
            .expect("pull")
            .into_inner();
        let ids: Vec<&str> = next.documents.iter().map(|d| d.id.as_str()).collect();
        assert!(
            !ids.contains(&"c"),
            "round {round}: stale c served: {ids:?}"
        );
        let (rest, _, _) = pull_all(&mut c, first.checkpoint, &[], 2).await;
        let c_doc = rest.iter().find(|d| d.id == "c").expect("c comes later");
        assert_eq!(json(c_doc), json!({"v": round + 2}));
    }
}

/// Rule: big pages keep the same guarantees (and rounds of skipped entries):
/// every matching document exactly once, at its latest version, in seq
/// order, with rewritten documents skipped at their old entry.
#[tokio::test]
async fn big_pages_visit_every_document_once_in_order() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let colls = ["todos", "notes", "other"];
    for chunk in 0..3 {
        let mutations = (chunk * 500..(chunk + 1) * 500)
            .map(|i| put(colls[i % 3], &format!("d{i}"), json!({"i": i})))
            .collect();
        push(&mut c, "", mutations).await;
    }
    let rewritten: Vec<usize> = (0..1500).step_by(7).collect();
    let mutations = rewritten
        .iter()
        .map(|&i| patch(colls[i % 3], &format!("d{i}"), json!({"again": true})))
        .collect();
    let out = push(&mut c, "", mutations).await;
    let (docs, checkpoint, pages) = pull_all(&mut c, 0, &["todos", "notes"], 400).await;
    assert_eq!(checkpoint, out.checkpoint, "ends at the head");
    assert!(pages >= 3, "{pages} pages");
    assert!(docs.windows(2).all(|w| w[0].seq < w[1].seq), "seq order");
    let mut seen: HashMap<String, u64> = HashMap::new();
    for d in &docs {
        assert_ne!(d.collection, "other");
        let twice = seen.insert(d.id.clone(), d.version).is_some();
        assert!(!twice, "{} twice", d.id);
    }
    assert_eq!(seen.len(), 1000);
    for i in (0..1500).filter(|i| i % 3 != 2) {
        let want = if i % 7 == 0 { 2 } else { 1 };
        assert_eq!(seen[&format!("d{i}")], want, "d{i}");
    }
}
