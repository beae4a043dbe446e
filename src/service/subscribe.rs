//! Subscribe: the backlog, a `Progress{caught_up}`, then live changes, with
//! heartbeats, until the client leaves or the server shuts down.

use std::{collections::VecDeque, pin::Pin};

use futures_util::Stream;
use prost::Message;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at};
use tonic::Status;

use super::{SyncApi, convert, validate};
use crate::{
    config::DEFAULT_PULL_LIMIT,
    error::Error,
    pb::{self, subscribe_response::Event},
    shutdown::CancellationToken,
    store::{CollectionFilter, FeedEvent, PageLimit, Subscription, model::Seq},
};

/// The response stream of one subscriber.
pub type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

/// Opens a subscription (checks happen before the stream starts, so a bad
/// request fails the call itself).
pub async fn handle(api: &SyncApi, req: pb::SubscribeRequest) -> Result<SubscribeStream, Error> {
    validate::collections(&req.collections)?;
    api.check_checkpoint(&req.store_id, req.since).await?;
    let permit = api.subscribers.clone().try_acquire_owned().map_err(|_| {
        Error::ResourceExhausted(format!(
            "too many subscribers: this server allows {} open Subscribe streams; retry later or use another replica",
            api.settings.max_subscribers
        ))
    })?;
    let page = PageLimit {
        docs: usize::try_from(DEFAULT_PULL_LIMIT).unwrap_or(1000),
        bytes: api.settings.message_budget,
    };
    let subscription =
        api.store
            .subscribe(Seq(req.since), CollectionFilter::new(req.collections), page);
    let period = api.settings.heartbeat_interval;
    let mut heartbeat = interval_at(Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = Feed {
        subscription,
        pending: VecDeque::new(),
        heartbeat,
        shutdown: api.shutdown.clone(),
        budget: api.settings.message_budget,
        max_message_bytes: api.settings.max_message_bytes,
        failed: false,
        _permit: permit,
    };
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        },
    )))
}

/// One stream's state.
struct Feed {
    /// The store-side cursor.
    subscription: Subscription,
    /// Messages ready to send (a large event is split by size), or the
    /// error that ends the stream.
    pending: VecDeque<Result<pb::SubscribeResponse, Status>>,
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
}

impl Feed {
    async fn next(&mut self) -> Option<Result<pb::SubscribeResponse, Status>> {
        loop {
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
                    Ok(FeedEvent::Changes { docs, checkpoint }) => self.queue_changes(&docs, checkpoint),
                    Ok(FeedEvent::CaughtUp { checkpoint }) => self.queue_progress(checkpoint, true),
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(Error::from(e).into()));
                    }
                },
                _ = self.heartbeat.tick() => {
                    let (checkpoint, live) = (self.subscription.checkpoint(), self.subscription.is_live());
                    self.queue_progress(checkpoint, live);
                }
            }
        }
    }

    /// Queues changes as one message, or several if they exceed the budget;
    /// each message's checkpoint is its last seq, the last one's the event's.
    fn queue_changes(
        &mut self,
        docs: &[std::sync::Arc<crate::store::model::Document>],
        checkpoint: Seq,
    ) {
        let runs = convert::fit(docs.iter().map(|d| convert::document(d)), self.budget);
        let last = runs.len().saturating_sub(1);
        for (i, documents) in runs.into_iter().enumerate() {
            let checkpoint = if i == last {
                checkpoint.0
            } else {
                documents.last().map_or(checkpoint.0, |d| d.seq)
            };
            let message = pb::SubscribeResponse {
                event: Some(Event::Changes(pb::ChangeBatch {
                    documents,
                    checkpoint,
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
    }

    fn queue_progress(&mut self, checkpoint: Seq, caught_up: bool) {
        self.pending.push_back(Ok(pb::SubscribeResponse {
            event: Some(Event::Progress(pb::Progress {
                checkpoint: checkpoint.0,
                caught_up,
            })),
        }));
    }
}
