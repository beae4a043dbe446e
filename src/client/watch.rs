//! [`Watch`]: Subscribe, resumed from the last checkpoint delivered across
//! disconnects, server restarts and failover.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::{Stream, StreamExt, stream::BoxStream};
use tonic::{Code, Streaming};

use super::{
    Checkpoint, Client, ClientError, Document, ResyncReason, WatchOptions,
    error::{Next, next},
    types,
};
use crate::pb::{self, subscribe_response::Event};

/// One event of a [`Watch`].
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// Changed documents, in seq order, each delivered once.
    Changes {
        /// The documents.
        documents: Vec<Document>,
        /// Every change up to here was delivered: resume from it.
        checkpoint: Checkpoint,
    },
    /// The checkpoint moved without matching changes.
    Progress {
        /// Every matching change up to here was delivered.
        checkpoint: Checkpoint,
        /// True once the backlog was delivered and changes are live. Sent
        /// again after each reconnect.
        caught_up: bool,
    },
    /// The checkpoint cannot be resumed from (tombstones purged past it,
    /// another store, a primary replaced before it replicated it), or this
    /// client's own writes are gone ([`ResyncReason::WritesLost`]: the
    /// primary holds less than they reached): discard local state and start
    /// again from 0. The last event of the watch.
    ResyncNeeded {
        /// Why.
        reason: ResyncReason,
        /// The server's message.
        message: String,
    },
}

/// The live feed of [`Client::watch`]: a `Stream` of [`WatchEvent`]s.
///
/// When its stream breaks for a reason worth retrying (the server shut
/// down or was killed, a connection failed, the node is behind), it
/// reopens Subscribe from the last checkpoint it delivered, passing that
/// checkpoint's store id, purge horizon and epoch, on the next endpoint,
/// with backoff, for as long as it takes; documents at or below that
/// checkpoint are never delivered twice. A refusal for a stream cap
/// (`RESOURCE_EXHAUSTED`: too many subscribers) is retried too, after the
/// server's `RetryInfo` delay or with backoff. It ends after a `ResyncNeeded`
/// event, or with an error the server will keep giving (permission
/// denied, invalid argument).
pub struct Watch {
    /// The event loop.
    inner: BoxStream<'static, Result<WatchEvent, ClientError>>,
}

impl Watch {
    pub(crate) fn new(client: Client, options: WatchOptions) -> Self {
        let state = State {
            position: options.since.clone(),
            client,
            collections: options.collections,
            stream: None,
            failures: 0,
            done: false,
        };
        Self {
            inner: futures_util::stream::unfold(state, State::next_event).boxed(),
        }
    }
}

impl Stream for Watch {
    type Item = Result<WatchEvent, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// Where a watch is.
struct State {
    /// Its client.
    client: Client,
    /// Only these collections.
    collections: Vec<String>,
    /// The last checkpoint delivered: where a reconnect resumes.
    position: Checkpoint,
    /// The open Subscribe stream.
    stream: Option<Streaming<pb::SubscribeResponse>>,
    /// Failures in a row (for the backoff); reset by a message.
    failures: u32,
    /// Set after the last event.
    done: bool,
}

impl State {
    async fn next_event(mut self) -> Option<(Result<WatchEvent, ClientError>, Self)> {
        loop {
            if self.done {
                return None;
            }
            let failure = match self.stream.as_mut() {
                None => match self.open().await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        continue;
                    }
                    Err(e) => e,
                },
                Some(stream) => match stream.message().await {
                    Ok(Some(message)) => {
                        self.failures = 0;
                        match self.event(message) {
                            Ok(Some(event)) => return Some((Ok(event), self)),
                            Ok(None) => continue,
                            Err(e) => {
                                self.done = true;
                                return Some((Err(e), self));
                            }
                        }
                    }
                    // A server never ends a stream with OK; take it as a
                    // break.
                    Ok(None) => ClientError::from(tonic::Status::unavailable("stream ended")),
                    Err(status) => status.into(),
                },
            };
            self.stream = None;
            match &failure {
                ClientError::ResyncNeeded { reason, status } => {
                    self.done = true;
                    let event = WatchEvent::ResyncNeeded {
                        reason: *reason,
                        message: status.message().to_owned(),
                    };
                    return Some((Ok(event), self));
                }
                // A stream cap (max subscribers, per-principal streams) is
                // transient: wait the server's delay (or back off), then
                // try again, on the next endpoint.
                ClientError::Status(status) if status.code() == Code::ResourceExhausted => {
                    self.failures = self.failures.saturating_add(1);
                    let wait = match next(status, true) {
                        Next::RetryAfter(delay) => delay,
                        _ => self.client.retry_policy().backoff(self.failures),
                    };
                    tracing::debug!(cause = %status.message(), ?wait, "watch: refused for now; retrying");
                    self.client.rotate();
                    tokio::time::sleep(wait).await;
                }
                ClientError::Status(status) if next(status, true) != Next::Fail => {
                    self.failures = self.failures.saturating_add(1);
                    tracing::debug!(cause = %status.message(), checkpoint = self.position.seq, "watch: reconnecting");
                    self.client.rotate();
                    let wait = self.client.retry_policy().backoff(self.failures);
                    tokio::time::sleep(wait).await;
                }
                _ => {
                    self.done = true;
                    return Some((Err(failure), self));
                }
            }
        }
    }

    /// Opens Subscribe from the position. The first time, when the position
    /// names no store, learns the store id (from a one-document Pull) so
    /// that a resume on another store is refused rather than mixed in.
    async fn open(&mut self) -> Result<Streaming<pb::SubscribeResponse>, ClientError> {
        if self.position.store_id.is_empty() {
            let page = self
                .client
                .pull_page(&Checkpoint::default(), &self.collections, 1)
                .await?;
            self.position.store_id = page.store_id;
        }
        let request = pb::SubscribeRequest {
            since: self.position.seq,
            collections: self.collections.clone(),
            store_id: self.position.store_id.clone(),
            purge_horizon: self.position.purge_horizon,
            min_checkpoint: self.client.min_checkpoint(),
            checkpoint_epoch: self.position.epoch,
        };
        self.client.subscribe(request).await
    }

    /// The event for a message; moves the position. `None` for a batch
    /// whose documents were all delivered before.
    fn event(&mut self, message: pb::SubscribeResponse) -> Result<Option<WatchEvent>, ClientError> {
        match message.event {
            Some(Event::Changes(batch)) => {
                let delivered = self.position.seq;
                let fresh: Vec<_> = batch
                    .documents
                    .into_iter()
                    .filter(|d| d.seq > delivered)
                    .collect();
                let documents = types::documents(fresh)?;
                if batch.checkpoint < delivered {
                    return Ok(None);
                }
                self.moved(
                    batch.checkpoint,
                    batch.purge_horizon,
                    batch.checkpoint_epoch,
                );
                Ok(Some(WatchEvent::Changes {
                    documents,
                    checkpoint: self.position.clone(),
                }))
            }
            Some(Event::Progress(p)) => {
                if p.checkpoint < self.position.seq {
                    return Ok(None);
                }
                self.moved(p.checkpoint, p.purge_horizon, p.checkpoint_epoch);
                Ok(Some(WatchEvent::Progress {
                    checkpoint: self.position.clone(),
                    caught_up: p.caught_up,
                }))
            }
            None => Ok(None),
        }
    }

    fn moved(&mut self, seq: u64, purge_horizon: u64, epoch: u64) {
        self.position.seq = seq;
        self.position.purge_horizon = purge_horizon;
        self.position.epoch = epoch;
    }
}
