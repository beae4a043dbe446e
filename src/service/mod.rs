//! The gRPC `SyncService`: one file per RPC, conversions in [`convert`].
//!
//! Handlers are short: decode, validate, call the store, encode.

pub mod convert;
pub mod get;
pub mod pull;
pub mod push;
pub mod subscribe;
pub mod validate;

use std::{sync::Arc, time::Duration};

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    auth::Identity,
    config::{Config, ConflictPolicy, MESSAGE_OVERHEAD_BYTES},
    error::Error,
    pb::{self, sync_service_server::SyncService},
    replication::{self, Node, Role},
    shutdown::CancellationToken,
    store::{Store, model::Seq},
};

/// Limits and defaults the handlers enforce, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Default strategies per collection.
    pub policy: ConflictPolicy,
    /// Most mutations per Push.
    pub max_batch: usize,
    /// Largest encoded body.
    pub max_body_bytes: usize,
    /// Largest message the server sends.
    pub max_message_bytes: usize,
    /// Byte budget for the documents of one response message.
    pub message_budget: usize,
    /// Largest Pull page.
    pub pull_max_limit: u32,
    /// Progress interval on idle streams.
    pub heartbeat_interval: Duration,
    /// Most open Subscribe streams.
    pub max_subscribers: usize,
    /// Longest wait of a read for a checkpoint this node has not reached.
    pub replica_wait: Duration,
}

impl Settings {
    /// The handler settings of a configuration.
    pub fn from_config(config: &Config) -> Self {
        Self {
            policy: config.conflict_strategy.clone(),
            max_batch: config.max_batch,
            max_body_bytes: config.max_body_bytes,
            max_message_bytes: config.max_message_bytes,
            message_budget: config
                .max_message_bytes
                .saturating_sub(MESSAGE_OVERHEAD_BYTES),
            pull_max_limit: config.pull_max_limit,
            heartbeat_interval: config.heartbeat_interval,
            max_subscribers: config.max_subscribers,
            replica_wait: config.replica_wait,
        }
    }
}

/// The service: cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct SyncApi {
    /// The store every handler reads and writes.
    store: Store,
    /// The node's place in the cluster: where writes go, how far it is.
    node: Node,
    /// Limits and defaults.
    settings: Arc<Settings>,
    /// Cancelled on shutdown: open Subscribe streams end with UNAVAILABLE.
    shutdown: CancellationToken,
    /// One permit per open Subscribe stream.
    subscribers: Arc<Semaphore>,
}

impl SyncApi {
    /// A service over the store of `node`.
    pub fn new(node: Node, settings: Settings, shutdown: CancellationToken) -> Self {
        let subscribers = Arc::new(Semaphore::new(settings.max_subscribers));
        Self {
            store: node.store().clone(),
            node,
            settings: Arc::new(settings),
            shutdown,
            subscribers,
        }
    }

    /// Fails if the caller's checkpoint comes from another store, or from
    /// further than this store has reached. A checkpoint a buffered push
    /// was given that is not durable yet is waited for.
    /// Returns the purge horizon the checkpoint is consistent with.
    /// On a replica, a checkpoint above its head is waited for (at most
    /// `wait`), as `min_checkpoint` is. A checkpoint whose epoch is not the
    /// one this node's history gives its seq came from a primary replaced
    /// before it was replicated.
    async fn check_checkpoint(&self, from: Checkpoint<'_>, wait: Duration) -> Result<Seq, Error> {
        let Checkpoint {
            store_id,
            since,
            seen,
            epoch,
        } = from;
        if !store_id.is_empty() && *store_id != *self.store.store_id() {
            return Err(Error::WrongStore {
                current: self.store.store_id().to_string(),
            });
        }
        if self.node.role() == Role::Replica {
            self.node.wait_applied(Seq(since), wait).await?;
        } else if !self.store.await_durable(Seq(since)).await? {
            let head = self.store.head().0;
            return Err(Error::CheckpointAhead { since, head });
        }
        let ours = self.store.epochs().epoch_of(Seq(since));
        if epoch != 0 && since != 0 && ours != epoch {
            return Err(Error::CheckpointDiverged { since, epoch, ours });
        }
        Ok(self.store.check_checkpoint(Seq(since), Seq(seen))?)
    }

    /// The epoch checkpoint `seq` was committed in, for answers.
    fn epoch_of(&self, seq: u64) -> u64 {
        self.store.epochs().epoch_of(Seq(seq))
    }

    /// How long a read may wait for this node to reach a checkpoint:
    /// --replica-wait, or less to answer within the call's deadline (which
    /// started counting before the call reached the handler).
    fn read_wait(&self, metadata: &MetadataMap) -> Duration {
        let configured = self.settings.replica_wait;
        call_timeout(metadata).map_or(configured, |t| {
            let margin = (t / 10).max(Duration::from_millis(20));
            t.saturating_sub(margin).min(configured)
        })
    }

    /// Read-your-writes: waits until this node has applied `min_checkpoint`.
    async fn await_min_checkpoint(&self, min_checkpoint: u64, wait: Duration) -> Result<(), Error> {
        if min_checkpoint == 0 {
            return Ok(());
        }
        self.node.wait_applied(Seq(min_checkpoint), wait).await
    }
}

/// Where a reader stands, as its request says.
pub struct Checkpoint<'a> {
    /// The store its checkpoint came from ("" if unknown).
    pub store_id: &'a str,
    /// The checkpoint.
    pub since: u64,
    /// The purge horizon it is consistent with.
    pub seen: u64,
    /// The epoch it was committed in (0 if unknown).
    pub epoch: u64,
}

/// A stored document that cannot be sent within the message cap: only
/// possible for one stored before the body limit applied to every write, or
/// after the limits were lowered. Not OUT_OF_RANGE, which means "resync".
pub fn unservable(doc: &pb::Document, size: usize, max: usize) -> Error {
    Error::ResourceExhausted(format!(
        "document {}/{} (seq {}) takes {size} bytes in a message, over the {max} bytes this server sends; \
         raise --max-message-bytes, or replace the document with a smaller one",
        doc.collection, doc.id, doc.seq
    ))
}

#[tonic::async_trait]
impl SyncService for SyncApi {
    async fn push(
        &self,
        request: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let identity = Identity::of(&request);
        push::authorize(request.get_ref(), &identity)?;
        // A push whose caller has given up waiting is not committed.
        let deadline = call_timeout(request.metadata()).map(|t| std::time::Instant::now() + t);
        let response = match self.node.write_route()? {
            None => push::handle(self, request.into_inner(), &identity, deadline).await?,
            Some(_) if !identity.forwardable() => {
                return Err(Error::FailedPrecondition(format!(
                    "{}; a caller known by its client certificate pushes to the primary itself \
                     (a forwarded push would carry this replica's certificate, not the caller's)",
                    self.node.not_primary()
                ))
                .into());
            }
            Some(primary) => {
                let wait = self.read_wait(request.metadata());
                replication::forward::push(&self.node, primary, request, wait).await?
            }
        };
        Ok(Response::new(response))
    }

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let wait = self.read_wait(request.metadata());
        let identity = Identity::of(&request);
        Ok(Response::new(
            pull::handle(self, request.into_inner(), wait, &identity).await?,
        ))
    }

    type SubscribeStream = subscribe::SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let wait = self.read_wait(request.metadata());
        let identity = Identity::of(&request);
        Ok(Response::new(
            subscribe::handle(self, request.into_inner(), wait, &identity).await?,
        ))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let wait = self.read_wait(request.metadata());
        let identity = Identity::of(&request);
        Ok(Response::new(
            get::handle(self, request.into_inner(), wait, &identity).await?,
        ))
    }
}

/// The deadline a gRPC call carries (`grpc-timeout`), if any.
pub fn call_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(call_timeout(&m), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(call_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(call_timeout(&m), Some(Duration::from_secs(3)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(call_timeout(&m), None);
    }
}
