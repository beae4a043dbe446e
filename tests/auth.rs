//! Auth over real gRPC: principals from `--auth-file` (token hashes and
//! grants), `authorization: Bearer <token>` on every call but health and
//! reflection, PERMISSION_DENIED for what a grant does not cover, client
//! ids kept per principal, the file reloaded without a restart (and kept
//! when a new one does not load), a replica's `--upstream-token-file`, and
//! `deltasync token new`.
//!
//! In-process servers ([`TestServer`](common::TestServer)) where possible;
//! real processes for replication, for what only a process's log tells (a
//! reload that failed) and for the CLI. The harness shared with the TLS and
//! limits tests is in [`common::auth`]. Nothing sleeps to wait: every wait
//! is a bounded poll.

mod common;

use std::{
    collections::HashSet,
    path::Path,
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{
    Client, MutationExt,
    auth::{
        AuthFile, HANG, NOTES, RELOAD, bearer, call, channel, health_status, logged, principal,
        pull_all, push_request, read_until_doc, reflected_services, refused, server_with, until,
        until_upstream_denied,
    },
    cluster::{DataDir, Patience, start_replica_logged},
    process::{Logs, Process},
    put,
};
use deltasync::{
    auth::token::hash_string,
    pb::{
        self, FollowRequest, FollowStart, GetRequest, Outcome, PromoteRequest, PullRequest,
        PushRequest, StatusRequest, SubscribeRequest, admin_service_client::AdminServiceClient,
        follow_request, replication_service_client::ReplicationServiceClient,
        sync_service_client::SyncServiceClient,
    },
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// Every permission there is.
const ALL: &[&str] = &["read", "write", "replicate", "admin"];

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Pushes as `token`, failing the test on an error.
async fn push_as(c: &mut Client, token: &str, req: PushRequest) -> pb::PushResponse {
    c.push(bearer(token, req))
        .await
        .expect("push with a valid token")
        .into_inner()
}

/// The documents `ids` of `collection`, read as `token`.
async fn get_as(c: &mut Client, token: &str, collection: &str, ids: &[&str]) -> Vec<pb::Document> {
    let req = GetRequest {
        collection: collection.into(),
        ids: ids.iter().map(|id| id.to_string()).collect(),
        ..Default::default()
    };
    c.get(bearer(token, req))
        .await
        .expect("get with a valid token")
        .into_inner()
        .documents
}

/// The last mutation id Pull reports to `token` for `client_id`.
async fn last_mutation_id_as(c: &mut Client, token: &str, client_id: &str) -> u64 {
    let req = PullRequest {
        client_id: client_id.into(),
        limit: 1,
        ..Default::default()
    };
    c.pull(bearer(token, req))
        .await
        .expect("pull with a valid token")
        .into_inner()
        .last_mutation_id
}

/// What a Subscribe fails with: the call itself, or its first message
/// (`Ok` if a first message arrives).
async fn subscribe_outcome(c: &mut Client, req: Request<SubscribeRequest>) -> Result<(), Status> {
    let mut stream = c.subscribe(req).await?.into_inner();
    match tokio::time::timeout(HANG, stream.message()).await {
        Ok(first) => first.map(|_| ()),
        Err(_) => panic!("Subscribe neither failed nor sent a first message in {HANG:?}"),
    }
}

/// What a Follow that sends its `start` fails with: the call, or its first
/// message (`Ok` if a first message arrives).
async fn follow_outcome(
    c: &mut ReplicationServiceClient<Channel>,
    header: Option<&str>,
) -> Result<(), Status> {
    let start = FollowRequest {
        request: Some(follow_request::Request::Start(FollowStart {
            url: "http://127.0.0.1:9".into(),
            ..Default::default()
        })),
    };
    let requests = futures_util::stream::iter([start]);
    let mut stream = c.follow(call(header, requests)).await?.into_inner();
    match tokio::time::timeout(HANG, stream.message()).await {
        Ok(first) => first.map(|_| ()),
        Err(_) => panic!("Follow neither failed nor sent a first message in {HANG:?}"),
    }
}

/// Runs `command` to its exit, killing it (and failing the test) if it has
/// not exited within `bound`.
fn run_to_exit(command: &mut Command, bound: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let deadline = std::time::Instant::now() + bound;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} still runs after {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

// ---------------------------------------------------------------------------
// 1. No credential, no call
// ---------------------------------------------------------------------------

/// Rule: with an auth file, every call of the sync, replication and admin
/// services without a valid bearer token is UNAUTHENTICATED (no header, an
/// unknown token, the token's hash in its place, another scheme, an empty
/// token), and nothing is written; health and reflection answer without
/// credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_unauthenticated() {
    const TOKEN: &str = "root-token";
    let auth = AuthFile::new(&principal("root", TOKEN, &[(&["*"], ALL)], &[]));
    let server = server_with(&auth).await;
    let channel = channel(server.addr).await;
    let mut sync = SyncServiceClient::new(channel.clone());
    let mut replication = ReplicationServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::new(channel.clone());

    let hash = hash_string(TOKEN);
    let invalid = [
        None,
        Some("Bearer not-the-token".to_owned()),
        Some(format!("Bearer {hash}")),
        Some(format!("Basic {TOKEN}")),
        Some("Bearer ".to_owned()),
        Some(TOKEN.to_owned()),
    ];
    for header in &invalid {
        let header = header.as_deref();
        let what = |rpc: &str| format!("{rpc} with authorization {header:?}");
        let write = push_request("c1", vec![put("docs", "d", json!({"v": 1}))]);
        refused(
            sync.push(call(header, write)).await,
            Code::Unauthenticated,
            &what("Push"),
        );
        refused(
            sync.pull(call(header, PullRequest::default())).await,
            Code::Unauthenticated,
            &what("Pull"),
        );
        let get = GetRequest {
            collection: "docs".into(),
            ids: vec!["d".into()],
            ..Default::default()
        };
        refused(
            sync.get(call(header, get)).await,
            Code::Unauthenticated,
            &what("Get"),
        );
        refused(
            subscribe_outcome(&mut sync, call(header, SubscribeRequest::default())).await,
            Code::Unauthenticated,
            &what("Subscribe"),
        );
        refused(
            follow_outcome(&mut replication, header).await,
            Code::Unauthenticated,
            &what("Follow"),
        );
        refused(
            admin.status(call(header, StatusRequest {})).await,
            Code::Unauthenticated,
            &what("Status"),
        );
        refused(
            admin.promote(call(header, PromoteRequest {})).await,
            Code::Unauthenticated,
            &what("Promote"),
        );
    }

    // The same calls with the token pass (so the refusals were about the
    // credential), and none of the refused pushes wrote anything.
    let mut sync = server.connect().await;
    assert!(pull_all(&mut sync, Some(TOKEN), &[]).await.is_empty());
    let status = admin
        .status(bearer(TOKEN, StatusRequest {}))
        .await
        .expect("status with the token")
        .into_inner();
    assert_eq!(status.head, 0, "a refused push wrote something");
    let lower = call(Some(&format!("bearer {TOKEN}")), PullRequest::default());
    sync.pull(lower)
        .await
        .expect("the scheme is case-insensitive");

    for service in ["", "deltasync.v1.SyncService"] {
        let status = health_status(channel.clone(), service).await;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let names = reflected_services(channel, "reflection needs no credential").await;
    for service in [
        "deltasync.v1.SyncService",
        "deltasync.v1.ReplicationService",
        "deltasync.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(service), "{service} not in {names:?}");
    }
}

// ---------------------------------------------------------------------------
// 2. Grants
// ---------------------------------------------------------------------------

const ROOT: &str = "root-token";
const READER: &str = "reader-token";
const WRITER: &str = "writer-token";
const B_WRITER: &str = "b-writer-token";
const REPLICATOR: &str = "replicator-token";

/// A root, a reader of `a.*`, a writer of `a.*` and a writer of `b`.
fn grants_file() -> AuthFile {
    AuthFile::new(
        &[
            principal("root", ROOT, &[(&["*"], ALL)], &[]),
            principal("reader", READER, &[(&["a.*"], &["read"])], &[]),
            principal("writer", WRITER, &[(&["a.*"], &["write"])], &[]),
            principal("b-writer", B_WRITER, &[(&["b"], &["write"])], &[]),
        ]
        .concat(),
    )
}

/// Asserts `status` is PERMISSION_DENIED and its message names `field`.
fn denied<T: std::fmt::Debug>(result: Result<T, Status>, field: &str, what: &str) {
    let status = refused(result, Code::PermissionDenied, what);
    assert!(
        status.message().contains(field),
        "{what}: the refusal should name {field}: {status:?}"
    );
}

/// Rule: a reader may not push (PERMISSION_DENIED naming `mutations[0]`),
/// and a push with one forbidden mutation is refused whole, atomic or not,
/// naming it: nothing of it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_a_forbidden_mutation_writes_nothing() {
    let auth = grants_file();
    let server = server_with(&auth).await;
    let mut c = server.connect().await;

    let read_only = push_request("r", vec![put("a.x", "r1", json!({"v": 1}))]);
    denied(
        c.push(bearer(READER, read_only)).await,
        "mutations[0]",
        "a reader's push",
    );
    for atomic in [true, false] {
        let req = PushRequest {
            client_id: "w".into(),
            mutations: vec![
                put("a.x", &format!("w-{atomic}"), json!({"v": 1})),
                put("b", &format!("w-{atomic}"), json!({"v": 1})),
            ],
            atomic,
        };
        denied(
            c.push(bearer(WRITER, req)).await,
            "mutations[1]",
            &format!("a writer's push to a.x and b (atomic: {atomic})"),
        );
    }

    for (collection, ids) in [
        ("a.x", &["r1", "w-true", "w-false"][..]),
        ("b", &["w-true", "w-false"][..]),
    ] {
        let found = get_as(&mut c, ROOT, collection, ids).await;
        assert!(found.is_empty(), "written by a refused push: {found:?}");
    }
    assert_eq!(
        last_mutation_id_as(&mut c, WRITER, "w").await,
        0,
        "a refused push left a mutation id behind"
    );
    let writable = push_request("w", vec![put("a.x", "ok", json!({"v": 1}))]);
    let result = push_as(&mut c, WRITER, writable).await;
    assert_eq!(result.results[0].outcome, Outcome::Applied as i32);
    let read = get_as(&mut c, READER, "a.x", &["ok"]).await;
    assert_eq!(read.len(), 1, "the reader reads a.*");
}

/// Rule: a writer of `a.*` may neither read nor write `b` (nor `ab`, which
/// `a.*` does not cover): Get, Pull and Subscribe naming it, and a Push to
/// it, are PERMISSION_DENIED, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_covers_only_its_collections() {
    let auth = grants_file();
    let server = server_with(&auth).await;
    let mut c = server.connect().await;
    let seed = push_request("root", vec![put("b", "b1", json!({"v": 1}))]);
    push_as(&mut c, ROOT, seed).await;

    for collection in ["b", "ab"] {
        let get = GetRequest {
            collection: collection.into(),
            ids: vec!["b1".into()],
            ..Default::default()
        };
        denied(
            c.get(bearer(WRITER, get)).await,
            "collection",
            &format!("Get {collection}"),
        );
        let pull = PullRequest {
            collections: vec!["a.x".into(), collection.into()],
            ..Default::default()
        };
        denied(
            c.pull(bearer(WRITER, pull)).await,
            "collections[1]",
            &format!("Pull a.x and {collection}"),
        );
        let subscribe = SubscribeRequest {
            collections: vec![collection.into()],
            ..Default::default()
        };
        denied(
            subscribe_outcome(&mut c, bearer(WRITER, subscribe)).await,
            "collections[0]",
            &format!("Subscribe {collection}"),
        );
        let push = push_request("w", vec![put(collection, "w1", json!({"v": 1}))]);
        denied(
            c.push(bearer(WRITER, push)).await,
            "mutations[0]",
            &format!("Push to {collection}"),
        );
    }
    let b = get_as(&mut c, ROOT, "b", &["b1", "w1"]).await;
    assert_eq!(b.len(), 1, "only root's b1: {b:?}");
    assert_eq!(b[0].id, "b1");
}

/// Rule: a Pull or Subscribe naming no collection gets only the
/// collections the principal may read, backlog and live, while another
/// principal keeps writing elsewhere; the subscriber sees its own writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reading_everything_means_everything_one_may_read() {
    let auth = grants_file();
    let server = server_with(&auth).await;
    let mut c = server.connect().await;
    // A backlog in collections around a.*: `a` and `ab` are not under it.
    let backlog = ["a.x", "a.y", "a", "ab", "b"]
        .iter()
        .map(|collection| put(collection, "old", json!({"v": 0})))
        .collect();
    push_as(&mut c, ROOT, push_request("root", backlog)).await;

    let open = SubscribeRequest::default();
    let mut stream = c
        .subscribe(bearer(WRITER, open))
        .await
        .expect("subscribe to what one may read")
        .into_inner();

    // Another principal writes b all along.
    let stop = CancellationToken::new();
    let b_pushes = Arc::new(AtomicU64::new(0));
    let noise = tokio::spawn({
        let (stop, b_pushes) = (stop.clone(), b_pushes.clone());
        let mut c = server.connect().await;
        async move {
            while !stop.is_cancelled() {
                let n = b_pushes.load(Ordering::SeqCst) + 1;
                let req = push_request("bw", vec![put("b", &format!("n{n}"), json!({"n": n}))]);
                push_as(&mut c, B_WRITER, req).await;
                b_pushes.store(n, Ordering::SeqCst);
            }
        }
    });

    // The writer's own writes, each after at least one more of b's.
    const MINE: u64 = 5;
    for i in 1..=MINE {
        let before = b_pushes.load(Ordering::SeqCst);
        until("the b writer pushes again", HANG, async || {
            b_pushes.load(Ordering::SeqCst) > before
        })
        .await;
        let req = push_request("w", vec![put("a.x", &format!("mine{i}"), json!({"i": i}))]);
        push_as(&mut c, WRITER, req).await;
    }
    let pulled = pull_all(&mut c, Some(WRITER), &[]).await;
    stop.cancel();
    noise.await.expect("the b writer");

    let seen = read_until_doc(&mut stream, "a.x", &format!("mine{MINE}")).await;
    let seen_ids: HashSet<_> = seen
        .iter()
        .map(|d| format!("{}/{}", d.collection, d.id))
        .collect();
    let mut expected: HashSet<_> = (1..=MINE).map(|i| format!("a.x/mine{i}")).collect();
    expected.extend(["a.x/old".to_owned(), "a.y/old".to_owned()]);
    assert_eq!(seen_ids, expected, "the subscriber's documents");
    let pulled_ids: HashSet<_> = pulled
        .iter()
        .map(|d| format!("{}/{}", d.collection, d.id))
        .collect();
    assert_eq!(pulled_ids, expected, "the Pull's documents");
    // An exact grant: the b writer reads `b`, not `ab`.
    let b_written = pull_all(&mut c, Some(B_WRITER), &[]).await;
    assert!(
        b_written.iter().all(|d| d.collection == "b"),
        "{b_written:?}"
    );
    assert!(
        b_written.len() > usize::try_from(MINE).expect("small"),
        "b was written between the writer's pushes"
    );
}

/// Rule: `admin` (Status, Promote) and `replicate` (Follow) concern the
/// whole store, so only a grant on `*` gives them; neither gives read, and
/// a Pull naming no collection by a principal who may read none gets
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_replicate_need_a_grant_on_everything() {
    const TENANT: &str = "tenant-token";
    const OPERATOR: &str = "operator-token";
    let auth = AuthFile::new(
        &[
            principal("root", ROOT, &[(&["*"], ALL)], &[]),
            principal("tenant", TENANT, &[(&["a.*"], ALL)], &[]),
            principal("operator", OPERATOR, &[(&["*"], &["admin"])], &[]),
            principal("replicator", REPLICATOR, &[(&["*"], &["replicate"])], &[]),
        ]
        .concat(),
    );
    let server = server_with(&auth).await;
    let channel = channel(server.addr).await;
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut replication = ReplicationServiceClient::new(channel);
    let mut c = server.connect().await;
    push_as(
        &mut c,
        ROOT,
        push_request("", vec![put("a.x", "d", json!({}))]),
    )
    .await;

    let tenant = format!("Bearer {TENANT}");
    let tenant = Some(tenant.as_str());
    denied(
        admin.status(call(tenant, StatusRequest {})).await,
        "tenant",
        "Status by an admin of a.*",
    );
    denied(
        admin.promote(call(tenant, PromoteRequest {})).await,
        "tenant",
        "Promote by an admin of a.*",
    );
    denied(
        follow_outcome(&mut replication, tenant).await,
        "tenant",
        "Follow by a replicator of a.*",
    );
    let replicator = format!("Bearer {REPLICATOR}");
    denied(
        admin
            .status(call(Some(&replicator), StatusRequest {}))
            .await,
        "replicator",
        "Status by a replicator",
    );
    follow_outcome(&mut replication, Some(&replicator))
        .await
        .expect("a replicator of * follows");
    let operator = format!("Bearer {OPERATOR}");
    let status = admin
        .status(call(Some(&operator), StatusRequest {}))
        .await
        .expect("an admin of * asks Status")
        .into_inner();
    assert_eq!(status.head, 1);

    for (name, token) in [("operator", OPERATOR), ("replicator", REPLICATOR)] {
        let get = GetRequest {
            collection: "a.x".into(),
            ids: vec!["d".into()],
            ..Default::default()
        };
        denied(
            c.get(bearer(token, get)).await,
            "collection",
            &format!("Get by {name}"),
        );
        let nothing = pull_all(&mut c, Some(token), &[]).await;
        assert!(nothing.is_empty(), "{name} reads nothing: {nothing:?}");
    }
}

// ---------------------------------------------------------------------------
// 3. Replication needs `replicate` on `*`
// ---------------------------------------------------------------------------

/// Reads everything and may replicate `docs`, which is no replication.
const NARROW: &str = "narrow-token";

/// The AdminService.Status of the node at `url`, asked as `token`.
async fn status_as(url: &str, token: &str) -> pb::StatusResponse {
    let mut admin = AdminServiceClient::connect(url.to_owned())
        .await
        .expect("connect");
    admin
        .status(bearer(token, StatusRequest {}))
        .await
        .expect("status with an admin token")
        .into_inner()
}

/// Waits until `replica` has the primary's head, documents and the
/// writer's client state, read with tokens (every node runs with auth).
async fn converged(primary: &Process, replica: &Process) {
    let head = status_as(&primary.url(), ROOT).await.head;
    let wait = Patience::new(format!("replica {} reaches head {head}", replica.url()));
    while status_as(&replica.url(), ROOT).await.head != head {
        wait.tick().await;
    }
    let (mut p, mut r) = (primary.client().await, replica.client().await);
    let expected = (
        pull_all(&mut p, Some(ROOT), &[]).await,
        last_mutation_id_as(&mut p, WRITER, "w").await,
    );
    assert!(expected.1 > 0, "the writer pushed with mutation ids");
    let wait = Patience::new(format!("replica {} reads as the primary", replica.url()));
    loop {
        let got = (
            pull_all(&mut r, Some(ROOT), &[]).await,
            last_mutation_id_as(&mut r, WRITER, "w").await,
        );
        if got == expected {
            return;
        }
        wait.tick().await;
    }
}

/// Writes `path` as a rotation does: aside, then renamed over.
fn write_token(path: &Path, token: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, format!("{token}\n")).expect("write token file");
    std::fs::rename(&aside, path).expect("rename token file");
}

/// Rule: a replica whose --upstream-token-file holds a token without
/// `replicate` on `*` (read on everything and replicate on one collection
/// are not enough) cannot follow: its head stays 0 and the primary lists
/// it as no replica; with a token that has it, a replica follows and
/// converges, forwarded writes carry the caller's token, and the refused
/// replica follows once its token file is rotated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_needs_replicate_on_everything() {
    let auth = AuthFile::new(
        &[
            principal("root", ROOT, &[(&["*"], ALL)], &[]),
            principal("writer", WRITER, &[(&["docs"], &["write"])], &[]),
            principal("replicator", REPLICATOR, &[(&["*"], &["replicate"])], &[]),
            principal(
                "narrow",
                NARROW,
                &[(&["*"], &["read"]), (&["docs"], &["replicate"])],
                &[],
            ),
        ]
        .concat(),
    );
    let tokens = tempfile::tempdir().expect("temp dir");
    let (narrow_file, replicator_file) = (
        tokens.path().join("narrow.token"),
        tokens.path().join("replicator.token"),
    );
    write_token(&narrow_file, NARROW);
    write_token(&replicator_file, REPLICATOR);

    let dirs = [DataDir::new(), DataDir::new(), DataDir::new()];
    let primary = common::cluster::start(&dirs[0], &["--auth-file", auth.arg()]);
    let mut p = primary.client().await;
    for i in 1..=3u64 {
        let req = push_request(
            "w",
            vec![put("docs", &format!("d{i}"), json!({"i": i})).id(i)],
        );
        push_as(&mut p, WRITER, req).await;
    }

    let narrow_arg = narrow_file.to_str().expect("utf-8 temp path");
    let (refused_replica, logs) = start_replica_logged(
        &dirs[1],
        &primary.url(),
        &[
            "--auth-file",
            auth.arg(),
            "--upstream-token-file",
            narrow_arg,
        ],
    );
    until_upstream_denied(&logs).await;
    assert_eq!(logged(&logs, "INFO", "following the primary"), 0);
    assert_eq!(status_as(&refused_replica.url(), ROOT).await.head, 0);
    assert!(status_as(&primary.url(), ROOT).await.replicas.is_empty());

    let replicator_arg = replicator_file.to_str().expect("utf-8 temp path");
    let replica = common::cluster::start_replica(
        &dirs[2],
        &primary.url(),
        &[
            "--auth-file",
            auth.arg(),
            "--upstream-token-file",
            replicator_arg,
        ],
    );
    converged(&primary, &replica).await;
    // A write through the replica goes to the primary with the caller's
    // token (the replica refuses one without a token itself).
    let mut r = replica.client().await;
    let forwarded = push_request("w", vec![put("docs", "via-replica", json!({"v": 1})).id(4)]);
    refused(
        r.push(Request::new(forwarded.clone())).await,
        Code::Unauthenticated,
        "a push through the replica without a token",
    );
    let answer = push_as(&mut r, WRITER, forwarded).await;
    assert_eq!(answer.results[0].outcome, Outcome::Applied as i32);
    let doc = get_as(&mut p, ROOT, "docs", &["via-replica"]).await;
    assert_eq!(doc[0].updated_by, "writer");
    converged(&primary, &replica).await;

    let listed: Vec<_> = status_as(&primary.url(), ROOT)
        .await
        .replicas
        .into_iter()
        .map(|r| r.url)
        .collect();
    assert_eq!(listed, [replica.url()], "only the replica with replicate");
    assert_eq!(status_as(&refused_replica.url(), ROOT).await.head, 0);

    // The token file is read at every connection: rotated, it follows.
    write_token(&narrow_file, REPLICATOR);
    converged(&primary, &refused_replica).await;
}

// ---------------------------------------------------------------------------
// 4. Client ids are per principal
// ---------------------------------------------------------------------------

/// Rule: two principals using the same client id and mutation id are two
/// clients: both are APPLIED, each Pull reports its own last mutation id
/// (a third principal learns nothing), a retry is DUPLICATE only for its
/// own principal, and `updated_by` is the principal's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_belong_to_their_principal() {
    const ALICE: &str = "alice-token";
    const BOB: &str = "bob-token";
    const CAROL: &str = "carol-token";
    let auth = AuthFile::new(
        &[
            principal("alice", ALICE, NOTES, &[]),
            principal("bob", BOB, NOTES, &[]),
            principal("carol", CAROL, &[(&["notes"], &["read"])], &[]),
        ]
        .concat(),
    );
    let server = server_with(&auth).await;
    let mut c = server.connect().await;
    let first = |id: &str| push_request("c1", vec![put("notes", id, json!({"by": id})).id(1)]);

    let a = push_as(&mut c, ALICE, first("a")).await;
    assert_eq!(a.results[0].outcome, Outcome::Applied as i32, "alice's 1");
    let a2 = push_request("c1", vec![put("notes", "a2", json!({"v": 2})).id(2)]);
    push_as(&mut c, ALICE, a2).await;
    let b = push_as(&mut c, BOB, first("b")).await;
    assert_eq!(
        b.results[0].outcome,
        Outcome::Applied as i32,
        "bob's 1 is not alice's"
    );
    assert_eq!(b.last_mutation_id, 1, "bob's push reports bob's id");

    let retry = push_as(&mut c, ALICE, first("a")).await;
    assert_eq!(
        retry.results[0].outcome,
        Outcome::Duplicate as i32,
        "alice's retry"
    );
    assert_eq!(last_mutation_id_as(&mut c, ALICE, "c1").await, 2);
    assert_eq!(last_mutation_id_as(&mut c, BOB, "c1").await, 1);
    assert_eq!(last_mutation_id_as(&mut c, CAROL, "c1").await, 0);

    let docs = get_as(&mut c, CAROL, "notes", &["a", "a2", "b"]).await;
    let authors: Vec<_> = docs
        .iter()
        .map(|d| (d.id.as_str(), d.updated_by.as_str()))
        .collect();
    assert_eq!(authors, [("a", "alice"), ("a2", "alice"), ("b", "bob")]);
    let pulled: Vec<_> = pull_all(&mut c, Some(CAROL), &[])
        .await
        .into_iter()
        .map(|d| (d.id, d.updated_by))
        .collect();
    let expected = [("a", "alice"), ("a2", "alice"), ("b", "bob")]
        .map(|(id, by)| (id.to_owned(), by.to_owned()));
    assert_eq!(pulled, expected, "updated_by as Pull tells it");
}

// ---------------------------------------------------------------------------
// 5. Reloading the file
// ---------------------------------------------------------------------------

const X: &str = "x-token";
const Y: &str = "y-token";
const Z: &str = "z-token";

/// The principals `x` and `y` (each may read and write `notes`).
fn x_and_y() -> String {
    [principal("x", X, NOTES, &[]), principal("y", Y, NOTES, &[])].concat()
}

/// Whether `token`'s Pull is refused as UNAUTHENTICATED (any other error
/// fails the test).
async fn unauthenticated(c: &mut Client, token: &str) -> bool {
    match c.pull(bearer(token, PullRequest::default())).await {
        Ok(_) => false,
        Err(s) if s.code() == Code::Unauthenticated => true,
        Err(s) => panic!("a pull refused otherwise: {s:?}"),
    }
}

/// Rule: a token removed from the auth file (renamed over) is refused
/// within seconds, without a restart; a token added in the same change
/// works; another principal's open Subscribe keeps receiving changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_token_is_refused_without_a_restart() {
    let auth = AuthFile::new(&x_and_y());
    let server = server_with(&auth).await;
    let mut c = server.connect().await;
    let mut stream = c
        .subscribe(bearer(Y, SubscribeRequest::default()))
        .await
        .expect("y subscribes")
        .into_inner();
    push_as(
        &mut c,
        X,
        push_request("", vec![put("notes", "from-x", json!({}))]),
    )
    .await;
    read_until_doc(&mut stream, "notes", "from-x").await;
    refused(
        c.pull(bearer(Z, PullRequest::default())).await,
        Code::Unauthenticated,
        "z before it is added",
    );

    auth.replace(&[principal("y", Y, NOTES, &[]), principal("z", Z, NOTES, &[])].concat());
    until("x's token is refused", RELOAD, async || {
        unauthenticated(&mut c, X).await
    })
    .await;
    let push = push_request("", vec![put("notes", "x-again", json!({}))]);
    refused(
        c.push(bearer(X, push)).await,
        Code::Unauthenticated,
        "x's push",
    );
    refused(
        subscribe_outcome(&mut c, bearer(X, SubscribeRequest::default())).await,
        Code::Unauthenticated,
        "x's subscribe",
    );
    push_as(
        &mut c,
        Z,
        push_request("", vec![put("notes", "from-z", json!({}))]),
    )
    .await;
    push_as(
        &mut c,
        Y,
        push_request("", vec![put("notes", "from-y", json!({}))]),
    )
    .await;
    let seen = read_until_doc(&mut stream, "notes", "from-y").await;
    let ids: Vec<_> = seen.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["from-z", "from-y"], "y's stream after the change");
}

/// Rule: an auth file that does not load (not TOML; or TOML with one bad
/// principal) is logged and the previous rules stay in force whole; a
/// valid file after it is loaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_file_that_does_not_load_keeps_the_previous_rules() {
    let auth = AuthFile::new(&x_and_y());
    let dir = DataDir::new();
    let (server, logs) =
        Process::start_logged_from_launch(dir.as_ref(), &["--auth-file", auth.arg()]);
    let mut c = server.client().await;
    let reloads = |logs: &Logs| logged(logs, "INFO", "auth file reloaded");
    let failures = |logs: &Logs| logged(logs, "ERROR", "auth file not reloaded");

    auth.replace(&principal("y", Y, NOTES, &[]));
    until("the file without x is loaded", RELOAD, async || {
        reloads(&logs) == 1
    })
    .await;
    assert!(unauthenticated(&mut c, X).await, "x is revoked");

    // Not TOML; then TOML whose second principal is invalid (were it
    // taken in part, x would be back and y gone).
    let broken =
        principal("x", X, NOTES, &[]) + "[[principal]]\nname = \"y\"\ntokens = [\"y-token\"]\n";
    for (n, (what, text)) in [
        ("garbage", "this is [not toml".to_owned()),
        ("broken", broken),
    ]
    .into_iter()
    .enumerate()
    {
        auth.replace(&text);
        until(&format!("the {what} file is refused"), RELOAD, async || {
            failures(&logs) == n + 1
        })
        .await;
        assert!(
            unauthenticated(&mut c, X).await,
            "x stays revoked ({what} file)"
        );
        let req = push_request("", vec![put("notes", &format!("y{n}"), json!({}))]);
        push_as(&mut c, Y, req).await;
        assert_eq!(
            get_as(&mut c, Y, "notes", &[&format!("y{n}")]).await.len(),
            1
        );
    }
    assert_eq!(reloads(&logs), 1, "no invalid file was loaded");

    auth.replace(&x_and_y());
    until("the valid file is loaded again", RELOAD, async || {
        reloads(&logs) == 2
    })
    .await;
    assert!(!unauthenticated(&mut c, X).await, "x is back");
}

/// Rule: a server given an auth file that does not load does not start:
/// `serve` returns a configuration error naming the file, and the binary
/// exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_auth_file_stops_the_server_from_starting() {
    let cases = [
        ("not TOML", "this is [not toml".to_owned()),
        (
            "a plain token",
            "[[principal]]\nname = \"p\"\ntokens = [\"p-token\"]\n".to_owned(),
        ),
        (
            "an unknown permission",
            principal("p", "p-token", &[(&["*"], &["everything"])], &[]),
        ),
    ];
    for (what, text) in cases {
        let auth = AuthFile::new(&text);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = deltasync::Config::for_data_dir(dir.path().join("store"));
        config.auth_file = Some(auth.path.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let served = tokio::time::timeout(
            HANG,
            deltasync::serve(config, listener, std::future::pending()),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the server serves"));
        match served {
            Err(deltasync::ServeError::Config(e)) => {
                assert!(e.contains(auth.arg()), "{what}: {e}");
            }
            other => panic!("{what}: expected a configuration error, got {other:?}"),
        }
    }

    let missing = tempfile::tempdir().expect("temp dir");
    let auth = AuthFile::new("this is [not toml");
    for (what, path) in [
        ("not TOML", auth.path.clone()),
        ("missing", missing.path().join("none.toml")),
    ] {
        let data = DataDir::new();
        let output = run_to_exit(
            Command::new(env!("CARGO_BIN_EXE_deltasync"))
                .args(["--listen", "127.0.0.1:0", "--data-dir"])
                .arg(data.as_ref())
                .arg("--auth-file")
                .arg(&path),
            HANG,
        );
        assert!(!output.status.success(), "{what}: {:?}", output.status);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("auth file"), "{what}: {stderr}");
        assert!(!stderr.contains("serving gRPC"), "{what}: {stderr}");
    }
}

// ---------------------------------------------------------------------------
// 6. `deltasync token new`
// ---------------------------------------------------------------------------

/// Rule: `deltasync token new` prints a random 256-bit token (64 lowercase
/// hex characters) and, on the next line, the `sha256:` hash the auth file
/// takes; two runs give two tokens.
#[test]
fn token_new_prints_a_token_and_its_hash() {
    let run = || {
        let output = run_to_exit(
            Command::new(env!("CARGO_BIN_EXE_deltasync")).args(["token", "new"]),
            HANG,
        );
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout).expect("utf-8");
        let lines: Vec<_> = stdout.lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 2, "{stdout:?}");
        let (token, hash) = (&lines[0], &lines[1]);
        assert_eq!(token.len(), 64, "{token:?}");
        assert!(
            token
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{token:?}"
        );
        assert_eq!(*hash, hash_string(token));
        token.clone()
    };
    assert_ne!(run(), run(), "two runs, two tokens");
}
