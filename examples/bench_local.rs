//! Benchmarks of local replicas (issue 15), against a server started in
//! this process on a temporary store (so client and server share the
//! machine's cores: read the figures as an upper bound of the cost).
//!
//! ```sh
//! cargo run --release --example bench_local                 # 3 runs, medians
//! RUNS=1 PENDING=2000 PULL_DOCS=5000 cargo run --release --example bench_local
//! ```
//!
//! Per run:
//! - **local write latency**: `PENDING` (10,000) patches, made while the
//!   server is away, each durable (committed and flushed) on return:
//!   p50, p99, max, and writes per second;
//! - **convergence after reconnect**: the server starts, and one
//!   [`LocalReplica::sync`] pushes those `PENDING` writes (over `DOCS`
//!   documents, 2,000) and catches up: its time, and mutations per second;
//! - **pull throughput**: a new replica's first sync of a server holding
//!   `PULL_DOCS` (10,000) more documents of 200 bytes: documents per second.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use deltasync::{
    Config,
    client::{Client, Mutation},
    replica::{LocalReplica, ReplicaOptions, Resolver},
};
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p`-th percentile (0-100) of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted[at]
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Median durable local write.
    write_p50: Duration,
    /// 99th percentile durable local write.
    write_p99: Duration,
    /// Slowest durable local write.
    write_max: Duration,
    /// Local writes per second, one writer.
    writes_per_s: f64,
    /// The sync that pushed every pending write and caught up.
    converge: Duration,
    /// Pending writes pushed per second by that sync.
    converge_per_s: f64,
    /// A new replica's first sync.
    pull: Duration,
    /// Documents per second of that sync.
    pull_per_s: f64,
}

fn replica(dir: &Path, url: &str) -> LocalReplica {
    LocalReplica::init(
        dir,
        ReplicaOptions::new([url]).collection("bench", Resolver::KeepLocal),
        |b| b,
    )
    .expect("init")
}

fn per_s(n: usize, d: Duration) -> f64 {
    let n = u32::try_from(n).map_or(f64::from(u32::MAX), f64::from);
    n / d.as_secs_f64().max(1e-9)
}

async fn run(pending: usize, docs: usize, pull_docs: usize) -> Run {
    let tmp = tempfile::tempdir().expect("temp dir");
    // The server's address is bound now and served later: until then the
    // replica is offline (it does not try: no sync before the server).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));

    // Local writes, durable, with the server away.
    let r = replica(&tmp.path().join("a"), &url);
    let mut samples = Vec::with_capacity(pending);
    let started = Instant::now();
    for i in 0..pending {
        let t = Instant::now();
        r.patch(
            "bench",
            &format!("d{}", i % docs),
            json!({"n": i, "w": "local"}),
        )
        .expect("write");
        samples.push(t.elapsed());
    }
    let writing = started.elapsed();
    samples.sort();

    // The server comes; one sync pushes everything and catches up.
    let config = Config::for_data_dir(tmp.path().join("server"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(deltasync::serve(config, listener, async {
        let _ = stopped.await;
    }));
    let t = Instant::now();
    let report = r.sync().await.expect("sync");
    let converge = t.elapsed();
    assert_eq!(report.remaining, 0, "{report:?}");
    assert_eq!(report.acknowledged, pending, "{report:?}");

    // More documents on the server, then a new replica's first sync.
    let direct = Client::connect([url.as_str()]).expect("client");
    for chunk in (0..pull_docs).collect::<Vec<_>>().chunks(1000) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| Mutation::put("bench", format!("p{i}"), json!({"pad": "x".repeat(200)})))
            .collect();
        direct.push(batch).await.expect("push");
    }
    let fresh = replica(&tmp.path().join("b"), &url);
    let t = Instant::now();
    let report = fresh.sync().await.expect("pull sync");
    let pull = t.elapsed();
    assert_eq!(report.pulled, pull_docs + docs.min(pending), "{report:?}");

    let _ = stop.send(());
    let _ = server.await;
    Run {
        write_p50: percentile(&samples, 50),
        write_p99: percentile(&samples, 99),
        write_max: samples.last().copied().unwrap_or_default(),
        writes_per_s: per_s(pending, writing),
        converge,
        converge_per_s: per_s(pending, converge),
        pull,
        pull_per_s: per_s(report.pulled, pull),
    }
}

/// The median of a figure over the runs.
fn median<T: PartialOrd + Copy>(runs: &[Run], f: impl Fn(&Run) -> T) -> T {
    let mut v: Vec<T> = runs.iter().map(f).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let runs = env_usize("RUNS", 3).max(1);
    let pending = env_usize("PENDING", 10_000).max(1);
    let docs = env_usize("DOCS", 2_000).max(1);
    let pull_docs = env_usize("PULL_DOCS", 10_000);
    let mut results = Vec::new();
    for i in 0..runs {
        let r = run(pending, docs, pull_docs).await;
        println!("run {}: {r:?}", i + 1);
        results.push(r);
    }
    println!(
        "median of {runs}: local write p50 {:?}, p99 {:?}, max {:?}, {:.0} writes/s; \
         converge after reconnect with {pending} pending (over {docs} documents) {:?} \
         ({:.0} mutations/s); first sync pulling {} documents {:?} ({:.0} documents/s)",
        median(&results, |r| r.write_p50),
        median(&results, |r| r.write_p99),
        median(&results, |r| r.write_max),
        median(&results, |r| r.writes_per_s),
        median(&results, |r| r.converge),
        median(&results, |r| r.converge_per_s),
        pull_docs + docs.min(pending),
        median(&results, |r| r.pull),
        median(&results, |r| r.pull_per_s),
    );
}
