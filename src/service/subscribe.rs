//! Subscribe: the backlog, a `Progress{caught_up}`, then live changes, with
//! heartbeats, until the client leaves or the server shuts down.

use std::{collections::VecDeque, pin::Pin, sync::Arc};

use futures_util::Stream;
use prost::Message;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at};
use tonic::Status;

use super::{SyncApi, convert, validate};
use crate::{
    config::DEFAULT_PULL_LIMIT,
    error::Error,
    metrics::{Refusal, SubscriberGuard},
    pb::{self, subscribe_response::Event},
    shutdown::CancellationToken,
    store::{
        FeedEvent, PageLimit, Subscription,
        model::{Document, Seq},
    },
};

/// The response stream of one subscriber.
pub type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

/// Opens a subscription (checks happen before the stream starts, so a bad
/// request fails the call itself).
/// `wait` bounds how long it waits for this node to reach `since` or
/// `min_checkpoint`.
pub async fn handle(
    api: &SyncApi,
    req: pb::SubscribeRequest,
    wait: std::time::Duration,
    identity: &crate::auth::Identity,
) -> Result<SubscribeStream, Error> {
    validate::collections(&req.collections)?;
    let filter = identity.scope(req.collections.clone())?;
    api.await_min_checkpoint(req.min_checkpoint, wait).await?;
    let from = super::Checkpoint {
        store_id: &req.store_id,
        since: req.since,
        seen: req.purge_horizon,
        epoch: req.checkpoint_epoch,
    };
    let seen = api.check_checkpoint(from, wait).await?;
    let stream = identity.open_stream()?;
    let permit = api.subscribers.clone().try_acquire_owned().map_err(|_| {
        api.store.metrics().refused(Refusal::MaxSubscribers);
        Error::StreamsFull(format!(
            "too many subscribers: this server allows {} open Subscribe streams; retry later or use another replica",
            api.settings.max_subscribers
        ))
    })?;
    let page = PageLimit {
        docs: usize::try_from(DEFAULT_PULL_LIMIT).unwrap_or(1000),
        bytes: api.settings.message_budget,
    };
    let subscription = api.store.subscribe(Seq(req.since), seen, filter, page);
    let period = api.settings.heartbeat_interval;
    let mut heartbeat = interval_at(Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = Feed {
        subscription,
        pending: VecDeque::new(),
        changes: None,
        heartbeat,
        shutdown: api.shutdown.clone(),
        budget: api.settings.message_budget,
        max_message_bytes: api.settings.max_message_bytes,
        failed: false,
        _permit: permit,
        _counted: api.store.metrics().subscriber(),
        _principal_stream: stream,
        api: api.clone(),
        reloads: identity.reloads(),
        identity: identity.clone(),
    };
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        },
    )))
}

/// The rest of a changes event.
struct Changes {
    /// Its documents, in seq order.
    docs: Vec<Arc<Document>>,
    /// The first one not sent yet.
    next: usize,
    /// The event's checkpoint, for its last message.
    checkpoint: Seq,
}

/// One stream's state.
struct Feed {
    /// The store-side cursor.
    subscription: Subscription,
    /// Messages ready to send, or the error that ends the stream.
    pending: VecDeque<Result<pb::SubscribeResponse, Status>>,
    /// Changes not sent yet: one message is made of them at a time (a large
    /// event is split by size), so a stream holds at most one encoded
    /// message however big the commits it is given.
    changes: Option<Changes>,
    /// Progress timer, reset by every message sent.
    heartbeat: Interval,
    /// Ends the stream (with UNAVAILABLE) on server shutdown.
    shutdown: CancellationToken,
    /// Byte budget for one message's documents.
    budget: usize,
    /// Largest message the server sends.
    max_message_bytes: usize,
    /// An error was sent; the stream ends.
    failed: bool,
    /// This stream's place under --max-subscribers, released on drop.
    _permit: OwnedSemaphorePermit,
    /// Counts it in `deltasync_subscribers` while it is open.
    _counted: SubscriberGuard,
    /// Its place under its principal's `max_subscriptions`.
    _principal_stream: Option<crate::auth::StreamGuard>,
    /// The service, for the epochs of checkpoints.
    api: SyncApi,
    /// Changes when the auth file is reloaded (`None`: auth is off).
    reloads: Option<tokio::sync::watch::Receiver<u64>>,
    /// The caller: the stream ends if its credential is revoked.
    identity: crate::auth::Identity,
}

impl Feed {
    async fn next(&mut self) -> Option<Result<pb::SubscribeResponse, Status>> {
        loop {
            if self.pending.is_empty() {
                self.queue_next_run();
            }
            if let Some(message) = self.pending.pop_front() {
                self.heartbeat.reset();
                self.failed |= message.is_err();
                return Some(message);
            }
            if self.failed {
                return None;
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    // Not a normal end: the client reconnects and resumes.
                    self.failed = true;
                    return Some(Err(Status::unavailable(
                        "server is shutting down; reconnect and resume from your last checkpoint",
                    )));
                }
                event = self.subscription.next() => match event {
                    Ok(FeedEvent::Changes { docs, checkpoint }) => {
                        self.changes = Some(Changes { docs, next: 0, checkpoint });
                    }
                    Ok(FeedEvent::CaughtUp { checkpoint }) => self.queue_progress(checkpoint, true),
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(Error::from(e).into()));
                    }
                },
                Some(()) = crate::auth::reloaded(&mut self.reloads) => {
                    if !self.identity.is_current() {
                        self.failed = true;
                        return Some(Err(Status::unauthenticated(
                            "the credential of this stream was revoked or its grants changed; reconnect",
                        )));
                    }
                }
                _ = self.heartbeat.tick() => {
                    let (checkpoint, live) = (self.subscription.checkpoint(), self.subscription.is_live());
                    self.queue_progress(checkpoint, live);
                }
            }
        }
    }

    /// Queues the next message of the changes not sent yet: as many
    /// documents as fit the budget (one at least). Its checkpoint is its last
    /// seq, or the event's for the event's last message.
    fn queue_next_run(&mut self) {
        let Some(changes) = &mut self.changes else {
            return;
        };
        let mut documents = Vec::new();
        let mut size = 0;
        while let Some(doc) = changes.docs.get(changes.next) {
            let doc = convert::document(doc);
            let len = doc.encoded_len() + 8; // field tag and length prefix
            if !documents.is_empty() && size + len > self.budget {
                break;
            }
            size += len;
            documents.push(doc);
            changes.next += 1;
        }
        let checkpoint = match changes.docs.get(changes.next) {
            Some(_) => documents.last().map_or(changes.checkpoint.0, |d| d.seq),
            None => {
                let checkpoint = changes.checkpoint.0;
                self.changes = None;
                checkpoint
            }
        };
        let message = pb::SubscribeResponse {
            event: Some(Event::Changes(pb::ChangeBatch {
                documents,
                checkpoint,
                purge_horizon: self.subscription.purge_horizon().0,
                checkpoint_epoch: self.api.epoch_of(checkpoint),
            })),
        };
        let size = message.encoded_len();
        if size > self.max_message_bytes
            && let Some(Event::Changes(batch)) = &message.event
            && let Some(doc) = batch.documents.first()
        {
            let error = super::unservable(doc, size, self.max_message_bytes);
            self.pending.push_back(Err(error.into()));
            return;
        }
        self.pending.push_back(Ok(message));
    }

    fn queue_progress(&mut self, checkpoint: Seq, caught_up: bool) {
        self.pending.push_back(Ok(pb::SubscribeResponse {
            event: Some(Event::Progress(pb::Progress {
                checkpoint: checkpoint.0,
                caught_up,
                purge_horizon: self.subscription.purge_horizon().0,
                checkpoint_epoch: self.api.epoch_of(checkpoint.0),
            })),
        }));
    }
}
