//! The `replicate` workload (deltasync only): closed-loop pushes to a
//! primary while one live Subscribe per replica records when each replica
//! has applied what: the replica's apply rate, and replication lag from
//! the primary's acknowledgement of a push to the moment a replica has
//! applied its checkpoint (measured by that replica's Subscribe stream,
//! so it includes the replica's own fan-out, a fraction of a millisecond).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use deltasync::pb::{
    self, admin_service_client::AdminServiceClient, subscribe_response::Event,
    sync_service_client::SyncServiceClient,
};

use crate::{Args, Error, histogram, latency_fields, micros, target::Conn, value};

/// (checkpoint, when) pairs, in checkpoint order.
type Marks = Arc<Mutex<Vec<(u64, Instant)>>>;

/// Follows `replica` from its head, noting when each checkpoint arrived.
async fn follow(replica: String, marks: Marks) -> Result<(), Error> {
    let channel = tonic::transport::Endpoint::from_shared(replica)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let head = AdminServiceClient::new(channel.clone())
        .status(pb::StatusRequest {})
        .await?
        .into_inner()
        .head;
    let mut stream = SyncServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .subscribe(pb::SubscribeRequest {
            since: head,
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(message) = stream.message().await? {
        let checkpoint = match message.event {
            Some(Event::Changes(batch)) => batch.checkpoint,
            Some(Event::Progress(p)) => p.checkpoint,
            None => continue,
        };
        marks
            .lock()
            .map_err(|_| "poisoned")?
            .push((checkpoint, Instant::now()));
    }
    Ok(())
}

/// When the replica had applied `checkpoint`, from its marks.
fn applied_at(marks: &[(u64, Instant)], checkpoint: u64) -> Option<Instant> {
    let i = marks.partition_point(|(c, _)| *c < checkpoint);
    marks.get(i).map(|(_, t)| *t)
}

pub async fn run(
    args: &Args,
    replicas: &[String],
    clients: usize,
    batch: usize,
    body: usize,
    duration: Duration,
) -> Result<String, Error> {
    let marks: Vec<Marks> = replicas.iter().map(|_| Marks::default()).collect();
    let followers: Vec<_> = replicas
        .iter()
        .zip(&marks)
        .map(|(r, m)| tokio::spawn(follow(r.clone(), m.clone())))
        .collect();
    let value = Arc::new(value(body));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut conn = Conn::connect(args.target, &args.endpoint).await?;
        let value = value.clone();
        let client = format!("bench-r{c}");
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let keys: Vec<String> = (0..batch).map(|i| format!("r{c}-{n}-{i}")).collect();
                let first = u64::try_from(n * batch + 1)?;
                let checkpoint = conn
                    .put_tracked(&keys, &value, Some((client.as_str(), first)))
                    .await?;
                acks.push((checkpoint, Instant::now()));
                n += 1;
            }
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
    for m in &marks {
        let m = m.lock().map_err(|_| "poisoned")?;
        for (checkpoint, acked) in &acks {
            if let Some(at) = applied_at(&m, *checkpoint) {
                lag.record(micros(at.saturating_duration_since(*acked)))?;
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
    eprintln!(
        "replicate: primary {primary_rate:.0} docs/s; replicas applied {apply} seqs/s; lag {}; drained {:.0} ms after the load",
        latency_fields(&lag),
        drain.as_secs_f64() * 1000.0
    );
    Ok(format!(
        "workload=replicate clients={clients} batch={batch} body={body} replicas={} docs_per_s={primary_rate:.0} replica_seqs_per_s={apply} drain_ms={} lag_{}",
        replicas.len(),
        drain.as_millis(),
        latency_fields(&lag).replace(' ', " lag_")
    ))
}
