//! Data rules: retries answer what really happened, atomic batches report
//! only committed state, create-only writes, versions across a purge, body
//! and response sizes, how shutdown ends streams, and how long clients are
//! remembered. Time is moved with an injected clock, not slept.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;
use deltasync::pb::{
    self, ConflictStrategy, Outcome, PullRequest, PushRequest, subscribe_response::Event,
};
use prost::Message;
use serde_json::{Map, Value, json};
use tonic::{Code, Status};

/// Guards against a hung stream or server; never reached when the rule holds.
const PATIENCE: Duration = Duration::from_secs(20);

fn outcomes(resp: &pb::PushResponse) -> Vec<Outcome> {
    resp.results.iter().map(outcome).collect()
}

/// A string of `len` bytes, to make bodies of a known size.
fn text(len: usize) -> String {
    "x".repeat(len)
}

fn assert_oversized(status: &Status, index: usize) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let needle = format!("mutations[{index}]");
    assert!(
        status.message().contains(&needle),
        "message {:?} should name {needle}",
        status.message()
    );
}

// Rule 1: retries return the truth.

/// Rule: in a non-atomic batch, a mutation answered CONFLICT is recorded as
/// rejected: the same request sent again answers it CONFLICT again (not
/// DUPLICATE) with the current committed document, while the mutations that
/// were applied or merged answer DUPLICATE and nothing is written again.
/// last_mutation_id counts rejected ids too.
#[tokio::test]
async fn retried_conflicts_answer_conflict_again() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "x", json!({"a": 1, "b": 1}))).await;
    push_one(&mut c, "", patch("todos", "x", json!({"a": "server"}))).await; // v2
    let req = PushRequest {
        client_id: "c".into(),
        atomic: false,
        mutations: vec![
            put("todos", "y", json!({"y": 1})).id(1),
            // Overlaps the server's change of `a`: rejected.
            patch("todos", "x", json!({"a": "client"})).base(1).id(2),
            // Base ahead of a missing document: rejected.
            put("todos", "w", json!({"w": 1})).base(7).id(3),
            // Disjoint from the server's change: merged (v3).
            patch("todos", "x", json!({"b": "client"})).base(1).id(4),
        ],
    };
    let first = push_req(&mut c, req.clone()).await;
    assert_eq!(
        outcomes(&first),
        [
            Outcome::Applied,
            Outcome::Conflict,
            Outcome::Conflict,
            Outcome::Merged
        ]
    );
    assert_eq!(
        first.last_mutation_id, 4,
        "the highest id processed, applied or rejected"
    );

    // The server moves on before the client retries.
    push_one(&mut c, "", patch("todos", "x", json!({"b": "server"}))).await; // v4
    let x = get(&mut c, "todos", "x").await.unwrap();
    let y = get(&mut c, "todos", "y").await.unwrap();
    assert_eq!(x.version, 4);

    let retry = push_req(&mut c, req).await;
    assert_eq!(
        outcomes(&retry),
        [
            Outcome::Duplicate,
            Outcome::Conflict,
            Outcome::Conflict,
            Outcome::Duplicate
        ],
        "a rejected mutation stays rejected; an applied one is a duplicate"
    );
    assert_eq!(
        retry.results[1].document.as_ref(),
        Some(&x),
        "a retried conflict reports the current committed document"
    );
    assert_eq!(retry.results[2].document, None, "w still does not exist");
    assert_eq!(
        (retry.last_mutation_id, retry.checkpoint),
        (4, x.seq),
        "the retry wrote nothing"
    );
    assert_eq!(get(&mut c, "todos", "x").await.as_ref(), Some(&x));
    assert_eq!(get(&mut c, "todos", "y").await.as_ref(), Some(&y));
    assert!(get(&mut c, "todos", "w").await.is_none());
}

/// Rule: deduplication remembers which ids were processed, not just the
/// highest: after id 10 is applied, id 9 (never sent before) is applied when
/// it comes and only then answers DUPLICATE; last_mutation_id stays the
/// highest id processed.
#[tokio::test]
async fn an_unseen_id_below_the_highest_is_applied() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let ten = push(
        &mut c,
        "c",
        vec![put("todos", "ten", json!({"n": 10})).id(10)],
    )
    .await;
    assert_eq!(
        (outcomes(&ten), ten.last_mutation_id),
        (vec![Outcome::Applied], 10)
    );

    let nine = push(
        &mut c,
        "c",
        vec![put("todos", "nine", json!({"n": 9})).id(9)],
    )
    .await;
    assert_eq!(
        outcomes(&nine),
        [Outcome::Applied],
        "id 9 was never processed, so it is applied"
    );
    assert_eq!(nine.last_mutation_id, 10, "the highest id processed");
    assert_eq!(get(&mut c, "todos", "nine").await.unwrap().version, 1);

    let again = push(
        &mut c,
        "c",
        vec![put("todos", "nine", json!({"n": 9})).id(9)],
    )
    .await;
    assert_eq!(outcomes(&again), [Outcome::Duplicate]);
    assert_eq!(
        get(&mut c, "todos", "nine").await.unwrap().version,
        1,
        "a duplicate writes nothing"
    );
    let again = push(
        &mut c,
        "c",
        vec![put("todos", "ten", json!({"n": 10})).id(10)],
    )
    .await;
    assert_eq!(outcomes(&again), [Outcome::Duplicate]);
    assert_eq!(last_mutation_id(&mut c, "c").await, 10);
}

// Rule 2: atomic batches.

/// Rule: in an atomic batch that conflicts, a resent mutation that was
/// already applied answers DUPLICATE (what really happened to it), not
/// NOT_APPLIED.
#[tokio::test]
async fn atomic_batch_reports_an_applied_id_as_duplicate() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let five = push_one(&mut c, "c", put("todos", "x", json!({"a": 1})).id(5)).await;
    assert_eq!(outcome(&five), Outcome::Applied);
    let x = get(&mut c, "todos", "x").await.unwrap();

    let req = PushRequest {
        client_id: "c".into(),
        atomic: true,
        mutations: vec![
            put("todos", "x", json!({"a": 1})).id(5),
            put("todos", "y", json!({"b": 1})).base(3).id(6),
        ],
    };
    let resp = push_req(&mut c, req).await;
    assert_eq!(
        outcomes(&resp),
        [Outcome::Duplicate, Outcome::Conflict],
        "id 5 was applied before this batch"
    );
    assert_eq!(resp.results[0].document.as_ref(), Some(&x));
    assert_eq!(get(&mut c, "todos", "x").await.as_ref(), Some(&x));
    assert!(get(&mut c, "todos", "y").await.is_none());
}

/// Rule: NOT_APPLIED does not consume the mutation id: after an atomic
/// batch [id 7, id 8 conflicting] answers [NOT_APPLIED, CONFLICT], id 7
/// alone is applied, and id 8 resent conflicts again.
#[tokio::test]
async fn not_applied_does_not_consume_the_id() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "c", put("todos", "x", json!({"a": 1})).id(5)).await;
    let z = || put("todos", "z", json!({"z": 1})).id(7);
    let conflicting = || put("todos", "missing", json!({})).base(3).id(8);
    let req = PushRequest {
        client_id: "c".into(),
        atomic: true,
        mutations: vec![z(), conflicting()],
    };
    let resp = push_req(&mut c, req).await;
    assert_eq!(outcomes(&resp), [Outcome::NotApplied, Outcome::Conflict]);
    assert!(get(&mut c, "todos", "z").await.is_none());

    let alone = push_one(&mut c, "c", z()).await;
    assert_eq!(
        outcome(&alone),
        Outcome::Applied,
        "id 7 was not consumed by the failed atomic batch"
    );
    assert_eq!(get(&mut c, "todos", "z").await.unwrap().version, 1);
    let resent = push_one(&mut c, "c", conflicting()).await;
    assert_eq!(outcome(&resent), Outcome::Conflict);
    assert!(get(&mut c, "todos", "missing").await.is_none());
}

// Rule 3: only committed state in answers.

/// Rule: an atomic batch that is rolled back answers with committed state
/// only: every result's document is the stored one (version, body, seq, as
/// Get returns it), and the checkpoint does not move; nothing of the
/// discarded plan shows.
#[tokio::test]
async fn rolled_back_atomic_batch_reports_committed_documents() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "x", json!({"a": 1}))).await;
    let committed = get(&mut c, "todos", "x").await.unwrap();
    assert_eq!(committed.version, 1);

    let req = PushRequest {
        client_id: String::new(),
        atomic: true,
        mutations: vec![
            put("todos", "x", json!({"b": 2})),
            patch("todos", "x", json!({"c": 3})).base(99),
        ],
    };
    let resp = push_req(&mut c, req).await;
    assert_eq!(outcomes(&resp), [Outcome::NotApplied, Outcome::Conflict]);
    for (i, r) in resp.results.iter().enumerate() {
        let doc = r.document.as_ref().expect("x exists");
        assert_eq!(
            (doc.version, json(doc), doc.seq),
            (1, json!({"a": 1}), committed.seq),
            "result {i} reports the committed document, not the rolled-back plan"
        );
        assert_eq!(doc, &committed, "result {i}");
    }
    assert_eq!(resp.checkpoint, committed.seq, "the head did not move");
    assert_eq!(get(&mut c, "todos", "x").await.as_ref(), Some(&committed));
}

// Rule 4: create-only writes.

/// Creates todos/x = {"a": 1}, pushes a create-only (base 0) put of
/// {"b": 2} on it under `strategy`, and returns its result and the document
/// afterwards.
async fn create_only_put_on_live(strategy: ConflictStrategy) -> (pb::MutationResult, pb::Document) {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "x", json!({"a": 1}))).await;
    let r = push_one(
        &mut c,
        "",
        put("todos", "x", json!({"b": 2}))
            .base(0)
            .on_conflict(strategy),
    )
    .await;
    let now = get(&mut c, "todos", "x").await.unwrap();
    (r, now)
}

/// Rule: base_version 0 on a live document counts as a pruned base (the
/// server changed every field): under REJECT (the default) a put or a patch
/// is a CONFLICT and nothing is written.
#[tokio::test]
async fn create_only_write_on_a_live_document_conflicts() {
    let (r, now) = create_only_put_on_live(ConflictStrategy::Unspecified).await;
    assert_eq!(outcome(&r), Outcome::Conflict);
    assert_eq!(
        r.conflicting_fields,
        ["a", "b"],
        "every field the put changes counts as changed by the server"
    );
    assert_eq!((now.version, json(&now)), (1, json!({"a": 1})));

    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "x", json!({"a": 1}))).await;
    let r = push_one(&mut c, "", patch("todos", "x", json!({"c": 3})).base(0)).await;
    assert_eq!(
        outcome(&r),
        Outcome::Conflict,
        "a create-only patch does not merge into a live document"
    );
    let now = get(&mut c, "todos", "x").await.unwrap();
    assert_eq!((now.version, json(&now)), (1, json!({"a": 1})));
}

/// Rule: base_version 0 on a live document under CLIENT_WINS is RESOLVED
/// and the put's body replaces the document.
#[tokio::test]
async fn create_only_put_on_a_live_document_client_wins() {
    let (r, now) = create_only_put_on_live(ConflictStrategy::ClientWins).await;
    assert_eq!(outcome(&r), Outcome::Resolved);
    assert_eq!((now.version, json(&now)), (2, json!({"b": 2})));
}

/// Rule: base_version 0 on a live document under SERVER_WINS is RESOLVED
/// and writes nothing (every field is the server's).
#[tokio::test]
async fn create_only_put_on_a_live_document_server_wins_writes_nothing() {
    let (r, now) = create_only_put_on_live(ConflictStrategy::ServerWins).await;
    assert_eq!(outcome(&r), Outcome::Resolved);
    assert_eq!((now.version, json(&now)), (1, json!({"a": 1})));
}

/// Rule: a tombstone still matches base_version 0: the create is APPLIED
/// and the version continues upward.
#[tokio::test]
async fn create_only_put_on_a_tombstone_applies() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "x", json!({"a": 1}))).await;
    push_one(&mut c, "", delete("todos", "x")).await; // v2
    let r = push_one(&mut c, "", put("todos", "x", json!({"b": 2})).base(0)).await;
    assert_eq!(outcome(&r), Outcome::Applied);
    let now = get(&mut c, "todos", "x").await.unwrap();
    assert_eq!(
        (now.version, now.deleted, json(&now)),
        (3, false, json!({"b": 2}))
    );
}

// Rule 5: versions are never reused across a purge.

/// Rule: a document created again after its tombstone was purged starts
/// above its old versions (unconditionally or with base 0), so a stale
/// mutation from its earlier life can never look current: an old patch
/// with base_version 1 is a CONFLICT under REJECT, not APPLIED.
#[tokio::test]
async fn versions_are_not_reused_after_a_purge() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = TestServer::start_with_clock(&ahead, |_| {}).await;
    let mut c = s.client.clone();
    for id in ["x", "y"] {
        push_one(&mut c, "", put("todos", id, json!({"life": 1})).base(0)).await; // v1
    }
    for id in ["x", "y"] {
        let tomb = push_one(&mut c, "", delete("todos", id)).await;
        assert_eq!(tomb.document.unwrap().version, 2);
    }
    ahead.store(2 * HOUR + 60, Ordering::Relaxed);
    eventually(|| {
        let mut c = c.clone();
        async move {
            get(&mut c, "todos", "x").await.is_none() && get(&mut c, "todos", "y").await.is_none()
        }
    })
    .await;

    let unconditional = push_one(&mut c, "", put("todos", "x", json!({"life": 2}))).await;
    let create_only = push_one(&mut c, "", put("todos", "y", json!({"life": 2})).base(0)).await;
    for (name, r) in [("unconditional", &unconditional), ("base 0", &create_only)] {
        assert_eq!(outcome(r), Outcome::Applied, "{name}");
        let version = r.document.as_ref().unwrap().version;
        assert!(
            version > 2,
            "{name}: a re-created document starts above its purged versions, got {version}"
        );
    }

    let x = get(&mut c, "todos", "x").await.unwrap();
    let old = push_one(
        &mut c,
        "",
        patch("todos", "x", json!({"old": true})).base(1),
    )
    .await;
    assert_eq!(
        outcome(&old),
        Outcome::Conflict,
        "a base from the earlier life is not the current version"
    );
    assert_eq!(get(&mut c, "todos", "x").await.as_ref(), Some(&x));
}

// Rule 6: no stored body exceeds --max-body-bytes.

/// Rule: patches that each fit may not together grow a body past
/// --max-body-bytes: the request fails whole with FAILED_PRECONDITION
/// naming the mutation, writes nothing (not even earlier mutations or the
/// client's ids), and the document stays readable at its last good version.
#[tokio::test]
async fn a_patch_growing_a_body_past_the_limit_fails_the_request() {
    let s = TestServer::start_with(|c| c.max_body_bytes = 4096).await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("docs", "big", json!({"f0": text(1500)}))).await;
    push_one(&mut c, "", patch("docs", "big", json!({"f1": text(1500)}))).await; // v2, ~3 KB
    let good = get(&mut c, "docs", "big").await.unwrap();
    assert_eq!(good.version, 2);

    let first = || put("docs", "other", json!({"ok": true})).id(1);
    let req = PushRequest {
        client_id: "c".into(),
        atomic: false,
        // The patch alone is ~1.5 KB, but the body would be ~4.5 KB.
        mutations: vec![
            first(),
            patch("docs", "big", json!({"f2": text(1500)})).id(2),
        ],
    };
    let status = push_refused(&mut c, req).await;
    assert_oversized(&status, 1);

    assert!(
        get(&mut c, "docs", "other").await.is_none(),
        "an earlier mutation of the refused request is not written"
    );
    assert_eq!(get(&mut c, "docs", "big").await.as_ref(), Some(&good));
    let page = c
        .pull(PullRequest {
            collections: vec!["docs".into()],
            ..Default::default()
        })
        .await
        .expect("pull still works")
        .into_inner();
    let versions: Vec<_> = page
        .documents
        .iter()
        .map(|d| (d.id.as_str(), d.version))
        .collect();
    assert_eq!(versions, [("big", 2)]);

    let resent = push_one(&mut c, "c", first()).await;
    assert_eq!(
        outcome(&resent),
        Outcome::Applied,
        "the refused request consumed no mutation id"
    );
    assert!(get(&mut c, "docs", "other").await.is_some());
}

/// Rule: a MERGE or a CLIENT_WINS resolution that would produce a body past
/// --max-body-bytes fails the request the same way, writing nothing.
#[tokio::test]
async fn a_merge_or_resolution_past_the_limit_fails_the_request() {
    let s = TestServer::start_with(|c| c.max_body_bytes = 4096).await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("docs", "big", json!({"a": text(2500)}))).await;
    push_one(&mut c, "", patch("docs", "big", json!({"b": "server"}))).await; // v2
    let good = get(&mut c, "docs", "big").await.unwrap();

    // Disjoint from the server's change of `b`: would merge to ~5 KB.
    let merge = patch("docs", "big", json!({"c": text(2500)})).base(1);
    // Overlaps `b`: the client's ~2.5 KB value would win, ~5 KB in all.
    let client_wins = patch("docs", "big", json!({"b": text(2500)}))
        .base(1)
        .on_conflict(ConflictStrategy::ClientWins);
    for (name, m) in [("merge", merge), ("client wins", client_wins)] {
        let req = PushRequest {
            client_id: String::new(),
            atomic: false,
            mutations: vec![m],
        };
        let status = push_refused(&mut c, req).await;
        assert_oversized(&status, 0);
        assert_eq!(
            get(&mut c, "docs", "big").await.as_ref(),
            Some(&good),
            "{name}: nothing written"
        );
    }
}

/// Rule: a stored document that no longer fits a message (the limits were
/// lowered after it was written) is reported as RESOURCE_EXHAUSTED naming
/// it, by Pull, Subscribe and Get alike, never OUT_OF_RANGE (which tells a
/// client to resync from 0 and would loop it forever).
#[tokio::test]
async fn a_document_over_the_message_cap_is_never_out_of_range() {
    let mut s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("docs", "large", json!({"a": text(40_000)}))).await;
    s.config.max_message_bytes = 32 * 1024;
    s.config.max_body_bytes = 16 * 1024;
    s.config.max_batch = 10;
    let s = s.restart().await;
    let mut c = s.client.clone();
    let exhausted = |status: Status, call: &str| {
        assert_eq!(status.code(), Code::ResourceExhausted, "{call}: {status:?}");
        assert!(
            status.message().contains("docs/large"),
            "{call}: {status:?}"
        );
    };
    let pulled = c.pull(PullRequest::default()).await.unwrap_err();
    exhausted(pulled, "Pull");
    let mut stream = open_stream(&mut c, 0).await;
    let streamed = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the stream answers")
        .unwrap_err();
    exhausted(streamed, "Subscribe");
    let got = c
        .get(pb::GetRequest {
            collection: "docs".into(),
            ids: vec!["large".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::ResourceExhausted, "Get: {got:?}");
}

// Rule 7: Push answers always fit.

/// A ~60-character field name; zero-padded so names sort by `i`.
fn long_name(i: usize) -> String {
    format!("field_{i:03}_{}", "n".repeat(50))
}

/// A body with every long field set to `value`.
fn wide_body(value: u64) -> Value {
    let fields: Map<String, Value> = (0..100).map(|i| (long_name(i), json!(value))).collect();
    Value::Object(fields)
}

/// Rule: a Push answer always fits --max-message-bytes, whatever the
/// conflicts: results keep their order and outcome, a conflicting_fields
/// list that had to be cut says so (conflicting_fields_truncated), an uncut
/// one is complete and sorted, and a document whose body did not fit keeps
/// its metadata. Small answers are whole.
#[tokio::test]
async fn push_answers_with_many_long_conflicts_fit_the_cap() {
    const CAP: usize = 256 * 1024;
    let s = TestServer::start_with(|c| {
        c.max_message_bytes = CAP;
        c.max_body_bytes = 16 * 1024;
        c.max_batch = 200;
    })
    .await;
    let mut c = s.client.clone();
    let ids: Vec<String> = (0..200).map(|i| format!("doc-{i:03}")).collect();
    // Set up in small pushes, so that only the stale push has a big answer:
    // v1, then v2 where the server changed every field.
    for value in [0, 1] {
        for chunk in ids.chunks(20) {
            let puts = chunk.iter().map(|id| put("wide", id, wide_body(value)));
            push(&mut c, "", puts.collect()).await;
        }
    }

    let stale = ids
        .iter()
        .zip(1..)
        .map(|(id, mutation_id)| put("wide", id, wide_body(2)).base(1).id(mutation_id));
    let req = PushRequest {
        client_id: "bulk".into(),
        atomic: false,
        mutations: stale.collect(),
    };
    let resp = c
        .push(req)
        .await
        .expect("a push whose answer is large still succeeds")
        .into_inner();
    assert!(
        resp.encoded_len() <= CAP,
        "the answer is {} bytes, over the {CAP}-byte cap",
        resp.encoded_len()
    );
    assert_eq!(resp.results.len(), 200);

    let all_fields: Vec<String> = (0..100).map(long_name).collect();
    let (mut cut, mut without_body) = (0, 0);
    for ((r, id), mutation_id) in resp.results.iter().zip(&ids).zip(1u64..) {
        assert_eq!(r.mutation_id, mutation_id, "results in request order");
        assert_eq!(outcome(r), Outcome::Conflict, "{id}");
        let doc = r
            .document
            .as_ref()
            .expect("a conflict reports the document");
        assert_eq!(
            (doc.id.as_str(), doc.version, doc.deleted),
            (id.as_str(), 2, false),
            "{id}"
        );
        assert!(doc.seq > 0 && doc.seq <= resp.checkpoint, "{id}: seq set");
        match doc.body {
            Some(_) => assert_eq!(json(doc), wide_body(1), "{id}"),
            None => without_body += 1,
        }
        if r.conflicting_fields_truncated {
            cut += 1;
            assert!(
                r.conflicting_fields.len() < all_fields.len()
                    && r.conflicting_fields.iter().all(|f| all_fields.contains(f)),
                "{id}: a cut list is a part of the conflicting fields"
            );
        } else {
            assert_eq!(
                r.conflicting_fields, all_fields,
                "{id}: an uncut list is complete and sorted"
            );
        }
    }
    assert!(cut > 0, "~1.2 MB of field names cannot all fit");
    assert!(without_body > 0, "~1.5 MB of bodies cannot all fit");

    // A small answer is whole.
    push_one(&mut c, "", put("todos", "small", json!({"t": 0}))).await;
    push_one(&mut c, "", put("todos", "small", json!({"t": 1}))).await;
    let r = push_one(&mut c, "", put("todos", "small", json!({"t": 2})).base(1)).await;
    assert_eq!(outcome(&r), Outcome::Conflict);
    assert_eq!(
        (
            r.conflicting_fields.as_slice(),
            r.conflicting_fields_truncated
        ),
        (["t".to_string()].as_slice(), false)
    );
    assert_eq!(json(r.document.as_ref().unwrap()), json!({"t": 1}));
}

// Rule 13: shutdown ends streams with UNAVAILABLE.

/// Rule: a graceful shutdown ends open Subscribe streams with UNAVAILABLE
/// (retry elsewhere or later), not with a clean end that reads as "done".
#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let mut s = TestServer::start().await;
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "x", json!({}))).await;
    let mut stream = open_stream(&mut c, 0).await;
    loop {
        let msg = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("a message in time")
            .expect("stream ok")
            .expect("stream open");
        if let Some(Event::Progress(p)) = msg.event
            && p.caught_up
        {
            break;
        }
    }

    let end_of_stream = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    };
    let ((), end) = tokio::time::timeout(PATIENCE, async { tokio::join!(s.stop(), end_of_stream) })
        .await
        .expect("the server stops and the stream ends");
    let status = end.expect("the stream ends with an error status, not a clean end");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

// Rule 14: clients are forgotten after --client-retention.

/// Rule: a client not seen for --client-retention is forgotten (its
/// last_mutation_id reads 0 and its old ids apply again), while a client
/// seen recently is kept.
#[tokio::test]
async fn clients_are_forgotten_after_client_retention() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = TestServer::start_with_clock(&ahead, |c| {
        c.client_retention = Duration::from_secs(3 * HOUR);
    })
    .await;
    let mut c = s.client.clone();
    let old = push_one(&mut c, "old", put("todos", "o", json!({"n": 1})).id(5)).await;
    assert_eq!(outcome(&old), Outcome::Applied);
    push_one(&mut c, "fresh", put("todos", "f", json!({"n": 1})).id(7)).await;

    ahead.store(4 * HOUR, Ordering::Relaxed);
    let seen = push_one(&mut c, "fresh", patch("todos", "f", json!({"n": 2})).id(8)).await;
    assert_eq!(outcome(&seen), Outcome::Applied);
    eventually(|| {
        let mut c = c.clone();
        async move { last_mutation_id(&mut c, "old").await == 0 }
    })
    .await;
    assert_eq!(
        last_mutation_id(&mut c, "fresh").await,
        8,
        "a client seen recently is kept"
    );

    let again = push_one(&mut c, "old", put("todos", "o", json!({"n": 1})).id(5)).await;
    assert_eq!(
        outcome(&again),
        Outcome::Applied,
        "a forgotten client's ids apply again"
    );
    assert_eq!(get(&mut c, "todos", "o").await.unwrap().version, 2);
}
