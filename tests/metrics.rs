//! Metrics: `/metrics` on `--metrics-listen`, scraped over plain HTTP from
//! real servers (in-process, and real processes for replication): RED per
//! RPC with go-grpc-prometheus names, push outcomes, store gauges,
//! subscribers and their lag, compaction, refusals, replica lag, and which
//! labels may appear.

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use common::{
    cluster::{DataDir, wait_for},
    process::{Logs, Process},
    *,
};
use deltasync::pb::{self, Outcome, PushRequest};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

// ---------------------------------------------------------------------------
// Scraping
// ---------------------------------------------------------------------------

/// One sample of the page: its name, labels and value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scraped page, parsed.
#[derive(Debug)]
struct Page {
    /// The text as served.
    text: String,
    /// Its samples.
    samples: Vec<Sample>,
}

impl Page {
    /// The sum of the samples named `name` whose labels include `labels`
    /// (0 if there are none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether some sample named `name` has `labels`.
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
        })
    }
}

/// Parses `name{k="v",...} value` lines (the values written here have no
/// escaped quotes).
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while let Some((key, after)) = rest.split_once("=\"") {
            let (value, after) = after.split_once('"').expect("a closing quote");
            map.insert(key.trim_start_matches(',').to_owned(), value.to_owned());
            rest = after;
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels: map,
            value: value.parse().expect("a number"),
        });
    }
    samples
}

/// `GET /metrics` over a plain TCP stream (HTTP/1.1, connection closed
/// after the answer); `None` while nothing listens there yet.
async fn try_scrape(addr: &str) -> Option<Page> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(Page {
        samples: parse(body),
        text: body.to_owned(),
    })
}

/// Scrapes `addr`, waiting (bounded) for it to listen.
async fn scrape(addr: &str) -> Page {
    let mut page = None;
    wait_for("the metrics port answers", async || {
        page = try_scrape(addr).await;
        page.is_some()
    })
    .await;
    page.expect("a page")
}

/// A loopback address with a port free a moment ago, for an in-process
/// server (a process started on port 0 logs the address it bound; see
/// [`logged_metrics_addr`]).
fn free_loopback_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.local_addr().expect("local addr")
}

/// An in-process server with metrics on, and its metrics address.
async fn server(configure: impl FnOnce(&mut deltasync::Config)) -> (TestServer, String) {
    let addr = free_loopback_addr();
    let s = TestServer::start_with(|c| {
        c.metrics_listen = Some(addr);
        configure(c);
    })
    .await;
    (s, addr.to_string())
}

/// The metrics address a process logged (before "serving gRPC", so it is
/// there once the process has started).
fn logged_metrics_addr(logs: &Logs) -> String {
    logs.lock()
        .expect("logs")
        .iter()
        .find(|e| e["message"] == "serving metrics")
        .and_then(|e| e["addr"].as_str())
        .expect("the address logged")
        .to_owned()
}

const PUSH: (&str, &str) = ("grpc_method", "Push");
const SUBSCRIBE: (&str, &str) = ("grpc_method", "Subscribe");
const HANDLED: &str = "grpc_server_handled_total";
const STARTED: &str = "grpc_server_started_total";
const MUTATIONS: &str = "deltasync_push_mutations_total";

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Rule: after N applied pushes and one conflicting create (strategy
/// reject), `deltasync_push_mutations_total` moves by exactly N for
/// applied and 1 for conflict; `grpc_server_handled_total{Push,OK}` and
/// `grpc_server_started_total{Push}` move by N + 1; each group commit and
/// fsync is observed.
#[tokio::test]
async fn pushes_count_their_outcomes_and_calls() {
    let (s, m) = server(|_| {}).await;
    let mut c = s.client.clone();
    let before = scrape(&m).await;
    const N: u32 = 5;
    for i in 0..N {
        let r = push_one(&mut c, "", put("todos", &format!("d{i}"), json!({"a": i}))).await;
        assert_eq!(outcome(&r), Outcome::Applied);
    }
    let r = push_one(&mut c, "", put("todos", "d0", json!({"a": 9})).base(0)).await;
    assert_eq!(outcome(&r), Outcome::Conflict);

    let after = scrape(&m).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    let applied = [("outcome", "applied"), ("strategy", "reject")];
    let conflict = [("outcome", "conflict"), ("strategy", "reject")];
    assert_eq!(delta(MUTATIONS, &applied), f64::from(N));
    assert_eq!(delta(MUTATIONS, &conflict), 1.0);
    assert_eq!(delta(MUTATIONS, &[]), f64::from(N + 1));
    let ok = [
        PUSH,
        ("grpc_code", "OK"),
        ("grpc_service", "deltasync.v1.SyncService"),
        ("grpc_type", "unary"),
    ];
    assert_eq!(delta(HANDLED, &ok), f64::from(N + 1));
    assert_eq!(delta(STARTED, &[PUSH]), f64::from(N + 1));
    assert_eq!(
        delta("grpc_server_handling_seconds_count", &[PUSH]),
        f64::from(N + 1)
    );
    assert!(delta("deltasync_group_commit_mutations_count", &[]) >= 1.0);
    assert!(delta("deltasync_fsync_seconds_count", &[]) >= 1.0);
}

/// Rule: a failed call is counted with its code's Go name
/// (`InvalidArgument`), not as OK, and a path no service serves is
/// counted as `grpc_method="unknown"`.
#[tokio::test]
async fn a_failed_call_counts_its_code() {
    let (s, m) = server(|_| {}).await;
    let mut c = s.client.clone();
    let status = push_refused(
        &mut c,
        PushRequest {
            mutations: vec![put("", "x", json!({}))],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    let page = scrape(&m).await;
    assert_eq!(
        page.value(HANDLED, &[PUSH, ("grpc_code", "InvalidArgument")]),
        1.0
    );
    assert_eq!(page.value(HANDLED, &[PUSH, ("grpc_code", "OK")]), 0.0);

    // A method this server does not have.
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(format!("http://{}", s.addr))
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    );
    grpc.ready().await.expect("ready");
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/deltasync.v1.SyncService/Nope");
    let unimplemented = grpc
        .unary::<pb::PullRequest, pb::PullResponse, _>(
            tonic::Request::new(pb::PullRequest::default()),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("no such method");
    assert_eq!(unimplemented.code(), Code::Unimplemented);
    let page = scrape(&m).await;
    assert_eq!(
        page.value(
            HANDLED,
            &[("grpc_method", "unknown"), ("grpc_code", "Unimplemented")]
        ),
        1.0
    );
    assert!(!page.text.contains("Nope"));
}

/// Rule: a Subscribe is started at once but handled only when it ends,
/// with its code (a client that drops it: `Canceled`); while it is open
/// `deltasync_subscribers` is 1, and 0 again after.
#[tokio::test]
async fn a_subscribe_is_counted_when_it_ends() {
    let (s, m) = server(|_| {}).await;
    let mut c = s.client.clone();
    let mut stream = open_stream(&mut c, 0).await;
    stream
        .message()
        .await
        .expect("a message")
        .expect("caught up");
    let page = scrape(&m).await;
    assert_eq!(page.value("deltasync_subscribers", &[]), 1.0);
    assert_eq!(page.value(STARTED, &[SUBSCRIBE]), 1.0);
    assert!(!page.has(HANDLED, &[SUBSCRIBE]), "counted before its end");

    drop(stream);
    wait_for("the dropped Subscribe is counted", async || {
        let page = scrape(&m).await;
        page.value(HANDLED, &[SUBSCRIBE, ("grpc_code", "Canceled")]) == 1.0
            && page.value("deltasync_subscribers", &[]) == 0.0
    })
    .await;
    let page = scrape(&m).await;
    assert_eq!(page.value(HANDLED, &[SUBSCRIBE]), 1.0, "counted once");
    assert_eq!(
        page.value("grpc_server_handling_seconds_count", &[SUBSCRIBE]),
        1.0
    );
}

/// Rule: `deltasync_head_seq` is the checkpoint the last push returned;
/// the document and tombstone gauges count the index, and the store's
/// size on disk is reported.
#[tokio::test]
async fn store_gauges_follow_the_store() {
    let (s, m) = server(|_| {}).await;
    let mut c = s.client.clone();
    push(
        &mut c,
        "",
        vec![put("todos", "a", json!({})), put("todos", "b", json!({}))],
    )
    .await;
    let last = push(&mut c, "", vec![delete("todos", "a")]).await;
    let page = scrape(&m).await;
    assert_eq!(
        page.value("deltasync_head_seq", &[]),
        f64::from(u32::try_from(last.checkpoint).expect("small"))
    );
    assert_eq!(page.value("deltasync_documents", &[]), 2.0);
    assert_eq!(page.value("deltasync_tombstones", &[]), 1.0);
    assert!(page.value("deltasync_store_size_bytes", &[]) > 0.0);
}

/// Rule: a subscriber that does not read while many commits happen is
/// overtaken by the live ring: when it reads again it catches up from the
/// log (`deltasync_subscriber_log_fallbacks_total` > 0), and the lag it
/// was handed changes at is observed (`deltasync_subscriber_lag_seqs`
/// count and sum > 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_shows_its_lag() {
    let (s, m) = server(|c| c.feed_capacity = 4).await;
    let mut writer = s.client.clone();
    let mut slow = open_stream(&mut s.connect_small_window().await, 0).await;
    slow.message().await.expect("a message").expect("caught up");
    let filler = "x".repeat(2000);
    let mut head = 0;
    for i in 0..200 {
        let r = push(
            &mut writer,
            "",
            vec![put("todos", &format!("d{i}"), json!({ "f": filler }))],
        )
        .await;
        head = r.checkpoint;
    }
    // Now it reads, to the head.
    let mut seen = 0;
    while seen < head {
        let msg = slow.message().await.expect("a message").expect("open");
        if let Some(pb::subscribe_response::Event::Changes(ch)) = msg.event {
            seen = seen.max(ch.checkpoint);
        }
    }
    let page = scrape(&m).await;
    assert!(
        page.value("deltasync_subscriber_log_fallbacks_total", &[]) > 0.0,
        "no fallback counted"
    );
    assert!(page.value("deltasync_subscriber_lag_seqs_count", &[]) > 0.0);
    assert!(page.value("deltasync_subscriber_lag_seqs_sum", &[]) > 0.0);
}

/// Rule: no label carries a document id or a client id, and without
/// `--metrics-collection-labels` no series has a `collection` label.
#[tokio::test]
async fn labels_carry_no_ids_and_no_collection_by_default() {
    let (s, m) = server(|_| {}).await;
    let mut c = s.client.clone();
    push(
        &mut c,
        "client-id-7f3a",
        vec![put("coll-9c1e", "doc-id-42b8", json!({})).id(1)],
    )
    .await;
    let page = scrape(&m).await;
    assert_eq!(page.value(MUTATIONS, &[("outcome", "applied")]), 1.0);
    for secret in ["client-id-7f3a", "doc-id-42b8", "coll-9c1e"] {
        assert!(!page.text.contains(secret), "{secret} in the page");
    }
    assert!(
        page.samples
            .iter()
            .all(|s| !s.labels.contains_key("collection")),
        "a collection label without the flag"
    );
}

/// Rule: with `--metrics-collection-labels` pushed mutations carry their
/// collection (and still no document or client id).
#[tokio::test]
async fn collection_labels_come_with_the_flag() {
    let (s, m) = server(|c| c.metrics_collection_labels = true).await;
    let mut c = s.client.clone();
    push(
        &mut c,
        "client-id-7f3a",
        vec![
            put("todos", "doc-id-42b8", json!({})).id(1),
            put("notes", "n", json!({})).id(2),
            put("notes", "n2", json!({})).id(3),
        ],
    )
    .await;
    let page = scrape(&m).await;
    let todos = [("collection", "todos"), ("outcome", "applied")];
    let notes = [("collection", "notes"), ("outcome", "applied")];
    assert_eq!(page.value(MUTATIONS, &todos), 1.0);
    assert_eq!(page.value(MUTATIONS, &notes), 2.0);
    assert!(!page.text.contains("doc-id-42b8") && !page.text.contains("client-id-7f3a"));
}

/// Rule: a call refused by `--max-subscribers` is counted under its
/// reason, and by the RPC layer with its code.
#[tokio::test]
async fn refusals_are_counted_by_reason() {
    let (s, m) = server(|c| c.max_subscribers = 1).await;
    let mut c = s.client.clone();
    let mut first = open_stream(&mut c, 0).await;
    first
        .message()
        .await
        .expect("a message")
        .expect("caught up");
    let refused = c
        .subscribe(pb::SubscribeRequest::default())
        .await
        .expect_err("over --max-subscribers");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let page = scrape(&m).await;
    assert_eq!(
        page.value(
            "deltasync_refused_calls_total",
            &[("reason", "max_subscribers")]
        ),
        1.0
    );
    assert_eq!(page.value("deltasync_refused_calls_total", &[]), 1.0);
    assert_eq!(
        page.value(HANDLED, &[SUBSCRIBE, ("grpc_code", "ResourceExhausted")]),
        1.0
    );
}

/// Rule: compaction rounds, the tombstones they purge and the purge
/// horizon are reported.
#[tokio::test]
async fn compaction_is_reported() {
    let ahead = Arc::new(AtomicU64::new(0));
    let addr = free_loopback_addr();
    let s = TestServer::start_with_clock(&ahead, |c| c.metrics_listen = Some(addr)).await;
    let m = addr.to_string();
    let mut c = s.client.clone();
    push_one(&mut c, "", put("todos", "gone", json!({"a": 1}))).await;
    let tomb = push_one(&mut c, "", delete("todos", "gone")).await;
    let tomb_seq = tomb.document.expect("the tombstone").seq;
    ahead.store(2 * HOUR + 60, Ordering::Relaxed);
    wait_for("the tombstone is purged and counted", async || {
        scrape(&m)
            .await
            .value("deltasync_compaction_tombstones_purged_total", &[])
            == 1.0
    })
    .await;
    let page = scrape(&m).await;
    assert!(page.value("deltasync_compaction_rounds_total", &[]) >= 1.0);
    assert!(page.value("deltasync_compaction_round_seconds_count", &[]) >= 1.0);
    assert_eq!(
        page.value("deltasync_purge_horizon_seq", &[]),
        f64::from(u32::try_from(tomb_seq).expect("small"))
    );
    assert_eq!(page.value("deltasync_tombstones", &[]), 0.0);
}

/// Rule: processes started with `--metrics-listen 127.0.0.1:0` log the
/// address they bound; a primary reports
/// `deltasync_replica_lag_seqs{replica=<its advertised url>}` and the seq
/// it acknowledged while the replica follows, and drops the series once
/// it is gone; the replica reports what it applied and its lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_reports_its_replicas_lag() {
    let (dp, dr) = (DataDir::new(), DataDir::new());
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let (primary, primary_logs) = Process::start_logged_from_launch(dp.as_ref(), &metrics);
    let pm = logged_metrics_addr(&primary_logs);
    let primary_url = primary.url();
    let mut args = vec!["--replicate-from", primary_url.as_str()];
    args.extend(metrics);
    let (replica, replica_logs) = Process::start_logged_from_launch(dr.as_ref(), &args);
    let rm = logged_metrics_addr(&replica_logs);
    let url = replica.url();

    let mut c = primary.client().await;
    let head = push(&mut c, "", vec![put("todos", "a", json!({}))])
        .await
        .checkpoint;
    let head = f64::from(u32::try_from(head).expect("small"));
    let replica_label = [("replica", url.as_str())];
    wait_for("the replica's ack is reported", async || {
        let page = scrape(&pm).await;
        page.has("deltasync_replica_lag_seqs", &replica_label)
            && page.value("deltasync_replica_acked_seq", &replica_label) == head
    })
    .await;
    assert_eq!(
        scrape(&pm)
            .await
            .value("deltasync_replica_lag_seqs", &replica_label),
        0.0
    );
    assert_eq!(
        scrape(&pm).await.value("deltasync_replicas_connected", &[]),
        1.0
    );
    wait_for("the replica reports what it applied", async || {
        let page = scrape(&rm).await;
        page.value("deltasync_replication_applied_seq", &[]) == head
            && page.value("deltasync_replication_lag_seqs", &[]) == 0.0
    })
    .await;
    // The primary's idle progress (every second) keeps "last heard" fresh.
    let heard = scrape(&rm)
        .await
        .value("deltasync_replication_last_heard_seconds", &[]);
    assert!((0.0..5.0).contains(&heard), "last heard {heard} s ago");

    replica.kill_9();
    wait_for("the gone replica's series are removed", async || {
        let page = scrape(&pm).await;
        !page.has("deltasync_replica_lag_seqs", &[])
            && page.value("deltasync_replicas_connected", &[]) == 0.0
    })
    .await;
}
