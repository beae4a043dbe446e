//! The `replicate` workload (deltasync only): closed-loop pushes to a
//! primary while the primary's Status, polled every millisecond, tells
//! when each replica acknowledged what as durable: the replicas' apply
//! rate, and replication lag from the primary's answer to a push to the
//! moment a replica has durably applied its checkpoint (to within the
//! poll interval).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use deltasync::pb::{self, admin_service_client::AdminServiceClient};

use crate::{Args, Error, PushLoop, histogram, latency_fields, micros, target::Conn, value};

/// (checkpoint, when) pairs, in checkpoint order.
type Marks = Arc<Mutex<Vec<(u64, Instant)>>>;

/// Polls the primary's Status every millisecond, noting for each replica
/// (by URL) when its acknowledged seq moved: when it had durably applied
/// what. (A Subscribe on the replica would add the replica's own fan-out
/// and the subscriber's decoding to the lag.)
async fn watch_acks(
    primary: String,
    replicas: Vec<String>,
    marks: Vec<Marks>,
) -> Result<(), Error> {
    let channel = tonic::transport::Endpoint::from_shared(primary)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut admin = AdminServiceClient::new(channel);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let status = admin.status(pb::StatusRequest {}).await?.into_inner();
        let now = Instant::now();
        for r in status.replicas {
            let Some(i) = replicas.iter().position(|u| *u == r.url) else {
                continue;
            };
            let mut m = marks[i].lock().map_err(|_| "poisoned")?;
            if m.last().is_none_or(|(c, _)| *c < r.acked) {
                m.push((r.acked, now));
            }
        }
    }
}

/// When the replica had applied `checkpoint`, from its marks.
fn applied_at(marks: &[(u64, Instant)], checkpoint: u64) -> Option<Instant> {
    let i = marks.partition_point(|(c, _)| *c < checkpoint);
    marks.get(i).map(|(_, t)| *t)
}

/// `rate` caps the documents pushed per second (0: as fast as the
/// primary answers).
pub async fn run(
    args: &Args,
    replicas: &[String],
    load: crate::Load,
    rate: u64,
) -> Result<String, Error> {
    let crate::Load {
        clients,
        batch,
        body,
        duration,
    } = load;
    let marks: Vec<Marks> = replicas.iter().map(|_| Marks::default()).collect();
    let followers = vec![tokio::spawn(watch_acks(
        args.endpoint.clone(),
        replicas.to_vec(),
        marks.clone(),
    ))];
    let value = Arc::new(value(body));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut conn = Conn::connect(args.target, &args.endpoint).await?;
        let value = value.clone();
        let client = format!("bench-r{c}");
        // Each client's share of the rate, as one push every `period`.
        let pace = (rate > 0).then(|| {
            let pushes_per_s = rate as f64 / (batch * clients) as f64;
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / pushes_per_s));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            let client = Some(client.as_str());
            PushLoop::new(&mut conn, format!("r{c}"), batch, &value, client)
                .run(deadline, pace, |checkpoint, _| {
                    acks.push((checkpoint, Instant::now()));
                    Ok(())
                })
                .await?;
            Ok::<_, Error>(acks)
        }));
    }
    let mut acks = Vec::new();
    for t in tasks {
        acks.extend(t.await??);
    }
    let load_secs = start.elapsed().as_secs_f64();
    let last = acks.iter().map(|(c, _)| *c).max().unwrap_or(0);
    // Wait (bounded) for every replica to have applied the last push.
    let drain_start = Instant::now();
    while marks.iter().any(|m| {
        m.lock()
            .map(|m| m.last().is_none_or(|(c, _)| *c < last))
            .unwrap_or(true)
    }) {
        if drain_start.elapsed() > Duration::from_secs(120) {
            return Err("replicas did not catch up within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = drain_start.elapsed();
    for f in followers {
        f.abort();
    }
    let mut lag = histogram();
    let mut per_replica = Vec::new();
    // Lag over time, per second of the run: where a tail comes from.
    let mut seconds: Vec<hdrhistogram::Histogram<u64>> = Vec::new();
    for m in &marks {
        let m = m.lock().map_err(|_| "poisoned")?;
        for (checkpoint, acked) in &acks {
            if let Some(at) = applied_at(&m, *checkpoint) {
                let us = micros(at.saturating_duration_since(*acked));
                lag.record(us)?;
                let second = usize::try_from(acked.duration_since(start).as_secs())?;
                while seconds.len() <= second {
                    seconds.push(histogram());
                }
                seconds[second].record(us)?;
            }
        }
        // Documents the replica applied while the load ran.
        let end = start + duration;
        let applied = m
            .iter()
            .take_while(|(_, t)| *t <= end)
            .map(|(c, _)| *c)
            .max()
            .unwrap_or(0);
        let first = m.first().map_or(0, |(c, _)| *c);
        per_replica.push((applied.saturating_sub(first)) as f64 / duration.as_secs_f64());
    }
    let docs = acks.len() * batch;
    let primary_rate = docs as f64 / load_secs;
    let apply = per_replica
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(",");
    for (i, h) in seconds.iter().enumerate() {
        eprintln!(
            "  second {i}: lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    }
    eprintln!(
        "replicate: primary {primary_rate:.0} docs/s; replicas applied {apply} seqs/s; lag {}; drained {:.0} ms after the load",
        latency_fields(&lag),
        drain.as_secs_f64() * 1000.0
    );
    Ok(format!(
        "workload=replicate clients={clients} batch={batch} body={body} rate={rate} replicas={} docs_per_s={primary_rate:.0} replica_seqs_per_s={apply} drain_ms={} lag_{}",
        replicas.len(),
        drain.as_millis(),
        latency_fields(&lag).replace(' ', " lag_")
    ))
}
