//! Push: versions, field-level conflicts, strategies, idempotency, atomicity.

mod common;

use common::*;
use deltasync::pb::{ConflictStrategy, Outcome, PushRequest};
use serde_json::json;

/// Rule: base_version 0 means "must not exist"; the second create conflicts
/// and reports the server's document without writing.
#[tokio::test]
async fn create_create_conflict() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let first = push_one(
        &mut c,
        "a",
        put("todos", "1", json!({"title": "A"})).base(0),
    )
    .await;
    assert_eq!(outcome(&first), Outcome::Applied);
    assert_eq!(first.document.as_ref().unwrap().version, 1);
    let second = push_one(
        &mut c,
        "b",
        put("todos", "1", json!({"title": "B"})).base(0),
    )
    .await;
    assert_eq!(outcome(&second), Outcome::Conflict);
    let doc = second.document.unwrap();
    assert_eq!((doc.version, json(&doc)), (1, json!({"title": "A"})));
    assert_eq!(get(&mut c, "todos", "1").await.unwrap().version, 1);
}

/// Rule: a stale base with disjoint field changes MERGES: A changes
/// `description` at version 2, B with base 2 changes `title` → version 4
/// with both changes.
#[tokio::test]
async fn stale_base_with_disjoint_fields_merges() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(
        &mut c,
        "",
        put("todos", "t", json!({"title": "t1", "description": "d1"})).base(0),
    )
    .await;
    let v2 = push_one(
        &mut c,
        "",
        patch("todos", "t", json!({"done": false})).base(1),
    )
    .await;
    assert_eq!(v2.document.unwrap().version, 2);
    let a = push_one(
        &mut c,
        "A",
        put(
            "todos",
            "t",
            json!({"title": "t1", "description": "dA", "done": false}),
        )
        .base(2),
    )
    .await;
    assert_eq!(
        (outcome(&a), a.document.unwrap().version),
        (Outcome::Applied, 3)
    );
    let b = push_one(
        &mut c,
        "B",
        patch("todos", "t", json!({"title": "tB"})).base(2),
    )
    .await;
    assert_eq!(outcome(&b), Outcome::Merged);
    let doc = b.document.unwrap();
    assert_eq!(doc.version, 4);
    assert_eq!(
        json(&doc),
        json!({"title": "tB", "description": "dA", "done": false})
    );
    assert_eq!(doc.updated_by, "B");
    assert!(b.conflicting_fields.is_empty());
}

async fn overlapping(
    strategy: ConflictStrategy,
) -> (deltasync::pb::MutationResult, deltasync::pb::Document) {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(
        &mut c,
        "",
        put("todos", "t", json!({"title": "t", "note": "n", "n": 1})).base(0),
    )
    .await;
    push_one(
        &mut c,
        "",
        patch("todos", "t", json!({"title": "server", "note": "server"})).base(1),
    )
    .await;
    let r = push_one(
        &mut c,
        "",
        patch(
            "todos",
            "t",
            json!({"note": "client", "title": "client", "n": 2}),
        )
        .base(1)
        .on_conflict(strategy),
    )
    .await;
    let now = get(&mut c, "todos", "t").await.unwrap();
    (r, now)
}

/// Rule: overlapping fields under REJECT → CONFLICT with the sorted overlap
/// and nothing written.
#[tokio::test]
async fn overlap_rejected() {
    let (r, now) = overlapping(ConflictStrategy::Reject).await;
    assert_eq!(outcome(&r), Outcome::Conflict);
    assert_eq!(r.conflicting_fields, vec!["note", "title"]);
    assert_eq!(r.document.unwrap().version, 2);
    assert_eq!(
        (now.version, json(&now)),
        (2, json!({"title": "server", "note": "server", "n": 1}))
    );
}

/// Rule: SERVER_WINS applies only the client's non-overlapping changes.
#[tokio::test]
async fn overlap_server_wins() {
    let (r, now) = overlapping(ConflictStrategy::ServerWins).await;
    assert_eq!(outcome(&r), Outcome::Resolved);
    assert_eq!(r.conflicting_fields, vec!["note", "title"]);
    assert_eq!(
        (now.version, json(&now)),
        (3, json!({"title": "server", "note": "server", "n": 2}))
    );
}

/// Rule: CLIENT_WINS applies all client changes on top of the server's.
#[tokio::test]
async fn overlap_client_wins() {
    let (r, now) = overlapping(ConflictStrategy::ClientWins).await;
    assert_eq!(outcome(&r), Outcome::Resolved);
    assert_eq!(
        (now.version, json(&now)),
        (3, json!({"title": "client", "note": "client", "n": 2}))
    );
}

/// Rule: without on_conflict, the collection's configured default applies,
/// else REJECT; on_conflict overrides the default.
#[tokio::test]
async fn collection_default_strategy_from_config() {
    let s = TestServer::start_with(|c| {
        c.conflict_strategy =
            deltasync::config::ConflictPolicy::parse("todos=client_wins,default=reject").unwrap();
    })
    .await;
    let mut c = s.client.clone();
    for coll in ["todos", "notes"] {
        push_one(&mut c, "", put(coll, "x", json!({"f": 0})).base(0)).await;
        push_one(&mut c, "", put(coll, "x", json!({"f": 1})).base(1)).await;
    }
    let todos = push_one(&mut c, "", put("todos", "x", json!({"f": 2})).base(1)).await;
    assert_eq!(outcome(&todos), Outcome::Resolved);
    let notes = push_one(&mut c, "", put("notes", "x", json!({"f": 2})).base(1)).await;
    assert_eq!(outcome(&notes), Outcome::Conflict);
    let forced = push_one(
        &mut c,
        "",
        put("todos", "x", json!({"f": 3}))
            .base(1)
            .on_conflict(ConflictStrategy::Reject),
    )
    .await;
    assert_eq!(outcome(&forced), Outcome::Conflict);
}

/// Rule: a stale delete conflicts with a server update, and a stale update
/// conflicts with a server delete; CLIENT_WINS may resurrect. A tombstone
/// keeps its version and a later create continues from it.
#[tokio::test]
async fn delete_versus_update() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(
        &mut c,
        "",
        put("todos", "d", json!({"title": "a", "keep": 1})).base(0),
    )
    .await;
    push_one(
        &mut c,
        "",
        patch("todos", "d", json!({"title": "b"})).base(1),
    )
    .await;
    let stale_delete = push_one(&mut c, "", delete("todos", "d").base(1)).await;
    assert_eq!(outcome(&stale_delete), Outcome::Conflict);
    assert_eq!(stale_delete.conflicting_fields, vec!["title"]);
    assert!(!get(&mut c, "todos", "d").await.unwrap().deleted);

    let deleted = push_one(&mut c, "", delete("todos", "d").base(2)).await;
    assert_eq!(outcome(&deleted), Outcome::Applied);
    let tomb = deleted.document.unwrap();
    assert!(tomb.deleted && tomb.body.is_none());
    assert_eq!(tomb.version, 3);

    let stale_update = push_one(
        &mut c,
        "",
        patch("todos", "d", json!({"title": "c"})).base(2),
    )
    .await;
    assert_eq!(outcome(&stale_update), Outcome::Conflict);
    assert!(get(&mut c, "todos", "d").await.unwrap().deleted);

    let resurrect = push_one(
        &mut c,
        "",
        patch("todos", "d", json!({"title": "c"}))
            .base(2)
            .on_conflict(ConflictStrategy::ClientWins),
    )
    .await;
    assert_eq!(outcome(&resurrect), Outcome::Resolved);
    let doc = resurrect.document.unwrap();
    assert_eq!(
        (doc.version, doc.deleted, json(&doc)),
        (4, false, json!({"title": "c", "keep": 1}))
    );

    push_one(&mut c, "", delete("todos", "d")).await;
    let recreate = push_one(&mut c, "", put("todos", "d", json!({"new": true})).base(0)).await;
    assert_eq!(
        (outcome(&recreate), recreate.document.unwrap().version),
        (Outcome::Applied, 6)
    );
}

/// Rule: base_version newer than the document is a CONFLICT.
#[tokio::test]
async fn base_ahead_of_document_conflicts() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "x", json!({})).base(0)).await;
    let r = push_one(&mut c, "", put("todos", "x", json!({"a": 1})).base(5)).await;
    assert_eq!(outcome(&r), Outcome::Conflict);
    let r = push_one(&mut c, "", put("todos", "missing", json!({"a": 1})).base(1)).await;
    assert_eq!(outcome(&r), Outcome::Conflict);
    assert!(get(&mut c, "todos", "missing").await.is_none());
}

/// Rule: without base_version a write is unconditional (last writer wins);
/// a patch null removes a field; every accepted change bumps version and seq.
#[tokio::test]
async fn unconditional_writes_and_patch_semantics() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let r1 = push_one(&mut c, "", put("todos", "x", json!({"a": 1, "b": 2}))).await;
    let r2 = push_one(
        &mut c,
        "",
        patch("todos", "x", json!({"b": null, "c": [1, "two"]})),
    )
    .await;
    let d1 = r1.document.unwrap();
    let d2 = r2.document.unwrap();
    assert_eq!(
        (d2.version, json(&d2)),
        (2, json!({"a": 1, "c": [1, "two"]}))
    );
    assert_eq!(d2.seq, d1.seq + 1);
    // An unconditional delete of a missing document is a no-op.
    let noop = push_one(&mut c, "", delete("todos", "nothing")).await;
    assert_eq!(outcome(&noop), Outcome::Applied);
    assert!(noop.document.is_none());
    assert!(get(&mut c, "todos", "nothing").await.is_none());
}

/// Rule: a retried mutation id is not applied again (DUPLICATE with the
/// current document); an id below the client's last one that was never
/// sent is not a retry, so it is applied (once).
#[tokio::test]
async fn duplicate_on_retried_mutation_id() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let first = push(
        &mut c,
        "phone",
        vec![patch("counters", "c", json!({"n": 1})).id(7)],
    )
    .await;
    assert_eq!(outcome(&first.results[0]), Outcome::Applied);
    assert_eq!(first.last_mutation_id, 7);
    let retry = push(
        &mut c,
        "phone",
        vec![patch("counters", "c", json!({"n": 1})).id(7)],
    )
    .await;
    assert_eq!(outcome(&retry.results[0]), Outcome::Duplicate);
    assert_eq!(retry.results[0].document.as_ref().unwrap().version, 1);
    let older = || {
        let mut c = c.clone();
        async move {
            push(
                &mut c,
                "phone",
                vec![put("counters", "c", json!({"n": 99})).id(3)],
            )
            .await
        }
    };
    let skipped = older().await;
    assert_eq!(outcome(&skipped.results[0]), Outcome::Applied);
    assert_eq!(skipped.last_mutation_id, 7);
    assert_eq!(outcome(&older().await.results[0]), Outcome::Duplicate);
    assert_eq!(get(&mut c, "counters", "c").await.unwrap().version, 2);
    // Another client's id space is separate; untracked (0) never dedups.
    let other = push(
        &mut c,
        "laptop",
        vec![patch("counters", "c", json!({"m": 1})).id(7)],
    )
    .await;
    assert_eq!(outcome(&other.results[0]), Outcome::Applied);
    let untracked = push(
        &mut c,
        "phone",
        vec![patch("counters", "c", json!({"k": 1}))],
    )
    .await;
    assert_eq!(
        (outcome(&untracked.results[0]), untracked.last_mutation_id),
        (Outcome::Applied, 7)
    );
}

/// Rule: atomic batches commit all or nothing: one CONFLICT makes the others
/// NOT_APPLIED, writes nothing (not even the client's mutation ids), and the
/// checkpoint does not move.
#[tokio::test]
async fn atomic_batch_with_one_conflict_writes_nothing() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let setup = push_one(&mut c, "", put("todos", "exists", json!({"v": 1}))).await;
    let head = setup.document.unwrap().seq;
    let req = PushRequest {
        client_id: "batcher".into(),
        atomic: true,
        mutations: vec![
            put("todos", "new", json!({"v": 1})).base(0).id(1),
            patch("todos", "exists", json!({"v": 2})).id(2),
            put("todos", "exists", json!({"v": 3})).base(0).id(3),
        ],
    };
    let resp = push_req(&mut c, req.clone()).await;
    let outcomes: Vec<_> = resp.results.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        vec![Outcome::NotApplied, Outcome::NotApplied, Outcome::Conflict]
    );
    assert_eq!((resp.checkpoint, resp.last_mutation_id), (head, 0));
    assert!(get(&mut c, "todos", "new").await.is_none());
    assert_eq!(get(&mut c, "todos", "exists").await.unwrap().version, 1);
    // Nothing was recorded, so the fixed batch with the same ids applies.
    let mut fixed = req;
    fixed.mutations.pop();
    let resp = push_req(&mut c, fixed).await;
    assert!(resp.results.iter().all(|r| outcome(r) == Outcome::Applied));
    assert_eq!((resp.checkpoint, resp.last_mutation_id), (head + 2, 2));
}

/// Rule: non-atomic batches apply each mutation on its own, results in
/// request order, later mutations seeing earlier ones.
#[tokio::test]
async fn non_atomic_batch_is_per_mutation() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let resp = push(
        &mut c,
        "",
        vec![
            put("todos", "a", json!({"n": 1})).base(0),
            put("todos", "a", json!({"n": 2})).base(0),
            patch("todos", "a", json!({"m": 1})).base(1),
        ],
    )
    .await;
    let outcomes: Vec<_> = resp.results.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        vec![Outcome::Applied, Outcome::Conflict, Outcome::Applied]
    );
    let doc = get(&mut c, "todos", "a").await.unwrap();
    assert_eq!((doc.version, json(&doc)), (2, json!({"n": 1, "m": 1})));
    assert_eq!(resp.checkpoint, doc.seq);
    assert!(!resp.store_id.is_empty());
}

/// Rule: a Push response never exceeds the message cap: once the echoed
/// bodies would not fit, results carry document metadata without the body.
#[tokio::test]
async fn push_response_fits_the_message_cap() {
    let s = TestServer::start_with(|c| {
        c.max_message_bytes = 64 * 1024;
        // Every result of a full batch must fit a message: 1024 bytes each.
        c.max_batch = c.max_batch.min(50);
        c.max_body_bytes = 40 * 1024;
    })
    .await;
    let mut c = s.client.clone();
    let big = "z".repeat(30 * 1024);
    let resp = push(
        &mut c,
        "",
        (0..6)
            .map(|i| put("blobs", &format!("{i}"), json!({"d": big})))
            .collect(),
    )
    .await;
    assert_eq!(resp.results.len(), 6);
    let with_body = resp
        .results
        .iter()
        .filter(|r| r.document.as_ref().unwrap().body.is_some())
        .count();
    assert!(
        (1..6).contains(&with_body),
        "some bodies echo, not all: {with_body}"
    );
    for (i, r) in resp.results.iter().enumerate() {
        let doc = r.document.as_ref().unwrap();
        assert_eq!(
            (outcome(r), doc.version, doc.seq, doc.deleted),
            (Outcome::Applied, 1, i as u64 + 1, false)
        );
    }
}
