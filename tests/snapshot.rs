//! Snapshot backup and restore: a copy taken through the replication
//! stream while the server takes writes, restored into a new data dir.

mod common;

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use common::{Client, HOUR, MutationExt, TestServer, delete, outcome, patch, push, put};
use deltasync::{
    pb::{self, replication_service_client::ReplicationServiceClient},
    snapshot::{self, Summary},
};
use serde_json::json;
use tonic::Code;

/// Saves a snapshot of the server at `addr` into `file`.
async fn save(addr: std::net::SocketAddr, file: &Path) -> Result<Summary, snapshot::SnapshotError> {
    let mut client = ReplicationServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let requests = futures_util::stream::iter(vec![snapshot::follow_start()]);
    let responses = client.follow(requests).await?.into_inner();
    snapshot::save(responses, file, |_| {}).await
}

/// Every document a Pull from `since` returns, paging to the end.
async fn pull_all(client: &mut Client, since: u64) -> (Vec<pb::Document>, pb::PullResponse) {
    let mut documents = Vec::new();
    let mut since = since;
    loop {
        let page = common::pull_page(client, since).await;
        documents.extend(page.documents.iter().cloned());
        since = page.checkpoint;
        if !page.has_more {
            return (documents, page);
        }
    }
}

/// A server on the data dir `dir` (a restored one).
async fn serve_on(dir: &Path) -> TestServer {
    let dir = dir.to_owned();
    TestServer::start_with(move |c| c.data_dir = dir).await
}

/// Rule: a snapshot saved while writes go on is the store at one
/// checkpoint: a server restored from it holds the same store_id, exactly
/// the documents (versions, seqs, times, bodies, tombstones) the source
/// held at that checkpoint and no later change, the retained history (a
/// patch against an old base still merges), the client ids (a retry is a
/// DUPLICATE, a rejected id stays rejected), and a client holding an older
/// checkpoint resumes from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_saved_under_writes_restores_the_store_at_its_checkpoint() {
    let source = TestServer::start().await;
    let mut client = source.client.clone();
    let mut results: Vec<pb::MutationResult> = Vec::new();

    // History: puts, patches (superseded versions), deletes, a conflict.
    let seed: Vec<_> = (0..50)
        .map(|i| put("notes", &format!("n{i}"), json!({"title": "t", "n": i})).id(i + 1))
        .collect();
    results.extend(push(&mut client, "seed", seed).await.results);
    let patches: Vec<_> = (0..50)
        .map(|i| {
            patch(
                "notes",
                &format!("n{i}"),
                json!({"title": format!("v2-{i}")}),
            )
            .id(i + 51)
        })
        .collect();
    results.extend(push(&mut client, "seed", patches).await.results);
    let deletes: Vec<_> = (0..5)
        .map(|i| delete("notes", &format!("n{i}")).id(i + 101))
        .collect();
    results.extend(push(&mut client, "seed", deletes).await.results);
    let rejected = put("notes", "n10", json!({"title": "stale"}))
        .base(1)
        .id(106);
    let answer = push(&mut client, "seed", vec![rejected.clone()]).await;
    assert_eq!(outcome(&answer.results[0]), pb::Outcome::Conflict);
    let seed_checkpoint = answer.checkpoint;

    // A writer that goes on during the save.
    let stop = Arc::new(AtomicBool::new(false));
    let pushed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (mut client, stop, pushed) = (source.connect().await, stop.clone(), pushed.clone());
        tokio::spawn(async move {
            let mut results = Vec::new();
            let mut id = 0;
            while !stop.load(Ordering::SeqCst) {
                id += 1;
                let m = put("live", &format!("l{}", id % 40), json!({"i": id})).id(id);
                results.extend(push(&mut client, "writer", vec![m]).await.results);
                pushed.store(id, Ordering::SeqCst);
            }
            results
        })
    };
    common::eventually(|| {
        let pushed = pushed.clone();
        async move { pushed.load(Ordering::SeqCst) >= 20 }
    })
    .await;

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("backup.snap");
    let summary = save(source.addr, &file).await.expect("save");
    let after_save = pushed.load(Ordering::SeqCst);
    common::eventually(|| {
        let pushed = pushed.clone();
        async move { pushed.load(Ordering::SeqCst) >= after_save + 20 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let live = writer.await.expect("writer");
    // The writer ran before, during and after the save.
    let writer_ids = live
        .iter()
        .filter(|r| doc_seq(r) <= summary.checkpoint)
        .count();
    assert!(writer_ids > 0 && writer_ids < live.len());
    results.extend(live);
    assert_eq!(summary.store_id, store_id(&mut client).await);

    // The state at the checkpoint, from what every push answered.
    let mut expected: HashMap<(String, String), pb::Document> = HashMap::new();
    for doc in results.iter().filter_map(|r| r.document.clone()) {
        if doc.seq <= summary.checkpoint {
            let key = (doc.collection.clone(), doc.id.clone());
            if expected.get(&key).is_none_or(|d| d.seq < doc.seq) {
                expected.insert(key, doc);
            }
        }
    }

    let target = dir.path().join("restored");
    let restored = snapshot::restore(&file, &target).await.expect("restore");
    assert_eq!(restored.checkpoint, summary.checkpoint);
    let mut copy = serve_on(&target).await;
    let (documents, last) = pull_all(&mut copy.client, 0).await;
    assert_eq!(last.checkpoint, summary.checkpoint, "the copy's head");
    assert_eq!(last.store_id, summary.store_id);
    let got: HashMap<_, _> = documents
        .into_iter()
        .map(|d| ((d.collection.clone(), d.id.clone()), d))
        .collect();
    assert_eq!(got.len(), expected.len(), "documents at the checkpoint");
    for (key, doc) in &expected {
        assert_eq!(got.get(key), Some(doc), "{key:?}");
    }

    // Client ids: a retry is a duplicate, a rejected id stays rejected.
    assert_eq!(
        common::last_mutation_id(&mut copy.client, "seed").await,
        106
    );
    let retry = push(
        &mut copy.client,
        "seed",
        vec![put("notes", "n20", json!({})).id(20)],
    )
    .await;
    assert_eq!(outcome(&retry.results[0]), pb::Outcome::Duplicate);
    let retry = push(&mut copy.client, "seed", vec![rejected]).await;
    assert_eq!(outcome(&retry.results[0]), pb::Outcome::Conflict);

    // Retained history: a patch against version 1 (superseded) of a
    // document touches another field, so it merges.
    let merge = patch("notes", "n30", json!({"extra": true}))
        .base(1)
        .id(200);
    let merged = push(&mut copy.client, "seed", vec![merge]).await;
    assert_eq!(outcome(&merged.results[0]), pb::Outcome::Merged);

    // An older checkpoint resumes: the changes after it, none refused.
    let req = pb::PullRequest {
        since: seed_checkpoint,
        store_id: summary.store_id.clone(),
        limit: 10_000,
        ..Default::default()
    };
    let page = copy.client.pull(req).await.expect("resume").into_inner();
    assert!(page.documents.iter().all(|d| d.seq > seed_checkpoint));
    assert!(page.documents.iter().any(|d| d.collection == "live"));
    copy.stop().await;
}

/// The seq of a result's document.
fn doc_seq(r: &pb::MutationResult) -> u64 {
    r.document.as_ref().map_or(0, |d| d.seq)
}

/// The server's store_id, as Pull reports it.
async fn store_id(client: &mut Client) -> String {
    common::pull_page(client, 0).await.store_id
}

/// Rule: a truncated or damaged snapshot, or one whose target directory
/// holds something, is refused with a message that says so, and leaves no
/// data dir (nor a half-built one) behind; a save never writes over a file.
#[tokio::test]
async fn a_damaged_snapshot_is_refused_and_leaves_nothing_behind() {
    let source = TestServer::start().await;
    let mut client = source.client.clone();
    let docs: Vec<_> = (0..20)
        .map(|i| put("c", &format!("d{i}"), json!({"i": i})))
        .collect();
    push(&mut client, "w", docs).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("good.snap");
    save(source.addr, &file).await.expect("save");
    let err = save(source.addr, &file).await.expect_err("the file exists");
    assert!(err.to_string().contains("exists"), "{err}");
    let bytes = std::fs::read(&file).expect("read");

    // A byte changed inside a frame fails its decoding or the checksum.
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("empty", Vec::new(), &["truncated"]),
        ("header", bytes[..5].to_vec(), &["truncated"]),
        (
            "mid-frame",
            bytes[..bytes.len() / 2].to_vec(),
            &["truncated"],
        ),
        (
            "no checksum",
            bytes[..bytes.len() - 10].to_vec(),
            &["truncated"],
        ),
        (
            "flipped",
            flip(&bytes, bytes.len() / 2),
            &["checksum", "decode"],
        ),
        (
            "flipped digest",
            flip(&bytes, bytes.len() - 1),
            &["checksum"],
        ),
        (
            "extra",
            [bytes.clone(), vec![0]].concat(),
            &["after the checksum"],
        ),
        (
            "other",
            b"PK\x03\x04 not a snapshot".to_vec(),
            &["not a deltasync snapshot"],
        ),
    ];
    for (name, content, reasons) in cases {
        let damaged = dir.path().join(format!("{name}.snap"));
        std::fs::write(&damaged, &content).expect("write");
        let target = dir.path().join(format!("restored-{name}"));
        let err = snapshot::restore(&damaged, &target).await.expect_err(name);
        let message = err.to_string();
        assert!(
            reasons.iter().any(|r| message.contains(r)),
            "{name}: {message}"
        );
        assert!(!target.exists(), "{name}: a data dir was left behind");
        assert_eq!(
            restoring(dir.path()),
            0,
            "{name}: a half-built data dir was left behind"
        );
    }

    // Intact framing and checksum, but a trailer that disagrees with the
    // commits: found only while applying, after the store was begun.
    let lying = dir.path().join("lying.snap");
    let mut reader = snapshot::file::FrameReader::open(&file).expect("open");
    let mut writer = snapshot::file::FrameWriter::create(&lying).expect("create");
    while let Some(frame) = reader.next_frame().expect("frame") {
        writer.frame(&frame).expect("write");
    }
    writer.finish(1_000).expect("finish");
    let target = dir.path().join("restored-lying");
    let err = snapshot::restore(&lying, &target).await.expect_err("lying");
    assert!(err.to_string().contains("trailer says 1000"), "{err}");
    assert!(!target.exists(), "a data dir was left behind");
    assert_eq!(
        restoring(dir.path()),
        0,
        "a half-built data dir was left behind"
    );

    let occupied = dir.path().join("occupied");
    std::fs::create_dir(&occupied).expect("mkdir");
    std::fs::write(occupied.join("keep"), b"x").expect("write");
    let err = snapshot::restore(&file, &occupied)
        .await
        .expect_err("occupied");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert!(occupied.join("keep").exists());

    // The intact file still restores, into an empty existing directory.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let summary = snapshot::restore(&file, &empty).await.expect("restore");
    let mut copy = serve_on(&empty).await;
    let (documents, _) = pull_all(&mut copy.client, 0).await;
    assert_eq!(documents.len(), 20);
    assert_eq!(summary.checkpoint, 20);
    copy.stop().await;
}

/// How many half-built data dirs are in `dir`.
fn restoring(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("restoring"))
        .count()
}

/// `bytes` with the byte at `at` changed.
fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes[at] ^= 0x5a;
    bytes
}

/// Rule: the purge horizon travels with the snapshot: the restored store
/// refuses (OUT_OF_RANGE) a checkpoint below it as the source does, and
/// does not bring purged tombstones back.
#[tokio::test]
async fn the_purge_horizon_travels_with_the_snapshot() {
    let ahead = Arc::new(AtomicU64::new(0));
    let source = TestServer::start_with_clock(&ahead, |_| {}).await;
    let mut client = source.client.clone();
    push(&mut client, "w", vec![put("c", "gone", json!({}))]).await;
    push(&mut client, "w", vec![delete("c", "gone")]).await;
    push(&mut client, "w", vec![put("c", "kept", json!({}))]).await;
    ahead.store(3 * HOUR, Ordering::SeqCst);
    common::eventually(|| {
        let mut client = client.clone();
        async move { common::pull_page(&mut client, 0).await.purge_horizon > 0 }
    })
    .await;
    let horizon = common::pull_page(&mut client, 0).await.purge_horizon;

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("s.snap");
    save(source.addr, &file).await.expect("save");
    let target = dir.path().join("restored");
    snapshot::restore(&file, &target).await.expect("restore");
    let mut copy = serve_on(&target).await;
    let (documents, last) = pull_all(&mut copy.client, 0).await;
    assert_eq!(last.purge_horizon, horizon);
    assert_eq!(documents.len(), 1, "the purged tombstone stays purged");
    let req = pb::PullRequest {
        since: 1,
        store_id: last.store_id.clone(),
        ..Default::default()
    };
    let status = copy.client.pull(req).await.expect_err("below the horizon");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    copy.stop().await;
}

/// Rule: a save that falls behind the live feed (the primary then catches
/// it up from its log again, without client states) still ends with every
/// client's mutation-id state of its checkpoint: a client that wrote while
/// the save stalled has its ids on the copy, so its retry is a DUPLICATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_that_falls_behind_the_feed_keeps_every_clients_ids() {
    let source = TestServer::start_with(|c| {
        c.feed_capacity = 4;
        c.max_batch = 50;
        c.max_message_bytes = 64 * 1024;
        c.max_body_bytes = 40 * 1024;
    })
    .await;
    let mut client = source.client.clone();
    let pad = "x".repeat(30 * 1024);
    for i in 0..40 {
        let m = put("c", &format!("s{i}"), json!({ "pad": pad })).id(i + 1);
        push(&mut client, "seed", vec![m]).await;
    }
    // A slow reader: a small window, and no reading after two messages
    // until the writes below are done, so the feed's ring overtakes it.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", source.addr))
        .expect("url")
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .expect("connect");
    let mut replication =
        ReplicationServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let requests = futures_util::stream::iter(vec![snapshot::follow_start()]);
    let responses = replication
        .follow(requests)
        .await
        .expect("follow")
        .into_inner();
    let (paused, resume) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let held = {
        let (paused, resume) = (paused.clone(), resume.clone());
        Box::pin(futures_util::stream::unfold(
            (responses, 0),
            move |(mut responses, n)| {
                let (paused, resume) = (paused.clone(), resume.clone());
                async move {
                    if n == 2 {
                        paused.notify_one();
                        resume.notified().await;
                    }
                    let item = futures_util::StreamExt::next(&mut responses).await?;
                    Some((item, (responses, n + 1)))
                }
            },
        ))
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("s.snap");
    let saving = {
        let file = file.clone();
        tokio::spawn(async move { snapshot::save(held, &file, |_| {}).await })
    };
    paused.notified().await;
    let mut writer = source.connect().await;
    let mut seqs = Vec::new();
    for i in 1..=30 {
        let m = put("live", &format!("l{i}"), json!({ "i": i })).id(i);
        seqs.push(doc_seq(&push(&mut writer, "w", vec![m]).await.results[0]));
    }
    resume.notify_one();
    let summary = saving.await.expect("save task").expect("save");
    let written = seqs.iter().filter(|&&s| s <= summary.checkpoint).count();

    let target = dir.path().join("restored");
    snapshot::restore(&file, &target).await.expect("restore");
    let mut copy = serve_on(&target).await;
    let ids = u64::try_from(written).expect("count");
    assert_eq!(common::last_mutation_id(&mut copy.client, "w").await, ids);
    if written > 0 {
        let retry = push(
            &mut copy.client,
            "w",
            vec![put("live", "l1", json!({})).id(1)],
        )
        .await;
        assert_eq!(outcome(&retry.results[0]), pb::Outcome::Duplicate);
    }
    copy.stop().await;
}

/// Rule: a store restored from a snapshot and started as a primary begins
/// a new epoch, as a promotion does: a replica of the original primary
/// that holds commits past the snapshot's checkpoint is refused (DIVERGED)
/// instead of following the copy with records it never had.
#[tokio::test]
async fn a_restored_primary_begins_a_new_epoch() {
    let source = TestServer::start().await;
    let mut client = source.client.clone();
    push(&mut client, "w", vec![put("c", "a", json!({}))]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("s.snap");
    let summary = save(source.addr, &file).await.expect("save");
    // The original goes on; a replica of it would hold these seqs.
    push(&mut client, "w", vec![put("c", "b", json!({}))]).await;

    let target = dir.path().join("restored");
    snapshot::restore(&file, &target).await.expect("restore");
    let copy = serve_on(&target).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", copy.addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let status = pb::admin_service_client::AdminServiceClient::new(channel.clone())
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.epoch, summary.epoch + 1, "a new epoch");
    assert_eq!(status.role, pb::Role::Primary as i32);

    // The original's replica: its history is the original's, with seq 2.
    let start = pb::FollowRequest {
        request: Some(pb::follow_request::Request::Start(pb::FollowStart {
            store_id: summary.store_id.clone(),
            applied: summary.checkpoint + 1,
            epoch: summary.epoch,
            url: "http://127.0.0.1:9".into(),
            clients_since: 0,
            epochs: vec![pb::EpochStart {
                epoch: 1,
                first_seq: 1,
                id: 0,
            }],
        })),
    };
    let result = ReplicationServiceClient::new(channel)
        .follow(futures_util::stream::iter([start]))
        .await;
    let status = match result {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            stream.message().await.expect_err("the follower is refused")
        }
    };
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("never had") || status.message().contains("diverge"),
        "{status:?}"
    );
}

/// Rule: a store restored from a snapshot can seed a new replica of the
/// same primary: started with `--replicate-from`, it keeps the primary's
/// epoch (no new epoch: that would depose the primary), resumes after the
/// snapshot's checkpoint and ends with the primary's documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_store_seeds_a_replica_of_the_same_primary() {
    let source = TestServer::start().await;
    let mut client = source.client.clone();
    push(&mut client, "w", vec![put("c", "a", json!({"n": 1}))]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("s.snap");
    let summary = save(source.addr, &file).await.expect("save");
    push(&mut client, "w", vec![put("c", "b", json!({"n": 2}))]).await;
    push(&mut client, "w", vec![patch("c", "a", json!({"m": 3}))]).await;

    let target = dir.path().join("seed");
    snapshot::restore(&file, &target).await.expect("restore");
    let primary = format!("http://{}", source.addr);
    let seeded = target.clone();
    let mut replica = TestServer::start_with(move |c| {
        c.data_dir = seeded;
        c.replicate_from = Some(primary);
    })
    .await;
    let (expected, _) = pull_all(&mut client, 0).await;
    let mut copy = replica.client.clone();
    common::eventually(|| {
        let (mut copy, expected) = (copy.clone(), expected.clone());
        async move { pull_all(&mut copy, 0).await.0 == expected }
    })
    .await;
    let (documents, last) = pull_all(&mut copy, 0).await;
    assert_eq!(documents, expected);
    assert_eq!(last.store_id, summary.store_id);
    // The primary still takes writes in its own epoch: it was not deposed.
    let answer = push(&mut client, "w", vec![put("c", "d", json!({}))]).await;
    assert_eq!(answer.checkpoint_epoch, summary.epoch);
    replica.stop().await;
}
