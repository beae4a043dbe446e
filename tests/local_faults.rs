//! Local replicas under faults: `deltasync local sync` (a real process)
//! killed with SIGKILL at random moments and right after the server
//! committed a push whose answer it never got; offline writes across
//! client restarts; a server whose answers go back in versions.
//!
//! The exact moments come from a gRPC proxy in front of the server
//! ([`Proxy`]) that forwards every call and can hold a push's answer once
//! the server has committed it, or rewrite a pull's answer.
//! `DELTASYNC_TEST_SEED=N` replays the random kill moments (printed on
//! failure).

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    process::Child,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{
    TestServer,
    local::{self, ok, seed},
};
use deltasync::{
    client::{Client, ClientBuilder, RetryPolicy},
    pb::{
        self,
        sync_service_client::SyncServiceClient,
        sync_service_server::{SyncService, SyncServiceServer},
    },
    replica::{LocalReplica, ReplicaError, ReplicaOptions, Resolver},
};
use serde_json::{Map, Value, json};
use tonic::{Request, Response, Status, transport::Channel};

// ---------------------------------------------------------------------
// A proxy that holds or rewrites answers
// ---------------------------------------------------------------------

/// What the proxy does to the calls it forwards.
#[derive(Default)]
struct Faults {
    /// Forward pushes, then never answer: the caller waits forever while
    /// the server has committed.
    hold_push_answers: AtomicBool,
    /// Pushes the server answered (committed), held or not.
    pushes_committed: AtomicUsize,
    /// Rewrites every Pull answer before it goes back.
    rewrite_pull: Mutex<Option<fn(&mut pb::PullResponse)>>,
    /// Answers a Pull from a checkpoint above 0 OUT_OF_RANGE (as for a
    /// compacted checkpoint): the caller resyncs.
    refuse_resume: AtomicBool,
    /// Holds the answer to a Pull from 0 (read from the server first)
    /// until `release` is notified.
    hold_pull_from_0: AtomicBool,
    /// Pulls from 0 held so far.
    pulls_held: AtomicUsize,
    /// Lets held pulls go.
    release: tokio::sync::Notify,
}

/// A SyncService that forwards to a real server, with [`Faults`].
#[derive(Clone)]
struct Proxy {
    /// The real server.
    upstream: SyncServiceClient<Channel>,
    /// What to do to the calls.
    faults: Arc<Faults>,
}

#[tonic::async_trait]
impl SyncService for Proxy {
    async fn push(
        &self,
        request: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let answer = self
            .upstream
            .clone()
            .push(request.into_inner())
            .await?
            .into_inner();
        self.faults.pushes_committed.fetch_add(1, Ordering::SeqCst);
        if self.faults.hold_push_answers.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(Response::new(answer))
    }

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let since = request.get_ref().since;
        if since > 0 && self.faults.refuse_resume.load(Ordering::SeqCst) {
            return Err(Status::out_of_range("checkpoint compacted (proxy)"));
        }
        let held = since == 0 && self.faults.hold_pull_from_0.load(Ordering::SeqCst);
        let release = self.faults.release.notified();
        let mut answer = self
            .upstream
            .clone()
            .pull(request.into_inner())
            .await?
            .into_inner();
        if let Some(rewrite) = *self.faults.rewrite_pull.lock().unwrap() {
            rewrite(&mut answer);
        }
        if held {
            self.faults.pulls_held.fetch_add(1, Ordering::SeqCst);
            release.await;
        }
        Ok(Response::new(answer))
    }

    type SubscribeStream = tonic::Streaming<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.upstream.clone().subscribe(request.into_inner()).await
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        self.upstream.clone().get(request.into_inner()).await
    }
}

/// Starts a [`Proxy`] to `upstream` on an ephemeral port (bound before it
/// serves): its URL and faults.
async fn start_proxy(upstream: SocketAddr) -> (String, Arc<Faults>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let faults = Arc::new(Faults::default());
    let proxy = Proxy {
        upstream: SyncServiceClient::connect(format!("http://{upstream}"))
            .await
            .unwrap(),
        faults: faults.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SyncServiceServer::new(proxy))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (url, faults)
}

// ---------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------

/// splitmix64, seeded.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// Prints the seed if the test panics.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("failed with DELTASYNC_TEST_SEED={}", self.0);
        }
    }
}

/// SIGKILLs `child` and reaps it; true if it had already exited.
fn kill_9(mut child: Child) -> bool {
    let done = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let _ = child.wait();
    done
}

fn quick(b: ClientBuilder) -> ClientBuilder {
    b.retry(RetryPolicy {
        max_elapsed: Duration::from_millis(300),
        ..RetryPolicy::default()
    })
    .connect_timeout(Duration::from_millis(300))
}

fn init(dir: &Path, endpoint: &str) -> LocalReplica {
    LocalReplica::init(
        dir,
        ReplicaOptions::new([endpoint]).collection("c", Resolver::Manual),
        quick,
    )
    .expect("init")
}

/// The outbox as (mutation id, document id).
fn outbox(r: &LocalReplica) -> Vec<(u64, String)> {
    r.pending()
        .unwrap()
        .into_iter()
        .map(|p| (p.mutation_id, p.entry.id))
        .collect()
}

/// Writes `per_doc` patches to each of `docs` documents, each setting a
/// field of its own (`p0`, `p1`, ...): the server's version of a document
/// counts the patches applied to it, so one applied twice shows.
fn patch_counters(r: &LocalReplica, docs: usize, ks: std::ops::Range<usize>) {
    for k in ks {
        for d in 0..docs {
            r.patch("c", &format!("d{d}"), json!({format!("p{k}"): k}))
                .unwrap();
        }
    }
}

/// Asserts each counter document is at version `per_doc` with every
/// field, and the replica's last mutation id on the server is `last`.
async fn assert_applied_once(
    s: &TestServer,
    client_id: &str,
    docs: usize,
    per_doc: usize,
    last: u64,
) {
    let server = Client::connect([format!("http://{}", s.addr)]).unwrap();
    for d in 0..docs {
        let doc = server.get("c", [format!("d{d}")]).await.unwrap().remove(0);
        let expected: Map<String, Value> =
            (0..per_doc).map(|k| (format!("p{k}"), json!(k))).collect();
        assert_eq!(
            (doc.version, doc.body),
            (u64::try_from(per_doc).unwrap(), Some(expected)),
            "d{d}: each patch applied once"
        );
    }
    let mut raw = s.connect().await;
    assert_eq!(common::last_mutation_id(&mut raw, client_id).await, last);
}

// ---------------------------------------------------------------------
// kill -9
// ---------------------------------------------------------------------

/// Rule: `deltasync local sync` killed with SIGKILL at any moment (before
/// the push, between a commit on the server and the answer, while pulled
/// changes are applied) leaves the local store readable, the outbox a
/// suffix of what it was (in order, ids unchanged) and the base
/// consistent; a later sync finishes the job and the server ends with each
/// local write applied exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_killed_at_random_moments_applies_every_write_once() {
    let seed = seed();
    let _guard = SeedGuard(seed);
    let mut rng = Rng(seed);
    let s = TestServer::start().await;
    let url = format!("http://{}", s.addr);
    // Documents to pull, so the catch-up takes a while too.
    let direct = Client::connect([url.as_str()]).unwrap();
    let filler: Vec<_> = (0..300)
        .map(|i| {
            deltasync::client::Mutation::put(
                "c",
                format!("f{i:03}"),
                json!({"pad": "x".repeat(200)}),
            )
        })
        .collect();
    direct.push(filler).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (docs, batch) = (4, 12);
    let mut per_doc = batch;
    let r = init(dir.path(), &url);
    let client_id = r.client_id().to_owned();
    patch_counters(&r, docs, 0..per_doc);
    let mut before = outbox(&r);
    drop(r);

    let mut kills = 0;
    let mut mid_push = 0;
    // (delay ms, outbox left) after each kill, for the log.
    let mut trail = Vec::new();
    for round in 0..40 {
        let child = local::spawn(dir.path(), &["sync", "--timeout", "20s"]);
        let delay = rng.below(300);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let finished = kill_9(child);
        if !finished {
            kills += 1;
        }
        // The store opens, the outbox is a suffix of what it was, and the
        // view shows every write (pending or acknowledged).
        let r = LocalReplica::open(dir.path(), quick).expect("the store opens after a kill");
        let now = outbox(&r);
        assert!(
            before.ends_with(&now),
            "round {round}: the outbox lost or changed entries: {before:?} -> {now:?}"
        );
        // Killed after part of the outbox was acknowledged, with some of it
        // still to send: the kill landed inside the push rounds.
        if !finished && !now.is_empty() && now.len() < before.len() {
            mid_push += 1;
        }
        for d in 0..docs {
            let doc = r.get("c", &format!("d{d}")).unwrap().unwrap().document;
            assert_eq!(doc.body.unwrap().len(), per_doc, "d{d} after a kill");
        }
        trail.push((delay, now.len()));
        if now.is_empty() {
            if kills >= 6 && mid_push >= 1 {
                break;
            }
            // More writes, so there is a sync left to kill.
            patch_counters(&r, docs, per_doc..per_doc + batch);
            per_doc += batch;
        }
        before = outbox(&r);
    }
    assert!(kills >= 6, "too few syncs killed: {trail:?}");
    assert!(
        mid_push >= 1,
        "no kill landed between two pushes of a sync: {trail:?}"
    );
    let out = local::run(dir.path(), &["sync", "--timeout", "20s"]).await;
    ok(&out);
    let r = LocalReplica::open(dir.path(), quick).unwrap();
    assert!(r.pending().unwrap().is_empty());
    assert_eq!(local::view(&r, "c"), local::server_view(&url, "c").await);
    let last = u64::try_from(docs * per_doc).unwrap();
    assert_applied_once(&s, &client_id, docs, per_doc, last).await;
    eprintln!("seed {seed}: {kills} kills; (delay ms, outbox left): {trail:?}");
}

/// Rule: a sync killed after the server committed its push but before the
/// answer reached it (held by the proxy) keeps the write in its outbox;
/// the next sync sends it again under the same mutation id, the server
/// answers DUPLICATE, and the write is applied once, the writes based on
/// it too.
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_killed_between_the_servers_commit_and_its_answer_applies_once() {
    let s = TestServer::start().await;
    let (proxy, faults) = start_proxy(s.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &proxy);
    let client_id = r.client_id().to_owned();
    patch_counters(&r, 2, 0..3);
    let before = outbox(&r);
    drop(r);

    faults.hold_push_answers.store(true, Ordering::SeqCst);
    let child = local::spawn(dir.path(), &["sync", "--timeout", "20s"]);
    common::eventually(|| async { faults.pushes_committed.load(Ordering::SeqCst) > 0 }).await;
    assert!(!kill_9(child), "the sync waits for the held answer");
    // The server has the first push (one write per document); the
    // replica never heard of it.
    let mut raw = s.connect().await;
    assert_eq!(common::last_mutation_id(&mut raw, &client_id).await, 2);
    let r = LocalReplica::open(dir.path(), quick).unwrap();
    assert_eq!(outbox(&r), before, "the outbox is intact");
    drop(r);

    faults.hold_push_answers.store(false, Ordering::SeqCst);
    let out = ok(&local::run(dir.path(), &["sync", "--timeout", "20s"]).await);
    assert_eq!(out[0]["sync"]["acknowledged"], 6, "{out:?}");
    assert_eq!(out[0]["sync"]["parked"], 0, "{out:?}");
    assert_applied_once(&s, &client_id, 2, 3, 6).await;
    let r = LocalReplica::open(dir.path(), quick).unwrap();
    assert_eq!(
        local::view(&r, "c"),
        local::server_view(&format!("http://{}", s.addr), "c").await
    );
}

/// Rule: writes made with `deltasync local` while the server is away are
/// in the outbox when each command returns, survive the client processes
/// (a sync killed while it retries included), and are pushed once when
/// the server comes back.
#[tokio::test(flavor = "multi_thread")]
async fn offline_writes_survive_client_restarts_until_the_server_returns() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("replica");
    let url = format!("http://{addr}");
    ok(&local::run(&d, &["init", "--endpoints", &url, "--collection", "c"]).await);
    for k in 0..3 {
        let body = json!({format!("p{k}"): k}).to_string();
        ok(&local::run(&d, &["patch", "c", "d0", &body]).await);
        ok(&local::run(&d, &["patch", "c", "d1", &body]).await);
    }
    // A sync that cannot reach the server, killed at some moment of its
    // retries (not a wait for readiness: any moment will do).
    let child = local::spawn(&d, &["sync", "--timeout", "30s"]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!kill_9(child), "the sync still retries");
    assert_eq!(ok(&local::run(&d, &["pending"]).await).len(), 6);

    let s = TestServer::start_at(addr).await;
    let out = ok(&local::run(&d, &["sync", "--timeout", "20s"]).await);
    assert_eq!(out[0]["sync"]["acknowledged"], 6, "{out:?}");
    let client_id = LocalReplica::open(&d, quick)
        .unwrap()
        .client_id()
        .to_owned();
    assert_applied_once(&s, &client_id, 2, 3, 6).await;
}

// ---------------------------------------------------------------------
// Bad answers
// ---------------------------------------------------------------------

/// Rule: a pull answer in which a document's version goes backwards (a
/// higher seq, a lower version) stops the sync with an error naming the
/// document and both versions; the base keeps the version it had and the
/// outbox is kept, and once the answers are sound again a sync pushes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_version_going_backwards_stops_the_sync_and_keeps_the_outbox() {
    let s = TestServer::start().await;
    let (proxy, faults) = start_proxy(s.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &proxy);
    let server = Client::connect([format!("http://{}", s.addr)]).unwrap();
    for k in 0..3 {
        server.patch("c", "doc", json!({"k": k})).await.unwrap();
    }
    r.sync().await.unwrap();
    assert_eq!(r.get("c", "doc").unwrap().unwrap().document.version, 3);
    r.patch("c", "mine", json!({"offline": true})).unwrap();
    server.patch("c", "doc", json!({"k": 9})).await.unwrap();

    // The next page shows "doc" changed (a higher seq) at version 1.
    *faults.rewrite_pull.lock().unwrap() = Some(|page| {
        for d in &mut page.documents {
            if d.id == "doc" {
                d.version = 1;
            }
        }
    });
    let err = r.sync().await.expect_err("a version going backwards");
    assert!(matches!(err, ReplicaError::BadAnswer(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("c/doc") && text.contains("went back from version 3 to 1"),
        "the error names the problem: {text}"
    );
    assert_eq!(r.get("c", "doc").unwrap().unwrap().document.version, 3);
    assert_eq!(outbox(&r).len(), 1, "the outbox is kept");
    assert_eq!(
        common::last_mutation_id(&mut s.connect().await, r.client_id()).await,
        0,
        "nothing was pushed after the bad answer"
    );

    *faults.rewrite_pull.lock().unwrap() = None;
    let report = r.sync().await.unwrap();
    assert_eq!(report.acknowledged, 1);
    assert_eq!(r.get("c", "doc").unwrap().unwrap().document.version, 4);
    assert_eq!(
        local::view(&r, "c"),
        local::server_view(&format!("http://{}", s.addr), "c").await
    );
}

// ---------------------------------------------------------------------
// One process at a time
// ---------------------------------------------------------------------

/// Rule: a `local put` made while a `local sync` has the store open waits
/// for it (up to `--lock-timeout`) instead of failing at once, and its
/// write is in the outbox once the sync lets go; with a short
/// `--lock-timeout` it fails with a one-line reason saying the store is in
/// use.
#[tokio::test(flavor = "multi_thread")]
async fn a_put_waits_for_a_sync_holding_the_store() {
    let s = TestServer::start().await;
    let (proxy, faults) = start_proxy(s.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &proxy);
    r.put("c", "first", json!({"n": 1})).unwrap();
    drop(r);

    // A sync that holds the store: its push's answer never comes.
    faults.hold_push_answers.store(true, Ordering::SeqCst);
    let sync = local::spawn(dir.path(), &["sync", "--timeout", "20s"]);
    common::eventually(|| async { faults.pushes_committed.load(Ordering::SeqCst) > 0 }).await;

    let busy = local::run(
        dir.path(),
        &["put", "c", "x", "{}", "--lock-timeout", "100ms"],
    )
    .await;
    assert_eq!(busy.status.code(), Some(1));
    let reason = String::from_utf8_lossy(&busy.stderr);
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert!(reason.contains("in use by another process"), "{reason}");

    let mut waiting = local::spawn(
        dir.path(),
        &["put", "c", "second", r#"{"n": 2}"#, "--lock-timeout", "20s"],
    );
    // The put waits while the sync holds the store (still running after
    // a while, where a put that did not wait would have failed at once);
    // the sync ends (killed here), the put goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the put waits for the store"
    );
    assert!(!kill_9(sync));
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    let printed = ok(&out);
    assert_eq!(printed[0]["id"], "second");
    let r = LocalReplica::open(dir.path(), quick).unwrap();
    let ids: Vec<String> = outbox(&r).into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["first", "second"]);
}

// ---------------------------------------------------------------------
// A resync racing a background follower
// ---------------------------------------------------------------------

/// Rule: a resync (a Pull from 0) that a background follower overtakes in
/// the same store keeps what the follower brought meanwhile: the base and
/// the checkpoint never go back to the older snapshot (so no change is
/// lost behind a checkpoint that moved past it).
#[tokio::test(flavor = "multi_thread")]
async fn a_resync_keeps_what_a_background_follower_brought_meanwhile() {
    let s = TestServer::start().await;
    let (proxy, faults) = start_proxy(s.addr).await;
    let server = Client::connect([format!("http://{}", s.addr)]).unwrap();
    server.put("c", "early", json!({"n": 1})).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &proxy);
    let mut events = r.events();
    let handle = r.start_sync(deltasync::replica::BackgroundOptions {
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    });
    let mut status = handle.status();
    tokio::time::timeout(
        common::cluster::PATIENCE,
        status.wait_for(|s| matches!(s, deltasync::replica::SyncStatus::Following { .. })),
    )
    .await
    .expect("following")
    .unwrap();

    // A sync on demand must resync, and its pull from 0 is held.
    faults.refuse_resume.store(true, Ordering::SeqCst);
    faults.hold_pull_from_0.store(true, Ordering::SeqCst);
    let on_demand = tokio::spawn({
        let r = r.clone();
        async move { r.sync().await }
    });
    common::eventually(|| async { faults.pulls_held.load(Ordering::SeqCst) > 0 }).await;
    // Meanwhile the follower brings a later change.
    server.put("c", "late", json!({"n": 2})).await.unwrap();
    let followed = loop {
        match tokio::time::timeout(common::cluster::PATIENCE, events.recv()).await {
            Ok(Some(Ok(deltasync::replica::ReplicaEvent::ServerChanges {
                documents,
                checkpoint: Some(c),
            }))) if documents.iter().any(|d| d.id == "late") => break c,
            Ok(Some(Ok(_))) => {}
            other => panic!("the follower's change: {other:?}"),
        }
    };
    faults.refuse_resume.store(false, Ordering::SeqCst);
    faults.hold_pull_from_0.store(false, Ordering::SeqCst);
    faults.release.notify_waiters();
    let report = on_demand.await.unwrap().expect("the sync");
    assert!(report.resynced, "{report:?}");
    let resynced = loop {
        match events.try_recv() {
            Some(Ok(deltasync::replica::ReplicaEvent::Resynced { checkpoint })) => {
                break checkpoint;
            }
            Some(_) => {}
            None => panic!("a Resynced event"),
        }
    };
    assert!(
        resynced.seq >= followed.seq,
        "the resync took the checkpoint back from {} to {}",
        followed.seq,
        resynced.seq
    );
    handle.shutdown().await;
    assert_eq!(
        local::view(&r, "c"),
        local::server_view(&format!("http://{}", s.addr), "c").await
    );
}
