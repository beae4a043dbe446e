//! The replica's side of `ReplicationService.Follow`: connect to the
//! primary, check that its store may follow it, apply its commits through
//! the store's writer (several queued commits land in one local commit),
//! acknowledge what is durable, and reconnect with backoff when the stream
//! breaks, resuming from the applied head.

use std::{collections::VecDeque, time::Duration};

use futures_util::StreamExt;
use tokio::{task::JoinHandle, time::Instant};
use tonic::{Code, transport::Endpoint};

use super::{
    Node, Role,
    apply::{Applier, Failure, Landing},
    convert,
};
use crate::{
    pb::{
        self, follow_request::Request as Ask, follow_response::Response as Reply,
        replication_service_client::ReplicationServiceClient,
    },
    shutdown::CancellationToken,
    store::{Admin, model::Seq},
};

/// First wait before reconnecting; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before reconnecting.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most commits queued for the writer before the stream waits for them.
const MAX_IN_FLIGHT: usize = 256;
/// How often an ack is sent while nothing else happens (what a flush made
/// durable in `buffered` mode).
const ACK_INTERVAL: Duration = Duration::from_millis(200);
/// Largest message taken from the primary: a commit's parts are cut to the
/// primary's message cap, which may be larger than this node's.
const MAX_STREAM_MESSAGE: usize = 256 << 20;

/// The running follower: stopped on promotion.
pub struct Handle {
    /// Stops it.
    stop: CancellationToken,
    /// Its task.
    task: JoinHandle<()>,
}

impl Handle {
    /// Stops following and waits until the stream is gone.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts following the node's primary.
pub fn spawn(node: Node, shutdown: CancellationToken) -> Handle {
    let stop = shutdown.child_token();
    let task = tokio::spawn(run(node, stop.clone()));
    Handle { stop, task }
}

/// What the primary's refusal means for following.
impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let info = tonic_types::StatusExt::get_error_details(&s)
            .error_info()
            .cloned();
        let reason = info.as_ref().map(|i| i.reason.as_str()).unwrap_or_default();
        let message = format!("primary: {} ({:?})", s.message(), s.code());
        let first = info
            .as_ref()
            .and_then(|i| i.metadata.get("first"))
            .and_then(|f| f.parse().ok());
        match (s.code(), reason) {
            (Code::FailedPrecondition, "DIVERGED") if let Some(first) = first => {
                Self::Diverged(Seq(first), message)
            }
            (Code::FailedPrecondition, "STORE_MISMATCH" | "DIVERGED") => Self::Refused(message),
            (Code::OutOfRange, _) => Self::Refused(format!(
                "{message}; this replica missed deletions the primary purged: start it from an empty data directory"
            )),
            _ => Self::Transient(message),
        }
    }
}

async fn run(node: Node, stop: CancellationToken) {
    let Some(url) = node.settings().primary.clone() else {
        return;
    };
    if node.settings().upstream_token_file.is_some() && url.starts_with("http://") {
        tracing::warn!(primary = %url, "--upstream-token-file with a plaintext primary: the token crosses the network unencrypted");
    }
    let mut backoff = MIN_BACKOFF;
    let mut last_error = String::new();
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = follow(&node, &url) => result,
        };
        let error = match result {
            Ok(()) => String::new(),
            Err(Failure::Diverged(first, e)) if node.settings().discard_divergent => {
                tracing::warn!(%first, "{e}; discarding the divergent suffix (--discard-divergent)");
                match node.store().admin(Admin::Discard(first)).await {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::error!(cause = %e, "not following the primary: cannot discard the divergent suffix");
                        return;
                    }
                }
            }
            Err(Failure::Diverged(_, e) | Failure::Refused(e)) => {
                tracing::error!(primary = %url, "not following the primary: {e}");
                return;
            }
            Err(Failure::Transient(e)) => e,
        };
        if error != last_error {
            tracing::warn!(primary = %url, cause = %error, "replication stream ended; reconnecting");
            last_error = error;
        }
        if started.elapsed() > MAX_BACKOFF {
            backoff = MIN_BACKOFF;
        }
        // Jitter, so replicas of a restarted primary do not come back at once.
        let jitter = Duration::from_micros(u64::from(std::process::id() % 1000) * 50);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection: runs until the stream breaks.
async fn follow(node: &Node, url: &str) -> Result<(), Failure> {
    let store = node.store().clone();
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| Failure::Refused(format!("--replicate-from {url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        // Commits stream one way at full speed: a window that grows with
        // the rate, not HTTP/2's default 64 KiB.
        .http2_adaptive_window(true);
    // Read at each connection: a rotated client certificate is used at once.
    if let Some(tls) = node.settings().upstream_tls().map_err(Failure::Transient)? {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Failure::Refused(format!("--replicate-from {url}: {e}")))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Failure::Transient(format!("cannot reach the primary: {e}")))?;
    let mut client =
        ReplicationServiceClient::new(channel).max_decoding_message_size(MAX_STREAM_MESSAGE);
    // Where the stream resumes: everything written here (in `buffered`
    // mode a flush makes the last of it durable; acks only count that).
    let head = store.written();
    let blank = store.is_blank()?;
    let start = pb::FollowStart {
        store_id: if blank {
            String::new()
        } else {
            store.store_id().to_string()
        },
        applied: head.0,
        epoch: store.seen_epoch()?,
        url: node.settings().advertise_url.clone(),
        clients_since: store.clients_progress()?.from,
        epochs: convert::epochs(&store.epochs()),
    };
    let (acks, ack_rx) = tokio::sync::mpsc::channel::<pb::FollowRequest>(64);
    let first = pb::FollowRequest {
        request: Some(Ask::Start(start)),
    };
    let requests =
        futures_util::stream::once(async move { first })
            .chain(futures_util::stream::unfold(ack_rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            }));
    let mut request = tonic::Request::new(requests);
    if let Some(path) = &node.settings().upstream_token_file {
        let token = std::fs::read_to_string(path).map_err(|e| {
            Failure::Transient(format!(
                "cannot read --upstream-token-file {}: {e}",
                path.display()
            ))
        })?;
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            Failure::Refused("the upstream token is not a valid header value".into())
        })?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut responses = client.follow(request).await?.into_inner();
    let Some(pb::FollowResponse {
        response: Some(Reply::Hello(hello)),
    }) = responses.message().await?
    else {
        return Err(Failure::Transient("the primary did not say hello".into()));
    };
    let mut applier = Applier::admit(&store, &hello).await?;
    if node.role() != Role::Replica {
        return Err(Failure::Transient("no longer a replica".into()));
    }
    tracing::info!(primary = %url, epoch = hello.epoch, primary_head = hello.head, applied = %head, "following the primary");
    node.heard_primary_head(hello.head);

    let mut in_flight: VecDeque<Landing> = VecDeque::new();
    // The first ack tells the primary what is durable here.
    let mut acked = Seq(0);
    ack(node, &acks, &mut acked).await;
    let mut ticker = tokio::time::interval(ACK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            landed = async { in_flight.front_mut()?.await.ok() }, if !in_flight.is_empty() => {
                in_flight.pop_front();
                match landed {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(Failure::Transient("the store closed".into())),
                }
                ack(node, &acks, &mut acked).await;
            }
            message = responses.message(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(message) = message? else {
                    return Err(Failure::Transient("the primary ended the stream".into()));
                };
                let Some(message) = message.response else {
                    return Err(Failure::Transient("an empty message from the primary".into()));
                };
                match &message {
                    Reply::Commit(commit) => node.heard_primary_head(commit.primary_head),
                    Reply::Progress(progress) => node.heard_primary_head(progress.head),
                    Reply::Clients(_) | Reply::Hello(_) => {}
                }
                if let Some(landing) = applier.apply(message).await? {
                    in_flight.push_back(landing);
                }
            }
            _ = ticker.tick() => {
                ack(node, &acks, &mut acked).await;
                node.refresh_ready();
            }
        }
    }
}

/// Tells the primary what is durable here, if it moved.
async fn ack(node: &Node, acks: &tokio::sync::mpsc::Sender<pb::FollowRequest>, acked: &mut Seq) {
    let head = node.store().head();
    node.refresh_ready();
    if head > *acked {
        *acked = head;
        let message = pb::FollowRequest {
            request: Some(Ask::Ack(pb::FollowAck { applied: head.0 })),
        };
        let _ = acks.send(message).await;
    }
}
