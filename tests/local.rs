//! Local replicas (`deltasync::replica`) against a real server: offline
//! writes, exactly-once pushes, conflicts by resolver, convergence, resync;
//! and `deltasync local` from the shell.

mod common;

use std::{path::Path, time::Duration};

use common::{
    TestServer,
    local::{ok, run, server_view, view},
};
use deltasync::{
    client::{Client, RetryPolicy},
    pb,
    replica::{LocalOp, LocalReplica, ReplicaError, ReplicaOptions, Resolution, Resolver},
};
use serde_json::{Map, Value, json};

fn url(s: &TestServer) -> String {
    format!("http://{}", s.addr)
}

/// An endpoint nobody listens on (bound, then released).
async fn dead_endpoint() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// Short retries: an unreachable server fails a sync in well under a
/// second.
fn quick(b: deltasync::client::ClientBuilder) -> deltasync::client::ClientBuilder {
    b.retry(RetryPolicy {
        max_elapsed: Duration::from_millis(300),
        ..RetryPolicy::default()
    })
    .connect_timeout(Duration::from_millis(300))
}

fn init(dir: &Path, endpoint: &str, collections: &[(&str, Resolver)]) -> LocalReplica {
    let options = collections
        .iter()
        .fold(ReplicaOptions::new([endpoint]), |o, (c, r)| {
            o.collection(*c, *r)
        });
    LocalReplica::init(dir, options, quick).expect("init")
}

fn body(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// Rule: a local write is in the outbox, durable, when the call returns,
/// whether the server is reachable or not; a failed sync keeps it; it
/// survives a reopen (a restarted process) with its mutation id; once the
/// server is reachable one sync pushes it and the view is the server's.
#[tokio::test(flavor = "multi_thread")]
async fn offline_writes_survive_a_restart_and_are_pushed_when_the_server_returns() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dead_endpoint().await;
    let r = init(dir.path(), &dead, &[("todos", Resolver::Manual)]);
    let d = r
        .put("todos", "milk", json!({"title": "Buy milk", "done": false}))
        .unwrap();
    assert!(d.pending);
    r.patch("todos", "milk", json!({"done": true})).unwrap();
    r.put("todos", "bread", json!({"title": "Bread"})).unwrap();
    r.delete("todos", "bread").unwrap();
    let err = r.sync().await.expect_err("no server");
    assert!(matches!(err, ReplicaError::Client(_)), "{err}");
    let before = r.pending().unwrap();
    assert_eq!(
        before.iter().map(|p| p.mutation_id).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let view_before = view(&r, "todos");
    drop(r);

    let r = LocalReplica::open(dir.path(), quick).expect("reopen");
    assert_eq!(r.pending().unwrap(), before, "the outbox survives a reopen");
    assert_eq!(view(&r, "todos"), view_before);
    let milk = r.get("todos", "milk").unwrap().unwrap();
    assert_eq!(
        milk.document.body,
        Some(body(json!({"title": "Buy milk", "done": true})))
    );
    assert!(r.get("todos", "bread").unwrap().unwrap().document.deleted);
    // Writes go on while offline, after the reopen too.
    r.patch("todos", "milk", json!({"note": "2 l"})).unwrap();

    let s = TestServer::start().await;
    r.set_endpoints([url(&s)]).unwrap();
    drop(r);
    let r = LocalReplica::open(dir.path(), quick).unwrap();
    let report = r.sync().await.expect("sync");
    assert_eq!(report.acknowledged, 5);
    assert_eq!(
        (report.parked, report.resolved, report.remaining),
        (0, 0, 0)
    );
    assert!(r.pending().unwrap().is_empty());
    assert_eq!(view(&r, "todos"), server_view(&url(&s), "todos").await);
    let milk = r.get("todos", "milk").unwrap().unwrap();
    assert!(!milk.pending);
    // Three writes, based on each other: versions 1, 2, 3, no conflict.
    assert_eq!(milk.document.version, 3);
    assert_eq!(
        milk.document.body,
        Some(body(
            json!({"title": "Buy milk", "done": true, "note": "2 l"})
        ))
    );
}

/// Rule: a push whose answer was lost is sent again with the same client
/// id and mutation ids, answered DUPLICATE, and applied once; the writes
/// made on top of it move to the version it produced and are applied
/// without conflict.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_whose_answer_was_lost_is_applied_once() {
    let s = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &url(&s), &[("todos", Resolver::Manual)]);
    r.put("todos", "milk", json!({"title": "Buy milk"}))
        .unwrap();
    r.patch("todos", "milk", json!({"done": true})).unwrap();
    // The first attempt of the first write reaches the server; its answer
    // never comes back (the process died before recording it).
    let first = r.pending().unwrap().remove(0);
    let LocalOp::Put(put) = &first.entry.op else {
        panic!("a put")
    };
    let mut raw = s.connect().await;
    let answer = common::push(
        &mut raw,
        r.client_id(),
        vec![pb::Mutation {
            mutation_id: first.mutation_id,
            collection: "todos".into(),
            id: "milk".into(),
            base_version: Some(first.entry.base_version),
            op: Some(pb::mutation::Op::Put(common::body(Value::Object(
                put.clone(),
            )))),
            on_conflict: pb::ConflictStrategy::Reject.into(),
        }],
    )
    .await;
    assert_eq!(common::outcome(&answer.results[0]), pb::Outcome::Applied);

    let report = r.sync().await.expect("sync");
    assert_eq!((report.acknowledged, report.parked), (2, 0));
    let server = common::get(&mut raw, "todos", "milk").await.unwrap();
    // Applied once (version 1), then the patch on top (version 2).
    assert_eq!(server.version, 2);
    assert_eq!(
        common::json(&server),
        json!({"title": "Buy milk", "done": true})
    );
    assert_eq!(common::last_mutation_id(&mut raw, r.client_id()).await, 2);
    assert_eq!(view(&r, "todos"), server_view(&url(&s), "todos").await);
    // A second sync sends nothing.
    assert_eq!(r.sync().await.unwrap().pushed, 0);
}

/// Rule: a write answered CONFLICT goes to its collection's resolver:
/// keep-server drops it; keep-local sends it again against the server's
/// version under a new mutation id; manual parks it, listed with base
/// (the common ancestor), mine and theirs, still in the view, holding the
/// document's later writes, until `resolve` (or a merge callback) settles
/// it; then the held writes follow, based on the resolution.
#[tokio::test(flavor = "multi_thread")]
async fn conflicts_go_to_each_collections_resolver() {
    let s = TestServer::start().await;
    let server = Client::connect([url(&s)]).unwrap();
    let collections = [
        ("server", Resolver::KeepServer),
        ("local", Resolver::KeepLocal),
        ("manual", Resolver::Manual),
        ("merged", Resolver::Manual),
    ];
    for (c, _) in collections {
        server
            .put(c, "x", json!({"title": "orig", "n": 0}))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &url(&s), &collections);
    r.set_merge("merged", |c| {
        let theirs = c
            .server
            .as_ref()?
            .body
            .as_ref()?
            .get("title")?
            .as_str()?
            .to_owned();
        let mine = c.local.as_ref()?.get("title")?.as_str()?.to_owned();
        let mut merged = c.server.as_ref()?.body.clone()?;
        merged.insert("title".into(), json!(format!("{mine}+{theirs}")));
        Some(Resolution::Merged(merged))
    });
    r.sync().await.unwrap();
    for (c, _) in collections {
        r.patch(c, "x", json!({"title": "mine"})).unwrap();
        server
            .patch(c, "x", json!({"title": "theirs"}))
            .await
            .unwrap();
    }
    let rejected = r
        .pending()
        .unwrap()
        .iter()
        .find(|p| p.entry.collection == "local")
        .unwrap()
        .mutation_id;

    let report = r.sync().await.unwrap();
    assert_eq!((report.resolved, report.parked), (3, 1), "{report:?}");
    let title = |d: &Option<Map<String, Value>>| d.as_ref().unwrap()["title"].clone();
    let server_doc = |c: &'static str| {
        let server = server.clone();
        async move { server.get(c, ["x"]).await.unwrap().remove(0) }
    };
    assert_eq!(title(&server_doc("server").await.body), "theirs");
    assert_eq!(title(&server_doc("local").await.body), "mine");
    assert_eq!(title(&server_doc("merged").await.body), "mine+theirs");
    assert_eq!(title(&server_doc("manual").await.body), "theirs");
    // The kept write went out under a new id, above the rejected one.
    assert!(common::last_mutation_id(&mut s.connect().await, r.client_id()).await > rejected);
    for c in ["server", "local", "merged"] {
        assert_eq!(view(&r, c), server_view(&url(&s), c).await, "{c}");
    }

    // Manual: parked with both sides, still in the view.
    let conflicts = r.conflicts().unwrap();
    assert_eq!(conflicts.len(), 1);
    let c = &conflicts[0];
    assert_eq!((c.collection.as_str(), c.id.as_str()), ("manual", "x"));
    assert_eq!(c.base, Some(body(json!({"title": "orig", "n": 0}))));
    assert_eq!(c.local, Some(body(json!({"title": "mine", "n": 0}))));
    assert_eq!(
        c.server.as_ref().unwrap().body,
        Some(body(json!({"title": "theirs", "n": 0})))
    );
    assert_eq!(c.conflicting_fields, ["title"]);
    let shown = r.get("manual", "x").unwrap().unwrap();
    assert!(shown.pending);
    assert_eq!(title(&shown.document.body), "mine");
    // A later write of the document is held behind the conflict.
    r.patch("manual", "x", json!({"n": 1})).unwrap();
    let report = r.sync().await.unwrap();
    assert_eq!((report.pushed, report.remaining), (0, 2));
    assert!(r.pending().unwrap().iter().all(|p| p.held));
    assert_eq!(server_doc("manual").await.version, 2);

    let resolved = r
        .resolve(
            "manual",
            "x",
            Resolution::Merged(body(json!({"title": "by hand"}))),
        )
        .unwrap();
    assert!(resolved.pending);
    assert!(r.conflicts().unwrap().is_empty());
    assert!(matches!(
        r.resolve("manual", "x", Resolution::KeepServer),
        Err(ReplicaError::NoConflict { .. })
    ));
    let report = r.sync().await.unwrap();
    assert_eq!(
        (report.acknowledged, report.parked, report.remaining),
        (2, 0, 0)
    );
    let doc = server_doc("manual").await;
    assert_eq!(doc.body, Some(body(json!({"title": "by hand", "n": 1}))));
    assert_eq!(view(&r, "manual"), server_view(&url(&s), "manual").await);
}

/// Rule: two replicas that write offline (the same documents included)
/// converge, after syncing in turn, to the server's Pull from 0, every
/// write accounted for: disjoint fields merge, overlapping ones follow the
/// resolver (keep-local here: the last to sync wins), including a write
/// based on an earlier one of its replica that the server merged with a
/// foreign change of the same field.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_converge_to_the_servers_pull_from_0() {
    let s = TestServer::start().await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let r1 = init(d1.path(), &url(&s), &[("todos", Resolver::KeepLocal)]);
    let r2 = init(d2.path(), &url(&s), &[("todos", Resolver::KeepLocal)]);
    r1.put("todos", "milk", json!({"title": "Buy milk", "done": false}))
        .unwrap();
    r1.sync().await.unwrap();
    r2.sync().await.unwrap();
    assert_eq!(view(&r2, "todos"), server_view(&url(&s), "todos").await);

    // Both write without syncing.
    r1.patch("todos", "milk", json!({"done": true})).unwrap();
    r1.put("todos", "eggs", json!({"title": "Eggs"})).unwrap();
    r1.patch("todos", "eggs", json!({"count": 6})).unwrap();
    r2.patch("todos", "milk", json!({"title": "Buy oat milk"}))
        .unwrap();
    r2.patch("todos", "milk", json!({"done": "later"})).unwrap();
    r2.put("todos", "bread", json!({"title": "Bread"})).unwrap();
    r2.delete("todos", "bread").unwrap();

    let a = r1.sync().await.unwrap();
    let b = r2.sync().await.unwrap();
    let a2 = r1.sync().await.unwrap();
    assert_eq!(a.acknowledged + b.acknowledged + a2.acknowledged, 7);
    // r2's second patch of "done" was made on top of its first, which the
    // server merged with r1's "done": it never saw r1's, so it conflicts
    // (and keep-local sends it again) instead of overwriting it silently.
    assert_eq!((a.resolved, b.resolved, a2.resolved), (0, 1, 0));
    let expected = server_view(&url(&s), "todos").await;
    assert_eq!(view(&r1, "todos"), expected);
    assert_eq!(view(&r2, "todos"), expected);
    let milk = r1
        .get("todos", "milk")
        .unwrap()
        .unwrap()
        .document
        .body
        .unwrap();
    // r2's title merged with r1's done; the overlap on done went to r2,
    // the last to push (keep-local).
    assert_eq!(
        milk,
        body(json!({"title": "Buy oat milk", "done": "later"}))
    );
}

/// Rule: when the server is replaced by another store (a new store id),
/// the next sync rebuilds the base from a Pull from 0 of the new store,
/// keeping the outbox, which it then pushes there.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_store_rebuilds_the_base_and_keeps_the_outbox() {
    let a = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &url(&a), &[("todos", Resolver::Manual)]);
    r.put("todos", "old", json!({"from": "a"})).unwrap();
    r.sync().await.unwrap();
    r.put("todos", "new", json!({"written": "offline"}))
        .unwrap();

    let b = TestServer::start().await;
    Client::connect([url(&b)])
        .unwrap()
        .put("todos", "b1", json!({"from": "b"}))
        .await
        .unwrap();
    r.set_endpoints([url(&b)]).unwrap();
    drop(r);
    let r = LocalReplica::open(dir.path(), quick).unwrap();
    assert_eq!(r.pending().unwrap().len(), 1);
    let report = r.sync().await.expect("sync");
    assert!(report.resynced, "{report:?}");
    assert_eq!(report.acknowledged, 1);
    let ids: Vec<String> = view(&r, "todos").into_iter().map(|d| d.0).collect();
    assert_eq!(ids, ["b1", "new"], "the old store's documents are gone");
    assert_eq!(view(&r, "todos"), server_view(&url(&b), "todos").await);
}

/// Rule: when a fresh server with another store takes the address the
/// replica synced with (nothing reconfigured, the replica stays open), the
/// next sync notices the store change (the old checkpoint is refused),
/// rebuilds the base from a Pull from 0 of the new store and pushes the
/// outbox there; nothing is lost: a write based on a version only the old
/// store had conflicts (base ahead) and is parked with its ancestor, and
/// resolved it reaches the new store.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_store_at_the_same_address_rebuilds_the_base_and_keeps_the_outbox() {
    let mut s1 = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &url(&s1), &[("todos", Resolver::Manual)]);
    r.put("todos", "old", json!({"title": "Old", "n": 0}))
        .unwrap();
    r.sync().await.unwrap();
    assert_eq!(r.get("todos", "old").unwrap().unwrap().document.version, 1);
    // Offline writes: one on a document of the old store, one new.
    r.patch("todos", "old", json!({"n": 1})).unwrap();
    r.put("todos", "new", json!({"written": "offline"}))
        .unwrap();
    let addr = s1.addr;
    s1.stop().await;

    let s2 = TestServer::start_at(addr).await;
    assert_eq!(s2.addr, addr);
    Client::connect([url(&s2)])
        .unwrap()
        .put("todos", "b1", json!({"from": "s2"}))
        .await
        .unwrap();
    let report = r.sync().await.expect("sync");
    assert!(report.resynced, "the store change is noticed: {report:?}");
    assert_eq!(
        (report.acknowledged, report.parked, report.remaining),
        (1, 1, 1),
        "{report:?}"
    );
    // The old store's document is gone from the base, but not my write.
    let conflicts = r.conflicts().unwrap();
    assert_eq!(conflicts.len(), 1);
    let c = &conflicts[0];
    assert_eq!(c.id, "old");
    assert_eq!(c.server, None, "the new store never had it");
    assert_eq!(c.base, Some(body(json!({"title": "Old", "n": 0}))));
    assert_eq!(c.local, Some(body(json!({"title": "Old", "n": 1}))));
    // The view replays the pending patch on the new store's base, where
    // the document does not exist; the conflict keeps the ancestor, so a
    // resolution can restore the whole body.
    let shown = r.get("todos", "old").unwrap().unwrap();
    assert!(shown.pending);
    assert_eq!(shown.document.body, Some(body(json!({"n": 1}))));

    let mine = c.local.clone().unwrap();
    r.resolve("todos", "old", Resolution::Merged(mine.clone()))
        .unwrap();
    let report = r.sync().await.unwrap();
    assert_eq!((report.acknowledged, report.remaining), (1, 0));
    let expected = server_view(&url(&s2), "todos").await;
    assert_eq!(view(&r, "todos"), expected);
    let ids: Vec<&str> = expected.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(ids, ["b1", "new", "old"]);
    assert_eq!(expected[2].3, Some(mine));
}

// ---------------------------------------------------------------------
// The todo story of `examples/local_todo.rs`
// ---------------------------------------------------------------------

#[allow(dead_code)] // its `main` is the example's
#[path = "../examples/local_todo.rs"]
mod local_todo;

/// Rule: the example's story (two replicas, one offline, a conflict on
/// `done` merged by hand) ends with both replicas' views equal to the
/// server's Pull from 0, holding A's title and B's `done`, nothing pending.
#[tokio::test(flavor = "multi_thread")]
async fn the_todo_story_converges() {
    let s = TestServer::start().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = local_todo::story(&[url(&s).as_str()], da.path(), db.path(), "milk")
        .await
        .expect("the story runs");
    let expected = server_view(&url(&s), "todos").await;
    assert_eq!(view(&a, "todos"), expected);
    assert_eq!(view(&b, "todos"), expected);
    assert_eq!(
        expected[0].3,
        Some(body(json!({"title": "Buy oat milk", "done": true})))
    );
    assert!(a.pending().unwrap().is_empty() && b.pending().unwrap().is_empty());
}

// ---------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------

/// Rule: `deltasync local` writes into the outbox with or without a server
/// and prints the optimistic document (`"pending": true`); `sync` exits 0
/// once the outbox holds only parked conflicts and the view is caught up,
/// non-zero with a one-line reason when the server cannot be reached;
/// `conflicts` shows base, local and server; `resolve` settles one; bad
/// usage exits 2, other failures 1.
#[tokio::test(flavor = "multi_thread")]
async fn the_command_line_runs_a_local_replica() {
    let s = TestServer::start().await;
    let server = Client::connect([url(&s)]).unwrap();
    server
        .put("todos", "milk", json!({"title": "Buy milk"}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("replica");
    let u = url(&s);
    ok(&run(&d, &["init", "--endpoints", &u, "--collection", "todos"]).await);
    let again = run(&d, &["init", "--endpoints", &u, "--collection", "todos"]).await;
    assert_eq!(again.status.code(), Some(1));

    let out = ok(&run(&d, &["put", "todos", "eggs", r#"{"n": 6}"#]).await);
    assert_eq!(out[0]["body"], json!({"n": 6}));
    assert_eq!(out[0]["pending"], true);
    let pending = ok(&run(&d, &["pending"]).await);
    assert_eq!(pending[0]["mutationId"], "1");
    assert_eq!(pending[0]["put"], json!({"n": 6}));
    let synced = ok(&run(&d, &["sync", "--timeout", "10s"]).await);
    assert_eq!(synced[0]["sync"]["acknowledged"], 1);
    let listed = ok(&run(&d, &["list", "todos"]).await);
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|d| d.get("pending").is_none()));
    assert!(ok(&run(&d, &["pending"]).await).is_empty());

    // A conflict, parked, then kept local.
    ok(&run(&d, &["patch", "todos", "milk", r#"{"title": "mine"}"#]).await);
    server
        .patch("todos", "milk", json!({"title": "theirs"}))
        .await
        .unwrap();
    let synced = ok(&run(&d, &["sync"]).await);
    assert_eq!(synced[0]["sync"]["parked"], 1);
    let conflicts = ok(&run(&d, &["conflicts"]).await);
    assert_eq!(conflicts[0]["base"], json!({"title": "Buy milk"}));
    assert_eq!(conflicts[0]["local"], json!({"title": "mine"}));
    assert_eq!(conflicts[0]["server"], json!({"title": "theirs"}));
    let got = ok(&run(&d, &["get", "todos", "milk"]).await);
    assert_eq!(
        (got[0]["body"]["title"].clone(), got[0]["pending"].clone()),
        (json!("mine"), json!(true))
    );
    ok(&run(&d, &["resolve", "todos", "milk", "--keep", "local"]).await);
    ok(&run(&d, &["sync"]).await);
    let doc = server.get("todos", ["milk"]).await.unwrap().remove(0);
    assert_eq!(doc.body.unwrap()["title"], "mine");

    // Failures.
    let none = run(&d, &["resolve", "todos", "milk", "--keep", "server"]).await;
    assert_eq!(none.status.code(), Some(1));
    let usage = run(&d, &["resolve", "todos", "milk"]).await;
    assert_eq!(usage.status.code(), Some(2));
    let foreign = run(&d, &["put", "other", "x", "{}"]).await;
    assert_eq!(foreign.status.code(), Some(1));
    let offline = dir.path().join("offline");
    let dead = dead_endpoint().await;
    ok(&run(
        &offline,
        &["init", "--endpoints", &dead, "--collection", "todos"],
    )
    .await);
    ok(&run(&offline, &["delete", "todos", "milk"]).await);
    let out = run(&offline, &["sync", "--timeout", "1s"]).await;
    assert_eq!(out.status.code(), Some(1));
    let reason = String::from_utf8_lossy(&out.stderr);
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert!(
        reason.contains("UNAVAILABLE"),
        "the server's absence is the reason: {reason}"
    );
    assert_eq!(
        ok(&run(&offline, &["pending"]).await).len(),
        1,
        "the outbox is kept"
    );
    let missing = run(&dir.path().join("nothing"), &["list", "todos"]).await;
    assert_eq!(missing.status.code(), Some(1));
}

/// A server taking requests and sending answers of at most `bytes`
/// (bodies up to 300 kB).
async fn server_with_limit(bytes: usize) -> TestServer {
    TestServer::start_with(|c| {
        c.max_batch = 100;
        c.max_body_bytes = 300_000;
        c.max_request_bytes = bytes;
        c.max_message_bytes = bytes;
    })
    .await
}

/// A body of about `bytes` bytes, with the field `n`.
fn big_body(bytes: usize, n: u64) -> Value {
    json!({"n": n, "pad": "x".repeat(bytes)})
}

/// Rule: the outbox goes out in pushes the server takes: writes whose
/// bodies together exceed the server's request limit are split over
/// several pushes, not sent as one push refused for ever.
#[tokio::test(flavor = "multi_thread")]
async fn big_writes_go_out_in_pushes_the_server_takes() {
    let s = server_with_limit(600_000).await;
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &url(&s), &[("big", Resolver::Manual)]);
    for i in 0..4 {
        r.put("big", &format!("d{i}"), big_body(250_000, i))
            .unwrap();
    }
    let report = r.sync().await.expect("sync");
    assert_eq!((report.acknowledged, report.remaining), (4, 0));
    assert_eq!(view(&r, "big"), server_view(&url(&s), "big").await);
}

/// Rule: a replica never conflicts with itself, also when the server
/// leaves the bodies out of an answer over its size limit: a write made on
/// top of an APPLIED one moves to the version it produced.
#[tokio::test(flavor = "multi_thread")]
async fn writes_on_top_of_an_answer_without_bodies_do_not_conflict() {
    let s = server_with_limit(400_000).await;
    let server = Client::connect([url(&s)]).unwrap();
    for id in ["a", "b"] {
        server.put("big", id, big_body(280_000, 0)).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &url(&s), &[("big", Resolver::Manual)]);
    r.sync().await.expect("first sync");
    // One push of both first patches: its answer would echo two 280 kB
    // documents, over the 400 kB limit, so it comes without bodies.
    for n in [1, 2] {
        for id in ["a", "b"] {
            r.patch("big", id, json!({ "n": n })).unwrap();
        }
    }
    let report = r.sync().await.expect("sync");
    assert_eq!(
        (report.acknowledged, report.parked, report.remaining),
        (4, 0, 0),
        "{report:?}"
    );
    assert!(r.conflicts().unwrap().is_empty());
    let a = r.get("big", "a").unwrap().unwrap();
    assert_eq!(a.document.body.as_ref().unwrap()["n"], json!(2));
    assert_eq!(view(&r, "big"), server_view(&url(&s), "big").await);
}

/// Rule: opening a directory that holds no replica is refused and leaves
/// the directory as it was (a mistyped `--dir` creates nothing).
#[tokio::test(flavor = "multi_thread")]
async fn opening_a_directory_without_a_replica_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let err = LocalReplica::open(dir.path(), quick)
        .err()
        .expect("refused");
    assert!(matches!(err, ReplicaError::NotInitialized), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
