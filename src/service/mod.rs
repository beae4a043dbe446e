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
use tonic::{Request, Response, Status};

use crate::{
    config::{Config, ConflictPolicy, MESSAGE_OVERHEAD_BYTES},
    error::Error,
    pb::{self, sync_service_server::SyncService},
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
        }
    }
}

/// The service: cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct SyncApi {
    /// The store every handler reads and writes.
    store: Store,
    /// Limits and defaults.
    settings: Arc<Settings>,
    /// Cancelled on shutdown: open Subscribe streams end with UNAVAILABLE.
    shutdown: CancellationToken,
    /// One permit per open Subscribe stream.
    subscribers: Arc<Semaphore>,
}

impl SyncApi {
    /// A service over `store`.
    pub fn new(store: Store, settings: Settings, shutdown: CancellationToken) -> Self {
        let subscribers = Arc::new(Semaphore::new(settings.max_subscribers));
        Self {
            store,
            settings: Arc::new(settings),
            shutdown,
            subscribers,
        }
    }

    /// Fails if the caller's checkpoint comes from another store, or from
    /// further than this store has reached. A checkpoint a buffered push
    /// was given that is not durable yet is waited for.
    /// Returns the purge horizon the checkpoint is consistent with.
    async fn check_checkpoint(&self, store_id: &str, since: u64, seen: u64) -> Result<Seq, Error> {
        if !store_id.is_empty() && store_id != self.store.store_id() {
            return Err(Error::WrongStore {
                current: self.store.store_id().to_owned(),
            });
        }
        if !self.store.await_durable(Seq(since)).await? {
            let head = self.store.head().0;
            return Err(Error::CheckpointAhead { since, head });
        }
        Ok(self.store.check_checkpoint(Seq(since), Seq(seen))?)
    }
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
        Ok(Response::new(
            push::handle(self, request.into_inner()).await?,
        ))
    }

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        Ok(Response::new(
            pull::handle(self, request.into_inner()).await?,
        ))
    }

    type SubscribeStream = subscribe::SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Ok(Response::new(
            subscribe::handle(self, request.into_inner()).await?,
        ))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(
            get::handle(self, request.into_inner()).await?,
        ))
    }
}
