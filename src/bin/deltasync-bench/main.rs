//! `deltasync-bench`: the same workloads against deltasync or etcd, on one
//! machine, so they can be compared side by side (see
//! `scripts/bench-vs-etcd.sh`). Built with `--features bench`.
//!
//! Each run prints one `RESULT key=value ...` line for the scripts, and a
//! human summary on stderr.

mod replicate;
mod store;
mod target;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use target::{Conn, Error, Kind};

/// The server's allocator, so the `store` workload measures sled as the
/// server runs it (the client side is the same for both targets).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "deltasync-bench",
    about = "Benchmarks deltasync or etcd with the same workloads"
)]
struct Args {
    /// System under test.
    #[arg(long, value_enum, default_value_t = Kind::Deltasync)]
    target: Kind,
    /// Its gRPC endpoint (not used by `store`).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// The server's pid, to report its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// N concurrent clients, each pushing M mutations per request.
    Push {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        body: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Each client pushes with its own client id and increasing
        /// mutation ids (deltasync records them for retries).
        #[arg(long)]
        tracked: bool,
    },
    /// The ceiling for any unary call here: N concurrent clients, each on
    /// its own connection as in `push`, calling `grpc.health.v1.Health/Check`
    /// (which both servers answer without touching storage).
    Ping {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// sled alone, no server: the storage engine's floor for a push of new
    /// documents (one writer thread, one flush per group), by layout.
    Store {
        #[arg(long, value_enum, default_value_t = store::Layout::Log)]
        layout: store::Layout,
        #[arg(long, default_value_t = 300_000)]
        docs: u64,
        /// Documents per group commit (push100's 16 clients x 100).
        #[arg(long, default_value_t = 1600)]
        group: u64,
        #[arg(long, default_value_t = 300)]
        body: usize,
    },
    /// Loads K documents (untimed), then one Subscribe/Watch from the start
    /// receives them all: how fast a replica catches up.
    Catchup {
        #[arg(long, default_value_t = 1_000_000)]
        docs: usize,
        #[arg(long, default_value_t = 256)]
        body: usize,
    },
    /// Loads K documents (untimed), then reads them all from the start in pages.
    Pull {
        #[arg(long, default_value_t = 1_000_000)]
        docs: usize,
        #[arg(long, default_value_t = 1000)]
        page: usize,
        #[arg(long, default_value_t = 256)]
        body: usize,
        /// Skip loading: the documents are already there.
        #[arg(long)]
        no_load: bool,
    },
    /// S live subscribers while writes arrive at W per second: delivery
    /// latency from write acknowledgement to receipt, exactly once each.
    Subscribe {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 256)]
        body: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Connections the subscribers share.
        #[arg(long, default_value_t = 10)]
        connections: usize,
    },
    /// Closed-loop pushes to a primary while a live Subscribe on each
    /// replica notes when it applied what: replica apply rate and
    /// replication lag (primary ack to replica applied). deltasync only.
    Replicate {
        /// The replicas' gRPC endpoints, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        replicas: Vec<String>,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        body: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Most documents pushed per second (0: closed loop, as fast as
        /// the primary answers).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Opens many idle streams to measure server memory per subscriber, then
    /// writes a few changes and checks every stream gets each exactly once.
    Soak {
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        #[arg(long, default_value_t = 100)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        writes: usize,
    },
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let rss_before = rss_kb(args.server_pid);
    let result = match args.workload {
        Workload::Push {
            clients,
            batch,
            body,
            duration,
            tracked,
        } => push(&args, clients, batch, body, duration, tracked).await?,
        Workload::Ping { clients, duration } => ping(&args, clients, duration).await?,
        Workload::Store {
            layout,
            docs,
            group,
            body,
        } => {
            let dir =
                std::env::temp_dir().join(format!("deltasync-bench-store-{}", std::process::id()));
            let per_s = tokio::task::block_in_place(|| store::run(&dir, layout, docs, group, body));
            let _ = std::fs::remove_dir_all(&dir);
            let per_s = per_s?;
            eprintln!("store: {layout:?}: {per_s:.0} docs/s");
            format!(
                "workload=store layout={layout:?} docs={docs} group={group} body={body} docs_per_s={per_s:.0}"
            )
        }
        Workload::Catchup { docs, body } => catchup(&args, docs, body).await?,
        Workload::Pull {
            docs,
            page,
            body,
            no_load,
        } => pull(&args, docs, page, body, no_load).await?,
        Workload::Subscribe {
            subscribers,
            rate,
            body,
            duration,
            connections,
        } => subscribe(&args, subscribers, rate, body, duration, connections).await?,
        Workload::Soak {
            streams,
            connections,
            writes,
        } => soak(&args, streams, connections, writes, rss_before).await?,
        Workload::Replicate {
            ref replicas,
            clients,
            batch,
            body,
            duration,
            rate,
        } => {
            let load = Load {
                clients,
                batch,
                body,
                duration,
            };
            replicate::run(&args, replicas, load, rate).await?
        }
    };
    let rss = rss_kb(args.server_pid).map_or_else(|| "na".to_owned(), |kb| kb.to_string());
    println!(
        "RESULT target={:?} {} server_rss_kb={rss}",
        args.target, result
    );
    Ok(())
}

/// The shape of a push load.
struct Load {
    clients: usize,
    batch: usize,
    body: usize,
    duration: Duration,
}

/// A `body`-byte value, built once per run (and once per encoding).
fn value(body: usize) -> target::Value {
    target::Value::new("x".repeat(body))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is valid")
}

fn latency_fields(h: &Histogram<u64>) -> String {
    format!(
        "p50_us={} p99_us={} max_us={}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    )
}

/// Resident memory of a process, from /proc (Linux).
fn rss_kb(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One client's closed loop of puts: each push writes `batch` new keys and
/// waits for its answer before the next.
struct PushLoop<'a> {
    /// The connection pushed on.
    conn: &'a mut Conn,
    /// Makes this client's keys its own.
    prefix: String,
    /// Documents per push.
    batch: usize,
    /// Every document's value.
    value: &'a target::Value,
    /// The client id whose mutation ids are tracked (none: untracked).
    client: Option<&'a str>,
}

impl<'a> PushLoop<'a> {
    fn new(
        conn: &'a mut Conn,
        prefix: String,
        batch: usize,
        value: &'a target::Value,
        client: Option<&'a str>,
    ) -> Self {
        Self {
            conn,
            prefix,
            batch,
            value,
            client,
        }
    }

    /// Pushes until `deadline` (one push per tick of `pace`, if given), and
    /// hands each answer's checkpoint and sending time to `answered`.
    /// Returns the number of pushes.
    async fn run(
        &mut self,
        deadline: Instant,
        mut pace: Option<tokio::time::Interval>,
        mut answered: impl FnMut(u64, Instant) -> Result<(), Error>,
    ) -> Result<usize, Error> {
        let mut n = 0usize;
        while Instant::now() < deadline {
            if let Some(pace) = &mut pace {
                pace.tick().await;
            }
            let keys: Vec<String> = (0..self.batch)
                .map(|i| format!("{}-{n}-{i}", self.prefix))
                .collect();
            let first = u64::try_from(n * self.batch + 1)?;
            let sent = Instant::now();
            let tracked = self.client.map(|client| (client, first));
            let checkpoint = self.conn.put_tracked(&keys, self.value, tracked).await?;
            answered(checkpoint, sent)?;
            n += 1;
        }
        Ok(n)
    }
}

async fn push(
    args: &Args,
    clients: usize,
    batch: usize,
    body: usize,
    duration: Duration,
    tracked: bool,
) -> Result<String, Error> {
    let value = Arc::new(value(body));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut conn = Conn::connect(args.target, &args.endpoint).await?;
        let value = value.clone();
        let client = format!("bench-{c}");
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let client = tracked.then_some(client.as_str());
            let mut load = PushLoop::new(&mut conn, format!("p{c}"), batch, &value, client);
            let n = load
                .run(deadline, None, |_, sent| {
                    Ok(h.record(micros(sent.elapsed()))?)
                })
                .await?;
            Ok::<_, Error>((h, n))
        }));
    }
    let (all, requests) = gather(tasks).await?;
    let secs = start.elapsed().as_secs_f64();
    let docs = requests * batch;
    eprintln!(
        "push: {clients} clients x {batch}/request, {body} B: {:.0} requests/s, {:.0} docs/s",
        requests as f64 / secs,
        docs as f64 / secs
    );
    Ok(format!(
        "workload=push clients={clients} batch={batch} body={body} tracked={tracked} requests_per_s={:.0} docs_per_s={:.0} {}",
        requests as f64 / secs,
        docs as f64 / secs,
        latency_fields(&all)
    ))
}

async fn ping(args: &Args, clients: usize, duration: Duration) -> Result<String, Error> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut health = target::health(&args.endpoint).await?;
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let sent = Instant::now();
                health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await?;
                h.record(micros(sent.elapsed()))?;
                n += 1;
            }
            Ok::<_, Error>((h, n))
        }));
    }
    let (all, calls) = gather(tasks).await?;
    let per_s = calls as f64 / start.elapsed().as_secs_f64();
    eprintln!("ping: {clients} clients: {per_s:.0} calls/s");
    Ok(format!(
        "workload=ping clients={clients} calls_per_s={per_s:.0} {}",
        latency_fields(&all)
    ))
}

/// What one closed-loop client measured: its latencies and how many calls
/// it made.
type ClientRun = Result<(Histogram<u64>, usize), Error>;

/// Merges the latencies and call counts of closed-loop clients.
async fn gather(clients: Vec<tokio::task::JoinHandle<ClientRun>>) -> ClientRun {
    let mut all = histogram();
    let mut calls = 0;
    for client in clients {
        let (h, n) = client.await??;
        all.add(h)?;
        calls += n;
    }
    Ok((all, calls))
}

/// Writes `docs` documents of `body` bytes from 4 concurrent loaders
/// (untimed setup for the read workloads).
async fn load(args: &Args, docs: usize, body: usize) -> Result<(), Error> {
    let value = Arc::new(value(body));
    let started = Instant::now();
    // etcd refuses transactions of more than 128 operations by default.
    let chunk = match args.target {
        Kind::Deltasync => 1000,
        Kind::Etcd => 128,
    };
    let loaders = 4;
    let mut tasks = Vec::new();
    for l in 0..loaders {
        let mut conn = Conn::connect(args.target, &args.endpoint).await?;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = l * chunk;
            while i < docs {
                let keys: Vec<String> = (i..(i + chunk).min(docs))
                    .map(|k| format!("d{k:08}"))
                    .collect();
                conn.put(&keys, &value).await?;
                i += loaders * chunk;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    eprintln!(
        "loaded {docs} documents in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Loads K documents (untimed), then follows changes from the very start on
/// one stream until all K have arrived: a replica catching up.
async fn catchup(args: &Args, docs: usize, body: usize) -> Result<String, Error> {
    load(args, docs, body).await?;
    let mut conn = Conn::connect(args.target, &args.endpoint).await?;
    let started = Instant::now();
    let mut watch = conn.watch_from_start().await?;
    let mut read = 0;
    while read < docs {
        match watch.next().await? {
            Some(ids) => read += ids.len(),
            None => return Err(format!("stream ended after {read} of {docs}").into()),
        }
    }
    let per_s = read as f64 / started.elapsed().as_secs_f64();
    eprintln!("catchup: {read} documents on one stream: {per_s:.0} docs/s");
    Ok(format!(
        "workload=catchup docs={read} body={body} docs_per_s={per_s:.0}"
    ))
}

async fn pull(
    args: &Args,
    docs: usize,
    page: usize,
    body: usize,
    no_load: bool,
) -> Result<String, Error> {
    if !no_load {
        load(args, docs, body).await?;
    }
    let mut conn = Conn::connect(args.target, &args.endpoint).await?;
    let started = Instant::now();
    let read = conn.read_all(page).await?;
    let secs = started.elapsed().as_secs_f64();
    if read < docs {
        return Err(format!("read {read} documents, expected at least {docs}").into());
    }
    eprintln!(
        "pull: {read} documents in {secs:.2}s: {:.0} docs/s",
        read as f64 / secs
    );
    Ok(format!(
        "workload=pull docs={read} page={page} body={body} docs_per_s={:.0} seconds={secs:.3}",
        read as f64 / secs
    ))
}

/// Opens `count` live watches spread over `connections` connections.
async fn open_watches(
    args: &Args,
    count: usize,
    connections: usize,
) -> Result<Vec<target::Watch>, Error> {
    let mut conns = Vec::new();
    for _ in 0..connections.max(1) {
        conns.push(Conn::connect(args.target, &args.endpoint).await?);
    }
    let mut watches = Vec::with_capacity(count);
    for i in 0..count {
        let len = conns.len();
        watches.push(conns[i % len].watch().await?);
    }
    Ok(watches)
}

/// Writes `total` single-key writes `w{n}` at `rate`/s from a few writer
/// tasks, recording each acknowledgement time (µs since `epoch`).
fn spawn_writes(
    args: &Args,
    total: usize,
    rate: u64,
    body: usize,
    epoch: Instant,
    acked: Arc<Vec<AtomicU64>>,
) -> tokio::task::JoinHandle<Result<(), Error>> {
    let (kind, endpoint) = (args.target, args.endpoint.clone());
    tokio::spawn(async move {
        let writers = 8;
        let value = Arc::new(value(body));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let mut conn = Conn::connect(kind, &endpoint).await?;
            let (value, acked) = (value.clone(), acked.clone());
            let period = Duration::from_secs_f64(writers as f64 / rate.max(1) as f64);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for n in (w..total).step_by(writers) {
                    tick.tick().await;
                    conn.put(&[format!("w{n}")], &value).await?;
                    acked[n].store(micros(epoch.elapsed()).max(1), Ordering::Release);
                }
                Ok::<_, Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    })
}

/// Reads a watch until it has seen all `total` writes; records latency from
/// acknowledgement (0 if received before the ack) and fails on a duplicate.
fn spawn_reader(
    mut watch: target::Watch,
    total: usize,
    epoch: Instant,
    acked: Arc<Vec<AtomicU64>>,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<Histogram<u64>, Error>> {
    tokio::spawn(async move {
        let mut seen = vec![false; total];
        let mut count = 0;
        let mut h = histogram();
        let read = async {
            while count < total {
                let Some(keys) = watch.next().await? else {
                    return Err::<(), Error>("stream ended".into());
                };
                let now = micros(epoch.elapsed());
                for key in keys {
                    let n: usize = key
                        .strip_prefix('w')
                        .and_then(|n| n.parse().ok())
                        .ok_or("unexpected key")?;
                    if std::mem::replace(&mut seen[n], true) {
                        return Err(format!("write {n} delivered twice").into());
                    }
                    count += 1;
                    let ack = acked[n].load(Ordering::Acquire);
                    h.record(if ack == 0 { 0 } else { now.saturating_sub(ack) })?;
                }
            }
            Ok(())
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| format!("saw {count} of {total} writes in time"))??;
        Ok(h)
    })
}

async fn subscribe(
    args: &Args,
    subscribers: usize,
    rate: u64,
    body: usize,
    duration: Duration,
    connections: usize,
) -> Result<String, Error> {
    let total = usize::try_from(rate.saturating_mul(duration.as_secs().max(1)))?;
    let watches = open_watches(args, subscribers, connections).await?;
    let epoch = Instant::now();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let readers: Vec<_> = watches
        .into_iter()
        .map(|w| spawn_reader(w, total, epoch, acked.clone(), duration * 6))
        .collect();
    let started = Instant::now();
    spawn_writes(args, total, rate, body, epoch, acked).await??;
    let write_secs = started.elapsed().as_secs_f64();
    let mut all = histogram();
    for r in readers {
        all.add(r.await??)?;
    }
    eprintln!(
        "subscribe: {subscribers} subscribers, {total} writes at {:.0}/s, all delivered exactly once; {}",
        total as f64 / write_secs,
        latency_fields(&all)
    );
    Ok(format!(
        "workload=subscribe subscribers={subscribers} writes={total} write_rate={:.0} deliveries={} {}",
        total as f64 / write_secs,
        all.len(),
        latency_fields(&all)
    ))
}

async fn soak(
    args: &Args,
    streams: usize,
    connections: usize,
    writes: usize,
    rss_before: Option<u64>,
) -> Result<String, Error> {
    let opened = Instant::now();
    let watches = open_watches(args, streams, connections).await?;
    // Let the server settle, then read its memory with every stream idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = rss_kb(args.server_pid);
    let per_stream = match (rss_before, rss_open) {
        (Some(before), Some(after)) => format!(
            "{:.1}",
            after.saturating_sub(before) as f64 * 1024.0 / streams as f64 / 1000.0
        ),
        _ => "na".into(),
    };
    eprintln!(
        "soak: {streams} streams open in {:.1}s; server RSS {rss_before:?} -> {rss_open:?} kB ({per_stream} kB per stream)",
        opened.elapsed().as_secs_f64()
    );
    let epoch = Instant::now();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..writes).map(|_| AtomicU64::new(0)).collect());
    let readers: Vec<_> = watches
        .into_iter()
        .map(|w| spawn_reader(w, writes, epoch, acked.clone(), Duration::from_secs(300)))
        .collect();
    spawn_writes(args, writes, 100, 256, epoch, acked).await??;
    let mut all = histogram();
    for r in readers {
        all.add(r.await??)?;
    }
    eprintln!(
        "soak: every stream got all {writes} writes exactly once; {}",
        latency_fields(&all)
    );
    Ok(format!(
        "workload=soak streams={streams} connections={connections} writes={writes} rss_before_kb={} rss_open_kb={} kb_per_stream={per_stream} {}",
        rss_before.map_or("na".into(), |v| v.to_string()),
        rss_open.map_or("na".into(), |v| v.to_string()),
        latency_fields(&all)
    ))
}
